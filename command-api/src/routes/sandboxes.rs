//! Track endpoints: allocate, get, mark-for-deletion (the contract of CONTRACT.md that existing
//! track scripts use), and extend — with the tenancy rules of docs/tenancy.md: the lease
//! capability, fair-share caps and the shared token's lane.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::model::sandbox::Sandbox;
use domain::{
    Actor, AllocateRequest, AllocationLimits, BrokerError, CapKind, CommandMeta, FairShareCap,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{self, header_text, Caller, Principal};
use crate::credentials::TrackCredential;
use crate::edge::RequestId;
use crate::error::{ApiError, ErrorBody};
use crate::lease::{self, LEASE_TOKEN_HEADER};
use crate::routes::sandbox_ref::{resolve_sandbox_id, Visibility};
use crate::routes::waiting;
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
    /// The allocation's capability: send it as `X-Lease-Token` on every per-sandbox call. Always
    /// on a 201; on a 200 replay only when the request proved the allocation (its original
    /// strong `Idempotency-Key`, or this token). Keep it like a password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
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

pub(crate) fn meta(caller: &str, request_id: &RequestId) -> CommandMeta {
    CommandMeta {
        actor: Actor::Track(caller.to_string()),
        request_id: Some(request_id.0.clone()),
        correlation_id: None,
    }
}

/// The principal under which the shared token's caps are kept (its track header is the client's
/// choice, so it never names a cap).
const SHARED_TOKEN_SCOPE: &str = "shared-track";

/// The limits of one allocation request (docs/tenancy.md, "Fair share"):
/// * the track quota: a per-track credential's maximum (the lower of it and `TRACK_QUOTAS`);
///   under the shared token only a limit `TRACK_QUOTAS` names for the header's track, while
///   `DEFAULT_TRACK_QUOTA` caps the shared token's principal as a whole;
/// * live allocations per caller id and track (`MAX_ALLOCATIONS_PER_CALLER`, or the credential's
///   `max_allocations_per_caller`);
/// * live allocations per client address (`MAX_ALLOCATIONS_PER_ADDRESS`, off by default).
///
/// Every cap is taken in the allocation's own transaction, so each holds under any burst.
pub(crate) fn allocation_limits(
    state: &SharedState,
    credential: Option<&TrackCredential>,
    caller: &Caller,
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
) -> AllocationLimits {
    let mut caps = Vec::new();
    let scope = credential.map_or(SHARED_TOKEN_SCOPE, |c| c.track.as_str());
    let per_caller = credential
        .and_then(|c| c.max_allocations_per_caller)
        .unwrap_or(state.max_allocations_per_caller);
    if per_caller > 0 {
        caps.push(FairShareCap::caller(scope, &caller.0, per_caller));
    }
    if let Some(limit) = state.max_allocations_per_address {
        let address = auth::client_address(
            headers,
            peer,
            state.trusted_proxy_hops,
            &state.trusted_proxies,
        );
        caps.push(FairShareCap::address(&address, limit));
    }
    if credential.is_none() {
        if let Some(limit) = state.shared_token_quota {
            caps.push(FairShareCap::principal(SHARED_TOKEN_SCOPE, limit));
        }
    }
    AllocationLimits {
        track_limit: credential.and_then(|c| c.max_concurrent_allocations),
        named_track_quota_only: credential.is_none(),
        caps,
        waited_ms: None,
    }
}

/// The shared token allocates only outside the per-track credentials' lanes: it must name a
/// prefix that neither lies inside nor contains one of theirs (a broader prefix would reach their
/// sandboxes), and may not name their track.
fn check_shared_lane(state: &SharedState, request: &AllocateRequest) -> Result<(), ApiError> {
    if let Some(track) = &request.track_name {
        if state.credentials.owns_track(track) {
            return Err(ApiError::forbidden(
                "This track has its own credential; the shared token cannot allocate for it",
            ));
        }
    }
    match &request.name_prefix {
        None => Err(ApiError::shared_token_prefix_required()),
        Some(prefix) if state.credentials.prefix_overlaps(prefix) => {
            Err(ApiError::prefix_not_allowed(prefix))
        }
        Some(_) => Ok(()),
    }
}

/// Whether the lease capability applies to a principal: per-track credentials always, the
/// shared track token with `REQUIRE_LEASE_TOKEN=true`.
fn lease_applies(state: &SharedState, principal: &Principal) -> bool {
    match principal {
        Principal::Track(_) => true,
        Principal::SharedTrack => state.require_lease_token,
        Principal::Admin => false,
    }
}

/// The longest `X-Lease-Token` the OpenAPI document allows (a token is about 60 characters).
const MAX_LEASE_TOKEN_CHARS: usize = 256;

/// Refuses an `X-Lease-Token` longer than the document allows on every route that declares the
/// header, whether or not the lease capability applies to this caller: the contract's rule holds
/// both ways.
pub(crate) fn lease_header_in_bounds(headers: &HeaderMap) -> Result<(), ApiError> {
    match header_text(headers, LEASE_TOKEN_HEADER)? {
        Some(token) if token.chars().count() > MAX_LEASE_TOKEN_CHARS => Err(ApiError::validation(
            "header",
            LEASE_TOKEN_HEADER,
            format!(
                "X-Lease-Token is longer than {MAX_LEASE_TOKEN_CHARS} characters; send the lease_token of the allocation's 201 as it was given"
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether the request's `X-Lease-Token` is the token of the allocation `event_id`.
fn lease_token_proves(
    state: &SharedState,
    headers: &HeaderMap,
    event_id: Option<uuid::Uuid>,
) -> Result<bool, ApiError> {
    let token = header_text(headers, LEASE_TOKEN_HEADER)?;
    Ok(match (token.as_deref(), event_id) {
        (Some(token), Some(event_id)) if !token.is_empty() => {
            state.lease_keys.verify(token, &event_id)
        }
        _ => false,
    })
}

/// The checks of every per-sandbox verb before the command runs: with a per-track credential the
/// caller's signature and the track's ownership (the strong read's `track_name` is the
/// credential's track, stamped at allocation); where the lease capability applies, the
/// `X-Lease-Token` of the sandbox's current allocation (derived again from its `SandboxAllocated`
/// event id and compared in constant time).
pub(crate) async fn check_sandbox_access(
    state: &SharedState,
    principal: &Principal,
    sandbox_id: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let credential = match principal {
        Principal::Track(credential) => Some(credential.as_ref()),
        _ => None,
    };
    // The caller signature was checked by the auth layer, before any bucket was spent.
    let lease = lease_applies(state, principal);
    // The shared token stays out of the per-track credentials' lanes.
    let shared_lane = matches!(principal, Principal::SharedTrack) && !state.credentials.is_empty();
    if credential.is_none() && !lease && !shared_lane {
        return Ok(());
    }
    let loaded = state
        .broker
        .load_sandbox(sandbox_id)
        .await
        .map_err(|e| ApiError::from_broker(e, sandbox_id))?;
    if loaded.sandbox.status.is_none() {
        return Err(ApiError::sandbox_not_found(sandbox_id));
    }
    if let Some(credential) = credential {
        if loaded.sandbox.track_name.as_deref() != Some(credential.track.as_str()) {
            return Err(ApiError::not_owner(sandbox_id));
        }
    }
    if shared_lane
        && state
            .credentials
            .owns(loaded.sandbox.track_name.as_deref(), &loaded.sandbox.name)
    {
        return Err(ApiError::forbidden(
            "This sandbox belongs to a track with its own credential; the shared token cannot use it",
        ));
    }
    if lease {
        if header_text(headers, LEASE_TOKEN_HEADER)?.is_none_or(|t| t.is_empty()) {
            return Err(ApiError::lease_token_required());
        }
        if !lease_token_proves(state, headers, loaded.allocation_event_id())? {
            return Err(ApiError::lease_token_invalid());
        }
    }
    Ok(())
}

/// Whether any sandbox that is not deleted may have a name starting with `prefix`, judged from
/// the projected per-prefix counters (O(groups), never a scan of the pool). A group counts when
/// its name starts with the prefix (`lab` → `lab-demo`) or the prefix goes into the group's
/// serials (`lab-demo-0` → `lab-demo`); a view that keeps no counters cannot tell, so it says yes.
async fn prefix_has_sandboxes(state: &SharedState, prefix: &str) -> Result<bool, ApiError> {
    let prefix = prefix.trim();
    let groups = state.broker.view().stats_by_prefix().await?;
    if groups.is_empty() {
        return Ok(true);
    }
    Ok(groups.iter().any(|(group, counts)| {
        let live = counts.total() - counts.get(domain::SandboxStatus::Deleted) > 0;
        let matches = if group.as_str() == domain::model::pool_prefix::UNGROUPED {
            // Names without a `-`: any prefix without one may start them.
            !prefix.contains('-')
        } else {
            group.starts_with(prefix) || prefix.starts_with(&format!("{group}-"))
        };
        live && matches
    }))
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
        ("X-Instruqt-Sandbox-ID" = Option<String>, Header, example = "student-42", description = "The student (preferred); no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Track-ID" = Option<String>, Header, description = "Legacy caller id; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Instruqt-Track-ID" = Option<String>, Header, example = "aws-intro", description = "Lab slug (analytics); no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Sandbox-Name-Prefix" = Option<String>, Header, example = "lab-demo-", description = "Only names with this prefix; no control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Defaults to the caller; scoped to the caller; no control characters, at most 256 bytes. Where the lease capability applies (per-track credentials; the shared token with `REQUIRE_LEASE_TOKEN=true`) it is a credential: at least 32 random characters of `[A-Za-z0-9_-]` (400 otherwise), stored only as its SHA-256, and the only key that proves a replay (the caller-id default never does)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("X-Lease-Token" = Option<String>, Header, description = "The `lease_token` of the allocation's 201: required with a per-track credential, and with the shared token when `REQUIRE_LEASE_TOKEN=true`", max_length = 256),
        ("Prefer" = Option<String>, Header, example = "wait=20", description = "RFC 7240. `wait=N`: when no sandbox is free (the 409 `NO_SANDBOXES_AVAILABLE` case only), wait up to N seconds (cut to `WAIT_MAX_SEC`) in a first-come line per track and prefix; answered `Preference-Applied: wait=<granted>`. `respond-async` (with `WRITE_EVENTS_WAITING_LINE`; ignored without): in the same case, 202 with a ticket to poll at `GET /v1/tickets/{ticket_id}`. See docs/waiting-line.md"),
    ),
    responses(
        (status = 201, description = "Allocated (after waiting in line with `Prefer: wait`, `Preference-Applied: wait=<granted seconds>`)", body = AllocateResponse),
        (status = 200, description = "Idempotent replay of the live allocation", body = AllocateResponse),
        (status = 202, description = "`Prefer: respond-async` and nothing free: a waiting-line ticket (`Location`, `Retry-After`, `Preference-Applied: respond-async`)", body = crate::routes::tickets::TicketResponse),
        (status = 400, description = "Missing or invalid header; `NAME_PREFIX_REQUIRED` when a per-track credential has several prefixes and none was chosen", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "Wrong token; `PREFIX_NOT_ALLOWED`, `INVALID_CALLER_SIGNATURE`, or `NOT_SANDBOX_OWNER` (the caller's live allocation belongs to another track)", body = ErrorBody),
        (status = 404, description = "`UNKNOWN_PREFIX`: no sandbox in the pool has a name starting with `X-Sandbox-Name-Prefix` (or all of them are deleted); waiting does not help, so there is no `Retry-After`", body = ErrorBody),
        (status = 409, description = "`NO_SANDBOXES_AVAILABLE` (with `retry_after`; after an unserved `Prefer: wait`, also `position` and the `Queue-Position` header: the place in line when the wait ended); `ALREADY_ALLOCATED`: where the lease capability applies, a request without `Idempotency-Key` whose caller already holds a live allocation, unless `X-Lease-Token` proves it (the sandbox is not named)", body = ErrorBody),
        (status = 429, description = "`RATE_LIMIT_EXCEEDED`; `QUOTA_EXCEEDED` when the track holds its quota of concurrent allocations (`TRACK_QUOTAS`, the per-track credential's maximum, or — for the shared token as a whole — `DEFAULT_TRACK_QUOTA`); `CALLER_LIMIT` when the caller already holds `MAX_ALLOCATIONS_PER_CALLER` live allocations in this track; `ADDRESS_LIMIT` when the client address holds `MAX_ALLOCATIONS_PER_ADDRESS`: `limit` and `retry_after` in the envelope", body = ErrorBody),
        (status = 503, description = "`MAINTENANCE`: allocation is drained for the pool or this prefix (`Retry-After`); `SERVICE_UNAVAILABLE`: store unavailable", body = ErrorBody),
    )
)]
pub async fn allocate_sandbox(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    Extension(principal): Extension<Principal>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    lease_header_in_bounds(&headers)?;
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
    if matches!(principal, Principal::SharedTrack) && !state.credentials.is_empty() {
        check_shared_lane(&state, &request)?;
    }
    // Where the capability applies, the key is a credential: strong, and stored only hashed.
    // Without a key the caller-id default is used, which never proves a replay.
    let lease = lease_applies(&state, &principal);
    let keyless = request.idempotency_key.is_none();
    if lease {
        if let Some(key) = request.idempotency_key.take() {
            if let Some(problem) = lease::key_problem(&key) {
                return Err(ApiError::validation("header", "Idempotency-Key", problem));
            }
            request.idempotency_key = Some(lease::hashed_key(&key));
        }
    }
    if let Some(credential) = &credential {
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
    let caller = crate::subjects::allocating_caller(&state, caller, &request).await?;
    request.caller = caller.0.clone();
    let peer = connect.map(|Extension(ConnectInfo(addr))| addr.ip());
    let limits = allocation_limits(&state, credential.as_deref(), &caller, &headers, peer);
    let command_meta = meta(&caller.0, &request_id);
    let wait = waiting::requested_wait(&state, &headers, &request);
    let mut result = match &wait {
        // Somebody already waits in this line: the request joins at the back instead of
        // overtaking them (docs/waiting-line.md).
        Some(line) if line.behind_others => Err(BrokerError::NoSandboxAvailable {
            retry_after_s: state.broker.config().no_sandbox_retry_after_s,
        }),
        _ if waiting::ticket_behind_others(&state, &headers, &request) => {
            Err(BrokerError::NoSandboxAvailable {
                retry_after_s: state.broker.config().no_sandbox_retry_after_s,
            })
        }
        _ => {
            state
                .broker
                .allocate_limited(&request, &command_meta, &limits)
                .await
        }
    };
    // Nothing allocatable under a prefix that no sandbox has is a typo, not a busy pool: it gets
    // its own answer, which no client retries. Only this refusal pays for the check.
    let unknown_prefix = match (&result, request.name_prefix.as_deref()) {
        (Err(BrokerError::NoSandboxAvailable { .. }), Some(prefix)) => {
            !prefix_has_sandboxes(&state, prefix).await?
        }
        _ => false,
    };
    if let (Err(BrokerError::NoSandboxAvailable { .. }), false) = (&result, unknown_prefix) {
        if let Some(response) = crate::routes::tickets::issue_if_asked(
            &state,
            &headers,
            &request,
            &command_meta,
            &limits,
        )
        .await?
        {
            state.metrics.allocate.with_label_values(&["ticket"]).inc();
            return Ok(response);
        }
    }
    let mut waited = None;
    if let (Some(line), false) = (&wait, unknown_prefix) {
        if let Err(BrokerError::NoSandboxAvailable { retry_after_s }) = result {
            let (answer, end) = waiting::wait(
                &state,
                line,
                retry_after_s,
                &request,
                &command_meta,
                &limits,
            )
            .await;
            result = answer;
            waited = Some(end);
        }
    }
    let outcome = match &result {
        Ok(a) if a.replayed => "idempotent",
        Ok(_) => "success",
        Err(BrokerError::NoSandboxAvailable { .. }) if unknown_prefix => "unknown_prefix",
        Err(BrokerError::NoSandboxAvailable { .. }) => "no_sandboxes",
        Err(BrokerError::QuotaExceeded { .. }) => "quota_exceeded",
        // The shared token's quota is a cap on its principal: the same refusal as a track's.
        Err(BrokerError::FairShareExceeded {
            kind: CapKind::Principal,
            ..
        }) => "quota_exceeded",
        Err(BrokerError::FairShareExceeded {
            kind: CapKind::Caller,
            ..
        }) => "caller_limit",
        Err(BrokerError::FairShareExceeded {
            kind: CapKind::Address,
            ..
        }) => "address_limit",
        Err(BrokerError::Maintenance { .. }) => "maintenance",
        Err(_) => "error",
    };
    state.metrics.allocate.with_label_values(&[outcome]).inc();
    state.outcomes.record(outcome);
    state.refusals.record(
        outcome,
        request.track_name.as_deref(),
        request.name_prefix.as_deref(),
    );
    state
        .metrics
        .allocation_latency
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    if unknown_prefix {
        return Err(ApiError::unknown_prefix(
            request.name_prefix.as_deref().unwrap_or_default(),
        ));
    }
    let allocation = result.map_err(|e| waiting::refusal(wait.as_ref(), waited.as_ref(), e))?;
    let token_proves = lease_token_proves(&state, &headers, allocation.allocation_event_id)?;
    if lease && allocation.replayed && keyless && !token_proves {
        // A caller id is no proof: the live allocation stays unnamed.
        return Err(ApiError::already_allocated());
    }
    if matches!(principal, Principal::SharedTrack)
        && state.credentials.owns(
            allocation.sandbox.track_name.as_deref(),
            &allocation.sandbox.name,
        )
    {
        // A replay of a claim made through a per-track credential (same caller id, default key).
        return Err(ApiError::forbidden(
            "This caller's allocation belongs to a track with its own credential; the shared token cannot use it",
        ));
    }
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
        // A replay gets the token again, so a lost 201 does not lock the student out: where the
        // capability applies an unproven replay was refused above (a caller id alone never
        // reveals the token); under the shared token's legacy contract the original key, or the
        // caller id, is the proof (docs/tenancy.md, on turning REQUIRE_LEASE_TOKEN on).
        lease_token: allocation
            .allocation_event_id
            .map(|id| state.lease_keys.issue(&id)),
    };
    let status = if allocation.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, waiting::applied_headers(&wait), Json(body)).into_response())
}

/// The caller's sandbox (strongly consistent): its live allocation, or, after the allocation
/// ended, its status (`pending_deletion`, `deleted`…), so a lab can confirm a release.
#[utoipa::path(
    get, path = "/v1/sandboxes/{sandbox_id}", tag = "Sandboxes",
    security(("bearer" = [])),
    params(
        ("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("X-Lease-Token" = Option<String>, Header, description = "The `lease_token` of the allocation's 201: required with a per-track credential, and with the shared token when `REQUIRE_LEASE_TOKEN=true`", max_length = 256),
    ),
    responses(
        (status = 200, description = "The sandbox", body = SandboxResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's live allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`; `LEASE_TOKEN_REQUIRED` / `LEASE_TOKEN_INVALID`: no or a wrong `X-Lease-Token` where the lease capability applies", body = ErrorBody),
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
    lease_header_in_bounds(&headers)?;
    let caller = crate::subjects::owning_caller(&state, caller, &sandbox_id).await?;
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Owner(&caller.0)).await?;
    check_sandbox_access(&state, &principal, &sandbox_id, &headers).await?;
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
        ("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("X-Lease-Token" = Option<String>, Header, description = "The `lease_token` of the allocation's 201: required with a per-track credential, and with the shared token when `REQUIRE_LEASE_TOKEN=true`", max_length = 256),
    ),
    responses(
        (status = 200, description = "Marked (or already ended; same body)", body = MarkResponse),
        (status = 400, description = "Missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`; `LEASE_TOKEN_REQUIRED` / `LEASE_TOKEN_INVALID`: no or a wrong `X-Lease-Token` where the lease capability applies", body = ErrorBody),
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
    lease_header_in_bounds(&headers)?;
    let caller = crate::subjects::owning_caller(&state, caller, &sandbox_id).await?;
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Owner(&caller.0)).await?;
    check_sandbox_access(&state, &principal, &sandbox_id, &headers).await?;
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
    #[schema(value_type = i64, minimum = 1, maximum = 8760, example = 2)]
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
        ("sandbox_id" = String, Path, example = "mock-001", description = "Broker id or name: not blank, no control characters, at most 256 bytes (UTF-8)", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"),
        ("X-Caller-Signature" = Option<String>, Header, description = "Per-track credentials: hex HMAC-SHA256 of the caller id with the track's secret"),
        ("X-Lease-Token" = Option<String>, Header, description = "The `lease_token` of the allocation's 201: required with a per-track credential, and with the shared token when `REQUIRE_LEASE_TOKEN=true`", max_length = 256),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: an extension of this allocation already made with the key is answered again (its `expires_at`) and adds nothing; the retry's `hours` are not compared. No control characters, at most 256 bytes", max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
    ),
    request_body(content = ExtendRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Extended (or, for a repeated `Idempotency-Key`, extended before): the new `expires_at`", body = ExtendResponse),
        (status = 400, description = "`VALIDATION_ERROR`: `hours` missing, not a whole number, or outside 1–8760; missing or invalid header or id", body = ErrorBody),
        (status = 401, description = "Unauthorized", body = ErrorBody),
        (status = 403, description = "`NOT_SANDBOX_OWNER`: not this caller's allocation (or, with a per-track credential, not this track's); `INVALID_CALLER_SIGNATURE`; `LEASE_TOKEN_REQUIRED` / `LEASE_TOKEN_INVALID`: no or a wrong `X-Lease-Token` where the lease capability applies", body = ErrorBody),
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
    lease_header_in_bounds(&headers)?;
    let caller = crate::subjects::owning_caller(&state, caller, &sandbox_id).await?;
    let sandbox_id = resolve_sandbox_id(&state, &sandbox_id, Visibility::Owner(&caller.0)).await?;
    let hours = extension_hours(&body)?;
    let idempotency_key = match header_text(&headers, "idempotency-key")? {
        Some(key) if !key.is_empty() => Some(
            domain::model::ids::validate_id("idempotency-key", &key)
                .map_err(|e| ApiError::validation("header", "idempotency-key", e.to_string()))?,
        ),
        _ => None,
    };
    check_sandbox_access(&state, &principal, &sandbox_id, &headers).await?;
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
