//! Benchmark of shared identities (`vaultfs csi --share-identities`): the real `vaultfs csi`
//! binary against a real OpenBao (JWT logins, as in a cluster), driven over its socket by a
//! client playing kubelet, in two scenarios run one after the other in this process:
//!
//! * A: `--share-identities`, 100 volumes of ONE identity (one service account, so one key);
//! * B: the flag off (exactly the behaviour without sharing), 100 volumes of 100 distinct
//!   service accounts, all bound by the same role.
//!
//! Every volume shows the same 10 KV v2 secrets with `cacheTTL` 5 s, and every volume reads
//! all its files every 100 ms for 3 TTLs (reader threads; the reads actually done are
//! reported). OpenBao's file audit log counts the logins (`auth/jwt/login`) and the other
//! Vault requests, for the publishes and for each TTL of the reading. Next to that: the
//! daemon's resident memory, publish p50/p99, a cold read (the first read of a secret through
//! a volume) against a direct GET of the same secret on a kept-alive connection (with the root
//! token, as `benches/e2e.rs` does, and with a token of the volumes' role, the kind the daemon
//! sends), in A the read of a secret that is cold for a second volume but already in the
//! identity's shared cache, and a warm `open + read + close` against the same file on tmpfs.
//!
//! Run as root with `cargo bench --bench shared_identity`; `cargo test --all-targets` runs a
//! small smoke version (3 volumes, 2 secrets, one TTL of 1 s) when `VAULTFS_BENCH_SMOKE=1` is
//! set (`scripts/test.sh` sets it), which checks the values read and that the volumes of one
//! identity log in once. Prints figures; asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::csi::{describe, publish_request, CsiDaemon, CsiNode, Pod};
use common::jwt::SigningKey;
use common::k8s::{enable_jwt_auth, login};
use common::{audit_time, rss_kib, Bao, DirectVault};

/// Bytes of every secret value (as in `benches/e2e.rs`).
const VALUE_SIZE: usize = 4096;
const NAMESPACE: &str = "bench";
const ROLE: &str = "bench";
/// The service account of every volume of scenario A.
const SHARED_SA: &str = "app";

/// Sizes of a run: `cargo bench` passes `--bench` and gets the full run; `cargo test
/// --all-targets` runs the same code as a smoke test when `VAULTFS_BENCH_SMOKE=1` is set.
struct Sizes {
    volumes: usize,
    secrets: usize,
    cache_ttl: Duration,
    ttls: u32,
    read_every: Duration,
    readers: usize,
    cold_secrets: usize,
    warm_rounds: usize,
    warm_iterations: usize,
}

const FULL: Sizes = Sizes {
    volumes: 100,
    secrets: 10,
    cache_ttl: Duration::from_secs(5),
    ttls: 3,
    read_every: Duration::from_millis(100),
    readers: 4,
    cold_secrets: 60,
    warm_rounds: 9,
    warm_iterations: 500,
};

const SMOKE: Sizes = Sizes {
    volumes: 3,
    secrets: 2,
    cache_ttl: Duration::from_secs(1),
    ttls: 1,
    read_every: Duration::from_millis(100),
    readers: 2,
    cold_secrets: 3,
    warm_rounds: 3,
    warm_iterations: 20,
};

/// The value of secret `name` (`s3`, `cold-7`): distinct per secret, `VALUE_SIZE` bytes.
fn value_of(name: &str) -> String {
    let head = format!("value-of-{name}-");
    format!("{head}{}", "v".repeat(VALUE_SIZE - head.len()))
}

fn kv_path(name: &str) -> String {
    format!("secret/shared/{name}")
}

/// A `volumeAttributes.secrets` list of `names`, each a file of that name.
fn secrets_yaml(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("- {{name: {n}, path: {}, key: value}}\n", kv_path(n)))
        .collect()
}

/// `open + read + close` of `path` into `buf`: the number of bytes read.
fn open_read_close(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    File::open(path)?.read(buf)
}

fn timed_read(path: &Path, expected: &str, buf: &mut [u8]) -> Duration {
    let start = Instant::now();
    let n = open_read_close(path, buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let took = start.elapsed();
    assert_eq!(&buf[..n], expected.as_bytes(), "{}", path.display());
    took
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64()
}

fn percentile(xs: &[Duration], p: f64) -> Duration {
    let mut sorted = xs.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Requests OpenBao's audit log holds for one window of time.
#[derive(Default)]
struct Requests {
    /// `auth/jwt/login`.
    logins: usize,
    /// `secret/data/...`: reads of values.
    data: usize,
    /// `secret/metadata/...`: version checks.
    metadata: usize,
    /// Anything else (mount detection, token renewal or lookup, revocation).
    other: usize,
    /// The paths counted in `other`.
    other_paths: BTreeSet<String>,
}

impl Requests {
    /// Every request but the logins.
    fn vault(&self) -> usize {
        self.data + self.metadata + self.other
    }

    fn add(&mut self, path: &str) {
        if path == "auth/jwt/login" {
            self.logins += 1;
        } else if path.starts_with("secret/data/") {
            self.data += 1;
        } else if path.starts_with("secret/metadata/") {
            self.metadata += 1;
        } else {
            self.other += 1;
            self.other_paths.insert(path.to_string());
        }
    }

    /// The audit log's requests received from `from` (inclusive) to `to` (exclusive), seconds
    /// since the epoch.
    fn between(entries: &[Value], from: f64, to: f64) -> Requests {
        let mut counted = Requests::default();
        for e in entries.iter().filter(|e| e["type"] == "request") {
            let t = audit_time(e);
            if t >= from && t < to {
                counted.add(e["request"]["path"].as_str().unwrap_or(""));
            }
        }
        counted
    }
}

/// What the readers of one scenario did.
#[derive(Default)]
struct Reads {
    done: u64,
    wrong: u64,
    failed: u64,
    first_failure: Option<String>,
    /// Rounds that started later than their 100 ms slot (the previous round overran).
    late_rounds: u64,
}

/// Every volume in `volumes` reads all of `files` every `every` until `until`, split over
/// `readers` threads; every value read is checked against `expected`.
fn read_loop(
    volumes: &[PathBuf],
    files: &[(String, String)],
    every: Duration,
    until: Instant,
    readers: usize,
) -> Reads {
    let per_thread = volumes.len().div_ceil(readers);
    let results: Vec<Reads> = std::thread::scope(|s| {
        let handles: Vec<_> = volumes
            .chunks(per_thread)
            .map(|mine| {
                s.spawn(move || {
                    let mut r = Reads::default();
                    let mut buf = vec![0u8; VALUE_SIZE * 2];
                    let mut slot = Instant::now();
                    while slot < until {
                        for volume in mine {
                            for (name, expected) in files {
                                let path = volume.join(name);
                                match open_read_close(&path, &mut buf) {
                                    Ok(n) if &buf[..n] == expected.as_bytes() => r.done += 1,
                                    Ok(_) => {
                                        r.done += 1;
                                        r.wrong += 1;
                                    }
                                    Err(e) => {
                                        r.failed += 1;
                                        r.first_failure.get_or_insert_with(|| {
                                            format!("{}: {e}", path.display())
                                        });
                                    }
                                }
                            }
                        }
                        slot += every;
                        let now = Instant::now();
                        if now < slot {
                            std::thread::sleep(slot - now);
                        } else {
                            r.late_rounds += 1;
                        }
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect()
    });
    results.into_iter().fold(Reads::default(), |mut all, r| {
        all.done += r.done;
        all.wrong += r.wrong;
        all.failed += r.failed;
        all.late_rounds += r.late_rounds;
        all.first_failure = all.first_failure.or(r.first_failure);
        all
    })
}

/// One timed step of the cold reads.
enum Cold {
    /// The first read of a secret through the first cold-read volume.
    First,
    /// The first read of the same secret through the second one.
    Second,
    /// A direct GET of the secret: with the root token (0) or a token of the role (1).
    Get(usize),
}

/// The figures of one scenario.
struct Outcome {
    rss_rest: u64,
    rss_published: u64,
    rss_read: u64,
    publish: Vec<Duration>,
    publish_requests: Requests,
    per_ttl: Vec<Requests>,
    reads: Reads,
    reading_secs: f64,
    /// Logins while the two cold-read volumes were published and read.
    cold_phase_logins: usize,
    cold: Vec<Duration>,
    /// The first read of each cold secret through the second cold-read volume, after the
    /// first volume read it.
    cold_second: Vec<Duration>,
    /// Direct GETs of the same secrets: with the root token, with a token of the role.
    get: [Vec<Duration>; 2],
    warm: Vec<Duration>,
    tmpfs: Vec<Duration>,
}

/// One scenario: its daemon, its pods, the same reads.
struct Scenario<'a> {
    sizes: &'a Sizes,
    bao: &'a Bao,
    key: &'a SigningKey,
    /// `--share-identities`, every volume of service account [`SHARED_SA`]; otherwise the
    /// flag off and a service account per volume.
    share: bool,
    tmpfs_file: &'a Path,
    /// A token of [`ROLE`], from a login of this process.
    role_token: &'a str,
}

impl Scenario<'_> {
    fn pod(&self, name: &str) -> Pod {
        let sa = if self.share { SHARED_SA } else { name };
        Pod::new(NAMESPACE, name, sa)
    }

    fn publish(
        &self,
        node: &CsiNode,
        daemon: &CsiDaemon,
        pod: &Pod,
        secrets: &str,
    ) -> (PathBuf, Duration) {
        let (jwt, exp) = pod.signed_token(self.key);
        let target = node.target_path(pod, "secrets");
        let ttl = format!("{}s", self.sizes.cache_ttl.as_secs());
        let attributes = [
            ("role", ROLE),
            ("authMount", "jwt"),
            ("cacheTTL", ttl.as_str()),
            ("secrets", secrets),
        ];
        let request = publish_request(pod, "secrets", &target, &attributes, &jwt, exp);
        let start = Instant::now();
        if let Err(s) = daemon.client().publish(request) {
            panic!(
                "publish of {}'s volume: {}; daemon output:\n{}",
                pod.name,
                describe(&s),
                daemon.logs()
            );
        }
        (target, start.elapsed())
    }

    fn run(&self, prefix: &str) -> Outcome {
        let sizes = self.sizes;
        let node = CsiNode::new(&format!("node-{prefix}"));
        node.state_on_tmpfs();
        let mut builder = node.daemon(self.bao).rust_log("warn");
        if self.share {
            builder = builder.args(["--share-identities"]);
        }
        let daemon = builder.start();
        let pid = daemon.pid();
        let rss_rest = rss_kib(pid);
        let names: Vec<String> = (0..sizes.secrets).map(|i| format!("s{i}")).collect();
        let files: Vec<(String, String)> = names.iter().map(|n| (n.clone(), value_of(n))).collect();
        let spec = secrets_yaml(&names);

        let publish_start = now_secs();
        let mut pods = Vec::new();
        let mut publish = Vec::new();
        for i in 0..sizes.volumes {
            let pod = self.pod(&format!("{prefix}-{i}"));
            let (target, took) = self.publish(&node, &daemon, &pod, &spec);
            publish.push(took);
            pods.push((pod, target));
        }
        let rss_published = rss_kib(pid);

        let volumes: Vec<PathBuf> = pods.iter().map(|(_, t)| t.clone()).collect();
        let reading = sizes.cache_ttl * sizes.ttls;
        let read_start = now_secs();
        let started = Instant::now();
        let reads = read_loop(
            &volumes,
            &files,
            sizes.read_every,
            started + reading,
            sizes.readers,
        );
        let reading_secs = started.elapsed().as_secs_f64();
        let rss_read = rss_kib(pid);

        // Warm reads right after the reading (the cache is fresh), against tmpfs, rounds
        // interleaved, alternating which goes first.
        let mut buf = vec![0u8; VALUE_SIZE * 2];
        let warm_file = volumes[0].join(&names[0]);
        let expected = &files[0].1;
        let (mut warm, mut tmpfs) = (Vec::new(), Vec::new());
        for round in 0..sizes.warm_rounds {
            let mut measure = |path: &Path| {
                let start = Instant::now();
                for _ in 0..sizes.warm_iterations {
                    let n = open_read_close(path, &mut buf).expect("warm read");
                    assert_eq!(&buf[..n], expected.as_bytes(), "{}", path.display());
                }
                start.elapsed() / sizes.warm_iterations as u32
            };
            if round % 2 == 0 {
                warm.push(measure(&warm_file));
                tmpfs.push(measure(self.tmpfs_file));
            } else {
                tmpfs.push(measure(self.tmpfs_file));
                warm.push(measure(&warm_file));
            }
        }

        // Cold reads: two more volumes of the scenario's kind (in A, of the same identity),
        // showing secrets nobody read yet; per secret, the first read through the first
        // volume, a direct GET, and the first read through the second volume (after the
        // first's), in rotating order.
        let cold_start = now_secs();
        let cold_names: Vec<String> = (0..sizes.cold_secrets)
            .map(|i| format!("{prefix}-cold-{i}"))
            .collect();
        let mut cold_spec_names = vec![names[0].clone()];
        cold_spec_names.extend(cold_names.iter().cloned());
        let cold_spec = secrets_yaml(&cold_spec_names);
        let cold_volumes = ["first", "second"].map(|which| {
            let pod = self.pod(&format!("{prefix}-cold-{which}"));
            let (target, _) = self.publish(&node, &daemon, &pod, &cold_spec);
            // One read of a warm secret: the volume's first lookups are not in the figures.
            timed_read(&target.join(&names[0]), expected, &mut buf);
            (pod, target)
        });
        // Direct GETs with the root token (the baseline of `benches/e2e.rs`) and with a token of
        // the volumes' role (the kind of token the daemon sends, whose policies OpenBao checks).
        let mut direct = [
            DirectVault::connect(self.bao.port()),
            DirectVault::connect_as(self.bao.port(), self.role_token),
        ];
        for d in &mut direct {
            d.get(&self.bao.data_path(&kv_path(&names[0])));
        }
        let (mut cold, mut cold_second) = (Vec::new(), Vec::new());
        let mut get: [Vec<Duration>; 2] = Default::default();
        for (i, name) in cold_names.iter().enumerate() {
            let value = value_of(name);
            // The first volume's read, the two GETs in rotating order; the second volume's
            // read right after the first's or last.
            let mut order = vec![Cold::First, Cold::Get(0), Cold::Get(1)];
            order.rotate_left(i % 3);
            let at = order
                .iter()
                .position(|c| matches!(c, Cold::First))
                .expect("first");
            order.insert(if i % 2 == 0 { at + 1 } else { 3 }, Cold::Second);
            for op in order {
                match op {
                    Cold::First => {
                        cold.push(timed_read(&cold_volumes[0].1.join(name), &value, &mut buf))
                    }
                    Cold::Second => cold_second.push(timed_read(
                        &cold_volumes[1].1.join(name),
                        &value,
                        &mut buf,
                    )),
                    Cold::Get(k) => {
                        let start = Instant::now();
                        let n = direct[k].get(&self.bao.data_path(&kv_path(name)));
                        get[k].push(start.elapsed());
                        assert!(n > VALUE_SIZE, "direct GET of {name}: {n} bytes");
                    }
                }
            }
        }
        let cold_end = now_secs();

        let entries = self.bao.audit_entries();
        let publish_requests = Requests::between(&entries, publish_start, read_start);
        let ttl = sizes.cache_ttl.as_secs_f64();
        let per_ttl = (0..sizes.ttls)
            .map(|k| {
                let from = read_start + ttl * f64::from(k);
                Requests::between(&entries, from, from + ttl)
            })
            .collect();
        let cold_phase_logins = Requests::between(&entries, cold_start, cold_end).logins;

        for (pod, target) in pods.iter().chain(cold_volumes.iter()) {
            daemon
                .client()
                .unpublish(&pod.volume_id("secrets"), target)
                .expect("unpublish");
        }
        drop(daemon);
        drop(node);
        Outcome {
            rss_rest,
            rss_published,
            rss_read,
            publish,
            publish_requests,
            per_ttl,
            reads,
            reading_secs,
            cold_phase_logins,
            cold,
            cold_second,
            get,
            warm,
            tmpfs,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // a test runner asking for a list: this binary has no named tests
    }
    if !common::bench_should_run("shared_identity", &args) {
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let sizes = if full { FULL } else { SMOKE };
    common::require_root();
    let bao = Bao::start();
    let key = SigningKey::generate();
    enable_jwt_auth(&bao, "jwt", &key);
    bao.put_policy(
        "bench",
        r#"path "secret/data/shared/*" { capabilities = ["read"] }
path "secret/metadata/shared/*" { capabilities = ["read"] }"#,
    );
    // One role for both scenarios, binding every service account the bench uses: scenario
    // A's one, and B's one per volume.
    let mut subjects = vec![format!("system:serviceaccount:{NAMESPACE}:{SHARED_SA}")];
    for name in (0..sizes.volumes)
        .map(|i| format!("b-{i}"))
        .chain(["b-cold-first".to_string(), "b-cold-second".to_string()])
    {
        subjects.push(format!("system:serviceaccount:{NAMESPACE}:{name}"));
    }
    bao.api_ok(
        "POST",
        &format!("auth/jwt/role/{ROLE}"),
        Some(json!({
            "role_type": "jwt",
            "bound_audiences": ["vault"],
            "user_claim": "sub",
            "bound_claims": { "sub": subjects },
            "token_policies": ["bench"],
            "token_ttl": "1h",
            "token_max_ttl": "24h",
        })),
    );
    for i in 0..sizes.secrets {
        let name = format!("s{i}");
        bao.kv_put(&kv_path(&name), &[("value", &value_of(&name))]);
    }
    for prefix in ["a", "b"] {
        for i in 0..sizes.cold_secrets {
            let name = format!("{prefix}-cold-{i}");
            bao.kv_put(&kv_path(&name), &[("value", &value_of(&name))]);
        }
    }
    let direct_pod = Pod::new(NAMESPACE, "direct", SHARED_SA);
    let (status, answer) = login(&bao, "jwt", ROLE, &direct_pod.signed_token(&key).0);
    assert_eq!(status, 200, "login as {ROLE}: {answer}");
    let role_token = answer["auth"]["client_token"]
        .as_str()
        .expect("a client token")
        .to_string();
    let shm = tempfile::Builder::new()
        .prefix("vaultfs-shared-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir");
    let tmpfs_file = shm.path().join("s0");
    std::fs::write(&tmpfs_file, value_of("s0")).expect("tmpfs file");

    let scenario = |share| Scenario {
        sizes: &sizes,
        bao: &bao,
        key: &key,
        share,
        tmpfs_file: &tmpfs_file,
        role_token: &role_token,
    };
    let a = scenario(true).run("a");
    let b = scenario(false).run("b");
    report(&sizes, &a, &b);

    for (name, o) in [("A", &a), ("B", &b)] {
        assert_eq!(
            (o.reads.wrong, o.reads.failed),
            (0, 0),
            "scenario {name}: every read returns the secret's value (first failure: {:?})",
            o.reads.first_failure
        );
        assert!(o.reads.done > 0, "scenario {name} read nothing");
    }
    assert_eq!(
        a.publish_requests.logins, 1,
        "A: the volumes of one identity log in once"
    );
    assert_eq!(
        a.per_ttl.iter().map(|r| r.logins).sum::<usize>() + a.cold_phase_logins,
        0,
        "A: a later volume of the identity joins its session without a login"
    );
    assert_eq!(
        b.publish_requests.logins, sizes.volumes,
        "B: without sharing, every volume logs in"
    );
}

fn report(sizes: &Sizes, a: &Outcome, b: &Outcome) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let p50 = |xs: &[Duration]| percentile(xs, 0.5);
    let row = |label: &str, a: String, b: String| println!("{label:<48} {a:>34} {b:>34}");
    println!(
        "vaultfs shared identities: {} volumes x {} secrets of {VALUE_SIZE} bytes, every volume \
         reading all its files every {} ms for {} x cacheTTL {} s",
        sizes.volumes,
        sizes.secrets,
        sizes.read_every.as_millis(),
        sizes.ttls,
        sizes.cache_ttl.as_secs()
    );
    println!("(real OpenBao with JWT logins, the real vaultfs csi through its socket; requests counted in OpenBao's audit log)");
    row("", "A: --share-identities".into(), "B: flag off".into());
    row("service accounts", "1".into(), format!("{}", sizes.volumes));
    let both = |label: &str, f: &dyn Fn(&Outcome) -> String| row(label, f(a), f(b));
    let requests = |r: &Requests| {
        format!(
            "{} ({} data, {} metadata, {} other)",
            r.vault(),
            r.data,
            r.metadata,
            r.other
        )
    };
    both("publish: logins", &|o| {
        o.publish_requests.logins.to_string()
    });
    both("publish: other Vault requests", &|o| {
        requests(&o.publish_requests)
    });
    both("publish p50 / p99", &|o| {
        format!(
            "{:.2} / {:.2} ms",
            ms(percentile(&o.publish, 0.5)),
            ms(percentile(&o.publish, 0.99))
        )
    });
    for k in 0..sizes.ttls as usize {
        both(&format!("reading, TTL {}: logins", k + 1), &|o| {
            o.per_ttl[k].logins.to_string()
        });
        both(&format!("reading, TTL {}: Vault requests", k + 1), &|o| {
            requests(&o.per_ttl[k])
        });
    }
    both("reads done (per second)", &|o| {
        format!(
            "{} ({:.0}/s)",
            o.reads.done,
            o.reads.done as f64 / o.reading_secs
        )
    });
    both("  wrong values / failed reads / late rounds", &|o| {
        format!(
            "{} / {} / {}",
            o.reads.wrong, o.reads.failed, o.reads.late_rounds
        )
    });
    both("daemon RSS: at rest / published / after reading", &|o| {
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            mib(o.rss_rest),
            mib(o.rss_published),
            mib(o.rss_read)
        )
    });
    both("cold read p50 (first read through a volume)", &|o| {
        format!("{:.0} µs", us(p50(&o.cold)))
    });
    both("second volume's first read p50", &|o| {
        format!("{:.0} µs", us(p50(&o.cold_second)))
    });
    both("direct GET p50, root token", &|o| {
        format!("{:.0} µs", us(p50(&o.get[0])))
    });
    both("direct GET p50, a token of the role", &|o| {
        format!("{:.0} µs", us(p50(&o.get[1])))
    });
    both("cold / GET (root token | role's token)", &|o| {
        let cold = us(p50(&o.cold));
        format!(
            "{:.2}x | {:.2}x",
            cold / us(p50(&o.get[0])),
            cold / us(p50(&o.get[1]))
        )
    });
    both("second volume's first read / GET (role's)", &|o| {
        format!("{:.2}x", us(p50(&o.cold_second)) / us(p50(&o.get[1])))
    });
    both("logins while the two cold volumes published", &|o| {
        o.cold_phase_logins.to_string()
    });
    both("warm open+read+close (median of rounds)", &|o| {
        format!("{:.1} µs", us(p50(&o.warm)))
    });
    both("tmpfs open+read+close", &|o| {
        format!("{:.1} µs", us(p50(&o.tmpfs)))
    });
    both("warm / tmpfs", &|o| {
        format!("{:.2}x", us(p50(&o.warm)) / us(p50(&o.tmpfs)))
    });
    let other: BTreeSet<&String> = [a, b]
        .iter()
        .flat_map(|o| {
            o.publish_requests
                .other_paths
                .iter()
                .chain(o.per_ttl.iter().flat_map(|r| r.other_paths.iter()))
        })
        .collect();
    println!("(other requests: {other:?})");
    println!(
        "(cold: p50 of {} secrets; in A the second volume's first read finds the secret in the \
         identity's shared cache, in B it is another identity's cold read)",
        sizes.cold_secrets
    );
}
