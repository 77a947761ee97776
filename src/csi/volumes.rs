//! The per-pod volume lifecycle behind NodePublishVolume / NodeUnpublishVolume: validating
//! what kubelet sends, logging in with the pod's own service-account token, mounting through a
//! `Mounter`, swapping tokens on republish, tearing down, and the state that lets a restarted
//! daemon serve its volumes again. Plain Rust: no gRPC types here.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{format_duration, parse_duration, parse_file_mode};
use crate::fuse::Slot;
use crate::metrics::Metrics;
use crate::mount::{MountConfig, Mounter};
use crate::secret::Token;
use crate::source::vault::{Auth, Credential, LoginMethod, VaultServer};
use crate::source::SourceError;
use crate::spec::{parse_spec_document, VolumeSpec};
use crate::volume::{cache_config, Serving, Volume, VolumeConfig};

/// Keys kubelet adds to the volume context (with `podInfoOnMount` and `tokenRequests`).
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// Longest a publish waits for the pod's Vault login before mounting anyway.
const PUBLISH_LOGIN_WAIT: Duration = Duration::from_secs(2);
/// `cacheTTL` when a volume does not say.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);

/// The volume attributes a pod may set, with their meaning (README's table).
pub const ATTRIBUTES: [&str; 7] = [
    "role",
    "secrets",
    "authMount",
    "audience",
    "cacheTTL",
    "fileMode",
    "vaultServer",
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
    #[error("{0}")]
    Internal(String),
}

/// Room reserved for one volume under `max_volumes`: given back on drop unless kept.
struct RoomGuard {
    taken: Option<Arc<AtomicUsize>>,
}

impl RoomGuard {
    fn keep(mut self) {
        self.taken = None;
    }
}

impl Drop for RoomGuard {
    fn drop(&mut self) {
        if let Some(taken) = self.taken.take() {
            taken.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Node plugin settings.
pub struct CsiConfig {
    pub node_id: String,
    /// Directory (tmpfs-backed) for per-volume state.
    pub state_dir: PathBuf,
    /// The Vault servers volumes may use: `""` is the default, other names are picked with
    /// the `vaultServer` attribute.
    pub servers: HashMap<String, Arc<VaultServer>>,
    pub vault_timeout: Duration,
    /// Per-volume cache bounds.
    pub cache_max_entries: usize,
    pub cache_max_bytes: usize,
    /// The shortest `cacheTTL` a volume may ask for (`--min-cache-ttl`): pods do not set the
    /// node's Vault request rate.
    pub min_cache_ttl: Duration,
    /// Most volumes served at once (`--max-volumes`; NodeGetInfo's `max_volumes_per_node`).
    pub max_volumes: usize,
    /// Most files one volume may declare (`--max-volume-entries`).
    pub max_entries: usize,
}

/// Defaults of the node-wide limits.
pub const DEFAULT_MIN_CACHE_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_VOLUMES: usize = 1000;
pub const DEFAULT_MAX_ENTRIES: usize = 512;
/// Where, under the state directory, the node's FUSE connection is mounted (the directory is
/// 0700 like the state directory: only the daemon goes there; pods see bind mounts).
pub const SESSION_DIR: &str = "fuse";

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
struct Params {
    volume_id: String,
    target: PathBuf,
    role: String,
    spec: VolumeSpec,
    auth_mount: String,
    cache_ttl: Duration,
    file_mode: u16,
    mount_group: Option<u32>,
    server: Arc<VaultServer>,
    token: Token,
    audience: String,
    label: String,
    /// `namespace/name/uid` of the pod, for audit events.
    pod: Option<String>,
    /// The slot recorded for this volume (restart recovery), if any.
    slot: Option<Slot>,
    /// The context without the tokens, as kept in the state file.
    context: BTreeMap<String, String>,
}

/// What the state directory keeps per volume: enough to serve it again after a restart,
/// never a secret value. The service-account token is short-lived and audience-bound.
#[derive(Serialize, Deserialize)]
struct StateRecord {
    volume_id: String,
    target_path: String,
    context: BTreeMap<String, String>,
    audience: String,
    token: String,
    mount_group: String,
    /// The volume's slot on the node's FUSE connection (its inode numbers' high half); 0 in
    /// records written before slots existed (a new one is given).
    #[serde(default)]
    slot: Slot,
}

impl Drop for StateRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

impl StateRecord {
    fn to_request(&self) -> PublishRequest {
        let mut context: HashMap<String, String> = self.context.clone().into_iter().collect();
        context.insert(
            TOKENS.to_string(),
            serde_json::json!({ &self.audience: { "token": &self.token } }).to_string(),
        );
        PublishRequest {
            volume_id: self.volume_id.clone(),
            target_path: self.target_path.clone(),
            readonly: true,
            capability: Some(Capability {
                block: false,
                mount_group: self.mount_group.clone(),
            }),
            context,
            secrets: HashMap::new(),
        }
    }
}

fn invalid(message: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(message.into())
}

fn validate(req: &PublishRequest, config: &CsiConfig) -> Result<Params, CsiError> {
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
    let attr = |key: &str| {
        req.context
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    for key in req.context.keys() {
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
        invalid("volumeAttributes.secrets is missing: a YAML or JSON list of {name, path, key?}")
    })?;
    let spec = parse_spec_document(secrets)
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
        None => DEFAULT_CACHE_TTL.max(config.min_cache_ttl),
    };
    if cache_ttl < config.min_cache_ttl {
        return Err(invalid(format!(
            "volumeAttributes.cacheTTL {} is below this node's minimum of {} (vaultfs csi --min-cache-ttl)",
            format_duration(cache_ttl),
            format_duration(config.min_cache_ttl)
        )));
    }
    let file_mode = match attr("fileMode") {
        Some(m) => {
            parse_file_mode(m).map_err(|e| invalid(format!("volumeAttributes.fileMode: {e}")))?
        }
        // Without a group to grant access to, the pod's (arbitrary) user must still read.
        None if mount_group.is_some() => 0o440,
        None => 0o444,
    };
    let server_name = attr("vaultServer").unwrap_or("");
    let server = config.servers.get(server_name).cloned().ok_or_else(|| {
        let mut known: Vec<_> = config
            .servers
            .keys()
            .filter(|k| !k.is_empty())
            .map(String::as_str)
            .collect();
        known.sort();
        if server_name.is_empty() {
            invalid("this node has no default Vault server (--vault-addr); set volumeAttributes.vaultServer")
        } else {
            invalid(format!(
                "volumeAttributes.vaultServer {server_name:?} is not configured on this node; known: {}",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        }
    })?;
    let token = service_account_token(req, &audience)?;
    let label = format!(
        "{}/{}/{}",
        attr(POD_NAMESPACE).unwrap_or("-"),
        attr(POD_NAME).unwrap_or("-"),
        req.volume_id
    );
    let pod = attr(POD_NAME).map(|name| {
        format!(
            "{}/{name}/{}",
            attr(POD_NAMESPACE).unwrap_or("-"),
            attr(POD_UID).unwrap_or("-")
        )
    });
    let context = req
        .context
        .iter()
        .filter(|(k, _)| k.as_str() != TOKENS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Params {
        volume_id: req.volume_id.clone(),
        target,
        role,
        spec,
        auth_mount,
        cache_ttl,
        file_mode,
        mount_group,
        server,
        token,
        audience,
        label,
        pod,
        slot: None,
        context,
    })
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

/// One published volume.
struct Served {
    volume_id: String,
    slot: Slot,
    serving: Serving,
}

/// All volumes of this node.
pub struct VolumeManager {
    config: CsiConfig,
    mounter: Arc<dyn Mounter>,
    metrics: Arc<Metrics>,
    volumes: Mutex<HashMap<PathBuf, Served>>,
    /// Volumes served or being started, bounded by `max_volumes`.
    room_taken: Arc<AtomicUsize>,
    /// The next slot given to a new volume: slots are never reused by one daemon, so no kernel
    /// cache of an unpublished volume can be mistaken for a new one.
    next_slot: AtomicU32,
    /// One publish/unpublish at a time per target.
    target_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl VolumeManager {
    pub fn new(config: CsiConfig, mounter: Arc<dyn Mounter>, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            mounter,
            metrics,
            volumes: Mutex::new(HashMap::new()),
            room_taken: Arc::default(),
            next_slot: AtomicU32::new(1),
            target_locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Number of volumes served now.
    pub fn len(&self) -> usize {
        self.volumes.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn target_lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.target_locks
            .lock()
            .entry(target.to_path_buf())
            .or_default()
            .clone()
    }

    /// Drops a target's lock entry once no request holds or waits for it (the map's reference
    /// and the caller's are the only ones left), so entries do not pile up.
    fn release_target_lock(&self, target: &Path, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.target_locks.lock();
        if Arc::strong_count(&lock) == 2 {
            locks.remove(target);
        }
    }

    /// NodePublishVolume: validates, then mounts a new volume (logging in with the pod's
    /// token first) or, for a volume already served at this target, swaps in the fresh token.
    pub async fn publish(&self, req: &PublishRequest) -> Result<(), CsiError> {
        let params = validate(req, &self.config)?;
        let target = params.target.clone();
        let lock = self.target_lock(&target);
        let result = {
            let _one = lock.lock().await;
            self.publish_locked(params).await
        };
        self.release_target_lock(&target, lock);
        result
    }

    async fn publish_locked(&self, params: Params) -> Result<(), CsiError> {
        let served = match self.volumes.lock().get(&params.target) {
            Some(volume) if volume.volume_id != params.volume_id => {
                return Err(CsiError::AlreadyExists(format!(
                    "target_path {} already holds volume {}, not {}",
                    params.target.display(),
                    volume.volume_id,
                    params.volume_id
                )));
            }
            Some(volume) => {
                volume
                    .serving
                    .set_credential(Credential::Value(params.token.clone()));
                Some(volume.slot)
            }
            None => None,
        };
        if let Some(slot) = served {
            if let Err(e) = self.save_state(&params, slot) {
                // The volume is healthy; only a restart would miss the newer token.
                tracing::warn!(volume = %params.label, error = %e, "could not record the refreshed token");
            }
            tracing::debug!(volume = %params.label, "republished: service-account token refreshed");
            return Ok(());
        }
        self.start(params, true).await
    }

    /// Mounts a volume. With `strict`, a login Vault refuses fails the publish; otherwise
    /// (restart recovery) the volume is mounted and logs in on first use.
    async fn start(&self, params: Params, strict: bool) -> Result<(), CsiError> {
        let room = self.reserve_room()?;
        let volume = Volume::build(
            params.server.clone(),
            params.spec.clone(),
            VolumeConfig {
                name: params.label.clone(),
                pod: params.pod.clone(),
                auth: Auth::Login {
                    method: LoginMethod::Kubernetes,
                    mount: params.auth_mount.clone(),
                    role: params.role.clone(),
                    credential: Credential::Value(params.token.clone()),
                },
                cache: cache_config(
                    params.cache_ttl,
                    Duration::from_secs(300),
                    self.config.vault_timeout,
                    self.config.cache_max_entries,
                    self.config.cache_max_bytes,
                ),
                uid: 0,
                gid: params.mount_group.unwrap_or(0),
                file_mode: params.file_mode,
            },
            &self.metrics,
        );
        if strict {
            // A pod must not wait long on an unreachable Vault: give the login a short bound
            // and mount anyway when it runs out (the first read logs in).
            let wait = self.config.vault_timeout.min(PUBLISH_LOGIN_WAIT);
            let login = tokio::time::timeout(wait, volume.source().login())
                .await
                .unwrap_or_else(|_| {
                    Err(SourceError::Unavailable(format!(
                        "no answer within {wait:?}"
                    )))
                });
            match login {
                Ok(()) => {}
                Err(SourceError::Unavailable(reason)) => tracing::warn!(
                    volume = %params.label, %reason,
                    "Vault unreachable; mounting anyway, the login is retried on first read"
                ),
                Err(err) => {
                    let reason = match err {
                        SourceError::LoginRefused(m) | SourceError::Invalid(m) => m,
                        other => format!("login to auth/{} failed: {other}", params.auth_mount),
                    };
                    return Err(CsiError::PermissionDenied(reason));
                }
            }
        }
        let mount_config = MountConfig {
            allow_other: true,
            create_target: true,
        };
        let slot = params
            .slot
            .filter(|s| *s != 0)
            .unwrap_or_else(|| self.next_slot.fetch_add(1, Ordering::AcqRel));
        let mounted = match self
            .mounter
            .mount(&params.target, slot, volume.fs(), &mount_config)
        {
            Ok(m) => m,
            Err(e) => {
                volume.abandon().await;
                return Err(CsiError::Internal(e.to_string()));
            }
        };
        if let Err(e) = self.save_state(&params, slot) {
            let _ = mounted.unmount();
            volume.abandon().await;
            return Err(CsiError::Internal(format!(
                "cannot write the volume state under {}: {e}",
                self.config.state_dir.display()
            )));
        }
        tracing::info!(volume = %params.label, target = %params.target.display(), files = volume.files(), "volume published");
        room.keep();
        self.volumes.lock().insert(
            params.target.clone(),
            Served {
                volume_id: params.volume_id,
                slot,
                serving: volume.serve(mounted),
            },
        );
        Ok(())
    }

    /// Most volumes this node serves at once.
    pub fn max_volumes(&self) -> usize {
        self.config.max_volumes
    }

    /// Takes room for one of the `max_volumes` volumes for a volume being started; it is given back when
    /// the returned guard drops, unless `keep` hands it to the served volume (given back at
    /// unpublish).
    fn reserve_room(&self) -> Result<RoomGuard, CsiError> {
        let max = self.config.max_volumes;
        self.room_taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|n| {
                CsiError::ResourceExhausted(format!(
                    "this node already serves {n} vaultfs volumes, the most it allows (vaultfs csi --max-volumes {max})"
                ))
            })?;
        Ok(RoomGuard {
            taken: Some(self.room_taken.clone()),
        })
    }

    /// NodeUnpublishVolume: unmounts (lazily if busy), revokes the volume's Vault token, drops
    /// and zeroizes its cache, forgets its state. Unknown targets succeed.
    pub async fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(invalid("volume_id is missing"));
        }
        if target_path.is_empty() {
            return Err(invalid("target_path is missing"));
        }
        let target = PathBuf::from(target_path);
        let lock = self.target_lock(&target);
        let result = {
            let _one = lock.lock().await;
            self.unpublish_locked(volume_id, &target).await
        };
        self.release_target_lock(&target, lock);
        result
    }

    async fn unpublish_locked(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let target_path = target.display().to_string();
        let volume = self.volumes.lock().remove(target);
        let unmounted = match volume {
            Some(volume) => {
                self.room_taken.fetch_sub(1, Ordering::AcqRel);
                volume.serving.tear_down().await
            }
            None => self.mounter.unmount_target(target).map(|_| ()),
        };
        unmounted.map_err(|e| CsiError::Internal(format!("cannot unmount {target_path}: {e}")))?;
        self.forget_state(target);
        // The plugin created the target directory; kubelet removes its parent.
        let _ = std::fs::remove_dir(target);
        tracing::info!(volume_id, target = target_path, "volume unpublished");
        Ok(())
    }

    /// Lets go of every volume without unmounting, for a daemon that is stopping: the mounts
    /// stay in place (dead once this process exits) and the next daemon serves them again
    /// from the state directory.
    pub fn release_for_restart(&self) -> usize {
        let volumes: Vec<_> = self.volumes.lock().drain().collect();
        let count = volumes.len();
        self.room_taken.fetch_sub(count, Ordering::AcqRel);
        for (_, volume) in volumes {
            volume.serving.leave_for_restart();
        }
        count
    }

    /// Serves again the volumes an earlier daemon recorded: mounts them over the dead mounts
    /// the earlier daemon left; they log in on first use with the recorded token (a republish brings a
    /// fresh one). Volumes whose pod directory is gone are forgotten.
    pub async fn recover(&self) -> usize {
        let dir = self.volumes_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StateRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => records.push((path, r)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable volume state file");
                }
            }
        }
        // New volumes get slots above every recorded one.
        let highest = records.iter().map(|(_, r)| r.slot).max().unwrap_or(0);
        self.next_slot
            .fetch_max(highest.saturating_add(1), Ordering::AcqRel);
        let mut recovered = 0;
        for (path, record) in records {
            let target = PathBuf::from(&record.target_path);
            if target.parent().is_none_or(|p| !p.exists()) {
                tracing::info!(target = %target.display(), "pod is gone; forgetting its volume");
                let _ = self.mounter.unmount_target(&target);
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // A dead mount at the target stays: the new one is stacked on it (see
            // `mount::prepare_target`) so running containers see it.
            let lock = self.target_lock(&target);
            let result = {
                let _one = lock.lock().await;
                if self.volumes.lock().contains_key(&target) {
                    Ok(())
                } else {
                    match validate(&record.to_request(), &self.config) {
                        Ok(params) => {
                            let params = Params {
                                slot: Some(record.slot),
                                ..params
                            };
                            self.start(params, false).await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            self.release_target_lock(&target, lock);
            match result {
                Ok(()) => recovered += 1,
                Err(e) => {
                    tracing::warn!(target = %target.display(), error = %e, "could not recover a volume; kubelet's next republish will retry")
                }
            }
        }
        recovered
    }

    fn volumes_dir(&self) -> PathBuf {
        self.config.state_dir.join("volumes")
    }

    fn state_file(&self, target: &Path) -> PathBuf {
        // FNV-1a of the target path: stable, filesystem-safe, one file per target.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in target.as_os_str().as_encoded_bytes() {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.volumes_dir().join(format!("{hash:016x}.json"))
    }

    /// Writes the volume's state atomically, mode 0600.
    fn save_state(&self, params: &Params, slot: Slot) -> std::io::Result<()> {
        let dir = self.volumes_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let record = StateRecord {
            volume_id: params.volume_id.clone(),
            target_path: params.target.display().to_string(),
            context: params.context.clone(),
            audience: params.audience.clone(),
            token: params.token.expose().to_string(),
            mount_group: params
                .mount_group
                .map(|g| g.to_string())
                .unwrap_or_default(),
            slot,
        };
        let bytes = zeroize::Zeroizing::new(crate::secret::to_vec_exact(&record));
        let final_path = self.state_file(&params.target);
        let tmp = final_path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        drop(file);
        std::fs::rename(&tmp, &final_path)
    }

    fn forget_state(&self, target: &Path) {
        let path = self.state_file(target);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "could not remove volume state");
            }
        }
    }
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
