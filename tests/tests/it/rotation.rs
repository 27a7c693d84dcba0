//! Rotation with overlap over real HTTP, on both stores (docs/security.md, "Rotating secrets"):
//! a lab that started with a track's old token and caller secret still cleans up after the
//! service restarts with new ones, until the overlap ends; the old values are counted while
//! used and refused afterwards; the admin token rotates on its own.

use chrono::{Duration, SubsecRound};
use command_api::credentials::caller_signature_v1;
use domain::Clock;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp, ADMIN_TOKEN};

const OLD_TOKEN: &str = "rot-old-token-0123456789abcdefghijklmn";
const NEW_TOKEN: &str = "rot-new-token-0123456789abcdefghijklmn";
const OLD_SECRET: &str = "rot-old-secret-0123456789abcdefghijklm";
const NEW_SECRET: &str = "rot-new-secret-0123456789abcdefghijklm";
const NEW_ADMIN: &str = "rot-new-admin-0123456789abcdefghijklmn";

both_stores!(panics: a_lab_started_before_a_rotation_cleans_up_during_the_overlap);

/// The store both services of a test share: one file, or one table prefix.
fn same_store(backend: Backend) -> impl Fn(&mut command_api::config::Config) + Clone {
    let path = std::env::temp_dir()
        .join(format!("broker-rotation-{}", uuid::Uuid::new_v4()))
        .join("broker.db");
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    move |c| match backend {
        Backend::Embedded => c.store.embedded_path = path.clone(),
        Backend::Dynamo => c.store.table_prefix = prefix.clone(),
    }
}

async fn start(
    backend: Backend,
    store: impl Fn(&mut command_api::config::Config) + Send + 'static,
    credentials: Value,
    admin: Option<(&'static str, String)>,
) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |c| {
        store(c);
        c.track_credentials_json = Some(credentials.to_string().into());
        if let Some((new_admin, until)) = admin {
            c.admin_token = Some(new_admin.into());
            c.admin_token_previous = Some(ADMIN_TOKEN.into());
            c.admin_token_previous_until = Some(until);
        }
    });
    spawn_app_with(options).await
}

/// A signed track request at the app's time.
fn signed(
    app: &TestApp,
    token: &str,
    secret: &str,
    method: Method,
    path: &str,
    caller: &str,
) -> reqwest::RequestBuilder {
    let t = app.clock.now().timestamp();
    app.client
        .request(method.clone(), format!("{}{path}", app.url))
        .bearer_auth(token)
        .header("X-Instruqt-Sandbox-ID", caller)
        .header(
            "X-Caller-Signature",
            caller_signature_v1(secret, t, method.as_str(), path, caller),
        )
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let (status, _, body) = request.sent_json().await;
    (status, body)
}

/// `broker_previous_secret_used_total{secret="<label>"}` as /metrics shows it.
async fn previous_uses(app: &TestApp, label: &str) -> u64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("metrics: {e}"))
        .text()
        .await
        .unwrap_or_default();
    let series = format!("broker_previous_secret_used_total{{secret=\"{label}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A student's lab allocates with the track's old token and caller secret. The service restarts
/// with new ones and the old ones as previous values for 48 hours: the running lab still reads
/// and releases its sandbox with what it holds (each use counted), a new lab uses the new
/// values, and the old admin token still works beside the new one. Once the overlap has ended,
/// the old token, the old caller secret and the old admin token are refused (401, 403, 401)
/// while the new ones keep working.
async fn a_lab_started_before_a_rotation_cleans_up_during_the_overlap(backend: Backend) {
    let store = same_store(backend);
    let before = json!({"tracks": [{"track": "rot", "token": OLD_TOKEN, "name_prefixes": ["rot-"],
        "max_concurrent_allocations": 10, "caller_secret": OLD_SECRET,
        "require_caller_signature": true}]});
    let app = start(backend, store.clone(), before, None).await;
    app.seed("rot", 4).await;
    let key = format!("lab-one-{}", uuid::Uuid::new_v4().simple());
    let (status, body) = send(
        signed(
            &app,
            OLD_TOKEN,
            OLD_SECRET,
            Method::POST,
            "/v1/allocate",
            "stu-1",
        )
        .header("Idempotency-Key", &key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["sandbox_id"].as_str().unwrap_or("").to_string();
    let lease = body["lease_token"].as_str().unwrap_or("").to_string();
    let started_at = app.clock.now();
    app.stop().await;

    let until = (started_at + Duration::hours(48)).trunc_subsecs(0);
    let after = json!({"tracks": [{"track": "rot", "token": NEW_TOKEN, "name_prefixes": ["rot-"],
        "max_concurrent_allocations": 10, "caller_secret": NEW_SECRET,
        "require_caller_signature": true,
        "previous_token": OLD_TOKEN, "previous_token_until": until.to_rfc3339(),
        "previous_caller_secret": OLD_SECRET, "previous_caller_secret_until": until.to_rfc3339()}]});
    let app = start(
        backend,
        store.clone(),
        after,
        Some((NEW_ADMIN, until.to_rfc3339())),
    )
    .await;
    app.clock.set(started_at + Duration::hours(1));
    app.wait_until(|s| s.total() == 4).await;

    // The running lab, with everything it started with.
    let get = format!("/v1/sandboxes/{id}");
    let (status, body) = send(
        signed(&app, OLD_TOKEN, OLD_SECRET, Method::GET, &get, "stu-1")
            .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mark = format!("/v1/sandboxes/{id}/mark-for-deletion");
    let (status, body) = send(
        signed(&app, OLD_TOKEN, OLD_SECRET, Method::POST, &mark, "stu-1")
            .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending_deletion", "{body}");
    assert!(previous_uses(&app, "track_token:rot").await >= 2);
    assert!(previous_uses(&app, "caller_secret:rot").await >= 2);

    // A new lab, with the new values; both admin tokens during the overlap.
    let new_key = format!("lab-two-{}", uuid::Uuid::new_v4().simple());
    let (status, body) = send(
        signed(
            &app,
            NEW_TOKEN,
            NEW_SECRET,
            Method::POST,
            "/v1/allocate",
            "stu-2",
        )
        .header("Idempotency-Key", &new_key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for admin in [ADMIN_TOKEN, NEW_ADMIN] {
        let resp = app
            .client
            .get(format!("{}/v1/admin/stats", app.url))
            .bearer_auth(admin)
            .sent()
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(previous_uses(&app, "admin_token").await, 1);

    // The overlap ends.
    app.clock.set(until);
    let (status, body) = send(signed(
        &app,
        OLD_TOKEN,
        OLD_SECRET,
        Method::POST,
        "/v1/allocate",
        "stu-3",
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = send(
        signed(
            &app,
            NEW_TOKEN,
            OLD_SECRET,
            Method::POST,
            "/v1/allocate",
            "stu-3",
        )
        .header(
            "Idempotency-Key",
            format!("lab-three-{}", uuid::Uuid::new_v4().simple()),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["detail"]["code"], "INVALID_CALLER_SIGNATURE", "{body}");
    let resp = app
        .client
        .get(format!("{}/v1/admin/stats", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .sent()
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (status, body) = send(
        signed(
            &app,
            NEW_TOKEN,
            NEW_SECRET,
            Method::GET,
            &format!("/v1/sandboxes/{}", id),
            "stu-1",
        )
        .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}
