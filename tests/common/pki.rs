//! Vault PKI certificates for the end-to-end tiers: [`Pki::enable`] makes a [`Bao`] a small
//! certificate authority (a root at `pki`, an intermediate it signed at `pki_int` that issues
//! through the role `web`, and the policy `pki-web`), with helpers that count the certificates
//! issued (audit log) and list the revoked ones; the `pem_*`, `cert_*` and `key_*` helpers
//! look into PEM text with the `openssl` command-line tool (they write the PEM to a private
//! temporary file; a private key never appears in a panic message).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::bao::Bao;

/// Mount of the root CA.
pub const ROOT_MOUNT: &str = "pki";
/// Mount of the intermediate CA that issues the certificates.
pub const ISSUING_MOUNT: &str = "pki_int";
/// The role certificates are issued through.
pub const ROLE: &str = "web";
/// The policy allowing `<ISSUING_MOUNT>/issue/web` (create, update) and `<ISSUING_MOUNT>/revoke`
/// (update).
pub const POLICY: &str = "pki-web";

/// A CA in a [`Bao`]: a root and the intermediate it signed, which issues through [`ROLE`]
/// (`allowed_domains: example.com`, subdomains, `localhost` and IP SANs allowed, EC P-256
/// keys, `max_ttl: 72h`).
pub struct Pki {
    /// The mount that issues (`pki_int`).
    pub mount: String,
    /// The root certificate (PEM): what `ca.crt` should hold.
    pub root_pem: String,
    /// The intermediate certificate (PEM): what follows the leaf in `tls.crt`.
    pub intermediate_pem: String,
}

impl Pki {
    /// Enables the root and intermediate CAs, the role and the policy in `bao`.
    pub fn enable(bao: &Bao) -> Pki {
        enable_pki_engine(bao, ROOT_MOUNT, "87600h");
        let root = bao.api_ok(
            "POST",
            &format!("{ROOT_MOUNT}/root/generate/internal"),
            Some(json!({ "common_name": "vaultfs test root", "ttl": "87600h" })),
        );
        let root_pem = string_field(&root, "certificate");

        enable_pki_engine(bao, ISSUING_MOUNT, "43800h");
        let csr = bao.api_ok(
            "POST",
            &format!("{ISSUING_MOUNT}/intermediate/generate/internal"),
            Some(json!({ "common_name": "vaultfs test intermediate" })),
        );
        let signed = bao.api_ok(
            "POST",
            &format!("{ROOT_MOUNT}/root/sign-intermediate"),
            Some(json!({
                "csr": string_field(&csr, "csr"),
                "format": "pem",
                "ttl": "43800h",
            })),
        );
        let intermediate_pem = string_field(&signed, "certificate");
        // The intermediate with its root, so that `ca_chain` of every issue ends at the root.
        bao.api_ok(
            "POST",
            &format!("{ISSUING_MOUNT}/intermediate/set-signed"),
            Some(json!({ "certificate": format!("{}\n{}\n", intermediate_pem.trim_end(), root_pem.trim_end()) })),
        );

        bao.api_ok(
            "POST",
            &format!("{ISSUING_MOUNT}/roles/{ROLE}"),
            Some(json!({
                "allowed_domains": ["example.com"],
                "allow_subdomains": true,
                "allow_localhost": true,
                "allow_ip_sans": true,
                "max_ttl": "72h",
                "key_type": "ec",
                "key_bits": 256,
            })),
        );
        bao.put_policy(
            POLICY,
            &format!(
                "path \"{ISSUING_MOUNT}/issue/{ROLE}\" {{ capabilities = [\"create\", \"update\"] }}\n\
                 path \"{ISSUING_MOUNT}/revoke\" {{ capabilities = [\"update\"] }}\n"
            ),
        );
        Pki {
            mount: ISSUING_MOUNT.to_string(),
            root_pem,
            intermediate_pem,
        }
    }

    /// `<mount>/issue/web`: the `path` of a spec entry, and the API path counted by
    /// [`Pki::issues`].
    pub fn issue_path(&self) -> String {
        format!("{}/issue/{ROLE}", self.mount)
    }

    /// Certificates issued so far: `update` requests for [`Pki::issue_path`] in the audit log.
    pub fn issues(&self, bao: &Bao) -> usize {
        self.issue_times(bao).len()
    }

    /// When each issue request reached OpenBao (seconds since the epoch, in log order).
    pub fn issue_times(&self, bao: &Bao) -> Vec<f64> {
        let path = self.issue_path();
        bao.audit_entries()
            .iter()
            .filter(|e| {
                e["type"] == "request"
                    && e["request"]["operation"] == "update"
                    && e["request"]["path"] == path.as_str()
            })
            .map(super::bao::audit_time)
            .collect()
    }

    /// Serials revoked by the issuing CA (`LIST <mount>/certs/revoked`), normalised with
    /// [`normalize_serial`].
    pub fn revoked_serials(&self, bao: &Bao) -> Vec<String> {
        bao.list(&format!("{}/certs/revoked", self.mount))
            .iter()
            .map(|serial| normalize_serial(serial))
            .collect()
    }

    /// Issues a certificate directly through the API with `token` (`body` as for
    /// `POST <mount>/issue/web`); returns the response's `data`.
    pub fn issue_as(&self, bao: &Bao, token: &str, body: Value) -> Value {
        let resp = bao.api_as(token, "POST", &self.issue_path(), Some(body));
        assert_eq!(
            resp.status,
            200,
            "POST {} failed: {}",
            self.issue_path(),
            resp.body
        );
        resp.json()["data"].clone()
    }
}

fn enable_pki_engine(bao: &Bao, mount: &str, max_lease_ttl: &str) {
    bao.api_ok(
        "POST",
        &format!("sys/mounts/{mount}"),
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": max_lease_ttl } })),
    );
}

fn string_field(response: &Value, field: &str) -> String {
    response["data"][field]
        .as_str()
        .unwrap_or_else(|| panic!("no data.{field} in the response"))
        .to_string()
}

/// A serial as hex digits without separators or leading zeros, lower case: Vault writes
/// `3a:5f:...` (or `3a-5f-...` in storage keys), `openssl` `serial=3A5F...`.
pub fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .trim()
        .trim_start_matches("serial=")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_lowercase();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The PEM blocks of `text` (`-----BEGIN ...` to `-----END ...-----`, each ending with a
/// newline), in order.
pub fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END ") {
                blocks.extend(current.take());
            }
        }
    }
    blocks
}

/// The label of a PEM block: `CERTIFICATE`, `EC PRIVATE KEY`, `PRIVATE KEY`...
pub fn pem_label(block: &str) -> &str {
    block
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .unwrap_or("")
}

/// Runs `openssl ARGS` with `pem` in a private temporary file named by `{}` in `args`;
/// returns stdout, or stderr and the exit status (never the input).
fn openssl_on(pem: &str, args: &[&str]) -> Result<String, String> {
    let file = pem_file(pem);
    let path = file.path().to_str().expect("utf-8 path").to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("{}", &path)).collect();
    openssl(&args)
}

/// A private temporary file holding `pem`.
pub fn pem_file(pem: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("vaultfs-pem-")
        .tempfile()
        .expect("create a PEM file");
    file.write_all(pem.as_bytes()).expect("write the PEM file");
    file.flush().expect("flush the PEM file");
    file
}

fn openssl<S: AsRef<str>>(args: &[S]) -> Result<String, String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("openssl")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "openssl {} failed ({}): {}{}",
            args.first().copied().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// The public key (PEM) of the first certificate in `cert_pem`.
pub fn cert_public_key(cert_pem: &str) -> String {
    openssl_on(cert_pem, &["x509", "-noout", "-pubkey", "-in", "{}"])
        .unwrap_or_else(|e| panic!("public key of the certificate: {e}"))
}

/// The public key (PEM) of the private key `key_pem`; `None` when `openssl` cannot read it as
/// a private key (its output is never shown: it could hold the key).
pub fn key_public_key(key_pem: &str) -> Option<String> {
    openssl_on(key_pem, &["pkey", "-pubout", "-in", "{}"]).ok()
}

/// Whether the private key `key_pem` belongs to the (first) certificate of `cert_pem`.
pub fn key_matches_cert(key_pem: &str, cert_pem: &str) -> bool {
    key_public_key(key_pem).is_some_and(|k| k == cert_public_key(cert_pem))
}

/// `openssl pkey -noout -text_pub` of the private key `key_pem`: its algorithm and size (e.g.
/// `Public-Key: (256 bit)`, `ASN1 OID: prime256v1`), without the private part.
pub fn key_description(key_pem: &str) -> String {
    openssl_on(key_pem, &["pkey", "-noout", "-text_pub", "-in", "{}"])
        .unwrap_or_else(|_| panic!("openssl cannot read the private key"))
}

/// `openssl verify -CAfile ca -untrusted chain leaf`: Ok, or openssl's complaint. `chain` is
/// the intermediates (may be empty, or hold the leaf too: untrusted certificates are only
/// candidates).
pub fn verify_chain(ca_pem: &str, chain_pem: &str, leaf_pem: &str) -> Result<(), String> {
    let ca = pem_file(ca_pem);
    let leaf = pem_file(leaf_pem);
    let mut args = vec![
        "verify".to_string(),
        "-CAfile".to_string(),
        ca.path().display().to_string(),
    ];
    let chain = pem_file(chain_pem);
    if !pem_blocks(chain_pem).is_empty() {
        args.push("-untrusted".to_string());
        args.push(chain.path().display().to_string());
    }
    args.push(leaf.path().display().to_string());
    openssl(&args).map(|_| ())
}

/// The subject's common name of the first certificate in `cert_pem`.
pub fn cert_common_name(cert_pem: &str) -> String {
    let out = openssl_on(
        cert_pem,
        &[
            "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", "{}",
        ],
    )
    .unwrap_or_else(|e| panic!("subject of the certificate: {e}"));
    let subject = out.trim().trim_start_matches("subject=");
    subject
        .split(',')
        .find_map(|rdn| rdn.trim().strip_prefix("CN="))
        .unwrap_or_else(|| panic!("no CN in the subject {subject:?}"))
        .to_string()
}

/// The subject alternative names of the first certificate in `cert_pem` as `openssl` prints
/// them (`DNS:web.example.com`, `IP Address:127.0.0.1`), sorted.
pub fn cert_sans(cert_pem: &str) -> Vec<String> {
    let out = openssl_on(
        cert_pem,
        &["x509", "-noout", "-ext", "subjectAltName", "-in", "{}"],
    )
    .unwrap_or_else(|e| panic!("subjectAltName of the certificate: {e}"));
    let mut sans: Vec<String> = out
        .lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    sans.sort();
    sans
}

/// The serial of the first certificate in `cert_pem`, normalised ([`normalize_serial`]).
pub fn cert_serial(cert_pem: &str) -> String {
    let out = openssl_on(cert_pem, &["x509", "-noout", "-serial", "-in", "{}"])
        .unwrap_or_else(|e| panic!("serial of the certificate: {e}"));
    normalize_serial(&out)
}

/// `notAfter` of the first certificate in `cert_pem`, in seconds since the epoch.
pub fn cert_not_after(cert_pem: &str) -> u64 {
    let out = openssl_on(
        cert_pem,
        &[
            "x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in", "{}",
        ],
    )
    .unwrap_or_else(|e| panic!("notAfter of the certificate: {e}"));
    // `notAfter=2026-12-07 03:30:00Z`
    let text = out.trim().trim_start_matches("notAfter=");
    let stamp = text.replacen(' ', "T", 1);
    let entry = json!({ "time": stamp });
    super::bao::audit_time(&entry) as u64
}

/// Whether `a` and `b` hold the same PEM blocks (whitespace at line ends and between blocks
/// aside).
pub fn same_pem(a: &str, b: &str) -> bool {
    pem_blocks(a) == pem_blocks(b)
}
