//! The node's Vault servers by name, and the `Connect` that makes a volume's `VaultSource`
//! from a source-neutral `Login` (a Kubernetes login with the pod's service-account token).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{Auth, Credential, LoginMethod, VaultServer, VaultSource};
use crate::metrics::Metrics;
use crate::source::{Connect, Login, SourceError};

/// The Vault servers volumes may use, by name (`""`: the default).
#[derive(Clone, Default)]
pub struct VaultServers(HashMap<String, Arc<VaultServer>>);

impl VaultServers {
    pub fn new(servers: HashMap<String, Arc<VaultServer>>) -> Self {
        Self(servers)
    }

    /// The names volumes may pick (`CsiConfig::servers`).
    pub fn names(&self) -> BTreeSet<String> {
        self.0.keys().cloned().collect()
    }

    /// The identity of a volume that logs in as `login` says: a Kubernetes login at
    /// `login.auth_mount`, repeated with the current credential whenever the token dies.
    pub fn connect(&self, login: Login, metrics: Arc<Metrics>) -> Result<VaultSource, SourceError> {
        let server = self.0.get(&login.server).ok_or_else(|| {
            SourceError::Invalid(format!(
                "no Vault server named {:?} is configured on this node",
                login.server
            ))
        })?;
        let auth = Auth::Login {
            method: LoginMethod::Kubernetes,
            mount: login.auth_mount,
            role: login.role,
            credential: Credential::Value(login.credential),
        };
        Ok(VaultSource::new(
            server.clone(),
            auth,
            login.volume,
            metrics,
        ))
    }

    /// `connect` as the CSI layer's `Connect`.
    pub fn connector(self, metrics: Arc<Metrics>) -> Connect<VaultSource> {
        Box::new(move |login| self.connect(login, metrics.clone()).map(Arc::new))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::secret::Token;
    use crate::source::vault::test_server;

    fn login(server: &str) -> Login {
        Login {
            server: server.into(),
            auth_mount: "kubernetes".into(),
            role: "app".into(),
            audience: "vault".into(),
            credential: Token::new("a-jwt".into()),
            pod: None,
            service_account: None,
            volume: "ns/pod/vol".into(),
        }
    }

    #[tokio::test]
    async fn a_login_becomes_a_kubernetes_login_at_its_mount_on_the_named_server() {
        let (addr, seen) = test_server::serve(|_| {
            test_server::json_answer(
                "200 OK",
                r#"{"auth":{"client_token":"fresh","lease_duration":3600,"renewable":true}}"#,
                false,
            )
        });
        let server = VaultServer::new(&test_server::config(&addr, Duration::from_secs(5))).unwrap();
        let servers = VaultServers::new(HashMap::from([("backup".into(), Arc::new(server))]));
        assert_eq!(servers.names(), BTreeSet::from(["backup".to_string()]));
        let connect = servers.connector(Arc::new(Metrics::new()));
        let Err(unknown) = connect(login("")) else {
            panic!("no default server here");
        };
        assert!(
            unknown.to_string().contains("no Vault server named \"\""),
            "{unknown}"
        );
        let source = connect(login("backup")).unwrap();
        crate::source::Identity::login(&*source).await.unwrap();
        let seen = seen.lock();
        assert!(
            seen[0].starts_with("POST /v1/auth/kubernetes/login"),
            "{}",
            seen[0]
        );
    }
}
