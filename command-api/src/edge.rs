//! The edge of the service: what holds for every response — handler results, extractor
//! rejections, auth failures, rate-limit refusals, unknown routes, wrong methods, timeouts,
//! panics and CORS preflights alike. From the outside in, [`crate::with_edge`] stacks:
//! * [`drop_unsafe_request_id`], then tower-http's `SetRequestId` / `PropagateRequestId`: an
//!   `X-Request-ID` on every response (the caller's, if short and plain; a new uuid otherwise);
//! * [`edge`]: every error rendered in the one envelope with that id as its `request_id`,
//!   security headers, one JSON access-log line and the request-latency histogram;
//! * [`BrowserCorsLayer`] (tower-http's CORS): answers preflights before any limit or credential
//!   check, and adds the CORS headers to every response coming up through it, the guard's
//!   refusals included;
//! * [`guard`]: load shedding (beyond `MAX_CONCURRENT_REQUESTS` handlers at once, 503 at once)
//!   and the per-address rate limit of requests without credentials (authenticated requests are
//!   limited per principal in [`crate::auth`], after the token check), `X-RateLimit-*` headers;
//! * tower-http's `CatchPanic` ([`panic_response`]): a panic becomes a 500 in the envelope;
//! * [`body_deadline`]: a request body that trickles is cut off with 408 `BODY_TIMEOUT`.

use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::error::ApiError;
use crate::rate_limit::Decision;
use crate::state::SharedState;

/// The request id of the current request (in request extensions), as handlers record it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Paths the rate limit does not apply to (probes and scrapes).
pub(crate) const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Whether `path` is a page that needs no token: the dashboard and its assets, the API docs and
/// their description, and the service root. Such a page is never charged to (or refused by) the
/// address bucket that requests without a valid token share, so a classroom behind one NAT
/// whose failed logins emptied it still loads them; load shedding still applies.
pub(crate) fn is_public_page(path: &str, base: &str) -> bool {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    path == "/"
        || under("/dashboard")
        || under(&format!("{base}/docs"))
        || path == format!("{base}/openapi.json")
}

/// Request headers a browser may send cross-origin (the broker's own and the standard ones).
const ALLOWED_HEADERS: [&str; 12] = [
    "authorization",
    "content-type",
    "x-track-id",
    "x-instruqt-sandbox-id",
    "x-instruqt-track-id",
    "x-sandbox-name-prefix",
    "x-caller-signature",
    "x-lease-token",
    "idempotency-key",
    "x-request-id",
    "last-event-id",
    "prefer",
];
/// Response headers a cross-origin script may read (the contract's list, and the waiting line's:
/// ADR 0029).
const EXPOSED_HEADERS: [&str; 7] = [
    "x-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "retry-after",
    "preference-applied",
    "queue-position",
    "location",
];
/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The header that carries the request id both ways.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether an incoming request id is short and plain, so it is safe to log and echo.
fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?.trim();
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(v)
}

/// Keeps the caller's `X-Request-ID` only if it is short and plain, and removes it otherwise.
///
/// This runs before tower-http's `SetRequestId` because that layer trusts any id already in the
/// request as it is: its `MakeRequestId` is asked only when the header is absent. Removing an
/// unsafe id here is what makes it mint a fresh uuid instead.
pub fn drop_unsafe_request_id<B>(mut req: axum::http::Request<B>) -> axum::http::Request<B> {
    let kept = req
        .headers()
        .get(REQUEST_ID)
        .and_then(sane_request_id)
        .and_then(|v| HeaderValue::from_str(v).ok());
    match kept {
        Some(v) => {
            // `insert` also drops any second copy of the header.
            req.headers_mut().insert(REQUEST_ID, v);
        }
        None => {
            req.headers_mut().remove(REQUEST_ID);
        }
    }
    req
}

/// tower-http's CORS configured from `CORS_ALLOWED_ORIGINS` (`*` or a list of origins), with the
/// broker's methods, allowed and exposed headers and preflight max-age. Entries that are not
/// valid header values are skipped: no browser could send such an `Origin`.
pub fn cors(origins: &[String]) -> BrowserCorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    BrowserCorsLayer(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// A CORS preflight: `OPTIONS` from a browser, naming the method it wants to send.
fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// tower-http's [`CorsLayer`] for browser requests only (see [`BrowserCors`]).
#[derive(Debug, Clone)]
pub struct BrowserCorsLayer(CorsLayer);

impl<S: Clone> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: self.0.layer(inner.clone()),
            direct: inner,
        }
    }
}

/// tower-http answers *every* `OPTIONS` as a preflight (200, empty body). An `OPTIONS` that is
/// not one (no `Origin` or no `Access-Control-Request-Method`) goes past it to the router
/// instead, which answers it like any unsupported method (405 in the envelope).
#[derive(Debug, Clone)]
pub struct BrowserCors<S> {
    cors: Cors<S>,
    direct: S,
}

impl<S, ReqBody, ResBody> Service<axum::http::Request<ReqBody>> for BrowserCors<S>
where
    S: Service<axum::http::Request<ReqBody>, Response = axum::http::Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<tower_http::cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Two clones of one inner service: either may take the next request.
        match self.cors.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.direct.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: axum::http::Request<ReqBody>) -> Self::Future {
        if req.method() == Method::OPTIONS && !is_preflight(req.method(), req.headers()) {
            Either::Right(self.direct.call(req))
        } else {
            Either::Left(self.cors.call(req))
        }
    }
}

/// The 500 a panic below the guard becomes (tower-http's `CatchPanic` calls this); [`edge`]
/// stamps the request id into it like into any other error.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    ApiError::internal(format!("handler panicked: {what}")).render("")
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

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The security headers every response carries but the content security policy (which depends
/// on the path). Built once: parsing header names and values per response showed in profiles.
const SECURITY_HEADERS: [(HeaderName, HeaderValue); 5] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    ),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (
        HeaderName::from_static("permissions-policy"),
        HeaderValue::from_static("geolocation=(), microphone=(), camera=()"),
    ),
];
/// Rate-limit headers (the contract's names).
const RATE_LIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const RATE_LIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

fn content_security_policy(path: &str, base: &str) -> &'static str {
    let docs = path
        .strip_prefix(base)
        .is_some_and(|rest| rest.starts_with("/docs"));
    if docs || path.starts_with("/dashboard") {
        // Swagger UI and the dashboard load only their own embedded assets.
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    }
}

/// The request id tower-http's `SetRequestId` settled on.
fn request_id_of(req: &Request) -> String {
    req.extensions()
        .get::<tower_http::request_id::RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .map(str::to_string)
        // Only reachable if the layer order changes; an id is still better than none.
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Largest total size of a request's headers (names, values and framing) the service reads:
/// browsers and proxies stay far below it, and more is refused with 431 `HEADERS_TOO_LARGE`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most headers one request may carry (hyper's own default), refused likewise above it.
pub const MAX_HEADER_COUNT: usize = 100;
/// hyper's read buffer for one HTTP/1 request head: large enough that a head over
/// [`MAX_HEADER_BYTES`] (up to 1 MiB more) reaches [`edge`], which answers it with the envelope;
/// only a head larger than this gets hyper's own bare 431 and a closed connection.
pub const HTTP1_READ_BUFFER_BYTES: usize = 1024 * 1024 + MAX_HEADER_BYTES;
/// Headers hyper parses per request: above [`MAX_HEADER_COUNT`], so the count is refused by
/// [`edge`] with the envelope rather than by hyper without one.
pub const HTTP1_MAX_HEADERS: usize = 1000;

/// The size of a request head's header block as it was sent (`name: value\r\n` each).
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The envelope middleware (see the module docs): error envelope, security headers, access log.
pub async fn edge(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Counted down on drop, so a request cancelled mid-way (client gone) is not counted forever.
    let _in_flight = InFlight::enter(&state.metrics.in_flight);
    let request_id = request_id_of(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let from_browser = req.headers().contains_key(header::ORIGIN);
    let preflight = is_preflight(&method, req.headers());
    let caller = req
        .headers()
        .get("x-instruqt-sandbox-id")
        .or_else(|| req.headers().get("x-track-id"))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect::<String>());
    let logged_caller = crate::subjects::LoggedCaller::default();
    req.extensions_mut().insert(logged_caller.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());

    let oversized =
        header_bytes(req.headers()) > MAX_HEADER_BYTES || req.headers().len() > MAX_HEADER_COUNT;
    let mut response = if oversized {
        ApiError::headers_too_large(MAX_HEADER_BYTES, MAX_HEADER_COUNT).into_response()
    } else {
        next.run(req).await
    };
    // With pseudonyms on, the access line names the pseudonym the handler acted for, never the
    // header's clear id (docs/personal-data.md).
    let caller = if state.subjects.pseudonymised() {
        logged_caller.get()
    } else {
        caller
    };
    // A redirect (`/v1/docs` → `/v1/docs/`) says where to go in its body too, for a client that
    // does not follow it.
    if response.status().is_redirection() {
        if let Some(location) = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        {
            let status = response.status();
            let mut redirect = (
                status,
                axum::Json(serde_json::json!({
                    "location": location,
                    "message": format!("Moved to {location}"),
                    "request_id": request_id,
                })),
            )
                .into_response();
            for (name, value) in response.headers() {
                if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                    redirect.headers_mut().insert(name.clone(), value.clone());
                }
            }
            response = redirect;
        }
    }
    // tower-http answers a preflight 200; the broker always answered 204 (no content), and
    // keeps doing so.
    if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    let principal = response
        .extensions()
        .get::<crate::auth::AuthenticatedAs>()
        .map(|p| p.0.clone());
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
        // Keep what the inner layers said about the response (Allow on 405, WWW-Authenticate on
        // 401, the CORS and rate-limit headers); only the body and its framing are replaced.
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE
                && name != header::CONTENT_LENGTH
                && !rendered.headers().contains_key(name)
            {
                rendered.headers_mut().append(name.clone(), value.clone());
            }
        }
        response = rendered;
    }

    let headers = response.headers_mut();
    // tower-http sets the methods, headers and max-age of a preflight (and the exposed headers,
    // and `*` for a wildcard) whatever the origin; a caller that is not an allowed browser
    // origin gets none of them, as before.
    if !from_browser || !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
        ] {
            headers.remove(name);
        }
    }
    headers.reserve(SECURITY_HEADERS.len() + 1);
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, value);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(content_security_policy(&path, &state.base_path)),
    );

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

/// The guard middleware (see the module docs): load shedding and the per-address rate limit.
/// Its refusals are rendered without a request id; [`edge`] re-renders them with it.
pub async fn guard(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if EXEMPT.contains(&path) {
        return next.run(req).await;
    }
    let has_credentials = req.headers().contains_key(header::AUTHORIZATION);
    let public_page = is_public_page(path, &state.base_path);
    let address = crate::auth::address_of(&state, &req);
    let mut decision = None;
    let mut response = if let Ok(_permit) = state.in_flight.clone().try_acquire_owned() {
        // The permit lives until the handler has produced its response (a stream's body is
        // not counted), so the limit bounds work in progress, not open streams.
        if public_page {
            next.run(req).await
        } else if has_credentials {
            // The auth layer of the route charges the principal's bucket (or, for a bad
            // credential, the address's); a route without auth is charged below.
            let response = next.run(req).await;
            match response.extensions().get::<Decision>() {
                Some(_) => response,
                None => {
                    let d = crate::auth::check_address(&state, &address);
                    decision = Some(d);
                    if d.allowed {
                        response
                    } else {
                        ApiError::address_rate_limited(d.retry_after).render("")
                    }
                }
            }
        } else {
            let d = crate::auth::check_address(&state, &address);
            decision = Some(d);
            if d.allowed {
                req.extensions_mut().insert(crate::auth::AddressCharged);
                next.run(req).await
            } else {
                ApiError::address_rate_limited(d.retry_after).render("")
            }
        }
    } else {
        ApiError::overloaded().render("")
    };
    if let Some(d) = response.extensions().get::<Decision>() {
        decision = Some(*d);
    }
    if let Some(d) = decision {
        if !d.allowed {
            state.metrics.rate_limited.inc();
            state.outcomes.record_rate_limited();
        }
        let headers = response.headers_mut();
        set(headers, RATE_LIMIT_LIMIT, &d.limit.to_string());
        set(headers, RATE_LIMIT_REMAINING, &d.remaining.to_string());
        if !d.allowed {
            set(headers, header::RETRY_AFTER, &d.retry_after.to_string());
        }
    }
    response
}

/// The body-deadline middleware: a request body must arrive within `BODY_READ_TIMEOUT_SEC` of
/// the request's headers. The body is wrapped so that reading it fails at the deadline; the
/// handler's answer to that failure (a 400 from its extractor) is replaced with 408
/// `BODY_TIMEOUT`, and the connection is closed after it, since the rest of the body may still
/// be on its way. A request without a body skips all of this.
pub async fn body_deadline(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if hyper::body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::new(Deadlined {
        body,
        deadline: Box::pin(tokio::time::sleep(state.body_read_timeout)),
        timed_out: timed_out.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    if !timed_out.load(Ordering::Relaxed) {
        return response;
    }
    let mut refused = ApiError::body_timeout(state.body_read_timeout.as_secs()).into_response();
    refused
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    refused
}

/// A request body that fails once its deadline passes (see [`body_deadline`]).
struct Deadlined {
    body: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

/// The error a [`Deadlined`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl hyper::body::Body for Deadlined {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.timed_out.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
                } else {
                    Poll::Pending
                }
            }
            ready => ready,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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

    fn kept(id: &str) -> Option<String> {
        let req = axum::http::Request::builder()
            .header("x-request-id", id)
            .body(())
            .map(drop_unsafe_request_id)
            .ok()?;
        req.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Incoming request ids are kept only when short and plain; others are removed.
    #[test]
    fn request_ids_are_sanitised() {
        assert_eq!(kept("abc-123_x.y").as_deref(), Some("abc-123_x.y"));
        assert_eq!(kept("bad id with spaces"), None);
        assert_eq!(kept(&"a".repeat(200)), None);
        assert_eq!(kept(&"a".repeat(128)).map(|s| s.len()), Some(128));
    }
}
