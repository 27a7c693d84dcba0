//! The live event stream is bounded: a `Last-Event-ID` before all history starts at the first
//! event instead of walking every empty hour since then, at most `SSE_MAX_SUBSCRIBERS` streams
//! are open at once (503 beyond, with `Retry-After`), and a stream ends after
//! `SSE_MAX_LIFETIME_SEC` so the client resumes.

use std::time::Duration;

use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp, ADMIN_TOKEN};

async fn open_stream(app: &TestApp, last_event_id: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .get(format!("{}/v1/admin/events/stream", app.url))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    request.sent().await
}

/// Reads the stream until its text contains `needle` (deadline 60 s); false if it ended first.
async fn read_until(resp: &mut reqwest::Response, needle: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("stream: timed out waiting for {needle}; got {text}"))
            .unwrap_or_else(|e| panic!("stream: {e}"));
        match chunk {
            Some(bytes) => {
                text.push_str(&String::from_utf8_lossy(&bytes));
                if text.contains(needle) {
                    return true;
                }
            }
            None => return false,
        }
    }
}

/// DynamoDB Local: resuming from year 1 replays the history at once, with a handful of queries
/// (not one per empty hour since then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_before_all_history_starts_at_the_first_event() {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(|config| config.run_projector = Some(false));
    let app = spawn_app_with(options).await;
    app.register("ancient", 1).await;
    let requests = || {
        app.state
            .store_requests
            .as_ref()
            .map(|m| m.total())
            .unwrap_or_default()
    };
    let before = requests();
    let mut stream = open_stream(&app, Some("0001-01-01T00:00:00Z")).await;
    assert!(stream.status().is_success(), "{}", stream.status());
    assert!(read_until(&mut stream, "sandbox#ancient-id-0").await);
    let spent = requests() - before;
    assert!(spent < 200, "{spent} store requests to replay one event");
    drop(stream);
    app.stop().await;
}

/// Beyond `SSE_MAX_SUBSCRIBERS` open streams the next one is 503 with the envelope and
/// `Retry-After`; a stream ends by itself after `SSE_MAX_LIFETIME_SEC`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_and_end_after_their_lifetime() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|config| {
        config.sse_max_subscribers = 2;
        config.sse_max_lifetime_sec = 2;
    });
    let app = spawn_app_with(options).await;
    let mut first = open_stream(&app, None).await;
    let second = open_stream(&app, None).await;
    assert!(first.status().is_success() && second.status().is_success());
    let third = open_stream(&app, None).await;
    assert_eq!(third.status().as_u16(), 503);
    assert!(third.headers().contains_key("retry-after"));
    let body: serde_json::Value = third.json().await.unwrap_or_default();
    assert_eq!(body["detail"]["code"], "OVERLOADED", "{body}");

    // The first stream ends by itself once its lifetime is over (no event needed).
    assert!(
        !read_until(&mut first, "never-sent").await,
        "the stream should have ended"
    );
    drop(second);
    app.stop().await;
}
