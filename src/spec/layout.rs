//! A validated volume's directory layout: the tree its file names make, with inode numbers
//! assigned depth-first in name order, so the same spec always yields the same numbers.

use std::collections::BTreeMap;

use super::checks::check_name;
use super::{InodeNo, SecretEntry, SecretPath, SpecError};

/// Most entries one spec may declare.
const MAX_ENTRIES: usize = 10_000;

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

    /// The Vault paths whose leased values the volume shares with the other volumes of its
    /// identity (`share: true`).
    pub fn shared_paths(&self) -> std::collections::HashSet<SecretPath> {
        self.entries
            .iter()
            .filter(|e| e.share)
            .filter_map(|e| e.secret().map(|(path, _)| path.clone()))
            .collect()
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
    use super::super::tests::spec;
    use super::*;

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
