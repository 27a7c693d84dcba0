//! The view heals itself: a row whose stream records never reached the projector (dropped,
//! discarded to a DLQ) or that was corrupted is repaired by the next command that touches it or
//! by `verify --repair`, and cleanup then still deletes a sandbox whose `DeletionRequested` record
//! was lost.

use std::sync::Arc;

use domain::model::sandbox::SandboxCommand;
use domain::store::{repair_row, PoolView, ViewStore};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, BrokerError, CommandMeta, ManualClock,
    SandboxStatus, StatsDelta,
};
use projector::rebuild::{verify, DriftReport, RebuildOptions, RebuildProgress};
use projector::repair::repair_drift;
use reqwest::Method;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

/// An app whose projector never runs: every event after the seed is a "dropped record" for the view.
async fn app_without_projector(backend: Backend) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|config| {
        config.run_projector = Some(false);
        config.read_repair = true;
    });
    spawn_app_with(options).await
}

fn live_view(app: &TestApp) -> Arc<dyn ViewStore> {
    app.state
        .broker
        .repair_store()
        .unwrap_or_else(|| panic!("read repair is off"))
}

async fn verify_view(app: &TestApp) -> DriftReport {
    let live = live_view(app);
    let live_pool: Arc<dyn PoolView> = live.clone();
    let scratch = Arc::new(EmbeddedStore::open_in_memory(4).expect("in-memory embedded store"));
    verify(
        app.state.broker.events().clone(),
        live_pool,
        scratch,
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("verify: {e}"))
}

async fn history_types(app: &TestApp, sandbox_id: &str) -> Vec<String> {
    app.state
        .broker
        .history(sandbox_id)
        .await
        .expect("load the history")
        .into_iter()
        .map(|e| e.event_type)
        .collect()
}

async fn post_json(req: reqwest::RequestBuilder) -> serde_json::Value {
    let resp = req.sent().await;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert!(status.is_success(), "{status}: {body}");
    body
}

async fn lost_deletion_request_is_repaired_and_cleaned(backend: Backend) {
    let app = app_without_projector(backend).await;
    let ids = app.register("lab", 2).await;
    app.repair(&ids).await;

    let allocated = post_json(app.allocate("student-1")).await;
    let sandbox_id = allocated["sandbox_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{allocated}"))
        .to_string();
    post_json(
        app.track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "student-1"),
    )
    .await;
    // The view never heard of either event: cleanup cannot find the sandbox.
    post_json(app.admin(Method::POST, "/v1/admin/cleanup")).await;
    assert!(!history_types(&app, &sandbox_id)
        .await
        .contains(&"SandboxDeleted".to_string()));

    let report = verify_view(&app).await;
    assert!(!report.is_clean(), "the lost records must show as drift");
    let summary = repair_drift(app.state.broker.events().clone(), live_view(&app), &report)
        .await
        .unwrap_or_else(|e| panic!("repair: {e}"));
    assert_eq!(summary.rows_caught_up, 1, "{summary:?}");
    assert!(summary.left.is_empty(), "{summary:?}");
    let after = verify_view(&app).await;
    assert!(after.is_clean(), "{:?}", after.differences);

    // Cleanup now finds the pending deletion and the CSP account is deleted.
    let cleaned = post_json(app.admin(Method::POST, "/v1/admin/cleanup")).await;
    assert!(
        history_types(&app, &sandbox_id)
            .await
            .contains(&"SandboxDeleted".to_string()),
        "cleanup: {cleaned}"
    );
    app.stop().await;
}

/// Embedded: a lost `SandboxAllocated` + `DeletionRequested` pair is found by verify, repaired,
/// and the sandbox is then deleted by cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_deletion_request_is_repaired_and_cleaned_embedded() {
    lost_deletion_request_is_repaired_and_cleaned(Backend::Embedded).await;
}

/// DynamoDB Local: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_deletion_request_is_repaired_and_cleaned_dynamodb() {
    lost_deletion_request_is_repaired_and_cleaned(Backend::Dynamo).await;
}

/// A row rewritten with the wrong status at its own version (stats untouched) is reported by
/// verify and rewritten from the events by `verify --repair`; counters end equal to the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_row_is_rewritten_by_verify_repair() {
    let app = app_without_projector(Backend::Embedded).await;
    let ids = app.register("lab", 3).await;
    app.repair(&ids).await;
    let live = live_view(&app);
    let mut row = live
        .load_row(&ids[0])
        .await
        .expect("load the row")
        .unwrap_or_else(|| panic!("no row"));
    row.status = SandboxStatus::Deleted;
    live.write_row(Some(row.version), &row, &StatsDelta::default())
        .await
        .expect("write the stale row");

    let report = verify_view(&app).await;
    assert!(!report.is_clean());
    let summary = repair_drift(app.state.broker.events().clone(), live.clone(), &report)
        .await
        .unwrap_or_else(|e| panic!("repair: {e}"));
    assert_eq!(summary.rows_rewritten, 1, "{summary:?}");
    let after = verify_view(&app).await;
    assert!(after.is_clean(), "{:?}", after.differences);
    assert_eq!(app.stats().await.get(SandboxStatus::Available), 3);
    app.stop().await;
}

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("self-healing".into()),
    }
}

/// The next allocation that touches a stale row repairs it: a second broker (another API
/// instance, with no memory of what the first took) loses its conditional write on the row the
/// view wrongly shows as available, answers 409 for want of any other, and the row converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_touching_a_stale_row_repairs_it() {
    let store = Arc::new(EmbeddedStore::open_in_memory(4).expect("in-memory embedded store"));
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let view: Arc<dyn PoolView> = store.clone();
    let instance = |repair: bool| {
        let broker = Broker::new(
            store.clone(),
            view.clone(),
            clock.clone(),
            BrokerConfig::default(),
        );
        if repair {
            broker.with_read_repair(store.clone())
        } else {
            broker
        }
    };
    let first = instance(false);
    let id = "lab-id-0".to_string();
    first
        .execute(
            &id,
            SandboxCommand::Register {
                sandbox_id: id.clone(),
                name: "lab-0000".into(),
                external_id: "identity/accounts/0".into(),
                sfdc_account_id: None,
                csp_created_at: None,
            },
            &meta(),
        )
        .await
        .expect("append the registration");
    repair_row(store.as_ref(), store.as_ref(), &id)
        .await
        .expect("project the registration");
    let request = |caller: &str| AllocateRequest {
        caller: caller.into(),
        ..AllocateRequest::default()
    };
    first
        .allocate(&request("student-1"), &meta())
        .await
        .expect("allocate");
    let stale = store.get(&id).await.expect("read the row");
    assert_eq!(
        stale.map(|r| r.status),
        Some(SandboxStatus::Available),
        "no projector ran, so the view must still be stale"
    );

    let second = instance(true);
    let refused = second.allocate(&request("student-2"), &meta()).await;
    assert!(
        matches!(refused, Err(BrokerError::NoSandboxAvailable { .. })),
        "{refused:?}"
    );
    // The repair runs in the background and counts itself after its write lands: wait for both
    // with a deadline.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let row = store.get(&id).await.expect("read the row");
        let repaired = second.repaired_rows();
        if row.as_ref().map(|r| r.status) == Some(SandboxStatus::Allocated) && repaired >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "row not repaired (repairs counted: {repaired}): {row:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
