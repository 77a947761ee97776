//! The sandboxed engine one rendering runs in: a `minijinja` environment with no loader (no
//! `include` or `import` of files), no environment or network access, bounded by fuel,
//! recursion depth and output size; the `secret(path)` function over the secrets given, the
//! filters, and the capped, wiped output.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use base64::Engine as _;
use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use parking_lot::Mutex;
use zeroize::Zeroizing;

use super::errors::{describe_syntax_error, Notes};
use super::{RenderError, Rendered, FUEL, MAX_OUTPUT_BYTES, MAX_SECRETS};
use crate::secret::{wipe_json, SecretData};
use crate::spec::SecretPath;

/// How deep macros, includes of blocks and nested calls may go.
pub(super) const RECURSION_LIMIT: usize = 32;

/// The name the render context holds the secrets under (not a variable templates use).
const SECRETS_VAR: &str = "__vaultfs_secrets";

/// The sandboxed engine with `text` added as its one template.
pub(super) fn environment(text: &str, debug: bool) -> Result<Environment<'static>, Error> {
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
    use super::super::tests::{data, render_all};
    use super::super::Template;
    use super::*;

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
}
