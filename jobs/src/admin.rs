//! Operator actions that back admin endpoints: re-queue a quarantined deletion, and retire every
//! sandbox of one explicit status. Both go through `Broker::execute` with the caller's metadata
//! (actor `admin`, the request id), so the history says who did it.

use std::time::Instant;

use domain::model::sandbox::{Sandbox, SandboxCommand};
use domain::{Actor, CommandMeta, SandboxStatus};

use crate::error::JobError;
use crate::expiry::split;
use crate::runner::{elapsed_ms, Jobs, RowQuery};
use crate::summary::{BulkDeleteSummary, JobKind, RunStatus};

/// The `reason` of a retirement by bulk delete.
pub const BULK_RETIRE_REASON: &str = "bulk_delete";

/// How far a bulk delete has come (reported after each page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkProgress {
    /// Rows looked at.
    pub checked: u64,
    /// Sandboxes retired.
    pub deleted: u64,
    /// Rows skipped because the sandbox had moved on (the view lagged or a writer won).
    pub skipped_conflicts: u64,
}

impl Jobs {
    /// Re-queues a quarantined (`deletion_failed`) sandbox: back to `pending_deletion` with a
    /// fresh retry budget, due at once. Any other status is refused by the model
    /// ([`JobError::Domain`]: `InvalidTransition`, or `NotFound` for an unknown id).
    /// Events are stamped actor `admin`; see [`Jobs::retry_deletion_with_meta`] to pass a
    /// request id.
    pub async fn retry_deletion(&self, sandbox_id: &str) -> Result<Sandbox, JobError> {
        self.retry_deletion_with_meta(sandbox_id, &admin_meta("retry_deletion"))
            .await
    }

    /// [`Jobs::retry_deletion`] with the caller's event metadata.
    pub async fn retry_deletion_with_meta(
        &self,
        sandbox_id: &str,
        meta: &CommandMeta,
    ) -> Result<Sandbox, JobError> {
        let sandbox = self
            .broker
            .execute(sandbox_id, SandboxCommand::RetryDeletion, meta)
            .await?;
        tracing::info!(target: "job", job = "retry_deletion", sandbox_id, actor = %meta.actor, "quarantined deletion re-queued");
        Ok(sandbox)
    }

    /// Retires (store only; CSP is not called) every sandbox whose status is `status`.
    /// `allocated` is refused — a student holds it — and so is `deleted` (nothing to do). There
    /// is no "every status" form (the reference's wiped the table, §12 B12). Events are stamped
    /// actor `admin`; see [`Jobs::bulk_delete_with_meta`] to pass a request id.
    pub async fn bulk_delete(&self, status: SandboxStatus) -> Result<BulkDeleteSummary, JobError> {
        self.bulk_delete_with_meta(status, &admin_meta("bulk_delete"))
            .await
    }

    /// [`Jobs::bulk_delete`] with the caller's event metadata.
    pub async fn bulk_delete_with_meta(
        &self,
        status: SandboxStatus,
        meta: &CommandMeta,
    ) -> Result<BulkDeleteSummary, JobError> {
        self.bulk_delete_observed(status, meta, &|_| {}).await
    }

    /// [`Jobs::bulk_delete_with_meta`], reporting progress after each page of the sweep (what a
    /// background admin job records).
    pub async fn bulk_delete_observed(
        &self,
        status: SandboxStatus,
        meta: &CommandMeta,
        progress: &(dyn Fn(BulkProgress) + Sync),
    ) -> Result<BulkDeleteSummary, JobError> {
        let refusal = match status {
            SandboxStatus::Allocated => Some(
                "allocated sandboxes belong to students; they end by mark-for-deletion or expiry",
            ),
            SandboxStatus::Deleted => Some("deleted sandboxes are already out of the pool"),
            _ => None,
        };
        if let Some(reason) = refusal {
            return Err(JobError::InvalidRequest(format!(
                "bulk delete refuses status `{status}`: {reason}"
            )));
        }
        let started = Instant::now();
        let (sweep, error) = split(
            self.sweep_observed(
                RowQuery::Status(status),
                meta,
                |_| SandboxCommand::Retire {
                    reason: BULK_RETIRE_REASON.into(),
                },
                &|sweep| {
                    progress(BulkProgress {
                        checked: sweep.checked,
                        deleted: sweep.applied,
                        skipped_conflicts: sweep.skipped_conflicts,
                    })
                },
            )
            .await,
        );
        let summary = BulkDeleteSummary {
            status: if error.is_some() {
                RunStatus::Failed
            } else if sweep.stopped {
                RunStatus::Stopped
            } else {
                RunStatus::Completed
            },
            sandbox_status: Some(status),
            checked: sweep.checked,
            deleted: sweep.applied,
            skipped_conflicts: sweep.skipped_conflicts,
            pages: sweep.pages,
            duration_ms: elapsed_ms(started),
        };
        self.report(
            JobKind::BulkDelete,
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

/// Metadata of an admin action without a request: actor `admin`, a fresh correlation id.
fn admin_meta(action: &str) -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some(format!("{action}-{}", uuid::Uuid::now_v7())),
    }
}
