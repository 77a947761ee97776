//! End-to-end proof of reload signals: after a rotation in OpenBao, `vaultfs csi` sends a
//! volume's `reloadSignal` to the processes of *that pod* named `reloadProcess` (found by the
//! pod uid in real cgroups, both kubelet naming schemes), once per change, within a TTL of
//! the rotation and after the new version is served; other processes get nothing; without
//! `--allow-reload-signals` the volume is refused; a volume without a reload signal asks
//! Vault nothing while idle; `vaultfs mount --reload-signal --reload-pid-file` signals the
//! pid in the file.
//!
//! The pod's processes are copies of bash named `app-srv` (their `/proc/PID/comm`) moved into
//! cgroup directories created for the test (`kubepods.slice/.../kubepods-besteffort-pod<uid
//! with _>.slice/cri-containerd-<id>.scope` in the cgroup v2 hierarchy, and
//! `kubepods/besteffort/pod<uid>/<id>` in a cgroup v1 hierarchy, or v2 where there is none).
//! On SIGHUP each appends the time and what it then reads from the volume's file to a log.
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`. Signal delays after each rotation go to stderr.

pub mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::csi::*;
use common::jwt::SigningKey;
use common::k8s::*;
use common::*;
use tonic::Code;

const TTL: Duration = Duration::from_secs(2);
const TTL_ATTR: &str = "2s";
/// The bound asked of a signal after a rotation: TTL + 1 s.
const SIGNAL_BOUND: Duration = Duration::from_millis(3000);

const SECRETS: &str = "- {name: password, path: secret/app/db, key: password}
- {name: token, path: secret/app/api, key: token}
";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// cgroups and the pod's processes
// ---------------------------------------------------------------------------------------------

const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;

fn fs_type(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid C string and `buf` a statfs the call fills in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0).then_some(buf.f_type as u64)
}

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid).
fn cgroup2_root() -> PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| fs_type(p) == Some(CGROUP2_SUPER_MAGIC))
        .expect("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// A cgroup v1 hierarchy, if the machine has one (hybrid or legacy mode).
fn cgroup1_root() -> Option<PathBuf> {
    ["pids", "memory", "cpu", "systemd"]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c))
        .find(|p| fs_type(p) == Some(CGROUP_SUPER_MAGIC))
}

/// A cgroup directory made for the test; it and the parents it created are removed on drop
/// (once its processes are gone).
struct Cgroup {
    dir: PathBuf,
    created: Vec<PathBuf>,
}

impl Cgroup {
    fn create(root: &Path, relative: &str) -> Cgroup {
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in relative.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Cgroup { dir, created }
    }

    /// The systemd driver's cgroup of a container of pod `uid` (cgroup v2).
    fn systemd_pod(uid: &str, container: &str) -> Cgroup {
        let uid = uid.replace('-', "_");
        Cgroup::create(
            &cgroup2_root(),
            &format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{container}.scope"),
        )
    }

    /// The cgroupfs driver's cgroup of a container of pod `uid` (v1 if there is a v1
    /// hierarchy, else v2).
    fn cgroupfs_pod(uid: &str, container: &str) -> Cgroup {
        let root = cgroup1_root().unwrap_or_else(cgroup2_root);
        Cgroup::create(&root, &format!("kubepods/besteffort/pod{uid}/{container}"))
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // Processes just killed may take a moment to leave.
            let _ = poll(Duration::from_secs(5), Duration::from_millis(20), || {
                std::fs::remove_dir(dir)
            });
        }
    }
}

/// A copy of bash named `name` (its `/proc/PID/comm`), in a directory of its own.
struct Program {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Program {
    fn named(name: &str) -> Program {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::copy("/bin/bash", &path).expect("copying /bin/bash");
        Program { _dir: dir, path }
    }
}

/// A process that, on every SIGHUP, appends `<unix time> <content of file>` to its log.
struct Listener {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

const LISTENER: &str = r#"trap 'printf "%s %s\n" "$(date +%s.%N)" "$(cat "$1" 2>&1)" >> "$2"' HUP
: > "$2.ready"
while :; do sleep 1 & wait $!; done"#;

impl Listener {
    /// Runs `program` reading `file` on SIGHUP, in its own process group, placed in `cgroup`.
    fn start(program: &Program, file: &Path, cgroup: Option<&Cgroup>) -> Listener {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("signals");
        let mut command = Command::new(&program.path);
        command
            .args(["-c", LISTENER, "listener"])
            .arg(file)
            .arg(&log)
            .stdin(Stdio::null())
            .process_group(0);
        // A shell cannot trap a signal that was ignored when it started, as under `nohup`.
        // SAFETY: signal(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = command.spawn().expect("starting a listener");
        let ready = PathBuf::from(format!("{}.ready", log.display()));
        wait_until("the listener's trap", Duration::from_secs(10), || {
            if ready.exists() {
                Ok(())
            } else {
                Err("not ready")
            }
        });
        if let Some(cgroup) = cgroup {
            cgroup.add(child.id());
        }
        Listener {
            child,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `(time, what the file held)` of every SIGHUP so far.
    fn signals(&self) -> Vec<(f64, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, content) = l.split_once(' ')?;
                Some((t.parse().ok()?, content.to_string()))
            })
            .collect()
    }

    /// Waits for the `n`th signal after a rotation to `value` at `since`: it must arrive
    /// within [`SIGNAL_BOUND`] and find `value` served. Reports the delay on stderr.
    fn expect_signal(&self, n: usize, since: f64, value: &str, what: &str) {
        let (t, seen) = wait_until(what, SIGNAL_BOUND + Duration::from_secs(5), || {
            let got = self.signals();
            got.get(n - 1)
                .cloned()
                .ok_or_else(|| format!("{} signals so far", got.len()))
        });
        let delay = Duration::from_secs_f64((t - since).max(0.0));
        eprintln!("{what}: {delay:?} after the rotation");
        assert!(
            delay <= SIGNAL_BOUND,
            "{what}: {delay:?} after the rotation"
        );
        assert_eq!(
            seen, value,
            "{what}: the new version is served when the signal arrives"
        );
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the listener's own process group (its sleeps included).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------------------------

fn cluster() -> (Bao, SigningKey) {
    app_cluster(&[
        ("secret/app/db", &[("password", "db-v1")]),
        ("secret/app/api", &[("token", "api-v1")]),
    ])
}

fn publish(
    node: &CsiNode,
    daemon: &CsiDaemon,
    key: &SigningKey,
    pod: &Pod,
    secrets: &str,
    extra: &[(&str, &str)],
) -> Result<PathBuf, tonic::Status> {
    let mut attributes = vec![("cacheTTL", TTL_ATTR)];
    attributes.extend_from_slice(extra);
    let (request, target) = jwt_publish(node, pod, key, "app", secrets, &attributes);
    daemon.client().publish(request).map(|()| target)
}

const RELOAD: [(&str, &str); 2] = [("reloadSignal", "SIGHUP"), ("reloadProcess", "app-srv")];

/// Requests OpenBao received for paths ending in `suffix` (data, metadata and mount lookups).
fn requests_for(bao: &Bao, suffix: &str) -> usize {
    bao.audit_entries()
        .iter()
        .filter(|e| {
            e["type"] == "request"
                && e["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(suffix))
        })
        .count()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn rotation_signals_the_pods_processes_of_that_name_once_per_change() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-reload");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let daemon = node
        .daemon(&bao)
        .args(["--allow-reload-signals", "--metrics-addr", &metrics_addr])
        .start();
    let pod = Pod::new("ns", "app-reload", "app");
    let other_pod = Pod::new("ns", "app-other", "app");
    let target = publish(&node, &daemon, &key, &pod, SECRETS, &RELOAD)
        .unwrap_or_else(|s| panic!("publish: {}\n{}", describe(&s), daemon.logs()));
    let file = target.join("password");

    let app = Program::named("app-srv");
    let sidecar = Program::named("sidecar-srv");
    // Declared before the listeners: removed after they are killed.
    let systemd_scope = Cgroup::systemd_pod(&pod.uid, "c0ffee01");
    let cgroupfs_dir = Cgroup::cgroupfs_pod(&pod.uid, "c0ffee02");
    let other_scope = Cgroup::systemd_pod(&other_pod.uid, "c0ffee03");
    let in_pod = Listener::start(&app, &file, Some(&systemd_scope));
    let in_pod_cgroupfs = Listener::start(&app, &file, Some(&cgroupfs_dir));
    let other_name = Listener::start(&sidecar, &file, Some(&systemd_scope));
    let other_pods = Listener::start(&app, &file, Some(&other_scope));
    let no_pod = Listener::start(&app, &file, None);
    eprintln!(
        "cgroups: {} and {}",
        systemd_scope.dir.display(),
        cgroupfs_dir.dir.display()
    );

    // The app reads its files: the versions a rotation replaces.
    assert_eq!(read_string(&file), "db-v1");
    assert_eq!(read_string(target.join("token")), "api-v1");
    sleep(Duration::from_millis(700));

    // Both secrets rotate together: one signal.
    bao.kv_put("secret/app/db", &[("password", "db-v2")]);
    bao.kv_put("secret/app/api", &[("token", "api-v2")]);
    let rotated = unix_now();
    for (listener, what) in [
        (&in_pod, "systemd cgroup"),
        (&in_pod_cgroupfs, "cgroupfs cgroup"),
    ] {
        listener.expect_signal(
            1,
            rotated,
            "db-v2",
            &format!("first SIGHUP in the pod's {what}"),
        );
    }

    // No change: no further signal, however long.
    sleep(TTL * 2 + Duration::from_millis(500));
    assert_eq!(
        in_pod.signals().len(),
        1,
        "one signal per change:\n{}",
        daemon.logs()
    );
    assert_eq!(in_pod_cgroupfs.signals().len(), 1);

    bao.kv_put("secret/app/db", &[("password", "db-v3")]);
    let rotated = unix_now();
    in_pod.expect_signal(2, rotated, "db-v3", "second SIGHUP in the systemd cgroup");
    in_pod_cgroupfs.expect_signal(2, rotated, "db-v3", "second SIGHUP in the cgroupfs cgroup");

    sleep(Duration::from_millis(500));
    for (listener, who) in [
        (&other_name, "another process name in the pod"),
        (&other_pods, "the same name in another pod"),
        (&no_pod, "the same name outside any pod"),
    ] {
        assert!(
            listener.signals().is_empty(),
            "{who} (pid {}) was signalled",
            listener.pid()
        );
    }
    let volume = format!("ns/app-reload/{}", pod.volume_id("secrets"));
    let text = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        metric_value(
            &text,
            &format!("vaultfs_reload_signals_total{{volume=\"{volume}\"}}")
        ),
        4.0,
        "two changes, two processes:\n{text}"
    );
    assert_eq!(
        in_pod.signals().len() + in_pod_cgroupfs.signals().len(),
        4,
        "nothing after the second change"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn reload_signals_are_refused_unless_the_daemon_allows_them() {
    let (bao, key) = cluster();
    let node = CsiNode::new("node-reload-refused");
    let daemon = node.daemon(&bao).start();
    let pod = Pod::new("ns", "app-refused", "app");
    let refused = publish(&node, &daemon, &key, &pod, SECRETS, &RELOAD)
        .expect_err("a reload signal on a daemon without --allow-reload-signals");
    assert_eq!(
        refused.code(),
        Code::InvalidArgument,
        "{}",
        describe(&refused)
    );
    assert!(
        refused.message().contains("--allow-reload-signals")
            && refused.message().contains("volumeAttributes.reloadSignal"),
        "{}",
        refused.message()
    );
    let bad = publish(
        &node,
        &daemon,
        &key,
        &pod,
        SECRETS,
        &[("reloadSignal", "SIGBOGUS"), ("reloadProcess", "app-srv")],
    )
    .expect_err("an unknown signal name");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("\"SIGBOGUS\"") && bad.message().contains("SIGHUP"),
        "{}",
        bad.message()
    );
    assert!(node.mounts_under_pods().is_empty(), "nothing was mounted");
    // The same volume without the attributes is served.
    publish(&node, &daemon, &key, &pod, SECRETS, &[]).expect("the volume without reloadSignal");
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn only_volumes_with_a_reload_signal_ask_vault_while_idle() {
    let (bao, key) = cluster();
    bao.kv_put("secret/app/idle", &[("v", "idle-v1")]);
    bao.kv_put("secret/app/watched", &[("v", "watched-v1")]);
    let node = CsiNode::new("node-reload-idle");
    let daemon = node.daemon(&bao).args(["--allow-reload-signals"]).start();
    let plain = Pod::new("ns", "app-plain", "app");
    let watched = Pod::new("ns", "app-watched", "app");
    let plain_target = publish(
        &node,
        &daemon,
        &key,
        &plain,
        "- {name: v, path: secret/app/idle, key: v}",
        &[],
    )
    .expect("publish the plain volume");
    let watched_target = publish(
        &node,
        &daemon,
        &key,
        &watched,
        "- {name: v, path: secret/app/watched, key: v}",
        &RELOAD,
    )
    .expect("publish the watched volume");
    assert_eq!(read_string(plain_target.join("v")), "idle-v1");
    assert_eq!(read_string(watched_target.join("v")), "watched-v1");
    sleep(Duration::from_millis(300));
    let (idle_before, watched_before) = (
        requests_for(&bao, "app/idle"),
        requests_for(&bao, "app/watched"),
    );
    sleep(TTL * 3 + Duration::from_millis(500));
    let idle = requests_for(&bao, "app/idle") - idle_before;
    let polled = requests_for(&bao, "app/watched") - watched_before;
    eprintln!(
        "idle for 3 TTLs: {idle} requests for the plain volume, {polled} for the watched one"
    );
    assert_eq!(idle, 0, "a volume without reloadSignal is never polled");
    assert!(
        (2..=4).contains(&polled),
        "the watched volume is re-checked once per TTL: {polled} requests in 3.25 TTLs"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn vaultfs_mount_signals_the_pid_in_the_pid_file_once_per_change() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("password", "db-v1")]);
    let pid_dir = tempfile::tempdir().expect("tempdir");
    let pid_file = pid_dir.path().join("app.pid");
    let mount = Mount::builder(&bao)
        .secret("password=secret/app/db#password")
        .args([
            "--cache-ttl",
            TTL_ATTR,
            "--reload-signal",
            "SIGHUP",
            "--reload-pid-file",
        ])
        .args([pid_file.to_str().expect("utf-8 path")])
        .start();
    let file = mount.file("password");
    let listener = Listener::start(&Program::named("any-name"), &file, None);
    std::fs::write(&pid_file, format!("{}\n", listener.pid())).expect("writing the pid file");
    assert_eq!(read_string(&file), "db-v1");

    // Right after the read: found a whole TTL later, the longest wait there is.
    bao.kv_put("secret/app/db", &[("password", "db-v2")]);
    let rotated = unix_now();
    listener.expect_signal(
        1,
        rotated,
        "db-v2",
        "vaultfs mount: first SIGHUP to the pid in the file",
    );

    sleep(TTL * 2 + Duration::from_millis(500));
    assert_eq!(
        listener.signals().len(),
        1,
        "no change, no signal:\n{}",
        mount.logs()
    );

    bao.kv_put("secret/app/db", &[("password", "db-v3")]);
    let rotated = unix_now();
    listener.expect_signal(2, rotated, "db-v3", "vaultfs mount: second SIGHUP");
    assert!(
        !mount.logs().contains("db-v"),
        "no secret value in the daemon's logs"
    );
}
