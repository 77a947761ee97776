//! Secret-engine detection for a `VaultSource` (`Engines`, one per identity): which mount
//! serves a path and whether it is KV v1, KV v2 or another (logical) engine, learnt once per
//! mount from `sys/internal/ui/mounts`, and what the identity learnt about reading them. What
//! one identity detected is shared, for a while, with every identity on the same server
//! (`ServerMounts`): a thousand volumes reading under one mount ask once, not a thousand
//! times, each right after its publish.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::time::Instant;

use crate::source::SourceError;
use crate::spec::SecretPath;

/// How long a mount one identity detected is taken as known by the others on its server: long
/// enough for a burst of publishes to ask once, short enough that a mount re-enabled as
/// another engine is seen by new volumes soon after.
pub(super) const SHARED_MOUNT_TTL: Duration = Duration::from_secs(60);
/// Most mounts remembered per server (a server has a handful; the bound is for safety).
const MAX_SHARED_MOUNTS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    KvV1,
    KvV2,
    Logical,
}

/// Mounts detected on one server by any of its identities, each known for
/// `SHARED_MOUNT_TTL`. Only what Vault answered is shared: an identity not allowed to look
/// keeps that to itself.
#[derive(Default)]
pub(super) struct ServerMounts {
    /// Mount prefix, its engine, and when it was learnt.
    known: Mutex<Vec<(String, Engine, Instant)>>,
}

impl ServerMounts {
    /// The engine and mount prefix of the longest mount known for `path`.
    pub(super) fn lookup(&self, path: &str) -> Option<(Engine, String)> {
        let now = Instant::now();
        let mut known = self.known.lock();
        known.retain(|(_, _, at)| now.duration_since(*at) < SHARED_MOUNT_TTL);
        known
            .iter()
            .filter(|(prefix, _, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _, _)| prefix.len())
            .map(|(prefix, engine, _)| (*engine, prefix.clone()))
    }

    /// Records that `prefix` is a mount of `engine`, as Vault just answered.
    pub(super) fn learn(&self, prefix: &str, engine: Engine) {
        let now = Instant::now();
        let mut known = self.known.lock();
        known.retain(|(p, _, at)| p != prefix && now.duration_since(*at) < SHARED_MOUNT_TTL);
        if known.len() < MAX_SHARED_MOUNTS {
            known.push((prefix.to_string(), engine, now));
        }
    }
}

/// What one identity learnt about the engines serving its paths: the mounts it detected, the
/// paths whose mount it could not detect (read as written), the KV v2 paths whose metadata it
/// may not read, and the `data/`-prefixed paths it already warned of.
#[derive(Default)]
pub(super) struct Engines {
    /// Known secret-engine mounts: prefix (with trailing `/`) → engine.
    mounts: Mutex<Vec<(String, Engine)>>,
    /// Paths whose mount could not be detected (treated as plain logical reads).
    undetectable: Mutex<HashMap<SecretPath, Engine>>,
    /// KV v2 paths whose metadata this identity may not read: no cheap version check.
    no_metadata: Mutex<HashSet<SecretPath>>,
    /// KV v2 paths written with the API's `data/` and not found, already warned about.
    data_prefix_warned: Mutex<HashSet<SecretPath>>,
}

impl Engines {
    /// The engine serving `path` and the path's mount prefix: known to this identity, known
    /// to its server (`shared`), or else asked of Vault with `ask(api_path)` (an authenticated
    /// GET), whose answer is shared with the server's other identities.
    pub(super) async fn engine<F, Fut>(
        &self,
        path: &SecretPath,
        shared: &ServerMounts,
        ask: F,
    ) -> Result<(Engine, String), SourceError>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<Value, SourceError>>,
    {
        let p = path.as_str();
        if let Some(found) = self.known(path) {
            return Ok(found);
        }
        if let Some((engine, prefix)) = shared.lookup(p) {
            self.mounts.lock().push((prefix.clone(), engine));
            return Ok((engine, prefix));
        }
        match ask(format!("sys/internal/ui/mounts/{p}")).await {
            Ok(body) => {
                let data = &body["data"];
                let prefix = data["path"].as_str().unwrap_or_default().to_string();
                let engine = match (data["type"].as_str(), data["options"]["version"].as_str()) {
                    (Some("kv") | Some("generic"), Some("2")) => Engine::KvV2,
                    (Some("kv") | Some("generic"), _) => Engine::KvV1,
                    _ => Engine::Logical,
                };
                if prefix.is_empty() || !p.starts_with(prefix.as_str()) {
                    return Ok(self.undetectable(path));
                }
                tracing::debug!(mount = %prefix, engine = ?engine, "detected secret engine");
                shared.learn(&prefix, engine);
                self.mounts.lock().push((prefix.clone(), engine));
                Ok((engine, prefix))
            }
            // Not allowed to look (or an old server): read the path as written.
            Err(
                SourceError::PermissionDenied | SourceError::NotFound | SourceError::Invalid(_),
            ) => Ok(self.undetectable(path)),
            Err(err) => Err(err),
        }
    }

    /// Records that `path`'s mount cannot be detected: it is read as written.
    fn undetectable(&self, path: &SecretPath) -> (Engine, String) {
        self.undetectable
            .lock()
            .insert(path.clone(), Engine::Logical);
        (Engine::Logical, String::new())
    }

    fn known(&self, path: &SecretPath) -> Option<(Engine, String)> {
        if let Some(e) = self.undetectable.lock().get(path) {
            return Some((*e, String::new()));
        }
        self.mounts
            .lock()
            .iter()
            .filter(|(prefix, _)| path.as_str().starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .cloned()
            .map(|(prefix, engine)| (engine, prefix))
    }

    /// Whether this identity may read `path`'s KV v2 metadata (not refused so far).
    pub(super) fn has_metadata(&self, path: &SecretPath) -> bool {
        !self.no_metadata.lock().contains(path)
    }

    /// Vault refused `path`'s metadata: changes are detected by reading from now on.
    pub(super) fn metadata_refused(&self, path: &SecretPath) {
        self.no_metadata.lock().insert(path.clone());
    }

    /// A KV v2 read of `path` (mount `prefix`, the rest `rest`) was not found: if it was
    /// written with the API's `data/`, says how to write it, once per path.
    pub(super) fn warn_of_data_prefix(
        &self,
        volume: &str,
        path: &SecretPath,
        prefix: &str,
        rest: &str,
    ) {
        let Some(instead) = without_data_prefix(prefix, rest) else {
            return;
        };
        if self.data_prefix_warned.lock().insert(path.clone()) {
            tracing::warn!(
                volume,
                vault_path = path.as_str(),
                "not found: {prefix} is a KV v2 mount and vaultfs adds `data/` to its paths itself; write the path {instead}, as for `vault kv get`"
            );
        }
    }
}

/// The path to write instead of `path`, a KV v2 path of mount `prefix` given as the API path
/// (`secret/data/app/db`, whose `rest` below the mount starts with `data/`): vaultfs adds
/// `data/` itself, as `vault kv get` does, so it is to be written `secret/app/db`.
fn without_data_prefix(prefix: &str, rest: &str) -> Option<String> {
    rest.strip_prefix("data/")
        .filter(|r| !r.is_empty())
        .map(|r| format!("{prefix}{r}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::secret::Token;
    use crate::source::vault::{test_server, Auth, VaultServer, VaultSource};

    #[test]
    fn kv2_paths_written_with_data_are_told_the_path_without_it() {
        assert_eq!(
            without_data_prefix("secret/", "data/app/db").as_deref(),
            Some("secret/app/db")
        );
        assert_eq!(
            without_data_prefix("kv/team/", "data/x").as_deref(),
            Some("kv/team/x")
        );
        assert_eq!(without_data_prefix("secret/", "app/data/db"), None);
        assert_eq!(without_data_prefix("secret/", "data/"), None);
        assert_eq!(without_data_prefix("secret/", "database"), None);
    }

    fn identity(server: &Arc<VaultServer>, name: &str) -> VaultSource {
        VaultSource::new(
            server.clone(),
            Auth::Token(Token::new(format!("token-{name}"))),
            name.into(),
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn a_mount_one_identity_detected_is_not_asked_again_by_the_others() {
        let (addr, seen) = test_server::serve(|_| {
            test_server::json_answer(
                "200 OK",
                r#"{"data":{"path":"secret/","type":"kv","options":{"version":"2"}}}"#,
                false,
            )
        });
        let server = Arc::new(
            VaultServer::new(&test_server::config(&addr, Duration::from_secs(5))).unwrap(),
        );
        let path = SecretPath::parse("secret/app/db").unwrap();
        for name in ["a", "b", "c"] {
            let found = identity(&server, name).engine(&path).await.unwrap();
            assert_eq!(found, (Engine::KvV2, "secret/".to_string()));
        }
        let asked = seen
            .lock()
            .iter()
            .filter(|h| h.contains("/v1/sys/internal/ui/mounts/secret/app/db"))
            .count();
        assert_eq!(asked, 1, "{:?}", seen.lock());
    }

    #[tokio::test(start_paused = true)]
    async fn shared_mounts_are_forgotten_after_their_ttl_and_the_longest_prefix_wins() {
        let mounts = ServerMounts::default();
        mounts.learn("secret/", Engine::KvV2);
        mounts.learn("secret/legacy/", Engine::KvV1);
        assert_eq!(
            mounts.lookup("secret/legacy/db"),
            Some((Engine::KvV1, "secret/legacy/".to_string()))
        );
        assert_eq!(
            mounts.lookup("secret/app/db"),
            Some((Engine::KvV2, "secret/".to_string()))
        );
        assert_eq!(mounts.lookup("other/app"), None);
        tokio::time::advance(SHARED_MOUNT_TTL).await;
        assert_eq!(mounts.lookup("secret/app/db"), None);
    }
}
