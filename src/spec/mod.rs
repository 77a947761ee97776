//! The volume spec: which files a mount shows and which Vault secret (or template over secrets)
//! each holds, and its error. Parsing lives in `document`, the checks of paths, keys and names
//! in `checks`, the directory layout with inode numbers that are a pure function of the spec
//! in `layout`. No I/O, no Vault, no FUSE.

mod certificate;
mod checks;
mod document;
mod layout;

use std::sync::Arc;

use thiserror::Error;

use crate::template::Template;

pub use certificate::{CertPart, CertificateRequest, PodNames};
pub use checks::{SecretPath, MAX_KEY_BYTES, PATH_CHARS_ALLOWED, PATH_PUNCTUATION_ALLOWED};
pub use document::{
    parse_secret_arg, parse_spec_document, parse_spec_document_for, template_entry, MAX_SPEC_BYTES,
};
pub use layout::{Node, NodeKind, VolumeSpec};

/// Inode number of a node in a volume's layout. The root is always 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeNo(pub u64);

impl InodeNo {
    pub const ROOT: InodeNo = InodeNo(1);
}

/// One file of a volume: `name` inside the mount and what it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEntry {
    pub name: String,
    pub shows: Shows,
    /// With `vaultfs csi --share-identities`: a leased value (a dynamic secret) of this entry
    /// is shared with the other volumes of the pod's identity instead of being the volume's
    /// own (`share: true`; path entries only).
    pub share: bool,
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
    /// One file of a certificate issued by Vault's PKI engine: `path` carries the request
    /// (`SecretPath::certificate`), the four files of an entry share it.
    Certificate { path: SecretPath, part: CertPart },
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
            (
                Shows::Certificate { path, part },
                Shows::Certificate {
                    path: other_path,
                    part: other_part,
                },
            ) => path == other_path && part == other_part,
            _ => false,
        }
    }
}

impl Eq for Shows {}

impl SecretEntry {
    /// The Vault path and key of a plain entry (`None` for a template).
    /// A certificate's file is its issue's field named like the file (`tls.key`...).
    pub fn secret(&self) -> Option<(&SecretPath, Option<&str>)> {
        match &self.shows {
            Shows::Secret { path, key } => Some((path, key.as_deref())),
            Shows::Certificate { path, part } => Some((path, Some(part.file_name()))),
            Shows::Template(_) => None,
        }
    }

    /// Whether the file shows (or, for a template, last read) the secret at `path`.
    pub fn reads(&self, path: &SecretPath) -> bool {
        match &self.shows {
            Shows::Secret { path: p, .. } | Shows::Certificate { path: p, .. } => p == path,
            Shows::Template(t) => t.reads(path),
        }
    }
}

/// A name every daemon computes alike for `parts` (not the process's random hasher): hex of
/// 128 bits of a SHA-256 over the parts, each length-prefixed, so that no two lists of parts
/// share one by moving bytes from one part to the next.
pub fn stable_digest(parts: &[&str]) -> String {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        hash.update(&(part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid --secret {arg:?}: {reason}; expected NAME=PATH[#KEY], e.g. db/password=secret/app/db#password")]
    Argument { arg: String, reason: String },
    #[error("secret entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("invalid secrets spec: {0}; expected `secrets: [{{name, path, key?, share?}} or {{name, template}}, ...]`")]
    Document(String),
    #[error("no secrets declared: give at least one --secret NAME=PATH[#KEY], --template NAME=FILE or --spec FILE")]
    Empty,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec(args: &[&str]) -> Result<VolumeSpec, SpecError> {
        let entries = args
            .iter()
            .map(|a| parse_secret_arg(a))
            .collect::<Result<Vec<_>, _>>()?;
        VolumeSpec::new(entries)
    }
}
