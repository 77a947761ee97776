//! The gRPC face of the node plugin: CSI Identity and Node services. Each RPC converts its
//! protobuf request, calls the `VolumeManager`, and maps `CsiError` to a gRPC `Status` in one
//! place. Each volume call runs in a span (`csi`) with a request id this daemon gives it, so
//! that every line logged on its behalf can be told apart. Requests are never logged whole:
//! they carry service-account tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pb;
use super::DRIVER_NAME;
use super::{Capability, CsiError, PublishRequest, VolumeManager};
use crate::source::Identity;

fn code_name(result: &Result<(), CsiError>) -> &'static str {
    match result {
        Ok(()) => "OK",
        Err(CsiError::InvalidArgument(_)) => "InvalidArgument",
        Err(CsiError::PermissionDenied(_)) => "PermissionDenied",
        Err(CsiError::AlreadyExists(_)) => "AlreadyExists",
        Err(CsiError::ResourceExhausted(_)) => "ResourceExhausted",
        Err(CsiError::Unavailable(_)) => "Unavailable",
        Err(CsiError::Internal(_)) => "Internal",
    }
}

/// Numbers the volume calls this daemon answers, for their spans.
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// The span of one call of `rpc` about `volume_id`, with a new request id.
fn call_span(rpc: &'static str, volume_id: &str) -> tracing::Span {
    let req = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
    tracing::info_span!("csi", req, rpc, volume_id)
}

fn status(err: CsiError) -> Status {
    match err {
        CsiError::InvalidArgument(m) => Status::invalid_argument(m),
        CsiError::PermissionDenied(m) => Status::permission_denied(m),
        CsiError::AlreadyExists(m) => Status::already_exists(m),
        CsiError::ResourceExhausted(m) => Status::resource_exhausted(m),
        CsiError::Unavailable(m) => Status::unavailable(m),
        CsiError::Internal(m) => Status::internal(m),
    }
}

#[derive(Default)]
pub struct IdentityService;

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        // Node-only plugin: no controller service, no topology constraints.
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

pub struct NodeService<S> {
    manager: Arc<VolumeManager<S>>,
}

impl<S: Identity> NodeService<S> {
    pub fn new(manager: Arc<VolumeManager<S>>) -> Self {
        Self { manager }
    }
}

fn publish_request(req: pb::NodePublishVolumeRequest) -> PublishRequest {
    use pb::volume_capability::AccessType;
    let capability = req.volume_capability.map(|c| match c.access_type {
        Some(AccessType::Mount(m)) => Capability {
            block: false,
            mount_group: m.volume_mount_group,
        },
        Some(AccessType::Block(_)) => Capability {
            block: true,
            mount_group: String::new(),
        },
        None => Capability::default(),
    });
    PublishRequest {
        volume_id: req.volume_id,
        target_path: req.target_path,
        readonly: req.readonly,
        capability,
        context: req.volume_context,
        secrets: req.secrets,
    }
}

#[tonic::async_trait]
impl<S: Identity> pb::node_server::Node for NodeService<S> {
    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let req = publish_request(request.into_inner());
        let (volume_id, target) = (req.volume_id.clone(), req.target_path.clone());
        let span = call_span("NodePublishVolume", &volume_id);
        let result = self.manager.publish(&req).instrument(span.clone()).await;
        let _in_call = span.enter();
        let elapsed = started.elapsed();
        self.manager
            .metrics()
            .csi_request("NodePublishVolume", code_name(&result), elapsed);
        match &result {
            Ok(()) => tracing::debug!(volume_id, target, ?elapsed, "NodePublishVolume ok"),
            Err(e) => tracing::warn!(volume_id, target, error = %e, "NodePublishVolume refused"),
        }
        result
            .map(|()| Response::new(pb::NodePublishVolumeResponse {}))
            .map_err(status)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let span = call_span("NodeUnpublishVolume", &req.volume_id);
        let result = self
            .manager
            .unpublish(&req.volume_id, &req.target_path)
            .instrument(span.clone())
            .await;
        let _in_call = span.enter();
        self.manager.metrics().csi_request(
            "NodeUnpublishVolume",
            code_name(&result),
            started.elapsed(),
        );
        if let Err(e) = &result {
            tracing::warn!(volume_id = req.volume_id, target = req.target_path, error = %e, "NodeUnpublishVolume failed");
        }
        result
            .map(|()| Response::new(pb::NodeUnpublishVolumeResponse {}))
            .map_err(status)
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{rpc::Type, Rpc, Type as CapabilityType};
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![pb::NodeServiceCapability {
                r#type: Some(CapabilityType::Rpc(Rpc {
                    r#type: Type::VolumeMountGroup as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.manager.node_id().to_string(),
            max_volumes_per_node: self.manager.max_volumes() as i64,
            accessible_topology: None,
        }))
    }
}
