//! The state directory: owner-only (0700, made so at start), one 0600 JSON file per published
//! volume, holding what a restarted daemon needs to serve it again (attributes, pod, slot and
//! the latest service-account token), never a secret value.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::request::{CsiError, Params};
use super::CsiConfig;
use crate::secret::Token;
use crate::slot::Slot;

/// Makes `dir` owner-only: creates it (and missing parents) with mode 0700, or sets an existing
/// one to 0700 and logs that it did (`what` names the directory and what it holds). Refuses,
/// saying why, a directory owned by another uid (this daemon could not keep it private) or one
/// whose mode cannot be changed. A symbolic link is followed: the directory it names is made
/// private.
pub fn make_dir_private(dir: &Path, what: &str) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => std::io::Error::other("is not a directory"),
            _ => e,
        })?;
    // Checked and changed through one open descriptor: the same directory both times.
    let handle = std::fs::File::open(dir)?;
    let meta = handle.metadata()?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("is not a directory"));
    }
    let own = crate::sys::process::effective_uid();
    if meta.uid() != own {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "is owned by uid {}, not by this daemon's uid {own}, so it cannot be kept private (mode 0700): chown it or pick another directory",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 {
        handle
            .set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("has mode {mode:04o} and cannot be set to 0700: {e}"),
                )
            })?;
        tracing::warn!(
            dir = %dir.display(),
            was = %format!("{mode:04o}"),
            "{what} was open to others; set its mode to 0700"
        );
    }
    Ok(())
}

/// What the state directory keeps per volume: enough to serve it again after a restart,
/// never a secret value. The service-account token is short-lived and audience-bound.
#[derive(Serialize, Deserialize)]
pub(super) struct StateRecord {
    pub(super) volume_id: String,
    pub(super) target_path: String,
    pub(super) context: BTreeMap<String, String>,
    pub(super) audience: String,
    pub(super) token: String,
    pub(super) mount_group: String,
    /// The volume's slot on the node's FUSE connection (its inode numbers' high half); 0 in
    /// records written before slots existed (a new one is given).
    #[serde(default)]
    pub(super) slot: Slot,
}

impl Drop for StateRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

impl StateRecord {
    /// The parameters of the recorded volume, taken from the record itself: its attributes,
    /// checked against this node's settings as at publish, and the token it was last published
    /// with. The volume's slot is the record's (`slot`).
    pub(super) fn params(&self, config: &CsiConfig) -> Result<Params, CsiError> {
        // As a publish checks them: a record is a file anyone with root may have edited.
        if self.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "the record has no volume_id".into(),
            ));
        }
        if !Path::new(&self.target_path).is_absolute() {
            return Err(CsiError::InvalidArgument(format!(
                "the recorded target_path {:?} is not an absolute path",
                self.target_path
            )));
        }
        let mount_group = match self.mount_group.as_str() {
            "" => None,
            g => Some(g.parse().map_err(|_| {
                CsiError::InvalidArgument(format!(
                    "the recorded mount group {g:?} is not a numeric group id"
                ))
            })?),
        };
        Params::new(
            self.volume_id.clone(),
            PathBuf::from(&self.target_path),
            mount_group,
            self.context.clone(),
            |audience| {
                if audience == self.audience && !self.token.is_empty() {
                    Ok(Token::new(self.token.clone()))
                } else {
                    Err(CsiError::InvalidArgument(format!(
                        "the record holds no token for audience {audience:?}; kubelet's next republish brings one"
                    )))
                }
            },
            config,
        )
    }
}

/// The per-volume records under `<state-dir>/volumes`, and the highest slot ever given out.
pub(super) struct StateDir {
    volumes: PathBuf,
    /// `<state-dir>/slots`: the highest slot given to a volume. The node connection can outlive
    /// a daemon (the keeper holds it), and the kernel may still know an unpublished volume's
    /// inode numbers, so a slot is never given out twice, by this daemon or a successor.
    slots: PathBuf,
    /// The highest slot written to `slots` by this daemon: the file only ever grows.
    recorded: parking_lot::Mutex<Slot>,
}

impl StateDir {
    pub(super) fn new(state_dir: &Path) -> Self {
        Self {
            volumes: state_dir.join("volumes"),
            slots: state_dir.join("slots"),
            recorded: parking_lot::Mutex::default(),
        }
    }

    /// The highest slot ever given out (0: none).
    pub(super) fn highest_slot(&self) -> Slot {
        std::fs::read_to_string(&self.slots)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_default()
    }

    /// Records that `slot` is given out, before anything is served under it. Concurrent
    /// publishes record in any order; the file keeps the highest.
    pub(super) fn record_slot(&self, slot: Slot) -> std::io::Result<()> {
        let mut recorded = self.recorded.lock();
        if slot <= *recorded {
            return Ok(());
        }
        if let Some(dir) = self.slots.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        crate::sys::write_private(&self.slots, format!("{slot}\n").as_bytes())?;
        *recorded = slot;
        Ok(())
    }

    fn file(&self, target: &Path) -> PathBuf {
        // FNV-1a of the target path: stable, filesystem-safe, one file per target.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in target.as_os_str().as_encoded_bytes() {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.volumes.join(format!("{hash:016x}.json"))
    }

    /// Writes the volume's record atomically, mode 0600, in a 0700 directory.
    pub(super) fn save(&self, params: &Params, slot: Slot) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.volumes)?;
        std::fs::set_permissions(&self.volumes, std::fs::Permissions::from_mode(0o700))?;
        let record = StateRecord {
            volume_id: params.volume_id.clone(),
            target_path: params.target.display().to_string(),
            context: params.context.clone(),
            audience: params.audience.clone(),
            token: params.token.expose().to_string(),
            mount_group: params
                .mount_group
                .map(|g| g.to_string())
                .unwrap_or_default(),
            slot,
        };
        let bytes = zeroize::Zeroizing::new(crate::secret::to_vec_exact(&record));
        crate::sys::write_private(&self.file(&params.target), &bytes)
    }

    /// Removes the record of the volume at `target` (none is fine).
    pub(super) fn forget(&self, target: &Path) {
        let path = self.file(target);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "could not remove volume state");
            }
        }
    }

    /// Every readable record; unreadable files are logged and left alone.
    pub(super) fn load(&self) -> Vec<StateRecord> {
        let Ok(entries) = std::fs::read_dir(&self.volumes) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StateRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable volume state file");
                }
            }
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn record(volume_id: &str, target_path: &str) -> StateRecord {
        StateRecord {
            volume_id: volume_id.into(),
            target_path: target_path.into(),
            context: BTreeMap::from([
                ("role".to_string(), "app".to_string()),
                (
                    "secrets".to_string(),
                    "[{name: a, path: secret/data/a}]".to_string(),
                ),
            ]),
            audience: "vault".into(),
            token: "sa-token".into(),
            mount_group: String::new(),
            slot: Slot(3),
        }
    }

    fn config() -> CsiConfig {
        CsiConfig {
            node_id: "node".into(),
            state_dir: PathBuf::from("/run/vaultfs"),
            servers: [String::new()].into(),
            vault_timeout: std::time::Duration::from_secs(5),
            cache_max_entries: 16,
            cache_max_bytes: 1 << 20,
            min_cache_ttl: std::time::Duration::from_secs(5),
            max_volumes: 10,
            max_entries: 16,
            allow_reload_signals: false,
            share_identities: false,
        }
    }

    #[test]
    fn a_record_gives_its_volume_params_and_refuses_what_a_publish_would() {
        let params = record("csi-1", "/pods/a/volumes/v/mount")
            .params(&config())
            .expect("a recorded volume");
        assert_eq!(params.volume_id, "csi-1");
        assert_eq!(params.token.expose(), "sa-token");
        for (id, target, expected) in [
            ("", "/pods/a", "no volume_id"),
            ("csi-1", "pods/a", "not an absolute path"),
        ] {
            let err = record(id, target).params(&config()).err().expect("refused");
            assert!(err.to_string().contains(expected), "{err}");
        }
        let mut other = record("csi-1", "/pods/a");
        other.audience = "other".into();
        let err = other.params(&config()).err().expect("refused");
        assert!(err.to_string().contains("no token for audience"), "{err}");
    }

    #[test]
    fn a_missing_state_directory_is_created_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run").join("vaultfs");
        make_dir_private(&dir, "the state directory").unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn an_existing_state_directory_open_to_others_is_made_owner_only() {
        let root = tempfile::tempdir().unwrap();
        for (was, name) in [(0o755, "a"), (0o777, "b"), (0o1700, "c"), (0o500, "d")] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(was)).unwrap();
            make_dir_private(&dir, "the state directory").unwrap();
            assert_eq!(mode(&dir), 0o700, "was {was:o}");
        }
        let link = root.path().join("link");
        std::os::unix::fs::symlink(root.path().join("a"), &link).unwrap();
        std::fs::set_permissions(
            root.path().join("a"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        make_dir_private(&link, "the state directory").unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700, "through a link");
    }

    #[test]
    fn a_file_is_not_a_state_directory() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f");
        std::fs::write(&file, "").unwrap();
        let err = make_dir_private(&file, "the state directory").unwrap_err();
        assert_eq!(err.to_string(), "is not a directory");
    }

    #[test]
    #[ignore = "needs root: gives a directory to another uid"]
    fn a_state_directory_owned_by_another_uid_is_refused_saying_so() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("other");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = make_dir_private(&dir, "the state directory")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is owned by uid 65534, not by this daemon's uid 0")
                && err.contains("cannot be kept private"),
            "{err}"
        );
        assert_eq!(mode(&dir), 0o755, "left as it was");
    }
}
