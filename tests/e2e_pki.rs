//! End-to-end tests of Vault PKI certificates (`pki:` spec entries): the real `vaultfs` binary
//! (`vaultfs mount --spec`, and `vaultfs csi` with its keeper) against a real OpenBao whose
//! `pki` engine is a root CA with an intermediate at `pki_int` issuing through the role `web`
//! ([`common::pki::Pki`]). Every certificate vaultfs obtains is one `update` of
//! `pki_int/issue/web` in the audit log; the served files are checked with `openssl`.
//!
//! Tested: the four files of an entry (`tls.key`, `tls.crt`, `ca.crt`, `bundle.pem`) come from
//! one issue, made at the first read and not at mount, shared by concurrent readers; the key
//! matches the certificate, the chain verifies against `ca.crt`, the names are the ones
//! declared; renewal two thirds into the certificate's lifetime while it is read, seen as one
//! new pair by strict readers; no renewal of an entry nobody reads, and a new issue at its
//! next read after expiry; revocation at unmount only with `revoke: true`; Vault's refusals
//! (EIO, EACCES) and malformed entries (refused at mount, exit status 2); under CSI, pod-info
//! names and no re-issue on republish or on a `kill -9` restart with the keeper.
//!
//! Ignored by default (they need root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::csi::*;
use common::k8s::*;
use common::pki::*;
use common::*;
use serde_json::{json, Value};
use tempfile::TempDir;
use tonic::Code;

/// The entry's directory in the volume.
const ENTRY: &str = "tls";
/// The files of an entry, as `ls` lists them.
const FILES: [&str; 4] = ["bundle.pem", "ca.crt", "tls.crt", "tls.key"];
/// How long a revocation, or a stash in the keeper, may take to show.
const SETTLE: Duration = Duration::from_secs(10);

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A fresh OpenBao with the CA of [`Pki::enable`].
fn setup() -> (Bao, Pki) {
    require_root();
    let bao = Bao::start();
    let pki = Pki::enable(&bao);
    (bao, pki)
}

/// The `secrets:` YAML of one entry `tls` issuing from `pki` with `fields` (YAML values, e.g.
/// `("commonName", "web.example.com")`, `("altNames", "[a, b]")`) after its `path`.
fn entry_yaml(pki: &Pki, fields: &[(&str, &str)]) -> String {
    let mut pki_fields = vec![format!("path: {}", pki.issue_path())];
    pki_fields.extend(fields.iter().map(|(k, v)| format!("{k}: {v}")));
    format!("- name: {ENTRY}\n  pki: {{{}}}\n", pki_fields.join(", "))
}

/// A spec file holding `secrets` (YAML list), in a directory the caller keeps.
fn spec_file(dir: &TempDir, secrets: &str) -> String {
    let file = dir.path().join("spec.yaml");
    fs::write(&file, format!("secrets:\n{secrets}")).expect("write the spec");
    file.to_str().expect("utf-8 path").to_string()
}

/// A `vaultfs mount` serving one PKI entry, and its spec file.
struct PkiMount {
    mount: Mount,
    _spec: TempDir,
}

impl Deref for PkiMount {
    type Target = Mount;
    fn deref(&self) -> &Mount {
        &self.mount
    }
}

impl PkiMount {
    /// The entry's directory.
    fn dir(&self) -> PathBuf {
        self.mount.file(ENTRY)
    }

    fn tls(&self) -> Tls {
        Tls::read(&self.dir())
    }
}

/// Mounts the entry `tls` with `fields` (see [`entry_yaml`]) and `args`, as a token holding
/// [`POLICY`].
fn mount_pki(bao: &Bao, pki: &Pki, fields: &[(&str, &str)], args: &[&str]) -> PkiMount {
    let token = bao.create_token(&[POLICY]);
    mount_pki_as(bao, pki, &token, fields, args)
}

fn mount_pki_as(
    bao: &Bao,
    pki: &Pki,
    token: &str,
    fields: &[(&str, &str)],
    args: &[&str],
) -> PkiMount {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec_file(&dir, &entry_yaml(pki, fields));
    let mount = Mount::builder(bao)
        .token(token)
        .args(["--spec", &spec])
        .args(args)
        .rust_log("info,vaultfs=debug")
        .start();
    PkiMount { mount, _spec: dir }
}

/// The four files of an entry as read (no `Debug`: it holds a private key).
#[derive(PartialEq, Eq, Clone)]
struct Tls {
    key: String,
    crt: String,
    ca: String,
    bundle: String,
}

impl Tls {
    /// Reads the four files of the entry directory `dir`, each with one open.
    fn read(dir: &Path) -> Tls {
        Tls {
            key: read_string(dir.join("tls.key")),
            crt: read_string(dir.join("tls.crt")),
            ca: read_string(dir.join("ca.crt")),
            bundle: read_string(dir.join("bundle.pem")),
        }
    }

    fn serial(&self) -> String {
        cert_serial(&self.crt)
    }

    /// Checks what every served certificate must satisfy: one private key in `tls.key`,
    /// matching the leaf (first block of `tls.crt`), followed by the intermediate; `ca.crt` is
    /// the root and the chain verifies against it; `bundle.pem` is the key, the leaf and the
    /// intermediates; the subject's CN is `cn` and the SANs are `sans` (as `openssl` prints
    /// them, sorted).
    fn check(&self, pki: &Pki, cn: &str, sans: &[&str], what: &str) {
        let keys = pem_blocks(&self.key);
        assert_eq!(
            keys.len(),
            1,
            "{what}: tls.key holds {} PEM blocks",
            keys.len()
        );
        assert!(
            pem_label(&keys[0]).ends_with("PRIVATE KEY"),
            "{what}: tls.key holds a {:?} block",
            pem_label(&keys[0])
        );
        let certs = pem_blocks(&self.crt);
        assert!(
            certs.len() >= 2 && certs.iter().all(|b| pem_label(b) == "CERTIFICATE"),
            "{what}: tls.crt should hold the leaf and the intermediate, holds {:?}",
            certs.iter().map(|b| pem_label(b)).collect::<Vec<_>>()
        );
        assert!(
            key_matches_cert(&self.key, &self.crt),
            "{what}: tls.key does not belong to the certificate in tls.crt"
        );
        assert!(
            same_pem(&certs[1], &pki.intermediate_pem),
            "{what}: the certificate after the leaf in tls.crt is not the intermediate"
        );
        assert!(
            same_pem(&self.ca, &pki.root_pem),
            "{what}: ca.crt is not the root CA (the top of Vault's ca_chain)"
        );
        if let Err(e) = verify_chain(&self.ca, &self.crt, &certs[0]) {
            panic!("{what}: the chain does not verify against ca.crt: {e}");
        }
        let expected_bundle: Vec<String> = keys.iter().chain(&certs).cloned().collect();
        assert!(
            pem_blocks(&self.bundle) == expected_bundle,
            "{what}: bundle.pem is not tls.key followed by tls.crt (labels {:?})",
            pem_blocks(&self.bundle)
                .iter()
                .map(|b| pem_label(b).to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(cert_common_name(&self.crt), cn, "{what}: subject CN");
        let mut sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        sans.sort();
        assert_eq!(
            cert_sans(&self.crt),
            sans,
            "{what}: subject alternative names"
        );
    }
}

/// Reads `path` expecting `errno`.
fn expect_errno(path: &Path, errno: i32, what: &str) {
    match read(path) {
        Ok(v) => panic!("{what}: expected errno {errno}, read {} bytes", v.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e:?}"),
    }
}

fn assert_issues(bao: &Bao, pki: &Pki, expected: usize, what: &str, logs: &dyn Fn() -> String) {
    let issued = pki.issues(bao);
    assert_eq!(
        issued,
        expected,
        "{what}: {issued} certificate(s) issued, expected {expected}; vaultfs log:\n{}",
        logs()
    );
}

// ---------------------------------------------------------------------------------------------
// The fixture itself
// ---------------------------------------------------------------------------------------------

/// The fixture and its `openssl` helpers, against OpenBao's API alone: a certificate issued
/// with the `pki-web` policy has a key matching it, a chain verifying against the root, the
/// names asked for, Vault's serial and expiry; issues are counted; a role refusing a name
/// answers 400 with its reason; a revoked serial is listed.
#[test]
#[ignore = "needs bao (VAULTFS_TEST_BAO) and openssl"]
fn the_pki_fixture_issues_certificates_its_helpers_check() {
    let bao = Bao::start();
    let pki = Pki::enable(&bao);
    let token = bao.create_token(&[POLICY]);
    assert_eq!(pki.issues(&bao), 0);

    let data = pki.issue_as(
        &bao,
        &token,
        json!({
            "common_name": "web.example.com",
            "alt_names": "web.example.com,localhost",
            "ip_sans": "127.0.0.1",
            "ttl": "1h",
        }),
    );
    assert_eq!(pki.issues(&bao), 1, "one issue counted");
    let field = |name: &str| -> String {
        data[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in the issue response"))
            .to_string()
    };
    let (cert, key) = (field("certificate"), field("private_key"));
    let chain: Vec<String> = data["ca_chain"]
        .as_array()
        .expect("ca_chain")
        .iter()
        .map(|c| c.as_str().expect("a PEM").to_string())
        .collect();
    assert_eq!(chain.len(), 2, "ca_chain: the intermediate and the root");
    assert!(same_pem(&chain[0], &pki.intermediate_pem));
    assert!(
        same_pem(&chain[1], &pki.root_pem),
        "ca_chain ends at the root"
    );
    assert!(same_pem(&field("issuing_ca"), &pki.intermediate_pem));

    assert!(key_matches_cert(&key, &cert), "the issued key matches");
    let other = pki.issue_as(&bao, &token, json!({ "common_name": "other.example.com" }));
    let other_key = other["private_key"].as_str().expect("a key");
    assert!(
        !key_matches_cert(other_key, &cert),
        "another certificate's key does not match"
    );
    assert!(!key_matches_cert("not a key", &cert));
    let description = key_description(&key);
    assert!(
        description.contains("prime256v1") && !description.contains("priv:"),
        "an EC P-256 key, described without its private part:\n{description}"
    );

    verify_chain(&pki.root_pem, &pki.intermediate_pem, &cert).expect("the chain verifies");
    let leaf_and_chain = format!("{cert}\n{}\n", pki.intermediate_pem);
    verify_chain(&pki.root_pem, &leaf_and_chain, &cert).expect("with the leaf among them");
    assert!(
        verify_chain(&pki.root_pem, "", &cert).is_err(),
        "without the intermediate the leaf does not verify"
    );
    assert!(
        verify_chain(&pki.intermediate_pem, "", &pki.root_pem).is_err(),
        "the root does not verify against the intermediate"
    );

    assert_eq!(cert_common_name(&cert), "web.example.com");
    assert_eq!(
        cert_sans(&cert),
        [
            "DNS:localhost",
            "DNS:web.example.com",
            "IP Address:127.0.0.1"
        ]
    );
    assert_eq!(
        cert_serial(&cert),
        normalize_serial(&field("serial_number"))
    );
    let expiration = data["expiration"].as_u64().expect("expiration");
    assert_eq!(
        cert_not_after(&cert),
        expiration,
        "notAfter is Vault's expiration"
    );
    let ttl = expiration as f64 - now_secs();
    assert!(
        (3500.0..=3601.0).contains(&ttl),
        "a 1 h certificate: {ttl} s left"
    );

    // Vault's PEM fields end without a newline: joined as they are, two blocks run into one
    // line, which `pem_blocks` (like openssl) does not take for two blocks.
    let pem = format!("{key}\n{cert}\n{}", pki.intermediate_pem);
    let labels: Vec<String> = pem_blocks(&pem)
        .iter()
        .map(|b| pem_label(b).to_string())
        .collect();
    assert_eq!(labels.len(), 3, "{labels:?}");
    assert!(labels[0].ends_with("PRIVATE KEY") && labels[1] == "CERTIFICATE");
    assert_eq!(
        pem_blocks(&format!("{key}{cert}")).len(),
        1,
        "run-together blocks"
    );

    // A name outside allowed_domains: 400 with Vault's reason (what vaultfs logs).
    let refused = bao.api_as(
        &token,
        "POST",
        &pki.issue_path(),
        Some(json!({ "common_name": "web.other.org" })),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("not allowed"),
        "Vault's reason: {}",
        refused.body
    );
    // Without the policy: 403.
    let stranger = bao.create_token(&["default"]);
    let denied = bao.api_as(
        &stranger,
        "POST",
        &pki.issue_path(),
        Some(json!({ "common_name": "web.example.com" })),
    );
    assert_eq!(denied.status, 403, "{}", denied.body);

    assert!(pki.revoked_serials(&bao).is_empty());
    let revoked = bao.api_as(
        &token,
        "POST",
        &format!("{}/revoke", pki.mount),
        Some(json!({ "serial_number": field("serial_number") })),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(pki.revoked_serials(&bao), vec![cert_serial(&cert)]);
    // Two issued, one refused, one denied: every request counts.
    assert_eq!(
        pki.issues(&bao),
        4,
        "refused and denied requests are counted too"
    );
}

// ---------------------------------------------------------------------------------------------
// vaultfs mount
// ---------------------------------------------------------------------------------------------

/// Nothing is issued at mount or by listing the entry; the first read issues one certificate
/// whose four files agree: the key matches, the chain verifies against `ca.crt`, the names
/// and TTL are the declared ones, `bundle.pem` is key + leaf + intermediate, the key is the
/// role's EC P-256.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn the_first_read_issues_one_certificate_whose_files_agree() {
    let (bao, pki) = setup();
    let m = mount_pki(
        &bao,
        &pki,
        &[
            ("commonName", "web.example.com"),
            ("altNames", "[web.example.com, localhost]"),
            ("ipSans", "[127.0.0.1]"),
            ("ttl", "1h"),
        ],
        &["--cache-ttl", "1h"],
    );
    assert_issues(&bao, &pki, 0, "after mounting", &|| m.logs());
    assert_eq!(list_dir(m.path()), [ENTRY], "the entry is a directory");
    assert_eq!(list_dir(m.dir()), FILES);
    assert_issues(&bao, &pki, 0, "after listing the entry", &|| m.logs());

    let before = now_secs();
    let tls = m.tls();
    assert_issues(&bao, &pki, 1, "after reading the four files", &|| m.logs());
    tls.check(
        &pki,
        "web.example.com",
        &[
            "DNS:localhost",
            "DNS:web.example.com",
            "IP Address:127.0.0.1",
        ],
        "the first certificate",
    );
    let description = key_description(&tls.key);
    assert!(
        description.contains("prime256v1"),
        "the role's EC P-256 key:\n{description}"
    );
    let lifetime = cert_not_after(&tls.crt) as f64 - before;
    assert!(
        (3500.0..=3660.0).contains(&lifetime),
        "ttl: 1h gives a certificate valid {lifetime} s from the read"
    );

    // Read again, each file: the same certificate, nothing issued.
    assert!(m.tls() == tls, "a second read served another certificate");
    assert_issues(&bao, &pki, 1, "after reading again", &|| m.logs());
    // The debug log tells of the issue but holds no key (nor any other PEM).
    let logs = m.logs();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains("-----BEGIN"),
        "PEM text in the vaultfs log"
    );
}

/// 8 readers starting together, each reading the four files 13 times (104 reads of the entry):
/// one certificate, served to all of them.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn concurrent_readers_of_the_four_files_share_one_issue() {
    let (bao, pki) = setup();
    let m = mount_pki(
        &bao,
        &pki,
        &[("commonName", "web.example.com"), ("ttl", "1h")],
        &["--cache-ttl", "1h"],
    );
    const READERS: usize = 8;
    const ROUNDS: usize = 13;
    let barrier = Arc::new(Barrier::new(READERS));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (barrier, dir) = (barrier.clone(), m.dir());
            thread::spawn(move || {
                barrier.wait();
                (0..ROUNDS).map(|_| Tls::read(&dir)).collect::<Vec<_>>()
            })
        })
        .collect();
    let seen: Vec<Tls> = readers
        .into_iter()
        .flat_map(|r| r.join().expect("a reader panicked"))
        .collect();
    assert_eq!(seen.len(), READERS * ROUNDS);
    assert_issues(&bao, &pki, 1, "after 104 concurrent reads", &|| m.logs());
    let first = &seen[0];
    let others = seen.iter().filter(|t| *t != first).count();
    assert_eq!(others, 0, "reads served something else than the first read");
    first.check(&pki, "web.example.com", &["DNS:web.example.com"], "served");
}

/// A reader process (`python3`) that opens `tls.key` and then `tls.crt`, one open each, every
/// 2 ms for `seconds`, and prints as JSON the distinct keys and certificates it read, each
/// pair of them it saw (`"k,c"` indices) with when it first and last saw it, its number of
/// pairs and its errors.
const PAIR_READER: &str = r#"
import json, os, sys, time
key_path, crt_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.time() + seconds
keys, certs, pairs, errors, n = {}, {}, {}, [], 0
while time.time() < deadline:
    try:
        with open(key_path) as f:
            k = f.read()
        with open(crt_path) as f:
            c = f.read()
    except OSError as e:
        errors.append("%s at %.3f" % (e, time.time()))
        time.sleep(0.01)
        continue
    now = time.time()
    pair = "%d,%d" % (keys.setdefault(k, len(keys)), certs.setdefault(c, len(certs)))
    pairs.setdefault(pair, [now, now])[1] = now
    n += 1
    time.sleep(0.002)
json.dump({"keys": list(keys), "certs": list(certs), "pairs": pairs, "reads": n,
           "errors": errors[:20]}, sys.stdout)
"#;

/// What one pair reader saw.
struct PairReport {
    keys: Vec<String>,
    certs: Vec<String>,
    /// (key index, cert index, first seen, last seen)
    pairs: Vec<(usize, usize, f64, f64)>,
    reads: u64,
    errors: Vec<String>,
}

fn python() -> String {
    std::env::var("VAULTFS_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs `readers` [`PAIR_READER`] processes on `dir` for `seconds` and returns their reports.
fn read_pairs(dir: &Path, readers: usize, seconds: u64) -> Vec<PairReport> {
    let children: Vec<_> = (0..readers)
        .map(|_| {
            let mut cmd = Command::new(python());
            cmd.arg("-c")
                .arg(PAIR_READER)
                .arg(dir.join("tls.key"))
                .arg(dir.join("tls.crt"))
                .arg(seconds.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            die_with_parent(&mut cmd, libc::SIGKILL);
            cmd.spawn().expect("spawn a pair reader")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = within(
                "a pair reader",
                Duration::from_secs(seconds + 60),
                move || child.wait_with_output(),
            )
            .expect("wait for a pair reader");
            assert!(
                out.status.success(),
                "a pair reader failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("a reader's JSON report");
            let strings = |name: &str| -> Vec<String> {
                v[name]
                    .as_array()
                    .expect("a list")
                    .iter()
                    .map(|s| s.as_str().expect("a string").to_string())
                    .collect()
            };
            let pairs = v["pairs"]
                .as_object()
                .expect("pairs")
                .iter()
                .map(|(k, times)| {
                    let (key, cert) = k.split_once(',').expect("k,c");
                    (
                        key.parse().expect("an index"),
                        cert.parse().expect("an index"),
                        times[0].as_f64().expect("a time"),
                        times[1].as_f64().expect("a time"),
                    )
                })
                .collect();
            PairReport {
                keys: strings("keys"),
                certs: strings("certs"),
                pairs,
                reads: v["reads"].as_u64().unwrap_or(0),
                errors: strings("errors"),
            }
        })
        .collect()
}

/// A reader process (`python3`) that opens `tls.key`, tells it has (creates `argv[3]`), waits
/// until `argv[4]` exists, then opens `tls.crt`, then both once more, and prints the four
/// reads as JSON (`key1`, `crt1`, `key2`, `crt2`).
const STRADDLING_READER: &str = r#"
import json, os, sys, time
key_path, crt_path, ready_path, go_path = sys.argv[1:5]
out = {}
with open(key_path) as f:
    out["key1"] = f.read()
open(ready_path, "w").close()
while not os.path.exists(go_path):
    time.sleep(0.01)
with open(crt_path) as f:
    out["crt1"] = f.read()
with open(key_path) as f:
    out["key2"] = f.read()
with open(crt_path) as f:
    out["crt2"] = f.read()
json.dump(out, sys.stdout)
"#;

/// Seconds after the first issue of a 30 s certificate at which the straddling reader opens
/// `tls.key`: shortly before the renewal is due (20 s), so that its opens of the key and the
/// certificate are a few seconds apart.
const STRADDLE_FROM: f64 = 17.0;

/// A started [`STRADDLING_READER`] that has read `tls.key` once.
struct Straddler {
    child: std::process::Child,
    dir: TempDir,
}

impl Straddler {
    /// Starts the reader on the entry `entry_dir` and waits until it has read `tls.key`.
    fn start(entry_dir: &Path) -> Straddler {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(python());
        cmd.arg("-c")
            .arg(STRADDLING_READER)
            .arg(entry_dir.join("tls.key"))
            .arg(entry_dir.join("tls.crt"))
            .arg(dir.path().join("ready"))
            .arg(dir.path().join("go"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().expect("spawn the straddling reader");
        let ready = dir.path().join("ready");
        wait_until(
            "the straddling reader to read tls.key",
            Duration::from_secs(30),
            || {
                if ready.exists() {
                    Ok(())
                } else {
                    Err("not yet")
                }
            },
        );
        Straddler { child, dir }
    }

    /// Lets it read on; returns its four reads (key1, crt1, key2, crt2).
    fn finish(self) -> [String; 4] {
        fs::write(self.dir.path().join("go"), "").expect("write the go file");
        let child = self.child;
        let out = within(
            "the straddling reader",
            Duration::from_secs(60),
            move || child.wait_with_output(),
        )
        .expect("wait for the straddling reader");
        assert!(
            out.status.success(),
            "the straddling reader failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("its JSON report");
        ["key1", "crt1", "key2", "crt2"].map(|k| v[k].as_str().expect("a read").to_string())
    }
}

/// A certificate with `ttl: 30s`, read all along by strict readers that open `tls.key` and
/// `tls.crt` one after the other: a new certificate is issued two thirds into the first one's
/// lifetime (between 15 and 28 s after it), no reader ever gets a key and a certificate that
/// do not belong together, every reader gets the new pair within the cache TTL (plus 3 s) of
/// its issue and never the old one after that, and no certificate is served past its expiry.
/// A reader that opened `tls.key` before the renewal and opens `tls.crt` after it (its first
/// open of that file) gets the old certificate, its key's; its next opens get the new pair.
#[test]
#[ignore = "needs root, /dev/fuse, bao (VAULTFS_TEST_BAO) and python3"]
fn a_certificate_in_use_is_renewed_at_two_thirds_and_strict_readers_never_mix_pairs() {
    let (bao, pki) = setup();
    let cache_ttl = 2.0;
    let m = mount_pki(
        &bao,
        &pki,
        &[("commonName", "web.example.com"), ("ttl", "30s")],
        &["--consistency", "strict", "--cache-ttl", "2s"],
    );
    let first = m.tls();
    first.check(&pki, "web.example.com", &["DNS:web.example.com"], "first");
    let issued = pki.issue_times(&bao);
    assert_eq!(issued.len(), 1, "one issue at the first read");

    // Read until well past the renewal point (~20 s) and short of the renewed certificate's
    // own (~40 s), in other processes. Meanwhile a straddling reader opens tls.key shortly
    // before the renewal is due and, once the renewed certificate is served to a new open,
    // tls.crt.
    let entry_dir = m.dir();
    let pair_readers = thread::spawn(move || read_pairs(&entry_dir, 4, 30));
    while now_secs() < issued[0] + STRADDLE_FROM {
        thread::sleep(Duration::from_millis(100));
    }
    let straddler = Straddler::start(&m.dir());
    let old_serial = first.serial();
    let crt = m.dir().join("tls.crt");
    let renewed = poll(
        Duration::from_secs(35),
        Duration::from_millis(100),
        || match read(&crt).map(|b| cert_serial(&String::from_utf8_lossy(&b))) {
            Ok(serial) if serial != old_serial => Ok(()),
            other => Err(other.map(|_| "the first certificate")),
        },
    );
    let straddled_at = now_secs();
    let [key1, crt1, key2, crt2] = straddler.finish();
    let reports = pair_readers.join().expect("the pair readers");
    if let Err(last) = renewed {
        panic!(
            "no renewed certificate served within 35 s ({last:?}); vaultfs log:\n{}",
            m.logs()
        );
    }
    let issued = pki.issue_times(&bao);
    assert!(
        issued.len() >= 2,
        "no renewal within 30 s of reading a 30 s certificate; vaultfs log:\n{}",
        m.logs()
    );
    let renewal = issued[1] - issued[0];
    assert!(
        (15.0..=28.0).contains(&renewal),
        "renewed {renewal:.1} s after the issue of a 30 s certificate (two thirds: 20 s)"
    );

    if key_matches_cert(&key1, &first.crt) {
        assert!(
            key_matches_cert(&key1, &crt1) && cert_serial(&crt1) == old_serial,
            "a process that opened tls.key before the renewal and tls.crt after it (its first \
             open of tls.crt, {:.1} s after the renewal was issued) did not get the \
             certificate of its key",
            straddled_at - issued[1]
        );
    } else {
        // Renewed within the bounds but before the straddling reader's first open.
        eprintln!(
            "renewed {renewal:.1} s in, before the straddling reader opened tls.key at \
             {STRADDLE_FROM} s: its first pair is not checked"
        );
    }
    assert!(
        key_matches_cert(&key2, &crt2) && cert_serial(&crt2) != old_serial,
        "the straddling reader's second opens did not get the renewed pair"
    );

    let old_expiry = cert_not_after(&first.crt) as f64;
    for (i, report) in reports.iter().enumerate() {
        let who = format!("reader {i}");
        assert!(report.errors.is_empty(), "{who}: {:?}", report.errors);
        assert!(report.reads > 100, "{who} read only {} pairs", report.reads);
        let mut new_first_seen = f64::INFINITY;
        let mut old_last_seen = f64::NEG_INFINITY;
        for &(k, c, first_seen, last_seen) in &report.pairs {
            let (key, cert) = (&report.keys[k], &report.certs[c]);
            assert!(
                key_matches_cert(key, cert),
                "{who} opened tls.key then tls.crt and got a key and a certificate that do \
                 not belong together (first at {first_seen:.3}, last at {last_seen:.3}; \
                 issues at {issued:?})"
            );
            assert!(
                last_seen < cert_not_after(cert) as f64,
                "{who} was served a certificate at {last_seen:.3}, past its expiry"
            );
            if cert_serial(cert) == old_serial {
                old_last_seen = old_last_seen.max(last_seen);
            } else {
                new_first_seen = new_first_seen.min(first_seen);
            }
        }
        let bound = issued[1] + cache_ttl + 3.0;
        assert!(
            new_first_seen <= bound,
            "{who} first saw the renewed certificate at {new_first_seen:.3}, the renewal was \
             issued at {:.3} (cache TTL {cache_ttl} s)",
            issued[1]
        );
        assert!(
            old_last_seen <= bound && old_last_seen < old_expiry,
            "{who} still saw the old certificate at {old_last_seen:.3}, the renewal was \
             issued at {:.3}",
            issued[1]
        );
    }
    let current = m.tls();
    assert_ne!(current.serial(), old_serial);
    current.check(&pki, "web.example.com", &["DNS:web.example.com"], "renewed");
}

/// A certificate (`ttl: 10s`) read once and then left alone is renewed once (it was read
/// within the lifetime before its two-thirds point), then no more: the renewed one, which
/// nobody read for a whole lifetime, runs out, and the next read issues a new one (the
/// expired one is not served).
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn an_idle_certificate_is_not_renewed_and_is_issued_anew_after_expiry() {
    let (bao, pki) = setup();
    let m = mount_pki(
        &bao,
        &pki,
        &[("commonName", "web.example.com"), ("ttl", "10s")],
        &["--cache-ttl", "1h"],
    );
    let first = read_string(m.dir().join("tls.crt"));
    let issued = pki.issue_times(&bao);
    assert_eq!(issued.len(), 1);

    // Past the first renewal (~6.7 s), the renewed one's two-thirds point (~13.4 s) and its
    // expiry (~16.7 s), touching nothing.
    let quiet_until = issued[0] + 20.0;
    while now_secs() < quiet_until {
        thread::sleep(Duration::from_millis(200));
    }
    assert_issues(
        &bao,
        &pki,
        2,
        "a certificate read once is renewed once, then nobody read it for a lifetime",
        &|| m.logs(),
    );
    let renewed_at = pki.issue_times(&bao)[1] - issued[0];
    assert!(
        (5.0..9.0).contains(&renewed_at),
        "renewed {renewed_at:.1} s after the first issue, expected about 6.7 s (two thirds of 10 s)"
    );

    let tls = m.tls();
    assert_issues(&bao, &pki, 3, "the read after expiry", &|| m.logs());
    assert_ne!(
        tls.serial(),
        cert_serial(&first),
        "the expired certificate was served after its expiry; vaultfs log:\n{}",
        m.logs()
    );
    assert!(
        cert_not_after(&tls.crt) as f64 > now_secs(),
        "served expired"
    );
    tls.check(
        &pki,
        "web.example.com",
        &["DNS:web.example.com"],
        "reissued",
    );
}

/// `revoke: true` revokes the certificate at unmount; without it the certificate is left to
/// expire.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn only_revoke_true_revokes_the_certificate_at_unmount() {
    let (bao, pki) = setup();
    let mut kept = mount_pki(&bao, &pki, &[("commonName", "kept.example.com")], &[]);
    let mut revoked = mount_pki(
        &bao,
        &pki,
        &[("commonName", "gone.example.com"), ("revoke", "true")],
        &[],
    );
    let kept_serial = kept.tls().serial();
    let revoked_serial = revoked.tls().serial();
    assert!(pki.revoked_serials(&bao).is_empty());

    kept.mount.terminate();
    revoked.mount.terminate();
    let listed = poll(SETTLE, Duration::from_millis(100), || {
        let list = pki.revoked_serials(&bao);
        if list.contains(&revoked_serial) {
            Ok(list)
        } else {
            Err(list)
        }
    });
    let list = listed.unwrap_or_else(|list| {
        panic!(
            "revoke: true did not revoke {revoked_serial} at unmount (revoked: {list:?}); \
             vaultfs log:\n{}",
            revoked.logs()
        )
    });
    assert!(
        !list.contains(&kept_serial),
        "the certificate of an entry without revoke: true was revoked at unmount"
    );
}

/// A name the role refuses gives EIO on every file, with Vault's reason in the log; a token
/// whose policy does not allow the issue gets EACCES.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn vault_refusals_give_eio_or_eacces() {
    let (bao, pki) = setup();
    let m = mount_pki(&bao, &pki, &[("commonName", "web.other.org")], &[]);
    for file in FILES {
        expect_errno(&m.dir().join(file), libc::EIO, "a name the role refuses");
    }
    let logs = m.logs();
    assert!(
        logs.contains("not allowed"),
        "Vault's reason is not in the log:\n{logs}"
    );

    let stranger = bao.create_token(&["default"]);
    let m = mount_pki_as(
        &bao,
        &pki,
        &stranger,
        &[("commonName", "web.example.com")],
        &[],
    );
    expect_errno(
        &m.dir().join("tls.crt"),
        libc::EACCES,
        "a token without the policy",
    );
}

/// Malformed entries are refused at mount (exit status 2, nothing mounted) with the entry and
/// the field named; pod-info names are refused outside CSI.
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn malformed_pki_entries_are_refused_at_mount_with_the_field_named() {
    let (bao, pki) = setup();
    /// An entry's fields (after `path`) and the words its refusal must contain.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 3] = [
        (
            "missing commonName",
            &[("ttl", "1h")],
            &["tls", "commonName"],
        ),
        (
            "pod-info name outside CSI",
            &[("commonName", "\"{{ pod.name }}.example.com\"")],
            &["commonName"],
        ),
        (
            "unknown key type",
            &[("commonName", "web.example.com"), ("keyType", "dsa")],
            &["keyType"],
        ),
    ];
    for (label, fields, must_mention) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec_file(&dir, &entry_yaml(&pki, fields));
        let out = Mount::builder(&bao)
            .args(["--spec", &spec])
            .run_to_exit(Duration::from_secs(20));
        assert!(!out.timed_out, "{label}: not refused:\n{}", out.output);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{label}: exit status {}; output:\n{}",
            describe_status(&out.status),
            out.output
        );
        for word in must_mention {
            assert!(
                out.output.contains(word),
                "{label}: the error does not name {word:?}:\n{}",
                out.output
            );
        }
        assert!(!out.mounted_after_exit, "{label}: left a mount");
    }
    assert_eq!(pki.issues(&bao), 0);
}

// ---------------------------------------------------------------------------------------------
// CSI
// ---------------------------------------------------------------------------------------------

/// Under CSI, a malformed entry is refused at publish with the field named; `{{ pod.name }}` in
/// commonName and altNames becomes the pod's name; a republish and a `kill -9` restart of the
/// plugin with the keeper alive issue nothing more and serve the same certificate, and the
/// unpublish revokes nothing (no `revoke: true`).
#[test]
#[ignore = "needs root, /dev/fuse and bao (VAULTFS_TEST_BAO)"]
fn csi_names_come_from_the_pod_and_restarts_issue_nothing() {
    let (bao, key) = app_cluster(&[]);
    let pki = Pki::enable(&bao);
    jwt_role(&bao, "jwt", "app", "ns", "app", &["app", POLICY], "1h");
    let node = CsiNode::new("node-pki");
    let keeper = Keeper::start(&node.keeper_socket_path());
    let metrics = format!("127.0.0.1:{}", free_port());
    let start = || node.daemon(&bao).with_keeper(&metrics).start();
    let mut daemon = start();

    let secrets = entry_yaml(
        &pki,
        &[
            ("commonName", "\"{{ pod.name }}.example.com\""),
            ("altNames", "[\"{{ pod.name }}.example.com\", localhost]"),
            ("ttl", "1h"),
        ],
    );
    // Strict: every open reaches the daemon, so a certificate issued anew would be seen.
    let attributes = [("cacheTTL", "1h"), ("consistency", "strict")];
    let pod = Pod::new("ns", "web-0", "app");
    let publish = |daemon: &CsiDaemon, what: &str| -> PathBuf {
        let (request, target) = jwt_publish(&node, &pod, &key, "app", &secrets, &attributes);
        if let Err(s) = daemon.client().publish(request) {
            panic!(
                "{what} failed with {}; daemon output:\n{}",
                describe(&s),
                daemon.logs()
            );
        }
        target.join(ENTRY)
    };
    // A malformed entry is refused at publish, with the field named, and nothing mounted.
    let malformed = entry_yaml(&pki, &[("altNames", "[\"{{ pod.name }}.example.com\"]")]);
    let other = Pod::new("ns", "web-1", "app");
    let (request, _) = jwt_publish(&node, &other, &key, "app", &malformed, &attributes);
    let refused = expect_refused(
        &daemon.client(),
        request,
        Code::InvalidArgument,
        "an entry without commonName",
    );
    assert!(
        refused.message().contains("commonName"),
        "the refusal does not name the field: {}",
        describe(&refused)
    );

    let dir = publish(&daemon, "publish");
    assert_issues(&bao, &pki, 0, "after the publish", &|| node.all_logs());
    let tls = Tls::read(&dir);
    assert_issues(&bao, &pki, 1, "after the first read", &|| node.all_logs());
    tls.check(
        &pki,
        "web-0.example.com",
        &["DNS:localhost", "DNS:web-0.example.com"],
        "the pod's certificate",
    );
    let serial = tls.serial();

    assert_eq!(publish(&daemon, "republish"), dir);
    assert!(
        Tls::read(&dir) == tls,
        "a republish served another certificate"
    );
    assert_issues(&bao, &pki, 1, "after the republish", &|| node.all_logs());

    // The keeper holds the volume's session and its certificate (2 records) before the
    // kill; an implementation that keeps the certificate in the session's record shows 1,
    // which the wait accepts once it has given the stash its time.
    let _ = poll(SETTLE, Duration::from_millis(50), || {
        match scrape(&metrics, "vaultfs_keeper_stashed_sessions") {
            n if n >= 2.0 => Ok(()),
            n => Err(n),
        }
    });
    daemon.kill();
    daemon = start();
    let after = Tls::read(&dir);
    assert_eq!(
        after.serial(),
        serial,
        "another certificate after kill -9; daemon output:\n{}",
        node.all_logs()
    );
    assert!(after == tls, "the files changed after kill -9");
    assert_issues(&bao, &pki, 1, "after kill -9 and restart", &|| {
        node.all_logs()
    });

    let volume = pod.volume_id("secrets");
    daemon
        .client()
        .unpublish(&volume, dir.parent().expect("target"))
        .expect("unpublish");
    assert!(
        pki.revoked_serials(&bao).is_empty(),
        "revoked at unpublish without revoke: true"
    );
    drop(daemon);
    drop(keeper);
}
