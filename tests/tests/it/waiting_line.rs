//! The waiting line (`Prefer: wait=N`) over real HTTP, on both stores: waiters on an empty pool
//! are served in arrival order as sandboxes register; a wait that runs out answers 409 with
//! `Retry-After` and the place in line; a client that hangs up leaves the line; the wait is cut
//! to `WAIT_MAX_SEC`; closing the line (shutdown) answers waiters at once; without the header
//! nothing changes. `Prefer: respond-async` (with `WRITE_EVENTS_WAITING_LINE`) answers 202
//! with a ticket that is polled, served with the allocation's answer, or dropped when not
//! polled. On DynamoDB, two API instances on one table each wake their own waiters from the
//! events a registration records, and a ticket issued on one is served through the other.

use std::time::{Duration, Instant};

use domain::Clock;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{read_json, spawn_app_with, AppOptions, Backend, Sent, TestApp};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Reply = (StatusCode, HeaderMap, Value);

both_stores!(
    waiters_are_served_in_arrival_order,
    a_wait_that_runs_out_answers_409_with_its_place,
    a_client_that_hangs_up_leaves_the_line,
    the_wait_is_cut_to_the_setting,
    closing_the_line_answers_waiters_at_once,
    without_the_header_nothing_changes,
    a_ticket_is_polled_and_served,
    an_unpolled_ticket_drops_out,
    respond_async_is_ignored_without_the_flag,
    a_served_ticket_sends_a_webhook,
    a_line_that_forms_requests_a_sync,
    operators_see_the_lines,
);

/// The line every test here waits in: names starting `wl-`.
const PREFIX: &str = "wl-";

/// A condition is given this long to hold (generous: the suite shares two busy cores).
const PATIENCE: Duration = Duration::from_secs(60);

async fn app_with(backend: Backend, wait_max_sec: u64) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.wait_max_sec = wait_max_sec;
    });
    spawn_app_with(options).await
}

fn waiting_allocate(app: &TestApp, caller: &str, wait_s: u64) -> reqwest::RequestBuilder {
    app.allocate(caller)
        .header("X-Sandbox-Name-Prefix", PREFIX)
        .header("Prefer", format!("wait={wait_s}"))
}

/// Seeds one sandbox of the line's prefix and hands it out, so the prefix is known and the pool
/// holds nothing allocatable for it.
async fn empty_but_known_pool(app: &TestApp) {
    app.seed("wl-seed", 1).await;
    let (status, _, body) = app
        .allocate("first")
        .header("X-Sandbox-Name-Prefix", PREFIX)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Requests waiting in the line of `PREFIX` on `app`.
fn line_length(app: &TestApp) -> usize {
    app.state
        .waiting_line
        .lengths()
        .into_iter()
        .filter(|(key, _)| key.prefix.as_deref() == Some(PREFIX))
        .map(|(_, n)| n)
        .sum()
}

/// Waits (bounded) until the line of `PREFIX` on `app` holds `n` requests.
async fn line_reaches(app: &TestApp, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while line_length(app) != n {
        assert!(
            Instant::now() < deadline,
            "the line holds {} requests, not {n}",
            line_length(app)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_reply(request: reqwest::RequestBuilder) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { read_json(request.sent().await).await })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The `waited_ms` of the allocation event in `sandbox_id`'s history.
async fn waited_ms(app: &TestApp, sandbox_id: &str) -> Option<u64> {
    let (status, _, body) = app
        .get_json(&format!("/v1/admin/sandboxes/{sandbox_id}/history"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["event_type"] == "SandboxAllocated")
        .and_then(|e| e["payload"]["waited_ms"].as_u64())
}

/// Three requests that wait on an empty pool are answered 201 one by one, in the order they
/// arrived, as sandboxes register one at a time; each allocation records how long it waited.
async fn waiters_are_served_in_arrival_order(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        waiters.push(spawn_reply(waiting_allocate(&app, &format!("w{i}"), 25)));
        line_reaches(&app, i + 1).await;
    }
    for (i, waiter) in waiters.into_iter().enumerate() {
        // One more sandbox: only the head of the line may take it.
        app.register(&format!("wl-new{i}"), 1).await;
        let (status, headers, body) = tokio::time::timeout(PATIENCE, waiter).await??;
        assert_eq!(status, StatusCode::CREATED, "waiter {i}: {body}");
        assert_eq!(header(&headers, "preference-applied"), "wait=25");
        assert_eq!(
            body["name"],
            format!("wl-new{i}-0000"),
            "waiter {i}: {body}"
        );
        line_reaches(&app, 2 - i).await;
        let sandbox_id = body["sandbox_id"].as_str().unwrap_or_default();
        assert!(
            waited_ms(&app, sandbox_id).await.is_some(),
            "waiter {i}: no waited_ms recorded"
        );
    }
    // An allocation that did not wait records none.
    app.seed("wl-plain", 1).await;
    let (status, headers, body) = app
        .allocate("plain")
        .header("X-Sandbox-Name-Prefix", PREFIX)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(headers.get("preference-applied").is_none());
    let sandbox_id = body["sandbox_id"].as_str().unwrap_or_default();
    assert_eq!(waited_ms(&app, sandbox_id).await, None);
    app.stop().await;
    Ok(())
}

/// A wait that runs out answers 409 `NO_SANDBOXES_AVAILABLE` with `Retry-After` and the
/// request's place in line, in the `Queue-Position` header and in the envelope.
async fn a_wait_that_runs_out_answers_409_with_its_place(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let head = spawn_reply(waiting_allocate(&app, "head", 8));
    line_reaches(&app, 1).await;
    let started = Instant::now();
    let (status, headers, body) = waiting_allocate(&app, "second", 1).sent_json().await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "NO_SANDBOXES_AVAILABLE", "{body}");
    assert_eq!(body["detail"]["position"], 2, "{body}");
    assert_eq!(header(&headers, "queue-position"), "2");
    assert!(!header(&headers, "retry-after").is_empty());
    assert!(body["detail"]["retry_after"].as_u64().is_some(), "{body}");
    let (status, headers, body) = tokio::time::timeout(PATIENCE, head).await??;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(header(&headers, "queue-position"), "1");
    assert_eq!(body["detail"]["position"], 1, "{body}");
    line_reaches(&app, 0).await;
    app.stop().await;
    Ok(())
}

/// A client that hangs up while waiting leaves the line at once, and the sandbox that registers
/// next goes to the request behind it.
async fn a_client_that_hangs_up_leaves_the_line(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    // The client hangs up once it is in line: its task, and with it the connection, ends.
    let gone = spawn_reply(waiting_allocate(&app, "gone", 25));
    line_reaches(&app, 1).await;
    gone.abort();
    assert!(gone.await.is_err(), "the client should have hung up first");
    line_reaches(&app, 0).await;
    let patient = spawn_reply(waiting_allocate(&app, "patient", 25));
    line_reaches(&app, 1).await;
    app.register("wl-late", 1).await;
    let (status, _, body) = tokio::time::timeout(PATIENCE, patient).await??;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "wl-late-0000", "{body}");
    let text = app
        .admin(Method::GET, "/metrics")
        .sent()
        .await
        .text()
        .await?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("broker_waiting_line_outcomes_total{outcome=\"cancelled\"} 1")),
        "{text}"
    );
    app.stop().await;
    Ok(())
}

/// `Prefer: wait=3600` is cut to `WAIT_MAX_SEC` (2 s here): `Preference-Applied: wait=2` and
/// the 409 comes after about two seconds.
async fn the_wait_is_cut_to_the_setting(backend: Backend) -> TestResult {
    let app = app_with(backend, 2).await;
    empty_but_known_pool(&app).await;
    let started = Instant::now();
    let (status, _, body) = waiting_allocate(&app, "hopeful", 3600).sent_json().await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(took >= Duration::from_secs(2), "answered after {took:?}");
    assert!(took < Duration::from_secs(30), "answered after {took:?}");
    assert!(
        body["detail"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("within the 2 s"),
        "{body}"
    );
    // A served request shows the granted wait.
    app.seed("wl-more", 1).await;
    let (status, headers, body) = waiting_allocate(&app, "lucky", 3600).sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(header(&headers, "preference-applied"), "wait=2");
    app.stop().await;
    Ok(())
}

/// Closing the line (as shutdown does) answers every waiter at once with 409 and
/// `Retry-After: 1`, long before their waits would run out.
async fn closing_the_line_answers_waiters_at_once(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let waiters: Vec<_> = (0..2)
        .map(|i| spawn_reply(waiting_allocate(&app, &format!("c{i}"), 25)))
        .collect();
    line_reaches(&app, 2).await;
    let started = Instant::now();
    app.state.waiting_line.close();
    for waiter in waiters {
        let (status, headers, body) = tokio::time::timeout(PATIENCE, waiter).await??;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(header(&headers, "retry-after"), "1");
        assert!(body["detail"]["position"].as_u64().is_some(), "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    app.stop().await;
    Ok(())
}

/// Without `Prefer: wait` an empty pool answers 409 at once, as before, even while others wait
/// in line; `wait=0` and a value that is not a number are the same as no header.
async fn without_the_header_nothing_changes(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let waiter = spawn_reply(waiting_allocate(&app, "waiter", 25));
    line_reaches(&app, 1).await;
    for prefer in [None, Some("wait=0"), Some("wait=soon")] {
        let mut request = app
            .allocate("impatient")
            .header("X-Sandbox-Name-Prefix", PREFIX);
        if let Some(prefer) = prefer {
            request = request.header("Prefer", prefer);
        }
        let started = Instant::now();
        let (status, headers, body) = request.sent_json().await;
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(status, StatusCode::CONFLICT, "{prefer:?}: {body}");
        assert_eq!(body["detail"]["code"], "NO_SANDBOXES_AVAILABLE");
        assert!(body["detail"].get("position").is_none(), "{body}");
        assert!(headers.get("queue-position").is_none());
        assert!(headers.get("preference-applied").is_none());
        assert!(!header(&headers, "retry-after").is_empty());
        assert_eq!(line_length(&app), 1);
    }
    app.register("wl-end", 1).await;
    let (status, _, body) = tokio::time::timeout(PATIENCE, waiter).await??;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.stop().await;
    Ok(())
}

/// Two API instances on one DynamoDB table: each has a waiter, and the registrations recorded
/// through one instance wake the waiters of both (each instance follows the events itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_wake_waiters_on_every_instance() -> TestResult {
    let tables = format!("t{}", uuid::Uuid::new_v4().simple());
    let on_shared_tables = |run_projector: bool| {
        let tables = tables.clone();
        let mut options = AppOptions::new(Backend::Dynamo);
        options.configure = Box::new(move |config| {
            config.store.table_prefix = tables.clone();
            config.run_projector = Some(run_projector);
        });
        options
    };
    let first = spawn_app_with(on_shared_tables(true)).await;
    let second = spawn_app_with(on_shared_tables(false)).await;
    // One time for both instances: each follows the feed from its own clock's now.
    second.clock.set(first.clock.now());
    empty_but_known_pool(&first).await;
    let on_first = spawn_reply(waiting_allocate(&first, "on-first", 25));
    let on_second = spawn_reply(waiting_allocate(&second, "on-second", 25));
    line_reaches(&first, 1).await;
    line_reaches(&second, 1).await;
    first.register("wl-both", 2).await;
    let mut names = Vec::new();
    for waiter in [on_first, on_second] {
        let (status, _, body) = tokio::time::timeout(PATIENCE, waiter).await??;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        names.push(body["name"].as_str().unwrap_or_default().to_string());
    }
    names.sort();
    assert_eq!(names, ["wl-both-0000", "wl-both-0001"]);
    second.stop().await;
    first.stop().await;
    Ok(())
}

async fn ticket_app(backend: Backend, idle_s: u64) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.write_events_waiting_line = true;
        config.ticket_idle_sec = idle_s;
    });
    spawn_app_with(options).await
}

fn async_allocate(app: &TestApp, caller: &str) -> reqwest::RequestBuilder {
    app.allocate(caller)
        .header("X-Sandbox-Name-Prefix", PREFIX)
        .header("Prefer", "respond-async")
}

fn poll(app: &TestApp, caller: &str, poll_url: &str) -> reqwest::RequestBuilder {
    app.track(Method::GET, poll_url)
        .header("X-Instruqt-Sandbox-ID", caller)
}

/// Polls `poll_url` until the ticket is served (bounded).
async fn poll_until_served(app: &TestApp, caller: &str, poll_url: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, _, body) = poll(app, caller, poll_url).sent_json().await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["status"] == "served" {
            return body;
        }
        assert_eq!(body["status"], "pending", "{body}");
        assert!(Instant::now() < deadline, "never served: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `Prefer: respond-async` on an empty pool answers 202 with a ticket; its owner polls it
/// (pending, then served with the allocation's answer and lease token, once a sandbox
/// registers); another caller may not read it.
async fn a_ticket_is_polled_and_served(backend: Backend) -> TestResult {
    let app = ticket_app(backend, 60).await;
    empty_but_known_pool(&app).await;
    let (status, headers, body) = async_allocate(&app, "ticketed").sent_json().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(header(&headers, "preference-applied"), "respond-async");
    assert_eq!(body["status"], "pending", "{body}");
    let poll_url = body["poll_url"].as_str().unwrap_or_default().to_string();
    assert!(poll_url.starts_with("/v1/tickets/"), "{body}");
    assert_eq!(header(&headers, "location"), poll_url);
    assert!(!header(&headers, "retry-after").is_empty());
    line_reaches(&app, 1).await;
    let (status, _, body) = poll(&app, "ticketed", &poll_url).sent_json().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending", "{body}");
    assert_eq!(body["position"], 1, "{body}");
    let (status, _, body) = poll(&app, "someone-else", &poll_url).sent_json().await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["detail"]["code"], "NOT_TICKET_OWNER", "{body}");
    app.register("wl-tk", 1).await;
    let body = poll_until_served(&app, "ticketed", &poll_url).await;
    assert_eq!(body["allocation"]["name"], "wl-tk-0000", "{body}");
    assert!(
        body["allocation"]["lease_token"].as_str().is_some(),
        "{body}"
    );
    let sandbox_id = body["allocation"]["sandbox_id"]
        .as_str()
        .unwrap_or_default();
    assert!(waited_ms(&app, sandbox_id).await.is_some());
    // The sandbox is the caller's: a plain allocation replays it.
    let (status, _, replay) = app
        .allocate("ticketed")
        .header("X-Sandbox-Name-Prefix", PREFIX)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["sandbox_id"], sandbox_id);
    let (status, _, body) = poll(&app, "ticketed", "/v1/tickets/no-such-ticket")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    app.stop().await;
    Ok(())
}

/// A ticket nobody polls for its idle bound leaves the line by itself and answers 410; the
/// sandbox that registers afterwards stays in the pool.
async fn an_unpolled_ticket_drops_out(backend: Backend) -> TestResult {
    let app = ticket_app(backend, 2).await;
    empty_but_known_pool(&app).await;
    let (status, _, body) = async_allocate(&app, "forgetful").sent_json().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let poll_url = body["poll_url"].as_str().unwrap_or_default().to_string();
    line_reaches(&app, 1).await;
    app.clock.advance(chrono::Duration::seconds(10));
    line_reaches(&app, 0).await;
    let (status, _, body) = poll(&app, "forgetful", &poll_url).sent_json().await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["detail"]["code"], "TICKET_DROPPED", "{body}");
    app.seed("wl-after", 1).await;
    let available = app.stats().await.get(domain::SandboxStatus::Available);
    assert_eq!(available, 1);
    app.stop().await;
    Ok(())
}

/// Without `WRITE_EVENTS_WAITING_LINE`, `Prefer: respond-async` is ignored: 409 at once, as
/// without the header.
async fn respond_async_is_ignored_without_the_flag(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let (status, headers, body) = async_allocate(&app, "early").sent_json().await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "NO_SANDBOXES_AVAILABLE");
    assert!(headers.get("preference-applied").is_none());
    app.stop().await;
    Ok(())
}

/// Two API instances on one DynamoDB table: a ticket issued through one is polled through the
/// other, and served there once a sandbox registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_answered_by_another_instance() -> TestResult {
    let tables = format!("t{}", uuid::Uuid::new_v4().simple());
    let on_shared_tables = |run_projector: bool| {
        let tables = tables.clone();
        let mut options = AppOptions::new(Backend::Dynamo);
        options.configure = Box::new(move |config| {
            config.store.table_prefix = tables.clone();
            config.run_projector = Some(run_projector);
            config.write_events_waiting_line = true;
        });
        options
    };
    let first = spawn_app_with(on_shared_tables(true)).await;
    let second = spawn_app_with(on_shared_tables(false)).await;
    second.clock.set(first.clock.now());
    empty_but_known_pool(&first).await;
    let (status, _, body) = async_allocate(&first, "roaming").sent_json().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let poll_url = body["poll_url"].as_str().unwrap_or_default().to_string();
    let (status, _, body) = poll(&second, "roaming", &poll_url).sent_json().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending", "{body}");
    first.register("wl-roam", 1).await;
    let body = poll_until_served(&second, "roaming", &poll_url).await;
    assert_eq!(body["allocation"]["name"], "wl-roam-0000", "{body}");
    second.stop().await;
    first.stop().await;
    Ok(())
}

/// A receiver on 127.0.0.1 that keeps the JSON body of every notification and answers 200.
async fn start_receiver() -> (std::sync::Arc<std::sync::Mutex<Vec<Value>>>, String) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let shared = std::sync::Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let shared = std::sync::Arc::clone(&shared);
            async move {
                if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                    shared.lock().unwrap_or_else(|p| p.into_inner()).push(value);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (seen, format!("http://{addr}/hook"))
}

/// A served ticket sends a `ticket_served` webhook naming the sandbox (to subscribers of that
/// kind only).
async fn a_served_ticket_sends_a_webhook(backend: Backend) -> TestResult {
    let (seen, url) = start_receiver().await;
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.write_events_waiting_line = true;
        config.webhooks_json = Some(
            serde_json::json!({"subscribers": [
                {"name": "line", "url": url, "secret": "receiver-secret-0123456789abcdefghij",
                 "kinds": ["ticket_served"]},
            ]})
            .to_string()
            .into(),
        );
        config.run_webhooks = Some(true);
        // The receiver listens on plain http on 127.0.0.1, which production refuses.
        config.webhook_allow_http = true;
        config.webhook_allow_private_targets = true;
        config.webhook_poll_ms = 50;
    });
    let app = spawn_app_with(options).await;
    empty_but_known_pool(&app).await;
    let (status, _, body) = async_allocate(&app, "hooked").sent_json().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let poll_url = body["poll_url"].as_str().unwrap_or_default().to_string();
    line_reaches(&app, 1).await;
    app.register("wl-hook", 1).await;
    let served = poll_until_served(&app, "hooked", &poll_url).await;
    let sandbox_id = served["allocation"]["sandbox_id"].clone();
    let deadline = Instant::now() + PATIENCE;
    loop {
        // DynamoDB's webhooks wait until the (manual) clock is past the settle time.
        app.clock.advance(chrono::Duration::seconds(1));
        let found = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|n| n["kind"] == "ticket_served")
            .cloned();
        if let Some(notification) = found {
            assert_eq!(notification["sandbox"]["sandbox_id"], sandbox_id);
            assert_eq!(notification["sandbox"]["name"], "wl-hook-0000");
            break;
        }
        assert!(Instant::now() < deadline, "no ticket_served webhook");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kinds: Vec<Value> = seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|n| n["kind"].clone())
        .collect();
    assert!(kinds.iter().all(|k| k == "ticket_served"), "{kinds:?}");
    app.stop().await;
    Ok(())
}

/// With `WAIT_SYNC_ON_LINE`, the first request to wait on an empty pool makes the instance run
/// a sync (an admin job, against the mock CSP here), whose registrations serve the request.
async fn a_line_that_forms_requests_a_sync(backend: Backend) -> TestResult {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|config| {
        config.wait_sync_on_line = true;
    });
    let app = spawn_app_with(options).await;
    assert_eq!(app.stats().await.total(), 0);
    let (status, headers, body) = app
        .allocate("first-of-the-day")
        .header("Prefer", "wait=20")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(header(&headers, "preference-applied"), "wait=20");
    let (status, _, jobs) = app.get_json("/v1/admin/jobs").await;
    assert_eq!(status, StatusCode::OK, "{jobs}");
    assert!(
        jobs["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|job| job["kind"] == "sync"),
        "{jobs}"
    );
    app.stop().await;
    Ok(())
}

/// `GET /v1/admin/waiting-lines` shows this instance's lines with their track, prefix and
/// length, and the dashboard page has the panel that reads it.
async fn operators_see_the_lines(backend: Backend) -> TestResult {
    let app = app_with(backend, 25).await;
    empty_but_known_pool(&app).await;
    let waiters: Vec<_> = (0..2)
        .map(|i| {
            spawn_reply(
                waiting_allocate(&app, &format!("seen{i}"), 25)
                    .header("X-Instruqt-Track-ID", "workshop"),
            )
        })
        .collect();
    line_reaches(&app, 2).await;
    let (status, _, body) = app.get_json("/v1/admin/waiting-lines").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["waiting"], 2, "{body}");
    assert_eq!(body["lines"][0]["track"], "workshop", "{body}");
    assert_eq!(body["lines"][0]["prefix"], PREFIX, "{body}");
    assert_eq!(body["lines"][0]["waiting"], 2, "{body}");
    let (status, _, _) = app
        .track(Method::GET, "/v1/admin/waiting-lines")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let page = app
        .client
        .get(format!("{}/dashboard", app.url))
        .sent()
        .await
        .text()
        .await?;
    assert!(page.contains("id=\"waiting-lines\""));
    app.register("wl-seen", 2).await;
    for waiter in waiters {
        let (status, _, body) = tokio::time::timeout(PATIENCE, waiter).await??;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, _, body) = app.get_json("/v1/admin/waiting-lines").await;
    assert_eq!(body["waiting"], 0, "{body}");
    app.stop().await;
    Ok(())
}
