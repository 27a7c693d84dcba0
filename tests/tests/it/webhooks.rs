//! Signed webhooks through the HTTP API on both stores: a local receiver that refuses the first
//! deliveries still gets every notification (same id on each retry, valid signatures), only the
//! subscribers whose prefixes match hear about a sandbox, `expiring_soon` and `pool_low` go out,
//! and admins see the delivery state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use axum::Router;
use command_api::webhooks::signature;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};

const SECRET: &str = "receiver-secret-0123456789abcdefghij";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Debug, Default)]
struct Receiver {
    fail_first: usize,
    seen: Mutex<Vec<Received>>,
}

/// An HTTP receiver on 127.0.0.1 answering 500 to its first `fail_first` requests.
async fn start_receiver(fail_first: usize) -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver {
        fail_first,
        ..Receiver::default()
    });
    let shared = Arc::clone(&receiver);
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let shared = Arc::clone(&shared);
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let mut seen = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
                let answered = if seen.len() < shared.fail_first {
                    AxumStatus::INTERNAL_SERVER_ERROR
                } else {
                    AxumStatus::OK
                };
                seen.push(Received {
                    id: header("x-broker-webhook-id"),
                    timestamp: header("x-broker-webhook-timestamp"),
                    signature: header("x-broker-webhook-signature"),
                    body: body.to_vec(),
                    answered: answered.as_u16(),
                });
                answered
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
    (receiver, format!("http://{addr}/hook"))
}

fn delivered(receiver: &Receiver) -> Vec<Value> {
    receiver
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|r| r.answered == 200)
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect()
}

/// Waits (bounded, 60 s) until `receiver` accepted a notification matching `wanted`.
async fn wait_for(receiver: &Receiver, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = delivered(receiver).into_iter().find(|b| wanted(b)) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} delivered; seen: {:?}",
            delivered(receiver)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn app_with_subscribers(backend: Backend, labs_url: String, aws_url: String) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.webhooks_json = Some(
            serde_json::json!({"subscribers": [
                {"name": "labs", "url": labs_url, "secret": SECRET, "prefixes": ["lab"],
                 "kinds": ["allocation", "release", "expiring_soon", "pool_low"]},
                {"name": "aws", "url": aws_url, "secret": SECRET, "prefixes": ["aws-lab"]},
            ]})
            .to_string()
            .into(),
        );
        config.run_webhooks = Some(true);
        // The receivers listen on plain http on 127.0.0.1, which production refuses.
        config.webhook_allow_http = true;
        config.webhook_allow_private_targets = true;
        config.webhook_retry_base_ms = 20;
        config.webhook_poll_ms = 50;
        // The default settle time: events are delivered once the (manual) clock is 2 s past
        // them, after the time index has surely caught up.
        config.webhook_settle_ms = 2_000;
        config.expiry_warning_minutes = 30;
        config.lab_duration_hours = 48;
        // `default` covers only groups that exist: the empty pool at start-up is not "low".
        config.pool_low_water = "default=3".parse().unwrap_or_default();
    });
    spawn_app_with(options).await
}

async fn webhooks_are_signed_retried_and_filtered(backend: Backend) {
    let (labs, labs_url) = start_receiver(2).await;
    let (aws, aws_url) = start_receiver(0).await;
    let app = app_with_subscribers(backend, labs_url, aws_url).await;
    app.seed("lab", 4).await;
    app.clock.advance(chrono::Duration::seconds(1));

    let mut sandboxes = Vec::new();
    for caller in ["stu-1", "stu-2"] {
        let resp = app
            .allocate(caller)
            .header("X-Sandbox-Name-Prefix", "lab")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: Value = resp.json().await.unwrap_or_default();
        sandboxes.push(body["sandbox_id"].as_str().unwrap_or_default().to_string());
    }
    app.clock.advance(chrono::Duration::seconds(3));
    for id in &sandboxes {
        let found = wait_for(&labs, "allocation", |b| {
            b["kind"] == "allocation" && b["sandbox"]["sandbox_id"] == id.as_str()
        })
        .await;
        assert_eq!(found["event"]["event_type"], "SandboxAllocated");
        assert_eq!(found["sandbox"]["prefix"], "lab");
    }
    // Two allocations leave 2 available in `lab`, below the threshold of 3. (The group may
    // already have been low while the seed was being projected — one notification per drop
    // below the threshold, so that one counts.)
    let low = wait_for(&labs, "pool_low", |b| {
        b["kind"] == "pool_low" && b["pool"]["prefix"] == "lab"
    })
    .await;
    assert!(low["pool"]["available"].as_i64().unwrap_or(99) < 3, "{low}");
    assert_eq!(low["pool"]["threshold"], 3);

    // The owner gives one back: a release notification.
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{}/mark-for-deletion", sandboxes[0]),
        )
        .header("X-Instruqt-Sandbox-ID", "stu-1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    app.clock.advance(chrono::Duration::seconds(3));
    wait_for(&labs, "release", |b| {
        b["kind"] == "release" && b["sandbox"]["sandbox_id"] == sandboxes[0].as_str()
    })
    .await;

    // 20 minutes before the end of the other lab window: expiring_soon.
    app.clock
        .advance(chrono::Duration::hours(48) - chrono::Duration::minutes(20));
    let warned = wait_for(&labs, "expiring_soon", |b| b["kind"] == "expiring_soon").await;
    assert_eq!(warned["sandbox"]["sandbox_id"], sandboxes[1].as_str());
    assert_eq!(warned["owner"], "stu-2");

    // Every request was signed over "{timestamp}.{body}"; the refused ones were retried under
    // the same id.
    let seen = labs.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for r in &seen {
        let timestamp: i64 = r.timestamp.parse().unwrap_or_default();
        assert_eq!(r.signature, signature(SECRET, timestamp, &r.body), "{r:?}");
    }
    assert_eq!(seen[0].answered, 500);
    assert_eq!(seen[1].answered, 500);
    assert_eq!(seen[2].answered, 200);
    assert!(seen[0].id == seen[1].id && seen[1].id == seen[2].id);
    // The other subscriber only hears about aws-lab sandboxes: nothing here.
    assert!(
        aws.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty(),
        "a subscriber heard about another prefix"
    );

    // Admins see the delivery state (saved right after each delivery: poll until it shows the
    // five accepted ones — 2 allocations, pool_low, release, expiring_soon).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let resp = app
            .admin(Method::GET, "/v1/admin/webhooks/deliveries")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap_or_default();
        if body["subscribers"][0]["state"]["delivered"]
            .as_u64()
            .unwrap_or_default()
            >= 5
        {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state never showed the deliveries: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let labs_state = &body["subscribers"][0];
    assert_eq!(labs_state["name"], "labs");
    assert!(labs_state.get("secret").is_none());
    assert_eq!(labs_state["state"]["failed_attempts"], 2, "{body}");
    assert_eq!(labs_state["state"]["given_up"], 0, "{body}");
    app.stop().await;
}

/// Embedded store: signed, retried, prefix-filtered webhooks and their delivery state.
#[tokio::test]
async fn webhooks_are_signed_retried_and_filtered_embedded() {
    webhooks_are_signed_retried_and_filtered(Backend::Embedded).await;
}

/// DynamoDB Local: signed, retried, prefix-filtered webhooks and their delivery state.
#[tokio::test]
async fn webhooks_are_signed_retried_and_filtered_dynamo() {
    webhooks_are_signed_retried_and_filtered(Backend::Dynamo).await;
}
