//! Whether one Vault server answers, shared by every identity (volume) using it: a request that
//! fails at the transport level (refused, reset, timed out) marks the server down; while down,
//! requests fail at once and a background probe of `sys/health` marks it up again. Knows
//! nothing of tokens, auth or engines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use reqwest::Url;
use tokio::time::Instant;

use super::http::RequestKind;
use crate::source::SourceError;

/// How often a down server is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one probe: a server that takes longer is not answering in a useful way.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What is known about the server while it is down.
struct Down {
    since: Instant,
    since_wall: SystemTime,
    /// What the last failed request or probe saw (no secret values: transport errors and
    /// HTTP statuses only).
    cause: String,
}

/// The up/down state of one server and the probe that ends an outage.
pub(super) struct Health {
    http: reqwest::Client,
    /// The server's base address, as named in errors and the metric label.
    addr: String,
    probe_url: Url,
    down: Mutex<Option<Down>>,
    /// Times the server came back after being down (see `SecretSource::server_recoveries`).
    recoveries: AtomicU64,
    /// Bumped each time the server goes down, so that requests in flight stop waiting.
    went_down: tokio::sync::watch::Sender<u64>,
    /// `vaultfs_vault_server_up`, once the owner hands it over.
    gauge: Mutex<Option<Gauge>>,
}

impl Health {
    pub(super) fn new(http: reqwest::Client, base: &Url) -> Self {
        let mut probe_url = base.clone();
        probe_url
            .path_segments_mut()
            .expect("parse_addr only accepts base URLs")
            .pop_if_empty()
            .extend(["v1", "sys", "health"]);
        Self {
            http,
            addr: base.as_str().trim_end_matches('/').to_string(),
            probe_url,
            down: Mutex::new(None),
            recoveries: AtomicU64::new(0),
            went_down: tokio::sync::watch::channel(0).0,
            gauge: Mutex::new(None),
        }
    }

    /// Reports the state on `gauge` from now on (1 up, 0 down).
    pub(super) fn set_gauge(&self, gauge: Gauge) {
        let down = self.down.lock();
        gauge.set(i64::from(down.is_none()));
        *self.gauge.lock() = Some(gauge);
    }

    pub(super) fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Acquire)
    }

    pub(super) fn is_up(&self) -> bool {
        self.down.lock().is_none()
    }

    /// Fails at once while the server is down, naming it and since when.
    pub(super) fn check(&self, kind: RequestKind) -> Result<(), SourceError> {
        let down = self.down.lock();
        let Some(down) = down.as_ref() else {
            return Ok(());
        };
        Err(SourceError::Unavailable(format!(
            "{kind}: Vault server {} is not answering since {} ({:.1} s ago: {}); not asked until a health probe (every {} s) answers",
            self.addr,
            clock_time(down.since_wall),
            down.since.elapsed().as_secs_f64(),
            down.cause,
            PROBE_INTERVAL.as_secs(),
        )))
    }

    /// A receiver that sees a change when the server next goes down.
    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.went_down.subscribe()
    }

    /// Marks the server down after a transport failure (`cause`), starting the probe if it
    /// was up.
    pub(super) fn mark_down(self: &Arc<Self>, cause: &str) {
        {
            let mut down = self.down.lock();
            if let Some(down) = down.as_mut() {
                down.cause = cause.to_string();
                return;
            }
            *down = Some(Down {
                since: Instant::now(),
                since_wall: SystemTime::now(),
                cause: cause.to_string(),
            });
            self.set_metric(false);
        }
        tracing::warn!(server = %self.addr, error = %cause, "Vault server is not answering: requests fail at once (stale values are served) until it answers again");
        self.went_down.send_modify(|n| *n += 1);
        tokio::spawn(probe(Arc::downgrade(self)));
    }

    fn mark_up(&self) {
        let mut down = self.down.lock();
        if let Some(was) = down.take() {
            self.recoveries.fetch_add(1, Ordering::AcqRel);
            self.set_metric(true);
            tracing::info!(server = %self.addr, down_for = ?was.since.elapsed(), "Vault server answers again");
        }
    }

    fn set_metric(&self, up: bool) {
        if let Some(gauge) = self.gauge.lock().as_ref() {
            gauge.set(i64::from(up));
        }
    }

    fn note(&self, cause: String) {
        if let Some(down) = self.down.lock().as_mut() {
            down.cause = cause;
        }
    }
}

/// Probes `sys/health` every `PROBE_INTERVAL` until the server answers, then marks it up. Any
/// HTTP answer below 500 counts as up: 200 (active), 429 (unsealed standby), 472/473 (DR or
/// performance secondary) all serve or forward requests, and a gateway that refuses the
/// health path (403/404) still proves the server behind the address answers. 5xx does not:
/// 503 is a sealed Vault, 501 an uninitialized one, 502/504 a gateway whose Vault is gone;
/// requests would only fail there, so they keep failing at once here. Ends when the server
/// is gone (its last owner dropped it).
async fn probe(health: Weak<Health>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(health) = health.upgrade() else {
            return;
        };
        let answer = health
            .http
            .get(health.probe_url.clone())
            .header("X-Vault-Request", "true")
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().as_u16() < 500 => {
                health.mark_up();
                return;
            }
            Ok(response) => health.note(format!(
                "sys/health answers HTTP {}{}",
                response.status().as_u16(),
                match response.status().as_u16() {
                    503 => " (sealed)",
                    501 => " (not initialized)",
                    _ => "",
                }
            )),
            Err(err) => health.note(format!(
                "sys/health probe failed: {}",
                super::exchange::describe(err)
            )),
        }
    }
}

/// `at` as `HH:MM:SS UTC`, enough to match log lines of the same outage.
fn clock_time(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use prometheus_client::metrics::gauge::Gauge;

    use crate::source::vault::http::{RequestKind, VaultServer};
    use crate::source::vault::test_server::{config, get, json_answer};
    use crate::source::SourceError;

    /// A server that reads each request and then, per `mode` at that moment, never answers
    /// (0), answers `sys/health` with 503 and nothing else (1), or answers everything with 200
    /// (2); returns its address and the request heads it received.
    fn stalling_server(
        mode: Arc<std::sync::atomic::AtomicU8>,
    ) -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (mode, log) = (mode.clone(), log.clone());
                std::thread::spawn(move || loop {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&byte[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    log.lock().push(head.clone());
                    let health = head.contains("/v1/sys/health");
                    let answer = match mode.load(Ordering::SeqCst) {
                        0 => {
                            // Holds the connection open, answering nothing (a frozen Vault).
                            std::thread::sleep(Duration::from_secs(3600));
                            return;
                        }
                        1 if health => {
                            json_answer("503 Service Unavailable", r#"{"sealed":true}"#, false)
                        }
                        1 => return,
                        _ => json_answer("200 OK", "{}", false),
                    };
                    if stream.write_all(&answer).is_err() {
                        return;
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn once_a_request_finds_the_server_down_others_fail_at_once_until_a_probe_answers() {
        use std::sync::atomic::{AtomicU8, Ordering};
        let mode = Arc::new(AtomicU8::new(0));
        let (addr, seen) = stalling_server(mode.clone());
        let server = VaultServer::new(&config(&addr, Duration::from_millis(300))).unwrap();
        let gauge = Gauge::default();
        server.set_up_gauge(gauge.clone());
        assert_eq!(gauge.get(), 1);
        let started = std::time::Instant::now();
        let first = get(&server, RequestKind::Read).await.unwrap_err();
        assert!(first.is_transient(), "{first}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(!server.is_up());
        assert_eq!(gauge.get(), 0);
        // Another identity's request fails at once, naming the server and since when.
        let started = std::time::Instant::now();
        let second = get(&server, RequestKind::Metadata).await.unwrap_err();
        let fast = started.elapsed();
        eprintln!("first request waited {waited:?}, the next one {fast:?}");
        assert!(fast < Duration::from_millis(100), "{fast:?}");
        let SourceError::Unavailable(message) = &second else {
            panic!("{second:?}");
        };
        assert!(
            message.contains(addr.as_str()) && message.contains("not answering since"),
            "{message}"
        );
        let requests = seen.lock().len();
        assert_eq!(requests, 1, "the second request never reached the server");
        // Sealed: the probe's 503 keeps the server down.
        mode.store(1, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !seen.lock().iter().any(|h| h.contains("/v1/sys/health")) {
            assert!(std::time::Instant::now() < deadline, "no probe");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!server.is_up(), "a sealed Vault is not up");
        let sealed = get(&server, RequestKind::Read).await.unwrap_err();
        assert!(sealed.to_string().contains("sealed"), "{sealed}");
        // Answering again: the probe marks it up within about a second.
        mode.store(2, Ordering::SeqCst);
        let back = std::time::Instant::now();
        while !server.is_up() {
            assert!(back.elapsed() < Duration::from_secs(3), "never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "marked up {:?} after the server answered again",
            back.elapsed()
        );
        assert_eq!(server.recoveries(), 1);
        assert_eq!(gauge.get(), 1);
        get(&server, RequestKind::Read)
            .await
            .expect("requests go through again");
    }

    #[tokio::test]
    async fn a_request_in_flight_stops_waiting_when_another_finds_the_server_down() {
        let (addr, _) = stalling_server(Arc::new(std::sync::atomic::AtomicU8::new(0)));
        let server = Arc::new(VaultServer::new(&config(&addr, Duration::from_secs(2))).unwrap());
        let first = tokio::spawn({
            let server = server.clone();
            async move { get(&server, RequestKind::Read).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = std::time::Instant::now();
        let second = get(&server, RequestKind::Metadata).await.unwrap_err();
        let waited = started.elapsed();
        first.await.unwrap().unwrap_err();
        eprintln!("the request sent 1 s after the first waited {waited:?}");
        assert!(second.is_transient(), "{second}");
        // Its own timeout would have ended it 2 s after it was sent; the first request's
        // ends it about 1 s in.
        assert!(waited < Duration::from_millis(1800), "{waited:?}");
    }
}
