//! The per-pod volume lifecycle behind NodePublishVolume / NodeUnpublishVolume: a new volume
//! (`publish`: log in with the pod's own service-account token, then mount through a
//! `Mounter`), a republish (the fresh token swapped in), unpublish (torn down), and the
//! volumes an earlier daemon recorded served again after a restart (`recover`, adopting them
//! into the connections taken over when there are some). Both paths build a volume the same
//! way (`assemble`, which with `--share-identities` joins a volume to the shared identity of
//! its key; `identities` says which identity that is and where its session is kept) and
//! install it the same way (`install`). Plain Rust: no gRPC types and no
//! Vault types; identities are made from a source-neutral `Login` by a `Connect` function
//! (`VaultServers::connector` in production, `MockSource` in the contract tier).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::request::{invalid, validate, CsiError, Params, PublishRequest};
use super::state::StateDir;
use super::CsiConfig;
use crate::cache::CacheConfig;
use crate::health::Watched;
use crate::metrics::Metrics;
use crate::mount::{MountConfig, MountError, Mounted, Mounter, TakenOver};
use crate::reload::{ReloadConfig, Target};
use crate::slot::Slot;
use crate::source::{Connect, Identity, IdentityKey, SessionStore, SourceError};
use crate::volume::{Serving, SharedIdentity, Volume, VolumeConfig};

mod identities;

use identities::{login_of, session_key, token_is_of, Joined, Stash};

/// Longest a publish waits for the pod's Vault login before mounting anyway.
const PUBLISH_LOGIN_WAIT: Duration = Duration::from_secs(2);

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
struct Published<S> {
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
    volumes: Mutex<HashMap<PathBuf, Published<S>>>,
    /// Volumes served or being started, bounded by `max_volumes`.
    room_taken: Arc<AtomicUsize>,
    /// The next slot given to a new volume: slots are never reused by one daemon, so no kernel
    /// cache of an unpublished volume can be mistaken for a new one.
    next_slot: AtomicU32,
    /// One publish/unpublish at a time per target.
    target_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Where the volumes' Vault sessions are kept for the next daemon (the keeper), if anywhere.
    sessions: Option<Arc<dyn SessionStore>>,
    /// The shared identities volumes may join (`--share-identities`), by key.
    identities: Mutex<HashMap<IdentityKey, Weak<SharedIdentity<S>>>>,
    /// While `recover` runs: a hold on each shared identity a recovered volume made, so that
    /// one volume failing to come back does not revoke a session the others still need.
    recovering: Mutex<Option<Vec<Arc<SharedIdentity<S>>>>>,
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
            identities: Mutex::new(HashMap::new()),
            recovering: Mutex::new(None),
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
                // A shared identity's login credential is any of its pods' tokens: only one of
                // the service account kubelet reports may become it.
                if !volume.serving.is_shared() || token_is_of(&login_of(&params)) {
                    volume.serving.set_credential(params.token.clone());
                }
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
        self.publish_new(params).await
    }

    /// Mounts a new volume: logs in first, so that a login Vault refuses fails the publish.
    async fn publish_new(&self, params: Params) -> Result<(), CsiError> {
        // Before logging in: a node that cannot mount would only waste the login.
        self.mounter.publishable(params.consistency)?;
        let room = self.reserve_room()?;
        let slot = self.new_slot()?;
        let (volume, joined) = self.assemble(&params, slot).await?;
        self.keep_sessions(&volume, &Stash::of(slot, &joined));
        if joined == Joined::Shared {
            // Its identity is logged in (or logging in) for the volumes that share it: the
            // freshest token becomes its login credential, and a refused login of the identity
            // fails this publish too.
            tracing::info!(volume = %params.label, "joined the shared identity of its service account");
            volume.source().set_credential(params.token.clone());
        }
        // A pod must not wait long on an unreachable Vault: give the login a short bound
        // and mount anyway when it runs out (the first read logs in).
        let wait = self.config.vault_timeout.min(PUBLISH_LOGIN_WAIT);
        let login = async {
            match joined {
                Joined::Shared => volume.source().ready().await,
                Joined::Alone | Joined::First(_) => volume.source().login().await,
            }
        };
        let login = tokio::time::timeout(wait, login).await.unwrap_or_else(|_| {
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
                // Leaves a shared identity it opened, so its count stays true for the volumes
                // that joined meanwhile.
                volume.abandon().await;
                return Err(CsiError::PermissionDenied(reason));
            }
        }
        let mounted = self.mount(&params, slot, &volume);
        self.install(params, slot, volume, mounted, room).await
    }

    /// Mounts `volume` as volume `slot` at its target (over a dead mount there).
    fn mount(
        &self,
        params: &Params,
        slot: Slot,
        volume: &Volume<S>,
    ) -> Result<Box<dyn Mounted>, MountError> {
        let config = MountConfig {
            allow_other: true,
            create_target: true,
        };
        self.mounter
            .mount(&params.target, slot, volume.fs(), &config)
    }

    /// `recover_one` under the target's lock, unless the target is served already.
    async fn recover_locked(
        &self,
        params: Params,
        recorded: Slot,
        taken: Option<&TakenOver<S>>,
    ) -> Result<(), CsiError> {
        let target = params.target.clone();
        let lock = self.target_lock(&target);
        let result = {
            let _one = lock.lock().await;
            if self.volumes.lock().contains_key(&target) {
                Ok(())
            } else {
                self.recover_one(params, recorded, taken).await
            }
        };
        self.release_target_lock(&target, lock);
        result
    }

    /// A slot no volume had, recorded as given out before anything is served under it.
    fn new_slot(&self) -> Result<Slot, CsiError> {
        let slot = Slot(self.next_slot.fetch_add(1, Ordering::AcqRel));
        self.state.record_slot(slot).map_err(|e| {
            CsiError::Internal(format!(
                "cannot record the volume's slot under {}: {e}",
                self.config.state_dir.display()
            ))
        })?;
        Ok(slot)
    }

    /// Serves again, as volume `recorded` (a new slot for records from before slots), a volume
    /// an earlier daemon recorded: on the connection
    /// `taken` over from it when there is one (its bind is still in place), else mounted anew
    /// over the dead mount it left. Its Vault session and leased values are taken over from the
    /// store when the predecessor left them there; otherwise it logs in on first use with the
    /// recorded token (kubelet's next republish brings a fresh one).
    async fn recover_one(
        &self,
        params: Params,
        recorded: Slot,
        taken: Option<&TakenOver<S>>,
    ) -> Result<(), CsiError> {
        let room = self.reserve_room()?;
        let slot = match recorded {
            // Records written before slots existed have none: a new one is given.
            Slot::SINGLE => self.new_slot()?,
            slot => slot,
        };
        let (volume, joined) = self.assemble(&params, slot).await?;
        let stash = Stash::of(slot, &joined);
        if let Some(store) = self.sessions.clone() {
            let (session, identity, own) = (
                stash.session.clone(),
                stash.identity.clone(),
                stash.own.clone(),
            );
            let first = matches!(joined, Joined::First(_));
            let shared = joined != Joined::Alone;
            let (session, own_leases, shared_leases) = tokio::task::spawn_blocking(move || {
                let mut session = session.as_ref().and_then(|key| store.take(key));
                if shared {
                    // A volume of a shared identity may have had a session of its own (the
                    // previous daemon ran without --share-identities): the first volume's
                    // becomes the identity's; the others' are let go (they expire).
                    let own_session = store.take(&own);
                    if first && session.is_none() {
                        session = own_session;
                    }
                }
                (
                    session,
                    store.take_leases(&own),
                    identity
                        .map(|key| store.take_leases(&key))
                        .unwrap_or_default(),
                )
            })
            .await
            .unwrap_or_default();
            let taken = session.is_some();
            let resumed = volume.resume(session);
            if taken && resumed {
                self.metrics.vault_tokens_taken_over.inc();
            }
            // Vault revokes a token's leases with it: without the token they may be dead.
            let leases = if resumed {
                volume.adopt_leases(own_leases, shared_leases)
            } else {
                0
            };
            self.metrics.vault_leases_taken_over.inc_by(leases as u64);
            tracing::info!(volume = %params.label, resumed, leases, "took over the previous daemon's Vault session");
        }
        self.keep_sessions(&volume, &stash);
        let adopted = taken.and_then(|t| t.adopt(&params.target, slot, volume.fs()));
        let mounted = match adopted {
            Some(mounted) => Ok(mounted),
            None => self.mount(&params, slot, &volume),
        };
        self.install(params, slot, volume, mounted, room).await
    }

    /// Builds the volume `params` describe as volume `slot`: its identity (logging in with the
    /// pod's token), cache and files, wired to its connection's kernel notifications. With
    /// `--share-identities`, a volume whose identity another volume has already joins that
    /// identity and its cache (`Joined::Shared`: no login of its own).
    async fn assemble(&self, params: &Params, slot: Slot) -> Result<(Volume<S>, Joined), CsiError> {
        let login = login_of(params);
        let key = self
            .identity_key(&login, params)
            .filter(|_| token_is_of(&login));
        if let Some(key) = &key {
            self.wait_closing(key).await;
        }
        let config = || VolumeConfig {
            name: params.label.clone(),
            pod: params.pod.clone(),
            cache: CacheConfig::new(
                params.cache_ttl,
                crate::config::DEFAULT_MAX_STALE.value,
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
        };
        let invalidate = || self.mounter.invalidate(slot, params.consistency);
        let connect = |login| {
            (self.connect)(login).map_err(|e| {
                CsiError::InvalidArgument(format!("volumeAttributes.vaultServer: {e}"))
            })
        };
        let Some(key) = key else {
            let volume = Volume::build(
                connect(login)?,
                params.spec.clone(),
                config(),
                invalidate(),
                &self.metrics,
            );
            return Ok((volume, Joined::Alone));
        };
        let mut identities = self.identities.lock();
        identities.retain(|_, shared| shared.strong_count() > 0);
        let joined = identities
            .get(&key)
            .and_then(Weak::upgrade)
            .and_then(|shared| {
                Volume::build_on(
                    &shared,
                    params.spec.clone(),
                    config(),
                    invalidate(),
                    &self.metrics,
                )
            });
        if let Some(volume) = joined {
            return Ok((volume, Joined::Shared));
        }
        let config = config();
        let shared = SharedIdentity::new(connect(login)?, config.cache.clone(), &self.metrics);
        let key_name = key.stable_name();
        identities.insert(key, Arc::downgrade(&shared));
        if let Some(holds) = self.recovering.lock().as_mut() {
            if shared.join() {
                holds.push(shared.clone());
            }
        }
        let volume = Volume::build_on(
            &shared,
            params.spec.clone(),
            config,
            invalidate(),
            &self.metrics,
        )
        .expect("a new shared identity is open");
        Ok((volume, Joined::First(key_name)))
    }

    /// Serves `volume`, `mounted` at its target, once its record is written; gives up
    /// everything (the mount, the volume's session) when either failed.
    async fn install(
        &self,
        params: Params,
        slot: Slot,
        volume: Volume<S>,
        mounted: Result<Box<dyn Mounted>, MountError>,
        room: RoomGuard,
    ) -> Result<(), CsiError> {
        let mounted = match mounted {
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
            Published {
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

    /// Serves again the volumes an earlier daemon recorded (see `recover_one`), on the
    /// connections `taken` over from it if any; returns how many. Volumes whose pod directory
    /// is gone are forgotten. Called once, before the CSI socket and the taken connections are
    /// served (`TakenOver::serve`).
    pub async fn recover(&self, taken: Option<&TakenOver<S>>) -> usize {
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
        *self.recovering.lock() = Some(Vec::new());
        // Shared identities some recorded volume had: a stashed session none of the recovered
        // volumes took is no one's.
        let mut had_identities = HashSet::new();
        for record in records {
            let target = PathBuf::from(&record.target_path);
            let params = record.params(&self.config);
            // Whether sharing is on now or not: a predecessor may have had it.
            if let Some(key) = params
                .as_ref()
                .ok()
                .and_then(|params| login_of(params).identity_key(params.cache_ttl))
            {
                had_identities.insert(key);
            }
            if target.parent().is_none_or(|p| !p.exists()) {
                tracing::info!(target = %target.display(), "pod is gone; forgetting its volume");
                let _ = match taken {
                    Some(taken) => taken.unmount_later(&target),
                    None => self.mounter.unmount_target(&target),
                };
                self.state.forget(&target);
                if let Some(store) = &self.sessions {
                    store.forget(&session_key(record.slot));
                }
                continue;
            }
            let result = match params {
                Ok(params) => self.recover_locked(params, record.slot, taken).await,
                Err(e) => Err(e),
            };
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
        let holds = self.recovering.lock().take().unwrap_or_default();
        for shared in holds {
            shared.release().await;
        }
        if let Some(store) = &self.sessions {
            let identities = self.identities.lock();
            for key in had_identities {
                let taken = identities
                    .get(&key)
                    .is_some_and(|shared| shared.strong_count() > 0);
                if !taken {
                    store.forget(&key.stable_name());
                }
            }
        }
        recovered
    }
}
