//! Processes held by a pidfd (Linux 5.3+): a pidfd names one process for good, so a process
//! that exits and whose pid is given to another is never mistaken for that other one. Opening
//! one for a pid or for a unix socket's peer, checking that it is still alive, signalling it.
//! The pattern that makes a look at `/proc/<pid>` race-free: hold a pidfd, read `/proc/<pid>`,
//! then act through the pidfd (or check [`Pidfd::is_alive`]): a process alive after the read
//! was alive during it, so its pid was not yet anyone else's. No vaultfs types; libc only.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `CAP_IPC_LOCK` (linux/capability.h): locking memory past `RLIMIT_MEMLOCK`.
pub const CAP_IPC_LOCK: u32 = 14;
/// `CAP_SYS_ADMIN` (linux/capability.h): mounting, among much else.
pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether the text of a `/proc/<pid>/status` shows `capability` in the process's effective
/// set (`CapEff`, hexadecimal); `None` without a readable `CapEff` line.
pub fn has_effective_capability(status: &str, capability: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let set = u64::from_str_radix(hex, 16).ok()?;
    Some(capability < 64 && set & (1 << capability) != 0)
}

/// A process, held by a pidfd, and its pid in this process's pid namespace.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

/// What the kernel says about a unix socket's peer: its credentials when it connected and, if
/// it can be named, the process itself.
#[derive(Debug)]
pub struct Peer {
    /// The peer's uid when it connected (`SO_PEERCRED`), in this process's user namespace.
    pub uid: u32,
    /// The peer's pid (`SO_PEERCRED`) in this process's pid namespace: 0 when the peer runs in
    /// a pid namespace this process cannot see into.
    pub pid: i32,
    /// The peer process: `SO_PEERPIDFD` (Linux 6.5+) names the very process that connected,
    /// whatever happened since; older kernels fall back to `pidfd_open(pid)`.
    pub process: io::Result<Pidfd>,
}

impl Pidfd {
    /// The process now at `pid` (`pidfd_open`).
    pub fn open(pid: i32) -> io::Result<Self> {
        if pid <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open takes two integers; a non-negative result is a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        Ok(Self { fd, pid })
    }

    /// The pid this process had when the pidfd was opened (a pid in this pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the process held, never to another that got its pid since: `ESRCH`
    /// once it has exited.
    pub fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number, a null
        // siginfo (the kernel fills in one as kill(2) does) and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether the process held has not exited yet (it may be a zombie, whose pid is not yet
    /// free either): signal 0 checks without sending.
    pub fn is_alive(&self) -> bool {
        match self.send_signal(0) {
            Ok(()) => true,
            // EPERM: it exists, it is just not ours to signal.
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
        }
    }
}

/// The credentials of `socket`'s peer when it connected (`SO_PEERCRED`): its pid and ids in
/// this process's namespaces.
pub fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let none = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    socket_option(socket, libc::SO_PEERCRED, none)
}

/// `getsockopt(SOL_SOCKET, option)`: the value the kernel writes over `value`.
fn socket_option<T: Copy>(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    mut value: T,
) -> io::Result<T> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given; T is plain data.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The peer of the connected unix socket `socket`.
pub fn socket_peer(socket: BorrowedFd<'_>) -> io::Result<Peer> {
    let cred = peer_credentials(socket)?;
    let process = match peer_pidfd(socket) {
        // The same process SO_PEERCRED describes, so the same pid.
        Ok(fd) => Ok(Pidfd { fd, pid: cred.pid }),
        // Before Linux 6.5: the process at the pid now. If the peer exited after connecting and
        // its pid went to another process, that other one is found: a window as long as the
        // time from connect to this call, for a pid space to wrap around in.
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Pidfd::open(cred.pid),
        Err(e) => Err(e),
    };
    Ok(Peer {
        uid: cred.uid,
        pid: cred.pid,
        process,
    })
}

/// `SO_PEERPIDFD`: a pidfd of the process that connected `socket`.
fn peer_pidfd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = socket_option(socket, libc::SO_PEERPIDFD, -1 as libc::c_int)?;
    // SAFETY: the kernel installed fd, close-on-exec, for this call alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_signal_reaches_the_process_held_and_none_once_it_has_exited() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("run sleep");
        let held = Pidfd::open(child.id() as i32).unwrap();
        assert_eq!(held.pid(), child.id() as i32);
        assert!(held.is_alive());
        held.send_signal(libc::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!held.is_alive(), "reaped: gone");
        let err = held.send_signal(libc::SIGTERM).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }

    #[test]
    fn effective_capabilities_are_read_from_cap_eff_only() {
        let status = "Name:\tvaultfs\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000200000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(has_effective_capability(status, CAP_SYS_ADMIN), Some(true));
        assert_eq!(
            has_effective_capability(status, CAP_IPC_LOCK),
            Some(false),
            "permitted is not effective"
        );
        let none = "CapEff:\t0000000000000000\n";
        assert_eq!(has_effective_capability(none, CAP_SYS_ADMIN), Some(false));
        assert_eq!(has_effective_capability("Name:\tx\n", CAP_SYS_ADMIN), None);
        assert_eq!(
            has_effective_capability("CapEff:\tzz\n", CAP_SYS_ADMIN),
            None
        );
    }

    #[test]
    fn no_pid_below_one_is_opened() {
        for pid in [0, -1] {
            let err = Pidfd::open(pid).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{pid}");
        }
    }

    #[test]
    fn a_socket_peer_is_this_process_with_its_uid() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = socket_peer(std::os::fd::AsFd::as_fd(&a)).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        // SAFETY: geteuid cannot fail.
        assert_eq!(peer.uid, unsafe { libc::geteuid() });
        let process = peer.process.unwrap();
        assert_eq!(process.pid(), std::process::id() as i32);
        assert!(process.is_alive());
    }
}
