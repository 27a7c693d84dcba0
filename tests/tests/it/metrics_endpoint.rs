//! `/metrics` over real HTTP: scrapes cost the store nothing between two refreshes of the pool
//! gauges (counted by the DynamoDB adapter's own request counter), and a configured
//! `METRICS_TOKEN` is required.

use reqwest::StatusCode;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp, ADMIN_TOKEN, TRACK_TOKEN};

/// DynamoDB requests the app has sent so far.
fn requests(app: &TestApp) -> u64 {
    app.state
        .store_requests
        .as_ref()
        .map(|m| m.total())
        .unwrap_or_else(|| panic!("a DynamoDB app counts its requests"))
}

async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(format!("{}/metrics", app.url)).sent().await;
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap_or_default()
}

/// Within `METRICS_CACHE_MS` any number of scrapes — one after another or all at once — sends
/// DynamoDB no request; once the cache is older (by the app's clock), one scrape refreshes the
/// gauges and the burst after it again costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_cost_no_store_requests() {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(|c| {
        c.metrics_cache_ms = 60_000;
        c.run_projector = Some(false);
        // The low-water and drain watch reads the store on its own schedule, not per scrape.
        c.pool_watch_interval_sec = 3_600;
    });
    let app = spawn_app_with(options).await;
    app.register("scrape", 3).await;

    // A burst of concurrent scrapes refreshes once: the others wait for that refresh.
    let burst = futures::future::join_all((0..20).map(|_| scrape(&app))).await;
    assert!(burst.iter().all(|text| text.contains("broker_pool{")));
    let after_first = requests(&app);
    for _ in 0..50 {
        scrape(&app).await;
    }
    futures::future::join_all((0..20).map(|_| scrape(&app))).await;
    assert_eq!(
        requests(&app),
        after_first,
        "90 scrapes within the cache time sent store requests"
    );

    app.clock.advance(chrono::Duration::seconds(61));
    scrape(&app).await;
    let after_refresh = requests(&app);
    assert!(
        after_refresh > after_first,
        "an expired cache is refreshed by the next scrape"
    );
    futures::future::join_all((0..20).map(|_| scrape(&app))).await;
    assert_eq!(
        requests(&app),
        after_refresh,
        "the refreshed cache is reused"
    );
    app.stop().await;
}

/// With `METRICS_TOKEN` set, `/metrics` answers 401 `UNAUTHORIZED` (with a `WWW-Authenticate`
/// challenge) without it, with a wrong one and with the track or admin token, and 200 with it.
#[tokio::test]
async fn metrics_token_is_required_when_configured() {
    const METRICS_TOKEN: &str = "metrics-token-Zq8v3LxW0pR7tY2nB5mK9cF4hJ6gD1sA";
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| c.metrics_token = Some(METRICS_TOKEN.into()));
    let app = spawn_app_with(options).await;
    let url = format!("{}/metrics", app.url);
    for (what, request) in [
        ("no token", app.client.get(&url)),
        (
            "a wrong token",
            app.client.get(&url).bearer_auth("not-the-metrics-token"),
        ),
        (
            "the track token",
            app.client.get(&url).bearer_auth(TRACK_TOKEN),
        ),
        (
            "the admin token",
            app.client.get(&url).bearer_auth(ADMIN_TOKEN),
        ),
    ] {
        let (status, headers, body) = request.sent_json().await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["detail"]["code"], "UNAUTHORIZED", "{what}: {body}");
        assert!(headers.contains_key("www-authenticate"), "{what}");
    }
    let response = app.client.get(&url).bearer_auth(METRICS_TOKEN).sent().await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap_or_default();
    assert!(text.contains("broker_request_latency_seconds"), "{text}");
    app.stop().await;
}
