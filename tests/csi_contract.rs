//! CSI contract tier: the real gRPC server on a unix socket in a tempdir, with a
//! `FakeMounter` and `MockSource` identities, driven by a tonic client playing kubelet. No
//! root, no Vault: identities are made from the source-neutral `Login` the plugin asks for
//! (the configured server names are what `vaultServer` is validated against).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use vaultfs::csi::pb::identity_client::IdentityClient;
use vaultfs::csi::pb::node_client::NodeClient;
use vaultfs::csi::pb::{self, volume_capability};
use vaultfs::csi::{Connect, CsiConfig, VolumeManager, TOKENS};
use vaultfs::metrics::Metrics;
use vaultfs::mount::FakeMounter;
use vaultfs::source::mock::{IdentityCalls, MockSource};
use vaultfs::source::{Login, SourceError};

/// How the next identities answer a login: after `latency`, with `refusal` if set.
#[derive(Clone, Default)]
struct Logins {
    refusal: Option<SourceError>,
    latency: Duration,
}

/// The identities the plugin made, by volume label, with the login each was given.
type Made = Arc<Mutex<Vec<(String, Login, Arc<MockSource>)>>>;

struct Plugin {
    dir: tempfile::TempDir,
    fake: Arc<FakeMounter<MockSource>>,
    manager: Arc<VolumeManager<MockSource>>,
    made: Made,
    logins: Arc<Mutex<Logins>>,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn config(state_dir: &Path, share_identities: bool) -> CsiConfig {
    let servers = BTreeSet::from([String::new(), "backup".to_string()]);
    CsiConfig {
        node_id: "node-1".into(),
        state_dir: state_dir.to_path_buf(),
        servers,
        vault_timeout: Duration::from_secs(2),
        cache_max_entries: 16,
        cache_max_bytes: 1 << 16,
        min_cache_ttl: Duration::from_secs(5),
        max_volumes: 4,
        max_entries: 3,
        allow_reload_signals: false,
        share_identities,
    }
}

async fn connect(socket: PathBuf) -> Channel {
    for _ in 0..100 {
        let path = socket.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
        if let Ok(channel) = channel {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the CSI socket {} never accepted a connection",
        socket.display()
    );
}

impl Plugin {
    async fn start() -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Plugin {
        Self::start_with(dir, false).await
    }

    /// With `vaultfs csi --share-identities`.
    async fn start_sharing() -> Plugin {
        Self::start_with(tempfile::tempdir().expect("tempdir"), true).await
    }

    async fn start_with(dir: tempfile::TempDir, share_identities: bool) -> Plugin {
        let fake = Arc::new(FakeMounter::default());
        let made: Made = Arc::default();
        let logins: Arc<Mutex<Logins>> = Arc::default();
        let (record, behaviour) = (made.clone(), logins.clone());
        let identities: Connect<MockSource> = Box::new(move |login: Login| {
            let source = Arc::new(MockSource::new());
            let behaviour = behaviour.lock().clone();
            source.refuse_logins(behaviour.refusal);
            source.set_latency(behaviour.latency);
            record
                .lock()
                .push((login.volume.clone(), login, source.clone()));
            Ok(source)
        });
        let manager = Arc::new(VolumeManager::with_identities(
            config(&dir.path().join("state"), share_identities),
            identities,
            fake.clone(),
            Arc::new(Metrics::new()),
        ));
        let socket = dir.path().join("plugin/csi.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = manager.clone();
        let path = socket.clone();
        let server = tokio::spawn(async move {
            vaultfs::csi::serve(served, &path, async {
                let _ = stopped.await;
            })
            .await
        });
        let channel = connect(socket).await;
        Plugin {
            dir,
            fake,
            manager,
            made,
            logins,
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            stop: Some(stop),
            server,
        }
    }

    async fn stop(mut self) -> tempfile::TempDir {
        self.stop
            .take()
            .expect("running")
            .send(())
            .expect("server alive");
        self.server.await.expect("join").expect("served cleanly");
        self.manager.release_for_restart();
        self.dir
    }

    fn target(&self, pod: &str) -> PathBuf {
        self.dir.path().join(format!(
            "pods/{pod}/volumes/kubernetes.io~csi/secrets/mount"
        ))
    }

    /// What the identity of the `n`th volume made was asked, and the secret reads and version
    /// checks it answered.
    fn identity(&self, n: usize) -> (IdentityCalls, usize, usize) {
        let made = self.made.lock();
        let source = &made[n].2;
        (
            source.identity_calls(),
            source.reads(),
            source.version_checks(),
        )
    }

    fn state_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join("state/volumes"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    async fn publish(&mut self, req: pb::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        self.node.node_publish_volume(req).await.map(|_| ())
    }

    async fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }
}

fn tokens_json(token: &str) -> String {
    serde_json::json!({"vault": {"token": token, "expirationTimestamp": "2026-11-27T01:00:00Z"}})
        .to_string()
}

/// A publish request as kubelet sends it for an inline ephemeral volume.
fn request(target: &Path, token: &str) -> pb::NodePublishVolumeRequest {
    let context: HashMap<String, String> = [
        ("role", "app"),
        ("secrets", "- {name: db/password, path: secret/app/db, key: password}\n- {name: all, path: secret/app/db}\n"),
        ("csi.storage.k8s.io/pod.name", "app-0"),
        ("csi.storage.k8s.io/pod.namespace", "team-a"),
        ("csi.storage.k8s.io/pod.uid", "0c6f6f2e-uid"),
        ("csi.storage.k8s.io/serviceAccount.name", "app"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([(TOKENS.to_string(), tokens_json(token))])
    .collect();
    std::fs::create_dir_all(target.parent().expect("target parent")).expect("kubelet's dir");
    pb::NodePublishVolumeRequest {
        volume_id: "csi-0123abcd".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume::default(),
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

#[tokio::test]
async fn identity_and_node_info_describe_a_node_only_plugin_with_mount_groups() {
    let mut p = Plugin::start().await;
    let info = p
        .identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, vaultfs::csi::DRIVER_NAME);
    assert!(!info.vendor_version.is_empty());
    let caps = p
        .identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "a node-only plugin offers no controller"
    );
    let probe = p
        .identity
        .probe(pb::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let node = p
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, "node-1");
    assert_eq!(node.max_volumes_per_node, 4, "kubelet learns --max-volumes");
    let caps = p
        .node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|pb::node_service_capability::Type::Rpc(rpc)| rpc.r#type)
        })
        .collect();
    assert_eq!(
        types,
        vec![pb::node_service_capability::rpc::Type::VolumeMountGroup as i32]
    );
    p.stop().await;
}

#[tokio::test]
async fn every_invalid_publish_is_refused_with_the_field_named_and_nothing_mounted() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    type Edit = Box<dyn Fn(&mut pb::NodePublishVolumeRequest)>;
    let set = |key: &'static str, value: &'static str| -> Edit {
        Box::new(move |r| {
            r.volume_context.insert(key.into(), value.into());
        })
    };
    let drop_key = |key: &'static str| -> Edit {
        Box::new(move |r| {
            r.volume_context.remove(key);
        })
    };
    let reload = |signal: &'static str, process: &'static str| -> Edit {
        Box::new(move |r| {
            r.volume_context
                .insert("reloadSignal".into(), signal.into());
            r.volume_context
                .insert("reloadProcess".into(), process.into());
        })
    };
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.volume_id.clear()), "volume_id is missing"),
        (
            Box::new(|r| r.target_path.clear()),
            "target_path is missing",
        ),
        (
            Box::new(|r| r.target_path = "relative/mount".into()),
            "not an absolute path",
        ),
        (
            Box::new(|r| r.volume_capability = None),
            "volume_capability is missing",
        ),
        (
            Box::new(|r| {
                r.volume_capability.as_mut().unwrap().access_type = Some(
                    volume_capability::AccessType::Block(volume_capability::BlockVolume {}),
                )
            }),
            "block access is not supported",
        ),
        (Box::new(|r| r.readonly = false), "readonly must be true"),
        (
            Box::new(|r| {
                r.volume_capability.as_mut().unwrap().access_type = Some(
                    volume_capability::AccessType::Mount(volume_capability::MountVolume {
                        volume_mount_group: "staff".into(),
                        ..Default::default()
                    }),
                )
            }),
            "volume_mount_group \"staff\"",
        ),
        (drop_key("role"), "volumeAttributes.role is missing"),
        (drop_key("secrets"), "volumeAttributes.secrets is missing"),
        (
            set("secrets", "- {name: a, path: secret/a, nme: x}"),
            "unknown field `nme`",
        ),
        (
            set("secrets", "- {name: ../a, path: secret/a}"),
            "secret entry \"../a\"",
        ),
        (set("secrets", "[unclosed"), "volumeAttributes.secrets"),
        (
            set("cacheTtl", "5s"),
            "unknown volumeAttributes key \"cacheTtl\"",
        ),
        (set("cacheTTL", "5 seconds"), "volumeAttributes.cacheTTL"),
        (
            set("cacheTTL", "0"),
            "volumeAttributes.cacheTTL 0s is below this node's minimum of 5s (vaultfs csi --min-cache-ttl)",
        ),
        (set("cacheTTL", "4s"), "below this node's minimum of 5s"),
        (set("fileMode", "0999"), "volumeAttributes.fileMode"),
        (set("authMount", "../sys"), "volumeAttributes.authMount"),
        (
            set("vaultServer", "elsewhere"),
            "vaultServer \"elsewhere\" is not configured on this node; known: backup",
        ),
        (drop_key(TOKENS), "serviceAccount.tokens is missing"),
        (
            set("audience", "other"),
            "no token for audience \"other\" (it has: vault)",
        ),
        (set(TOKENS, "not json"), "is not a JSON object"),
        (
            reload("SIGHUP", "app-srv"),
            "volumeAttributes.reloadSignal: this node does not send reload signals; the plugin must run with --allow-reload-signals",
        ),
        (
            reload("9", "app-srv"),
            "volumeAttributes.reloadSignal: unknown signal \"9\": expected a signal name such as SIGHUP",
        ),
        (
            reload("HUP", "sixteen-bytes-xx"),
            "volumeAttributes.reloadProcess: \"sixteen-bytes-xx\" is 16 bytes",
        ),
        (
            set("reloadSignal", "SIGHUP"),
            "volumeAttributes.reloadProcess is missing",
        ),
        (
            set("reloadProcess", "app-srv"),
            "volumeAttributes.reloadSignal is missing",
        ),
    ];
    for (edit, expected) in cases {
        let mut req = request(&target, "jwt-a");
        edit(&mut req);
        let status = p.publish(req).await.expect_err(expected);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "expected {expected:?} in {:?}",
            status.message()
        );
        assert!(
            !status.message().contains("jwt-a"),
            "the token leaked into an error"
        );
    }
    assert_eq!(
        p.fake.calls(),
        (0, 0),
        "a refused publish mounted something"
    );
    assert!(p.state_files().is_empty());
    p.stop().await;
}

#[tokio::test]
async fn publish_is_idempotent_and_a_republish_swaps_the_token_without_remounting() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    p.publish(request(&target, "jwt-first")).await.unwrap();
    assert_eq!(p.fake.mounted(), vec![target.clone()]);
    assert!(target.is_dir(), "the plugin creates the target directory");
    let state = p.state_files();
    assert_eq!(state.len(), 1);
    let mode = std::fs::metadata(&state[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&state[0])
        .unwrap()
        .contains("jwt-first"));

    p.publish(request(&target, "jwt-first")).await.unwrap();
    p.publish(request(&target, "jwt-second")).await.unwrap();
    assert_eq!(p.fake.calls(), (1, 0), "republish must not remount");
    let saved = std::fs::read_to_string(&state[0]).unwrap();
    assert!(
        saved.contains("jwt-second") && !saved.contains("jwt-first"),
        "{saved}"
    );

    let mut other = request(&target, "jwt-second");
    other.volume_id = "csi-other".into();
    let status = p.publish(other).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(p.fake.calls(), (1, 0));
    let metrics = p.manager.metrics().render();
    for line in [
        "vaultfs_csi_request_duration_seconds_count{rpc=\"NodePublishVolume\",code=\"OK\"} 3",
        "vaultfs_csi_request_duration_seconds_count{rpc=\"NodePublishVolume\",code=\"AlreadyExists\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    p.stop().await;
}

#[tokio::test]
async fn tokens_are_also_taken_from_the_secrets_field_and_files_follow_the_mount_group() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-b");
    let mut req = request(&target, "unused");
    let tokens = req.volume_context.remove(TOKENS).unwrap();
    req.secrets.insert(TOKENS.into(), tokens);
    req.volume_capability.as_mut().unwrap().access_type = Some(
        volume_capability::AccessType::Mount(volume_capability::MountVolume {
            volume_mount_group: "2000".into(),
            ..Default::default()
        }),
    );
    p.publish(req).await.unwrap();
    let fs = p.fake.fs_at(&target).expect("mounted");
    assert_eq!((fs.config().gid, fs.config().file_mode), (2000, 0o440));

    let plain = p.target("pod-c");
    p.publish(request(&plain, "jwt-c")).await.unwrap();
    let fs = p.fake.fs_at(&plain).expect("mounted");
    assert_eq!((fs.config().gid, fs.config().file_mode), (0, 0o444));
    let mut picked = request(&p.target("pod-d"), "jwt-d");
    picked
        .volume_context
        .insert("fileMode".into(), "0400".into());
    picked
        .volume_context
        .insert("vaultServer".into(), "backup".into());
    let target_d = p.target("pod-d");
    p.publish(picked).await.unwrap();
    assert_eq!(p.fake.fs_at(&target_d).unwrap().config().file_mode, 0o400);
    p.stop().await;
}

#[tokio::test]
async fn unpublish_unmounts_forgets_state_and_is_idempotent() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    p.publish(request(&target, "jwt-a")).await.unwrap();
    p.unpublish("csi-0123abcd", &target).await.unwrap();
    assert_eq!(p.fake.calls(), (1, 1));
    assert!(p.fake.mounted().is_empty());
    assert!(p.state_files().is_empty());
    assert!(
        !target.exists(),
        "the target directory the plugin made is removed"
    );
    p.unpublish("csi-0123abcd", &target).await.unwrap();
    p.unpublish("csi-never", &p.target("never-published"))
        .await
        .unwrap();
    assert_eq!(p.fake.calls(), (1, 1));
    let status = p.unpublish("", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("volume_id"));
    let status = p
        .unpublish("csi-0123abcd", Path::new(""))
        .await
        .unwrap_err();
    assert!(status.message().contains("target_path"));
    let metrics = p.manager.metrics().render();
    for line in [
        "vaultfs_csi_request_duration_seconds_count{rpc=\"NodeUnpublishVolume\",code=\"OK\"} 3",
        "vaultfs_csi_request_duration_seconds_count{rpc=\"NodeUnpublishVolume\",code=\"InvalidArgument\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    p.stop().await;
}

#[tokio::test]
async fn a_restarted_plugin_serves_recorded_volumes_again_and_forgets_gone_pods() {
    let mut p = Plugin::start().await;
    let kept = p.target("pod-a");
    let gone = p.target("pod-gone");
    p.publish(request(&kept, "jwt-a")).await.unwrap();
    let mut second = request(&gone, "jwt-b");
    second.volume_id = "csi-gone".into();
    p.publish(second).await.unwrap();
    let dir = p.stop().await;
    std::fs::remove_dir_all(dir.path().join("pods/pod-gone")).unwrap();

    let p = Plugin::start_in(dir).await;
    assert_eq!(p.manager.recover(None).await, 1);
    assert_eq!(p.fake.mounted(), vec![kept.clone()]);
    assert_eq!(p.state_files().len(), 1, "the gone pod's state is removed");
    p.stop().await;
}

#[tokio::test]
async fn publishing_past_max_volumes_is_resource_exhausted_and_unpublish_frees_a_slot() {
    let mut p = Plugin::start().await;
    let targets: Vec<PathBuf> = (0..5).map(|i| p.target(&format!("pod-{i}"))).collect();
    for (i, target) in targets.iter().take(4).enumerate() {
        let mut req = request(target, "jwt-a");
        req.volume_id = format!("csi-{i}");
        p.publish(req).await.expect("within --max-volumes");
    }
    let mut fifth = request(&targets[4], "jwt-a");
    fifth.volume_id = "csi-4".into();
    let status = p
        .publish(fifth.clone())
        .await
        .expect_err("past --max-volumes");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(
            "already serves 4 vaultfs volumes, the most it allows (vaultfs csi --max-volumes 4)"
        ),
        "{}",
        status.message()
    );
    assert_eq!(
        p.fake.mounted().len(),
        4,
        "nothing was mounted for the fifth"
    );
    // A republish of a served volume is not a new volume.
    let mut again = request(&targets[0], "jwt-b");
    again.volume_id = "csi-0".into();
    p.publish(again).await.expect("republish at the limit");
    p.unpublish("csi-1", &targets[1]).await.expect("unpublish");
    p.publish(fifth).await.expect("a slot was freed");
    p.stop().await;
}

#[tokio::test]
async fn publish_logs_in_as_the_pod_and_reads_no_secret_until_unpublish_revokes() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    p.publish(request(&target, "jwt-a")).await.unwrap();
    {
        let made = p.made.lock();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].0, "team-a/app-0/csi-0123abcd");
        let login = &made[0].1;
        assert_eq!(
            (login.auth_mount.as_str(), login.role.as_str()),
            ("kubernetes", "app")
        );
    }
    let (calls, reads, checks) = p.identity(0);
    assert_eq!(
        (calls.logins, calls.serving, calls.revoked),
        (1, true, false)
    );
    assert_eq!((reads, checks), (0, 0), "publish must read no secret");

    p.publish(request(&target, "jwt-b")).await.unwrap();
    let (calls, reads, _) = p.identity(0);
    assert_eq!(
        (calls.logins, calls.credentials),
        (1, 1),
        "republish hands the token over, no new login"
    );
    assert_eq!(reads, 0);
    assert_eq!(p.made.lock().len(), 1, "republish makes no new identity");

    p.unpublish("csi-0123abcd", &target).await.unwrap();
    let (calls, reads, checks) = p.identity(0);
    assert!(calls.revoked, "unpublish revokes the volume's token");
    assert_eq!((reads, checks), (0, 0));
    p.stop().await;
}

#[tokio::test]
async fn a_refused_login_is_permission_denied_with_vaults_reason_and_mounts_nothing() {
    let mut p = Plugin::start().await;
    p.logins.lock().refusal = Some(SourceError::LoginRefused(
        "Vault refused the login to auth/kubernetes as role \"app\": service account name not authorized".into(),
    ));
    let target = p.target("pod-a");
    let status = p.publish(request(&target, "jwt-a")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("service account name not authorized"),
        "{}",
        status.message()
    );
    assert!(p.fake.mounted().is_empty());
    assert!(p.state_files().is_empty());
    assert_eq!(p.manager.len(), 0);
    p.stop().await;
}

#[tokio::test]
async fn an_unanswered_login_holds_publish_for_at_most_two_seconds_then_mounts() {
    let mut p = Plugin::start().await;
    p.logins.lock().latency = Duration::from_secs(60);
    let target = p.target("pod-a");
    let started = Instant::now();
    p.publish(request(&target, "jwt-a")).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(2500),
        "publish took {waited:?}; promised: at most 2 s of login wait"
    );
    assert_eq!(p.fake.mounted(), vec![target]);
    let (calls, reads, _) = p.identity(0);
    assert_eq!((calls.logins, reads), (1, 0));
    p.stop().await;
}

#[tokio::test]
async fn a_slot_is_never_given_out_twice_even_by_a_successor_after_unpublish() {
    let mut p = Plugin::start().await;
    let (a, b) = (p.target("pod-a"), p.target("pod-b"));
    p.publish(request(&a, "jwt-a")).await.unwrap();
    let mut second = request(&b, "jwt-b");
    second.volume_id = "csi-b".into();
    p.publish(second).await.unwrap();
    p.unpublish("csi-b", &b).await.unwrap();
    assert_eq!(p.fake.slots(), vec![1, 2]);
    let dir = p.stop().await;

    // The successor serves the same connection: the kernel may still know slot 2's inodes.
    let mut p = Plugin::start_in(dir).await;
    assert_eq!(p.manager.recover(None).await, 1);
    let mut third = request(&p.target("pod-c"), "jwt-c");
    third.volume_id = "csi-c".into();
    p.publish(third).await.unwrap();
    assert_eq!(
        p.fake.slots(),
        vec![1, 3],
        "pod-a keeps slot 1; the new volume must not get the unpublished slot 2"
    );
    p.stop().await;
}

#[tokio::test]
async fn the_consistency_attribute_picks_the_mode_and_names_the_choices_when_wrong() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    p.publish(request(&target, "jwt-a")).await.unwrap();
    assert_eq!(
        p.fake.fs_at(&target).unwrap().config().consistency.as_str(),
        "cached",
        "the default mode"
    );
    let strict = p.target("pod-b");
    let mut req = request(&strict, "jwt-b");
    req.volume_id = "csi-b".into();
    req.volume_context
        .insert("consistency".into(), "strict".into());
    p.publish(req).await.unwrap();
    assert_eq!(
        p.fake.fs_at(&strict).unwrap().config().consistency.as_str(),
        "strict"
    );
    let mut bad = request(&p.target("pod-c"), "jwt-c");
    bad.volume_id = "csi-c".into();
    bad.volume_context
        .insert("consistency".into(), "eventual".into());
    let status = p.publish(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("volumeAttributes.consistency: unknown consistency \"eventual\": expected one of cached, strict"),
        "{}",
        status.message()
    );
    p.stop().await;
}

#[tokio::test]
async fn a_template_with_a_syntax_error_is_refused_at_publish_naming_entry_line_and_column() {
    let mut p = Plugin::start().await;
    let target = p.target("pod-a");
    let mut req = request(&target, "jwt-a");
    req.volume_context.insert(
        "secrets".into(),
        "- {name: db/password, path: secret/app/db, key: password}\n- name: db/url\n  template: \"postgresql://{{ secret('secret/app/db').user }@db\"\n".into(),
    );
    let status = p.publish(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("\"db/url\"") && status.message().contains("line 1, column"),
        "{}",
        status.message()
    );
    assert!(p.fake.fs_at(&target).is_none(), "nothing was mounted");
    p.stop().await;
}

/// A service-account token as kubelet hands it over: a JWT whose subject is the account.
fn service_account_jwt(namespace: &str, account: &str) -> String {
    use base64::Engine;
    let claims = format!(r#"{{"sub":"system:serviceaccount:{namespace}:{account}"}}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims);
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.signature")
}

/// The publish of pod `namespace/name` (service account `account`) as kubelet sends it, with
/// its target.
fn pod_of(
    p: &Plugin,
    name: &str,
    namespace: &str,
    account: &str,
    volume_id: &str,
) -> (PathBuf, pb::NodePublishVolumeRequest) {
    let target = p.target(name);
    let mut req = request(&target, &service_account_jwt(namespace, account));
    req.volume_id = volume_id.into();
    let context = &mut req.volume_context;
    context.insert("csi.storage.k8s.io/pod.name".into(), name.into());
    context.insert("csi.storage.k8s.io/pod.namespace".into(), namespace.into());
    context.insert(
        "csi.storage.k8s.io/serviceAccount.name".into(),
        account.into(),
    );
    (target, req)
}

#[tokio::test]
async fn with_shared_identities_a_refused_login_fails_the_pods_that_joined_while_it_ran() {
    let mut p = Plugin::start_sharing().await;
    {
        let mut logins = p.logins.lock();
        logins.refusal = Some(SourceError::LoginRefused(
            "service account name not authorized".into(),
        ));
        logins.latency = Duration::from_millis(500);
    }
    let (_, req_a) = pod_of(&p, "pod-a", "team-a", "app", "csi-a");
    let (_, req_b) = pod_of(&p, "pod-b", "team-a", "app", "csi-b");
    let mut node = p.node.clone();
    let first = tokio::spawn(async move { node.node_publish_volume(req_a).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let joined = p.publish(req_b).await.unwrap_err();
    let first = first.await.unwrap().unwrap_err();
    for status in [first, joined] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("not authorized"), "{status:?}");
    }
    assert_eq!(p.made.lock().len(), 1, "pod-b joined pod-a's identity");
    assert_eq!(p.identity(0).0.logins, 1, "and logged in no second time");
    assert!(p.fake.mounted().is_empty());
    assert_eq!(p.manager.len(), 0);
    p.stop().await;
}

#[tokio::test]
async fn with_shared_identities_pods_of_one_service_account_share_one_login_and_the_last_revokes() {
    let mut p = Plugin::start_sharing().await;
    let jwt = service_account_jwt;
    let pod = |name: &str, namespace: &str, account: &str, volume_id: &str| {
        pod_of(&p, name, namespace, account, volume_id)
    };
    let (a, req_a) = pod("pod-a", "team-a", "app", "csi-a");
    let (b, req_b) = pod("pod-b", "team-a", "app", "csi-b");
    let (c, req_c) = pod("pod-c", "team-a", "other", "csi-c");
    let (d, req_d) = pod("pod-d", "team-b", "app", "csi-d");
    // Says it runs as team-a's `app` (kubelet's keys written as attributes, as without
    // podInfoOnMount), but its token is `other`'s: it must not join `app`'s identity.
    let (e, mut req_e) = pod("pod-e", "team-a", "app", "csi-e");
    req_e
        .volume_context
        .insert(TOKENS.to_string(), tokens_json(&jwt("team-a", "other")));
    for req in [req_a, req_b, req_c, req_d] {
        p.publish(req).await.unwrap();
    }
    // Room for one more (--max-volumes 4).
    p.unpublish("csi-d", &d).await.unwrap();
    p.publish(req_e).await.unwrap();
    let made: Vec<String> = p.made.lock().iter().map(|m| m.0.clone()).collect();
    assert_eq!(
        made,
        vec![
            "team-a/pod-a/csi-a",
            "team-a/pod-c/csi-c",
            "team-b/pod-d/csi-d",
            "team-a/pod-e/csi-e"
        ],
        "pod-b joins pod-a's identity; another account or namespace, or a token of another account, gets its own"
    );
    p.unpublish("csi-e", &e).await.unwrap();
    for i in 0..4 {
        assert_eq!(p.identity(i).0.logins, 1, "identity {i} logged in once");
    }
    let (fs_a, fs_b) = (p.fake.fs_at(&a).unwrap(), p.fake.fs_at(&b).unwrap());
    assert!(!Arc::ptr_eq(&fs_a, &fs_b), "each volume its own files");

    p.unpublish("csi-a", &a).await.unwrap();
    assert!(!p.identity(0).0.revoked, "pod-b still uses the identity");
    p.unpublish("csi-b", &b).await.unwrap();
    assert!(
        p.identity(0).0.revoked,
        "the last volume of the identity revokes"
    );
    p.unpublish("csi-c", &c).await.unwrap();
    p.stop().await;
}
