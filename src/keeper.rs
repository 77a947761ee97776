//! The keeper (`vaultfs keeper`): a small long-lived process that holds duplicates of live FUSE
//! connections handed to it over a unix socket, so that a mount outlives the daemon serving it
//! and a successor daemon can take the connection and serve it again. It never reads FUSE
//! requests. It also holds, in memory only, each volume's Vault session (token and its renewal
//! plan) and leased values (dynamic credentials with their leases) as opaque records the daemon
//! stashes, so that a successor reuses them instead of logging in and reading new credentials.
//! Also the blocking client the daemon uses.
//! Uses std, libc, serde/serde_json, thiserror, tracing (and anyhow for `run_keeper`'s error
//! chain) and, in vaultfs, `logging` only.
//!
//! # Wire protocol
//! One `SOCK_SEQPACKET` unix socket: every message is one packet (so no framing of our own, and
//! descriptors travel with the message they belong to, as `SCM_RIGHTS`). A message is a JSON
//! object of at most [`MAX_MESSAGE_BYTES`] with `"version": 1` and a `"type"`:
//!
//! | request | descriptors | reply |
//! |---|---|---|
//! | `put {name, init}` | exactly 1 | `done` |
//! | `take` | none | `held {connections: [{name, init}]}` + one descriptor per connection, in order |
//! | `wait_predecessor` | none | `predecessor_gone {unserved_ms}`, once the predecessor hung up |
//! | `release {name}` | none | `done` |
//! | `stash {name, record}` | none | `done` |
//! | `unstash {name}` | none | `stashed {record}` (`null` if none; the record stays) |
//! | `forget {name}` | none | `done` |
//!
//! Any refusal is `error {message}`. `init` is the kernel's INIT record as hex (opaque here).
//! The keeper ignores fields it does not know, so a later version may add optional ones; a
//! new kind of request gets `error` from a keeper that predates it, which the sender can treat
//! as "not supported". A `version` other than [`PROTOCOL_VERSION`] is refused.
//!
//! Std has no `SOCK_SEQPACKET` and no `SCM_RIGHTS`; the few `libc` calls below are simpler
//! than a crate (nix, sendfd) for one socket type and one control message.
//!
//! # Who may connect
//! What the keeper holds reads every pod's secrets (tokens) and FUSE requests (the descriptor),
//! so it answers only a client that holds what the plugin holds: uid 0 *and* `CAP_SYS_ADMIN` in
//! its effective set, in the keeper's user namespace (see [`check_client`]). A root process
//! without capabilities (a container that dropped them all, a host agent) is refused, and so
//! is one that gave itself capabilities in a user namespace of its own. There is no exception
//! for the keeper's own uid: a keeper run as another user serves nobody. The check reads
//! `/proc/<pid>` of the client, so the keeper must see the client's pid namespace (in a cluster:
//! `hostPID: true`); a client it cannot see is refused, saying so. A refused client gets one
//! `error` message, unasked, and is disconnected.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::logging::FailureLimiter;

/// Where `vaultfs keeper` listens and the daemon connects, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vaultfs-keeper/keeper.sock";
/// The protocol version every message carries.
pub const PROTOCOL_VERSION: u64 = 1;
/// Largest message, either way. A full `held` reply fits (checked by a test).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest `init` record (the kernel's is about a hundred bytes).
pub const MAX_INIT_BYTES: usize = 4096;
/// Longest connection name; names are `[A-Za-z0-9._-]`, at least one character.
pub const MAX_NAME_BYTES: usize = 64;
/// Most connections held at once, and so most descriptors in one message. A node daemon
/// hands over one.
pub const MAX_HELD: usize = 4;
/// Most clients connected at once; one more is told so and disconnected.
pub const MAX_CLIENTS: usize = 16;
/// Largest stashed record: a volume's token and its schedule take a few hundred bytes, its
/// leased values (database credentials, certificates) more; as hex in a message, a record this
/// size still fits in [`MAX_MESSAGE_BYTES`].
pub const MAX_RECORD_BYTES: usize = 28 * 1024;
/// Most records stashed at once: two per volume, more than a node serves.
pub const MAX_STASHED: usize = 32 * 1024;
/// Most bytes of records stashed at once: well inside the keeper's memory limit (32 MiB in
/// `deploy/base`); 1,000 volumes with a token and a database credential each take about 1 MiB.
pub const MAX_STASHED_BYTES: usize = 16 * 1024 * 1024;

/// Why a client is refused as soon as it connects, before anything it sends is read. The text
/// goes back to it in an `error` message, and to the keeper's log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClientRefusal {
    #[error("uid {uid} (pid {pid}) may not use the keeper: only root with CAP_SYS_ADMIN, as the plugin runs, may")]
    NotRoot { uid: u32, pid: i32 },
    #[error("pid {pid} (uid 0) may not use the keeper: its effective capabilities lack CAP_SYS_ADMIN, which the plugin holds")]
    NoCapability { pid: i32 },
    #[error("pid {pid} (uid 0) may not use the keeper: it runs in a user namespace other than the keeper's, where its capabilities do not count")]
    UserNamespace { pid: i32 },
    #[error("a client (uid {uid}) in a pid namespace the keeper cannot see may not use the keeper: its capabilities cannot be checked; run the keeper in the host's pid namespace (hostPID: true)")]
    Hidden { uid: u32 },
    #[error("pid {pid} (uid {uid}) exited before its capabilities could be checked")]
    Gone { pid: i32, uid: u32 },
    #[error(
        "pid {pid} (uid {uid}) may not use the keeper: its capabilities cannot be checked: {error}"
    )]
    Unchecked { pid: i32, uid: u32, error: String },
}

/// Why a message was refused. The text goes back to the sender in an `error` reply.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeeperError {
    #[error("the message is over the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("the message carries more than {MAX_HELD} descriptors")]
    TooManyDescriptors,
    #[error("the message is not a JSON object: {0}")]
    NotJson(String),
    #[error("the message has no numeric \"version\"; expected \"version\": {PROTOCOL_VERSION}")]
    NoVersion,
    #[error("protocol version {0} is not supported; this side speaks version {PROTOCOL_VERSION}")]
    Version(u64),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("invalid connection name {0:?}: expected 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    #[error("init record of {0} bytes is over the limit of {MAX_INIT_BYTES} bytes")]
    InitTooLarge(usize),
    #[error("{request} carries {expected} descriptor(s), got {got}")]
    Descriptors {
        request: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("the keeper already holds {MAX_HELD} connections; release one first")]
    Full,
    #[error("a wait_predecessor is still pending on this connection; wait for its reply")]
    Pending,
    #[error("record of {0} bytes is over the limit of {MAX_RECORD_BYTES} bytes")]
    RecordTooLarge(usize),
    #[error("a later daemon took this client's connections over: its records are no longer kept")]
    Superseded,
    #[error("the keeper already stashes {MAX_STASHED} records or {MAX_STASHED_BYTES} bytes; forget one first")]
    StashFull,
}

/// A request, client to keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Hold the one descriptor that comes with this message under `name`, replacing (and
    /// closing) any held before under that name. The sender becomes its owner.
    Put {
        name: String,
        #[serde(with = "hex")]
        init: Vec<u8>,
    },
    /// Send every held connection; the sender becomes the owner of all of them, and their
    /// previous owners still connected become its predecessors.
    Take,
    /// Answer once every predecessor has hung up (at once if there is none).
    WaitPredecessor,
    /// Stop holding `name` (its mount is gone for good).
    Release { name: String },
    /// Keep `record` under `name` in memory, replacing any record kept under that name.
    Stash { name: String, record: Sealed },
    /// Send the record kept under `name`, if any; it stays kept.
    Unstash { name: String },
    /// Drop the record kept under `name`.
    Forget { name: String },
}

/// A reply, keeper to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The request was carried out.
    Done,
    /// Every held connection, with one descriptor each in the same order.
    Held { connections: Vec<ConnectionInfo> },
    /// The predecessors are gone; `unserved_ms` is how long the taken connections had no
    /// owner connected before the take (0 if their owner was still there).
    PredecessorGone { unserved_ms: u64 },
    /// The record asked for, if one is kept.
    Stashed { record: Option<Sealed> },
    /// The request was refused.
    Error { message: String },
}

/// A stashed record: opaque to the keeper, wiped from memory when dropped, and never shown by
/// `Debug` (it holds a Vault token).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(zeroize::Zeroizing<String>);

impl Serialize for Sealed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hex::serialize(self.0.as_bytes(), s)
    }
}

impl<'de> Deserialize<'de> for Sealed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = hex::deserialize(d)?;
        String::from_utf8(bytes).map(Self::new).map_err(|e| {
            let mut bytes = e.into_bytes();
            zeroize::Zeroize::zeroize(&mut bytes);
            serde::de::Error::custom("the record is not UTF-8")
        })
    }
}

impl Sealed {
    pub fn new(record: String) -> Self {
        Self(zeroize::Zeroizing::new(record))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed(<{} bytes redacted>)", self.0.len())
    }
}

/// A held connection as it travels in a `held` reply, without its descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub name: String,
    #[serde(with = "hex")]
    pub init: Vec<u8>,
}

/// Bytes as hex text (INIT records, stashed records): no escaping, so no unescaped copy of a
/// record is left in a parser's buffers; the text is wiped once used.
mod hex {
    use serde::{de, Deserialize, Deserializer, Serializer};
    use zeroize::{Zeroize, Zeroizing};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(bytes.len() * 2));
        for b in bytes {
            text.push(char::from(DIGITS[usize::from(b >> 4)]));
            text.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let mut text = String::deserialize(d)?;
        let valid = text.len() % 2 == 0 && text.bytes().all(|c| c.is_ascii_hexdigit());
        let bytes = valid.then(|| {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("checked hex digits"))
                .collect()
        });
        text.zeroize();
        bytes.ok_or_else(|| {
            de::Error::custom("not hex: expected an even number of 0-9 a-f characters")
        })
    }
}

/// `body` as a message: its JSON object with the protocol version added.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut value = serde_json::to_value(body).expect("requests and replies serialize");
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("version".into(), PROTOCOL_VERSION.into());
    }
    // Sized once (no copies left behind by growing); the value may hold a record: wiped.
    let bytes = crate::secret::to_vec_exact(&value);
    crate::secret::wipe_json(&mut value);
    bytes
}

/// A message: checks its size and version before anything else, then its shape.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, KeeperError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(KeeperError::TooLarge);
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| KeeperError::NotJson(clip(e.to_string())))?;
    let object = value
        .as_object()
        .ok_or_else(|| KeeperError::NotJson("not an object".into()))?;
    match object.get("version").and_then(|v| v.as_u64()) {
        None => return Err(KeeperError::NoVersion),
        Some(PROTOCOL_VERSION) => {}
        Some(other) => return Err(KeeperError::Version(other)),
    }
    serde_json::from_value(value).map_err(|e| KeeperError::Malformed(clip(e.to_string())))
}

/// A parser's complaint, which may quote the message, cut to a log line's worth.
fn clip(mut text: String) -> String {
    const MAX: usize = 200;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Checks a connection's or a record's name.
pub fn check_name(name: &str) -> Result<(), KeeperError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(KeeperError::Name(name.to_string()))
    }
}

/// Checks what a `put` names and carries.
pub fn check_connection(name: &str, init: &[u8]) -> Result<(), KeeperError> {
    check_name(name)?;
    if init.len() > MAX_INIT_BYTES {
        return Err(KeeperError::InitTooLarge(init.len()));
    }
    Ok(())
}

/// Why `path` cannot be a unix socket's address, if it cannot.
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    // sun_path holds 108 bytes including the terminating NUL.
    if len == 0 || len > 107 || path.as_os_str().as_bytes().contains(&0) {
        return Err(format!(
            "socket path {} is not usable: expected 1 to 107 bytes without NUL",
            path.display()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The keeper's state: plain logic, no I/O.
// ---------------------------------------------------------------------------------------------

type ClientId = u64;

struct Held {
    init: Vec<u8>,
    fd: OwnedFd,
    owner: Option<ClientId>,
    /// When the owner hung up, while there is none.
    unowned_since: Option<Instant>,
}

#[derive(Default)]
struct Successor {
    /// Owners, still connected at the take, of what was taken.
    predecessors: BTreeSet<ClientId>,
    unserved: Duration,
    /// A `wait_predecessor` is waiting for its reply.
    waiting: bool,
}

#[derive(Default)]
struct State {
    held: BTreeMap<String, Held>,
    successors: BTreeMap<ClientId, Successor>,
    /// Clients whose connections a later client took: their stashes would overwrite the
    /// records of the daemon that now serves.
    superseded: BTreeSet<ClientId>,
    stashed: BTreeMap<String, Sealed>,
    /// Bytes of the records in `stashed`.
    stashed_bytes: usize,
}

impl State {
    /// Carries out `request` from `client`; `None` when the reply comes later (from
    /// [`State::hung_up`]). A `held` reply goes with [`State::descriptors`].
    fn handle(
        &mut self,
        client: ClientId,
        request: Request,
        mut fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<Option<Reply>, KeeperError> {
        if self.successors.get(&client).is_some_and(|s| s.waiting) {
            return Err(KeeperError::Pending);
        }
        let expected = usize::from(matches!(request, Request::Put { .. }));
        if fds.len() != expected {
            return Err(KeeperError::Descriptors {
                request: request.kind(),
                expected,
                got: fds.len(),
            });
        }
        match request {
            Request::Put { name, init } => {
                check_connection(&name, &init)?;
                if !self.held.contains_key(&name) && self.held.len() >= MAX_HELD {
                    return Err(KeeperError::Full);
                }
                let fd = fds.pop().expect("exactly one descriptor, checked above");
                let replaced = self.held.insert(
                    name.clone(),
                    Held {
                        init,
                        fd,
                        owner: Some(client),
                        unowned_since: None,
                    },
                );
                tracing::info!(
                    name,
                    client,
                    replaced = replaced.is_some(),
                    held = self.held.len(),
                    "holding a connection"
                );
                Ok(Some(Reply::Done))
            }
            Request::Take => {
                let mut taken = Successor::default();
                for held in self.held.values_mut() {
                    match (held.owner, held.unowned_since) {
                        (Some(owner), _) if owner != client => {
                            taken.predecessors.insert(owner);
                            self.superseded.insert(owner);
                        }
                        (None, Some(since)) => {
                            taken.unserved =
                                taken.unserved.max(now.saturating_duration_since(since));
                        }
                        _ => {}
                    }
                    held.owner = Some(client);
                    held.unowned_since = None;
                }
                tracing::info!(
                    client,
                    connections = self.held.len(),
                    predecessors = taken.predecessors.len(),
                    unserved_ms = taken.unserved.as_millis() as u64,
                    "connections taken"
                );
                self.successors.insert(client, taken);
                Ok(Some(Reply::Held {
                    connections: self
                        .held
                        .iter()
                        .map(|(name, held)| ConnectionInfo {
                            name: name.clone(),
                            init: held.init.clone(),
                        })
                        .collect(),
                }))
            }
            Request::WaitPredecessor => match self.successors.get_mut(&client) {
                Some(s) if !s.predecessors.is_empty() => {
                    s.waiting = true;
                    Ok(None)
                }
                s => Ok(Some(Reply::PredecessorGone {
                    unserved_ms: s.map_or(0, |s| s.unserved.as_millis() as u64),
                })),
            },
            Request::Release { name } => {
                let released = self.held.remove(&name).is_some();
                tracing::info!(
                    name,
                    client,
                    released,
                    held = self.held.len(),
                    "connection released"
                );
                Ok(Some(Reply::Done))
            }
            Request::Stash { .. } | Request::Forget { .. } if self.superseded.contains(&client) => {
                Err(KeeperError::Superseded)
            }
            Request::Stash { name, record } => {
                check_name(&name)?;
                if record.expose().len() > MAX_RECORD_BYTES {
                    return Err(KeeperError::RecordTooLarge(record.expose().len()));
                }
                let replaced = self.stashed.get(&name).map_or(0, |r| r.expose().len());
                let bytes = self.stashed_bytes - replaced + record.expose().len();
                let count = self.stashed.len() + usize::from(!self.stashed.contains_key(&name));
                if count > MAX_STASHED || bytes > MAX_STASHED_BYTES {
                    return Err(KeeperError::StashFull);
                }
                self.stashed_bytes = bytes;
                self.stashed.insert(name, record);
                Ok(Some(Reply::Done))
            }
            Request::Unstash { name } => Ok(Some(Reply::Stashed {
                record: self.stashed.get(&name).cloned(),
            })),
            Request::Forget { name } => {
                if let Some(record) = self.stashed.remove(&name) {
                    self.stashed_bytes -= record.expose().len();
                }
                Ok(Some(Reply::Done))
            }
        }
    }

    /// The held descriptors, in the order of a `held` reply.
    fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
        self.held.values().map(|h| h.fd.as_fd()).collect()
    }

    /// `client` is gone: what it owned is unowned from `now`. Returns the deferred replies now
    /// due to successors whose last predecessor it was.
    fn hung_up(&mut self, client: ClientId, now: Instant) -> Vec<(ClientId, Reply)> {
        for (name, held) in &mut self.held {
            if held.owner == Some(client) {
                tracing::warn!(
                    name,
                    client,
                    "the owner of a held connection hung up; nobody serves it until a daemon takes it"
                );
                held.owner = None;
                held.unowned_since = Some(now);
            }
        }
        self.successors.remove(&client);
        self.superseded.remove(&client);
        let mut due = Vec::new();
        for (id, s) in &mut self.successors {
            if s.predecessors.remove(&client) && s.predecessors.is_empty() && s.waiting {
                s.waiting = false;
                due.push((
                    *id,
                    Reply::PredecessorGone {
                        unserved_ms: s.unserved.as_millis() as u64,
                    },
                ));
            }
        }
        due
    }
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Put { .. } => "put",
            Request::Take => "take",
            Request::WaitPredecessor => "wait_predecessor",
            Request::Release { .. } => "release",
            Request::Stash { .. } => "stash",
            Request::Unstash { .. } => "unstash",
            Request::Forget { .. } => "forget",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets: SOCK_SEQPACKET with SCM_RIGHTS.
// ---------------------------------------------------------------------------------------------

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn seqpacket_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor we own.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | flags, 0) })?;
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn socket_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    check_socket_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.as_os_str().len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn connect_socket(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = socket_address(path)?;
    let fd = seqpacket_socket(false)?;
    // SAFETY: addr is a valid sockaddr_un of length len, alive for the call.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// Sends one message with `fds` attached. `MSG_NOSIGNAL`: a peer gone is an error, not SIGPIPE.
fn send_message(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    nonblocking: bool,
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if raw.is_empty() {
        0
    } else {
        unsafe { libc::CMSG_SPACE(payload) as usize }
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one cmsghdr with `payload` bytes of data
        // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
    }
    let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: msg points at iov, bytes and control, all alive for the call.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, flags) };
        if sent >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// What one `recvmsg` gave.
enum Received {
    /// The peer hung up (a zero-length packet reads the same way; neither side sends one).
    Closed,
    /// A message: its bytes, or why it was refused. Descriptors that came with a refused
    /// message are closed.
    Message(Result<(Vec<u8>, Vec<OwnedFd>), KeeperError>),
}

fn recv_message(socket: BorrowedFd<'_>, nonblocking: bool) -> io::Result<Received> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_HELD * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    let len = loop {
        // SAFETY: msg points at buffers of the lengths it gives, alive for the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsghdrs; the CMSG
    // macros walk only within it. Every SCM_RIGHTS entry is a descriptor now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Ok(Received::Message(Err(KeeperError::TooManyDescriptors)));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Ok(Received::Message(Err(KeeperError::TooLarge)));
    }
    if len == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    buf.truncate(len);
    Ok(Received::Message(Ok((buf, fds))))
}

// ---------------------------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------------------------

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
        check_socket_path(path).map_err(anyhow::Error::msg)?;
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
        let fd = seqpacket_socket(true).context("creating the keeper socket")?;
        let bound = (|| {
            let (addr, len) = socket_address(&temp)?;
            // SAFETY: addr is a valid sockaddr_un of length len, alive for the call.
            cvt(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    len,
                )
            })?;
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
            // SAFETY: listen takes no pointers.
            cvt(unsafe { libc::listen(fd.as_raw_fd(), MAX_CLIENTS as libc::c_int) })?;
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

/// SIGTERM and SIGINT, blocked and read from a signalfd in the poll loop.
fn stop_signals() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
    // and signalfd read the set, alive for the calls. A non-negative signalfd is ours.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn signal_name(signalfd: BorrowedFd<'_>) -> &'static str {
    // SAFETY: signalfd_siginfo is plain data; read writes at most its size into it.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: info is valid for writes of `size` bytes.
    let n = unsafe {
        libc::read(
            signalfd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    match (n == size as isize).then_some(info.ssi_signo as i32) {
        Some(libc::SIGTERM) => "SIGTERM",
        Some(libc::SIGINT) => "SIGINT",
        _ => "a stop signal",
    }
}

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
    let signals = stop_signals().context("blocking SIGTERM and SIGINT")?;
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
        let mut polled: Vec<libc::pollfd> = [signals.as_raw_fd(), listener.fd.as_raw_fd()]
            .into_iter()
            .chain(clients.iter().map(|c| c.fd.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: polled is a valid array of pollfd of the length given.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("waiting for clients");
        }
        if polled[0].revents != 0 {
            break signal_name(signals.as_fd());
        }
        // Clients before the listener, and a hang-up handled as soon as it is read: one that
        // happened before a new client connected is seen before that client's requests.
        let now = Instant::now();
        let mut gone = Vec::new();
        // Each reply with its descriptors, duplicated when the request is handled: a later
        // request in the same round may change what is held.
        let mut outgoing: Vec<(ClientId, Reply, Vec<OwnedFd>)> = Vec::new();
        for (client, p) in clients.iter().zip(&polled[2..]) {
            if p.revents == 0 {
                continue;
            }
            let received = if p.revents & libc::POLLIN == 0 {
                Ok(Received::Closed)
            } else {
                recv_message(client.fd.as_fd(), true)
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
                if let Err(e) = send_message(client.fd.as_fd(), &message, &fds, true) {
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
        if polled[1].revents != 0 {
            accept_clients(
                &listener,
                &own_uid_map,
                &mut clients,
                &mut next_id,
                &refusals,
            );
        }
    };
    let held = state.held.len();
    let unowned = state.held.values().filter(|h| h.owner.is_none()).count();
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

/// Whether `peer` may use the keeper: uid 0 (`SO_PEERCRED`) and `CAP_SYS_ADMIN` in its
/// effective set (`/proc/<pid>/status`), in the keeper's own user namespace (its
/// `/proc/<pid>/uid_map` reads as `own_uid_map`, the keeper's). Race-free: the process is held
/// by a pidfd (`SO_PEERPIDFD`, the very process that connected) while `/proc/<pid>` is read, and
/// is still alive afterwards, so what was read was about it and not about a process that got its
/// pid since.
///
/// The user namespace: a root process without capabilities may create a user namespace, in which
/// it holds every capability (`CapEff` shows them all) while it stays uid 0 to the keeper; the
/// capabilities count only inside that namespace. A namespace's `uid_map` can read as the
/// keeper's whole-range map only if its creator held `CAP_SETUID` and `CAP_SETFCAP` in the
/// keeper's namespace.
pub fn check_client(peer: &crate::pidfd::Peer, own_uid_map: &str) -> Result<(), ClientRefusal> {
    let (pid, uid) = (peer.pid, peer.uid);
    if uid != 0 {
        return Err(ClientRefusal::NotRoot { uid, pid });
    }
    if pid == 0 {
        return Err(ClientRefusal::Hidden { uid });
    }
    let unchecked = |e: &io::Error| match e.raw_os_error() {
        // EINVAL: SO_PEERPIDFD of a peer that has exited, on Linux 6.5 to 6.8.
        Some(libc::ESRCH | libc::ENOENT | libc::EINVAL) => ClientRefusal::Gone { pid, uid },
        _ => ClientRefusal::Unchecked {
            pid,
            uid,
            error: e.to_string(),
        },
    };
    let process = peer.process.as_ref().map_err(unchecked)?;
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| unchecked(&e))
    };
    let (status, uid_map) = (read("status")?, read("uid_map")?);
    if !process.is_alive() {
        return Err(ClientRefusal::Gone { pid, uid });
    }
    check_client_status(pid, &status, &uid_map, own_uid_map)
}

/// The part of [`check_client`] that reads what `/proc/<pid>` said: `status` and `uid_map`.
fn check_client_status(
    pid: i32,
    status: &str,
    uid_map: &str,
    own_uid_map: &str,
) -> Result<(), ClientRefusal> {
    match crate::pidfd::has_effective_capability(status, crate::pidfd::CAP_SYS_ADMIN) {
        None => Err(ClientRefusal::Unchecked {
            pid,
            uid: 0,
            error: "its /proc status has no CapEff line".into(),
        }),
        Some(false) => Err(ClientRefusal::NoCapability { pid }),
        Some(true) if uid_map != own_uid_map => Err(ClientRefusal::UserNamespace { pid }),
        Some(true) => Ok(()),
    }
}

impl ClientRefusal {
    /// A key per kind of refusal, for the log rate limit.
    fn kind(&self) -> &'static str {
        match self {
            ClientRefusal::NotRoot { .. } => "uid",
            ClientRefusal::NoCapability { .. } => "capability",
            ClientRefusal::UserNamespace { .. } => "user-namespace",
            ClientRefusal::Hidden { .. } => "hidden",
            ClientRefusal::Gone { .. } | ClientRefusal::Unchecked { .. } => "unchecked",
        }
    }

    /// What the client lacks, for the log line.
    fn missing(&self) -> &'static str {
        match self {
            ClientRefusal::NotRoot { .. } => "uid 0",
            ClientRefusal::NoCapability { .. } => "CAP_SYS_ADMIN",
            ClientRefusal::UserNamespace { .. } => "CAP_SYS_ADMIN in the keeper's user namespace",
            ClientRefusal::Hidden { .. }
            | ClientRefusal::Gone { .. }
            | ClientRefusal::Unchecked { .. } => "a checkable process",
        }
    }
}

fn accept_clients(
    listener: &Listener,
    own_uid_map: &str,
    clients: &mut Vec<Client>,
    next_id: &mut ClientId,
    refusals: &FailureLimiter<&'static str>,
) {
    loop {
        // SAFETY: null address pointers are allowed; a non-negative result is ours.
        let fd = unsafe {
            libc::accept4(
                listener.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return,
                io::ErrorKind::Interrupted => continue,
                _ => {
                    tracing::warn!("accepting a client failed: {err}");
                    return;
                }
            }
        }
        // SAFETY: fd was just returned by accept4 and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let refuse = |fd: &OwnedFd, message: String| {
            let _ = send_message(fd.as_fd(), &encode(&Reply::Error { message }), &[], true);
            // Closing with requests unread would reset the connection and lose the reply.
            while let Ok(Received::Message(_)) = recv_message(fd.as_fd(), true) {}
        };
        let peer = match crate::pidfd::socket_peer(fd.as_fd()) {
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

impl KeeperError {
    /// A key per kind of refusal, for the log rate limit.
    fn kind(&self) -> &'static str {
        match self {
            KeeperError::TooLarge => "too-large",
            KeeperError::TooManyDescriptors => "descriptors",
            KeeperError::NotJson(_) => "not-json",
            KeeperError::NoVersion | KeeperError::Version(_) => "version",
            KeeperError::Malformed(_) => "malformed",
            KeeperError::Name(_) | KeeperError::InitTooLarge(_) => "connection",
            KeeperError::Descriptors { .. } => "descriptors",
            KeeperError::Full => "full",
            KeeperError::Pending => "pending",
            KeeperError::RecordTooLarge(_) | KeeperError::StashFull | KeeperError::Superseded => {
                "stash"
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------------------------

/// A connection taken from the keeper: the daemon now owns it and should serve it.
#[derive(Debug)]
pub struct HeldConnection {
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
    /// only if it passes [`check_client`] (root with `CAP_SYS_ADMIN`); if not, its reason comes
    /// back as the error of the first request.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let socket = connect_socket(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("connecting to the keeper at {}: {e}", path.display()),
            )
        })?;
        let cred = crate::pidfd::peer_credentials(socket.as_fd())?;
        // SAFETY: geteuid takes no arguments and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
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
    pub fn take(&self) -> io::Result<Vec<HeldConnection>> {
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
            .map(|(c, fd)| HeldConnection {
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
        let mut p = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        loop {
            // SAFETY: p is one valid pollfd.
            let rc = unsafe { libc::poll(&mut p, 1, -1) };
            if rc > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(());
            }
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(self.error(err.kind(), format!("waiting for it to close: {err}")));
                }
            }
        }
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
        send_message(self.socket.as_fd(), &message, fds, false)
            .map_err(|e| self.error(e.kind(), format!("sending {what}: {e}")))?;
        let received = recv_message(self.socket.as_fd(), false)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn requests_round_trip_with_the_version_and_hex_init() {
        let put = Request::Put {
            name: "node".into(),
            init: vec![0x00, 0x1f, 0xff],
        };
        let bytes = encode(&put);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\"version\":1"), "{text}");
        assert!(text.contains("\"init\":\"001fff\""), "{text}");
        assert!(text.contains("\"type\":\"put\""), "{text}");
        assert_eq!(decode::<Request>(&bytes), Ok(put));
        for r in [
            Request::Take,
            Request::WaitPredecessor,
            Request::Release { name: "x".into() },
        ] {
            assert_eq!(decode::<Request>(&encode(&r)), Ok(r));
        }
    }

    #[test]
    fn unknown_fields_are_ignored_so_later_versions_can_add_optional_ones() {
        let msg = br#"{"version":1,"type":"take","relay_token":false}"#;
        assert_eq!(decode::<Request>(msg), Ok(Request::Take));
    }

    #[test]
    fn malformed_messages_are_refused_with_what_was_expected() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a JSON object"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"type":"take"}"#, "expected \"version\": 1"),
            (
                br#"{"version":2,"type":"take"}"#,
                "version 2 is not supported",
            ),
            (
                br#"{"version":1,"type":"steal"}"#,
                "unknown variant `steal`",
            ),
            (
                br#"{"version":1,"type":"put","name":"n"}"#,
                "missing field `init`",
            ),
            (
                br#"{"version":1,"type":"put","name":"n","init":"abc"}"#,
                "not hex: expected an even number of 0-9 a-f characters",
            ),
            (
                br#"{"version":1,"type":"put","name":"n","init":"zz"}"#,
                "not hex",
            ),
            (
                br#"{"version":1,"type":"stash","name":"n","record":"s.plain"}"#,
                "not hex",
            ),
            (
                br#"{"version":1,"type":"stash","name":"n","record":"ff"}"#,
                "the record is not UTF-8",
            ),
        ];
        for (bytes, expected) in cases {
            let err = decode::<Request>(bytes).expect_err("refused").to_string();
            assert!(
                err.contains(expected),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(decode::<Request>(&big), Err(KeeperError::TooLarge));
    }

    #[test]
    fn names_and_init_records_are_bounded() {
        assert!(check_connection("node", &[0; MAX_INIT_BYTES]).is_ok());
        assert!(check_connection("vol-1.a_b", &[]).is_ok());
        for bad in [
            "",
            "a/b",
            "a b",
            "é",
            "x\n",
            &"n".repeat(MAX_NAME_BYTES + 1),
        ] {
            assert_eq!(
                check_connection(bad, &[]),
                Err(KeeperError::Name(bad.to_string()))
            );
        }
        assert_eq!(
            check_connection("node", &[0; MAX_INIT_BYTES + 1]),
            Err(KeeperError::InitTooLarge(MAX_INIT_BYTES + 1))
        );
    }

    #[test]
    fn a_full_held_reply_fits_in_one_message() {
        let reply = Reply::Held {
            connections: (0..MAX_HELD)
                .map(|i| ConnectionInfo {
                    name: format!("{i}").repeat(MAX_NAME_BYTES),
                    init: vec![0xff; MAX_INIT_BYTES],
                })
                .collect(),
        };
        let bytes = encode(&reply);
        assert!(bytes.len() <= MAX_MESSAGE_BYTES, "{} bytes", bytes.len());
        assert!(decode::<Reply>(&bytes) == Ok(reply), "a full reply decodes");
    }

    #[test]
    fn socket_paths_past_sun_path_are_refused() {
        assert!(check_socket_path(Path::new(DEFAULT_SOCKET)).is_ok());
        let long = format!("/{}", "a".repeat(107));
        assert!(check_socket_path(Path::new(&long))
            .unwrap_err()
            .contains("1 to 107 bytes"));
    }

    const HOST_UID_MAP: &str = "         0          0 4294967295\n";

    fn status(cap_eff: &str) -> String {
        format!("Name:\tvaultfs\nUid:\t0\t0\t0\t0\nCapPrm:\t000001ffffffffff\nCapEff:\t{cap_eff}\n")
    }

    #[test]
    fn only_root_with_cap_sys_admin_in_the_keepers_user_namespace_is_served() {
        let plugin = status("000001ffffffffff");
        assert_eq!(
            check_client_status(7, &plugin, HOST_UID_MAP, HOST_UID_MAP),
            Ok(())
        );
        let just_sys_admin = status("0000000000200000");
        assert_eq!(
            check_client_status(7, &just_sys_admin, HOST_UID_MAP, HOST_UID_MAP),
            Ok(())
        );
        let all_but_sys_admin = status("000001ffffdfffff");
        let refused = check_client_status(7, &all_but_sys_admin, HOST_UID_MAP, HOST_UID_MAP);
        assert_eq!(refused, Err(ClientRefusal::NoCapability { pid: 7 }));
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("pid 7") && message.contains("CAP_SYS_ADMIN"),
            "{message}"
        );
        assert_eq!(
            check_client_status(7, &status("0000000000000000"), HOST_UID_MAP, HOST_UID_MAP),
            Err(ClientRefusal::NoCapability { pid: 7 })
        );
        // unshare(CLONE_NEWUSER) by a root without capabilities: every capability, in a
        // namespace of its own with no map (or a one-uid map).
        for uid_map in ["", "         0          0          1\n"] {
            assert_eq!(
                check_client_status(7, &plugin, uid_map, HOST_UID_MAP),
                Err(ClientRefusal::UserNamespace { pid: 7 }),
                "{uid_map:?}"
            );
        }
        assert!(matches!(
            check_client_status(7, "Name:\tx\n", HOST_UID_MAP, HOST_UID_MAP),
            Err(ClientRefusal::Unchecked { .. })
        ));
    }

    #[test]
    fn a_client_not_root_or_out_of_sight_is_refused_before_its_process_is_read() {
        let peer = |uid, pid| crate::pidfd::Peer {
            uid,
            pid,
            process: Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        let refused = check_client(&peer(1000, 42), HOST_UID_MAP).unwrap_err();
        assert_eq!(refused, ClientRefusal::NotRoot { uid: 1000, pid: 42 });
        assert!(
            refused.to_string().contains("uid 1000 (pid 42)"),
            "{refused}"
        );
        let hidden = check_client(&peer(0, 0), HOST_UID_MAP).unwrap_err();
        assert!(hidden.to_string().contains("hostPID: true"), "{hidden}");
        let gone = crate::pidfd::Peer {
            uid: 0,
            pid: 42,
            process: Err(io::Error::from_raw_os_error(libc::ESRCH)),
        };
        assert_eq!(
            check_client(&gone, HOST_UID_MAP),
            Err(ClientRefusal::Gone { pid: 42, uid: 0 })
        );
    }

    #[test]
    fn a_put_needs_exactly_one_descriptor_and_a_take_none() {
        let mut state = State::default();
        let now = Instant::now();
        let put = || Request::Put {
            name: "node".into(),
            init: vec![1],
        };
        assert!(matches!(
            state.handle(1, put(), vec![], now),
            Err(KeeperError::Descriptors {
                expected: 1,
                got: 0,
                ..
            })
        ));
        let (r, _w) = pipe();
        assert!(matches!(
            state.handle(1, Request::Take, vec![r], now),
            Err(KeeperError::Descriptors {
                expected: 0,
                got: 1,
                ..
            })
        ));
        assert!(state.held.is_empty());
    }

    #[test]
    fn records_are_stashed_outlive_their_client_and_are_forgotten_on_request() {
        let mut state = State::default();
        let now = Instant::now();
        let record = Sealed::new(r#"{"token":"s.kept-in-memory"}"#.into());
        let stash = Request::Stash {
            name: "v-7".into(),
            record: record.clone(),
        };
        assert_eq!(state.handle(1, stash, vec![], now), Ok(Some(Reply::Done)));
        let unstash = || Request::Unstash { name: "v-7".into() };
        assert!(state.hung_up(1, now).is_empty());
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed {
                record: Some(record.clone())
            })),
            "a record outlives the daemon that stashed it"
        );
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed {
                record: Some(record)
            })),
            "reading a record keeps it"
        );
        let forget = Request::Forget { name: "v-7".into() };
        assert_eq!(state.handle(2, forget, vec![], now), Ok(Some(Reply::Done)));
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed { record: None }))
        );
    }

    #[test]
    fn a_daemon_whose_connections_were_taken_may_no_longer_stash() {
        let mut state = State::default();
        let now = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![1],
        };
        assert_eq!(state.handle(1, put, vec![r], now), Ok(Some(Reply::Done)));
        let stash = || Request::Stash {
            name: "volume-1".into(),
            record: Sealed::new("r".into()),
        };
        assert_eq!(state.handle(1, stash(), vec![], now), Ok(Some(Reply::Done)));
        assert!(matches!(
            state.handle(2, Request::Take, vec![], now),
            Ok(Some(Reply::Held { .. }))
        ));
        assert_eq!(
            state.handle(1, stash(), vec![], now),
            Err(KeeperError::Superseded),
            "the predecessor's later records would overwrite the successor's"
        );
        let forget = Request::Forget {
            name: "volume-1".into(),
        };
        assert_eq!(
            state.handle(1, forget, vec![], now),
            Err(KeeperError::Superseded)
        );
        assert_eq!(state.handle(2, stash(), vec![], now), Ok(Some(Reply::Done)));
    }

    #[test]
    fn stashed_records_are_bounded_and_never_shown() {
        let mut state = State::default();
        let now = Instant::now();
        let stash = |name: &str, len: usize| Request::Stash {
            name: name.into(),
            record: Sealed::new("t".repeat(len)),
        };
        assert_eq!(
            state.handle(1, stash("v-1", MAX_RECORD_BYTES + 1), vec![], now),
            Err(KeeperError::RecordTooLarge(MAX_RECORD_BYTES + 1))
        );
        assert!(matches!(
            state.handle(1, stash("../v", 10), vec![], now),
            Err(KeeperError::Name(_))
        ));
        for i in 0..MAX_STASHED {
            state
                .handle(1, stash(&format!("v-{i}"), 1), vec![], now)
                .unwrap();
        }
        assert_eq!(
            state.handle(1, stash("one-more", 1), vec![], now),
            Err(KeeperError::StashFull)
        );
        assert_eq!(
            state.handle(1, stash("v-0", 2), vec![], now),
            Ok(Some(Reply::Done)),
            "a name kept can always be replaced"
        );
        let secret = Request::Stash {
            name: "v-1".into(),
            record: Sealed::new("s.hunter2-token".into()),
        };
        let shown = format!("{secret:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("15 bytes redacted"), "{shown}");
        let wire = String::from_utf8(encode(&secret)).unwrap();
        assert_eq!(
            decode::<Request>(wire.as_bytes()).unwrap(),
            secret,
            "the record travels as a JSON string"
        );
    }

    #[test]
    fn a_take_makes_the_owner_a_predecessor_and_its_hang_up_answers_the_wait() {
        let mut state = State::default();
        let t0 = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![7],
        };
        assert_eq!(state.handle(1, put, vec![r], t0), Ok(Some(Reply::Done)));
        let Ok(Some(Reply::Held { connections })) = state.handle(2, Request::Take, vec![], t0)
        else {
            panic!("take answers held");
        };
        assert_eq!(connections.len(), 1);
        assert_eq!(state.descriptors().len(), 1);
        assert_eq!(
            state.handle(2, Request::WaitPredecessor, vec![], t0),
            Ok(None)
        );
        assert_eq!(
            state.handle(2, Request::Take, vec![], t0),
            Err(KeeperError::Pending)
        );
        assert_eq!(
            state.hung_up(1, t0 + Duration::from_secs(1)),
            vec![(2, Reply::PredecessorGone { unserved_ms: 0 })]
        );
    }

    #[test]
    fn unserved_time_runs_from_the_owner_hanging_up_to_the_take() {
        let mut state = State::default();
        let t0 = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![],
        };
        state.handle(1, put, vec![r], t0).unwrap();
        assert!(state.hung_up(1, t0).is_empty());
        state
            .handle(2, Request::Take, vec![], t0 + Duration::from_millis(1500))
            .unwrap();
        assert_eq!(
            state.handle(
                2,
                Request::WaitPredecessor,
                vec![],
                t0 + Duration::from_secs(9)
            ),
            Ok(Some(Reply::PredecessorGone { unserved_ms: 1500 }))
        );
        assert_eq!(
            state.handle(3, Request::WaitPredecessor, vec![], t0),
            Ok(Some(Reply::PredecessorGone { unserved_ms: 0 })),
            "no take: no predecessor"
        );
    }

    #[test]
    fn at_most_max_held_connections_are_held_but_a_name_can_always_be_replaced() {
        let mut state = State::default();
        let now = Instant::now();
        let mut keep = Vec::new();
        for i in 0..=MAX_HELD {
            let (r, w) = pipe();
            keep.push(w);
            let put = Request::Put {
                name: format!("c{}", i.min(MAX_HELD - 1)),
                init: vec![],
            };
            assert_eq!(state.handle(1, put, vec![r], now), Ok(Some(Reply::Done)));
        }
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "one-more".into(),
            init: vec![],
        };
        assert_eq!(state.handle(1, put, vec![r], now), Err(KeeperError::Full));
    }
}
