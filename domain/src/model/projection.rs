//! The read model: one [`PoolRow`] per sandbox plus per-status counters, computed by the pure
//! function [`project`]. Every projector source (Lambda, Streams poller, embedded tail, rebuild)
//! calls it, so all of them produce the same view from the same events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::events::{EventEnvelope, SandboxEvent};
use super::ids::sandbox_id_of;
use super::lifecycle::SandboxStatus;

/// One sandbox as the read side sees it (the `pool` table's item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRow {
    /// Broker id.
    pub sandbox_id: String,
    /// Current status.
    pub status: SandboxStatus,
    /// CSP name.
    pub name: String,
    /// CSP account path.
    pub external_id: String,
    /// Salesforce account id.
    pub sfdc_account_id: Option<String>,
    /// Current or most recent owner (the `by-owner` index key).
    pub owner: Option<String>,
    /// Lab slug of the allocation.
    pub track_name: Option<String>,
    /// When allocated.
    pub allocated_at: Option<DateTime<Utc>>,
    /// End of the lab window.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the allocation ended.
    pub deletion_requested_at: Option<DateTime<Utc>>,
    /// Failed delete attempts.
    pub attempts: u32,
    /// Last delete error.
    pub last_error: Option<String>,
    /// When the status's job should next look at the row (the `by-due` index orders by it):
    /// `expires_at` when allocated, the next attempt when pending deletion, the time it went stale.
    pub due_at: Option<DateTime<Utc>>,
    /// Candidate-selection position, a hash of (sandbox, version): random-looking yet the same on
    /// every replay, so a rebuilt view equals the live one.
    pub pick: u32,
    /// The last event version applied.
    pub version: u64,
    /// `occurred_at` of the last event applied.
    pub updated_at: DateTime<Utc>,
    /// The event type of the first event on this sandbox's stream that this release does not
    /// know (a newer release wrote it; ADR 0023). A held row is never an allocation candidate:
    /// the candidate queries of both stores and the allocator leave it out, whatever its status.
    /// Absent in rows written before the field existed, which read as not held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// Counter changes per status caused by one event (index = [`SandboxStatus::index`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsDelta(pub [i64; 6]);

impl StatsDelta {
    /// True when no counter changes.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|d| *d == 0)
    }

    fn moved(from: Option<SandboxStatus>, to: SandboxStatus) -> Self {
        let mut delta = [0; 6];
        if let Some(from) = from {
            delta[from.index()] -= 1;
        }
        delta[to.index()] += 1;
        if from == Some(to) {
            delta = [0; 6];
        }
        StatsDelta(delta)
    }
}

/// Pool counts by status (the sum of the stats shards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Count per status, indexed by [`SandboxStatus::index`].
    pub by_status: [i64; 6],
}

impl PoolStats {
    /// Adds a delta.
    pub fn add(&mut self, delta: &StatsDelta) {
        for (count, d) in self.by_status.iter_mut().zip(delta.0) {
            *count += d;
        }
    }

    /// Count for one status.
    pub fn get(&self, status: SandboxStatus) -> i64 {
        self.by_status[status.index()]
    }

    /// All sandboxes ever registered (every status, `deleted` included).
    pub fn total(&self) -> i64 {
        self.by_status.iter().sum()
    }
}

/// A deterministic, uniformly spread 32-bit position for (sandbox, version).
pub fn pick_for(sandbox_id: &str, version: u64) -> u32 {
    let digest = Sha256::new()
        .chain_update(sandbox_id.as_bytes())
        .chain_update(version.to_be_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Applies one sandbox event to its row. `row` is the row before the event (`None` if the sandbox
/// is not in the view yet); the result is the row after it and the stats change. An event that
/// cannot apply to `row` (e.g. anything but `SandboxRegistered` on a missing row) leaves it as it
/// is with a zero delta — the projector's version check keeps that from happening in practice.
pub fn project(
    row: Option<PoolRow>,
    envelope: &EventEnvelope,
    event: &SandboxEvent,
) -> (Option<PoolRow>, StatsDelta) {
    use SandboxEvent as E;
    let at = envelope.occurred_at;
    let mut row = match (row, event) {
        (
            None,
            E::SandboxRegistered {
                sandbox_id,
                name,
                external_id,
                sfdc_account_id,
                ..
            },
        ) => PoolRow {
            sandbox_id: sandbox_id.clone(),
            status: SandboxStatus::Available,
            name: name.clone(),
            external_id: external_id.clone(),
            sfdc_account_id: sfdc_account_id.clone(),
            owner: None,
            track_name: None,
            allocated_at: None,
            expires_at: None,
            deletion_requested_at: None,
            attempts: 0,
            last_error: None,
            due_at: None,
            pick: 0,
            version: 0,
            updated_at: at,
            held_by: None,
        },
        (None, _) => return (None, StatsDelta::default()),
        (Some(row), _) => row,
    };
    let before = if row.version == 0 {
        None
    } else {
        Some(row.status)
    };
    match event {
        E::SandboxRegistered { .. } => {
            row.status = SandboxStatus::Available;
            row.due_at = None;
        }
        E::SandboxAllocated {
            caller,
            track_name,
            allocated_at,
            expires_at,
            ..
        } => {
            row.status = SandboxStatus::Allocated;
            row.owner = Some(caller.clone());
            row.track_name.clone_from(track_name);
            row.allocated_at = Some(*allocated_at);
            row.expires_at = Some(*expires_at);
            row.due_at = Some(*expires_at);
        }
        E::LeaseExtended { expires_at, .. } => {
            // The expiry index follows the new end, so auto-expiry waits for it.
            row.expires_at = Some(*expires_at);
            row.due_at = Some(*expires_at);
        }
        E::DeletionRequested { requested_at, .. } => {
            row.status = SandboxStatus::PendingDeletion;
            row.deletion_requested_at = Some(*requested_at);
            row.due_at = Some(*requested_at);
        }
        E::AllocationExpired { expired_at } => {
            row.status = SandboxStatus::PendingDeletion;
            row.deletion_requested_at = Some(*expired_at);
            row.due_at = Some(*expired_at);
        }
        E::SandboxMarkedStale { marked_at } => {
            row.status = SandboxStatus::Stale;
            row.due_at = Some(*marked_at);
        }
        E::SandboxRestored { .. } => {
            row.status = SandboxStatus::Available;
            row.due_at = None;
        }
        E::DeletionAttemptFailed {
            attempt,
            error,
            next_attempt_at,
            ..
        } => {
            row.attempts = *attempt;
            row.last_error = Some(error.clone());
            row.due_at = Some(*next_attempt_at);
        }
        E::DeletionFailed {
            attempts,
            last_error,
            ..
        } => {
            row.status = SandboxStatus::DeletionFailed;
            row.attempts = *attempts;
            row.last_error = Some(last_error.clone());
            row.due_at = None;
        }
        E::DeletionRetried { requested_at } => {
            row.status = SandboxStatus::PendingDeletion;
            row.attempts = 0;
            row.due_at = Some(*requested_at);
        }
        E::SandboxDeleted { .. } | E::SandboxRetired { .. } => {
            row.status = SandboxStatus::Deleted;
            row.due_at = None;
        }
        // The row stays due: a worker that finds it leased skips it on its strong load, and a
        // lapsed lease (a crashed worker) needs no view change to be picked up again.
        E::DeletionLeased { .. } => {}
    }
    row.version = envelope.version;
    row.pick = pick_for(&row.sandbox_id, row.version);
    row.updated_at = at;
    let delta = StatsDelta::moved(before, row.status);
    (Some(row), delta)
}

/// Applies an event this release does not know (ADR 0023) to its sandbox's row: nothing of the
/// row's meaning changes (this release cannot tell what the event means), but the row's version
/// advances past it, so the next known event applies without a gap, and the row is held out of
/// allocation for good (the first unknown type is kept in [`PoolRow::held_by`]).
///
/// A stream that *begins* with an unknown event (a newer way to register a sandbox) gets a
/// placeholder row: counted as `deleted` (terminal, never a candidate, in no job's work list),
/// held, with an empty name — so its later events apply in order instead of being reported as a
/// gap again and again. The release that knows the event re-projects it (`verify --repair`).
pub fn project_unknown(
    row: Option<PoolRow>,
    envelope: &EventEnvelope,
) -> (Option<PoolRow>, StatsDelta) {
    let (mut row, delta) = match row {
        Some(row) => (row, StatsDelta::default()),
        None => {
            let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) else {
                return (None, StatsDelta::default());
            };
            let placeholder = PoolRow {
                sandbox_id: sandbox_id.to_string(),
                status: SandboxStatus::Deleted,
                name: String::new(),
                external_id: String::new(),
                sfdc_account_id: None,
                owner: None,
                track_name: None,
                allocated_at: None,
                expires_at: None,
                deletion_requested_at: None,
                attempts: 0,
                last_error: None,
                due_at: None,
                pick: 0,
                version: 0,
                updated_at: envelope.occurred_at,
                held_by: None,
            };
            (placeholder, StatsDelta::moved(None, SandboxStatus::Deleted))
        }
    };
    if row.held_by.is_none() {
        row.held_by = Some(envelope.event_type.clone());
    }
    row.version = envelope.version;
    row.pick = pick_for(&row.sandbox_id, row.version);
    row.updated_at = envelope.occurred_at;
    (Some(row), delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::{Actor, CommandMeta};
    use chrono::Duration;

    fn env(version: u64, event: &SandboxEvent) -> EventEnvelope {
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        };
        EventEnvelope::new("sandbox#7", version, event, &meta, Utc::now())
    }

    fn step(row: Option<PoolRow>, version: u64, event: SandboxEvent) -> (PoolRow, StatsDelta) {
        let (row, delta) = project(row, &env(version, &event), &event);
        (
            row.unwrap_or_else(|| panic!("event {version} did not apply")),
            delta,
        )
    }

    /// A full life (register → allocate → mark → fail → quarantine → retry → delete) moves exactly
    /// one count between statuses per transition and keeps the row's fields.
    #[test]
    fn projects_a_whole_lifecycle() {
        let now = Utc::now();
        let (row, d) = step(
            None,
            1,
            SandboxEvent::SandboxRegistered {
                sandbox_id: "7".into(),
                name: "lab-7".into(),
                external_id: "identity/accounts/u7".into(),
                sfdc_account_id: Some("sf".into()),
                csp_created_at: None,
            },
        );
        assert_eq!(row.status, SandboxStatus::Available);
        assert_eq!(d, StatsDelta([1, 0, 0, 0, 0, 0]));
        let (row, d) = step(
            Some(row),
            2,
            SandboxEvent::SandboxAllocated {
                caller: "stu".into(),
                track_name: Some("t".into()),
                idempotency_key: "stu".into(),
                claim_stream: "claim#3:stu#stu".into(),
                allocated_at: now,
                expires_at: now + Duration::hours(48),
                lab_duration_s: 172_800,
                waited_ms: None,
            },
        );
        assert_eq!(d, StatsDelta([-1, 1, 0, 0, 0, 0]));
        assert_eq!(row.owner.as_deref(), Some("stu"));
        assert_eq!(row.due_at, Some(now + Duration::hours(48)));
        let (row, d) = step(
            Some(row),
            3,
            SandboxEvent::DeletionRequested {
                caller: "stu".into(),
                requested_at: now,
            },
        );
        assert_eq!(d, StatsDelta([0, -1, 1, 0, 0, 0]));
        let (row, d) = step(
            Some(row),
            4,
            SandboxEvent::DeletionAttemptFailed {
                attempt: 1,
                error: "boom".into(),
                next_attempt_at: now,
                transient: true,
                failing_since: Some(now),
            },
        );
        assert!(d.is_zero());
        assert_eq!(row.attempts, 1);
        let (row, d) = step(
            Some(row),
            5,
            SandboxEvent::DeletionFailed {
                attempts: 2,
                last_error: "boom".into(),
                transient: true,
            },
        );
        assert_eq!(d, StatsDelta([0, 0, -1, 0, 1, 0]));
        let (row, _) = step(
            Some(row),
            6,
            SandboxEvent::DeletionRetried { requested_at: now },
        );
        let (row, d) = step(
            Some(row),
            7,
            SandboxEvent::SandboxDeleted {
                csp_status: Some(204),
            },
        );
        assert_eq!(d, StatsDelta([0, 0, -1, 0, 0, 1]));
        assert_eq!(row.status, SandboxStatus::Deleted);
        assert_eq!(row.version, 7);
        assert_eq!(row.sfdc_account_id.as_deref(), Some("sf"));
    }

    /// Only registration can create a row; `pick` is deterministic per (sandbox, version).
    #[test]
    fn missing_row_and_pick() {
        let event = SandboxEvent::SandboxMarkedStale {
            marked_at: Utc::now(),
        };
        assert_eq!(
            project(None, &env(2, &event), &event),
            (None, StatsDelta::default())
        );
        assert_eq!(pick_for("a", 1), pick_for("a", 1));
        assert_ne!(pick_for("a", 1), pick_for("a", 2));
    }

    /// An unknown event advances the row's version and holds it; later known events apply on
    /// top and the hold stays.
    #[test]
    fn unknown_events_advance_and_hold_the_row() {
        let registered = SandboxEvent::SandboxRegistered {
            sandbox_id: "7".into(),
            name: "lab-7".into(),
            external_id: "identity/accounts/u7".into(),
            sfdc_account_id: None,
            csp_created_at: None,
        };
        let (row, _) = step(None, 1, registered);
        let mut reserved = env(
            2,
            &SandboxEvent::SandboxRestored {
                restored_at: Utc::now(),
            },
        );
        reserved.event_type = "SandboxReserved".into();
        reserved.schema_version = 2;
        let (held, delta) = project_unknown(Some(row.clone()), &reserved);
        let held = held.unwrap_or_else(|| panic!("row kept"));
        assert!(delta.is_zero());
        assert_eq!((held.version, held.status), (2, SandboxStatus::Available));
        assert_eq!(held.held_by.as_deref(), Some("SandboxReserved"));
        let (after, _) = step(
            Some(held),
            3,
            SandboxEvent::SandboxMarkedStale {
                marked_at: Utc::now(),
            },
        );
        assert_eq!(after.held_by.as_deref(), Some("SandboxReserved"));
        // A stream that begins with an unknown event gets a held placeholder row, counted as
        // deleted, so its later events apply in order.
        let (placeholder, delta) = project_unknown(None, &reserved);
        let placeholder = placeholder.unwrap_or_else(|| panic!("a placeholder row"));
        assert_eq!(placeholder.status, SandboxStatus::Deleted);
        assert_eq!(placeholder.held_by.as_deref(), Some("SandboxReserved"));
        assert_eq!(delta, StatsDelta([0, 0, 0, 0, 0, 1]));
    }

    /// Stats add up deltas and total every status.
    #[test]
    fn stats_sum() {
        let mut stats = PoolStats::default();
        stats.add(&StatsDelta([2, 1, 0, 0, 0, 0]));
        stats.add(&StatsDelta([-1, 1, 0, 0, 0, 1]));
        assert_eq!(stats.get(SandboxStatus::Allocated), 2);
        assert_eq!(stats.total(), 4);
    }
}
