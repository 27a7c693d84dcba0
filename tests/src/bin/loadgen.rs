//! Load generator for `POST /v1/allocate`: drives a service at several concurrency levels and
//! prints throughput, latency percentiles, the status histogram and the double-allocation check.
//! Per level it also prints what the read side did: the projector lag sampled during the run
//! (p50/p99/max), how long after the last answer `/v1/admin/stats` counted every 201 as
//! allocated, and the store requests per 201 by DynamoDB operation (API and in-process projector,
//! counted after the view caught up, so the projector's writes for the level are included), and
//! the read and write capacity units DynamoDB reported for them per 201
//! (`broker_store_consumed_capacity_units_total`).
//!
//! ```text
//! cargo run --release -p tests --features bench --bin loadgen -- --backend embedded           # spawns the service in-process
//! cargo run --release -p tests --features bench --bin loadgen -- --concurrency 100 --duration 60 --pool 400000  # timed level
//! cargo run --release -p tests --features bench --bin loadgen -- --backend dynamo             # … on DynamoDB Local
//! ALLOCATE_CONCURRENCY=16 cargo run --release -p tests --features bench --bin loadgen -- --backend dynamo  # the spawned service takes ALLOCATE_CONCURRENCY and VIEW_INDEX_SHARDS
//! cargo run --release -p tests --features bench --bin loadgen -- --url http://127.0.0.1:8080 --token T   # an external server
//! ```
//! Traffic goes to 127.0.0.1 only unless `--url` says otherwise; every run is bounded by
//! `--requests` per level, or by `--duration` seconds when given. `--json FILE` also writes the
//! figures of every level as JSON (with the lag samples over time): what `bench-report` reads.
//!
//! Per level it also counts, per 201, the event transactions (`TransactWriteItems` on the events
//! table), the items they wrote and the write units DynamoDB bills for those items (two per
//! started KB of each; DynamoDB Local's own report undercounts transactions), the transactions
//! DynamoDB cancelled, the candidates lost to concurrent allocators, and with group commit
//! (ADR 0025) the groups written and the allocations decided again.
//!
//! The workshop shapes: `--tracks N` spreads the requests over N tracks (`loadgen-0` …), and
//! `--track-quota Q` gives each a quota of Q. `--api-binary PATH` (with `--backend dynamo`) runs
//! that build of `command-api` as a child process on fresh DynamoDB Local tables instead of the
//! in-process service, so two builds are measured by the same load generator:
//!
//! ```text
//! cargo run --release -p tests --features bench --bin loadgen -- --backend dynamo --api-binary target/release/chaos-command-api --concurrency 300 --requests 300 --pool 2000 --track-quota 250
//! ```

use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp, ADMIN_TOKEN, TRACK_TOKEN};
use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};
use tests::history::{all_events, AllocationAudit};
use tokio::sync::Mutex;

#[path = "loadgen/line.rs"]
mod line;

/// The service this process hosts runs on the allocator its own binary uses (ADR 0020).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Spawn the service in-process on this backend (`embedded` or `dynamo`).
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// Drive an already running server instead (no history audit then).
    #[arg(long)]
    url: Option<String>,
    /// Track token for `--url`.
    #[arg(long, default_value = TRACK_TOKEN)]
    token: String,
    /// Admin token for `--url` (reads `/v1/admin/stats` to time the view's catch-up).
    #[arg(long, default_value = ADMIN_TOKEN)]
    admin_token: String,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
    concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Run each level for this many seconds instead of `--requests` (the pool must be large
    /// enough, or the tail of the run measures 409s).
    #[arg(long)]
    duration: Option<u64>,
    /// How long to wait after a level for `/v1/admin/stats` to count every 201, seconds.
    #[arg(long, default_value_t = 120)]
    converge_timeout: u64,
    /// Pool size seeded in the spawned service.
    #[arg(long, default_value_t = 2500)]
    pool: usize,
    /// Name prefix sent with every request (as the track scripts do).
    #[arg(long, default_value = "lab")]
    prefix: String,
    /// Also write every level's figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Spread the requests over this many tracks (`loadgen-0` …; one track is named `loadgen`).
    #[arg(long, default_value_t = 1)]
    tracks: usize,
    /// Give every track a quota of this many live allocations (`TRACK_QUOTAS` of the service).
    #[arg(long)]
    track_quota: Option<u32>,
    /// With `--backend dynamo`: run this `command-api` build as a child process (projector in
    /// it) on fresh DynamoDB Local tables, instead of the service in this process.
    #[arg(long)]
    api_binary: Option<std::path::PathBuf>,
    /// Before the levels, reserve this many sandboxes (of `--prefix`) for the first track, with
    /// its window open for the whole run (the service then writes reservations, ADR 0028); the
    /// run starts once all of them are earmarked.
    #[arg(long)]
    reserve: Option<u32>,
    /// Send `Prefer: wait=SECONDS` with every request (the waiting line, ADR 0029).
    #[arg(long, value_name = "SECONDS")]
    prefer_wait: Option<u64>,
    /// Send no `X-Sandbox-Name-Prefix` (any sandbox will do); the pool is still named after
    /// `--prefix`.
    #[arg(long)]
    no_prefix_header: bool,
    /// Skip the wait for `/v1/admin/stats` after each level (for a server whose admin API is
    /// not this broker's, such as the reference in `scripts/bench-reference.sh`).
    #[arg(long)]
    no_stats: bool,
    /// The waiting-line shape instead of the levels: this many students arrive, more than
    /// `--pool`, each with `Prefer: wait` (`--prefer-wait`, default 10 s), while
    /// `--line-supply` new sandboxes are registered during the run (in-process service only).
    #[arg(long)]
    line_students: Option<usize>,
    /// Gap between two students' arrivals in the waiting-line shape, ms.
    #[arg(long, default_value_t = 10)]
    line_arrival_ms: u64,
    /// Sandboxes registered during the waiting-line shape.
    #[arg(long, default_value_t = 0)]
    line_supply: usize,
    /// Sandboxes per registration batch of the waiting-line shape.
    #[arg(long, default_value_t = 20)]
    line_supply_batch: usize,
    /// Gap between two registration batches of the waiting-line shape, ms.
    #[arg(long, default_value_t = 300)]
    line_supply_every_ms: u64,
}

impl Args {
    /// The track of request number `i`.
    fn track(&self, i: usize) -> String {
        match self.tracks {
            0 | 1 => "loadgen".to_string(),
            n => format!("loadgen-{}", i % n),
        }
    }

    /// `TRACK_QUOTAS` for `--track-quota` (blank without one).
    fn track_quotas(&self) -> String {
        let Some(quota) = self.track_quota else {
            return String::new();
        };
        (0..self.tracks.max(1))
            .map(|i| format!("{}={quota}", self.track(i)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `Prefer: wait=` of the waiting-line shape when `--prefer-wait` is not given, seconds.
const LINE_WAIT_S: u64 = 10;

/// When a level stops sending.
#[derive(Clone, Copy)]
enum Bound {
    /// After this many requests.
    Requests(usize),
    /// At this instant.
    Until(Instant),
}

struct LevelResult {
    concurrency: usize,
    elapsed: Duration,
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, usize>,
    /// Every request as (latency µs, request number, sent at µs since the level started).
    requests: Vec<(u64, usize, u64)>,
}

/// The slowest 1% of a level's requests (what sets its p99): when they were sent and on which
/// track, slowest first.
fn slowest_percent(r: &LevelResult, tracks: &[String]) -> serde_json::Value {
    let mut requests = r.requests.clone();
    requests.sort_unstable_by(|a, b| b.cmp(a));
    let take = requests.len().div_ceil(100);
    serde_json::json!(requests
        .iter()
        .take(take)
        .map(|(us, i, sent_us)| serde_json::json!({
            "request": i,
            "track": tracks[i % tracks.len().max(1)],
            "sent_ms": *sent_us as f64 / 1000.0,
            "latency_ms": *us as f64 / 1000.0,
        }))
        .collect::<Vec<_>>())
}

#[allow(clippy::too_many_arguments)]
async fn level(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    prefix: Option<&str>,
    concurrency: usize,
    bound: Bound,
    run_id: &str,
    tracks: Arc<Vec<String>>,
    prefer_wait: Option<u64>,
) -> LevelResult {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|e| panic!("{e}")),
    ));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let (next, latency, statuses) = (next.clone(), latency.clone(), statuses.clone());
        let requests = requests.clone();
        let client = client.clone();
        let (url, token) = (url.to_string(), token.to_string());
        let prefix = prefix.map(str::to_string);
        let run_id = run_id.to_string();
        let tracks = tracks.clone();
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let done = match bound {
                    Bound::Requests(requests) => i >= requests,
                    Bound::Until(until) => Instant::now() >= until,
                };
                if done {
                    return;
                }
                let t = Instant::now();
                let mut request = client.post(format!("{url}/v1/allocate"));
                if let Some(seconds) = prefer_wait {
                    request = request.header("Prefer", format!("wait={seconds}"));
                }
                if let Some(prefix) = &prefix {
                    request = request.header("X-Sandbox-Name-Prefix", prefix);
                }
                let status = request
                    .bearer_auth(&token)
                    .header(
                        "X-Instruqt-Sandbox-ID",
                        format!("load-{run_id}-{concurrency}-{i}"),
                    )
                    .header(
                        "X-Instruqt-Track-ID",
                        tracks[i % tracks.len().max(1)].as_str(),
                    )
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                let us = t.elapsed().as_micros() as u64;
                let _ = latency.lock().await.record(us.max(1));
                let sent_us = t.duration_since(started).as_micros() as u64;
                requests.lock().await.push((us, i, sent_us));
                *statuses.lock().await.entry(status).or_default() += 1;
            }
        }
    });
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let latency = latency.lock().await.clone();
    let statuses = statuses.lock().await.clone();
    let requests = std::mem::take(&mut *requests.lock().await);
    LevelResult {
        concurrency,
        elapsed,
        latency,
        statuses,
        requests,
    }
}

/// Store requests by DynamoDB operation, summed over tables (from `broker_store_requests_total`).
type OpCounts = BTreeMap<String, f64>;

/// Reads the `op` label and the value of every `broker_store_requests_total` line.
fn store_requests_by_op(metrics: &str) -> OpCounts {
    sum_by_label(metrics, "broker_store_requests_total", "op")
}

/// Capacity units DynamoDB reported, by `kind` (`read` / `write`), summed over operations and
/// tables (from `broker_store_consumed_capacity_units_total`).
fn capacity_by_kind(metrics: &str) -> OpCounts {
    sum_by_label(
        metrics,
        "broker_store_consumed_capacity_units_total",
        "kind",
    )
}

/// The values of every `metric` series summed by the value of its `label`.
fn sum_by_label(metrics: &str, metric: &str, label: &str) -> OpCounts {
    let mut by_label = OpCounts::new();
    let prefix = format!("{metric}{{");
    let label_prefix = format!("{label}=\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let key = labels
            .split(',')
            .find_map(|l| l.strip_prefix(label_prefix.as_str()))
            .map(|v| v.trim_end_matches('"').to_string());
        if let (Some(key), Ok(value)) = (key, value.trim().parse::<f64>()) {
            *by_label.entry(key).or_default() += value;
        }
    }
    by_label
}

/// The sum of every series of `metric` whose labels include all of `labels` (0 when absent).
fn metric_total(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !(series.is_empty() || series.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The labels a [`contention`] figure is summed over.
type Labels = &'static [(&'static str, &'static str)];

/// What the allocations of a level cost in transactions and contention, from two `/metrics`
/// texts: (figure name, count); `None` for a figure the service does not export (an older
/// build).
fn contention(before: &str, after: &str) -> Vec<(&'static str, Option<f64>)> {
    let figures: [(&str, &str, Labels); 7] = [
        (
            "event_transactions",
            "broker_store_requests_total",
            &[("op", "TransactWriteItems"), ("target", "events")],
        ),
        (
            "event_items",
            "broker_store_transaction_items_total",
            &[("target", "events")],
        ),
        (
            "event_write_units",
            "broker_store_transaction_write_units_total",
            &[("target", "events")],
        ),
        (
            "cancellations",
            "broker_store_transaction_cancellations_total",
            &[("target", "events")],
        ),
        (
            "candidate_conflicts",
            "broker_allocate_conflicts_total",
            &[],
        ),
        ("groups", "broker_allocate_groups_total", &[]),
        ("redecided", "broker_allocate_group_redecided_total", &[]),
    ];
    figures
        .iter()
        .map(|(name, metric, labels)| {
            let exported = after.lines().any(|l| l.starts_with(metric));
            let delta = metric_total(after, metric, labels) - metric_total(before, metric, labels);
            (*name, exported.then_some(delta.max(0.0)))
        })
        .collect()
}

/// The `broker_projector_lag_ms` gauge, if the process runs a projector.
fn projector_lag_ms(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("broker_projector_lag_ms "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as i64)
}

fn subtract(after: &OpCounts, before: &OpCounts) -> OpCounts {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

/// Where the figures come from: the spawned service's own registry and view (so that measuring
/// adds no store request), or an external server's `/metrics` and `/v1/admin/stats`.
#[derive(Clone)]
struct Probe {
    client: reqwest::Client,
    url: String,
    admin_token: String,
    spawned: Option<command_api::state::SharedState>,
}

impl Probe {
    async fn metrics_text(&self) -> String {
        match &self.spawned {
            Some(state) => {
                let mut text = String::new();
                let encoder = prometheus::TextEncoder::new();
                let _ = encoder.encode_utf8(&state.registry.gather(), &mut text);
                text
            }
            None => match self
                .client
                .get(format!("{}/metrics", self.url))
                .send()
                .await
            {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            },
        }
    }

    async fn lag_ms(&self) -> Option<i64> {
        match self.spawned.as_ref().map(|s| s.projector_metrics.as_ref()) {
            Some(Some(metrics)) => Some(metrics.last_lag_ms()),
            Some(None) => None,
            None => projector_lag_ms(&self.metrics_text().await),
        }
    }

    /// `allocated` from `GET /v1/admin/stats` (what an operator sees).
    async fn allocated(&self) -> Option<i64> {
        let response = self
            .client
            .get(format!("{}/v1/admin/stats", self.url))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        body.get("allocated").and_then(|v| v.as_i64())
    }
}

/// Lag samples taken every 100 ms until `stop` is set: (ms since the level started, lag ms).
fn sample_lag(
    probe: Probe,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u64, i64)>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            if let Some(lag) = probe.lag_ms().await {
                samples.push((started.elapsed().as_millis() as u64, lag));
            }
        }
        samples
    })
}

fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Reserves `count` sandboxes of `--prefix` for the first track, its window open for three hours
/// from a minute from now (inside the lead time, so they are earmarked at creation), and waits
/// until the reservation shows all of them earmarked.
async fn reserve(
    client: &reqwest::Client,
    url: &str,
    admin_token: &str,
    args: &Args,
    count: u32,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let track = args.track(0);
    let created = client
        .post(format!("{url}/v1/admin/reservations"))
        .bearer_auth(admin_token)
        .json(&serde_json::json!({
            "track": track,
            "count": count,
            "prefix": args.prefix,
            "starts_at": (now + chrono::Duration::minutes(1)).to_rfc3339(),
            "ends_at": (now + chrono::Duration::hours(3)).to_rfc3339(),
        }))
        .send()
        .await?;
    let status = created.status();
    let body: serde_json::Value = created.json().await.unwrap_or_default();
    if status.as_u16() != 201 {
        anyhow::bail!("reserving {count} for {track}: {status} {body}");
    }
    let id = body["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let shown: serde_json::Value = client
            .get(format!("{url}/v1/admin/reservations/{id}"))
            .bearer_auth(admin_token)
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        if shown["earmarked"].as_u64() == Some(u64::from(count)) {
            println!("reserved {count} sandboxes for {track} (reservation {id}), all earmarked");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("reservation {id} not fully earmarked within 300 s: {shown}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spawned: Option<TestApp> = None;
    let mut child: Option<ChildService> = None;
    let mut ticker = None;
    let tick_gap_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, token, admin_token) = match (&args.url, &args.api_binary) {
        (Some(url), _) => (
            url.trim_end_matches('/').to_string(),
            args.token.clone(),
            args.admin_token.clone(),
        ),
        (None, Some(binary)) => {
            let service = ChildService::start(binary, &args).await?;
            let url = service.url.clone();
            child = Some(service);
            (url, TRACK_TOKEN.to_string(), ADMIN_TOKEN.to_string())
        }
        (None, None) => {
            let backend = match args.backend.as_str() {
                "dynamo" | "dynamodb" => Backend::Dynamo,
                _ => Backend::Embedded,
            };
            let mut options = AppOptions::new(backend);
            // The spawned service takes `VIEW_INDEX_SHARDS` and `ALLOCATE_CONCURRENCY` as a
            // deployed one would, so their cost can be compared run against run.
            // A value that does not parse stops the run rather than measuring the default.
            let setting = |name: &str| -> anyhow::Result<Option<u32>> {
                let Ok(raw) = std::env::var(name) else {
                    return Ok(None);
                };
                let value = raw
                    .parse::<u32>()
                    .map_err(|e| anyhow::anyhow!("{name}={raw:?}: {e}"))?;
                println!("{name}={value}");
                Ok(Some(value))
            };
            let shards = setting("VIEW_INDEX_SHARDS")?;
            let allocating = setting("ALLOCATE_CONCURRENCY")?;
            let grouping = setting("DDB_GROUP_COMMIT_ITEMS")?;
            let in_flight = setting("ALLOCATE_GROUPS_IN_FLIGHT")?;
            let quotas = args.track_quotas();
            // The waiting-line shape keeps every student it sends waiting on this one instance.
            let line_waiters = args.line_students;
            let line_wait_s = args.prefer_wait.unwrap_or(LINE_WAIT_S);
            options.configure = Box::new(move |config| {
                if let Some(students) = line_waiters {
                    config.wait_max_waiters = students;
                    // Each waiter holds a request slot; the shape measures the line, not shedding.
                    config.max_concurrent_requests =
                        config.max_concurrent_requests.max(students * 2);
                    config.wait_max_sec = config.wait_max_sec.max(line_wait_s);
                }
                if let Some(shards) = shards {
                    config.store.view_index_shards = shards;
                }
                if let Some(allocating) = allocating {
                    config.allocate_concurrency = allocating as usize;
                }
                if let Some(items) = grouping {
                    config.store.ddb_group_commit_items = items;
                }
                if let Some(groups) = in_flight {
                    config.allocate_groups_in_flight = groups;
                }
                config.track_quotas = quotas;
            });
            options.jobs.reservations.write_events_reservations = args.reserve.is_some();
            let app = spawn_app_with(options).await;
            // The test app's clock only moves when told to; the projector measures lag against
            // the wall clock, so events (the seed's too) must carry wall-clock times. Ticking
            // every millisecond bounds the error this adds to a lag sample to about that.
            // An OS thread, not a task: a saturated runtime would delay a task's tick by far
            // more than the scheduler delays a sleeping thread. The longest gap is printed, as
            // the bound on how much earlier than the truth an event may be stamped.
            let clock = app.clock.clone();
            let gap = tick_gap_us.clone();
            let stop = ticker_stop.clone();
            ticker = Some(std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    clock.set(chrono::Utc::now());
                    let now = Instant::now();
                    gap.fetch_max(
                        (now - last).as_micros() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    last = now;
                }
            }));
            eprintln!("seeding {} sandboxes on {backend:?} …", args.pool);
            let seeding = Instant::now();
            app.seed(&args.prefix, args.pool).await;
            eprintln!("seeded in {:.1} s", seeding.elapsed().as_secs_f64());
            let url = app.url.clone();
            spawned = Some(app);
            (url, TRACK_TOKEN.to_string(), ADMIN_TOKEN.to_string())
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build()?;
    let probe = Probe {
        client: client.clone(),
        url: url.clone(),
        admin_token,
        spawned: spawned.as_ref().map(|app| app.state.clone()),
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let tracks: Arc<Vec<String>> =
        Arc::new((0..args.tracks.max(1)).map(|i| args.track(i)).collect());
    let mode = if args.url.is_some() {
        "external".to_string()
    } else if args.api_binary.is_some() {
        format!("{} (child)", args.backend)
    } else {
        args.backend.clone()
    };
    if let Some(count) = args.reserve {
        reserve(&client, &url, &probe.admin_token, &args, count).await?;
    }
    if let Some(students) = args.line_students {
        let Some(app) = spawned else {
            anyhow::bail!("--line-students registers supply through the in-process service: drop --url and --api-binary");
        };
        let shape = line::LineShape {
            students,
            arrival_gap: Duration::from_millis(args.line_arrival_ms),
            wait_s: args.prefer_wait.unwrap_or(LINE_WAIT_S),
            supply: args.line_supply,
            supply_batch: args.line_supply_batch,
            supply_gap: Duration::from_millis(args.line_supply_every_ms),
        };
        let mut report = line::run(&app, &client, &shape, &args.prefix, tracks, &run_id).await?;
        let events = all_events(app.state.broker.events().as_ref()).await;
        let audit = AllocationAudit::replay(&events);
        let clean = audit.double_allocations().is_empty() && audit.callers_holding_two().is_empty();
        println!(
            "double-allocation check (replayed {} events): {} allocated twice, {} callers holding two",
            events.len(),
            audit.double_allocations().len(),
            audit.callers_holding_two().len()
        );
        report["mode"] = serde_json::json!(mode);
        report["pool"] = serde_json::json!(args.pool);
        report["tracks"] = serde_json::json!(args.tracks.max(1));
        report["no_double_allocation"] = serde_json::json!(clean);
        ticker_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(ticker) = ticker {
            let _ = ticker.join();
        }
        app.stop().await;
        if !clean {
            anyhow::bail!("double allocation detected");
        }
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    if let Some(seconds) = args.prefer_wait {
        println!("every request sends Prefer: wait={seconds}");
    }
    let baseline = if args.no_stats {
        0
    } else {
        probe.allocated().await.unwrap_or(0)
    };
    let mut created_so_far = 0i64;
    let mut rows = Vec::new();
    let mut read_side = Vec::new();
    let mut levels_json = Vec::new();
    for &c in &args.concurrency {
        let metrics_before = probe.metrics_text().await;
        let requests_before = store_requests_by_op(&metrics_before);
        let capacity_before = capacity_by_kind(&metrics_before);
        tick_gap_us.store(0, std::sync::atomic::Ordering::Relaxed);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = sample_lag(probe.clone(), stop.clone());
        let bound = match args.duration {
            Some(secs) => Bound::Until(Instant::now() + Duration::from_secs(secs)),
            None => Bound::Requests(args.requests),
        };
        let r = level(
            &client,
            &url,
            &token,
            (!args.no_prefix_header).then_some(args.prefix.as_str()),
            c,
            bound,
            &run_id,
            tracks.clone(),
            args.prefer_wait,
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let lag_series = sampler.await.unwrap_or_default();
        let mut lags: Vec<i64> = lag_series.iter().map(|(_, lag)| *lag).collect();
        lags.sort_unstable();
        let sent: usize = r.statuses.values().sum();
        let created = r.statuses.get(&201).copied().unwrap_or(0);
        created_so_far += created as i64;

        // How long until the operator's stats count every 201 of this run.
        let want = baseline + created_so_far;
        let waiting = Instant::now();
        let deadline = waiting + Duration::from_secs(args.converge_timeout);
        let mut stats_reads = 0u32;
        let converged = loop {
            if args.no_stats {
                break None;
            }
            stats_reads += 1;
            let allocated = probe.allocated().await;
            if allocated.is_some_and(|a| a >= want) {
                break Some((waiting.elapsed(), allocated.unwrap_or(0)));
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The stats reads of that wait are store requests too: price one read on the now quiet
        // service and take them out, so the figure is the allocations' own cost.
        let quiet_metrics = probe.metrics_text().await;
        let quiet = store_requests_by_op(&quiet_metrics);
        let quiet_capacity = capacity_by_kind(&quiet_metrics);
        const PRICED_READS: u32 = 5;
        let pricing_reads = if args.no_stats { 0 } else { PRICED_READS };
        for _ in 0..pricing_reads {
            let _ = probe.allocated().await;
        }
        let priced_metrics = probe.metrics_text().await;
        let per_wait = |priced: OpCounts| -> OpCounts {
            priced
                .iter()
                .map(|(op, n)| (op.clone(), n / PRICED_READS as f64 * stats_reads as f64))
                .collect()
        };
        let spent_waiting = per_wait(subtract(&store_requests_by_op(&priced_metrics), &quiet));
        let level_requests = subtract(&subtract(&quiet, &requests_before), &spent_waiting);
        let capacity_waiting = per_wait(subtract(
            &capacity_by_kind(&priced_metrics),
            &quiet_capacity,
        ));
        let level_capacity = subtract(
            &subtract(&quiet_capacity, &capacity_before),
            &capacity_waiting,
        );

        let ms = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
        let per_allocation = if level_requests.is_empty() || created == 0 {
            "–".to_string()
        } else {
            let total: f64 = level_requests.values().sum();
            let by_op: Vec<String> = level_requests
                .iter()
                .map(|(op, n)| format!("{op} {:.2}", n / created as f64))
                .collect();
            format!("{:.2} ({})", total / created as f64, by_op.join(", "))
        };
        // `None` where the store is not metered (the embedded store counts no requests).
        let metered = !level_requests.is_empty();
        let per_created = |n: f64| (created > 0 && metered).then(|| n / created as f64);
        let contended = contention(&metrics_before, &quiet_metrics);
        let contended_json: serde_json::Map<String, serde_json::Value> = contended
            .iter()
            .map(|(name, n)| {
                let per = n.and_then(&per_created);
                (format!("{name}_per_201"), serde_json::json!(per))
            })
            .collect();
        let contended_text = if metered && created > 0 {
            contended
                .iter()
                .map(|(name, n)| match n {
                    Some(n) => format!("{name} {:.3}", n / created as f64),
                    None => format!("{name} –"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            "–".to_string()
        };
        levels_json.push(serde_json::json!({
            "concurrency": r.concurrency,
            "requests": sent,
            "created": created,
            "elapsed_s": r.elapsed.as_secs_f64(),
            "requests_per_s": sent as f64 / r.elapsed.as_secs_f64(),
            "created_per_s": created as f64 / r.elapsed.as_secs_f64(),
            "p50_ms": ms(0.50),
            "p95_ms": ms(0.95),
            "p99_ms": ms(0.99),
            "statuses": r.statuses,
            "store_requests_per_201": per_created(level_requests.values().sum()),
            "rcu_per_201": per_created(level_capacity.get("read").copied().unwrap_or(0.0)),
            "wcu_per_201": per_created(level_capacity.get("write").copied().unwrap_or(0.0)),
            "lag_p50_ms": quantile(&lags, 0.50),
            "lag_p99_ms": quantile(&lags, 0.99),
            "lag_max_ms": lags.last().copied().unwrap_or(0),
            "lag_series": lag_series,
            "caught_up_ms": converged.map(|(after, _)| after.as_millis() as u64),
            "contention": contended_json,
            "slowest_1pct": slowest_percent(&r, &tracks),
            "store_requests_per_201_by_op": level_requests
                .iter()
                .filter_map(|(op, n)| per_created(*n).map(|per| (op.clone(), per)))
                .collect::<BTreeMap<_, _>>(),
        }));
        let capacity_per_allocation = if level_capacity.is_empty() || created == 0 {
            "–".to_string()
        } else {
            let units =
                |kind: &str| level_capacity.get(kind).copied().unwrap_or(0.0) / created as f64;
            format!("{:.2} / {:.2}", units("read"), units("write"))
        };
        rows.push(format!(
            "| {mode} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:?} | {per_allocation} | {capacity_per_allocation} | {contended_text} |",
            r.concurrency,
            sent,
            sent as f64 / r.elapsed.as_secs_f64(),
            ms(0.50),
            ms(0.95),
            ms(0.99),
            r.statuses
        ));
        let caught_up = match converged {
            Some((after, allocated)) => format!(
                "{:.0} ms (allocated {allocated} = {want} expected)",
                after.as_secs_f64() * 1000.0
            ),
            None if args.no_stats => "not read (--no-stats)".to_string(),
            None => format!("not within {} s", args.converge_timeout),
        };
        let tick_gap = if ticker.is_some() {
            format!(
                "{:.1}",
                tick_gap_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0
            )
        } else {
            "–".to_string()
        };
        read_side.push(format!(
            "| {mode} | {c} | {:.1} | {} | {} | {} | {} | {tick_gap} | {caught_up} |",
            r.elapsed.as_secs_f64(),
            lags.len(),
            quantile(&lags, 0.50),
            quantile(&lags, 0.99),
            lags.last().copied().unwrap_or(0),
        ));
        eprintln!(
            "{}\n{}",
            rows[rows.len() - 1],
            read_side[read_side.len() - 1]
        );
    }
    ticker_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(ticker) = ticker {
        let _ = ticker.join();
    }
    println!(
        "| mode | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | statuses | store requests / 201 (by op) | RCU / WCU per 201 | per 201 |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &rows {
        println!("{row}");
    }
    println!(
        "\n| mode | concurrency | run s | lag samples | lag p50 ms | lag p99 ms | lag max ms | clock tick max gap ms | stats = 201s after the run |\n|---|---|---|---|---|---|---|---|---|"
    );
    for row in &read_side {
        println!("{row}");
    }
    let mut audit_ok = None;
    if let Some(service) = child {
        let clean = service.audit_and_stop().await;
        audit_ok = Some(clean);
        if !clean {
            anyhow::bail!("double allocation detected");
        }
    }
    if let Some(app) = spawned {
        let events = all_events(app.state.broker.events().as_ref()).await;
        let audit = AllocationAudit::replay(&events);
        let owners: BTreeSet<&String> = audit.allocations.values().flatten().collect();
        println!(
            "double-allocation check (replayed {} events): {} sandboxes allocated, {} allocated twice, {} callers holding two, {} distinct owners",
            events.len(),
            audit.allocations.len(),
            audit.double_allocations().len(),
            audit.callers_holding_two().len(),
            owners.len()
        );
        let ok = audit.double_allocations().is_empty() && audit.callers_holding_two().is_empty();
        audit_ok = Some(ok);
        app.stop().await;
        if !ok {
            anyhow::bail!("double allocation detected");
        }
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "mode": mode,
            "pool": args.pool,
            "tracks": args.tracks.max(1),
            "track_quota": args.track_quota,
            "levels": levels_json,
            "no_double_allocation": audit_ok,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// A `command-api` build run as a child process on fresh DynamoDB Local tables (`--api-binary`),
/// its projector in-process, the pool registered in its event table beforehand.
struct ChildService {
    url: String,
    process: ServiceProcess,
    store: Arc<store_dynamodb::DynamoStore>,
}

impl ChildService {
    async fn start(binary: &std::path::Path, args: &Args) -> anyhow::Result<Self> {
        if !matches!(args.backend.as_str(), "dynamo" | "dynamodb") {
            anyhow::bail!("--api-binary runs on DynamoDB Local only (--backend dynamo)");
        }
        let store = Arc::new(tests::ddb_local::fresh_store(8).await);
        eprintln!("registering {} sandboxes on DynamoDB Local …", args.pool);
        let seeding = Instant::now();
        let broker = Arc::new(domain::Broker::new(
            store.clone(),
            store.clone(),
            Arc::new(domain::SystemClock),
            domain::BrokerConfig::default(),
        ));
        let meta = domain::CommandMeta {
            actor: domain::Actor::Admin,
            request_id: None,
            correlation_id: Some("loadgen-seed".into()),
        };
        let registrations = (0..args.pool).map(|i| {
            let (broker, meta) = (broker.clone(), meta.clone());
            let id = format!("{}-id-{i}", args.prefix);
            let name = format!("{}-{i:05}", args.prefix);
            async move {
                let command = domain::model::sandbox::SandboxCommand::Register {
                    sandbox_id: id.clone(),
                    name,
                    external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                    sfdc_account_id: None,
                    csp_created_at: None,
                };
                broker
                    .execute(&id, command, &meta)
                    .await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("register {id}: {e}"))
            }
        });
        let registered: Vec<anyhow::Result<()>> = futures::stream::iter(registrations)
            .buffer_unordered(16)
            .collect()
            .await;
        registered
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()?;
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let endpoint = tests::ddb_local::endpoint().await;
        let mut env: BTreeMap<String, String> = [
            ("BIND_ADDR", format!("127.0.0.1:{port}")),
            ("BROKER_API_TOKEN", TRACK_TOKEN.to_string()),
            ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("SEED_DEMO_POOL", "false".into()),
            ("RUN_JOBS", "false".into()),
            ("RUN_PROJECTOR", "true".into()),
            ("CSP_MODE", "mock".into()),
            ("RATE_LIMIT_RPS", "100000".into()),
            ("RATE_LIMIT_BURST", "100000".into()),
            // Every client comes from 127.0.0.1: the per-address cap (256 by default) would
            // close the connections of a level above it before they send anything.
            ("MAX_CONNECTIONS_PER_ADDRESS", "0".into()),
            ("STORE", "dynamodb".into()),
            ("DDB_ENDPOINT_URL", endpoint),
            ("AWS_REGION", "us-east-1".into()),
            ("TABLE_PREFIX", store.table_prefix().to_string()),
            ("ENSURE_TABLES", "false".into()),
            ("TRACK_QUOTAS", args.track_quotas()),
            (
                "WRITE_EVENTS_RESERVATIONS",
                args.reserve.is_some().to_string(),
            ),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // Passed through as for the in-process service, so builds are compared on equal terms.
        for name in [
            "ALLOCATE_CONCURRENCY",
            "VIEW_INDEX_SHARDS",
            "DDB_GROUP_COMMIT_ITEMS",
            "ALLOCATE_GROUPS_IN_FLIGHT",
        ] {
            if let Ok(value) = std::env::var(name) {
                println!("{name}={value}");
                env.insert(name.to_string(), value);
            }
        }
        let mut process = ServiceProcess::new("command-api", binary, &[], env);
        process.start();
        let client = reqwest::Client::new();
        if !wait_healthy(&client, &url, Duration::from_secs(120)).await {
            anyhow::bail!(
                "{} did not become healthy:\n{}",
                binary.display(),
                process.log_tail(30)
            );
        }
        // Its projector brings the registrations into the view.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let stats = client
                .get(format!("{url}/v1/admin/stats"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await;
            let available = match stats {
                Ok(response) => response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|b| b.get("available").and_then(serde_json::Value::as_i64)),
                Err(_) => None,
            };
            if available.is_some_and(|a| a >= args.pool as i64) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the view did not show the pool within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "registered and projected in {:.1} s",
            seeding.elapsed().as_secs_f64()
        );
        Ok(Self {
            url,
            process,
            store,
        })
    }

    /// Replays the history (no sandbox twice, no caller holding two), then stops the process.
    async fn audit_and_stop(mut self) -> bool {
        let events = all_events(self.store.as_ref()).await;
        let audit = AllocationAudit::replay(&events);
        println!(
            "double-allocation check (replayed {} events): {} sandboxes allocated, {} allocated twice, {} callers holding two",
            events.len(),
            audit.allocations.len(),
            audit.double_allocations().len(),
            audit.callers_holding_two().len(),
        );
        let _ = self.process.terminate(Duration::from_secs(10)).await;
        audit.double_allocations().is_empty() && audit.callers_holding_two().is_empty()
    }
}
