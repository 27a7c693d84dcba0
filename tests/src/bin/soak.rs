//! Soak benchmark: the real `command-api` (embedded store, projector in-process) and `jobs worker`
//! as child processes under a steady mixed load — allocate, replay, mark for deletion; sync,
//! cleanup and auto-expiry running against the fake CSP, which lists new accounts as old ones
//! are deleted, so the pool never runs dry. Once a minute it prints each process's resident
//! memory and open file descriptors (from `/proc/<pid>/`), the projector lag the API reports,
//! the minute's requests and answers with p50/p99 latency per operation, the live rows (allocated,
//! pending deletion: what every sync lists and compares) and the store's size. Labs last
//! `--lab-seconds` (default 120, through the API's dev-only override), so allocations nobody
//! marks expire as in production; `--lab-seconds 0` keeps 48-hour labs, and the live pool then
//! grows for the whole run. Everything should stay flat; a column that only grows is a leak or
//! a workload that never reaches a steady state. A benchmark that prints figures (CI never runs
//! it), not a test.
//!
//! `cargo build --release -p tests --features bench --bins && cargo run --release -p tests --features bench --bin soak -- --minutes 20`

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use tests::app::{ADMIN_TOKEN, TRACK_TOKEN};
use tests::chaos::load::{self, LoadOptions};
use tests::chaos::process::{free_port, resources, sibling_binary, wait_healthy, ServiceProcess};
use tests::fake_csp::{FakeAccount, FakeCsp, Fault};

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "Mixed load for N minutes; RSS, fds and projector lag per minute"
)]
struct Args {
    /// Minutes of load.
    #[arg(long, default_value_t = 20)]
    minutes: u64,
    /// Concurrent students.
    #[arg(long, default_value_t = 8)]
    students: usize,
    /// Available sandboxes the fake CSP keeps up (it lists new accounts as the pool drains).
    #[arg(long, default_value_t = 1000)]
    pool: u32,
    /// Lab length in seconds (the API's dev-only `DEV_LAB_DURATION_SECONDS`, expiry grace 0), so
    /// allocations nobody marks end as they do in production and the live pool stays bounded.
    /// 0 keeps 48-hour labs: every unmarked allocation then stays live for the whole soak.
    #[arg(long, default_value_t = 120)]
    lab_seconds: u64,
    /// Each student's pause between two callers, ms: sets the arrival rate, which must stay
    /// below what cleanup deletes for the live pool (and so every column) to reach a steady state.
    #[arg(long, default_value_t = 50)]
    think_ms: u64,
    /// The worker's `CLEANUP_CONCURRENCY` (CSP deletions in flight).
    #[arg(long, default_value_t = 4)]
    cleanup_concurrency: usize,
}

fn env(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("broker-soak-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let db = dir.join("broker.db").display().to_string();
    let csp = FakeCsp::start().await;
    let mut next_account = 1u32;
    // New accounts appear in CSP as the pool drains (as operators create them): enough to bring
    // the available count back to the pool size at the next sync.
    let top_up = |csp: &FakeCsp, next: &mut u32, available: i64| {
        let missing = (i64::from(args.pool) - available.max(0)).max(0) as u32;
        for _ in 0..missing {
            csp.add_account(&FakeAccount::sandbox(*next));
            *next += 1;
        }
    };
    top_up(&csp, &mut next_account, 0);
    csp.fail_all_deletes(Fault::Delay(Duration::from_millis(20)));

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let store = [
        ("STORE", "embedded".to_string()),
        ("EMBEDDED_PATH", db.clone()),
        ("LOG_FORMAT", "text".into()),
    ];
    let mut api_env = env(&store);
    api_env.extend(env(&[
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("BROKER_API_TOKEN", TRACK_TOKEN.into()),
        ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("SEED_DEMO_POOL", "false".into()),
        ("RUN_JOBS", "false".into()),
        ("CSP_MODE", "mock".into()),
        ("RATE_LIMIT_RPS", "100000".into()),
        ("RATE_LIMIT_BURST", "100000".into()),
    ]));
    if args.lab_seconds > 0 {
        api_env.insert(
            "DEV_LAB_DURATION_SECONDS".into(),
            args.lab_seconds.to_string(),
        );
    }
    let mut worker_env = env(&store);
    worker_env.extend(env(&[
        ("CSP_MODE", "real".into()),
        ("CSP_BASE_URL", csp.base_url()),
        ("CSP_API_TOKEN", csp.token()),
        ("CSP_RATE_LIMIT_RPS", "0".into()),
        ("SYNC_INTERVAL_SEC", "4".into()),
        ("CLEANUP_INTERVAL_SEC", "2".into()),
        ("AUTO_EXPIRY_INTERVAL_SEC", "10".into()),
        ("STALE_INTERVAL_SEC", "60".into()),
        ("CLEANUP_CONCURRENCY", args.cleanup_concurrency.to_string()),
    ]));
    if args.lab_seconds > 0 {
        worker_env.insert("GRACE_PERIOD_MINUTES".into(), "0".into());
    }
    let mut api = ServiceProcess::new("api", &sibling_binary("command-api"), &[], api_env);
    let mut worker =
        ServiceProcess::new("worker", &sibling_binary("jobs"), &["worker"], worker_env);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("client")?;
    api.start();
    if !wait_healthy(&client, &url, Duration::from_secs(60)).await {
        bail!("the API did not start:\n{}", api.log_tail(20));
    }
    worker.start();
    let started = Instant::now();
    loop {
        let stats = admin_stats(&client, &url).await;
        if stats["available"].as_i64().unwrap_or(0) >= i64::from(args.pool) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the pool never filled: {stats}\n{}", worker.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let labs = match args.lab_seconds {
        0 => "48-hour labs".to_string(),
        s => format!("{s}-second labs"),
    };
    println!(
        "soak: {} min, {} students thinking {} ms, cleanup concurrency {}, pool of {} (filled in {:.1} s), {labs}, embedded store",
        args.minutes,
        args.students,
        args.think_ms,
        args.cleanup_concurrency,
        args.pool,
        started.elapsed().as_secs_f64()
    );
    println!(
        "| minute | API RSS MB | API fds | worker RSS MB | worker fds | projector lag ms | requests | 2xx | 409 | 503 | unanswered | violations | deleted (total) | allocated | pending deletion | allocate p50/p99 ms | replay p50/p99 ms | mark p50/p99 ms | db+wal MB |"
    );
    println!(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    sample(0, &api, &worker, &client, &url, None, &db).await;
    for minute in 1..=args.minutes {
        let stop = Arc::new(AtomicBool::new(false));
        let run = tokio::spawn(load::run(
            LoadOptions {
                url: url.clone(),
                students: args.students,
                replay_chance: 0.3,
                mark_chance: 0.8,
                seed: minute,
                think: Duration::from_millis(args.think_ms),
                caller_prefix: format!("m{minute}-"),
            },
            stop.clone(),
        ));
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            // Every 5 s, longer than SYNC_INTERVAL_SEC, so the last top-up is registered by now.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let available = admin_stats(&client, &url).await["available"]
                .as_i64()
                .unwrap_or(i64::from(args.pool));
            top_up(&csp, &mut next_account, available);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let report = run.await.context("load task")?;
        sample(minute, &api, &worker, &client, &url, Some(&report), &db).await;
        if !api.is_running() || !worker.is_running() {
            bail!(
                "a process died:\n{}\n{}",
                api.log_tail(20),
                worker.log_tail(20)
            );
        }
    }
    let _ = worker.terminate(Duration::from_secs(30)).await;
    let _ = api.terminate(Duration::from_secs(30)).await;
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    Ok(())
}

async fn admin_stats(client: &reqwest::Client, url: &str) -> Value {
    match client
        .get(format!("{url}/v1/admin/stats"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn sample(
    minute: u64,
    api: &ServiceProcess,
    worker: &ServiceProcess,
    client: &reqwest::Client,
    url: &str,
    report: Option<&load::LoadReport>,
    db: &str,
) {
    let (api_rss, api_fds) = api.pid().and_then(resources).unwrap_or((0, 0));
    let (worker_rss, worker_fds) = worker.pid().and_then(resources).unwrap_or((0, 0));
    let stats = admin_stats(client, url).await;
    let lag = stats["projector_lag_ms"].as_i64().unwrap_or(-1);
    let deleted = stats["deleted"].as_i64().unwrap_or(0);
    // The live rows every sync lists and compares: what the worker's work per run grows with.
    let allocated = stats["allocated"].as_i64().unwrap_or(0);
    let pending = stats["pending_deletion"].as_i64().unwrap_or(0);
    let (requests, ok, conflict, unavailable, unanswered, violations) =
        report.map_or((0, 0, 0, 0, 0, 0), |r| {
            let by = |lo: u16, hi: u16| -> u64 {
                r.by_status
                    .iter()
                    .filter(|(s, _)| (lo..=hi).contains(*s))
                    .map(|(_, n)| n)
                    .sum()
            };
            (
                r.operations,
                by(200, 299),
                by(409, 409),
                by(503, 503),
                r.unanswered,
                r.violations.len(),
            )
        });
    let latency = |op: &str| match report
        .and_then(|r| Some((r.latency_ms(op, 0.5)?, r.latency_ms(op, 0.99)?)))
    {
        Some((p50, p99)) => format!("{p50:.1} / {p99:.1}"),
        None => "–".to_string(),
    };
    // The WAL is part of what every read may have to search, so its size is shown with the file.
    let size = |path: &str| std::fs::metadata(path).map_or(0, |m| m.len());
    let store_mb = size(db) as f64 / 1_048_576.0;
    println!(
        "| {minute} | {:.1} | {api_fds} | {:.1} | {worker_fds} | {lag} | {requests} | {ok} | {conflict} | {unavailable} | {unanswered} | {violations} | {deleted} | {allocated} | {pending} | {} | {} | {} | {store_mb:.0}+{:.0} |",
        api_rss as f64 / 1024.0,
        worker_rss as f64 / 1024.0,
        latency("allocate"),
        latency("replay"),
        latency("mark"),
        size(&format!("{db}-wal")) as f64 / 1_048_576.0,
    );
}
