//! Waiting with a deadline: polling a probe until it succeeds, and running a filesystem call
//! on a helper thread so that a hung daemon fails the test instead of hanging the run.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How often [`poll`] and [`wait_until`] check by default.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `probe` every `every` until it returns `Ok`, for at most `limit` (it is always called
/// at least once, and once more at the deadline); returns its value, or its last error once
/// `limit` has passed.
pub fn poll<T, E>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    loop {
        let outcome = probe();
        if outcome.is_ok() || Instant::now() >= deadline {
            return outcome;
        }
        thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Waits, checking every [`POLL_INTERVAL`], until `probe` returns `Ok`, and returns its value;
/// panics after `limit` with `what` was awaited and the last error.
pub fn wait_until<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    probe: impl FnMut() -> Result<T, E>,
) -> T {
    poll(limit, POLL_INTERVAL, probe)
        .unwrap_or_else(|last| panic!("timed out after {limit:?} waiting for {what}: {last}"))
}

/// Runs `f` on a helper thread and returns its result, panicking if it takes longer than
/// `limit`. A filesystem call stuck in the kernel cannot be cancelled, so the helper thread is
/// left behind; it is released once the daemon is stopped (the kernel then fails the request).
pub fn within<T, F>(what: &str, limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(format!("fs-op: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn helper thread");
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {limit:?} (the filesystem call hangs)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: helper thread panicked"),
    }
}
