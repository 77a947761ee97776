//! Secret-engine detection for a `VaultSource`: which mount serves a path and whether it is
//! KV v1, KV v2 or another (logical) engine, learnt once per mount from
//! `sys/internal/ui/mounts`.

use reqwest::Method;

use super::VaultSource;
use crate::source::SourceError;
use crate::spec::SecretPath;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    KvV1,
    KvV2,
    Logical,
}

impl VaultSource {
    /// The engine serving `path` and the path's mount prefix.
    pub(super) async fn engine(&self, path: &SecretPath) -> Result<(Engine, String), SourceError> {
        let p = path.as_str();
        if let Some(found) = self.known_engine(path) {
            return Ok(found);
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
