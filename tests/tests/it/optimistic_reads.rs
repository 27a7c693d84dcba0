//! Allocations that assume a fresh caller's claim empty (ADR 0037), through the API on both
//! stores, with the assumption forced wrong inside one burst: duplicates of live allocations,
//! callers whose earlier allocation ended, and one caller sending the same request twice at
//! once. Every one gets the answer a strong read gives, and the replayed history holds.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use tests::app::{spawn_app, Backend, Sent, TestApp};
use tests::history::{all_events, AllocationAudit};

/// POST /v1/allocate as `caller` with `key`: (status, sandbox id).
async fn allocate(app: &TestApp, caller: &str, key: &str) -> (StatusCode, Option<String>) {
    let (status, _, body) = app
        .allocate(caller)
        .header("Idempotency-Key", key)
        .sent_json()
        .await;
    (status, body["sandbox_id"].as_str().map(str::to_string))
}

/// In one burst: duplicates of three live allocations are replayed with their sandboxes (200),
/// three callers whose allocation ended get a new sandbox (201), one caller's two identical
/// requests get one sandbox between them, and ten fresh callers get their own. No sandbox is
/// allocated twice and no caller holds two.
async fn wrong_assumptions_get_strong_answers(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("lab", 40).await;
    let mut live: BTreeMap<String, String> = BTreeMap::new();
    let mut ended: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..6 {
        let caller = format!("earlier-{i}");
        let (status, sandbox) = allocate(&app, &caller, "lab-1").await;
        assert_eq!(status, StatusCode::CREATED, "{caller}");
        let sandbox = sandbox.unwrap_or_else(|| panic!("{caller}: no sandbox id"));
        if i < 3 {
            live.insert(caller, sandbox);
        } else {
            let (status, _, body) = app
                .track(
                    Method::POST,
                    &format!("/v1/sandboxes/{sandbox}/mark-for-deletion"),
                )
                .header("X-Instruqt-Sandbox-ID", &caller)
                .sent_json()
                .await;
            assert_eq!(status, StatusCode::OK, "{caller}: {body}");
            ended.insert(caller, sandbox);
        }
    }
    let mut burst: Vec<String> = live.keys().chain(ended.keys()).cloned().collect();
    burst.extend(["twice".to_string(), "twice".to_string()]);
    burst.extend((0..10).map(|i| format!("fresh-{i}")));
    let transactions_before = app
        .metric("broker_store_requests_total{op=\"TransactWriteItems\",target=\"events\"}")
        .await;
    let answers: Vec<(String, StatusCode, Option<String>)> = futures::stream::iter(burst)
        .map(|caller| {
            let app = &app;
            async move {
                let (status, sandbox) = allocate(app, &caller, "lab-1").await;
                (caller, status, sandbox)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut twice: Vec<(StatusCode, Option<String>)> = Vec::new();
    for (caller, status, sandbox) in &answers {
        if let Some(held) = live.get(caller) {
            assert_eq!(*status, StatusCode::OK, "{caller} replays");
            assert_eq!(sandbox.as_ref(), Some(held), "{caller} replays its sandbox");
        } else if let Some(old) = ended.get(caller) {
            assert_eq!(*status, StatusCode::CREATED, "{caller} is allocated again");
            assert!(
                sandbox.is_some() && sandbox.as_ref() != Some(old),
                "{caller}"
            );
        } else if caller == "twice" {
            twice.push((*status, sandbox.clone()));
        } else {
            assert_eq!(*status, StatusCode::CREATED, "{caller}");
        }
    }
    let statuses: BTreeSet<u16> = twice.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(
        statuses,
        BTreeSet::from([200, 201]),
        "one grant, one replay"
    );
    assert!(
        twice[0].1.is_some() && twice[0].1 == twice[1].1,
        "{twice:?}"
    );
    let events = all_events(app.state.broker.events().as_ref()).await;
    let audit = AllocationAudit::replay(&events);
    assert!(audit.double_allocations().is_empty(), "allocated twice");
    assert!(audit.callers_holding_two().is_empty(), "a caller holds two");
    assert_eq!(audit.allocations.len(), 6 + 3 + 1 + 10);
    if backend == Backend::Dynamo {
        let sent = app
            .metric("broker_store_requests_total{op=\"TransactWriteItems\",target=\"events\"}")
            .await
            - transactions_before;
        println!("event transactions for the burst of 19 requests: {sent}");
    }
    app.stop().await;
}

/// A burst of fresh callers on DynamoDB Local reads no claim stream: the event table's `Query`
/// requests during it stay well below one per allocation (each would read its claim before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_callers_read_no_claim_on_dynamodb() {
    let app = spawn_app(Backend::Dynamo).await;
    app.seed("lab", 60).await;
    let queries = "broker_store_requests_total{op=\"Query\",target=\"events\"}";
    let before = app.metric(queries).await;
    let answers: Vec<StatusCode> = futures::stream::iter(0..50)
        .map(|i| {
            let app = &app;
            async move { allocate(app, &format!("student-{i}"), "lab-1").await.0 }
        })
        .buffer_unordered(25)
        .collect()
        .await;
    assert!(
        answers.iter().all(|s| *s == StatusCode::CREATED),
        "{answers:?}"
    );
    let read = app.metric(queries).await - before;
    println!("event-table queries for 50 allocations: {read}");
    assert!(read < 25.0, "{read} event-table queries for 50 allocations");
    app.stop().await;
}

both_stores!(panics: wrong_assumptions_get_strong_answers);
