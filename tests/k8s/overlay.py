#!/usr/bin/env python3
"""Writes a kustomize overlay that runs vaultfs's manifests on the k8s-lab single-node cluster.

  overlay.py BASE OUT --image IMAGE [--vault-addr URL] [--namespace NS]

BASE is a kustomization directory (deploy/base, deploy/reload-signals) or a YAML file of
rendered manifests (the Helm chart's render). The manifests are read as they are at run time
and only the changes the lab forces are made, each one a JSON patch op on the exact field
(guarded by a `test` op where a value is replaced), so everything else in BASE (volumes,
mounts, flags, env, security settings) is applied unchanged. The result is checked by rendering
the overlay again. Needs `kubectl` (for `kubectl kustomize` and reading YAML as JSON offline).

The changes the lab forces (k8s-lab README, "Rules for workloads"):
  1. `hostNetwork: true` on every pod template: there is no pod network (the CNI plugin refuses
     every pod sandbox that needs one), so the plugin and the keeper run in the host's network.
  2. `dnsPolicy: Default` on every pod template: there is no cluster DNS.
  3. `imagePullPolicy: Never` on every container: nothing can be pulled; images are imported
     into containerd beforehand.
  4. Images: the vaultfs image built for this run, and the sidecars the lab ships
     (`localhost/csi-node-driver-registrar:lab`, `localhost/livenessprobe:lab`, the same
     upstream versions as deploy/base names).
  5. VAULT_ADDR: the OpenBao server of the run (on 127.0.0.1), through the documented
     `vaultfs-config` configMapGenerator merge (or the ConfigMap's value in a rendered file).
  6. Loopback only: in the host's network a listener on all addresses would also listen on the
     node's address, which nothing may use, so every `--FLAG=HOST:PORT` bind address with an
     empty or wildcard host (the plugin's `--metrics-addr`, the registrar's `--http-endpoint`)
     gets host 127.0.0.1, the livenessprobe's `--health-port=P` (all addresses) becomes its
     `--http-endpoint=127.0.0.1:P` (v2.15 takes one or the other), and every httpGet/tcpSocket
     probe gets `host: 127.0.0.1` (kubelet would otherwise probe the pod IP, which with
     hostNetwork is the node's address).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REGISTRAR_IMAGE = "localhost/csi-node-driver-registrar:lab"
LIVENESSPROBE_IMAGE = "localhost/livenessprobe:lab"
LOOPBACK = "127.0.0.1"
# --FLAG=HOST:PORT with an empty or wildcard host (all addresses).
WILDCARD_BIND = re.compile(r"^(--[A-Za-z0-9-]+)=(|0\.0\.0\.0|\[::\]|::):(\d+)$")
HEALTH_PORT = re.compile(r"^--health-port=(\d+)$")


def kubectl(*args, stdin=None):
    out = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"overlay.py: kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def objects(yaml_text):
    """The objects of a multi-document YAML text, as JSON (read offline by kubectl)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(yaml_text)
        f.flush()
        # A no-op (removing an annotation nobody sets) only to have kubectl print JSON.
        text = kubectl("annotate", "--local", "-f", f.name, "-o", "json", "vaultfs-k8s-e2e-")
    decoder, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.extend(obj.get("items", [obj]) if obj.get("kind") == "List" else [obj])


def image_for(image, vaultfs_image):
    """Forced change 4: the local image standing in for `image`."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    if name == "csi-node-driver-registrar":
        return REGISTRAR_IMAGE
    if name == "livenessprobe":
        return LIVENESSPROBE_IMAGE
    if name == "vaultfs":
        return vaultfs_image
    sys.exit(f"overlay.py: no local image for {image!r}; the lab cannot pull it")


def loopback_arg(arg):
    """Forced change 6 for one argument: the loopback form of a bind address, or None."""
    m = WILDCARD_BIND.match(arg)
    if m:
        return f"{m.group(1)}={LOOPBACK}:{m.group(3)}"
    m = HEALTH_PORT.match(arg)
    if m:
        return f"--http-endpoint={LOOPBACK}:{m.group(1)}"
    return None


def pod_template_ops(spec, vaultfs_image):
    """JSON patch ops for one pod template's spec (at /spec/template/spec)."""
    base = "/spec/template/spec"
    ops = [
        {"op": "add", "path": f"{base}/hostNetwork", "value": True},  # forced change 1
        {"op": "add", "path": f"{base}/dnsPolicy", "value": "Default"},  # forced change 2
    ]
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            p = f"{base}/{kind}/{i}"
            ops += [
                {"op": "test", "path": f"{p}/name", "value": c["name"]},
                {"op": "test", "path": f"{p}/image", "value": c["image"]},
                {"op": "replace", "path": f"{p}/image", "value": image_for(c["image"], vaultfs_image)},
                {"op": "add", "path": f"{p}/imagePullPolicy", "value": "Never"},  # forced change 3
            ]
            for field in ("command", "args"):
                for j, arg in enumerate(c.get(field) or []):
                    new = loopback_arg(arg)
                    if new is not None:
                        ops += [
                            {"op": "test", "path": f"{p}/{field}/{j}", "value": arg},
                            {"op": "replace", "path": f"{p}/{field}/{j}", "value": new},
                        ]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                for handler in ("httpGet", "tcpSocket"):
                    if handler in (c.get(probe) or {}):
                        ops.append({"op": "add", "path": f"{p}/{probe}/{handler}/host", "value": LOOPBACK})
    return ops


def target(obj):
    t = {"group": obj["apiVersion"].rpartition("/")[0], "version": obj["apiVersion"].rpartition("/")[2],
         "kind": obj["kind"], "name": obj["metadata"]["name"]}
    if t["group"] == "":
        del t["group"]
    return t


def write(out, base_ref, patches, cm_merge, comments, namespace):
    lines = ["# Generated by tests/k8s/overlay.py: vaultfs's manifests with only the changes the",
             "# k8s-lab cluster forces (see that file's docstring).", *[f"# {c}" for c in comments],
             "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             f"resources: [{json.dumps(base_ref)}]"]
    if namespace:
        lines += ["# Not a lab change: the namespace `helm install -n` puts a render's objects in.",
                  f"namespace: {json.dumps(namespace)}"]
    if cm_merge:
        lines += ["configMapGenerator:", f"  - {json.dumps(cm_merge)}"]
    lines.append("patches:")
    for t, ops, why in patches:
        lines += [f"  # {why}", f"  - target: {json.dumps(t)}", "    patch: |-", "      ["]
        lines += [f"        {json.dumps(op)}," for op in ops[:-1]] + [f"        {json.dumps(ops[-1])}", "      ]"]
    with open(os.path.join(out, "kustomization.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def verify(out, vaultfs_image, vault_addr):
    """Renders the overlay and checks that every forced change is in it."""
    problems = []
    for obj in objects(kubectl("kustomize", out)):
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "ConfigMap" and vault_addr and "VAULT_ADDR" in obj.get("data", {}):
            if obj["data"]["VAULT_ADDR"] != vault_addr:
                problems.append(f"{name}: VAULT_ADDR {obj['data']['VAULT_ADDR']}")
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        if spec.get("hostNetwork") is not True or spec.get("dnsPolicy") != "Default":
            problems.append(f"{kind}/{name}: hostNetwork/dnsPolicy")
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c.get("imagePullPolicy") != "Never" or not c["image"].startswith("localhost/"):
                problems.append(f"{name}/{c['name']}: image {c['image']} {c.get('imagePullPolicy')}")
            for arg in c.get("command", []) + c.get("args", []):
                if loopback_arg(arg) is not None:
                    problems.append(f"{name}/{c['name']}: arg {arg}")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                for h in (c.get(probe) or {}).values():
                    if isinstance(h, dict) and "port" in h and h.get("host") != LOOPBACK:
                        problems.append(f"{name}/{c['name']}: {probe} host {h.get('host')}")
    if problems:
        sys.exit("overlay.py: the overlay misses forced changes: " + "; ".join(problems))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--image", required=True)
    ap.add_argument("--vault-addr")
    ap.add_argument("--namespace", help="for a rendered file: the release namespace (as helm install -n)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if os.path.isdir(a.base):
        base_ref = os.path.relpath(os.path.abspath(a.base), os.path.abspath(a.out))
        rendered = kubectl("kustomize", a.base)
    else:
        base_ref = "base.yaml"
        shutil.copyfile(a.base, os.path.join(a.out, base_ref))
        with open(a.base) as f:
            rendered = f.read()
    patches, cm_merge = [], None
    for obj in objects(rendered):
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if spec:
            patches.append((target(obj), pod_template_ops(spec, a.image),
                            f"{obj['kind']} {obj['metadata']['name']}: changes 1, 2, 3, 4 and 6"))
        if obj["kind"] == "ConfigMap" and "VAULT_ADDR" in obj.get("data", {}) and a.vault_addr:
            if os.path.isdir(a.base):  # forced change 5, the documented way
                cm_merge = {"name": "vaultfs-config", "behavior": "merge",
                            "literals": [f"VAULT_ADDR={a.vault_addr}"]}
            else:
                ops = [{"op": "replace", "path": "/data/VAULT_ADDR", "value": a.vault_addr}]
                patches.append((target(obj), ops, f"ConfigMap {obj['metadata']['name']}: change 5"))
    if not any(p[0]["kind"] != "ConfigMap" for p in patches):
        sys.exit(f"overlay.py: no pod template in {a.base}")
    write(a.out, base_ref, patches, cm_merge, [f"base: {a.base}", f"image: {a.image}"], a.namespace)
    verify(a.out, a.image, a.vault_addr)


if __name__ == "__main__":
    main()
