//! A volume's login, told in no particular secret store's terms: who the pod is, the role it
//! logs in as and the token it proves that with. The CSI layer asks for identities through
//! `Connect` with a `Login`; the real store (`vault::VaultServers::connector`) and the test
//! doubles each build their own session from it, so `csi` knows nothing of Vault.

use std::sync::Arc;

use super::SourceError;
use crate::secret::Token;

/// What a volume logs in with. `Debug` never shows the credential.
#[derive(Clone, Debug)]
pub struct Login {
    /// The server the volume reads from, by the name it was configured under (`""`: the
    /// node's default; the `vaultServer` attribute).
    pub server: String,
    /// The auth mount to log in at, e.g. `kubernetes` (the `authMount` attribute).
    pub auth_mount: String,
    /// The role to log in as (the `role` attribute).
    pub role: String,
    /// The audience the credential was issued for (the `audience` attribute).
    pub audience: String,
    /// The pod's service-account token for `audience`, replaced at each republish.
    pub credential: Token,
    /// `namespace/name/uid` of the pod, when kubelet says.
    pub pod: Option<String>,
    /// The pod's service account as kubelet reports it (`podInfoOnMount`), when it does.
    pub service_account: Option<ServiceAccount>,
    /// The volume's name in logs and metric labels.
    pub volume: String,
}

/// A pod's service account, as kubelet reports it: the only pod fact a shared identity keys on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// What makes two volumes' logins provably the same identity at the store: the server, auth
/// mount, role and audience they log in with, the service account kubelet says their pods run
/// as, and the cache TTL their shared cache would serve with. Volumes share a session and a
/// cache only when every part is equal (`vaultfs csi --share-identities`); a volume whose pod
/// kubelet does not describe has no key and never shares. Holds no credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    server: String,
    auth_mount: String,
    role: String,
    audience: String,
    service_account: ServiceAccount,
    cache_ttl: std::time::Duration,
}

impl IdentityKey {
    /// A name for this identity that every daemon computes alike (not the process's random
    /// hasher): what its session is stashed under for a successor. SHA-256 of its parts, each
    /// length-prefixed: parts a pod writes (role, auth mount) cannot make two identities'
    /// names collide.
    pub fn stable_name(&self) -> String {
        let ttl_ms = self.cache_ttl.as_millis().to_string();
        let parts = [
            self.server.as_str(),
            &self.auth_mount,
            &self.role,
            &self.audience,
            &self.service_account.namespace,
            &self.service_account.name,
            &ttl_ms,
        ];
        format!("identity-{}", crate::spec::stable_digest(&parts))
    }
}

impl Login {
    /// The identity this login is, for volumes served with `cache_ttl`; `None` without the
    /// pod's service account (nothing proves two such pods are the same identity).
    pub fn identity_key(&self, cache_ttl: std::time::Duration) -> Option<IdentityKey> {
        Some(IdentityKey {
            server: self.server.clone(),
            auth_mount: self.auth_mount.clone(),
            role: self.role.clone(),
            audience: self.audience.clone(),
            service_account: self.service_account.clone()?,
            cache_ttl,
        })
    }
}

/// Makes a volume's identity from its `Login`; fails if the login names a server the source
/// does not know.
pub type Connect<S> = Box<dyn Fn(Login) -> Result<Arc<S>, SourceError> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn login(namespace: &str, account: &str) -> Login {
        Login {
            server: String::new(),
            auth_mount: "kubernetes".into(),
            role: "app".into(),
            audience: "vault".into(),
            credential: Token::new("sa-token-of-one-pod".into()),
            pod: Some(format!("{namespace}/pod-1/uid-1")),
            service_account: Some(ServiceAccount {
                namespace: namespace.into(),
                name: account.into(),
            }),
            volume: format!("{namespace}/pod-1/csi-1"),
        }
    }

    #[test]
    fn pods_of_one_service_account_are_one_identity_and_any_other_part_makes_another() {
        let ttl = Duration::from_secs(30);
        let key = |l: Login| l.identity_key(ttl);
        let base = key(login("team-a", "app")).expect("a described pod has a key");
        let mut other_pod = login("team-a", "app");
        other_pod.pod = Some("team-a/pod-2/uid-2".into());
        other_pod.credential = Token::new("sa-token-of-another-pod".into());
        other_pod.volume = "team-a/pod-2/csi-2".into();
        assert_eq!(
            key(other_pod),
            Some(base.clone()),
            "same account, another pod"
        );

        let mut different: Vec<Login> = vec![login("team-b", "app"), login("team-a", "other")];
        for change in [
            |l: &mut Login| l.server = "eu".into(),
            |l: &mut Login| l.auth_mount = "jwt".into(),
            |l: &mut Login| l.role = "admin".into(),
            |l: &mut Login| l.audience = "other".into(),
        ] {
            let mut l = login("team-a", "app");
            change(&mut l);
            different.push(l);
        }
        for l in different {
            let shown = format!("{l:?}");
            assert_ne!(key(l), Some(base.clone()), "{shown}");
        }
        assert_ne!(
            login("team-a", "app").identity_key(Duration::from_secs(60)),
            Some(base.clone()),
            "another cache TTL"
        );
        let name = base.stable_name();
        assert_eq!(name, key(login("team-a", "app")).unwrap().stable_name());
        assert_ne!(name, key(login("team-b", "app")).unwrap().stable_name());
        assert!(name.starts_with("identity-") && name.len() == "identity-".len() + 32);
        assert!(
            name.len() + ".leases".len() <= crate::keeper::MAX_NAME_BYTES,
            "the keeper takes the name and its leases record's"
        );
        let mut shifted = login("team-a", "app");
        shifted.auth_mount.push_str(&shifted.role.split_off(1));
        assert_ne!(
            name,
            key(shifted).unwrap().stable_name(),
            "parts are length-prefixed: moving bytes between them makes another name"
        );
        assert_eq!(
            name, "identity-40f4fb18eb95bd2c9f7a144cb1116c5a",
            "the same in every daemon and every version: a successor finds the session by it"
        );
        let mut undescribed = login("team-a", "app");
        undescribed.service_account = None;
        assert_eq!(undescribed.identity_key(ttl), None);
        assert!(!format!("{base:?}").contains("sa-token"));
    }
}
