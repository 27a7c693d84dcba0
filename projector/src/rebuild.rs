//! Rebuild and verify: replay the whole event table into an empty view, and compare a replayed
//! view with the live one (DESIGN.md §7, "a drift report an auditor can run").
//!
//! Replay reads the events with a paged *parallel* scan ([`EventStore::scan`]): every stream lies
//! in exactly one scan segment and arrives there in version order, so each segment is applied by
//! its own task, one page at a time. A page goes through the same [`Projector::apply_batch`] as
//! every live source (its transactions written concurrently, its stats summed per shard), so a
//! rebuilt view is the view the projector would have written.
//!
//! Verification compares row by row (every row of both views, paged through
//! [`PoolView::list`]) and the stats (summed shards), and also checks the live view against
//! itself: its stats must equal its rows counted by status. A row that differs is re-checked once
//! against a fresh fold of its own stream, so a row that merely lagged behind an append during the
//! comparison is not reported as drift.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::model::events::{truncate_to_millis, BrokerEvent};
use domain::model::ids::sandbox_stream;
use domain::model::projection::{project, project_unknown};
use domain::store::{EventStore, ListFilter, PoolView, StoreError, ViewStore};
use domain::{EventEnvelope, PoolRow, PoolStats, SandboxStatus};
use serde::Serialize;

use crate::{Projector, ProjectorMetrics};

/// How long [`verify`] waits before re-checking rows that differed on the first comparison.
const RECHECK_DELAY: Duration = Duration::from_millis(300);

/// Tunables of a replay.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Parallel scan segments read concurrently (`--segments`, default 4). The embedded store
    /// keeps everything in segment 0; the others come back empty at once.
    pub segments: u32,
    /// Events per scan page (`--page-size`, default 500).
    pub page_size: usize,
    /// Transactions of one page written concurrently (`--concurrency`, default 16): DynamoDB
    /// writes are latency-bound, so a single in-order writer would take hours on a large table.
    pub concurrency: usize,
    /// Rows per page when reading views for comparison (default 500).
    pub list_page: usize,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            segments: 4,
            page_size: 500,
            concurrency: 16,
            list_page: 500,
        }
    }
}

/// Live counters of a running replay, for progress output (the CLI prints them on stderr).
#[derive(Debug, Default)]
pub struct RebuildProgress {
    /// Events read from the event table.
    pub events_read: AtomicU64,
    /// Events that changed the view.
    pub applied: AtomicU64,
    /// Scan pages read.
    pub pages: AtomicU64,
    /// Segments finished.
    pub segments_done: AtomicU64,
}

impl RebuildProgress {
    /// `(events read, applied, pages, segments done)` at this moment.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.events_read.load(Ordering::Relaxed),
            self.applied.load(Ordering::Relaxed),
            self.pages.load(Ordering::Relaxed),
            self.segments_done.load(Ordering::Relaxed),
        )
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RebuildSummary {
    /// Events read.
    pub events_read: u64,
    /// Events that changed the view.
    pub applied: u64,
    /// Wall time, milliseconds.
    pub elapsed_ms: u64,
}

/// Replays every event of `events` into `target` after clearing it (rows, stats, the view's
/// checkpoints; consumers' checkpoints such as the webhook dispatcher's stay).
/// `target` must not be a view that a live projector is writing: clearing it under a running
/// projector would make the two race on every row.
pub async fn rebuild_into(
    events: Arc<dyn EventStore>,
    target: Arc<dyn ViewStore>,
    options: &RebuildOptions,
    progress: Arc<RebuildProgress>,
) -> Result<RebuildSummary, StoreError> {
    let started = Instant::now();
    target.clear().await?;
    let projector = Projector::new(events, target, ProjectorMetrics::unregistered())
        .with_write_concurrency(options.concurrency);
    let segments = options.segments.max(1);
    let tasks = (0..segments).map(|segment| {
        replay_segment(
            projector.clone(),
            segment,
            segments,
            options.clone(),
            Arc::clone(&progress),
        )
    });
    // Segments are independent (no stream spans two), so they run concurrently; the first error
    // stops the replay — a partial rebuild is reported as a failure, never as a result.
    futures::future::try_join_all(tasks).await?;
    let (events_read, applied, _, _) = progress.snapshot();
    Ok(RebuildSummary {
        events_read,
        applied,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

async fn replay_segment(
    projector: Projector,
    segment: u32,
    segments: u32,
    options: RebuildOptions,
    progress: Arc<RebuildProgress>,
) -> Result<(), StoreError> {
    let mut cursor = None;
    loop {
        let page = projector
            .events()
            .scan(segment, segments, cursor, options.page_size.max(1))
            .await?;
        progress.pages.fetch_add(1, Ordering::Relaxed);
        progress
            .events_read
            .fetch_add(page.events.len() as u64, Ordering::Relaxed);
        // One page is one batch: a stream cut by a page boundary continues on the next page,
        // which starts only after this whole page is written, so its order holds across pages.
        let report = projector.apply_batch(&page.events, None).await?;
        progress
            .applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        cursor = page.cursor;
        if cursor.is_none() {
            progress.segments_done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }
}

/// One field of a row that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    /// The `PoolRow` field name.
    pub field: String,
    /// Its value in the live view (JSON).
    pub live: serde_json::Value,
    /// Its value after replay (JSON).
    pub expected: serde_json::Value,
}

/// One difference between the live view and the replayed one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Drift {
    /// The events say the row exists; the live view has none.
    MissingRow {
        /// The sandbox.
        sandbox_id: String,
        /// Version the replay reached.
        expected_version: u64,
    },
    /// The live view has a row no event accounts for.
    UnexpectedRow {
        /// The sandbox.
        sandbox_id: String,
        /// Version of the live row.
        live_version: u64,
    },
    /// The row exists in both but differs.
    RowDiffers {
        /// The sandbox.
        sandbox_id: String,
        /// Fields that differ (the `version` field among them if the live row is behind).
        fields: Vec<FieldDiff>,
    },
    /// A status counter (sum of the stats shards) differs from the replayed one.
    StatsDiffer {
        /// The status.
        status: SandboxStatus,
        /// Live count.
        live: i64,
        /// Replayed count.
        expected: i64,
    },
    /// A per-prefix counter differs from the replayed one (ADR 0018).
    PrefixStatsDiffer {
        /// The name prefix group.
        prefix: String,
        /// The status.
        status: SandboxStatus,
        /// Live count.
        live: i64,
        /// Replayed count.
        expected: i64,
    },
    /// The live stats disagree with the live rows counted by status (counter drift inside the
    /// live view, whatever the events say).
    StatsVsRows {
        /// The status.
        status: SandboxStatus,
        /// Live stats count.
        stats: i64,
        /// Live rows with that status.
        rows: i64,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::MissingRow {
                sandbox_id,
                expected_version,
            } => write!(
                f,
                "row {sandbox_id}: missing from the live view (expected at v{expected_version})"
            ),
            Drift::UnexpectedRow {
                sandbox_id,
                live_version,
            } => write!(
                f,
                "row {sandbox_id}: in the live view (v{live_version}) but no event creates it"
            ),
            Drift::RowDiffers { sandbox_id, fields } => {
                write!(f, "row {sandbox_id}:")?;
                for d in fields {
                    write!(f, " {}: live {} expected {};", d.field, d.live, d.expected)?;
                }
                Ok(())
            }
            Drift::StatsDiffer {
                status,
                live,
                expected,
            } => write!(
                f,
                "stats {}: live {live} expected {expected}",
                status.as_str()
            ),
            Drift::PrefixStatsDiffer {
                prefix,
                status,
                live,
                expected,
            } => write!(
                f,
                "stats of prefix {prefix:?} {}: live {live} expected {expected}",
                status.as_str()
            ),
            Drift::StatsVsRows {
                status,
                stats,
                rows,
            } => write!(
                f,
                "stats {}: live counter {stats} but {rows} live rows",
                status.as_str()
            ),
        }
    }
}

/// The result of [`verify`]: what was compared and every difference found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    /// The replay that produced the expected view.
    pub rebuild: RebuildSummary,
    /// Rows in the live view.
    pub live_rows: u64,
    /// Rows in the replayed view.
    pub expected_rows: u64,
    /// Live stats (sum of shards).
    pub live_stats: PoolStats,
    /// Replayed stats.
    pub expected_stats: PoolStats,
    /// Every difference, rows first (by sandbox id), then stats.
    pub differences: Vec<Drift>,
}

impl DriftReport {
    /// True when the live view equals the replay.
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Replays every event into `scratch` (cleared first; an in-memory embedded store works for both
/// store kinds) and compares the result with `live`. Differences are reported, never repaired:
/// the fix is `projector rebuild`, after finding out why.
pub async fn verify(
    events: Arc<dyn EventStore>,
    live: Arc<dyn PoolView>,
    scratch: Arc<dyn ViewStore>,
    options: &RebuildOptions,
    progress: Arc<RebuildProgress>,
) -> Result<DriftReport, StoreError> {
    let rebuild =
        rebuild_into(Arc::clone(&events), Arc::clone(&scratch), options, progress).await?;
    let expected = all_rows(scratch.as_ref(), options.list_page).await?;
    let live_rows = all_rows(live.as_ref(), options.list_page).await?;
    let expected_stats = scratch.stats().await?;
    let live_stats = live.stats().await?;

    let ids: std::collections::BTreeSet<&String> =
        expected.keys().chain(live_rows.keys()).collect();
    let suspects: Vec<&String> = ids
        .into_iter()
        .filter(|id| live_rows.get(*id).map(normalize_row) != expected.get(*id).map(normalize_row))
        .collect();
    let mut differences = Vec::new();
    if !suspects.is_empty() {
        // One short wait for all suspects covers a projector a few hundred milliseconds behind.
        tokio::time::sleep(RECHECK_DELAY).await;
    }
    for id in suspects {
        differences.extend(recheck(events.as_ref(), live.as_ref(), id).await?);
    }
    for status in SandboxStatus::ALL {
        let (l, e) = (live_stats.get(status), expected_stats.get(status));
        if l != e {
            differences.push(Drift::StatsDiffer {
                status,
                live: l,
                expected: e,
            });
        }
        let rows = live_rows.values().filter(|r| r.status == status).count() as i64;
        if l != rows {
            differences.push(Drift::StatsVsRows {
                status,
                stats: l,
                rows,
            });
        }
    }
    let live_prefixes = live.stats_by_prefix().await?;
    let expected_prefixes = scratch.stats_by_prefix().await?;
    let prefixes: std::collections::BTreeSet<&String> = live_prefixes
        .keys()
        .chain(expected_prefixes.keys())
        .collect();
    for prefix in prefixes {
        for status in SandboxStatus::ALL {
            let count = |stats: &domain::model::pool_prefix::PrefixStats| {
                stats.get(prefix).map_or(0, |s| s.get(status))
            };
            let (l, e) = (count(&live_prefixes), count(&expected_prefixes));
            if l != e {
                differences.push(Drift::PrefixStatsDiffer {
                    prefix: prefix.clone(),
                    status,
                    live: l,
                    expected: e,
                });
            }
        }
    }
    Ok(DriftReport {
        rebuild,
        live_rows: live_rows.len() as u64,
        expected_rows: expected.len() as u64,
        live_stats,
        expected_stats,
        differences,
    })
}

/// Every row of a view, by sandbox id (the listing pages by an opaque cursor; DynamoDB returns
/// them in no particular order, hence the map).
pub async fn all_rows(
    view: &dyn PoolView,
    page_size: usize,
) -> Result<BTreeMap<String, PoolRow>, StoreError> {
    let mut rows = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = view
            .list(&ListFilter::default(), page_size.max(1), cursor.as_deref())
            .await?;
        rows.extend(page.rows.into_iter().map(|r| (r.sandbox_id.clone(), r)));
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(rows),
        }
    }
}

/// A row at the view's precision: times to the millisecond. The DynamoDB view stores times as
/// epoch milliseconds (numeric index keys) while payload times carry nanoseconds, so a replay
/// into the embedded store and the live DynamoDB view agree only at this precision.
pub fn normalize_row(row: &PoolRow) -> PoolRow {
    let ms = |t: &Option<chrono::DateTime<chrono::Utc>>| t.map(truncate_to_millis);
    PoolRow {
        allocated_at: ms(&row.allocated_at),
        expires_at: ms(&row.expires_at),
        deletion_requested_at: ms(&row.deletion_requested_at),
        due_at: ms(&row.due_at),
        updated_at: truncate_to_millis(row.updated_at),
        ..row.clone()
    }
}

/// Folds one sandbox stream with the pure projection: the row the view should hold for it.
pub fn fold_stream(events: &[EventEnvelope]) -> Result<Option<PoolRow>, StoreError> {
    let mut row = None;
    for envelope in events {
        row = match envelope.decode() {
            Ok(BrokerEvent::Sandbox(event)) => project(row, envelope, &event).0,
            // Written by a newer release: the row advances past it and is held (ADR 0023),
            // exactly as the live projector does, so a verify finds no drift.
            Ok(BrokerEvent::Unknown(_)) => project_unknown(row, envelope).0,
            Ok(_) => continue,
            Err(e) => {
                return Err(StoreError::Corrupt(format!(
                    "{} v{}: {e}",
                    envelope.stream_id, envelope.version
                )))
            }
        };
    }
    Ok(row)
}

/// A row that differed gets a second look: re-read the live row and fold the stream afresh. If
/// they agree now, the first read caught the projector mid-flight (or the replay predates an
/// append), which is lag, not drift.
async fn recheck(
    events: &dyn EventStore,
    live: &dyn PoolView,
    sandbox_id: &str,
) -> Result<Option<Drift>, StoreError> {
    let stream = events.load(&sandbox_stream(sandbox_id)).await?;
    let expected = fold_stream(&stream)?;
    let current = live.get(sandbox_id).await?.map(|r| normalize_row(&r));
    let expected = expected.map(|r| normalize_row(&r));
    if current == expected {
        return Ok(None);
    }
    Ok(Some(match (current, expected) {
        (None, Some(e)) => Drift::MissingRow {
            sandbox_id: sandbox_id.to_string(),
            expected_version: e.version,
        },
        (Some(l), None) => Drift::UnexpectedRow {
            sandbox_id: sandbox_id.to_string(),
            live_version: l.version,
        },
        (Some(l), Some(e)) => Drift::RowDiffers {
            sandbox_id: sandbox_id.to_string(),
            fields: field_diffs(&l, &e),
        },
        (None, None) => return Ok(None),
    }))
}

/// The fields in which two rows differ, compared as JSON.
pub fn field_diffs(live: &PoolRow, expected: &PoolRow) -> Vec<FieldDiff> {
    let as_map = |row: &PoolRow| match serde_json::to_value(row) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (l, e) = (as_map(live), as_map(expected));
    let mut fields: Vec<&String> = l.keys().chain(e.keys()).collect();
    fields.sort();
    fields.dedup();
    fields
        .into_iter()
        .filter_map(|field| {
            let (lv, ev) = (
                l.get(field).cloned().unwrap_or_default(),
                e.get(field).cloned().unwrap_or_default(),
            );
            (lv != ev).then(|| FieldDiff {
                field: field.clone(),
                live: lv,
                expected: ev,
            })
        })
        .collect()
}
