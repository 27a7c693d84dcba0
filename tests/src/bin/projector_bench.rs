//! Projector benchmark: how many events per second each source applies, and how far the view
//! lags under a steady append load. Runs the DynamoDB Streams poller on DynamoDB Local and the
//! embedded log tail, with the same realistic workload (registrations, allocations, deletions
//! through `domain::Broker`), and prints a table.
//!
//! Two phases per source:
//! 1. **steady load** — commands are appended at `--rate` events/s while the projector runs; each
//!    view write records `now − occurred_at` (lag p50/p99/max, HdrHistogram);
//! 2. **backlog** — `--backlog` events are appended with the projector stopped, then it is started
//!    and timed until the view holds them all: events applied per second.
//!
//! Bounded: at most `--events` steady-load events and `--max-seconds` per phase.
//!
//!   cargo run --release -p tests --features bench --bin projector_bench -- [--source all|embedded|embedded-per-event|dynamodb]
//!
//! Every source applies delivered batches (`Projector::apply_batch`); `embedded-per-event` runs
//! the embedded tail through the single-event `Projector::apply` instead — one transaction per
//! event, the path all sources took before batching — so one run prints before and after.
//!
//! `--seed-only` instead appends `--sandboxes` sandboxes' worth of events to existing tables
//! (`TABLE_PREFIX`, `DDB_ENDPOINT_URL`; created if missing) and exits — scripts/lambda-local.sh
//! uses it to give the stream something to capture.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use clap::{Parser, ValueEnum};
use domain::model::sandbox::SandboxCommand;
use domain::store::batch::{BatchLimits, ViewChunk};
use domain::store::{
    CandidateQuery, EventStore, ListFilter, PoolView, RowPage, StoreError, ViewStore,
};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, PoolRow, PoolStats, SandboxStatus,
    StatsDelta, SystemClock,
};
use hdrhistogram::Histogram;
use projector::dynamo_streams::DynamoStreams;
use projector::poller::{PollerConfig, StreamPoller};
use projector::{Projector, ProjectorMetrics};
use store_dynamodb::{DynamoConfig, DynamoStore, DEFAULT_MAX_RETRIES};
use store_embedded::EmbeddedStore;
use tests::tee_events::TeeEvents;

/// Which sources to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// Every source, and the per-event embedded path for comparison.
    All,
    /// The embedded log tail (SQLite file in the temp dir), batched apply.
    Embedded,
    /// The embedded log tail applying one event per transaction (`Projector::apply`), the
    /// path every source used before batched apply: the "before" of the comparison.
    EmbeddedPerEvent,
    /// The Streams poller on DynamoDB Local.
    Dynamodb,
}

#[derive(Debug, Parser)]
#[command(
    name = "projector_bench",
    about = "Projector throughput and lag benchmark"
)]
struct Args {
    /// Sources to measure.
    #[arg(long, value_enum, default_value = "all")]
    source: Source,
    /// Steady-load events per source (rounded to whole commands).
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Target append rate of the steady load, events/s.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Backlog events per source for the throughput phase.
    #[arg(long, default_value_t = 1000)]
    backlog: usize,
    /// Upper bound on each phase, seconds.
    #[arg(long, default_value_t = 180)]
    max_seconds: u64,
    /// Only append events for `--sandboxes` sandboxes to `TABLE_PREFIX` and exit.
    #[arg(long)]
    seed_only: bool,
    /// Sandboxes of `--seed-only`.
    #[arg(long, default_value_t = 20)]
    sandboxes: usize,
    /// Table prefix of `--seed-only`.
    #[arg(long, env = "TABLE_PREFIX", default_value = "sandbox-broker")]
    table_prefix: String,
    /// DynamoDB endpoint; default: DynamoDB Local started by the test harness.
    #[arg(long, env = "DDB_ENDPOINT_URL")]
    ddb_endpoint_url: Option<String>,
    /// Poller: first idle pause, ms (the `projector poll` default).
    #[arg(long, default_value_t = 50)]
    idle_min_ms: u64,
    /// Poller: longest idle pause, ms (the `projector poll` default).
    #[arg(long, default_value_t = 1000)]
    idle_max_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Workload (the same shape as tests/tests/it/projector.rs).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Step {
    Register(usize),
    Allocate(usize),
    Mark(usize),
}

impl Step {
    fn events(self) -> usize {
        match self {
            Step::Register(_) => 1,
            Step::Allocate(_) | Step::Mark(_) => 2,
        }
    }
}

/// Registrations, an allocation after every second, a deletion after every fourth: 2.5 events
/// per sandbox. Numbering starts at `from` so several runs can share one store.
fn workload(from: usize, sandboxes: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    for n in from..from + sandboxes {
        steps.push(Step::Register(n));
        if n % 2 == 1 {
            steps.push(Step::Allocate(n));
            if n % 4 == 3 {
                steps.push(Step::Mark(n));
            }
        }
    }
    steps
}

struct Driver {
    broker: Broker,
    tag: String,
    held: BTreeMap<usize, String>,
}

impl Driver {
    fn new(events: Arc<dyn EventStore>) -> anyhow::Result<Self> {
        let candidate_view = EmbeddedStore::open_in_memory(4)?;
        let tee = Arc::new(TeeEvents::new(events, candidate_view.clone()));
        Ok(Self {
            broker: Broker::new(
                tee,
                Arc::new(candidate_view),
                Arc::new(SystemClock),
                BrokerConfig::default(),
            ),
            tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            held: BTreeMap::new(),
        })
    }

    async fn run(&mut self, step: Step) -> anyhow::Result<()> {
        let admin = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: Some("projector-bench".into()),
        };
        match step {
            Step::Register(n) => {
                let id = format!("{}-{n}", self.tag);
                self.broker
                    .execute(
                        &id,
                        SandboxCommand::Register {
                            sandbox_id: id.clone(),
                            name: format!("bench-{n:06}"),
                            external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                            sfdc_account_id: None,
                            csp_created_at: None,
                        },
                        &admin,
                    )
                    .await?;
            }
            Step::Allocate(n) => {
                let caller = format!("student-{}-{n}", self.tag);
                let allocation = self
                    .broker
                    .allocate(
                        &AllocateRequest {
                            caller: caller.clone(),
                            ..AllocateRequest::default()
                        },
                        &CommandMeta {
                            actor: Actor::Track(caller),
                            ..admin
                        },
                    )
                    .await?;
                self.held.insert(n, allocation.sandbox.sandbox_id);
            }
            Step::Mark(n) => {
                let caller = format!("student-{}-{n}", self.tag);
                let sandbox = self.held.get(&n).cloned().unwrap_or_default();
                self.broker
                    .mark_for_deletion(&sandbox, &caller, &admin)
                    .await?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Lag measurement: a view wrapper that records now − occurred_at of every row it writes.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct LagView {
    inner: Arc<dyn ViewStore>,
    lags: Arc<Mutex<Histogram<u64>>>,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl LagView {
    fn new(inner: Arc<dyn ViewStore>) -> anyhow::Result<Self> {
        Ok(Self {
            inner,
            lags: Arc::new(Mutex::new(Histogram::new_with_bounds(1, 3_600_000, 3)?)),
            writes: Arc::default(),
        })
    }

    fn reset(&self) {
        self.lags.lock().unwrap_or_else(|p| p.into_inner()).reset();
        self.writes.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[async_trait]
impl PoolView for LagView {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.inner.get(sandbox_id).await
    }
    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        self.inner.candidates(query).await
    }
    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        self.inner.list(filter, limit, cursor).await
    }
    async fn due(
        &self,
        status: SandboxStatus,
        before: chrono::DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        self.inner.due(status, before, limit, cursor).await
    }
    async fn stats(&self) -> Result<PoolStats, StoreError> {
        self.inner.stats().await
    }

    async fn stats_by_prefix(&self) -> Result<domain::model::pool_prefix::PrefixStats, StoreError> {
        self.inner.stats_by_prefix().await
    }
}

#[async_trait]
impl ViewStore for LagView {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.inner.load_row(sandbox_id).await
    }
    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &StatsDelta,
    ) -> Result<(), StoreError> {
        self.inner.write_row(expected_version, row, delta).await?;
        // `updated_at` is the applied event's occurred_at: this is the event's end-to-end lag.
        let lag = (Utc::now() - row.updated_at).num_milliseconds().max(1) as u64;
        let _ = self
            .lags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(lag.min(3_600_000));
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn batch_limits(&self) -> BatchLimits {
        self.inner.batch_limits()
    }
    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        self.inner.load_rows(sandbox_ids).await
    }
    async fn write_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        self.inner.write_chunk(chunk).await?;
        let now = Utc::now();
        let mut histogram = self.lags.lock().unwrap_or_else(|p| p.into_inner());
        for change in &chunk.rows {
            let lag = (now - change.row.updated_at).num_milliseconds().max(1) as u64;
            let _ = histogram.record(lag.min(3_600_000));
            // One row write may fold several events of its sandbox: count the events.
            let events = change.row.version - change.expected_version.unwrap_or(0);
            self.writes
                .fetch_add(events, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
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

// ---------------------------------------------------------------------------------------------
// Phases.
// ---------------------------------------------------------------------------------------------

/// A running projector of one source, stoppable.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// How to start the source under test over `view`.
#[async_trait]
trait Harness {
    fn name(&self) -> &'static str;
    fn events(&self) -> Arc<dyn EventStore>;
    fn view(&self) -> &LagView;
    async fn start(&self) -> anyhow::Result<Running>;
}

struct EmbeddedHarness {
    store: EmbeddedStore,
    view: LagView,
}

#[async_trait]
impl Harness for EmbeddedHarness {
    fn name(&self) -> &'static str {
        "embedded tail"
    }
    fn events(&self) -> Arc<dyn EventStore> {
        Arc::new(self.store.clone())
    }
    fn view(&self) -> &LagView {
        &self.view
    }
    async fn start(&self) -> anyhow::Result<Running> {
        let projector = Projector::new(
            self.events(),
            Arc::new(self.view.clone()),
            ProjectorMetrics::unregistered(),
        );
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(projector::embedded::run(
            projector,
            self.store.clone(),
            async {
                let _ = rx.await;
            },
        ));
        Ok(Running { stop, task })
    }
}

/// The embedded log tailed one event per transaction, as every source did before batched apply.
struct PerEventHarness {
    store: EmbeddedStore,
    view: LagView,
}

#[async_trait]
impl Harness for PerEventHarness {
    fn name(&self) -> &'static str {
        "embedded 1/event"
    }
    fn events(&self) -> Arc<dyn EventStore> {
        Arc::new(self.store.clone())
    }
    fn view(&self) -> &LagView {
        &self.view
    }
    async fn start(&self) -> anyhow::Result<Running> {
        let projector = Projector::new(
            self.events(),
            Arc::new(self.view.clone()),
            ProjectorMetrics::unregistered(),
        );
        let store = self.store.clone();
        let (stop, mut rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            const SOURCE: &str = "bench-per-event";
            let mut position: u64 = match store.checkpoint(SOURCE).await {
                Ok(p) => p.and_then(|p| p.parse().ok()).unwrap_or(0),
                Err(_) => 0,
            };
            loop {
                let batch = match store.read_log(position, 500).await {
                    Ok(batch) => batch,
                    Err(_) => return,
                };
                if batch.is_empty() {
                    tokio::select! {
                        _ = &mut rx => return,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => continue,
                    }
                }
                for (pos, envelope) in &batch {
                    if projector.apply(envelope).await.is_err() {
                        return;
                    }
                    position = *pos;
                }
                let _ = store.save_checkpoint(SOURCE, &position.to_string()).await;
            }
        });
        Ok(Running { stop, task })
    }
}

struct DynamoHarness {
    store: DynamoStore,
    view: LagView,
    config: PollerConfig,
}

#[async_trait]
impl Harness for DynamoHarness {
    fn name(&self) -> &'static str {
        "dynamodb poller"
    }
    fn events(&self) -> Arc<dyn EventStore> {
        Arc::new(self.store.clone())
    }
    fn view(&self) -> &LagView {
        &self.view
    }
    async fn start(&self) -> anyhow::Result<Running> {
        let streams = DynamoStreams::for_store(&self.store).await?;
        let projector = Projector::new(
            self.events(),
            Arc::new(self.view.clone()),
            ProjectorMetrics::unregistered(),
        );
        let poller = StreamPoller::new(streams, projector, self.config.clone());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(poller.run(async {
            let _ = rx.await;
        }));
        Ok(Running { stop, task })
    }
}

/// One row of the results table.
#[derive(Debug, Default)]
struct Row {
    source: &'static str,
    steady_events: usize,
    achieved_rate: f64,
    p50_ms: u64,
    p99_ms: u64,
    max_ms: u64,
    backlog_events: u64,
    applied_per_s: f64,
}

/// View writes expected from `steps`: each command appends exactly one sandbox event (claim
/// events do not touch the view).
fn view_writes(steps: &[Step]) -> u64 {
    steps.len() as u64
}

async fn wait_for_writes(view: &LagView, want: u64, deadline: Instant) -> anyhow::Result<()> {
    while view.writes() < want {
        if Instant::now() > deadline {
            anyhow::bail!(
                "view has {} of {want} writes at the deadline",
                view.writes()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn measure(harness: &dyn Harness, args: &Args) -> anyhow::Result<Row> {
    let mut driver = Driver::new(harness.events())?;
    let bound = Duration::from_secs(args.max_seconds);

    // Phase 1: steady load with the projector running.
    let steady = workload(0, (args.events as f64 / 2.5).ceil() as usize);
    harness.view().reset();
    let running = harness.start().await?;
    let started = Instant::now();
    let per_event = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
    let mut next = tokio::time::Instant::now();
    let mut sent = 0usize;
    for step in &steady {
        if started.elapsed() > bound {
            break;
        }
        tokio::time::sleep_until(next).await;
        driver.run(*step).await?;
        sent += step.events();
        next += per_event * step.events() as u32;
    }
    let append_secs = started.elapsed().as_secs_f64();
    let sent_steps: Vec<Step> = steady
        .iter()
        .copied()
        .scan(0usize, |acc, s| {
            *acc += s.events();
            (*acc <= sent).then_some(s)
        })
        .collect();
    wait_for_writes(
        harness.view(),
        view_writes(&sent_steps),
        Instant::now() + bound,
    )
    .await?;
    running.stop().await;
    let (p50, p99, max) = {
        let lags = harness
            .view()
            .lags
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (
            lags.value_at_quantile(0.5),
            lags.value_at_quantile(0.99),
            lags.max(),
        )
    };

    // Phase 2: a backlog appended while stopped, then timed catch-up.
    let backlog = workload(1_000_000, (args.backlog as f64 / 2.5).ceil() as usize);
    for step in &backlog {
        driver.run(*step).await?;
    }
    let backlog_events: usize = backlog.iter().map(|s| s.events()).sum();
    harness.view().reset();
    let running = harness.start().await?;
    let t0 = Instant::now();
    wait_for_writes(
        harness.view(),
        view_writes(&backlog),
        Instant::now() + bound,
    )
    .await?;
    let catch_up = t0.elapsed().as_secs_f64();
    running.stop().await;

    Ok(Row {
        source: harness.name(),
        steady_events: sent,
        achieved_rate: sent as f64 / append_secs.max(1e-9),
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        backlog_events: backlog_events as u64,
        // Every stream event passes through apply (claims are applied as "ignored"), so the
        // rate counts all of them.
        applied_per_s: backlog_events as f64 / catch_up.max(1e-9),
    })
}

async fn dynamo_store(args: &Args, prefix: &str) -> anyhow::Result<DynamoStore> {
    let endpoint = match &args.ddb_endpoint_url {
        Some(url) => url.clone(),
        None => tests::ddb_local::endpoint().await,
    };
    let store = DynamoStore::connect(DynamoConfig {
        table_prefix: prefix.to_string(),
        endpoint_url: Some(endpoint),
        region: Some("us-east-1".into()),
        stats_shards: 8,
        max_retries: DEFAULT_MAX_RETRIES,
        ..DynamoConfig::default()
    })
    .await?;
    store.ensure_tables().await?;
    Ok(store)
}

fn print_table(rows: &[Row], args: &Args) {
    println!();
    println!(
        "projector_bench: steady load target {:.0} events/s; poller idle {}–{} ms; backlog {} events",
        args.rate, args.idle_min_ms, args.idle_max_ms, args.backlog
    );
    println!(
        "| source          | steady events | achieved rate/s | lag p50 ms | lag p99 ms | lag max ms | backlog events | applied/s |"
    );
    println!(
        "|-----------------|---------------|-----------------|------------|------------|------------|----------------|-----------|"
    );
    for r in rows {
        println!(
            "| {:<15} | {:>13} | {:>15.1} | {:>10} | {:>10} | {:>10} | {:>14} | {:>9.1} |",
            r.source,
            r.steady_events,
            r.achieved_rate,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.backlog_events,
            r.applied_per_s
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.seed_only {
        let store = dynamo_store(&args, &args.table_prefix).await?;
        let mut driver = Driver::new(Arc::new(store))?;
        let steps = workload(0, args.sandboxes);
        for step in &steps {
            driver.run(*step).await?;
        }
        let events: usize = steps.iter().map(|s| s.events()).sum();
        eprintln!(
            "projector_bench: appended {events} events to {}-events",
            args.table_prefix
        );
        return Ok(());
    }
    let mut rows = Vec::new();
    if matches!(args.source, Source::All | Source::Embedded) {
        let dir = std::env::temp_dir().join(format!("projector-bench-{}", uuid::Uuid::new_v4()));
        let store = EmbeddedStore::open(&dir.join("broker.db"), 8)?;
        let harness = EmbeddedHarness {
            view: LagView::new(Arc::new(store.clone()))?,
            store,
        };
        eprintln!("projector_bench: measuring the embedded tail …");
        rows.push(measure(&harness, &args).await?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if matches!(args.source, Source::All | Source::EmbeddedPerEvent) {
        let dir = std::env::temp_dir().join(format!("projector-bench-{}", uuid::Uuid::new_v4()));
        let store = EmbeddedStore::open(&dir.join("broker.db"), 8)?;
        let harness = PerEventHarness {
            view: LagView::new(Arc::new(store.clone()))?,
            store,
        };
        eprintln!("projector_bench: measuring the embedded tail, one event per transaction …");
        rows.push(measure(&harness, &args).await?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if matches!(args.source, Source::All | Source::Dynamodb) {
        let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let store = dynamo_store(&args, &prefix).await?;
        let harness = DynamoHarness {
            view: LagView::new(Arc::new(store.clone()))?,
            store,
            config: PollerConfig {
                idle_min: Duration::from_millis(args.idle_min_ms.max(1)),
                idle_max: Duration::from_millis(args.idle_max_ms.max(args.idle_min_ms.max(1))),
                ..PollerConfig::default()
            },
        };
        eprintln!("projector_bench: measuring the DynamoDB Streams poller on DynamoDB Local …");
        rows.push(measure(&harness, &args).await?);
    }
    print_table(&rows, &args);
    Ok(())
}
