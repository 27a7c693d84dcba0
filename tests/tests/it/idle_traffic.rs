//! An idle API instance sends DynamoDB nothing: the live-feed tail reads the store only while an
//! SSE subscriber listens, and stops again when the last one leaves. Counted by the adapter's own
//! request counter (`broker_store_requests_total`).

use std::time::Duration;

use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp, ADMIN_TOKEN};

fn requests(app: &TestApp) -> u64 {
    app.state
        .store_requests
        .as_ref()
        .map(|m| m.total())
        .unwrap_or_else(|| panic!("a DynamoDB app counts its requests"))
}

/// Idle: no requests over many tail intervals; one subscriber: the tail reads; unsubscribed: idle again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instance_sends_no_requests_and_the_tail_runs_only_for_subscribers() {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(|config| config.run_projector = Some(false));
    let app = spawn_app_with(options).await;
    let window = command_api::live_feed::TAIL_INTERVAL * 8;

    let before = requests(&app);
    tokio::time::sleep(window).await;
    assert_eq!(requests(&app), before, "an idle instance sent requests");

    let stream = app
        .client
        .get(format!("{}/v1/admin/events/stream", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .sent()
        .await;
    assert!(stream.status().is_success());
    let subscribed = requests(&app);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while requests(&app) == subscribed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tail never read the feed for a subscriber"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same counts are on /metrics, by operation and table/index.
    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .sent()
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("broker_store_requests_total{op=\"Query\",target=\"by-time\"}")),
        "no by-time query count in /metrics"
    );

    drop(stream);
    // The server notices the closed connection when it next writes (an event or a heartbeat);
    // wait for the receiver to go away, then for one quiet window.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut wake = 0;
    loop {
        let start = requests(&app);
        tokio::time::sleep(window).await;
        if requests(&app) == start {
            break;
        }
        // Record an event so the server writes to the stream and notices it is gone.
        wake += 1;
        app.register(&format!("wake{wake}"), 1).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tail kept reading after the subscriber left"
        );
    }
    app.stop().await;
}
