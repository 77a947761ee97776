//! Stop signals (SIGTERM, SIGINT) blocked and read from a signalfd, so a poll loop sees them
//! as one more descriptor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Blocks SIGTERM and SIGINT in the calling thread (call it before any other thread starts,
/// which inherit the mask) and returns a non-blocking signalfd that reads them.
pub fn block_stop_signals() -> io::Result<OwnedFd> {
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
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The name of the stop signal waiting on `signalfd` (from [`block_stop_signals`]), or "a stop
/// signal" if none can be read.
pub fn stop_signal_name(signalfd: BorrowedFd<'_>) -> &'static str {
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
