//! Crash-loop quarantine of the node plugin: a volume whose FUSE requests were in flight when
//! the daemon died twice in a row is fenced off for a back-off, so the next daemon does not die
//! the same way and every other volume is served again after one restart.
//!
//! Owns two files of the state directory. `<state-dir>/inflight` is this daemon's count of FUSE
//! requests in flight per volume, memory-mapped (`MAP_SHARED`, on tmpfs): an atomic add and sub
//! per request, no system call, and the counts outlive the process however it dies. Its header
//! says whether the daemon exited cleanly. `<state-dir>/quarantine.json` (a serde record) keeps
//! the last unclean death with the volumes it had requests in flight for, and the volumes
//! quarantined with their back-off. A daemon holds `flock` on its table for its whole life, so
//! its successor reads it only once the process is gone.
//!
//! Knows volumes by slot only (`slot::Slot`, the volume's number on the node connection) and
//! their names for logs; uses only `sys` (the record's atomic write) and `config` (durations in
//! logs) of vaultfs, and is handed its gauge. `fuse` counts and fences requests through it; the
//! wiring opens it and marks the clean exit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Buckets of the in-flight table: a volume's requests count in bucket `slot % BUCKETS`. Slots
/// are never given out twice, so two volumes share a bucket only when both live while 65,536
/// other volumes were published between them; they are then suspected together.
pub const BUCKETS: usize = 65_536;

/// The longest back-off, unless the first one (`--quarantine-backoff`) is longer.
pub const LONGEST_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// Bytes before the counters: magic, generation, clean flag; a page, so the counters are
/// aligned.
const HEADER: usize = 4096;
const TABLE_BYTES: usize = HEADER + BUCKETS * 4;
const MAGIC: u64 = u64::from_le_bytes(*b"VFSINFL1");
const MAGIC_AT: usize = 0;
const GENERATION_AT: usize = 8;
const CLEAN_AT: usize = 16;

const TABLE_FILE: &str = "inflight";
const LEDGER_FILE: &str = "quarantine.json";

/// How the quarantine behaves.
#[derive(Clone, Copy, Debug)]
pub struct QuarantineConfig {
    /// How long a volume stays quarantined the first time (`--quarantine-backoff`); each
    /// repeat doubles it, up to `LONGEST_BACKOFF` (or this, if longer).
    pub backoff: Duration,
    /// Longest wait at start for the previous daemon to let go of its table (it may still be
    /// draining); past it this daemon starts a table of its own and judges nothing.
    pub wait: Duration,
}

impl QuarantineConfig {
    fn longest(&self) -> Duration {
        self.backoff.max(LONGEST_BACKOFF)
    }
}

/// What `quarantine.json` holds. Times are wall-clock milliseconds since the Unix epoch (they
/// must outlive the process); a remaining time is never taken as longer than its back-off, so
/// a clock step cannot lengthen a quarantine.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
struct Ledger {
    /// The generation of the last daemon that started: its table's header carries the same.
    generation: u64,
    /// The last daemon that died without a clean exit.
    last_death: Option<Death>,
    /// Buckets quarantined now or recently, by bucket. A record is kept for the longest
    /// back-off after its quarantine ended: a repeat within that time doubles the back-off.
    quarantined: BTreeMap<u32, Sentence>,
}

/// A daemon that died without a clean exit, and the buckets it had requests in flight in.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Death {
    generation: u64,
    at_ms: u64,
    buckets: Vec<u32>,
}

/// A bucket's quarantine: until when, and the back-off it was given.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Copy)]
struct Sentence {
    until_ms: u64,
    backoff_ms: u64,
}

impl Ledger {
    /// Judges `death` (the predecessor's, if it died uncleanly) at `now_ms`: a bucket in flight
    /// at this death and the one before it, by consecutive daemons, is quarantined for the
    /// first back-off; one quarantined within the memory of its record, for twice its last.
    /// Returns the buckets quarantined now.
    fn judge(&mut self, death: Option<Death>, now_ms: u64, config: &QuarantineConfig) -> Vec<u32> {
        let first = millis(config.backoff);
        let longest = millis(config.longest());
        self.quarantined
            .retain(|_, s| now_ms < s.until_ms.saturating_add(longest));
        let Some(death) = death else {
            return Vec::new();
        };
        if self
            .last_death
            .as_ref()
            .is_some_and(|d| d.generation == death.generation)
        {
            // Judged already, by a daemon that died before it started its own table.
            return Vec::new();
        }
        let before = self
            .last_death
            .as_ref()
            .filter(|d| d.generation.checked_add(1) == Some(death.generation));
        let mut sentenced = Vec::new();
        for &bucket in &death.buckets {
            let backoff = match self.quarantined.get(&bucket) {
                Some(earlier) => earlier.backoff_ms.saturating_mul(2).min(longest),
                None if before.is_some_and(|d| d.buckets.contains(&bucket)) => first,
                None => continue,
            };
            self.quarantined.insert(
                bucket,
                Sentence {
                    until_ms: now_ms.saturating_add(backoff),
                    backoff_ms: backoff,
                },
            );
            sentenced.push(bucket);
        }
        self.last_death = Some(death);
        sentenced
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// This daemon's in-flight table, mapped for the life of the process.
struct Table {
    /// Holds the `flock` that tells a successor this daemon is alive.
    _file: File,
    clean: &'static AtomicU32,
    counters: &'static [AtomicU32],
}

impl Table {
    /// Creates a new table of generation `generation` at `path` (through a temporary file and a
    /// rename, so that a predecessor still running keeps writing to its own), locked.
    fn create(path: &Path, generation: u64) -> io::Result<Self> {
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
        let base = map(&file)?;
        // The lock is taken through a descriptor of its own: the mapping keeps its descriptor's
        // open file alive, and with it any lock taken through it, until the process is gone.
        drop(file);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        if !try_lock(&file)? {
            return Err(io::Error::other(
                "a new in-flight table is locked by another process",
            ));
        }
        let header = |at: usize| {
            // SAFETY: `at` + 8 lies within the header, 8-aligned, in a mapping that is never
            // unmapped; the kernel zeroed it.
            unsafe { &*(base.add(at) as *const AtomicU64) }
        };
        header(MAGIC_AT).store(MAGIC, Ordering::Relaxed);
        header(GENERATION_AT).store(generation, Ordering::Relaxed);
        // SAFETY: as above, 4 bytes at a 4-aligned offset of the header.
        let clean = unsafe { &*(base.add(CLEAN_AT) as *const AtomicU32) };
        clean.store(0, Ordering::SeqCst);
        // SAFETY: BUCKETS u32 counters follow the header, page-aligned, in a mapping of
        // TABLE_BYTES that is never unmapped; AtomicU32 has the layout of u32. Other processes
        // touch them only after this one is gone (the lock).
        let counters =
            unsafe { std::slice::from_raw_parts(base.add(HEADER) as *const AtomicU32, BUCKETS) };
        std::fs::rename(&tmp, path)?;
        Ok(Self {
            _file: file,
            clean,
            counters,
        })
    }
}

/// Maps `file` (TABLE_BYTES long) shared, for the rest of the process's life.
fn map(file: &File) -> io::Result<*mut u8> {
    // SAFETY: a new shared mapping of a file of at least TABLE_BYTES; the result is checked.
    // It is never unmapped, so references into it may be 'static.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TABLE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(base.cast())
}

/// Takes the exclusive `flock` of `file` if free.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this function borrows; no pointers.
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

/// What the previous daemon's table says.
#[derive(Debug, PartialEq)]
enum Predecessor {
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
fn read_predecessor(path: &Path, wait: Duration) -> io::Result<Predecessor> {
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
        if !try_lock(&file)? {
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

fn bucket(slot: u32) -> u32 {
    slot % BUCKETS as u32
}

/// A volume served now and quarantined.
struct Fenced {
    until: Instant,
    volume: String,
}

/// The node plugin's quarantine: counts this daemon's FUSE requests in flight per volume, and
/// fences off the volumes its predecessors died with (see the module's documentation).
pub struct Quarantine {
    table: Table,
    /// What the ledger sentenced, by bucket (fixed at start).
    sentences: HashMap<u32, Sentence>,
    /// Buckets in flight at the predecessor's unclean death and not quarantined: warned about
    /// when their volume is served.
    suspects: HashSet<u32>,
    /// Volumes served now and quarantined, by slot.
    fenced: Mutex<HashMap<u32, Fenced>>,
    /// `fenced.len()`, read without the lock on every request.
    fenced_count: AtomicUsize,
    changed: tokio::sync::Notify,
    gauge: Gauge,
}

/// One FUSE request counted in flight; uncounted when dropped (after its reply is written).
pub struct InFlight(&'static AtomicU32);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Quarantine {
    /// Reads what the previous daemon left in `state_dir` (once it is gone: see
    /// `QuarantineConfig::wait`), judges its death, records the verdict and starts this
    /// daemon's table. Call before serving any FUSE request. Blocks.
    pub fn open(state_dir: &Path, config: QuarantineConfig, gauge: Gauge) -> io::Result<Self> {
        let table_path = state_dir.join(TABLE_FILE);
        let ledger_path = state_dir.join(LEDGER_FILE);
        let predecessor = read_predecessor(&table_path, config.wait)?;
        let mut ledger = read_ledger(&ledger_path);
        let death = match &predecessor {
            Predecessor::Exited {
                generation,
                clean: false,
                buckets,
            } if *generation == ledger.generation => Some(Death {
                generation: *generation,
                at_ms: now_ms(),
                buckets: buckets.clone(),
            }),
            _ => None,
        };
        match (&predecessor, &death) {
            (Predecessor::Alive, _) => tracing::warn!(
                table = %table_path.display(),
                waited_ms = millis(config.wait),
                "the previous daemon still holds its in-flight table; not judging how it ends"
            ),
            (_, Some(death)) => tracing::warn!(
                volumes_in_flight = death.buckets.len(),
                "the previous daemon did not exit cleanly (a crash, an OOM kill, kill -9); a volume in flight at two such deaths in a row is quarantined"
            ),
            _ => {}
        }
        let suspects: Vec<u32> = death
            .as_ref()
            .map(|d| d.buckets.clone())
            .unwrap_or_default();
        let sentenced = ledger.judge(death, now_ms(), &config);
        ledger.generation = ledger.generation.max(predecessor_generation(&predecessor)) + 1;
        write_ledger(&ledger_path, &ledger)?;
        let table = Table::create(&table_path, ledger.generation)?;
        let sentences: HashMap<u32, Sentence> = ledger.quarantined.into_iter().collect();
        let suspects = suspects
            .into_iter()
            .filter(|b| !sentenced.contains(b))
            .collect();
        Ok(Self {
            table,
            sentences,
            suspects,
            fenced: Mutex::default(),
            fenced_count: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
            gauge,
        })
    }

    /// Counts a request about volume `slot` in flight until the result is dropped.
    pub fn enter(&self, slot: u32) -> InFlight {
        let counter = &self.table.counters[bucket(slot) as usize];
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// Whether volume `slot` is quarantined now.
    pub fn fences(&self, slot: u32) -> bool {
        self.fenced_count.load(Ordering::Relaxed) != 0
            && self
                .fenced
                .lock()
                .get(&slot)
                .is_some_and(|f| Instant::now() < f.until)
    }

    /// Volume `slot`, named `volume` in logs, is served from now on: fenced off if its
    /// quarantine runs (logged once, as an error naming it), warned about if it was in flight
    /// when the previous daemon died.
    pub fn attached(&self, slot: u32, volume: &str) {
        let bucket = bucket(slot);
        let remaining = self.sentences.get(&bucket).and_then(|s| {
            let left = s.until_ms.saturating_sub(now_ms()).min(s.backoff_ms);
            (left > 0).then(|| {
                (
                    Duration::from_millis(left),
                    Duration::from_millis(s.backoff_ms),
                )
            })
        });
        let Some((left, backoff)) = remaining else {
            if self.suspects.contains(&bucket) {
                tracing::warn!(
                    volume,
                    slot,
                    "this volume had FUSE requests in flight when the previous daemon died; if the next daemon dies with it in flight too, it is quarantined"
                );
            }
            return;
        };
        let mut fenced = self.fenced.lock();
        fenced.insert(
            slot,
            Fenced {
                until: Instant::now() + left,
                volume: volume.to_string(),
            },
        );
        self.count(fenced.len());
        drop(fenced);
        self.changed.notify_one();
        tracing::error!(
            volume,
            slot,
            backoff = %crate::config::format_duration(backoff),
            remaining = %crate::config::format_duration(left),
            "volume quarantined: the daemon died with its FUSE requests in flight at consecutive restarts; its files fail with EIO (nothing of it runs) until the back-off ends"
        );
    }

    /// Volume `slot` is no longer served (unpublished): its quarantine, if any, ends with it.
    pub fn detached(&self, slot: u32) {
        let mut fenced = self.fenced.lock();
        if let Some(gone) = fenced.remove(&slot) {
            self.count(fenced.len());
            tracing::info!(
                volume = gone.volume,
                slot,
                "a quarantined volume was unpublished"
            );
        }
    }

    fn count(&self, fenced: usize) {
        self.fenced_count.store(fenced, Ordering::Relaxed);
        self.gauge.set(fenced as i64);
    }

    /// Ends each quarantine when its back-off has passed (logged, naming the volume), for as
    /// long as the daemon runs.
    pub async fn lift_when_due(self: Arc<Self>) {
        loop {
            let changed = self.changed.notified();
            let next = {
                let mut fenced = self.fenced.lock();
                let now = Instant::now();
                let over: Vec<u32> = fenced
                    .iter()
                    .filter(|(_, f)| f.until <= now)
                    .map(|(slot, _)| *slot)
                    .collect();
                for slot in over {
                    if let Some(f) = fenced.remove(&slot) {
                        tracing::warn!(
                            volume = f.volume,
                            slot,
                            "quarantine over: the volume is served again"
                        );
                    }
                }
                self.count(fenced.len());
                fenced.values().map(|f| f.until).min()
            };
            match next {
                Some(until) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Marks this daemon's exit as clean: its successor judges nothing, whatever was in flight.
    /// Call on the planned stop only, last.
    pub fn exit_cleanly(&self) {
        self.table.clean.store(1, Ordering::SeqCst);
    }
}

fn predecessor_generation(p: &Predecessor) -> u64 {
    match p {
        Predecessor::Exited { generation, .. } => *generation,
        _ => 0,
    }
}

/// The ledger at `path`; an unreadable one is logged and taken as empty (nothing quarantined).
fn read_ledger(path: &Path) -> Ledger {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable quarantine record");
            Ledger::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ledger::default(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable quarantine record");
            Ledger::default()
        }
    }
}

/// Writes the ledger atomically, mode 0600.
fn write_ledger(path: &Path, ledger: &Ledger) -> io::Result<()> {
    let bytes = serde_json::to_vec(ledger).map_err(io::Error::other)?;
    crate::sys::write_private(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn config(backoff: Duration) -> QuarantineConfig {
        QuarantineConfig {
            backoff,
            wait: Duration::from_millis(200),
        }
    }

    fn death(generation: u64, buckets: &[u32]) -> Option<Death> {
        Some(Death {
            generation,
            at_ms: 0,
            buckets: buckets.to_vec(),
        })
    }

    #[test]
    fn one_death_quarantines_nothing_and_two_in_a_row_quarantine_what_both_had_in_flight() {
        let c = config(60 * SECOND);
        let mut ledger = Ledger::default();
        assert!(ledger.judge(death(1, &[5, 9]), 1_000, &c).is_empty());
        assert_eq!(ledger.judge(death(2, &[5, 7]), 2_000, &c), vec![5]);
        assert_eq!(
            ledger.quarantined[&5],
            Sentence {
                until_ms: 62_000,
                backoff_ms: 60_000
            }
        );
        assert!(!ledger.quarantined.contains_key(&7));
    }

    #[test]
    fn deaths_with_a_clean_exit_between_them_are_not_a_loop() {
        let c = config(60 * SECOND);
        let mut ledger = Ledger::default();
        ledger.judge(death(1, &[5]), 1_000, &c);
        // Generation 2 exited cleanly; generation 3 died.
        assert!(ledger.judge(death(3, &[5]), 2_000, &c).is_empty());
        // ...and 4 right after it: a loop again.
        assert_eq!(ledger.judge(death(4, &[5]), 3_000, &c), vec![5]);
    }

    #[test]
    fn a_death_judged_twice_counts_once() {
        let c = config(60 * SECOND);
        let mut ledger = Ledger::default();
        ledger.judge(death(1, &[5]), 1_000, &c);
        assert!(ledger.judge(death(1, &[5]), 1_500, &c).is_empty());
        assert!(ledger.quarantined.is_empty());
    }

    #[test]
    fn a_repeat_within_memory_doubles_the_back_off_at_one_death_up_to_the_longest() {
        let c = config(10 * 60 * SECOND);
        let mut ledger = Ledger::default();
        ledger.judge(death(1, &[5]), 0, &c);
        ledger.judge(death(2, &[5]), 0, &c);
        let mut now = ledger.quarantined[&5].until_ms;
        let mut seen = Vec::new();
        for generation in [4, 6, 8] {
            // A clean exit between: still one death suffices while the record is remembered.
            assert_eq!(ledger.judge(death(generation, &[5]), now, &c), vec![5]);
            let s = ledger.quarantined[&5];
            seen.push(s.backoff_ms / 60_000);
            now = s.until_ms;
        }
        assert_eq!(seen, vec![20, 30, 30], "minutes: doubled, capped at 30");
    }

    #[test]
    fn a_record_is_forgotten_once_the_volume_served_for_the_longest_back_off() {
        let c = config(60 * SECOND);
        let mut ledger = Ledger::default();
        ledger.judge(death(1, &[5]), 0, &c);
        ledger.judge(death(2, &[5]), 0, &c);
        let forgotten = 60_000 + millis(LONGEST_BACKOFF);
        // Not right after the last death (generation 3 exited cleanly): no loop either.
        assert!(ledger.judge(death(4, &[5]), forgotten, &c).is_empty());
        assert!(ledger.quarantined.is_empty());
    }

    fn open(dir: &Path, backoff: Duration) -> Quarantine {
        Quarantine::open(dir, config(backoff), Gauge::default()).expect("open the quarantine")
    }

    /// A daemon's life: `in_flight` slots have a request in flight when it ends, cleanly or not.
    fn live(dir: &Path, in_flight: &[u32], clean: bool) -> Quarantine {
        let q = open(dir, 60 * SECOND);
        for &slot in in_flight {
            std::mem::forget(q.enter(slot));
        }
        if clean {
            q.exit_cleanly();
        }
        q
    }

    #[tokio::test]
    async fn a_volume_in_flight_at_two_unclean_deaths_in_a_row_is_fenced_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(live(dir.path(), &[3, 5], false));
        drop(live(dir.path(), &[5], false));
        let q = open(dir.path(), 60 * SECOND);
        q.attached(3, "ns/pod/three");
        q.attached(5, "ns/pod/five");
        assert!(q.fences(5));
        assert!(!q.fences(3), "in flight at one death only");
        assert_eq!(q.gauge.get(), 1);
        q.detached(5);
        assert!(!q.fences(5), "unpublished: over");
        assert_eq!(q.gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_clean_exit_with_requests_in_flight_is_no_death() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(live(dir.path(), &[5], false));
        drop(live(dir.path(), &[5], true));
        drop(live(dir.path(), &[5], false));
        let q = open(dir.path(), 60 * SECOND);
        q.attached(5, "ns/pod/five");
        assert!(!q.fences(5));
    }

    #[tokio::test]
    async fn a_request_answered_before_the_death_is_not_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..2 {
            let q = open(dir.path(), 60 * SECOND);
            drop(q.enter(5));
            drop(q);
        }
        let q = open(dir.path(), 60 * SECOND);
        q.attached(5, "ns/pod/five");
        assert!(!q.fences(5));
    }

    #[tokio::test]
    async fn a_successor_waits_for_the_predecessor_to_let_go_and_judges_nothing_if_it_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(live(dir.path(), &[5], false));
        let running = live(dir.path(), &[5], false);
        // The predecessor still runs: past the wait, nothing is judged.
        let q = open(dir.path(), 60 * SECOND);
        q.attached(5, "ns/pod/five");
        assert!(!q.fences(5));
        drop(running);
    }

    #[tokio::test]
    async fn unreadable_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LEDGER_FILE), b"{not json").expect("write");
        std::fs::write(dir.path().join(TABLE_FILE), b"short").expect("write");
        let q = open(dir.path(), 60 * SECOND);
        q.attached(5, "ns/pod/five");
        assert!(!q.fences(5));
        let ledger = read_ledger(&dir.path().join(LEDGER_FILE));
        assert_eq!(ledger.generation, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quarantine_is_lifted_when_its_back_off_has_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..2 {
            let q = open(dir.path(), 2 * SECOND);
            std::mem::forget(q.enter(5));
            drop(q);
        }
        let q = Arc::new(open(dir.path(), 2 * SECOND));
        q.attached(5, "ns/pod/five");
        assert!(q.fences(5));
        let lifting = tokio::spawn(q.clone().lift_when_due());
        tokio::time::sleep(SECOND).await;
        assert!(q.fences(5));
        assert_eq!(q.gauge.get(), 1);
        tokio::time::sleep(2 * SECOND).await;
        assert!(!q.fences(5));
        assert_eq!(q.gauge.get(), 0);
        lifting.abort();
    }

    #[test]
    fn counting_a_request_costs_two_atomic_operations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(dir.path(), 60 * SECOND);
        let n = 2_000_000u32;
        let started = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(q.enter(i % 64));
        }
        let per = started.elapsed() / n;
        eprintln!("quarantine: enter + drop of an in-flight count: {per:?} per request");
        assert!(q
            .table
            .counters
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == 0));
    }
}
