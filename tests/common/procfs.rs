//! What `/proc` tells about a process: memory, CPU time, `/dev/fuse` descriptors, and the
//! process tree (to find the OpenBao server behind its launcher).

use std::fs;
use std::path::Path;
use std::time::Duration;

/// Resident memory (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // utime and stime are fields 14 and 15 of stat(5); `fields[0]` is field 3.
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Descriptors process `pid` holds open on `/dev/fuse` (0 once it is gone).
pub fn fuse_descriptors(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
                .count()
        })
        .unwrap_or(0)
}

fn proc_pgid_and_ppid(pid: i32) -> Option<(i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; everything after the last ')' is fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest: state ppid pgrp ...
    Some((f.get(2)?.parse().ok()?, f.get(1)?.parse().ok()?))
}

fn proc_cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid of the actual OpenBao server started as `root_pid`. `bao` may be a pyenv shim that
/// execs a Python wrapper that execs (or, on some platforms, forks) the bundled server binary,
/// so this looks at `root_pid` and all its descendants for a process whose command line runs
/// `server` and whose executable is not an interpreter or shell, preferring the deepest one.
pub(super) fn find_server_pid(root_pid: i32) -> Option<i32> {
    // Collect descendants (including the root itself) through the ppid links.
    let mut parent_of = Vec::new();
    for pid in all_pids() {
        if let Some((_, ppid)) = proc_pgid_and_ppid(pid) {
            parent_of.push((pid, ppid));
        }
    }
    let mut family = vec![(root_pid, 0usize)];
    let mut i = 0;
    while i < family.len() {
        let (p, depth) = family[i];
        for &(child, ppid) in &parent_of {
            if ppid == p {
                family.push((child, depth + 1));
            }
        }
        i += 1;
    }
    family
        .into_iter()
        .filter(|&(pid, _)| {
            let args = proc_cmdline(pid);
            if !args.iter().any(|a| a == "server") {
                return false;
            }
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !(name.starts_with("python") || name == "bash" || name == "sh" || name == "dash")
        })
        .max_by_key(|&(_, depth)| depth)
        .map(|(pid, _)| pid)
}
