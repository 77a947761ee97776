//! One identity's requests to its Vault server: the shared `VaultServer`, this identity's cap
//! on requests in flight, and the request metrics under its volume's label. Everything the
//! token life (`auth`) and the secret reads send goes through it; it knows nothing of tokens'
//! lives or engines.

use std::sync::Arc;
use std::time::Instant;

use reqwest::Method;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::http::{Request, RequestKind};
use super::VaultServer;
use crate::metrics::Metrics;
use crate::secret::Token;
use crate::source::SourceError;

pub(super) struct Client {
    server: Arc<VaultServer>,
    /// This identity's cap on Vault requests in flight.
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// The volume this identity serves, as named in logs and metric labels.
    volume: String,
}

impl Client {
    pub(super) fn new(server: Arc<VaultServer>, volume: String, metrics: Arc<Metrics>) -> Self {
        let in_flight = Arc::new(Semaphore::new(server.limits().max_requests_per_identity));
        Self {
            server,
            in_flight,
            metrics,
            volume,
        }
    }

    pub(super) fn server(&self) -> &VaultServer {
        &self.server
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(super) fn volume(&self) -> &str {
        &self.volume
    }

    /// One request, timed and counted by `kind` (and by error class when it fails).
    pub(super) async fn send(
        &self,
        kind: RequestKind,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&Token>,
    ) -> Result<Value, SourceError> {
        let started = Instant::now();
        let request = Request {
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
        self.metrics.vault_request(kind.label(), started.elapsed());
        if let Err(err) = &result {
            self.metrics.vault_error(kind.label(), error_class(err));
        }
        result
    }

    /// Revokes `token` in the background (a token a login replaced, which may still be
    /// valid), within this identity's cap.
    pub(super) fn revoke_in_background(&self, token: Token) {
        self.server.revoke_in_background(token, &self.in_flight);
    }
}

/// An error's class in `vaultfs_vault_errors_total{class}`.
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
