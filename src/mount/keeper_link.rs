//! The node daemon's side of the keeper (`crate::keeper`): handing the node's FUSE connection
//! to it, again whenever a keeper comes back, and taking a connection it holds when the daemon
//! starts. The keeper keeps the connection alive while no daemon serves it; the successor
//! serves it with the same inode numbers and handles. The volumes' Vault sessions are stashed
//! in the keeper as they change (`SessionStore`), so that a successor takes them over instead
//! of logging in again.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::handover::{self, InitRecord};
use crate::fs::Consistency;
use crate::keeper::{KeeperClient, Sealed, MAX_RECORD_BYTES};
use crate::logging::FailureLimiter;
use crate::metrics::Metrics;
use crate::source::handoff;
use crate::source::{HandedLease, LeaseSink, Session, SessionSink, SessionStore};

/// The name a node connection is held under: `node` for strict volumes (the name it had
/// before cached volumes had a connection of their own), `node-cached` for cached ones.
pub fn connection_name(consistency: Consistency) -> &'static str {
    match consistency {
        Consistency::Strict => "node",
        Consistency::Cached => "node-cached",
    }
}

fn consistency_named(name: &str) -> Option<Consistency> {
    [Consistency::Strict, Consistency::Cached]
        .into_iter()
        .find(|c| connection_name(*c) == name)
}

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
    /// The connections this daemon serves, handed to every keeper that comes: name, a
    /// duplicate of the device, the INIT record.
    held: Mutex<Vec<(&'static str, OwnedFd, InitRecord)>>,
    holding: std::sync::Once,
    metrics: Arc<Metrics>,
    /// The volumes' records as stashed, by key, to stash again in every keeper that comes.
    /// Held while a record is sent, so that a keeper that comes meanwhile gets the latest.
    sessions: Mutex<BTreeMap<String, Sealed>>,
    /// Records changed and not sent yet, for the thread that sends them.
    outbox: Arc<Outbox>,
    stash_failures: FailureLimiter<&'static str>,
}

/// The latest record of each key not sent to the keeper yet (`None`: forget it). A producer
/// puts its record while holding the lock its state changes under, so the last record put for
/// a key is the latest state; one entry per key, so a keeper that does not answer holds back
/// one record per volume at most.
#[derive(Default)]
struct Outbox {
    pending: Mutex<BTreeMap<String, Option<Sealed>>>,
    /// Signalled when a record is put, and when the sender has sent everything.
    changed: parking_lot::Condvar,
    /// The sender is sending records it took from `pending` (changed under `pending`'s lock).
    sending: std::sync::atomic::AtomicBool,
}

impl Outbox {
    fn put(&self, key: String, record: Option<Sealed>) {
        self.pending.lock().insert(key, record);
        self.changed.notify_all();
    }
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
        let link = Arc::new(Self {
            path: path.to_path_buf(),
            client: Mutex::new(client),
            held: Mutex::new(Vec::new()),
            holding: std::sync::Once::new(),
            metrics,
            sessions: Mutex::new(BTreeMap::new()),
            outbox: Arc::default(),
            stash_failures: FailureLimiter::default(),
        });
        let (sender, outbox) = (Arc::downgrade(&link), link.outbox.clone());
        std::thread::Builder::new()
            .name("vaultfs-sessions".into())
            .spawn(move || send_records(sender, outbox))?;
        Ok(link)
    }

    /// Waits up to `limit` until every record put so far has been sent (a daemon about to
    /// exit leaves the latest to its successor).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut pending = self.outbox.pending.lock();
        while !pending.is_empty() || self.outbox.sending.load(Ordering::Acquire) {
            if self
                .outbox
                .changed
                .wait_until(&mut pending, deadline)
                .timed_out()
            {
                tracing::warn!("stopping with Vault sessions not stashed in the keeper yet");
                return;
            }
        }
    }

    /// Stashes `record` (or forgets it) under `key` in the current keeper, if one answers.
    fn stash(&self, key: String, record: Option<Sealed>) {
        let mut sessions = self.sessions.lock();
        let client = self.client.lock().clone();
        let sent = match &record {
            Some(record) => {
                sessions.insert(key.clone(), record.clone());
                client.map(|c| c.stash(&key, record))
            }
            None => {
                sessions.remove(&key);
                client.map(|c| c.forget(&key))
            }
        };
        match sent {
            Some(Ok(())) => {
                self.metrics.stashed_sessions.set(sessions.len() as i64);
            }
            Some(Err(e)) => self.stash_failed(&e),
            None => {}
        }
    }

    /// Stashes every record in `client`'s keeper (one that just came). A refusal (an older
    /// keeper that knows no `stash`, a full one) is logged, not a reason to hand the
    /// connections over again.
    fn stash_all(&self, client: &KeeperClient) {
        let sessions = self.sessions.lock();
        let sent = sessions
            .iter()
            .try_for_each(|(key, record)| client.stash(key, record));
        match sent {
            Ok(()) => {
                self.metrics.stashed_sessions.set(sessions.len() as i64);
            }
            Err(e) => self.stash_failed(&e),
        }
    }

    fn stash_failed(&self, e: &io::Error) {
        if let Some(suppressed) = self.stash_failures.admit("stash") {
            tracing::warn!(keeper = %self.path.display(), error = %e, suppressed, "could not stash a volume's Vault session in the keeper; a restart logs that volume in again and reads its leased values anew");
        }
    }

    /// Takes the node connection the keeper holds, if any (a predecessor served it). The
    /// keeper counts this daemon as its owner from now on. An error means the keeper may hold
    /// a connection that cannot be served (see `connect`).
    pub fn take(&self) -> io::Result<Vec<(Consistency, TakenConnection)>> {
        let Some(client) = self.client.lock().clone() else {
            return Ok(Vec::new());
        };
        let held = client.take()?;
        let taken_at = Instant::now();
        let mut taken = Vec::new();
        for connection in held {
            let Some(consistency) = consistency_named(&connection.name) else {
                tracing::warn!(name = %connection.name, "the keeper holds a connection this daemon does not serve; leaving it");
                continue;
            };
            let usable = is_fuse_device(&connection.fd)
                .and_then(|()| InitRecord::from_bytes(connection.init).map_err(io::Error::other));
            match usable {
                Ok(init) => taken.push((
                    consistency,
                    TakenConnection {
                        device: connection.fd,
                        init,
                        taken_at,
                    },
                )),
                Err(e) => {
                    tracing::error!(name = %connection.name, error = %e, "a connection the keeper holds is unusable; releasing it");
                    client.release(&connection.name)?;
                }
            }
        }
        Ok(taken)
    }

    /// Lets the keeper drop a node connection (it could not be served again).
    pub fn release(&self, consistency: Consistency) {
        if let Some(client) = self.client.lock().clone() {
            if let Err(e) = client.release(connection_name(consistency)) {
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

    /// Keeps the keeper holding the node connection of `consistency` for as long as the
    /// daemon runs: hands it over now, and again to every keeper that takes the socket path
    /// later (a keeper pod replaced, or one that was not up when the daemon started).
    pub fn hold(self: &Arc<Self>, consistency: Consistency, device: OwnedFd, init: InitRecord) {
        let name = connection_name(consistency);
        let mut held = self.held.lock();
        held.push((name, device, init));
        // The link thread hands over everything held when it starts and after every
        // reconnection; a connection added while it runs goes to the current keeper now.
        let running = self.holding.is_completed();
        let client = self.client.lock().clone().filter(|_| running);
        if let (Some(client), Some((_, device, init))) = (client, held.last()) {
            match client.put(name, init.as_bytes(), device.as_fd()) {
                Ok(()) => {
                    tracing::info!(keeper = %self.path.display(), name, "the keeper holds the node connection")
                }
                Err(e) => {
                    tracing::warn!(keeper = %self.path.display(), name, error = %e, "could not hand the node connection to the keeper; retrying")
                }
            }
        }
        drop(held);
        self.holding.call_once(|| {
            let link = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vaultfs-keeper".into())
                .spawn(move || link.hold_loop());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the keeper link thread");
            }
        });
    }

    fn hold_loop(&self) {
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
                            tracing::warn!(keeper = %self.path.display(), error = %e, "no keeper holds the node connections; retrying every second");
                        }
                        std::thread::sleep(RECONNECT_EVERY);
                        continue;
                    }
                },
            };
            let put = self
                .held
                .lock()
                .iter()
                .try_for_each(|(name, device, init)| {
                    client.put(name, init.as_bytes(), device.as_fd())
                });
            match put {
                Ok(()) => {
                    self.stash_all(&client);
                    announced_missing = false;
                    tracing::info!(keeper = %self.path.display(), "the keeper holds the node connections");
                    let _ = client.wait_closed();
                    tracing::warn!(keeper = %self.path.display(), "the keeper went away; handing the connections to the next one");
                }
                Err(e) => {
                    tracing::warn!(keeper = %self.path.display(), error = %e, "could not hand the node connections to the keeper");
                    std::thread::sleep(RECONNECT_EVERY);
                }
            }
            self.client.lock().take();
        }
    }
}

/// Sends the records put in `outbox` to the keeper, until the link is gone.
fn send_records(link: Weak<KeeperLink>, outbox: Arc<Outbox>) {
    loop {
        let records = {
            let mut pending = outbox.pending.lock();
            while pending.is_empty() {
                outbox.changed.wait(&mut pending);
            }
            outbox.sending.store(true, Ordering::Release);
            std::mem::take(&mut *pending)
        };
        let Some(link) = link.upgrade() else {
            return;
        };
        for (key, record) in records {
            link.stash(key, record);
        }
        drop(link);
        let _pending = outbox.pending.lock();
        outbox.sending.store(false, Ordering::Release);
        outbox.changed.notify_all();
    }
}

impl KeeperLink {
    /// The record stashed under `name`, read with `unseal`; a failure is logged naming `what`
    /// the successor does without it.
    fn unstash<T>(
        &self,
        name: &str,
        unseal: impl FnOnce(&Sealed) -> Option<T>,
        instead: &str,
    ) -> Option<T> {
        let client = self.client.lock().clone()?;
        match client.unstash(name) {
            Ok(record) => {
                let value = unseal(record.as_ref()?);
                if value.is_none() {
                    tracing::warn!(name, "the keeper's record is unreadable; {instead}");
                }
                value
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "could not take the previous daemon's record from the keeper; {instead}");
                None
            }
        }
    }
}

impl SessionStore for KeeperLink {
    fn take(&self, key: &str) -> Option<Session> {
        self.unstash(key, unseal, "logging in")
    }

    fn sink(&self, key: &str) -> SessionSink {
        let (key, outbox) = (key.to_string(), self.outbox.clone());
        Arc::new(move |session: Option<Session>| {
            outbox.put(key.clone(), session.as_ref().map(seal));
        })
    }

    fn take_leases(&self, key: &str) -> Vec<HandedLease> {
        self.unstash(&leases_key(key), unseal_leases, "reading new credentials")
            .unwrap_or_default()
    }

    fn lease_sink(&self, key: &str) -> LeaseSink {
        let (key, outbox) = (leases_key(key), self.outbox.clone());
        Arc::new(move |leases: Vec<HandedLease>| {
            let record = (!leases.is_empty()).then(|| seal_leases(&leases)).flatten();
            if record.is_none() && !leases.is_empty() {
                tracing::warn!(key, leases = leases.len(), "the volume's leased values are over the keeper's record limit; a restart reads new credentials");
            }
            outbox.put(key.clone(), record);
        })
    }

    fn forget(&self, key: &str) {
        self.outbox.put(key.to_string(), None);
        self.outbox.put(leases_key(key), None);
    }
}

/// The name a volume's leased values are stashed under, beside its session under `key`.
fn leases_key(key: &str) -> String {
    format!("{key}.leases")
}

/// Leased values as the keeper stashes them; `None` if over its record limit.
fn seal_leases(leases: &[HandedLease]) -> Option<Sealed> {
    let mut text = handoff::leases_record(leases);
    (text.len() <= MAX_RECORD_BYTES).then(|| Sealed::new(std::mem::take(&mut *text)))
}

/// Stashed leased values, if the record is a list of them.
fn unseal_leases(record: &Sealed) -> Option<Vec<HandedLease>> {
    handoff::leases_from_record(record.expose())
}

/// `session` as the keeper stashes it: a JSON object, opaque to the keeper.
fn seal(session: &Session) -> Sealed {
    Sealed::new(std::mem::take(&mut *handoff::session_record(session)))
}

/// A stashed session, if the record is one.
fn unseal(record: &Sealed) -> Option<Session> {
    handoff::session_from_record(record.expose())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Token;
    use crate::source::SessionStep;

    #[test]
    fn sealed_records_show_no_token_or_value() {
        let session = Session {
            token: Token::new("s.handed-over".into()),
            expires_at: None,
            full_ttl: Duration::from_secs(3600),
            next: SessionStep::Idle,
        };
        let record = seal(&session);
        assert!(!format!("{record:?}").contains("handed-over"));
        assert_eq!(unseal(&record), Some(session));
    }

    #[test]
    fn leased_values_over_the_record_limit_are_not_stashed() {
        use crate::source::handoff::tests::lease;
        let record = seal_leases(&[lease("p@ss")]).expect("small enough");
        assert!(!format!("{record:?}").contains("p@ss"));
        assert_eq!(unseal_leases(&record).map(|l| l.len()), Some(1));
        let huge = "x".repeat(MAX_RECORD_BYTES);
        assert!(seal_leases(&[lease(&huge)]).is_none());
    }
}
