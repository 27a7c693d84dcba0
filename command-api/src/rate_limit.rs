//! Token buckets with bounded memory, applied after authentication (see [`crate::auth`]).
//!
//! Two limiters use this type: one keyed by the authenticated principal (the credential plus
//! the caller it acts for; the admin token), and a small one keyed by client address for
//! requests that carry no credential or a wrong one. A key a client merely names in a header
//! never selects a bucket before its token has been checked, so nobody can drain another
//! caller's bucket without that caller's credential.
//!
//! Memory is bounded without scanning: keys are spread over shards (each with its own lock),
//! and each shard keeps two generations of buckets. New keys go into the young generation; when
//! it is full, the old generation is dropped whole and the young one becomes old. A key that is
//! used again is moved back into the young generation, so active keys survive and only keys idle
//! for a whole generation are forgotten (they start again with a full burst, as a refilled
//! bucket would have). Every operation is O(1) under one shard's lock.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

/// Independent locks: requests of different keys rarely wait on each other.
const SHARDS: usize = 16;

/// The limiter's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The sustained rate of the bucket that decided (the `X-RateLimit-Limit` value).
    pub limit: u64,
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

#[derive(Debug, Default)]
struct Shard {
    young: HashMap<String, Bucket>,
    old: HashMap<String, Bucket>,
}

/// A token-bucket limiter keyed by principal or address.
#[derive(Debug)]
pub struct RateLimiter {
    rps: f64,
    burst: f64,
    generation_size: usize,
    shards: Vec<Mutex<Shard>>,
}

impl RateLimiter {
    /// A limiter refilling `rps` tokens per second up to `burst`, tracking at most about
    /// `max_keys` keys (never more than `max_keys` plus one generation per shard).
    pub fn new(rps: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rps: rps.max(0.001),
            burst: burst.max(1.0),
            // Two generations per shard together hold `max_keys`.
            generation_size: (max_keys / (2 * SHARDS)).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// The configured sustained rate (the `X-RateLimit-Limit` value).
    pub fn limit(&self) -> u64 {
        self.rps.round() as u64
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % SHARDS]
    }

    /// Takes one token for `key` at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let retired;
        let bucket = match shard.young.get(key).copied() {
            Some(b) => b,
            None => {
                let found = shard.old.remove(key);
                if shard.young.len() >= self.generation_size {
                    // Rotate: the old generation holds only keys idle for a whole generation.
                    let young = std::mem::take(&mut shard.young);
                    retired = std::mem::replace(&mut shard.old, young);
                } else {
                    retired = HashMap::new();
                }
                drop(retired);
                found.unwrap_or(Bucket {
                    tokens: self.burst,
                    last: now,
                })
            }
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        let mut bucket = Bucket {
            tokens: (bucket.tokens + elapsed * self.rps).min(self.burst),
            last: now.max(bucket.last),
        };
        let decision = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Decision {
                allowed: true,
                limit: self.limit(),
                remaining: bucket.tokens.floor() as u64,
                retry_after: 0,
            }
        } else {
            let wait = ((1.0 - bucket.tokens) / self.rps).ceil().max(1.0);
            Decision {
                allowed: false,
                limit: self.limit(),
                remaining: 0,
                retry_after: wait as u64,
            }
        };
        shard.young.insert(key.to_string(), bucket);
        decision
    }

    /// Buckets currently tracked.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.young.len() + s.old.len()
            })
            .sum()
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

    /// Rotating keys cannot grow the map past its bound.
    #[test]
    fn memory_is_bounded() {
        let limiter = RateLimiter::new(1.0, 2.0, 320);
        let t = Instant::now();
        for i in 0..100_000 {
            limiter.check(&format!("k{i}"), t);
        }
        assert!(limiter.tracked() <= 320 + SHARDS, "{}", limiter.tracked());
    }

    /// A key in steady use keeps its (empty) bucket while other keys churn through the map.
    #[test]
    fn active_keys_survive_churn() {
        let limiter = RateLimiter::new(0.001, 1.0, 64);
        let t = Instant::now();
        assert!(limiter.check("victim", t).allowed);
        for i in 0..10_000 {
            limiter.check(&format!("k{i}"), t);
            if i % 2 == 0 {
                assert!(
                    !limiter.check("victim", t).allowed,
                    "the drained bucket was forgotten after {i} other keys"
                );
            }
        }
    }
}
