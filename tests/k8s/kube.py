"""kubectl helpers of the vaultfs k8s tier: JSON in and out, polling with hard timeouts, and
the host-side views (processes, mounts) of what the cluster runs. Times are CLOCK_BOOTTIME
seconds (`now()`), the clock /proc/uptime shows inside every container of the node."""

import json
import os
import subprocess
import time
import urllib.request


class Timeout(Exception):
    pass


def now():
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def kubectl(*args, stdin=None, timeout=180, check=True):
    p = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout if check else p


def apply(*objs):
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def get(kind, name=None, ns=None, selector=None):
    """The object (or the list's items with a selector or no name); None if not found."""
    args = ["get", kind] + ([name] if name else []) + (["-n", ns] if ns else [])
    args += (["-l", selector] if selector else []) + ["-o", "json"]
    p = kubectl(*args, check=False)
    if p.returncode != 0:
        if "NotFound" in p.stderr or "not found" in p.stderr:
            return None
        raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    obj = json.loads(p.stdout)
    return obj["items"] if "items" in obj else obj


def poll(what, fn, timeout, interval=0.2):
    """fn() until it returns something truthy (returned); Timeout after `timeout` seconds."""
    deadline = now() + timeout
    while True:
        value = fn()
        if value:
            return value
        if now() > deadline:
            raise Timeout(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def live_pods(ns, selector):
    """Pods of the selector that are not being deleted."""
    return [p for p in get("pods", ns=ns, selector=selector) or [] if "deletionTimestamp" not in p["metadata"]]


def is_ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def restarts(pod, container):
    for s in pod.get("status", {}).get("containerStatuses", []):
        if s["name"] == container:
            return s.get("restartCount", 0)
    return 0


def logs(ns, pod, container=None):
    args = ["logs", "-n", ns, pod] + (["-c", container] if container else [])
    p = kubectl(*args, check=False)
    return p.stdout if p.returncode == 0 else ""


def events(ns, name):
    """Event (reason, message) pairs about the object `name`, oldest first."""
    items = get("events", ns=ns) or []
    items = [e for e in items if e["involvedObject"].get("name") == name]
    items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [(e.get("reason", ""), e.get("message", "")) for e in items]


def delete_pods(ns, *names, timeout=60):
    if names:
        kubectl("delete", "pod", "-n", ns, *names, "--ignore-not-found", "--wait=true", f"--timeout={timeout}s",
                timeout=timeout + 30)


def http_get(url, timeout=2):
    """(status, body) of a GET to a loopback URL, never through a proxy; (0, error) if none."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


# --- the host's view -------------------------------------------------------------------------

def host_processes(argv0_name, argv1=None):
    """Pids of the host whose command line is `.../argv0_name [argv1 ...]`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0].decode(errors="replace")) != argv0_name:
            continue
        if argv1 is None or (len(argv) > 1 and argv[1].decode(errors="replace") == argv1):
            found.append(int(entry))
    return found


def host_comm_pids(comm):
    """Pids of the host whose /proc/PID/comm is exactly `comm`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().rstrip("\n") == comm:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def host_mounts(fstype):
    """Mount points of this (the host's) mount namespace of file system type `fstype`."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == fstype:
                out.append(left.split(" ")[4])
    return out


def host_listeners(*process_names):
    """(address, process name) of the host's listening TCP sockets held by those processes."""
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        users = fields[-1] if fields and fields[-1].startswith("users:") else ""
        for name in process_names:
            if f'(("{name}",' in users or f'),("{name}",' in users:
                found.append((fields[3], name))
    return found
