//! A volume's cache layered over the shared cache of its identity (`vaultfs csi
//! --share-identities`): values without a lease come from the shared cache, so one read and
//! one copy serve every volume of the identity; a leased value (a dynamic secret) is the
//! volume's own unless its entry says `share: true`, because some applications need one
//! credential per replica. The first read of a path goes through the shared cache (one read
//! per TTL for a static secret); when the answer turns out to hold a lease, the volume takes
//! that value and its lease into its own layer (one of the volumes that waited on the same
//! read does; the others read their own), and every later read of the path by a volume that
//! does not share it is answered by that volume's own layer.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use super::leases::HeldLease;
use super::{Content, SecretCache};
use crate::source::{Fetched, SecretSource, SourceError};
use crate::spec::SecretPath;

/// What a volume's cache is layered over.
pub(super) struct Layer<S> {
    pub(super) shared: Arc<SecretCache<S>>,
    /// Paths the volume's entries ask to share with their leases (`share: true`).
    pub(super) share: HashSet<SecretPath>,
}

impl<S: SecretSource> SecretCache<S> {
    /// A volume's cache over `shared`, the cache of the volumes of its identity: it holds
    /// only the volume's own leased values; `share` names the paths whose leased values the
    /// volume shares with the identity's other volumes.
    pub fn layered(shared: &Arc<Self>, share: HashSet<SecretPath>) -> Self {
        {
            // Under the table's lock: `hand_over` decides under it too.
            let _entries = shared.entries.lock();
            shared.shared_leased.lock().extend(share.iter().cloned());
        }
        let mut own = Self::new(
            shared.source.clone(),
            shared.config.clone(),
            shared.metrics.clone(),
        );
        own.layer = Some(Layer {
            shared: shared.clone(),
            share,
        });
        own
    }

    /// The shared cache that answers for `path` in this cache's place, if any: every path but
    /// the leased ones this volume keeps for itself.
    pub(super) fn answered_by_shared(&self, path: &SecretPath) -> Option<&Arc<Self>> {
        let layer = self.layer.as_ref()?;
        if layer.share.contains(path) {
            return Some(&layer.shared);
        }
        // Leased: known to the shared cache, or to this one (a value taken over from a
        // predecessor daemon, which the new shared cache has never seen).
        let own = self.leased.lock().contains(path);
        let own = own || layer.shared.leased.lock().contains(path);
        (!own).then_some(&layer.shared)
    }

    /// `path` read through the shared cache: its value when it holds no lease (or the
    /// volume shares it), otherwise the volume's own leased value.
    pub(super) async fn get_through(
        self: &Arc<Self>,
        shared: &Arc<Self>,
        path: &SecretPath,
    ) -> Result<Arc<Content>, SourceError> {
        // A shared cache is never layered itself.
        let content = shared.get_own(path).await?;
        let share = self.layer.as_ref().is_some_and(|l| l.share.contains(path));
        if share || !shared.leased.lock().contains(path) {
            return Ok(content);
        }
        if let Some((fetched, held, changed_at)) = shared.hand_over(path, &content) {
            let entry = self.entry(path);
            let own = self.store_with(path, &entry, fetched, Some(held), changed_at);
            self.mark_read(path, &entry);
            self.ensure_lease_keeper();
            self.lease_added.notify_one();
            return Ok(own);
        }
        // Another volume took that one, or the identity shares it: this volume reads its own.
        self.get_own(path).await
    }

    /// Gives up the leased value `content` of `path` with its lease, for the volume that read
    /// it to keep as its own: `None` when it is no longer the cached value (another volume
    /// took it) or a volume of the identity shares the path.
    fn hand_over(
        &self,
        path: &SecretPath,
        content: &Arc<Content>,
    ) -> Option<(Fetched, HeldLease, SystemTime)> {
        let handed = {
            let mut entries = self.entries.lock();
            if self.shared_leased.lock().contains(path) {
                return None;
            }
            let entry = entries.lru.peek(path)?.clone();
            let mut state = entry.state.lock();
            let current = state.current.as_ref()?;
            if !Arc::ptr_eq(current, content) {
                return None;
            }
            let handed = (
                content.fetched.clone(),
                state.lease.take()?,
                content.changed_at,
            );
            // The entry stays, empty: a volume waiting on the same read finds nothing fresh
            // and reads (and takes) its own through it.
            state.current = None;
            state.checked_at = None;
            entries.bytes = entries
                .bytes
                .saturating_sub(std::mem::take(&mut state.weight));
            handed
        };
        // The shared cache's record for a successor no longer holds it.
        self.leases_changed();
        Some(handed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{cache, path};
    use super::super::CacheConfig;
    use super::*;
    use crate::source::mock::MockSource;

    fn lease_of(content: &Content) -> String {
        content
            .fetched
            .lease
            .as_ref()
            .expect("a leased value")
            .id
            .clone()
    }

    fn layers(
        source: &Arc<MockSource>,
        share: &[&str],
    ) -> (
        Arc<SecretCache<MockSource>>,
        Vec<Arc<SecretCache<MockSource>>>,
    ) {
        let shared = cache(source, CacheConfig::default());
        let own = (0..3)
            .map(|_| {
                let share = share.iter().map(|p| path(p)).collect();
                Arc::new(SecretCache::layered(&shared, share))
            })
            .collect();
        (shared, own)
    }

    #[tokio::test(start_paused = true)]
    async fn static_values_are_read_once_for_every_layer_and_held_once() {
        let source = Arc::new(MockSource::new());
        source.put("secret/app", &[("k", "v1")]);
        let (shared, own) = layers(&source, &[]);
        let p = path("secret/app");
        let mut reads = tokio::task::JoinSet::new();
        for layer in &own {
            let (layer, p) = (layer.clone(), p.clone());
            reads.spawn(async move { layer.get(&p).await.unwrap() });
        }
        let answers: Vec<_> = reads.join_all().await;
        assert_eq!(source.reads(), 1, "one Vault read for three volumes");
        assert!(answers.iter().all(|a| Arc::ptr_eq(a, &answers[0])));
        assert_eq!(shared.usage().0, 1);
        assert!(own.iter().all(|l| l.usage().0 == 0), "no copy per volume");
        assert!(
            own[1].due_in(&p).is_some(),
            "freshness is the shared value's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leased_values_are_per_volume_unless_shared() {
        let source = MockSource::dynamic("database/creds/app");
        let p = path("database/creds/app");

        let (shared, own) = layers(&source, &[]);
        let mut passwords = HashSet::new();
        for layer in &own {
            let content = layer.get(&p).await.unwrap();
            passwords.insert(lease_of(&content));
            let again = layer.get(&p).await.unwrap();
            assert!(
                Arc::ptr_eq(&content, &again),
                "a volume keeps its own value"
            );
        }
        assert_eq!(
            passwords.len(),
            3,
            "one credential per volume: {passwords:?}"
        );
        assert_eq!(shared.usage().1, 0, "the shared cache keeps none of them");
        assert!(own.iter().all(|l| l.usage().0 == 1));

        let (_, own) = layers(&source, &["database/creds/app"]);
        let reads = source.reads();
        let first = own[0].get(&p).await.unwrap();
        for layer in &own[1..] {
            let content = layer.get(&p).await.unwrap();
            assert_eq!(lease_of(&content), lease_of(&first));
        }
        assert_eq!(source.reads(), reads + 1, "a shared lease is read once");
    }

    #[tokio::test(start_paused = true)]
    async fn volumes_reading_a_new_leased_path_at_once_each_get_their_own() {
        let source = MockSource::dynamic("database/creds/app");
        source.set_latency(Duration::from_millis(100));
        let (shared, own) = layers(&source, &[]);
        let p = path("database/creds/app");
        let mut reads = tokio::task::JoinSet::new();
        for layer in &own {
            let (layer, p) = (layer.clone(), p.clone());
            reads.spawn(async move { lease_of(&layer.get(&p).await.unwrap()) });
        }
        let leases: HashSet<_> = reads.join_all().await.into_iter().collect();
        assert_eq!(leases.len(), 3, "{leases:?}");
        assert_eq!(
            source.reads(),
            3,
            "the first read is kept by one volume, not wasted"
        );
        assert_eq!(shared.usage().1, 0);
    }

    /// Real time: leases handed to a successor travel on the node's clock.
    #[tokio::test]
    async fn a_volumes_own_lease_taken_over_by_a_successor_is_served_not_read_again() {
        let source = MockSource::dynamic("database/creds/app");
        let p = path("database/creds/app");
        let (_, own) = layers(&source, &[]);
        let handed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let record = handed.clone();
        own[0].on_leases_change(Arc::new(move |leases| *record.lock() = leases));
        let before = lease_of(&own[0].get(&p).await.unwrap());

        // The successor's shared cache has never seen the path.
        let (shared, successor) = layers(&source, &[]);
        let reads = source.reads();
        assert_eq!(successor[0].adopt_leases(handed.lock().clone()), 1);
        let after = successor[0].get(&p).await.unwrap();
        assert_eq!(lease_of(&after), before, "the same credential");
        assert_eq!(source.reads(), reads, "nothing read again");
        assert!(successor[0].remaining(&p, &after) > Duration::ZERO);
        assert_eq!(shared.usage(), (0, 0));
    }
}
