//! Small value types shared by the command line and the CSI attributes: durations written
//! `500ms`/`30s`/`5m`/`1h` and octal file modes, and the volume and cache defaults both use,
//! each written once here. No I/O.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid duration {0:?}: expected a number followed by ms, s, m or h (e.g. 500ms, 30s, 5m, 1h)")]
    Duration(String),
    #[error("invalid file mode {0:?}: expected an octal mode such as 0440 (at most 0777)")]
    FileMode(String),
}

/// A default duration written once: the text `--help` shows (`default_value = X.text`) and
/// the value code uses (`X.value`), read from the text at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationDefault {
    pub text: &'static str,
    pub value: Duration,
}

impl DurationDefault {
    const fn new(text: &'static str) -> Self {
        match duration_ms(text.as_bytes()) {
            Some(ms) => Self {
                text,
                value: Duration::from_millis(ms),
            },
            None => panic!("a default duration is written as parse_duration reads it"),
        }
    }
}

/// How long a fetched secret is served before Vault is asked again: `vaultfs mount
/// --cache-ttl`, and a CSI volume's `cacheTTL` when it sets none.
pub const DEFAULT_CACHE_TTL: DurationDefault = DurationDefault::new("30s");
/// How long after its last successful check a cached secret may be served while Vault is
/// unreachable: `vaultfs mount --max-stale`, and every CSI volume's.
pub const DEFAULT_MAX_STALE: DurationDefault = DurationDefault::new("5m");
/// The longest an access waits for Vault before failing or serving stale data, and the bound
/// on each HTTP request to Vault (`--vault-timeout`).
pub const DEFAULT_VAULT_TIMEOUT: DurationDefault = DurationDefault::new("5s");
/// The shortest `cacheTTL` a CSI volume may ask for (`vaultfs csi --min-cache-ttl`).
pub const DEFAULT_MIN_CACHE_TTL: DurationDefault = DurationDefault::new("5s");
/// Most secrets, and secret bytes, a `vaultfs mount` holds (`--cache-max-entries`,
/// `--cache-max-bytes`).
pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 1024;
pub const DEFAULT_CACHE_MAX_BYTES: usize = 16 << 20;
/// Most secrets, and secret bytes, each CSI volume holds (`vaultfs csi --cache-max-entries`,
/// `--cache-max-bytes`).
pub const DEFAULT_CSI_CACHE_MAX_ENTRIES: usize = 256;
pub const DEFAULT_CSI_CACHE_MAX_BYTES: usize = 1 << 20;

/// Parses `500ms`, `30s`, `5m`, `1h` (a bare `0` is also accepted).
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    duration_ms(text.trim().as_bytes())
        .map(Duration::from_millis)
        .ok_or_else(|| ConfigError::Duration(text.to_string()))
}

/// The milliseconds of a trimmed duration text (see [`parse_duration`]); `None` when it is
/// malformed or too large. A `const fn`, so that defaults are read from their text at compile
/// time by the same rules as the command line.
const fn duration_ms(text: &[u8]) -> Option<u64> {
    if let [b'0'] = text {
        return Some(0);
    }
    let mut n: u64 = 0;
    let mut digits = 0;
    while digits < text.len() && text[digits].is_ascii_digit() {
        let digit = (text[digits] - b'0') as u64;
        n = match n.checked_mul(10) {
            Some(tens) => match tens.checked_add(digit) {
                Some(n) => n,
                None => return None,
            },
            None => return None,
        };
        digits += 1;
    }
    if digits == 0 {
        return None;
    }
    let per_unit_ms = match text.split_at(digits).1 {
        b"ms" => 1,
        b"s" => 1_000,
        b"m" => 60_000,
        b"h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(per_unit_ms)
}

/// Writes a duration the way `parse_duration` reads it (`500ms`, `30s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses an octal permission mode such as `0440` or `440`.
pub fn parse_file_mode(text: &str) -> Result<u16, ConfigError> {
    let bad = || ConfigError::FileMode(text.to_string());
    let t = text.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    let mode = u16::from_str_radix(t, 8).map_err(|_| bad())?;
    if mode > 0o777 {
        return Err(bad());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_each_unit_and_reject_garbage() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "10", "10d", "-1s", "1.5s", "ms"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(
                err.to_string().contains("expected a number"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn defaults_hold_the_value_their_text_says() {
        for d in [DEFAULT_CACHE_TTL, DEFAULT_MAX_STALE, DEFAULT_MIN_CACHE_TTL] {
            assert_eq!(parse_duration(d.text), Ok(d.value), "{}", d.text);
        }
        assert_eq!(DEFAULT_CACHE_TTL.value, Duration::from_secs(30));
        assert_eq!(DEFAULT_MAX_STALE.value, Duration::from_secs(300));
        assert_eq!(DEFAULT_MIN_CACHE_TTL.value, Duration::from_secs(5));
        assert_eq!(DEFAULT_VAULT_TIMEOUT.value, Duration::from_secs(5));
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Err(ConfigError::Duration("18446744073709551615s".into())),
            "too large"
        );
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn formatted_durations_parse_back() {
        for d in [0, 500, 5_000, 90_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
    }

    #[test]
    fn file_modes_are_octal() {
        assert_eq!(parse_file_mode("0440"), Ok(0o440));
        assert_eq!(parse_file_mode("600"), Ok(0o600));
        assert!(parse_file_mode("0999").is_err());
        assert!(parse_file_mode("01777").is_err());
    }
}
