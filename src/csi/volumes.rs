//! The per-pod volume lifecycle behind NodePublishVolume / NodeUnpublishVolume: logging in
//! with the pod's own service-account token, mounting through a `Mounter`, swapping tokens on
//! republish, tearing down, and serving recorded volumes again after a restart. Plain Rust:
//! no gRPC types, and no Vault types beyond the server a volume names; identities are made by
//! a `Connect` function (`VaultSource` in production, `MockSource` in the contract tier).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::request::{invalid, validate, CsiError, Params, PublishRequest};
use super::state::StateDir;
use super::CsiConfig;
use crate::health::Watched;
use crate::metrics::Metrics;
use crate::mount::{MountConfig, Mounter};
use crate::reload::{ReloadConfig, Target};
use crate::slot::Slot;
use crate::source::vault::{Auth, Credential, LoginMethod, VaultServer, VaultSource};
use crate::source::{Identity, SessionStore, SourceError};
use crate::volume::{cache_config, Serving, Volume, VolumeConfig};

/// Longest a publish waits for the pod's Vault login before mounting anyway.
const PUBLISH_LOGIN_WAIT: Duration = Duration::from_secs(2);

/// Makes a volume's identity: its Vault server, how it logs in, and its name in logs.
pub type Connect<S> = Box<dyn Fn(&Arc<VaultServer>, Auth, &str) -> Arc<S> + Send + Sync>;

/// Room reserved for one volume under `max_volumes`: given back on drop unless kept.
struct RoomGuard {
    taken: Option<Arc<AtomicUsize>>,
}

impl RoomGuard {
    fn keep(mut self) {
        self.taken = None;
    }
}

impl Drop for RoomGuard {
    fn drop(&mut self) {
        if let Some(taken) = self.taken.take() {
            taken.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One published volume.
struct Served<S> {
    volume_id: String,
    slot: Slot,
    serving: Serving<S>,
}

/// All volumes of this node.
pub struct VolumeManager<S> {
    config: CsiConfig,
    connect: Connect<S>,
    mounter: Arc<dyn Mounter<S>>,
    metrics: Arc<Metrics>,
    state: StateDir,
    volumes: Mutex<HashMap<PathBuf, Served<S>>>,
    /// Volumes served or being started, bounded by `max_volumes`.
    room_taken: Arc<AtomicUsize>,
    /// The next slot given to a new volume: slots are never reused by one daemon, so no kernel
    /// cache of an unpublished volume can be mistaken for a new one.
    next_slot: AtomicU32,
    /// One publish/unpublish at a time per target.
    target_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Where the volumes' Vault sessions are kept for the next daemon (the keeper), if anywhere.
    sessions: Option<Arc<dyn SessionStore>>,
}

/// The name a volume's session is stashed under: by slot, which no other volume gets.
fn session_key(slot: Slot) -> String {
    format!("volume-{slot}")
}

impl VolumeManager<VaultSource> {
    /// Volumes logging in to the Vault servers of `config`.
    pub fn new(
        config: CsiConfig,
        mounter: Arc<dyn Mounter<VaultSource>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let vault_metrics = metrics.clone();
        let connect: Connect<VaultSource> = Box::new(move |server, auth, name| {
            Arc::new(VaultSource::new(
                server.clone(),
                auth,
                name.to_string(),
                vault_metrics.clone(),
            ))
        });
        Self::with_identities(config, connect, mounter, metrics)
    }
}

impl<S: Identity> VolumeManager<S> {
    /// Volumes whose identities `connect` makes.
    pub fn with_identities(
        config: CsiConfig,
        connect: Connect<S>,
        mounter: Arc<dyn Mounter<S>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            state: StateDir::new(&config.state_dir),
            config,
            connect,
            mounter,
            metrics,
            volumes: Mutex::new(HashMap::new()),
            room_taken: Arc::default(),
            next_slot: AtomicU32::new(1),
            target_locks: Mutex::new(HashMap::new()),
            sessions: None,
        }
    }

    /// Keeps the volumes' Vault sessions in `store` for the next daemon, and takes over the
    /// ones an earlier daemon kept there when recovering its volumes.
    pub fn with_sessions(mut self, store: Option<Arc<dyn SessionStore>>) -> Self {
        self.sessions = store;
        self
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Number of volumes served now.
    pub fn len(&self) -> usize {
        self.volumes.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mounts of the volumes served now, for the health check.
    pub fn watched(&self) -> Vec<Watched> {
        self.volumes
            .lock()
            .iter()
            .map(|(target, served)| Watched {
                name: served.volume_id.clone(),
                target: target.clone(),
                id: served.serving.mount_id(),
            })
            .collect()
    }

    fn target_lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.target_locks
            .lock()
            .entry(target.to_path_buf())
            .or_default()
            .clone()
    }

    /// Drops a target's lock entry once no request holds or waits for it (the map's reference
    /// and the caller's are the only ones left), so entries do not pile up.
    fn release_target_lock(&self, target: &Path, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.target_locks.lock();
        if Arc::strong_count(&lock) == 2 {
            locks.remove(target);
        }
    }

    /// NodePublishVolume: validates, then mounts a new volume (logging in with the pod's
    /// token first) or, for a volume already served at this target, swaps in the fresh token.
    pub async fn publish(&self, req: &PublishRequest) -> Result<(), CsiError> {
        let params = validate(req, &self.config)?;
        let target = params.target.clone();
        let lock = self.target_lock(&target);
        let result = {
            let _one = lock.lock().await;
            self.publish_locked(params).await
        };
        self.release_target_lock(&target, lock);
        result
    }

    async fn publish_locked(&self, params: Params) -> Result<(), CsiError> {
        let served = match self.volumes.lock().get(&params.target) {
            Some(volume) if volume.volume_id != params.volume_id => {
                return Err(CsiError::AlreadyExists(format!(
                    "target_path {} already holds volume {}, not {}",
                    params.target.display(),
                    volume.volume_id,
                    params.volume_id
                )));
            }
            Some(volume) => {
                volume.serving.set_credential(params.token.clone());
                Some(volume.slot)
            }
            None => None,
        };
        if let Some(slot) = served {
            if let Err(e) = self.state.save(&params, slot) {
                // The volume is healthy; only a restart would miss the newer token.
                tracing::warn!(volume = %params.label, error = %e, "could not record the refreshed token");
            }
            tracing::debug!(volume = %params.label, "republished: service-account token refreshed");
            return Ok(());
        }
        self.start(params, true).await
    }

    /// Mounts a volume. With `strict`, a login Vault refuses fails the publish; otherwise
    /// (restart recovery) the volume is mounted and logs in on first use.
    async fn start(&self, params: Params, strict: bool) -> Result<(), CsiError> {
        if strict {
            // Before logging in: a node that cannot mount would only waste the login.
            self.mounter.publishable(params.consistency)?;
        }
        let room = self.reserve_room()?;
        let slot = match params.slot.filter(|s| *s != Slot::SINGLE) {
            Some(recorded) => recorded,
            None => {
                let slot = Slot(self.next_slot.fetch_add(1, Ordering::AcqRel));
                if let Err(e) = self.state.record_slot(slot) {
                    return Err(CsiError::Internal(format!(
                        "cannot record the volume's slot under {}: {e}",
                        self.config.state_dir.display()
                    )));
                }
                slot
            }
        };
        let auth = Auth::Login {
            method: LoginMethod::Kubernetes,
            mount: params.auth_mount.clone(),
            role: params.role.clone(),
            credential: Credential::Value(params.token.clone()),
        };
        let volume = Volume::build(
            (self.connect)(&params.server, auth, &params.label),
            params.spec.clone(),
            VolumeConfig {
                name: params.label.clone(),
                pod: params.pod.clone(),
                cache: cache_config(
                    params.cache_ttl,
                    Duration::from_secs(300),
                    self.config.vault_timeout,
                    self.config.cache_max_entries,
                    self.config.cache_max_bytes,
                ),
                uid: 0,
                gid: params.mount_group.unwrap_or(0),
                file_mode: params.file_mode,
                consistency: params.consistency,
                reload: params
                    .reload
                    .clone()
                    .map(|(signal, process, uid)| ReloadConfig {
                        signal,
                        target: Target::Pod { uid, process },
                        min_interval: params.cache_ttl,
                    }),
            },
            self.mounter.invalidate(slot, params.consistency),
            &self.metrics,
        );
        if let Some(store) = &self.sessions {
            let key = session_key(slot);
            if !strict {
                let (from, name) = (store.clone(), key.clone());
                let (session, leases) = tokio::task::spawn_blocking(move || {
                    (from.take(&name), from.take_leases(&name))
                })
                .await
                .unwrap_or_default();
                let resumed = session.is_some_and(|s| volume.source().resume(s));
                // Vault revokes a token's leases with it: without the token they may be dead.
                let leases = if resumed {
                    self.metrics.vault_tokens_taken_over.inc();
                    volume.adopt_leases(leases)
                } else {
                    0
                };
                self.metrics.vault_leases_taken_over.inc_by(leases as u64);
                tracing::info!(volume = %params.label, resumed, leases, "took over the previous daemon's Vault session");
            }
            volume.source().on_session_change(store.sink(&key));
            volume.on_leases_change(store.lease_sink(&key));
        }
        if strict {
            // A pod must not wait long on an unreachable Vault: give the login a short bound
            // and mount anyway when it runs out (the first read logs in).
            let wait = self.config.vault_timeout.min(PUBLISH_LOGIN_WAIT);
            let login = tokio::time::timeout(wait, volume.source().login())
                .await
                .unwrap_or_else(|_| {
                    Err(SourceError::Unavailable(format!(
                        "no answer within {wait:?}"
                    )))
                });
            match login {
                Ok(()) => {}
                Err(SourceError::Unavailable(reason)) => tracing::warn!(
                    volume = %params.label, %reason,
                    "Vault unreachable; mounting anyway, the login is retried on first read"
                ),
                Err(err) => {
                    let reason = match err {
                        SourceError::LoginRefused(m) | SourceError::Invalid(m) => m,
                        other => format!("login to auth/{} failed: {other}", params.auth_mount),
                    };
                    return Err(CsiError::PermissionDenied(reason));
                }
            }
        }
        let mount_config = MountConfig {
            allow_other: true,
            create_target: true,
        };
        // Restart recovery on a connection taken over from the keeper: the bind is live.
        let adopted = if strict {
            None
        } else {
            self.mounter.adopt(&params.target, slot, volume.fs())
        };
        let mounted = match adopted.map_or_else(
            || {
                self.mounter
                    .mount(&params.target, slot, volume.fs(), &mount_config)
            },
            Ok,
        ) {
            Ok(m) => m,
            Err(e) => {
                volume.abandon().await;
                return Err(e.into());
            }
        };
        if let Err(e) = self.state.save(&params, slot) {
            let _ = mounted.unmount();
            volume.abandon().await;
            return Err(CsiError::Internal(format!(
                "cannot write the volume state under {}: {e}",
                self.config.state_dir.display()
            )));
        }
        tracing::info!(volume = %params.label, target = %params.target.display(), files = volume.files(), "volume published");
        room.keep();
        self.volumes.lock().insert(
            params.target.clone(),
            Served {
                volume_id: params.volume_id,
                slot,
                serving: volume.serve(mounted),
            },
        );
        Ok(())
    }

    /// Most volumes this node serves at once.
    pub fn max_volumes(&self) -> usize {
        self.config.max_volumes
    }

    /// Takes room for one of the `max_volumes` volumes for a volume being started; it is given back when
    /// the returned guard drops, unless `keep` hands it to the served volume (given back at
    /// unpublish).
    fn reserve_room(&self) -> Result<RoomGuard, CsiError> {
        let max = self.config.max_volumes;
        self.room_taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|n| {
                CsiError::ResourceExhausted(format!(
                    "this node already serves {n} vaultfs volumes, the most it allows (vaultfs csi --max-volumes {max})"
                ))
            })?;
        Ok(RoomGuard {
            taken: Some(self.room_taken.clone()),
        })
    }

    /// NodeUnpublishVolume: unmounts (lazily if busy), revokes the volume's Vault token, drops
    /// and zeroizes its cache, forgets its state. Unknown targets succeed.
    pub async fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(invalid("volume_id is missing"));
        }
        if target_path.is_empty() {
            return Err(invalid("target_path is missing"));
        }
        let target = PathBuf::from(target_path);
        let lock = self.target_lock(&target);
        let result = {
            let _one = lock.lock().await;
            self.unpublish_locked(volume_id, &target).await
        };
        self.release_target_lock(&target, lock);
        result
    }

    async fn unpublish_locked(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let target_path = target.display().to_string();
        let volume = self.volumes.lock().remove(target);
        let unmounted = match volume {
            Some(volume) => {
                self.room_taken.fetch_sub(1, Ordering::AcqRel);
                volume.serving.tear_down().await
            }
            None => self.mounter.unmount_target(target).map(|_| ()),
        };
        unmounted.map_err(|e| CsiError::Internal(format!("cannot unmount {target_path}: {e}")))?;
        self.state.forget(target);
        // The plugin created the target directory; kubelet removes its parent.
        let _ = std::fs::remove_dir(target);
        tracing::info!(volume_id, target = target_path, "volume unpublished");
        Ok(())
    }

    /// Lets go of every volume without unmounting, for a daemon that is stopping: the mounts
    /// stay in place (dead once this process exits) and the next daemon serves them again
    /// from the state directory.
    pub fn release_for_restart(&self) -> usize {
        let volumes: Vec<_> = self.volumes.lock().drain().collect();
        let count = volumes.len();
        self.room_taken.fetch_sub(count, Ordering::AcqRel);
        for (_, volume) in volumes {
            volume.serving.leave_for_restart();
        }
        count
    }

    /// Serves again the volumes an earlier daemon recorded: mounts them over the dead mounts
    /// the earlier daemon left; they log in on first use with the recorded token (a republish brings a
    /// fresh one). Volumes whose pod directory is gone are forgotten.
    pub async fn recover(&self) -> usize {
        let records = self.state.load();
        // New volumes get slots above every one given out before (the connection and the
        // kernel's caches of unpublished volumes may have outlived their daemon).
        let highest = records
            .iter()
            .map(|r| r.slot)
            .max()
            .unwrap_or_default()
            .max(self.state.highest_slot());
        self.next_slot
            .fetch_max(highest.0.saturating_add(1), Ordering::AcqRel);
        let mut recovered = 0;
        for record in records {
            let target = PathBuf::from(&record.target_path);
            if target.parent().is_none_or(|p| !p.exists()) {
                tracing::info!(target = %target.display(), "pod is gone; forgetting its volume");
                let _ = self.mounter.unmount_target(&target);
                self.state.forget(&target);
                if let Some(store) = &self.sessions {
                    store.forget(&session_key(record.slot));
                }
                continue;
            }
            // A dead mount at the target stays: the new one is stacked on it (see
            // `mount::prepare_target`) so running containers see it.
            let lock = self.target_lock(&target);
            let result = {
                let _one = lock.lock().await;
                if self.volumes.lock().contains_key(&target) {
                    Ok(())
                } else {
                    match validate(&record.to_request(), &self.config) {
                        Ok(params) => {
                            let params = Params {
                                slot: Some(record.slot),
                                ..params
                            };
                            self.start(params, false).await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            self.release_target_lock(&target, lock);
            match result {
                Ok(()) => recovered += 1,
                Err(e) => {
                    // Its stashed session is no one's now (slots are never given out again).
                    if let Some(store) = &self.sessions {
                        store.forget(&session_key(record.slot));
                    }
                    tracing::warn!(target = %target.display(), error = %e, "could not recover a volume; kubelet's next republish will retry")
                }
            }
        }
        recovered
    }
}
