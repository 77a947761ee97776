//! Unix sockets that carry descriptors: `SOCK_SEQPACKET` sockets (one message per packet, so
//! no framing of our own), messages sent and received with `SCM_RIGHTS` descriptors attached,
//! and `poll` over them (and over pipes). Std has no `SOCK_SEQPACKET` and no `SCM_RIGHTS`; these few calls are
//! simpler than a crate (nix, sendfd) for one socket type and one control message.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new `SOCK_SEQPACKET` unix socket, close-on-exec.
pub fn seqpacket_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor we own.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | flags, 0) })?;
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Two connected `SOCK_SEQPACKET` unix sockets, blocking and close-on-exec: one message per
/// packet, each read whole.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both are open descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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

/// A blocking `SOCK_SEQPACKET` socket connected to the one listening at `path`.
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
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

/// Binds `socket` at `path` (which must not exist); then the caller may set the file's mode
/// before it calls [`listen`].
pub fn bind(socket: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (addr, len) = socket_address(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len, alive for the call.
    cvt(unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })
    .map(|_| ())
}

/// Starts listening on a bound socket, with room for `backlog` connections not yet accepted.
pub fn listen(socket: BorrowedFd<'_>, backlog: usize) -> io::Result<()> {
    let backlog = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
    // SAFETY: listen takes no pointers.
    cvt(unsafe { libc::listen(socket.as_raw_fd(), backlog) }).map(|_| ())
}

/// One connection waiting on `listener`, non-blocking and close-on-exec; `WouldBlock` when
/// none is waiting.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; a non-negative result is ours.
    let fd = cvt(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    })?;
    // SAFETY: fd was just returned by accept4 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one message with `fds` attached (`SCM_RIGHTS`). `MSG_NOSIGNAL`: a peer gone is an
/// error, not SIGPIPE. Retries when interrupted.
pub fn send_with_fds(
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

/// What one [`recv_with_fds`] gave.
#[derive(Debug)]
pub enum Received {
    /// The peer hung up (a zero-length packet without descriptors reads the same way).
    Closed,
    /// A message, with the descriptors that came with it, now ours.
    Message(Message),
}

/// A message as received, and whether it was cut to fit the buffers.
#[derive(Debug)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer: `bytes` holds its start (`MSG_TRUNC`).
    pub bytes_cut: bool,
    /// More descriptors came than there was room for: the kernel closed the rest
    /// (`MSG_CTRUNC`).
    pub fds_cut: bool,
}

/// Receives one message of at most `max_bytes` with at least room for `max_fds` descriptors
/// (received close-on-exec; the control buffer's alignment leaves room for one more when
/// `max_fds` is odd). Retries when interrupted.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    max_bytes: usize,
    max_fds: usize,
    nonblocking: bool,
) -> io::Result<Received> {
    let mut buf = vec![0u8; max_bytes];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) };
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
    let bytes_cut = msg.msg_flags & libc::MSG_TRUNC != 0;
    let fds_cut = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if len == 0 && fds.is_empty() && !bytes_cut && !fds_cut {
        return Ok(Received::Closed);
    }
    buf.truncate(len);
    Ok(Received::Message(Message {
        bytes: buf,
        fds,
        bytes_cut,
        fds_cut,
    }))
}

/// What [`poll_input`] found on one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// Nothing happened.
    Quiet,
    /// There is something to read (or accept).
    Input,
    /// Something other than input: a hang-up or an error, with nothing to read.
    HungUp,
}

/// Blocks until at least one of `fds` has input or hung up (retrying when interrupted);
/// returns what each one has, in order.
pub fn poll_input(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<Polled>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: polled is a valid array of pollfd of the length given.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(polled
        .iter()
        .map(|p| match p.revents {
            0 => Polled::Quiet,
            r if r & libc::POLLIN != 0 => Polled::Input,
            _ => Polled::HungUp,
        })
        .collect())
}

/// Waits up to `timeout` (to the millisecond, at most `i32::MAX` ms) for `fd` (a socket or a
/// pipe) to have input or to hang up: `Ok(false)` when the time ran out. An interruption is
/// returned as `Interrupted`, not retried (`read_exact` and the like retry it).
pub fn wait_input(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: p is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0)
}

/// Blocks until the peer of the connected `socket` has closed its end (or the socket fails).
pub fn wait_hang_up(socket: BorrowedFd<'_>) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: socket.as_raw_fd(),
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
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        (OwnedFd::from(a), OwnedFd::from(b))
    }

    fn message(received: Received) -> Message {
        match received {
            Received::Message(m) => m,
            Received::Closed => panic!("a message, not a hang-up"),
        }
    }

    #[test]
    fn a_descriptor_sent_arrives_as_the_same_open_file() {
        let (a, b) = pair();
        let file = tempfile::tempfile().unwrap();
        send_with_fds(a.as_fd(), b"one", &[file.as_fd()], false).unwrap();
        let got = message(recv_with_fds(b.as_fd(), 16, 2, false).unwrap());
        assert_eq!(got.bytes, b"one");
        assert!(!got.bytes_cut && !got.fds_cut);
        assert_eq!(got.fds.len(), 1);
        let stat = |fd: BorrowedFd<'_>| {
            let meta = std::fs::File::from(fd.try_clone_to_owned().unwrap())
                .metadata()
                .unwrap();
            std::os::unix::fs::MetadataExt::ino(&meta)
        };
        assert_eq!(stat(got.fds[0].as_fd()), stat(file.as_fd()));
    }

    #[test]
    fn a_message_over_the_buffers_is_marked_cut() {
        let (a, b) = pair();
        let files: Vec<std::fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(a.as_fd(), b"0123456789", &fds, false).unwrap();
        let got = message(recv_with_fds(b.as_fd(), 4, 1, false).unwrap());
        assert_eq!(got.bytes, b"0123");
        assert!(got.bytes_cut, "10 bytes into 4");
        // Room for one descriptor is 8 bytes once aligned: two fit, three do not.
        assert!(got.fds_cut, "3 descriptors into room for 1");
        assert!(got.fds.len() <= 2);
    }

    #[test]
    fn input_is_told_from_quiet_and_a_hang_up_reads_as_closed() {
        let (a, b) = pair();
        let (quiet, _other) = pair();
        send_with_fds(a.as_fd(), b"x", &[], false).unwrap();
        let polled = poll_input(&[b.as_fd(), quiet.as_fd()]).unwrap();
        assert_eq!(polled, [Polled::Input, Polled::Quiet]);
        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(d);
        assert_eq!(poll_input(&[c.as_fd()]).unwrap(), [Polled::Input]);
        assert!(matches!(
            recv_with_fds(c.as_fd(), 16, 1, false).unwrap(),
            Received::Closed
        ));
        wait_hang_up(c.as_fd()).unwrap();
    }

    #[test]
    fn a_seqpacket_pair_keeps_message_boundaries() {
        let (a, b) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), b"one", &[], false).unwrap();
        send_with_fds(a.as_fd(), b"two!", &[], false).unwrap();
        // Each receive is one packet, even with room for both.
        assert_eq!(
            message(recv_with_fds(b.as_fd(), 64, 0, false).unwrap()).bytes,
            b"one"
        );
        assert_eq!(
            message(recv_with_fds(b.as_fd(), 64, 0, false).unwrap()).bytes,
            b"two!"
        );
        assert!(matches!(
            recv_with_fds(b.as_fd(), 64, 0, true).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        ));
        drop(a);
        assert!(matches!(
            recv_with_fds(b.as_fd(), 64, 0, true).unwrap(),
            Received::Closed
        ));
    }

    #[test]
    fn waiting_for_input_times_out_then_sees_input_and_hang_up() {
        let (a, b) = seqpacket_pair().unwrap();
        let started = std::time::Instant::now();
        let short = std::time::Duration::from_millis(30);
        assert!(!wait_input(b.as_fd(), short).unwrap());
        assert!(started.elapsed() >= short);
        send_with_fds(a.as_fd(), b"x", &[], false).unwrap();
        assert!(wait_input(b.as_fd(), std::time::Duration::from_secs(5)).unwrap());
        let (reader, writer) = std::io::pipe().unwrap();
        drop(writer);
        assert!(wait_input(reader.as_fd(), std::time::Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn socket_paths_past_sun_path_are_refused() {
        assert!(check_socket_path(Path::new("/run/vaultfs-keeper/keeper.sock")).is_ok());
        let long = format!("/{}", "a".repeat(107));
        assert!(check_socket_path(Path::new(&long))
            .unwrap_err()
            .contains("1 to 107 bytes"));
        assert!(check_socket_path(Path::new("")).is_err());
    }
}
