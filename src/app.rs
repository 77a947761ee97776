//! The daemons' wiring: turns parsed settings into a running `vaultfs mount` (one volume on
//! its own connection) or `vaultfs csi` (the node plugin: keeper link, quarantine, the restart
//! hand-over, recovery, the CSI socket, health and metrics), and stops each cleanly on
//! SIGINT/SIGTERM. The one place that starts the parts of a daemon in their order; what each
//! part does lives in its module (`volume`, `csi`, `mount`, `mount::TakenOver`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::fs::Consistency;
use crate::health::{Health, Watched, Watchlist};
use crate::metrics::{self, Metrics};
use crate::mount::keeper_link::KeeperLink;
use crate::mount::{self, KernelNotifier, MountConfig};
use crate::quarantine::{Quarantine, QuarantineConfig};
use crate::slot::Slot;
use crate::source::vault::{
    Auth, ServerConfig, ServerLimits, VaultServer, VaultServers, VaultSource,
};
use crate::spec::VolumeSpec;
use crate::volume::{Volume, VolumeConfig};

/// What every daemon (`vaultfs mount`, `vaultfs csi`) is given beyond its own job.
pub struct DaemonSettings {
    /// Bounds on each Vault server's traffic and answers.
    pub limits: ServerLimits,
    pub lock_memory: bool,
    pub metrics_addr: Option<SocketAddr>,
    /// `--max-metrics-connections`.
    pub max_metrics_connections: usize,
}

/// Everything `vaultfs mount` needs, already parsed and validated.
pub struct MountSettings {
    pub mountpoint: PathBuf,
    pub spec: VolumeSpec,
    pub vault: ServerConfig,
    pub auth: Auth,
    /// The volume (named after its mount point, no pod), as built.
    pub volume: VolumeConfig,
    pub allow_other: bool,
    pub daemon: DaemonSettings,
}

/// Hardens the process before any secret is in memory.
pub fn harden(lock_memory: bool) -> anyhow::Result<()> {
    crate::sys::disable_core_dumps().context("disabling core dumps")?;
    if lock_memory {
        crate::sys::lock_memory().context("locking memory (--lock-memory)")?;
    }
    Ok(())
}

/// Raises the descriptor limit (`RLIMIT_NOFILE`) soft to hard, as the first thing a daemon
/// does (logged at debug; the limit in force is in the `serving /metrics` line). Containers
/// often start with a soft limit of 1,024; the daemon's own needs (the CSI socket and kubelet's
/// connections, the FUSE connections, the keeper, Vault connections) stay far below it, and
/// the metrics endpoint's connections are capped (`--max-metrics-connections`), so no peer can
/// take the rest.
pub fn raise_descriptor_limit() {
    match crate::sys::raise_open_files_limit() {
        Ok(before) => tracing::debug!(
            soft = before.soft,
            hard = before.hard,
            "descriptor limit (RLIMIT_NOFILE) set to its hard limit"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot raise the descriptor limit (RLIMIT_NOFILE); serving within the current one"
        ),
    }
}

/// Serves one volume in the foreground until SIGINT or SIGTERM, then unmounts and revokes
/// the token vaultfs obtained.
pub async fn run_mount(settings: MountSettings) -> anyhow::Result<()> {
    let MountSettings {
        mountpoint,
        spec,
        vault,
        auth,
        volume,
        allow_other,
        daemon,
    } = settings;
    harden(daemon.lock_memory)?;
    let metrics = Arc::new(Metrics::new());
    let server = Arc::new(VaultServer::with_limits(&vault, daemon.limits)?);
    server.set_up_gauge(metrics.vault_server_up(server.addr()));
    let source = VaultSource::new(server, auth, volume.name.clone(), metrics.clone());
    let kernel = KernelNotifier::new();
    let volume = Volume::build(
        Arc::new(source),
        spec,
        volume,
        kernel.for_volume(Slot::SINGLE),
        &metrics,
    );

    let shutdown = shutdown_signal()?;
    // Before mounting: a port in use fails at once, with nothing mounted.
    let metrics_listener = bind_metrics(&daemon).await?;
    let mounted = mount::mount(
        volume.fs(),
        &mountpoint,
        &MountConfig {
            allow_other,
            create_target: false,
        },
        tokio::runtime::Handle::current(),
        metrics.clone(),
        &kernel,
    )?;
    tracing::info!(
        mountpoint = %mountpoint.display(),
        files = volume.files(),
        "serving secrets; nothing is fetched until a file is read"
    );
    let serving = volume.serve(Box::new(mounted));
    let health = Arc::new(Health::stopping_when_gone());
    let mut background = tokio::task::JoinSet::new();
    spawn_metrics(&mut background, metrics_listener, &metrics, &health);
    background.spawn(watch_mount(health.clone(), metrics.clone(), mountpoint));
    let gone = tokio::select! {
        () = shutdown => None,
        // Seen by a probe of /healthz until the process is gone.
        reason = health.gone() => Some(reason),
    };
    let unmounted = serving.tear_down().await;
    background.abort_all();
    if let Some(reason) = gone {
        anyhow::bail!("{reason}; stopped");
    }
    unmounted.context("unmounting")?;
    Ok(())
}

/// Checks the mount at `mountpoint` (mounted just before) for `/healthz`: gone once it is not
/// the one this process mounted (unmounted from outside, `umount -l`, or another mount's id in
/// its place), unhealthy while it does not answer.
async fn watch_mount(health: Arc<Health>, metrics: Arc<Metrics>, mountpoint: PathBuf) {
    let target = crate::sys::canonical_target(&mountpoint).unwrap_or(mountpoint);
    let probe = target.clone();
    let id = tokio::task::spawn_blocking(move || crate::sys::mount_id(&probe))
        .await
        .ok()
        .flatten();
    let watched = Watched {
        name: String::new(),
        target: target.clone(),
        id,
    };
    crate::health::monitor(health, metrics.health_problems.clone(), move || Watchlist {
        mounts: vec![watched.clone()],
        connections: vec![target.clone()],
    })
    .await;
}

/// The listener of `--metrics-addr`, if given, bound at once, with the limits it serves within.
async fn bind_metrics(
    daemon: &DaemonSettings,
) -> anyhow::Result<Option<(tokio::net::TcpListener, metrics::EndpointLimits)>> {
    let Some(addr) = daemon.metrics_addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
    Ok(Some((
        listener,
        metrics::EndpointLimits::new(daemon.max_metrics_connections),
    )))
}

/// Serves `/metrics` and `/healthz` on `listener`, if any, as a task of `background`.
fn spawn_metrics(
    background: &mut tokio::task::JoinSet<()>,
    listener: Option<(tokio::net::TcpListener, metrics::EndpointLimits)>,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) {
    if let Some((listener, limits)) = listener {
        if let Ok(addr) = listener.local_addr() {
            let descriptor_limit = crate::sys::open_files_limit().map_or(0, |l| l.soft);
            tracing::info!(
                %addr,
                max_connections = limits.max_connections,
                descriptor_limit,
                "serving /metrics and /healthz"
            );
        }
        background.spawn(metrics::serve(
            listener,
            metrics.clone(),
            health.clone(),
            limits,
        ));
    }
}

/// Completes on the first SIGTERM or SIGINT. Installs the handlers at once, so a signal that
/// arrives before the future is polled is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Waits until every FUSE request taken from the kernel has been answered (or `timeout`), so
/// that a stopping daemon leaves nothing half-answered; requests the kernel hands out meanwhile
/// are answered too.
async fn drain(metrics: &Metrics, timeout: Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let in_flight = metrics.fuse_requests_in_flight.get();
        if in_flight <= 0 {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "no FUSE request in flight"
            );
            return;
        }
        if started.elapsed() >= timeout {
            tracing::warn!(
                in_flight,
                "stopping with FUSE requests unanswered (--drain-timeout); a successor asks the kernel to resend them where the kernel supports it"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Everything `vaultfs csi` needs, already parsed and validated.
pub struct CsiSettings {
    pub endpoint: String,
    /// Where the node's FUSE connections are mounted (`--connections-dir`).
    pub connections_dir: PathBuf,
    /// Vault servers by name (`""`: the default); `csi.servers` holds their names.
    pub servers: Vec<(String, ServerConfig)>,
    /// What the node's volumes may be and hold (node id and state directory included).
    pub csi: crate::csi::CsiConfig,
    /// The keeper holding the node's FUSE connection across restarts (`--keeper-socket`).
    pub keeper_socket: Option<PathBuf>,
    pub keeper_wait: Duration,
    /// Longest SIGTERM waits for FUSE requests in flight.
    pub drain_timeout: Duration,
    /// First back-off of a volume quarantined after consecutive crashes (zero: no quarantine).
    pub quarantine_backoff: Duration,
    pub daemon: DaemonSettings,
}

/// The quarantine of crash-looping volumes (`--quarantine-backoff`; none when zero), opened
/// once the previous daemon is gone. One that cannot be opened is logged and done without:
/// serving every volume matters more than catching a crash loop.
async fn open_quarantine(settings: &CsiSettings, metrics: &Metrics) -> Option<Arc<Quarantine>> {
    if settings.quarantine_backoff.is_zero() {
        return None;
    }
    let config = QuarantineConfig {
        backoff: settings.quarantine_backoff,
        // A predecessor stopping on SIGTERM drains for at most --drain-timeout.
        wait: settings.drain_timeout + Duration::from_secs(5),
    };
    let (dir, gauge) = (
        settings.csi.state_dir.clone(),
        metrics.quarantined_volumes.clone(),
    );
    let opened = tokio::task::spawn_blocking(move || Quarantine::open(&dir, config, gauge))
        .await
        .map_err(std::io::Error::other)
        .and_then(|opened| opened);
    match opened {
        Ok(quarantine) => Some(Arc::new(quarantine)),
        Err(e) => {
            tracing::error!(
                state_dir = %settings.csi.state_dir.display(),
                error = %e,
                "cannot count FUSE requests in flight in the state directory: a volume that crashes the daemon again and again is not quarantined"
            );
            None
        }
    }
}

/// Makes the connections directory `dir` owner-only, as `make_dir_private` does, when it holds
/// nothing but the connections' mount points (a hostPath kubelet created 0755, say); a directory
/// holding anything else is left as it is, with a warning when others may enter it. Returns it
/// resolved, as the mount table shows it.
fn make_connections_dir_private(dir: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let ours = |name: &std::ffi::OsStr| {
        [Consistency::Strict, Consistency::Cached]
            .into_iter()
            .any(|c| name == crate::mount::connection_dir_name(c))
    };
    let only_ours = std::fs::read_dir(dir)?.all(|e| e.is_ok_and(|e| ours(&e.file_name())));
    if only_ours {
        crate::csi::make_dir_private(dir, "the connections directory (every volume's files)")?;
    } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "--connections-dir holds other files and others may enter it: left as it is; give vaultfs a directory of its own");
    }
    std::fs::canonicalize(dir)
}

/// Serves the CSI node plugin until SIGINT or SIGTERM. Published volumes stay recorded in the
/// state directory; the next daemon serves them again.
pub async fn run_csi(settings: CsiSettings) -> anyhow::Result<()> {
    harden(settings.daemon.lock_memory)?;
    // First: a SIGTERM while starting (taking over, recovering) must not kill the process
    // before it can stop cleanly.
    let shutdown = shutdown_signal()?;
    let metrics = Arc::new(Metrics::new());
    let mut servers = std::collections::HashMap::new();
    for (name, config) in &settings.servers {
        let server =
            VaultServer::with_limits(config, settings.daemon.limits).with_context(|| {
                format!(
                    "Vault server {:?}",
                    if name.is_empty() { "default" } else { name }
                )
            })?;
        server.set_up_gauge(metrics.vault_server_up(server.addr()));
        servers.insert(name.clone(), Arc::new(server));
    }
    let servers = VaultServers::new(servers);
    // Before taking over or recovering any mount: a port in use fails at once.
    let metrics_listener = bind_metrics(&settings.daemon).await?;
    crate::csi::make_dir_private(
        &settings.csi.state_dir,
        "the state directory (service-account tokens)",
    )
    .with_context(|| format!("--state-dir {}", settings.csi.state_dir.display()))?;
    if !crate::sys::is_tmpfs(&settings.csi.state_dir) {
        tracing::warn!(
            state_dir = %settings.csi.state_dir.display(),
            "the state directory is not on tmpfs: service-account tokens recorded there may reach disk; use a tmpfs host directory such as /run/vaultfs"
        );
    }
    // Before anything is served: the volumes the previous daemons died with.
    let quarantine = open_quarantine(&settings, &metrics).await;
    // Resolved, so that the mount table (which shows resolved paths) finds the mounts there.
    let connections_dir = make_connections_dir_private(&settings.connections_dir)
        .with_context(|| format!("--connections-dir {}", settings.connections_dir.display()))?;
    let socket = crate::csi::socket_path(&settings.endpoint)
        .map_err(anyhow::Error::msg)?
        .to_path_buf();
    let keeper = match settings.keeper_socket.clone() {
        Some(path) => {
            let (wait, metrics) = (settings.keeper_wait, metrics.clone());
            let shown = path.display().to_string();
            Some(
                tokio::task::spawn_blocking(move || KeeperLink::connect(&path, wait, metrics))
                    .await
                    .context("connecting to the keeper")?
                    .with_context(|| format!("the keeper at {shown} (--keeper-socket) does not let this daemon in; not mounting over a connection it may hold"))?,
            )
        }
        None => None,
    };
    let link = keeper.clone();
    let sessions = keeper
        .clone()
        .map(|k| k as Arc<dyn crate::source::SessionStore>);
    let mounter = Arc::new(
        crate::mount::FuseMounter::new(
            tokio::runtime::Handle::current(),
            metrics.clone(),
            connections_dir,
            keeper,
        )
        .with_quarantine(quarantine.clone()),
    );
    // The restart hand-over (see `mount::TakenOver`): the connections the keeper holds for
    // the predecessor are taken now, every recorded volume is adopted into them while the
    // volumes are recovered, and they are served last.
    let taking = mounter.clone();
    let taken = tokio::task::spawn_blocking(move || taking.take_over())
        .await
        .context("taking over from the keeper")?
        .context("taking the node connection from the keeper; not mounting over a connection it may hold")?;
    let manager = Arc::new(
        crate::csi::VolumeManager::with_identities(
            settings.csi,
            servers.connector(metrics.clone()),
            mounter.clone(),
            metrics.clone(),
        )
        .with_sessions(sessions),
    );
    let recovered = manager.recover(taken.as_ref()).await;
    let taken_over = taken.is_some();
    if let Some(taken) = taken {
        tokio::task::spawn_blocking(move || taken.serve())
            .await
            .context("serving the node connection taken over from the keeper")?
            .context("serving the node connection taken over from the keeper (released and aborted: the next start mounts anew)")?;
    }
    if recovered > 0 {
        tracing::info!(
            recovered,
            taken_over,
            "serving volumes recorded by an earlier daemon again"
        );
    }
    let health = Arc::new(Health::new());
    let mut background = tokio::task::JoinSet::new();
    spawn_metrics(&mut background, metrics_listener, &metrics, &health);
    if let Some(quarantine) = &quarantine {
        background.spawn(quarantine.clone().lift_when_due());
    }
    let (watched, connections) = (manager.clone(), mounter.clone());
    background.spawn(crate::health::monitor(
        health,
        metrics.health_problems.clone(),
        move || Watchlist {
            mounts: watched.watched(),
            connections: connections.served_roots(),
        },
    ));
    crate::csi::serve(manager.clone(), &socket, shutdown).await?;
    drain(&metrics, settings.drain_timeout).await;
    background.abort_all();
    let kept = manager.release_for_restart();
    if kept == 0 {
        mounter.retire_unused();
    }
    if let Some(link) = &link {
        // The successor takes the sessions as they are now.
        link.flush(Duration::from_secs(1));
    }
    tracing::info!(
        volumes = kept,
        "stopped; published volumes are recorded for the next start"
    );
    if let Some(quarantine) = &quarantine {
        quarantine.exit_cleanly();
    }
    if settings.keeper_socket.is_some() {
        // Exit without unwinding: dropping the runtime would drop the replies of requests
        // still in flight, and fuser answers a dropped reply with EIO. Left unanswered, they
        // are resent to the successor, which serves the connection the keeper holds.
        std::process::exit(0);
    }
    Ok(())
}
