//! What each job run reports: the JSON body of the admin endpoints, the one-shot's stdout, and the
//! `counts` of the `job` log line. Reference fields (`synced`, `marked_stale`, `deleted`,
//! `failed`, `duration_ms`, `grace_period_hours`, `status: "completed"`) keep their names.

use serde::Serialize;

use domain::SandboxStatus;

use crate::csp::CircuitState;

/// The jobs, as the CLI, the metrics and the logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// CSP listing → register / stale / restore.
    Sync,
    /// CSP deletes of `pending_deletion` sandboxes.
    Cleanup,
    /// Ends allocations past `expires_at + grace`.
    AutoExpire,
    /// Retires sandboxes stale longer than the grace.
    DeleteStale,
    /// Admin: retire every sandbox in one status.
    BulkDelete,
    /// Earmarks, tops up and closes reservations (ADR 0028).
    Reservations,
    /// Reclaims allocations whose labs stopped sending heartbeats (ADR 0030).
    ReclaimOrphans,
}

impl JobKind {
    /// The `job` label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sync => "sync",
            JobKind::Cleanup => "cleanup",
            JobKind::AutoExpire => "auto_expire",
            JobKind::DeleteStale => "delete_stale",
            JobKind::BulkDelete => "bulk_delete",
            JobKind::Reservations => "reservations",
            JobKind::ReclaimOrphans => "reclaim_orphans",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Everything due was looked at.
    #[default]
    Completed,
    /// Shutdown was requested; the run finished its items in flight and took no new ones.
    Stopped,
    /// The run failed (the summary rides on the error and says how far it got).
    Failed,
}

/// A sync run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SyncSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Distinct active sandbox accounts CSP listed.
    pub listed: u64,
    /// Listing pages read.
    pub pages: u32,
    /// Whether the listing was complete (only a complete listing can make anything stale).
    pub listing_complete: bool,
    /// Listed accounts confirmed in the pool: registered, restored or already available
    /// (the reference's `synced`).
    pub synced: u64,
    /// New sandboxes registered.
    pub registered: u64,
    /// Stale sandboxes listed again and restored.
    pub restored: u64,
    /// Available sandboxes missing from this listing (stale if also missing from the previous one).
    pub missing: u64,
    /// Sandboxes marked stale (missing from two consecutive complete listings).
    pub marked_stale: u64,
    /// Listed accounts the broker holds in another status (allocated, pending, failed, deleted):
    /// sync leaves them alone.
    pub untouched: u64,
    /// Listed accounts whose id the broker refuses (too long, control characters).
    pub invalid: u64,
    /// Commands the model refused because a concurrent writer changed the sandbox first (e.g. an
    /// allocation beat stale-marking), or a concurrent sync recorded its listing first.
    pub skipped_conflicts: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// A cleanup run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CleanupSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Due `pending_deletion` rows read from the view.
    pub candidates: u64,
    /// CSP accounts confirmed gone (`SandboxDeleted`).
    pub deleted: u64,
    /// Failed deletes recorded for a later retry (`DeletionAttemptFailed`), plus quarantines.
    pub failed: u64,
    /// Sandboxes that spent their retry budget (`DeletionFailed`).
    pub quarantined: u64,
    /// Left for a later run with nothing recorded: the circuit was open or CSP rate limited.
    pub deferred: u64,
    /// Candidates the strong re-check found no longer due (the view lagged, or another worker
    /// got there first), or whose command lost a race.
    pub skipped_conflicts: u64,
    /// View pages read.
    pub pages: u32,
    /// NIOSXaaS pre-delete: services cleaned (or counted in shadow mode).
    pub niosxaas_cleaned: u64,
    /// NIOSXaaS pre-delete: nothing to do / disabled.
    pub niosxaas_skipped: u64,
    /// NIOSXaaS pre-delete: failed (the CSP delete went ahead).
    pub niosxaas_failed: u64,
    /// The CSP circuit at the end of the run.
    pub circuit_state: Option<CircuitState>,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// An auto-expiry run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExpirySummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Allocations past `expires_at + grace` in the view.
    pub checked: u64,
    /// Allocations ended (`AllocationExpired`).
    pub expired: u64,
    /// Refused on the strong re-check (marked, or not yet due after all).
    pub skipped_conflicts: u64,
    /// View pages read.
    pub pages: u32,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// A stale-removal run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StaleSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Sandboxes stale longer than the grace in the view.
    pub checked: u64,
    /// Retired from the store (`SandboxRetired`); their CSP accounts are untouched.
    pub deleted: u64,
    /// Refused on the strong re-check (restored meanwhile).
    pub skipped_conflicts: u64,
    /// View pages read.
    pub pages: u32,
    /// The grace applied, whole hours (the reference's field).
    pub grace_period_hours: u64,
    /// The grace applied, seconds.
    pub grace_period_s: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// An admin bulk delete.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BulkDeleteSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// The status whose sandboxes were retired.
    pub sandbox_status: Option<SandboxStatus>,
    /// Rows of that status in the view.
    pub checked: u64,
    /// Retired from the store (`SandboxRetired`, reason `bulk_delete`).
    pub deleted: u64,
    /// Refused on the strong re-check (their status changed meanwhile).
    pub skipped_conflicts: u64,
    /// View pages read.
    pub pages: u32,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// Per-item counts of a summary, for `broker_job_items_total{job,result}`.
pub trait ItemCounts {
    /// `(result, count)` pairs.
    fn item_counts(&self) -> Vec<(&'static str, u64)>;
}

impl ItemCounts for SyncSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("registered", self.registered),
            ("restored", self.restored),
            ("marked_stale", self.marked_stale),
            ("untouched", self.untouched),
            ("invalid", self.invalid),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}

impl ItemCounts for CleanupSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("deleted", self.deleted),
            ("failed", self.failed - self.quarantined.min(self.failed)),
            ("quarantined", self.quarantined),
            ("deferred", self.deferred),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}

impl ItemCounts for ExpirySummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("expired", self.expired),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}

impl ItemCounts for StaleSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("retired", self.deleted),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}

impl ItemCounts for BulkDeleteSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("retired", self.deleted),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}
