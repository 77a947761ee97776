//! Filesystem logic, independent of FUSE: lookup, getattr, open, read, readdir and release of
//! one volume (`VaultFs`) over a `VolumeSpec` and a `SecretCache`, with the audit events of
//! its accesses. Answers are small structs or an `FsError` that carries its errno and log level
//! (`error`); what a file shows and the template renderings are `shown`'s. The `fuse` adapter
//! only routes requests here and translates the answers into replies.

mod error;
mod shown;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::audit::{self, Caller};
use crate::cache::{SecretCache, SwapHook};
use crate::logging::FailureLimiter;
use crate::source::SecretSource;
use crate::spec::{CertPart, InodeNo, Node, NodeKind, SecretPath, Shows, VolumeSpec};

pub use error::FsError;
pub use shown::ReadSlice;
use shown::{join_paths, Renderings, Shown};

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

pub struct VaultFs<S> {
    spec: Arc<VolumeSpec>,
    cache: Arc<SecretCache<S>>,
    config: FsConfig,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Cached mode: the version whose attributes were last answered for each file, which reads
    /// without a handle of ours serve, so the kernel's pages of a file come from the version
    /// whose size and mtime it holds.
    reported: Mutex<HashMap<InodeNo, Shown>>,
    /// The template entries' renderings.
    templates: Renderings,
    next_fh: AtomicU64,
    created: SystemTime,
    /// Aggregates repeated refusals in the audit trail (per entry, uid and errno).
    refusals: FailureLimiter<(usize, u32, &'static str)>,
    /// Strict mode: the certificate each process is reading the files of (`paired`).
    pairs: Mutex<HashMap<(Process, SecretPath), PairRound>>,
}

/// A process reading a certificate entry's files one open after the other: the version it
/// got first and the files it opened since. It keeps that version until it opens one of the
/// files again (a new round), so its key and certificate are always one pair.
struct PairRound {
    content: Shown,
    opened: u8,
    started: std::time::Instant,
    lasts: Duration,
}

/// Longest a round of opens keeps its version.
const PAIR_ROUND_MAX: Duration = Duration::from_secs(10);

/// Most rounds kept at once (beyond it, all are dropped: each is a few seconds long).
const MAX_PAIR_ROUNDS: usize = 4096;

/// A process as the rounds know it: its id (the thread group) and start time, so that neither
/// its threads nor a later process given the same id are another's round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Process {
    pid: u32,
    started: u64,
}

/// The process of the thread `tid` a FUSE request names, from `/proc`; `None` for 0 (a caller
/// in a pid namespace this daemon does not see) or a thread that is gone.
fn process_of(tid: u32) -> Option<Process> {
    if tid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let pid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command name's closing parenthesis (field 2).
    let started = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some(Process { pid, started })
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
        let created = SystemTime::now();
        Self {
            spec,
            cache,
            config,
            handles: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            templates: Renderings::new(created),
            refusals: FailureLimiter::default(),
            next_fh: AtomicU64::new(epoch),
            created,
            pairs: Mutex::new(HashMap::new()),
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
            Shows::Secret { path, .. } | Shows::Certificate { path, .. } => path.to_string(),
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
                    let version = shown.version();
                    let event = audit::Event::Access {
                        op,
                        version: &version,
                    };
                    audit::record(event, self.place(entry, &paths), caller);
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
            let event = audit::Event::Refused { op, errno, repeats };
            audit::record(event, self.place(entry, &paths), caller);
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
        let shown = match &self.spec.entries()[entry].shows {
            Shows::Certificate { path, part } if self.config.consistency == Consistency::Strict => {
                match process_of(caller.pid) {
                    Some(process) => self.paired(process, path, *part, shown),
                    // A pid this daemon cannot see (another pid namespace): no pairing.
                    None => shown,
                }
            }
            _ => shown,
        };
        let paths = self.shown_paths(entry, &shown);
        let version = shown.version();
        let event = audit::Event::Open { version: &version };
        audit::record(event, self.place(entry, &paths), caller);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, shown });
        Ok(fh)
    }

    /// The version of certificate `path` `process` gets when it opens its file `part`: within
    /// a round of opens of the entry's files (each file once, within a third of the
    /// certificate's lifetime and `PAIR_ROUND_MAX`, so never past its expiry), the version the
    /// round started with; `current` otherwise, starting a round.
    fn paired(&self, process: Process, path: &SecretPath, part: CertPart, current: Shown) -> Shown {
        let bit = 1u8 << (part as u8);
        let mut pairs = self.pairs.lock();
        let key = (process, path.clone());
        if let Some(round) = pairs.get_mut(&key) {
            if round.opened & bit == 0 && round.started.elapsed() < round.lasts {
                round.opened |= bit;
                return round.content.clone();
            }
        }
        pairs.retain(|_, round| round.started.elapsed() < round.lasts);
        if pairs.len() >= MAX_PAIR_ROUNDS {
            pairs.clear();
        }
        let lifetime = match &current {
            Shown::Secret(content) => content.fetched.lease.as_ref().map(|l| l.duration),
            Shown::Rendered(_) => None,
        };
        pairs.insert(
            key,
            PairRound {
                content: current.clone(),
                opened: bit,
                started: std::time::Instant::now(),
                lasts: lifetime.map_or(Duration::ZERO, |l| (l / 3).min(PAIR_ROUND_MAX)),
            },
        );
        current
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
        self.pairs.lock().clear();
        self.templates.clear();
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
                // Never issued by the watch: a certificate's renewals are the lease keeper's,
                // and its swaps already reach the reloader.
                Shows::Certificate { path, .. } => {
                    if let Some(left) = self.cache.due_in(path).filter(|l| !l.is_zero()) {
                        soonest = Some(soonest.map_or(left, |s| s.min(left)));
                    }
                    continue;
                }
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
            Shows::Secret { .. } | Shows::Certificate { .. } => {
                let (path, key) = self.spec.entries()[entry]
                    .secret()
                    .expect("a secret or certificate entry");
                let content = self.cache.get(path).await?;
                if content.fetched.data.render(key).is_none() {
                    // Logged (rate-limited, naming the file) where the request is answered.
                    return Err(FsError::MissingField(key.unwrap_or_default().to_string()));
                }
                Ok(Shown::Secret(content))
            }
            Shows::Template(t) => {
                (self.templates.render(&self.cache, entry, t).await).map(Shown::Rendered)
            }
        }
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

#[cfg(test)]
pub(crate) mod tests;
