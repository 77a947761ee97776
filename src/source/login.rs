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
    /// The volume's name in logs and metric labels.
    pub volume: String,
}

/// Makes a volume's identity from its `Login`; fails if the login names a server the source
/// does not know.
pub type Connect<S> = Box<dyn Fn(Login) -> Result<Arc<S>, SourceError> + Send + Sync>;
