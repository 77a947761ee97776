//! Certificate entries (`pki:`): what a volume asks Vault's PKI engine to issue
//! (`<mount>/issue/<role>` with names, TTL and key), checked when the spec is read, with the
//! pod's names put in under CSI (`{{ pod.name }}`, `{{ pod.namespace }}`,
//! `{{ pod.serviceAccount }}`); and the four files such an entry is: `tls.crt`, `tls.key`,
//! `ca.crt`, `bundle.pem`.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::checks::SecretPath;

/// The names of a pod, as kubelet reports them, for a certificate's names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNames {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// One certificate as a volume asks for it (names only, nothing secret).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateRequest {
    /// `<mount>/issue/<role>`.
    pub path: String,
    pub common_name: String,
    pub alt_names: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub ttl: Option<Duration>,
    pub key_type: Option<String>,
    pub key_bits: Option<u32>,
    /// Revoke the certificate's serial when the volume goes.
    pub revoke: bool,
}

/// A file of a certificate entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertPart {
    /// `tls.crt`: the certificate, then the intermediates.
    Chain,
    /// `tls.key`: the private key.
    Key,
    /// `ca.crt`: the top of the chain Vault returned.
    Ca,
    /// `bundle.pem`: key, certificate and intermediates in one file.
    Bundle,
}

impl CertPart {
    pub const ALL: [CertPart; 4] = [
        CertPart::Chain,
        CertPart::Key,
        CertPart::Ca,
        CertPart::Bundle,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            CertPart::Chain => "tls.crt",
            CertPart::Key => "tls.key",
            CertPart::Ca => "ca.crt",
            CertPart::Bundle => "bundle.pem",
        }
    }
}

/// The `pki:` mapping of an entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PkiDocument {
    path: Option<String>,
    common_name: Option<String>,
    #[serde(default)]
    alt_names: Vec<String>,
    #[serde(default)]
    ip_sans: Vec<String>,
    ttl: Option<String>,
    key_type: Option<String>,
    key_bits: Option<u32>,
    #[serde(default)]
    revoke: bool,
}

/// Longest DNS name accepted in `commonName` or `altNames` (after the pod's names are put in).
const MAX_NAME_BYTES: usize = 253;
/// Most `altNames` plus `ipSans`.
const MAX_SANS: usize = 100;
/// The placeholders a name may use under CSI.
const PLACEHOLDERS: [&str; 3] = ["pod.name", "pod.namespace", "pod.serviceAccount"];

impl PkiDocument {
    /// The request, checked, with `pod`'s names put in (`None`: outside CSI, where a
    /// placeholder is an error). Errors name the field.
    pub(super) fn request(self, pod: Option<&PodNames>) -> Result<CertificateRequest, String> {
        let path = self
            .path
            .ok_or("pki.path is missing: the issue endpoint, e.g. pki/issue/web")?;
        let parsed = SecretPath::parse(&path).map_err(|e| format!("pki.path: {e}"))?;
        let segments: Vec<&str> = parsed.as_str().split('/').collect();
        if segments.len() < 3
            || segments[segments.len() - 2] != "issue"
            || segments.contains(&"issuer")
        {
            return Err(format!(
                "pki.path {:?} is not an issue endpoint: expected <mount>/issue/<role>, e.g. pki/issue/web (issuer-specific endpoints are not supported: set the role's issuer_ref)",
                parsed.as_str()
            ));
        }
        let common_name = self.common_name.ok_or(
            "pki.commonName is missing: the certificate's common name, e.g. web.example.com",
        )?;
        let common_name = name("pki.commonName", &common_name, pod)?;
        let alt_names = self
            .alt_names
            .iter()
            .map(|n| name("pki.altNames", n, pod))
            .collect::<Result<Vec<_>, _>>()?;
        let ip_sans = self
            .ip_sans
            .iter()
            .map(|ip| {
                ip.trim().parse::<IpAddr>().map_err(|_| {
                    format!("pki.ipSans: {ip:?} is not an IP address, e.g. 10.0.0.1 or ::1")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if alt_names.len() + ip_sans.len() > MAX_SANS {
            return Err(format!(
                "pki.altNames and pki.ipSans hold {} names; at most {MAX_SANS} are allowed",
                alt_names.len() + ip_sans.len()
            ));
        }
        let ttl = match self.ttl {
            Some(text) => {
                let ttl =
                    crate::config::parse_duration(&text).map_err(|e| format!("pki.ttl: {e}"))?;
                if ttl < Duration::from_secs(10) {
                    return Err(format!(
                        "pki.ttl {text:?} is shorter than 10s: a certificate is renewed two thirds into its lifetime"
                    ));
                }
                Some(ttl)
            }
            None => None,
        };
        let key_type = match self.key_type.as_deref() {
            None => None,
            Some(t @ ("rsa" | "ec" | "ed25519")) => Some(t.to_string()),
            Some(other) => {
                return Err(format!(
                    "pki.keyType {other:?} is not one of rsa, ec, ed25519"
                ))
            }
        };
        if let Some(bits) = self.key_bits {
            let allowed: &[u32] = match key_type.as_deref() {
                Some("rsa") => &[2048, 3072, 4096],
                Some("ec") => &[224, 256, 384, 521],
                Some(_) => &[0],
                None => &[224, 256, 384, 521, 2048, 3072, 4096],
            };
            if !allowed.contains(&bits) {
                return Err(format!(
                    "pki.keyBits {bits} does not go with keyType {}: expected one of {allowed:?}",
                    key_type.as_deref().unwrap_or("(the role's)")
                ));
            }
        }
        Ok(CertificateRequest {
            path: parsed.as_str().to_string(),
            common_name,
            alt_names,
            ip_sans,
            ttl,
            key_type,
            key_bits: self.key_bits,
            revoke: self.revoke,
        })
    }
}

/// A certificate name as written, with the pod's names put in, checked as a DNS name (a
/// leading `*.` is allowed; Vault's role decides what may be issued).
fn name(field: &str, text: &str, pod: Option<&PodNames>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text.trim();
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("{field}: {text:?} opens `{{{{` without closing it"))?;
        let placeholder = after[..close].trim();
        let Some(pod) = pod else {
            return Err(format!(
                "{field}: {text:?} uses {{{{ {placeholder} }}}}, which only a CSI volume has (the pod's names)"
            ));
        };
        let value = match placeholder {
            "pod.name" => &pod.name,
            "pod.namespace" => &pod.namespace,
            "pod.serviceAccount" => &pod.service_account,
            other => {
                return Err(format!(
                    "{field}: unknown placeholder {{{{ {other} }}}}; expected one of {}",
                    PLACEHOLDERS.map(|p| format!("{{{{ {p} }}}}")).join(", ")
                ))
            }
        };
        if value.is_empty() {
            return Err(format!(
                "{field}: {text:?} uses {{{{ {placeholder} }}}}, but kubelet did not say it (the CSIDriver needs podInfoOnMount: true)"
            ));
        }
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    let bare = out.strip_prefix("*.").unwrap_or(&out);
    let valid = !bare.is_empty()
        && out.len() <= MAX_NAME_BYTES
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!(
            "{field}: {out:?} is not a DNS name (letters, digits, '-' and '_' in dot-separated labels, at most {MAX_NAME_BYTES} bytes; a leading '*.' is allowed)"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(yaml: &str) -> PkiDocument {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn pod() -> PodNames {
        PodNames {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    #[test]
    fn a_full_request_is_read_and_the_pods_names_put_in() {
        let request = document(
            "path: pki/issue/web\ncommonName: '{{ pod.name }}.{{pod.namespace}}.svc'\naltNames: [web.example.com]\nipSans: [127.0.0.1]\nttl: 24h\nkeyType: ec\nkeyBits: 256\nrevoke: true\n",
        )
        .request(Some(&pod()))
        .unwrap();
        assert_eq!(request.path, "pki/issue/web");
        assert_eq!(request.common_name, "web-0.shop.svc");
        assert_eq!(request.alt_names, vec!["web.example.com"]);
        assert_eq!(
            request.ip_sans,
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(request.ttl, Some(Duration::from_secs(24 * 3600)));
        assert!(request.revoke);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            ("commonName: a.example.com\n", "pki.path is missing"),
            (
                "path: pki/read/web\ncommonName: a.example.com\n",
                "not an issue endpoint",
            ),
            ("path: pki/issue/web\n", "pki.commonName is missing"),
            ("path: pki/issue/web\ncommonName: 'a b'\n", "pki.commonName"),
            (
                "path: pki/issue/web\ncommonName: a.example.com\nipSans: [nope]\n",
                "pki.ipSans",
            ),
            (
                "path: pki/issue/web\ncommonName: a.example.com\nttl: 2s\n",
                "pki.ttl",
            ),
            (
                "path: pki/issue/web\ncommonName: a.example.com\nkeyType: dsa\n",
                "pki.keyType",
            ),
            (
                "path: pki/issue/web\ncommonName: a.example.com\nkeyType: ec\nkeyBits: 2048\n",
                "pki.keyBits",
            ),
            (
                "path: pki/issue/web\ncommonName: '{{ pod.uid }}.example.com'\n",
                "unknown placeholder",
            ),
        ];
        for (yaml, expected) in cases {
            let err = document(yaml).request(Some(&pod())).unwrap_err();
            assert!(err.contains(expected), "{yaml:?}: {err}");
        }
        let err = document("path: pki/issue/web\ncommonName: '{{ pod.name }}.example.com'\n")
            .request(None)
            .unwrap_err();
        assert!(err.contains("only a CSI volume has"), "{err}");
    }
}
