//! Admin routes over personal data (docs/personal-data.md, ADR 0031): who a pseudonym is while
//! the student's subject record exists, which pseudonym a student has, the student's sandboxes,
//! and erasure.
//!
//! An erasure deletes the subject record and leaves a tombstone of the pseudonym (when, never
//! who); it is refused while the student holds a live sandbox, since the lab's own requests would
//! then come back as a new subject that does not own it. Nothing in the event log is rewritten.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::erasure::ErasureOutcome;
use domain::store::{ListFilter, PseudonymStatus};
use domain::SandboxStatus;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::routes::admin::AdminSandbox;
use crate::state::SharedState;

/// Most of a student's sandboxes one answer lists (a student holds a few).
const MAX_LISTED: usize = 100;

/// A student's subject record as an auditor sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StudentResponse {
    /// The student id as the track sends it.
    pub student: String,
    /// The pseudonym the log, the view and the feeds carry for this student.
    pub pseudonym: String,
    /// Epoch seconds: when the student was first seen (or first seen again after an erasure).
    pub first_seen: i64,
    /// The student's sandboxes, live and past (from the view, at most 100).
    pub sandboxes: Vec<AdminSandbox>,
}

/// What is known about a pseudonym.
#[derive(Debug, Serialize, ToSchema)]
pub struct PseudonymResponse {
    /// The pseudonym asked about.
    pub pseudonym: String,
    /// `linked` (the subject record exists), `erased` (it was deleted: nobody can be named), or
    /// `unknown` (never issued by this deployment; e.g. a clear id written before pseudonyms).
    pub status: String,
    /// The student id, while `linked`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student: Option<String>,
    /// Epoch seconds, when `erased`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased_at: Option<i64>,
}

/// The answer to an erasure.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureResponse {
    /// Always `erased`.
    pub status: String,
    /// The pseudonym that no longer names anyone (the log keeps it; the link is gone).
    pub pseudonym: String,
    /// Epoch seconds.
    pub erased_at: i64,
}

/// The personal-data routes (auth is layered on by the caller). The student id travels in the
/// body, never in the path: paths end up in access logs (the service's, the load balancer's),
/// which must not carry it.
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/students/lookup", post(lookup_student))
        .route("/admin/students/erase", post(erase_student))
        .route("/admin/pseudonyms/{pseudonym}", get(get_pseudonym))
}

/// Body of a lookup or an erasure.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StudentRequest {
    /// The student id as the track sends it (X-Instruqt-Sandbox-ID).
    #[schema(
        example = "student-42",
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub student: String,
}

/// Reads `{"student": "<id>"}` and checks the id like a caller id (400 otherwise).
fn student_of(body: &[u8]) -> Result<String, ApiError> {
    let request: StudentRequest = serde_json::from_slice(body).map_err(|_| {
        ApiError::validation(
            "body",
            "student",
            "the body must be a JSON object {\"student\": \"<the id as the track sends it>\"}",
        )
    })?;
    student_id(request.student.trim())
}

fn student_id(raw: &str) -> Result<String, ApiError> {
    domain::model::ids::validate_id("student", raw)
        .map_err(|e| ApiError::validation("body", "student", e.to_string()))
}

fn unknown_student() -> ApiError {
    ApiError {
        code: "UNKNOWN_STUDENT",
        message: "No subject record for this student: never seen since pseudonyms were turned on, or erased. Check the id as the track sends it (X-Instruqt-Sandbox-ID)".into(),
        ..ApiError::sandbox_not_found("")
    }
}

fn pseudonyms_off() -> ApiError {
    ApiError {
        code: "PSEUDONYMS_OFF",
        message: "Student ids are stored in clear (STUDENT_IDS=clear), so there is no subject record to look up or erase: set STUDENT_IDS=pseudonymised and PSEUDONYM_KEY first (docs/personal-data.md)".into(),
        ..ApiError::invalid_state("")
    }
}

fn holds_sandbox(sandbox_id: &str) -> ApiError {
    ApiError {
        code: "STUDENT_HOLDS_SANDBOX",
        message: format!(
            "The student holds live sandbox {sandbox_id}: release it first (POST /v1/sandboxes/{sandbox_id}/mark-for-deletion, or wait for the lab's end), then erase again"
        ),
        ..ApiError::invalid_state("")
    }
}

/// The subject record of `raw`, or 404/409.
async fn subject(
    state: &SharedState,
    raw: &str,
) -> Result<(String, domain::store::SubjectRecord), ApiError> {
    let student = student_id(raw)?;
    if !state.subjects.pseudonymised() {
        return Err(pseudonyms_off());
    }
    let record = state
        .subjects
        .lookup(&student)
        .await?
        .ok_or_else(unknown_student)?;
    Ok((student, record))
}

/// Rows of the view whose owner is `owner` (at most [`MAX_LISTED`]).
async fn owned_rows(
    state: &SharedState,
    owner: &str,
    status: Option<SandboxStatus>,
) -> Result<Vec<domain::PoolRow>, ApiError> {
    let filter = ListFilter {
        status,
        owner: Some(owner.to_string()),
        prefix: None,
    };
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    while rows.len() < MAX_LISTED {
        let page = state
            .broker
            .view()
            .list(&filter, MAX_LISTED - rows.len(), cursor.as_deref())
            .await?;
        rows.extend(page.rows);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(rows)
}

/// Which pseudonym a student has, and the student's sandboxes, live and past (the view's rows
/// under the pseudonym): the auditors' lookup.
#[utoipa::path(
    post, path = "/v1/admin/students/lookup", tag = "Admin", security(("bearer" = [])),
    request_body(content = StudentRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The student, the pseudonym and the sandboxes", body = StudentResponse),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "`UNKNOWN_STUDENT`: no subject record (never seen, or erased)", body = ErrorBody),
        (status = 409, description = "`PSEUDONYMS_OFF`: student ids are stored in clear", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn lookup_student(
    State(state): State<SharedState>,
    body: axum::body::Bytes,
) -> Result<Json<StudentResponse>, ApiError> {
    let (student, record) = subject(&state, &student_of(&body)?).await?;
    let rows = owned_rows(&state, &record.pseudonym, None).await?;
    Ok(Json(StudentResponse {
        student,
        pseudonym: record.pseudonym,
        first_seen: record.created_at.timestamp(),
        sandboxes: rows.into_iter().map(AdminSandbox::from).collect(),
    }))
}

/// Who a pseudonym is: the student while the subject record exists, `erased` after.
#[utoipa::path(
    get, path = "/v1/admin/pseudonyms/{pseudonym}", tag = "Admin", security(("bearer" = [])),
    params(("pseudonym" = String, Path, example = "p1:3fa9c0d27b1e8a4c55d0e6f1", description = "A pseudonym as the log and the view carry it: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$")),
    responses(
        (status = 200, description = "`linked` (with the student), `erased` or `unknown`", body = PseudonymResponse),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_pseudonym(
    State(state): State<SharedState>,
    Path(pseudonym): Path<String>,
) -> Result<Json<PseudonymResponse>, ApiError> {
    let pseudonym = domain::model::ids::validate_id("pseudonym", &pseudonym)
        .map_err(|e| ApiError::validation("path", "pseudonym", e.to_string()))?;
    let status = state.subjects.pseudonym_status(&pseudonym).await?;
    let (status, student, erased_at) = match status {
        Some(PseudonymStatus::Linked { student_id, .. }) => ("linked", Some(student_id), None),
        Some(PseudonymStatus::Erased { erased_at }) => {
            ("erased", None, Some(erased_at.timestamp()))
        }
        None => ("unknown", None, None),
    };
    Ok(Json(PseudonymResponse {
        pseudonym,
        status: status.into(),
        student,
        erased_at,
    }))
}

/// Erase a student: delete the subject record, so the pseudonyms in the log can no longer be
/// linked to the id. Refused while the student holds a live sandbox.
#[utoipa::path(
    post, path = "/v1/admin/students/erase", tag = "Admin", security(("bearer" = [])),
    request_body(content = StudentRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Erased: the pseudonym and when", body = ErasureResponse),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "`UNKNOWN_STUDENT`: no subject record (never seen, or already erased)", body = ErrorBody),
        (status = 409, description = "`STUDENT_HOLDS_SANDBOX`: the student holds a live sandbox (release it first); `PSEUDONYMS_OFF`: student ids are stored in clear", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn erase_student(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ErasureResponse>), ApiError> {
    let student = student_of(&body)?;
    if !state.subjects.pseudonymised() {
        return Err(pseudonyms_off());
    }
    let broker = &state.broker;
    let outcome = state
        .subjects
        .erase(&student, broker.events().as_ref(), broker.view().as_ref())
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?;
    let erased = match outcome {
        ErasureOutcome::Erased(erased) => erased,
        ErasureOutcome::Refused { sandbox_id, .. } => return Err(holds_sandbox(&sandbox_id)),
        ErasureOutcome::NoRecord | ErasureOutcome::WouldErase { .. } => {
            return Err(unknown_student())
        }
    };
    // The audit record of the erasure: the pseudonym, when and by which request; never the id.
    tracing::info!(
        target: "audit",
        pseudonym = %erased.pseudonym,
        erased_at = %erased.erased_at.to_rfc3339(),
        request_id = %request_id.0,
        "student subject record erased"
    );
    Ok((
        StatusCode::OK,
        Json(ErasureResponse {
            status: "erased".into(),
            pseudonym: erased.pseudonym,
            erased_at: erased.erased_at.timestamp(),
        }),
    ))
}
