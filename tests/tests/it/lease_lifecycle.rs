//! The lease lifecycle for operators over real HTTP, on both stores: extending an allocation
//! (bounded, refused after the window, followed by auto-expiry on the manual clock), draining
//! allocation for the pool or a prefix (503 `MAINTENANCE` while replays and other routes keep
//! working), and per-track quotas enforced in the allocation's own transaction (a burst of 3×
//! the quota gives exactly the quota in 201s).

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Reply = (StatusCode, HeaderMap, Value);

both_stores!(
    extension_moves_the_window_and_auto_expiry_follows,
    drain_refuses_new_allocations_and_nothing_else,
    quota_holds_under_a_burst_and_frees_on_release,
);

async fn reply(request: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
    let resp = request.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, headers, body))
}

fn code(body: &Value) -> &str {
    body["detail"]["code"].as_str().unwrap_or_default()
}

/// The error envelope's `request_id` equals the `X-Request-ID` header.
fn assert_envelope(headers: &HeaderMap, body: &Value) {
    let header = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(!header.is_empty(), "X-Request-ID missing");
    assert_eq!(
        body["detail"]["request_id"].as_str(),
        Some(header),
        "{body}"
    );
}

fn extend(app: &TestApp, caller: &str, sandbox_id: &str, body: &str) -> reqwest::RequestBuilder {
    app.track(Method::POST, &format!("/v1/sandboxes/{sandbox_id}/extend"))
        .header("X-Instruqt-Sandbox-ID", caller)
        .header("content-type", "application/json")
        .body(body.to_string())
}

fn allocate_for(app: &TestApp, caller: &str, track: &str) -> reqwest::RequestBuilder {
    app.allocate(caller).header("X-Instruqt-Track-ID", track)
}

async fn get_sandbox(
    app: &TestApp,
    caller: &str,
    sandbox_id: &str,
) -> Result<Reply, reqwest::Error> {
    reply(
        app.track(Method::GET, &format!("/v1/sandboxes/{sandbox_id}"))
            .header("X-Instruqt-Sandbox-ID", caller),
    )
    .await
}

async fn admin_json(
    app: &TestApp,
    method: Method,
    path: &str,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let (status, _, body) = reply(app.admin(method, path)).await?;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    Ok(body)
}

/// Event types the sandbox's history holds, in order.
async fn history_types(
    app: &TestApp,
    sandbox_id: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let body = admin_json(
        app,
        Method::GET,
        &format!("/v1/admin/sandboxes/{sandbox_id}/history"),
    )
    .await?;
    Ok(body["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["event_type"].as_str().map(str::to_string))
        .collect())
}

/// Waits (bounded) until the audit feed holds at least `n` events of `event_type`; returns them.
async fn feed_of(
    app: &TestApp,
    event_type: &str,
    n: usize,
) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = admin_json(
            app,
            Method::GET,
            &format!("/v1/admin/events?type={event_type}&limit=500"),
        )
        .await?;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n {
            return Ok(events);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the feed shows {} {event_type} events, not {n}",
                events.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn quota_in_use(
    app: &TestApp,
    track: &str,
) -> Result<Option<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let body = admin_json(app, Method::GET, &format!("/v1/admin/pool?track={track}")).await?;
    Ok(body["quotas"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["track"] == track))
        .and_then(|q| q["in_use"].as_u64()))
}

/// An extension moves `expires_at` (owner's read, history, feed) within `MAX_LAB_EXTENSION_HOURS`;
/// bad bodies are 400, other callers 403, an ended window 409 `INVALID_STATE`; auto-expiry leaves
/// the extended allocation alone at the old end and ends it at the new one, freeing its quota slot.
async fn extension_moves_the_window_and_auto_expiry_follows(backend: Backend) -> TestResult {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|c| {
        c.max_lab_extension_hours = 24;
        c.track_quotas = "ext-track=5".into();
    });
    let app = spawn_app_with(options).await;
    app.seed("ext", 4).await;
    let mut held = Vec::new();
    for caller in ["stu-1", "stu-2"] {
        let (status, _, body) = reply(allocate_for(&app, caller, "ext-track")).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        held.push((
            body["sandbox_id"].as_str().unwrap_or_default().to_string(),
            body["expires_at"].as_i64().unwrap_or_default(),
        ));
    }
    let (id1, old_end) = held[0].clone();
    let (id2, _) = held[1].clone();
    assert_eq!(quota_in_use(&app, "ext-track").await?, Some(2));

    for bad in [
        "{\"hours\":0}",
        "{\"hours\":-1}",
        "{\"hours\":1.5}",
        "{\"hours\":\"2\"}",
        "{}",
        "not json",
        "{\"hours\":9000}",
    ] {
        let (status, headers, body) = reply(extend(&app, "stu-1", &id1, bad)).await?;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{bad}: {body}"
        );
        assert_envelope(&headers, &body);
    }
    let (status, _, body) = reply(extend(&app, "stu-2", &id1, "{\"hours\":1}")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER"),
        "{body}"
    );

    let (status, _, body) = reply(extend(&app, "stu-1", &id1, "{\"hours\":10}")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["expires_at"].as_i64(),
        Some(old_end + 10 * 3600),
        "{body}"
    );
    assert_eq!(body["extended_hours"], 10);
    assert_eq!(body["remaining_extension_hours"], 14);
    let (status, headers, body) = reply(extend(&app, "stu-1", &id1, "{\"hours\":15}")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "EXTENSION_LIMIT_EXCEEDED"),
        "{body}"
    );
    assert_eq!(body["detail"]["limit"], 24, "{body}");
    assert_envelope(&headers, &body);
    let (status, _, body) = reply(extend(&app, "stu-1", &id1, "{\"hours\":14}")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_end = old_end + 24 * 3600;
    assert_eq!(body["expires_at"].as_i64(), Some(new_end));
    let (_, _, body) = get_sandbox(&app, "stu-1", &id1).await?;
    assert_eq!(
        body["expires_at"].as_i64(),
        Some(new_end),
        "the owner's strong read follows"
    );
    assert_eq!(
        history_types(&app, &id1).await?,
        [
            "SandboxRegistered",
            "SandboxAllocated",
            "LeaseExtended",
            "LeaseExtended"
        ]
    );
    let extended = feed_of(&app, "LeaseExtended", 2).await?;
    assert!(
        extended.iter().all(|e| e["actor"] == "track:stu-1"),
        "{extended:?}"
    );

    // Past the old end, inside the grace: the unextended window has ended and cannot be revived.
    let old_end_at = chrono::DateTime::from_timestamp(old_end, 0).ok_or("time")?;
    app.clock.set(old_end_at + chrono::Duration::minutes(1));
    let (status, _, body) = reply(extend(&app, "stu-2", &id2, "{\"hours\":1}")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "INVALID_STATE"),
        "{body}"
    );

    // Past the old end and the grace: only the unextended allocation expires.
    app.clock.set(old_end_at + chrono::Duration::minutes(31));
    admin_json(&app, Method::POST, "/v1/admin/auto-expire").await?;
    let (status, _, body) = get_sandbox(&app, "stu-1", &id1).await?;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("allocated")),
        "{body}"
    );
    let (status, _, body) = get_sandbox(&app, "stu-2", &id2).await?;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("pending_deletion")),
        "stu-2's allocation ended, and stu-2 sees that: {body}"
    );
    assert!(history_types(&app, &id2)
        .await?
        .contains(&"AllocationExpired".to_string()));
    assert_eq!(
        quota_in_use(&app, "ext-track").await?,
        Some(1),
        "expiry freed the slot"
    );

    // Past the new end and the grace: the extended allocation expires too.
    let new_end_at = chrono::DateTime::from_timestamp(new_end, 0).ok_or("time")?;
    app.clock.set(new_end_at + chrono::Duration::minutes(31));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        admin_json(&app, Method::POST, "/v1/admin/auto-expire").await?;
        if history_types(&app, &id1)
            .await?
            .contains(&"AllocationExpired".to_string())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the extended allocation never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = reply(extend(&app, "stu-1", &id1, "{\"hours\":1}")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "INVALID_STATE"),
        "{body}"
    );
    assert_eq!(quota_in_use(&app, "ext-track").await?, Some(0));
    app.stop().await;
    Ok(())
}

/// While drained, allocate answers 503 `MAINTENANCE` with `Retry-After` in the error envelope;
/// a replay, reads, marks and admin routes keep working; a prefix drain refuses only requests for
/// that prefix; resume reopens; drains are audited and shown by `GET /v1/admin/pool`.
async fn drain_refuses_new_allocations_and_nothing_else(backend: Backend) -> TestResult {
    let app = spawn_app_with(AppOptions::new(backend)).await;
    app.seed("lab", 6).await;
    app.seed("other", 3).await;
    let (status, _, body) = reply(app.allocate("held")).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let held = body["sandbox_id"].as_str().unwrap_or_default().to_string();

    let control = admin_json(&app, Method::POST, "/v1/admin/pool/drain?reason=upgrade").await?;
    assert_eq!(control["drained"], true, "{control}");
    assert_eq!(control["drains"][0]["reason"], "upgrade");
    let (status, headers, body) = reply(app.allocate("newcomer")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "MAINTENANCE"),
        "{body}"
    );
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("60")
    );
    assert_eq!(body["detail"]["retry_after"], 60);
    assert_envelope(&headers, &body);

    let (status, _, body) = reply(app.allocate("held")).await?;
    assert_eq!(
        (status, body["sandbox_id"].as_str()),
        (StatusCode::OK, Some(held.as_str())),
        "the replay answers"
    );
    let (status, _, _) = get_sandbox(&app, "held", &held).await?;
    assert_eq!(status, StatusCode::OK);
    admin_json(&app, Method::GET, "/v1/admin/stats").await?;
    let control = admin_json(&app, Method::GET, "/v1/admin/pool").await?;
    assert_eq!(control["drained"], true, "{control}");
    let (status, _, body) = reply(
        app.track(
            Method::POST,
            &format!("/v1/sandboxes/{held}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "held"),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "marks keep working: {body}");
    // A repeat drain records nothing.
    let again = admin_json(&app, Method::POST, "/v1/admin/pool/drain").await?;
    assert_eq!(again["version"], control["version"]);

    let control = admin_json(&app, Method::POST, "/v1/admin/pool/resume").await?;
    assert_eq!(control["drained"], false, "{control}");
    let (status, _, body) = reply(app.allocate("newcomer")).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let control = admin_json(&app, Method::POST, "/v1/admin/pool/drain?prefix=lab").await?;
    assert_eq!(
        (
            control["drained"].clone(),
            control["drains"][0]["prefix"].clone()
        ),
        (json!(false), json!("lab"))
    );
    let (status, _, body) = reply(
        app.allocate("lab-student")
            .header("X-Sandbox-Name-Prefix", "lab-00"),
    )
    .await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "MAINTENANCE"),
        "{body}"
    );
    let (status, _, body) = reply(
        app.allocate("other-student")
            .header("X-Sandbox-Name-Prefix", "other"),
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "other prefixes stay open: {body}"
    );
    let (status, _, body) = reply(app.admin(Method::POST, "/v1/admin/pool/drain?bogus=1")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    admin_json(&app, Method::POST, "/v1/admin/pool/resume?prefix=lab").await?;
    let (status, _, body) = reply(
        app.allocate("lab-student")
            .header("X-Sandbox-Name-Prefix", "lab-00"),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let drained = feed_of(&app, "PoolDrained", 2).await?;
    assert!(drained
        .iter()
        .all(|e| e["actor"] == "admin" && e["stream_id"] == "pool#control"));
    assert_eq!(feed_of(&app, "PoolResumed", 2).await?.len(), 2);
    let page = app
        .client
        .get(format!("{}/dashboard", app.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        page.contains("id=\"drain-state\""),
        "the dashboard shows the drain state"
    );
    app.stop().await;
    Ok(())
}

/// A burst of 3× the quota of concurrent allocations for one track gives exactly `quota` 201s and
/// 429 `QUOTA_EXCEEDED` (with the limit) for the rest; replays still answer, other tracks are not
/// counted, and a mark-for-deletion frees a slot.
async fn quota_holds_under_a_burst_and_frees_on_release(backend: Backend) -> TestResult {
    const QUOTA: usize = 5;
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|c| c.track_quotas = format!("burst={QUOTA}"));
    let app = spawn_app_with(options).await;
    app.seed("q", 4 * QUOTA).await;
    let burst = (0..3 * QUOTA).map(|i| {
        let request = allocate_for(&app, &format!("burst-{i}"), "burst");
        async move { reply(request).await.map(|r| (format!("burst-{i}"), r)) }
    });
    let results = futures::future::join_all(burst).await;
    let mut winners = Vec::new();
    let mut refused = 0;
    for result in results {
        let (caller, (status, headers, body)) = result?;
        match status {
            StatusCode::CREATED => winners.push((
                caller,
                body["sandbox_id"].as_str().unwrap_or_default().to_string(),
            )),
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(code(&body), "QUOTA_EXCEEDED", "{body}");
                assert_eq!(body["detail"]["limit"], QUOTA, "{body}");
                assert!(headers.get("retry-after").is_some());
                assert_envelope(&headers, &body);
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((winners.len(), refused), (QUOTA, 2 * QUOTA));
    assert_eq!(quota_in_use(&app, "burst").await?, Some(QUOTA as u64));
    // The track's own quota stream; each allocation also takes a slot of its caller's
    // fair-share cap (`quota#caller#…`, docs/tenancy.md), with the same event type.
    let track_slots = feed_of(&app, "QuotaSlotTaken", 2 * QUOTA)
        .await?
        .into_iter()
        .filter(|e| e["stream_id"] == "quota#burst")
        .count();
    assert_eq!(track_slots, QUOTA);

    let (caller, sandbox_id) = winners[0].clone();
    let (status, _, body) = reply(allocate_for(&app, &caller, "burst")).await?;
    assert_eq!(
        (status, body["sandbox_id"].as_str()),
        (StatusCode::OK, Some(sandbox_id.as_str())),
        "replays answer at the quota"
    );
    let (status, _, body) = reply(allocate_for(&app, "elsewhere", "other-track")).await?;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "other tracks are not counted: {body}"
    );

    let (status, _, body) = reply(
        app.track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", &caller),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(quota_in_use(&app, "burst").await?, Some(QUOTA as u64 - 1));
    let (status, _, body) = reply(allocate_for(&app, "late", "burst")).await?;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the freed slot is taken: {body}"
    );
    let (status, _, body) = reply(allocate_for(&app, "later", "burst")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "QUOTA_EXCEEDED")
    );
    assert_eq!(feed_of(&app, "QuotaSlotReleased", 1).await?.len(), 1);
    app.stop().await;
    Ok(())
}

/// Two API instances on the same DynamoDB tables (each with its own caches and in-process
/// queues): a burst for one track split across both still gives exactly the quota in 201s — the
/// quota stream's version check decides between instances — and a drain recorded on one instance
/// refuses allocations on the other once its drain cache (`DRAIN_CACHE_MS`) has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_two_instances_share_quota_and_drain() -> TestResult {
    const QUOTA: usize = 4;
    const DRAIN_CACHE_MS: u64 = 300;
    let tables = format!("t{}", uuid::Uuid::new_v4().simple());
    let instance = |projector: bool| {
        let tables = tables.clone();
        let mut options = AppOptions::new(Backend::Dynamo);
        options.configure = Box::new(move |c| {
            c.store.table_prefix = tables;
            c.track_quotas = format!("shared={QUOTA}");
            c.drain_cache_ms = DRAIN_CACHE_MS;
            c.run_projector = Some(projector);
        });
        options
    };
    let a = spawn_app_with(instance(true)).await;
    let b = spawn_app_with(instance(false)).await;
    a.seed("multi", 4 * QUOTA).await;

    let burst = (0..3 * QUOTA).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let request = allocate_for(app, &format!("multi-{i}"), "shared");
        async move { reply(request).await }
    });
    let mut created = 0;
    for result in futures::future::join_all(burst).await {
        let (status, _, body) = result?;
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(code(&body), "QUOTA_EXCEEDED"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, QUOTA, "exactly the quota across both instances");
    assert_eq!(quota_in_use(&b, "shared").await?, Some(QUOTA as u64));

    // B reads the (open) drain state now, so its cache holds "open" when A drains.
    let (status, _, _) = reply(b.allocate("before-drain")).await?;
    assert_eq!(status, StatusCode::CREATED);
    admin_json(&a, Method::POST, "/v1/admin/pool/drain").await?;
    let (status, _, body) = reply(a.allocate("on-a")).await?;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "MAINTENANCE"),
        "at once where it was recorded"
    );
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(DRAIN_CACHE_MS)
        + Duration::from_secs(10);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (status, _, body) = reply(b.allocate(&format!("on-b-{attempt}"))).await?;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(code(&body), "MAINTENANCE");
            break;
        }
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never saw the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.stop().await;
    a.stop().await;
    Ok(())
}
