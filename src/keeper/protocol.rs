//! The keeper's wire protocol: its messages (requests and replies), their encoding and the
//! limits both sides check, and one message read off the socket with those limits applied
//! (the socket calls themselves are `sys::socket`'s). Used by the keeper's server and its
//! client alike.
//!
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
//! Words: the keeper *holds* connections (`put`, `held`, [`MAX_HELD`]) and *stashes* records
//! (`stash`, `stashed`); a daemon *takes* what is held, which the keeper goes on holding.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::sys::socket;

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
/// Largest stashed record: a volume's token and its schedule take a few hundred bytes, its
/// leased values (database credentials, certificates) more; as hex in a message, a record this
/// size still fits in [`MAX_MESSAGE_BYTES`].
pub const MAX_RECORD_BYTES: usize = 28 * 1024;
/// Most records stashed at once: two per volume, more than a node serves.
pub const MAX_STASHED: usize = 32 * 1024;
/// Most bytes of records stashed at once: well inside the keeper's memory limit (32 MiB in
/// `deploy/base`); 1,000 volumes with a token and a database credential each take about 1 MiB.
pub const MAX_STASHED_BYTES: usize = 16 * 1024 * 1024;

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

/// What one [`receive`] gave.
pub(super) enum Received {
    /// The peer hung up (a zero-length packet reads the same way; neither side sends one).
    Closed,
    /// A message: its bytes, or why it was refused. Descriptors that came with a refused
    /// message are closed.
    Message(Result<(Vec<u8>, Vec<OwnedFd>), KeeperError>),
}

/// Reads one message from `socket`: at most [`MAX_MESSAGE_BYTES`] with at most [`MAX_HELD`]
/// descriptors, refusing (and closing the descriptors of) one cut to fit.
pub(super) fn receive(socket: BorrowedFd<'_>, nonblocking: bool) -> io::Result<Received> {
    let message = match socket::recv_with_fds(socket, MAX_MESSAGE_BYTES, MAX_HELD, nonblocking)? {
        socket::Received::Closed => return Ok(Received::Closed),
        socket::Received::Message(message) => message,
    };
    Ok(Received::Message(if message.fds_cut {
        Err(KeeperError::TooManyDescriptors)
    } else if message.bytes_cut {
        Err(KeeperError::TooLarge)
    } else {
        Ok((message.bytes, message.fds))
    }))
}

impl Request {
    /// The request's `type`, for errors and logs.
    pub(super) fn kind(&self) -> &'static str {
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

impl KeeperError {
    /// A key per kind of refusal, for the log rate limit.
    pub(super) fn kind(&self) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;
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
    fn a_stashed_record_is_never_shown_and_travels_as_a_json_string() {
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
}
