//! End-to-end proof that shared identities (`vaultfs csi --share-identities`) share only what
//! Vault would give each pod anyway: pods of one service account, namespace and role share one
//! login and one cached copy of each secret; a pod of another service account or namespace
//! under the same role name, or of the same service account under another role, never gets a
//! value from that cache (its own login, refused by Vault when the role does not accept it,
//! and EACCES for what its own policy does not grant); leased secrets are each pod's own
//! unless the entry says `share: true`, and go with their pod.
//!
//! Real `vaultfs csi`, real FUSE, real OpenBao with JWT logins (and, for leases, a real
//! PostgreSQL behind OpenBao's `database` engine); logins and reads are counted in OpenBao's
//! audit log. Ignored by default (needs root, `/dev/fuse`, `bao`, PostgreSQL);
//! `scripts/test.sh` runs them with `--include-ignored`.

pub mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::csi::*;
use common::jwt::SigningKey;
use common::k8s::*;
use common::pg::{enable_database_engine, Postgres, CREDS_PATH};
use common::*;
use tonic::Code;

const SECRET: &str = "secret/app/db";
const PUBLIC: &str = "secret/public/motd";

/// Logins through the `jwt` auth mount that reached OpenBao.
fn logins(bao: &Bao) -> usize {
    requests_to(bao, "auth/jwt/login")
}

/// Requests (of any operation) for the API path `path` that reached OpenBao.
fn requests_to(bao: &Bao, path: &str) -> usize {
    bao.audit_entries()
        .iter()
        .filter(|e| e["type"] == "request" && e["request"]["path"] == path)
        .count()
}

/// Publishes `pod`'s volume `secrets` through `daemon`, logging in as `role`, with cacheTTL
/// 1 h; panics with the daemon's output when refused.
fn publish(
    node: &CsiNode,
    daemon: &CsiDaemon,
    key: &SigningKey,
    pod: &Pod,
    role: &str,
    secrets: &str,
) -> PathBuf {
    publish_with(node, daemon, key, pod, role, secrets, &[("cacheTTL", "1h")])
}

/// [`publish`] with these attributes.
fn publish_with(
    node: &CsiNode,
    daemon: &CsiDaemon,
    key: &SigningKey,
    pod: &Pod,
    role: &str,
    secrets: &str,
    attributes: &[(&str, &str)],
) -> PathBuf {
    let (request, target) = jwt_publish(node, pod, key, role, secrets, attributes);
    if let Err(s) = daemon.client().publish(request) {
        panic!(
            "publish of {}'s volume failed with {}; daemon output:\n{}",
            pod.name,
            describe(&s),
            daemon.logs()
        );
    }
    target
}

/// Publishes `pod`'s volume expecting Vault to refuse its login as `role`, and nothing mounted.
fn expect_login_refused(
    node: &CsiNode,
    daemon: &CsiDaemon,
    key: &SigningKey,
    pod: &Pod,
    role: &str,
    secrets: &str,
) {
    let (request, _) = jwt_publish(node, pod, key, role, secrets, &[]);
    let what = format!("a login of {} Vault refuses", pod.name);
    expect_refused(&daemon.client(), request, Code::PermissionDenied, &what);
}

/// Waits until Vault's revocation has dropped the PostgreSQL role `user`.
fn dropped(pg: &Postgres, user: &str, what: &str) {
    let gone = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        (!pg.role_exists(user)).then_some(()).ok_or(())
    });
    assert!(gone.is_ok(), "{what}: role {user:?} still exists");
}

fn expect_errno(path: &Path, errno: i32, what: &str) {
    match read(path) {
        Ok(v) => panic!("{what}: expected errno {errno}, read {} bytes", v.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e:?}"),
    }
}

/// Pods of the service account `ns/app` under role `app` share one login and one read; a pod
/// of another service account (`ns/other`) or namespace (`other-ns/app`) under the role name
/// `app` is refused by Vault (the role binds `ns/app` only), whatever it writes in its
/// attributes; the same service account under role `public` logs in for itself and gets EACCES
/// for the secret the `app` pods have cached; unpublishing one `app` pod leaves the others
/// reading, and the last revokes the shared token.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn other_accounts_namespaces_and_roles_never_read_the_shared_cache() {
    let (bao, key) = app_cluster(&[(SECRET, &[("password", "s3cret")])]);
    bao.kv_put(PUBLIC, &[("text", "hello")]);
    bao.put_policy(
        "public",
        r#"path "secret/data/public/*" { capabilities = ["read"] }
path "secret/metadata/public/*" { capabilities = ["read"] }"#,
    );
    jwt_role(&bao, "jwt", "public", "ns", "app", &["public"], "1h");
    let node = CsiNode::new("node-isolation");
    let daemon = node.daemon(&bao).args(["--share-identities"]).start();
    let secrets = "- {name: password, path: secret/app/db, key: password}\n\
                   - {name: motd, path: secret/public/motd, key: text}\n";
    let tokens_before = token_accessors(&bao);

    let apps: Vec<(Pod, PathBuf)> = (0..5)
        .map(|i| {
            let pod = Pod::new("ns", &format!("app-{i}"), "app");
            let target = publish(&node, &daemon, &key, &pod, "app", secrets);
            (pod, target)
        })
        .collect();
    for (_, target) in &apps {
        assert_eq!(read_string(target.join("password")), "s3cret");
    }
    assert_eq!(logins(&bao), 1, "one login for the pods of ns/app");
    assert_eq!(
        bao.secret_reads(SECRET),
        1,
        "one read of the secret for 5 pods"
    );

    // Another service account, or another namespace, under the same role name.
    let other_account = Pod::new("ns", "intruder", "other");
    expect_login_refused(&node, &daemon, &key, &other_account, "app", secrets);
    let other_namespace = Pod::new("other-ns", "intruder", "app");
    expect_login_refused(&node, &daemon, &key, &other_namespace, "app", secrets);
    assert_eq!(logins(&bao), 3, "each refused pod tried its own login");

    // The same service account under another role: its own login and its own policy.
    let public = Pod::new("ns", "public-reader", "app");
    let public_target = publish(&node, &daemon, &key, &public, "public", secrets);
    assert_eq!(logins(&bao), 4, "another role logs in for itself");
    expect_errno(
        &public_target.join("password"),
        libc::EACCES,
        "role public reading the secret role app's pods have cached",
    );
    // And the other way round: what role public's identity has cached is not role app's.
    assert_eq!(read_string(public_target.join("motd")), "hello");
    expect_errno(
        &apps[0].1.join("motd"),
        libc::EACCES,
        "role app reading the secret role public's pod has cached",
    );
    let tokens: BTreeSet<String> = token_accessors(&bao)
        .difference(&tokens_before)
        .cloned()
        .collect();
    assert_eq!(tokens.len(), 2, "one token per identity: {tokens:?}");

    // Unpublishing app pods one by one keeps the others reading; the last revokes.
    let (last, others) = apps.split_last().expect("pods");
    for (pod, target) in others {
        daemon
            .client()
            .unpublish(&pod.volume_id("secrets"), target)
            .expect("unpublish");
        assert_eq!(read_string(last.1.join("password")), "s3cret");
    }
    let live: BTreeSet<String> = token_accessors(&bao)
        .difference(&tokens_before)
        .cloned()
        .collect();
    assert_eq!(live, tokens, "the last app pod still uses the shared token");
    daemon
        .client()
        .unpublish(&last.0.volume_id("secrets"), &last.1)
        .expect("unpublish");
    let gone = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let live: BTreeSet<String> = token_accessors(&bao)
            .difference(&tokens_before)
            .cloned()
            .collect();
        if live.len() == 1 {
            Ok(())
        } else {
            Err(live)
        }
    });
    assert!(
        gone.is_ok(),
        "the last app pod revokes its identity's token: {gone:?}"
    );
    assert_eq!(read_string(public_target.join("motd")), "hello");
}

/// Without `share`, every pod of one identity gets its own database credentials (its own lease,
/// revoked at its unpublish while the others keep theirs); pods whose entry says `share: true`
/// get one credential for all of them, revoked with the last of them.
#[test]
#[ignore = "needs root, /dev/fuse, bao (VAULTFS_TEST_BAO) and PostgreSQL"]
fn leased_secrets_are_each_pods_own_unless_the_entry_shares_them() {
    let (bao, key) = app_cluster(&[]);
    let pg = Postgres::start();
    enable_database_engine(
        &bao,
        &pg,
        Duration::from_secs(3600),
        Duration::from_secs(7200),
    );
    bao.put_policy(
        "app",
        // Revoking a lease takes `sys/leases/revoke`: without it a pod's credential would live
        // until its identity's token is revoked with the last pod.
        r#"path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }"#,
    );
    let node = CsiNode::new("node-shared-leases");
    let keeper = Keeper::start(&node.keeper_socket_path());
    let metrics = format!("127.0.0.1:{}", free_port());
    let start = || {
        node.daemon(&bao)
            .with_keeper(&metrics)
            .args(["--share-identities"])
            .start()
    };
    let mut daemon = start();
    let own = format!("- {{name: user, path: {CREDS_PATH}, key: username}}\n");
    let shared = format!("- {{name: user, path: {CREDS_PATH}, key: username, share: true}}\n");

    // Strict: every open asks the daemon, so a credential issued anew would be seen.
    let publish_reading = |name: &str, secrets: &str| {
        let pod = Pod::new("ns", name, "app");
        let target = publish_with(
            &node,
            &daemon,
            &key,
            &pod,
            "app",
            secrets,
            &[("cacheTTL", "1h"), ("consistency", "strict")],
        );
        let user = read_string(target.join("user"));
        (pod, target, user)
    };
    let singles: Vec<_> = (0..3)
        .map(|i| publish_reading(&format!("single-{i}"), &own))
        .collect();
    let sharers: Vec<_> = (0..3)
        .map(|i| publish_reading(&format!("sharer-{i}"), &shared))
        .collect();
    assert_eq!(logins(&bao), 1, "one identity, one login");

    let single_users: BTreeSet<&str> = singles.iter().map(|(_, _, u)| u.as_str()).collect();
    assert_eq!(
        single_users.len(),
        3,
        "a credential per pod: {single_users:?}"
    );
    let shared_users: BTreeSet<&str> = sharers.iter().map(|(_, _, u)| u.as_str()).collect();
    assert_eq!(
        shared_users.len(),
        1,
        "one credential shared: {shared_users:?}"
    );
    let shared_user = sharers[0].2.clone();
    assert!(!single_users.contains(shared_user.as_str()));
    assert_eq!(
        requests_to(&bao, CREDS_PATH),
        4,
        "3 own credentials and 1 shared one were issued"
    );
    for (_, target, user) in singles.iter().chain(&sharers) {
        assert_eq!(
            &read_string(target.join("user")),
            user,
            "each pod keeps its own"
        );
    }

    // A kill -9 restart takes every credential over, each pod's own and the shared one, with
    // the identity's one session: nothing issued, no login.
    // The identity's session and shared credential, and each single pod's own credential.
    let records = 1 + 1 + singles.len();
    let stashed = poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match scrape(&metrics, "vaultfs_keeper_stashed_sessions") {
            n if n == records as f64 => Ok(()),
            n => Err(n),
        },
    );
    assert!(
        stashed.is_ok(),
        "{records} records in the keeper: {stashed:?}"
    );
    daemon.kill();
    daemon = start();
    for (_, target, user) in singles.iter().chain(&sharers) {
        assert_eq!(
            &read_string(target.join("user")),
            user,
            "after kill -9; daemon output:\n{}",
            node.all_logs()
        );
    }
    assert_eq!(logins(&bao), 1, "no login after kill -9");
    assert_eq!(
        requests_to(&bao, CREDS_PATH),
        4,
        "nothing issued after kill -9"
    );

    // A pod's own credential goes with it; the others' stay.
    let (pod, target, user) = &singles[0];
    daemon
        .client()
        .unpublish(&pod.volume_id("secrets"), target)
        .expect("unpublish");
    dropped(&pg, user, "the unpublished pod's credential is revoked");
    for (_, _, user) in &singles[1..] {
        assert!(pg.role_exists(user), "another pod's credential is kept");
    }
    assert!(pg.role_exists(&shared_user));

    // The shared credential stays until the last pod of the identity goes.
    for (pod, target, _) in sharers.iter().chain(&singles[1..]) {
        assert!(
            pg.role_exists(&shared_user),
            "revoked before the last pod left"
        );
        daemon
            .client()
            .unpublish(&pod.volume_id("secrets"), target)
            .expect("unpublish");
    }
    for user in single_users.iter().chain([&shared_user.as_str()]) {
        dropped(&pg, user, "a credential outlived every pod");
    }
    drop(daemon);
    drop(keeper);
}
