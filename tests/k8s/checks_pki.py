"""A Vault PKI certificate in a pod (a `pki` entry naming the pod), on the Helm chart's install:
issued once on first read for the pod's name, and neither a plugin pod deletion nor a kill -9
of the plugin issues another (the certificate travels through the keeper)."""

import os
import ssl
import tempfile

import pods as P
from checks_restart import plugin_pid, wait_plugin
from harness import PLUGIN_NS, plugin_pod, reads, wait_read
from kube import apply, kubectl, now, poll

POD = "cert-0"


def setup_pki(bao):
    """A root CA at pki/, a role `web` for example.com names, and role a's policy allowing it."""
    bao.ok("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
    bao.ok("POST", "pki/root/generate/internal", {"common_name": "vaultfs e2e root", "ttl": "87600h"})
    bao.ok("POST", "pki/roles/web", {"allowed_domains": ["example.com"], "allow_subdomains": True,
                                     "max_ttl": "72h", "key_type": "ec", "key_bits": 256})
    policy = "".join(f'path "secret/{k}/a/*" {{ capabilities = ["read"] }}\n' for k in ("data", "metadata"))
    policy += 'path "pki/issue/web" { capabilities = ["create", "update"] }\n'
    bao.ok("PUT", "sys/policies/acl/a", {"policy": policy})


def served(pod):
    """The certificate the pod's reader read last: (common name, serial), or None."""
    got = [x for x in reads(pod) if x.ok and x.file == "/s/tls/tls.crt" and "BEGIN CERTIFICATE" in x.text]
    if not got:
        return None
    # The reader prints the file on one line (newlines as spaces): rebuild the PEM's first block.
    words = got[-1].text.split()
    body = words[words.index("CERTIFICATE-----") + 1:]
    body = body[:body.index("-----END")]
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(body) + "\n-----END CERTIFICATE-----\n"
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
        f.write(pem)
    try:
        decoded = ssl._ssl._test_decode_cert(f.name)  # noqa: SLF001 - the stdlib's PEM decoder
    finally:
        os.unlink(f.name)
    cn = dict(x[0] for x in decoded["subject"]).get("commonName")
    return cn, decoded["serialNumber"]


def issues(bao, since):
    return len([p for p in bao.audit_requests(since) if p == "pki/issue/web"])


def certificate(r, bao):
    setup_pki(bao)
    audit_at, t = bao.audit_size(), now()
    entry = {"name": "tls", "pki": {"path": "pki/issue/web", "commonName": "{{ pod.name }}.example.com"}}
    apply(P.simple_reader_pod(POD, "a", "a", [entry], files=["/s/tls/tls.crt", "/s/tls/tls.key"]))
    wait_read(POD, "/s/tls/tls.key", "PRIVATE KEY", timeout=90)
    first = poll("cert-0: a certificate read", lambda: served(POD), 30, 0.25)
    r.figure("certificate: kubectl apply to first read", f"{now() - t:.2f}s")
    r.check("certificate: a pki entry in a pod is issued once, for the pod's name",
            first[0] == f"{POD}.example.com" and issues(bao, audit_at) == 1,
            f"CN {first[0]}, serial {first[1]}, {issues(bao, audit_at)} issue(s) in the audit log")

    # A plugin pod deletion: the successor serves the same certificate, issuing nothing.
    old, pid, t0 = poll("one plugin pod", plugin_pod, 60), plugin_pid(), now()
    kubectl("delete", "pod", "-n", PLUGIN_NS, old["metadata"]["name"], "--wait=false")
    wait_plugin("certificate: plugin pod deletion", t0, pid, old_uid=old["metadata"]["uid"])
    after = wait_read(POD, "/s/tls/tls.crt", "BEGIN CERTIFICATE", after=now(), timeout=30)
    failed = [x for x in reads(POD) if not x.ok and x.t0 >= t0]
    again = served(POD)
    r.check("certificate: a plugin pod deletion issues no new certificate",
            again == first and issues(bao, audit_at) == 1 and not failed,
            f"serial before {first[1]}, after {again[1] if again else None}; "
            f"{issues(bao, audit_at)} issue(s); {len(failed)} failed reads")
    kubectl("delete", "pod", "-n", P.NAMESPACE, POD, "--wait=true", "--timeout=60s", timeout=90)
