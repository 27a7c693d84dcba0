//! Rolling upgrades (ADR 0023, ADR 0033, docs/upgrades.md), both directions a mixed fleet sees.
//!
//! The previous release reading the current release's log: the current release writes a real
//! log through the HTTP API with reservations and usage summaries on, and a reader built with the previous event set
//! (the event contract's baseline, `docs/events/baseline/`; `domain::model::reader::read_only`)
//! reads it in a process of its own. Its rebuild fails no batch and counts the new event types,
//! its rows equal the current release's except the held ones (exactly the sandboxes the new
//! events touch), and its command side refuses the held sandboxes while allocating every other.
//!
//! This release reading events no release writes yet — an event type with a newer schema
//! version on a sandbox stream, and a stream kind it does not know, written straight into the
//! event store: on both stores, the projector keeps going (later events apply, the new sandbox
//! appears), the unknown events are counted, the sandbox whose stream holds one is held out of
//! allocation while every other one is allocated, the command side refuses to act on it, the
//! audit history still shows the new events, and a verify of the view against a replay reports
//! no drift.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::model::events::SandboxEvent;
use domain::model::sandbox::SandboxCommand;
use domain::store::unknown;
use domain::{Actor, BrokerError, CommandMeta, DomainError, EventEnvelope, PoolRow};
use projector::rebuild::{verify, RebuildOptions, RebuildProgress};
use reqwest::StatusCode;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app, Backend, Sent, TestApp};

fn newer_release() -> CommandMeta {
    CommandMeta {
        actor: Actor::Job("maintenance"),
        request_id: None,
        correlation_id: Some("next-release".into()),
    }
}

/// An envelope as the next release would store it: a type and payload this build lacks.
fn future_event(stream_id: &str, version: u64, event_type: &str, schema: u32) -> EventEnvelope {
    let mut envelope = EventEnvelope::new(
        stream_id,
        version,
        &SandboxEvent::SandboxRestored {
            restored_at: Utc::now(),
        },
        &newer_release(),
        Utc::now(),
    );
    envelope.event_type = event_type.to_string();
    envelope.schema_version = schema;
    envelope.payload = serde_json::json!({
        "type": event_type,
        "window_id": "m-1",
        "window": {"from": "2026-12-08T09:00:00Z", "label": "blue"},
    });
    envelope
}

/// Waits (bounded) until the view row of `id` is at `version`.
async fn row_at(app: &TestApp, id: &str, version: u64) -> PoolRow {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let row = app
            .state
            .broker
            .view()
            .get(id)
            .await
            .unwrap_or_else(|e| panic!("get {id}: {e}"));
        if let Some(row) = row.filter(|r| r.version >= version) {
            return row;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("row {id} never reached v{version}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reads_a_log_written_by_a_newer_release(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("up", 6).await;
    let held = "up-id-0";
    let before = unknown::counts();
    let seen = |counts: &std::collections::BTreeMap<String, u64>, t: &str| {
        counts.get(t).copied().unwrap_or(0)
    };

    // A newer release relabels one sandbox and opens a maintenance-window stream.
    let events = app.state.broker.events().clone();
    events
        .append(vec![
            future_event(&format!("sandbox#{held}"), 2, "SandboxRelabelled", 2),
            future_event("maintenance#m-1", 1, "MaintenanceWindowPlanned", 1),
        ])
        .await
        .unwrap_or_else(|e| panic!("append future events: {e}"));
    let row = row_at(&app, held, 2).await;
    assert_eq!(row.held_by.as_deref(), Some("SandboxRelabelled"));
    assert_eq!(row.status, domain::SandboxStatus::Available);

    // The command side refuses to decide on a stream it cannot fully read.
    let refused = app
        .state
        .broker
        .execute(held, SandboxCommand::Restore, &newer_release())
        .await;
    assert!(
        matches!(
            refused,
            Err(BrokerError::Domain(DomainError::WrittenByNewerRelease { ref event_type, .. }))
                if event_type == "SandboxRelabelled"
        ),
        "{refused:?}"
    );

    // The auditor still sees the newer release's events verbatim; point-in-time reads work.
    let (status, _, history) = app
        .get_json(&format!("/v1/admin/sandboxes/{held}/history"))
        .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert!(
        history["events"].as_array().is_some_and(|events| events
            .iter()
            .any(|e| e["event_type"] == "SandboxRelabelled")),
        "{history}"
    );
    let (status, _, at) = app.get_json(&format!("/v1/admin/sandboxes/{held}")).await;
    assert_eq!(status, StatusCode::OK, "{at}");

    // A burst larger than the pool: every other sandbox is allocated, the held one never.
    let mut got = Vec::new();
    for i in 0..10 {
        let (status, _, body) = app.allocate(&format!("stu-{i}")).sent_json().await;
        match status {
            StatusCode::CREATED => got.push(body["sandbox_id"].as_str().unwrap_or("").to_string()),
            StatusCode::CONFLICT => {}
            other => panic!("allocate {i}: {other} {body}"),
        }
    }
    got.sort();
    let want: Vec<String> = (1..6).map(|i| format!("up-id-{i}")).collect();
    assert_eq!(got, want, "every sandbox but the held one");

    // Later events still apply: a known event on the held stream, and a new registration.
    let stale = EventEnvelope::new(
        &format!("sandbox#{held}"),
        3,
        &SandboxEvent::SandboxMarkedStale {
            marked_at: Utc::now(),
        },
        &newer_release(),
        Utc::now(),
    );
    events
        .append(vec![stale])
        .await
        .unwrap_or_else(|e| panic!("append stale: {e}"));
    let row = row_at(&app, held, 3).await;
    assert_eq!(row.status, domain::SandboxStatus::Stale);
    assert_eq!(
        row.held_by.as_deref(),
        Some("SandboxRelabelled"),
        "the hold stays"
    );
    app.seed("late", 1).await;

    let after = unknown::counts();
    assert!(seen(&after, "SandboxRelabelled") > seen(&before, "SandboxRelabelled"));
    assert!(seen(&after, "MaintenanceWindowPlanned") > seen(&before, "MaintenanceWindowPlanned"));
    let metrics = app
        .admin(reqwest::Method::GET, "/metrics")
        .sent()
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("broker_projector_unknown_events_total{event_type=\"SandboxRelabelled\"}"),
        "{metrics}"
    );

    // Verify: a replay of the whole log equals the live view (no failure, no drift).
    let scratch = EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("scratch: {e}"));
    let report = verify(
        events,
        app.state.broker.view().clone(),
        Arc::new(scratch),
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("verify: {e}"));
    assert!(report.is_clean(), "drift: {:#?}", report.differences);
    app.stop().await;
}

/// Embedded store: a log written by a newer release is tolerated end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_reads_a_log_written_by_a_newer_release() {
    reads_a_log_written_by_a_newer_release(Backend::Embedded).await;
}

/// DynamoDB Local (real stream, poller): a log written by a newer release is tolerated end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamo_reads_a_log_written_by_a_newer_release() {
    reads_a_log_written_by_a_newer_release(Backend::Dynamo).await;
}

// The forward direction for real: the current release writes a log with its new features on,
// and a reader that knows only the previous release's event set (the event contract's baseline)
// projects it, verifies it against the full reader's view and acts on it.

/// Where the parent test tells the narrowed reader (a process of its own) which store to read.
const PREVIOUS_READER_SPEC: &str = "BROKER_TEST_PREVIOUS_READER_STORE";

/// The previous release's event set: the event types of the contract's baseline.
fn baseline_event_types() -> std::io::Result<Vec<String>> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events/baseline/payloads");
    let mut types = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(event_type) = name.strip_suffix(".schema.json") {
            types.push(event_type.to_string());
        }
    }
    types.sort();
    Ok(types)
}

/// The store settings of a spot (`embedded` path, or DynamoDB prefix and endpoint) given as
/// `{"backend", "path", "prefix", "endpoint"}`.
fn store_args_of(spec: &serde_json::Value) -> runtime::StoreArgs {
    let mut store = runtime::StoreArgs::defaults();
    store.embedded_path = spec["path"].as_str().unwrap_or_default().into();
    store.table_prefix = spec["prefix"].as_str().unwrap_or_default().to_string();
    if spec["backend"] == "dynamo" {
        // The parent's DynamoDB Local: each test process starts its own, in memory.
        store.store = runtime::StoreKind::Dynamodb;
        store.ddb_endpoint_url = spec["endpoint"].as_str().map(str::to_string);
    }
    store
}

/// The current release, new features on, writes a log on `backend`; a process narrowed to the
/// baseline's event set then reads it (see [`previous_release_reader`]) and must pass.
async fn previous_release_reads_the_current_log(backend: Backend) {
    let dir = std::env::temp_dir().join(format!("broker-forward-{}", uuid::Uuid::new_v4()));
    let spec = serde_json::json!({
        "backend": if backend == Backend::Dynamo { "dynamo" } else { "embedded" },
        "path": dir.join("broker.db").to_string_lossy(),
        "prefix": format!("t{}", uuid::Uuid::new_v4().simple()),
        "endpoint": if backend == Backend::Dynamo {
            Some(tests::ddb_local::endpoint().await)
        } else {
            None
        },
    });
    let (path, prefix) = (
        std::path::PathBuf::from(spec["path"].as_str().unwrap_or_default()),
        spec["prefix"].as_str().unwrap_or_default().to_string(),
    );
    let mut options = tests::app::AppOptions::new(backend);
    options.jobs.reservations.write_events_reservations = true;
    options.configure = Box::new(move |c| {
        c.store.embedded_path = path;
        c.store.table_prefix = prefix;
        c.write_events_usage = true;
        c.usage_summary_interval_sec = 1;
    });
    let app = tests::app::spawn_app_with(options).await;
    app.seed("fw", 8).await;

    // New in this release: a reservation earmarks two sandboxes and serves one of them.
    let now = {
        use domain::Clock;
        app.clock.now()
    };
    let (status, _, created) = app
        .admin(reqwest::Method::POST, "/v1/admin/reservations")
        .json(&serde_json::json!({
            "track": "ws", "count": 2,
            "starts_at": (now + chrono::Duration::minutes(10)).to_rfc3339(),
            "ends_at": (now + chrono::Duration::minutes(120)).to_rfc3339(),
        }))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["reservation"]["earmarked"], 2, "{created}");
    let (status, _, reserved) = app
        .allocate("ws-student")
        .header("X-Instruqt-Track-ID", "ws")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reserved}");
    // Ordinary traffic the previous release knows: two allocations, one released.
    let mut ordinary = Vec::new();
    for caller in ["plain-1", "plain-2"] {
        let (status, _, body) = app.allocate(caller).sent_json().await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ordinary.push(body["sandbox_id"].as_str().unwrap_or_default().to_string());
    }
    let (status, _, body) = app
        .track(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{}/mark-for-deletion", ordinary[0]),
        )
        .header("X-Instruqt-Sandbox-ID", "plain-1")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // New in this release too: a refused request ends up in a usage summary event.
    let (status, _, body) = app
        .allocate("refused-1")
        .header("X-Sandbox-Name-Prefix", "no-such-prefix")
        .sent_json()
        .await;
    assert_eq!(
        (status, body["detail"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("UNKNOWN_PREFIX")),
        "{body}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !tests::history::all_events(app.state.broker.events().as_ref())
        .await
        .iter()
        .any(|e| e.event_type == "RefusalsSummarized")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no usage summary was written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The full reader's view has caught up with the whole log before the narrowed reader
    // compares with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let report = verify(
            app.state.broker.events().clone(),
            app.state.broker.view().clone(),
            Arc::new(EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("scratch: {e}"))),
            &RebuildOptions::default(),
            Arc::new(RebuildProgress::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("verify with the full reader: {e}"));
        if report.is_clean() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the full reader's view never caught up: {:#?}",
            report.differences
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;

    // The previous release's reader, in a process of its own (the event set is per process).
    let output = std::process::Command::new(
        std::env::current_exe().unwrap_or_else(|e| panic!("test binary: {e}")),
    )
    .args([
        "rolling_upgrade::previous_release_reader",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(PREVIOUS_READER_SPEC, spec.to_string())
    .output()
    .unwrap_or_else(|e| panic!("starting the previous-release reader: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the previous-release reader failed:\n{stdout}\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Embedded store: a reader knowing only the baseline's event set projects, verifies and serves
/// a log the current release wrote with reservations and usage summaries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_previous_release_reads_the_current_log() {
    previous_release_reads_the_current_log(Backend::Embedded).await;
}

/// DynamoDB Local: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamo_previous_release_reads_the_current_log() {
    previous_release_reads_the_current_log(Backend::Dynamo).await;
}

/// The reader built with the previous event set, run by
/// `*_previous_release_reads_the_current_log` in a process of its own against the store named in
/// `BROKER_TEST_PREVIOUS_READER_STORE`: the rebuild fails no batch and counts the new event types,
/// every row the new events do not touch equals the full reader's, the touched ones are held,
/// the command side refuses the held sandboxes and allocates every other available one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a process of its own, started by *_previous_release_reads_the_current_log"]
async fn previous_release_reader() {
    let spec: serde_json::Value = match std::env::var(PREVIOUS_READER_SPEC) {
        Ok(raw) => {
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{PREVIOUS_READER_SPEC}: {e}"))
        }
        Err(_) => panic!(
            "run by *_previous_release_reads_the_current_log, which sets {PREVIOUS_READER_SPEC}"
        ),
    };
    let event_set = baseline_event_types().unwrap_or_else(|e| panic!("reading the baseline: {e}"));
    assert!(!event_set.is_empty(), "the baseline names no event type");
    domain::model::reader::read_only(event_set.clone())
        .unwrap_or_else(|e| panic!("narrowing the reader: {e}"));
    println!(
        "reader event set: the event contract's baseline (docs/events/baseline/), {} types: {}",
        event_set.len(),
        event_set.join(", ")
    );
    let stores = runtime::open_stores(&store_args_of(&spec))
        .await
        .unwrap_or_else(|e| panic!("opening the store: {e:#}"));
    let (events, live) = (stores.events.clone(), stores.view.clone());
    let live_view: Arc<dyn domain::PoolView> = match (&stores.embedded, &stores.dynamo) {
        (Some(store), _) => Arc::new(store.clone()),
        (None, Some(store)) => Arc::new(store.clone()),
        (None, None) => panic!("no store opened"),
    };
    drop(live);

    // The projector's verify path: a rebuild by this reader compared with the full reader's view.
    let scratch =
        Arc::new(EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("scratch: {e}")));
    let report = verify(
        events.clone(),
        live_view.clone(),
        scratch.clone(),
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("a batch failed for the previous-release reader: {e}"));
    let counts = unknown::counts();
    println!(
        "rebuild: {} events read, {} applied; unknown events by type: {counts:?}",
        report.rebuild.events_read, report.rebuild.applied
    );
    for new_type in [
        "ReservationCreated",
        "SandboxReserved",
        "RefusalsSummarized",
    ] {
        assert!(
            counts.get(new_type).copied().unwrap_or(0) > 0,
            "{new_type} not counted: {counts:?}"
        );
    }
    assert!(
        counts.keys().all(|t| !event_set.contains(t)),
        "a baseline type was counted unknown: {counts:?}"
    );
    assert!(report.rebuild.events_read >= report.rebuild.applied);

    // Rows: equal to the full reader's, except the held ones (and only those).
    let rows = {
        use domain::store::ListFilter;
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = domain::PoolView::list(
                scratch.as_ref(),
                &ListFilter::default(),
                500,
                cursor.as_deref(),
            )
            .await
            .unwrap_or_else(|e| panic!("listing the narrowed view: {e}"));
            rows.extend(page.rows);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        rows
    };
    let held: std::collections::BTreeSet<String> = rows
        .iter()
        .filter(|r| r.held_by.is_some())
        .map(|r| r.sandbox_id.clone())
        .collect();
    println!("held by the previous-release reader: {held:?}");
    for row in &rows {
        println!(
            "  {} {} held_by={:?}",
            row.sandbox_id,
            row.status.as_str(),
            row.held_by
        );
    }
    assert!(!held.is_empty(), "the reservation's sandboxes must be held");
    for row in &rows {
        let stream = events
            .load(&format!("sandbox#{}", row.sandbox_id))
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", row.sandbox_id));
        let touched = stream.iter().any(|e| e.unknown().is_some());
        assert_eq!(
            row.held_by.is_some(),
            touched,
            "{}: held exactly when its stream holds an event of the new set",
            row.sandbox_id
        );
    }
    for drift in &report.differences {
        match drift {
            projector::rebuild::Drift::StatsDiffer { .. }
            | projector::rebuild::Drift::PrefixStatsDiffer { .. } => {}
            projector::rebuild::Drift::RowDiffers { sandbox_id, .. }
            | projector::rebuild::Drift::MissingRow { sandbox_id, .. }
            | projector::rebuild::Drift::UnexpectedRow { sandbox_id, .. } => assert!(
                held.contains(sandbox_id),
                "{sandbox_id} is not touched by a new event but differs from the full reader: {drift:?}"
            ),
            other => panic!("unexpected difference: {other:?}"),
        }
    }
    let compared = rows.len() - held.len();
    assert!(compared >= 5, "ordinary rows compared: {compared}");
    println!(
        "{} rows equal to the full reader's, {} held",
        compared,
        held.len()
    );

    // The command side: held sandboxes are refused, every other available one is allocated.
    let broker = domain::Broker::new(
        events.clone(),
        scratch.clone(),
        Arc::new(domain::SystemClock),
        domain::BrokerConfig::default(),
    );
    for id in &held {
        let refused = broker
            .execute(id, SandboxCommand::Restore, &newer_release())
            .await;
        assert!(
            matches!(
                refused,
                Err(BrokerError::Domain(
                    DomainError::WrittenByNewerRelease { .. }
                ))
            ),
            "{id}: {refused:?}"
        );
    }
    let available: std::collections::BTreeSet<String> = rows
        .iter()
        .filter(|r| r.held_by.is_none() && r.status == domain::SandboxStatus::Available)
        .map(|r| r.sandbox_id.clone())
        .collect();
    let mut allocated = std::collections::BTreeSet::new();
    for i in 0..rows.len() + 2 {
        let request = domain::AllocateRequest {
            caller: format!("previous-{i}"),
            ..Default::default()
        };
        match broker.allocate(&request, &newer_release()).await {
            Ok(allocation) => {
                allocated.insert(allocation.sandbox.sandbox_id);
            }
            Err(BrokerError::NoSandboxAvailable { .. }) => break,
            Err(e) => panic!("allocation {i} by the previous-release reader: {e}"),
        }
    }
    assert_eq!(
        allocated, available,
        "every available sandbox but the held ones"
    );
    println!("allocated by the previous-release reader: {allocated:?}");
}
