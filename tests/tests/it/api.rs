//! The REST contract over real HTTP (service on port 0), on the embedded store; the concurrency
//! property runs on both adapters (see `allocation_concurrency.rs`).

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{
    read_json, spawn_app, spawn_app_with, AppOptions, Backend, Sent, ADMIN_TOKEN, TRACK_TOKEN,
};

fn code(body: &Value) -> &str {
    body["detail"]["code"].as_str().unwrap_or("")
}

/// Asserts the error envelope: code, message, and request_id equal to the X-Request-ID header.
fn assert_envelope(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    want: StatusCode,
    want_code: &str,
) {
    assert_eq!(status, want, "body: {body}");
    assert_eq!(code(body), want_code, "body: {body}");
    assert!(body["detail"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let header_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("missing");
    assert_eq!(body["detail"]["request_id"].as_str(), Some(header_id));
    assert_eq!(
        headers.get("x-content-type-options").map(|v| v.as_bytes()),
        Some(&b"nosniff"[..])
    );
}

/// A new allocation is 201 with the reference fields; the same caller replays it as 200 with the
/// same body; another caller with the same Idempotency-Key gets a different sandbox.
#[tokio::test]
async fn allocate_replay_and_caller_scoped_idempotency() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 5).await;
    let (s1, _, b1) = app
        .allocate("stu-1")
        .header("Idempotency-Key", "k")
        .sent_json()
        .await;
    assert_eq!(s1, StatusCode::CREATED, "{b1}");
    for field in [
        "sandbox_id",
        "name",
        "external_id",
        "allocated_at",
        "expires_at",
        "sfdc_account_id",
    ] {
        assert!(b1.get(field).is_some(), "missing {field}: {b1}");
    }
    let lab_secs =
        b1["expires_at"].as_i64().unwrap_or(0) - b1["allocated_at"].as_i64().unwrap_or(0);
    assert_eq!(lab_secs, 48 * 3600, "one lab duration drives expires_at");
    let (s2, _, b2) = app
        .allocate("stu-1")
        .header("Idempotency-Key", "k")
        .sent_json()
        .await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(b1, b2, "a replay returns the same body");
    let (s3, _, b3) = app
        .allocate("stu-2")
        .header("Idempotency-Key", "k")
        .sent_json()
        .await;
    assert_eq!(s3, StatusCode::CREATED);
    assert_ne!(
        b3["sandbox_id"], b1["sandbox_id"],
        "keys are scoped to the caller"
    );
    app.stop().await;
}

/// GET is owner-only and strongly consistent: the owner sees it right after allocating, and
/// still sees its status after releasing it; others get 403 without the owner's id; unknown ids
/// are 404.
#[tokio::test]
async fn get_sandbox_ownership() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 2).await;
    let (_, _, alloc) = app.allocate("owner-1").sent_json().await;
    let id = alloc["sandbox_id"].as_str().unwrap_or_default().to_string();
    let get = |caller: &str| {
        app.track(Method::GET, &format!("/v1/sandboxes/{id}"))
            .header("X-Instruqt-Sandbox-ID", caller)
            .sent_json()
    };
    let (s, _, b) = get("owner-1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "allocated");
    assert_eq!(b["allocated_to_track"], "owner-1");
    let (s, h, b) = get("intruder").await;
    assert_envelope(s, &h, &b, StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER");
    assert!(
        !b.to_string().contains("owner-1"),
        "never names the owner: {b}"
    );
    let (s, h, b) = app
        .track(Method::GET, "/v1/sandboxes/does-not-exist")
        .header("X-Instruqt-Sandbox-ID", "owner-1")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "SANDBOX_NOT_FOUND");
    let (s, _, b) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "owner-1")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _, b) = get("owner-1").await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the owner sees the released sandbox: {b}"
    );
    assert_eq!(b["status"], "pending_deletion");
    let (s, h, b) = get("intruder").await;
    assert_envelope(s, &h, &b, StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER");
    app.stop().await;
}

/// Mark-for-deletion: owner only; a repeat returns the same body; after it the caller's claim is
/// released, so the next allocate gets a new sandbox; past the lab window the owner still gets 200.
#[tokio::test]
async fn mark_for_deletion_lifecycle() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    let (_, _, alloc) = app.allocate("stu").sent_json().await;
    let id = alloc["sandbox_id"].as_str().unwrap_or_default().to_string();
    let mark = |caller: &str| {
        app.track(
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", caller)
        .sent_json()
    };
    let (s, h, b) = mark("other").await;
    assert_envelope(s, &h, &b, StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER");
    let (s, _, first) = mark("stu").await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["status"], "pending_deletion");
    app.clock.advance(chrono::Duration::seconds(5));
    let (s, _, again) = mark("stu").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(first, again, "a repeat returns the original body");
    let (s, _, next) = app.allocate("stu").sent_json().await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the released claim allows a new allocation: {next}"
    );
    assert_ne!(next["sandbox_id"], alloc["sandbox_id"]);
    // Past the lab window, the owner's late cleanup still succeeds.
    let late_id = next["sandbox_id"].as_str().unwrap_or_default().to_string();
    app.clock.advance(chrono::Duration::hours(72));
    let (s, _, b) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{late_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "stu")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, h, b) = app
        .track(Method::POST, "/v1/sandboxes/nope/mark-for-deletion")
        .header("X-Instruqt-Sandbox-ID", "stu")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "SANDBOX_NOT_FOUND");
    app.stop().await;
}

/// An unmatched prefix is 404 `UNKNOWN_PREFIX`; a matching prefix allocates only names with that
/// prefix, and once it is exhausted answers 409 with retry_after and a Retry-After header.
#[tokio::test]
async fn exhausted_pool_and_prefixes() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab-adv", 2).await;
    app.seed("other", 2).await;
    let (s, h, b) = app
        .allocate("p1")
        .header("X-Sandbox-Name-Prefix", "zzz")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "UNKNOWN_PREFIX");
    for caller in ["p2", "p3"] {
        let (s, _, b) = app
            .allocate(caller)
            .header("X-Sandbox-Name-Prefix", " lab-adv ")
            .sent_json()
            .await;
        assert_eq!(s, StatusCode::CREATED);
        assert!(
            b["name"].as_str().unwrap_or("").starts_with("lab-adv"),
            "{b}"
        );
    }
    let (s, h, b) = app
        .allocate("p4")
        .header("X-Sandbox-Name-Prefix", "lab-adv")
        .sent_json()
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "the prefix is exhausted even though others remain"
    );
    assert_eq!(b["detail"]["retry_after"], 30);
    assert_eq!(h.get("retry-after").map(|v| v.as_bytes()), Some(&b"30"[..]));
    app.stop().await;
}

/// Authentication comes first; missing/malformed/unknown tokens are 401 with a challenge; the
/// wrong role is 403; the caller header is checked after auth.
#[tokio::test]
async fn auth_and_caller_headers() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 2).await;
    let url = format!("{}/v1/allocate", app.url);
    let (s, h, b) = app.client.post(&url).sent_json().await;
    assert_envelope(s, &h, &b, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(
        h.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let (s, h, b) = app
        .client
        .post(&url)
        .header("Authorization", format!("Token {TRACK_TOKEN}"))
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let (s, h, b) = app.client.post(&url).bearer_auth("wrong").sent_json().await;
    assert_envelope(s, &h, &b, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let (s, h, b) = app
        .client
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Track-ID", "x")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::FORBIDDEN, "FORBIDDEN");
    let (s, h, b) = app
        .client
        .post(&url)
        .bearer_auth(TRACK_TOKEN)
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "MISSING_SANDBOX_ID");
    let (s, h, b) = app
        .client
        .post(&url)
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "   ")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "MISSING_SANDBOX_ID");
    // A whitespace sandbox id falls back to a valid X-Track-ID (the reference answered 400).
    let (s, _, b) = app
        .client
        .post(&url)
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "  ")
        .header("X-Track-ID", "legacy")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let admin = format!("{}/v1/admin/stats", app.url);
    let (s, h, b) = app
        .client
        .get(&admin)
        .bearer_auth(TRACK_TOKEN)
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::FORBIDDEN, "FORBIDDEN");
    let (s, h, b) = app.client.get(&admin).sent_json().await;
    assert_envelope(s, &h, &b, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    app.stop().await;
}

/// Bad input of every kind is a 4xx with the envelope, never a 5xx: oversized and invalid headers,
/// ids with `#` and `/`, unknown routes, wrong methods, large bodies, bad cursors and limits.
#[tokio::test]
async fn bad_input_is_a_4xx_envelope() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    let long = "x".repeat(300);
    let (s, h, b) = app.allocate(&long).sent_json().await;
    assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let (s, h, b) = app
        .allocate("stu")
        .header("Idempotency-Key", long.as_str())
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let invalid_utf8 = reqwest::header::HeaderValue::from_bytes(&[0xff, 0xfe, b'a'])
        .unwrap_or(reqwest::header::HeaderValue::from_static("x"));
    let (s, h, b) = app
        .client
        .post(format!("{}/v1/allocate", app.url))
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", invalid_utf8)
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // Unicode, '#' and '/' in a caller id are just characters.
    for caller in ["stüdent-✓", "a#b", "a/b"] {
        let (s, _, b) = app.allocate(caller).sent_json().await;
        assert_eq!(s, StatusCode::CREATED, "{caller}: {b}");
    }
    for path in [
        "/v1/sandboxes/a%23b",
        "/v1/sandboxes/a%2Fb",
        &format!("/v1/sandboxes/{long}"),
    ] {
        let (s, h, b) = app
            .track(Method::GET, path)
            .header("X-Track-ID", "stu")
            .sent_json()
            .await;
        assert!(s.is_client_error(), "{path}: {s} {b}");
        assert!(
            code(&b) == "SANDBOX_NOT_FOUND"
                || code(&b) == "VALIDATION_ERROR"
                || code(&b) == "NOT_FOUND",
            "{b}"
        );
        assert_eq!(
            b["detail"]["request_id"].as_str(),
            h.get("x-request-id").and_then(|v| v.to_str().ok())
        );
    }
    let (s, h, b) = app
        .client
        .get(format!("{}/v1/nope", app.url))
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "NOT_FOUND");
    let (s, h, b) = app
        .track(Method::GET, "/v1/allocate")
        .header("X-Track-ID", "x")
        .sent_json()
        .await;
    assert_envelope(
        s,
        &h,
        &b,
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    );
    let (s, h, b) = app
        .allocate("big")
        .body(vec![b'x'; 200_000])
        .sent_json()
        .await;
    assert_envelope(
        s,
        &h,
        &b,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    );
    for query in [
        "cursor=garbage",
        "cursor=eyJ4IjoxfQ",
        "limit=0",
        "limit=101",
        "limit=abc",
        "status=bogus",
        "nope=1",
    ] {
        let (s, h, b) = app
            .admin(Method::GET, &format!("/v1/admin/sandboxes?{query}"))
            .sent_json()
            .await;
        assert_envelope(s, &h, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    app.stop().await;
}

/// Every response carries the request id (an incoming sane one is honoured), security headers
/// and CORS headers — errors and preflights included.
#[tokio::test]
async fn headers_on_every_response() {
    let app = spawn_app(Backend::Embedded).await;
    let resp = app
        .client
        .get(format!("{}/healthz", app.url))
        .header("X-Request-ID", "trace-123")
        .sent()
        .await;
    assert_eq!(
        resp.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"trace-123"[..])
    );
    let resp = app
        .client
        .get(format!("{}/v1/admin/stats", app.url))
        .header("Origin", "https://lab.example")
        .sent()
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for h in [
        "x-frame-options",
        "strict-transport-security",
        "referrer-policy",
        "content-security-policy",
        "access-control-allow-origin",
        "access-control-expose-headers",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    let resp = app
        .client
        .request(Method::OPTIONS, format!("{}/v1/allocate", app.url))
        .header("Origin", "https://lab.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, x-instruqt-sandbox-id",
        )
        .sent()
        .await;
    assert!(resp.status().is_success());
    let allow = resp
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(allow.contains("x-instruqt-sandbox-id") && allow.contains("idempotency-key"));
    // Exposed headers belong on the actual response (checked above); browsers ignore them on a
    // preflight, and tower-http does not send them there.
    assert!(resp
        .headers()
        .get("access-control-allow-methods")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .contains("POST"));
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(resp.headers().contains_key("x-content-type-options"));
    app.stop().await;
}

/// The per-caller rate limit answers 429 with Retry-After and X-RateLimit headers; probes are exempt.
#[tokio::test]
async fn rate_limit_per_caller() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.rate_limit = (1.0, 3.0);
    let app = spawn_app_with(options).await;
    let mut statuses = vec![];
    for _ in 0..5 {
        let resp = app
            .track(Method::GET, "/v1/sandboxes/x")
            .header("X-Track-ID", "busy")
            .sent()
            .await;
        assert!(resp.headers().contains_key("x-ratelimit-limit"));
        statuses.push(resp.status());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let (s, h, b) = read_json(resp).await;
            assert_envelope(
                s,
                &h,
                &b,
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMIT_EXCEEDED",
            );
            assert!(h.contains_key("retry-after"));
            assert_eq!(
                h.get("x-ratelimit-remaining").map(|v| v.as_bytes()),
                Some(&b"0"[..])
            );
        }
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        2,
        "{statuses:?}"
    );
    let other = app
        .track(Method::GET, "/v1/sandboxes/x")
        .header("X-Track-ID", "calm")
        .sent()
        .await;
    assert_ne!(
        other.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "buckets are per caller"
    );
    for _ in 0..10 {
        let r = app.client.get(format!("{}/healthz", app.url)).sent().await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    app.stop().await;
}

/// Admin listing pages with an opaque cursor through every row exactly once; stats count by
/// status; history shows the envelopes in order; bulk delete refuses allocated and needs a status.
#[tokio::test]
async fn admin_listing_stats_history_bulk() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 7).await;
    let (_, _, alloc) = app.allocate("stu").sent_json().await;
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 1)
        .await;
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/admin/sandboxes?limit=3".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (s, _, b) = app.admin(Method::GET, &path).sent_json().await;
        assert_eq!(s, StatusCode::OK, "{b}");
        pages += 1;
        for row in b["sandboxes"].as_array().cloned().unwrap_or_default() {
            assert!(
                seen.insert(row["sandbox_id"].as_str().unwrap_or_default().to_string()),
                "row twice"
            );
        }
        cursor = b["cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
        assert!(pages < 10);
    }
    assert_eq!(seen.len(), 7);
    let (_, _, b) = app
        .admin(Method::GET, "/v1/admin/sandboxes?status=allocated")
        .sent_json()
        .await;
    assert_eq!(b["count"], 1);
    let (_, _, b) = app
        .admin(Method::GET, "/v1/admin/sandboxes?owner=stu")
        .sent_json()
        .await;
    assert_eq!(b["sandboxes"][0]["sandbox_id"], alloc["sandbox_id"]);
    let (s, _, stats) = app.admin(Method::GET, "/v1/admin/stats").sent_json().await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (
            stats["total"].as_i64(),
            stats["available"].as_i64(),
            stats["allocated"].as_i64()
        ),
        (Some(7), Some(6), Some(1)),
        "{stats}"
    );
    assert!(stats.get("projector_lag_ms").is_some());
    let id = alloc["sandbox_id"].as_str().unwrap_or_default();
    let (s, _, h) = app
        .admin(Method::GET, &format!("/v1/admin/sandboxes/{id}/history"))
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK);
    let types: Vec<&str> = h["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["event_type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(types, ["SandboxRegistered", "SandboxAllocated"]);
    assert_eq!(h["events"][1]["actor"], "track:stu");
    assert_eq!(h["events"][1]["version"], 2);
    let (s, h2, b) = app
        .admin(Method::POST, "/v1/admin/bulk-delete?status=allocated")
        .sent_json()
        .await;
    assert_envelope(s, &h2, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let (s, h2, b) = app
        .admin(Method::POST, "/v1/admin/bulk-delete")
        .sent_json()
        .await;
    assert_envelope(s, &h2, &b, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let (s, h2, b) = app
        .admin(
            Method::POST,
            &format!("/v1/admin/sandboxes/{id}/retry-deletion"),
        )
        .sent_json()
        .await;
    assert_envelope(s, &h2, &b, StatusCode::CONFLICT, "INVALID_STATE");
    let (s, _, b) = app
        .admin(Method::POST, "/v1/admin/bulk-delete?status=available")
        .sent_json()
        .await;
    // A background admin job (ADR 0018): accepted at once, the view converges as it runs.
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    app.wait_until(|s| s.get(domain::SandboxStatus::Available) == 0)
        .await;
    assert_eq!(
        app.stats().await.get(domain::SandboxStatus::Allocated),
        1,
        "bulk delete left the allocation alone"
    );
    app.stop().await;
}

/// Probes, metrics, the root (which names the docs and the dashboard), the OpenAPI document
/// (whose description names the embedded SQLite store as the default, not DynamoDB alone) and the
/// vendored Swagger UI answer.
#[tokio::test]
async fn operations_endpoints() {
    let app = spawn_app(Backend::Embedded).await;
    let (s, _, b) = app
        .client
        .get(format!("{}/healthz", app.url))
        .sent_json()
        .await;
    assert_eq!((s, b["status"].as_str()), (StatusCode::OK, Some("healthy")));
    let (s, _, b) = app
        .client
        .get(format!("{}/readyz", app.url))
        .sent_json()
        .await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "{b}"
    );
    let resp = app.client.get(format!("{}/metrics", app.url)).sent().await;
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain; version=0.0.4; charset=utf-8"[..])
    );
    let text = resp.text().await.unwrap_or_default();
    for name in [
        "broker_pool",
        "broker_request_latency_seconds",
        "broker_projector_lag_seconds",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    let (s, _, b) = app.client.get(format!("{}/", app.url)).sent_json().await;
    assert_eq!((s, b["docs"].as_str()), (StatusCode::OK, Some("/v1/docs")));
    assert_eq!(b["dashboard"].as_str(), Some("/dashboard"), "{b}");
    let (s, _, b) = app
        .client
        .get(format!("{}/v1/openapi.json", app.url))
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK);
    let description = b["info"]["description"].as_str().unwrap_or_default();
    assert!(
        description.contains("SQLite") && description.contains("default"),
        "the description names the default store: {description}"
    );
    assert!(b["paths"]["/v1/allocate"]["post"].is_object());
    assert!(b["components"]["schemas"]["ErrorBody"].is_object());
    let resp = app.client.get(format!("{}/v1/docs/", app.url)).sent().await;
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap_or_default();
    assert!(html.contains("swagger"), "docs page is Swagger UI");
    assert!(!html.contains("cdn."), "no CDN assets");
    app.stop().await;
}

/// A prefix that no sandbox has is its own answer: 404 `UNKNOWN_PREFIX` without `Retry-After`,
/// while a known prefix whose sandboxes are all taken stays 409 `NO_SANDBOXES_AVAILABLE` with it;
/// a shorter start of a group's names, or one reaching into its serials, is known.
#[tokio::test]
async fn unknown_prefix_is_not_an_empty_pool() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab-demo", 1).await;
    let (s, h, b) = app
        .allocate("stu-1")
        .header("X-Sandbox-Name-Prefix", "aws-lab")
        .sent_json()
        .await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "UNKNOWN_PREFIX");
    assert!(h.get("retry-after").is_none(), "{h:?}");
    assert!(b["detail"].get("retry_after").is_none(), "{b}");
    assert!(
        b["detail"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("aws-lab") && m.contains("X-Sandbox-Name-Prefix")),
        "{b}"
    );
    let (s, _, b) = app
        .allocate("stu-1")
        .header("X-Sandbox-Name-Prefix", "lab-demo-0")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    app.wait_until(|s| s.get(domain::SandboxStatus::Available) == 0)
        .await;
    for prefix in ["lab", "lab-demo", "lab-demo-0"] {
        let (s, h, b) = app
            .allocate("stu-2")
            .header("X-Sandbox-Name-Prefix", prefix)
            .sent_json()
            .await;
        assert_envelope(s, &h, &b, StatusCode::CONFLICT, "NO_SANDBOXES_AVAILABLE");
        assert!(h.get("retry-after").is_some(), "{prefix}: {h:?}");
    }
    app.stop().await;
}

/// Per-sandbox track routes take the sandbox's name as well as its id, but only the caller's
/// own: another student's name answers 404, never revealing the sandbox.
#[tokio::test]
async fn track_routes_accept_the_callers_sandbox_name() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("byname", 2).await;
    let (_, _, alloc) = app.allocate("owner-1").sent_json().await;
    let id = alloc["sandbox_id"].as_str().unwrap_or_default().to_string();
    let name = alloc["name"].as_str().unwrap_or_default().to_string();
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 1)
        .await;
    let get = |caller: &str| {
        app.track(Method::GET, &format!("/v1/sandboxes/{name}"))
            .header("X-Instruqt-Sandbox-ID", caller)
            .sent_json()
    };
    let (s, _, b) = get("owner-1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sandbox_id"], id.as_str());
    let (s, h, b) = get("intruder").await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "SANDBOX_NOT_FOUND");
    let (s, _, b) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{name}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "owner-1")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sandbox_id"], id.as_str());
    app.stop().await;
}

/// A name works for its owner at once after the allocation, before the projector has moved the
/// sandbox into the caller's rows of the view (a lab script that allocates and asks for the
/// sandbox by name right away got 404): the sandbox's own events decide; another caller still
/// gets 404 for that name.
#[tokio::test]
async fn a_name_works_for_its_owner_before_the_view_catches_up() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|config| config.run_projector = Some(false));
    let app = spawn_app_with(options).await;
    // No projector: the rows are brought up to their registrations once, and then stay behind.
    let ids = app.register("lagging", 2).await;
    app.repair(&ids).await;
    let (s, _, alloc) = app.allocate("owner-1").sent_json().await;
    assert_eq!(s, StatusCode::CREATED, "{alloc}");
    let id = alloc["sandbox_id"].as_str().unwrap_or_default().to_string();
    let name = alloc["name"].as_str().unwrap_or_default().to_string();
    let row = app.state.broker.view().get(&id).await.ok().flatten();
    assert_eq!(
        row.map(|r| r.owner),
        Some(None),
        "the view does not know the owner yet"
    );

    let get = |caller: &str| {
        app.track(Method::GET, &format!("/v1/sandboxes/{name}"))
            .header("X-Instruqt-Sandbox-ID", caller)
            .sent_json()
    };
    let (s, _, b) = get("owner-1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sandbox_id"], id.as_str());
    assert_eq!(b["status"], "allocated");
    let (s, h, b) = get("intruder").await;
    assert_envelope(s, &h, &b, StatusCode::NOT_FOUND, "SANDBOX_NOT_FOUND");
    let (s, _, b) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{name}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "owner-1")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.stop().await;
}

/// `GET /v1/admin/outcomes` reports what the server answered since it started, whoever was
/// watching: a 201, a 200 replay, a 404 for an unknown prefix and a 503 while drained, in the
/// totals and in the current minute; it is admin-only and takes no parameters.
#[tokio::test]
async fn allocation_outcomes_are_counted_by_the_server() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    let (s, _, b) = app.get_json("/v1/admin/outcomes").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["totals"]["success"], 0, "{b}");
    assert_eq!(
        b["per_minute"].as_array().map(Vec::len),
        Some(0),
        "nothing counted yet: {b}"
    );

    assert_eq!(
        app.allocate("stu-1").sent().await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.allocate("stu-1").sent().await.status(), StatusCode::OK);
    let unknown = app
        .allocate("stu-2")
        .header("X-Sandbox-Name-Prefix", "nothing-has-this")
        .sent()
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let (s, _, b) = app
        .admin(Method::POST, "/v1/admin/pool/drain?reason=test")
        .sent_json()
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let drained = app.allocate("stu-3").sent().await;
    assert_eq!(drained.status(), StatusCode::SERVICE_UNAVAILABLE);

    let (s, _, b) = app.get_json("/v1/admin/outcomes").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for (outcome, n) in [
        ("success", 1),
        ("idempotent", 1),
        ("unknown_prefix", 1),
        ("maintenance", 1),
        ("no_sandboxes", 0),
        ("error", 0),
    ] {
        assert_eq!(b["totals"][outcome], n, "{outcome}: {b}");
    }
    assert!(b["since"].as_str().is_some_and(|t| t.ends_with('Z')), "{b}");
    // The test clock stands still: every answer fell in one minute.
    let minutes = b["per_minute"].as_array().cloned().unwrap_or_default();
    assert_eq!(minutes.len(), 1, "{b}");
    assert_eq!(minutes[0]["counts"]["success"], 1, "{b}");
    assert_eq!(minutes[0]["counts"]["maintenance"], 1, "{b}");

    let (s, _, b) = app
        .track(Method::GET, "/v1/admin/outcomes")
        .sent_json()
        .await;
    assert_eq!((s, code(&b)), (StatusCode::FORBIDDEN, "FORBIDDEN"), "{b}");
    let (s, _, b) = app.get_json("/v1/admin/outcomes?since=now").await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
        "{b}"
    );
    app.stop().await;
}
