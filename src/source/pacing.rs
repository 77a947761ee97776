//! Pacing of what is asked of a secret store: renewal of Vault tokens and leases (when to
//! renew, when to stop renewing and replace: log in again, read new credentials, and the floor
//! that keeps short TTLs from turning into a renewal storm), and the defaults of how long an
//! access waits for the store and how it backs off after failures, written once here. Pure
//! functions of durations: no clock, no I/O, no Vault.

use std::time::Duration;

/// After the store was unavailable, how long to answer from the last outcome before asking
/// again, at most (a shorter cache TTL shortens it); doubles with each consecutive failure.
pub const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// The most the back-off after consecutive failures grows to.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// Never renew more often than this.
///
/// Vault answers TTLs in whole seconds, so below a few seconds "two thirds into the TTL"
/// degenerates (a 1 s TTL renews at 0 s: back-to-back requests). Three seconds keeps a renewal
/// at most every 3 s per token or lease (1,000 volumes: ≤ 333 renewals/s even with absurd
/// TTLs), and still leaves a full second of margin before expiry for a TTL as short as 4.5 s.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(3);

/// Shortest and longest lead taken before an expiry to replace what cannot be renewed.
const MIN_LEAD: Duration = Duration::from_secs(1);
const MAX_LEAD: Duration = Duration::from_secs(30);

/// What to do next with a token or lease Vault just granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Never expires: nothing to do.
    Keep,
    /// Renew after this long.
    RenewIn(Duration),
    /// Vault will not extend it (its max TTL is reached, or renewing it is refused or not
    /// offered): stop renewing and replace it after this long, before it expires.
    ReplaceIn(Duration),
    /// Too short-lived to renew at a sane pace (its full TTL is under 1.5 ×
    /// [`MIN_RENEW_INTERVAL`]): let it run out; whoever needs it next replaces it.
    Lapse,
}

/// Plans the next step for a token or lease Vault has just granted for `granted` (from now).
///
/// `full` is what a fresh one gets (a login's TTL, a lease's original duration): an answer
/// shorter than that means Vault capped it at its max TTL (or shortened its TTL), and renewing
/// again would only bring ever shorter answers. `renewable` is Vault's `renewable` flag.
pub fn plan(granted: Duration, full: Duration, renewable: bool) -> Plan {
    if granted.is_zero() {
        return Plan::Keep;
    }
    if full.max(granted) * 2 / 3 < MIN_RENEW_INTERVAL {
        return Plan::Lapse;
    }
    let capped = granted < full;
    if !renewable || capped {
        return Plan::ReplaceIn(granted.saturating_sub(replace_lead(full)));
    }
    Plan::RenewIn((granted * 2 / 3).max(MIN_RENEW_INTERVAL))
}

/// How long before its expiry a token or lease that cannot be renewed is replaced: a tenth of
/// its full TTL, between 1 s and 30 s (a login takes milliseconds; the lead only has to cover a
/// slow or briefly failing Vault).
pub fn replace_lead(full: Duration) -> Duration {
    (full / 10).clamp(MIN_LEAD, MAX_LEAD)
}

/// When to try again after a renewal failed with a transient error: doubling from `first` with
/// each consecutive failure, never sooner than [`MIN_RENEW_INTERVAL`], never later than
/// `cap`.
pub fn retry_in(first: Duration, failures: u32, cap: Duration) -> Duration {
    let doubled = first.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled
        .max(MIN_RENEW_INTERVAL)
        .min(cap.max(MIN_RENEW_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_one_second_ttl_is_never_renewed() {
        assert_eq!(plan(s(1), s(1), true), Plan::Lapse);
        assert_eq!(plan(s(4), s(4), true), Plan::Lapse);
    }

    #[test]
    fn a_six_second_ttl_is_renewed_every_four_seconds() {
        assert_eq!(plan(s(6), s(6), true), Plan::RenewIn(s(4)));
    }

    #[test]
    fn an_hour_ttl_is_renewed_two_thirds_in() {
        assert_eq!(plan(s(3600), s(3600), true), Plan::RenewIn(s(2400)));
    }

    #[test]
    fn renewals_never_come_sooner_than_the_floor() {
        for ttl in [5, 6, 7, 10, 60, 3600] {
            for granted in 1..=ttl {
                if let Plan::RenewIn(after) = plan(s(granted), s(ttl), true) {
                    assert!(after >= MIN_RENEW_INTERVAL, "ttl {ttl}, granted {granted}");
                    assert!(
                        after + MIN_LEAD <= s(granted),
                        "renewing after {after:?} leaves no margin in a {granted} s grant"
                    );
                }
            }
        }
    }

    #[test]
    fn an_answer_capped_by_the_max_ttl_stops_renewal_and_replaces_shortly_before_expiry() {
        // Max TTL 20 s, renewed at 16 s: Vault grants only the 4 s left.
        assert_eq!(plan(s(4), s(6), true), Plan::ReplaceIn(s(3)));
        // The last second: replace at once.
        assert_eq!(plan(s(1), s(6), true), Plan::ReplaceIn(s(0)));
        // An hour-long token with ten minutes left: replace 30 s before the end.
        assert_eq!(plan(s(600), s(3600), true), Plan::ReplaceIn(s(570)));
    }

    #[test]
    fn vault_shortening_the_ttl_is_treated_like_a_cap() {
        // The role's TTL went from 60 s to 10 s: one replacement, which then renews at the new pace.
        assert_eq!(plan(s(10), s(60), true), Plan::ReplaceIn(s(4)));
        assert_eq!(plan(s(10), s(10), true), Plan::RenewIn(s(20) / 3));
    }

    #[test]
    fn non_renewable_grants_are_replaced_and_non_expiring_ones_kept() {
        assert_eq!(plan(s(60), s(60), false), Plan::ReplaceIn(s(54)));
        assert_eq!(plan(s(0), s(0), true), Plan::Keep);
    }

    /// What a token renewer paced by `plan` sent to a simulated Vault over `horizon`.
    struct Trace {
        renewals: Vec<Duration>,
        logins: Vec<Duration>,
    }

    impl Trace {
        fn busiest_second(&self) -> usize {
            let t = &self.renewals;
            (0..t.len())
                .map(|i| t[i..].iter().take_while(|x| **x - t[i] < s(1)).count())
                .max()
                .unwrap_or(0)
        }
    }

    /// Drives `plan` the way `vault::auth`'s renewer does, against a Vault that grants
    /// `ttl_at(now)` whole seconds per login or renewal, capped at `max_ttl` after the login. A
    /// reader needs a valid token at all times, so a lapsed token is replaced the moment it
    /// expires (the lazy login of the next use).
    fn simulate(ttl_at: impl Fn(Duration) -> u64, max_ttl: u64, horizon: Duration) -> Trace {
        let mut trace = Trace {
            renewals: Vec::new(),
            logins: vec![Duration::ZERO],
        };
        let (mut now, mut issued) = (Duration::ZERO, Duration::ZERO);
        let mut full = s(ttl_at(now).min(max_ttl));
        let mut granted = full;
        loop {
            let (after, renew) = match plan(granted, full, true) {
                Plan::RenewIn(after) => (after, true),
                Plan::ReplaceIn(after) => (after, false),
                Plan::Lapse => (granted, false),
                Plan::Keep => return trace,
            };
            now += after;
            if now >= horizon {
                return trace;
            }
            if renew {
                trace.renewals.push(now);
                let left = (issued + s(max_ttl)).saturating_sub(now).as_secs();
                granted = s(ttl_at(now).min(left));
            } else {
                trace.logins.push(now);
                issued = now;
                full = s(ttl_at(now).min(max_ttl));
                granted = full;
            }
        }
    }

    #[test]
    fn a_six_second_token_with_a_twenty_second_max_ttl_renews_calmly_and_logs_in_once_per_period() {
        let trace = simulate(|_| 6, 20, s(45));
        assert!(trace.renewals.len() <= 45 / 2, "{:?}", trace.renewals);
        assert!(trace.busiest_second() <= 1, "{:?}", trace.renewals);
        assert_eq!(trace.logins, vec![s(0), s(19), s(38)]);
    }

    #[test]
    fn a_one_second_token_is_never_renewed_only_replaced_when_it_runs_out() {
        let trace = simulate(|_| 1, 20, s(45));
        assert!(trace.renewals.is_empty(), "{:?}", trace.renewals);
        assert_eq!(
            trace.logins.len(),
            45,
            "one login per TTL, as a reader forces"
        );
    }

    #[test]
    fn an_hour_token_is_renewed_every_forty_minutes() {
        let trace = simulate(|_| 3600, 24 * 3600, s(3 * 3600));
        assert_eq!(trace.renewals, vec![s(2400), s(4800), s(7200), s(9600)]);
        assert_eq!(trace.logins, vec![s(0)]);
    }

    #[test]
    fn a_shortened_ttl_costs_one_login_then_renews_at_the_new_pace() {
        // The role's TTL drops from 60 s to 10 s at t = 100 s.
        let trace = simulate(|now| if now < s(100) { 60 } else { 10 }, 3600, s(200));
        assert_eq!(trace.logins.len(), 2, "{:?}", trace.logins);
        let late: Vec<_> = trace.renewals.iter().filter(|t| **t > s(110)).collect();
        assert!(
            late.windows(2).all(|w| *w[1] - *w[0] >= MIN_RENEW_INTERVAL),
            "{late:?}"
        );
        assert!(late.len() <= 90 / 6, "{late:?}");
    }

    #[test]
    fn retries_back_off_within_the_floor_and_the_cap() {
        let first = s(1);
        assert_eq!(retry_in(first, 1, s(300)), MIN_RENEW_INTERVAL);
        assert_eq!(retry_in(first, 3, s(300)), s(4));
        assert_eq!(retry_in(first, 40, s(300)), s(300));
        assert_eq!(retry_in(first, 5, s(2)), MIN_RENEW_INTERVAL);
    }
}
