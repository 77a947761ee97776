//! Secret-engine detection for a `VaultSource`: which mount serves a path and whether it is
//! KV v1, KV v2 or another (logical) engine, learnt once per mount from
//! `sys/internal/ui/mounts`. What one identity learnt is shared, for a while, with every
//! identity on the same server (`ServerMounts`): a thousand volumes reading under one mount
//! ask once, not a thousand times, each right after its publish.

use std::time::Duration;

use parking_lot::Mutex;
use reqwest::Method;
use tokio::time::Instant;

use super::VaultSource;
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

impl VaultSource {
    /// The engine serving `path` and the path's mount prefix.
    pub(super) async fn engine(&self, path: &SecretPath) -> Result<(Engine, String), SourceError> {
        let p = path.as_str();
        if let Some(found) = self.known_engine(path) {
            return Ok(found);
        }
        if let Some((engine, prefix)) = self.server.mounts().lookup(p) {
            self.mounts.lock().push((prefix.clone(), engine));
            return Ok((engine, prefix));
        }
        match self
            .authed(
                "mounts",
                Method::GET,
                &format!("sys/internal/ui/mounts/{p}"),
                None,
            )
            .await
        {
            Ok(body) => {
                let data = &body["data"];
                let prefix = data["path"].as_str().unwrap_or_default().to_string();
                let engine = match (data["type"].as_str(), data["options"]["version"].as_str()) {
                    (Some("kv") | Some("generic"), Some("2")) => Engine::KvV2,
                    (Some("kv") | Some("generic"), _) => Engine::KvV1,
                    _ => Engine::Logical,
                };
                if prefix.is_empty() || !p.starts_with(prefix.as_str()) {
                    self.undetectable
                        .lock()
                        .insert(path.clone(), Engine::Logical);
                    return Ok((Engine::Logical, String::new()));
                }
                tracing::debug!(mount = %prefix, engine = ?engine, "detected secret engine");
                self.server.mounts().learn(&prefix, engine);
                self.mounts.lock().push((prefix.clone(), engine));
                Ok((engine, prefix))
            }
            // Not allowed to look (or an old server): read the path as written.
            Err(
                SourceError::PermissionDenied | SourceError::NotFound | SourceError::Invalid(_),
            ) => {
                self.undetectable
                    .lock()
                    .insert(path.clone(), Engine::Logical);
                Ok((Engine::Logical, String::new()))
            }
            Err(err) => Err(err),
        }
    }

    pub(super) fn known_engine(&self, path: &SecretPath) -> Option<(Engine, String)> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::secret::Token;
    use crate::source::vault::{test_server, Auth, VaultServer};

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
