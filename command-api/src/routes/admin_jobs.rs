//! Admin jobs: long operator actions answered 202 with a job id, run in the background, and
//! reported by `GET /v1/admin/jobs[/{job_id}]` (ADR 0018).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::model::admin_job::AdminJobRecord;
use serde::Serialize;
use utoipa::ToSchema;

use crate::admin_jobs::{JobOutcome, JobRequest};
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// One admin job.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminJob {
    /// The job id.
    pub job_id: String,
    /// What it does: `bulk_delete`, `sync`, `cleanup`, `auto_expire`, `auto_delete_stale`.
    pub kind: String,
    /// Its parameters as given.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// `running`, `completed`, `failed`, `stopped`, or `interrupted` (the process running it
    /// went away without finishing; the operations are idempotent, submit it again).
    pub state: String,
    /// Items handled so far.
    pub done: u64,
    /// Items expected, when known at the start (from the pool counters).
    pub total: Option<u64>,
    /// Items that failed or were skipped so far.
    pub errors: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The operation's own summary, once finished.
    #[schema(value_type = Option<Object>)]
    pub summary: Option<serde_json::Value>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339: the last progress mark.
    pub updated_at: String,
    /// RFC 3339, once finished.
    pub finished_at: Option<String>,
}

impl From<AdminJobRecord> for AdminJob {
    fn from(job: AdminJobRecord) -> Self {
        let state = serde_json::to_value(job.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Self {
            job_id: job.job_id,
            kind: job.kind,
            params: job.params,
            state,
            done: job.done,
            total: job.total,
            errors: job.errors,
            error: job.error,
            summary: job.summary,
            started_at: domain::model::events::format_time(&job.started_at),
            updated_at: domain::model::events::format_time(&job.updated_at),
            finished_at: job
                .finished_at
                .map(|t| domain::model::events::format_time(&t)),
        }
    }
}

/// The answer to a submission.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    /// The job id.
    pub job_id: String,
    /// What it does.
    pub kind: String,
    /// `running`.
    pub state: String,
    /// Where to follow it.
    pub status_url: String,
}

/// Recent jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<AdminJob>,
    /// Jobs on this page.
    pub count: usize,
}

/// The job routes (auth is layered on by the caller).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/jobs", get(list_jobs))
        .route("/admin/jobs/{job_id}", get(get_job))
}

/// Records `request`, starts `work` in the background and answers 202 with the job.
pub(crate) async fn accept_job<F, Fut>(
    state: &SharedState,
    request: JobRequest,
    meta: &domain::CommandMeta,
    work: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(std::sync::Arc<crate::admin_jobs::JobProgress>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = JobOutcome> + Send + 'static,
{
    let kind = request.kind.to_string();
    let job_id = state.admin_jobs.submit(request, meta, work).await?;
    let status_url = format!("{}/admin/jobs/{job_id}", state.base_path);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url.clone())],
        Json(JobAccepted {
            job_id,
            kind,
            state: "running".into(),
            status_url,
        }),
    )
        .into_response())
}

/// The outcome of a job's work from an operation's summary (or its error): a summary whose
/// `status` is `stopped` ended early by a shutdown.
pub(crate) fn outcome_of<S: Serialize>(result: Result<S, jobs::JobError>) -> JobOutcome {
    match result {
        Ok(summary) => {
            let summary = serde_json::to_value(&summary).unwrap_or_default();
            JobOutcome {
                outcome: if summary["status"] == "stopped" {
                    "stopped"
                } else {
                    "completed"
                },
                error: None,
                summary,
            }
        }
        Err(e) => JobOutcome {
            outcome: "failed",
            error: Some(e.to_string()),
            summary: serde_json::Value::Null,
        },
    }
}

/// Recent admin jobs, newest first.
#[utoipa::path(
    get, path = "/v1/admin/jobs", tag = "Admin", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 100, example = 10, description = "1–100, default 20")),
    responses(
        (status = 200, description = "Jobs", body = JobList),
        (status = 400, description = "Bad limit", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JobList>, ApiError> {
    if let Some(unknown) = q.keys().find(|k| k.as_str() != "limit") {
        return Err(ApiError::validation("query", unknown, "unknown parameter"));
    }
    let limit = match q.get("limit") {
        None => 20,
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
    let jobs: Vec<AdminJob> = state
        .admin_jobs
        .recent(limit)
        .await?
        .into_iter()
        .map(AdminJob::from)
        .collect();
    Ok(Json(JobList {
        count: jobs.len(),
        jobs,
    }))
}

/// One admin job: state, progress, errors, start and end.
#[utoipa::path(
    get, path = "/v1/admin/jobs/{job_id}", tag = "Admin", security(("bearer" = [])),
    params(("job_id" = String, Path, example = "0190f6c2-7b3a-7d4e-9f10-2b3c4d5e6f70", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", description = "The id from the 202 answer (a UUID)")),
    responses(
        (status = 200, description = "The job", body = AdminJob),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<SharedState>,
    Path(job_id): Path<String>,
) -> Result<Json<AdminJob>, ApiError> {
    // Job ids are UUIDs; anything else cannot name a job (and must not reach the index stream).
    let Ok(id) = uuid::Uuid::parse_str(job_id.trim()) else {
        return Err(ApiError::validation("path", "job_id", "not a job id"));
    };
    match state.admin_jobs.get(&id.to_string()).await? {
        Some(job) => Ok(Json(AdminJob::from(job))),
        None => Err(ApiError::job_not_found(&id.to_string())),
    }
}
