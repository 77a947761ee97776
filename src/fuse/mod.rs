//! The `fuser::Filesystem` adapter: each method routes its request to a volume (`routing`),
//! makes one call into the fs layer and replies. Calls that can be answered from memory are
//! answered on the FUSE thread; calls that must wait for Vault continue on the tokio runtime
//! and reply from there. Every answer passes through `drive`, the one place that times, counts,
//! traces (a span per request, with the kernel's request id) and logs errors, each at the level
//! the error carries (`FsError::level`).

mod routing;

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
use tracing::{Instrument, Level, Span};

use crate::audit::Caller;
use crate::fs::{Attr, Consistency, DirEntry, FsError, Kind, ReadSlice};
use crate::logging::FailureLimiter;
use crate::metrics::{Metrics, Op};
use crate::source::SecretSource;

pub use routing::Volumes;
use routing::{Routed, Subject};

/// Whether the request `unique` was queued again by the kernel after a takeover
/// (FUSE_NOTIFY_RESEND marks resent requests with bit 63).
pub fn is_resent(unique: u64) -> bool {
    unique & (1 << 63) != 0
}

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

    /// Runs a routed request's work and hands its result to `done`: at once when it completes
    /// without waiting (cache hits), otherwise as a task on the runtime, so the FUSE thread
    /// never blocks on Vault. The work runs in the request's span (debug level: `req` is the
    /// kernel's unique id). Failures are counted and logged at their level; warnings at most
    /// once per inode and errno per window, with the number left out.
    fn drive<T, F>(
        &self,
        req: &Request,
        op: Op,
        routed: Routed<S, F>,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        T: Send + 'static,
        F: Future<Output = Result<T, FsError>> + Send + 'static,
    {
        let Routed { subject, work } = routed;
        let span = request_span(req, op, subject.ino);
        if is_resent(req.unique().0) {
            // One the previous daemon had read and not answered (FUSE_NOTIFY_RESEND).
            self.metrics.resent_requests.inc();
        }
        // A fenced request counts nothing in flight and runs nothing of its volume: `work` is
        // dropped unpolled. A quarantine is logged once, when it starts.
        let fenced = self.volumes.fences(op, &subject);
        let work = async move {
            if fenced {
                return Err(FsError::Quarantined);
            }
            work.await
        };
        // Kept until the reply is written: a daemon that dies meanwhile leaves it counted.
        let in_flight = (!fenced).then(|| self.volumes.enter(&subject)).flatten();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let failures = self.failures.clone();
        metrics.fuse_requests_in_flight.inc();
        let finish = move |result: Result<T, FsError>| {
            metrics.fuse_op(op, started.elapsed());
            let answer = result.map_err(|err| {
                metrics.fuse_error(op, err.errno_name());
                log_failure(op, &subject, &err, &failures);
                Errno::from_i32(err.errno())
            });
            done(answer);
            // After the reply is written: a stopping daemon waits for this to reach zero.
            metrics.fuse_requests_in_flight.dec();
            drop(in_flight);
        };
        answer_now_or_on_runtime(&self.runtime, span, work, finish);
    }

    fn read_only(&self, reply: impl FnOnce(Errno)) {
        self.metrics.fuse_op(Op::Write, Duration::ZERO);
        self.metrics
            .fuse_error(Op::Write, FsError::ReadOnly.errno_name());
        reply(Errno::EROFS);
    }
}

/// The span of request `req` (operation `op` about connection inode `ino`). Debug level: when
/// that is off, creating it costs a check of a cached flag.
fn request_span(req: &Request, op: Op, ino: u64) -> Span {
    tracing::debug_span!("fuse", req = req.unique().0, op = op.name(), ino)
}

/// Logs a failed request at its error's level. Warnings name the volume, file and Vault path
/// and are rate-limited per inode and errno; everyday refusals (debug) are not.
fn log_failure<S: SecretSource>(
    op: Op,
    subject: &Subject<S>,
    err: &FsError,
    failures: &FailureLimiter<(u64, &'static str)>,
) {
    if err.level() == Level::DEBUG {
        tracing::debug!(op = op.name(), error = %err, "request refused");
        return;
    }
    let errno = err.errno_name();
    let Some(suppressed) = failures.admit((subject.ino, errno)) else {
        return;
    };
    let (volume, file, path) = match &subject.file {
        Some((fs, local)) => {
            let (file, path) = fs
                .describe(*local)
                .map_or(("-", "-".to_string()), |(f, p)| (f, p.to_string()));
            (fs.config().volume.as_str(), file, path)
        }
        None => ("-", "-", "-".to_string()),
    };
    tracing::warn!(volume, file, vault_path = path, op = op.name(), errno, error = %err, suppressed, "request failed");
}

/// Polls `work` once on the calling thread, inside `runtime` and `span`: a result that is ready
/// goes to `finish` at once; otherwise the rest of `work` runs as a task on `runtime`, in
/// `span`, which hands the result to `finish` when it completes.
fn answer_now_or_on_runtime<T, F>(
    runtime: &tokio::runtime::Handle,
    span: Span,
    work: F,
    finish: impl FnOnce(T) + Send + 'static,
) where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let _in_runtime = runtime.enter();
    let in_span = span.enter();
    let mut work = Box::pin(work);
    match work.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => finish(result),
        Poll::Pending => {
            drop(in_span);
            runtime.spawn(async move { finish(work.await) }.instrument(span));
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

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
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
        kind: file_type(a.kind),
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
        let name = name.to_string_lossy().into_owned();
        let routed = self.volumes.lookup(parent.0, name, caller_of(req));
        // The answer's own timeout (`Attr::ttl`): a cached-mode file's is its remaining
        // freshness.
        self.drive(req, Op::Lookup, routed, move |r| match r {
            Ok(attr) => reply.entry(&attr.ttl, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(e),
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let routed = self.volumes.getattr(ino.0, caller_of(req));
        self.drive(req, Op::Getattr, routed, move |r| match r {
            Ok(attr) => reply.attr(&attr.ttl, &file_attr(&attr)),
            Err(e) => reply.error(e),
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if self.no_open {
            // Audited as an open; ENOSYS then makes the kernel open this and every later file
            // of the connection without asking, reading through its page cache.
            let routed = self.volumes.open_unpinned(ino.0, write, caller_of(req));
            return self.drive(req, Op::Open, routed, move |r| match r {
                Ok(()) => reply.error(Errno::ENOSYS),
                Err(e) => reply.error(e),
            });
        }
        // Direct I/O: every read reaches the handle's pinned version, so a descriptor opened
        // before a rotation keeps reading the old version even after new opens see the new.
        let routed = self.volumes.open(ino.0, write, caller_of(req));
        self.drive(req, Op::Open, routed, move |r| match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        });
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
        let routed = self.volumes.read(ino.0, fh.0, offset, size);
        self.drive(
            req,
            Op::Read,
            routed,
            move |r: Result<ReadSlice, Errno>| match r {
                Ok(slice) => reply.data(slice.bytes()),
                Err(e) => reply.error(e),
            },
        );
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _span = request_span(req, Op::Release, ino.0).entered();
        let started = Instant::now();
        self.volumes.release(ino.0, fh.0);
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
        let routed = self.volumes.readdir(ino.0, offset);
        self.drive(
            req,
            Op::Readdir,
            routed,
            move |r: Result<Vec<DirEntry>, Errno>| match r {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino.0), e.offset, file_type(e.kind), &e.name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(e),
            },
        );
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
        answer_now_or_on_runtime(rt.handle(), Span::none(), async { 7 }, move |v| {
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
            Span::none(),
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
