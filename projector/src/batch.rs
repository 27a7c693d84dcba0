//! The batched apply every source uses (ADR 0011): one delivered batch becomes one consistent
//! row load, a pure plan (`domain::store::batch`), and as few atomic writes as the view's item
//! limit allows — one SQLite transaction embedded, `TransactWriteItems` of up to 100 items on
//! DynamoDB — with the source's checkpoint in the last of them.
//!
//! Exactly-once rests on three facts: every row write is conditioned on the version it was
//! planned from, a row's stats delta commits in the same atomic write as the row, and the
//! checkpoint commits only with or after every row it covers. A redelivered or overlapping batch
//! therefore finds its versions already in the rows and skips them; a crash between two writes
//! of one batch leaves whole chunks (rows and their counters together) and an old checkpoint, so
//! the redelivery skips what committed and applies the rest; a chunk that lost a race to another
//! projector is written by nobody twice — it is reloaded and planned again from the winner's rows.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use domain::store::batch::{chunk_changes, plan_sandbox, Checkpoint, Delivery, SandboxPlan};
use domain::store::{ApplyOutcome, StoreError};
use domain::EventEnvelope;
use futures::StreamExt;

use crate::Projector;

/// Planning rounds before a batch that keeps losing races to other projectors gives up (as
/// `Unavailable`, so the source retries the batch later).
const MAX_ROUNDS: usize = 16;

/// What applying one delivered batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Events that changed the view (read-back gap events included).
    pub applied: usize,
    /// Events read back from the event table to fill gaps.
    pub repaired: usize,
    /// Events already in the view (redeliveries, overlaps, repeats within the batch).
    pub duplicates: usize,
    /// Events that do not touch the pool view (claims, sync).
    pub ignored: usize,
    /// Delivered events that can never apply, by batch index, with why; ascending.
    pub poison: Vec<(usize, String)>,
    /// Atomic writes committed.
    pub writes: usize,
    /// Writes that lost a race to another projector and were planned again.
    pub conflicts: usize,
}

impl Projector {
    /// Applies a delivered batch and, if given, advances `checkpoint` in the same atomic write
    /// as the batch's last rows. Events may come in any order and any number of times; gaps
    /// are filled from the event table first. `Err` is transient (nothing is lost: committed
    /// chunks are skipped when the source delivers the batch again, since the checkpoint did not
    /// move past them).
    pub async fn apply_batch(
        &self,
        envelopes: &[EventEnvelope],
        checkpoint: Option<Checkpoint>,
    ) -> Result<BatchReport, StoreError> {
        let mut delivery = Delivery::sort(envelopes);
        let mut report = BatchReport {
            ignored: delivery.ignored,
            duplicates: delivery.repeated,
            poison: delivery.poison.clone(),
            ..BatchReport::default()
        };
        for _ in 0..delivery.ignored {
            self.metrics.record(ApplyOutcome::Ignored);
        }
        for _ in 0..delivery.repeated {
            self.metrics.record(ApplyOutcome::AlreadyApplied);
        }
        let limits = self.view.batch_limits();
        let mut checkpoint = checkpoint;
        let mut pending: Vec<String> = delivery.sandboxes.keys().cloned().collect();
        for _ in 0..MAX_ROUNDS {
            let rows = if pending.is_empty() {
                HashMap::new()
            } else {
                self.view.load_rows(&pending).await?
            };
            let mut plans: Vec<(String, SandboxPlan)> = Vec::with_capacity(pending.len());
            for id in &pending {
                let Some(events) = delivery.sandboxes.get_mut(id) else {
                    continue;
                };
                let row = rows.get(id);
                let mut plan = plan_sandbox(row, events);
                if let Some(after) = plan.gap_after {
                    // A record was lost or arrived out of order: read the missing versions back.
                    let up_to = events.events.keys().next_back().copied().unwrap_or(after);
                    let loaded = self.events.load_after(&events.stream_id, after).await?;
                    self.metrics.repairs.inc();
                    match events.merge(loaded, up_to) {
                        Ok(added) => report.repaired += added,
                        Err(reason) => {
                            plan.stuck_at = Some((after + 1, reason));
                        }
                    }
                    if plan.stuck_at.is_none() {
                        plan = plan_sandbox(row, events);
                        if plan.gap_after.is_some() {
                            plan.stuck_at = Some((
                                after + 1,
                                format!(
                                    "{} still has a gap at v{after} after repair",
                                    events.stream_id
                                ),
                            ));
                        }
                    }
                }
                plans.push((id.clone(), plan));
            }
            let changes = plans
                .iter()
                .filter_map(|(_, plan)| plan.change.clone())
                .collect();
            let mut chunks = chunk_changes(changes, checkpoint.clone(), limits);
            // Every chunk but the last is independent of the others; the last carries the
            // checkpoint and may only commit once all of them did.
            let last = chunks.pop();
            let mut lost: HashSet<String> = HashSet::new();
            let results: Vec<_> = futures::stream::iter(chunks)
                .map(|chunk| async move {
                    let result = self.view.write_chunk(&chunk).await;
                    (chunk, result)
                })
                .buffer_unordered(self.write_concurrency.max(1))
                .collect()
                .await;
            let mut failure = None;
            for (chunk, result) in results {
                match result {
                    Ok(()) => report.writes += 1,
                    Err(StoreError::VersionConflict { .. }) => {
                        report.conflicts += 1;
                        lost.extend(chunk.rows.iter().map(|c| c.row.sandbox_id.clone()));
                    }
                    Err(e) => failure = Some(e),
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            if let Some(mut chunk) = last {
                if !lost.is_empty() {
                    // Rows of this batch are still unwritten: the position may not move yet.
                    chunk.checkpoint = None;
                }
                if !chunk.rows.is_empty() || chunk.checkpoint.is_some() {
                    match self.view.write_chunk(&chunk).await {
                        Ok(()) => {
                            report.writes += 1;
                            if chunk.checkpoint.is_some() {
                                checkpoint = None;
                            }
                        }
                        Err(StoreError::VersionConflict { .. }) => {
                            report.conflicts += 1;
                            lost.extend(chunk.rows.iter().map(|c| c.row.sandbox_id.clone()));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            for (id, plan) in plans {
                if lost.contains(&id) {
                    continue;
                }
                self.settle(&id, &plan, &delivery, &mut report);
            }
            if lost.is_empty() && checkpoint.is_none() {
                report.poison.sort_by_key(|(index, _)| *index);
                return Ok(report);
            }
            pending = lost.into_iter().collect();
            pending.sort();
        }
        Err(StoreError::Unavailable(format!(
            "batch still losing races to other projectors after {MAX_ROUNDS} rounds"
        )))
    }

    /// Counts a sandbox's plan once its write committed (or it needed none).
    fn settle(&self, id: &str, plan: &SandboxPlan, delivery: &Delivery, report: &mut BatchReport) {
        report.applied += plan.applied;
        report.duplicates += plan.skipped;
        for _ in 0..plan.applied {
            self.metrics.record(ApplyOutcome::Applied);
        }
        for _ in 0..plan.skipped {
            self.metrics.record(ApplyOutcome::AlreadyApplied);
        }
        let Some(events) = delivery.sandboxes.get(id) else {
            return;
        };
        if let Some(change) = &plan.change {
            let now = Utc::now();
            let from = change.row.version + 1 - plan.applied as u64;
            for delivered in events.events.range(from..=change.row.version) {
                self.metrics.observe_lag(
                    (now - delivered.1.envelope.occurred_at)
                        .num_milliseconds()
                        .max(0),
                );
            }
        }
        if let Some((version, reason)) = &plan.stuck_at {
            for index in events.indices_from(*version) {
                report.poison.push((index, reason.clone()));
            }
        }
    }
}
