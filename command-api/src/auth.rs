//! Bearer-token checks (constant time), the caller-id extractor, and the rate limit, which runs
//! here — after the token has been checked — so that a bucket is always chosen by a credential
//! the request has proven, never by a header it merely names.
//!
//! * A valid track credential is limited per (credential, caller); the admin token has its own
//!   bucket.
//! * A request without a valid credential for the route is charged to a small bucket of its
//!   client address (see [`client_address`]), so guessing tokens or flooding with bad ones is
//!   throttled without touching anyone's authenticated bucket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::credentials::{SignatureCheck, SignedRequest, TrackCredential};
use crate::error::ApiError;
use crate::rate_limit::Decision;
use crate::state::SharedState;

/// Which token a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The track scripts' token.
    Track,
    /// The operators' token.
    Admin,
}

/// Who a request authenticated as (in the request extensions of track routes).
#[derive(Debug, Clone)]
pub enum Principal {
    /// The shared track token: any track, any caller (kept for existing scripts).
    SharedTrack,
    /// A per-track credential: only its prefixes and its own sandboxes.
    Track(Arc<TrackCredential>),
    /// The operators' token.
    Admin,
}

impl Principal {
    /// How the access log names the principal: `shared-track`, `track:<name>` or `admin` (so
    /// operators can see which requests still use the shared token).
    pub fn label(&self) -> String {
        match self {
            Principal::SharedTrack => "shared-track".to_string(),
            Principal::Track(c) => format!("track:{}", c.track),
            Principal::Admin => "admin".to_string(),
        }
    }

    /// The role the principal plays.
    pub fn role(&self) -> Role {
        match self {
            Principal::SharedTrack | Principal::Track(_) => Role::Track,
            Principal::Admin => Role::Admin,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 9110 §11.1).
pub(crate) fn bearer_token(raw: &HeaderValue) -> Option<&str> {
    let value = raw.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Resolves the bearer token of a request to a principal (401 when absent, malformed or unknown).
pub fn authenticate(state: &SharedState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some(raw) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "Missing Authorization header; send `Authorization: Bearer <token>` with the track \
             or admin token",
        ));
    };
    let Some(token) = bearer_token(raw) else {
        return Err(ApiError::unauthorized(
            "The Authorization header must be `Bearer <token>`",
        ));
    };
    // Every comparison runs whatever matches, so timing does not reveal which token it was.
    let now = state.broker.clock().now();
    let shared = state
        .track_token
        .matches(token, now)
        .filter(|_| state.shared_track_token_enabled);
    let admin = state.admin_token.matches(token, now);
    let credential = state.credentials.find(token, now);
    if let Some((credential, matched)) = credential {
        note_previous(state, matched, || {
            format!("track_token:{}", credential.track)
        });
        Ok(Principal::Track(credential))
    } else if let Some(matched) = shared {
        note_previous(state, matched, || "api_token".to_string());
        Ok(Principal::SharedTrack)
    } else if let Some(matched) = admin {
        note_previous(state, matched, || "admin_token".to_string());
        Ok(Principal::Admin)
    } else {
        Err(ApiError::unauthorized(
            "Unknown bearer token; use the track or admin token the broker is configured with \
             (in development, printed when it starts)",
        ))
    }
}

/// Counts a request authenticated with a secret's previous value (a rotation in progress), so an
/// operator sees when clients have moved to the new one.
pub(crate) fn note_previous(
    state: &SharedState,
    matched: crate::rotation::Matched,
    secret: impl FnOnce() -> String,
) {
    if matched == crate::rotation::Matched::Previous {
        state
            .metrics
            .previous_secret_used
            .with_label_values(&[&secret()])
            .inc();
    }
}

/// Resolves the bearer token of a request to a role (401 when absent, malformed or unknown).
pub fn role_of(state: &SharedState, headers: &HeaderMap) -> Result<Role, ApiError> {
    authenticate(state, headers).map(|p| p.role())
}

fn with_challenge(e: ApiError) -> Response {
    let mut response = e.into_response();
    if response.status() == axum::http::StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    response
}

/// The client's address: with `hops` trusted proxies in front and the peer one of them
/// (`proxies`), the address the outermost trusted proxy saw (the `hops`-th `X-Forwarded-For`
/// entry from the right — entries further left are whatever the client wrote); otherwise, or
/// when the header is short or malformed, the peer address (a direct client's header is its
/// own invention).
pub fn client_address(
    req_headers: &HeaderMap,
    peer: Option<IpAddr>,
    hops: usize,
    proxies: &crate::network::TrustedProxies,
) -> String {
    let through_proxy = peer.is_none_or(|ip| proxies.is_proxy(ip, hops));
    if hops > 0 && through_proxy {
        let entries: Vec<&str> = req_headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if entries.len() >= hops {
            if let Ok(ip) = entries[entries.len() - hops].parse::<IpAddr>() {
                return ip.to_string();
            }
        }
    }
    peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string())
}

fn peer_ip(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The client address of a request under the configured proxy hops.
pub(crate) fn address_of(state: &SharedState, req: &Request) -> String {
    client_address(
        req.headers(),
        peer_ip(req),
        state.trusted_proxy_hops,
        &state.trusted_proxies,
    )
}

/// Charges one request without a valid credential to its client address's bucket.
pub(crate) fn check_address(state: &SharedState, address: &str) -> Decision {
    state
        .address_limiter
        .check(&format!("addr:{address}"), Instant::now())
}

/// The caller a track request names, bounded, for the rate-limit key only (the handlers
/// validate it properly).
fn named_caller(headers: &HeaderMap) -> String {
    for name in ["x-instruqt-sandbox-id", "x-track-id"] {
        if let Some(v) = headers.get(name) {
            let bytes = v.as_bytes();
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                let n = bytes.len().min(256);
                return String::from_utf8_lossy(&bytes[..n]).trim().to_string();
            }
        }
    }
    String::new()
}

fn principal_key(principal: &Principal, headers: &HeaderMap) -> String {
    match principal {
        // One bucket per student of a track; track names are plain ids, so `:` cannot collide.
        Principal::SharedTrack => format!("track::{}", named_caller(headers)),
        Principal::Track(c) => format!("track:{}:{}", c.track, named_caller(headers)),
        Principal::Admin => "admin".to_string(),
    }
}

fn refused(decision: Decision, error: Option<ApiError>) -> Response {
    let mut response = match error {
        Some(e) if decision.allowed => with_challenge(e),
        // A refused credential is charged to the address's bucket: the 429 says so.
        Some(_) => ApiError::address_rate_limited(decision.retry_after).into_response(),
        None => ApiError::rate_limited(decision.retry_after).into_response(),
    };
    response.extensions_mut().insert(decision);
    response
}

async fn admit(
    state: &SharedState,
    principal: Principal,
    mut req: Request,
    next: Next,
) -> Response {
    let decision = state
        .limiter
        .check(&principal_key(&principal, req.headers()), Instant::now());
    if !decision.allowed {
        return refused(decision, None);
    }
    let label = AuthenticatedAs(principal.label());
    req.extensions_mut().insert(principal);
    let mut response = next.run(req).await;
    response.extensions_mut().insert(decision);
    response.extensions_mut().insert(label);
    response
}

/// The principal's log label, carried on the response for the access log.
#[derive(Debug, Clone)]
pub(crate) struct AuthenticatedAs(pub(crate) String);

/// Marks a request the edge has already charged to its address (it carried no credential).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddressCharged;

fn deny(state: &SharedState, req: &Request, error: ApiError) -> Response {
    if req.extensions().get::<AddressCharged>().is_some() {
        return with_challenge(error);
    }
    refused(check_address(state, &address_of(state, req)), Some(error))
}

/// Checks a per-track credential's caller signature (docs/tenancy.md): over time, method, path and
/// the caller the request names, within `CALLER_SIGNATURE_WINDOW_SEC`.
fn check_signature(
    state: &SharedState,
    credential: &TrackCredential,
    req: &Request,
) -> Result<(), ApiError> {
    if !credential.signs_callers() {
        return Ok(());
    }
    let signature = header_text(req.headers(), "x-caller-signature")?;
    let caller = named_caller(req.headers());
    // The path as the client sent it: inside the nested `/v1` router the URI has lost its prefix.
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path(), |uri| uri.0.path());
    let signed = SignedRequest {
        method: req.method().as_str(),
        path,
        caller: &caller,
        now: state.broker.clock().now().timestamp(),
        window_s: state.signature_window_s,
        allow_legacy: state.allow_legacy_signature,
    };
    match credential.check_request_signature(&signed, signature.as_deref()) {
        SignatureCheck::Accepted => Ok(()),
        SignatureCheck::AcceptedWithPrevious => {
            note_previous(state, crate::rotation::Matched::Previous, || {
                format!("caller_secret:{}", credential.track)
            });
            Ok(())
        }
        SignatureCheck::Missing => Err(ApiError::invalid_caller_signature(
            "X-Caller-Signature is required for this track",
        )),
        SignatureCheck::Invalid => Err(ApiError::invalid_caller_signature(
            "X-Caller-Signature does not match this request (t=<unix seconds>,v1=<hex HMAC-SHA256 of t, method, path and caller>)",
        )),
        SignatureCheck::Expired => Err(ApiError::invalid_caller_signature(
            "X-Caller-Signature has expired: its time is outside the accepted window",
        )),
    }
}

/// Route layer of the track endpoints: the shared track token or a per-track credential. A
/// caller signature is verified here, before the caller's bucket is spent, so forged requests
/// are charged to their own address and never to the student they name.
pub async fn require_track(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match authenticate(&state, req.headers()) {
        Ok(Principal::Track(credential)) => match check_signature(&state, &credential, &req) {
            Ok(()) => admit(&state, Principal::Track(credential), req, next).await,
            Err(e) => deny(&state, &req, e),
        },
        Ok(p @ Principal::SharedTrack) => admit(&state, p, req, next).await,
        Ok(Principal::Admin) => deny(
            &state,
            &req,
            ApiError::forbidden(
                "This route takes the track token (brokerctl: BROKER_TRACK_TOKEN), not the admin token",
            ),
        ),
        Err(e) => deny(&state, &req, e),
    }
}

/// Route layer of the admin endpoints: the admin token only (a track token gets 403).
pub async fn require_admin(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match authenticate(&state, req.headers()) {
        Ok(Principal::Admin) => admit(&state, Principal::Admin, req, next).await,
        Ok(_) => deny(
            &state,
            &req,
            ApiError::forbidden("This route takes the admin token (brokerctl: BROKER_ADMIN_TOKEN)"),
        ),
        Err(e) => deny(&state, &req, e),
    }
}

/// Route layer of routes both kinds of token may call (`GET /v1/capacity`): a per-track
/// credential (its signature checked), the shared track token or the admin token; the handler
/// narrows what each may ask.
pub async fn require_any(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match authenticate(&state, req.headers()) {
        Ok(Principal::Track(credential)) => match check_signature(&state, &credential, &req) {
            Ok(()) => admit(&state, Principal::Track(credential), req, next).await,
            Err(e) => deny(&state, &req, e),
        },
        Ok(principal) => admit(&state, principal, req, next).await,
        Err(e) => deny(&state, &req, e),
    }
}

/// The student a track request acts for: `X-Instruqt-Sandbox-ID`, else `X-Track-ID` (each
/// trimmed; an empty or whitespace value falls through to the next header). With
/// `STUDENT_IDS=pseudonymised` the first field is the student's pseudonym, never the id
/// (`crate::subjects`); the second holds the clear id only while the switch's fallback lasts,
/// for the handlers that look for allocations made before it. Never stored, never printed.
#[derive(Clone)]
pub struct Caller(pub String, pub Option<String>);

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Caller")
            .field(&self.0)
            .finish_non_exhaustive()
    }
}

/// Reads a header as UTF-8 text; a value that is not valid UTF-8 is a 400.
pub fn header_text(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ApiError::validation("header", name, "not valid UTF-8")),
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        // Both headers are checked even when the first one decides: a malformed id header is a
        // 400 wherever it appears, as the OpenAPI document states for each of them.
        let mut caller = None;
        for name in ["x-instruqt-sandbox-id", "x-track-id"] {
            if let Some(value) = header_text(&parts.headers, name)? {
                if !value.is_empty() {
                    let id = domain::model::ids::validate_id("caller id", &value)
                        .map_err(|e| ApiError::validation("header", name, e.to_string()))?;
                    caller.get_or_insert(id);
                }
            }
        }
        // The one place a student id enters: from here on only its pseudonym travels.
        let student = caller.ok_or_else(ApiError::missing_sandbox_id)?;
        let caller = state.subjects.caller(student).await?;
        if let Some(logged) = parts.extensions.get::<crate::subjects::LoggedCaller>() {
            logged.set(&caller.0);
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bearer scheme is matched case-insensitively; other schemes and empty tokens are not.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for (raw, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Token abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            assert_eq!(bearer_token(&HeaderValue::from_static(raw)), want, "{raw}");
        }
    }

    /// With trusted proxies, the address is the hop the outermost trusted proxy appended.
    #[test]
    fn client_address_uses_trusted_hops_only() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.1"),
        );
        let peer = Some(IpAddr::from([10, 0, 0, 2]));
        let any = crate::network::TrustedProxies::default();
        assert_eq!(client_address(&h, peer, 0, &any), "10.0.0.2");
        assert_eq!(client_address(&h, peer, 1, &any), "10.0.0.1");
        assert_eq!(client_address(&h, peer, 2, &any), "1.2.3.4");
        assert_eq!(client_address(&h, peer, 5, &any), "10.0.0.2");
        // Listed proxy networks: only a peer in them speaks for the client.
        let listed: crate::network::TrustedProxies = "10.0.0.0/30".parse().unwrap_or_default();
        assert_eq!(client_address(&h, peer, 1, &listed), "10.0.0.1");
        let direct = Some(IpAddr::from([192, 0, 2, 9]));
        assert_eq!(client_address(&h, direct, 1, &listed), "192.0.2.9");
    }
}
