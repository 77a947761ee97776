//! Prometheus metrics (`vaultfs_<subsystem>_<name>`, every name defined here once) and the
//! small HTTP endpoint serving `/metrics` and `/healthz`. Labels carry operation names, error
//! kinds and volume names only, never paths' contents or secret values. The endpoint bounds
//! what a network peer can hold: a cap on connections, a deadline for each request head (also
//! the keep-alive idle limit) and a longest life per connection, so that no number of
//! connections takes the descriptors the daemon needs for kubelet, FUSE and Vault.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::health::Health;

/// FUSE operations that are counted and timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Open,
    Read,
    Release,
    Readdir,
    Write,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Lookup,
        Op::Getattr,
        Op::Open,
        Op::Read,
        Op::Release,
        Op::Readdir,
        Op::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Open => "open",
            Op::Read => "read",
            Op::Release => "release",
            Op::Readdir => "readdir",
            Op::Write => "write",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;
/// Labels of per-volume series: the volume's name as vaultfs logs it.
type VolumeLabels = Vec<(&'static str, String)>;

fn volume_labels(volume: &str) -> VolumeLabels {
    vec![("volume", volume.to_string())]
}

/// One more in `volume`'s series of `family`.
fn count(family: &Family<VolumeLabels, Counter>, volume: &str) {
    family.get_or_create(&volume_labels(volume)).inc();
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~2.6 s
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

/// All metrics of one daemon. Cheap to share; handles are pre-created so hot paths only touch
/// atomics.
pub struct Metrics {
    registry: Registry,
    fuse_ops: Vec<(Counter, Histogram)>,
    fuse_errors: Family<Labels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_stale_serves: Counter,
    pub cache_swaps: Counter,
    vault_requests: Family<Labels, Histogram, fn() -> Histogram>,
    vault_errors: Family<Labels, Counter>,
    pub active_mounts: Gauge,
    /// Vault HTTP requests in flight (all servers, all volumes).
    pub vault_requests_in_flight: Gauge,
    csi_requests: Family<Labels, Histogram, fn() -> Histogram>,
    vault_logins: Family<VolumeLabels, Counter>,
    vault_token_renewals: Family<VolumeLabels, Counter>,
    vault_lease_renewals: Family<VolumeLabels, Counter>,
    reload_signals: Family<VolumeLabels, Counter>,
    reload_signal_failures: Family<VolumeLabels, Counter>,
    /// 1 while a Vault server answers, 0 while it is taken as down, by server address.
    vault_server_up: Family<VolumeLabels, Gauge>,
    /// FUSE requests taken from the kernel and not yet answered (a stopping daemon drains them).
    pub fuse_requests_in_flight: Gauge,
    /// Live FUSE connections this daemon took over from a predecessor (through the keeper).
    pub takeovers: Counter,
    /// Vault tokens this daemon took over from a predecessor instead of logging in.
    pub vault_tokens_taken_over: Counter,
    /// Leased values (with their leases) taken over from a predecessor instead of read anew.
    pub vault_leases_taken_over: Counter,
    /// Volumes' Vault sessions the keeper holds for this daemon's successor.
    pub stashed_sessions: Gauge,
    /// Requests the kernel queued again after a takeover (FUSE_NOTIFY_RESEND): they were in
    /// flight when the predecessor died.
    pub resent_requests: Counter,
    /// How long the last connection taken over had no daemon serving it, in seconds.
    pub takeover_unserved_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Problems the last health check found (`/healthz` answers 503 while there are any).
    pub health_problems: Gauge,
    /// Connections the metrics endpoint serves now (at most `--max-metrics-connections`).
    pub endpoint_connections: Gauge,
    /// Connections the metrics endpoint closed to stay within its cap: the oldest one not
    /// answering a request when a new one came (or the new one, while all were answering).
    pub endpoint_shed_connections: Counter,
    /// Connections the metrics endpoint closed before a whole first request head arrived (none
    /// sent, or sent too slowly), or after outliving their longest life and its grace.
    pub endpoint_timeouts: Counter,
    /// Volumes served now whose files fail with EIO after consecutive daemon crashes.
    pub quarantined_volumes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vaultfs");
        let ops_count = Family::<Labels, Counter>::default();
        let ops_latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let fuse_ops = Op::ALL
            .iter()
            .map(|op| {
                let labels = vec![("op", op.name())];
                (
                    ops_count.get_or_create_owned(&labels),
                    ops_latency.get_or_create_owned(&labels),
                )
            })
            .collect();
        let fuse_errors = Family::<Labels, Counter>::default();
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        let cache_stale_serves = Counter::default();
        let cache_swaps = Counter::default();
        let vault_requests =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let vault_errors = Family::<Labels, Counter>::default();
        let active_mounts = Gauge::default();
        let vault_requests_in_flight = Gauge::default();
        let csi_requests =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("fuse_requests", "FUSE requests by operation", ops_count);
        registry.register(
            "fuse_request_duration_seconds",
            "Time to answer FUSE requests, by operation",
            ops_latency,
        );
        registry.register(
            "fuse_errors",
            "FUSE requests answered with an error, by operation and errno",
            fuse_errors.clone(),
        );
        registry.register(
            "cache_hits",
            "Accesses served from a fresh cache entry",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Accesses that had to ask Vault (first read or expired TTL)",
            cache_misses.clone(),
        );
        registry.register(
            "cache_stale_serves",
            "Accesses served from a stale entry because Vault was unavailable",
            cache_stale_serves.clone(),
        );
        registry.register(
            "cache_swaps",
            "Secrets whose content changed in Vault and was swapped in",
            cache_swaps.clone(),
        );
        registry.register(
            "vault_request_duration_seconds",
            "Vault HTTP requests by kind, with their latency",
            vault_requests.clone(),
        );
        registry.register(
            "vault_errors",
            "Vault requests that failed, by kind and error class",
            vault_errors.clone(),
        );
        registry.register(
            "active_mounts",
            "Mounted vaultfs volumes",
            active_mounts.clone(),
        );
        registry.register(
            "vault_requests_in_flight",
            "Vault HTTP requests in flight",
            vault_requests_in_flight.clone(),
        );
        registry.register(
            "csi_request_duration_seconds",
            "CSI requests by RPC and gRPC status code, with their latency",
            csi_requests.clone(),
        );
        let vault_logins = Family::<VolumeLabels, Counter>::default();
        let vault_token_renewals = Family::<VolumeLabels, Counter>::default();
        let vault_lease_renewals = Family::<VolumeLabels, Counter>::default();
        registry.register(
            "vault_logins",
            "Vault logins sent, by volume",
            vault_logins.clone(),
        );
        registry.register(
            "vault_token_renewals",
            "Vault token renewals (auth/token/renew-self) sent, by volume",
            vault_token_renewals.clone(),
        );
        registry.register(
            "vault_lease_renewals",
            "Vault lease renewals (sys/leases/renew) sent, by volume",
            vault_lease_renewals.clone(),
        );
        let reload_signals = Family::<VolumeLabels, Counter>::default();
        let reload_signal_failures = Family::<VolumeLabels, Counter>::default();
        registry.register(
            "reload_signals",
            "Reload signals sent to processes after a volume's secrets changed, by volume",
            reload_signals.clone(),
        );
        registry.register(
            "reload_signal_failures",
            "Changes of a volume with a reload signal after which no process could be signalled, by volume",
            reload_signal_failures.clone(),
        );
        let fuse_requests_in_flight = Gauge::default();
        let takeovers = Counter::default();
        let vault_tokens_taken_over = Counter::default();
        registry.register(
            "vault_tokens_taken_over",
            "Vault tokens taken over from the previous daemon (through the keeper) instead of logging in again",
            vault_tokens_taken_over.clone(),
        );
        let vault_leases_taken_over = Counter::default();
        registry.register(
            "vault_leases_taken_over",
            "Leased values taken over with their leases from the previous daemon (through the keeper) instead of read anew",
            vault_leases_taken_over.clone(),
        );
        let stashed_sessions = Gauge::default();
        registry.register(
            "keeper_stashed_sessions",
            "Volumes' Vault sessions (token and renewal plan) the keeper holds in memory for the next daemon",
            stashed_sessions.clone(),
        );
        let resent_requests = Counter::default();
        let takeover_unserved_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "fuse_requests_in_flight",
            "FUSE requests taken from the kernel and not yet answered",
            fuse_requests_in_flight.clone(),
        );
        registry.register(
            "takeovers",
            "Live FUSE connections taken over from a predecessor daemon through the keeper",
            takeovers.clone(),
        );
        registry.register(
            "resent_requests",
            "Requests the kernel queued again after a takeover because the predecessor died before answering them",
            resent_requests.clone(),
        );
        registry.register(
            "takeover_unserved_seconds",
            "How long the last connection taken over had no daemon serving it",
            takeover_unserved_seconds.clone(),
        );
        let health_problems = Gauge::default();
        registry.register(
            "health_problems",
            "Mounts gone and FUSE connections not answering, found by the last health check (/healthz answers 503 while above 0)",
            health_problems.clone(),
        );
        let quarantined_volumes = Gauge::default();
        registry.register(
            "quarantined_volumes",
            "Volumes served now whose files fail with EIO because their requests were in flight at consecutive daemon crashes",
            quarantined_volumes.clone(),
        );
        let vault_server_up = Family::<VolumeLabels, Gauge>::default();
        registry.register(
            "vault_server_up",
            "Whether a Vault server answers (1) or is taken as down after a transport failure until a health probe answers (0), by server address",
            vault_server_up.clone(),
        );
        let endpoint_connections = Gauge::default();
        let endpoint_shed_connections = Counter::default();
        let endpoint_timeouts = Counter::default();
        registry.register(
            "metrics_endpoint_connections",
            "Connections the /metrics and /healthz endpoint serves now (at most --max-metrics-connections)",
            endpoint_connections.clone(),
        );
        registry.register(
            "metrics_endpoint_shed_connections",
            "Connections to the /metrics and /healthz endpoint closed because --max-metrics-connections were open: the oldest one not answering a request when a new one came, or the new one while all were answering",
            endpoint_shed_connections.clone(),
        );
        registry.register(
            "metrics_endpoint_timeouts",
            "Connections to the /metrics and /healthz endpoint closed because no whole request head arrived in time (none sent, or sent too slowly), or because they outlived their longest life",
            endpoint_timeouts.clone(),
        );
        Self {
            endpoint_connections,
            endpoint_shed_connections,
            endpoint_timeouts,
            vault_server_up,
            fuse_requests_in_flight,
            takeovers,
            vault_tokens_taken_over,
            vault_leases_taken_over,
            stashed_sessions,
            resent_requests,
            takeover_unserved_seconds,
            registry,
            fuse_ops,
            fuse_errors,
            cache_hits,
            cache_misses,
            cache_stale_serves,
            cache_swaps,
            vault_requests,
            vault_errors,
            active_mounts,
            vault_requests_in_flight,
            csi_requests,
            vault_logins,
            vault_token_renewals,
            vault_lease_renewals,
            reload_signals,
            reload_signal_failures,
            health_problems,
            quarantined_volumes,
        }
    }

    /// The `vaultfs_vault_server_up` series of the server at `addr`.
    pub fn vault_server_up(&self, addr: &str) -> Gauge {
        self.vault_server_up
            .get_or_create_owned(&vec![("server", addr.to_string())])
    }

    pub fn vault_login(&self, volume: &str) {
        count(&self.vault_logins, volume);
    }

    pub fn vault_token_renewal(&self, volume: &str) {
        count(&self.vault_token_renewals, volume);
    }

    pub fn vault_lease_renewal(&self, volume: &str) {
        count(&self.vault_lease_renewals, volume);
    }

    pub fn reload_signal_sent(&self, volume: &str) {
        count(&self.reload_signals, volume);
    }

    pub fn reload_signal_failure(&self, volume: &str) {
        count(&self.reload_signal_failures, volume);
    }

    /// Changes of `volume` after which no process could be signalled so far.
    #[cfg(test)]
    pub fn reload_signal_failures(&self, volume: &str) -> u64 {
        self.reload_signal_failures
            .get_or_create(&volume_labels(volume))
            .get()
    }

    /// Drops a volume's series once the volume is gone, so labels do not pile up.
    pub fn forget_volume(&self, volume: &str) {
        let labels = volume_labels(volume);
        for family in [
            &self.vault_logins,
            &self.vault_token_renewals,
            &self.vault_lease_renewals,
            &self.reload_signals,
            &self.reload_signal_failures,
        ] {
            family.remove(&labels);
        }
    }

    pub fn csi_request(&self, rpc: &'static str, code: &'static str, elapsed: Duration) {
        self.csi_requests
            .get_or_create(&vec![("rpc", rpc), ("code", code)])
            .observe(elapsed.as_secs_f64());
    }

    pub fn fuse_op(&self, op: Op, elapsed: Duration) {
        let (count, latency) = &self.fuse_ops[op as usize];
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }

    pub fn fuse_error(&self, op: Op, errno: &'static str) {
        self.fuse_errors
            .get_or_create(&vec![("op", op.name()), ("errno", errno)])
            .inc();
    }

    pub fn vault_request(&self, kind: &'static str, elapsed: Duration) {
        self.vault_requests
            .get_or_create(&vec![("kind", kind)])
            .observe(elapsed.as_secs_f64());
    }

    pub fn vault_error(&self, kind: &'static str, class: &'static str) {
        self.vault_errors
            .get_or_create(&vec![("kind", kind), ("class", class)])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The address `--metrics-addr HOST:PORT` listens on: an IP address with its port
/// (`0.0.0.0:9100`, `[::1]:9100`), or a host name resolved to its first address
/// (`localhost:9100`). The error says what was expected.
pub fn resolve_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected HOST:PORT, e.g. 0.0.0.0:9100, [::1]:9100 or localhost:9100";
    let well_formed = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !well_formed {
        return Err(format!("{text:?}: {expected}"));
    }
    let mut found = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}; {expected}"))?;
    found
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address; {expected}"))
}

/// Default of `--max-metrics-connections`: far more than Prometheus and kubelet's probes use
/// (one connection each per scrape or probe), far fewer than the descriptors a daemon has.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// Longest wait for a request's head: from a connection's start, and on a kept-alive connection
/// from the end of the previous response (hyper starts the same timer then), so it is also the
/// idle limit between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// After this long a connection is asked to close once its response in progress is written;
/// it is dropped [`HEADER_READ_TIMEOUT`] later whatever it is doing (a peer that never reads
/// its answer, a request body that never ends).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30);

/// Connections shed (or failed accepts) closer together than this form one burst, logged once.
const BURST_GAP: Duration = Duration::from_secs(10);

/// Pause after an accept fails for want of descriptors or memory: the error would repeat at
/// once, so retrying without a pause only burns a core.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What one peer may hold of the metrics endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Connections served at once (`--max-metrics-connections`). A new one past it closes the
    /// oldest connection not answering a request (idle, or still sending its request), so a
    /// flood of idle connections cannot keep a probe or a scrape out; while every connection
    /// is answering, the new one is closed instead. Counted in
    /// `vaultfs_metrics_endpoint_shed_connections_total`.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`MAX_CONNECTION_AGE`].
    pub max_connection_age: Duration,
}

impl EndpointLimits {
    /// `max_connections` with the fixed timeouts.
    pub fn new(max_connections: usize) -> Self {
        Self {
            max_connections,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
        }
    }
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// Events closer together than [`BURST_GAP`] are one burst; only its first is reported.
#[derive(Default)]
struct Burst {
    last: Option<tokio::time::Instant>,
}

impl Burst {
    /// Records an event now; true if it starts a burst.
    fn starts(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let starts = self.last.is_none_or(|last| now - last >= BURST_GAP);
        self.last = Some(now);
        starts
    }
}

/// Whether a failed `accept` concerns only the connection being accepted (the peer gave up
/// before it was accepted), not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The `/metrics` and `/healthz` routes; any other path is 404.
fn routes(metrics: Arc<Metrics>, health: Arc<Health>) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || async move {
                match health.status() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                    Err(problems) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {problems}\n"),
                    ),
                }
            }),
        )
}

/// A connection being served, as the accept loop sees it.
struct Served {
    task: tokio::task::JoinHandle<()>,
    /// Set while one of its requests is being answered: it is not shed then.
    answering: Arc<AtomicBool>,
}

/// The connections being served, oldest first. Dropping it closes them all.
#[derive(Default)]
struct Connections(VecDeque<Served>);

impl Drop for Connections {
    fn drop(&mut self) {
        for connection in &self.0 {
            connection.task.abort();
        }
    }
}

impl Connections {
    /// Whether `max` connections are being served (forgetting those that ended).
    fn is_full(&mut self, max: usize) -> bool {
        self.0.retain(|c| !c.task.is_finished());
        self.0.len() >= max
    }

    /// Closes the oldest connection not answering a request and waits until its socket is
    /// closed, so that the descriptors in use never exceed the cap. False if every connection
    /// is answering.
    async fn shed_oldest_idle(&mut self) -> bool {
        let Some(oldest_idle) = self
            .0
            .iter()
            .position(|c| !c.answering.load(Ordering::Relaxed))
        else {
            return false;
        };
        let shed = self
            .0
            .remove(oldest_idle)
            .expect("a position within the queue");
        shed.task.abort();
        // Cancelled (or ended just now): either way its socket is closed once this returns.
        let _ = shed.task.await;
        true
    }
}

/// Serves `GET /metrics` and `GET /healthz` (HTTP/1.1, keep-alive) on `listener` within
/// `limits` until the task is dropped, which closes every connection it serves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    limits: EndpointLimits,
) {
    let routes = routes(metrics.clone(), health);
    let mut connections = Connections::default();
    let (mut shedding, mut accept_failures) = (Burst::default(), Burst::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if accept_failures.starts() {
                    tracing::warn!(
                        error = %e,
                        "the metrics endpoint cannot accept connections; retrying every 100 ms"
                    );
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if connections.is_full(limits.max_connections) {
            metrics.endpoint_shed_connections.inc();
            if shedding.starts() {
                tracing::warn!(
                    max_metrics_connections = limits.max_connections,
                    "the metrics endpoint serves its most connections (--max-metrics-connections): each new one closes the oldest idle one; counted in vaultfs_metrics_endpoint_shed_connections_total, logged once per burst"
                );
            }
            if !connections.shed_oldest_idle().await {
                drop(stream);
                continue;
            }
        }
        let answering = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(serve_connection(
            stream,
            routes.clone(),
            limits,
            metrics.clone(),
            answering.clone(),
        ));
        connections.0.push_back(Served { task, answering });
    }
}

/// One connection's requests, until the peer closes it or a limit does.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    routes: axum::Router,
    limits: EndpointLimits,
    metrics: Arc<Metrics>,
    answering: Arc<AtomicBool>,
) {
    /// Counts the connection open for as long as it lives (also when its task is aborted).
    struct Open(Gauge);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    metrics.endpoint_connections.inc();
    let _open = Open(metrics.endpoint_connections.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Whether a whole request head arrived: a timeout before that is a peer holding a slot
    // (idle from the start, or sending slowly); one after is a kept-alive connection's end.
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let (routes, requested) = (
            hyper_util::service::TowerToHyperService::new(routes),
            requested.clone(),
        );
        hyper::service::service_fn(move |request| {
            requested.store(true, Ordering::Relaxed);
            answering.store(true, Ordering::Relaxed);
            let (answer, answering) = (
                hyper::service::Service::call(&routes, request),
                answering.clone(),
            );
            async move {
                let answer = answer.await;
                answering.store(false, Ordering::Relaxed);
                answer
            }
        })
    };
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = tokio::time::sleep(limits.max_connection_age) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_read_timeout, connection).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    metrics.endpoint_timeouts.inc();
                    tracing::debug!("a metrics connection outlived its longest life; dropped");
                    return;
                }
            }
        }
    };
    if let Err(e) = outcome {
        if e.is_timeout() && !requested.load(Ordering::Relaxed) {
            metrics.endpoint_timeouts.inc();
        }
        tracing::debug!(error = %e, "a metrics connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_subsystem_with_the_prefix() {
        let m = Metrics::new();
        m.fuse_op(Op::Read, Duration::from_micros(20));
        m.fuse_error(Op::Open, "EIO");
        m.vault_request("read", Duration::from_millis(3));
        m.cache_hits.inc();
        m.csi_request("NodePublishVolume", "OK", Duration::from_millis(5));
        m.vault_login("ns/pod/vol-1");
        m.vault_token_renewal("ns/pod/vol-1");
        m.vault_lease_renewal("ns/pod/vol-1");
        m.vault_server_up("https://vault.example:8200").set(1);
        m.reload_signal_sent("ns/pod/vol-1");
        m.reload_signal_failure("ns/pod/vol-1");
        let text = m.render();
        for name in [
            "vaultfs_fuse_requests_total{op=\"read\"} 1",
            "vaultfs_fuse_errors_total{op=\"open\",errno=\"EIO\"} 1",
            "vaultfs_vault_request_duration_seconds_count{kind=\"read\"} 1",
            "vaultfs_cache_hits_total 1",
            "vaultfs_active_mounts 0",
            "vaultfs_csi_request_duration_seconds_count{rpc=\"NodePublishVolume\",code=\"OK\"} 1",
            "vaultfs_vault_logins_total{volume=\"ns/pod/vol-1\"} 1",
            "vaultfs_vault_token_renewals_total{volume=\"ns/pod/vol-1\"} 1",
            "vaultfs_vault_lease_renewals_total{volume=\"ns/pod/vol-1\"} 1",
            "vaultfs_vault_server_up{server=\"https://vault.example:8200\"} 1",
            "vaultfs_reload_signals_total{volume=\"ns/pod/vol-1\"} 1",
            "vaultfs_reload_signal_failures_total{volume=\"ns/pod/vol-1\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        m.forget_volume("ns/pod/vol-1");
        assert!(
            !m.render().contains("ns/pod/vol-1"),
            "a gone volume's series are dropped"
        );
    }

    #[test]
    fn listen_addresses_may_name_a_host_and_must_name_a_port() {
        assert_eq!(
            resolve_listen_addr("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(
            resolve_listen_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().unwrap())
        );
        let local = resolve_listen_addr("localhost:9100").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 9100, "{local}");
        for bad in [
            "localhost",
            "localhost:",
            ":9100",
            "localhost:99999",
            "9100",
        ] {
            let err = resolve_listen_addr(bad).unwrap_err();
            assert!(err.contains("expected HOST:PORT"), "{bad}: {err}");
        }
        let err = resolve_listen_addr("vaultfs-test.invalid:9100").unwrap_err();
        assert!(
            err.contains("cannot resolve \"vaultfs-test.invalid:9100\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn one_connection_serves_metrics_and_health_until_unhealthy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (metrics, health) = (Arc::new(Metrics::new()), Arc::new(Health::new()));
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            health.clone(),
            EndpointLimits::default(),
        ));
        // Requests pipelined on one kept-alive connection; the last one closes it.
        let get = |paths: &'static [&'static str]| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut requests = String::new();
            for (i, path) in paths.iter().enumerate() {
                let close = if i + 1 == paths.len() {
                    "connection: close\r\n"
                } else {
                    ""
                };
                requests.push_str(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n{close}\r\n"));
            }
            stream.write_all(requests.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let both = get(&["/healthz", "/metrics"]).await;
        assert!(both.starts_with("HTTP/1.1 200 OK"), "{both}");
        assert!(both.contains("\r\n\r\nok\nHTTP/1.1 200 OK"), "{both}");
        assert!(
            both.contains("# TYPE vaultfs_health_problems gauge"),
            "{both}"
        );
        assert!(both.ends_with("# EOF\n"), "{both}");
        health.publish(vec![crate::health::Problem::Gone(
            "v: the mount at /mnt/s is gone".into(),
        )]);
        let bad = get(&["/healthz"]).await;
        assert!(bad.starts_with("HTTP/1.1 503 "), "{bad}");
        assert!(
            bad.ends_with("unhealthy: v: the mount at /mnt/s is gone\n"),
            "{bad}"
        );
        let missing = get(&["/secret"]).await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        server.abort();
    }

    /// The endpoint on a loopback port with `limits`: its address, metrics and task.
    async fn endpoint(
        limits: EndpointLimits,
    ) -> (
        std::net::SocketAddr,
        Arc<Metrics>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            Arc::new(Health::new()),
            limits,
        ));
        (addr, metrics, server)
    }

    /// Short timeouts, so that a test waits for each in well under a second.
    fn short(max_connections: usize) -> EndpointLimits {
        EndpointLimits {
            max_connections,
            header_read_timeout: Duration::from_millis(200),
            max_connection_age: Duration::from_millis(800),
        }
    }

    /// Reads `stream` until the server closes it (end of file or reset); what it read and
    /// how long that took. Panics if it stays open for 10 s.
    async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (String, Duration) {
        use tokio::io::AsyncReadExt;
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!(
                    "the server kept the connection open for 10 s; it sent {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    }

    /// Connects to `addr`, writes `first`, then `each` every `every` until the connection
    /// fails: the connection's read half and the writing task.
    async fn keep_writing(
        addr: std::net::SocketAddr,
        first: &'static [u8],
        each: &'static [u8],
        every: Duration,
    ) -> (
        tokio::net::tcp::OwnedReadHalf,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        use tokio::io::AsyncWriteExt;
        let (reader, mut writer) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        let writing = tokio::spawn(async move {
            writer.write_all(first).await?;
            loop {
                tokio::time::sleep(every).await;
                writer.write_all(each).await?;
            }
        });
        (reader, writing)
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (addr, metrics, server) = endpoint(short(4)).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (answer, after) = until_closed(&mut idle).await;
        eprintln!("a connection that sent nothing was closed after {after:?}");
        assert_eq!(answer, "", "no answer to no request");
        assert!(
            after >= Duration::from_millis(150),
            "closed early: {after:?}"
        );
        assert_eq!(metrics.endpoint_timeouts.get(), 1);
        server.abort();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_once_idle_for_the_header_timeout() {
        use tokio::io::AsyncWriteExt;
        let (addr, metrics, server) = endpoint(short(4)).await;
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (answer, after) = until_closed(&mut kept).await;
        eprintln!("a kept-alive connection was closed {after:?} after its request");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        assert_eq!(
            metrics.endpoint_timeouts.get(),
            0,
            "closing an idle kept-alive connection is no timeout"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_slow_header_sender_is_closed_after_the_header_timeout() {
        let (addr, metrics, server) = endpoint(short(4)).await;
        // One header byte every 20 ms: never idle, never a whole head.
        let (mut reader, trickle) = keep_writing(
            addr,
            b"GET /healthz HTTP/1.1\r\n",
            b"x",
            Duration::from_millis(20),
        )
        .await;
        let (answer, after) = until_closed(&mut reader).await;
        eprintln!("a slow header sender was closed after {after:?}");
        assert_eq!(answer, "");
        assert_eq!(metrics.endpoint_timeouts.get(), 1);
        trickle.abort();
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_connection_is_closed_after_its_longest_life() {
        use tokio::io::AsyncWriteExt;
        let (addr, metrics, server) = endpoint(short(4)).await;
        // A request every 50 ms: never idle for the header timeout.
        let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
        let (mut reader, requests) =
            keep_writing(addr, request, request, Duration::from_millis(50)).await;
        let (answers, after) = until_closed(&mut reader).await;
        let served = answers.matches("HTTP/1.1 200 OK").count();
        eprintln!("a busy connection was closed after {after:?} and {served} answers");
        assert!(served > 1, "{answers}");
        requests.abort();
        // A peer that asks and never reads keeps the answer from being written: the
        // connection is dropped one header timeout after its life.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut deaf = socket.connect(addr).await.unwrap();
        deaf.write_all(&b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".repeat(200))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        while metrics.endpoint_connections.get() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while metrics.endpoint_connections.get() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a peer that never reads held its connection for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "a peer that never read its answers was dropped after {:?}",
            started.elapsed()
        );
        assert_eq!(metrics.endpoint_timeouts.get(), 1, "counted as a timeout");
        drop(deaf);
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn sheddings_less_than_ten_seconds_apart_are_one_burst_logged_once() {
        let mut burst = Burst::default();
        assert!(burst.starts(), "the first one starts a burst");
        for _ in 0..100 {
            tokio::time::advance(Duration::from_secs(9)).await;
            assert!(
                !burst.starts(),
                "one 9 s after the last one is the same burst"
            );
        }
        tokio::time::advance(BURST_GAP).await;
        assert!(burst.starts(), "one after 10 s of none starts a new burst");
    }

    /// Waits until the endpoint serves `n` connections.
    async fn serving(metrics: &Metrics, n: i64) {
        let started = tokio::time::Instant::now();
        while metrics.endpoint_connections.get() != n {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the endpoint serves {} connections, not {n}",
                metrics.endpoint_connections.get()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `GET /healthz` on a new connection: the answer, or "" if the connection was closed
    /// without one.
    async fn healthz(addr: std::net::SocketAddr) -> String {
        use tokio::io::AsyncWriteExt;
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut probe).await.0
    }

    #[tokio::test]
    async fn a_new_connection_past_the_cap_closes_the_oldest_idle_one() {
        let limits = EndpointLimits {
            header_read_timeout: Duration::from_secs(60),
            ..EndpointLimits::new(2)
        };
        let (addr, metrics, server) = endpoint(limits).await;
        let mut oldest = tokio::net::TcpStream::connect(addr).await.unwrap();
        serving(&metrics, 1).await;
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        serving(&metrics, 2).await;
        let answer = healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let (nothing, after) = until_closed(&mut oldest).await;
        eprintln!("the oldest idle connection was closed {after:?} after a probe came");
        assert_eq!(nothing, "");
        assert_eq!(metrics.endpoint_shed_connections.get(), 1);
        // A flood of idle connections, held: each closes the oldest, and a probe still gets in.
        let mut flood = Vec::new();
        for _ in 0..50 {
            flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let answer = healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            metrics.endpoint_shed_connections.get() >= 50,
            "{}",
            metrics.endpoint_shed_connections.get()
        );
        assert!(metrics.endpoint_connections.get() <= 2);
        let text = metrics.render();
        assert!(
            text.contains("vaultfs_metrics_endpoint_shed_connections_total "),
            "{text}"
        );
        server.abort();
    }
}
