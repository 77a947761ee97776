//! The Kubernetes side of pod identity, without a cluster: OpenBao's `jwt` and `kubernetes`
//! auth methods set up to accept the service-account tokens of [`super::jwt`], and a
//! [`TokenReviewServer`] standing in for the API server's TokenReview endpoint that the
//! `kubernetes` auth method calls at every login.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::jwt::{unverified_claims, SigningKey, ISSUER};
use super::{require_root, Bao};

/// Whether `text` holds something shaped like a Vault service token (`s.` + 24 characters).
pub fn find_vault_token(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(26)).find_map(|i| {
        let starts_word = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let body = &bytes[i + 2..i + 26];
        let ends_word = bytes.get(i + 26).is_none_or(|c| !c.is_ascii_alphanumeric());
        (starts_word
            && &bytes[i..i + 2] == b"s."
            && ends_word
            && body.iter().all(u8::is_ascii_alphanumeric)
            && body.iter().any(u8::is_ascii_digit)
            && body.iter().any(u8::is_ascii_uppercase))
        .then(|| &text[i..i + 26])
    })
}

/// The accessors of every token the server knows (the root token's among them).
pub fn token_accessors(bao: &Bao) -> std::collections::BTreeSet<String> {
    let resp = bao.api("LIST", "auth/token/accessors", None);
    assert_eq!(resp.status, 200, "list accessors: {}", resp.body);
    resp.json()["data"]["keys"]
        .as_array()
        .expect("accessor list")
        .iter()
        .map(|k| k.as_str().expect("accessor").to_string())
        .collect()
}

/// Enables the `jwt` auth method at `mount`, trusting tokens signed by `key` and issued by
/// [`ISSUER`] (how a cluster's service-account tokens are verified offline).
/// JWT auth at `jwt` trusting a fresh signing key (returned), and a role `app` for the service
/// account `ns/app` that may read `secret/app/*` (data and metadata).
pub fn jwt_app(bao: &Bao) -> SigningKey {
    let key = SigningKey::generate();
    enable_jwt_auth(bao, "jwt", &key);
    bao.put_policy(
        "app",
        r#"path "secret/data/app/*" { capabilities = ["read"] }
path "secret/metadata/app/*" { capabilities = ["read"] }"#,
    );
    jwt_role(bao, "jwt", "app", "ns", "app", &["app"], "1h");
    key
}

/// The cluster most CSI tests start from: a fresh OpenBao (as root, for FUSE) with JWT logins
/// for `ns/app` ([`jwt_app`]) holding `secrets`, each a KV v2 path and its fields. Returns the
/// server and the key that signs the pods' tokens.
pub fn app_cluster(secrets: &[(&str, &[(&str, &str)])]) -> (Bao, SigningKey) {
    require_root();
    let bao = Bao::start();
    let key = jwt_app(&bao);
    for (path, fields) in secrets {
        bao.kv_put(path, fields);
    }
    (bao, key)
}

pub fn enable_jwt_auth(bao: &Bao, mount: &str, key: &SigningKey) {
    bao.api_ok(
        "POST",
        &format!("sys/auth/{mount}"),
        Some(json!({ "type": "jwt" })),
    );
    bao.api_ok(
        "POST",
        &format!("auth/{mount}/config"),
        Some(json!({
            "jwt_validation_pubkeys": [key.public_pem()],
            "bound_issuer": ISSUER,
        })),
    );
}

/// A `jwt` role for the service account `namespace/service_account`, audience `vault`,
/// issuing tokens with `policies` that live `token_ttl` (e.g. `"1h"`, `"5s"`).
pub fn jwt_role(
    bao: &Bao,
    mount: &str,
    role: &str,
    namespace: &str,
    service_account: &str,
    policies: &[&str],
    token_ttl: &str,
) {
    bao.api_ok(
        "POST",
        &format!("auth/{mount}/role/{role}"),
        Some(json!({
            "role_type": "jwt",
            "bound_audiences": ["vault"],
            "user_claim": "sub",
            "bound_subject": format!("system:serviceaccount:{namespace}:{service_account}"),
            "token_policies": policies,
            "token_ttl": token_ttl,
            "token_max_ttl": "24h",
        })),
    );
}

/// Enables the `kubernetes` auth method at `mount`, pointed at `api` (its TokenReview
/// endpoint). `ca_cert` is any PEM certificate: the endpoint is plain HTTP.
pub fn enable_kubernetes_auth(bao: &Bao, mount: &str, api: &TokenReviewServer, ca_cert: &str) {
    bao.api_ok(
        "POST",
        &format!("sys/auth/{mount}"),
        Some(json!({ "type": "kubernetes" })),
    );
    bao.api_ok(
        "POST",
        &format!("auth/{mount}/config"),
        Some(json!({
            "kubernetes_host": api.url(),
            "kubernetes_ca_cert": ca_cert,
            "disable_local_ca_jwt": true,
        })),
    );
}

/// A `kubernetes` role bound to the service account `namespace/service_account`.
pub fn kubernetes_role(
    bao: &Bao,
    mount: &str,
    role: &str,
    namespace: &str,
    service_account: &str,
    policies: &[&str],
    token_ttl: &str,
) {
    bao.api_ok(
        "POST",
        &format!("auth/{mount}/role/{role}"),
        Some(json!({
            "bound_service_account_names": [service_account],
            "bound_service_account_namespaces": [namespace],
            "audience": "vault",
            "token_policies": policies,
            "token_ttl": token_ttl,
            "token_max_ttl": "24h",
        })),
    );
}

/// Logs in at `auth/<mount>/login` with `{role, jwt}` the way a workload would; returns the
/// HTTP status and the response body.
pub fn login(bao: &Bao, mount: &str, role: &str, jwt: &str) -> (u16, Value) {
    let resp = bao.api_as(
        "",
        "POST",
        &format!("auth/{mount}/login"),
        Some(json!({ "role": role, "jwt": jwt })),
    );
    let status = resp.status;
    (status, resp.json())
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    reviews: AtomicUsize,
    reviewed_subjects: Mutex<Vec<String>>,
}

/// A stand-in for the API server's `POST /apis/authentication.k8s.io/v1/tokenreviews` on a
/// loopback port. It authenticates any JWT-shaped token (the signature is the `jwt` auth
/// method's business, not this one's) as the subject its claims name, for the audiences asked
/// for, and counts the reviews it answered.
pub struct TokenReviewServer {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TokenReviewServer {
    pub fn start() -> TokenReviewServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind TokenReview endpoint");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("tokenreview".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if worker.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = serve_one(stream, &worker);
                    }
                }
            })
            .expect("spawn TokenReview thread");
        TokenReviewServer {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `kubernetes_host`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Number of token reviews answered so far.
    pub fn reviews(&self) -> usize {
        self.shared.reviews.load(Ordering::SeqCst)
    }

    /// The subjects (`system:serviceaccount:NS:SA`) of the tokens reviewed, in order.
    pub fn reviewed_subjects(&self) -> Vec<String> {
        self.shared.reviewed_subjects.lock().unwrap().clone()
    }
}

impl Drop for TokenReviewServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;

    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, answer) = if method == "POST"
        && path.split('?').next() == Some("/apis/authentication.k8s.io/v1/tokenreviews")
    {
        let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (201, review_answer(&review, shared))
    } else {
        (
            404,
            json!({ "kind": "Status", "status": "Failure", "code": 404 }),
        )
    };
    let payload = answer.to_string();
    let reason = if status == 201 {
        "Created"
    } else {
        "Not Found"
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )?;
    out.flush()
}

fn review_answer(review: &Value, shared: &Shared) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let claims = unverified_claims(token);
    let status = match claims {
        Some(claims) => {
            let subject = claims["sub"].as_str().unwrap_or_default().to_string();
            let token_audiences: Vec<String> = match &claims["aud"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            let asked: Vec<String> = review["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let audiences: Vec<String> = if asked.is_empty() {
                token_audiences
            } else {
                asked
                    .into_iter()
                    .filter(|a| token_audiences.contains(a))
                    .collect()
            };
            shared.reviews.fetch_add(1, Ordering::SeqCst);
            shared
                .reviewed_subjects
                .lock()
                .unwrap()
                .push(subject.clone());
            let sa_uid = claims["kubernetes.io"]["serviceaccount"]["uid"]
                .as_str()
                .unwrap_or("unknown")
                .to_string();
            json!({
                "authenticated": !audiences.is_empty() && subject.starts_with("system:serviceaccount:"),
                "audiences": audiences,
                "user": {
                    "username": subject,
                    "uid": sa_uid,
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                }
            })
        }
        None => {
            shared.reviews.fetch_add(1, Ordering::SeqCst);
            json!({ "authenticated": false, "error": "token is not a JWT" })
        }
    };
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": { "creationTimestamp": null },
        "spec": review["spec"].clone(),
        "status": status,
    })
}
