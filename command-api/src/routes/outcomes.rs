//! `GET {base}/admin/outcomes`: the allocation outcomes this instance answered since it started,
//! in total and per minute over the last hour (see [`crate::outcomes`]). The dashboard's
//! "Allocation outcomes" chart reads it.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// Allocation outcomes of this instance.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutcomesResponse {
    /// When this instance began counting: its start (RFC 3339).
    pub since: String,
    /// The server's time (RFC 3339).
    pub now: String,
    /// Answers of `POST /allocate` by outcome since `since`, every outcome present:
    /// `success` (201), `idempotent` (200, a replay), `no_sandboxes` (409), `unknown_prefix`
    /// (404), `quota_exceeded`, `caller_limit`, `address_limit` (429), `maintenance` (503, drained)
    /// and `error` (any other failure).
    pub totals: BTreeMap<String, u64>,
    /// Requests of any route refused by a rate limit since `since` (429 `RATE_LIMIT_EXCEEDED`):
    /// they are refused before the broker could tell an allocation from another call.
    pub rate_limited: u64,
    /// The minutes of the last hour that counted something, oldest first.
    pub per_minute: Vec<OutcomeMinuteView>,
}

/// One minute of [`OutcomesResponse`].
#[derive(Debug, Serialize, ToSchema)]
pub struct OutcomeMinuteView {
    /// The minute's start (RFC 3339).
    pub minute: String,
    /// Answers by outcome in that minute (only the outcomes that occurred).
    pub counts: BTreeMap<String, u64>,
    /// Requests refused by a rate limit in that minute.
    pub rate_limited: u64,
}

/// The outcomes route (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new().route("/admin/outcomes", get(get_outcomes))
}

fn rfc3339(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Allocation outcomes this instance answered since it started, and per minute.
#[utoipa::path(
    get, path = "/v1/admin/outcomes", tag = "Admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "Counts since this instance started (per instance: behind a load balancer, the one that answered)", body = OutcomesResponse),
        (status = 400, description = "A query parameter (this route takes none)", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    )
)]
pub async fn get_outcomes(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<OutcomesResponse>, ApiError> {
    if let Some(unknown) = q.keys().next() {
        return Err(ApiError::validation("query", unknown, "unknown parameter"));
    }
    let read = state.outcomes.snapshot();
    Ok(Json(OutcomesResponse {
        since: rfc3339(&read.since),
        now: rfc3339(&read.now),
        totals: read.totals,
        rate_limited: read.rate_limited,
        per_minute: read
            .per_minute
            .into_iter()
            .map(|m| OutcomeMinuteView {
                minute: rfc3339(&m.minute),
                counts: m.counts,
                rate_limited: m.rate_limited,
            })
            .collect(),
    }))
}
