//! The mount table and mount syscalls: `/proc/self/mountinfo`, binds, lazy unmounts, and
//! whether a FUSE mount's daemon still answers (`statfs`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub id: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// All current mounts, in mountinfo order (later entries are mounted on top of earlier ones).
pub fn mountinfo() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let id = fields.first()?.parse().ok()?;
            let mount_point = unescape_mountinfo(fields.get(4)?);
            let fstype = right.split(' ').next()?.to_string();
            Some(MountEntry {
                id,
                mount_point,
                fstype,
            })
        })
        .collect()
}

/// Mounts whose mount point is exactly `path`.
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// `mount(2)` with no filesystem type or data: binds (`MS_BIND`, `MS_REC`) and propagation
/// changes.
pub fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let source = source.map(c);
    let target = c(target);
    // SAFETY: the strings are valid and NUL-terminated for the duration of the call; null
    // filesystem type and data are allowed for binds and propagation changes.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detaches whatever is mounted on top of `path` (`umount2(MNT_DETACH)`).
pub fn lazy_unmount(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `statfs(2)` on `path` from a helper thread: `Some(Ok(()))` or `Some(Err(errno))`, or `None`
/// if there was no answer within `limit` (a hung daemon).
pub fn statfs_result(path: &Path, limit: Duration) -> Option<Result<(), i32>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: `c` is a valid NUL-terminated string and `buf` a writable statfs struct.
        let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
        };
        let _ = tx.send(result);
    });
    rx.recv_timeout(limit).ok()
}

/// Whether the topmost mount at `path` is a FUSE mount whose daemon is gone ("Transport
/// endpoint is not connected"). `statfs` always asks the daemon, unlike `stat`, which the
/// kernel may answer from its attribute cache.
pub fn is_dead_mount(path: &Path) -> bool {
    is_mounted(path) && statfs_result(path, Duration::from_secs(2)) == Some(Err(libc::ENOTCONN))
}

/// Whether the topmost mount at `path` answers `statfs` (its daemon is alive and serving).
pub fn is_live_mount(path: &Path) -> bool {
    is_mounted(path) && statfs_result(path, Duration::from_secs(2)) == Some(Ok(()))
}
