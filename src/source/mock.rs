//! An in-memory `SecretSource` for the fast test tiers: insert, rotate, delete, fail calls,
//! add latency, and count the calls that reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{Fetched, SecretSource, SourceError, Version};
use crate::secret::SecretData;
use crate::spec::SecretPath;

#[derive(Default)]
struct State {
    secrets: HashMap<String, (u64, SecretData, bool)>,
    fail_with: Option<SourceError>,
    latency: Duration,
    lease: Option<Duration>,
}

/// A mock secret store. Each path holds a version number, the data, and whether it supports
/// cheap version checks (KV v2-like) or not (KV v1-like).
#[derive(Default)]
pub struct MockSource {
    state: Mutex<State>,
    reads: AtomicUsize,
    version_checks: AtomicUsize,
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

    /// Every read reports a lease of this length (dynamic-secret-like).
    pub fn set_lease(&self, lease: Option<Duration>) {
        self.state.lock().lease = lease;
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

    async fn answer<T>(
        &self,
        path: &SecretPath,
        pick: impl FnOnce(&(u64, SecretData, bool)) -> T,
    ) -> Result<T, SourceError> {
        let latency = self.state.lock().latency;
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
        let lease = self.state.lock().lease;
        self.answer(path, |(v, data, versioned)| Fetched {
            version: versioned.then_some(Version(*v)),
            data: data.clone(),
            lease,
        })
        .await
    }

    async fn current_version(&self, path: &SecretPath) -> Result<Option<Version>, SourceError> {
        self.version_checks.fetch_add(1, Ordering::SeqCst);
        self.answer(path, |(v, _, versioned)| versioned.then_some(Version(*v)))
            .await
    }
}
