//! One volume's whole life, owned in one place: it is built (cache and filesystem over its
//! identity, wired to the kernel's invalidations) by `Volume::build`, starts serving with
//! `Volume::serve` once mounted, and is torn down by `Serving::tear_down` in the one order
//! every path uses (tasks, mount, leases, token, cache). A volume with a reload signal also
//! runs its watch (a re-check of every file each time one's freshness runs out) and its
//! `reload::Reloader`, both tasks of the volume. `vaultfs mount` (`app`) and the CSI
//! node plugin (`csi`) both use it; it knows neither the command line, gRPC nor Vault (only
//! `source::Identity`), and mounts only through what its caller hands it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{CacheConfig, SecretCache};
use crate::fs::{self, Consistency, FsConfig, Invalidate, VaultFs};
use crate::metrics::Metrics;
use crate::mount::Mounted;
use crate::reload::{ReloadConfig, Reloader};
use crate::secret::Token;
use crate::source::{HandedLease, Identity, LeaseSink, Session};
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
    /// The volume's cache: all of it, or over a shared identity's cache, its own leased values
    /// (`SecretCache::layered`).
    cache: Arc<SecretCache<S>>,
    /// The volume's subscription to its cache's swaps (kernel invalidations, reload signal).
    subscription: u64,
    /// The identity and cache this volume shares with others of its identity, if it does,
    /// and its subscription to that cache's swaps.
    shared: Option<(Arc<SharedIdentity<S>>, u64)>,
    fs: Arc<VaultFs<S>>,
    spec: Arc<VolumeSpec>,
    reloader: Option<Arc<Reloader>>,
    ttl: Duration,
    /// The volume's name in metric labels, and the metrics.
    name: String,
    metrics: Arc<Metrics>,
}

/// What the volumes of one identity share (`vaultfs csi --share-identities`): the identity,
/// so one session (one login, one renewal, one revocation), and its cache, so one copy of each
/// value and one Vault read per secret per TTL for all of them. The first volume makes it,
/// later ones join; the last to leave revokes its leases and session and clears the cache,
/// and it is never joined again.
pub struct SharedIdentity<S> {
    source: Arc<S>,
    cache: Arc<SecretCache<S>>,
    /// Volumes using it (and holds taken while volumes are recovered); `None` once the last
    /// one left.
    users: parking_lot::Mutex<Option<usize>>,
    /// The identity's background work (token renewal), run once for all its volumes.
    serving: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Its session was taken over from a predecessor daemon (leases read under it live on).
    resumed: std::sync::atomic::AtomicBool,
    /// Set once the last volume left and everything it held is revoked: a volume of the same
    /// identity waits for it before making a new one, so the two never write the keeper's
    /// records of the identity at once.
    closed: tokio::sync::watch::Sender<bool>,
}

impl<S: Identity> SharedIdentity<S> {
    /// An identity over `source`, with a cache of `config` (its bounds are per volume: the
    /// shared cache holds as much as all its volumes' caches would); no volume uses it yet.
    pub fn new(source: Arc<S>, config: CacheConfig, metrics: &Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            cache: Arc::new(SecretCache::new(source.clone(), config, metrics.clone())),
            source,
            users: parking_lot::Mutex::new(Some(0)),
            serving: parking_lot::Mutex::default(),
            resumed: Default::default(),
            closed: tokio::sync::watch::Sender::new(false),
        })
    }

    /// How many volumes use it now.
    pub fn users(&self) -> usize {
        self.users.lock().unwrap_or(0)
    }

    /// Whether its last volume left (it may still be revoking what it held).
    pub fn is_closing(&self) -> bool {
        self.users.lock().is_none()
    }

    /// Waits until a closing identity has revoked everything it held.
    pub async fn closed(&self) {
        let _ = self.closed.subscribe().wait_for(|closed| *closed).await;
    }

    /// Counts one more volume (or hold); `false` once the last one left (make a new one).
    pub fn join(&self) -> bool {
        let mut users = self.users.lock();
        let Some(n) = users.as_mut() else {
            return false;
        };
        *n += 1;
        self.cache.scale_bounds(*n);
        true
    }

    /// Counts one volume less; `true` for the last, which closes it for good.
    fn leave(&self) -> bool {
        let mut users = self.users.lock();
        match users.as_mut() {
            Some(n) if *n > 1 => {
                *n -= 1;
                self.cache.scale_bounds(*n);
                false
            }
            _ => {
                *users = None;
                if let Some(serving) = self.serving.lock().take() {
                    serving.abort();
                }
                true
            }
        }
    }

    /// Lets go of a hold `join` took without a volume (recovery keeps one until every recorded
    /// volume is back): when nothing else uses the identity, it is closed.
    pub async fn release(&self) {
        if self.leave() {
            self.close().await;
        }
    }

    /// Revokes what the identity holds once its last user left: the shared leases while the
    /// token still works, then the token; wipes the shared cache.
    async fn close(&self) {
        self.cache.revoke_leases().await;
        self.source.revoke().await;
        self.cache.clear();
        self.closed.send_replace(true);
    }

    /// Starts the identity's background work once, for every volume that will join; a later
    /// volume's paths are learnt by a task of that volume.
    fn serve(&self, paths: Vec<SecretPath>, tasks: &mut tokio::task::JoinSet<()>) {
        let mut serving = self.serving.lock();
        match *serving {
            None => *serving = Some(tokio::spawn(self.source.clone().serve(paths))),
            Some(_) => {
                tasks.spawn(self.source.clone().learn(paths));
            }
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
        let own = Arc::new(SecretCache::layered(&shared.cache, spec.shared_paths()));
        Some(Self::over(
            shared.source.clone(),
            own,
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
        let on_swap: Arc<dyn Fn(&SecretPath) + Send + Sync> = match reloader.clone() {
            // The kernel's invalidations are queued first: the signal follows the new version.
            // A shared cache tells every volume of every path: only this volume's files count.
            Some(reloader) => {
                let spec = spec.clone();
                Arc::new(move |path| {
                    invalidate_files(path);
                    if spec.files_of(path).next().is_some() {
                        reloader.changed();
                    }
                })
            }
            None => Arc::new(invalidate_files),
        };
        let hook = || -> crate::cache::SwapHook {
            let on_swap = on_swap.clone();
            Box::new(move |path| on_swap(path))
        };
        let subscription = cache.subscribe(hook());
        let shared = shared.map(|shared| {
            let subscription = shared.cache.subscribe(hook());
            (shared, subscription)
        });
        let name = config.name.clone();
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
            name,
            metrics: metrics.clone(),
        }
    }

    /// Takes over a predecessor daemon's Vault `session`; `true` when the volume's session is
    /// one a predecessor left (for a volume that joined a shared identity without a session:
    /// when the identity's first volume took one over), so the leases read under it live on.
    pub fn resume(&self, session: Option<Session>) -> bool {
        let shared = self.shared.as_ref().map(|(shared, _)| shared);
        match session {
            Some(session) => {
                let resumed = self.source.resume(session);
                if let Some(shared) = shared.filter(|_| resumed) {
                    shared.resumed.store(true, Ordering::Release);
                }
                resumed
            }
            None => shared.is_some_and(|shared| shared.resumed.load(Ordering::Acquire)),
        }
    }

    /// Serves the leased values a predecessor daemon held and keeps renewing their leases:
    /// `own`, the volume's, and `shared`, those its shared identity's volumes share. Returns
    /// how many were taken.
    pub fn adopt_leases(&self, own: Vec<HandedLease>, shared: Vec<HandedLease>) -> usize {
        let own = self.known(own);
        // Certificates are never shared: one in the shared record was on its way to a volume.
        let shared = shared
            .into_iter()
            .filter(|lease| !lease.path.as_str().contains('#'))
            .collect();
        let shared = match &self.shared {
            Some((identity, _)) => identity.cache.adopt_leases(shared),
            None => 0,
        };
        self.cache.adopt_leases(own) + shared
    }

    /// The handed values this volume's spec shows, a certificate's with its request (a record
    /// holds only the path's text).
    fn known(&self, handed: Vec<HandedLease>) -> Vec<HandedLease> {
        handed
            .into_iter()
            .filter_map(|mut lease| {
                if lease.path.as_str().contains('#') {
                    lease.path = self
                        .spec
                        .entries()
                        .iter()
                        .find_map(|e| e.secret().map(|(p, _)| p).filter(|p| **p == lease.path))?
                        .clone();
                }
                Some(lease)
            })
            .collect()
    }

    /// Tells `sink` the volume's own leased values whenever they or their leases change.
    pub fn on_leases_change(&self, sink: LeaseSink) {
        self.cache.on_leases_change(sink);
    }

    /// Tells `sink` the leased values the volumes of its shared identity share, whenever they
    /// or their leases change (for the identity's first volume to keep).
    pub fn on_shared_leases_change(&self, sink: LeaseSink) {
        if let Some((identity, _)) = &self.shared {
            identity.cache.on_leases_change(sink);
        }
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
            // A certificate is issued, not read: no engine to learn.
            .filter(|p| p.certificate_request().is_none())
            .collect();
        match &self.shared {
            Some((shared, _)) => shared.serve(paths, &mut tasks),
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
        match self.leave() {
            Left::Alone => self.source.revoke().await,
            Left::Last(shared) => shared.close().await,
            Left::Others => {}
        }
    }

    /// Stops telling this volume of swaps and leaves its shared identity, if any.
    fn leave(&self) -> Left<'_, S> {
        self.cache.unsubscribe(self.subscription);
        let Some((shared, subscription)) = &self.shared else {
            return Left::Alone;
        };
        shared.cache.unsubscribe(*subscription);
        if shared.leave() {
            Left::Last(shared)
        } else {
            Left::Others
        }
    }
}

/// What a volume leaving its identity leaves behind.
enum Left<'a, S> {
    /// Its own identity: its session is to be revoked.
    Alone,
    /// A shared identity it was the last user of: to be closed.
    Last(&'a Arc<SharedIdentity<S>>),
    /// A shared identity other volumes still use.
    Others,
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

    /// Whether the volume shares its identity with others (`--share-identities`).
    pub fn is_shared(&self) -> bool {
        self.volume.shared.is_some()
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
        // A shared identity and its cache stay while other volumes use them; the volume's own
        // leased values go with it, while the token still works.
        let left = volume.leave();
        volume.cache.revoke_leases().await;
        match left {
            Left::Alone => volume.source.revoke().await,
            Left::Last(shared) => shared.close().await,
            // Its own series go (the identity's Vault series are labelled by its first volume).
            Left::Others => volume.metrics.forget_volume(&volume.name),
        }
        volume.fs.forget_reported();
        volume.cache.clear();
        unmounted
    }

    /// Stops serving without unmounting or revoking anything, for a daemon that is stopping:
    /// the mount stays (dead once the process exits) for the next daemon to serve again.
    pub fn leave_for_restart(mut self) {
        self.tasks.abort_all();
        // Nor does a shared identity renew or replace its token while the successor starts.
        if let Some((shared, _)) = &self.volume.shared {
            if let Some(serving) = shared.serving.lock().take() {
                serving.abort();
            }
        }
        if let Some(mounted) = self.mounted.take() {
            std::mem::forget(mounted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reload::ReloadConfig;
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
        let p = SecretPath::parse("secret/db").unwrap();
        a.cache.get(&p).await.unwrap();
        b.cache.get(&p).await.unwrap();
        assert_eq!(source.reads(), 1, "one Vault read for both volumes");
        assert_eq!(shared.cache.usage().0, 1, "one copy, in the shared cache");

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

    #[tokio::test(start_paused = true)]
    async fn a_volume_keeps_its_own_leases_and_revokes_them_when_it_goes() {
        let source = MockSource::dynamic("database/creds/app");
        let metrics = Arc::new(Metrics::new());
        let shared = SharedIdentity::new(source.clone(), CacheConfig::default(), &metrics);
        let spec =
            || VolumeSpec::new(vec![parse_secret_arg("db=database/creds/app").unwrap()]).unwrap();
        let volume = |name: &'static str| {
            Volume::build_on(&shared, spec(), config(name), Box::new(|_| {}), &metrics)
                .expect("the identity is in use")
        };
        let (a, b) = (volume("pod-a"), volume("pod-b"));
        let p = SecretPath::parse("database/creds/app").unwrap();
        let lease = |content: Arc<crate::cache::Content>| content.fetched.lease.clone().unwrap().id;
        let lease_a = lease(a.cache.get(&p).await.unwrap());
        let lease_b = lease(b.cache.get(&p).await.unwrap());
        assert_ne!(lease_a, lease_b, "one credential per pod");
        assert_eq!(source.reads(), 2);

        let (a, b) = (a.serve(Box::new(NoMount)), b.serve(Box::new(NoMount)));
        a.tear_down().await.unwrap();
        assert_eq!(
            source.revoked(),
            vec![lease_a.clone()],
            "pod-a's lease only"
        );
        assert!(!source.identity_calls().revoked);
        assert_eq!(lease(b.volume.cache.get(&p).await.unwrap()), lease_b);
        b.tear_down().await.unwrap();
        assert_eq!(source.revoked(), vec![lease_a, lease_b]);
        assert!(source.identity_calls().revoked, "the last volume revokes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_cache_signals_only_the_volumes_that_show_the_changed_secret() {
        let source = Arc::new(MockSource::new());
        source.put("secret/db", &[("password", "v1")]);
        source.put("secret/other", &[("k", "v1")]);
        let metrics = Arc::new(Metrics::new());
        let shared = SharedIdentity::new(source.clone(), CacheConfig::default(), &metrics);
        let reloading = |name: &str| VolumeConfig {
            reload: Some(ReloadConfig {
                signal: "SIGHUP".parse().unwrap(),
                target: crate::reload::Target::PidFile("/nonexistent".into()),
                min_interval: Duration::from_secs(1),
            }),
            ..config(name)
        };
        let db = Volume::build_on(&shared, spec(), reloading("db"), Box::new(|_| {}), &metrics)
            .expect("the identity is in use");
        let other_spec =
            VolumeSpec::new(vec![parse_secret_arg("k=secret/other#k").unwrap()]).unwrap();
        let other = Volume::build_on(
            &shared,
            other_spec,
            config("other"),
            Box::new(|_| {}),
            &metrics,
        )
        .expect("the identity is in use");
        let (db_path, other_path) = (
            SecretPath::parse("secret/db").unwrap(),
            SecretPath::parse("secret/other").unwrap(),
        );
        db.cache.get(&db_path).await.unwrap();
        other.cache.get(&other_path).await.unwrap();

        source.put("secret/other", &[("k", "v2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        other.cache.get(&other_path).await.unwrap();
        let reloader = db.reloader.as_ref().expect("db reloads");
        assert!(!reloader.is_pending(), "a secret db does not show changed");

        source.put("secret/db", &[("password", "v2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        other.cache.get(&db_path).await.unwrap();
        assert!(
            reloader.is_pending(),
            "db's secret changed, whoever read it"
        );
    }
}
