//! Which volume a FUSE request is about: the table of volumes one connection serves
//! (`Volumes`) and, per operation, the route from a connection inode to a volume's file, the
//! node root or nothing, with the answer in the connection's inode numbers. Knows no `fuser`
//! type: the adapter (`fuse`) replies; the fs layer (`fs::VaultFs`) answers for a volume.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;

use crate::audit::Caller;
use crate::fs::{Attr, DirEntry, FsError, Kind, ReadSlice, VaultFs};
use crate::metrics::Op;
use crate::quarantine::{InFlight, Quarantine};
use crate::slot::Slot;
use crate::source::SecretSource;
use crate::spec::InodeNo;

/// How long the kernel may cache the node root's names and attributes.
const NODE_ROOT_TTL: Duration = Duration::from_secs(1);

/// The volumes one FUSE connection serves. `vaultfs mount` serves one volume as the whole
/// filesystem (`Slot::SINGLE`: inode numbers unchanged); `vaultfs csi` serves every volume of
/// the node on one connection, each as the directory `<slot>` of an otherwise empty root, with
/// inode numbers `slot.inode(local)`.
pub struct Volumes<S> {
    single: Option<Arc<VaultFs<S>>>,
    by_slot: RwLock<HashMap<Slot, Attached<S>>>,
    created: SystemTime,
    /// Counts each volume's requests in flight and fences off quarantined volumes (`vaultfs
    /// csi`, unless turned off).
    quarantine: Option<Arc<Quarantine>>,
}

/// A volume of a node connection.
struct Attached<S> {
    fs: Arc<VaultFs<S>>,
    /// Unpublished: forgotten once its last open file is closed.
    retiring: bool,
}

/// What a connection inode designates.
enum Route<S> {
    /// The node-wide root (never reachable from a pod: pods see bind mounts of volumes).
    NodeRoot,
    Volume {
        fs: Arc<VaultFs<S>>,
        slot: Slot,
        local: InodeNo,
    },
    Gone,
}

/// What a request is about, for its accounting: the connection inode (its failures are logged
/// once per inode and errno) and, when it is a volume's, the volume and its own inode number
/// (fenced and counted in flight under the quarantine, named in failure logs).
pub(super) struct Subject<S> {
    pub(super) ino: u64,
    pub(super) file: Option<(Arc<VaultFs<S>>, InodeNo)>,
}

/// A routed request: what it is about and the work that answers it (run by the adapter, which
/// may drop it unpolled when the subject's volume is fenced off).
pub(super) struct Routed<S, F> {
    pub(super) subject: Subject<S>,
    pub(super) work: F,
}

/// The answer to a request, in the connection's inode numbers.
pub(super) type Answer<T> = Result<T, FsError>;

impl<S: SecretSource> Volumes<S> {
    /// One volume as the whole filesystem (`vaultfs mount`).
    pub fn single(fs: Arc<VaultFs<S>>) -> Arc<Self> {
        Self::new(Some(fs), None)
    }

    /// An empty node-wide table (`vaultfs csi`), its volumes under `quarantine` if any.
    pub fn node(quarantine: Option<Arc<Quarantine>>) -> Arc<Self> {
        Self::new(None, quarantine)
    }

    fn new(single: Option<Arc<VaultFs<S>>>, quarantine: Option<Arc<Quarantine>>) -> Arc<Self> {
        Arc::new(Self {
            single,
            by_slot: RwLock::default(),
            created: SystemTime::now(),
            quarantine,
        })
    }

    /// Serves `fs` as directory `slot`, replacing whatever was there.
    pub fn attach(&self, slot: Slot, fs: Arc<VaultFs<S>>) {
        if let Some(quarantine) = &self.quarantine {
            quarantine.attached(slot.0, &fs.config().volume);
        }
        let attached = Attached {
            fs,
            retiring: false,
        };
        self.by_slot.write().insert(slot, attached);
    }

    /// Stops serving `slot` to new lookups; it is forgotten at once if no file of it is open,
    /// else when the last one closes.
    pub fn retire(&self, slot: Slot) {
        if let Some(quarantine) = &self.quarantine {
            quarantine.detached(slot.0);
        }
        let mut table = self.by_slot.write();
        if let Some(attached) = table.get_mut(&slot) {
            if attached.fs.open_handles() == 0 {
                table.remove(&slot);
            } else {
                attached.retiring = true;
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

    /// Looks `name` up in connection directory `parent`: on the node root, the volume of that
    /// slot (not a retiring one) by its root's attributes; in a volume, the name in that
    /// directory, whose failures are the named file's when it exists.
    pub(super) fn lookup(
        &self,
        parent: u64,
        name: String,
        caller: Caller,
    ) -> Routed<S, impl Future<Output = Answer<Attr>> + Send + 'static> {
        enum Found<S> {
            VolumeRoot(Arc<VaultFs<S>>, Slot),
            In(Arc<VaultFs<S>>, Slot, InodeNo),
            Nothing,
        }
        let (subject, found) = match self.route(parent) {
            Route::NodeRoot => match self.by_name(&name) {
                Some((slot, fs)) => (
                    volume_subject(&fs, slot, InodeNo::ROOT),
                    Found::VolumeRoot(fs, slot),
                ),
                None => (no_volume(parent), Found::Nothing),
            },
            Route::Volume { fs, slot, local } => {
                let child = fs.child_ino(local, &name).unwrap_or(local);
                (volume_subject(&fs, slot, child), Found::In(fs, slot, local))
            }
            Route::Gone => (no_volume(parent), Found::Nothing),
        };
        let work = async move {
            match found {
                Found::VolumeRoot(fs, slot) => {
                    in_slot(slot, fs.getattr(InodeNo::ROOT, caller).await)
                }
                Found::In(fs, slot, dir) => in_slot(slot, fs.lookup(dir, &name, caller).await),
                Found::Nothing => Err(FsError::NotFound),
            }
        };
        Routed { subject, work }
    }

    /// The attributes of connection inode `ino` (the node root's are the connection's own).
    pub(super) fn getattr(
        &self,
        ino: u64,
        caller: Caller,
    ) -> Routed<S, impl Future<Output = Answer<Attr>> + Send + 'static> {
        let (route, subject) = self.routed(ino);
        let root = self.root_attr();
        let work = async move {
            match route {
                Route::Volume { fs, slot, local } => in_slot(slot, fs.getattr(local, caller).await),
                Route::NodeRoot => Ok(root),
                Route::Gone => Err(FsError::NotFound),
            }
        };
        Routed { subject, work }
    }

    /// Opens file `ino` for reading: its handle (see `VaultFs::open`).
    pub(super) fn open(
        &self,
        ino: u64,
        write: bool,
        caller: Caller,
    ) -> Routed<S, impl Future<Output = Answer<u64>> + Send + 'static> {
        self.file(ino, move |fs, local| async move {
            fs.open(local, write, caller).await
        })
    }

    /// An open audited without a handle (see `VaultFs::open_unpinned`).
    pub(super) fn open_unpinned(
        &self,
        ino: u64,
        write: bool,
        caller: Caller,
    ) -> Routed<S, impl Future<Output = Answer<()>> + Send + 'static> {
        self.file(ino, move |fs, local| async move {
            fs.open_unpinned(local, write, caller).await
        })
    }

    /// Reads file `ino` through handle `fh` (see `VaultFs::read`).
    pub(super) fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Routed<S, impl Future<Output = Answer<ReadSlice>> + Send + 'static> {
        self.file(ino, move |fs, local| async move {
            fs.read(local, fh, offset, size).await
        })
    }

    /// A request about file `ino`, answered by `call` with its volume and own inode number
    /// (the node root is a directory; an inode of no volume served is gone).
    fn file<T, F>(
        &self,
        ino: u64,
        call: impl FnOnce(Arc<VaultFs<S>>, InodeNo) -> F + Send + 'static,
    ) -> Routed<S, impl Future<Output = Answer<T>> + Send + 'static>
    where
        F: Future<Output = Answer<T>> + Send + 'static,
    {
        let (route, subject) = self.routed(ino);
        let work = async move {
            match route {
                Route::Volume { fs, local, .. } => call(fs, local).await,
                Route::NodeRoot => Err(FsError::IsADirectory),
                Route::Gone => Err(FsError::NotFound),
            }
        };
        Routed { subject, work }
    }

    /// The entries of directory `ino` after `offset`. The node root lists only `.` and `..`:
    /// volumes are reached by name only, and only by the daemon (pods see bind mounts of their
    /// own volume).
    pub(super) fn readdir(
        &self,
        ino: u64,
        offset: u64,
    ) -> Routed<S, impl Future<Output = Answer<Vec<DirEntry>>> + Send + 'static> {
        let (route, subject) = self.routed(ino);
        let work = async move {
            match route {
                Route::Volume { fs, slot, local } => fs.readdir(local, offset).map(|entries| {
                    entries
                        .into_iter()
                        .map(|e| DirEntry {
                            ino: InodeNo(slot.inode(e.ino)),
                            ..e
                        })
                        .collect()
                }),
                Route::NodeRoot => Ok(node_root_entries(offset)),
                Route::Gone => Err(FsError::NotFound),
            }
        };
        Routed { subject, work }
    }

    /// Closes handle `fh` of file `ino`; a retiring volume whose last open file this was is
    /// forgotten.
    pub(super) fn release(&self, ino: u64, fh: u64) {
        if let Route::Volume { fs, slot, .. } = self.route(ino) {
            fs.release(fh);
            self.released(slot);
        }
    }

    /// Whether request `op` about `subject` is refused because its volume is quarantined:
    /// everything but the attributes of the volume's root directory (mount checks, kubelet's
    /// and the container runtime's, ask for those; they come from the spec).
    pub(super) fn fences(&self, op: Op, subject: &Subject<S>) -> bool {
        let Some(quarantine) = &self.quarantine else {
            return false;
        };
        if subject.file.is_none() {
            return false;
        }
        let (slot, local) = Slot::of(subject.ino);
        let root = matches!(op, Op::Getattr | Op::Lookup) && local == InodeNo::ROOT;
        quarantine.fences(slot.0) && !root
    }

    /// Counts a request about `subject` in flight for its volume, until the result is dropped.
    pub(super) fn enter(&self, subject: &Subject<S>) -> Option<InFlight> {
        let quarantine = self.quarantine.as_ref()?;
        subject.file.as_ref()?;
        Some(quarantine.enter(Slot::of(subject.ino).0 .0))
    }

    fn route(&self, ino: u64) -> Route<S> {
        if let Some(fs) = &self.single {
            return Route::Volume {
                fs: fs.clone(),
                slot: Slot::SINGLE,
                local: InodeNo(ino),
            };
        }
        if ino == InodeNo::ROOT.0 {
            return Route::NodeRoot;
        }
        let (slot, local) = Slot::of(ino);
        match self.by_slot.read().get(&slot) {
            Some(attached) => Route::Volume {
                fs: attached.fs.clone(),
                slot,
                local,
            },
            None => Route::Gone,
        }
    }

    /// The route of a request about inode `ino` itself, and its subject.
    fn routed(&self, ino: u64) -> (Route<S>, Subject<S>) {
        let route = self.route(ino);
        let subject = match &route {
            Route::Volume { fs, local, .. } => Subject {
                ino,
                file: Some((fs.clone(), *local)),
            },
            Route::NodeRoot | Route::Gone => no_volume(ino),
        };
        (route, subject)
    }

    /// The volume a node-root lookup of `name` finds (not a retiring one).
    fn by_name(&self, name: &str) -> Option<(Slot, Arc<VaultFs<S>>)> {
        let slot: Slot = name.parse().ok().filter(|s: &Slot| s.to_string() == name)?;
        let table = self.by_slot.read();
        let attached = table.get(&slot).filter(|s| !s.retiring)?;
        Some((slot, attached.fs.clone()))
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

/// A request about file `local` of the volume in `slot`.
fn volume_subject<S>(fs: &Arc<VaultFs<S>>, slot: Slot, local: InodeNo) -> Subject<S> {
    Subject {
        ino: slot.inode(local),
        file: Some((fs.clone(), local)),
    }
}

/// A request about connection inode `ino`, of no volume (the node root, an unpublished volume).
fn no_volume<S>(ino: u64) -> Subject<S> {
    Subject { ino, file: None }
}

/// A volume's attributes with the connection's inode number.
fn in_slot(slot: Slot, attr: Answer<Attr>) -> Answer<Attr> {
    attr.map(|a| Attr {
        ino: InodeNo(slot.inode(a.ino)),
        ..a
    })
}

/// The node root's entries after `offset`: `.` and `..` only.
fn node_root_entries(offset: u64) -> Vec<DirEntry> {
    [(".", 1), ("..", 2)]
        .into_iter()
        .filter(|(_, next)| *next > offset)
        .map(|(name, next)| DirEntry {
            ino: InodeNo::ROOT,
            offset: next,
            kind: Kind::Dir,
            name: name.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::world;
    use crate::source::mock::MockSource;

    fn served(volumes: &Volumes<MockSource>, slot: Slot) -> Arc<MockSource> {
        let w = world(&["api=secret/api#token", "db/password=secret/db#password"]);
        volumes.attach(slot, Arc::new(w.fs));
        w.source
    }

    async fn lookup(v: &Volumes<MockSource>, parent: u64, name: &str) -> Answer<Attr> {
        let routed = v.lookup(parent, name.to_string(), Caller::default());
        routed.work.await
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_connection_serves_each_volume_under_its_slot_in_its_inode_numbers() {
        let volumes = Volumes::node(None);
        served(&volumes, Slot(3));
        let root = lookup(&volumes, InodeNo::ROOT.0, "3").await.unwrap();
        assert_eq!(root.ino, InodeNo(Slot(3).inode(InodeNo::ROOT)));
        assert_eq!(root.kind, Kind::Dir);
        let api = lookup(&volumes, root.ino.0, "api").await.unwrap();
        assert_eq!(
            Slot::of(api.ino.0).0,
            Slot(3),
            "a file of the volume is in its slot"
        );
        let routed = volumes.getattr(api.ino.0, Caller::default());
        assert_eq!(routed.subject.ino, api.ino.0);
        assert_eq!(routed.work.await.unwrap(), api);
        let listed = volumes.readdir(root.ino.0, 0).work.await.unwrap();
        assert!(listed.iter().all(|e| Slot::of(e.ino.0).0 == Slot(3)));
        let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, [".", "..", "api", "db"]);
        // Only the slot's own name finds it, and no unserved slot is found.
        for missing in ["03", "4", "api"] {
            let routed = volumes.lookup(InodeNo::ROOT.0, missing.into(), Caller::default());
            assert!(routed.subject.file.is_none(), "{missing}");
            assert_eq!(routed.work.await, Err(FsError::NotFound), "{missing}");
        }
        let unserved = Slot(4).inode(InodeNo::ROOT);
        assert_eq!(
            volumes.getattr(unserved, Caller::default()).work.await,
            Err(FsError::NotFound)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_root_lists_nothing_and_opens_as_a_directory() {
        let volumes = Volumes::node(None);
        served(&volumes, Slot(1));
        let root = InodeNo::ROOT.0;
        let attr = volumes.getattr(root, Caller::default()).work.await.unwrap();
        assert_eq!(
            (attr.kind, attr.perm, attr.ttl),
            (Kind::Dir, 0o500, NODE_ROOT_TTL)
        );
        let names: Vec<_> = (volumes.readdir(root, 0).work.await.unwrap())
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, [".", ".."]);
        assert_eq!(volumes.readdir(root, 2).work.await, Ok(Vec::new()));
        let open = volumes.open(root, false, Caller::default());
        assert!(open.subject.file.is_none());
        assert_eq!(open.work.await, Err(FsError::IsADirectory));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_volume_is_found_by_no_name_but_its_open_file_reads_until_released() {
        let volumes = Volumes::node(None);
        served(&volumes, Slot(2));
        let root = lookup(&volumes, InodeNo::ROOT.0, "2").await.unwrap();
        let api = lookup(&volumes, root.ino.0, "api").await.unwrap().ino.0;
        let fh = volumes
            .open(api, false, Caller::default())
            .work
            .await
            .unwrap();
        volumes.retire(Slot(2));
        assert_eq!(
            lookup(&volumes, InodeNo::ROOT.0, "2").await,
            Err(FsError::NotFound)
        );
        let read = volumes.read(api, fh, 0, 4096).work.await.unwrap();
        assert_eq!(read.bytes(), b"t-1");
        assert_eq!(volumes.len(), 1, "kept while a file is open");
        volumes.release(api, fh);
        assert!(volumes.is_empty(), "forgotten with its last open file");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_volume_is_the_whole_connection_with_its_own_numbers() {
        let w = world(&["api=secret/api#token"]);
        let volumes = Volumes::single(Arc::new(w.fs));
        let api = lookup(&volumes, InodeNo::ROOT.0, "api").await.unwrap();
        let local = api.ino;
        assert!(local.0 < 1 << 32, "no slot in the numbers");
        let routed = volumes.read(local.0, 0, 0, 4096);
        assert_eq!(routed.subject.file.as_ref().map(|(_, l)| *l), Some(local));
        assert_eq!(routed.work.await.unwrap().bytes(), b"t-1");
    }
}
