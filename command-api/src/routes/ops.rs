//! Operations endpoints (no auth): health, readiness, metrics, the service root.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::SandboxStatus;
use serde_json::json;

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

/// Prometheus text exposition. Pool gauges are refreshed from the stats shards (O(1)).
#[utoipa::path(get, path = "/metrics", tag = "Observability", responses((status = 200, description = "Prometheus text", body = String)))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
        .into_response()
}
