//! End-to-end tests of serving a live FUSE connection again (`mount::handover`): real FUSE
//! mounts over `MockSource`, no OpenBao. They are the regression tests of `start_session`'s
//! dependence on fuser 0.18.0 internals (the INIT handshake on the descriptor given to
//! `Session::from_fd`, and that descriptor number kept for the session's life).
//!
//! Ignored by default (needs root and `/dev/fuse`); `scripts/test.sh` runs them with
//! `--include-ignored`. Every read goes through a helper thread with a deadline, never on a
//! FUSE thread, and nothing stats a mount that nobody serves (that would block).

pub mod common;

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{require_root, within};
use fuser::{Config, SessionACL};
use vaultfs::cache::{CacheConfig, SecretCache};
use vaultfs::fs::{Consistency, FsConfig, VaultFs};
use vaultfs::fuse::{FuseAdapter, Volumes};
use vaultfs::metrics::Metrics;
use vaultfs::mount::handover::{self, InitRecord};
use vaultfs::mount::{self, KernelNotifier, MountConfig};
use vaultfs::source::mock::MockSource;
use vaultfs::spec::{parse_secret_arg, VolumeSpec};
use vaultfs::sys;

const LIMIT: Duration = Duration::from_secs(5);

/// A volume with `db/password` (= `password`) and `api` (= `t-1`) whose source answers after
/// `latency`.
fn volume(password: &str, latency: Duration) -> Arc<VaultFs<MockSource>> {
    let source = Arc::new(MockSource::new());
    source.put("secret/db", &[("password", password)]);
    source.put("secret/api", &[("token", "t-1")]);
    source.set_latency(latency);
    let entries = ["db/password=secret/db#password", "api=secret/api#token"]
        .iter()
        .map(|a| parse_secret_arg(a).expect("valid declaration"))
        .collect();
    let spec = Arc::new(VolumeSpec::new(entries).expect("valid spec"));
    let cache = Arc::new(SecretCache::new(
        source,
        CacheConfig::default(),
        Arc::new(Metrics::new()),
    ));
    let config = FsConfig {
        volume: "handover".into(),
        pod: None,
        uid: 0,
        gid: 0,
        file_mode: 0o440,
        kernel_ttl: Duration::from_secs(1),
        consistency: Consistency::Strict,
    };
    Arc::new(VaultFs::new(spec, cache, config))
}

fn adapter(
    fs: Arc<VaultFs<MockSource>>,
    runtime: &tokio::runtime::Runtime,
) -> FuseAdapter<MockSource> {
    FuseAdapter::new(
        Volumes::single(fs),
        runtime.handle().clone(),
        Arc::new(Metrics::new()),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A mount point that is detached (lazily) when the test ends, however it ends.
struct MountPoint(tempfile::TempDir);

impl MountPoint {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("tempdir"))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = sys::detach_unmount(self.0.path());
    }
}

fn read_within(path: PathBuf) -> io::Result<String> {
    let what = format!("reading {}", path.display());
    within(&what, LIMIT, move || fs::read_to_string(path))
}

/// Reads `path` (open, read, close) in a loop on its own thread until stopped, reporting every
/// result with the time it came.
struct Reader {
    stop: Arc<AtomicBool>,
    results: Receiver<(Instant, io::Result<String>)>,
}

impl Reader {
    fn start(path: PathBuf, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, results) = mpsc::channel();
        let flag = stop.clone();
        thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let result = fs::read_to_string(&path);
                    if tx.send((Instant::now(), result)).is_err() {
                        return;
                    }
                    thread::sleep(every);
                }
            })
            .expect("spawn reader");
        Self { stop, results }
    }

    /// The next result; panics if a read takes longer than `LIMIT`.
    fn next(&self) -> (Instant, io::Result<String>) {
        match self.results.recv_timeout(LIMIT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => panic!("a read blocked for {LIMIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the reader thread ended"),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Counts of what a run of reads returned: the first value (the old session's), the second
/// (the new one's), or anything else.
#[derive(Debug)]
struct Tally {
    values: (&'static str, &'static str),
    first: usize,
    second: usize,
    failed: Vec<String>,
}

impl Tally {
    fn new(first: &'static str, second: &'static str) -> Self {
        Self {
            values: (first, second),
            first: 0,
            second: 0,
            failed: Vec::new(),
        }
    }

    fn add(&mut self, result: &io::Result<String>) {
        match result {
            Ok(v) if v == self.values.0 => self.first += 1,
            Ok(v) if v == self.values.1 => self.second += 1,
            Ok(v) => self.failed.push(format!("unexpected content {v:?}")),
            Err(e) => self.failed.push(e.to_string()),
        }
    }

    /// Counts the next `n` results of `reader`.
    fn read(&mut self, reader: &Reader, n: usize) {
        for _ in 0..n {
            self.add(&reader.next().1);
        }
    }

    /// Counts results of `reader` until one has the second value; returns how long after
    /// `since` it came. Panics (naming `who`, the new session) if none has within `LIMIT`.
    fn until_second(&mut self, reader: &Reader, since: Instant, who: &str) -> Duration {
        loop {
            let (at, result) = reader.next();
            self.add(&result);
            if self.second > 0 {
                return at - since;
            }
            assert!(since.elapsed() < LIMIT, "{who} answers nothing: {self:?}");
        }
    }
}

/// Mounts a [`volume`] on `target` the way the daemon does (`mount::mount`, default options).
fn mount_volume(
    password: &str,
    latency: Duration,
    target: &Path,
    runtime: &tokio::runtime::Runtime,
    kernel: &KernelNotifier,
) -> Result<mount::FuseMount, mount::MountError> {
    mount::mount(
        volume(password, latency),
        target,
        &MountConfig::default(),
        runtime.handle().clone(),
        Arc::new(Metrics::new()),
        kernel,
    )
}

/// Serves the live connection on `device` again, with a volume whose `db/password` is
/// `password`: the successor's side of a handover.
fn resume(
    device: OwnedFd,
    init: &InitRecord,
    password: &str,
    runtime: &tokio::runtime::Runtime,
    kernel: &KernelNotifier,
) -> io::Result<mount::Connection> {
    let adapter = adapter(volume(password, Duration::ZERO), runtime);
    mount::resume_connection(device, init, false, adapter, kernel)
}

#[test]
#[ignore = "needs root and /dev/fuse"]
fn a_fresh_mount_passes_the_kernels_init_through_records_it_and_accepts_a_resend() {
    require_root();
    let runtime = runtime();
    let target = MountPoint::new();
    let kernel = KernelNotifier::new();
    let mounted =
        mount_volume("pw-1", Duration::ZERO, target.path(), &runtime, &kernel).expect("mount");
    assert_eq!(
        read_within(target.path().join("db/password")).expect("read"),
        "pw-1"
    );

    let init = mounted.connection().init();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!(
        "kernel {}: FUSE 7.{}, {init:?}",
        release.trim(),
        init.minor()
    );
    assert!(
        init.offers_resend(),
        "this kernel ({}) offers FUSE_HAS_RESEND (6.9+): {init:?}",
        release.trim()
    );
    let reparsed = InitRecord::from_bytes(init.as_bytes().to_vec()).expect("the record reparses");
    assert_eq!(&reparsed, init);

    handover::notify_resend(mounted.connection().device()).expect("FUSE_NOTIFY_RESEND");
    assert_eq!(
        read_within(target.path().join("api")).expect("read after a resend"),
        "t-1"
    );
    mounted.unmount().expect("unmount");
}

#[test]
#[ignore = "needs root and /dev/fuse"]
fn a_second_session_replaying_the_init_serves_the_live_connection_beside_the_first() {
    require_root();
    let runtime = runtime();
    let target = MountPoint::new();

    // The first session: a connection mounted and served through `start_session` directly.
    let device = sys::fuse_mount(target.path(), false).expect("mount FUSE");
    let kept = device.try_clone().expect("dup the device");
    let (session, init) = handover::start_session(
        adapter(volume("one", Duration::ZERO), &runtime),
        device,
        SessionACL::Owner,
        Config::default(),
        None,
    )
    .expect("first session");
    let first = session.spawn().expect("spawn the first session");
    let reader = Reader::start(target.path().join("db/password"), Duration::from_millis(1));
    let mut tally = Tally::new("one", "two");
    tally.read(&reader, 20);
    assert_eq!((tally.first, tally.failed.len()), (20, 0), "{tally:?}");

    // The second, on a duplicate of the live device: the kernel sends no INIT now, so the
    // session gets the recorded one and its answer goes nowhere.
    let device = kept.try_clone().expect("dup the device");
    let (session, init_again, started) = within("start_session on a live connection", LIMIT, {
        let (adapter, init) = (
            adapter(volume("two", Duration::ZERO), &runtime),
            init.clone(),
        );
        move || {
            let t = Instant::now();
            let (session, init) = handover::start_session(
                adapter,
                device,
                SessionACL::Owner,
                Config::default(),
                Some(&init),
            )
            .expect("second session");
            (session, init, t.elapsed())
        }
    });
    assert_eq!(init_again, init);
    let spawned_at = Instant::now();
    let second = session.spawn().expect("spawn the second session");
    let first_answer = tally.until_second(&reader, spawned_at, "the second session");
    eprintln!("start_session on the live connection took {started:?}; first read answered by it {first_answer:?} after spawn");

    let mut both = Tally::new("one", "two");
    both.read(&reader, 200);
    eprintln!("both sessions serving: {both:?}");
    assert!(both.failed.is_empty(), "{both:?}");
    assert!(both.first > 0 && both.second > 0, "both serve: {both:?}");

    // Dropping a BackgroundSession made with from_fd neither unmounts nor stops it: it owns no
    // mount, and its thread keeps serving on its own descriptor.
    drop(first);
    let mut after_drop = Tally::new("one", "two");
    after_drop.read(&reader, 200);
    eprintln!("after dropping the first BackgroundSession: {after_drop:?}");
    assert!(after_drop.failed.is_empty(), "{after_drop:?}");
    assert!(
        after_drop.first > 0,
        "the first session's thread still serves after its handle is dropped: {after_drop:?}"
    );
    assert!(
        sys::is_mount_point(target.path()),
        "dropping it did not unmount"
    );

    drop(reader);
    let _ = sys::detach_unmount(target.path());
    // The kernel ends the connection at unmount: both threads see ENODEV and return.
    within("the second session ending", LIMIT, move || second.join())
        .expect("the second session ends cleanly");
    drop(kept);
}

/// Set in the daemon child process: the mount point it serves.
const CHILD_TARGET: &str = "VAULTFS_HANDOVER_CHILD_TARGET";
/// Set in the daemon child process: its source's latency, in milliseconds, and the value of
/// its `db/password`.
const CHILD_LATENCY_MS: &str = "VAULTFS_HANDOVER_CHILD_LATENCY_MS";
const CHILD_PASSWORD: &str = "VAULTFS_HANDOVER_CHILD_PASSWORD";
/// The line the child prints when it serves: its device descriptor and INIT record.
const CHILD_READY: &str = "vaultfs-handover-child";

/// Not a test by itself: the body of the daemon process that the takeover tests start (this
/// binary, run on this test alone with `CHILD_TARGET` set) and kill. It mounts a volume with
/// the crate's `mount::mount` and prints its descriptor and INIT record. Without
/// `CHILD_TARGET` it returns at once.
#[test]
#[ignore = "needs root and /dev/fuse"]
fn serve_as_the_daemon_the_takeover_tests_kill() {
    let Some(target) = std::env::var_os(CHILD_TARGET) else {
        return;
    };
    let latency = std::env::var(CHILD_LATENCY_MS)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let password = std::env::var(CHILD_PASSWORD).unwrap_or_default();
    let runtime = runtime();
    let kernel = KernelNotifier::new();
    let mounted = mount_volume(&password, latency, Path::new(&target), &runtime, &kernel)
        .expect("child: mount");
    let connection = mounted.connection();
    let hex: String = connection
        .init()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("{CHILD_READY} {} {hex}", connection.device().as_raw_fd());
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// The daemon child, killed when the test ends however it ends.
struct Daemon(Child);

impl Daemon {
    /// `kill -9`, and waits until it is gone.
    fn kill(&mut self) {
        self.0.kill().expect("kill the daemon");
        self.0.wait().expect("reap the daemon");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the daemon child serving `target` (`db/password` = `password`, its source answering
/// after `latency`); returns it with a duplicate of its device descriptor, taken with
/// `pidfd_getfd`, and its INIT record.
fn start_daemon(target: &Path, password: &str, latency: Duration) -> (Daemon, OwnedFd, InitRecord) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "serve_as_the_daemon_the_takeover_tests_kill",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_TARGET, target)
        .env(CHILD_LATENCY_MS, latency.as_millis().to_string())
        .env(CHILD_PASSWORD, password)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the daemon child");
    let stdout = child.stdout.take().expect("piped stdout");
    let daemon = Daemon(child);
    let ready = within(
        "the daemon child mounting",
        Duration::from_secs(30),
        move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                // The test harness prints the test's name on the same line first.
                .find_map(|l| l.split_once(CHILD_READY).map(|(_, rest)| rest.to_string()))
        },
    )
    .expect("the daemon child printed its descriptor");
    let mut fields = ready.split_whitespace();
    let fd: i32 = fields.next().and_then(|f| f.parse().ok()).expect("fd");
    let hex = fields.next().expect("init record");
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let init = InitRecord::from_bytes(bytes).expect("the child's INIT record");
    let pid = i32::try_from(daemon.0.id()).expect("pid");
    // SAFETY: plain syscalls on integers; each descriptor returned is checked, then owned here.
    let device = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(pidfd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(fd >= 0, "pidfd_getfd: {}", io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd as i32)
    };
    (daemon, device, init)
}

/// The restart case: the daemon is killed with an open it took but never answered and a
/// lookup queued that nobody reads, the holder's descriptor keeping the connection. The
/// successor answers the queued request as soon as it serves and, after `notify_resend`, the
/// one the dead daemon took.
#[test]
#[ignore = "needs root and /dev/fuse"]
fn a_successor_resumes_a_killed_daemons_connection_and_a_resend_recovers_its_unanswered_open() {
    require_root();
    let runtime = runtime();
    let target = MountPoint::new();
    // The daemon's source answers after a minute: the first open stays in it.
    let (mut daemon, device, init) = start_daemon(target.path(), "pw-1", Duration::from_secs(60));
    assert!(init.offers_resend(), "{init:?}");

    let taken = Reader::start(target.path().join("db/password"), Duration::from_secs(3600));
    thread::sleep(Duration::from_millis(300));
    assert!(
        taken.results.try_recv().is_err(),
        "the first open waits in the daemon"
    );
    daemon.kill();

    let queued = Reader::start(target.path().join("api"), Duration::from_secs(3600));
    thread::sleep(Duration::from_millis(100));
    assert!(queued.results.try_recv().is_err(), "nobody serves yet");

    let kernel = KernelNotifier::new();
    let started = Instant::now();
    let connection =
        resume(device, &init, "pw-1", &runtime, &kernel).expect("resume the connection");
    let resumed = started.elapsed();
    let (at, result) = queued.next();
    assert_eq!(result.expect("the queued read"), "t-1");
    let queued_after = at - started;

    thread::sleep(Duration::from_millis(200));
    assert!(
        taken.results.try_recv().is_err(),
        "without a resend nobody answers a request a dead daemon took"
    );
    let resent = Instant::now();
    handover::notify_resend(connection.device()).expect("FUSE_NOTIFY_RESEND");
    let (at, result) = taken.next();
    assert_eq!(result.expect("the resent open, then the read"), "pw-1");
    let taken_after = at - resent;
    eprintln!(
        "resume_connection took {resumed:?}; the queued read was answered {queued_after:?} after \
         it started; the dead daemon's open {taken_after:?} after notify_resend"
    );

    let reader = Reader::start(target.path().join("db/password"), Duration::from_millis(1));
    let mut tally = Tally::new("pw-1", "-");
    tally.read(&reader, 100);
    assert_eq!((tally.first, tally.failed.len()), (100, 0), "{tally:?}");
    drop((reader, taken, queued));
    let _ = sys::detach_unmount(target.path());
    drop(connection);
}

/// The overlapping case: the successor serves beside the live daemon, then the daemon is
/// killed; a reader looping all along sees no failure.
#[test]
#[ignore = "needs root and /dev/fuse"]
fn a_successor_serving_beside_the_daemon_loses_no_read_when_the_daemon_is_killed() {
    require_root();
    let runtime = runtime();
    let target = MountPoint::new();
    let (mut daemon, device, init) = start_daemon(target.path(), "old", Duration::ZERO);
    let reader = Reader::start(target.path().join("db/password"), Duration::from_millis(1));
    let mut tally = Tally::new("old", "new");
    tally.read(&reader, 50);
    assert_eq!((tally.first, tally.failed.len()), (50, 0), "{tally:?}");

    let kernel = KernelNotifier::new();
    let started = Instant::now();
    let connection = resume(device, &init, "new", &runtime, &kernel)
        .expect("resume the connection beside the daemon");
    let resumed = started.elapsed();
    let first_answer = tally.until_second(&reader, started, "the successor");
    tally.read(&reader, 100);

    daemon.kill();
    handover::notify_resend(connection.device()).expect("FUSE_NOTIFY_RESEND");
    // Results that came before the kill (the reader does not wait for this thread).
    while let Ok((_, result)) = reader.results.try_recv() {
        tally.add(&result);
    }
    let mut after = Tally::new("old", "new");
    let mut last = Instant::now();
    let mut longest_gap = Duration::ZERO;
    for _ in 0..200 {
        let (at, result) = reader.next();
        longest_gap = longest_gap.max(at - last);
        last = at;
        after.add(&result);
    }
    eprintln!(
        "resume_connection beside the daemon took {resumed:?}; first read answered by the \
         successor {first_answer:?} after it started; before the kill {tally:?}; after {after:?}, \
         longest gap between reads {longest_gap:?}"
    );
    assert!(tally.failed.is_empty(), "{tally:?}");
    assert!(after.failed.is_empty(), "{after:?}");
    // Right after the kill a read may still have been answered by the daemon.
    assert!(
        after.first <= 1,
        "only the successor serves after the kill: {after:?}"
    );
    drop(reader);
    let _ = sys::detach_unmount(target.path());
    drop(connection);
}
