"""What the checks of the vaultfs k8s tier share: the run's settings (from run.sh's
environment), PASS/FAIL accounting with timings, installing and uninstalling vaultfs through a
generated overlay, and waiting for pods' reads."""

import json
import os
import subprocess
import sys

import kube
import pods as P
from kube import kubectl, now, poll

ROOT = os.environ["VAULTFS_ROOT"]
WORK = os.environ["K8S_E2E_WORK"]
IMAGE = os.environ["K8S_E2E_IMAGE"]
IMAGE2 = os.environ["K8S_E2E_IMAGE2"]
PLUGIN_NS = "vaultfs"
PLUGIN = "app.kubernetes.io/component=csi-node-plugin"
KEEPER = "app.kubernetes.io/component=keeper"
METRICS = "http://127.0.0.1:9810"  # the plugin's --metrics-addr in the overlay
NEW_POD_TIMEOUT = 20  # a new pod after a restart must read its secret within this


class Abort(Exception):
    """The rest of a phase cannot run (e.g. the install failed)."""


class Report:
    def __init__(self):
        self.passed = self.failed = 0
        self.t0 = now()
        self.figures = []

    def log(self, msg):
        print(f"[{now() - self.t0:6.1f}s] {msg}", flush=True)

    def check(self, name, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}: {name}{' -- ' + detail if detail else ''}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok

    def figure(self, name, value):
        self.figures.append((name, value))

    def guard(self, name, fn, *args):
        """Runs a check function; an exception in it is that check's FAIL."""
        self.log(f"-> {name}")
        try:
            return fn(*args)
        except Abort:
            raise
        except Exception as e:  # noqa: BLE001 - reported as the check's failure
            self.check(name, False, f"{type(e).__name__}: {e}")
            return None


def overlay(base, name, vault_addr, *more):
    out = os.path.join(WORK, f"overlay-{name}")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "overlay.py"), base, out,
                    "--image", IMAGE, *more] + (["--vault-addr", vault_addr] if vault_addr else []), check=True)
    return out


def plugin_pod():
    pods = kube.live_pods(PLUGIN_NS, PLUGIN)
    return pods[0] if len(pods) == 1 else None


def ready_pod(selector, exclude_uid=None):
    pods = [p for p in kube.live_pods(PLUGIN_NS, selector)
            if p["metadata"]["uid"] != exclude_uid and kube.is_ready(p)]
    return pods[0] if pods else None


def driver_registered():
    node = kube.get("csinode", "lab-node") or {}
    return any(d["name"] == P.DRIVER for d in node.get("spec", {}).get("drivers") or [])


def install(r, overlay_dir, what):
    """kubectl apply -k, through a render kept beside the overlay: the uninstall deletes exactly
    what was installed, whatever happens to the tree's manifests meanwhile."""
    t = now()
    installed = os.path.join(overlay_dir, "installed.yaml")
    with open(installed, "w") as f:
        f.write(kubectl("kustomize", overlay_dir))
    kubectl("apply", "-f", installed)
    try:
        poll("plugin pod Ready", lambda: ready_pod(PLUGIN), 120, 0.5)
        poll("keeper pod Ready", lambda: ready_pod(KEEPER), 60, 0.5)
        poll("driver registered in CSINode lab-node", driver_registered, 60, 0.5)
    except kube.Timeout as e:
        pod = plugin_pod() or {}
        r.check(f"install {what}", False, f"{e}; plugin status: {json.dumps(pod.get('status', {}))[:1500]}")
        raise Abort() from e
    r.check(f"install {what}", True, f"plugin and keeper Ready, driver registered {now() - t:.1f}s after kubectl apply -k")
    # Forced change 6 of overlay.py at work: in the host's network, nothing listens beyond loopback.
    listeners = kube.host_listeners("vaultfs", "csi-node-driver", "livenessprobe")
    outside = [f"{a} ({n})" for a, n in listeners if not a.startswith("127.0.0.1:")]
    r.check(f"install {what}: the plugin pod listens on 127.0.0.1 only", listeners and not outside,
            f"outside loopback: {outside}" if outside else ", ".join(f"{n} {a}" for a, n in sorted(listeners)))


def leftovers(mounts=True):
    """What of vaultfs is still on the node: fuse.vaultfs mounts, vaultfs processes, pods."""
    left = {"processes": kube.host_processes("vaultfs"),
            "pods": [p["metadata"]["name"] for p in kube.get("pods", ns=PLUGIN_NS) or []]}
    if mounts:
        left["mounts"] = kube.host_mounts("fuse.vaultfs")
    return left


def state(path):
    try:
        os.stat(path)
        return "answering"
    except OSError as e:
        return e.strerror


def uninstall(r, overlay_dir, what):
    """Deletes the app pods (docs/kubernetes.md: first), then everything install() applied, and
    checks that nothing of vaultfs is left on the node."""
    t = now()
    kubectl("delete", "pods", "--all", "-n", P.NAMESPACE, "--wait=true", "--timeout=90s", timeout=120)
    kubectl("delete", "-f", os.path.join(overlay_dir, "installed.yaml"), "--ignore-not-found", "--wait=true",
            "--timeout=120s", timeout=150)
    try:  # processes and pods go first; mounts get a few seconds more (no daemon would remove them later)
        poll("no vaultfs process or pod left", lambda: not any(leftovers(mounts=False).values()), 60, 0.5)
        poll("no fuse.vaultfs mount left", lambda: not leftovers()["mounts"], 5, 0.5)
    except kube.Timeout:
        pass
    left = leftovers()
    took = f"{now() - t:.1f}s after deleting the app pods, then what the overlay installed"
    r.check(f"uninstall {what}: no fuse.vaultfs mount left on the host", not left["mounts"],
            "left: " + ", ".join(f"{m} ({state(m)})" for m in left["mounts"]) if left["mounts"] else took)
    r.check(f"uninstall {what}: no vaultfs process left on the host", not left["processes"],
            f"left: pids {left['processes']}" if left["processes"] else "")
    r.check(f"uninstall {what}: no pod left in namespace {PLUGIN_NS}", not left["pods"],
            f"left: {left['pods']}" if left["pods"] else "")


def reads(pod, container="reader"):
    return P.parse(kube.logs(P.NAMESPACE, pod, container))


def wait_read(pod, file, text=None, ok=True, after=0.0, timeout=60, container="reader"):
    """The first read of `file` by the pod's reader (OK, holding `text`) finished after `after`."""
    return poll(f"{pod}: {'a read' if ok else 'a failed read'} of {file}" + (f" holding {text!r}" if text else ""),
                lambda: P.first(reads(pod, container), ok=ok, text=text, after=after, file=file), timeout, 0.25)


def failed_mount(pod):
    msgs = [m for reason, m in kube.events(P.NAMESPACE, pod) if reason == "FailedMount"]
    return msgs[-1] if msgs else ""
