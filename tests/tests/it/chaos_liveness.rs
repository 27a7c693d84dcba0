//! Liveness under bulk faults (docs/liveness.md, docs/fault-testing.md), on both stores, through
//! the command service, the store adapters and a webhook dispatcher delivering to 127.0.0.1:
//!
//! 1. a burst of allocation requests, each abandoned after a random client timeout (thousands of
//!    cancellations mid-flight);
//! 2. allocations while a set share of appends fails with an unknown outcome (the write landed
//!    or not, the caller told `Unavailable` either way), every student retrying until answered;
//! 3. an in-place rebuild of the read side while the notifications of both are being delivered.
//!
//! After each phase the pool is drained by sequential requests: every 409 is checked against the
//! stored events (a *false* 409 is one answered while a sandbox was still free once the call had
//! ended), and the time from the end of the faults to the first allocation is the recovery time.
//! At the end every notification the events call for must have arrived, each once. The figures
//! print as two tables (`cargo test -p tests --test it chaos_liveness:: -- --nocapture`); the
//! test fails on any false 409, double allocation, lost acknowledged allocation, lost or repeated
//! notification.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use command_api::webhooks::{
    load_subscribers, DeliverySettings, DeliveryState, Dispatcher, EventSource,
};
use domain::model::lifecycle::SandboxStatus;
use domain::model::sandbox::SandboxCommand;
use domain::store::{repair_row, EventLog, EventStore, ViewStore};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, BrokerError, CommandMeta, EventEnvelope,
    SystemClock,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store_embedded::EmbeddedStore;
use tests::app::Backend;
use tests::history::{all_events, sandbox_states, AllocationAudit};
use tests::intercepted::{AppendPlan, InterceptedStore, StoreHook};
use tests::webhook_receiver::Receiver;

const SECRET: &str = "chaos-receiver-secret-0123456789abcdef";
const CHECKPOINT: &str = "webhooks:chaos";

/// Sizes of one run per store (DynamoDB Local is about ten times slower per call).
struct Sizes {
    burst_pool: usize,
    burst_requests: usize,
    /// Client timeouts are drawn from 1 ms to this.
    max_timeout_ms: u64,
    unknown_pool: usize,
    /// Share of appends that fail with an unknown outcome in phase 2.
    unknown_rate: f64,
}

fn sizes(backend: Backend) -> Sizes {
    match backend {
        Backend::Embedded => Sizes {
            burst_pool: 4_000,
            burst_requests: 3_000,
            max_timeout_ms: 8,
            unknown_pool: 200,
            unknown_rate: 0.1,
        },
        Backend::Dynamo => Sizes {
            burst_pool: 1_500,
            burst_requests: 1_000,
            max_timeout_ms: 400,
            unknown_pool: 100,
            unknown_rate: 0.1,
        },
    }
}

/// Unknown outcomes at a rate: half land, half do not; the caller is told `Unavailable`.
struct RateFaults {
    per_mille: AtomicU32,
    rng: Mutex<StdRng>,
    applied: AtomicU64,
    not_applied: AtomicU64,
}

/// The hook that puts [`RateFaults`] into the broker's event store.
struct FaultHook(Arc<RateFaults>);

#[async_trait]
impl StoreHook for FaultHook {
    async fn before_append(&self, _events: &[EventEnvelope]) -> AppendPlan {
        let faults = &self.0;
        let rate = faults.per_mille.load(Ordering::SeqCst);
        let mut rng = faults.rng.lock().unwrap_or_else(PoisonError::into_inner);
        if rate == 0 || rng.random_range(0..1000) >= rate {
            return AppendPlan::Proceed;
        }
        if rng.random_bool(0.5) {
            faults.applied.fetch_add(1, Ordering::Relaxed);
            AppendPlan::ApplyThenFail
        } else {
            faults.not_applied.fetch_add(1, Ordering::Relaxed);
            AppendPlan::Fail
        }
    }
}

/// One store's ports as the rig uses them.
struct Ports {
    label: &'static str,
    /// The embedded store's directory, removed at the end.
    dir: Option<std::path::PathBuf>,
    events: Arc<dyn EventStore>,
    view: Arc<dyn ViewStore>,
    source: EventSource,
    log: Option<Arc<dyn EventLog>>,
}

/// A fresh store: an embedded file, or fresh tables on DynamoDB Local.
async fn ports(backend: Backend) -> Ports {
    match backend {
        Backend::Embedded => {
            let dir = std::env::temp_dir()
                .join(format!("broker-chaos-liveness-{}", uuid::Uuid::new_v4()));
            let path = dir.join("broker.db");
            let store = Arc::new(EmbeddedStore::open(&path, 4).unwrap_or_else(|e| panic!("{e}")));
            Ports {
                label: "embedded",
                dir: Some(dir),
                events: store.clone(),
                view: store.clone(),
                source: EventSource::Log(store.clone()),
                log: Some(store),
            }
        }
        Backend::Dynamo => {
            let store = Arc::new(tests::ddb_local::fresh_store(4).await);
            Ports {
                label: "dynamodb",
                dir: None,
                events: store.clone(),
                view: store.clone(),
                source: EventSource::TimeIndex(store),
                log: None,
            }
        }
    }
}

/// The store, the broker over the faulty events, and the webhook subscriber.
struct Rig {
    label: &'static str,
    dir: Option<std::path::PathBuf>,
    events: Arc<dyn EventStore>,
    view: Arc<dyn ViewStore>,
    source: EventSource,
    log: Option<Arc<dyn EventLog>>,
    faults: Arc<RateFaults>,
    broker: Broker,
    receiver: Receiver,
    /// The running dispatcher: its stop signal and task.
    delivery: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
}

impl Rig {
    async fn start(backend: Backend, seed: u64) -> Rig {
        let Ports {
            label,
            dir,
            events,
            view,
            source,
            log,
        } = ports(backend).await;
        let faults = Arc::new(RateFaults {
            per_mille: AtomicU32::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            applied: AtomicU64::new(0),
            not_applied: AtomicU64::new(0),
        });
        let faulty: Arc<dyn EventStore> = Arc::new(InterceptedStore::with_hook(
            events.clone(),
            FaultHook(faults.clone()),
        ));
        // The production settings (the unknown-outcome hold included); no projector runs, so
        // read repair keeps the rows the allocator trips over current, and the rebuild of
        // phase 3 races nobody.
        let broker = Broker::new(
            faulty,
            view.clone(),
            Arc::new(SystemClock),
            BrokerConfig::default(),
        )
        .with_read_repair(view.clone());
        let receiver = Receiver::start().await;
        let rig = Rig {
            label,
            dir,
            events,
            view,
            source,
            log,
            faults,
            broker,
            receiver,
            delivery: Mutex::new(None),
        };
        // The subscriber exists from the start (a new one hears only what happens after it),
        // but delivers only in phase 3, so that the rebuild meets a backlog.
        rig.start_delivery().await;
        rig.wait_state("the dispatcher's tenure", |s| s.fence > 0)
            .await;
        rig.stop_delivery().await;
        rig
    }

    /// Starts the webhook dispatcher.
    async fn start_delivery(&self) {
        let json = serde_json::json!({"subscribers": [{
            "name": "chaos", "url": self.receiver.url, "secret": SECRET,
            "kinds": ["allocation", "release"],
        }]})
        .to_string();
        let subscribers = load_subscribers(
            None,
            Some(&json.as_str().into()),
            tests::webhook_receiver::LOOPBACK_TARGETS,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let dispatcher = Arc::new(
            Dispatcher::new(
                subscribers,
                DeliverySettings {
                    retry_base: Duration::from_millis(20),
                    retry_cap: Duration::from_secs(1),
                    max_attempts: 20,
                    timeout: Duration::from_secs(10),
                    poll: Duration::from_millis(20),
                    settle: Duration::from_millis(200),
                    expiry_warning: chrono::Duration::minutes(30),
                    low_water: Default::default(),
                    lease: Duration::from_secs(10),
                    overlap: Duration::from_secs(5),
                    targets: tests::webhook_receiver::LOOPBACK_TARGETS,
                },
                self.events.clone(),
                self.source.clone(),
                self.view.clone(),
                Arc::new(SystemClock),
            )
            .unwrap_or_else(|e| panic!("{e:#}")),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = stopped.await;
        }));
        *self.delivery.lock().unwrap_or_else(PoisonError::into_inner) = Some((stop, task));
    }

    /// Stops the webhook dispatcher gracefully (it saves its position and releases the lease).
    async fn stop_delivery(&self) {
        let running = self
            .delivery
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((stop, task)) = running {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .unwrap_or_else(|_| panic!("the dispatcher did not stop"))
                .unwrap_or_else(|e| panic!("dispatcher task: {e}"));
        }
    }

    async fn saved(&self) -> Option<DeliveryState> {
        self.view
            .checkpoint(CHECKPOINT)
            .await
            .ok()
            .flatten()
            .and_then(|raw| serde_json::from_str(&raw).ok())
    }

    /// Waits (bounded, 180 s) until the saved delivery state satisfies `done`.
    async fn wait_state(&self, what: &str, done: impl Fn(&DeliveryState) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            if self.saved().await.is_some_and(|s| done(&s)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {:?}",
                self.saved().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers `n` sandboxes named `{prefix}-{i}` and projects them.
    async fn register(&self, prefix: &str, n: usize) -> Vec<String> {
        let meta = meta();
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-id-{i}")).collect();
        use futures::StreamExt;
        futures::stream::iter(ids.iter().enumerate())
            .for_each_concurrent(16, |(i, id)| {
                let meta = meta.clone();
                async move {
                    self.broker
                        .execute(
                            id,
                            SandboxCommand::Register {
                                sandbox_id: id.clone(),
                                name: format!("{prefix}-{i:04}"),
                                external_id: format!("identity/accounts/{id}"),
                                sfdc_account_id: None,
                                csp_created_at: None,
                            },
                            &meta,
                        )
                        .await
                        .unwrap_or_else(|e| panic!("register {id}: {e}"));
                    repair_row(self.events.as_ref(), self.view.as_ref(), id)
                        .await
                        .unwrap_or_else(|e| panic!("project {id}: {e}"));
                }
            })
            .await;
        ids
    }

    /// How many sandboxes named `{prefix}-…` the stored events show available (one scan).
    async fn free(&self, prefix: &str) -> usize {
        let events = all_events(self.events.as_ref()).await;
        sandbox_states(&events)
            .values()
            .filter(|s| s.name.starts_with(&format!("{prefix}-")))
            .filter(|s| s.status == Some(SandboxStatus::Available))
            .count()
    }

    /// Waits (bounded, 60 s) until two counts of the free `prefix` sandboxes 200 ms apart agree:
    /// an abandoned request's write may still be landing (DynamoDB finishes a request whose
    /// client has gone). Returns the count.
    async fn settled_free(&self, prefix: &str) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = self.free(prefix).await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.free(prefix).await;
            if now == last || tokio::time::Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// Allocates the free `prefix` sandboxes to fresh callers, eight requests at a time, each
    /// worker until its first 409. Sandboxes are single-use, so if any is still free once every
    /// request has ended, each of those 409s was answered while it was free: all of them count
    /// as false.
    async fn drain(&self, prefix: &str, tag: &str) -> Drain {
        let free_before = self.settled_free(prefix).await;
        let started = Instant::now();
        let first = Mutex::new(None::<Duration>);
        let allocated = AtomicU64::new(0);
        let refused = AtomicU64::new(0);
        let next = AtomicU64::new(0);
        let worker = || async {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let request = AllocateRequest {
                    caller: format!("{tag}-drain-{n}"),
                    name_prefix: Some(format!("{prefix}-")),
                    ..AllocateRequest::default()
                };
                match self.broker.allocate(&request, &meta()).await {
                    Ok(_) => {
                        allocated.fetch_add(1, Ordering::Relaxed);
                        first
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(started.elapsed());
                    }
                    Err(BrokerError::NoSandboxAvailable { .. }) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => panic!("{tag}: a drain request without faults failed: {e}"),
                }
            }
        };
        futures::future::join_all((0..8).map(|_| worker())).await;
        let free_after = self.free(prefix).await;
        let allocated = allocated.load(Ordering::Relaxed);
        let first = first.into_inner().unwrap_or_else(PoisonError::into_inner);
        assert!(
            allocated <= free_before as u64,
            "{tag}: {free_before} sandboxes were free, the drain allocated {allocated}"
        );
        Drain {
            free_before,
            allocated,
            false_409s: if free_after > 0 {
                refused.load(Ordering::Relaxed)
            } else {
                0
            },
            first,
            elapsed: started.elapsed(),
        }
    }
}

/// What a drain found.
struct Drain {
    /// Sandboxes free when it began.
    free_before: usize,
    /// Sandboxes it allocated (fewer than were free only if an abandoned write landed late).
    allocated: u64,
    /// 409s answered while a sandbox was free.
    false_409s: u64,
    /// From its start to its first allocation.
    first: Option<Duration>,
    /// Until every free sandbox was allocated and each worker had its 409.
    elapsed: Duration,
}

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    }
}

/// One row of the allocation table.
struct AllocationRow {
    store: &'static str,
    phase: String,
    requests: u64,
    faulted: u64,
    acknowledged: u64,
    false_409s: u64,
    drain: Drain,
}

/// Phase 1: `burst_requests` allocations, 64 at a time, each abandoned after 1 ms to
/// `max_timeout_ms`; then the drain.
async fn burst_with_timeouts(rig: &Rig, sizes: &Sizes, rng: &mut StdRng) -> AllocationRow {
    rig.register("burst", sizes.burst_pool).await;
    let timeouts: Vec<u64> = (0..sizes.burst_requests)
        .map(|_| rng.random_range(1..=sizes.max_timeout_ms))
        .collect();
    let results = futures::stream::iter(timeouts.into_iter().enumerate().map(|(i, ms)| {
        let request = AllocateRequest {
            caller: format!("burst-student-{i}"),
            name_prefix: Some("burst-".into()),
            ..AllocateRequest::default()
        };
        async move {
            let meta = meta();
            tokio::time::timeout(
                Duration::from_millis(ms),
                rig.broker.allocate(&request, &meta),
            )
            .await
        }
    }));
    use futures::StreamExt;
    let outcomes: Vec<_> = results.buffer_unordered(64).collect().await;
    let cancelled = outcomes.iter().filter(|o| o.is_err()).count() as u64;
    let acknowledged = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count() as u64;
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Err(BrokerError::NoSandboxAvailable { .. }))))
        .count() as u64;
    let drain = rig.drain("burst", "burst").await;
    AllocationRow {
        store: rig.label,
        phase: format!(
            "burst of {} requests, client timeouts 1-{} ms",
            sizes.burst_requests, sizes.max_timeout_ms
        ),
        requests: sizes.burst_requests as u64,
        faulted: cancelled,
        acknowledged,
        // The pool outnumbers the burst: a sandbox was free all through every call.
        false_409s: refused + drain.false_409s,
        drain,
    }
}

/// Phase 2: students allocate eight at a time while `unknown_rate` of the appends fail with an
/// unknown outcome; each retries with its key until answered. The pool is twice the students,
/// so a sandbox is free all through every call and any 409 is false. Then the faults stop and
/// the drain runs.
async fn unknown_outcomes(rig: &Rig, sizes: &Sizes) -> AllocationRow {
    rig.register("unknown", sizes.unknown_pool).await;
    rig.faults.per_mille.store(
        (sizes.unknown_rate * 1000.0).round() as u32,
        Ordering::SeqCst,
    );
    let requests = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let acknowledged = AtomicU64::new(0);
    let students: Vec<usize> = (0..sizes.unknown_pool / 2).collect();
    use futures::StreamExt;
    futures::stream::iter(students)
        .for_each_concurrent(8, |i| {
            let (requests, refused, acknowledged) = (&requests, &refused, &acknowledged);
            async move {
                let request = AllocateRequest {
                    caller: format!("unknown-student-{i}"),
                    name_prefix: Some("unknown-".into()),
                    ..AllocateRequest::default()
                };
                for _ in 0..50 {
                    requests.fetch_add(1, Ordering::Relaxed);
                    match rig.broker.allocate(&request, &meta()).await {
                        Ok(_) => {
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(BrokerError::NoSandboxAvailable { .. }) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        // 503: the student retries with the same key.
                        Err(_) => {}
                    }
                }
                panic!("unknown-student-{i} was never answered");
            }
        })
        .await;
    rig.faults.per_mille.store(0, Ordering::SeqCst);
    let faulted =
        rig.faults.applied.load(Ordering::Relaxed) + rig.faults.not_applied.load(Ordering::Relaxed);
    let drain = rig.drain("unknown", "unknown").await;
    AllocationRow {
        store: rig.label,
        phase: format!(
            "{} students, unknown outcomes at {:.0} % of appends",
            sizes.unknown_pool / 2,
            sizes.unknown_rate * 100.0
        ),
        requests: requests.load(Ordering::Relaxed),
        faulted,
        acknowledged: acknowledged.load(Ordering::Relaxed),
        false_409s: refused.load(Ordering::Relaxed) + drain.false_409s,
        drain,
    }
}

/// What phase 3 saw of the notifications.
struct NotificationRow {
    store: &'static str,
    expected: usize,
    arrived_before_rebuild: usize,
    delivered: usize,
    duplicates: usize,
    lost: usize,
}

/// Phase 3: the subscriber's dispatcher starts on the backlog of both phases; once delivery is
/// under way the view is rebuilt in place; then every notification the events call for is
/// waited for and counted.
async fn rebuild_during_delivery(rig: &Rig) -> NotificationRow {
    let events = all_events(rig.events.as_ref()).await;
    let expected: HashSet<String> = events
        .iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "SandboxAllocated" | "DeletionRequested"
            )
        })
        .map(|e| e.event_id.to_string())
        .collect();
    rig.start_delivery().await;
    rig.receiver
        .wait_counts("delivery under way", Duration::from_secs(120), |c| {
            c.len() >= 10
        })
        .await;
    let arrived_before_rebuild = rig.receiver.counts().len();
    projector::rebuild::rebuild_into(
        rig.events.clone(),
        rig.view.clone(),
        &projector::rebuild::RebuildOptions::default(),
        Arc::new(projector::rebuild::RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("rebuild: {e}"));
    rig.receiver
        .wait_counts("every notification", Duration::from_secs(300), |c| {
            expected.iter().all(|id| c.contains_key(id))
        })
        .await;
    // Past every event for good before counting repeats.
    match &rig.log {
        Some(log) => {
            let head = log.log_head().await.unwrap_or_else(|e| panic!("{e}"));
            rig.wait_state("the log head", |s| s.sequence >= Some(head))
                .await;
        }
        None => {
            let last = events
                .iter()
                .map(domain::audit::feed_key)
                .max()
                .unwrap_or_default();
            rig.wait_state("the watermark past every event", |s| {
                s.watermark.as_deref().is_some_and(|w| w >= last.as_str())
            })
            .await;
        }
    }
    rig.stop_delivery().await;
    let counts: HashMap<String, usize> = rig.receiver.counts();
    NotificationRow {
        store: rig.label,
        expected: expected.len(),
        arrived_before_rebuild,
        delivered: counts.len(),
        duplicates: counts.values().map(|n| n - 1).sum(),
        lost: expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .count(),
    }
}

/// All three phases on one store; asserts the promises and returns the figures.
async fn run(backend: Backend) -> (Vec<AllocationRow>, NotificationRow) {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos_liveness {backend:?}: CHAOS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let sizes = sizes(backend);
    let rig = Rig::start(backend, seed).await;
    let burst = burst_with_timeouts(&rig, &sizes, &mut rng).await;
    let unknown = unknown_outcomes(&rig, &sizes).await;
    let notifications = rebuild_during_delivery(&rig).await;

    let audit = AllocationAudit::replay(&all_events(rig.events.as_ref()).await);
    assert!(
        audit.double_allocations().is_empty(),
        "double allocations: {:?}",
        audit.double_allocations()
    );
    assert!(
        audit.callers_holding_two().is_empty(),
        "callers holding two: {:?}",
        audit.callers_holding_two()
    );
    for row in [&burst, &unknown] {
        assert_eq!(row.false_409s, 0, "{}: false 409s", row.phase);
    }
    assert_eq!(notifications.lost, 0, "lost notifications");
    assert_eq!(notifications.duplicates, 0, "repeated notifications");
    if let Some(dir) = &rig.dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    (vec![burst, unknown], notifications)
}

fn print_tables(allocations: &[AllocationRow], notifications: &[NotificationRow]) {
    let mut out = String::from(
        "| store | phase | requests | cancelled / faulted | acknowledged | false 409s | free after the faults | allocated by the drain | first allocation after the faults | drain time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in allocations {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s |\n",
            row.store,
            row.phase,
            row.requests,
            row.faulted,
            row.acknowledged,
            row.false_409s,
            row.drain.free_before,
            row.drain.allocated,
            row.drain
                .first
                .map_or("none free".into(), |d| format!("{} ms", d.as_millis())),
            row.drain.elapsed.as_secs_f64()
        ));
    }
    out.push_str(
        "\n| store | notifications expected | arrived before the rebuild | delivered | duplicates | lost |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for row in notifications {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.store,
            row.expected,
            row.arrived_before_rebuild,
            row.delivered,
            row.duplicates,
            row.lost
        ));
    }
    println!("{out}");
}

/// Embedded file store: no false 409 after a burst of 3,000 requests with 1-8 ms timeouts or under 10 %
/// unknown-outcome appends, no double allocation, every notification once across a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_figures_embedded() {
    let (allocations, notifications) = run(Backend::Embedded).await;
    print_tables(&allocations, &[notifications]);
}

/// DynamoDB Local: the same promises after a burst of 1,000 requests with 1-400 ms timeouts
/// and under 10 % unknown outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_figures_dynamodb() {
    let _turn = tests::ddb_local::heavy_load().await;
    let (allocations, notifications) = run(Backend::Dynamo).await;
    print_tables(&allocations, &[notifications]);
}
