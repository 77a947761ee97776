//! Thin, safe wrappers over the few Linux calls vaultfs needs directly: process hardening
//! (no core dumps, locked memory), private state files and unmounting. No vaultfs types.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `bytes` to `path` through `<path>.tmp` (mode 0600) and a rename: readers see the
/// old content or the new, never part of it.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// `CLOCK_MONOTONIC` now: the clock `Instant` reads, shared by every process on the machine.
pub fn monotonic_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Disables core dumps (and ptrace by non-root) so secret bytes in memory never reach disk
/// through a crash dump.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct that lives for the call.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) })?;
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
}

/// Gives up every capability (effective, permitted, inheritable) of this process: root
/// without capabilities can no longer mount, ptrace, or pass permission checks.
pub fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two `Data` (capabilities 0-31 and 32-63).
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let none = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a valid header and two data structs that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) };
    check(rc as libc::c_int)
}

/// Keeps large allocations out of the malloc heaps. Every FUSE session allocates a 16 MiB
/// request buffer of which it touches a few pages; served by `mmap` it costs only those pages,
/// but glibc's adaptive threshold would soon move such blocks into heaps, where `calloc` zeroes
/// (and so makes resident) all 16 MiB. A fixed threshold also turns off the adaptation; fewer
/// arenas keep per-thread heaps from multiplying with the number of volumes.
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Locks all current and future memory so secret bytes are never swapped out. Pages are
/// locked as they are touched (`MCL_ONFAULT`), so address space reserved but never used (each
/// FUSE session's 16 MiB request buffer, thread stacks) does not become resident.
///
/// Without `CAP_IPC_LOCK`, the kernel counts all locked address space (reserved or not) against
/// `RLIMIT_MEMLOCK` (8 MiB by default since Linux 5.16): `mlockall` fails if the process already
/// maps more, and once locked every mapping past the limit fails, so a later allocation would
/// abort the process. Without the capability, only an unlimited limit is therefore accepted;
/// anything else is refused, naming the limit.
pub fn lock_memory() -> io::Result<()> {
    let capable = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::pidfd::has_effective_capability(&s, crate::pidfd::CAP_IPC_LOCK))
        .unwrap_or(false);
    if !capable {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes a valid rlimit struct that lives for the call.
        check(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) })?;
        if limit.rlim_cur != libc::RLIM_INFINITY {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "without CAP_IPC_LOCK, all locked address space counts against RLIMIT_MEMLOCK ({} KiB here): locking fails once the process maps more, and an allocation past it would abort the process; grant CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add: [IPC_LOCK]) or set the limit to unlimited",
                    limit.rlim_cur / 1024
                ),
            ));
        }
    }
    // SAFETY: mlockall takes only flags.
    check(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) })
}

/// The limits on open descriptors (`RLIMIT_NOFILE`): the soft one in force and the hard one
/// it may be raised to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current `RLIMIT_NOFILE`.
pub fn open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct that lives for the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(OpenFilesLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit on open descriptors to the hard one (which only privileged
/// processes could raise further); returns the limits before the change.
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    let before = open_files_limit()?;
    if before.soft < before.hard {
        let raised = libc::rlimit {
            rlim_cur: before.hard,
            rlim_max: before.hard,
        };
        // SAFETY: setrlimit reads a valid rlimit struct that lives for the call.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) })?;
    }
    Ok(before)
}

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
    // SAFETY: geteuid cannot fail and takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// The helper unprivileged FUSE mounts go through (`fuse3` package).
pub const FUSERMOUNT: &str = "fusermount3";

/// Mounts like [`fuse_mount`] as an unprivileged user, through `fusermount3`: it opens
/// `/dev/fuse`, mounts with the same flags (`subtype=vaultfs` keeps the type `fuse.vaultfs`)
/// and passes the descriptor back over a socket (`_FUSE_COMMFD`). `allow_other` needs
/// `user_allow_other` in `/etc/fuse.conf`.
pub fn fusermount(target: &Path, allow_other: bool) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two descriptors.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair just returned these two descriptors, owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
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

/// Receives one descriptor sent with `SCM_RIGHTS` on `socket`.
fn receive_fd(socket: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;

    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one descriptor's control message, aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is a valid empty header; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CMSG_FIRSTHDR reads within `msg`'s control buffer, filled in by recvmsg.
    let header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a non-null header from CMSG_FIRSTHDR lies within the control buffer.
    if header.is_null() || unsafe { (*header).cmsg_type } != libc::SCM_RIGHTS {
        return Err(io::Error::other(format!(
            "{FUSERMOUNT} mounted but sent no /dev/fuse descriptor"
        )));
    }
    // SAFETY: an SCM_RIGHTS message's data holds at least one descriptor, now ours.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>()) };
    // SAFETY: the kernel installed `fd` in this process for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// `statfs(2)` of `path`. On a FUSE mount it always reaches the filesystem's daemon (it is never
/// answered from a kernel cache), so it blocks while the daemon does not answer.
fn statfs_of(path: &Path) -> io::Result<libc::statfs> {
    let c = cstring(path)?;
    let mut out = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid path and `out` is writable memory of the right size.
    check(unsafe { libc::statfs(c.as_ptr(), out.as_mut_ptr()) })?;
    // SAFETY: statfs succeeded, so it filled `out`.
    Ok(unsafe { out.assume_init() })
}

/// `f_type` of every FUSE filesystem (`FUSE_SUPER_MAGIC`, linux/magic.h).
const FUSE_SUPER_MAGIC: u32 = 0x6573_5546;

/// Whether a FUSE filesystem is mounted at `path` in this mount namespace and answers
/// `statfs` (its daemon must answer it). A path that answers but is no FUSE mount is an
/// error of kind `NotFound`, as is a missing path: the mount it should be lives in another
/// mount namespace, or was never made.
pub fn statfs_fuse(path: &Path) -> io::Result<()> {
    let found = match statfs_of(path) {
        // `f_type`'s width differs between targets; the magic fits in 32 bits.
        Ok(stat) if stat.f_type as u32 == FUSE_SUPER_MAGIC => return Ok(()),
        Ok(stat) => format!("a filesystem of type {:#x} is there", stat.f_type),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::from("the path does not exist"),
        Err(e) => return Err(e),
    };
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no FUSE mount at {} in this mount namespace ({found})",
            path.display()
        ),
    ))
}

/// Whether `path` is a FUSE mount whose daemon is gone ("Transport endpoint is not
/// connected"). Asks with `statfs`: `stat` may be answered from the kernel's attribute cache
/// for a while after the daemon died.
pub fn is_disconnected(path: &Path) -> bool {
    statfs_of(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Whether `path` lives on a tmpfs (memory-backed, never written to disk).
pub fn is_tmpfs(path: &Path) -> bool {
    statfs_of(path).is_ok_and(|stat| stat.f_type == libc::TMPFS_MAGIC)
}

/// Whether `path` is a mount point: asked of the kernel with `statx` (its mount-root
/// attribute, Linux 5.8+), which costs the same at 5,000 mounts as at one; by
/// `/proc/self/mountinfo` where the kernel does not say.
pub fn is_mount_point(path: &Path) -> bool {
    mount_root_attribute(path).unwrap_or_else(|| !mount_stack(path).is_empty())
}

/// `STATX_ATTR_MOUNT_ROOT` of `path`, if the kernel reports it.
fn mount_root_attribute(path: &Path) -> Option<bool> {
    // The attribute bit (linux/stat.h); not exported by libc for every target.
    const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
    let stx = statx(path, 0)?;
    (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0)
        .then_some(stx.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0)
}

/// The id of the mount `path` is on (as in `/proc/self/mountinfo`), if the kernel reports it
/// (Linux 5.8+). Cached attributes are enough: nothing here asks the filesystem.
pub fn mount_id(path: &Path) -> Option<u64> {
    const STATX_MNT_ID: u32 = 0x1000;
    let stx = statx(path, STATX_MNT_ID)?;
    (stx.stx_mask & STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// `statx` of `path` itself (no symlink or automount followed), without forcing a sync with
/// the filesystem.
fn statx(path: &Path, mask: u32) -> Option<libc::statx> {
    let c = cstring(path).ok()?;
    let mut out = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a valid path and `out` is writable memory of the right size.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
            mask,
            out.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded, so it filled `out`.
    Some(unsafe { out.assume_init() })
}

/// The filesystem types of the mounts stacked at `path`, bottom first, per
/// `/proc/self/mountinfo` (later lines are mounted later).
pub fn mount_stack(path: &Path) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let wanted = path.as_os_str().as_bytes();
    info.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape_mountinfo(m) == wanted)
        })
        .filter_map(|l| l.split_once(" - ")?.1.split(' ').next().map(str::to_string))
        .collect()
}

/// Every mount of this process's namespace: mount id → mount point, per
/// `/proc/self/mountinfo`. `None` if the table cannot be read.
pub fn mount_table() -> Option<std::collections::HashMap<u64, PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(
        info.lines()
            .filter_map(|l| {
                let mut fields = l.split(' ');
                let id = fields.next()?.parse().ok()?;
                let point = unescape_mountinfo(fields.nth(3)?);
                Some((id, PathBuf::from(std::ffi::OsString::from_vec(point))))
            })
            .collect(),
    )
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

/// `path` resolved (symlinks, `.`, `..`, trailing `/`), so that one mount point written two
/// ways is one path. Where the path itself cannot be resolved (a dead FUSE mount there cannot be
/// stat'ed, or it does not exist yet), its directory is resolved and the last component kept.
pub fn canonical_target(path: &Path) -> io::Result<PathBuf> {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return Ok(resolved);
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            Ok(std::fs::canonicalize(dir)?.join(name))
        }
        _ => std::fs::canonicalize(path),
    }
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && field.is_char_boundary(i + 4) {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_found_by_its_id_and_path_only() {
        let proc = Path::new("/proc");
        let id = mount_id(proc).expect("Linux 5.8+ reports mount ids");
        let table = mount_table().expect("/proc/self/mountinfo");
        assert_eq!(table.get(&id), Some(&proc.to_path_buf()));
        assert_eq!(table.get(&(id + 1_000_000)), None);
        assert_ne!(table.get(&id), Some(&PathBuf::from("/nonexistent")));
    }

    #[test]
    fn statfs_fuse_names_a_missing_path_and_a_mount_of_another_type() {
        let missing = statfs_fuse(Path::new("/nonexistent/vaultfs")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(
            missing.to_string().contains("/nonexistent/vaultfs")
                && missing.to_string().contains("does not exist"),
            "{missing}"
        );
        let proc = statfs_fuse(Path::new("/proc")).unwrap_err();
        assert_eq!(proc.kind(), io::ErrorKind::NotFound);
        assert!(
            proc.to_string()
                .contains("no FUSE mount at /proc in this mount namespace (a filesystem of type 0x9fa0 is there)"),
            "{proc}"
        );
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        let before = raise_open_files_limit().expect("raise RLIMIT_NOFILE");
        let now = open_files_limit().expect("read RLIMIT_NOFILE");
        assert!(before.soft <= before.hard, "{before:?}");
        assert_eq!(now.soft, now.hard, "{now:?}");
        assert_eq!(now.hard, before.hard, "the hard limit stays: {now:?}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
        assert_eq!(unescape_mountinfo("/x\\"), b"/x\\");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
        assert!(!is_disconnected(dir.path()));
    }

    #[test]
    #[ignore = "needs root: umount2 refuses an unprivileged caller (EPERM) before EINVAL"]
    fn detaching_a_fresh_dir_reports_nothing_unmounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!detach_unmount(dir.path()).unwrap());
    }

    #[test]
    fn the_kernel_and_the_mount_table_agree_on_mount_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, mounted) in [
            (Path::new("/"), true),
            (Path::new("/proc"), true),
            (dir.path(), false),
        ] {
            if let Some(root) = mount_root_attribute(path) {
                assert_eq!(root, mounted, "statx on {}", path.display());
            }
            assert_eq!(
                !mount_stack(path).is_empty(),
                mounted,
                "mountinfo on {}",
                path.display()
            );
            assert_eq!(is_mount_point(path), mounted, "{}", path.display());
        }
        // A directory is on the mount of its parent; a mount point on its own.
        if let Some(root) = mount_id(Path::new("/")) {
            assert_eq!(mount_id(Path::new("/etc")), Some(root));
            assert_ne!(mount_id(Path::new("/proc")), Some(root));
        }
    }
}
