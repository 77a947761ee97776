//! One volume's whole life, owned in one place: it is built (cache and filesystem over its
//! identity, wired to the kernel's invalidations) by `Volume::build`, starts serving with
//! `Volume::serve` once mounted, and is torn down by `Serving::tear_down` in the one order
//! every path uses (tasks, mount, leases, token, cache). A volume with a reload signal also
//! runs its watch (a re-check of every file each time one's freshness runs out) and its
//! `reload::Reloader`, both tasks of the volume. `vaultfs mount` (`app`) and the CSI
//! node plugin (`csi`) both use it; it knows neither the command line, gRPC nor Vault (only
//! `source::Identity`), and mounts only through what its caller hands it.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{CacheConfig, SecretCache};
use crate::fs::{self, Consistency, FsConfig, Invalidate, VaultFs};
use crate::metrics::Metrics;
use crate::mount::Mounted;
use crate::reload::{ReloadConfig, Reloader};
use crate::secret::Token;
use crate::source::{HandedLease, Identity, LeaseSink};
use crate::spec::{SecretPath, VolumeSpec};

/// How long the kernel may cache names and attributes. Strict: never beyond the cache TTL, and
/// at most a second, so a re-check of Vault is never hidden behind the kernel's caches for long.
/// Cached: the cache TTL (directories; a file's answer carries its own remaining freshness,
/// capped by its lease and by max-stale while Vault is down), since the first LOOKUP or GETATTR
/// after it is what re-checks Vault.
pub fn kernel_ttl(cache_ttl: Duration, consistency: Consistency) -> Duration {
    match consistency {
        Consistency::Strict => cache_ttl.min(Duration::from_secs(1)),
        Consistency::Cached => cache_ttl,
    }
}

/// Everything a volume is made of, before it is mounted.
pub struct VolumeConfig {
    /// The volume's name in logs, audit events and metric labels.
    pub name: String,
    /// `namespace/name/uid` of its pod, under CSI.
    pub pod: Option<String>,
    pub cache: CacheConfig,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    /// Must match the mode of the connection that serves the volume.
    pub consistency: Consistency,
    /// Signal processes after a change, and watch the volume's secrets to find changes.
    pub reload: Option<ReloadConfig>,
}

/// A built volume: its identity, cache and filesystem, not yet serving.
pub struct Volume<S> {
    source: Arc<S>,
    cache: Arc<SecretCache<S>>,
    /// The volume's subscription to its cache's swaps (kernel invalidations, reload signal).
    subscription: u64,
    /// The identity and cache this volume shares with others of its identity, if it does.
    shared: Option<Arc<SharedIdentity<S>>>,
    fs: Arc<VaultFs<S>>,
    spec: Arc<VolumeSpec>,
    reloader: Option<Arc<Reloader>>,
    ttl: Duration,
}

/// What the volumes of one identity share (`vaultfs csi --share-identities`): the identity,
/// so one session (one login, one renewal, one revocation), and its cache, so one copy of each
/// value and one Vault read per secret per TTL for all of them. The first volume makes it,
/// later ones join; the last to leave revokes its leases and session and clears the cache,
/// and it is never joined again.
pub struct SharedIdentity<S> {
    source: Arc<S>,
    cache: Arc<SecretCache<S>>,
    /// Volumes using it; `None` once the last one left.
    users: parking_lot::Mutex<Option<usize>>,
    /// The identity's background work (token renewal), run once for all its volumes.
    serving: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<S: Identity> SharedIdentity<S> {
    /// An identity over `source`, with a cache of `config`; no volume uses it yet.
    pub fn new(source: Arc<S>, config: CacheConfig, metrics: &Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            cache: Arc::new(SecretCache::new(source.clone(), config, metrics.clone())),
            source,
            users: parking_lot::Mutex::new(Some(0)),
            serving: parking_lot::Mutex::default(),
        })
    }

    /// The shared identity (to log in ahead of mounting, say).
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// How many volumes use it now.
    pub fn users(&self) -> usize {
        self.users.lock().unwrap_or(0)
    }

    /// Counts one more volume; `false` once the last one left (make a new one).
    fn join(&self) -> bool {
        match self.users.lock().as_mut() {
            Some(users) => {
                *users += 1;
                true
            }
            None => false,
        }
    }

    /// Counts one volume less; `true` for the last, which closes it for good.
    fn leave(&self) -> bool {
        let mut users = self.users.lock();
        match users.as_mut() {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                *users = None;
                true
            }
        }
    }

    /// Starts the identity's background work once, for every volume that will join.
    fn serve(&self, paths: Vec<SecretPath>) {
        let mut serving = self.serving.lock();
        if serving.is_none() {
            *serving = Some(tokio::spawn(self.source.clone().serve(paths)));
        }
    }
}

/// Shortest pause of the watch between two passes (a file whose freshness just ran out may
/// still be found fresh for an instant).
const WATCH_MIN_PAUSE: Duration = Duration::from_millis(50);

impl<S: Identity> Volume<S> {
    /// Builds the volume over `source`; files whose secret changes are reported to
    /// `invalidate` (the mount's kernel notifications) and then, with a reload signal, to
    /// the volume's reloader. Sends nothing to Vault.
    pub fn build(
        source: Arc<S>,
        spec: VolumeSpec,
        config: VolumeConfig,
        invalidate: Invalidate,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let cache = Arc::new(SecretCache::new(
            source.clone(),
            config.cache.clone(),
            metrics.clone(),
        ));
        Self::over(source, cache, None, spec, config, invalidate, metrics)
    }

    /// Builds the volume over `shared`, the identity and cache of the volumes of its identity:
    /// no login and no value of its own. `None` when the last volume of `shared` left
    /// meanwhile (the caller makes a new one). `config.cache` is the shared cache's.
    pub fn build_on(
        shared: &Arc<SharedIdentity<S>>,
        spec: VolumeSpec,
        config: VolumeConfig,
        invalidate: Invalidate,
        metrics: &Arc<Metrics>,
    ) -> Option<Self> {
        if !shared.join() {
            return None;
        }
        Some(Self::over(
            shared.source.clone(),
            shared.cache.clone(),
            Some(shared.clone()),
            spec,
            config,
            invalidate,
            metrics,
        ))
    }

    fn over(
        source: Arc<S>,
        cache: Arc<SecretCache<S>>,
        shared: Option<Arc<SharedIdentity<S>>>,
        spec: VolumeSpec,
        config: VolumeConfig,
        invalidate: Invalidate,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let kernel_ttl = kernel_ttl(config.cache.ttl, config.consistency);
        let spec = Arc::new(spec);
        let ttl = config.cache.ttl;
        let reloader = config
            .reload
            .map(|r| Arc::new(Reloader::new(r, config.name.clone(), metrics.clone())));
        let invalidate_files = fs::swap_hook(spec.clone(), invalidate);
        let on_swap: crate::cache::SwapHook = match reloader.clone() {
            // The kernel's invalidations are queued first: the signal follows the new version.
            Some(reloader) => Box::new(move |path| {
                invalidate_files(path);
                reloader.changed();
            }),
            None => invalidate_files,
        };
        let subscription = cache.subscribe(on_swap);
        let fs = Arc::new(VaultFs::new(
            spec.clone(),
            cache.clone(),
            FsConfig {
                volume: config.name,
                pod: config.pod,
                uid: config.uid,
                gid: config.gid,
                file_mode: config.file_mode,
                kernel_ttl,
                consistency: config.consistency,
            },
        ));
        Self {
            source,
            cache,
            subscription,
            shared,
            fs,
            spec,
            reloader,
            ttl,
        }
    }

    /// Serves the leased values a predecessor daemon held and keeps renewing their leases;
    /// returns how many were taken.
    pub fn adopt_leases(&self, handed: Vec<HandedLease>) -> usize {
        self.cache.adopt_leases(handed)
    }

    /// Tells `sink` the volume's leased values whenever they or their leases change.
    pub fn on_leases_change(&self, sink: LeaseSink) {
        self.cache.on_leases_change(sink);
    }

    /// The volume's identity (to log in ahead of mounting, say).
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// The filesystem to mount.
    pub fn fs(&self) -> Arc<VaultFs<S>> {
        self.fs.clone()
    }

    pub fn files(&self) -> usize {
        self.spec.entries().len()
    }

    /// Starts serving once `mounted`: the identity's background work (token renewal, engine
    /// detection) runs until the volume is torn down.
    pub fn serve(self, mounted: Box<dyn Mounted>) -> Serving<S> {
        let mut tasks = tokio::task::JoinSet::new();
        // Templates' secrets are known only once rendered; their engines are found then.
        let paths = self
            .spec
            .entries()
            .iter()
            .filter_map(|e| e.secret().map(|(p, _)| p.clone()))
            .collect();
        match &self.shared {
            Some(shared) => shared.serve(paths),
            None => {
                tasks.spawn(self.source.clone().serve(paths));
            }
        }
        if let Some(reloader) = &self.reloader {
            tasks.spawn(reloader.clone().run());
            tasks.spawn(watch(self.fs.clone(), self.ttl));
        }
        Serving {
            volume: self,
            mounted: Some(mounted),
            tasks,
        }
    }

    /// Gives up a volume that never served: revokes the token a login may have obtained
    /// (a shared identity's only when this was its last volume).
    pub async fn abandon(self) {
        self.cache.unsubscribe(self.subscription);
        if self.shared.as_ref().is_none_or(|shared| shared.leave()) {
            self.source.revoke().await;
        }
    }
}

/// The watch of a volume with a reload signal, the one case where vaultfs asks Vault about
/// secrets nobody reads: every file is re-checked as an access would once its freshness runs
/// out (one TTL after the volume starts serving, then whenever the soonest file is due), so a
/// change is found at most a TTL after it, and each secret costs Vault one check per TTL.
async fn watch<S: Identity>(fs: Arc<VaultFs<S>>, ttl: Duration) {
    let mut pause = ttl;
    loop {
        tokio::time::sleep(pause).await;
        pause = fs
            .check_all()
            .await
            .unwrap_or(ttl)
            .clamp(WATCH_MIN_PAUSE, ttl.max(WATCH_MIN_PAUSE));
    }
}

/// A mounted volume, serving.
pub struct Serving<S> {
    volume: Volume<S>,
    mounted: Option<Box<dyn Mounted>>,
    tasks: tokio::task::JoinSet<()>,
}

impl<S: Identity> Serving<S> {
    /// The id of the volume's mount, if it was looked up when mounting.
    pub fn mount_id(&self) -> Option<u64> {
        self.mounted.as_ref().and_then(|m| m.mount_id())
    }

    /// Hands a fresh login credential to the volume (a CSI republish's token).
    pub fn set_credential(&self, credential: Token) {
        self.volume.source.set_credential(credential);
    }

    /// Tears the volume down, in order: background tasks stop; the mount goes (lazily if files
    /// are open); leases are revoked while the token still works; the token is revoked; cached
    /// secrets are zeroized. Returns the unmount's outcome.
    pub async fn tear_down(mut self) -> std::io::Result<()> {
        self.tasks.abort_all();
        let unmounted = self.mounted.take().map_or(Ok(()), |m| m.unmount());
        let volume = &self.volume;
        volume.cache.unsubscribe(volume.subscription);
        // A shared identity and its cache stay while other volumes use them.
        let last = volume.shared.as_ref().is_none_or(|shared| {
            let last = shared.leave();
            if last {
                if let Some(serving) = shared.serving.lock().take() {
                    serving.abort();
                }
            }
            last
        });
        if last {
            volume.cache.revoke_leases().await;
            volume.source.revoke().await;
        }
        volume.fs.forget_reported();
        if last {
            volume.cache.clear();
        }
        unmounted
    }

    /// Stops serving without unmounting or revoking anything, for a daemon that is stopping:
    /// the mount stays (dead once the process exits) for the next daemon to serve again.
    pub fn leave_for_restart(mut self) {
        self.tasks.abort_all();
        if let Some(mounted) = self.mounted.take() {
            std::mem::forget(mounted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mock::MockSource;
    use crate::spec::parse_secret_arg;

    struct NoMount;

    impl Mounted for NoMount {
        fn unmount(self: Box<Self>) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn config(name: &str) -> VolumeConfig {
        VolumeConfig {
            name: name.into(),
            pod: Some(format!("team-a/{name}/uid")),
            cache: CacheConfig::default(),
            uid: 0,
            gid: 0,
            file_mode: 0o444,
            consistency: Consistency::Cached,
            reload: None,
        }
    }

    fn spec() -> VolumeSpec {
        VolumeSpec::new(vec![parse_secret_arg("db=secret/db").unwrap()]).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn volumes_of_one_identity_share_its_cache_and_the_last_one_revokes() {
        let source = Arc::new(MockSource::new());
        source.put("secret/db", &[("password", "v1")]);
        let metrics = Arc::new(Metrics::new());
        let shared = SharedIdentity::new(source.clone(), CacheConfig::default(), &metrics);
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let volume = |name: &'static str| {
            let told = told.clone();
            Volume::build_on(
                &shared,
                spec(),
                config(name),
                Box::new(move |ino| told.lock().push((name, ino))),
                &metrics,
            )
            .expect("the identity is in use")
        };
        let (a, b) = (volume("pod-a"), volume("pod-b"));
        assert_eq!(shared.users(), 2);
        assert!(Arc::ptr_eq(&a.cache, &b.cache));
        let p = SecretPath::parse("secret/db").unwrap();
        a.cache.get(&p).await.unwrap();
        b.cache.get(&p).await.unwrap();
        assert_eq!(source.reads(), 1, "one Vault read for both volumes");

        source.put("secret/db", &[("password", "v2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        b.cache.get(&p).await.unwrap();
        let mut names: Vec<_> = told.lock().iter().map(|(n, _)| *n).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["pod-a", "pod-b"],
            "both volumes' files invalidated"
        );

        let (a, b) = (a.serve(Box::new(NoMount)), b.serve(Box::new(NoMount)));
        a.tear_down().await.unwrap();
        assert!(
            !source.identity_calls().revoked,
            "pod-b still uses the session"
        );
        assert_eq!(shared.users(), 1);
        told.lock().clear();
        source.put("secret/db", &[("password", "v3")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        shared.cache.get(&p).await.unwrap();
        assert!(
            told.lock().iter().all(|(n, _)| *n == "pod-b"),
            "a gone volume is told nothing"
        );
        b.tear_down().await.unwrap();
        assert!(source.identity_calls().revoked, "the last volume revokes");
        assert_eq!(shared.cache.usage().0, 0, "and clears the cache");
        assert!(
            Volume::build_on(&shared, spec(), config("pod-c"), Box::new(|_| {}), &metrics)
                .is_none(),
            "a closed identity is never joined again"
        );
    }
}
