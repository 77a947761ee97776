//! Filesystem logic, independent of FUSE: lookup, getattr, open, read, readdir and release over
//! a `VolumeSpec` and a `SecretCache`. Answers are small structs or an `FsError` that carries
//! its errno; the `fuse` adapter only translates them into replies.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use thiserror::Error;

use crate::audit::{self, Caller};
use crate::cache::{Content, SecretCache, SwapHook};
use crate::logging::FailureLimiter;
use crate::secret::SecretBytes;
use crate::source::{SecretSource, SourceError};
use crate::spec::{InodeNo, Node, NodeKind, SecretPath, Shows, VolumeSpec};
use crate::template::{self, RenderError, Template};

/// How a volume's files follow Vault, chosen per volume and served by a FUSE connection of the
/// same mode (the kernel's no-open switch is per connection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Contents come from the kernel's page cache: opens never reach the daemon, names and
    /// attributes are cached for the rest of the cache TTL, and the first GETATTR or LOOKUP
    /// after that re-checks Vault; a changed version (new mtime and size) makes the kernel
    /// drop the old pages. Audited once per TTL per file.
    #[default]
    Cached,
    /// Every open reaches the daemon and is audited; each descriptor reads the version it
    /// opened, through direct I/O.
    Strict,
}

impl Consistency {
    pub const CHOICES: [&'static str; 2] = ["cached", "strict"];

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Cached => "cached",
            Consistency::Strict => "strict",
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cached" => Ok(Consistency::Cached),
            "strict" => Ok(Consistency::Strict),
            other => Err(format!(
                "unknown consistency {other:?}: expected one of {}",
                Consistency::CHOICES.join(", ")
            )),
        }
    }
}

/// Ownership, modes and kernel cache lifetimes of a volume's files.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// A name for the volume in audit events and logs.
    pub volume: String,
    /// The pod the volume belongs to (`namespace/name/uid`, under CSI), for audit events.
    pub pod: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of files; directories get the same bits plus `x` wherever `r` is set.
    pub file_mode: u16,
    /// How long the kernel may cache names and attributes without asking again (files of a
    /// cached volume: the rest of their cache freshness instead).
    pub kernel_ttl: Duration,
    pub consistency: Consistency,
}

/// An error with its errno and log level: the single place where vaultfs errors become kernel
/// errors and where it is decided how loudly a failed request is logged.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FsError {
    /// No such file, in the spec or in Vault.
    #[error("no such file")]
    NotFound,
    #[error("the secret has no field {0:?}")]
    MissingField(String),
    /// A template read a secret or field that does not exist.
    #[error("template: {0}")]
    TemplateMissing(String),
    /// A template stopped: out of fuel or depth, past the output cap, or misused.
    #[error("template: {0}")]
    TemplateFailed(String),
    /// The secret source refused or failed to give the secret (its not-found is `NotFound`).
    #[error(transparent)]
    Source(SourceError),
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    /// The volume is quarantined after consecutive daemon crashes (`quarantine`); nothing of
    /// it runs until its back-off ends.
    #[error("the volume is quarantined")]
    Quarantined,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound | FsError::MissingField(_) | FsError::TemplateMissing(_) => {
                libc::ENOENT
            }
            FsError::Source(err) => match err {
                SourceError::NotFound => libc::ENOENT,
                SourceError::PermissionDenied | SourceError::LoginRefused(_) => libc::EACCES,
                SourceError::Unavailable(_) | SourceError::Invalid(_) => libc::EIO,
                SourceError::TooLarge(_) => libc::EFBIG,
            },
            FsError::TemplateFailed(_) | FsError::Quarantined => libc::EIO,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
        }
    }

    /// How loudly a request failing with this is logged: everyday answers (a name that does
    /// not exist, a write, a quarantined volume, whose quarantine is logged once when it
    /// starts) at debug; everything else at warn, rate-limited by the caller.
    pub fn level(&self) -> tracing::Level {
        match self {
            FsError::NotFound | FsError::ReadOnly | FsError::Quarantined => tracing::Level::DEBUG,
            _ => tracing::Level::WARN,
        }
    }

    /// Whether Vault refused or failed to give the secret (denied, unavailable, bad answer):
    /// the failures an audit trail records. Not-found and local errors are not refusals.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FsError::Source(
                SourceError::PermissionDenied
                    | SourceError::LoginRefused(_)
                    | SourceError::Unavailable(_)
                    | SourceError::Invalid(_)
            )
        )
    }

    /// The errno's name, for metrics labels.
    pub fn errno_name(&self) -> &'static str {
        match self.errno() {
            libc::ENOENT => "ENOENT",
            libc::EACCES => "EACCES",
            libc::EROFS => "EROFS",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EFBIG => "EFBIG",
            _ => "EIO",
        }
    }
}

impl From<SourceError> for FsError {
    fn from(err: SourceError) -> Self {
        match err {
            SourceError::NotFound => FsError::NotFound,
            other => FsError::Source(other),
        }
    }
}

impl From<RenderError> for FsError {
    fn from(err: RenderError) -> Self {
        match err {
            RenderError::MissingField(m) => FsError::TemplateMissing(format!("no field {m}")),
            RenderError::Needs(p) => FsError::TemplateFailed(format!(
                "reads more than {} secrets (stopped at {p})",
                template::MAX_SECRETS
            )),
            RenderError::BadPath(m)
            | RenderError::Limit(m)
            | RenderError::Failed(m)
            | RenderError::Unavailable(m) => FsError::TemplateFailed(m),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Attributes of a node, as `stat` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: InodeNo,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// How long the kernel may keep this answer (entry and attribute timeout).
    pub ttl: Duration,
}

/// One directory entry of a `readdir` answer; `offset` is where the next call resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: InodeNo,
    pub offset: u64,
    pub kind: Kind,
    pub name: String,
}

/// What one file shows at one moment: a version of its secret, or a template's rendering over
/// the versions it read.
#[derive(Clone)]
pub enum Shown {
    Secret(Arc<Content>),
    Rendered(Arc<Rendering>),
}

/// A template's output (or why there is none) and the secret versions it was rendered from.
pub struct Rendering {
    result: Result<SecretBytes, FsError>,
    /// In the order the template first read them.
    sources: Vec<(SecretPath, Arc<Content>)>,
    /// The newest of the sources' change times (the file's mtime).
    changed_at: SystemTime,
}

impl Rendering {
    /// Whether `have` are exactly the versions this was rendered from.
    fn rendered_from(&self, have: &[(SecretPath, Arc<Content>)]) -> bool {
        self.sources.len() == have.len()
            && self
                .sources
                .iter()
                .all(|(p, c)| have.iter().any(|(q, d)| p == q && Arc::ptr_eq(c, d)))
    }
}

impl Shown {
    /// The file's bytes (`key`: the plain entry's field).
    fn bytes(&self, key: Option<&str>) -> Option<&[u8]> {
        match self {
            Shown::Secret(c) => c.fetched.data.render(key).map(SecretBytes::expose),
            Shown::Rendered(r) => r.result.as_ref().ok().map(SecretBytes::expose),
        }
    }

    fn changed_at(&self) -> SystemTime {
        match self {
            Shown::Secret(c) => c.changed_at,
            Shown::Rendered(r) => r.changed_at,
        }
    }

    /// How audit events name the version: Vault's version (else the cache's generation), one
    /// per secret read for a template, comma-separated.
    fn version(&self) -> String {
        match self {
            Shown::Secret(c) => version_of(c),
            Shown::Rendered(r) => r
                .sources
                .iter()
                .map(|(_, c)| version_of(c))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The secrets this shows (for audit events and logs), comma-separated.
    fn paths(&self, spec_path: Option<&SecretPath>) -> String {
        match self {
            Shown::Secret(_) => spec_path.map_or_else(String::new, ToString::to_string),
            Shown::Rendered(r) => join_paths(r.sources.iter().map(|(p, _)| p)),
        }
    }
}

fn join_paths<'a>(paths: impl Iterator<Item = &'a SecretPath>) -> String {
    paths.map(SecretPath::as_str).collect::<Vec<_>>().join(",")
}

/// The bytes a read returns, borrowed from the version the handle pinned.
pub struct ReadSlice {
    shown: Shown,
    spec: Arc<VolumeSpec>,
    entry: usize,
    offset: u64,
    size: u32,
}

impl ReadSlice {
    pub fn bytes(&self) -> &[u8] {
        let key = self.spec.entries()[self.entry]
            .secret()
            .and_then(|(_, k)| k);
        let all = self.shown.bytes(key).unwrap_or_default();
        let start = usize::try_from(self.offset)
            .unwrap_or(usize::MAX)
            .min(all.len());
        let end = start.saturating_add(self.size as usize).min(all.len());
        &all[start..end]
    }
}

/// A file handle: which version an open file reads.
struct Handle {
    ino: InodeNo,
    shown: Shown,
}

/// Called with the inodes whose content changed, to drop the kernel's cached attributes.
pub type Invalidate = Box<dyn Fn(InodeNo) + Send + Sync>;

/// The cache's swap hook for a volume of `spec`: every file showing a changed path is reported
/// to `invalidate`.
pub fn swap_hook(spec: Arc<VolumeSpec>, invalidate: Invalidate) -> SwapHook {
    Box::new(move |path| spec.files_of(path).for_each(&invalidate))
}

/// Numbers volumes in the render pool's queue.
static NEXT_RENDER_KEY: AtomicU64 = AtomicU64::new(1);

pub struct VaultFs<S> {
    spec: Arc<VolumeSpec>,
    cache: Arc<SecretCache<S>>,
    config: FsConfig,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Cached mode: the version whose attributes were last answered for each file, which reads
    /// without a handle of ours serve, so the kernel's pages of a file come from the version
    /// whose size and mtime it holds.
    reported: Mutex<HashMap<InodeNo, Shown>>,
    /// Each template entry's last rendering, reused while the versions it read are current.
    rendered: Mutex<HashMap<usize, Arc<Rendering>>>,
    /// One rendering of an entry at a time: readers arriving meanwhile wait for it and reuse it.
    rendering: Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
    /// This volume in the render pool's fair queue.
    render_key: u64,
    next_fh: AtomicU64,
    created: SystemTime,
    /// Aggregates repeated refusals in the audit trail (per entry, uid and errno).
    refusals: FailureLimiter<(usize, u32, &'static str)>,
}

impl<S: SecretSource> VaultFs<S> {
    /// The filesystem of `spec`, reading through `cache` (built with `swap_hook`, so that
    /// changed files leave the kernel's caches).
    pub fn new(spec: Arc<VolumeSpec>, cache: Arc<SecretCache<S>>, config: FsConfig) -> Self {
        // Handles of an earlier daemon on the same connection may be presented to this one;
        // starting from the clock keeps new handle numbers clear of theirs.
        let epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            spec,
            cache,
            config,
            handles: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            rendered: Mutex::new(HashMap::new()),
            rendering: Mutex::new(HashMap::new()),
            render_key: NEXT_RENDER_KEY.fetch_add(1, Ordering::Relaxed),
            refusals: FailureLimiter::default(),
            next_fh: AtomicU64::new(epoch),
            created: SystemTime::now(),
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The inode `name` in `parent` would be, for log lines about a lookup.
    pub fn child_ino(&self, parent: InodeNo, name: &str) -> Option<InodeNo> {
        self.spec.child(parent, name).map(|n| n.ino)
    }

    /// The file's name and Vault path (a template's: the paths it read last), for log lines
    /// (`None` for directories and unknown inodes).
    pub fn describe(&self, ino: InodeNo) -> Option<(&str, String)> {
        match self.spec.node(ino)?.kind {
            NodeKind::File(entry) => {
                let e = &self.spec.entries()[entry];
                Some((e.name.as_str(), self.spec_paths(entry)))
            }
            NodeKind::Dir(_) => None,
        }
    }

    /// What entry `entry` reads according to the spec (a template: what it read last time).
    fn spec_paths(&self, entry: usize) -> String {
        match &self.spec.entries()[entry].shows {
            Shows::Secret { path, .. } => path.to_string(),
            Shows::Template(t) => match t.uses() {
                uses if uses.is_empty() => "-".to_string(),
                uses => join_paths(uses.iter()),
            },
        }
    }

    /// Looks `name` up in `parent`. A file whose secret Vault refuses is an audited refusal
    /// (the kernel asks here first, so a refused open never reaches `open`).
    pub async fn lookup(
        &self,
        parent: InodeNo,
        name: &str,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        match self.spec.node(parent).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => {}
            Some(NodeKind::File(_)) => return Err(FsError::NotADirectory),
            None => return Err(FsError::NotFound),
        }
        let node = self.spec.child(parent, name).ok_or(FsError::NotFound)?;
        self.audited_attr(node, "lookup", caller).await
    }

    pub async fn getattr(&self, ino: InodeNo, caller: Caller) -> Result<Attr, FsError> {
        let node = self.spec.node(ino).ok_or(FsError::NotFound)?;
        self.audited_attr(node, "getattr", caller).await
    }

    async fn audited_attr(&self, node: &Node, op: &str, caller: Caller) -> Result<Attr, FsError> {
        let NodeKind::File(entry) = node.kind else {
            return self.attr_of(node).await.map(|(attr, _)| attr);
        };
        let cached = self.config.consistency == Consistency::Cached;
        match self.attr_of(node).await {
            Ok((attr, shown)) => {
                if let (true, Some(shown)) = (cached, shown) {
                    // The kernel asks at most once per timeout per file: this is the access
                    // after the TTL, and the version it will read from now on.
                    let paths = self.shown_paths(entry, &shown);
                    audit::access_event(self.place(entry, &paths), op, &shown.version(), caller);
                    self.reported.lock().insert(node.ino, shown);
                }
                Ok(attr)
            }
            Err(err) => {
                if cached {
                    self.reported.lock().remove(&node.ino);
                }
                self.audit_refusal(entry, op, &err, caller);
                Err(err)
            }
        }
    }

    /// Audits a refused access, aggregating repeats of the same refusal.
    fn audit_refusal(&self, entry: usize, op: &str, err: &FsError, caller: Caller) {
        if !err.is_refusal() {
            return;
        }
        let errno = err.errno_name();
        if let Some(repeats) = self.refusals.admit((entry, caller.uid, errno)) {
            let paths = self.spec_paths(entry);
            audit::refused(self.place(entry, &paths), op, errno, caller, repeats);
        }
    }

    /// The Vault paths `shown` (of entry `entry`) comes from, for audit events.
    fn shown_paths(&self, entry: usize, shown: &Shown) -> String {
        shown.paths(self.spec.entries()[entry].secret().map(|(p, _)| p))
    }

    /// Where entry `entry` is, for audit events.
    fn place<'a>(&'a self, entry: usize, paths: &'a str) -> audit::Place<'a> {
        audit::Place {
            volume: &self.config.volume,
            pod: self.config.pod.as_deref(),
            file: &self.spec.entries()[entry].name,
            path: paths,
        }
    }

    /// Opens a file for reading: pins the current content version to a new handle and records
    /// an audit event.
    pub async fn open(&self, ino: InodeNo, write: bool, caller: Caller) -> Result<u64, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let node = self.spec.node(ino).ok_or(FsError::NotFound)?;
        let NodeKind::File(entry) = node.kind else {
            return Err(FsError::IsADirectory);
        };
        let shown = match self.shown(entry).await {
            Ok(c) => c,
            Err(err) => {
                self.audit_refusal(entry, "open", &err, caller);
                return Err(err);
            }
        };
        let paths = self.shown_paths(entry, &shown);
        audit::open_event(self.place(entry, &paths), &shown.version(), caller);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, shown });
        Ok(fh)
    }

    /// An open on a connection that does not open files (cached mode: answered `ENOSYS`, after
    /// which the kernel opens every file of the connection without asking): audited like an
    /// open, no handle, no version pinned.
    pub async fn open_unpinned(
        &self,
        ino: InodeNo,
        write: bool,
        caller: Caller,
    ) -> Result<(), FsError> {
        let fh = self.open(ino, write, caller).await?;
        self.release(fh);
        Ok(())
    }

    /// Reads from the version `fh` pinned. A handle this process never issued (one opened
    /// before a daemon restart, or none: cached mode) reads the version whose attributes were
    /// last answered for the file (cached mode), else the current version.
    pub async fn read(
        &self,
        ino: InodeNo,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadSlice, FsError> {
        let node = self.spec.node(ino).ok_or(FsError::NotFound)?;
        let NodeKind::File(entry) = node.kind else {
            return Err(FsError::IsADirectory);
        };
        let pinned = self
            .handles
            .lock()
            .get(&fh)
            .filter(|h| h.ino == ino)
            .map(|h| h.shown.clone());
        let reported = || self.reported.lock().get(&ino).cloned();
        let shown = match pinned.or_else(reported) {
            Some(c) => c,
            None => self.shown(entry).await?,
        };
        Ok(ReadSlice {
            shown,
            spec: self.spec.clone(),
            entry,
            offset,
            size,
        })
    }

    /// Drops the versions kept for reads without a handle (cached mode) and the templates'
    /// renderings, so that they are zeroized with the cache's at unmount.
    pub fn forget_reported(&self) {
        self.reported.lock().clear();
        self.rendered.lock().clear();
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// Directory entries after `offset`, including `.` and `..`. Fetches nothing.
    pub fn readdir(&self, ino: InodeNo, offset: u64) -> Result<Vec<DirEntry>, FsError> {
        let node = self.spec.node(ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir(children) = &node.kind else {
            return Err(FsError::NotADirectory);
        };
        let dots = [(node.ino, Kind::Dir, "."), (node.parent, Kind::Dir, "..")];
        let named = children.iter().filter_map(|c| self.spec.node(*c)).map(|n| {
            let kind = match n.kind {
                NodeKind::Dir(_) => Kind::Dir,
                NodeKind::File(_) => Kind::File,
            };
            (n.ino, kind, n.name.as_str())
        });
        Ok(dots
            .into_iter()
            .chain(named)
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(i, (ino, kind, name))| DirEntry {
                ino,
                offset: i as u64 + 1,
                kind,
                name: name.to_string(),
            })
            .collect())
    }

    /// Re-checks every file as an access would, without a caller and without audit events
    /// (the background watch of a volume with a reload signal): files whose value is still
    /// fresh are passed over without touching the cache's order or counters; the others are
    /// re-checked (Vault is asked, a changed secret swapped in as on access). Returns the
    /// soonest remaining freshness among the files read (`None`: none could be).
    pub async fn check_all(&self) -> Option<Duration> {
        let mut soonest: Option<Duration> = None;
        let mut failed = 0usize;
        for node in self.spec.nodes() {
            let NodeKind::File(entry) = node.kind else {
                continue;
            };
            let paths = match &self.spec.entries()[entry].shows {
                Shows::Secret { path, .. } => vec![path.clone()],
                Shows::Template(t) => t.uses(),
            };
            // Due when any secret the file shows is due (or not cached, or not known yet).
            let due_in = paths
                .iter()
                .map(|p| self.cache.due_in(p))
                .try_fold(None::<Duration>, |soonest, left| {
                    left.map(|l| Some(soonest.map_or(l, |s| s.min(l))))
                })
                .flatten();
            let left = match due_in {
                Some(left) if !left.is_zero() => left,
                _ => match self.attr_of(node).await {
                    Ok((_, Some(shown))) => self.freshness(entry, &shown),
                    Ok((_, None)) => continue,
                    Err(_) => {
                        failed += 1;
                        continue;
                    }
                },
            };
            soonest = Some(soonest.map_or(left, |s| s.min(left)));
        }
        if failed > 0 {
            tracing::debug!(volume = %self.config.volume, failed, "watch: files that could not be re-checked");
        }
        soonest
    }

    /// Number of open handles (for tests and metrics).
    pub fn open_handles(&self) -> usize {
        self.handles.lock().len()
    }

    /// What entry `entry` shows now: its secret's current version, or its template rendered
    /// over the current versions of the secrets it reads.
    async fn shown(&self, entry: usize) -> Result<Shown, FsError> {
        match &self.spec.entries()[entry].shows {
            Shows::Secret { path, key } => {
                let content = self.cache.get(path).await?;
                if content.fetched.data.render(key.as_deref()).is_none() {
                    // Logged (rate-limited, naming the file) where the request is answered.
                    return Err(FsError::MissingField(key.clone().unwrap_or_default()));
                }
                Ok(Shown::Secret(content))
            }
            Shows::Template(t) => self.render(entry, t).await.map(Shown::Rendered),
        }
    }

    /// Renders template entry `entry`: the secrets it read last time are fetched first (all
    /// from the cache, so within their TTL they cost Vault nothing; one that fails is left out
    /// and fetched again only if the template still asks for it), then each secret it asks for
    /// that it was not given, one rendering per newly found secret. The last rendering (or
    /// failure) is reused while every version it was made from is still current. One
    /// rendering of an entry runs at a time (readers meanwhile wait and reuse it), in the
    /// render pool (`crate::render`): out of this process's memory, fair across volumes.
    async fn render(&self, entry: usize, t: &Arc<Template>) -> Result<Arc<Rendering>, FsError> {
        let flight = self.rendering.lock().entry(entry).or_default().clone();
        let _alone = flight.lock().await;
        let mut have = Vec::new();
        for path in t.uses() {
            if let Ok(content) = self.cache.get(&path).await {
                have.push((path, content));
            }
        }
        loop {
            if let Some(last) = self.rendered.lock().get(&entry) {
                if last.rendered_from(&have) {
                    return last.result.clone().map(|_| last.clone());
                }
            }
            let given = have
                .iter()
                .map(|(p, c)| (p.clone(), c.clone() as crate::render::Input))
                .collect();
            let rendered = t.noted(
                crate::render::pool()
                    .render(self.render_key, t.source_shared(), given)
                    .await,
            );
            let (result, sources) = match rendered {
                Err(RenderError::Needs(path)) if have.len() < template::MAX_SECRETS => {
                    let content = self.template_secret(&path).await?;
                    have.push((path, content));
                    continue;
                }
                Ok((mut bytes, used)) => {
                    // Exactly the versions this rendering read, in its order.
                    let sources = used
                        .into_iter()
                        .filter_map(|p| {
                            let c = have.iter().find(|(q, _)| *q == p)?.1.clone();
                            Some((p, c))
                        })
                        .collect();
                    (Ok(SecretBytes::new(std::mem::take(&mut *bytes))), sources)
                }
                // Nothing learnt about the template: not kept, the next read renders again.
                Err(err @ RenderError::Unavailable(_)) => return Err(FsError::from(err)),
                Err(err) => (Err(FsError::from(err)), have),
            };
            let newest = sources.iter().map(|(_, c)| c.changed_at).max();
            // Each new rendering gets a later mtime than the one before, even when no source
            // is newer (a source fetched mid-rendering, then rotated back): a cached file's
            // pages are dropped only when mtime or size changes.
            let after_last = self
                .rendered
                .lock()
                .get(&entry)
                .map(|r| r.changed_at + Duration::from_nanos(1));
            let changed_at = match (newest, after_last) {
                (Some(n), Some(a)) => n.max(a),
                (Some(n), None) => n,
                (None, Some(a)) => a,
                (None, None) => self.created,
            };
            let rendering = Arc::new(Rendering {
                result,
                sources,
                changed_at,
            });
            self.rendered.lock().insert(entry, rendering.clone());
            return rendering.result.clone().map(|_| rendering);
        }
    }

    /// A secret a template reads: a missing one is named in the error.
    async fn template_secret(&self, path: &SecretPath) -> Result<Arc<Content>, FsError> {
        self.cache.get(path).await.map_err(|err| match err {
            SourceError::NotFound => FsError::TemplateMissing(format!("no secret at {path}")),
            other => other.into(),
        })
    }

    /// A node's attributes and, for a file, the content version they describe.
    async fn attr_of(&self, node: &Node) -> Result<(Attr, Option<Shown>), FsError> {
        let c = &self.config;
        match node.kind {
            NodeKind::Dir(ref children) => Ok((
                Attr {
                    ino: node.ino,
                    kind: Kind::Dir,
                    size: 0,
                    perm: c.file_mode | ((c.file_mode & 0o444) >> 2),
                    nlink: 2 + children
                        .iter()
                        .filter(|i| {
                            matches!(self.spec.node(**i).map(|n| &n.kind), Some(NodeKind::Dir(_)))
                        })
                        .count() as u32,
                    uid: c.uid,
                    gid: c.gid,
                    mtime: self.created,
                    ttl: c.kernel_ttl,
                },
                None,
            )),
            NodeKind::File(entry) => {
                let shown = self.shown(entry).await?;
                let key = self.spec.entries()[entry].secret().and_then(|(_, k)| k);
                let size = shown.bytes(key).map_or(0, <[u8]>::len);
                let ttl = match c.consistency {
                    Consistency::Strict => c.kernel_ttl,
                    Consistency::Cached => self.freshness(entry, &shown),
                };
                let attr = Attr {
                    ino: node.ino,
                    kind: Kind::File,
                    size: size as u64,
                    perm: c.file_mode,
                    nlink: 1,
                    uid: c.uid,
                    gid: c.gid,
                    mtime: shown.changed_at(),
                    ttl,
                };
                Ok((attr, Some(shown)))
            }
        }
    }
}

impl<S: SecretSource> VaultFs<S> {
    /// How long what entry `entry` shows stays fresh: its secret's remaining freshness, or for
    /// a template the soonest of its secrets' (one that reads none: the kernel TTL).
    fn freshness(&self, entry: usize, shown: &Shown) -> Duration {
        match shown {
            Shown::Secret(content) => {
                let (path, _) = self.spec.entries()[entry]
                    .secret()
                    .expect("a secret is shown by a plain entry");
                self.cache.remaining(path, content)
            }
            Shown::Rendered(r) => r
                .sources
                .iter()
                .map(|(p, content)| self.cache.remaining(p, content))
                .min()
                .unwrap_or(self.config.kernel_ttl),
        }
    }
}

/// How audit events name a content version: Vault's version number, else the cache's
/// generation.
fn version_of(content: &Content) -> String {
    match content.fetched.version {
        Some(v) => v.0.to_string(),
        None => format!("g{}", content.generation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::metrics::Metrics;
    use crate::source::mock::MockSource;
    use crate::spec::parse_secret_arg;

    struct World {
        source: Arc<MockSource>,
        fs: VaultFs<MockSource>,
        invalidated: Arc<Mutex<Vec<InodeNo>>>,
    }

    fn world(args: &[&str]) -> World {
        world_in(args, Consistency::Strict)
    }

    fn world_in(args: &[&str], consistency: Consistency) -> World {
        let entries = args.iter().map(|a| parse_secret_arg(a).unwrap()).collect();
        world_of(entries, consistency)
    }

    fn world_of(entries: Vec<crate::spec::SecretEntry>, consistency: Consistency) -> World {
        let source = Arc::new(MockSource::new());
        source.put("secret/db", &[("user", "app"), ("password", "pw-1")]);
        source.put("secret/api", &[("token", "t-1")]);
        let spec = Arc::new(VolumeSpec::new(entries).unwrap());
        let invalidated = Arc::new(Mutex::new(Vec::new()));
        let sink = invalidated.clone();
        let cache = Arc::new(
            SecretCache::new(
                source.clone(),
                CacheConfig::default(),
                Arc::new(Metrics::new()),
            )
            .with_swap_hook(swap_hook(
                spec.clone(),
                Box::new(move |i| sink.lock().push(i)),
            )),
        );
        let config = FsConfig {
            volume: "test".into(),
            pod: None,
            uid: 1000,
            gid: 2000,
            file_mode: 0o440,
            kernel_ttl: Duration::from_secs(1),
            consistency,
        };
        let fs = VaultFs::new(spec, cache, config);
        World {
            source,
            fs,
            invalidated,
        }
    }

    const SPEC: [&str; 3] = [
        "db/password=secret/db#password",
        "db/all=secret/db",
        "api=secret/api#token",
    ];

    async fn read_all(fs: &VaultFs<MockSource>, ino: InodeNo, fh: u64) -> Vec<u8> {
        fs.read(ino, fh, 0, 4096).await.unwrap().bytes().to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn listing_directories_fetches_nothing() {
        let w = world(&SPEC);
        let root = w.fs.readdir(InodeNo::ROOT, 0).unwrap();
        let names: Vec<_> = root.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, [".", "..", "api", "db"]);
        let db =
            w.fs.lookup(InodeNo::ROOT, "db", Caller::default())
                .await
                .unwrap();
        assert_eq!(db.kind, Kind::Dir);
        assert_eq!(db.perm, 0o550);
        let sub: Vec<_> =
            w.fs.readdir(db.ino, 2)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
        assert_eq!(sub, ["all", "password"]);
        assert_eq!(w.source.reads(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn lookup_fetches_only_the_touched_secret_and_reports_its_size() {
        let w = world(&SPEC);
        let attr =
            w.fs.lookup(InodeNo::ROOT, "api", Caller::default())
                .await
                .unwrap();
        assert_eq!((attr.kind, attr.size, attr.perm), (Kind::File, 3, 0o440));
        assert_eq!((attr.uid, attr.gid), (1000, 2000));
        assert_eq!(w.source.reads(), 1);
        assert_eq!(
            w.fs.lookup(InodeNo::ROOT, "nope", Caller::default()).await,
            Err(FsError::NotFound)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn key_gives_raw_field_and_no_key_gives_json() {
        let w = world(&SPEC);
        let db =
            w.fs.lookup(InodeNo::ROOT, "db", Caller::default())
                .await
                .unwrap()
                .ino;
        let pw =
            w.fs.lookup(db, "password", Caller::default())
                .await
                .unwrap()
                .ino;
        let all = w.fs.lookup(db, "all", Caller::default()).await.unwrap().ino;
        let caller = Caller::default();
        let fh = w.fs.open(pw, false, caller).await.unwrap();
        assert_eq!(read_all(&w.fs, pw, fh).await, b"pw-1");
        let fh = w.fs.open(all, false, caller).await.unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&read_all(&w.fs, all, fh).await).unwrap();
        assert_eq!(json, serde_json::json!({"user": "app", "password": "pw-1"}));
        assert_eq!(w.source.reads(), 1, "both files share one secret");
        let part = w.fs.read(pw, fh + 100, 1, 2).await.unwrap();
        assert_eq!(part.bytes(), b"w-");
    }

    #[tokio::test(start_paused = true)]
    async fn open_handle_keeps_its_version_across_rotation() {
        let w = world(&SPEC);
        let api =
            w.fs.lookup(InodeNo::ROOT, "api", Caller::default())
                .await
                .unwrap()
                .ino;
        let old = w.fs.open(api, false, Caller::default()).await.unwrap();
        w.source.put("secret/api", &[("token", "t-2-longer")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        let new = w.fs.open(api, false, Caller::default()).await.unwrap();
        assert_eq!(read_all(&w.fs, api, new).await, b"t-2-longer");
        assert_eq!(read_all(&w.fs, api, old).await, b"t-1");
        assert_eq!(w.fs.getattr(api, Caller::default()).await.unwrap().size, 10);
        assert_eq!(*w.invalidated.lock(), vec![api]);
        w.fs.release(old);
        w.fs.release(new);
        assert_eq!(w.fs.open_handles(), 0);
    }

    #[test]
    fn consistency_parses_and_names_the_choices() {
        assert_eq!("cached".parse(), Ok(Consistency::Cached));
        assert_eq!("strict".parse(), Ok(Consistency::Strict));
        let err = "eventual".parse::<Consistency>().unwrap_err();
        assert!(err.contains("\"eventual\""), "{err}");
        assert!(err.contains("cached, strict"), "{err}");
        let parsed: Consistency = serde_json::from_str("\"cached\"").unwrap();
        assert_eq!(parsed, Consistency::Cached);
        assert_eq!(Consistency::default(), Consistency::Cached);
    }

    #[tokio::test(start_paused = true)]
    async fn cached_mode_times_attributes_by_freshness_and_reads_the_reported_version() {
        let w = world_in(&SPEC, Consistency::Cached);
        let caller = Caller::default();
        let api = w.fs.lookup(InodeNo::ROOT, "api", caller).await.unwrap();
        assert_eq!(
            api.ttl,
            Duration::from_secs(30),
            "a fresh value: the whole TTL"
        );
        let db = w.fs.lookup(InodeNo::ROOT, "db", caller).await.unwrap();
        assert_eq!(
            db.ttl,
            Duration::from_secs(1),
            "directories keep the volume's"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let again = w.fs.getattr(api.ino, caller).await.unwrap();
        assert_eq!(again.ttl, Duration::from_secs(20), "the rest of the TTL");
        // Rotated in Vault and re-checked by the cache: reads without a handle keep serving
        // the version the kernel was last told about until attributes are answered again.
        w.source.put("secret/api", &[("token", "t-2-longer")]);
        tokio::time::advance(Duration::from_secs(21)).await;
        w.fs.open_unpinned(api.ino, false, caller).await.unwrap();
        assert_eq!(w.fs.open_handles(), 0, "no version pinned");
        assert_eq!(read_all(&w.fs, api.ino, 0).await, b"t-1");
        let new = w.fs.getattr(api.ino, caller).await.unwrap();
        assert_eq!(new.size, 10);
        assert!(new.mtime > api.mtime);
        assert_eq!(read_all(&w.fs, api.ino, 0).await, b"t-2-longer");
        // Deleted in Vault: the next answer is ENOENT and reads stop serving the old version.
        w.source.delete("secret/api");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(w.fs.getattr(api.ino, caller).await, Err(FsError::NotFound));
        assert!(w.fs.read(api.ino, 0, 0, 4096).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn errors_map_to_errnos() {
        let w = world(&[
            "gone=secret/missing",
            "nokey=secret/api#nokey",
            "api=secret/api#token",
        ]);
        let gone = w.fs.spec.child(InodeNo::ROOT, "gone").unwrap().ino;
        let err = w.fs.open(gone, false, Caller::default()).await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        let err =
            w.fs.lookup(InodeNo::ROOT, "nokey", Caller::default())
                .await
                .unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        let api = w.fs.spec.child(InodeNo::ROOT, "api").unwrap().ino;
        assert_eq!(
            w.fs.open(api, true, Caller::default())
                .await
                .unwrap_err()
                .errno(),
            libc::EROFS
        );
        assert_eq!(
            w.fs.open(InodeNo::ROOT, false, Caller::default())
                .await
                .unwrap_err()
                .errno(),
            libc::EISDIR
        );
        assert_eq!(w.fs.readdir(api, 0).unwrap_err().errno(), libc::ENOTDIR);
        w.source.fail(SourceError::PermissionDenied);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            w.fs.getattr(api, Caller::default())
                .await
                .unwrap_err()
                .errno(),
            libc::EACCES
        );
        let refused = FsError::from(SourceError::LoginRefused("role gone".into()));
        assert_eq!(refused.errno(), libc::EACCES);
        w.source.fail(SourceError::Unavailable("down".into()));
        let other = world(&["x=secret/api#token"]);
        other.source.fail(SourceError::Unavailable("down".into()));
        let x = other.fs.spec.child(InodeNo::ROOT, "x").unwrap().ino;
        assert_eq!(
            other
                .fs
                .getattr(x, Caller::default())
                .await
                .unwrap_err()
                .errno(),
            libc::EIO
        );
    }

    fn template(name: &str, text: &str) -> crate::spec::SecretEntry {
        crate::spec::template_entry(name, text).unwrap()
    }

    async fn file(w: &World, name: &str) -> Result<Attr, FsError> {
        w.fs.lookup(InodeNo::ROOT, name, Caller::default()).await
    }

    async fn text(w: &World, name: &str) -> String {
        let attr = file(w, name).await.unwrap();
        let fh = w.fs.open(attr.ino, false, Caller::default()).await.unwrap();
        let bytes = read_all(&w.fs, attr.ino, fh).await;
        w.fs.release(fh);
        assert_eq!(
            attr.size,
            bytes.len() as u64,
            "stat shows the rendered size"
        );
        String::from_utf8(bytes).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_template_over_two_secrets_renders_lazily_and_follows_either_rotation() {
        let w = world_of(
            vec![
                template(
                    "conn",
                    "{{ secret('secret/db').user }}:{{ secret('secret/db').password }}/{{ secret('secret/api').token }}",
                ),
                parse_secret_arg("pw=secret/db#password").unwrap(),
            ],
            Consistency::Strict,
        );
        assert_eq!(w.source.reads(), 0, "publishing reads nothing");
        assert_eq!(text(&w, "conn").await, "app:pw-1/t-1");
        // The plain entry on the same path shares the cached read.
        assert_eq!(text(&w, "pw").await, "pw-1");
        assert_eq!(w.source.reads(), 2, "one read per secret");
        w.source.put("secret/api", &[("token", "t-2-longer")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(text(&w, "conn").await, "app:pw-1/t-2-longer");
        let conn = file(&w, "conn").await.unwrap().ino;
        assert!(
            w.invalidated.lock().contains(&conn),
            "the template's inode is invalidated when a secret it reads changes"
        );
        w.source
            .put("secret/db", &[("user", "app"), ("password", "pw-2")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(text(&w, "conn").await, "app:pw-2/t-2-longer");
    }

    #[tokio::test(start_paused = true)]
    async fn one_dynamic_secret_read_twice_in_a_template_is_one_lease() {
        let w = world_of(
            vec![template(
                "creds",
                "{{ secret('database/creds/app').username }} {{ secret('database/creds/app').password }}",
            )],
            Consistency::Strict,
        );
        w.source.put_unversioned(
            "database/creds/app",
            &[("username", "u-1"), ("password", "p-1")],
        );
        w.source.set_lease(Some(Duration::from_secs(60)), None);
        assert_eq!(text(&w, "creds").await, "u-1 p-1");
        assert_eq!(
            w.source.reads(),
            1,
            "one read, one lease, both fields from it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_field_or_secret_is_enoent_naming_it_and_an_unchanged_rendering_is_reused() {
        let w = world_of(
            vec![
                template("typo", "{{ secret('secret/db').pasword }}"),
                template("gone", "{{ secret('secret/nope').x }}"),
                template("ok", "{{ secret('secret/db').user }}"),
            ],
            Consistency::Cached,
        );
        let err = file(&w, "typo").await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(
            err.to_string().contains("\"pasword\" of secret/db"),
            "{err}"
        );
        let err = file(&w, "gone").await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.to_string().contains("secret/nope"), "{err}");
        let first = file(&w, "ok").await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let again = file(&w, "ok").await.unwrap();
        assert_eq!(first.mtime, again.mtime, "nothing changed, same rendering");
        assert_eq!(
            again.ttl,
            Duration::from_secs(20),
            "a cached template's timeout is its secrets' remaining freshness"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn check_all_asks_vault_only_once_freshness_runs_out_and_swaps_changes() {
        let w = world(&SPEC);
        let first = w.fs.check_all().await.unwrap();
        let reads = w.source.reads();
        assert_eq!(reads, 2, "one read per Vault path, not per file");
        assert_eq!(first, Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(10)).await;
        let left = w.fs.check_all().await.unwrap();
        assert_eq!(left, Duration::from_secs(20));
        assert_eq!(
            w.source.reads() + w.source.version_checks(),
            reads,
            "fresh: nothing asked"
        );
        w.source.put("secret/api", &[("token", "t-2")]);
        tokio::time::advance(left).await;
        w.fs.check_all().await.unwrap();
        let api = w.fs.child_ino(InodeNo::ROOT, "api").unwrap();
        assert_eq!(
            *w.invalidated.lock(),
            vec![api],
            "the changed file alone is swapped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_template_recovers_once_a_secret_it_no_longer_reads_is_gone() {
        let w = world_of(
            vec![template(
                "pointer",
                "{{ secret(secret('secret/cfg').target).token }}",
            )],
            Consistency::Strict,
        );
        w.source.put("secret/cfg", &[("target", "secret/old")]);
        let err = file(&w, "pointer").await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT, "{err}");
        // The pointer is fixed: the secret the last rendering asked for is still missing, and
        // must not keep the file failing.
        w.source.put("secret/cfg", &[("target", "secret/api")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(text(&w, "pointer").await, "t-1");
    }
}
