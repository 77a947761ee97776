//! The keeper's server loop (`vaultfs keeper`): binds the socket, admits clients
//! ([`super::admission`]), reads their requests, feeds them with the time to the [`State`],
//! and sends the replies with their descriptors, until SIGTERM or SIGINT. One thread, one
//! `poll`; the socket calls are `sys::socket`'s, the stop signals `sys::signal`'s.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use super::admission::check_client;
use super::protocol::{decode, encode, receive, Received, Reply, Request};
use super::state::{ClientId, State};
use crate::logging::FailureLimiter;
use crate::sys::socket::{self, Polled};
use crate::sys::{pidfd, signal};

/// Where `vaultfs keeper` listens and the daemon connects, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vaultfs-keeper/keeper.sock";
/// Most clients connected at once; one more is told so and disconnected.
pub const MAX_CLIENTS: usize = 16;

/// The listening socket, bound at `path` by way of a temporary name and `rename`, so a client
/// reconnecting during a takeover finds either the old keeper or this one, never no socket.
struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// The socket file's identity, to leave alone a path another keeper has taken since.
    file: (u64, u64),
}

impl Listener {
    fn bind(path: &Path) -> anyhow::Result<Self> {
        socket::check_socket_path(path).map_err(anyhow::Error::msg)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it (remove it or pick another --socket)",
                path.display()
            ),
            // Not probed with a connect: a keeper still listening there would log the probe
            // as a refused client (this process has no CAP_SYS_ADMIN).
            Ok(_) => tracing::info!(
                socket = %path.display(),
                "taking the socket path over: a keeper still listening there serves its clients until it exits, then they reconnect here"
            ),
            Err(_) => {}
        }
        let file_name = path
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("socket path {} has no file name", path.display()))?;
        let temp = dir.join(format!(
            ".{}.{}.new",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&temp);
        let fd = socket::seqpacket_socket(true).context("creating the keeper socket")?;
        let bound = (|| {
            socket::bind(fd.as_fd(), &temp)?;
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
            socket::listen(fd.as_fd(), MAX_CLIENTS)?;
            std::fs::rename(&temp, path)?;
            std::fs::symlink_metadata(path)
        })();
        let meta = match bound {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e).with_context(|| format!("binding the socket {}", path.display()));
            }
        };
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            file: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.file => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::info!(
                socket = %self.path.display(),
                "the socket path belongs to a newer keeper now; leaving it"
            ),
            Err(_) => {}
        }
    }
}

/// A client admitted, as the server knows it.
struct Client {
    id: ClientId,
    fd: OwnedFd,
    pid: i32,
}

/// Serves the keeper protocol on `socket` until SIGTERM or SIGINT, then closes every held
/// duplicate and exits. Blocks both signals in the calling thread (they are read from a
/// signalfd), so call it from the process's only thread. Replaces a socket file already at
/// `socket` (a stale one, or a live keeper's during a rollout: that keeper's clients come here
/// when it exits); creates its directory with mode 0700. Serves only clients that pass
/// [`check_client`]: root with `CAP_SYS_ADMIN`, as the plugin runs.
pub fn run_keeper(socket: &Path) -> anyhow::Result<()> {
    let signals = signal::block_stop_signals().context("blocking SIGTERM and SIGINT")?;
    let listener = Listener::bind(socket)?;
    let own_uid_map = std::fs::read_to_string("/proc/self/uid_map").context(
        "reading /proc/self/uid_map (the keeper's user namespace, which clients must share)",
    )?;
    tracing::info!(
        socket = %socket.display(),
        "keeper listening; holds FUSE connections and the volumes' Vault sessions (tokens, leased values) across daemon restarts, in memory only; reads no FUSE request"
    );
    let refusals = FailureLimiter::<&'static str>::default();
    let mut state = State::default();
    let mut clients: Vec<Client> = Vec::new();
    let mut next_id: ClientId = 1;
    let stopped_by = loop {
        let watched: Vec<BorrowedFd<'_>> = [signals.as_fd(), listener.fd.as_fd()]
            .into_iter()
            .chain(clients.iter().map(|c| c.fd.as_fd()))
            .collect();
        let polled = socket::poll_input(&watched).context("waiting for clients")?;
        if polled[0] != Polled::Quiet {
            break signal::stop_signal_name(signals.as_fd());
        }
        // Clients before the listener, and a hang-up handled as soon as it is read: one that
        // happened before a new client connected is seen before that client's requests.
        let now = Instant::now();
        let mut gone = Vec::new();
        // Each reply with its descriptors, duplicated when the request is handled: a later
        // request in the same round may change what is held.
        let mut outgoing: Vec<(ClientId, Reply, Vec<OwnedFd>)> = Vec::new();
        for (client, p) in clients.iter().zip(&polled[2..]) {
            let received = match p {
                Polled::Quiet => continue,
                Polled::HungUp => Ok(Received::Closed),
                Polled::Input => receive(client.fd.as_fd(), true),
            };
            match received {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Received::Message(message)) => {
                    let answer = message.and_then(|(bytes, fds)| {
                        // A stash carries a token: no copy outlives the request.
                        let bytes = zeroize::Zeroizing::new(bytes);
                        let request = decode::<Request>(&bytes)?;
                        state.handle(client.id, request, fds, now)
                    });
                    match answer {
                        Ok(Some(reply)) => {
                            outgoing.push(with_descriptors(client.id, reply, &state))
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if let Some(suppressed) = refusals.admit(e.kind()) {
                                tracing::warn!(
                                    client = client.id,
                                    pid = client.pid,
                                    suppressed,
                                    "refused a request: {e}"
                                );
                            }
                            let message = e.to_string();
                            outgoing.push((client.id, Reply::Error { message }, Vec::new()));
                        }
                    }
                }
                closed => {
                    if let Err(e) = closed {
                        tracing::warn!(client = client.id, "reading from a client failed: {e}");
                    }
                    gone.push(client.id);
                    outgoing.extend(bare(state.hung_up(client.id, now)));
                }
            }
        }
        // Answering can find more clients gone, whose hang-ups can make more answers due.
        while !outgoing.is_empty() {
            for (id, reply, fds) in std::mem::take(&mut outgoing) {
                let Some(client) = clients.iter().find(|c| c.id == id) else {
                    continue;
                };
                if gone.contains(&id) {
                    continue;
                }
                let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                let message = zeroize::Zeroizing::new(encode(&reply));
                if let Err(e) = socket::send_with_fds(client.fd.as_fd(), &message, &fds, true) {
                    // Replies are small: a client whose buffer is full is not reading them.
                    tracing::warn!(
                        client = id,
                        "cannot answer a client ({e}); disconnecting it"
                    );
                    gone.push(id);
                    outgoing.extend(bare(state.hung_up(id, now)));
                }
            }
        }
        clients.retain(|c| !gone.contains(&c.id));
        if polled[1] != Polled::Quiet {
            accept_clients(
                &listener,
                &own_uid_map,
                &mut clients,
                &mut next_id,
                &refusals,
            );
        }
    };
    let (held, unowned) = state.held_and_unowned();
    tracing::info!(
        held,
        unowned,
        "{stopped_by} received; closing the held connections and exiting"
    );
    if unowned > 0 {
        tracing::warn!(
            unowned,
            "no daemon owned some held connections: their mounts now fail with ENOTCONN"
        );
    }
    drop(state);
    drop(clients);
    drop(listener);
    Ok(())
}

/// A reply ready to send: a `held` reply with duplicates of the held descriptors.
fn with_descriptors(
    client: ClientId,
    reply: Reply,
    state: &State,
) -> (ClientId, Reply, Vec<OwnedFd>) {
    if !matches!(reply, Reply::Held { .. }) {
        return (client, reply, Vec::new());
    }
    let duplicated: io::Result<Vec<OwnedFd>> = state
        .descriptors()
        .iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect();
    match duplicated {
        Ok(fds) => (client, reply, fds),
        Err(e) => {
            tracing::warn!(client, "cannot duplicate the held descriptors: {e}");
            let message = format!("the keeper cannot duplicate its descriptors to send them: {e}");
            (client, Reply::Error { message }, Vec::new())
        }
    }
}

fn bare(replies: Vec<(ClientId, Reply)>) -> impl Iterator<Item = (ClientId, Reply, Vec<OwnedFd>)> {
    replies
        .into_iter()
        .map(|(id, reply)| (id, reply, Vec::new()))
}

/// Admits every client waiting on the listener that passes [`check_client`], up to
/// [`MAX_CLIENTS`]; tells the others why, and disconnects them.
fn accept_clients(
    listener: &Listener,
    own_uid_map: &str,
    clients: &mut Vec<Client>,
    next_id: &mut ClientId,
    refusals: &FailureLimiter<&'static str>,
) {
    loop {
        let fd = match socket::accept(listener.fd.as_fd()) {
            Ok(fd) => fd,
            Err(err) => match err.kind() {
                io::ErrorKind::WouldBlock => return,
                io::ErrorKind::Interrupted => continue,
                _ => {
                    tracing::warn!("accepting a client failed: {err}");
                    return;
                }
            },
        };
        let refuse = |fd: &OwnedFd, message: String| {
            let reply = encode(&Reply::Error { message });
            let _ = socket::send_with_fds(fd.as_fd(), &reply, &[], true);
            // Closing with requests unread would reset the connection and lose the reply.
            while let Ok(Received::Message(_)) = receive(fd.as_fd(), true) {}
        };
        let peer = match pidfd::socket_peer(fd.as_fd()) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("cannot read a client's credentials ({e}); disconnecting it");
                continue;
            }
        };
        if let Err(refusal) = check_client(&peer, own_uid_map) {
            if let Some(suppressed) = refusals.admit(refusal.kind()) {
                tracing::warn!(
                    pid = peer.pid,
                    uid = peer.uid,
                    missing = refusal.missing(),
                    suppressed,
                    "refused a client: {refusal}"
                );
            }
            refuse(&fd, refusal.to_string());
            continue;
        }
        if clients.len() >= MAX_CLIENTS {
            let message = format!(
                "the keeper serves at most {MAX_CLIENTS} clients at once (pid {} refused)",
                peer.pid
            );
            if let Some(suppressed) = refusals.admit("clients") {
                tracing::warn!(suppressed, "refused a client: {message}");
            }
            refuse(&fd, message);
            continue;
        }
        let id = *next_id;
        *next_id += 1;
        tracing::debug!(
            client = id,
            pid = peer.pid,
            uid = peer.uid,
            "client connected"
        );
        clients.push(Client {
            id,
            fd,
            pid: peer.pid,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_past_sun_path_are_refused() {
        assert!(socket::check_socket_path(Path::new(DEFAULT_SOCKET)).is_ok());
        let long = format!("/{}", "a".repeat(107));
        assert!(socket::check_socket_path(Path::new(&long))
            .unwrap_err()
            .contains("1 to 107 bytes"));
    }
}
