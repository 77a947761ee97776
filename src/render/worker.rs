//! One `vaultfs render-worker` process: started under its address-space limit (no core dumps,
//! no new privileges, killed with its parent), fed one rendering at a time through its pipes
//! with a deadline, and reaped telling how it ended; and `worker_main`, what the worker runs.

use std::io::{self, Read};
use std::os::fd::AsFd;
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
        // Never above the limit this process already has (an unprivileged user cannot raise it).
        let memory = crate::sys::process::address_space_limit()
            .map_or(config.memory, |own| config.memory.min(own.hard));
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
        // Its memory limit, no core dumps, no new privileges, killed if this thread dies.
        crate::sys::process::limit_child(&mut command, memory);
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

impl<R: Read + AsFd> Read for Deadline<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        match crate::sys::socket::wait_input(self.inner.as_fd(), left) {
            Ok(false) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the rendering took too long",
            )),
            Err(e) => Err(e),
            Ok(true) => self.inner.read(buf),
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
