//! Where a semantics test's secrets come from, so that one test body runs over two backends,
//! as mountpoint-s3 runs its read tests over a mock client and over S3:
//!
//! * [`MockBackend`]: the kernel-in-the-loop tier. A volume is built with `Volume::build` over
//!   an in-memory `MockSource` and mounted with `mount::mount` in this process: real FUSE and
//!   real kernel caches, no OpenBao, no daemon binary. Its requests are counted per path by
//!   [`CountingSource`].
//! * [`OpenBaoBackend`]: the end-to-end tier. A real OpenBao dev server and the `vaultfs mount`
//!   binary; its requests are counted from OpenBao's audit log.
//!
//! The same [`Settings`] become a `VolumeConfig` for the one and command-line flags for the
//! other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use vaultfs::cache::CacheConfig;
use vaultfs::fs::Consistency;
use vaultfs::metrics::Metrics;
use vaultfs::mount::{self, KernelNotifier, MountConfig};
use vaultfs::secret::Token;
use vaultfs::source::mock::MockSource;
use vaultfs::source::{Fetched, Identity, Lease, SecretSource, SourceError, Version};
use vaultfs::spec::{parse_secret_arg, SecretPath, VolumeSpec};
use vaultfs::volume::{Serving, Volume, VolumeConfig};

use super::bao::{Bao, Paused};
use super::daemon::Mount;
use super::http::{free_port, http_get, metric_value};
use super::process::require_root;

/// A volume's settings in a semantics test: its consistency mode and its cache's times
/// (`None`: the default of `vaultfs mount`).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub consistency: Consistency,
    pub cache_ttl: Duration,
    pub max_stale: Option<Duration>,
    pub vault_timeout: Option<Duration>,
}

impl Settings {
    /// `mode` (`"cached"` or `"strict"`) with a cache TTL of `cache_ttl`.
    pub fn new(mode: &str, cache_ttl: Duration) -> Settings {
        let consistency = match mode {
            "cached" => Consistency::Cached,
            "strict" => Consistency::Strict,
            other => panic!("no consistency mode {other:?}"),
        };
        Settings {
            consistency,
            cache_ttl,
            max_stale: None,
            vault_timeout: None,
        }
    }

    pub fn max_stale(self, max_stale: Duration) -> Settings {
        Settings {
            max_stale: Some(max_stale),
            ..self
        }
    }

    pub fn vault_timeout(self, vault_timeout: Duration) -> Settings {
        Settings {
            vault_timeout: Some(vault_timeout),
            ..self
        }
    }

    /// The flags of `vaultfs mount` that say the same.
    fn args(&self) -> Vec<String> {
        let mode = match self.consistency {
            Consistency::Cached => "cached",
            Consistency::Strict => "strict",
        };
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut args = vec![
            "--consistency".to_string(),
            mode.to_string(),
            "--cache-ttl".to_string(),
            ms(self.cache_ttl),
        ];
        if let Some(d) = self.max_stale {
            args.extend(["--max-stale".to_string(), ms(d)]);
        }
        if let Some(d) = self.vault_timeout {
            args.extend(["--vault-timeout".to_string(), ms(d)]);
        }
        args
    }
}

/// A mounted volume of a [`Backend`].
pub trait Served {
    /// The mount point.
    fn path(&self) -> &Path;

    /// Path of the file `name` inside the mount.
    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// What the daemon logged so far, for failure messages.
    fn logs(&self) -> String;

    /// FUSE requests of `op` the volume answered so far.
    fn fuse_ops(&self, op: &str) -> u64;
}

/// Where a volume's secrets come from in a semantics test.
pub trait Backend {
    /// Writes (or rotates) the KV v2 secret at `path`.
    fn put(&self, path: &str, pairs: &[(&str, &str)]);

    /// Deletes the secret at `path` with all its versions.
    fn delete(&self, path: &str);

    /// Mounts a volume of `secrets` (`name=path#key`, as `--secret`) with `settings`.
    fn mount(&self, secrets: &[&str], settings: Settings) -> Box<dyn Served + '_>;

    /// Requests about `path` (data reads and version checks) that reached the store so far.
    fn requests(&self, path: &str) -> usize;

    /// Freezes the store: requests get no answer (each times out) until the guard is dropped.
    fn freeze(&self) -> Box<dyn Frozen + '_>;
}

/// A frozen store, answering again once dropped.
pub trait Frozen {}

// ---------------------------------------------------------------------------------------------
// OpenBao and the vaultfs binary
// ---------------------------------------------------------------------------------------------

/// A real OpenBao dev server; volumes are `vaultfs mount` daemons.
pub struct OpenBaoBackend {
    pub bao: Bao,
}

impl OpenBaoBackend {
    pub fn start() -> OpenBaoBackend {
        require_root();
        OpenBaoBackend { bao: Bao::start() }
    }
}

/// A `vaultfs mount` daemon with its `/metrics` address.
struct Daemon {
    mount: Mount,
    metrics_addr: String,
}

impl Served for Daemon {
    fn path(&self) -> &Path {
        self.mount.path()
    }

    fn logs(&self) -> String {
        self.mount.logs()
    }

    fn fuse_ops(&self, op: &str) -> u64 {
        let text = http_get(&self.metrics_addr, "/metrics");
        metric_value(
            &text,
            &format!("vaultfs_fuse_requests_total{{op=\"{op}\"}}"),
        ) as u64
    }
}

impl Frozen for Paused<'_> {}

impl Backend for OpenBaoBackend {
    fn put(&self, path: &str, pairs: &[(&str, &str)]) {
        self.bao.kv_put(path, pairs);
    }

    fn delete(&self, path: &str) {
        self.bao.api_ok(
            "DELETE",
            &self.bao.data_path(path).replacen("/data/", "/metadata/", 1),
            None,
        );
    }

    fn mount(&self, secrets: &[&str], settings: Settings) -> Box<dyn Served + '_> {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut builder = Mount::builder(&self.bao)
            .args(["--metrics-addr", &metrics_addr])
            .args(settings.args());
        for s in secrets {
            builder = builder.secret(s);
        }
        Box::new(Daemon {
            mount: builder.start(),
            metrics_addr,
        })
    }

    fn requests(&self, path: &str) -> usize {
        let data = self.bao.data_path(path);
        let metadata = data.replacen("/data/", "/metadata/", 1);
        self.bao.audit_reads(&data) + self.bao.audit_reads(&metadata)
    }

    fn freeze(&self) -> Box<dyn Frozen + '_> {
        Box::new(self.bao.paused())
    }
}

// ---------------------------------------------------------------------------------------------
// MockSource behind an in-process FUSE mount
// ---------------------------------------------------------------------------------------------

/// A `MockSource` that also counts, per path, the requests that reached it: the fake that
/// verifies what was sent.
pub struct CountingSource {
    inner: Arc<MockSource>,
    requests: Mutex<HashMap<String, usize>>,
}

impl CountingSource {
    fn count(&self, path: &SecretPath) {
        *self
            .requests
            .lock()
            .expect("request counts")
            .entry(path.as_str().to_string())
            .or_default() += 1;
    }
}

impl SecretSource for CountingSource {
    async fn read(&self, path: &SecretPath) -> Result<Fetched, SourceError> {
        self.count(path);
        self.inner.read(path).await
    }

    async fn current_version(&self, path: &SecretPath) -> Result<Option<Version>, SourceError> {
        self.count(path);
        self.inner.current_version(path).await
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        increment: Duration,
    ) -> Result<Duration, SourceError> {
        self.inner.renew_lease(lease, increment).await
    }

    async fn revoke_lease(&self, lease: &Lease) -> Result<(), SourceError> {
        self.inner.revoke_lease(lease).await
    }

    fn server_recoveries(&self) -> u64 {
        self.inner.server_recoveries()
    }
}

impl Identity for CountingSource {
    async fn login(&self) -> Result<(), SourceError> {
        self.inner.login().await
    }

    fn set_credential(&self, credential: Token) {
        self.inner.set_credential(credential);
    }

    async fn serve(self: Arc<Self>, paths: Vec<SecretPath>) {
        self.inner.clone().serve(paths).await;
    }

    async fn revoke(&self) {
        self.inner.revoke().await;
    }
}

/// The kernel-in-the-loop tier: volumes built with `Volume::build` over one [`CountingSource`]
/// and mounted in this process.
pub struct MockBackend {
    source: Arc<CountingSource>,
    runtime: tokio::runtime::Runtime,
}

/// How long a frozen mock store keeps a request waiting: longer than any test runs, so each
/// request ends at the volume's Vault timeout, as with a frozen OpenBao.
const FROZEN_FOR: Duration = Duration::from_secs(3600);

impl MockBackend {
    pub fn start() -> MockBackend {
        require_root();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        MockBackend {
            source: Arc::new(CountingSource {
                inner: Arc::new(MockSource::new()),
                requests: Mutex::new(HashMap::new()),
            }),
            runtime,
        }
    }
}

/// A volume over the mock, mounted and serving in this process; torn down (unmounted) on drop.
struct InProcess<'a> {
    serving: Option<Serving<CountingSource>>,
    metrics: Arc<Metrics>,
    runtime: &'a tokio::runtime::Runtime,
    // Declared last: removed once the volume is unmounted.
    dir: TempDir,
}

impl Served for InProcess<'_> {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn logs(&self) -> String {
        "(a volume over MockSource in the test process: no daemon log)".to_string()
    }

    fn fuse_ops(&self, op: &str) -> u64 {
        metric_value(
            &self.metrics.render(),
            &format!("vaultfs_fuse_requests_total{{op=\"{op}\"}}"),
        ) as u64
    }
}

impl Drop for InProcess<'_> {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            if let Err(e) = self.runtime.block_on(serving.tear_down()) {
                eprintln!("unmounting {}: {e}", self.dir.path().display());
            }
        }
    }
}

/// Unfreezes the mock store when dropped, and reports the server back (the source's
/// `server_recoveries` counts one more), as Vault's source does once its server answers
/// again: a volume backing off after the outage then asks again at once.
struct Thaw<'a>(&'a MockSource);

impl Frozen for Thaw<'_> {}

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.set_latency(Duration::ZERO);
        self.0.set_server_down();
        self.0.set_server_up();
    }
}

impl Backend for MockBackend {
    fn put(&self, path: &str, pairs: &[(&str, &str)]) {
        self.source.inner.put(path, pairs);
    }

    fn delete(&self, path: &str) {
        self.source.inner.delete(path);
    }

    fn mount(&self, secrets: &[&str], settings: Settings) -> Box<dyn Served + '_> {
        let entries = secrets
            .iter()
            .map(|s| parse_secret_arg(s).unwrap_or_else(|e| panic!("--secret {s}: {e}")))
            .collect();
        let spec = VolumeSpec::new(entries).expect("a valid volume spec");
        let defaults = CacheConfig::default();
        let metrics = Arc::new(Metrics::new());
        let kernel = KernelNotifier::new();
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-mock-")
            .tempdir()
            .expect("mount point");
        let _entered = self.runtime.enter();
        let volume = Volume::build(
            self.source.clone(),
            spec,
            VolumeConfig {
                name: dir.path().display().to_string(),
                pod: None,
                cache: CacheConfig::new(
                    settings.cache_ttl,
                    settings.max_stale.unwrap_or(defaults.max_stale),
                    settings.vault_timeout.unwrap_or(defaults.vault_timeout),
                    defaults.max_entries.get(),
                    defaults.max_bytes,
                ),
                // SAFETY: geteuid/getegid cannot fail and take no arguments.
                uid: unsafe { libc::geteuid() },
                // SAFETY: as above.
                gid: unsafe { libc::getegid() },
                file_mode: 0o440,
                consistency: settings.consistency,
                reload: None,
            },
            kernel.for_volume(vaultfs::slot::Slot::SINGLE),
            &metrics,
        );
        let mounted = mount::mount(
            volume.fs(),
            dir.path(),
            &MountConfig::default(),
            self.runtime.handle().clone(),
            metrics.clone(),
            &kernel,
        )
        .unwrap_or_else(|e| panic!("mounting a volume over MockSource: {e}"));
        Box::new(InProcess {
            serving: Some(volume.serve(Box::new(mounted))),
            metrics,
            runtime: &self.runtime,
            dir,
        })
    }

    fn requests(&self, path: &str) -> usize {
        self.source
            .requests
            .lock()
            .expect("request counts")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn freeze(&self) -> Box<dyn Frozen + '_> {
        self.source.inner.set_latency(FROZEN_FOR);
        Box::new(Thaw(&self.source.inner))
    }
}
