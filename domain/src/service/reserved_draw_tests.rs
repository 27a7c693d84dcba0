//! A reservation's track draws from its earmarks first (ADR 0028) also when the read of its
//! earmarked rows is slow while the rest of a burst keeps the candidate queues busy.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::Duration;

use super::fault_store::FaultStore;
use super::liveness_tests::broker_on;
use super::reservations::ReservationSettings;
use super::AllocateRequest;
use crate::clock::Clock;
use crate::model::events::{Actor, CommandMeta, OverflowPolicy};
use crate::model::reservation::ReservationSpec;

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    }
}

/// While one student of the track reads the earmarked rows (slowly), its classmates wait for
/// that read however often other queues wake them, and every one of them gets an earmarked
/// sandbox: none is sent to the open pool while the reservation has room. (Waits counted by
/// wake-ups ran out here within a fraction of the read, and the classmates took open sandboxes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classmates_wait_for_a_slow_read_of_the_earmarks() {
    let (broker, store, clock) = broker_on(FaultStore::default(), 20, StdDuration::ZERO).await;
    let broker = Arc::new(broker);
    let now = clock.now();
    let spec = ReservationSpec {
        track: "ws".into(),
        count: 5,
        prefix: None,
        starts_at: now,
        ends_at: now + Duration::hours(2),
        overflow: OverflowPolicy::OpenPool,
        note: None,
    };
    let settings = ReservationSettings {
        write_events: true,
        ..ReservationSettings::default()
    };
    let (status, _) = broker
        .create_reservation(&spec, &settings, &meta())
        .await
        .unwrap();
    let earmarks: BTreeSet<String> = status.reservation.earmarked.clone();
    assert_eq!(earmarks.len(), 5);

    store.slow_get_many(StdDuration::from_millis(600));
    // The rest of a burst: fills and decisions of other queues, a wake-up every millisecond.
    let stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                broker.candidates.fetched.notify_waiters();
                broker.candidates.decided.notify_waiters();
                tokio::time::sleep(StdDuration::from_millis(1)).await;
            }
        })
    };
    let students = (0..5).map(|i| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let request = AllocateRequest {
                caller: format!("ws-{i}"),
                track_name: Some("ws".into()),
                ..AllocateRequest::default()
            };
            broker.allocate(&request, &meta()).await
        })
    });
    let mut got = BTreeSet::new();
    for student in futures::future::join_all(students).await {
        let allocation = student.unwrap().unwrap();
        got.insert(allocation.sandbox.sandbox_id.clone());
    }
    stop.store(true, Ordering::Relaxed);
    noise.await.unwrap();
    assert_eq!(got, earmarks, "the track's students left their reservation");
}
