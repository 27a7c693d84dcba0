//! The command side's application service: loads aggregates strongly, decides with the model,
//! appends with version checks, and runs the allocation algorithm of DESIGN.md §6. It knows the
//! ports only, never an adapter.

#[cfg(test)]
mod allocation_properties;
#[cfg(test)]
mod fault_store;
#[cfg(test)]
mod liveness_tests;
mod pool_control;
mod quota;

pub use quota::TrackQuotas;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::model::ids::{
    claim_stream, quota_stream, sandbox_stream, validate_id, IdError, QUOTA_STREAM_PREFIX,
};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;
use crate::model::sandbox::{Sandbox, SandboxCommand};
use crate::store::{
    decode_stored, repair_row, CandidateQuery, EventStore, ListFilter, PoolView, RepairOutcome,
    StoreError, ViewStore,
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
    /// outcome that a strong read of its stream could not settle either (10 s; the store was
    /// unreachable twice in a row). After it, the conditional write decides again.
    pub unknown_outcome_hold: StdDuration,
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
    /// The track holds its maximum of concurrent allocations.
    #[error("track {track} holds its quota of {limit} concurrent allocations")]
    QuotaExceeded {
        /// The track name.
        track: String,
        /// The limit in force.
        limit: u32,
        /// Suggested wait, seconds.
        retry_after_s: u64,
    },
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

/// What the allocator of this process knows beyond the (lagging) view: per name prefix a
/// shuffled queue of candidates, the candidates a request is trying right now, and the sandboxes
/// known to be taken at a version the view may still show as available.
///
/// * **In flight**: a candidate popped by one request is invisible to the others until that
///   request's conditional write has decided, so concurrent requests in one process never
///   compete for the same row.
/// * **Taken**: a sandbox this process allocated, or whose conditional write it lost, is taken
///   at the row version it was tried at. A view row at that version (or older) is stale and is
///   skipped; a newer row (the view caught up and the sandbox became available again) is not.
///   This is what keeps a stale view from turning into 409s: a request never spends its budget
///   on a sandbox the process already knows to be gone.
#[derive(Debug, Default)]
struct Candidates {
    inner: Mutex<CandidateState>,
    /// Woken whenever an in-flight candidate is decided (taken or given back).
    decided: tokio::sync::Notify,
    /// Woken whenever a page read ends (filled or not).
    fetched: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct CandidateState {
    queues: HashMap<String, (Instant, VecDeque<PoolRow>)>,
    in_flight: HashSet<String>,
    /// Sandbox id → the highest row version known not to be allocatable any more.
    taken: HashMap<String, u64>,
    /// Insertion order of `taken`, for bounded memory (oldest forgotten first).
    taken_order: VecDeque<String>,
    /// Sandbox id → until when it is skipped: its allocation write had an unknown outcome that
    /// could not be read back. Bounded in time, unlike `taken`, because the write may as well
    /// not have landed (docs/liveness.md, path 1).
    unsure: HashMap<String, Instant>,
    /// When each of the recent takes happened (sizes candidate pages under a burst).
    recent_takes: VecDeque<Instant>,
    /// Per prefix, the last name read: the next page continues after it.
    cursors: HashMap<String, String>,
    /// Prefixes whose candidate page is being read right now (see [`PageTurn`]).
    fetching: HashSet<String>,
}

/// How long a queued candidate may wait before it is considered too old to try.
const QUEUE_TTL: StdDuration = StdDuration::from_secs(2);
/// The window over which recent takes widen the next candidate page.
const RECENT_WINDOW: StdDuration = StdDuration::from_secs(10);
/// Bound on remembered prefixes and cursors.
const MAX_PREFIXES: usize = 10_000;
/// Bound on remembered taken sandboxes (about 100 bytes each). Forgetting one costs at most one
/// conflicting write, after which it is remembered again.
const MAX_TAKEN: usize = 200_000;
/// Largest candidate page.
const MAX_PAGE: usize = 200;
/// How long a request waits for another request's page read of its prefix before it reads a
/// page itself, and how many such waits one request makes at most.
const PAGE_WAIT: StdDuration = StdDuration::from_millis(100);
const MAX_PAGE_WAITS: usize = 20;

/// Why [`Candidates::fill`] found nothing to queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// At least one usable candidate was queued.
    Queued,
    /// Every row was known taken.
    AllTaken,
    /// Some rows are being tried by other requests right now (and may be given back).
    OnlyInFlight,
}

impl CandidateState {
    fn usable(&self, row: &PoolRow) -> bool {
        row.status == SandboxStatus::Available
            && !self.in_flight.contains(&row.sandbox_id)
            && self
                .unsure
                .get(&row.sandbox_id)
                .is_none_or(|until| Instant::now() >= *until)
            && self
                .taken
                .get(&row.sandbox_id)
                .is_none_or(|&version| row.version > version)
    }
}

impl Candidates {
    fn lock(&self) -> std::sync::MutexGuard<'_, CandidateState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next queued candidate for `prefix` nobody else is trying, marked in flight until the
    /// returned guard is decided or dropped.
    fn pop(&self, prefix: &str) -> Option<InFlight<'_>> {
        let mut state = self.lock();
        let (filled, mut queue) = state.queues.remove(prefix)?;
        if filled.elapsed() > QUEUE_TTL {
            return None;
        }
        let mut found = None;
        while let Some(row) = queue.pop_front() {
            if state.usable(&row) {
                found = Some(row);
                break;
            }
        }
        if let Some(row) = &found {
            state.in_flight.insert(row.sandbox_id.clone());
        }
        if !queue.is_empty() {
            state.queues.insert(prefix.to_string(), (filled, queue));
        }
        found.map(|row| InFlight {
            candidates: self,
            row,
            decided: false,
        })
    }

    /// The turn to read the next candidate page of `prefix`, unless another request of this
    /// process is reading one now: under a burst every request finds the queue empty at once,
    /// and each reading its own page (the same rows, from the same cursor) parsed a dozen view
    /// rows per allocation and threw all but the last page away.
    fn page_turn(&self, prefix: &str) -> Option<PageTurn<'_>> {
        let mut state = self.lock();
        if state.fetching.len() >= MAX_PREFIXES {
            // Only reachable if turns leaked, which their drop rules out; never block on it.
            state.fetching.clear();
        }
        state.fetching.insert(prefix.to_string()).then(|| PageTurn {
            candidates: self,
            prefix: prefix.to_string(),
        })
    }

    /// Queues the usable rows of a fresh page for `prefix`, shuffled, after the rows already
    /// queued for it (a row already queued is not queued twice). `Queued` when the queue now
    /// holds a usable row.
    fn fill(&self, prefix: &str, mut rows: Vec<PoolRow>, last_name: Option<String>) -> Fill {
        rows.shuffle(&mut rand::rng());
        let mut state = self.lock();
        if state.queues.len() >= MAX_PREFIXES {
            state.queues.clear();
        }
        if state.cursors.len() >= MAX_PREFIXES {
            state.cursors.clear();
        }
        if let Some(last) = last_name {
            state.cursors.insert(prefix.to_string(), last);
        }
        let in_flight = rows.iter().any(|r| state.in_flight.contains(&r.sandbox_id));
        let mut queue = match state.queues.remove(prefix) {
            Some((filled, queue)) if filled.elapsed() <= QUEUE_TTL => queue,
            _ => VecDeque::new(),
        };
        let queued: HashSet<String> = queue.iter().map(|r| r.sandbox_id.clone()).collect();
        queue.extend(
            rows.into_iter()
                .filter(|r| state.usable(r) && !queued.contains(&r.sandbox_id)),
        );
        let usable = queue.iter().any(|r| state.usable(r));
        if !queue.is_empty() {
            state
                .queues
                .insert(prefix.to_string(), (Instant::now(), queue));
        }
        if usable {
            Fill::Queued
        } else if in_flight {
            Fill::OnlyInFlight
        } else {
            Fill::AllTaken
        }
    }

    /// The candidate's conditional write decided that it is gone (this request took it, or
    /// another writer had): remember it as taken at the version it was tried at.
    fn taken(&self, row: &PoolRow) {
        {
            let mut state = self.lock();
            state.in_flight.remove(&row.sandbox_id);
            let now = Instant::now();
            state.recent_takes.push_back(now);
            while state
                .recent_takes
                .front()
                .is_some_and(|at| now.duration_since(*at) > RECENT_WINDOW)
            {
                state.recent_takes.pop_front();
            }
            let previous = state.taken.insert(row.sandbox_id.clone(), row.version);
            if previous.is_none() {
                state.taken_order.push_back(row.sandbox_id.clone());
            }
            while state.taken.len() > MAX_TAKEN {
                match state.taken_order.pop_front() {
                    Some(oldest) => {
                        state.taken.remove(&oldest);
                    }
                    None => break,
                }
            }
        }
        self.decided.notify_waiters();
    }

    /// Puts back a candidate that was taken from the queue but not written (the request turned
    /// out to be a replay), so the next request can use it.
    fn give_back(&self, prefix: &str, row: PoolRow) {
        {
            let mut state = self.lock();
            state.in_flight.remove(&row.sandbox_id);
            match state.queues.get_mut(prefix) {
                Some((_, queue)) => queue.push_front(row),
                None => {
                    state
                        .queues
                        .insert(prefix.to_string(), (Instant::now(), VecDeque::from([row])));
                }
            }
        }
        self.decided.notify_waiters();
    }

    /// The candidate's conditional write ended with an unknown outcome that could not be read
    /// back: skip it for `hold`, then let a conditional write decide again.
    fn unsure(&self, row: &PoolRow, hold: StdDuration) {
        {
            let mut state = self.lock();
            state.in_flight.remove(&row.sandbox_id);
            let now = Instant::now();
            if state.unsure.len() >= MAX_TAKEN {
                state.unsure.retain(|_, until| *until > now);
            }
            state.unsure.insert(row.sandbox_id.clone(), now + hold);
        }
        self.decided.notify_waiters();
    }

    /// An undecided candidate is released (its request failed on the way or was cancelled).
    fn release(&self, row: &PoolRow) {
        self.lock().in_flight.remove(&row.sandbox_id);
        self.decided.notify_waiters();
    }

    fn cursor(&self, prefix: &str) -> Option<String> {
        self.lock().cursors.get(prefix).cloned()
    }

    /// Sandboxes taken in the last few seconds: rows the view may still show as available.
    fn recently_taken(&self) -> usize {
        self.lock().recent_takes.len()
    }
}

/// A candidate one request is trying, invisible to the other requests of this process until the
/// request decides it (taken, given back, unsure). Dropped undecided — the request failed on the
/// way, or was cancelled mid-append because the client went away or a timeout fired — it is
/// released, never left in flight for good: another request may try it at once, and if the
/// cancelled write landed after all, that request's conditional write conflicts and marks it taken.
struct InFlight<'a> {
    candidates: &'a Candidates,
    row: PoolRow,
    decided: bool,
}

impl InFlight<'_> {
    fn row(&self) -> &PoolRow {
        &self.row
    }

    fn taken(mut self) {
        self.decided = true;
        self.candidates.taken(&self.row);
    }

    fn give_back(mut self, prefix: &str) {
        self.decided = true;
        self.candidates.give_back(prefix, self.row.clone());
    }

    fn unsure(mut self, hold: StdDuration) {
        self.decided = true;
        self.candidates.unsure(&self.row, hold);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.candidates.release(&self.row);
        }
    }
}

/// One request's turn to read a candidate page of a prefix; ending it (by drop, so also when the
/// read fails or the request is cancelled) lets the requests waiting on the prefix go on.
struct PageTurn<'a> {
    candidates: &'a Candidates,
    prefix: String,
}

impl Drop for PageTurn<'_> {
    fn drop(&mut self) {
        self.candidates.lock().fetching.remove(&self.prefix);
        self.candidates.fetched.notify_waiters();
    }
}

/// What a strong read says about an allocation append whose outcome was unknown.
enum Settled {
    /// This request's events are stored (these, from the tried version on).
    Landed(Vec<EventEnvelope>),
    /// Another writer's event holds the version this request tried.
    Lost,
    /// Nothing after the tried version: the write did not land (yet).
    NotLanded,
    /// The read failed too.
    Unknown,
}

/// Where one allocation request is in its search for a candidate.
#[derive(Debug, Default)]
struct Search {
    /// Random-offset pages read.
    random_pages: usize,
    /// Full sweeps of the view's available range.
    sweeps: usize,
    /// Waits for another request's page read.
    page_waits: usize,
}

/// The broker's command side.
pub struct Broker {
    events: Arc<dyn EventStore>,
    view: Arc<dyn PoolView>,
    clock: SharedClock,
    config: BrokerConfig,
    candidates: Candidates,
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

impl Broker {
    /// A broker over the given ports.
    pub fn new(
        events: Arc<dyn EventStore>,
        view: Arc<dyn PoolView>,
        clock: SharedClock,
        config: BrokerConfig,
    ) -> Self {
        let allocating = tokio::sync::Semaphore::new(config.allocate_concurrency.max(1));
        Self {
            events,
            view,
            clock,
            config,
            candidates: Candidates::default(),
            allocating,
            repair: None,
            repairing: Arc::default(),
            repaired_rows: Arc::default(),
            drain_cache: pool_control::DrainCache::default(),
            track_locks: quota::TrackLocks::default(),
        }
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
            if let BrokerEvent::Sandbox(event) = decode_stored(envelope)? {
                sandbox.fold(&event);
            }
        }
        Ok(LoadedSandbox { sandbox, events })
    }

    async fn load_claim(&self, stream_id: &str) -> Result<Claim, BrokerError> {
        let mut claim = Claim::default();
        for envelope in self.events.load(stream_id).await? {
            if let BrokerEvent::Claim(event) = decode_stored(&envelope)? {
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
        self.allocate_within(request, meta, None).await
    }

    /// [`Broker::allocate`] with a further cap on the track's concurrent allocations (a per-track
    /// credential's maximum); the lower of it and the configured quota applies. A quota-bound
    /// allocation takes a slot in its track's quota stream in the same transaction, so the limit
    /// holds under any concurrency. A drained pool (or prefix) refuses new allocations; a replay
    /// of a live allocation is answered before either check.
    pub async fn allocate_within(
        &self,
        request: &AllocateRequest,
        meta: &CommandMeta,
        track_limit: Option<u32>,
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
        let quota = request.track_name.as_deref().and_then(|track| {
            let limit = match (self.config.quotas.limit_for(track), track_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            limit.map(|limit| (track.to_string(), limit))
        });
        let cache_key = prefix.as_deref().unwrap_or("");
        // Waiting for a permit is fair (FIFO); the semaphore is never closed.
        let _permit = self
            .allocating
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("allocation admission closed".into()))?;
        let mut conflicts = 0u32;
        let mut search = Search::default();
        let mut claim_reads = 0usize;
        // Each pass starts from a strong read of the claim, so a duplicate request that lost the
        // claim race comes back here and returns the winner's sandbox.
        'claim: loop {
            claim_reads += 1;
            let claim = self.load_claim(&claim_id).await?;
            if let Some(held) = &claim.active {
                let sandbox = self.load_sandbox(held).await?.sandbox;
                // The claim was read before the sandbox: a mark-for-deletion or expiry may have
                // ended the allocation (and released the claim in the same transaction) in
                // between. Only a sandbox still allocated under this very claim is a replay;
                // otherwise read the claim again, which now shows it released.
                let replay = sandbox.status == Some(SandboxStatus::Allocated)
                    && sandbox.claim_stream.as_deref() == Some(claim_id.as_str());
                if replay
                    && sandbox
                        .expires_at
                        .is_some_and(|end| self.clock.now() >= end)
                {
                    // The lab window has ended but the expiry job has not run yet: handing this
                    // sandbox back would start a lab that is over. Expire it now (grace zero, as
                    // extension is refused from `expires_at` on), which releases the claim in the
                    // same transaction, and answer as a fresh request would: a new sandbox, or
                    // 409 (docs/liveness.md, path 6). Lost to a concurrent expiry, mark or
                    // extension, the claim is simply read again.
                    match self
                        .execute(
                            held,
                            SandboxCommand::Expire {
                                grace: Duration::zero(),
                            },
                            meta,
                        )
                        .await
                    {
                        Ok(_) | Err(BrokerError::Domain(_)) => {}
                        Err(e) => return Err(e),
                    }
                    if claim_reads > self.config.command_retries {
                        return Err(StoreError::Unavailable(format!(
                            "claim {claim_id} kept changing while it was read"
                        ))
                        .into());
                    }
                    continue 'claim;
                }
                if replay {
                    return Ok(Allocation {
                        sandbox,
                        replayed: true,
                        conflicts,
                    });
                }
                if claim_reads > self.config.command_retries {
                    return Err(StoreError::Unavailable(format!(
                        "claim {claim_id} kept changing while it was read"
                    ))
                    .into());
                }
                continue 'claim;
            }
            if let Some(drain) = self.drain_refusing(prefix.as_deref()).await? {
                return Err(BrokerError::Maintenance {
                    prefix: drain.prefix,
                    retry_after_s: self.config.maintenance_retry_after_s,
                });
            }
            // Held until this pass ends: the track's other requests in this process wait here
            // instead of racing this one for the quota stream's next version.
            let _quota_turn = match &quota {
                Some((track, _)) => Some(self.track_locks.lock(track).await),
                None => None,
            };
            let mut usage = match &quota {
                Some((track, _)) => Some(quota::load_usage(self.events.as_ref(), track).await?),
                None => None,
            };
            let mut quota_conflicts = 0usize;
            loop {
                if let (Some((track, limit)), Some(usage)) = (&quota, &usage) {
                    if usage.in_use() >= *limit as usize {
                        return Err(BrokerError::QuotaExceeded {
                            track: track.clone(),
                            limit: *limit,
                            retry_after_s: self.config.no_sandbox_retry_after_s,
                        });
                    }
                }
                let Some(candidate) = self.next_candidate(prefix.as_deref(), &mut search).await?
                else {
                    return Err(BrokerError::NoSandboxAvailable {
                        retry_after_s: self.config.no_sandbox_retry_after_s,
                    });
                };
                let row = candidate.row().clone();
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
                    Err(_) => {
                        candidate.taken();
                        continue;
                    }
                };
                let grant = match claim.decide(ClaimCommand::Grant {
                    caller: caller.clone(),
                    idempotency_key: key.clone(),
                    sandbox_id: row.sandbox_id.clone(),
                }) {
                    Ok(grant) => grant,
                    Err(e) => {
                        candidate.give_back(cache_key);
                        return Err(e.into());
                    }
                };
                let sandbox_stream_id = sandbox_stream(&row.sandbox_id);
                let mut batch = envelopes(&sandbox_stream_id, state.version, &events, meta, now);
                batch.extend(envelopes(&claim_id, claim.version, &grant, meta, now));
                let quota_id = quota.as_ref().map(|(track, _)| quota_stream(track));
                if let (Some((track, limit)), Some(usage), Some(quota_id)) =
                    (&quota, &usage, &quota_id)
                {
                    match usage.take(&row.sandbox_id, *limit) {
                        Ok(taken) => {
                            batch.extend(envelopes(quota_id, usage.version, &[taken], meta, now));
                        }
                        Err(full) => {
                            candidate.give_back(cache_key);
                            return Err(BrokerError::QuotaExceeded {
                                track: track.clone(),
                                limit: full.limit,
                                retry_after_s: self.config.no_sandbox_retry_after_s,
                            });
                        }
                    }
                }
                let first_event = batch.first().map(|e| e.event_id);
                match self.events.append(batch).await {
                    Ok(()) => {
                        candidate.taken();
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
                        candidate.give_back(cache_key);
                        continue 'claim;
                    }
                    Err(StoreError::VersionConflict { stream_id })
                        if quota_id.as_deref() == Some(stream_id.as_str()) =>
                    {
                        // Another instance allocated (or released) for this track first: the
                        // candidate is untouched; read the new count and decide again.
                        candidate.give_back(cache_key);
                        quota_conflicts += 1;
                        if quota_conflicts > QUOTA_RETRIES {
                            return Err(StoreError::Unavailable(format!(
                                "quota of track {} kept changing",
                                quota.as_ref().map_or("", |(t, _)| t.as_str())
                            ))
                            .into());
                        }
                        if let Some((track, _)) = &quota {
                            usage = Some(quota::load_usage(self.events.as_ref(), track).await?);
                        }
                    }
                    Err(StoreError::VersionConflict { .. }) => {
                        // Someone else took (or changed) this sandbox: the view row is stale.
                        // Remember it as taken so no request of this process tries it again,
                        // repair its row in the background, and try the next candidate at once
                        // (no sleeping on the hot path).
                        conflicts += 1;
                        candidate.taken();
                        self.spawn_repair(&row.sandbox_id);
                    }
                    Err(e) => {
                        // Unknown outcome (throttled, unreachable, a failed group commit): the
                        // write may or may not have landed. A strong read of the sandbox's
                        // stream settles it (docs/liveness.md, path 1).
                        match self
                            .settle_unknown(&sandbox_stream_id, row.version, first_event)
                            .await
                        {
                            Settled::Landed(stored) => {
                                candidate.taken();
                                let mut sandbox = state;
                                for envelope in &stored {
                                    if let BrokerEvent::Sandbox(event) = decode_stored(envelope)? {
                                        sandbox.fold(&event);
                                    }
                                }
                                return Ok(Allocation {
                                    sandbox,
                                    replayed: false,
                                    conflicts,
                                });
                            }
                            Settled::Lost => {
                                // Someone else's write holds the next version: a plain conflict.
                                conflicts += 1;
                                candidate.taken();
                                self.spawn_repair(&row.sandbox_id);
                                continue;
                            }
                            Settled::NotLanded => {
                                // Usable again at once. Should the write still land later (a
                                // DynamoDB transaction the SDK gave up on), it takes this
                                // claim's next version, so no (caller, key) ends up with two
                                // allocations, and a retry of the request replays it.
                                candidate.give_back(cache_key);
                            }
                            Settled::Unknown => {
                                candidate.unsure(self.config.unknown_outcome_hold);
                            }
                        }
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// Reads the sandbox stream strongly after an append whose outcome the store could not tell:
    /// did the event this request wrote at `tried_at + 1` (its `event_id`) land?
    async fn settle_unknown(
        &self,
        stream_id: &str,
        tried_at: u64,
        first_event: Option<uuid::Uuid>,
    ) -> Settled {
        match self.events.load_after(stream_id, tried_at).await {
            Ok(stored) => match stored.first() {
                Some(e) if Some(e.event_id) == first_event => Settled::Landed(stored),
                Some(_) => Settled::Lost,
                None => Settled::NotLanded,
            },
            Err(e) => {
                tracing::warn!(target: "allocate", stream_id, error = %e, "unknown append outcome could not be read back");
                Settled::Unknown
            }
        }
    }

    /// The next candidate for this request: from the process's queue, else a random-offset page
    /// of the view, else a full sweep of the view's available range. `None` (a 409) only when a
    /// complete sweep finds nothing this process does not already know to be taken.
    async fn next_candidate(
        &self,
        prefix: Option<&str>,
        search: &mut Search,
    ) -> Result<Option<InFlight<'_>>, BrokerError> {
        let cache_key = prefix.unwrap_or("");
        loop {
            if let Some(candidate) = self.candidates.pop(cache_key) {
                return Ok(Some(candidate));
            }
            if search.random_pages < self.config.allocate_rounds {
                // Registered before asking for the turn, so a read that ends in between still
                // wakes this request.
                let fetched = self.candidates.fetched.notified();
                tokio::pin!(fetched);
                fetched.as_mut().enable();
                let turn = self.candidates.page_turn(cache_key);
                if turn.is_none() && search.page_waits < MAX_PAGE_WAITS {
                    // Another request is reading this prefix's next page: use its rows.
                    search.page_waits += 1;
                    let _ = tokio::time::timeout(PAGE_WAIT, fetched).await;
                    continue;
                }
                search.random_pages += 1;
                // Ask for enough rows that the ones this process took a moment ago (and the
                // view may still show as available) cannot crowd out fresh candidates; bounded,
                // so an allocation's reads stay O(K) whatever the pool size.
                let limit = (self.config.k_candidates + self.candidates.recently_taken())
                    .clamp(1, MAX_PAGE);
                let query = CandidateQuery {
                    prefix: prefix.map(str::to_string),
                    start_pick: rand::random(),
                    after_name: prefix.and_then(|_| self.candidates.cursor(cache_key)),
                    limit,
                };
                let rows = self.view.candidates(&query).await?;
                let last_name = rows.last().map(|r| r.name.clone());
                let filled = self.candidates.fill(cache_key, rows, last_name);
                drop(turn);
                if filled == Fill::Queued {
                    continue;
                }
                // A page with nothing usable proves nothing about the rest of the pool: sweep.
                search.random_pages = self.config.allocate_rounds;
            }
            if search.sweeps >= self.config.max_sweeps {
                tracing::warn!(target: "allocate", sweeps = search.sweeps, "candidate sweeps exhausted");
                return Ok(None);
            }
            search.sweeps += 1;
            match self.sweep(prefix).await? {
                Fill::Queued => continue,
                Fill::OnlyInFlight => {
                    // The only candidates left are being tried by other requests; one that turns
                    // out to be a replay gives its candidate back. Wait for a decision (bounded).
                    let decided = self.candidates.decided.notified();
                    let _ = tokio::time::timeout(StdDuration::from_millis(50), decided).await;
                }
                Fill::AllTaken => return Ok(None),
            }
        }
    }

    /// Reads the view's whole available range (for the prefix) page by page until a page has a
    /// usable candidate. Cost is proportional to the rows the view wrongly shows as available,
    /// which the projector keeps small; bounded by `max_sweep_rows`.
    async fn sweep(&self, prefix: Option<&str>) -> Result<Fill, BrokerError> {
        let cache_key = prefix.unwrap_or("");
        let filter = ListFilter {
            status: Some(SandboxStatus::Available),
            owner: None,
            prefix: prefix.map(str::to_string),
        };
        let mut cursor: Option<String> = None;
        let mut read = 0usize;
        let mut in_flight = false;
        loop {
            let page = self.view.list(&filter, 100, cursor.as_deref()).await?;
            read += page.rows.len();
            match self.candidates.fill(cache_key, page.rows, None) {
                Fill::Queued => return Ok(Fill::Queued),
                Fill::OnlyInFlight => in_flight = true,
                Fill::AllTaken => {}
            }
            cursor = page.cursor;
            if cursor.is_none() || read >= self.config.max_sweep_rows {
                break;
            }
        }
        if read >= self.config.max_sweep_rows {
            tracing::warn!(target: "allocate", read, "sweep bound reached; the view lags far behind");
        }
        Ok(if in_flight {
            Fill::OnlyInFlight
        } else {
            Fill::AllTaken
        })
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
        let mut quota_conflicts = 0usize;
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
            // An allocation that took a quota slot gives it back in the same transaction that
            // ends it, whatever the quota configuration of this process: the quota stream says
            // whether the sandbox holds a slot.
            let mut _quota_turn = None;
            if let (Some(_), Some(track)) = (release_reason, sandbox.track_name.clone()) {
                _quota_turn = Some(self.track_locks.lock(&track).await);
                let usage = quota::load_usage(self.events.as_ref(), &track).await?;
                if let Some(release) = usage.release(sandbox_id) {
                    batch.extend(envelopes(
                        &quota_stream(&track),
                        usage.version,
                        &[release],
                        meta,
                        now,
                    ));
                }
            }
            match self.events.append(batch).await {
                Ok(()) => {
                    for event in &events {
                        sandbox.fold(event);
                    }
                    return Ok(sandbox);
                }
                Err(StoreError::VersionConflict { stream_id })
                    if stream_id.starts_with(QUOTA_STREAM_PREFIX)
                        && quota_conflicts < QUOTA_RETRIES =>
                {
                    // Only the track's count moved (another allocation or release committed
                    // first); that does not spend the command's own retry budget.
                    quota_conflicts += 1;
                    attempt -= 1;
                    continue;
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

    /// The owner extends the lab window by `hours` (`LeaseExtended`), within
    /// `MAX_LAB_EXTENSION_HOURS` in total per allocation; refused once the window has ended.
    /// With an `idempotency_key`, a retry of an extension that landed appends nothing and is
    /// answered with that extension's window ([`Sandbox::extension`]).
    pub async fn extend_lease(
        &self,
        sandbox_id: &str,
        caller: &str,
        hours: u32,
        idempotency_key: Option<&str>,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        let idempotency_key = idempotency_key
            .map(|k| validate_id("Idempotency-Key", k))
            .transpose()?;
        self.execute(
            sandbox_id,
            SandboxCommand::ExtendLease {
                caller: caller.to_string(),
                hours,
                max_total: self.config.max_extension,
                idempotency_key,
            },
            meta,
        )
        .await
    }

    /// The slots a track's allocations hold now (strongly consistent).
    pub async fn quota_usage(
        &self,
        track: &str,
    ) -> Result<crate::model::quota::QuotaUsage, BrokerError> {
        quota::load_usage(self.events.as_ref(), track).await
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
