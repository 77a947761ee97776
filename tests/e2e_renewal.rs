//! End-to-end test of Vault token renewal pacing: the real `vaultfs` binary mounted as root,
//! logging in with AppRole to a real OpenBao dev server whose role issues tokens with a 6 s TTL
//! and a 20 s max TTL, read every 100 ms for 45 s. OpenBao's audit log counts the renewals and
//! logins vaultfs sent.
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs it with
//! `--include-ignored`.

pub mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const TOKEN_TTL: u64 = 6;
const TOKEN_MAX_TTL: u64 = 20;
const RUN_FOR: Duration = Duration::from_secs(45);

/// Times (seconds since the epoch) of the audited requests to `path`.
fn request_times(bao: &Bao, path: &str) -> Vec<f64> {
    let mut times: Vec<f64> = bao
        .audit_entries()
        .iter()
        .filter(|e| e["type"] == "request" && e["request"]["path"] == path)
        .map(audit_time)
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// The most requests among `times` within any one second.
fn busiest_second(times: &[f64]) -> usize {
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < 1.0)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// An AppRole role whose tokens may read `secret/app/*`, with a short TTL and max TTL; its
/// role id and a file holding a fresh secret id.
fn approle(bao: &Bao, dir: &std::path::Path) -> (String, std::path::PathBuf) {
    bao.put_policy(
        "app-read",
        r#"path "secret/data/app/*" { capabilities = ["read"] }
           path "secret/metadata/app/*" { capabilities = ["read"] }"#,
    );
    bao.approle(
        dir,
        "app",
        &["app-read"],
        Some((
            Duration::from_secs(TOKEN_TTL),
            Duration::from_secs(TOKEN_MAX_TTL),
        )),
    )
}

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn token_renewal_is_paced_and_stops_at_the_max_ttl_with_one_login_per_period() {
    require_root();
    let bao = Bao::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (role_id, secret_id_file) = approle(&bao, dir.path());
    bao.kv_put("secret/app/db", &[("password", "pw-1")]);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::builder(&bao)
        .token("")
        .secret("db/password=secret/app/db#password")
        .args(["--auth", "approle", "--role", &role_id, "--secret-id-file"])
        .args([secret_id_file.to_str().expect("utf-8 path")])
        .args(["--cache-ttl", "2s", "--metrics-addr", &metrics_addr])
        .rust_log("info,vaultfs=debug")
        .start();

    let started = Instant::now();
    let (mut reads, mut failures) = (0, Vec::new());
    while started.elapsed() < RUN_FOR {
        match read(m.file("db/password")) {
            Ok(v) if v == b"pw-1" => {}
            Ok(v) => failures.push(format!("wrong content ({} bytes)", v.len())),
            Err(e) => failures.push(format!("{e} at {:?}", started.elapsed())),
        }
        reads += 1;
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failures.is_empty(),
        "{} of {reads} reads failed: {failures:?}\nvaultfs log:\n{}",
        failures.len(),
        m.logs()
    );

    let renewals = request_times(&bao, "auth/token/renew-self");
    let logins = request_times(&bao, "auth/approle/login");
    let span = RUN_FOR.as_secs_f64();
    let context = || format!("renewals at {renewals:?}, logins at {logins:?}");
    eprintln!(
        "{reads} reads, none failed; {} renew-self calls (at most {} within one second), {} logins in {span} s",
        renewals.len(),
        busiest_second(&renewals),
        logins.len()
    );
    assert!(
        renewals.len() as f64 <= span / 2.0,
        "{} renewals in {span} s, more than one per 2 s; {}",
        renewals.len(),
        context()
    );
    assert!(
        busiest_second(&renewals) <= 2,
        "{} renewals within one second; {}",
        busiest_second(&renewals),
        context()
    );
    // Tokens live at most 20 s, so 45 s of reads need a login in each of three periods, and
    // pacing means no more than that.
    let periods = (span / TOKEN_MAX_TTL as f64).ceil() as usize;
    assert_eq!(
        logins.len(),
        periods,
        "expected one login per {TOKEN_MAX_TTL} s max-TTL period; {}",
        context()
    );
    assert!(
        !renewals.is_empty(),
        "the token was never renewed; {}",
        context()
    );

    // The daemon's own counters say the same as Vault's audit log.
    let text = http_get(&metrics_addr, "/metrics");
    let volume = m.path().display().to_string();
    let series = |name: &str| metric_value(&text, &format!("{name}{{volume=\"{volume}\"}}"));
    assert_eq!(
        series("vaultfs_vault_logins_total") as usize,
        logins.len(),
        "{text}"
    );
    assert_eq!(
        series("vaultfs_vault_token_renewals_total") as usize,
        renewals.len(),
        "{text}"
    );
}
