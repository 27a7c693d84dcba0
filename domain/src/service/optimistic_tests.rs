//! Grouped allocations that assume the claim and a never-seen cap stream empty (ADR 0037), on
//! the in-memory grouping store: a fresh caller is allocated without reading either, and every
//! case where the assumption is wrong — a claim or cap with history, a replay inside a group,
//! two requests of one caller in one group, a drained pool — still gets the answer a strong
//! read gives.

use std::collections::BTreeSet;

use super::group_commit_tests::{
    allocations, assert_exactly_once, broker, grouping_store, meta, request,
};
use super::{AllocateRequest, AllocationLimits, BrokerConfig, BrokerError, CapKind, FairShareCap};

/// Limits with one per-caller cap of `limit` for `caller`.
fn caller_cap(caller: &str, limit: u32) -> AllocationLimits {
    AllocationLimits {
        caps: vec![FairShareCap::caller("workshop", caller, limit)],
        ..AllocationLimits::default()
    }
}

fn keyed(caller: &str, key: &str) -> AllocateRequest {
    AllocateRequest {
        idempotency_key: Some(key.to_string()),
        ..request(caller, None)
    }
}

/// A fresh caller's allocation reads neither its claim stream nor its cap stream: both are
/// written at version 1 on condition they do not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_caller_is_allocated_without_reading_its_claim_or_cap() {
    let store = grouping_store(5).await;
    let broker = broker(&store, BrokerConfig::default());
    let allocated = broker
        .allocate_limited(&request("ada", None), &meta(), &caller_cap("ada", 1))
        .await;
    assert!(matches!(&allocated, Ok(a) if !a.replayed), "{allocated:?}");
    assert_eq!(store.reads_of("claim#"), 0, "claim reads");
    assert_eq!(store.reads_of("quota#caller#"), 0, "cap reads");
    let streams = store.streams();
    let claim = streams
        .iter()
        .find(|(id, _)| id.starts_with("claim#"))
        .map(|(_, events)| events.len());
    assert_eq!(claim, Some(1), "one grant on the claim");
}

/// A caller whose claim and cap streams have history (an allocation that ended): the assumed
/// version 1 conflicts, the request reads both strongly and is allocated a second sandbox at
/// the streams' next versions, the cap counting only the live allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_caller_is_allocated_after_the_assumption_fails() {
    let store = grouping_store(5).await;
    let first_broker = broker(&store, BrokerConfig::default());
    let first = first_broker
        .allocate_limited(&request("ada", None), &meta(), &caller_cap("ada", 1))
        .await
        .unwrap_or_else(|e| panic!("first allocation: {e}"));
    first_broker
        .mark_for_deletion(&first.sandbox.sandbox_id, "ada", &meta())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    // Another process, which has seen neither stream.
    let other = broker(&store, BrokerConfig::default());
    let second = other
        .allocate_limited(&request("ada", None), &meta(), &caller_cap("ada", 1))
        .await
        .unwrap_or_else(|e| panic!("second allocation: {e}"));
    assert!(!second.replayed);
    assert_ne!(second.sandbox.sandbox_id, first.sandbox.sandbox_id);
    assert!(store.reads_of("claim#") >= 1, "the claim was read strongly");
    let streams = store.streams();
    for (id, events) in streams.iter().filter(|(id, _)| id.starts_with("claim#")) {
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, vec![1, 2, 3], "{id}: grant, release, grant");
    }
    assert_eq!(assert_exactly_once_per_sandbox(&store), 2);
    // The cap holds exactly: a third allocation while the second is live is refused.
    let third = other
        .allocate_limited(&keyed("ada", "again"), &meta(), &caller_cap("ada", 1))
        .await;
    assert!(
        matches!(
            third,
            Err(BrokerError::FairShareExceeded {
                kind: CapKind::Caller,
                limit: 1,
                ..
            })
        ),
        "{third:?}"
    );
}

/// No sandbox allocated twice in the replayed history (a caller may hold several over time);
/// returns the number of allocations.
fn assert_exactly_once_per_sandbox(store: &super::fault_store::FaultStore) -> usize {
    let held = allocations(store);
    for (sandbox, by) in &held {
        assert_eq!(by.len(), 1, "{sandbox} allocated to {by:?}");
    }
    held.len()
}

/// Duplicates of a live allocation's request, concurrent with fresh callers so they share
/// groups: every duplicate is answered with the same sandbox as a replay, and nothing else of
/// the pool is allocated to that caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_inside_a_group_returns_the_same_sandbox() {
    let store = grouping_store(20).await;
    let broker = broker(&store, BrokerConfig::default());
    let first = broker
        .allocate(&keyed("ada", "lab-1"), &meta())
        .await
        .unwrap_or_else(|e| panic!("first allocation: {e}"));
    let mut requests: Vec<AllocateRequest> = (0..8).map(|_| keyed("ada", "lab-1")).collect();
    requests.extend((0..8).map(|i| request(&format!("student-{i}"), None)));
    let meta = meta();
    let results =
        futures::future::join_all(requests.iter().map(|r| broker.allocate(r, &meta))).await;
    for (r, result) in requests.iter().zip(&results) {
        let allocation = result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", r.caller));
        if r.caller == "ada" {
            assert!(allocation.replayed, "a duplicate is a replay");
            assert_eq!(allocation.sandbox.sandbox_id, first.sandbox.sandbox_id);
        } else {
            assert!(!allocation.replayed);
        }
    }
    assert_eq!(assert_exactly_once(&store), 9);
}

/// Two requests of one caller in one burst: with one key, one allocation and its replay; with
/// two keys under a cap of one, exactly one grant and one refusal by the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_of_one_caller_in_one_group() {
    let store = grouping_store(10).await;
    let broker = broker(&store, BrokerConfig::default());
    let meta = meta();
    let limits = caller_cap("ada", 1);
    let same = keyed("ada", "lab-1");
    let (a, b) = tokio::join!(
        broker.allocate_limited(&same, &meta, &limits),
        broker.allocate_limited(&same, &meta, &limits),
    );
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        other => panic!("{other:?}"),
    };
    assert_eq!(a.sandbox.sandbox_id, b.sandbox.sandbox_id);
    assert_eq!(
        [a.replayed, b.replayed].iter().filter(|r| **r).count(),
        1,
        "one grant, one replay"
    );
    let bob = caller_cap("bob", 1);
    let (one, two) = (keyed("bob", "lab-1"), keyed("bob", "lab-2"));
    let (x, y) = tokio::join!(
        broker.allocate_limited(&one, &meta, &bob),
        broker.allocate_limited(&two, &meta, &bob),
    );
    let results = [x, y];
    let granted = results.iter().filter(|r| r.is_ok()).count();
    let capped = results
        .iter()
        .filter(|r| matches!(r, Err(BrokerError::FairShareExceeded { limit: 1, .. })))
        .count();
    assert_eq!((granted, capped), (1, 1), "{results:?}");
    assert_eq!(assert_exactly_once(&store), 2);
}

/// A drained pool refuses new allocations but still replays a live one, though the request
/// started from an assumed empty claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_answered_before_a_drain_refusal() {
    let store = grouping_store(3).await;
    let broker = broker(&store, BrokerConfig::default());
    let first = broker
        .allocate(&keyed("ada", "lab-1"), &meta())
        .await
        .unwrap_or_else(|e| panic!("first allocation: {e}"));
    broker
        .drain(None, Some("maintenance".into()), &meta())
        .await
        .unwrap_or_else(|e| panic!("drain: {e}"));
    let replay = broker.allocate(&keyed("ada", "lab-1"), &meta()).await;
    assert!(
        matches!(&replay, Ok(a) if a.replayed && a.sandbox.sandbox_id == first.sandbox.sandbox_id),
        "{replay:?}"
    );
    let fresh = broker.allocate(&request("bob", None), &meta()).await;
    assert!(
        matches!(fresh, Err(BrokerError::Maintenance { .. })),
        "{fresh:?}"
    );
}

/// Pool exhausted: a replay is still answered (not "no sandbox available"), and a fresh caller
/// gets the 409 after its claim was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_answered_when_the_pool_is_empty() {
    let store = grouping_store(1).await;
    let broker = broker(&store, BrokerConfig::default());
    let first = broker
        .allocate(&keyed("ada", "lab-1"), &meta())
        .await
        .unwrap_or_else(|e| panic!("first allocation: {e}"));
    let replay = broker.allocate(&keyed("ada", "lab-1"), &meta()).await;
    assert!(
        matches!(&replay, Ok(a) if a.replayed && a.sandbox.sandbox_id == first.sandbox.sandbox_id),
        "{replay:?}"
    );
    let reads_before = store.reads_of("claim#");
    let fresh = broker.allocate(&request("bob", None), &meta()).await;
    assert!(
        matches!(fresh, Err(BrokerError::NoSandboxAvailable { .. })),
        "{fresh:?}"
    );
    assert!(
        store.reads_of("claim#") > reads_before,
        "the refusal rests on a strong read of the claim"
    );
    let callers: BTreeSet<String> = allocations(&store).into_values().flatten().collect();
    assert_eq!(callers, BTreeSet::from(["ada".to_string()]));
}
