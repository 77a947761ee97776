//! The volume spec: which files a mount shows and which Vault secret each holds. Parsing
//! (`--secret NAME=PATH[#KEY]`, YAML/JSON spec documents), validation, and the directory layout
//! with inode numbers that are a pure function of the spec. No I/O, no Vault, no FUSE.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use thiserror::Error;

/// Inode number of a node in a volume's layout. The root is always 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeNo(pub u64);

impl InodeNo {
    pub const ROOT: InodeNo = InodeNo(1);
}

/// A Vault path as users write it for `vault kv get` / `vault read` (no `/data/`), without
/// leading or trailing slashes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretPath(String);

impl SecretPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let p = text.trim().trim_matches('/');
        if p.is_empty() {
            return Err("the Vault path is empty".into());
        }
        if p.chars().any(|c| c.is_control()) {
            return Err("the Vault path contains a control character".into());
        }
        if p.split('/').any(|s| s.is_empty() || s == "..") {
            return Err(format!(
                "the Vault path {p:?} has an empty or '..' segment; write it as for `vault read`, e.g. secret/app/db"
            ));
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

/// One file of a volume: `name` inside the mount, the Vault `path`, and optionally the `key`
/// (field) the file holds. Without a key the file holds the whole secret as a JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEntry {
    pub name: String,
    pub path: SecretPath,
    pub key: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid --secret {arg:?}: {reason}; expected NAME=PATH[#KEY], e.g. db/password=secret/app/db#password")]
    Argument { arg: String, reason: String },
    #[error("secret entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("invalid secrets spec: {0}; expected `secrets: [{{name, path, key?}}, ...]`")]
    Document(String),
    #[error("no secrets declared: give at least one --secret NAME=PATH[#KEY] or --spec FILE")]
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
    path: String,
    #[serde(default)]
    key: Option<String>,
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

/// Parses a spec document (YAML, or JSON, which is YAML too): `secrets: [{name, path, key?}]`.
/// A bare list of entries is accepted as well.
pub fn parse_spec_document(text: &str) -> Result<Vec<SecretEntry>, SpecError> {
    let bare_list = matches!(
        serde_yaml::from_str::<serde_yaml::Value>(text),
        Ok(serde_yaml::Value::Sequence(_))
    );
    let docs = if bare_list {
        serde_yaml::from_str::<Vec<EntryDocument>>(text)
    } else {
        serde_yaml::from_str::<SpecDocument>(text).map(|d| d.secrets)
    }
    .map_err(|e| SpecError::Document(e.to_string()))?;
    docs.into_iter()
        .map(|d| entry(&d.name, &d.path, d.key))
        .collect()
}

fn entry(name: &str, path: &str, key: Option<String>) -> Result<SecretEntry, SpecError> {
    let bad = |reason: String| SpecError::Entry {
        name: name.to_string(),
        reason,
    };
    let path = SecretPath::parse(path).map_err(bad)?;
    if key.as_deref() == Some("") {
        return Err(bad("the key after '#' is empty".into()));
    }
    Ok(SecretEntry {
        name: name.to_string(),
        path,
        key,
    })
}

/// Limits that keep a hostile spec from costing the daemon more than a sane one would.
const MAX_NAME_BYTES: usize = 4096;
const MAX_DEPTH: usize = 32;
const MAX_ENTRIES: usize = 10_000;

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
    if name.chars().any(|c| c.is_control()) {
        return Err("the file name contains a control character".into());
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

    /// The file inodes that show a given Vault path.
    pub fn files_of<'a>(&'a self, path: &'a SecretPath) -> impl Iterator<Item = InodeNo> + 'a {
        self.nodes.iter().filter_map(move |n| match n.kind {
            NodeKind::File(i) if &self.entries[i].path == path => Some(n.ino),
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
        assert_eq!(e.path.as_str(), "secret/app/db");
        assert_eq!(e.key.as_deref(), Some("password"));
        let e = parse_secret_arg("all=/secret/app/db/").unwrap();
        assert_eq!(e.path.as_str(), "secret/app/db");
        assert_eq!(e.key, None);
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
        assert_eq!(entries[0].key.as_deref(), Some("password"));
        let json = parse_spec_document(r#"[{"name":"a","path":"secret/a"}]"#).unwrap();
        assert_eq!(json[0].name, "a");
        let err = parse_spec_document("secrets:\n  - name: a\n    path: secret/a\n    nme: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `nme`"), "{err}");
        assert!(parse_spec_document("secrets: [unclosed").is_err());
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
}
