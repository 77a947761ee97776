//! `/healthz`: whether every mount this daemon serves is still mounted and its FUSE connection
//! still answers. `monitor` checks in the background, so a probe of `/healthz` never waits on
//! the filesystem it asks about; it uses one thread per FUSE connection at most (never one per
//! volume), and only while that connection keeps a check waiting.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

/// How often the mounts are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a FUSE connection may take to answer `statfs` before it counts as not answering.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// At most this many problems are named in `/healthz`; the rest are counted.
const NAMED_PROBLEMS: usize = 10;

/// A mount to check: `target` must stay a mount (the one with `id`, when known).
#[derive(Clone, Debug)]
pub struct Watched {
    /// How `/healthz` names it: a volume's name, or nothing where the daemon serves one.
    pub name: String,
    pub target: PathBuf,
    /// The mount's id as `sys::mount_id` gave it right after mounting; `None`: whichever mount
    /// is at `target` now (an adopted bind mount, not looked up while its connection was not
    /// served).
    pub id: Option<u64>,
}

/// What to check now.
#[derive(Clone, Debug, Default)]
pub struct Watchlist {
    pub mounts: Vec<Watched>,
    /// Paths on each FUSE connection served (their mount roots): each must answer `statfs`.
    pub connections: Vec<PathBuf>,
}

/// One thing found wrong by the last check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A watched mount is no longer at its target (unmounted from outside).
    Gone(String),
    /// A connection did not answer within `ANSWER_DEADLINE`, or answered with an error.
    NotAnswering(String),
}

impl Problem {
    fn text(&self) -> &str {
        match self {
            Problem::Gone(text) | Problem::NotAnswering(text) => text,
        }
    }
}

/// The result of the last check, for `/healthz` and for whoever waits for a mount to go.
pub struct Health {
    problems: watch::Sender<Vec<Problem>>,
    /// Whether a gone mount is logged here (not where its caller stops with it as its error).
    log_gone: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Healthy until a check finds a problem.
    pub fn new() -> Self {
        Self {
            problems: watch::Sender::new(Vec::new()),
            log_gone: true,
        }
    }

    /// For a daemon that stops when its mount is gone (`gone`) and says so itself: a gone mount
    /// is not logged here too.
    pub fn stopping_when_gone() -> Self {
        Self {
            log_gone: false,
            ..Self::new()
        }
    }

    /// `Err` with the problems of the last check, one line.
    pub fn status(&self) -> Result<(), String> {
        let problems = self.problems.borrow();
        if problems.is_empty() {
            return Ok(());
        }
        let mut text = problems
            .iter()
            .take(NAMED_PROBLEMS)
            .map(Problem::text)
            .collect::<Vec<_>>()
            .join("; ");
        if problems.len() > NAMED_PROBLEMS {
            text.push_str(&format!("; and {} more", problems.len() - NAMED_PROBLEMS));
        }
        Err(text)
    }

    /// Completes, with its text, once a check finds a watched mount gone.
    pub async fn gone(&self) -> String {
        let mut seen = self.problems.subscribe();
        let gone = |problems: &[Problem]| {
            problems.iter().find_map(|p| match p {
                Problem::Gone(text) => Some(text.clone()),
                Problem::NotAnswering(_) => None,
            })
        };
        loop {
            if let Some(text) = gone(&seen.borrow_and_update()) {
                return text;
            }
            if seen.changed().await.is_err() {
                // `self` holds the sender: it cannot be dropped while this waits.
                return std::future::pending().await;
            }
        }
    }

    pub(crate) fn publish(&self, problems: Vec<Problem>) {
        self.problems.send_if_modified(|current| {
            let changed = *current != problems;
            if changed {
                for problem in problems.iter().filter(|p| !current.contains(p)) {
                    if self.log_gone || !matches!(problem, Problem::Gone(_)) {
                        tracing::warn!(problem = problem.text(), "unhealthy");
                    }
                }
                if problems.is_empty() {
                    tracing::info!("healthy again");
                }
                *current = problems;
            }
            changed
        });
    }
}

/// Checks `watchlist()` every `CHECK_INTERVAL` until dropped, publishes the problems found in
/// `health` and counts them in `count`.
pub async fn monitor(
    health: std::sync::Arc<Health>,
    count: prometheus_client::metrics::gauge::Gauge,
    watchlist: impl Fn() -> Watchlist,
) {
    let mut probes = Probes::default();
    loop {
        let list = watchlist();
        let mut problems = gone_mounts(&list.mounts);
        for path in &list.connections {
            if let Some(problem) = probes.check(path).await {
                problems.push(problem);
            }
        }
        probes.forget_all_but(&list.connections);
        count.set(problems.len() as i64);
        health.publish(problems);
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

/// The watched mounts no longer at their targets, by one read of the mount table.
fn gone_mounts(mounts: &[Watched]) -> Vec<Problem> {
    if mounts.is_empty() {
        return Vec::new();
    }
    let Some(table) = crate::sys::mount_table() else {
        return Vec::new();
    };
    mounts
        .iter()
        .filter(|m| {
            let id = m.id.or_else(|| crate::sys::mount_id(&m.target));
            id.is_none_or(|id| table.get(&id) != Some(&m.target))
        })
        .map(|m| {
            let volume = if m.name.is_empty() {
                String::new()
            } else {
                format!("volume {}: ", m.name)
            };
            Problem::Gone(format!(
                "{volume}the mount at {} is gone (unmounted from outside)",
                m.target.display()
            ))
        })
        .collect()
}

/// The `statfs` probes of each connection; one at a time per connection, so a connection that
/// never answers holds one thread, not one per check.
#[derive(Default)]
struct Probes {
    pending: HashMap<PathBuf, Pending>,
}

struct Pending {
    since: Instant,
    answer: oneshot::Receiver<std::io::Result<()>>,
}

impl Probes {
    /// Asks `path`'s connection (or keeps waiting for the probe still out) for up to
    /// `ANSWER_DEADLINE`.
    async fn check(&mut self, path: &PathBuf) -> Option<Problem> {
        let mut pending = match self.pending.remove(path) {
            Some(pending) => pending,
            None => Pending {
                since: Instant::now(),
                answer: spawn_statfs(path.clone())?,
            },
        };
        let left = ANSWER_DEADLINE.saturating_sub(pending.since.elapsed());
        match tokio::time::timeout(left, &mut pending.answer).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(Problem::NotAnswering(format!(
                    "{e}: the FUSE connection served there cannot be reached through it, so no new volume can be published on it"
                )))
            }
            Ok(Ok(Err(e))) => Some(Problem::NotAnswering(format!(
                "the FUSE connection at {} answers statfs with an error: {e}",
                path.display()
            ))),
            // The probe thread is gone without answering: try again next time.
            Ok(Err(_)) => None,
            Err(_) => {
                let waited = pending.since.elapsed();
                self.pending.insert(path.clone(), pending);
                Some(Problem::NotAnswering(format!(
                    "the FUSE connection at {} has not answered statfs for {:.0} s",
                    path.display(),
                    waited.as_secs_f64()
                )))
            }
        }
    }

    fn forget_all_but(&mut self, paths: &[PathBuf]) {
        let kept: HashSet<&PathBuf> = paths.iter().collect();
        self.pending.retain(|path, _| kept.contains(path));
    }
}

/// `statfs(path)` on a thread of its own: it waits for the FUSE daemon, which may be this
/// process and stuck.
fn spawn_statfs(path: PathBuf) -> Option<oneshot::Receiver<std::io::Result<()>>> {
    let (send, receive) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("vaultfs-health".into())
        .spawn(move || {
            let _ = send.send(crate::sys::statfs_fuse(&path));
        });
    match spawned {
        Ok(_) => Some(receive),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a health probe thread");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_first_problems_and_counts_the_rest() {
        let health = Health::new();
        assert_eq!(health.status(), Ok(()));
        health.publish(
            (0..12)
                .map(|i| Problem::Gone(format!("v{i}: gone")))
                .collect(),
        );
        let text = health.status().unwrap_err();
        assert!(text.starts_with("v0: gone; v1: gone;"), "{text}");
        assert!(text.contains("v9: gone; and 2 more"), "{text}");
        assert!(!text.contains("v10"), "{text}");
        health.publish(Vec::new());
        assert_eq!(health.status(), Ok(()));
    }

    #[tokio::test]
    async fn gone_completes_with_the_gone_mount_only() {
        let health = std::sync::Arc::new(Health::new());
        let waiting = tokio::spawn({
            let health = health.clone();
            async move { health.gone().await }
        });
        health.publish(vec![Problem::NotAnswering("slow".into())]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "a slow connection is not a gone mount"
        );
        health.publish(vec![
            Problem::NotAnswering("slow".into()),
            Problem::Gone("v: the mount at /t is gone".into()),
        ]);
        assert_eq!(waiting.await.unwrap(), "v: the mount at /t is gone");
    }

    #[test]
    fn a_directory_that_is_no_mount_is_gone() {
        let dir = std::env::temp_dir().join(format!("vaultfs-health-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = Watched {
            name: "root".into(),
            target: "/proc".into(),
            id: None,
        };
        let plain = Watched {
            name: "plain".into(),
            target: dir.clone(),
            id: None,
        };
        let problems = gone_mounts(&[root, plain]);
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .text()
                .starts_with("volume plain: the mount at "),
            "{problems:?}"
        );
    }
}
