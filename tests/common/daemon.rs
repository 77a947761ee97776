//! The `vaultfs mount` daemon under test: [`MountBuilder`] runs the built binary against a
//! [`Bao`] on a fresh mount point, waits until the FUSE mount shows up in
//! `/proc/self/mountinfo` and captures its output to a file; [`Mount`] stops it on drop and
//! detaches its mount if it is left dead.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::bao::{Bao, ROOT_TOKEN, VAULT_ENV};
use super::mounts::{is_dead_mount, is_live_mount, is_mounted, lazy_unmount, mounts_at};
use super::poll::poll;
use super::process::{
    die_with_parent, read_lossy, send_signal, stop_child, stop_child_on_drop, wait_timeout,
};

/// How long to wait for the FUSE mount to appear after spawning vaultfs.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);

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
