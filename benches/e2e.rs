//! End-to-end benchmark of real vaultfs mounts against a real OpenBao dev server, with the
//! baselines measured side by side in the same run, interleaved round by round:
//! - warm `open + read 4 KiB + close`, warm `stat`, and warm `open + read + close` through a
//!   bind mount of the file (how kubelet mounts a `subPath`), for a `cached` mount, a `strict`
//!   mount and the same file on tmpfs;
//! - cold read (cache miss: the first `open + read 4 KiB + close` of a secret, whose LOOKUP
//!   fetches it) on each mount vs a direct HTTP GET of the same KV v2 secret over a kept-alive
//!   connection, one of each per secret, in rotating order;
//! - each daemon's CPU time and context switches per cold read (all its threads, over the
//!   cold reads);
//! - each daemon's resident memory and thread count.
//!
//! Run as root with `cargo bench --bench e2e` (needs /dev/fuse and `bao`). Prints ratios;
//! asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{lazy_unmount, sys_mount, Bao, DirectVault, Mount};

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
    cold_secrets: 300,
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

/// A warm operation the benchmark times.
#[derive(Clone, Copy)]
enum Op {
    OpenReadClose,
    Stat,
}

/// Mean time of one `op` on `path` over `iterations`.
fn warm_round(op: Op, path: &Path, iterations: usize) -> Duration {
    let mut buf = vec![0u8; VALUE_SIZE * 2];
    let start = Instant::now();
    for _ in 0..iterations {
        match op {
            Op::OpenReadClose => {
                std::hint::black_box(open_read_close(path, &mut buf));
            }
            Op::Stat => {
                let len = fs::metadata(path).expect("stat").len();
                assert_eq!(len, VALUE_SIZE as u64, "size of {}", path.display());
            }
        }
    }
    start.elapsed() / iterations as u32
}

/// A bind mount of a file onto an empty file, as kubelet mounts a `subPath`; detached on drop.
struct Bind(PathBuf);

impl Bind {
    fn new(source: &Path, target: PathBuf) -> Bind {
        File::create(&target).expect("create the bind target");
        sys_mount(Some(source), &target, libc::MS_BIND)
            .unwrap_or_else(|e| panic!("bind {} on {}: {e}", source.display(), target.display()));
        Bind(target)
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = lazy_unmount(&self.0);
    }
}

/// The ways the benchmark reaches one file: through each mode's mount and on tmpfs.
const WHERE: [&str; 3] = ["cached", "strict", "tmpfs"];

/// What one row of the warm table measures.
struct Row {
    label: &'static str,
    op: Op,
    /// The file per entry of [`WHERE`].
    paths: [PathBuf; 3],
    runs: [Vec<Duration>; 3],
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// CPU time and context switches of all of `pid`'s threads so far (`/proc/<pid>/task/*`).
fn cpu_and_switches(pid: u32) -> (Duration, u64) {
    let (mut cpu, mut switches) = (Duration::ZERO, 0);
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    for task in tasks.flatten() {
        let schedstat = fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let on_cpu_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok());
        cpu += Duration::from_nanos(on_cpu_ns.unwrap_or(0));
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        switches += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    (cpu, switches)
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
    fs::write(&spec_path, spec).expect("write spec");
    let mounts = ["cached", "strict"].map(|mode| {
        Mount::builder(&bao)
            .rust_log("warn")
            .args(["--spec", spec_path.to_str().expect("utf-8 path")])
            .args(["--cache-ttl", "1h", "--consistency", mode])
            .start()
    });
    let rss_idle = mounts.each_ref().map(|m| proc_status(m.pid(), "VmRSS:"));

    // tmpfs baseline: the same bytes in a file on /dev/shm; binds live there too.
    let shm = tempfile::Builder::new()
        .prefix("vaultfs-bench-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let tmpfs_file = shm.path().join("warm");
    fs::write(&tmpfs_file, &value).expect("write tmpfs file");
    let [cached_file, strict_file] = mounts.each_ref().map(|m| m.file("warm"));
    let mut buf = vec![0u8; VALUE_SIZE * 2];
    for file in [&cached_file, &strict_file] {
        open_read_close(file, &mut buf); // the first access fetches; then it is warm
    }
    let binds = [&cached_file, &strict_file, &tmpfs_file]
        .into_iter()
        .zip(WHERE)
        .map(|(file, name)| Bind::new(file, shm.path().join(format!("bind-{name}"))))
        .collect::<Vec<_>>();
    let direct = [cached_file, strict_file, tmpfs_file];
    let bound = [0, 1, 2].map(|i| binds[i].0.clone());
    let mut rows = [
        ("warm open+read+close", Op::OpenReadClose, direct.clone()),
        ("warm stat", Op::Stat, direct),
        (
            "warm open+read+close, subPath bind",
            Op::OpenReadClose,
            bound,
        ),
    ]
    .map(|(label, op, paths)| Row {
        label,
        op,
        paths,
        runs: Default::default(),
    });
    // Round by round, every row and place in turn, starting one further each round, so that
    // drift in the machine's speed hits all of them alike.
    let cells = rows.len() * WHERE.len();
    for round in 0..sizes.warm_rounds {
        for k in 0..cells {
            let cell = (k + round) % cells;
            let row = &mut rows[cell / WHERE.len()];
            let at = cell % WHERE.len();
            let took = warm_round(row.op, &row.paths[at], sizes.warm_iterations);
            row.runs[at].push(took);
        }
    }

    // Cold reads: per secret a direct GET and a first read through each mount, in rotating
    // order.
    let mut get = DirectVault::connect(bao.port());
    get.get("secret/data/bench/warm"); // open the connection's first request
    let mut cold: [Vec<Duration>; 3] = Default::default();
    let cold_start = mounts.each_ref().map(|m| cpu_and_switches(m.pid()));
    for i in 0..sizes.cold_secrets {
        for k in 0..3 {
            let which = (k + i) % 3;
            let start = Instant::now();
            match which {
                0 | 1 => {
                    open_read_close(&mounts[which].file(&format!("cold-{i}")), &mut buf);
                }
                _ => {
                    get.get(&format!("secret/data/bench/cold-{i}"));
                }
            }
            cold[which].push(start.elapsed());
        }
    }
    let cold_end = mounts.each_ref().map(|m| cpu_and_switches(m.pid()));
    let rss_loaded = mounts.each_ref().map(|m| proc_status(m.pid(), "VmRSS:"));
    let threads = mounts.each_ref().map(|m| proc_status(m.pid(), "Threads:"));
    drop(binds);

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "vaultfs end-to-end benchmark (medians of {} interleaved rounds of {}; value size \
         {VALUE_SIZE} bytes)",
        sizes.warm_rounds, sizes.warm_iterations
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>13} {:>13}",
        "", "cached", "strict", "tmpfs", "cached/tmpfs", "strict/tmpfs"
    );
    for row in rows {
        let [c, s, t] = row.runs.map(median);
        println!(
            "{:<36} {:>7.1} µs {:>7.1} µs {:>7.1} µs {:>12.2}x {:>12.2}x",
            row.label,
            us(c),
            us(s),
            us(t),
            ratio(c, t),
            ratio(s, t)
        );
    }
    println!("  (target for cached open+read+close: ≤ 1.5x tmpfs)");
    let [c, s, g] = cold.map(median);
    println!(
        "{:<36} {:>7.1} µs {:>7.1} µs {:>7.1} µs {:>12.2}x {:>12.2}x",
        "cold read (cache miss) | direct GET",
        us(c),
        us(s),
        us(g),
        ratio(c, g),
        ratio(s, g)
    );
    println!(
        "  (ratios against the direct GET; p50 of {} secrets; target ≤ 1.2x)",
        sizes.cold_secrets
    );
    for (i, mode) in ["cached", "strict"].iter().enumerate() {
        let n = sizes.cold_secrets as u32;
        let cpu = (cold_end[i].0 - cold_start[i].0) / n;
        let switches = (cold_end[i].1 - cold_start[i].1) as f64 / f64::from(n);
        println!(
            "{mode} daemon per cold read: {:.0} µs CPU, {switches:.1} context switches",
            us(cpu)
        );
    }
    for (i, mode) in ["cached", "strict"].iter().enumerate() {
        println!(
            "{mode} daemon: RSS idle {}, after {} secrets read {}; threads {}",
            rss_idle[i],
            sizes.cold_secrets + 1,
            rss_loaded[i],
            threads[i]
        );
    }
}
