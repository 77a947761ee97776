//! The quarantine's ledger, `<state-dir>/quarantine.json` (a serde record): the last unclean
//! death with the buckets it had requests in flight in, the buckets quarantined with their
//! back-off, and the judgment of a new death against them. Pure but for reading and writing
//! the record.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::QuarantineConfig;

/// What `quarantine.json` holds. Times are wall-clock milliseconds since the Unix epoch (they
/// must outlive the process); a remaining time is never taken as longer than its back-off, so
/// a clock step cannot lengthen a quarantine.
#[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
pub(super) struct Ledger {
    /// The generation of the last daemon that started: its table's header carries the same.
    pub(super) generation: u64,
    /// The last daemon that died without a clean exit.
    pub(super) last_death: Option<Death>,
    /// Buckets quarantined now or recently, by bucket. A record is kept for the longest
    /// back-off after its quarantine ended: a repeat within that time doubles the back-off.
    pub(super) quarantined: BTreeMap<u32, Sentence>,
}

/// A daemon that died without a clean exit, and the buckets it had requests in flight in.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub(super) struct Death {
    pub(super) generation: u64,
    pub(super) at_ms: u64,
    pub(super) buckets: Vec<u32>,
}

/// A bucket's quarantine: until when, and the back-off it was given.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Copy)]
pub(super) struct Sentence {
    pub(super) until_ms: u64,
    pub(super) backoff_ms: u64,
}

impl Ledger {
    /// Judges `death` (the predecessor's, if it died uncleanly) at `now_ms`: a bucket in flight
    /// at this death and the one before it, by consecutive daemons, is quarantined for the
    /// first back-off; one quarantined within the memory of its record, for twice its last.
    /// Returns the buckets quarantined now.
    pub(super) fn judge(
        &mut self,
        death: Option<Death>,
        now_ms: u64,
        config: &QuarantineConfig,
    ) -> Vec<u32> {
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

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// The ledger at `path`; an unreadable one is logged and taken as empty (nothing quarantined).
pub(super) fn read_ledger(path: &Path) -> Ledger {
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
pub(super) fn write_ledger(path: &Path, ledger: &Ledger) -> io::Result<()> {
    let bytes = serde_json::to_vec(ledger).map_err(io::Error::other)?;
    crate::sys::write_private(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, SECOND};
    use super::super::LONGEST_BACKOFF;
    use super::*;

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
}
