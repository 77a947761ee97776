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
use crate::spec::VolumeSpec;

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
    fs: Arc<VaultFs<S>>,
    spec: Arc<VolumeSpec>,
    reloader: Option<Arc<Reloader>>,
    ttl: Duration,
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
        let cache = Arc::new(
            SecretCache::new(source.clone(), config.cache, metrics.clone()).with_swap_hook(on_swap),
        );
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
        tasks.spawn(self.source.clone().serve(paths));
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

    /// Gives up a volume that never served: revokes the token a login may have obtained.
    pub async fn abandon(self) {
        self.source.revoke().await;
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
        self.volume.cache.revoke_leases().await;
        self.volume.source.revoke().await;
        self.volume.fs.forget_reported();
        self.volume.cache.clear();
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
