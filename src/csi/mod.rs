//! The Kubernetes CSI node plugin: Identity and Node services over gRPC on a unix socket
//! (`service`), what a publish request may say (`request`), the per-pod volume lifecycle
//! behind them (`volumes`) and the records that outlive a daemon (`state`). `tonic` is used
//! only here; mounting goes through `mount::Mounter`.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub mod request;
pub mod service;
mod state;
pub mod volumes;

pub use crate::source::Connect;
pub use request::{Capability, CsiError, PublishRequest, ATTRIBUTES, TOKENS};
pub use state::make_dir_private;
pub use volumes::VolumeManager;

use crate::source::Identity;

/// The generated CSI v1 protocol types (the subset in `proto/csi.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("csi.v1");
}

/// The CSI driver name: the `CSIDriver` object, kubelet's plugin directory and
/// `GetPluginInfo` all use it.
pub const DRIVER_NAME: &str = "csi.vaultfs.io";
/// Where kubelet's node-driver-registrar expects the socket inside the plugin container.
pub const DEFAULT_ENDPOINT: &str = "unix:///csi/csi.sock";
/// Per-volume state, on a tmpfs-backed host directory.
pub const DEFAULT_STATE_DIR: &str = "/run/vaultfs";
/// Port of `/metrics` and `/healthz` in the deploy manifests.
pub const DEFAULT_METRICS_PORT: u16 = 9810;

/// Node plugin settings.
pub struct CsiConfig {
    pub node_id: String,
    /// Directory (tmpfs-backed) for per-volume state.
    pub state_dir: PathBuf,
    /// The names of the Vault servers volumes may use: `""` is the default, other names are
    /// picked with the `vaultServer` attribute. The `Connect` function knows the servers.
    pub servers: BTreeSet<String>,
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
    /// Volumes may set `reloadSignal` (`--allow-reload-signals`): the daemon then signals
    /// processes of their pods, which needs the host's PID namespace (`hostPID: true`).
    pub allow_reload_signals: bool,
    /// Volumes of one identity share one session and one cache (`--share-identities`; see
    /// `source::IdentityKey` for what "one identity" means).
    pub share_identities: bool,
}

/// Defaults of the node-wide limits.
pub const DEFAULT_MIN_CACHE_TTL: Duration = crate::config::DEFAULT_MIN_CACHE_TTL.value;
pub const DEFAULT_MAX_VOLUMES: usize = 1000;
pub const DEFAULT_MAX_ENTRIES: usize = 512;

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<&Path, String> {
    endpoint
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .map(Path::new)
        .ok_or_else(|| {
            format!("invalid --endpoint {endpoint:?}: expected unix:///ABSOLUTE/PATH/csi.sock")
        })
}

/// Serves Identity and Node on `socket` until `shutdown` completes. A stale socket file left
/// by an earlier daemon is replaced.
pub async fn serve<S: Identity>(
    manager: Arc<VolumeManager<S>>,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "replaced a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), driver = DRIVER_NAME, "serving CSI");
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(
            service::IdentityService,
        ))
        .add_service(pb::node_server::NodeServer::new(service::NodeService::new(
            manager,
        )))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving gRPC")?;
    Ok(())
}
