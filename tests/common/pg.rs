//! A throw-away PostgreSQL server for the lease tests, and OpenBao's `database` secrets engine
//! pointed at it, so vaultfs is tested against real dynamic credentials.
//!
//! * [`Postgres`] runs `initdb` and `postgres` from the Debian `postgresql` package
//!   (`/usr/lib/postgresql/<version>/bin`) as the unprivileged `postgres` system user (PostgreSQL
//!   refuses to run as root), in a fresh temporary directory, listening only on `127.0.0.1` on a
//!   free port with its unix socket inside that directory. A superuser logs in with a password
//!   (`scram-sha-256`) over TCP, which is how OpenBao's PostgreSQL plugin connects. On drop the
//!   server is shut down at once (`SIGQUIT`, what `pg_ctl stop -m immediate` sends) and its
//!   directory removed, also when the test panics; it also receives `SIGQUIT` if the test thread
//!   that started it dies first.
//! * [`enable_database_engine`] mounts `database/` on a [`Bao`] server with the connection
//!   `database/config/pg` and the role `database/roles/app`, whose credentials are read at
//!   `database/creds/app`.
//!
//! All `psql` calls are bounded in time so a stuck server fails the test instead of hanging it.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tempfile::TempDir;

use super::{
    die_with_parent, free_port_pair, poll, read_lossy, send_signal, wait_timeout, within, Bao,
};

/// Name of the OpenBao database connection created by [`enable_database_engine`].
pub const DB_CONNECTION: &str = "pg";
/// Name of the OpenBao database role created by [`enable_database_engine`].
pub const DB_ROLE: &str = "app";
/// API path (and vaultfs secret path) of the role's dynamic credentials.
pub const CREDS_PATH: &str = "database/creds/app";

/// How long the server may take to accept a password login after being started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one `psql` run (its connection attempt alone is limited to 5 s).
const PSQL_TIMEOUT: Duration = Duration::from_secs(20);

/// Variables of the test runner's environment that would redirect or alter `psql`/`postgres`.
const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGOPTIONS",
    "PGDATA",
    "PGCONNECT_TIMEOUT",
    "PSQLRC",
    "PGAPPNAME",
];

/// The directory holding `initdb`, `postgres` and `psql`: `$VAULTFS_TEST_PG_BIN` if set, else
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VAULTFS_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let base = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(base).ok().and_then(|rd| {
        rd.filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
    });
    newest.unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server found under {}/<version>/bin; install the apt package \
             `postgresql` (scripts/install-deps.sh) or set VAULTFS_TEST_PG_BIN",
            base.display()
        )
    })
}

/// uid and gid of the unprivileged account the server runs as: `postgres` (created by the
/// Debian package), else `nobody`.
fn server_account() -> (u32, u32, &'static str) {
    for name in ["postgres", "nobody"] {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: `c` is a valid C string; the returned record is read before any other
        // passwd call on this thread.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: a non-null result points at a valid passwd record.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            if uid != 0 {
                return (uid, gid, name);
            }
        }
    }
    panic!("neither a `postgres` nor a `nobody` account exists to run PostgreSQL as");
}

/// A password that differs between runs (the server only listens on loopback and lives for
/// one test; this just keeps it from being a constant).
fn fresh_password() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("pw-{:x}-{:x}", std::process::id(), nanos)
}

/// A running throw-away PostgreSQL server (see the module documentation).
pub struct Postgres {
    child: Child,
    port: u16,
    bin: PathBuf,
    superuser: String,
    password: String,
    log_path: PathBuf,
    // Declared last: removed only after Drop has stopped the server.
    dir: TempDir,
}

impl Postgres {
    /// Initialises a cluster and starts the server, waiting until the superuser can log in
    /// with its password over TCP.
    pub fn start() -> Postgres {
        let bin = pg_bin_dir();
        let (uid, gid, account) = server_account();
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-pg-")
            .tempdir()
            .expect("create PostgreSQL directory");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to {account}: {e}", dir.path().display()));
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        fs::create_dir(&sockets).expect("create socket directory");
        std::os::unix::fs::chown(&sockets, Some(uid), Some(gid)).expect("chown socket directory");

        let superuser = "vaultfs_admin".to_string();
        let password = fresh_password();
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{password}\n")).expect("write password file");
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown password file");

        // initdb: local (unix socket) logins are trusted, TCP logins need the password.
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(&data)
            .arg("--username")
            .arg(&superuser)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]);
        as_server_user(&mut initdb, uid, gid, dir.path());
        let out = within("initdb", Duration::from_secs(120), move || initdb.output())
            .unwrap_or_else(|e| panic!("run {}: {e}", bin_name(&bin, "initdb")));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_file(&pwfile);

        let port = free_port_pair();
        let log_path = dir.path().join("postgres.log");
        let log = File::create(&log_path).expect("create server log");
        let log2 = log.try_clone().expect("dup server log");
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&sockets)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=40",
                "-c",
                "shared_buffers=16MB",
                "-c",
                "logging_collector=off",
                "-c",
                "log_connections=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Out of the test runner's process group: a Ctrl-C there reaches the test, whose
            // guard then shuts the server down.
            .process_group(0);
        as_server_user(&mut cmd, uid, gid, dir.path());
        // Immediate shutdown if the test thread goes away without dropping the guard.
        die_with_parent(&mut cmd, libc::SIGQUIT);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin_name(&bin, "postgres")));
        let mut pg = Postgres {
            child,
            port,
            bin,
            superuser,
            password,
            log_path,
            dir,
        };

        let ready = poll(START_TIMEOUT, Duration::from_millis(100), || {
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!(
                    "postgres exited with {status} before accepting logins; its log:\n{}",
                    pg.logs()
                );
            }
            let (user, password) = (pg.superuser.clone(), pg.password.clone());
            match pg.psql_as(&user, &password, "SELECT 1;") {
                Ok(out) if out.trim() == "1" => Ok(()),
                Ok(out) => Err(format!("unexpected answer {out:?}")),
                Err(e) => Err(e),
            }
        });
        if let Err(last) = ready {
            panic!(
                "postgres did not accept a password login within {START_TIMEOUT:?} \
                 (last attempt: {last}); its log:\n{}",
                pg.logs()
            );
        }
        pg
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser name (logs in with [`Postgres::password`] over TCP).
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Connection URL template for OpenBao's PostgreSQL plugin (it substitutes `{{username}}`
    /// and `{{password}}` with the configured superuser).
    pub fn connection_url(&self) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// The directory holding the cluster, the socket and the server log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server has logged so far.
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Runs `sql` with `psql` over TCP as the superuser; returns its unaligned, tuples-only
    /// output. Panics (with the error) if it fails.
    pub fn query(&self, sql: &str) -> String {
        self.psql_as(&self.superuser, &self.password, sql)
            .unwrap_or_else(|e| panic!("psql as the superuser failed: {e}\nquery: {sql}"))
    }

    /// Whether a role (user) named `name` exists (`pg_roles`).
    pub fn role_exists(&self, name: &str) -> bool {
        let out = self.query_with_name(
            "SELECT count(*) FROM pg_roles WHERE rolname = :'name';",
            name,
        );
        match out.trim() {
            "0" => false,
            "1" => true,
            other => panic!("unexpected answer {other:?} about role {name:?}"),
        }
    }

    /// `rolvaliduntil` of the role `name` as PostgreSQL prints it (`None` if the role does not
    /// exist, `Some("")` if its password never expires).
    pub fn role_valid_until(&self, name: &str) -> Option<String> {
        let out = self.query_with_name(
            "SELECT coalesce(rolvaliduntil::text, '') FROM pg_roles WHERE rolname = :'name';",
            name,
        );
        out.lines().next().map(|l| l.trim().to_string())
    }

    /// Whether `user` can log in over TCP with `password` and run a query.
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        self.try_login(user, password).is_ok()
    }

    /// Logs in as `user` with `password` over TCP and runs `SELECT current_user`; the error is
    /// psql's message (e.g. `password authentication failed for user ...`).
    pub fn try_login(&self, user: &str, password: &str) -> Result<(), String> {
        let out = self.psql_as(user, password, "SELECT current_user;")?;
        if out.trim() == user {
            Ok(())
        } else {
            Err(format!("logged in but current_user is {:?}", out.trim()))
        }
    }

    /// Runs `sql` (which may use `:'name'`, bound to `name` with proper quoting) as the
    /// superuser.
    fn query_with_name(&self, sql: &str, name: &str) -> String {
        let run = self.run_psql(
            &self.superuser,
            &self.password,
            &["-v", &format!("name={name}")],
            sql,
        );
        run.unwrap_or_else(|e| panic!("psql as the superuser failed: {e}\nquery: {sql}"))
    }

    fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        self.run_psql(user, password, &[], sql)
    }

    /// One `psql` run over TCP; the SQL goes through stdin so `-v` variables are interpolated.
    fn run_psql(
        &self,
        user: &str,
        password: &str,
        extra: &[&str],
        sql: &str,
    ) -> Result<String, String> {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-w"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", user, "-d", "postgres"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        cmd.env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGSSLMODE", "disable");
        let sql = sql.to_string();
        let out: Output = within("psql", PSQL_TIMEOUT, move || -> std::io::Result<Output> {
            use std::io::Write;
            let mut child = cmd.spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(sql.as_bytes())?;
            }
            child.wait_with_output()
        })
        .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "psql exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGQUIT: immediate shutdown (`pg_ctl stop -m immediate`).
            let _ = send_signal(self.child.id() as i32, libc::SIGQUIT);
            if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
                // Its backends notice the postmaster is gone and exit by themselves.
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn bin_name(bin: &Path, name: &str) -> String {
    bin.join(name).display().to_string()
}

/// Runs `cmd` as the unprivileged server account from `cwd`, with a clean locale and no PG*
/// variables from the test runner.
fn as_server_user(cmd: &mut Command, uid: u32, gid: u32, cwd: &Path) {
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    cmd.uid(uid)
        .gid(gid)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env("HOME", cwd);
}

/// Mounts OpenBao's `database` secrets engine at `database/`, connects it to `pg` as
/// [`DB_CONNECTION`] (the connection is verified) and creates the role [`DB_ROLE`], whose
/// credentials ([`CREDS_PATH`]) are new PostgreSQL login roles with a password valid until the
/// lease expires, leased for `default_ttl` and renewable up to `max_ttl` after issue.
pub fn enable_database_engine(bao: &Bao, pg: &Postgres, default_ttl: Duration, max_ttl: Duration) {
    bao.api_ok(
        "POST",
        "sys/mounts/database",
        Some(json!({ "type": "database" })),
    );
    bao.api_ok(
        "POST",
        &format!("database/config/{DB_CONNECTION}"),
        Some(json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": pg.connection_url(),
            "username": pg.superuser(),
            "password": pg.password(),
            "allowed_roles": [DB_ROLE],
            "verify_connection": true,
        })),
    );
    bao.api_ok(
        "POST",
        &format!("database/roles/{DB_ROLE}"),
        Some(json!({
            "db_name": DB_CONNECTION,
            "creation_statements": [
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' \
                 VALID UNTIL '{{expiration}}';"
            ],
            "default_ttl": format!("{}s", default_ttl.as_secs()),
            "max_ttl": format!("{}s", max_ttl.as_secs()),
        })),
    );
}
