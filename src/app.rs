//! Wiring: turns command-line settings into a running, mounted volume and tears it down on
//! SIGINT/SIGTERM. The only module that assembles source, cache, fs and mount together.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::cache::{CacheConfig, SecretCache};
use crate::fs::{FsConfig, VaultFs};
use crate::metrics::{self, Metrics};
use crate::mount::{self, Invalidator, MountConfig};
use crate::source::vault::{VaultConfig, VaultSource};
use crate::spec::VolumeSpec;

/// Everything `vaultfs mount` needs, already parsed and validated.
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub spec: VolumeSpec,
    pub vault: VaultConfig,
    pub cache: CacheConfig,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub allow_other: bool,
    pub lock_memory: bool,
    pub metrics_addr: Option<SocketAddr>,
}

/// Hardens the process before any secret is in memory.
pub fn harden(lock_memory: bool) -> anyhow::Result<()> {
    crate::sys::disable_core_dumps().context("disabling core dumps")?;
    if lock_memory {
        crate::sys::lock_memory().context("locking memory (--lock-memory)")?;
    }
    Ok(())
}

/// Serves one volume in the foreground until SIGINT or SIGTERM, then unmounts and revokes
/// the token vaultfs obtained.
pub async fn run_mount(settings: MountSettings) -> anyhow::Result<()> {
    harden(settings.lock_memory)?;
    let metrics = Arc::new(Metrics::new());
    let source = Arc::new(VaultSource::new(settings.vault, metrics.clone())?);
    let cache = Arc::new(SecretCache::new(
        source.clone(),
        settings.cache.clone(),
        metrics.clone(),
    ));
    let invalidator = Invalidator::new();
    let (invalidate, notifier) = invalidator.for_volume();
    let fs_config = FsConfig {
        volume: settings.mountpoint.display().to_string(),
        uid: settings.uid,
        gid: settings.gid,
        file_mode: settings.file_mode,
        kernel_ttl: kernel_ttl(settings.cache.ttl),
    };
    let spec = Arc::new(settings.spec);
    let fs = Arc::new(VaultFs::new(
        spec.clone(),
        cache.clone(),
        fs_config,
        invalidate,
    ));

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mounted = mount::mount(
        fs,
        &notifier,
        &settings.mountpoint,
        &MountConfig {
            allow_other: settings.allow_other,
        },
        tokio::runtime::Handle::current(),
        metrics.clone(),
    )?;
    tracing::info!(
        mountpoint = %settings.mountpoint.display(),
        files = spec.entries().len(),
        "serving secrets; nothing is fetched until a file is read"
    );

    let mut background = tokio::task::JoinSet::new();
    background.spawn(source.clone().run_renewer());
    let paths = spec.entries().iter().map(|e| e.path.clone()).collect();
    let detect = source.clone();
    background.spawn(async move { detect.detect_engines(paths).await });
    if let Some(addr) = settings.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        background.spawn(metrics::serve(listener, metrics.clone()));
    }

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    background.abort_all();
    let unmounted = mounted.unmount();
    source.revoke().await;
    cache.clear();
    unmounted.context("unmounting")?;
    Ok(())
}

/// How long the kernel may cache names and attributes: never longer than the cache TTL, so
/// the first access after the TTL reaches vaultfs and re-checks Vault.
pub fn kernel_ttl(cache_ttl: Duration) -> Duration {
    cache_ttl.min(Duration::from_secs(1))
}

/// Cache settings from command-line values.
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
        max_entries: NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN),
        max_bytes,
    }
}
