//! The allocator under partial failure (docs/liveness.md, paths 1 and 2): an append with an
//! unknown outcome, a failed group of appends, and a request cancelled mid-append never leave a
//! free sandbox unoffered, and never give one sandbox twice.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use super::fault_store::{AppendFault, FaultStore};
use super::{AllocateRequest, Broker, BrokerConfig, BrokerError};
use crate::clock::{ManualClock, SharedClock};
use crate::model::events::{Actor, CommandMeta};
use crate::model::lifecycle::SandboxStatus;
use crate::model::sandbox::SandboxCommand;

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    }
}

fn request(caller: &str) -> AllocateRequest {
    AllocateRequest {
        caller: caller.to_string(),
        ..AllocateRequest::default()
    }
}

/// A broker over a fault store holding `n` registered sandboxes (`sb-0` …), a sweep quick
/// enough for tests, and the given hold for unsettled outcomes.
pub(crate) async fn broker_with_pool(n: usize, hold: StdDuration) -> (Broker, Arc<FaultStore>) {
    let (broker, store, _) = broker_with_clock(n, hold).await;
    (broker, store)
}

/// [`broker_with_pool`] with the manual clock it runs on.
pub(crate) async fn broker_with_clock(
    n: usize,
    hold: StdDuration,
) -> (Broker, Arc<FaultStore>, ManualClock) {
    broker_on(FaultStore::default(), n, hold).await
}

/// [`broker_with_clock`] on a given store (e.g. one whose brokers group allocations).
pub(crate) async fn broker_on(
    store: FaultStore,
    n: usize,
    hold: StdDuration,
) -> (Broker, Arc<FaultStore>, ManualClock) {
    let store = Arc::new(store);
    let manual = ManualClock::new(chrono::Utc::now());
    let clock: SharedClock = Arc::new(manual.clone());
    let broker = Broker::new(
        store.clone(),
        store.clone(),
        clock,
        BrokerConfig {
            max_sweeps: 3,
            unknown_outcome_hold: hold,
            ..BrokerConfig::default()
        },
    );
    for i in 0..n {
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
            .unwrap();
    }
    (broker, store, manual)
}

/// An append that failed without landing leaves its sandbox allocatable at once: the next
/// request gets it instead of a 409.
#[tokio::test]
async fn unknown_outcome_not_landed_keeps_the_sandbox_allocatable() {
    let (broker, store) = broker_with_pool(1, StdDuration::from_secs(3600)).await;
    store.inject([AppendFault::FailNotApplied]);
    let first = broker.allocate(&request("alice"), &meta()).await;
    assert!(matches!(first, Err(BrokerError::Store(_))), "{first:?}");
    let second = broker.allocate(&request("bob"), &meta()).await.unwrap();
    assert_eq!(second.sandbox.sandbox_id, "sb-0");
    assert_eq!(second.sandbox.owner.as_deref(), Some("bob"));
}

/// An append that landed although the store answered an error is this request's success
/// (a 201), and the sandbox is not offered to anyone else.
#[tokio::test]
async fn unknown_outcome_that_landed_is_the_requests_success() {
    let (broker, store) = broker_with_pool(1, StdDuration::from_secs(3600)).await;
    store.inject([AppendFault::FailApplied]);
    let first = broker.allocate(&request("alice"), &meta()).await.unwrap();
    assert!(!first.replayed);
    assert_eq!(first.sandbox.status, Some(SandboxStatus::Allocated));
    assert_eq!(first.sandbox.owner.as_deref(), Some("alice"));
    let replay = broker.allocate(&request("alice"), &meta()).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.sandbox.sandbox_id, "sb-0");
    let other = broker.allocate(&request("bob"), &meta()).await;
    assert!(
        matches!(other, Err(BrokerError::NoSandboxAvailable { .. })),
        "{other:?}"
    );
}

/// A failed group commit (every append of the group answered with an error, none stored) does
/// not poison its candidates: each of them is allocated by the next requests.
#[tokio::test]
async fn a_failed_group_does_not_poison_its_candidates() {
    let (broker, store) = broker_with_pool(4, StdDuration::from_secs(3600)).await;
    store.inject([AppendFault::FailNotApplied; 4]);
    let failed = futures::future::join_all(
        (0..4).map(|i| broker.allocate_owned(request(&format!("failed-{i}")))),
    )
    .await;
    assert!(failed
        .iter()
        .all(|r| matches!(r, Err(BrokerError::Store(_)))));
    let mut got = Vec::new();
    for i in 0..4 {
        let allocation = broker
            .allocate(&request(&format!("next-{i}")), &meta())
            .await
            .unwrap();
        got.push(allocation.sandbox.sandbox_id);
    }
    got.sort();
    assert_eq!(got, ["sb-0", "sb-1", "sb-2", "sb-3"]);
}

/// When not even a read can settle the outcome, the candidate is skipped only for the
/// configured hold, then offered again.
#[tokio::test]
async fn an_unsettled_outcome_holds_the_candidate_for_a_bounded_time() {
    let (broker, store) = broker_with_pool(1, StdDuration::from_millis(200)).await;
    store.inject([AppendFault::FailNotAppliedThenReads(1)]);
    let first = broker.allocate(&request("alice"), &meta()).await;
    assert!(matches!(first, Err(BrokerError::Store(_))), "{first:?}");
    let during = broker.allocate(&request("bob"), &meta()).await;
    assert!(
        matches!(during, Err(BrokerError::NoSandboxAvailable { .. })),
        "{during:?}"
    );
    tokio::time::sleep(StdDuration::from_millis(250)).await;
    let after = broker.allocate(&request("bob"), &meta()).await.unwrap();
    assert_eq!(after.sandbox.sandbox_id, "sb-0");
}

/// A request cancelled while its append is in flight (client gone, timeout) releases its
/// candidate: the next request gets the sandbox instead of a 409.
#[tokio::test]
async fn a_cancelled_request_releases_its_candidate() {
    let (broker, store) = broker_with_pool(1, StdDuration::from_secs(3600)).await;
    store.inject([AppendFault::Hang]);
    let cancelled = tokio::time::timeout(
        StdDuration::from_millis(100),
        broker.allocate(&request("alice"), &meta()),
    )
    .await;
    assert!(cancelled.is_err(), "the hanging append must time out");
    let next = broker.allocate(&request("bob"), &meta()).await.unwrap();
    assert_eq!(next.sandbox.sandbox_id, "sb-0");
    assert_eq!(next.sandbox.owner.as_deref(), Some("bob"));
}

/// A replay after the lab window ended (before the expiry job ran) expires the old allocation
/// and answers as a fresh request: a new sandbox while one is free, then 409.
#[tokio::test]
async fn a_replay_past_expires_at_expires_and_allocates_afresh() {
    let (broker, _store, clock) = broker_with_clock(2, StdDuration::from_secs(3600)).await;
    let first = broker.allocate(&request("alice"), &meta()).await.unwrap();
    clock.advance(chrono::Duration::hours(1));
    let replay = broker.allocate(&request("alice"), &meta()).await.unwrap();
    assert!(replay.replayed, "inside the window a replay is a replay");
    clock.advance(broker.config().lab_duration);
    let fresh = broker.allocate(&request("alice"), &meta()).await.unwrap();
    assert!(!fresh.replayed);
    assert_ne!(fresh.sandbox.sandbox_id, first.sandbox.sandbox_id);
    let ended = broker
        .load_sandbox(&first.sandbox.sandbox_id)
        .await
        .unwrap()
        .sandbox;
    assert_eq!(ended.status, Some(SandboxStatus::PendingDeletion));
    assert!(ended.expired);
    clock.advance(broker.config().lab_duration);
    let none = broker.allocate(&request("alice"), &meta()).await;
    assert!(
        matches!(none, Err(BrokerError::NoSandboxAvailable { .. })),
        "{none:?}"
    );
}

impl Broker {
    /// `allocate` with an owned request, for joining many at once in tests.
    async fn allocate_owned(
        &self,
        request: AllocateRequest,
    ) -> Result<super::Allocation, BrokerError> {
        self.allocate(&request, &meta()).await
    }
}
