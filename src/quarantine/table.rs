//! The in-flight table, `<state-dir>/inflight`: this daemon's count of FUSE requests in flight
//! per bucket, memory-mapped (`MAP_SHARED`, on tmpfs) so that counting costs an atomic add and
//! sub and the counts outlive the process however it dies; its header carries the generation
//! and the clean-exit flag. Also reads the predecessor's table once its `flock` is let go. The
//! quarantine's mapping and locking live here only (through `sys::file`).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::BUCKETS;

/// Bytes before the counters: magic, generation, clean flag; a page, so the counters are
/// aligned.
const HEADER: usize = 4096;
const TABLE_BYTES: usize = HEADER + BUCKETS * 4;
const MAGIC: u64 = u64::from_le_bytes(*b"VFSINFL1");
const MAGIC_AT: usize = 0;
const GENERATION_AT: usize = 8;
const CLEAN_AT: usize = 16;

/// This daemon's in-flight table, mapped for the life of the process.
pub(super) struct Table {
    /// Holds the `flock` that tells a successor this daemon is alive.
    _file: File,
    pub(super) clean: &'static AtomicU32,
    pub(super) counters: &'static [AtomicU32],
}

impl Table {
    /// Creates a new table of generation `generation` at `path` (through a temporary file and a
    /// rename, so that a predecessor still running keeps writing to its own), locked.
    pub(super) fn create(path: &Path, generation: u64) -> io::Result<Self> {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        // Sparse: untouched buckets cost no memory.
        file.set_len(TABLE_BYTES as u64)?;
        let map = crate::sys::file::map_shared(file.as_fd(), TABLE_BYTES)?;
        // The lock is taken through a descriptor of its own: the mapping keeps its descriptor's
        // open file alive, and with it any lock taken through it, until the process is gone.
        drop(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        if !crate::sys::file::try_lock_exclusive(file.as_fd())? {
            return Err(io::Error::other(
                "a new in-flight table is locked by another process",
            ));
        }
        map.u64_at(MAGIC_AT).store(MAGIC, Ordering::Relaxed);
        map.u64_at(GENERATION_AT)
            .store(generation, Ordering::Relaxed);
        let clean = map.u32_at(CLEAN_AT);
        clean.store(0, Ordering::SeqCst);
        // Other processes touch the counters only after this one is gone (the lock).
        let counters = map.u32s(HEADER, BUCKETS);
        std::fs::rename(&tmp, path)?;
        Ok(Self {
            _file: file,
            clean,
            counters,
        })
    }
}

/// What the previous daemon's table says.
#[derive(Debug, PartialEq)]
pub(super) enum Predecessor {
    /// No table, or one this daemon cannot read (another version, cut short).
    Unknown,
    /// Still locked after the wait: it runs (or hangs); nothing is judged.
    Alive,
    Exited {
        generation: u64,
        clean: bool,
        /// Buckets with requests in flight.
        buckets: Vec<u32>,
    },
}

/// Waits up to `wait` for the table at `path` to be unlocked and reads it.
pub(super) fn read_predecessor(path: &Path, wait: Duration) -> io::Result<Predecessor> {
    let deadline = std::time::Instant::now() + wait;
    let file = loop {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Predecessor::Unknown),
            Err(e) => return Err(e),
        };
        if !crate::sys::file::try_lock_exclusive(file.as_fd())? {
            if std::time::Instant::now() >= deadline {
                return Ok(Predecessor::Alive);
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // The path may have been replaced while waiting: the table is the one it names now.
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == file.metadata()?.ino() => break file,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Predecessor::Unknown),
            Err(e) => return Err(e),
        }
    };
    if file.metadata()?.len() != TABLE_BYTES as u64 {
        return Ok(Predecessor::Unknown);
    }
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let word = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if word(MAGIC_AT) != MAGIC {
        return Ok(Predecessor::Unknown);
    }
    let clean = u32::from_ne_bytes(header[CLEAN_AT..CLEAN_AT + 4].try_into().expect("4 bytes"));
    // Read, not mapped: holes stay holes.
    let mut counters = vec![0u8; BUCKETS * 4];
    file.read_exact_at(&mut counters, HEADER as u64)?;
    let buckets = counters
        .chunks_exact(4)
        .enumerate()
        .filter(|(_, c)| *c != [0; 4])
        .map(|(i, _)| i as u32)
        .collect();
    Ok(Predecessor::Exited {
        generation: word(GENERATION_AT),
        clean: clean != 0,
        buckets,
    })
}

pub(super) fn predecessor_generation(p: &Predecessor) -> u64 {
    match p {
        Predecessor::Exited { generation, .. } => *generation,
        _ => 0,
    }
}
