//! The `fuser::Filesystem` adapter: each method is one call into `fs::VaultFs` plus one reply.
//! Calls that can be answered from memory are answered on the FUSE thread; calls that must
//! wait for Vault continue on the tokio runtime and reply from there. Every answer passes
//! through `drive`, the one place that times, counts and logs errors.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::audit::Caller;
use crate::fs::{Attr, Consistency, DirEntry, FsError, Kind, VaultFs};
use crate::logging::FailureLimiter;
use crate::metrics::{Metrics, Op};
use crate::quarantine::{InFlight, Quarantine};
use crate::source::SecretSource;
use crate::spec::InodeNo;
use parking_lot::RwLock;

/// Whether the request `unique` was queued again by the kernel after a takeover
/// (FUSE_NOTIFY_RESEND marks resent requests with bit 63).
pub fn is_resent(unique: u64) -> bool {
    unique & (1 << 63) != 0
}

/// A volume's number on a node-wide connection: its directory `<slot>` under the
/// connection's root, and the high half of its inode numbers. Recorded with the volume, so the
/// same volume keeps the same numbers.
pub type Slot = u32;

/// The volumes one FUSE connection serves. `vaultfs mount` serves one volume as the whole
/// filesystem; `vaultfs csi` serves every volume of the node on one connection, each as the
/// directory `<slot>` of an otherwise empty root, with inode numbers `slot << 32 | local`.
pub struct Volumes<S> {
    single: Option<Arc<VaultFs<S>>>,
    by_slot: RwLock<HashMap<Slot, Served<S>>>,
    created: SystemTime,
    /// Counts each volume's requests in flight and fences off quarantined volumes (`vaultfs
    /// csi`, unless turned off).
    quarantine: Option<Arc<Quarantine>>,
}

struct Served<S> {
    fs: Arc<VaultFs<S>>,
    /// Unpublished: forgotten once its last open file is closed.
    retiring: bool,
}

/// What an inode number of the connection designates.
enum Resolved<S> {
    /// The node-wide root (never reachable from a pod: pods see bind mounts of volumes).
    NodeRoot,
    Volume {
        fs: Arc<VaultFs<S>>,
        slot: Slot,
        local: InodeNo,
    },
    Gone,
}

impl<S: SecretSource> Volumes<S> {
    /// One volume as the whole filesystem (`vaultfs mount`).
    pub fn single(fs: Arc<VaultFs<S>>) -> Arc<Self> {
        Arc::new(Self {
            single: Some(fs),
            by_slot: RwLock::default(),
            created: SystemTime::now(),
            quarantine: None,
        })
    }

    /// An empty node-wide table (`vaultfs csi`), its volumes under `quarantine` if any.
    pub fn node(quarantine: Option<Arc<Quarantine>>) -> Arc<Self> {
        Arc::new(Self {
            single: None,
            by_slot: RwLock::default(),
            created: SystemTime::now(),
            quarantine,
        })
    }

    /// Serves `fs` as directory `slot`, replacing whatever was there.
    pub fn attach(&self, slot: Slot, fs: Arc<VaultFs<S>>) {
        if let Some(quarantine) = &self.quarantine {
            quarantine.attached(slot, &fs.config().volume);
        }
        self.by_slot.write().insert(
            slot,
            Served {
                fs,
                retiring: false,
            },
        );
    }

    /// Stops serving `slot` to new lookups; it is forgotten at once if no file of it is open,
    /// else when the last one closes.
    pub fn retire(&self, slot: Slot) {
        if let Some(quarantine) = &self.quarantine {
            quarantine.detached(slot);
        }
        let mut table = self.by_slot.write();
        if let Some(served) = table.get_mut(&slot) {
            if served.fs.open_handles() == 0 {
                table.remove(&slot);
            } else {
                served.retiring = true;
            }
        }
    }

    /// Number of volumes served (retiring ones included).
    pub fn len(&self) -> usize {
        self.single.iter().count() + self.by_slot.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection-wide inode number of `local` in volume `slot`.
    pub fn global(&self, slot: Slot, local: InodeNo) -> u64 {
        if self.single.is_some() {
            local.0
        } else {
            (u64::from(slot) << 32) | local.0
        }
    }

    fn resolve(&self, ino: u64) -> Resolved<S> {
        if let Some(fs) = &self.single {
            return Resolved::Volume {
                fs: fs.clone(),
                slot: 0,
                local: InodeNo(ino),
            };
        }
        if ino == InodeNo::ROOT.0 {
            return Resolved::NodeRoot;
        }
        let slot = (ino >> 32) as Slot;
        match self.by_slot.read().get(&slot) {
            Some(served) => Resolved::Volume {
                fs: served.fs.clone(),
                slot,
                local: InodeNo(ino & 0xffff_ffff),
            },
            None => Resolved::Gone,
        }
    }

    /// The volume a node-root lookup of `name` finds (not a retiring one).
    fn by_name(&self, name: &str) -> Option<(Slot, Arc<VaultFs<S>>)> {
        let slot: Slot = name.parse().ok().filter(|s: &Slot| s.to_string() == name)?;
        let table = self.by_slot.read();
        let served = table.get(&slot).filter(|s| !s.retiring)?;
        Some((slot, served.fs.clone()))
    }

    /// Forgets a retiring volume whose last open file just closed.
    fn released(&self, slot: Slot) {
        let mut table = self.by_slot.write();
        if table
            .get(&slot)
            .is_some_and(|s| s.retiring && s.fs.open_handles() == 0)
        {
            table.remove(&slot);
        }
    }

    /// Whether request `op` about connection inode `ino` is refused because its volume is
    /// quarantined: everything but the attributes of the volume's root directory (mount
    /// checks, kubelet's and the container runtime's, ask for those; they come from the spec).
    fn fences(&self, op: Op, ino: u64) -> bool {
        let Some(quarantine) = &self.quarantine else {
            return false;
        };
        let root = matches!(op, Op::Getattr | Op::Lookup) && ino & 0xffff_ffff == InodeNo::ROOT.0;
        quarantine.fences((ino >> 32) as Slot) && !root
    }

    /// Counts a request about connection inode `ino` in flight for its volume.
    fn enter(&self, ino: u64) -> Option<InFlight> {
        let quarantine = self.quarantine.as_ref()?;
        Some(quarantine.enter((ino >> 32) as Slot))
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: InodeNo::ROOT,
            kind: Kind::Dir,
            size: 0,
            perm: 0o500,
            nlink: 2,
            uid: 0,
            gid: 0,
            mtime: self.created,
            ttl: NODE_ROOT_TTL,
        }
    }
}

/// How long the kernel may cache the node root's names and attributes.
const NODE_ROOT_TTL: Duration = Duration::from_secs(1);

pub struct FuseAdapter<S> {
    volumes: Arc<Volumes<S>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// Asked of the kernel at INIT (`None`: the kernel's default).
    max_background: Option<u16>,
    /// Warnings of failed requests, at most one per (inode, errno) per window.
    failures: Arc<FailureLimiter<(u64, &'static str)>>,
    /// Cached mode: OPEN is answered `ENOSYS` (FUSE_NO_OPEN_SUPPORT), so the kernel stops
    /// sending OPEN and RELEASE on this connection and serves file contents from its page
    /// cache, dropping a file's pages when its mtime or size changes (FUSE_AUTO_INVAL_DATA).
    /// Per connection: every volume it serves must be of the same mode.
    no_open: bool,
}

impl<S: SecretSource> FuseAdapter<S> {
    pub fn new(
        volumes: Arc<Volumes<S>>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            volumes,
            runtime,
            metrics,
            max_background: None,
            failures: Arc::default(),
            no_open: false,
        }
    }

    /// Serves the connection in `consistency` mode (see `no_open`); cached mode falls back to
    /// strict if the kernel does not offer both capabilities at INIT.
    pub fn with_consistency(mut self, consistency: Consistency) -> Self {
        self.no_open = consistency == Consistency::Cached;
        self
    }

    /// Asks the kernel to hand the connection up to `n` background requests (reads) at once
    /// before queueing, with the congestion threshold at three quarters of it.
    pub fn with_max_background(mut self, n: u16) -> Self {
        self.max_background = Some(n);
        self
    }

    /// Counts a request the kernel sent again after a takeover (FUSE_NOTIFY_RESEND): one the
    /// previous daemon had read and not answered.
    fn count_resent(&self, req: &Request) {
        if is_resent(req.unique().0) {
            self.metrics.resent_requests.inc();
        }
    }

    /// Runs `work` (a request about connection inode `ino`, file `local` of volume `fs` when
    /// it is one) and hands its result to `done`: at once when it completes without waiting
    /// (cache hits), otherwise as a task on the runtime, so the FUSE thread never blocks on
    /// Vault. Failures are counted, and logged at most once per inode and errno per window with
    /// the number left out.
    fn drive<T, F>(
        &self,
        op: Op,
        ino: u64,
        about: Option<(Arc<VaultFs<S>>, InodeNo)>,
        work: F,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        T: Send + 'static,
        F: Future<Output = Result<T, FsError>> + Send + 'static,
    {
        if about.is_some() && self.volumes.fences(op, ino) {
            // Nothing of the volume runs: `work` is dropped unpolled.
            return self.refuse(op, ino, FsError::Quarantined, done);
        }
        // Kept until the reply is written: a daemon that dies meanwhile leaves it counted.
        let in_flight = about.as_ref().and_then(|_| self.volumes.enter(ino));
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let failures = self.failures.clone();
        metrics.fuse_requests_in_flight.inc();
        let finish = move |result: Result<T, FsError>| {
            metrics.fuse_op(op, started.elapsed());
            let answer = result.map_err(|err| {
                let errno = err.errno_name();
                metrics.fuse_error(op, errno);
                match err {
                    // A quarantine is logged once, when it starts.
                    FsError::NotFound | FsError::ReadOnly | FsError::Quarantined => {
                        tracing::debug!(op = op.name(), error = %err, "request refused")
                    }
                    _ => {
                        if let Some(suppressed) = failures.admit((ino, errno)) {
                            let (volume, file, path) = match &about {
                                Some((fs, local)) => {
                                    let (file, path) = fs
                                        .describe(*local)
                                        .map_or(("-", "-".to_string()), |(f, p)| {
                                            (f, p.to_string())
                                        });
                                    (fs.config().volume.as_str(), file, path)
                                }
                                None => ("-", "-", "-".to_string()),
                            };
                            tracing::warn!(volume, file, vault_path = path, op = op.name(), errno, error = %err, suppressed, "request failed");
                        }
                    }
                }
                Errno::from_i32(err.errno())
            });
            done(answer);
            // After the reply is written: a stopping daemon waits for this to reach zero.
            metrics.fuse_requests_in_flight.dec();
            drop(in_flight);
        };
        answer_now_or_on_runtime(&self.runtime, work, finish);
    }

    /// Answers a request about an inode no volume serves (the node root's missing names, an
    /// unpublished volume) through the same accounting as every other answer.
    fn refuse<T: Send + 'static>(
        &self,
        op: Op,
        ino: u64,
        err: FsError,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) {
        self.drive(op, ino, None, std::future::ready(Err(err)), done);
    }

    fn mapping(&self, slot: Slot) -> Mapping {
        Mapping {
            slot,
            node: self.volumes.single.is_none(),
        }
    }

    fn read_only(&self, reply: impl FnOnce(Errno)) {
        self.metrics.fuse_op(Op::Write, Duration::ZERO);
        self.metrics
            .fuse_error(Op::Write, FsError::ReadOnly.errno_name());
        reply(Errno::EROFS);
    }
}

/// Turns a volume's own inode numbers into the connection's (see `Volumes`).
#[derive(Clone, Copy)]
struct Mapping {
    slot: Slot,
    node: bool,
}

impl Mapping {
    fn global(self, local: InodeNo) -> u64 {
        if self.node {
            (u64::from(self.slot) << 32) | local.0
        } else {
            local.0
        }
    }

    /// `work`'s attributes with the connection's inode number.
    async fn attr(
        self,
        work: impl Future<Output = Result<Attr, FsError>>,
    ) -> Result<Attr, FsError> {
        work.await.map(|a| Attr {
            ino: InodeNo(self.global(a.ino)),
            ..a
        })
    }
}

/// Polls `work` once on the calling thread, inside `runtime`: a result that is ready goes to
/// `finish` at once; otherwise the rest of `work` runs as a task on `runtime`, which hands the
/// result to `finish` when it completes.
fn answer_now_or_on_runtime<T, F>(
    runtime: &tokio::runtime::Handle,
    work: F,
    finish: impl FnOnce(T) + Send + 'static,
) where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let _in_runtime = runtime.enter();
    let mut work = Box::pin(work);
    match work.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => finish(result),
        Poll::Pending => {
            runtime.spawn(async move { finish(work.await) });
        }
    }
}

fn caller_of(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl<S: SecretSource> Filesystem for FuseAdapter<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Some(n) = self.max_background {
            // The kernel caps both at its own limits; a refusal keeps its defaults.
            let _ = config.set_max_background(n);
            let _ = config.set_congestion_threshold(n / 4 * 3);
        }
        if self.no_open {
            let wanted = InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_AUTO_INVAL_DATA;
            if let Err(missing) = config.add_capabilities(wanted) {
                tracing::warn!(
                    missing = ?missing,
                    "the kernel does not offer what cached consistency needs; serving this connection in strict mode"
                );
                self.no_open = false;
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count_resent(req);
        let caller = caller_of(req);
        let name = name.to_string_lossy().into_owned();
        // The answer's own timeout (`Attr::ttl`): a cached-mode file's is its remaining
        // freshness.
        let answer = move |r: Result<Attr, Errno>| match r {
            Ok(attr) => reply.entry(&attr.ttl, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(e),
        };
        match self.volumes.resolve(parent.0) {
            Resolved::NodeRoot => match self.volumes.by_name(&name) {
                Some((slot, fs)) => {
                    let map = self.mapping(slot);
                    let about = Some((fs.clone(), InodeNo::ROOT));
                    let work = async move { fs.getattr(InodeNo::ROOT, caller).await };
                    let ino = map.global(InodeNo::ROOT);
                    self.drive(Op::Lookup, ino, about, map.attr(work), answer);
                }
                None => self.refuse(Op::Lookup, parent.0, FsError::NotFound, answer),
            },
            Resolved::Volume { fs, slot, local } => {
                let map = self.mapping(slot);
                // Failures are keyed (and logged) by the file looked up when it exists.
                let child = fs.child_ino(local, &name).unwrap_or(local);
                let about = Some((fs.clone(), child));
                let work = async move { fs.lookup(local, &name, caller).await };
                self.drive(Op::Lookup, map.global(child), about, map.attr(work), answer);
            }
            Resolved::Gone => self.refuse(Op::Lookup, parent.0, FsError::NotFound, answer),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count_resent(req);
        let caller = caller_of(req);
        let answer = move |r: Result<Attr, Errno>| match r {
            Ok(attr) => reply.attr(&attr.ttl, &file_attr(&attr)),
            Err(e) => reply.error(e),
        };
        match self.volumes.resolve(ino.0) {
            Resolved::NodeRoot => {
                let root = self.volumes.root_attr();
                self.drive(
                    Op::Getattr,
                    ino.0,
                    None,
                    std::future::ready(Ok(root)),
                    answer,
                );
            }
            Resolved::Volume { fs, slot, local } => {
                let map = self.mapping(slot);
                let about = Some((fs.clone(), local));
                let work = async move { fs.getattr(local, caller).await };
                self.drive(Op::Getattr, ino.0, about, map.attr(work), answer);
            }
            Resolved::Gone => self.refuse(Op::Getattr, ino.0, FsError::NotFound, answer),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count_resent(req);
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let caller = caller_of(req);
        // Direct I/O: every read reaches the handle's pinned version, so a descriptor opened
        // before a rotation keeps reading the old version even after new opens see the new.
        let answer = move |r: Result<u64, Errno>| match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        };
        match self.volumes.resolve(ino.0) {
            Resolved::Volume { fs, local, .. } if self.no_open => {
                // Audited as an open; ENOSYS then makes the kernel open this and every later
                // file of the connection without asking, reading through its page cache.
                let about = Some((fs.clone(), local));
                let work = async move { fs.open_unpinned(local, write, caller).await };
                let answer = move |r: Result<(), Errno>| match r {
                    Ok(()) => answer(Err(Errno::ENOSYS)),
                    Err(e) => answer(Err(e)),
                };
                self.drive(Op::Open, ino.0, about, work, answer);
            }
            Resolved::Volume { fs, local, .. } => {
                let about = Some((fs.clone(), local));
                let work = async move { fs.open(local, write, caller).await };
                self.drive(Op::Open, ino.0, about, work, answer);
            }
            Resolved::NodeRoot => self.refuse(Op::Open, ino.0, FsError::IsADirectory, answer),
            Resolved::Gone => self.refuse(Op::Open, ino.0, FsError::NotFound, answer),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count_resent(req);
        let answer = move |r: Result<crate::fs::ReadSlice, Errno>| match r {
            Ok(slice) => reply.data(slice.bytes()),
            Err(e) => reply.error(e),
        };
        match self.volumes.resolve(ino.0) {
            Resolved::Volume { fs, local, .. } => {
                let about = Some((fs.clone(), local));
                let work = async move { fs.read(local, fh.0, offset, size).await };
                self.drive(Op::Read, ino.0, about, work, answer);
            }
            Resolved::NodeRoot => self.refuse(Op::Read, ino.0, FsError::IsADirectory, answer),
            Resolved::Gone => self.refuse(Op::Read, ino.0, FsError::NotFound, answer),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let started = Instant::now();
        if let Resolved::Volume { fs, slot, .. } = self.volumes.resolve(ino.0) {
            fs.release(fh.0);
            self.volumes.released(slot);
        }
        self.metrics.fuse_op(Op::Release, started.elapsed());
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only filesystem. ENOSYS tells the kernel to treat every
        // later flush as a success without asking, saving a round trip per close.
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No file here is a terminal or a device: ENOTTY is the answer a program probing one
        // (Python's `open()` asks whether it is a tty) expects, and an everyday one, not logged.
        reply.error(Errno::ENOTTY);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count_resent(req);
        let answer = move |r: Result<Vec<DirEntry>, Errno>| match r {
            Ok(entries) => {
                for e in entries {
                    let kind = match e.kind {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(e.ino.0), e.offset, kind, &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        };
        match self.volumes.resolve(ino.0) {
            Resolved::Volume { fs, slot, local } => {
                let map = self.mapping(slot);
                let about = Some((fs.clone(), local));
                let work = async move {
                    fs.readdir(local, offset).map(|entries| {
                        entries
                            .into_iter()
                            .map(|e| DirEntry {
                                ino: InodeNo(map.global(e.ino)),
                                ..e
                            })
                            .collect()
                    })
                };
                self.drive(Op::Readdir, ino.0, about, work, answer);
            }
            // The node root lists nothing: volumes are reached by name only, and only by the
            // daemon (pods see bind mounts of their own volume).
            Resolved::NodeRoot => {
                let dots = [(".", 1), ("..", 2)]
                    .into_iter()
                    .filter(|(_, next)| *next > offset)
                    .map(|(name, next)| DirEntry {
                        ino: InodeNo::ROOT,
                        offset: next,
                        kind: Kind::Dir,
                        name: name.to_string(),
                    })
                    .collect();
                self.drive(
                    Op::Readdir,
                    ino.0,
                    None,
                    std::future::ready(Ok(dots)),
                    answer,
                );
            }
            Resolved::Gone => self.refuse(Op::Readdir, ino.0, FsError::NotFound, answer),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are enforced by the kernel (default_permissions); only writes are
        // refused here.
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.read_only(|e| reply.error(e));
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.read_only(|e| reply.error(e));
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        self.read_only(|e| reply.error(e));
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        self.read_only(|e| reply.error(e));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.read_only(|e| reply.error(e));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        self.read_only(|e| reply.error(e));
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        self.read_only(|e| reply.error(e));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.read_only(|e| reply.error(e));
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        self.read_only(|e| reply.error(e));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        self.read_only(|e| reply.error(e));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::{self, ThreadId};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("build a runtime")
    }

    #[test]
    fn a_ready_answer_is_given_on_the_calling_thread_before_returning() {
        let rt = runtime();
        let (tx, rx) = mpsc::channel::<(u32, ThreadId)>();
        answer_now_or_on_runtime(rt.handle(), async { 7 }, move |v| {
            tx.send((v, thread::current().id()))
                .expect("receiver alive");
        });
        // No waiting: the answer must already be there when the call returns.
        let (value, on) = rx.try_recv().expect("a ready future is answered at once");
        assert_eq!(value, 7);
        assert_eq!(on, thread::current().id());
    }

    #[test]
    fn a_pending_answer_is_completed_later_on_the_runtime() {
        let rt = runtime();
        let (release, released) = tokio::sync::oneshot::channel::<u32>();
        let (tx, rx) = mpsc::channel::<(u32, ThreadId)>();
        answer_now_or_on_runtime(
            rt.handle(),
            async move { released.await.expect("sender alive") },
            move |v| {
                tx.send((v, thread::current().id()))
                    .expect("receiver alive");
            },
        );
        assert!(
            rx.try_recv().is_err(),
            "a pending future must not be answered before it completes"
        );
        release.send(9).expect("the task holds the receiver");
        let (value, on) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the runtime completes the pending future");
        assert_eq!(value, 9);
        assert_ne!(
            on,
            thread::current().id(),
            "the pending answer must come from a runtime thread, not the caller"
        );
    }
}
