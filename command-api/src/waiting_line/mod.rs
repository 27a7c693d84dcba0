//! The waiting line (`Prefer: wait=N`, RFC 7240; ADR 0029): an allocation that finds nothing
//! allocatable may wait, first come first served per (track, prefix), until an event makes a
//! sandbox allocatable or its wait runs out.
//!
//! # Layout
//! - [`supply`] — which events make a sandbox allocatable ([`supply::frees_supply`]).
//! - [`prefer`] — reading the `Prefer` header.
//! - [`tickets`] — `Prefer: respond-async`: tickets as events on `ticket#<id>` streams.
//! - [`auto_sync`] — the optional sync requested when a line forms (`WAIT_SYNC_ON_LINE`).
//! - this module — the lines of one API instance, the waiter's guard, the task that turns the
//!   instance's live feed into wake-ups, and the line's metrics.
//!
//! Only the head of a line tries to allocate, so a later arrival never overtakes an earlier one
//! on this instance. Wake-ups come from the events this instance's live feed tails (the same
//! feed on both stores), never from a loop over the pool: the tail reads the store only while a
//! line or a stream is open. A waiter leaves its line when it is answered or when its request
//! is dropped (the client went away): the guard's `Drop` takes it out and hands the head's turn
//! on, so nothing is left behind to serve nobody.

pub mod auto_sync;
pub mod prefer;
pub mod supply;
pub mod tickets;

#[cfg(test)]
mod order_tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use domain::{Allocation, BrokerError, EventEnvelope};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{broadcast, watch, Notify};

use crate::live_feed::EventsFeed;
use supply::FreedSupply;

/// The response header with a request's place in its line, when its wait ended unserved.
pub const QUEUE_POSITION_HEADER: &str = "queue-position";

/// The settings of the waiting line.
#[derive(Debug, Clone)]
pub struct WaitSettings {
    /// The longest wait granted, whatever the request asks (`WAIT_MAX_SEC`, kept below the
    /// request timeout).
    pub max_wait: Duration,
    /// Waiters one instance holds at once, all lines together (`WAIT_MAX_WAITERS`): each holds
    /// a request slot, so the line never crowds out other traffic.
    pub max_waiters: usize,
    /// After a wake-up, how long the head keeps retrying while the pool's projection catches up
    /// with the event that woke it (`WAIT_SETTLE_MS`).
    pub settle: Duration,
    /// `Prefer: respond-async` tickets.
    pub tickets: tickets::TicketSettings,
}

/// One line: requests for the same track and name prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineKey {
    /// The track the request allocates for (`X-Instruqt-Track-ID`, or the credential's track).
    pub track: Option<String>,
    /// The name prefix it asks for.
    pub prefix: Option<String>,
}

impl LineKey {
    fn labels(&self) -> [&str; 2] {
        [
            self.track.as_deref().unwrap_or(""),
            self.prefix.as_deref().unwrap_or(""),
        ]
    }
}

/// A request that asked to wait, numbered as it arrived ([`WaitingLine::arrive`]). While it
/// tries first, no later arrival's place in its line is the head; after its refusal it joins by
/// this number, not by when its attempt ended. So two requests that try at once are served in
/// the order they came. Dropping it (the request was answered without joining) lets the line go
/// on.
#[derive(Debug)]
pub struct Arrival {
    line: Arc<WaitingLine>,
    key: LineKey,
    id: u64,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.line.stop_trying(&self.key, self.id);
    }
}

/// A place in a line.
#[derive(Debug)]
struct Place {
    id: u64,
    /// The ticket the place stands for (`Prefer: respond-async`), if any.
    ticket: Option<String>,
    /// Signalled when the place becomes the head, when supply may have been freed for its head,
    /// and at shutdown. A `Notify` keeps one signal for a waiter not listening yet.
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Lines {
    by_key: HashMap<LineKey, VecDeque<Place>>,
    /// Arrivals still on their first attempt, per line: a place behind one of them waits.
    trying: HashMap<LineKey, BTreeSet<u64>>,
    waiters: usize,
    next_id: u64,
}

/// How a wait ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Served,
    TimedOut,
    Cancelled,
    /// The head hit another refusal (quota, drain…), answered as it is.
    Refused,
    /// The instance is shutting down.
    Closed,
    /// A ticket that was not polled for its idle bound left the line.
    Dropped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Refused => "refused",
            Outcome::Closed => "closed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The line's series.
#[derive(Debug, Clone)]
struct LineMetrics {
    /// `broker_waiting_line_length{track,prefix}`.
    length: IntGaugeVec,
    /// `broker_waiting_line_wait_seconds{outcome}`.
    wait: HistogramVec,
    /// `broker_waiting_line_outcomes_total{outcome}` (`full`: refused at once, line full).
    outcomes: IntCounterVec,
}

impl LineMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let length = IntGaugeVec::new(
            Opts::new(
                "broker_waiting_line_length",
                "Requests waiting for a sandbox on this instance, per track and name prefix",
            ),
            &["track", "prefix"],
        )?;
        let wait = HistogramVec::new(
            HistogramOpts::new(
                "broker_waiting_line_wait_seconds",
                "How long requests waited in line, by how the wait ended",
            )
            .buckets(vec![0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0]),
            &["outcome"],
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "broker_waiting_line_outcomes_total",
                "Waits by how they ended: served, timed_out, cancelled, refused, closed, dropped, full",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(length.clone()))?;
        registry.register(Box::new(wait.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        Ok(Self {
            length,
            wait,
            outcomes,
        })
    }
}

/// What a wait came to.
#[derive(Debug)]
pub struct Waited {
    /// The allocation, or the refusal to answer.
    pub result: Result<Allocation, BrokerError>,
    /// The request's place in its line when it left without a sandbox (1 = next).
    pub position: Option<usize>,
    /// True when the instance shut down while the request waited.
    pub closed: bool,
    /// True when the line was full and the request did not wait at all.
    pub full: bool,
    /// True when a ticket left the line unpolled.
    pub dropped: bool,
}

/// The waiting lines of one API instance.
#[derive(Debug)]
pub struct WaitingLine {
    lines: Mutex<Lines>,
    settings: WaitSettings,
    metrics: LineMetrics,
    /// Signalled when a line forms: the wake-up task starts following the feed.
    formed: Notify,
    /// Signalled when a line that was empty gets its first request ([`auto_sync`]).
    line_formed: Notify,
    /// True while the wake-up task follows the feed.
    listening: watch::Sender<bool>,
    closing: watch::Sender<bool>,
}

impl WaitingLine {
    /// Empty lines with their series registered in `registry`.
    pub fn new(settings: WaitSettings, registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            lines: Mutex::new(Lines::default()),
            settings,
            metrics: LineMetrics::new(registry)?,
            formed: Notify::new(),
            line_formed: Notify::new(),
            listening: watch::channel(false).0,
            closing: watch::channel(false).0,
        })
    }

    /// The settings of tickets.
    pub fn ticket_settings(&self) -> tickets::TicketSettings {
        self.settings.tickets
    }

    /// The wait granted for a request that asks for `requested_s` seconds.
    pub fn granted_wait(&self, requested_s: u64) -> Duration {
        Duration::from_secs(requested_s).min(self.settings.max_wait)
    }

    /// Resolves when a line forms (one signal is kept for a listener not waiting yet).
    pub async fn line_formed(&self) {
        self.line_formed.notified().await;
    }

    /// Numbers a request that asked to wait in `key`'s line as it arrives, before it tries:
    /// places are kept in this order (the numbers are the places' ids).
    pub fn arrive(self: &Arc<Self>, key: &LineKey) -> Arrival {
        let mut lines = self.lock();
        lines.next_id += 1;
        let id = lines.next_id;
        lines.trying.entry(key.clone()).or_default().insert(id);
        Arrival {
            line: Arc::clone(self),
            key: key.clone(),
            id,
        }
    }

    /// Arrival `id` no longer tries first (it joined, or it was answered): the head it held
    /// back may go on.
    fn stop_trying(&self, key: &LineKey, id: u64) {
        let mut lines = self.lock();
        let Some(trying) = lines.trying.get_mut(key) else {
            return;
        };
        if !trying.remove(&id) {
            return;
        }
        if trying.is_empty() {
            lines.trying.remove(key);
        }
        if let Some(head) = lines.by_key.get(key).and_then(VecDeque::front) {
            if head.id > id {
                head.wake.notify_one();
            }
        }
    }

    /// Whether anybody waits in the line of `key` on this instance.
    pub fn has_waiters(&self, key: &LineKey) -> bool {
        self.lock()
            .by_key
            .get(key)
            .is_some_and(|line| !line.is_empty())
    }

    /// Requests waiting on this instance, per line (for the dashboard and tests).
    pub fn lengths(&self) -> Vec<(LineKey, usize)> {
        self.lock()
            .by_key
            .iter()
            .map(|(key, line)| (key.clone(), line.len()))
            .collect()
    }

    /// Answers every waiter at once (shutdown): each gets its refusal with `Retry-After` and
    /// retries elsewhere, so the server's drain is not held up by the line.
    pub fn close(&self) {
        self.closing.send_replace(true);
        for line in self.lock().by_key.values() {
            for place in line {
                place.wake.notify_one();
            }
        }
    }

    /// Closes the lines once `signal` resolves.
    pub fn close_on(self: &Arc<Self>, signal: impl Future<Output = ()> + Send + 'static) {
        let line = Arc::clone(self);
        tokio::spawn(async move {
            signal.await;
            line.close();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Waits in the line of `key` for at most `wait`, calling `attempt` (with the milliseconds
    /// waited so far) whenever this request is the head and a sandbox may be allocatable.
    /// `refused` is the refusal that sent the request here, answered again if nothing changes.
    /// The request takes its place by `arrival`: ahead of any that arrived after it.
    pub async fn wait_for_sandbox<F, Fut>(
        &self,
        key: LineKey,
        arrival: &Arrival,
        wait: Duration,
        refused: BrokerError,
        attempt: F,
    ) -> Waited
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = Result<Allocation, BrokerError>>,
    {
        self.wait_in_line(
            key,
            JoinAs::waiter(arrival),
            wait,
            refused,
            attempt,
            std::future::pending(),
        )
        .await
    }

    /// [`WaitingLine::wait_for_sandbox`] for a ticket: its place is found by the ticket id
    /// ([`WaitingLine::ticket_position`]), and it leaves the line (`dropped`) when `drop_when`
    /// resolves.
    pub async fn wait_for_ticket<F, Fut>(
        &self,
        key: LineKey,
        ticket_id: &str,
        wait: Duration,
        refused: BrokerError,
        attempt: F,
        drop_when: impl Future<Output = ()>,
    ) -> Waited
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = Result<Allocation, BrokerError>>,
    {
        self.wait_in_line(
            key,
            JoinAs::ticket(ticket_id),
            wait,
            refused,
            attempt,
            drop_when,
        )
        .await
    }

    /// The 1-based place of `ticket_id` in its line on this instance, when it waits here.
    pub fn ticket_position(&self, ticket_id: &str) -> Option<usize> {
        self.lock().by_key.values().find_map(|line| {
            line.iter()
                .position(|p| p.ticket.as_deref() == Some(ticket_id))
                .map(|i| i + 1)
        })
    }

    async fn wait_in_line<F, Fut>(
        &self,
        key: LineKey,
        place: JoinAs<'_>,
        wait: Duration,
        refused: BrokerError,
        mut attempt: F,
        drop_when: impl Future<Output = ()>,
    ) -> Waited
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = Result<Allocation, BrokerError>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        tokio::pin!(drop_when);
        let Some(mut guard) = self.join(key, place) else {
            self.metrics.outcomes.with_label_values(&["full"]).inc();
            return Waited {
                result: Err(refused),
                position: None,
                closed: false,
                full: true,
                dropped: false,
            };
        };
        // The feed must be followed before the head's next attempt, or an event recorded
        // between the refusal and the subscription would wake nobody.
        let mut listening = self.listening.subscribe();
        let _ = tokio::time::timeout_at(deadline, listening.wait_for(|on| *on)).await;
        let mut closing = self.closing.subscribe();
        let mut last = refused;
        // Retries after a wake-up, while the projection may still lag the event.
        let mut settling: Option<(tokio::time::Instant, Duration)> = None;
        let mut woken = true;
        loop {
            if self.is_closing() {
                return guard.finish(Outcome::Closed, Err(last));
            }
            if woken && guard.is_head() {
                let waited_ms =
                    u64::try_from(guard.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                match attempt(waited_ms).await {
                    Ok(allocation) => {
                        return guard.finish(Outcome::Served, Ok(allocation));
                    }
                    Err(e @ BrokerError::NoSandboxAvailable { .. }) => {
                        last = e;
                        let now = tokio::time::Instant::now();
                        settling = match settling {
                            None => Some((now + self.settings.settle, Duration::from_millis(100))),
                            Some((until, step)) if now < until => Some((until, step * 2)),
                            Some(_) => None,
                        };
                    }
                    Err(other) => return guard.finish(Outcome::Refused, Err(other)),
                }
            }
            let retry = settling.and_then(|(until, step)| {
                let at = tokio::time::Instant::now() + step;
                (at <= until).then_some(at)
            });
            if retry.is_none() {
                settling = None;
            }
            let wake = Arc::clone(&guard.wake);
            tokio::select! {
                () = wake.notified() => {
                    woken = true;
                    // A fresh wake-up starts a fresh settle window.
                    settling = None;
                }
                () = sleep_until_or_never(retry) => woken = true,
                _ = closing.changed() => woken = false,
                () = tokio::time::sleep_until(deadline) => {
                    return guard.finish(Outcome::TimedOut, Err(last));
                }
                () = &mut drop_when => return guard.finish(Outcome::Dropped, Err(last)),
            }
        }
    }

    /// Takes a place in `key`'s line: a waiter behind every request that arrived before it and
    /// ahead of any that arrived after it and joined first (its own attempt ended sooner), a
    /// ticket at the back; `None` when the instance's lines are full.
    fn join(&self, key: LineKey, join_as: JoinAs<'_>) -> Option<PlaceGuard<'_>> {
        let wake = Arc::new(Notify::new());
        let id = {
            let mut lines = self.lock();
            if lines.waiters >= self.settings.max_waiters {
                return None;
            }
            lines.waiters += 1;
            let id = match join_as.arrival {
                Some(arrival) => {
                    if let Some(trying) = lines.trying.get_mut(&key) {
                        trying.remove(&arrival.id);
                        if trying.is_empty() {
                            lines.trying.remove(&key);
                        }
                    }
                    arrival.id
                }
                None => {
                    lines.next_id += 1;
                    lines.next_id
                }
            };
            let line = lines.by_key.entry(key.clone()).or_default();
            // Places are kept in id order, and ids are handed out in arrival order.
            let at = line.partition_point(|p| p.id < id);
            line.insert(
                at,
                Place {
                    id,
                    ticket: join_as.ticket.map(str::to_string),
                    wake: Arc::clone(&wake),
                },
            );
            let length = line.len();
            self.metrics
                .length
                .with_label_values(&key.labels())
                .set(i64::try_from(length).unwrap_or(i64::MAX));
            if length == 1 {
                self.line_formed.notify_one();
                tracing::warn!(
                    target: "waiting_line",
                    track = key.track.as_deref().unwrap_or(""),
                    prefix = key.prefix.as_deref().unwrap_or(""),
                    "waiting line formed: requests wait for a sandbox; a sync adds new ones \
                     (POST /v1/admin/sync or brokerctl sync)"
                );
            }
            id
        };
        self.formed.notify_one();
        Some(PlaceGuard {
            line: self,
            key,
            id,
            wake,
            started: Instant::now(),
            finished: false,
        })
    }

    /// Removes place `id` from `key`'s line; wakes the new head when the head left.
    fn leave(&self, key: &LineKey, id: u64) {
        let mut lines = self.lock();
        let Some(line) = lines.by_key.get_mut(key) else {
            return;
        };
        let Some(index) = line.iter().position(|p| p.id == id) else {
            return;
        };
        line.remove(index);
        let length = line.len();
        if index == 0 {
            if let Some(head) = line.front() {
                head.wake.notify_one();
            }
        }
        if length == 0 {
            lines.by_key.remove(key);
            let _ = self.metrics.length.remove_label_values(&key.labels());
        } else {
            self.metrics
                .length
                .with_label_values(&key.labels())
                .set(i64::try_from(length).unwrap_or(i64::MAX));
        }
        lines.waiters = lines.waiters.saturating_sub(1);
    }

    /// Whether place `id` is the head of `key`'s line and no earlier arrival still tries first.
    fn is_head(&self, key: &LineKey, id: u64) -> bool {
        let lines = self.lock();
        let first = lines
            .by_key
            .get(key)
            .and_then(VecDeque::front)
            .is_some_and(|head| head.id == id);
        let held_back = lines
            .trying
            .get(key)
            .and_then(|trying| trying.first())
            .is_some_and(|earliest| *earliest < id);
        first && !held_back
    }

    /// The 1-based place of `id` in `key`'s line.
    fn position(&self, key: &LineKey, id: u64) -> Option<usize> {
        self.lock()
            .by_key
            .get(key)
            .and_then(|line| line.iter().position(|p| p.id == id))
            .map(|i| i + 1)
    }

    /// Wakes the head of every line `freed` may serve.
    fn wake_heads(&self, freed: &FreedSupply) {
        for (key, line) in &self.lock().by_key {
            if freed.serves(key.prefix.as_deref()) {
                if let Some(head) = line.front() {
                    head.wake.notify_one();
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().waiters == 0
    }

    /// Follows `feed` while any line is open and wakes the heads an event may serve; idle (no
    /// subscription, so no feed reads on its account) while every line is empty.
    pub async fn follow(self: Arc<Self>, feed: EventsFeed) {
        let mut closing = self.closing.subscribe();
        loop {
            tokio::select! {
                () = self.formed.notified() => {}
                _ = closing.changed() => return,
            }
            let mut live = feed.subscribe_live();
            self.listening.send_replace(true);
            while !self.is_empty() {
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(item) => {
                            let freed = serde_json::from_str::<EventEnvelope>(&item.json)
                                .ok()
                                .and_then(|envelope| envelope.decode().ok())
                                .and_then(|event| supply::frees_supply(&event));
                            if let Some(freed) = freed {
                                self.wake_heads(&freed);
                            }
                        }
                        // Events were missed: any of them may have freed supply.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            self.wake_heads(&FreedSupply::Any);
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            self.listening.send_replace(false);
                            return;
                        }
                    },
                    // Re-check whether the lines emptied (a waiter leaving signals nobody here).
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = closing.changed() => {
                        self.listening.send_replace(false);
                        return;
                    }
                }
            }
            self.listening.send_replace(false);
        }
    }
}

/// How a request joins a line: a waiter by its arrival, a ticket by its id.
struct JoinAs<'a> {
    arrival: Option<&'a Arrival>,
    ticket: Option<&'a str>,
}

impl JoinAs<'_> {
    fn waiter(arrival: &Arrival) -> JoinAs<'_> {
        JoinAs {
            arrival: Some(arrival),
            ticket: None,
        }
    }

    fn ticket(ticket_id: &str) -> JoinAs<'_> {
        JoinAs {
            arrival: None,
            ticket: Some(ticket_id),
        }
    }
}

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A request's place in a line: it leaves the line when dropped, answered or not (a client that
/// hung up drops the request's future, and with it this guard).
struct PlaceGuard<'a> {
    line: &'a WaitingLine,
    key: LineKey,
    id: u64,
    wake: Arc<Notify>,
    started: Instant,
    finished: bool,
}

impl PlaceGuard<'_> {
    fn is_head(&self) -> bool {
        self.line.is_head(&self.key, self.id)
    }

    fn finish(&mut self, outcome: Outcome, result: Result<Allocation, BrokerError>) -> Waited {
        let position = match outcome {
            Outcome::Served | Outcome::Refused => None,
            _ => self.line.position(&self.key, self.id),
        };
        self.record(outcome);
        self.finished = true;
        Waited {
            result,
            position,
            closed: outcome == Outcome::Closed,
            full: false,
            dropped: outcome == Outcome::Dropped,
        }
    }

    fn record(&self, outcome: Outcome) {
        let metrics = &self.line.metrics;
        metrics
            .outcomes
            .with_label_values(&[outcome.as_str()])
            .inc();
        metrics
            .wait
            .with_label_values(&[outcome.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for PlaceGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Outcome::Cancelled);
        }
        self.line.leave(&self.key, self.id);
    }
}
