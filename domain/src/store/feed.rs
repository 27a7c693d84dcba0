//! The time-ordered feed port: every event of the store in feed-key order
//! (`{occurred_at}#{event_id}`), filtered. Kept apart from [`EventStore`](super::EventStore)
//! because only auditors, exports, the live stream and the webhook dispatcher read it;
//! `crate::audit` builds its queries on top of it.
//!
//! Beside it, [`EventLog`]: the stronger port of a store whose events have one total order in
//! which nothing arrives late (the embedded store's log). A consumer that must see every event
//! exactly once keeps its progress as a log position where a store offers one (ADR 0027).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::events::EventEnvelope;
use crate::model::ids::sandbox_id_of;
use crate::store::StoreError;

/// Which events a feed read returns. Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedFilter {
    /// Only this event type (e.g. `SandboxAllocated`).
    pub event_type: Option<String>,
    /// Only events whose actor is `track:<caller>` or whose payload's `caller` is this caller.
    pub caller: Option<String>,
    /// Only events of this sandbox's stream, or whose payload's `sandbox_id` is this sandbox
    /// (its claim events).
    pub sandbox_id: Option<String>,
}

impl FeedFilter {
    /// True when the filter has no condition.
    pub fn is_empty(&self) -> bool {
        self.event_type.is_none() && self.caller.is_none() && self.sandbox_id.is_none()
    }

    /// Whether `event` passes. Adapters may push the filter into the store, but must return a
    /// superset of what passes; the audit functions re-apply this exact predicate.
    pub fn matches(&self, event: &EventEnvelope) -> bool {
        let payload_names = |field: &str, value: &str| {
            event.payload.get(field).and_then(|v| v.as_str()) == Some(value)
        };
        if let Some(t) = &self.event_type {
            if event.event_type != *t {
                return false;
            }
        }
        if let Some(caller) = &self.caller {
            let by_actor = event
                .actor
                .strip_prefix("track:")
                .is_some_and(|c| c == caller);
            if !by_actor && !payload_names("caller", caller) {
                return false;
            }
        }
        if let Some(id) = &self.sandbox_id {
            if sandbox_id_of(&event.stream_id) != Some(id.as_str())
                && !payload_names("sandbox_id", id)
            {
                return false;
            }
        }
        true
    }
}

/// One read of the feed: the events with `after < key` and `occurred_at < until`, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedQuery {
    /// A position (see the module docs); only keys strictly greater follow.
    pub after: String,
    /// Exclusive upper bound on `occurred_at`.
    pub until: DateTime<Utc>,
    /// Conditions on the events.
    pub filter: FeedFilter,
}

/// A page of the feed.
#[derive(Debug, Clone, Default)]
pub struct FeedPage {
    /// Matching events in key order.
    pub events: Vec<EventEnvelope>,
    /// The position to continue after (the last key examined, which may belong to an event the
    /// filter dropped, or an hour boundary); `None` when the range is exhausted.
    pub next: Option<String>,
}

/// The time-ordered feed over every event (a port beside [`EventStore`]).
#[async_trait]
pub trait EventFeed: Send + Sync + 'static {
    /// At most `limit` events of `query`, in key order. May return fewer (a per-call budget of
    /// store reads was spent) with `next` set; `next: None` means nothing further is in range.
    async fn feed(&self, query: &FeedQuery, limit: usize) -> Result<FeedPage, StoreError>;

    /// `occurred_at` of the earliest event, `None` for an empty store: where an unbounded read
    /// starts.
    async fn first_event_time(&self) -> Result<Option<DateTime<Utc>>, StoreError>;
}

/// One total order over every event in which nothing arrives late: positions are handed out in
/// commit order, so a reader that has seen position `n` never later finds an event at or below
/// `n`. The embedded store's log is one (one writer, positions assigned inside the commit).
/// DynamoDB has none across writers: its time index orders by writers' clocks and shows a slow
/// commit after faster, later-stamped ones (ADR 0027).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Events at positions greater than `after`, ascending, at most `limit`.
    async fn read_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EventEnvelope)>, StoreError>;

    /// The newest position (0 for an empty log).
    async fn log_head(&self) -> Result<u64, StoreError>;

    /// A position from which a reader sees every event stamped at or after `at`: the position
    /// just before the first such event (the head when there is none). Moves a time position
    /// onto the log, once.
    async fn log_position_before(&self, at: DateTime<Utc>) -> Result<u64, StoreError>;
}
