//! Auditor and dashboard endpoints over the event history (admin token):
//! * `GET /admin/events` — the paged, time-ordered feed of every event, with filters;
//! * `GET /admin/events/stream` — the same feed live, as server-sent events, resumable with
//!   `Last-Event-ID`;
//! * `GET /admin/sandboxes/{id}?at=` — a sandbox as it was at an instant (who held it);
//! * `GET /admin/callers/{caller}/allocations` — every sandbox a caller was allocated.
//!
//! The live stream is fed in-process: one background task per API instance tails the store's
//! [`EventFeed`] (the same `by-time` index the paged feed reads) every [`TAIL_INTERVAL`] and
//! publishes each new event on a tokio broadcast channel; every connected client subscribes to it.
//! That works the same on both stores, and on DynamoDB it does not take one of the two reader
//! slots a stream shard allows (docs/adr/0005-live-feed.md).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::adapters::dynamo::DynamoStore;
use domain::adapters::embedded::EmbeddedStore;
use domain::audit::{
    audit_page, caller_allocations, feed_key, parse_position, position_time, sandbox_at,
    AllocationRecord, AuditQuery, EventFeed, FeedFilter, FeedQuery, FeedTail, FEED_PAGE,
    FUTURE_SLACK_S, TAIL_LOOKBACK_MS,
};
use domain::model::events::format_time;
use domain::model::ids::{sandbox_stream, validate_id};
use domain::{EventEnvelope, SharedClock};
use futures::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::routes::sandboxes::path_id;
use crate::state::SharedState;

/// How often the tail reads the feed for new events.
pub const TAIL_INTERVAL: Duration = Duration::from_millis(250);
/// Store calls one tail step may spend (a backlog is worked off over several steps).
const TAIL_MAX_PAGES: usize = 20;
/// Events buffered per subscriber before it counts as lagging (it then re-reads the feed).
pub const LIVE_CAPACITY: usize = 4096;
/// Keep-alive comment period of the stream (proxies drop idle connections).
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// A resumed stream remembers the keys it replayed this far behind the newest one, to drop
/// their live copies (a window well beyond the tail's lookback).
const REPLAY_DEDUP_WINDOW_MS: i64 = 60_000;
/// Default and largest page of the paged endpoints.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 500;

/// One event as the live stream sends it: its feed key (the SSE `id`) and its JSON (the `data`),
/// serialised once for every subscriber.
#[derive(Debug)]
pub struct LiveEvent {
    /// `{occurred_at}#{event_id}`.
    pub key: String,
    /// The envelope as JSON, with `key` added.
    pub json: String,
}

impl LiveEvent {
    fn new(envelope: &EventEnvelope) -> Self {
        let key = feed_key(envelope);
        let json = event_json(envelope, &key).to_string();
        Self { key, json }
    }

    fn to_sse(&self) -> Event {
        Event::default().id(&self.key).data(&self.json)
    }
}

/// The envelope as the feed endpoints return it: its fields plus `key`.
fn event_json(envelope: &EventEnvelope, key: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(envelope).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("key".into(), serde_json::Value::String(key.to_string()));
    }
    value
}

/// The audit feed of this instance: the store's [`EventFeed`] for paged reads, and the live
/// broadcast the tail task fills. Cheap to clone.
#[derive(Clone)]
pub struct EventsFeed {
    feed: Arc<dyn EventFeed>,
    live: broadcast::Sender<Arc<LiveEvent>>,
    closing: Arc<watch::Sender<bool>>,
    /// One permit per open stream (`SSE_MAX_SUBSCRIBERS`).
    subscribers: Arc<tokio::sync::Semaphore>,
    limits: LiveLimits,
}

/// Bounds on the live streams of one instance.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// Open streams at once; one more is answered 503 with `Retry-After` (`SSE_MAX_SUBSCRIBERS`).
    pub max_subscribers: usize,
    /// A stream ends after this long; the client reconnects with its `Last-Event-ID` and loses
    /// nothing (`SSE_MAX_LIFETIME_SEC`).
    pub max_lifetime: Duration,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self {
            max_subscribers: 64,
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

impl std::fmt::Debug for EventsFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsFeed")
            .field("subscribers", &self.live.receiver_count())
            .finish_non_exhaustive()
    }
}

impl EventsFeed {
    /// A feed over `feed` (the tail is started by [`start_live_feed`]).
    pub fn new(feed: Arc<dyn EventFeed>) -> Self {
        Self::with_limits(feed, LiveLimits::default())
    }

    /// A feed over `feed` with explicit stream limits.
    pub fn with_limits(feed: Arc<dyn EventFeed>, limits: LiveLimits) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        let (closing, _) = watch::channel(false);
        Self {
            feed,
            live,
            closing: Arc::new(closing),
            subscribers: Arc::new(tokio::sync::Semaphore::new(limits.max_subscribers.max(1))),
            limits,
        }
    }

    /// The store's feed.
    pub fn feed(&self) -> &Arc<dyn EventFeed> {
        &self.feed
    }

    /// Ends every open stream (at shutdown: the server's graceful drain waits for open responses,
    /// and a live stream never finishes by itself).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Closes the streams once `signal` resolves.
    pub fn close_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let feed = self.clone();
        tokio::spawn(async move {
            signal.await;
            feed.close();
        });
    }
}

/// Builds the feed of whichever store is in use and starts its tail; the task stops (and closes
/// the open streams) when `shutdown` resolves.
pub fn start_live_feed(
    embedded: Option<&EmbeddedStore>,
    dynamo: Option<&DynamoStore>,
    clock: SharedClock,
    limits: LiveLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(EventsFeed, JoinHandle<()>)> {
    let feed: Arc<dyn EventFeed> = match (embedded, dynamo) {
        (Some(store), _) => Arc::new(store.clone()),
        (None, Some(store)) => Arc::new(store.clone()),
        (None, None) => anyhow::bail!("the live feed needs the embedded or the DynamoDB store"),
    };
    let events = EventsFeed::with_limits(feed, limits);
    let task = tokio::spawn(run_tail(events.clone(), clock, shutdown));
    Ok((events, task))
}

/// Tails the feed and broadcasts each new event, until `shutdown`.
async fn run_tail(
    events: EventsFeed,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    // The tail reads the store only while somebody listens: an idle instance makes no feed
    // requests. It (re)starts a second before the first subscriber was noticed — within one
    // interval of its subscription — so the subscriber misses nothing recorded after it
    // subscribed (a resuming subscriber replays the gap from the feed itself).
    let mut tail: Option<FeedTail> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TAIL_INTERVAL) => {}
            _ = &mut shutdown => {
                events.close();
                return;
            }
        }
        if events.live.receiver_count() == 0 {
            tail = None;
            continue;
        }
        let tail = tail.get_or_insert_with(|| {
            FeedTail::after(format_time(&(clock.now() - chrono::Duration::seconds(1))))
        });
        match tail
            .poll(events.feed.as_ref(), clock.now(), TAIL_MAX_PAGES)
            .await
        {
            Ok(fresh) => {
                for envelope in &fresh {
                    // No subscriber is not an error: the event is simply not sent anywhere.
                    let _ = events.live.send(Arc::new(LiveEvent::new(envelope)));
                }
            }
            Err(e) => {
                tracing::warn!(target: "live_feed", error = %e, "reading the event feed failed; retrying")
            }
        }
    }
}

/// A page of the event feed.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsResponse {
    /// Events in time order: each envelope (`stream_id`, `version`, `event_type`,
    /// `schema_version`, `event_id`, `occurred_at`, `actor`, `request_id`, `correlation_id`,
    /// `payload`) plus its feed `key`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// Events on this page (may be fewer than `limit`, even 0, while `cursor` is set: one request
    /// reads a bounded amount of the history).
    pub count: usize,
    /// Cursor of the next page; `null` at the end of the range.
    pub cursor: Option<String>,
    /// The exclusive upper bound the page was read with (RFC 3339).
    pub until: String,
    /// The server's time (RFC 3339).
    pub now: String,
}

/// A sandbox as it was at an instant.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxAtResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// The instant asked about (RFC 3339).
    pub at: String,
    /// Status at that instant; `null` when it was not registered yet.
    pub status: Option<String>,
    /// Who held it at that instant (the owner while `allocated`), else `null`.
    pub holder: Option<String>,
    /// The current or most recent owner at that instant.
    pub owner: Option<String>,
    /// Lab slug of that allocation.
    pub track_name: Option<String>,
    /// When that allocation started (RFC 3339).
    pub allocated_at: Option<String>,
    /// End of its lab window (RFC 3339).
    pub expires_at: Option<String>,
    /// When it ended, if it had by then (RFC 3339).
    pub deletion_requested_at: Option<String>,
    /// Events folded (the stream's version at that instant).
    pub version: u64,
    /// `occurred_at` of the last event folded (RFC 3339).
    pub as_of_event: Option<String>,
    /// The whole folded state.
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// One allocation of a caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct CallerAllocation {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its stream's version of the allocation event.
    pub version: u64,
    /// When allocated (RFC 3339).
    pub allocated_at: String,
    /// End of the lab window granted (RFC 3339).
    pub expires_at: String,
    /// Lab slug.
    pub track_name: Option<String>,
    /// The idempotency key of the request.
    pub idempotency_key: String,
    /// When the allocation ended (RFC 3339); `null` while it is held.
    pub ended_at: Option<String>,
    /// `deletion_requested`, `expired` or `ended`; `null` while held.
    pub end_reason: Option<String>,
}

impl From<AllocationRecord> for CallerAllocation {
    fn from(a: AllocationRecord) -> Self {
        Self {
            sandbox_id: a.sandbox_id,
            version: a.version,
            allocated_at: format_time(&a.allocated_at),
            expires_at: format_time(&a.expires_at),
            track_name: a.track_name,
            idempotency_key: a.idempotency_key,
            ended_at: a.ended_at.as_ref().map(format_time),
            end_reason: a.end_reason,
        }
    }
}

/// A page of a caller's allocations.
#[derive(Debug, Serialize, ToSchema)]
pub struct AllocationsResponse {
    /// The caller.
    pub caller: String,
    /// Allocations in time order.
    pub allocations: Vec<CallerAllocation>,
    /// Allocations on this page.
    pub count: usize,
    /// Cursor of the next page; `null` at the end.
    pub cursor: Option<String>,
}

/// The audit routes (the admin auth layer is applied by the caller).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/events", get(list_events))
        .route("/admin/events/stream", get(stream_events))
        .route("/admin/sandboxes/{sandbox_id}", get(get_sandbox_at))
        .route(
            "/admin/callers/{caller}/allocations",
            get(list_caller_allocations),
        )
}

/// The OpenAPI description of these routes (merged into the API's document).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_events, stream_events, get_sandbox_at, list_caller_allocations),
    components(schemas(
        EventsResponse,
        SandboxAtResponse,
        CallerAllocation,
        AllocationsResponse
    ))
)]
pub struct EventsApi;

fn only_params(raw: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match raw.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::validation("query", unknown, "unknown parameter")),
        None => Ok(()),
    }
}

fn time_param(raw: Option<&String>, field: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|v| {
        DateTime::parse_from_rfc3339(v.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::validation("query", field, "must be an RFC 3339 time"))
    })
    .transpose()
}

fn limit_param(raw: Option<&String>) -> Result<usize, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::validation(
                "query",
                "limit",
                format!("must be an integer from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

fn id_param(raw: Option<&String>, field: &'static str) -> Result<Option<String>, ApiError> {
    raw.map(|v| {
        validate_id(field, v).map_err(|e| ApiError::validation("query", field, e.to_string()))
    })
    .transpose()
}

/// `since`, `until` and `cursor` of a paged read, checked.
fn range_params(q: &HashMap<String, String>) -> Result<AuditQuery, ApiError> {
    let since = time_param(q.get("since"), "since")?;
    let until = time_param(q.get("until"), "until")?;
    if let (Some(since), Some(until)) = (since, until) {
        if since >= until {
            return Err(ApiError::validation(
                "query",
                "until",
                "must be after since",
            ));
        }
    }
    let cursor = match q.get("cursor").map(|c| c.trim()) {
        None | Some("") => None,
        Some(c) => Some(c.to_string()),
    };
    Ok(AuditQuery {
        since,
        until,
        filter: FeedFilter::default(),
        cursor,
    })
}

/// The time-ordered feed of every event, paged, with filters.
#[utoipa::path(
    get, path = "/v1/admin/events", tag = "Admin", security(("bearer" = [])),
    params(
        ("since" = Option<String>, Query, format = DateTime, description = "Inclusive lower bound on occurred_at (RFC 3339); default: the first event"),
        ("until" = Option<String>, Query, format = DateTime, description = "Exclusive upper bound on occurred_at (RFC 3339); default: now + 5 min"),
        ("type" = Option<String>, Query, pattern = "^(SandboxRegistered|SandboxAllocated|DeletionRequested|AllocationExpired|SandboxMarkedStale|SandboxRestored|DeletionAttemptFailed|DeletionFailed|DeletionLeased|DeletionRetried|SandboxDeleted|SandboxRetired|LeaseExtended|ClaimGranted|ClaimReleased|ListingRecorded|PoolDrained|PoolResumed|QuotaSlotTaken|QuotaSlotReleased)$", description = "Only this event type"),
        ("caller" = Option<String>, Query, description = "Only events whose actor is track:<caller> or whose payload names the caller"),
        ("sandbox_id" = Option<String>, Query, description = "Only this sandbox's events (its stream and the claim events naming it)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "1–500, default 100"),
        ("cursor" = Option<String>, Query, description = "Opaque cursor from the previous page"),
    ),
    responses(
        (status = 200, description = "A page (possibly short, even empty, with a cursor: each request reads a bounded part of the history)", body = EventsResponse),
        (status = 400, description = "Bad parameter or cursor", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 408, description = "Request timed out", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 500, description = "Unexpected error (the cause is logged with the request id)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_events(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<EventsResponse>, ApiError> {
    only_params(
        &q,
        &[
            "since",
            "until",
            "type",
            "caller",
            "sandbox_id",
            "limit",
            "cursor",
        ],
    )?;
    let limit = limit_param(q.get("limit"))?;
    let event_type = match q.get("type").map(|t| t.trim()) {
        None | Some("") => None,
        Some(t) if domain::model::events::EVENT_TYPES.contains(&t) => Some(t.to_string()),
        Some(_) => return Err(ApiError::validation("query", "type", "unknown event type")),
    };
    let mut query = range_params(&q)?;
    query.filter = FeedFilter {
        event_type,
        caller: id_param(q.get("caller"), "caller")?,
        sandbox_id: id_param(q.get("sandbox_id"), "sandbox_id")?,
    };
    let now = state.broker.clock().now();
    let page = audit_page(state.feed.feed().as_ref(), &query, limit, now).await?;
    let events: Vec<serde_json::Value> = page
        .events
        .iter()
        .map(|e| event_json(e, &feed_key(e)))
        .collect();
    Ok(Json(EventsResponse {
        count: events.len(),
        events,
        cursor: page.cursor,
        until: format_time(&page.until.unwrap_or(now)),
        now: format_time(&now),
    }))
}

/// Every event as it is recorded, as server-sent events.
#[utoipa::path(
    get, path = "/v1/admin/events/stream", tag = "Admin", security(("bearer" = [])),
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position: the `id` of the last event received (or an RFC 3339 time). The events recorded after it are replayed first, then the stream goes live"),
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`: one event per recorded event (`id` = its feed key, `data` = the envelope JSON with `key`), and a `:heartbeat` comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad Last-Event-ID or parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 408, description = "Request timed out", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 500, description = "Unexpected error (the cause is logged with the request id)", body = ErrorBody),
        (status = 503, description = "OVERLOADED: SSE_MAX_SUBSCRIBERS streams are open (retry after `Retry-After`), or the store is unavailable", body = ErrorBody),
    )
)]
pub async fn stream_events(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Only the Authorization header authenticates (no `?token=`): the dashboard reads the stream
    // with fetch(), which can send the header, so no token ever lands in a URL or an access log.
    only_params(&q, &[])?;
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(raw) => {
            let text = raw
                .to_str()
                .map_err(|_| ApiError::validation("header", "Last-Event-ID", "not ASCII"))?;
            match text.trim() {
                "" => None,
                text => Some(parse_position(text).map_err(|_| {
                    ApiError::validation(
                        "header",
                        "Last-Event-ID",
                        "must be an event id from this stream or an RFC 3339 time",
                    )
                })?),
            }
        }
    };
    let Ok(permit) = Arc::clone(&state.feed.subscribers).try_acquire_owned() else {
        return Err(ApiError::too_many_streams(
            state.feed.limits.max_subscribers,
        ));
    };
    // A resume point before the first event would make a store that reads the history bucket by
    // bucket (DynamoDB: one query per hour) walk every empty hour back to it: start just before
    // the first event instead, which replays exactly the same events.
    let resume = match resume {
        Some(position) => Some(clamp_to_history(&state, position).await?),
        None => None,
    };
    // Subscribe before reading the replay, so nothing recorded in between is lost; what both
    // deliver is sent once (see `Session::next`).
    let session = Session {
        _permit: permit,
        ends_at: tokio::time::Instant::now() + state.feed.limits.max_lifetime,
        feed: Arc::clone(state.feed.feed()),
        clock: state.broker.clock().clone(),
        live: state.feed.live.subscribe(),
        closing: state.feed.closing.subscribe(),
        pending: VecDeque::new(),
        position: resume
            .clone()
            .unwrap_or_else(|| format_time(&state.broker.clock().now())),
        replay_from: resume,
        replayed: BTreeSet::new(),
    };
    let stream = futures::stream::unfold(session, Session::next);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat")))
}

/// `position`, or a position just before the first event when it lies before all history (or the
/// store is empty: then a minute before now).
async fn clamp_to_history(state: &SharedState, position: String) -> Result<String, ApiError> {
    let Some(at) = position_time(&position) else {
        return Ok(position);
    };
    let first = state
        .feed
        .feed()
        .first_event_time()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let floor = match first {
        Some(first) => first - chrono::Duration::milliseconds(1),
        None => state.broker.clock().now() - chrono::Duration::minutes(1),
    };
    Ok(if at < floor {
        format_time(&floor)
    } else {
        position
    })
}

/// One client's stream: replay (when resuming or after falling behind), then live.
struct Session {
    /// Held while the stream is open (the subscriber cap).
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The stream ends here; the client reconnects with its `Last-Event-ID`.
    ends_at: tokio::time::Instant,
    feed: Arc<dyn EventFeed>,
    clock: SharedClock,
    live: broadcast::Receiver<Arc<LiveEvent>>,
    closing: watch::Receiver<bool>,
    /// Replayed events not sent yet.
    pending: VecDeque<Arc<LiveEvent>>,
    /// The last position sent (or the start).
    position: String,
    /// Where the replay continues; `None` once live.
    replay_from: Option<String>,
    /// Keys replayed recently: their live copies are dropped.
    replayed: BTreeSet<String>,
}

impl Session {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if *self.closing.borrow() || tokio::time::Instant::now() >= self.ends_at {
                return None;
            }
            if let Some(item) = self.pending.pop_front() {
                self.position.clone_from(&item.key);
                return Some((Ok(item.to_sse()), self));
            }
            if let Some(after) = self.replay_from.take() {
                let query = FeedQuery {
                    after,
                    until: self.clock.now() + chrono::Duration::seconds(FUTURE_SLACK_S),
                    filter: FeedFilter::default(),
                };
                match self.feed.feed(&query, FEED_PAGE).await {
                    Ok(page) => {
                        for envelope in &page.events {
                            let item = Arc::new(LiveEvent::new(envelope));
                            self.replayed.insert(item.key.clone());
                            self.pending.push_back(item);
                        }
                        self.replay_from = page.next;
                        self.forget_old_replays();
                    }
                    Err(e) => {
                        // End the stream; the client reconnects with its Last-Event-ID.
                        tracing::warn!(target: "live_feed", error = %e, "replay failed; closing the stream");
                        return None;
                    }
                }
                continue;
            }
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(item) => {
                        if self.replayed.remove(&item.key) {
                            continue;
                        }
                        self.position.clone_from(&item.key);
                        return Some((Ok(item.to_sse()), self));
                    }
                    // Fell behind the broadcast buffer: re-read the feed after what was sent.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.replay_from = Some(self.position.clone());
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                changed = self.closing.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.ends_at) => return None,
            }
        }
    }

    fn forget_old_replays(&mut self) {
        let newest = self.replayed.last().and_then(|k| position_time(k));
        if let Some(newest) = newest {
            let keep_from = format_time(
                &(newest
                    - chrono::Duration::milliseconds(REPLAY_DEDUP_WINDOW_MS.max(TAIL_LOOKBACK_MS))),
            );
            self.replayed = self.replayed.split_off(&keep_from);
        }
    }
}

/// A sandbox's state at an instant, folded from its events up to then.
#[utoipa::path(
    get, path = "/v1/admin/sandboxes/{sandbox_id}", tag = "Admin", security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, description = "Broker id"),
        ("at" = Option<String>, Query, format = DateTime, description = "The instant (RFC 3339); default: now"),
    ),
    responses(
        (status = 200, description = "The state at that instant (`status` null: not registered yet)", body = SandboxAtResponse),
        (status = 400, description = "Bad id or time", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 408, description = "Request timed out", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 500, description = "Unexpected error (the cause is logged with the request id)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_sandbox_at(
    State(state): State<SharedState>,
    Path(sandbox_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<SandboxAtResponse>, ApiError> {
    only_params(&q, &["at"])?;
    let sandbox_id = path_id(&sandbox_id)?;
    let at = time_param(q.get("at"), "at")?.unwrap_or_else(|| state.broker.clock().now());
    let events = state
        .broker
        .events()
        .load(&sandbox_stream(&sandbox_id))
        .await?;
    if events.is_empty() {
        return Err(ApiError::sandbox_not_found(&sandbox_id));
    }
    let folded = sandbox_at(&events, at)?;
    let sandbox = &folded.sandbox;
    Ok(Json(SandboxAtResponse {
        sandbox_id: sandbox_id.clone(),
        at: format_time(&at),
        status: sandbox.status.map(|s| s.as_str().to_string()),
        holder: folded.holder.clone(),
        owner: sandbox.owner.clone(),
        track_name: sandbox.track_name.clone(),
        allocated_at: sandbox.allocated_at.as_ref().map(format_time),
        expires_at: sandbox.expires_at.as_ref().map(format_time),
        deletion_requested_at: sandbox.deletion_requested_at.as_ref().map(format_time),
        version: sandbox.version,
        as_of_event: folded.as_of_event.as_ref().map(format_time),
        state: serde_json::to_value(sandbox).map_err(|e| ApiError::internal(e.to_string()))?,
    }))
}

/// Every sandbox a caller was allocated, from the history, with how each allocation ended.
#[utoipa::path(
    get, path = "/v1/admin/callers/{caller}/allocations", tag = "Admin", security(("bearer" = [])),
    params(
        ("caller" = String, Path, description = "The caller (X-Instruqt-Sandbox-ID / X-Track-ID value)"),
        ("since" = Option<String>, Query, format = DateTime, description = "Inclusive lower bound on the allocation time (RFC 3339)"),
        ("until" = Option<String>, Query, format = DateTime, description = "Exclusive upper bound (RFC 3339)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "1–500, default 100"),
        ("cursor" = Option<String>, Query, description = "Opaque cursor from the previous page"),
    ),
    responses(
        (status = 200, description = "A page (possibly short, even empty, with a cursor)", body = AllocationsResponse),
        (status = 400, description = "Bad caller, parameter or cursor", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 408, description = "Request timed out", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 500, description = "Unexpected error (the cause is logged with the request id)", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_caller_allocations(
    State(state): State<SharedState>,
    Path(caller): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AllocationsResponse>, ApiError> {
    only_params(&q, &["since", "until", "limit", "cursor"])?;
    let caller = validate_id("caller", &caller)
        .map_err(|e| ApiError::validation("path", "caller", e.to_string()))?;
    let limit = limit_param(q.get("limit"))?;
    let query = range_params(&q)?;
    let page = caller_allocations(
        state.feed.feed().as_ref(),
        state.broker.events().as_ref(),
        &caller,
        &query,
        limit,
        state.broker.clock().now(),
    )
    .await?;
    let allocations: Vec<CallerAllocation> = page
        .allocations
        .into_iter()
        .map(CallerAllocation::from)
        .collect();
    Ok(Json(AllocationsResponse {
        caller,
        count: allocations.len(),
        allocations,
        cursor: page.cursor,
    }))
}
