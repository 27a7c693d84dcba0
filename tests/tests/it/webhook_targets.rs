//! Webhook targets over real HTTP (embedded store): a name that resolves to a loopback address is
//! refused at delivery (checked on every delivery, so DNS cannot be re-pointed later), a plain
//! http URL or a private address is refused at start-up, redirects are not followed, and neither
//! the delivery state admins read nor a start-up error shows the URL or the secret.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode as AxumStatus};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

const SECRET: &str = "receiver-secret-Kx7pQ2mV9sL4wR8tY3nB6cF1";
/// A path segment standing for the credential a receiver URL often carries.
const PATH_TOKEN: &str = "path-credential-7f3a9c";

/// A receiver on 127.0.0.1 that counts requests and answers each with `answer`.
async fn receiver(
    answer: impl Fn() -> axum::response::Response + Clone + Send + Sync + 'static,
) -> (Arc<AtomicUsize>, u16) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = Router::new().route(
        "/{*rest}",
        post(move || {
            let counted = counted.clone();
            let answer = answer.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                answer()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (hits, port)
}

/// An app with one subscriber at `url`, giving a notification up after two quick attempts.
async fn app_with(url: String, allow_private: bool) -> TestApp {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| {
        c.webhooks_json = Some(
            serde_json::json!({"subscribers": [{"name": "hook", "url": url, "secret": SECRET}]})
                .to_string()
                .into(),
        );
        c.run_webhooks = Some(true);
        c.webhook_allow_http = true;
        c.webhook_allow_private_targets = allow_private;
        c.webhook_max_attempts = 2;
        c.webhook_retry_base_ms = 20;
        c.webhook_poll_ms = 50;
        c.webhook_settle_ms = 2_000;
    });
    spawn_app_with(options).await
}

/// Allocates one sandbox (an `allocation` notification) and waits, at most 60 s, until the
/// subscriber gave it up; returns the deliveries document and its raw text.
async fn given_up(app: &TestApp) -> (Value, String) {
    app.seed("lab", 1).await;
    app.clock.advance(chrono::Duration::seconds(1));
    let (status, _, body) = app.allocate("stu-1").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.clock.advance(chrono::Duration::seconds(3));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = app
            .admin(Method::GET, "/v1/admin/webhooks/deliveries")
            .sent()
            .await;
        let text = response.text().await.unwrap_or_default();
        let document: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if document["subscribers"][0]["state"]["given_up"].as_u64() >= Some(1) {
            return (document, text);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notification was never given up: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A subscriber whose host name resolves to a loopback address is refused at every delivery
/// attempt (the receiver there never hears a thing); the failure admins read says why without
/// the URL's path, and the target they see is scheme, host and port only.
#[tokio::test]
async fn names_resolving_to_private_addresses_are_refused_at_delivery() {
    let (hits, port) = receiver(|| AxumStatus::OK.into_response()).await;
    let app = app_with(format!("http://localhost:{port}/hook/{PATH_TOKEN}"), false).await;
    let (document, text) = given_up(&app).await;
    let subscriber = &document["subscribers"][0];
    let error = subscriber["state"]["recent_failures"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("refused") && error.contains("WEBHOOK_ALLOW_PRIVATE_TARGETS"),
        "{error}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the private receiver was reached"
    );
    assert_eq!(subscriber["target"], format!("http://localhost:{port}"));
    for leak in [PATH_TOKEN, "/hook", SECRET] {
        assert!(!text.contains(leak), "the deliveries show {leak:?}: {text}");
    }
    app.stop().await;
}

/// A receiver that answers with a redirect is not followed to where it points: the target
/// there never hears a thing, and the failure reads as the redirect status.
#[tokio::test]
async fn redirects_are_not_followed() {
    let (elsewhere, elsewhere_port) = receiver(|| AxumStatus::OK.into_response()).await;
    let location = format!("http://127.0.0.1:{elsewhere_port}/stolen");
    let (hits, port) = receiver(move || {
        (
            AxumStatus::TEMPORARY_REDIRECT,
            [(header::LOCATION, location.clone())],
        )
            .into_response()
    })
    .await;
    let app = app_with(format!("http://127.0.0.1:{port}/hook/{PATH_TOKEN}"), true).await;
    let (document, text) = given_up(&app).await;
    let error = document["subscribers"][0]["state"]["recent_failures"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("307") && error.contains("not followed"),
        "{error}"
    );
    assert!(
        hits.load(Ordering::SeqCst) >= 1,
        "the first receiver was asked"
    );
    assert_eq!(
        elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    assert!(!text.contains(PATH_TOKEN), "{text}");
    app.stop().await;
}

/// Plain http (without `WEBHOOK_ALLOW_HTTP`) and addresses that are private, loopback or
/// link-local (without `WEBHOOK_ALLOW_PRIVATE_TARGETS`, the cloud metadata address included)
/// stop start-up; the error names the subscriber and the setting, never the URL or the secret.
#[tokio::test]
async fn insecure_targets_are_refused_at_start() {
    for (url, allow_http, setting) in [
        ("http://hooks.example.com/x", false, "WEBHOOK_ALLOW_HTTP"),
        (
            "https://169.254.169.254/latest",
            false,
            "WEBHOOK_ALLOW_PRIVATE_TARGETS",
        ),
        (
            "http://10.0.0.8:9000/x",
            true,
            "WEBHOOK_ALLOW_PRIVATE_TARGETS",
        ),
        (
            "https://[fd00::1]/x",
            false,
            "WEBHOOK_ALLOW_PRIVATE_TARGETS",
        ),
    ] {
        let mut config = command_api::config::Config::defaults();
        config.api_token = Some(tests::app::TRACK_TOKEN.into());
        config.admin_token = Some(tests::app::ADMIN_TOKEN.into());
        config.store.embedded_path = std::env::temp_dir()
            .join(format!("broker-hooks-{}", uuid::Uuid::new_v4()))
            .join("broker.db");
        config.seed_demo_pool = false;
        config.run_jobs = Some(false);
        config.webhook_allow_http = allow_http;
        let full = format!("{url}/{PATH_TOKEN}");
        config.webhooks_json = Some(
            serde_json::json!({"subscribers": [{"name": "hook", "url": full, "secret": SECRET}]})
                .to_string()
                .into(),
        );
        let refused = command_api::startup::build_with(
            &config,
            Arc::new(domain::ManualClock::new(chrono::Utc::now())),
            tests::app::test_jobs_config(),
        )
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_else(|| panic!("{url} was accepted"));
        assert!(
            refused.contains("hook") && refused.contains(setting),
            "{url}: {refused}"
        );
        for leak in [PATH_TOKEN, SECRET, url] {
            assert!(
                !refused.contains(leak),
                "{url}: the error shows {leak:?}: {refused}"
            );
        }
    }
}
