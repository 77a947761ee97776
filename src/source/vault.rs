//! The real `SecretSource`: Vault's (and OpenBao's) HTTP API over reqwest. The only module that
//! knows URLs, headers, auth methods, token renewal and KV engine detection. Split by job:
//! `http` (address, URLs, TLS, caps, body limit), `health` (whether the server answers, shared
//! by every identity on it), `auth` (the token state machine), `engine` (which engine serves a
//! path); this file holds the identity and the secret reads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Fetched, Identity, Lease, SecretSource, Session, SessionSink, SourceError, Version};
use crate::metrics::Metrics;
use crate::secret::{wipe_json, SecretData, Token};
use crate::spec::SecretPath;

mod auth;
mod engine;
mod health;
mod http;
mod servers;

#[cfg(test)]
mod test_server;

use auth::TokenState;
pub use auth::MIN_RELOGIN_INTERVAL;
use engine::Engine;
pub use http::{
    ServerConfig, ServerLimits, VaultConfigError, VaultServer, DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_REQUESTS_PER_IDENTITY, DEFAULT_MAX_RESPONSE_BYTES,
};
pub use servers::VaultServers;

/// How vaultfs proves its identity to Vault.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A token given up front (`VAULT_TOKEN`, `~/.vault-token`). Renewed, never re-obtained.
    Token(Token),
    /// A login (`auth/<mount>/login`) repeated whenever the token expires or is revoked.
    Login {
        method: LoginMethod,
        /// The auth mount path, e.g. `kubernetes`.
        mount: String,
        /// The role (for AppRole: the role id).
        role: String,
        /// The JWT (kubernetes/jwt) or secret id (AppRole).
        credential: Credential,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginMethod {
    Kubernetes,
    Jwt,
    AppRole,
}

/// Where a login credential comes from.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Read again at every login (kubelet rotates projected tokens in place).
    File(PathBuf),
    /// Held in memory and replaceable (`VaultSource::set_credential`).
    Value(Token),
}

pub struct VaultSource {
    server: Arc<VaultServer>,
    auth: Auth,
    credential: Mutex<Option<Credential>>,
    token: Mutex<Option<TokenState>>,
    login_lock: tokio::sync::Mutex<()>,
    /// Known secret-engine mounts: prefix (with trailing `/`) → engine.
    mounts: Mutex<Vec<(String, Engine)>>,
    /// Paths whose mount could not be detected (treated as plain logical reads).
    undetectable: Mutex<HashMap<SecretPath, Engine>>,
    /// KV v2 paths whose metadata this identity may not read: no cheap version check.
    no_metadata: Mutex<HashSet<SecretPath>>,
    /// KV v2 paths written with the API's `data/` and not found, already warned about.
    data_prefix_warned: Mutex<HashSet<SecretPath>>,
    /// Set by `revoke`: no further logins (an unpublished volume stays dead).
    closed: AtomicBool,
    /// This identity's policy refuses `auth/token/lookup-self`: a 403 cannot be told apart from
    /// a dead token, so it is taken as a policy denial (expiry is still tracked by the TTL).
    lookup_forbidden: AtomicBool,
    /// When the last login completed (see `MIN_RELOGIN_INTERVAL`).
    last_login: Mutex<Option<Instant>>,
    /// The last failed login, when, and the server's recovery count then: repeated within
    /// `MIN_RELOGIN_INTERVAL` without asking Vault again (a new credential clears it, and a
    /// server that came back since clears an outage).
    failed_login: Mutex<Option<(Instant, SourceError, u64)>>,
    /// This identity's cap on Vault requests in flight.
    in_flight: Arc<Semaphore>,
    /// Wakes the renewer when the token is replaced or its schedule changes.
    token_changed: tokio::sync::Notify,
    /// Told every change of the token (`Identity::on_session_change`).
    session_sink: Mutex<Option<SessionSink>>,
    /// The volume this identity serves, as named in logs and metric labels.
    volume: String,
    metrics: Arc<Metrics>,
}

/// The longest an unpublish waits to revoke the volume's token.
const REVOKE_WAIT: Duration = Duration::from_secs(5);

/// Vault's TTL in seconds, bounded so that adding it to a clock reading cannot overflow.
fn ttl_from(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0).min(10 * 365 * 24 * 3600)
}

/// The lease of a logical read's answer. Only a real lease counts: KV v1 reports a refresh
/// interval in `lease_duration` without a `lease_id`.
fn lease_of(body: &Value) -> Option<Lease> {
    let id = body["lease_id"].as_str().filter(|id| !id.is_empty())?;
    let secs = ttl_from(&body["lease_duration"]);
    (secs > 0).then(|| Lease {
        id: id.to_string(),
        duration: Duration::from_secs(secs),
        renewable: body["renewable"].as_bool().unwrap_or(false),
    })
}

fn error_class(err: &SourceError) -> &'static str {
    match err {
        SourceError::NotFound => "not_found",
        SourceError::PermissionDenied => "forbidden",
        SourceError::Unavailable(_) => "unavailable",
        SourceError::Invalid(_) => "invalid",
        SourceError::LoginRefused(_) => "login_refused",
        SourceError::TooLarge(_) => "too_large",
        SourceError::Closed => "closed",
    }
}

impl VaultSource {
    /// An identity on `server` serving `volume` (a label for logs and metrics). Nothing is
    /// sent until the first request.
    pub fn new(
        server: Arc<VaultServer>,
        auth: Auth,
        volume: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (token, credential) = match &auth {
            Auth::Token(t) => (Some(TokenState::given(t.clone())), None),
            Auth::Login { credential, .. } => (None, Some(credential.clone())),
        };
        let in_flight = Arc::new(Semaphore::new(server.limits().max_requests_per_identity));
        Self {
            server,
            auth,
            credential: Mutex::new(credential),
            token: Mutex::new(token),
            login_lock: tokio::sync::Mutex::new(()),
            mounts: Mutex::new(Vec::new()),
            undetectable: Mutex::new(HashMap::new()),
            no_metadata: Mutex::new(HashSet::new()),
            data_prefix_warned: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            lookup_forbidden: AtomicBool::new(false),
            last_login: Mutex::new(None),
            failed_login: Mutex::new(None),
            in_flight,
            token_changed: tokio::sync::Notify::new(),
            session_sink: Mutex::new(None),
            volume,
            metrics,
        }
    }

    fn is_static_token(&self) -> bool {
        matches!(self.auth, Auth::Token(_))
    }

    async fn send(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&Token>,
    ) -> Result<Value, SourceError> {
        let started = std::time::Instant::now();
        let request = http::Request {
            kind,
            method,
            path,
            body,
            token: token.cloned(),
        };
        let result = self
            .server
            .send(
                request,
                &self.in_flight,
                &self.metrics.vault_requests_in_flight,
            )
            .await;
        self.metrics.vault_request(kind, started.elapsed());
        if let Err(err) = &result {
            self.metrics.vault_error(kind, error_class(err));
        }
        result
    }
}

/// Takes `data` (the secret's fields) out of an answer as rendered secret data, wiping the
/// rest of the parsed answer.
fn take_data(mut body: Value, pointer: &str) -> Result<SecretData, SourceError> {
    let taken = body.pointer_mut(pointer).map(Value::take);
    wipe_json(&mut body);
    match taken {
        Some(Value::Object(map)) => Ok(SecretData::from_json(map)),
        Some(Value::Null) | None => Err(SourceError::NotFound),
        Some(mut other) => {
            wipe_json(&mut other);
            Err(SourceError::Invalid(format!(
                "expected an object at {pointer} of the answer"
            )))
        }
    }
}

impl Identity for VaultSource {
    /// Replaces the login credential (a fresh service-account token from a CSI republish).
    /// The current Vault token stays in use until it expires or is refused.
    fn set_credential(&self, credential: Token) {
        *self.credential.lock() = Some(Credential::Value(credential));
        self.failed_login.lock().take();
    }

    /// Logs in now (for callers that want a refused login to fail early). A no-op for tokens.
    async fn login(&self) -> Result<(), SourceError> {
        match self.auth {
            Auth::Token(_) => Ok(()),
            Auth::Login { .. } => {
                let old = self.token.lock().take().map(|t| t.token);
                self.session_changed();
                self.relogin(None, false).await?;
                if let Some(old) = old {
                    self.server.revoke_in_background(old, &self.in_flight);
                }
                Ok(())
            }
        }
    }

    /// Renews the token, and learns which secret engine serves each path ahead of the first
    /// read so that a cold read costs one round trip (errors are left for the first read).
    async fn serve(self: Arc<Self>, paths: Vec<SecretPath>) {
        let detect = async {
            for path in paths {
                let _ = self.engine(&path).await;
            }
        };
        tokio::join!(self.clone().run_renewer(), detect);
    }

    fn on_session_change(&self, sink: SessionSink) {
        *self.session_sink.lock() = Some(sink);
        self.session_changed();
    }

    fn resume(&self, session: Session) -> bool {
        if self.is_static_token() || self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let Some(state) = TokenState::resumed(session) else {
            return false;
        };
        *self.token.lock() = Some(state);
        self.token_changed.notify_one();
        self.session_changed();
        true
    }

    /// Revokes a token this process obtained by logging in (never a token it was given).
    async fn revoke(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.metrics.forget_volume(&self.volume);
        if self.is_static_token() {
            return;
        }
        let Some(token) = self.token.lock().take().map(|t| t.token) else {
            return;
        };
        self.session_changed();
        let revoke = self.send(
            "revoke",
            Method::POST,
            "auth/token/revoke-self",
            None,
            Some(&token),
        );
        // Bounded: an unpublish must not queue for long behind other volumes' requests.
        match tokio::time::timeout(REVOKE_WAIT, revoke).await {
            Ok(Ok(_)) => tracing::info!(volume = %self.volume, "Vault token revoked"),
            Ok(Err(err)) => {
                tracing::warn!(volume = %self.volume, error = %err, "could not revoke the Vault token")
            }
            Err(_) => {
                tracing::warn!(volume = %self.volume, "could not revoke the Vault token: no answer within {REVOKE_WAIT:?}; it expires at its TTL")
            }
        }
    }
}

/// The path to write instead of `path`, a KV v2 path of mount `prefix` given as the API path
/// (`secret/data/app/db`, whose `rest` below the mount starts with `data/`): vaultfs adds
/// `data/` itself, as `vault kv get` does, so it is to be written `secret/app/db`.
fn without_data_prefix(prefix: &str, rest: &str) -> Option<String> {
    rest.strip_prefix("data/")
        .filter(|r| !r.is_empty())
        .map(|r| format!("{prefix}{r}"))
}

impl VaultSource {
    /// A KV v2 read of `path` was not found: if it was written with the API's `data/`, says
    /// how to write it, once per path.
    fn warn_of_data_prefix(&self, path: &SecretPath, prefix: &str, rest: &str) {
        let Some(instead) = without_data_prefix(prefix, rest) else {
            return;
        };
        if self.data_prefix_warned.lock().insert(path.clone()) {
            tracing::warn!(
                volume = %self.volume,
                vault_path = path.as_str(),
                "not found: {prefix} is a KV v2 mount and vaultfs adds `data/` to its paths itself; write the path {instead}, as for `vault kv get`"
            );
        }
    }
}

impl SecretSource for VaultSource {
    async fn read(&self, path: &SecretPath) -> Result<Fetched, SourceError> {
        let (engine, prefix) = self.engine(path).await?;
        let rest = &path.as_str()[prefix.len()..];
        match engine {
            Engine::KvV2 => {
                let answer = self
                    .authed("read", Method::GET, &format!("{prefix}data/{rest}"), None)
                    .await;
                if matches!(answer, Err(SourceError::NotFound)) {
                    self.warn_of_data_prefix(path, &prefix, rest);
                }
                let body = answer?;
                let version = body
                    .pointer("/data/metadata/version")
                    .and_then(Value::as_u64)
                    .map(Version);
                let data = take_data(body, "/data/data")?;
                Ok(Fetched {
                    version,
                    data,
                    lease: None,
                })
            }
            Engine::KvV1 | Engine::Logical => {
                let body = self
                    .authed("read", Method::GET, path.as_str(), None)
                    .await?;
                let lease = lease_of(&body);
                Ok(Fetched {
                    version: None,
                    data: take_data(body, "/data")?,
                    lease,
                })
            }
        }
    }

    async fn current_version(&self, path: &SecretPath) -> Result<Option<Version>, SourceError> {
        let (engine, prefix) = self.engine(path).await?;
        if engine != Engine::KvV2 {
            return Ok(None);
        }
        if self.no_metadata.lock().contains(path) {
            return Ok(None);
        }
        let rest = &path.as_str()[prefix.len()..];
        let answer = self
            .authed(
                "metadata",
                Method::GET,
                &format!("{prefix}metadata/{rest}"),
                None,
            )
            .await;
        let body = match answer {
            Err(SourceError::PermissionDenied) => {
                // Policies often grant data but not metadata: compare by reading instead.
                self.no_metadata.lock().insert(path.clone());
                return Ok(None);
            }
            other => other?,
        };
        let Some(current) = body
            .pointer("/data/current_version")
            .and_then(Value::as_u64)
        else {
            return Ok(None);
        };
        let version = &body["data"]["versions"][current.to_string()];
        let deleted = version["deletion_time"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
            || version["destroyed"].as_bool() == Some(true);
        if deleted {
            return Err(SourceError::NotFound);
        }
        Ok(Some(Version(current)))
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        increment: Duration,
    ) -> Result<Duration, SourceError> {
        self.metrics.vault_lease_renewal(&self.volume);
        let body = json!({"lease_id": lease.id, "increment": increment.as_secs()});
        let answer = self
            .authed("renew_lease", Method::PUT, "sys/leases/renew", Some(body))
            .await?;
        Ok(Duration::from_secs(ttl_from(&answer["lease_duration"])))
    }

    fn server_recoveries(&self) -> u64 {
        self.server.recoveries()
    }

    async fn revoke_lease(&self, lease: &Lease) -> Result<(), SourceError> {
        let body = json!({"lease_id": lease.id});
        self.authed("revoke_lease", Method::PUT, "sys/leases/revoke", Some(body))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_login_that_failed_in_an_outage_is_tried_again_as_soon_as_the_server_is_back() {
        use std::sync::atomic::AtomicBool;
        // Hangs while `frozen`, else answers every request with a login.
        let frozen = Arc::new(AtomicBool::new(true));
        let logins = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, n) = (frozen.clone(), logins.clone());
        let (addr, _) = test_server::serve(move |head| {
            if f.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(3600));
            }
            if head.contains("/login") {
                n.fetch_add(1, Ordering::SeqCst);
            }
            test_server::json_answer(
                "200 OK",
                r#"{"auth":{"client_token":"fresh","lease_duration":3600,"renewable":true}}"#,
                false,
            )
        });
        let server = Arc::new(
            VaultServer::new(&test_server::config(&addr, Duration::from_millis(300))).unwrap(),
        );
        let auth = Auth::Login {
            method: LoginMethod::Jwt,
            mount: "jwt".into(),
            role: "app".into(),
            credential: Credential::Value(Token::new("a-jwt".into())),
        };
        let source = VaultSource::new(
            server.clone(),
            auth,
            "test-volume".into(),
            Arc::new(Metrics::new()),
        );
        let err = source.login().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(!server.is_up());
        frozen.store(false, Ordering::SeqCst);
        let back = std::time::Instant::now();
        while !server.is_up() {
            assert!(back.elapsed() < Duration::from_secs(3), "never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Well within MIN_RELOGIN_INTERVAL of the failure, which is not repeated.
        source
            .login()
            .await
            .expect("the server is back: log in again");
        assert_eq!(logins.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn only_answers_with_a_lease_id_carry_a_lease() {
        let dynamic = json!({
            "lease_id": "database/creds/app/abc",
            "lease_duration": 3600,
            "renewable": true,
            "data": {}
        });
        let lease = lease_of(&dynamic).expect("a lease");
        assert_eq!(
            (lease.duration, lease.renewable),
            (Duration::from_secs(3600), true)
        );
        assert!(
            !format!("{lease:?}").contains("abc"),
            "lease ids stay out of Debug"
        );
        let kv1 = json!({"lease_id": "", "lease_duration": 2764800, "data": {}});
        assert_eq!(lease_of(&kv1), None);
    }

    #[test]
    fn huge_ttls_from_vault_are_clamped_instead_of_overflowing_the_clock() {
        let now = Instant::now();
        let ttl = ttl_from(&json!(u64::MAX));
        assert!(now.checked_add(Duration::from_secs(ttl)).is_some());
        assert_eq!(ttl_from(&json!(3600)), 3600);
        assert_eq!(ttl_from(&json!("junk")), 0);
    }

    #[test]
    fn kv2_paths_written_with_data_are_told_the_path_without_it() {
        assert_eq!(
            without_data_prefix("secret/", "data/app/db").as_deref(),
            Some("secret/app/db")
        );
        assert_eq!(
            without_data_prefix("kv/team/", "data/x").as_deref(),
            Some("kv/team/x")
        );
        assert_eq!(without_data_prefix("secret/", "app/data/db"), None);
        assert_eq!(without_data_prefix("secret/", "data/"), None);
        assert_eq!(without_data_prefix("secret/", "database"), None);
    }

    /// Log lines written while it is the thread's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_kv2_path_written_with_data_that_is_not_found_is_warned_of_once() {
        let (addr, _) = test_server::serve(|head| {
            if head.contains("/sys/internal/ui/mounts/") {
                test_server::json_answer(
                    "200 OK",
                    r#"{"data":{"path":"secret/","type":"kv","options":{"version":"2"}}}"#,
                    false,
                )
            } else {
                test_server::json_answer("404 Not Found", r#"{"errors":[]}"#, false)
            }
        });
        let server = Arc::new(
            VaultServer::new(&test_server::config(&addr, Duration::from_secs(5))).unwrap(),
        );
        let source = VaultSource::new(
            server,
            Auth::Token(Token::new("s.sometoken".into())),
            "test-volume".into(),
            Arc::new(Metrics::new()),
        );
        let logs = Captured::default();
        let writer = logs.clone();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        let doubled = SecretPath::parse("secret/data/app/db").unwrap();
        let plain = SecretPath::parse("secret/app/missing").unwrap();
        for path in [&doubled, &doubled, &plain] {
            let Err(err) = source.read(path).await else {
                panic!("{path} found");
            };
            assert_eq!(err, SourceError::NotFound);
        }
        let logs = String::from_utf8(logs.0.lock().clone()).unwrap();
        let hints: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("adds `data/`"))
            .collect();
        assert_eq!(hints.len(), 1, "once, for the doubled path only:\n{logs}");
        assert!(hints[0].contains("write the path secret/app/db"), "{logs}");
        assert!(hints[0].contains("secret/data/app/db"), "{logs}");
        assert!(!logs.contains("sometoken"), "{logs}");
    }

    #[test]
    fn kv2_answer_yields_fields_and_missing_data_is_not_found() {
        let body = json!({"data": {"data": {"password": "pw"}, "metadata": {"version": 3}}});
        let data = take_data(body, "/data/data").unwrap();
        assert_eq!(data.render(Some("password")).unwrap().expose(), b"pw");
        let deleted = json!({"data": {"data": null, "metadata": {"version": 4}}});
        assert_eq!(
            take_data(deleted, "/data/data").unwrap_err(),
            SourceError::NotFound
        );
    }
}
