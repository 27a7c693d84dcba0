//! Reservations and capacity answers (ADR 0028): `POST/GET /v1/admin/reservations`,
//! `GET/DELETE /v1/admin/reservations/{reservation_id}` for operators, and `GET /v1/capacity`
//! for a track (its own track) or an operator (any track).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use domain::model::events::{format_time, OverflowPolicy};
use domain::model::ids::validate_id;
use domain::model::reservation::{runs_dry_at, CapacityFigures, ReservationPhase, ReservationSpec};
use domain::service::{ReservationError, ReservationStatus};
use domain::{Actor, CommandMeta};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// What an operator sends to reserve sandboxes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReservationRequest {
    /// The track whose students the sandboxes are for: the allocation's track (a per-track
    /// credential's track, or `X-Instruqt-Track-ID` under the shared token).
    #[schema(
        example = "dns-workshop",
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub track: String,
    /// How many sandboxes: 1 to `RESERVATION_MAX_COUNT` (the document states its default, 5,000).
    #[schema(value_type = u32, example = 300, minimum = 1, maximum = 5000)]
    #[serde(deserialize_with = "whole_number")]
    pub count: u32,
    /// Only sandboxes whose name starts with this.
    #[schema(
        example = "lab-eu-",
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub prefix: Option<String>,
    /// When the window opens (RFC 3339).
    #[schema(example = "2026-12-08T09:00:00Z", format = DateTime)]
    pub starts_at: String,
    /// When it closes (RFC 3339); unused earmarks return to the pool then.
    #[schema(example = "2026-12-08T13:00:00Z", format = DateTime)]
    pub ends_at: String,
    /// `open_pool` (the track's students go on to the open pool once the reservation is used
    /// up) or `reservation_only`; default `RESERVATION_DEFAULT_OVERFLOW`.
    #[schema(
        example = "open_pool",
        pattern = r"^\s*(open_pool|reservation_only)?\s*$"
    )]
    pub overflow: Option<String>,
    /// A note for other operators.
    #[schema(max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    pub note: Option<String>,
}

/// A JSON number without a fraction as a `u32`: JSON does not tell 300 from 300.0.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_u64()
        .or_else(|| {
            number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
                .map(|f| f as u64)
        })
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| serde::de::Error::custom("count must be a whole number"))
}

/// One reservation and what its earmarks are now.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationView {
    /// The reservation's id.
    pub reservation_id: String,
    /// The track it is for.
    pub track: String,
    /// Sandboxes reserved.
    pub count: u32,
    /// Name prefix, if any.
    pub prefix: Option<String>,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339.
    pub ends_at: String,
    /// RFC 3339: when earmarking begins (`starts_at` less the lead time).
    pub earmark_from: String,
    /// `open_pool` or `reservation_only`.
    pub overflow: String,
    /// `scheduled`, `earmarking`, `open`, `cancelled` or `ended`.
    pub state: String,
    /// Earmarked and still free: waiting for the track's students.
    pub free: u32,
    /// Earmarked sandboxes allocated to the track.
    pub used: u32,
    /// Earmarked sandboxes lost before use (stale, deleted); the job tops them up.
    pub lost: u32,
    /// Earmarked now (free + used).
    pub earmarked: u32,
    /// Sandboxes the reservation lacks (count − earmarked) while it is earmarking or open;
    /// 0 before earmarking begins and once closed.
    pub shortfall: u32,
    /// The note, if any.
    pub note: Option<String>,
    /// RFC 3339.
    pub created_at: Option<String>,
}

impl ReservationView {
    fn of(status: &ReservationStatus, now: DateTime<Utc>) -> Self {
        let r = &status.reservation;
        let usage = status.usage;
        let phase = r.phase(now);
        let shortfall = match phase {
            ReservationPhase::Earmarking | ReservationPhase::Open => usage.missing(r.count),
            _ => 0,
        };
        let time = |t: Option<DateTime<Utc>>| t.map(|t| format_time(&t)).unwrap_or_default();
        Self {
            reservation_id: r.reservation_id.clone(),
            track: r.track.clone(),
            count: r.count,
            prefix: r.prefix.clone(),
            starts_at: time(r.starts_at),
            ends_at: time(r.ends_at),
            earmark_from: time(r.earmark_from),
            overflow: overflow_name(r.overflow.unwrap_or(OverflowPolicy::OpenPool)).into(),
            state: phase.as_str().into(),
            free: usage.free,
            used: usage.used,
            lost: usage.lost,
            earmarked: usage.free + usage.used,
            shortfall,
            note: r.note.clone(),
            created_at: r.created_at.map(|t| format_time(&t)),
        }
    }
}

/// The numbers behind a capacity answer. `available_now`, `reserved_for_track` and
/// `reserved_for_others` are facts read now; `expected_registrations` and
/// `expected_allocations` are forecasts from the log's history, never a guarantee.
#[derive(Debug, Serialize, ToSchema)]
pub struct CapacityNumbers {
    /// Students asked about.
    pub count: u32,
    /// Available now (matching the prefix) and earmarked for no reservation.
    pub available_now: u32,
    /// Earmarked now for this track and still free.
    pub reserved_for_track: u32,
    /// What other tracks' reservations in force at the time still need beyond their earmarks.
    pub reserved_for_others: u32,
    /// Forecast: registrations sync is expected to add by the time asked about.
    pub expected_registrations: u32,
    /// Forecast: open-pool allocations expected by then at the last hour's rate.
    pub expected_allocations: u32,
    /// Fact: sandboxes this track can count on now (`available_now + reserved_for_track −
    /// reserved_for_others`).
    pub guaranteed: u32,
    /// Forecast for the time asked about (`guaranteed − expected_allocations +
    /// expected_registrations`, the track's own earmarks untouched).
    pub forecast: u32,
    /// Students short by the guaranteed figure.
    pub shortfall_now: u32,
    /// Students short by the forecast.
    pub shortfall_forecast: u32,
}

impl From<CapacityFigures> for CapacityNumbers {
    fn from(f: CapacityFigures) -> Self {
        Self {
            count: f.count,
            available_now: f.available_now,
            reserved_for_track: f.reserved_for_track,
            reserved_for_others: f.reserved_for_others,
            expected_registrations: f.expected_registrations,
            expected_allocations: f.expected_allocations,
            guaranteed: f.guaranteed(),
            forecast: f.forecast(),
            shortfall_now: f.shortfall_now(),
            shortfall_forecast: f.shortfall_forecast(),
        }
    }
}

/// The answer to a creation: the reservation and the numbers it was accepted on.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationCreated {
    /// The reservation (earmarked at once when its lead time has begun).
    pub reservation: ReservationView,
    /// The capacity figures at creation.
    pub capacity: CapacityNumbers,
    /// True when sandboxes free now cover the reservation; false when the forecast is needed
    /// to cover it (registrations expected by the time earmarking begins).
    pub guaranteed: bool,
}

/// Reservations, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationList {
    /// The reservations.
    pub reservations: Vec<ReservationView>,
    /// How many.
    pub count: usize,
}

/// One prefix's run-dry forecast.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrefixForecast {
    /// The prefix asked about (empty: the whole pool).
    pub prefix: String,
    /// Available and earmarked for nobody, now.
    pub available_now: u32,
    /// Allocations in the last hour (a lower bound of the rate).
    pub allocations_per_hour: f64,
    /// RFC 3339: when the open pool is empty at that rate without new registrations; absent
    /// when nothing is being allocated.
    pub runs_dry_at: Option<String>,
}

/// Whether `count` students can start now or at `at`, and the numbers behind it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CapacityAnswer {
    /// The track asked about (per-track credentials: their own).
    pub track: Option<String>,
    /// The prefix asked about.
    pub prefix: Option<String>,
    /// RFC 3339: the time asked about (now when not given).
    pub at: String,
    /// True when the guaranteed figure covers `count` (facts only).
    pub can_start_guaranteed: bool,
    /// True when the forecast for `at` covers `count` (facts and forecasts).
    pub can_start_forecast: bool,
    /// The numbers.
    pub numbers: CapacityNumbers,
    /// When the prefix's open pool runs dry at the current allocation rate.
    pub runs_dry: PrefixForecast,
}

/// Operators' reservation routes (the admin auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route(
            "/admin/reservations",
            get(list_reservations).post(create_reservation),
        )
        .route(
            "/admin/reservations/{reservation_id}",
            get(get_reservation).delete(cancel_reservation),
        )
}

/// The capacity route (track or admin auth is layered on by the caller).
pub fn capacity_router() -> Router<SharedState> {
    Router::new().route("/capacity", get(get_capacity))
}

fn admin_meta(request_id: &RequestId) -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: Some(request_id.0.clone()),
        correlation_id: None,
    }
}

fn overflow_name(policy: OverflowPolicy) -> &'static str {
    match policy {
        OverflowPolicy::OpenPool => "open_pool",
        OverflowPolicy::ReservationOnly => "reservation_only",
    }
}

fn parse_time(location: &str, field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::validation(
                location,
                field,
                "must be an RFC 3339 time, e.g. 2026-12-08T09:00:00Z",
            )
        })
}

/// Maps a reservation refusal to its answer.
fn reservation_error(e: ReservationError) -> ApiError {
    match e {
        ReservationError::Broker(e) => ApiError::from_broker(e, ""),
        ReservationError::Invalid(invalid) => {
            let field = match invalid {
                domain::model::reservation::ReservationInvalid::Count { .. } => "count",
                domain::model::reservation::ReservationInvalid::TooFarAhead { .. } => "starts_at",
                _ => "ends_at",
            };
            ApiError::validation("body", field, invalid.to_string())
        }
        ReservationError::UnknownPrefix { prefix } => ApiError::validation(
            "body",
            "prefix",
            format!("no sandbox name starts with '{prefix}'; check the prefix against GET /v1/admin/stats"),
        ),
        ReservationError::WritesOff => ApiError::reservations_off(),
        ReservationError::NotFound { reservation_id } => {
            ApiError::reservation_not_found(&reservation_id)
        }
        ReservationError::InsufficientCapacity(figures) => ApiError::insufficient_capacity(
            figures.shortfall_forecast().max(figures.shortfall_now()),
            &[
                ("count", figures.count),
                ("available_now", figures.available_now),
                ("reserved_for_track", figures.reserved_for_track),
                ("reserved_for_others", figures.reserved_for_others),
                ("expected_registrations", figures.expected_registrations),
                ("expected_allocations", figures.expected_allocations),
                ("guaranteed", figures.guaranteed()),
                ("forecast", figures.forecast()),
            ],
        ),
    }
}

/// Reserve sandboxes for a track over a time window. Answers at once whether the window can be
/// honoured: what is free now (earmarked for nobody, matching the prefix), less what other
/// reservations overlapping the window still need, and — as a forecast — the registrations
/// and allocations the log's history says to expect by the time earmarking begins. Inside the
/// lead time the sandboxes are earmarked at once and only what is free now counts.
#[utoipa::path(
    post, path = "/v1/admin/reservations", tag = "Admin", security(("bearer" = [])),
    request_body(content = CreateReservationRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Reserved (earmarked at once inside the lead time)", body = ReservationCreated),
        (status = 400, description = "`VALIDATION_ERROR`: malformed body, a window in the past or ending before it starts, a count or window beyond the limits, a prefix no sandbox has", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 409, description = "`INSUFFICIENT_CAPACITY`: the pool cannot honour the window; `details` holds the shortfall and the numbers behind it (`location` `capacity`, `field` the figure, `problem` its value); `RESERVATIONS_DISABLED`: `WRITE_EVENTS_RESERVATIONS` is off", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn create_reservation(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: CreateReservationRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::validation(
            "body",
            "reservation",
            format!(
                "the body must be a JSON object with track, count, starts_at and ends_at ({})",
                crate::config::json_problem(&e)
            ),
        )
    })?;
    let settings = state.jobs.config().reservations.settings();
    let track = validate_id("track", &request.track)
        .map_err(|e| ApiError::validation("body", "track", e.to_string()))?;
    let prefix = match request.prefix.as_deref() {
        Some(p) if !p.trim().is_empty() => Some(
            validate_id("prefix", p)
                .map_err(|e| ApiError::validation("body", "prefix", e.to_string()))?,
        ),
        _ => None,
    };
    let note = match request.note.as_deref() {
        Some(n) if !n.trim().is_empty() => Some(
            validate_id("note", n)
                .map_err(|e| ApiError::validation("body", "note", e.to_string()))?,
        ),
        _ => None,
    };
    let overflow = match request.overflow.as_deref().map(str::trim) {
        None | Some("") => settings.default_overflow,
        Some("open_pool") => OverflowPolicy::OpenPool,
        Some("reservation_only") => OverflowPolicy::ReservationOnly,
        Some(_) => {
            return Err(ApiError::validation(
                "body",
                "overflow",
                "must be open_pool or reservation_only",
            ))
        }
    };
    let spec = ReservationSpec {
        track,
        count: request.count,
        prefix,
        starts_at: parse_time("body", "starts_at", &request.starts_at)?,
        ends_at: parse_time("body", "ends_at", &request.ends_at)?,
        overflow,
        note,
    };
    let (status, figures) = state
        .broker
        .create_reservation(&spec, &settings, &admin_meta(&request_id))
        .await
        .map_err(reservation_error)?;
    let now = state.broker.clock().now();
    tracing::info!(
        target: "reservations",
        reservation = %status.reservation.reservation_id,
        track = %status.reservation.track,
        count = status.reservation.count,
        "reservation created"
    );
    let body = ReservationCreated {
        reservation: ReservationView::of(&status, now),
        guaranteed: figures.shortfall_now() == 0,
        capacity: figures.into(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Reservations, oldest first, optionally only one track's or those in one state.
#[utoipa::path(
    get, path = "/v1/admin/reservations", tag = "Admin", security(("bearer" = [])),
    params(
        ("track" = Option<String>, Query, example = "dns-workshop", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only this track's reservations; not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("state" = Option<String>, Query, example = "open", pattern = "^(scheduled|earmarking|open|cancelled|ended|active)$", description = "Only reservations in this state: scheduled, earmarking, open, cancelled, ended, or active (scheduled, earmarking or open)"),
    ),
    responses(
        (status = 200, description = "Reservations", body = ReservationList),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_reservations(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ReservationList>, ApiError> {
    if let Some(unknown) = q.keys().find(|k| !["track", "state"].contains(&k.as_str())) {
        return Err(ApiError::validation("query", unknown, "unknown parameter"));
    }
    let track = q
        .get("track")
        .map(|t| validate_id("track", t))
        .transpose()
        .map_err(|e| ApiError::validation("query", "track", e.to_string()))?;
    const STATES: [&str; 6] = [
        "scheduled",
        "earmarking",
        "open",
        "cancelled",
        "ended",
        "active",
    ];
    let wanted = match q.get("state").map(|s| s.trim()) {
        None => None,
        Some(s) if STATES.contains(&s) => Some(s.to_string()),
        Some(_) => {
            return Err(ApiError::validation(
                "query",
                "state",
                "must be one of scheduled, earmarking, open, cancelled, ended, active",
            ))
        }
    };
    let now = state.broker.clock().now();
    let mut views = Vec::new();
    for reservation in state
        .broker
        .list_reservations()
        .await
        .map_err(reservation_error)?
    {
        if track.as_deref().is_some_and(|t| t != reservation.track) {
            continue;
        }
        let phase = reservation.phase(now);
        let keep = match wanted.as_deref() {
            None => true,
            Some("active") => matches!(
                phase,
                ReservationPhase::Scheduled | ReservationPhase::Earmarking | ReservationPhase::Open
            ),
            Some(s) => s == phase.as_str(),
        };
        if !keep {
            continue;
        }
        let usage = state
            .broker
            .earmark_usage(&reservation)
            .await
            .map_err(|e| ApiError::from_broker(e, ""))?;
        views.push(ReservationView::of(
            &ReservationStatus { reservation, usage },
            now,
        ));
    }
    Ok(Json(ReservationList {
        count: views.len(),
        reservations: views,
    }))
}

/// One reservation: its window, state and what its earmarks are now.
#[utoipa::path(
    get, path = "/v1/admin/reservations/{reservation_id}", tag = "Admin", security(("bearer" = [])),
    params(("reservation_id" = String, Path, example = "0190f6c27b3a7d4e9f102b3c4d5e6f70", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "The id from the creation's answer; not blank, no control characters, at most 256 bytes (UTF-8)")),
    responses(
        (status = 200, description = "The reservation", body = ReservationView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "`RESERVATION_NOT_FOUND`", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_reservation(
    State(state): State<SharedState>,
    Path(reservation_id): Path<String>,
) -> Result<Json<ReservationView>, ApiError> {
    let id = validate_id("reservation_id", &reservation_id)
        .map_err(|e| ApiError::validation("path", "reservation_id", e.to_string()))?;
    let status = state
        .broker
        .reservation_status(&id)
        .await
        .map_err(reservation_error)?;
    Ok(Json(ReservationView::of(
        &status,
        state.broker.clock().now(),
    )))
}

/// Cancel a reservation: its unused earmarks return to the pool at once (`SandboxUnreserved`),
/// used ones stay with their students. Cancelling a closed reservation changes nothing.
#[utoipa::path(
    delete, path = "/v1/admin/reservations/{reservation_id}", tag = "Admin", security(("bearer" = [])),
    params(("reservation_id" = String, Path, example = "0190f6c27b3a7d4e9f102b3c4d5e6f70", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "The id from the creation's answer; not blank, no control characters, at most 256 bytes (UTF-8)")),
    responses(
        (status = 200, description = "Cancelled (or already closed): the reservation, which stays readable (`GET` answers it in state `cancelled`)", body = ReservationView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "`RESERVATION_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`RESERVATIONS_DISABLED`: `WRITE_EVENTS_RESERVATIONS` is off", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn cancel_reservation(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Path(reservation_id): Path<String>,
) -> Result<Json<ReservationView>, ApiError> {
    let id = validate_id("reservation_id", &reservation_id)
        .map_err(|e| ApiError::validation("path", "reservation_id", e.to_string()))?;
    let settings = state.jobs.config().reservations.settings();
    let status = state
        .broker
        .cancel_reservation(&id, &settings, &admin_meta(&request_id))
        .await
        .map_err(reservation_error)?;
    tracing::info!(target: "reservations", reservation = %id, "reservation cancelled");
    Ok(Json(ReservationView::of(
        &status,
        state.broker.clock().now(),
    )))
}

/// Whether `count` students of a track can start now or at `at`, with the numbers behind it,
/// and when the prefix's open pool runs dry at the current allocation rate. A track token
/// asks for its own track (a per-track credential's; the shared token names one); the admin
/// token for any track or none.
#[utoipa::path(
    get, path = "/v1/capacity", tag = "Sandboxes", security(("bearer" = [])),
    params(
        ("track" = Option<String>, Query, example = "dns-workshop", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "The track; a per-track credential may name only its own (default: its own); not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("prefix" = Option<String>, Query, example = "lab-eu-", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$", description = "Only sandboxes whose name starts with this; not blank, no control characters, at most 256 bytes (UTF-8)"),
        ("count" = Option<u32>, Query, example = 300, minimum = 1, maximum = 100000, description = "Students (default 1)"),
        ("at" = Option<String>, Query, format = DateTime, example = "2026-12-08T09:00:00Z", description = "RFC 3339 time the students start (default now; a past time means now)"),
    ),
    responses(
        (status = 200, description = "The answer and its numbers", body = CapacityAnswer),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "A per-track credential asked about another track", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_capacity(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CapacityAnswer>, ApiError> {
    if let Some(unknown) = q
        .keys()
        .find(|k| !["track", "prefix", "count", "at"].contains(&k.as_str()))
    {
        return Err(ApiError::validation("query", unknown, "unknown parameter"));
    }
    let id = |name: &'static str| {
        q.get(name)
            .map(|v| validate_id(name, v))
            .transpose()
            .map_err(|e| ApiError::validation("query", name, e.to_string()))
    };
    let mut track = id("track")?;
    let prefix = id("prefix")?;
    if let Principal::Track(credential) = &principal {
        match &track {
            Some(t) if *t != credential.track => {
                return Err(ApiError::forbidden(
                    "A track credential may ask only about its own track; leave out track or use the admin token",
                ))
            }
            _ => track = Some(credential.track.clone()),
        }
    }
    let count = match q.get("count") {
        None => 1,
        Some(raw) => match raw.trim().parse::<u32>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                return Err(ApiError::validation(
                    "query",
                    "count",
                    "must be a whole number from 1 to 100000",
                ))
            }
        },
    };
    let now = state.broker.clock().now();
    let at = match q.get("at") {
        None => now,
        Some(raw) => parse_time("query", "at", raw)?.max(now),
    };
    let settings = state.jobs.config().reservations.settings();
    let figures = state
        .broker
        .capacity_figures(
            track.as_deref(),
            prefix.as_deref(),
            count,
            at,
            (at, at + chrono::Duration::milliseconds(1)),
            &settings,
        )
        .await
        .map_err(reservation_error)?;
    let rate = state
        .broker
        .allocation_rate(prefix.as_deref())
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?;
    let runs_dry = PrefixForecast {
        prefix: prefix.clone().unwrap_or_default(),
        available_now: figures.available_now,
        allocations_per_hour: rate,
        runs_dry_at: runs_dry_at(u64::from(figures.available_now), rate, now)
            .map(|t| format_time(&t)),
    };
    Ok(Json(CapacityAnswer {
        track,
        prefix,
        at: format_time(&at),
        can_start_guaranteed: figures.shortfall_now() == 0,
        can_start_forecast: figures.shortfall_forecast() == 0,
        numbers: figures.into(),
        runs_dry,
    }))
}

/// The reservations not yet closed, with their earmarks' usage (the admin stats and the
/// dashboard show them).
pub(crate) async fn active_views(state: &SharedState) -> Result<Vec<ReservationView>, ApiError> {
    let now = state.broker.clock().now();
    let mut views = Vec::new();
    for reservation in state
        .broker
        .list_reservations()
        .await
        .map_err(reservation_error)?
    {
        if !matches!(
            reservation.phase(now),
            ReservationPhase::Scheduled | ReservationPhase::Earmarking | ReservationPhase::Open
        ) {
            continue;
        }
        let usage = state
            .broker
            .earmark_usage(&reservation)
            .await
            .map_err(|e| ApiError::from_broker(e, ""))?;
        views.push(ReservationView::of(
            &ReservationStatus { reservation, usage },
            now,
        ));
    }
    Ok(views)
}
