//! The outermost layer, so that what it guarantees holds for every response — handler results,
//! extractor rejections, auth failures, rate-limit refusals, unknown routes, wrong methods,
//! timeouts, panics and CORS preflights alike:
//! * an `X-Request-ID` (the caller's, if sane) that equals the `request_id` of any error body;
//! * every error rendered in the one envelope;
//! * security headers and CORS headers;
//! * load shedding: beyond `MAX_CONCURRENT_REQUESTS` handlers at once, 503 at once;
//! * the per-address rate limit of requests without credentials (authenticated requests are
//!   limited per principal in [`crate::auth`], after the token check), `X-RateLimit-*` headers;
//! * one JSON access-log line and the request-latency histogram.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures::FutureExt;

use crate::error::ApiError;
use crate::rate_limit::Decision;
use crate::state::SharedState;

/// The request id of the current request (in request extensions).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Paths the rate limit does not apply to (probes and scrapes).
pub(crate) const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

const ALLOWED_HEADERS: &str = "authorization, content-type, x-track-id, x-instruqt-sandbox-id, x-instruqt-track-id, x-sandbox-name-prefix, x-caller-signature, idempotency-key, x-request-id, last-event-id";
const EXPOSED_HEADERS: &str = "x-request-id, x-ratelimit-limit, x-ratelimit-remaining, retry-after";

/// Accepts an incoming request id only if it is short and plain, so it is safe to log and echo.
fn sane_request_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?.trim();
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| v.to_string())
}

/// Methods the latency metric names; anything else is `other`, so clients cannot mint series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

fn origin_allowed(state: &SharedState, origin: &str) -> bool {
    state.cors_origins.iter().any(|o| o == "*" || o == origin)
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

fn content_security_policy(path: &str, base: &str) -> &'static str {
    if path.starts_with(&format!("{base}/docs")) || path.starts_with("/dashboard") {
        // Swagger UI and the dashboard load only their own embedded assets.
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    }
}

/// Runs the inner service, turning a panic into a 500.
async fn run_guarded(next: Next, req: Request, request_id: &str) -> Response {
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => ApiError::internal("handler panicked").render(request_id),
    }
}

/// The edge middleware (see the module docs).
pub async fn edge(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Counted down on drop, so a request cancelled mid-way (client gone) is not counted forever.
    let _in_flight = InFlight::enter(&state.metrics.in_flight);
    let request_id =
        sane_request_id(req.headers()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let caller = req
        .headers()
        .get("x-instruqt-sandbox-id")
        .or_else(|| req.headers().get("x-track-id"))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect::<String>());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let preflight = method == Method::OPTIONS
        && origin.is_some()
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);

    let exempt = EXEMPT.contains(&path.as_str());
    let has_credentials = req.headers().contains_key(header::AUTHORIZATION);
    let address = crate::auth::address_of(&state, &req);
    let mut decision = None;
    let mut response = if preflight {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    } else if exempt {
        run_guarded(next, req, &request_id).await
    } else if let Ok(_permit) = state.in_flight.clone().try_acquire_owned() {
        // The permit lives until the handler has produced its response (a stream's body is
        // not counted), so the limit bounds work in progress, not open streams.
        if has_credentials {
            // The auth layer of the route charges the principal's bucket (or, for a bad
            // credential, the address's); a route without auth is charged below.
            let response = run_guarded(next, req, &request_id).await;
            match response.extensions().get::<Decision>() {
                Some(_) => response,
                None => {
                    let d = crate::auth::check_address(&state, &address);
                    decision = Some(d);
                    if d.allowed {
                        response
                    } else {
                        ApiError::rate_limited(d.retry_after).render(&request_id)
                    }
                }
            }
        } else {
            let d = crate::auth::check_address(&state, &address);
            decision = Some(d);
            if d.allowed {
                req.extensions_mut().insert(crate::auth::AddressCharged);
                run_guarded(next, req, &request_id).await
            } else {
                ApiError::rate_limited(d.retry_after).render(&request_id)
            }
        }
    } else {
        ApiError::overloaded().render(&request_id)
    };
    if let Some(d) = response.extensions().get::<Decision>() {
        decision = Some(*d);
    }
    let principal = response
        .extensions()
        .get::<crate::auth::AuthenticatedAs>()
        .map(|p| p.0.clone());
    if decision.is_some_and(|d| !d.allowed) {
        state.metrics.rate_limited.inc();
    }
    let status = response.status();
    let mut error_code = None;
    // Probes answer in their own format (a not-ready `/readyz` is a 503 with its checks).
    let readiness_body = path == "/readyz" && status == StatusCode::SERVICE_UNAVAILABLE;
    if (status.is_client_error() || status.is_server_error()) && !readiness_body {
        let error = response
            .extensions()
            .get::<ApiError>()
            .cloned()
            .unwrap_or_else(|| ApiError::from_status(status));
        if let Some(cause) = &error.cause {
            tracing::error!(target: "access", request_id = %request_id, code = error.code, cause = %cause, "request failed");
        }
        error_code = Some(error.code);
        let mut rendered = error.render(&request_id);
        // Keep protocol headers the inner layers set (Allow on 405, WWW-Authenticate on 401).
        for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
            if let Some(v) = response.headers().get(&name) {
                rendered.headers_mut().insert(name, v.clone());
            }
        }
        response = rendered;
    }

    let headers = response.headers_mut();
    set(headers, "x-request-id", &request_id);
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "x-frame-options", "DENY");
    set(
        headers,
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    );
    set(headers, "referrer-policy", "no-referrer");
    set(
        headers,
        "permissions-policy",
        "geolocation=(), microphone=(), camera=()",
    );
    set(
        headers,
        "content-security-policy",
        content_security_policy(&path, &state.base_path),
    );
    if let Some(d) = decision {
        set(headers, "x-ratelimit-limit", &d.limit.to_string());
        set(headers, "x-ratelimit-remaining", &d.remaining.to_string());
        if !d.allowed {
            set(headers, "retry-after", &d.retry_after.to_string());
        }
    }
    if let Some(origin) = origin.as_deref().filter(|o| origin_allowed(&state, o)) {
        let allow = if state.cors_origins.iter().any(|o| o == "*") {
            "*"
        } else {
            origin
        };
        set(headers, "access-control-allow-origin", allow);
        set(headers, "access-control-expose-headers", EXPOSED_HEADERS);
        if allow != "*" {
            set(headers, "vary", "Origin");
        }
        if preflight {
            set(
                headers,
                "access-control-allow-methods",
                "GET, POST, OPTIONS",
            );
            set(headers, "access-control-allow-headers", ALLOWED_HEADERS);
            set(headers, "access-control-max-age", "3600");
        }
    }

    let latency = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .request_latency
        .with_label_values(&[method_label(&method), &route, &status.to_string()])
        .observe(latency.as_secs_f64());
    let latency_ms = latency.as_millis() as u64;
    if status >= 500 {
        tracing::error!(target: "access", method = %method, path = %path, route = %route, status, code = error_code, latency_ms, request_id = %request_id, caller = caller.as_deref(), principal = principal.as_deref(), "request");
    } else if status >= 400 {
        tracing::warn!(target: "access", method = %method, path = %path, route = %route, status, code = error_code, latency_ms, request_id = %request_id, caller = caller.as_deref(), principal = principal.as_deref(), "request");
    } else {
        tracing::info!(target: "access", method = %method, path = %path, route = %route, status, latency_ms, request_id = %request_id, caller = caller.as_deref(), principal = principal.as_deref(), "request");
    }
    response
}

/// One request inside the service, for `broker_requests_in_flight` (what a drain waits on).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Incoming request ids are honoured only when short and plain.
    #[test]
    fn request_ids_are_sanitised() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(sane_request_id(&h).as_deref(), Some("abc-123_x.y"));
        h.insert(
            "x-request-id",
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_eq!(sane_request_id(&h), None);
        let long = "a".repeat(200);
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("x")),
        );
        assert_eq!(sane_request_id(&h), None);
    }
}
