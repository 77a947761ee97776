//! What kubelet sends in NodePublishVolume and what vaultfs accepts of it: the request taken
//! out of protobuf, the volume attributes a pod may set, and their validation into `Params`,
//! each refusal naming the field and what was expected.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::CsiConfig;
use crate::config::{format_duration, parse_duration, parse_file_mode, DEFAULT_CACHE_TTL};
use crate::fs::Consistency;
use crate::reload::{PodUid, ProcessName, Signal};
use crate::secret::Token;
use crate::source::ServiceAccount;
use crate::spec::{parse_spec_document_for, PodNames, VolumeSpec};

/// Keys kubelet adds to the volume context (with `podInfoOnMount` and `tokenRequests`).
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// The volume attributes a pod may set (their meaning: docs/configuration.md).
pub const ATTRIBUTES: [&str; 10] = [
    "role",
    "secrets",
    "authMount",
    "audience",
    "cacheTTL",
    "fileMode",
    "vaultServer",
    "consistency",
    "reloadSignal",
    "reloadProcess",
];

/// A CSI request refused or failed, with the gRPC code it maps to at the service boundary.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A node-wide limit is reached (`--max-volumes`, entries per volume).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The node cannot publish now for a reason of the node's, not the request's (kubelet
    /// retries).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::mount::MountError> for CsiError {
    fn from(e: crate::mount::MountError) -> Self {
        match e {
            crate::mount::MountError::Unreachable { .. } => CsiError::Unavailable(e.to_string()),
            other => CsiError::Internal(other.to_string()),
        }
    }
}

/// NodePublishVolume, taken out of protobuf. `Debug` leaves out the context and secrets: they
/// carry service-account tokens.
#[derive(Clone, Default)]
pub struct PublishRequest {
    pub volume_id: String,
    pub target_path: String,
    pub readonly: bool,
    pub capability: Option<Capability>,
    pub context: HashMap<String, String>,
    pub secrets: HashMap<String, String>,
}

impl std::fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishRequest")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("readonly", &self.readonly)
            .field("capability", &self.capability)
            .field("context", &format_args!("<{} keys>", self.context.len()))
            .field(
                "secrets",
                &format_args!("<{} keys redacted>", self.secrets.len()),
            )
            .finish()
    }
}

/// The parts of a `VolumeCapability` vaultfs looks at.
#[derive(Clone, Debug, Default)]
pub struct Capability {
    /// Block access was requested (refused: vaultfs volumes are filesystems).
    pub block: bool,
    /// The pod's fsGroup, offered through VOLUME_MOUNT_GROUP (empty: none).
    pub mount_group: String,
}

/// A validated publish request.
pub(super) struct Params {
    pub(super) volume_id: String,
    pub(super) target: PathBuf,
    pub(super) role: String,
    pub(super) spec: VolumeSpec,
    pub(super) auth_mount: String,
    pub(super) cache_ttl: Duration,
    pub(super) file_mode: u16,
    pub(super) consistency: Consistency,
    pub(super) mount_group: Option<u32>,
    /// The configured server the volume reads from (`""`: the default).
    pub(super) server: String,
    pub(super) token: Token,
    pub(super) audience: String,
    pub(super) label: String,
    /// `namespace/name/uid` of the pod, for audit events.
    pub(super) pod: Option<String>,
    /// The pod's service account as kubelet reports it (the key of a shared identity).
    pub(super) service_account: Option<ServiceAccount>,
    /// `reloadSignal`, `reloadProcess` and the pod's uid: whom to signal after a change.
    pub(super) reload: Option<(Signal, ProcessName, PodUid)>,
    /// The context without the tokens, as kept in the state file.
    pub(super) context: BTreeMap<String, String>,
}

pub(super) fn invalid(message: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(message.into())
}

pub(super) fn validate(req: &PublishRequest, config: &CsiConfig) -> Result<Params, CsiError> {
    if req.volume_id.is_empty() {
        return Err(invalid("volume_id is missing"));
    }
    if req.target_path.is_empty() {
        return Err(invalid("target_path is missing"));
    }
    let target = PathBuf::from(&req.target_path);
    if !target.is_absolute() {
        return Err(invalid(format!(
            "target_path {:?} is not an absolute path",
            req.target_path
        )));
    }
    let capability = req
        .capability
        .as_ref()
        .ok_or_else(|| invalid("volume_capability is missing"))?;
    if capability.block {
        return Err(invalid(
            "volume_capability: block access is not supported; vaultfs volumes are filesystems",
        ));
    }
    if !req.readonly {
        return Err(invalid(
            "readonly must be true: vaultfs volumes are read-only; set `readOnly: true` on the pod's csi volume",
        ));
    }
    let mount_group = match capability.mount_group.as_str() {
        "" => None,
        g => Some(g.parse::<u32>().map_err(|_| {
            invalid(format!(
                "volume_capability.mount.volume_mount_group {g:?} is not a numeric group id"
            ))
        })?),
    };
    let context = req
        .context
        .iter()
        .filter(|(k, _)| k.as_str() != TOKENS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Params::new(
        req.volume_id.clone(),
        target,
        mount_group,
        context,
        |audience| service_account_token(req, audience),
        config,
    )
}

impl Params {
    /// The parameters of the volume `volume_id` at `target` whose attributes are `context`
    /// (kubelet's pod keys included, its token keys not), logging in with the token
    /// `token_for` gives for the volume's audience: a publish takes it out of the request,
    /// a restart from the volume's record. The attributes are checked against this node's
    /// settings each time (a restarted daemon may allow less than its predecessor).
    pub(super) fn new(
        volume_id: String,
        target: PathBuf,
        mount_group: Option<u32>,
        context: BTreeMap<String, String>,
        token_for: impl FnOnce(&str) -> Result<Token, CsiError>,
        config: &CsiConfig,
    ) -> Result<Self, CsiError> {
        let attr = |key: &str| {
            context
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        for key in context.keys() {
            if !key.starts_with(KUBELET_PREFIX) && !ATTRIBUTES.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "unknown volumeAttributes key {key:?}; expected one of {}",
                    ATTRIBUTES.join(", ")
                )));
            }
        }
        let role = attr("role")
            .ok_or_else(|| {
                invalid("volumeAttributes.role is missing: the Vault auth role to log in as")
            })?
            .to_string();
        let secrets = attr("secrets").ok_or_else(|| {
            invalid(
                "volumeAttributes.secrets is missing: a YAML or JSON list of {name, path, key?}",
            )
        })?;
        // Certificate names may use the pod's names, as kubelet reports them.
        let pod_names = PodNames {
            name: attr(POD_NAME).unwrap_or_default().to_string(),
            namespace: attr(POD_NAMESPACE).unwrap_or_default().to_string(),
            service_account: attr(SERVICE_ACCOUNT).unwrap_or_default().to_string(),
        };
        let spec = parse_spec_document_for(secrets, Some(&pod_names))
            .and_then(VolumeSpec::new)
            .map_err(|e| invalid(format!("volumeAttributes.secrets: {e}")))?;
        if spec.entries().len() > config.max_entries {
            return Err(CsiError::ResourceExhausted(format!(
            "volumeAttributes.secrets declares {} files; this node allows at most {} per volume (vaultfs csi --max-volume-entries)",
            spec.entries().len(),
            config.max_entries
        )));
        }
        let auth_mount = attr("authMount")
            .unwrap_or("kubernetes")
            .trim_matches('/')
            .to_string();
        if auth_mount.is_empty()
            || auth_mount.split('/').any(|s| s.is_empty() || s == "..")
            || !auth_mount
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(invalid(format!(
            "volumeAttributes.authMount {auth_mount:?} is not an auth mount path such as kubernetes or jwt"
        )));
        }
        let audience = attr("audience").unwrap_or("vault").to_string();
        let cache_ttl = match attr("cacheTTL") {
            Some(t) => {
                parse_duration(t).map_err(|e| invalid(format!("volumeAttributes.cacheTTL: {e}")))?
            }
            None => DEFAULT_CACHE_TTL.value.max(config.min_cache_ttl),
        };
        if cache_ttl < config.min_cache_ttl {
            return Err(invalid(format!(
            "volumeAttributes.cacheTTL {} is below this node's minimum of {} (vaultfs csi --min-cache-ttl)",
            format_duration(cache_ttl),
            format_duration(config.min_cache_ttl)
        )));
        }
        let consistency = match attr("consistency") {
            Some(c) => c
                .parse::<Consistency>()
                .map_err(|e| invalid(format!("volumeAttributes.consistency: {e}")))?,
            None => Consistency::default(),
        };
        let file_mode = match attr("fileMode") {
            Some(m) => parse_file_mode(m)
                .map_err(|e| invalid(format!("volumeAttributes.fileMode: {e}")))?,
            // Without a group to grant access to, the pod's (arbitrary) user must still read.
            None if mount_group.is_some() => 0o440,
            None => 0o444,
        };
        let server_name = attr("vaultServer").unwrap_or("");
        let server = config.servers.get(server_name).cloned().ok_or_else(|| {
        let known: Vec<_> = config
            .servers
            .iter()
            .filter(|k| !k.is_empty())
            .map(String::as_str)
            .collect();
        if server_name.is_empty() {
            invalid("this node has no default Vault server (--vault-addr); set volumeAttributes.vaultServer")
        } else {
            invalid(format!(
                "volumeAttributes.vaultServer {server_name:?} is not configured on this node; known: {}",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        }
    })?;
        let reload = reload_signal(
            attr("reloadSignal"),
            attr("reloadProcess"),
            attr(POD_UID),
            config,
        )?;
        let token = token_for(&audience)?;
        let label = format!(
            "{}/{}/{}",
            attr(POD_NAMESPACE).unwrap_or("-"),
            attr(POD_NAME).unwrap_or("-"),
            volume_id
        );
        let pod = attr(POD_NAME).map(|name| {
            format!(
                "{}/{name}/{}",
                attr(POD_NAMESPACE).unwrap_or("-"),
                attr(POD_UID).unwrap_or("-")
            )
        });
        // Both from kubelet (`podInfoOnMount`); a pod may not set them (`csi.storage.k8s.io/`
        // keys in its attributes are kubelet's: kubelet overwrites them).
        let service_account =
            attr(POD_NAMESPACE)
                .zip(attr(SERVICE_ACCOUNT))
                .map(|(namespace, name)| ServiceAccount {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                });
        Ok(Params {
            volume_id,
            target,
            role,
            spec,
            auth_mount,
            cache_ttl,
            file_mode,
            consistency,
            mount_group,
            server,
            token,
            audience,
            label,
            pod,
            service_account,
            reload,
            context,
        })
    }
}

/// `reloadSignal` and `reloadProcess` (both or neither), allowed only on a daemon started
/// with `--allow-reload-signals`, with the pod uid kubelet sends (`podInfoOnMount`).
fn reload_signal(
    signal: Option<&str>,
    process: Option<&str>,
    pod_uid: Option<&str>,
    config: &CsiConfig,
) -> Result<Option<(Signal, ProcessName, PodUid)>, CsiError> {
    let (signal, process) = match (signal, process) {
        (None, None) => return Ok(None),
        (Some(s), Some(p)) => (s, p),
        (Some(_), None) => {
            return Err(invalid(
                "volumeAttributes.reloadProcess is missing: reloadSignal needs the name of the pod's processes to signal, as in /proc/PID/comm",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "volumeAttributes.reloadSignal is missing: reloadProcess needs the signal to send, such as SIGHUP",
            ))
        }
    };
    let signal = signal
        .parse::<Signal>()
        .map_err(|e| invalid(format!("volumeAttributes.reloadSignal: {e}")))?;
    let process = process
        .parse::<ProcessName>()
        .map_err(|e| invalid(format!("volumeAttributes.reloadProcess: {e}")))?;
    if !config.allow_reload_signals {
        return Err(invalid(
            "volumeAttributes.reloadSignal: this node does not send reload signals; the plugin must run with --allow-reload-signals and hostPID: true (deploy/reload-signals)",
        ));
    }
    let uid = pod_uid
        .ok_or_else(|| invalid(format!("{POD_UID} is missing: reloadSignal needs the pod's uid; the CSIDriver must set podInfoOnMount: true")))?
        .parse::<PodUid>()
        .map_err(|e| invalid(format!("{POD_UID}: {e}")))?;
    Ok(Some((signal, process, uid)))
}

/// The pod's token for `audience` from `csi.storage.k8s.io/serviceAccount.tokens`, looked for
/// in the request's secrets (newer kubelets) and then its volume context.
fn service_account_token(req: &PublishRequest, audience: &str) -> Result<Token, CsiError> {
    let raw = req
        .secrets
        .get(TOKENS)
        .or_else(|| req.context.get(TOKENS))
        .ok_or_else(|| {
            invalid(format!(
                "{TOKENS} is missing: the CSIDriver must request a token with `tokenRequests: [{{audience: {audience}}}]`"
            ))
        })?;
    let mut tokens: serde_json::Value = serde_json::from_str(raw).map_err(|_| {
        invalid(format!(
            "{TOKENS} is not a JSON object of audience → {{token, expirationTimestamp}}"
        ))
    })?;
    let token = tokens
        .get_mut(audience)
        .and_then(|t| t.get_mut("token"))
        .and_then(|t| match t.take() {
            serde_json::Value::String(s) if !s.is_empty() => Some(Token::new(s)),
            _ => None,
        });
    let audiences: Vec<String> = tokens
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    crate::secret::wipe_json(&mut tokens);
    token.ok_or_else(|| {
        invalid(format!(
            "{TOKENS} has no token for audience {audience:?} (it has: {}); set volumeAttributes.audience or the CSIDriver's tokenRequests",
            if audiences.is_empty() { "none".to_string() } else { audiences.join(", ") }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_request_debug_never_shows_tokens() {
        let mut req = PublishRequest {
            volume_id: "csi-1".into(),
            ..Default::default()
        };
        req.context.insert(
            TOKENS.into(),
            r#"{"vault":{"token":"eyJhbGciOi.secret"}}"#.into(),
        );
        req.secrets
            .insert(TOKENS.into(), "eyJhbGciOi.secret".into());
        let printed = format!("{req:?}");
        assert!(!printed.contains("eyJhbGciOi"), "{printed}");
        assert!(printed.contains("csi-1"));
    }
}
