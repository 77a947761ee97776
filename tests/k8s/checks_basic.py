"""Checks on a fresh install: publish and read, rotation, unpublish revoking the pod's token,
isolation between service accounts, and a pod started while Vault is down."""

import kube
import pods as P
from harness import failed_mount, reads, wait_read
from kube import apply, now, poll

TTL = 5  # cacheTTL of the app volumes (the plugin's --min-cache-ttl default)


def publish_rotate_revoke(r, bao):
    entries = [P.secret("password", "secret/a/db", "password"), P.secret("db.json", "secret/a/db")]
    before = bao.accessors()
    audit_at = bao.audit_size()
    t = now()
    apply(P.simple_reader_pod("app", "a", "a", entries, cacheTTL=f"{TTL}s"))
    first = wait_read("app", "/s/password", "a-v1", timeout=90)
    whole = wait_read("app", "/s/db.json", '"password":"a-v1"', timeout=10)
    r.figure("publish: kubectl apply to first read", f"{first.t1 - t:.2f}s")
    r.check("publish and read from a pod", True,
            f"/s/password = a-v1 {first.t1 - t:.2f}s after kubectl apply; /s/db.json = {whole.text}")
    token = bao.accessors() - before

    # Rotation: a new KV version, seen by the running pod once the TTL has passed.
    t = now()
    bao.kv_put("a/db", user="alice", password="a-v2")
    seen = wait_read("app", "/s/password", "a-v2", after=t, timeout=TTL + 15)
    later_old = [x for x in reads("app") if x.t1 > seen.t1 and x.file == "/s/password" and "a-v1" in x.text]
    r.figure("rotation: new KV version to first read of it", f"{seen.t1 - t:.2f}s")
    r.check("rotation seen by a running pod", seen.t1 - t <= TTL + 3 and not later_old,
            f"a-v2 read {seen.t1 - t:.2f}s after the write (cacheTTL {TTL}s)"
            + (f"; but a-v1 read again {len(later_old)} times after" if later_old else ""))

    # Unpublish revokes the pod's token: the one token its publish created is gone afterwards.
    logins = [p for p in bao.audit_requests(audit_at) if p.startswith("auth/kubernetes/login")]
    kube.delete_pods(P.NAMESPACE, "app")
    gone = poll("the pod's token revoked", lambda: not any(bao.accessor_alive(a) for a in token), 20, 0.25)
    revokes = [p for p in bao.audit_requests(audit_at) if p == "auth/token/revoke-self"]
    r.check("unpublish revokes the pod's Vault token",
            len(token) == 1 and gone and bool(revokes) and bao.accessors() == before,
            f"{len(logins)} login, {len(token)} new token; after the pod's deletion it is revoked "
            f"({len(revokes)} revoke-self in the audit log), tokens back to the {len(before)} before")


def isolation(r, bao):
    """A pod of service account b cannot get a's secret: its login as a's role is refused (the
    publish fails with PermissionDenied), and with its own role the read is refused (EACCES)."""
    own, theirs = P.secret("own", "secret/b/db", "password"), P.secret("theirs", "secret/a/db", "password")
    apply(P.simple_reader_pod("b-as-a", "b", "a", [P.secret("password", "secret/a/db", "password")]),
          P.simple_reader_pod("b-reads-a", "b", "b", [own, theirs]))
    msg = poll("b-as-a: FailedMount event", lambda: failed_mount("b-as-a"), 60, 0.5)
    phase = (kube.get("pod", "b-as-a", P.NAMESPACE) or {}).get("status", {}).get("phase")
    r.check("isolation: SA b logging in as role a is refused, the volume is not published",
            "PermissionDenied" in msg and phase == "Pending", f"pod {phase}; event: {msg[-240:]}")

    wait_read("b-reads-a", "/s/own", "b-v1", timeout=60)
    poll("b-reads-a: 3 refused reads of a's secret",
         lambda: len([x for x in reads("b-reads-a") if x.file == "/s/theirs" and not x.ok]) >= 3, 20, 0.25)
    got = [x for x in reads("b-reads-a") if x.file == "/s/theirs"]
    oks = [x for x in got if x.ok]
    r.check("isolation: SA b with its own role cannot read a's secret (Vault refuses: EACCES)",
            not oks and all("Permission denied" in x.text for x in got),
            f"own secret b-v1 read; a's: {len(got)} reads, {len(oks)} OK, error {got[-1].text!r}")
    kube.delete_pods(P.NAMESPACE, "b-as-a", "b-reads-a")


def vault_down(r, bao):
    """docs/semantics.md and kubernetes.md: publish does not wait for an unreachable Vault (at
    most 2 s for the login), the pod starts, uncached reads fail with EIO while Vault is down
    and the volume logs in and reads once it answers again (health probe every second)."""
    bao.stop()
    t = now()
    apply(P.simple_reader_pod("outage", "a", "a", [P.secret("password", "secret/a/outage", "password")],
                              cacheTTL=f"{TTL}s"))
    running = poll("outage pod Running while Vault is down", lambda: (
        (kube.get("pod", "outage", P.NAMESPACE) or {}).get("status", {}).get("phase") == "Running"), 60, 0.25)
    t_run = now()
    failed = wait_read("outage", "/s/password", ok=False, timeout=30)
    poll("three failed reads", lambda: len([x for x in reads("outage") if not x.ok]) >= 3, 10, 0.25)
    got = reads("outage")
    slowest = max(x.t1 - x.t0 for x in got)
    # Reads never hang: an uncached read fails within --vault-timeout (5 s), later ones at once.
    r.check("pod started while Vault is down: Running, reads fail with EIO",
            running and not any(x.ok for x in got) and "Input/output error" in failed.text and slowest <= 5.5,
            f"Running {t_run - t:.1f}s after kubectl apply; {len(got)} reads failed ({failed.text!r}), "
            f"the slowest in {slowest:.2f}s")
    bao.start()  # the same storage; unsealed again
    t_up = now()
    ok = wait_read("outage", "/s/password", "o-v1", after=t_up, timeout=30)
    r.figure("Vault back to first read of the pod started during the outage", f"{ok.t1 - t_up:.2f}s")
    # A health probe every second marks the server up, then reads retry at once.
    r.check("pod started while Vault is down reads its secret once Vault is back", ok.t1 - t_up <= 3,
            f"o-v1 read {ok.t1 - t_up:.2f}s after OpenBao answered again (health probe every 1s)")
    kube.delete_pods(P.NAMESPACE, "outage")
