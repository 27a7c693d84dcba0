//! Per-track credentials over real HTTP (service on port 0, embedded store): a track's token
//! reaches only its own prefixes and its own sandboxes, and its callers can be bound by an HMAC.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

const ALPHA: &str = "alpha-token-0123456789abcdefghijklmnop";
const BETA: &str = "beta-token-0123456789abcdefghijklmnopq";
const GAMMA: &str = "gamma-token-0123456789abcdefghijklmnop";
const GAMMA_SECRET: &str = "gamma-secret-0123456789abcdefghijklmn";

async fn app() -> TestApp {
    let credentials = json!({"tracks": [
        {"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"], "max_concurrent_allocations": 2},
        {"track": "beta", "token": BETA, "name_prefixes": ["beta-", "shared-"], "max_concurrent_allocations": 10},
        {"track": "gamma", "token": GAMMA, "name_prefixes": ["gamma-"], "max_concurrent_allocations": 10,
         "caller_secret": GAMMA_SECRET, "require_caller_signature": true},
    ]})
    .to_string();
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| c.track_credentials_json = Some(credentials.into()));
    let app = spawn_app_with(options).await;
    for prefix in ["alpha", "beta", "gamma"] {
        app.seed(prefix, 4).await;
    }
    app
}

fn as_track(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    caller: &str,
) -> reqwest::RequestBuilder {
    app.client
        .request(method, format!("{}{path}", app.url))
        .bearer_auth(token)
        .header("X-Instruqt-Sandbox-ID", caller)
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = request.sent().await;
    let status = resp.status();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["detail"]["code"].as_str().unwrap_or("")
}

/// A per-track token cannot read, mark or replay another track's sandbox, even naming the
/// same caller; the owning track and the shared token (for compatibility) still can.
#[tokio::test]
async fn per_track_token_cannot_touch_another_tracks_sandbox() {
    let app = app().await;
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "s1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["name"].as_str().unwrap_or("").starts_with("alpha-"));
    let id = body["sandbox_id"].as_str().unwrap_or("").to_string();
    let lease = body["lease_token"].as_str().unwrap_or("").to_string();
    let path = format!("/v1/sandboxes/{id}");
    let mark = format!("{path}/mark-for-deletion");

    let (status, body) = send(as_track(&app, BETA, Method::GET, &path, "s1")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER")
    );
    let (status, body) = send(as_track(&app, BETA, Method::POST, &mark, "s1")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER")
    );
    let (status, body) = send(
        as_track(&app, BETA, Method::POST, "/v1/allocate", "s1")
            .header("X-Sandbox-Name-Prefix", "beta-"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "ALREADY_ALLOCATED"),
        "a replay of another track's claim is refused without naming it"
    );
    assert!(!body.to_string().contains(&id), "{body}");

    let (status, body) =
        send(as_track(&app, ALPHA, Method::GET, &path, "s1").header("X-Lease-Token", &lease)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["track_name"], "alpha");
    let (status, body) = send(
        app.track(Method::GET, &path)
            .header("X-Instruqt-Sandbox-ID", "s1"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "FORBIDDEN"),
        "the shared token stays out of the track's lane"
    );
    let (status, body) =
        send(as_track(&app, ALPHA, Method::POST, &mark, "s1").header("X-Lease-Token", &lease))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

/// A per-track token allocates only inside its prefixes; with several prefixes it must choose.
#[tokio::test]
async fn per_track_token_is_confined_to_its_prefixes() {
    let app = app().await;
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "p1")
            .header("X-Sandbox-Name-Prefix", "beta-"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "PREFIX_NOT_ALLOWED")
    );
    let (status, body) = send(as_track(&app, BETA, Method::POST, "/v1/allocate", "p2")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "NAME_PREFIX_REQUIRED")
    );
    let (status, body) = send(
        as_track(&app, BETA, Method::POST, "/v1/allocate", "p2")
            .header("X-Sandbox-Name-Prefix", "beta-"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["name"].as_str().unwrap_or("").starts_with("beta-"));
    app.stop().await;
}

/// When the credential requires it, a request must carry the track's signature over its time,
/// method, path and caller: a signature made for one student, one path or long ago does not fit.
#[tokio::test]
async fn caller_signature_binds_the_student() {
    let app = app().await;
    // The server's clock, not the wall clock: the window is checked against the app's injected
    // clock, which a slow start-up would otherwise leave seconds behind the test's `now`.
    let now = domain::Clock::now(&app.clock).timestamp();
    let sign = |t: i64, method: &str, path: &str, caller: &str| {
        command_api::credentials::caller_signature_v1(GAMMA_SECRET, t, method, path, caller)
    };
    let (status, body) = send(as_track(&app, GAMMA, Method::POST, "/v1/allocate", "alice")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE")
    );
    let legacy = command_api::credentials::caller_signature(GAMMA_SECRET, "alice");
    let (status, body) = send(
        as_track(&app, GAMMA, Method::POST, "/v1/allocate", "alice")
            .header("X-Caller-Signature", &legacy),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE"),
        "the old form needs ALLOW_LEGACY_CALLER_SIGNATURE"
    );
    let stale = sign(now - 301, "POST", "/v1/allocate", "alice");
    let (status, body) = send(
        as_track(&app, GAMMA, Method::POST, "/v1/allocate", "alice")
            .header("X-Caller-Signature", &stale),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE"),
        "outside the 300 s window"
    );
    let (status, body) = send(
        as_track(&app, GAMMA, Method::POST, "/v1/allocate", "alice").header(
            "X-Caller-Signature",
            sign(now, "POST", "/v1/allocate", "alice"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let lease = body["lease_token"].as_str().unwrap_or("").to_string();
    let path = format!(
        "/v1/sandboxes/{}",
        body["sandbox_id"].as_str().unwrap_or("")
    );
    for wrong in [
        sign(now, "GET", &path, "alice"),
        sign(now, "POST", "/v1/allocate", "alice"),
    ] {
        let (status, body) = send(
            as_track(&app, GAMMA, Method::GET, &path, "mallory")
                .header("X-Caller-Signature", &wrong),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE")
        );
    }
    let (status, _) = send(
        as_track(&app, GAMMA, Method::GET, &path, "alice")
            .header("X-Caller-Signature", sign(now, "GET", &path, "alice"))
            .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

/// A track at its maximum of live allocations is refused new ones, but replays still answer.
#[tokio::test]
async fn track_allocation_cap_is_enforced() {
    let app = app().await;
    let key = |caller: &str| format!("{caller}-key-0123456789abcdefghijklmnopqrstu");
    for caller in ["c1", "c2"] {
        let (status, body) = send(
            as_track(&app, ALPHA, Method::POST, "/v1/allocate", caller)
                .header("Idempotency-Key", key(caller)),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) >= 2)
        .await;
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "c3")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "QUOTA_EXCEEDED")
    );
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "c1")
            .header("Idempotency-Key", key("c1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the replay answers: {body}");
    let (status, body) = send(
        as_track(&app, BETA, Method::POST, "/v1/allocate", "c3")
            .header("X-Sandbox-Name-Prefix", "beta-"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "other tracks are not capped: {body}"
    );
    app.stop().await;
}

/// Once every track has its own credential, the shared token can be switched off.
#[tokio::test]
async fn shared_token_can_be_disabled() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| c.shared_track_token_enabled = false);
    let app = spawn_app_with(options).await;
    let (status, body) = send(
        app.track(Method::GET, "/v1/sandboxes/x")
            .header("X-Instruqt-Sandbox-ID", "s1"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    app.stop().await;
}

/// Credentials load from `TRACK_CREDENTIALS_FILE`; a file with a weak token stops start-up.
#[tokio::test]
async fn credentials_file_is_loaded_and_checked() {
    let dir = std::env::temp_dir().join(format!("broker-creds-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let good = dir.join("good.json");
    let doc = json!({"tracks": [{"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"], "max_concurrent_allocations": 5}]});
    std::fs::write(&good, doc.to_string()).expect("write the credentials file");
    let mut options = AppOptions::new(Backend::Embedded);
    let path = good.clone();
    options.configure = Box::new(move |c| c.track_credentials_file = Some(path));
    let app = spawn_app_with(options).await;
    app.seed("alpha", 1).await;
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "f1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.stop().await;

    let weak = dir.join("weak.json");
    let doc = json!({"tracks": [{"track": "alpha", "token": "short", "name_prefixes": ["alpha-"], "max_concurrent_allocations": 5}]});
    std::fs::write(&weak, doc.to_string()).expect("write the credentials file");
    let mut config = command_api::config::Config::defaults();
    config.api_token = Some(tests::app::TRACK_TOKEN.into());
    config.admin_token = Some(tests::app::ADMIN_TOKEN.into());
    config.store.embedded_path = dir.join("broker.db");
    config.track_credentials_file = Some(weak);
    let started = command_api::startup::build_with(
        &config,
        std::sync::Arc::new(domain::ManualClock::new(chrono::Utc::now())),
        tests::app::test_jobs_config(),
    )
    .await;
    let error = started.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(error.contains("at least 32"), "{error}");
    assert!(
        !error.contains("short"),
        "the error echoes the token: {error}"
    );
}

/// A heartbeat policy in a credentials entry is checked at start: a bad value stops start-up
/// with the track and the field named, and so does a track also listed in `HEARTBEAT_TRACKS`.
#[tokio::test]
async fn heartbeat_policies_in_the_file_are_checked_at_start() {
    let dir = std::env::temp_dir().join(format!("broker-creds-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let start = |heartbeat: Value, heartbeat_tracks: &str| {
        let file = dir.join(format!("{}.json", uuid::Uuid::new_v4()));
        let doc = json!({"tracks": [{"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"],
                                     "max_concurrent_allocations": 5, "heartbeat": heartbeat}]});
        std::fs::write(&file, doc.to_string()).expect("write the credentials file");
        let mut config = command_api::config::Config::defaults();
        config.api_token = Some(tests::app::TRACK_TOKEN.into());
        config.admin_token = Some(tests::app::ADMIN_TOKEN.into());
        config.store.embedded_path = dir.join("broker.db");
        config.track_credentials_file = Some(file);
        config.jobs.heartbeat_tracks = heartbeat_tracks.to_string();
        async move {
            command_api::startup::build_with(
                &config,
                std::sync::Arc::new(domain::ManualClock::new(chrono::Utc::now())),
                tests::app::test_jobs_config(),
            )
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
        }
    };
    for (heartbeat, tracks, wanted) in [
        (json!({"interval_s": 0}), "", "heartbeat.interval_s"),
        (
            json!({"interval_s": 60, "grace_s": 120}),
            "",
            "heartbeat.grace_s",
        ),
        (json!({"grace_s": 1800}), "", "heartbeat.interval_s"),
        (json!({"interval_s": 60}), "alpha=30", "HEARTBEAT_TRACKS"),
    ] {
        let error = start(heartbeat.clone(), tracks).await;
        assert!(error.contains("\"alpha\""), "{heartbeat}: {error}");
        assert!(error.contains(wanted), "{heartbeat}: {error}");
    }
}
