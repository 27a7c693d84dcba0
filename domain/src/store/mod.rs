//! Storage ports. The model never sees an adapter: commands talk to an [`EventStore`], reads go
//! through a [`PoolView`], and only the projector writes through a [`ViewStore`]; auditors and
//! the live stream read the time-ordered [`EventFeed`].
//!
//! # Layout
//! - this module — the ports, [`StoreError`], the projector's `apply_event`, cursors;
//! - `append` — the batch rules every adapter checks before writing ([`validate_append`]);
//! - `feed` — the [`EventFeed`] port and its query types;
//! - `group` — grouped appends: several independent appends in one store request, each answered
//!   on its own ([`EventStore::append_group`], ADR 0025);
//! - `batch` — the projector's batch planning into view chunks;
//! - `repair` — re-projecting one row from its stream;
//! - `unknown` — the tally of events a newer release wrote, which readers skip (ADR 0023);
//! - `subjects` — the [`SubjectStore`] port: student ids and their pseudonyms' salts, outside
//!   the log (ADR 0031).

pub mod append;
pub mod batch;
pub mod feed;
pub mod group;

use std::collections::HashMap;

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use crate::model::events::{BrokerEvent, EventEnvelope};
use crate::model::ids::sandbox_id_of;
use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::PrefixStats;
use crate::model::projection::{project, project_unknown, PoolRow, PoolStats, StatsDelta};
use batch::{BatchLimits, ViewChunk};

pub mod repair;
pub mod subjects;
pub mod unknown;

pub use append::validate_append;
pub use feed::{EventFeed, EventLog, FeedFilter, FeedPage, FeedQuery};
pub use group::MemberOutcome;
pub use repair::{repair_row, RepairOutcome};
pub use subjects::{Erasure, PseudonymStatus, SubjectRecord, SubjectStore};

/// A stored event decoded into the model; an envelope of a known type the model cannot read is
/// [`StoreError::Corrupt`] naming its stream and version (the one rule for every reader). An
/// event a newer release wrote is `Ok(BrokerEvent::Unknown)`: each reader decides what it means
/// for it (projectors skip it, commands refuse the stream, audit passes it on; ADR 0023).
pub fn decode_stored(envelope: &EventEnvelope) -> Result<BrokerEvent, StoreError> {
    envelope.decode().map_err(|e| {
        StoreError::Corrupt(format!("{} v{}: {e}", envelope.stream_id, envelope.version))
    })
}

/// DynamoDB's limit on items in one `TransactWriteItems`; the embedded store enforces the same.
pub const MAX_TRANSACTION_ITEMS: usize = 100;

/// Storage failures callers branch on.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StoreError {
    /// Another writer appended to `stream_id` first (or, for the view, moved the row first).
    #[error("version conflict on stream {stream_id}")]
    VersionConflict {
        /// The stream (or view row) that lost the race.
        stream_id: String,
    },
    /// Throttled or unreachable after retries; safe to retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A batch larger than [`MAX_TRANSACTION_ITEMS`].
    #[error("a transaction of {0} items exceeds the limit of {MAX_TRANSACTION_ITEMS}")]
    TooManyItems(usize),
    /// A malformed or foreign pagination cursor.
    #[error("invalid cursor")]
    InvalidCursor,
    /// A batch that is not a valid append (e.g. versions not consecutive).
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// A stored item that cannot be read back.
    #[error("corrupt stored item: {0}")]
    Corrupt(String),
}

/// A page of events from a full scan.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    /// Events, ascending by version within each stream.
    pub events: Vec<EventEnvelope>,
    /// Where the next page starts; `None` at the end.
    pub cursor: Option<String>,
}

/// The event table: the only source of truth.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Every event of a stream in version order, strongly consistent, across all pages.
    async fn load(&self, stream_id: &str) -> Result<Vec<EventEnvelope>, StoreError> {
        self.load_after(stream_id, 0).await
    }

    /// Events of a stream with `version > after`, in order (read repair loads only the gap).
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError>;

    /// The newest event of a stream, if any.
    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError>;

    /// Appends every event atomically: each must take the next free version of its stream (a
    /// taken version is a [`StoreError::VersionConflict`] naming that stream, and then nothing
    /// of the batch is stored). At most [`MAX_TRANSACTION_ITEMS`] events.
    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError>;

    /// Most events one [`EventStore::append_group`] may carry when the store writes a group in
    /// one request; 0 (the default): the store gains nothing from grouping, and the command
    /// service appends each allocation on its own.
    fn group_commit_items(&self) -> usize {
        0
    }

    /// Appends several independent members (each what [`EventStore::append`] takes), one
    /// outcome per member in order (`group` module: the rules). Each member is stored entirely
    /// or not at all, on its own version conditions; a member that continues another member's
    /// stream is stored only together with it, else it is [`MemberOutcome::Orphaned`]. The
    /// default appends the members one after the other.
    async fn append_group(&self, members: Vec<Vec<EventEnvelope>>) -> Vec<MemberOutcome> {
        let continued = group::continued_members(&members);
        let valid = group::validate_group(&members);
        let mut outcomes: Vec<Option<MemberOutcome>> = vec![None; members.len()];
        for (j, (member, valid)) in members.into_iter().zip(valid).enumerate() {
            let outcome = if let Err(e) = valid {
                MemberOutcome::Failed(e)
            } else if group::orphaned_by(&continued[j], &outcomes) {
                MemberOutcome::Orphaned
            } else {
                match self.append(member).await {
                    Ok(()) => MemberOutcome::Stored,
                    Err(e) => MemberOutcome::Failed(e),
                }
            };
            outcomes[j] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(MemberOutcome::Orphaned))
            .collect()
    }

    /// One page of a (parallel) scan over every event: `segment` of `segments`, resuming at
    /// `cursor`. Each stream lies in exactly one segment and comes in version order.
    async fn scan(
        &self,
        segment: u32,
        segments: u32,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError>;

    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Filters of the admin listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<SandboxStatus>,
    /// Only rows of this (current or most recent) owner.
    pub owner: Option<String>,
    /// Only names starting with this.
    pub prefix: Option<String>,
}

/// A page of view rows.
#[derive(Debug, Clone, Default)]
pub struct RowPage {
    /// The rows.
    pub rows: Vec<PoolRow>,
    /// Opaque cursor of the next page; `None` at the end.
    pub cursor: Option<String>,
}

/// Where to look for allocation candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateQuery {
    /// Only names starting with this (exact `begins_with`), if any.
    pub prefix: Option<String>,
    /// Random start on the `pick` axis (no prefix); the query wraps around below it.
    pub start_pick: u32,
    /// With a prefix: continue after this name (the last one the caller saw), wrapping to the
    /// start of the prefix's range — so successive pages walk the whole range instead of
    /// re-reading its first rows.
    pub after_name: Option<String>,
    /// How many rows at most.
    pub limit: usize,
}

/// The read side: eventually consistent rows, indexes and stats, written only by the projector.
#[async_trait]
pub trait PoolView: Send + Sync + 'static {
    /// One row (eventually consistent).
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError>;

    /// The rows of several sandboxes, keyed by id; sandboxes without a row are absent. One
    /// [`PoolView::get`] each unless the adapter reads them in batches (DynamoDB: 100 a request).
    async fn get_many(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        let mut rows = HashMap::with_capacity(sandbox_ids.len());
        for id in sandbox_ids {
            if let Some(row) = self.get(id).await? {
                rows.insert(id.clone(), row);
            }
        }
        Ok(rows)
    }

    /// Available rows for allocation: without a prefix, from `start_pick` upwards on the
    /// `by-status-pick` index, wrapping to the bottom; with a prefix, the `by-status-name` index's
    /// range of names starting with `prefix`, after `after_name` and wrapping to its start.
    /// A write-sharded index (ADR 0014) serves the page from one shard chosen by `start_pick`,
    /// short or not, so the order is per shard and a page may hold fewer than `limit` rows; it
    /// moves on to the other shards only when that shard has none, so a page is empty only when
    /// the view recently showed nothing available (in the prefix). A 409 is decided by a
    /// complete [`PoolView::list`] sweep, never by this page.
    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError>;

    /// The admin listing, paged with an opaque cursor. With a status (and no owner) the rows come
    /// in (name, sandbox id) order, every row of the status exactly once over the pages, whatever
    /// the index sharding (DynamoDB: every row with a non-empty name, the index's sort key): the
    /// allocator's complete sweep before a 409 relies on this.
    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError>;

    /// Rows of `status` whose `due_at <= before` (the `by-due` index on DynamoDB), oldest first.
    async fn due(
        &self,
        status: SandboxStatus,
        before: DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError>;

    /// Counts by status: the sum of the stats shards, O(shards).
    async fn stats(&self) -> Result<PoolStats, StoreError>;

    /// Counts by status per name prefix group ([`pool_prefix`](crate::model::pool_prefix::pool_prefix)): projected counters kept in the
    /// same write as the rows, read in O(groups × shards), never a scan of the pool. The default
    /// (a view without prefix counters, e.g. a test double) reports no groups.
    async fn stats_by_prefix(&self) -> Result<PrefixStats, StoreError> {
        Ok(PrefixStats::new())
    }
}

/// The projector's side of the view.
#[async_trait]
pub trait ViewStore: PoolView {
    /// A row, strongly consistent.
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError>;

    /// Writes `row` and adds `delta` to its stats shard in one transaction, on condition that the
    /// stored row's version is `expected_version` (`None`: no row yet). A failed condition is a
    /// [`StoreError::VersionConflict`].
    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &StatsDelta,
    ) -> Result<(), StoreError>;

    /// How this view takes batched writes ([`ViewStore::write_chunk`]): the item limit of one
    /// atomic write and the number of stats shards.
    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_items: MAX_TRANSACTION_ITEMS,
            stats_shards: 1,
        }
    }

    /// Rows of several sandboxes, strongly consistent; sandboxes without a row are absent.
    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        let mut rows = HashMap::with_capacity(sandbox_ids.len());
        for id in sandbox_ids {
            if let Some(row) = self.load_row(id).await? {
                rows.insert(id.clone(), row);
            }
        }
        Ok(rows)
    }

    /// Writes a chunk of a planned batch: every row on condition that the stored row is still at
    /// its `expected_version`, the rows' stats deltas summed per shard, and the checkpoint.
    /// Adapters make it one atomic write; a failed row condition is a
    /// [`StoreError::VersionConflict`], after which the caller reloads the chunk's rows and plans
    /// them again. This default writes row by row (each row with its own delta, atomically), then
    /// the checkpoint: slower, but a conflict or crash half-way still leaves every row and its
    /// counters in step, which is all the re-plan needs.
    async fn write_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        let mut conflict = None;
        for change in &chunk.rows {
            match self
                .write_row(change.expected_version, &change.row, &change.delta)
                .await
            {
                Ok(()) => {}
                Err(e @ StoreError::VersionConflict { .. }) => conflict = Some(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(conflict) = conflict {
            return Err(conflict);
        }
        if let Some(checkpoint) = &chunk.checkpoint {
            self.save_checkpoint(&checkpoint.source, &checkpoint.position)
                .await?;
        }
        Ok(())
    }

    /// The saved position of a projector source (e.g. a stream shard).
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError>;

    /// Saves the position of a projector source.
    async fn save_checkpoint(&self, source: &str, position: &str) -> Result<(), StoreError>;

    /// Saves `position` only if the stored one is still `expected` (`None`: no checkpoint yet),
    /// in one conditional write; `Ok(false)` when another writer changed it first. Leases held
    /// by one of several processes (the webhook dispatcher's) are built on this. The default
    /// refuses: a view without an atomic compare-and-set (a test double) must not pretend to
    /// have one.
    async fn swap_checkpoint(
        &self,
        source: &str,
        _expected: Option<&str>,
        _position: &str,
    ) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable(format!(
            "this view cannot write checkpoint {source} conditionally"
        )))
    }

    /// Saves `position` under `source` together with the fencing token `fence`, unless a
    /// greater token is already stored there; `Ok(false)` (nothing written) when one is. A
    /// consumer that holds a lease passes the lease's epoch: once a later holder has saved
    /// with its greater epoch, the earlier holder can no longer move the position, whatever it
    /// still believes about its lease (ADR 0027). The token lives beside the position, so a
    /// plain [`ViewStore::save_checkpoint`] of another source is unaffected. The default
    /// refuses, like [`ViewStore::swap_checkpoint`].
    async fn save_checkpoint_fenced(
        &self,
        source: &str,
        _fence: u64,
        _position: &str,
    ) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable(format!(
            "this view cannot fence checkpoint {source}"
        )))
    }

    /// Removes every row, stats shard and view checkpoint (rebuild into a fresh view). The
    /// checkpoints of consumers that are not the view ([`is_view_checkpoint`] false: the webhook
    /// dispatcher's positions and leases) stay: a rebuild changes none of the events they follow.
    async fn clear(&self) -> Result<(), StoreError>;
}

/// Prefix of the checkpoints the webhook dispatcher keeps in the view's checkpoint table
/// (`webhooks:{subscriber}` and its lease `webhooks:{subscriber}:lease`).
pub const WEBHOOK_CHECKPOINT_PREFIX: &str = "webhooks:";

/// True for a checkpoint that belongs to the view (a projector source: a stream shard, the
/// embedded log), which [`ViewStore::clear`] removes with the rows; false for a consumer's own
/// position, which survives a rebuild (docs/liveness.md, path 3).
pub fn is_view_checkpoint(source: &str) -> bool {
    !source.starts_with(WEBHOOK_CHECKPOINT_PREFIX)
        && !source.starts_with(crate::heartbeat::HEARTBEAT_CHECKPOINT_PREFIX)
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Row and stats written.
    Applied,
    /// The row already had this version (a redelivery): nothing written.
    AlreadyApplied,
    /// The row is behind by more than one version: the missing events must be applied first.
    Gap {
        /// The version the row has (0: no row).
        row_version: u64,
    },
    /// Not a sandbox event (claims, sync, or a stream kind a newer release writes): the pool
    /// view does not change.
    Ignored,
}

/// Applies one event to the view, idempotent and order-safe (DESIGN.md §7): skip what is already
/// applied, report a gap instead of writing past it, and write row + stats conditionally on the
/// version read, so two projectors racing on one row cannot both apply.
pub async fn apply_event(
    view: &dyn ViewStore,
    envelope: &EventEnvelope,
) -> Result<ApplyOutcome, StoreError> {
    let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) else {
        if let Some(unknown) = envelope.unknown() {
            unknown::note(&unknown);
        }
        return Ok(ApplyOutcome::Ignored);
    };
    // An event a newer release wrote still takes its version in the row (so the next known
    // event applies without a gap) and holds the row out of allocation (ADR 0023).
    let event = match envelope.decode() {
        Ok(BrokerEvent::Sandbox(event)) => Some(event),
        Ok(BrokerEvent::Unknown(unknown)) => {
            unknown::note(&unknown);
            None
        }
        Ok(_) => return Ok(ApplyOutcome::Ignored),
        Err(e) => return Err(StoreError::Corrupt(e.to_string())),
    };
    let row = view.load_row(sandbox_id).await?;
    let row_version = row.as_ref().map_or(0, |r| r.version);
    if envelope.version <= row_version {
        return Ok(ApplyOutcome::AlreadyApplied);
    }
    if envelope.version > row_version + 1 {
        return Ok(ApplyOutcome::Gap { row_version });
    }
    let expected = row.as_ref().map(|r| r.version);
    let (next, delta) = match &event {
        Some(event) => project(row, envelope, event),
        None => project_unknown(row, envelope),
    };
    let Some(next) = next else {
        return Err(StoreError::Corrupt(format!(
            "{} v{} cannot start a row",
            envelope.stream_id, envelope.version
        )));
    };
    match view.write_row(expected, &next, &delta).await {
        Ok(()) => Ok(ApplyOutcome::Applied),
        // Another projector instance applied this (or a later) version in between.
        Err(StoreError::VersionConflict { .. }) => Ok(ApplyOutcome::AlreadyApplied),
        Err(e) => Err(e),
    }
}

/// Encodes a pagination key as an opaque URL-safe cursor.
pub fn encode_cursor<T: Serialize>(key: &T) -> Option<String> {
    serde_json::to_vec(key)
        .ok()
        .map(|bytes| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Decodes a cursor made by [`encode_cursor`]; anything else is [`StoreError::InvalidCursor`].
pub fn decode_cursor<T: DeserializeOwned>(cursor: &str) -> Result<T, StoreError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| StoreError::InvalidCursor)?;
    serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidCursor)
}

/// The stats shard a sandbox's counters go to: spreads 1,000 transitions/s over `shards`
/// partition keys.
pub fn stats_shard(sandbox_id: &str, shards: u32) -> u32 {
    crate::model::projection::pick_for(sandbox_id, 0) % shards.max(1)
}

/// A cursor position in the admin listing (shared by adapters that page by key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListCursor {
    /// Sort-key value of the last row returned.
    pub after: String,
    /// Its sandbox id (tie-breaker).
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cursors round-trip; garbage and foreign JSON are InvalidCursor, never a panic.
    #[test]
    fn cursors_are_opaque_and_checked() {
        let c = ListCursor {
            after: "lab-1".into(),
            id: "1".into(),
        };
        let encoded = encode_cursor(&c).unwrap_or_default();
        assert_eq!(decode_cursor::<ListCursor>(&encoded), Ok(c));
        assert_eq!(
            decode_cursor::<ListCursor>("not base64!"),
            Err(StoreError::InvalidCursor)
        );
        let foreign = encode_cursor(&42).unwrap_or_default();
        assert_eq!(
            decode_cursor::<ListCursor>(&foreign),
            Err(StoreError::InvalidCursor)
        );
    }

    /// Shards stay in range.
    #[test]
    fn shard_in_range() {
        for i in 0..100 {
            assert!(stats_shard(&i.to_string(), 8) < 8);
        }
        assert_eq!(stats_shard("x", 0), 0);
    }
}
