//! The Linux calls vaultfs makes itself, behind safe functions: the one home of `unsafe` for
//! system calls, split by topic. No vaultfs types: callers pass and get back std types, and
//! each module names what it is about, so a reader looking for "how does vaultfs mount",
//! "how does it pass a descriptor" or "how does it harden itself" finds one file.
//!
//! One module rather than wrappers beside each caller: the same few patterns (a
//! `sockaddr_un`, an `SCM_RIGHTS` control buffer, `OwnedFd::from_raw_fd` on a new
//! descriptor) need one careful writing and one review each, and the modules that use them
//! (the keeper, the mounter, the wiring) stay plain safe Rust.
//!
//! - [`process`]: this process's hardening, allocator, resource limits, ids, clock; the limits
//!   a child runs under
//! - [`file`]: private state files, paths resolved past a dead mount, a descriptor made to
//!   designate another's file (`dup3`), files mapped shared as atomics, `flock`
//! - [`fuse`]: one message read from or written to the FUSE device (`/dev/fuse`)
//! - [`mount`]: making and removing mounts (mount(2), `fusermount3`, bind mounts, unmounts)
//! - [`mountinfo`]: what is mounted where (`statfs`, `statx`, `/proc/self/mountinfo`)
//! - [`socket`]: `SOCK_SEQPACKET` unix sockets carrying descriptors (`SCM_RIGHTS`), `poll`
//! - [`signal`]: stop signals read from a signalfd
//! - [`pidfd`]: processes held by a pidfd, a socket peer's credentials
//!
//! Uses only `libc`, std and, in vaultfs, nothing. The items most callers use are re-exported
//! here (`sys::fuse_mount`, `sys::mount_id`, ...).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub mod file;
pub mod fuse;
pub mod mount;
pub mod mountinfo;
pub mod pidfd;
pub mod process;
pub mod signal;
pub mod socket;

pub use file::{canonical_target, write_private};
pub use mount::{
    abort_fuse_connection, bind_mount, can_mount, detach_all, detach_all_of_type, detach_unmount,
    fuse_mount, fuser_unmount, fusermount, FSTYPE, FUSERMOUNT,
};
pub use mountinfo::{
    is_disconnected, is_mount_point, is_tmpfs, mount_id, mount_stack, mount_table, statfs_fuse,
};
pub use process::{
    disable_core_dumps, drop_capabilities, effective_uid, lock_memory, monotonic_now,
    open_files_limit, raise_open_files_limit, tune_allocator, ResourceLimit,
};

/// `path` as a C string, refused if it holds a NUL byte.
fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A call returning 0 on success and -1 with `errno` on failure.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
