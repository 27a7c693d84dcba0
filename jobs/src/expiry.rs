//! The store-only time-based jobs.
//!
//! * **auto-expiry**: `Expire` every allocation whose `expires_at + grace` has passed, found with
//!   the `due(Allocated, now − grace)` index query, every page (the reference read one page and
//!   overwrote rows unconditionally, §12 B7/B9). The model re-checks the deadline on the strong
//!   load, and the same transaction releases the student's claim.
//! * **stale removal**: `Retire{reason: "stale_grace_expired"}` every sandbox stale for longer
//!   than the grace (`due_at` of a stale row is when it went stale). The CSP account is not
//!   touched, as in the reference; a sandbox restored meanwhile is refused by the model.

use std::time::Instant;

use domain::model::sandbox::SandboxCommand;
use domain::SandboxStatus;

use crate::error::JobError;
use crate::runner::{chrono_duration, elapsed_ms, Jobs, RowQuery, Sweep};
use crate::summary::{ExpirySummary, JobKind, RunStatus, StaleSummary};

/// The `reason` of a retirement by stale removal.
pub const STALE_RETIRE_REASON: &str = "stale_grace_expired";

fn run_status(stopped: bool, failed: bool) -> RunStatus {
    if failed {
        RunStatus::Failed
    } else if stopped {
        RunStatus::Stopped
    } else {
        RunStatus::Completed
    }
}

impl Jobs {
    /// Runs one auto-expiry pass.
    pub async fn auto_expire(&self) -> Result<ExpirySummary, JobError> {
        let started = Instant::now();
        let meta = self.meta(JobKind::AutoExpire);
        let grace = chrono_duration(self.config.expiry_grace);
        let query = RowQuery::Due {
            status: SandboxStatus::Allocated,
            before: self.broker.clock().now() - grace,
        };
        let (sweep, error) = split(
            self.sweep(query, &meta, |_| SandboxCommand::Expire { grace })
                .await,
        );
        let summary = ExpirySummary {
            status: run_status(sweep.stopped, error.is_some()),
            checked: sweep.checked,
            expired: sweep.applied,
            skipped_conflicts: sweep.skipped_conflicts,
            pages: sweep.pages,
            duration_ms: elapsed_ms(started),
        };
        self.report(
            JobKind::AutoExpire,
            started.elapsed(),
            &summary,
            error.as_ref(),
        );
        let outcome = if error.is_some() { "error" } else { "success" };
        self.metrics
            .expiry_total
            .with_label_values(&[outcome])
            .inc();
        self.metrics.expiry_orphaned.inc_by(summary.expired);
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    /// Retires sandboxes stale for longer than `grace` (default `STALE_GRACE_HOURS`). A
    /// negative grace is refused (the reference let it retire every stale row at once).
    pub async fn delete_stale(
        &self,
        grace: Option<chrono::Duration>,
    ) -> Result<StaleSummary, JobError> {
        let started = Instant::now();
        let grace = match grace {
            Some(grace) => grace.to_std().map_err(|_| {
                JobError::InvalidRequest(format!("grace period {grace} must not be negative"))
            })?,
            None => self.config.stale_grace,
        };
        let meta = self.meta(JobKind::DeleteStale);
        let before = self
            .broker
            .clock()
            .now()
            .checked_sub_signed(chrono_duration(grace))
            .ok_or_else(|| {
                JobError::InvalidRequest(format!("grace period {grace:?} is too long"))
            })?;
        let query = RowQuery::Due {
            status: SandboxStatus::Stale,
            before,
        };
        let (sweep, error) = split(
            self.sweep(query, &meta, |_| SandboxCommand::Retire {
                reason: STALE_RETIRE_REASON.into(),
            })
            .await,
        );
        let summary = StaleSummary {
            status: run_status(sweep.stopped, error.is_some()),
            checked: sweep.checked,
            deleted: sweep.applied,
            skipped_conflicts: sweep.skipped_conflicts,
            pages: sweep.pages,
            grace_period_hours: grace.as_secs() / 3600,
            grace_period_s: grace.as_secs(),
            duration_ms: elapsed_ms(started),
        };
        self.report(
            JobKind::DeleteStale,
            started.elapsed(),
            &summary,
            error.as_ref(),
        );
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// A sweep's counts, and its error if it ended in one.
pub(crate) fn split(result: Result<Sweep, (Sweep, JobError)>) -> (Sweep, Option<JobError>) {
    match result {
        Ok(sweep) => (sweep, None),
        Err((sweep, e)) => (sweep, Some(e)),
    }
}
