//! What a file shows at one moment (`Shown`: a version of its secret, or a template's
//! rendering over the versions it read), the bytes a read returns from it (`ReadSlice`), and a
//! volume's template renderings (`Renderings`: the last one per entry, reused while current).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::FsError;
use crate::cache::{Content, SecretCache};
use crate::secret::SecretBytes;
use crate::source::{SecretSource, SourceError};
use crate::spec::{SecretPath, VolumeSpec};
use crate::template::{self, RenderError, Template};

/// What one file shows at one moment: a version of its secret, or a template's rendering over
/// the versions it read.
#[derive(Clone)]
pub(super) enum Shown {
    Secret(Arc<Content>),
    Rendered(Arc<Rendering>),
}

/// A template's output (or why there is none) and the secret versions it was rendered from.
pub(super) struct Rendering {
    result: Result<SecretBytes, FsError>,
    /// In the order the template first read them.
    pub(super) sources: Vec<(SecretPath, Arc<Content>)>,
    /// The newest of the sources' change times (the file's mtime).
    changed_at: SystemTime,
}

impl Rendering {
    /// Whether `have` are exactly the versions this was rendered from.
    fn rendered_from(&self, have: &[(SecretPath, Arc<Content>)]) -> bool {
        self.sources.len() == have.len()
            && self
                .sources
                .iter()
                .all(|(p, c)| have.iter().any(|(q, d)| p == q && Arc::ptr_eq(c, d)))
    }
}

impl Shown {
    /// The file's bytes (`key`: the plain entry's field).
    pub(super) fn bytes(&self, key: Option<&str>) -> Option<&[u8]> {
        match self {
            Shown::Secret(c) => c.fetched.data.render(key).map(SecretBytes::expose),
            Shown::Rendered(r) => r.result.as_ref().ok().map(SecretBytes::expose),
        }
    }

    pub(super) fn changed_at(&self) -> SystemTime {
        match self {
            Shown::Secret(c) => c.changed_at,
            Shown::Rendered(r) => r.changed_at,
        }
    }

    /// How audit events name the version: Vault's version (else the cache's generation), one
    /// per secret read for a template, comma-separated.
    pub(super) fn version(&self) -> String {
        match self {
            Shown::Secret(c) => version_of(c),
            Shown::Rendered(r) => r
                .sources
                .iter()
                .map(|(_, c)| version_of(c))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The secrets this shows (for audit events and logs), comma-separated.
    pub(super) fn paths(&self, spec_path: Option<&SecretPath>) -> String {
        match self {
            Shown::Secret(_) => spec_path.map_or_else(String::new, ToString::to_string),
            Shown::Rendered(r) => join_paths(r.sources.iter().map(|(p, _)| p)),
        }
    }
}

pub(super) fn join_paths<'a>(paths: impl Iterator<Item = &'a SecretPath>) -> String {
    paths.map(SecretPath::as_str).collect::<Vec<_>>().join(",")
}

/// The bytes a read returns, borrowed from the version the handle pinned.
pub struct ReadSlice {
    pub(super) shown: Shown,
    pub(super) spec: Arc<VolumeSpec>,
    pub(super) entry: usize,
    pub(super) offset: u64,
    pub(super) size: u32,
}

impl ReadSlice {
    pub fn bytes(&self) -> &[u8] {
        let key = self.spec.entries()[self.entry]
            .secret()
            .and_then(|(_, k)| k);
        let all = self.shown.bytes(key).unwrap_or_default();
        let start = usize::try_from(self.offset)
            .unwrap_or(usize::MAX)
            .min(all.len());
        let end = start.saturating_add(self.size as usize).min(all.len());
        &all[start..end]
    }
}

/// Numbers volumes in the render pool's queue.
static NEXT_RENDER_KEY: AtomicU64 = AtomicU64::new(1);

/// The renderings of one volume's template entries.
pub(super) struct Renderings {
    /// Each template entry's last rendering, reused while the versions it read are current.
    rendered: Mutex<HashMap<usize, Arc<Rendering>>>,
    /// One rendering of an entry at a time: readers arriving meanwhile wait for it and reuse it.
    rendering: Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
    /// This volume in the render pool's fair queue.
    render_key: u64,
    /// The mtime of a first rendering that read no secret.
    created: SystemTime,
}

impl Renderings {
    pub(super) fn new(created: SystemTime) -> Self {
        Self {
            rendered: Mutex::default(),
            rendering: Mutex::default(),
            render_key: NEXT_RENDER_KEY.fetch_add(1, Ordering::Relaxed),
            created,
        }
    }

    /// Renders template entry `entry`: the secrets it read last time are fetched first (all
    /// from the cache, so within their TTL they cost Vault nothing; one that fails is left out
    /// and fetched again only if the template still asks for it), then each secret it asks for
    /// that it was not given, one rendering per newly found secret. The last rendering (or
    /// failure) is reused while every version it was made from is still current. One
    /// rendering of an entry runs at a time (readers meanwhile wait and reuse it), in the
    /// render pool (`crate::render`): out of this process's memory, fair across volumes.
    pub(super) async fn render<S: SecretSource>(
        &self,
        cache: &Arc<SecretCache<S>>,
        entry: usize,
        t: &Arc<Template>,
    ) -> Result<Arc<Rendering>, FsError> {
        let flight = self.rendering.lock().entry(entry).or_default().clone();
        let _alone = flight.lock().await;
        let mut have = Vec::new();
        for path in t.uses() {
            if let Ok(content) = cache.get(&path).await {
                have.push((path, content));
            }
        }
        loop {
            if let Some(last) = self.rendered.lock().get(&entry) {
                if last.rendered_from(&have) {
                    return last.result.clone().map(|_| last.clone());
                }
            }
            let given = have
                .iter()
                .map(|(p, c)| (p.clone(), c.clone() as crate::render::Input))
                .collect();
            let rendered = t.noted(
                crate::render::pool()
                    .render(self.render_key, t.source_shared(), given)
                    .await,
            );
            let (result, sources) = match rendered {
                Err(RenderError::Needs(path)) if have.len() < template::MAX_SECRETS => {
                    let content = template_secret(cache, &path).await?;
                    have.push((path, content));
                    continue;
                }
                Ok((mut bytes, used)) => {
                    // Exactly the versions this rendering read, in its order.
                    let sources = used
                        .into_iter()
                        .filter_map(|p| {
                            let c = have.iter().find(|(q, _)| *q == p)?.1.clone();
                            Some((p, c))
                        })
                        .collect();
                    (Ok(SecretBytes::new(std::mem::take(&mut *bytes))), sources)
                }
                // Nothing learnt about the template: not kept, the next read renders again.
                Err(err @ RenderError::Unavailable(_)) => return Err(FsError::from(err)),
                Err(err) => (Err(FsError::from(err)), have),
            };
            let newest = sources.iter().map(|(_, c)| c.changed_at).max();
            // Each new rendering gets a later mtime than the one before, even when no source
            // is newer (a source fetched mid-rendering, then rotated back): a cached file's
            // pages are dropped only when mtime or size changes.
            let after_last = self
                .rendered
                .lock()
                .get(&entry)
                .map(|r| r.changed_at + Duration::from_nanos(1));
            let changed_at = match (newest, after_last) {
                (Some(n), Some(a)) => n.max(a),
                (Some(n), None) => n,
                (None, Some(a)) => a,
                (None, None) => self.created,
            };
            let rendering = Arc::new(Rendering {
                result,
                sources,
                changed_at,
            });
            self.rendered.lock().insert(entry, rendering.clone());
            return rendering.result.clone().map(|_| rendering);
        }
    }

    /// Drops every rendering (they are zeroized with the cache's values at unmount).
    pub(super) fn clear(&self) {
        self.rendered.lock().clear();
    }
}

/// A secret a template reads: a missing one is named in the error.
async fn template_secret<S: SecretSource>(
    cache: &Arc<SecretCache<S>>,
    path: &SecretPath,
) -> Result<Arc<Content>, FsError> {
    cache.get(path).await.map_err(|err| match err {
        SourceError::NotFound => FsError::TemplateMissing(format!("no secret at {path}")),
        other => other.into(),
    })
}

/// How audit events name a content version: Vault's version number, else the cache's
/// generation.
fn version_of(content: &Content) -> String {
    match content.fetched.version {
        Some(v) => v.0.to_string(),
        None => format!("g{}", content.generation),
    }
}
