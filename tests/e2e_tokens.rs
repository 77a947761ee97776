//! End-to-end proof that node-plugin restarts cost Vault nothing: with the keeper alive, a
//! successor `vaultfs csi` takes over every volume's Vault token from its predecessor (stashed
//! in the keeper's memory) instead of logging in again, after SIGTERM and after `kill -9`; with
//! keeper and daemon both killed, each volume logs in once more at most.
//!
//! Real `vaultfs csi` and `vaultfs keeper` binaries, real FUSE, real OpenBao with JWT logins;
//! live tokens are counted by listing the server's token accessors with the root token.
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::csi::*;
use common::jwt::SigningKey;
use common::k8s::*;
use common::*;

const VOLUMES: usize = 20;
const SECRET: &str = "secret/app/db";
const SECRETS: &str = "- {name: password, path: secret/app/db, key: password}\n";
/// How long a volume may take to show a rotated secret (cacheTTL 1 s).
const ROTATION_TIMEOUT: Duration = Duration::from_secs(15);

/// A daemon with the node's keeper socket and its own metrics port.
struct Plugin {
    daemon: CsiDaemon,
    metrics_addr: String,
}

impl Plugin {
    fn start(node: &CsiNode, bao: &Bao) -> Plugin {
        Self::start_with(node, bao, &[])
    }

    fn start_with(node: &CsiNode, bao: &Bao, args: &[&str]) -> Plugin {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let daemon = node
            .daemon(bao)
            .with_keeper(&metrics_addr)
            .args(args.iter().copied())
            .start();
        Plugin {
            daemon,
            metrics_addr,
        }
    }

    /// Waits until the keeper holds every volume's session for the next daemon.
    fn stashed_all(&self, node: &CsiNode) {
        let series = "vaultfs_keeper_stashed_sessions";
        let stashed = poll(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || match self.total(series) {
                n if n == VOLUMES as f64 => Ok(()),
                n => Err(n),
            },
        );
        if let Err(n) = stashed {
            panic!(
                "{series} is {n}, expected {VOLUMES}; daemon output:\n{}",
                node.all_logs()
            );
        }
    }

    /// The sum of every series of the counter `name` (all volumes).
    fn total(&self, name: &str) -> f64 {
        let prefix = format!("{name}{{");
        http_get(&self.metrics_addr, "/metrics")
            .lines()
            .filter(|l| l.starts_with(&prefix) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Publishes `VOLUMES` pods' volumes (cacheTTL 1 s) and reads each once.
fn publish_all(node: &CsiNode, key: &SigningKey, plugin: &Plugin) -> Vec<PathBuf> {
    (0..VOLUMES)
        .map(|i| {
            let name = format!("app-{i:02}");
            let attributes = [("cacheTTL", "1s")];
            let (_, target) = publish_app(node, key, &plugin.daemon, &name, SECRETS, &attributes);
            target.join("password")
        })
        .collect()
}

/// Waits until every volume's file reads `value`.
fn all_read(files: &[PathBuf], value: &str, what: &str, node: &CsiNode) {
    for file in files {
        if let Err(last) = wait_for_content(file, value, ROTATION_TIMEOUT) {
            panic!(
                "{what}: {} does not read the expected value ({last}); daemon output:\n{}",
                file.display(),
                node.all_logs()
            );
        }
    }
}

/// Waits until the keeper holds the node connection.
fn keeper_holds(keeper: &Keeper) {
    wait_until(
        "the keeper to hold the node connection",
        Duration::from_secs(20),
        || {
            if keeper.fuse_descriptors() >= 1 {
                Ok(())
            } else {
                Err("no /dev/fuse descriptor yet")
            }
        },
    );
}

/// `VOLUMES` volumes published and read once through a daemon whose connection the keeper
/// holds. Destructure it in field order: locals drop in reverse, so the daemon and the keeper
/// go before the node's directories and the server.
struct Served {
    bao: Bao,
    node: CsiNode,
    keeper: Keeper,
    /// The server's token accessors before the daemon started (the root token's).
    before: BTreeSet<String>,
    plugin: Plugin,
    files: Vec<PathBuf>,
}

fn serve(node_id: &str) -> Served {
    let (bao, key) = app_cluster(&[(SECRET, &[("password", "v1")])]);
    let node = CsiNode::new(node_id);
    let keeper = Keeper::start(&node.keeper_socket_path());
    let before = token_accessors(&bao);
    let plugin = Plugin::start(&node, &bao);
    let files = publish_all(&node, &key, &plugin);
    all_read(&files, "v1", "after publishing", &node);
    keeper_holds(&keeper);
    Served {
        bao,
        node,
        keeper,
        before,
        plugin,
        files,
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn restarts_with_the_keeper_alive_take_over_every_token_and_log_nothing_in() {
    let Served {
        bao,
        node,
        keeper,
        before,
        mut plugin,
        files,
    } = serve("node-tokens");
    let tokens: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
    assert_eq!(
        tokens.len(),
        VOLUMES,
        "one token per volume after publishing"
    );
    assert_eq!(plugin.total("vaultfs_vault_logins_total"), VOLUMES as f64);

    let mut value = 1;
    for stop in ["SIGTERM", "kill -9"] {
        plugin.stashed_all(&node);
        if stop == "SIGTERM" {
            let status = plugin.daemon.terminate();
            assert_eq!(status.code(), Some(0), "{}", plugin.daemon.logs());
        } else {
            plugin.daemon.kill();
        }
        plugin = Plugin::start(&node, &bao);
        all_read(
            &files,
            &format!("v{value}"),
            &format!("after {stop}"),
            &node,
        );
        value += 1;
        bao.kv_put(SECRET, &[("password", &format!("v{value}"))]);
        all_read(
            &files,
            &format!("v{value}"),
            &format!("a rotation after {stop}"),
            &node,
        );
        let now: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
        assert_eq!(
            now,
            tokens,
            "after {stop}: the same {VOLUMES} tokens are live, none added; daemon output:\n{}",
            node.all_logs()
        );
        assert_eq!(
            plugin.total("vaultfs_vault_tokens_taken_over_total"),
            VOLUMES as f64,
            "after {stop}: every volume's token taken over"
        );
        assert_eq!(
            plugin.total("vaultfs_vault_logins_total"),
            0.0,
            "after {stop}: no login"
        );
    }
    let logs = format!("{}\n{}", node.all_logs(), keeper.logs());
    if let Some(token) = find_vault_token(&logs) {
        panic!(
            "a Vault token ({}...) reached the daemon's or the keeper's logs",
            &token[..6]
        );
    }
    eprintln!(
        "tokens: {VOLUMES} volumes, SIGTERM and kill -9 restarts with the keeper alive: {} live \
         tokens before, {} after, 0 logins by the successors",
        tokens.len(),
        token_accessors(&bao).difference(&before).count()
    );
    drop(keeper);
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn with_keeper_and_daemon_both_killed_each_volume_logs_in_once_more_at_most() {
    let Served {
        bao,
        node,
        mut keeper,
        before,
        mut plugin,
        files,
    } = serve("node-tokens-both");
    plugin.stashed_all(&node);

    keeper.kill();
    plugin.daemon.kill();
    let _keeper = Keeper::start(&node.keeper_socket_path());
    let plugin = Plugin::start(&node, &bao);
    // The recovered mounts are stacked on the dead ones: a fresh lookup from here reaches them.
    all_read(&files, "v1", "after both were killed", &node);
    bao.kv_put(SECRET, &[("password", "v2")]);
    all_read(&files, "v2", "a rotation after both were killed", &node);
    let live = token_accessors(&bao).difference(&before).count();
    let logins = plugin.total("vaultfs_vault_logins_total");
    eprintln!(
        "tokens: {VOLUMES} volumes, keeper and daemon both killed: {live} live tokens after \
         (the predecessor's {VOLUMES} stay until their TTL), {logins} logins by the successor"
    );
    assert!(
        logins <= VOLUMES as f64,
        "at most one login per volume, saw {logins}"
    );
    assert!(
        live <= 2 * VOLUMES,
        "at most one extra token per volume: {live} live for {VOLUMES} volumes"
    );
    assert_eq!(plugin.total("vaultfs_vault_tokens_taken_over_total"), 0.0);
}

/// With `--share-identities`, the 20 pods of one service account are one Vault identity: one
/// login and one token for all of them; a `kill -9` restart takes that one session over (no
/// login); unpublishing pods keeps it for the others, and the last unpublish revokes it.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn shared_identities_log_in_once_per_service_account_and_restarts_log_in_not_at_all() {
    const SHARE: &[&str] = &["--share-identities"];
    let (bao, key) = app_cluster(&[(SECRET, &[("password", "v1")])]);
    let node = CsiNode::new("node-shared");
    let keeper = Keeper::start(&node.keeper_socket_path());
    let before = token_accessors(&bao);
    let mut plugin = Plugin::start_with(&node, &bao, SHARE);
    let pods: Vec<(Pod, PathBuf)> = (0..VOLUMES)
        .map(|i| {
            publish_app(
                &node,
                &key,
                &plugin.daemon,
                &format!("app-{i:02}"),
                SECRETS,
                &[("cacheTTL", "1s")],
            )
        })
        .collect();
    let files: Vec<PathBuf> = pods.iter().map(|(_, t)| t.join("password")).collect();
    all_read(&files, "v1", "after publishing", &node);
    keeper_holds(&keeper);
    let tokens: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
    assert_eq!(
        tokens.len(),
        1,
        "one token for the {VOLUMES} pods of one service account"
    );
    assert_eq!(plugin.total("vaultfs_vault_logins_total"), 1.0);

    let stashed = poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || match plugin.total("vaultfs_keeper_stashed_sessions") {
            n if n >= 1.0 => Ok(()),
            n => Err(n),
        },
    );
    assert!(
        stashed.is_ok(),
        "the shared session is stashed: {stashed:?}"
    );
    plugin.daemon.kill();
    plugin = Plugin::start_with(&node, &bao, SHARE);
    all_read(&files, "v1", "after kill -9", &node);
    bao.kv_put(SECRET, &[("password", "v2")]);
    all_read(&files, "v2", "a rotation after kill -9", &node);
    let now: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
    assert_eq!(now, tokens, "after kill -9: the same one token, none added");
    assert_eq!(
        plugin.total("vaultfs_vault_logins_total"),
        0.0,
        "after kill -9: no login; daemon output:\n{}",
        node.all_logs()
    );

    let (last, others) = pods.split_last().expect("pods");
    for (pod, target) in others {
        plugin
            .daemon
            .client()
            .unpublish(&pod.volume_id("secrets"), target)
            .expect("unpublish");
    }
    let live: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
    assert_eq!(live, tokens, "the last pod still uses the shared token");
    all_read(
        &files[VOLUMES - 1..],
        "v2",
        "the last pod after the others left",
        &node,
    );
    plugin
        .daemon
        .client()
        .unpublish(&last.0.volume_id("secrets"), &last.1)
        .expect("unpublish");
    let gone = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        let live: BTreeSet<String> = token_accessors(&bao).difference(&before).cloned().collect();
        if live.is_empty() {
            Ok(())
        } else {
            Err(live)
        }
    });
    assert!(
        gone.is_ok(),
        "the last unpublish revokes the shared token: {gone:?}"
    );
    drop(plugin);
    drop(keeper);
}
