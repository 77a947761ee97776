//! Child processes and privileges: the root check, running without capabilities, signals,
//! bounded waits, stopping a daemon from a test or a guard's `Drop`, and the benchmarks'
//! opt-in.

use std::fs;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use super::poll::poll;

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

pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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
pub fn die_with_parent(cmd: &mut Command, sig: i32) {
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

pub(super) fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
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
