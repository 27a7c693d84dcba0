//! `POST /sandboxes/{sandbox_id}/heartbeat`: the lab tells the broker it is still alive (ADR
//! 0030). Same ownership and lease-token rules as the other per-sandbox routes. A heartbeat is
//! recorded as a last-seen time outside the event log ([`domain::heartbeat::HeartbeatBook`]);
//! the reclaim job reads it.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Extension, Json, Router};
use chrono::Duration;
use domain::model::events::format_time;
use domain::{SandboxStatus, StoreError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Principal};
use crate::error::{ApiError, ErrorBody};
use crate::openapi::EdgeResponses;
use crate::routes::sandbox_ref::{resolve_sandbox_id, Visibility};
use crate::routes::sandboxes::{check_sandbox_access, lease_header_in_bounds};
use crate::state::SharedState;

/// Body of an accepted heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// When this heartbeat was recorded (RFC 3339).
    pub last_heartbeat_at: String,
    /// True when the allocation's track opted in: missing heartbeats then ends the allocation.
    pub heartbeats_required: bool,
    /// The interval the track declared (seconds); `null` when it did not opt in.
    pub heartbeat_interval_s: Option<u32>,
    /// How long heartbeats may be missed (seconds); `null` when the track did not opt in.
    pub heartbeat_grace_s: Option<u32>,
    /// When the sandbox is reclaimed if no further heartbeat comes (RFC 3339); `null` when the
    /// track did not opt in.
    pub reclaim_after: Option<String>,
}

/// The heartbeat route (the track auth layer is applied by the caller).
pub fn router() -> Router<SharedState> {
    Router::new().route("/sandboxes/{sandbox_id}/heartbeat", post(send_heartbeat))
}

/// The OpenAPI description of the heartbeat route (merged into the API's document).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(send_heartbeat),
    components(schemas(HeartbeatResponse)),
    modifiers(&EdgeResponses)
)]
pub struct HeartbeatApi;

/// Tell the broker the lab holding this sandbox is alive.
#[utoipa::path(
    post, path = "/v1/sandboxes/{sandbox_id}/heartbeat", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Instruqt-Sandbox-ID" = Option<String>, Header, example = "student-42", description = "The student who holds the sandbox; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("X-Lease-Token" = Option<String>, Header, description = "The `lease_token` of the allocation's 201: required with a per-track credential, and with the shared token when `REQUIRE_LEASE_TOKEN=true`", max_length = 256),
    ),
    responses(
        (status = 200, description = "Recorded", body = HeartbeatResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's allocation; `INVALID_CALLER_SIGNATURE`; `LEASE_TOKEN_REQUIRED` / `LEASE_TOKEN_INVALID`", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "`INVALID_STATE`: the allocation has ended (released, expired or reclaimed); stop sending heartbeats", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn send_heartbeat(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    Path(sandbox_id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    lease_header_in_bounds(&headers)?;
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Owner(&caller.0)).await?;
    check_sandbox_access(&state, &principal, &sandbox_id, &headers).await?;
    let sandbox = state
        .broker
        .get_sandbox(&sandbox_id, &caller.0)
        .await
        .map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    let received = &state.jobs.metrics().heartbeat.received;
    if sandbox.status != Some(SandboxStatus::Allocated) {
        received.with_label_values(&["ended"]).inc();
        return Err(ApiError::invalid_state(format!(
            "the allocation of sandbox {sandbox_id} has ended (released, expired or reclaimed); \
             stop sending heartbeats for it, and allocate a new sandbox to start another lab"
        )));
    }
    let book = state.jobs.heartbeats().ok_or_else(|| {
        ApiError::from(StoreError::Unavailable(
            "heartbeats are not recorded by this process".into(),
        ))
    })?;
    let now = state.broker.clock().now();
    book.record(&sandbox_id, now).await?;
    let required = sandbox.heartbeat_grace_s.is_some();
    received
        .with_label_values(&[if required { "accepted" } else { "not_opted_in" }])
        .inc();
    Ok(Json(HeartbeatResponse {
        sandbox_id,
        last_heartbeat_at: format_time(&now),
        heartbeats_required: required,
        heartbeat_interval_s: sandbox.heartbeat_interval_s,
        heartbeat_grace_s: sandbox.heartbeat_grace_s,
        reclaim_after: sandbox
            .heartbeat_grace_s
            .map(|g| format_time(&(now + Duration::seconds(i64::from(g))))),
    }))
}
