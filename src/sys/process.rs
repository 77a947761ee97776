//! This process's own settings: hardening (no core dumps, no capabilities, locked memory), its
//! allocator, its resource limits (open descriptors, address space), its effective ids, the
//! monotonic clock it reads, and the limits a child it spawns runs under.

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
        let limit = resource_limit(libc::RLIMIT_MEMLOCK)?;
        if limit.soft != libc::RLIM_INFINITY {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "without CAP_IPC_LOCK, all locked address space counts against RLIMIT_MEMLOCK ({} KiB here): locking fails once the process maps more, and an allocation past it would abort the process; grant CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add: [IPC_LOCK]) or set the limit to unlimited",
                    limit.soft / 1024
                ),
            ));
        }
    }
    // SAFETY: mlockall takes only flags.
    check(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) })
}

/// A resource limit (`getrlimit`): the soft one in force and the hard one it may be raised to
/// (`u64::MAX`: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimit {
    pub soft: u64,
    pub hard: u64,
}

fn resource_limit(resource: libc::__rlimit_resource_t) -> io::Result<ResourceLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct that lives for the call.
    check(unsafe { libc::getrlimit(resource, &mut limit) })?;
    Ok(ResourceLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// The current limits on open descriptors (`RLIMIT_NOFILE`).
pub fn open_files_limit() -> io::Result<ResourceLimit> {
    resource_limit(libc::RLIMIT_NOFILE)
}

/// The current limits on this process's address space (`RLIMIT_AS`), in bytes.
pub fn address_space_limit() -> io::Result<ResourceLimit> {
    resource_limit(libc::RLIMIT_AS)
}

/// Raises the soft limit on open descriptors to the hard one (which only privileged
/// processes could raise further); returns the limits before the change.
pub fn raise_open_files_limit() -> io::Result<ResourceLimit> {
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

/// This process's effective gid.
pub fn effective_gid() -> u32 {
    // SAFETY: getegid takes no arguments and cannot fail.
    unsafe { libc::getegid() }
}

/// Makes `command`'s child, between fork and exec, a confined one: its address space limited
/// to `address_space` bytes (`RLIMIT_AS`, soft and hard: it cannot raise it again), no core
/// dumps, killed (`SIGKILL`) when the thread that spawned it exits (`PR_SET_PDEATHSIG`: a
/// thread, not the process), and no privileges gained through exec (`PR_SET_NO_NEW_PRIVS`:
/// set-uid bits and file capabilities are ignored). If any of these fails the spawn fails.
pub fn limit_child(command: &mut std::process::Command, address_space: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure makes only async-signal-safe calls (setrlimit, prctl) on values it
    // owns, and allocates nothing before failing.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: address_space,
                rlim_max: address_space,
            };
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0
                || libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

    /// The effective field (second of four) of `/proc/self/status`'s `Uid:`/`Gid:` line.
    fn effective_from_status(field: &str) -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn effective_ids_are_the_ones_proc_shows() {
        assert_eq!(effective_uid(), effective_from_status("Uid:"));
        assert_eq!(effective_gid(), effective_from_status("Gid:"));
    }

    #[test]
    fn the_address_space_limit_is_read() {
        let limit = address_space_limit().unwrap();
        assert!(limit.soft <= limit.hard, "{limit:?}");
        let status = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .unwrap();
        let shown = |v: u64| {
            if v == u64::MAX {
                "unlimited".to_string()
            } else {
                v.to_string()
            }
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[3], shown(limit.soft), "{line}");
        assert_eq!(fields[4], shown(limit.hard), "{line}");
    }

    #[test]
    fn a_limited_child_has_its_limits_no_core_and_no_new_privileges() {
        let mut command = std::process::Command::new("sh");
        command.args([
            "-c",
            "ulimit -H -v; ulimit -c; grep NoNewPrivs: /proc/self/status",
        ]);
        limit_child(&mut command, 512 << 20);
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let said = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<&str> = said.lines().collect();
        // ulimit -v counts KiB.
        assert_eq!(lines[0], (512 << 10).to_string(), "{said}");
        assert_eq!(lines[1], "0", "{said}");
        assert_eq!(lines[2].split_whitespace().nth(1), Some("1"), "{said}");
    }

    #[test]
    fn a_limited_child_is_killed_when_the_thread_that_spawned_it_ends() {
        let child = std::thread::spawn(|| {
            let mut command = std::process::Command::new("sleep");
            command.arg("30");
            limit_child(&mut command, u64::MAX);
            // spawn returns once the child has exec'ed: the death signal is already set.
            command.spawn().unwrap()
        })
        .join()
        .unwrap();
        let mut child = child;
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}
