//! The real `SecretSource`: Vault's (and OpenBao's) HTTP API over reqwest. The only module that
//! knows URLs, headers, auth methods, token renewal and KV engine detection. `http` holds the
//! request layer (address, URLs, caps, TLS); this file the token state machine and engines.

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
use zeroize::Zeroizing;

use super::{pacing, Fetched, Lease, SecretSource, SourceError, Version};
use crate::metrics::Metrics;
use crate::secret::{wipe_json, SecretData, Token};
use crate::spec::SecretPath;

mod http;

pub use http::{
    ServerConfig, ServerLimits, VaultConfigError, VaultServer, DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_REQUESTS_PER_IDENTITY, DEFAULT_MAX_RESPONSE_BYTES,
};

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

/// First wait after a failed renewal or re-login; doubles per failure up to the max.
const RENEW_RETRY: Duration = Duration::from_secs(5);
const MAX_RENEW_RETRY: Duration = Duration::from_secs(300);

/// At most one login per volume in this interval is triggered by a refused request: a 403
/// this soon after a login comes from a policy, not from a dead token, so a loop of forbidden
/// reads cannot turn into a loop of logins.
pub const MIN_RELOGIN_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    KvV1,
    KvV2,
    Logical,
}

struct TokenState {
    token: Token,
    /// `None` for tokens that never expire.
    expires_at: Option<Instant>,
    /// The TTL a fresh token gets (a login's TTL; for a given token, its creation TTL): a
    /// renewal granting less has reached the max TTL.
    full_ttl: Duration,
    /// What the renewer does next with this token.
    next: TokenStep,
    /// Consecutive failed renewer steps (for the back-off).
    failures: u32,
}

/// The renewer's next step for the current token (see `pacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenStep {
    /// A given token whose TTL is not known yet: look it up at this instant.
    LookUp(Instant),
    Renew(Instant),
    /// Log in again at this instant (shortly before the token expires).
    Replace(Instant),
    /// Nothing to do: the token never expires, cannot be renewed at a sane pace, or is a given
    /// token that cannot be replaced. The first use after it expires logs in (login methods).
    Idle,
}

impl TokenState {
    fn given(token: Token) -> Self {
        Self {
            token,
            expires_at: None,
            full_ttl: Duration::ZERO,
            next: TokenStep::LookUp(Instant::now()),
            failures: 0,
        }
    }

    fn valid(&self) -> bool {
        self.expires_at.is_none_or(|e| e > Instant::now())
    }
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
    /// Set by `revoke`: no further logins (an unpublished volume stays dead).
    closed: AtomicBool,
    /// This identity's policy refuses `auth/token/lookup-self`: a 403 cannot be told apart from
    /// a dead token, so it is taken as a policy denial (expiry is still tracked by the TTL).
    lookup_forbidden: AtomicBool,
    /// When the last login completed (see `MIN_RELOGIN_INTERVAL`).
    last_login: Mutex<Option<Instant>>,
    /// This identity's cap on Vault requests in flight.
    in_flight: Arc<Semaphore>,
    /// Wakes the renewer when the token is replaced or its schedule changes.
    token_changed: tokio::sync::Notify,
    /// The volume this identity serves, as named in logs and metric labels.
    volume: String,
    metrics: Arc<Metrics>,
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

fn error_class(err: &SourceError) -> &'static str {
    match err {
        SourceError::NotFound => "not_found",
        SourceError::PermissionDenied => "forbidden",
        SourceError::Unavailable(_) => "unavailable",
        SourceError::Invalid(_) => "invalid",
        SourceError::LoginRefused(_) => "login_refused",
        SourceError::TooLarge(_) => "too_large",
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
            closed: AtomicBool::new(false),
            lookup_forbidden: AtomicBool::new(false),
            last_login: Mutex::new(None),
            in_flight,
            token_changed: tokio::sync::Notify::new(),
            volume,
            metrics,
        }
    }

    /// Replaces the login credential (a fresh service-account token from a CSI republish).
    /// The current Vault token stays in use until it expires or is refused.
    pub fn set_credential(&self, credential: Credential) {
        *self.credential.lock() = Some(credential);
    }

    /// Logs in now (for callers that want a refused login to fail early). A no-op for tokens.
    pub async fn login(&self) -> Result<(), SourceError> {
        match self.auth {
            Auth::Token(_) => Ok(()),
            Auth::Login { .. } => {
                let old = self.token.lock().take().map(|t| t.token);
                self.relogin(None).await?;
                if let Some(old) = old {
                    self.server.revoke_in_background(old, &self.in_flight);
                }
                Ok(())
            }
        }
    }

    /// Learns which secret engine serves each path ahead of the first read, so that a cold
    /// read costs one round trip. Reads no secret; errors are left for the first read.
    pub async fn detect_engines(&self, paths: Vec<SecretPath>) {
        for path in paths {
            let _ = self.engine(&path).await;
        }
    }

    /// Keeps the token alive, paced by `pacing::plan`: looks a given token up to learn its TTL,
    /// renews it two thirds into each TTL (never more often than `MIN_RENEW_INTERVAL`), and
    /// once Vault stops extending it (max TTL) logs in again shortly before it expires instead
    /// of renewing. Runs until the task is dropped.
    pub async fn run_renewer(self: Arc<Self>) {
        loop {
            let step = self
                .token
                .lock()
                .as_ref()
                .map(|t| (t.token.clone(), t.next));
            let (token, at) = match step {
                Some((
                    token,
                    TokenStep::LookUp(at) | TokenStep::Renew(at) | TokenStep::Replace(at),
                )) => (token, at),
                Some((_, TokenStep::Idle)) | None => {
                    self.token_changed.notified().await;
                    continue;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.token_changed.notified() => continue,
            }
            let Some(step) = self.step_of(&token) else {
                continue;
            };
            let result = match step {
                TokenStep::LookUp(_) => self.lookup_self(&token).await,
                TokenStep::Renew(_) => self.renew_self(&token).await,
                TokenStep::Replace(_) => self.relogin(Some(&token)).await.map(drop),
                TokenStep::Idle => continue,
            };
            if let Err(err) = result {
                self.renewal_failed(&token, step, &err);
            }
        }
    }

    /// The scheduled step of `token` if it is still the current token.
    fn step_of(&self, token: &Token) -> Option<TokenStep> {
        let slot = self.token.lock();
        slot.as_ref().filter(|t| &t.token == token).map(|t| t.next)
    }

    /// After a failed renewer step: a login token whose renewal Vault refused is dropped (the
    /// next request logs in); a given token Vault will not renew or describe is left alone until
    /// it expires; anything else is tried again with a back-off.
    fn renewal_failed(&self, token: &Token, step: TokenStep, err: &SourceError) {
        let mut slot = self.token.lock();
        let Some(state) = slot.as_mut().filter(|t| &t.token == token) else {
            return;
        };
        let refused = !err.is_transient();
        match step {
            TokenStep::Renew(_) if refused && !self.is_static_token() => {
                tracing::warn!(volume = %self.volume, error = %err, "Vault refused to renew the token; the next request logs in again");
                slot.take();
            }
            TokenStep::LookUp(_) | TokenStep::Renew(_) if refused => {
                tracing::warn!(volume = %self.volume, error = %err, "Vault will not renew or describe the given token; it is used as it is until it expires");
                state.next = TokenStep::Idle;
            }
            _ => {
                state.failures = state.failures.saturating_add(1);
                let wait = pacing::retry_in(RENEW_RETRY, state.failures, MAX_RENEW_RETRY);
                let at = Instant::now() + wait;
                tracing::warn!(volume = %self.volume, error = %err, retry_in = ?wait, "could not renew the Vault token or log in again; retrying");
                state.next = match step {
                    TokenStep::LookUp(_) => TokenStep::LookUp(at),
                    TokenStep::Replace(_) => TokenStep::Replace(at),
                    TokenStep::Renew(_) | TokenStep::Idle => TokenStep::Renew(at),
                };
            }
        }
    }

    /// Revokes a token this process obtained by logging in (never a token it was given).
    pub async fn revoke(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.metrics.forget_volume(&self.volume);
        if self.is_static_token() {
            return;
        }
        let Some(token) = self.token.lock().take().map(|t| t.token) else {
            return;
        };
        match self
            .send(
                "revoke",
                Method::POST,
                "auth/token/revoke-self",
                None,
                Some(&token),
            )
            .await
        {
            Ok(_) => tracing::info!("Vault token revoked"),
            Err(err) => tracing::warn!(error = %err, "could not revoke the Vault token"),
        }
    }

    fn is_static_token(&self) -> bool {
        matches!(self.auth, Auth::Token(_))
    }

    async fn lookup_self(&self, token: &Token) -> Result<(), SourceError> {
        let body = self
            .send(
                "lookup",
                Method::GET,
                "auth/token/lookup-self",
                None,
                Some(token),
            )
            .await?;
        let mut body = body;
        let data = &body["data"];
        let ttl = Duration::from_secs(ttl_from(&data["ttl"]));
        let creation_ttl = Duration::from_secs(ttl_from(&data["creation_ttl"]));
        let renewable = data["renewable"].as_bool().unwrap_or(false);
        // The answer names the token's accessor and more: nothing of it is kept.
        wipe_json(&mut body);
        self.schedule(token, false, ttl, creation_ttl.max(ttl), renewable);
        Ok(())
    }

    async fn renew_self(&self, token: &Token) -> Result<(), SourceError> {
        self.metrics.vault_token_renewal(&self.volume);
        let body = self
            .send(
                "renew",
                Method::POST,
                "auth/token/renew-self",
                Some(json!({})),
                Some(token),
            )
            .await?;
        let mut body = body;
        let auth = &body["auth"];
        let granted = Duration::from_secs(ttl_from(&auth["lease_duration"]));
        let renewable = auth["renewable"].as_bool().unwrap_or(false);
        // The answer carries the token itself.
        wipe_json(&mut body);
        let full = self.token.lock().as_ref().map_or(granted, |t| t.full_ttl);
        self.schedule(token, false, granted, full, renewable);
        tracing::debug!(volume = %self.volume, ttl = ?granted, "Vault token renewed");
        Ok(())
    }

    /// Records what Vault granted for `token` and plans the renewer's next step. A `fresh`
    /// token (from a login) replaces the current one; otherwise the answer is recorded only if
    /// `token` is still the current token.
    fn schedule(
        &self,
        token: &Token,
        fresh: bool,
        granted: Duration,
        full: Duration,
        renewable: bool,
    ) {
        let now = Instant::now();
        let plan = pacing::plan(granted, full, renewable);
        let next = match plan {
            pacing::Plan::RenewIn(after) => TokenStep::Renew(now + after),
            pacing::Plan::ReplaceIn(after) if !self.is_static_token() => {
                TokenStep::Replace(now + after)
            }
            pacing::Plan::ReplaceIn(_) => {
                tracing::warn!(volume = %self.volume, expires_in = ?granted, "the given Vault token cannot be renewed any further; vaultfs stops renewing it");
                TokenStep::Idle
            }
            pacing::Plan::Keep | pacing::Plan::Lapse => TokenStep::Idle,
        };
        let expires_at = (!granted.is_zero()).then(|| now + granted);
        let mut slot = self.token.lock();
        if !fresh && slot.as_ref().is_none_or(|t| &t.token != token) {
            return;
        }
        *slot = Some(TokenState {
            token: token.clone(),
            expires_at,
            full_ttl: full,
            next,
            failures: 0,
        });
        drop(slot);
        self.token_changed.notify_one();
    }

    /// A token to use now: the current one while it is valid, else a fresh login.
    async fn token(&self) -> Result<Token, SourceError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SourceError::LoginRefused(
                "this volume was unpublished; its Vault identity is closed".into(),
            ));
        }
        if let Some(t) = self.token.lock().as_ref().filter(|t| t.valid()) {
            return Ok(t.token.clone());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(SourceError::LoginRefused(
                "this volume was unpublished; its Vault identity is closed".into(),
            ));
        }
        if self.is_static_token() {
            return Err(SourceError::PermissionDenied);
        }
        self.relogin(None).await
    }

    /// Logs in with the current credential, one login at a time. `refused` is the token Vault
    /// just refused or the renewer replaces, if any: a different valid token obtained meanwhile
    /// is used instead, and once a login replaced it, it is revoked in the background (it may
    /// still be valid).
    async fn relogin(&self, refused: Option<&Token>) -> Result<Token, SourceError> {
        let _one = self.login_lock.lock().await;
        if let Some(t) = self.token.lock().as_ref() {
            if t.valid() && refused.is_none_or(|r| r != &t.token) {
                return Ok(t.token.clone());
            }
        }
        let fresh = self.log_in().await?;
        *self.last_login.lock() = Some(Instant::now());
        if let Some(old) = refused.filter(|old| *old != &fresh) {
            if !self.is_static_token() {
                self.server
                    .revoke_in_background(old.clone(), &self.in_flight);
            }
        }
        Ok(fresh)
    }

    /// One login request with the current credential; the new token becomes the current one.
    async fn log_in(&self) -> Result<Token, SourceError> {
        let Auth::Login {
            method,
            mount,
            role,
            ..
        } = &self.auth
        else {
            return Err(SourceError::PermissionDenied);
        };
        let credential = self.credential.lock().clone();
        let secret = match credential {
            Some(Credential::Value(t)) => t,
            Some(Credential::File(path)) => {
                match std::fs::read_to_string(&path).map(Zeroizing::new) {
                    Ok(s) => Token::new(s.trim().to_string()),
                    Err(e) => {
                        return Err(SourceError::Invalid(format!(
                            "cannot read the login credential file {}: {e}",
                            path.display()
                        )))
                    }
                }
            }
            None => return Err(SourceError::Invalid("no login credential".into())),
        };
        let body = match method {
            LoginMethod::AppRole => json!({"role_id": role, "secret_id": secret.expose()}),
            LoginMethod::Kubernetes | LoginMethod::Jwt => {
                json!({"role": role, "jwt": secret.expose()})
            }
        };
        let mount = mount.trim_matches('/');
        self.metrics.vault_login(&self.volume);
        let answer = self
            .send(
                "login",
                Method::POST,
                &format!("auth/{mount}/login"),
                Some(body),
                None,
            )
            .await
            .map_err(|err| match err {
                SourceError::PermissionDenied | SourceError::NotFound => SourceError::LoginRefused(
                    format!("Vault refused the login to auth/{mount} as role {role:?}: {err}"),
                ),
                SourceError::Invalid(detail) => SourceError::LoginRefused(format!(
                    "Vault refused the login to auth/{mount} as role {role:?}: {detail}"
                )),
                other => other,
            })?;
        let mut answer = answer;
        let token = answer["auth"]["client_token"]
            .as_str()
            .map(|s| Token::new(s.to_string()));
        let auth = &answer["auth"];
        let ttl = Duration::from_secs(ttl_from(&auth["lease_duration"]));
        let renewable = auth["renewable"].as_bool().unwrap_or(false);
        // The answer carries the token (and its accessor): only `token` keeps it.
        wipe_json(&mut answer);
        let token = token
            .ok_or_else(|| SourceError::Invalid("login answer has no auth.client_token".into()))?;
        self.schedule(&token, true, ttl, ttl, renewable);
        tracing::info!(volume = %self.volume, mount = %mount, role = %role, ttl = ?ttl, "logged in to Vault");
        Ok(token)
    }

    /// One authenticated request. With a login method, a 403 may mean the token was revoked
    /// or expired: unless it comes within `MIN_RELOGIN_INTERVAL` of a login, and if
    /// `auth/token/lookup-self` confirms the token is dead, log in again once and retry.
    async fn authed(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, SourceError> {
        let token = self.token().await?;
        let mut body = body;
        let first = self
            .send(kind, method.clone(), path, body.clone(), Some(&token))
            .await;
        let result = match first {
            Err(SourceError::PermissionDenied) if !self.is_static_token() => {
                self.after_denial(kind, method, path, &mut body, &token)
                    .await
            }
            other => other,
        };
        if let Some(b) = body.as_mut() {
            wipe_json(b);
        }
        result
    }

    /// After a 403 to a login identity: retry once with a newer token if a login replaced
    /// `token` meanwhile (the replaced one is being revoked); else, if `token` may be dead and
    /// lookup-self confirms it, log in again and retry once. Anything else is a policy denial.
    async fn after_denial(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: &mut Option<Value>,
        token: &Token,
    ) -> Result<Value, SourceError> {
        let newer = {
            let slot = self.token.lock();
            slot.as_ref()
                .filter(|t| &t.token != token && t.valid())
                .map(|t| t.token.clone())
        };
        if let Some(current) = newer {
            return self
                .send(kind, method, path, body.take(), Some(&current))
                .await;
        }
        if !self.may_be_dead_token() || !self.lookup_refused(token).await {
            return Err(SourceError::PermissionDenied);
        }
        let fresh = self.relogin(Some(token)).await?;
        let retry = self
            .send(kind, method, path, body.take(), Some(&fresh))
            .await;
        if retry == Err(SourceError::PermissionDenied) {
            // Refused again with a fresh token: a policy denial. Learn whether lookup-self is
            // refused too, so that further denials skip straight to that answer.
            self.lookup_refused(&fresh).await;
        }
        retry
    }

    /// Whether a 403 may come from a dead token rather than a policy: a login identity whose
    /// policy allows `lookup-self`, and whose last login is not so recent that the token
    /// must still be alive.
    fn may_be_dead_token(&self) -> bool {
        !self.is_static_token()
            && !self.lookup_forbidden.load(Ordering::Relaxed)
            && self
                .last_login
                .lock()
                .is_none_or(|at| at.elapsed() >= MIN_RELOGIN_INTERVAL)
    }

    /// Asks Vault whether `token` still works (`auth/token/lookup-self`): `true` when Vault
    /// refuses the lookup. A refusal of a token fresh from a login (within
    /// `MIN_RELOGIN_INTERVAL`) means the policy forbids lookup-self; that is remembered.
    async fn lookup_refused(&self, token: &Token) -> bool {
        let fresh = self
            .last_login
            .lock()
            .is_some_and(|at| at.elapsed() < MIN_RELOGIN_INTERVAL);
        let answer = self
            .send(
                "lookup",
                Method::GET,
                "auth/token/lookup-self",
                None,
                Some(token),
            )
            .await;
        match answer {
            Err(SourceError::PermissionDenied) => {
                if fresh && !self.lookup_forbidden.swap(true, Ordering::Relaxed) {
                    tracing::info!(volume = %self.volume, "this identity may not call auth/token/lookup-self: refused requests are taken as policy denials, without a new login");
                }
                true
            }
            Ok(mut body) => {
                wipe_json(&mut body);
                false
            }
            Err(_) => false,
        }
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

    /// The engine serving `path` and the path's mount prefix.
    async fn engine(&self, path: &SecretPath) -> Result<(Engine, String), SourceError> {
        let p = path.as_str();
        if let Some(found) = self.known_engine(path) {
            return Ok(found);
        }
        match self
            .authed(
                "mounts",
                Method::GET,
                &format!("sys/internal/ui/mounts/{p}"),
                None,
            )
            .await
        {
            Ok(body) => {
                let data = &body["data"];
                let prefix = data["path"].as_str().unwrap_or_default().to_string();
                let engine = match (data["type"].as_str(), data["options"]["version"].as_str()) {
                    (Some("kv") | Some("generic"), Some("2")) => Engine::KvV2,
                    (Some("kv") | Some("generic"), _) => Engine::KvV1,
                    _ => Engine::Logical,
                };
                if prefix.is_empty() || !p.starts_with(prefix.as_str()) {
                    self.undetectable
                        .lock()
                        .insert(path.clone(), Engine::Logical);
                    return Ok((Engine::Logical, String::new()));
                }
                tracing::debug!(mount = %prefix, engine = ?engine, "detected secret engine");
                self.mounts.lock().push((prefix.clone(), engine));
                Ok((engine, prefix))
            }
            // Not allowed to look (or an old server): read the path as written.
            Err(
                SourceError::PermissionDenied | SourceError::NotFound | SourceError::Invalid(_),
            ) => {
                self.undetectable
                    .lock()
                    .insert(path.clone(), Engine::Logical);
                Ok((Engine::Logical, String::new()))
            }
            Err(err) => Err(err),
        }
    }

    fn known_engine(&self, path: &SecretPath) -> Option<(Engine, String)> {
        if let Some(e) = self.undetectable.lock().get(path) {
            return Some((*e, String::new()));
        }
        self.mounts
            .lock()
            .iter()
            .filter(|(prefix, _)| path.as_str().starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .cloned()
            .map(|(prefix, engine)| (engine, prefix))
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

impl SecretSource for VaultSource {
    async fn read(&self, path: &SecretPath) -> Result<Fetched, SourceError> {
        let (engine, prefix) = self.engine(path).await?;
        let rest = &path.as_str()[prefix.len()..];
        match engine {
            Engine::KvV2 => {
                let body = self
                    .authed("read", Method::GET, &format!("{prefix}data/{rest}"), None)
                    .await?;
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
