//! Sandbox Broker's REST API: an axum service that existing track scripts call unchanged, in
//! front of the event store (commands, strong reads of one sandbox) and the projected pool view
//! (candidates, listings, stats). In embedded mode the same process also runs the projector and
//! the job loops, so one command starts everything.
//!
//! # Layout
//! - [`config`] — the API's own settings; the store, log and job settings are flattened in from
//!   `runtime::StoreArgs`, `runtime::LogArgs` and `jobs::JobsArgs` (shared with the other binaries).
//! - [`startup`] — opens the stores through `runtime::open_stores`, builds broker and jobs, and
//!   wires the in-process projector (the embedded log tail or the stream poller); background tasks.
//! - [`edge`] — the outer layers: request id (tower-http), error envelope, security headers,
//!   CORS (tower-http), load shedding, the per-address limit of unauthenticated requests, access
//!   log, latency metrics, panic guard (tower-http), the request body's deadline.
//! - [`auth`] — bearer tokens (constant time), principals, the rate limit after authentication,
//!   the `Caller` extractor.
//! - [`credentials`] — per-track credentials: prefixes, allocation cap, caller signatures.
//! - [`lease`] — the lease capability: tokens derived from the allocation, keys as credentials.
//! - [`rotation`] — secrets with a previous value accepted until a set time (rotation overlap).
//! - [`routes`] — one router per resource: `sandboxes` (track), `admin`, `admin_jobs`, `webhooks`,
//!   `pool` (drain, resume, quotas), `outcomes`, `ops`, `events` (the audit endpoints),
//!   `dashboard`, and the waiting line's `waiting` (on allocate), `tickets`, `waiting_lines`.
//! - [`listener`] — accepting connections and serving them with hyper; each connection's
//!   watchdog (silent, slow and idle clients), the per-address connection cap.
//! - [`head_guard`] — HTTP/1 request heads too large for hyper, answered with the envelope.
//! - [`network`] — trusted proxy networks (`TRUSTED_PROXIES`) and which addresses are public.
//! - [`live_feed`] — the live event stream: the feed tail, its broadcast and the per-client
//!   SSE session (over `Arc<dyn EventFeed>`, no concrete store).
//! - [`admin_jobs`] — long admin operations run in the background, recorded as events.
//! - [`webhooks`] — signed notifications to subscribers, delivered at least once from the feed.
//! - [`error`] — `ApiError` and the contract's error envelope.
//! - [`rate_limit`] — token buckets with bounded, sharded memory.
//! - [`readiness`] — the cached store check of `/readyz`.
//! - [`refusals`] — refused allocations counted per interval and written as one summary event
//!   (`WRITE_EVENTS_USAGE`), which usage reports count (ADR 0030).
//! - [`state`] — `AppState`, what every handler shares (imports no route module).
//! - [`metrics`] — Prometheus series (reference names kept).
//! - [`outcomes`] — allocation outcomes since the process started, per minute for the last hour
//!   (what the dashboard charts).
//! - [`openapi`] — the generated OpenAPI document; Swagger UI is served from vendored assets.
//! - [`pool_alerts`] — per-prefix pool gauges and `POOL_LOW_WATER` alerts (checked in a loop).
//! - [`subjects`] — student ids to pseudonyms at the one place they enter, and their erasure
//!   (`STUDENT_IDS`, ADR 0031).
//! - [`reservation_watch`] — reservation gauges and the run-dry forecast per prefix group with
//!   its `CAPACITY_LOW_WATER_HOURS` alert (ADR 0028).
//! - [`waiting_line`] — `Prefer: wait`: first-come lines per track and prefix, woken by the
//!   events that free supply.
//! - [`track_heartbeats`] — heartbeat policies declared in the track credentials file, merged
//!   with `HEARTBEAT_TRACKS` at start-up (ADR 0034).

pub mod admin_jobs;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod edge;
pub mod error;
pub mod head_guard;
pub mod lease;
pub mod listener;
pub mod live_feed;
pub mod metrics;
pub mod network;
pub mod openapi;
pub mod outcomes;
pub mod pool_alerts;
pub mod rate_limit;
pub mod readiness;
pub mod refusals;
pub mod reservation_watch;
pub mod rotation;
pub mod routes;
pub mod startup;
pub mod state;
pub mod subjects;
pub mod track_heartbeats;
pub mod waiting_line;
pub mod webhooks;

use std::time::Duration;

use axum::middleware::from_fn_with_state;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::ApiError;
use crate::state::SharedState;

/// Largest request body accepted (no endpoint reads a body; this only bounds what is buffered).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Marks a response `Cache-Control: no-store` unless it set its own policy.
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response
        .headers_mut()
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    response
}

/// The complete router with every layer, ready to serve.
pub fn app(state: SharedState, request_timeout: Duration) -> Router {
    let base = state.base_path.clone();
    let track = routes::sandboxes::router()
        .merge(routes::heartbeat::router())
        .merge(routes::tickets::router())
        .route_layer(from_fn_with_state(state.clone(), auth::require_track));
    let admin = routes::admin::router()
        .merge(routes::admin_jobs::router())
        .merge(routes::webhooks::router())
        .merge(routes::events::router())
        .merge(routes::pool::router())
        .merge(routes::outcomes::router())
        .merge(routes::students::router())
        .merge(routes::reservations::router())
        .merge(routes::usage::router())
        .merge(routes::waiting_lines::router())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let capacity = routes::reservations::capacity_router()
        .route_layer(from_fn_with_state(state.clone(), auth::require_any));
    let docs = SwaggerUi::new(format!("{base}/docs")).url(
        format!("{base}/openapi.json"),
        openapi::ApiDoc::openapi()
            .merge_from(routes::events::EventsApi::openapi())
            .merge_from(routes::usage::UsageApi::openapi())
            .merge_from(routes::heartbeat::HeartbeatApi::openapi()),
    );
    // Track and admin answers carry sandbox details (names, account paths): never kept by a
    // browser or a shared cache. A route that chose its own policy (the live stream) keeps it.
    let versioned = track
        .merge(admin)
        .merge(capacity)
        .layer(axum::middleware::map_response(no_store));
    let routes = Router::new()
        .nest(&base, versioned)
        .merge(routes::ops::router())
        .merge(routes::dashboard::router())
        .merge(docs)
        .fallback(|| async { ApiError::from_status(axum::http::StatusCode::NOT_FOUND) });
    with_edge(routes, state, request_timeout)
}

/// `routes` behind the edge layers every route of [`app`] is served through (see [`edge`]);
/// public so that a test can put a route of its own (one that panics) behind the same stack.
pub fn with_edge(
    routes: Router<SharedState>,
    state: SharedState,
    request_timeout: Duration,
) -> Router {
    routes
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_BODY_BYTES,
        ))
        // Outside the size limit, so it wraps the body as it comes off the connection.
        .layer(from_fn_with_state(state.clone(), edge::body_deadline))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            edge::panic_response,
        ))
        .layer(from_fn_with_state(state.clone(), edge::guard))
        // Outside the guard, so preflights skip limits and credentials, and the guard's own
        // refusals (429, 503) still carry the headers a browser needs to read them.
        .layer(edge::cors(&state.cors_origins))
        .layer(from_fn_with_state(state.clone(), edge::edge))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(tower::util::MapRequestLayer::new(
            edge::drop_unsafe_request_id::<axum::body::Body>,
        ))
        .with_state(state)
}

pub use listener::{run, run_with, ListenerLimits};
