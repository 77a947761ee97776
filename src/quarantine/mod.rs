//! Crash-loop quarantine of the node plugin: a volume whose FUSE requests were in flight when
//! the daemon died twice in a row is fenced off for a back-off, so the next daemon does not die
//! the same way and every other volume is served again after one restart.
//!
//! Owns two files of the state directory. `<state-dir>/inflight` (`table`) is this daemon's
//! count of FUSE requests in flight per volume, memory-mapped: an atomic add and sub per
//! request, no system call, and the counts outlive the process however it dies. Its header
//! says whether the daemon exited cleanly. `<state-dir>/quarantine.json` (`ledger`) keeps the
//! last unclean death with the volumes it had requests in flight for, and the volumes
//! quarantined with their back-off. A daemon holds `flock` on its table for its whole life, so
//! its successor reads it only once the process is gone. This file wires them: it judges the
//! predecessor at start, counts requests and fences the volumes served now.
//!
//! Knows volumes by slot only (`slot::Slot`, the volume's number on the node connection) and
//! their names for logs; uses only `sys` (the record's atomic write) and `config` (durations in
//! logs) of vaultfs, and is handed its gauge. `fuse` counts and fences requests through it; the
//! wiring opens it and marks the clean exit.

mod ledger;
mod table;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use ledger::{millis, now_ms, read_ledger, write_ledger, Death, Sentence};
use table::{predecessor_generation, read_predecessor, Predecessor, Table};

/// Buckets of the in-flight table: a volume's requests count in bucket `slot % BUCKETS`. Slots
/// are never given out twice, so two volumes share a bucket only when both live while 65,536
/// other volumes were published between them; they are then suspected together.
pub const BUCKETS: usize = 65_536;

/// The longest back-off, unless the first one (`--quarantine-backoff`) is longer.
pub const LONGEST_BACKOFF: Duration = Duration::from_secs(30 * 60);

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SECOND: Duration = Duration::from_secs(1);

    pub(super) fn config(backoff: Duration) -> QuarantineConfig {
        QuarantineConfig {
            backoff,
            wait: Duration::from_millis(200),
        }
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
