//! The HTTP layer under `VaultSource`: one Vault server's address, client (TLS, no redirects),
//! traffic caps and body cap; request URLs built segment by segment; answers read into wiped
//! buffers. Knows nothing of auth methods or engines; the token to send is the caller's.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use super::engine::ServerMounts;
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
/// Bytes of Vault answers being read or parsed at once per server (raw bytes plus an estimate
/// of their parsed form): with `DEFAULT_MAX_RESPONSE_BYTES` and `MAX_JSON_VALUES`, room for
/// eight answers of the largest size while small ones (a few KiB) never notice it. An answer
/// that finds it used up fails at once as Vault being unavailable (stale data is served, the
/// cache backs off) instead of waiting on memory others hold.
pub const ANSWER_BUDGET_BYTES: usize = 24 << 20;
/// Most JSON values (array elements, object members, nested containers) an answer may hold:
/// parsed JSON costs tens of bytes per value, so a 1 MiB answer of `[0,0,0,...]` would
/// otherwise grow to about 16 MiB in memory.
pub const MAX_JSON_VALUES: usize = 32 << 10;
/// What the parsed form of one JSON value is reckoned to cost, beyond its raw bytes.
const PARSED_BYTES_PER_VALUE: usize = 64;

/// Bound on the background clean-up requests (revoking a replaced token, or what an answer
/// nobody waited for carried).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

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
        let exchange = self.exchange("revoke");
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

    fn exchange(&self, kind: &'static str) -> Exchange {
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

/// The share of `ANSWER_BUDGET_BYTES` one answer holds, grown as it is read; given back when
/// the answer is done.
struct AnswerBudget {
    answers: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    kib: u32,
    kind: &'static str,
}

impl AnswerBudget {
    fn new(answers: &Arc<Semaphore>, kind: &'static str) -> Self {
        Self {
            answers: answers.clone(),
            held: None,
            kib: 0,
            kind,
        }
    }

    /// Makes the share at least `bytes`, or fails at once when the budget is used up.
    fn take(&mut self, bytes: usize) -> Result<(), SourceError> {
        let wanted = kib(bytes);
        if wanted <= self.kib {
            return Ok(());
        }
        let more = self
            .answers
            .clone()
            .try_acquire_many_owned(wanted - self.kib)
            .map_err(|_| {
                SourceError::Unavailable(format!(
                    "{}: {} MiB of Vault answers are being read at once already; retried later",
                    self.kind,
                    ANSWER_BUDGET_BYTES >> 20
                ))
            })?;
        match self.held.as_mut() {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        self.kib = wanted;
        Ok(())
    }
}

/// `bytes` in whole KiB, rounded up.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// How many JSON values `raw` holds at most (containers, elements, members: one per opening
/// bracket and separator outside strings), or `None` past `limit`. A cheap scan, made before
/// parsing so that a small answer of many tiny values cannot grow large in memory.
fn count_json_values(raw: &[u8], limit: usize) -> Option<usize> {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in raw {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' | b',' | b':' => {
                count += 1;
                if count > limit {
                    return None;
                }
            }
            _ => {}
        }
    }
    Some(count)
}

/// One request as `VaultSource` describes it.
pub(super) struct Request<'a> {
    /// What the request is for, as named in metrics and errors (`read`, `login`, ...).
    pub kind: &'static str,
    pub method: Method,
    /// The API path below `v1/`.
    pub path: &'a str,
    pub body: Option<Value>,
    pub token: Option<Token>,
}

/// An exchange in flight, and its answer's second home: dropped before the exchange
/// completed (the caller gave up), it moves the exchange to a task of its own, which cleans up
/// the answer when it arrives. Between them, every answer is either received or cleaned up.
struct Pending {
    run: Option<InFlight>,
    orphan: Option<(Exchange, Option<Token>)>,
    /// Changes when the server is found down: a request in flight then stops waiting (the
    /// server stopped answering another request, so this one would most likely wait out its
    /// timeout too), and its answer, should one still come, is cleaned up as one nobody
    /// waited for.
    went_down: tokio::sync::watch::Receiver<u64>,
    /// Where an exchange nobody waits for any more is finished.
    runtime: tokio::runtime::Handle,
}

/// The exchange itself: its answer and the permits it holds.
type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Result<Value, SourceError>, [OwnedSemaphorePermit; 2])>
            + Send,
    >,
>;

impl Pending {
    async fn wait(mut self) -> Result<Value, SourceError> {
        let (kind, health) = {
            let (exchange, _) = self.orphan.as_ref().expect("only `drop` takes it");
            (exchange.kind, exchange.health.clone())
        };
        let run = self.run.as_mut().expect("only `wait` and `drop` take it");
        let (result, permits) = tokio::select! {
            biased;
            done = run => done,
            Ok(()) = self.went_down.changed() => {
                // `self` is dropped with the exchange still in it: it finishes on its own and
                // a late answer is cleaned up.
                return Err(health.check(kind).err().unwrap_or_else(|| {
                    SourceError::Unavailable(format!(
                        "{kind}: the Vault server stopped answering while this request was in flight"
                    ))
                }));
            }
        };
        self.run = None;
        drop(permits);
        result
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let (Some(run), Some((exchange, token))) = (self.run.take(), self.orphan.take()) else {
            return;
        };
        self.runtime.spawn(async move {
            let (result, permits) = run.await;
            if let Ok(mut answer) = result {
                exchange.clean_up(&answer, token.as_ref()).await;
                wipe_json(&mut answer);
            }
            drop(permits);
        });
    }
}

/// Everything one request needs, owned, so that it can finish in its own task.
#[derive(Clone)]
struct Exchange {
    http: reqwest::Client,
    namespace: Option<String>,
    max_bytes: usize,
    answers: Arc<Semaphore>,
    kind: &'static str,
    base: Url,
    health: Arc<Health>,
}

impl Exchange {
    async fn run(
        &self,
        method: Method,
        url: Url,
        body: Option<Zeroizing<Vec<u8>>>,
        token: Option<&Token>,
    ) -> Result<Value, SourceError> {
        let kind = self.kind;
        let mut request = self
            .http
            .request(method, url)
            .header("X-Vault-Request", "true");
        if let Some(t) = token {
            request = request.header("X-Vault-Token", t.expose());
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(mut b) = body {
            // Moved, not copied: the only other copy is the one the HTTP stack sends.
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(std::mem::take(&mut *b));
        }
        // Every reqwest error here is a transport failure (refused, reset, timed out, cut
        // off mid-answer): the server is not answering, for every identity. HTTP answers,
        // 5xx and 429 included, do not mark it down: the server answered (fast), a 5xx or
        // 429 may concern one path or one client, and the cache's back-off already paces
        // retries of those.
        // The base address only, never the request's URL: it is what to check (and a path
        // may name a secret). It carries no credentials or query (`parse_addr`).
        let unavailable = |e: reqwest::Error| {
            let cause = describe(e);
            self.health.mark_down(&cause);
            SourceError::Unavailable(format!(
                "{kind} request to {} failed: {cause}",
                self.base.as_str().trim_end_matches('/')
            ))
        };
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status();
        if status.is_redirection() {
            return Err(SourceError::Unavailable(format!(
                "{kind}: Vault answered HTTP {} (a redirect); vaultfs does not follow redirects: set VAULT_ADDR to the address that serves the API",
                status.as_u16()
            )));
        }
        let too_large = || {
            SourceError::TooLarge(format!(
                "{kind}: Vault's answer is larger than the limit of {} bytes",
                self.max_bytes
            ))
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_bytes as u64)
        {
            return Err(too_large());
        }
        // Sized up front where the length is known, so growing leaves no stray copies behind.
        let expected = response.content_length().unwrap_or(0) as usize;
        let mut budget = AnswerBudget::new(&self.answers, kind);
        budget.take(expected.max(4096))?;
        let mut raw = Zeroizing::new(Vec::with_capacity(expected.max(4096)));
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if raw.len() + chunk.len() > self.max_bytes {
                // `raw` is wiped on drop; the rest of the answer is never read.
                return Err(too_large());
            }
            budget.take(raw.len() + chunk.len())?;
            raw.extend_from_slice(&chunk);
        }
        let values = count_json_values(&raw, MAX_JSON_VALUES).ok_or_else(|| {
            SourceError::TooLarge(format!(
                "{kind}: Vault's answer holds more than {MAX_JSON_VALUES} JSON values"
            ))
        })?;
        budget.take(raw.len() + values * PARSED_BYTES_PER_VALUE)?;
        let value: Value = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).map_err(|_| {
                SourceError::Invalid(format!(
                    "{kind}: HTTP {} with a body that is not JSON",
                    status.as_u16()
                ))
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            let err = classify(status, &value);
            let mut value = value;
            wipe_json(&mut value);
            Err(err)
        }
    }

    /// Whether `answer` carries something Vault granted that must not be left alive unmanaged:
    /// a login's token or a read's lease.
    fn grants(&self, answer: &Value) -> bool {
        match self.kind {
            "login" => answer["auth"]["client_token"].is_string(),
            "read" => answer["lease_id"].as_str().is_some_and(|id| !id.is_empty()),
            _ => false,
        }
    }

    /// Revokes what an answer nobody waited for carries: a login's token, a read's lease.
    /// Tried even while the server is taken as down: it just answered.
    async fn clean_up(&self, answer: &Value, token: Option<&Token>) {
        if !self.grants(answer) {
            return;
        }
        let kind = self.kind;
        let (path, body, token) = if kind == "login" {
            let fresh = answer["auth"]["client_token"].as_str().unwrap_or_default();
            (
                "auth/token/revoke-self",
                None,
                Some(Token::new(fresh.to_string())),
            )
        } else {
            let id = answer["lease_id"].as_str().unwrap_or_default();
            let body = Zeroizing::new(
                serde_json::to_vec(&json!({ "lease_id": id })).expect("JSON always serializes"),
            );
            ("sys/leases/revoke", Some(body), token.cloned())
        };
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("parse_addr only accepts base URLs")
            .pop_if_empty()
            .push("v1")
            .extend(path.split('/'));
        let method = if body.is_some() {
            Method::PUT
        } else {
            Method::POST
        };
        let revoke = self.run(method, url, body, token.as_ref());
        match tokio::time::timeout(CLEANUP_TIMEOUT, revoke).await {
            Ok(Ok(_)) => tracing::info!(
                kind,
                "a Vault answer arrived after its caller gave up; what it granted was revoked"
            ),
            Ok(Err(err)) => tracing::warn!(kind, error = %err, "a Vault answer arrived after its caller gave up and what it granted could not be revoked"),
            Err(_) => tracing::warn!(kind, "a Vault answer arrived after its caller gave up and what it granted could not be revoked in time"),
        }
    }
}

/// A reqwest error with its causes (the TLS or connection failure is only in the chain),
/// without the URL.
/// A transport failure with its whole cause chain, each part once (`error sending request:
/// client error (Connect): tcp connect error: Connection refused (os error 111)`), without the
/// request's URL.
pub(super) fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
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

pub(super) fn classify(status: StatusCode, body: &Value) -> SourceError {
    let errors = body
        .get("errors")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let mut detail = format!("HTTP {}", status.as_u16());
    if !errors.is_empty() {
        detail.push_str(": ");
        detail.extend(errors.chars().take(300));
    }
    match status {
        StatusCode::NOT_FOUND => SourceError::NotFound,
        StatusCode::FORBIDDEN => SourceError::PermissionDenied,
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            SourceError::Unavailable(detail)
        }
        _ => SourceError::Invalid(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::vault::test_server::{config, json_answer, serve};

    #[test]
    fn json_values_are_counted_outside_strings_and_capped() {
        assert_eq!(
            count_json_values(br#"{"a": "x,y:[{", "b": [1, 2]}"#, 100),
            Some(7)
        );
        assert_eq!(count_json_values(br#""esc\"aped,""#, 100), Some(1));
        let many = format!("[{}0]", "0,".repeat(40_000));
        assert_eq!(count_json_values(many.as_bytes(), MAX_JSON_VALUES), None);
    }

    #[test]
    fn the_answer_budget_fails_fast_when_used_up_and_is_given_back() {
        let answers = Arc::new(Semaphore::new(kib(8 << 10) as usize));
        let mut first = AnswerBudget::new(&answers, "read");
        first.take(6 << 10).unwrap();
        first.take(5 << 10).unwrap();
        let mut second = AnswerBudget::new(&answers, "read");
        let err = second.take(4 << 10).unwrap_err();
        assert!(err.is_transient(), "{err}");
        drop(first);
        second
            .take(4 << 10)
            .expect("given back when the first answer is done");
    }

    fn server(addr: &str) -> Result<VaultServer, VaultConfigError> {
        VaultServer::new(&config(addr, Duration::from_secs(1)))
    }

    #[test]
    fn status_codes_map_to_source_errors() {
        let body = json!({"errors": ["permission denied"]});
        assert_eq!(
            classify(StatusCode::FORBIDDEN, &body),
            SourceError::PermissionDenied
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, &json!({})),
            SourceError::NotFound
        );
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, &body).is_transient());
        let bad = classify(
            StatusCode::BAD_REQUEST,
            &json!({"errors": ["invalid role"]}),
        );
        assert_eq!(bad, SourceError::Invalid("HTTP 400: invalid role".into()));
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

    /// A one-thread HTTP server answering each request with `answer(head)`; returns its
    /// address and the request heads it received.
    /// The request heads `seen` by the test server once it has `n` of them (within 2 s).
    async fn requests_seen(
        seen: &crate::source::vault::test_server::Seen,
        n: usize,
    ) -> Vec<String> {
        for _ in 0..100 {
            if seen.lock().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.lock().clone();
        assert_eq!(seen.len(), n, "{seen:?}");
        seen
    }

    fn small_server(addr: &str, max: usize) -> VaultServer {
        let config = config(addr, Duration::from_secs(5));
        let limits = ServerLimits {
            max_response_bytes: max,
            ..ServerLimits::default()
        };
        VaultServer::with_limits(&config, limits).unwrap()
    }

    async fn get(server: &VaultServer, kind: &'static str) -> Result<Value, SourceError> {
        let request = Request {
            kind,
            method: Method::GET,
            path: "secret/data/app",
            body: None,
            token: Some(Token::new("tok".into())),
        };
        server
            .send(request, &Arc::new(Semaphore::new(1)), &Gauge::default())
            .await
    }

    #[tokio::test]
    async fn answers_over_the_limit_are_refused_by_length_or_while_reading() {
        let big = format!("{{\"data\":{{\"v\":\"{}\"}}}}", "s3cr3t".repeat(400));
        for chunked in [false, true] {
            let body = big.clone();
            let (addr, _) = serve(move |_| json_answer("200 OK", &body, chunked));
            let err = get(&small_server(&addr, 1000), "read").await.unwrap_err();
            let SourceError::TooLarge(message) = &err else {
                panic!("chunked={chunked}: {err:?}");
            };
            assert!(message.contains("1000 bytes"), "{message}");
            assert!(!message.contains("s3cr3t"), "{message}");
            // Under the limit, the same answer is served.
            let body = big.clone();
            let (addr, _) = serve(move |_| json_answer("200 OK", &body, chunked));
            let ok = get(&small_server(&addr, 1 << 20), "read").await.unwrap();
            assert_eq!(ok["data"]["v"].as_str().unwrap().len(), 2400);
        }
    }

    /// A server that reads each request and then, per `mode` at that moment, never answers
    /// (0), answers `sys/health` with 503 and nothing else (1), or answers everything with 200
    /// (2); returns its address and the request heads it received.
    fn stalling_server(
        mode: Arc<std::sync::atomic::AtomicU8>,
    ) -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (mode, log) = (mode.clone(), log.clone());
                std::thread::spawn(move || loop {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&byte[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    log.lock().push(head.clone());
                    let health = head.contains("/v1/sys/health");
                    let answer = match mode.load(Ordering::SeqCst) {
                        0 => {
                            // Holds the connection open, answering nothing (a frozen Vault).
                            std::thread::sleep(Duration::from_secs(3600));
                            return;
                        }
                        1 if health => {
                            json_answer("503 Service Unavailable", r#"{"sealed":true}"#, false)
                        }
                        1 => return,
                        _ => json_answer("200 OK", "{}", false),
                    };
                    if stream.write_all(&answer).is_err() {
                        return;
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn once_a_request_finds_the_server_down_others_fail_at_once_until_a_probe_answers() {
        use std::sync::atomic::{AtomicU8, Ordering};
        let mode = Arc::new(AtomicU8::new(0));
        let (addr, seen) = stalling_server(mode.clone());
        let server = VaultServer::new(&config(&addr, Duration::from_millis(300))).unwrap();
        let gauge = Gauge::default();
        server.set_up_gauge(gauge.clone());
        assert_eq!(gauge.get(), 1);
        let started = std::time::Instant::now();
        let first = get(&server, "read").await.unwrap_err();
        assert!(first.is_transient(), "{first}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(!server.is_up());
        assert_eq!(gauge.get(), 0);
        // Another identity's request fails at once, naming the server and since when.
        let started = std::time::Instant::now();
        let second = get(&server, "metadata").await.unwrap_err();
        let fast = started.elapsed();
        eprintln!("first request waited {waited:?}, the next one {fast:?}");
        assert!(fast < Duration::from_millis(100), "{fast:?}");
        let SourceError::Unavailable(message) = &second else {
            panic!("{second:?}");
        };
        assert!(
            message.contains(addr.as_str()) && message.contains("not answering since"),
            "{message}"
        );
        let requests = seen.lock().len();
        assert_eq!(requests, 1, "the second request never reached the server");
        // Sealed: the probe's 503 keeps the server down.
        mode.store(1, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !seen.lock().iter().any(|h| h.contains("/v1/sys/health")) {
            assert!(std::time::Instant::now() < deadline, "no probe");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!server.is_up(), "a sealed Vault is not up");
        let sealed = get(&server, "read").await.unwrap_err();
        assert!(sealed.to_string().contains("sealed"), "{sealed}");
        // Answering again: the probe marks it up within about a second.
        mode.store(2, Ordering::SeqCst);
        let back = std::time::Instant::now();
        while !server.is_up() {
            assert!(back.elapsed() < Duration::from_secs(3), "never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "marked up {:?} after the server answered again",
            back.elapsed()
        );
        assert_eq!(server.recoveries(), 1);
        assert_eq!(gauge.get(), 1);
        get(&server, "read")
            .await
            .expect("requests go through again");
    }

    #[tokio::test]
    async fn a_request_in_flight_stops_waiting_when_another_finds_the_server_down() {
        let (addr, _) = stalling_server(Arc::new(std::sync::atomic::AtomicU8::new(0)));
        let server = Arc::new(VaultServer::new(&config(&addr, Duration::from_secs(2))).unwrap());
        let first = tokio::spawn({
            let server = server.clone();
            async move { get(&server, "read").await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = std::time::Instant::now();
        let second = get(&server, "metadata").await.unwrap_err();
        let waited = started.elapsed();
        first.await.unwrap().unwrap_err();
        eprintln!("the request sent 1 s after the first waited {waited:?}");
        assert!(second.is_transient(), "{second}");
        // Its own timeout would have ended it 2 s after it was sent; the first request's
        // ends it about 1 s in.
        assert!(waited < Duration::from_millis(1800), "{waited:?}");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (target, target_seen) = serve(|_| json_answer("200 OK", "{}", false));
        let (addr, _) = serve(move |_| {
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/v1/secret/data/app\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
        });
        let err = get(&small_server(&addr, 1000), "read").await.unwrap_err();
        assert!(
            err.to_string().contains("HTTP 307")
                && err.to_string().contains("does not follow redirects"),
            "{err}"
        );
        assert!(target_seen.lock().is_empty());
    }

    #[tokio::test]
    async fn a_login_answer_nobody_waits_for_has_its_token_revoked() {
        let (addr, seen) = serve(|head| {
            if head.contains("/login") {
                std::thread::sleep(Duration::from_millis(300));
                json_answer("200 OK", r#"{"auth":{"client_token":"late-token"}}"#, false)
            } else {
                json_answer("204 No Content", "", false)
            }
        });
        let server = small_server(&addr, 1000);
        let request = Request {
            kind: "login",
            method: Method::POST,
            path: "auth/approle/login",
            body: Some(json!({"role_id": "r"})),
            token: None,
        };
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            server.send(request, &Arc::new(Semaphore::new(1)), &Gauge::default()),
        )
        .await;
        assert!(gave_up.is_err());
        let seen = requests_seen(&seen, 2).await;
        assert!(
            seen[1].contains("/v1/auth/token/revoke-self"),
            "{}",
            seen[1]
        );
        assert!(
            seen[1]
                .to_ascii_lowercase()
                .contains("x-vault-token: late-token"),
            "{}",
            seen[1]
        );
    }

    #[tokio::test]
    async fn a_leased_read_nobody_waits_for_has_its_lease_revoked() {
        let (addr, seen) = serve(|head| {
            if head.starts_with("GET") {
                std::thread::sleep(Duration::from_millis(300));
                json_answer(
                    "200 OK",
                    r#"{"lease_id":"database/creds/app/xyz","lease_duration":60,"data":{}}"#,
                    false,
                )
            } else {
                json_answer("204 No Content", "", false)
            }
        });
        let server = small_server(&addr, 1000);
        let gave_up = tokio::time::timeout(Duration::from_millis(50), get(&server, "read")).await;
        assert!(gave_up.is_err());
        let seen = requests_seen(&seen, 2).await;
        assert!(
            seen[1].starts_with("PUT /v1/sys/leases/revoke"),
            "{}",
            seen[1]
        );
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
                            kind: "read",
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
        let err = get(&small_server(&addr, 1000), "read").await.unwrap_err();
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
        let err = get(&small_server(addr, 1000), "read").await.unwrap_err();
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
