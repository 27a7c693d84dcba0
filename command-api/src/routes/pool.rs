//! Admin pool control: drain and resume allocation (for the whole pool or one name prefix), and
//! the pool's control state — drains in force and per-track quota usage.

use std::collections::{BTreeSet, HashMap};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::model::events::DrainEntry;
use domain::model::pool_control::DrainState;
use domain::{Actor, CommandMeta};
use serde::Serialize;
use utoipa::ToSchema;

use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// One drain in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct DrainView {
    /// The drained name prefix; `null`: the whole pool.
    pub prefix: Option<String>,
    /// Epoch seconds: when the drain began.
    pub since: i64,
    /// The operator's note.
    pub reason: Option<String>,
}

/// One track's quota and its use.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaView {
    /// Track name.
    pub track: String,
    /// Concurrent allocations allowed (`null`: unlimited).
    pub limit: Option<u32>,
    /// Live allocations holding a slot now (strongly consistent).
    pub in_use: usize,
}

/// The pool's control state.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolControlResponse {
    /// True while the whole pool is drained.
    pub drained: bool,
    /// Every drain in force (whole pool and prefixes).
    pub drains: Vec<DrainView>,
    /// Version of the pool-control stream (0: never drained).
    pub version: u64,
    /// How long other instances may keep accepting allocations after a drain, ms
    /// (`DRAIN_CACHE_MS`).
    pub drain_propagation_ms: u64,
    /// Quotas of the tracks named in `TRACK_QUOTAS` and in per-track credentials, and of the
    /// track asked for with `?track=`.
    pub quotas: Vec<QuotaView>,
    /// The limit of tracks not listed (`DEFAULT_TRACK_QUOTA`; `null`: unlimited).
    pub default_track_quota: Option<u32>,
}

/// The pool-control routes (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/pool", get(get_pool_control))
        .route("/admin/pool/drain", post(drain_pool))
        .route("/admin/pool/resume", post(resume_pool))
}

fn admin_meta(request_id: &RequestId) -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: Some(request_id.0.clone()),
        correlation_id: None,
    }
}

/// Only `allowed` query parameters, each checked as an identifier (`validate_id`: an empty or blank
/// one is a 400, not "absent").
fn query_ids(
    raw: &HashMap<String, String>,
    allowed: &[&'static str],
) -> Result<HashMap<&'static str, String>, ApiError> {
    if let Some(unknown) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::validation("query", unknown, "unknown parameter"));
    }
    let mut ids = HashMap::new();
    for name in allowed {
        // A parameter given is checked like any id (an empty or blank one is a 400, as the
        // document states), so `?prefix=` cannot silently mean "the whole pool".
        match raw.get(*name) {
            None => {}
            Some(value) => {
                let value = domain::model::ids::validate_id(name, value)
                    .map_err(|e| ApiError::validation("query", name, e.to_string()))?;
                ids.insert(*name, value);
            }
        }
    }
    Ok(ids)
}

async fn control_response(
    state: &SharedState,
    drain: DrainState,
    track: Option<String>,
) -> Result<PoolControlResponse, ApiError> {
    let config = state.broker.config();
    let mut tracks: BTreeSet<String> = config.quotas.per_track.keys().cloned().collect();
    tracks.extend(state.credentials.tracks().map(str::to_string));
    tracks.extend(track);
    let mut quotas = Vec::with_capacity(tracks.len());
    for track in tracks {
        let credential_limit = state.credentials.max_concurrent_of(&track);
        let limit = match (config.quotas.limit_for(&track), credential_limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let usage = state
            .broker
            .quota_usage(&track)
            .await
            .map_err(|e| ApiError::from_broker(e, ""))?;
        quotas.push(QuotaView {
            track,
            limit,
            in_use: usage.in_use(),
        });
    }
    Ok(PoolControlResponse {
        drained: drain.refusing(None).is_some(),
        drains: drain.drained.iter().map(drain_view).collect(),
        version: drain.version,
        drain_propagation_ms: u64::try_from(config.drain_cache_ttl.as_millis()).unwrap_or(u64::MAX),
        quotas,
        default_track_quota: config.quotas.default,
    })
}

fn drain_view(entry: &DrainEntry) -> DrainView {
    DrainView {
        prefix: entry.prefix.clone(),
        since: entry.since.timestamp(),
        reason: entry.reason.clone(),
    }
}

/// The pool's control state: drains in force and quota usage (strongly consistent).
#[utoipa::path(
    get, path = "/v1/admin/pool", tag = "Admin", security(("bearer" = [])),
    params(("track" = Option<String>, Query, example = "aws-intro", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Also report this track's quota usage; not blank, no control characters, at most 256 bytes (UTF-8)")),
    responses(
        (status = 200, description = "Drains and quotas", body = PoolControlResponse),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_pool_control(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<PoolControlResponse>, ApiError> {
    let mut ids = query_ids(&q, &["track"])?;
    let drain = state
        .broker
        .drain_state()
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?;
    Ok(Json(
        control_response(&state, drain, ids.remove("track")).await?,
    ))
}

/// Drain allocation: new allocations for the prefix (or, without one, the whole pool) answer 503
/// `MAINTENANCE`; replays and every other route keep working. Records `PoolDrained`; a repeat
/// records nothing.
#[utoipa::path(
    post, path = "/v1/admin/pool/drain", tag = "Admin", security(("bearer" = [])),
    params(
        ("prefix" = Option<String>, Query, example = "lab-eu-", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Drain only requests for names with this prefix; not blank, no control characters, at most 256 bytes (UTF-8), spaces around it ignored (400 `VALIDATION_ERROR` otherwise, and nothing is drained)"),
        ("reason" = Option<String>, Query, example = "CSP maintenance window", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Operator's note, kept in the event; not blank, no control characters, at most 256 bytes (UTF-8)"),
    ),
    responses(
        (status = 200, description = "Drained (or already drained): the control state", body = PoolControlResponse),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn drain_pool(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<PoolControlResponse>, ApiError> {
    let mut ids = query_ids(&q, &["prefix", "reason"])?;
    let drain = state
        .broker
        .drain(
            ids.remove("prefix"),
            ids.remove("reason"),
            &admin_meta(&request_id),
        )
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?;
    tracing::info!(target: "pool_control", drains = drain.drained.len(), "pool drain recorded");
    Ok(Json(control_response(&state, drain, None).await?))
}

/// Resume allocation for the prefix (or, without one, end the whole-pool drain). Records
/// `PoolResumed`; resuming what is not drained records nothing.
#[utoipa::path(
    post, path = "/v1/admin/pool/resume", tag = "Admin", security(("bearer" = [])),
    params(("prefix" = Option<String>, Query, example = "lab-eu-", min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "The drained prefix to resume; not blank, no control characters, at most 256 bytes (UTF-8), spaces around it ignored")),
    responses(
        (status = 200, description = "Resumed (or was not drained): the control state", body = PoolControlResponse),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn resume_pool(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<PoolControlResponse>, ApiError> {
    let mut ids = query_ids(&q, &["prefix"])?;
    let drain = state
        .broker
        .resume(ids.remove("prefix"), &admin_meta(&request_id))
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?;
    Ok(Json(control_response(&state, drain, None).await?))
}
