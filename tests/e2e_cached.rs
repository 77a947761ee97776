//! End-to-end tests of `--consistency cached` (and that `strict` is unchanged): the real
//! `vaultfs` binary mounted as root against a real OpenBao dev server. Warm reads come from the
//! kernel's page cache without OPEN, READ or Vault requests; a rotation is seen within the
//! TTL (plus a second) through the path, a bind mount of the file and an old descriptor; a
//! multi-call read is mixed only when it straddles an attribute timeout at which a new version
//! is discovered; 8 readers cost at most one Vault request per secret per TTL (cached and
//! strict).
//!
//! Cached pages never serve a secret longer than the daemon would: a secret the token may no
//! longer read gives `EACCES` within the TTL plus a second, and with Vault frozen a stale value
//! is served until `--max-stale` after its last successful check and fails with `EIO` from
//! then on, through the path and through a descriptor opened before (`pread` at offset 0);
//! strict paths behave the same. (The lease-end bound is in `tests/e2e_leases.rs`.)

pub mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::backend::OpenBaoBackend;
use common::semantics;
use common::*;

fn setup() -> Bao {
    require_root();
    Bao::start()
}

/// A `vaultfs mount` with `--metrics-addr`, returning the mount and the metrics address.
fn mount(bao: &Bao, secrets: &[&str], args: &[&str]) -> (Mount, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut b = Mount::builder(bao)
        .args(["--metrics-addr", &addr])
        .args(args);
    for s in secrets {
        b = b.secret(s);
    }
    (b.start(), addr)
}

/// FUSE requests of `op` the daemon answered so far.
fn fuse_ops(addr: &str, op: &str) -> u64 {
    let text = http_get(addr, "/metrics");
    metric_value(
        &text,
        &format!("vaultfs_fuse_requests_total{{op=\"{op}\"}}"),
    ) as u64
}

/// Attribute answers (GETATTR and LOOKUP): the only requests through which a cached
/// connection's kernel learns of a new version.
fn attr_answers(addr: &str) -> u64 {
    let text = http_get(addr, "/metrics");
    ["getattr", "lookup"]
        .iter()
        .map(|op| {
            metric_value(
                &text,
                &format!("vaultfs_fuse_requests_total{{op=\"{op}\"}}"),
            )
        })
        .sum::<f64>() as u64
}

/// Vault requests about `path` (data reads and KV v2 metadata checks), from OpenBao's audit log.
fn vault_requests(bao: &Bao, path: &str) -> usize {
    let data = bao.data_path(path);
    let metadata = data.replacen("/data/", "/metadata/", 1);
    bao.audit_reads(&data) + bao.audit_reads(&metadata)
}

/// Mean microseconds of a warm `open + read 8 KiB + close` of `path`, over `n` rounds.
fn warm_open_read_close_us(path: &Path, n: u32) -> f64 {
    let mut buf = vec![0u8; 8192];
    for _ in 0..100 {
        let _ = File::open(path).unwrap().read(&mut buf).unwrap();
    }
    let started = Instant::now();
    for _ in 0..n {
        let mut f = File::open(path).unwrap();
        let _ = f.read(&mut buf).unwrap();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn cached_mount_and_ls_fetch_nothing_and_warm_reads_cost_no_open_no_read_no_vault_request() {
    let bao = setup();
    bao.kv_put("secret/app/one", &[("value", "first-value")]);
    bao.kv_put("secret/app/two", &[("value", "second-value")]);
    let (m, addr) = mount(
        &bao,
        &["one=secret/app/one#value", "two=secret/app/two#value"],
        &["--consistency", "cached", "--cache-ttl", "30s"],
    );
    assert_eq!(list_dir(m.path()), ["one", "two"]);
    assert_eq!(
        vault_requests(&bao, "secret/app/one"),
        0,
        "mount + ls fetched `one`"
    );
    assert_eq!(
        vault_requests(&bao, "secret/app/two"),
        0,
        "mount + ls fetched `two`"
    );

    assert_eq!(read_string(m.file("one")), "first-value");
    let (opens, reads) = (fuse_ops(&addr, "open"), fuse_ops(&addr, "read"));
    assert_eq!(
        opens, 1,
        "the connection's first open reaches the daemon (ENOSYS) once"
    );
    let cached_us = warm_open_read_close_us(&m.file("one"), 2000);
    assert_eq!(
        fuse_ops(&addr, "open"),
        opens,
        "warm opens reached the daemon"
    );
    assert_eq!(
        fuse_ops(&addr, "read"),
        reads,
        "warm reads reached the daemon"
    );
    assert_eq!(
        vault_requests(&bao, "secret/app/one"),
        1,
        "warm reads asked Vault"
    );
    assert_eq!(
        vault_requests(&bao, "secret/app/two"),
        0,
        "`two` was never touched"
    );
    let logs = m.logs();
    assert_eq!(
        logs.matches("event=\"open\"").count() + logs.matches("event=open").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("access"), "no access audit event:\n{logs}");

    // The same loop in strict mode and on tmpfs, for the record.
    bao.kv_put("secret/app/three", &[("value", "first-value")]);
    let (strict, _) = mount(
        &bao,
        &["three=secret/app/three#value"],
        &["--cache-ttl", "30s"],
    );
    let strict_us = warm_open_read_close_us(&strict.file("three"), 2000);
    let shm = tempfile::Builder::new()
        .prefix("vaultfs-shm-")
        .tempdir_in("/dev/shm")
        .unwrap();
    fs::write(shm.path().join("one"), "first-value").unwrap();
    let tmpfs_us = warm_open_read_close_us(&shm.path().join("one"), 2000);
    eprintln!(
        "warm open+read+close: cached {cached_us:.1} µs, strict {strict_us:.1} µs, tmpfs {tmpfs_us:.1} µs ({:.2}× / {:.2}× tmpfs)",
        cached_us / tmpfs_us,
        strict_us / tmpfs_us
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn cached_rotation_reaches_path_bind_mount_and_old_descriptor_within_ttl_and_deletion_gives_enoent()
{
    semantics::cached_rotation_reaches_path_bind_mount_and_old_descriptor_within_ttl_and_deletion_gives_enoent(
        &OpenBaoBackend::start(),
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl_in_cached_and_strict_mode() {
    let backend = OpenBaoBackend::start();
    for mode in ["cached", "strict"] {
        semantics::concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl(&backend, mode);
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn a_secret_the_token_may_no_longer_read_gives_eacces_within_the_ttl_through_path_and_old_descriptor(
) {
    let bao = setup();
    let ttl = Duration::from_secs(1);
    let limit = ttl + Duration::from_secs(1);
    for mode in ["cached", "strict"] {
        let vault_path = format!("secret/app/{mode}");
        bao.kv_put(&vault_path, &[("password", "pw")]);
        let policy = format!("app-reader-{mode}");
        bao.put_policy(
            &policy,
            r#"path "secret/data/app/*" { capabilities = ["read"] }"#,
        );
        let token = bao.create_token(&[&policy]);
        let m = Mount::builder(&bao)
            .token(&token)
            .secret(&format!("db={vault_path}#password"))
            .args(["--consistency", mode, "--cache-ttl", "1s"])
            .start();
        let file = m.file("db");
        assert_eq!(read_string(&file), "pw");
        let old = Arc::new(File::open(&file).unwrap());
        assert_eq!(pread_start(&old).unwrap(), b"pw");

        // The policy now covers another path only: Vault refuses the secret from now on.
        bao.put_policy(
            &policy,
            r#"path "secret/data/other/*" { capabilities = ["read"] }"#,
        );
        let revoked = Instant::now();
        let mut probes = vec![Probe::path("the path", &file)];
        // A strict descriptor keeps the version it opened (documented), so only cached ones.
        if mode == "cached" {
            probes.push(Probe::descriptor("the old descriptor", &old));
        }
        sample_reads(
            revoked,
            limit + Duration::from_millis(500),
            Duration::from_millis(20),
            &mut probes,
        );
        for p in &probes {
            let cut = p.cut_off(b"pw", libc::EACCES);
            let failed = cut.first_failed.unwrap_or_else(|| {
                panic!(
                    "{mode}: {} was still served {limit:?} after the policy change; vaultfs \
                     log:\n{}",
                    p.what,
                    m.logs()
                )
            });
            eprintln!(
                "{mode}: {} refused (EACCES) from the read started {:?} after the policy \
                 change; last served by the read started at {:?}",
                p.what,
                failed.started,
                cut.last_served.map(|s| s.started)
            );
            assert!(
                failed.started <= limit,
                "{mode}: {} first refused by the read started {:?} after the policy change \
                 (TTL {ttl:?})",
                p.what,
                failed.started
            );
        }
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn with_vault_frozen_a_stale_value_is_served_until_max_stale_then_eio_through_path_and_old_descriptor(
) {
    let backend = OpenBaoBackend::start();
    for mode in ["cached", "strict"] {
        semantics::stale_values_are_served_until_max_stale_and_never_after(&backend, mode);
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn strict_mode_is_unchanged_every_open_reaches_the_daemon_and_old_descriptors_keep_their_version() {
    semantics::strict_mode_is_unchanged_every_open_reaches_the_daemon_and_old_descriptors_keep_their_version(
        &OpenBaoBackend::start(),
    );
}

/// The versions of a torn-read test file: one letter repeated, so a mixed read shows two.
fn fill(letter: u8, size: usize) -> String {
    String::from_utf8(vec![letter; size]).unwrap()
}

fn letters(bytes: &[u8]) -> Vec<u8> {
    let mut seen: Vec<u8> = bytes.to_vec();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// Reads `path` whole with 512-byte `read` calls.
fn read_small(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn cached_torn_reads_happen_only_across_an_attribute_timeout_that_discovers_a_rotation() {
    let bao = setup();
    let sizes = [("k1", 1 << 10), ("k64", 64 << 10), ("m1", 1 << 20)];
    for (name, size) in sizes {
        bao.kv_put(&format!("secret/torn/{name}"), &[("v", &fill(b'a', size))]);
    }
    let secrets: Vec<String> = sizes
        .iter()
        .map(|(n, _)| format!("{n}=secret/torn/{n}#v"))
        .collect();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let (m, addr) = mount(
        &bao,
        &secrets,
        &[
            "--consistency",
            "cached",
            "--cache-ttl",
            "1s",
            "--max-secret-bytes",
            "8388608",
            "--cache-max-bytes",
            "67108864",
        ],
    );

    for (name, size) in sizes {
        let path = m.file(name);
        let vault_path = format!("secret/torn/{name}");
        // 1. A read that straddles the timeout at which a rotation is discovered is mixed: the
        //    first half comes from the old version's pages, the rest from the new version.
        let first = read_small(&path);
        let old = letters(&first);
        assert_eq!(old.len(), 1, "{name}: a quiet read was mixed");
        let next = if old[0] == b'z' { b'a' } else { old[0] + 1 };
        let mut f = File::open(&path).unwrap();
        let mut got = vec![0u8; size];
        let mut done = 0;
        while done < size / 2 {
            done += f.read(&mut got[done..(done + 512).min(size)]).unwrap();
        }
        bao.kv_put(&vault_path, &[("v", &fill(next, size))]);
        thread::sleep(Duration::from_millis(2200));
        while done < size {
            let n = f.read(&mut got[done..(done + 512).min(size)]).unwrap();
            assert!(n > 0, "{name}: short file");
            done += n;
        }
        let straddled = letters(&got);
        eprintln!(
            "{name}: a read straddling the timeout saw versions {:?}",
            String::from_utf8_lossy(&straddled)
        );
        assert_eq!(
            straddled,
            [old[0], next],
            "{name}: the documented straddle is not what happens"
        );

        // 2. Rotating every 250 ms (TTL 1 s) while reading whole with 512-byte reads: a read
        //    during which no GETATTR or LOOKUP was answered is never mixed.
        let stop = AtomicBool::new(false);
        let (full, mixed, quiet, quiet_mixed, versions) = thread::scope(|s| {
            s.spawn(|| {
                let mut letter = next;
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(250));
                    letter = if letter == b'z' { b'a' } else { letter + 1 };
                    bao.kv_put(&vault_path, &[("v", &fill(letter, size))]);
                }
            });
            let began = Instant::now();
            let (mut full, mut mixed, mut quiet, mut quiet_mixed) = (0, 0, 0, 0);
            let mut versions = Vec::new();
            while began.elapsed() < Duration::from_secs(4) {
                let before = attr_answers(&addr);
                let bytes = read_small(&path);
                let after = attr_answers(&addr);
                assert_eq!(bytes.len(), size, "{name}: size changed across a read");
                let l = letters(&bytes);
                full += 1;
                mixed += usize::from(l.len() > 1);
                if after == before {
                    quiet += 1;
                    quiet_mixed += usize::from(l.len() > 1);
                }
                if versions.last() != Some(&l[0]) {
                    versions.push(l[0]);
                }
            }
            stop.store(true, Ordering::Relaxed);
            (full, mixed, quiet, quiet_mixed, versions.len())
        });
        eprintln!(
            "{name}: {full} whole reads during rotations, {versions} versions seen, {mixed} mixed; {quiet} saw no attribute answer, {quiet_mixed} of those mixed"
        );
        assert_eq!(
            quiet_mixed, 0,
            "{name}: a read that did not straddle a timeout was mixed"
        );
        assert!(
            versions >= 3,
            "{name}: rotations were not seen ({versions} versions)"
        );
    }
}
