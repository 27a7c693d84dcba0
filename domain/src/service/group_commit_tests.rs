//! Group commit of allocations (ADR 0025) on an in-memory store that writes groups the way the
//! DynamoDB adapter does (member by member, continuations stored only together): fewer writes
//! than allocations, quotas taken in order inside a group, a conflicting member that fails
//! alone, and unknown outcomes settled member by member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use super::fault_store::{AppendFault, FaultStore};
use super::{AllocateRequest, Allocation, Broker, BrokerConfig, BrokerError, TrackQuotas};
use crate::clock::ManualClock;
use crate::model::events::{Actor, BrokerEvent, CommandMeta, QuotaEvent, SandboxEvent};
use crate::model::sandbox::SandboxCommand;

pub(super) fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    }
}

pub(super) fn request(caller: &str, track: Option<&str>) -> AllocateRequest {
    AllocateRequest {
        caller: caller.to_string(),
        track_name: track.map(str::to_string),
        ..AllocateRequest::default()
    }
}

/// A grouping store holding `pool` registered sandboxes (`sb-0` …).
pub(super) async fn grouping_store(pool: usize) -> Arc<FaultStore> {
    let store = Arc::new(FaultStore::grouping(100));
    let broker = broker(&store, BrokerConfig::default());
    for i in 0..pool {
        broker
            .execute(
                &format!("sb-{i}"),
                SandboxCommand::Register {
                    sandbox_id: format!("sb-{i}"),
                    name: format!("lab-{i}"),
                    external_id: format!("ext-{i}"),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                &meta(),
            )
            .await
            .unwrap_or_else(|e| panic!("registering sb-{i}: {e}"));
    }
    store
}

pub(super) fn broker(store: &Arc<FaultStore>, config: BrokerConfig) -> Broker {
    Broker::new(
        store.clone(),
        store.clone(),
        Arc::new(ManualClock::new(chrono::Utc::now())),
        BrokerConfig {
            max_sweeps: 3,
            ..config
        },
    )
}

fn quota(track: &str, limit: u32) -> BrokerConfig {
    BrokerConfig {
        quotas: TrackQuotas::parse(&format!("{track}={limit}"), None)
            .unwrap_or_else(|e| panic!("{e}")),
        ..BrokerConfig::default()
    }
}

/// Every `SandboxAllocated` in the store, as sandbox → callers: the replayed history.
pub(super) fn allocations(store: &FaultStore) -> BTreeMap<String, Vec<String>> {
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (stream, events) in store.streams() {
        for e in events {
            if let Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated { caller, .. })) =
                e.decode()
            {
                held.entry(stream.clone()).or_default().push(caller);
            }
        }
    }
    held
}

/// Invariants over the replayed history: no sandbox allocated twice, no caller holding two;
/// returns the number of allocations.
pub(super) fn assert_exactly_once(store: &FaultStore) -> usize {
    let held = allocations(store);
    let mut callers = BTreeSet::new();
    for (sandbox, by) in &held {
        assert_eq!(by.len(), 1, "{sandbox} allocated to {by:?}");
        assert!(callers.insert(by[0].clone()), "{} holds two", by[0]);
    }
    held.len()
}

/// The quota stream of `track` in the store: consecutive versions, each event's holders the
/// previous ones plus its sandbox; returns the final holders.
fn quota_holders(store: &FaultStore, track: &str) -> Vec<String> {
    let events = store
        .streams()
        .remove(&format!("quota#{track}"))
        .unwrap_or_default();
    let mut holders: Vec<String> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "quota versions run on");
        match e.decode() {
            Ok(BrokerEvent::Quota(QuotaEvent::QuotaSlotTaken {
                sandbox_id,
                holders: after,
                ..
            })) => {
                let mut expected = holders.clone();
                expected.push(sandbox_id);
                assert_eq!(
                    after, expected,
                    "v{} holds the earlier holders and its own",
                    e.version
                );
                holders = after;
            }
            other => panic!("unexpected quota event {other:?}"),
        }
    }
    holders
}

async fn burst(
    broker: &Broker,
    callers: &[String],
    track: Option<&str>,
) -> Vec<Result<Allocation, BrokerError>> {
    let meta = meta();
    let requests: Vec<AllocateRequest> = callers.iter().map(|c| request(c, track)).collect();
    futures::future::join_all(requests.iter().map(|r| broker.allocate(r, &meta))).await
}

fn callers(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// A burst of 40 allocations is written in fewer groups than allocations, every one answered
/// 201 with its own sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_written_in_fewer_groups_than_allocations() {
    let store = grouping_store(40).await;
    let broker = broker(&store, BrokerConfig::default());
    let results = burst(&broker, &callers("student", 40), None).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(assert_exactly_once(&store), 40);
    let stats = broker
        .group_commit_stats()
        .map(|s| s.groups.load(Ordering::Relaxed));
    assert!(stats.is_some_and(|groups| groups < 40), "groups: {stats:?}");
}

/// 30 concurrent allocations of one track with a quota of 10: exactly 10 are granted, the rest
/// refused by the quota; the quota stream takes one version per grant, each event holding the
/// earlier holders and its own, in fewer groups than grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_quota_is_taken_in_order_inside_groups() {
    let store = grouping_store(40).await;
    let broker = broker(&store, quota("workshop", 10));
    let results = burst(&broker, &callers("student", 30), Some("workshop")).await;
    let granted = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(BrokerError::QuotaExceeded { limit: 10, .. })))
        .count();
    assert_eq!((granted, refused), (10, 20), "{results:?}");
    assert_eq!(assert_exactly_once(&store), 10);
    let holders: BTreeSet<String> = quota_holders(&store, "workshop").into_iter().collect();
    let allocated: BTreeSet<String> = allocations(&store)
        .into_keys()
        .map(|s| s.trim_start_matches("sandbox#").to_string())
        .collect();
    assert_eq!(holders, allocated);
    let groups = broker
        .group_commit_stats()
        .map_or(u64::MAX, |s| s.groups.load(Ordering::Relaxed));
    assert!(groups < 10, "groups: {groups}");
}

/// Two processes (brokers) race for one pool with one track quota: members lose sandboxes to
/// the other process inside their groups, the members continuing them on the quota stream are
/// decided again, and still no sandbox is allocated twice, no caller holds two, the quota holds
/// exactly, and every sandbox of the pool is allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_members_fail_alone() {
    let store = grouping_store(24).await;
    let a = broker(&store, quota("workshop", 20));
    let b = broker(&store, quota("workshop", 20));
    let (at_a, at_b) = (callers("a", 20), callers("b", 20));
    let (left, right) = tokio::join!(
        burst(&a, &at_a, Some("workshop")),
        burst(&b, &at_b, Some("workshop")),
    );
    let results: Vec<_> = left.into_iter().chain(right).collect();
    let granted = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        assert!(
            matches!(
                r,
                Ok(_)
                    | Err(
                        BrokerError::QuotaExceeded { .. } | BrokerError::NoSandboxAvailable { .. }
                    )
            ),
            "{r:?}"
        );
    }
    assert_eq!(granted, 20, "the quota, not the pool, bounds the grants");
    assert_eq!(assert_exactly_once(&store), 20);
    assert_eq!(quota_holders(&store, "workshop").len(), 20);
    let redecided: u64 = [&a, &b]
        .iter()
        .filter_map(|b| b.group_commit_stats())
        .map(|s| s.redecided.load(Ordering::Relaxed))
        .sum();
    println!("members decided again: {redecided}");
}

/// A group whose write landed although the store answered an error: every member settles as
/// its own success with its strong read. A group that did not land: every member fails, and
/// their sandboxes are allocated by the next requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_group_outcomes_settle_member_by_member() {
    let store = grouping_store(10).await;
    let broker = broker(&store, BrokerConfig::default());
    store.inject([AppendFault::FailApplied]);
    let landed = burst(&broker, &callers("landed", 5), None).await;
    assert!(landed.iter().all(Result::is_ok), "{landed:?}");
    assert_eq!(assert_exactly_once(&store), 5);
    store.inject([AppendFault::FailNotApplied]);
    let first = broker.allocate(&request("lost", None), &meta()).await;
    assert!(matches!(first, Err(BrokerError::Store(_))), "{first:?}");
    let rest = burst(&broker, &callers("later", 5), None).await;
    assert!(rest.iter().all(Result::is_ok), "{rest:?}");
    assert_eq!(assert_exactly_once(&store), 10);
}

/// A group write that never answers is abandoned at the deadline: its allocation is answered
/// as an unknown outcome, and the next allocation is written at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_group_is_abandoned_at_the_deadline() {
    let store = grouping_store(2).await;
    let broker = broker(
        &store,
        BrokerConfig {
            group_write_deadline: StdDuration::from_millis(100),
            group_commit_in_flight: 1,
            ..BrokerConfig::default()
        },
    );
    store.inject([AppendFault::Hang]);
    let hung = broker.allocate(&request("hung", None), &meta()).await;
    assert!(matches!(hung, Err(BrokerError::Store(_))), "{hung:?}");
    let next = tokio::time::timeout(
        StdDuration::from_secs(5),
        broker.allocate(&request("next", None), &meta()),
    )
    .await;
    assert!(matches!(next, Ok(Ok(_))), "{next:?}");
}
