//! Job summaries as structured log fields. The `job finished` line carries each count as its own
//! JSON field (`"deleted":3`), not a JSON document inside a string, so log queries and metric
//! filters can select on them (`$.deleted > 0`).
//!
//! `tracing` field names are fixed at compile time and its JSON output has no nested objects
//! without unstable features, so every field any summary has is listed once here; a summary
//! without it leaves it out of the line (`None` fields are not written).

use serde::Serialize;

/// Every field of every run summary, read from its serialised form.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SummaryFields {
    /// `completed`, `stopped` or `failed`.
    pub status: Option<String>,
    /// Sync: accounts the CSP listed.
    pub listed: Option<u64>,
    /// Pages read (CSP listing or view).
    pub pages: Option<u64>,
    /// Sync: whether the listing reached its end.
    pub listing_complete: Option<bool>,
    /// Sync: accounts the view knows after the run.
    pub synced: Option<u64>,
    /// Sync: new sandboxes registered.
    pub registered: Option<u64>,
    /// Sync: stale sandboxes seen again.
    pub restored: Option<u64>,
    /// Sync: sandboxes missing from the listing.
    pub missing: Option<u64>,
    /// Sync: sandboxes marked stale.
    pub marked_stale: Option<u64>,
    /// Sync: sandboxes left as they were.
    pub untouched: Option<u64>,
    /// Sync: listing entries refused as invalid.
    pub invalid: Option<u64>,
    /// Commands skipped because a concurrent writer won.
    pub skipped_conflicts: Option<u64>,
    /// Cleanup: sandboxes waiting for deletion.
    pub candidates: Option<u64>,
    /// Sandboxes deleted.
    pub deleted: Option<u64>,
    /// Cleanup: failed CSP deletes.
    pub failed: Option<u64>,
    /// Cleanup: deletions quarantined.
    pub quarantined: Option<u64>,
    /// Cleanup: deletions deferred (open circuit, long `Retry-After`).
    pub deferred: Option<u64>,
    /// Cleanup: NIOSXaaS pre-delete successes.
    pub niosxaas_cleaned: Option<u64>,
    /// Cleanup: NIOSXaaS pre-delete skips.
    pub niosxaas_skipped: Option<u64>,
    /// Cleanup: NIOSXaaS pre-delete failures.
    pub niosxaas_failed: Option<u64>,
    /// Cleanup: the circuit breaker's state at the end.
    pub circuit_state: Option<String>,
    /// Rows checked.
    pub checked: Option<u64>,
    /// Auto-expiry: allocations ended.
    pub expired: Option<u64>,
    /// Stale removal: the grace, hours.
    pub grace_period_hours: Option<u64>,
    /// Stale removal: the grace, seconds.
    pub grace_period_s: Option<u64>,
    /// Bulk delete: the status it deleted.
    pub sandbox_status: Option<String>,
}

/// The summary keys [`SummaryFields`] carries; the run's own `duration_ms` is logged apart.
pub const SUMMARY_KEYS: [&str; 26] = [
    "status",
    "listed",
    "pages",
    "listing_complete",
    "synced",
    "registered",
    "restored",
    "missing",
    "marked_stale",
    "untouched",
    "invalid",
    "skipped_conflicts",
    "candidates",
    "deleted",
    "failed",
    "quarantined",
    "deferred",
    "niosxaas_cleaned",
    "niosxaas_skipped",
    "niosxaas_failed",
    "circuit_state",
    "checked",
    "expired",
    "grace_period_hours",
    "grace_period_s",
    "sandbox_status",
];

impl SummaryFields {
    /// The fields of `summary` (any of the run summaries).
    pub fn of<S: Serialize>(summary: &S) -> Self {
        let value = serde_json::to_value(summary).unwrap_or_default();
        let n = |key: &str| value.get(key).and_then(serde_json::Value::as_u64);
        let text = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        Self {
            status: text("status"),
            listed: n("listed"),
            pages: n("pages"),
            listing_complete: value
                .get("listing_complete")
                .and_then(serde_json::Value::as_bool),
            synced: n("synced"),
            registered: n("registered"),
            restored: n("restored"),
            missing: n("missing"),
            marked_stale: n("marked_stale"),
            untouched: n("untouched"),
            invalid: n("invalid"),
            skipped_conflicts: n("skipped_conflicts"),
            candidates: n("candidates"),
            deleted: n("deleted"),
            failed: n("failed"),
            quarantined: n("quarantined"),
            deferred: n("deferred"),
            niosxaas_cleaned: n("niosxaas_cleaned"),
            niosxaas_skipped: n("niosxaas_skipped"),
            niosxaas_failed: n("niosxaas_failed"),
            circuit_state: text("circuit_state"),
            checked: n("checked"),
            expired: n("expired"),
            grace_period_hours: n("grace_period_hours"),
            grace_period_s: n("grace_period_s"),
            sandbox_status: text("sandbox_status"),
        }
    }
}

/// Logs one event at `$level` on `$target` with every [`SummaryFields`] field of `$fields`
/// flattened into the line, then the caller's own fields and message.
#[macro_export]
macro_rules! log_summary {
    (target: $target:expr, $level:expr, $fields:expr, $($rest:tt)*) => {{
        let f: &$crate::log_fields::SummaryFields = &$fields;
        ::tracing::event!(
            target: $target,
            $level,
            status = f.status.as_deref(),
            listed = f.listed,
            pages = f.pages,
            listing_complete = f.listing_complete,
            synced = f.synced,
            registered = f.registered,
            restored = f.restored,
            missing = f.missing,
            marked_stale = f.marked_stale,
            untouched = f.untouched,
            invalid = f.invalid,
            skipped_conflicts = f.skipped_conflicts,
            candidates = f.candidates,
            deleted = f.deleted,
            failed = f.failed,
            quarantined = f.quarantined,
            deferred = f.deferred,
            niosxaas_cleaned = f.niosxaas_cleaned,
            niosxaas_skipped = f.niosxaas_skipped,
            niosxaas_failed = f.niosxaas_failed,
            circuit_state = f.circuit_state.as_deref(),
            checked = f.checked,
            expired = f.expired,
            grace_period_hours = f.grace_period_hours,
            grace_period_s = f.grace_period_s,
            sandbox_status = f.sandbox_status.as_deref(),
            $($rest)*
        )
    }};
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::summary::{
        BulkDeleteSummary, CleanupSummary, ExpirySummary, StaleSummary, SyncSummary,
    };

    /// Every key any summary serialises is carried as a field (or is the run's `duration_ms`),
    /// so a summary field added later without a log field fails here.
    #[test]
    fn every_summary_key_has_a_field() {
        let summaries = [
            serde_json::to_value(SyncSummary::default()),
            serde_json::to_value(CleanupSummary::default()),
            serde_json::to_value(ExpirySummary::default()),
            serde_json::to_value(StaleSummary::default()),
            serde_json::to_value(BulkDeleteSummary::default()),
        ];
        for summary in summaries {
            let summary = summary.unwrap_or_default();
            let keys = summary
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>());
            for key in keys.unwrap_or_default() {
                assert!(
                    key == "duration_ms" || SUMMARY_KEYS.contains(&key.as_str()),
                    "summary key {key} has no log field"
                );
            }
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// In a JSON log line the counts are numbers and the states strings, each its own field;
    /// fields the summary does not have are absent.
    #[test]
    fn counts_are_json_fields_of_the_line() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(move || writer.clone())
            .finish();
        let summary = CleanupSummary {
            candidates: 4,
            deleted: 3,
            failed: 1,
            ..CleanupSummary::default()
        };
        tracing::subscriber::with_default(subscriber, || {
            crate::log_summary!(target: "job", tracing::Level::INFO, SummaryFields::of(&summary), job = "cleanup", "job finished");
        });
        let raw = captured.0.lock().map(|b| b.clone()).unwrap_or_default();
        let line: serde_json::Value = serde_json::from_slice(raw.trim_ascii()).unwrap_or_default();
        assert_eq!(line["deleted"], 3, "{line}");
        assert_eq!(line["candidates"], 4, "{line}");
        assert_eq!(line["failed"], 1, "{line}");
        assert_eq!(line["status"], "completed", "{line}");
        assert_eq!(line["job"], "cleanup", "{line}");
        assert!(line.get("registered").is_none(), "{line}");
        assert!(line.get("counts").is_none(), "{line}");
    }
}
