//! End-to-end tests of the limits that keep one volume from hurting the others: rate-limited
//! failure logs next to complete audit trails. The real `vaultfs` binary, real FUSE, real
//! OpenBao.
//!
//! Ignored by default (needs root, `/dev/fuse` and `bao`); `scripts/test.sh` runs them with
//! `--include-ignored`.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "needs root, /dev/fuse, bao"]
fn a_looped_forbidden_read_logs_a_bounded_number_of_warnings_and_audits_every_attempt() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("password", "db-pass")]);
    bao.put_policy(
        "only-other",
        r#"path "secret/data/other/*" { capabilities = ["read"] }"#,
    );
    let token = bao.create_token(&["only-other"]);
    let m = Mount::builder(&bao)
        .token(&token)
        .secret("denied=secret/app/db#password")
        .args(["--cache-ttl", "1s"])
        .start();

    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < run_for {
        let err = read(m.file("denied")).expect_err("the secret is outside the token's policy");
        assert_eq!(errno_of(&err), libc::EACCES, "{err}");
        attempts += 1;
    }
    // The daemon writes its log lines as it answers; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(200));
    let logs = m.logs();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("request failed"))
        .count();
    let audited = logs
        .lines()
        .filter(|l| l.contains("vaultfs::audit") && l.contains("event=\"refused\""))
        .count();
    eprintln!(
        "{attempts} forbidden reads in {run_for:?}: {warnings} warnings, {audited} audit events"
    );
    assert!(
        attempts > 100,
        "only {attempts} attempts: the loop did not hammer"
    );
    assert!(
        warnings <= 2,
        "{warnings} warning lines for {attempts} identical failures in {run_for:?}"
    );
    assert!(
        warnings >= 1,
        "the failure was never logged at all:\n{logs}"
    );
    assert_eq!(
        audited, attempts,
        "every refused access is one audit event, never rate-limited"
    );
    assert!(
        logs.lines().any(|l| l.contains("request failed")
            && l.contains("file=\"denied\"")
            && l.contains("vault_path=\"secret/app/db\"")),
        "the warning names the file and Vault path:\n{logs}"
    );
}
