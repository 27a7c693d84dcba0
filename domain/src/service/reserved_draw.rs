//! How the allocator serves a reservation's track from its earmarked sandboxes first
//! (ADR 0028): the open reservations this process knows (read again at most once a second, only
//! the events it has not seen), per-track candidate queues filled from the earmarked sandboxes'
//! view rows, and the overflow policy once they are used up. Other tracks never queue an
//! earmarked row (the open pool is filtered before it is queued), so they are neither slowed
//! down nor refused because of a reservation.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Utc};

use super::candidates::{Fill, InFlight, PAGE_WAIT};
use super::{Broker, BrokerError};
use crate::model::events::{BrokerEvent, OverflowPolicy, ReservationEvent};
use crate::model::ids::{reservation_stream, RESERVATION_INDEX_STREAM};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;
use crate::model::reservation::Reservation;
use crate::store::{decode_stored, EventStore, StoreError};

/// How long this process trusts the reservations it read: with the time one read of the changes
/// takes, the bound on how late a new reservation's track starts drawing from its earmarks here
/// (the earmarks bind at once on the sandbox streams either way).
const DIRECTORY_TTL: StdDuration = StdDuration::from_secs(1);
/// Earmarked rows read per refill of a track's queue: all the untried ones (a reservation holds
/// at most `RESERVATION_MAX_COUNT`), so a free earmark is never left unread behind used ones.
const REFILL_ROWS: usize = 10_000;
/// How long one request waits, at most, for the track's other requests: the one reading its
/// earmarked rows, or those deciding on its last earmarks. Bounded by time, not by wake-ups: every
/// refill and decision of any queue wakes the waiters, so in a burst of mixed tracks a count of
/// wake-ups ran out within a moment while one slow read of the earmarks was still under way, and
/// the track's students were sent to the open pool with their reservation untouched.
const RESERVED_WAIT: StdDuration = StdDuration::from_secs(30);

/// The open reservations this process knows, read incrementally.
#[derive(Debug, Default)]
pub(super) struct ReservationDirectory {
    state: tokio::sync::Mutex<DirectoryState>,
    /// Held by the one request that reads what changed; the others go on with what was read
    /// before (only the very first read is waited for), so a refresh never queues every
    /// allocation behind its store reads.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct DirectoryState {
    read_at: Option<Instant>,
    index_version: u64,
    /// Reservation id → the folded stream, while not closed.
    open: BTreeMap<String, Reservation>,
    /// Earmarked sandboxes seen allocated or gone: never read again for a refill.
    exhausted: HashSet<String>,
}

/// What the reservation side has for one allocation request.
pub(super) enum ReservedDraw<'a> {
    /// An earmarked sandbox of the track's reservation, in flight for this request (boxed:
    /// the guard holds a whole view row, the other answers nothing).
    Candidate(Box<InFlight<'a>>),
    /// The track has a reservation in its window whose policy is `reservation_only`, and no
    /// earmarked sandbox is left: answer "none available" rather than take from the open pool.
    ReservationOnly,
    /// Nothing reserved for the track (or used up, overflow allowed): use the open pool.
    OpenPool,
}

/// Keeps the rows the open pool may offer: none earmarked for a track at `now`.
pub(super) fn open_pool(mut rows: Vec<PoolRow>, now: DateTime<Utc>) -> Vec<PoolRow> {
    rows.retain(|row| {
        row.earmark
            .as_ref()
            .and_then(|e| e.binding_at(now))
            .is_none()
    });
    rows
}

impl ReservationDirectory {
    /// The reservations of `track` not closed at `now`, after reading what changed if the
    /// last read is older than [`DIRECTORY_TTL`].
    async fn open_for(
        &self,
        events: &dyn EventStore,
        track: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Reservation>, StoreError> {
        let (due, loaded) = {
            let state = self.state.lock().await;
            (
                state.read_at.is_none_or(|at| at.elapsed() >= DIRECTORY_TTL),
                state.read_at.is_some(),
            )
        };
        if due {
            let turn = if loaded {
                self.refresh.try_lock().ok()
            } else {
                Some(self.refresh.lock().await)
            };
            if let Some(_turn) = turn {
                self.read_changes(events).await?;
            }
        }
        let state = self.state.lock().await;
        Ok(state
            .open
            .values()
            .filter(|r| r.track == track && r.ends_at.is_some_and(|end| now < end))
            .cloned()
            .collect())
    }

    /// Reads the reservations listed and the events of the open ones since the last read, without
    /// holding the state while the store answers. Called by one request at a time (`refresh`).
    async fn read_changes(&self, events: &dyn EventStore) -> Result<(), StoreError> {
        let (index_version, known) = {
            let state = self.state.lock().await;
            if state.read_at.is_some_and(|at| at.elapsed() < DIRECTORY_TTL) {
                // Another request read them while this one waited for its turn.
                return Ok(());
            }
            let known: Vec<(String, Reservation)> = state
                .open
                .iter()
                .map(|(id, r)| (id.clone(), r.clone()))
                .collect();
            (state.index_version, known)
        };
        let mut latest_index = index_version;
        let mut folded: BTreeMap<String, Reservation> = known.into_iter().collect();
        for envelope in events
            .load_after(RESERVATION_INDEX_STREAM, index_version)
            .await?
        {
            latest_index = envelope.version;
            if let Ok(BrokerEvent::Reservation(ReservationEvent::ReservationListed {
                reservation_id,
            })) = decode_stored(&envelope)
            {
                folded.entry(reservation_id).or_default();
            }
        }
        for (id, reservation) in folded.iter_mut() {
            for envelope in events
                .load_after(&reservation_stream(id), reservation.version)
                .await?
            {
                match decode_stored(&envelope) {
                    Ok(BrokerEvent::Reservation(event)) => {
                        reservation.fold(&event, envelope.occurred_at)
                    }
                    // A newer release's event: skip it, keep the version moving.
                    _ => reservation.version = envelope.version,
                }
            }
        }
        folded.retain(|_, r| !r.is_closed());
        let mut state = self.state.lock().await;
        state.index_version = latest_index;
        state.open = folded;
        state.read_at = Some(Instant::now());
        Ok(())
    }

    /// Up to `limit` earmarked sandboxes of `reservations` not known to be used or gone.
    async fn untried(&self, reservations: &[Reservation], limit: usize) -> Vec<String> {
        let state = self.state.lock().await;
        reservations
            .iter()
            .flat_map(|r| r.earmarked.iter())
            .filter(|id| !state.exhausted.contains(*id))
            .take(limit)
            .cloned()
            .collect()
    }

    async fn exhaust(&self, sandbox_ids: Vec<String>) {
        if sandbox_ids.is_empty() {
            return;
        }
        self.state.lock().await.exhausted.extend(sandbox_ids);
    }
}

impl Broker {
    /// The track's next earmarked candidate, or what to do without one (see [`ReservedDraw`]).
    pub(super) async fn reserved_candidate(
        &self,
        track: &str,
        prefix: Option<&str>,
    ) -> Result<ReservedDraw<'_>, BrokerError> {
        let now = self.clock.now();
        let reservations = self
            .reservations
            .open_for(self.events.as_ref(), track, now)
            .await?;
        if reservations.is_empty() {
            return Ok(ReservedDraw::OpenPool);
        }
        let key = reserved_queue_key(track, prefix);
        let deadline = Instant::now() + RESERVED_WAIT;
        loop {
            if let Some(candidate) = self.candidates.pop(&key) {
                return Ok(ReservedDraw::Candidate(Box::new(candidate)));
            }
            let fetched = self.candidates.fetched.notified();
            tokio::pin!(fetched);
            fetched.as_mut().enable();
            let Some(turn) = self.candidates.page_turn(&key) else {
                // Another request of the track is reading the earmarked rows: use them.
                if Instant::now() < deadline {
                    let _ = tokio::time::timeout(PAGE_WAIT, fetched).await;
                    continue;
                }
                break;
            };
            let ids = self.reservations.untried(&reservations, REFILL_ROWS).await;
            let mut rows = Vec::with_capacity(ids.len());
            let mut gone = Vec::new();
            let mut found = self.view.get_many(&ids).await?;
            for id in ids {
                match found.remove(&id) {
                    Some(row)
                        if row.status == SandboxStatus::Available
                            && row
                                .earmark
                                .as_ref()
                                .and_then(|e| e.binding_at(now))
                                .is_some_and(|t| t == track) =>
                    {
                        if prefix.is_none_or(|p| row.name.starts_with(p)) {
                            rows.push(row);
                        }
                    }
                    // Still available without a visible earmark: the view may lag the earmark.
                    Some(row) if row.status == SandboxStatus::Available => {}
                    _ => gone.push(id),
                }
            }
            self.reservations.exhaust(gone).await;
            let filled = self.candidates.fill(&key, rows, None);
            drop(turn);
            match filled {
                Fill::Queued => continue,
                Fill::OnlyInFlight if Instant::now() < deadline => {
                    // The track's other requests are trying its last earmarks; one may give
                    // its candidate back (a replay). Wait for a decision, bounded.
                    let decided = self.candidates.decided.notified();
                    let _ = tokio::time::timeout(StdDuration::from_millis(50), decided).await;
                }
                _ => break,
            }
        }
        let reservation_only = reservations.iter().any(|r| {
            r.overflow == Some(OverflowPolicy::ReservationOnly)
                && r.starts_at.is_some_and(|start| now >= start)
        });
        Ok(if reservation_only {
            ReservedDraw::ReservationOnly
        } else {
            ReservedDraw::OpenPool
        })
    }
}

/// The candidate-queue key of a track's earmarked rows (kept apart from the prefix queues by a
/// control character no prefix may contain).
pub(super) fn reserved_queue_key(track: &str, prefix: Option<&str>) -> String {
    format!("\u{1}{track}\u{1}{}", prefix.unwrap_or(""))
}
