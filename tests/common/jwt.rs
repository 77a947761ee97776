//! Kubernetes-shaped service-account tokens for the CSI end-to-end tests.
//!
//! There is no JWT or RSA crate among the test dependencies, so [`SigningKey`] shells out to
//! `openssl`: one 2048-bit RSA key per test (`openssl genrsa`), its public half as PEM for
//! OpenBao's `jwt_validation_pubkeys`, and RS256 signatures with `openssl dgst -sha256 -sign`.
//! [`ServiceAccountToken`] builds the claims kubelet's TokenRequest tokens carry.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tempfile::TempDir;

/// Issuer of the tokens (what a cluster's API server puts in `iss`).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Base64url without padding (RFC 7515 §2).
pub fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(ALPHABET[index as usize] as char);
        }
    }
    out
}

/// Decodes base64url (padding optional); `None` on a character outside the alphabet.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The claims of a compact JWS, without checking the signature; `None` if it is not one.
pub fn unverified_claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    serde_json::from_slice(&base64url_decode(payload)?).ok()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `2026-11-27T01:00:00Z` for a Unix time (kubelet's `expirationTimestamp` format).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn run_openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn openssl {args:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("openssl stdin");
        pipe.write_all(input).expect("write to openssl");
    }
    let out = child.wait_with_output().expect("wait for openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An RSA key pair that signs service-account tokens (the cluster's token signer).
pub struct SigningKey {
    dir: TempDir,
    key_path: PathBuf,
    public_pem: String,
}

impl SigningKey {
    /// Generates a fresh 2048-bit RSA key.
    pub fn generate() -> SigningKey {
        let dir = tempfile::Builder::new()
            .prefix("vaultfs-jwt-")
            .tempdir()
            .expect("create key dir");
        let key_path = dir.path().join("signer.pem");
        let key = key_path.to_str().expect("UTF-8 temp path");
        run_openssl(&["genrsa", "-out", key, "2048"], None);
        let public_pem = String::from_utf8(run_openssl(&["rsa", "-in", key, "-pubout"], None))
            .expect("PEM is text");
        assert!(
            public_pem.contains("BEGIN PUBLIC KEY"),
            "unexpected public key output: {public_pem}"
        );
        SigningKey {
            dir,
            key_path,
            public_pem,
        }
    }

    /// The public key as PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// A self-signed certificate (PEM) made from this key; any certificate will do where a
    /// configuration asks for a CA bundle that is never used to verify anything.
    pub fn self_signed_cert(&self) -> String {
        let cert_path = self.dir.path().join("ca.pem");
        run_openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                self.key_path.to_str().expect("UTF-8 temp path"),
                "-out",
                cert_path.to_str().expect("UTF-8 temp path"),
                "-days",
                "2",
                "-subj",
                "/CN=kubernetes",
            ],
            None,
        );
        fs::read_to_string(&cert_path).expect("read certificate")
    }

    /// A compact RS256 JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": "test" });
        let input = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims.to_string().as_bytes())
        );
        let signature = run_openssl(
            &[
                "dgst",
                "-sha256",
                "-sign",
                self.key_path.to_str().expect("UTF-8 temp path"),
            ],
            Some(input.as_bytes()),
        );
        assert_eq!(signature.len(), 256, "RS256 signature of a 2048-bit key");
        format!("{input}.{}", base64url(&signature))
    }

    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

/// The identity a pod's projected service-account token carries.
#[derive(Debug, Clone)]
pub struct ServiceAccountToken {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub audience: String,
    /// `iat`/`nbf` (Unix seconds).
    pub issued_at: u64,
    /// Lifetime; `exp = issued_at + lifetime_secs`.
    pub lifetime_secs: u64,
}

impl ServiceAccountToken {
    /// A token for pod `pod_name` of service account `namespace/service_account`, audience
    /// `vault`, issued now, valid for an hour.
    pub fn new(namespace: &str, service_account: &str, pod_name: &str, pod_uid: &str) -> Self {
        ServiceAccountToken {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            service_account_uid: format!("sa-uid-{namespace}-{service_account}"),
            pod_name: pod_name.to_string(),
            pod_uid: pod_uid.to_string(),
            audience: "vault".to_string(),
            issued_at: now_secs(),
            lifetime_secs: 3600,
        }
    }

    /// `system:serviceaccount:NS:SA`, the token's subject.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    pub fn expires_at(&self) -> u64 {
        self.issued_at + self.lifetime_secs
    }

    /// The claims as a TokenRequest-issued token has them.
    pub fn claims(&self) -> Value {
        json!({
            "iss": ISSUER,
            "sub": self.subject(),
            "aud": [self.audience],
            "iat": self.issued_at,
            "nbf": self.issued_at,
            "exp": self.expires_at(),
            "kubernetes.io": {
                "namespace": self.namespace,
                "pod": { "name": self.pod_name, "uid": self.pod_uid },
                "serviceaccount": {
                    "name": self.service_account,
                    "uid": self.service_account_uid
                }
            }
        })
    }

    /// The signed token.
    pub fn sign(&self, key: &SigningKey) -> String {
        key.sign(&self.claims())
    }
}
