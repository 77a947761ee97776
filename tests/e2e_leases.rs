//! End-to-end tests of leased (dynamic) secrets: the real `vaultfs` binary mounted as root
//! against a real OpenBao dev server whose `database` secrets engine issues PostgreSQL logins
//! on a real, throw-away PostgreSQL server ([`common::pg::Postgres`]).
//!
//! The volume declares two files from the same dynamic secret:
//! `db/username=database/creds/app#username` and `db/password=database/creds/app#password`.
//! Every read of `database/creds/app` creates a new PostgreSQL role with its own lease, so the
//! audit log's count of those reads is the number of credentials vaultfs was issued. A lease is
//! renewed with `PUT sys/leases/renew` and revoked with `PUT sys/leases/revoke` (both audited
//! as `update` requests on those paths).
//!
//! Tested: renewal instead of re-issue while mounted, rotation when the lease reaches its max
//! TTL, revocation at unmount, and, with Vault frozen, cached credentials served through the
//! path and an old descriptor until their lease ends (even past a shorter `--max-stale`) and
//! `EIO` from then on.
//!
//! Ignored by default (they need root, `/dev/fuse`, `bao` and PostgreSQL); `scripts/test.sh`
//! runs them with `--include-ignored`.

pub mod common;

use std::fs::File;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::pg::{enable_database_engine, Postgres, CREDS_PATH};
use common::*;
use serde_json::Value;

const USERNAME: &str = "db/username";
const PASSWORD: &str = "db/password";

/// Starts PostgreSQL and OpenBao and points OpenBao's `database` engine at PostgreSQL with the
/// role's lease lengths.
fn setup(default_ttl: Duration, max_ttl: Duration) -> (Postgres, Bao) {
    require_root();
    let pg = Postgres::start();
    let bao = Bao::start();
    enable_database_engine(&bao, &pg, default_ttl, max_ttl);
    (pg, bao)
}

/// Mounts the username and password of `database/creds/app` as two files, with a cache TTL far
/// longer than any lease here, so only lease handling makes vaultfs talk to Vault again.
fn mount_credentials(bao: &Bao) -> Mount {
    mount_credentials_with(bao, &[])
}

/// [`mount_credentials`] with more arguments.
fn mount_credentials_with(bao: &Bao, args: &[&str]) -> Mount {
    Mount::builder(bao)
        .secret(&format!("{USERNAME}={CREDS_PATH}#username"))
        .secret(&format!("{PASSWORD}={CREDS_PATH}#password"))
        .args(["--cache-ttl", "1h"])
        .args(args)
        .rust_log("info,vaultfs=debug")
        .start()
}

/// A username and password served together: the username is read again after the password
/// and the pair is only taken when it did not change in between (a rotation may swap the
/// credentials between two opens).
fn credentials(m: &Mount) -> (String, String) {
    for _ in 0..10 {
        let user = read_string(m.file(USERNAME));
        let password = read_string(m.file(PASSWORD));
        if read_string(m.file(USERNAME)) == user {
            assert!(!user.is_empty(), "empty username served");
            assert!(!password.is_empty(), "empty password served");
            return (user, password);
        }
    }
    panic!(
        "the username changed between every pair of reads; vaultfs log:\n{}",
        m.logs()
    );
}

/// Audited requests (the `request` half of each audit pair).
fn audited_requests(bao: &Bao) -> Vec<Value> {
    bao.audit_entries()
        .into_iter()
        .filter(|e| e["type"] == "request")
        .collect()
}

/// Whether an audited request is an `update` of `sys/leases/<action>` (the lease id in the
/// body, as vaultfs sends it, or in the path, which the API accepts too).
fn is_lease_call(entry: &Value, action: &str) -> bool {
    let path = entry["request"]["path"].as_str().unwrap_or_default();
    let base = format!("sys/leases/{action}");
    entry["request"]["operation"] == "update"
        && (path == base || path.starts_with(&format!("{base}/")))
}

fn renewals(bao: &Bao) -> usize {
    audited_requests(bao)
        .iter()
        .filter(|e| is_lease_call(e, "renew"))
        .count()
}

fn revocations(bao: &Bao) -> usize {
    audited_requests(bao)
        .iter()
        .filter(|e| is_lease_call(e, "revoke"))
        .count()
}

fn creds_reads(bao: &Bao) -> usize {
    bao.audit_reads(CREDS_PATH)
}

/// The lease ids OpenBao holds for `database/creds/app` (issued, not yet revoked or expired).
fn live_leases(bao: &Bao) -> Vec<String> {
    bao.list(&format!("sys/leases/lookup/{CREDS_PATH}/"))
        .iter()
        .map(|k| format!("{CREDS_PATH}/{k}"))
        .collect()
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and postgresql (run by scripts/test.sh)"]
fn dynamic_credentials_are_read_once_and_renewed_not_reissued_while_mounted() {
    let default_ttl = Duration::from_secs(6);
    let (pg, bao) = setup(default_ttl, Duration::from_secs(60));
    let m = mount_credentials(&bao);
    assert_eq!(creds_reads(&bao), 0, "mounting read {CREDS_PATH}");

    let before_read = Instant::now();
    let (user, password) = credentials(&m);
    assert_eq!(
        creds_reads(&bao),
        1,
        "the username and password files must come from one read of {CREDS_PATH}"
    );
    pg.try_login(&user, &password)
        .unwrap_or_else(|e| panic!("the served credentials do not log in: {e}"));
    let leases = live_leases(&bao);
    assert_eq!(leases.len(), 1, "leases held in OpenBao: {leases:?}");

    // Leave the mount alone until well past the credentials' original TTL (they were issued
    // after `before_read`), watching that the daemon stays up meanwhile.
    let quiet = Duration::from_secs(10);
    assert!(quiet > default_ttl + Duration::from_secs(3));
    while before_read.elapsed() < quiet {
        if let Some(dead) = statfs_result(m.path(), Duration::from_secs(2)).and_then(Result::err) {
            panic!(
                "the mount failed statfs with errno {dead} while idle; vaultfs log:\n{}",
                m.logs()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }

    let renewed = renewals(&bao);
    assert!(
        renewed >= 1,
        "no sys/leases/renew request in the audit log {:?} after the lease's {default_ttl:?} \
         TTL; vaultfs log:\n{}",
        before_read.elapsed(),
        m.logs()
    );
    assert_eq!(
        creds_reads(&bao),
        1,
        "vaultfs read {CREDS_PATH} again (issuing new credentials) instead of renewing; \
         vaultfs log:\n{}",
        m.logs()
    );
    // The lease is still the only one and still live in OpenBao...
    assert_eq!(live_leases(&bao), leases, "leases held in OpenBao changed");
    // ...and PostgreSQL still accepts the credentials, whose password would have expired
    // (VALID UNTIL the original expiration) without the renewals.
    assert!(
        before_read.elapsed() > default_ttl,
        "checked too early to prove anything"
    );
    if let Err(e) = pg.try_login(&user, &password) {
        panic!(
            "after {:?} and {renewed} renewal(s) the credentials no longer log in: {e} \
             (role VALID UNTIL {:?}); vaultfs log:\n{}",
            before_read.elapsed(),
            pg.role_valid_until(&user),
            m.logs()
        );
    }

    // New opens still see the same credentials, served without another read.
    assert_eq!(
        credentials(&m),
        (user.clone(), password.clone()),
        "the credentials served changed although the lease was renewable"
    );
    assert_eq!(
        creds_reads(&bao),
        1,
        "re-reading the files read {CREDS_PATH}"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and postgresql (run by scripts/test.sh)"]
fn credentials_are_rotated_when_the_lease_reaches_its_max_ttl() {
    // A 6 s lease is renewed 4 s in (leases under 4.5 s are too short to renew at vaultfs's
    // 3 s floor); at 8 s only 4 s are left before the 12 s max TTL: rotated at once.
    let max_ttl = Duration::from_secs(12);
    let (pg, bao) = setup(Duration::from_secs(6), max_ttl);
    let m = mount_credentials(&bao);

    let (user1, password1) = credentials(&m);
    assert_eq!(creds_reads(&bao), 1, "first access read {CREDS_PATH} once");
    pg.try_login(&user1, &password1)
        .unwrap_or_else(|e| panic!("the first credentials do not log in: {e}"));

    // The first lease can be renewed at most up to 12 s after issue; vaultfs must have swapped
    // in new credentials by then. Allow 20 s before calling it missing.
    let started = Instant::now();
    let rotated = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        (read_string(m.file(USERNAME)) != user1)
            .then_some(())
            .ok_or(())
    });
    assert!(
        rotated.is_ok(),
        "the username was still {user1:?} {:?} after the first read (max_ttl {max_ttl:?}); \
         {} read(s) of {CREDS_PATH}, {} renewal(s); vaultfs log:\n{}",
        started.elapsed(),
        creds_reads(&bao),
        renewals(&bao),
        m.logs()
    );
    let rotated_after = started.elapsed();
    let (user2, password2) = credentials(&m);
    // Counted right after the change was seen (within one 200 ms poll): the second lease is
    // renewable for 12 s from its issue, so a third read cannot be due for several seconds.
    // Anything but 2 here means vaultfs read the credentials more often than one rotation
    // needs (every read issues new credentials).
    let reads = creds_reads(&bao);
    assert_ne!(
        user2, user1,
        "the rotated username went back to the first one"
    );
    assert_eq!(
        reads,
        2,
        "expected exactly the first read and one rotation of {CREDS_PATH} when the new \
         username appeared ({rotated_after:?} after the first read); vaultfs log:\n{}",
        m.logs()
    );
    pg.try_login(&user2, &password2)
        .unwrap_or_else(|e| panic!("the rotated credentials do not log in: {e}"));
    assert_ne!(password2, password1, "the rotated password is the old one");

    // From the audit log (server clock): the new credentials were read before the first lease
    // reached its max_ttl, and only after vaultfs had renewed the first lease (it rotates
    // because the lease cannot be extended, not instead of renewing it).
    let requests = audited_requests(&bao);
    let reads_at: Vec<f64> = requests
        .iter()
        .filter(|e| e["request"]["operation"] == "read" && e["request"]["path"] == CREDS_PATH)
        .map(audit_time)
        .collect();
    assert_eq!(reads_at.len(), 2, "audited reads of {CREDS_PATH}");
    let gap = reads_at[1] - reads_at[0];
    assert!(
        gap < max_ttl.as_secs_f64(),
        "the new credentials were read {gap:.2} s after the first ones, after the first lease \
         had expired at its max_ttl {max_ttl:?}"
    );
    let renewed_first = requests
        .iter()
        .filter(|e| is_lease_call(e, "renew"))
        .map(audit_time)
        .filter(|t| *t > reads_at[0] && *t < reads_at[1])
        .count();
    assert!(
        renewed_first >= 1,
        "the first lease was never renewed before the rotation {gap:.2} s later; \
         vaultfs log:\n{}",
        m.logs()
    );
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and postgresql (run by scripts/test.sh)"]
fn unmounting_revokes_the_lease_and_drops_the_database_role() {
    // Leases long enough that neither a renewal nor a rotation happens during the test.
    let (pg, bao) = setup(Duration::from_secs(60), Duration::from_secs(120));
    let mut m = mount_credentials(&bao);

    let (user, password) = credentials(&m);
    assert_eq!(creds_reads(&bao), 1, "first access read {CREDS_PATH} once");
    assert!(pg.role_exists(&user), "role {user:?} was not created");
    pg.try_login(&user, &password)
        .unwrap_or_else(|e| panic!("the served credentials do not log in: {e}"));
    assert_eq!(revocations(&bao), 0, "a lease was revoked while mounted");

    let status = m.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "vaultfs ended with {} on SIGTERM; its log:\n{}",
        describe_status(&status),
        m.logs()
    );
    assert!(!is_mounted(m.path()), "the mount is still there after exit");

    let dropped = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        (!pg.role_exists(&user)).then_some(()).ok_or(())
    });
    assert!(
        dropped.is_ok(),
        "role {user:?} still exists 10 s after vaultfs exited ({} revocation(s) audited, \
         leases {:?}); vaultfs log:\n{}",
        revocations(&bao),
        live_leases(&bao),
        m.logs()
    );
    assert!(
        revocations(&bao) >= 1,
        "the role is gone but no sys/leases/revoke request was audited; vaultfs log:\n{}",
        m.logs()
    );
    assert!(
        !pg.can_login(&user, &password),
        "the revoked credentials still log in"
    );
    assert_eq!(
        live_leases(&bao),
        Vec::<String>::new(),
        "leases left in OpenBao"
    );
    assert_eq!(creds_reads(&bao), 1, "vaultfs read {CREDS_PATH} again");
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and postgresql (run by scripts/test.sh)"]
fn with_vault_frozen_cached_credentials_are_served_until_their_lease_ends_and_never_after() {
    // 6 s leases: the renewal due 4 s in falls in the outage and fails, so each lease ends 6 s
    // after it was issued.
    let lease = Duration::from_secs(6);
    let (_pg, bao) = setup(lease, Duration::from_secs(12));
    let vault_timeout = Duration::from_secs(1);
    // A leased value is fresh (not stale) while its lease lives, so `--max-stale` does not cut
    // it short: one volume with the default (5 min), one with 2 s, shorter than the lease. Both
    // must serve their credentials until their lease ends and fail with EIO from then on.
    let volumes: Vec<(&str, Mount)> = [("max-stale 5m", "5m"), ("max-stale 2s", "2s")]
        .into_iter()
        .map(|(name, max_stale)| {
            let m = mount_credentials_with(
                &bao,
                &[
                    "--consistency",
                    "cached",
                    "--vault-timeout",
                    "1s",
                    "--max-stale",
                    max_stale,
                ],
            );
            (name, m)
        })
        .collect();

    // Each volume's first read issues its lease: between `issued_from` and `issued_by`.
    let origin = Instant::now();
    struct Held {
        issued_from: Duration,
        issued_by: Duration,
        user: Vec<u8>,
        password: Vec<u8>,
        old: Arc<File>,
    }
    let held: Vec<Held> = volumes
        .iter()
        .map(|(_, m)| {
            let issued_from = origin.elapsed();
            let user = read_string(m.file(USERNAME));
            let issued_by = origin.elapsed();
            let password = read_string(m.file(PASSWORD));
            let old = Arc::new(File::open(m.file(PASSWORD)).unwrap());
            assert_eq!(pread_start(&old).unwrap(), password.as_bytes());
            Held {
                issued_from,
                issued_by,
                user: user.into_bytes(),
                password: password.into_bytes(),
                old,
            }
        })
        .collect();
    assert_eq!(creds_reads(&bao), volumes.len(), "one lease per volume");
    let paused = bao.paused();
    assert_eq!(
        renewals(&bao),
        0,
        "a lease was renewed before Vault was frozen"
    );

    let mut probes: Vec<Probe> = volumes
        .iter()
        .zip(&held)
        .flat_map(|((name, m), h)| {
            [
                Probe::path(&format!("{name}: the username path"), &m.file(USERNAME)),
                Probe::descriptor(&format!("{name}: an old password descriptor"), &h.old),
            ]
        })
        .collect();
    let last_end = held.iter().map(|h| h.issued_by).max().unwrap() + lease;
    sample_reads(
        origin,
        last_end + vault_timeout + Duration::from_millis(1500),
        Duration::from_millis(20),
        &mut probes,
    );
    // The kernel's attribute timeout may end a little after the daemon computed it (the reply
    // is applied when the requesting thread runs again).
    let timer_slack = Duration::from_millis(250);
    for (i, p) in probes.iter().enumerate() {
        let (m, h) = (&volumes[i / 2].1, &held[i / 2]);
        let value = if i % 2 == 0 { &h.user } else { &h.password };
        let cut = p.cut_off(value, libc::EIO);
        let (Some(served), Some(failed)) = (cut.last_served, cut.first_failed) else {
            panic!(
                "{}: last served {:?}, first failure {:?}; vaultfs log:\n{}",
                p.what,
                cut.last_served,
                cut.first_failed,
                m.logs()
            );
        };
        eprintln!(
            "{}: lease issued {:?}..{:?}, ends by {:?}; served until the read started {:?}, \
             EIO from the read started {:?} (returned at {:?})",
            p.what,
            h.issued_from,
            h.issued_by,
            h.issued_by + lease,
            served.started,
            failed.started,
            failed.ended
        );
        // Served while the lease lives: the value fails only once the lease (issued after
        // `issued_from`) has ended, whatever max-stale says.
        assert!(
            failed.ended >= h.issued_from + lease,
            "{}: failed at {:?}, before the lease issued after {:?} ended",
            p.what,
            failed.ended,
            h.issued_from
        );
        // Never served past the lease's end (issued before `issued_by`).
        assert!(
            served.started <= h.issued_by + lease + timer_slack,
            "{}: served by the read started at {:?}, past the end of the lease issued by {:?}; \
             vaultfs log:\n{}",
            p.what,
            served.started,
            h.issued_by,
            m.logs()
        );
        assert!(
            failed.started <= h.issued_by + lease + Duration::from_secs(1),
            "{}: first failed by the read started at {:?}, more than 1 s past the end of the \
             lease issued by {:?}",
            p.what,
            failed.started,
            h.issued_by
        );
    }

    // The lease keeper retries (the renewal, then new credentials once the lease has ended)
    // with a back-off of at least 3 s, not in a loop.
    let outage = origin.elapsed();
    for (name, m) in &volumes {
        let retries = m.logs().matches("could not renew a lease").count();
        eprintln!(
            "{name}: {retries} failed lease attempts in {outage:?}, daemon CPU {:?}",
            cpu_time(m.pid())
        );
        let most = (outage.as_secs_f64() / 3.0).ceil() as usize + 1;
        assert!(
            retries <= most,
            "{name}: {retries} failed lease attempts in {outage:?} (at most {most})"
        );
    }
    // Once Vault answers again, each volume reads new credentials (the old lease is over).
    drop(paused);
    let resumed = Instant::now();
    for (i, p) in probes.iter_mut().enumerate() {
        let old = if i % 2 == 0 {
            &held[i / 2].user
        } else {
            &held[i / 2].password
        };
        let after = wait_until(
            &format!("{} to serve new credentials after Vault resumed", p.what),
            Duration::from_secs(5),
            || match p.read() {
                Ok(v) if !v.is_empty() && &v != old => Ok(resumed.elapsed()),
                other => Err(format!("{other:?}")),
            },
        );
        eprintln!("{}: new credentials {after:?} after Vault resumed", p.what);
    }
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and PostgreSQL"]
fn a_node_plugin_restart_keeps_the_credentials_and_the_lease_and_reads_no_new_ones() {
    use common::csi::{describe, jwt_publish, CsiNode, Keeper, Pod};
    use common::k8s::{enable_jwt_auth, jwt_role};
    // Leases of 6 s: only renewals by the successor keep them alive past the check below.
    let (pg, bao) = setup(Duration::from_secs(6), Duration::from_secs(3600));
    let key = common::jwt::SigningKey::generate();
    enable_jwt_auth(&bao, "jwt", &key);
    bao.put_policy(
        "db",
        &format!(
            r#"path "{CREDS_PATH}" {{ capabilities = ["read"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}"#
        ),
    );
    jwt_role(&bao, "jwt", "db", "ns", "app", &["db"], "1h");
    let node = CsiNode::new("node-lease-handover");
    let _keeper = Keeper::start(&node.keeper_socket_path());
    let metrics = |addr: &str| http_get(addr, "/metrics");
    let start = || {
        let addr = format!("127.0.0.1:{}", free_port());
        (node.daemon(&bao).with_keeper(&addr).start(), addr)
    };
    let (mut daemon, addr) = start();
    let pod = Pod::new("ns", "app-db", "app");
    let secrets = format!(
        "- {{name: {USERNAME}, path: {CREDS_PATH}, key: username}}\n\
         - {{name: {PASSWORD}, path: {CREDS_PATH}, key: password}}\n"
    );
    let (request, target) = jwt_publish(&node, &pod, &key, "db", &secrets, &[("cacheTTL", "1h")]);
    if let Err(s) = daemon.client().publish(request) {
        panic!(
            "publish: {}; daemon output:\n{}",
            describe(&s),
            daemon.logs()
        );
    }
    let user = read_string(target.join(USERNAME));
    let password = read_string(target.join(PASSWORD));
    pg.try_login(&user, &password)
        .expect("the issued credentials log in");
    assert_eq!(creds_reads(&bao), 1);
    // The token and the leased values: two records in the keeper.
    wait_until(
        "the keeper to hold the session and the lease",
        Duration::from_secs(10),
        || {
            let stashed = metric_value(&metrics(&addr), "vaultfs_keeper_stashed_sessions");
            if stashed == 2.0 {
                Ok(())
            } else {
                Err(stashed)
            }
        },
    );

    daemon.kill();
    let (daemon, addr) = start();
    assert_eq!(
        read_string(target.join(USERNAME)),
        user,
        "the same credentials"
    );
    assert_eq!(read_string(target.join(PASSWORD)), password);
    let text = metrics(&addr);
    assert_eq!(
        metric_value(&text, "vaultfs_vault_leases_taken_over_total"),
        1.0
    );
    assert_eq!(
        metric_value(&text, "vaultfs_vault_tokens_taken_over_total"),
        1.0
    );
    // Past the 6 s lease: alive only if the successor renews the same lease.
    thread::sleep(Duration::from_secs(8));
    assert_eq!(read_string(target.join(USERNAME)), user);
    pg.try_login(&user, &password)
        .expect("the credentials still log in after the successor renewed their lease");
    assert_eq!(creds_reads(&bao), 1, "no new credentials were read");
    assert_eq!(live_leases(&bao).len(), 1, "one lease, the same one");
    assert!(renewals(&bao) >= 1, "the successor renewed the lease");
    let logs = daemon.logs();
    assert!(!logs.contains(&password), "the password reached the logs");
}
