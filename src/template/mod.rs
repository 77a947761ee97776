//! Template entries: one file rendered from fields of one or more secrets, with `minijinja`
//! in a sandbox (no loader, so no `include` or `import` of files; no environment or network
//! access; bounded by fuel, recursion depth and output size).
//!
//! Rendering is synchronous and fetches nothing itself: it runs over the secrets it has been
//! given, and a `secret(path)` call for one it was not given stops it with
//! [`RenderError::Needs`]; the caller fetches that secret (through the cache, lazily) and
//! renders again. Every `secret(path)` of one rendering sees the same content, so two
//! references to one dynamic secret use one lease's credentials.
//!
//! This file owns a template entry, its limits and the outcome of a rendering; the engine and
//! its `secret()` function live in `sandbox`, the wording and redaction of errors in `errors`.

mod errors;
mod sandbox;

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use zeroize::Zeroizing;

use crate::secret::SecretData;
use crate::spec::SecretPath;
use errors::describe_syntax_error;
use sandbox::environment;

pub use sandbox::render_source;

/// Instructions one rendering may run: real templates use a few hundred; a runaway loop stops
/// here, failing that file only.
pub const FUEL: u64 = 100_000;

/// The largest rendered file, the same as the default cap on a Vault answer
/// (`--max-secret-bytes`).
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Distinct secrets one template may read.
pub const MAX_SECRETS: usize = 32;

/// A template entry: its text, checked at compile time. It holds no engine: each rendering
/// compiles the text afresh where it runs (a render worker process, see `crate::render`), so a
/// volume of 512 templates costs their text, not 512 engines.
pub struct Template {
    source: Arc<str>,
    /// The secrets the last rendering read, fetched up front by the next one.
    uses: Mutex<Vec<SecretPath>>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template").finish_non_exhaustive()
    }
}

/// Why a rendering did not produce a file.
#[derive(Debug, PartialEq, Eq)]
pub enum RenderError {
    /// The template asks for a secret it was not given: fetch it and render again.
    Needs(SecretPath),
    /// `secret(path)` with a path that is not a valid Vault path.
    BadPath(String),
    /// A field (or a secret's field path) the template reads is missing.
    MissingField(String),
    /// Out of fuel, recursion depth or memory, or past the output cap.
    Limit(String),
    /// Anything else the template did wrong at render time (a filter on the wrong type, a bad
    /// base64 input, ...).
    Failed(String),
    /// The rendering could not run (no render worker, a worker that timed out or broke the
    /// protocol): nothing is known about the template, so the next read tries again.
    Unavailable(String),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::Needs(p) => write!(f, "needs secret {p}"),
            RenderError::BadPath(m) | RenderError::Failed(m) | RenderError::Unavailable(m) => {
                f.write_str(m)
            }
            RenderError::MissingField(m) => write!(f, "missing field {m}"),
            RenderError::Limit(m) => f.write_str(m),
        }
    }
}

/// One rendering: its output or error, and what it read.
pub struct Rendered {
    pub result: Result<Zeroizing<Vec<u8>>, RenderError>,
    /// The secrets it read, in order.
    pub used: Vec<SecretPath>,
    /// A secret it asked for and was not given.
    pub needed: Option<SecretPath>,
}

impl Rendered {
    /// A rendering that produced nothing and read nothing.
    pub fn failed(err: RenderError) -> Rendered {
        Rendered {
            result: Err(err),
            used: Vec::new(),
            needed: None,
        }
    }
}

impl Template {
    /// Checks that `text` compiles; a syntax error names the line and column.
    pub fn compile(text: &str) -> Result<Template, String> {
        environment(text, true).map_err(|e| describe_syntax_error(&e, text))?;
        Ok(Template {
            source: Arc::from(text),
            uses: Mutex::new(Vec::new()),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template text, shared.
    pub fn source_shared(&self) -> Arc<str> {
        self.source.clone()
    }

    /// The secrets the last rendering read.
    pub fn uses(&self) -> Vec<SecretPath> {
        self.uses.lock().clone()
    }

    /// Whether the last rendering read `path`.
    pub fn reads(&self, path: &SecretPath) -> bool {
        self.uses.lock().contains(path)
    }

    /// Renders over `given` (the secrets fetched so far) in this thread; see
    /// [`Template::noted`].
    pub fn render(
        &self,
        given: &[(SecretPath, &SecretData)],
    ) -> Result<(Zeroizing<Vec<u8>>, Vec<SecretPath>), RenderError> {
        self.noted(render_source(&self.source, given))
    }

    /// A rendering of this template, wherever it ran: on success its output and the paths it
    /// read, in order; either way what it read (and a secret it still needs) is added to
    /// [`Template::uses`].
    pub fn noted(
        &self,
        rendered: Rendered,
    ) -> Result<(Zeroizing<Vec<u8>>, Vec<SecretPath>), RenderError> {
        match rendered.result {
            Ok(out) => {
                // Exactly what this rendering read (a concurrent one may have read other
                // secrets; the filesystem keeps each rendering's own list).
                *self.uses.lock() = rendered.used.clone();
                Ok((out, rendered.used))
            }
            Err(err) => {
                // Fetched up front next time, and followed by rotations meanwhile: what it read
                // and a secret it still needs, added to what is known.
                let mut uses = self.uses.lock();
                for p in rendered.used.into_iter().chain(rendered.needed) {
                    if !uses.contains(&p) {
                        uses.push(p);
                    }
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn data(pairs: &[(&str, &str)]) -> SecretData {
        SecretData::from_pairs(pairs.iter().copied())
    }

    pub(super) fn path(p: &str) -> SecretPath {
        SecretPath::parse(p).unwrap()
    }

    /// Renders `text`, fetching from `store` whatever it asks for, as the filesystem does.
    pub(super) fn render_all(
        text: &str,
        store: &[(&str, SecretData)],
    ) -> Result<String, RenderError> {
        let t = Template::compile(text).unwrap();
        let mut given: Vec<(SecretPath, &SecretData)> = Vec::new();
        loop {
            match t.render(&given) {
                Ok((out, _)) => return Ok(String::from_utf8(out.to_vec()).unwrap()),
                Err(RenderError::Needs(p)) => {
                    let found = store
                        .iter()
                        .find(|(q, _)| path(q) == p)
                        .map(|(_, d)| d)
                        .expect("the test store has it");
                    given.push((p, found));
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[test]
    fn a_connection_string_from_one_secret_and_fields_of_two() {
        let db = data(&[("user", "app"), ("password", "pw")]);
        let host = data(&[("name", "postgres")]);
        let out = render_all(
            "postgresql://{{ secret('secret/app/db').user }}:{{ secret('secret/app/db').password }}@{{ secret('secret/app/host').name }}:5432/wizard\n",
            &[("secret/app/db", db), ("secret/app/host", host)],
        );
        assert_eq!(out.unwrap(), "postgresql://app:pw@postgres:5432/wizard\n");
    }

    #[test]
    fn records_which_secrets_the_rendering_read() {
        let t = Template::compile("{{ secret('secret/a').k }}").unwrap();
        let a = data(&[("k", "v")]);
        assert_eq!(t.render(&[]), Err(RenderError::Needs(path("secret/a"))));
        assert_eq!(
            t.uses(),
            vec![path("secret/a")],
            "fetched up front next time"
        );
        let (out, used) = t.render(&[(path("secret/a"), &a)]).unwrap();
        assert_eq!(&out[..], b"v");
        assert_eq!(used, vec![path("secret/a")]);
        assert_eq!(t.uses(), vec![path("secret/a")]);
        assert!(t.reads(&path("secret/a")));
    }

    #[test]
    fn debug_output_never_shows_values() {
        let t = Template::compile("{{ secret('a/b').k }}").unwrap();
        let a = data(&[("k", "very-secret-value")]);
        t.render(&[(path("a/b"), &a)]).unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
    }
}
