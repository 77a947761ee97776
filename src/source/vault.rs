//! The real `SecretSource`: Vault's (and OpenBao's) HTTP API over reqwest. The only module that
//! knows URLs, headers, auth methods, token renewal and KV engine detection. A `VaultSource`
//! (one identity, one volume) is composed of owned parts: its `Client` (`client`: the server,
//! its cap on requests, its metrics), its token life `Tokens` (`auth`) and what it learnt of
//! engines `Engines` (`engine`); this file composes them into the secret reads. The server is
//! `http` (address, URLs, TLS, caps) with `exchange` (one request's answer, body limit,
//! clean-up) and `health` (whether it answers, shared by every identity on it); `servers`
//! makes a volume's identity from a source-neutral `Login`; `pki` issues certificates (a
//! certificate entry's path is read by issuing one).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use super::{Fetched, Identity, Lease, SecretSource, Session, SessionSink, SourceError, Version};
use crate::metrics::Metrics;
use crate::secret::{wipe_json, SecretData, Token};
use crate::spec::SecretPath;

mod auth;
mod client;
mod engine;
mod exchange;
mod health;
mod http;
mod pki;
mod servers;

#[cfg(test)]
mod test_server;

use auth::Tokens;
pub use auth::MIN_RELOGIN_INTERVAL;
use client::Client;
use engine::{Engine, Engines};
use http::RequestKind;
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

/// One identity at a Vault server (one volume's): its requests, its token life and what it
/// learnt of the engines serving its paths.
pub struct VaultSource {
    client: Client,
    tokens: Tokens,
    engines: Engines,
}

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

impl VaultSource {
    /// An identity on `server` serving `volume` (a label for logs and metrics). Nothing is
    /// sent until the first request.
    pub fn new(
        server: Arc<VaultServer>,
        auth: Auth,
        volume: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client: Client::new(server, volume, metrics),
            tokens: Tokens::new(auth),
            engines: Engines::default(),
        }
    }

    /// One request with this identity's token (see `Tokens::authed`).
    async fn authed(
        &self,
        kind: RequestKind,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, SourceError> {
        self.tokens
            .authed(&self.client, kind, method, path, body)
            .await
    }

    /// The engine serving `path` and the path's mount prefix.
    async fn engine(&self, path: &SecretPath) -> Result<(Engine, String), SourceError> {
        let shared = self.client.server().mounts();
        self.engines
            .engine(path, shared, |api_path| async move {
                self.authed(RequestKind::Mounts, Method::GET, &api_path, None)
                    .await
            })
            .await
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
        self.tokens.set_credential(credential);
    }

    /// Logs in now (for callers that want a refused login to fail early). A no-op for tokens.
    async fn login(&self) -> Result<(), SourceError> {
        self.tokens.login(&self.client).await
    }

    /// Renews the token, and learns which secret engine serves each path ahead of the first
    /// read so that a cold read costs one round trip (errors are left for the first read).
    async fn serve(self: Arc<Self>, paths: Vec<SecretPath>) {
        tokio::join!(
            self.tokens.run_renewer(&self.client),
            self.clone().learn(paths)
        );
    }

    /// Finds which secret engine serves each of `paths` (errors are left for the first read).
    async fn learn(self: Arc<Self>, paths: Vec<SecretPath>) {
        for path in paths {
            let _ = self.engine(&path).await;
        }
    }

    async fn ready(&self) -> Result<(), SourceError> {
        self.tokens.ready(&self.client).await
    }

    fn on_session_change(&self, sink: SessionSink) {
        self.tokens.on_session_change(sink);
    }

    fn resume(&self, session: Session) -> bool {
        self.tokens.resume(session)
    }

    /// Revokes a token this process obtained by logging in (never a token it was given).
    async fn revoke(&self) {
        // Closed first: no read that starts now records metrics under the forgotten label.
        self.tokens.close();
        self.client.metrics().forget_volume(self.client.volume());
        self.tokens.revoke(&self.client).await;
    }
}

impl SecretSource for VaultSource {
    async fn read(&self, path: &SecretPath) -> Result<Fetched, SourceError> {
        if let Some(request) = path.certificate_request() {
            let body = pki::issue_body(request);
            let answer = self
                .authed(RequestKind::Issue, Method::POST, &request.path, Some(body))
                .await?;
            return pki::issued(answer, request);
        }
        let (engine, prefix) = self.engine(path).await?;
        let rest = &path.as_str()[prefix.len()..];
        match engine {
            Engine::KvV2 => {
                let api_path = format!("{prefix}data/{rest}");
                let answer = self
                    .authed(RequestKind::Read, Method::GET, &api_path, None)
                    .await;
                if matches!(answer, Err(SourceError::NotFound)) {
                    let volume = self.client.volume();
                    self.engines
                        .warn_of_data_prefix(volume, path, &prefix, rest);
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
                    .authed(RequestKind::Read, Method::GET, path.as_str(), None)
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
        if path.certificate_request().is_some() {
            return Ok(None);
        }
        let (engine, prefix) = self.engine(path).await?;
        if engine != Engine::KvV2 {
            return Ok(None);
        }
        if !self.engines.has_metadata(path) {
            return Ok(None);
        }
        let rest = &path.as_str()[prefix.len()..];
        let answer = self
            .authed(
                RequestKind::Metadata,
                Method::GET,
                &format!("{prefix}metadata/{rest}"),
                None,
            )
            .await;
        let body = match answer {
            Err(SourceError::PermissionDenied) => {
                // Policies often grant data but not metadata: compare by reading instead.
                self.engines.metadata_refused(path);
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
        let client = &self.client;
        client.metrics().vault_lease_renewal(client.volume());
        let body = json!({"lease_id": lease.id, "increment": increment.as_secs()});
        let answer = self
            .authed(
                RequestKind::RenewLease,
                Method::PUT,
                "sys/leases/renew",
                Some(body),
            )
            .await?;
        Ok(Duration::from_secs(ttl_from(&answer["lease_duration"])))
    }

    fn server_recoveries(&self) -> u64 {
        self.client.server().recoveries()
    }

    async fn revoke_lease(&self, lease: &Lease) -> Result<(), SourceError> {
        match pki::revocation(lease) {
            None => {}
            // A certificate kept until it expires (the entry does not ask for revocation).
            Some(None) => return Ok(()),
            Some(Some((path, serial))) => {
                let body = json!({ "serial_number": serial });
                return self
                    .authed(
                        RequestKind::RevokeCertificate,
                        Method::POST,
                        &path,
                        Some(body),
                    )
                    .await
                    .map(|_| ());
            }
        }
        let body = json!({"lease_id": lease.id});
        self.authed(
            RequestKind::RevokeLease,
            Method::PUT,
            "sys/leases/revoke",
            Some(body),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::time::Instant;

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
