//! Read repair: re-projects one sandbox from its own stream into the view, at once, whenever a
//! strong load shows the sandbox ahead of its view row (a lost conditional write on the
//! allocation path, a job whose command found another state than the row it was given).
//!
//! It writes through the same idempotent, version-conditioned [`apply_event`] as the projector,
//! so it can race the projector (or another repair) safely: whichever write lands first wins, the
//! other sees `AlreadyApplied`. It heals a record the stream source lost or gave up on (a DLQ'd
//! Lambda record, a skipped corrupt record) without waiting for the next event of that sandbox.

use crate::model::ids::sandbox_stream;

use super::{apply_event, ApplyOutcome, EventStore, StoreError, ViewStore};

/// What a repair did to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairOutcome {
    /// Events applied to the row (0: it was already current).
    pub applied: u64,
    /// The row's version afterwards (0: the sandbox has no events).
    pub row_version: u64,
}

/// Brings the view row of `sandbox_id` up to its stream: loads the row strongly, reads the events
/// after its version and applies each in order.
pub async fn repair_row(
    events: &dyn EventStore,
    view: &dyn ViewStore,
    sandbox_id: &str,
) -> Result<RepairOutcome, StoreError> {
    let row_version = view.load_row(sandbox_id).await?.map_or(0, |r| r.version);
    let missing = events
        .load_after(&sandbox_stream(sandbox_id), row_version)
        .await?;
    let mut outcome = RepairOutcome {
        applied: 0,
        row_version,
    };
    for envelope in &missing {
        match apply_event(view, envelope).await? {
            ApplyOutcome::Applied => outcome.applied += 1,
            // A concurrent projector or repair wrote it first.
            ApplyOutcome::AlreadyApplied | ApplyOutcome::Ignored => {}
            ApplyOutcome::Gap { row_version } => {
                // Events are applied in version order from the row's own version, so a gap
                // means the row moved backwards under us: report it rather than write past it.
                return Err(StoreError::Corrupt(format!(
                    "{} has a gap at v{row_version} during repair",
                    envelope.stream_id
                )));
            }
        }
        outcome.row_version = envelope.version;
    }
    Ok(outcome)
}
