//! The allocation properties under concurrency, proven by replaying the event history, on both
//! store adapters: 500 concurrent requests — 400 callers once plus 50 callers twice (450
//! distinct callers) — against a pool of 400.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::StatusCode;
use tests::app::{spawn_app, Backend};
use tests::history::{all_events, AllocationAudit};

async fn run(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("lab", 400).await;
    let mut callers: Vec<String> = (0..400).map(|i| format!("single-{i}")).collect();
    for i in 0..50 {
        callers.push(format!("double-{i}"));
        callers.push(format!("double-{i}"));
    }
    let requests = callers.iter().map(|caller| {
        let req = app.allocate(caller).header("X-Sandbox-Name-Prefix", "lab");
        let caller = caller.clone();
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            (
                caller,
                status,
                body["sandbox_id"].as_str().map(str::to_string),
            )
        }
    });
    let results = futures::future::join_all(requests).await;

    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (caller, status, sandbox) in &results {
        *by_status.entry(status.as_u16()).or_default() += 1;
        assert!(
            [StatusCode::CREATED, StatusCode::OK, StatusCode::CONFLICT].contains(status),
            "unexpected {status}"
        );
        if let Some(id) = sandbox {
            got.entry(caller.clone()).or_default().insert(id.clone());
        }
    }
    // Each caller (duplicated ones included) got at most one sandbox.
    for (caller, held) in &got {
        assert_eq!(held.len(), 1, "{caller} got {held:?}");
    }
    // Every sandbox went to exactly one caller, and the pool was used up.
    let handed_out: BTreeSet<&String> = got.values().flatten().collect();
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

    // The history is the proof: replay it.
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
    assert_eq!(audit.allocations.len(), 400);
    println!("{backend:?}: statuses {by_status:?}");
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
