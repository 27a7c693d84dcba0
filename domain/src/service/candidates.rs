//! The allocator's memory in this process: per name prefix a shuffled queue of candidates, the
//! candidates requests are trying right now, and the sandboxes known to be taken at a version the
//! (lagging) view may still show as available. `allocate` draws from it and reports back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration as StdDuration, Instant};

use rand::seq::SliceRandom;

use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;

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
pub(super) struct Candidates {
    inner: Mutex<CandidateState>,
    /// Woken whenever an in-flight candidate is decided (taken or given back).
    pub(super) decided: tokio::sync::Notify,
    /// Woken whenever a page read ends (filled or not).
    pub(super) fetched: tokio::sync::Notify,
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
pub(super) const MAX_PAGE: usize = 200;
/// How long a request waits for another request's page read of its prefix before it reads a
/// page itself, and how many such waits one request makes at most.
pub(super) const PAGE_WAIT: StdDuration = StdDuration::from_millis(100);
pub(super) const MAX_PAGE_WAITS: usize = 20;

/// Why [`Candidates::fill`] found nothing to queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// At least one usable candidate was queued.
    Queued,
    /// Every row was known taken.
    AllTaken,
    /// Some rows are being tried by other requests right now (and may be given back).
    OnlyInFlight,
}

impl CandidateState {
    fn usable(&self, row: &PoolRow) -> bool {
        // A held row's stream holds an event of a newer release: never a candidate here, even
        // if a view that predates the hold filter returns it (ADR 0023).
        row.status == SandboxStatus::Available
            && row.held_by.is_none()
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
    pub(super) fn pop(&self, prefix: &str) -> Option<InFlight<'_>> {
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
    pub(super) fn page_turn(&self, prefix: &str) -> Option<PageTurn<'_>> {
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
    pub(super) fn fill(
        &self,
        prefix: &str,
        mut rows: Vec<PoolRow>,
        last_name: Option<String>,
    ) -> Fill {
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
    pub(super) fn taken(&self, row: &PoolRow) {
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
    pub(super) fn give_back(&self, prefix: &str, row: PoolRow) {
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

    pub(super) fn cursor(&self, prefix: &str) -> Option<String> {
        self.lock().cursors.get(prefix).cloned()
    }

    /// Sandboxes taken in the last few seconds: rows the view may still show as available.
    pub(super) fn recently_taken(&self) -> usize {
        self.lock().recent_takes.len()
    }
}

/// A candidate one request is trying, invisible to the other requests of this process until the
/// request decides it (taken, given back, unsure). Dropped undecided — the request failed on the
/// way, or was cancelled mid-append because the client went away or a timeout fired — it is
/// released, never left in flight for good: another request may try it at once, and if the
/// cancelled write landed after all, that request's conditional write conflicts and marks it taken.
pub(super) struct InFlight<'a> {
    candidates: &'a Candidates,
    row: PoolRow,
    decided: bool,
}

impl InFlight<'_> {
    pub(super) fn row(&self) -> &PoolRow {
        &self.row
    }

    pub(super) fn taken(mut self) {
        self.decided = true;
        self.candidates.taken(&self.row);
    }

    pub(super) fn give_back(mut self, prefix: &str) {
        self.decided = true;
        self.candidates.give_back(prefix, self.row.clone());
    }

    pub(super) fn unsure(mut self, hold: StdDuration) {
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
pub(super) struct PageTurn<'a> {
    candidates: &'a Candidates,
    prefix: String,
}

impl Drop for PageTurn<'_> {
    fn drop(&mut self) {
        self.candidates.lock().fetching.remove(&self.prefix);
        self.candidates.fetched.notify_waiters();
    }
}
