//! What a failed rendering reports: compile errors with their line and column, render errors
//! explained from what the rendering noticed (the secret it needs, a bad path, the missing
//! field, the limit it hit), and never a secret value: computed names are withheld and values
//! quoted by the engine are redacted.

use std::fmt;

use minijinja::{Error, ErrorKind};

use super::sandbox::RECURSION_LIMIT;
use super::{RenderError, FUEL, MAX_OUTPUT_BYTES};
use crate::secret::SecretData;
use crate::spec::SecretPath;

/// `detail` with every quoted part that the template `source` does not hold literally replaced:
/// the engine quotes what it failed on (`template "..." does not exist`), which a template can
/// compute from a secret value.
pub(super) fn literal_quotes_only(detail: &str, source: &str) -> String {
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
    pub(super) fn redacted(self, given: &[(SecretPath, &SecretData)]) -> RenderError {
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
pub(super) fn describe_syntax_error(err: &Error, text: &str) -> String {
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
pub(super) struct Notes {
    pub(super) used: Vec<SecretPath>,
    pub(super) needed: Option<SecretPath>,
    pub(super) bad_path: Option<String>,
    pub(super) missing_fields: Vec<String>,
}

impl fmt::Debug for Notes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notes").finish_non_exhaustive()
    }
}

impl Notes {
    /// The error a failed rendering of `source` reports.
    pub(super) fn explain(self, err: &Error, source: &str) -> RenderError {
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

#[cfg(test)]
mod tests {
    use super::super::tests::{data, render_all};
    use super::super::Template;
    use super::*;

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
