//! Small value types shared by the command line and the CSI attributes: durations written
//! `500ms`/`30s`/`5m`/`1h` and octal file modes. No I/O.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid duration {0:?}: expected a number followed by ms, s, m or h (e.g. 500ms, 30s, 5m, 1h)")]
    Duration(String),
    #[error("invalid file mode {0:?}: expected an octal mode such as 0440 (at most 0777)")]
    FileMode(String),
}

/// Parses `500ms`, `30s`, `5m`, `1h` (a bare `0` is also accepted).
pub fn parse_duration(text: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration(text.to_string());
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let per_unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(bad)
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
