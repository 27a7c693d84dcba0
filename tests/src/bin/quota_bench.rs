//! Quota benchmark: allocations per second for one track with and without a quota, on the
//! embedded in-memory store (a benchmark that prints figures, not a test). A quota-bound track's
//! allocations all write the track's quota stream, so they queue on a per-track lock inside an
//! instance and race on the stream's version across instances; this measures what that costs
//! against an unquoted track, with one broker and with two brokers on the same store (two API
//! instances on one database), and checks that the quota still holds exactly in each run.
//!
//! `cargo run --release -p tests --features bench --bin quota_bench [-- --allocations 2000 --concurrency 64]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use domain::model::sandbox::SandboxCommand;
use domain::service::TrackQuotas;
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, BrokerError, CommandMeta, EventStore,
    ManualClock, PoolView, ViewStore,
};
use futures::StreamExt;
use projector::{Projector, ProjectorMetrics};
use store_embedded::EmbeddedStore;

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(
    name = "quota_bench",
    about = "Allocations per second with a track quota"
)]
struct Args {
    /// Allocations attempted per run.
    #[arg(long, default_value_t = 2000)]
    allocations: usize,
    /// Allocation requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

/// One run's figures.
struct Figures {
    label: &'static str,
    created: usize,
    refused: usize,
    elapsed: Duration,
}

/// A fresh store with `pool` available sandboxes, `brokers` brokers over it with `quota` for the
/// track `bench`, and `attempts` allocations for that track spread over the brokers.
async fn run(
    label: &'static str,
    pool: usize,
    attempts: usize,
    concurrency: usize,
    brokers: usize,
    quota: Option<u32>,
) -> anyhow::Result<Figures> {
    let store = EmbeddedStore::open_in_memory(4).context("store")?;
    let clock = ManualClock::new(Utc::now());
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let view: Arc<dyn ViewStore> = Arc::new(store.clone());
    let quotas = match quota {
        Some(limit) => {
            TrackQuotas::parse(&format!("bench={limit}"), None).map_err(|e| anyhow::anyhow!(e))?
        }
        None => TrackQuotas::default(),
    };
    let brokers: Vec<Arc<Broker>> = (0..brokers)
        .map(|_| {
            let pool: Arc<dyn PoolView> = Arc::new(store.clone());
            Arc::new(Broker::new(
                events.clone(),
                pool,
                Arc::new(clock.clone()),
                BrokerConfig {
                    quotas: quotas.clone(),
                    ..BrokerConfig::default()
                },
            ))
        })
        .collect();
    let admin = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    };
    futures::stream::iter(0..pool)
        .for_each_concurrent(16, |i| {
            let broker = brokers[0].clone();
            let admin = admin.clone();
            async move {
                let id = format!("sb-{i}");
                let _ = broker
                    .execute(
                        &id,
                        SandboxCommand::Register {
                            sandbox_id: id.clone(),
                            name: format!("bench-{i:06}"),
                            external_id: format!("identity/accounts/{i}"),
                            sfdc_account_id: None,
                            csp_created_at: None,
                        },
                        &admin,
                    )
                    .await;
            }
        })
        .await;
    let projector = Projector::new(events, view, ProjectorMetrics::unregistered());
    projector::embedded::catch_up(&projector, &store).await?;

    let started = Instant::now();
    let outcomes: Vec<Result<bool, BrokerError>> = futures::stream::iter(0..attempts)
        .map(|i| {
            let broker = brokers[i % brokers.len()].clone();
            async move {
                let caller = format!("student-{i}");
                let meta = CommandMeta {
                    actor: Actor::Track(caller.clone()),
                    request_id: None,
                    correlation_id: None,
                };
                let request = AllocateRequest {
                    caller,
                    track_name: Some("bench".into()),
                    ..AllocateRequest::default()
                };
                match broker.allocate(&request, &meta).await {
                    Ok(_) => Ok(true),
                    Err(BrokerError::QuotaExceeded { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let mut figures = Figures {
        label,
        created: 0,
        refused: 0,
        elapsed,
    };
    for outcome in outcomes {
        if outcome.context("allocate")? {
            figures.created += 1;
        } else {
            figures.refused += 1;
        }
    }
    if let Some(limit) = quota {
        let expected = (limit as usize).min(attempts);
        anyhow::ensure!(
            figures.created == expected,
            "{label}: {} allocations under a quota of {limit}",
            figures.created
        );
        let usage = brokers[0].quota_usage("bench").await?;
        anyhow::ensure!(
            usage.in_use() == expected,
            "{label}: quota stream shows {}",
            usage.in_use()
        );
    }
    Ok(figures)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.allocations;
    let c = args.concurrency;
    let big = u32::try_from(n).unwrap_or(u32::MAX);
    let small = u32::try_from((n / 3).max(1)).unwrap_or(u32::MAX);
    let runs = [
        run("no quota, 1 broker", n, n, c, 1, None).await?,
        run("quota never reached, 1 broker", n, n, c, 1, Some(big)).await?,
        run("quota never reached, 2 brokers", n, n, c, 2, Some(big)).await?,
        run("burst of 3x quota, 2 brokers", n, n, c, 2, Some(small)).await?,
    ];
    println!("quota_bench: embedded in-memory store, {n} allocations, {c} in flight");
    println!("| run | 201 | 429 | seconds | allocations/s |");
    println!("|---|---|---|---|---|");
    for f in runs {
        let secs = f.elapsed.as_secs_f64();
        println!(
            "| {} | {} | {} | {:.2} | {:.0} |",
            f.label,
            f.created,
            f.refused,
            secs,
            f.created as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
