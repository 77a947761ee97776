//! Serving a FUSE connection again: the kernel's FUSE_INIT kept as it was read
//! (`InitRecord`), a fuser session started on a fresh connection or on a live one another
//! process served (`start_session`), and the resend notification that makes the kernel queue
//! again the requests nobody answered (`notify_resend`). Knows fuser and the kernel's FUSE
//! ABI; nothing of volumes or Vault. The device and socket calls are `sys`'s (`sys::fuse`,
//! `sys::socket`, `sys::file::duplicate_onto`): nothing here is `unsafe`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use fuser::{Config, Filesystem, Session, SessionACL};

use crate::sys::{self, socket, socket::Received};

/// `fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid u32,
/// total_extlen u16, padding u16.
const IN_HEADER_LEN: usize = 40;
/// `fuse_out_header`: len u32, error i32, unique u64.
const OUT_HEADER_LEN: usize = 16;
const FUSE_INIT: u32 = 26;
const FUSE_KERNEL_MAJOR: u32 = 7;
/// `fuse_init_in` up to `flags` (major, minor, max_readahead, flags): what every 7.x kernel
/// since 7.6 sends.
const INIT_IN_BASE_LEN: usize = 16;
/// `fuse_init_in` up to `flags2`, present when `flags` has `FUSE_INIT_EXT` (7.36+).
const INIT_IN_EXT_LEN: usize = 24;
/// The whole `fuse_init_in` of 7.36+ kernels is 64 bytes; anything near this is not an INIT.
const MAX_INIT_LEN: usize = 4096;
const FUSE_INIT_EXT: u32 = 1 << 30;
/// Capability bit 39, `FUSE_HAS_RESEND`: bit 7 of `flags2`.
const FUSE_HAS_RESEND_IN_FLAGS2: u32 = 1 << (39 - 32);
const FUSE_NOTIFY_RESEND: i32 = 7;
/// The kernel refuses a read of `/dev/fuse` into a buffer smaller than
/// `max(FUSE_MIN_READ_BUFFER (8 KiB), sizeof(fuse_in_header) + sizeof(fuse_write_in) +
/// max_write)` (`fuse_dev_do_read`) with `EINVAL`. The INIT read uses fuser's own request
/// buffer size (16 MiB of writes plus a page of headers), which passes whatever `max_write`
/// the connection has; it is read once per mount and its pages are never touched.
const INIT_READ_BUFFER: usize = 16 * 1024 * 1024 + 4096;

/// The FUSE_INIT request the kernel sent when the connection was mounted, as read from
/// `/dev/fuse` (`fuse_in_header` + `fuse_init_in`). The kernel sends it once per connection:
/// a process that takes over a live connection serves it by replaying this record to fuser
/// (`start_session`). Holds protocol minor and capabilities, nothing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct InitRecord {
    bytes: Vec<u8>,
}

impl InitRecord {
    /// Checks that `bytes` is one whole FUSE_INIT request of protocol 7.x.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        let n = bytes.len();
        let lengths = IN_HEADER_LEN + INIT_IN_BASE_LEN..=MAX_INIT_LEN;
        if !lengths.contains(&n) {
            return Err(format!(
                "a FUSE_INIT request is {} to {} bytes long, got {n}",
                lengths.start(),
                lengths.end()
            ));
        }
        let record = Self { bytes };
        let len = record.u32_at(0) as usize;
        if len != n {
            return Err(format!(
                "the request header says {len} bytes but the record holds {n}"
            ));
        }
        let opcode = record.u32_at(4);
        if opcode != FUSE_INIT {
            return Err(format!(
                "expected opcode {FUSE_INIT} (FUSE_INIT), got {opcode}"
            ));
        }
        let major = record.u32_at(IN_HEADER_LEN);
        if major != FUSE_KERNEL_MAJOR {
            return Err(format!(
                "expected FUSE protocol major version {FUSE_KERNEL_MAJOR}, got {major}"
            ));
        }
        if record.flags_low() & FUSE_INIT_EXT != 0 && n < IN_HEADER_LEN + INIT_IN_EXT_LEN {
            return Err(format!(
                "FUSE_INIT_EXT is set but the request ({n} bytes) has no flags2"
            ));
        }
        Ok(record)
    }

    /// The request as the kernel sent it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The kernel's protocol minor version (7.`minor`).
    pub fn minor(&self) -> u32 {
        self.u32_at(IN_HEADER_LEN + 4)
    }

    /// The largest readahead the kernel allows, in bytes.
    pub fn max_readahead(&self) -> u32 {
        self.u32_at(IN_HEADER_LEN + 8)
    }

    /// The kernel's capability bits: `flags`, and `flags2` as bits 32..64 when the kernel
    /// sent it.
    pub fn capabilities(&self) -> u64 {
        u64::from(self.flags_low()) | (u64::from(self.flags2()) << 32)
    }

    /// Whether the kernel understands `FUSE_NOTIFY_RESEND` (capability bit 39,
    /// `FUSE_HAS_RESEND`, Linux 6.9+), so that `notify_resend` can recover the requests a dead
    /// daemon read but never answered.
    pub fn offers_resend(&self) -> bool {
        self.flags2() & FUSE_HAS_RESEND_IN_FLAGS2 != 0
    }

    fn flags_low(&self) -> u32 {
        self.u32_at(IN_HEADER_LEN + 12)
    }

    fn flags2(&self) -> u32 {
        if self.minor() >= 36 && self.flags_low() & FUSE_INIT_EXT != 0 {
            self.u32_at(IN_HEADER_LEN + 16)
        } else {
            0
        }
    }

    fn unique(&self) -> u64 {
        u64::from_ne_bytes(
            self.bytes[8..16]
                .try_into()
                .expect("from_bytes checked the header is whole"),
        )
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(
            self.bytes[offset..offset + 4]
                .try_into()
                .expect("from_bytes checked the fields read are present"),
        )
    }
}

impl fmt::Debug for InitRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitRecord")
            .field("minor", &self.minor())
            .field("max_readahead", &self.max_readahead())
            .field("capabilities", &format_args!("{:#x}", self.capabilities()))
            .finish()
    }
}

/// Starts a fuser session on the FUSE connection `device`, not yet serving (the caller
/// `spawn`s or `run`s it), and returns it with the connection's `InitRecord`.
///
/// - `init == None`, a connection just mounted: reads the kernel's FUSE_INIT from `device`,
///   lets fuser answer it and passes fuser's answer on to the kernel.
/// - `init == Some(record)`, a live connection another process served: the kernel sends no
///   second INIT and must not receive a second answer, so `record` (the INIT it sent that
///   process) is replayed to fuser and fuser's answer is discarded. The kernel keeps the
///   limits and capabilities negotiated the first time; fuser's request loop does not depend
///   on them.
///
/// Depends on fuser 0.18.0 internals (hence `fuser = "=0.18.0"`; the regression test is
/// `tests/e2e_handover.rs`): `Session::from_fd` performs its handshake (read one INIT, write one
/// answer) on the descriptor it is given, and the session then reads and writes that
/// descriptor number for its whole life (`Channel` holds it; senders and notifiers share it,
/// nothing dups it). So fuser is given one end of a socket pair holding the INIT, and once the
/// handshake is done the real device is `dup3`ed over the socket's descriptor number.
pub fn start_session<FS: Filesystem>(
    fs: FS,
    device: OwnedFd,
    acl: SessionACL,
    config: Config,
    init: Option<&InitRecord>,
) -> io::Result<(Session<FS>, InitRecord)> {
    let (record, fresh) = match init {
        Some(record) => (record.clone(), false),
        None => (read_init(device.as_fd())?, true),
    };
    let (ours, fusers) = socket::seqpacket_pair()?;
    sys::fuse::write_message(ours.as_fd(), record.as_bytes())?;
    let session = Session::from_fd(fs, fusers, acl, config)?;
    let answer = answer_to(&record, ours.as_fd())?;
    if fresh {
        sys::fuse::write_message(device.as_fd(), &answer)?;
    }
    // From here on the session's descriptor number is the real device: dup3 replaces the
    // socket atomically, so no read or write of the session can see a closed descriptor. The
    // session still owns (and closes) that number as before.
    sys::file::duplicate_onto(device.as_fd(), session.as_fd())?;
    Ok((session, record))
}

/// Asks the kernel to queue again every request of the connection `device` that was read but
/// not answered (a dead daemon's, whose readers would otherwise wait forever); they come back
/// with `is_resent` set. Only once the process that read them is surely gone, else some may be
/// answered twice. Needs a kernel whose `InitRecord::offers_resend` (Linux 6.9+); older ones
/// refuse it with `EINVAL`.
pub fn notify_resend(device: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = [0u8; OUT_HEADER_LEN];
    header[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // unique 0: a notification, not an answer.
    sys::fuse::write_message(device, &header)
}

pub use crate::fuse::is_resent;

/// Reads the first request of a connection just mounted: the kernel's FUSE_INIT.
fn read_init(device: BorrowedFd<'_>) -> io::Result<InitRecord> {
    let mut buf = vec![0u8; INIT_READ_BUFFER];
    let n = sys::fuse::read_request(device, &mut buf)?;
    buf.truncate(n);
    InitRecord::from_bytes(buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the first request of a new FUSE connection is not its INIT: {e}"),
        )
    })
}

/// fuser's answer to `init`, waiting in the socket pair: exactly one, successful.
fn answer_to(init: &InitRecord, ours: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let handshake_changed = |what: &str| {
        io::Error::other(format!(
            "fuser's INIT handshake {what}; start_session depends on fuser 0.18.0's from_fd"
        ))
    };
    let buf = match socket::recv_with_fds(ours, 4096, 0, true) {
        Ok(Received::Message(message)) => message.bytes,
        Ok(Received::Closed) => Vec::new(),
        Err(_) => return Err(handshake_changed("left no answer")),
    };
    if buf.len() < OUT_HEADER_LEN {
        return Err(handshake_changed("answered with a short message"));
    }
    let error = i32::from_ne_bytes(buf[4..8].try_into().expect("length checked"));
    let unique = u64::from_ne_bytes(buf[8..16].try_into().expect("length checked"));
    if error != 0 || unique != init.unique() {
        return Err(handshake_changed("did not accept the INIT"));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FUSE_INIT as a 7.`minor` kernel sends it.
    fn init_bytes(minor: u32, flags: u32, flags2: u32) -> Vec<u8> {
        let ext = minor >= 36;
        let len = IN_HEADER_LEN + if ext { 64 } else { INIT_IN_BASE_LEN };
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        b[4..8].copy_from_slice(&FUSE_INIT.to_ne_bytes());
        b[8..16].copy_from_slice(&2u64.to_ne_bytes());
        let body = IN_HEADER_LEN;
        b[body..body + 4].copy_from_slice(&7u32.to_ne_bytes());
        b[body + 4..body + 8].copy_from_slice(&minor.to_ne_bytes());
        b[body + 8..body + 12].copy_from_slice(&131072u32.to_ne_bytes());
        b[body + 12..body + 16].copy_from_slice(&flags.to_ne_bytes());
        if ext {
            b[body + 16..body + 20].copy_from_slice(&flags2.to_ne_bytes());
        }
        b
    }

    #[test]
    fn a_recent_kernels_init_parses_and_offers_resend() {
        let record = InitRecord::from_bytes(init_bytes(45, FUSE_INIT_EXT | 1, 1 << 7 | 1)).unwrap();
        assert_eq!(record.minor(), 45);
        assert_eq!(record.max_readahead(), 131072);
        assert!(record.offers_resend());
        assert_eq!(
            record.capabilities(),
            u64::from(FUSE_INIT_EXT | 1) | (0x81 << 32)
        );
        assert_eq!(record.unique(), 2);
        assert_eq!(record.as_bytes().len(), 104);
    }

    #[test]
    fn resend_needs_init_ext_and_minor_36() {
        let no_ext = InitRecord::from_bytes(init_bytes(45, 1, 1 << 7)).unwrap();
        assert!(
            !no_ext.offers_resend(),
            "flags2 is only meaningful with INIT_EXT"
        );
        let no_bit = InitRecord::from_bytes(init_bytes(45, FUSE_INIT_EXT, 0)).unwrap();
        assert!(!no_bit.offers_resend());
        let old = InitRecord::from_bytes(init_bytes(31, 1, 0)).unwrap();
        assert_eq!(old.minor(), 31);
        assert_eq!(old.as_bytes().len(), IN_HEADER_LEN + INIT_IN_BASE_LEN);
        assert!(!old.offers_resend());
    }

    #[test]
    fn anything_but_a_whole_7x_init_is_refused() {
        let mut other_op = init_bytes(45, 0, 0);
        other_op[4..8].copy_from_slice(&15u32.to_ne_bytes()); // FUSE_READ
        assert!(InitRecord::from_bytes(other_op)
            .unwrap_err()
            .contains("opcode"));

        let mut short = init_bytes(45, 0, 0);
        short.truncate(60);
        assert!(InitRecord::from_bytes(short)
            .unwrap_err()
            .contains("header"));

        let mut major8 = init_bytes(45, 0, 0);
        major8[IN_HEADER_LEN..IN_HEADER_LEN + 4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(InitRecord::from_bytes(major8)
            .unwrap_err()
            .contains("major"));

        let mut ext_without_flags2 = init_bytes(31, FUSE_INIT_EXT, 0);
        ext_without_flags2.truncate(IN_HEADER_LEN + INIT_IN_BASE_LEN);
        assert!(InitRecord::from_bytes(ext_without_flags2)
            .unwrap_err()
            .contains("flags2"));

        assert!(InitRecord::from_bytes(vec![0; 8]).is_err());
    }

    #[test]
    fn debug_shows_minor_and_flags_not_bytes() {
        let record = InitRecord::from_bytes(init_bytes(45, FUSE_INIT_EXT, 1 << 7)).unwrap();
        let shown = format!("{record:?}");
        assert!(shown.contains("minor: 45"), "{shown}");
        assert!(shown.contains("capabilities: 0x8040000000"), "{shown}");
        assert!(!shown.contains('['), "no raw bytes: {shown}");
    }

    #[test]
    fn bit_63_marks_a_resent_request() {
        assert!(is_resent(1 << 63 | 42));
        assert!(!is_resent(42));
    }
}
