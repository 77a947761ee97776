//! One Vault server under `VaultSource`: its address, HTTP client (TLS, no redirects), traffic
//! caps and body cap; request URLs built segment by segment; what a request is for
//! (`RequestKind`). Each request's exchange is `exchange`'s. Knows nothing of auth methods or
//! engines; the token to send is the caller's.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use reqwest::{Method, Url};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use super::engine::ServerMounts;
use super::exchange::{kib, Exchange, Pending, ANSWER_BUDGET_BYTES, CLEANUP_TIMEOUT};
use super::health::Health;
use crate::secret::{wipe_json, Token};
use crate::source::SourceError;

/// Largest Vault answer read by default (1 MiB): a secret, a login or a lease answer is far
/// smaller; anything larger is refused before it is buffered.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Vault requests in flight at once to one server, shared by every volume using it.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 64;
/// Vault requests in flight at once for one identity (one volume).
pub const DEFAULT_MAX_REQUESTS_PER_IDENTITY: usize = 8;

/// How to reach a Vault server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Base address, e.g. `https://vault.example:8200`, or with a path prefix behind a gateway
    /// (`https://gw.example/vault`: requests go to `/vault/v1/...`). No query or fragment.
    pub addr: String,
    /// Sent as `X-Vault-Namespace` on every request.
    pub namespace: Option<String>,
    /// PEM file of CA certificates to trust, instead of the built-in roots.
    pub ca_cert: Option<PathBuf>,
    /// Accept any server certificate (logged as a warning).
    pub skip_verify: bool,
    /// Bound on each HTTP request.
    pub timeout: Duration,
}

/// Bounds on what one Vault server may cost this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest answer read, in bytes: a larger one fails with `SourceError::TooLarge`.
    pub max_response_bytes: usize,
    /// Requests in flight at once to this server, over every identity using it.
    pub max_concurrent_requests: usize,
    /// Requests in flight at once for each identity (`VaultSource`, one per volume).
    pub max_requests_per_identity: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_requests_per_identity: DEFAULT_MAX_REQUESTS_PER_IDENTITY,
        }
    }
}

/// A `ServerConfig` that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum VaultConfigError {
    // The OS error is part of the message, not a `source`, so that it is printed once.
    #[error(
        "cannot read the CA certificate file {path} (--vault-cacert or VAULT_CACERT): {error}"
    )]
    CaCert { path: String, error: std::io::Error },
    #[error("the CA certificate file {0} (--vault-cacert or VAULT_CACERT) holds no usable PEM certificate")]
    CaCertPem(String),
    #[error("invalid Vault address {0:?} (--vault-addr, --vault-server or VAULT_ADDR): expected http://HOST:PORT or https://HOST:PORT, optionally with a path prefix, without credentials, query or fragment")]
    Addr(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl VaultConfigError {
    /// Whether the error is in what the user gave (an address, a CA file), not in this host.
    pub fn is_bad_argument(&self) -> bool {
        !matches!(self, Self::Client(_))
    }
}

/// One Vault server: its address and an HTTP client (connection pool, TLS settings) shared by
/// every identity that talks to it, the cap on requests in flight to it, and whether it
/// answers: once one request finds it not answering, every identity's requests fail at once
/// until a background probe sees it answer again (see `health`).
pub struct VaultServer {
    http: reqwest::Client,
    base: Url,
    namespace: Option<String>,
    limits: ServerLimits,
    in_flight: Arc<Semaphore>,
    /// `ANSWER_BUDGET_BYTES`, in KiB permits.
    answers: Arc<Semaphore>,
    health: Arc<Health>,
    /// Secret-engine mounts its identities detected, shared among them.
    mounts: ServerMounts,
}

impl VaultServer {
    /// A server with the default `ServerLimits`.
    pub fn new(config: &ServerConfig) -> Result<Self, VaultConfigError> {
        Self::with_limits(config, ServerLimits::default())
    }

    pub fn with_limits(
        config: &ServerConfig,
        limits: ServerLimits,
    ) -> Result<Self, VaultConfigError> {
        let base = parse_addr(&config.addr)?;
        if base.scheme() == "http" && !is_loopback(&base) {
            tracing::warn!(addr = %base, "VAULT_ADDR is plain http to a host other than this one: tokens and secrets cross the network unencrypted; use https");
        }
        if config.skip_verify {
            tracing::warn!(addr = %base, "VAULT_SKIP_VERIFY is set: the Vault server's certificate is not checked, so anyone on the path can read tokens and secrets");
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // As many idle connections as requests may be in flight: a burst of publishes
            // must not close connections (and redo TLS handshakes) the next burst needs.
            .pool_max_idle_per_host(limits.max_concurrent_requests)
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(config.skip_verify);
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path).map_err(|error| VaultConfigError::CaCert {
                path: path.display().to_string(),
                error,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| VaultConfigError::CaCertPem(path.display().to_string()))?;
            // The given CAs replace the built-in roots: a private Vault is trusted through its
            // own CA only, not through any public one.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| VaultConfigError::Client(e.to_string()))?;
        Ok(Self {
            health: Arc::new(Health::new(http.clone(), &base)),
            http,
            base,
            namespace: config.namespace.clone(),
            limits: ServerLimits {
                max_concurrent_requests: limits.max_concurrent_requests.max(1),
                max_requests_per_identity: limits.max_requests_per_identity.max(1),
                ..limits
            },
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
            answers: Arc::new(Semaphore::new(kib(ANSWER_BUDGET_BYTES) as usize)),
            mounts: ServerMounts::default(),
        })
    }

    /// The secret-engine mounts detected on this server so far.
    pub(super) fn mounts(&self) -> &ServerMounts {
        &self.mounts
    }

    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// The base address, as named in errors and metric labels.
    pub fn addr(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Reports whether the server answers on `gauge` (1 up, 0 down) from now on.
    pub fn set_up_gauge(&self, gauge: Gauge) {
        self.health.set_gauge(gauge);
    }

    /// Whether the server is taken to answer (no transport failure since the last probe
    /// that got an answer).
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// How many times the server came back after being found down.
    pub fn recoveries(&self) -> u64 {
        self.health.recoveries()
    }

    /// The URL of API path `path` (`secret/data/app`): the address's own path, then `v1`, then
    /// each `/`-separated piece of `path` as one percent-encoded segment, so that no piece can
    /// reach the query, the fragment or another segment.
    pub(super) fn url(&self, path: &str) -> Result<Url, SourceError> {
        let mut url = self.base.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("parse_addr only accepts base URLs");
            segments.pop_if_empty().push("v1");
            for segment in path.split('/') {
                if matches!(segment, "." | "..") {
                    return Err(SourceError::Invalid(
                        "refusing a Vault path with a `.` or `..` segment".into(),
                    ));
                }
                segments.push(segment);
            }
        }
        Ok(url)
    }

    /// Sends one request and reads its JSON answer (`Null` when empty), holding a permit of
    /// `identity` and one of the server's own cap while it is in flight.
    ///
    /// The exchange is driven by the caller's own task (no hand-off to another task on the
    /// way there and back), but it owns everything it needs: should the caller stop waiting,
    /// the exchange is moved to a task of its own and completes there, and an answer nobody
    /// receives any more is cleaned up, its login token or lease revoked, so that nothing
    /// Vault granted is left alive unmanaged.
    pub(super) async fn send(
        &self,
        req: Request<'_>,
        identity: &Arc<Semaphore>,
        gauge: &Gauge,
    ) -> Result<Value, SourceError> {
        // The body (a login's credential) is moved into wiped bytes before any early return.
        let body = req.body.map(|mut b| {
            let bytes = serde_json::to_vec(&b).expect("JSON values always serialize");
            wipe_json(&mut b);
            Zeroizing::new(bytes)
        });
        let url = self.url(req.path)?;
        self.health.check(req.kind)?;
        let permits = self.permits(identity).await;
        let exchange = self.exchange(req.kind);
        let (method, token) = (req.method, req.token);
        let gauge = gauge.clone();
        let orphan = (exchange.clone(), token.clone());
        let run = async move {
            gauge.inc();
            // Checked again: the server may have been found down while this request waited
            // for its permits.
            let result = match exchange.health.check(exchange.kind) {
                Ok(()) => exchange.run(method, url, body, token.as_ref()).await,
                Err(down) => Err(down),
            };
            gauge.dec();
            // Handed on with the answer, so that they are held through any clean-up and count
            // against the caps too.
            (result, permits)
        };
        Pending {
            run: Some(Box::pin(run)),
            orphan: Some(orphan),
            went_down: self.health.subscribe(),
            runtime: tokio::runtime::Handle::current(),
        }
        .wait()
        .await
    }

    /// Revokes `token` in the background (a token replaced by a login that may still be
    /// valid), bounded by a short timeout; failures are only logged.
    pub(super) fn revoke_in_background(&self, token: Token, identity: &Arc<Semaphore>) {
        let exchange = self.exchange(RequestKind::Revoke);
        let (global, identity) = (self.in_flight.clone(), identity.clone());
        let Ok(url) = self.url("auth/token/revoke-self") else {
            return;
        };
        tokio::spawn(async move {
            let revoke = async {
                let _own = identity.acquire_owned().await;
                let _global = global.acquire_owned().await;
                exchange.health.check(exchange.kind)?;
                exchange.run(Method::POST, url, None, Some(&token)).await
            };
            match tokio::time::timeout(CLEANUP_TIMEOUT, revoke).await {
                Ok(Ok(_)) => tracing::debug!("replaced Vault token revoked"),
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "could not revoke the replaced Vault token")
                }
                Err(_) => tracing::debug!("could not revoke the replaced Vault token in time"),
            }
        });
    }

    async fn permits(&self, identity: &Arc<Semaphore>) -> [OwnedSemaphorePermit; 2] {
        // The identity's own permit first, so that a busy volume queues on its own cap rather
        // than holding server-wide permits while it waits.
        let own = identity
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphores are never closed");
        let global = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphores are never closed");
        [own, global]
    }

    fn exchange(&self, kind: RequestKind) -> Exchange {
        Exchange {
            http: self.http.clone(),
            namespace: self.namespace.clone(),
            max_bytes: self.limits.max_response_bytes,
            answers: self.answers.clone(),
            kind,
            base: self.base.clone(),
            health: self.health.clone(),
        }
    }
}

/// What a request is for: named in metrics and errors by `label`, and what decides which grant
/// an answer nobody waited for carries (a login's token, a read's lease).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// A secret's data (and a dynamic secret's lease).
    Read,
    /// A KV v2 secret's metadata (its current version).
    Metadata,
    /// Which engine serves a path (`sys/internal/ui/mounts`).
    Mounts,
    Login,
    /// `auth/token/lookup-self`.
    Lookup,
    /// `auth/token/renew-self`.
    Renew,
    /// `auth/token/revoke-self`.
    Revoke,
    RenewLease,
    RevokeLease,
    /// A certificate from a PKI engine (`<mount>/issue/<role>`).
    Issue,
    /// `<mount>/revoke` of a certificate's serial.
    RevokeCertificate,
}

impl RequestKind {
    /// The request's name in metric labels (`vaultfs_vault_requests_total{kind}`) and errors.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Metadata => "metadata",
            Self::Mounts => "mounts",
            Self::Login => "login",
            Self::Lookup => "lookup",
            Self::Renew => "renew",
            Self::Revoke => "revoke",
            Self::RenewLease => "renew_lease",
            Self::RevokeLease => "revoke_lease",
            Self::Issue => "issue",
            Self::RevokeCertificate => "revoke_certificate",
        }
    }
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One request as `VaultSource` describes it.
pub(super) struct Request<'a> {
    pub kind: RequestKind,
    pub method: Method,
    /// The API path below `v1/`.
    pub path: &'a str,
    pub body: Option<Value>,
    pub token: Option<Token>,
}

fn parse_addr(addr: &str) -> Result<Url, VaultConfigError> {
    let refused = || VaultConfigError::Addr(addr.to_string());
    let url = Url::parse(addr).map_err(|_| refused())?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && !url.cannot_be_a_base()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    ok.then_some(url).ok_or_else(refused)
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::vault::test_server::{config, get, json_answer, serve, small_server};

    fn server(addr: &str) -> Result<VaultServer, VaultConfigError> {
        VaultServer::new(&config(addr, Duration::from_secs(1)))
    }

    #[test]
    fn bad_addresses_are_refused_with_the_expected_form() {
        for addr in [
            "vault:8200",
            "ftp://vault:8200",
            "https://vault:8200/?x=1",
            "https://vault:8200/#frag",
            "https://user:pw@vault:8200",
            "https://",
        ] {
            let err = server(addr).err().expect(addr);
            assert!(
                err.to_string().contains("expected http://HOST:PORT"),
                "{addr}: {err}"
            );
        }
    }

    #[test]
    fn api_paths_map_to_v1_under_the_address_and_any_path_prefix() {
        let paths = [
            "secret/data/app/db",
            "sys/internal/ui/mounts/secret/app",
            "auth/approle/login",
        ];
        for addr in [
            "https://vault.example:8200",
            "https://vault.example:8200/",
            "https://gw.example/vault",
            "https://gw.example/vault/",
            "http://127.0.0.1:8200",
        ] {
            let s = server(addr).expect(addr);
            let base = addr.trim_end_matches('/');
            for path in paths {
                let url = s.url(path).unwrap();
                assert_eq!(url.as_str(), format!("{base}/v1/{path}"), "{addr} {path}");
            }
        }
    }

    #[test]
    fn a_segment_cannot_escape_into_the_query_fragment_or_another_segment() {
        let s = server("https://gw.example/vault").unwrap();
        let url = s.url("secret/data/a?b=c#d%2F").unwrap();
        assert_eq!(
            url.as_str(),
            "https://gw.example/vault/v1/secret/data/a%3Fb=c%23d%252F"
        );
        assert_eq!(url.query(), None);
        assert_eq!(url.fragment(), None);
        for path in [
            "secret/../sys/seal",
            "secret/./data",
            "..",
            "secret/data/..",
        ] {
            assert!(
                matches!(s.url(path), Err(SourceError::Invalid(_))),
                "{path}"
            );
        }
        // `..` inside a segment is just a name.
        assert_eq!(
            s.url("secret/a..b").unwrap().as_str(),
            "https://gw.example/vault/v1/secret/a..b"
        );
    }

    #[test]
    fn default_limits_are_the_documented_ones() {
        let limits = server("https://vault.example").unwrap().limits();
        assert_eq!(limits.max_response_bytes, 1024 * 1024);
        assert_eq!(limits.max_concurrent_requests, 64);
        assert_eq!(limits.max_requests_per_identity, 8);
    }

    #[tokio::test]
    async fn requests_in_flight_are_capped_per_identity_and_per_server() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // A server answering every connection after 100 ms, recording the most connections it
        // held at once.
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (n, m) = (now.clone(), most.clone());
        let (addr, _) = serve(move |_| {
            m.fetch_max(n.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            n.fetch_sub(1, Ordering::SeqCst);
            json_answer("200 OK", "{}", false)
        });
        let config = ServerConfig {
            addr,
            namespace: None,
            ca_cert: None,
            skip_verify: false,
            timeout: Duration::from_secs(5),
        };
        let limits = ServerLimits {
            max_concurrent_requests: 3,
            max_requests_per_identity: 2,
            ..ServerLimits::default()
        };
        let server = Arc::new(VaultServer::with_limits(&config, limits).unwrap());
        let gauge = Gauge::default();
        let send_all = |identities: Vec<Arc<Semaphore>>| {
            let mut all = tokio::task::JoinSet::new();
            for identity in identities {
                for _ in 0..4 {
                    let (server, identity, gauge) =
                        (server.clone(), identity.clone(), gauge.clone());
                    all.spawn(async move {
                        let request = Request {
                            kind: RequestKind::Read,
                            method: Method::GET,
                            path: "secret/data/app",
                            body: None,
                            token: None,
                        };
                        server.send(request, &identity, &gauge).await
                    });
                }
            }
            all
        };
        let one = Arc::new(Semaphore::new(limits.max_requests_per_identity));
        let mut all = send_all(vec![one]);
        while let Some(done) = all.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(most.swap(0, Ordering::SeqCst), 2, "one identity's cap");
        let many = (0..3)
            .map(|_| Arc::new(Semaphore::new(limits.max_requests_per_identity)))
            .collect();
        let mut all = send_all(many);
        while let Some(done) = all.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3, "the server's cap");
        assert_eq!(gauge.get(), 0, "nothing left in flight");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_address_and_the_cause() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("local address").port()
        };
        let addr = format!("http://127.0.0.1:{port}");
        let err = get(&small_server(&addr, 1000), RequestKind::Read)
            .await
            .unwrap_err();
        let SourceError::Unavailable(message) = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains(&addr), "{message}");
        assert!(message.contains("Connection refused"), "{message}");
        assert!(!message.contains("tok"), "no token: {message}");
    }

    #[tokio::test]
    async fn an_unresolvable_host_names_the_address_and_the_lookup_failure() {
        let addr = "http://vaultfs-test.invalid:8200";
        let err = get(&small_server(addr, 1000), RequestKind::Read)
            .await
            .unwrap_err();
        let SourceError::Unavailable(message) = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains(addr), "{message}");
        assert!(message.contains("dns error"), "{message}");
        assert!(
            !message.contains("secret/data"),
            "only the server's address: {message}"
        );
    }
}
