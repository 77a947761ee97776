//! What is mounted where, as the kernel says it: `statfs` (is a FUSE mount there, and does its
//! daemon answer), `statx` (mount points and mount ids) and `/proc/self/mountinfo`.

use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::{check, cstring};

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

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(super) fn unescape_mountinfo(field: &str) -> Vec<u8> {
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
