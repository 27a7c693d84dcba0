//! Bearer-token checks (constant time) and the caller-id extractor.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::SharedState;

/// Which token a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The track scripts' token.
    Track,
    /// The operators' token.
    Admin,
}

fn equal(a: &str, b: &str) -> bool {
    // `ct_eq` on equal-length slices is constant-time; a length mismatch returns early, which
    // reveals only the length of the configured token.
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Resolves the bearer token of a request to a role (401 when absent, malformed or unknown).
pub fn role_of(state: &SharedState, headers: &HeaderMap) -> Result<Role, ApiError> {
    let Some(raw) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized("Missing Authorization header"));
    };
    let Some(token) = raw.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(ApiError::unauthorized(
            "Invalid authorization header format",
        ));
    };
    let token = token.trim();
    if equal(token, &state.track_token) {
        Ok(Role::Track)
    } else if equal(token, &state.admin_token) {
        Ok(Role::Admin)
    } else {
        Err(ApiError::unauthorized("Invalid bearer token"))
    }
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

/// Route layer of the track endpoints: the track token only.
pub async fn require_track(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match role_of(&state, req.headers()) {
        Ok(Role::Track) => next.run(req).await,
        Ok(Role::Admin) => with_challenge(ApiError::forbidden("Track token required")),
        Err(e) => with_challenge(e),
    }
}

/// Route layer of the admin endpoints: the admin token only (the track token gets 403).
pub async fn require_admin(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match role_of(&state, req.headers()) {
        Ok(Role::Admin) => next.run(req).await,
        Ok(Role::Track) => with_challenge(ApiError::forbidden("Admin access required")),
        Err(e) => with_challenge(e),
    }
}

/// The student a track request acts for: `X-Instruqt-Sandbox-ID`, else `X-Track-ID` (each
/// trimmed; an empty or whitespace value falls through to the next header).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// Reads a header as UTF-8 text; a value that is not valid UTF-8 is a 400.
pub fn header_text(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ApiError::validation("header", name, "not valid UTF-8")),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        for name in ["x-instruqt-sandbox-id", "x-track-id"] {
            if let Some(value) = header_text(&parts.headers, name)? {
                if !value.is_empty() {
                    let id = domain::model::ids::validate_id("caller id", &value)
                        .map_err(|e| ApiError::validation("header", name, e.to_string()))?;
                    return Ok(Caller(id));
                }
            }
        }
        Err(ApiError::missing_sandbox_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token comparison matches exactly, never on prefixes.
    #[test]
    fn tokens_compare_exactly() {
        assert!(equal("abc", "abc"));
        assert!(!equal("abc", "abd"));
        assert!(!equal("ab", "abc"));
        assert!(!equal("", "abc"));
    }
}
