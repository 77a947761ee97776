//! Files, paths and descriptors: a private state file written whole, a path resolved even where
//! a dead mount makes it unreadable, one descriptor number made to designate another's file, a
//! file mapped shared as atomics, and a file's exclusive lock.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

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

/// Makes the descriptor number `target` designate the open file of `source` (`dup3`, so
/// close-on-exec): atomically, so a read or write on `target` meanwhile sees the old file or the
/// new one, never a closed descriptor. `target` keeps its owner, who goes on using (and closes)
/// that number as before; only what it designates changes, so the owner must expect that.
pub fn duplicate_onto(source: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both are open descriptors, borrowed for the call; dup3 only changes which open
    // file `target`'s number designates, and allocates no new descriptor.
    let rc = unsafe { libc::dup3(source.as_raw_fd(), target.as_raw_fd(), libc::O_CLOEXEC) };
    // dup3 returns `target`'s number on success, not 0.
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A file mapped shared and read-write for the rest of the process's life (never unmapped), so
/// every view of it may be `'static`. Seen only as atomics: other mappings of the file, in this
/// process or others, read and write the same memory.
#[derive(Clone, Copy, Debug)]
pub struct SharedMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the map only hands out atomics, which any thread may share.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

/// Maps the first `len` bytes of `file` (opened read-write, at least `len` long: a page past
/// its end would fault) shared, read-write, for the rest of the process's life. The mapping
/// holds the file's open file, so a lock taken through `file` stays held until the process is
/// gone.
pub fn map_shared(file: BorrowedFd<'_>, len: usize) -> io::Result<SharedMap> {
    let size = std::fs::File::from(file.try_clone_to_owned()?)
        .metadata()?
        .len();
    if len == 0 || size < len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot map {len} bytes of a file of {size}"),
        ));
    }
    // SAFETY: a new shared mapping of `len` bytes of a file at least that long; the result is
    // checked. It is never unmapped, so references into it may be 'static.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(base.cast()).expect("mmap returns MAP_FAILED, never null, on error");
    Ok(SharedMap { base, len })
}

impl SharedMap {
    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: [`map_shared`] refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8 bytes at `offset` as an `AtomicU64`. Panics unless they lie within the mapping at
    /// an 8-aligned offset.
    pub fn u64_at(&self, offset: usize) -> &'static AtomicU64 {
        &self.atomics::<AtomicU64>(offset, 1)[0]
    }

    /// The 4 bytes at `offset` as an `AtomicU32`. Panics unless they lie within the mapping at
    /// a 4-aligned offset.
    pub fn u32_at(&self, offset: usize) -> &'static AtomicU32 {
        &self.atomics::<AtomicU32>(offset, 1)[0]
    }

    /// `count` `AtomicU32`s from `offset` on. Panics unless they lie within the mapping at a
    /// 4-aligned offset.
    pub fn u32s(&self, offset: usize, count: usize) -> &'static [AtomicU32] {
        self.atomics::<AtomicU32>(offset, count)
    }

    fn atomics<T>(&self, offset: usize, count: usize) -> &'static [T] {
        let size = std::mem::size_of::<T>();
        let end = count
            .checked_mul(size)
            .and_then(|n| n.checked_add(offset))
            .expect("offset and count fit in usize");
        assert!(end <= self.len, "{offset}+{count}x{size} past {}", self.len);
        assert_eq!(offset % size, 0, "offset {offset} not {size}-aligned");
        // SAFETY: the range lies within the mapping (checked above), which is page-aligned and
        // never unmapped, at an offset aligned for T; T is an atomic integer, valid for any
        // bytes and shared safely with other threads and processes.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset).cast::<T>(), count) }
    }
}

/// Takes the exclusive `flock` of `file` if no other open file holds a lock on it: `Ok(false)`
/// when one does. Held until every descriptor of this open file is closed (a mapping counts).
pub fn try_lock_exclusive(file: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock on a descriptor borrowed for the call; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_descriptor_duplicated_onto_writes_to_the_source_file_and_stays_cloexec() {
        let mut source = tempfile::tempfile().unwrap();
        let mut target = tempfile::tempfile().unwrap();
        duplicate_onto(source.as_fd(), target.as_fd()).unwrap();
        target.write_all(b"through the target's number").unwrap();
        source.rewind().unwrap();
        let mut got = String::new();
        source.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the target's number");
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", target.as_raw_fd())).unwrap();
        let flags = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "{fdinfo}");
    }

    #[test]
    fn stores_through_a_shared_map_reach_the_file_and_other_mappings() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let one = map_shared(file.as_fd(), 8192).unwrap();
        let two = map_shared(file.as_fd(), 8192).unwrap();
        one.u64_at(8).store(0x0102_0304_0506_0708, Ordering::SeqCst);
        one.u32_at(16).store(7, Ordering::SeqCst);
        one.u32s(4096, 3)[2].store(9, Ordering::SeqCst);
        assert_eq!(two.u64_at(8).load(Ordering::SeqCst), 0x0102_0304_0506_0708);
        assert_eq!(two.u32s(4096, 3)[2].load(Ordering::SeqCst), 9);
        let mut bytes = [0u8; 12];
        file.read_exact_at(&mut bytes, 8).unwrap();
        assert_eq!(bytes[..8], 0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(bytes[8..], 7u32.to_ne_bytes());
        let mut counter = [0u8; 4];
        file.read_exact_at(&mut counter, 4096 + 8).unwrap();
        assert_eq!(counter, 9u32.to_ne_bytes());
        assert_eq!(one.len(), 8192);
    }

    #[test]
    fn a_map_past_the_files_end_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(100).unwrap();
        let err = map_shared(file.as_fd(), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(map_shared(file.as_fd(), 0).is_err());
    }

    #[test]
    #[should_panic(expected = "past")]
    fn a_view_past_the_map_panics() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        map_shared(file.as_fd(), 4096).unwrap().u32s(4092, 2);
    }

    #[test]
    #[should_panic(expected = "aligned")]
    fn a_misaligned_view_panics() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        map_shared(file.as_fd(), 4096).unwrap().u64_at(4);
    }

    #[test]
    fn an_exclusive_lock_is_held_until_its_open_file_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        std::fs::write(&path, b"x").unwrap();
        let first = std::fs::File::open(&path).unwrap();
        let second = std::fs::File::open(&path).unwrap();
        assert!(try_lock_exclusive(first.as_fd()).unwrap());
        assert!(
            !try_lock_exclusive(second.as_fd()).unwrap(),
            "held by first"
        );
        drop(first);
        assert!(try_lock_exclusive(second.as_fd()).unwrap());
    }

    #[test]
    fn duplicating_a_descriptor_onto_itself_is_refused() {
        let source = tempfile::tempfile().unwrap();
        // Same number twice: dup3 refuses it (EINVAL), where dup2 would do nothing.
        let err = duplicate_onto(source.as_fd(), source.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
