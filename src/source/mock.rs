//! An in-memory `SecretSource` and `Identity` for the fast test tiers: insert, rotate,
//! delete, fail calls, add latency, refuse logins, and count the calls that reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Fetched, Identity, Lease, SecretSource, SourceError, Version};
use crate::secret::{SecretData, Token};
use crate::spec::SecretPath;

#[derive(Default)]
struct State {
    secrets: HashMap<String, (u64, SecretData, bool)>,
    fail_with: Option<SourceError>,
    /// The server is known down: every call fails at once, whatever the latency.
    server_down: bool,
    latency: Duration,
    lease: Option<Duration>,
    /// Longest a lease may last in total (like a max TTL); renewals are capped by it.
    lease_max: Option<Duration>,
    granted: HashMap<String, tokio::time::Instant>,
    leases_issued: u64,
    revoked: Vec<String>,
    /// What `login` answers (after `latency`); `None`: success.
    login_error: Option<SourceError>,
    logins: usize,
    credentials: usize,
    identity_revoked: bool,
    serving: bool,
}

/// What a `MockSource` was asked as an `Identity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityCalls {
    pub logins: usize,
    pub credentials: usize,
    pub revoked: bool,
    pub serving: bool,
}

/// A mock secret store. Each path holds a version number, the data, and whether it supports
/// cheap version checks (KV v2-like) or not (KV v1-like).
#[derive(Default)]
pub struct MockSource {
    state: Mutex<State>,
    reads: AtomicUsize,
    version_checks: AtomicUsize,
    renewals: AtomicUsize,
    recoveries: AtomicU64,
}

impl MockSource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a KV v2-like secret (versioned); each call bumps the version.
    pub fn put(&self, path: &str, pairs: &[(&str, &str)]) {
        self.put_with(path, pairs, true);
    }

    /// Sets a KV v1-like secret (no versions; changes are detected by content).
    pub fn put_unversioned(&self, path: &str, pairs: &[(&str, &str)]) {
        self.put_with(path, pairs, false);
    }

    fn put_with(&self, path: &str, pairs: &[(&str, &str)], versioned: bool) {
        let mut state = self.state.lock();
        let next = state.secrets.get(path).map_or(1, |s| s.0 + 1);
        let data = SecretData::from_pairs(pairs.iter().copied());
        state
            .secrets
            .insert(path.to_string(), (next, data, versioned));
    }

    pub fn delete(&self, path: &str) {
        self.state.lock().secrets.remove(path);
    }

    /// Every call fails with `err` until `heal` is called.
    pub fn fail(&self, err: SourceError) {
        self.state.lock().fail_with = Some(err);
    }

    pub fn heal(&self) {
        self.state.lock().fail_with = None;
    }

    /// Like a Vault server found not answering: every call fails at once with
    /// `SourceError::Unavailable` until `set_server_up`.
    pub fn set_server_down(&self) {
        self.state.lock().server_down = true;
    }

    /// The server answers again: calls go through and `server_recoveries` counts one more.
    pub fn set_server_up(&self) {
        let mut state = self.state.lock();
        if std::mem::take(&mut state.server_down) {
            self.recoveries.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A source whose `path` is a dynamic secret: every read issues new credentials under a
    /// renewable 60 s lease (at most 600 s in all).
    pub fn dynamic(path: &str) -> Arc<Self> {
        let source = Arc::new(Self::new());
        source.put_unversioned(path, &[("password", "gen")]);
        source.set_lease(
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(600)),
        );
        source
    }

    /// Every read reports a fresh lease of this length (dynamic-secret-like); renewals are
    /// capped so that no lease lasts longer than `max` in total.
    pub fn set_lease(&self, lease: Option<Duration>, max: Option<Duration>) {
        let mut state = self.state.lock();
        state.lease = lease;
        state.lease_max = max;
    }

    /// Lease renewals that reached the source.
    pub fn renewals(&self) -> usize {
        self.renewals.load(Ordering::SeqCst)
    }

    /// Ids of the leases revoked so far.
    pub fn revoked(&self) -> Vec<String> {
        self.state.lock().revoked.clone()
    }

    /// Every call waits this long (in tokio time) before answering.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().latency = latency;
    }

    /// Full reads that reached the source.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Version checks that reached the source.
    pub fn version_checks(&self) -> usize {
        self.version_checks.load(Ordering::SeqCst)
    }

    /// Every later `login` fails with `err` (`None`: logins succeed again).
    pub fn refuse_logins(&self, err: Option<SourceError>) {
        self.state.lock().login_error = err;
    }

    /// Logins, credentials handed over with `set_credential`, whether the identity was
    /// revoked, and whether its background work was started.
    pub fn identity_calls(&self) -> IdentityCalls {
        let state = self.state.lock();
        IdentityCalls {
            logins: state.logins,
            credentials: state.credentials,
            revoked: state.identity_revoked,
            serving: state.serving,
        }
    }

    async fn answer<T>(
        &self,
        path: &SecretPath,
        pick: impl FnOnce(&(u64, SecretData, bool)) -> T,
    ) -> Result<T, SourceError> {
        let latency = {
            let state = self.state.lock();
            if state.server_down {
                return Err(SourceError::Unavailable("the mock server is down".into()));
            }
            state.latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let state = self.state.lock();
        if let Some(err) = &state.fail_with {
            return Err(err.clone());
        }
        state
            .secrets
            .get(path.as_str())
            .map(pick)
            .ok_or(SourceError::NotFound)
    }
}

impl SecretSource for MockSource {
    async fn read(&self, path: &SecretPath) -> Result<Fetched, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let lease = {
            let mut state = self.state.lock();
            state.lease.map(|duration| {
                state.leases_issued += 1;
                let id = format!("{path}/lease-{}", state.leases_issued);
                state
                    .granted
                    .insert(id.clone(), tokio::time::Instant::now());
                Lease {
                    id,
                    duration,
                    renewable: true,
                }
            })
        };
        self.answer(path, |(v, data, versioned)| Fetched {
            version: versioned.then_some(Version(*v)),
            data: data.clone(),
            lease: lease.clone(),
        })
        .await
    }

    async fn current_version(&self, path: &SecretPath) -> Result<Option<Version>, SourceError> {
        self.version_checks.fetch_add(1, Ordering::SeqCst);
        self.answer(path, |(v, _, versioned)| versioned.then_some(Version(*v)))
            .await
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        increment: Duration,
    ) -> Result<Duration, SourceError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        let state = self.state.lock();
        if state.server_down {
            return Err(SourceError::Unavailable("the mock server is down".into()));
        }
        if let Some(err) = &state.fail_with {
            return Err(err.clone());
        }
        let granted = *state
            .granted
            .get(&lease.id)
            .ok_or_else(|| SourceError::Invalid("lease not found".into()))?;
        let left = state
            .lease_max
            .map_or(increment, |max| max.saturating_sub(granted.elapsed()));
        Ok(increment.min(left))
    }

    fn server_recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::SeqCst)
    }

    async fn revoke_lease(&self, lease: &Lease) -> Result<(), SourceError> {
        let mut state = self.state.lock();
        state.granted.remove(&lease.id);
        state.revoked.push(lease.id.clone());
        Ok(())
    }
}

impl Identity for MockSource {
    async fn login(&self) -> Result<(), SourceError> {
        let latency = {
            let mut state = self.state.lock();
            state.logins += 1;
            state.latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match self.state.lock().login_error.clone() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn set_credential(&self, _credential: Token) {
        self.state.lock().credentials += 1;
    }

    /// Like a login in flight: answers after the latency with the refusal, if logins are
    /// refused; counts no login.
    async fn ready(&self) -> Result<(), SourceError> {
        let latency = self.state.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match self.state.lock().login_error.clone() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    async fn serve(self: std::sync::Arc<Self>, _paths: Vec<crate::spec::SecretPath>) {
        self.state.lock().serving = true;
        std::future::pending::<()>().await;
    }

    async fn revoke(&self) {
        self.state.lock().identity_revoked = true;
    }
}
