//! Signed webhooks (ADR 0018): notifications about sandboxes and the pool, POSTed to
//! subscribers at least once, each subscriber at its own pace.
//!
//! Each subscriber has one task. It tails the time-ordered event feed from its own saved
//! position (a checkpoint named `webhooks:<name>`), turns the events it wants into
//! notifications ([`config::KIND_OF_EVENT`]) and delivers them in order, retrying a failing
//! endpoint with capped exponential backoff; the position moves past an event only once its
//! notification was delivered or given up, so a crash or restart re-sends rather than loses.
//! Besides the feed, the task checks the view for allocations about to expire and the pool
//! counters for low groups, which no single event announces. Commands never wait for any of
//! this: delivery runs beside them, reading what they recorded.
//!
//! Of several API instances only the one holding a subscriber's lease ([`lease`]) delivers for
//! it; the others wait to take over. Each pass also re-reads a window behind the position for
//! events the feed showed late, skipping those already handled (ADR 0018 addendum).
//!
//! Every request carries `X-Broker-Webhook-Id` (stable across retries: de-duplicate on it),
//! `X-Broker-Webhook-Timestamp` (Unix seconds) and `X-Broker-Webhook-Signature`:
//! `v1=<hex HMAC-SHA256 of "{timestamp}.{body}" with the subscriber's secret>`.
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
use domain::store::ViewStore;
use domain::{EventEnvelope, EventStore, SandboxStatus, SharedClock, StoreError};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use config::{
    kind_of_event, load_subscribers, Subscriber, TargetPolicy, WebhookKind, KIND_OF_EVENT,
};
pub use lease::DispatchLease;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Events read from the feed per page.
const FEED_PAGE: usize = 100;
/// Given-up notifications remembered per subscriber for the admin view.
const RECENT_FAILURES: usize = 20;
/// Synthetic notification ids remembered (expiring soon, pool low) to send each once.
const SENT_MEMORY: usize = 100_000;
/// Feed keys of handled notifications remembered for the overlap re-read (ADR 0018 addendum):
/// enough for 60 s of 30 notifications a second, and a checkpoint item well under DynamoDB's
/// 400 KB. Past it the oldest are dropped, which can only repeat a delivery, never lose one.
const HANDLED_MEMORY: usize = 2_000;

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
    /// How often the feed and the expiry/pool checks run when idle.
    pub poll: Duration,
    /// Events younger than this are left for the next poll (the time index may still be
    /// filling in slightly older ones).
    pub settle: Duration,
    /// `expiring_soon` is sent this long before `expires_at`.
    pub expiry_warning: chrono::Duration,
    /// Pool thresholds for `pool_low`.
    pub low_water: LowWater,
    /// How long one instance's claim to dispatch a subscriber lasts without renewal.
    pub lease: Duration,
    /// How far behind its position each subscriber re-reads the feed for events the time index
    /// showed late; the re-read runs every quarter of this (in real time).
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
    /// Feed position: every event up to here was handled.
    pub position: String,
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
    /// Feed keys of the notifications handled (delivered or given up) within the overlap
    /// window behind `position`: the re-read skips them, so a late event is sent once.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub handled: VecDeque<String>,
    /// Prefix groups below low water at the last check: an instance taking over the
    /// subscriber does not announce them again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub low_groups: BTreeSet<String>,
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

/// The dispatcher: subscribers, their tasks, and what the admin endpoint reads.
pub struct Dispatcher {
    subscribers: Vec<Subscriber>,
    settings: DeliverySettings,
    events: Arc<dyn EventStore>,
    feed: Arc<dyn EventFeed>,
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
    /// A dispatcher over the stores; `client` sends the requests.
    pub fn new(
        subscribers: Vec<Subscriber>,
        settings: DeliverySettings,
        events: Arc<dyn EventStore>,
        feed: Arc<dyn EventFeed>,
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
            feed,
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
                    // Bookkeeping of the overlap re-read, not something an operator reads.
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
        let tasks: Vec<_> = (0..self.subscribers.len())
            .map(|i| {
                let dispatcher = Arc::clone(&self);
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = dispatcher.serve(i) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
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
    /// lease otherwise (another instance delivers meanwhile).
    async fn serve(&self, index: usize) {
        let subscriber = &self.subscribers[index];
        let lease = self.lease_of(subscriber);
        loop {
            let deadline = match lease.claim().await {
                Ok(Some(deadline)) => deadline,
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
            tracing::info!(target: "webhooks", subscriber = %subscriber.name, instance = %self.instance, "dispatch lease taken; delivering");
            // Delivery stops the moment the lease is lost (even mid-request: the next holder
            // resends from the saved state, and receivers de-duplicate on the id).
            tokio::select! {
                () = lease.keep(deadline) => {}
                () = self.deliver_while_held(subscriber) => {}
            }
        }
    }

    async fn deliver_while_held(&self, subscriber: &Subscriber) {
        // Read afresh on every takeover: another instance may have moved it since.
        let mut state = loop {
            match self.load_state(subscriber).await {
                Ok(state) => break state,
                Err(e) => {
                    tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "delivery state unreadable; retrying");
                    tokio::time::sleep(self.settings.poll).await;
                }
            }
        };
        let mut sent: HashSet<String> = HashSet::new();
        let mut low_before: HashSet<String> = state.low_groups.iter().cloned().collect();
        let rescan_every = self.settings.overlap / 4;
        let mut last_rescan: Option<tokio::time::Instant> = None;
        loop {
            let rescan = !self.settings.overlap.is_zero()
                && last_rescan.is_none_or(|at| at.elapsed() >= rescan_every);
            if rescan {
                last_rescan = Some(tokio::time::Instant::now());
            }
            let busy = match self
                .pass(subscriber, &mut state, &mut sent, &mut low_before, rescan)
                .await
            {
                Ok(busy) => busy,
                Err(e) => {
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

    async fn load_state(&self, subscriber: &Subscriber) -> Result<DeliveryState, StoreError> {
        let saved = self
            .view
            .checkpoint(&checkpoint_of(&subscriber.name))
            .await?
            .and_then(|raw| serde_json::from_str::<DeliveryState>(&raw).ok());
        Ok(saved.unwrap_or_else(|| DeliveryState {
            // A new subscriber hears what happens from now on, not the whole history.
            position: format_time(&self.clock.now()),
            ..DeliveryState::default()
        }))
    }

    async fn save_state(&self, subscriber: &Subscriber, state: &DeliveryState) {
        let Ok(raw) = serde_json::to_string(state) else {
            return;
        };
        if let Err(e) = self
            .view
            .save_checkpoint(&checkpoint_of(&subscriber.name), &raw)
            .await
        {
            tracing::warn!(target: "webhooks", subscriber = %subscriber.name, error = %e, "delivery state not saved");
        }
    }

    /// One pass: the overlap re-read when `rescan`, the feed (one page), then the expiry and
    /// pool checks. `true` when the feed had more to read.
    async fn pass(
        &self,
        subscriber: &Subscriber,
        state: &mut DeliveryState,
        sent: &mut HashSet<String>,
        low_before: &mut HashSet<String>,
        rescan: bool,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let settle = chrono::Duration::from_std(self.settings.settle).unwrap_or_default();
        let until = now - settle + chrono::Duration::milliseconds(1);
        if rescan {
            self.reread_overlap(subscriber, state, until).await?;
        }
        let query = FeedQuery {
            after: state.position.clone(),
            until,
            filter: FeedFilter::default(),
        };
        let before = state.clone();
        let page = self.feed.feed(&query, FEED_PAGE).await?;
        for envelope in &page.events {
            if let Some(notification) = self.notification_of(envelope).await? {
                if subscriber.wants(notification.kind, &notification.name) {
                    self.deliver(subscriber, state, &notification).await;
                    remember_handled(state, feed_key(envelope));
                }
            }
            state.position = feed_key(envelope);
        }
        let more = page.next.is_some() && !page.events.is_empty();
        if let Some(next) = page.next {
            state.position = next;
        }
        if *state != before {
            self.save_state(subscriber, state).await;
        }

        for notification in self.expiring_soon(now).await? {
            if sent.contains(&notification.id)
                || !subscriber.wants(notification.kind, &notification.name)
            {
                continue;
            }
            self.deliver(subscriber, state, &notification).await;
            sent.insert(notification.id.clone());
            self.save_state(subscriber, state).await;
        }
        let low = self.pool_low(now, low_before).await?;
        let low_groups: BTreeSet<String> = low_before.iter().cloned().collect();
        let groups_changed = low_groups != state.low_groups;
        state.low_groups = low_groups;
        let mut saved = false;
        for notification in low {
            if subscriber.wants(notification.kind, &notification.name) {
                self.deliver(subscriber, state, &notification).await;
                self.save_state(subscriber, state).await;
                saved = true;
            }
        }
        if groups_changed && !saved {
            self.save_state(subscriber, state).await;
        }
        Ok(more)
    }

    /// Reads the feed again from `overlap` before the position up to the position and sends what
    /// is not among the handled keys: events the time index showed only after the position had
    /// passed their timestamp (a slow append, an index catching up). Handled keys older than the
    /// window are forgotten; the re-read never goes back that far.
    async fn reread_overlap(
        &self,
        subscriber: &Subscriber,
        state: &mut DeliveryState,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Some(position_at) = position_time(&state.position) else {
            return Ok(());
        };
        let overlap = chrono::Duration::from_std(self.settings.overlap).unwrap_or_default();
        let from = format_time(&(position_at - overlap));
        let before = state.handled.len();
        state.handled.retain(|key| *key > from);
        let mut changed = state.handled.len() != before;
        let handled: HashSet<String> = state.handled.iter().cloned().collect();
        let mut after = from;
        'pages: loop {
            let query = FeedQuery {
                after: after.clone(),
                until,
                filter: FeedFilter::default(),
            };
            let page = self.feed.feed(&query, FEED_PAGE).await?;
            for envelope in &page.events {
                let key = feed_key(envelope);
                if key > state.position {
                    break 'pages;
                }
                if handled.contains(&key) {
                    continue;
                }
                if let Some(notification) = self.notification_of(envelope).await? {
                    if subscriber.wants(notification.kind, &notification.name) {
                        tracing::info!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, "event found behind the position; delivering");
                        self.deliver(subscriber, state, &notification).await;
                        remember_handled(state, key);
                        changed = true;
                    }
                }
            }
            match page.next {
                Some(next) if next < state.position && next > after => after = next,
                _ => break,
            }
        }
        if changed {
            self.save_state(subscriber, state).await;
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
        let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) else {
            return Ok(None);
        };
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
    async fn deliver(
        &self,
        subscriber: &Subscriber,
        state: &mut DeliveryState,
        notification: &Notification,
    ) {
        let body = serde_json::to_vec(&notification.body).unwrap_or_default();
        let mut attempt = 0;
        loop {
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
                    tracing::info!(target: "webhooks", subscriber = %subscriber.name, id = %notification.id, kind = notification.kind.as_str(), attempt, "webhook delivered");
                    return;
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
                self.save_state(subscriber, state).await;
                return;
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
            self.save_state(subscriber, state).await;
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

/// Adds a handled feed key, dropping the oldest past [`HANDLED_MEMORY`].
fn remember_handled(state: &mut DeliveryState, key: String) {
    state.handled.push_back(key);
    while state.handled.len() > HANDLED_MEMORY {
        state.handled.pop_front();
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
