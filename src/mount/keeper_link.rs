//! The node daemon's side of the keeper (`crate::keeper`): handing the node's FUSE connection
//! to it, again whenever a keeper comes back, and taking a connection it holds when the daemon
//! starts. The keeper keeps the connection alive while no daemon serves it; the successor
//! serves it with the same inode numbers and handles.

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
    pub fn connect(path: &Path, wait: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        let started = Instant::now();
        let client = loop {
            match KeeperClient::connect(path) {
                Ok(client) => break Some(Arc::new(client)),
                Err(e) if started.elapsed() >= wait => {
                    tracing::warn!(keeper = %path.display(), error = %e, "no keeper answers: a crash of this daemon will leave dead mounts until it hands its connection over");
                    break None;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        Arc::new(Self {
            path: path.to_path_buf(),
            client: Mutex::new(client),
            metrics,
        })
    }

    /// Takes the node connection the keeper holds, if any (a predecessor served it). The
    /// keeper counts this daemon as its owner from now on.
    pub fn take(&self) -> Option<TakenConnection> {
        let client = self.client.lock().clone()?;
        let held = match client.take() {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(keeper = %self.path.display(), error = %e, "could not ask the keeper for the connection it holds");
                return None;
            }
        };
        let mut taken = None;
        for connection in held {
            if connection.name != NODE_CONNECTION {
                tracing::warn!(name = %connection.name, "the keeper holds a connection this daemon does not serve; leaving it");
                continue;
            }
            match InitRecord::from_bytes(connection.init) {
                Ok(init) => {
                    taken = Some(TakenConnection {
                        device: connection.fd,
                        init,
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "the keeper's record of the node connection is unusable; releasing it");
                    let _ = client.release(NODE_CONNECTION);
                }
            }
        }
        taken
    }

    /// Once the daemon that served a taken connection before is gone, asks the kernel to send
    /// again what it had read but not answered (`FUSE_NOTIFY_RESEND`, when the kernel offers
    /// it), so that no request stays unanswered; never while the predecessor may still answer
    /// them itself. Runs on its own short-lived thread.
    pub fn resend_after_predecessor(&self, device: OwnedFd, init: InitRecord) {
        let Some(client) = self.client.lock().clone() else {
            return;
        };
        let metrics = self.metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("vaultfs-resend".into())
            .spawn(move || {
                let unserved = match client.wait_predecessor() {
                    Ok(unserved) => unserved,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the keeper while waiting for the previous daemon to be gone; not asking the kernel to resend");
                        return;
                    }
                };
                metrics.takeover_unserved_seconds.set(unserved.as_secs_f64());
                if !init.offers_resend() {
                    tracing::info!(unserved_ms = unserved.as_millis() as u64, "previous daemon gone; this kernel cannot resend requests it had not answered (FUSE_NOTIFY_RESEND needs Linux 6.9+)");
                    return;
                }
                match handover::notify_resend(device.as_fd()) {
                    Ok(()) => tracing::info!(unserved_ms = unserved.as_millis() as u64, "previous daemon gone; asked the kernel to resend the requests it had not answered"),
                    Err(e) => tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the resend thread");
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
