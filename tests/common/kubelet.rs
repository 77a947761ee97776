//! Kubelet's side of the CSI node plugin: a [`CsiClient`] calls it over its unix socket with
//! the generated CSI v1 client; a [`Pod`] and the requests kubelet sends for an inline
//! ephemeral volume (pod information and service-account tokens in the volume context).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use vaultfs::csi::pb;
use vaultfs::csi::pb::identity_client::IdentityClient;
use vaultfs::csi::pb::node_client::NodeClient;

use super::csi::{CsiDaemon, CsiNode, DRIVER_NAME};
use super::jwt::{rfc3339, ServiceAccountToken, SigningKey};

/// Longest wait for one gRPC call.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Kubelet's volume-context keys (the pod information it adds with `podInfoOnMount`).
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT_NAME: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
pub const SERVICE_ACCOUNT_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// A blocking CSI client over a unix socket; every call is bounded by [`RPC_TIMEOUT`].
pub struct CsiClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl CsiClient {
    pub fn connect(socket: &Path) -> Result<CsiClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI is a placeholder: the connector always dials the unix socket.
            Endpoint::try_from("http://[::]:50051")
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| format!("{e:?}"))
        })?;
        Ok(CsiClient { rt, channel })
    }

    fn call<T, F>(&self, what: &str, fut: F) -> Result<T, tonic::Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // The timer must be created inside the runtime.
        match self
            .rt
            .block_on(async move { tokio::time::timeout(RPC_TIMEOUT, fut).await })
        {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => panic!("{what}: no answer within {RPC_TIMEOUT:?}"),
        }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn plugin_info(&self) -> Result<pb::GetPluginInfoResponse, tonic::Status> {
        let mut c = self.identity();
        self.call("GetPluginInfo", async move {
            c.get_plugin_info(pb::GetPluginInfoRequest {}).await
        })
    }

    pub fn plugin_capabilities(&self) -> Result<pb::GetPluginCapabilitiesResponse, tonic::Status> {
        let mut c = self.identity();
        self.call("GetPluginCapabilities", async move {
            c.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
                .await
        })
    }

    pub fn probe(&self) -> Result<pb::ProbeResponse, tonic::Status> {
        let mut c = self.identity();
        self.call("Probe", async move { c.probe(pb::ProbeRequest {}).await })
    }

    pub fn node_info(&self) -> Result<pb::NodeGetInfoResponse, tonic::Status> {
        let mut c = self.node();
        self.call("NodeGetInfo", async move {
            c.node_get_info(pb::NodeGetInfoRequest {}).await
        })
    }

    pub fn node_capabilities(&self) -> Result<pb::NodeGetCapabilitiesResponse, tonic::Status> {
        let mut c = self.node();
        self.call("NodeGetCapabilities", async move {
            c.node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
                .await
        })
    }

    pub fn publish(&self, request: pb::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        let mut c = self.node();
        self.call("NodePublishVolume", async move {
            c.node_publish_volume(request).await
        })
        .map(|_| ())
    }

    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut c = self.node();
        let request = pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            target_path: target.display().to_string(),
        };
        self.call("NodeUnpublishVolume", async move {
            c.node_unpublish_volume(request).await
        })
        .map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// Pods and their volumes
// ---------------------------------------------------------------------------------------------

/// A pod as kubelet describes it to the plugin.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl Pod {
    /// A pod with a fresh uid.
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Pod {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            std::process::id(),
            n & 0xffff,
            (super::jwt::now_secs() & 0xfff),
            n & 0xfff,
            fnv(name) & 0xffff_ffff_ffff
        );
        Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            service_account: service_account.to_string(),
        }
    }

    /// A service-account token for this pod, audience `vault`, issued now for an hour.
    pub fn token(&self) -> ServiceAccountToken {
        ServiceAccountToken::new(
            &self.namespace,
            &self.service_account,
            &self.name,
            &self.uid,
        )
    }

    /// The signed token plus its expiry (what kubelet hands the plugin).
    pub fn signed_token(&self, key: &SigningKey) -> (String, u64) {
        let t = self.token();
        (t.sign(key), t.expires_at())
    }

    /// Kubelet's id for the inline volume `volume` of this pod: `csi-<hash>`.
    pub fn volume_id(&self, volume: &str) -> String {
        let mut h = DefaultHasher::new();
        (self.uid.as_str(), volume, DRIVER_NAME).hash(&mut h);
        format!(
            "csi-{:016x}{:016x}",
            h.finish(),
            fnv(&self.uid) ^ fnv(volume)
        )
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `{"vault": {"token": JWT, "expirationTimestamp": ...}}`, the value of
/// [`SERVICE_ACCOUNT_TOKENS`] for the audience `vault`.
pub fn tokens_json(jwt: &str, expires_at: u64) -> String {
    json!({ "vault": { "token": jwt, "expirationTimestamp": rfc3339(expires_at) } }).to_string()
}

/// The NodePublishVolume request kubelet sends for an inline ephemeral volume: readonly,
/// `SINGLE_NODE_WRITER` mount access, the pod's `volumeAttributes` plus kubelet's pod-info keys
/// in `volume_context`, and the service-account token under [`SERVICE_ACCOUNT_TOKENS`] in the
/// volume context (older kubelets; see [`tokens_in_secrets`] for newer ones).
pub fn publish_request(
    pod: &Pod,
    volume: &str,
    target: &Path,
    attributes: &[(&str, &str)],
    jwt: &str,
    expires_at: u64,
) -> pb::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    context.insert(POD_NAME.into(), pod.name.clone());
    context.insert(POD_NAMESPACE.into(), pod.namespace.clone());
    context.insert(POD_UID.into(), pod.uid.clone());
    context.insert(SERVICE_ACCOUNT_NAME.into(), pod.service_account.clone());
    context.insert(EPHEMERAL.into(), "true".into());
    context.insert(SERVICE_ACCOUNT_TOKENS.into(), tokens_json(jwt, expires_at));
    pb::NodePublishVolumeRequest {
        volume_id: pod.volume_id(volume),
        publish_context: HashMap::new(),
        staging_target_path: String::new(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability("")),
        readonly: true,
        secrets: HashMap::new(),
        volume_context: context,
    }
}

/// A publish of `pod`'s volume `secrets` logging in through the `jwt` auth mount as `role`
/// with a token `key` signed, declaring `secrets` (YAML) plus any `extra` attributes; with the
/// target path kubelet would use on `node`.
pub fn jwt_publish(
    node: &CsiNode,
    pod: &Pod,
    key: &SigningKey,
    role: &str,
    secrets: &str,
    extra: &[(&str, &str)],
) -> (pb::NodePublishVolumeRequest, PathBuf) {
    let target = node.target_path(pod, "secrets");
    let (jwt, exp) = pod.signed_token(key);
    let mut attributes = vec![("role", role), ("authMount", "jwt"), ("secrets", secrets)];
    attributes.extend_from_slice(extra);
    let request = publish_request(pod, "secrets", &target, &attributes, &jwt, exp);
    (request, target)
}

/// Publishes through `daemon` the volume `secrets` of pod `ns/<name>` (service account `app`,
/// logging in as role `app` through the `jwt` mount with a token `key` signed), declaring
/// `secrets` with `attributes`; panics with the daemon's output if the publish fails. Returns
/// the pod and its target path.
pub fn publish_app(
    node: &CsiNode,
    key: &SigningKey,
    daemon: &CsiDaemon,
    name: &str,
    secrets: &str,
    attributes: &[(&str, &str)],
) -> (Pod, PathBuf) {
    let pod = Pod::new("ns", name, "app");
    let (request, target) = jwt_publish(node, &pod, key, "app", secrets, attributes);
    if let Err(s) = daemon.client().publish(request) {
        panic!(
            "publish of {name}'s volume failed with {}; daemon output:\n{}",
            describe(&s),
            daemon.logs()
        );
    }
    (pod, target)
}

/// Moves the service-account tokens from the volume context to `secrets`, as newer kubelets
/// send them.
pub fn tokens_in_secrets(
    mut request: pb::NodePublishVolumeRequest,
) -> pb::NodePublishVolumeRequest {
    if let Some(tokens) = request.volume_context.remove(SERVICE_ACCOUNT_TOKENS) {
        request
            .secrets
            .insert(SERVICE_ACCOUNT_TOKENS.to_string(), tokens);
    }
    request
}

/// A mount volume capability, `SINGLE_NODE_WRITER`, with the pod's fsGroup as
/// `volume_mount_group` (empty: none).
pub fn mount_capability(volume_mount_group: &str) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: Vec::new(),
            volume_mount_group: volume_mount_group.to_string(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Describes a gRPC failure for assertion messages.
pub fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Publishes `request` (a publish with `what`) expecting it refused with `code`, and nothing
/// mounted at its target; returns the refusal.
pub fn expect_refused(
    client: &CsiClient,
    request: pb::NodePublishVolumeRequest,
    code: tonic::Code,
    what: &str,
) -> tonic::Status {
    let target = PathBuf::from(&request.target_path);
    let err = client
        .publish(request)
        .expect_err(&format!("a publish with {what} succeeded"));
    assert_eq!(err.code(), code, "{what}: {}", describe(&err));
    assert!(
        !super::mounts::is_mounted(&target),
        "{what}: something is mounted at the target of a refused publish"
    );
    err
}
