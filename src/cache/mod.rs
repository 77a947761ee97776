//! The secret cache: bounded (entries and bytes) LRU of secrets by Vault path, with a TTL,
//! single flight per path, version-checked refresh, atomic swap, stale-if-error and a bounded
//! wait on Vault. This file owns the cache's configuration, the served `Content` and the
//! public calls (get, remaining freshness, clear, usage); the entries, eviction and byte
//! accounting live in `entries`, asking Vault (single flight, back-off, stale-if-error) in
//! `refresh`, the lease keeper in `leases`. Knows nothing of FUSE; talks to Vault only through
//! `SecretSource`.

mod entries;
mod layer;
mod leases;
mod refresh;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lru::LruCache;
use parking_lot::Mutex;

use crate::config;
use crate::metrics::Metrics;
use crate::source::pacing;
use crate::source::{Fetched, Lease, LeaseSink, SecretSource, SourceError};

use crate::spec::SecretPath;
use entries::{Charge, Entries, Entry};
use layer::Layer;
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

impl CacheConfig {
    /// Settings of a cache serving for `ttl`, with the back-off of `source::pacing` (never
    /// longer than the TTL at first).
    pub fn new(
        ttl: Duration,
        max_stale: Duration,
        vault_timeout: Duration,
        max_entries: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            ttl,
            max_stale,
            vault_timeout,
            retry_backoff: ttl.min(pacing::RETRY_BACKOFF),
            max_retry_backoff: pacing::MAX_RETRY_BACKOFF,
            max_entries: NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
            max_bytes,
        }
    }
}

impl Default for CacheConfig {
    /// `vaultfs mount`'s defaults.
    fn default() -> Self {
        Self::new(
            config::DEFAULT_CACHE_TTL.value,
            config::DEFAULT_MAX_STALE.value,
            config::DEFAULT_VAULT_TIMEOUT.value,
            config::DEFAULT_CACHE_MAX_ENTRIES,
            config::DEFAULT_CACHE_MAX_BYTES,
        )
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

/// Called with the path of a secret whose content changed or disappeared.
pub type SwapHook = Box<dyn Fn(&SecretPath) + Send + Sync>;

pub struct SecretCache<S> {
    source: Arc<S>,
    config: CacheConfig,
    entries: Mutex<Entries>,
    /// Bytes of every version alive: cached ones and older ones pinned by open files.
    held: Arc<AtomicUsize>,
    generation: AtomicU64,
    /// Told about every swapped or vanished secret: one hook per volume that shows this cache
    /// (several when volumes of one identity share it), by subscription number.
    on_swap: parking_lot::RwLock<Vec<(u64, SwapHook)>>,
    next_subscription: AtomicU64,
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
    /// Paths whose values came with a lease (dynamic secrets).
    leased: Mutex<HashSet<SecretPath>>,
    /// Of a shared cache: paths whose leased values some volume shares (`share: true`), so
    /// never handed to one volume.
    shared_leased: Mutex<HashSet<SecretPath>>,
    /// Of a volume's cache over its identity's shared cache (`layered`).
    layer: Option<Layer<S>>,
    /// The entry and byte bounds are `config`'s times this (a shared cache: its volumes).
    scale: AtomicUsize,
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
            on_swap: parking_lot::RwLock::default(),
            next_subscription: AtomicU64::new(0),
            metrics,
            keeper_running: AtomicBool::new(false),
            lease_added: Arc::default(),
            orphaned_leases: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
            lease_sink: Mutex::new(None),
            leased: Mutex::default(),
            shared_leased: Mutex::default(),
            layer: None,
            scale: AtomicUsize::new(1),
        }
    }

    /// The cache, telling `hook` about every swapped or vanished secret (kernel cache
    /// invalidation), for as long as the cache lives.
    pub fn with_swap_hook(self, hook: SwapHook) -> Self {
        self.subscribe(hook);
        self
    }

    /// Tells `hook` about every swapped or vanished secret from now on, until `unsubscribe`
    /// with the number returned: each volume showing this cache subscribes its own kernel
    /// invalidations (and reload signal).
    pub fn subscribe(&self, hook: SwapHook) -> u64 {
        let id = self.next_subscription.fetch_add(1, Ordering::AcqRel);
        self.on_swap.write().push((id, hook));
        id
    }

    /// Stops telling the hook `subscribe` returned `id` for (its volume is gone).
    pub fn unsubscribe(&self, id: u64) {
        self.on_swap.write().retain(|(other, _)| *other != id);
    }

    /// The current content of `path`: from memory while fresh, otherwise after asking Vault
    /// (one request per path at a time, bounded by `vault_timeout`). While Vault is known to
    /// be failing, a cached value within `max_stale` is answered at once and Vault is asked
    /// again in the background, at most once per back-off. A layered cache answers from the
    /// shared cache but for its own leased values (`layer`).
    pub async fn get(self: &Arc<Self>, path: &SecretPath) -> Result<Arc<Content>, SourceError> {
        match self.answered_by_shared(path) {
            Some(shared) => self.get_through(shared, path).await,
            None => self.get_own(path).await,
        }
    }

    async fn get_own(self: &Arc<Self>, path: &SecretPath) -> Result<Arc<Content>, SourceError> {
        let entry = self.entry(path);
        if let Some(content) = self.fresh(&entry) {
            self.metrics.cache_hits.inc();
            self.mark_read(path, &entry);
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
        // A miss yields once before anything else: a caller that polls once to take what is
        // answered from memory (the FUSE thread answers hits itself) then hands the whole
        // exchange to one runtime task, whose worker sends the request itself, instead of
        // starting it on the caller's thread, which wakes one worker for the HTTP connection
        // and another for the rest.
        tokio::task::yield_now().await;
        let result = self.refresh(path, &entry).await;
        if result.is_ok() {
            self.mark_read(path, &entry);
        }
        if entry.state.lock().lease.is_some() {
            self.ensure_lease_keeper();
            // A new lease may be due before the keeper's next wake-up.
            self.lease_added.notify_one();
        }
        result
    }

    /// Notes that a reader got the value of `path`, if it is a certificate's (only their
    /// renewal depends on reads; other paths' hits take no extra lock); a certificate whose
    /// renewal was let go (not read for a lifetime) is renewed again from now on.
    fn mark_read(self: &Arc<Self>, path: &SecretPath, entry: &Entry) {
        if path.certificate_request().is_none() {
            return;
        }
        let mut state = entry.state.lock();
        state.read_at = Some(tokio::time::Instant::now());
        let Some(held) = state
            .lease
            .as_mut()
            .filter(|h| h.next.is_none() && h.alive())
        else {
            return;
        };
        held.next = Some(tokio::time::Instant::now());
        drop(state);
        self.ensure_lease_keeper();
        self.lease_added.notify_one();
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
        if let Some(shared) = self.answered_by_shared(path) {
            return shared.remaining(path, content);
        }
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
        if let Some(shared) = self.answered_by_shared(path) {
            return shared.due_in(path);
        }
        let current = {
            let entries = self.entries.lock();
            let entry = entries.lru.peek(path)?;
            let current = entry.state.lock().current.clone();
            current
        }?;
        Some(self.remaining(path, &current))
    }

    /// Holds `volumes` volumes' worth: the entry and byte bounds become `volumes` times the
    /// configured ones (a shared cache, as its volumes' own caches would together).
    pub fn scale_bounds(&self, volumes: usize) {
        self.scale.store(volumes.max(1), Ordering::Release);
    }

    fn max_entries(&self) -> usize {
        let scale = self.scale.load(Ordering::Acquire);
        self.config.max_entries.get().saturating_mul(scale)
    }

    fn max_bytes(&self) -> usize {
        let scale = self.scale.load(Ordering::Acquire);
        self.config.max_bytes.saturating_mul(scale)
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

    fn notify(&self, path: &SecretPath) {
        for (_, hook) in self.on_swap.read().iter() {
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
    async fn every_subscriber_is_told_a_swap_until_it_unsubscribes() {
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let told = Arc::new(Mutex::new(Vec::new()));
        let subscriber = |name: &'static str| -> SwapHook {
            let told = told.clone();
            Box::new(move |p| told.lock().push((name, p.to_string())))
        };
        let a = cache.subscribe(subscriber("a"));
        let b = cache.subscribe(subscriber("b"));
        assert_ne!(a, b);
        let p = path("secret/a");
        cache.get(&p).await.unwrap();
        source.put("secret/a", &[("k", "v2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        cache.get(&p).await.unwrap();
        assert_eq!(
            *told.lock(),
            vec![("a", "secret/a".to_string()), ("b", "secret/a".to_string())]
        );
        cache.unsubscribe(a);
        told.lock().clear();
        source.put("secret/a", &[("k", "v3")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        cache.get(&p).await.unwrap();
        assert_eq!(*told.lock(), vec![("b", "secret/a".to_string())]);
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

    #[test]
    fn a_hit_is_ready_at_the_first_poll_and_a_miss_asks_vault_only_when_polled_again() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        // Polled once outside the runtime's tasks, as the FUSE thread does.
        fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
            f.poll(&mut Context::from_waker(Waker::noop()))
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a runtime");
        let _in_runtime = runtime.enter();
        let source = Arc::new(MockSource::new());
        source.put("secret/a", &[("k", "v1")]);
        let cache = cache(&source, CacheConfig::default());
        let p = path("secret/a");
        let mut miss = Box::pin(cache.get(&p));
        assert!(poll_once(miss.as_mut()).is_pending());
        assert_eq!(source.reads(), 0, "the first poll of a miss starts nothing");
        let content = runtime.block_on(miss).unwrap();
        assert_eq!((value(&content, "k"), source.reads()), ("v1".into(), 1));
        match poll_once(std::pin::pin!(cache.get(&p))) {
            Poll::Ready(Ok(c)) => assert!(Arc::ptr_eq(&c, &content)),
            _ => panic!("a hit is answered at the first poll"),
        }
        assert_eq!(source.reads(), 1);
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
}
