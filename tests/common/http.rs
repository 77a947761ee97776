//! Minimal blocking HTTP/1.1 clients: a daemon's `/metrics` and `/healthz`, the OpenBao API,
//! and free loopback ports to serve them on.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::bao::ROOT_TOKEN;
use super::poll::poll;

/// The body of `GET path` from a plain HTTP server on `addr` (a daemon's `/metrics`).
pub fn http_get(addr: &str, path: &str) -> String {
    match http_status(addr, path) {
        (200, body) => body,
        (status, body) => panic!("GET {path} from {addr} answered {status}:\n{body}"),
    }
}

/// `GET path` from the HTTP server at `addr`: the status code and the body.
pub fn http_status(addr: &str, path: &str) -> (u16, String) {
    try_http_status(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http_status`], or why the server could not be asked (not listening yet, say).
pub fn try_http_status(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send GET {path} to {addr}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read GET {path} from {addr}: {e}"))?;
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, answer.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok((status, body.to_string())),
        _ => Err(format!(
            "GET {path} from {addr}: not an HTTP answer:\n{answer}"
        )),
    }
}

/// The value of the Prometheus sample `series` (name and labels, exactly as rendered) in
/// `text`, or 0 when the series is absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The value of `series` in the `/metrics` of the daemon at `addr`, or 0 when it is absent or
/// the metrics cannot be read (a daemon still starting, or gone).
pub fn scrape(addr: &str, series: &str) -> f64 {
    match try_http_status(addr, "/metrics") {
        Ok((200, text)) => metric_value(&text, series),
        _ => 0.0,
    }
}

/// Waits up to `limit` until [`scrape`] finds `series` at least `min`; its last value, as
/// `Ok` once reached, as `Err` if never.
pub fn wait_metric(addr: &str, series: &str, min: f64, limit: Duration) -> Result<f64, f64> {
    poll(limit, Duration::from_millis(20), || {
        let v = scrape(addr, series);
        if v >= min {
            Ok(v)
        } else {
            Err(v)
        }
    })
}

/// A free loopback port (for a daemon's `--metrics-addr`).
pub fn free_port() -> u16 {
    free_port_pair()
}

/// Two consecutive free loopback ports (`p` for the API, `p + 1` for the cluster listener the
/// dev server opens next to it). Ports handed out by this process never repeat.
pub(super) fn free_port_pair() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 1000) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2000 {
        let mut p = NEXT.fetch_add(2, Ordering::SeqCst);
        if p > 60000 {
            NEXT.store(20000, Ordering::SeqCst);
            p = NEXT.fetch_add(2, Ordering::SeqCst);
        }
        let a = TcpListener::bind(("127.0.0.1", p));
        let b = TcpListener::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free pair of loopback ports found");
}

/// A response from the OpenBao HTTP API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn json(&self) -> Value {
        if self.body.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.body))
    }
}

fn decode_chunked(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = body.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&body[..pos]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        body = &body[pos + 2..];
        if size == 0 || body.len() < size {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    out
}

pub(super) fn http_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    timeout: Duration,
) -> io::Result<ApiResponse> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("X-Vault-Token: {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    stream.write_all(req.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let _ = stream.shutdown(Shutdown::Both);

    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body_bytes = &raw[split + 4..];
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body_bytes)
    } else {
        body_bytes.to_vec()
    };
    Ok(ApiResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A minimal HTTP/1.1 client of OpenBao on one kept-alive connection: the cheapest way to ask
/// Vault, the baseline the benchmarks measure cold reads against.
pub struct DirectVault {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    port: u16,
    token: String,
}

impl DirectVault {
    /// A connection to OpenBao on `port` sending the root token.
    pub fn connect(port: u16) -> Self {
        Self::connect_as(port, ROOT_TOKEN)
    }

    /// A connection to OpenBao on `port` sending `token` (a token issued by a login, say,
    /// whose policies OpenBao evaluates on every request, as for a daemon's own token).
    pub fn connect_as(port: u16, token: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to OpenBao");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            writer: stream.try_clone().expect("clone stream"),
            reader: BufReader::new(stream),
            port,
            token: token.to_string(),
        }
    }

    /// GETs `/v1/{path}` and returns the body length.
    pub fn get(&mut self, path: &str) -> usize {
        write!(
            self.writer,
            "GET /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Vault-Token: {}\r\n\r\n",
            self.port, self.token
        )
        .expect("send request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        assert!(line.contains(" 200 "), "GET {path}: {line}");
        let (mut length, mut chunked) = (0, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            let header = line.to_ascii_lowercase();
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse().expect("content-length");
            }
            chunked |= header.starts_with("transfer-encoding:") && header.contains("chunked");
        }
        if !chunked {
            let mut body = vec![0u8; length];
            self.reader.read_exact(&mut body).expect("body");
            return length;
        }
        let mut total = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
            let mut chunk = vec![0u8; size + 2]; // data and its CRLF
            self.reader.read_exact(&mut chunk).expect("chunk");
            total += size;
            if size == 0 {
                return total;
            }
        }
    }
}
