//! The node daemon's side of the keeper (`crate::keeper`): handing the node's FUSE connection
//! to it, again whenever a keeper comes back, and taking a connection it holds when the daemon
//! starts. The keeper keeps the connection alive while no daemon serves it; the successor
//! serves it with the same inode numbers and handles.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::handover::{self, InitRecord};
use crate::keeper::KeeperClient;
use crate::metrics::Metrics;

/// The name the node's connection is held under.
pub const NODE_CONNECTION: &str = "node";

/// How often a daemon tries to reach a keeper that is not answering.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// A connection the keeper held for this daemon's predecessor.
pub struct TakenConnection {
    pub device: OwnedFd,
    pub init: InitRecord,
    taken_at: Instant,
}

/// Whether `fd` is `/dev/fuse` (character device 10:229), not whatever a keeper client put.
fn is_fuse_device(fd: &OwnedFd) -> io::Result<()> {
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rdev = meta.rdev();
    if meta.file_type().is_char_device() && libc::major(rdev) == 10 && libc::minor(rdev) == 229 {
        Ok(())
    } else {
        Err(io::Error::other(
            "the descriptor is not /dev/fuse (character device 10:229)",
        ))
    }
}

/// The daemon's link to the keeper at one socket path.
pub struct KeeperLink {
    path: PathBuf,
    /// The link the daemon owns its connections through: the keeper takes a closed link for
    /// a dead daemon.
    client: Mutex<Option<Arc<KeeperClient>>>,
    metrics: Arc<Metrics>,
}

impl KeeperLink {
    /// A link to the keeper at `path`, waiting up to `wait` for it to answer (it may be
    /// starting alongside the daemon). An unreachable keeper is logged, not fatal: the daemon
    /// then serves without one and keeps trying to hand its connection over.
    ///
    /// No socket, or nobody listening on it, means no keeper process and so no connection
    /// held. Any other failure (a keeper that refuses this daemon, or is too busy to accept) is
    /// an error: a keeper may be holding a live connection this daemon cannot take, and
    /// mounting anew over its mounts would wait forever on them.
    pub fn connect(path: &Path, wait: Duration, metrics: Arc<Metrics>) -> io::Result<Arc<Self>> {
        let started = Instant::now();
        let client = loop {
            match KeeperClient::connect(path) {
                Ok(client) => break Some(Arc::new(client)),
                Err(e) if started.elapsed() < wait => {
                    tracing::debug!(keeper = %path.display(), error = %e, "keeper not answering yet");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tracing::warn!(keeper = %path.display(), error = %e, "no keeper runs: a crash of this daemon will leave dead mounts until it hands its connection over");
                    break None;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            client: Mutex::new(client),
            metrics,
        }))
    }

    /// Takes the node connection the keeper holds, if any (a predecessor served it). The
    /// keeper counts this daemon as its owner from now on. An error means the keeper may hold
    /// a connection that cannot be served (see `connect`).
    pub fn take(&self) -> io::Result<Option<TakenConnection>> {
        let Some(client) = self.client.lock().clone() else {
            return Ok(None);
        };
        let held = client.take()?;
        let taken_at = Instant::now();
        let mut taken = None;
        for connection in held {
            if connection.name != NODE_CONNECTION {
                tracing::warn!(name = %connection.name, "the keeper holds a connection this daemon does not serve; leaving it");
                continue;
            }
            let usable = is_fuse_device(&connection.fd)
                .and_then(|()| InitRecord::from_bytes(connection.init).map_err(io::Error::other));
            match usable {
                Ok(init) => {
                    taken = Some(TakenConnection {
                        device: connection.fd,
                        init,
                        taken_at,
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "the keeper's node connection is unusable; releasing it");
                    client.release(NODE_CONNECTION)?;
                }
            }
        }
        Ok(taken)
    }

    /// Lets the keeper drop the node connection (it could not be served again).
    pub fn release(&self) {
        if let Some(client) = self.client.lock().clone() {
            if let Err(e) = client.release(NODE_CONNECTION) {
                tracing::warn!(error = %e, "could not release the node connection from the keeper");
            }
        }
    }

    /// Waits until the daemon that served a taken connection before is gone, then asks the
    /// kernel to send again what it had read but not answered (`FUSE_NOTIFY_RESEND`, when the
    /// kernel offers it). Called before this daemon serves the connection: the kernel resends
    /// every request read and not answered on it, which must not include this daemon's own.
    pub fn resend_after_predecessor(&self, taken: &TakenConnection) {
        let Some(client) = self.client.lock().clone() else {
            return;
        };
        match client.wait_predecessor() {
            Ok(unserved) => {
                let unserved = unserved + taken.taken_at.elapsed();
                self.metrics
                    .takeover_unserved_seconds
                    .set(unserved.as_secs_f64());
            }
            // Most likely the keeper was replaced meanwhile; the predecessor is gone in all
            // but the rarest case, and a request left unanswered would hang its reader.
            Err(e) => {
                tracing::warn!(error = %e, "lost the keeper while waiting for the previous daemon to be gone; resending anyway")
            }
        }
        if !taken.init.offers_resend() {
            tracing::info!("this kernel cannot resend requests the previous daemon had not answered (FUSE_NOTIFY_RESEND needs Linux 6.9+)");
            return;
        }
        match handover::notify_resend(taken.device.as_fd()) {
            Ok(()) => tracing::info!(
                "previous daemon gone; asked the kernel to resend the requests it had not answered"
            ),
            Err(e) => tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed"),
        }
    }

    /// Keeps the keeper holding the node connection for as long as the daemon runs: hands it
    /// over now, and again to every keeper that takes the socket path later (a keeper pod
    /// replaced, or one that was not up when the daemon started).
    pub fn hold(self: &Arc<Self>, device: OwnedFd, init: InitRecord) {
        let link = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vaultfs-keeper".into())
            .spawn(move || link.hold_loop(&device, &init));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the keeper link thread");
        }
    }

    fn hold_loop(&self, device: &OwnedFd, init: &InitRecord) {
        let mut announced_missing = false;
        loop {
            let client = self.client.lock().clone();
            let client = match client {
                Some(client) => client,
                None => match KeeperClient::connect(&self.path) {
                    Ok(client) => {
                        let client = Arc::new(client);
                        *self.client.lock() = Some(client.clone());
                        client
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut announced_missing, true) {
                            tracing::warn!(keeper = %self.path.display(), error = %e, "no keeper holds the node connection; retrying every second");
                        }
                        std::thread::sleep(RECONNECT_EVERY);
                        continue;
                    }
                },
            };
            match client.put(NODE_CONNECTION, init.as_bytes(), device.as_fd()) {
                Ok(()) => {
                    announced_missing = false;
                    tracing::info!(keeper = %self.path.display(), "the keeper holds the node connection");
                    let _ = client.wait_closed();
                    tracing::warn!(keeper = %self.path.display(), "the keeper went away; handing the connection to the next one");
                }
                Err(e) => {
                    tracing::warn!(keeper = %self.path.display(), error = %e, "could not hand the node connection to the keeper");
                    std::thread::sleep(RECONNECT_EVERY);
                }
            }
            self.client.lock().take();
        }
    }
}
