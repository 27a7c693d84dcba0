//! CORS and the request id at the edge over real HTTP (service on port 0, embedded store):
//! preflights pass without credentials or rate budget, every error a browser may receive is
//! readable cross-origin and carries the request id of its body, origins outside the allow-list
//! get no CORS headers, and unsafe incoming request ids are replaced.

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, JsonReply, Sent, TestApp};

const LAB: &str = "https://lab.example";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Asserts what a browser script needs to read an error: the allowed origin, the exposed headers,
/// and a body whose `request_id` equals `X-Request-ID`.
fn assert_readable_error(reply: &JsonReply, status: StatusCode, code: &str) {
    let (s, h, b) = reply;
    assert_eq!(*s, status, "{b}");
    assert_eq!(b["detail"]["code"].as_str(), Some(code), "{b}");
    assert_eq!(header(h, "access-control-allow-origin"), LAB, "{h:?}");
    let exposed = header(h, "access-control-expose-headers");
    for name in [
        "x-request-id",
        "retry-after",
        "x-ratelimit-remaining",
        "queue-position",
        "preference-applied",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    let id = header(h, "x-request-id");
    assert!(!id.is_empty(), "X-Request-ID missing");
    assert_eq!(b["detail"]["request_id"].as_str(), Some(id), "{b}");
}

/// An app that allows only [`LAB`] and limits unauthenticated callers to `burst` requests.
async fn lab_app(burst: f64) -> TestApp {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| {
        c.cors_allowed_origins = format!("{LAB}, https://other.example");
        c.unauth_rate_limit_rps = 0.001;
        c.unauth_rate_limit_burst = burst;
    });
    spawn_app_with(options).await
}

fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::RequestBuilder {
    app.client
        .request(Method::OPTIONS, format!("{}{path}", app.url))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization")
}

/// Preflights for an admin route are answered without credentials, again and again, without
/// spending the address's rate budget, and carry the request id and security headers.
#[tokio::test]
async fn admin_preflight_needs_no_credentials_and_no_budget() {
    let app = lab_app(2.0).await;
    for _ in 0..5 {
        let (status, h, _) = preflight(&app, "/v1/admin/bulk-delete", LAB)
            .sent_json()
            .await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "a preflight answers 204 as it always did"
        );
        assert_eq!(header(&h, "access-control-allow-origin"), LAB);
        assert!(header(&h, "access-control-allow-methods").contains("POST"));
        assert!(header(&h, "access-control-allow-headers").contains("authorization"));
        assert!(header(&h, "access-control-allow-headers").contains("prefer"));
        assert_eq!(header(&h, "access-control-max-age"), "3600");
        assert!(header(&h, "vary").to_ascii_lowercase().contains("origin"));
        assert!(!header(&h, "x-request-id").is_empty());
        assert_eq!(header(&h, "x-content-type-options"), "nosniff");
        assert!(
            !h.contains_key("x-ratelimit-limit"),
            "preflight was charged"
        );
    }
    // The whole burst of the address is still there after five preflights.
    for _ in 0..2 {
        let (status, h, _) = app
            .client
            .get(format!("{}/v1/admin/stats", app.url))
            .header("Origin", LAB)
            .sent_json()
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(header(&h, "access-control-allow-origin"), LAB);
    }
    app.stop().await;
}

/// The edge's own refusals (401, 404, 405, 429) are readable cross-origin, with the body's
/// request id equal to the header.
#[tokio::test]
async fn error_bodies_are_readable_cross_origin() {
    let app = lab_app(1.0).await;
    let get = |path: &str| {
        app.client
            .get(format!("{}{path}", app.url))
            .header("Origin", LAB)
    };
    let unauthorized = get("/v1/admin/stats").sent_json().await;
    assert_readable_error(&unauthorized, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(unauthorized.1.contains_key("www-authenticate"));
    let limited = get("/v1/admin/stats").sent_json().await;
    assert_readable_error(
        &limited,
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMIT_EXCEEDED",
    );
    assert!(limited.1.contains_key("retry-after"));
    assert_eq!(header(&limited.1, "x-ratelimit-remaining"), "0");

    let app_any = {
        let mut options = AppOptions::new(Backend::Embedded);
        options.configure = Box::new(|c| c.cors_allowed_origins = LAB.into());
        spawn_app_with(options).await
    };
    let not_found = app_any
        .admin(Method::GET, "/v1/nope")
        .header("Origin", LAB)
        .sent_json()
        .await;
    assert_readable_error(&not_found, StatusCode::NOT_FOUND, "NOT_FOUND");
    let wrong_method = app_any
        .admin(Method::PUT, "/v1/admin/stats")
        .header("Origin", LAB)
        .sent_json()
        .await;
    assert_readable_error(
        &wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    );
    assert!(wrong_method.1.contains_key("allow"));
    app_any.stop().await;
    app.stop().await;
}

/// A request that outlives `REQUEST_TIMEOUT_SEC` gets its 408 with the CORS headers and the
/// request id in the body.
#[tokio::test]
async fn timeout_is_readable_cross_origin() {
    let csp = tests::fake_csp::FakeCsp::start().await;
    csp.pause_lists();
    let mut options = AppOptions::new(Backend::Embedded);
    options.jobs.csp.mode = jobs::CspMode::Real;
    options.jobs.csp.base_url = csp.base_url();
    options.jobs.csp.api_token = csp.token().into();
    options.jobs.csp.read_timeout = Duration::from_secs(60);
    options.jobs.csp.rate_limit_rps = 0.0;
    options.configure = Box::new(|c| c.cors_allowed_origins = LAB.into());
    let app = spawn_app_with(options).await;
    // The same state behind a router with a short timeout, on a second port.
    let short = command_api::app(app.state.clone(), Duration::from_millis(300));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let url = format!(
        "http://{}",
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"))
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(command_api::run(short, listener, async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let reply = app
        .client
        .post(format!("{url}/v1/admin/sync"))
        .bearer_auth(tests::app::ADMIN_TOKEN)
        .header("Origin", LAB)
        .header("X-Request-ID", "sync-from-browser")
        .sent_json()
        .await;
    assert_readable_error(&reply, StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT");
    assert_eq!(header(&reply.1, "x-request-id"), "sync-from-browser");
    assert!(csp.list_calls() > 0, "the sync never reached the CSP");
    assert!(started.elapsed() < Duration::from_secs(30));
    csp.resume_lists();
    let _ = stop.send(());
    let _ = server.await;
    app.stop().await;
}

/// An origin outside the allow-list gets no CORS header at all (actual request, error, preflight);
/// an allowed one gets its own origin back, not `*`.
#[tokio::test]
async fn disallowed_origin_gets_no_cors_headers() {
    let app = lab_app(100.0).await;
    let evil = "https://evil.example";
    let replies: Vec<JsonReply> = vec![
        app.client
            .get(format!("{}/healthz", app.url))
            .header("Origin", evil)
            .sent_json()
            .await,
        app.client
            .get(format!("{}/v1/admin/stats", app.url))
            .header("Origin", evil)
            .sent_json()
            .await,
        preflight(&app, "/v1/allocate", evil).sent_json().await,
    ];
    for (status, h, _) in &replies {
        let cors: Vec<_> = h
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{status}: {cors:?}");
        assert!(h.contains_key("x-request-id"), "{status}");
    }
    let (status, h, _) = app
        .client
        .get(format!("{}/healthz", app.url))
        .header("Origin", "https://other.example")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header(&h, "access-control-allow-origin"),
        "https://other.example"
    );
    // Not a browser: no CORS headers either.
    let (_, h, _) = app
        .client
        .get(format!("{}/healthz", app.url))
        .sent_json()
        .await;
    assert!(!h.contains_key("access-control-allow-origin"));
    app.stop().await;
}

/// An `OPTIONS` that is not a preflight is not answered as one: it gets the router's 405.
#[tokio::test]
async fn plain_options_is_not_a_preflight() {
    let app = lab_app(100.0).await;
    let (status, h, body) = app
        .admin(Method::OPTIONS, "/v1/admin/stats")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(
        body["detail"]["request_id"].as_str(),
        Some(header(&h, "x-request-id"))
    );
    app.stop().await;
}

/// A caller's request id is echoed when short and plain; otherwise a fresh uuid replaces it, in
/// the header and the error body alike.
#[tokio::test]
async fn unsafe_request_ids_are_replaced() {
    let app = lab_app(100.0).await;
    let send = |id: String| {
        app.client
            .get(format!("{}/v1/admin/stats", app.url))
            .header("X-Request-ID", id)
            .sent_json()
    };
    let (_, h, b) = send("trace:42_a.b-c".into()).await;
    assert_eq!(header(&h, "x-request-id"), "trace:42_a.b-c");
    assert_eq!(b["detail"]["request_id"].as_str(), Some("trace:42_a.b-c"));
    for unsafe_id in ["a".repeat(129), "two words".into(), "<script>".into()] {
        let (_, h, b): (_, _, Value) = send(unsafe_id.clone()).await;
        let id = header(&h, "x-request-id");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{unsafe_id:?} -> {id:?}");
        assert_eq!(b["detail"]["request_id"].as_str(), Some(id));
    }
    app.stop().await;
}

/// A handler that panics (the edge must turn it into an error response).
async fn boom() -> &'static str {
    panic!("boom")
}

/// A handler that panics answers 500 `INTERNAL_ERROR` in the envelope, with the request id of the
/// header in the body and the CORS headers, and the service keeps serving.
#[tokio::test]
async fn panic_is_a_readable_500() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| c.cors_allowed_origins = LAB.into());
    let app = spawn_app_with(options).await;
    let routes = axum::Router::new()
        .route("/v1/boom", axum::routing::get(boom))
        .route("/v1/fine", axum::routing::get(|| async { "fine" }));
    let router = command_api::with_edge(routes, app.state.clone(), Duration::from_secs(30));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let url = format!(
        "http://{}",
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"))
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(command_api::run(router, listener, async {
        let _ = stopped.await;
    }));
    let reply = app
        .client
        .get(format!("{url}/v1/boom"))
        .header("Origin", LAB)
        .sent_json()
        .await;
    assert_readable_error(&reply, StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR");
    assert!(
        reply.2["detail"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("An unexpected error occurred;") && !m.contains("boom")),
        "the panic message is logged, never returned: {}",
        reply.2
    );
    let (status, _, _) = app.client.get(format!("{url}/v1/fine")).sent_json().await;
    assert_eq!(status, StatusCode::OK, "the service survived the panic");
    let _ = stop.send(());
    let _ = server.await;
    app.stop().await;
}
