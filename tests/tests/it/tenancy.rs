//! Tenancy over real HTTP on both stores (issue 24, docs/threat-model.md): a sandbox answers only
//! to whoever holds its lease token, a caller id alone proves nothing, and one caller cannot
//! take more than its fair share of the pool.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

const ALPHA: &str = "alpha-token-0123456789abcdefghijklmnop";
const BETA: &str = "beta-token-0123456789abcdefghijklmnopq";

/// A 128-bit key as the clients generate it (32 hex characters).
fn strong_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

async fn app_with(
    backend: Backend,
    configure: impl FnOnce(&mut command_api::config::Config) + Send + 'static,
) -> TestApp {
    let credentials = json!({"tracks": [
        {"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"], "max_concurrent_allocations": 20},
        {"track": "beta", "token": BETA, "name_prefixes": ["beta-"], "max_concurrent_allocations": 20},
    ]})
    .to_string();
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |c| {
        c.track_credentials_json = Some(credentials.into());
        configure(c);
    });
    let app = spawn_app_with(options).await;
    for prefix in ["alpha", "beta", "shared"] {
        app.seed(prefix, 4).await;
    }
    app
}

async fn app(backend: Backend) -> TestApp {
    app_with(backend, |_| {}).await
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
    let (status, _, body) = request.sent_json().await;
    (status, body)
}

fn code(body: &Value) -> &str {
    body["detail"]["code"].as_str().unwrap_or("")
}

fn text(body: &Value, field: &str) -> String {
    body[field].as_str().unwrap_or("").to_string()
}

/// Allocates for `caller` with `token` and a fresh strong key: (sandbox id, lease token, key).
async fn allocate(app: &TestApp, token: &str, caller: &str) -> (String, String, String) {
    let key = strong_key();
    let (status, body) = send(
        as_track(app, token, Method::POST, "/v1/allocate", caller).header("Idempotency-Key", &key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let lease = text(&body, "lease_token");
    assert!(
        lease.starts_with("lt1."),
        "a 201 carries the lease token: {body}"
    );
    (text(&body, "sandbox_id"), lease, key)
}

async fn status_of(app: &TestApp, sandbox_id: &str) -> String {
    let (_, _, body) = app
        .get_json(&format!("/v1/admin/sandboxes/{sandbox_id}/history"))
        .await;
    let last = body["events"]
        .as_array()
        .and_then(|e| e.last())
        .map(|e| e["event_type"].as_str().unwrap_or("").to_string());
    last.unwrap_or_default()
}

async fn lease_token_guards_per_sandbox_verbs(backend: Backend) {
    let app = app(backend).await;
    let (id, lease, _) = allocate(&app, ALPHA, "alice").await;
    let (_, other_lease, _) = allocate(&app, ALPHA, "bob").await;
    let get = format!("/v1/sandboxes/{id}");
    let mark = format!("{get}/mark-for-deletion");
    let extend = format!("{get}/extend");

    // Another student of the track who knows alice's id (and even holds a token of their own).
    for (method, path) in [
        (Method::GET, get.as_str()),
        (Method::POST, mark.as_str()),
        (Method::POST, extend.as_str()),
    ] {
        let request = |r: reqwest::RequestBuilder| r.json(&json!({"hours": 1}));
        let (status, body) = send(request(as_track(
            &app,
            ALPHA,
            method.clone(),
            path,
            "alice",
        )))
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::FORBIDDEN, "LEASE_TOKEN_REQUIRED"),
            "{method} {path}"
        );
        for wrong in [other_lease.as_str(), "lt1.k1.AAAA", "garbage"] {
            let (status, body) = send(request(
                as_track(&app, ALPHA, method.clone(), path, "alice").header("X-Lease-Token", wrong),
            ))
            .await;
            assert_eq!(
                (status, code(&body)),
                (StatusCode::FORBIDDEN, "LEASE_TOKEN_INVALID"),
                "{method} {path} with {wrong}"
            );
        }
    }
    assert_eq!(
        status_of(&app, &id).await,
        "SandboxAllocated",
        "the victim's sandbox is untouched"
    );

    // The holder of the token reads, extends and ends the allocation.
    let (status, body) =
        send(as_track(&app, ALPHA, Method::GET, &get, "alice").header("X-Lease-Token", &lease))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, &extend, "alice")
            .header("X-Lease-Token", &lease)
            .json(&json!({"hours": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        send(as_track(&app, ALPHA, Method::POST, &mark, "alice").header("X-Lease-Token", &lease))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

/// Embedded: every per-sandbox verb needs the allocation's lease token under a per-track
/// credential; a missing or foreign token is refused and the victim's sandbox is untouched.
#[tokio::test]
async fn lease_token_guards_per_sandbox_verbs_embedded() {
    lease_token_guards_per_sandbox_verbs(Backend::Embedded).await;
}

/// DynamoDB: as [`lease_token_guards_per_sandbox_verbs_embedded`].
#[tokio::test]
async fn lease_token_guards_per_sandbox_verbs_dynamo() {
    lease_token_guards_per_sandbox_verbs(Backend::Dynamo).await;
}

async fn replay_needs_the_key_or_the_token(backend: Backend) {
    let app = app(backend).await;
    // With a key: the key proves the replay, and the token comes back (a lost 201 is no lock-out).
    let (id, lease, key) = allocate(&app, ALPHA, "carol").await;
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "carol")
            .header("Idempotency-Key", &key),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text(&body, "sandbox_id"), id);
    assert_eq!(text(&body, "lease_token"), lease);

    // Without a key: the caller-id default never proves anything.
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "dave")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let dave_id = text(&body, "sandbox_id");
    let dave_lease = text(&body, "lease_token");
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "dave")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "ALREADY_ALLOCATED")
    );
    assert!(
        !body.to_string().contains(&dave_id),
        "the refusal names the sandbox: {body}"
    );
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "dave").header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "ALREADY_ALLOCATED"),
        "another allocation's token proves nothing"
    );
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "dave")
            .header("X-Lease-Token", &dave_lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text(&body, "sandbox_id"), dave_id);
    assert_eq!(text(&body, "lease_token"), dave_lease);
    app.stop().await;
}

/// Embedded: a replay returns the details and the token only with the original key or the
/// token; a bare caller id gets 409 `ALREADY_ALLOCATED` that does not name the sandbox.
#[tokio::test]
async fn replay_needs_the_key_or_the_token_embedded() {
    replay_needs_the_key_or_the_token(Backend::Embedded).await;
}

/// DynamoDB: as [`replay_needs_the_key_or_the_token_embedded`].
#[tokio::test]
async fn replay_needs_the_key_or_the_token_dynamo() {
    replay_needs_the_key_or_the_token(Backend::Dynamo).await;
}

/// Where the capability applies, a short key is refused with a message saying how to make one,
/// and only the key's hash reaches the history; the shared token keeps its legacy contract.
#[tokio::test]
async fn keys_are_credentials_under_the_capability() {
    let app = app(Backend::Embedded).await;
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "erin")
            .header("Idempotency-Key", "retry-1"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    assert!(body.to_string().contains("openssl rand"), "{body}");

    let (id, _, key) = allocate(&app, ALPHA, "erin").await;
    let (_, _, history) = app
        .get_json(&format!("/v1/admin/sandboxes/{id}/history"))
        .await;
    let history = history.to_string();
    assert!(!history.contains(&key), "the raw key is stored: {history}");
    assert!(history.contains("sha256:"), "{history}");

    // The shared token: short keys and keyless replays as before.
    let (status, body) = send(
        app.allocate("frank")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("Idempotency-Key", "retry-1"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let shared_id = text(&body, "sandbox_id");
    let (status, body) = send(
        app.allocate("frank")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("Idempotency-Key", "retry-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text(&body, "sandbox_id"), shared_id);
    let (status, _) = send(
        app.track(Method::GET, &format!("/v1/sandboxes/{shared_id}"))
            .header("X-Instruqt-Sandbox-ID", "frank"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the shared token needs no lease token"
    );
    app.stop().await;
}

/// With `REQUIRE_LEASE_TOKEN=true` the shared token needs the lease token too.
#[tokio::test]
async fn require_lease_token_applies_to_the_shared_token() {
    let app = app_with(Backend::Embedded, |c| c.require_lease_token = true).await;
    let (status, body) = send(
        app.allocate("gina")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("Idempotency-Key", strong_key()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = text(&body, "sandbox_id");
    let lease = text(&body, "lease_token");
    let path = format!("/v1/sandboxes/{id}");
    let (status, body) = send(
        app.track(Method::GET, &path)
            .header("X-Instruqt-Sandbox-ID", "gina"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "LEASE_TOKEN_REQUIRED")
    );
    let (status, _) = send(
        app.track(Method::GET, &path)
            .header("X-Instruqt-Sandbox-ID", "gina")
            .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

/// The lease token is derived, never recorded: it appears in no event of the history and in no
/// record of the audit feed.
#[tokio::test]
async fn lease_token_never_reaches_the_history_or_the_feed() {
    let app = app(Backend::Embedded).await;
    let (id, lease, _) = allocate(&app, ALPHA, "hank").await;
    let (status, body) = send(
        as_track(
            &app,
            ALPHA,
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
            "hank",
        )
        .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let secret_part = lease.rsplit('.').next().unwrap_or_default().to_string();
    assert!(secret_part.len() >= 22);
    let (_, _, history) = app
        .get_json(&format!("/v1/admin/sandboxes/{id}/history"))
        .await;
    assert!(history["events"].as_array().is_some_and(|e| e.len() >= 3));
    assert!(!history.to_string().contains(&secret_part));
    let (status, _, feed) = app.get_json("/v1/admin/events?limit=500").await;
    assert_eq!(status, StatusCode::OK, "{feed}");
    assert!(!feed.to_string().contains(&secret_part), "{feed}");
    app.stop().await;
}

/// Start-up refuses a weak lease key, and the dev key on a non-loopback address.
#[test]
fn weak_or_dev_lease_keys_are_refused_off_loopback() {
    let mut config = command_api::config::Config::defaults();
    assert!(config.lease_keys().is_ok(), "the dev key on loopback");
    config.bind_addr = "0.0.0.0:8080".parse().expect("a socket address");
    assert!(
        config.lease_keys().is_err(),
        "the dev key on all interfaces"
    );
    config.lease_token_key = Some("short".into());
    assert!(config.lease_keys().is_err());
    config.lease_token_key = Some("k".repeat(40).as_str().into());
    assert!(config.lease_keys().is_ok());
    assert!(!format!("{config:?}").contains(&"k".repeat(40)));
}

async fn fresh_keys_cannot_take_a_second_sandbox(backend: Backend) {
    let app = app(backend).await;
    let (id, lease, key) = allocate(&app, ALPHA, "ivan").await;
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "ivan")
            .header("Idempotency-Key", strong_key()),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "CALLER_LIMIT")
    );
    assert_eq!(body["detail"]["limit"], 1);
    assert!(!body.to_string().contains(&id), "{body}");
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "ivan").header("Idempotency-Key", &key),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the replay still answers: {body}");
    assert_eq!(text(&body, "sandbox_id"), id);
    allocate(&app, ALPHA, "judy").await;

    // The shared token: rotating the track header does not escape the cap.
    let (status, body) = send(
        app.allocate("ivan")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("X-Instruqt-Track-ID", "lab-1"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send(
        app.allocate("ivan")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("X-Instruqt-Track-ID", "lab-2")
            .header("Idempotency-Key", "another"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "CALLER_LIMIT")
    );

    // Once the allocation ends, the caller may allocate again.
    let (status, body) = send(
        as_track(
            &app,
            ALPHA,
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
            "ivan",
        )
        .header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    allocate(&app, ALPHA, "ivan").await;
    app.stop().await;
}

/// Embedded: a caller sending fresh keys gets one sandbox and then 429 `CALLER_LIMIT` (with the
/// limit), under a per-track credential and under the shared token whatever its track header;
/// the replay still answers, other callers are unaffected, and a release frees the slot.
#[tokio::test]
async fn fresh_keys_cannot_take_a_second_sandbox_embedded() {
    fresh_keys_cannot_take_a_second_sandbox(Backend::Embedded).await;
}

/// DynamoDB: as [`fresh_keys_cannot_take_a_second_sandbox_embedded`].
#[tokio::test]
async fn fresh_keys_cannot_take_a_second_sandbox_dynamo() {
    fresh_keys_cannot_take_a_second_sandbox(Backend::Dynamo).await;
}

async fn concurrent_fresh_keys_get_exactly_one_sandbox(backend: Backend) {
    let app = app(backend).await;
    let replies = futures::future::join_all((0..50).map(|_| {
        send(
            as_track(&app, ALPHA, Method::POST, "/v1/allocate", "kate")
                .header("Idempotency-Key", strong_key()),
        )
    }))
    .await;
    let created = replies
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let capped = replies
        .iter()
        .filter(|(s, b)| *s == StatusCode::TOO_MANY_REQUESTS && code(b) == "CALLER_LIMIT")
        .count();
    // Invariant: one caller holds at most MAX_ALLOCATIONS_PER_CALLER (1) live allocations.
    assert_eq!((created, capped), (1, 49), "{replies:?}");
    allocate(&app, ALPHA, "leo").await;
    app.stop().await;
}

/// Embedded: 50 concurrent allocations of one caller with different keys: exactly one succeeds,
/// the other 49 get `CALLER_LIMIT`, and another caller is still served.
#[tokio::test]
async fn concurrent_fresh_keys_get_exactly_one_sandbox_embedded() {
    concurrent_fresh_keys_get_exactly_one_sandbox(Backend::Embedded).await;
}

/// DynamoDB: as [`concurrent_fresh_keys_get_exactly_one_sandbox_embedded`].
#[tokio::test]
async fn concurrent_fresh_keys_get_exactly_one_sandbox_dynamo() {
    concurrent_fresh_keys_get_exactly_one_sandbox(Backend::Dynamo).await;
}

/// The address cap counts the lab VM's address as the trusted proxy saw it, whatever caller ids
/// it invents; another address is unaffected. A credential's own per-caller limit overrides the
/// default.
#[tokio::test]
async fn address_cap_bounds_invented_callers() {
    let app = app_with(Backend::Embedded, |c| {
        c.max_allocations_per_address = Some(2);
        c.trusted_proxy_hops = 1;
    })
    .await;
    let from = |caller: &str, address: &str| {
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", caller)
            .header("X-Forwarded-For", format!("6.6.6.6, {address}"))
            .header("Idempotency-Key", strong_key())
    };
    for caller in ["m1", "m2"] {
        let (status, body) = send(from(caller, "203.0.113.7")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = send(from("m3", "203.0.113.7")).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "ADDRESS_LIMIT")
    );
    assert_eq!(body["detail"]["limit"], 2);
    let (status, body) = send(from("m3", "198.51.100.9")).await;
    assert_eq!(status, StatusCode::CREATED, "another lab VM: {body}");
    let (_, _, history) = app.get_json("/v1/admin/events?limit=500").await;
    assert!(
        !history.to_string().contains("203.0.113.7"),
        "the address is stored only hashed"
    );
    app.stop().await;
}

/// A per-track credential's `max_allocations_per_caller` overrides `MAX_ALLOCATIONS_PER_CALLER`.
#[tokio::test]
async fn credential_overrides_the_caller_limit() {
    let credentials = json!({"tracks": [
        {"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"],
         "max_concurrent_allocations": 10, "max_allocations_per_caller": 2},
    ]})
    .to_string();
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| c.track_credentials_json = Some(credentials.into()));
    let app = spawn_app_with(options).await;
    app.seed("alpha", 4).await;
    allocate(&app, ALPHA, "nina").await;
    allocate(&app, ALPHA, "nina").await;
    let (status, body) = send(
        as_track(&app, ALPHA, Method::POST, "/v1/allocate", "nina")
            .header("Idempotency-Key", strong_key()),
    )
    .await;
    assert_eq!(
        (status, code(&body), body["detail"]["limit"].as_u64()),
        (StatusCode::TOO_MANY_REQUESTS, "CALLER_LIMIT", Some(2))
    );
    app.stop().await;
}

/// Under the shared token, `DEFAULT_TRACK_QUOTA` caps the principal as a whole: inventing track
/// headers does not buy more sandboxes.
#[tokio::test]
async fn shared_token_quota_is_keyed_on_the_principal() {
    let app = app_with(Backend::Embedded, |c| c.default_track_quota = Some(2)).await;
    for (caller, track) in [("o1", "t-1"), ("o2", "t-2")] {
        let (status, body) = send(
            app.allocate(caller)
                .header("X-Sandbox-Name-Prefix", "shared-")
                .header("X-Instruqt-Track-ID", track),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = send(
        app.allocate("o3")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("X-Instruqt-Track-ID", "t-3"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "QUOTA_EXCEEDED")
    );
    // Per-track credentials keep their own quota.
    allocate(&app, ALPHA, "o4").await;
    app.stop().await;
}

/// A per-track credential without a seat-sized quota stops start-up with a clear message.
#[tokio::test]
async fn credential_without_a_quota_is_refused_at_start_up() {
    let mut config = command_api::config::Config::defaults();
    config.api_token = Some(tests::app::TRACK_TOKEN.into());
    config.admin_token = Some(tests::app::ADMIN_TOKEN.into());
    config.store.embedded_path = std::env::temp_dir()
        .join(format!("broker-quota-{}", uuid::Uuid::new_v4()))
        .join("broker.db");
    let doc = json!({"tracks": [{"track": "alpha", "token": ALPHA, "name_prefixes": ["alpha-"]}]});
    config.track_credentials_json = Some(doc.to_string().into());
    let started = command_api::startup::build_with(
        &config,
        std::sync::Arc::new(domain::ManualClock::new(chrono::Utc::now())),
        tests::app::test_jobs_config(),
    )
    .await;
    let error = started.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        error.contains("max_concurrent_allocations is required"),
        "{error}"
    );
}

async fn shared_token_stays_in_its_lane(backend: Backend) {
    let app = app(backend).await;
    let (id, lease, _) = allocate(&app, ALPHA, "pat").await;
    let get = format!("/v1/sandboxes/{id}");
    for (method, path) in [
        (Method::GET, get.clone()),
        (Method::POST, format!("{get}/mark-for-deletion")),
        (Method::POST, format!("{get}/extend")),
    ] {
        let (status, body) = send(
            app.track(method.clone(), &path)
                .header("X-Instruqt-Sandbox-ID", "pat")
                .json(&json!({"hours": 1})),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::FORBIDDEN, "FORBIDDEN"),
            "{method} {path}"
        );
    }
    for (prefix, want) in [
        (
            Some("alpha-"),
            (StatusCode::FORBIDDEN, "PREFIX_NOT_ALLOWED"),
        ),
        (
            Some("alpha-x"),
            (StatusCode::FORBIDDEN, "PREFIX_NOT_ALLOWED"),
        ),
        (Some("al"), (StatusCode::FORBIDDEN, "PREFIX_NOT_ALLOWED")),
        (None, (StatusCode::BAD_REQUEST, "NAME_PREFIX_REQUIRED")),
    ] {
        let mut request = app.allocate("quinn");
        if let Some(prefix) = prefix {
            request = request.header("X-Sandbox-Name-Prefix", prefix);
        }
        let (status, body) = send(request).await;
        assert_eq!((status, code(&body)), want, "{prefix:?}");
    }
    let (status, body) = send(
        app.allocate("quinn")
            .header("X-Sandbox-Name-Prefix", "shared-")
            .header("X-Instruqt-Track-ID", "alpha"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "FORBIDDEN"),
        "the shared token cannot allocate for a credential's track"
    );
    // A keyless replay of a caller id the credential allocated for.
    let (status, body) = send(as_track(&app, ALPHA, Method::POST, "/v1/allocate", "rita")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send(
        app.allocate("rita")
            .header("X-Sandbox-Name-Prefix", "shared-"),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "FORBIDDEN"),
        "{body}"
    );
    // The victim is unaffected.
    let (status, body) =
        send(as_track(&app, ALPHA, Method::GET, &get, "pat").header("X-Lease-Token", &lease)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "allocated");
    app.stop().await;
}

/// Embedded: the shared token cannot read, mark, extend, replay or allocate in a per-track
/// credential's prefixes or track (403), must name a prefix outside them, and the credential's
/// student is unaffected.
#[tokio::test]
async fn shared_token_stays_in_its_lane_embedded() {
    shared_token_stays_in_its_lane(Backend::Embedded).await;
}

/// DynamoDB: as [`shared_token_stays_in_its_lane_embedded`].
#[tokio::test]
async fn shared_token_stays_in_its_lane_dynamo() {
    shared_token_stays_in_its_lane(Backend::Dynamo).await;
}

const SIGNED: &str = "signed-token-0123456789abcdefghijklmno";
const SIGNED_SECRET: &str = "signed-secret-0123456789abcdefghijklm";

async fn forged_signatures_do_not_spend_the_victims_bucket(backend: Backend) {
    let credentials = json!({"tracks": [
        {"track": "signed", "token": SIGNED, "name_prefixes": ["signed-"],
         "max_concurrent_allocations": 10,
         "caller_secret": SIGNED_SECRET, "require_caller_signature": true},
    ]})
    .to_string();
    let mut options = AppOptions::new(backend);
    // A small bucket per caller: 3 requests, then 429 for a long while.
    options.rate_limit = (0.01, 3.0);
    options.configure = Box::new(move |c| c.track_credentials_json = Some(credentials.into()));
    let app = spawn_app_with(options).await;
    app.seed("signed", 2).await;
    // The server checks the window against its injected clock.
    let now = domain::Clock::now(&app.clock).timestamp();
    let sign = |t: i64, caller: &str| {
        command_api::credentials::caller_signature_v1(
            SIGNED_SECRET,
            t,
            "POST",
            "/v1/allocate",
            caller,
        )
    };
    for forged in [
        "t=1,v1=00".to_string(),
        sign(now, "mallory"),
        sign(now - 3_600, "victim"),
        command_api::credentials::caller_signature(SIGNED_SECRET, "victim"),
    ] {
        for _ in 0..3 {
            let (status, body) = send(
                as_track(&app, SIGNED, Method::POST, "/v1/allocate", "victim")
                    .header("X-Caller-Signature", &forged),
            )
            .await;
            assert_eq!(
                (status, code(&body)),
                (StatusCode::FORBIDDEN, "INVALID_CALLER_SIGNATURE"),
                "{forged}"
            );
        }
    }
    let (status, body) = send(
        as_track(&app, SIGNED, Method::POST, "/v1/allocate", "victim")
            .header("X-Caller-Signature", sign(now, "victim"))
            .header("Idempotency-Key", strong_key()),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the victim's bucket is untouched: {body}"
    );
    app.stop().await;
}

/// Embedded: requests with a forged, foreign, expired or old-form signature are refused (403)
/// before the named caller's rate-limit bucket is spent; the real student is then served.
#[tokio::test]
async fn forged_signatures_do_not_spend_the_victims_bucket_embedded() {
    forged_signatures_do_not_spend_the_victims_bucket(Backend::Embedded).await;
}

/// DynamoDB: as [`forged_signatures_do_not_spend_the_victims_bucket_embedded`].
#[tokio::test]
async fn forged_signatures_do_not_spend_the_victims_bucket_dynamo() {
    forged_signatures_do_not_spend_the_victims_bucket(Backend::Dynamo).await;
}

/// `ALLOW_LEGACY_CALLER_SIGNATURE=true` (migration only) accepts the old form again.
#[tokio::test]
async fn legacy_signatures_only_behind_the_migration_setting() {
    let credentials = json!({"tracks": [
        {"track": "signed", "token": SIGNED, "name_prefixes": ["signed-"],
         "max_concurrent_allocations": 10,
         "caller_secret": SIGNED_SECRET, "require_caller_signature": true},
    ]})
    .to_string();
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| {
        c.track_credentials_json = Some(credentials.into());
        c.allow_legacy_caller_signature = true;
    });
    let app = spawn_app_with(options).await;
    app.seed("signed", 1).await;
    let (status, body) = send(
        as_track(&app, SIGNED, Method::POST, "/v1/allocate", "sam").header(
            "X-Caller-Signature",
            command_api::credentials::caller_signature(SIGNED_SECRET, "sam"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.stop().await;
}

/// Answers that carry a sandbox's details are never cached: `Cache-Control: no-store` on the
/// 201, the read, and the refusals.
#[tokio::test]
async fn sandbox_details_are_not_cached() {
    let app = app(Backend::Embedded).await;
    let key = strong_key();
    let (status, headers, body) = as_track(&app, ALPHA, Method::POST, "/v1/allocate", "uma")
        .header("Idempotency-Key", &key)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let path = format!("/v1/sandboxes/{}", text(&body, "sandbox_id"));
    let lease = text(&body, "lease_token");
    let (status, headers, _) = as_track(&app, ALPHA, Method::GET, &path, "uma")
        .header("X-Lease-Token", &lease)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "no-store");
    let (status, headers, _) = as_track(&app, ALPHA, Method::GET, &path, "uma")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["cache-control"], "no-store");
    let (_, headers, _) = app
        .get_json(&format!("{path}/history").replace("/v1/", "/v1/admin/"))
        .await;
    assert_eq!(headers["cache-control"], "no-store");
    app.stop().await;
}

/// The OpenAPI document bounds `X-Lease-Token` at 256 characters, and the server enforces that
/// bound on every route that declares the header, even where the capability does not apply
/// (the shared token without `REQUIRE_LEASE_TOKEN`): 400 `VALIDATION_ERROR`, nothing allocated.
#[tokio::test]
async fn an_overlong_lease_token_is_refused_everywhere() {
    let app = tests::app::spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    let long = "x".repeat(257);
    let response = app
        .allocate("student-long")
        .header("X-Lease-Token", &long)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{body}");
    let response = app.allocate("student-long").send().await.expect("send");
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "the refusal allocated nothing"
    );
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let path = format!("/v1/sandboxes/{}", text(&body, "sandbox_id"));
    for (method, path) in [
        (Method::GET, path.clone()),
        (Method::POST, format!("{path}/extend")),
        (Method::POST, format!("{path}/mark-for-deletion")),
    ] {
        let response = app
            .track(method.clone(), &path)
            .header("X-Instruqt-Sandbox-ID", "student-long")
            .header("X-Lease-Token", &long)
            .send()
            .await
            .expect("send");
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{method} {path}"
        );
    }
    app.stop().await;
}

/// The real binary, logging everything it logs at debug level as JSON: across an allocation, a
/// replay, a read, an extension and a release with the lease token, neither its log nor
/// `/metrics` ever holds the lease token, the idempotency key, the track token or the lease
/// key (the token is derived, and every secret setting is an unprintable type).
#[tokio::test]
async fn lease_tokens_and_keys_never_reach_the_log_or_metrics() {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;
    use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};

    const LEASE_KEY: &str = "lease-key-for-the-log-scan-0123456789abcdef";
    let dir =
        std::env::temp_dir().join(format!("broker-log-scan-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let credentials = json!({"tracks": [{"track": "scan", "token": ALPHA,
        "name_prefixes": ["lab-demo-"], "max_concurrent_allocations": 10}]})
    .to_string();
    let env: BTreeMap<String, String> = [
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("STORE", "embedded".into()),
        ("EMBEDDED_PATH", dir.join("broker.db").display().to_string()),
        ("SEED_DEMO_POOL", "true".into()),
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "debug".into()),
        ("LEASE_TOKEN_KEY", LEASE_KEY.into()),
        ("TRACK_CREDENTIALS_JSON", credentials),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut api = ServiceProcess::new(
        "api",
        Path::new(env!("CARGO_BIN_EXE_chaos-command-api")),
        &[],
        env,
    );
    api.start();
    let client = reqwest::Client::new();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not start:\n{}",
        api.log_tail(50)
    );
    let track = |method: Method, path: &str| {
        client
            .request(method, format!("{url}{path}"))
            .bearer_auth(ALPHA)
            .header("X-Instruqt-Sandbox-ID", "scan-student")
    };
    let key = strong_key();
    // The demo pool is seeded in the background: wait (bounded) for the first sandbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (id, lease) = loop {
        let (status, body) =
            send(track(Method::POST, "/v1/allocate").header("Idempotency-Key", &key)).await;
        if status == StatusCode::CREATED {
            break (text(&body, "sandbox_id"), text(&body, "lease_token"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sandbox within 120 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(lease.starts_with("lt1."), "{lease}");
    let (status, body) =
        send(track(Method::POST, "/v1/allocate").header("Idempotency-Key", &key)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        text(&body, "lease_token"),
        lease,
        "the replay gives the token again"
    );
    let get = format!("/v1/sandboxes/{id}");
    let (status, body) = send(track(Method::GET, &get).header("X-Lease-Token", &lease)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(
        track(Method::POST, &format!("{get}/extend"))
            .header("X-Lease-Token", &lease)
            .json(&json!({"hours": 1})),
    )
    .await;
    assert!(
        status == StatusCode::OK || status == StatusCode::CONFLICT,
        "{status} {body}"
    );
    let (status, body) = send(
        track(Method::POST, &format!("{get}/mark-for-deletion")).header("X-Lease-Token", &lease),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A wrong token is refused and logged as a refusal, still without the token itself.
    let wrong = format!("{lease}x");
    let (status, _) = send(track(Method::GET, &get).header("X-Lease-Token", &wrong)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map(|r| r.status())
        .ok();
    assert_eq!(metrics, Some(StatusCode::OK));
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    let stopped = api.terminate(Duration::from_secs(30)).await;
    assert!(stopped.is_some_and(|s| s.success()), "clean stop");
    let log = api.log_tail(100_000);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.lines().filter(|l| l.starts_with('{')).count() > 20,
        "the scan needs a log: {log}"
    );
    let lease_mac = lease.rsplit('.').next().unwrap_or_default().to_string();
    let wrong_mac = wrong.rsplit('.').next().unwrap_or_default().to_string();
    for (what, secret) in [
        ("the lease token", lease_mac.as_str()),
        ("a refused lease token", wrong_mac.as_str()),
        ("the idempotency key", key.as_str()),
        ("the track token", ALPHA),
        ("the lease key", LEASE_KEY),
    ] {
        assert!(!log.contains(secret), "{what} is in the log");
        assert!(!metrics.contains(secret), "{what} is in /metrics");
    }
}
