//! Load generator for `POST /v1/allocate`: drives a service at several concurrency levels and
//! prints throughput, latency percentiles, the status histogram and the double-allocation check.
//!
//! ```text
//! cargo run --release -p tests --bin loadgen -- --backend embedded           # spawns the service in-process
//! cargo run --release -p tests --bin loadgen -- --backend dynamo             # … on DynamoDB Local
//! cargo run --release -p tests --bin loadgen -- --url http://127.0.0.1:8080 --token T   # an external server
//! ```
//! Traffic goes to 127.0.0.1 only unless `--url` says otherwise; every run is bounded by
//! `--requests` per level.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp, TRACK_TOKEN};
use tests::history::{all_events, AllocationAudit};
use tokio::sync::Mutex;

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
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
    concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Pool size seeded in the spawned service.
    #[arg(long, default_value_t = 2500)]
    pool: usize,
    /// Name prefix sent with every request (as the track scripts do).
    #[arg(long, default_value = "lab")]
    prefix: String,
}

struct LevelResult {
    concurrency: usize,
    elapsed: Duration,
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, usize>,
}

async fn level(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    prefix: &str,
    concurrency: usize,
    requests: usize,
    run_id: &str,
) -> LevelResult {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|e| panic!("{e}")),
    ));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let (next, latency, statuses) = (next.clone(), latency.clone(), statuses.clone());
        let client = client.clone();
        let (url, token, prefix) = (url.to_string(), token.to_string(), prefix.to_string());
        let run_id = run_id.to_string();
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let t = Instant::now();
                let status = client
                    .post(format!("{url}/v1/allocate"))
                    .bearer_auth(&token)
                    .header(
                        "X-Instruqt-Sandbox-ID",
                        format!("load-{run_id}-{concurrency}-{i}"),
                    )
                    .header("X-Instruqt-Track-ID", "loadgen")
                    .header("X-Sandbox-Name-Prefix", &prefix)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                let us = t.elapsed().as_micros() as u64;
                let _ = latency.lock().await.record(us.max(1));
                *statuses.lock().await.entry(status).or_default() += 1;
            }
        }
    });
    futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let latency = latency.lock().await.clone();
    let statuses = statuses.lock().await.clone();
    LevelResult {
        concurrency,
        elapsed,
        latency,
        statuses,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spawned: Option<TestApp> = None;
    let (url, token) = match &args.url {
        Some(url) => (url.trim_end_matches('/').to_string(), args.token.clone()),
        None => {
            let backend = match args.backend.as_str() {
                "dynamo" | "dynamodb" => Backend::Dynamo,
                _ => Backend::Embedded,
            };
            let app = spawn_app_with(AppOptions::new(backend)).await;
            eprintln!("seeding {} sandboxes on {backend:?} …", args.pool);
            app.seed(&args.prefix, args.pool).await;
            let url = app.url.clone();
            spawned = Some(app);
            (url, TRACK_TOKEN.to_string())
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build()?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    println!(
        "| mode | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | statuses | store requests / 201 |\n|---|---|---|---|---|---|---|---|---|"
    );
    // DynamoDB requests of the spawned service (API and its in-process projector share one
    // store, so this is everything but the stream reads).
    let store_requests = || {
        spawned
            .as_ref()
            .and_then(|app| app.state.store_requests.as_ref())
            .map(|m| m.total())
    };
    let mode = if args.url.is_some() {
        "external".to_string()
    } else {
        args.backend.clone()
    };
    for &c in &args.concurrency {
        let requests_before = store_requests();
        let r = level(
            &client,
            &url,
            &token,
            &args.prefix,
            c,
            args.requests,
            &run_id,
        )
        .await;
        let ms = |q: f64| r.latency.value_at_quantile(q) as f64 / 1000.0;
        let created = r.statuses.get(&201).copied().unwrap_or(0).max(1);
        let per_allocation = match (requests_before, store_requests()) {
            (Some(before), Some(after)) => {
                format!("{:.2}", (after - before) as f64 / created as f64)
            }
            _ => "–".to_string(),
        };
        println!(
            "| {mode} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:?} | {per_allocation} |",
            r.concurrency,
            args.requests,
            args.requests as f64 / r.elapsed.as_secs_f64(),
            ms(0.50),
            ms(0.95),
            ms(0.99),
            r.statuses
        );
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
        app.stop().await;
        if !ok {
            anyhow::bail!("double allocation detected");
        }
    }
    Ok(())
}
