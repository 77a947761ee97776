//! The token life of a `VaultSource` (`Tokens`): the current token and the renewer's plan for
//! it, logins (one at a time, at most one per `MIN_RELOGIN_INTERVAL` after a failure), the
//! renewer that looks up, renews and replaces the token, what a 403 means (a dead token worth
//! a new login, or a policy denial), the session handed to a successor, and the end (`revoke`).
//! Requests go through the identity's `Client`; no HTTP here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::client::Client;
use super::http::RequestKind;
use super::{ttl_from, Auth, Credential, LoginMethod};
use crate::secret::{wipe_json, Token};
use crate::source::{pacing, SourceError};
use crate::source::{NodeTime, Session, SessionSink, SessionStep};

#[cfg(test)]
mod tests;

/// First wait after a failed renewal or re-login; doubles per failure up to the max.
const RENEW_RETRY: Duration = Duration::from_secs(5);
const MAX_RENEW_RETRY: Duration = Duration::from_secs(300);

/// At most one login per volume in this interval is triggered by a refused request: a 403
/// this soon after a login comes from a policy, not from a dead token, so a loop of forbidden
/// reads cannot turn into a loop of logins.
pub const MIN_RELOGIN_INTERVAL: Duration = Duration::from_secs(5);

/// The longest an unpublish waits to revoke the volume's token.
const REVOKE_WAIT: Duration = Duration::from_secs(5);

/// One identity's token life. Every method that talks to Vault is given the identity's
/// `Client`.
pub(super) struct Tokens {
    auth: Auth,
    /// The login credential, replaceable (`set_credential`); `None` for a given token.
    credential: Mutex<Option<Credential>>,
    /// The current token and its plan; `None` before the first login and after a refusal.
    current: Mutex<Option<TokenState>>,
    login_lock: tokio::sync::Mutex<()>,
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
    /// Wakes the renewer when the token is replaced or its schedule changes.
    changed: tokio::sync::Notify,
    /// Told every change of the token (`Identity::on_session_change`).
    sink: Mutex<Option<SessionSink>>,
}

/// The current token and the renewer's plan for it.
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

    /// This state as a session a successor can take over.
    fn session(&self) -> Session {
        Session {
            token: self.token.clone(),
            expires_at: self.expires_at.map(NodeTime::of),
            full_ttl: self.full_ttl,
            next: match self.next {
                TokenStep::LookUp(at) => SessionStep::LookUp(NodeTime::of(at)),
                TokenStep::Renew(at) => SessionStep::Renew(NodeTime::of(at)),
                TokenStep::Replace(at) => SessionStep::Replace(NodeTime::of(at)),
                TokenStep::Idle => SessionStep::Idle,
            },
        }
    }

    /// A predecessor's session, with its plan; `None` once its token has expired.
    fn resumed(session: Session) -> Option<Self> {
        let state = Self {
            token: session.token,
            expires_at: session.expires_at.map(NodeTime::instant),
            full_ttl: session.full_ttl,
            next: match session.next {
                SessionStep::LookUp(at) => TokenStep::LookUp(at.instant()),
                SessionStep::Renew(at) => TokenStep::Renew(at.instant()),
                SessionStep::Replace(at) => TokenStep::Replace(at.instant()),
                SessionStep::Idle => TokenStep::Idle,
            },
            failures: 0,
        };
        state.valid().then_some(state)
    }
}

impl Tokens {
    /// The token life of `auth`: a given token is looked up first (to learn its TTL); a login
    /// method logs in at first use.
    pub(super) fn new(auth: Auth) -> Self {
        let (current, credential) = match &auth {
            Auth::Token(t) => (Some(TokenState::given(t.clone())), None),
            Auth::Login { credential, .. } => (None, Some(credential.clone())),
        };
        Self {
            auth,
            credential: Mutex::new(credential),
            current: Mutex::new(current),
            login_lock: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            lookup_forbidden: AtomicBool::new(false),
            last_login: Mutex::new(None),
            failed_login: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            sink: Mutex::new(None),
        }
    }

    /// A token given up front: renewed, never replaced, never revoked by vaultfs.
    fn is_static(&self) -> bool {
        matches!(self.auth, Auth::Token(_))
    }

    /// Replaces the login credential; a login refused with the old one is no reason to wait.
    pub(super) fn set_credential(&self, credential: Token) {
        *self.credential.lock() = Some(Credential::Value(credential));
        self.failed_login.lock().take();
    }

    /// Logs in now, replacing the current token (revoked in the background). A no-op for a
    /// given token.
    pub(super) async fn login(&self, client: &Client) -> Result<(), SourceError> {
        if self.is_static() {
            return Ok(());
        }
        let old = self.current.lock().take().map(|t| t.token);
        self.session_changed();
        self.relogin(client, None, false).await?;
        if let Some(old) = old {
            client.revoke_in_background(old);
        }
        Ok(())
    }

    /// A token to use now (the current one, the login in flight's, or a new login), or the
    /// recent login's refusal.
    pub(super) async fn ready(&self, client: &Client) -> Result<(), SourceError> {
        self.token(client).await.map(|_| ())
    }

    /// Tells `sink` every change of the session from now on, and the current one at once.
    pub(super) fn on_session_change(&self, sink: SessionSink) {
        *self.sink.lock() = Some(sink);
        self.session_changed();
    }

    /// Takes over a predecessor's session; `false` for a given token, a closed identity or an
    /// expired session.
    pub(super) fn resume(&self, session: Session) -> bool {
        if self.is_static() || self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let Some(state) = TokenState::resumed(session) else {
            return false;
        };
        *self.current.lock() = Some(state);
        self.changed.notify_one();
        self.session_changed();
        true
    }

    /// No further logins or reads from now on (`revoke` closes first too).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Closes the token life: no further logins; a token obtained by logging in is revoked
    /// (within `REVOKE_WAIT`), a given one left alone.
    pub(super) async fn revoke(&self, client: &Client) {
        self.close();
        if self.is_static() {
            return;
        }
        let Some(token) = self.current.lock().take().map(|t| t.token) else {
            return;
        };
        self.session_changed();
        let volume = client.volume();
        let revoke = client.send(
            RequestKind::Revoke,
            Method::POST,
            "auth/token/revoke-self",
            None,
            Some(&token),
        );
        // Bounded: an unpublish must not queue for long behind other volumes' requests.
        match tokio::time::timeout(REVOKE_WAIT, revoke).await {
            Ok(Ok(_)) => tracing::info!(volume, "Vault token revoked"),
            Ok(Err(err)) => {
                tracing::warn!(volume, error = %err, "could not revoke the Vault token")
            }
            Err(_) => {
                tracing::warn!(volume, "could not revoke the Vault token: no answer within {REVOKE_WAIT:?}; it expires at its TTL")
            }
        }
    }

    /// Keeps the token alive, paced by `pacing::plan`: looks a given token up to learn its TTL,
    /// renews it two thirds into each TTL (never more often than `MIN_RENEW_INTERVAL`), and
    /// once Vault stops extending it (max TTL) logs in again shortly before it expires instead
    /// of renewing. Runs until the future is dropped.
    pub(super) async fn run_renewer(&self, client: &Client) {
        loop {
            let step = self
                .current
                .lock()
                .as_ref()
                .map(|t| (t.token.clone(), t.next));
            let (token, at) = match step {
                Some((
                    token,
                    TokenStep::LookUp(at) | TokenStep::Renew(at) | TokenStep::Replace(at),
                )) => (token, at),
                Some((_, TokenStep::Idle)) | None => {
                    self.changed.notified().await;
                    continue;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.changed.notified() => continue,
            }
            let Some(step) = self.step_of(&token) else {
                continue;
            };
            let result = match step {
                TokenStep::LookUp(_) => self.lookup_self(client, &token).await,
                TokenStep::Renew(_) => self.renew_self(client, &token).await,
                TokenStep::Replace(_) => self.relogin(client, Some(&token), true).await.map(drop),
                TokenStep::Idle => continue,
            };
            if let Err(err) = result {
                self.renewal_failed(client, &token, step, &err);
            }
        }
    }

    /// The scheduled step of `token` if it is still the current token.
    fn step_of(&self, token: &Token) -> Option<TokenStep> {
        let current = self.current.lock();
        current
            .as_ref()
            .filter(|t| &t.token == token)
            .map(|t| t.next)
    }

    /// After a failed renewer step: a login token whose renewal Vault refused is dropped (the
    /// next request logs in); a given token Vault will not renew or describe is left alone until
    /// it expires; anything else is tried again with a back-off.
    fn renewal_failed(&self, client: &Client, token: &Token, step: TokenStep, err: &SourceError) {
        let volume = client.volume();
        let mut current = self.current.lock();
        let Some(state) = current.as_mut().filter(|t| &t.token == token) else {
            return;
        };
        let refused = !err.is_transient();
        match step {
            TokenStep::Renew(_) if refused && !self.is_static() => {
                tracing::warn!(volume, error = %err, "Vault refused to renew the token; the next request logs in again");
                current.take();
                drop(current);
                self.session_changed();
            }
            TokenStep::LookUp(_) | TokenStep::Renew(_) if refused => {
                tracing::warn!(volume, error = %err, "Vault will not renew or describe the given token; it is used as it is until it expires");
                state.next = TokenStep::Idle;
            }
            _ => {
                state.failures = state.failures.saturating_add(1);
                let wait = pacing::retry_in(RENEW_RETRY, state.failures, MAX_RENEW_RETRY);
                let at = Instant::now() + wait;
                tracing::warn!(volume, error = %err, retry_in = ?wait, "could not renew the Vault token or log in again; retrying");
                state.next = match step {
                    TokenStep::LookUp(_) => TokenStep::LookUp(at),
                    TokenStep::Replace(_) => TokenStep::Replace(at),
                    TokenStep::Renew(_) | TokenStep::Idle => TokenStep::Renew(at),
                };
            }
        }
    }

    /// Learns a given token's TTL (`auth/token/lookup-self`) and plans its renewal.
    async fn lookup_self(&self, client: &Client, token: &Token) -> Result<(), SourceError> {
        let mut body = send_lookup(client, token).await?;
        let data = &body["data"];
        let ttl = Duration::from_secs(ttl_from(&data["ttl"]));
        let creation_ttl = Duration::from_secs(ttl_from(&data["creation_ttl"]));
        let renewable = data["renewable"].as_bool().unwrap_or(false);
        // The answer names the token's accessor and more: nothing of it is kept.
        wipe_json(&mut body);
        self.schedule(client, token, false, ttl, creation_ttl.max(ttl), renewable);
        Ok(())
    }

    async fn renew_self(&self, client: &Client, token: &Token) -> Result<(), SourceError> {
        client.metrics().vault_token_renewal(client.volume());
        let mut body = client
            .send(
                RequestKind::Renew,
                Method::POST,
                "auth/token/renew-self",
                Some(json!({})),
                Some(token),
            )
            .await?;
        let auth = &body["auth"];
        let granted = Duration::from_secs(ttl_from(&auth["lease_duration"]));
        let renewable = auth["renewable"].as_bool().unwrap_or(false);
        // The answer carries the token itself.
        wipe_json(&mut body);
        let full = self.current.lock().as_ref().map_or(granted, |t| t.full_ttl);
        self.schedule(client, token, false, granted, full, renewable);
        tracing::debug!(volume = client.volume(), ttl = ?granted, "Vault token renewed");
        Ok(())
    }

    /// Records what Vault granted for `token` and plans the renewer's next step. A `fresh`
    /// token (from a login) replaces the current one; otherwise the answer is recorded only if
    /// `token` is still the current token.
    fn schedule(
        &self,
        client: &Client,
        token: &Token,
        fresh: bool,
        granted: Duration,
        full: Duration,
        renewable: bool,
    ) {
        let now = Instant::now();
        let next = match pacing::plan(granted, full, renewable) {
            pacing::Plan::RenewIn(after) => TokenStep::Renew(now + after),
            pacing::Plan::ReplaceIn(after) if !self.is_static() => TokenStep::Replace(now + after),
            pacing::Plan::ReplaceIn(_) => {
                tracing::warn!(volume = client.volume(), expires_in = ?granted, "the given Vault token cannot be renewed any further; vaultfs stops renewing it");
                TokenStep::Idle
            }
            pacing::Plan::Keep | pacing::Plan::Lapse => TokenStep::Idle,
        };
        let expires_at = (!granted.is_zero()).then(|| now + granted);
        let mut current = self.current.lock();
        if !fresh && current.as_ref().is_none_or(|t| &t.token != token) {
            return;
        }
        *current = Some(TokenState {
            token: token.clone(),
            expires_at,
            full_ttl: full,
            next,
            failures: 0,
        });
        drop(current);
        self.changed.notify_one();
        self.session_changed();
    }

    /// Tells the session sink, if any, the current session.
    fn session_changed(&self) {
        let Some(sink) = self.sink.lock().clone() else {
            return;
        };
        if self.is_static() {
            return;
        }
        // Read and told under the token's lock: of two calls, the later tells the later state.
        let current = self.current.lock();
        sink(current.as_ref().map(TokenState::session));
    }

    /// A token to use now: the current one while it is valid, else a fresh login.
    async fn token(&self, client: &Client) -> Result<Token, SourceError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if let Some(t) = self.current.lock().as_ref().filter(|t| t.valid()) {
            return Ok(t.token.clone());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if self.is_static() {
            return Err(SourceError::PermissionDenied);
        }
        self.relogin(client, None, false).await
    }

    /// Logs in with the current credential, one login at a time and at most one attempt per
    /// `MIN_RELOGIN_INTERVAL` after a failed one (callers meanwhile get that failure). `refused`
    /// is the token Vault just refused or the renewer replaces, if any: a different valid token
    /// obtained meanwhile is used instead. With `revoke_refused`, once a login replaced it, it
    /// is revoked in the background (it may still be valid).
    async fn relogin(
        &self,
        client: &Client,
        refused: Option<&Token>,
        revoke_refused: bool,
    ) -> Result<Token, SourceError> {
        let _one = self.login_lock.lock().await;
        if let Some(t) = self.current.lock().as_ref() {
            if t.valid() && refused.is_none_or(|r| r != &t.token) {
                return Ok(t.token.clone());
            }
        }
        let recoveries = client.server().recoveries();
        if let Some((at, err, then)) = self.failed_login.lock().as_ref() {
            let server_back = err.is_transient() && *then != recoveries;
            if at.elapsed() < MIN_RELOGIN_INTERVAL && !server_back {
                return Err(err.clone());
            }
        }
        let fresh = match self.log_in(client).await {
            Ok(t) => t,
            Err(err) => {
                *self.failed_login.lock() = Some((Instant::now(), err.clone(), recoveries));
                return Err(err);
            }
        };
        *self.failed_login.lock() = None;
        *self.last_login.lock() = Some(Instant::now());
        if self.closed.load(Ordering::SeqCst) {
            // Unpublished while the login was in flight: nobody will use or revoke it.
            self.current.lock().take();
            self.session_changed();
            client.revoke_in_background(fresh);
            return Err(SourceError::Closed);
        }
        if revoke_refused {
            if let Some(old) = refused.filter(|old| *old != &fresh) {
                self.revoke_replaced(client, old);
            }
        }
        Ok(fresh)
    }

    /// Revokes a token a login replaced, in the background (never a given token).
    fn revoke_replaced(&self, client: &Client, old: &Token) {
        if !self.is_static() {
            client.revoke_in_background(old.clone());
        }
    }

    /// One login request with the current credential; the new token becomes the current one.
    async fn log_in(&self, client: &Client) -> Result<Token, SourceError> {
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
        client.metrics().vault_login(client.volume());
        let mut answer = client
            .send(
                RequestKind::Login,
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
        self.schedule(client, &token, true, ttl, ttl, renewable);
        tracing::info!(volume = client.volume(), mount = %mount, role = %role, ttl = ?ttl, "logged in to Vault");
        Ok(token)
    }

    /// One authenticated request. With a login method, a 403 may mean the token was revoked
    /// or expired: unless it comes within `MIN_RELOGIN_INTERVAL` of a login, and if
    /// `auth/token/lookup-self` confirms the token is dead, log in again once and retry.
    pub(super) async fn authed(
        &self,
        client: &Client,
        kind: RequestKind,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, SourceError> {
        let token = self.token(client).await?;
        let mut body = body;
        let first = client
            .send(kind, method.clone(), path, body.clone(), Some(&token))
            .await;
        let result = match first {
            Err(SourceError::PermissionDenied) if !self.is_static() => {
                let request = (kind, method, path);
                self.after_denial(client, request, &mut body, &token).await
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
        client: &Client,
        (kind, method, path): (RequestKind, Method, &str),
        body: &mut Option<Value>,
        token: &Token,
    ) -> Result<Value, SourceError> {
        let newer = {
            let current = self.current.lock();
            current
                .as_ref()
                .filter(|t| &t.token != token && t.valid())
                .map(|t| t.token.clone())
        };
        if let Some(newer) = newer {
            return client
                .send(kind, method, path, body.take(), Some(&newer))
                .await;
        }
        if !self.may_be_dead_token() || !self.lookup_refused(client, token).await {
            return Err(SourceError::PermissionDenied);
        }
        let fresh = self.relogin(client, Some(token), false).await?;
        let retry = client
            .send(kind, method, path, body.take(), Some(&fresh))
            .await;
        if retry == Err(SourceError::PermissionDenied) {
            // Refused again with a fresh token: a policy denial, and the old token may well be
            // alive (with leases that depend on it), so it is left to expire. Learn whether
            // lookup-self is refused too, so that further denials skip straight to that answer.
            self.lookup_refused(client, &fresh).await;
        } else {
            // The fresh token succeeded where the old one was refused: the old one was dead
            // or is of no more use.
            self.revoke_replaced(client, token);
        }
        retry
    }

    /// Whether a 403 may come from a dead token rather than a policy: a login identity whose
    /// policy allows `lookup-self`, and whose last login is not so recent that the token
    /// must still be alive.
    fn may_be_dead_token(&self) -> bool {
        !self.is_static()
            && !self.lookup_forbidden.load(Ordering::Relaxed)
            && self
                .last_login
                .lock()
                .is_none_or(|at| at.elapsed() >= MIN_RELOGIN_INTERVAL)
    }

    /// Asks Vault whether `token` still works (`auth/token/lookup-self`): `true` when Vault
    /// refuses the lookup. A refusal of a token fresh from a login (within
    /// `MIN_RELOGIN_INTERVAL`) means the policy forbids lookup-self; that is remembered.
    async fn lookup_refused(&self, client: &Client, token: &Token) -> bool {
        let fresh = self
            .last_login
            .lock()
            .is_some_and(|at| at.elapsed() < MIN_RELOGIN_INTERVAL);
        match send_lookup(client, token).await {
            Err(SourceError::PermissionDenied) => {
                if fresh && !self.lookup_forbidden.swap(true, Ordering::Relaxed) {
                    tracing::info!(volume = client.volume(), "this identity may not call auth/token/lookup-self: refused requests are taken as policy denials, without a new login");
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

    /// The current session, as a successor would take it over (for tests).
    #[cfg(test)]
    fn session(&self) -> Option<Session> {
        self.current.lock().as_ref().map(TokenState::session)
    }
}

/// `auth/token/lookup-self` with `token`.
async fn send_lookup(client: &Client, token: &Token) -> Result<Value, SourceError> {
    client
        .send(
            RequestKind::Lookup,
            Method::GET,
            "auth/token/lookup-self",
            None,
            Some(token),
        )
        .await
}
