//! Pods' readers for the restart tests: `restart_reader.py` run as
//! `unshare --mount --propagation private python3 restart_reader.py ...`, so that each reads in
//! its own mount namespace with private propagation, as a container whose volumeMount has no
//! `mountPropagation: HostToContainer` does: it keeps the mounts it started with, and never sees
//! one stacked on them later.
//!
//! * [`Reader`]: reads one file every 5 ms in two ways (open + read + close, and `pread` on a
//!   descriptor held open from the start) until stopped, and sums up what it saw
//!   ([`Summary`]).
//! * [`OnceRead`]: one open + read + close, to put a single request in flight.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{die_with_parent, poll, read_lossy};

/// The reader script.
pub const READER_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/common/restart_reader.py"
);

/// How long a reader may take to read for the first time.
pub const READER_START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a stopped reader may take to write its summary (a read stuck in the kernel shows
/// as `hung` in it after 10 s).
pub const READER_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// `python3 restart_reader.py ARGS` in a new mount namespace with private propagation.
fn in_private_namespace(args: &[&str], stderr: &Path) -> Child {
    let err = File::create(stderr).expect("create the reader's stderr file");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "python3",
        READER_SCRIPT,
    ])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::from(err.try_clone().expect("dup stderr file")))
    .stderr(Stdio::from(err));
    die_with_parent(&mut cmd, libc::SIGKILL);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn unshare + python3 {READER_SCRIPT}: {e}"))
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Kills a reader that is still running, without waiting long: a read stuck in the kernel can
/// hold the process until the FUSE connection goes.
fn kill_quietly(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = poll(
            Duration::from_secs(2),
            Duration::from_millis(20),
            || match child.try_wait() {
                Ok(None) => Err(()),
                _ => Ok(()),
            },
        );
    }
}

/// A running reader of one file (see the module docs).
pub struct Reader {
    name: String,
    file: PathBuf,
    child: Child,
    dir: TempDir,
    summary: Option<Summary>,
}

impl Reader {
    /// Starts reading `file` (in a private mount namespace made now) and waits until both of
    /// its ways of reading have read once. Contents other than `allowed` count as failures.
    pub fn start(name: &str, file: &Path, allowed: &[&str]) -> Reader {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-reader-")
            .tempdir()
            .expect("create the reader's directory");
        let stop = dir.path().join("stop");
        let status = dir.path().join("status.json");
        let file_arg = file.display().to_string();
        let stop_arg = stop.display().to_string();
        let status_arg = status.display().to_string();
        let mut args = vec![
            "loop",
            "--file",
            &file_arg,
            "--stop",
            &stop_arg,
            "--status",
            &status_arg,
            "--interval",
            "0.005",
        ];
        for value in allowed {
            args.extend(["--allowed", value]);
        }
        let child = in_private_namespace(&args, &dir.path().join("stderr"));
        let mut reader = Reader {
            name: name.to_string(),
            file: file.to_path_buf(),
            child,
            dir,
            summary: None,
        };
        let reading = poll(READER_START_TIMEOUT, Duration::from_millis(20), || {
            if let Some(s) = reader.status() {
                if let Some(fatal) = s.json["fatal"].as_str() {
                    panic!("reader {name} could not start: {fatal}");
                }
                if s.loops().all(|(_, l)| l["ok"].as_u64().unwrap_or(0) > 0) {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = reader.child.try_wait() {
                panic!(
                    "reader {name} exited with {status} before reading; its output:\n{}",
                    reader.stderr()
                );
            }
            Err(())
        });
        if reading.is_err() {
            panic!(
                "reader {name} of {} did not read within {READER_START_TIMEOUT:?}; status: {}; \
                 its output:\n{}",
                file.display(),
                reader
                    .status()
                    .map_or_else(|| "none".to_string(), |s| s.to_string()),
                reader.stderr()
            );
        }
        reader
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What the reader has seen so far (its status file, rewritten every 0.2 s).
    pub fn status(&self) -> Option<Summary> {
        read_json(&self.dir.path().join("status.json")).map(|json| Summary {
            name: self.name.clone(),
            json,
        })
    }

    /// Whether every way of reading has read `content` at least once so far.
    pub fn has_seen(&self, content: &str) -> bool {
        self.status().is_some_and(|s| s.all_saw(content))
    }

    /// The reader's own output (python tracebacks, unshare errors).
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr"))
    }

    /// Stops the reader and returns its final summary. A reader whose read is stuck writes its
    /// summary anyway (with the stuck ways under `hung`) and is then killed; one that writes no
    /// summary within [`READER_STOP_TIMEOUT`] makes this panic with its last status.
    pub fn stop(&mut self) -> Summary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        File::create(self.dir.path().join("stop")).expect("create the reader's stop file");
        let deadline = Instant::now() + READER_STOP_TIMEOUT;
        let summary = loop {
            match self.status() {
                Some(s) if s.json["done"] == Value::Bool(true) => break s,
                last if Instant::now() >= deadline => {
                    kill_quietly(&mut self.child);
                    panic!(
                        "reader {} wrote no summary within {READER_STOP_TIMEOUT:?} of being \
                         stopped; last status: {}; its output:\n{}",
                        self.name,
                        last.map_or_else(|| "none".to_string(), |s| s.to_string()),
                        self.stderr()
                    );
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        };
        let exited = poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || match self.child.try_wait() {
                Ok(Some(_)) => Ok(()),
                _ => Err(()),
            },
        );
        if exited.is_err() {
            kill_quietly(&mut self.child);
        }
        self.summary = Some(summary.clone());
        summary
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = File::create(self.dir.path().join("stop"));
        let _ = poll(
            Duration::from_secs(2),
            Duration::from_millis(20),
            || match self.child.try_wait() {
                Ok(None) => Err(()),
                _ => Ok(()),
            },
        );
        kill_quietly(&mut self.child);
    }
}

/// What a reader saw: its status JSON (see `restart_reader.py`), per way of reading
/// (`open_read`, `held_pread`).
#[derive(Clone, Debug)]
pub struct Summary {
    pub name: String,
    pub json: Value,
}

impl Summary {
    /// Each way of reading and its figures.
    pub fn loops(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.json["loops"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v)))
    }

    fn sum(&self, field: &str) -> u64 {
        self.loops()
            .map(|(_, l)| l[field].as_u64().unwrap_or(0))
            .sum()
    }

    pub fn reads(&self) -> u64 {
        self.sum("reads")
    }

    /// Failed reads: errors of any kind, and contents other than the allowed ones.
    pub fn failures(&self) -> u64 {
        self.sum("failures")
    }

    pub fn enotconn(&self) -> u64 {
        self.sum("enotconn")
    }

    /// Ways of reading whose read was still stuck when the reader gave up waiting.
    pub fn hung(&self) -> Vec<String> {
        self.json["hung"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A problem with the reader itself (could not open the file, a thread died).
    pub fn reader_errors(&self) -> Vec<String> {
        let mut errors: Vec<String> = self.json["fatal"]
            .as_str()
            .map(str::to_string)
            .into_iter()
            .collect();
        errors.extend(
            self.loops()
                .filter_map(|(n, l)| l["thread_error"].as_str().map(|e| format!("{n}: {e}"))),
        );
        errors
    }

    /// The longest single read, in milliseconds.
    pub fn longest_ms(&self) -> f64 {
        self.loops()
            .map(|(_, l)| l["longest_ms"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    }

    /// Whether every way of reading has read `content`.
    pub fn all_saw(&self, content: &str) -> bool {
        let mut loops = self.loops().peekable();
        loops.peek().is_some() && loops.all(|(_, l)| !l["contents"][content].is_null())
    }

    /// Reads that took 10 ms or more, as (start, end) in seconds since the Unix epoch.
    pub fn slow_reads(&self) -> Vec<(f64, f64)> {
        self.loops()
            .flat_map(|(_, l)| l["slow"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect()
    }

    /// One line: reads, failures by errno, longest read, contents seen.
    pub fn brief(&self) -> String {
        let loops: Vec<String> = self
            .loops()
            .map(|(n, l)| {
                format!(
                    "{n}: {} reads, {} failed {}, longest {} ms, contents {}",
                    l["reads"], l["failures"], l["errors"], l["longest_ms"], l["contents"]
                )
            })
            .collect();
        format!("{} [{}]", self.name, loops.join("; "))
    }
}

impl std::fmt::Display for Summary {
    /// The whole summary as JSON, without the list of slow reads (only their number).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut json = self.json.clone();
        if let Some(loops) = json["loops"].as_object_mut() {
            for l in loops.values_mut() {
                let n = l["slow"].as_array().map_or(0, Vec::len);
                l["slow"] = Value::from(format!("{n} reads of 10 ms or more"));
            }
        }
        write!(
            f,
            "{}: {}",
            self.name,
            serde_json::to_string_pretty(&json).unwrap_or_default()
        )
    }
}

/// One open + read + close of a file from a private mount namespace, running in the
/// background (to have a request in flight while the daemon dies).
pub struct OnceRead {
    child: Child,
    dir: TempDir,
}

impl OnceRead {
    pub fn start(file: &Path) -> OnceRead {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-read-once-")
            .tempdir()
            .expect("create the reader's directory");
        let out = dir.path().join("result.json");
        let child = in_private_namespace(
            &[
                "once",
                "--file",
                &file.display().to_string(),
                "--out",
                &out.display().to_string(),
            ],
            &dir.path().join("stderr"),
        );
        OnceRead { child, dir }
    }

    /// The outcome (`ok`, `content`, `errno`, `ms`, ...) once the read has returned.
    pub fn result(&self) -> Option<Value> {
        read_json(&self.dir.path().join("result.json"))
    }

    /// Whether the process is still running (its read has not returned).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None)) && self.result().is_none()
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr"))
    }

    /// Waits up to `limit` for the outcome; `None` if the read is still waiting.
    pub fn wait(&mut self, limit: Duration) -> Option<Value> {
        poll(limit, Duration::from_millis(10), || self.result().ok_or(())).ok()
    }
}

impl Drop for OnceRead {
    fn drop(&mut self) {
        kill_quietly(&mut self.child);
    }
}
