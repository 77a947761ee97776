//! End-to-end tests of template entries: the real `vaultfs` binary mounted as root against a
//! real OpenBao dev server (and, for dynamic credentials, a throw-away PostgreSQL). A template
//! over two secrets renders lazily and follows a rotation of either within the TTL; a dynamic
//! database secret used twice in one template yields one lease's matching username and
//! password, which log in; a syntax error is refused before mounting with line and column; a
//! missing field gives ENOENT and a log line naming it; a runaway template stops at its fuel
//! limit without holding up the volume's other files.

pub mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{enable_database_engine, Postgres, CREDS_PATH};
use common::*;

/// Writes `text` to a template file in `dir` and returns the `--template NAME=FILE` value.
fn template_arg(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let file = dir.path().join(format!("{}.tmpl", name.replace('/', "_")));
    fs::write(&file, text).expect("write the template file");
    format!("{name}={}", file.display())
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn a_template_over_two_secrets_renders_lazily_and_follows_a_rotation_of_either() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("user", "wizard"), ("password", "pw-1")]);
    bao.kv_put("secret/app/host", &[("name", "postgres")]);
    let dir = tempfile::tempdir().unwrap();
    let conn = template_arg(
        &dir,
        "db/url",
        "postgresql://{{ secret('secret/app/db').user }}:{{ secret('secret/app/db').password }}@{{ secret('secret/app/host').name }}:5432/wizard\n",
    );
    let env = template_arg(
        &dir,
        "app.env",
        "{% set db = secret('secret/app/db') %}DB_USER={{ db.user }}\nDB_PASSWORD={{ db.password }}\nDB_PASSWORD_B64={{ db.password | b64encode }}\n",
    );
    let m = Mount::builder(&bao)
        .args(["--template", &conn, "--template", &env])
        .secret("db/password=secret/app/db#password")
        .args(["--cache-ttl", "1s"])
        .start();
    let reads = |p: &str| bao.audit_reads(&bao.data_path(p));
    assert_eq!(
        (reads("secret/app/db"), reads("secret/app/host")),
        (0, 0),
        "mounting read a secret"
    );
    assert_eq!(list_dir(m.path()), ["app.env", "db"]);
    let url = m.file("db/url");
    assert_eq!(
        read_string(&url),
        "postgresql://wizard:pw-1@postgres:5432/wizard\n"
    );
    assert_eq!(
        metadata(&url).unwrap().len(),
        "postgresql://wizard:pw-1@postgres:5432/wizard\n".len() as u64,
        "stat shows the rendered size"
    );
    assert_eq!(
        read_string(m.file("app.env")),
        "DB_USER=wizard\nDB_PASSWORD=pw-1\nDB_PASSWORD_B64=cHctMQ==\n"
    );
    assert_eq!(read_string(m.file("db/password")), "pw-1");
    assert_eq!(
        reads("secret/app/db"),
        1,
        "two templates and a plain file on one path share one Vault read"
    );
    let ino = metadata(&url).unwrap().ino();

    let wait_for = |what: &str, want: &str| {
        let started = Instant::now();
        let seen = poll(
            Duration::from_secs(2),
            Duration::from_millis(20),
            || match read(&url) {
                Ok(b) if b == want.as_bytes() => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        assert!(seen.is_ok(), "{what}: not seen within TTL + 1 s: {seen:?}");
        eprintln!("{what}: seen after {:?}", started.elapsed());
    };
    bao.kv_put("secret/app/host", &[("name", "pg-replica")]);
    wait_for(
        "a rotation of the host secret",
        "postgresql://wizard:pw-1@pg-replica:5432/wizard\n",
    );
    bao.kv_put(
        "secret/app/db",
        &[("user", "wizard"), ("password", "pw-2-longer")],
    );
    wait_for(
        "a rotation of the db secret",
        "postgresql://wizard:pw-2-longer@pg-replica:5432/wizard\n",
    );
    assert_eq!(metadata(&url).unwrap().ino(), ino, "the inode is kept");
    assert!(read_string(m.file("app.env")).contains("DB_PASSWORD=pw-2-longer\n"));
}

#[test]
#[ignore = "needs root, /dev/fuse, bao and PostgreSQL"]
fn a_dynamic_database_secret_used_twice_in_one_template_is_one_lease_that_logs_in() {
    require_root();
    let pg = Postgres::start();
    let bao = Bao::start();
    enable_database_engine(&bao, &pg, Duration::from_secs(60), Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let creds = template_arg(
        &dir,
        "db.env",
        &format!(
            "PGUSER={{{{ secret('{CREDS_PATH}').username }}}}\nPGPASSWORD={{{{ secret('{CREDS_PATH}').password }}}}\n"
        ),
    );
    let m = Mount::builder(&bao)
        .args(["--template", &creds, "--cache-ttl", "1h"])
        .start();
    let text = read_string(m.file("db.env"));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in the rendered file"))
            .to_string()
    };
    let (user, password) = (field("PGUSER"), field("PGPASSWORD"));
    assert_eq!(
        bao.audit_reads(CREDS_PATH),
        1,
        "both references share one read, so one lease"
    );
    if let Err(e) = pg.try_login(&user, &password) {
        panic!("the rendered username and password do not log in: {e}");
    }
    assert_eq!(read_string(m.file("db.env")), text, "re-reads are stable");
}

#[test]
#[ignore = "needs root, /dev/fuse and bao"]
fn template_errors_syntax_refused_missing_field_enoent_runaway_stopped_by_fuel() {
    require_root();
    let bao = Bao::start();
    bao.kv_put("secret/app/db", &[("user", "wizard")]);
    let dir = tempfile::tempdir().unwrap();

    // A syntax error is refused before mounting, naming the entry, line and column.
    let broken = template_arg(
        &dir,
        "broken",
        "ok line\nuser={{ secret('secret/app/db').user }\n",
    );
    let out = Command::new(vaultfs_bin())
        .args(["mount", dir.path().to_str().unwrap(), "--template", &broken])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .output()
        .expect("run vaultfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit status; stderr:\n{stderr}");
    assert!(
        stderr.contains("\"broken\"") && stderr.contains("line 2, column"),
        "{stderr}"
    );

    let typo = template_arg(&dir, "typo", "{{ secret('secret/app/db').pasword }}");
    let runaway = template_arg(
        &dir,
        "runaway",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    );
    let m = Mount::builder(&bao)
        .args(["--template", &typo, "--template", &runaway])
        .secret("user=secret/app/db#user")
        .start();
    let err = read(m.file("typo")).expect_err("a missing field must not render");
    assert_eq!(errno_of(&err), libc::ENOENT, "{err}");
    let started = Instant::now();
    let err = read(m.file("runaway")).expect_err("a runaway template must stop");
    let stopped_after = started.elapsed();
    assert_eq!(errno_of(&err), libc::EIO, "{err}");
    // While the runaway one is tried again and again, the other file keeps answering.
    let hammer = std::thread::spawn({
        let path = m.file("runaway");
        move || {
            for _ in 0..20 {
                let _ = std::fs::read(&path);
            }
        }
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(read_string(m.file("user")), "wizard");
        slowest = slowest.max(t.elapsed());
    }
    hammer.join().unwrap();
    eprintln!(
        "the runaway template failed after {stopped_after:?}; the slowest read of another file \
         meanwhile took {slowest:?}"
    );
    let logs = m.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("file=\"typo\"")
                && l.contains("no field \"pasword\" of secret/app/db")),
        "no log line names the missing field:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("file=\"runaway\"") && l.contains("ran out of fuel")),
        "no log line says the template ran out of fuel:\n{logs}"
    );
}
