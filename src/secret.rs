//! Secret-bearing byte and token types: redacted `Debug`, no `Display`/`Serialize`, zeroized on
//! drop. Everything that holds a secret value or a Vault token uses these types.

use std::collections::BTreeMap;
use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Bytes of a secret value. Zeroized when dropped; `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// A Vault token or a login credential (JWT, AppRole secret id). Zeroized on drop; `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Zeroizing<String>);

impl Token {
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The data of one Vault secret, pre-rendered into the bytes files are served from: the whole
/// object as compact JSON (files without `key`) and each field's raw value (files with `key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretData {
    json: SecretBytes,
    fields: BTreeMap<String, SecretBytes>,
}

impl AsRef<SecretData> for SecretData {
    fn as_ref(&self) -> &SecretData {
        self
    }
}

impl SecretData {
    /// Renders a Vault `data` object, then wipes the strings of the parsed JSON it consumed.
    pub fn from_json(mut data: serde_json::Map<String, serde_json::Value>) -> Self {
        let json = SecretBytes::new(to_vec_exact(&data));
        let fields = data
            .iter()
            .map(|(k, v)| {
                let raw = match v {
                    serde_json::Value::String(s) => s.as_bytes().to_vec(),
                    other => to_vec_exact(other),
                };
                (k.clone(), SecretBytes::new(raw))
            })
            .collect();
        for value in data.values_mut() {
            wipe_json(value);
        }
        Self { json, fields }
    }

    /// Builds secret data from string fields (tests, mocks).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let map = pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        Self::from_json(map)
    }

    /// The file content for `key` (`None`: the whole object as JSON). `None` when the secret
    /// has no such field.
    pub fn render(&self, key: Option<&str>) -> Option<&SecretBytes> {
        match key {
            None => Some(&self.json),
            Some(k) => self.fields.get(k),
        }
    }

    /// Each field's value as text (fields that are not valid UTF-8 are left out).
    pub fn field_values(&self) -> impl Iterator<Item = &str> {
        self.fields
            .values()
            .filter_map(|v| std::str::from_utf8(v.expose()).ok())
    }

    /// Bytes held in memory for this secret (for the cache's byte bound).
    pub fn weight(&self) -> usize {
        self.json.len()
            + self
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Serializes `value` into a buffer of exactly the right size, so that no grown-and-freed
/// intermediate buffer is left holding secret bytes.
pub(crate) fn to_vec_exact(value: &impl serde::Serialize) -> Vec<u8> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("JSON values always serialize");
    let mut out = Vec::with_capacity(count.0);
    serde_json::to_writer(&mut out, value).expect("JSON values always serialize");
    out
}

/// Overwrites every string inside a parsed JSON value before it is freed.
pub fn wipe_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(wipe_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_the_value() {
        let bytes = SecretBytes::new(b"hunter2-value".to_vec());
        let token = Token::new("s.tokenvalue".to_string());
        let data = SecretData::from_pairs([("password", "hunter2-value")]);
        let printed = format!("{bytes:?} {token:?} {data:?} {data:#?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("tokenvalue"), "{printed}");
        assert!(printed.contains("13 bytes redacted"));
    }

    #[test]
    fn key_renders_raw_field_and_no_key_renders_json_object() {
        let mut map = serde_json::Map::new();
        map.insert("user".into(), "app".into());
        map.insert("port".into(), 5432.into());
        let data = SecretData::from_json(map);
        assert_eq!(data.render(Some("user")).unwrap().expose(), b"app");
        assert_eq!(data.render(Some("port")).unwrap().expose(), b"5432");
        assert!(data.render(Some("missing")).is_none());
        let json: serde_json::Value =
            serde_json::from_slice(data.render(None).unwrap().expose()).unwrap();
        assert_eq!(json, serde_json::json!({"user": "app", "port": 5432}));
    }

    #[test]
    fn wipe_json_clears_nested_strings() {
        let mut v = serde_json::json!({"a": ["xyz", {"b": "pqr"}]});
        wipe_json(&mut v);
        assert_eq!(v, serde_json::json!({"a": ["", {"b": ""}]}));
    }
}
