//! The volume spec: which files a mount shows and which Vault secret (or template over secrets)
//! each holds. Parsing (`--secret NAME=PATH[#KEY]`, YAML/JSON spec documents, template texts),
//! validation, and the directory layout
//! with inode numbers that are a pure function of the spec. No I/O, no Vault, no FUSE.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;

use crate::logging::is_control_or_format;
use crate::template::Template;

/// Inode number of a node in a volume's layout. The root is always 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeNo(pub u64);

impl InodeNo {
    pub const ROOT: InodeNo = InodeNo(1);
}

/// A Vault path as users write it for `vault kv get` / `vault read` (no `/data/`), without
/// leading or trailing slashes.
///
/// Each `/`-separated segment may hold only [`PATH_CHARS_ALLOWED`]: ASCII letters, digits and
/// `- _ . + @ = : ,`, which covers paths as people write them for `vault read` (mount names,
/// `read-only` roles, `user@example.com`, `web.example.com`, `key=value`-style names). The path
/// is pasted into the request URL, so anything else could change what that URL means: `%`
/// (percent-encoding tricks such as `%2e%2e` or `%2f`), `\`, `?` (`?list=true` turns a read into
/// a LIST), `#` (a fragment cuts the path short), whitespace, control characters, Unicode bidi
/// and format characters (text that displays differently from what is sent) and any other
/// non-ASCII character. `.` and `..` segments are refused (a proxy or server may resolve them
/// to another path), and so are empty segments (`//`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretPath(String);

/// The characters a Vault path segment may hold besides ASCII letters and digits; see
/// [`SecretPath`] for why.
pub const PATH_PUNCTUATION_ALLOWED: &str = "-_.+@=:,";

/// How error messages describe the characters a path segment may hold.
pub const PATH_CHARS_ALLOWED: &str = "ASCII letters, digits and - _ . + @ = : ,";

impl SecretPath {
    /// Trims surrounding whitespace and slashes, then checks every segment; see [`SecretPath`].
    /// The error names the first offending character (escaped), its position and segment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let p = text.trim().trim_matches('/');
        if p.is_empty() {
            return Err("the Vault path is empty".into());
        }
        let example = "write it as for `vault read`, e.g. secret/app/db";
        let mut offset = 0;
        for (index, segment) in p.split('/').enumerate() {
            let number = index + 1;
            match segment {
                "" => {
                    return Err(format!(
                    "the Vault path {} has an empty segment (segment {number}, '//'); {example}",
                    shown(p)
                ))
                }
                "." | ".." => {
                    return Err(format!(
                        "the Vault path {} has a {segment:?} segment (segment {number}); \
                         relative segments are not allowed; {example}",
                        shown(p)
                    ))
                }
                _ => {}
            }
            let bad = segment.char_indices().find(|(_, c)| {
                !(c.is_ascii_alphanumeric() || PATH_PUNCTUATION_ALLOWED.contains(*c))
            });
            if let Some((at, c)) = bad {
                let position = p[..offset + at].chars().count() + 1;
                return Err(format!(
                    "the Vault path {} has {} at character {position} (segment {number}, {}); \
                     a path segment may hold only {PATH_CHARS_ALLOWED}",
                    shown(p),
                    describe(c),
                    shown(segment)
                ));
            }
            offset += segment.len() + 1;
        }
        Ok(Self(p.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest text an error message echoes back; the rest is elided.
const MAX_SHOWN_CHARS: usize = 80;

/// `text` quoted for an error message, with everything but printable ASCII escaped (so a bidi
/// override or a newline cannot disguise the message) and cut to [`MAX_SHOWN_CHARS`].
fn shown(text: &str) -> String {
    let mut out = String::from("\"");
    for (i, c) in text.chars().enumerate() {
        if i == MAX_SHOWN_CHARS {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_default());
    }
    out.push('"');
    out
}

/// A character for an error message: `'%'`, or its kind and code point (`U+202E`) for one that
/// is not printable ASCII.
fn describe(c: char) -> String {
    match c {
        ' ' => "a space".into(),
        c if c.is_ascii_graphic() => format!("{c:?}"),
        c if is_control_or_format(c) => {
            format!("the control or invisible character U+{:04X}", c as u32)
        }
        c if c.is_whitespace() => format!("the whitespace character U+{:04X}", c as u32),
        c => format!("the non-ASCII character U+{:04X}", c as u32),
    }
}

/// One file of a volume: `name` inside the mount and what it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEntry {
    pub name: String,
    pub shows: Shows,
}

/// What a file shows.
#[derive(Clone, Debug)]
pub enum Shows {
    /// The secret at `path`: the field `key`, or without a key the whole secret as a JSON
    /// object.
    Secret {
        path: SecretPath,
        key: Option<String>,
    },
    /// A template rendered over the secrets it reads.
    Template(Arc<Template>),
}

impl PartialEq for Shows {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Shows::Secret { path, key },
                Shows::Secret {
                    path: other_path,
                    key: other_key,
                },
            ) => path == other_path && key == other_key,
            (Shows::Template(a), Shows::Template(b)) => a.source() == b.source(),
            _ => false,
        }
    }
}

impl Eq for Shows {}

impl SecretEntry {
    /// The Vault path and key of a plain entry (`None` for a template).
    pub fn secret(&self) -> Option<(&SecretPath, Option<&str>)> {
        match &self.shows {
            Shows::Secret { path, key } => Some((path, key.as_deref())),
            Shows::Template(_) => None,
        }
    }

    /// Whether the file shows (or, for a template, last read) the secret at `path`.
    pub fn reads(&self, path: &SecretPath) -> bool {
        match &self.shows {
            Shows::Secret { path: p, .. } => p == path,
            Shows::Template(t) => t.reads(path),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid --secret {arg:?}: {reason}; expected NAME=PATH[#KEY], e.g. db/password=secret/app/db#password")]
    Argument { arg: String, reason: String },
    #[error("secret entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("invalid secrets spec: {0}; expected `secrets: [{{name, path, key?}} or {{name, template}}, ...]`")]
    Document(String),
    #[error("no secrets declared: give at least one --secret NAME=PATH[#KEY], --template NAME=FILE or --spec FILE")]
    Empty,
}

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
}

impl EntryDocument {
    fn into_entry(self) -> Result<SecretEntry, SpecError> {
        let bad = |reason: &str| SpecError::Entry {
            name: self.name.clone(),
            reason: reason.to_string(),
        };
        match (&self.path, &self.template) {
            (Some(path), None) => entry(&self.name, path, self.key.clone()),
            (None, Some(text)) if self.key.is_none() => template_entry(&self.name, text),
            (None, Some(_)) => Err(bad(
                "`key` belongs to `path` entries; a template picks fields itself, e.g. {{ secret('secret/app/db').password }}",
            )),
            (Some(_), Some(_)) => Err(bad(
                "give either `path` (one secret) or `template` (a file rendered from secrets), not both",
            )),
            (None, None) => Err(bad(
                "missing `path` (a Vault path, e.g. secret/app/db) or `template`",
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
    docs.0.into_iter().map(EntryDocument::into_entry).collect()
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
    })
}

/// Limits that keep a hostile spec from costing the daemon more than a sane one would.
const MAX_NAME_BYTES: usize = 4096;
/// Longest `key` (field of the secret) an entry may name.
pub const MAX_KEY_BYTES: usize = 256;
const MAX_DEPTH: usize = 32;
const MAX_ENTRIES: usize = 10_000;

/// The `key` (`#KEY` or `key:`) is looked up in the secret's data, never sent to Vault, so any
/// visible text goes; it must be non-empty, short, and free of control and format characters.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key (after '#' or in `key:`) is empty; leave it out to get the whole secret as JSON".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the key is {} bytes, over the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        ));
    }
    if let Some((at, c)) = first_hidden(key) {
        return Err(format!(
            "the key {} has {} at character {}; keys must be visible text",
            shown(key),
            describe(c),
            at + 1
        ));
    }
    Ok(())
}

/// The first control or format character of `text` and its (0-based) character index.
fn first_hidden(text: &str) -> Option<(usize, char)> {
    text.chars()
        .enumerate()
        .find(|(_, c)| is_control_or_format(*c))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the file name is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("the file name is over {MAX_NAME_BYTES} bytes"));
    }
    if name.split('/').count() > MAX_DEPTH {
        return Err(format!(
            "the file name is nested deeper than {MAX_DEPTH} directories"
        ));
    }
    if name.starts_with('/') {
        return Err("the file name is absolute; expected a path relative to the mount".into());
    }
    if let Some((at, c)) = first_hidden(name) {
        return Err(format!(
            "the file name has {} at character {}; names must be visible text",
            describe(c),
            at + 1
        ));
    }
    for segment in name.split('/') {
        match segment {
            "" => return Err("the file name has an empty segment ('//' or a trailing '/')".into()),
            "." | ".." => {
                return Err(format!(
                    "the file name has a {segment:?} segment; names must stay inside the mount"
                ))
            }
            s if s.len() > 255 => return Err("a segment of the file name is over 255 bytes".into()),
            _ => {}
        }
    }
    Ok(())
}

/// What a node of the layout is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory and its children, sorted by name.
    Dir(Vec<InodeNo>),
    /// A file showing entry `usize` of the spec.
    File(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub ino: InodeNo,
    pub parent: InodeNo,
    /// The last segment of the name (empty for the root).
    pub name: String,
    pub kind: NodeKind,
}

/// A validated volume: its entries and the directory layout derived from their names.
/// Inode numbers are assigned depth-first in name order, so the same spec always yields the
/// same numbers.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    entries: Vec<SecretEntry>,
    nodes: Vec<Node>,
}

#[derive(Default)]
struct DraftDir {
    dirs: BTreeMap<String, DraftDir>,
    files: BTreeMap<String, usize>,
}

impl VolumeSpec {
    /// Validates names (no `..`, absolute names, empty segments, duplicates, file/directory
    /// clashes) and builds the layout.
    pub fn new(entries: Vec<SecretEntry>) -> Result<Self, SpecError> {
        if entries.is_empty() {
            return Err(SpecError::Empty);
        }
        if entries.len() > MAX_ENTRIES {
            return Err(SpecError::Document(format!(
                "{} entries; at most {MAX_ENTRIES} are allowed",
                entries.len()
            )));
        }
        let mut root = DraftDir::default();
        for (index, e) in entries.iter().enumerate() {
            let bad = |reason: String| SpecError::Entry {
                name: e.name.clone(),
                reason,
            };
            check_name(&e.name).map_err(bad)?;
            let segments: Vec<&str> = e.name.split('/').collect();
            let (file, dirs) = segments
                .split_last()
                .expect("split yields one segment at least");
            let mut dir = &mut root;
            let mut walked = String::new();
            for d in dirs {
                walked.push_str(d);
                if dir.files.contains_key(*d) {
                    return Err(bad(format!(
                        "{walked:?} is declared as a file and used here as a directory"
                    )));
                }
                dir = dir.dirs.entry((*d).to_string()).or_default();
                walked.push('/');
            }
            if dir.dirs.contains_key(*file) {
                return Err(bad(
                    "the name is also used as a directory by another entry".into()
                ));
            }
            if dir.files.insert((*file).to_string(), index).is_some() {
                return Err(bad("duplicate file name".into()));
            }
        }
        let mut nodes = Vec::new();
        layout(&root, InodeNo::ROOT, String::new(), &mut nodes);
        Ok(Self { entries, nodes })
    }

    pub fn entries(&self) -> &[SecretEntry] {
        &self.entries
    }

    pub fn node(&self, ino: InodeNo) -> Option<&Node> {
        let index = usize::try_from(ino.0.checked_sub(1)?).ok()?;
        self.nodes.get(index)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The child called `name` of directory `parent`.
    pub fn child(&self, parent: InodeNo, name: &str) -> Option<&Node> {
        match &self.node(parent)?.kind {
            NodeKind::Dir(children) => children
                .iter()
                .filter_map(|c| self.node(*c))
                .find(|n| n.name == name),
            NodeKind::File(_) => None,
        }
    }

    /// The file inodes that show a given Vault path (templates: that read it last time).
    pub fn files_of<'a>(&'a self, path: &'a SecretPath) -> impl Iterator<Item = InodeNo> + 'a {
        self.nodes.iter().filter_map(move |n| match n.kind {
            NodeKind::File(i) if self.entries[i].reads(path) => Some(n.ino),
            _ => None,
        })
    }
}

/// Appends `dir` and everything below it to `nodes`, numbering depth-first in name order.
/// Children of a directory get consecutive numbers right after it is reserved.
fn layout(dir: &DraftDir, parent: InodeNo, name: String, nodes: &mut Vec<Node>) -> InodeNo {
    let ino = InodeNo(nodes.len() as u64 + 1);
    nodes.push(Node {
        ino,
        parent: if ino == InodeNo::ROOT { ino } else { parent },
        name,
        kind: NodeKind::Dir(Vec::new()),
    });
    let mut children: Vec<(String, Option<usize>, Option<&DraftDir>)> = dir
        .files
        .iter()
        .map(|(n, i)| (n.clone(), Some(*i), None))
        .chain(dir.dirs.iter().map(|(n, d)| (n.clone(), None, Some(d))))
        .collect();
    children.sort_by(|a, b| a.0.cmp(&b.0));
    let mut child_inos = Vec::with_capacity(children.len());
    for (child_name, file, sub) in children {
        let child = match (file, sub) {
            (Some(index), _) => {
                let c = InodeNo(nodes.len() as u64 + 1);
                nodes.push(Node {
                    ino: c,
                    parent: ino,
                    name: child_name,
                    kind: NodeKind::File(index),
                });
                c
            }
            (None, Some(d)) => layout(d, ino, child_name, nodes),
            (None, None) => unreachable!("every child is a file or a directory"),
        };
        child_inos.push(child);
    }
    let index = (ino.0 - 1) as usize;
    nodes[index].kind = NodeKind::Dir(child_inos);
    ino
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> Result<VolumeSpec, SpecError> {
        let entries = args
            .iter()
            .map(|a| parse_secret_arg(a))
            .collect::<Result<Vec<_>, _>>()?;
        VolumeSpec::new(entries)
    }

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
    fn bad_names_are_refused_naming_the_entry() {
        let cases = [
            (vec!["../x=secret/a"], "../x", "\"..\" segment"),
            (vec!["/etc/x=secret/a"], "/etc/x", "absolute"),
            (vec!["a//b=secret/a"], "a//b", "empty segment"),
            (vec!["a=secret/a", "a=secret/b"], "a", "duplicate"),
            (
                vec!["a=secret/a", "a/b=secret/b"],
                "a/b",
                "declared as a file",
            ),
            (
                vec!["a/b=secret/a", "a=secret/b"],
                "a",
                "also used as a directory",
            ),
        ];
        for (args, name, why) in cases {
            let err = spec(&args).unwrap_err().to_string();
            assert!(err.contains(&format!("{name:?}")), "{args:?}: {err}");
            assert!(err.contains(why), "{args:?}: {err}");
        }
        assert_eq!(VolumeSpec::new(vec![]).unwrap_err(), SpecError::Empty);
        let deep = format!("{}f=secret/a", "d/".repeat(40));
        let err = spec(&[deep.as_str()]).unwrap_err().to_string();
        assert!(err.contains("nested deeper than 32"), "{err}");
        let deep = format!("{}f=secret/a", "d/".repeat(10_000));
        assert!(spec(&[deep.as_str()]).is_err());
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

    fn path_error(path: &str) -> String {
        SecretPath::parse(path).expect_err(path)
    }

    #[test]
    fn vault_paths_as_written_for_vault_read_pass_unchanged() {
        for p in [
            "secret/app/db",
            "database/creds/read-only",
            "kv/team_a/user@example.com",
            "pki/issue/web.example.com",
            "kv/a+b/k=v/x:y,z/...",
        ] {
            assert_eq!(SecretPath::parse(p).unwrap().as_str(), p);
        }
        assert_eq!(
            SecretPath::parse("/secret/app/db/").unwrap().as_str(),
            "secret/app/db"
        );
    }

    #[test]
    fn vault_paths_with_url_changing_characters_are_refused_naming_the_character() {
        let cases = [
            ("secret/%2e%2e/sys", "'%'", 8, 2),
            ("secret/a%2fb", "'%'", 9, 2),
            ("secret\\..\\sys", "'\\\\'", 7, 1),
            ("secret/app?list=true", "'?'", 11, 2),
            ("secret/app#frag", "'#'", 11, 2),
            ("secret/my app", "a space", 10, 2),
            ("secret/a\tb", "U+0009", 9, 2),
            ("secret/a\nb", "U+000A", 9, 2),
            ("secret/a\0b", "U+0000", 9, 2),
            ("secret/\u{202e}bd/x", "U+202E", 8, 2),
            ("secret/a\u{200b}/x", "U+200B", 9, 2),
            ("secret/caf\u{e9}", "non-ASCII character U+00E9", 11, 2),
            ("secret/\u{430}pp", "non-ASCII character U+0430", 8, 2),
        ];
        for (path, what, position, segment) in cases {
            let err = path_error(path);
            assert!(err.contains(what), "{path:?}: {err}");
            assert!(
                err.contains(&format!("at character {position} (segment {segment}")),
                "{path:?}: {err}"
            );
            assert!(err.contains(PATH_CHARS_ALLOWED), "{path:?}: {err}");
            assert!(err.is_ascii(), "the message escapes what it echoes: {err}");
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }

    #[test]
    fn relative_and_empty_vault_path_segments_are_refused() {
        let err = path_error("secret/../sys/seal");
        assert!(err.contains("\"..\" segment (segment 2)"), "{err}");
        let err = path_error("secret/./app");
        assert!(err.contains("\".\" segment (segment 2)"), "{err}");
        let err = path_error("./secret");
        assert!(err.contains("\".\" segment (segment 1)"), "{err}");
        let err = path_error("secret//app");
        assert!(err.contains("empty segment (segment 2"), "{err}");
        assert!(path_error("//").contains("path is empty"));
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
    fn keys_must_be_short_visible_text() {
        assert_eq!(
            parse_secret_arg("a=secret/a#user name")
                .unwrap()
                .secret()
                .unwrap()
                .1,
            Some("user name")
        );
        let long = format!("a=secret/a#{}", "k".repeat(MAX_KEY_BYTES));
        assert!(parse_secret_arg(&long).is_ok());
        let too_long = format!("a=secret/a#{}", "k".repeat(MAX_KEY_BYTES + 1));
        let err = parse_secret_arg(&too_long).unwrap_err().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("over the limit of 256 bytes"),
            "{err}"
        );
        for (key, what) in [
            ("pass\u{202e}word", "U+202E"),
            ("pass\u{200b}", "U+200B"),
            ("pass\nword", "U+000A"),
            ("pass\0", "U+0000"),
        ] {
            let err = parse_secret_arg(&format!("a=secret/a#{key}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("\"a\"") && err.contains(what),
                "{key:?}: {err}"
            );
            assert!(err.is_ascii(), "{err}");
        }
        let err = parse_spec_document("- name: a\n  path: secret/a\n  key: \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"a\"") && err.contains("key") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn file_names_with_bidi_or_invisible_characters_are_refused() {
        let err = spec(&["gpj.\u{202e}exe=secret/a"]).unwrap_err().to_string();
        assert!(
            err.contains("U+202E") && err.contains("visible text"),
            "{err}"
        );
        let err = spec(&["a\u{200b}=secret/a"]).unwrap_err().to_string();
        assert!(err.contains("U+200B"), "{err}");
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
    fn layout_is_a_pure_function_of_the_spec() {
        let a = spec(&["z=secret/z", "db/user=secret/db#u", "db/pass=secret/db#p"]).unwrap();
        let b = spec(&["db/pass=secret/db#p", "z=secret/z", "db/user=secret/db#u"]).unwrap();
        let names = |s: &VolumeSpec| {
            s.nodes()
                .iter()
                .map(|n| (n.ino, n.parent, n.name.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&a), names(&b));
        let db = a.child(InodeNo::ROOT, "db").unwrap();
        assert!(matches!(db.kind, NodeKind::Dir(ref c) if c.len() == 2));
        let pass = a.child(db.ino, "pass").unwrap();
        assert_eq!(pass.parent, db.ino);
        assert_eq!(a.node(pass.ino).unwrap().name, "pass");
        assert!(a.node(InodeNo(0)).is_none());
        assert!(a.node(InodeNo(99)).is_none());
        let db_path = SecretPath::parse("secret/db").unwrap();
        assert_eq!(a.files_of(&db_path).count(), 2);
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
