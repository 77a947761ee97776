//! Template entries: one file rendered from fields of one or more secrets, with `minijinja`
//! in a sandbox (no loader, so no `include` or `import` of files; no environment or network
//! access; bounded by fuel, recursion depth and output size).
//!
//! Rendering is synchronous and fetches nothing itself: it runs over the secrets it has been
//! given, and a `secret(path)` call for one it was not given stops it with
//! [`RenderError::Needs`]; the caller fetches that secret (through the cache, lazily) and
//! renders again. Every `secret(path)` of one rendering sees the same content, so two
//! references to one dynamic secret use one lease's credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use base64::Engine as _;
use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use parking_lot::Mutex;
use zeroize::Zeroizing;

use crate::secret::{wipe_json, SecretData};
use crate::spec::SecretPath;

/// Instructions one rendering may run: real templates use a few hundred; a runaway loop stops
/// here, failing that file only.
pub const FUEL: u64 = 100_000;

/// How deep macros, includes of blocks and nested calls may go.
const RECURSION_LIMIT: usize = 32;

/// The largest rendered file, the same as the default cap on a Vault answer
/// (`--max-secret-bytes`).
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Distinct secrets one template may read.
pub const MAX_SECRETS: usize = 32;

/// The name the render context holds the secrets under (not a variable templates use).
const SECRETS_VAR: &str = "__vaultfs_secrets";

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

/// The sandboxed engine with `text` added as its one template.
fn environment(text: &str, debug: bool) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_debug(debug);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    env.add_function("secret", secret);
    env.add_filter("b64encode", b64encode);
    env.add_filter("b64decode", b64decode);
    env.add_filter("fromjson", fromjson);
    env.add_template_owned("template", text.to_string())?;
    // Debug mode (for a syntax error's column) would also attach a failing rendering's
    // variables, values included, to its error.
    env.set_debug(false);
    Ok(env)
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

/// Renders the template `source` over `given`, compiling it first. Pure: what it read is in
/// the result, nothing is kept.
pub fn render_source(source: &Arc<str>, given: &[(SecretPath, &SecretData)]) -> Rendered {
    let env = match environment(source, false) {
        Ok(env) => env,
        Err(e) => {
            return Rendered::failed(RenderError::Failed(describe_syntax_error(&e, source)));
        }
    };
    let secrets = Arc::new(Secrets {
        source: source.clone(),
        data: given
            .iter()
            .map(|(p, d)| (p.as_str().to_string(), fields_of(d)))
            .collect(),
        notes: Mutex::new(Notes::default()),
    });
    let ctx = minijinja::context! { __vaultfs_secrets => Value::from_dyn_object(secrets.clone()) };
    let template = env.get_template("template").expect("added above");
    let mut out = Capped(Zeroizing::new(Vec::new()));
    let result = template.render_captured_to(ctx, &mut out).map(drop);
    let mut notes = std::mem::take(&mut *secrets.notes.lock());
    let used = std::mem::take(&mut notes.used);
    let needed = notes.needed.clone();
    let result = match result {
        Ok(()) => Ok(out.0),
        Err(err) => Err(notes.explain(&err, source).redacted(given)),
    };
    Rendered {
        result,
        used,
        needed,
    }
}

/// `detail` with every quoted part that the template `source` does not hold literally replaced:
/// the engine quotes what it failed on (`template "..." does not exist`), which a template can
/// compute from a secret value.
fn literal_quotes_only(detail: &str, source: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut rest = detail;
    while let Some(start) = rest.find(['"', '\'', '`']) {
        let quote = rest[start..].chars().next().expect("found above");
        let Some(len) = rest[start + 1..].find(quote) else {
            break;
        };
        let quoted = &rest[start + 1..start + 1 + len];
        out.push_str(&rest[..start]);
        if source.contains(quoted) {
            out.push_str(&rest[start..start + len + 2]);
        } else {
            out.push_str("<computed>");
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Secret values this short are left in error messages (redacting them would mangle the
/// message more than it protects).
const SHORTEST_REDACTED: usize = 3;

impl RenderError {
    /// The error with every value of `given` that it quotes replaced: a template can name a
    /// field or a path with a secret's value (`secret(x)[secret(y).password]`), and the engine's
    /// messages may quote what they failed on; log lines must never carry values.
    fn redacted(self, given: &[(SecretPath, &SecretData)]) -> RenderError {
        let scrub = |mut text: String| {
            for (_, data) in given {
                for value in data.field_values() {
                    if value.len() >= SHORTEST_REDACTED && text.contains(value) {
                        text = text.replace(value, "<redacted>");
                    }
                }
            }
            text
        };
        // Field names and paths were checked when noted (`Secrets::shows`); engine messages
        // are scrubbed here.
        match self {
            RenderError::Limit(m) => RenderError::Limit(scrub(m)),
            RenderError::Failed(m) => RenderError::Failed(scrub(m)),
            other => other,
        }
    }
}

/// Words a compile error as `line L, column C: what`.
fn describe_syntax_error(err: &Error, text: &str) -> String {
    let line = err.line().unwrap_or(1);
    let column = err
        .range()
        .map(|r| {
            let start = r.start.min(text.len());
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            text[line_start..start].chars().count() + 1
        })
        .unwrap_or(1);
    let what = err
        .detail()
        .map_or_else(|| err.kind().to_string(), str::to_string);
    format!("template syntax error at line {line}, column {column}: {what}")
}

/// What one rendering noticed: secrets read, the first one missing, fields looked up in vain.
#[derive(Default)]
struct Notes {
    used: Vec<SecretPath>,
    needed: Option<SecretPath>,
    bad_path: Option<String>,
    missing_fields: Vec<String>,
}

impl Notes {
    /// The error a failed rendering of `source` reports.
    fn explain(self, err: &Error, source: &str) -> RenderError {
        if let Some(path) = self.needed {
            return RenderError::Needs(path);
        }
        if let Some(reason) = self.bad_path {
            return RenderError::BadPath(reason);
        }
        let line = err.line().map_or(String::new(), |l| format!(" (line {l})"));
        match err.kind() {
            ErrorKind::UndefinedError => {
                RenderError::MissingField(match self.missing_fields.last() {
                    Some(field) => format!("{field}{line}"),
                    None => format!("an undefined value{line}"),
                })
            }
            ErrorKind::OutOfFuel => RenderError::Limit(format!(
                "the template ran out of fuel ({FUEL} instructions){line}"
            )),
            ErrorKind::WriteFailure => RenderError::Limit(format!(
                "the rendered file is larger than {MAX_OUTPUT_BYTES} bytes{line}"
            )),
            ErrorKind::InvalidOperation
                if err.detail().is_some_and(|d| d.contains("recursion")) =>
            {
                RenderError::Limit(format!(
                    "the template nests deeper than {RECURSION_LIMIT} levels{line}"
                ))
            }
            kind => RenderError::Failed(format!(
                "{}{line}",
                err.detail()
                    .map_or(kind.to_string(), |d| literal_quotes_only(d, source))
            )),
        }
    }
}

/// The secrets a rendering may read, with what it noticed.
struct Secrets {
    /// The template's source, to tell literal names from computed ones.
    source: Arc<str>,
    data: BTreeMap<String, BTreeMap<String, Value>>,
    notes: Mutex<Notes>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} secrets>", self.data.len())
    }
}

impl fmt::Debug for Notes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notes").finish_non_exhaustive()
    }
}

impl Secrets {
    /// `text` (a field name or path a template used) as a log line may show it: quoted when
    /// the template's source holds it literally, withheld when it was computed (it may come
    /// from a secret value, transformed in any way).
    fn shown(&self, text: &str) -> String {
        if self.source.contains(text) {
            format!("{text:?}")
        } else {
            "<a computed name>".to_string()
        }
    }
}

impl Object for Secrets {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }
}

/// One secret's fields as a template sees them; a field looked up in vain is noted, so that
/// the error can name it.
struct Fields {
    path: String,
    fields: BTreeMap<String, Value>,
    secrets: std::sync::Weak<Secrets>,
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret {}>", self.path)
    }
}

impl Object for Fields {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let found = self.fields.get(name).cloned();
        if found.is_none() {
            if let Some(secrets) = self.secrets.upgrade() {
                let field = secrets.shown(name);
                secrets
                    .notes
                    .lock()
                    .missing_fields
                    .push(format!("{field} of {}", self.path));
            }
        }
        found
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.fields
                .keys()
                .map(|k| Value::from(k.as_str()))
                .collect(),
        )
    }
}

/// A secret's fields as template values, from its JSON rendering (parsed, converted, wiped).
fn fields_of(data: &SecretData) -> BTreeMap<String, Value> {
    let json = data.render(None).map_or(&[][..], |b| b.expose());
    let mut parsed: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let fields = match &parsed {
        serde_json::Value::Object(map) => {
            map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()
        }
        _ => BTreeMap::new(),
    };
    wipe_json(&mut parsed);
    fields
}

fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::from)
            .or_else(|| n.as_u64().map(Value::from))
            .unwrap_or_else(|| Value::from(n.as_f64().unwrap_or_default())),
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => items.iter().map(to_value).collect(),
        serde_json::Value::Object(map) => Value::from(
            map.iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}

/// `secret(path)`: the secret's data as a map of its fields.
fn secret(state: &State, path: &str) -> Result<Value, Error> {
    let secrets = state
        .lookup(SECRETS_VAR)
        .and_then(|v| v.downcast_object::<Secrets>())
        .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "secret() outside a rendering"))?;
    let stop = |why: &str| Error::new(ErrorKind::InvalidOperation, why.to_string());
    let path = match SecretPath::parse(path) {
        Ok(p) => p,
        Err(reason) => {
            let why = if secrets.source.contains(path) {
                format!("secret({path:?}): {reason}")
            } else {
                "secret() with a path built from a secret value is not a valid Vault path"
                    .to_string()
            };
            secrets.notes.lock().bad_path = Some(why);
            return Err(stop("bad secret path"));
        }
    };
    let Some(fields) = secrets.data.get(path.as_str()).cloned() else {
        let mut notes = secrets.notes.lock();
        if notes.used.len() >= MAX_SECRETS {
            notes.bad_path = Some(format!(
                "the template reads more than {MAX_SECRETS} secrets"
            ));
        } else {
            notes.needed = Some(path);
        }
        return Err(stop("secret not fetched yet"));
    };
    {
        let mut notes = secrets.notes.lock();
        if !notes.used.contains(&path) {
            notes.used.push(path.clone());
        }
    }
    Ok(Value::from_object(Fields {
        path: path.as_str().to_string(),
        fields,
        secrets: Arc::downgrade(&secrets),
    }))
}

fn b64encode(value: &Value) -> Result<String, Error> {
    let bytes = match (value.as_str(), value.as_bytes()) {
        (Some(s), _) => s.as_bytes().to_vec(),
        (None, Some(b)) => b.to_vec(),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "b64encode expects a string",
            ))
        }
    };
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn b64decode(value: &str) -> Result<String, Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "b64decode: not valid base64"))?;
    String::from_utf8(bytes).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "b64decode: the decoded bytes are not UTF-8 text",
        )
    })
}

fn fromjson(value: &str) -> Result<Value, Error> {
    let mut parsed: serde_json::Value = serde_json::from_str(value)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "fromjson: not valid JSON"))?;
    let out = to_value(&parsed);
    wipe_json(&mut parsed);
    Ok(out)
}

/// The render output, refusing to grow past [`MAX_OUTPUT_BYTES`]; wiped when dropped.
struct Capped(Zeroizing<Vec<u8>>);

impl io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            return Err(io::Error::other("output cap"));
        }
        // Grown by hand so that no freed, unwiped buffer keeps a copy.
        if self.0.capacity() < self.0.len() + buf.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (self.0.len() + buf.len()).next_power_of_two(),
            ));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger;
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        SecretData::from_pairs(pairs.iter().copied())
    }

    fn path(p: &str) -> SecretPath {
        SecretPath::parse(p).unwrap()
    }

    /// Renders `text`, fetching from `store` whatever it asks for, as the filesystem does.
    fn render_all(text: &str, store: &[(&str, SecretData)]) -> Result<String, RenderError> {
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
    fn filters_encode_decode_and_json() {
        let s = data(&[("k", "hello"), ("b", "aGk="), ("j", "{\"x\": [1, 2]}")]);
        let out = render_all(
            "{{ secret('s/x').k | b64encode }} {{ secret('s/x').b | b64decode }} {{ (secret('s/x').j | fromjson).x[1] }} {{ secret('s/x') | tojson }}",
            &[("s/x", s)],
        )
        .unwrap();
        assert_eq!(
            out,
            r#"aGVsbG8= hi 2 {"b": "aGk=", "j": "{\"x\": [1, 2]}", "k": "hello"}"#
        );
    }

    #[test]
    fn a_syntax_error_names_line_and_column() {
        let err = Template::compile("line one\nuser={{ secret('a/b').user }\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("column"), "{err}");
        assert!(err.starts_with("template syntax error"), "{err}");
    }

    #[test]
    fn a_missing_field_is_named_and_nothing_is_rendered_as_empty() {
        let s = data(&[("user", "app")]);
        let err = render_all(
            "{{ secret('secret/app/db').pasword }}",
            &[("secret/app/db", s)],
        )
        .unwrap_err();
        assert_eq!(
            err,
            RenderError::MissingField("\"pasword\" of secret/app/db (line 1)".into())
        );
    }

    #[test]
    fn a_runaway_loop_stops_at_the_fuel_limit() {
        let err = render_all(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(err, RenderError::Limit(ref m) if m.contains("fuel")),
            "{err:?}"
        );
    }

    #[test]
    fn output_past_the_cap_is_refused() {
        let err = render_all("{{ 'x' * 2000000 }}", &[]);
        // Either the string itself or writing it hits a limit, never an unbounded file.
        assert!(
            matches!(
                err,
                Err(RenderError::Limit(_)) | Err(RenderError::Failed(_))
            ),
            "{err:?}"
        );
        let err = render_all(
            "{% for i in range(3000) %}{{ 'y' * 1000 }}{% endfor %}",
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(err, RenderError::Limit(ref m) if m.contains("larger than")),
            "{err:?}"
        );
    }

    #[test]
    fn no_files_environment_or_bad_paths() {
        let err = Template::compile("{% include '/etc/passwd' %}")
            .map(|t| t.render(&[]))
            .unwrap();
        assert!(matches!(err, Err(RenderError::Failed(_))), "{err:?}");
        let err = render_all("{{ secret('../etc').x }}", &[]).unwrap_err();
        assert!(
            matches!(err, RenderError::BadPath(ref m) if m.contains("../etc")),
            "{err:?}"
        );
    }

    #[test]
    fn debug_output_never_shows_values() {
        let t = Template::compile("{{ secret('a/b').k }}").unwrap();
        let a = data(&[("k", "very-secret-value")]);
        t.render(&[(path("a/b"), &a)]).unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
    }

    #[test]
    fn errors_never_quote_a_secret_value() {
        let a = data(&[("password", "hunter2-value"), ("user", "app")]);
        let err = render_all(
            "{{ secret('a/b')[secret('a/b').password] }}",
            &[("a/b", a.clone())],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("computed name"), "{text}");
        let err = render_all(
            "{{ secret(secret('a/b').password ~ '/..') }}",
            &[("a/b", a)],
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
