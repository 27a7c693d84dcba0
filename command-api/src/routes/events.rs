//! Auditor and dashboard endpoints over the event history (admin token):
//! * `GET /admin/events` — the paged, time-ordered feed of every event, with filters;
//! * `GET /admin/events/stream` — the same feed live, as server-sent events, resumable with
//!   `Last-Event-ID` (the stream itself is `crate::live_feed`; this module only parses the
//!   request and maps its outcome to a response);
//! * `GET /admin/sandboxes/{id}?at=` — a sandbox as it was at an instant (who held it);
//! * `GET /admin/callers/{caller}/allocations` — every sandbox a caller was allocated.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use domain::audit::{
    audit_page, caller_allocations, feed_key, parse_position, sandbox_at, AllocationRecord,
    AuditQuery, FeedFilter,
};
use domain::model::events::format_time;
use domain::model::ids::{sandbox_stream, validate_id};
use futures::Stream;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::live_feed::{event_json, HEARTBEAT};
use crate::routes::cursor::Listing;
use crate::routes::sandbox_ref::{resolve_sandbox_id, Visibility};
use crate::state::SharedState;

/// Default and largest page of the paged endpoints.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 500;

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
    /// Cursor of the next page (`events.…`, for this listing only); `null` at the end of the
    /// range.
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
    /// Cursor of the next page (`allocations.…`, for this listing only); `null` at the end.
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

/// A time parameter, exactly as sent: RFC 3339 (the document's `format: date-time`) has no room
/// for surrounding whitespace, so a value with some is refused rather than silently trimmed (a
/// stray space usually means a script built the query wrongly).
fn time_param(raw: Option<&String>, field: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|v| {
        if v.trim() != v {
            return Err(ApiError::validation(
                "query",
                field,
                "must be an RFC 3339 time without surrounding spaces (e.g. 2026-01-05T12:00:00Z); \
                 remove the spaces and retry",
            ));
        }
        DateTime::parse_from_rfc3339(v)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                ApiError::validation(
                    "query",
                    field,
                    "must be an RFC 3339 time, e.g. 2026-01-05T12:00:00Z",
                )
            })
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

/// `since`, `until` and `cursor` of a paged read of `listing`, checked.
fn range_params(q: &HashMap<String, String>, listing: Listing) -> Result<AuditQuery, ApiError> {
    let since = time_param(q.get("since"), "since")?;
    let until = time_param(q.get("until"), "until")?;
    // The window is half-open, [since, until): `until` equal to `since` is an empty window (an
    // empty page), while one that ends before it starts is a client's mistake worth a 400.
    if let (Some(since), Some(until)) = (since, until) {
        if until < since {
            return Err(ApiError::validation(
                "query",
                "until",
                "must not be before since",
            ));
        }
    }
    let cursor = listing.accept("", q.get("cursor"))?;
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
        ("since" = Option<String>, Query, format = DateTime, example = "2026-01-05T08:00:00Z", description = "Inclusive lower bound on occurred_at (RFC 3339); default: the first event"),
        ("until" = Option<String>, Query, format = DateTime, example = "2026-01-05T18:00:00Z", description = "Exclusive upper bound on occurred_at (RFC 3339); default: now + 5 min. Equal to `since`: an empty window (an empty page). Before `since`: 400 `VALIDATION_ERROR` (a rule across two parameters, which OpenAPI cannot state)"),
        ("type" = Option<String>, Query, example = "SandboxAllocated", pattern = "^(SandboxRegistered|SandboxAllocated|DeletionRequested|AllocationExpired|SandboxMarkedStale|SandboxRestored|DeletionAttemptFailed|DeletionFailed|DeletionLeased|DeletionRetried|SandboxDeleted|SandboxRetired|LeaseExtended|SandboxReserved|SandboxUnreserved|HeartbeatMissed|ClaimGranted|ClaimReleased|ListingRecorded|AdminJobListed|AdminJobStarted|AdminJobProgressed|AdminJobFinished|PoolDrained|PoolResumed|QuotaSlotTaken|QuotaSlotReleased|ReservationListed|ReservationCreated|ReservationEarmarked|ReservationShortfallRecorded|ReservationCancelled|ReservationEnded|RefusalsSummarized|TicketIssued|TicketPolled|TicketServed|TicketDropped)$", description = "Only this event type (an empty value is a 400)"),
        ("caller" = Option<String>, Query, example = "student-42", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only events whose actor is track:<caller> or whose payload names the caller; not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("sandbox_id" = Option<String>, Query, example = "mock-001", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only this sandbox's events (its stream and the claim events naming it); not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, example = 100, description = "1–500, default 100"),
        ("cursor" = Option<String>, Query, max_length = 2048, pattern = r"^(events\.[A-Za-z0-9_-]+)?$", description = "The `cursor` of the previous page, as it came; empty: the first page. A cursor of another listing is refused (400 `VALIDATION_ERROR`), as is one the server did not issue"),
    ),
    responses(
        (status = 200, description = "A page (possibly short, even empty, with a cursor: each request reads a bounded part of the history)", body = EventsResponse),
        (status = 400, description = "Bad parameter, or a cursor this listing did not issue", body = ErrorBody),
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
    let event_type = match q.get("type").map(String::as_str) {
        None => None,
        Some(t) if domain::model::events::EVENT_TYPES.contains(&t) => Some(t.to_string()),
        Some(_) => return Err(ApiError::validation("query", "type", "unknown event type")),
    };
    let mut query = range_params(&q, Listing::Events)?;
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
        cursor: Listing::Events.issue("", page.cursor),
        until: format_time(&page.until.unwrap_or(now)),
        now: format_time(&now),
    }))
}

/// Every event as it is recorded, as server-sent events.
#[utoipa::path(
    get, path = "/v1/admin/events/stream", tag = "Admin", security(("bearer" = [])),
    params(
        ("Last-Event-ID" = Option<String>, Header, example = "2026-01-05T08:00:00Z", description = "Resume after this position: the `id` of the last event received (or an RFC 3339 time). The events recorded after it are replayed first, then the stream goes live"),
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
    let opened = state
        .feed
        .open(state.broker.clock().clone(), resume)
        .await
        .ok_or_else(|| ApiError::too_many_streams(state.feed.max_subscribers()))?;
    let stream = opened.map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat")))
}

/// A sandbox's state at an instant, folded from its events up to then.
#[utoipa::path(
    get, path = "/v1/admin/sandboxes/{sandbox_id}", tag = "Admin", security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("at" = Option<String>, Query, format = DateTime, example = "2026-01-05T12:00:00Z", description = "The instant (RFC 3339); default: now"),
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
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Operator).await?;
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
        ("caller" = String, Path, example = "student-42", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "The caller (X-Instruqt-Sandbox-ID / X-Track-ID value): not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("since" = Option<String>, Query, format = DateTime, example = "2026-01-05T08:00:00Z", description = "Inclusive lower bound on the allocation time (RFC 3339)"),
        ("until" = Option<String>, Query, format = DateTime, example = "2026-01-05T18:00:00Z", description = "Exclusive upper bound on the allocation time (RFC 3339). Equal to `since`: an empty window (an empty page). Before `since`: 400 `VALIDATION_ERROR` (a rule across two parameters, which OpenAPI cannot state)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, example = 100, description = "1–500, default 100"),
        ("cursor" = Option<String>, Query, max_length = 2048, pattern = r"^(allocations\.[A-Za-z0-9_-]+)?$", description = "The `cursor` of the previous page, as it came; empty: the first page. A cursor of another listing is refused (400 `VALIDATION_ERROR`), as is one the server did not issue"),
    ),
    responses(
        (status = 200, description = "A page (possibly short, even empty, with a cursor)", body = AllocationsResponse),
        (status = 400, description = "Bad caller or parameter, or a cursor this listing did not issue", body = ErrorBody),
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
    let query = range_params(&q, Listing::Allocations)?;
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
        cursor: Listing::Allocations.issue("", page.cursor),
    }))
}
