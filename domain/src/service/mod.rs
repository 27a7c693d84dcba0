//! The command side's application service: loads aggregates strongly, decides with the model,
//! appends with version checks, and runs the allocation algorithm of DESIGN.md §6. It knows the
//! ports only, never an adapter.
//!
//! # Layout
//! - this module — [`Broker`] and its settings and errors, strong loads of sandboxes and claims,
//!   read repair, history, and [`envelopes`] (decided events at their next versions);
//! - `allocate` — the allocation command: claim, quota and drain checks, the candidate search,
//!   the two-stream conditional append;
//! - `candidates` — the per-process candidate queues, in-flight set and taken memory that the
//!   search draws from;
//! - `lifecycle` — the commands on an allocated sandbox (mark for deletion, extend, and
//!   [`Broker::execute`] that runs any sandbox command and releases the claim and quota slot);
//! - `pool_control` — drain and resume, and the drain state cache of the allocation path;
//! - `quota` — per-track quotas: limits, the quota stream's strong read, the per-track lock;
//! - `group_commit` — group commit of allocations on stores that write a group in one request:
//!   one committer task, slot streams decided in order, conflicts answered member by member
//!   (ADR 0025);
//! - `fair_share` — the fair-share caps (per caller, per client address, per principal), each a
//!   quota stream taken in the allocation's own transaction (ADR 0021);
//! - `held_claim` — a strong read of one claim, for the switch to pseudonymised ids (ADR 0031).
//! - `reservations` — reservations: creation with its capacity answer, earmarking, top-up,
//!   shortfall, cancel and the window's end, and the capacity figures (ADR 0028).

mod allocate;
#[cfg(test)]
mod allocation_properties;
mod candidates;
mod fair_share;
#[cfg(test)]
mod fault_store;
mod group_commit;
#[cfg(test)]
mod group_commit_tests;
mod held_claim;
mod lifecycle;
#[cfg(test)]
mod liveness_tests;
#[cfg(test)]
mod optimistic_tests;
mod pool_control;
mod quota;
mod reservations;
mod reserved_draw;
#[cfg(test)]
mod reserved_draw_tests;

pub use fair_share::{CapKind, FairShareCap};
pub use group_commit::GroupCommitStats;
pub use quota::TrackQuotas;
pub use reservations::{ReservationError, ReservationPass, ReservationSettings, ReservationStatus};

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::Duration;
use thiserror::Error;

use crate::clock::SharedClock;
use crate::model::claim::Claim;
use crate::model::error::DomainError;
use crate::model::events::{BrokerEvent, ClaimEvent, CommandMeta, EventEnvelope};
use crate::model::ids::{sandbox_stream, IdError};
use crate::model::sandbox::Sandbox;
use crate::store::{
    decode_stored, repair_row, EventStore, PoolView, RepairOutcome, StoreError, ViewStore,
};

/// Tunables of the command side (each one is a documented environment setting of the API).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// One lab duration: `expires_at`, the mark window and expiry (`LAB_DURATION_HOURS`, 48 h).
    pub lab_duration: Duration,
    /// Extra time after `expires_at` before the expiry job ends an allocation (`GRACE_PERIOD_MINUTES`, 30).
    pub expiry_grace: Duration,
    /// Candidates fetched per view query (`K_CANDIDATES`, 15).
    pub k_candidates: usize,
    /// Random-offset candidate pages read before the allocator sweeps the whole available range
    /// of the view (`ALLOCATE_ROUNDS`, 3). Pages that bring nothing usable do not lead to a 409:
    /// only a complete sweep that finds nothing untried does.
    pub allocate_rounds: usize,
    /// Bound on full sweeps per request (`ALLOCATE_MAX_SWEEPS`, 16): each sweep that found
    /// candidates which concurrent requests then took first starts another.
    pub max_sweeps: usize,
    /// Bound on view rows one sweep reads (`ALLOCATE_MAX_SWEEP_ROWS`, 20,000): a view that shows
    /// more stale rows than this is answered with a 409 instead of a longer scan.
    pub max_sweep_rows: usize,
    /// Allocation requests worked on at once in this process (`ALLOCATE_CONCURRENCY`, 64); the
    /// rest wait their turn in order. Bounds the transactions one instance has in flight, so a
    /// burst queues here instead of timing out in the store.
    pub allocate_concurrency: usize,
    /// Reloads of a single-aggregate command after a version conflict (5).
    pub command_retries: usize,
    /// `retry_after` of a 409 NO_SANDBOXES_AVAILABLE, seconds (30).
    pub no_sandbox_retry_after_s: u64,
    /// Most that all extensions of one allocation may add (`MAX_LAB_EXTENSION_HOURS`, 24 h;
    /// zero turns extension off).
    pub max_extension: Duration,
    /// How long an instance trusts the drain state it read (`DRAIN_CACHE_MS`, 1,000 ms): the
    /// bound on how late a drain takes effect on the other instances.
    pub drain_cache_ttl: StdDuration,
    /// `retry_after` of a 503 MAINTENANCE, seconds (`MAINTENANCE_RETRY_AFTER_SEC`, 60).
    pub maintenance_retry_after_s: u64,
    /// Concurrent allocations allowed per track name (`TRACK_QUOTAS`, `DEFAULT_TRACK_QUOTA`).
    pub quotas: TrackQuotas,
    /// How long this process skips a candidate whose allocation write ended with an unknown
    /// outcome that a strong read of its stream could not settle either
    /// (`UNKNOWN_OUTCOME_HOLD_SEC`, 10 s; the store was unreachable twice in a row). After it,
    /// the conditional write decides again.
    pub unknown_outcome_hold: StdDuration,
    /// Groups of concurrent allocations written at once when the event store groups appends
    /// (`ALLOCATE_GROUPS_IN_FLIGHT`, 2; ADR 0025): the next group is formed while fewer are in
    /// flight, so a slow write holds up only the allocations that need what it writes.
    pub group_commit_in_flight: usize,
    /// How long one group write may take before its allocations are answered as unknown
    /// outcomes, which each settles with its strong read (`ALLOCATE_GROUP_DEADLINE_MS`, 20,000).
    pub group_write_deadline: StdDuration,
    /// The tracks whose labs send heartbeats (`HEARTBEAT_TRACKS`, none): each allocation of
    /// such a track records the track's policy in its `SandboxAllocated` event (ADR 0030).
    pub heartbeats: crate::heartbeat::HeartbeatPolicies,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            lab_duration: Duration::hours(48),
            expiry_grace: Duration::minutes(30),
            k_candidates: 15,
            allocate_rounds: 3,
            max_sweeps: 16,
            max_sweep_rows: 20_000,
            allocate_concurrency: 64,
            command_retries: 5,
            no_sandbox_retry_after_s: 30,
            max_extension: Duration::hours(24),
            drain_cache_ttl: StdDuration::from_millis(1_000),
            maintenance_retry_after_s: 60,
            quotas: TrackQuotas::default(),
            unknown_outcome_hold: StdDuration::from_secs(10),
            group_commit_in_flight: 2,
            group_write_deadline: StdDuration::from_secs(20),
            heartbeats: crate::heartbeat::HeartbeatPolicies::default(),
        }
    }
}

/// Why a broker operation failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BrokerError {
    /// The model refused the command.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Nothing allocatable (for this prefix) after every candidate round.
    #[error("no sandboxes available")]
    NoSandboxAvailable {
        /// Suggested wait, seconds.
        retry_after_s: u64,
    },
    /// A caller-supplied identifier was refused.
    #[error(transparent)]
    InvalidInput(#[from] IdError),
    /// Allocation is drained for maintenance (for this prefix or the whole pool).
    #[error("allocation is drained for maintenance")]
    Maintenance {
        /// The drained prefix that refused the request; `None`: the whole pool.
        prefix: Option<String>,
        /// Suggested wait, seconds.
        retry_after_s: u64,
    },
    /// A fair-share cap (caller, address, principal) holds its maximum of live allocations.
    #[error(
        "{kind} already holds {limit} live allocation(s), the most allowed; release one first"
    )]
    FairShareExceeded {
        /// Which cap.
        kind: CapKind,
        /// The limit in force.
        limit: u32,
        /// Suggested wait, seconds.
        retry_after_s: u64,
    },
    /// The track holds its maximum of concurrent allocations.
    #[error("track {track} already holds {limit} live allocation(s), its quota")]
    QuotaExceeded {
        /// The track name.
        track: String,
        /// The limit in force.
        limit: u32,
        /// Suggested wait, seconds.
        retry_after_s: u64,
    },
}

/// A stored event decoded for a command's strong load: like [`decode_stored`], but an event a
/// newer release wrote refuses the command ([`DomainError::WrittenByNewerRelease`]) — a stream
/// this release cannot fully read is never decided on (ADR 0023).
pub(crate) fn decode_for_command(envelope: &EventEnvelope) -> Result<BrokerEvent, BrokerError> {
    match decode_stored(envelope)? {
        BrokerEvent::Unknown(unknown) => Err(DomainError::WrittenByNewerRelease {
            stream_id: unknown.stream_id,
            event_type: unknown.event_type,
            schema_version: unknown.schema_version,
        }
        .into()),
        event => Ok(event),
    }
}

/// An allocation request as the track sends it.
#[derive(Debug, Clone, Default)]
pub struct AllocateRequest {
    /// The student (`X-Instruqt-Sandbox-ID`, else `X-Track-ID`).
    pub caller: String,
    /// `Idempotency-Key`; defaults to the caller.
    pub idempotency_key: Option<String>,
    /// `X-Instruqt-Track-ID`.
    pub track_name: Option<String>,
    /// `X-Sandbox-Name-Prefix`.
    pub name_prefix: Option<String>,
}

/// The limits one allocation request is held to, beyond the pool's own.
#[derive(Debug, Clone, Default)]
pub struct AllocationLimits {
    /// A further cap on the track's quota (a per-track credential's maximum).
    pub track_limit: Option<u32>,
    /// Apply only a limit `TRACK_QUOTAS` names for the track, not `DEFAULT_TRACK_QUOTA`: the
    /// shared token's track header is chosen by the client, so its default quota is enforced on
    /// the principal instead (a [`CapKind::Principal`] cap), which rotating the header cannot escape.
    pub named_track_quota_only: bool,
    /// Fair-share caps taken in the allocation's own transaction.
    pub caps: Vec<FairShareCap>,
    /// How long the request waited in line before this attempt (`Prefer: wait`), recorded on
    /// the `SandboxAllocated` it makes; `None` for a request that did not wait.
    pub waited_ms: Option<u64>,
}

/// A granted (or replayed) allocation.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The sandbox as allocated.
    pub sandbox: Sandbox,
    /// True when an earlier allocation of the same (caller, key) was returned.
    pub replayed: bool,
    /// Candidates lost to concurrent allocators on the way.
    pub conflicts: u32,
    /// The `event_id` of the `SandboxAllocated` event that made this allocation: the API derives
    /// the allocation's lease token from it, so nothing secret is stored.
    pub allocation_event_id: Option<uuid::Uuid>,
}

/// The broker's command side.
pub struct Broker {
    events: Arc<dyn EventStore>,
    view: Arc<dyn PoolView>,
    clock: SharedClock,
    config: BrokerConfig,
    candidates: candidates::Candidates,
    /// Admission to the allocation path (`allocate_concurrency` permits).
    allocating: tokio::sync::Semaphore,
    /// Where read repair writes, when this process may write the view (`READ_REPAIR`).
    repair: Option<Arc<dyn ViewStore>>,
    /// Sandboxes being repaired now (one repair per sandbox at a time).
    repairing: Arc<Mutex<HashSet<String>>>,
    /// Rows read repair brought up to date.
    repaired_rows: Arc<AtomicU64>,
    /// The drain state as this instance read it last.
    drain_cache: pool_control::DrainCache,
    /// Queues this process's quota-bound commands per track.
    track_locks: quota::TrackLocks,
    /// Writes concurrent allocations together, when the event store groups appends.
    group: Option<group_commit::GroupCommit>,
    /// The open reservations this process draws earmarked candidates from (ADR 0028).
    reservations: reserved_draw::ReservationDirectory,
}

/// Bound on reloads of a track's quota after another allocation (or release) of the track
/// committed first; each reload sees a newer count, so this is only reached under a storm.
const QUOTA_RETRIES: usize = 64;

/// Bound on concurrent background repairs: beyond it, the projector is left to catch up.
const MAX_CONCURRENT_REPAIRS: usize = 64;

/// A sandbox stream folded to its state, with its events.
#[derive(Debug, Clone)]
pub struct LoadedSandbox {
    /// The state.
    pub sandbox: Sandbox,
    /// The events it was folded from.
    pub events: Vec<EventEnvelope>,
}

impl LoadedSandbox {
    /// The `event_id` of the latest `SandboxAllocated`: the current (or most recent) allocation.
    pub fn allocation_event_id(&self) -> Option<uuid::Uuid> {
        self.events
            .iter()
            .rev()
            .find(|e| e.event_type == "SandboxAllocated")
            .map(|e| e.event_id)
    }
}

impl Broker {
    /// A broker over the given ports.
    pub fn new(
        events: Arc<dyn EventStore>,
        view: Arc<dyn PoolView>,
        clock: SharedClock,
        config: BrokerConfig,
    ) -> Self {
        let allocating = tokio::sync::Semaphore::new(config.allocate_concurrency.max(1));
        let group_items = events.group_commit_items();
        let group = (group_items > 1).then(|| {
            let limits = group_commit::GroupLimits {
                max_items: group_items,
                in_flight: config.group_commit_in_flight,
                deadline: config.group_write_deadline,
            };
            group_commit::GroupCommit::new(Arc::clone(&events), limits)
        });
        Self {
            events,
            view,
            clock,
            config,
            candidates: candidates::Candidates::default(),
            allocating,
            repair: None,
            repairing: Arc::default(),
            repaired_rows: Arc::default(),
            drain_cache: pool_control::DrainCache::default(),
            track_locks: quota::TrackLocks::default(),
            group,
            reservations: reserved_draw::ReservationDirectory::default(),
        }
    }

    /// What group commit did since start; `None` when the event store does not group appends
    /// (each allocation is then its own append).
    pub fn group_commit_stats(&self) -> Option<Arc<GroupCommitStats>> {
        self.group.as_ref().map(group_commit::GroupCommit::stats)
    }

    /// Enables read repair: whenever a strong load shows a sandbox ahead of its view row, the
    /// row is re-projected from the sandbox's stream at once, through the projector's own
    /// version-conditioned apply (docs/adr/0010-lag-proof-allocation.md).
    pub fn with_read_repair(mut self, view: Arc<dyn ViewStore>) -> Self {
        self.repair = Some(view);
        self
    }

    /// The view read repair writes to, when it is on.
    pub fn repair_store(&self) -> Option<Arc<dyn ViewStore>> {
        self.repair.clone()
    }

    /// Rows brought up to date by read repair since start.
    pub fn repaired_rows(&self) -> u64 {
        self.repaired_rows.load(Ordering::Relaxed)
    }

    /// Re-projects one sandbox now (read repair) and waits for it; `None` when read repair is off.
    pub async fn repair_view(
        &self,
        sandbox_id: &str,
    ) -> Result<Option<RepairOutcome>, BrokerError> {
        let Some(view) = &self.repair else {
            return Ok(None);
        };
        let outcome = repair_row(self.events.as_ref(), view.as_ref(), sandbox_id).await?;
        self.repaired_rows
            .fetch_add(outcome.applied.min(1), Ordering::Relaxed);
        Ok(Some(outcome))
    }

    /// Starts a background repair of `sandbox_id`'s row, unless one is already running or too
    /// many are (the hot path never waits for it).
    pub fn spawn_repair(&self, sandbox_id: &str) {
        let Some(view) = self.repair.clone() else {
            return;
        };
        {
            let mut running = self.repairing.lock().unwrap_or_else(|p| p.into_inner());
            if running.len() >= MAX_CONCURRENT_REPAIRS || !running.insert(sandbox_id.to_string()) {
                return;
            }
        }
        let events = self.events.clone();
        let repairing = self.repairing.clone();
        let repaired = self.repaired_rows.clone();
        let sandbox_id = sandbox_id.to_string();
        tokio::spawn(async move {
            match repair_row(events.as_ref(), view.as_ref(), &sandbox_id).await {
                Ok(outcome) if outcome.applied > 0 => {
                    repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: "read_repair", sandbox_id, applied = outcome.applied, "view row repaired");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target: "read_repair", sandbox_id, error = %e, "read repair failed; the projector will catch up");
                }
            }
            repairing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sandbox_id);
        });
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The event store.
    pub fn events(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// The read view.
    pub fn view(&self) -> &Arc<dyn PoolView> {
        &self.view
    }

    /// Folds a sandbox stream (strongly consistent).
    pub async fn load_sandbox(&self, sandbox_id: &str) -> Result<LoadedSandbox, BrokerError> {
        let events = self.events.load(&sandbox_stream(sandbox_id)).await?;
        let mut sandbox = Sandbox::default();
        for envelope in &events {
            if let BrokerEvent::Sandbox(event) = decode_for_command(envelope)? {
                sandbox.fold(&event);
            }
        }
        Ok(LoadedSandbox { sandbox, events })
    }

    async fn load_claim(&self, stream_id: &str) -> Result<Claim, BrokerError> {
        let mut claim = Claim::default();
        for envelope in self.events.load(stream_id).await? {
            if let BrokerEvent::Claim(event) = decode_for_command(&envelope)? {
                claim.fold(&event);
            }
        }
        Ok(claim)
    }

    /// The caller's sandbox `sandbox_id`, read from its own events (strong): `NotFound` if it
    /// never existed, `NotOwner` if this caller never held it. Its owner keeps seeing it after
    /// the allocation ended (released, expired, deleted), so a lab can confirm the release; the
    /// owner is never reassigned, since a released sandbox is deleted, not returned to the pool.
    pub async fn get_sandbox(
        &self,
        sandbox_id: &str,
        caller: &str,
    ) -> Result<Sandbox, BrokerError> {
        let sandbox = self.load_sandbox(sandbox_id).await?.sandbox;
        if sandbox.status.is_none() {
            return Err(DomainError::NotFound.into());
        }
        if sandbox.owner.as_deref() != Some(caller) {
            return Err(DomainError::NotOwner.into());
        }
        Ok(sandbox)
    }

    /// The whole history of a sandbox, envelopes included (`NotFound` if it never existed).
    pub async fn history(&self, sandbox_id: &str) -> Result<Vec<EventEnvelope>, BrokerError> {
        let events = self.events.load(&sandbox_stream(sandbox_id)).await?;
        if events.is_empty() {
            return Err(DomainError::NotFound.into());
        }
        Ok(events)
    }
}

/// Wraps decided events as envelopes at the versions following `current_version`.
pub fn envelopes<E: cqrs_es::DomainEvent>(
    stream_id: &str,
    current_version: u64,
    events: &[E],
    meta: &CommandMeta,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<EventEnvelope> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| EventEnvelope::new(stream_id, current_version + 1 + i as u64, e, meta, now))
        .collect()
}

/// Claim events as the history shows them, for auditors (who held what).
pub fn claim_events(events: &[EventEnvelope]) -> Vec<(EventEnvelope, ClaimEvent)> {
    events
        .iter()
        .filter_map(|e| match e.decode() {
            Ok(BrokerEvent::Claim(c)) => Some((e.clone(), c)),
            _ => None,
        })
        .collect()
}
