//! Batched projection, the pure part: turn a delivered batch of events into row writes, summed
//! stats deltas and chunks that fit one atomic store write (ADR 0011).
//!
//! The projector sorts a delivery by sandbox ([`Delivery::sort`]), loads those sandboxes' rows
//! together, and plans each sandbox with [`plan_sandbox`]: redelivered versions are skipped, a
//! missing version is reported as a gap (the caller reads it back from the event table and
//! merges it with [`SandboxEvents::merge`]), and the rest is folded through the same pure
//! [`project`] every source uses. [`chunk_changes`] then packs the row changes, one stats update
//! per touched shard and the checkpoint into as few atomic writes as the store's item limit allows.
//! Nothing here does I/O, so every rule above is unit-tested without a store.

use std::collections::BTreeMap;

use crate::model::events::{BrokerEvent, EventEnvelope, SandboxEvent};
use crate::model::ids::sandbox_id_of;
use crate::model::pool_prefix::pool_prefix;
use crate::model::projection::{project, project_unknown, PoolRow, StatsDelta};
use crate::store::{stats_shard, unknown};

/// A projector source's position, saved in the same atomic write as the rows it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The source (e.g. a stream shard or the embedded log).
    pub source: String,
    /// Everything up to and including this position is applied once the write commits.
    pub position: String,
}

/// One row write: the folded row, conditioned on the version it was planned from.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    /// The stored row's version the plan started from (`None`: no row yet). The write fails as a
    /// version conflict if the row moved since.
    pub expected_version: Option<u64>,
    /// The row after every planned event.
    pub row: PoolRow,
    /// The stats change of all those events together.
    pub delta: StatsDelta,
}

/// What one atomic view write holds: rows, their stats summed per shard, maybe the checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewChunk {
    /// Row writes, at most one per sandbox.
    pub rows: Vec<RowChange>,
    /// The checkpoint advance, only ever in a batch's last chunk.
    pub checkpoint: Option<Checkpoint>,
}

impl ViewChunk {
    /// The rows' deltas summed per stats shard, zero sums left out.
    pub fn stats_by_shard(&self, shards: u32) -> BTreeMap<u32, StatsDelta> {
        let mut sums: BTreeMap<u32, StatsDelta> = BTreeMap::new();
        for change in &self.rows {
            let sum = sums
                .entry(stats_shard(&change.row.sandbox_id, shards))
                .or_default();
            for (total, d) in sum.0.iter_mut().zip(change.delta.0) {
                *total += d;
            }
        }
        sums.retain(|_, d| !d.is_zero());
        sums
    }

    /// The rows' deltas summed per (name prefix group, stats shard), zero sums left out: the
    /// prefix counters ride in the same atomic write as the rows (ADR 0018).
    pub fn stats_by_prefix_shard(&self, shards: u32) -> BTreeMap<(String, u32), StatsDelta> {
        let mut sums: BTreeMap<(String, u32), StatsDelta> = BTreeMap::new();
        for change in &self.rows {
            let key = (
                pool_prefix(&change.row.name).to_string(),
                stats_shard(&change.row.sandbox_id, shards),
            );
            let sum = sums.entry(key).or_default();
            for (total, d) in sum.0.iter_mut().zip(change.delta.0) {
                *total += d;
            }
        }
        sums.retain(|_, d| !d.is_zero());
        sums
    }

    /// Items the write takes: rows, stats shard updates, prefix counter updates and the
    /// checkpoint.
    pub fn items(&self, shards: u32) -> usize {
        self.rows.len()
            + self.stats_by_shard(shards).len()
            + self.stats_by_prefix_shard(shards).len()
            + usize::from(self.checkpoint.is_some())
    }
}

/// How a view takes batched writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most items (rows + stats shards + checkpoint) one atomic write may hold.
    pub max_items: usize,
    /// Stats shards of the view (to count the shard updates a chunk needs).
    pub stats_shards: u32,
}

/// One delivered (or read-back) event with where it sat in the delivery.
#[derive(Debug, Clone)]
pub struct DeliveredEvent {
    /// Index in the delivered batch; `None` for an event read back to fill a gap.
    pub index: Option<usize>,
    /// The stored envelope.
    pub envelope: EventEnvelope,
    /// Its decoded payload; `None` for an event this release does not know (a newer release
    /// wrote it): it is projected by [`project_unknown`], which advances and holds the row.
    pub event: Option<SandboxEvent>,
}

/// One sandbox's events of a delivery, by version (a version delivered twice is kept once).
#[derive(Debug, Clone, Default)]
pub struct SandboxEvents {
    /// `sandbox#{id}`.
    pub stream_id: String,
    /// Events by version.
    pub events: BTreeMap<u64, DeliveredEvent>,
}

impl SandboxEvents {
    /// Adds events read back from the event table to fill a gap, up to version `up_to` (later
    /// ones arrive with a later delivery). `Err`: one of them cannot be decoded.
    pub fn merge(&mut self, loaded: Vec<EventEnvelope>, up_to: u64) -> Result<usize, String> {
        let mut added = 0;
        for envelope in loaded.into_iter().filter(|e| e.version <= up_to) {
            if self.events.contains_key(&envelope.version) {
                continue;
            }
            let event = match envelope.decode() {
                Ok(BrokerEvent::Sandbox(event)) => Some(event),
                Ok(BrokerEvent::Unknown(event)) => {
                    unknown::note(&event);
                    None
                }
                Ok(_) => {
                    return Err(format!(
                        "{} v{} is not a sandbox event",
                        envelope.stream_id, envelope.version
                    ))
                }
                Err(e) => return Err(e.to_string()),
            };
            self.events.insert(
                envelope.version,
                DeliveredEvent {
                    index: None,
                    envelope,
                    event,
                },
            );
            added += 1;
        }
        Ok(added)
    }

    /// Batch indices of the delivered events from version `from` on.
    pub fn indices_from(&self, from: u64) -> Vec<usize> {
        self.events
            .range(from..)
            .filter_map(|(_, e)| e.index)
            .collect()
    }
}

/// A delivered batch sorted for planning.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Sandbox events by sandbox id.
    pub sandboxes: BTreeMap<String, SandboxEvents>,
    /// Events that do not touch the pool view (claims, sync).
    pub ignored: usize,
    /// Delivered events that can never apply: (batch index, why).
    pub poison: Vec<(usize, String)>,
    /// Sandbox events delivered more than once in this very batch.
    pub repeated: usize,
}

impl Delivery {
    /// Sorts a delivery: per sandbox by version, other streams counted as ignored, undecodable
    /// sandbox events of a known type set aside as poison. Events a newer release wrote are
    /// never poison (ADR 0023): on a sandbox stream they are planned like any other (advancing
    /// and holding the row), on a stream kind this release does not know they are ignored.
    pub fn sort(envelopes: &[EventEnvelope]) -> Self {
        let mut delivery = Delivery::default();
        for (index, envelope) in envelopes.iter().enumerate() {
            let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) else {
                // A stream kind a newer release writes is counted, then ignored like claims.
                if let Some(event) = envelope.unknown() {
                    unknown::note(&event);
                }
                delivery.ignored += 1;
                continue;
            };
            let event = match envelope.decode() {
                Ok(BrokerEvent::Sandbox(event)) => Some(event),
                Ok(BrokerEvent::Unknown(event)) => {
                    unknown::note(&event);
                    None
                }
                Ok(_) => {
                    delivery.ignored += 1;
                    continue;
                }
                Err(e) => {
                    delivery.poison.push((index, e.to_string()));
                    continue;
                }
            };
            let events = delivery
                .sandboxes
                .entry(sandbox_id.to_string())
                .or_insert_with(|| SandboxEvents {
                    stream_id: envelope.stream_id.clone(),
                    events: BTreeMap::new(),
                });
            if events.events.contains_key(&envelope.version) {
                delivery.repeated += 1;
                continue;
            }
            events.events.insert(
                envelope.version,
                DeliveredEvent {
                    index: Some(index),
                    envelope: envelope.clone(),
                    event,
                },
            );
        }
        delivery
    }
}

/// What to do for one sandbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxPlan {
    /// The row write, if any event applies.
    pub change: Option<RowChange>,
    /// Events folded into `change`.
    pub applied: usize,
    /// Events at or below the row's version: already applied (redeliveries).
    pub skipped: usize,
    /// Versions between the row and the batch are missing: the row's version, to read after.
    pub gap_after: Option<u64>,
    /// The first version that cannot apply (e.g. anything but a registration on a missing
    /// row), with why: it and every later version of this sandbox stay unapplied.
    pub stuck_at: Option<(u64, String)>,
}

/// Plans one sandbox: skip versions at or below `row`'s, report a gap instead of writing past
/// one, fold the rest through [`project`] into one row change with the summed delta.
pub fn plan_sandbox(row: Option<&PoolRow>, events: &SandboxEvents) -> SandboxPlan {
    let row_version = row.map_or(0, |r| r.version);
    let mut plan = SandboxPlan {
        skipped: events.events.range(..=row_version).count(),
        ..SandboxPlan::default()
    };
    // The versions after the row's must run on from it without a hole.
    let contiguous = events
        .events
        .range(row_version + 1..)
        .map(|(v, _)| *v)
        .zip(row_version + 1..)
        .all(|(version, expected)| version == expected);
    if !contiguous {
        plan.gap_after = Some(row_version);
        plan.skipped = 0;
        return plan;
    }
    let mut current = row.cloned();
    let mut delta = StatsDelta::default();
    for (version, delivered) in events.events.range(row_version + 1..) {
        let (next, d) = match &delivered.event {
            Some(event) => project(current.clone(), &delivered.envelope, event),
            None => project_unknown(current.clone(), &delivered.envelope),
        };
        let Some(next) = next else {
            plan.stuck_at = Some((
                *version,
                format!("{} v{version} cannot start a row", events.stream_id),
            ));
            break;
        };
        for (total, d) in delta.0.iter_mut().zip(d.0) {
            *total += d;
        }
        current = Some(next);
        plan.applied += 1;
    }
    if plan.applied > 0 {
        plan.change = current.map(|row| RowChange {
            expected_version: (row_version > 0).then_some(row_version),
            row,
            delta,
        });
    }
    plan
}

/// Packs row changes into chunks of at most `limits.max_items` items (rows + one stats update
/// per touched shard + one prefix counter update per touched (prefix, shard) + the checkpoint), the checkpoint in the last chunk — so the checkpoint
/// commits only with, or after, every row it covers. No changes and a checkpoint: one chunk
/// with the checkpoint alone.
pub fn chunk_changes(
    changes: Vec<RowChange>,
    checkpoint: Option<Checkpoint>,
    limits: BatchLimits,
) -> Vec<ViewChunk> {
    // Room for at least one row, its shard, its prefix counter and the checkpoint, whatever
    // the limit says.
    let max_items = limits.max_items.max(4);
    let shards = limits.stats_shards.max(1);
    let mut chunks = Vec::new();
    let mut current = ViewChunk::default();
    let mut touched: Vec<u32> = Vec::new();
    let mut touched_prefixes: Vec<(String, u32)> = Vec::new();
    for change in changes {
        let shard = stats_shard(&change.row.sandbox_id, shards);
        let prefix_shard = (pool_prefix(&change.row.name).to_string(), shard);
        let counts = !change.delta.is_zero();
        let new_shard = counts && !touched.contains(&shard);
        let new_prefix = counts && !touched_prefixes.contains(&prefix_shard);
        // Always keep one item free for the checkpoint, which may join the last chunk.
        let after = current.rows.len()
            + touched.len()
            + touched_prefixes.len()
            + 1
            + usize::from(new_shard)
            + usize::from(new_prefix)
            + 1;
        if after > max_items && !current.rows.is_empty() {
            chunks.push(std::mem::take(&mut current));
            touched.clear();
            touched_prefixes.clear();
        }
        if counts && !touched.contains(&shard) {
            touched.push(shard);
        }
        if counts && !touched_prefixes.contains(&prefix_shard) {
            touched_prefixes.push(prefix_shard);
        }
        current.rows.push(change);
    }
    if !current.rows.is_empty() || checkpoint.is_some() {
        current.checkpoint = checkpoint;
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::{Actor, CommandMeta, SyncEvent};
    use chrono::Utc;

    fn meta() -> CommandMeta {
        CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        }
    }

    fn registered(id: &str) -> EventEnvelope {
        EventEnvelope::new(
            &format!("sandbox#{id}"),
            1,
            &SandboxEvent::SandboxRegistered {
                sandbox_id: id.into(),
                name: format!("lab-{id}"),
                external_id: format!("identity/accounts/{id}"),
                sfdc_account_id: None,
                csp_created_at: None,
            },
            &meta(),
            Utc::now(),
        )
    }

    fn stale(id: &str, version: u64) -> EventEnvelope {
        EventEnvelope::new(
            &format!("sandbox#{id}"),
            version,
            &SandboxEvent::SandboxMarkedStale {
                marked_at: Utc::now(),
            },
            &meta(),
            Utc::now(),
        )
    }

    fn restored(id: &str, version: u64) -> EventEnvelope {
        EventEnvelope::new(
            &format!("sandbox#{id}"),
            version,
            &SandboxEvent::SandboxRestored {
                restored_at: Utc::now(),
            },
            &meta(),
            Utc::now(),
        )
    }

    /// A sandbox's events fold into one row change whose delta is the sum of every step.
    #[test]
    fn folds_consecutive_events_into_one_change() {
        let delivery = Delivery::sort(&[registered("a"), stale("a", 2), restored("a", 3)]);
        let plan = plan_sandbox(None, &delivery.sandboxes["a"]);
        assert_eq!(plan.applied, 3);
        let change = plan.change.unwrap_or_else(|| panic!("a change"));
        assert_eq!(change.expected_version, None);
        assert_eq!(change.row.version, 3);
        // registered (+1 available), stale (-1 available +1 stale), restored (back): net +1.
        assert_eq!(change.delta, StatsDelta([1, 0, 0, 0, 0, 0]));
    }

    /// Versions at or below the row's are skipped; only the rest is applied, from the row.
    #[test]
    fn redelivered_versions_are_skipped() {
        let delivery = Delivery::sort(&[registered("a"), stale("a", 2)]);
        let first = plan_sandbox(None, &delivery.sandboxes["a"]);
        let row = first.change.map(|c| c.row);
        let again = Delivery::sort(&[stale("a", 2), restored("a", 3), stale("a", 2)]);
        assert_eq!(again.repeated, 1);
        let plan = plan_sandbox(row.as_ref(), &again.sandboxes["a"]);
        assert_eq!((plan.skipped, plan.applied), (1, 1));
        let change = plan.change.unwrap_or_else(|| panic!("a change"));
        assert_eq!(change.expected_version, Some(2));
        assert_eq!(change.delta, StatsDelta([1, 0, 0, -1, 0, 0]));
    }

    /// A missing version is a gap, never written past; merging the read-back events closes it.
    #[test]
    fn gaps_are_reported_then_filled() {
        let mut delivery = Delivery::sort(&[restored("a", 3)]);
        let Some(events) = delivery.sandboxes.get_mut("a") else {
            panic!("sandbox a");
        };
        let plan = plan_sandbox(None, events);
        assert_eq!(plan.gap_after, Some(0));
        assert!(plan.change.is_none());
        let added = events.merge(
            vec![
                registered("a"),
                stale("a", 2),
                restored("a", 3),
                stale("a", 4),
            ],
            3,
        );
        assert_eq!(added, Ok(2));
        let plan = plan_sandbox(None, events);
        assert_eq!(plan.applied, 3);
        assert_eq!(events.indices_from(1), vec![0]);
    }

    /// An event that cannot start a row stops its sandbox there; other streams are ignored.
    #[test]
    fn stuck_rows_and_ignored_streams() {
        let sync = EventEnvelope::new(
            crate::model::ids::SYNC_STREAM_ID,
            1,
            &SyncEvent::ListingRecorded {
                listed: 1,
                missing: vec![],
            },
            &meta(),
            Utc::now(),
        );
        let delivery = Delivery::sort(&[sync, stale("b", 1)]);
        assert_eq!(delivery.ignored, 1);
        let plan = plan_sandbox(None, &delivery.sandboxes["b"]);
        assert!(plan.change.is_none());
        assert_eq!(plan.stuck_at.map(|(v, _)| v), Some(1));
    }

    /// A future event type on a sandbox stream is planned (the row advances past it and is
    /// held), a future stream kind is ignored, and neither is poison.
    #[test]
    fn unknown_events_are_planned_not_poison() {
        let mut reserved = stale("a", 2);
        reserved.event_type = "SandboxReserved".into();
        reserved.schema_version = 2;
        reserved.payload = serde_json::json!({"type": "SandboxReserved", "seats": 3});
        let mut reservation = registered("r");
        reservation.stream_id = "reservation#r".into();
        reservation.event_type = "ReservationCreated".into();
        let delivery = Delivery::sort(&[registered("a"), reserved, restored("a", 3), reservation]);
        assert!(delivery.poison.is_empty());
        assert_eq!(delivery.ignored, 1);
        let plan = plan_sandbox(None, &delivery.sandboxes["a"]);
        assert_eq!(plan.applied, 3);
        let change = plan.change.unwrap_or_else(|| panic!("a change"));
        assert_eq!(change.row.version, 3);
        assert_eq!(change.row.held_by.as_deref(), Some("SandboxReserved"));
    }

    /// Chunks never exceed the item limit (rows + shard updates + prefix counter updates +
    /// checkpoint), every row is in exactly one chunk and the checkpoint rides in the last one.
    #[test]
    fn chunks_respect_the_item_limit() {
        let changes: Vec<RowChange> = (0..250)
            .filter_map(|i| {
                let delivery = Delivery::sort(&[registered(&i.to_string())]);
                plan_sandbox(None, &delivery.sandboxes[&i.to_string()]).change
            })
            .collect();
        let limits = BatchLimits {
            max_items: 100,
            stats_shards: 8,
        };
        let checkpoint = Checkpoint {
            source: "s".into(),
            position: "9".into(),
        };
        let chunks = chunk_changes(changes, Some(checkpoint.clone()), limits);
        assert_eq!(chunks.iter().map(|c| c.rows.len()).sum::<usize>(), 250);
        // 8 shard updates and 8 (prefix, shard) updates per chunk leave room for 83 rows.
        assert!(chunks.len() <= 4, "{} chunks", chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.items(8) <= 100);
            assert_eq!(chunk.checkpoint.is_some(), i == chunks.len() - 1);
            let counted: i64 = chunk.stats_by_shard(8).values().map(|d| d.0[0]).sum();
            assert_eq!(counted, chunk.rows.len() as i64);
            let by_prefix: i64 = chunk
                .stats_by_prefix_shard(8)
                .iter()
                .map(|((prefix, _), d)| {
                    assert_eq!(prefix, "lab");
                    d.0[0]
                })
                .sum();
            assert_eq!(by_prefix, chunk.rows.len() as i64);
        }
        let alone = chunk_changes(Vec::new(), Some(checkpoint.clone()), limits);
        assert_eq!(
            alone,
            vec![ViewChunk {
                rows: vec![],
                checkpoint: Some(checkpoint)
            }]
        );
        assert!(chunk_changes(Vec::new(), None, limits).is_empty());
    }
}
