//! This process's own settings: hardening (no core dumps, no capabilities, locked memory), its
//! allocator, its limit on open descriptors, its effective uid and the monotonic clock it reads.

use std::io;

use super::check;

/// `CLOCK_MONOTONIC` now: the clock `Instant` reads, shared by every process on the machine.
pub fn monotonic_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Disables core dumps (and ptrace by non-root) so secret bytes in memory never reach disk
/// through a crash dump.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct that lives for the call.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) })?;
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
}

/// Gives up every capability (effective, permitted, inheritable) of this process: root
/// without capabilities can no longer mount, ptrace, or pass permission checks.
pub fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two `Data` (capabilities 0-31 and 32-63).
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let none = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a valid header and two data structs that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) };
    check(rc as libc::c_int)
}

/// Keeps large allocations out of the malloc heaps. Every FUSE session allocates a 16 MiB
/// request buffer of which it touches a few pages; served by `mmap` it costs only those pages,
/// but glibc's adaptive threshold would soon move such blocks into heaps, where `calloc` zeroes
/// (and so makes resident) all 16 MiB. A fixed threshold also turns off the adaptation; fewer
/// arenas keep per-thread heaps from multiplying with the number of volumes.
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Locks all current and future memory so secret bytes are never swapped out. Pages are
/// locked as they are touched (`MCL_ONFAULT`), so address space reserved but never used (each
/// FUSE session's 16 MiB request buffer, thread stacks) does not become resident.
///
/// Without `CAP_IPC_LOCK`, the kernel counts all locked address space (reserved or not) against
/// `RLIMIT_MEMLOCK` (8 MiB by default since Linux 5.16): `mlockall` fails if the process already
/// maps more, and once locked every mapping past the limit fails, so a later allocation would
/// abort the process. Without the capability, only an unlimited limit is therefore accepted;
/// anything else is refused, naming the limit.
pub fn lock_memory() -> io::Result<()> {
    let capable = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| super::pidfd::has_effective_capability(&s, super::pidfd::CAP_IPC_LOCK))
        .unwrap_or(false);
    if !capable {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes a valid rlimit struct that lives for the call.
        check(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) })?;
        if limit.rlim_cur != libc::RLIM_INFINITY {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "without CAP_IPC_LOCK, all locked address space counts against RLIMIT_MEMLOCK ({} KiB here): locking fails once the process maps more, and an allocation past it would abort the process; grant CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add: [IPC_LOCK]) or set the limit to unlimited",
                    limit.rlim_cur / 1024
                ),
            ));
        }
    }
    // SAFETY: mlockall takes only flags.
    check(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) })
}

/// The limits on open descriptors (`RLIMIT_NOFILE`): the soft one in force and the hard one
/// it may be raised to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current `RLIMIT_NOFILE`.
pub fn open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct that lives for the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(OpenFilesLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit on open descriptors to the hard one (which only privileged
/// processes could raise further); returns the limits before the change.
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    let before = open_files_limit()?;
    if before.soft < before.hard {
        let raised = libc::rlimit {
            rlim_cur: before.hard,
            rlim_max: before.hard,
        };
        // SAFETY: setrlimit reads a valid rlimit struct that lives for the call.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) })?;
    }
    Ok(before)
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        let before = raise_open_files_limit().expect("raise RLIMIT_NOFILE");
        let now = open_files_limit().expect("read RLIMIT_NOFILE");
        assert!(before.soft <= before.hard, "{before:?}");
        assert_eq!(now.soft, now.hard, "{now:?}");
        assert_eq!(now.hard, before.hard, "the hard limit stays: {now:?}");
    }
}
