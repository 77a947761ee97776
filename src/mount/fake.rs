//! A `Mounter` for the CSI contract tier: mounts nothing, needs no root.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{MountConfig, MountError, Mounted, Mounter};
use crate::fs::{Consistency, Invalidate, VaultFs};
use crate::slot::Slot;
use crate::source::SecretSource;

/// A `Mounter` that mounts nothing and records what it was asked, for tests without root.
pub struct FakeMounter<S> {
    state: Arc<parking_lot::Mutex<FakeState<S>>>,
}

struct FakeState<S> {
    mounted: std::collections::HashMap<PathBuf, Arc<VaultFs<S>>>,
    /// Every slot mounted so far, in order.
    slots: Vec<Slot>,
    mounts: usize,
    unmounts: usize,
}

impl<S> Default for FakeMounter<S> {
    fn default() -> Self {
        Self {
            state: Arc::new(parking_lot::Mutex::new(FakeState {
                mounted: Default::default(),
                slots: Vec::new(),
                mounts: 0,
                unmounts: 0,
            })),
        }
    }
}

impl<S> FakeMounter<S> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Targets mounted now, sorted.
    pub fn mounted(&self) -> Vec<PathBuf> {
        let mut targets: Vec<_> = self.state.lock().mounted.keys().cloned().collect();
        targets.sort();
        targets
    }

    /// The filesystem mounted at `target`.
    pub fn fs_at(&self, target: &Path) -> Option<Arc<VaultFs<S>>> {
        self.state.lock().mounted.get(target).cloned()
    }

    /// The slots of every mount so far, in order.
    pub fn slots(&self) -> Vec<u32> {
        self.state.lock().slots.iter().map(|s| s.0).collect()
    }

    /// Mount and unmount calls so far.
    pub fn calls(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.mounts, state.unmounts)
    }
}

struct FakeMounted<S> {
    state: Arc<parking_lot::Mutex<FakeState<S>>>,
    target: PathBuf,
}

impl<S: SecretSource> Mounted for FakeMounted<S> {
    fn unmount(self: Box<Self>) -> std::io::Result<()> {
        let mut state = self.state.lock();
        state.unmounts += 1;
        state.mounted.remove(&self.target);
        Ok(())
    }
}

impl<S: SecretSource> Mounter<S> for FakeMounter<S> {
    /// Drops the notifications: nothing is mounted.
    fn invalidate(&self, _slot: Slot, _consistency: Consistency) -> Invalidate {
        Box::new(|_| {})
    }

    fn mount(
        &self,
        target: &Path,
        slot: Slot,
        fs: Arc<VaultFs<S>>,
        config: &MountConfig,
    ) -> Result<Box<dyn Mounted>, MountError> {
        if config.create_target {
            let _ = std::fs::create_dir_all(target);
        }
        if !target.is_dir() {
            return Err(MountError::NotADirectory(target.to_path_buf()));
        }
        let mut state = self.state.lock();
        state.mounts += 1;
        state.slots.push(slot);
        state.mounted.insert(target.to_path_buf(), fs);
        Ok(Box::new(FakeMounted {
            state: self.state.clone(),
            target: target.to_path_buf(),
        }))
    }

    fn unmount_target(&self, target: &Path) -> std::io::Result<bool> {
        let mut state = self.state.lock();
        let found = state.mounted.remove(target).is_some();
        if found {
            state.unmounts += 1;
        }
        Ok(found)
    }
}
