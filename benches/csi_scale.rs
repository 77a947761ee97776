//! Scale benchmark of the CSI node plugin: the real `vaultfs csi` binary against a real
//! OpenBao (JWT auth, one login per volume, as in a cluster), driven over its unix socket by
//! a client playing kubelet. Publishes 1, 100, 1,000 and 5,000 volumes (each a real bind mount
//! of its directory on the daemon's one FUSE connection) and
//! reports, at each level, the daemon's resident memory, threads and open descriptors, the
//! publish latency, and a warm read through one volume next to the same file on tmpfs.
//!
//! Next to every publish, the bench POSTs the same JWT login to OpenBao itself (same role, a
//! fresh token of the same kind, over one kept-alive connection as the daemon's client uses),
//! alternating which of the two goes first, so that the login's own cost is measured in the
//! same conditions as the publishes. The second table reports it and the publish's overhead
//! beyond it: publish percentile minus login percentile, and their ratio.
//!
//! Run as root with `cargo bench --bench csi_scale`; `cargo test --all-targets` runs a small
//! smoke version (1 and 10 volumes) when `VAULTFS_BENCH_SMOKE=1` is set (`scripts/test.sh` sets
//! it). Prints figures; asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use common::csi::{publish_request, CsiNode, Pod};
use common::jwt::SigningKey;
use common::k8s::{enable_jwt_auth, jwt_role};
use common::Bao;

const SECRET: &str = "p4ssw0rd-for-scale";

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l[field.len()..].split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn warm_read(path: &Path, iterations: u32) -> Duration {
    let mut buf = [0u8; 256];
    let start = Instant::now();
    for _ in 0..iterations {
        let mut f = File::open(path).expect("open");
        let n = f.read(&mut buf).expect("read");
        assert_eq!(&buf[..n], SECRET.as_bytes());
    }
    start.elapsed() / iterations
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Logs in at `auth/jwt/login` directly, as the daemon does for a publish: one reqwest client
/// (its connection kept alive between logins), JSON body `{role, jwt}`.
struct DirectLogin {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    url: String,
}

impl DirectLogin {
    fn new(bao: &Bao, mount: &str) -> DirectLogin {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        DirectLogin {
            rt,
            http,
            url: format!("{}/v1/auth/{mount}/login", bao.addr()),
        }
    }

    /// One login with `jwt` as `role`; returns how long the answer took.
    fn login(&self, role: &str, jwt: &str) -> Duration {
        let body = json!({ "role": role, "jwt": jwt }).to_string();
        let start = Instant::now();
        let (status, text) = self.rt.block_on(async {
            let resp = self
                .http
                .post(&self.url)
                .header("X-Vault-Request", "true")
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .expect("direct login: no answer");
            let status = resp.status();
            (status, resp.text().await.expect("direct login: body"))
        });
        let elapsed = start.elapsed();
        assert!(status.is_success(), "direct login: {status} {text}");
        elapsed
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !common::bench_should_run("csi_scale", &args) {
        return;
    }
    let levels: &[usize] = if args.iter().any(|a| a == "--bench") {
        &[1, 100, 1000, 5000]
    } else {
        &[1, 10]
    };
    let custom: Vec<usize> = std::env::var("VAULTFS_SCALE_LEVELS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let levels = if custom.is_empty() {
        levels
    } else {
        &custom[..]
    };
    common::require_root();
    let bao = Bao::start();
    let key = SigningKey::generate();
    enable_jwt_auth(&bao, "jwt", &key);
    bao.put_policy(
        "scale",
        r#"path "secret/data/scale/*" { capabilities = ["read"] }"#,
    );
    jwt_role(&bao, "jwt", "scale", "bench", "app", &["scale"], "1h");
    bao.kv_put("secret/scale/db", &[("password", SECRET)]);

    let node = CsiNode::new("scale-node");
    // Volume state goes to tmpfs, as on a node (`/run/vaultfs`), not to the disk under /tmp.
    node.state_on_tmpfs();
    let daemon = node
        .daemon(&bao)
        .rust_log("warn")
        .args(["--max-volumes", "10000"])
        .start();
    let client = daemon.client();
    let direct = DirectLogin::new(&bao, "jwt");
    // The connection is opened here, not in the first measured login.
    let warm_up = Pod::new("bench", "warm-up", "app");
    direct.login("scale", &warm_up.signed_token(&key).0);
    let pid = daemon.pid();
    let attributes = [
        ("role", "scale"),
        ("authMount", "jwt"),
        (
            "secrets",
            "- {name: db/password, path: secret/scale/db, key: password}",
        ),
    ];
    let shm = tempfile::Builder::new()
        .prefix("vaultfs-scale-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let tmpfs_file = shm.path().join("password");
    std::fs::write(&tmpfs_file, SECRET).expect("tmpfs file");

    let base_rss = proc_status(pid, "VmRSS:");
    println!("vaultfs csi scale benchmark (real OpenBao JWT logins and FUSE mounts)");
    println!(
        "daemon at rest: RSS {base_rss} KiB, {} threads, {} fds",
        proc_status(pid, "Threads:"),
        open_fds(pid)
    );
    println!(
        "{:>7} {:>10} {:>13} {:>8} {:>6} {:>14} {:>14} {:>12} {:>10}",
        "volumes",
        "RSS KiB",
        "KiB/volume",
        "threads",
        "fds",
        "publish p50",
        "publish p99",
        "warm read",
        "tmpfs"
    );
    let mut targets: Vec<(Pod, PathBuf)> = Vec::new();
    let mut latencies = Vec::new();
    let mut logins = Vec::new();
    let mut login_rows = Vec::new();
    for &level in levels {
        while targets.len() < level {
            let n = targets.len();
            let pod = Pod::new("bench", &format!("app-{n}"), "app");
            let (jwt, exp) = pod.signed_token(&key);
            let target = node.target_path(&pod, "secrets");
            let request = publish_request(&pod, "secrets", &target, &attributes, &jwt, exp);
            // The same kind of token, fresh, for a pod that publishes nothing.
            let other = Pod::new("bench", &format!("login-{n}"), "app");
            let other_jwt = other.signed_token(&key).0;
            let publish = || {
                let start = Instant::now();
                client.publish(request).expect("publish");
                start.elapsed()
            };
            if n.is_multiple_of(2) {
                latencies.push(publish());
                logins.push(direct.login("scale", &other_jwt));
            } else {
                logins.push(direct.login("scale", &other_jwt));
                latencies.push(publish());
            }
            targets.push((pod, target));
        }
        let probe = targets.last().expect("a volume").1.join("db/password");
        warm_read(&probe, 5); // first read fetches; the rest are warm
        let warm = warm_read(&probe, 500);
        let tmpfs = warm_read(&tmpfs_file, 500);
        let rss = proc_status(pid, "VmRSS:");
        let mut sorted = latencies.clone();
        sorted.sort();
        let mut sorted_logins = logins.clone();
        sorted_logins.sort();
        login_rows.push((
            level,
            [0.5, 0.99].map(|p| (percentile(&sorted, p), percentile(&sorted_logins, p))),
        ));
        println!(
            "{:>7} {:>10} {:>13.1} {:>8} {:>6} {:>11.2} ms {:>11.2} ms {:>9.1} µs {:>7.1} µs",
            level,
            rss,
            rss.saturating_sub(base_rss) as f64 / level as f64,
            proc_status(pid, "Threads:"),
            open_fds(pid),
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e6,
            tmpfs.as_secs_f64() * 1e6,
        );
    }
    println!("publish next to the same JWT login sent straight to OpenBao (interleaved)");
    println!(
        "{:>7} {:>14} {:>14} {:>12} {:>12} {:>15} {:>15} {:>10} {:>10}",
        "volumes",
        "publish p50",
        "publish p99",
        "login p50",
        "login p99",
        "overhead p50",
        "overhead p99",
        "ratio p50",
        "ratio p99"
    );
    for (level, [(p50, l50), (p99, l99)]) in &login_rows {
        println!(
            "{:>7} {:>11.2} ms {:>11.2} ms {:>9.2} ms {:>9.2} ms {:>12.2} ms {:>12.2} ms {:>9.2}x {:>9.2}x",
            level,
            ms(*p50),
            ms(*p99),
            ms(*l50),
            ms(*l99),
            ms(*p50) - ms(*l50),
            ms(*p99) - ms(*l99),
            ms(*p50) / ms(*l50),
            ms(*p99) / ms(*l99),
        );
    }
    if let Ok(wait) = std::env::var("VAULTFS_SCALE_PAUSE") {
        println!("daemon pid {pid}; pausing {wait} s");
        std::thread::sleep(Duration::from_secs(wait.parse().unwrap_or(30)));
    }
    let start = Instant::now();
    for (pod, target) in &targets {
        client
            .unpublish(&pod.volume_id("secrets"), target)
            .expect("unpublish");
    }
    println!(
        "unpublished {} volumes in {:.2} s; daemon RSS after: {} KiB",
        targets.len(),
        start.elapsed().as_secs_f64(),
        proc_status(pid, "VmRSS:")
    );
}
