//! The `fuser::Filesystem` adapter: each method is one call into `fs::VaultFs` plus one reply.
//! Calls that can be answered from memory are answered on the FUSE thread; calls that must
//! wait for Vault continue on the tokio runtime and reply from there. Every answer passes
//! through `drive`, the one place that times, counts and logs errors.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::audit::Caller;
use crate::fs::{Attr, FsError, Kind, VaultFs};
use crate::logging::FailureLimiter;
use crate::metrics::{Metrics, Op};
use crate::source::SecretSource;
use crate::spec::InodeNo;

pub struct FuseAdapter<S> {
    fs: Arc<VaultFs<S>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    ttl: Duration,
    /// Warnings of failed requests, at most one per (inode, errno) per window.
    failures: Arc<FailureLimiter<(u64, &'static str)>>,
}

impl<S: SecretSource> FuseAdapter<S> {
    pub fn new(
        fs: Arc<VaultFs<S>>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ttl = fs.config().kernel_ttl;
        Self {
            fs,
            runtime,
            metrics,
            ttl,
            failures: Arc::default(),
        }
    }

    /// Runs `work` (a request about inode `ino`) and hands its result to `done`: at once when
    /// it completes without waiting (cache hits), otherwise as a task on the runtime, so the
    /// FUSE thread never blocks on Vault. Failures are counted, and logged at most once per
    /// inode and errno per window with the number left out.
    fn drive<T, F>(
        &self,
        op: Op,
        ino: INodeNo,
        work: F,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) where
        T: Send + 'static,
        F: Future<Output = Result<T, FsError>> + Send + 'static,
    {
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let (fs, failures) = (self.fs.clone(), self.failures.clone());
        let finish = move |result: Result<T, FsError>| {
            metrics.fuse_op(op, started.elapsed());
            done(result.map_err(|err| {
                let errno = err.errno_name();
                metrics.fuse_error(op, errno);
                match err {
                    FsError::NotFound | FsError::ReadOnly => {
                        tracing::debug!(op = op.name(), error = %err, "request refused")
                    }
                    _ => {
                        if let Some(suppressed) = failures.admit((ino.0, errno)) {
                            let volume = &fs.config().volume;
                            let (file, path) = fs
                                .describe(InodeNo(ino.0))
                                .map_or(("-", "-".to_string()), |(f, p)| (f, p.to_string()));
                            tracing::warn!(volume, file, vault_path = path, op = op.name(), errno, error = %err, suppressed, "request failed");
                        }
                    }
                }
                Errno::from_i32(err.errno())
            }))
        };
        answer_now_or_on_runtime(&self.runtime, work, finish);
    }

    fn read_only(&self, reply: impl FnOnce(Errno)) {
        self.metrics.fuse_op(Op::Write, Duration::ZERO);
        self.metrics
            .fuse_error(Op::Write, FsError::ReadOnly.errno_name());
        reply(Errno::EROFS);
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
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let caller = caller_of(req);
        let name = name.to_string_lossy().into_owned();
        let ttl = self.ttl;
        // Failures are keyed (and logged) by the file looked up when it exists.
        let key = self
            .fs
            .child_ino(InodeNo(parent.0), &name)
            .map_or(parent, |i| INodeNo(i.0));
        self.drive(
            Op::Lookup,
            key,
            async move { fs.lookup(InodeNo(parent.0), &name, caller).await },
            move |r| match r {
                Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
                Err(e) => reply.error(e),
            },
        );
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.fs.clone();
        let caller = caller_of(req);
        let ttl = self.ttl;
        self.drive(
            Op::Getattr,
            ino,
            async move { fs.getattr(InodeNo(ino.0), caller).await },
            move |r| match r {
                Ok(attr) => reply.attr(&ttl, &file_attr(&attr)),
                Err(e) => reply.error(e),
            },
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let caller = caller_of(req);
        self.drive(
            Op::Open,
            ino,
            async move { fs.open(InodeNo(ino.0), write, caller).await },
            // Direct I/O: every read reaches the handle's pinned version, so a descriptor opened
            // before a rotation keeps reading the old version even after new opens see the new.
            move |r| match r {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => reply.error(e),
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.drive(
            Op::Read,
            ino,
            async move { fs.read(InodeNo(ino.0), fh.0, offset, size).await },
            move |r| match r {
                Ok(slice) => reply.data(slice.bytes()),
                Err(e) => reply.error(e),
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let started = Instant::now();
        self.fs.release(fh.0);
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

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs.clone();
        self.drive(
            Op::Readdir,
            ino,
            async move { fs.readdir(InodeNo(ino.0), offset) },
            move |r| match r {
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
