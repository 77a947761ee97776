//! Log hygiene for a daemon whose log lines carry strings pod authors chose (file names, Vault
//! paths, keys, error texts): text lines escape every control and bidi character in every
//! field, and repeated failures are rate-limited per key with a count of what was left out.
//! Audit events never pass through the limiter. Depends on nothing else in vaultfs.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::Hash;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The field formatter of text logs: `name=value` pairs separated by spaces, the message bare,
/// every value escaped like [`escape`] so that no field can start a new line, move the cursor
/// or reorder what a terminal shows.
pub fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug| {
            let text = format!("{value:?}");
            if field.name() == "message" {
                write!(w, "{}", Escaped(&text))
            } else {
                write!(w, "{}={}", field.name(), Escaped(&text))
            }
        },
    )
    .delimited(" ")
}

/// Control characters and the Unicode format characters that reorder or hide text: bidi
/// embeddings, overrides, isolates and marks, zero-width characters, the BOM, soft hyphen.
/// Never written raw in a log line, and refused in names and keys.
pub fn is_control_or_format(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// `text` with every character [`is_control_or_format`] written as a `\u{..}` escape (`\n`,
/// `\r`, `\t` as themselves escaped).
pub fn escape(text: &str) -> String {
    Escaped(text).to_string()
}

struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if is_control_or_format(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Rate limit of repeated failures: the first failure of a key is logged at once, later ones at
/// most once per `window`, each line carrying how many were left out since the previous one.
/// Holds at most `max_keys` keys; past that, all further keys share one budget, so a caller
/// cannot defeat the limit by varying the key.
pub struct FailureLimiter<K> {
    window: Duration,
    max_keys: usize,
    keys: Mutex<HashMap<Option<K>, Window>>,
}

struct Window {
    logged_at: Instant,
    suppressed: u64,
}

/// The default window: one line per key per 10 s.
pub const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);
const MAX_FAILURE_KEYS: usize = 1024;

impl<K: Hash + Eq> Default for FailureLimiter<K> {
    fn default() -> Self {
        Self::new(FAILURE_LOG_WINDOW, MAX_FAILURE_KEYS)
    }
}

impl<K: Hash + Eq> FailureLimiter<K> {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a failure of `key` is to be logged now; `Some(n)` gives the number of failures
    /// of that key left out since its previous line.
    pub fn admit(&self, key: K) -> Option<u64> {
        self.admit_at(key, Instant::now())
    }

    pub fn admit_at(&self, key: K, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock();
        let mut slot = Some(key);
        if !keys.contains_key(&slot) && keys.len() >= self.max_keys {
            keys.retain(|_, w| now.saturating_duration_since(w.logged_at) < self.window);
            if keys.len() >= self.max_keys {
                slot = None;
            }
        }
        match keys.get_mut(&slot) {
            Some(w) if now.saturating_duration_since(w.logged_at) < self.window => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                w.logged_at = now;
                Some(std::mem::take(&mut w.suppressed))
            }
            None => {
                keys.insert(
                    slot,
                    Window {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_control_and_bidi_characters_are_escaped() {
        assert_eq!(
            escape("db\npass\u{1b}[31m\u{202e}x\u{200b}"),
            "db\\npass\\u{1b}[31m\\u{202e}x\\u{200b}"
        );
        assert_eq!(escape("secret/app/db"), "secret/app/db");
        assert_eq!(
            escape("naïve"),
            "naïve",
            "printable non-ASCII stays readable"
        );
    }

    #[test]
    fn a_repeated_failure_is_logged_once_per_window_with_the_suppressed_count() {
        let limiter = FailureLimiter::new(Duration::from_secs(10), 16);
        let t0 = Instant::now();
        assert_eq!(limiter.admit_at(("vol", 7, 13), t0), Some(0));
        for i in 1..=1000 {
            let at = t0 + Duration::from_millis(i * 9);
            assert_eq!(limiter.admit_at(("vol", 7, 13), at), None);
        }
        assert_eq!(
            limiter.admit_at(("vol", 7, 13), t0 + Duration::from_secs(10)),
            Some(1000)
        );
        assert_eq!(
            limiter.admit_at(("vol", 8, 13), t0),
            Some(0),
            "another file is its own key"
        );
    }

    #[test]
    fn varying_the_key_past_the_bound_shares_one_budget() {
        let limiter = FailureLimiter::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        let logged = (0..10_000u64)
            .filter(|i| limiter.admit_at(*i, t0).is_some())
            .count();
        assert_eq!(logged, 5, "four keys and the shared overflow budget");
    }
}
