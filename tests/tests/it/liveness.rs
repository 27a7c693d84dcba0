//! Liveness under partial failure over real HTTP, on both stores (docs/liveness.md): a retried
//! extension with the same `Idempotency-Key` adds its hours once, and a replayed allocation
//! past its `expires_at` expires the ended lab and answers as a fresh request would; the
//! unknown-outcome hold is a setting.

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Reply = (StatusCode, HeaderMap, Value);

both_stores!(
    a_retried_extension_adds_its_hours_once,
    a_replay_past_expires_at_answers_as_a_fresh_request,
);

async fn reply(request: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
    let resp = request.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, headers, body))
}

fn extend(
    app: &TestApp,
    sandbox_id: &str,
    key: Option<&str>,
    hours: u32,
) -> reqwest::RequestBuilder {
    let request = app
        .track(Method::POST, &format!("/v1/sandboxes/{sandbox_id}/extend"))
        .header("X-Instruqt-Sandbox-ID", "stu-1")
        .header("content-type", "application/json")
        .body(format!("{{\"hours\":{hours}}}"));
    match key {
        Some(key) => request.header("Idempotency-Key", key),
        None => request,
    }
}

/// Event types of a sandbox's history, in order.
async fn history_types(
    app: &TestApp,
    sandbox_id: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let (status, _, body) = reply(app.admin(
        Method::GET,
        &format!("/v1/admin/sandboxes/{sandbox_id}/history"),
    ))
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(body["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["event_type"].as_str().map(str::to_string))
        .collect())
}

fn count(types: &[String], event_type: &str) -> usize {
    types.iter().filter(|t| *t == event_type).count()
}

/// A retry with the same `Idempotency-Key` answers the first extension's window and appends
/// nothing, even after another extension moved the window on; a new key extends again.
async fn a_retried_extension_adds_its_hours_once(backend: Backend) -> TestResult {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|c| c.max_lab_extension_hours = 24);
    let app = spawn_app_with(options).await;
    app.seed("idem", 2).await;
    let (status, _, body) = reply(app.allocate("stu-1")).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    let start = body["expires_at"].as_i64().unwrap_or_default();

    let (status, _, first) = reply(extend(&app, &id, Some("ext-a"), 2)).await?;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["expires_at"].as_i64(), Some(start + 2 * 3600));
    for _ in 0..3 {
        let (status, _, again) = reply(extend(&app, &id, Some("ext-a"), 2)).await?;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again, first, "a retry answers the same result");
    }
    let (status, _, second) = reply(extend(&app, &id, Some("ext-b"), 1)).await?;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["expires_at"].as_i64(), Some(start + 3 * 3600));
    assert_eq!(second["extended_hours"], 3);
    let (status, _, late) = reply(extend(&app, &id, Some("ext-a"), 2)).await?;
    assert_eq!(status, StatusCode::OK, "{late}");
    assert_eq!(late, first, "a late retry still answers its own extension");
    assert_eq!(count(&history_types(&app, &id).await?, "LeaseExtended"), 2);

    let (status, _, body) = reply(
        app.track(Method::GET, &format!("/v1/sandboxes/{id}"))
            .header("X-Instruqt-Sandbox-ID", "stu-1"),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_at"].as_i64(), Some(start + 3 * 3600));
    Ok(())
}

/// A replay of a live allocation is a 200 inside the window; from `expires_at` on (the expiry
/// job not yet run) it expires the ended allocation (`AllocationExpired`) and answers like a
/// fresh request: 201 with another sandbox, then 409 once the pool is empty.
async fn a_replay_past_expires_at_answers_as_a_fresh_request(backend: Backend) -> TestResult {
    let app = spawn_app_with(AppOptions::new(backend)).await;
    app.seed("ended", 2).await;
    let (status, _, body) = reply(app.allocate("stu-1")).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    let end = body["expires_at"].as_i64().unwrap_or_default();

    let (status, _, body) = reply(app.allocate("stu-1")).await?;
    assert_eq!(status, StatusCode::OK, "inside the window: {body}");
    assert_eq!(body["sandbox_id"].as_str(), Some(first.as_str()));

    let at = |epoch: i64| chrono::DateTime::from_timestamp(epoch, 0).unwrap_or_default();
    // `expires_at` is in whole seconds, the stored end has milliseconds.
    app.clock.set(at(end + 1));
    let (status, _, body) = reply(app.allocate("stu-1")).await?;
    assert_eq!(status, StatusCode::CREATED, "past the window: {body}");
    let second = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    assert_ne!(second, first, "the ended sandbox is never handed out again");
    let types = history_types(&app, &first).await?;
    assert_eq!(count(&types, "AllocationExpired"), 1, "{types:?}");

    let end = body_expires(&app, &second).await?;
    app.clock.set(at(end + 1));
    let (status, _, body) = reply(app.allocate("stu-1")).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "NO_SANDBOXES_AVAILABLE", "{body}");
    let types = history_types(&app, &second).await?;
    assert_eq!(count(&types, "AllocationExpired"), 1, "{types:?}");
    Ok(())
}

/// `expires_at` of stu-1's live allocation of `sandbox_id` (strong read).
async fn body_expires(
    app: &TestApp,
    sandbox_id: &str,
) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    let (status, _, body) = reply(
        app.track(Method::GET, &format!("/v1/sandboxes/{sandbox_id}"))
            .header("X-Instruqt-Sandbox-ID", "stu-1"),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(body["expires_at"].as_i64().unwrap_or_default())
}

/// `UNKNOWN_OUTCOME_HOLD_SEC` reaches the allocator: 10 s when unset, the given seconds
/// otherwise (the command-line spelling is parsed by the same clap definition as the variable).
#[tokio::test]
async fn the_unknown_outcome_hold_is_a_setting() -> TestResult {
    let defaults = spawn_app_with(AppOptions::new(Backend::Embedded)).await;
    assert_eq!(
        defaults.state.broker.config().unknown_outcome_hold,
        std::time::Duration::from_secs(10)
    );
    defaults.stop().await;

    let parsed: command_api::config::Config =
        runtime::try_parse_settings_from(["command-api", "--unknown-outcome-hold-sec", "3"])?;
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |config| {
        config.unknown_outcome_hold_sec = parsed.unknown_outcome_hold_sec;
    });
    let configured = spawn_app_with(options).await;
    assert_eq!(
        configured.state.broker.config().unknown_outcome_hold,
        std::time::Duration::from_secs(3)
    );
    configured.stop().await;
    Ok(())
}
