//! Allocation outcomes this process answered since it started: in total, and per minute over the
//! last hour. `GET {base}/admin/outcomes` serves them, and the dashboard charts them, so the chart
//! shows what the server counted, whenever the page was opened (the page counted nothing itself
//! before, and showed only what happened while it was open).
//!
//! The counts are per instance and start at zero with the process, like the Prometheus series
//! `broker_allocate_total` they mirror; behind a load balancer each instance counts its own.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use domain::SharedClock;

/// Every outcome of `POST /allocate`, as `broker_allocate_total{outcome}` names them.
pub const ALLOCATION_OUTCOMES: [&str; 9] = [
    "success",
    "idempotent",
    "no_sandboxes",
    "unknown_prefix",
    "quota_exceeded",
    "caller_limit",
    "address_limit",
    "maintenance",
    "error",
];

/// Minutes of per-minute history kept: the dashboard's chart spans the last hour.
const MINUTES_KEPT: usize = 60;

/// Counts by outcome, in the order of [`ALLOCATION_OUTCOMES`]; index `ALLOCATION_OUTCOMES.len()`
/// holds the requests refused by a rate limit (of any route: they are refused before a handler
/// could tell an allocation from another call).
type Counts = [u64; ALLOCATION_OUTCOMES.len() + 1];
const RATE_LIMITED: usize = ALLOCATION_OUTCOMES.len();

#[derive(Debug)]
struct Tally {
    totals: Counts,
    /// (minute as Unix seconds, counts), oldest first; minutes without a count are absent.
    minutes: VecDeque<(i64, Counts)>,
}

/// The counters (shared by every request; one short lock per counted answer).
#[derive(Debug)]
pub struct AllocationOutcomes {
    clock: SharedClock,
    started_at: DateTime<Utc>,
    tally: Mutex<Tally>,
}

/// What [`AllocationOutcomes::snapshot`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeSnapshot {
    /// When counting began (the process's start).
    pub since: DateTime<Utc>,
    /// The server's time of the reading.
    pub now: DateTime<Utc>,
    /// Allocation answers by outcome since `since` (every outcome present, zeros included).
    pub totals: BTreeMap<String, u64>,
    /// Requests refused by a rate limit since `since`.
    pub rate_limited: u64,
    /// The minutes of the last hour that counted something, oldest first.
    pub per_minute: Vec<OutcomeMinute>,
}

/// One minute's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeMinute {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Allocation answers by outcome in that minute (only the outcomes that occurred).
    pub counts: BTreeMap<String, u64>,
    /// Requests refused by a rate limit in that minute.
    pub rate_limited: u64,
}

impl AllocationOutcomes {
    /// Counters starting at zero now.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            started_at: clock.now(),
            clock,
            tally: Mutex::new(Tally {
                totals: [0; ALLOCATION_OUTCOMES.len() + 1],
                minutes: VecDeque::with_capacity(MINUTES_KEPT + 1),
            }),
        }
    }

    /// Counts one allocation answer; an outcome not in [`ALLOCATION_OUTCOMES`] counts as `error`.
    pub fn record(&self, outcome: &str) {
        let index = ALLOCATION_OUTCOMES
            .iter()
            .position(|known| *known == outcome)
            .unwrap_or(ALLOCATION_OUTCOMES.len() - 1);
        self.count(index);
    }

    /// Counts one request refused by a rate limit.
    pub fn record_rate_limited(&self) {
        self.count(RATE_LIMITED);
    }

    fn count(&self, index: usize) {
        let minute = self.clock.now().timestamp().div_euclid(60) * 60;
        // A poisoned lock only means another request panicked mid-count: the counts are plain
        // numbers, still usable.
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.totals[index] += 1;
        match tally.minutes.back_mut() {
            Some((last, counts)) if *last == minute => counts[index] += 1,
            _ => {
                let mut counts = [0; ALLOCATION_OUTCOMES.len() + 1];
                counts[index] = 1;
                tally.minutes.push_back((minute, counts));
            }
        }
        while tally.minutes.len() > MINUTES_KEPT {
            tally.minutes.pop_front();
        }
    }

    /// The totals since the start and the last hour's minutes.
    pub fn snapshot(&self) -> OutcomeSnapshot {
        let now = self.clock.now();
        let oldest = (now.timestamp().div_euclid(60) - (MINUTES_KEPT as i64 - 1)) * 60;
        let tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let named = |counts: &Counts, zeros: bool| -> BTreeMap<String, u64> {
            ALLOCATION_OUTCOMES
                .iter()
                .zip(counts.iter())
                .filter(|(_, n)| zeros || **n > 0)
                .map(|(name, n)| (name.to_string(), *n))
                .collect()
        };
        OutcomeSnapshot {
            since: self.started_at,
            now,
            totals: named(&tally.totals, true),
            rate_limited: tally.totals[RATE_LIMITED],
            per_minute: tally
                .minutes
                .iter()
                .filter(|(minute, _)| *minute >= oldest)
                .map(|(minute, counts)| OutcomeMinute {
                    minute: DateTime::from_timestamp(*minute, 0).unwrap_or(now),
                    counts: named(counts, false),
                    rate_limited: counts[RATE_LIMITED],
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use domain::ManualClock;

    use super::*;

    /// Totals run from the start; per-minute counts fall into the minute they happened in and
    /// only the last hour's minutes are reported; an unknown outcome counts as an error.
    #[test]
    fn counts_by_outcome_and_minute_for_the_last_hour() {
        let start = Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 30).single();
        let clock = ManualClock::new(start.unwrap_or_default());
        let outcomes = AllocationOutcomes::new(Arc::new(clock.clone()));
        outcomes.record("success");
        outcomes.record("success");
        outcomes.record("no_sandboxes");
        clock.advance(chrono::Duration::minutes(1));
        outcomes.record("idempotent");
        outcomes.record("something new");
        outcomes.record_rate_limited();

        let read = outcomes.snapshot();
        assert_eq!(read.since, start.unwrap_or_default());
        assert_eq!(
            read.totals.len(),
            ALLOCATION_OUTCOMES.len(),
            "zeros included"
        );
        assert_eq!(read.totals["success"], 2);
        assert_eq!(read.totals["no_sandboxes"], 1);
        assert_eq!(read.totals["idempotent"], 1);
        assert_eq!(read.totals["error"], 1);
        assert_eq!(read.rate_limited, 1);
        assert_eq!(read.per_minute.len(), 2);
        assert_eq!(read.per_minute[0].counts["success"], 2);
        assert!(!read.per_minute[0].counts.contains_key("idempotent"));
        assert_eq!(read.per_minute[1].counts["idempotent"], 1);
        assert_eq!(read.per_minute[1].rate_limited, 1);

        // An hour later the minutes are gone from the chart, the totals are not.
        clock.advance(chrono::Duration::minutes(60));
        let later = outcomes.snapshot();
        assert!(later.per_minute.is_empty(), "{:?}", later.per_minute);
        assert_eq!(later.totals["success"], 2);
    }
}
