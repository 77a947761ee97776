//! The cache's entries: one per Vault path, in an LRU bounded by entries and bytes. Owns an
//! entry's state, storing a value into it (the swap), eviction and the byte accounting that
//! counts every version alive, cached or pinned by an open file.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use lru::LruCache;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::leases::HeldLease;
use super::{Content, SecretCache};
use crate::source::{Fetched, SecretSource, SourceError};
use crate::spec::SecretPath;

/// Bytes charged to a cache's `held` count until dropped.
#[derive(Debug)]
pub(super) struct Charge {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Charge {
    fn new(held: &Arc<AtomicUsize>, bytes: usize) -> Self {
        held.fetch_add(bytes, Ordering::AcqRel);
        Self {
            held: held.clone(),
            bytes,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub(super) struct EntryState {
    pub(super) current: Option<Arc<Content>>,
    /// Last successful answer from Vault for this path.
    pub(super) checked_at: Option<Instant>,
    /// Last failed attempt and its error.
    pub(super) failure: Option<(Instant, SourceError)>,
    /// Consecutive transient failures (for the back-off).
    pub(super) failures: u32,
    /// `SecretSource::server_recoveries` when the failed attempt started: once it changes,
    /// the server came back since, and neither the back-off nor stale-at-once applies.
    pub(super) failed_before_recovery: u64,
    /// The lease of the current value (dynamic secrets).
    pub(super) lease: Option<HeldLease>,
    /// A certificate's: when a reader last got a value of this path (one nobody read for a
    /// whole lifetime is not renewed).
    pub(super) read_at: Option<Instant>,
    pub(super) weight: usize,
}

#[derive(Default)]
pub(super) struct Entry {
    pub(super) state: Mutex<EntryState>,
    /// Held while one task asks Vault about this path (single flight).
    pub(super) refresh: tokio::sync::Mutex<()>,
    /// A background refresh (during an outage) is running.
    pub(super) refreshing: AtomicBool,
}

pub(super) struct Entries {
    pub(super) lru: LruCache<SecretPath, Arc<Entry>>,
    pub(super) bytes: usize,
}

impl<S: SecretSource> SecretCache<S> {
    pub(super) fn entry(&self, path: &SecretPath) -> Arc<Entry> {
        let mut entries = self.entries.lock();
        if let Some(entry) = entries.lru.get(path) {
            return entry.clone();
        }
        let entry = Arc::new(Entry::default());
        entries.lru.push(path.clone(), entry.clone());
        while entries.lru.len() > self.max_entries() {
            if !self.evict_lru(&mut entries) {
                break;
            }
        }
        entry
    }

    /// Whether the least recently used value is also held by an open file (evicting it would
    /// free nothing and revoke a lease still in use).
    fn lru_is_pinned(entries: &Entries) -> bool {
        entries.lru.peek_lru().is_some_and(|(_, entry)| {
            entry
                .state
                .lock()
                .current
                .as_ref()
                .is_some_and(|c| Arc::strong_count(c) > 1)
        })
    }

    /// Drops the least recently used secret (called with `entries` locked): its bytes leave the
    /// count, its value goes (zeroized once no handle holds it), its lease is revoked.
    fn evict_lru(&self, entries: &mut Entries) -> bool {
        let Some((_, evicted)) = entries.lru.pop_lru() else {
            return false;
        };
        let mut state = evicted.state.lock();
        entries.bytes = entries.bytes.saturating_sub(state.weight);
        state.weight = 0;
        state.current = None;
        state.checked_at = None;
        self.orphan(state.lease.take());
        true
    }

    pub(super) fn store(
        &self,
        path: &SecretPath,
        entry: &Arc<Entry>,
        fetched: Fetched,
    ) -> Arc<Content> {
        let lease = fetched.lease.clone().map(HeldLease::new);
        self.store_with(path, entry, fetched, lease, SystemTime::now())
    }

    /// Stores `fetched` as the current value of `path`, held under `lease`, first seen at
    /// `changed_at`.
    pub(super) fn store_with(
        &self,
        path: &SecretPath,
        entry: &Arc<Entry>,
        fetched: Fetched,
        lease: Option<HeldLease>,
        changed_at: SystemTime,
    ) -> Arc<Content> {
        let weight = fetched.data.weight();
        // A leased value stored, or one replaced: the successor's record changes.
        let mut leases_changed = lease.is_some();
        if lease.is_some() {
            self.leased.lock().insert(path.clone());
        }
        let content = Arc::new(Content {
            _charge: Charge::new(&self.held, weight),
            fetched,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            changed_at,
        });
        let replaced = {
            // Lock order everywhere: `entries`, then an entry's `state`.
            let mut entries = self.entries.lock();
            let (replaced, old_weight) = {
                let mut state = entry.state.lock();
                let replaced = state.current.replace(content.clone()).is_some();
                state.checked_at = Some(Instant::now());
                state.failure = None;
                state.failures = 0;
                leases_changed |= std::mem::replace(&mut state.lease, lease).is_some();
                (replaced, std::mem::replace(&mut state.weight, weight))
            };
            let cached = entries
                .lru
                .peek(path)
                .is_some_and(|s| Arc::ptr_eq(s, entry));
            if cached {
                entries.bytes = (entries.bytes + weight).saturating_sub(old_weight);
                // Versions pinned by open files count too: past the bound, cached values go,
                // least recently used first. Evicting a value an open file still holds frees
                // nothing, so that stops the eviction unless the cached bytes alone are over.
                while entries.lru.len() > 1 {
                    let cached_over = entries.bytes > self.max_bytes();
                    let held = self.held_bytes();
                    if !cached_over && held <= self.max_bytes() {
                        break;
                    }
                    if !cached_over && Self::lru_is_pinned(&entries) {
                        break;
                    }
                    if !self.evict_lru(&mut entries) {
                        break;
                    }
                }
            } else {
                entry.state.lock().weight = 0;
            }
            replaced
        };
        if leases_changed {
            self.leases_changed();
        }
        if replaced {
            self.metrics.cache_swaps.inc();
            tracing::info!(path = %path, generation = content.generation, "secret changed in Vault, new version swapped in");
            self.notify(path);
        }
        content
    }

    pub(super) fn forget_weight(&self, path: &SecretPath, entry: &Arc<Entry>) {
        let mut entries = self.entries.lock();
        let weight = std::mem::take(&mut entry.state.lock().weight);
        if entries
            .lru
            .peek(path)
            .is_some_and(|s| Arc::ptr_eq(s, entry))
        {
            entries.bytes = entries.bytes.saturating_sub(weight);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use super::super::tests::{cache, path};
    use super::super::CacheConfig;
    use super::*;
    use crate::source::mock::MockSource;

    #[tokio::test(start_paused = true)]
    async fn entry_bound_evicts_the_least_recently_used_secret() {
        let source = Arc::new(MockSource::new());
        for p in ["s/a", "s/b", "s/c"] {
            source.put(p, &[("k", "v")]);
        }
        let config = CacheConfig {
            max_entries: NonZeroUsize::new(2).unwrap(),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        for p in ["s/a", "s/b", "s/a", "s/c"] {
            cache.get(&path(p)).await.unwrap();
        }
        assert_eq!(cache.usage().0, 2);
        cache.get(&path("s/a")).await.unwrap();
        assert_eq!(source.reads(), 3, "s/a stayed cached");
        cache.get(&path("s/b")).await.unwrap();
        assert_eq!(source.reads(), 4, "s/b was evicted");
    }

    #[tokio::test(start_paused = true)]
    async fn versions_pinned_by_open_files_count_against_the_byte_bound() {
        let source = Arc::new(MockSource::new());
        let forty = "x".repeat(40);
        source.put("secret/a", &[("v", &forty)]);
        source.put("secret/b", &[("v", &forty)]);
        let config = CacheConfig {
            ttl: Duration::from_secs(1),
            max_bytes: 100,
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        let pinned = cache.get(&path("secret/a")).await.unwrap();
        let one = cache.held_bytes();
        assert!(one >= 40, "{one} bytes held");
        source.put("secret/a", &[("v", &"y".repeat(40))]);
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.get(&path("secret/a")).await.unwrap();
        assert_eq!(
            cache.held_bytes(),
            2 * one,
            "the open old version still counts"
        );
        cache.get(&path("secret/b")).await.unwrap();
        assert_eq!(
            cache.usage().0,
            1,
            "a third version past the bound evicts the least recently used cached value"
        );
        assert_eq!(cache.held_bytes(), 2 * one);
        drop(pinned);
        assert_eq!(cache.held_bytes(), one, "closing frees the old version");
    }

    #[tokio::test(start_paused = true)]
    async fn byte_bound_evicts_least_recently_used_secrets() {
        let source = Arc::new(MockSource::new());
        let big = "x".repeat(200);
        for p in ["s/a", "s/b", "s/c"] {
            source.put(p, &[("k", &big)]);
        }
        let config = CacheConfig {
            max_bytes: 1000,
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        for p in ["s/a", "s/b", "s/c"] {
            cache.get(&path(p)).await.unwrap();
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= 1000, "{bytes}");
        assert_eq!(entries, 2);
        cache.get(&path("s/a")).await.unwrap();
        assert_eq!(source.reads(), 4, "s/a was evicted and read again");
        cache.clear();
        assert_eq!(cache.usage(), (0, 0));
    }
}
