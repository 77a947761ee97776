//! Putting volumes on mount points and taking them off: stale-mount recovery, fuser session
//! set-up, the `Mounter` seam the CSI plugin mounts through, and the thread that sends a
//! connection's kernel cache invalidations (never from a FUSE handler or a tokio worker,
//! holding no locks). `vaultfs mount` is one volume on its own connection (`mount`);
//! `vaultfs csi` puts every volume of the node on one connection and binds them (`node`).
//! `handover` starts a session on a connection with or without the kernel's INIT, so that
//! another process can serve a live connection again (`Connection`, `resume_connection`);
//! `takeover` owns a restart's hand-over of the node's connections, in its one correct order
//! (`TakenOver`); `keeper_link` is the daemon's side of the keeper that holds them meanwhile.
//! `fake` is a `Mounter` that mounts nothing, compiled only for tests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};

use fuser::{BackgroundSession, Config, INodeNo, Notifier, SessionACL};
use thiserror::Error;

use crate::fs::{Consistency, Invalidate, VaultFs};
use crate::fuse::{FuseAdapter, Volumes};
use crate::metrics::Metrics;
use crate::slot::Slot;
use crate::source::SecretSource;
use crate::spec::InodeNo;
use crate::sys;

#[cfg(any(test, feature = "testing"))]
mod fake;
pub mod handover;
pub mod keeper_link;
mod node;
mod takeover;

#[cfg(any(test, feature = "testing"))]
pub use fake::FakeMounter;
pub use handover::InitRecord;
pub use node::{connection_dir_name, BindMount, FuseMounter, NodeConnection, MAX_BACKGROUND};
pub use takeover::TakenOver;

#[derive(Debug, Error)]
pub enum MountError {
    #[error(
        "mount point {0} does not exist or is not a directory; expected an existing directory"
    )]
    NotADirectory(PathBuf),
    #[error("{0} is already a mount point (another vaultfs or filesystem is mounted there)")]
    Busy(PathBuf),
    // The OS error is part of the message, not a `source`: printed with its cause chain
    // (`{:#}`), it would otherwise appear twice.
    #[error("cannot clear the dead mount at {path}: {error}")]
    Stale {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot mount FUSE at {path}: {error} (is /dev/fuse present and are we root?)")]
    Fuse {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot bind the volume's directory {source_dir} of the node's FUSE connection at {target}: {error}")]
    Bind {
        source_dir: PathBuf,
        target: PathBuf,
        error: std::io::Error,
    },
    /// The node's connection is served but its mount is not in this process's mount
    /// namespace, so nothing can be bound from it.
    #[error("cannot publish on the node's FUSE connection: {error}; it was mounted in a mount namespace this daemon does not share (--connections-dir must be a host directory mounted into the plugin with Bidirectional propagation, see docs/kubernetes.md)")]
    Unreachable { error: std::io::Error },
}

/// The kernel notifications of one FUSE connection: cache invalidations for its volumes, sent
/// from one dedicated thread. Made before the connection, so that volumes are built wired to
/// it; nothing is sent until the connection is up (`connect`).
#[derive(Clone)]
pub struct KernelNotifier {
    tx: Sender<(Notifier, InodeNo)>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl Default for KernelNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl KernelNotifier {
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
        Self {
            tx,
            notifier: Arc::default(),
        }
    }

    /// The invalidation callback of volume `slot`, whose inode numbers on the connection are
    /// `slot.inode(local)` (`Slot::SINGLE`: a connection serving one volume, numbers unchanged).
    pub fn for_volume(&self, slot: Slot) -> Invalidate {
        let (tx, notifier) = (self.tx.clone(), self.notifier.clone());
        Box::new(move |ino| {
            if let Some(n) = notifier.get() {
                let _ = tx.send((n.clone(), InodeNo(slot.inode(ino))));
            }
        })
    }

    /// The connection is up: notifications go through `notifier` from now on.
    fn connect(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
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

/// A served FUSE connection: the session serving it on a background thread, and what another
/// process needs to serve it again (`resume_connection`): a duplicate of its `/dev/fuse`
/// descriptor and the INIT the kernel sent when it was mounted.
pub struct Connection {
    /// Serves until the connection ends. Dropping it neither unmounts nor stops it: a session
    /// made from a descriptor owns no mount, and its thread keeps serving (and keeps its own
    /// descriptor open) until the kernel ends the connection.
    _session: BackgroundSession,
    device: OwnedFd,
    init: InitRecord,
}

impl Connection {
    /// The connection's `/dev/fuse` descriptor (a duplicate of the session's, close-on-exec):
    /// what a holder keeps and a successor serves (`try_clone_to_owned` for one of its own).
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// The INIT the kernel sent when the connection was mounted.
    pub fn init(&self) -> &InitRecord {
        &self.init
    }
}

/// A mounted volume. Unmount it with `unmount`; dropping it also unmounts.
pub struct FuseMount {
    target: PathBuf,
    connection: Option<Connection>,
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

/// Mounts `fs` read-only at `target` on a connection of its own, in the volume's consistency
/// mode, and serves it on a background thread. `kernel` is the notifier `fs` was built with
/// (`for_volume(Slot::SINGLE)`).
pub fn mount<S: SecretSource>(
    fs: Arc<VaultFs<S>>,
    target: &Path,
    config: &MountConfig,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    kernel: &KernelNotifier,
) -> Result<FuseMount, MountError> {
    let consistency = fs.config().consistency;
    let adapter = FuseAdapter::new(Volumes::single(fs), runtime, metrics.clone())
        .with_consistency(consistency);
    let connection = start_connection(target, config, adapter, kernel)?;
    metrics.active_mounts.inc();
    tracing::info!(target = %target.display(), %consistency, "mounted");
    Ok(FuseMount {
        target: target.to_path_buf(),
        connection: Some(connection),
        metrics,
    })
}

/// Mounts a FUSE connection at `target` (over a dead one left there, see `prepare_target`) and
/// serves it with `adapter` on a background thread; the kernel's notifications go through
/// `kernel` from then on.
fn start_connection<S: SecretSource>(
    target: &Path,
    config: &MountConfig,
    adapter: FuseAdapter<S>,
    kernel: &KernelNotifier,
) -> Result<Connection, MountError> {
    prepare_target(target, config.create_target)?;
    let fuse_error = |error| MountError::Fuse {
        path: target.to_path_buf(),
        error,
    };
    let device = if sys::can_mount() {
        sys::fuse_mount(target, config.allow_other)
    } else {
        sys::fusermount(target, config.allow_other)
    }
    .map_err(fuse_error)?;
    serve(adapter, device, config.allow_other, None, kernel).map_err(|e| {
        let _ = unmount_ours(target);
        fuse_error(e)
    })
}

/// Serves with `adapter`, on a background thread, a live connection another process served
/// until now: `device` is a duplicate of its descriptor and `init` the INIT the kernel sent that
/// process (see `handover::start_session`). `allow_other` must be what the connection was
/// mounted with. Serving starts at once, so `adapter` must already serve every volume the
/// kernel may ask about; the kernel's notifications go through `kernel` from then on. Touches
/// no mount point (a stat of a mount nobody serves yet would block).
pub fn resume_connection<S: SecretSource>(
    device: OwnedFd,
    init: &InitRecord,
    allow_other: bool,
    adapter: FuseAdapter<S>,
    kernel: &KernelNotifier,
) -> std::io::Result<Connection> {
    serve(adapter, device, allow_other, Some(init), kernel)
}

fn serve<S: SecretSource>(
    adapter: FuseAdapter<S>,
    device: OwnedFd,
    allow_other: bool,
    init: Option<&InitRecord>,
    kernel: &KernelNotifier,
) -> std::io::Result<Connection> {
    let kept = device.try_clone()?;
    let acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let (session, init) = handover::start_session(adapter, device, acl, Config::default(), init)?;
    kernel.connect(session.notifier());
    Ok(Connection {
        _session: session.spawn()?,
        device: kept,
        init,
    })
}

impl FuseMount {
    /// The volume's connection (to hand it over to another process).
    pub fn connection(&self) -> &Connection {
        self.connection
            .as_ref()
            .expect("a mount keeps its connection until it is unmounted")
    }

    /// Unmounts lazily: files still open keep working until closed, new opens fail. Treats
    /// an already-gone mount as success.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> std::io::Result<()> {
        let Some(connection) = self.connection.take() else {
            return Ok(());
        };
        let result = unmount_ours(&self.target);
        // The session thread ends when the kernel closes the connection (at once, or when the
        // last open file closes).
        drop(connection);
        self.metrics.active_mounts.dec();
        tracing::info!(target = %self.target.display(), "unmounted");
        result
    }
}

/// Takes vaultfs's mounts off `target`: with umount2 as root, through `fusermount3 -u` as a
/// normal user (who may not call umount2).
fn unmount_ours(target: &Path) -> std::io::Result<()> {
    if sys::can_mount() {
        sys::detach_all_of_type(target, sys::FSTYPE).map(|_| ())
    } else {
        sys::fuser_unmount(target)
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
/// production, `FakeMounter` in the contract tests. Generic over the volumes' source, so it
/// knows nothing of Vault.
pub trait Mounter<S: SecretSource>: Send + Sync + 'static {
    /// Where the kernel notifications of volume `slot` go; the volume is built with it
    /// before it is mounted.
    fn invalidate(&self, slot: Slot, consistency: Consistency) -> Invalidate;

    /// Serves `fs` as volume `slot` and mounts it at `target` (over a dead mount there, see
    /// `prepare_target`). `slot` is the volume's stable number (see `slot::Slot`).
    fn mount(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError>;

    /// Whether a volume of `consistency` can be mounted now: `Err` when the connection it
    /// would go on cannot be reached (see `MountError::Unreachable`), before anything is done
    /// for the volume.
    fn publishable(&self, _consistency: Consistency) -> Result<(), MountError> {
        Ok(())
    }

    /// Detaches every mount at `target` that no `Mounted` handle owns (left by an earlier
    /// daemon). `Ok(false)` when nothing was mounted there.
    fn unmount_target(&self, target: &Path) -> std::io::Result<bool>;
}

/// A volume mounted by a `Mounter`.
pub trait Mounted: Send + Sync {
    /// Unmounts lazily; an already-gone mount is success.
    fn unmount(self: Box<Self>) -> std::io::Result<()>;

    /// The mount's id (`sys::mount_id`) as looked up when it was mounted, if it was.
    fn mount_id(&self) -> Option<u64> {
        None
    }
}

impl Mounted for FuseMount {
    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        FuseMount::unmount(*self)
    }
}
