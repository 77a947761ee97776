//! End-to-end proof that pods' reads survive node-plugin restarts: `vaultfs csi` hands its
//! node-wide FUSE connection to `vaultfs keeper`, and a restarted daemon takes it back and
//! serves it at once, so no read fails across `kill -9`, SIGTERM (an upgrade) or a keeper
//! restart, and a read in flight when the daemon stops (killed, or still waiting on OpenBao
//! when the SIGTERM drain ends) is answered by the successor. Without the keeper (both
//! killed), the old recovery still brings the volume back for containers with
//! `HostToContainer` propagation.
//!
//! The readers stand in for containers *without* `HostToContainer`: each runs in its own mount
//! namespace with private propagation (`tests/common/restart_reader.py` under `unshare`), so
//! only the original mount, kept alive, can serve it; a mount stacked on a dead one never
//! reaches it. One reads the volume's file, one a `subPath` bind of it; each both opens, reads
//! and closes the file every 5 ms and `pread`s a descriptor held open from the start.
//!
//! Real `vaultfs csi` and `vaultfs keeper` binaries, real FUSE and bind mounts, real OpenBao
//! with JWT logins. Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh`
//! runs them with `--include-ignored`. Figures (reads, failures, longest read, time from a
//! daemon's start to the first read it served) go to stderr; only generous liveness bounds
//! are asserted about time.

pub mod common;

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::csi::*;
use common::jwt::SigningKey;
use common::k8s::*;
use common::reader::{OnceRead, Reader, Summary};
use common::*;

/// The secret read by the readers, and its versions: same length, so that no size cached by
/// the kernel can cut one short.
const DB: &str = "secret/app/db";
const V1: &str = "s3cret-version-1";
const V2: &str = "s3cret-version-2";
const V3: &str = "s3cret-version-3";
const ALL_VERSIONS: &[&str] = &[V1, V2, V3];

/// A secret nobody reads until the in-flight check.
const COLD_PATH: &str = "secret/app/cold";
const COLD: &str = "cold-value";

const SECRETS: &str = "- {name: password, path: secret/app/db, key: password}
- {name: cold, path: secret/app/cold, key: v}
";

/// Restarts per loop.
const RESTARTS: usize = 10;
/// How long the readers read between restarts.
const BETWEEN_RESTARTS: Duration = Duration::from_millis(300);
/// How long the daemon stays dead after `kill -9`.
const DEAD_FOR: Duration = Duration::from_millis(500);
/// How long a daemon may take to hand its connection to a (new) keeper.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long readers may take to see a rotated secret (cacheTTL 2 s, kernel TTL 1 s).
const ROTATION_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

/// OpenBao with JWT logins for `ns/app` and the two secrets at their first versions.
fn cluster() -> (Bao, SigningKey) {
    app_cluster(&[(DB, &[("password", V1)]), (COLD_PATH, &[("v", COLD)])])
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A `vaultfs csi` with `--keeper-socket` (the node's keeper socket, whether a keeper listens
/// there or not) and its own `--metrics-addr`.
struct Plugin {
    daemon: CsiDaemon,
    metrics_addr: String,
    /// When it was spawned, in seconds since the Unix epoch.
    spawned_at: f64,
    /// From the spawn to its first answer to `Probe`.
    probe_after: Duration,
}

impl Plugin {
    fn start(node: &CsiNode, bao: &Bao, extra: &[&str]) -> Plugin {
        Plugin::spawn(node, bao, extra, false)
    }

    /// Starts the daemon in a mount namespace of its own, as in a container of its own.
    fn start_in_container(node: &CsiNode, bao: &Bao, extra: &[&str]) -> Plugin {
        Plugin::spawn(node, bao, extra, true)
    }

    fn spawn(node: &CsiNode, bao: &Bao, extra: &[&str], container: bool) -> Plugin {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let spawned_at = unix_now();
        let started = Instant::now();
        let mut builder = node.daemon(bao).with_keeper(&metrics_addr).args(extra);
        if container {
            builder = builder.in_own_mount_namespace();
        }
        let daemon = builder.start();
        Plugin {
            daemon,
            metrics_addr,
            spawned_at,
            probe_after: started.elapsed(),
        }
    }

    /// Starts a daemon after a stopped one and checks that it took the connection over from
    /// `keeper`.
    fn successor(node: &CsiNode, bao: &Bao, extra: &[&str], keeper: &Keeper) -> Plugin {
        let plugin = Plugin::start(node, bao, extra);
        assert_took_over(&plugin, node, keeper);
        plugin
    }

    /// Stops the daemon `how`: after `kill -9` waits [`DEAD_FOR`]; after SIGTERM checks that
    /// it exited 0 (`what` names the stop in the message).
    fn stop(&mut self, how: Stop, what: &str) {
        match how {
            Stop::Kill => {
                self.daemon.kill();
                sleep(DEAD_FOR);
            }
            Stop::Term => {
                let status = self.daemon.terminate();
                assert_eq!(
                    status.code(),
                    Some(0),
                    "{what}: vaultfs csi exited with {}; its output:\n{}",
                    describe_status(&status),
                    self.daemon.logs()
                );
            }
        }
    }

    /// The value of `series` (0 when absent or when the metrics cannot be read).
    fn metric(&self, series: &str) -> f64 {
        scrape(&self.metrics_addr, series)
    }

    /// Waits up to `limit` until `series` is at least `min`; returns its last value.
    fn wait_metric(&self, series: &str, min: f64, limit: Duration) -> Result<f64, f64> {
        wait_metric(&self.metrics_addr, series, min, limit)
    }
}

/// A pod's published volume.
struct Published {
    pod: Pod,
    target: PathBuf,
}

impl Published {
    fn file(&self) -> PathBuf {
        self.target.join("password")
    }
}

/// Publishes the pod's volume (cacheTTL 2 s) through `plugin` and reads it once.
fn publish(node: &CsiNode, key: &SigningKey, plugin: &Plugin) -> Published {
    publish_as(node, key, plugin, "app-restart", &[])
}

/// Publishes the volume of pod `name` with `attributes` besides `cacheTTL: 2s`.
fn publish_as(
    node: &CsiNode,
    key: &SigningKey,
    plugin: &Plugin,
    name: &str,
    attributes: &[(&str, &str)],
) -> Published {
    let mut attributes = attributes.to_vec();
    attributes.push(("cacheTTL", "2s"));
    let (pod, target) = publish_app(node, key, &plugin.daemon, name, SECRETS, &attributes);
    let published = Published { pod, target };
    assert_eq!(
        read_string(published.file()),
        V1,
        "the published volume's file"
    );
    published
}

/// A reader of the volume's file, and a reader of a `subPath` bind of it, each in its own
/// private mount namespace.
fn start_readers(node: &CsiNode, volume: &Published, allowed: &[&str]) -> Vec<Reader> {
    let in_volume = Reader::start("volume", &volume.file(), allowed);
    let bind = node.sub_path(&volume.pod, "secrets", "app", 0, &volume.file());
    let sub_path = Reader::start("subPath", &bind, allowed);
    vec![in_volume, sub_path]
}

fn stop_readers(readers: &mut [Reader]) -> Vec<Summary> {
    readers.iter_mut().map(Reader::stop).collect()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines]\n"));
    }
    out.push_str(&lines[skip..].join("\n"));
    out
}

/// Readers' summaries, the keeper's output and the daemons' output, for assertion messages.
fn diagnostics(summaries: &[Summary], node: &CsiNode, keeper: Option<&Keeper>) -> String {
    let mut out = String::from("--- readers:\n");
    for s in summaries {
        out.push_str(&format!("{s}\n"));
    }
    if let Some(k) = keeper {
        out.push_str(&format!("--- keeper output:\n{}\n", tail(&k.logs(), 100)));
    }
    out.push_str(&format!(
        "--- daemon output (every daemon, in start order):\n{}",
        tail(&node.all_logs(), 400)
    ));
    out
}

/// Panics with everything the readers saw and the logs unless no read failed (no error, no
/// ENOTCONN, no content other than the allowed ones) and none is stuck.
fn assert_no_failed_read(what: &str, summaries: &[Summary], node: &CsiNode, keeper: &Keeper) {
    let failed: Vec<String> = summaries
        .iter()
        .filter(|s| s.failures() > 0 || !s.hung().is_empty() || !s.reader_errors().is_empty())
        .map(|s| {
            format!(
                "{}: {} failed reads ({} ENOTCONN), stuck: {:?}, reader errors: {:?}",
                s.name,
                s.failures(),
                s.enotconn(),
                s.hung(),
                s.reader_errors()
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: reads failed: {}\n{}",
        failed.join("; "),
        diagnostics(summaries, node, Some(keeper))
    );
    assert!(
        summaries.iter().all(|s| s.reads() > 0),
        "{what}: a reader never read\n{}",
        diagnostics(summaries, node, Some(keeper))
    );
}

/// For each daemon start (seconds since the epoch), how long after it the first read waiting
/// across it was answered, in ms: the earliest end of a slow read that spans the start.
fn served_after_start(summaries: &[Summary], starts: &[f64]) -> Vec<Option<f64>> {
    let slow: Vec<(f64, f64)> = summaries.iter().flat_map(Summary::slow_reads).collect();
    starts
        .iter()
        .map(|&s| {
            slow.iter()
                .filter(|(begin, end)| *begin < s && s < *end)
                .map(|(_, end)| (end - s) * 1000.0)
                .reduce(f64::min)
        })
        .collect()
}

/// Prints the figures of a restart loop: reads, failures, longest read, time from each
/// daemon's start to the first read it served, and to its first `Probe` answer.
fn report(label: &str, summaries: &[Summary], plugins: &[(f64, Duration)]) {
    let reads: u64 = summaries.iter().map(Summary::reads).sum();
    let failed: u64 = summaries.iter().map(Summary::failures).sum();
    let longest = summaries
        .iter()
        .map(Summary::longest_ms)
        .fold(0.0, f64::max);
    eprintln!("restart: {label}, {reads} reads, {failed} failed, longest read {longest:.1} ms");
    for s in summaries {
        eprintln!("restart:   {}", s.brief());
    }
    let starts: Vec<f64> = plugins.iter().map(|(at, _)| *at).collect();
    let served = served_after_start(summaries, &starts);
    let mut known: Vec<f64> = served.iter().flatten().copied().collect();
    known.sort_by(f64::total_cmp);
    let shown: Vec<String> = served
        .iter()
        .map(|v| v.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}")))
        .collect();
    if let Some(max) = known.last() {
        eprintln!(
            "restart:   daemon start to first served read: median {:.1} ms, max {max:.1} ms \
             (per restart, ms: {})",
            known[known.len() / 2],
            shown.join(", ")
        );
    }
    let probes: Vec<String> = plugins
        .iter()
        .map(|(_, p)| format!("{}", p.as_millis()))
        .collect();
    eprintln!(
        "restart:   daemon start to first Probe answer (ms): {}",
        probes.join(", ")
    );
}

/// Waits until `keeper` holds a FUSE connection handed to it by the daemon; returns how long
/// that took.
fn wait_until_keeper_holds(keeper: &Keeper, node: &CsiNode, what: &str) -> Duration {
    let started = Instant::now();
    let held = poll(HAND_OVER_TIMEOUT, Duration::from_millis(10), || {
        if keeper.fuse_descriptors() >= 1 {
            Ok(())
        } else {
            Err(())
        }
    });
    if held.is_err() {
        panic!(
            "{what}: the keeper (pid {}) holds no /dev/fuse descriptor after {HAND_OVER_TIMEOUT:?}: \
             the daemon did not hand it the connection\n--- keeper output:\n{}\n--- daemon output:\n{}",
            keeper.pid(),
            keeper.logs(),
            tail(&node.all_logs(), 200)
        );
    }
    started.elapsed()
}

/// The common start of a test: a keeper on the node's socket, a daemon (with `extra`
/// arguments) and the pod's volume published through it; returns once the daemon has handed
/// the connection to the keeper. Declare the node before (it outlives what this returns).
fn serve_with_keeper(
    node: &CsiNode,
    bao: &Bao,
    key: &SigningKey,
    extra: &[&str],
) -> (Keeper, Plugin, Published) {
    let keeper = Keeper::start(&node.keeper_socket_path());
    let plugin = Plugin::start(node, bao, extra);
    let volume = publish(node, key, &plugin);
    wait_until_keeper_holds(&keeper, node, "after the first publish");
    (keeper, plugin, volume)
}

/// Stops and replaces the daemon `times` times (`how`), each successor taking over from
/// `keeper`; returns each successor's spawn time and time to its first Probe answer.
fn restart(
    plugin: &mut Plugin,
    how: Stop,
    times: usize,
    node: &CsiNode,
    bao: &Bao,
    keeper: &Keeper,
) -> Vec<(f64, Duration)> {
    let mut plugins = Vec::new();
    for i in 1..=times {
        sleep(BETWEEN_RESTARTS);
        plugin.stop(how, &format!("stop {i} ({how:?})"));
        *plugin = Plugin::successor(node, bao, &[], keeper);
        plugins.push((plugin.spawned_at, plugin.probe_after));
    }
    plugins
}

/// Checks that a restarted daemon took the live connection over from the keeper (rather than
/// mounting new ones over dead mounts, which the readers would never see).
fn assert_took_over(plugin: &Plugin, node: &CsiNode, keeper: &Keeper) {
    if let Err(last) = plugin.wait_metric("vaultfs_takeovers_total", 1.0, Duration::from_secs(10)) {
        panic!(
            "the restarted daemon reports vaultfs_takeovers_total {last}: it did not take the \
             connection over from the keeper\n--- keeper output:\n{}\n--- daemon output:\n{}",
            tail(&keeper.logs(), 100),
            tail(&node.all_logs(), 300)
        );
    }
}

/// How a daemon is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// `kill -9` (a crash, an OOM kill), then [`DEAD_FOR`] without a daemon.
    Kill,
    /// SIGTERM (an upgrade): it must exit 0; the successor starts at once.
    Term,
}

/// A request in flight when the daemon stops: OpenBao frozen, a first read of `cold` (from a
/// private mount namespace) waits in the daemon for it; the daemon is stopped `how`; its
/// successor gets the request again (FUSE_NOTIFY_RESEND) and answers it with the right bytes
/// once OpenBao is back. Panics with the outcome and the logs otherwise.
fn read_in_flight_is_answered_by_the_successor(
    how: Stop,
    bao: &Bao,
    node: &CsiNode,
    keeper: &Keeper,
    mut plugin: Plugin,
    volume: &Published,
    extra: &[&str],
) {
    let paused = bao.paused();
    let mut cold = OnceRead::start(&volume.target.join("cold"));
    let in_flight = plugin.wait_metric(
        "vaultfs_fuse_requests_in_flight",
        1.0,
        Duration::from_secs(10),
    );
    assert!(
        in_flight.is_ok() && cold.is_running(),
        "the first read of `cold` is not waiting in the daemon with OpenBao frozen \
         (vaultfs_fuse_requests_in_flight {in_flight:?}, read outcome {:?}, reader output {:?})\n\
         --- daemon output:\n{}",
        cold.result(),
        cold.stderr(),
        tail(&plugin.daemon.logs(), 100)
    );
    sleep(Duration::from_millis(100));
    plugin.stop(how, "SIGTERM with a request in flight");
    assert!(
        cold.is_running(),
        "{how:?}: the read in flight returned {} when its daemon stopped, instead of waiting for \
         the successor\n--- the stopped daemon's output:\n{}",
        cold.result()
            .map_or_else(|| "nothing".to_string(), |r| r.to_string()),
        tail(&plugin.daemon.logs(), 100)
    );
    plugin = Plugin::successor(node, bao, extra, keeper);
    let resent_before_resume = plugin
        .wait_metric("vaultfs_resent_requests_total", 1.0, Duration::from_secs(5))
        .unwrap_or_else(|v| v);
    assert!(
        cold.is_running(),
        "{how:?}: the read in flight returned before OpenBao was resumed: {:?}",
        cold.result()
    );
    let resumed_at = Instant::now();
    drop(paused);
    let outcome = cold.wait(Duration::from_secs(30));
    let resent = plugin.metric("vaultfs_resent_requests_total");
    let unserved = plugin.metric("vaultfs_takeover_unserved_seconds");
    eprintln!(
        "restart: read in flight across {how:?}: {}; answered {} ms after OpenBao resumed; \
         vaultfs_resent_requests_total {resent} ({resent_before_resume} before the resume), \
         vaultfs_takeover_unserved_seconds {unserved}",
        outcome
            .as_ref()
            .map_or_else(|| "no answer".to_string(), |o| o.to_string()),
        resumed_at.elapsed().as_millis()
    );
    let outcome = outcome.unwrap_or_else(|| {
        panic!(
            "{how:?}: the read in flight when the daemon stopped never returned (30 s after \
             OpenBao resumed): the successor did not answer it\n--- keeper output:\n{}\n--- \
             daemon output:\n{}",
            tail(&keeper.logs(), 100),
            tail(&node.all_logs(), 300)
        )
    });
    assert!(
        outcome["ok"] == true && outcome["content"] == COLD,
        "{how:?}: the read in flight when the daemon stopped returned {outcome} (expected \
         {COLD:?})\n--- daemon output:\n{}",
        tail(&node.all_logs(), 300)
    );
    assert!(
        resent >= 1.0,
        "{how:?}: the read in flight was answered, but the successor reports \
         vaultfs_resent_requests_total {resent}\n--- daemon output:\n{}",
        tail(&plugin.daemon.logs(), 100)
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn kill_9_restarts_with_the_keeper_fail_no_read_and_a_request_in_flight_is_answered_by_the_successor(
) {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-kill");
    // Long enough for the in-flight read below to wait out OpenBao's pause.
    let extra = ["--vault-timeout", "20s"];
    let (keeper, mut plugin, volume) = serve_with_keeper(&node, &bao, &key, &extra);
    let mut readers = start_readers(&node, &volume, ALL_VERSIONS);

    let mut plugins = Vec::new();
    for i in 1..=RESTARTS {
        sleep(BETWEEN_RESTARTS);
        plugin.stop(Stop::Kill, "kill -9");
        if i == RESTARTS / 2 {
            // Rotated while no daemon runs: the next one must serve the new version.
            bao.kv_put(DB, &[("password", V2)]);
        }
        plugin = Plugin::successor(&node, &bao, &extra, &keeper);
        plugins.push((plugin.spawned_at, plugin.probe_after));
    }
    sleep(BETWEEN_RESTARTS);
    // Rotated after the restarts: the last daemon serves it once the cache TTL has passed.
    bao.kv_put(DB, &[("password", V3)]);
    let rotated = poll(ROTATION_TIMEOUT, Duration::from_millis(50), || {
        if readers.iter().all(|r| r.has_seen(V3)) {
            Ok(())
        } else {
            Err(())
        }
    });
    let summaries = stop_readers(&mut readers);
    report(
        &format!(
            "{RESTARTS} kill -9 restarts (dead {} ms each)",
            DEAD_FOR.as_millis()
        ),
        &summaries,
        &plugins,
    );
    assert_no_failed_read("across kill -9 restarts", &summaries, &node, &keeper);
    for version in [V1, V2] {
        assert!(
            summaries.iter().all(|s| s.all_saw(version)),
            "not every reader read {version:?} (rotated while a daemon was dead)\n{}",
            diagnostics(&summaries, &node, Some(&keeper))
        );
    }
    assert!(
        rotated.is_ok(),
        "not every reader read {V3:?} within {ROTATION_TIMEOUT:?} of its rotation after the \
         restarts\n{}",
        diagnostics(&summaries, &node, Some(&keeper))
    );

    // A request in flight when the daemon dies is answered by its successor.
    read_in_flight_is_answered_by_the_successor(
        Stop::Kill,
        &bao,
        &node,
        &keeper,
        plugin,
        &volume,
        &extra,
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn sigterm_restarts_like_an_upgrade_fail_no_read_and_each_daemon_exits_0() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-term");
    let (keeper, mut plugin, volume) = serve_with_keeper(&node, &bao, &key, &[]);
    let mut readers = start_readers(&node, &volume, &[V1]);

    let plugins = restart(&mut plugin, Stop::Term, RESTARTS, &node, &bao, &keeper);
    sleep(BETWEEN_RESTARTS);
    let summaries = stop_readers(&mut readers);
    report(
        &format!("{RESTARTS} SIGTERM restarts"),
        &summaries,
        &plugins,
    );
    assert_no_failed_read("across SIGTERM restarts", &summaries, &node, &keeper);
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn sigterm_with_a_read_outlasting_the_drain_leaves_it_to_the_successor() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-drain");
    // An upgrade while OpenBao is slow: the read waits longer than the drain.
    let extra = ["--vault-timeout", "20s", "--drain-timeout", "1s"];
    let (keeper, plugin, volume) = serve_with_keeper(&node, &bao, &key, &extra);
    read_in_flight_is_answered_by_the_successor(
        Stop::Term,
        &bao,
        &node,
        &keeper,
        plugin,
        &volume,
        &extra,
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn a_restarted_keeper_gets_the_connection_again_and_a_later_daemon_kill_loses_nothing() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-keeper");
    let (mut keeper, mut plugin, volume) = serve_with_keeper(&node, &bao, &key, &[]);
    let mut readers = start_readers(&node, &volume, &[V1]);

    // The keeper dies while the daemon serves: nothing a reader notices.
    sleep(BETWEEN_RESTARTS);
    keeper.kill();
    sleep(BETWEEN_RESTARTS);
    keeper = Keeper::start(&node.keeper_socket_path());
    let handed_in = wait_until_keeper_holds(&keeper, &node, "after the keeper's restart");
    eprintln!(
        "restart: keeper restarted; the running daemon handed it the connection {} ms after it \
         listened",
        handed_in.as_millis()
    );

    // The new keeper carries the connection across daemon crashes.
    let plugins = restart(&mut plugin, Stop::Kill, 3, &node, &bao, &keeper);
    sleep(BETWEEN_RESTARTS);
    let summaries = stop_readers(&mut readers);
    report(
        "keeper kill -9 + restart, then 3 daemon kill -9 restarts",
        &summaries,
        &plugins,
    );
    assert_no_failed_read(
        "across a keeper restart and daemon kill -9 restarts",
        &summaries,
        &node,
        &keeper,
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn with_keeper_and_daemon_both_killed_a_host_to_container_reader_gets_the_volume_back() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-both");
    node.share_pods_dir();
    let (mut keeper, mut plugin, volume) = serve_with_keeper(&node, &bao, &key, &[]);
    let view = node.container_view(&volume.target, "app");
    let in_container = view.join("password");
    assert_eq!(read_string(&in_container), V1);
    // Checks the instrument: a reader without HostToContainer cannot be served once the
    // connection is gone, and must say so.
    let mut private = Reader::start("private", &volume.file(), &[V1]);

    keeper.kill();
    plugin.daemon.kill();
    // The volume is `cached`: its pages outlive the connection until the 2 s attribute timeout.
    if let Err(e) = wait_for_errno(&in_container, libc::ENOTCONN, Duration::from_secs(4)) {
        panic!("reading in the container with keeper and daemon dead: {e}");
    }

    let started = Instant::now();
    plugin = Plugin::start(&node, &bao, &[]);
    let back = poll(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || match read(&in_container) {
            Ok(bytes) if bytes == V1.as_bytes() => Ok(()),
            Ok(bytes) => Err(format!("read {} other bytes", bytes.len())),
            Err(e) => Err(e.to_string()),
        },
    );
    if let Err(last) = back {
        panic!(
            "the HostToContainer container did not see the recovered volume ({last}); mounts at \
             the target: {:?}, at the container's view: {:?}; daemon output:\n{}",
            mounts_at(&volume.target),
            mounts_at(&view),
            tail(&node.all_logs(), 300)
        );
    }
    let recovered_in = started.elapsed();
    sleep(BETWEEN_RESTARTS);
    let summary = private.stop();
    eprintln!(
        "restart: keeper and daemon killed: the HostToContainer container read the volume again \
         {} ms after the daemon's start (which first waits --keeper-wait, 5 s by default, for a \
         keeper to answer); vaultfs_takeovers_total {}; the private-namespace reader (no \
         HostToContainer): {}",
        recovered_in.as_millis(),
        plugin.metric("vaultfs_takeovers_total"),
        summary.brief()
    );
    assert!(
        summary.enotconn() > 0,
        "the reader in a private namespace saw no ENOTCONN with keeper and daemon dead: the \
         readers cannot tell a lost connection from a kept one\n{summary}"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn strict_and_cached_volumes_live_on_two_connections_and_both_survive_daemon_kills() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-modes");
    let keeper = Keeper::start(&node.keeper_socket_path());
    let mut plugin = Plugin::start(&node, &bao, &[]);
    let strict = publish_as(
        &node,
        &key,
        &plugin,
        "app-strict",
        &[("consistency", "strict")],
    );
    // No attribute: `cached` is the default.
    let cached = publish(&node, &key, &plugin);
    // One connection per consistency mode, both handed to the keeper.
    let both = poll(
        HAND_OVER_TIMEOUT,
        Duration::from_millis(10),
        || match keeper.fuse_descriptors() {
            2 => Ok(()),
            n => Err(n),
        },
    );
    assert!(
        both.is_ok(),
        "the keeper holds {both:?} /dev/fuse descriptors; expected 2 (strict and cached \
         connections)\n--- daemon output:\n{}",
        tail(&node.all_logs(), 200)
    );
    let mut readers = start_readers(&node, &strict, &[V1]);
    readers.extend(start_readers(&node, &cached, &[V1]));

    let plugins = restart(&mut plugin, Stop::Kill, 3, &node, &bao, &keeper);
    sleep(BETWEEN_RESTARTS);
    let summaries = stop_readers(&mut readers);
    report(
        "strict and cached volumes, 3 daemon kill -9 restarts",
        &summaries,
        &plugins,
    );
    assert_no_failed_read(
        "strict and cached volumes across daemon kill -9 restarts",
        &summaries,
        &node,
        &keeper,
    );
    assert_eq!(
        plugin.metric("vaultfs_takeovers_total"),
        2.0,
        "the last daemon took over both connections"
    );
}

/// Restarts as Kubernetes makes them, each daemon in a container (mount namespace) of its own,
/// with `--connections-dir` shared with the host like the manifests' Bidirectional hostPath:
/// after every takeover (kill -9, SIGTERM, chained) a new pod's volume publishes and reads,
/// earlier volumes keep reading without a failed read, and /healthz stays healthy; after
/// keeper and daemon die together, the next daemon replaces the dead connection's mount
/// instead of stacking on it.
#[test]
#[ignore = "needs root, /dev/fuse, unshare and bao (VAULTFS_TEST_BAO)"]
fn daemons_in_containers_of_their_own_publish_new_volumes_after_every_takeover() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-containers");
    node.share_pods_dir();
    node.share_connections_dir();
    let connections = node.connections_dir().display().to_string();
    let extra = ["--connections-dir", connections.as_str()];
    let mut keeper = Keeper::start(&node.keeper_socket_path());
    let mut plugin = Plugin::start_in_container(&node, &bao, &extra);
    let first = publish_as(&node, &key, &plugin, "app-first", &[]);
    wait_until_keeper_holds(&keeper, &node, "after the first publish");
    // Created 0755 (as kubelet creates a hostPath): the daemon keeps it to itself.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(node.connections_dir())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o7777, 0o700, "mode of --connections-dir");
    let mut readers = start_readers(&node, &first, &[V1]);
    let mut published = vec![first];

    for (i, how) in [Stop::Kill, Stop::Term, Stop::Kill, Stop::Term]
        .into_iter()
        .enumerate()
    {
        let what = format!("restart {} ({how:?})", i + 1);
        sleep(BETWEEN_RESTARTS);
        plugin.stop(how, &what);
        plugin = Plugin::start_in_container(&node, &bao, &extra);
        assert_took_over(&plugin, &node, &keeper);
        let started = Instant::now();
        let new = publish_as(&node, &key, &plugin, &format!("app-after-{}", i + 1), &[]);
        eprintln!(
            "restart: {what} in containers of their own: a new pod's volume published and read \
             {} ms after its publish started",
            started.elapsed().as_millis()
        );
        for volume in &published {
            assert_eq!(
                read_string(volume.file()),
                V1,
                "{what}: a volume published before"
            );
        }
        published.push(new);
        assert_healthy(&plugin, &node, &what);
    }
    sleep(BETWEEN_RESTARTS);
    let summaries = stop_readers(&mut readers);
    report(
        "kill -9 and SIGTERM restarts, each daemon in its own mount namespace",
        &summaries,
        &[],
    );
    assert_no_failed_read(
        "across restarts in containers of their own",
        &summaries,
        &node,
        &keeper,
    );

    // Keeper and daemon die together: the connection is gone; the next daemon mounts a new one
    // in place of the dead mount, which the shared directory kept.
    keeper.kill();
    plugin.daemon.kill();
    sleep(DEAD_FOR);
    keeper = Keeper::start(&node.keeper_socket_path());
    plugin = Plugin::start_in_container(&node, &bao, &extra);
    published.push(publish_as(&node, &key, &plugin, "app-after-both", &[]));
    // The volumes are `cached` (the default): their connection's mount.
    let root = node.connections_dir().join("fuse-cached");
    let stacked = mounts_at(&root);
    assert_eq!(
        stacked.len(),
        1,
        "one mount of the node connection at {}, not the dead ones under it: {stacked:?}",
        root.display()
    );
    wait_until_keeper_holds(&keeper, &node, "after keeper and daemon died together");

    // Every pod gone (as before an uninstall): the daemon stops with no volume and leaves
    // neither a mount in the shared directory nor a connection in the keeper.
    for volume in &published {
        let id = volume.pod.volume_id("secrets");
        if let Err(s) = plugin.daemon.client().unpublish(&id, &volume.target) {
            panic!("unpublish {}: {}", volume.target.display(), describe(&s));
        }
    }
    plugin.stop(Stop::Term, "SIGTERM with no volume");
    let left = mounts_at(&root);
    assert!(
        left.is_empty(),
        "mounts left at {}: {left:?}",
        root.display()
    );
    let released = poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || match keeper.fuse_descriptors() {
            0 => Ok(()),
            n => Err(n),
        },
    );
    assert_eq!(
        released,
        Ok(()),
        "the keeper still holds /dev/fuse descriptors after the last daemon stopped with no volume"
    );
}

/// The production failure this layout prevents, reproduced: the connection's mount made in the
/// first daemon's namespace only (the default, under the state directory) dies with it. The
/// successor still serves every existing volume, but says it cannot publish: a publish fails
/// `Unavailable` naming `--connections-dir` (before any Vault login), and /healthz answers 503
/// with the reason.
#[test]
#[ignore = "needs root, /dev/fuse, unshare and bao (VAULTFS_TEST_BAO)"]
fn a_successor_that_cannot_reach_the_taken_over_connection_says_so_in_publish_and_healthz() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-restart-unshared");
    node.share_pods_dir();
    let keeper = Keeper::start(&node.keeper_socket_path());
    let mut plugin = Plugin::start_in_container(&node, &bao, &[]);
    let first = publish_as(&node, &key, &plugin, "app-first", &[]);
    wait_until_keeper_holds(&keeper, &node, "after the first publish");
    plugin.stop(Stop::Kill, "kill -9");
    plugin = Plugin::start_in_container(&node, &bao, &[]);
    assert_took_over(&plugin, &node, &keeper);
    assert_eq!(read_string(first.file()), V1, "the volume published before");

    let logins = || {
        bao.audit_entries()
            .iter()
            .filter(|e| e["type"] == "request" && e["request"]["path"] == "auth/jwt/login")
            .count()
    };
    let logged_in = logins();
    let pod = Pod::new("ns", "app-new", "app");
    let (request, _) = jwt_publish(&node, &pod, &key, "app", SECRETS, &[]);
    let status = plugin
        .daemon
        .client()
        .publish(request)
        .expect_err("a publish the daemon cannot mount");
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        describe(&status)
    );
    for expected in ["no FUSE mount at", "--connections-dir", "Bidirectional"] {
        assert!(
            status.message().contains(expected),
            "the publish error names {expected:?}: {}",
            describe(&status)
        );
    }
    assert_eq!(
        logins(),
        logged_in,
        "a publish that cannot mount logs nothing in"
    );
    let unhealthy =
        poll(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || match try_http_status(&plugin.metrics_addr, "/healthz") {
                Ok((503, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            },
        );
    match unhealthy {
        Ok(body) => assert!(
            body.contains("no new volume can be published"),
            "/healthz names the reason: {body}"
        ),
        Err(last) => panic!(
            "/healthz stayed {last} although no volume can be published; daemon output:\n{}",
            tail(&node.all_logs(), 100)
        ),
    }
}

/// `/healthz` answers 200 after the background check ran at least once more.
fn assert_healthy(plugin: &Plugin, node: &CsiNode, what: &str) {
    // The check runs every second; give it two.
    sleep(Duration::from_millis(2100));
    let (status, body) = http_status(&plugin.metrics_addr, "/healthz");
    assert_eq!(
        status,
        200,
        "{what}: /healthz answered {body}; daemon output:\n{}",
        tail(&node.all_logs(), 100)
    );
}
