//! The cache's lease keeper: the leases of dynamic secrets the cache holds, renewed two thirds
//! into their period, rotated to new credentials when Vault will not extend them, retried with a
//! back-off, and revoked when their values leave the cache or the volume goes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Content, Entries, Entry, LeaseSink, SecretCache};
use crate::source::{pacing, Fetched, HandedLease, Lease, NodeTime, SecretSource, SourceError};
use crate::spec::SecretPath;

/// A lease held for a cached value, kept alive by the cache's lease keeper.
pub(super) struct HeldLease {
    lease: Lease,
    /// Start and length of the current lease period (renewals move both).
    granted: Instant,
    period: Duration,
    /// When the keeper next renews it (or rotates the value, or retries); `None` for a lease too
    /// short to renew at a sane pace (`pacing::Plan::Lapse`), or a certificate nobody read for
    /// a lifetime: the value is served until the lease ends and the next access after that
    /// reads new credentials (a read of such a certificate renews it at once).
    pub(super) next: Option<Instant>,
    /// Consecutive failed attempts (for the back-off).
    failures: u32,
    /// A certificate's: its expiry without a successor was reported.
    expired: bool,
}

impl HeldLease {
    pub(super) fn new(lease: Lease) -> Self {
        let granted = Instant::now();
        let next = match pacing::plan(lease.duration, lease.duration, lease.renewable) {
            pacing::Plan::RenewIn(after) => Some(granted + after),
            // Not renewable: new credentials two thirds in, while the old ones still work.
            pacing::Plan::ReplaceIn(_) => Some(granted + lease.duration * 2 / 3),
            pacing::Plan::Keep | pacing::Plan::Lapse => None,
        };
        Self {
            period: lease.duration,
            next,
            granted,
            lease,
            failures: 0,
            expired: false,
        }
    }

    pub(super) fn alive(&self) -> bool {
        self.granted.elapsed() < self.period
    }

    /// Time left before the current lease period ends.
    pub(super) fn left(&self) -> Duration {
        self.period.saturating_sub(self.granted.elapsed())
    }

    /// `content` of `path` held under this lease, as a successor (the next daemon, or the
    /// volume that takes it over) keeps it.
    pub(super) fn handed(&self, path: &SecretPath, content: &Content) -> HandedLease {
        HandedLease {
            path: path.clone(),
            fetched: Fetched {
                lease: Some(self.lease.clone()),
                ..content.fetched.clone()
            },
            period: self.period,
            ends_at: NodeTime::of(self.granted + self.period),
            next_at: self.next.map(NodeTime::of),
            changed_at: content.changed_at,
        }
    }

    /// A lease a predecessor daemon held, with its timing.
    fn from_handed(handed: &HandedLease, lease: Lease) -> Self {
        let ends = handed.ends_at.instant();
        Self {
            granted: ends.checked_sub(handed.period).unwrap_or(ends),
            period: handed.period,
            next: handed.next_at.map(NodeTime::instant),
            lease,
            failures: 0,
            expired: false,
        }
    }
}

/// Changes the held lease of `entry` with `change`, if it is still `lease` (a value read
/// meanwhile holds another).
fn held_as(entry: &Entry, lease: &Lease, change: impl FnOnce(&mut HeldLease)) {
    if let Some(held) = entry
        .state
        .lock()
        .lease
        .as_mut()
        .filter(|h| &h.lease == lease)
    {
        change(held);
    }
}

/// Whether nobody got the value of `entry` within the last lifetime of `lease`.
fn idle_for_a_lifetime(entry: &Entry, lease: &Lease) -> bool {
    let state = entry.state.lock();
    state
        .read_at
        .is_none_or(|at| at.elapsed() >= lease.duration)
}

impl<S: SecretSource> SecretCache<S> {
    /// Starts the task that renews this cache's leases, unless it runs already.
    pub(super) fn ensure_lease_keeper(self: &Arc<Self>) {
        if !self.keeper_running.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::keep_leases(Arc::downgrade(self)));
        }
    }

    /// Renews every held lease two thirds into its period, for as long as the cache lives and
    /// holds leases; rotates a value whose lease can no longer be extended. Ends when the
    /// cache is dropped or its leases are revoked.
    async fn keep_leases(cache: Weak<Self>) {
        loop {
            let Some(this) = cache.upgrade() else {
                return;
            };
            if this.closing.load(Ordering::Acquire) {
                return;
            }
            let orphans = std::mem::take(&mut *this.orphaned_leases.lock());
            if !orphans.is_empty() {
                // `orphan` runs under the cache's locks: the successor hears of it here.
                this.leases_changed();
                this.revoke_all(orphans).await;
            }
            let mut due = this.held_leases();
            if due.is_empty() {
                this.keeper_running.store(false, Ordering::Release);
                // A lease stored while this task was deciding to stop: carry on.
                if this.held_leases().is_empty() || this.keeper_running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                due = this.held_leases();
            }
            let next = due
                .iter()
                .map(|(_, _, at)| *at)
                .min()
                .unwrap_or_else(Instant::now);
            let wake = this.lease_added.clone();
            drop(this);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = wake.notified() => continue,
            }
            let Some(this) = cache.upgrade() else {
                return;
            };
            for (path, entry, at) in due {
                if at <= Instant::now() {
                    if let Some(entry) = entry.upgrade() {
                        this.renew_or_rotate(&path, &entry).await;
                    }
                }
            }
        }
    }

    /// The cached values holding a lease, with when each is next due.
    fn held_leases(&self) -> Vec<(SecretPath, Weak<Entry>, Instant)> {
        let entries = self.entries.lock();
        entries
            .lru
            .iter()
            .filter_map(|(path, entry)| {
                let next = entry.state.lock().lease.as_ref()?.next?;
                Some((path.clone(), Arc::downgrade(entry), next))
            })
            .collect()
    }

    /// Extends a value's lease; when Vault will not extend it by the full period (max TTL) or
    /// no longer knows it, reads new credentials and swaps them in before the old ones expire.
    async fn renew_or_rotate(&self, path: &SecretPath, entry: &Arc<Entry>) {
        // One conversation with Vault per path at a time, shared with `refresh`.
        let _flight = entry.refresh.lock().await;
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let Some((lease, original, ends)) = entry
            .state
            .lock()
            .lease
            .as_ref()
            .map(|h| (h.lease.clone(), h.lease.duration, h.granted + h.period))
        else {
            return;
        };
        let timeout = self.config.vault_timeout;
        if lease.renewable {
            let renewed = tokio::time::timeout(timeout, self.source.renew_lease(&lease, original));
            match renewed.await {
                // Extended by the full period asked for (paced like tokens: two thirds in, never
                // sooner than the floor). A shorter answer means the lease is capped by its max
                // TTL: stop renewing and rotate now, while the old credentials still work.
                Ok(Ok(period)) => {
                    if let pacing::Plan::RenewIn(after) = pacing::plan(period, original, true) {
                        held_as(entry, &lease, |held| {
                            held.granted = Instant::now();
                            held.period = period;
                            held.next = Some(held.granted + after);
                            held.failures = 0;
                        });
                        self.leases_changed();
                        tracing::debug!(path = %path, ?period, "lease renewed");
                        return;
                    }
                }
                // Unknown to Vault, or not ours to renew: take new credentials.
                Ok(Err(
                    SourceError::NotFound | SourceError::Invalid(_) | SourceError::PermissionDenied,
                )) => {}
                Ok(Err(err)) => {
                    return self.retry_lease_later(path, entry, &lease, ends, &err.to_string())
                }
                Err(_) => return self.retry_lease_later(path, entry, &lease, ends, "no answer"),
            }
        }
        let certificate = path.certificate_request().is_some();
        if certificate && idle_for_a_lifetime(entry, &lease) {
            // Nobody read it for a whole lifetime: it runs out, and the next read after that
            // issues a new one (idle costs Vault nothing).
            held_as(entry, &lease, |held| held.next = None);
            self.leases_changed();
            tracing::debug!(path = %path, "certificate not read for a whole lifetime; not renewed");
            return;
        }
        match tokio::time::timeout(timeout, self.source.read(path)).await {
            Ok(Ok(fetched)) => {
                if certificate {
                    tracing::info!(path = %path, "certificate renewed: a new one issued and swapped in");
                } else {
                    tracing::info!(path = %path, "lease cannot be extended further; new credentials read");
                }
                self.store(path, entry, fetched);
            }
            Ok(Err(err)) => self.retry_lease_later(path, entry, &lease, ends, &err.to_string()),
            Err(_) => self.retry_lease_later(path, entry, &lease, ends, "no answer"),
        }
    }

    /// Schedules another attempt with a doubling back-off, never later than the lease's end
    /// (the last attempt then reads new credentials). Once the lease has ended (Vault was
    /// unavailable at its end), the back-off alone paces the attempts to read new credentials.
    fn retry_lease_later(
        &self,
        path: &SecretPath,
        entry: &Entry,
        lease: &Lease,
        ends: Instant,
        reason: &str,
    ) {
        if path.certificate_request().is_some() {
            tracing::warn!(path = %path, reason, "could not issue a new certificate; retrying");
        } else {
            tracing::warn!(reason, "could not renew a lease; retrying");
        }
        held_as(entry, lease, |held| {
            held.failures = held.failures.saturating_add(1);
            let wait = pacing::retry_in(
                self.config.retry_backoff,
                held.failures,
                self.config.max_retry_backoff,
            );
            let now = Instant::now();
            if path.certificate_request().is_some() && now >= ends && !held.expired {
                held.expired = true;
                self.metrics.certificates_expired.inc();
                tracing::warn!(path = %path, reason, "a certificate expired before a new one could be issued: its files fail until Vault issues one");
            }
            let next = if now < ends {
                (now + wait).min(ends)
            } else {
                now + wait
            };
            held.next = Some(next);
            // At the end of the lease a renewal is pointless: rotate instead.
            held.lease.renewable &= next < ends;
        });
    }

    /// From now on, tells `sink` the leased values this cache holds whenever they or their
    /// leases change (at once too).
    pub fn on_leases_change(&self, sink: LeaseSink) {
        *self.lease_sink.lock() = Some(sink);
        self.leases_changed();
    }

    pub(super) fn leases_changed(&self) {
        let Some(sink) = self.lease_sink.lock().clone() else {
            return;
        };
        // Read and told under the table's lock: of two calls, the later tells the later state.
        let entries = self.entries.lock();
        sink(self.handed_from(&entries));
    }

    /// The values held under a live lease, for a successor daemon.
    fn handed_from(&self, entries: &Entries) -> Vec<HandedLease> {
        if self.closing.load(Ordering::Acquire) {
            return Vec::new();
        }
        entries
            .lru
            .iter()
            .filter_map(|(path, entry)| {
                let state = entry.state.lock();
                let (held, content) = (state.lease.as_ref()?, state.current.as_ref()?);
                held.alive().then(|| held.handed(path, content))
            })
            .collect()
    }

    /// Serves the leased values a predecessor daemon held, and keeps renewing their leases;
    /// leases that have ended are skipped. Returns how many were taken.
    pub fn adopt_leases(self: &Arc<Self>, handed: Vec<HandedLease>) -> usize {
        let mut adopted = 0;
        for handed in handed {
            let Some(lease) = handed.fetched.lease.clone() else {
                continue;
            };
            let held = HeldLease::from_handed(&handed, lease);
            if !held.alive() {
                continue;
            }
            let entry = self.entry(&handed.path);
            self.store_with(
                &handed.path,
                &entry,
                handed.fetched,
                Some(held),
                handed.changed_at,
            );
            // Its readers may hold it from before the restart: counted as read now.
            entry.state.lock().read_at = Some(Instant::now());
            adopted += 1;
        }
        if adopted > 0 {
            self.ensure_lease_keeper();
            self.lease_added.notify_one();
        }
        adopted
    }

    /// Revokes every lease this cache holds (unmount), so their credentials stop working, and
    /// stops the lease keeper. Waits for reads and rotations in flight, then revokes all leases
    /// at once within one `vault_timeout`.
    pub async fn revoke_leases(&self) {
        self.closing.store(true, Ordering::Release);
        self.lease_added.notify_one();
        let entries: Vec<Arc<Entry>> = self
            .entries
            .lock()
            .lru
            .iter()
            .map(|(_, s)| s.clone())
            .collect();
        let mut leases: Vec<Lease> = std::mem::take(&mut *self.orphaned_leases.lock());
        for entry in entries {
            let _flight = entry.refresh.lock().await;
            leases.extend(entry.state.lock().lease.take().map(|h| h.lease));
        }
        self.leases_changed();
        self.revoke_all(leases).await;
    }

    async fn revoke_all(&self, leases: Vec<Lease>) {
        let mut revokes = tokio::task::JoinSet::new();
        for lease in leases {
            let source = self.source.clone();
            revokes.spawn(async move { source.revoke_lease(&lease).await });
        }
        let all = async {
            while let Some(done) = revokes.join_next().await {
                match done {
                    Ok(Ok(())) => tracing::info!("lease revoked"),
                    Ok(Err(err)) => tracing::warn!(error = %err, "could not revoke a lease"),
                    Err(_) => tracing::warn!("could not revoke a lease: task failed"),
                }
            }
        };
        if tokio::time::timeout(self.config.vault_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!("could not revoke every lease: no answer in time");
        }
    }

    /// Leases of values the cache let go (evicted, deleted or forbidden in Vault) are revoked
    /// in the background, so no credential is left alive unmanaged.
    pub(super) fn orphan(&self, lease: Option<HeldLease>) {
        if let Some(held) = lease {
            self.orphaned_leases.lock().push(held.lease);
            self.lease_added.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::sync::atomic::AtomicU64;

    use super::super::tests::{cache, hooked_cache, path, value};
    use super::super::CacheConfig;
    use super::*;
    use crate::source::mock::MockSource;

    /// A cache that has read `database/creds/app`, whose lease lasts 9 s and is renewable.
    async fn read_a_9s_lease() -> (Arc<MockSource>, Arc<SecretCache<MockSource>>, SecretPath) {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/app", &[("password", "gen-1")]);
        source.set_lease(Some(Duration::from_secs(9)), None);
        let cache = cache(&source, CacheConfig::default());
        let p = path("database/creds/app");
        cache.get(&p).await.unwrap();
        (source, cache, p)
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_renewed_not_reissued_while_the_cache_lives() {
        let (source, cache, p) = read_a_9s_lease().await;
        // Idle for a minute: the keeper renews every 6 s; nothing is read again.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(source.reads(), 1);
        assert!(source.renewals() >= 8, "{} renewals", source.renewals());
        assert_eq!(value(&cache.get(&p).await.unwrap(), "password"), "gen-1");
        assert_eq!(
            source.reads(),
            1,
            "a renewed lease keeps the value fresh past the TTL"
        );
        cache.revoke_leases().await;
        assert_eq!(
            source.revoked(),
            vec!["database/creds/app/lease-1".to_string()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_serves_the_handed_values_and_renews_their_leases_without_reading() {
        let (source, first, p) = read_a_9s_lease().await;
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = told.clone();
        first.on_leases_change(Arc::new(move |leases| *sink.lock() = leases));
        let handed = told.lock().clone();
        assert_eq!(handed.len(), 1, "told at once");
        drop(first);
        let successor = cache(&source, CacheConfig::default());
        let mut ended = handed[0].clone();
        ended.ends_at = crate::source::NodeTime::now() - Duration::from_secs(1);
        assert_eq!(
            successor.adopt_leases(vec![ended]),
            0,
            "an ended lease is not taken"
        );
        assert_eq!(successor.adopt_leases(handed), 1);
        assert_eq!(
            value(&successor.get(&p).await.unwrap(), "password"),
            "gen-1"
        );
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(source.reads(), 1, "the successor read no new credentials");
        assert!(source.renewals() >= 2, "{} renewals", source.renewals());
        assert!(source.revoked().is_empty(), "{:?}", source.revoked());
        successor.revoke_leases().await;
        assert_eq!(
            source.revoked(),
            vec!["database/creds/app/lease-1".to_string()],
            "the same lease, revoked by the successor"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_at_its_max_ttl_is_rotated_before_it_expires() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/app", &[("password", "gen-1")]);
        source.set_lease(Some(Duration::from_secs(9)), Some(Duration::from_secs(16)));
        let swapped = Arc::new(AtomicU64::new(0));
        let seen = swapped.clone();
        let cache = hooked_cache(
            &source,
            CacheConfig::default(),
            Box::new(move |_| {
                seen.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let p = path("database/creds/app");
        cache.get(&p).await.unwrap();
        source.put_unversioned("database/creds/app", &[("password", "gen-2")]);
        for _ in 0..14 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Renewed at 6 s (10 s left before the max, so the full 9 s), then at 12 s only 4 s
        // are left: rotated at once.
        assert_eq!(source.reads(), 2);
        assert_eq!(swapped.load(Ordering::SeqCst), 1);
        assert_eq!(value(&cache.get(&p).await.unwrap(), "password"), "gen-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_too_short_to_renew_at_a_sane_pace_is_never_renewed() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/app", &[("password", "gen")]);
        source.set_lease(Some(Duration::from_secs(1)), None);
        let cache = cache(&source, CacheConfig::default());
        let p = path("database/creds/app");
        // A reader every 100 ms for 10 s.
        for _ in 0..100 {
            cache.get(&p).await.unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(source.renewals(), 0, "a 1 s lease is never renewed");
        assert!(
            source.reads() <= 11,
            "{} reads: at most one per lease period, as readers need",
            source.reads()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_capped_by_its_max_ttl_is_renewed_calmly_then_rotated_once_per_period() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/app", &[("password", "gen")]);
        source.set_lease(Some(Duration::from_secs(6)), Some(Duration::from_secs(20)));
        let cache = cache(&source, CacheConfig::default());
        cache.get(&path("database/creds/app")).await.unwrap();
        for _ in 0..450 {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // Per 20 s max TTL: renewals at 4, 8, 12 s; the one at 16 s gets only 4 s and rotates.
        assert!(
            source.renewals() <= 45 / 3,
            "{} renewals in 45 s",
            source.renewals()
        );
        assert!(
            (3..=4).contains(&source.reads()),
            "{} reads of new credentials in 45 s",
            source.reads()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_lease_added_later_is_renewed_on_time() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/slow", &[("password", "a")]);
        source.put_unversioned("database/creds/fast", &[("password", "b")]);
        source.set_lease(Some(Duration::from_secs(300)), None);
        let cache = cache(&source, CacheConfig::default());
        cache.get(&path("database/creds/slow")).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        source.set_lease(Some(Duration::from_secs(6)), None);
        cache.get(&path("database/creds/fast")).await.unwrap();
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(
            source.renewals() >= 2,
            "{} renewals of the 6 s lease",
            source.renewals()
        );
        assert_eq!(source.reads(), 2, "renewed, never re-read");
    }

    #[tokio::test(start_paused = true)]
    async fn evicted_leased_values_have_their_leases_revoked() {
        let source = Arc::new(MockSource::new());
        source.put_unversioned("database/creds/a", &[("password", "a")]);
        source.put_unversioned("database/creds/b", &[("password", "b")]);
        source.set_lease(Some(Duration::from_secs(60)), None);
        let config = CacheConfig {
            max_entries: NonZeroUsize::new(1).unwrap(),
            ..CacheConfig::default()
        };
        let cache = cache(&source, config);
        cache.get(&path("database/creds/a")).await.unwrap();
        cache.get(&path("database/creds/b")).await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(
            source.revoked(),
            vec!["database/creds/a/lease-1".to_string()]
        );
        cache.revoke_leases().await;
        assert_eq!(source.revoked().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_vault_will_not_renew_for_us_is_replaced_by_new_credentials() {
        let (source, _cache, _) = read_a_9s_lease().await;
        source.put_unversioned("database/creds/app", &[("password", "gen-2")]);
        source.fail(SourceError::PermissionDenied);
        for _ in 0..7 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(source.renewals(), 1);
        assert_eq!(source.reads(), 2, "rotated instead of retrying the renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leased_value_is_never_served_past_its_lease() {
        let (source, cache, p) = read_a_9s_lease().await;
        source.fail(SourceError::Unavailable("down".into()));
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(value(&cache.get(&p).await.unwrap(), "password"), "gen-1");
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(
            cache.get(&p).await.is_err(),
            "the lease ended during the outage"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_ends_during_an_outage_is_replaced_at_the_back_off_pace_not_in_a_loop() {
        let (source, cache, p) = read_a_9s_lease().await;
        source.set_server_down();
        for _ in 0..21 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // The renewal at 6 s fails; new credentials are tried at the lease's end (9 s), then
        // at the back-off's pace (3 s apart at least), not over and over once it has ended.
        let reads = source.reads();
        assert!(
            (2..=1 + 21 / 3).contains(&reads),
            "{reads} reads of the credentials in a 21 s outage"
        );
        assert!(
            cache.get(&p).await.is_err(),
            "the value of an ended lease was served"
        );
        source.set_server_up();
        assert_eq!(value(&cache.get(&p).await.unwrap(), "password"), "gen-1");
    }
}
