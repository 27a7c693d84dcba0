//! When to try again. Waits grow exponentially with full jitter, so a class of students whose
//! labs start together do not retry in lockstep; a `Retry-After` from the service is a floor
//! (asking sooner only earns another 429), with a little jitter on top for the same reason.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// The retry budget of one command: keep trying until `deadline`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// No attempt starts after this instant.
    pub deadline: Instant,
    /// First wait when the service gave no `Retry-After`.
    pub base: Duration,
    /// Longest wait between two attempts.
    pub cap: Duration,
}

impl RetryPolicy {
    /// A policy that gives up `budget` from now.
    pub fn within(budget: Duration) -> Self {
        Self {
            deadline: Instant::now() + budget,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(15),
        }
    }

    /// The wait before attempt `attempt + 1` (attempt counts from 1), or `None` when it would end
    /// after the deadline (then the caller gives up now rather than sleep in vain).
    pub fn wait_after(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let mut rng = rand::rng();
        let wait = match retry_after {
            Some(floor) => {
                let spread = floor.as_millis().max(100) as u64 / 5;
                floor + Duration::from_millis(rng.random_range(0..=spread))
            }
            None => {
                let exp = self
                    .base
                    .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
                    .min(self.cap);
                let half = exp.as_millis() as u64 / 2;
                Duration::from_millis(half + rng.random_range(0..=half))
            }
        };
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        (wait < remaining).then_some(wait)
    }
}

/// Parses a duration as `90`, `90s`, `5m` or `1h` (seconds when no unit is given).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = match raw.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => raw.split_at(i),
        None => (raw, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration like 90, 90s, 5m or 1h"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        _ => return Err(format!("`{raw}`: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Retry-After` is never undercut, and jitter stays within a fifth of it.
    #[test]
    fn retry_after_is_a_floor() {
        let policy = RetryPolicy::within(Duration::from_secs(3600));
        for attempt in 1..20 {
            let wait = policy
                .wait_after(attempt, Some(Duration::from_secs(2)))
                .unwrap_or_default();
            assert!(wait >= Duration::from_secs(2) && wait <= Duration::from_millis(2400));
        }
    }

    /// Waits grow with the attempt but never beyond the cap, and none is offered past the deadline.
    #[test]
    fn waits_are_capped_and_bounded_by_the_deadline() {
        let policy = RetryPolicy::within(Duration::from_secs(3600));
        let late = policy.wait_after(30, None).unwrap_or_default();
        assert!(late <= policy.cap && late >= policy.cap / 2);
        let short = RetryPolicy::within(Duration::from_millis(50));
        assert_eq!(short.wait_after(1, Some(Duration::from_secs(1))), None);
    }

    /// Durations read as seconds, minutes or hours.
    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
