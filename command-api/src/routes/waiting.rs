//! The HTTP side of the waiting line on `POST /v1/allocate`: which requests may wait
//! (`Prefer: wait=N`), the `Preference-Applied` header, and the 409 that ends an unserved wait
//! (`Retry-After` and the place in line, as a header and in the envelope). The line itself is
//! `crate::waiting_line`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use domain::{AllocateRequest, Allocation, AllocationLimits, BrokerError, CommandMeta};

use crate::error::ApiError;
use crate::state::SharedState;
use crate::waiting_line::{prefer, Arrival, LineKey};

/// A request that asked to wait, and what it was granted.
#[derive(Debug)]
pub struct LineRequest {
    /// The line it waits in.
    pub key: LineKey,
    /// The wait granted (`Prefer: wait=N`, cut to `WAIT_MAX_SEC`).
    pub wait: Duration,
    /// True when others already wait in that line on this instance: the request goes to the
    /// back without trying first.
    pub behind_others: bool,
    /// Its number on arrival: while it tries first, later arrivals in its line wait for it, and
    /// after a refusal it joins by this number, so concurrent first attempts do not reorder the
    /// line.
    pub arrival: Arrival,
}

/// How an unserved wait ended.
#[derive(Debug, Clone, Copy)]
pub struct WaitEnd {
    /// The request's place in line when it left (1 = next).
    pub position: Option<usize>,
    /// True when the instance was shutting down.
    pub closed: bool,
    /// True when the instance's lines were full and the request did not wait.
    pub full: bool,
}

/// The line a request would wait in.
fn line_key(request: &AllocateRequest) -> LineKey {
    LineKey {
        track: request.track_name.clone(),
        prefix: request
            .name_prefix
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string),
    }
}

/// The wait a request asked for with `Prefer: wait=N` (`None`: it did not ask, or asked for 0).
pub fn requested_wait(
    state: &SharedState,
    headers: &HeaderMap,
    request: &AllocateRequest,
) -> Option<LineRequest> {
    let requested = prefer::preferences(headers).wait_s.filter(|s| *s > 0)?;
    let key = line_key(request);
    let behind_others = state.waiting_line.has_waiters(&key);
    let arrival = state.waiting_line.arrive(&key);
    Some(LineRequest {
        key,
        wait: state.waiting_line.granted_wait(requested),
        behind_others,
        arrival,
    })
}

/// Whether a request that asked for a ticket (`Prefer: respond-async`, tickets written) finds
/// others waiting in its line on this instance: it then takes its ticket without trying first.
pub fn ticket_behind_others(
    state: &SharedState,
    headers: &HeaderMap,
    request: &AllocateRequest,
) -> bool {
    state.waiting_line.ticket_settings().write
        && prefer::preferences(headers).respond_async
        && state.waiting_line.has_waiters(&line_key(request))
}

/// Waits in `line` after a `NO_SANDBOXES_AVAILABLE` refusal; each attempt as the head records
/// how long the request had waited on the allocation it makes (`waited_ms`).
pub async fn wait(
    state: &SharedState,
    line: &LineRequest,
    retry_after_s: u64,
    request: &AllocateRequest,
    meta: &CommandMeta,
    limits: &AllocationLimits,
) -> (Result<Allocation, BrokerError>, WaitEnd) {
    let waited = state
        .waiting_line
        .wait_for_sandbox(
            line.key.clone(),
            &line.arrival,
            line.wait,
            BrokerError::NoSandboxAvailable { retry_after_s },
            |waited_ms| {
                let limits = AllocationLimits {
                    waited_ms: Some(waited_ms),
                    ..limits.clone()
                };
                async move { state.broker.allocate_limited(request, meta, &limits).await }
            },
        )
        .await;
    (
        waited.result,
        WaitEnd {
            position: waited.position,
            closed: waited.closed,
            full: waited.full,
        },
    )
}

/// The error answer of an allocation: a wait that ended unserved gets its place in line and,
/// at shutdown, a message that says so; every other refusal is answered as without waiting.
pub fn refusal(line: Option<&LineRequest>, end: Option<&WaitEnd>, e: BrokerError) -> ApiError {
    let no_sandbox = matches!(e, BrokerError::NoSandboxAvailable { .. });
    let mut error = ApiError::from_broker(e, "");
    let (true, Some(line), Some(end)) = (no_sandbox, line, end) else {
        return error;
    };
    let retry_after = error.retry_after.unwrap_or(1);
    error.position = end.position.map(|p| u16::try_from(p).unwrap_or(u16::MAX));
    error.message = if end.full {
        format!("No sandbox is free and this instance's waiting lines are full; retry in {retry_after} s")
    } else if end.closed {
        error.retry_after = Some(1);
        "This instance is restarting and let its waiting line go; retry now, another instance \
         answers"
            .to_string()
    } else {
        format!(
            "No sandbox became free within the {} s this request waited; retry in {retry_after} s \
             (a sync adds sandboxes; the place in line is not kept)",
            line.wait.as_secs()
        )
    };
    error
}

/// `Preference-Applied: wait=N` for a request whose wait preference was honoured (with the
/// wait granted, which `WAIT_MAX_SEC` may have cut).
pub fn applied_headers(line: &Option<LineRequest>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(line) = line {
        if let Ok(value) = HeaderValue::from_str(&format!("wait={}", line.wait.as_secs())) {
            headers.insert("preference-applied", value);
        }
    }
    headers
}
