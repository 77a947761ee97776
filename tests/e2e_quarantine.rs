//! End-to-end proof that a crash is not a loop: when `vaultfs csi` dies twice in a row with the
//! same volume's FUSE request in flight, the next daemon (which takes the connection over from
//! the keeper) quarantines that volume before it serves: its files fail with EIO at once,
//! without a Vault request, and one error line names it, while every other volume is served;
//! after the back-off (`--quarantine-backoff`) it is served again, and a repeat soon after
//! doubles the back-off. One crash, or crashes with a clean SIGTERM restart between them,
//! quarantine nothing.
//!
//! No input crashes the daemon, so the crash is simulated deterministically: OpenBao is frozen
//! so that a first read of a secret waits in the daemon, and the daemon is `kill -9`ed while
//! it waits; the kernel resends the read to the successor, which waits again, and so on.
//!
//! Real `vaultfs csi` and `vaultfs keeper`, real FUSE and bind mounts, real OpenBao with JWT
//! logins. Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them
//! with `--include-ignored`. Figures go to stderr; time is asserted only with liveness bounds.

pub mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::csi::*;
use common::jwt::SigningKey;
use common::k8s::*;
use common::reader::OnceRead;
use common::*;

const DB: &str = "secret/app/db";
const V1: &str = "s3cret-version-1";

/// Each volume's files: `password` is read at publish; `c1`..`c3` are first read by the test.
const SECRETS: &str = "- {name: password, path: secret/app/db, key: password}
- {name: c1, path: secret/app/c1, key: v}
- {name: c2, path: secret/app/c2, key: v}
- {name: c3, path: secret/app/c3, key: v}
";

/// The first back-off the daemons are started with.
const BACKOFF: Duration = Duration::from_secs(3);

/// The log line of a quarantine that starts.
const QUARANTINED: &str = "volume quarantined";

fn cold_value(name: &str) -> String {
    format!("value-of-{name}")
}

/// OpenBao with JWT logins for `ns/app`, the password and the cold secrets.
fn cluster() -> (Bao, SigningKey) {
    let (bao, key) = app_cluster(&[(DB, &[("password", V1)])]);
    for name in ["c1", "c2", "c3"] {
        bao.kv_put(&format!("secret/app/{name}"), &[("v", &cold_value(name))]);
    }
    (bao, key)
}

/// A `vaultfs csi` with the node's keeper and its own `/metrics`.
struct Plugin {
    daemon: CsiDaemon,
    metrics_addr: String,
    started: Instant,
}

impl Plugin {
    fn start(node: &CsiNode, bao: &Bao, extra: &[&str]) -> Plugin {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let started = Instant::now();
        let daemon = node
            .daemon(bao)
            .with_keeper(&metrics_addr)
            .args(extra)
            .start();
        Plugin {
            daemon,
            metrics_addr,
            started,
        }
    }

    /// A successor of a stopped daemon, checked to have taken the connections over.
    fn successor(node: &CsiNode, bao: &Bao, extra: &[&str]) -> Plugin {
        let plugin = Plugin::start(node, bao, extra);
        plugin.wait_metric("vaultfs_takeovers_total", 1.0, node, "a takeover");
        plugin
    }

    /// The value of `series` (0 when absent or unreadable).
    fn metric(&self, series: &str) -> f64 {
        scrape(&self.metrics_addr, series)
    }

    /// Waits until `series` is at least `min`; panics naming `what` otherwise.
    fn wait_metric(&self, series: &str, min: f64, node: &CsiNode, what: &str) {
        let reached = wait_metric(&self.metrics_addr, series, min, Duration::from_secs(10));
        if let Err(last) = reached {
            panic!(
                "{what}: {series} is {last}, expected at least {min}\n--- daemon output:\n{}",
                node.all_logs()
            );
        }
    }

    /// `kill -9`: a crash.
    fn crash(mut self) {
        self.daemon.kill();
    }
}

/// A published volume of pod `ns/<name>`.
struct Published {
    target: PathBuf,
    /// How the daemon names it in logs: `NAMESPACE/POD/VOLUME_ID`.
    label: String,
}

impl Published {
    fn file(&self, name: &str) -> PathBuf {
        self.target.join(name)
    }
}

/// Publishes pod `name`'s volume (cacheTTL 2 s, `attributes` besides) and reads its password.
fn publish(
    node: &CsiNode,
    key: &SigningKey,
    plugin: &Plugin,
    name: &str,
    attributes: &[(&str, &str)],
) -> Published {
    let mut attributes = attributes.to_vec();
    attributes.push(("cacheTTL", "2s"));
    let (pod, target) = publish_app(node, key, &plugin.daemon, name, SECRETS, &attributes);
    let published = Published {
        target,
        label: format!("ns/{name}/{}", pod.volume_id("secrets")),
    };
    assert_eq!(
        read_string(published.file("password")),
        V1,
        "{name}'s password"
    );
    published
}

/// A keeper, a first daemon started with `extra`, a strict volume `app-loop` (every open
/// reaches the daemon: no kernel cache hides the quarantine) and a cached volume `app-other`,
/// both connections handed to the keeper.
fn serve(
    node: &CsiNode,
    bao: &Bao,
    key: &SigningKey,
    extra: &[&str],
) -> (Keeper, Plugin, Published, Published) {
    let keeper = Keeper::start(&node.keeper_socket_path());
    let plugin = Plugin::start(node, bao, extra);
    let victim = publish(node, key, &plugin, "app-loop", &[("consistency", "strict")]);
    let other = publish(node, key, &plugin, "app-other", &[]);
    let held = poll(
        Duration::from_secs(20),
        Duration::from_millis(10),
        || match keeper.fuse_descriptors() {
            2 => Ok(()),
            n => Err(n),
        },
    );
    assert!(
        held.is_ok(),
        "the keeper holds {held:?} /dev/fuse descriptors, expected 2\n{}",
        node.all_logs()
    );
    (keeper, plugin, victim, other)
}

/// The read in flight (OpenBao frozen) waits in `plugin`: counted in flight there.
fn assert_waiting(read: &mut OnceRead, plugin: &Plugin, node: &CsiNode, what: &str) {
    plugin.wait_metric("vaultfs_fuse_requests_in_flight", 1.0, node, what);
    assert!(
        read.is_running(),
        "{what}: the read returned {:?} instead of waiting for OpenBao",
        read.result()
    );
}

/// Lines of `logs` holding every one of `words`.
fn lines_with<'a>(logs: &'a str, words: &[&str]) -> Vec<&'a str> {
    logs.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// The errno a read of `path` fails with (`None`: it succeeded).
fn read_errno(path: &Path) -> Option<i32> {
    read(path).err().map(|e| errno_of(&e))
}

/// Vault requests for the KV v2 secret `name` in OpenBao's audit log.
fn vault_reads(bao: &Bao, name: &str) -> usize {
    let path = format!("secret/data/app/{name}");
    bao.audit_entries()
        .iter()
        .filter(|e| e["type"] == "request" && e["request"]["path"] == path.as_str())
        .count()
}

/// Waits until `file` reads `expected`; returns how long that took from `since`.
fn wait_served(file: &Path, expected: &str, since: Instant, node: &CsiNode) -> Duration {
    let limit = BACKOFF * 4 + Duration::from_secs(10);
    if let Err(last) = wait_for_content(file, expected, limit) {
        panic!(
            "{} was not served again ({last})\n--- daemon output:\n{}",
            file.display(),
            node.all_logs()
        );
    }
    since.elapsed()
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn a_volume_in_flight_at_two_crashes_in_a_row_is_quarantined_while_others_are_served() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-quarantine-loop");
    let backoff = format!("{}s", BACKOFF.as_secs());
    // Long enough for reads to wait out OpenBao's pause.
    let extra = ["--vault-timeout", "60s", "--quarantine-backoff", &backoff];
    let (_keeper, mut plugin, victim, other) = serve(&node, &bao, &key, &extra);

    // Two crashes in a row with the victim's first read of c1 in flight.
    let paused = bao.paused();
    let mut stuck = OnceRead::start(&victim.file("c1"));
    assert_waiting(&mut stuck, &plugin, &node, "before the first crash");
    plugin.crash();
    plugin = Plugin::successor(&node, &bao, &extra);
    plugin.wait_metric("vaultfs_resent_requests_total", 1.0, &node, "the resend");
    assert_waiting(&mut stuck, &plugin, &node, "before the second crash");
    assert_eq!(
        plugin.metric("vaultfs_quarantined_volumes"),
        0.0,
        "one crash is not a loop"
    );
    let logs = plugin.daemon.logs();
    let warned = lines_with(&logs, &["in flight when the previous daemon died"]);
    assert!(
        warned.iter().any(|l| l.contains(&victim.label)),
        "the successor of one crash warns about the volume in flight: {warned:?}"
    );
    plugin.crash();
    plugin = Plugin::successor(&node, &bao, &extra);

    // The resent read fails at once, with OpenBao still frozen.
    let outcome = stuck.wait(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "the read in flight at both crashes is still waiting\n--- daemon output:\n{}",
            node.all_logs()
        )
    });
    let failed_after = plugin.started.elapsed();
    assert_eq!(
        outcome["errno"],
        "EIO",
        "the read in flight at both crashes: {outcome}\n{}",
        plugin.daemon.logs()
    );
    assert_eq!(plugin.metric("vaultfs_quarantined_volumes"), 1.0);
    let logs = plugin.daemon.logs();
    let named = lines_with(&logs, &[QUARANTINED]);
    assert_eq!(
        named.len(),
        1,
        "one line for the quarantine: {named:?}\n{logs}"
    );
    assert!(
        named[0].contains(&victim.label) && named[0].contains("ERROR"),
        "the quarantine's line is an error naming {}: {}",
        victim.label,
        named[0]
    );
    assert!(!named[0].contains(&other.label));
    let quarantine_line = named[0].to_string();

    // Everything else is served by this daemon; the victim stays fenced off with Vault back.
    drop(paused);
    let started = Instant::now();
    assert_eq!(read_string(other.file("c2")), cold_value("c2"));
    let other_read = started.elapsed();
    assert_eq!(read_string(other.file("password")), V1);
    let before = vault_reads(&bao, "c3");
    let lines_before = lines_with(&plugin.daemon.logs(), &[&victim.label]).len();
    assert!(
        metadata(&victim.target).is_ok_and(|m| m.is_dir()),
        "the quarantined volume's root still answers stat (mount checks)"
    );
    for name in ["password", "c3"] {
        assert_eq!(
            read_errno(&victim.file(name)),
            Some(libc::EIO),
            "the quarantined volume's {name}"
        );
    }
    let listed = std::fs::read_dir(&victim.target).and_then(|mut d| d.next().transpose());
    assert_eq!(
        listed.err().and_then(|e| e.raw_os_error()),
        Some(libc::EIO),
        "listing the quarantined volume"
    );
    assert_eq!(
        vault_reads(&bao, "c3"),
        before,
        "a quarantined volume sends nothing to Vault"
    );
    assert_eq!(
        lines_with(&plugin.daemon.logs(), &[&victim.label]).len(),
        lines_before,
        "failed reads of a quarantined volume log nothing more"
    );

    // After the back-off it is served again.
    let back_after = wait_served(&victim.file("password"), V1, plugin.started, &node);
    assert_eq!(read_string(victim.file("c3")), cold_value("c3"));
    let lifted = poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || match plugin.metric("vaultfs_quarantined_volumes") {
            0.0 => Ok(()),
            v => Err(v),
        },
    );
    assert_eq!(lifted, Ok(()), "vaultfs_quarantined_volumes after the lift");
    let logs = plugin.daemon.logs();
    let over = lines_with(&logs, &["quarantine over", &victim.label]);
    assert_eq!(over.len(), 1, "one line for the end: {over:?}");
    eprintln!(
        "quarantine: after 2 crashes with a read in flight, the resent read failed EIO {} ms after \
         the third daemon's spawn; another volume's cold read took {} ms; the volume was served \
         again {} ms after the spawn (back-off {} ms); logged once: {}",
        failed_after.as_millis(),
        other_read.as_millis(),
        back_after.as_millis(),
        BACKOFF.as_millis(),
        quarantine_line.trim()
    );

    // A repeat soon after: one crash suffices, and the back-off doubles.
    let paused = bao.paused();
    let mut stuck = OnceRead::start(&victim.file("c2"));
    assert_waiting(&mut stuck, &plugin, &node, "before the repeat");
    plugin.crash();
    plugin = Plugin::successor(&node, &bao, &extra);
    let outcome = stuck.wait(Duration::from_secs(10));
    assert_eq!(
        outcome.as_ref().map(|o| o["errno"].clone()),
        Some("EIO".into()),
        "the read in flight at the repeat: {outcome:?}\n{}",
        plugin.daemon.logs()
    );
    let logs = plugin.daemon.logs();
    let named = lines_with(&logs, &[QUARANTINED, &victim.label]);
    let doubled = format!("backoff={}s", BACKOFF.as_secs() * 2);
    assert!(
        named.len() == 1 && named[0].contains(&doubled),
        "one quarantine line with {doubled}: {named:?}\n{logs}"
    );
    drop(paused);
    let back_after = wait_served(&victim.file("c2"), &cold_value("c2"), plugin.started, &node);
    eprintln!(
        "quarantine: a repeat within the memory of the first: quarantined at one crash for {} ms, \
         served again {} ms after the daemon's spawn",
        BACKOFF.as_millis() * 2,
        back_after.as_millis()
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn one_crash_or_crashes_with_a_clean_restart_between_them_quarantine_nothing() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-quarantine-none");
    // The SIGTERM leaves the read to its successor after a 1 s drain.
    let extra = [
        "--vault-timeout",
        "60s",
        "--drain-timeout",
        "1s",
        "--quarantine-backoff",
        "3s",
    ];
    let (_keeper, mut plugin, victim, other) = serve(&node, &bao, &key, &extra);

    let paused = bao.paused();
    let mut stuck = OnceRead::start(&victim.file("c1"));
    assert_waiting(&mut stuck, &plugin, &node, "before the crash");
    plugin.crash();
    plugin = Plugin::successor(&node, &bao, &extra);
    assert_waiting(&mut stuck, &plugin, &node, "before the SIGTERM");
    let status = plugin.daemon.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM: {}", plugin.daemon.logs());
    plugin = Plugin::successor(&node, &bao, &extra);
    assert_waiting(&mut stuck, &plugin, &node, "before the last crash");
    plugin.crash();
    plugin = Plugin::successor(&node, &bao, &extra);
    drop(paused);

    let outcome = stuck.wait(Duration::from_secs(30));
    assert!(
        outcome
            .as_ref()
            .is_some_and(|o| o["ok"] == true && o["content"] == cold_value("c1").as_str()),
        "the read in flight across crash, SIGTERM and crash is answered: {outcome:?}\n{}",
        node.all_logs()
    );
    assert_eq!(plugin.metric("vaultfs_quarantined_volumes"), 0.0);
    assert_eq!(read_string(victim.file("password")), V1);
    assert_eq!(read_string(other.file("password")), V1);
    let logs = node.all_logs();
    assert!(
        lines_with(&logs, &[QUARANTINED]).is_empty(),
        "nothing quarantined:\n{logs}"
    );
    eprintln!(
        "quarantine: a read in flight across kill -9, SIGTERM (drain left it) and kill -9 was \
         answered {} ms after it started; nothing quarantined",
        outcome.map_or_else(|| "-".to_string(), |o| o["ms"].to_string())
    );
}
