//! One `vaultfs render-worker` process: started under its address-space limit (no core dumps,
//! no new privileges, killed with its parent), fed one rendering at a time through its pipes
//! with a deadline, and reaped telling how it ended; and `worker_main`, what the worker runs.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::wire::{read_request, read_response, write_request, write_response};
use super::{Job, RenderConfig};
use crate::secret::SecretData;
use crate::spec::SecretPath;
use crate::template::{self, Rendered};

/// How a worker ended.
pub(super) struct Ended {
    pub(super) signal: Option<i32>,
    pub(super) text: String,
}

/// A `vaultfs render-worker` process and its pipes.
pub(super) struct Worker {
    child: Child,
    to: ChildStdin,
    from: ChildStdout,
    /// The last rendering read back.
    pub(super) last: Option<Rendered>,
}

impl Worker {
    pub(super) fn spawn(exe: &PathBuf, config: &RenderConfig) -> io::Result<Worker> {
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
    pub(super) fn render(&mut self, job: &Job, deadline: Duration) -> io::Result<()> {
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
    pub(super) fn stop(mut self, grace: Duration) -> Ended {
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
