//! The secret cache: bounded (entries and bytes) LRU of secrets by Vault path, with a TTL,
//! single flight per path, version-checked refresh, atomic swap, stale-if-error and a bounded
//! wait on Vault. Owns the entries, get/refresh/store, eviction and byte accounting; the lease
//! keeper lives in `leases`. Knows nothing of FUSE; talks to Vault only through `SecretSource`.

mod leases;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lru::LruCache;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::source::{Fetched, Lease, LeaseSink, SecretSource, SourceError};

use crate::spec::SecretPath;
use leases::HeldLease;

/// Cache behaviour.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// How long a fetched secret is served without asking Vault again.
    pub ttl: Duration,
    /// How long past its last successful check a secret may be served while Vault is
    /// unavailable (stale-if-error).
    pub max_stale: Duration,
    /// The longest an access waits for Vault before failing (or serving stale data).
    pub vault_timeout: Duration,
    /// After Vault was unavailable, how long to answer from the last outcome before trying
    /// again, so that a Vault outage does not make every access wait `vault_timeout`. Doubles
    /// with each consecutive failure, up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    /// Most secrets held at once.
    pub max_entries: NonZeroUsize,
    /// Most secret bytes held at once (least recently used entries are evicted first).
    pub max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_stale: Duration::from_secs(300),
            vault_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(10),
            max_entries: NonZeroUsize::new(1024).expect("non-zero"),
            max_bytes: 16 << 20,
        }
    }
}

/// One version of a secret as served to readers. Shared by open handles; the bytes are zeroized
/// when the last holder drops it.
#[derive(Debug)]
pub struct Content {
    pub fetched: Fetched,
    /// Increases every time this cache swaps in changed content for any path.
    pub generation: u64,
    /// When this content was first seen (the files' mtime).
    pub changed_at: SystemTime,
    /// Counts this version's bytes against the cache's bound for as long as anyone (the cache
    /// or an open file) holds it.
    _charge: Charge,
}

impl AsRef<crate::secret::SecretData> for Content {
    fn as_ref(&self) -> &crate::secret::SecretData {
        &self.fetched.data
    }
}

/// Bytes charged to a cache's `held` count until dropped.
#[derive(Debug)]
struct Charge {
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
struct EntryState {
    current: Option<Arc<Content>>,
    /// Last successful answer from Vault for this path.
    checked_at: Option<Instant>,
    /// Last failed attempt and its error.
    failure: Option<(Instant, SourceError)>,
    /// Consecutive transient failures (for the back-off).
    failures: u32,
    /// `SecretSource::server_recoveries` when the failed attempt started: once it changes,
    /// the server came back since, and neither the back-off nor stale-at-once applies.
    failed_before_recovery: u64,
    /// The lease of the current value (dynamic secrets).
    lease: Option<HeldLease>,
    weight: usize,
}

#[derive(Default)]
struct Entry {
    state: Mutex<EntryState>,
    /// Held while one task asks Vault about this path (single flight).
    refresh: tokio::sync::Mutex<()>,
    /// A background refresh (during an outage) is running.
    refreshing: AtomicBool,
}

struct Entries {
    lru: LruCache<SecretPath, Arc<Entry>>,
    bytes: usize,
}

/// Called with the path of a secret whose content changed or disappeared.
pub type SwapHook = Box<dyn Fn(&SecretPath) + Send + Sync>;

enum Outcome {
    Unchanged,
    Changed(Fetched),
}

pub struct SecretCache<S> {
    source: Arc<S>,
    config: CacheConfig,
    entries: Mutex<Entries>,
    /// Bytes of every version alive: cached ones and older ones pinned by open files.
    held: Arc<AtomicUsize>,
    generation: AtomicU64,
    on_swap: Option<SwapHook>,
    metrics: Arc<Metrics>,
    keeper_running: AtomicBool,
    /// Wakes the lease keeper when a new lease is stored or one must be revoked.
    lease_added: Arc<tokio::sync::Notify>,
    /// Leases of values the cache no longer holds, waiting to be revoked.
    orphaned_leases: Mutex<Vec<Lease>>,
    /// Set once leases are being revoked (unmount): nothing new is stored.
    closing: AtomicBool,
    /// Told the leased values whenever they or their leases change (`on_leases_change`).
    lease_sink: Mutex<Option<LeaseSink>>,
}

impl<S: SecretSource> SecretCache<S> {
    pub fn new(source: Arc<S>, config: CacheConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            source,
            entries: Mutex::new(Entries {
                // Unbounded map, bounded by hand in `entry`: a bounded LruCache reserves room for
                // every entry up front, which an idle volume should not pay for.
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            config,
            held: Arc::default(),
            generation: AtomicU64::new(0),
            on_swap: None,
            metrics,
            keeper_running: AtomicBool::new(false),
            lease_added: Arc::default(),
            orphaned_leases: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            lease_sink: Mutex::new(None),
        }
    }

    /// The cache, telling `hook` about every swapped or vanished secret (kernel cache
    /// invalidation). Wired once, before the cache is shared.
    pub fn with_swap_hook(mut self, hook: SwapHook) -> Self {
        self.on_swap = Some(hook);
        self
    }

    /// The current content of `path`: from memory while fresh, otherwise after asking Vault
    /// (one request per path at a time, bounded by `vault_timeout`). While Vault is known to
    /// be failing, a cached value within `max_stale` is answered at once and Vault is asked
    /// again in the background, at most once per back-off.
    pub async fn get(self: &Arc<Self>, path: &SecretPath) -> Result<Arc<Content>, SourceError> {
        let entry = self.entry(path);
        if let Some(content) = self.fresh(&entry) {
            self.metrics.cache_hits.inc();
            return Ok(content);
        }
        if let Some(stale) = self.stale_during_outage(&entry) {
            self.metrics.cache_stale_serves.inc();
            if !entry.refreshing.swap(true, Ordering::AcqRel) {
                let (this, path, entry) = (self.clone(), path.clone(), entry.clone());
                tokio::spawn(async move {
                    let _ = this.refresh(&path, &entry).await;
                    entry.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(stale);
        }
        let result = self.refresh(path, &entry).await;
        if entry.state.lock().lease.is_some() {
            self.ensure_lease_keeper();
            // A new lease may be due before the keeper's next wake-up.
            self.lease_added.notify_one();
        }
        result
    }

    /// Asks Vault about `path` unless another task just did (single flight) or a recent
    /// failure says to wait (back-off), and records the outcome.
    async fn refresh(
        &self,
        path: &SecretPath,
        entry: &Arc<Entry>,
    ) -> Result<Arc<Content>, SourceError> {
        let started = Instant::now();
        let recoveries = self.source.server_recoveries();
        let _flight = entry.refresh.lock().await;
        if self.closing.load(Ordering::Acquire) {
            return Err(SourceError::LoginRefused(
                "the volume is being unmounted".into(),
            ));
        }
        if let Some(content) = self.fresh(entry) {
            self.metrics.cache_hits.inc();
            return Ok(content);
        }
        let current = {
            let state = entry.state.lock();
            if let Some((at, err)) = &state.failure {
                let held = *at >= started || at.elapsed() < self.hold(err, state.failures);
                if held && !self.recovered_since_failure(&state) {
                    let err = err.clone();
                    drop(state);
                    return self.stale_or(entry, err);
                }
            }
            state.current.clone()
        };
        self.metrics.cache_misses.inc();
        let outcome = match tokio::time::timeout(
            self.config.vault_timeout,
            self.ask_vault(path, current.as_deref()),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(SourceError::Unavailable(format!(
                "no answer within {:?}",
                self.config.vault_timeout
            ))),
        };
        match outcome {
            Ok(Outcome::Unchanged) => {
                let mut state = entry.state.lock();
                state.checked_at = Some(Instant::now());
                state.failure = None;
                state.failures = 0;
                // The entry may have been evicted or cleared meanwhile: answer with the value
                // that was checked.
                Ok(state
                    .current
                    .clone()
                    .or(current)
                    .expect("an unchanged outcome is only reached with a current value"))
            }
            Ok(Outcome::Changed(fetched)) => Ok(self.store(path, entry, fetched)),
            Err(err) => {
                tracing::debug!(path = %path, error = %err, "vault request failed");
                let vanished = {
                    let mut state = entry.state.lock();
                    state.failure = Some((Instant::now(), err.clone()));
                    state.failed_before_recovery = recoveries;
                    state.failures = if err.is_transient() {
                        state.failures.saturating_add(1)
                    } else {
                        0
                    };
                    let vanished = !err.is_transient() && state.current.take().is_some();
                    if vanished {
                        self.orphan(state.lease.take());
                    }
                    vanished
                };
                if vanished {
                    self.forget_weight(path, entry);
                    self.notify(path);
                }
                self.stale_or(entry, err)
            }
        }
    }

    /// How long a failure is answered from memory before Vault is asked again: the TTL for
    /// definite answers (not found, denied), a doubling back-off for outages.
    fn hold(&self, err: &SourceError, failures: u32) -> Duration {
        if err.is_transient() {
            self.backoff(failures)
        } else {
            self.config.ttl
        }
    }

    /// The wait after `failures` consecutive failures: `retry_backoff`, doubling each time, up
    /// to `max_retry_backoff`.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (self.config.retry_backoff * 2u32.pow(doublings)).min(self.config.max_retry_backoff)
    }

    /// A cached value to answer with at once because Vault's last answer for this path was an
    /// outage and the value is within `max_stale`.
    fn stale_during_outage(&self, entry: &Entry) -> Option<Arc<Content>> {
        let state = entry.state.lock();
        let (_, err) = state.failure.as_ref()?;
        if err.is_transient()
            && self.servable_stale(&state)
            && !self.recovered_since_failure(&state)
        {
            state.current.clone()
        } else {
            None
        }
    }

    /// Whether the server came back after the last failed attempt on this entry started (the
    /// source says so): Vault is worth asking now, whatever the back-off says.
    fn recovered_since_failure(&self, state: &EntryState) -> bool {
        state
            .failure
            .as_ref()
            .is_some_and(|(_, err)| err.is_transient())
            && self.source.server_recoveries() != state.failed_before_recovery
    }

    /// Drops every cached secret (unmount). Content still held by open handles is zeroized
    /// when they close.
    pub fn clear(&self) {
        let mut entries = self.entries.lock();
        for (_, entry) in entries.lru.iter() {
            let mut state = entry.state.lock();
            state.current = None;
            self.orphan(state.lease.take());
        }
        entries.lru.clear();
        entries.bytes = 0;
    }

    /// How much longer `content` (an answer of `get` for `path`) may be served without asking
    /// Vault again: the rest of the TTL, never beyond its lease's end; while Vault is failing
    /// and a stale value is served, at most the retry back-off and never beyond `max_stale`.
    /// Zero once `content` is no longer the cached value (a newer version was swapped in).
    pub fn remaining(&self, path: &SecretPath, content: &Arc<Content>) -> Duration {
        let Some(entry) = self.entries.lock().lru.peek(path).cloned() else {
            return Duration::ZERO;
        };
        let state = entry.state.lock();
        let current = state
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, content));
        let Some(checked) = state.checked_at.filter(|_| current) else {
            return Duration::ZERO;
        };
        let since = checked.elapsed();
        if let Some((_, err)) = &state.failure {
            if err.is_transient() {
                let stale_left = self.config.max_stale.saturating_sub(since);
                let lease_left = state.lease.as_ref().map_or(Duration::MAX, HeldLease::left);
                return self.config.retry_backoff.min(stale_left).min(lease_left);
            }
        }
        match &state.lease {
            Some(held) => self.config.ttl.min(held.left()),
            None => self.config.ttl.saturating_sub(since),
        }
    }

    /// How long the value cached for `path` may still be served without asking Vault
    /// (`remaining` of the current value); `None` when no value is cached. Touches neither the
    /// LRU order nor the hit counters: for a watch that only wants to know what is due.
    pub fn due_in(&self, path: &SecretPath) -> Option<Duration> {
        let current = {
            let entries = self.entries.lock();
            let entry = entries.lru.peek(path)?;
            let current = entry.state.lock().current.clone();
            current
        }?;
        Some(self.remaining(path, &current))
    }

    /// Bytes of every version alive: cached, and older versions still open.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Number of secrets and bytes currently cached.
    pub fn usage(&self) -> (usize, usize) {
        let entries = self.entries.lock();
        (entries.lru.len(), entries.bytes)
    }

    fn entry(&self, path: &SecretPath) -> Arc<Entry> {
        let mut entries = self.entries.lock();
        if let Some(entry) = entries.lru.get(path) {
            return entry.clone();
        }
        let entry = Arc::new(Entry::default());
        entries.lru.push(path.clone(), entry.clone());
        while entries.lru.len() > self.config.max_entries.get() {
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

    fn fresh(&self, entry: &Entry) -> Option<Arc<Content>> {
        let state = entry.state.lock();
        let checked = state.checked_at?;
        // A leased value stays fresh while its lease lives: the lease keeper renews it (a
        // re-read would issue new credentials) and rotates it when it can no longer be renewed.
        let fresh = match &state.lease {
            Some(held) => held.alive(),
            None => checked.elapsed() < self.config.ttl,
        };
        if fresh {
            state.current.clone()
        } else {
            None
        }
    }

    /// Whether the current value may still be served stale: within `max_stale` of its last
    /// check and, for a leased value, before its lease ends.
    fn servable_stale(&self, state: &EntryState) -> bool {
        let within_stale = state
            .checked_at
            .is_some_and(|c| c.elapsed() <= self.config.max_stale);
        let lease_alive = state.lease.as_ref().is_none_or(HeldLease::alive);
        within_stale && lease_alive
    }

    fn stale_or(&self, entry: &Entry, err: SourceError) -> Result<Arc<Content>, SourceError> {
        if err.is_transient() {
            let state = entry.state.lock();
            if let Some(content) = state
                .current
                .as_ref()
                .filter(|_| self.servable_stale(&state))
            {
                self.metrics.cache_stale_serves.inc();
                return Ok(content.clone());
            }
        }
        Err(err)
    }

    async fn ask_vault(
        &self,
        path: &SecretPath,
        current: Option<&Content>,
    ) -> Result<Outcome, SourceError> {
        if let Some(known) = current.and_then(|c| c.fetched.version) {
            match self.source.current_version(path).await {
                Ok(Some(latest)) if latest == known => return Ok(Outcome::Unchanged),
                // Changed, no cheap check, or the metadata is not readable: read it all.
                Ok(_) | Err(SourceError::PermissionDenied) => {}
                Err(err) => return Err(err),
            }
        }
        let fetched = self.source.read(path).await?;
        match current {
            // A read that brought a lease is always new: keeping the old lease would leave the
            // new credential unmanaged.
            Some(c)
                if fetched.lease.is_none()
                    && c.fetched.version == fetched.version
                    && c.fetched.data == fetched.data =>
            {
                Ok(Outcome::Unchanged)
            }
            _ => Ok(Outcome::Changed(fetched)),
        }
    }

    fn store(&self, path: &SecretPath, entry: &Arc<Entry>, fetched: Fetched) -> Arc<Content> {
        let lease = fetched.lease.clone().map(HeldLease::new);
        self.store_with(path, entry, fetched, lease, SystemTime::now())
    }

    /// Stores `fetched` as the current value of `path`, held under `lease`, first seen at
    /// `changed_at`.
    fn store_with(
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
                    let cached_over = entries.bytes > self.config.max_bytes;
                    let held = self.held_bytes();
                    if !cached_over && held <= self.config.max_bytes {
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

    fn forget_weight(&self, path: &SecretPath, entry: &Arc<Entry>) {
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

    fn notify(&self, path: &SecretPath) {
        if let Some(hook) = &self.on_swap {
            hook(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mock::MockSource;

    pub(super) fn path(p: &str) -> SecretPath {
        SecretPath::parse(p).unwrap()
    }

    pub(super) fn cache(
        source: &Arc<MockSource>,
        config: CacheConfig,
    ) -> Arc<SecretCache<MockSource>> {
        Arc::new(SecretCache::new(
            source.clone(),
            config,
            Arc::new(Metrics::new()),
        ))
    }

    pub(super) fn hooked_cache(
        source: &Arc<MockSource>,
        config: CacheConfig,
        hook: SwapHook,
    ) -> Arc<SecretCache<MockSource>> {
        Arc::new(
            SecretCache::new(source.clone(), config, Arc::new(Metrics::new())).with_swap_hook(hook),
        )
    }

    pub(super) fn value(c: &Content, key: &str) -> String {
        String::from_utf8(c.fetched.data.render(Some(key)).unwrap().expose().to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn due_in_tells_the_freshness_left_without_counting_a_hit() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let p = path("secret/a");
        assert_eq!(cache.due_in(&p), None, "nothing cached yet");
        cache.get(&p).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let hits = cache.metrics.cache_hits.get();
        assert_eq!(cache.due_in(&p), Some(Duration::from_secs(20)));
        assert_eq!(cache.metrics.cache_hits.get(), hits);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(cache.due_in(&p), Some(Duration::ZERO), "due now");
        assert_eq!(source.reads(), 1, "due_in never asks Vault");
    }

    #[tokio::test(start_paused = true)]
    async fn second_read_within_ttl_does_not_call_vault() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let p = path("secret/a");
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
        assert_eq!((source.reads(), source.version_checks()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_readers_share_one_vault_read() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        source.set_latency(Duration::from_millis(50));
        let cache = cache(&source, CacheConfig::default());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(
                    async move { cache.get(&path("secret/a")).await.map(|c| c.generation) },
                )
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(1));
        }
        assert_eq!(source.reads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entry_with_same_version_costs_one_version_check_and_no_read() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let p = path("secret/a");
        let first = cache.get(&p).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        let second = cache.get(&p).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((source.reads(), source.version_checks()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_after_ttl_swaps_content_and_calls_the_hook() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let swapped = Arc::new(Mutex::new(Vec::new()));
        let seen = swapped.clone();
        let cache = hooked_cache(
            &source,
            CacheConfig::default(),
            Box::new(move |p| seen.lock().push(p.clone())),
        );
        let p = path("secret/a");
        let old = cache.get(&p).await.unwrap();
        source.put("secret/a", &[("k", "v2-longer")]);
        assert_eq!(
            value(&cache.get(&p).await.unwrap(), "k"),
            "v1",
            "within TTL"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        let new = cache.get(&p).await.unwrap();
        assert_eq!(value(&new, "k"), "v2-longer");
        assert_eq!(value(&old, "k"), "v1", "holders of the old version keep it");
        assert!(new.generation > old.generation);
        assert_eq!(*swapped.lock(), vec![p]);
    }

    #[tokio::test(start_paused = true)]
    async fn unversioned_secrets_are_compared_by_content() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("kv1/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let p = path("kv1/a");
        let first = cache.get(&p).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(Arc::ptr_eq(&first, &cache.get(&p).await.unwrap()));
        source.put_unversioned("kv1/a", &[("k", "v2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v2");
        assert_eq!(source.reads(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn vault_down_serves_stale_until_max_stale_then_fails() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let config = CacheConfig {
            ttl: Duration::from_secs(10),
            max_stale: Duration::from_secs(60),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        let p = path("secret/a");
        cache.get(&p).await.unwrap();
        source.fail(SourceError::Unavailable("down".into()));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(matches!(
            cache.get(&p).await,
            Err(SourceError::Unavailable(_))
        ));
        source.heal();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
    }

    #[tokio::test(start_paused = true)]
    async fn during_an_outage_stale_values_come_at_once_and_vault_is_asked_in_the_background() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let config = CacheConfig {
            ttl: Duration::from_secs(10),
            vault_timeout: Duration::from_secs(5),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        let p = path("secret/a");
        cache.get(&p).await.unwrap();
        source.set_latency(Duration::from_secs(3600)); // Vault hangs
        tokio::time::advance(Duration::from_secs(11)).await;
        let start = Instant::now();
        assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "the first access finds out"
        );
        let checks = source.version_checks();
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(700)).await;
            let start = Instant::now();
            assert_eq!(value(&cache.get(&p).await.unwrap(), "k"), "v1");
            assert_eq!(start.elapsed(), Duration::ZERO, "later accesses never wait");
        }
        let asked = source.version_checks() - checks;
        assert!(
            (1..=4).contains(&asked),
            "{asked} background checks in 14 s of outage"
        );
        // Vault recovers: the new version arrives within the back-off cap.
        source.set_latency(Duration::ZERO);
        source.put("secret/a", &[("k", "v2")]);
        let healed = Instant::now();
        while value(&cache.get(&p).await.unwrap(), "k") != "v2" {
            assert!(
                healed.elapsed() < Duration::from_secs(16),
                "never recovered"
            );
            tokio::time::advance(Duration::from_millis(500)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn uncached_read_fails_within_the_vault_timeout_and_backs_off() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        source.set_latency(Duration::from_secs(3600));
        let config = CacheConfig {
            vault_timeout: Duration::from_secs(2),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        let p = path("secret/a");
        let start = Instant::now();
        assert!(matches!(
            cache.get(&p).await,
            Err(SourceError::Unavailable(_))
        ));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Within the back-off the failure is answered at once, without asking Vault.
        assert!(matches!(
            cache.get(&p).await,
            Err(SourceError::Unavailable(_))
        ));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(source.reads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_server_known_down_reads_answer_at_once_and_recover_as_soon_as_it_is_back() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        source.put("secret/b", &[("k", "b1")]);
        let config = CacheConfig {
            ttl: Duration::from_secs(10),
            vault_timeout: Duration::from_secs(5),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        let (a, b) = (path("secret/a"), path("secret/b"));
        cache.get(&a).await.unwrap();
        // Another volume on the same server found it down.
        source.set_server_down();
        tokio::time::advance(Duration::from_secs(11)).await;
        let start = Instant::now();
        assert_eq!(value(&cache.get(&a).await.unwrap(), "k"), "v1", "stale");
        assert!(matches!(
            cache.get(&b).await,
            Err(SourceError::Unavailable(_))
        ));
        assert_eq!(start.elapsed(), Duration::ZERO, "nobody waits");
        // A long outage: the back-off grows to its 10 s cap.
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let _ = cache.get(&a).await;
            let _ = cache.get(&b).await;
        }
        assert_eq!(cache.backoff(5), Duration::from_secs(10));
        source.put("secret/a", &[("k", "v2")]);
        let asked = (source.reads(), source.version_checks());
        source.set_server_up();
        // Back: the next reads ask Vault at once, neither the back-off nor a stale answer.
        assert_eq!(value(&cache.get(&a).await.unwrap(), "k"), "v2");
        assert_eq!(value(&cache.get(&b).await.unwrap(), "k"), "b1");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(source.reads() - asked.0, 2, "a and b read again");
        assert_eq!(source.version_checks() - asked.1, 1, "a checked");
        // A failure after the recovery backs off as before (once the background refreshes
        // started during the outage have run).
        tokio::time::advance(Duration::from_millis(1)).await;
        source.fail(SourceError::Unavailable("HTTP 503".into()));
        tokio::time::advance(Duration::from_secs(11)).await;
        let reads = source.reads() + source.version_checks();
        assert_eq!(value(&cache.get(&a).await.unwrap(), "k"), "v2");
        assert_eq!(value(&cache.get(&a).await.unwrap(), "k"), "v2");
        tokio::task::yield_now().await;
        assert_eq!(source.reads() + source.version_checks(), reads + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_doubles_with_consecutive_outages_and_resets_on_success() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        source.fail(SourceError::Unavailable("down".into()));
        let cache = cache(&source, CacheConfig::default());
        let p = path("secret/a");
        let mut attempts = Vec::new();
        for _ in 0..40 {
            let before = source.reads();
            let _ = cache.get(&p).await;
            if source.reads() > before {
                attempts.push(Instant::now());
            }
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        let gaps: Vec<u64> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(gaps[..4], [1, 2, 4, 8], "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= 10), "capped at 10 s: {gaps:?}");
        source.heal();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(cache.get(&p).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_freshness_is_the_ttl_left_capped_by_lease_and_outage_and_zero_once_replaced()
    {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let config = CacheConfig {
            ttl: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config.clone());
        let p = path("secret/a");
        let first = cache.get(&p).await.unwrap();
        assert_eq!(cache.remaining(&p, &first), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(cache.remaining(&p, &first), Duration::from_secs(6));

        // Vault fails after the TTL: the stale value is served for at most the back-off.
        tokio::time::advance(Duration::from_secs(7)).await;
        source.set_server_down();
        let stale = cache.get(&p).await.unwrap();
        assert!(Arc::ptr_eq(&first, &stale), "the stale value is served");
        tokio::task::yield_now().await;
        let left = cache.remaining(&p, &stale);
        assert!(
            left <= config.retry_backoff,
            "{left:?} while Vault is down, back-off {:?}",
            config.retry_backoff
        );
        source.set_server_up();

        // A newer version swapped in: the old content has no freshness left.
        source.put("secret/a", &[("k", "v2")]);
        tokio::time::advance(Duration::from_secs(11)).await;
        let second = cache.get(&p).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(cache.remaining(&p, &first), Duration::ZERO);
        assert!(cache.remaining(&p, &second) > Duration::ZERO);

        // A leased secret is never fresh beyond its lease's end.
        let leased = Arc::new(MockSource::new());
        leased.put_unversioned("database/creds/app", &[("password", "gen-1")]);
        leased.set_lease(Some(Duration::from_secs(3)), Some(Duration::from_secs(3)));
        let cache = self::cache(&leased, config);
        let p = path("database/creds/app");
        let content = cache.get(&p).await.unwrap();
        let left = cache.remaining(&p, &content);
        assert!(
            left <= Duration::from_secs(3),
            "{left:?} for a 3 s lease with a 10 s TTL"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deleted_or_forbidden_secret_is_not_served_stale() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let hooked = Arc::new(AtomicU64::new(0));
        let h = hooked.clone();
        let cache = hooked_cache(
            &source,
            CacheConfig::default(),
            Box::new(move |_| {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let p = path("secret/a");
        cache.get(&p).await.unwrap();
        source.delete("secret/a");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(cache.get(&p).await.unwrap_err(), SourceError::NotFound);
        assert_eq!(hooked.load(Ordering::SeqCst), 1);
        assert_eq!(cache.usage().1, 0);
        source.put("secret/b", &[("k", "v")]);
        source.fail(SourceError::PermissionDenied);
        assert_eq!(
            cache.get(&path("secret/b")).await.unwrap_err(),
            SourceError::PermissionDenied
        );
    }

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
