//! Drain and quota refusals on `/metrics` (ADR 0017 addendum): a drain in force shows as
//! `broker_pool_drained{prefix}` until it is resumed, and refused allocations count under
//! `broker_allocate_total{outcome}`, on both stores.

use reqwest::{Method, StatusCode};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

/// The value of the sample `series` (name with labels, as rendered) on `/metrics`, if present.
async fn sample(app: &TestApp, series: &str) -> Option<f64> {
    let text = app
        .client
        .get(format!("{}/metrics", app.url))
        .sent()
        .await
        .text()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

async fn admin_post(app: &TestApp, path: &str) {
    let (status, _, body) = app.admin(Method::POST, path).sent_json().await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
}

async fn drain_shows_on_metrics(backend: Backend) {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|config| {
        config.default_track_quota = Some(1);
    });
    let app = spawn_app_with(options).await;
    app.seed("lab", 3).await;
    assert_eq!(
        sample(&app, "broker_pool_drained{prefix=\"lab\"}").await,
        None
    );

    admin_post(&app, "/v1/admin/pool/drain?prefix=lab").await;
    assert_eq!(
        sample(&app, "broker_pool_drained{prefix=\"lab\"}").await,
        Some(1.0)
    );
    let (status, _, body) = app
        .allocate("stu-1")
        .header("X-Sandbox-Name-Prefix", "lab")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        sample(&app, "broker_allocate_total{outcome=\"maintenance\"}").await,
        Some(1.0)
    );

    admin_post(&app, "/v1/admin/pool/drain").await;
    assert_eq!(
        sample(&app, "broker_pool_drained{prefix=\"*\"}").await,
        Some(1.0)
    );
    admin_post(&app, "/v1/admin/pool/resume").await;
    admin_post(&app, "/v1/admin/pool/resume?prefix=lab").await;
    assert_eq!(
        sample(&app, "broker_pool_drained{prefix=\"*\"}").await,
        None
    );
    assert_eq!(
        sample(&app, "broker_pool_drained{prefix=\"lab\"}").await,
        None
    );

    // One allocation fills the track's quota of 1; the next is refused and counted.
    let track = |caller: &str| {
        app.allocate(caller)
            .header("X-Instruqt-Track-ID", "quota-track")
    };
    let (status, _, body) = track("stu-2").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _, body) = track("stu-3").sent_json().await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        sample(&app, "broker_allocate_total{outcome=\"quota_exceeded\"}").await,
        Some(1.0)
    );
    app.stop().await;
}

/// Embedded store: drains and refusals show on /metrics.
#[tokio::test]
async fn drain_shows_on_metrics_embedded() {
    drain_shows_on_metrics(Backend::Embedded).await;
}

/// DynamoDB Local: drains and refusals show on /metrics.
#[tokio::test]
async fn drain_shows_on_metrics_dynamo() {
    drain_shows_on_metrics(Backend::Dynamo).await;
}
