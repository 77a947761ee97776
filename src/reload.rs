//! Reload signals (opt-in per volume): once a changed secret is served, tell the processes
//! that use it by sending them a signal, at most once per change and per TTL. Owns signal
//! names, the pod uid in `/proc/PID/cgroup` paths, finding a pod's processes by name and the
//! debounce. Knows nothing of FUSE, Vault or gRPC; uses only `metrics` and `pidfd` (a process
//! is held by a pidfd before it is checked and signalled, so a pid reused since the scan is never
//! signalled).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::pidfd::Pidfd;

/// Changes that arrive this soon after the first are one signal (several files of a volume
/// changed together are found one after the other).
pub const SETTLE: Duration = Duration::from_millis(100);

/// The kernel keeps at most this many bytes of a process name (`TASK_COMM_LEN` - 1).
const COMM_MAX: usize = 15;

/// Signals a volume may ask for, by name without `SIG`.
const SIGNALS: [(&str, libc::c_int); 9] = [
    ("HUP", libc::SIGHUP),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("WINCH", libc::SIGWINCH),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("TERM", libc::SIGTERM),
    ("ALRM", libc::SIGALRM),
    ("CONT", libc::SIGCONT),
];

/// A signal to send, by name: `SIGHUP` or `HUP`, any case. Numbers are refused (they differ
/// between architectures and say nothing in a manifest); so are `SIGKILL` and `SIGSTOP`,
/// which no process can handle as a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    number: libc::c_int,
    name: &'static str,
}

impl Signal {
    pub fn number(self) -> libc::c_int {
        self.number
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name)
    }
}

impl FromStr for Signal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        SIGNALS
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|&(name, number)| Signal { number, name })
            .ok_or_else(|| {
                let known: Vec<String> = SIGNALS.iter().map(|(n, _)| format!("SIG{n}")).collect();
                format!(
                    "unknown signal {s:?}: expected a signal name such as SIGHUP, SIGUSR1 or HUP (one of {}; numbers are not accepted)",
                    known.join(", ")
                )
            })
    }
}

/// A process name as the kernel keeps it in `/proc/PID/comm` (the executable's file name, cut
/// to 15 bytes): a longer name could never match, so it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessName(String);

impl ProcessName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ProcessName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is empty: expected a process name as in /proc/PID/comm".into());
        }
        if s.len() > COMM_MAX {
            return Err(format!(
                "{s:?} is {} bytes; the kernel keeps at most {COMM_MAX} of a process name (/proc/PID/comm), so write its first {COMM_MAX}",
                s.len()
            ));
        }
        if s.chars().any(|c| c == '/' || c.is_control()) {
            return Err(format!(
                "{s:?} is not a process name: no '/' or control characters (write the name as in /proc/PID/comm, not a path)"
            ));
        }
        Ok(Self(s.to_string()))
    }
}

/// A pod's uid, always written with `-` (kubelet's systemd cgroup driver writes it with `_`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodUid(String);

impl PodUid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PodUid {
    type Err = String;

    /// A uid `8-4-4-4-12` hex digits, separated by `-` or (all) `_`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = s.as_bytes();
        let sep = bytes.get(8).copied().filter(|b| *b == b'-' || *b == b'_');
        let shaped = bytes.len() == 36
            && sep.is_some()
            && bytes.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => Some(*b) == sep,
                _ => b.is_ascii_hexdigit(),
            });
        if !shaped {
            return Err(format!(
                "{s:?} is not a pod uid (8-4-4-4-12 hexadecimal digits)"
            ));
        }
        Ok(Self(s.replace('_', "-").to_ascii_lowercase()))
    }
}

/// The pod uid in one line of `/proc/PID/cgroup` (`ID:controllers:path`, cgroup v1 or v2), as
/// kubelet names pod cgroups: `.../kubepods-besteffort-pod<uid with _>.slice/...` (systemd
/// driver) or `.../kubepods/besteffort/pod<uid>/...` (cgroupfs driver). `None` for a process
/// outside any pod.
pub fn pod_uid_in_cgroup_line(line: &str) -> Option<PodUid> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let cut = segment.len().checked_sub(36)?;
        let (head, uid) = (segment.get(..cut)?, segment.get(cut..)?);
        let named = head == "pod" || head.ends_with("-pod");
        named.then(|| uid.parse().ok()).flatten()
    })
}

/// Processes under `proc_root` (`/proc`) named exactly `name` whose cgroups name pod `uid`.
/// Never pid 1 or this process; pids that vanish while being looked at are skipped.
pub fn pod_processes(proc_root: &Path, uid: &PodUid, name: &ProcessName) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let own = std::process::id() as i32;
    let mut found: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid > 1 && *pid != own)
        .filter(|pid| is_pod_process(proc_root, *pid, uid, name))
        .collect();
    found.sort_unstable();
    found
}

/// Whether `proc_root/<pid>` is a process named `name` in pod `uid`'s cgroup.
fn is_pod_process(proc_root: &Path, pid: i32, uid: &PodUid, name: &ProcessName) -> bool {
    let dir = proc_root.join(pid.to_string());
    let named = std::fs::read_to_string(dir.join("comm"))
        .is_ok_and(|comm| comm.strip_suffix('\n').unwrap_or(&comm) == name.as_str());
    named
        && std::fs::read_to_string(dir.join("cgroup")).is_ok_and(|cgroups| {
            cgroups
                .lines()
                .any(|l| pod_uid_in_cgroup_line(l).as_ref() == Some(uid))
        })
}

/// The processes at `pids` (found by [`pod_processes`]) held by a pidfd and then found, again,
/// named `name` in pod `uid`'s cgroup. A process that exited since the scan is not held; nor is
/// one that now has another name (it ran another program) or another cgroup (its pid went to a
/// process elsewhere). A pidfd signals only its own process, so a signal sent through one held
/// here reaches a process that was the pod's when it was looked at after being held, or none.
pub fn hold_pod_processes(
    proc_root: &Path,
    pids: &[i32],
    uid: &PodUid,
    name: &ProcessName,
) -> Vec<Pidfd> {
    pids.iter()
        .filter_map(|&pid| {
            let held = Pidfd::open(pid).ok()?;
            is_pod_process(proc_root, pid, uid, name).then_some(held)
        })
        .collect()
}

/// Whom a volume's reload signal goes to.
#[derive(Clone, Debug)]
pub enum Target {
    /// Every process of the pod (found by its uid in their cgroups) with this name (CSI).
    Pod { uid: PodUid, process: ProcessName },
    /// The pid written in this file, read at signal time (`vaultfs mount --reload-pid-file`).
    PidFile(PathBuf),
}

/// A volume's reload signal.
#[derive(Clone, Debug)]
pub struct ReloadConfig {
    pub signal: Signal,
    pub target: Target,
    /// At most one signal per this long (the volume's cache TTL).
    pub min_interval: Duration,
}

/// Sends one volume's reload signal after its secrets change: `changed` (from the cache's swap
/// hook, after the kernel's invalidation is queued) marks a change; `run` sends the signal
/// `SETTLE` later, but never sooner than `min_interval` after the previous one, so a burst of
/// changes is one signal and no change is left without one.
pub struct Reloader {
    config: ReloadConfig,
    volume: String,
    metrics: Arc<Metrics>,
    pending: AtomicBool,
    wake: Notify,
}

impl Reloader {
    pub fn new(config: ReloadConfig, volume: String, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            volume,
            metrics,
            pending: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// A file of the volume changed (or vanished) and its new state is being served.
    pub fn changed(&self) {
        self.pending.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a change waits for its signal.
    #[cfg(test)]
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Sends the signal after changes, until the task is aborted (the volume's teardown).
    pub async fn run(self: Arc<Self>) {
        let mut last_sent: Option<Instant> = None;
        loop {
            self.wake.notified().await;
            tokio::time::sleep(SETTLE).await;
            if let Some(last) = last_sent {
                tokio::time::sleep_until(last + self.config.min_interval).await;
            }
            if !self.pending.swap(false, Ordering::AcqRel) {
                continue;
            }
            last_sent = Some(Instant::now());
            let this = self.clone();
            // /proc is read with blocking calls; one scan per change at most.
            let _ = tokio::task::spawn_blocking(move || this.send()).await;
        }
    }

    /// Signals the target's processes now, each through a pidfd held before it was checked;
    /// returns how many were signalled.
    pub fn send(&self) -> usize {
        let signal = self.config.signal;
        let proc_root = Path::new("/proc");
        let (held, whom) = match &self.config.target {
            Target::Pod { uid, process } => (
                hold_pod_processes(
                    proc_root,
                    &pod_processes(proc_root, uid, process),
                    uid,
                    process,
                ),
                format!(
                    "process {} of pod {} (the plugin needs hostPID: true to see it)",
                    process.as_str(),
                    uid.as_str()
                ),
            ),
            Target::PidFile(file) => (
                read_pid_file(file)
                    .and_then(|pid| Pidfd::open(pid).ok())
                    .into_iter()
                    .collect(),
                format!("the pid in {}", file.display()),
            ),
        };
        let own = std::process::id() as i32;
        let mut sent = 0;
        for process in held.iter().filter(|p| p.pid() > 1 && p.pid() != own) {
            let pid = process.pid();
            match process.send_signal(signal.number()) {
                Ok(()) => {
                    sent += 1;
                    self.metrics.reload_signal_sent(&self.volume);
                    tracing::info!(volume = %self.volume, %signal, pid, "secrets changed: reload signal sent");
                }
                // Exited since it was checked.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    tracing::warn!(volume = %self.volume, %signal, pid, error = %e, "could not send the reload signal");
                }
            }
        }
        if sent == 0 {
            self.metrics.reload_signal_failure(&self.volume);
            tracing::warn!(volume = %self.volume, %signal, "secrets changed but no reload signal was sent: found no {whom} to signal");
        }
        sent
    }
}

/// The pid in `file` (decimal, surrounding whitespace allowed); `None`, logged, otherwise.
fn read_pid_file(file: &Path) -> Option<i32> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the reload pid file");
            return None;
        }
    };
    let pid = text.trim().parse::<i32>().ok().filter(|p| *p > 1);
    if pid.is_none() {
        tracing::warn!(file = %file.display(), "the reload pid file does not hold a process id above 1");
    }
    pid
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f0c2d3e-4b5a-4697-8a8b-9c0d1e2f3a4b";

    fn uid() -> PodUid {
        UID.parse().unwrap()
    }

    #[test]
    fn pod_uid_is_found_in_v1_and_v2_lines_of_both_cgroup_drivers() {
        let underscored = UID.replace('-', "_");
        for line in [
            // cgroup v2, systemd driver (containerd and CRI-O scopes)
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-0123abcd.scope"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/crio-0123abcd.scope"),
            // Guaranteed QoS has no QoS slice
            format!("0::/kubepods.slice/kubepods-pod{underscored}.slice/cri-containerd-0123abcd.scope"),
            // seen from inside the daemon's own cgroup namespace
            format!("0::/../../kubepods-besteffort-pod{underscored}.slice/cri-containerd-0123abcd.scope"),
            // cgroup v1, systemd driver
            format!("4:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/docker-0123.scope"),
            // cgroupfs driver, v1 and v2, uid with '-'
            format!("8:pids:/kubepods/besteffort/pod{UID}/0123abcd"),
            format!("0::/kubepods/burstable/pod{UID}/0123abcd"),
            format!("0::/kubepods/pod{UID}/0123abcd"),
            // upper-case hex is the same uid
            format!("0::/kubepods/pod{}/0123abcd", UID.to_ascii_uppercase()),
        ] {
            assert_eq!(pod_uid_in_cgroup_line(&line), Some(uid()), "{line}");
        }
    }

    #[test]
    fn lines_outside_pods_have_no_pod_uid() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "9:name=systemd:/user.slice/user-1000.slice/session-2.scope",
            "8:pids:/kubepods/besteffort",
            // a uid-shaped name not introduced by "pod"
            &format!("0::/kubepods/x{UID}/0123"),
            &format!("0::/kubepods/mypod{UID}/0123"),
            // mixed separators, short uid, non-hex
            "0::/kubepods/pod1f0c2d3e_4b5a-4697-8a8b-9c0d1e2f3a4b/0123",
            "0::/kubepods/pod1f0c2d3e-4b5a-4697-8a8b-9c0d1e2f3a4/0123",
            "0::/kubepods/podzf0c2d3e-4b5a-4697-8a8b-9c0d1e2f3a4b/0123",
            "not a cgroup line",
        ] {
            assert_eq!(pod_uid_in_cgroup_line(line), None, "{line}");
        }
    }

    #[test]
    fn signal_names_parse_with_or_without_sig_and_unknown_ones_list_examples() {
        assert_eq!("SIGHUP".parse::<Signal>().unwrap().number(), libc::SIGHUP);
        assert_eq!("HUP".parse::<Signal>().unwrap().number(), libc::SIGHUP);
        assert_eq!("sigusr1".parse::<Signal>().unwrap().number(), libc::SIGUSR1);
        assert_eq!("USR2".parse::<Signal>().unwrap().to_string(), "SIGUSR2");
        for refused in ["1", "SIGKILL", "STOP", "SIGFOO", ""] {
            let err = refused.parse::<Signal>().unwrap_err();
            assert!(
                err.contains("SIGHUP")
                    && err.contains("SIGUSR1")
                    && err.contains(&format!("{refused:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn process_names_longer_than_the_kernel_keeps_are_refused() {
        assert_eq!("nginx".parse::<ProcessName>().unwrap().as_str(), "nginx");
        assert!("a-fifteen-chars".parse::<ProcessName>().is_ok());
        let err = "a-sixteen-chars!".parse::<ProcessName>().unwrap_err();
        assert!(err.contains("15"), "{err}");
        assert!("/usr/sbin/nginx".parse::<ProcessName>().is_err());
        assert!("".parse::<ProcessName>().is_err());
    }

    #[test]
    fn pod_processes_match_name_and_pod_and_skip_pid_1_and_others() {
        let proc_root = tempfile::tempdir().unwrap();
        let underscored = UID.replace('-', "_");
        let in_pod = format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-1.scope\n");
        let other_pod = "0::/kubepods/besteffort/pod0f0c2d3e-4b5a-4697-8a8b-9c0d1e2f3a4b/2\n";
        for (pid, comm, cgroup) in [
            ("1", "app-srv", in_pod.as_str()),
            ("20", "app-srv", in_pod.as_str()),
            ("21", "app-srv-2", in_pod.as_str()),
            ("22", "app-srv", other_pod),
            ("23", "app-srv", "0::/\n"),
            ("24", "app-srv", in_pod.as_str()),
        ] {
            let dir = proc_root.path().join(pid);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        }
        // Vanished between listing and reading.
        std::fs::create_dir(proc_root.path().join("25")).unwrap();
        std::fs::create_dir(proc_root.path().join("self")).unwrap();
        let name = "app-srv".parse().unwrap();
        assert_eq!(pod_processes(proc_root.path(), &uid(), &name), vec![20, 24]);
    }

    #[test]
    fn a_process_that_changed_its_name_or_pod_since_the_scan_is_not_signalled() {
        use std::os::unix::process::ExitStatusExt;
        let proc_root = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("run sleep");
        let pid = child.id() as i32;
        // A stand-in /proc entry for the real process, so its name and cgroup can change.
        let dir = proc_root.path().join(pid.to_string());
        std::fs::create_dir(&dir).unwrap();
        let in_pod = format!("0::/kubepods/besteffort/pod{UID}/0123abcd\n");
        let set = |comm: &str, cgroup: &str| {
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        };
        set("app-srv", &in_pod);
        let name: ProcessName = "app-srv".parse().unwrap();
        let scanned = pod_processes(proc_root.path(), &uid(), &name);
        assert_eq!(scanned, vec![pid]);

        // Between the scan and the signal it ran another program...
        set("other-program", &in_pod);
        assert!(hold_pod_processes(proc_root.path(), &scanned, &uid(), &name).is_empty());
        // ... or its pid went to a process of another pod.
        set(
            "app-srv",
            "0::/kubepods/besteffort/pod0f0c2d3e-4b5a-4697-8a8b-9c0d1e2f3a4b/2\n",
        );
        assert!(hold_pod_processes(proc_root.path(), &scanned, &uid(), &name).is_empty());
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "not signalled: still running"
        );

        // Unchanged, it is held, and the signal reaches it.
        set("app-srv", &in_pod);
        let held = hold_pod_processes(proc_root.path(), &scanned, &uid(), &name);
        assert_eq!(held.len(), 1);
        held[0].send_signal(libc::SIGTERM).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
        // Gone (its pid free for anyone), the pidfd signals nothing.
        let err = held[0].send_signal(libc::SIGTERM).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_signal_and_the_next_waits_for_the_interval() {
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        // Nobody to signal (pid 1 is never signalled): each attempt counts as a failure.
        std::fs::write(pid_file.path(), "1\n").unwrap();
        let metrics = Arc::new(Metrics::new());
        let reloader = Arc::new(Reloader::new(
            ReloadConfig {
                signal: Signal::from_str("HUP").unwrap(),
                target: Target::PidFile(pid_file.path().to_path_buf()),
                min_interval: Duration::from_secs(10),
            },
            "vol".into(),
            metrics.clone(),
        ));
        let task = tokio::spawn(reloader.clone().run());
        let attempts = || metrics.reload_signal_failures("vol");
        reloader.changed();
        reloader.changed();
        tokio::time::sleep(SETTLE / 2).await;
        reloader.changed();
        tokio::time::sleep(SETTLE * 2).await;
        assert_eq!(
            attempts(),
            1,
            "three changes within the settle time: one signal"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(attempts(), 1, "no change, no signal");
        reloader.changed();
        tokio::time::sleep(SETTLE * 2).await;
        assert_eq!(attempts(), 2, "a later change: a signal at once");
        reloader.changed();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(attempts(), 2, "within the interval: held back");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(attempts(), 3, "sent once the interval has passed");
        task.abort();
    }
}
