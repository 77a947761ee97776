"""Restart checks: reader pods of every mount kind read every 100 ms through a keeper pod
replacement and three plugin restarts (pod deletion, kill -9 of the process, image rollout);
after each, a brand-new pod must get its volume published and read its secret."""

import os
import re
import signal

import kube
import pods as P
from harness import (IMAGE2, KEEPER, METRICS, NEW_POD_TIMEOUT, PLUGIN, PLUGIN_NS, failed_mount, plugin_pod,
                     ready_pod, reads, wait_read)
from kube import apply, kubectl, now, poll

KINDS = {"h2c": "/h2c/password", "none": "/none/password", "subpath": "/sub/password"}
MODES = ("strict", "cached")
READERS = [(f"readers-{m}", k) for m in MODES for k in KINDS]


def start_readers(r):
    t = now()
    for mode in MODES:
        vol = P.volume("s", "a", [P.secret("password", "secret/a/db", "password")], consistency=mode, cacheTTL="5s")
        # The volume at /h2c and /none; its file `password` alone at /sub/password.
        containers = [P.reader(k, [path], [P.mount("s", k, path if k == "subpath" else os.path.dirname(path))])
                      for k, path in KINDS.items()]
        apply(P.pod(f"readers-{mode}", "a", containers, [vol]))
    for pod, c in READERS:
        wait_read(pod, KINDS[c], timeout=90, container=c)
    r.log(f"6 readers (strict and cached volumes x HostToContainer, None, subPath) reading, {now() - t:.1f}s")
    return True


def readers_check(r, label, t0):
    """Waits until every reader has read again after the restart; then judges [t0, now]."""
    t_resumed = now()
    poll("every reader reading again",
         lambda: all(P.first(reads(p, c), after=t_resumed) for p, c in READERS), 60, 0.25)
    t1 = now()
    total, fails, worst, where = 0, [], 0.0, ""
    for pod, c in READERS:
        inside, f, gap, _ = P.window(reads(pod, c), t0, t1)
        total += len(inside)
        fails += [(pod, c, x) for x in f]
        if gap > worst:
            worst, where = gap, f"{pod.split('-')[1]}/{c}"
    r.figure(f"{label}: failed reads", f"{len(fails)} of {total}")
    r.figure(f"{label}: longest pause between successful reads", f"{worst:.2f}s ({where})")
    detail = f"{len(fails)} failed of {total} reads by 6 readers; longest pause {worst:.2f}s ({where})"
    if fails:
        pod, c, x = fails[0]
        detail += f"; first failure {pod}/{c}: {x.text!r}"
    return r.check(f"{label}: no reader's read failed", not fails, detail)


def new_pod_check(r, label, slug):
    """A brand-new pod after the restart: published, and its first read."""
    name = f"new-{slug}"
    t = now()
    apply(P.simple_reader_pod(name, "a", "a", [P.secret("password", "secret/a/db", "password")]))
    try:
        first = wait_read(name, "/s/password", timeout=NEW_POD_TIMEOUT)
        r.figure(f"{label}: new pod, kubectl apply to first read", f"{first.t1 - t:.2f}s")
        r.check(f"{label}: a new pod gets its volume and reads its secret", True,
                f"first read {first.t1 - t:.2f}s after kubectl apply")
    except kube.Timeout:
        r.figure(f"{label}: new pod, kubectl apply to first read", f"none within {NEW_POD_TIMEOUT}s")
        r.check(f"{label}: a new pod gets its volume and reads its secret", False,
                f"no read within {NEW_POD_TIMEOUT}s; FailedMount: {failed_mount(name)[-300:] or 'none'}")
    kube.delete_pods(P.NAMESPACE, name)


def plugin_pid():
    pids = kube.host_processes("vaultfs", "csi")
    return pids[0] if len(pids) == 1 else None


def wait_plugin(label, t0, old_pid, old_uid=None, old_restarts=None):
    """Until a new `vaultfs csi` process runs in a Ready plugin pod (a new pod unless
    old_restarts is given: then the same pod with its container restarted)."""
    def serving():
        pid = plugin_pid()
        pod = ready_pod(PLUGIN, exclude_uid=old_uid)
        if not pid or pid == old_pid or not pod:
            return None
        if old_restarts is not None and kube.restarts(pod, "vaultfs") <= old_restarts:
            return None
        return pod
    pod = poll(f"{label}: a new plugin process in a Ready pod", serving, 120, 0.2)
    return pod, now() - t0


def metrics():
    status, text = kube.http_get(f"{METRICS}/metrics")
    out = {}
    for line in text.splitlines() if status == 200 else []:
        m = re.match(r"^(vaultfs_[a-z_]+?)(?:_total)?(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
    return out


def held(keeper_pod):
    """Names of the FUSE connections a keeper pod has logged holding."""
    log = kube.logs(PLUGIN_NS, keeper_pod["metadata"]["name"])
    return {n for line in log.splitlines() if "holding a connection" in line
            for n in re.findall(r'"name":"([^"]+)"', line)}


def keeper_replaced(r):
    label = "keeper pod deletion"
    old = ready_pod(KEEPER)
    names = held(old)
    if not names:
        raise RuntimeError(f"keeper {old['metadata']['name']} logged no connection it holds")
    t0 = now()
    kubectl("delete", "pod", "-n", PLUGIN_NS, old["metadata"]["name"], "--wait=false")
    new = poll("a new keeper pod Ready", lambda: ready_pod(KEEPER, exclude_uid=old["metadata"]["uid"]), 90, 0.2)
    poll("the new keeper holds the plugin's connections", lambda: held(new) >= names, 30, 0.25)
    r.log(f"{label}: new keeper Ready and holding {sorted(names)} {now() - t0:.1f}s after the deletion")
    readers_check(r, label, t0)
    new_pod_check(r, label, "after-keeper")


def pod_deleted(r):
    label = "restart (a) plugin pod deletion"
    old, pid, t0 = poll("one plugin pod", plugin_pod, 60), plugin_pid(), now()
    kubectl("delete", "pod", "-n", PLUGIN_NS, old["metadata"]["name"], "--wait=false")
    _, took = wait_plugin(label, t0, pid, old_uid=old["metadata"]["uid"])
    r.log(f"{label}: new plugin pod Ready {took:.1f}s after the deletion")
    readers_check(r, label, t0)
    new_pod_check(r, label, "after-delete")


def killed(r):
    label = "restart (b) kill -9 of the plugin process"
    pod, pid = poll("one plugin pod", plugin_pod, 60), plugin_pid()
    if not pid:
        return r.check(label, False, f"not exactly one `vaultfs csi` process: {kube.host_processes('vaultfs', 'csi')}")
    before = kube.restarts(pod, "vaultfs")
    t0 = now()
    os.kill(pid, signal.SIGKILL)
    pod, took = wait_plugin(label, t0, pid, old_uid=None, old_restarts=before)
    r.log(f"{label}: pid {pid} killed; container restarted (restartCount {before} -> "
          f"{kube.restarts(pod, 'vaultfs')}), Ready {took:.1f}s after the kill")
    readers_check(r, label, t0)
    new_pod_check(r, label, "after-kill")


def rollout(r, bao):
    label = "restart (c) rollout to a new image"
    old, pid = poll("one plugin pod", plugin_pod, 60), plugin_pid()
    audit_at, t0 = bao.audit_size(), now()
    kubectl("set", "image", "-n", PLUGIN_NS, "ds/vaultfs-node", f"vaultfs={IMAGE2}")
    kubectl("rollout", "status", "-n", PLUGIN_NS, "ds/vaultfs-node", "--timeout=120s", timeout=150)
    pod, took = wait_plugin(label, t0, pid, old_uid=old["metadata"]["uid"])
    image = next(c["image"] for c in pod["spec"]["containers"] if c["name"] == "vaultfs")
    r.log(f"{label}: rolled out to {image}, new pod Ready {took:.1f}s after kubectl set image")
    readers_check(r, label, t0)
    logins = [p for p in bao.audit_requests(audit_at) if p.startswith("auth/kubernetes/login")]
    m = metrics()
    r.figure(f"{label}: Vault logins during the rollout", f"{len(logins)} (audit log)")
    r.check(f"{label}: no Vault login (the successor takes the tokens over)", image == IMAGE2 and not logins,
            f"{len(logins)} logins in OpenBao's audit log; successor metrics: logins "
            f"{m.get('vaultfs_vault_logins', 0):.0f}, tokens taken over {m.get('vaultfs_vault_tokens_taken_over', 0):.0f}, "
            f"takeovers {m.get('vaultfs_takeovers', 0):.0f}")
    new_pod_check(r, label, "after-rollout")
