//! Webhook dispatch across instances and late events (ADR 0018 addendum): two API instances on
//! one DynamoDB store deliver each notification once and hand over when the lease holder stops;
//! the lease lapses when its holder goes silent; an event the feed shows only after the position
//! passed its timestamp is still delivered, once.

use std::sync::Arc;
use std::time::Duration;

use command_api::webhooks::DispatchLease;
use domain::model::events::SandboxEvent;
use domain::model::ids::sandbox_stream;
use domain::{Actor, Clock, CommandMeta, EventEnvelope, PoolView, ViewStore};
use reqwest::StatusCode;
use serde_json::Value;
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp};
use tests::webhook_receiver::Receiver;

const SECRET: &str = "receiver-secret-0123456789abcdefghij";

/// An app with one subscriber `labs` at `url`; `table_prefix` shares DynamoDB tables.
async fn app(backend: Backend, url: String, table_prefix: Option<String>) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.webhooks_json = Some(
            serde_json::json!({"subscribers": [
                {"name": "labs", "url": url, "secret": SECRET, "prefixes": ["lab"]},
            ]})
            .to_string()
            .into(),
        );
        config.run_webhooks = Some(true);
        // The receivers listen on plain http on 127.0.0.1, which production refuses.
        config.webhook_allow_http = true;
        config.webhook_allow_private_targets = true;
        config.webhook_retry_base_ms = 20;
        config.webhook_poll_ms = 50;
        config.webhook_settle_ms = 2_000;
        // Long enough that a renewal slowed by a loaded store does not end the tenure mid-burst
        // (each lapse starts a new tenure and re-sends what was not saved yet), short enough
        // that the handover below comes within the delivery deadline.
        config.webhook_lease_ms = 5_000;
        // Domain time (the manual clock); re-read every quarter of it in real time.
        config.webhook_overlap_ms = 4_000;
        if let Some(prefix) = table_prefix {
            config.store.table_prefix = prefix;
        }
    });
    spawn_app_with(options).await
}

/// Allocates one `lab` sandbox through `app` for `caller`; returns its id.
async fn allocate(app: &TestApp, caller: &str) -> String {
    let resp = app
        .allocate(caller)
        .header("X-Sandbox-Name-Prefix", "lab")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap_or_default();
    body["sandbox_id"].as_str().unwrap_or_default().to_string()
}

async fn allocation_delivered(seen: &Receiver, sandbox_id: &str) -> Value {
    seen.wait_for("allocation", |b| {
        b["kind"] == "allocation" && b["sandbox"]["sandbox_id"] == sandbox_id
    })
    .await
}

/// Two API instances on one DynamoDB store: every allocation notification reaches the receiver
/// exactly once, and after the delivering instance stops the other delivers the rest.
#[tokio::test]
async fn two_instances_deliver_once_and_hand_over_dynamo() {
    // Lease renewals time the handover: this test takes its turn with the other tests that load
    // DynamoDB Local heavily.
    let _turn = tests::ddb_local::heavy_load().await;
    let seen = Receiver::start().await;
    let url = seen.url.clone();
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let first = app(Backend::Dynamo, url.clone(), Some(prefix.clone())).await;
    first.seed("lab", 6).await;
    first.clock.advance(chrono::Duration::seconds(1));
    let mut ids = vec![allocate(&first, "stu-0").await];
    first.clock.advance(chrono::Duration::seconds(3));
    // The first instance delivered, so it holds the lease when the second one starts.
    allocation_delivered(&seen, &ids[0]).await;

    let second = app(Backend::Dynamo, url, Some(prefix)).await;
    // One domain time for both: each reads the feed up to its own clock.
    second.clock.set(first.clock.now());
    for (i, via) in [&first, &second].into_iter().enumerate() {
        ids.push(allocate(via, &format!("stu-{}", i + 1)).await);
    }
    for app in [&first, &second] {
        app.clock.advance(chrono::Duration::seconds(3));
    }
    for id in &ids {
        allocation_delivered(&seen, id).await;
    }

    // The holder stops; the other instance takes over and delivers what happens next.
    first.stop().await;
    for i in 3..5 {
        ids.push(allocate(&second, &format!("stu-{i}")).await);
    }
    second.clock.advance(chrono::Duration::seconds(3));
    for id in &ids[3..] {
        allocation_delivered(&seen, id).await;
    }

    let counts = seen.counts();
    let allocations: Vec<Value> = seen
        .bodies()
        .into_iter()
        .filter(|b| b["kind"] == "allocation")
        .collect();
    assert_eq!(allocations.len(), ids.len(), "{allocations:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "a notification arrived twice: {counts:?}"
    );
    second.stop().await;
}

/// The lease is exclusive while its holder renews it and passes to another instance once the
/// holder goes silent past its duration (a crashed holder), on both stores; every taking of it
/// has a greater epoch (fencing token) than the one before.
async fn lease_lapses_without_renewal(view: Arc<dyn ViewStore>) {
    let duration = Duration::from_secs(3);
    let a = DispatchLease::new(Arc::clone(&view), "labs", "api-a", duration);
    let b = DispatchLease::new(Arc::clone(&view), "labs", "api-b", duration);
    let claim = |lease: &DispatchLease| {
        let lease = lease.clone();
        async move { lease.claim().await.unwrap_or_else(|e| panic!("{e}")) }
    };
    let first = claim(&a)
        .await
        .unwrap_or_else(|| panic!("a free lease is taken"));
    assert!(claim(&b).await.is_none());
    // The holder takes it again: still its own, still not the other's, a new tenure.
    let again = claim(&a)
        .await
        .unwrap_or_else(|| panic!("the holder keeps it"));
    assert!(again.epoch > first.epoch);
    assert!(claim(&b).await.is_none());
    // The holder goes silent: the other one gets it once the lease lapsed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(tenure) = claim(&b).await {
            break tenure;
        }
        assert!(tokio::time::Instant::now() < deadline, "lease never lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        taken.epoch > again.epoch,
        "a takeover must fence out the old holder"
    );
    assert!(claim(&a).await.is_none());
    // A graceful stop hands it over at once.
    b.release().await.unwrap_or_else(|e| panic!("{e}"));
    let back = claim(&a)
        .await
        .unwrap_or_else(|| panic!("a released lease is free"));
    assert!(back.epoch > taken.epoch);
}

/// Embedded store: the dispatch lease is exclusive and lapses without renewal.
#[tokio::test]
async fn lease_lapses_without_renewal_embedded() {
    let store = EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("{e}"));
    lease_lapses_without_renewal(Arc::new(store)).await;
}

/// DynamoDB Local: the dispatch lease is exclusive and lapses without renewal.
#[tokio::test]
async fn lease_lapses_without_renewal_dynamo() {
    let store = tests::ddb_local::fresh_store(4).await;
    lease_lapses_without_renewal(Arc::new(store)).await;
}

/// A view whose conditional checkpoint writes hang once `stall` is set (a renewal the store
/// never answers); everything else is the embedded store's.
struct StallingSwaps {
    inner: EmbeddedStore,
    stall: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl PoolView for StallingSwaps {
    async fn get(&self, id: &str) -> Result<Option<domain::PoolRow>, domain::StoreError> {
        self.inner.get(id).await
    }
    async fn candidates(
        &self,
        query: &domain::store::CandidateQuery,
    ) -> Result<Vec<domain::PoolRow>, domain::StoreError> {
        self.inner.candidates(query).await
    }
    async fn list(
        &self,
        filter: &domain::store::ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<domain::store::RowPage, domain::StoreError> {
        self.inner.list(filter, limit, cursor).await
    }
    async fn due(
        &self,
        status: domain::SandboxStatus,
        before: chrono::DateTime<chrono::Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<domain::store::RowPage, domain::StoreError> {
        self.inner.due(status, before, limit, cursor).await
    }
    async fn stats(&self) -> Result<domain::PoolStats, domain::StoreError> {
        self.inner.stats().await
    }
}

#[async_trait::async_trait]
impl ViewStore for StallingSwaps {
    async fn load_row(&self, id: &str) -> Result<Option<domain::PoolRow>, domain::StoreError> {
        self.inner.load_row(id).await
    }
    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &domain::PoolRow,
        delta: &domain::StatsDelta,
    ) -> Result<(), domain::StoreError> {
        self.inner.write_row(expected_version, row, delta).await
    }
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, domain::StoreError> {
        self.inner.checkpoint(source).await
    }
    async fn save_checkpoint(
        &self,
        source: &str,
        position: &str,
    ) -> Result<(), domain::StoreError> {
        self.inner.save_checkpoint(source, position).await
    }
    async fn swap_checkpoint(
        &self,
        source: &str,
        expected: Option<&str>,
        position: &str,
    ) -> Result<bool, domain::StoreError> {
        if self.stall.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.swap_checkpoint(source, expected, position).await
    }
    async fn clear(&self) -> Result<(), domain::StoreError> {
        self.inner.clear().await
    }
}

/// A renewal that never answers stops delivery by the holder's trusted time (two thirds of the
/// lease), before the lease lapses and another instance may take it: two dispatchers never
/// deliver for one subscriber at once.
#[tokio::test]
async fn a_stalled_lease_renewal_stops_delivery_in_time() {
    let view = Arc::new(StallingSwaps {
        inner: EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("{e}")),
        stall: std::sync::atomic::AtomicBool::new(false),
    });
    let duration = Duration::from_millis(900);
    let lease = DispatchLease::new(
        Arc::clone(&view) as Arc<dyn ViewStore>,
        "labs",
        "api-a",
        duration,
    );
    let taken = tokio::time::Instant::now();
    let tenure = lease
        .claim()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a free lease is taken"));
    view.stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let kept = tokio::time::timeout(Duration::from_secs(5), lease.keep(tenure)).await;
    assert!(kept.is_ok(), "a stalled renewal kept the lease held");
    assert!(
        taken.elapsed() < duration,
        "delivery stopped only after {:?}, past the lease of {duration:?}",
        taken.elapsed()
    );
}

/// Appends a `DeletionFailed` (a quarantine notification) to `sandbox_id`'s stream with a
/// feed timestamp of `at`, as a slow writer would have: the time index shows it late.
async fn append_late(app: &TestApp, sandbox_id: &str, at: chrono::DateTime<chrono::Utc>) {
    let events = app.state.broker.events().clone();
    let stream = sandbox_stream(sandbox_id);
    let version = events
        .load_latest(&stream)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map_or(0, |e| e.version);
    let meta = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("late-event".into()),
    };
    let event = SandboxEvent::DeletionFailed {
        attempts: 1,
        last_error: "recorded late".into(),
        transient: false,
    };
    events
        .append(vec![EventEnvelope::new(
            &stream,
            version + 1,
            &event,
            &meta,
            at,
        )])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn late_event_is_delivered_once(backend: Backend) {
    let seen = Receiver::start().await;
    let url = seen.url.clone();
    let app = app(backend, url, None).await;
    app.seed("lab", 4).await;
    app.clock.advance(chrono::Duration::seconds(1));
    let allocated = allocate(&app, "stu-0").await;
    app.clock.advance(chrono::Duration::seconds(3));
    let body = allocation_delivered(&seen, &allocated).await;
    let delivered_at =
        chrono::DateTime::parse_from_rfc3339(body["occurred_at"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"))
            .with_timezone(&chrono::Utc);

    // Both stamped before the delivered allocation, so before the saved position: a reader
    // going forward from it alone would never see them.
    let quarantined = |id: &'static str| {
        move |b: &Value| b["kind"] == "quarantine" && b["sandbox"]["sandbox_id"] == id
    };
    append_late(
        &app,
        "lab-id-2",
        delivered_at - chrono::Duration::milliseconds(800),
    )
    .await;
    let first = seen
        .wait_for("late quarantine", quarantined("lab-id-2"))
        .await;
    assert_eq!(first["event"]["payload"]["last_error"], "recorded late");
    // A second late event can only arrive through a later re-read of the same window, which
    // must have skipped the first one.
    append_late(
        &app,
        "lab-id-3",
        delivered_at - chrono::Duration::milliseconds(400),
    )
    .await;
    seen.wait_for("second late quarantine", quarantined("lab-id-3"))
        .await;
    let counts = seen.counts();
    assert!(
        counts.values().all(|n| *n == 1),
        "a notification arrived twice: {counts:?}"
    );
    assert_eq!(counts.len(), 3, "{:?}", seen.bodies());
    app.stop().await;
}

/// Embedded store: an event stamped behind the saved position is delivered, once.
#[tokio::test]
async fn late_event_is_delivered_once_embedded() {
    late_event_is_delivered_once(Backend::Embedded).await;
}

/// DynamoDB Local: an event stamped behind the saved position is delivered, once.
#[tokio::test]
async fn late_event_is_delivered_once_dynamo() {
    late_event_is_delivered_once(Backend::Dynamo).await;
}
