//! Asking Vault about one path: single flight per entry, a version check before a read,
//! a bounded wait, the back-off after failures and stale-if-error. What is fresh, what may be
//! served stale and for how long are decided here; storing the answer is the entries' job.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::entries::{Entry, EntryState};
use super::leases::HeldLease;
use super::{Content, SecretCache};
use crate::source::{Fetched, SecretSource, SourceError};
use crate::spec::SecretPath;

enum Outcome {
    Unchanged,
    Changed(Fetched),
}

impl<S: SecretSource> SecretCache<S> {
    /// Asks Vault about `path` unless another task just did (single flight) or a recent
    /// failure says to wait (back-off), and records the outcome.
    pub(super) async fn refresh(
        &self,
        path: &SecretPath,
        entry: &Arc<Entry>,
    ) -> Result<Arc<Content>, SourceError> {
        let started = Instant::now();
        let recoveries = self.source.server_recoveries();
        let _flight = entry.refresh.lock().await;
        if self.closing.load(Ordering::Acquire) {
            return Err(SourceError::Closed);
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
    pub(super) fn stale_during_outage(&self, entry: &Entry) -> Option<Arc<Content>> {
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

    pub(super) fn fresh(&self, entry: &Entry) -> Option<Arc<Content>> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use parking_lot::Mutex;

    use super::super::tests::{cache, hooked_cache, path, value};
    use super::super::CacheConfig;
    use super::*;
    use crate::source::mock::MockSource;

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
}
