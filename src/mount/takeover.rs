//! The restart hand-over, owned in one place. A daemon that starts while the keeper holds the
//! node's FUSE connections for its predecessor takes them (`FuseMounter::take_over`), serves
//! every volume the predecessor recorded on them again (`TakenOver::adopt`, their binds are
//! still in place) and only then serves the connections (`TakenOver::serve`): once the
//! predecessor is gone, after asking the kernel to resend what it read and left unanswered.
//!
//! The order is the type's, not its callers': there is no `TakenOver` before the connections
//! are taken, nothing is served before `serve`, and `serve` consumes it, so nothing is adopted
//! after. The kernel may ask about any adopted volume the moment a connection is served, and a
//! resend asked for before the predecessor is gone could include requests it still answers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::keeper_link::TakenConnection;
use super::node::{BindMount, FuseMounter, NodeConnection};
use super::Mounted;
use crate::fs::{Consistency, VaultFs};
use crate::fuse::Volumes;
use crate::slot::Slot;
use crate::source::SecretSource;
use crate::sys;

/// The node connections a predecessor served, taken from the keeper and not served yet.
pub struct TakenOver<S: SecretSource> {
    mounter: Arc<FuseMounter<S>>,
    connections: Vec<Taken<S>>,
    /// Targets of gone pods, detached once the connections are served again: nothing may touch
    /// a mount of a connection nobody serves (it would wait for an answer).
    detach_later: Mutex<Vec<PathBuf>>,
}

/// One connection taken over, with the table its adopted volumes go into.
struct Taken<S> {
    consistency: Consistency,
    connection: TakenConnection,
    volumes: Arc<Volumes<S>>,
}

impl<S: SecretSource> FuseMounter<S> {
    /// Takes the node connections the keeper holds for a predecessor. `None` when it holds
    /// none (or there is no keeper): volumes are then mounted anew. An error means the keeper
    /// may hold a connection that cannot be served; mounting anew over its mounts would wait
    /// forever on them.
    pub fn take_over(self: &Arc<Self>) -> io::Result<Option<TakenOver<S>>> {
        let Some(keeper) = &self.keeper else {
            return Ok(None);
        };
        let mut connections: Vec<_> = keeper
            .take()?
            .into_iter()
            .map(|(consistency, connection)| {
                tracing::info!(%consistency, init = ?connection.init, "taking over a node connection the keeper held");
                Taken {
                    consistency,
                    connection,
                    volumes: Volumes::node(self.quarantine.clone()),
                }
            })
            .collect();
        // Strict first, then cached, whatever order the keeper holds them in.
        connections.sort_by_key(|t| t.consistency != Consistency::Strict);
        Ok((!connections.is_empty()).then(|| TakenOver {
            mounter: self.clone(),
            connections,
            detach_later: Mutex::default(),
        }))
    }
}

impl<S: SecretSource> TakenOver<S> {
    /// Serves `fs` as volume `slot` on the connection of its consistency mode that was taken
    /// over, whose bind at `target` is still in place: nothing is mounted. `None` when that
    /// connection was not taken over (the caller mounts the volume anew).
    pub fn adopt(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
    ) -> Option<Box<dyn Mounted>> {
        let consistency = fs.config().consistency;
        let taken = self
            .connections
            .iter()
            .find(|t| t.consistency == consistency)?;
        Some(Box::new(BindMount::adopted(
            &taken.volumes,
            &self.mounter.metrics,
            target,
            slot,
            fs,
        )))
    }

    /// Detaches vaultfs's mounts at `target` (a gone pod's) once the connections are served:
    /// it may be a bind of one of them. `Ok(false)` when there is no such target.
    pub fn unmount_later(&self, target: &Path) -> io::Result<bool> {
        match sys::canonical_target(target) {
            Ok(target) => {
                self.detach_later.lock().push(target);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Serves every connection taken over, with the volumes adopted into it: for each, waits
    /// until the predecessor is gone, asks the kernel to resend what it left unanswered, serves
    /// it and hands it to the keeper again; once the first is served, detaches the gone pods'
    /// targets. A connection that cannot be served is released from the keeper and aborted, so
    /// that the next daemon mounts anew over dead mounts instead of waiting on live ones.
    pub fn serve(self) -> io::Result<()> {
        let mounter = &self.mounter;
        for taken in self.connections {
            let node = mounter.connection(taken.consistency);
            let root = mounter.root_of(taken.consistency);
            if let Some(keeper) = &mounter.keeper {
                keeper.resend_after_predecessor(&taken.connection);
            }
            let TakenConnection { device, init, .. } = taken.connection;
            let resumed = NodeConnection::resume(
                &root,
                taken.consistency,
                device,
                &init,
                taken.volumes,
                mounter.runtime.clone(),
                mounter.metrics.clone(),
                &node.kernel,
            );
            let served = match resumed {
                Ok(served) => served,
                Err(e) => {
                    if let Some(keeper) = &mounter.keeper {
                        keeper.release(taken.consistency);
                    }
                    if let Err(abort) = sys::abort_fuse_connection(&root) {
                        tracing::warn!(error = %abort, "could not abort the node connection");
                    }
                    return Err(e);
                }
            };
            mounter.metrics.takeovers.inc();
            if let Some(keeper) = &mounter.keeper {
                keeper.hold(
                    taken.consistency,
                    served.connection().device().try_clone_to_owned()?,
                    init,
                );
            }
            *node.served.lock() = Some(Arc::new(served));
            // Once one connection is served, gone pods' binds can be detached (whatever
            // happens to the next one): their records and sessions are forgotten already.
            for target in std::mem::take(&mut *self.detach_later.lock()) {
                if let Err(e) = sys::detach_all_of_type(&target, sys::FSTYPE) {
                    tracing::warn!(target = %target.display(), error = %e, "could not detach a gone pod's volume");
                }
            }
        }
        Ok(())
    }
}
