//! One error type for every failure the API answers, rendered as the contract's envelope
//! `{"detail":{"code","message","request_id",…}}`. Handlers return `Result<_, ApiError>`; the
//! edge middleware stamps the request id so the body's `request_id` equals `X-Request-ID`, and
//! turns any other error response (unknown route, wrong method, timeout, oversized body) into the
//! same envelope.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use domain::store::StoreError;
use domain::{BrokerError, DomainError};
use serde::Serialize;
use utoipa::ToSchema;

/// The error envelope's inner object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `NOT_SANDBOX_OWNER`.
    pub code: String,
    /// Human-readable message (never names another caller, never leaks a 5xx cause).
    pub message: String,
    /// Equals the `X-Request-ID` response header.
    pub request_id: String,
    /// Seconds to wait (409 no sandboxes, 429, 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The limit that refused the request (`QUOTA_EXCEEDED`: concurrent allocations of the
    /// track; `CALLER_LIMIT` / `ADDRESS_LIMIT`: live allocations of the caller / client address;
    /// `EXTENSION_LIMIT_EXCEEDED`: hours of extension per allocation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Per-field problems of a validation error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldProblem>>,
    /// `NO_SANDBOXES_AVAILABLE` after waiting in line (`Prefer: wait`): the request's place in
    /// its line when its wait ended (1 = next), as in the `Queue-Position` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u16>,
}

/// One problem in a validation error.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldProblem {
    /// Where: `header`, `query`, `path`.
    pub location: String,
    /// Which field.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

/// The error envelope every error response carries.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub detail: ErrorDetail,
}

/// An API failure.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Contract code.
    pub code: &'static str,
    /// Message for the client.
    pub message: String,
    /// Seconds to wait, where it applies.
    pub retry_after: Option<u64>,
    /// The limit that refused the request, where one did.
    pub limit: Option<u32>,
    /// Field problems, for validation errors.
    pub details: Option<Vec<FieldProblem>>,
    /// The cause of a 5xx, logged (with the request id) and never returned.
    pub cause: Option<String>,
    /// The place in a waiting line the request left (`Queue-Position`); `u16` keeps the error
    /// small (the lines of one instance hold far fewer).
    pub position: Option<u16>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            limit: None,
            details: None,
            cause: None,
            position: None,
        }
    }

    /// 400 VALIDATION_ERROR for one field.
    pub fn validation(location: &str, field: &str, problem: impl Into<String>) -> Self {
        let problem = problem.into();
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            format!("invalid {location} parameter '{field}': {problem}"),
        );
        e.details = Some(vec![FieldProblem {
            location: location.into(),
            field: field.into(),
            problem,
        }]);
        e
    }

    /// 400 MISSING_SANDBOX_ID.
    pub fn missing_sandbox_id() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MISSING_SANDBOX_ID",
            "Either X-Instruqt-Sandbox-ID or X-Track-ID header is required: send the student's id \
             (in Instruqt, the participant id; brokerctl --caller)",
        )
    }

    /// 401 UNAUTHORIZED.
    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    /// 403 FORBIDDEN.
    pub fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    /// 403 NOT_SANDBOX_OWNER (never names the owner).
    pub fn not_owner(sandbox_id: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "NOT_SANDBOX_OWNER",
            format!(
                "Sandbox {sandbox_id} was not allocated to this caller; send the caller id that \
                 allocated it (X-Instruqt-Sandbox-ID, brokerctl --caller)"
            ),
        )
    }

    /// 403 PREFIX_NOT_ALLOWED: a per-track credential asked for names outside its prefixes.
    pub fn prefix_not_allowed(prefix: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "PREFIX_NOT_ALLOWED",
            format!(
                "This track may not allocate sandboxes named {prefix}*; use one of the prefixes \
                 of its credential"
            ),
        )
    }

    /// 400 NAME_PREFIX_REQUIRED: the credential has several prefixes and none was chosen.
    pub fn name_prefix_required() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "NAME_PREFIX_REQUIRED",
            "X-Sandbox-Name-Prefix is required: this track's credential allows several \
             prefixes; send one of them (brokerctl --prefix)",
        )
    }

    /// 400 NAME_PREFIX_REQUIRED: with per-track credentials configured, the shared token must
    /// name a prefix outside theirs.
    pub fn shared_token_prefix_required() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "NAME_PREFIX_REQUIRED",
            "X-Sandbox-Name-Prefix is required: tracks with their own credential own part of the pool, so the shared token must name a prefix outside theirs",
        )
    }

    /// 403 INVALID_CALLER_SIGNATURE: `X-Caller-Signature` missing (where required) or wrong.
    pub fn invalid_caller_signature(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE", message)
    }

    /// 403 LEASE_TOKEN_REQUIRED: the lease capability applies and no `X-Lease-Token` was sent.
    pub fn lease_token_required() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "LEASE_TOKEN_REQUIRED",
            "X-Lease-Token is required: send the lease_token of the allocation's 201",
        )
    }

    /// 403 LEASE_TOKEN_INVALID: the token is not the one of this sandbox's allocation.
    pub fn lease_token_invalid() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "LEASE_TOKEN_INVALID",
            "X-Lease-Token does not match this sandbox's allocation",
        )
    }

    /// 409 ALREADY_ALLOCATED: the caller holds a live allocation that the request does not prove
    /// (never names the sandbox).
    pub fn already_allocated() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "ALREADY_ALLOCATED",
            "This caller already holds a sandbox; repeat the request with its original Idempotency-Key or its X-Lease-Token",
        )
    }

    /// 404 SANDBOX_NOT_FOUND.
    pub fn sandbox_not_found(sandbox_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "SANDBOX_NOT_FOUND",
            format!(
                "No sandbox has the id or name {sandbox_id}; use the sandbox_id (or name) from \
                 the allocation's answer"
            ),
        )
    }

    /// 404 UNKNOWN_PREFIX: no sandbox (that is not deleted) has a name with this prefix, so
    /// waiting for one is pointless; no `Retry-After`.
    pub fn unknown_prefix(prefix: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_PREFIX",
            format!(
                "No sandbox in the pool has a name starting with {prefix}; check \
                 X-Sandbox-Name-Prefix (brokerctl --prefix, BROKER_NAME_PREFIX) against the pool's \
                 names, or leave it out to take any sandbox"
            ),
        )
    }

    /// 431 HEADERS_TOO_LARGE: the request's headers exceed the service's limits.
    pub fn headers_too_large(max_bytes: usize, max_count: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HEADERS_TOO_LARGE",
            format!(
                "The request's headers are too large; send at most {} KiB of headers and at \
                 most {max_count} of them",
                max_bytes / 1024
            ),
        )
    }

    /// 414 URI_TOO_LONG: the request line is longer than the service reads.
    pub fn uri_too_long(max_bytes: usize) -> Self {
        Self::new(
            StatusCode::URI_TOO_LONG,
            "URI_TOO_LONG",
            format!(
                "The request's target (path and query) is too long; keep the request line under \
                 {} KiB, e.g. by sending fewer or shorter query parameters",
                max_bytes.div_ceil(1024)
            ),
        )
    }

    /// 408 BODY_TIMEOUT: the request's body did not arrive within `BODY_READ_TIMEOUT_SEC` of
    /// its headers.
    pub fn body_timeout(seconds: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "BODY_TIMEOUT",
            format!(
                "The request body did not arrive within {seconds} s of its headers; send the \
                 whole request at once"
            ),
        )
    }

    /// 404 JOB_NOT_FOUND: no admin job has this id.
    pub fn job_not_found(job_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "JOB_NOT_FOUND",
            format!("No admin job has the id {job_id}; GET /v1/admin/jobs lists them"),
        )
    }

    /// 409 NO_SANDBOXES_AVAILABLE.
    pub fn no_sandboxes(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "NO_SANDBOXES_AVAILABLE",
            format!(
                "No sandbox is free right now; retry in {retry_after} s (brokerctl allocate and \
                 the Instruqt scripts wait by themselves)"
            ),
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// 409 INVALID_STATE: the sandbox's status does not allow the operation.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "INVALID_STATE", message)
    }

    /// 503 MAINTENANCE: allocation is drained (for the prefix or the whole pool).
    pub fn maintenance(prefix: Option<&str>, retry_after: u64) -> Self {
        let message = match prefix {
            Some(prefix) => format!(
                "Allocation of sandboxes named {prefix}* is paused for maintenance; retry later"
            ),
            None => "Allocation is paused for maintenance; retry later".to_string(),
        };
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "MAINTENANCE", message);
        e.retry_after = Some(retry_after);
        e
    }

    /// 429 QUOTA_EXCEEDED: the track holds its quota of concurrent allocations.
    pub fn quota_exceeded(track: &str, limit: u32, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "QUOTA_EXCEEDED",
            format!(
                "Track {track} already holds {limit} live allocation(s), its quota; release one \
                 or wait for one to end, then retry in {retry_after} s"
            ),
        );
        e.retry_after = Some(retry_after);
        e.limit = Some(limit);
        e
    }

    /// 429 CALLER_LIMIT / ADDRESS_LIMIT: a fair-share cap holds its maximum of live allocations.
    pub fn fair_share(kind: domain::CapKind, limit: u32, retry_after: u64) -> Self {
        let (code, message) = match kind {
            domain::CapKind::Caller => (
                "CALLER_LIMIT",
                format!("This caller already holds {limit} live allocation(s) in this track"),
            ),
            domain::CapKind::Address => (
                "ADDRESS_LIMIT",
                format!("This client address already holds {limit} live allocation(s)"),
            ),
            domain::CapKind::Principal => (
                "QUOTA_EXCEEDED",
                format!("The shared track token holds its quota of {limit} concurrent allocations"),
            ),
        };
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(retry_after);
        e.limit = Some(limit);
        e
    }

    /// 409 EXTENSION_LIMIT_EXCEEDED: the allocation's extension budget would be exceeded.
    pub fn extension_limit(message: String, max_hours: u32) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "EXTENSION_LIMIT_EXCEEDED", message);
        e.limit = Some(max_hours);
        e
    }

    /// 429 RATE_LIMIT_EXCEEDED.
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMIT_EXCEEDED",
            format!("Too many requests from this caller; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// 429 RATE_LIMIT_EXCEEDED for the bucket of a client address, which requests without a
    /// valid token share: failed logins from one address (a classroom behind one NAT) empty it.
    pub fn address_rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMIT_EXCEEDED",
            format!(
                "Too many requests without a valid token from this address (failed logins count \
                 here); check the token (in development the broker prints it when it starts) and \
                 retry in {retry_after} s. The dashboard and the API docs stay available"
            ),
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// 503 OVERLOADED: too many requests in progress; shed before any work is done.
    pub fn overloaded() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "OVERLOADED",
            "The service is at capacity; retry shortly",
        );
        e.retry_after = Some(1);
        e
    }

    /// 503 OVERLOADED: every live-stream slot of this instance is taken (`SSE_MAX_SUBSCRIBERS`).
    pub fn too_many_streams(max: usize) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "OVERLOADED",
            format!("{max} live streams are already open on this instance; retry later"),
        );
        e.retry_after = Some(5);
        e
    }

    /// 503 SERVICE_UNAVAILABLE.
    pub fn unavailable(cause: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "The store is unavailable; retry in a few seconds",
        );
        e.retry_after = Some(5);
        e.cause = Some(cause.into());
        e
    }

    /// 500 INTERNAL_ERROR; the cause is logged, never returned.
    pub fn internal(cause: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "An unexpected error occurred; the operator finds its cause in the log under this \
             request_id",
        );
        e.cause = Some(cause.into());
        e
    }

    /// The envelope for an error response produced outside a handler (router, layers).
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::new(
                status,
                "NOT_FOUND",
                "No such route; the API is described at /v1/docs",
            ),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                "METHOD_NOT_ALLOWED",
                "This route does not take this method; the API is described at /v1/docs",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                status,
                "PAYLOAD_TOO_LARGE",
                "Request body too large; send a smaller one",
            ),
            StatusCode::REQUEST_TIMEOUT => Self::new(
                status,
                "REQUEST_TIMEOUT",
                "The request took too long and was abandoned; retry it",
            ),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::headers_too_large(
                crate::edge::MAX_HEADER_BYTES,
                crate::edge::MAX_HEADER_COUNT,
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Self::new(status, "VALIDATION_ERROR", "Unsupported media type")
            }
            s if s.is_server_error() => Self::internal(format!("status {s} without detail")),
            s => Self::new(
                s,
                "VALIDATION_ERROR",
                s.canonical_reason().unwrap_or("Bad request").to_string(),
            ),
        }
    }

    /// The body with `request_id` filled in.
    pub fn body(&self, request_id: &str) -> ErrorBody {
        ErrorBody {
            detail: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                request_id: request_id.to_string(),
                retry_after: self.retry_after,
                limit: self.limit,
                details: self.details.clone(),
                position: self.position,
            },
        }
    }

    /// Renders the full response (status, `Retry-After`, JSON envelope).
    pub fn render(&self, request_id: &str) -> Response {
        let mut response = (self.status, axum::Json(self.body(request_id))).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert("retry-after", v);
            }
        }
        if let Some(position) = self.position {
            response
                .headers_mut()
                .insert(crate::waiting_line::QUEUE_POSITION_HEADER, position.into());
        }
        response.extensions_mut().insert(self.clone());
        response
    }
}

/// Reservation refusals (ADR 0028).
impl ApiError {
    /// 409 RESERVATIONS_DISABLED: the write flag is off.
    pub fn reservations_off() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "RESERVATIONS_DISABLED",
            "Reservations are not written by this deployment yet: set WRITE_EVENTS_RESERVATIONS=true \
             (terraform: write_events_reservations) once every API, job and projector process runs \
             this release (docs/upgrades.md)",
        )
    }

    /// 404 RESERVATION_NOT_FOUND.
    pub fn reservation_not_found(reservation_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "RESERVATION_NOT_FOUND",
            format!(
                "Reservation {reservation_id} not found; list reservations with GET \
                 /v1/admin/reservations (brokerctl reservations list)"
            ),
        )
    }

    /// 409 INSUFFICIENT_CAPACITY: the shortfall and each number behind it are entries of
    /// `details` (`location` = `capacity`, `field` = the figure, `problem` = its value), so the
    /// envelope keeps its one shape.
    pub fn insufficient_capacity(shortfall: u32, numbers: &[(&str, u32)]) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "INSUFFICIENT_CAPACITY",
            format!(
                "The pool cannot honour this reservation: {shortfall} sandbox(es) short (the numbers \
                 are in details); reserve fewer, pick a later window, or run a sync to register more"
            ),
        );
        let entry = |field: &str, value: u32| FieldProblem {
            location: "capacity".into(),
            field: field.into(),
            problem: value.to_string(),
        };
        e.details = Some(
            std::iter::once(entry("shortfall", shortfall))
                .chain(numbers.iter().map(|(field, value)| entry(field, *value)))
                .collect(),
        );
        e
    }
}

impl IntoResponse for ApiError {
    /// Rendered without the request id; the edge middleware re-renders with it.
    fn into_response(self) -> Response {
        self.render("")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidCursor => ApiError::validation("query", "cursor", "invalid cursor"),
            StoreError::Unavailable(cause) => ApiError::unavailable(cause),
            // A conflict that survived the command's retries: the caller may simply retry.
            StoreError::VersionConflict { stream_id } => {
                ApiError::unavailable(format!("persistent version conflict on {stream_id}"))
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// Maps a broker error for an operation on `sandbox_id`.
    pub fn from_broker(e: BrokerError, sandbox_id: &str) -> Self {
        match e {
            BrokerError::Domain(DomainError::NotFound) => ApiError::sandbox_not_found(sandbox_id),
            BrokerError::Domain(DomainError::NotOwner) => ApiError::not_owner(sandbox_id),
            BrokerError::Domain(d @ DomainError::InvalidTransition { .. }) => {
                ApiError::invalid_state(d.to_string())
            }
            BrokerError::Domain(d @ DomainError::ExtensionLimit { max_hours, .. }) => {
                ApiError::extension_limit(d.to_string(), max_hours)
            }
            BrokerError::Domain(d) => ApiError::invalid_state(d.to_string()),
            BrokerError::Store(s) => s.into(),
            BrokerError::NoSandboxAvailable { retry_after_s } => {
                ApiError::no_sandboxes(retry_after_s)
            }
            BrokerError::InvalidInput(id) => ApiError::validation("header", "id", id.to_string()),
            BrokerError::Maintenance {
                prefix,
                retry_after_s,
            } => ApiError::maintenance(prefix.as_deref(), retry_after_s),
            BrokerError::FairShareExceeded {
                kind,
                limit,
                retry_after_s,
            } => ApiError::fair_share(kind, limit, retry_after_s),
            BrokerError::QuotaExceeded {
                track,
                limit,
                retry_after_s,
            } => ApiError::quota_exceeded(&track, limit, retry_after_s),
        }
    }
}

/// The waiting line's tickets (`Prefer: respond-async`, docs/waiting-line.md).
impl ApiError {
    /// 404 TICKET_NOT_FOUND.
    pub fn ticket_not_found(ticket_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "TICKET_NOT_FOUND",
            format!(
                "No waiting-line ticket has the id {ticket_id}; use the poll_url of the 202 that \
                 issued it"
            ),
        )
    }

    /// 403 NOT_TICKET_OWNER (never names the owner).
    pub fn not_ticket_owner(ticket_id: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "NOT_TICKET_OWNER",
            format!(
                "Ticket {ticket_id} was issued to another caller; send the caller id (and \
                 credential) that asked for it"
            ),
        )
    }

    /// 410 TICKET_DROPPED: the ticket left the line without a sandbox.
    pub fn ticket_dropped(ticket_id: &str, reason: &str) -> Self {
        let why = match reason {
            "not_polled" => "it was not polled within its idle bound",
            "expired" => "no sandbox became free before its longest wait ran out",
            "refused" => "its allocation was refused when its turn came",
            _ => "the line was full",
        };
        Self::new(
            StatusCode::GONE,
            "TICKET_DROPPED",
            format!("Ticket {ticket_id} left the waiting line because {why}; allocate again"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::model::lifecycle::Transition;
    use domain::SandboxStatus;

    /// A word like `ExtendLease`: a lower-case letter, an upper-case one and a lower-case one
    /// inside it (units such as `KiB` are not type names).
    fn has_type_name(text: &str) -> bool {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| {
                word.as_bytes().windows(3).any(|w| {
                    w[0].is_ascii_lowercase()
                        && w[1].is_ascii_uppercase()
                        && w[2].is_ascii_lowercase()
                })
            })
    }

    /// Every message the API answers with is written for a person: no `Some(`, no `None`, no
    /// type or command names, and a next step (after a `;`) wherever the caller can act.
    #[test]
    fn messages_are_written_for_people() {
        let mut errors = vec![
            ApiError::missing_sandbox_id(),
            ApiError::not_owner("mock-001"),
            ApiError::prefix_not_allowed("aws"),
            ApiError::name_prefix_required(),
            ApiError::sandbox_not_found("lab-demo-017"),
            ApiError::unknown_prefix("aws-lab"),
            ApiError::headers_too_large(65536, 100),
            ApiError::uri_too_long(65534),
            ApiError::job_not_found("j"),
            ApiError::no_sandboxes(30),
            ApiError::maintenance(Some("lab"), 60),
            ApiError::maintenance(None, 60),
            ApiError::quota_exceeded("azure-lab", 1, 30),
            ApiError::rate_limited(3),
            ApiError::address_rate_limited(3),
            ApiError::overloaded(),
            ApiError::too_many_streams(4),
            ApiError::unavailable("cause"),
            ApiError::internal("cause"),
        ];
        for status in [404, 405, 408, 413] {
            errors.push(ApiError::from_status(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            ));
        }
        let statuses = std::iter::once(None).chain(SandboxStatus::ALL.into_iter().map(Some));
        for from in statuses {
            for transition in Transition::ALL {
                errors.push(ApiError::from_broker(
                    BrokerError::Domain(DomainError::InvalidTransition { from, transition }),
                    "mock-001",
                ));
            }
        }
        errors.push(ApiError::from_broker(
            BrokerError::QuotaExceeded {
                track: "t".into(),
                limit: 1,
                retry_after_s: 30,
            },
            "",
        ));
        for e in &errors {
            let m = &e.message;
            assert!(!m.contains("Some(") && !m.contains("None"), "{m}");
            assert!(!has_type_name(m), "{m}");
            assert!(m.contains(';'), "names what to do next: {m}");
        }
        assert!(!ApiError::quota_exceeded("t", 1, 30)
            .message
            .contains("concurrent allocations"));
    }
}
