//! Signed webhooks (ADR 0018): notifications about sandboxes and the pool, POSTed to
//! subscribers, each subscriber at its own pace.
//!
//! Each subscriber has one task. It reads the events from its own saved position (a checkpoint
//! named `webhooks:<name>`), turns the ones it wants into notifications
//! ([`config::KIND_OF_EVENT`]) and delivers them in order, retrying a failing endpoint with capped
//! exponential backoff; the position moves past an event only once its notification was
//! delivered or given up, so a crash or restart re-sends rather than loses. Besides the events,
//! the task checks the view for allocations about to expire and the pool counters for low groups,
//! which no single event announces. Commands never wait for any of this: delivery runs beside
//! them, reading what they recorded.
//!
//! **The position is durable and exact (ADR 0027).** On a store with a log ([`EventSource::Log`],
//! the embedded store) it is a log position: one total order in which nothing arrives late, so
//! every event is read once, at any rate. On a store whose only order is the time index
//! ([`EventSource::TimeIndex`], DynamoDB) an event may show up behind events stamped after it (a
//! slow or retried commit, writers' clocks, the index catching up), so the state holds a
//! *watermark* — every event stamped before it was handled — kept `WEBHOOK_OVERLAP_MS` (the bound
//! on how late an event shows up) behind the reading position, and the keys handled above the
//! watermark. The window above the watermark is re-read every quarter of that bound and what is
//! not among the handled keys is delivered; keys at or below the watermark are forgotten. Memory
//! is the events of that window, whatever the rate, and nothing is sent twice by one holder.
//!
//! **Deliveries are fenced.** Of several API instances only the one holding a subscriber's lease
//! ([`lease`]) delivers for it. Each tenure of the lease has an epoch, and the delivery state is
//! saved only with an epoch at least the stored one: the next holder stamps the state with its
//! epoch as soon as it takes over, after which an earlier holder that has not noticed (a paused
//! process) can no longer move the position, and stops delivering at its next save or renewal.
//!
//! Every request carries `X-Broker-Webhook-Id` (stable across retries and across holders:
//! de-duplicate on it), `X-Broker-Webhook-Timestamp` (Unix seconds) and
//! `X-Broker-Webhook-Signature`: `v1=<hex HMAC-SHA256 of "{timestamp}.{body}" with the
//! subscriber's secret>`.
//!
//! Targets are held to a [`TargetPolicy`]: `https` only, and public addresses only — a name is
//! resolved at every delivery and refused when any of its addresses is private, loopback or
//! link-local ([`PublicOnly`]), so a name that resolved to a public address when it was checked
//! cannot be pointed at the broker's own network later (DNS rebinding). Redirects are not
//! followed (a redirect could lead anywhere), no system proxy is used (the check must be about
//! the address actually connected to), and no error — in the delivery state admins read, in a
//! log line — carries the URL, which may hold the receiver's credential, or a secret.

pub mod config;
pub mod lease;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::audit::{feed_key, EventFeed, FeedFilter, FeedQuery};
use domain::model::events::{format_time, BrokerEvent, SandboxEvent};
use domain::model::ids::{sandbox_id_of, sandbox_stream};
use domain::model::pool_prefix::{pool_prefix, LowWater};
use domain::store::{EventLog, ViewStore};
use domain::{EventEnvelope, EventStore, SandboxStatus, SharedClock, StoreError};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use config::{
    kind_of_event, load_subscribers, Subscriber, TargetPolicy, WebhookKind, KIND_OF_EVENT,
};
pub use lease::{DispatchLease, Tenure};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Events read per page.
const FEED_PAGE: usize = 100;
/// Given-up notifications remembered per subscriber for the admin view.
const RECENT_FAILURES: usize = 20;
/// Synthetic notification ids remembered (expiring soon, pool low) to send each once.
const SENT_MEMORY: usize = 100_000;
/// Handled keys above the watermark written into the saved state, newest first (time index
/// only): a checkpoint item well under DynamoDB's 400 KB. The holder keeps all of them in
/// memory; a *new* holder re-sends the ones the saved state could not hold, once (receivers
/// de-duplicate on the id), and never loses one.
const HANDLED_SAVED: usize = 2_000;
/// How often a busy subscriber saves its position (and learns whether it was fenced out); an
/// idle one saves after each pass that moved it.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// First retry delay; doubled per attempt.
    pub retry_base: Duration,
    /// Longest delay between two attempts.
    pub retry_cap: Duration,
    /// Attempts before a notification is given up (and listed as failed).
    pub max_attempts: u32,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How often the events and the expiry/pool checks are read when idle.
    pub poll: Duration,
    /// Time index only: events younger than this are left for the next poll (the index may
    /// still be filling in slightly older ones; what it fills in later the re-read finds).
    pub settle: Duration,
    /// `expiring_soon` is sent this long before `expires_at`.
    pub expiry_warning: chrono::Duration,
    /// Pool thresholds for `pool_low`.
    pub low_water: LowWater,
    /// How long one instance's claim to dispatch a subscriber lasts without renewal.
    pub lease: Duration,
    /// Time index only: how late an event may show up behind events stamped after it (clock
    /// skew between writers, a commit's retries, the index's propagation). The watermark stays
    /// this far behind the reading position, and the window above it is re-read every quarter of
    /// it (in real time). Zero turns the re-read off.
    pub overlap: Duration,
    /// Which targets may be delivered to.
    pub targets: TargetPolicy,
}

/// A notification given up after every attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedDelivery {
    /// The notification id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The last error.
    pub error: String,
    /// When it was given up.
    pub at: String,
}

/// What is being retried right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingDelivery {
    /// The notification id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error.
    pub last_error: String,
    /// When the next attempt is due.
    pub next_attempt_at: String,
}

/// A subscriber's delivery state, saved as its checkpoint (JSON) so that every instance can
/// show it and a restart resumes where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Feed key (`{occurred_at}#{event_id}`) of the last event read. On the time index it is
    /// where reading goes on; with a log, `sequence` decides and this one is for people (and
    /// for a release from before the log position, should one read the state).
    pub position: String,
    /// Log position (stores with a log): every event up to it was handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Time index: every event whose feed key is at or below this was handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// The lease epoch of the tenure that saved this state (its fencing token).
    #[serde(default)]
    pub fence: u64,
    /// Notifications delivered.
    pub delivered: u64,
    /// Attempts that failed (retried or not).
    pub failed_attempts: u64,
    /// Notifications given up.
    pub given_up: u64,
    /// When the last delivery succeeded.
    pub last_delivered_at: Option<String>,
    /// The notification being retried, if any.
    pub pending: Option<PendingDelivery>,
    /// The most recent notifications given up.
    pub recent_failures: VecDeque<FailedDelivery>,
    /// Time index: feed keys above the watermark whose notifications were handled (delivered or
    /// given up), the newest [`HANDLED_SAVED`] of them: the re-read skips them.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub handled: VecDeque<String>,
    /// Prefix groups below low water at the last check: an instance taking over the
    /// subscriber does not announce them again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub low_groups: BTreeSet<String>,
}

/// Where the dispatcher reads events, which decides what its position is (ADR 0027).
#[derive(Clone)]
pub enum EventSource {
    /// A store with a log (the embedded store): the position is a log position.
    Log(Arc<dyn EventLog>),
    /// A store whose only order over all events is the time index (DynamoDB): a watermark held
    /// back by `overlap`, and de-duplication by key above it.
    TimeIndex(Arc<dyn EventFeed>),
}

impl std::fmt::Debug for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventSource::Log(_) => "Log",
            EventSource::TimeIndex(_) => "TimeIndex",
        })
    }
}

/// One notification ready to send.
#[derive(Debug, Clone)]
struct Notification {
    id: String,
    kind: WebhookKind,
    /// The sandbox name (or prefix group) subscribers filter on.
    name: String,
    body: serde_json::Value,
}

/// Why a pass stopped short.
#[derive(Debug)]
enum Halt {
    /// A read or write failed; the pass is tried again after the poll interval.
    Store(StoreError),
    /// A save was refused: a later tenure saved the state, so this one stops delivering.
    Fenced,
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Store(e)
    }
}

/// A store whose log position replaced a time position (state saved by a release from before
/// log positions): the events read again from just before the old position's overlap window are
/// skipped when the old position had handled them.
#[derive(Debug)]
struct Legacy {
    /// The old time position.
    position: String,
    /// Keys at or below this were behind the old re-read window: handled as far as it knew.
    from: String,
    /// The keys the old state had handled inside its window.
    handled: HashSet<String>,
    /// The log head when moved: past it, every event is new to both.
    until: u64,
}

impl Legacy {
    fn handled(&self, key: &str) -> bool {
        key <= self.position.as_str() && (key <= self.from.as_str() || self.handled.contains(key))
    }
}

/// A subscriber's progress while one tenure delivers for it.
#[derive(Debug)]
struct Progress {
    /// The lease epoch every save carries.
    epoch: u64,
    /// What is saved (and shown to operators).
    state: DeliveryState,
    /// Time index: every handled key above the watermark (the saved state holds the newest).
    handled: BTreeSet<String>,
    /// See [`Legacy`].
    legacy: Option<Legacy>,
    /// Changed since the last save.
    dirty: bool,
    /// When the state was last saved.
    saved_at: tokio::time::Instant,
}

impl Progress {
    fn remember(&mut self, key: String) {
        self.handled.insert(key);
        self.dirty = true;
    }
}

/// The dispatcher: subscribers, their tasks, and what the admin endpoint reads.
pub struct Dispatcher {
    subscribers: Vec<Subscriber>,
    settings: DeliverySettings,
    events: Arc<dyn EventStore>,
    source: EventSource,
    view: Arc<dyn ViewStore>,
    clock: SharedClock,
    client: reqwest::Client,
    names: Mutex<HashMap<String, String>>,
    /// This process, as named in the dispatch leases it holds.
    instance: String,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("subscribers", &self.subscribers.len())
            .field("settings", &self.settings)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The checkpoint a subscriber's state is saved under: a consumer's checkpoint, which a
/// rebuild of the view keeps ([`domain::store::is_view_checkpoint`]).
fn checkpoint_of(subscriber: &str) -> String {
    format!("{}{subscriber}", domain::store::WEBHOOK_CHECKPOINT_PREFIX)
}

/// The `X-Broker-Webhook-Signature` of a delivery: `v1=<hex>` with the subscriber's secret and,
/// while a rotation's overlap lasts, `,v1=<hex>` with the previous one (a receiver accepts the
/// delivery when any `v1` matches). Signing the timestamp with the body keeps a captured request
/// from being replayed later with a fresh timestamp.
pub fn signatures(subscriber: &Subscriber, timestamp: i64, body: &[u8]) -> String {
    let current = signature(subscriber.secret.expose(), timestamp, body);
    match &subscriber.previous_secret {
        Some((previous, until)) if Utc::now() < *until => {
            format!(
                "{current},{}",
                signature(previous.expose(), timestamp, body)
            )
        }
        _ => current,
    }
}

/// `v1=<hex HMAC-SHA256 of "{timestamp}.{body}">` with one key.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        // HMAC accepts keys of any length; this arm is unreachable.
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A stable id for a notification no single event stands for (same inputs, same id).
fn derived_id(parts: &[&str]) -> String {
    let mut hash = sha2::Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes)
        .into_uuid()
        .to_string()
}

impl Dispatcher {
    /// A dispatcher over the stores, reading events from `source`; `client` sends the requests.
    pub fn new(
        subscribers: Vec<Subscriber>,
        settings: DeliverySettings,
        events: Arc<dyn EventStore>,
        source: EventSource,
        view: Arc<dyn ViewStore>,
        clock: SharedClock,
    ) -> anyhow::Result<Self> {
        let mut client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if !settings.targets.allow_private {
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        let client = client.build()?;
        Ok(Self {
            subscribers,
            settings,
            events,
            source,
            view,
            clock,
            client,
            names: Mutex::new(HashMap::new()),
            instance: format!("api-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        })
    }

    /// The configured subscribers.
    pub fn subscribers(&self) -> &[Subscriber] {
        &self.subscribers
    }

    /// The saved delivery state of each subscriber (`None`: nothing recorded yet).
    pub async fn states(&self) -> Result<Vec<(&Subscriber, Option<DeliveryState>)>, StoreError> {
        let mut states = Vec::with_capacity(self.subscribers.len());
        for subscriber in &self.subscribers {
            let state = self
                .view
                .checkpoint(&checkpoint_of(&subscriber.name))
                .await?
                .and_then(|raw| serde_json::from_str::<DeliveryState>(&raw).ok())
                .map(|mut state| {
                    // Bookkeeping of the re-read, not something an operator reads.
                    state.handled.clear();
                    state
                });
            states.push((subscriber, state));
        }
        Ok(states)
    }

    /// Runs one task per subscriber until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let stop = tokio_util_stop(shutdown);
        // A set, not loose tasks: should this future be dropped (its task aborted), the
        // subscriber tasks end with it instead of delivering on unowned.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.subscribers.len() {
            let dispatcher = Arc::clone(&self);
            let stop = stop.clone();
            tasks.spawn(async move { dispatcher.serve(i, stop).await });
        }
        while tasks.join_next().await.is_some() {}
        // A graceful stop hands the subscribers over at once instead of after the lease lapses.
        for subscriber in &self.subscribers {
            if let Err(e) = self.lease_of(subscriber).release().await {
                tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "dispatch lease not released; it lapses");
            }
        }
    }

    fn lease_of(&self, subscriber: &Subscriber) -> DispatchLease {
        DispatchLease::new(
            Arc::clone(&self.view) as Arc<dyn ViewStore>,
            &subscriber.name,
            &self.instance,
            self.settings.lease,
        )
    }

    /// Delivers a subscriber's notifications while this instance holds its lease; waits for the
    /// lease otherwise (another instance delivers meanwhile). Returns once `stop` is set, after
    /// saving what the tenure delivered.
    async fn serve(&self, index: usize, mut stop: tokio::sync::watch::Receiver<bool>) {
        let subscriber = &self.subscribers[index];
        let lease = self.lease_of(subscriber);
        loop {
            if *stop.borrow() {
                return;
            }
            let claimed = tokio::select! {
                claimed = lease.claim() => claimed,
                _ = stop.wait_for(|s| *s) => return,
            };
            let tenure = match claimed {
                Ok(Some(tenure)) => tenure,
                Ok(None) => {
                    tokio::time::sleep(lease.renew_every()).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "dispatch lease unreadable; retrying");
                    tokio::time::sleep(lease.renew_every()).await;
                    continue;
                }
            };
            tracing::info!(target: "webhooks", subscriber = %subscriber.name, instance = %self.instance, epoch = tenure.epoch, "dispatch lease taken; delivering");
            // Delivery stops the moment the lease is lost (even mid-request: the next holder
            // resends from the saved state, and receivers de-duplicate on the id), or when a save
            // finds a later tenure's epoch.
            let mut progress = None;
            let (stopping, fenced) = tokio::select! {
                () = lease.keep(tenure) => (false, false),
                _ = stop.wait_for(|s| *s) => (true, false),
                () = self.deliver_into(subscriber, tenure.epoch, &mut progress) => (false, true),
            };
            if fenced {
                // Whoever fenced this tenure out holds the lease; wait before asking for it.
                tokio::select! {
                    () = tokio::time::sleep(lease.renew_every()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            // The lease lapsed (a slow store, a paused process), went to another instance, or
            // the process is stopping. What was delivered since the last save is saved now,
            // under the fence: refused if a later tenure has stamped the state, so it can only
            // spare the next tenure re-sending, never move a position someone else owns.
            if let Some(progress) = progress.as_mut().filter(|p| p.dirty) {
                let _ = tokio::time::timeout(lease.renew_every(), self.save(subscriber, progress))
                    .await;
            }
            if stopping {
                return;
            }
        }
    }

    /// Delivers subscriber `index`'s notifications as the tenure with lease epoch `epoch`, until
    /// a save of its state is refused because a later tenure saved with a greater epoch; then
    /// returns. [`Dispatcher::run`] calls it once this instance holds the lease (and stops it
    /// when the lease is lost); public so that tests can run a stale tenure beside a new one.
    pub async fn deliver_under(&self, index: usize, epoch: u64) {
        if let Some(subscriber) = self.subscribers.get(index) {
            self.deliver_into(subscriber, epoch, &mut None).await;
        }
    }

    /// [`Dispatcher::deliver_under`], keeping the tenure's progress in `slot`, where it stays
    /// when the future is dropped (the lease was lost), consistent at every await: each event's
    /// notification is delivered before the position passes it.
    async fn deliver_into(&self, subscriber: &Subscriber, epoch: u64, slot: &mut Option<Progress>) {
        let progress = loop {
            match self.start_tenure(subscriber, epoch).await {
                Ok(progress) => break slot.insert(progress),
                Err(Halt::Fenced) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, epoch, "a later tenure holds the delivery state; not delivering");
                    return;
                }
                Err(Halt::Store(e)) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "delivery state unreadable; retrying");
                    tokio::time::sleep(self.settings.poll).await;
                }
            }
        };
        let mut sent: HashSet<String> = HashSet::new();
        let mut low_before: HashSet<String> = progress.state.low_groups.iter().cloned().collect();
        let sweep_every = self.settings.overlap / 4;
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            let sweep = matches!(self.source, EventSource::TimeIndex(_))
                && !self.settings.overlap.is_zero()
                && last_sweep.is_none_or(|at| at.elapsed() >= sweep_every);
            if sweep {
                last_sweep = Some(tokio::time::Instant::now());
            }
            let busy = match self
                .pass(subscriber, progress, &mut sent, &mut low_before, sweep)
                .await
            {
                Ok(busy) => busy,
                Err(Halt::Fenced) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, epoch, "a later tenure saved the delivery state; this instance stops delivering");
                    return;
                }
                Err(Halt::Store(e)) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "delivery pass failed; retrying");
                    false
                }
            };
            if sent.len() > SENT_MEMORY {
                sent.clear();
            }
            if !busy {
                tokio::time::sleep(self.settings.poll).await;
            }
        }
    }

    /// Loads the saved state (or starts a new subscriber at the present), moves a state saved
    /// by an older release onto this source's position, and stamps it with `epoch` at once: from
    /// then on no earlier tenure can save, even before this one has anything to save.
    async fn start_tenure(&self, subscriber: &Subscriber, epoch: u64) -> Result<Progress, Halt> {
        let saved = self
            .view
            .checkpoint(&checkpoint_of(&subscriber.name))
            .await?
            .and_then(|raw| serde_json::from_str::<DeliveryState>(&raw).ok());
        let fresh = saved.is_none();
        let mut state = saved.unwrap_or_else(|| DeliveryState {
            // A new subscriber hears what happens from now on, not the whole history.
            position: format_time(&self.clock.now()),
            ..DeliveryState::default()
        });
        let overlap = chrono::Duration::from_std(self.settings.overlap).unwrap_or_default();
        let mut handled = BTreeSet::new();
        let mut legacy = None;
        match &self.source {
            EventSource::Log(log) => {
                if state.sequence.is_none() {
                    if fresh {
                        state.sequence = Some(log.log_head().await?);
                    } else {
                        // Saved by a release that kept a time position: start the log just
                        // before that position's re-read window and skip what it had handled.
                        let at = position_time(&state.position).unwrap_or_else(|| self.clock.now());
                        let from = at - overlap;
                        state.sequence = Some(log.log_position_before(from).await?);
                        legacy = Some(Legacy {
                            position: state.position.clone(),
                            from: format_time(&from),
                            handled: state.handled.iter().cloned().collect(),
                            until: log.log_head().await?,
                        });
                    }
                }
                state.handled.clear();
                state.watermark = None;
            }
            EventSource::TimeIndex(_) => {
                let watermark = match state.watermark.take() {
                    Some(watermark) => watermark,
                    // A new subscriber: nothing before its start is its business.
                    None if fresh => state.position.clone(),
                    // A state from before watermarks: the window its re-read covered behind
                    // the position is still open.
                    None => match position_time(&state.position) {
                        Some(at) if !overlap.is_zero() => format_time(&(at - overlap)),
                        _ => state.position.clone(),
                    },
                };
                handled = state
                    .handled
                    .drain(..)
                    .filter(|key| *key > watermark)
                    .collect();
                state.watermark = Some(watermark);
            }
        }
        let mut progress = Progress {
            epoch,
            state,
            handled,
            legacy,
            dirty: true,
            saved_at: tokio::time::Instant::now(),
        };
        self.save(subscriber, &mut progress).await?;
        Ok(progress)
    }

    /// Saves the state with the tenure's epoch. Refused (a later tenure saved): [`Halt::Fenced`].
    /// A store error leaves it unsaved (the next save carries it) and delivery goes on: a lost
    /// save costs a re-send after a restart, never a notification.
    async fn save(&self, subscriber: &Subscriber, progress: &mut Progress) -> Result<(), Halt> {
        progress.state.fence = progress.epoch;
        let skip = progress.handled.len().saturating_sub(HANDLED_SAVED);
        progress.state.handled = progress.handled.iter().skip(skip).cloned().collect();
        let raw = serde_json::to_string(&progress.state)
            .map_err(|e| StoreError::Corrupt(format!("delivery state: {e}")))?;
        match self
            .view
            .save_checkpoint_fenced(&checkpoint_of(&subscriber.name), progress.epoch, &raw)
            .await
        {
            Ok(true) => {
                progress.dirty = false;
                progress.saved_at = tokio::time::Instant::now();
                Ok(())
            }
            Ok(false) => Err(Halt::Fenced),
            Err(e) => {
                tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "delivery state not saved");
                Ok(())
            }
        }
    }

    /// One pass: the events (one page; on the time index also the re-read when `sweep`), a save
    /// when due, then the expiry and pool checks. `true` when there was more to read.
    async fn pass(
        &self,
        subscriber: &Subscriber,
        progress: &mut Progress,
        sent: &mut HashSet<String>,
        low_before: &mut HashSet<String>,
        sweep: bool,
    ) -> Result<bool, Halt> {
        let now = self.clock.now();
        let more = match &self.source {
            EventSource::Log(log) => self.read_log(subscriber, log.as_ref(), progress).await?,
            EventSource::TimeIndex(feed) => {
                let settle = chrono::Duration::from_std(self.settings.settle).unwrap_or_default();
                let until = now - settle + chrono::Duration::milliseconds(1);
                if sweep {
                    self.sweep(subscriber, feed.as_ref(), progress, now, until)
                        .await?;
                }
                self.read_forward(subscriber, feed.as_ref(), progress, until)
                    .await?
            }
        };
        if progress.dirty && (!more || progress.saved_at.elapsed() >= CHECKPOINT_EVERY) {
            self.save(subscriber, progress).await?;
        }

        for notification in self.expiring_soon(now).await? {
            if sent.contains(&notification.id)
                || !subscriber.wants(notification.kind, &notification.name)
            {
                continue;
            }
            self.deliver(subscriber, progress, &notification).await?;
            sent.insert(notification.id.clone());
            self.save(subscriber, progress).await?;
        }
        let low = self.pool_low(now, low_before).await?;
        let low_groups: BTreeSet<String> = low_before.iter().cloned().collect();
        let groups_changed = low_groups != progress.state.low_groups;
        progress.state.low_groups = low_groups;
        let mut saved = false;
        for notification in low {
            if subscriber.wants(notification.kind, &notification.name) {
                self.deliver(subscriber, progress, &notification).await?;
                self.save(subscriber, progress).await?;
                saved = true;
            }
        }
        if groups_changed && !saved {
            self.save(subscriber, progress).await?;
        }
        Ok(more)
    }

    /// The next page of the log after the saved log position. `true` when the page was full.
    async fn read_log(
        &self,
        subscriber: &Subscriber,
        log: &dyn EventLog,
        progress: &mut Progress,
    ) -> Result<bool, Halt> {
        let after = progress.state.sequence.unwrap_or_default();
        let page = log.read_log(after, FEED_PAGE).await?;
        for (sequence, envelope) in &page {
            let key = feed_key(envelope);
            let skip = progress
                .legacy
                .as_ref()
                .is_some_and(|legacy| legacy.handled(&key));
            if !skip {
                if let Some(notification) = self.notification_of(envelope).await? {
                    if subscriber.wants(notification.kind, &notification.name) {
                        self.deliver(subscriber, progress, &notification).await?;
                    }
                }
            }
            progress.state.sequence = Some(*sequence);
            progress.state.position = key;
            progress.dirty = true;
            if progress
                .legacy
                .as_ref()
                .is_some_and(|legacy| *sequence >= legacy.until)
            {
                progress.legacy = None;
            }
        }
        Ok(page.len() == FEED_PAGE)
    }

    /// Time index: the next page after the reading position, up to `until`. Every key delivered
    /// is remembered for the re-read. `true` when the range holds more.
    async fn read_forward(
        &self,
        subscriber: &Subscriber,
        feed: &dyn EventFeed,
        progress: &mut Progress,
        until: DateTime<Utc>,
    ) -> Result<bool, Halt> {
        let query = FeedQuery {
            after: progress.state.position.clone(),
            until,
            filter: FeedFilter::default(),
        };
        let page = feed.feed(&query, FEED_PAGE).await?;
        for envelope in &page.events {
            let key = feed_key(envelope);
            if !progress.handled.contains(&key) {
                if let Some(notification) = self.notification_of(envelope).await? {
                    if subscriber.wants(notification.kind, &notification.name) {
                        self.deliver(subscriber, progress, &notification).await?;
                        progress.remember(key.clone());
                    }
                }
            }
            progress.state.position = key;
            progress.dirty = true;
        }
        let mut more = false;
        if let Some(next) = page.next {
            more = next != query.after;
            if next != progress.state.position {
                progress.state.position = next;
                progress.dirty = true;
            }
        }
        if self.settings.overlap.is_zero() {
            // No re-read: the watermark is the position, and nothing needs remembering.
            progress.state.watermark = Some(progress.state.position.clone());
            progress.handled.clear();
        }
        Ok(more)
    }

    /// Time index: reads the window from the watermark up to the reading position again and
    /// delivers what is not among the handled keys — events the index showed only after the
    /// position had passed their key (a slow or retried commit, a writer's clock behind, the
    /// index catching up). Then moves the watermark to `overlap` before `now` (never past the
    /// position): every event stamped earlier was visible to this read if it ever will be, so it
    /// was handled, and its key can be forgotten.
    async fn sweep(
        &self,
        subscriber: &Subscriber,
        feed: &dyn EventFeed,
        progress: &mut Progress,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<(), Halt> {
        let overlap = chrono::Duration::from_std(self.settings.overlap).unwrap_or_default();
        let watermark = progress.state.watermark.clone().unwrap_or_default();
        let mut after = watermark.clone();
        'pages: loop {
            let query = FeedQuery {
                after: after.clone(),
                until,
                filter: FeedFilter::default(),
            };
            let page = feed.feed(&query, FEED_PAGE).await?;
            for envelope in &page.events {
                let key = feed_key(envelope);
                if key > progress.state.position {
                    break 'pages;
                }
                if progress.handled.contains(&key) {
                    continue;
                }
                if let Some(notification) = self.notification_of(envelope).await? {
                    if subscriber.wants(notification.kind, &notification.name) {
                        tracing::info!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, "event found behind the position; delivering");
                        self.deliver(subscriber, progress, &notification).await?;
                        progress.remember(key);
                    }
                }
            }
            match page.next {
                Some(next) if next < progress.state.position && next > after => after = next,
                _ => break,
            }
        }
        let horizon = format_time(&(now - overlap)).min(progress.state.position.clone());
        if horizon > watermark {
            progress.handled = progress.handled.split_off(&horizon);
            progress.handled.remove(&horizon);
            progress.state.watermark = Some(horizon);
            progress.dirty = true;
        }
        Ok(())
    }

    /// The notification a recorded event raises, if any.
    async fn notification_of(
        &self,
        envelope: &EventEnvelope,
    ) -> Result<Option<Notification>, StoreError> {
        let Some(kind) = kind_of_event(&envelope.event_type) else {
            return Ok(None);
        };
        let sandbox_id = match sandbox_id_of(&envelope.stream_id) {
            Some(id) => id.to_string(),
            // A served ticket's stream is the ticket's: its payload names the sandbox.
            None => match envelope.payload.get("sandbox_id").and_then(|v| v.as_str()) {
                Some(id) if kind == WebhookKind::TicketServed => id.to_string(),
                _ => return Ok(None),
            },
        };
        let sandbox_id = sandbox_id.as_str();
        let name = self.name_of(sandbox_id).await?;
        Ok(Some(Notification {
            id: envelope.event_id.to_string(),
            kind,
            body: serde_json::json!({
                "id": envelope.event_id.to_string(),
                "kind": kind.as_str(),
                "occurred_at": format_time(&envelope.occurred_at),
                "sandbox": {"sandbox_id": sandbox_id, "name": name, "prefix": pool_prefix(&name)},
                "event": {
                    "stream_id": envelope.stream_id,
                    "version": envelope.version,
                    "event_type": envelope.event_type,
                    "actor": envelope.actor,
                    "payload": envelope.payload,
                },
            }),
            name,
        }))
    }

    /// A sandbox's name, from its registration (names never change, so it is cached).
    async fn name_of(&self, sandbox_id: &str) -> Result<String, StoreError> {
        if let Some(name) = self
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sandbox_id)
        {
            return Ok(name.clone());
        }
        let events = self.events.load(&sandbox_stream(sandbox_id)).await?;
        let name = events
            .iter()
            .find_map(|e| match e.decode() {
                Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxRegistered { name, .. })) => {
                    Some(name)
                }
                _ => None,
            })
            .unwrap_or_default();
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if names.len() > SENT_MEMORY {
            names.clear();
        }
        names.insert(sandbox_id.to_string(), name.clone());
        Ok(name)
    }

    /// Allocations whose window ends within the warning, one notification per (sandbox,
    /// `expires_at`): a lease that moves its end gets a new warning.
    async fn expiring_soon(&self, now: DateTime<Utc>) -> Result<Vec<Notification>, StoreError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .view
                .due(
                    SandboxStatus::Allocated,
                    now + self.settings.expiry_warning,
                    FEED_PAGE,
                    cursor.as_deref(),
                )
                .await?;
            for row in page.rows {
                let Some(expires_at) = row.expires_at.filter(|at| *at > now) else {
                    continue;
                };
                let expires = format_time(&expires_at);
                let id = derived_id(&["expiring_soon", &row.sandbox_id, &expires]);
                out.push(Notification {
                    kind: WebhookKind::ExpiringSoon,
                    body: serde_json::json!({
                        "id": id,
                        "kind": WebhookKind::ExpiringSoon.as_str(),
                        "occurred_at": format_time(&now),
                        "sandbox": {"sandbox_id": row.sandbox_id, "name": row.name, "prefix": pool_prefix(&row.name)},
                        "expires_at": expires,
                        "owner": row.owner,
                        "track_name": row.track_name,
                    }),
                    name: row.name,
                    id,
                });
            }
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Groups that went below their threshold since the last check.
    async fn pool_low(
        &self,
        now: DateTime<Utc>,
        low_before: &mut HashSet<String>,
    ) -> Result<Vec<Notification>, StoreError> {
        if self.settings.low_water.is_empty() {
            return Ok(Vec::new());
        }
        let stats = self.view.stats_by_prefix().await?;
        let groups = self.settings.low_water.low_groups(&stats);
        let now_low: HashSet<String> = groups.iter().map(|g| g.prefix.clone()).collect();
        let out = groups
            .into_iter()
            .filter(|g| !low_before.contains(&g.prefix))
            .map(|g| {
                let id = derived_id(&["pool_low", &g.prefix, &format_time(&now)]);
                Notification {
                    kind: WebhookKind::PoolLow,
                    body: serde_json::json!({
                        "id": id,
                        "kind": WebhookKind::PoolLow.as_str(),
                        "occurred_at": format_time(&now),
                        "pool": {"prefix": g.prefix, "available": g.available, "threshold": g.threshold},
                    }),
                    name: g.prefix,
                    id,
                }
            })
            .collect();
        *low_before = now_low;
        Ok(out)
    }

    /// Sends one notification until it is accepted (2xx) or the attempts are spent, recording
    /// each failure in the state admins see.
    /// Only a refused save ([`Halt::Fenced`]) ends it early.
    async fn deliver(
        &self,
        subscriber: &Subscriber,
        progress: &mut Progress,
        notification: &Notification,
    ) -> Result<(), Halt> {
        let body = serde_json::to_vec(&notification.body).unwrap_or_default();
        let mut attempt = 0;
        loop {
            let state = &mut progress.state;
            attempt += 1;
            let timestamp = Utc::now().timestamp();
            let result = self
                .client
                .post(subscriber.url.expose())
                .header("Content-Type", "application/json")
                .header("X-Broker-Webhook-Id", &notification.id)
                .header("X-Broker-Webhook-Kind", notification.kind.as_str())
                .header("X-Broker-Webhook-Timestamp", timestamp.to_string())
                .header(
                    "X-Broker-Webhook-Signature",
                    signatures(subscriber, timestamp, &body),
                )
                .body(body.clone())
                .send()
                .await;
            let error = match result {
                Ok(resp) if resp.status().is_success() => {
                    state.delivered += 1;
                    state.pending = None;
                    state.last_delivered_at = Some(format_time(&Utc::now()));
                    progress.dirty = true;
                    tracing::info!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, kind = notification.kind.as_str(), attempt, "webhook delivered");
                    return Ok(());
                }
                Ok(resp) if resp.status().is_redirection() => format!(
                    "answered {} (a redirect; redirects are not followed)",
                    resp.status().as_u16()
                ),
                Ok(resp) => format!("answered {}", resp.status().as_u16()),
                Err(e) => failure_of(&e).to_string(),
            };
            state.failed_attempts += 1;
            if attempt >= self.settings.max_attempts {
                state.given_up += 1;
                state.pending = None;
                state.recent_failures.push_back(FailedDelivery {
                    id: notification.id.clone(),
                    kind: notification.kind.as_str().to_string(),
                    error: error.clone(),
                    at: format_time(&Utc::now()),
                });
                while state.recent_failures.len() > RECENT_FAILURES {
                    state.recent_failures.pop_front();
                }
                tracing::warn!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, kind = notification.kind.as_str(), attempt, error = %error, "webhook given up");
                return self.save(subscriber, progress).await;
            }
            let delay = self
                .settings
                .retry_base
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(self.settings.retry_cap);
            state.pending = Some(PendingDelivery {
                id: notification.id.clone(),
                kind: notification.kind.as_str().to_string(),
                attempts: attempt,
                last_error: error.clone(),
                next_attempt_at: format_time(
                    &(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default()),
                ),
            });
            tracing::warn!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, attempt, error = %error, "webhook attempt failed; retrying");
            self.save(subscriber, progress).await?;
            tokio::time::sleep(delay).await;
        }
    }
}

/// A DNS resolver that refuses a name with any address that is not public
/// ([`crate::network::is_public`]): used for every delivery unless
/// `WEBHOOK_ALLOW_PRIVATE_TARGETS` is on. reqwest connects only to the addresses it returns, so
/// the address checked is the address connected to.
#[derive(Debug)]
pub struct PublicOnly;

/// Why [`PublicOnly`] refused a name.
#[derive(Debug, thiserror::Error)]
#[error("the target resolves to an address that is not public")]
pub struct TargetNotPublic;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addresses: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // Refuse when any address is private, not only all of them: a rebinding answer can
            // mix a public address with the one it means to reach.
            if addresses.iter().any(|a| !crate::network::is_public(a.ip())) {
                return Err(Box::new(TargetNotPublic) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A failed delivery request in words that carry neither the URL (reqwest's own message
/// includes it) nor any other detail of the target.
fn failure_of(error: &reqwest::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<TargetNotPublic>() {
            return "refused: the target resolves to a private, loopback or link-local address (WEBHOOK_ALLOW_PRIVATE_TARGETS is off)";
        }
        source = cause.source();
    }
    if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect (name resolution or connection failed)"
    } else if error.is_redirect() {
        "redirected; redirects are not followed"
    } else {
        "request failed"
    }
}

/// The time a feed position stands at (`{occurred_at}` or `{occurred_at}#{event_id}`).
fn position_time(position: &str) -> Option<DateTime<Utc>> {
    let time = position.split('#').next()?;
    DateTime::parse_from_rfc3339(time)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// A stop flag every subscriber task can wait on, set when `shutdown` resolves.
fn tokio_util_stop(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature covers timestamp and body; derived ids are stable.
    #[test]
    fn signs_and_derives() {
        let a = signature("k", 1, b"{}");
        assert!(a.starts_with("v1="));
        assert_ne!(a, signature("k", 2, b"{}"));
        assert_ne!(a, signature("k", 1, b"{ }"));
        assert_eq!(derived_id(&["a", "b"]), derived_id(&["a", "b"]));
        assert_ne!(derived_id(&["a", "b"]), derived_id(&["ab", ""]));
    }

    /// During a secret's overlap a delivery carries a signature with each key; once the overlap
    /// has ended, only the current key's.
    #[test]
    fn a_rotating_secret_signs_twice_during_its_overlap() {
        let subscriber = |until: DateTime<Utc>| {
            let json = runtime::Secret::from(format!(
                r#"{{"subscribers":[{{"name":"a","url":"https://hooks.example.com/h","secret":"new-secret-0123456789abcdefghijklmnop","previous_secret":"old-secret-0123456789abcdefghijklmnop","previous_secret_until":"{}"}}]}}"#,
                until.to_rfc3339()
            ));
            let policy = config::TargetPolicy {
                allow_http: false,
                allow_private: false,
            };
            load_subscribers(None, Some(&json), policy)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .remove(0)
        };
        let new = signature("new-secret-0123456789abcdefghijklmnop", 7, b"{}");
        let old = signature("old-secret-0123456789abcdefghijklmnop", 7, b"{}");
        let open = subscriber(Utc::now() + chrono::Duration::hours(1));
        assert_eq!(signatures(&open, 7, b"{}"), format!("{new},{old}"));
        let ended = subscriber(Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(signatures(&ended, 7, b"{}"), new);
        assert!(!format!("{open:?}").contains("old-secret"), "{open:?}");
    }
}
