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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::secret::SecretData;
use crate::spec::SecretPath;
use crate::template::{self, RenderError, Rendered};

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

/// How a worker ended.
struct Ended {
    signal: Option<i32>,
    text: String,
}

/// A `vaultfs render-worker` process and its pipes.
struct Worker {
    child: Child,
    to: ChildStdin,
    from: ChildStdout,
    /// The last rendering read back.
    last: Option<Rendered>,
}

impl Worker {
    fn spawn(exe: &PathBuf, config: &RenderConfig) -> io::Result<Worker> {
        use std::os::unix::process::CommandExt;
        // Never above the limit this process already has (an unprivileged user cannot raise it).
        let mut own = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one valid rlimit struct.
        let memory = if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut own) } == 0 {
            config.memory.min(own.rlim_max)
        } else {
            config.memory
        };
        let mut command = Command::new(exe);
        command.arg(WORKER_COMMAND);
        if config.lock_memory {
            command.arg("--lock-memory");
        }
        command
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The daemon says why a worker stopped, in its own log format.
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (setrlimit, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: memory,
                    rlim_max: memory,
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
        let mut child = command.spawn()?;
        let to = child.stdin.take().expect("piped");
        let from = child.stdout.take().expect("piped");
        Ok(Worker {
            child,
            to,
            from,
            last: None,
        })
    }

    /// Sends `job` and reads its rendering into `last`.
    fn render(&mut self, job: &Job, deadline: Duration) -> io::Result<()> {
        write_request(&mut self.to, &job.source, &job.given())?;
        let until = Instant::now() + deadline;
        let mut reader = Deadline {
            inner: &mut self.from,
            until,
        };
        self.last = Some(read_response(&mut reader)?);
        Ok(())
    }

    /// Reaps the worker, killing it if it has not ended within `grace`; says how it ended. A
    /// worker this kills has no signal of its own to report: its end is no verdict on the
    /// template.
    fn stop(mut self, grace: Duration) -> Ended {
        let until = Instant::now() + grace;
        // A worker that broke off (a failed allocation) closes its pipes just before it can be
        // reaped: give it a moment, so that its own end is what is reported.
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Ended {
                signal: None,
                text: "stopped by the daemon".to_string(),
            };
        }
        match self.child.wait() {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal();
                let text = match (status.code(), signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(libc::SIGABRT)) => "aborted: an allocation failed".to_string(),
                    (None, Some(s)) => format!("signal {s}"),
                    _ => status.to_string(),
                };
                Ended { signal, text }
            }
            Err(e) => Ended {
                signal: None,
                text: format!("not reaped: {e}"),
            },
        }
    }
}

/// Reads that give up at `until` (`TimedOut`).
struct Deadline<'a, R> {
    inner: &'a mut R,
    until: Instant,
}

impl<R: Read + AsRawFd> Read for Deadline<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        let mut fd = libc::pollfd {
            fd: self.inner.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        match n {
            0 => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the rendering took too long",
            )),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => self.inner.read(buf),
        }
    }
}

/// The hidden subcommand a worker runs as.
pub const WORKER_COMMAND: &str = "render-worker";

/// Largest request or response part read (a worker's memory limit bounds what it can build
/// anyway; this bounds what the daemon reads from one).
const MAX_PART: usize = 64 << 20;

// Wire format, both ways: a part is a little-endian u32 length and that many bytes. A request
// is a JSON header `{"source", "secrets": [[path, length], ...]}` and then each secret's data
// as JSON, one part each; a response is a JSON header `{"used", "needed", "error"}` and the
// output as one part.

fn write_part(to: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("part too large"))?;
    to.write_all(&len.to_le_bytes())?;
    to.write_all(bytes)
}

fn read_part(from: &mut impl Read, max: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::other(format!("a part of {len} bytes")));
    }
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    from.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn write_request(
    to: &mut impl Write,
    source: &str,
    given: &[(SecretPath, &SecretData)],
) -> io::Result<()> {
    let header = json!({
        "source": source,
        "secrets": given.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
    });
    write_part(to, header.to_string().as_bytes())?;
    for (_, data) in given {
        let bytes = data.render(None).map_or(&[][..], |b| b.expose());
        write_part(to, bytes)?;
    }
    to.flush()
}

/// A template's source and the secrets it is rendered over.
type Request = (Arc<str>, Vec<(SecretPath, SecretData)>);

/// A request, or `None` at the end of input.
fn read_request(from: &mut impl Read) -> io::Result<Option<Request>> {
    let header = match read_part(from, MAX_PART) {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let header: Value = serde_json::from_slice(&header).map_err(io::Error::other)?;
    let source: Arc<str> = Arc::from(header["source"].as_str().unwrap_or_default());
    let mut given = Vec::new();
    for path in header["secrets"].as_array().into_iter().flatten() {
        let path =
            SecretPath::parse(path.as_str().unwrap_or_default()).map_err(io::Error::other)?;
        let bytes = read_part(from, MAX_PART)?;
        let map = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        given.push((path, SecretData::from_json(map)));
    }
    Ok(Some((source, given)))
}

fn error_json(err: &RenderError) -> Value {
    let (kind, text) = match err {
        RenderError::Needs(p) => ("needs", p.as_str().to_string()),
        RenderError::BadPath(m) => ("bad_path", m.clone()),
        RenderError::MissingField(m) => ("missing_field", m.clone()),
        RenderError::Limit(m) => ("limit", m.clone()),
        RenderError::Failed(m) => ("failed", m.clone()),
        RenderError::Unavailable(m) => ("unavailable", m.clone()),
    };
    json!({"kind": kind, "text": text})
}

fn error_from_json(v: &Value) -> io::Result<RenderError> {
    let text = v["text"].as_str().unwrap_or_default().to_string();
    Ok(match v["kind"].as_str().unwrap_or_default() {
        "needs" => RenderError::Needs(SecretPath::parse(&text).map_err(io::Error::other)?),
        "bad_path" => RenderError::BadPath(text),
        "missing_field" => RenderError::MissingField(text),
        "limit" => RenderError::Limit(text),
        "unavailable" => RenderError::Unavailable(text),
        _ => RenderError::Failed(text),
    })
}

fn write_response(to: &mut impl Write, rendered: &Rendered) -> io::Result<()> {
    let paths = |ps: &[SecretPath]| {
        ps.iter()
            .map(|p| p.as_str().to_string())
            .collect::<Vec<_>>()
    };
    let header = json!({
        "used": paths(&rendered.used),
        "needed": rendered.needed.as_ref().map(|p| p.as_str()),
        "error": rendered.result.as_ref().err().map(error_json),
    });
    write_part(to, header.to_string().as_bytes())?;
    let out = rendered.result.as_ref().map_or(&[][..], |o| &o[..]);
    write_part(to, out)?;
    to.flush()
}

fn read_response(from: &mut impl Read) -> io::Result<Rendered> {
    // What a worker can send back: a short header and an output under the cap.
    let header = read_part(from, 1 << 20)?;
    let header: Value = serde_json::from_slice(&header).map_err(io::Error::other)?;
    let out = read_part(from, template::MAX_OUTPUT_BYTES)?;
    let parse =
        |v: &Value| SecretPath::parse(v.as_str().unwrap_or_default()).map_err(io::Error::other);
    let used = header["used"]
        .as_array()
        .into_iter()
        .flatten()
        .map(parse)
        .collect::<io::Result<Vec<_>>>()?;
    let needed = match &header["needed"] {
        Value::Null => None,
        v => Some(parse(v)?),
    };
    let result = match &header["error"] {
        Value::Null => Ok(out),
        e => Err(error_from_json(e)?),
    };
    Ok(Rendered {
        result,
        used,
        needed,
    })
}

/// `vaultfs render-worker`: renders requests from stdin onto stdout until stdin closes. Started
/// by the daemon under its memory limit; gives up what it does not need first: core dumps and
/// ptrace (it holds secret values), every capability, and the OOM killer's mercy (it is the
/// process to kill first in the container).
pub fn worker_main(lock_memory: bool) -> io::Result<()> {
    crate::sys::disable_core_dumps()?;
    if lock_memory {
        crate::sys::lock_memory()?;
    }
    crate::sys::drop_capabilities()?;
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let stdin = io::stdin();
    let stdout = io::stdout();
    let (mut from, mut to) = (stdin.lock(), stdout.lock());
    while let Some((source, given)) = read_request(&mut from)? {
        let refs: Vec<(SecretPath, &SecretData)> =
            given.iter().map(|(p, d)| (p.clone(), d)).collect();
        let rendered = template::render_source(&source, &refs);
        write_response(&mut to, &rendered)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> SecretPath {
        SecretPath::parse(p).unwrap()
    }

    #[test]
    fn requests_and_responses_cross_the_wire_whole() {
        let data = SecretData::from_pairs([("user", "app"), ("password", "pw")]);
        let mut wire = Vec::new();
        write_request(&mut wire, "{{ 1 }}", &[(path("secret/a"), &data)]).unwrap();
        let (source, given) = read_request(&mut &wire[..]).unwrap().unwrap();
        assert_eq!(&*source, "{{ 1 }}");
        assert_eq!(given, vec![(path("secret/a"), data)]);
        assert!(read_request(&mut &[][..]).unwrap().is_none());

        for rendered in [
            Rendered {
                result: Ok(Zeroizing::new(b"out".to_vec())),
                used: vec![path("secret/a")],
                needed: None,
            },
            Rendered {
                result: Err(RenderError::Needs(path("secret/b"))),
                used: vec![path("secret/a")],
                needed: Some(path("secret/b")),
            },
            Rendered::failed(RenderError::Limit("fuel".into())),
        ] {
            let mut wire = Vec::new();
            write_response(&mut wire, &rendered).unwrap();
            let back = read_response(&mut &wire[..]).unwrap();
            assert_eq!(back.result.as_deref().ok(), rendered.result.as_deref().ok());
            assert_eq!(back.result.as_ref().err(), rendered.result.as_ref().err());
            assert_eq!(back.used, rendered.used);
            assert_eq!(back.needed, rendered.needed);
        }
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
