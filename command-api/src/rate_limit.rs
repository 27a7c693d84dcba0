//! Per-caller token buckets (default 50 rps, burst 200) with bounded memory.
//!
//! The key is the caller id header when present, else the peer address. When the map is full,
//! idle buckets are evicted first; if every bucket is busy, new keys share one overflow bucket,
//! so rotating caller ids cannot grow memory or mint fresh bursts without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The limiter's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Seconds until a token is available (when refused).
    pub retry_after: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A token-bucket limiter keyed by caller.
#[derive(Debug)]
pub struct RateLimiter {
    rps: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

const OVERFLOW_KEY: &str = "\u{0}overflow";

impl RateLimiter {
    /// A limiter refilling `rps` tokens per second up to `burst`, tracking at most `max_keys`.
    pub fn new(rps: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rps: rps.max(0.001),
            burst: burst.max(1.0),
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The configured sustained rate (the `X-RateLimit-Limit` value).
    pub fn limit(&self) -> u64 {
        self.rps.round() as u64
    }

    /// Takes one token for `key` at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = key;
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            // Evict buckets that have refilled completely: forgetting them changes nothing.
            let full_after = self.burst / self.rps;
            buckets.retain(|_, b| now.duration_since(b.last).as_secs_f64() < full_after);
            if buckets.len() >= self.max_keys {
                key = OVERFLOW_KEY;
            }
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rps).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Decision {
                allowed: true,
                remaining: bucket.tokens.floor() as u64,
                retry_after: 0,
            }
        } else {
            let wait = ((1.0 - bucket.tokens) / self.rps).ceil().max(1.0);
            Decision {
                allowed: false,
                remaining: 0,
                retry_after: wait as u64,
            }
        }
    }

    /// Buckets currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A key gets its burst, is refused after it, and refills at the sustained rate.
    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(10.0, 3.0, 100);
        let t = Instant::now();
        for left in [2, 1, 0] {
            let d = limiter.check("a", t);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let refused = limiter.check("a", t);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 1);
        assert!(limiter.check("b", t).allowed, "keys are independent");
        assert!(limiter.check("a", t + Duration::from_millis(150)).allowed);
    }

    /// Rotating keys cannot grow the map past its bound or mint unlimited bursts.
    #[test]
    fn memory_is_bounded() {
        let limiter = RateLimiter::new(1.0, 2.0, 10);
        let t = Instant::now();
        let mut allowed = 0;
        for i in 0..1000 {
            if limiter.check(&format!("k{i}"), t).allowed {
                allowed += 1;
            }
        }
        assert!(limiter.tracked() <= 11);
        assert!(allowed <= 10 * 2 + 2, "allowed {allowed}");
    }
}
