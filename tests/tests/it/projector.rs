//! The projector's sources end to end: the DynamoDB Streams poller on DynamoDB Local's real
//! stream, the Lambda handler fed real stream records, and the embedded log tail — convergence,
//! redelivery, reordering across gaps, crashes at random points, poison records, rebuild and
//! verify. Events are produced by `domain::Broker` commands, so they are the real thing.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::model::sandbox::SandboxCommand;
use domain::store::{EventStore, PoolView, StoreError, ViewStore};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, EventEnvelope, PoolRow, PoolStats,
    SandboxStatus, SystemClock,
};
use projector::dynamo_streams::DynamoStreams;
use projector::poller::{
    IteratorStart, PollerConfig, RecordBatch, ShardInfo, StreamApi, StreamError, StreamPoller,
};
use projector::rebuild::{
    all_rows, normalize_row, rebuild_into, verify, DriftReport, RebuildOptions, RebuildProgress,
};
use projector::{Projector, ProjectorMetrics};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use store_dynamodb::DynamoStore;
use store_embedded::EmbeddedStore;
use tests::ddb_local;
use tests::tee_events::TeeEvents;

// ---------------------------------------------------------------------------------------------
// Workload: realistic events through the command side.
// ---------------------------------------------------------------------------------------------

/// A broker appending to `events`, choosing candidates from a private, always-current view.
fn broker_over(events: Arc<dyn EventStore>) -> Broker {
    let candidate_view =
        EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("candidate view: {e}"));
    let tee = Arc::new(TeeEvents::new(events, candidate_view.clone()));
    Broker::new(
        tee,
        Arc::new(candidate_view),
        Arc::new(SystemClock),
        BrokerConfig::default(),
    )
}

fn admin() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("projector-test".into()),
    }
}

/// One command of the workload.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Register sandbox n (1 event).
    Register(usize),
    /// Allocate to caller n (2 events: sandbox + claim).
    Allocate(usize),
    /// Caller n marks their sandbox for deletion (2 events: sandbox + claim release).
    Mark(usize),
}

/// The steps for `sandboxes` registrations with an allocation after every second one and a
/// deletion after every fourth: `sandboxes × 2.5` events (800 sandboxes → 2,000 events).
fn workload(sandboxes: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut allocated = 0;
    for n in 0..sandboxes {
        steps.push(Step::Register(n));
        if n % 2 == 1 {
            steps.push(Step::Allocate(allocated));
            if allocated % 2 == 1 {
                steps.push(Step::Mark(allocated));
            }
            allocated += 1;
        }
    }
    steps
}

fn events_in(steps: &[Step]) -> usize {
    steps
        .iter()
        .map(|s| match s {
            Step::Register(_) => 1,
            Step::Allocate(_) | Step::Mark(_) => 2,
        })
        .sum()
}

/// Runs workload steps, remembering which sandbox each caller got.
struct Driver {
    broker: Broker,
    tag: String,
    held: BTreeMap<usize, String>,
}

impl Driver {
    fn new(events: Arc<dyn EventStore>) -> Self {
        Self {
            broker: broker_over(events),
            tag: format!("{}", uuid::Uuid::new_v4().simple())[..8].to_string(),
            held: BTreeMap::new(),
        }
    }

    async fn run(&mut self, step: Step) {
        let meta = admin();
        match step {
            Step::Register(n) => {
                let id = format!("{}-{n}", self.tag);
                self.broker
                    .execute(
                        &id,
                        SandboxCommand::Register {
                            sandbox_id: id.clone(),
                            name: format!("lab-{n:04}"),
                            external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                            sfdc_account_id: Some(format!("sfdc-{n}")),
                            csp_created_at: None,
                        },
                        &meta,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("register {id}: {e}"));
            }
            Step::Allocate(n) => {
                let caller = format!("student-{}-{n}", self.tag);
                let request = AllocateRequest {
                    caller: caller.clone(),
                    track_name: Some("projector-test".into()),
                    ..AllocateRequest::default()
                };
                let track = CommandMeta {
                    actor: Actor::Track(caller.clone()),
                    ..admin()
                };
                let allocation = self
                    .broker
                    .allocate(&request, &track)
                    .await
                    .unwrap_or_else(|e| panic!("allocate for {caller}: {e}"));
                assert!(!allocation.replayed);
                self.held.insert(n, allocation.sandbox.sandbox_id.clone());
            }
            Step::Mark(n) => {
                let caller = format!("student-{}-{n}", self.tag);
                let sandbox = self.held.get(&n).cloned().unwrap_or_default();
                self.broker
                    .mark_for_deletion(&sandbox, &caller, &admin())
                    .await
                    .unwrap_or_else(|e| panic!("mark {sandbox} for {caller}: {e}"));
            }
        }
    }

    async fn run_all(&mut self, steps: &[Step]) {
        for step in steps {
            self.run(*step).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: projectors, pollers, assertions.
// ---------------------------------------------------------------------------------------------

fn projector_on(events: Arc<dyn EventStore>, view: Arc<dyn ViewStore>) -> Projector {
    Projector::new(events, view, ProjectorMetrics::unregistered())
}

fn dynamo_projector(store: &DynamoStore) -> Projector {
    projector_on(Arc::new(store.clone()), Arc::new(store.clone()))
}

fn fast_poller_config() -> PollerConfig {
    PollerConfig {
        batch_size: 100,
        idle_min: Duration::from_millis(10),
        idle_max: Duration::from_millis(50),
        discover_every: Duration::from_secs(1),
        ..PollerConfig::default()
    }
}

async fn streams_of(store: &DynamoStore) -> DynamoStreams {
    DynamoStreams::for_store(store)
        .await
        .unwrap_or_else(|e| panic!("stream of {}: {e}", store.events_table()))
}

/// Drains the stream through a poller until the view holds every event (bounded: 5 minutes, for
/// a loaded two-core CI machine; a quiet one takes seconds).
async fn drain_until_converged<S: StreamApi>(poller: &mut StreamPoller<S>, store: &DynamoStore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        poller
            .drain(50)
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"));
        let report = verify_view(store, store).await;
        if report.is_clean() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "view did not converge: {:?}",
            report.differences
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replays `events` into an in-memory scratch view and compares it with `live`.
async fn verify_view(
    events: &(impl EventStore + Clone),
    live: &(impl PoolView + Clone),
) -> DriftReport {
    let scratch = EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("scratch: {e}"));
    verify(
        Arc::new(events.clone()),
        Arc::new(live.clone()),
        Arc::new(scratch),
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("verify: {e}"))
}

/// Asserts zero drift, that the view's stats equal its rows counted by status, and that it
/// holds `sandboxes` rows.
async fn assert_converged(report: &DriftReport, live: &dyn PoolView, sandboxes: usize) {
    assert!(report.is_clean(), "drift: {:#?}", report.differences);
    let rows = all_rows(live, 200)
        .await
        .unwrap_or_else(|e| panic!("rows: {e}"));
    assert_eq!(rows.len(), sandboxes, "one row per registered sandbox");
    let stats = live.stats().await.unwrap_or_else(|e| panic!("stats: {e}"));
    for status in SandboxStatus::ALL {
        let counted = rows.values().filter(|r| r.status == status).count() as i64;
        assert_eq!(stats.get(status), counted, "stats of {}", status.as_str());
    }
}

/// Every row of a view at the view's (millisecond) precision.
async fn rows_of(view: &dyn PoolView) -> BTreeMap<String, PoolRow> {
    all_rows(view, 100)
        .await
        .unwrap_or_else(|e| panic!("rows: {e}"))
        .into_iter()
        .map(|(id, row)| (id, normalize_row(&row)))
        .collect()
}

fn stats_of(rows: &BTreeMap<String, PoolRow>) -> PoolStats {
    let mut stats = PoolStats::default();
    for row in rows.values() {
        stats.by_status[row.status.index()] += 1;
    }
    stats
}

/// A stream that delivers every record twice (at-least-once delivery, exaggerated).
struct Duplicating<S>(S);

#[async_trait]
impl<S: StreamApi> StreamApi for Duplicating<S> {
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        self.0.list_shards().await
    }
    async fn shard_iterator(
        &self,
        shard: &str,
        start: &IteratorStart,
    ) -> Result<String, StreamError> {
        self.0.shard_iterator(shard, start).await
    }
    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordBatch, StreamError> {
        let mut batch = self.0.get_records(iterator, limit).await?;
        batch.records = batch
            .records
            .into_iter()
            .flat_map(|r| [r.clone(), r])
            .collect();
        Ok(batch)
    }
}

/// A stream that delivers each batch in reverse order: a stream's later versions arrive before
/// the earlier ones, across a gap.
struct Reversing<S>(S);

#[async_trait]
impl<S: StreamApi> StreamApi for Reversing<S> {
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        self.0.list_shards().await
    }
    async fn shard_iterator(
        &self,
        shard: &str,
        start: &IteratorStart,
    ) -> Result<String, StreamError> {
        self.0.shard_iterator(shard, start).await
    }
    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordBatch, StreamError> {
        let mut batch = self.0.get_records(iterator, limit).await?;
        batch.records.reverse();
        Ok(batch)
    }
}

fn parse_cli<'a>(args: impl IntoIterator<Item = &'a str>) -> projector::cli::Cli {
    use clap::Parser;
    projector::cli::Cli::try_parse_from(args).unwrap_or_else(|e| panic!("command line: {e}"))
}

fn temp_db() -> std::path::PathBuf {
    std::env::temp_dir()
        .join(format!("projector-test-{}", uuid::Uuid::new_v4()))
        .join("broker.db")
}

// ---------------------------------------------------------------------------------------------
// DynamoDB Local: the Streams poller.
// ---------------------------------------------------------------------------------------------

/// Events appended on DynamoDB Local reach the view and stats through the real stream and the
/// poller: zero drift, stats equal to the rows by status, per-shard checkpoints saved.
#[tokio::test]
async fn poller_converges_view_and_stats() {
    let store = ddb_local::fresh_store(4).await;
    let steps = workload(60);
    Driver::new(Arc::new(store.clone())).run_all(&steps).await;
    let mut poller = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    drain_until_converged(&mut poller, &store).await;
    assert_converged(&verify_view(&store, &store).await, &store, 60).await;
    for (shard, _) in poller.shards() {
        assert!(
            store.checkpoint(&shard).await.ok().flatten().is_some(),
            "shard {shard} has a checkpoint"
        );
    }
    let applied = poller
        .projector()
        .metrics()
        .events
        .with_label_values(&["applied"])
        .get();
    assert_eq!(
        applied as usize,
        60 + 30 + 15,
        "every sandbox event applied once"
    );
}

/// Every record delivered twice is applied once: duplicates are counted, the view is exact.
#[tokio::test]
async fn duplicate_records_are_applied_once() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(20))
        .await;
    let mut poller = StreamPoller::new(
        Duplicating(streams_of(&store).await),
        dynamo_projector(&store),
        fast_poller_config(),
    );
    drain_until_converged(&mut poller, &store).await;
    let metrics = poller.projector().metrics();
    assert_eq!(
        metrics.events.with_label_values(&["applied"]).get(),
        20 + 10 + 5
    );
    assert!(metrics.events.with_label_values(&["duplicate"]).get() >= 35);
    assert_converged(&verify_view(&store, &store).await, &store, 20).await;
}

/// Records delivered out of order within a batch (a stream's later versions before its earlier
/// ones) are sorted by version before planning: the view ends exact without a repair read.
#[tokio::test]
async fn out_of_order_records_are_sorted() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(20))
        .await;
    let mut poller = StreamPoller::new(
        Reversing(streams_of(&store).await),
        dynamo_projector(&store),
        PollerConfig {
            batch_size: 1000,
            ..fast_poller_config()
        },
    );
    drain_until_converged(&mut poller, &store).await;
    assert_eq!(
        poller.projector().metrics().repairs.get(),
        0,
        "a reversed batch needs no repair"
    );
    assert_converged(&verify_view(&store, &store).await, &store, 20).await;
}

/// A poller task running until aborted.
async fn spawn_poller(store: &DynamoStore) -> tokio::task::JoinHandle<()> {
    let poller = StreamPoller::new(
        streams_of(store).await,
        dynamo_projector(store),
        fast_poller_config(),
    );
    tokio::spawn(poller.run(std::future::pending()))
}

/// The poller task aborted at 20 random points during a 2,000-event run and restarted each
/// time from its checkpoints: verify reports zero drift and stats equal the rows by status.
#[tokio::test]
async fn poller_survives_20_aborts_in_2000_events() {
    let store = ddb_local::fresh_store(8).await;
    let steps = workload(800);
    assert_eq!(events_in(&steps), 2_000);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut abort_at: Vec<usize> = (0..20).map(|_| rng.random_range(0..steps.len())).collect();
    abort_at.sort_unstable();
    let mut task = spawn_poller(&store).await;
    let mut driver = Driver::new(Arc::new(store.clone()));
    let mut aborts = 0;
    for (i, step) in steps.iter().enumerate() {
        driver.run(*step).await;
        for _ in abort_at.iter().filter(|at| **at == i) {
            // Let the poller get into a batch, then kill it wherever it is.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            task.abort();
            let _ = task.await;
            aborts += 1;
            task = spawn_poller(&store).await;
        }
    }
    assert_eq!(aborts, 20);
    task.abort();
    let _ = task.await;
    let mut last = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    drain_until_converged(&mut last, &store).await;
    assert_converged(&verify_view(&store, &store).await, &store, 800).await;
}

/// A graceful shutdown finishes the record in hand and checkpoints what it applied; a poller
/// started afterwards reads nothing already applied.
#[tokio::test]
async fn graceful_shutdown_checkpoints() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(30))
        .await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let poller = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    let task = tokio::spawn(poller.run(async {
        let _ = rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while !verify_view(&store, &store).await.is_clean() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "poller did not converge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("poller did not stop"))
        .unwrap_or_else(|e| panic!("poller task: {e}"));
    let mut next = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    let again = next.drain(10).await.unwrap_or_else(|e| panic!("poll: {e}"));
    assert_eq!(again.records, 0, "everything applied was checkpointed");
}

/// Rebuild replays the whole event table (parallel scan) into fresh tables under another prefix,
/// equal row for row and in stats to the live view.
#[tokio::test]
async fn rebuild_into_fresh_prefix_equals_live() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(40))
        .await;
    let mut poller = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    drain_until_converged(&mut poller, &store).await;
    let target = ddb_local::fresh_store(4).await;
    let progress = Arc::new(RebuildProgress::default());
    let summary = rebuild_into(
        Arc::new(store.clone()),
        Arc::new(target.clone()),
        &RebuildOptions {
            segments: 4,
            page_size: 25,
            ..RebuildOptions::default()
        },
        Arc::clone(&progress),
    )
    .await
    .unwrap_or_else(|e| panic!("rebuild: {e}"));
    assert_eq!(summary.events_read, 100);
    assert_eq!(progress.segments_done.load(Ordering::Relaxed), 4);
    let live = rows_of(&store).await;
    let rebuilt = rows_of(&target).await;
    assert_eq!(live, rebuilt);
    assert_eq!(store.stats().await.ok(), target.stats().await.ok());
}

/// Verify reports a tampered row and the stats it no longer matches, and exits non-zero
/// through the CLI path.
#[tokio::test]
async fn verify_reports_drift() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(10))
        .await;
    let mut poller = StreamPoller::new(
        streams_of(&store).await,
        dynamo_projector(&store),
        fast_poller_config(),
    );
    drain_until_converged(&mut poller, &store).await;
    let rows = all_rows(&store, 100).await.expect("read the view rows");
    let Some(row) = rows
        .values()
        .find(|r| r.status == SandboxStatus::Available)
        .cloned()
    else {
        panic!("an available row");
    };
    let mut tampered = row.clone();
    tampered.status = SandboxStatus::Stale;
    tampered.name = "tampered".into();
    // A row write without the matching stats delta: the row and the counters both drift.
    store
        .write_row(Some(row.version), &tampered, &domain::StatsDelta::default())
        .await
        .unwrap_or_else(|e| panic!("tamper: {e}"));
    let report = verify_view(&store, &store).await;
    let text: Vec<String> = report.differences.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|d| d.contains(&row.sandbox_id) && d.contains("tampered")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|d| d.starts_with("stats stale")),
        "{text:?}"
    );

    let config = ddb_local::fresh_config(4).await;
    let cli = parse_cli([
        "projector",
        "verify",
        "--store",
        "dynamodb",
        "--table-prefix",
        store.table_prefix(),
        "--ddb-endpoint-url",
        config.endpoint_url.as_deref().unwrap_or_default(),
        "--aws-region",
        "us-east-1",
    ]);
    let code = projector::cli::run(cli, std::future::pending()).await;
    assert_eq!(
        code,
        std::process::ExitCode::from(projector::cli::EXIT_DRIFT)
    );
}

// ---------------------------------------------------------------------------------------------
// DynamoDB Local: the Lambda handler on real stream records.
// ---------------------------------------------------------------------------------------------

/// Real records read from DynamoDB Local's stream, shaped as the Lambda event, give through the
/// handler the same view (rows and stats) as the poller gives from the same stream.
#[tokio::test]
async fn lambda_handler_matches_poller() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(40))
        .await;
    let streams = streams_of(&store).await;
    let records = streams
        .read_all(10_000)
        .await
        .unwrap_or_else(|e| panic!("read stream: {e}"));
    assert_eq!(records.len(), 100, "one stream record per event");

    let lambda_view = EmbeddedStore::open_in_memory(4).expect("in-memory embedded store");
    let lambda_projector = projector_on(Arc::new(store.clone()), Arc::new(lambda_view.clone()));
    for chunk in records.chunks(25) {
        let event = projector::lambda::lambda_event(chunk, streams.stream_arn(), "us-east-1");
        let response = projector::lambda::handle_event(&lambda_projector, event).await;
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
    }

    let mut poller = StreamPoller::new(streams, dynamo_projector(&store), fast_poller_config());
    drain_until_converged(&mut poller, &store).await;
    let by_poller = rows_of(&store).await;
    let by_lambda = rows_of(&lambda_view).await;
    assert_eq!(by_poller.len(), 40);
    assert_eq!(by_lambda, by_poller);
    assert_eq!(lambda_view.stats().await.ok(), store.stats().await.ok());
    assert_eq!(lambda_view.stats().await.ok(), Some(stats_of(&by_lambda)));
}

/// A batch in reverse order applies exactly (sorted, no repair needed); redelivered whole, it
/// changes nothing.
#[tokio::test]
async fn lambda_redelivery_and_reordering() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(20))
        .await;
    let streams = streams_of(&store).await;
    let mut records = streams.read_all(10_000).await.expect("read the log");
    records.reverse();
    let view = EmbeddedStore::open_in_memory(4).expect("in-memory embedded store");
    let p = projector_on(Arc::new(store.clone()), Arc::new(view.clone()));
    let event = projector::lambda::lambda_event(&records, streams.stream_arn(), "us-east-1");
    let first = projector::lambda::apply_batch(&p, &event).await;
    assert_eq!(first.failed_at, None);
    assert_eq!(p.metrics().repairs.get(), 0);
    let again = projector::lambda::apply_batch(&p, &event).await;
    assert_eq!((again.applied, again.failed_at), (0, None));
    assert_converged(&verify_view(&store, &view).await, &view, 20).await;
}

/// A poison record (its NewImage unreadable) in a real batch becomes the batch item failure:
/// records before it are applied, nothing after it is attempted, nothing panics.
#[tokio::test]
async fn lambda_poison_record_is_a_batch_item_failure() {
    let store = ddb_local::fresh_store(4).await;
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(8))
        .await;
    let streams = streams_of(&store).await;
    let records = streams.read_all(10_000).await.expect("read the log");
    let mut event = projector::lambda::lambda_event(&records, streams.stream_arn(), "us-east-1");
    let poison_at = 3;
    let Some(poison) = event["Records"].get_mut(poison_at) else {
        panic!("batch too short");
    };
    let sequence = poison["dynamodb"]["SequenceNumber"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    poison["dynamodb"]["NewImage"]["payload"] = serde_json::json!({"S": "{not json"});
    poison["dynamodb"]["NewImage"]["version"] = serde_json::json!({"BOOL": true});
    let view = EmbeddedStore::open_in_memory(4).expect("in-memory embedded store");
    let p = projector_on(Arc::new(store.clone()), Arc::new(view.clone()));
    let response = projector::lambda::handle_event(&p, event.clone()).await;
    let failures: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(failures, vec![Some(sequence)]);
    let outcome = projector::lambda::apply_batch(&p, &event).await;
    assert_eq!(
        outcome.applied + outcome.skipped,
        poison_at,
        "stopped at the poison record"
    );
}

/// The committed fixture captured from DynamoDB Local's stream by scripts/lambda-local.sh
/// decodes and applies without failures.
#[tokio::test]
async fn captured_fixture_applies() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/dynamodb-local-stream-event.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let event: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture JSON: {e}"));
    let store = EmbeddedStore::open_in_memory(4).expect("in-memory embedded store");
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let outcome = projector::lambda::apply_batch(&p, &event).await;
    assert_eq!(outcome.failed_at, None);
    assert!(outcome.applied > 0);
    let stats = store.stats().await.expect("read the stats");
    assert_eq!(
        stats.total(),
        stats_of(&all_rows(&store, 100).await.unwrap_or_default()).total()
    );
}

/// A delivered batch holding what a newer release writes (a new event type at a newer schema
/// version on a sandbox stream, a new stream kind) projects under the Lambda handler without a
/// batch item failure: the unknown events are skipped and counted, and their sandbox's row moves
/// past them and is held out of allocation (ADR 0023).
#[tokio::test]
async fn lambda_tolerates_events_of_a_newer_release() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/dynamodb-local-stream-event.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut event: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture JSON: {e}"));
    let Some(records) = event["Records"].as_array_mut() else {
        panic!("fixture without Records");
    };
    let stream_of = |r: &Value| {
        r["dynamodb"]["NewImage"]["stream_id"]["S"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let Some(index) = records
        .iter()
        .rposition(|r| stream_of(r).starts_with("sandbox#"))
    else {
        panic!("fixture without a sandbox record");
    };
    let sandbox_stream = stream_of(&records[index]);
    let mut reservation = records[index].clone();
    let image = &mut records[index]["dynamodb"]["NewImage"];
    image["event_type"] = serde_json::json!({"S": "SandboxRelabelled"});
    image["schema_version"] = serde_json::json!({"N": "2"});
    image["payload"] = serde_json::json!({"S": "{\"type\":\"SandboxRelabelled\",\"seats\":3}"});
    for part in ["Keys", "NewImage"] {
        reservation["dynamodb"][part]["stream_id"] = serde_json::json!({"S": "maintenance#m9"});
        reservation["dynamodb"][part]["version"] = serde_json::json!({"N": "1"});
    }
    reservation["dynamodb"]["NewImage"]["event_type"] =
        serde_json::json!({"S": "MaintenanceWindowPlanned"});
    reservation["dynamodb"]["SequenceNumber"] = serde_json::json!("000000000000000009999");
    records.push(reservation);

    let before = domain::store::unknown::counts();
    let store = EmbeddedStore::open_in_memory(4).expect("in-memory embedded store");
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let response = projector::lambda::handle_event(&p, event).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        response.batch_item_failures
    );
    let after = domain::store::unknown::counts();
    for event_type in ["SandboxRelabelled", "MaintenanceWindowPlanned"] {
        assert!(
            after.get(event_type).copied().unwrap_or(0)
                > before.get(event_type).copied().unwrap_or(0),
            "{event_type} not counted"
        );
    }
    let sandbox_id = sandbox_stream.trim_start_matches("sandbox#");
    let row = store
        .get(sandbox_id)
        .await
        .expect("read the row")
        .unwrap_or_else(|| panic!("no row for {sandbox_id}"));
    assert_eq!(row.held_by.as_deref(), Some("SandboxRelabelled"));
}

// ---------------------------------------------------------------------------------------------
// Embedded: the log tail.
// ---------------------------------------------------------------------------------------------

/// The embedded tail brings view and stats to the events: zero drift, stats equal rows.
#[tokio::test]
async fn embedded_tail_converges() {
    let store = EmbeddedStore::open(&temp_db(), 4).expect("embedded store file");
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(60))
        .await;
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let read = projector::embedded::catch_up(&p, &store)
        .await
        .expect("catch up");
    assert_eq!(read, 150);
    assert_converged(&verify_view(&store, &store).await, &store, 60).await;
}

/// A restarted tail resumes at its checkpoint: it reads only what was appended since.
#[tokio::test]
async fn embedded_tail_resumes_from_checkpoint() {
    let path = temp_db();
    let store = EmbeddedStore::open(&path, 4).expect("embedded store file");
    let mut driver = Driver::new(Arc::new(store.clone()));
    let steps = workload(20);
    let (first, second) = steps.split_at(steps.len() / 2);
    driver.run_all(first).await;
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let read = projector::embedded::catch_up(&p, &store)
        .await
        .expect("catch up");
    assert_eq!(read, events_in(first));
    driver.run_all(second).await;
    // A new process: the same file opened again, a fresh projector.
    let reopened = EmbeddedStore::open(&path, 4).expect("embedded store file");
    let fresh = projector_on(Arc::new(reopened.clone()), Arc::new(reopened.clone()));
    let read = projector::embedded::catch_up(&fresh, &reopened)
        .await
        .expect("catch up");
    assert_eq!(
        read,
        events_in(second),
        "only the events after the checkpoint"
    );
    assert_eq!(
        fresh
            .metrics()
            .events
            .with_label_values(&["duplicate"])
            .get(),
        0
    );
    assert_converged(&verify_view(&reopened, &reopened).await, &reopened, 20).await;
}

/// The embedded tail task aborted at 20 random points during a 2,000-event run and restarted
/// each time: zero drift, stats equal the rows by status.
#[tokio::test]
async fn embedded_tail_survives_20_aborts_in_2000_events() {
    let store = EmbeddedStore::open(&temp_db(), 8).expect("embedded store file");
    let steps = workload(800);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xab0);
    let mut abort_at: Vec<usize> = (0..20).map(|_| rng.random_range(0..steps.len())).collect();
    abort_at.sort_unstable();
    let spawn = |store: EmbeddedStore| {
        let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
        tokio::spawn(projector::embedded::run(p, store, std::future::pending()))
    };
    let mut task = spawn(store.clone());
    let mut driver = Driver::new(Arc::new(store.clone()));
    for (i, step) in steps.iter().enumerate() {
        driver.run(*step).await;
        for _ in abort_at.iter().filter(|at| **at == i) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
            task.abort();
            let _ = task.await;
            task = spawn(store.clone());
        }
    }
    task.abort();
    let _ = task.await;
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    projector::embedded::catch_up(&p, &store)
        .await
        .expect("catch up");
    assert_converged(&verify_view(&store, &store).await, &store, 800).await;
}

/// Rebuild into another embedded file and `projector verify` on the live file: equal views,
/// exit code 0; after tampering, exit code 1.
#[tokio::test]
async fn embedded_rebuild_and_cli_verify() {
    let path = temp_db();
    let store = EmbeddedStore::open(&path, 4).expect("embedded store file");
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(30))
        .await;
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    projector::embedded::catch_up(&p, &store)
        .await
        .expect("catch up");

    let into = temp_db();
    let args = |cmd: &[&str]| {
        let mut all = vec!["projector", "--store", "embedded", "--embedded-path"];
        all.push(path.to_str().unwrap_or_default());
        all.extend_from_slice(cmd);
        parse_cli(all)
    };
    let code = projector::cli::run(
        args(&["rebuild", "--into", into.to_str().unwrap_or_default()]),
        std::future::pending(),
    )
    .await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let rebuilt = EmbeddedStore::open(&into, 4).expect("embedded store file");
    assert_eq!(
        all_rows(&rebuilt, 50).await.ok(),
        all_rows(&store, 50).await.ok()
    );
    assert_eq!(rebuilt.stats().await.ok(), store.stats().await.ok());

    let refused = projector::cli::run(
        args(&["rebuild", "--into", path.to_str().unwrap_or_default()]),
        std::future::pending(),
    )
    .await;
    assert_eq!(
        refused,
        std::process::ExitCode::from(projector::cli::EXIT_ERROR),
        "refuses to clear the live view"
    );

    let code = projector::cli::run(args(&["verify"]), std::future::pending()).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let rows = all_rows(&store, 50).await.unwrap_or_default();
    let Some(row) = rows.values().next().cloned() else {
        panic!("rows");
    };
    let mut tampered = row.clone();
    tampered.attempts = 99;
    store
        .write_row(Some(row.version), &tampered, &domain::StatsDelta::default())
        .await
        .expect("write the tampered row");
    let code = projector::cli::run(args(&["verify"]), std::future::pending()).await;
    assert_eq!(
        code,
        std::process::ExitCode::from(projector::cli::EXIT_DRIFT)
    );
}

// ---------------------------------------------------------------------------------------------
// Batched apply: exactly once under redelivery, overlap, a crash between the transactions of one
// batch, and two projectors applying the same batch — on both stores.
// ---------------------------------------------------------------------------------------------

/// Sandbox events of `workload(40)`: 40 registrations, 20 allocations, 10 deletions.
const BATCH_SANDBOXES: usize = 40;
const BATCH_SANDBOX_EVENTS: usize = 40 + 20 + 10;

/// A store that is both the event table and the view (both adapters are).
trait BothSides: EventStore + ViewStore + Clone {}
impl<T: EventStore + ViewStore + Clone> BothSides for T {}

/// Every event of `events` (all scan segments), shuffled with a fixed seed: one stream's
/// versions arrive in any order, as an at-least-once source may deliver them.
async fn shuffled_events(events: &dyn EventStore, seed: u64) -> Vec<EventEnvelope> {
    let mut all = Vec::new();
    for segment in 0..4 {
        let mut cursor = None;
        loop {
            let page = events
                .scan(segment, 4, cursor, 500)
                .await
                .unwrap_or_else(|e| panic!("scan: {e}"));
            all.extend(page.events);
            cursor = page.cursor;
            if cursor.is_none() {
                break;
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.random_range(0..=i));
    }
    all
}

fn checkpoint_at(position: &str) -> Option<domain::store::batch::Checkpoint> {
    Some(domain::store::batch::Checkpoint {
        source: "batch-test".into(),
        position: position.into(),
    })
}

/// Events folded into the view's rows so far (a row's version counts its applied events).
async fn events_in_view(view: &dyn PoolView) -> usize {
    all_rows(view, 200)
        .await
        .unwrap_or_else(|e| panic!("rows: {e}"))
        .values()
        .map(|r| r.version as usize)
        .sum()
}

/// A view that writes in chunks of at most `max_items` items and fails the `fail_at`-th chunk
/// as a crash would (nothing of it written, the error transient), so one batch takes several
/// transactions and the failure lands between two of them.
#[derive(Clone)]
struct CrashingView<S> {
    inner: S,
    max_items: usize,
    fail_at: usize,
    chunks: Arc<std::sync::atomic::AtomicUsize>,
}

impl<S> CrashingView<S> {
    fn new(inner: S, max_items: usize, fail_at: usize) -> Self {
        Self {
            inner,
            max_items,
            fail_at,
            chunks: Arc::default(),
        }
    }
}

#[async_trait]
impl<S: BothSides> PoolView for CrashingView<S> {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.inner.get(sandbox_id).await
    }
    async fn candidates(
        &self,
        query: &domain::store::CandidateQuery,
    ) -> Result<Vec<PoolRow>, StoreError> {
        self.inner.candidates(query).await
    }
    async fn list(
        &self,
        filter: &domain::store::ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<domain::store::RowPage, StoreError> {
        self.inner.list(filter, limit, cursor).await
    }
    async fn due(
        &self,
        status: SandboxStatus,
        before: chrono::DateTime<chrono::Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<domain::store::RowPage, StoreError> {
        self.inner.due(status, before, limit, cursor).await
    }
    async fn stats(&self) -> Result<PoolStats, StoreError> {
        self.inner.stats().await
    }
}

#[async_trait]
impl<S: BothSides> ViewStore for CrashingView<S> {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.inner.load_row(sandbox_id).await
    }
    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &domain::StatsDelta,
    ) -> Result<(), StoreError> {
        self.inner.write_row(expected_version, row, delta).await
    }
    fn batch_limits(&self) -> domain::store::batch::BatchLimits {
        domain::store::batch::BatchLimits {
            max_items: self.max_items,
            ..self.inner.batch_limits()
        }
    }
    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<std::collections::HashMap<String, PoolRow>, StoreError> {
        self.inner.load_rows(sandbox_ids).await
    }
    async fn write_chunk(&self, chunk: &domain::store::batch::ViewChunk) -> Result<(), StoreError> {
        if self.chunks.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            return Err(StoreError::Unavailable("injected crash".into()));
        }
        self.inner.write_chunk(chunk).await
    }
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError> {
        self.inner.checkpoint(source).await
    }
    async fn save_checkpoint(&self, source: &str, position: &str) -> Result<(), StoreError> {
        self.inner.save_checkpoint(source, position).await
    }
    async fn clear(&self) -> Result<(), StoreError> {
        self.inner.clear().await
    }
}

/// Duplicate and overlapping batches (shuffled, so overlaps also start past gaps) apply every
/// sandbox event exactly once; the checkpoint moves with each batch.
async fn duplicate_and_overlapping_batches<S: BothSides>(store: S) {
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(BATCH_SANDBOXES))
        .await;
    let events = shuffled_events(&store, 0xba7c).await;
    assert_eq!(events.len(), 100);
    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let apply = |batch: &[EventEnvelope], position: &str| {
        let (p, batch, position) = (p.clone(), batch.to_vec(), position.to_string());
        async move {
            p.apply_batch(&batch, checkpoint_at(&position))
                .await
                .unwrap_or_else(|e| panic!("apply: {e}"))
        }
    };
    let first = apply(&events[..60], "1").await;
    let overlapping = apply(&events[40..], "2").await;
    let duplicate = apply(&events, "3").await;
    assert_eq!(
        first.applied + overlapping.applied,
        BATCH_SANDBOX_EVENTS,
        "every sandbox event applied once across the overlapping batches"
    );
    assert_eq!(
        (duplicate.applied, duplicate.duplicates),
        (0, BATCH_SANDBOX_EVENTS)
    );
    assert_eq!(
        duplicate.writes, 1,
        "a duplicate batch writes only its checkpoint"
    );
    assert_eq!(
        store
            .checkpoint("batch-test")
            .await
            .ok()
            .flatten()
            .as_deref(),
        Some("3")
    );
    assert_converged(&verify_view(&store, &store).await, &store, BATCH_SANDBOXES).await;
}

/// A crash after the first transaction of a batch leaves whole chunks (rows with their counters)
/// and the old checkpoint; redelivering the batch applies exactly the rest.
async fn crash_between_transactions<S: BothSides>(store: S) {
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(BATCH_SANDBOXES))
        .await;
    let events = shuffled_events(&store, 0xc4a5).await;
    let crashing = CrashingView::new(store.clone(), 12, 1);
    let p = projector_on(Arc::new(store.clone()), Arc::new(crashing)).with_write_concurrency(1);
    let crashed = p.apply_batch(&events, checkpoint_at("1")).await;
    assert!(
        matches!(crashed, Err(StoreError::Unavailable(_))),
        "{crashed:?}"
    );
    let applied_before = events_in_view(&store).await;
    assert!(
        applied_before > 0 && applied_before < BATCH_SANDBOX_EVENTS,
        "the crash fell between two transactions ({applied_before} events applied)"
    );
    assert_eq!(store.checkpoint("batch-test").await.ok().flatten(), None);
    let rows = all_rows(&store, 200).await.unwrap_or_default();
    assert_eq!(
        store.stats().await.ok(),
        Some(stats_of(&rows)),
        "counters moved with rows"
    );

    let p = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let redelivered = p
        .apply_batch(&events, checkpoint_at("1"))
        .await
        .unwrap_or_else(|e| panic!("redelivery: {e}"));
    assert_eq!(redelivered.applied, BATCH_SANDBOX_EVENTS - applied_before);
    assert_eq!(redelivered.duplicates, applied_before);
    assert_eq!(
        store
            .checkpoint("batch-test")
            .await
            .ok()
            .flatten()
            .as_deref(),
        Some("1")
    );
    assert_converged(&verify_view(&store, &store).await, &store, BATCH_SANDBOXES).await;
}

/// Two projectors applying the same batch at once (one in small chunks, so their writes
/// interleave) apply every sandbox event exactly once between them.
async fn concurrent_projectors<S: BothSides>(store: S) {
    Driver::new(Arc::new(store.clone()))
        .run_all(&workload(BATCH_SANDBOXES))
        .await;
    let events = shuffled_events(&store, 0x2b2).await;
    let one = projector_on(Arc::new(store.clone()), Arc::new(store.clone()));
    let two = projector_on(
        Arc::new(store.clone()),
        Arc::new(CrashingView::new(store.clone(), 8, usize::MAX)),
    );
    let (a, b) = tokio::join!(
        one.apply_batch(&events, checkpoint_at("9")),
        two.apply_batch(&events, checkpoint_at("9"))
    );
    let (a, b) = (
        a.unwrap_or_else(|e| panic!("first projector: {e}")),
        b.unwrap_or_else(|e| panic!("second projector: {e}")),
    );
    assert_eq!(
        a.applied + b.applied,
        BATCH_SANDBOX_EVENTS,
        "exactly once between them ({} conflicts re-planned)",
        a.conflicts + b.conflicts
    );
    assert_eq!(
        store
            .checkpoint("batch-test")
            .await
            .ok()
            .flatten()
            .as_deref(),
        Some("9")
    );
    assert_converged(&verify_view(&store, &store).await, &store, BATCH_SANDBOXES).await;
}

/// Embedded: duplicate and overlapping batches apply each event once.
#[tokio::test]
async fn batch_duplicates_and_overlaps_embedded() {
    duplicate_and_overlapping_batches(
        EmbeddedStore::open(&temp_db(), 4).expect("embedded store file"),
    )
    .await;
}

/// DynamoDB Local: duplicate and overlapping batches apply each event once.
#[tokio::test]
async fn batch_duplicates_and_overlaps_dynamodb() {
    duplicate_and_overlapping_batches(ddb_local::fresh_store(4).await).await;
}

/// Embedded: a crash between two transactions of a batch loses and doubles nothing.
#[tokio::test]
async fn batch_crash_between_transactions_embedded() {
    crash_between_transactions(EmbeddedStore::open(&temp_db(), 4).expect("embedded store file"))
        .await;
}

/// DynamoDB Local: a crash between two transactions of a batch loses and doubles nothing.
#[tokio::test]
async fn batch_crash_between_transactions_dynamodb() {
    crash_between_transactions(ddb_local::fresh_store(4).await).await;
}

/// Embedded: two projectors on the same batch apply each event once between them.
#[tokio::test]
async fn batch_concurrent_projectors_embedded() {
    concurrent_projectors(EmbeddedStore::open(&temp_db(), 4).expect("embedded store file")).await;
}

/// DynamoDB Local: two projectors on the same batch apply each event once between them.
#[tokio::test]
async fn batch_concurrent_projectors_dynamodb() {
    concurrent_projectors(ddb_local::fresh_store(4).await).await;
}
