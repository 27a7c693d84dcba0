//! `verify --repair`: fixes every difference a [`DriftReport`] lists, through the same
//! version-conditioned row writes as the projector, so it is safe while the projector runs.
//!
//! * A row behind its stream (a lost or discarded stream record, a DLQ'd Lambda batch) → the
//!   missing events are applied from the event table (`domain::store::repair_row`).
//! * A row at the right version with wrong contents (corrupted by hand or by a bug) → rewritten
//!   as the replay has it, conditioned on the version read, with the status counters moved.
//! * A missing row → created from the sandbox's stream.
//! * Counters that still disagree with the replay afterwards → corrected by the difference.
//!
//! A row that no event accounts for cannot be removed through the projector's port; it is left
//! and reported (`projector rebuild` is the fix, after finding out how it got there).

use std::sync::Arc;

use domain::model::projection::StatsDelta;
use domain::store::{repair_row, EventStore, StoreError, ViewStore};
use domain::{PoolRow, SandboxStatus};
use serde::Serialize;

use crate::rebuild::{fold_stream, normalize_row, Drift, DriftReport};

/// What a repair pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepairSummary {
    /// Rows brought up to their stream by applying missing events.
    pub rows_caught_up: u64,
    /// Rows rewritten because their contents were wrong at the right version.
    pub rows_rewritten: u64,
    /// Status counters corrected.
    pub counters_corrected: u64,
    /// Differences left as they were (each explained).
    pub left: Vec<String>,
}

impl RepairSummary {
    /// Rows changed in all.
    pub fn rows_repaired(&self) -> u64 {
        self.rows_caught_up + self.rows_rewritten
    }
}

/// Repairs the rows of `report` in `live`, then corrects the counters so that they equal the
/// replay's. Re-run `verify` afterwards to prove the view clean.
pub async fn repair_drift(
    events: Arc<dyn EventStore>,
    live: Arc<dyn ViewStore>,
    report: &DriftReport,
) -> Result<RepairSummary, StoreError> {
    let mut summary = RepairSummary::default();
    for drift in &report.differences {
        let sandbox_id = match drift {
            Drift::MissingRow { sandbox_id, .. } | Drift::RowDiffers { sandbox_id, .. } => {
                sandbox_id
            }
            Drift::UnexpectedRow { sandbox_id, .. } => {
                summary.left.push(format!(
                    "row {sandbox_id}: no event creates it; remove it with `projector rebuild`"
                ));
                continue;
            }
            // Per-prefix counters move with their rows, so repairing the rows repairs them; a
            // prefix drift with no row behind it shows again in the next verify (fix: rebuild).
            Drift::StatsDiffer { .. }
            | Drift::StatsVsRows { .. }
            | Drift::PrefixStatsDiffer { .. } => continue,
        };
        repair_one(events.as_ref(), live.as_ref(), sandbox_id, &mut summary).await?;
    }
    correct_counters(live.as_ref(), report, &mut summary).await?;
    Ok(summary)
}

/// Re-projects each of `sandbox_ids` from its own stream, as `repair_drift` does for a drifted
/// row (`projector redrive` uses it when the stream no longer holds a failed batch): a row behind
/// is caught up, a row with wrong contents rewritten, and the counters move with the rows.
pub async fn repair_sandboxes(
    events: &dyn EventStore,
    live: &dyn ViewStore,
    sandbox_ids: &[String],
) -> Result<RepairSummary, StoreError> {
    let mut summary = RepairSummary::default();
    for sandbox_id in sandbox_ids {
        repair_one(events, live, sandbox_id, &mut summary).await?;
    }
    Ok(summary)
}

async fn repair_one(
    events: &dyn EventStore,
    live: &dyn ViewStore,
    sandbox_id: &str,
    summary: &mut RepairSummary,
) -> Result<(), StoreError> {
    let outcome = repair_row(events, live, sandbox_id).await?;
    if outcome.applied > 0 {
        summary.rows_caught_up += 1;
    }
    let stream = events
        .load(&domain::model::ids::sandbox_stream(sandbox_id))
        .await?;
    let Some(expected) = fold_stream(&stream)? else {
        return Ok(());
    };
    let Some(current) = live.load_row(sandbox_id).await? else {
        return Ok(());
    };
    if normalize_row(&current) == normalize_row(&expected) {
        return Ok(());
    }
    if current.version != expected.version {
        summary.left.push(format!(
            "row {sandbox_id}: at v{} after repair, stream at v{}",
            current.version, expected.version
        ));
        return Ok(());
    }
    // Same version, wrong contents: rewrite it as the replay has it, conditioned on the version
    // read (a projector that moved the row meanwhile wins, and the next verify re-checks).
    let delta = moved(current.status, expected.status);
    match live
        .write_row(Some(current.version), &expected, &delta)
        .await
    {
        Ok(()) => summary.rows_rewritten += 1,
        Err(StoreError::VersionConflict { .. }) => summary.left.push(format!(
            "row {sandbox_id}: moved by the projector during repair"
        )),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Counters that still differ from the replay (counter drift no row accounts for) are corrected
/// by the difference, written with a no-op rewrite of one row (the port writes counters only
/// together with a row, conditioned on its version).
async fn correct_counters(
    live: &dyn ViewStore,
    report: &DriftReport,
    summary: &mut RepairSummary,
) -> Result<(), StoreError> {
    let now = live.stats().await?;
    let mut delta = [0i64; 6];
    for status in SandboxStatus::ALL {
        delta[status.index()] = report.expected_stats.get(status) - now.get(status);
    }
    let delta = StatsDelta(delta);
    if delta.is_zero() {
        return Ok(());
    }
    let Some(anchor) = any_row(live).await? else {
        summary
            .left
            .push("stats: no row to write the correction with".to_string());
        return Ok(());
    };
    match live.write_row(Some(anchor.version), &anchor, &delta).await {
        Ok(()) => {
            summary.counters_corrected += delta.0.iter().filter(|d| **d != 0).count() as u64;
        }
        Err(StoreError::VersionConflict { .. }) => summary
            .left
            .push("stats: the anchor row moved during repair; run verify --repair again".into()),
        Err(e) => return Err(e),
    }
    Ok(())
}

async fn any_row(live: &dyn ViewStore) -> Result<Option<PoolRow>, StoreError> {
    let page = live
        .list(&domain::store::ListFilter::default(), 1, None)
        .await?;
    match page.rows.into_iter().next() {
        Some(row) => live.load_row(&row.sandbox_id).await,
        None => Ok(None),
    }
}

fn moved(from: SandboxStatus, to: SandboxStatus) -> StatsDelta {
    let mut delta = [0i64; 6];
    if from != to {
        delta[from.index()] -= 1;
        delta[to.index()] += 1;
    }
    StatsDelta(delta)
}
