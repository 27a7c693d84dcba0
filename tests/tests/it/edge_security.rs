//! Security of the edges over real HTTP (service on port 0, embedded store): the rate limit runs
//! after authentication, probes leak nothing, metrics stay bounded, tokens are checked strictly,
//! the listener sheds load, and per-track credentials confine a track to its own sandboxes.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app, spawn_app_with, AppOptions, Backend, Sent, TestApp, TRACK_TOKEN};

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let resp = request.sent().await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn code(body: &Value) -> &str {
    body["detail"]["code"].as_str().unwrap_or("")
}

/// A spoofed caller id with a bad token cannot drain the victim's bucket: failures are charged
/// to the sender's address, which is refused while the victim keeps being served.
#[tokio::test]
async fn spoofed_caller_cannot_drain_victims_bucket() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.rate_limit = (0.01, 3.0);
    options.configure = Box::new(|c| {
        c.unauth_rate_limit_rps = 0.01;
        c.unauth_rate_limit_burst = 5.0;
    });
    let app = spawn_app_with(options).await;
    let mut attacker = Vec::new();
    for _ in 0..12 {
        let (status, headers, body) = send(
            app.client
                .get(format!("{}/v1/sandboxes/x", app.url))
                .bearer_auth("wrong-token")
                .header("X-Instruqt-Sandbox-ID", "victim"),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(code(&body), "RATE_LIMIT_EXCEEDED");
            assert!(headers.contains_key("retry-after"));
            assert!(headers.contains_key("x-ratelimit-limit"));
        }
        attacker.push(status);
    }
    assert_eq!(
        attacker
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        5,
        "the address bucket allows its burst of failures, then refuses: {attacker:?}"
    );
    assert!(attacker[5..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));
    for _ in 0..3 {
        let (status, headers, body) = send(
            app.track(Method::GET, "/v1/sandboxes/x")
                .header("X-Instruqt-Sandbox-ID", "victim"),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "the victim is served: {body}"
        );
        assert!(headers.contains_key("x-ratelimit-remaining"));
    }
    let (status, _, _) = send(
        app.track(Method::GET, "/v1/sandboxes/x")
            .header("X-Instruqt-Sandbox-ID", "victim"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the victim's own bucket still limits the victim"
    );
    app.stop().await;
}

/// Without a token, inventing caller ids mints no fresh bursts: all share the address bucket.
#[tokio::test]
async fn rotating_caller_ids_share_the_address_bucket() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.unauth_rate_limit_rps = 0.01;
        c.unauth_rate_limit_burst = 4.0;
    });
    let app = spawn_app_with(options).await;
    let mut refused = 0;
    for i in 0..10 {
        let (status, _, _) = send(
            app.client
                .post(format!("{}/v1/allocate", app.url))
                .header("X-Instruqt-Sandbox-ID", format!("student-{i}")),
        )
        .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert_eq!(refused, 6);
    app.stop().await;
}

/// Behind a trusted proxy the client address is the hop the proxy appended, so clients behind
/// the same load balancer do not share one bucket, and a forged left-hand hop changes nothing.
#[tokio::test]
async fn forwarded_address_selects_the_bucket() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.unauth_rate_limit_rps = 0.01;
        c.unauth_rate_limit_burst = 2.0;
        c.trusted_proxy_hops = 1;
    });
    let app = spawn_app_with(options).await;
    let probe = |forwarded: &'static str| {
        app.client
            .get(format!("{}/v1/admin/stats", app.url))
            .header("X-Forwarded-For", forwarded)
    };
    let mut statuses = Vec::new();
    for forged in [
        "1.1.1.1, 203.0.113.7",
        "2.2.2.2, 203.0.113.7",
        "3.3.3.3, 203.0.113.7",
    ] {
        statuses.push(send(probe(forged)).await.0);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(
        send(probe("203.0.113.8")).await.0,
        StatusCode::UNAUTHORIZED,
        "another client behind the same proxy has its own bucket"
    );
    app.stop().await;
}

/// The admin token's bucket is its own: track traffic naming the same caller id does not
/// consume it.
#[tokio::test]
async fn admin_bucket_is_separate() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.rate_limit = (0.01, 2.0);
    let app = spawn_app_with(options).await;
    for _ in 0..4 {
        send(
            app.track(Method::GET, "/v1/sandboxes/x")
                .header("X-Track-ID", "a"),
        )
        .await;
    }
    let (status, _, body) = send(
        app.admin(Method::GET, "/v1/admin/stats")
            .header("X-Track-ID", "a"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

/// A service with default test options on the embedded store.
async fn default_app() -> TestApp {
    spawn_app(Backend::Embedded).await
}

/// The bearer scheme is case-insensitive over HTTP.
#[tokio::test]
async fn bearer_scheme_any_case() {
    let app = default_app().await;
    let (status, _, body) = send(
        app.client
            .get(format!("{}/v1/sandboxes/x", app.url))
            .header("Authorization", format!("bearer {TRACK_TOKEN}"))
            .header("X-Track-ID", "a"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    app.stop().await;
}

/// `/readyz` with an unreachable store says only `unavailable`: no endpoint, no SDK error text.
#[tokio::test]
async fn readyz_leaks_nothing() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let endpoint = format!("http://{}", dead.local_addr().expect("its address"));
    drop(dead);
    let mut options = AppOptions::new(Backend::Embedded);
    let configured = endpoint.clone();
    options.configure = Box::new(move |c| {
        c.store.store = command_api::config::StoreKind::Dynamodb;
        c.store.ddb_endpoint_url = Some(configured);
        c.store.aws_region = Some("us-east-1".into());
        c.store.ddb_max_retries = 0;
        // An endpoint means an emulator, where tables are created by default: not here, where
        // the point is a store that cannot be reached.
        c.store.ensure_tables = Some(false);
        c.run_projector = Some(false);
    });
    let app = spawn_app_with(options).await;
    let resp = app.client.get(format!("{}/readyz", app.url)).sent().await;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(body["checks"]["store"], "unavailable", "{text}");
    let port = endpoint.rsplit(':').next().unwrap_or("none");
    for leak in [port, "127.0.0.1", "error", "dispatch", "arn:", "connect"] {
        assert!(!text.contains(leak), "/readyz leaks {leak:?}: {text}");
    }
    app.stop().await;
}

fn latency_series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("broker_request_latency_seconds_count"))
        .count()
}

/// 500 distinct extension methods add at most one `other` series to `/metrics`.
#[tokio::test]
async fn extension_methods_do_not_grow_metrics() {
    let app = default_app().await;
    let scrape = || async {
        app.client
            .get(format!("{}/metrics", app.url))
            .sent()
            .await
            .text()
            .await
            .unwrap_or_default()
    };
    let before = latency_series(&scrape().await);
    for i in 0..500 {
        let method =
            Method::from_bytes(format!("XMETHOD{i}").as_bytes()).expect("a valid method token");
        app.client
            .request(method, format!("{}/healthz", app.url))
            .sent()
            .await;
    }
    let after = scrape().await;
    assert!(
        latency_series(&after) <= before + 2,
        "{} series before, {} after",
        before,
        latency_series(&after)
    );
    assert!(after.contains("method=\"other\""));
    app.stop().await;
}

fn token_config(track: Option<&str>, admin: Option<&str>) -> command_api::config::Config {
    let mut config = command_api::config::Config::defaults();
    config.api_token = track.map(Into::into);
    config.admin_token = admin.map(Into::into);
    config
}

/// Start-up refuses short or equal tokens, and the dev tokens on a non-loopback address.
#[tokio::test]
async fn weak_tokens_are_refused_at_start_up() {
    let strong_a = "a".repeat(32);
    let strong_b = "b".repeat(32);
    assert!(token_config(Some(&strong_a), Some(&strong_b))
        .check_tokens()
        .is_ok());
    for (track, admin) in [
        (Some("short"), Some(strong_b.as_str())),
        (Some(strong_a.as_str()), Some("")),
        (Some(strong_a.as_str()), Some(strong_a.as_str())),
    ] {
        let config = token_config(track, admin);
        assert!(config.check_tokens().is_err(), "{track:?} / {admin:?}");
        let started = command_api::startup::build_with(
            &config,
            std::sync::Arc::new(domain::ManualClock::new(chrono::Utc::now())),
            tests::app::test_jobs_config(),
        )
        .await;
        assert!(
            started.is_err(),
            "service started with {track:?} / {admin:?}"
        );
    }
    let mut open = token_config(None, None);
    assert!(open.check_tokens().is_ok(), "dev tokens on loopback");
    open.bind_addr = "0.0.0.0:8080".parse().expect("a socket address");
    assert!(open.check_tokens().is_err(), "dev tokens on all interfaces");
}

/// The configuration's `Debug` output never contains a token.
#[test]
fn config_debug_hides_tokens() {
    let secret = "s3cr3t-".repeat(6);
    let config = token_config(Some(&secret), Some(&format!("{secret}x")));
    let printed = format!("{config:?}");
    assert!(!printed.contains(&secret), "{printed}");
}

/// A client that never finishes its request headers is disconnected after the header-read
/// timeout instead of holding the connection open.
#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| c.header_read_timeout_sec = 1);
    let app = spawn_app_with(options).await;
    let address = app.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect to the service");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Slow: ")
        .await
        .expect("send the partial request");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        stream.read_to_end(&mut buf),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the connection was still open 15 s after partial headers"
    );
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    app.stop().await;
}

/// Beyond MAX_CONCURRENT_REQUESTS, requests are shed at once with 503 in the error envelope,
/// while the probes still answer.
#[tokio::test]
async fn load_is_shed_with_503() {
    let csp = tests::fake_csp::FakeCsp::start().await;
    csp.pause_lists();
    let mut options = AppOptions::new(Backend::Embedded);
    options.jobs.csp.mode = jobs::CspMode::Real;
    options.jobs.csp.base_url = csp.base_url();
    options.jobs.csp.api_token = csp.token().into();
    options.jobs.csp.read_timeout = std::time::Duration::from_secs(60);
    options.jobs.csp.rate_limit_rps = 0.0;
    options.configure = Box::new(|c| c.max_concurrent_requests = 1);
    let app = spawn_app_with(options).await;
    let busy = tokio::spawn(app.admin(Method::POST, "/v1/admin/sync").send());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while csp.list_calls() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sync never reached the CSP"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (status, headers, body) = send(app.admin(Method::GET, "/v1/admin/stats")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(code(&body), "OVERLOADED");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        body["detail"]["request_id"].as_str(),
        headers.get("x-request-id").and_then(|v| v.to_str().ok())
    );
    let (status, _, _) = send(app.client.get(format!("{}/healthz", app.url))).await;
    assert_eq!(status, StatusCode::OK, "probes are not shed");
    csp.resume_lists();
    let finished = busy.await.expect("the request task").expect("the request");
    assert_eq!(finished.status(), StatusCode::OK);
    let (status, _, _) = send(app.admin(Method::GET, "/v1/admin/stats")).await;
    assert_eq!(status, StatusCode::OK, "capacity is back");
    app.stop().await;
}

/// Every error status any layer produces carries the envelope and the request id: headers over
/// 64 KiB (a 200 KB and a 1 MB header) or over 100 of them are 431 `HEADERS_TOO_LARGE`, a
/// wrong method 405, an unknown route 404; 60 KB of headers is still served; `/v1/docs`
/// redirects with a body that says where to.
#[tokio::test]
async fn every_error_status_carries_the_envelope() {
    let app = spawn_app(Backend::Embedded).await;
    let envelope = |status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value| {
        let id = headers.get("x-request-id").and_then(|v| v.to_str().ok());
        assert!(id.is_some(), "{status}: no X-Request-ID");
        assert_eq!(
            body["detail"]["request_id"].as_str(),
            id,
            "{status}: {body}"
        );
        assert!(
            body["detail"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{status}: {body}"
        );
    };
    for size in [200_000, 1_000_000] {
        let (status, headers, body) = send(
            app.client
                .get(format!("{}/healthz", app.url))
                .header("X-Big", "a".repeat(size)),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{size}: {headers:?} {body}"
        );
        assert_eq!(code(&body), "HEADERS_TOO_LARGE", "{size}: {body}");
        envelope(status, &headers, &body);
    }
    let mut many = app.client.get(format!("{}/healthz", app.url));
    for i in 0..150 {
        many = many.header(format!("x-h-{i}"), "1");
    }
    let (status, headers, body) = send(many).await;
    assert_eq!(code(&body), "HEADERS_TOO_LARGE", "{status}: {body}");
    envelope(status, &headers, &body);
    let (status, _, _) = send(
        app.client
            .get(format!("{}/healthz", app.url))
            .header("X-Big", "a".repeat(60_000)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "60 KB of headers is served");

    let (status, headers, body) = send(app.client.post(format!("{}/healthz", app.url))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    envelope(status, &headers, &body);
    let (status, headers, body) = send(app.client.get(format!("{}/no/such/route", app.url))).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    envelope(status, &headers, &body);

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, headers, body) = send(no_redirects.get(format!("{}/v1/docs", app.url))).await;
    assert!(status.is_redirection(), "{status}");
    let location = headers.get("location").and_then(|v| v.to_str().ok());
    assert_eq!(body["location"].as_str(), location, "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    app.stop().await;
}

/// Pages that need no token (dashboard and its assets, API docs, the OpenAPI document, the
/// service root, probes) are neither charged to nor refused by the address bucket that failed
/// logins empty: a classroom behind one NAT still loads them after its failed logins, and the
/// 429 those logins get says why and what to do.
#[tokio::test]
async fn failed_logins_never_lock_out_the_public_pages() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.unauth_rate_limit_rps = 0.01;
        c.unauth_rate_limit_burst = 5.0;
    });
    let app = spawn_app_with(options).await;
    let pages = [
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/style.css",
        "/v1/docs/",
        "/v1/openapi.json",
        "/",
        "/healthz",
    ];
    for _ in 0..3 {
        for page in pages {
            let (status, _, _) = send(app.client.get(format!("{}{page}", app.url))).await;
            assert_eq!(status, StatusCode::OK, "{page} before any login");
        }
    }
    // 21 page loads charged nothing: the bucket still holds its 5 tries.
    let mut last = None;
    for _ in 0..8 {
        last = Some(
            send(
                app.client
                    .get(format!("{}/v1/admin/stats", app.url))
                    .bearer_auth("wrong-token-0123456789abcdefghijkl"),
            )
            .await,
        );
    }
    let (status, headers, body) = last.unwrap_or_else(|| panic!("no reply"));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.get("retry-after").is_some());
    let message = body["detail"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("failed logins") && message.contains("check the token"),
        "{message}"
    );
    for page in pages {
        let (status, _, _) = send(app.client.get(format!("{}{page}", app.url))).await;
        assert_eq!(status, StatusCode::OK, "{page} after the failed logins");
    }
    app.stop().await;
}

/// Every response that carries a sandbox's details — the allocation (201), its replay (200), a
/// read of the sandbox, the release — says `Cache-Control: no-store`, so no browser or shared
/// cache keeps a student's account details.
#[tokio::test]
async fn sandbox_details_are_never_cached() {
    let app = default_app().await;
    app.seed("nostore", 2).await;
    let no_store = |what: &str, headers: &reqwest::header::HeaderMap| {
        assert_eq!(
            headers.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "{what}"
        );
    };
    let (status, headers, body) = app.allocate("stu-nostore").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    no_store("allocate 201", &headers);
    let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    let (status, headers, body) = app.allocate("stu-nostore").sent_json().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox_id"], id.as_str(), "a replay");
    no_store("allocate replay 200", &headers);
    let (status, headers, body) = app
        .track(Method::GET, &format!("/v1/sandboxes/{id}"))
        .header("X-Instruqt-Sandbox-ID", "stu-nostore")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    no_store("GET sandbox 200", &headers);
    let (status, headers, body) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "stu-nostore")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    no_store("mark-for-deletion 200", &headers);
    let (_, headers, _) = app
        .admin(Method::GET, &format!("/v1/admin/sandboxes/{id}/history"))
        .sent_json()
        .await;
    no_store("admin history", &headers);
    app.stop().await;
}
