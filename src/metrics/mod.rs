//! Prometheus metrics (`vaultfs_<subsystem>_<name>`, every name defined here once): the
//! families, their registry and the calls that count into them. Labels carry operation names,
//! error kinds and volume names only, never paths' contents or secret values. The HTTP endpoint
//! that serves them is `endpoint`.

mod endpoint;

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use endpoint::{
    resolve_listen_addr, serve, EndpointLimits, DEFAULT_MAX_CONNECTIONS, HEADER_READ_TIMEOUT,
    MAX_CONNECTION_AGE,
};

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
    /// Certificates whose renewal kept failing until they expired.
    pub certificates_expired: Counter,
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
        let certificates_expired = Counter::default();
        registry.register(
            "certificates_expired",
            "Certificates (pki entries) that expired before a new one could be issued (Vault refused or was unavailable at every attempt)",
            certificates_expired.clone(),
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
            certificates_expired,
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
}
