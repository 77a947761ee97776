#!/usr/bin/env python3
"""Helm without a cluster, through the Helm library of PyPI `helm-sdkpy` (no Helm binary is
needed; scripts/install-deps.sh installs it into the project's .venv).

  helm-offline.py lint   CHART [VALUES_JSON]   `helm lint`; exits 1 on any warning or error
  helm-offline.py render CHART [VALUES_JSON]   prints the rendered manifests (`helm template`)

VALUES_JSON overrides the chart's values (deep-merged, as `--set`/`-f` would).

helm-sdkpy has no client-only render, so `render` runs Helm's real install action against a
stand-in API server served here on 127.0.0.1: it answers discovery for the kinds the chart
uses, 404 for every object lookup (nothing is installed yet) and echoes the objects Helm
creates, then prints the manifest of the release Helm recorded. Nothing leaves the machine.
Its `lint` reports messages without their text (helm-sdkpy serialises Go errors as `{}`):
on a lint failure the render is attempted too, which prints Helm's own error.
"""

import asyncio
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Helm keeps a cache, a config and a data directory under $HOME by default: give it throw-away
# ones, so that nothing is written outside the project and temporary files. Helm's Go library
# reads the environment the process started with, so this runs itself again with them set, and
# removes them afterwards.
if "VAULTFS_HELM_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="vaultfs-helm-")
    _env = dict(os.environ, VAULTFS_HELM_HOME=_home)
    for _name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        _env[_name] = os.path.join(_home, _name.split("_")[1].lower())
    try:
        _rc = subprocess.call([sys.executable] + sys.argv, env=_env)
    finally:
        shutil.rmtree(_home, ignore_errors=True)
    sys.exit(_rc)

try:
    import helm_sdkpy
except ImportError as e:  # pragma: no cover - reported to the test
    sys.exit(
        f"helm-offline.py: cannot import helm_sdkpy ({e}) with {sys.executable}: run "
        "scripts/install-deps.sh, or `pip install --ignore-requires-python helm-sdkpy`"
    )

NAMESPACE = "vaultfs"
RELEASE = "vaultfs"

# group -> (version, [(resource, kind, namespaced)])
API = {
    "": ("v1", [
        ("namespaces", "Namespace", False),
        ("configmaps", "ConfigMap", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("secrets", "Secret", True),
    ]),
    "apps": ("v1", [("daemonsets", "DaemonSet", True)]),
    "storage.k8s.io": ("v1", [("csidrivers", "CSIDriver", False)]),
    "networking.k8s.io": ("v1", [("networkpolicies", "NetworkPolicy", True)]),
    "monitoring.coreos.com": ("v1", [
        ("podmonitors", "PodMonitor", True),
        ("servicemonitors", "ServiceMonitor", True),
    ]),
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def resource_list(group):
    version, resources = API[group]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [
            {"name": n, "singularName": "", "namespaced": ns, "kind": k, "verbs": VERBS}
            for n, k, ns in resources
        ],
    }


class StandIn(BaseHTTPRequestHandler):
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                                    "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [
                                        {"clientCIDR": "0.0.0.0/0",
                                         "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups = [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                for g, (v, _) in API.items() if g
            ]
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                    "groups": groups})
        if path == "/api/v1":
            return self.reply(200, resource_list(""))
        for g, (v, _) in API.items():
            if g and path == f"/apis/{g}/{v}":
                return self.reply(200, resource_list(g))
        if self.command in ("POST", "PUT") and body:
            # Echo the object in the encoding it came in (client-go sends protobuf for
            # built-in kinds).
            self.send_response(201 if self.command == "POST" else 200)
            self.send_header("Content-Type",
                             self.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if self.command == "GET" and "labelSelector=" in self.path:
            return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {},
                                    "items": []})
        return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not found"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


def render(chart, values):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    # helm-sdkpy takes a kubeconfig's content only as YAML (JSON is taken for a file name).
    import yaml  # noqa: PLC0415 - PyYAML, installed by scripts/install-deps.sh
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin",
                      "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "standin", "user": {"token": "none"}}],
        "contexts": [{"name": "standin",
                      "context": {"cluster": "standin", "user": "standin",
                                  "namespace": NAMESPACE}}],
    })
    try:
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
        release = asyncio.run(helm_sdkpy.Install(config).run(
            RELEASE, chart, values=values or None, wait=False, timeout=60))
    finally:
        server.shutdown()
    return release["manifest"]


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(chart, values):
    with tempfile.TemporaryDirectory() as tmp:
        if values:
            # Lint reads the chart's own values.yaml: lint a copy whose values carry the
            # overrides (JSON is YAML).
            import yaml  # noqa: PLC0415 - PyYAML, installed by scripts/install-deps.sh
            copy_dir = os.path.join(tmp, os.path.basename(os.path.normpath(chart)))
            shutil.copytree(chart, copy_dir)
            with open(os.path.join(copy_dir, "values.yaml"), encoding="utf-8") as f:
                defaults = yaml.safe_load(f) or {}
            with open(os.path.join(copy_dir, "values.yaml"), "w", encoding="utf-8") as f:
                json.dump(merge(defaults, values), f)
            chart = copy_dir
        config = helm_sdkpy.Configuration(namespace=NAMESPACE)
        result = asyncio.run(helm_sdkpy.Lint(config).run(chart))
    names = {1: "INFO", 2: "WARNING", 3: "ERROR"}
    bad = False
    for m in result.get("Messages") or []:
        severity = m.get("Severity", 0)
        print(f"[{names.get(severity, severity)}] {m.get('Path')}: {m.get('Err')}")
        bad |= severity >= 2
    bad |= bool(result.get("Errors"))
    print(f"{result.get('TotalChartsLinted', 0)} chart(s) linted, "
          f"{'failed' if bad else 'no warnings or errors'}")
    return not bad and result.get("TotalChartsLinted") == 1


def main():
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("lint", "render"):
        sys.exit(__doc__)
    chart = sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
    if sys.argv[1] == "render":
        sys.stdout.write(render(chart, values))
        return
    if not lint(chart, values):
        try:
            render(chart, values)
        except helm_sdkpy.HelmError as e:
            print(f"helm: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
