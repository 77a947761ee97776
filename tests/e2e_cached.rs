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
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

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

fn bind_file(source: &Path, target: &Path) {
    sys_mount(Some(source), target, libc::MS_BIND)
        .unwrap_or_else(|e| panic!("bind {source:?} on {target:?}: {e}"));
}

fn pread_all(f: &File) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).expect("pread");
    buf.truncate(n);
    buf
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
    let bao = setup();
    bao.kv_put("secret/app/db", &[("password", "v1")]);
    let ttl = Duration::from_secs(1);
    let (m, _addr) = mount(
        &bao,
        &["db=secret/app/db#password"],
        &["--consistency", "cached", "--cache-ttl", "1s"],
    );
    let file = m.file("db");
    assert_eq!(read_string(&file), "v1");
    let ino = metadata(&file).unwrap().ino();
    // A subPath-like bind of the file itself onto a regular file.
    let dir = tempfile::tempdir().unwrap();
    let bound = dir.path().join("db");
    fs::write(&bound, "").unwrap();
    bind_file(&file, &bound);
    assert_eq!(fs::read_to_string(&bound).unwrap(), "v1");
    let old = File::open(&file).unwrap();
    assert_eq!(pread_all(&old), b"v1");

    bao.kv_put("secret/app/db", &[("password", "v2-longer")]);
    let rotated = Instant::now();
    let limit = ttl + Duration::from_secs(1);
    let seen = |what: &str, probe: &mut dyn FnMut() -> Vec<u8>| {
        let got = poll(limit, Duration::from_millis(20), || {
            let v = probe();
            if v == b"v2-longer" {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&v).into_owned())
            }
        });
        assert!(
            got.is_ok(),
            "{what} still showed {got:?} {:?} after the rotation",
            rotated.elapsed()
        );
        rotated.elapsed()
    };
    let by_path = seen("the path", &mut || fs::read(&file).unwrap_or_default());
    let by_bind = seen("the bind mount", &mut || {
        fs::read(&bound).unwrap_or_default()
    });
    let by_fd = seen("the old descriptor", &mut || pread_all(&old));
    eprintln!("rotation seen after: path {by_path:?}, bind {by_bind:?}, old descriptor {by_fd:?}");
    assert!(by_path.max(by_bind).max(by_fd) <= limit);
    assert_eq!(
        metadata(&file).unwrap().ino(),
        ino,
        "the inode number changed"
    );
    assert_eq!(fs::metadata(&bound).unwrap().len(), 9);

    // Deleted in Vault: ENOENT after the timeout, and the cached pages stop serving.
    bao.api_ok(
        "DELETE",
        &bao.data_path("secret/app/db")
            .replacen("/data/", "/metadata/", 1),
        None,
    );
    let deleted = Instant::now();
    let gone = poll(limit, Duration::from_millis(20), || match fs::read(&file) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert!(
        gone.is_ok(),
        "still readable {:?} after deletion: {gone:?}",
        deleted.elapsed()
    );
    let fd_gone = poll(limit, Duration::from_millis(20), || {
        let mut buf = [0u8; 64];
        match old.read_at(&mut buf, 0) {
            Err(e) => Ok(e),
            Ok(n) => Err(String::from_utf8_lossy(&buf[..n]).into_owned()),
        }
    });
    assert!(
        fd_gone.is_ok(),
        "the old descriptor still reads {fd_gone:?} after deletion"
    );
    eprintln!(
        "after deletion the old descriptor gets {:?}",
        fd_gone.unwrap()
    );
    drop(old);
    lazy_unmount(&bound).unwrap();
}

/// 8 readers on two secrets for 3.5 s with `--cache-ttl 1s` in `mode`: each secret costs
/// Vault at most one request per TTL (plus the first).
fn concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl(bao: &Bao, mode: &str) {
    let (a, b) = (format!("secret/{mode}/a"), format!("secret/{mode}/b"));
    bao.kv_put(&a, &[("value", "aaaa")]);
    bao.kv_put(&b, &[("value", "bbbb")]);
    let (m, _addr) = mount(
        bao,
        &[&format!("a={a}#value"), &format!("b={b}#value")],
        &["--consistency", mode, "--cache-ttl", "1s"],
    );
    let run = Duration::from_millis(3500);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(9));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (path, stop, start) = (
                m.file(if i % 2 == 0 { "a" } else { "b" }),
                stop.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(fs::read(&path).unwrap().len(), 4);
                    n += 1;
                }
                n
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let elapsed = began.elapsed();
    let bound = (elapsed.as_secs_f64() / 1.0).ceil() as usize + 1;
    for p in [&a, &b] {
        let n = vault_requests(bao, p);
        eprintln!("{mode}: {total} reads in {elapsed:?}: {n} Vault requests for {p}");
        assert!(
            n <= bound,
            "{mode}: {n} Vault requests for {p} in {elapsed:?} (at most {bound})"
        );
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl_in_cached_and_strict_mode() {
    let bao = setup();
    for mode in ["cached", "strict"] {
        concurrent_readers_ask_vault_at_most_once_per_secret_per_ttl(&bao, mode);
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

/// While Vault is frozen, `mode`'s file keeps its value stale for `--max-stale` (4 s) after the
/// last successful check and fails with `EIO` from then on, through the path and (cached mode)
/// an old descriptor; reads recover once Vault answers again.
fn stale_values_are_served_until_max_stale_and_never_after(bao: &Bao, mode: &str) {
    let (ttl, max_stale, vault_timeout) = (
        Duration::from_secs(1),
        Duration::from_secs(4),
        Duration::from_secs(1),
    );
    let vault_path = format!("secret/stale/{mode}");
    bao.kv_put(&vault_path, &[("password", "pw")]);
    let m = Mount::builder(bao)
        .secret(&format!("db={vault_path}#password"))
        .args(["--consistency", mode])
        .args([
            "--cache-ttl",
            "1s",
            "--max-stale",
            "4s",
            "--vault-timeout",
            "1s",
        ])
        .start();
    let file = m.file("db");
    // The first read is the only successful check of Vault: it happens between `origin` and
    // `checked_by` (mounting reads no secret), and Vault is frozen before the TTL ends.
    let origin = Instant::now();
    assert_eq!(read_string(&file), "pw");
    let checked_by = origin.elapsed();
    let old = Arc::new(File::open(&file).unwrap());
    assert_eq!(pread_start(&old).unwrap(), b"pw");
    let paused = bao.paused();
    assert!(
        origin.elapsed() < ttl,
        "{mode}: Vault was frozen {:?} after the read, past the TTL (another check may have \
         happened)",
        origin.elapsed()
    );

    let mut probes = vec![Probe::path("the path", &file)];
    // A strict descriptor keeps the version it opened (documented), so only cached ones.
    if mode == "cached" {
        probes.push(Probe::descriptor("the old descriptor", &old));
    }
    sample_reads(
        origin,
        max_stale + vault_timeout + Duration::from_millis(1500),
        Duration::from_millis(20),
        &mut probes,
    );
    // The kernel's attribute timeout may end a little after the daemon computed it (the reply
    // is applied when the requesting thread runs again).
    let timer_slack = Duration::from_millis(250);
    for p in &probes {
        let cut = p.cut_off(b"pw", libc::EIO);
        let (Some(served), Some(failed)) = (cut.last_served, cut.first_failed) else {
            panic!(
                "{mode}: {}: last served {:?}, first failure {:?}; vaultfs log:\n{}",
                p.what,
                cut.last_served,
                cut.first_failed,
                m.logs()
            );
        };
        eprintln!(
            "{mode}: {} served stale until the read started {:?} (ended {:?}) after the \
             successful read (started at 0, ended {checked_by:?}), EIO from the read started \
             {:?} (returned at {:?}); max-stale {max_stale:?}",
            p.what, served.started, served.ended, failed.started, failed.ended
        );
        assert!(
            served.ended > ttl + vault_timeout,
            "{mode}: {} was not served stale: last served by the read ended at {:?}",
            p.what,
            served.ended
        );
        // A failure is answered once more than max-stale has passed since the check, which
        // was after `origin`.
        assert!(
            failed.ended >= max_stale,
            "{mode}: {} failed at {:?}, before max-stale {max_stale:?} had passed since the \
             last successful check",
            p.what,
            failed.ended
        );
        // Nothing is served once max-stale has passed since the check (before `checked_by`).
        assert!(
            served.started <= checked_by + max_stale + timer_slack,
            "{mode}: {} still served by the read started at {:?}, past max-stale \
             {max_stale:?} after the last successful check (by {checked_by:?})",
            p.what,
            served.started
        );
        assert!(
            failed.started <= checked_by + max_stale + Duration::from_secs(1),
            "{mode}: {} first failed by the read started at {:?}, more than 1 s past \
             max-stale {max_stale:?} after the last successful check (by {checked_by:?})",
            p.what,
            failed.started
        );
    }

    drop(paused);
    let resumed = Instant::now();
    for p in &mut probes {
        let back = poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || match p.read() {
                Ok(v) if v == b"pw" => Ok(resumed.elapsed()),
                other => Err(format!("{other:?}")),
            },
        );
        match back {
            Ok(after) => eprintln!(
                "{mode}: {} served again {after:?} after Vault resumed",
                p.what
            ),
            Err(last) => panic!(
                "{mode}: {} not served 5 s after Vault resumed: {last}; vaultfs log:\n{}",
                p.what,
                m.logs()
            ),
        }
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn with_vault_frozen_a_stale_value_is_served_until_max_stale_then_eio_through_path_and_old_descriptor(
) {
    let bao = setup();
    for mode in ["cached", "strict"] {
        stale_values_are_served_until_max_stale_and_never_after(&bao, mode);
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn strict_mode_is_unchanged_every_open_reaches_the_daemon_and_old_descriptors_keep_their_version() {
    let bao = setup();
    bao.kv_put("secret/app/db", &[("password", "v1")]);
    let (m, addr) = mount(
        &bao,
        &["db=secret/app/db#password"],
        &["--consistency", "strict", "--cache-ttl", "1s"],
    );
    let file = m.file("db");
    let old = File::open(&file).unwrap();
    assert_eq!(pread_all(&old), b"v1");
    let opens = fuse_ops(&addr, "open");
    for _ in 0..5 {
        assert_eq!(read_string(&file), "v1");
    }
    assert_eq!(
        fuse_ops(&addr, "open"),
        opens + 5,
        "strict opens must reach the daemon"
    );
    bao.kv_put("secret/app/db", &[("password", "v2")]);
    wait_until("the new version", Duration::from_secs(3), || {
        let v = read_string(&file);
        if v == "v2" {
            Ok(())
        } else {
            Err(v)
        }
    });
    assert_eq!(
        pread_all(&old),
        b"v1",
        "a strict descriptor must keep the version it opened"
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
