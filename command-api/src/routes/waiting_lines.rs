//! `GET /v1/admin/waiting-lines`: the waiting lines of the instance that answers (each API
//! instance keeps its own; the dashboard shows them).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ErrorBody;
use crate::state::SharedState;

/// One line of this instance.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingLineView {
    /// The track it is for (empty: none named).
    pub track: String,
    /// The name prefix it is for (empty: any name).
    pub prefix: String,
    /// Requests and tickets waiting in it.
    pub waiting: u64,
}

/// The waiting lines of the answering instance.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingLinesResponse {
    /// Non-empty lines, longest first.
    pub lines: Vec<WaitingLineView>,
    /// Requests and tickets waiting on this instance, all lines together.
    pub waiting: u64,
}

/// The admin route (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new().route("/admin/waiting-lines", get(list_waiting_lines))
}

/// The waiting lines of this instance (`Prefer: wait` requests and tickets).
#[utoipa::path(
    get, path = "/v1/admin/waiting-lines", tag = "Admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "This instance's lines (another instance behind the load balancer has its own)", body = WaitingLinesResponse),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    )
)]
pub async fn list_waiting_lines(State(state): State<SharedState>) -> Json<WaitingLinesResponse> {
    let mut lines: Vec<WaitingLineView> = state
        .waiting_line
        .lengths()
        .into_iter()
        .map(|(key, n)| WaitingLineView {
            track: key.track.unwrap_or_default(),
            prefix: key.prefix.unwrap_or_default(),
            waiting: n as u64,
        })
        .collect();
    lines.sort_by(|a, b| {
        b.waiting
            .cmp(&a.waiting)
            .then_with(|| (&a.track, &a.prefix).cmp(&(&b.track, &b.prefix)))
    });
    let waiting = lines.iter().map(|l| l.waiting).sum();
    Json(WaitingLinesResponse { lines, waiting })
}
