//! A tiny HTTP server for the Vault client's tests: each connection is answered on its own
//! thread by a closure given the request head, and every head is recorded; and the requests
//! the HTTP tests send through it. Test-only.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::http::{Request, RequestKind};
use super::{ServerConfig, ServerLimits, VaultServer};
use crate::secret::Token;
use crate::source::SourceError;

/// Request heads a test server received, in arrival order.
pub type Seen = Arc<parking_lot::Mutex<Vec<String>>>;

/// Serves `answer(head)` to every connection (each on its own thread, so an answer that
/// blocks holds up no other); returns the server's `http://` address and the heads seen.
pub fn serve(answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> (String, Seen) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = format!("http://{}", listener.local_addr().expect("local address"));
    let seen: Seen = Arc::default();
    let (log, answer) = (seen.clone(), Arc::new(answer));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (log, answer) = (log.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                log.lock().push(head.clone());
                let _ = stream.write_all(&answer(&head));
            });
        }
    });
    (addr, seen)
}

/// A plain configuration for a server at `addr`: no namespace, the built-in CA roots, every
/// request bounded by `timeout`.
pub fn config(addr: &str, timeout: Duration) -> ServerConfig {
    ServerConfig {
        addr: addr.into(),
        namespace: None,
        ca_cert: None,
        skip_verify: false,
        timeout,
    }
}

/// An HTTP answer with a JSON `body`, sized or chunked.
pub fn json_answer(status: &str, body: &str, chunked: bool) -> Vec<u8> {
    if chunked {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .into_bytes()
    } else {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// The request heads `seen` by the test server once it has `n` of them (within 2 s).
pub async fn requests_seen(seen: &Seen, n: usize) -> Vec<String> {
    for _ in 0..100 {
        if seen.lock().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), n, "{seen:?}");
    seen
}

/// A server at `addr` (5 s timeout) whose answers may be at most `max` bytes.
pub fn small_server(addr: &str, max: usize) -> VaultServer {
    let config = config(addr, Duration::from_secs(5));
    let limits = ServerLimits {
        max_response_bytes: max,
        ..ServerLimits::default()
    };
    VaultServer::with_limits(&config, limits).unwrap()
}

/// A GET of `secret/data/app` as `kind`, with a token, on an identity of its own.
pub async fn get(server: &VaultServer, kind: RequestKind) -> Result<Value, SourceError> {
    let request = Request {
        kind,
        method: Method::GET,
        path: "secret/data/app",
        body: None,
        token: Some(Token::new("tok".into())),
    };
    server
        .send(request, &Arc::new(Semaphore::new(1)), &Gauge::default())
        .await
}
