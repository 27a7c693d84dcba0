//! A model-based property test of the broker on the real stores (docs/liveness.md, "The property
//! tests"): random allocations, requests cancelled after a random time, appends with an unknown
//! outcome (applied or not, the reads after failing too), appends that never answer, marks,
//! bursts of concurrent requests, and restarts of the process (graceful: the broker's memory is
//! gone, the webhook dispatcher hands its lease over) or crashes (the dispatcher dies holding its
//! lease), on the embedded file store or DynamoDB Local, with a webhook subscriber on 127.0.0.1.
//!
//! After every step, against what the store holds:
//! * no sandbox is allocated twice (at most one `SandboxAllocated` per sandbox stream);
//! * no caller holds two live allocations (the caller is the idempotency key here);
//! * no acknowledged allocation is lost, and a replay returns the acknowledged sandbox;
//! * no 409 while the model had an allocatable sandbox for the request during the whole call:
//!   sandboxes are single-use, so one still available when the call has ended was available all
//!   through it;
//! * every notification the stored events call for arrives (waited for, with a deadline), and
//!   nothing else does (after de-duplication by id: no notification for an event that did not
//!   land).
//!
//! At the end of a case the dispatcher is let run until its position is past every event of the
//! case for good; in a case without restarts or crashes each notification then arrived exactly
//! once. Cases share one store, each in its own namespace (sandbox names, callers, subscriber).
//!
//! Run by the `it` test `liveness_model::` (a bounded number of cases) and by the bench
//! `cargo run --release -p tests --features bench --bin liveness-model -- --store embedded
//! --cases 500` (cases per second, and the seed of a failure).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use command_api::webhooks::{
    load_subscribers, DeliverySettings, DeliveryState, Dispatcher, EventSource,
};
use domain::audit::feed_key;
use domain::model::events::BrokerEvent;
use domain::model::ids::sandbox_stream;
use domain::model::lifecycle::SandboxStatus;
use domain::model::projection::{project, PoolRow};
use domain::model::sandbox::SandboxCommand;
use domain::store::{repair_row, EventLog, EventStore, StoreError, ViewStore};
use domain::{
    Actor, AllocateRequest, Allocation, Broker, BrokerConfig, BrokerError, CommandMeta,
    EventEnvelope, SystemClock,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use store_embedded::EmbeddedStore;

use crate::intercepted::{AppendPlan, InterceptedStore, StoreHook, StreamRead};
use crate::webhook_receiver::Receiver;

/// Which store the cases run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStore {
    /// An embedded store in a fresh file (group commit, reader threads, the log).
    EmbeddedFile,
    /// Fresh tables on DynamoDB Local (the time index, index shards).
    DynamoLocal,
}

/// How many cases, how long, from which seed.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store.
    pub store: ModelStore,
    /// Random cases to run.
    pub cases: u32,
    /// Most steps per case.
    pub max_steps: usize,
    /// The seed of the case generator: the same seed runs the same cases.
    pub seed: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Cases that passed (when one failed, also the passing runs of its shrinking).
    pub cases: u32,
    /// Steps run.
    pub steps: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Restarts and crashes among the steps.
    pub restarts: usize,
    /// Notifications that arrived more than once (only after a restart or crash).
    pub repeated_notifications: usize,
    /// Notifications that arrived.
    pub notifications: usize,
}

/// A fault the next append meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The write lands; the caller is told `Unavailable`.
    FailApplied,
    /// Nothing lands; the caller is told `Unavailable`.
    FailNotApplied,
    /// Nothing lands; the caller is told `Unavailable`, and the next `n` stream reads fail.
    FailNotAppliedThenReads(usize),
    /// The append never answers; nothing lands.
    Hang,
}

/// One step of a case.
#[derive(Debug, Clone)]
enum Op {
    /// An allocation by `caller-{n}`.
    Allocate(u8),
    /// The same, abandoned after `after_ms` (the client went away, a timeout fired).
    Cancelled { caller: u8, after_ms: u8 },
    /// The owner marks its acknowledged allocation for deletion, if it has one.
    Mark(u8),
    /// The next append meets this fault.
    Fault(Fault),
    /// The process restarts: a new broker (its memory gone); the dispatcher stops gracefully
    /// and a new one takes over.
    Restart,
    /// The process dies: a new broker; the dispatcher is aborted holding its lease, and a new
    /// one takes over once the lease lapses.
    Crash,
    /// Concurrent allocations, no faults pending.
    Burst(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let caller = 0u8..6;
    prop_oneof![
        4 => caller.clone().prop_map(Op::Allocate),
        2 => (caller.clone(), 0u8..30).prop_map(|(caller, after_ms)| Op::Cancelled { caller, after_ms }),
        1 => caller.clone().prop_map(Op::Mark),
        3 => prop_oneof![
            Just(Fault::FailApplied),
            Just(Fault::FailNotApplied),
            (1usize..3).prop_map(Fault::FailNotAppliedThenReads),
            Just(Fault::Hang),
        ]
        .prop_map(Op::Fault),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => proptest::collection::vec(caller, 2..5).prop_map(Op::Burst),
    ]
}

/// The faults queued for the broker's appends, and the hang signal.
#[derive(Default)]
struct Faults {
    queued: Mutex<VecDeque<Fault>>,
    failing_reads: AtomicUsize,
    /// Wakes the step whose call reached a hung append.
    hung: tokio::sync::Notify,
}

impl Faults {
    fn push(&self, fault: Fault) {
        self.queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(fault);
    }

    fn clear(&self) {
        self.queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.failing_reads.store(0, Ordering::SeqCst);
    }
}

/// The hook that puts [`Faults`] into the broker's event store.
struct FaultHook(Arc<Faults>);

#[async_trait]
impl StoreHook for FaultHook {
    async fn before_read(&self, _stream_id: &str, _read: StreamRead) -> Result<(), StoreError> {
        let failing = self
            .0
            .failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match failing {
            Ok(_) => Err(StoreError::Unavailable("injected: read failed".into())),
            Err(_) => Ok(()),
        }
    }

    async fn before_append(&self, _events: &[EventEnvelope]) -> AppendPlan {
        let fault = self
            .0
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        match fault {
            None => AppendPlan::Proceed,
            Some(Fault::FailApplied) => AppendPlan::ApplyThenFail,
            Some(Fault::FailNotApplied) => AppendPlan::Fail,
            Some(Fault::FailNotAppliedThenReads(n)) => {
                self.0.failing_reads.store(n, Ordering::SeqCst);
                AppendPlan::Fail
            }
            Some(Fault::Hang) => {
                self.0.hung.notify_waiters();
                AppendPlan::Hang
            }
        }
    }
}

/// The store of a run, shared by its cases.
struct Env {
    events: Arc<dyn EventStore>,
    view: Arc<dyn ViewStore>,
    source: EventSource,
    log: Option<Arc<dyn EventLog>>,
    /// The embedded store's directory, removed after the run.
    dir: Option<std::path::PathBuf>,
}

impl Env {
    async fn open(store: ModelStore) -> Env {
        match store {
            ModelStore::EmbeddedFile => {
                let dir =
                    std::env::temp_dir().join(format!("broker-model-{}", uuid::Uuid::new_v4()));
                let path = dir.join("broker.db");
                let store = Arc::new(
                    EmbeddedStore::open(&path, 4)
                        .unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
                );
                Env {
                    events: store.clone(),
                    view: store.clone(),
                    source: EventSource::Log(store.clone()),
                    log: Some(store),
                    dir: Some(dir),
                }
            }
            ModelStore::DynamoLocal => {
                let store = Arc::new(crate::ddb_local::fresh_store(4).await);
                Env {
                    events: store.clone(),
                    view: store.clone(),
                    source: EventSource::TimeIndex(store),
                    log: None,
                    dir: None,
                }
            }
        }
    }
}

/// Bound on a call that meets no hang: generous, so that a slow machine never ends one early.
const CALL_BOUND: Duration = Duration::from_secs(60);
/// Bound on waiting for notifications and for the dispatcher's position.
const DELIVERY_BOUND: Duration = Duration::from_secs(60);
const SECRET: &str = "model-receiver-secret-0123456789abcdef";

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    }
}

/// The broker of the cases: no hold for unsettled outcomes, so any 409 while a sandbox is free
/// is a failure (the hold is a documented bounded exception, tested apart).
fn broker(events: Arc<dyn EventStore>, env: &Env) -> Broker {
    Broker::new(
        events,
        env.view.clone(),
        Arc::new(SystemClock),
        BrokerConfig {
            unknown_outcome_hold: Duration::ZERO,
            ..BrokerConfig::default()
        },
    )
}

/// A running webhook dispatcher of one case.
struct Delivery {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Delivery {
    /// A case that failed half-way leaves no dispatcher running behind it (a stopped one is
    /// already finished, and aborting it does nothing).
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One case: its namespace, the broker, the subscriber, and what it was told.
struct Case<'a> {
    env: &'a Env,
    tag: String,
    faults: Arc<Faults>,
    faulty: Arc<dyn EventStore>,
    broker: Broker,
    receiver: Receiver,
    delivery: Delivery,
    sandboxes: Vec<String>,
    /// Caller → the sandbox it was answered with (and has not ended).
    acknowledged: HashMap<String, String>,
    restarts: usize,
}

impl<'a> Case<'a> {
    fn caller(&self, n: u8) -> String {
        format!("{}-caller-{n}", self.tag)
    }

    fn request(&self, who: &str) -> AllocateRequest {
        AllocateRequest {
            caller: who.to_string(),
            name_prefix: Some(format!("{}-", self.tag)),
            ..AllocateRequest::default()
        }
    }

    fn subscriber(&self) -> String {
        format!("model-{}", self.tag)
    }

    fn checkpoint(&self) -> String {
        format!("webhooks:{}", self.subscriber())
    }

    /// Starts a dispatcher for the case's subscriber and waits until its tenure has stamped the
    /// delivery state (a new subscriber hears what happens from then on).
    async fn start_delivery(
        env: &Env,
        subscriber: &str,
        tag: &str,
        url: &str,
        previous_fence: u64,
    ) -> Result<Delivery, TestCaseError> {
        let json = serde_json::json!({"subscribers": [{
            "name": subscriber, "url": url, "secret": SECRET,
            "prefixes": [format!("{tag}-")], "kinds": ["allocation", "release"],
        }]})
        .to_string();
        let subscribers = load_subscribers(
            None,
            Some(&json.as_str().into()),
            crate::webhook_receiver::LOOPBACK_TARGETS,
        )
        .map_err(|e| TestCaseError::fail(format!("subscribers: {e:#}")))?;
        let dispatcher = Arc::new(
            Dispatcher::new(
                subscribers,
                DeliverySettings {
                    retry_base: Duration::from_millis(10),
                    retry_cap: Duration::from_millis(200),
                    max_attempts: 50,
                    timeout: Duration::from_secs(10),
                    poll: Duration::from_millis(10),
                    settle: Duration::ZERO,
                    expiry_warning: chrono::Duration::minutes(30),
                    low_water: Default::default(),
                    lease: Duration::from_millis(900),
                    overlap: Duration::from_secs(2),
                    targets: crate::webhook_receiver::LOOPBACK_TARGETS,
                },
                env.events.clone(),
                env.source.clone(),
                env.view.clone(),
                Arc::new(SystemClock),
            )
            .map_err(|e| TestCaseError::fail(format!("dispatcher: {e:#}")))?,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = stopped.await;
        }));
        let checkpoint = format!("webhooks:{subscriber}");
        wait_for(DELIVERY_BOUND, "the dispatcher's tenure", || async {
            Ok(saved(env, &checkpoint)
                .await?
                .is_some_and(|s| s.fence > previous_fence))
        })
        .await?;
        Ok(Delivery {
            stop: Some(stop),
            task,
        })
    }

    /// Stops the dispatcher: gracefully (it saves and releases its lease) or by aborting it
    /// (a crash: the lease is left to lapse).
    async fn stop_delivery(&mut self, graceful: bool) -> Result<(), TestCaseError> {
        if graceful {
            if let Some(stop) = self.delivery.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(DELIVERY_BOUND, &mut self.delivery.task)
                .await
                .map_err(|_| TestCaseError::fail("the dispatcher did not stop"))?
                .map_err(|e| TestCaseError::fail(format!("dispatcher task: {e}")))?;
        } else {
            self.delivery.task.abort();
            let _ = (&mut self.delivery.task).await;
        }
        Ok(())
    }

    async fn restart(&mut self, graceful: bool) -> Result<(), TestCaseError> {
        self.restarts += 1;
        self.faults.clear();
        self.broker = broker(self.faulty.clone(), self.env);
        self.stop_delivery(graceful).await?;
        let fence = saved(self.env, &self.checkpoint())
            .await?
            .map_or(0, |s| s.fence);
        self.delivery = Self::start_delivery(
            self.env,
            &self.subscriber(),
            &self.tag,
            &self.receiver.url,
            fence,
        )
        .await?;
        Ok(())
    }

    /// The case's sandboxes as their stored events make them (the truth), with those events.
    async fn truth(&self) -> Result<(Vec<PoolRow>, Vec<EventEnvelope>), TestCaseError> {
        let mut rows = Vec::new();
        let mut all = Vec::new();
        for id in &self.sandboxes {
            let events = self
                .env
                .events
                .load(&sandbox_stream(id))
                .await
                .map_err(|e| TestCaseError::fail(format!("load {id}: {e}")))?;
            let mut row = None;
            for envelope in &events {
                if let Ok(BrokerEvent::Sandbox(event)) = envelope.decode() {
                    row = project(row, envelope, &event).0;
                }
            }
            rows.extend(row);
            all.extend(events);
        }
        Ok((rows, all))
    }

    async fn available(&self) -> Result<usize, TestCaseError> {
        Ok(self
            .truth()
            .await?
            .0
            .iter()
            .filter(|r| r.status == SandboxStatus::Available)
            .count())
    }

    /// Checks one allocation answer; `available_after` is the truth once the call had ended.
    fn answered(
        &mut self,
        who: &str,
        result: Result<Allocation, BrokerError>,
        available_after: usize,
    ) -> Result<(), TestCaseError> {
        match result {
            Ok(allocation) => {
                let id = allocation.sandbox.sandbox_id.clone();
                prop_assert_eq!(allocation.sandbox.owner.as_deref(), Some(who));
                if let Some(held) = self.acknowledged.get(who) {
                    prop_assert_eq!(held, &id, "a replay returns the acknowledged sandbox");
                    prop_assert!(allocation.replayed);
                }
                self.acknowledged.insert(who.to_string(), id);
            }
            Err(BrokerError::NoSandboxAvailable { .. }) => {
                prop_assert!(
                    !self.acknowledged.contains_key(who),
                    "{} holds a live allocation but was answered 409",
                    who
                );
                prop_assert_eq!(
                    available_after,
                    0,
                    "409 while a sandbox was allocatable all through the call"
                );
            }
            Err(BrokerError::Store(_)) => {}
            Err(other) => return Err(TestCaseError::fail(format!("{who}: {other:?}"))),
        }
        Ok(())
    }

    /// Runs `call` until it answers or reaches a hung append (then it is dropped there, as a
    /// timeout would): `None` when it hung.
    async fn call<T>(&self, call: impl Future<Output = T>) -> Result<Option<T>, TestCaseError> {
        let hung = self.faults.hung.notified();
        tokio::pin!(hung);
        hung.as_mut().enable();
        tokio::select! {
            out = tokio::time::timeout(CALL_BOUND, call) => out
                .map(Some)
                .map_err(|_| TestCaseError::fail("a call that met no hang did not answer")),
            () = hung => Ok(None),
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Allocate(n) => {
                let who = self.caller(*n);
                let request = self.request(&who);
                let meta = meta();
                let answer = self.call(self.broker.allocate(&request, &meta)).await?;
                if let Some(result) = answer {
                    let after = self.available().await?;
                    self.answered(&who, result, after)?;
                }
            }
            Op::Cancelled { caller, after_ms } => {
                let who = self.caller(*caller);
                let request = self.request(&who);
                let meta = meta();
                let within = Duration::from_millis(u64::from(*after_ms));
                let answer =
                    tokio::time::timeout(within, self.broker.allocate(&request, &meta)).await;
                if let Ok(result) = answer {
                    let after = self.available().await?;
                    self.answered(&who, result, after)?;
                }
            }
            Op::Mark(n) => {
                let who = self.caller(*n);
                if let Some(id) = self.acknowledged.get(&who).cloned() {
                    let meta = meta();
                    let _ = self
                        .call(self.broker.mark_for_deletion(&id, &who, &meta))
                        .await?;
                    // Whatever it answered, the store says whether it ended.
                    let (rows, _) = self.truth().await?;
                    if rows
                        .iter()
                        .any(|r| r.sandbox_id == id && r.status != SandboxStatus::Allocated)
                    {
                        self.acknowledged.remove(&who);
                    }
                }
            }
            Op::Fault(fault) => self.faults.push(*fault),
            Op::Restart => self.restart(true).await?,
            Op::Crash => self.restart(false).await?,
            Op::Burst(callers) => {
                self.faults.clear();
                let callers: Vec<String> = callers
                    .iter()
                    .map(|n| self.caller(*n))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                let requests: Vec<AllocateRequest> =
                    callers.iter().map(|c| self.request(c)).collect();
                let meta = meta();
                let calls = requests.iter().map(|r| self.broker.allocate(r, &meta));
                let results = tokio::time::timeout(CALL_BOUND, futures::future::join_all(calls))
                    .await
                    .map_err(|_| TestCaseError::fail("a burst without faults did not finish"))?;
                let after = self.available().await?;
                for (who, result) in callers.iter().zip(results) {
                    self.answered(who, result, after)?;
                }
            }
        }
        self.check().await
    }

    /// The invariants over the stored events, and the notifications they call for.
    async fn check(&self) -> Result<(), TestCaseError> {
        // The view catches up between steps (a projector would, a moment later).
        for id in &self.sandboxes {
            repair_row(self.env.events.as_ref(), self.env.view.as_ref(), id)
                .await
                .map_err(|e| TestCaseError::fail(format!("repair {id}: {e}")))?;
        }
        // What arrived is read before the truth: an event landing in between (a cancelled
        // append finishing late) is then in the truth if its notification arrived.
        let arrived = self.receiver.counts();
        let (rows, events) = self.truth().await?;
        let mut allocated: HashMap<&str, usize> = HashMap::new();
        for event in &events {
            if event.event_type == "SandboxAllocated" {
                *allocated.entry(event.stream_id.as_str()).or_default() += 1;
            }
        }
        for (stream, grants) in &allocated {
            prop_assert!(*grants <= 1, "{} allocated {} times", stream, grants);
        }
        let mut live_owners = HashSet::new();
        for row in rows.iter().filter(|r| r.status == SandboxStatus::Allocated) {
            let owner = row.owner.clone().unwrap_or_default();
            prop_assert!(
                live_owners.insert(owner.clone()),
                "{} holds two live allocations",
                owner
            );
        }
        for (who, id) in &self.acknowledged {
            let row = rows.iter().find(|r| &r.sandbox_id == id);
            prop_assert!(
                row.is_some_and(|r| r.status == SandboxStatus::Allocated
                    && r.owner.as_deref() == Some(who.as_str())),
                "the acknowledged allocation of {} ({}) is lost: {:?}",
                who,
                id,
                row
            );
        }
        let expected = notified(&events);
        for id in arrived.keys() {
            prop_assert!(
                expected.contains(id),
                "notification {} arrived for no stored event",
                id
            );
        }
        wait_for(DELIVERY_BOUND, "every notification", || async {
            let arrived = self.receiver.counts();
            Ok(expected.iter().all(|id| arrived.contains_key(id)))
        })
        .await
    }

    /// Lets the dispatcher pass every event of the case for good, then stops it; in a case
    /// without restarts, every notification arrived exactly once.
    async fn finish(&mut self) -> Result<(usize, usize), TestCaseError> {
        let (_, events) = self.truth().await?;
        let checkpoint = self.checkpoint();
        match &self.env.log {
            Some(log) => {
                let head = log
                    .log_head()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                wait_for(DELIVERY_BOUND, "the log head", || async {
                    Ok(saved(self.env, &checkpoint)
                        .await?
                        .is_some_and(|s| s.sequence >= Some(head)))
                })
                .await?;
            }
            None => {
                let last = events.iter().map(feed_key).max().unwrap_or_default();
                wait_for(DELIVERY_BOUND, "the watermark past the case", || async {
                    Ok(saved(self.env, &checkpoint)
                        .await?
                        .and_then(|s| s.watermark)
                        .is_some_and(|w| w >= last))
                })
                .await?;
            }
        }
        self.stop_delivery(true).await?;
        let counts = self.receiver.counts();
        let repeated: usize = counts.values().map(|n| n - 1).sum();
        if self.restarts == 0 {
            prop_assert_eq!(repeated, 0, "a notification arrived twice with one holder");
        }
        Ok((repeated, counts.len()))
    }
}

/// The ids of the notifications `events` call for (allocations and releases).
fn notified(events: &[EventEnvelope]) -> HashSet<String> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "SandboxAllocated" | "DeletionRequested"
            )
        })
        .map(|e| e.event_id.to_string())
        .collect()
}

/// A subscriber's saved delivery state.
async fn saved(env: &Env, checkpoint: &str) -> Result<Option<DeliveryState>, TestCaseError> {
    Ok(env
        .view
        .checkpoint(checkpoint)
        .await
        .map_err(|e| TestCaseError::fail(format!("checkpoint: {e}")))?
        .and_then(|raw| serde_json::from_str(&raw).ok()))
}

/// Polls `done` until it holds, failing the case after `within`.
async fn wait_for<F, Fut>(within: Duration, what: &str, done: F) -> Result<(), TestCaseError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<bool, TestCaseError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if done().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TestCaseError::fail(format!(
                "{what}: not within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counters of a run, added to by its cases.
#[derive(Default)]
struct Tally {
    cases: AtomicUsize,
    steps: AtomicUsize,
    restarts: AtomicUsize,
    repeated: AtomicUsize,
    notifications: AtomicUsize,
}

/// One case: a pool of `pool` sandboxes and the steps `ops`.
async fn run_case(env: &Env, pool: usize, ops: &[Op], tally: &Tally) -> Result<(), TestCaseError> {
    let tag = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let faults = Arc::new(Faults::default());
    let faulty: Arc<dyn EventStore> = Arc::new(InterceptedStore::with_hook(
        env.events.clone(),
        FaultHook(faults.clone()),
    ));
    let receiver = Receiver::start().await;
    let subscriber = format!("model-{tag}");
    let delivery = Case::start_delivery(env, &subscriber, &tag, &receiver.url, 0).await?;
    let broker = broker(faulty.clone(), env);
    let mut sandboxes = Vec::new();
    for i in 0..pool {
        let id = format!("{tag}-id-{i}");
        broker
            .execute(
                &id,
                SandboxCommand::Register {
                    sandbox_id: id.clone(),
                    name: format!("{tag}-{i}"),
                    external_id: format!("identity/accounts/{tag}-{i}"),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                &meta(),
            )
            .await
            .map_err(|e| TestCaseError::fail(format!("register {id}: {e}")))?;
        sandboxes.push(id);
    }
    let mut case = Case {
        env,
        tag,
        faults,
        faulty,
        broker,
        receiver,
        delivery,
        sandboxes,
        acknowledged: HashMap::new(),
        restarts: 0,
    };
    case.check().await?;
    for op in ops {
        case.step(op).await?;
    }
    let (repeated, notifications) = case.finish().await?;
    tally.cases.fetch_add(1, Ordering::Relaxed);
    tally.steps.fetch_add(ops.len(), Ordering::Relaxed);
    tally.restarts.fetch_add(case.restarts, Ordering::Relaxed);
    tally.repeated.fetch_add(repeated, Ordering::Relaxed);
    tally
        .notifications
        .fetch_add(notifications, Ordering::Relaxed);
    Ok(())
}

/// Runs `options.cases` random cases (proptest shrinks a failure to a short one); a failure is
/// `Err` naming the seed that reproduces it and the shrunk case.
pub fn run(options: &RunOptions) -> Result<RunReport, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let env = runtime.block_on(Env::open(options.store));
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&options.seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: options.cases,
            failure_persistence: None,
            // Every shrinking run is a real case against a real store.
            max_shrink_iters: 256,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = (
        1usize..6,
        proptest::collection::vec(op(), 1..options.max_steps.max(2)),
    );
    let tally = Tally::default();
    let started = Instant::now();
    let outcome = runner.run(&strategy, |(pool, ops)| {
        runtime.block_on(run_case(&env, pool, &ops, &tally))
    });
    let dir = env.dir.clone();
    drop(env);
    // The runtime's tasks (receivers, lingering reads) hold the store too: end them first.
    drop(runtime);
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let report = RunReport {
        cases: u32::try_from(tally.cases.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
        steps: tally.steps.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        restarts: tally.restarts.load(Ordering::Relaxed),
        repeated_notifications: tally.repeated.load(Ordering::Relaxed),
        notifications: tally.notifications.load(Ordering::Relaxed),
    };
    outcome
        .map(|()| report)
        .map_err(|e| format!("seed {} ({:?}): {e}", options.seed, options.store))
}
