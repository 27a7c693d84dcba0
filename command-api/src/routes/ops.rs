//! Operations endpoints (no auth): health, readiness, metrics, the service root.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::SandboxStatus;
use serde_json::json;

use crate::error::ApiError;
pub use crate::readiness::ReadinessCache;
use crate::state::SharedState;

/// The operations routes.
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/", get(service_root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Service name, version and where the docs and the operator dashboard are.
#[utoipa::path(get, path = "/", tag = "Observability", responses((status = 200, description = "Service info", body = Object)))]
pub async fn service_root(State(state): State<SharedState>) -> Json<serde_json::Value> {
    Json(json!({
        "service": "Sandbox Broker API",
        "version": env!("CARGO_PKG_VERSION"),
        "docs": format!("{}/docs", state.base_path),
        "openapi": format!("{}/openapi.json", state.base_path),
        "dashboard": "/dashboard",
    }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "Observability", responses((status = 200, description = "Alive", body = Object)))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "healthy", "timestamp": chrono::Utc::now().timestamp()}))
}

/// Readiness: the store answers and the in-process projector is not too far behind. The body
/// says only which check failed; the cause is logged.
#[utoipa::path(get, path = "/readyz", tag = "Observability", responses(
    (status = 200, description = "Ready", body = Object),
    (status = 503, description = "Not ready; `checks` names the failing check (`unavailable`, `lagging`), never its cause", body = Object)))]
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let store_ok = state
        .readiness
        .store_ok(state.broker.events().as_ref())
        .await;
    let projector = match &state.projector_metrics {
        Some(m) => {
            let lag = m.last_lag_ms();
            if lag > state.ready_max_lag_ms {
                tracing::warn!(target: "readiness", lag_ms = lag, max_ms = state.ready_max_lag_ms, "projector lagging");
                "lagging"
            } else {
                "ok"
            }
        }
        None => "external",
    };
    let ready = store_ok && projector != "lagging";
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "timestamp": chrono::Utc::now().timestamp(),
        "checks": {"store": if store_ok { "ok" } else { "unavailable" }, "projector": projector},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text exposition. The pool gauges are read from the store (the stats shards, the
/// per-prefix counters, the drain state) at most once per `METRICS_CACHE_MS`; every other series
/// lives in memory. With `METRICS_TOKEN` set, the scrape must send it as a bearer token.
#[utoipa::path(get, path = "/metrics", tag = "Observability", responses(
    (status = 200, description = "Prometheus text", body = String),
    (status = 401, description = "`METRICS_TOKEN` is configured and the request did not send it", body = crate::error::ErrorBody)))]
pub async fn metrics(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(crate::auth::bearer_token);
        if !sent.is_some_and(|token| crate::rotation::equal(token, expected.expose())) {
            let mut refused = ApiError::unauthorized(
                "/metrics needs the metrics token: send `Authorization: Bearer <METRICS_TOKEN>`",
            )
            .into_response();
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
            return refused;
        }
    }
    let now = state.broker.clock().now();
    state
        .metrics_cache
        .refresh_if_stale(now, refresh_pool_gauges(&state))
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
        .into_response()
}

/// Reads the pool gauges from the store: the stats shards (O(1) in the pool size), the
/// per-prefix counters and the drains in force.
async fn refresh_pool_gauges(state: &SharedState) {
    if let Ok(stats) = state.broker.view().stats().await {
        for status in SandboxStatus::ALL {
            state
                .metrics
                .pool
                .with_label_values(&[status.as_str()])
                .set(stats.get(status));
        }
        state
            .metrics
            .pool
            .with_label_values(&["total"])
            .set(stats.total());
    }
    if let Ok(by_prefix) = state.broker.view().stats_by_prefix().await {
        state.pool_alerts.observe(&by_prefix);
    }
    if let Ok(drain) = state.broker.drain_state().await {
        state.pool_alerts.observe_drains(&drain);
    }
}
