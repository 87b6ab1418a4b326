//! Abuse rules as pure functions of counts and `now`: sliding-window limits,
//! the SMS-pumping guard's decision, spend budgets, and the keys they count
//! under. The service feeds them counts from the store.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

pub const MINUTE: u32 = 60;
pub const TEN_MINUTES: u32 = 600;
pub const HOUR: u32 = 3_600;
pub const DAY: u32 = 86_400;

/// Every limit a request can run into, named as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    NumberTenMinutes,
    NumberDay,
    IpTenMinutes,
    TenantMinute,
    WrongGuessesHour,
    DailySpend,
}

impl Limit {
    /// The `limit` field of a 429 `rate_limited` answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::NumberTenMinutes => "number_10min",
            Limit::NumberDay => "number_day",
            Limit::IpTenMinutes => "ip_10min",
            Limit::TenantMinute => "tenant_minute",
            Limit::WrongGuessesHour => "wrong_guesses_hour",
            Limit::DailySpend => "daily_spend",
        }
    }

    pub fn window_seconds(self) -> u32 {
        match self {
            Limit::NumberTenMinutes | Limit::IpTenMinutes => TEN_MINUTES,
            Limit::NumberDay | Limit::DailySpend => DAY,
            Limit::TenantMinute => MINUTE,
            Limit::WrongGuessesHour => HOUR,
        }
    }
}

/// Events counted in the previous and the current fixed window (`floor(unix
/// seconds / window)`, as the store counts them). Together they give a sliding
/// window: the previous window's count is weighted by how much of it still
/// overlaps the last `window` seconds. This is the approximation Cloudflare and
/// nginx use; unlike a bare fixed window it allows no double burst across a
/// window boundary, and it needs only two shared counters per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    pub previous: u64,
    pub current: u64,
}

/// (window length, time elapsed in the current window), both in milliseconds.
fn window_position(window_seconds: u32, now: DateTime<Utc>) -> (i128, i128) {
    let window = i64::from(window_seconds.max(1));
    let start_ms = now.timestamp().div_euclid(window) * window * 1000;
    (
        i128::from(window) * 1000,
        i128::from(now.timestamp_millis() - start_ms),
    )
}

impl WindowCounts {
    /// Estimated events in the `window_seconds` before `now`.
    pub fn estimate(&self, window_seconds: u32, now: DateTime<Utc>) -> f64 {
        let (window, elapsed) = window_position(window_seconds, now);
        let scaled =
            i128::from(self.previous) * (window - elapsed) + i128::from(self.current) * window;
        scaled as f64 / window as f64
    }

    /// The highest `current` total that `admit(0, max, ..)` accepts with this
    /// `previous` (`None` when `max` is 0: no limit), so a store can stop a
    /// batch of adds at the first limit it would break.
    pub fn ceiling(&self, max: u32, window_seconds: u32, now: DateTime<Utc>) -> Option<u64> {
        if max == 0 {
            return None;
        }
        let (window, elapsed) = window_position(window_seconds, now);
        // previous · (window − elapsed) + current · window ≤ max · window
        let room = i128::from(max) * window - i128::from(self.previous) * (window - elapsed);
        Some(u64::try_from(room.div_euclid(window)).unwrap_or(0))
    }

    /// `Ok` when `incoming` more events keep the estimate within `max` (0 means
    /// no limit); otherwise how many seconds until one more event would fit,
    /// if nothing else is counted meanwhile. Integer arithmetic throughout, so
    /// the answer at a limit's edge is exact.
    pub fn admit(
        &self,
        incoming: u64,
        max: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> Result<(), u64> {
        if max == 0 {
            return Ok(());
        }
        let (window, elapsed) = window_position(window_seconds, now);
        let previous = i128::from(self.previous);
        let current = i128::from(self.current);
        let scaled = previous * (window - elapsed) + (current + i128::from(incoming)) * window;
        if scaled <= i128::from(max) * window {
            return Ok(());
        }
        // Room for one more event means an estimate of at most `max - 1`.
        let room = i128::from(max) - 1;
        let wait_ms = if current <= room {
            // The previous window's weight must fade:
            // previous · (window − t) ≤ (room − current) · window.
            let allowed = (room - current) * window;
            let t = window - allowed / previous.max(1);
            t - elapsed
        } else {
            // Only in the next window, where this window's events fade in turn.
            let t = window - (room * window) / current;
            (window - elapsed) + t
        };
        let secs = (wait_ms + 999).div_euclid(1000);
        Err(u64::try_from(secs).unwrap_or(1).max(1))
    }
}

/// Sends and approvals one prefix (or country) had over the last hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    /// Including the send being decided.
    pub sends: f64,
    pub approvals: f64,
}

impl Traffic {
    pub fn conversion(&self) -> f64 {
        if self.sends <= 0.0 {
            1.0
        } else {
            (self.approvals / self.sends).min(1.0)
        }
    }
}

/// The guard's rule, meant to be explainable in one sentence: a prefix trips
/// when its send velocity is above `max_sends_per_hour` while the share of its
/// codes that get approved is below `min_conversion`. Real users type their
/// codes in; numbers an attacker pumps never do. Returns the reason when it trips.
pub fn judge_traffic(
    prefix: &str,
    traffic: Traffic,
    max_sends_per_hour: u32,
    min_conversion: f64,
) -> Option<String> {
    if max_sends_per_hour == 0 || traffic.sends <= f64::from(max_sends_per_hour) {
        return None;
    }
    let conversion = traffic.conversion();
    if conversion >= min_conversion {
        return None;
    }
    Some(format!(
        "{prefix}: {:.0} sends in the last hour (threshold {max_sends_per_hour}) with {:.0}% approved (floor {:.0}%)",
        traffic.sends,
        conversion * 100.0,
        min_conversion * 100.0,
    ))
}

/// A guard prefix as written by people (`+31651`, `31651`, `%2B31651`) in its
/// canonical form `+31651`; `None` when it cannot be one.
pub fn normalize_prefix(input: &str) -> Option<String> {
    let trimmed = input.trim();
    let digits = trimmed
        .strip_prefix("%2B")
        .or_else(|| trimmed.strip_prefix("%2b"))
        .or_else(|| trimmed.strip_prefix('+'))
        .unwrap_or(trimmed);
    let valid = (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| format!("+{digits}"))
}

/// The address a per-client limit counts: an IPv4 address, or the /64 an
/// IPv6 address is in (one subscriber usually holds a whole /64).
pub fn client_bucket(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Money in millionths, so spend adds up exactly in integer counters.
pub fn micro_units(amount: f64) -> u64 {
    if amount.is_finite() && amount > 0.0 {
        (amount * 1e6).round() as u64
    } else {
        0
    }
}

/// Whether a send estimated at `estimate` fits the UTC day's `limit` after
/// `spent_micros` already spent (0 = no budget); otherwise seconds to midnight UTC.
pub fn admit_spend(
    spent_micros: u64,
    estimate: f64,
    limit: f64,
    now: DateTime<Utc>,
) -> Result<(), u64> {
    if limit <= 0.0 {
        return Ok(());
    }
    let limit_micros = micro_units(limit);
    if spent_micros < limit_micros && spent_micros + micro_units(estimate) <= limit_micros {
        return Ok(());
    }
    let day = i64::from(DAY);
    let end = (now.timestamp().div_euclid(day) + 1) * day;
    Err(u64::try_from(end - now.timestamp()).unwrap_or(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    /// A window boundary for every window length used here.
    fn boundary() -> DateTime<Utc> {
        Utc.timestamp_opt(1_900_022_400, 0).unwrap()
    }

    #[test]
    fn fresh_counts_admit_up_to_the_limit() {
        let now = boundary() + Duration::seconds(100);
        for current in 0..5 {
            let c = WindowCounts {
                previous: 0,
                current,
            };
            assert_eq!(c.admit(1, 5, TEN_MINUTES, now), Ok(()), "{current}");
        }
        let full = WindowCounts {
            previous: 0,
            current: 5,
        };
        // Next window starts in 500 s; then 5·(1 − f) ≤ 4 needs f ≥ 0.2: 120 s more.
        assert_eq!(full.admit(1, 5, TEN_MINUTES, now), Err(620));
        assert_eq!(full.admit(0, 5, TEN_MINUTES, now), Ok(()), "exactly at it");
        assert_eq!(full.admit(1, 0, TEN_MINUTES, now), Ok(()), "0 is no limit");
    }

    proptest! {
        #[test]
        fn the_ceiling_is_the_last_total_admit_accepts(
            previous in 0u64..500,
            max in 1u32..300,
            offset_ms in 0i64..3_600_000,
        ) {
            let now = boundary() + Duration::milliseconds(offset_ms);
            let ceiling = WindowCounts { previous, current: 0 }
                .ceiling(max, HOUR, now)
                .unwrap();
            let at = |current| WindowCounts { previous, current }.admit(0, max, HOUR, now);
            prop_assert!(at(ceiling + 1).is_err());
            if ceiling > 0 || at(0).is_ok() {
                prop_assert_eq!(at(ceiling), Ok(()));
            }
        }
    }

    #[test]
    fn the_previous_window_fades_out_linearly() {
        let c = WindowCounts {
            previous: 5,
            current: 0,
        };
        let start = boundary();
        assert_eq!(c.estimate(TEN_MINUTES, start), 5.0);
        assert_eq!(c.estimate(TEN_MINUTES, start + Duration::seconds(300)), 2.5);
        // 5·(1 − f) ≤ 4 at f = 0.2, i.e. 120 s into the window.
        assert_eq!(c.admit(1, 5, TEN_MINUTES, start), Err(120));
        assert_eq!(
            c.admit(1, 5, TEN_MINUTES, start + Duration::seconds(120)),
            Ok(())
        );
    }

    #[test]
    fn no_double_burst_across_a_boundary() {
        // Five sends at the end of one window leave little room right after it.
        let c = WindowCounts {
            previous: 5,
            current: 0,
        };
        let just_after = boundary() + Duration::seconds(1);
        assert!(c.admit(1, 5, TEN_MINUTES, just_after).is_err());
    }

    proptest! {
        /// Waiting exactly the advertised time is always enough, and one
        /// second less never is (when the wait was longer than a second).
        #[test]
        fn retry_after_is_exact(previous in 0u64..50, current in 0u64..50, max in 1u32..40, offset in 0i64..600) {
            let now = boundary() + Duration::seconds(offset);
            let c = WindowCounts { previous, current };
            // Counts as the store would report them `after` seconds from now.
            let at = |after: u64| {
                let later = now + Duration::seconds(after as i64);
                let moved = later.timestamp().div_euclid(600) - now.timestamp().div_euclid(600);
                let counts = match moved {
                    0 => c,
                    1 => WindowCounts { previous: current, current: 0 },
                    _ => WindowCounts::default(),
                };
                counts.admit(1, max, TEN_MINUTES, later)
            };
            if let Err(wait) = c.admit(1, max, TEN_MINUTES, now) {
                prop_assert!(at(wait).is_ok(), "{c:?} wait {wait}");
                if wait > 1 {
                    prop_assert!(at(wait - 1).is_err(), "{c:?} wait {wait} is too long");
                }
            }
        }
    }

    #[test]
    fn the_guard_trips_on_velocity_with_low_conversion_only() {
        let attack = Traffic {
            sends: 51.0,
            approvals: 0.0,
        };
        let reason = judge_traffic("+256700", attack, 50, 0.2).unwrap();
        assert_eq!(
            reason,
            "+256700: 51 sends in the last hour (threshold 50) with 0% approved (floor 20%)"
        );
        let busy_but_real = Traffic {
            sends: 400.0,
            approvals: 300.0,
        };
        assert_eq!(judge_traffic("+31651", busy_but_real, 50, 0.2), None);
        let slow = Traffic {
            sends: 50.0,
            approvals: 0.0,
        };
        assert_eq!(judge_traffic("+31651", slow, 50, 0.2), None);
        assert_eq!(judge_traffic("+31651", attack, 0, 0.2), None, "0 is off");
    }

    #[test]
    fn prefixes_normalise() {
        assert_eq!(normalize_prefix("+31651").as_deref(), Some("+31651"));
        assert_eq!(normalize_prefix("31651").as_deref(), Some("+31651"));
        assert_eq!(normalize_prefix("%2B256").as_deref(), Some("+256"));
        assert_eq!(normalize_prefix("+31-651"), None);
        assert_eq!(normalize_prefix(""), None);
        assert_eq!(normalize_prefix("+"), None);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_bucket(a), client_bucket(b));
        assert_ne!(client_bucket(a), client_bucket(c));
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_bucket(mapped), "203.0.113.7");
    }

    #[test]
    fn spend_stops_at_the_budget_until_midnight_utc() {
        let now = Utc.with_ymd_and_hms(2030, 1, 1, 23, 0, 0).unwrap();
        assert_eq!(admit_spend(0, 0.05, 0.0, now), Ok(()), "0 is no budget");
        assert_eq!(admit_spend(micro_units(0.95), 0.05, 1.0, now), Ok(()));
        assert_eq!(admit_spend(micro_units(1.0), 0.0, 1.0, now), Err(3_600));
        assert_eq!(admit_spend(micro_units(0.97), 0.05, 1.0, now), Err(3_600));
        assert_eq!(micro_units(0.1 + 0.2), 300_000);
    }
}
