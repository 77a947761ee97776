"""An OpenBao server for the vaultfs k8s tier, on 127.0.0.1 only.

Not a dev server: its storage (raft, in the run's work directory) survives a stop, so the
outage check stops and starts the same server and every token, role and secret is still there
(the server is unsealed again with its one key share). A file audit device, declared in the
config file (OpenBao enables audit devices only that way), records every request. The server
runs with a HOME of its own and without the caller's VAULT_*/BAO_* variables; it is the only
process started here, and its pid is written to WORK/openbao.pid for the caller's clean-up.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from kube import Timeout, now, poll


def free_port_pair():
    """A port p with p and p+1 free on 127.0.0.1 (API and cluster listeners)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1")


class OpenBao:
    def __init__(self, binary, work):
        self.binary, self.dir = binary, os.path.join(work, "openbao")
        os.makedirs(os.path.join(self.dir, "raft"), exist_ok=True)
        self.port = free_port_pair()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.audit_log = os.path.join(self.dir, "audit.log")
        self.pid_file = os.path.join(work, "openbao.pid")
        self.proc = None
        self.token = self.unseal_key = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with open(os.path.join(self.dir, "config.hcl"), "w") as f:
            f.write(f"""storage "raft" {{
  path    = "{self.dir}/raft"
  node_id = "k8s-e2e"
  # The default (5) makes the first leader election of `sys/init` take ~9 s instead of ~2 s.
  performance_multiplier = 1
}}
listener "tcp" {{
  address     = "127.0.0.1:{self.port}"
  tls_disable = true
}}
api_addr     = "{self.addr}"
cluster_addr = "https://127.0.0.1:{self.port + 1}"
audit "file" "file" {{
  options {{
    file_path = "{self.audit_log}"
  }}
}}
""")

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VAULT_", "BAO_")) and k.lower() not in ("http_proxy", "https_proxy")}
        env["HOME"] = self.dir
        log = open(os.path.join(self.dir, "server.log"), "ab")
        self.proc = subprocess.Popen([self.binary, "server", f"-config={self.dir}/config.hcl"], env=env,
                                     cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        with open(self.pid_file, "w") as f:
            f.write(f"{self.proc.pid}\n")
        # Any answer means it listens: 501 (not initialized), 503 (sealed) or 200.
        poll("OpenBao listening", lambda: self.proc.poll() is None and self.health() != 0
             or self._exited(), 30, 0.05)
        if self.unseal_key:
            self.unseal()

    def _exited(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited ({self.proc.returncode}); see {self.dir}/server.log")
        return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def initialize(self):
        status, body = self.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token=None)
        if status != 200:
            raise RuntimeError(f"sys/init: {status} {body}")
        self.unseal_key, self.token = body["keys"][0], body["root_token"]
        self.unseal()

    def unseal(self):
        self.api("PUT", "sys/unseal", {"key": self.unseal_key}, token=None)
        poll("OpenBao unsealed and active", lambda: self.health() == 200, 30, 0.05)

    def health(self):
        try:
            with self._opener.open(f"{self.addr}/v1/sys/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    # --- API ---------------------------------------------------------------------------------

    def api(self, method, path, body=None, token="root"):
        req = urllib.request.Request(f"{self.addr}/v1/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        if token:
            req.add_header("X-Vault-Token", self.token if token == "root" else token)
        try:
            with self._opener.open(req, timeout=10) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        return status, (json.loads(text) if text.strip() else {})

    def ok(self, method, path, body=None):
        status, out = self.api(method, path, body)
        if status >= 400:
            raise RuntimeError(f"OpenBao {method} {path}: {status} {out}")
        return out

    def kv_put(self, path, **data):
        """Writes a new version of the KV v2 secret `secret/<path>`."""
        return self.ok("POST", f"secret/data/{path}", {"data": data})["data"]["version"]

    def accessors(self):
        return set(self.ok("LIST", "auth/token/accessors")["data"]["keys"])

    def accessor_alive(self, accessor):
        status, _ = self.api("POST", "auth/token/lookup-accessor", {"accessor": accessor})
        return status == 200

    def audit_size(self):
        try:
            return os.path.getsize(self.audit_log)
        except OSError:
            return 0

    def audit_requests(self, since_offset=0):
        """Paths of the audited requests from byte `since_offset` on."""
        with open(self.audit_log, "rb") as f:
            f.seek(since_offset)
            lines = f.read().decode(errors="replace").splitlines()
        paths = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("type") == "request":
                paths.append(entry.get("request", {}).get("path", ""))
        return paths


def configure(bao, k8s_host, ca_pem, reviewer_jwt, namespace, roles):
    """KV v2 at secret/, the kubernetes auth method against the cluster's API server, and one
    role per service account: roles = {role: (service_account, [policy paths])}."""
    bao.ok("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    bao.ok("POST", "sys/auth/kubernetes", {"type": "kubernetes"})
    bao.ok("POST", "auth/kubernetes/config", {
        "kubernetes_host": k8s_host, "kubernetes_ca_cert": ca_pem,
        "token_reviewer_jwt": reviewer_jwt, "disable_local_ca_jwt": True})
    for role, (sa, prefixes) in roles.items():
        policy = "".join(f'path "secret/data/{p}/*" {{ capabilities = ["read"] }}\n'
                         f'path "secret/metadata/{p}/*" {{ capabilities = ["read"] }}\n' for p in prefixes)
        bao.ok("PUT", f"sys/policies/acl/{role}", {"policy": policy})
        bao.ok("POST", f"auth/kubernetes/role/{role}", {
            "bound_service_account_names": [sa], "bound_service_account_namespaces": [namespace],
            "audience": "vault", "token_policies": [role], "token_ttl": "1h", "token_max_ttl": "24h"})


__all__ = ["OpenBao", "configure", "Timeout", "now"]
