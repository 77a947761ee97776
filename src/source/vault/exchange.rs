//! One request's exchange with a Vault server, owned so that it can finish in a task of its
//! own: the answer read under the body cap and the server's answer budget into wiped buffers,
//! HTTP statuses mapped to `SourceError`, and what an answer nobody waited for granted (a
//! login's token, a read's lease) revoked. The server and its caps are `http`'s.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use super::health::Health;
use super::http::RequestKind;
use crate::secret::{wipe_json, Token};
use crate::source::SourceError;

/// Bytes of Vault answers being read or parsed at once per server (raw bytes plus an estimate
/// of their parsed form): with `DEFAULT_MAX_RESPONSE_BYTES` and `MAX_JSON_VALUES`, room for
/// eight answers of the largest size while small ones (a few KiB) never notice it. An answer
/// that finds it used up fails at once as Vault being unavailable (stale data is served, the
/// cache backs off) instead of waiting on memory others hold.
pub const ANSWER_BUDGET_BYTES: usize = 24 << 20;
/// Most JSON values (array elements, object members, nested containers) an answer may hold:
/// parsed JSON costs tens of bytes per value, so a 1 MiB answer of `[0,0,0,...]` would
/// otherwise grow to about 16 MiB in memory.
pub const MAX_JSON_VALUES: usize = 32 << 10;
/// What the parsed form of one JSON value is reckoned to cost, beyond its raw bytes.
const PARSED_BYTES_PER_VALUE: usize = 64;

/// Bound on the background clean-up requests (revoking a replaced token, or what an answer
/// nobody waited for carried).
pub(super) const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The share of `ANSWER_BUDGET_BYTES` one answer holds, grown as it is read; given back when
/// the answer is done.
struct AnswerBudget {
    answers: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    kib: u32,
    kind: RequestKind,
}

impl AnswerBudget {
    fn new(answers: &Arc<Semaphore>, kind: RequestKind) -> Self {
        Self {
            answers: answers.clone(),
            held: None,
            kib: 0,
            kind,
        }
    }

    /// Makes the share at least `bytes`, or fails at once when the budget is used up.
    fn take(&mut self, bytes: usize) -> Result<(), SourceError> {
        let wanted = kib(bytes);
        if wanted <= self.kib {
            return Ok(());
        }
        let more = self
            .answers
            .clone()
            .try_acquire_many_owned(wanted - self.kib)
            .map_err(|_| {
                SourceError::Unavailable(format!(
                    "{}: {} MiB of Vault answers are being read at once already; retried later",
                    self.kind,
                    ANSWER_BUDGET_BYTES >> 20
                ))
            })?;
        match self.held.as_mut() {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        self.kib = wanted;
        Ok(())
    }
}

/// `bytes` in whole KiB, rounded up.
pub(super) fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// How many JSON values `raw` holds at most (containers, elements, members: one per opening
/// bracket and separator outside strings), or `None` past `limit`. A cheap scan, made before
/// parsing so that a small answer of many tiny values cannot grow large in memory.
fn count_json_values(raw: &[u8], limit: usize) -> Option<usize> {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in raw {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' | b',' | b':' => {
                count += 1;
                if count > limit {
                    return None;
                }
            }
            _ => {}
        }
    }
    Some(count)
}

/// An exchange in flight, and its answer's second home: dropped before the exchange
/// completed (the caller gave up), it moves the exchange to a task of its own, which cleans up
/// the answer when it arrives. Between them, every answer is either received or cleaned up.
pub(super) struct Pending {
    pub(super) run: Option<InFlight>,
    pub(super) orphan: Option<(Exchange, Option<Token>)>,
    /// Changes when the server is found down: a request in flight then stops waiting (the
    /// server stopped answering another request, so this one would most likely wait out its
    /// timeout too), and its answer, should one still come, is cleaned up as one nobody
    /// waited for.
    pub(super) went_down: tokio::sync::watch::Receiver<u64>,
    /// Where an exchange nobody waits for any more is finished.
    pub(super) runtime: tokio::runtime::Handle,
}

/// The exchange itself: its answer and the permits it holds.
pub(super) type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Result<Value, SourceError>, [OwnedSemaphorePermit; 2])>
            + Send,
    >,
>;

impl Pending {
    pub(super) async fn wait(mut self) -> Result<Value, SourceError> {
        let (kind, health) = {
            let (exchange, _) = self.orphan.as_ref().expect("only `drop` takes it");
            (exchange.kind, exchange.health.clone())
        };
        let run = self.run.as_mut().expect("only `wait` and `drop` take it");
        let (result, permits) = tokio::select! {
            biased;
            done = run => done,
            Ok(()) = self.went_down.changed() => {
                // `self` is dropped with the exchange still in it: it finishes on its own and
                // a late answer is cleaned up.
                return Err(health.check(kind).err().unwrap_or_else(|| {
                    SourceError::Unavailable(format!(
                        "{kind}: the Vault server stopped answering while this request was in flight"
                    ))
                }));
            }
        };
        self.run = None;
        drop(permits);
        result
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let (Some(run), Some((exchange, token))) = (self.run.take(), self.orphan.take()) else {
            return;
        };
        self.runtime.spawn(async move {
            let (result, permits) = run.await;
            if let Ok(mut answer) = result {
                exchange.clean_up(&answer, token.as_ref()).await;
                wipe_json(&mut answer);
            }
            drop(permits);
        });
    }
}

/// Everything one request needs, owned, so that it can finish in its own task.
#[derive(Clone)]
pub(super) struct Exchange {
    pub(super) http: reqwest::Client,
    pub(super) namespace: Option<String>,
    pub(super) max_bytes: usize,
    pub(super) answers: Arc<Semaphore>,
    pub(super) kind: RequestKind,
    pub(super) base: Url,
    pub(super) health: Arc<Health>,
}

impl Exchange {
    pub(super) async fn run(
        &self,
        method: Method,
        url: Url,
        body: Option<Zeroizing<Vec<u8>>>,
        token: Option<&Token>,
    ) -> Result<Value, SourceError> {
        let kind = self.kind;
        let mut request = self
            .http
            .request(method, url)
            .header("X-Vault-Request", "true");
        if let Some(t) = token {
            request = request.header("X-Vault-Token", t.expose());
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(mut b) = body {
            // Moved, not copied: the only other copy is the one the HTTP stack sends.
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(std::mem::take(&mut *b));
        }
        // Every reqwest error here is a transport failure (refused, reset, timed out, cut
        // off mid-answer): the server is not answering, for every identity. HTTP answers,
        // 5xx and 429 included, do not mark it down: the server answered (fast), a 5xx or
        // 429 may concern one path or one client, and the cache's back-off already paces
        // retries of those.
        // The base address only, never the request's URL: it is what to check (and a path
        // may name a secret). It carries no credentials or query (`parse_addr`).
        let unavailable = |e: reqwest::Error| {
            let cause = describe(e);
            self.health.mark_down(&cause);
            SourceError::Unavailable(format!(
                "{kind} request to {} failed: {cause}",
                self.base.as_str().trim_end_matches('/')
            ))
        };
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status();
        if status.is_redirection() {
            return Err(SourceError::Unavailable(format!(
                "{kind}: Vault answered HTTP {} (a redirect); vaultfs does not follow redirects: set VAULT_ADDR to the address that serves the API",
                status.as_u16()
            )));
        }
        let too_large = || {
            SourceError::TooLarge(format!(
                "{kind}: Vault's answer is larger than the limit of {} bytes",
                self.max_bytes
            ))
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_bytes as u64)
        {
            return Err(too_large());
        }
        // Sized up front where the length is known, so growing leaves no stray copies behind.
        let expected = response.content_length().unwrap_or(0) as usize;
        let mut budget = AnswerBudget::new(&self.answers, kind);
        budget.take(expected.max(4096))?;
        let mut raw = Zeroizing::new(Vec::with_capacity(expected.max(4096)));
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if raw.len() + chunk.len() > self.max_bytes {
                // `raw` is wiped on drop; the rest of the answer is never read.
                return Err(too_large());
            }
            budget.take(raw.len() + chunk.len())?;
            raw.extend_from_slice(&chunk);
        }
        let values = count_json_values(&raw, MAX_JSON_VALUES).ok_or_else(|| {
            SourceError::TooLarge(format!(
                "{kind}: Vault's answer holds more than {MAX_JSON_VALUES} JSON values"
            ))
        })?;
        budget.take(raw.len() + values * PARSED_BYTES_PER_VALUE)?;
        let value: Value = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).map_err(|_| {
                SourceError::Invalid(format!(
                    "{kind}: HTTP {} with a body that is not JSON",
                    status.as_u16()
                ))
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            let err = classify(status, &value);
            let mut value = value;
            wipe_json(&mut value);
            Err(err)
        }
    }

    /// Whether `answer` carries something Vault granted that must not be left alive unmanaged:
    /// a login's token or a read's lease.
    fn grants(&self, answer: &Value) -> bool {
        match self.kind {
            RequestKind::Login => answer["auth"]["client_token"].is_string(),
            RequestKind::Read => answer["lease_id"].as_str().is_some_and(|id| !id.is_empty()),
            _ => false,
        }
    }

    /// Revokes what an answer nobody waited for carries: a login's token, a read's lease.
    /// Tried even while the server is taken as down: it just answered.
    async fn clean_up(&self, answer: &Value, token: Option<&Token>) {
        if !self.grants(answer) {
            return;
        }
        let kind = self.kind;
        let (path, body, token) = if kind == RequestKind::Login {
            let fresh = answer["auth"]["client_token"].as_str().unwrap_or_default();
            (
                "auth/token/revoke-self",
                None,
                Some(Token::new(fresh.to_string())),
            )
        } else {
            let id = answer["lease_id"].as_str().unwrap_or_default();
            let body = Zeroizing::new(
                serde_json::to_vec(&json!({ "lease_id": id })).expect("JSON always serializes"),
            );
            ("sys/leases/revoke", Some(body), token.cloned())
        };
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("parse_addr only accepts base URLs")
            .pop_if_empty()
            .push("v1")
            .extend(path.split('/'));
        let method = if body.is_some() {
            Method::PUT
        } else {
            Method::POST
        };
        let revoke = self.run(method, url, body, token.as_ref());
        match tokio::time::timeout(CLEANUP_TIMEOUT, revoke).await {
            Ok(Ok(_)) => tracing::info!(
                kind = kind.label(),
                "a Vault answer arrived after its caller gave up; what it granted was revoked"
            ),
            Ok(Err(err)) => tracing::warn!(kind = kind.label(), error = %err, "a Vault answer arrived after its caller gave up and what it granted could not be revoked"),
            Err(_) => tracing::warn!(kind = kind.label(), "a Vault answer arrived after its caller gave up and what it granted could not be revoked in time"),
        }
    }
}

/// A reqwest error with its causes (the TLS or connection failure is only in the chain),
/// without the URL.
/// A transport failure with its whole cause chain, each part once (`error sending request:
/// client error (Connect): tcp connect error: Connection refused (os error 111)`), without the
/// request's URL.
pub(super) fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

pub(super) fn classify(status: StatusCode, body: &Value) -> SourceError {
    let errors = body
        .get("errors")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let mut detail = format!("HTTP {}", status.as_u16());
    if !errors.is_empty() {
        detail.push_str(": ");
        detail.extend(errors.chars().take(300));
    }
    match status {
        StatusCode::NOT_FOUND => SourceError::NotFound,
        StatusCode::FORBIDDEN => SourceError::PermissionDenied,
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            SourceError::Unavailable(detail)
        }
        _ => SourceError::Invalid(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;

    use crate::source::vault::http::Request;
    use crate::source::vault::test_server::{get, json_answer, requests_seen, serve, small_server};

    #[test]
    fn json_values_are_counted_outside_strings_and_capped() {
        assert_eq!(
            count_json_values(br#"{"a": "x,y:[{", "b": [1, 2]}"#, 100),
            Some(7)
        );
        assert_eq!(count_json_values(br#""esc\"aped,""#, 100), Some(1));
        let many = format!("[{}0]", "0,".repeat(40_000));
        assert_eq!(count_json_values(many.as_bytes(), MAX_JSON_VALUES), None);
    }

    #[test]
    fn the_answer_budget_fails_fast_when_used_up_and_is_given_back() {
        let answers = Arc::new(Semaphore::new(kib(8 << 10) as usize));
        let mut first = AnswerBudget::new(&answers, RequestKind::Read);
        first.take(6 << 10).unwrap();
        first.take(5 << 10).unwrap();
        let mut second = AnswerBudget::new(&answers, RequestKind::Read);
        let err = second.take(4 << 10).unwrap_err();
        assert!(err.is_transient(), "{err}");
        drop(first);
        second
            .take(4 << 10)
            .expect("given back when the first answer is done");
    }

    #[test]
    fn status_codes_map_to_source_errors() {
        let body = json!({"errors": ["permission denied"]});
        assert_eq!(
            classify(StatusCode::FORBIDDEN, &body),
            SourceError::PermissionDenied
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, &json!({})),
            SourceError::NotFound
        );
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, &body).is_transient());
        let bad = classify(
            StatusCode::BAD_REQUEST,
            &json!({"errors": ["invalid role"]}),
        );
        assert_eq!(bad, SourceError::Invalid("HTTP 400: invalid role".into()));
    }

    #[tokio::test]
    async fn answers_over_the_limit_are_refused_by_length_or_while_reading() {
        let big = format!("{{\"data\":{{\"v\":\"{}\"}}}}", "s3cr3t".repeat(400));
        for chunked in [false, true] {
            let body = big.clone();
            let (addr, _) = serve(move |_| json_answer("200 OK", &body, chunked));
            let err = get(&small_server(&addr, 1000), RequestKind::Read)
                .await
                .unwrap_err();
            let SourceError::TooLarge(message) = &err else {
                panic!("chunked={chunked}: {err:?}");
            };
            assert!(message.contains("1000 bytes"), "{message}");
            assert!(!message.contains("s3cr3t"), "{message}");
            // Under the limit, the same answer is served.
            let body = big.clone();
            let (addr, _) = serve(move |_| json_answer("200 OK", &body, chunked));
            let ok = get(&small_server(&addr, 1 << 20), RequestKind::Read)
                .await
                .unwrap();
            assert_eq!(ok["data"]["v"].as_str().unwrap().len(), 2400);
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (target, target_seen) = serve(|_| json_answer("200 OK", "{}", false));
        let (addr, _) = serve(move |_| {
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/v1/secret/data/app\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
        });
        let err = get(&small_server(&addr, 1000), RequestKind::Read)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("HTTP 307")
                && err.to_string().contains("does not follow redirects"),
            "{err}"
        );
        assert!(target_seen.lock().is_empty());
    }

    #[tokio::test]
    async fn a_login_answer_nobody_waits_for_has_its_token_revoked() {
        let (addr, seen) = serve(|head| {
            if head.contains("/login") {
                std::thread::sleep(Duration::from_millis(300));
                json_answer("200 OK", r#"{"auth":{"client_token":"late-token"}}"#, false)
            } else {
                json_answer("204 No Content", "", false)
            }
        });
        let server = small_server(&addr, 1000);
        let request = Request {
            kind: RequestKind::Login,
            method: Method::POST,
            path: "auth/approle/login",
            body: Some(json!({"role_id": "r"})),
            token: None,
        };
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            server.send(request, &Arc::new(Semaphore::new(1)), &Gauge::default()),
        )
        .await;
        assert!(gave_up.is_err());
        let seen = requests_seen(&seen, 2).await;
        assert!(
            seen[1].contains("/v1/auth/token/revoke-self"),
            "{}",
            seen[1]
        );
        assert!(
            seen[1]
                .to_ascii_lowercase()
                .contains("x-vault-token: late-token"),
            "{}",
            seen[1]
        );
    }

    #[tokio::test]
    async fn a_leased_read_nobody_waits_for_has_its_lease_revoked() {
        let (addr, seen) = serve(|head| {
            if head.starts_with("GET") {
                std::thread::sleep(Duration::from_millis(300));
                json_answer(
                    "200 OK",
                    r#"{"lease_id":"database/creds/app/xyz","lease_duration":60,"data":{}}"#,
                    false,
                )
            } else {
                json_answer("204 No Content", "", false)
            }
        });
        let server = small_server(&addr, 1000);
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), get(&server, RequestKind::Read)).await;
        assert!(gave_up.is_err());
        let seen = requests_seen(&seen, 2).await;
        assert!(
            seen[1].starts_with("PUT /v1/sys/leases/revoke"),
            "{}",
            seen[1]
        );
    }
}
