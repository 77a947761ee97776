#!/usr/bin/env python3
"""The checks of vaultfs's real-cluster tier, run by tests/k8s/run.sh on the k8s-lab cluster it
started (kubectl on PATH, KUBECONFIG set, the vaultfs image imported).

Phases, each on a fresh install of its manifests through a generated overlay (overlay.py):
  deploy/base            publish and read, rotation, unpublish revokes the token, isolation,
                         a pod started while Vault is down, keeper replacement and three plugin
                         restarts under reading pods (each followed by a new pod), uninstall;
  deploy/reload-signals  a template entry and a reload signal, uninstall;
  Helm chart             rendered by scripts/helm-offline.py with shareIdentities: one publish
                         and read, pods of one service account sharing one login, a pki
                         certificate issued once and kept across a plugin pod deletion,
                         uninstall.
Prints PASS/FAIL lines and the measured figures; writes "PASSED FAILED" to K8S_E2E_RESULTS.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checks_basic  # noqa: E402
import checks_pki  # noqa: E402
import checks_reload  # noqa: E402
import checks_restart  # noqa: E402
import checks_shared  # noqa: E402
import pods as P  # noqa: E402
from harness import IMAGE, ROOT, WORK, Abort, Report, install, overlay, uninstall  # noqa: E402
from kube import apply, kubectl, now  # noqa: E402
from openbao import OpenBao, configure  # noqa: E402

STATE = os.environ.get("K8S_LAB_STATE", "/var/tmp/k8s-lab")


def prepare(r):
    """OpenBao with the kubernetes auth method against this cluster, the app namespace and its
    service accounts (a, b), and Vault's token reviewer (system:auth-delegator)."""
    t = now()
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": P.NAMESPACE}},
          *[{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n, "namespace": P.NAMESPACE},
             "automountServiceAccountToken": False} for n in ("a", "b", "vault-reviewer")],
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": "vaultfs-e2e-tokenreview"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
           "subjects": [{"kind": "ServiceAccount", "name": "vault-reviewer", "namespace": P.NAMESPACE}]})
    reviewer = kubectl("create", "token", "vault-reviewer", "-n", P.NAMESPACE, "--duration=6h").strip()
    r.log(f"app namespace, service accounts and the reviewer's token: {now() - t:.1f}s")
    bao = OpenBao(os.environ["K8S_E2E_BAO"], WORK)
    bao.start()
    r.log(f"OpenBao listening: {now() - t:.1f}s")
    bao.initialize()
    r.log(f"OpenBao initialized and unsealed: {now() - t:.1f}s")
    with open(os.path.join(STATE, "pki", "ca.crt")) as f:
        ca = f.read()
    configure(bao, "https://127.0.0.1:6443", ca, reviewer, P.NAMESPACE, {"a": ("a", ["a"]), "b": ("b", ["b"])})
    bao.kv_put("a/db", user="alice", password="a-v1")
    bao.kv_put("b/db", user="bob", password="b-v1")
    bao.kv_put("a/outage", password="o-v1")
    bao.kv_put("a/reload", user="r", password="r-v1")
    r.log(f"OpenBao {bao.addr} (raft storage, audit log) with kubernetes auth, roles a and b, {now() - t:.1f}s")
    return bao


def phase_base(r, bao):
    ov = overlay(os.path.join(ROOT, "deploy", "base"), "base", bao.addr)
    try:
        install(r, ov, "deploy/base")
        r.guard("publish, rotation, revoke", checks_basic.publish_rotate_revoke, r, bao)
        r.guard("isolation", checks_basic.isolation, r, bao)
        r.guard("pod started while Vault is down", checks_basic.vault_down, r, bao)
        if bao.health() != 200:  # the outage check failed half-way
            bao.start()
        if r.guard("reader pods", checks_restart.start_readers, r):
            r.guard("keeper pod deletion", checks_restart.keeper_replaced, r)
            r.guard("restart (a) plugin pod deletion", checks_restart.pod_deleted, r)
            r.guard("restart (b) kill -9", checks_restart.killed, r)
            r.guard("restart (c) rollout", checks_restart.rollout, r, bao)
    finally:
        uninstall(r, ov, "deploy/base")


def phase_reload(r, bao):
    ov = overlay(os.path.join(ROOT, "deploy", "reload-signals"), "reload-signals", bao.addr)
    try:
        install(r, ov, "deploy/reload-signals")
        r.guard("reload signal", checks_reload.reload_signal, r, bao)
    finally:
        uninstall(r, ov, "deploy/reload-signals")


def phase_helm(r, bao):
    python = os.environ.get("K8S_E2E_HELM_PYTHON", "")
    if not python or subprocess.run([python, "-c", "import helm_sdkpy"], capture_output=True).returncode != 0:
        r.check("Helm chart phase: a Python with helm_sdkpy (scripts/install-deps.sh installs it)", False,
                f"K8S_E2E_HELM_PYTHON={python!r} cannot import helm_sdkpy")
        return
    repo, _, tag = IMAGE.rpartition(":")
    values = {"image": {"repository": repo, "tag": tag}, "vault": {"addr": bao.addr}, "namespace": {"create": True},
              "shareIdentities": True}
    out = subprocess.run([python, os.path.join(ROOT, "scripts", "helm-offline.py"), "render",
                          os.path.join(ROOT, "deploy", "helm", "vaultfs"), json.dumps(values)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        r.check("Helm chart renders", False, out.stderr[-500:])
        return
    render = os.path.join(WORK, "helm-render.yaml")
    with open(render, "w") as f:
        f.write(out.stdout)
    ov = overlay(render, "helm", None, "--namespace", "vaultfs")
    try:
        install(r, ov, "Helm chart")
        r.guard("Helm chart install: publish and read from a pod", checks_reload.helm_read, r)
        r.guard("shared identity", checks_shared.shared_identity, r, bao)
        r.guard("certificate", checks_pki.certificate, r, bao)
    finally:
        uninstall(r, ov, "Helm chart")


def main():
    r = Report()
    bao = None
    try:
        bao = prepare(r)
        for name, phase in (("deploy/base", phase_base), ("deploy/reload-signals", phase_reload),
                            ("Helm chart", phase_helm)):
            t = now()
            r.log(f"== {name}")
            try:
                phase(r, bao)
            except Abort:
                r.log(f"{name}: phase aborted")
            except Exception as e:  # noqa: BLE001 - reported, then the next phase
                r.check(f"{name} phase", False, f"{type(e).__name__}: {e}")
            r.log(f"== {name} done in {now() - t:.1f}s")
    except Exception as e:  # noqa: BLE001
        r.check("set-up", False, f"{type(e).__name__}: {e}")
    finally:
        if bao:
            bao.stop()
    print("\nMeasured:")
    for name, value in r.figures:
        print(f"  {name}: {value}")
    print(f"checks took {now() - r.t0:.1f}s")
    with open(os.environ["K8S_E2E_RESULTS"], "w") as f:
        f.write(f"{r.passed} {r.failed}\n")


if __name__ == "__main__":
    main()
