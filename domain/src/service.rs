//! The command side's application service: loads aggregates strongly, decides with the model,
//! appends with version checks, and runs the allocation algorithm of DESIGN.md §6. It knows the
//! ports only, never an adapter.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use chrono::Duration;
use rand::seq::SliceRandom;
use thiserror::Error;

use crate::clock::SharedClock;
use crate::model::claim::{Claim, ClaimCommand};
use crate::model::error::DomainError;
use crate::model::events::{
    BrokerEvent, ClaimEvent, CommandMeta, EventEnvelope, ReleaseReason, SandboxEvent,
};
use crate::model::ids::{claim_stream, sandbox_stream, validate_id, IdError};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;
use crate::model::sandbox::{Sandbox, SandboxCommand};
use crate::store::{CandidateQuery, EventStore, PoolView, StoreError};

/// Tunables of the command side (each one is a documented environment setting of the API).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// One lab duration: `expires_at`, the mark window and expiry (`LAB_DURATION_HOURS`, 48 h).
    pub lab_duration: Duration,
    /// Extra time after `expires_at` before the expiry job ends an allocation (`GRACE_PERIOD_MINUTES`, 30).
    pub expiry_grace: Duration,
    /// Candidates fetched per view query (`K_CANDIDATES`, 15).
    pub k_candidates: usize,
    /// Fresh candidate pages tried before answering "none available" (`ALLOCATE_ROUNDS`, 3).
    pub allocate_rounds: usize,
    /// Reloads of a single-aggregate command after a version conflict (5).
    pub command_retries: usize,
    /// `retry_after` of a 409 NO_SANDBOXES_AVAILABLE, seconds (30).
    pub no_sandbox_retry_after_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            lab_duration: Duration::hours(48),
            expiry_grace: Duration::minutes(30),
            k_candidates: 15,
            allocate_rounds: 3,
            command_retries: 5,
            no_sandbox_retry_after_s: 30,
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

/// A granted (or replayed) allocation.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The sandbox as allocated.
    pub sandbox: Sandbox,
    /// True when an earlier allocation of the same (caller, key) was returned.
    pub replayed: bool,
    /// Candidates lost to concurrent allocators on the way.
    pub conflicts: u32,
}

/// Remembers, per name prefix, a shuffled queue of candidates and the ids this process recently
/// tried, so concurrent requests in one process take distinct candidates and do not retry a
/// sandbox the (lagging) view still shows as available.
#[derive(Debug, Default)]
struct CandidateCache {
    inner: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    queues: HashMap<String, (Instant, VecDeque<PoolRow>)>,
    tried: HashMap<String, Instant>,
    /// Per prefix, the last name read: the next page continues after it.
    cursors: HashMap<String, String>,
}

/// How long a queued candidate may wait before it is considered too old to try.
const CACHE_TTL: StdDuration = StdDuration::from_secs(2);
/// How long a tried candidate stays excluded (covers the projector's normal lag).
const TRIED_TTL: StdDuration = StdDuration::from_secs(10);
/// Bound on remembered prefixes and tried ids (memory stays bounded under any traffic).
const CACHE_MAX_ENTRIES: usize = 10_000;

impl CandidateCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self, prefix: &str) -> Option<PoolRow> {
        let mut state = self.lock();
        let now = Instant::now();
        let CacheState { queues, tried, .. } = &mut *state;
        let (filled, queue) = queues.get_mut(prefix)?;
        if now.duration_since(*filled) > CACHE_TTL {
            queue.clear();
            return None;
        }
        while let Some(row) = queue.pop_front() {
            if !tried.contains_key(&row.sandbox_id) {
                tried.insert(row.sandbox_id.clone(), now);
                return Some(row);
            }
        }
        None
    }

    /// Puts back a candidate that was taken but not tried against the store (the request turned
    /// out to be a replay), so it is not excluded for nothing.
    fn give_back(&self, prefix: &str, row: PoolRow) {
        let mut state = self.lock();
        state.tried.remove(&row.sandbox_id);
        if let Some((_, queue)) = state.queues.get_mut(prefix) {
            queue.push_front(row);
        }
    }

    fn cursor(&self, prefix: &str) -> Option<String> {
        self.lock().cursors.get(prefix).cloned()
    }

    fn recently_tried(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        state
            .tried
            .retain(|_, at| now.duration_since(*at) < TRIED_TTL);
        state.tried.len()
    }

    fn fill(&self, prefix: &str, mut rows: Vec<PoolRow>) {
        // The last row in index order is where the next page continues.
        let last_name = rows.last().map(|r| r.name.clone());
        rows.shuffle(&mut rand::rng());
        let mut state = self.lock();
        if state.queues.len() >= CACHE_MAX_ENTRIES {
            state.queues.clear();
        }
        if state.tried.len() >= CACHE_MAX_ENTRIES {
            state.tried.clear();
        }
        if state.cursors.len() >= CACHE_MAX_ENTRIES {
            state.cursors.clear();
        }
        if let Some(last) = last_name {
            state.cursors.insert(prefix.to_string(), last);
        }
        let CacheState { queues, tried, .. } = &mut *state;
        let fresh = rows
            .into_iter()
            .filter(|r| !tried.contains_key(&r.sandbox_id))
            .collect::<VecDeque<_>>();
        queues.insert(prefix.to_string(), (Instant::now(), fresh));
    }
}

/// The broker's command side.
pub struct Broker {
    events: Arc<dyn EventStore>,
    view: Arc<dyn PoolView>,
    clock: SharedClock,
    config: BrokerConfig,
    cache: CandidateCache,
}

/// A sandbox stream folded to its state, with its events.
#[derive(Debug, Clone)]
pub struct LoadedSandbox {
    /// The state.
    pub sandbox: Sandbox,
    /// The events it was folded from.
    pub events: Vec<EventEnvelope>,
}

impl Broker {
    /// A broker over the given ports.
    pub fn new(
        events: Arc<dyn EventStore>,
        view: Arc<dyn PoolView>,
        clock: SharedClock,
        config: BrokerConfig,
    ) -> Self {
        Self {
            events,
            view,
            clock,
            config,
            cache: CandidateCache::default(),
        }
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
            if let BrokerEvent::Sandbox(event) = decode(envelope)? {
                sandbox.fold(&event);
            }
        }
        Ok(LoadedSandbox { sandbox, events })
    }

    async fn load_claim(&self, stream_id: &str) -> Result<Claim, BrokerError> {
        let mut claim = Claim::default();
        for envelope in self.events.load(stream_id).await? {
            if let BrokerEvent::Claim(event) = decode(&envelope)? {
                claim.fold(&event);
            }
        }
        Ok(claim)
    }

    /// The caller's live allocation of `sandbox_id`, read from the sandbox's own events (strong):
    /// `NotFound` if it never existed, `NotOwner` if it is not this caller's live allocation.
    pub async fn get_sandbox(
        &self,
        sandbox_id: &str,
        caller: &str,
    ) -> Result<Sandbox, BrokerError> {
        let sandbox = self.load_sandbox(sandbox_id).await?.sandbox;
        if sandbox.status.is_none() {
            return Err(DomainError::NotFound.into());
        }
        if !sandbox.is_live_allocation_of(caller) {
            return Err(DomainError::NotOwner.into());
        }
        Ok(sandbox)
    }

    /// Allocates a sandbox to `request.caller` (DESIGN.md §6), or replays the live allocation of
    /// the same (caller, key). No sandbox is ever allocated twice: the sandbox's next version is
    /// written on condition it does not exist. No (caller, key) holds two: the claim's next
    /// version is written in the same transaction.
    pub async fn allocate(
        &self,
        request: &AllocateRequest,
        meta: &CommandMeta,
    ) -> Result<Allocation, BrokerError> {
        let caller = validate_id("caller id", &request.caller)?;
        let key = match request.idempotency_key.as_deref().map(str::trim) {
            Some(k) if !k.is_empty() => validate_id("Idempotency-Key", k)?,
            _ => caller.clone(),
        };
        let prefix = request
            .name_prefix
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| validate_id("X-Sandbox-Name-Prefix", p))
            .transpose()?;
        let claim_id = claim_stream(&caller, &key);
        let mut conflicts = 0u32;
        let mut rounds = 0usize;
        // Each pass starts from a strong read of the claim, so a duplicate request that lost the
        // claim race comes back here and returns the winner's sandbox.
        'claim: loop {
            let claim = self.load_claim(&claim_id).await?;
            if let Some(held) = &claim.active {
                let sandbox = self.load_sandbox(held).await?.sandbox;
                return Ok(Allocation {
                    sandbox,
                    replayed: true,
                    conflicts,
                });
            }
            loop {
                let Some(row) = self.next_candidate(prefix.as_deref(), &mut rounds).await? else {
                    return Err(BrokerError::NoSandboxAvailable {
                        retry_after_s: self.config.no_sandbox_retry_after_s,
                    });
                };
                let state = sandbox_from_row(&row);
                let now = self.clock.now();
                let events = match state.decide(
                    SandboxCommand::Allocate {
                        caller: caller.clone(),
                        track_name: request.track_name.clone(),
                        idempotency_key: key.clone(),
                        claim_stream: claim_id.clone(),
                        lab_duration: self.config.lab_duration,
                    },
                    now,
                ) {
                    Ok(events) => events,
                    Err(_) => continue,
                };
                let grant = match claim.decide(ClaimCommand::Grant {
                    caller: caller.clone(),
                    idempotency_key: key.clone(),
                    sandbox_id: row.sandbox_id.clone(),
                }) {
                    Ok(grant) => grant,
                    Err(e) => {
                        self.cache.give_back(prefix.as_deref().unwrap_or(""), row);
                        return Err(e.into());
                    }
                };
                let sandbox_stream_id = sandbox_stream(&row.sandbox_id);
                let mut batch = envelopes(&sandbox_stream_id, state.version, &events, meta, now);
                batch.extend(envelopes(&claim_id, claim.version, &grant, meta, now));
                match self.events.append(batch).await {
                    Ok(()) => {
                        let mut sandbox = state;
                        for event in &events {
                            sandbox.fold(event);
                        }
                        return Ok(Allocation {
                            sandbox,
                            replayed: false,
                            conflicts,
                        });
                    }
                    Err(StoreError::VersionConflict { stream_id }) if stream_id == claim_id => {
                        // A concurrent duplicate holds the claim now; this candidate is untouched.
                        self.cache.give_back(prefix.as_deref().unwrap_or(""), row);
                        continue 'claim;
                    }
                    Err(StoreError::VersionConflict { .. }) => {
                        // Someone else took (or changed) this sandbox: try the next candidate
                        // at once, no sleeping on the hot path.
                        conflicts += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    async fn next_candidate(
        &self,
        prefix: Option<&str>,
        rounds: &mut usize,
    ) -> Result<Option<PoolRow>, BrokerError> {
        let cache_key = prefix.unwrap_or("");
        loop {
            if let Some(row) = self.cache.pop(cache_key) {
                return Ok(Some(row));
            }
            if *rounds >= self.config.allocate_rounds {
                return Ok(None);
            }
            *rounds += 1;
            // Ask for enough rows that the ones this process tried a moment ago (and the view
            // may still show as available) cannot crowd out fresh candidates; bounded, so an
            // allocation's reads stay O(K) whatever the pool size.
            let limit = (self.config.k_candidates + self.cache.recently_tried()).min(200);
            let query = CandidateQuery {
                prefix: prefix.map(str::to_string),
                start_pick: rand::random(),
                after_name: prefix.and_then(|_| self.cache.cursor(cache_key)),
                limit,
            };
            let rows = self.view.candidates(&query).await?;
            let available: Vec<PoolRow> = rows
                .into_iter()
                .filter(|r| r.status == SandboxStatus::Available)
                .collect();
            if available.is_empty() && *rounds > 1 {
                return Ok(None);
            }
            self.cache.fill(cache_key, available);
        }
    }

    /// The owner ends the allocation: `DeletionRequested` and `ClaimReleased` in one
    /// transaction. A repeat by the owner, or a call after expiry ended it, returns the sandbox
    /// with the original time and appends nothing.
    pub async fn mark_for_deletion(
        &self,
        sandbox_id: &str,
        caller: &str,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        self.execute(
            sandbox_id,
            SandboxCommand::MarkForDeletion {
                caller: caller.to_string(),
            },
            meta,
        )
        .await
    }

    /// Runs one sandbox command with a strong load, the model's decision and a conditional
    /// append; a lost race reloads and decides again (the decision is re-made on fresh state, so
    /// the retry is safe). A command that ends an allocation releases its claim in the same
    /// transaction.
    pub async fn execute(
        &self,
        sandbox_id: &str,
        command: SandboxCommand,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        let stream_id = sandbox_stream(sandbox_id);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut sandbox = self.load_sandbox(sandbox_id).await?.sandbox;
            let now = self.clock.now();
            let events = sandbox.decide(command.clone(), now)?;
            if events.is_empty() {
                return Ok(sandbox);
            }
            let mut batch = envelopes(&stream_id, sandbox.version, &events, meta, now);
            let release_reason = events.iter().find_map(|e| match e {
                SandboxEvent::DeletionRequested { .. } => Some(ReleaseReason::DeletionRequested),
                SandboxEvent::AllocationExpired { .. } => Some(ReleaseReason::Expired),
                _ => None,
            });
            if let (Some(reason), Some(claim_id)) = (release_reason, sandbox.claim_stream.clone()) {
                let claim = self.load_claim(&claim_id).await?;
                let release = claim.decide(ClaimCommand::Release {
                    sandbox_id: sandbox_id.to_string(),
                    reason,
                })?;
                batch.extend(envelopes(&claim_id, claim.version, &release, meta, now));
            }
            match self.events.append(batch).await {
                Ok(()) => {
                    for event in &events {
                        sandbox.fold(event);
                    }
                    return Ok(sandbox);
                }
                Err(StoreError::VersionConflict { .. })
                    if attempt < self.config.command_retries =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
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

fn decode(envelope: &EventEnvelope) -> Result<BrokerEvent, StoreError> {
    envelope.decode().map_err(|e| {
        StoreError::Corrupt(format!("{} v{}: {e}", envelope.stream_id, envelope.version))
    })
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

/// The aggregate state a view row stands for. Valid for deciding an allocation because the
/// append is conditioned on the row's version: if the row is stale, the write conflicts.
fn sandbox_from_row(row: &PoolRow) -> Sandbox {
    Sandbox {
        sandbox_id: row.sandbox_id.clone(),
        status: Some(row.status),
        name: row.name.clone(),
        external_id: row.external_id.clone(),
        sfdc_account_id: row.sfdc_account_id.clone(),
        version: row.version,
        ..Sandbox::default()
    }
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
