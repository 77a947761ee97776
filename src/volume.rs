//! One volume's whole life, owned in one place: it is built (identity, cache, filesystem) by
//! `Volume::build`, starts serving with `Volume::serve` once mounted, and is torn down by
//! `Serving::tear_down` in the one order every path uses (tasks, mount, leases, token, cache).
//! `vaultfs mount` (`app`) and the CSI node plugin (`csi`) both use it; it knows neither the
//! command line nor gRPC, and mounts only through what its caller hands it.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{CacheConfig, SecretCache};
use crate::fs::{FsConfig, VaultFs};
use crate::metrics::Metrics;
use crate::mount::Mounted;
use crate::source::vault::{Auth, Credential, VaultServer, VaultSource};
use crate::spec::VolumeSpec;

/// How long the kernel may cache names and attributes: never beyond the cache TTL, and at most
/// a second, so a re-check of Vault is never hidden behind the kernel's caches for long.
pub fn kernel_ttl(cache_ttl: Duration) -> Duration {
    cache_ttl.min(Duration::from_secs(1))
}

/// Cache settings of a volume; the back-off constants are defined here once.
pub fn cache_config(
    ttl: Duration,
    max_stale: Duration,
    vault_timeout: Duration,
    max_entries: usize,
    max_bytes: usize,
) -> CacheConfig {
    CacheConfig {
        ttl,
        max_stale,
        vault_timeout,
        retry_backoff: ttl.min(Duration::from_secs(1)),
        max_retry_backoff: Duration::from_secs(10),
        max_entries: NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
        max_bytes,
    }
}

/// Everything a volume is made of, before it is mounted.
pub struct VolumeConfig {
    /// The volume's name in logs, audit events and metric labels.
    pub name: String,
    /// `namespace/name/uid` of its pod, under CSI.
    pub pod: Option<String>,
    pub auth: Auth,
    pub cache: CacheConfig,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
}

/// A built volume: its Vault identity, cache and filesystem, not yet serving.
pub struct Volume {
    source: Arc<VaultSource>,
    cache: Arc<SecretCache<VaultSource>>,
    fs: Arc<VaultFs<VaultSource>>,
    spec: Arc<VolumeSpec>,
}

impl Volume {
    /// Builds the volume. Sends nothing to Vault.
    pub fn build(
        server: Arc<VaultServer>,
        spec: VolumeSpec,
        config: VolumeConfig,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let source = Arc::new(VaultSource::new(
            server,
            config.auth,
            config.name.clone(),
            metrics.clone(),
        ));
        let kernel_ttl = kernel_ttl(config.cache.ttl);
        let cache = Arc::new(SecretCache::new(
            source.clone(),
            config.cache,
            metrics.clone(),
        ));
        let spec = Arc::new(spec);
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
            },
        ));
        Self {
            source,
            cache,
            fs,
            spec,
        }
    }

    /// The volume's Vault identity (to log in ahead of mounting, say).
    pub fn source(&self) -> &Arc<VaultSource> {
        &self.source
    }

    /// The filesystem to mount.
    pub fn fs(&self) -> Arc<VaultFs<VaultSource>> {
        self.fs.clone()
    }

    pub fn files(&self) -> usize {
        self.spec.entries().len()
    }

    /// Starts serving once `mounted`: the token renewer and the engine detection run until
    /// the volume is torn down.
    pub fn serve(self, mounted: Box<dyn Mounted>) -> Serving {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.source.clone().run_renewer());
        let paths = self.spec.entries().iter().map(|e| e.path.clone()).collect();
        let detect = self.source.clone();
        tasks.spawn(async move { detect.detect_engines(paths).await });
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

/// A mounted volume, serving.
pub struct Serving {
    volume: Volume,
    mounted: Option<Box<dyn Mounted>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Serving {
    /// Hands a fresh login credential to the volume (a CSI republish's token).
    pub fn set_credential(&self, credential: Credential) {
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
