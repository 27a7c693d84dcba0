//! Graceful shutdown under load: the service is asked to stop (the same path SIGTERM takes:
//! the server's shutdown future resolves, it stops accepting and drains) while 100 allocations
//! are in flight. Every request must get its answer, and the history, replayed from the store
//! file after the process state is gone, must hold exactly the acknowledged allocations.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend};
use tests::history::{all_events, AllocationAudit};

const IN_FLIGHT: usize = 100;

/// Shutdown requested once every one of 100 concurrent allocations is either answered or inside
/// the service (`broker_requests_in_flight`), with some still in flight: all 100 are answered
/// 201 — none cut off — and replaying the store after the stop shows each acknowledged
/// allocation owned by its caller, no sandbox twice, no caller twice, and nothing allocated that
/// was not acknowledged; the stop closes the store file with an empty WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_request_in_flight_and_loses_nothing() {
    let path = std::env::temp_dir()
        .join(format!("broker-shutdown-{}", uuid::Uuid::new_v4()))
        .join("broker.db");
    let mut options = AppOptions::new(Backend::Embedded);
    let db = path.clone();
    options.configure = Box::new(move |config| {
        config.store.embedded_path = db;
        // One allocation at a time: the 100 requests queue inside the service, so a fast
        // machine cannot answer them all before the stop begins.
        config.allocate_concurrency = 1;
    });
    let app = spawn_app_with(options).await;
    app.seed("lab", IN_FLIGHT + 50).await;

    let stopping = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut requests = Vec::with_capacity(IN_FLIGHT);
    for i in 0..IN_FLIGHT {
        let request = app.allocate(&format!("student-{i}"));
        let stopping = stopping.clone();
        let answered = answered.clone();
        requests.push(tokio::spawn(async move {
            let outcome = request.send().await;
            let after_stop = stopping.load(Ordering::SeqCst);
            answered.fetch_add(1, Ordering::SeqCst);
            let outcome = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    Ok((status, body))
                }
                Err(e) => Err(e.to_string()),
            };
            (format!("student-{i}"), outcome, after_stop)
        }));
    }
    // Every request answered or being served: none is still only on its way (a connection the
    // stopping server never accepted is the load balancer's to retry, not a drain's to serve).
    let in_flight = &app.state.metrics.in_flight;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while answered.load(Ordering::SeqCst) + (in_flight.get().max(0) as usize) < IN_FLIGHT {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never reached the service"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stopping.store(true, Ordering::SeqCst);
    let in_flight_at_stop = in_flight.get();
    // Stop drains: it returns once the server has answered what it accepted.
    tokio::time::timeout(Duration::from_secs(120), app.stop())
        .await
        .expect("shutdown drains within 120 s");

    let mut acknowledged = std::collections::BTreeMap::new();
    let mut answered_after_stop = 0;
    for request in requests {
        let (caller, outcome, after_stop) = request.await.expect("request task");
        let (status, body) = outcome.unwrap_or_else(|e| panic!("{caller}: no answer: {e}"));
        assert_eq!(status, StatusCode::CREATED, "{caller}: {body}");
        let sandbox_id = body["sandbox_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{caller}: no sandbox_id in {body}"))
            .to_string();
        acknowledged.insert(caller, sandbox_id);
        if after_stop {
            answered_after_stop += 1;
        }
    }
    assert_eq!(acknowledged.len(), IN_FLIGHT);
    assert!(
        in_flight_at_stop > 0 && answered_after_stop > 0,
        "some requests must still have been in flight when the stop began"
    );

    // The stop closed the store: its write-ahead log was folded into the database file, so the
    // file is whole on its own (what a copy, a size limit or the next start relies on).
    let wal = std::fs::metadata(format!("{}-wal", path.display())).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "the clean stop leaves an empty WAL");
    let store = EmbeddedStore::open(&path, 4).expect("reopen the store file");
    let events = all_events(&store).await;
    let audit = AllocationAudit::replay(&events);
    assert!(audit.double_allocations().is_empty(), "a sandbox twice");
    assert!(audit.callers_holding_two().is_empty(), "a caller twice");
    let allocated: usize = audit.allocations.values().map(Vec::len).sum();
    assert_eq!(allocated, IN_FLIGHT, "exactly the acknowledged allocations");
    for (caller, sandbox_id) in &acknowledged {
        assert_eq!(
            audit.allocations.get(sandbox_id).map(Vec::as_slice),
            Some([caller.clone()].as_slice()),
            "{caller}'s acknowledged {sandbox_id} is in the history and theirs"
        );
    }
    println!(
        "shutdown under load: {IN_FLIGHT} answered 201, {in_flight_at_stop} in flight at the stop, {answered_after_stop} answered after it; {} events replayed",
        events.len()
    );
    drop(store);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
