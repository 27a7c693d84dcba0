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
//!   log, latency metrics, panic guard (tower-http).
//! - [`auth`] — bearer tokens (constant time), principals, the rate limit after authentication,
//!   the `Caller` extractor.
//! - [`credentials`] — per-track credentials: prefixes, allocation cap, caller signatures.
//! - [`lease`] — the lease capability: tokens derived from the allocation, keys as credentials.
//! - [`routes`] — one router per resource: `sandboxes` (track), `admin`, `admin_jobs`, `webhooks`,
//!   `pool` (drain, resume, quotas), `ops`, `events` (the audit endpoints), `dashboard`.
//! - [`network`] — which addresses are public (webhook targets must be).
//! - [`live_feed`] — the live event stream: the feed tail, its broadcast and the per-client
//!   SSE session (over `Arc<dyn EventFeed>`, no concrete store).
//! - [`admin_jobs`] — long admin operations run in the background, recorded as events.
//! - [`webhooks`] — signed notifications to subscribers, delivered at least once from the feed.
//! - [`error`] — `ApiError` and the contract's error envelope.
//! - [`rate_limit`] — token buckets with bounded, sharded memory.
//! - [`readiness`] — the cached store check of `/readyz`.
//! - [`state`] — `AppState`, what every handler shares (imports no route module).
//! - [`metrics`] — Prometheus series (reference names kept).
//! - [`openapi`] — the generated OpenAPI document; Swagger UI is served from vendored assets.
//! - [`pool_alerts`] — per-prefix pool gauges and `POOL_LOW_WATER` alerts (checked in a loop).

pub mod admin_jobs;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod edge;
pub mod error;
pub mod lease;
pub mod live_feed;
pub mod metrics;
pub mod network;
pub mod openapi;
pub mod pool_alerts;
pub mod rate_limit;
pub mod readiness;
pub mod routes;
pub mod startup;
pub mod state;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::middleware::from_fn_with_state;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
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
        .route_layer(from_fn_with_state(state.clone(), auth::require_track));
    let admin = routes::admin::router()
        .merge(routes::admin_jobs::router())
        .merge(routes::webhooks::router())
        .merge(routes::events::router())
        .merge(routes::pool::router())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let docs = SwaggerUi::new(format!("{base}/docs")).url(
        format!("{base}/openapi.json"),
        openapi::ApiDoc::openapi().merge_from(routes::events::EventsApi::openapi()),
    );
    // Track and admin answers carry sandbox details (names, account paths): never kept by a
    // browser or a shared cache. A route that chose its own policy (the live stream) keeps it.
    let versioned = track
        .merge(admin)
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

/// Limits of the listener itself, below the router.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// A client must send the complete request headers within this (slow-loris guard).
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

impl ListenerLimits {
    /// The limits a configuration sets.
    pub fn from_config(config: &config::Config) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_sec.max(1)),
            max_connections: config.max_connections.max(1),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(app, listener, shutdown, ListenerLimits::default()).await
}

/// [`run`] with explicit listener limits. hyper is driven directly (rather than through
/// `axum::serve`) because only there can the header-read timeout be set: it needs a timer.
pub async fn run_with(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ListenerLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let max_connections = limits.max_connections.clamp(1, u32::MAX as usize);
    let connections = Arc::new(Semaphore::new(max_connections));
    let (closing, _) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(target: "listener", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req
                });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let mut closing = closing.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(edge::HTTP1_READ_BUFFER_BYTES)
                .max_headers(edge::HTTP1_MAX_HEADERS);
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection task holds a permit until it ends: having them all back means drained.
    let _ = connections.acquire_many(max_connections as u32).await;
    Ok(())
}
