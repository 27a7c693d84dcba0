//! The allocation properties under concurrency, proven by replaying the event history, on both
//! store adapters:
//! * 500 concurrent requests — 400 callers once plus 50 callers twice (450 distinct callers) —
//!   against a pool of 400, with the projector running;
//! * a pool of P with P + X distinct callers at concurrency 100 while the projector is stopped
//!   (the view never catches up by itself): exactly P × 201 and X × 409;
//! * a replay never returns an allocation that ended between the claim read and the sandbox read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use domain::model::ids::sandbox_id_of;
use domain::store::{PoolView, StoreError};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, ManualClock, SandboxStatus,
};
use futures::StreamExt;
use reqwest::StatusCode;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app, spawn_app_with, AppOptions, Backend, Sent, TestApp};
use tests::history::{all_events, AllocationAudit};
use tests::intercepted::{InterceptedStore, StoreHook, StreamRead};

/// Outcome of one allocate request: caller, status, sandbox id (201/200 only).
type Answer = (String, StatusCode, Option<String>);

/// Sends one allocate request per entry of `callers` (prefix `lab`), `concurrency` at a time.
async fn burst(app: &TestApp, callers: &[String], concurrency: usize) -> Vec<Answer> {
    futures::stream::iter(callers.iter().cloned())
        .map(|caller| {
            let req = app.allocate(&caller).header("X-Sandbox-Name-Prefix", "lab");
            async move {
                let resp = req.sent().await;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                assert!(
                    [StatusCode::CREATED, StatusCode::OK, StatusCode::CONFLICT].contains(&status),
                    "unexpected {status}: {body}"
                );
                let sandbox = body["sandbox_id"].as_str().map(str::to_string);
                (caller, status, sandbox)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Counts answers by status, and checks that no caller got two sandboxes and no sandbox went
/// to two callers; returns (by status, sandboxes handed out).
fn tally(results: &[Answer]) -> (BTreeMap<u16, usize>, BTreeSet<String>) {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (caller, status, sandbox) in results {
        *by_status.entry(status.as_u16()).or_default() += 1;
        if let Some(id) = sandbox {
            got.entry(caller.clone()).or_default().insert(id.clone());
            owners.entry(id.clone()).or_default().insert(caller.clone());
        }
    }
    for (caller, held) in &got {
        assert_eq!(held.len(), 1, "{caller} got {held:?}");
    }
    for (sandbox, callers) in &owners {
        assert_eq!(callers.len(), 1, "{sandbox} went to {callers:?}");
    }
    (by_status, owners.into_keys().collect())
}

/// Replays the whole history: no sandbox allocated twice, no caller holding two, `expected`
/// allocations in all.
async fn assert_history(app: &TestApp, expected: usize) {
    let events = all_events(app.state.broker.events().as_ref()).await;
    let audit = AllocationAudit::replay(&events);
    assert!(
        audit.double_allocations().is_empty(),
        "allocated twice: {:?}",
        audit.double_allocations()
    );
    assert!(
        audit.callers_holding_two().is_empty(),
        "callers with two: {:?}",
        audit.callers_holding_two()
    );
    assert_eq!(audit.allocations.len(), expected);
}

async fn run(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("lab", 400).await;
    let mut callers: Vec<String> = (0..400).map(|i| format!("single-{i}")).collect();
    for i in 0..50 {
        callers.push(format!("double-{i}"));
        callers.push(format!("double-{i}"));
    }
    let results = burst(&app, &callers, callers.len()).await;
    let (by_status, handed_out) = tally(&results);
    // Every sandbox went to exactly one caller, and the pool was used up.
    assert_eq!(handed_out.len(), 400, "statuses: {by_status:?}");
    assert_eq!(
        by_status.get(&201).copied().unwrap_or(0),
        400,
        "statuses: {by_status:?}"
    );
    assert_eq!(
        by_status.get(&409).copied().unwrap_or(0) + by_status.get(&200).copied().unwrap_or(0),
        100,
        "the rest are 409 (or replays of a duplicate's own allocation): {by_status:?}"
    );
    assert_history(&app, 400).await;
    println!("{backend:?}: statuses {by_status:?}");
    app.stop().await;
}

/// With the projector stopped, the view keeps showing every sandbox as available for the whole
/// burst (only read repair of lost candidates moves it): exactly `pool` × 201 and `extra` × 409.
async fn run_with_stale_view(backend: Backend, pool: usize, extra: usize) {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|config| {
        config.run_projector = Some(false);
        config.read_repair = true;
    });
    let app = spawn_app_with(options).await;
    let ids = app.register("lab", pool).await;
    app.repair(&ids).await;
    assert_eq!(app.stats().await.get(SandboxStatus::Available), pool as i64);

    let callers: Vec<String> = (0..pool + extra).map(|i| format!("student-{i}")).collect();
    let results = burst(&app, &callers, 100).await;
    let (by_status, handed_out) = tally(&results);
    assert_eq!(
        by_status.get(&201).copied().unwrap_or(0),
        pool,
        "statuses: {by_status:?}"
    );
    assert_eq!(
        by_status.get(&409).copied().unwrap_or(0),
        extra,
        "statuses: {by_status:?}"
    );
    assert_eq!(handed_out.len(), pool);
    assert_history(&app, pool).await;

    // The view converges on the history once every row is brought up to its stream.
    app.repair(&ids).await;
    let stats = app.stats().await;
    assert_eq!(
        stats.get(SandboxStatus::Allocated),
        pool as i64,
        "{stats:?}"
    );
    assert_eq!(stats.get(SandboxStatus::Available), 0, "{stats:?}");
    println!("{backend:?} stale view: statuses {by_status:?}");
    app.stop().await;
}

/// Embedded store: exactly 400 allocations, none twice, one per caller, the rest 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_allocations_embedded() {
    run(Backend::Embedded).await;
}

/// DynamoDB Local: the same property with real conditional transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_allocations_dynamodb() {
    run(Backend::Dynamo).await;
}

/// Embedded store, projector stopped: a pool of 400 and 500 students at C=100 → 400 × 201, 100 × 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_view_never_causes_a_false_409_embedded() {
    run_with_stale_view(Backend::Embedded, 400, 100).await;
}

/// DynamoDB Local, projector stopped: a pool of 200 and 260 students at C=100 → 200 × 201, 60 × 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_view_never_causes_a_false_409_dynamodb() {
    run_with_stale_view(Backend::Dynamo, 200, 60).await;
}

/// A hook that, once armed, ends an allocation (through a second broker) right before the next
/// sandbox stream is read: the interleaving "claim read → mark-for-deletion commits → sandbox
/// read" that a replay must survive.
struct EndsAllocationBeforeSandboxRead {
    armed: AtomicBool,
    caller: String,
    other: OnceLock<Arc<Broker>>,
}

#[async_trait]
impl StoreHook for EndsAllocationBeforeSandboxRead {
    async fn before_read(&self, stream_id: &str, read: StreamRead) -> Result<(), StoreError> {
        // Only whole-stream loads: that is how the allocation reads a sandbox it replays.
        if !matches!(read, StreamRead::After(_)) {
            return Ok(());
        }
        if let Some(sandbox_id) = sandbox_id_of(stream_id) {
            if self.armed.swap(false, Ordering::SeqCst) {
                if let Some(other) = self.other.get() {
                    other
                        .mark_for_deletion(sandbox_id, &self.caller, &meta())
                        .await
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                }
            }
        }
        Ok(())
    }
}

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("interleaving".into()),
    }
}

/// A replay whose allocation is ended between the claim read and the sandbox read re-reads the
/// claim and allocates afresh; it never returns 200 with a sandbox that is no longer the caller's.
#[tokio::test]
async fn replay_never_returns_an_ended_allocation() {
    let store = Arc::new(EmbeddedStore::open_in_memory(4).expect("in-memory embedded store"));
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let view: Arc<dyn PoolView> = store.clone();
    let direct = Arc::new(Broker::new(
        store.clone(),
        view.clone(),
        clock.clone(),
        BrokerConfig::default(),
    ));
    tests::pool::register_projected(&direct, store.as_ref(), store.as_ref(), 2, &meta()).await;
    let interleaving = Arc::new(InterceptedStore::with_hook(
        store.clone(),
        EndsAllocationBeforeSandboxRead {
            armed: AtomicBool::new(false),
            caller: "student".into(),
            other: OnceLock::new(),
        },
    ));
    let _ = interleaving.hook().other.set(direct.clone());
    let broker = Broker::new(interleaving.clone(), view, clock, BrokerConfig::default());
    let request = AllocateRequest {
        caller: "student".into(),
        ..AllocateRequest::default()
    };
    let first = broker
        .allocate(&request, &meta())
        .await
        .expect("first allocation");
    assert!(!first.replayed);

    interleaving.hook().armed.store(true, Ordering::SeqCst);
    let second = broker
        .allocate(&request, &meta())
        .await
        .expect("second allocation");
    assert!(
        !interleaving.hook().armed.load(Ordering::SeqCst),
        "the interleaving was not forced"
    );
    let ended = direct
        .load_sandbox(&first.sandbox.sandbox_id)
        .await
        .expect("load the sandbox")
        .sandbox;
    assert_eq!(ended.status, Some(SandboxStatus::PendingDeletion));
    assert!(
        !second.replayed,
        "a replay returned the ended allocation of {}",
        first.sandbox.sandbox_id
    );
    assert_ne!(second.sandbox.sandbox_id, first.sandbox.sandbox_id);
    assert_eq!(second.sandbox.status, Some(SandboxStatus::Allocated));
}
