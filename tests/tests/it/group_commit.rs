//! Group commit of allocations on DynamoDB Local (ADR 0025), with conflicts forced inside the
//! groups: concurrent allocations are written in fewer transactions than allocations, a member
//! that loses its sandbox fails alone (the cancellation reasons name it), the members that took
//! the quota after it are decided again, and the replayed history holds every promise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use domain::model::events::{BrokerEvent, QuotaEvent};
use domain::{Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta};
use futures::StreamExt;
use reqwest::StatusCode;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};
use tests::history::{all_events, AllocationAudit};

const TRACK: &str = "workshop";

/// Sends `callers` to `POST /v1/allocate` for the workshop track, all at once; returns
/// (caller, status, sandbox).
async fn burst(app: &TestApp, callers: &[String]) -> Vec<(String, StatusCode, Option<String>)> {
    futures::stream::iter(callers.iter().cloned())
        .map(|caller| {
            let request = app
                .allocate(&caller)
                .header("X-Instruqt-Track-ID", TRACK)
                .header("X-Sandbox-Name-Prefix", "lab");
            async move {
                let response = request.sent().await;
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let sandbox = body["sandbox_id"].as_str().map(str::to_string);
                (caller, status, sandbox)
            }
        })
        .buffer_unordered(callers.len().max(1))
        .collect()
        .await
}

/// The replayed history: no sandbox allocated twice, no caller holding two; the quota stream's
/// versions run on from 1 and its last event holds exactly the allocated sandboxes. Returns the
/// number of allocations.
async fn assert_history(app: &TestApp) -> usize {
    let events = all_events(app.state.broker.events().as_ref()).await;
    let audit = AllocationAudit::replay(&events);
    assert!(
        audit.double_allocations().is_empty(),
        "allocated twice: {:?}",
        audit.double_allocations()
    );
    assert!(
        audit.callers_holding_two().is_empty(),
        "callers holding two: {:?}",
        audit.callers_holding_two()
    );
    let quota: Vec<_> = events
        .iter()
        .filter(|e| e.stream_id == format!("quota#{TRACK}"))
        .collect();
    let versions: Vec<u64> = quota.iter().map(|e| e.version).collect();
    let expected: Vec<u64> = (1..=quota.len() as u64).collect();
    assert_eq!(versions, expected, "the quota stream's versions run on");
    let holders: BTreeSet<String> = match quota.last().map(|e| e.decode()) {
        Some(Ok(BrokerEvent::Quota(QuotaEvent::QuotaSlotTaken { holders, .. }))) => {
            holders.into_iter().collect()
        }
        other => panic!("the quota stream ends with {other:?}"),
    };
    let allocated: BTreeSet<String> = audit.allocations.keys().cloned().collect();
    assert_eq!(
        holders, allocated,
        "the quota holds exactly the allocated sandboxes"
    );
    audit.allocations.len()
}

/// A service on DynamoDB Local with the workshop track's quota and the projector stopped:
/// candidates another process took stay "available" in the view until a conflict repairs them.
async fn frozen_view_app(quota: u32) -> TestApp {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(move |config| {
        config.run_projector = Some(false);
        config.read_repair = true;
        config.track_quotas = format!("{TRACK}={quota}");
    });
    spawn_app_with(options).await
}

/// Two processes on one table set: the second takes 20 sandboxes behind the first one's stale
/// view, then 45 requests (40 students, 5 of them twice) reach the first at once. Its groups hold
/// members racing for those 20 sandboxes and for the duplicates' claims, and all of them take the
/// track's one quota stream: DynamoDB cancels those groups, the members that lost are answered
/// alone (next candidate, or the claim read again), and the rest are written again at once.
/// Exactly the quota's 50 allocations exist in the end, none twice, no student is answered with
/// two sandboxes, the quota stream holds exactly them, and conflicts were in fact met inside
/// groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_inside_groups_are_answered_member_by_member() {
    const POOL: usize = 60;
    let app = frozen_view_app(50).await;
    let ids = app.register("lab", POOL).await;
    app.repair(&ids).await;

    // Another process, with the same quota, allocates 20 behind the first one's back.
    let other = Broker::new(
        app.state.broker.events().clone(),
        app.state.broker.view().clone(),
        Arc::new(app.clock.clone()),
        BrokerConfig {
            quotas: domain::service::TrackQuotas::parse(&format!("{TRACK}=50"), None)
                .unwrap_or_else(|e| panic!("{e}")),
            ..BrokerConfig::default()
        },
    );
    let meta = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    };
    let requests: Vec<AllocateRequest> = (0..20)
        .map(|i| AllocateRequest {
            caller: format!("other-{i}"),
            track_name: Some(TRACK.into()),
            name_prefix: Some("lab".into()),
            ..AllocateRequest::default()
        })
        .collect();
    let taken = futures::future::join_all(requests.iter().map(|r| other.allocate(r, &meta))).await;
    assert!(taken.iter().all(Result::is_ok), "{taken:?}");

    let mut callers: Vec<String> = (0..40).map(|i| format!("student-{i}")).collect();
    callers.extend((0..5).map(|i| format!("student-{i}")));
    let results = burst(&app, &callers).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut got: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (caller, status, sandbox) in &results {
        *by_status.entry(status.as_u16()).or_default() += 1;
        assert!(
            [
                StatusCode::CREATED,
                StatusCode::OK,
                StatusCode::TOO_MANY_REQUESTS
            ]
            .contains(status),
            "{caller}: {status}"
        );
        if let Some(sandbox) = sandbox {
            got.entry(caller).or_default().insert(sandbox);
        }
    }
    for (caller, sandboxes) in &got {
        assert_eq!(sandboxes.len(), 1, "{caller} was answered {sandboxes:?}");
    }
    assert_eq!(
        by_status.get(&201).copied(),
        Some(30),
        "the quota's 30 remaining slots: {by_status:?}"
    );
    assert_eq!(assert_history(&app).await, 50);

    let conflicts = app.metric("broker_store_transaction_cancellations_total{op=\"TransactWriteItems\",reason=\"ConditionalCheckFailed\",target=\"events\"}",
    )
    .await;
    let groups = app.metric("broker_allocate_groups_total").await;
    let members = app.metric("broker_allocate_group_members_total").await;
    let redecided = app.metric("broker_allocate_group_redecided_total").await;
    println!(
        "statuses {by_status:?}; groups {groups}, members {members}, decided again {redecided}, cancelled by a failed condition {conflicts}"
    );
    assert!(conflicts >= 1.0, "no group met a conflict");
    assert!(
        groups >= 1.0 && groups < members,
        "groups {groups}, members {members}"
    );
    app.stop().await;
}

/// The workshop burst: 120 students of one track with a quota of 100 at once, through the API on
/// DynamoDB Local. Exactly 100 are granted and 20 refused by the quota; the quota stream moves
/// once per grant, in consecutive versions holding exactly the granted sandboxes; and the grants
/// took fewer event transactions than allocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workshop_burst_moves_one_quota_in_few_transactions() {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(|config| {
        config.track_quotas = format!("{TRACK}=100");
    });
    let app = spawn_app_with(options).await;
    app.seed("lab", 150).await;
    let transactions = "broker_store_requests_total{op=\"TransactWriteItems\",target=\"events\"}";
    let before = app.metric(transactions).await;
    let callers: Vec<String> = (0..120).map(|i| format!("student-{i}")).collect();
    let results = burst(&app, &callers).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (_, status, _) in &results {
        *by_status.entry(status.as_u16()).or_default() += 1;
    }
    assert_eq!(by_status.get(&201).copied(), Some(100), "{by_status:?}");
    assert_eq!(by_status.get(&429).copied(), Some(20), "{by_status:?}");
    assert_eq!(assert_history(&app).await, 100);
    let sent = app.metric(transactions).await - before;
    println!("statuses {by_status:?}; event transactions for 100 grants: {sent}");
    assert!(sent < 100.0, "{sent} event transactions for 100 grants");
    app.stop().await;
}
