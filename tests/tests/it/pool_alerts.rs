//! The pool by name prefix and its low-water alerts, through the HTTP API on both stores: the
//! stats break down per prefix group from projected counters, groups below `POOL_LOW_WATER` are
//! reported and exported as a gauge, and a replay of the events reproduces the counters.

use std::sync::Arc;
use std::time::Duration;

use domain::PoolView;
use projector::rebuild::{verify, RebuildOptions, RebuildProgress};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};

async fn app_with_low_water(backend: Backend, low_water: &'static str) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.pool_low_water = low_water
            .parse()
            .unwrap_or_else(|e| panic!("POOL_LOW_WATER: {e}"));
    });
    spawn_app_with(options).await
}

async fn admin_stats(app: &TestApp) -> Value {
    let resp = app
        .admin(Method::GET, "/v1/admin/stats")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `/v1/admin/stats` (bounded, 60 s) until `done` holds; returns that body.
async fn stats_when(app: &TestApp, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = admin_stats(app).await;
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stats never matched: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn allocate_from(app: &TestApp, caller: &str, prefix: &str) -> Value {
    let resp = app
        .allocate(caller)
        .header("X-Sandbox-Name-Prefix", prefix)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn pool_breaks_down_by_prefix(backend: Backend) {
    let app = app_with_low_water(backend, "aws-lab=3,default=1").await;
    app.seed("lab", 5).await;
    app.seed("aws-lab", 3).await;
    let alloc = allocate_from(&app, "stu-1", "aws-lab").await;
    assert!(alloc["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("aws-lab-")));

    // The totals and the groups are separate items read one after the other: wait until both
    // show the allocation, then they must agree field by field.
    let stats = stats_when(&app, |s| {
        s["by_prefix"]["aws-lab"]["allocated"] == 1 && s["allocated"] == 1
    })
    .await;
    // Every field of the totals is still there, and the groups add up to them.
    for field in [
        "total",
        "available",
        "allocated",
        "pending_deletion",
        "stale",
        "deletion_failed",
        "deleted",
    ] {
        let sum: i64 = stats["by_prefix"]
            .as_object()
            .map(|groups| groups.values().filter_map(|g| g[field].as_i64()).sum())
            .unwrap_or_default();
        assert_eq!(Some(sum), stats[field].as_i64(), "{field}: {stats}");
    }
    assert_eq!(stats["by_prefix"]["lab"]["available"], 5, "{stats}");
    assert_eq!(stats["by_prefix"]["aws-lab"]["available"], 2, "{stats}");
    // aws-lab has 2 < 3; lab has 5 >= the default of 1.
    assert_eq!(
        stats["low_water"],
        serde_json::json!([{"prefix": "aws-lab", "available": 2, "threshold": 3}]),
        "{stats}"
    );

    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("broker_pool_low_water{prefix=\"aws-lab\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("broker_pool_prefix{prefix=\"lab\",status=\"available\"} 5"),
        "{metrics}"
    );

    // The owner gives the sandbox back: the group moves to pending_deletion, still low.
    let id = alloc["sandbox_id"].as_str().unwrap_or_default();
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "stu-1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let stats = stats_when(&app, |s| s["by_prefix"]["aws-lab"]["pending_deletion"] == 1).await;
    assert_eq!(stats["by_prefix"]["aws-lab"]["allocated"], 0, "{stats}");

    // A replay of the events reproduces the live per-prefix counters exactly.
    let live: Arc<dyn PoolView> = app.state.broker.view().clone();
    let scratch = Arc::new(EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("{e}")));
    let report = verify(
        app.state.broker.events().clone(),
        live.clone(),
        scratch.clone(),
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("verify: {e}"));
    assert!(report.is_clean(), "{:?}", report.differences);
    assert_eq!(
        scratch.stats_by_prefix().await.ok(),
        live.stats_by_prefix().await.ok()
    );
    app.stop().await;
}

/// Embedded store: stats by prefix, low-water report and gauge, verify covers the counters.
#[tokio::test]
async fn pool_breaks_down_by_prefix_embedded() {
    pool_breaks_down_by_prefix(Backend::Embedded).await;
}

/// DynamoDB Local: stats by prefix, low-water report and gauge, verify covers the counters.
#[tokio::test]
async fn pool_breaks_down_by_prefix_dynamo() {
    pool_breaks_down_by_prefix(Backend::Dynamo).await;
}

/// A POOL_LOW_WATER value that is not `prefix=count,…` stops the service at start-up.
#[test]
fn bad_low_water_is_refused() {
    let parsed: Result<command_api::config::Config, _> =
        runtime::try_parse_settings_from(["command-api", "--pool-low-water", "lab=ten"]);
    assert!(parsed.is_err());
}
