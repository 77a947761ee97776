"""A template entry and a reload signal in a pod (on the deploy/reload-signals variant), and a
publish and read on the Helm chart's install."""

import os
import time

import kube
import pods as P
from harness import IMAGE, wait_read
from kube import apply, now, poll

TTL = 5
TEMPLATE = "user={{ secret('secret/a/reload').user }}\npassword={{ secret('secret/a/reload').password }}\n"
PROCESS = "reloadcount"  # tests/k8s/reloadcount.c, in the vaultfs image


def app_lines(pod):
    """reloadcount's stdout: (boottime, event, count, content) per line."""
    out = []
    for line in kube.logs(P.NAMESPACE, pod, "app").splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[1] in ("start", "hup"):
            out.append((float(parts[0]), parts[1], int(parts[2]), parts[3] if len(parts) > 3 else ""))
    return out


def reload_signal(r, bao):
    vol = P.volume("s", "a", [{"name": "app.conf", "template": TEMPLATE},
                              P.secret("password", "secret/a/reload", "password")],
                   cacheTTL=f"{TTL}s", reloadSignal="SIGHUP", reloadProcess=PROCESS)
    app = {"name": "app", "image": IMAGE, "imagePullPolicy": "Never",
           "command": [f"/{PROCESS}", "/s/app.conf", "/tmp/hups"],
           "volumeMounts": [P.mount("s", "none", "/s")]}
    apply(P.pod("reload", "a", [app], [vol]))
    start = poll("reload app started", lambda: [x for x in app_lines("reload") if x[1] == "start"], 90, 0.25)[0]
    r.check("template entry rendered in a pod", start[3] == "user=r|password=r-v1|",
            f"app.conf = {start[3]!r} (newlines as |)")

    pod = kube.get("pod", "reload", P.NAMESPACE)
    uid = pod["metadata"]["uid"]
    pids = [p for p in kube.host_comm_pids(PROCESS) if uid in open(f"/proc/{p}/cgroup").read()]
    exe = os.path.basename(os.readlink(f"/proc/{pids[0]}/exe")) if pids else "?"
    r.log(f"the app runs as pid {pids} on the host, comm {PROCESS!r}, executable {exe}")

    before = [x for x in app_lines("reload") if x[1] == "hup"]
    t = now()
    bao.kv_put("a/reload", user="r", password="r-v2")
    try:
        hup = poll("SIGHUP after the rotation", lambda: [x for x in app_lines("reload") if x[1] == "hup"],
                   2 * TTL + 10, 0.25)[0]
    except kube.Timeout:
        hup = None
    if hup:  # at most one signal per change: nothing more within the next TTL
        time.sleep(max(0.0, hup[0] + TTL + 1 - now()))
    hups = [x for x in app_lines("reload") if x[1] == "hup"]
    counter = ""
    if pids:
        try:
            with open(f"/proc/{pids[0]}/root/tmp/hups") as f:
                counter = f.read().strip()
        except OSError:
            counter = "(none)"
    ok = (hup is not None and not before and len(pids) == 1 and hup[3] == "user=r|password=r-v2|"
          and hup[0] - t <= TTL + 2 and len(hups) == 1 and counter == "1")
    if hup:
        r.figure("reload signal: rotation to SIGHUP in the app", f"{hup[0] - t:.2f}s")
    r.check("reload signal: the app process named in reloadProcess gets SIGHUP after a rotation", ok,
            (f"SIGHUP {hup[0] - t:.2f}s after the rotation (cacheTTL {TTL}s), app.conf then = {hup[3]!r}; "
             f"counter file {counter} {TTL + 1}s later; signals before the rotation: {len(before)}")
            if hup else f"no SIGHUP within {2 * TTL + 10}s; app log: {kube.logs(P.NAMESPACE, 'reload', 'app')[-300:]!r}")
    kube.delete_pods(P.NAMESPACE, "reload")


def helm_read(r):
    t = now()
    apply(P.simple_reader_pod("helm-app", "a", "a", [P.secret("password", "secret/a/db", "password")]))
    first = wait_read("helm-app", "/s/password", timeout=90)
    r.check("Helm chart install: publish and read from a pod", True,
            f"{first.text} read {first.t1 - t:.2f}s after kubectl apply")
