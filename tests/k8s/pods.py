"""App pods of the vaultfs k8s tier (JSON manifests) and the reader containers' logs.

Every pod follows the lab's rules (hostNetwork, dnsPolicy Default, local images, never pulled)
and declares inline vaultfs CSI volumes. A reader container is a busybox shell loop that reads
its files every 100 ms and logs one line per read:
    <uptime before> <uptime after> OK|FAIL <file> <content, or cat's error>
(/proc/uptime: CLOCK_BOOTTIME with 10 ms resolution, the same clock on the host and in every
container; busybox `date` has no sub-second format).
"""

import json
from dataclasses import dataclass

NAMESPACE = "vaultfs-e2e"
BUSYBOX = "localhost/busybox:1"
DRIVER = "csi.vaultfs.io"

READER = r"""set -f
trap 'exit 0' TERM INT
while :; do
  for f in "$@"; do
    read -r t0 _ < /proc/uptime
    if v=$(cat "$f" 2>&1); then r=OK; else r=FAIL; fi
    read -r t1 _ < /proc/uptime
    echo "$t0 $t1 $r $f" $v
  done
  sleep 0.1
done"""


def secret(name, path, key=None):
    return {"name": name, "path": path, **({"key": key} if key else {})}


def volume(name, role, entries, **attrs):
    """An inline vaultfs volume; `entries` are `secrets` entries, attrs more volumeAttributes."""
    attributes = {"role": role, "secrets": json.dumps(entries), **{k: str(v) for k, v in attrs.items()}}
    return {"name": name, "csi": {"driver": DRIVER, "readOnly": True, "volumeAttributes": attributes}}


def mount(volume_name, kind, path):
    """A volumeMount of kind h2c (HostToContainer), none (no propagation) or subpath (`path`
    is then DIR/FILE and FILE of the volume is mounted there)."""
    m = {"name": volume_name, "mountPath": path, "readOnly": True}
    if kind == "h2c":
        m["mountPropagation"] = "HostToContainer"
    elif kind == "subpath":
        m["subPath"] = path.rsplit("/", 1)[1]
    return m


def reader(name, files, mounts):
    return {"name": name, "image": BUSYBOX, "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", READER, "reader", *files], "volumeMounts": mounts}


def pod(name, service_account, containers, volumes, labels=None):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "vaultfs-e2e", **(labels or {})}},
        "spec": {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "hostNetwork": True, "dnsPolicy": "Default", "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "containers": containers, "volumes": volumes,
        },
    }


def simple_reader_pod(name, service_account, role, entries, files=None, **attrs):
    """One container reading /s/<name> of each entry (or `files`) from one volume at /s."""
    files = files or [f"/s/{e['name']}" for e in entries]
    return pod(name, service_account, [reader("reader", files, [mount("s", "none", "/s")])],
               [volume("s", role, entries, **attrs)])


@dataclass
class Read:
    t0: float
    t1: float
    ok: bool
    file: str
    text: str


def parse(log):
    reads = []
    for line in log.splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[2] in ("OK", "FAIL"):
            try:
                reads.append(Read(float(parts[0]), float(parts[1]), parts[2] == "OK", parts[3],
                                  parts[4] if len(parts) > 4 else ""))
            except ValueError:
                pass
    return reads


def first(reads, ok=True, text=None, after=0.0, file=None):
    for r in reads:
        if r.ok == ok and r.t1 >= after and (text is None or text in r.text) and (file is None or r.file == file):
            return r
    return None


def window(reads, start, end):
    """(reads finished in [start, end], failed ones, longest time between two successful reads
    with at least one of them in the window, and when that pause ended)."""
    inside = [r for r in reads if start <= r.t1 <= end]
    fails = [r for r in inside if not r.ok]
    oks = [r.t1 for r in reads if r.ok]
    gap, gap_end = 0.0, None
    for a, b in zip(oks, oks[1:]):
        if b >= start and a <= end and b - a > gap:
            gap, gap_end = b - a, b
    return inside, fails, gap, gap_end
