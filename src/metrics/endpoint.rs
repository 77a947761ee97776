//! The small HTTP endpoint serving `/metrics` and `/healthz`, and what it bounds: a cap on
//! connections, a deadline for each request head (also the keep-alive idle limit) and a longest
//! life per connection, so that no number of connections takes the descriptors the daemon needs
//! for kubelet, FUSE and Vault. It only reads [`Metrics`] and [`Health`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;

use super::Metrics;
use crate::health::Health;

/// The address `--metrics-addr HOST:PORT` listens on: an IP address with its port
/// (`0.0.0.0:9100`, `[::1]:9100`), or a host name resolved to its first address
/// (`localhost:9100`). The error says what was expected.
pub fn resolve_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected HOST:PORT, e.g. 0.0.0.0:9100, [::1]:9100 or localhost:9100";
    let well_formed = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !well_formed {
        return Err(format!("{text:?}: {expected}"));
    }
    let mut found = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}; {expected}"))?;
    found
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address; {expected}"))
}

/// Default of `--max-metrics-connections`: far more than Prometheus and kubelet's probes use
/// (one connection each per scrape or probe), far fewer than the descriptors a daemon has.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// Longest wait for a request's head: from a connection's start, and on a kept-alive connection
/// from the end of the previous response (hyper starts the same timer then), so it is also the
/// idle limit between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// After this long a connection is asked to close once its response in progress is written;
/// it is dropped [`HEADER_READ_TIMEOUT`] later whatever it is doing (a peer that never reads
/// its answer, a request body that never ends).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30);

/// Connections shed (or failed accepts) closer together than this form one burst, logged once.
const BURST_GAP: Duration = Duration::from_secs(10);

/// Pause after an accept fails for want of descriptors or memory: the error would repeat at
/// once, so retrying without a pause only burns a core.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What one peer may hold of the metrics endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Connections served at once (`--max-metrics-connections`). A new one past it closes the
    /// oldest connection not answering a request (idle, or still sending its request), so a
    /// flood of idle connections cannot keep a probe or a scrape out; while every connection
    /// is answering, the new one is closed instead. Counted in
    /// `vaultfs_metrics_endpoint_shed_connections_total`.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`MAX_CONNECTION_AGE`].
    pub max_connection_age: Duration,
}

impl EndpointLimits {
    /// `max_connections` with the fixed timeouts.
    pub fn new(max_connections: usize) -> Self {
        Self {
            max_connections,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
        }
    }
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// Events closer together than [`BURST_GAP`] are one burst; only its first is reported.
#[derive(Default)]
struct Burst {
    last: Option<tokio::time::Instant>,
}

impl Burst {
    /// Records an event now; true if it starts a burst.
    fn starts(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let starts = self.last.is_none_or(|last| now - last >= BURST_GAP);
        self.last = Some(now);
        starts
    }
}

/// Whether a failed `accept` concerns only the connection being accepted (the peer gave up
/// before it was accepted), not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The `/metrics` and `/healthz` routes; any other path is 404.
fn routes(metrics: Arc<Metrics>, health: Arc<Health>) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || async move {
                match health.status() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                    Err(problems) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("unhealthy: {problems}\n"),
                    ),
                }
            }),
        )
}

/// A connection being served, as the accept loop sees it.
struct Served {
    task: tokio::task::JoinHandle<()>,
    /// Set while one of its requests is being answered: it is not shed then.
    answering: Arc<AtomicBool>,
}

/// The connections being served, oldest first. Dropping it closes them all.
#[derive(Default)]
struct Connections(VecDeque<Served>);

impl Drop for Connections {
    fn drop(&mut self) {
        for connection in &self.0 {
            connection.task.abort();
        }
    }
}

impl Connections {
    /// Whether `max` connections are being served (forgetting those that ended).
    fn is_full(&mut self, max: usize) -> bool {
        self.0.retain(|c| !c.task.is_finished());
        self.0.len() >= max
    }

    /// Closes the oldest connection not answering a request and waits until its socket is
    /// closed, so that the descriptors in use never exceed the cap. False if every connection
    /// is answering.
    async fn shed_oldest_idle(&mut self) -> bool {
        let Some(oldest_idle) = self
            .0
            .iter()
            .position(|c| !c.answering.load(Ordering::Relaxed))
        else {
            return false;
        };
        let shed = self
            .0
            .remove(oldest_idle)
            .expect("a position within the queue");
        shed.task.abort();
        // Cancelled (or ended just now): either way its socket is closed once this returns.
        let _ = shed.task.await;
        true
    }
}

/// Serves `GET /metrics` and `GET /healthz` (HTTP/1.1, keep-alive) on `listener` within
/// `limits` until the task is dropped, which closes every connection it serves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    limits: EndpointLimits,
) {
    let routes = routes(metrics.clone(), health);
    let mut connections = Connections::default();
    let (mut shedding, mut accept_failures) = (Burst::default(), Burst::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if accept_failures.starts() {
                    tracing::warn!(
                        error = %e,
                        "the metrics endpoint cannot accept connections; retrying every 100 ms"
                    );
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if connections.is_full(limits.max_connections) {
            metrics.endpoint_shed_connections.inc();
            if shedding.starts() {
                tracing::warn!(
                    max_metrics_connections = limits.max_connections,
                    "the metrics endpoint serves its most connections (--max-metrics-connections): each new one closes the oldest idle one; counted in vaultfs_metrics_endpoint_shed_connections_total, logged once per burst"
                );
            }
            if !connections.shed_oldest_idle().await {
                drop(stream);
                continue;
            }
        }
        let answering = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(serve_connection(
            stream,
            routes.clone(),
            limits,
            metrics.clone(),
            answering.clone(),
        ));
        connections.0.push_back(Served { task, answering });
    }
}

/// One connection's requests, until the peer closes it or a limit does.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    routes: axum::Router,
    limits: EndpointLimits,
    metrics: Arc<Metrics>,
    answering: Arc<AtomicBool>,
) {
    /// Counts the connection open for as long as it lives (also when its task is aborted).
    struct Open(Gauge);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    metrics.endpoint_connections.inc();
    let _open = Open(metrics.endpoint_connections.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Whether a whole request head arrived: a timeout before that is a peer holding a slot
    // (idle from the start, or sending slowly); one after is a kept-alive connection's end.
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let (routes, requested) = (
            hyper_util::service::TowerToHyperService::new(routes),
            requested.clone(),
        );
        hyper::service::service_fn(move |request| {
            requested.store(true, Ordering::Relaxed);
            answering.store(true, Ordering::Relaxed);
            let (answer, answering) = (
                hyper::service::Service::call(&routes, request),
                answering.clone(),
            );
            async move {
                let answer = answer.await;
                answering.store(false, Ordering::Relaxed);
                answer
            }
        })
    };
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = tokio::time::sleep(limits.max_connection_age) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_read_timeout, connection).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    metrics.endpoint_timeouts.inc();
                    tracing::debug!("a metrics connection outlived its longest life; dropped");
                    return;
                }
            }
        }
    };
    if let Err(e) = outcome {
        if e.is_timeout() && !requested.load(Ordering::Relaxed) {
            metrics.endpoint_timeouts.inc();
        }
        tracing::debug!(error = %e, "a metrics connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_may_name_a_host_and_must_name_a_port() {
        assert_eq!(
            resolve_listen_addr("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(
            resolve_listen_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().unwrap())
        );
        let local = resolve_listen_addr("localhost:9100").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 9100, "{local}");
        for bad in [
            "localhost",
            "localhost:",
            ":9100",
            "localhost:99999",
            "9100",
        ] {
            let err = resolve_listen_addr(bad).unwrap_err();
            assert!(err.contains("expected HOST:PORT"), "{bad}: {err}");
        }
        let err = resolve_listen_addr("vaultfs-test.invalid:9100").unwrap_err();
        assert!(
            err.contains("cannot resolve \"vaultfs-test.invalid:9100\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn one_connection_serves_metrics_and_health_until_unhealthy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (metrics, health) = (Arc::new(Metrics::new()), Arc::new(Health::new()));
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            health.clone(),
            EndpointLimits::default(),
        ));
        // Requests pipelined on one kept-alive connection; the last one closes it.
        let get = |paths: &'static [&'static str]| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut requests = String::new();
            for (i, path) in paths.iter().enumerate() {
                let close = if i + 1 == paths.len() {
                    "connection: close\r\n"
                } else {
                    ""
                };
                requests.push_str(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n{close}\r\n"));
            }
            stream.write_all(requests.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let both = get(&["/healthz", "/metrics"]).await;
        assert!(both.starts_with("HTTP/1.1 200 OK"), "{both}");
        assert!(both.contains("\r\n\r\nok\nHTTP/1.1 200 OK"), "{both}");
        assert!(
            both.contains("# TYPE vaultfs_health_problems gauge"),
            "{both}"
        );
        assert!(both.ends_with("# EOF\n"), "{both}");
        health.publish(vec![crate::health::Problem::Gone(
            "v: the mount at /mnt/s is gone".into(),
        )]);
        let bad = get(&["/healthz"]).await;
        assert!(bad.starts_with("HTTP/1.1 503 "), "{bad}");
        assert!(
            bad.ends_with("unhealthy: v: the mount at /mnt/s is gone\n"),
            "{bad}"
        );
        let missing = get(&["/secret"]).await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        server.abort();
    }

    /// The endpoint on a loopback port with `limits`: its address, metrics and task.
    async fn endpoint(
        limits: EndpointLimits,
    ) -> (
        std::net::SocketAddr,
        Arc<Metrics>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            Arc::new(Health::new()),
            limits,
        ));
        (addr, metrics, server)
    }

    /// Short timeouts, so that a test waits for each in well under a second.
    fn short(max_connections: usize) -> EndpointLimits {
        EndpointLimits {
            max_connections,
            header_read_timeout: Duration::from_millis(200),
            max_connection_age: Duration::from_millis(800),
        }
    }

    /// Reads `stream` until the server closes it (end of file or reset); what it read and
    /// how long that took. Panics if it stays open for 10 s.
    async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (String, Duration) {
        use tokio::io::AsyncReadExt;
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!(
                    "the server kept the connection open for 10 s; it sent {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    }

    /// Connects to `addr`, writes `first`, then `each` every `every` until the connection
    /// fails: the connection's read half and the writing task.
    async fn keep_writing(
        addr: std::net::SocketAddr,
        first: &'static [u8],
        each: &'static [u8],
        every: Duration,
    ) -> (
        tokio::net::tcp::OwnedReadHalf,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        use tokio::io::AsyncWriteExt;
        let (reader, mut writer) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        let writing = tokio::spawn(async move {
            writer.write_all(first).await?;
            loop {
                tokio::time::sleep(every).await;
                writer.write_all(each).await?;
            }
        });
        (reader, writing)
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (addr, metrics, server) = endpoint(short(4)).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (answer, after) = until_closed(&mut idle).await;
        eprintln!("a connection that sent nothing was closed after {after:?}");
        assert_eq!(answer, "", "no answer to no request");
        assert!(
            after >= Duration::from_millis(150),
            "closed early: {after:?}"
        );
        assert_eq!(metrics.endpoint_timeouts.get(), 1);
        server.abort();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_once_idle_for_the_header_timeout() {
        use tokio::io::AsyncWriteExt;
        let (addr, metrics, server) = endpoint(short(4)).await;
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (answer, after) = until_closed(&mut kept).await;
        eprintln!("a kept-alive connection was closed {after:?} after its request");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        assert_eq!(
            metrics.endpoint_timeouts.get(),
            0,
            "closing an idle kept-alive connection is no timeout"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_slow_header_sender_is_closed_after_the_header_timeout() {
        let (addr, metrics, server) = endpoint(short(4)).await;
        // One header byte every 20 ms: never idle, never a whole head.
        let (mut reader, trickle) = keep_writing(
            addr,
            b"GET /healthz HTTP/1.1\r\n",
            b"x",
            Duration::from_millis(20),
        )
        .await;
        let (answer, after) = until_closed(&mut reader).await;
        eprintln!("a slow header sender was closed after {after:?}");
        assert_eq!(answer, "");
        assert_eq!(metrics.endpoint_timeouts.get(), 1);
        trickle.abort();
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_connection_is_closed_after_its_longest_life() {
        use tokio::io::AsyncWriteExt;
        let (addr, metrics, server) = endpoint(short(4)).await;
        // A request every 50 ms: never idle for the header timeout.
        let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
        let (mut reader, requests) =
            keep_writing(addr, request, request, Duration::from_millis(50)).await;
        let (answers, after) = until_closed(&mut reader).await;
        let served = answers.matches("HTTP/1.1 200 OK").count();
        eprintln!("a busy connection was closed after {after:?} and {served} answers");
        assert!(served > 1, "{answers}");
        requests.abort();
        // A peer that asks and never reads keeps the answer from being written: the
        // connection is dropped one header timeout after its life.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut deaf = socket.connect(addr).await.unwrap();
        deaf.write_all(&b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".repeat(200))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        while metrics.endpoint_connections.get() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while metrics.endpoint_connections.get() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a peer that never reads held its connection for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "a peer that never read its answers was dropped after {:?}",
            started.elapsed()
        );
        assert_eq!(metrics.endpoint_timeouts.get(), 1, "counted as a timeout");
        drop(deaf);
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn sheddings_less_than_ten_seconds_apart_are_one_burst_logged_once() {
        let mut burst = Burst::default();
        assert!(burst.starts(), "the first one starts a burst");
        for _ in 0..100 {
            tokio::time::advance(Duration::from_secs(9)).await;
            assert!(
                !burst.starts(),
                "one 9 s after the last one is the same burst"
            );
        }
        tokio::time::advance(BURST_GAP).await;
        assert!(burst.starts(), "one after 10 s of none starts a new burst");
    }

    /// Waits until the endpoint serves `n` connections.
    async fn serving(metrics: &Metrics, n: i64) {
        let started = tokio::time::Instant::now();
        while metrics.endpoint_connections.get() != n {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the endpoint serves {} connections, not {n}",
                metrics.endpoint_connections.get()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `GET /healthz` on a new connection: the answer, or "" if the connection was closed
    /// without one.
    async fn healthz(addr: std::net::SocketAddr) -> String {
        use tokio::io::AsyncWriteExt;
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut probe).await.0
    }

    #[tokio::test]
    async fn a_new_connection_past_the_cap_closes_the_oldest_idle_one() {
        let limits = EndpointLimits {
            header_read_timeout: Duration::from_secs(60),
            ..EndpointLimits::new(2)
        };
        let (addr, metrics, server) = endpoint(limits).await;
        let mut oldest = tokio::net::TcpStream::connect(addr).await.unwrap();
        serving(&metrics, 1).await;
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        serving(&metrics, 2).await;
        let answer = healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let (nothing, after) = until_closed(&mut oldest).await;
        eprintln!("the oldest idle connection was closed {after:?} after a probe came");
        assert_eq!(nothing, "");
        assert_eq!(metrics.endpoint_shed_connections.get(), 1);
        // A flood of idle connections, held: each closes the oldest, and a probe still gets in.
        let mut flood = Vec::new();
        for _ in 0..50 {
            flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let answer = healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            metrics.endpoint_shed_connections.get() >= 50,
            "{}",
            metrics.endpoint_shed_connections.get()
        );
        assert!(metrics.endpoint_connections.get() <= 2);
        let text = metrics.render();
        assert!(
            text.contains("vaultfs_metrics_endpoint_shed_connections_total "),
            "{text}"
        );
        server.abort();
    }
}
