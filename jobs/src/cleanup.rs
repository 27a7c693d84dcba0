//! Cleanup: delete the CSP accounts of `pending_deletion` sandboxes.
//!
//! Candidates come from the view's `due(PendingDeletion, now)` index — every page, shuffled so
//! that two workers walking the same page collide less — and each is re-checked on a strong load
//! before CSP is called, because the view lags (another worker may have finished it a moment ago).
//! `CLEANUP_CONCURRENCY` deletes run at once, each optionally followed by a pause.
//!
//! * CSP says gone (200/204/404) → `CompleteDeletion`.
//! * CSP failed → `RecordDeletionAttemptFailed` with `next_attempt_at = now + base·2^failures`
//!   (capped); the sandbox leaves the due index until then. Each failure is classified
//!   (ADR 0007): a **transient** one (5xx, timeout, connection error, garbled answer) says the
//!   service was unwell, not that the account cannot be deleted, so it is retried until
//!   `DELETION_RETRY_WINDOW_HOURS` have passed since the first failure; a **refusal** (a 4xx
//!   other than 404/429) counts toward `DELETION_RETRY_MAX_ATTEMPTS`. The failure that spends
//!   the window or the budget → `FailDeletion`: quarantined, listed for operators, out of every
//!   automatic job until an admin `RetryDeletion`.
//! * Circuit open, CSP rate limiting, or CSP rejecting our token (401) → **deferred**: nothing is
//!   recorded against the sandbox and the run stops taking new items (the reference failed every
//!   remaining sandbox, §12 B8).
//!
//! Before the CSP call the worker leases the deletion (`DeletionLeased`, `DELETION_LEASE_SEC`),
//! a version-checked append: of two workers that picked the same sandbox, one gets the lease and
//! the other skips it, so the CSP normally sees one DELETE per sandbox. The lease lapses by
//! itself, so a worker that dies mid-item only delays that sandbox. Deletion stays at-least-once
//! at heart (a lease that lapses while its holder is still waiting on CSP lets a second DELETE
//! through; CSP answers it with 404, which counts as gone), but only one `SandboxDeleted` is
//! ever appended — the other worker's `CompleteDeletion` is refused on its strong load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures::stream::{self, StreamExt};
use rand::seq::SliceRandom;

use domain::model::sandbox::SandboxCommand;
use domain::{CommandMeta, PoolRow, SandboxStatus};

use crate::error::{is_refusal, JobError};
use crate::niosxaas::PreDeleteOutcome;
use crate::runner::{chrono_duration, elapsed_ms, Jobs, RowQuery};
use crate::summary::{CleanupSummary, JobKind, RunStatus};

/// What happened to one candidate.
enum Cleaned {
    Deleted,
    Failed,
    Quarantined,
    Deferred,
    Skipped,
}

/// State shared by the items of one run.
struct Run {
    meta: CommandMeta,
    now: chrono::DateTime<chrono::Utc>,
    /// Set by the first deferral: later items are deferred without calling CSP.
    deferring: AtomicBool,
}

impl Jobs {
    /// Runs one cleanup pass over every due `pending_deletion` sandbox.
    pub async fn cleanup(&self) -> Result<CleanupSummary, JobError> {
        let started = Instant::now();
        let mut summary = CleanupSummary::default();
        let result = self.cleanup_into(&mut summary).await;
        summary.duration_ms = elapsed_ms(started);
        summary.circuit_state = Some(self.csp.circuit_state());
        summary.status = match (&result, self.is_stopping()) {
            (Err(_), _) => RunStatus::Failed,
            (Ok(()), true) => RunStatus::Stopped,
            (Ok(()), false) => RunStatus::Completed,
        };
        let error = result.err();
        self.report(
            JobKind::Cleanup,
            started.elapsed(),
            &summary,
            error.as_ref(),
        );
        let m = &self.metrics;
        let outcome = if error.is_some() { "error" } else { "success" };
        m.cleanup_total.with_label_values(&[outcome]).inc();
        m.cleanup_deleted.inc_by(summary.deleted);
        m.cleanup_failed.inc_by(summary.failed);
        m.cleanup_duration.observe(started.elapsed().as_secs_f64());
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    async fn cleanup_into(&self, summary: &mut CleanupSummary) -> Result<(), JobError> {
        let run = Run {
            meta: self.meta(JobKind::Cleanup),
            now: self.broker.clock().now(),
            deferring: AtomicBool::new(false),
        };
        let query = RowQuery::Due {
            status: SandboxStatus::PendingDeletion,
            before: run.now,
        };
        let mut cursor: Option<String> = None;
        loop {
            if self.is_stopping() || run.deferring.load(Ordering::Relaxed) {
                return Ok(());
            }
            let page = self.page(query, cursor.as_deref()).await?;
            summary.pages += 1;
            summary.candidates += page.rows.len() as u64;
            let mut rows = page.rows;
            rows.shuffle(&mut rand::rng());
            let results: Vec<_> = stream::iter(rows)
                .map(|row| self.clean_one(row, &run))
                .buffer_unordered(self.config.cleanup_concurrency)
                .collect()
                .await;
            let mut failure = None;
            for result in results {
                match result {
                    Ok((cleaned, pre_delete)) => {
                        match cleaned {
                            Cleaned::Deleted => summary.deleted += 1,
                            Cleaned::Failed => summary.failed += 1,
                            Cleaned::Quarantined => {
                                summary.failed += 1;
                                summary.quarantined += 1;
                            }
                            Cleaned::Deferred => summary.deferred += 1,
                            Cleaned::Skipped => summary.skipped_conflicts += 1,
                        }
                        match pre_delete {
                            Some(PreDeleteOutcome::Skipped) => summary.niosxaas_skipped += 1,
                            Some(PreDeleteOutcome::Cleaned { .. }) => summary.niosxaas_cleaned += 1,
                            Some(PreDeleteOutcome::Failed { .. }) => summary.niosxaas_failed += 1,
                            None => {}
                        }
                    }
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            crate::progress::report(summary.deleted, summary.failed + summary.skipped_conflicts);
            if let Some(e) = failure {
                return Err(e);
            }
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// One candidate: strong re-check, pre-delete hook, CSP delete, then the command that
    /// records the result.
    async fn clean_one(
        &self,
        row: PoolRow,
        run: &Run,
    ) -> Result<(Cleaned, Option<PreDeleteOutcome>), JobError> {
        if self.is_stopping() || run.deferring.load(Ordering::Relaxed) {
            return Ok((Cleaned::Deferred, None));
        }
        let id = row.sandbox_id.as_str();
        let loaded = self.broker.load_sandbox(id).await?;
        let sandbox = loaded.sandbox;
        let due = sandbox.next_attempt_at.is_none_or(|at| at <= run.now);
        let now = self.broker.clock().now();
        if sandbox.status != Some(SandboxStatus::PendingDeletion)
            || !due
            || sandbox.leased_to_other(&self.worker_id, now).is_some()
        {
            // The view lagged: already deleted, retired, quarantined, failed again or being
            // deleted by another worker right now. Nothing to do; no CSP call.
            return Ok((Cleaned::Skipped, None));
        }
        let lease = SandboxCommand::LeaseDeletion {
            worker: self.worker_id.clone(),
            until: now + chrono_duration(self.config.deletion_lease),
        };
        // On a version conflict the command re-decides on the new state: if another worker's
        // lease (or result) got there first, it is refused and we skip without calling CSP.
        let sandbox = match self.broker.execute(id, lease, &run.meta).await {
            Ok(leased) => leased,
            Err(e) if is_refusal(&e) => return Ok((Cleaned::Skipped, None)),
            Err(e) => return Err(e.into()),
        };
        let pre_delete = self.pre_delete.before_delete(&sandbox).await;
        if let PreDeleteOutcome::Failed { error } = &pre_delete {
            tracing::warn!(target: "job", job = "cleanup", sandbox_id = id, error = %error, "NIOSXaaS pre-delete failed; deleting the CSP account anyway");
        }
        let deleted = self.csp.delete_sandbox(&sandbox.external_id).await;
        self.pause_after_delete().await;
        let cleaned = match deleted {
            Ok(gone) => {
                let command = SandboxCommand::CompleteDeletion {
                    csp_status: Some(gone.status),
                };
                match self.broker.execute(id, command, &run.meta).await {
                    Ok(_) => Cleaned::Deleted,
                    // Another worker recorded the deletion first (its DELETE or ours removed
                    // the account; CSP is idempotent), or an admin retired the sandbox.
                    Err(e) if is_refusal(&e) => Cleaned::Skipped,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if e.is_deferral() => {
                if !run.deferring.swap(true, Ordering::Relaxed) {
                    if matches!(e, crate::csp::CspError::Unauthorized) {
                        tracing::error!(target: "job", job = "cleanup", error = %e, "CSP rejected the token; deferring all deletions");
                    } else {
                        tracing::warn!(target: "job", job = "cleanup", error = %e, "CSP unavailable; deferring the rest of this run");
                    }
                }
                Cleaned::Deferred
            }
            Err(e) => {
                // Record the failure only against the state we decided on: if another worker
                // changed the sandbox meanwhile (deleted it, or recorded its own failure), ours
                // would double-count an attempt.
                let current = self.broker.load_sandbox(id).await?.sandbox;
                if current.version != sandbox.version {
                    return Ok((Cleaned::Skipped, Some(pre_delete)));
                }
                let failures = sandbox.attempts + 1;
                let transient = e.is_transient();
                let error = e.to_string();
                let now = self.broker.clock().now();
                let spent = if transient {
                    // The window runs from the first failure of this run of failures (a
                    // sandbox that waited long for cleanup is not penalised for the wait).
                    let since = sandbox.failing_since.unwrap_or(now);
                    now - since >= chrono_duration(self.config.deletion_retry_window)
                } else {
                    sandbox.refusals + 1 >= self.config.deletion_max_attempts
                };
                let (command, cleaned) = if spent {
                    (
                        SandboxCommand::FailDeletion { error, transient },
                        Cleaned::Quarantined,
                    )
                } else {
                    let next_attempt_at = now + self.deletion_backoff(sandbox.attempts);
                    (
                        SandboxCommand::RecordDeletionAttemptFailed {
                            error,
                            next_attempt_at,
                            transient,
                        },
                        Cleaned::Failed,
                    )
                };
                tracing::info!(target: "job", job = "cleanup", sandbox_id = id, attempt = failures, transient, error = %e, "CSP delete failed");
                match self.broker.execute(id, command, &run.meta).await {
                    Ok(_) => cleaned,
                    Err(e) if is_refusal(&e) => Cleaned::Skipped,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok((cleaned, Some(pre_delete)))
    }

    /// The wait after `prior_failures` failed attempts: `base · 2^prior_failures`, capped.
    pub fn deletion_backoff(&self, prior_failures: u32) -> chrono::Duration {
        let max = self.config.deletion_backoff_max;
        let wait = 2u32
            .checked_pow(prior_failures)
            .and_then(|factor| self.config.deletion_backoff_base.checked_mul(factor))
            .map_or(max, |wait| wait.min(max));
        chrono_duration(wait)
    }

    /// `CLEANUP_PER_SANDBOX_DELAY_SEC` after each delete (per concurrency slot), cut short by a
    /// stop request.
    async fn pause_after_delete(&self) {
        let delay = self.config.cleanup_per_sandbox_delay;
        if delay.is_zero() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.stopped() => {}
        }
    }
}
