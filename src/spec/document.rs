//! Parsing what users write into spec entries: `--secret NAME=PATH[#KEY]` arguments, YAML/JSON
//! spec documents (bounded: size, depth, no anchors, aliases or merge keys) and template texts,
//! compiled as they are read.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::certificate::PkiDocument;
use super::checks::check_key;
use super::{CertPart, PodNames, SecretEntry, SecretPath, Shows, SpecError};
use crate::template::Template;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecDocument {
    secrets: Vec<EntryDocument>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDocument {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    share: bool,
    #[serde(default)]
    pki: Option<PkiDocument>,
}

impl EntryDocument {
    /// The entry's files: one, or a certificate's four (`NAME/tls.crt`...).
    fn into_entries(self, pod: Option<&PodNames>) -> Result<Vec<SecretEntry>, SpecError> {
        let name = self.name.clone();
        let bad = |reason: String| SpecError::Entry {
            name: name.clone(),
            reason,
        };
        let Some(pki) = self.pki else {
            return self.into_entry().map(|e| vec![e]);
        };
        if self.path.is_some() || self.template.is_some() || self.key.is_some() || self.share {
            return Err(bad(
                "a `pki` entry is a certificate alone: leave out `path`, `key`, `template` and `share`".into(),
            ));
        }
        let path = SecretPath::certificate(pki.request(pod).map_err(bad)?);
        Ok(CertPart::ALL
            .iter()
            .map(|&part| SecretEntry {
                name: format!("{}/{}", self.name, part.file_name()),
                shows: Shows::Certificate {
                    path: path.clone(),
                    part,
                },
                share: false,
            })
            .collect())
    }

    fn into_entry(self) -> Result<SecretEntry, SpecError> {
        let bad = |reason: &str| SpecError::Entry {
            name: self.name.clone(),
            reason: reason.to_string(),
        };
        match (&self.path, &self.template) {
            (Some(path), None) => Ok(SecretEntry {
                share: self.share,
                ..entry(&self.name, path, self.key.clone())?
            }),
            (None, Some(_)) if self.share => Err(bad(
                "`share` belongs to `path` entries (a template reads a leased secret shared when a `path` entry of the same secret says `share: true`)",
            )),
            (None, Some(text)) if self.key.is_none() => template_entry(&self.name, text),
            (None, Some(_)) => Err(bad(
                "`key` belongs to `path` entries; a template picks fields itself, e.g. {{ secret('secret/app/db').password }}",
            )),
            (Some(_), Some(_)) => Err(bad(
                "give either `path` (one secret) or `template` (a file rendered from secrets), not both",
            )),
            (None, None) => Err(bad(
                "missing `path` (a Vault path, e.g. secret/app/db), `template` or `pki` (a certificate)",
            )),
        }
    }
}

/// A template entry: `text` compiled now, so that a syntax error is refused before mounting,
/// naming the entry, line and column.
pub fn template_entry(name: &str, text: &str) -> Result<SecretEntry, SpecError> {
    let template = Template::compile(text).map_err(|reason| SpecError::Entry {
        name: name.to_string(),
        reason,
    })?;
    Ok(SecretEntry {
        name: name.to_string(),
        shows: Shows::Template(Arc::new(template)),
        share: false,
    })
}

/// Parses one `--secret NAME=PATH[#KEY]` argument.
pub fn parse_secret_arg(arg: &str) -> Result<SecretEntry, SpecError> {
    let bad = |reason: &str| SpecError::Argument {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let (name, rest) = arg.split_once('=').ok_or_else(|| bad("missing '='"))?;
    let (path, key) = match rest.rsplit_once('#') {
        Some((p, k)) => (p, Some(k)),
        None => (rest, None),
    };
    entry(name, path, key.map(str::to_string))
}

/// The largest spec text accepted (`--spec FILE` or the CSI `secrets` attribute), checked
/// before parsing. Ten thousand entries of a sane spec fit in well under this.
pub const MAX_SPEC_BYTES: usize = 64 << 10;

/// Structural nesting a spec document may use: a mapping holding a list of mappings is depth 3.
const MAX_DOCUMENT_DEPTH: usize = 8;

/// Parses a spec document (YAML, or JSON, which is YAML too): `secrets: [{name, path, key?}]`.
/// A bare list of entries is accepted as well.
///
/// A hostile text costs little: it is refused above [`MAX_SPEC_BYTES`] before parsing, YAML
/// anchors, aliases and merge keys are refused (an alias bomb cannot expand), nesting is
/// capped and a stream may hold one document only.
pub fn parse_spec_document(text: &str) -> Result<Vec<SecretEntry>, SpecError> {
    parse_spec_document_for(text, None)
}

/// [`parse_spec_document`] for a pod's volume: certificate names may use the pod's names.
pub fn parse_spec_document_for(
    text: &str,
    pod: Option<&PodNames>,
) -> Result<Vec<SecretEntry>, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::Document(format!(
            "the spec is {} bytes, over the limit of {MAX_SPEC_BYTES} bytes (64 KiB)",
            text.len()
        )));
    }
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_aliases: 0,
            max_anchors: 0,
            max_depth: MAX_DOCUMENT_DEPTH,
            max_documents: 1,
            max_nodes: MAX_SPEC_BYTES,
        },
        merge_keys: serde_saphyr::options::MergeKeyPolicy::Error,
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        with_snippet: false,
    };
    let docs = serde_saphyr::from_str_with_options::<Document>(text, options)
        .map_err(|e| SpecError::Document(document_error(&e)))?;
    let mut entries = Vec::new();
    for entry in docs.0 {
        entries.extend(entry.into_entries(pod)?);
    }
    Ok(entries)
}

/// Words a YAML error for a user: budget breaches say which construct is not allowed.
fn document_error(error: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    let at = error
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    match error.without_snippet() {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Aliases { .. }
            | BudgetBreach::Anchors { .. }
            | BudgetBreach::AliasAnchorRatio { .. }
            | BudgetBreach::RecordedAnchorEvents { .. }
            | BudgetBreach::RecordedAnchorBytes { .. } => {
                format!("YAML anchors and aliases are not allowed in a volume spec{at}; write every entry out in full instead of `&name` / `*name`")
            }
            BudgetBreach::MergeKeys { .. } => {
                format!("YAML merge keys (`<<`) are not allowed in a volume spec{at}")
            }
            BudgetBreach::Depth { .. } => {
                format!("the document is nested deeper than {MAX_DOCUMENT_DEPTH} levels{at}")
            }
            BudgetBreach::Documents { .. } => {
                format!("the text holds more than one YAML document (`---`){at}")
            }
            other => format!("the document is too large to parse ({other:?}){at}"),
        },
        serde_saphyr::Error::MergeKeyNotAllowed { .. } => {
            format!("YAML merge keys (`<<`) are not allowed in a volume spec{at}")
        }
        other => other.to_string(),
    }
}

/// The two accepted shapes, told apart by what the document is: a mapping must be
/// `secrets: [...]`, a sequence is the bare list of entries.
struct Document(Vec<EntryDocument>);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};

        struct Shape;
        impl<'de> serde::de::Visitor<'de> for Shape {
            type Value = Vec<EntryDocument>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping `secrets: [...]` or a list of {name, path, key?} or {name, template} entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::<EntryDocument>::deserialize(SeqAccessDeserializer::new(seq))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                SpecDocument::deserialize(MapAccessDeserializer::new(map)).map(|d| d.secrets)
            }
        }
        deserializer.deserialize_any(Shape).map(Document)
    }
}

fn entry(name: &str, path: &str, key: Option<String>) -> Result<SecretEntry, SpecError> {
    let bad = |reason: String| SpecError::Entry {
        name: name.to_string(),
        reason,
    };
    let path = SecretPath::parse(path).map_err(bad)?;
    if let Some(key) = key.as_deref() {
        check_key(key).map_err(bad)?;
    }
    Ok(SecretEntry {
        name: name.to_string(),
        shows: Shows::Secret { path, key },
        share: false,
    })
}

#[cfg(test)]
mod tests {
    use super::super::VolumeSpec;
    use super::PodNames;
    use super::*;

    #[test]
    fn secret_argument_splits_name_path_and_key() {
        let e = parse_secret_arg("db/password=secret/app/db#password").unwrap();
        assert_eq!(e.name, "db/password");
        assert_eq!(e.secret().unwrap().0.as_str(), "secret/app/db");
        assert_eq!(e.secret().unwrap().1, Some("password"));
        let e = parse_secret_arg("all=/secret/app/db/").unwrap();
        assert_eq!(e.secret().unwrap().0.as_str(), "secret/app/db");
        assert_eq!(e.secret().unwrap().1, None);
    }

    #[test]
    fn bad_arguments_name_what_is_wrong() {
        let err = parse_secret_arg("nopath").unwrap_err().to_string();
        assert!(
            err.contains("\"nopath\"") && err.contains("missing '='"),
            "{err}"
        );
        let err = parse_secret_arg("x=secret/a#").unwrap_err().to_string();
        assert!(err.contains("\"x\"") && err.contains("key"), "{err}");
        let err = parse_secret_arg("x=").unwrap_err().to_string();
        assert!(err.contains("path is empty"), "{err}");
    }

    #[test]
    fn yaml_spec_parses_and_refuses_unknown_fields() {
        let entries = parse_spec_document(
            "secrets:\n  - name: db/password\n    path: secret/app/db\n    key: password\n  - name: all\n    path: secret/app/db\n",
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].secret().unwrap().1, Some("password"));
        let json = parse_spec_document(r#"[{"name":"a","path":"secret/a"}]"#).unwrap();
        assert_eq!(json[0].name, "a");
        let err = parse_spec_document("secrets:\n  - name: a\n    path: secret/a\n    nme: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `nme`"), "{err}");
        assert!(parse_spec_document("secrets: [unclosed").is_err());
    }

    #[test]
    fn path_errors_name_the_entry_from_arguments_and_documents() {
        let err = parse_secret_arg("db=secret/app?list=true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"db\"") && err.contains("'?'"), "{err}");
        let err = parse_spec_document("secrets:\n  - name: db\n    path: \"secret/%2e%2e/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"db\"") && err.contains("'%'"), "{err}");
    }

    #[test]
    fn share_marks_path_entries_and_is_refused_on_templates() {
        let entries = parse_spec_document(
            "secrets:\n- {name: db, path: database/creds/app, share: true}\n- {name: kv, path: secret/app}\n",
        )
        .unwrap();
        assert!(entries[0].share && !entries[1].share);
        let spec = VolumeSpec::new(entries).unwrap();
        let shared: Vec<_> = spec.shared_paths().into_iter().collect();
        assert_eq!(
            shared,
            vec![SecretPath::parse("database/creds/app").unwrap()]
        );
        let err = parse_spec_document(
            "secrets:\n- {name: t, template: \"{{ secret('secret/a').k }}\", share: true}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`share` belongs to `path` entries"), "{err}");
        assert!(err.starts_with("secret entry \"t\": "), "{err}");
    }

    #[test]
    fn a_pki_entry_is_a_directory_of_four_files_of_one_certificate() {
        let text = "secrets:\n- name: tls\n  pki: {path: pki/issue/web, commonName: '{{ pod.name }}.example.com'}\n";
        let pod = PodNames {
            name: "web-0".into(),
            ..PodNames::default()
        };
        let entries = parse_spec_document_for(text, Some(&pod)).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["tls/tls.crt", "tls/tls.key", "tls/ca.crt", "tls/bundle.pem"]
        );
        let path = entries[0].secret().unwrap().0.clone();
        assert!(entries.iter().all(|e| *e.secret().unwrap().0 == path));
        assert!(path.as_str().starts_with("pki/issue/web#"));
        let request = path.certificate_request().unwrap();
        assert_eq!(request.common_name, "web-0.example.com");
        assert_eq!(SecretPath::recorded(path.as_str()).unwrap(), path);
        assert!(
            SecretPath::parse(path.as_str()).is_err(),
            "no user path is one"
        );
        VolumeSpec::new(entries).unwrap();

        let other = PodNames {
            name: "web-1".into(),
            ..PodNames::default()
        };
        let theirs = parse_spec_document_for(text, Some(&other)).unwrap();
        assert_ne!(
            *theirs[0].secret().unwrap().0,
            path,
            "another request, another path"
        );

        let err = parse_spec_document(text).unwrap_err().to_string();
        assert!(
            err.starts_with("secret entry \"tls\": pki.commonName"),
            "{err}"
        );
        let err = parse_spec_document(
            "- {name: tls, path: secret/a, pki: {path: pki/issue/web, commonName: a.example.com}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a `pki` entry is a certificate alone"),
            "{err}"
        );
    }

    #[test]
    fn alias_bomb_is_refused_before_expansion() {
        // Each level is ten times the one before: expanded, `*g` would be ten million nodes.
        let mut bomb = String::from("secrets:\n  - &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (level, prev) in ["b", "c", "d", "e", "f", "g"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f"])
        {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("  - &{level} [{refs}]\n"));
        }
        bomb.push_str("  - [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n");
        assert!(bomb.len() < 1024);
        let err = parse_spec_document(&bomb).unwrap_err().to_string();
        assert!(
            err.contains(
                "YAML anchors and aliases are not allowed in a volume spec (line 2, column"
            ),
            "{err}"
        );
        let list_bomb = "- &e {name: a, path: secret/a}\n- *e\n";
        let err = parse_spec_document(list_bomb).unwrap_err().to_string();
        assert!(err.contains("anchors and aliases are not allowed"), "{err}");
    }

    #[test]
    fn a_lone_anchor_is_refused_too() {
        let err = parse_spec_document("secrets:\n  - &one\n    name: a\n    path: secret/a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("anchors and aliases are not allowed"), "{err}");
    }

    #[test]
    fn merge_keys_are_refused() {
        let text = "- &x {name: a, path: secret/a}\n- <<: *x\n  name: b\n";
        let err = parse_spec_document(text).unwrap_err().to_string();
        assert!(err.contains("anchors and aliases are not allowed"), "{err}");
        let text = "secrets:\n  - <<: {path: secret/a}\n    name: a\n";
        let err = parse_spec_document(text).unwrap_err().to_string();
        assert!(err.contains("merge keys (`<<`) are not allowed"), "{err}");
    }

    #[test]
    fn spec_over_64_kib_is_refused_before_parsing_naming_the_limit() {
        let entry = "  - {name: a, path: secret/a}\n";
        let mut text = String::from("secrets:\n");
        while text.len() <= 65 << 10 {
            text.push_str(entry);
        }
        let err = parse_spec_document(&text).unwrap_err().to_string();
        assert!(
            err.contains(&format!("the spec is {} bytes", text.len()))
                && err.contains("over the limit of 65536 bytes (64 KiB)"),
            "{err}"
        );
        // Not valid YAML at all: refused for its size, never parsed.
        let junk = "[".repeat(MAX_SPEC_BYTES + 1);
        let err = parse_spec_document(&junk).unwrap_err().to_string();
        assert!(err.contains("over the limit of 65536 bytes"), "{err}");
    }

    #[test]
    fn spec_at_the_size_limit_is_parsed() {
        let mut text = String::from("secrets:\n");
        let mut n = 0;
        loop {
            let entry = format!("  - {{name: f{n}, path: secret/app/db, key: k}}\n");
            if text.len() + entry.len() > MAX_SPEC_BYTES {
                break;
            }
            text.push_str(&entry);
            n += 1;
        }
        let entries = parse_spec_document(&text).unwrap();
        assert_eq!(entries.len(), n);
        assert!(VolumeSpec::new(entries).is_ok());
    }

    #[test]
    fn deep_nesting_and_several_documents_are_refused() {
        let deep = format!("secrets: {}{}", "[".repeat(40), "]".repeat(40));
        let err = parse_spec_document(&deep).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        let two = "- {name: a, path: secret/a}\n---\n- {name: b, path: secret/b}\n";
        assert!(parse_spec_document(two).is_err());
    }

    #[test]
    fn json_and_yaml_shapes_keep_parsing() {
        let json = parse_spec_document(
            r#"{"secrets":[{"name":"a","path":"secret/a","key":"k"},{"name":"b","path":"secret/b"}]}"#,
        )
        .unwrap();
        assert_eq!(json.len(), 2);
        assert_eq!(json[0].secret().unwrap().1, Some("k"));
        let list = parse_spec_document("# a comment\n---\n- name: a\n  path: secret/a\n").unwrap();
        assert_eq!(list[0].secret().unwrap().0.as_str(), "secret/a");
        let err = parse_spec_document("- name: a\n  path: secret/a\n  extra: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
        let err = parse_spec_document("other: []\n").unwrap_err().to_string();
        assert!(err.contains("other"), "{err}");
        assert!(parse_spec_document("secrets: just text").is_err());
        assert!(parse_spec_document("").is_err());
    }

    #[test]
    fn template_entries_sit_beside_plain_ones_and_bad_ones_are_named() {
        let entries = parse_spec_document(
            "secrets:\n  - {name: db/password, path: secret/app/db, key: password}\n  - name: db/url\n    template: \"postgresql://{{ secret('secret/app/db').user }}@db/app\"\n",
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].secret().is_some());
        assert!(matches!(entries[1].shows, Shows::Template(_)));
        let spec = VolumeSpec::new(entries).unwrap();
        assert_eq!(spec.nodes().len(), 4, "root, db, db/password, db/url");

        let err = |text: &str| parse_spec_document(text).unwrap_err().to_string();
        let syntax = err("- {name: bad, template: \"line one\\n{{ secret('a/b').x }\"}");
        assert!(
            syntax.contains("secret entry \"bad\"") && syntax.contains("line 2, column"),
            "{syntax}"
        );
        let both = err("- {name: x, path: secret/a, template: \"t\"}");
        assert!(
            both.contains("either `path`") && both.contains("\"x\""),
            "{both}"
        );
        let keyed = err("- {name: x, template: \"t\", key: k}");
        assert!(keyed.contains("`key` belongs to `path` entries"), "{keyed}");
        let neither = err("- {name: x}");
        assert!(neither.contains("missing `path`"), "{neither}");
    }
}
