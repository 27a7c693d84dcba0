//! The allocation path reads the drain state through a per-instance cache: on a pool that was
//! never drained (no pool-control stream at all) and under concurrency, one strong read serves
//! every allocation within `DRAIN_CACHE_MS`, and a drain recorded by the instance still refuses
//! at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::model::ids::POOL_CONTROL_STREAM_ID;
use domain::store::{PoolView, StoreError};
use domain::{Actor, AllocateRequest, Broker, BrokerConfig, BrokerError, CommandMeta, ManualClock};
use store_embedded::EmbeddedStore;
use tests::intercepted::{InterceptedStore, StoreHook, StreamRead};

/// Counts the strong reads of the pool-control stream (whole or latest).
#[derive(Default)]
struct CountsControlReads {
    control_reads: AtomicUsize,
}

#[async_trait]
impl StoreHook for CountsControlReads {
    async fn before_read(&self, stream_id: &str, _read: StreamRead) -> Result<(), StoreError> {
        if stream_id == POOL_CONTROL_STREAM_ID {
            self.control_reads.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("drain-cache".into()),
    }
}

/// 30 concurrent allocations on a never-drained pool read the pool-control stream once (not once
/// per allocation), and a drain recorded afterwards refuses the next allocation at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_never_drained_pool_is_read_once_per_cache_period() {
    let store = Arc::new(EmbeddedStore::open_in_memory(4).expect("in-memory embedded store"));
    let registrar = Broker::new(
        store.clone(),
        store.clone(),
        Arc::new(ManualClock::new(chrono::Utc::now())),
        BrokerConfig::default(),
    );
    tests::pool::register_projected(&registrar, store.as_ref(), store.as_ref(), 40, &meta()).await;
    let counting = Arc::new(InterceptedStore::with_hook(
        store.clone(),
        CountsControlReads::default(),
    ));
    let view: Arc<dyn PoolView> = store.clone();
    let config = BrokerConfig {
        // Long enough that the whole burst falls inside one cache period on any machine.
        drain_cache_ttl: Duration::from_secs(3_600),
        ..BrokerConfig::default()
    };
    let broker = Arc::new(Broker::new(
        counting.clone(),
        view,
        Arc::new(ManualClock::new(chrono::Utc::now())),
        config,
    ));
    let burst = (0..30).map(|i| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let request = AllocateRequest {
                caller: format!("student-{i}"),
                ..AllocateRequest::default()
            };
            broker.allocate(&request, &meta()).await
        })
    });
    let mut allocated = 0;
    for task in futures::future::join_all(burst).await {
        match task.expect("allocation task") {
            Ok(allocation) => {
                assert!(!allocation.replayed);
                allocated += 1;
            }
            Err(e) => panic!("allocation failed: {e}"),
        }
    }
    assert_eq!(allocated, 30);
    assert_eq!(
        counting.hook().control_reads.load(Ordering::SeqCst),
        1,
        "the drain state was read more than once within one cache period"
    );

    broker
        .drain(None, Some("maintenance window".into()), &meta())
        .await
        .expect("drain the pool");
    let refused = broker
        .allocate(
            &AllocateRequest {
                caller: "late-student".into(),
                ..AllocateRequest::default()
            },
            &meta(),
        )
        .await;
    assert!(
        matches!(refused, Err(BrokerError::Maintenance { .. })),
        "a drain recorded by this instance must refuse at once: {refused:?}"
    );
}
