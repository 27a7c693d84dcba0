//! The auditor's side of the event table: a time-ordered feed over the whole history, point-in-time
//! state of one sandbox, a caller's allocations, a replay of the whole pool at a past instant, and
//! the tail that feeds the API's live stream.
//!
//! The feed is one more port, [`EventFeed`] (defined in `crate::store::feed`, re-exported here),
//! kept apart from [`EventStore`] because only auditors, exports and the live stream need it.
//! Both adapters order it the same way, by the **feed key**
//! `{occurred_at}#{event_id}` (RFC 3339 with milliseconds, so the text order is the time order):
//! the embedded store walks its `events_by_time (occurred_at, event_id)` index, DynamoDB its
//! `by-time` GSI hour by hour (hash `time_bucket` = `YYYY-MM-DDTHH`, range `occurred_key`). A
//! *position* in the feed is any string the keys compare against: a feed key, an RFC 3339 time
//! (`…000Z`: every event at or after that instant follows it) or an hour bucket (`YYYY-MM-DDTHH`:
//! that whole hour follows it). Cursors and `Last-Event-ID`s are positions.
//!
//! `occurred_at` is stamped before the append commits, so two concurrent commands can become
//! visible out of key order (and a GSI is only eventually consistent). A paged read is a snapshot
//! and does not care; the live [`FeedTail`] does: it re-reads a short window behind its position
//! ([`TAIL_LOOKBACK_MS`]) and remembers the keys it already emitted there, so a late arrival is
//! still emitted, once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::model::events::{format_time, BrokerEvent, EventEnvelope, SandboxEvent};
use crate::model::ids::{sandbox_id_of, sandbox_stream};
use crate::model::projection::{project, project_unknown, PoolRow, PoolStats};
use crate::model::sandbox::Sandbox;
use crate::store::{decode_cursor, decode_stored, encode_cursor, EventStore, StoreError};

/// How far past the reader's "now" the default upper bound of a feed read lies: absorbs clock
/// skew between the writers that stamp `occurred_at` and the reader.
pub const FUTURE_SLACK_S: i64 = 300;
/// The live tail re-reads this window behind its position (ms), for events that became visible
/// late (a commit that lost the race to a later-stamped one; GSI propagation).
pub const TAIL_LOOKBACK_MS: i64 = 3_000;
/// The live tail re-reads the lookback window on every n-th poll only (the other polls read
/// forward from the position), which bounds the re-read cost on a busy table.
pub const TAIL_LOOKBACK_EVERY: u64 = 4;
/// Events per store call of the tail and of exports.
pub const FEED_PAGE: usize = 500;
/// Store calls one audit page may spend before it returns what it has with a cursor (a page may
/// then hold fewer events than asked for, even none, with a non-null cursor).
pub const MAX_STORE_CALLS_PER_PAGE: usize = 8;
/// Longest position accepted from a client (a feed key is 61 bytes).
const MAX_POSITION_LEN: usize = 128;

pub use crate::store::feed::{EventFeed, FeedFilter, FeedPage, FeedQuery};

/// The feed key of an event: `{occurred_at}#{event_id}` (the DynamoDB `occurred_key`).
pub fn feed_key(event: &EventEnvelope) -> String {
    format!("{}#{}", format_time(&event.occurred_at), event.event_id)
}

/// The hour bucket (`YYYY-MM-DDTHH`, UTC) a time falls in.
pub fn hour_bucket(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H").to_string()
}

/// Parses an hour bucket back to the hour's first instant.
pub fn bucket_start(bucket: &str) -> Option<DateTime<Utc>> {
    let naive =
        NaiveDateTime::parse_from_str(&format!("{bucket}:00:00"), "%Y-%m-%dT%H:%M:%S").ok()?;
    Some(Utc.from_utc_datetime(&naive))
}

/// The instant a position stands for: the time of a feed key or RFC 3339 position, the start of
/// an hour bucket. `None` for anything else.
pub fn position_time(position: &str) -> Option<DateTime<Utc>> {
    let time_part = position.split('#').next().unwrap_or_default();
    if time_part.len() == 13 {
        return bucket_start(time_part);
    }
    DateTime::parse_from_rfc3339(time_part)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Checks a position that came from outside (a cursor's content, a `Last-Event-ID`) and brings it
/// to canonical form: a feed key is kept as it is; an RFC 3339 time becomes the stored time format
/// (so it compares correctly with keys); an hour bucket is kept. Anything else is
/// [`StoreError::InvalidCursor`].
pub fn parse_position(raw: &str) -> Result<String, StoreError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > MAX_POSITION_LEN {
        return Err(StoreError::InvalidCursor);
    }
    match raw.split_once('#') {
        Some((time, id)) => {
            let parsed =
                DateTime::parse_from_rfc3339(time).map_err(|_| StoreError::InvalidCursor)?;
            let canonical = format_time(&parsed.with_timezone(&Utc));
            if canonical != time || uuid::Uuid::parse_str(id).is_err() {
                return Err(StoreError::InvalidCursor);
            }
            Ok(raw.to_string())
        }
        None if raw.len() == 13 => bucket_start(raw)
            .map(|_| raw.to_string())
            .ok_or(StoreError::InvalidCursor),
        None => DateTime::parse_from_rfc3339(raw)
            .map(|t| format_time(&t.with_timezone(&Utc)))
            .map_err(|_| StoreError::InvalidCursor),
    }
}

/// What an audit page cursor carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FeedCursor {
    /// The position to continue after.
    after: String,
}

/// Encodes a feed position as an opaque cursor.
pub fn encode_feed_cursor(after: &str) -> Option<String> {
    encode_cursor(&FeedCursor {
        after: after.to_string(),
    })
}

/// Decodes a cursor made by [`encode_feed_cursor`] (anything else is
/// [`StoreError::InvalidCursor`]).
pub fn decode_feed_cursor(cursor: &str) -> Result<String, StoreError> {
    if cursor.len() > 4 * MAX_POSITION_LEN {
        return Err(StoreError::InvalidCursor);
    }
    let decoded: FeedCursor = decode_cursor(cursor)?;
    parse_position(&decoded.after)
}

/// A paged audit query.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Inclusive lower bound on `occurred_at` (default: the first event).
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound (default: now + [`FUTURE_SLACK_S`]).
    pub until: Option<DateTime<Utc>>,
    /// Conditions on the events.
    pub filter: FeedFilter,
    /// An opaque cursor from a previous page (takes precedence over `since`).
    pub cursor: Option<String>,
}

/// One page of an audit query.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    /// Matching events in time order.
    pub events: Vec<EventEnvelope>,
    /// Cursor of the next page; `None` at the end of the range.
    pub cursor: Option<String>,
    /// The upper bound the page was read with.
    pub until: Option<DateTime<Utc>>,
}

/// The position an audit query starts after, or `None` when there is nothing to read.
async fn start_position(
    feed: &dyn EventFeed,
    query: &AuditQuery,
) -> Result<Option<String>, StoreError> {
    if let Some(cursor) = &query.cursor {
        return decode_feed_cursor(cursor).map(Some);
    }
    if let Some(since) = &query.since {
        return Ok(Some(format_time(since)));
    }
    // A position just before the first event's millisecond: that event follows it.
    Ok(feed
        .first_event_time()
        .await?
        .map(|first| format_time(&(first - Duration::milliseconds(1)))))
}

/// One page of the feed for an auditor: at most `limit` events matching the filter, in time
/// order. `now` is the broker clock's (the default upper bound is relative to it).
pub async fn audit_page(
    feed: &dyn EventFeed,
    query: &AuditQuery,
    limit: usize,
    now: DateTime<Utc>,
) -> Result<AuditPage, StoreError> {
    let limit = limit.max(1);
    let until = query
        .until
        .unwrap_or(now + Duration::seconds(FUTURE_SLACK_S));
    let Some(mut after) = start_position(feed, query).await? else {
        return Ok(AuditPage {
            until: Some(until),
            ..AuditPage::default()
        });
    };
    let mut events = Vec::new();
    for _ in 0..MAX_STORE_CALLS_PER_PAGE {
        let page = feed
            .feed(
                &FeedQuery {
                    after: after.clone(),
                    until,
                    filter: query.filter.clone(),
                },
                limit - events.len(),
            )
            .await?;
        events.extend(page.events.into_iter().filter(|e| query.filter.matches(e)));
        match page.next {
            None => {
                return Ok(AuditPage {
                    events,
                    cursor: None,
                    until: Some(until),
                })
            }
            Some(next) => after = next,
        }
        if events.len() >= limit {
            break;
        }
    }
    Ok(AuditPage {
        events,
        cursor: encode_feed_cursor(&after),
        until: Some(until),
    })
}

/// A sandbox as it was at an instant: its events folded up to and including that instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SandboxAt {
    /// The folded state (`status: None`: not registered yet at that instant).
    pub sandbox: Sandbox,
    /// Who held it at that instant (the owner while `allocated`).
    pub holder: Option<String>,
    /// Events folded.
    pub events_applied: u64,
    /// `occurred_at` of the last event folded.
    pub as_of_event: Option<DateTime<Utc>>,
}

/// Folds a sandbox stream (version order) up to `at`: the events are taken while their
/// `occurred_at <= at`, so the fold is always a prefix of the stream — the state the aggregate
/// really passed through, even if a writer's clock stamped a later version earlier.
pub fn sandbox_at(events: &[EventEnvelope], at: DateTime<Utc>) -> Result<SandboxAt, StoreError> {
    let mut state = SandboxAt::default();
    for envelope in events.iter().take_while(|e| e.occurred_at <= at) {
        if let BrokerEvent::Sandbox(event) = decode_stored(envelope)? {
            state.sandbox.fold(&event);
        }
        state.events_applied += 1;
        state.as_of_event = Some(envelope.occurred_at);
    }
    state.holder = state
        .sandbox
        .owner
        .clone()
        .filter(|_| state.sandbox.status == Some(crate::SandboxStatus::Allocated));
    Ok(state)
}

/// One allocation a caller held, from the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllocationRecord {
    /// The sandbox.
    pub sandbox_id: String,
    /// The sandbox stream's version of the `SandboxAllocated` event.
    pub version: u64,
    /// When allocated.
    pub allocated_at: DateTime<Utc>,
    /// End of the lab window granted.
    pub expires_at: DateTime<Utc>,
    /// `X-Instruqt-Track-ID` of the allocation.
    pub track_name: Option<String>,
    /// The idempotency key.
    pub idempotency_key: String,
    /// When the allocation ended (marked for deletion or expired); `None` while it is held.
    pub ended_at: Option<DateTime<Utc>>,
    /// `deletion_requested` or `expired`.
    pub end_reason: Option<String>,
}

/// A page of a caller's allocations.
#[derive(Debug, Clone, Default)]
pub struct AllocationPage {
    /// Allocations in time order.
    pub allocations: Vec<AllocationRecord>,
    /// Cursor of the next page.
    pub cursor: Option<String>,
}

/// Sandbox streams whose ends are loaded concurrently for one allocations page.
const END_LOOKUP_CONCURRENCY: usize = 16;

/// Every sandbox `caller` was allocated, from the history: the feed filtered to its
/// `SandboxAllocated` events (paged like [`audit_page`]), each completed with how it ended from
/// the sandbox's own stream (a strong read).
pub async fn caller_allocations(
    feed: &dyn EventFeed,
    events: &dyn EventStore,
    caller: &str,
    query: &AuditQuery,
    limit: usize,
    now: DateTime<Utc>,
) -> Result<AllocationPage, StoreError> {
    let query = AuditQuery {
        filter: FeedFilter {
            event_type: Some("SandboxAllocated".into()),
            caller: Some(caller.to_string()),
            sandbox_id: None,
        },
        ..query.clone()
    };
    let page = audit_page(feed, &query, limit, now).await?;
    let mut allocations = Vec::new();
    for envelope in &page.events {
        let (
            Some(sandbox_id),
            BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated {
                caller: owner,
                track_name,
                idempotency_key,
                allocated_at,
                expires_at,
                ..
            }),
        ) = (sandbox_id_of(&envelope.stream_id), decode_stored(envelope)?)
        else {
            continue;
        };
        // The actor matched but another caller was allocated: not this caller's allocation.
        if owner != caller {
            continue;
        }
        allocations.push(AllocationRecord {
            sandbox_id: sandbox_id.to_string(),
            version: envelope.version,
            allocated_at,
            expires_at,
            track_name,
            idempotency_key,
            ended_at: None,
            end_reason: None,
        });
    }
    let keys: Vec<(String, u64)> = allocations
        .iter()
        .map(|a| (a.sandbox_id.clone(), a.version))
        .collect();
    let ends: Vec<Option<(DateTime<Utc>, &'static str)>> =
        futures::stream::iter(keys)
            .map(|(sandbox_id, version)| async move {
                allocation_end(events, &sandbox_id, version).await
            })
            .buffered(END_LOOKUP_CONCURRENCY)
            .try_collect()
            .await?;
    for (record, end) in allocations.iter_mut().zip(ends) {
        if let Some((at, reason)) = end {
            record.ended_at = Some(at);
            record.end_reason = Some(reason.to_string());
        }
    }
    Ok(AllocationPage {
        allocations,
        cursor: page.cursor,
    })
}

/// How the allocation recorded at `version` of a sandbox stream ended, if it did.
async fn allocation_end(
    events: &dyn EventStore,
    sandbox_id: &str,
    version: u64,
) -> Result<Option<(DateTime<Utc>, &'static str)>, StoreError> {
    for envelope in events
        .load_after(&sandbox_stream(sandbox_id), version)
        .await?
    {
        match decode_stored(&envelope)? {
            BrokerEvent::Sandbox(SandboxEvent::DeletionRequested { requested_at, .. }) => {
                return Ok(Some((requested_at, "deletion_requested")))
            }
            BrokerEvent::Sandbox(SandboxEvent::AllocationExpired { expired_at }) => {
                return Ok(Some((expired_at, "expired")))
            }
            // A next allocation (impossible without an end first) or retirement also ends it.
            BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated { .. })
            | BrokerEvent::Sandbox(SandboxEvent::SandboxRetired { .. }) => {
                return Ok(Some((envelope.occurred_at, "ended")))
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The whole pool replayed up to an instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolAt {
    /// Counts by status (the same arithmetic as the stats shards).
    pub stats: PoolStats,
    /// The rows, by sandbox id.
    #[serde(skip)]
    pub rows: HashMap<String, PoolRow>,
    /// Events read.
    pub events_read: u64,
    /// Sandbox events folded (`occurred_at <= at`).
    pub events_applied: u64,
}

/// Replays every sandbox stream with the pure projection, folding each stream's events while
/// their `occurred_at <= at` (`None`: all of them), and counts the resulting rows by status.
/// Reads the event table with the port's paged scan, `segments` segments concurrently; memory is
/// one row per sandbox, never the whole history.
pub async fn replay_pool_at(
    events: Arc<dyn EventStore>,
    at: Option<DateTime<Utc>>,
    segments: u32,
    page_size: usize,
) -> Result<PoolAt, StoreError> {
    let segments = segments.max(1);
    let parts = futures::future::try_join_all(
        (0..segments)
            .map(|segment| replay_segment(Arc::clone(&events), segment, segments, at, page_size)),
    )
    .await?;
    let mut pool = PoolAt::default();
    for part in parts {
        pool.events_read += part.events_read;
        pool.events_applied += part.events_applied;
        pool.rows.extend(part.rows);
    }
    for row in pool.rows.values() {
        pool.stats.by_status[row.status.index()] += 1;
    }
    Ok(pool)
}

async fn replay_segment(
    events: Arc<dyn EventStore>,
    segment: u32,
    segments: u32,
    at: Option<DateTime<Utc>>,
    page_size: usize,
) -> Result<PoolAt, StoreError> {
    let mut part = PoolAt::default();
    // Streams whose fold stopped at `at`: their later events are skipped (prefix semantics).
    let mut stopped: BTreeSet<String> = BTreeSet::new();
    let mut cursor = None;
    loop {
        let page = events
            .scan(segment, segments, cursor, page_size.max(1))
            .await?;
        part.events_read += page.events.len() as u64;
        for envelope in &page.events {
            let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) else {
                continue;
            };
            if stopped.contains(sandbox_id) {
                continue;
            }
            if at.is_some_and(|at| envelope.occurred_at > at) {
                stopped.insert(sandbox_id.to_string());
                continue;
            }
            let decoded = decode_stored(envelope)?;
            if !matches!(decoded, BrokerEvent::Sandbox(_) | BrokerEvent::Unknown(_)) {
                continue;
            }
            let row = part.rows.remove(sandbox_id);
            // An event of a newer release replays as the projector applies it (ADR 0023).
            let projected = match &decoded {
                BrokerEvent::Sandbox(event) => project(row, envelope, event),
                _ => project_unknown(row, envelope),
            };
            if let (Some(next), _) = projected {
                part.rows.insert(sandbox_id.to_string(), next);
            }
            part.events_applied += 1;
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(part),
        }
    }
}

/// Follows the feed for the live stream: each [`FeedTail::poll`] returns the events that became
/// visible since the last one, each exactly once, in key order within a poll.
#[derive(Debug)]
pub struct FeedTail {
    /// The greatest key emitted (or the starting position).
    position: String,
    /// Keys emitted within the lookback window behind `position`.
    recent: BTreeSet<String>,
    polls: u64,
}

impl FeedTail {
    /// A tail that emits what follows `position`.
    pub fn after(position: String) -> Self {
        Self {
            position,
            recent: BTreeSet::new(),
            polls: 0,
        }
    }

    /// The greatest position emitted so far.
    pub fn position(&self) -> &str {
        &self.position
    }

    /// Reads what is new. `now` (the broker clock) bounds the read from above; at most
    /// `max_pages` store calls, so one poll never runs away on a huge backlog (the next continues).
    pub async fn poll(
        &mut self,
        feed: &dyn EventFeed,
        now: DateTime<Utc>,
        max_pages: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let lookback = self.polls.is_multiple_of(TAIL_LOOKBACK_EVERY);
        self.polls += 1;
        let floor = position_time(&self.position)
            .map(|t| format_time(&(t - Duration::milliseconds(TAIL_LOOKBACK_MS))));
        let mut after = match (&floor, lookback) {
            (Some(floor), true) => floor.clone(),
            _ => self.position.clone(),
        };
        let until = now + Duration::seconds(FUTURE_SLACK_S);
        let mut fresh = Vec::new();
        for _ in 0..max_pages.max(1) {
            let page = feed
                .feed(
                    &FeedQuery {
                        after: after.clone(),
                        until,
                        filter: FeedFilter::default(),
                    },
                    FEED_PAGE,
                )
                .await?;
            for event in page.events {
                let key = feed_key(&event);
                // Behind the lookback floor it was emitted before (or missed for good); inside
                // it, `recent` says whether it was emitted.
                if key <= self.position
                    && (self.recent.contains(&key) || floor.as_ref().is_some_and(|f| key <= *f))
                {
                    continue;
                }
                if self.recent.insert(key.clone()) && key > self.position {
                    self.position = key;
                }
                fresh.push(event);
            }
            match page.next {
                Some(next) => after = next,
                None => break,
            }
        }
        if let Some(t) = position_time(&self.position) {
            let keep_from = format_time(&(t - Duration::milliseconds(TAIL_LOOKBACK_MS)));
            self.recent = self.recent.split_off(&keep_from);
        }
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::model::events::{Actor, ClaimEvent, CommandMeta};
    use std::sync::Mutex;

    fn meta(actor: Actor) -> CommandMeta {
        CommandMeta {
            actor,
            request_id: None,
            correlation_id: None,
        }
    }

    fn allocated(caller: &str, at: DateTime<Utc>) -> SandboxEvent {
        SandboxEvent::SandboxAllocated {
            caller: caller.into(),
            track_name: None,
            idempotency_key: caller.into(),
            claim_stream: format!("claim#{caller}"),
            allocated_at: at,
            expires_at: at + Duration::hours(1),
            lab_duration_s: 3600,
            waited_ms: None,
        }
    }

    fn registered(id: &str) -> SandboxEvent {
        SandboxEvent::SandboxRegistered {
            sandbox_id: id.into(),
            name: format!("lab-{id}"),
            external_id: format!("identity/accounts/{id}"),
            sfdc_account_id: None,
            csp_created_at: None,
        }
    }

    /// The filter matches by type, by actor or payload caller, and by stream or payload sandbox.
    #[test]
    fn filter_matches_actor_payload_and_stream() {
        let t = Utc::now();
        let alloc = EventEnvelope::new(
            "sandbox#s1",
            2,
            &allocated("stu", t),
            &meta(Actor::Track("stu".into())),
            t,
        );
        let claim = EventEnvelope::new(
            "claim#3:stu#stu",
            1,
            &ClaimEvent::ClaimGranted {
                caller: "stu".into(),
                idempotency_key: "stu".into(),
                sandbox_id: "s1".into(),
            },
            &meta(Actor::Track("stu".into())),
            t,
        );
        let by_caller = FeedFilter {
            caller: Some("stu".into()),
            ..FeedFilter::default()
        };
        assert!(by_caller.matches(&alloc) && by_caller.matches(&claim));
        let other = FeedFilter {
            caller: Some("st".into()),
            ..FeedFilter::default()
        };
        assert!(!other.matches(&alloc));
        let by_sandbox = FeedFilter {
            sandbox_id: Some("s1".into()),
            ..FeedFilter::default()
        };
        assert!(by_sandbox.matches(&alloc) && by_sandbox.matches(&claim));
        let by_type = FeedFilter {
            event_type: Some("ClaimGranted".into()),
            ..FeedFilter::default()
        };
        assert!(by_type.matches(&claim) && !by_type.matches(&alloc));
        assert!(FeedFilter::default().is_empty());
    }

    /// Positions: feed keys, RFC 3339 times and hour buckets are accepted (times normalised);
    /// garbage is InvalidCursor; the cursor round-trips.
    #[test]
    fn positions_are_checked_and_normalised() {
        let key = "2026-01-02T03:04:05.006Z#0190a6f0-7b5c-7c3e-8d3f-0123456789ab";
        assert_eq!(parse_position(key).as_deref(), Ok(key));
        assert_eq!(
            parse_position("2026-01-02T04:04:05+01:00").as_deref(),
            Ok("2026-01-02T03:04:05.000Z")
        );
        assert_eq!(
            parse_position("2026-01-02T03").as_deref(),
            Ok("2026-01-02T03")
        );
        for bad in [
            "",
            "x",
            "2026-01-02T03:04:05Z#nope",
            "2026-13-02T03",
            &"9".repeat(200),
        ] {
            assert_eq!(parse_position(bad), Err(StoreError::InvalidCursor), "{bad}");
        }
        let cursor = encode_feed_cursor(key).unwrap_or_default();
        assert_eq!(decode_feed_cursor(&cursor).as_deref(), Ok(key));
        assert_eq!(decode_feed_cursor("%%"), Err(StoreError::InvalidCursor));
        assert_eq!(
            position_time("2026-01-02T03")
                .map(|t| format_time(&t))
                .as_deref(),
            Some("2026-01-02T03:00:00.000Z")
        );
        assert_eq!(
            hour_bucket(
                &Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
                    .single()
                    .unwrap_or_default()
            ),
            "2026-01-02T03"
        );
    }

    /// Point-in-time folding takes the prefix up to the instant and names the holder.
    #[test]
    fn sandbox_at_folds_a_prefix() -> Result<(), StoreError> {
        let t0 = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        let m = meta(Actor::Admin);
        let stream = vec![
            EventEnvelope::new("sandbox#s1", 1, &registered("s1"), &m, t0),
            EventEnvelope::new(
                "sandbox#s1",
                2,
                &allocated("stu", t0),
                &m,
                t0 + Duration::minutes(1),
            ),
            EventEnvelope::new(
                "sandbox#s1",
                3,
                &SandboxEvent::DeletionRequested {
                    caller: "stu".into(),
                    requested_at: t0 + Duration::minutes(5),
                },
                &m,
                t0 + Duration::minutes(5),
            ),
        ];
        assert_eq!(
            sandbox_at(&stream, t0 - Duration::seconds(1))?
                .sandbox
                .status,
            None
        );
        let held = sandbox_at(&stream, t0 + Duration::minutes(2))?;
        assert_eq!(held.holder.as_deref(), Some("stu"));
        assert_eq!(held.events_applied, 2);
        let after = sandbox_at(&stream, t0 + Duration::minutes(5))?;
        assert_eq!(after.holder, None);
        assert_eq!(after.sandbox.owner.as_deref(), Some("stu"));
        Ok(())
    }

    /// An in-memory feed over a vector, for the tail test.
    #[derive(Default)]
    struct VecFeed(Mutex<Vec<EventEnvelope>>);

    #[async_trait]
    impl EventFeed for VecFeed {
        async fn feed(&self, query: &FeedQuery, limit: usize) -> Result<FeedPage, StoreError> {
            let until = format_time(&query.until);
            let mut all: Vec<EventEnvelope> = self.0.lock().map(|v| v.clone()).unwrap_or_default();
            all.sort_by_key(feed_key);
            let events: Vec<EventEnvelope> = all
                .into_iter()
                .filter(|e| feed_key(e) > query.after && feed_key(e) < until)
                .take(limit)
                .collect();
            let next = (events.len() == limit)
                .then(|| events.last().map(feed_key))
                .flatten();
            Ok(FeedPage { events, next })
        }

        async fn first_event_time(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
            Ok(self
                .0
                .lock()
                .ok()
                .and_then(|v| v.iter().map(|e| e.occurred_at).min()))
        }
    }

    /// The tail emits every event once, including one that becomes visible after a later-stamped
    /// event was already emitted (inside the lookback window).
    #[tokio::test]
    async fn tail_emits_late_arrivals_once() -> Result<(), StoreError> {
        let t0 = Utc::now();
        let feed = VecFeed::default();
        let m = meta(Actor::Admin);
        let push = |v: u64, at: DateTime<Utc>| {
            let e = EventEnvelope::new("sandbox#s", v, &registered("s"), &m, at);
            if let Ok(mut all) = feed.0.lock() {
                all.push(e.clone());
            }
            e
        };
        let mut tail = FeedTail::after(format_time(&(t0 - Duration::seconds(1))));
        let a = push(1, t0);
        assert_eq!(tail.poll(&feed, t0, 4).await?, vec![a.clone()]);
        assert!(tail.poll(&feed, t0, 4).await?.is_empty());
        let c = push(3, t0 + Duration::milliseconds(20));
        assert_eq!(tail.poll(&feed, t0, 4).await?, vec![c]);
        // Committed after `c` although stamped before it: a forward read from `c` misses it, the
        // next lookback read finds it.
        let late = push(2, t0 + Duration::milliseconds(10));
        let mut seen = Vec::new();
        for _ in 0..TAIL_LOOKBACK_EVERY {
            seen.extend(tail.poll(&feed, t0, 4).await?);
        }
        assert_eq!(seen, vec![late]);
        for _ in 0..TAIL_LOOKBACK_EVERY {
            assert!(tail.poll(&feed, t0, 4).await?.is_empty());
        }
        Ok(())
    }
}
