//! Waiting-line tickets over HTTP (`Prefer: respond-async` on `POST /v1/allocate`, and
//! `GET /v1/tickets/{ticket_id}`): the 202 that issues a ticket, and the poll that answers
//! pending, served (the allocation's normal answer, lease token included) or gone. The tickets
//! themselves are `crate::waiting_line::tickets`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use domain::model::sandbox::Sandbox;
use domain::{AllocateRequest, AllocationLimits, BrokerError, CommandMeta};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Principal};
use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::routes::sandboxes::{allocation_limits, meta, AllocateResponse};
use crate::state::SharedState;
use crate::waiting_line::prefer;
use crate::waiting_line::tickets::{self, Ticket, TicketState};

/// A waiting-line ticket as its owner sees it (202 on issue; 200 on a poll).
#[derive(Debug, Serialize, ToSchema)]
pub struct TicketResponse {
    /// The ticket's id.
    pub ticket_id: String,
    /// `pending` or `served`.
    pub status: String,
    /// Where to poll (`GET`, same credentials and caller id as the allocation).
    pub poll_url: String,
    /// Pending: the place in line on the instance that holds the ticket (1 = next); absent when
    /// another instance holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Pending: seconds until the next poll (also `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Served: the allocation, as `POST /v1/allocate` answers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<AllocateResponse>,
}

/// The ticket routes (auth is layered on by the caller of this function).
pub fn router() -> Router<SharedState> {
    Router::new().route("/tickets/{ticket_id}", get(get_ticket))
}

fn poll_url(state: &SharedState, ticket_id: &str) -> String {
    format!("{}/tickets/{ticket_id}", state.base_path)
}

fn pending(state: &SharedState, ticket_id: &str, status: StatusCode) -> Response {
    let settings = state.waiting_line.ticket_settings();
    let retry_after = settings.poll_after_s();
    let url = poll_url(state, ticket_id);
    let body = TicketResponse {
        ticket_id: ticket_id.to_string(),
        status: "pending".to_string(),
        position: state
            .waiting_line
            .ticket_position(ticket_id)
            .and_then(|p| u64::try_from(p).ok()),
        retry_after: Some(retry_after),
        allocation: None,
        poll_url: url.clone(),
    };
    let mut headers = HeaderMap::new();
    headers.insert("retry-after", HeaderValue::from(retry_after));
    if let Ok(location) = HeaderValue::from_str(&url) {
        headers.insert("location", location);
    }
    if status == StatusCode::ACCEPTED {
        headers.insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
    }
    (status, headers, Json(body)).into_response()
}

/// Issues a ticket for a request that asked `Prefer: respond-async` and found nothing free:
/// `None` when it did not ask, or when `WRITE_EVENTS_WAITING_LINE` is off (the preference is
/// then ignored, as RFC 7240 allows).
pub async fn issue_if_asked(
    state: &SharedState,
    headers: &HeaderMap,
    request: &AllocateRequest,
    meta: &CommandMeta,
    limits: &AllocationLimits,
) -> Result<Option<Response>, ApiError> {
    let settings = state.waiting_line.ticket_settings();
    if !settings.write || !prefer::preferences(headers).respond_async {
        return Ok(None);
    }
    let ticket = tickets::issue(&state.broker, request, meta, &settings).await?;
    let ticket_id = ticket.ticket_id.clone();
    tickets::spawn_waiter(
        state.broker.clone(),
        state.waiting_line.clone(),
        ticket,
        meta.clone(),
        limits.clone(),
        settings,
        state.broker.config().no_sandbox_retry_after_s,
    );
    // Let the waiter take its place, so the 202 can say which.
    tokio::task::yield_now().await;
    Ok(Some(pending(state, &ticket_id, StatusCode::ACCEPTED)))
}

fn allocation_body(
    state: &SharedState,
    sandbox: &Sandbox,
    event: Option<uuid::Uuid>,
) -> AllocateResponse {
    AllocateResponse {
        sandbox_id: sandbox.sandbox_id.clone(),
        name: sandbox.name.clone(),
        external_id: sandbox.external_id.clone(),
        allocated_at: sandbox.allocated_at.map_or(0, |t| t.timestamp()),
        expires_at: sandbox.expires_at.map_or(0, |t| t.timestamp()),
        sfdc_account_id: sandbox.sfdc_account_id.clone(),
        lease_token: event.map(|id| state.lease_keys.issue(&id)),
    }
}

async fn served(
    state: &SharedState,
    ticket: &Ticket,
    sandbox_id: &str,
) -> Result<Response, ApiError> {
    let loaded = state
        .broker
        .load_sandbox(sandbox_id)
        .await
        .map_err(|e| ApiError::from_broker(e, sandbox_id))?;
    let body = TicketResponse {
        ticket_id: ticket.ticket_id.clone(),
        status: "served".to_string(),
        poll_url: poll_url(state, &ticket.ticket_id),
        position: None,
        retry_after: None,
        allocation: Some(allocation_body(
            state,
            &loaded.sandbox,
            loaded.allocation_event_id(),
        )),
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Poll a waiting-line ticket.
#[utoipa::path(
    get, path = "/v1/tickets/{ticket_id}", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("ticket_id" = String, Path, description = "The `ticket_id` of the 202; not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Instruqt-Sandbox-ID" = Option<String>, Header, description = "The caller id the allocation was asked with; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
    ),
    responses(
        (status = 200, description = "`pending` (with `position` and `Retry-After`: poll again then; a ticket not polled for `TICKET_IDLE_SEC` drops out) or `served` (with `allocation`, as the 201 of `POST /v1/allocate`, `lease_token` included)", body = TicketResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_TICKET_OWNER`: issued to another caller (or, with a per-track credential, another track)", body = ErrorBody),
        (status = 404, description = "`TICKET_NOT_FOUND`", body = ErrorBody),
        (status = 410, description = "`TICKET_DROPPED`: the ticket left the line without a sandbox (not polled, waited `TICKET_MAX_WAIT_SEC`, or refused when its turn came); allocate again", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_ticket(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Principal>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(ticket_id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ticket_id = domain::model::ids::validate_id("ticket_id", &ticket_id)
        .map_err(|e| ApiError::validation("path", "ticket_id", e.to_string()))?;
    let Some(ticket) = tickets::load(state.broker.events().as_ref(), &ticket_id).await? else {
        return Err(ApiError::ticket_not_found(&ticket_id));
    };
    let credential = match &principal {
        Principal::Track(credential) => Some(credential.clone()),
        _ => None,
    };
    // A per-track credential reads only its track's tickets; the shared token never reads the
    // ticket of a track that has its own credential (as with sandboxes).
    let other_track = match (&principal, &credential) {
        (_, Some(c)) => ticket.track_name.as_deref() != Some(c.track.as_str()),
        (Principal::SharedTrack, None) => ticket
            .track_name
            .as_deref()
            .is_some_and(|track| state.credentials.owns_track(track)),
        _ => false,
    };
    if ticket.caller != caller.0 || other_track {
        return Err(ApiError::not_ticket_owner(&ticket_id));
    }
    let command_meta = meta(&caller.0, &request_id);
    let settings = state.waiting_line.ticket_settings();
    match &ticket.state {
        TicketState::Served { sandbox_id } => return served(&state, &ticket, sandbox_id).await,
        TicketState::Dropped { reason } => {
            return Err(ApiError::ticket_dropped(&ticket_id, reason))
        }
        TicketState::Pending => {}
    }
    // Readers understand tickets whatever the flag; only a release that writes them acts.
    if !settings.write {
        return Ok(pending(&state, &ticket_id, StatusCode::OK));
    }
    if ticket.idle_at(state.broker.clock().now()) {
        let dropped = domain::model::events::TicketEvent::TicketDropped {
            reason: "not_polled".to_string(),
        };
        return match tickets::finish(&state.broker, &ticket_id, dropped, &command_meta).await? {
            Some(Ticket {
                state: TicketState::Served { sandbox_id },
                ..
            }) => served(&state, &ticket, &sandbox_id).await,
            _ => Err(ApiError::ticket_dropped(&ticket_id, "not_polled")),
        };
    }
    tickets::record_poll(&state.broker, &ticket, &command_meta).await?;
    // A ticket no line here holds (its instance restarted, or it waits on another one) is tried
    // by the poll itself when nobody waits ahead of it on this instance; its allocation has the
    // ticket's caller and key, so two instances trying at once make one allocation.
    let held_here = state.waiting_line.ticket_position(&ticket_id).is_some();
    if !held_here && !state.waiting_line.has_waiters(&ticket.line_key()) {
        let peer = connect.map(|Extension(ConnectInfo(addr))| addr.ip());
        let limits = AllocationLimits {
            waited_ms: u64::try_from(
                (state.broker.clock().now() - ticket.issued_at)
                    .num_milliseconds()
                    .max(0),
            )
            .ok(),
            ..allocation_limits(&state, credential.as_deref(), &caller, &headers, peer)
        };
        match state
            .broker
            .allocate_limited(&ticket.request(), &command_meta, &limits)
            .await
        {
            Ok(allocation) => {
                let event = domain::model::events::TicketEvent::TicketServed {
                    sandbox_id: allocation.sandbox.sandbox_id.clone(),
                    waited_ms: limits.waited_ms.unwrap_or(0),
                };
                let sandbox_id =
                    match tickets::finish(&state.broker, &ticket_id, event, &command_meta).await? {
                        Some(Ticket {
                            state: TicketState::Served { sandbox_id },
                            ..
                        }) => sandbox_id,
                        _ => allocation.sandbox.sandbox_id,
                    };
                return served(&state, &ticket, &sandbox_id).await;
            }
            Err(BrokerError::NoSandboxAvailable { .. }) => {}
            Err(e) => return Err(ApiError::from_broker(e, "")),
        }
    }
    Ok(pending(&state, &ticket_id, StatusCode::OK))
}
