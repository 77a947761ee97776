//! The FUSE device (`/dev/fuse`) read and written directly, one message per call, for the few
//! messages vaultfs handles itself rather than fuser: a new connection's FUSE_INIT, the answer
//! to it, and notifications. Knows the device's rules for a read and a write, not the messages.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reads one request from the FUSE device `device` into `buf` and returns its length. `buf`
/// must be as large as the kernel demands of every read of that connection (else `EINVAL`).
/// Retries while the kernel says to: interrupted (`EINTR`), nothing to read yet on a
/// non-blocking device (`EAGAIN`), or a request interrupted before it was read (`ENOENT`).
pub fn read_request(device: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length for the whole call.
        let n = unsafe { libc::read(device.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
            _ => return Err(err),
        }
    }
}

/// Writes `bytes` as one message to `device`: a FUSE device, or a `SOCK_SEQPACKET` socket
/// standing in for one; both take a message whole or not at all, so a short write is an error
/// (`WriteZero`). Retries when interrupted.
pub fn write_message(device: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `bytes` is valid for reads of its length for the whole call.
        let n = unsafe { libc::write(device.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            return if n as usize == bytes.len() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))
            };
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::socket::seqpacket_pair;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_written_is_read_whole_and_alone() {
        let (a, b) = seqpacket_pair().unwrap();
        write_message(a.as_fd(), b"first message").unwrap();
        write_message(a.as_fd(), b"second").unwrap();
        let mut buf = [0u8; 64];
        let n = read_request(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"first message");
        let n = read_request(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
    }

    #[test]
    fn errors_the_kernel_does_not_ask_to_retry_are_returned() {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut buf = [0u8; 8];
        // A pipe's write end cannot be read, nor its read end written: EBADF both ways.
        let err = read_request(writer.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let err = write_message(reader.as_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        drop(reader);
        // No reader left: EPIPE (Rust ignores SIGPIPE), not a retry.
        let err = write_message(writer.as_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
