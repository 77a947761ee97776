//! Filesystem calls through a mount, each bounded by [`FS_OP_TIMEOUT`] (see
//! [`super::poll::within`]): reads, stats, listings, waits for a value or an errno.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::poll::{poll, within, POLL_INTERVAL};

/// Default limit for one filesystem operation through the mount (see [`within`]).
pub const FS_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// `fs::read` through the mount, bounded by [`FS_OP_TIMEOUT`].
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = path.as_ref().to_path_buf();
    within(
        &format!("read {}", path.display()),
        FS_OP_TIMEOUT,
        move || fs::read(path),
    )
}

/// Reads a file through the mount as UTF-8 text, panicking on any error.
pub fn read_string(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    let bytes = read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    String::from_utf8(bytes).unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
}

/// `fs::metadata` through the mount, bounded by [`FS_OP_TIMEOUT`].
pub fn metadata(path: impl AsRef<Path>) -> io::Result<fs::Metadata> {
    let path = path.as_ref().to_path_buf();
    within(
        &format!("stat {}", path.display()),
        FS_OP_TIMEOUT,
        move || fs::metadata(path),
    )
}

/// Sorted entry names of a directory in the mount (only `read_dir`, no `stat` of entries).
pub fn list_dir(path: impl AsRef<Path>) -> Vec<String> {
    let shown = path.as_ref().display().to_string();
    let path = path.as_ref().to_path_buf();
    within(
        &format!("readdir {shown}"),
        FS_OP_TIMEOUT,
        move || -> io::Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in fs::read_dir(&path)? {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(names)
        },
    )
    .unwrap_or_else(|e| panic!("read_dir {shown}: {e}"))
}

/// Reads `path` until a read fails with `errno`, for at most `limit`; returns how long that
/// took. A `cached` volume keeps serving its kernel-cached pages after its connection is lost,
/// until the attribute timeout (the cache TTL) sends the kernel back to the dead daemon.
pub fn wait_for_errno(path: &Path, errno: i32, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    poll(limit, POLL_INTERVAL, || match read(path) {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(started.elapsed()),
        Err(e) => Err(format!("the last read failed with {e}")),
        Ok(bytes) => Err(format!("the last read returned {} bytes", bytes.len())),
    })
    .map_err(|last| {
        format!(
            "no {} within {limit:?}: {last}",
            io::Error::from_raw_os_error(errno)
        )
    })
}

/// Reads `path` until it holds `expected`, for at most `limit`; returns how long that took, or
/// what the last read gave.
pub fn wait_for_content(path: &Path, expected: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    poll(limit, Duration::from_millis(20), || match read(path) {
        Ok(bytes) if bytes == expected.as_bytes() => Ok(started.elapsed()),
        Ok(bytes) => Err(format!("{} bytes of another value", bytes.len())),
        Err(e) => Err(e.to_string()),
    })
}

/// The errno of an `io::Error`, with its name in the panic message when it is missing.
pub fn errno_of(err: &io::Error) -> i32 {
    err.raw_os_error()
        .unwrap_or_else(|| panic!("expected an OS error, got {err:?}"))
}

/// `pread` of up to 64 KiB at offset 0 through an open descriptor, bounded by
/// [`FS_OP_TIMEOUT`]: what an app that opened the file earlier reads now.
pub fn pread_start(file: &Arc<File>) -> io::Result<Vec<u8>> {
    let file = file.clone();
    within("pread at offset 0", FS_OP_TIMEOUT, move || {
        let mut buf = vec![0u8; 64 << 10];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    })
}
