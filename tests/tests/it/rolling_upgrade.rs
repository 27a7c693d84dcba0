//! Rolling upgrades (ADR 0023, docs/upgrades.md): this release reading a log that a newer
//! release wrote — an event type it does not know, with a newer schema version, on a sandbox
//! stream, and a stream kind it does not know. It stands in for "the previous release's
//! binaries read the current release's log": events of a kind no release writes yet (a sandbox
//! relabelling with a newer schema, a maintenance-window stream), written straight into the
//! event store.
//!
//! On both stores, the projector keeps going (later events apply, the new sandbox appears), the
//! unknown events are counted, the sandbox whose stream holds one is held out of allocation
//! while every other one is allocated, the command side refuses to act on it, the audit history
//! still shows the new events, and a verify of the view against a replay reports no drift.

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
