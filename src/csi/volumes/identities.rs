//! Which identity a CSI volume logs in as, and whether it shares one (`--share-identities`):
//! the `Login` of a publish, the check that a pod's token is of the service account kubelet
//! reports, how a volume came by its identity (`Joined`), and the names its Vault session and
//! leased values are kept under in the keeper for the next daemon (`Stash`).

use std::sync::Weak;
use std::time::Duration;

use super::super::request::Params;
use super::VolumeManager;
use crate::slot::Slot;
use crate::source::{Identity, IdentityKey, Login};
use crate::volume::Volume;

/// What the volume of `params` logs in with.
pub(super) fn login_of(params: &Params) -> Login {
    Login {
        server: params.server.clone(),
        auth_mount: params.auth_mount.clone(),
        role: params.role.clone(),
        audience: params.audience.clone(),
        credential: params.token.clone(),
        pod: params.pod.clone(),
        service_account: params.service_account.clone(),
        volume: params.label.clone(),
    }
}

/// How a volume came by its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Joined {
    /// Its own (no sharing): it logs in for itself.
    Alone,
    /// The first volume of a shared identity: it logs in for all of them, and keeps the
    /// identity's session under this name (`IdentityKey::stable_name`) for the next daemon.
    First(String),
    /// A later volume of a shared identity: no login of its own.
    Shared,
}

/// Whether the login's token is one of the service account kubelet reports for its pod (the
/// JWT's `sub` is `system:serviceaccount:<namespace>:<name>`), so that a volume joins only the
/// identity its own token would log in as. The signature is not checked: kubelet gave the
/// token, and Vault checks it at the login the identity's first volume made. A token that says
/// nothing, or another account, shares nothing (logged): its volume logs in for itself.
pub(super) fn token_is_of(login: &Login) -> bool {
    use base64::Engine;
    let Some(account) = &login.service_account else {
        return false;
    };
    let expected = format!(
        "system:serviceaccount:{}:{}",
        account.namespace, account.name
    );
    let subject = login
        .credential
        .expose()
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims.get("sub")?.as_str().map(str::to_string));
    let matches = subject.as_deref() == Some(expected.as_str());
    if !matches {
        tracing::warn!(volume = %login.volume, expected = %expected, "the pod's token is not of the service account kubelet reports; its volume shares no identity");
    }
    matches
}

/// The name a volume's session is stashed under: by slot, which no other volume gets.
pub(super) fn session_key(slot: Slot) -> String {
    format!("volume-{slot}")
}

/// The names volume `slot`'s Vault session and leased values are kept under, for the next
/// daemon: its own leased values by slot, always; the session by slot when the volume has it
/// alone; a shared identity's session and shared leased values once, by its first volume,
/// under the identity's name.
pub(super) struct Stash {
    pub(super) own: String,
    pub(super) session: Option<String>,
    pub(super) identity: Option<String>,
}

impl Stash {
    pub(super) fn of(slot: Slot, joined: &Joined) -> Self {
        let own = session_key(slot);
        let (session, identity) = match joined {
            Joined::Alone => (Some(own.clone()), None),
            Joined::First(name) => (Some(name.clone()), Some(name.clone())),
            Joined::Shared => (None, None),
        };
        Self {
            own,
            session,
            identity,
        }
    }
}

impl<S: Identity> VolumeManager<S> {
    /// Waits (bounded) until an identity of `key` whose last volume left has revoked what it
    /// held, so that a new identity of the same key starts after it (the keeper's records of
    /// the identity are written by one of them at a time).
    pub(super) async fn wait_closing(&self, key: &IdentityKey) {
        let closing = self
            .identities
            .lock()
            .get(key)
            .and_then(Weak::upgrade)
            .filter(|shared| shared.is_closing());
        if let Some(shared) = closing {
            // Revoking leases and the token each take at most `vault_timeout`.
            let bound = self.config.vault_timeout * 2 + Duration::from_secs(1);
            let _ = tokio::time::timeout(bound, shared.closed()).await;
        }
    }

    /// The key of the shared identity a volume of `params` joins, with `--share-identities`.
    pub(super) fn identity_key(&self, login: &Login, params: &Params) -> Option<IdentityKey> {
        login
            .identity_key(params.cache_ttl)
            .filter(|_| self.config.share_identities)
    }

    /// Keeps the Vault session and leased values of `volume` in the store under the names of
    /// `stash`, for the next daemon, as they change.
    pub(super) fn keep_sessions(&self, volume: &Volume<S>, stash: &Stash) {
        let Some(store) = &self.sessions else {
            return;
        };
        volume.on_leases_change(store.lease_sink(&stash.own));
        if let Some(name) = &stash.session {
            volume.source().on_session_change(store.sink(name));
        }
        if let Some(name) = &stash.identity {
            volume.on_shared_leases_change(store.lease_sink(name));
        }
    }
}
