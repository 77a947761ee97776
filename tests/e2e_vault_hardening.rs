//! End-to-end tests of the Vault client's defences: the real `vaultfs` binary mounted as root
//! against a real OpenBao dev server (or a hostile stand-in for one). Answers over the size
//! limit, TLS trust through a CA file only, redirects never followed, and no login storm for
//! a role whose policy forbids what it reads and `auth/token/lookup-self`.
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_secret_over_the_answer_limit_fails_with_efbig_and_memory_stays_bounded() {
    require_root();
    let bao = Bao::start();
    let big = "b".repeat(5 << 20);
    let fits = "f".repeat(900 << 10);
    bao.kv_put("secret/app/big", &[("v", &big)]);
    bao.kv_put("secret/app/fits", &[("v", &fits)]);
    let m = Mount::builder(&bao)
        .secret("big=secret/app/big#v")
        .secret("fits=secret/app/fits#v")
        .start();

    for attempt in 0..3 {
        let err = read(m.file("big")).expect_err("a 5 MiB secret is refused");
        assert_eq!(
            errno_of(&err),
            libc::EFBIG,
            "attempt {attempt}: {err:?}\nvaultfs log:\n{}",
            m.logs()
        );
    }
    let logs = m.logs();
    assert!(
        logs.contains("larger than the limit of 1048576 bytes"),
        "the log names the limit:\n{logs}"
    );
    assert!(!logs.contains("bbbbbbbb"), "the log holds no content");
    let rss = rss_kib(m.pid());
    eprintln!("vaultfs VmRSS after refusing a 5 MiB secret: {rss} KiB");
    assert!(rss < 64 * 1024, "VmRSS {rss} KiB");

    let served = read(m.file("fits")).expect("a 900 KiB secret is served");
    assert!(
        served == fits.as_bytes(),
        "900 KiB secret served intact ({} bytes)",
        served.len()
    );
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn tls_is_trusted_through_the_given_ca_file_only() {
    require_root();
    let bao = Bao::start_tls();
    bao.kv_put("secret/app/tls", &[("k", "over-tls")]);
    let ca = bao.ca_cert_path();
    let trusted = Mount::builder(&bao)
        .secret("f=secret/app/tls#k")
        .env("VAULT_ADDR", &bao.https_addr())
        .env("VAULT_CACERT", ca.to_str().expect("utf-8 path"))
        .start();
    assert_eq!(
        read(trusted.file("f")).unwrap_or_else(|e| panic!("{e}\n{}", trusted.logs())),
        b"over-tls"
    );

    let untrusted = Mount::builder(&bao)
        .secret("f=secret/app/tls#k")
        .env("VAULT_ADDR", &bao.https_addr())
        .start();
    let err = read(untrusted.file("f")).expect_err("an unknown CA is refused");
    assert_eq!(errno_of(&err), libc::EIO, "{err:?}");
    let logs = untrusted.logs();
    assert!(
        logs.contains("certificate") && logs.contains("UnknownIssuer"),
        "the log names the TLS failure:\n{logs}"
    );
}

/// A listener that counts connections and answers each with `answer` (then closes).
fn listen(answer: String) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (port, connections)
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_redirect_is_not_followed_and_the_read_fails_cleanly() {
    require_root();
    // The real server is only needed by the harness; vaultfs talks to the stand-ins.
    let bao = Bao::start();
    let ok = "{\"data\":{\"data\":{\"k\":\"stolen\"},\"metadata\":{\"version\":1}}}";
    let (elsewhere, reached) = listen(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ok}",
        ok.len()
    ));
    let (redirector, asked) = listen(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{elsewhere}/v1/secret/data/app/x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ));
    let m = Mount::builder(&bao)
        .secret("f=secret/app/x#k")
        .env("VAULT_ADDR", &format!("http://127.0.0.1:{redirector}"))
        .start();
    let err = read(m.file("f")).expect_err("a redirect is an error");
    assert_eq!(errno_of(&err), libc::EIO, "{err:?}");
    assert!(
        asked.load(Ordering::SeqCst) > 0,
        "vaultfs asked the redirector"
    );
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "vaultfs followed the redirect"
    );
    let logs = m.logs();
    assert!(
        logs.contains("HTTP 307") && logs.contains("does not follow redirects"),
        "the log explains the failure:\n{logs}"
    );
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn forbidden_reads_by_a_role_denied_lookup_self_log_in_at_most_once_per_5s() {
    require_root();
    let bao = Bao::start();
    let dir = tempfile::tempdir().expect("temp dir");
    bao.put_policy(
        "no-lookup",
        r#"path "auth/token/lookup-self" { capabilities = ["deny"] }
           path "secret/data/app/*" { capabilities = ["read"] }"#,
    );
    let (role_id, secret_id_file) = bao.approle(dir.path(), "locked", &["no-lookup"], None);
    bao.kv_put("secret/locked/x", &[("k", "not-for-this-role")]);
    let m = Mount::builder(&bao)
        .token("")
        .secret("f=secret/locked/x#k")
        .args(["--auth", "approle", "--role", &role_id, "--secret-id-file"])
        .args([secret_id_file.to_str().expect("utf-8 path")])
        .args(["--cache-ttl", "1s"])
        .start();

    let run_for = Duration::from_secs(16);
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < run_for {
        let err = read(m.file("f")).expect_err("the policy forbids the secret");
        assert_eq!(
            errno_of(&err),
            libc::EACCES,
            "{err:?}\nvaultfs log:\n{}",
            m.logs()
        );
        reads += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let mut logins: Vec<f64> = bao
        .audit_entries()
        .iter()
        .filter(|e| e["type"] == "request" && e["request"]["path"] == "auth/approle/login")
        .map(audit_time)
        .collect();
    logins.sort_by(f64::total_cmp);
    let vault_reads = bao.secret_reads("secret/locked/x");
    eprintln!("{reads} reads, {vault_reads} reached Vault, logins at {logins:?}");
    assert!(vault_reads >= 3, "the forbidden reads reached Vault");
    for pair in logins.windows(2) {
        assert!(
            pair[1] - pair[0] >= 4.9,
            "two logins {:.2} s apart: {logins:?}",
            pair[1] - pair[0]
        );
    }
    assert!(
        logins.len() <= 1 + (run_for.as_secs() as usize) / 5,
        "{} logins in {run_for:?}",
        logins.len()
    );
}
