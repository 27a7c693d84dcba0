//! Admin endpoints: listing, stats, history, job runs, quarantine retry, bulk removal.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::model::sandbox::SandboxCommand;
use domain::store::ListFilter;
use domain::{Actor, CommandMeta, EventEnvelope, PoolRow, PoolStats, SandboxStatus};
use futures::FutureExt;
use jobs::admin::BulkProgress;
use serde::Serialize;
use utoipa::ToSchema;

use crate::admin_jobs::JobRequest;
use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::routes::admin_jobs::{accept_job, outcome_of};
use crate::routes::cursor::{sandbox_scope, Listing};
use crate::routes::sandbox_ref::{resolve_sandbox_id, Visibility};
use crate::state::SharedState;
use jobs::progress::observed;

/// A sandbox as operators see it (from the view).
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminSandbox {
    /// Broker id.
    pub sandbox_id: String,
    /// CSP name.
    pub name: String,
    /// CSP account path.
    pub external_id: String,
    /// Status.
    pub status: String,
    /// Current or most recent owner.
    pub allocated_to_track: Option<String>,
    /// Epoch seconds.
    pub allocated_at: Option<i64>,
    /// Epoch seconds.
    pub expires_at: Option<i64>,
    /// Lab slug.
    pub track_name: Option<String>,
    /// Salesforce account id.
    pub sfdc_account_id: Option<String>,
    /// Epoch seconds.
    pub deletion_requested_at: Option<i64>,
    /// Failed delete attempts.
    pub deletion_attempts: u32,
    /// Last delete error.
    pub last_error: Option<String>,
    /// Last event version applied.
    pub version: u64,
}

impl From<PoolRow> for AdminSandbox {
    fn from(r: PoolRow) -> Self {
        Self {
            sandbox_id: r.sandbox_id,
            name: r.name,
            external_id: r.external_id,
            status: r.status.as_str().to_string(),
            allocated_to_track: r.owner,
            allocated_at: r.allocated_at.map(|t| t.timestamp()),
            expires_at: r.expires_at.map(|t| t.timestamp()),
            track_name: r.track_name,
            sfdc_account_id: r.sfdc_account_id,
            deletion_requested_at: r.deletion_requested_at.map(|t| t.timestamp()),
            deletion_attempts: r.attempts,
            last_error: r.last_error,
            version: r.version,
        }
    }
}

/// A page of the listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListResponse {
    /// The rows.
    pub sandboxes: Vec<AdminSandbox>,
    /// Rows on this page.
    pub count: usize,
    /// Cursor of the next page (`sandboxes.…`, for this listing with these filters only),
    /// `null` at the end.
    pub cursor: Option<String>,
    /// With `STUDENT_IDS=pseudonymised`: who each owner pseudonym on the page is (the student
    /// id, `erased` or `unknown`; docs/personal-data.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<std::collections::BTreeMap<String, String>>,
}

/// Pool counts (O(1): the stats shards).
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsResponse {
    /// Every sandbox ever registered.
    pub total: i64,
    /// Allocatable.
    pub available: i64,
    /// Held by students.
    pub allocated: i64,
    /// Waiting for CSP deletion.
    pub pending_deletion: i64,
    /// Missing from CSP.
    pub stale: i64,
    /// Quarantined.
    pub deletion_failed: i64,
    /// Gone.
    pub deleted: i64,
    /// Lag of the in-process projector, ms (`null` when the projector runs elsewhere).
    pub projector_lag_ms: Option<i64>,
    /// The same counts per name prefix group (the name up to its last `-`; `""` for names
    /// without one), from projected counters.
    pub by_prefix: BTreeMap<String, PrefixCounts>,
    /// Prefix groups below their `POOL_LOW_WATER` threshold.
    pub low_water: Vec<LowWaterGroup>,
    /// Reservations not yet closed, with reserved / free / used per reservation (ADR 0028).
    pub reservations: Vec<crate::routes::reservations::ReservationView>,
}

/// Counts of one name prefix group.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrefixCounts {
    /// Every sandbox of the group ever registered.
    pub total: i64,
    /// Allocatable.
    pub available: i64,
    /// Held by students.
    pub allocated: i64,
    /// Waiting for CSP deletion.
    pub pending_deletion: i64,
    /// Missing from CSP.
    pub stale: i64,
    /// Quarantined.
    pub deletion_failed: i64,
    /// Gone.
    pub deleted: i64,
}

impl From<&PoolStats> for PrefixCounts {
    fn from(stats: &PoolStats) -> Self {
        Self {
            total: stats.total(),
            available: stats.get(SandboxStatus::Available),
            allocated: stats.get(SandboxStatus::Allocated),
            pending_deletion: stats.get(SandboxStatus::PendingDeletion),
            stale: stats.get(SandboxStatus::Stale),
            deletion_failed: stats.get(SandboxStatus::DeletionFailed),
            deleted: stats.get(SandboxStatus::Deleted),
        }
    }
}

/// A prefix group below its low-water threshold.
#[derive(Debug, Serialize, ToSchema)]
pub struct LowWaterGroup {
    /// The name prefix group.
    pub prefix: String,
    /// Its available sandboxes.
    pub available: i64,
    /// Its threshold.
    pub threshold: i64,
}

/// Body of a successful retry-deletion: the sandbox is queued for cleanup again.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryDeletionResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// Status after the command (`pending_deletion`).
    pub status: String,
    /// Version of the sandbox's last event.
    pub version: u64,
}

/// A sandbox's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// Its events in version order, envelopes included.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<EventEnvelope>,
    /// With `STUDENT_IDS=pseudonymised`: who each pseudonym in the events is (the student id,
    /// `erased` or `unknown`; docs/personal-data.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subjects: Option<std::collections::BTreeMap<String, String>>,
}

/// The admin routes (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/sandboxes", get(list_sandboxes))
        .route("/admin/stats", get(get_stats))
        .route("/admin/sandboxes/{sandbox_id}/history", get(get_history))
        .route(
            "/admin/sandboxes/{sandbox_id}/retry-deletion",
            post(retry_deletion),
        )
        .route("/admin/sync", post(run_sync))
        .route("/admin/cleanup", post(run_cleanup))
        .route("/admin/auto-expire", post(run_auto_expire))
        .route("/admin/auto-delete-stale", post(run_delete_stale))
        .route("/admin/bulk-delete", post(bulk_delete))
}

fn admin_meta(request_id: &RequestId) -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: Some(request_id.0.clone()),
        correlation_id: None,
    }
}

/// Only the known query parameters, each a plain string (anything else is a 400).
fn query_params(raw: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match raw.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::validation("query", unknown, "unknown parameter")),
        None => Ok(()),
    }
}

/// `background=true` runs the operation as an admin job (202); `false` or absent keeps the
/// contract's synchronous summary.
fn background(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("background").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::validation(
            "query",
            "background",
            "must be true or false",
        )),
    }
}

fn parse_status(raw: Option<&String>) -> Result<Option<SandboxStatus>, ApiError> {
    raw.map(|s| {
        s.parse::<SandboxStatus>()
            .map_err(|e| ApiError::validation("query", "status", e))
    })
    .transpose()
}

/// An optional id filter: checked as sent like any id (no control characters, at most
/// `MAX_ID_BYTES`), an empty or blank value meaning "no filter".
fn optional_filter(raw: Option<&String>, field: &'static str) -> Result<Option<String>, ApiError> {
    match raw {
        None => Ok(None),
        Some(v) => domain::model::ids::validate_optional_id(field, v)
            .map_err(|e| ApiError::validation("query", field, e.to_string())),
    }
}

/// List sandboxes from the view, paged.
#[utoipa::path(
    get, path = "/v1/admin/sandboxes", tag = "Admin", security(("bearer" = [])),
    params(
        ("status" = Option<String>, Query, example = "available", pattern = "^(available|allocated|pending_deletion|stale|deletion_failed|deleted)$",
            description = "available|allocated|pending_deletion|stale|deletion_failed|deleted"),
        ("owner" = Option<String>, Query, example = "student-42", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$", description = "Current or most recent owner; no control characters, at most 256 bytes (UTF-8); empty or blank: any owner"),
        ("prefix" = Option<String>, Query, example = "lab-demo-", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$", description = "Name prefix; no control characters, at most 256 bytes (UTF-8); empty or blank: any name"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, example = 10, description = "1–100, default 50"),
        ("cursor" = Option<String>, Query, max_length = 2048, pattern = r"^(sandboxes\.[0-9a-f]{16}\.[A-Za-z0-9_-]+)?$", description = "The `cursor` of the previous page, as it came; empty: the first page. It continues only this listing with the same `status`, `owner` and `prefix`: a cursor of another listing or of other filters is refused (400 `VALIDATION_ERROR`), as is one the server did not issue"),
    ),
    responses(
        (status = 200, description = "A page", body = ListResponse),
        (status = 400, description = "Bad parameter, or a cursor this listing (with these filters) did not issue", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_sandboxes(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ListResponse>, ApiError> {
    query_params(&q, &["status", "owner", "prefix", "limit", "cursor"])?;
    let limit = match q.get("limit") {
        None => 50,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(ApiError::validation(
                    "query",
                    "limit",
                    "must be an integer from 1 to 100",
                ))
            }
        },
    };
    let filter = ListFilter {
        status: parse_status(q.get("status"))?,
        owner: optional_filter(q.get("owner"), "owner")?,
        prefix: optional_filter(q.get("prefix"), "prefix")?,
    };
    let scope = sandbox_scope(
        filter.status.map(|s| s.as_str()),
        filter.owner.as_deref(),
        filter.prefix.as_deref(),
    );
    let position = Listing::Sandboxes.accept(&scope, q.get("cursor"))?;
    let page = state
        .broker
        .view()
        .list(&filter, limit, position.as_deref())
        .await?;
    let sandboxes: Vec<AdminSandbox> = page.rows.into_iter().map(AdminSandbox::from).collect();
    let owners: Vec<&str> = sandboxes
        .iter()
        .filter_map(|s| s.allocated_to_track.as_deref())
        .collect();
    let subjects = state.subjects.identities(&owners.join(" ")).await?;
    Ok(Json(ListResponse {
        count: sandboxes.len(),
        sandboxes,
        cursor: Listing::Sandboxes.issue(&scope, page.cursor),
        subjects,
    }))
}

/// Pool counts by status from the stats shards, plus the projector lag.
#[utoipa::path(
    get, path = "/v1/admin/stats", tag = "Admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "Counts", body = StatsResponse),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_stats(State(state): State<SharedState>) -> Result<Json<StatsResponse>, ApiError> {
    let stats = state.broker.view().stats().await?;
    let by_prefix = state.broker.view().stats_by_prefix().await?;
    let low_water = state
        .pool_alerts
        .observe(&by_prefix)
        .into_iter()
        .map(|g| LowWaterGroup {
            prefix: g.prefix,
            available: g.available,
            threshold: g.threshold,
        })
        .collect();
    Ok(Json(StatsResponse {
        by_prefix: by_prefix
            .iter()
            .map(|(prefix, counts)| (prefix.clone(), PrefixCounts::from(counts)))
            .collect(),
        low_water,
        total: stats.total(),
        available: stats.get(SandboxStatus::Available),
        allocated: stats.get(SandboxStatus::Allocated),
        pending_deletion: stats.get(SandboxStatus::PendingDeletion),
        stale: stats.get(SandboxStatus::Stale),
        deletion_failed: stats.get(SandboxStatus::DeletionFailed),
        deleted: stats.get(SandboxStatus::Deleted),
        projector_lag_ms: state.projector_metrics.as_ref().map(|m| m.last_lag_ms()),
        reservations: crate::routes::reservations::active_views(&state).await?,
    }))
}

/// A sandbox's events in version order.
#[utoipa::path(
    get, path = "/v1/admin/sandboxes/{sandbox_id}/history", tag = "Admin", security(("bearer" = [])),
    params(("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$")),
    responses(
        (status = 200, description = "History", body = HistoryResponse),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_history(
    State(state): State<SharedState>,
    Path(sandbox_id): Path<String>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Operator).await?;
    let events = state
        .broker
        .history(&sandbox_id)
        .await
        .map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    let text = serde_json::to_string(&events).unwrap_or_default();
    let subjects = state.subjects.identities(&text).await?;
    Ok(Json(HistoryResponse {
        sandbox_id,
        events,
        subjects,
    }))
}

/// Re-queue a quarantined (`deletion_failed`) sandbox for cleanup.
#[utoipa::path(
    post, path = "/v1/admin/sandboxes/{sandbox_id}/retry-deletion", tag = "Admin", security(("bearer" = [])),
    params(("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$")),
    responses(
        (status = 200, description = "Re-queued", body = RetryDeletionResponse),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Not quarantined", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn retry_deletion(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Path(sandbox_id): Path<String>,
) -> Result<Json<RetryDeletionResponse>, ApiError> {
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Operator).await?;
    let sandbox = state
        .broker
        .execute(
            &sandbox_id,
            SandboxCommand::RetryDeletion,
            &admin_meta(&request_id),
        )
        .await
        .map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    Ok(Json(RetryDeletionResponse {
        status: sandbox
            .status
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        sandbox_id: sandbox.sandbox_id,
        version: sandbox.version,
    }))
}

/// A job run's summary as the response body, or its error mapped to the envelope.
fn job_summary<S: Serialize>(
    result: Result<S, jobs::JobError>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let summary = result.map_err(job_error)?;
    serde_json::to_value(summary)
        .map(Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn job_error(e: jobs::JobError) -> ApiError {
    match e {
        jobs::JobError::Store(s) => s.into(),
        jobs::JobError::InvalidRequest(message) => ApiError::validation("query", "status", message),
        jobs::JobError::Domain(d) => ApiError::invalid_state(d.to_string()),
        // CSP listing failed or was cut short: nothing was marked stale; retry later.
        other => ApiError::unavailable(other.to_string()),
    }
}

/// Sync the pool with the CSP account list.
#[utoipa::path(
    post, path = "/v1/admin/sync", tag = "Admin", security(("bearer" = [])),
    params(("background" = Option<bool>, Query, example = false, description = "true: run as a background admin job and answer 202 with its id (default false: the summary)")),
    responses(
        (status = 200, description = "Summary", body = Object),
        (status = 202, description = "Running as a background job", body = crate::routes::admin_jobs::JobAccepted),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "CSP or store unavailable", body = ErrorBody),
    )
)]
pub async fn run_sync(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query_params(&q, &["background"])?;
    if !background(&q)? {
        return job_summary(state.jobs.sync().await).map(IntoResponse::into_response);
    }
    // The size is the CSP listing's, unknown until it has been read.
    let request = JobRequest::of_unknown_size("sync", serde_json::json!({}));
    let jobs = state.jobs.clone();
    accept_job(
        &state,
        request,
        &admin_meta(&request_id),
        move |progress| async move { outcome_of(observed(progress.observer(), jobs.sync()).await) },
    )
    .await
}

/// Delete the CSP accounts of pending sandboxes (retries, quarantine).
#[utoipa::path(
    post, path = "/v1/admin/cleanup", tag = "Admin", security(("bearer" = [])),
    params(("background" = Option<bool>, Query, example = false, description = "true: run as a background admin job and answer 202 with its id (default false: the summary)")),
    responses(
        (status = 200, description = "Summary", body = Object),
        (status = 202, description = "Running as a background job", body = crate::routes::admin_jobs::JobAccepted),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "CSP or store unavailable", body = ErrorBody),
    )
)]
pub async fn run_cleanup(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query_params(&q, &["background"])?;
    if !background(&q)? {
        return job_summary(state.jobs.cleanup().await).map(IntoResponse::into_response);
    }
    let request = JobRequest::over_status(
        "cleanup",
        serde_json::json!({}),
        state.broker.view().clone(),
        SandboxStatus::PendingDeletion,
    );
    let jobs = state.jobs.clone();
    accept_job(
        &state,
        request,
        &admin_meta(&request_id),
        move |progress| async move {
            outcome_of(observed(progress.observer(), jobs.cleanup()).await)
        },
    )
    .await
}

/// End allocations past their lab window plus grace.
#[utoipa::path(
    post, path = "/v1/admin/auto-expire", tag = "Admin", security(("bearer" = [])),
    params(("background" = Option<bool>, Query, example = false, description = "true: run as a background admin job and answer 202 with its id (default false: the summary)")),
    responses(
        (status = 200, description = "Summary", body = Object),
        (status = 202, description = "Running as a background job", body = crate::routes::admin_jobs::JobAccepted),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn run_auto_expire(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query_params(&q, &["background"])?;
    if !background(&q)? {
        return job_summary(state.jobs.auto_expire().await).map(IntoResponse::into_response);
    }
    // Only allocations past their window are its work; no counter holds that number.
    let request = JobRequest::of_unknown_size("auto_expire", serde_json::json!({}));
    let jobs = state.jobs.clone();
    accept_job(
        &state,
        request,
        &admin_meta(&request_id),
        move |progress| async move {
            outcome_of(observed(progress.observer(), jobs.auto_expire()).await)
        },
    )
    .await
}

/// Retire sandboxes stale for longer than the grace period (store only; CSP untouched).
#[utoipa::path(
    post, path = "/v1/admin/auto-delete-stale", tag = "Admin", security(("bearer" = [])),
    params(("grace_period_hours" = Option<u32>, Query, example = 24, minimum = 0, maximum = 8760,
        description = "0–8760, default STALE_GRACE_HOURS"),
        ("background" = Option<bool>, Query, example = false, description = "true: run as a background admin job and answer 202 with its id (default false: the summary)")),
    responses(
        (status = 200, description = "Summary", body = Object),
        (status = 202, description = "Running as a background job", body = crate::routes::admin_jobs::JobAccepted),
        (status = 400, description = "Bad grace period", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn run_delete_stale(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query_params(&q, &["grace_period_hours", "background"])?;
    let grace = match q.get("grace_period_hours") {
        None => None,
        Some(raw) => match raw.parse::<i64>() {
            Ok(h) if (0..=8760).contains(&h) => Some(chrono::Duration::hours(h)),
            _ => {
                return Err(ApiError::validation(
                    "query",
                    "grace_period_hours",
                    "must be an integer from 0 to 8760",
                ))
            }
        },
    };
    if !background(&q)? {
        return job_summary(state.jobs.delete_stale(grace).await).map(IntoResponse::into_response);
    }
    let request = JobRequest::over_status(
        "auto_delete_stale",
        serde_json::json!({ "grace_period_hours": q.get("grace_period_hours") }),
        state.broker.view().clone(),
        SandboxStatus::Stale,
    );
    let jobs = state.jobs.clone();
    accept_job(
        &state,
        request,
        &admin_meta(&request_id),
        move |progress| async move {
            outcome_of(observed(progress.observer(), jobs.delete_stale(grace)).await)
        },
    )
    .await
}

/// Retire every sandbox of one explicit status from the pool (store only), as a background admin
/// job. Never `allocated`.
#[utoipa::path(
    post, path = "/v1/admin/bulk-delete", tag = "Admin", security(("bearer" = [])),
    params(("status" = String, Query, example = "stale", pattern = "^(available|stale|pending_deletion|deletion_failed)$",
        description = "available|stale|pending_deletion|deletion_failed (required; never allocated)")),
    responses(
        (status = 202, description = "Accepted: runs as a background admin job; follow it at `status_url` (also the `Location` header)", body = crate::routes::admin_jobs::JobAccepted),
        (status = 400, description = "Missing, unknown or refused status", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn bulk_delete(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    query_params(&q, &["status"])?;
    let Some(status) = parse_status(q.get("status"))? else {
        return Err(ApiError::validation(
            "query",
            "status",
            "an explicit status is required",
        ));
    };
    if matches!(status, SandboxStatus::Allocated | SandboxStatus::Deleted) {
        return Err(ApiError::validation(
            "query",
            "status",
            "bulk delete never touches allocated (or already deleted) sandboxes",
        ));
    }
    // The pool's size decides how long this runs (66,000 rows outlast any client timeout): always
    // a background job, its total taken from the counters.
    let view = state.broker.view().clone();
    let request = JobRequest {
        kind: "bulk_delete",
        params: serde_json::json!({ "status": status.as_str() }),
        // The counters say how many rows the sweep will meet (a hint: the view may lag).
        total: async move {
            let stats = view.stats().await.ok()?;
            u64::try_from(stats.get(status)).ok()
        }
        .boxed(),
    };
    let jobs = state.jobs.clone();
    let meta = admin_meta(&request_id);
    let job_meta = meta.clone();
    accept_job(&state, request, &meta, move |progress| async move {
        let result = jobs
            .bulk_delete_observed(status, &job_meta, &|p: BulkProgress| {
                progress.set(p.deleted, p.skipped_conflicts)
            })
            .await;
        outcome_of(result)
    })
    .await
}
