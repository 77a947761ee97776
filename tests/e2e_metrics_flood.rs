//! End-to-end: a flood of connections to the metrics port cannot starve the node plugin. The
//! real `vaultfs csi`, with a keeper, runs under a descriptor limit of 1,024 soft *and* hard
//! (containerd's default soft limit, with no room to raise it), and the test opens 1,100 idle
//! TCP connections to its `--metrics-addr`, once and then again and again: a new volume still
//! publishes and reads, `/healthz` answers on a fresh connection, the daemon's descriptors stay
//! below the limit, and the connections shed are counted in `/metrics` and logged once per
//! burst.
//!
//! Real OpenBao with JWT logins, real FUSE. Ignored by default (needs root, `/dev/fuse` and
//! `bao`); `scripts/test.sh` runs it with `--include-ignored`. The figures (publish time,
//! descriptors, time until `/healthz` answers, connections shed) go to stderr; only generous liveness
//! bounds are asserted about time.

pub mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::csi::*;
use common::k8s::*;
use common::*;

const PASSWORD: &str = "flood-test-pa55w0rd";
const SECRETS: &str = "- {name: password, path: secret/app/db, key: password}\n";

/// The daemon's descriptor limit, soft and hard.
const LIMIT: u64 = 1024;
/// Connections the attacker opens to the metrics port.
const FLOOD: usize = 1100;
/// Threads opening them in the sustained flood.
const FLOODERS: usize = 4;
/// The daemon's default cap on metrics connections (`--max-metrics-connections`).
const CAP: usize = 32;
/// Generous bound on a publish under the flood (the target is under 5 s).
const PUBLISH_BOUND: Duration = Duration::from_secs(30);
/// Generous bound on `/healthz` answering a fresh connection during the flood (a new connection
/// closes the oldest idle one).
const HEALTH_BOUND: Duration = Duration::from_secs(20);
/// Text of the warning logged once per burst of connections shed.
const SHEDDING_WARNING: &str = "the metrics endpoint serves its most connections";

/// Descriptors process `pid` has open now.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft and hard `Max open files` of process `pid`.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/limits: {e}"));
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no Max open files in /proc/{pid}/limits:\n{limits}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Raises this test process's own descriptor limit to its hard limit, which must leave room
/// for `needed` descriptors.
fn raise_own_open_files_limit(needed: u64) {
    vaultfs::sys::raise_open_files_limit().expect("raise the test's RLIMIT_NOFILE");
    let limit = vaultfs::sys::open_files_limit().expect("read the test's RLIMIT_NOFILE");
    assert!(
        limit.soft >= needed,
        "the test needs {needed} descriptors to open its flood, but its hard limit is {}",
        limit.hard
    );
}

/// Counts a process's descriptors every few milliseconds in a thread; `stop` gives the most
/// seen.
struct DescriptorWatch {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    thread: thread::JoinHandle<()>,
}

impl DescriptorWatch {
    fn start(pid: u32) -> DescriptorWatch {
        let (stop, most) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let thread = thread::spawn({
            let (stop, most) = (stop.clone(), most.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    most.fetch_max(open_descriptors(pid), Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(5));
                }
            }
        });
        DescriptorWatch { stop, most, thread }
    }

    fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("descriptor watch thread");
        self.most.load(Ordering::SeqCst)
    }
}

/// Opens up to `n` idle connections to `addr` (each bounded by 5 s); those that connected.
fn open_flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect()
}

/// Publishes a new volume for a pod named `name`, timed; reads its file. Returns the time the
/// publish took.
fn publish_and_read(
    node: &CsiNode,
    client: &CsiClient,
    key: &common::jwt::SigningKey,
    name: &str,
) -> Duration {
    let pod = Pod::new("ns", name, "app");
    let (request, target) = jwt_publish(node, &pod, key, "app", SECRETS, &[]);
    let started = Instant::now();
    if let Err(status) = client.publish(request) {
        panic!("publish of {name} failed: {}", describe(&status));
    }
    let took = started.elapsed();
    let read = within(&format!("read {name}'s file"), FS_OP_TIMEOUT, {
        let file = target.join("password");
        move || read_string(&file)
    });
    assert_eq!(read, PASSWORD, "{name}");
    took
}

/// Asks `/healthz` on a fresh connection until it answers 200; how long that took.
fn healthz_answers(metrics_addr: &str, bound: Duration) -> Duration {
    let started = Instant::now();
    let answered = poll(bound, Duration::from_millis(100), || match try_http_status(
        metrics_addr,
        "/healthz",
    ) {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("{status} {body}")),
        Err(e) => Err(e),
    });
    if let Err(last) = answered {
        panic!("/healthz did not answer 200 on a fresh connection within {bound:?}: {last}");
    }
    started.elapsed()
}

fn read_file_now(path: &Path) -> String {
    within("read a file served before the flood", FS_OP_TIMEOUT, {
        let path = path.to_path_buf();
        move || read_string(&path)
    })
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_connection_flood_on_the_metrics_port_leaves_publishes_reads_and_health_working() {
    let (bao, key) = app_cluster(&[("secret/app/db", &[("password", PASSWORD)])]);

    let node = CsiNode::new("node-flood");
    let _keeper = Keeper::start(&node.keeper_socket_path());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let daemon = node
        .daemon(&bao)
        .with_keeper(&metrics_addr)
        .open_files_limit(LIMIT)
        .start();
    let pid = daemon.pid();
    assert_eq!(
        open_files_limit(pid),
        (LIMIT, LIMIT),
        "the daemon runs under the limit the attack needs"
    );
    let client = daemon.client();
    let addr: SocketAddr = metrics_addr.parse().expect("metrics address");

    // A volume served before the flood keeps reading through it.
    let first = Pod::new("ns", "before", "app");
    let (request, first_target) = jwt_publish(&node, &first, &key, "app", SECRETS, &[]);
    client.publish(request).expect("publish before the flood");
    assert_eq!(read_file_now(&first_target.join("password")), PASSWORD);
    let quiet = open_descriptors(pid);
    eprintln!("daemon descriptors before the flood: {quiet} (limit {LIMIT})");

    raise_own_open_files_limit(FLOOD as u64 + 256);
    let watch = DescriptorWatch::start(pid);

    // 1. 1,100 idle connections at once, held.
    let started = Instant::now();
    let flood = open_flood(addr, FLOOD);
    eprintln!(
        "{} of {FLOOD} connections to the metrics port opened in {:?}",
        flood.len(),
        started.elapsed()
    );
    let publish = publish_and_read(&node, &client, &key, "during-flood");
    eprintln!("publish of a new volume during the flood: {publish:?} (target under 5 s)");
    assert!(
        publish < PUBLISH_BOUND,
        "publish took {publish:?} during the flood"
    );
    assert_eq!(read_file_now(&first_target.join("password")), PASSWORD);
    let health = healthz_answers(&metrics_addr, HEALTH_BOUND);
    eprintln!("/healthz answered 200 on a fresh connection after {health:?} during the flood");

    // 2. The same flood again and again from several threads, each connection replaced as
    // soon as its thread's share is open.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (stop, opened) = (stop.clone(), opened.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let share = open_flood(addr, FLOOD / FLOODERS);
                    opened.fetch_add(share.len(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let sustained = publish_and_read(&node, &client, &key, "during-sustained-flood");
    let (mut asked, mut answered) = (0, 0);
    let asking = Instant::now();
    while asking.elapsed() < Duration::from_secs(5) {
        asked += 1;
        if matches!(try_http_status(&metrics_addr, "/healthz"), Ok((200, _))) {
            answered += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    for flooder in flooders {
        flooder.join().expect("flooder thread");
    }
    eprintln!(
        "publish of a new volume during a sustained flood ({} connections opened by {FLOODERS} threads, {FLOOD} held at a time): {sustained:?}; /healthz answered {answered} of {asked} fresh connections meanwhile",
        opened.load(Ordering::SeqCst)
    );
    assert!(
        sustained < PUBLISH_BOUND,
        "publish took {sustained:?} during the sustained flood"
    );
    assert!(
        answered * 2 > asked,
        "/healthz answered only {answered} of {asked} fresh connections during the sustained flood"
    );
    assert_eq!(read_file_now(&first_target.join("password")), PASSWORD);

    let most = watch.stop();
    drop(flood);
    eprintln!(
        "daemon descriptors: {quiet} before the floods, at most {most} during them (limit {LIMIT}, metrics cap {CAP})"
    );
    assert!(
        (most as u64) < LIMIT,
        "the daemon reached {most} descriptors (limit {LIMIT})"
    );

    // Counted, and logged once per burst.
    let text = http_get(&metrics_addr, "/metrics");
    let shed = metric_value(&text, "vaultfs_metrics_endpoint_shed_connections_total");
    let timeouts = metric_value(&text, "vaultfs_metrics_endpoint_timeouts_total");
    eprintln!("connections shed: {shed}; closed for no request head in time: {timeouts}");
    assert!(
        shed >= (FLOOD - CAP) as f64,
        "connections shed not counted: {shed}"
    );
    let logs = daemon.logs();
    let warnings = logs.matches(SHEDDING_WARNING).count();
    eprintln!("shedding warnings logged: {warnings}");
    // Two floods: one burst, or two if more than 10 s passed between them.
    assert!(
        (1..=2).contains(&warnings),
        "shedding must be logged once per burst, not per connection: {warnings} lines"
    );
}
