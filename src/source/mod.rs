//! The one door to Vault: the `SecretSource` trait the cache fetches through, its error type
//! and the fetched-secret value. `vault` is the real implementation (the only code that knows
//! HTTP and auth); `mock` is an in-memory double for the fast test tiers, compiled only for
//! tests (`cfg(test)` or the `testing` feature). `login` is how a volume asks for an identity
//! without naming the store (`Login`, `Connect`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::secret::{SecretData, Token};
use crate::spec::SecretPath;

pub mod handoff;
mod login;
#[cfg(any(test, feature = "testing"))]
pub mod mock;
pub mod pacing;
pub mod vault;

pub use login::{Connect, IdentityKey, Login, ServiceAccount};

/// A version of a secret as Vault numbers it (KV v2 metadata version).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub u64);

/// One read of a secret.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The Vault version, when the engine has one (KV v2). `None` for KV v1 and other engines:
    /// their change detection compares content.
    pub version: Option<Version>,
    pub data: SecretData,
    /// The lease Vault attached (dynamic secrets).
    pub lease: Option<Lease>,
}

/// A Vault lease on a dynamic secret: the data is valid for `duration` from when it was
/// granted, and may be extended with `renew_lease` while `renewable`.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    /// Vault's lease id (not a secret value, but never logged: it names a credential).
    pub id: String,
    pub duration: Duration,
    pub renewable: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("duration", &self.duration)
            .field("renewable", &self.renewable)
            .finish_non_exhaustive()
    }
}

/// Why a source could not answer. Messages never contain secret values.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SourceError {
    /// Vault answered 404: the secret (or the requested version) does not exist.
    #[error("secret not found in Vault")]
    NotFound,
    /// Vault answered 403: the identity may not read this path.
    #[error("permission denied by Vault")]
    PermissionDenied,
    /// Vault could not be reached or failed (connection, timeout, 5xx), or its server is known
    /// not to answer (another request found it down; the message names the server and since
    /// when). Stale data may be served.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
    /// Vault answered something vaultfs cannot use (bad response shape, 4xx other than 403/404).
    #[error("unexpected Vault response: {0}")]
    Invalid(String),
    /// Vault refused to log in with this identity's credential (bad role, wrong service
    /// account, expired JWT). The message says why.
    #[error("{0}")]
    LoginRefused(String),
    /// The volume is unmounted or being unmounted: its identity is closed and nothing more is
    /// asked of Vault for it.
    #[error("the volume is being unmounted; nothing more is asked of Vault for it")]
    Closed,
    /// Vault's answer was larger than the configured limit (`ServerLimits::max_response_bytes`);
    /// it was not read further. The message names the limit, never the content.
    #[error("Vault answer refused: {0}")]
    TooLarge(String),
}

impl SourceError {
    /// Whether a cached value may still be served (stale-if-error) after this error.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable(_))
    }
}

/// Where secrets come from. Implementations must be cheap to share (`Arc`) and safe to call
/// concurrently; single flight and caching are the caller's job.
pub trait SecretSource: Send + Sync + 'static {
    /// Reads the current version of a secret.
    fn read(&self, path: &SecretPath) -> impl Future<Output = Result<Fetched, SourceError>> + Send;

    /// A cheap check of the current version (KV v2 metadata). `Ok(None)` means the engine has
    /// no such check and the caller must `read` to detect changes.
    fn current_version(
        &self,
        path: &SecretPath,
    ) -> impl Future<Output = Result<Option<Version>, SourceError>> + Send;

    /// Extends a lease by up to `increment`; returns how long it now lasts from now (Vault
    /// caps it at the lease's max TTL).
    fn renew_lease(
        &self,
        lease: &Lease,
        increment: Duration,
    ) -> impl Future<Output = Result<Duration, SourceError>> + Send;

    /// Revokes a lease (its credentials stop working).
    fn revoke_lease(&self, lease: &Lease) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// How many times the server behind this source came back after being found not
    /// answering, as far as the source knows without asking (a cheap, synchronous read). A
    /// caller backing off after an outage asks again as soon as this changes, instead of
    /// waiting out its back-off. Sources without a notion of server health keep the default,
    /// which never changes (back-off then runs its course).
    fn server_recoveries(&self) -> u64 {
        0
    }
}

/// A volume's session at its secret store: its token and the renewer's plan for it, on the
/// node's clock so that it means the same in a successor daemon, which takes it over (through
/// the keeper, in memory only) instead of logging in again. `Debug` never shows the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub token: Token,
    /// When the token expires; `None` if it never does.
    pub expires_at: Option<NodeTime>,
    /// The TTL a fresh token of this identity gets (a renewal granting less has reached the max
    /// TTL).
    pub full_ttl: Duration,
    pub next: SessionStep,
}

/// What the renewer does next with a session's token, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStep {
    LookUp(NodeTime),
    Renew(NodeTime),
    Replace(NodeTime),
    Idle,
}

/// Told every change of a volume's session; `None` once it has none (revoked, or refused and
/// not replaced yet).
pub type SessionSink = Arc<dyn Fn(Option<Session>) + Send + Sync>;

/// A leased value handed from a daemon to its successor with its lease, so that the successor
/// serves the same credentials and keeps renewing the same lease instead of reading new ones.
/// Times are on the node's clock. `Debug` shows no value and no lease id.
#[derive(Clone, Debug)]
pub struct HandedLease {
    pub path: SecretPath,
    /// The value as read, with its lease (`lease.duration`: the period asked for at renewals).
    pub fetched: Fetched,
    /// The current lease period (renewals move it) and when it ends.
    pub period: Duration,
    pub ends_at: NodeTime,
    /// When the lease is next renewed or its value replaced; `None`: never (too short).
    pub next_at: Option<NodeTime>,
    /// When the value was first served (the files' mtime).
    pub changed_at: SystemTime,
}

/// Told the leased values a volume holds whenever they or their leases change.
pub type LeaseSink = Arc<dyn Fn(Vec<HandedLease>) + Send + Sync>;

/// A moment on the node's monotonic clock (`CLOCK_MONOTONIC`, which `Instant` reads): every
/// process on the node shares it and no clock step (NTP, an operator) moves it, so times handed
/// to a successor daemon mean the same there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeTime(Duration);

impl NodeTime {
    pub fn now() -> Self {
        Self(crate::sys::monotonic_now())
    }

    /// Since the clock's origin (the node's boot, give or take).
    pub fn as_duration(self) -> Duration {
        self.0
    }

    pub fn from_duration(since_origin: Duration) -> Self {
        Self(since_origin)
    }

    /// `at` of this process's clock (tokio's, which may be paused in tests).
    pub(crate) fn of(at: tokio::time::Instant) -> Self {
        let (now, node) = (tokio::time::Instant::now(), Self::now().0);
        if at >= now {
            Self(node + (at - now))
        } else {
            Self(node.saturating_sub(now - at))
        }
    }

    /// This moment on this process's clock.
    pub(crate) fn instant(self) -> tokio::time::Instant {
        let (now, node) = (tokio::time::Instant::now(), Self::now().0);
        if self.0 >= node {
            now + (self.0 - node)
        } else {
            now.checked_sub(node - self.0).unwrap_or(now)
        }
    }
}

impl std::ops::Sub<Duration> for NodeTime {
    type Output = NodeTime;
    fn sub(self, d: Duration) -> NodeTime {
        NodeTime(self.0.saturating_sub(d))
    }
}

/// Where a daemon keeps its volumes' sessions for its successor (the keeper), by volume key.
/// Calls may block briefly (a local socket); `take` is called before a volume serves.
pub trait SessionStore: Send + Sync {
    /// The session kept for `key` by a predecessor, if any.
    fn take(&self, key: &str) -> Option<Session>;
    /// Keeps `key`'s session up to date from now on (`None`: forget it).
    fn sink(&self, key: &str) -> SessionSink;
    /// The leased values kept for `key` by a predecessor.
    fn take_leases(&self, key: &str) -> Vec<HandedLease>;
    /// Keeps `key`'s leased values up to date from now on.
    fn lease_sink(&self, key: &str) -> LeaseSink;
    /// Forgets `key`'s session and leased values (its volume is gone).
    fn forget(&self, key: &str);
}

/// A volume's identity at its secret store, beyond reading: what a volume does with it when it
/// is published, while it serves and when it is torn down. `vault::VaultSource` is the real
/// one; the volume lifecycle (`volume`, `csi`) knows only this trait.
pub trait Identity: SecretSource {
    /// Logs in now, so that a refused login fails the caller early (a CSI publish). A no-op
    /// for identities that need no login.
    fn login(&self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Replaces the login credential (a CSI republish's fresh service-account token). The
    /// current session stays in use until it expires or is refused.
    fn set_credential(&self, credential: Token);

    /// Keeps the identity usable while the volume serves (token renewal) and learns ahead of
    /// the first read how to read `paths` (reading no secret). Runs until aborted.
    fn serve(self: Arc<Self>, paths: Vec<SecretPath>) -> impl Future<Output = ()> + Send;

    /// Learns ahead of the first read how to read `paths` (what `serve` does first), for a
    /// volume that joins an identity already serving. Reads no secret.
    fn learn(self: Arc<Self>, paths: Vec<SecretPath>) -> impl Future<Output = ()> + Send {
        let _ = paths;
        async {}
    }

    /// A session to use now: the current one, the one a login in flight brings, or a new
    /// login; the last login's refusal while it is recent. For a volume joining a shared
    /// identity, so that its publish fails when the identity's login is refused.
    fn ready(&self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }

    /// Gives up what this identity obtained (its token); later calls fail.
    fn revoke(&self) -> impl Future<Output = ()> + Send;

    /// From now on, tells `sink` every change of the session (at once too, if there is one).
    /// Identities without sessions never call it.
    fn on_session_change(&self, sink: SessionSink) {
        let _ = sink;
    }

    /// Takes over `session` (a predecessor daemon's) instead of logging in: it is used until
    /// it expires or Vault refuses it, then the identity logs in as usual. Identities without
    /// sessions ignore it; `false` means it was not taken (expired, or not a login identity).
    fn resume(&self, session: Session) -> bool {
        let _ = session;
        false
    }
}
