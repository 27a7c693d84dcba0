//! Personal data over real HTTP on both stores (issue 28, docs/personal-data.md): with
//! `STUDENT_IDS=pseudonymised` the stored events hold pseudonyms only, the same student keeps one
//! pseudonym (across restarts too), an erasure is refused while the student holds a sandbox and
//! afterwards leaves nothing that links the log to the id, and the switch from clear ids never
//! hands a running lab's student a second sandbox.

use std::path::PathBuf;
use std::time::Duration;

use command_api::subjects::StudentIds;
use domain::SandboxStatus;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

pub(crate) const KEY: &str = "pseudonym-key-for-tests-0123456789abcdefABCDEF";

/// Where one test's data lives, so a second service (or `broker-audit`) can open the same store.
pub(crate) struct Spot {
    pub(crate) backend: Backend,
    pub(crate) path: PathBuf,
    pub(crate) prefix: String,
}

impl Spot {
    pub(crate) fn new(backend: Backend) -> Self {
        Self {
            backend,
            path: std::env::temp_dir()
                .join(format!("broker-personal-data-{}", uuid::Uuid::new_v4()))
                .join("broker.db"),
            prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// A service on this spot storing student ids as `mode`, with the clear-id fallback until
    /// `fallback_until` (blank: none).
    pub(crate) async fn start(&self, mode: StudentIds, fallback_until: &str) -> TestApp {
        let (path, prefix, until) = (
            self.path.clone(),
            self.prefix.clone(),
            fallback_until.to_string(),
        );
        let mut options = AppOptions::new(self.backend);
        options.configure = Box::new(move |c| {
            c.store.embedded_path = path;
            c.store.table_prefix = prefix;
            c.student_ids = mode;
            c.pseudonym_key = Some(KEY.into());
            c.clear_id_fallback_until = until;
        });
        spawn_app_with(options).await
    }
}

impl Drop for Spot {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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

/// POST /v1/allocate as `student`: (status, sandbox id).
async fn allocate(app: &TestApp, student: &str) -> (StatusCode, String) {
    let (status, body) = send(app.allocate(student)).await;
    (status, text(&body, "sandbox_id"))
}

async fn mark(app: &TestApp, student: &str, sandbox_id: &str) -> StatusCode {
    send(
        app.track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", student),
    )
    .await
    .0
}

async fn lookup(app: &TestApp, student: &str) -> (StatusCode, Value) {
    send(
        app.admin(Method::POST, "/v1/admin/students/lookup")
            .json(&json!({ "student": student })),
    )
    .await
}

async fn erase(app: &TestApp, student: &str) -> (StatusCode, Value) {
    send(
        app.admin(Method::POST, "/v1/admin/students/erase")
            .json(&json!({ "student": student })),
    )
    .await
}

async fn pseudonym_status(app: &TestApp, pseudonym: &str) -> Value {
    let (status, _, body) = app
        .get_json(&format!("/v1/admin/pseudonyms/{pseudonym}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Every stored event, as JSON text.
async fn stored_events(app: &TestApp) -> String {
    let events = tests::history::all_events(app.state.broker.events().as_ref()).await;
    serde_json::to_string(&events).unwrap_or_default()
}

/// Waits (bounded) until the view shows no allocated sandbox, so a refusal that reads it is
/// about the student and not about projection lag.
async fn wait_released(app: &TestApp) {
    app.wait_until(|s| s.get(SandboxStatus::Allocated) == 0)
        .await;
}

async fn events_hold_pseudonyms_only(backend: Backend) {
    let spot = Spot::new(backend);
    let app = spot.start(StudentIds::Pseudonymised, "").await;
    app.seed("pd", 3).await;
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    let (status, sandbox) = allocate(&app, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = allocate(&app, &student).await;
    assert_eq!(
        (status, again.as_str()),
        (StatusCode::OK, sandbox.as_str()),
        "the same student replays the same allocation"
    );
    let (status, body) = lookup(&app, &student).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pseudonym = text(&body, "pseudonym");
    assert!(
        pseudonym.starts_with("p1:") && pseudonym.len() == 27,
        "{body}"
    );
    assert_eq!(text(&body, "student"), student);
    // The lookup lists the view's rows under the pseudonym, once the projection has them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = lookup(&app, &student).await;
        if body["sandboxes"][0]["sandbox_id"] == json!(sandbox) {
            assert_eq!(body["sandboxes"][0]["allocated_to_track"], json!(pseudonym));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let linked = pseudonym_status(&app, &pseudonym).await;
    assert_eq!(
        (text(&linked, "status"), text(&linked, "student")),
        ("linked".to_string(), student.clone())
    );
    // The caller's own read and release find the sandbox under the pseudonym.
    let (status, body) = send(
        app.track(Method::GET, &format!("/v1/sandboxes/{sandbox}"))
            .header("X-Instruqt-Sandbox-ID", &student),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(mark(&app, &student, &sandbox).await, StatusCode::OK);
    // The admin listing shows the pseudonym as owner and names the student beside it.
    let (status, _, listing) = app
        .get_json(&format!("/v1/admin/sandboxes?owner={pseudonym}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(
        listing["sandboxes"][0]["allocated_to_track"],
        json!(pseudonym)
    );
    assert_eq!(listing["subjects"][&pseudonym], json!(student), "{listing}");
    let log = stored_events(&app).await;
    assert!(log.contains(&pseudonym), "the log names the pseudonym");
    assert!(!log.contains(&student), "the log holds the clear id: {log}");
    app.stop().await;
}

/// The stored events carry the student's pseudonym, never the id; one student keeps one
/// pseudonym and replays the same allocation (embedded).
#[tokio::test]
async fn events_hold_pseudonyms_only_embedded() {
    events_hold_pseudonyms_only(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn events_hold_pseudonyms_only_dynamo() {
    events_hold_pseudonyms_only(Backend::Dynamo).await;
}

async fn erasure_unlinks_the_student(backend: Backend) {
    let spot = Spot::new(backend);
    let app = spot.start(StudentIds::Pseudonymised, "").await;
    app.seed("pd", 3).await;
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    let (status, sandbox) = allocate(&app, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    let pseudonym = text(&lookup(&app, &student).await.1, "pseudonym");
    let (status, body) = erase(&app, &student).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "STUDENT_HOLDS_SANDBOX"),
        "{body}"
    );
    let message = body["detail"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&sandbox) && message.contains("mark-for-deletion"),
        "the refusal names the sandbox and the next step: {message}"
    );
    assert_eq!(
        lookup(&app, &student).await.0,
        StatusCode::OK,
        "a refused erasure erases nothing"
    );
    assert_eq!(mark(&app, &student, &sandbox).await, StatusCode::OK);
    wait_released(&app).await;
    let (status, body) = erase(&app, &student).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text(&body, "pseudonym"), pseudonym);
    assert_eq!(text(&body, "status"), "erased");
    // Unlinkable: the lookup knows nobody, the pseudonym reads as erased, the history keeps the
    // pseudonym (the log is not rewritten) and never held the id.
    let (status, body) = lookup(&app, &student).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "UNKNOWN_STUDENT"),
        "{body}"
    );
    let erased = pseudonym_status(&app, &pseudonym).await;
    assert_eq!(text(&erased, "status"), "erased", "{erased}");
    assert!(erased.get("student").is_none(), "{erased}");
    let (_, _, history) = app
        .get_json(&format!("/v1/admin/sandboxes/{sandbox}/history"))
        .await;
    assert_eq!(
        history["subjects"][&pseudonym],
        json!("erased"),
        "{history}"
    );
    let history = history.to_string();
    assert!(history.contains(&pseudonym) && !history.contains(&student));
    let (status, body) = erase(&app, &student).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "UNKNOWN_STUDENT"),
        "erasing twice finds nothing: {body}"
    );
    // A returning student is a new subject with a new pseudonym.
    let (status, second) = allocate(&app, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(second, sandbox);
    let (status, body) = lookup(&app, &student).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh = text(&body, "pseudonym");
    assert!(fresh.starts_with("p1:") && fresh != pseudonym, "{body}");
    assert_eq!(
        text(&pseudonym_status(&app, &pseudonym).await, "status"),
        "erased"
    );
    assert!(!stored_events(&app).await.contains(&student));
    app.stop().await;
}

/// Erasure is refused while the student holds a sandbox; afterwards the id cannot be linked to
/// the log (lookup unknown, pseudonym erased, history unchanged) and a returning student gets a
/// new pseudonym (embedded).
#[tokio::test]
async fn erasure_unlinks_the_student_embedded() {
    erasure_unlinks_the_student(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn erasure_unlinks_the_student_dynamo() {
    erasure_unlinks_the_student(Backend::Dynamo).await;
}

async fn switch_keeps_running_labs(backend: Backend) {
    let spot = Spot::new(backend);
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    let before = spot.start(StudentIds::Clear, "").await;
    before.seed("pd", 3).await;
    let (status, running) = allocate(&before, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    before.stop().await;
    let until = (chrono::Utc::now() + chrono::Duration::hours(48))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let after = spot.start(StudentIds::Pseudonymised, &until).await;
    after
        .wait_until(|s| s.get(SandboxStatus::Allocated) == 1)
        .await;
    // A fresh key meets the clear id's cap, as before the switch, not a second sandbox.
    let (status, body) = send(
        after
            .allocate(&student)
            .header("Idempotency-Key", uuid::Uuid::new_v4().simple().to_string()),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "CALLER_LIMIT"),
        "{body}"
    );
    // The running lab's replay finds the clear-id claim: no second sandbox.
    let (status, replayed) = allocate(&after, &student).await;
    assert_eq!(
        (status, replayed.as_str()),
        (StatusCode::OK, running.as_str()),
        "the switch handed the student a second sandbox"
    );
    let allocations = tests::history::all_events(after.state.broker.events().as_ref())
        .await
        .into_iter()
        .filter(|e| e.event_type == "SandboxAllocated")
        .count();
    assert_eq!(allocations, 1, "one allocation in the log");
    let (status, body) = send(
        after
            .track(Method::GET, &format!("/v1/sandboxes/{running}"))
            .header("X-Instruqt-Sandbox-ID", &student),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(mark(&after, &student, &running).await, StatusCode::OK);
    // The next lab is the student's first under the pseudonym.
    let (status, next) = allocate(&after, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(next, running);
    let pseudonym = text(&lookup(&after, &student).await.1, "pseudonym");
    let (_, _, history) = after
        .get_json(&format!("/v1/admin/sandboxes/{next}/history"))
        .await;
    // The events carry the pseudonym; the admin view names the student beside it.
    assert_eq!(history["subjects"][&pseudonym], json!(student), "{history}");
    let events = history["events"].to_string();
    assert!(events.contains(&pseudonym) && !events.contains(&student));
    after.stop().await;
}

/// Switching a running deployment to pseudonyms, with the fallback on: a lab allocated under the
/// clear id is replayed, read and released by the same student, who is never handed a second
/// sandbox; the next lab is stored under the pseudonym (embedded).
#[tokio::test]
async fn switch_keeps_running_labs_embedded() {
    switch_keeps_running_labs(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn switch_keeps_running_labs_dynamo() {
    switch_keeps_running_labs(Backend::Dynamo).await;
}

async fn fallback_ends_at_its_time(backend: Backend) {
    let spot = Spot::new(backend);
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    let before = spot.start(StudentIds::Clear, "").await;
    before.seed("pd", 3).await;
    let (status, running) = allocate(&before, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    before.stop().await;
    let until = (chrono::Utc::now() + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let after = spot.start(StudentIds::Pseudonymised, &until).await;
    after
        .wait_until(|s| s.get(SandboxStatus::Allocated) == 1)
        .await;
    let read = || {
        after
            .track(Method::GET, &format!("/v1/sandboxes/{running}"))
            .header("X-Instruqt-Sandbox-ID", &student)
    };
    let (status, body) = send(read()).await;
    assert_eq!(status, StatusCode::OK, "within the window: {body}");
    // Past the configured end the clear id is no longer looked for: the pseudonym is a new
    // caller (which is why the window must outlast the longest lab).
    after.clock.advance(chrono::Duration::hours(2));
    let (status, body) = send(read()).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "NOT_SANDBOX_OWNER"),
        "{body}"
    );
    after.stop().await;
}

/// The switch's fallback lasts until `CLEAR_ID_FALLBACK_UNTIL` and no longer (embedded).
#[tokio::test]
async fn fallback_ends_at_its_time_embedded() {
    fallback_ends_at_its_time(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn fallback_ends_at_its_time_dynamo() {
    fallback_ends_at_its_time(Backend::Dynamo).await;
}

async fn pseudonyms_survive_a_restart(backend: Backend) {
    let spot = Spot::new(backend);
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    let first = spot.start(StudentIds::Pseudonymised, "").await;
    first.seed("pd", 2).await;
    let (status, sandbox) = allocate(&first, &student).await;
    assert_eq!(status, StatusCode::CREATED);
    let pseudonym = text(&lookup(&first, &student).await.1, "pseudonym");
    first.stop().await;
    let second = spot.start(StudentIds::Pseudonymised, "").await;
    let (status, body) = lookup(&second, &student).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text(&body, "pseudonym"), pseudonym, "same key, same record");
    let (status, replayed) = allocate(&second, &student).await;
    assert_eq!(
        (status, replayed.as_str()),
        (StatusCode::OK, sandbox.as_str())
    );
    second.stop().await;
}

/// The key and the subject record keep a student's pseudonym across a restart, so the lab's
/// replay still finds its allocation (embedded).
#[tokio::test]
async fn pseudonyms_survive_a_restart_embedded() {
    pseudonyms_survive_a_restart(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn pseudonyms_survive_a_restart_dynamo() {
    pseudonyms_survive_a_restart(Backend::Dynamo).await;
}

async fn first_requests_agree_on_one_pseudonym(backend: Backend) {
    let spot = Spot::new(backend);
    let app = spot.start(StudentIds::Pseudonymised, "").await;
    app.seed("pd", 4).await;
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());
    // Twenty first requests at once: each creates the subject record unless another did first.
    let answers = futures::future::join_all((0..20).map(|_| allocate(&app, &student))).await;
    let created = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::CREATED)
        .count();
    let sandboxes: std::collections::BTreeSet<&String> =
        answers.iter().map(|(_, sandbox)| sandbox).collect();
    assert_eq!(created, 1, "{answers:?}");
    assert_eq!(
        sandboxes.len(),
        1,
        "one sandbox for one student: {answers:?}"
    );
    assert!(answers
        .iter()
        .all(|(status, _)| *status == StatusCode::CREATED || *status == StatusCode::OK));
    app.stop().await;
}

/// Concurrent first requests of one student agree on one pseudonym (the subject record is
/// created once), so the student gets exactly one sandbox (embedded).
#[tokio::test]
async fn first_requests_agree_on_one_pseudonym_embedded() {
    first_requests_agree_on_one_pseudonym(Backend::Embedded).await;
}

/// The same on DynamoDB Local.
#[tokio::test]
async fn first_requests_agree_on_one_pseudonym_dynamo() {
    first_requests_agree_on_one_pseudonym(Backend::Dynamo).await;
}

/// With clear ids there is nothing to erase: the admin routes say how to turn pseudonyms on, and
/// a malformed body is a 400 naming the field.
#[tokio::test]
async fn erasure_needs_pseudonyms_and_a_student() {
    let spot = Spot::new(Backend::Embedded);
    let app = spot.start(StudentIds::Clear, "").await;
    let (status, body) = erase(&app, "student-1").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "PSEUDONYMS_OFF"),
        "{body}"
    );
    assert!(body["detail"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("STUDENT_IDS=pseudonymised")));
    let (status, body) = send(
        app.admin(Method::POST, "/v1/admin/students/erase")
            .json(&json!({ "who": "student-1" })),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
        "{body}"
    );
    app.stop().await;
}

/// The real binary, logging at debug level as JSON, with pseudonyms on: across an allocation, a
/// replay, a read, a release, an admin lookup and an erasure, neither its log nor `/metrics`
/// holds the student id.
#[tokio::test]
async fn student_ids_never_reach_the_log_or_metrics() {
    use std::collections::BTreeMap;
    use std::path::Path;
    use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};

    let dir = std::env::temp_dir().join(format!(
        "broker-pd-log-scan-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let env: BTreeMap<String, String> = [
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("STORE", "embedded".into()),
        ("EMBEDDED_PATH", dir.join("broker.db").display().to_string()),
        ("SEED_DEMO_POOL", "true".into()),
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "debug".into()),
        ("STUDENT_IDS", "pseudonymised".into()),
        ("PSEUDONYM_KEY", KEY.into()),
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
    let student = format!("scan-student-{}", uuid::Uuid::new_v4().simple());
    let track = |method: Method, path: &str| {
        client
            .request(method, format!("{url}{path}"))
            .bearer_auth(command_api::config::DEV_TRACK_TOKEN)
            .header("X-Instruqt-Sandbox-ID", &student)
    };
    let admin = |path: &str| {
        client
            .post(format!("{url}{path}"))
            .bearer_auth(command_api::config::DEV_ADMIN_TOKEN)
            .json(&json!({ "student": student }))
    };
    // The demo pool is seeded in the background: wait (bounded) for the first sandbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let id = loop {
        let (status, body) = send(track(Method::POST, "/v1/allocate")).await;
        if status == StatusCode::CREATED {
            break text(&body, "sandbox_id");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sandbox within 120 s: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (status, body) = send(track(Method::POST, "/v1/allocate")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(admin("/v1/admin/students/erase")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let get = format!("/v1/sandboxes/{id}");
    let (status, body) = send(track(Method::GET, &get)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(track(Method::POST, &format!("{get}/mark-for-deletion"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(admin("/v1/admin/students/lookup")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pseudonym = text(&body, "pseudonym");
    // The release reaches the view in the background: erase once it has (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = send(admin("/v1/admin/students/erase")).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            status == StatusCode::CONFLICT && tokio::time::Instant::now() < deadline,
            "erasure: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    assert!(
        log.contains(&pseudonym),
        "the erasure is logged by pseudonym"
    );
    assert!(
        metrics.contains("broker_subject_erasures_total{outcome=\"erased\"} 1"),
        "{metrics}"
    );
    let leaks: Vec<&str> = log.lines().filter(|l| l.contains(&student)).collect();
    assert!(leaks.is_empty(), "the student id is in the log: {leaks:#?}");
    assert!(!metrics.contains(&student), "the student id is in /metrics");
    assert!(!log.contains(KEY), "the pseudonym key is in the log");
}
