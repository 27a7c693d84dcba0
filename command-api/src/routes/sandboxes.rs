//! Track endpoints: allocate, get, mark-for-deletion (the contract of CONTRACT.md that existing
//! track scripts use), and extend.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::model::sandbox::Sandbox;
use domain::{Actor, AllocateRequest, BrokerError, CommandMeta};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{header_text, Caller, Principal};
use crate::credentials::{SignatureCheck, TrackCredential};
use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// Body of a successful allocation (201 new, 200 replay).
#[derive(Debug, Serialize, ToSchema)]
pub struct AllocateResponse {
    /// Broker id of the sandbox.
    pub sandbox_id: String,
    /// CSP account name.
    pub name: String,
    /// CSP account path (`identity/accounts/<uuid>`).
    pub external_id: String,
    /// Epoch seconds.
    pub allocated_at: i64,
    /// Epoch seconds: end of the lab window.
    pub expires_at: i64,
    /// Salesforce account id.
    pub sfdc_account_id: Option<String>,
}

/// A sandbox as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// CSP name.
    pub name: String,
    /// CSP account path.
    pub external_id: String,
    /// Status.
    pub status: String,
    /// The owner (always the caller here).
    pub allocated_to_track: Option<String>,
    /// Epoch seconds.
    pub allocated_at: Option<i64>,
    /// Epoch seconds.
    pub expires_at: Option<i64>,
    /// Lab slug.
    pub track_name: Option<String>,
    /// Salesforce account id.
    pub sfdc_account_id: Option<String>,
}

/// Body of a (repeated) mark-for-deletion.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarkResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// Always `pending_deletion`: the allocation has ended.
    pub status: String,
    /// Epoch seconds: when the allocation ended (the first mark, or expiry).
    pub deletion_requested_at: i64,
}

impl From<&Sandbox> for SandboxResponse {
    fn from(s: &Sandbox) -> Self {
        Self {
            sandbox_id: s.sandbox_id.clone(),
            name: s.name.clone(),
            external_id: s.external_id.clone(),
            status: s
                .status
                .map(|st| st.as_str().to_string())
                .unwrap_or_default(),
            allocated_to_track: s.owner.clone(),
            allocated_at: s.allocated_at.map(|t| t.timestamp()),
            expires_at: s.expires_at.map(|t| t.timestamp()),
            track_name: s.track_name.clone(),
            sfdc_account_id: s.sfdc_account_id.clone(),
        }
    }
}

/// The track routes (auth is layered on by the caller of this function).
pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/allocate", post(allocate_sandbox))
        .route("/sandboxes/{sandbox_id}", get(get_sandbox))
        .route(
            "/sandboxes/{sandbox_id}/mark-for-deletion",
            post(mark_for_deletion),
        )
        .route("/sandboxes/{sandbox_id}/extend", post(extend_lease))
}

fn meta(caller: &str, request_id: &RequestId) -> CommandMeta {
    CommandMeta {
        actor: Actor::Track(caller.to_string()),
        request_id: Some(request_id.0.clone()),
        correlation_id: None,
    }
}

/// With a per-track credential, the caller id must carry the track's signature when the
/// credential says so (and a signature that is sent is always checked).
fn check_caller(
    credential: &TrackCredential,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let signature = header_text(headers, "x-caller-signature")?;
    match credential.check_signature(&caller.0, signature.as_deref()) {
        SignatureCheck::Accepted => Ok(()),
        SignatureCheck::Missing => Err(ApiError::invalid_caller_signature(
            "X-Caller-Signature is required for this track",
        )),
        SignatureCheck::Invalid => Err(ApiError::invalid_caller_signature(
            "X-Caller-Signature does not match the caller id",
        )),
    }
}

/// With a per-track credential, a sandbox is visible only if its track allocated it: the
/// strong read's `track_name` is the credential's track, stamped at allocation.
async fn check_track_owns(
    state: &SharedState,
    credential: &TrackCredential,
    sandbox_id: &str,
) -> Result<(), ApiError> {
    let sandbox = state
        .broker
        .load_sandbox(sandbox_id)
        .await
        .map_err(|e| ApiError::from_broker(e, sandbox_id))?
        .sandbox;
    if sandbox.status.is_none() {
        return Err(ApiError::sandbox_not_found(sandbox_id));
    }
    if sandbox.track_name.as_deref() != Some(credential.track.as_str()) {
        return Err(ApiError::not_owner(sandbox_id));
    }
    Ok(())
}

/// Checks a path id the same way header ids are checked (400, never a 5xx or a key too long).
pub fn path_id(raw: &str) -> Result<String, ApiError> {
    domain::model::ids::validate_id("sandbox_id", raw)
        .map_err(|e| ApiError::validation("path", "sandbox_id", e.to_string()))
}

/// Allocate a sandbox to the calling student.
#[utoipa::path(
    post, path = "/v1/allocate", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("X-Instruqt-Sandbox-ID" = Option<String>, Header, description = "The student (preferred); no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Track-ID" = Option<String>, Header, description = "Legacy caller id; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Instruqt-Track-ID" = Option<String>, Header, description = "Lab slug (analytics); no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Sandbox-Name-Prefix" = Option<String>, Header, description = "Only names with this prefix; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Defaults to the caller; scoped to the caller; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
    ),
    responses(
        (status = 201, description = "Allocated", body = AllocateResponse),
        (status = 200, description = "Idempotent replay of the live allocation", body = AllocateResponse),
        (status = 400, description = "Missing or invalid header; `NAME_PREFIX_REQUIRED` when a per-track credential has several prefixes and none was chosen", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Wrong token; `PREFIX_NOT_ALLOWED`, `INVALID_CALLER_SIGNATURE`, or `NOT_SANDBOX_OWNER` (the caller's live allocation belongs to another track)", body = ErrorBody),
        (status = 409, description = "`NO_SANDBOXES_AVAILABLE` (with `retry_after`)", body = ErrorBody),
        (status = 429, description = "`RATE_LIMIT_EXCEEDED`; `QUOTA_EXCEEDED` when the track holds its quota of concurrent allocations (`TRACK_QUOTAS`, `DEFAULT_TRACK_QUOTA`, or the per-track credential's maximum): `limit` and `retry_after` in the envelope", body = ErrorBody),
        (status = 503, description = "`MAINTENANCE`: allocation is drained for the pool or this prefix (`Retry-After`); `SERVICE_UNAVAILABLE`: store unavailable", body = ErrorBody),
    )
)]
pub async fn allocate_sandbox(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Principal>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<AllocateResponse>), ApiError> {
    let started = Instant::now();
    let bounded = |name: &'static str| -> Result<Option<String>, ApiError> {
        match header_text(&headers, name)? {
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => domain::model::ids::validate_id(name, &v)
                .map(Some)
                .map_err(|e| ApiError::validation("header", name, e.to_string())),
            None => Ok(None),
        }
    };
    let mut request = AllocateRequest {
        caller: caller.0.clone(),
        idempotency_key: bounded("idempotency-key")?,
        track_name: bounded("x-instruqt-track-id")?,
        name_prefix: bounded("x-sandbox-name-prefix")?,
    };
    let credential = match &principal {
        Principal::Track(credential) => Some(credential.clone()),
        _ => None,
    };
    if let Some(credential) = &credential {
        check_caller(credential, &caller, &headers)?;
        request.name_prefix = match request.name_prefix.take() {
            Some(prefix) if credential.allows_prefix(&prefix) => Some(prefix),
            Some(prefix) => return Err(ApiError::prefix_not_allowed(&prefix)),
            None => match credential.name_prefixes.as_slice() {
                [only] => Some(only.clone()),
                _ => return Err(ApiError::name_prefix_required()),
            },
        };
        // The credential, not a header, names the track: ownership checks rely on it.
        request.track_name = Some(credential.track.clone());
    }
    // A credential's maximum is enforced as a quota of its track (the lower of it and any
    // configured quota), in the allocation's own transaction.
    let track_limit = credential
        .as_ref()
        .and_then(|c| c.max_concurrent_allocations);
    let result = state
        .broker
        .allocate_within(&request, &meta(&caller.0, &request_id), track_limit)
        .await;
    let outcome = match &result {
        Ok(a) if a.replayed => "idempotent",
        Ok(_) => "success",
        Err(BrokerError::NoSandboxAvailable { .. }) => "no_sandboxes",
        Err(BrokerError::QuotaExceeded { .. }) => "quota_exceeded",
        Err(BrokerError::Maintenance { .. }) => "maintenance",
        Err(_) => "error",
    };
    state.metrics.allocate.with_label_values(&[outcome]).inc();
    state
        .metrics
        .allocation_latency
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    let allocation = result.map_err(|e| ApiError::from_broker(e, ""))?;
    if let Some(credential) = &credential {
        // A replay can return a claim made through another credential for the same caller id.
        if allocation.sandbox.track_name.as_deref() != Some(credential.track.as_str()) {
            return Err(ApiError::not_owner(&allocation.sandbox.sandbox_id));
        }
    }
    state.metrics.conflicts.inc_by(allocation.conflicts as u64);
    if allocation.replayed {
        state.metrics.idempotent_hits.inc();
    }
    let s = &allocation.sandbox;
    let body = AllocateResponse {
        sandbox_id: s.sandbox_id.clone(),
        name: s.name.clone(),
        external_id: s.external_id.clone(),
        allocated_at: s.allocated_at.map_or(0, |t| t.timestamp()),
        expires_at: s.expires_at.map_or(0, |t| t.timestamp()),
        sfdc_account_id: s.sfdc_account_id.clone(),
    };
    let status = if allocation.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(body)))
}

/// The caller's live allocation (strongly consistent).
#[utoipa::path(
    get, path = "/v1/sandboxes/{sandbox_id}", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, description = "Broker id: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
    ),
    responses(
        (status = 200, description = "The sandbox", body = SandboxResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's live allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_sandbox(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    Path(sandbox_id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<SandboxResponse>, ApiError> {
    let sandbox_id = path_id(&sandbox_id)?;
    if let Principal::Track(credential) = &principal {
        check_caller(credential, &caller, &headers)?;
        check_track_owns(&state, credential, &sandbox_id).await?;
    }
    let sandbox = state
        .broker
        .get_sandbox(&sandbox_id, &caller.0)
        .await
        .map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    Ok(Json(SandboxResponse::from(&sandbox)))
}

/// End the caller's allocation; the cleanup job deletes the CSP account.
#[utoipa::path(
    post, path = "/v1/sandboxes/{sandbox_id}/mark-for-deletion", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, description = "Broker id: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
    ),
    responses(
        (status = 200, description = "Marked (or already ended; same body)", body = MarkResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn mark_for_deletion(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Principal>,
    Path(sandbox_id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<MarkResponse>, ApiError> {
    let sandbox_id = path_id(&sandbox_id)?;
    if let Principal::Track(credential) = &principal {
        check_caller(credential, &caller, &headers)?;
        check_track_owns(&state, credential, &sandbox_id).await?;
    }
    let result = state
        .broker
        .mark_for_deletion(&sandbox_id, &caller.0, &meta(&caller.0, &request_id))
        .await;
    let outcome = match &result {
        Ok(_) => "success",
        Err(BrokerError::Domain(domain::DomainError::NotFound)) => "not_found",
        Err(BrokerError::Domain(domain::DomainError::NotOwner)) => "not_owner",
        Err(_) => "error",
    };
    state.metrics.marked.with_label_values(&[outcome]).inc();
    let sandbox = result.map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    Ok(Json(MarkResponse {
        sandbox_id: sandbox.sandbox_id.clone(),
        status: "pending_deletion".into(),
        deletion_requested_at: sandbox.deletion_requested_at.map_or(0, |t| t.timestamp()),
    }))
}

/// Body of an extension.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtendRequest {
    /// Hours to add to the lab window: a whole number from 1 to 8760.
    #[schema(value_type = i64, minimum = 1, maximum = 8760)]
    pub hours: serde_json::Value,
}

/// Body of a successful extension.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExtendResponse {
    /// Broker id.
    pub sandbox_id: String,
    /// Always `allocated`.
    pub status: String,
    /// Epoch seconds: the new end of the lab window (expiry and the mark window follow it).
    pub expires_at: i64,
    /// Hours added by every extension of this allocation so far.
    pub extended_hours: i64,
    /// Hours that may still be added (`MAX_LAB_EXTENSION_HOURS` minus `extended_hours`).
    pub remaining_extension_hours: i64,
}

/// Largest single extension accepted (a year): anything longer is a typo, not a lab.
const MAX_EXTENSION_REQUEST_HOURS: u64 = 8_760;

/// Reads `{"hours": n}`: a JSON object whose `hours` is a whole number from 1 to 8760.
fn extension_hours(body: &[u8]) -> Result<u32, ApiError> {
    let problem = |p: &str| ApiError::validation("body", "hours", p);
    let request: ExtendRequest = serde_json::from_slice(body)
        .map_err(|_| problem("the body must be a JSON object {\"hours\": <whole number>}"))?;
    // JSON does not tell 8 from 8.0: a number without a fraction is a whole number.
    let whole = request.hours.as_u64().or_else(|| {
        request
            .hours
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
            .map(|f| f as u64)
    });
    match whole {
        Some(n) if (1..=MAX_EXTENSION_REQUEST_HOURS).contains(&n) => {
            u32::try_from(n).map_err(|_| problem("out of range"))
        }
        _ => Err(problem("must be a whole number from 1 to 8760")),
    }
}

/// Extend the caller's live allocation by `hours`.
#[utoipa::path(
    post, path = "/v1/sandboxes/{sandbox_id}/extend", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, description = "Broker id: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: an extension of this allocation already made with the key is answered again (its `expires_at`) and adds nothing; the retry's `hours` are not compared. No control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
    ),
    request_body(content = ExtendRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Extended (or, for a repeated `Idempotency-Key`, extended before): the new `expires_at`", body = ExtendResponse),
        (status = 400, description = "`VALIDATION_ERROR`: `hours` missing, not a whole number, or outside 1–8760; missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "`INVALID_STATE`: not allocated, or the lab window has ended; `EXTENSION_LIMIT_EXCEEDED`: the allocation's extensions would add more than `MAX_LAB_EXTENSION_HOURS` (`limit` in the envelope)", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn extend_lease(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Principal>,
    Path(sandbox_id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<ExtendResponse>, ApiError> {
    let sandbox_id = path_id(&sandbox_id)?;
    let hours = extension_hours(&body)?;
    let idempotency_key = match header_text(&headers, "idempotency-key")? {
        Some(key) if !key.is_empty() => Some(
            domain::model::ids::validate_id("idempotency-key", &key)
                .map_err(|e| ApiError::validation("header", "idempotency-key", e.to_string()))?,
        ),
        _ => None,
    };
    if let Principal::Track(credential) = &principal {
        check_caller(credential, &caller, &headers)?;
        check_track_owns(&state, credential, &sandbox_id).await?;
    }
    let sandbox = state
        .broker
        .extend_lease(
            &sandbox_id,
            &caller.0,
            hours,
            idempotency_key.as_deref(),
            &meta(&caller.0, &request_id),
        )
        .await
        .map_err(|e| ApiError::from_broker(e, &sandbox_id))?;
    // A keyed extension answers as it did the first time, even if another one came since.
    let (expires_at, extended_s) = idempotency_key
        .as_deref()
        .and_then(|key| sandbox.extension(key))
        .map_or((sandbox.expires_at, sandbox.extended_s), |e| {
            (Some(e.expires_at), e.extended_total_s)
        });
    let extended_hours = extended_s / 3600;
    Ok(Json(ExtendResponse {
        sandbox_id: sandbox.sandbox_id.clone(),
        status: "allocated".into(),
        expires_at: expires_at.map_or(0, |t| t.timestamp()),
        extended_hours,
        remaining_extension_hours: (state.broker.config().max_extension.num_hours()
            - extended_hours)
            .max(0),
    }))
}
