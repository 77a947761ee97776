//! The `vaultfs` command line: parses and validates arguments, sets up logging and the
//! runtime, and hands over to `app`. Bad arguments exit with status 2 before anything is
//! mounted.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use vaultfs::app::{self, MountSettings};
use vaultfs::config::{self, parse_duration, parse_file_mode};
use vaultfs::mount::MountError;
use vaultfs::secret::Token;
use vaultfs::source::vault::{
    Auth, Credential, LoginMethod, ServerConfig, ServerLimits, VaultConfigError,
};
use vaultfs::spec::{self, VolumeSpec};

#[derive(Parser)]
#[command(
    name = "vaultfs",
    version,
    about = "Vault/OpenBao secrets as a lazy, hot-swapping FUSE filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a volume of secrets in the foreground; SIGINT/SIGTERM unmounts and exits 0.
    Mount(MountArgs),
    /// Serve the Kubernetes CSI node plugin (Identity + Node) on a unix socket.
    Csi(CsiArgs),
    /// Hold the node's live FUSE connections and the volumes' Vault sessions (tokens, leased values) across daemon restarts, in memory only; reads no FUSE request.
    Keeper(KeeperArgs),
    /// Render templates sent on stdin (started by the daemon, under its memory limit).
    #[command(hide = true)]
    RenderWorker(RenderWorkerArgs),
}

#[derive(Args)]
struct RenderWorkerArgs {
    /// Lock the worker's memory (the daemon runs with --lock-memory).
    #[arg(long)]
    lock_memory: bool,
}

#[derive(Args)]
struct KeeperArgs {
    /// Unix socket daemons hand connections over on (replaced if present; only root with CAP_SYS_ADMIN, as the plugin runs, may use it).
    #[arg(long, default_value = vaultfs::keeper::DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Lock the keeper's memory so the tokens it holds are never swapped out (needs CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK).
    #[arg(long)]
    lock_memory: bool,
    /// Log line format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Args)]
struct CsiArgs {
    /// gRPC endpoint kubelet connects to.
    #[arg(long, default_value = vaultfs::csi::DEFAULT_ENDPOINT, value_name = "unix:///PATH")]
    endpoint: String,
    /// This node's name, as kubelet knows it.
    #[arg(long, value_name = "NAME")]
    node_id: String,
    /// Directory for per-volume state (must be tmpfs-backed, e.g. /run/vaultfs).
    #[arg(long, default_value = vaultfs::csi::DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// Directory the node's FUSE connections are mounted under (default: --state-dir). Must
    /// outlive the plugin's container and share mounts with the host: in Kubernetes a hostPath
    /// mounted with Bidirectional propagation, so that a restarted plugin still publishes new
    /// volumes on the connection it takes over.
    #[arg(long, value_name = "DIR")]
    connections_dir: Option<PathBuf>,
    /// Default Vault server for volumes (default: $VAULT_ADDR).
    #[arg(long, value_name = "URL")]
    vault_addr: Option<String>,
    /// An extra Vault server volumes may pick with the vaultServer attribute.
    #[arg(long = "vault-server", value_name = "NAME=URL")]
    vault_servers: Vec<String>,
    /// Vault namespace (default: $VAULT_NAMESPACE).
    #[arg(long, value_name = "NS")]
    vault_namespace: Option<String>,
    /// PEM file of CA certificates for Vault's TLS (default: $VAULT_CACERT).
    #[arg(long, value_name = "FILE")]
    vault_cacert: Option<PathBuf>,
    /// Longest wait for Vault before an uncached read fails with EIO.
    #[arg(long, default_value = config::DEFAULT_VAULT_TIMEOUT.text, value_parser = parse_duration, value_name = "DURATION")]
    vault_timeout: Duration,
    /// Most secrets held in memory per volume.
    #[arg(long, default_value_t = config::DEFAULT_CSI_CACHE_MAX_ENTRIES, value_name = "N")]
    cache_max_entries: usize,
    /// Most secret bytes held in memory per volume.
    #[arg(long, default_value_t = config::DEFAULT_CSI_CACHE_MAX_BYTES, value_name = "BYTES")]
    cache_max_bytes: usize,
    /// Shortest cacheTTL a volume may ask for; shorter ones are refused at publish.
    #[arg(long, default_value = config::DEFAULT_MIN_CACHE_TTL.text, value_parser = parse_duration, value_name = "DURATION")]
    min_cache_ttl: Duration,
    /// Most volumes served at once; publishes past it fail with ResourceExhausted.
    #[arg(long, default_value_t = vaultfs::csi::DEFAULT_MAX_VOLUMES, value_name = "N")]
    max_volumes: usize,
    /// Most files one volume may declare; larger volumes fail with ResourceExhausted.
    #[arg(long, default_value_t = vaultfs::csi::DEFAULT_MAX_ENTRIES, value_name = "N")]
    max_volume_entries: usize,
    /// Let volumes set reloadSignal/reloadProcess: after a change, signal the pod's processes of
    /// that name (needs hostPID: true); without it such volumes are refused at publish.
    #[arg(long)]
    allow_reload_signals: bool,
    /// Volumes of one identity (Vault server, auth mount, role, audience, the pod's service account, cache TTL) share one Vault session and one cache; assumes the role's policies depend only on the service account.
    #[arg(long)]
    share_identities: bool,
    /// Socket of a `vaultfs keeper` that holds the node's FUSE connection across restarts; on
    /// start, a connection it holds is taken over and served at once.
    #[arg(long, value_name = "PATH")]
    keeper_socket: Option<PathBuf>,
    /// How long to wait at start for the keeper to answer before serving without it (a keeper
    /// that does not answer holds no connection to take over).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    keeper_wait: Duration,
    /// On SIGTERM, longest wait for FUSE requests in flight to be answered before exiting.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,
    /// How long a volume whose FUSE requests were in flight at two daemon crashes in a row
    /// fails with EIO; doubled at each repeat, up to 30m (0 turns quarantine off).
    #[arg(long, default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
    quarantine_backoff: Duration,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthKind {
    Token,
    Kubernetes,
    Jwt,
    Approle,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct MountArgs {
    /// Existing directory to mount on (a dead mount left by a crash is mounted over).
    mountpoint: PathBuf,
    /// A file: NAME inside the mount, Vault PATH as for `vault read`, optional field KEY.
    #[arg(long = "secret", value_name = "NAME=PATH[#KEY]")]
    secrets: Vec<String>,
    /// A file NAME rendered from the template in FILE, e.g. `{{ secret("secret/app/db").password }}`.
    #[arg(long = "template", value_name = "NAME=FILE")]
    templates: Vec<String>,
    /// YAML (or JSON) file: `secrets: [{name, path, key?} or {name, template}, ...]`.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// How long a fetched secret is served before Vault is asked again.
    #[arg(long, default_value = config::DEFAULT_CACHE_TTL.text, value_parser = parse_duration, value_name = "DURATION")]
    cache_ttl: Duration,
    /// While Vault is unreachable, serve a cached secret up to this long after its last successful check.
    #[arg(long, default_value = config::DEFAULT_MAX_STALE.text, value_parser = parse_duration, value_name = "DURATION")]
    max_stale: Duration,
    /// Longest wait for Vault before an uncached read fails with EIO.
    #[arg(long, default_value = config::DEFAULT_VAULT_TIMEOUT.text, value_parser = parse_duration, value_name = "DURATION")]
    vault_timeout: Duration,
    /// Most secrets held in memory.
    #[arg(long, default_value_t = config::DEFAULT_CACHE_MAX_ENTRIES, value_name = "N")]
    cache_max_entries: usize,
    /// Most secret bytes held in memory.
    #[arg(long, default_value_t = config::DEFAULT_CACHE_MAX_BYTES, value_name = "BYTES")]
    cache_max_bytes: usize,
    /// Owner of the files (default: the mounting user).
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// Group of the files (default: the mounting user's group).
    #[arg(long, value_name = "N")]
    gid: Option<u32>,
    /// Permission bits of the files; directories add x where r is set.
    #[arg(long, default_value = "0440", value_parser = parse_file_mode, value_name = "OCTAL")]
    file_mode: u16,
    /// Let other users (pods) use the mount; the kernel still checks owner, group and mode.
    #[arg(long)]
    allow_other: bool,
    /// cached: page-cache reads, re-checked and audited once per TTL per file; strict: every open audited, each descriptor keeps its version.
    #[arg(long, default_value = "cached", value_name = "cached|strict")]
    consistency: vaultfs::fs::Consistency,
    /// After a file changes, send this signal (SIGHUP, HUP, SIGUSR1...) to the pid in --reload-pid-file; the secrets are then re-checked every TTL.
    #[arg(long, value_name = "SIG", requires = "reload_pid_file")]
    reload_signal: Option<vaultfs::reload::Signal>,
    /// File holding the pid to signal, read at signal time.
    #[arg(long, value_name = "FILE", requires = "reload_signal")]
    reload_pid_file: Option<PathBuf>,
    #[command(flatten)]
    vault: VaultArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Settings every long-running command shares.
#[derive(Args)]
struct DaemonArgs {
    /// Lock the daemon's memory so secrets are never swapped out.
    #[arg(long)]
    lock_memory: bool,
    /// Serve Prometheus /metrics and /healthz on this address.
    #[arg(long, value_name = "HOST:PORT", value_parser = vaultfs::metrics::resolve_listen_addr)]
    metrics_addr: Option<SocketAddr>,
    /// Most connections served at once on --metrics-addr; a new one past it closes the oldest idle one (counted, logged once per burst).
    #[arg(long, default_value_t = vaultfs::metrics::DEFAULT_MAX_CONNECTIONS, value_name = "N",
          value_parser = parse_connection_cap)]
    max_metrics_connections: usize,
    /// Log line format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Largest Vault answer read; a larger secret fails with EFBIG.
    #[arg(long, default_value_t = vaultfs::source::vault::DEFAULT_MAX_RESPONSE_BYTES, value_name = "BYTES")]
    max_secret_bytes: usize,
    /// Vault requests in flight at once to each Vault server, over all volumes.
    #[arg(long, default_value_t = vaultfs::source::vault::DEFAULT_MAX_CONCURRENT_REQUESTS, value_name = "N")]
    max_vault_requests: usize,
    /// Vault requests in flight at once for each volume.
    #[arg(long, default_value_t = vaultfs::source::vault::DEFAULT_MAX_REQUESTS_PER_IDENTITY, value_name = "N")]
    max_volume_vault_requests: usize,
    /// Processes templates are rendered in; one volume renders in one at a time.
    #[arg(long, default_value_t = vaultfs::render::DEFAULT_WORKERS, value_name = "N")]
    render_workers: usize,
    /// Memory (address space) of each template render process; a rendering that needs more fails with EIO.
    #[arg(long, default_value_t = vaultfs::render::DEFAULT_WORKER_MEMORY, value_name = "BYTES")]
    render_memory: u64,
}

/// `--max-metrics-connections N`: at least one connection.
fn parse_connection_cap(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (the connections served at once)".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}; expected a number of connections, e.g. 32")),
    }
}

impl DaemonArgs {
    /// Renders templates in worker processes of this binary, as `--render-*` say.
    fn start_renderers(&self) -> Result<(), String> {
        if self.render_workers == 0 || self.render_workers > 64 {
            return Err(format!(
                "--render-workers {}: expected 1 to 64 worker processes",
                self.render_workers
            ));
        }
        if self.render_memory < MIN_RENDER_MEMORY {
            return Err(format!(
                "--render-memory {}: expected at least {MIN_RENDER_MEMORY} bytes (a worker's own program needs about 32 MiB of address space)",
                self.render_memory
            ));
        }
        vaultfs::render::configure(vaultfs::render::RenderConfig {
            workers: self.render_workers,
            exe: Some(PathBuf::from("/proc/self/exe")),
            memory: self.render_memory,
            lock_memory: self.lock_memory,
            ..Default::default()
        })
    }

    /// The daemon settings these arguments give.
    fn settings(&self) -> Result<app::DaemonSettings, String> {
        Ok(app::DaemonSettings {
            limits: self.server_limits()?,
            lock_memory: self.lock_memory,
            metrics_addr: self.metrics_addr,
            max_metrics_connections: self.max_metrics_connections,
        })
    }

    fn server_limits(&self) -> Result<ServerLimits, String> {
        for (flag, value) in [
            ("--max-secret-bytes", self.max_secret_bytes),
            ("--max-vault-requests", self.max_vault_requests),
            (
                "--max-volume-vault-requests",
                self.max_volume_vault_requests,
            ),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(ServerLimits {
            max_response_bytes: self.max_secret_bytes,
            max_concurrent_requests: self.max_vault_requests,
            max_requests_per_identity: self.max_volume_vault_requests,
        })
    }
}

#[derive(Args)]
struct VaultArgs {
    /// Vault address (default: $VAULT_ADDR).
    #[arg(long, value_name = "URL")]
    vault_addr: Option<String>,
    /// Vault namespace (default: $VAULT_NAMESPACE).
    #[arg(long, value_name = "NS")]
    vault_namespace: Option<String>,
    /// PEM file of CA certificates for Vault's TLS (default: $VAULT_CACERT).
    #[arg(long, value_name = "FILE")]
    vault_cacert: Option<PathBuf>,
    /// How to log in: token ($VAULT_TOKEN or ~/.vault-token), kubernetes, jwt or approle.
    #[arg(long, value_enum, default_value = "token")]
    auth: AuthKind,
    /// Auth mount path (default: the method's name: kubernetes, jwt, approle).
    #[arg(long, value_name = "PATH")]
    auth_mount: Option<String>,
    /// Role to log in as (AppRole: the role id).
    #[arg(long, value_name = "NAME")]
    role: Option<String>,
    /// JWT for kubernetes/jwt login, re-read at every login.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    jwt_file: PathBuf,
    /// AppRole secret id file, re-read at every login (default: $VAULT_SECRET_ID_FILE).
    #[arg(long, value_name = "PATH")]
    secret_id_file: Option<PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A Vault server's settings: flags first, then the standard `VAULT_*` variables.
fn server_config(
    addr: String,
    namespace: Option<&String>,
    ca_cert: Option<&PathBuf>,
    timeout: Duration,
) -> ServerConfig {
    ServerConfig {
        addr,
        namespace: namespace.cloned().or_else(|| env("VAULT_NAMESPACE")),
        ca_cert: ca_cert
            .cloned()
            .or_else(|| env("VAULT_CACERT").map(PathBuf::from)),
        skip_verify: env("VAULT_SKIP_VERIFY")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes")),
        timeout,
    }
}

fn vault_config(args: VaultArgs, timeout: Duration) -> Result<(ServerConfig, Auth), String> {
    let addr = args
        .vault_addr
        .or_else(|| env("VAULT_ADDR"))
        .ok_or("no Vault address: set VAULT_ADDR or --vault-addr (e.g. http://127.0.0.1:8200)")?;
    let login = |method: LoginMethod, default_mount: &str, credential: Credential| {
        let role = args
            .role
            .clone()
            .ok_or_else(|| format!("--auth {default_mount} needs --role NAME"))?;
        Ok::<_, String>(Auth::Login {
            method,
            mount: args
                .auth_mount
                .clone()
                .unwrap_or_else(|| default_mount.to_string()),
            role,
            credential,
        })
    };
    let auth = match args.auth {
        AuthKind::Token => {
            // Read into wiped buffers: only the `Token` keeps a copy.
            let raw = env("VAULT_TOKEN")
                .or_else(|| {
                    let home = env("HOME")?;
                    std::fs::read_to_string(PathBuf::from(home).join(".vault-token")).ok()
                })
                .map(zeroize::Zeroizing::new);
            let token = raw
                .as_ref()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .ok_or("no Vault token: set VAULT_TOKEN, write ~/.vault-token, or use --auth kubernetes|jwt|approle")?;
            Auth::Token(Token::new(token.to_string()))
        }
        AuthKind::Kubernetes => login(
            LoginMethod::Kubernetes,
            "kubernetes",
            Credential::File(args.jwt_file.clone()),
        )?,
        AuthKind::Jwt => login(
            LoginMethod::Jwt,
            "jwt",
            Credential::File(args.jwt_file.clone()),
        )?,
        AuthKind::Approle => {
            let file = args
                .secret_id_file
                .clone()
                .or_else(|| env("VAULT_SECRET_ID_FILE").map(PathBuf::from))
                .ok_or("--auth approle needs --secret-id-file PATH (or $VAULT_SECRET_ID_FILE)")?;
            login(LoginMethod::AppRole, "approle", Credential::File(file))?
        }
    };
    let server = server_config(
        addr,
        args.vault_namespace.as_ref(),
        args.vault_cacert.as_ref(),
        timeout,
    );
    Ok((server, auth))
}

fn volume_spec(
    secrets: &[String],
    templates: &[String],
    spec_file: Option<&PathBuf>,
) -> Result<VolumeSpec, String> {
    let mut entries = Vec::new();
    if let Some(path) = spec_file {
        let text = read_text_file("--spec", path)?;
        entries.extend(
            spec::parse_spec_document(&text)
                .map_err(|e| format!("--spec {}: {e}", path.display()))?,
        );
    }
    for arg in secrets {
        entries.push(spec::parse_secret_arg(arg).map_err(|e| e.to_string())?);
    }
    for arg in templates {
        let (name, file) = arg.split_once('=').ok_or_else(|| {
            format!("invalid --template {arg:?}: missing '='; expected NAME=FILE, e.g. db.env=db.env.tmpl")
        })?;
        let text = read_text_file("--template", Path::new(file))?;
        entries
            .push(spec::template_entry(name, &text).map_err(|e| format!("--template {arg}: {e}"))?);
    }
    VolumeSpec::new(entries).map_err(|e| e.to_string())
}

/// Reads a UTF-8 text file given to `flag`, up to the spec size limit. It reads one byte past
/// the limit, never the whole of an oversized file.
fn read_text_file(flag: &str, path: &Path) -> Result<String, String> {
    let mut raw = Vec::new();
    let cannot = |e: std::io::Error| format!("cannot read {flag} {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let size = file.metadata().map_err(cannot)?.len();
    if size > spec::MAX_SPEC_BYTES as u64 {
        return Err(format!(
            "{flag} {}: the file is {size} bytes, over the limit of {} bytes (64 KiB)",
            path.display(),
            spec::MAX_SPEC_BYTES
        ));
    }
    file.take(spec::MAX_SPEC_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(cannot)?;
    String::from_utf8(raw)
        .map_err(|_| format!("{flag} {}: the file is not UTF-8 text", path.display()))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: never escape codes in a log file or a container's log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.fmt_fields(vaultfs::logging::text_fields()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The least `--render-memory`: a worker's program and stack alone take most of it.
const MIN_RENDER_MEMORY: u64 = 48 << 20;

fn main() -> ExitCode {
    vaultfs::sys::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Mount(args) => mount(args),
        Command::Csi(args) => csi(args),
        Command::Keeper(args) => keeper(args),
        Command::RenderWorker(args) => match vaultfs::render::worker_main(args.lock_memory) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vaultfs render-worker: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn keeper(args: KeeperArgs) -> ExitCode {
    if let Err(message) = vaultfs::keeper::check_socket_path(&args.socket) {
        eprintln!("vaultfs: --socket: {message}");
        return ExitCode::from(2);
    }
    init_logging(args.log_format);
    app::raise_descriptor_limit();
    if let Err(e) = vaultfs::app::harden(args.lock_memory) {
        return fail(args.log_format, &e);
    }
    match vaultfs::keeper::run_keeper(&args.socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(args.log_format, &e),
    }
}

fn csi(args: CsiArgs) -> ExitCode {
    init_logging(args.daemon.log_format);
    app::raise_descriptor_limit();
    let server = |addr: String| {
        server_config(
            addr,
            args.vault_namespace.as_ref(),
            args.vault_cacert.as_ref(),
            args.vault_timeout,
        )
    };
    let prepared = (|| {
        vaultfs::csi::socket_path(&args.endpoint)?;
        if args.node_id.trim().is_empty() {
            return Err(
                "--node-id is empty: pass the node name (e.g. from spec.nodeName)".to_string(),
            );
        }
        args.daemon.start_renderers()?;
        let mut servers = Vec::new();
        if let Some(addr) = args.vault_addr.clone().or_else(|| env("VAULT_ADDR")) {
            servers.push((String::new(), server(addr)));
        }
        for named in &args.vault_servers {
            let (name, addr) = named
                .split_once('=')
                .filter(|(n, a)| !n.is_empty() && !a.is_empty())
                .ok_or_else(|| format!("invalid --vault-server {named:?}: expected NAME=URL"))?;
            servers.push((name.to_string(), server(addr.to_string())));
        }
        if servers.is_empty() {
            return Err(
                "no Vault server: set VAULT_ADDR, --vault-addr or --vault-server NAME=URL"
                    .to_string(),
            );
        }
        Ok((servers, args.daemon.settings()?))
    })();
    let (servers, daemon) = match prepared {
        Ok(s) => s,
        Err(message) => {
            eprintln!("vaultfs: {message}");
            return ExitCode::from(2);
        }
    };
    let settings = app::CsiSettings {
        endpoint: args.endpoint,
        connections_dir: args
            .connections_dir
            .unwrap_or_else(|| args.state_dir.clone()),
        csi: vaultfs::csi::CsiConfig {
            node_id: args.node_id,
            state_dir: args.state_dir,
            servers: servers.iter().map(|(name, _)| name.clone()).collect(),
            vault_timeout: args.vault_timeout,
            cache_max_entries: args.cache_max_entries,
            cache_max_bytes: args.cache_max_bytes,
            min_cache_ttl: args.min_cache_ttl,
            max_volumes: args.max_volumes,
            max_entries: args.max_volume_entries,
            allow_reload_signals: args.allow_reload_signals,
            share_identities: args.share_identities,
        },
        servers,
        keeper_socket: args.keeper_socket,
        keeper_wait: args.keeper_wait,
        drain_timeout: args.drain_timeout,
        quarantine_backoff: args.quarantine_backoff,
        daemon,
    };
    run(args.daemon.log_format, app::run_csi(settings))
}

fn run(format: LogFormat, work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Template renderings and address lookups: few and short (renderings are bounded by
        // their fuel), so a handful of threads, never one per volume.
        .max_blocking_threads(4)
        .thread_name("vaultfs-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vaultfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format, &e),
    }
}

/// Reports the error that stops the daemon, once, on one line with each cause once: `vaultfs:
/// <message>: <cause>...` with text logs, one JSON log line with `--log-format json` (so that a
/// log collector reads it as any other line). Returns the exit status of such a failure.
fn fail(format: LogFormat, error: &anyhow::Error) -> ExitCode {
    let message = format!("{error:#}");
    match format {
        LogFormat::Text => eprintln!("vaultfs: {message}"),
        LogFormat::Json => tracing::error!(error = %message, "vaultfs stopped"),
    }
    if is_bad_argument(error) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Whether `error` comes from an argument found bad only once the daemon started (a Vault
/// address or CA file, a mount point that is not a directory): exit 2, as for any bad argument.
fn is_bad_argument(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<VaultConfigError>()
            .is_some_and(VaultConfigError::is_bad_argument)
            || matches!(
                cause.downcast_ref::<MountError>(),
                Some(MountError::NotADirectory(_))
            )
    })
}

fn mount(args: MountArgs) -> ExitCode {
    init_logging(args.daemon.log_format);
    app::raise_descriptor_limit();
    let prepared =
        volume_spec(&args.secrets, &args.templates, args.spec.as_ref()).and_then(|spec| {
            let (vault, auth) = vault_config(args.vault, args.vault_timeout)?;
            args.daemon.start_renderers()?;
            // One mount point however it is written (relative, trailing `/`, a symlink): a
            // live vaultfs mount there is then refused instead of stacked on.
            let mountpoint = vaultfs::sys::canonical_target(&args.mountpoint)
                .unwrap_or_else(|_| args.mountpoint.clone());
            Ok(MountSettings {
                mountpoint: mountpoint.clone(),
                spec,
                vault,
                auth,
                volume: vaultfs::volume::VolumeConfig {
                    name: mountpoint.display().to_string(),
                    pod: None,
                    cache: vaultfs::cache::CacheConfig::new(
                        args.cache_ttl,
                        args.max_stale,
                        args.vault_timeout,
                        args.cache_max_entries,
                        args.cache_max_bytes,
                    ),
                    uid: args
                        .uid
                        .unwrap_or_else(vaultfs::sys::process::effective_uid),
                    gid: args
                        .gid
                        .unwrap_or_else(vaultfs::sys::process::effective_gid),
                    file_mode: args.file_mode,
                    consistency: args.consistency,
                    reload: args.reload_signal.zip(args.reload_pid_file.clone()).map(
                        |(signal, file)| vaultfs::reload::ReloadConfig {
                            signal,
                            target: vaultfs::reload::Target::PidFile(file),
                            min_interval: args.cache_ttl,
                        },
                    ),
                },
                allow_other: args.allow_other,
                daemon: args.daemon.settings()?,
            })
        });
    let settings = match prepared {
        Ok(s) => s,
        Err(message) => {
            eprintln!("vaultfs: {message}");
            return ExitCode::from(2);
        }
    };
    run(args.daemon.log_format, app::run_mount(settings))
}
