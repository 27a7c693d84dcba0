//! Cleanup benchmark: CSP DELETEs per sandbox when 2–4 cleanup workers run at once over the same
//! pending sandboxes (a benchmark that prints figures, not a test). Each worker is a separate
//! `Jobs` (its own CSP client, breaker and lease identity) on one embedded in-memory store, as
//! separate `jobs worker` processes would be on one database; the CSP is the fake on 127.0.0.1
//! with a small delay per DELETE so that the workers really overlap. No faults are injected: the
//! figure is the normal case, where the deletion lease should keep it at 1.00 (goal ≤ 1.05).
//! Each worker count is also run with `DELETION_LEASE_SEC=0` (every lease lapses at once), which
//! is the behaviour before the lease: at-least-once deletes.
//!
//! `cargo run --release -p tests --features bench --bin cleanup_bench [-- --sandboxes 200 --workers 2,3,4]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, EventStore, ManualClock, PoolView,
    SandboxStatus, ViewStore,
};
use jobs::{CspMode, Jobs, JobsConfig};
use projector::{Projector, ProjectorMetrics};
use prometheus::Registry;
use store_embedded::EmbeddedStore;
use tests::fake_csp::{FakeAccount, FakeCsp, Fault};

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(
    name = "cleanup_bench",
    about = "DELETEs per sandbox with concurrent cleanup workers"
)]
struct Args {
    /// Pending sandboxes per run.
    #[arg(long, default_value_t = 200)]
    sandboxes: u32,
    /// Worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    workers: Vec<usize>,
    /// Latency of each fake CSP DELETE, milliseconds.
    #[arg(long, default_value_t = 5)]
    delete_ms: u64,
}

/// One run's figures.
struct Figures {
    workers: usize,
    lease_s: u64,
    deletes: u32,
    deleted: u64,
    skipped: u64,
    elapsed: Duration,
}

fn jobs_config(csp: &FakeCsp, lease_s: u64) -> JobsConfig {
    let mut c = JobsConfig {
        deletion_lease: Duration::from_secs(lease_s),
        ..JobsConfig::default()
    };
    c.csp.mode = CspMode::Real;
    c.csp.base_url = csp.base_url();
    c.csp.api_token = csp.token().into();
    c.csp.rate_limit_rps = 0.0;
    c.csp.page_size = 100;
    c
}

/// A fresh store with `n` pending sandboxes, and `workers` cleanup workers run over it at once.
async fn run(n: u32, workers: usize, delete_ms: u64, lease_s: u64) -> anyhow::Result<Figures> {
    let store = EmbeddedStore::open_in_memory(4).context("store")?;
    let clock = ManualClock::new(Utc::now());
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let view: Arc<dyn ViewStore> = Arc::new(store.clone());
    let pool: Arc<dyn PoolView> = Arc::new(store.clone());
    let broker = Arc::new(Broker::new(
        events.clone(),
        pool,
        Arc::new(clock.clone()),
        BrokerConfig::default(),
    ));
    let projector = Projector::new(events, view, ProjectorMetrics::unregistered());
    let csp = FakeCsp::start().await;
    let accounts: Vec<FakeAccount> = (1..=n).map(FakeAccount::sandbox).collect();
    csp.set_accounts(accounts.clone());
    let build = || {
        Jobs::from_config(
            broker.clone(),
            jobs_config(&csp, lease_s),
            Arc::new(clock.clone()),
            &Registry::new(),
        )
        .context("jobs")
    };
    build()?.sync().await.context("sync")?;
    projector::embedded::catch_up(&projector, &store).await?;
    for (i, account) in accounts.iter().enumerate() {
        let caller = format!("student-{i}");
        let meta = CommandMeta {
            actor: Actor::Track(caller.clone()),
            request_id: None,
            correlation_id: None,
        };
        let request = AllocateRequest {
            caller: caller.clone(),
            name_prefix: account.name.clone(),
            ..AllocateRequest::default()
        };
        let allocation = broker.allocate(&request, &meta).await?;
        broker
            .mark_for_deletion(&allocation.sandbox.sandbox_id, &caller, &meta)
            .await?;
    }
    projector::embedded::catch_up(&projector, &store).await?;
    csp.fail_all_deletes(Fault::Delay(Duration::from_millis(delete_ms)));

    let pool: Vec<Jobs> = (0..workers).map(|_| build()).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let summaries = futures::future::join_all(pool.iter().map(|jobs| jobs.cleanup())).await;
    let elapsed = started.elapsed();
    let mut figures = Figures {
        workers,
        lease_s,
        deletes: csp.total_delete_calls(),
        deleted: 0,
        skipped: 0,
        elapsed,
    };
    for summary in summaries {
        let summary = summary.context("cleanup")?;
        figures.deleted += summary.deleted;
        figures.skipped += summary.skipped_conflicts;
    }
    projector::embedded::catch_up(&projector, &store).await?;
    let stats = store.stats().await?;
    anyhow::ensure!(
        stats.get(SandboxStatus::Deleted) == i64::from(n),
        "not every sandbox was deleted: {stats:?}"
    );
    Ok(figures)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} pending sandboxes per run, {} ms per fake CSP DELETE, no faults",
        args.sandboxes, args.delete_ms
    );
    println!("| workers | DELETION_LEASE_SEC | sandboxes | CSP DELETEs | DELETEs per sandbox | recorded deletions | skipped (leased or done) | seconds |");
    println!("|---|---|---|---|---|---|---|---|");
    for &workers in &args.workers {
        for lease_s in [300, 0] {
            let f = run(args.sandboxes, workers, args.delete_ms, lease_s).await?;
            print_row(&f, args.sandboxes);
        }
    }
    Ok(())
}

/// One table row.
fn print_row(f: &Figures, sandboxes: u32) {
    println!(
        "| {} | {} | {} | {} | {:.3} | {} | {} | {:.2} |",
        f.workers,
        f.lease_s,
        sandboxes,
        f.deletes,
        f64::from(f.deletes) / f64::from(sandboxes),
        f.deleted,
        f.skipped,
        f.elapsed.as_secs_f64()
    );
}
