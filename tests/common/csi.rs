//! Harness for `vaultfs csi`: a [`CsiNode`] is one node's worth of directories (the plugin
//! socket, the daemon's state dir, kubelet's pod directories, the daemon logs); a
//! [`CsiDaemon`] runs the real binary on it; a [`Keeper`] runs `vaultfs keeper`, which holds
//! the daemon's FUSE connection across its restarts. Kubelet's side (the client, pods and
//! their requests) is [`super::kubelet`], re-exported here.
//!
//! Drop order matters: declare the [`CsiNode`] before the daemons (and keepers), so they stop first
//! and the node then detaches every mount left under its directories (SIGTERM leaves
//! published volumes mounted, by design).

use std::ffi::CString;
use std::fs::{self, File};
use std::ops::{Deref, DerefMut};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use super::bao::VAULT_ENV;
pub use super::kubelet::*;
use super::{
    die_with_parent, fuse_descriptors, lazy_unmount, mountinfo, poll, read_lossy, stop_child,
    stop_child_on_drop, sys_mount, vaultfs_bin, Bao,
};

/// The driver name kubelet knows the plugin by.
pub const DRIVER_NAME: &str = "csi.vaultfs.io";

/// How long the daemon may take to start serving gRPC.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Node directories
// ---------------------------------------------------------------------------------------------

/// One node's directories: `csi/csi.sock`, `state/`, `pods/`, `logs/`, `containers/`,
/// `keeper/` (the keeper's socket). On drop, every mount under them is detached (latest first).
pub struct CsiNode {
    dir: TempDir,
    node_id: String,
    daemons: AtomicUsize,
}

impl CsiNode {
    pub fn new(node_id: &str) -> CsiNode {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-csi-")
            .tempdir()
            .expect("create node dir");
        for sub in [
            "csi",
            "state",
            "pods",
            "logs",
            "containers",
            "keeper",
            "connections",
        ] {
            fs::create_dir(dir.path().join(sub)).expect("create node sub-directory");
        }
        CsiNode {
            dir,
            node_id: node_id.to_string(),
            daemons: AtomicUsize::new(0),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("csi").join("csi.sock")
    }

    /// `unix:///.../csi.sock`
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Mounts a tmpfs on `state/`, as a node's `/run/vaultfs` is (the daemon warns when its
    /// state directory is not on tmpfs): volume state is then written where a cluster writes
    /// it, not to the disk under the temporary directory. Call before starting a daemon.
    pub fn state_on_tmpfs(&self) {
        let state = self.state_dir();
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (source, fstype, data) = (c("tmpfs"), c("tmpfs"), c("mode=0700"));
        let target = CString::new(state.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: the strings are valid and NUL-terminated for the duration of the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            panic!(
                "mount a tmpfs on {}: {}",
                state.display(),
                std::io::Error::last_os_error()
            );
        }
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// A directory for `--connections-dir`: shared with every daemon's mount namespace once
    /// [`CsiNode::share_connections_dir`] made it a shared mount, as a hostPath volume with
    /// Bidirectional propagation is in Kubernetes.
    pub fn connections_dir(&self) -> PathBuf {
        self.dir.path().join("connections")
    }

    /// Where this node's keeper listens (`vaultfs keeper --socket`, `vaultfs csi
    /// --keeper-socket`).
    pub fn keeper_socket_path(&self) -> PathBuf {
        self.dir.path().join("keeper").join("keeper.sock")
    }

    /// Kubelet's target path for an inline CSI volume of `pod`:
    /// `pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`. Like kubelet, this creates the
    /// parent directory and leaves `mount` itself to the plugin.
    pub fn target_path(&self, pod: &Pod, volume: &str) -> PathBuf {
        let parent = self
            .pods_dir()
            .join(&pod.uid)
            .join("volumes")
            .join("kubernetes.io~csi")
            .join(volume);
        fs::create_dir_all(&parent).expect("create the target's parent");
        parent.join("mount")
    }

    /// A `vaultfs csi` invocation on this node against `bao` (add options, then `start()`).
    pub fn daemon<'a>(&'a self, bao: &'a Bao) -> CsiDaemonBuilder<'a> {
        CsiDaemonBuilder {
            node: self,
            vault_addr: bao.addr(),
            rust_log: "info".to_string(),
            args: Vec::new(),
            own_mount_namespace: false,
            open_files: None,
        }
    }

    /// Everything every daemon started on this node wrote, in start order.
    pub fn all_logs(&self) -> String {
        let n = self.daemons.load(Ordering::SeqCst);
        (0..n)
            .map(|i| read_lossy(&self.log_path(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.dir
            .path()
            .join("logs")
            .join(format!("daemon-{index}.log"))
    }

    /// Mount points under `pods/`, deepest (latest) first.
    pub fn mounts_under_pods(&self) -> Vec<PathBuf> {
        mounts_under(&self.pods_dir())
    }

    /// Makes `pods/` a shared mount (a bind of itself, `rshared`), as kubelet's root
    /// directory is on a node, so that mounts made under it propagate to their binds and
    /// between this process's mount namespace and a daemon's own.
    pub fn share_pods_dir(&self) {
        share(&self.pods_dir());
    }

    /// Makes `connections/` a shared mount, like `pods/`.
    pub fn share_connections_dir(&self) {
        share(&self.connections_dir());
    }

    /// A container's view of a volume: `target` bound at `containers/<name>` with `rslave`
    /// propagation, as a container runtime binds a volumeMount that has
    /// `mountPropagation: HostToContainer`.
    pub fn container_view(&self, target: &Path, name: &str) -> PathBuf {
        let view = self.dir.path().join("containers").join(name);
        fs::create_dir_all(&view).expect("create the container's mount point");
        sys_mount(Some(target), &view, libc::MS_BIND | libc::MS_REC)
            .unwrap_or_else(|e| panic!("bind {} at {}: {e}", target.display(), view.display()));
        sys_mount(None, &view, libc::MS_SLAVE | libc::MS_REC)
            .unwrap_or_else(|e| panic!("make {} rslave: {e}", view.display()));
        view
    }

    /// A `subPath` volumeMount of `container` in `pod`, as kubelet makes one: the file `source`
    /// (inside a published volume) bind-mounted onto a regular file
    /// `pods/<uid>/volume-subpaths/<volume>/<container>/<index>`, which is returned. A
    /// container reads the file through this bind, not through the volume's mount, so a mount
    /// stacked on the volume later never reaches it.
    pub fn sub_path(
        &self,
        pod: &Pod,
        volume: &str,
        container: &str,
        index: usize,
        source: &Path,
    ) -> PathBuf {
        let dir = self
            .pods_dir()
            .join(&pod.uid)
            .join("volume-subpaths")
            .join(volume)
            .join(container);
        fs::create_dir_all(&dir).expect("create the subPath directory");
        let bind = dir.join(index.to_string());
        File::create(&bind).expect("create the subPath mount point");
        sys_mount(Some(source), &bind, libc::MS_BIND)
            .unwrap_or_else(|e| panic!("bind {} at {}: {e}", source.display(), bind.display()));
        bind
    }
}

/// Makes `dir` a shared mount: a bind of itself, `rshared`.
fn share(dir: &Path) {
    sys_mount(Some(dir), dir, libc::MS_BIND | libc::MS_REC)
        .unwrap_or_else(|e| panic!("bind {} on itself: {e}", dir.display()));
    sys_mount(None, dir, libc::MS_SHARED | libc::MS_REC)
        .unwrap_or_else(|e| panic!("make {} rshared: {e}", dir.display()));
}

/// Mount points at or under `dir`, latest first (so stacked and nested mounts come before
/// what they sit on).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| m.mount_point)
        .collect();
    found.reverse();
    found
}

impl Drop for CsiNode {
    fn drop(&mut self) {
        // A few rounds: mounts may be stacked on one target, and propagate between binds.
        for _ in 0..5 {
            let left = mounts_under(self.dir.path());
            if left.is_empty() {
                break;
            }
            for m in left {
                let _ = lazy_unmount(&m);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// Builds a `vaultfs csi` invocation.
pub struct CsiDaemonBuilder<'a> {
    node: &'a CsiNode,
    vault_addr: String,
    rust_log: String,
    args: Vec<String>,
    own_mount_namespace: bool,
    open_files: Option<u64>,
}

impl CsiDaemonBuilder<'_> {
    /// Starts the daemon with a descriptor limit (`RLIMIT_NOFILE`) of `limit`, soft and hard,
    /// as a container runtime may: raising its soft limit at start then gains nothing.
    pub fn open_files_limit(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    /// Runs the daemon in a mount namespace of its own, as each plugin container is in
    /// Kubernetes: a copy of this one when it starts (shared mounts stay peers, so what the
    /// daemon mounts under a shared directory appears here and in later daemons' namespaces;
    /// anything else it mounts dies with it).
    pub fn in_own_mount_namespace(mut self) -> Self {
        self.own_mount_namespace = true;
        self
    }

    /// `RUST_LOG` for the daemon (default `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_string();
        self
    }

    /// `--keeper-socket` at the node's keeper socket (whether a keeper listens there or not)
    /// and `--metrics-addr` at `metrics_addr`.
    pub fn with_keeper(self, metrics_addr: &str) -> Self {
        let keeper_socket = self.node.keeper_socket_path().display().to_string();
        self.args([
            "--keeper-socket",
            &keeper_socket,
            "--metrics-addr",
            metrics_addr,
        ])
    }

    /// Extra command-line arguments after the standard ones.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Starts the daemon and waits until it answers `Probe` on the socket; panics with its
    /// output if it exits first or does not answer within [`START_TIMEOUT`].
    pub fn start(self) -> CsiDaemon {
        let node = self.node;
        let index = node.daemons.fetch_add(1, Ordering::SeqCst);
        let mut cmd = if self.own_mount_namespace {
            // `unshare` execs the daemon: the pid stays the daemon's.
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "unchanged", "--"])
                .arg(vaultfs_bin());
            cmd
        } else {
            Command::new(vaultfs_bin())
        };
        cmd.arg("csi")
            .arg("--endpoint")
            .arg(node.endpoint())
            .arg("--node-id")
            .arg(node.node_id())
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--vault-addr")
            .arg(&self.vault_addr)
            .args(&self.args);
        // The tests rotate secrets within seconds; the production floor is 5 s.
        if !self.args.iter().any(|a| a == "--min-cache-ttl") {
            cmd.args(["--min-cache-ttl", "1s"]);
        }
        if let Some(limit) = self.open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and reads only `limit`, copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut daemon = CsiDaemon {
            process: Process::spawn("vaultfs csi", cmd, node.log_path(index), &self.rust_log),
            socket: node.socket_path(),
        };

        let served = poll(START_TIMEOUT, Duration::from_millis(50), || {
            if let Some(status) = daemon.exited() {
                panic!(
                    "vaultfs csi exited with {status} before serving; its output:\n{}",
                    daemon.logs()
                );
            }
            if !daemon.socket.exists() {
                return Err(String::from("socket not created"));
            }
            CsiClient::connect(&daemon.socket).and_then(|c| {
                c.probe()
                    .map_err(|s| format!("Probe: {} {}", s.code(), s.message()))
            })
        });
        if let Err(last_error) = served {
            daemon.kill();
            panic!(
                "vaultfs csi did not answer Probe on {} within {START_TIMEOUT:?} \
                 ({last_error}); its output:\n{}",
                daemon.socket.display(),
                daemon.logs()
            );
        }
        daemon
    }
}

/// A running `vaultfs csi`. On drop it gets SIGTERM (then SIGKILL after 10 s); after
/// [`Process::kill`] its mounts stay behind, dead. [`Process`] gives its pid, logs and stops.
pub struct CsiDaemon {
    process: Process,
    socket: PathBuf,
}

impl CsiDaemon {
    /// A new gRPC connection to this daemon.
    pub fn client(&self) -> CsiClient {
        CsiClient::connect(&self.socket).unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}; daemon output:\n{}",
                self.socket.display(),
                self.logs()
            )
        })
    }
}

impl Deref for CsiDaemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for CsiDaemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper
// ---------------------------------------------------------------------------------------------

/// A running `vaultfs keeper --socket PATH`, root without capabilities as in `deploy/base`:
/// holds a duplicate of the node daemon's FUSE connection, so the mounts outlive the daemon. Its output goes to `keeper-<n>.log` beside
/// the socket. On drop it gets SIGTERM (then SIGKILL after 10 s); it also gets SIGTERM if the
/// test process dies; after [`Process::kill`] the connections it held are closed with it.
/// [`Process`] gives its pid, logs and stops.
pub struct Keeper {
    process: Process,
    socket: PathBuf,
}

impl Keeper {
    /// Starts a keeper on `socket` and waits until it listens there: the socket file is a
    /// socket other than the one found before the start (a keeper killed with SIGKILL leaves
    /// its socket file behind). Panics with its output if it exits first or takes longer than
    /// [`START_TIMEOUT`].
    pub fn start(socket: &Path) -> Keeper {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let index = STARTED.fetch_add(1, Ordering::SeqCst);
        let log_path = socket.with_file_name(format!("keeper-{index}.log"));
        let identity = |p: &Path| {
            fs::symlink_metadata(p)
                .ok()
                .filter(|m| m.file_type().is_socket())
                .map(|m| (m.dev(), m.ino()))
        };
        let before = identity(socket);
        // As deploy/base runs it: root without capabilities.
        let mut cmd = super::without_capabilities(vaultfs_bin());
        cmd.arg("keeper").arg("--socket").arg(socket);
        let mut keeper = Keeper {
            process: Process::spawn("vaultfs keeper", cmd, log_path, "debug"),
            socket: socket.to_path_buf(),
        };
        let listening = poll(START_TIMEOUT, Duration::from_millis(10), || {
            if let Some(status) = keeper.exited() {
                panic!(
                    "vaultfs keeper exited with {status} before listening; its output:\n{}",
                    keeper.logs()
                );
            }
            match identity(socket) {
                Some(now) if Some(now) != before => Ok(()),
                _ => Err(()),
            }
        });
        if listening.is_err() {
            keeper.kill();
            panic!(
                "vaultfs keeper did not listen on {} within {START_TIMEOUT:?}; its output:\n{}",
                socket.display(),
                keeper.logs()
            );
        }
        keeper
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Descriptors this keeper holds open on `/dev/fuse`: the connections handed to it.
    pub fn fuse_descriptors(&self) -> usize {
        if self.exit_status.is_some() {
            return 0;
        }
        fuse_descriptors(self.pid())
    }
}

impl Deref for Keeper {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Keeper {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------------------------
// A child process
// ---------------------------------------------------------------------------------------------

/// A child `vaultfs` process writing its stdout and stderr to a log file: what a
/// [`CsiDaemon`] and a [`Keeper`] share. On drop it gets SIGTERM (then SIGKILL after 10 s);
/// it also gets SIGTERM if the test process dies.
pub struct Process {
    /// `vaultfs csi`, `vaultfs keeper`: names the process in panic messages.
    name: &'static str,
    child: Child,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd` with stdin closed, its output to `log_path`, no Vault variables from the
    /// test's environment and `RUST_LOG=rust_log`.
    fn spawn(name: &'static str, mut cmd: Command, log_path: PathBuf, rust_log: &str) -> Process {
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("create {name} log: {e}"));
        let log2 = log.try_clone().expect("dup log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for var in VAULT_ENV {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", rust_log).env("NO_COLOR", "1");
        die_with_parent(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({}): {e}", vaultfs_bin()));
        Process {
            name,
            child,
            log_path,
            exit_status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything this process has written to stderr (and stdout) so far.
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.exit_status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status if it has exited (without waiting).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().ok().flatten();
        }
        self.exit_status
    }

    /// Sends SIGTERM and waits up to 15 s for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGKILL)
    }

    fn stop_with(&mut self, sig: i32) -> ExitStatus {
        let log_path = &self.log_path;
        stop_child(
            &mut self.child,
            &mut self.exit_status,
            sig,
            Duration::from_secs(15),
            self.name,
            || read_lossy(log_path),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        stop_child_on_drop(&mut self.child, self.exit_status);
    }
}
