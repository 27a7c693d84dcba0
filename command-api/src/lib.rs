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
//! - [`edge`] — the outermost middleware: request id, error envelope, security headers, CORS,
//!   rate limit, access log, latency metrics, panic guard.
//! - [`auth`] — bearer tokens (constant time), the `Caller` extractor.
//! - [`routes`] — one router per resource: `sandboxes` (track), `admin`, `ops`.
//! - [`error`] — `ApiError` and the contract's error envelope.
//! - [`rate_limit`] — bounded per-caller token buckets.
//! - [`metrics`] — Prometheus series (reference names kept).
//! - [`openapi`] — the generated OpenAPI document; Swagger UI is served from vendored assets.

pub mod auth;
pub mod config;
pub mod edge;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod rate_limit;
pub mod routes;
pub mod startup;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::middleware::from_fn_with_state;
use axum::Router;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::ApiError;
use crate::state::SharedState;

/// Largest request body accepted (no endpoint reads a body; this only bounds what is buffered).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The complete router with every layer, ready to serve.
pub fn app(state: SharedState, request_timeout: Duration) -> Router {
    let base = state.base_path.clone();
    let track = routes::sandboxes::router()
        .route_layer(from_fn_with_state(state.clone(), auth::require_track));
    let admin = routes::admin::router()
        .merge(routes::events::router())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let docs = SwaggerUi::new(format!("{base}/docs")).url(
        format!("{base}/openapi.json"),
        openapi::ApiDoc::openapi().merge_from(routes::events::EventsApi::openapi()),
    );
    Router::new()
        .nest(&base, track.merge(admin))
        .merge(routes::ops::router())
        .merge(routes::dashboard::router())
        .merge(docs)
        .fallback(|| async { ApiError::from_status(axum::http::StatusCode::NOT_FOUND) })
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_BODY_BYTES,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(from_fn_with_state(state.clone(), edge::edge))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
