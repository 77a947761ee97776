//! Making and removing mounts: FUSE mounts (by mount(2) as root, through `fusermount3`
//! otherwise), read-only bind mounts, lazy unmounts, and aborting a FUSE connection.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::mountinfo::{mount_stack, unescape_mountinfo};
use super::{check, cstring};

/// The filesystem type of every vaultfs mount, as `/proc/self/mountinfo` shows it.
pub const FSTYPE: &str = "fuse.vaultfs";

/// Mounts a read-only FUSE filesystem of type `fuse.vaultfs` at `target` and returns the
/// `/dev/fuse` descriptor that serves it. `allow_other` lets users other than the mounting
/// one in; the kernel checks permissions against the files' attributes either way.
pub fn fuse_mount(target: &Path, allow_other: bool) -> io::Result<OwnedFd> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(device);
    // SAFETY: getuid/getgid cannot fail and take no arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let options = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions{}",
        fd.as_raw_fd(),
        if allow_other { ",allow_other" } else { "" }
    );
    let c_target = cstring(target)?;
    let c_options = CString::new(options).expect("mount options hold no NUL byte");
    let flags =
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            c"vaultfs".as_ptr(),
            c_target.as_ptr(),
            c"fuse.vaultfs".as_ptr(),
            flags,
            c_options.as_ptr().cast(),
        )
    })?;
    Ok(fd)
}

/// Whether this process may call mount(2) itself (root, or `CAP_SYS_ADMIN`): otherwise mounts
/// go through the set-uid `fusermount3`, as for sshfs or rclone.
pub fn can_mount() -> bool {
    super::process::effective_uid() == 0
}

/// The helper unprivileged FUSE mounts go through (`fuse3` package).
pub const FUSERMOUNT: &str = "fusermount3";

/// Mounts like [`fuse_mount`] as an unprivileged user, through `fusermount3`: it opens
/// `/dev/fuse`, mounts with the same flags (`subtype=vaultfs` keeps the type `fuse.vaultfs`)
/// and passes the descriptor back over a socket (`_FUSE_COMMFD`). `allow_other` needs
/// `user_allow_other` in `/etc/fuse.conf`.
pub fn fusermount(target: &Path, allow_other: bool) -> io::Result<OwnedFd> {
    use std::os::unix::process::CommandExt;

    // A SOCK_STREAM pair, close-on-exec (std's `pair`), as fusermount3 expects.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (ours, theirs) = (OwnedFd::from(ours), OwnedFd::from(theirs));
    let theirs_raw = theirs.as_raw_fd();
    let options = format!(
        "ro,nosuid,nodev,noexec,noatime,default_permissions,fsname=vaultfs,subtype=vaultfs{}",
        if allow_other { ",allow_other" } else { "" }
    );
    let mut command = std::process::Command::new(FUSERMOUNT);
    command
        .arg("-o")
        .arg(&options)
        .arg("--")
        .arg(target)
        .env("_FUSE_COMMFD", theirs_raw.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: the closure only calls fcntl, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // The helper inherits its end of the socket (created close-on-exec).
            let flags = libc::fcntl(theirs_raw, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run {FUSERMOUNT} (apt package fuse3) to mount as a normal user: {e}"),
        )
    })?;
    drop(theirs);
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{FUSERMOUNT} failed: {}", said.trim()),
        ));
    }
    receive_fd(&ours)
}

/// Receives the one descriptor `fusermount3` sends with `SCM_RIGHTS` on `socket`.
fn receive_fd(socket: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsFd;
    let received = super::socket::recv_with_fds(socket.as_fd(), 1, 1, false)?;
    let fd = match received {
        super::socket::Received::Message(message) => message.fds.into_iter().next(),
        super::socket::Received::Closed => None,
    };
    fd.ok_or_else(|| {
        io::Error::other(format!(
            "{FUSERMOUNT} mounted but sent no /dev/fuse descriptor"
        ))
    })
}

/// Unmounts what [`fusermount`] mounted at `path`, lazily (`fusermount3 -u -z`).
pub fn fuser_unmount(path: &Path) -> io::Result<()> {
    let output = std::process::Command::new(FUSERMOUNT)
        .args(["-u", "-z", "--"])
        .arg(path)
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{FUSERMOUNT} -u failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Bind-mounts directory `source` at `target`, read-only, `nosuid,nodev,noexec` (a bind copies
/// the filesystem but not the source mount's flags, so they are set again).
pub fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    let (c_source, c_target) = (cstring(source)?, cstring(target)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the calls; the type and
    // data arguments may be null for a bind mount and its remount.
    unsafe {
        check(libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))?;
        let flags = libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC;
        if let Err(e) = check(libc::mount(
            std::ptr::null(),
            c_target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )) {
            libc::umount2(c_target.as_ptr(), libc::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `path` lazily (`MNT_DETACH`: busy mounts go away once their last file closes).
/// Returns `Ok(false)` when nothing was mounted there.
pub fn detach_unmount(path: &Path) -> io::Result<bool> {
    let c = cstring(path)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    match check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unmounts every mount stacked at `path` (a live mount over a dead one, say), lazily.
/// Returns how many were removed.
pub fn detach_all(path: &Path) -> io::Result<usize> {
    let mut removed = 0;
    // Bounded: a path cannot hold more stacked mounts than this in practice.
    while removed < 64 && detach_unmount(path)? {
        removed += 1;
    }
    Ok(removed)
}

/// Detaches the mounts stacked at `path` while the topmost is of type `fstype`; stops at the
/// first mount of another type (never unmounts what vaultfs did not mount). Reads the mount
/// table once: its size grows with the node's mounts.
pub fn detach_all_of_type(path: &Path, fstype: &str) -> io::Result<usize> {
    let ours = mount_stack(path)
        .iter()
        .rev()
        .take_while(|t| t.as_str() == fstype)
        .count()
        .min(64);
    let mut removed = 0;
    while removed < ours && detach_unmount(path)? {
        removed += 1;
    }
    Ok(removed)
}

/// Aborts the FUSE connection mounted at `path` (`/sys/fs/fuse/connections/<n>/abort`, `n`
/// the mount's device minor from the mount table, so nothing touches the mount itself): every
/// request waiting on it fails, and its mounts answer `ENOTCONN` from then on.
pub fn abort_fuse_connection(path: &Path) -> io::Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let wanted = path.as_os_str().as_bytes();
    let minor = info
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape_mountinfo(m) == wanted)
        })
        .filter_map(|l| {
            l.split(' ')
                .nth(2)?
                .split_once(':')
                .map(|(_, m)| m.to_string())
        })
        .next_back()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no mount there"))?;
    std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root: umount2 refuses an unprivileged caller (EPERM) before EINVAL"]
    fn detaching_a_fresh_dir_reports_nothing_unmounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!detach_unmount(dir.path()).unwrap());
    }
}
