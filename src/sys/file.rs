//! Files and paths: a private state file written whole, and a path resolved even where a dead
//! mount makes it unreadable.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `<path>.tmp` (mode 0600) and a rename: readers see the
/// old content or the new, never part of it.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// `path` resolved (symlinks, `.`, `..`, trailing `/`), so that one mount point written two
/// ways is one path. Where the path itself cannot be resolved (a dead FUSE mount there cannot be
/// stat'ed, or it does not exist yet), its directory is resolved and the last component kept.
pub fn canonical_target(path: &Path) -> io::Result<PathBuf> {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return Ok(resolved);
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            Ok(std::fs::canonicalize(dir)?.join(name))
        }
        _ => std::fs::canonicalize(path),
    }
}
