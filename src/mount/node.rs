//! The node plugin's mounts: every volume of the node on one FUSE connection, each bound at
//! its pod's target.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::keeper_link::KeeperLink;
use super::{
    prepare_target, Connection, InitRecord, KernelNotifier, MountConfig, MountError, Mounted,
    Mounter,
};
use crate::fs::{Consistency, Invalidate, VaultFs};
use crate::fuse::{FuseAdapter, Volumes};
use crate::metrics::Metrics;
use crate::quarantine::Quarantine;
use crate::slot::Slot;
use crate::source::SecretSource;
use crate::sys;

/// A served node connection: the FUSE connection of every volume of the node of one consistency
/// mode, mounted at its owner-only directory in the connections directory (`--connections-dir`,
/// mode 0700). Volume `slot` is its
/// directory `<slot>`, bind-mounted at the pod's target: the bind's root is the volume's root,
/// and `..` from it leaves the bind, so a pod can reach neither the connection's root nor
/// another volume.
pub struct NodeConnection<S> {
    root: PathBuf,
    volumes: Arc<Volumes<S>>,
    metrics: Arc<Metrics>,
    /// Serves the connection until the process exits (never unmounted by this process: a
    /// restarted daemon mounts a new connection over the dead one, as over dead binds, or
    /// resumes this one from a holder's descriptor).
    connection: Connection,
}

/// Requests the kernel may hand the connection at once before it queues more: with every
/// volume of the node on one connection, the kernel's default of 12 would queue 1,000 volumes'
/// reads behind a dozen slow ones.
pub const MAX_BACKGROUND: u16 = 1024;

impl<S: SecretSource> NodeConnection<S> {
    /// Mounts the connection at `root` (over a dead one an earlier daemon left) and serves
    /// `volumes` (`Volumes::node`) on it; its kernel notifications go through `kernel`.
    pub fn start(
        root: &Path,
        consistency: Consistency,
        volumes: Arc<Volumes<S>>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        kernel: &KernelNotifier,
    ) -> Result<Self, MountError> {
        let adapter = Self::adapter(&volumes, consistency, runtime, &metrics);
        let config = MountConfig {
            allow_other: true,
            create_target: true,
        };
        let connection = super::start_connection(root, &config, adapter, kernel)?;
        tracing::info!(root = %root.display(), %consistency, "serving every volume of this consistency mode on one FUSE connection");
        Ok(Self {
            root: root.to_path_buf(),
            volumes,
            metrics,
            connection,
        })
    }

    /// Serves the node's connection mounted at `root` that another process served until now:
    /// `device` is a duplicate of its descriptor, `init` the INIT the kernel sent when it was
    /// mounted (see `Connection`). The kernel may ask about any volume the moment serving
    /// starts, so `volumes` (`Volumes::node`) must already hold every volume attached
    /// before, with the slots it had. Touches neither `root` nor the binds, which stay as they
    /// were.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        root: &Path,
        consistency: Consistency,
        device: OwnedFd,
        init: &InitRecord,
        volumes: Arc<Volumes<S>>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        kernel: &KernelNotifier,
    ) -> std::io::Result<Self> {
        let adapter = Self::adapter(&volumes, consistency, runtime, &metrics);
        let connection = super::resume_connection(device, init, true, adapter, kernel)?;
        tracing::info!(root = %root.display(), %consistency, volumes = volumes.len(), "serving the node's FUSE connection again");
        Ok(Self {
            root: root.to_path_buf(),
            volumes,
            metrics,
            connection,
        })
    }

    /// The adapter of the node's connection. Its limits (`MAX_BACKGROUND`) are asked of the
    /// kernel at INIT, so a resumed connection keeps those it was mounted with.
    fn adapter(
        volumes: &Arc<Volumes<S>>,
        consistency: Consistency,
        runtime: tokio::runtime::Handle,
        metrics: &Arc<Metrics>,
    ) -> FuseAdapter<S> {
        FuseAdapter::new(volumes.clone(), runtime, metrics.clone())
            .with_max_background(MAX_BACKGROUND)
            .with_consistency(consistency)
    }

    /// The node's connection (to hand it over to another process).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Serves `fs` as volume `slot` and binds it at `target`.
    fn attach(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
        config: &MountConfig,
    ) -> Result<BindMount<S>, MountError> {
        prepare_target(target, config.create_target)?;
        self.volumes.attach(slot, fs);
        let source = self.root.join(slot.to_string());
        if let Err(error) = sys::bind_mount(&source, target) {
            self.volumes.retire(slot);
            return Err(MountError::Bind {
                source_dir: source,
                target: target.to_path_buf(),
                error,
            });
        }
        self.metrics.active_mounts.inc();
        tracing::info!(target = %target.display(), slot = slot.0, "mounted");
        Ok(BindMount {
            volumes: self.volumes.clone(),
            metrics: self.metrics.clone(),
            target: target.to_path_buf(),
            slot,
            mount_id: sys::mount_id(target),
            attached: true,
        })
    }
}

/// A volume bound at its target. Unmount it with `unmount`; dropping it also unmounts.
pub struct BindMount<S: SecretSource> {
    volumes: Arc<Volumes<S>>,
    metrics: Arc<Metrics>,
    target: PathBuf,
    slot: Slot,
    /// The bind's mount id, to find it on top of the target without reading the mount table.
    mount_id: Option<u64>,
    attached: bool,
}

impl<S: SecretSource> BindMount<S> {
    /// Serves `fs` as volume `slot` of `volumes`, whose bind at `target` a predecessor made and
    /// is still in place (a connection taken over): nothing is mounted, and the bind's id is not
    /// looked up (a stat of a mount nobody serves yet would wait for an answer).
    pub(super) fn adopted(
        volumes: &Arc<Volumes<S>>,
        metrics: &Arc<Metrics>,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
    ) -> Self {
        volumes.attach(slot, fs);
        metrics.active_mounts.inc();
        tracing::info!(target = %target.display(), slot = slot.0, "serving the volume again on the connection taken over");
        Self {
            volumes: volumes.clone(),
            metrics: metrics.clone(),
            target: target.to_path_buf(),
            slot,
            mount_id: None,
            attached: true,
        }
    }

    fn detach(&mut self) -> std::io::Result<()> {
        if !std::mem::take(&mut self.attached) {
            return Ok(());
        }
        let result = self.unbind();
        // Open files keep reading their versions; the volume is forgotten when the last closes.
        self.volumes.retire(self.slot);
        self.metrics.active_mounts.dec();
        tracing::info!(target = %self.target.display(), slot = self.slot.0, "unmounted");
        result
    }

    /// Detaches the bind and any dead mounts of an earlier daemon beneath it. When the bind is
    /// still on top and nothing is left under it (the usual case) this costs two `statx` and one
    /// `umount2`; otherwise the mount table says what is vaultfs's to detach.
    fn unbind(&self) -> std::io::Result<()> {
        let on_top = self.mount_id.is_some() && sys::mount_id(&self.target) == self.mount_id;
        if on_top {
            sys::detach_unmount(&self.target)?;
            if !sys::is_mount_point(&self.target) {
                return Ok(());
            }
        }
        sys::detach_all_of_type(&self.target, sys::FSTYPE).map(|_| ())
    }
}

impl<S: SecretSource> Mounted for BindMount<S> {
    fn unmount(mut self: Box<Self>) -> std::io::Result<()> {
        self.detach()
    }

    fn mount_id(&self) -> Option<u64> {
        self.mount_id
    }
}

impl<S: SecretSource> Drop for BindMount<S> {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(target = %self.target.display(), error = %e, "unmount failed");
        }
    }
}

/// Real mounts for the node plugin: the node's volumes on one `NodeConnection` per consistency
/// mode (the no-open flag of cached volumes is per connection), each started on first use, or
/// taken over from the keeper when a predecessor served it.
pub struct FuseMounter<S> {
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) metrics: Arc<Metrics>,
    /// `--connections-dir`: each connection is mounted at its `connection_dir_name` there.
    dir: PathBuf,
    connections: [ModeConnection<S>; 2],
    pub(super) keeper: Option<Arc<KeeperLink>>,
    /// Given to the volume tables of both connections.
    pub(super) quarantine: Option<Arc<Quarantine>>,
}

/// The node's connection of one consistency mode: its kernel notifier (made before the
/// connection, so volumes are built wired to it) and, once mounted or taken over, the served
/// connection.
pub(super) struct ModeConnection<S> {
    pub(super) consistency: Consistency,
    pub(super) kernel: KernelNotifier,
    pub(super) served: parking_lot::Mutex<Option<Arc<NodeConnection<S>>>>,
}

/// The directory, in the connections directory, where the node connection of `consistency` is
/// mounted (owner-only: only the daemon goes there; pods see bind mounts).
pub fn connection_dir_name(consistency: Consistency) -> &'static str {
    match consistency {
        Consistency::Strict => "fuse",
        Consistency::Cached => "fuse-cached",
    }
}

impl<S: SecretSource> FuseMounter<S> {
    /// Mounts the node's connections in the connections directory `dir` when their first
    /// volume comes, and hands them to `keeper` when there is one.
    pub fn new(
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        dir: PathBuf,
        keeper: Option<Arc<KeeperLink>>,
    ) -> Self {
        let connection = |consistency| ModeConnection {
            consistency,
            kernel: KernelNotifier::new(),
            served: parking_lot::Mutex::default(),
        };
        Self {
            runtime,
            metrics,
            dir,
            connections: [
                connection(Consistency::Strict),
                connection(Consistency::Cached),
            ],
            keeper,
            quarantine: None,
        }
    }

    /// Counts the volumes' requests in flight in `quarantine` and fences off the volumes it
    /// holds quarantined.
    pub fn with_quarantine(mut self, quarantine: Option<Arc<Quarantine>>) -> Self {
        self.quarantine = quarantine;
        self
    }

    pub(super) fn connection(&self, consistency: Consistency) -> &ModeConnection<S> {
        match consistency {
            Consistency::Strict => &self.connections[0],
            Consistency::Cached => &self.connections[1],
        }
    }

    pub(super) fn root_of(&self, consistency: Consistency) -> PathBuf {
        self.dir.join(connection_dir_name(consistency))
    }

    /// For a daemon stopping with no volume published: nothing on the node connections is
    /// worth keeping for a successor, so the keeper lets them go and their mounts (in the
    /// host's namespace, where `--connections-dir` is shared with it) are detached and their
    /// directories removed. The connections end once this process exits; a successor mounts
    /// new ones when a volume comes. Uninstalling thus leaves no mount behind.
    pub fn retire_unused(&self) {
        for node in &self.connections {
            if node.served.lock().take().is_none() {
                continue;
            }
            if let Some(keeper) = &self.keeper {
                keeper.release(node.consistency);
            }
            let root = self.root_of(node.consistency);
            match sys::detach_all_of_type(&root, sys::FSTYPE) {
                Ok(_) => {
                    let _ = std::fs::remove_dir(&root);
                    tracing::info!(root = %root.display(), "no volume left: the node connection's mount is detached");
                }
                Err(e) => {
                    tracing::warn!(root = %root.display(), error = %e, "could not detach the node connection's mount")
                }
            }
        }
    }

    /// The mount roots of the node connections being served, for the health check.
    pub fn served_roots(&self) -> Vec<PathBuf> {
        self.connections
            .iter()
            .filter(|node| node.served.lock().is_some())
            .map(|node| self.root_of(node.consistency))
            .collect()
    }

    /// The served connection of `consistency`, mounted anew on first use.
    fn served(&self, consistency: Consistency) -> Result<Arc<NodeConnection<S>>, MountError> {
        let node = self.connection(consistency);
        let mut served = node.served.lock();
        if let Some(connection) = served.as_ref() {
            return Ok(connection.clone());
        }
        let root = self.root_of(consistency);
        // Nothing took a connection over, so whatever vaultfs mounted here is dead or about
        // to be (its daemon is gone, and no keeper holds it): the host keeps such roots where
        // the connections directory is shared with it, so they would pile up restart after
        // restart. Pods' binds are mounts of their own and stay as they are.
        match sys::detach_all_of_type(&root, sys::FSTYPE) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(root = %root.display(), mounts = n, "detached the node connection an earlier daemon left")
            }
            Err(e) => {
                tracing::warn!(root = %root.display(), error = %e, "could not detach the node connection an earlier daemon left")
            }
        }
        // Owner-only: only the daemon goes there (a dead mount there exists already).
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&root);
        let started = Arc::new(NodeConnection::start(
            &root,
            consistency,
            Volumes::node(self.quarantine.clone()),
            self.runtime.clone(),
            self.metrics.clone(),
            &node.kernel,
        )?);
        if let Some(keeper) = &self.keeper {
            let connection = started.connection();
            match connection.device().try_clone_to_owned() {
                Ok(device) => keeper.hold(consistency, device, connection.init().clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot duplicate the node connection for the keeper")
                }
            }
        }
        *served = Some(started.clone());
        Ok(started)
    }
}

impl<S: SecretSource> Mounter<S> for FuseMounter<S> {
    fn invalidate(&self, slot: Slot, consistency: Consistency) -> Invalidate {
        self.connection(consistency).kernel.for_volume(slot)
    }

    fn mount(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError> {
        self.publishable(fs.config().consistency)?;
        let connection = self.served(fs.config().consistency)?;
        let mounted = connection.attach(target, slot, fs, config)?;
        Ok(Box::new(mounted))
    }

    fn publishable(&self, consistency: Consistency) -> Result<(), MountError> {
        if self.connection(consistency).served.lock().is_none() {
            // Mounted on first use, in this namespace.
            return Ok(());
        }
        sys::statfs_fuse(&self.root_of(consistency))
            .map_err(|error| MountError::Unreachable { error })
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
