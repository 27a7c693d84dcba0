//! Refusal summaries (ADR 0030): the allocation requests this instance refused, counted in
//! memory by track, prefix and reason, and appended every `USAGE_SUMMARY_INTERVAL_SEC` as one
//! `RefusalsSummarized` event on the instance's own stream (`usage#<instance>`), only for an
//! interval with a refusal and only with `WRITE_EVENTS_USAGE=true`. Usage reports count
//! refusals from these events, so the log does not grow by one event per refused request (a
//! burst of 1,000 students against an empty pool is one event per instance per interval).
//!
//! The stream has one writer (this process; its id is fresh at every start), so the append's
//! expected version is known without a read. Counts of an interval whose append failed are
//! merged back and go out with the next one; a crash loses at most one interval.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::model::events::{RefusalTally, UsageEvent};
use domain::model::ids::usage_stream;
use domain::{Actor, CommandMeta, EventEnvelope, EventStore, SharedClock};

/// Most distinct (track, prefix, reason) keys one interval keeps: further keys count without
/// their track and prefix, so a flood of made-up track names cannot grow memory.
const MAX_KEYS: usize = 1_000;

/// Outcomes of an allocation request that are refusals.
const REFUSALS: [&str; 6] = [
    "no_sandboxes",
    "quota_exceeded",
    "caller_limit",
    "address_limit",
    "maintenance",
    "unknown_prefix",
];

type Key = (Option<String>, Option<String>, String);

/// The refusals counted since the last summary.
#[derive(Debug)]
pub struct RefusalCounter {
    counts: Mutex<(DateTime<Utc>, HashMap<Key, u64>)>,
}

impl RefusalCounter {
    /// An empty counter whose first interval starts at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            counts: Mutex::new((now, HashMap::new())),
        }
    }

    /// Counts an allocation outcome when it is a refusal (anything else is ignored).
    pub fn record(&self, outcome: &str, track: Option<&str>, prefix: Option<&str>) {
        let Some(reason) = REFUSALS.iter().find(|r| **r == outcome) else {
            return;
        };
        let mut guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = (
            track.map(str::to_string),
            prefix.map(str::to_string),
            (*reason).to_string(),
        );
        if !guard.1.contains_key(&key) && guard.1.len() >= MAX_KEYS {
            key = (None, None, (*reason).to_string());
        }
        *guard.1.entry(key).or_default() += 1;
    }

    /// Takes the counts of the interval ending at `now` and starts the next one.
    fn take(&self, now: DateTime<Utc>) -> (DateTime<Utc>, Vec<RefusalTally>) {
        let mut guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let since = std::mem::replace(&mut guard.0, now);
        let counts = std::mem::take(&mut guard.1);
        let mut tallies: Vec<RefusalTally> = counts
            .into_iter()
            .map(|((track, prefix, reason), count)| RefusalTally {
                track,
                prefix,
                reason,
                count,
            })
            .collect();
        tallies.sort_by(|a, b| {
            (&a.track, &a.prefix, &a.reason).cmp(&(&b.track, &b.prefix, &b.reason))
        });
        (since, tallies)
    }

    /// Puts back counts whose summary could not be written.
    fn restore(&self, since: DateTime<Utc>, tallies: Vec<RefusalTally>) {
        let mut guard = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        guard.0 = guard.0.min(since);
        for t in tallies {
            *guard.1.entry((t.track, t.prefix, t.reason)).or_default() += t.count;
        }
    }
}

/// Where and how often the summaries are written.
pub struct SummaryWriter {
    /// The event store.
    pub events: std::sync::Arc<dyn EventStore>,
    /// The broker clock.
    pub clock: SharedClock,
    /// `WRITE_EVENTS_USAGE`: without it the counts are dropped at each interval.
    pub write_events: bool,
    /// This instance's stream.
    pub stream_id: String,
    /// Events written so far (the next append's expected version).
    pub version: u64,
}

impl SummaryWriter {
    /// A writer for a fresh instance stream.
    pub fn new(
        events: std::sync::Arc<dyn EventStore>,
        clock: SharedClock,
        write_events: bool,
    ) -> Self {
        Self {
            events,
            clock,
            write_events,
            stream_id: usage_stream(&uuid::Uuid::now_v7().to_string()),
            version: 0,
        }
    }

    /// Writes the summary of the interval that ends now, if it has a refusal. Returns whether
    /// an event was appended.
    pub async fn flush(&mut self, counter: &RefusalCounter) -> bool {
        let now = self.clock.now();
        let (since, refusals) = counter.take(now);
        if refusals.is_empty() || !self.write_events {
            return false;
        }
        let event = UsageEvent::RefusalsSummarized {
            since: domain::model::events::truncate_to_millis(since),
            until: domain::model::events::truncate_to_millis(now),
            refusals: refusals.clone(),
        };
        let meta = CommandMeta {
            actor: Actor::Job("refusal_summary"),
            request_id: None,
            correlation_id: None,
        };
        let envelope = EventEnvelope::new(&self.stream_id, self.version + 1, &event, &meta, now);
        match self.events.append(vec![envelope]).await {
            Ok(()) => {
                self.version += 1;
                true
            }
            Err(e) => {
                // The outcome may be unknown (a timeout after the write landed): the stream's
                // latest version says whether it did, and keeps the next expected version right.
                match self.events.load_latest(&self.stream_id).await {
                    Ok(latest) if latest.as_ref().map_or(0, |l| l.version) > self.version => {
                        self.version += 1;
                        true
                    }
                    _ => {
                        tracing::warn!(error = %e, "refusal summary not written; its counts go out with the next one");
                        counter.restore(since, refusals);
                        false
                    }
                }
            }
        }
    }
}

/// Writes a summary every `interval` until `stop`, and a last one at `stop`.
pub async fn run(
    counter: std::sync::Arc<RefusalCounter>,
    mut writer: SummaryWriter,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {
                writer.flush(&counter).await;
            }
            _ = &mut stop => {
                writer.flush(&counter).await;
                return;
            }
        }
    }
}
