//! End-to-end tests of the CSI node plugin: the real `vaultfs csi` binary serving gRPC on a
//! unix socket, a test client playing kubelet (NodePublishVolume / NodeUnpublishVolume as
//! kubelet sends them for inline ephemeral volumes), pods identified by RS256
//! service-account tokens signed in the test, and a real OpenBao dev server with `jwt` and
//! `kubernetes` auth. Each test starts its own server and daemon. They are ignored by default
//! because they need root, `/dev/fuse` and the `bao` binary; `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::csi::*;
use common::jwt::*;
use common::k8s::*;
use common::*;
use serde_json::{json, Value};
use tonic::Code;
use vaultfs::csi::pb;

const A_USER: &str = "team-a-db-user";
const A_PASSWORD: &str = "team-a-pa55w0rd-4f1c9e";
const B_API_KEY: &str = "team-b-api-key-77d2a0";

/// Pod A's volume: two files from `secret/team-a/db` (YAML, as written in a pod spec).
const A_SECRETS_YAML: &str = "\
- name: db/username
  path: secret/team-a/db
  key: username
- name: db/password
  path: secret/team-a/db
  key: password
";

/// A Vault server with the `jwt` auth method trusting `key`, two teams' secrets, and a role
/// per team: `team-a` for `ns-a/app-a` (reads `secret/team-a/*`), `team-b` for `ns-b/app-b`
/// (reads `secret/team-b/*` only).
struct Cluster {
    bao: Bao,
    key: SigningKey,
}

fn cluster() -> Cluster {
    require_root();
    let bao = Bao::start();
    let key = SigningKey::generate();
    enable_jwt_auth(&bao, "jwt", &key);
    bao.put_policy(
        "team-a",
        r#"path "secret/data/team-a/*" { capabilities = ["read"] }
path "secret/metadata/team-a/*" { capabilities = ["read"] }"#,
    );
    bao.put_policy(
        "team-b",
        r#"path "secret/data/team-b/*" { capabilities = ["read"] }
path "secret/metadata/team-b/*" { capabilities = ["read"] }"#,
    );
    jwt_role(&bao, "jwt", "team-a", "ns-a", "app-a", &["team-a"], "1h");
    jwt_role(&bao, "jwt", "team-b", "ns-b", "app-b", &["team-b"], "1h");
    bao.kv_put(
        "secret/team-a/db",
        &[("username", A_USER), ("password", A_PASSWORD)],
    );
    bao.kv_put("secret/team-b/api", &[("key", B_API_KEY)]);
    Cluster { bao, key }
}

fn pod_a() -> Pod {
    Pod::new("ns-a", "app-a-7f9c", "app-a")
}

fn pod_b() -> Pod {
    Pod::new("ns-b", "app-b-5d2e", "app-b")
}

/// `(attempts, successes)` of logins at `auth/<mount>/login`, from the audit log.
fn logins(bao: &Bao, mount: &str) -> (usize, usize) {
    let path = format!("auth/{mount}/login");
    let responses: Vec<Value> = bao
        .audit_entries()
        .into_iter()
        .filter(|e| e["type"] == "response" && e["request"]["path"] == path.as_str())
        .collect();
    let ok = responses
        .iter()
        .filter(|e| e["response"]["auth"]["client_token"].is_string())
        .count();
    (responses.len(), ok)
}

/// Whether the token behind `accessor` is still valid.
fn accessor_alive(bao: &Bao, accessor: &str) -> bool {
    bao.api(
        "POST",
        "auth/token/lookup-accessor",
        Some(json!({ "accessor": accessor })),
    )
    .status
        == 200
}

/// The mount id of the topmost mount at `target`, panicking if there is none.
fn mount_id(target: &Path) -> u64 {
    mounts_at(target)
        .pop()
        .unwrap_or_else(|| panic!("nothing is mounted at {}", target.display()))
        .id
}

fn expect_ok(result: Result<(), tonic::Status>, what: &str, daemon: &CsiDaemon) {
    if let Err(s) = result {
        panic!(
            "{what} failed with {}; daemon output:\n{}",
            describe(&s),
            daemon.logs()
        );
    }
}

fn expect_errno(result: io::Result<Vec<u8>>, errno: i32, what: &str) {
    match result {
        Ok(v) => panic!(
            "{what}: expected {} but the read returned {} bytes",
            io::Error::from_raw_os_error(errno),
            v.len()
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {}, got {e:?}",
            io::Error::from_raw_os_error(errno)
        ),
    }
}

/// A publish of `pod`'s volume `volume` at `target`, logging in as `role` through the `jwt`
/// mount with the service-account token `jwt` (expiring at `exp`), declaring `secrets` (YAML)
/// plus any `extra` attributes: the request most tests send.
fn jwt_request(
    pod: &Pod,
    volume: &str,
    target: &Path,
    role: &str,
    secrets: &str,
    extra: &[(&str, &str)],
    (jwt, exp): (&str, u64),
) -> pb::NodePublishVolumeRequest {
    let mut attributes = vec![("role", role), ("authMount", "jwt"), ("secrets", secrets)];
    attributes.extend_from_slice(extra);
    publish_request(pod, volume, target, &attributes, jwt, exp)
}

/// [`expect_refused`] with `PermissionDenied`, the message saying the login as `role` was
/// refused.
fn expect_login_refused(
    client: &CsiClient,
    request: pb::NodePublishVolumeRequest,
    role: &str,
    what: &str,
) -> tonic::Status {
    let err = expect_refused(client, request, Code::PermissionDenied, what);
    let message = err.message().to_lowercase();
    assert!(
        message.contains("login") && message.contains(role),
        "the error should say the login as role {role} was refused: {}",
        describe(&err)
    );
    err
}

/// Reads `path` until it returns `expected` or `limit` passes; returns the last outcome.
fn read_until(path: &Path, expected: &str, limit: Duration) -> Result<(), String> {
    poll(limit, Duration::from_millis(200), || {
        match statfs_result(path.parent().unwrap_or(path), Duration::from_secs(2)) {
            // A hung mount must not stall the loop: only read once statfs answers.
            None => Err("statfs did not answer".to_string()),
            Some(_) => match read(path) {
                Ok(bytes) if bytes == expected.as_bytes() => Ok(()),
                Ok(bytes) => Err(format!(
                    "read {} bytes that are not the expected value",
                    bytes.len()
                )),
                Err(e) => Err(e.to_string()),
            },
        }
    })
}

/// Files of `dir` (recursively) with their modes.
/// What the state directory keeps about volumes: everything but the node-wide files, which
/// outlive every volume by design (`slots`, the highest slot ever given out; `inflight` and
/// `quarantine.json`, the crash-loop quarantine's).
fn volume_state(node: &CsiNode) -> Vec<(std::path::PathBuf, u32)> {
    let node_wide = ["slots", "inflight", "quarantine.json"].map(|f| node.state_dir().join(f));
    files_under(&node.state_dir())
        .into_iter()
        .filter(|(path, _)| !node_wide.contains(path))
        .collect()
}

fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read state dir") {
            let entry = entry.expect("state dir entry");
            let meta = entry.metadata().expect("stat state entry");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.permissions().mode() & 0o7777));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Harness self-checks (no root needed)
// ---------------------------------------------------------------------------------------------

#[test]
fn base64url_encoding_matches_the_rfc_4648_vectors_and_round_trips() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(b"foob"), "Zm9vYg");
    assert_eq!(base64url(b"fooba"), "Zm9vYmE");
    assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64url(&[0xfb, 0xff, 0xfe]), "-__-");
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(base64url_decode(&base64url(&bytes)), Some(bytes));
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_795_741_200), "2026-11-27T01:00:00Z");
}

// ---------------------------------------------------------------------------------------------
// Identity and node info
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn identity_and_node_info_name_the_driver_and_the_node_and_offer_volume_mount_group_only() {
    require_root();
    let bao = Bao::start();
    let node = CsiNode::new("node-identity-1");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();

    let info = client.plugin_info().expect("GetPluginInfo");
    assert_eq!(info.name, DRIVER_NAME);
    assert!(
        !info.vendor_version.trim().is_empty(),
        "GetPluginInfo has an empty vendor_version"
    );

    let caps = client.plugin_capabilities().expect("GetPluginCapabilities");
    use pb::plugin_capability::service::Type as ServiceType;
    for cap in &caps.capabilities {
        if let Some(pb::plugin_capability::Type::Service(s)) = &cap.r#type {
            assert_ne!(
                s.r#type,
                ServiceType::ControllerService as i32,
                "a node-only plugin must not offer CONTROLLER_SERVICE: {caps:?}"
            );
        }
    }

    let probe = client.probe().expect("Probe");
    assert_eq!(probe.ready, Some(true), "Probe is not ready: {probe:?}");

    let node_info = client.node_info().expect("NodeGetInfo");
    assert_eq!(node_info.node_id, "node-identity-1");

    let node_caps = client.node_capabilities().expect("NodeGetCapabilities");
    use pb::node_service_capability::rpc::Type as RpcType;
    let rpcs: Vec<i32> = node_caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref())
        .map(|pb::node_service_capability::Type::Rpc(r)| r.r#type)
        .collect();
    assert!(
        rpcs.contains(&(RpcType::VolumeMountGroup as i32)),
        "NodeGetCapabilities lacks VOLUME_MOUNT_GROUP: {node_caps:?}"
    );
    assert!(
        !rpcs.contains(&(RpcType::StageUnstageVolume as i32)),
        "an ephemeral-only plugin must not ask for NodeStageVolume: {node_caps:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Publish, isolation, refusal
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_pod_publishing_with_jwt_auth_reads_its_secrets_lazily_after_exactly_one_login() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-a");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();

    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let (jwt, exp) = pod.signed_token(&key);
    let mut request = jwt_request(
        &pod,
        "secrets",
        &target,
        "team-a",
        A_SECRETS_YAML,
        &[],
        (&jwt, exp),
    );
    // The pod has fsGroup 2345: kubelet passes it as the volume mount group.
    request.volume_capability = Some(mount_capability("2345"));
    expect_ok(client.publish(request), "NodePublishVolume", &daemon);

    let mounts = mounts_at(&target);
    let top = mounts
        .last()
        .unwrap_or_else(|| panic!("nothing mounted at {} after publish", target.display()));
    assert_eq!(top.fstype, "fuse.vaultfs", "filesystem type at the target");
    assert_eq!(
        logins(&bao, "jwt"),
        (1, 1),
        "publish must log in exactly once"
    );
    assert_eq!(
        bao.secret_reads("secret/team-a/db"),
        0,
        "publish read the secret; reads must wait for the first file access"
    );
    assert_eq!(list_dir(&target), vec!["db"]);
    assert_eq!(list_dir(target.join("db")), vec!["password", "username"]);
    assert_eq!(
        bao.secret_reads("secret/team-a/db"),
        0,
        "listing the volume read the secret"
    );

    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);
    assert_eq!(read_string(target.join("db/username")), A_USER);
    assert!(
        bao.secret_reads("secret/team-a/db") >= 1,
        "the values did not come from Vault"
    );
    assert_eq!(
        logins(&bao, "jwt"),
        (1, 1),
        "reading the files logged in again"
    );

    // fsGroup given: files are 0440 and belong to that group.
    let meta = metadata(target.join("db/password")).expect("stat db/password");
    assert_eq!(
        meta.mode() & 0o7777,
        0o440,
        "mode of a file with a mount group"
    );
    assert_eq!(meta.gid(), 2345, "group of a file with a mount group");
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_pod_asking_for_another_teams_secret_gets_eacces_and_never_its_value_while_its_own_reads() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-b");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();

    // Pod A publishes and reads its secret first, so A's value is in the daemon's memory.
    let a = pod_a();
    let a_target = node.target_path(&a, "secrets");
    let (a_jwt, a_exp) = a.signed_token(&key);
    expect_ok(
        client.publish(jwt_request(
            &a,
            "secrets",
            &a_target,
            "team-a",
            A_SECRETS_YAML,
            &[],
            (&a_jwt, a_exp),
        )),
        "publish pod A",
        &daemon,
    );
    assert_eq!(read_string(a_target.join("db/password")), A_PASSWORD);

    // Pod B, with its own identity (token in `secrets`, as newer kubelets send it), asks for
    // A's secret next to its own, as JSON.
    let b = pod_b();
    let b_target = node.target_path(&b, "secrets");
    let (b_jwt, b_exp) = b.signed_token(&key);
    let b_secrets = json!([
        { "name": "stolen", "path": "secret/team-a/db", "key": "password" },
        { "name": "stolen-all", "path": "secret/team-a/db" },
        { "name": "api-key", "path": "secret/team-b/api", "key": "key" },
    ])
    .to_string();
    let request = tokens_in_secrets(jwt_request(
        &b,
        "secrets",
        &b_target,
        "team-b",
        &b_secrets,
        &[],
        (&b_jwt, b_exp),
    ));
    // vaultfs checks identities at login, not per secret: B's publish succeeds and the read of
    // a path B's policy does not grant fails with EACCES (Vault's 403).
    expect_ok(client.publish(request), "publish pod B", &daemon);
    expect_errno(
        read(b_target.join("stolen")),
        libc::EACCES,
        "pod B reading team A's password",
    );
    expect_errno(
        read(b_target.join("stolen-all")),
        libc::EACCES,
        "pod B reading team A's whole secret",
    );
    assert_eq!(read_string(b_target.join("api-key")), B_API_KEY);
    // No group given: the files are readable by the pod's arbitrary user.
    let meta = metadata(b_target.join("api-key")).expect("stat api-key");
    assert_eq!(
        meta.mode() & 0o7777,
        0o444,
        "mode of a file without a mount group"
    );

    // Vault saw B's reads of A's path refused, under B's own token.
    let denied = bao
        .audit_entries()
        .into_iter()
        .filter(|e| {
            e["type"] == "response"
                && e["request"]["path"] == "secret/data/team-a/db"
                && e["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("permission denied"))
        })
        .count();
    assert!(
        denied >= 1,
        "Vault never refused a read of secret/data/team-a/db"
    );
    // And A still reads its own.
    assert_eq!(read_string(a_target.join("db/username")), A_USER);
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_publish_whose_login_vault_refuses_fails_naming_the_login_and_role_and_mounts_nothing() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-refused");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pod = pod_a();
    let (jwt, exp) = pod.signed_token(&key);

    // A role that does not exist.
    let target = node.target_path(&pod, "no-role");
    expect_login_refused(
        &client,
        jwt_request(
            &pod,
            "no-role",
            &target,
            "no-such-role",
            A_SECRETS_YAML,
            &[],
            (&jwt, exp),
        ),
        "no-such-role",
        "an unknown role",
    );

    // An existing role that does not accept this pod's service account.
    let target = node.target_path(&pod, "wrong-role");
    let err = expect_login_refused(
        &client,
        jwt_request(
            &pod,
            "wrong-role",
            &target,
            "team-b",
            A_SECRETS_YAML,
            &[],
            (&jwt, exp),
        ),
        "team-b",
        "a role bound to another service account",
    );
    assert!(
        !err.message().contains(&jwt),
        "the error message carries the service-account token"
    );

    assert_eq!(
        logins(&bao, "jwt").1,
        0,
        "a refused login counted as success"
    );
    assert!(
        node.mounts_under_pods().is_empty(),
        "mounts left: {:?}",
        node.mounts_under_pods()
    );
    let state_files = volume_state(&node);
    assert!(
        state_files.is_empty(),
        "refused publishes left state behind: {state_files:?}"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn invalid_publish_requests_are_refused_with_invalid_argument_naming_the_field_before_any_login() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-invalid");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pod = pod_a();
    let (jwt, exp) = pod.signed_token(&key);
    let target = node.target_path(&pod, "secrets");
    let good = || {
        jwt_request(
            &pod,
            "secrets",
            &target,
            "team-a",
            A_SECRETS_YAML,
            &[],
            (&jwt, exp),
        )
    };

    // Every validation rule is tested in the contract tier (tests/csi_contract.rs,
    // `every_invalid_publish_is_refused_with_the_field_named_and_nothing_mounted`); here one
    // rule per family proves the real daemon refuses before logging in: request fields,
    // attributes, the secrets spec, the service-account token.
    type Mutation = Box<dyn Fn(&mut pb::NodePublishVolumeRequest)>;
    let cases: Vec<(&str, &str, Mutation)> = vec![
        (
            "missing volume id",
            "volume_id",
            Box::new(|r| r.volume_id.clear()),
        ),
        (
            "missing role",
            "role",
            Box::new(|r| {
                r.volume_context.remove("role");
            }),
        ),
        (
            "a secret name escaping the volume",
            "secrets",
            Box::new(|r| {
                r.volume_context.insert(
                    "secrets".into(),
                    "- name: ../escape\n  path: secret/team-a/db\n".into(),
                );
            }),
        ),
        (
            "no service-account token",
            "serviceAccount.tokens",
            Box::new(|r| {
                r.volume_context.remove(SERVICE_ACCOUNT_TOKENS);
            }),
        ),
    ];
    for (what, field, mutate) in cases {
        let mut request = good();
        mutate(&mut request);
        let err = expect_refused(&client, request, Code::InvalidArgument, what);
        assert!(
            err.message().contains(field),
            "{what}: the message should name {field}: {}",
            describe(&err)
        );
    }
    assert_eq!(
        logins(&bao, "jwt").0,
        0,
        "an invalid request reached Vault's login"
    );

    // The same request, valid, then works.
    expect_ok(client.publish(good()), "the valid publish", &daemon);
    assert_eq!(read_string(target.join("db/username")), A_USER);
}

// ---------------------------------------------------------------------------------------------
// Republish, unpublish
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_republish_with_a_fresh_token_keeps_the_mount_and_later_logins_use_the_fresh_token() {
    let Cluster { bao, key } = cluster();
    // Vault tokens of this role die after 4 s and cannot be renewed past that, so the daemon
    // must log in again while the test runs.
    jwt_role(
        &bao,
        "jwt",
        "team-a-short",
        "ns-a",
        "app-a",
        &["team-a"],
        "4s",
    );
    let resp = bao.api(
        "POST",
        "auth/jwt/role/team-a-short",
        Some(json!({ "role_type": "jwt", "token_max_ttl": "4s" })),
    );
    assert!(resp.status < 300, "set token_max_ttl: {}", resp.body);
    let role = bao.api("GET", "auth/jwt/role/team-a-short", None).json();
    assert_eq!(role["data"]["token_max_ttl"], 4, "role: {role}");
    assert_eq!(
        role["data"]["bound_subject"],
        "system:serviceaccount:ns-a:app-a"
    );
    let node = CsiNode::new("node-republish");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let attributes = [
        ("role", "team-a-short"),
        ("authMount", "jwt"),
        ("cacheTTL", "1s"),
        ("secrets", A_SECRETS_YAML),
    ];

    let (jwt1, exp1) = pod.signed_token(&key);
    let first = publish_request(&pod, "secrets", &target, &attributes, &jwt1, exp1);
    expect_ok(client.publish(first.clone()), "first publish", &daemon);
    let id = mount_id(&target);
    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);

    // The same request again (kubelet retries): OK, nothing remounted, no new login.
    expect_ok(client.publish(first), "identical republish", &daemon);
    assert_eq!(mount_id(&target), id, "an identical republish remounted");
    assert_eq!(mounts_at(&target).len(), 1, "mounts stacked at the target");

    // The cluster rotates its token signing key; kubelet republishes with a token signed by
    // the new key. From now on only that token can log in.
    thread::sleep(Duration::from_millis(1100)); // a different iat
    let new_key = SigningKey::generate();
    let mut fresh = pod.token();
    fresh.lifetime_secs = 7200;
    let jwt2 = fresh.sign(&new_key);
    assert_ne!(jwt1, jwt2);
    let resp = bao.api(
        "POST",
        "auth/jwt/config",
        Some(json!({
            "jwt_validation_pubkeys": [new_key.public_pem()],
            "bound_issuer": ISSUER,
        })),
    );
    assert!(resp.status < 300, "rotate the jwt key: {}", resp.body);
    let (old_status, _) = login(&bao, "jwt", "team-a-short", &jwt1);
    assert_ne!(old_status, 200, "the old token still logs in");

    let logins_before = logins(&bao, "jwt");
    let second = tokens_in_secrets(publish_request(
        &pod,
        "secrets",
        &target,
        &attributes,
        &jwt2,
        fresh.expires_at(),
    ));
    expect_ok(
        client.publish(second),
        "republish with a fresh token",
        &daemon,
    );
    assert_eq!(mount_id(&target), id, "the republish remounted the volume");
    assert_eq!(read_string(target.join("db/username")), A_USER);

    // Past the Vault token's max TTL and the cache TTL, with a new value in Vault: the read
    // needs a new Vault token, which only the fresh service-account token can get.
    bao.kv_put(
        "secret/team-a/db",
        &[("username", A_USER), ("password", "rotated-after-relogin")],
    );
    thread::sleep(Duration::from_secs(5));
    if let Err(e) = read_until(
        &target.join("db/password"),
        "rotated-after-relogin",
        Duration::from_secs(10),
    ) {
        panic!(
            "after the Vault token expired the volume did not serve the new value ({e}); \
             logins {:?} -> {:?}; daemon output:\n{}",
            logins_before,
            logins(&bao, "jwt"),
            daemon.logs()
        );
    }
    let logins_after = logins(&bao, "jwt");
    assert!(
        logins_after.1 > logins_before.1,
        "no successful login after the republish: {logins_before:?} -> {logins_after:?}"
    );
    assert_eq!(mount_id(&target), id, "the volume was remounted");
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn unpublish_unmounts_revokes_the_volume_token_and_is_idempotent() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-unpublish");
    let daemon = node.daemon(&bao).start();
    let client = daemon.client();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let (jwt, exp) = pod.signed_token(&key);
    let request = jwt_request(
        &pod,
        "secrets",
        &target,
        "team-a",
        A_SECRETS_YAML,
        &[],
        (&jwt, exp),
    );

    let before = token_accessors(&bao);
    expect_ok(client.publish(request.clone()), "publish", &daemon);
    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);
    let volume_tokens: Vec<String> = token_accessors(&bao).difference(&before).cloned().collect();
    assert_eq!(
        volume_tokens.len(),
        1,
        "expected one Vault token for the volume, found {volume_tokens:?}"
    );
    assert!(accessor_alive(&bao, &volume_tokens[0]));

    expect_ok(
        client.unpublish(&request.volume_id, &target),
        "unpublish",
        &daemon,
    );
    assert!(
        !is_mounted(&target),
        "{} is still in mountinfo after unpublish",
        target.display()
    );
    for accessor in &volume_tokens {
        assert!(
            !accessor_alive(&bao, accessor),
            "the volume's Vault token {accessor} was not revoked"
        );
    }
    assert_eq!(token_accessors(&bao), before, "tokens left after unpublish");
    assert!(
        volume_state(&node).is_empty(),
        "state left after unpublish: {:?}",
        volume_state(&node)
    );

    // Again (kubelet retries), and a target that was never published.
    expect_ok(
        client.unpublish(&request.volume_id, &target),
        "second unpublish",
        &daemon,
    );
    let never = node.target_path(&pod_b(), "never");
    expect_ok(
        client.unpublish("csi-never-published", &never),
        "unpublish of an unknown target",
        &daemon,
    );
    // An unknown target holding someone else's mount: unpublish leaves it alone.
    let foreign = node.target_path(&pod_b(), "foreign");
    std::fs::create_dir_all(&foreign).expect("create the foreign target");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&foreign)
        .status()
        .expect("run mount");
    assert!(status.success(), "mount a tmpfs at {}", foreign.display());
    expect_ok(
        client.unpublish("csi-foreign", &foreign),
        "unpublish of a target holding a tmpfs",
        &daemon,
    );
    let kept = mounts_at(&foreign);
    let _ = lazy_unmount(&foreign);
    assert!(
        kept.iter().any(|m| m.fstype == "tmpfs"),
        "unpublish detached a mount vaultfs did not make: {kept:?}"
    );

    // The target can be published again afterwards.
    let (jwt2, exp2) = pod.signed_token(&key);
    let mut again = request;
    again
        .volume_context
        .insert(SERVICE_ACCOUNT_TOKENS.into(), tokens_json(&jwt2, exp2));
    expect_ok(client.publish(again), "publish after unpublish", &daemon);
    assert_eq!(read_string(target.join("db/username")), A_USER);
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn healthz_names_a_volume_whose_mount_vanished_until_it_is_unpublished() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-health");
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = node.daemon(&bao).args(["--metrics-addr", &addr]).start();
    let client = daemon.client();
    let publish = |pod: &Pod, role: &str, secrets: &str| {
        let target = node.target_path(pod, "secrets");
        let (jwt, exp) = pod.signed_token(&key);
        let request = jwt_request(pod, "secrets", &target, role, secrets, &[], (&jwt, exp));
        expect_ok(client.publish(request.clone()), "publish", &daemon);
        (target, request.volume_id)
    };
    let (target_a, volume_a) = publish(&pod_a(), "team-a", A_SECRETS_YAML);
    let (target_b, _) = publish(
        &pod_b(),
        "team-b",
        "- name: api/key\n  path: secret/team-b/api\n  key: key\n",
    );
    assert_eq!(read_string(target_a.join("db/password")), A_PASSWORD);
    assert_eq!(read_string(target_b.join("api/key")), B_API_KEY);
    assert_eq!(http_status(&addr, "/healthz"), (200, "ok\n".to_string()));

    lazy_unmount(&target_a).expect("umount -l the volume of pod a");
    let expected = format!(
        "unhealthy: volume {volume_a}: the mount at {} is gone (unmounted from outside)\n",
        target_a.display()
    );
    wait_until(
        "/healthz to name the vanished mount",
        Duration::from_secs(5),
        || match http_status(&addr, "/healthz") {
            (503, body) if body == expected => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let metrics = http_get(&addr, "/metrics");
    assert_eq!(metric_value(&metrics, "vaultfs_health_problems"), 1.0);
    assert_eq!(
        read_string(target_b.join("api/key")),
        B_API_KEY,
        "the other volume is served on"
    );

    expect_ok(client.unpublish(&volume_a, &target_a), "unpublish", &daemon);
    wait_until(
        "/healthz to be ok again",
        Duration::from_secs(5),
        || match http_status(&addr, "/healthz") {
            (200, body) if body == "ok\n" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let logs = node.all_logs();
    assert!(
        logs.contains("unhealthy") && logs.contains("healthy again"),
        "the change is logged both ways:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Restart
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_restarted_daemon_takes_back_its_volumes_after_sigterm_and_after_sigkill() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-restart");
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let file = target.join("db/password");
    let (jwt, exp) = pod.signed_token(&key);
    let request = jwt_request(
        &pod,
        "secrets",
        &target,
        "team-a",
        A_SECRETS_YAML,
        &[("cacheTTL", "1s")],
        (&jwt, exp),
    );

    let mut first = node.daemon(&bao).start();
    expect_ok(first.client().publish(request.clone()), "publish", &first);
    assert_eq!(read_string(&file), A_PASSWORD);

    // The state: files 0600, no secret value.
    let state = files_under(&node.state_dir());
    assert!(!state.is_empty(), "no volume state under the state dir");
    for (path, mode) in &state {
        assert_eq!(
            mode & 0o077,
            0,
            "{} has mode {mode:o}, readable by others",
            path.display()
        );
        let text = String::from_utf8_lossy(&fs::read(path).expect("read state file")).into_owned();
        for value in [A_PASSWORD, A_USER] {
            assert!(
                !text.contains(value),
                "{} holds a secret value",
                path.display()
            );
        }
    }

    // SIGTERM: exit 0, the volume stays mounted (dead until a daemon takes it back).
    let status = first.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "vaultfs csi exited with {} on SIGTERM; its output:\n{}",
        describe_status(&status),
        first.logs()
    );
    assert!(
        is_mounted(&target),
        "SIGTERM unmounted a published volume (pods must keep them)"
    );
    let mut second = node.daemon(&bao).start();
    if let Err(e) = read_until(&file, A_PASSWORD, Duration::from_secs(10)) {
        panic!(
            "after a SIGTERM restart the volume was not served again ({e}); daemon output:\n{}",
            second.logs()
        );
    }
    assert!(is_live_mount(&target));

    // SIGKILL: the mount is left dead.
    second.kill();
    assert!(
        is_dead_mount(&target),
        "the target is not a dead mount after SIGKILL"
    );
    // A `cached` volume's pages outlive the connection until the 1 s attribute timeout.
    if let Err(e) = wait_for_errno(&file, libc::ENOTCONN, Duration::from_secs(3)) {
        panic!("reading through a dead mount: {e}");
    }

    let third = node.daemon(&bao).start();
    if let Err(e) = read_until(&file, A_PASSWORD, Duration::from_secs(10)) {
        panic!(
            "after a SIGKILL restart the volume was not served again ({e}); daemon output:\n{}",
            third.logs()
        );
    }
    assert_eq!(read_string(target.join("db/username")), A_USER);
    // A restarted daemon mounts over the dead mount (only a mount stacked on it reaches a
    // running container), so what matters is the topmost mount.
    let top = mounts_at(&target).pop().expect("a mount at the target");
    assert_eq!(top.fstype, "fuse.vaultfs", "topmost mount at the target");
    assert!(is_live_mount(&target), "the topmost mount does not answer");

    // The restarted daemon owns the volume: kubelet's republish and unpublish work.
    let client = third.client();
    expect_ok(
        client.publish(request.clone()),
        "republish after restart",
        &third,
    );
    expect_ok(
        client.unpublish(&request.volume_id, &target),
        "unpublish after restart",
        &third,
    );
    assert!(
        !is_mounted(&target),
        "mounts left at the target after unpublish: {:?}",
        mounts_at(&target)
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_container_binding_the_volume_with_host_to_container_propagation_reads_after_a_restart() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-propagation");
    node.share_pods_dir();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let (jwt, exp) = pod.signed_token(&key);
    let request = jwt_request(
        &pod,
        "secrets",
        &target,
        "team-a",
        A_SECRETS_YAML,
        &[("cacheTTL", "1s")],
        (&jwt, exp),
    );
    let mut first = node.daemon(&bao).start();
    expect_ok(first.client().publish(request), "publish", &first);

    // The container runtime binds the published volume into the container.
    let view = node.container_view(&target, "app");
    let in_container = view.join("db/password");
    assert_eq!(read_string(&in_container), A_PASSWORD);

    first.kill();
    if let Err(e) = wait_for_errno(&in_container, libc::ENOTCONN, Duration::from_secs(3)) {
        panic!("reading in the container while the daemon is down: {e}");
    }

    // The running container sees the volume the restarted daemon mounts.
    let second = node.daemon(&bao).start();
    if let Err(e) = read_until(&in_container, A_PASSWORD, Duration::from_secs(10)) {
        panic!(
            "the container did not see the recovered volume ({e}); mounts at the target: \
             {:?}, at the container's view: {:?}; daemon output:\n{}",
            mounts_at(&target),
            mounts_at(&view),
            second.logs()
        );
    }
    assert_eq!(read_string(view.join("db/username")), A_USER);
}

// ---------------------------------------------------------------------------------------------
// Kubernetes auth, Vault down
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn kubernetes_auth_logs_a_pod_in_through_a_token_review_with_its_chosen_server_and_mode() {
    let Cluster { bao, key } = cluster();
    let api = TokenReviewServer::start();
    enable_kubernetes_auth(&bao, "kubernetes", &api, &key.self_signed_cert());
    kubernetes_role(
        &bao,
        "kubernetes",
        "team-a",
        "ns-a",
        "app-a",
        &["team-a"],
        "1h",
    );

    let node = CsiNode::new("node-k8s");
    // The volume picks its Vault server by name, and sets its own file mode.
    let daemon = node
        .daemon(&bao)
        .args(["--vault-server", &format!("primary={}", bao.addr())])
        .start();
    let client = daemon.client();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let (jwt, exp) = pod.signed_token(&key);
    // authMount defaults to kubernetes.
    expect_ok(
        client.publish(publish_request(
            &pod,
            "secrets",
            &target,
            &[
                ("role", "team-a"),
                ("vaultServer", "primary"),
                ("fileMode", "0400"),
                ("secrets", A_SECRETS_YAML),
            ],
            &jwt,
            exp,
        )),
        "publish with kubernetes auth",
        &daemon,
    );
    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);
    let meta = metadata(target.join("db/password")).expect("stat db/password");
    assert_eq!(meta.mode() & 0o7777, 0o400, "fileMode 0400 was not applied");
    assert!(
        api.reviews() >= 1,
        "the TokenReview endpoint was never asked"
    );
    assert!(
        api.reviewed_subjects()
            .iter()
            .all(|s| s == "system:serviceaccount:ns-a:app-a"),
        "reviewed tokens of other identities: {:?}",
        api.reviewed_subjects()
    );
    assert_eq!(logins(&bao, "kubernetes"), (1, 1));
    assert_eq!(logins(&bao, "jwt").0, 0, "the jwt mount was used");

    // Pod B's token against A's kubernetes role is refused at publish.
    let b = pod_b();
    let b_target = node.target_path(&b, "secrets");
    let (b_jwt, b_exp) = b.signed_token(&key);
    expect_refused(
        &client,
        publish_request(
            &b,
            "secrets",
            &b_target,
            &[("role", "team-a"), ("secrets", A_SECRETS_YAML)],
            &b_jwt,
            b_exp,
        ),
        Code::PermissionDenied,
        "pod B's token for team-a's kubernetes role",
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_publish_while_vault_is_unreachable_succeeds_and_the_volume_works_once_vault_is_back() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-vault-down");
    let daemon = node.daemon(&bao).args(["--vault-timeout", "2s"]).start();
    let client = daemon.client();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let (jwt, exp) = pod.signed_token(&key);
    let request = jwt_request(
        &pod,
        "secrets",
        &target,
        "team-a",
        A_SECRETS_YAML,
        &[],
        (&jwt, exp),
    );

    bao.pause();
    let started = Instant::now();
    let result = client.publish(request);
    let took = started.elapsed();
    // An uncached read while Vault is frozen fails fast with EIO rather than hanging.
    let frozen_read = result
        .as_ref()
        .ok()
        .map(|_| read(target.join("db/password")));
    bao.resume();
    expect_ok(result, "publish while Vault is unreachable", &daemon);
    // The promise: with Vault unreachable, publish waits at most 2 s (here also the
    // `--vault-timeout`) for the login, then mounts; 1.5 s of margin for the mount itself.
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(1500),
        "the publish took {took:?} while Vault was unreachable; it may wait at most 2 s for \
         the login"
    );
    assert!(is_mounted(&target));
    if let Some(r) = frozen_read {
        expect_errno(r, libc::EIO, "an uncached read while Vault is frozen");
    }

    if let Err(e) = read_until(
        &target.join("db/password"),
        A_PASSWORD,
        Duration::from_secs(15),
    ) {
        panic!(
            "the volume did not serve once Vault was back ({e}); daemon output:\n{}",
            daemon.logs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn secret_values_and_service_account_tokens_never_reach_the_daemon_logs() {
    let Cluster { bao, key } = cluster();
    let node = CsiNode::new("node-logs");
    let daemon = node.daemon(&bao).rust_log("debug").start();
    let client = daemon.client();
    let pod = pod_a();
    let target = node.target_path(&pod, "secrets");
    let attributes = [
        ("role", "team-a"),
        ("authMount", "jwt"),
        ("cacheTTL", "1s"),
        (
            "secrets",
            "- name: db/password\n  path: secret/team-a/db\n  key: password\n\
             - name: db/all\n  path: secret/team-a/db\n",
        ),
    ];
    let mut tokens = Vec::new();

    let (jwt1, exp1) = pod.signed_token(&key);
    tokens.push(jwt1.clone());
    let request = publish_request(&pod, "secrets", &target, &attributes, &jwt1, exp1);
    expect_ok(client.publish(request.clone()), "publish", &daemon);
    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);
    let all: Value = serde_json::from_str(&read_string(target.join("db/all"))).expect("JSON");
    assert_eq!(all["username"], A_USER);

    // A refused publish (wrong role) also carries a token.
    let b = pod_b();
    let (b_jwt, b_exp) = b.signed_token(&key);
    tokens.push(b_jwt.clone());
    let b_target = node.target_path(&b, "secrets");
    let _ = client.publish(publish_request(
        &b,
        "secrets",
        &b_target,
        &attributes,
        &b_jwt,
        b_exp,
    ));

    // Republish with a fresh token (in `secrets`), re-read after the TTL.
    thread::sleep(Duration::from_millis(1100));
    let (jwt2, exp2) = pod.signed_token(&key);
    tokens.push(jwt2.clone());
    expect_ok(
        client.publish(tokens_in_secrets(publish_request(
            &pod,
            "secrets",
            &target,
            &attributes,
            &jwt2,
            exp2,
        ))),
        "republish",
        &daemon,
    );
    assert_eq!(read_string(target.join("db/password")), A_PASSWORD);
    expect_ok(
        client.unpublish(&request.volume_id, &target),
        "unpublish",
        &daemon,
    );

    let logs = daemon.logs();
    assert!(
        logs.contains("DEBUG") || logs.contains("debug"),
        "RUST_LOG=debug produced no debug lines:\n{logs}"
    );
    for value in [A_PASSWORD, A_USER] {
        assert!(
            !logs.contains(value),
            "a secret value is in the daemon logs"
        );
    }
    for jwt in &tokens {
        let signature = jwt.rsplit('.').next().expect("JWT signature");
        assert!(
            !logs.contains(signature),
            "a service-account token is in the daemon logs"
        );
        let payload = jwt.split('.').nth(1).expect("JWT payload");
        assert!(
            !logs.contains(payload),
            "a service-account token's claims segment is in the daemon logs"
        );
    }
    if let Some(t) = find_vault_token(&logs) {
        panic!("something shaped like a Vault token is in the daemon logs: {t}");
    }
}
