//! What a spec may name, checked before anything is built: Vault paths ([`SecretPath`]),
//! the keys of secrets and file names, within the limits that keep a hostile spec cheap.
//! Errors echo what they refuse escaped and cut short, so a message cannot be disguised.

use std::fmt;
use std::sync::Arc;

use super::certificate::CertificateRequest;

use crate::logging::is_control_or_format;

/// A Vault path as users write it for `vault kv get` / `vault read` (no `/data/`), without
/// leading or trailing slashes.
///
/// Each `/`-separated segment may hold only [`PATH_CHARS_ALLOWED`]: ASCII letters, digits and
/// `- _ . + @ = : ,`, which covers paths as people write them for `vault read` (mount names,
/// `read-only` roles, `user@example.com`, `web.example.com`, `key=value`-style names). The path
/// is pasted into the request URL, so anything else could change what that URL means: `%`
/// (percent-encoding tricks such as `%2e%2e` or `%2f`), `\`, `?` (`?list=true` turns a read into
/// a LIST), `#` (a fragment cuts the path short), whitespace, control characters, Unicode bidi
/// and format characters (text that displays differently from what is sent) and any other
/// non-ASCII character. `.` and `..` segments are refused (a proxy or server may resolve them
/// to another path), and so are empty segments (`//`).
///
/// A certificate entry's path (`SecretPath::certificate`) is its issue endpoint followed by
/// `#` and a digest of its request, which no path a user writes can hold, and carries the
/// request; paths are equal, ordered and hashed by their text alone.
#[derive(Clone, Debug)]
pub struct SecretPath(String, Option<Arc<CertificateRequest>>);

impl PartialEq for SecretPath {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for SecretPath {}

impl std::hash::Hash for SecretPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for SecretPath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SecretPath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// The characters a Vault path segment may hold besides ASCII letters and digits; see
/// [`SecretPath`] for why.
pub const PATH_PUNCTUATION_ALLOWED: &str = "-_.+@=:,";

/// How error messages describe the characters a path segment may hold.
pub const PATH_CHARS_ALLOWED: &str = "ASCII letters, digits and - _ . + @ = : ,";

impl SecretPath {
    /// Trims surrounding whitespace and slashes, then checks every segment; see [`SecretPath`].
    /// The error names the first offending character (escaped), its position and segment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let p = text.trim().trim_matches('/');
        if p.is_empty() {
            return Err("the Vault path is empty".into());
        }
        let example = "write it as for `vault read`, e.g. secret/app/db";
        let mut offset = 0;
        for (index, segment) in p.split('/').enumerate() {
            let number = index + 1;
            match segment {
                "" => {
                    return Err(format!(
                    "the Vault path {} has an empty segment (segment {number}, '//'); {example}",
                    shown(p)
                ))
                }
                "." | ".." => {
                    return Err(format!(
                        "the Vault path {} has a {segment:?} segment (segment {number}); \
                         relative segments are not allowed; {example}",
                        shown(p)
                    ))
                }
                _ => {}
            }
            let bad = segment.char_indices().find(|(_, c)| {
                !(c.is_ascii_alphanumeric() || PATH_PUNCTUATION_ALLOWED.contains(*c))
            });
            if let Some((at, c)) = bad {
                let position = p[..offset + at].chars().count() + 1;
                return Err(format!(
                    "the Vault path {} has {} at character {position} (segment {number}, {}); \
                     a path segment may hold only {PATH_CHARS_ALLOWED}",
                    shown(p),
                    describe(c),
                    shown(segment)
                ));
            }
            offset += segment.len() + 1;
        }
        Ok(Self(p.to_string(), None))
    }

    /// The path a certificate `request` is cached, handed over and logged under.
    pub fn certificate(request: CertificateRequest) -> Self {
        let ttl = request
            .ttl
            .map(|t| t.as_secs().to_string())
            .unwrap_or_default();
        let bits = request.key_bits.map(|b| b.to_string()).unwrap_or_default();
        let ips: Vec<String> = request.ip_sans.iter().map(|ip| ip.to_string()).collect();
        let digest = super::stable_digest(&[
            &request.path,
            &request.common_name,
            &request.alt_names.join(","),
            &ips.join(","),
            &ttl,
            request.key_type.as_deref().unwrap_or(""),
            &bits,
            if request.revoke { "revoke" } else { "" },
        ]);
        Self(
            format!("{}#{}", request.path, &digest[..16]),
            Some(Arc::new(request)),
        )
    }

    /// A path as a handed-over record holds it: a user's path, or a certificate's (without
    /// its request, which the volume's spec supplies).
    pub fn recorded(text: &str) -> Result<Self, String> {
        match text.split_once('#') {
            Some((path, digest))
                if !digest.is_empty() && digest.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                let path = Self::parse(path)?;
                Ok(Self(format!("{}#{digest}", path.0), None))
            }
            _ => Self::parse(text),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The certificate this path stands for, if it is a certificate's.
    pub fn certificate_request(&self) -> Option<&Arc<CertificateRequest>> {
        self.1.as_ref()
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest text an error message echoes back; the rest is elided.
const MAX_SHOWN_CHARS: usize = 80;

/// `text` quoted for an error message, with everything but printable ASCII escaped (so a bidi
/// override or a newline cannot disguise the message) and cut to [`MAX_SHOWN_CHARS`].
pub(super) fn shown(text: &str) -> String {
    let mut out = String::from("\"");
    for (i, c) in text.chars().enumerate() {
        if i == MAX_SHOWN_CHARS {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_default());
    }
    out.push('"');
    out
}

/// A character for an error message: `'%'`, or its kind and code point (`U+202E`) for one that
/// is not printable ASCII.
pub(super) fn describe(c: char) -> String {
    match c {
        ' ' => "a space".into(),
        c if c.is_ascii_graphic() => format!("{c:?}"),
        c if is_control_or_format(c) => {
            format!("the control or invisible character U+{:04X}", c as u32)
        }
        c if c.is_whitespace() => format!("the whitespace character U+{:04X}", c as u32),
        c => format!("the non-ASCII character U+{:04X}", c as u32),
    }
}

/// Limits that keep a hostile spec from costing the daemon more than a sane one would.
const MAX_NAME_BYTES: usize = 4096;

/// Longest `key` (field of the secret) an entry may name.
pub const MAX_KEY_BYTES: usize = 256;

const MAX_DEPTH: usize = 32;

/// The `key` (`#KEY` or `key:`) is looked up in the secret's data, never sent to Vault, so any
/// visible text goes; it must be non-empty, short, and free of control and format characters.
pub(super) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key (after '#' or in `key:`) is empty; leave it out to get the whole secret as JSON".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the key is {} bytes, over the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        ));
    }
    if let Some((at, c)) = first_hidden(key) {
        return Err(format!(
            "the key {} has {} at character {}; keys must be visible text",
            shown(key),
            describe(c),
            at + 1
        ));
    }
    Ok(())
}

/// The first control or format character of `text` and its (0-based) character index.
pub(super) fn first_hidden(text: &str) -> Option<(usize, char)> {
    text.chars()
        .enumerate()
        .find(|(_, c)| is_control_or_format(*c))
}

pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the file name is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("the file name is over {MAX_NAME_BYTES} bytes"));
    }
    if name.split('/').count() > MAX_DEPTH {
        return Err(format!(
            "the file name is nested deeper than {MAX_DEPTH} directories"
        ));
    }
    if name.starts_with('/') {
        return Err("the file name is absolute; expected a path relative to the mount".into());
    }
    if let Some((at, c)) = first_hidden(name) {
        return Err(format!(
            "the file name has {} at character {}; names must be visible text",
            describe(c),
            at + 1
        ));
    }
    for segment in name.split('/') {
        match segment {
            "" => return Err("the file name has an empty segment ('//' or a trailing '/')".into()),
            "." | ".." => {
                return Err(format!(
                    "the file name has a {segment:?} segment; names must stay inside the mount"
                ))
            }
            s if s.len() > 255 => return Err("a segment of the file name is over 255 bytes".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::super::{parse_secret_arg, parse_spec_document};
    use super::*;

    fn path_error(path: &str) -> String {
        SecretPath::parse(path).expect_err(path)
    }

    #[test]
    fn vault_paths_as_written_for_vault_read_pass_unchanged() {
        for p in [
            "secret/app/db",
            "database/creds/read-only",
            "kv/team_a/user@example.com",
            "pki/issue/web.example.com",
            "kv/a+b/k=v/x:y,z/...",
        ] {
            assert_eq!(SecretPath::parse(p).unwrap().as_str(), p);
        }
        assert_eq!(
            SecretPath::parse("/secret/app/db/").unwrap().as_str(),
            "secret/app/db"
        );
    }

    #[test]
    fn vault_paths_with_url_changing_characters_are_refused_naming_the_character() {
        let cases = [
            ("secret/%2e%2e/sys", "'%'", 8, 2),
            ("secret/a%2fb", "'%'", 9, 2),
            ("secret\\..\\sys", "'\\\\'", 7, 1),
            ("secret/app?list=true", "'?'", 11, 2),
            ("secret/app#frag", "'#'", 11, 2),
            ("secret/my app", "a space", 10, 2),
            ("secret/a\tb", "U+0009", 9, 2),
            ("secret/a\nb", "U+000A", 9, 2),
            ("secret/a\0b", "U+0000", 9, 2),
            ("secret/\u{202e}bd/x", "U+202E", 8, 2),
            ("secret/a\u{200b}/x", "U+200B", 9, 2),
            ("secret/caf\u{e9}", "non-ASCII character U+00E9", 11, 2),
            ("secret/\u{430}pp", "non-ASCII character U+0430", 8, 2),
        ];
        for (path, what, position, segment) in cases {
            let err = path_error(path);
            assert!(err.contains(what), "{path:?}: {err}");
            assert!(
                err.contains(&format!("at character {position} (segment {segment}")),
                "{path:?}: {err}"
            );
            assert!(err.contains(PATH_CHARS_ALLOWED), "{path:?}: {err}");
            assert!(err.is_ascii(), "the message escapes what it echoes: {err}");
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }

    #[test]
    fn relative_and_empty_vault_path_segments_are_refused() {
        let err = path_error("secret/../sys/seal");
        assert!(err.contains("\"..\" segment (segment 2)"), "{err}");
        let err = path_error("secret/./app");
        assert!(err.contains("\".\" segment (segment 2)"), "{err}");
        let err = path_error("./secret");
        assert!(err.contains("\".\" segment (segment 1)"), "{err}");
        let err = path_error("secret//app");
        assert!(err.contains("empty segment (segment 2"), "{err}");
        assert!(path_error("//").contains("path is empty"));
    }

    #[test]
    fn keys_must_be_short_visible_text() {
        assert_eq!(
            parse_secret_arg("a=secret/a#user name")
                .unwrap()
                .secret()
                .unwrap()
                .1,
            Some("user name")
        );
        let long = format!("a=secret/a#{}", "k".repeat(MAX_KEY_BYTES));
        assert!(parse_secret_arg(&long).is_ok());
        let too_long = format!("a=secret/a#{}", "k".repeat(MAX_KEY_BYTES + 1));
        let err = parse_secret_arg(&too_long).unwrap_err().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("over the limit of 256 bytes"),
            "{err}"
        );
        for (key, what) in [
            ("pass\u{202e}word", "U+202E"),
            ("pass\u{200b}", "U+200B"),
            ("pass\nword", "U+000A"),
            ("pass\0", "U+0000"),
        ] {
            let err = parse_secret_arg(&format!("a=secret/a#{key}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("\"a\"") && err.contains(what),
                "{key:?}: {err}"
            );
            assert!(err.is_ascii(), "{err}");
        }
        let err = parse_spec_document("- name: a\n  path: secret/a\n  key: \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"a\"") && err.contains("key") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn file_names_with_bidi_or_invisible_characters_are_refused() {
        let err = spec(&["gpj.\u{202e}exe=secret/a"]).unwrap_err().to_string();
        assert!(
            err.contains("U+202E") && err.contains("visible text"),
            "{err}"
        );
        let err = spec(&["a\u{200b}=secret/a"]).unwrap_err().to_string();
        assert!(err.contains("U+200B"), "{err}");
    }
}
