//! Putting a `VaultFs` on a mount point and taking it off: stale-mount recovery, fuser session
//! set-up, and the one thread that sends kernel cache invalidations for every volume (never
//! from a FUSE handler or a tokio worker, holding no locks).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};

use fuser::{BackgroundSession, Config, INodeNo, Notifier, Session, SessionACL};
use thiserror::Error;

use crate::fs::{Invalidate, VaultFs};
use crate::fuse::{FuseAdapter, Slot, Volumes};
use crate::metrics::Metrics;
use crate::source::vault::VaultSource;
use crate::source::SecretSource;
use crate::spec::InodeNo;
use crate::sys;

#[derive(Debug, Error)]
pub enum MountError {
    #[error(
        "mount point {0} does not exist or is not a directory; expected an existing directory"
    )]
    NotADirectory(PathBuf),
    #[error("{0} is already a mount point (another vaultfs or filesystem is mounted there)")]
    Busy(PathBuf),
    #[error("cannot clear the dead mount at {path}: {source}")]
    Stale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount FUSE at {path}: {source} (is /dev/fuse present and are we root?)")]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Sends kernel cache invalidations from one dedicated thread for all volumes.
#[derive(Clone)]
pub struct Invalidator {
    tx: Sender<(Notifier, InodeNo)>,
}

impl Default for Invalidator {
    fn default() -> Self {
        Self::new()
    }
}

impl Invalidator {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel::<(Notifier, InodeNo)>();
        std::thread::Builder::new()
            .name("vaultfs-inval".into())
            .spawn(move || {
                for (notifier, ino) in rx {
                    // ENOENT: the kernel never looked this inode up; nothing to drop.
                    if let Err(e) = notifier.inval_inode(INodeNo(ino.0), 0, 0) {
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            tracing::debug!(ino = ino.0, error = %e, "kernel cache invalidation failed");
                        }
                    }
                }
            })
            .expect("spawning the invalidation thread");
        Self { tx }
    }

    /// An `Invalidate` callback sending through the connection `notifier` will hold (nothing
    /// is sent before it does), with the volume's inode numbers turned into the connection's
    /// by `global`.
    pub fn callback(
        &self,
        notifier: Arc<OnceLock<Notifier>>,
        global: impl Fn(InodeNo) -> InodeNo + Send + Sync + 'static,
    ) -> Invalidate {
        let tx = self.tx.clone();
        Box::new(move |ino| {
            if let Some(n) = notifier.get() {
                let _ = tx.send((n.clone(), global(ino)));
            }
        })
    }
}

/// Mount options of one volume.
#[derive(Clone, Debug, Default)]
pub struct MountConfig {
    /// Let users other than the mounting one use the mount (needed for pods). Access is still
    /// checked by the kernel against the files' owner, group and mode.
    pub allow_other: bool,
    /// Create the mount point if it does not exist (CSI: kubelet creates only its parent).
    pub create_target: bool,
}

/// A mounted volume. Unmount it with `unmount`; dropping it also unmounts.
pub struct FuseMount {
    target: PathBuf,
    session: Option<BackgroundSession>,
    metrics: Arc<Metrics>,
}

/// Makes `target` ready to mount on. A dead FUSE mount left there by a crashed daemon is kept
/// and mounted over: containers that bind the target with `HostToContainer` propagation see a
/// mount stacked on it, but not one made after detaching it. A live mount is refused.
pub fn prepare_target(target: &Path, create_missing: bool) -> Result<(), MountError> {
    if sys::is_disconnected(target) {
        tracing::warn!(target = %target.display(), "mounting over the dead mount an earlier daemon left");
        return Ok(());
    }
    if create_missing && !target.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(target)
            .map_err(|_| MountError::NotADirectory(target.to_path_buf()))?;
    }
    if !target.is_dir() {
        return Err(MountError::NotADirectory(target.to_path_buf()));
    }
    if sys::is_mount_point(target) {
        return Err(MountError::Busy(target.to_path_buf()));
    }
    Ok(())
}

/// Mounts `fs` read-only at `target` and serves it on a background thread.
pub fn mount<S: SecretSource>(
    fs: Arc<VaultFs<S>>,
    target: &Path,
    config: &MountConfig,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    invalidator: &Invalidator,
) -> Result<FuseMount, MountError> {
    prepare_target(target, config.create_target)?;
    let notifier: Arc<OnceLock<Notifier>> = Arc::default();
    fs.set_invalidate(invalidator.callback(notifier.clone(), |ino| ino));
    let fuse_error = |source| MountError::Fuse {
        path: target.to_path_buf(),
        source,
    };
    let device = sys::fuse_mount(target, config.allow_other).map_err(fuse_error)?;
    let acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let adapter = FuseAdapter::new(Volumes::single(fs), runtime, metrics.clone());
    let session = Session::from_fd(adapter, device, acl, Config::default())
        .and_then(|session| {
            let _ = notifier.set(session.notifier());
            session.spawn()
        })
        .map_err(|e| {
            let _ = sys::detach_unmount(target);
            fuse_error(e)
        })?;
    metrics.active_mounts.inc();
    tracing::info!(target = %target.display(), "mounted");
    Ok(FuseMount {
        target: target.to_path_buf(),
        session: Some(session),
        metrics,
    })
}

impl FuseMount {
    /// Unmounts lazily: files still open keep working until closed, new opens fail. Treats
    /// an already-gone mount as success.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let result = sys::detach_all_of_type(&self.target, sys::FSTYPE).map(|_| ());
        // The session thread ends when the kernel closes the connection (at once, or when the
        // last open file closes).
        drop(session);
        self.metrics.active_mounts.dec();
        tracing::info!(target = %self.target.display(), "unmounted");
        result
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(target = %self.target.display(), error = %e, "unmount failed");
        }
    }
}

/// How the CSI node plugin puts volumes on targets and takes them off: real FUSE mounts in
/// production, `FakeMounter` in the contract tests.
pub trait Mounter: Send + Sync + 'static {
    /// Serves `fs` as volume `slot` and mounts it at `target` (over a dead mount there, see
    /// `prepare_target`). `slot` is the volume's stable number (see `fuse::Slot`).
    fn mount(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<VaultSource>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError>;

    /// Detaches every mount at `target` that no `Mounted` handle owns (left by an earlier
    /// daemon). `Ok(false)` when nothing was mounted there.
    fn unmount_target(&self, target: &Path) -> std::io::Result<bool>;
}

/// A volume mounted by a `Mounter`.
pub trait Mounted: Send + Sync {
    /// Unmounts lazily; an already-gone mount is success.
    fn unmount(self: Box<Self>) -> std::io::Result<()>;
}

impl Mounted for FuseMount {
    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        FuseMount::unmount(*self)
    }
}

/// The node plugin's FUSE connection: one for every volume of the node, mounted at a
/// daemon-private directory (under the state directory, mode 0700). Volume `slot` is its
/// directory `<slot>`, bind-mounted at the pod's target: the bind's root is the volume's root,
/// and `..` from it leaves the bind, so a pod can reach neither the connection's root nor
/// another volume.
pub struct NodeSession {
    root: PathBuf,
    volumes: Arc<Volumes<VaultSource>>,
    notifier: Arc<OnceLock<Notifier>>,
    metrics: Arc<Metrics>,
    /// Serves the connection until the process exits (never unmounted by this process: a
    /// restarted daemon mounts a new connection over the dead one, as over dead binds).
    _session: BackgroundSession,
}

/// Requests the kernel may hand the connection at once before it queues more: with every
/// volume of the node on one connection, the kernel's default of 12 would queue 1,000 volumes'
/// reads behind a dozen slow ones.
pub const MAX_BACKGROUND: u16 = 1024;

impl NodeSession {
    /// Mounts the connection at `root` (over a dead one an earlier daemon left) and serves it.
    pub fn start(
        root: &Path,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, MountError> {
        prepare_target(root, true)?;
        let fuse_error = |source| MountError::Fuse {
            path: root.to_path_buf(),
            source,
        };
        let device = sys::fuse_mount(root, true).map_err(fuse_error)?;
        let volumes = Volumes::node();
        let adapter = FuseAdapter::new(volumes.clone(), runtime, metrics.clone())
            .with_max_background(MAX_BACKGROUND);
        let notifier: Arc<OnceLock<Notifier>> = Arc::default();
        let session = Session::from_fd(adapter, device, SessionACL::All, Config::default())
            .and_then(|session| {
                let _ = notifier.set(session.notifier());
                session.spawn()
            })
            .map_err(|e| {
                let _ = sys::detach_unmount(root);
                fuse_error(e)
            })?;
        tracing::info!(root = %root.display(), "serving every volume of this node on one FUSE connection");
        Ok(Self {
            root: root.to_path_buf(),
            volumes,
            notifier,
            metrics,
            _session: session,
        })
    }

    /// Serves `fs` as volume `slot` and binds it at `target`.
    fn attach(
        self: &Arc<Self>,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<VaultSource>>,
        config: &MountConfig,
        invalidator: &Invalidator,
    ) -> Result<BindMount, MountError> {
        prepare_target(target, config.create_target)?;
        let high = u64::from(slot) << 32;
        fs.set_invalidate(
            invalidator.callback(self.notifier.clone(), move |ino| InodeNo(high | ino.0)),
        );
        self.volumes.attach(slot, fs);
        let source = self.root.join(slot.to_string());
        if let Err(source_err) = sys::bind_mount(&source, target) {
            self.volumes.retire(slot);
            return Err(MountError::Fuse {
                path: target.to_path_buf(),
                source: source_err,
            });
        }
        self.metrics.active_mounts.inc();
        tracing::info!(target = %target.display(), slot, "mounted");
        Ok(BindMount {
            session: self.clone(),
            target: target.to_path_buf(),
            slot,
            attached: true,
        })
    }

    /// Volumes served now.
    pub fn volumes(&self) -> usize {
        self.volumes.len()
    }
}

/// A volume bound at its target. Unmount it with `unmount`; dropping it also unmounts.
pub struct BindMount {
    session: Arc<NodeSession>,
    target: PathBuf,
    slot: Slot,
    attached: bool,
}

impl BindMount {
    fn detach(&mut self) -> std::io::Result<()> {
        if !std::mem::take(&mut self.attached) {
            return Ok(());
        }
        let result = sys::detach_all_of_type(&self.target, sys::FSTYPE).map(|_| ());
        // Open files keep reading their versions; the volume is forgotten when the last closes.
        self.session.volumes.retire(self.slot);
        self.session.metrics.active_mounts.dec();
        tracing::info!(target = %self.target.display(), slot = self.slot, "unmounted");
        result
    }
}

impl Mounted for BindMount {
    fn unmount(mut self: Box<Self>) -> std::io::Result<()> {
        self.detach()
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(target = %self.target.display(), error = %e, "unmount failed");
        }
    }
}

/// Real mounts for the node plugin: every volume on one `NodeSession`, started on first use.
pub struct FuseMounter {
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    invalidator: Invalidator,
    root: PathBuf,
    session: parking_lot::Mutex<Option<Arc<NodeSession>>>,
}

impl FuseMounter {
    /// Mounts the node's connection at `root` when the first volume comes.
    pub fn new(runtime: tokio::runtime::Handle, metrics: Arc<Metrics>, root: PathBuf) -> Self {
        Self {
            runtime,
            metrics,
            invalidator: Invalidator::new(),
            root,
            session: parking_lot::Mutex::default(),
        }
    }

    fn session(&self) -> Result<Arc<NodeSession>, MountError> {
        let mut slot = self.session.lock();
        if let Some(session) = slot.as_ref() {
            return Ok(session.clone());
        }
        let session = Arc::new(NodeSession::start(
            &self.root,
            self.runtime.clone(),
            self.metrics.clone(),
        )?);
        *slot = Some(session.clone());
        Ok(session)
    }
}

impl Mounter for FuseMounter {
    fn mount(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<VaultSource>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError> {
        let session = self.session()?;
        let mounted = session.attach(target, slot, fs, config, &self.invalidator)?;
        Ok(Box::new(mounted))
    }

    fn unmount_target(&self, target: &Path) -> std::io::Result<bool> {
        // Only vaultfs's own mounts, at the target however it is written: never whatever else
        // a caller names.
        let target = match sys::canonical_target(target) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        sys::detach_all_of_type(&target, sys::FSTYPE).map(|n| n > 0)
    }
}

/// A `Mounter` that mounts nothing and records what it was asked, for tests without root.
#[derive(Default)]
pub struct FakeMounter {
    state: Arc<parking_lot::Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    mounted: std::collections::HashMap<PathBuf, Arc<VaultFs<VaultSource>>>,
    mounts: usize,
    unmounts: usize,
}

impl FakeMounter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Targets mounted now, sorted.
    pub fn mounted(&self) -> Vec<PathBuf> {
        let mut targets: Vec<_> = self.state.lock().mounted.keys().cloned().collect();
        targets.sort();
        targets
    }

    /// The filesystem mounted at `target`.
    pub fn fs_at(&self, target: &Path) -> Option<Arc<VaultFs<VaultSource>>> {
        self.state.lock().mounted.get(target).cloned()
    }

    /// Mount and unmount calls so far.
    pub fn calls(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.mounts, state.unmounts)
    }
}

struct FakeMounted {
    state: Arc<parking_lot::Mutex<FakeState>>,
    target: PathBuf,
}

impl Mounted for FakeMounted {
    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        let mut state = self.state.lock();
        state.unmounts += 1;
        state.mounted.remove(&self.target);
        Ok(())
    }
}

impl Mounter for FakeMounter {
    fn mount(
        &self,
        target: &Path,
        _slot: Slot,
        fs: Arc<VaultFs<VaultSource>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError> {
        if config.create_target {
            let _ = std::fs::create_dir_all(target);
        }
        if !target.is_dir() {
            return Err(MountError::NotADirectory(target.to_path_buf()));
        }
        let mut state = self.state.lock();
        state.mounts += 1;
        state.mounted.insert(target.to_path_buf(), fs);
        Ok(Box::new(FakeMounted {
            state: self.state.clone(),
            target: target.to_path_buf(),
        }))
    }

    fn unmount_target(&self, target: &Path) -> std::io::Result<bool> {
        let mut state = self.state.lock();
        let found = state.mounted.remove(target).is_some();
        if found {
            state.unmounts += 1;
        }
        Ok(found)
    }
}
