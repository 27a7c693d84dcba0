//! Auditors and dashboards over real HTTP, on both stores: the time-ordered event feed with its
//! filters and cursors, a sandbox's state at an instant, a caller's allocation history, the live
//! server-sent-event feed (new events, resume after `Last-Event-ID`), the dashboard page, and the
//! agreement of every source of pool figures (stats, `/metrics`, a full rebuild, an audit replay).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::audit::{replay_pool_at, FeedFilter};
use domain::store::PoolView;
use domain::{Clock, EventEnvelope, PoolStats, SandboxStatus};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app, Backend, TestApp, ADMIN_TOKEN, TRACK_TOKEN};
use tests::history::all_events;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
/// A feed query string and the filter and range it must select.
type FeedCase = (
    String,
    FeedFilter,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

both_stores!(
    feed_pages_through_everything_in_time_order_with_filters,
    sandbox_state_at_an_instant_names_the_holder,
    caller_history_lists_every_allocation,
    live_stream_delivers_new_events_and_resumes,
    dashboard_sources_metrics_and_replays_agree,
);

async fn get_json(app: &TestApp, path: &str) -> Result<(StatusCode, Value), reqwest::Error> {
    let resp = app.admin(Method::GET, path).send().await?;
    let status = resp.status();
    Ok((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
}

/// Percent-encodes everything but unreserved characters (for path segments and query values).
fn encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The test clock's time at the precision events are stored with (milliseconds).
fn now(app: &TestApp) -> DateTime<Utc> {
    domain::model::events::truncate_to_millis(app.clock.now())
}

fn time(at: &DateTime<Utc>) -> String {
    domain::model::events::format_time(at)
}

async fn allocate(
    app: &TestApp,
    caller: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let resp = app.allocate(caller).send().await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    assert!(status.is_success(), "allocate {caller}: {status} {body}");
    Ok(body["sandbox_id"].as_str().unwrap_or_default().to_string())
}

async fn mark(app: &TestApp, caller: &str, sandbox_id: &str) -> TestResult {
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await?;
    assert!(
        resp.status().is_success(),
        "mark {sandbox_id}: {}",
        resp.status()
    );
    Ok(())
}

/// Reads every page of `/v1/admin/events?{query}` with `limit`, checking each page's size.
async fn read_feed(
    app: &TestApp,
    query: &str,
    limit: usize,
) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/v1/admin/events?limit={limit}&{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", encode(c)));
        }
        let (status, body) = get_json(app, &path).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let page = body["events"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= limit, "a page holds at most limit events");
        assert_eq!(body["count"].as_u64(), Some(page.len() as u64));
        events.extend(page);
        match body["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(events),
        }
    }
    Err("the feed did not end".into())
}

fn keys(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["key"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn envelope(value: &Value) -> EventEnvelope {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("not an envelope ({e}): {value}"))
}

/// What the feed must return for `filter` and the time range, computed from the whole history.
fn expected(
    all: &[EventEnvelope],
    filter: &FeedFilter,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Vec<String> {
    let mut keys: Vec<String> = all
        .iter()
        .filter(|e| filter.matches(e))
        .filter(|e| since.is_none_or(|s| e.occurred_at >= s))
        .filter(|e| until.is_none_or(|u| e.occurred_at < u))
        .map(domain::audit::feed_key)
        .collect();
    keys.sort();
    keys
}

/// Builds a small history spread over several hours: registrations, three allocations, a mark.
/// Returns (the instants between the steps, the ids allocated to stu-a, stu-b, stu-c).
async fn history(
    app: &TestApp,
) -> Result<(Vec<DateTime<Utc>>, Vec<String>), Box<dyn std::error::Error + Send + Sync>> {
    let mut marks = vec![now(app)];
    app.seed("aud", 6).await;
    app.clock.advance(chrono::Duration::minutes(70));
    marks.push(now(app));
    let a = allocate(app, "stu-a").await?;
    app.clock.advance(chrono::Duration::minutes(90));
    marks.push(now(app));
    let b = allocate(app, "stu-b").await?;
    let c = allocate(app, "stu #c/1").await?;
    app.clock.advance(chrono::Duration::minutes(5));
    marks.push(now(app));
    mark(app, "stu-a", &a).await?;
    app.wait_until(|s| {
        s.get(SandboxStatus::Allocated) == 2 && s.get(SandboxStatus::PendingDeletion) == 1
    })
    .await;
    Ok((marks, vec![a, b, c]))
}

/// The feed pages through the whole history in strictly increasing key order with small pages;
/// each filter and time range returns exactly the matching events; bad input is a 400.
async fn feed_pages_through_everything_in_time_order_with_filters(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    let (marks, _) = history(&app).await?;
    let all = all_events(app.state.broker.events().as_ref()).await;

    let feed = read_feed(&app, "", 4).await?;
    let got = keys(&feed);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "strictly time-ordered: {got:?}"
    );
    assert_eq!(
        got,
        expected(&all, &FeedFilter::default(), None, None),
        "every event, once"
    );
    assert!(feed
        .iter()
        .all(|e| e["event_id"].is_string() && e["payload"].is_object()));

    let cases: Vec<FeedCase> = vec![
        (
            "type=SandboxAllocated".into(),
            FeedFilter {
                event_type: Some("SandboxAllocated".into()),
                ..FeedFilter::default()
            },
            None,
            None,
        ),
        (
            "caller=stu-a".into(),
            FeedFilter {
                caller: Some("stu-a".into()),
                ..FeedFilter::default()
            },
            None,
            None,
        ),
        (
            format!("caller={}", encode("stu #c/1")),
            FeedFilter {
                caller: Some("stu #c/1".into()),
                ..FeedFilter::default()
            },
            None,
            None,
        ),
        (
            "sandbox_id=aud-id-3".into(),
            FeedFilter {
                sandbox_id: Some("aud-id-3".into()),
                ..FeedFilter::default()
            },
            None,
            None,
        ),
        (
            format!(
                "since={}&until={}",
                encode(&time(&marks[1])),
                encode(&time(&marks[3]))
            ),
            FeedFilter::default(),
            Some(marks[1]),
            Some(marks[3]),
        ),
        (
            format!("type=ClaimGranted&since={}", encode(&time(&marks[2]))),
            FeedFilter {
                event_type: Some("ClaimGranted".into()),
                ..FeedFilter::default()
            },
            Some(marks[2]),
            None,
        ),
    ];
    for (query, filter, since, until) in cases {
        let page = read_feed(&app, &query, 2).await?;
        let want = expected(&all, &filter, since, until);
        assert!(!want.is_empty(), "{query}: the case selects something");
        assert_eq!(keys(&page), want, "{query}");
        assert!(page.iter().all(|e| filter.matches(&envelope(e))), "{query}");
    }
    let allocated_to_c = read_feed(
        &app,
        &format!("caller={}&type=SandboxAllocated", encode("stu #c/1")),
        10,
    )
    .await?;
    assert_eq!(allocated_to_c.len(), 1);

    for bad in [
        "cursor=garbage",
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "limit=0",
        "limit=501",
        "type=NoSuchEvent",
        "colour=blue",
        "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
    ] {
        let (status, body) = get_json(&app, &format!("/v1/admin/events?{bad}")).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{bad}");
    }
    let forged = domain::store::encode_cursor(&serde_json::json!({"after": "not a position"}))
        .unwrap_or_default();
    let (status, _) = get_json(&app, &format!("/v1/admin/events?cursor={forged}")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a forged cursor is a 400");
    let track = app.track(Method::GET, "/v1/admin/events").send().await?;
    assert_eq!(
        track.status(),
        StatusCode::FORBIDDEN,
        "the track token is refused"
    );
    app.stop().await;
    Ok(())
}

/// `GET /v1/admin/sandboxes/{id}?at=` folds the sandbox's events up to the instant: available
/// before the allocation, held by the student during it, released after the mark; not yet
/// registered before its first event; 404 for an unknown sandbox, 400 for a bad time.
async fn sandbox_state_at_an_instant_names_the_holder(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    app.clock.advance(chrono::Duration::minutes(1));
    app.seed("pit", 1).await;
    let registered = now(&app);
    app.clock.advance(chrono::Duration::minutes(30));
    let id = allocate(&app, "stu-pit").await?;
    let allocated = now(&app);
    app.clock.advance(chrono::Duration::minutes(45));
    mark(&app, "stu-pit", &id).await?;
    let marked = now(&app);
    app.clock.advance(chrono::Duration::minutes(1));

    let at = |t: DateTime<Utc>| format!("/v1/admin/sandboxes/{id}?at={}", encode(&time(&t)));
    let (status, before) = get_json(&app, &at(registered - chrono::Duration::seconds(1))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        before["status"],
        Value::Null,
        "not registered yet: {before}"
    );
    assert_eq!(before["version"], 0);

    let (_, free) = get_json(&app, &at(registered + chrono::Duration::minutes(1))).await?;
    assert_eq!(free["status"], "available");
    assert_eq!(free["holder"], Value::Null);

    let (_, held) = get_json(&app, &at(allocated + chrono::Duration::minutes(10))).await?;
    assert_eq!(held["status"], "allocated", "{held}");
    assert_eq!(held["holder"], "stu-pit");
    assert_eq!(held["owner"], "stu-pit");
    assert_eq!(held["allocated_at"], time(&allocated));
    assert_eq!(held["version"], 2);

    let (_, released) = get_json(&app, &at(marked)).await?;
    assert_eq!(released["status"], "pending_deletion", "{released}");
    assert_eq!(released["holder"], Value::Null);
    assert_eq!(
        released["owner"], "stu-pit",
        "the most recent owner stays visible"
    );
    assert_eq!(released["deletion_requested_at"], time(&marked));

    let (_, now) = get_json(&app, &format!("/v1/admin/sandboxes/{id}")).await?;
    assert_eq!(now["status"], "pending_deletion");

    let (status, body) = get_json(
        &app,
        "/v1/admin/sandboxes/no-such-sandbox?at=2026-01-01T00:00:00Z",
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["detail"]["code"], "SANDBOX_NOT_FOUND");
    let (status, body) = get_json(&app, &format!("/v1/admin/sandboxes/{id}?at=noon")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    app.stop().await;
    Ok(())
}

/// `GET /v1/admin/callers/{caller}/allocations` lists every sandbox the caller was allocated, in
/// time order, with how each ended; other callers' allocations are not listed; it pages.
async fn caller_history_lists_every_allocation(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    app.seed("hist", 5).await;
    let caller = "stu#h/x 1";
    let first = allocate(&app, caller).await?;
    app.clock.advance(chrono::Duration::minutes(20));
    let first_end = now(&app);
    mark(&app, caller, &first).await?;
    app.clock.advance(chrono::Duration::minutes(20));
    let second = allocate(&app, caller).await?;
    allocate(&app, "someone-else").await?;
    assert_ne!(first, second);

    let path = format!("/v1/admin/callers/{}/allocations", encode(caller));
    let (status, body) = get_json(&app, &path).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["caller"], caller);
    let list = body["allocations"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = list
        .iter()
        .filter_map(|a| a["sandbox_id"].as_str())
        .collect();
    assert_eq!(ids, vec![first.as_str(), second.as_str()], "{body}");
    assert_eq!(list[0]["ended_at"], time(&first_end));
    assert_eq!(list[0]["end_reason"], "deletion_requested");
    assert_eq!(list[1]["ended_at"], Value::Null, "still held");
    assert_eq!(body["cursor"], Value::Null);

    let (_, page1) = get_json(&app, &format!("{path}?limit=1")).await?;
    assert_eq!(page1["count"], 1);
    let cursor = page1["cursor"].as_str().unwrap_or_default().to_string();
    assert!(!cursor.is_empty(), "a full page has a cursor");
    let (_, page2) = get_json(&app, &format!("{path}?limit=1&cursor={}", encode(&cursor))).await?;
    assert_eq!(page2["allocations"][0]["sandbox_id"], second.as_str());

    let (_, nobody) = get_json(&app, "/v1/admin/callers/nobody/allocations").await?;
    assert_eq!(nobody["count"], 0);
    let (status, _) = get_json(
        &app,
        &format!("/v1/admin/callers/{}/allocations", "x".repeat(300)),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    app.stop().await;
    Ok(())
}

/// One server-sent event: its id and JSON data.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    data: Value,
}

/// Reads a text/event-stream response until `done` holds for the events read (bounded time).
async fn read_stream(
    resp: &mut reqwest::Response,
    buffer: &mut String,
    done: impl Fn(&[Sse]) -> bool,
) -> Result<Vec<Sse>, Box<dyn std::error::Error + Send + Sync>> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if let Some(id) = id {
                events.push(Sse {
                    id,
                    data: serde_json::from_str(&data)?,
                });
            }
        }
        if done(&events) {
            return Ok(events);
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .map_err(|_| format!("stream: timed out; got {events:?}"))??;
        match chunk {
            Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
            None => return Err(format!("stream ended; got {events:?}").into()),
        }
    }
}

fn allocation_of<'a>(events: &'a [Sse], sandbox_id: &str) -> Option<&'a Sse> {
    events.iter().find(|e| {
        e.data["event_type"] == "SandboxAllocated"
            && e.data["stream_id"] == format!("sandbox#{sandbox_id}")
    })
}

/// The live stream delivers an allocation made after connecting; reconnecting with its id as
/// `Last-Event-ID` replays what followed (and not the event itself) before going live again.
async fn live_stream_delivers_new_events_and_resumes(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    app.seed("live", 4).await;
    let stream_url = format!("{}/v1/admin/events/stream", app.url);
    let mut resp = app
        .client
        .get(&stream_url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut buffer = String::new();

    let first = allocate(&app, "stu-live-1").await?;
    let events = read_stream(&mut resp, &mut buffer, |e| {
        allocation_of(e, &first).is_some()
    })
    .await?;
    let seen = allocation_of(&events, &first)
        .cloned()
        .ok_or("no allocation event")?;
    assert_eq!(
        seen.data["key"],
        seen.id.as_str(),
        "the SSE id is the feed key"
    );
    assert_eq!(seen.data["payload"]["caller"], "stu-live-1");
    drop(resp);

    app.clock.advance(chrono::Duration::seconds(5));
    let second = allocate(&app, "stu-live-2").await?;
    let mut resumed = app
        .client
        .get(&stream_url)
        .bearer_auth(ADMIN_TOKEN)
        .header("Last-Event-ID", &seen.id)
        .send()
        .await?;
    assert_eq!(resumed.status(), StatusCode::OK);
    let mut buffer = String::new();
    let replayed = read_stream(&mut resumed, &mut buffer, |e| {
        allocation_of(e, &second).is_some()
    })
    .await?;
    assert!(
        replayed.iter().all(|e| e.id > seen.id),
        "only what followed the id is replayed"
    );
    let ids: Vec<&String> = replayed.iter().map(|e| &e.id).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no event is sent twice");

    // Live again after the replay.
    let third = allocate(&app, "stu-live-3").await?;
    read_stream(&mut resumed, &mut buffer, |e| {
        allocation_of(e, &third).is_some()
    })
    .await?;
    drop(resumed);

    let bad = app
        .client
        .get(&stream_url)
        .bearer_auth(ADMIN_TOKEN)
        .header("Last-Event-ID", "nonsense")
        .send()
        .await?;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let anonymous = app.client.get(&stream_url).send().await?;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let with_query_token = app
        .client
        .get(format!("{stream_url}?token={ADMIN_TOKEN}"))
        .send()
        .await?;
    assert_eq!(
        with_query_token.status(),
        StatusCode::UNAUTHORIZED,
        "no token in URLs"
    );
    let track = app
        .client
        .get(&stream_url)
        .bearer_auth(TRACK_TOKEN)
        .send()
        .await?;
    assert_eq!(track.status(), StatusCode::FORBIDDEN);
    app.stop().await;
    Ok(())
}

/// Parses `broker_pool{status="…"} N` gauges from the Prometheus text.
fn pool_gauges(metrics: &str) -> BTreeMap<String, i64> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("broker_pool{status=\"")?;
            let (status, value) = rest.split_once("\"} ")?;
            Some((status.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn stats_json(stats: &PoolStats) -> Value {
    let mut map = serde_json::Map::new();
    for status in SandboxStatus::ALL {
        map.insert(status.as_str().into(), stats.get(status).into());
    }
    map.insert("total".into(), stats.total().into());
    Value::Object(map)
}

/// The dashboard's figures (`/v1/admin/stats`), the `/metrics` pool gauges, a full rebuild of the
/// view and an audit replay of the history all agree; a replay at a past instant shows the pool
/// as it was; the dashboard page and its assets are served with the dashboard's CSP.
async fn dashboard_sources_metrics_and_replays_agree(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    app.seed("agree", 8).await;
    let before_allocations = now(&app);
    app.clock.advance(chrono::Duration::minutes(1));
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(allocate(&app, &format!("stu-agree-{i}")).await?);
    }
    mark(&app, "stu-agree-0", &held[0]).await?;
    app.wait_until(|s| {
        s.get(SandboxStatus::Allocated) == 2 && s.get(SandboxStatus::PendingDeletion) == 1
    })
    .await;

    let (_, stats) = get_json(&app, "/v1/admin/stats").await?;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await?
        .text()
        .await?;
    let gauges = pool_gauges(&metrics);
    let events = Arc::clone(app.state.broker.events());
    let scratch = Arc::new(store_embedded::EmbeddedStore::open_in_memory(8)?);
    projector::rebuild::rebuild_into(
        Arc::clone(&events),
        scratch.clone(),
        &projector::rebuild::RebuildOptions::default(),
        Arc::new(projector::rebuild::RebuildProgress::default()),
    )
    .await?;
    let rebuilt = scratch.stats().await?;
    let replayed = replay_pool_at(Arc::clone(&events), None, 4, 100).await?;

    let want = stats_json(&rebuilt);
    for (status, count) in want.as_object().into_iter().flatten() {
        assert_eq!(
            &stats[status], count,
            "stats {status}: {stats} vs rebuild {want}"
        );
        assert_eq!(
            gauges.get(status).copied(),
            count.as_i64(),
            "metrics {status}: {gauges:?}"
        );
    }
    assert_eq!(replayed.stats, rebuilt, "audit replay = rebuild");
    assert_eq!(rebuilt.get(SandboxStatus::Available), 5);
    let past = replay_pool_at(events, Some(before_allocations), 4, 100).await?;
    assert_eq!(
        past.stats.get(SandboxStatus::Available),
        8,
        "before the allocations"
    );
    assert_eq!(past.stats.get(SandboxStatus::Allocated), 0);

    let page = app
        .client
        .get(format!("{}/dashboard", app.url))
        .send()
        .await?;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.starts_with("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'"), "{csp}");
    let html = page.text().await?;
    assert!(
        html.contains("content=\"/v1\""),
        "the API base is written into the page"
    );
    for asset in ["/dashboard/app.js", "/dashboard/style.css"] {
        assert!(html.contains(asset), "{asset} referenced");
        let resp = app.client.get(format!("{}{asset}", app.url)).send().await?;
        assert_eq!(resp.status(), StatusCode::OK, "{asset}");
        assert!(!resp.text().await?.is_empty());
    }
    let (_, doc) = (
        StatusCode::OK,
        app.client
            .get(format!("{}/v1/openapi.json", app.url))
            .send()
            .await?
            .json::<Value>()
            .await?,
    );
    for path in [
        "/v1/admin/events",
        "/v1/admin/events/stream",
        "/v1/admin/sandboxes/{sandbox_id}",
        "/v1/admin/callers/{caller}/allocations",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    app.stop().await;
    Ok(())
}
