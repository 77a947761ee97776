//! End-to-end tests: the real `vaultfs` binary mounted as root against a real OpenBao dev
//! server. Each test starts its own server and mount. They are ignored by default because they
//! need root, `/dev/fuse` and the `bao` binary; `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::backend::OpenBaoBackend;
use common::semantics;
use common::*;
use serde_json::{json, Value};

fn setup() -> Bao {
    require_root();
    Bao::start()
}

fn expect_errno(result: io::Result<impl std::fmt::Debug>, errno: i32, what: &str) {
    match result {
        Ok(v) => panic!(
            "{what}: expected {} but the call succeeded with {v:?}",
            io::Error::from_raw_os_error(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {}, got {e:?}",
            io::Error::from_raw_os_error(errno)
        ),
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn mounting_and_listing_fetch_nothing_and_concurrent_first_reads_and_rechecks_share_one_fetch() {
    let bao = setup();
    bao.kv_put("secret/app/one", &[("value", "first-value")]);
    bao.kv_put("secret/app/two", &[("value", "second-value-shared")]);
    bao.kv_put("secret/app/three", &[("value", "third-value")]);

    let m = Mount::start(
        &bao,
        &[
            "one=secret/app/one#value",
            "two=secret/app/two#value",
            "three=secret/app/three#value",
        ],
        &["--cache-ttl", "2s"],
    );
    let reads = |p: &str| bao.secret_reads(p);

    assert_eq!(reads("secret/app/one"), 0, "mounting read secret/app/one");
    assert_eq!(reads("secret/app/two"), 0, "mounting read secret/app/two");
    assert_eq!(
        reads("secret/app/three"),
        0,
        "mounting read secret/app/three"
    );

    assert_eq!(list_dir(m.path()), vec!["one", "three", "two"]);
    assert_eq!(reads("secret/app/one"), 0, "listing read secret/app/one");
    assert_eq!(reads("secret/app/two"), 0, "listing read secret/app/two");
    assert_eq!(
        reads("secret/app/three"),
        0,
        "listing read secret/app/three"
    );

    assert_eq!(read_string(m.file("one")), "first-value");
    assert_eq!(reads("secret/app/one"), 1, "reading `one` once");
    assert_eq!(reads("secret/app/two"), 0, "reading `one` touched `two`");
    assert_eq!(
        reads("secret/app/three"),
        0,
        "reading `one` touched `three`"
    );

    // A second read within the TTL is served from the cache.
    assert_eq!(read_string(m.file("one")), "first-value");
    assert_eq!(reads("secret/app/one"), 1, "a cached re-read went to Vault");

    // 16 threads open `two` for the first time at the same moment. (The kernel merges
    // concurrent lookups of one name, so this mostly checks that lookup and the 16 opens
    // share the fetch; the re-check below reaches the daemon 16 times for real.)
    for (i, r) in concurrent_reads(&m.file("two"), 16).into_iter().enumerate() {
        let bytes = r.unwrap_or_else(|e| panic!("reader {i}: {e}"));
        assert_eq!(
            bytes, b"second-value-shared",
            "reader {i} got a wrong value"
        );
    }
    assert_eq!(
        reads("secret/app/two"),
        1,
        "16 concurrent first readers must share one Vault read"
    );
    assert_eq!(reads("secret/app/three"), 0, "`three` was never opened");

    // Past the TTL, 16 simultaneous opens (each an OPEN request to the daemon) must share a
    // single re-check of Vault: one version check (metadata) or one read, not sixteen.
    let meta = |p: &str| bao.audit_reads(p);
    thread::sleep(Duration::from_millis(2500));
    let data_before = reads("secret/app/two");
    let meta_before = meta("secret/metadata/app/two");
    for (i, r) in concurrent_reads(&m.file("two"), 16).into_iter().enumerate() {
        let bytes = r.unwrap_or_else(|e| panic!("re-reader {i}: {e}"));
        assert_eq!(
            bytes, b"second-value-shared",
            "re-reader {i} got a wrong value"
        );
    }
    let data_delta = reads("secret/app/two") - data_before;
    let meta_delta = meta("secret/metadata/app/two") - meta_before;
    assert!(
        data_delta <= 1 && meta_delta <= 1 && data_delta + meta_delta >= 1,
        "16 concurrent opens after the TTL caused {data_delta} reads and {meta_delta} \
         version checks; expected one shared re-check"
    );
}

/// Opens and reads `path` from `n` threads released at the same moment.
fn concurrent_reads(path: &Path, n: usize) -> Vec<io::Result<Vec<u8>>> {
    let path = path.to_path_buf();
    within(
        &format!("{n} concurrent reads"),
        Duration::from_secs(60),
        move || {
            let barrier = Arc::new(Barrier::new(n));
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let barrier = Arc::clone(&barrier);
                    let path = path.clone();
                    thread::spawn(move || {
                        barrier.wait();
                        fs::read(&path)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("reader thread panicked"))
                .collect()
        },
    )
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn keyed_files_hold_the_raw_field_and_keyless_files_hold_the_json_object_on_kv_v1_and_v2() {
    let bao = setup();
    bao.kv_put(
        "secret/app/db",
        &[("password", "pa55-w0rd\twith tab"), ("user", "app-user")],
    );
    bao.enable_kv1("kv1");
    bao.kv_put(
        "kv1/svc",
        &[("token", "kv1-token-value"), ("region", "eu-1")],
    );

    let m = Mount::start(
        &bao,
        &[
            "db/password=secret/app/db#password",
            "db/all=secret/app/db",
            "legacy/token=kv1/svc#token",
            "legacy/all=kv1/svc",
            "top=secret/app/db#user",
        ],
        &[],
    );

    assert_eq!(list_dir(m.path()), vec!["db", "legacy", "top"]);
    assert!(metadata(m.file("db")).expect("stat db").is_dir());
    assert!(metadata(m.file("legacy")).expect("stat legacy").is_dir());
    assert_eq!(list_dir(m.file("db")), vec!["all", "password"]);
    assert_eq!(list_dir(m.file("legacy")), vec!["all", "token"]);

    // KV v2, with and without a key.
    assert_eq!(
        read(m.file("db/password")).expect("read db/password"),
        b"pa55-w0rd\twith tab"
    );
    assert_eq!(read_string(m.file("top")), "app-user");
    let all: Value = serde_json::from_slice(&read(m.file("db/all")).expect("read db/all"))
        .expect("db/all is a JSON document");
    assert_eq!(
        all,
        json!({ "password": "pa55-w0rd\twith tab", "user": "app-user" })
    );

    // KV v1, with and without a key.
    assert_eq!(read_string(m.file("legacy/token")), "kv1-token-value");
    let all: Value = serde_json::from_slice(&read(m.file("legacy/all")).expect("read legacy/all"))
        .expect("legacy/all is a JSON document");
    assert_eq!(all, json!({ "token": "kv1-token-value", "region": "eu-1" }));

    // Files are regular files whose size is the content length.
    let md = metadata(m.file("db/password")).expect("stat db/password");
    assert!(md.is_file());
    assert_eq!(md.len(), "pa55-w0rd\twith tab".len() as u64);

    // The reads went to the right API paths (several files may share one fetch of a secret,
    // but no file is fetched twice within the TTL).
    let v1 = bao.audit_reads("kv1/svc");
    assert!(
        (1..=2).contains(&v1),
        "{v1} KV v1 reads of kv1/svc for 2 files"
    );
    let v2 = bao.audit_reads("secret/data/app/db");
    assert!(
        (1..=3).contains(&v2),
        "{v2} KV v2 reads of secret/data/app/db for 3 files"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn a_rotated_secret_is_seen_by_new_opens_while_an_open_fd_keeps_the_old_value() {
    semantics::a_rotated_secret_is_seen_by_new_opens_while_an_open_fd_keeps_the_old_value(
        &OpenBaoBackend::start(),
    );
}

fn versioned_value(version: usize) -> String {
    // Distinct lengths and a marker at both ends, so a torn read cannot pass for a value.
    format!(
        "<v{version:02}>{}</v{version:02}>",
        "abcdefghij"
            .repeat(1 + version)
            .chars()
            .take(3 + version * 5)
            .collect::<String>()
    )
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn readers_hammering_a_file_during_twenty_rotations_only_ever_see_whole_values() {
    let bao = setup();
    let values: Vec<String> = (0..=20).map(versioned_value).collect();
    let lengths: HashSet<usize> = values.iter().map(String::len).collect();
    assert_eq!(
        lengths.len(),
        values.len(),
        "values must have distinct lengths"
    );
    bao.kv_put("secret/app/hot", &[("value", &values[0])]);

    // Strict mode never mixes versions; cached mode's conditions: tests/e2e_cached.rs.
    let m = Mount::start(
        &bao,
        &["hot=secret/app/hot#value"],
        &["--cache-ttl", "200ms", "--consistency", "strict"],
    );
    let path = m.file("hot");
    assert_eq!(read_string(&path), values[0]);

    let known: Arc<HashSet<Vec<u8>>> =
        Arc::new(values.iter().map(|v| v.as_bytes().to_vec()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let bad: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let seen: Arc<Mutex<BTreeSet<usize>>> = Arc::new(Mutex::new(BTreeSet::new()));

    let readers: Vec<_> = (0..32)
        .map(|t| {
            let (path, known, stop, bad, seen) = (
                path.clone(),
                Arc::clone(&known),
                Arc::clone(&stop),
                Arc::clone(&bad),
                Arc::clone(&seen),
            );
            thread::spawn(move || {
                let mut count = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    count += 1;
                    match fs::read(&path) {
                        Ok(bytes) if known.contains(&bytes) => {
                            let len = bytes.len();
                            let version = (0..=20).find(|v| versioned_value(*v).len() == len);
                            seen.lock().unwrap().extend(version);
                        }
                        Ok(bytes) => bad.lock().unwrap().push(format!(
                            "reader {t}: unexpected content {:?}",
                            String::from_utf8_lossy(&bytes)
                        )),
                        Err(e) => bad.lock().unwrap().push(format!("reader {t}: error {e}")),
                    }
                }
                count
            })
        })
        .collect();

    for value in &values[1..] {
        thread::sleep(Duration::from_millis(300));
        bao.kv_put("secret/app/hot", &[("value", value)]);
    }
    thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<usize> = within("join readers", Duration::from_secs(60), move || {
        readers
            .into_iter()
            .map(|h| h.join().expect("reader panicked"))
            .collect()
    });

    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} bad reads out of {}, first ones:\n{}",
        bad.len(),
        counts.iter().sum::<usize>(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "every reader must have completed reads: {counts:?}"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() >= 5,
        "readers saw only versions {seen:?}: rotations were not picked up"
    );
    assert_eq!(
        read_string(&path),
        values[20],
        "after the last rotation and the TTL a new open must see the last value"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn with_vault_frozen_cached_files_are_served_and_uncached_files_fail_fast_with_eio() {
    let bao = setup();
    bao.kv_put("secret/app/cached", &[("value", "cached-value")]);
    bao.kv_put("secret/app/cold", &[("value", "cold-value")]);
    let m = Mount::start(
        &bao,
        &[
            "cached=secret/app/cached#value",
            "cold=secret/app/cold#value",
        ],
        &["--cache-ttl", "1s", "--vault-timeout", "2s"],
    );
    assert_eq!(read_string(m.file("cached")), "cached-value");

    bao.pause();
    thread::sleep(Duration::from_millis(1500)); // past the cache TTL

    let started = Instant::now();
    let cached = read(m.file("cached"));
    let cached_elapsed = started.elapsed();
    let cold_started = Instant::now();
    let cold = read(m.file("cold"));
    let cold_elapsed = cold_started.elapsed();
    bao.resume();

    assert_eq!(
        cached
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok(),
        Some("cached-value".to_string()),
        "a cached file must be served while Vault does not answer (took {cached_elapsed:?}); \
         vaultfs output:\n{}",
        m.logs()
    );
    // The promise: only the first access that finds Vault down waits, at most
    // `--vault-timeout` (2 s here), before the stale value is served; 1.5 s of margin.
    assert!(
        cached_elapsed < Duration::from_secs(2) + Duration::from_millis(1500),
        "serving the cached file took {cached_elapsed:?}, more than the 2 s vault-timeout"
    );
    match cold {
        Ok(v) => panic!(
            "a never-read file must fail while Vault does not answer, got {:?}",
            String::from_utf8_lossy(&v)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "a never-read file must fail with EIO, got {e:?}"
        ),
    }
    // The promise: an uncached read fails with EIO after at most `--vault-timeout` (2 s
    // here); 1.5 s of margin.
    assert!(
        cold_elapsed < Duration::from_secs(2) + Duration::from_millis(1500),
        "the EIO took {cold_elapsed:?}, more than the 2 s vault-timeout"
    );

    // Once Vault answers again the file becomes readable.
    wait_until(
        "the never-read file to be readable after Vault resumed",
        Duration::from_secs(15),
        || match read(m.file("cold")) {
            Ok(v) if v == b"cold-value" => Ok(()),
            other => Err(format!("last read: {other:?}")),
        },
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn missing_secrets_give_enoent_denied_ones_eacces_and_every_write_erofs() {
    let bao = setup();
    bao.kv_put("secret/app/db", &[("password", "db-pass")]);
    bao.kv_put("secret/other/ok", &[("value", "allowed-value")]);
    bao.enable_kv1("kv1");
    bao.kv_put("kv1/locked", &[("value", "locked-value")]);

    // Missing secret, and every kind of write, with the root token.
    let m = Mount::start(
        &bao,
        &[
            "missing=secret/app/missing#value",
            "db=secret/app/db#password",
        ],
        &[],
    );
    expect_errno(
        read(m.file("missing")),
        libc::ENOENT,
        "read of a missing secret",
    );
    expect_errno(
        metadata(m.file("missing")),
        libc::ENOENT,
        "stat of a missing secret",
    );

    let p = m.file("db");
    expect_errno(
        within("open for write", FS_OP_TIMEOUT, move || {
            OpenOptions::new().write(true).open(p)
        }),
        libc::EROFS,
        "opening an existing file for writing",
    );
    let p = m.file("db");
    expect_errno(
        within("append", FS_OP_TIMEOUT, move || {
            OpenOptions::new().append(true).open(p)
        }),
        libc::EROFS,
        "opening an existing file for appending",
    );
    let p = m.file("brand-new");
    expect_errno(
        within("create", FS_OP_TIMEOUT, move || File::create(p)),
        libc::EROFS,
        "creating a new file",
    );
    let p = m.file("db");
    expect_errno(
        within("unlink", FS_OP_TIMEOUT, move || fs::remove_file(p)),
        libc::EROFS,
        "unlinking a file",
    );
    let p = m.file("new-dir");
    expect_errno(
        within("mkdir", FS_OP_TIMEOUT, move || fs::create_dir(p)),
        libc::EROFS,
        "creating a directory",
    );
    assert_eq!(read_string(m.file("db")), "db-pass", "the file survived");
    drop(m);

    // A token whose policy covers `secret/other/*` only.
    bao.put_policy(
        "only-other",
        r#"path "secret/data/other/*" { capabilities = ["read"] }"#,
    );
    let token = bao.create_token(&["only-other"]);
    let m = Mount::builder(&bao)
        .token(&token)
        .secret("allowed=secret/other/ok#value")
        .secret("denied=secret/app/db#password")
        .secret("locked=kv1/locked#value")
        .start();
    assert_eq!(
        read_string(m.file("allowed")),
        "allowed-value",
        "the restricted token can read what its policy allows"
    );
    expect_errno(
        read(m.file("denied")),
        libc::EACCES,
        "a secret outside the token's policy (same mount)",
    );
    expect_errno(
        read(m.file("locked")),
        libc::EACCES,
        "a secret on a mount the token has no access to",
    );
}

/// One invalid configuration and the text its error message must contain.
struct BadCase {
    label: &'static str,
    secrets: Vec<&'static str>,
    spec: Option<&'static str>,
    must_mention: &'static str,
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn invalid_secret_declarations_are_refused_before_mounting_with_the_entry_named() {
    let bao = setup();
    let cases = vec![
        BadCase {
            label: "`..` in a --secret name",
            secrets: vec!["../escape=secret/app/db#password"],
            spec: None,
            must_mention: "../escape",
        },
        BadCase {
            label: "`..` inside a --secret name",
            secrets: vec!["inner/../../up=secret/app/db#password"],
            spec: None,
            must_mention: "inner/../../up",
        },
        BadCase {
            label: "absolute --secret name",
            secrets: vec!["/abs-name=secret/app/db#password"],
            spec: None,
            must_mention: "/abs-name",
        },
        BadCase {
            label: "duplicate --secret name",
            secrets: vec!["dup-name=secret/app/db#password", "dup-name=secret/app/x#y"],
            spec: None,
            must_mention: "dup-name",
        },
        BadCase {
            label: "--secret name both file and directory",
            secrets: vec![
                "clash=secret/app/db#password",
                "clash/inner=secret/app/db#user",
            ],
            spec: None,
            must_mention: "clash",
        },
        BadCase {
            label: "`..` in a spec name",
            secrets: vec![],
            spec: Some("secrets:\n  - name: ../spec-escape\n    path: secret/app/db\n"),
            must_mention: "../spec-escape",
        },
        BadCase {
            label: "absolute spec name",
            secrets: vec![],
            spec: Some("secrets:\n  - name: /spec-abs\n    path: secret/app/db\n"),
            must_mention: "/spec-abs",
        },
        BadCase {
            label: "duplicate spec name",
            secrets: vec![],
            spec: Some(
                "secrets:\n  - name: spec-dup\n    path: secret/app/db\n    key: password\n  \
                 - name: spec-dup\n    path: secret/app/other\n",
            ),
            must_mention: "spec-dup",
        },
        BadCase {
            label: "spec name both file and directory",
            secrets: vec![],
            spec: Some(
                "secrets:\n  - name: spec-clash/inner\n    path: secret/app/db\n  \
                 - name: spec-clash\n    path: secret/app/other\n",
            ),
            must_mention: "spec-clash",
        },
        BadCase {
            label: "duplicate between --secret and --spec",
            secrets: vec!["mixed-dup=secret/app/db#password"],
            spec: Some("secrets:\n  - name: mixed-dup\n    path: secret/app/other\n"),
            must_mention: "mixed-dup",
        },
        BadCase {
            label: "unknown field in the spec",
            secrets: vec![],
            spec: Some("secrets:\n  - name: coloured\n    path: secret/app/db\n    colour: red\n"),
            must_mention: "colour",
        },
    ];

    let specdir = tempfile::tempdir().expect("tempdir");
    for (i, case) in cases.iter().enumerate() {
        let mut b = Mount::builder(&bao);
        for s in &case.secrets {
            b = b.secret(s);
        }
        if let Some(yaml) = case.spec {
            let file = specdir.path().join(format!("spec-{i}.yaml"));
            fs::write(&file, yaml).expect("write spec");
            b = b.args(["--spec", file.to_str().expect("utf-8 path")]);
        }
        let out = b.run_to_exit(Duration::from_secs(20));
        assert!(
            !out.timed_out,
            "{}: vaultfs kept running instead of refusing the configuration; output:\n{}",
            case.label, out.output
        );
        assert!(
            !out.status.success(),
            "{}: expected a non-zero exit, got {}; output:\n{}",
            case.label,
            describe_status(&out.status),
            out.output
        );
        assert!(
            out.status.code().is_some(),
            "{}: vaultfs died from a signal ({}) instead of exiting; output:\n{}",
            case.label,
            describe_status(&out.status),
            out.output
        );
        assert!(
            out.output.contains(case.must_mention),
            "{}: the error output does not mention {:?}:\n{}",
            case.label,
            case.must_mention,
            out.output
        );
        assert!(
            !out.mounted_after_exit,
            "{}: something was left mounted",
            case.label
        );
    }

    // Unparsable YAML: refused, with the file or the YAML problem named.
    let file = specdir.path().join("broken.yaml");
    fs::write(
        &file,
        "secrets: [ {name: x, path: secret/app/db\n  - : : :\n",
    )
    .expect("write");
    let out = Mount::builder(&bao)
        .args(["--spec", file.to_str().expect("utf-8 path")])
        .run_to_exit(Duration::from_secs(20));
    assert!(
        !out.timed_out,
        "unparsable YAML was not refused:\n{}",
        out.output
    );
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "unparsable YAML: expected a non-zero exit, got {}",
        describe_status(&out.status)
    );
    let lower = out.output.to_lowercase();
    assert!(
        out.output.contains("broken.yaml") || lower.contains("yaml"),
        "unparsable YAML: the error names neither the file nor the YAML problem:\n{}",
        out.output
    );
    assert!(!out.mounted_after_exit, "unparsable YAML: left a mount");
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn the_mount_is_listed_in_mountinfo_with_filesystem_type_fuse_vaultfs() {
    let bao = setup();
    let m = Mount::start(&bao, &["pw=secret/app/db#password"], &[]);
    let entries = mounts_at(m.path());
    assert_eq!(entries.len(), 1, "one mount at {}", m.path().display());
    assert_eq!(
        entries[0].fstype, "fuse.vaultfs",
        "filesystem type of the mount in /proc/self/mountinfo"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn sigterm_unmounts_cleanly_and_a_dead_mount_left_by_sigkill_is_recovered_on_restart() {
    let bao = setup();
    bao.kv_put("secret/app/db", &[("password", "restart-pass")]);

    // SIGTERM: exit status 0 and the mount is gone.
    let mut m = Mount::start(&bao, &["pw=secret/app/db#password"], &[]);
    assert_eq!(read_string(m.file("pw")), "restart-pass");
    let status = m.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must exit 0, got {}; output:\n{}",
        describe_status(&status),
        m.logs()
    );
    assert!(
        !is_mounted(m.path()),
        "{} is still mounted after SIGTERM",
        m.path().display()
    );
    drop(m);

    // SIGKILL leaves a dead mount behind.
    let dir = tempfile::Builder::new()
        .prefix("vaultfs-restart-")
        .tempdir()
        .expect("tempdir");
    let mountpoint = fs::canonicalize(dir.path()).expect("canonicalize");
    let mut first = Mount::builder(&bao)
        .at(&mountpoint)
        .secret("pw=secret/app/db#password")
        .args(["--cache-ttl", "1s"])
        .start();
    assert_eq!(read_string(first.file("pw")), "restart-pass");
    first.kill();
    assert!(
        is_dead_mount(&mountpoint),
        "after SIGKILL a dead mount should be left at the mount point"
    );
    // Cached pages outlive the connection until the 1 s attribute timeout, then ENOTCONN.
    if let Err(e) = wait_for_errno(
        &mountpoint.join("pw"),
        libc::ENOTCONN,
        Duration::from_secs(3),
    ) {
        panic!("reading a dead mount: {e}");
    }

    // Starting again on the same mount point mounts over the dead mount (so containers that
    // bind the mount point with HostToContainer propagation see the new one) and serves files.
    let dead: Vec<u64> = mounts_at(&mountpoint).iter().map(|e| e.id).collect();
    let mut second = Mount::builder(&bao)
        .at(&mountpoint)
        .secret("pw=secret/app/db#password")
        .start();
    assert_eq!(read_string(second.file("pw")), "restart-pass");
    let here: Vec<u64> = mounts_at(&mountpoint).iter().map(|e| e.id).collect();
    assert_eq!(
        here.last(),
        Some(&second.mount_id()),
        "the new mount must be the top one at the mount point: {here:?}"
    );
    assert_eq!(
        here.len(),
        dead.len() + 1,
        "only the new mount is added over the dead one: before {dead:?}, after {here:?}"
    );
    // SIGTERM removes the new mount and the dead one under it.
    let status = second.terminate();
    assert_eq!(status.code(), Some(0), "output:\n{}", second.logs());
    assert!(!is_mounted(&mountpoint), "still mounted after SIGTERM");
}

/// Forms in which a secret value could leak into a log line.
fn leak_forms(value: &str) -> Vec<String> {
    let bytes = value.as_bytes();
    let decimal = bytes
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    vec![value.to_string(), decimal, hex, b64]
}

/// The versions named by the audit events `event` of file `name` (Vault path `vault_path`),
/// in log order.
fn audit_versions(
    logs: &str,
    json_format: bool,
    name: &str,
    vault_path: &str,
    event: &str,
) -> Vec<String> {
    let text_field = |line: &str, key: &str| {
        let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
        Some(rest.split(' ').next()?.trim_matches('"').to_string())
    };
    logs.lines()
        .filter_map(|line| {
            let (file, path, kind, version) = if json_format {
                let v: Value = serde_json::from_str(line).ok()?;
                if v["target"] != "vaultfs::audit" {
                    return None;
                }
                let f = |key: &str| v["fields"][key].as_str().map(str::to_string);
                (f("file")?, f("vault_path")?, f("event")?, f("version")?)
            } else {
                if !line.contains("vaultfs::audit") {
                    return None;
                }
                let f = |key: &str| text_field(line, key);
                (f("file")?, f("vault_path")?, f("event")?, f("version")?)
            };
            (file == name && path == vault_path && kind == event).then_some(version)
        })
        .collect()
}

#[test]
#[ignore = "needs root, /dev/fuse and the bao binary (run by scripts/test.sh)"]
fn secret_values_never_reach_the_logs_even_at_trace_level_but_audit_events_do() {
    let bao = setup();
    let password = "s3cr3t-Value-9f2c";
    let user = "u5er-Value-7b1d";
    let rotated = "r0t4ted-Value-3e8a";
    let secrets = [password, user, rotated];

    for (level, format, consistency) in [
        ("trace", "text", "strict"),
        ("trace", "text", "cached"),
        ("debug", "text", "cached"),
        ("trace", "json", "strict"),
    ] {
        bao.kv_put("secret/app/db", &[("password", password), ("user", user)]);
        let template = tempfile::NamedTempFile::new().expect("template file");
        fs::write(
            template.path(),
            "{{ secret('secret/app/db').user }}:{{ secret('secret/app/db').password | b64encode }}",
        )
        .expect("write the template");
        let mut m = Mount::builder(&bao)
            .rust_log(level)
            .secret("app/password=secret/app/db#password")
            .secret("app/all=secret/app/db")
            .args([
                "--template",
                &format!("app/tpl={}", template.path().display()),
            ])
            .args(["--cache-ttl", "1s", "--log-format", format])
            .args(["--consistency", consistency])
            .start();
        assert_eq!(read_string(m.file("app/password")), password);
        let all: Value =
            serde_json::from_slice(&read(m.file("app/all")).expect("read all")).expect("JSON");
        assert_eq!(all, json!({ "password": password, "user": user }));
        let b64 = |v: &str| leak_forms(v).pop().expect("the base64 form");
        assert_eq!(
            read_string(m.file("app/tpl")),
            format!("{user}:{}", b64(password))
        );

        bao.kv_put("secret/app/db", &[("password", rotated), ("user", user)]);
        thread::sleep(Duration::from_millis(1500));
        assert_eq!(read_string(m.file("app/password")), rotated);
        let all: Value =
            serde_json::from_slice(&read(m.file("app/all")).expect("read all")).expect("JSON");
        assert_eq!(all, json!({ "password": rotated, "user": user }));
        assert_eq!(
            read_string(m.file("app/tpl")),
            format!("{user}:{}", b64(rotated))
        );

        m.terminate();
        let logs = m.logs();
        let ctx = format!("RUST_LOG={level} --log-format {format} --consistency {consistency}");
        assert!(
            !logs.trim().is_empty(),
            "{ctx}: vaultfs logged nothing at all"
        );
        for secret in secrets {
            for form in leak_forms(secret) {
                if let Some(pos) = logs.find(&form) {
                    let line = logs[..pos].rfind('\n').map_or(0, |i| i + 1);
                    let end = logs[pos..].find('\n').map_or(logs.len(), |i| pos + i);
                    panic!(
                        "{ctx}: secret value {secret:?} appears in the logs (as {form:?}):\n{}",
                        &logs[line..end]
                    );
                }
            }
        }
        let json_format = format == "json";
        for name in ["app/password", "app/all", "app/tpl"] {
            let versions = |event| audit_versions(&logs, json_format, name, "secret/app/db", event);
            if consistency == "strict" {
                let opens = versions("open");
                assert!(
                    opens.len() == 2 && opens[0] != opens[1],
                    "{ctx}: expected one audit event per open of {name} (one open of each \
                     version), got versions {opens:?}; logs:\n{}",
                    tail(&logs, 60)
                );
            } else {
                // Once per TTL per file: each version's first access, plus at most a
                // re-validation of the attributes within the same timeout.
                let mut accesses = versions("access");
                let n = accesses.len();
                accesses.dedup();
                assert!(
                    accesses.len() == 2 && (2..=4).contains(&n),
                    "{ctx}: {n} access events of {name} for versions {accesses:?}, expected 1 \
                     or 2 for each of the two versions; logs:\n{}",
                    tail(&logs, 60)
                );
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Keeps the harness's path helpers honest without needing root.
#[test]
fn mountinfo_parsing_finds_the_root_filesystem() {
    let root = mounts_at(Path::new("/"));
    assert!(
        !root.is_empty(),
        "no mount listed at / in /proc/self/mountinfo"
    );
    assert!(root.iter().all(|m| !m.fstype.is_empty()));
}

/// Runs `args` as the unprivileged user `nobody` (uid and gid 65534, no groups).
fn as_nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program);
    c
}

#[test]
#[ignore = "needs root (to become an unprivileged user), /dev/fuse, fusermount3 and bao"]
fn a_normal_user_mounts_through_fusermount3_keeping_the_fuse_vaultfs_type() {
    let bao = setup();
    let mode = fs::metadata("/dev/fuse")
        .expect("/dev/fuse")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o666,
        "/dev/fuse has mode {mode:o}: normal users cannot open it (scripts/install-deps.sh sets \
         Debian's 0666)"
    );
    bao.kv_put("secret/app/db", &[("password", "user-mounted")]);
    let dir = tempfile::Builder::new()
        .prefix("vaultfs-user-")
        .tempdir()
        .expect("tempdir");
    // The user's own directory, reachable by it (tempdirs are 0700 root's).
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    std::os::unix::fs::chown(&mountpoint, Some(65534), Some(65534)).unwrap();
    let log = dir.path().join("vaultfs.log");
    let mut daemon = as_nobody(vaultfs_bin())
        .arg("mount")
        .arg(&mountpoint)
        .args(["--secret", "pw=secret/app/db#password"])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start vaultfs as nobody");
    let logs = || fs::read_to_string(&log).unwrap_or_default();
    let mounted = poll(
        Duration::from_secs(10),
        POLL_INTERVAL,
        || match mounts_at(&mountpoint).pop() {
            Some(m) => Ok(m),
            None => Err("not mounted"),
        },
    );
    let mount = mounted.unwrap_or_else(|e| {
        let _ = daemon.kill();
        panic!("{e}; vaultfs output:\n{}", logs())
    });
    assert_eq!(mount.fstype, "fuse.vaultfs", "the subtype keeps the type");
    // Only its user reaches a mount without --allow-other (root included).
    let out = as_nobody("cat")
        .arg(mountpoint.join("pw"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "user-mounted",
        "stderr: {}; vaultfs output:\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    send_signal(daemon.id() as i32, libc::SIGTERM).unwrap();
    let status = daemon.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}; vaultfs output:\n{}",
        describe_status(&status),
        logs()
    );
    assert!(
        !is_mounted(&mountpoint),
        "still mounted after SIGTERM: {:?}",
        mounts_at(&mountpoint)
    );
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn ioctls_are_refused_with_enotty_and_not_logged() {
    let bao = setup();
    bao.kv_put("secret/app/py", &[("value", "python-reads-me")]);
    let mut m = Mount::start(&bao, &["py=secret/app/py#value"], &[]);
    let path = m.file("py");
    let path = path.to_str().expect("utf-8 path");
    // `open()` asks whether the file is a terminal (an ioctl), as do `isatty` and TCGETS.
    let script = "import fcntl, os, sys, termios\n\
        print(open(sys.argv[1]).read())\n\
        fd = os.open(sys.argv[1], os.O_RDONLY)\n\
        assert not os.isatty(fd)\n\
        try:\n    fcntl.ioctl(fd, termios.TCGETS, bytes(64))\n    raise SystemExit('TCGETS succeeded')\n\
        except OSError as e:\n    print(e.errno)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script, path])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        format!("python-reads-me\n{}\n", libc::ENOTTY),
        "the value, then TCGETS refused with ENOTTY"
    );
    m.terminate();
    let logs = m.logs();
    assert!(!logs.contains("ioctl"), "ioctls are not logged:\n{logs}");
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn an_external_unmount_stops_the_daemon_with_a_failure_naming_it() {
    let bao = setup();
    bao.kv_put("secret/app/one", &[("value", "v1")]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut m = Mount::start(
        &bao,
        &["one=secret/app/one#value"],
        &["--metrics-addr", &addr],
    );
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");
    assert_eq!(read_string(m.file("one")), "v1");
    lazy_unmount(m.path()).expect("umount -l");
    let status = m
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running after the unmount:\n{}", m.logs()));
    assert_eq!(status.code(), Some(1), "{}", m.logs());
    let logs = m.logs();
    let gone = format!(
        "vaultfs: the mount at {} is gone (unmounted from outside); stopped",
        m.path().display()
    );
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("is gone"))
            .collect::<Vec<_>>(),
        [gone.as_str()],
        "one line naming the mount point:\n{logs}"
    );
    assert!(!is_mounted(m.path()), "nothing left mounted");
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn a_live_mount_is_refused_however_its_mount_point_is_written() {
    let bao = setup();
    bao.kv_put("secret/app/db", &[("password", "only-once")]);
    let first = Mount::start(&bao, &["pw=secret/app/db#password"], &[]);
    let dir = first.path().to_path_buf();
    let link = dir.with_extension("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let trailing = format!("{}/", dir.display());
    let relative = format!(
        "{}/../{}",
        dir.display(),
        dir.file_name().unwrap().to_string_lossy()
    );
    for written in [link.display().to_string(), trailing, relative] {
        let out = Command::new(vaultfs_bin())
            .args(["mount", &written, "--secret", "pw=secret/app/db#password"])
            .env("VAULT_ADDR", bao.addr())
            .env("VAULT_TOKEN", ROOT_TOKEN)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{written}: accepted; {stderr}");
        assert!(
            stderr.contains("already") || stderr.contains("mounted"),
            "{written}: {stderr}"
        );
        assert_eq!(
            mounts_at(&dir).len(),
            1,
            "{written}: a second mount was stacked: {:?}",
            mounts_at(&dir)
        );
    }
    assert_eq!(
        read_string(first.file("pw")),
        "only-once",
        "the first still serves"
    );
    let _ = fs::remove_file(&link);
}

#[test]
#[ignore = "needs root and /dev/fuse"]
fn a_fuse_connection_that_never_answers_is_unhealthy_and_holds_one_probe_thread() {
    require_root();
    let scratch = tempfile::Builder::new()
        .prefix("vaultfs-unanswered")
        .tempdir()
        .unwrap();
    let dir = scratch.path().to_path_buf();
    // A real FUSE mount nobody serves: every request to it waits, as on a stuck daemon.
    let device = vaultfs::sys::fuse_mount(&dir, false).expect("mount a FUSE connection");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let health = Arc::new(vaultfs::health::Health::new());
    let problems = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    let watched = dir.clone();
    let monitor = runtime.spawn(vaultfs::health::monitor(
        health.clone(),
        problems.clone(),
        move || vaultfs::health::Watchlist {
            mounts: vec![],
            connections: vec![watched.clone()],
        },
    ));
    let not_answering = format!(
        "the FUSE connection at {} has not answered statfs for",
        dir.display()
    );
    wait_until(
        "the connection to count as not answering",
        vaultfs::health::ANSWER_DEADLINE * 3,
        || match health.status() {
            Err(text) if text.starts_with(&not_answering) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(problems.get(), 1);
    // Several checks later, still one probe waiting on it.
    thread::sleep(vaultfs::health::ANSWER_DEADLINE + vaultfs::health::CHECK_INTERVAL * 2);
    assert_eq!(threads_named("vaultfs-health"), 1);
    // The connection dies: the probe returns, naming the error.
    drop(device);
    wait_until(
        "the probe to see the dead connection",
        vaultfs::health::ANSWER_DEADLINE * 2,
        || match health.status() {
            Err(text) if text.contains("answers statfs with an error") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(threads_named("vaultfs-health"), 0);
    monitor.abort();
    lazy_unmount(&dir).expect("detach the dead mount");
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}
