//! Certificates from Vault's PKI engine: the `<mount>/issue/<role>` request of a certificate
//! entry, its answer made into the four files of the entry (`tls.crt`, `tls.key`, `ca.crt`,
//! `bundle.pem`) as one value, and the lease that value is held under: it ends when the
//! certificate does, cannot be renewed (a new certificate is issued two thirds in), and names
//! the serial to revoke when the entry asks for it. The private key is wiped from the answer
//! once copied into the zeroizing value.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use crate::secret::{wipe_json, SecretData};
use crate::source::{Fetched, Lease, SourceError};
use crate::spec::{CertPart, CertificateRequest};

/// Lease ids of certificates start with this; the rest is `<revoke|keep> <mount> <serial>`.
const LEASE_PREFIX: &str = "certificate:";

/// The body of the issue request.
pub(super) fn issue_body(request: &CertificateRequest) -> Value {
    let mut body = json!({ "common_name": request.common_name });
    if !request.alt_names.is_empty() {
        body["alt_names"] = request.alt_names.join(",").into();
    }
    if !request.ip_sans.is_empty() {
        let ips: Vec<String> = request.ip_sans.iter().map(|ip| ip.to_string()).collect();
        body["ip_sans"] = ips.join(",").into();
    }
    if let Some(ttl) = request.ttl {
        body["ttl"] = format!("{}s", ttl.as_secs()).into();
    }
    if let Some(key_type) = &request.key_type {
        body["key_type"] = key_type.clone().into();
    }
    if let Some(bits) = request.key_bits {
        body["key_bits"] = bits.into();
    }
    body
}

/// The certificate an issue answered, as the entry's files, held under a lease that ends at
/// its expiry.
pub(super) fn issued(
    mut body: Value,
    request: &CertificateRequest,
) -> Result<Fetched, SourceError> {
    let result = files(&body).and_then(|fields| {
        let data = &body["data"];
        let serial = data["serial_number"]
            .as_str()
            .ok_or_else(|| missing("serial_number"))?;
        let expiration = data["expiration"]
            .as_u64()
            .ok_or_else(|| missing("expiration"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if expiration <= now {
            return Err(SourceError::Invalid(format!(
                "{} issued a certificate that has already expired (serial {serial})",
                request.path
            )));
        }
        let mount = mount_of(&request.path);
        let mode = if request.revoke { "revoke" } else { "keep" };
        Ok(Fetched {
            version: None,
            data: SecretData::from_json(fields),
            lease: Some(Lease {
                id: format!("{LEASE_PREFIX}{mode} {mount} {serial}"),
                duration: Duration::from_secs(expiration - now),
                renewable: false,
            }),
        })
    });
    wipe_json(&mut body);
    result
}

/// `tls.crt`, `tls.key`, `ca.crt`, `bundle.pem` from an issue's answer.
fn files(body: &Value) -> Result<Map<String, Value>, SourceError> {
    let data = &body["data"];
    let pem = |field: &str| {
        data[field]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing(field))
    };
    let (certificate, key) = (pem("certificate")?, pem("private_key")?);
    let mut chain: Vec<&str> = data["ca_chain"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if chain.is_empty() {
        chain.push(pem("issuing_ca")?);
    }
    let (top, intermediates) = chain.split_last().expect("one certificate at least");
    let joined = |parts: &[&str]| {
        let mut out = Zeroizing::new(String::with_capacity(
            parts.iter().map(|p| p.len() + 1).sum(),
        ));
        for part in parts {
            out.push_str(part.trim_end());
            out.push('\n');
        }
        out
    };
    let mut leaf_chain = vec![certificate];
    leaf_chain.extend(intermediates);
    let mut bundle = vec![key];
    bundle.extend(&leaf_chain);
    let mut fields = Map::new();
    for (part, text) in [
        (CertPart::Chain, joined(&leaf_chain)),
        (CertPart::Key, joined(&[key])),
        (CertPart::Ca, joined(&[top])),
        (CertPart::Bundle, joined(&bundle)),
    ] {
        // Moved, not copied: the zeroizing buffer is left empty.
        let mut text = text;
        fields.insert(
            part.file_name().to_string(),
            Value::String(std::mem::take(&mut *text)),
        );
    }
    Ok(fields)
}

fn missing(field: &str) -> SourceError {
    SourceError::Invalid(format!(
        "the issue answer has no {field}: is the path a PKI issue endpoint?"
    ))
}

/// The PKI mount of an issue path (`pki` of `pki/issue/web`).
fn mount_of(path: &str) -> &str {
    path.rsplit_once("/issue/").map_or(path, |(mount, _)| mount)
}

/// What revoking a certificate lease means: `None` for a lease that is not a certificate's;
/// `Some(None)` for one kept until it expires; `Some(Some((revoke path, serial)))` for one to
/// revoke.
pub(super) fn revocation(lease: &Lease) -> Option<Option<(String, String)>> {
    let rest = lease.id.strip_prefix(LEASE_PREFIX)?;
    // `<mode> <mount> <serial>`: neither a path nor a serial holds a space.
    let mut parts = rest.splitn(3, ' ');
    let (mode, mount, serial) = (parts.next()?, parts.next()?, parts.next()?);
    Some((mode == "revoke").then(|| (format!("{mount}/revoke"), serial.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(revoke: bool) -> CertificateRequest {
        CertificateRequest {
            path: "pki_int/issue/web".into(),
            common_name: "web.example.com".into(),
            alt_names: vec!["a.example.com".into(), "b.example.com".into()],
            ip_sans: vec!["127.0.0.1".parse().unwrap()],
            ttl: Some(Duration::from_secs(3600)),
            key_type: Some("ec".into()),
            key_bits: Some(256),
            revoke,
        }
    }

    fn answer(expires_in: u64) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        json!({"data": {
            "certificate": "LEAF\n",
            "private_key": "KEY",
            "issuing_ca": "INT",
            "ca_chain": ["INT", "ROOT"],
            "serial_number": "1a:2b:3c",
            "expiration": now + expires_in,
        }})
    }

    #[test]
    fn the_issue_request_names_what_the_entry_declares() {
        let body = issue_body(&request(false));
        assert_eq!(body["common_name"], "web.example.com");
        assert_eq!(body["alt_names"], "a.example.com,b.example.com");
        assert_eq!(body["ip_sans"], "127.0.0.1");
        assert_eq!(body["ttl"], "3600s");
        assert_eq!(body["key_type"], "ec");
        assert_eq!(body["key_bits"], 256);
    }

    #[test]
    fn an_answer_becomes_the_four_files_under_a_lease_ending_at_expiry() {
        let fetched = issued(answer(3600), &request(true)).unwrap();
        let file = |part: CertPart| {
            String::from_utf8(
                fetched
                    .data
                    .render(Some(part.file_name()))
                    .unwrap()
                    .expose()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(file(CertPart::Chain), "LEAF\nINT\n");
        assert_eq!(file(CertPart::Key), "KEY\n");
        assert_eq!(file(CertPart::Ca), "ROOT\n");
        assert_eq!(file(CertPart::Bundle), "KEY\nLEAF\nINT\n");
        let lease = fetched.lease.unwrap();
        assert!(!lease.renewable);
        assert!(
            lease.duration > Duration::from_secs(3590)
                && lease.duration <= Duration::from_secs(3600)
        );
        assert_eq!(
            revocation(&lease),
            Some(Some(("pki_int/revoke".into(), "1a:2b:3c".into())))
        );
        let kept = issued(answer(3600), &request(false))
            .unwrap()
            .lease
            .unwrap();
        assert_eq!(revocation(&kept), Some(None));
        let vault_lease = Lease {
            id: "database/creds/app/abc".into(),
            duration: Duration::from_secs(60),
            renewable: true,
        };
        assert_eq!(revocation(&vault_lease), None);
    }

    #[test]
    fn broken_or_expired_answers_are_refused() {
        let mut no_key = answer(3600);
        no_key["data"]["private_key"] = Value::Null;
        assert!(
            matches!(issued(no_key, &request(false)), Err(SourceError::Invalid(m)) if m.contains("private_key"))
        );
        assert!(
            matches!(issued(answer(0), &request(false)), Err(SourceError::Invalid(m)) if m.contains("expired"))
        );
    }
}
