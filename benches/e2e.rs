//! End-to-end benchmark of a real vaultfs mount against a real OpenBao dev server, with the
//! baselines measured side by side in the same run:
//! - warm `open + read 4 KiB + close` through the mount vs the same file on tmpfs;
//! - cold read (cache miss: the first `open + read 4 KiB + close` of a secret, whose LOOKUP
//!   fetches it; OPEN and READ are then cache hits) vs a direct HTTP GET of the same KV v2
//!   secret over a kept-alive connection, one of each per secret, alternating;
//! - the daemon's resident memory and thread count.
//!
//! Run as root with `cargo bench --bench e2e` (needs /dev/fuse and `bao`). Prints ratios;
//! asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Bao, Mount, ROOT_TOKEN};

const VALUE_SIZE: usize = 4096;

/// Sizes of a run: `cargo bench` passes `--bench` and gets the full run; `cargo test
/// --all-targets` runs the same code as a quick smoke test when `VAULTFS_BENCH_SMOKE=1` is set.
struct Sizes {
    warm_rounds: usize,
    warm_iterations: usize,
    cold_secrets: usize,
}

const FULL: Sizes = Sizes {
    warm_rounds: 9,
    warm_iterations: 2_000,
    cold_secrets: 150,
};

const SMOKE: Sizes = Sizes {
    warm_rounds: 3,
    warm_iterations: 50,
    cold_secrets: 10,
};

fn open_read_close(path: &Path, buf: &mut [u8]) -> usize {
    let mut f = File::open(path).expect("open");
    let n = f.read(buf).expect("read");
    assert_eq!(n, VALUE_SIZE, "short read from {}", path.display());
    n
}

/// Mean time of one `open + read + close` over `iterations`.
fn warm_round(path: &Path, iterations: usize) -> Duration {
    let mut buf = vec![0u8; VALUE_SIZE * 2];
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(open_read_close(path, &mut buf));
    }
    start.elapsed() / iterations as u32
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// A minimal HTTP/1.1 client on one kept-alive connection: the cheapest way to ask Vault.
struct DirectVault {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    port: u16,
}

impl DirectVault {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to OpenBao");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            writer: stream.try_clone().expect("clone stream"),
            reader: BufReader::new(stream),
            port,
        }
    }

    /// GETs `/v1/{path}` and returns the body length.
    fn get(&mut self, path: &str) -> usize {
        write!(
            self.writer,
            "GET /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Vault-Token: {ROOT_TOKEN}\r\n\r\n",
            self.port
        )
        .expect("send request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        assert!(line.contains(" 200 "), "GET {path}: {line}");
        let (mut length, mut chunked) = (0, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            let header = line.to_ascii_lowercase();
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse().expect("content-length");
            }
            chunked |= header.starts_with("transfer-encoding:") && header.contains("chunked");
        }
        if !chunked {
            let mut body = vec![0u8; length];
            self.reader.read_exact(&mut body).expect("body");
            return length;
        }
        let mut total = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
            let mut chunk = vec![0u8; size + 2]; // data and its CRLF
            self.reader.read_exact(&mut chunk).expect("chunk");
            total += size;
            if size == 0 {
                return total;
            }
        }
    }
}

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // a test runner asking for a list: this binary has no named tests
    }
    if !common::bench_should_run("e2e", &args) {
        return;
    }
    let sizes = if args.iter().any(|a| a == "--bench") {
        FULL
    } else {
        SMOKE
    };
    common::require_root();
    let bao = Bao::start();
    let value = "v".repeat(VALUE_SIZE);
    bao.kv_put("secret/bench/warm", &[("value", &value)]);
    for i in 0..sizes.cold_secrets {
        bao.kv_put(&format!("secret/bench/cold-{i}"), &[("value", &value)]);
    }
    let spec_dir = tempfile::tempdir().expect("tempdir");
    let spec_path = spec_dir.path().join("spec.yaml");
    let mut spec =
        String::from("secrets:\n  - {name: warm, path: secret/bench/warm, key: value}\n");
    for i in 0..sizes.cold_secrets {
        spec.push_str(&format!(
            "  - {{name: cold-{i}, path: secret/bench/cold-{i}, key: value}}\n"
        ));
    }
    std::fs::write(&spec_path, spec).expect("write spec");
    let mount = Mount::builder(&bao)
        .rust_log("warn")
        .args([
            "--spec",
            spec_path.to_str().expect("utf-8 path"),
            "--cache-ttl",
            "1h",
        ])
        .start();
    let pid = mount.pid();
    let rss_idle = proc_status(pid, "VmRSS:");

    // tmpfs baseline: the same bytes in a file on /dev/shm.
    let shm = tempfile::Builder::new()
        .prefix("vaultfs-bench-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let tmpfs_file = shm.path().join("warm");
    std::fs::write(&tmpfs_file, &value).expect("write tmpfs file");
    let vaultfs_file = mount.file("warm");
    let mut buf = vec![0u8; VALUE_SIZE * 2];
    open_read_close(&vaultfs_file, &mut buf); // first access fetches; then it is warm

    let (mut tmpfs_runs, mut vaultfs_runs) = (Vec::new(), Vec::new());
    for _ in 0..sizes.warm_rounds {
        tmpfs_runs.push(warm_round(&tmpfs_file, sizes.warm_iterations));
        vaultfs_runs.push(warm_round(&vaultfs_file, sizes.warm_iterations));
    }
    let (tmpfs_warm, vaultfs_warm) = (median(tmpfs_runs), median(vaultfs_runs));

    // Cold reads, interleaved with direct GETs of the same secrets so drift hits both alike.
    let mut direct = DirectVault::connect(bao.port());
    direct.get("secret/data/bench/warm"); // open the connection's first request
    let (mut cold_direct, mut cold_vaultfs) = (Vec::new(), Vec::new());
    for i in 0..sizes.cold_secrets {
        let start = Instant::now();
        direct.get(&format!("secret/data/bench/cold-{i}"));
        cold_direct.push(start.elapsed());
        let start = Instant::now();
        open_read_close(&mount.file(&format!("cold-{i}")), &mut buf);
        cold_vaultfs.push(start.elapsed());
    }
    let (direct_cold, vaultfs_cold) = (median(cold_direct), median(cold_vaultfs));
    let rss_loaded = proc_status(pid, "VmRSS:");
    let threads = proc_status(pid, "Threads:");

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("vaultfs end-to-end benchmark (medians; value size {VALUE_SIZE} bytes)");
    println!(
        "warm open+read+close   vaultfs {:>9.1} µs   tmpfs {:>9.1} µs   ratio {:.2}x  (target ≤ 2x)",
        vaultfs_warm.as_secs_f64() * 1e6,
        tmpfs_warm.as_secs_f64() * 1e6,
        ratio(vaultfs_warm, tmpfs_warm)
    );
    println!(
        "cold read (cache miss) vaultfs {:>9.1} µs   GET   {:>9.1} µs   ratio {:.2}x  (target ≤ 1.2x; p50 of {} interleaved pairs)",
        vaultfs_cold.as_secs_f64() * 1e6,
        direct_cold.as_secs_f64() * 1e6,
        ratio(vaultfs_cold, direct_cold),
        sizes.cold_secrets
    );
    println!(
        "daemon memory          RSS idle {rss_idle}, after {} secrets read {rss_loaded}; threads {threads}",
        sizes.cold_secrets + 1
    );
}
