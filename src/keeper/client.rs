//! The keeper's client: a blocking connection the daemon uses to put, take and release its
//! FUSE connections and to stash, unstash and forget its volumes' records. One request and its
//! reply are one exchange; errors name the keeper's socket and what was asked.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::protocol::{
    check_connection, decode, encode, receive, Received, Reply, Request, Sealed,
};
use crate::sys::{pidfd, process, socket};

/// A connection taken from the keeper: the daemon now owns it and should serve it (the keeper
/// goes on holding its own duplicate).
#[derive(Debug)]
pub struct TakenConnection {
    /// The name it was put under (`node` for the CSI node connection).
    pub name: String,
    /// The kernel's INIT record, as it was put.
    pub init: Vec<u8>,
    /// A duplicate of the live `/dev/fuse` descriptor.
    pub fd: OwnedFd,
}

/// A blocking client of the keeper. Calls may come from several threads: each request and its
/// reply are one exchange under a lock, and [`KeeperClient::wait_closed`] takes no lock. What
/// this client puts or takes is owned by this connection to the keeper: dropping the client
/// tells the keeper its owner is gone.
pub struct KeeperClient {
    socket: OwnedFd,
    path: PathBuf,
    exchange: Mutex<()>,
}

impl std::fmt::Debug for KeeperClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeeperClient {
    /// Connects to the keeper at `path`, refusing a keeper that runs as neither root nor this
    /// process's uid (the keeper needs no capability). The keeper, in turn, serves this process
    /// only if it passes [`super::check_client`] (root with `CAP_SYS_ADMIN`); if not, its reason comes
    /// back as the error of the first request.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let socket = socket::connect_seqpacket(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("connecting to the keeper at {}: {e}", path.display()),
            )
        })?;
        let cred = pidfd::peer_credentials(socket.as_fd())?;
        let own_uid = process::effective_uid();
        if cred.uid != 0 && cred.uid != own_uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the keeper at {} runs as uid {}; expected root or uid {own_uid}",
                    path.display(),
                    cred.uid
                ),
            ));
        }
        Ok(Self {
            socket,
            path,
            exchange: Mutex::new(()),
        })
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes every connection the keeper holds (none is an empty list): this client becomes
    /// their owner, and their previous owner, if still connected, its predecessor.
    pub fn take(&self) -> io::Result<Vec<TakenConnection>> {
        let (reply, fds) = self.exchange(&Request::Take, &[])?;
        let Reply::Held { connections } = reply else {
            return Err(self.unexpected("take", "held", &reply));
        };
        if connections.len() != fds.len() {
            return Err(self.error(
                io::ErrorKind::InvalidData,
                format!(
                    "answered take with {} connections but {} descriptors",
                    connections.len(),
                    fds.len()
                ),
            ));
        }
        Ok(connections
            .into_iter()
            .zip(fds)
            .map(|(c, fd)| TakenConnection {
                name: c.name,
                init: c.init,
                fd,
            })
            .collect())
    }

    /// Hands the keeper a duplicate of `fd` to hold under `name` (replacing any it held under
    /// that name), with the kernel's INIT record `init`.
    pub fn put(&self, name: &str, init: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
        check_connection(name, init)
            .map_err(|e| self.error(io::ErrorKind::InvalidInput, format!("put: {e}")))?;
        let request = Request::Put {
            name: name.to_string(),
            init: init.to_vec(),
        };
        self.expect_done("put", &request, &[fd])
    }

    /// Blocks until every predecessor (the owner of what [`KeeperClient::take`] took, if it was
    /// still connected then) has hung up; returns how long the taken connections had no owner
    /// before the take (zero if their owner was still there). Holds the client's exchange lock
    /// while it waits.
    pub fn wait_predecessor(&self) -> io::Result<Duration> {
        let (reply, _) = self.exchange(&Request::WaitPredecessor, &[])?;
        match reply {
            Reply::PredecessorGone { unserved_ms } => Ok(Duration::from_millis(unserved_ms)),
            other => Err(self.unexpected("wait_predecessor", "predecessor_gone", &other)),
        }
    }

    /// Tells the keeper to stop holding `name` (its mount is gone for good).
    pub fn release(&self, name: &str) -> io::Result<()> {
        let request = Request::Release {
            name: name.to_string(),
        };
        self.expect_done("release", &request, &[])
    }

    /// Has the keeper keep `record` under `name` in memory (replacing what it kept there).
    pub fn stash(&self, name: &str, record: &Sealed) -> io::Result<()> {
        let request = Request::Stash {
            name: name.to_string(),
            record: record.clone(),
        };
        self.expect_done("stash", &request, &[])
    }

    /// The record the keeper keeps under `name`, if any.
    pub fn unstash(&self, name: &str) -> io::Result<Option<Sealed>> {
        let request = Request::Unstash {
            name: name.to_string(),
        };
        match self.exchange(&request, &[])?.0 {
            Reply::Stashed { record } => Ok(record),
            other => Err(self.unexpected("unstash", "stashed", &other)),
        }
    }

    /// Has the keeper drop the record under `name`.
    pub fn forget(&self, name: &str) -> io::Result<()> {
        let request = Request::Forget {
            name: name.to_string(),
        };
        self.expect_done("forget", &request, &[])
    }

    /// Blocks until the keeper goes away (its end of the socket is closed).
    pub fn wait_closed(&self) -> io::Result<()> {
        socket::wait_hang_up(self.socket.as_fd())
            .map_err(|err| self.error(err.kind(), format!("waiting for it to close: {err}")))
    }

    fn expect_done(&self, what: &str, request: &Request, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        match self.exchange(request, fds)?.0 {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(what, "done", &other)),
        }
    }

    fn exchange(
        &self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<(Reply, Vec<OwnedFd>)> {
        let what = request.kind();
        let _one_at_a_time = self
            .exchange
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let message = zeroize::Zeroizing::new(encode(request));
        socket::send_with_fds(self.socket.as_fd(), &message, fds, false)
            .map_err(|e| self.error(e.kind(), format!("sending {what}: {e}")))?;
        let received = receive(self.socket.as_fd(), false)
            .map_err(|e| self.error(e.kind(), format!("reading the reply to {what}: {e}")))?;
        let (bytes, fds) = match received {
            Received::Closed => {
                return Err(self.error(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed the connection before answering {what}"),
                ))
            }
            Received::Message(m) => m.map_err(|e| {
                self.error(
                    io::ErrorKind::InvalidData,
                    format!("bad reply to {what}: {e}"),
                )
            })?,
        };
        let bytes = zeroize::Zeroizing::new(bytes);
        let reply = decode::<Reply>(&bytes).map_err(|e| {
            self.error(
                io::ErrorKind::InvalidData,
                format!("bad reply to {what}: {e}"),
            )
        })?;
        if let Reply::Error { message } = &reply {
            return Err(self.error(io::ErrorKind::Other, format!("refused {what}: {message}")));
        }
        Ok((reply, fds))
    }

    fn unexpected(&self, what: &str, expected: &str, got: &Reply) -> io::Error {
        let kind = match got {
            Reply::Done => "done",
            Reply::Held { .. } => "held",
            Reply::PredecessorGone { .. } => "predecessor_gone",
            Reply::Stashed { .. } => "stashed",
            Reply::Error { .. } => "error",
        };
        self.error(
            io::ErrorKind::InvalidData,
            format!("answered {what} with {kind}; expected {expected}"),
        )
    }

    fn error(&self, kind: io::ErrorKind, message: String) -> io::Error {
        io::Error::new(
            kind,
            format!("keeper at {}: {message}", self.path.display()),
        )
    }
}
