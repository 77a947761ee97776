"""Shared identities on the Helm chart's install with `shareIdentities: true`: the pods of one
service account and role share one Vault login and one read of each secret, another service
account logs in for itself, deleting pods keeps the others reading, and the last pod's deletion
revokes the shared token."""

import kube
import pods as P
from harness import reads, wait_read
from kube import apply, now, poll

PODS = 4


def shared_identity(r, bao):
    entries = [P.secret("password", "secret/a/db", "password")]
    before = bao.accessors()
    audit_at = bao.audit_size()
    names = [f"shared-{i}" for i in range(PODS)]
    t = now()
    apply(*[P.simple_reader_pod(n, "a", "a", entries, cacheTTL="1h") for n in names],
          P.simple_reader_pod("shared-other", "b", "b", [P.secret("password", "secret/b/db", "password")],
                              cacheTTL="1h"))
    firsts = [wait_read(n, "/s/password", timeout=90) for n in names]
    other = wait_read("shared-other", "/s/password", timeout=90)
    values = {x.text for x in firsts}
    r.figure(f"shared identity: {PODS} pods applied to all reading", f"{max(x.t1 for x in firsts) - t:.2f}s")
    requests = bao.audit_requests(audit_at)
    logins = [p for p in requests if p == "auth/kubernetes/login"]
    a_reads = [p for p in requests if p == "secret/data/a/db"]
    tokens = bao.accessors() - before
    r.check(f"shared identity: {PODS} pods of service account a log in once and read a's secret once; "
            "service account b logs in for itself",
            len(values) == 1 and other.ok and len(logins) == 2 and len(a_reads) == 1 and len(tokens) == 2,
            f"a's pods read {sorted(values)}; b read its own; {len(logins)} logins, "
            f"{len(a_reads)} reads of secret/a/db, {len(tokens)} new tokens")

    # Deleting all but one pod of a: the last keeps reading with the shared token.
    last = names[-1]
    kube.delete_pods(P.NAMESPACE, *names[:-1])
    t = now()
    fresh = wait_read(last, "/s/password", after=t, timeout=10)
    failed = [x for x in reads(last) if not x.ok]
    alive = all(bao.accessor_alive(a) for a in tokens)
    r.check("shared identity: deleting 3 of the pods keeps the last one reading on the shared token",
            fresh.ok and not failed and alive,
            f"read {fresh.text!r} after the deletions; {len(failed)} failed reads; tokens alive: {alive}")

    kube.delete_pods(P.NAMESPACE, last, "shared-other")
    gone = poll("the shared token revoked", lambda: not any(bao.accessor_alive(a) for a in tokens), 20, 0.25)
    r.check("shared identity: the last pod's deletion revokes the shared token", gone and bao.accessors() == before,
            f"tokens back to the {len(before)} before")
