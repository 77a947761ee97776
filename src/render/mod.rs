//! Template renderings, out of the daemon's memory and off its threads: a small pool of
//! `vaultfs render-worker` processes, each under an address-space limit (`RLIMIT_AS`), fed by a
//! queue that is fair across volumes.
//!
//! A template can ask the engine for any amount of memory (string repetition, `fromjson` of a
//! computed text, ranges, joins), and fuel counts instructions, not bytes: one instruction can
//! allocate hundreds of MiB. In a worker, such an allocation fails against the worker's own
//! limit and the worker dies (Rust aborts on a failed allocation); the daemon answers that one
//! file with an error naming the limit, starts a new worker, and no other file or volume is
//! touched. The daemon's own memory never holds more than the inputs and the output (itself
//! capped at [`template::MAX_OUTPUT_BYTES`]).
//!
//! Fairness: every volume has its own queue, volumes with work are served round-robin, and a
//! volume has at most one rendering running at a time, so a volume rendering non-stop holds one
//! worker and every other volume's renderings go to the others. The workers are driven by
//! threads of their own: renderings never wait on (or hold up) the runtime's blocking pool.
//!
//! This file owns the pool and its fair queue; a worker process's life is in `worker`, the pipe
//! protocol in `wire`.

mod wire;
mod worker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::secret::SecretData;
use crate::spec::SecretPath;
use crate::template::{self, RenderError, Rendered};
use worker::Worker;

pub use worker::{worker_main, WORKER_COMMAND};

/// How the pool renders.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    /// Worker threads (and, with `exe`, worker processes).
    pub workers: usize,
    /// The `vaultfs` binary to start workers from (`/proc/self/exe`); `None` renders in this
    /// process, on the pool's threads (tests of the library, which have no such binary).
    pub exe: Option<PathBuf>,
    /// Each worker's address-space limit, in bytes.
    pub memory: u64,
    /// Longest a rendering may take before its worker is stopped.
    pub deadline: Duration,
    /// Workers lock their memory (`--lock-memory`): they hold the secrets they render.
    pub lock_memory: bool,
}

/// Defaults: two workers (one volume cannot hold more than one), 128 MiB each.
pub const DEFAULT_WORKERS: usize = 2;
pub const DEFAULT_WORKER_MEMORY: u64 = 128 << 20;
const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            workers: DEFAULT_WORKERS,
            exe: None,
            memory: DEFAULT_WORKER_MEMORY,
            deadline: DEFAULT_DEADLINE,
            lock_memory: false,
        }
    }
}

static POOL: OnceLock<RenderPool> = OnceLock::new();

/// Sets up the process's pool. Fails when no render thread could be started, or when a pool
/// was set up (or used) already.
pub fn configure(config: RenderConfig) -> Result<(), String> {
    let pool = RenderPool::start(config);
    if pool.threads == 0 {
        return Err("no template render thread could be started".to_string());
    }
    POOL.set(pool)
        .map_err(|_| "the template render pool was set up already".to_string())
}

/// A secret a rendering reads, shared with the cache (never copied into the queue).
pub type Input = Arc<dyn AsRef<SecretData> + Send + Sync>;

/// The process's pool (rendering in this process unless `configure` said otherwise).
pub fn pool() -> &'static RenderPool {
    POOL.get_or_init(|| RenderPool::start(RenderConfig::default()))
}

/// A pool of renderers with a queue fair across volumes.
pub struct RenderPool {
    shared: Arc<Shared>,
    threads: usize,
}

struct Shared {
    config: RenderConfig,
    sched: Mutex<Sched>,
    work: Condvar,
}

struct Job {
    source: Arc<str>,
    given: Vec<(SecretPath, Input)>,
    reply: oneshot::Sender<Rendered>,
}

impl Job {
    fn given(&self) -> Vec<(SecretPath, &SecretData)> {
        self.given
            .iter()
            .map(|(p, d)| (p.clone(), (**d).as_ref()))
            .collect()
    }
}

/// The queues: one per volume, served round-robin, one running rendering per volume.
#[derive(Default)]
struct Sched {
    queues: HashMap<u64, VecDeque<Job>>,
    /// Volumes with queued work, in the order they are served.
    ring: VecDeque<u64>,
    /// Volumes with a rendering running.
    busy: HashSet<u64>,
}

impl Sched {
    fn push(&mut self, volume: u64, job: Job) {
        let queue = self.queues.entry(volume).or_default();
        if queue.is_empty() {
            self.ring.push_back(volume);
        }
        queue.push_back(job);
    }

    /// The next job of the first volume in the ring that has none running.
    fn next(&mut self) -> Option<(u64, Job)> {
        for _ in 0..self.ring.len() {
            let volume = self.ring.pop_front()?;
            if self.busy.contains(&volume) {
                self.ring.push_back(volume);
                continue;
            }
            let queue = self.queues.get_mut(&volume)?;
            let job = queue.pop_front()?;
            if queue.is_empty() {
                self.queues.remove(&volume);
            } else {
                self.ring.push_back(volume);
            }
            self.busy.insert(volume);
            return Some((volume, job));
        }
        None
    }
}

impl RenderPool {
    fn start(config: RenderConfig) -> RenderPool {
        let shared = Arc::new(Shared {
            config,
            sched: Mutex::new(Sched::default()),
            work: Condvar::new(),
        });
        let mut threads = 0;
        for i in 0..shared.config.workers.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vaultfs-render-{i}"))
                .spawn(move || shared.serve());
            match spawned {
                Ok(_) => threads += 1,
                Err(e) => tracing::error!(error = %e, "cannot start a template render thread"),
            }
        }
        RenderPool { shared, threads }
    }

    /// Renders the template `source` over `given` for volume `volume` (any number unique to
    /// the volume), after the renderings queued before it by the same volume.
    pub async fn render(
        &self,
        volume: u64,
        source: Arc<str>,
        given: Vec<(SecretPath, Input)>,
    ) -> Rendered {
        let (reply, answer) = oneshot::channel();
        self.shared.sched.lock().push(
            volume,
            Job {
                source,
                given,
                reply,
            },
        );
        self.shared.work.notify_one();
        answer.await.unwrap_or_else(|_| {
            Rendered::failed(RenderError::Unavailable(
                "the template render thread stopped".to_string(),
            ))
        })
    }
}

impl Shared {
    /// One render thread: takes the next fair job, renders it (in its worker process, started
    /// and restarted as needed), answers, and marks its volume free again.
    fn serve(&self) {
        let mut worker: Option<Worker> = None;
        loop {
            let (volume, job) = {
                let mut sched = self.sched.lock();
                loop {
                    if let Some(next) = sched.next() {
                        break next;
                    }
                    self.work.wait(&mut sched);
                }
            };
            // Frees the volume however the job ends (a panic included).
            let _free = Free {
                shared: self,
                volume,
            };
            let rendered = match &self.config.exe {
                None => template::render_source(&job.source, &job.given()),
                Some(exe) => self.in_worker(&mut worker, exe, &job),
            };
            let _ = job.reply.send(rendered);
        }
    }

    fn in_worker(&self, worker: &mut Option<Worker>, exe: &PathBuf, job: &Job) -> Rendered {
        if worker.is_none() {
            match Worker::spawn(exe, &self.config) {
                Ok(w) => *worker = Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a template render worker");
                    return Rendered::failed(RenderError::Unavailable(format!(
                        "no render worker could be started: {e}"
                    )));
                }
            }
        }
        let w = worker.as_mut().expect("started above");
        let Err(e) = w.render(job, self.config.deadline) else {
            return w.last.take().expect("set by a successful render");
        };
        // After a timeout the worker is stopped at once; otherwise it is ending by itself.
        let grace = if e.kind() == io::ErrorKind::TimedOut {
            Duration::ZERO
        } else {
            Duration::from_millis(500)
        };
        let ended = worker.take().expect("present").stop(grace);
        tracing::warn!(error = %e, worker = %ended.text, "a template render worker stopped; a new one serves the next rendering");
        let memory = self.config.memory >> 20;
        if e.kind() == io::ErrorKind::TimedOut {
            // Stopped by us: a slow machine is no verdict on the template.
            return Rendered::failed(RenderError::Unavailable(format!(
                "the rendering took longer than {:?}; its worker was stopped",
                self.config.deadline
            )));
        }
        match ended.signal {
            // Killed by a failed allocation (abort), the address-space limit (SIGSEGV on a stack
            // or mapping that could not grow) or the OOM killer: the template's own doing.
            Some(libc::SIGABRT | libc::SIGSEGV | libc::SIGBUS | libc::SIGKILL) => {
                Rendered::failed(RenderError::Limit(format!(
                    "the rendering stopped its worker process ({}): it needed more than the \
                     worker's {memory} MiB of memory (--render-memory)",
                    ended.text
                )))
            }
            _ => Rendered::failed(RenderError::Unavailable(format!(
                "the render worker failed ({}): {e}",
                ended.text
            ))),
        }
    }
}

/// Marks a volume free again in the queue when dropped, and wakes the render threads.
struct Free<'a> {
    shared: &'a Shared,
    volume: u64,
}

impl Drop for Free<'_> {
    fn drop(&mut self) {
        self.shared.sched.lock().busy.remove(&self.volume);
        // Another thread may be waiting for this volume's next job.
        self.shared.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn path(p: &str) -> SecretPath {
        SecretPath::parse(p).unwrap()
    }

    fn job(n: u32) -> (Job, oneshot::Receiver<Rendered>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            source: Arc::from(format!("{n}")),
            given: Vec::new(),
            reply,
        };
        (job, answer)
    }

    #[test]
    fn volumes_are_served_round_robin_one_rendering_each() {
        let mut sched = Sched::default();
        let mut answers = Vec::new();
        for n in 0..3 {
            let (j, a) = job(n);
            sched.push(1, j);
            answers.push(a);
        }
        let (j, a) = job(10);
        sched.push(2, j);
        answers.push(a);
        let (v, first) = sched.next().unwrap();
        assert_eq!((v, &*first.source), (1, "0"));
        // Volume 1 is busy: volume 2 next, then nothing until volume 1 is free.
        let (v, second) = sched.next().unwrap();
        assert_eq!((v, &*second.source), (2, "10"));
        assert!(sched.next().is_none());
        sched.busy.remove(&1);
        let (v, third) = sched.next().unwrap();
        assert_eq!((v, &*third.source), (1, "1"));
    }

    /// A pool whose workers run `exe`.
    fn pool_of(exe: &str) -> RenderPool {
        RenderPool::start(RenderConfig {
            workers: 1,
            exe: Some(PathBuf::from(exe)),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_or_answer_is_no_verdict_on_the_template() {
        let cannot_start = pool_of("/nonexistent/vaultfs")
            .render(1, Arc::from("x"), Vec::new())
            .await;
        assert!(
            matches!(&cannot_start.result, Err(RenderError::Unavailable(m)) if m.contains("no render worker could be started")),
            "{:?}",
            cannot_start.result.err()
        );
        // A program that exits at once instead of answering (not killed by a signal).
        let exits = pool_of("/bin/true")
            .render(1, Arc::from("x"), Vec::new())
            .await;
        assert!(
            matches!(&exits.result, Err(RenderError::Unavailable(m)) if m.contains("exit code 0")),
            "{:?}",
            exits.result.err()
        );
    }

    #[tokio::test]
    async fn the_in_process_pool_renders() {
        let pool = RenderPool::start(RenderConfig::default());
        let data: Input = Arc::new(SecretData::from_pairs([("password", "pw")]));
        let rendered = pool
            .render(
                7,
                Arc::from(r#"p={{ secret("secret/a").password }}"#),
                vec![(path("secret/a"), data)],
            )
            .await;
        assert_eq!(rendered.result.unwrap().as_slice(), b"p=pw");
        assert_eq!(rendered.used, vec![path("secret/a")]);
    }
}
