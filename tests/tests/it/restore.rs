//! The restore drill in code, on both stores: a log written through the HTTP API (allocations
//! with a track quota and the per-caller cap, releases, an extension) is exported, imported into
//! a fresh store, checked for cross-stream consistency, and served again by a new service whose
//! students replay their allocations from it. Also: the check finds planted inconsistencies, and
//! an import run twice (an interrupted restore) appends nothing the second time.

use std::sync::Arc;

use chrono::Utc;
use domain::audit::{audit_page, AuditQuery};
use domain::model::events::{BrokerEvent, ClaimEvent, QuotaEvent};
use domain::model::ids::{claim_stream, quota_stream, sandbox_stream};
use domain::restore::{check_log, import_envelopes, ImportOptions};
use domain::store::{EventFeed, EventStore};
use domain::{Actor, CommandMeta, EventEnvelope, SandboxStatus};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};
use tests::history::all_events;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(
    an_export_imported_into_a_fresh_store_serves_the_same_students,
    the_check_finds_what_a_broken_log_gets_wrong,
    every_log_an_earlier_release_wrote_is_served,
);

const TRACK: &str = "restore-track";

/// A fresh, empty store of `backend` and the settings that point a service at it.
struct Target {
    events: Arc<dyn EventStore>,
    configure: Box<dyn FnOnce(&mut command_api::config::Config) + Send>,
}

async fn fresh_target(backend: Backend) -> Target {
    let shards = command_api::config::Config::defaults().store.stats_shards;
    match backend {
        Backend::Embedded => {
            let path = std::env::temp_dir()
                .join(format!("broker-restore-{}", uuid::Uuid::new_v4()))
                .join("broker.db");
            let store = store_embedded::EmbeddedStore::open(&path, shards)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            Target {
                events: Arc::new(store),
                configure: Box::new(move |c| c.store.embedded_path = path),
            }
        }
        Backend::Dynamo => {
            let store = tests::ddb_local::fresh_store(shards).await;
            let prefix = store.table_prefix().to_string();
            Target {
                events: Arc::new(store),
                configure: Box::new(move |c| c.store.table_prefix = prefix),
            }
        }
    }
}

/// The whole log as `broker-audit export` writes it: the time-ordered feed, page by page.
async fn export(feed: &dyn EventFeed) -> Vec<EventEnvelope> {
    let mut query = AuditQuery::default();
    let mut out = Vec::new();
    loop {
        let page = audit_page(feed, &query, 100, Utc::now())
            .await
            .unwrap_or_else(|e| panic!("export: {e}"));
        out.extend(page.events);
        match page.cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return out,
        }
    }
}

/// Every event, in (stream, version) order: what two copies of one log must agree on.
async fn sorted_log(store: &dyn EventStore) -> Vec<Value> {
    let mut events = all_events(store).await;
    events.sort_by(|a, b| (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version)));
    events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect()
}

async fn allocate(app: &TestApp, caller: &str) -> Result<(StatusCode, Value), reqwest::Error> {
    allocate_in(app, caller, TRACK).await
}

async fn allocate_in(
    app: &TestApp,
    caller: &str,
    track: &str,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let resp = app
        .allocate(caller)
        .header("X-Instruqt-Track-ID", track)
        .send()
        .await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

fn quota_settings(c: &mut command_api::config::Config) {
    c.track_quotas = format!("{TRACK}=10");
    c.max_lab_extension_hours = 24;
}

/// Six students allocate (one track quota, the per-caller cap), two release, one extends; the
/// export of that log, imported into a fresh store, is the same log event for event, checks
/// consistent, and a service started on it answers each student's replay with their sandbox and
/// refuses a second one — the claims and quota came back with the events. Importing the same
/// export again appends nothing.
async fn an_export_imported_into_a_fresh_store_serves_the_same_students(
    backend: Backend,
) -> TestResult {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(quota_settings);
    let source = spawn_app_with(options).await;
    source.seed("rst", 8).await;
    let mut held = Vec::new();
    for n in 0..6 {
        let caller = format!("student-{n}");
        let (status, body) = allocate(&source, &caller).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        held.push((
            caller,
            body["sandbox_id"].as_str().unwrap_or("").to_string(),
        ));
    }
    for (caller, id) in &held[..2] {
        let resp = source
            .track(
                Method::POST,
                &format!("/v1/sandboxes/{id}/mark-for-deletion"),
            )
            .header("X-Instruqt-Sandbox-ID", caller)
            .send()
            .await?;
        assert!(resp.status().is_success(), "mark {id}: {}", resp.status());
    }
    let (caller, id) = &held[2];
    let resp = source
        .track(Method::POST, &format!("/v1/sandboxes/{id}/extend"))
        .header("X-Instruqt-Sandbox-ID", caller)
        .header("content-type", "application/json")
        .body("{\"hours\":2}")
        .send()
        .await?;
    assert!(resp.status().is_success(), "extend: {}", resp.status());

    let events = Arc::clone(source.state.broker.events());
    let before = check_log(Arc::clone(&events), 4, 100).await?;
    assert!(before.is_consistent(), "{:?}", before.problems);
    assert_eq!((before.allocated, before.live_claims), (4, 4));
    assert_eq!(before.track_quotas, 1, "{before:?}");

    let exported = export(source.state.feed.feed().as_ref()).await;
    let source_log = sorted_log(events.as_ref()).await;
    assert_eq!(
        exported.len(),
        source_log.len(),
        "the export holds every event"
    );
    source.stop().await;

    let target = fresh_target(backend).await;
    let report = import_envelopes(
        target.events.as_ref(),
        exported.iter().cloned().map(Ok),
        ImportOptions::default(),
        |_| {},
    )
    .await?;
    assert!(report.gaps.is_empty(), "{:?}", report.gaps);
    assert_eq!(report.appended, exported.len() as u64);
    assert_eq!(sorted_log(target.events.as_ref()).await, source_log);
    let after = check_log(Arc::clone(&target.events), 4, 100).await?;
    assert_eq!(after, before, "the restored log checks the same");

    // An interrupted restore is run again: everything is found present, nothing is appended.
    let again = import_envelopes(
        target.events.as_ref(),
        exported.iter().cloned().map(Ok),
        ImportOptions::default(),
        |_| {},
    )
    .await?;
    assert_eq!(
        (again.appended, again.already_present),
        (0, exported.len() as u64)
    );
    assert_eq!(sorted_log(target.events.as_ref()).await, source_log);

    // Rewired: a service on the restored store projects it and serves the same students.
    let mut options = AppOptions::new(backend);
    let point_at_target = target.configure;
    options.configure = Box::new(move |c| {
        quota_settings(c);
        point_at_target(c);
    });
    let restored = spawn_app_with(options).await;
    restored
        .wait_until(|s| s.get(SandboxStatus::Allocated) == 4 && s.total() == 8)
        .await;
    for (caller, id) in &held[2..] {
        let (status, body) = allocate(&restored, caller).await?;
        assert_eq!(status, StatusCode::OK, "replay of {caller}: {body}");
        assert_eq!(body["sandbox_id"].as_str(), Some(id.as_str()));
    }
    // A released student allocates afresh, from the two sandboxes never handed out.
    let (status, body) = allocate(&restored, &held[0].0).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let fresh = body["sandbox_id"].as_str().unwrap_or("");
    assert!(
        held.iter().all(|(_, id)| id != fresh),
        "{fresh} was handed out before"
    );
    restored.stop().await;
    Ok(())
}

/// A claim that holds a sandbox nobody allocated, a track-quota slot held by an available
/// sandbox, and a holder listed twice are each reported on their stream; the log of a healthy
/// service is not.
async fn the_check_finds_what_a_broken_log_gets_wrong(backend: Backend) -> TestResult {
    let target = fresh_target(backend).await;
    let meta = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    };
    let registered = {
        // A registered, available sandbox: borrow the real command path of a test app.
        let app = spawn_app_with(AppOptions::new(backend)).await;
        app.register("chk", 1).await;
        let events = all_events(app.state.broker.events().as_ref()).await;
        app.stop().await;
        events
    };
    target.events.append(registered).await?;
    let sandbox_id = "chk-id-0";
    assert!(check_log(Arc::clone(&target.events), 2, 100)
        .await?
        .is_consistent());

    let now = Utc::now();
    let claim = claim_stream("student-x", "student-x");
    let quota = quota_stream(TRACK);
    target
        .events
        .append(vec![
            EventEnvelope::new(
                &claim,
                1,
                &ClaimEvent::ClaimGranted {
                    caller: "student-x".into(),
                    idempotency_key: "student-x".into(),
                    sandbox_id: sandbox_id.into(),
                },
                &meta,
                now,
            ),
            EventEnvelope::new(
                &quota,
                1,
                &QuotaEvent::QuotaSlotTaken {
                    sandbox_id: sandbox_id.into(),
                    limit: 5,
                    holders: vec![sandbox_id.into(), sandbox_id.into()],
                },
                &meta,
                now,
            ),
        ])
        .await?;
    let report = check_log(Arc::clone(&target.events), 2, 100).await?;
    let on = |stream: &str| {
        report
            .problems
            .iter()
            .filter(|p| p.stream_id == stream)
            .map(|p| p.problem.clone())
            .collect::<Vec<_>>()
    };
    assert!(!report.is_consistent());
    assert_eq!(
        on(&claim),
        [format!("holds {sandbox_id}, which is available")]
    );
    let quota_problems = on(&quota);
    assert!(
        quota_problems.contains(&format!("lists {sandbox_id} twice")),
        "{quota_problems:?}"
    );
    assert!(
        quota_problems.contains(&format!(
            "a slot is held by {sandbox_id}, which is available"
        )),
        "{quota_problems:?}"
    );
    assert!(on(&sandbox_stream(sandbox_id)).is_empty());
    Ok(())
}

/// The logs earlier releases wrote (`tests/fixtures/logs/*.ndjson`, each an export of the restore
/// drill's log made with that release; docs/upgrades.md): this release imports each into a fresh
/// store, finds it consistent, projects it, and serves it — every student still holding a
/// sandbox gets that sandbox back on replay, and a new student gets a fresh one. A change that
/// stops this release reading an older log fails here.
async fn every_log_an_earlier_release_wrote_is_served(backend: Backend) -> TestResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/logs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "ndjson"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no logs in {}", dir.display());
    for file in files {
        let name = file.display().to_string();
        let log: Vec<EventEnvelope> = std::fs::read_to_string(&file)?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;

        // Who holds what at the end of the log, from its claim streams.
        let mut by_stream = log.clone();
        by_stream.sort_by(|a, b| (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version)));
        let mut holding = std::collections::BTreeMap::<String, (String, String)>::new();
        for envelope in &by_stream {
            match envelope.decode()? {
                BrokerEvent::Claim(ClaimEvent::ClaimGranted {
                    caller, sandbox_id, ..
                }) => {
                    holding.insert(envelope.stream_id.clone(), (caller, sandbox_id));
                }
                BrokerEvent::Claim(ClaimEvent::ClaimReleased { .. }) => {
                    holding.remove(&envelope.stream_id);
                }
                _ => {}
            }
        }
        let track = log
            .iter()
            .find_map(|e| match e.decode() {
                Ok(BrokerEvent::Sandbox(
                    domain::model::events::SandboxEvent::SandboxAllocated {
                        track_name: Some(track),
                        ..
                    },
                )) => Some(track),
                _ => None,
            })
            .ok_or_else(|| format!("{name}: no allocation with a track"))?;
        let last = log
            .iter()
            .map(|e| e.occurred_at)
            .max()
            .ok_or_else(|| format!("{name} is empty"))?;

        let target = fresh_target(backend).await;
        let report = import_envelopes(
            target.events.as_ref(),
            log.iter().cloned().map(Ok),
            ImportOptions::default(),
            |_| {},
        )
        .await?;
        assert!(report.gaps.is_empty(), "{name}: {:?}", report.gaps);
        let check = check_log(Arc::clone(&target.events), 2, 100).await?;
        assert!(check.is_consistent(), "{name}: {:?}", check.problems);
        assert_eq!(check.unknown_events, 0, "{name}");
        assert_eq!(check.live_claims, holding.len() as u64, "{name}");

        let mut options = AppOptions::new(backend);
        let point_at_target = target.configure;
        let quota = format!("{track}={}", holding.len() + 2);
        options.configure = Box::new(move |c| {
            c.track_quotas = quota;
            point_at_target(c);
        });
        let app = spawn_app_with(options).await;
        // The log's own time, so that no lab in it has ended yet.
        app.clock.set(last + chrono::Duration::minutes(1));
        let (allocated, total) = (check.allocated as i64, check.sandboxes as i64);
        app.wait_until(|s| s.get(SandboxStatus::Allocated) == allocated && s.total() == total)
            .await;
        for (caller, sandbox_id) in holding.values() {
            let (status, body) = allocate_in(&app, caller, &track).await?;
            assert_eq!(status, StatusCode::OK, "{name}: replay of {caller}: {body}");
            assert_eq!(
                body["sandbox_id"].as_str(),
                Some(sandbox_id.as_str()),
                "{name}"
            );
        }
        let (status, body) = allocate_in(&app, "a-student-of-this-release", &track).await?;
        assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        app.stop().await;
    }
    Ok(())
}
