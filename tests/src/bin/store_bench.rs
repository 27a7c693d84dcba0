//! Append throughput and latency of the event-store adapters (a benchmark that prints figures, not
//! a test). For each adapter — embedded (a temporary SQLite file, once with `synchronous = FULL`,
//! the default, and once with `NORMAL`) and DynamoDB (DynamoDB Local via `tests::ddb_local`, or
//! `DDB_ENDPOINT_URL`) — it runs:
//! * single-event appends and two-stream transactional appends, with 1 and 64 concurrent writers,
//!   each writer on its own streams so the figures measure throughput, not contention;
//! * a short contended run: every writer appends to one stream (load latest, append next, retry on
//!   conflict), reporting the conflicts.
//!
//! Counts are bounded (`--appends`, default 2,000 per case). Latency is per `append` call.
//!
//! `cargo run --release -p tests --features bench --bin store_bench [-- --appends 2000 --adapters embedded,dynamodb]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use domain::model::events::truncate_to_millis;
use domain::store::{EventStore, StoreError};
use domain::EventEnvelope;
use hdrhistogram::Histogram;
use serde_json::json;
use store_embedded::{Durability, EmbeddedStore};

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(name = "store_bench", about = "Event-store append benchmark")]
struct Args {
    /// Appends per throughput case.
    #[arg(long, default_value_t = 2_000)]
    appends: usize,
    /// Successful appends in the contended case.
    #[arg(long, default_value_t = 300)]
    contended_appends: usize,
    /// Writers in the contended case.
    #[arg(long, default_value_t = 16)]
    contended_writers: usize,
    /// Adapters to measure, comma-separated (`embedded`, `dynamodb`).
    #[arg(long, value_delimiter = ',', default_value = "embedded,dynamodb")]
    adapters: Vec<String>,
}

/// What one case measured.
struct Figures {
    adapter: &'static str,
    case: &'static str,
    writers: usize,
    appends: usize,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    conflicts: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

fn event(stream_id: &str, version: u64, writer: usize) -> EventEnvelope {
    EventEnvelope {
        stream_id: stream_id.to_string(),
        version,
        event_type: "BenchProbe".into(),
        schema_version: 1,
        event_id: uuid::Uuid::now_v7(),
        occurred_at: truncate_to_millis(Utc::now()),
        actor: format!("job:bench-{writer}"),
        request_id: Some(format!("req-{writer}-{version}")),
        correlation_id: None,
        payload: json!({
            "type": "BenchProbe",
            "caller": format!("student-{writer}"),
            "track_name": "bench-track",
            "allocated_at": Utc::now(),
            "lab_duration_s": 172_800,
        }),
    }
}

/// `total` appends split over `writers` concurrent writers, each on its own stream(s): one event
/// per append, or (with `two_streams`) one transaction of an event in each of two streams.
async fn throughput(
    store: Arc<dyn EventStore>,
    adapter: &'static str,
    run: &str,
    writers: usize,
    total: usize,
    two_streams: bool,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        let share = total / writers + usize::from(writer < total % writers);
        let a = format!("sandbox#bench-{run}-{writer}");
        let b = format!("claim#5:bench#{run}-{writer}");
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            for i in 1..=share as u64 {
                let mut batch = vec![event(&a, i, writer)];
                if two_streams {
                    batch.push(event(&b, i, writer));
                }
                let t = Instant::now();
                store.append(batch).await?;
                latency.saturating_record(t.elapsed().as_micros().try_into().unwrap_or(u64::MAX));
            }
            Ok::<_, anyhow::Error>(latency)
        }));
    }
    let mut latency_us = histogram()?;
    for task in tasks {
        latency_us.add(task.await??)?;
    }
    Ok(Figures {
        adapter,
        case: if two_streams {
            "2-stream transaction"
        } else {
            "single-event append"
        },
        writers,
        appends: total,
        elapsed: started.elapsed(),
        latency_us,
        conflicts: 0,
    })
}

/// `writers` writers append to ONE stream until `total` appends succeeded: load the latest
/// version, append the next, retry on conflict. Latency covers every attempt.
async fn contended(
    store: Arc<dyn EventStore>,
    adapter: &'static str,
    run: &str,
    writers: usize,
    total: usize,
) -> anyhow::Result<Figures> {
    let stream = format!("sandbox#bench-{run}-contended");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        let stream = stream.clone();
        let share = total / writers + usize::from(writer < total % writers);
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            let mut conflicts = 0u64;
            let mut written = 0;
            while written < share {
                let t = Instant::now();
                let next = store
                    .load_latest(&stream)
                    .await?
                    .map_or(1, |e| e.version + 1);
                let outcome = store.append(vec![event(&stream, next, writer)]).await;
                latency.saturating_record(t.elapsed().as_micros().try_into().unwrap_or(u64::MAX));
                match outcome {
                    Ok(()) => written += 1,
                    Err(StoreError::VersionConflict { .. }) => conflicts += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok::<_, anyhow::Error>((latency, conflicts))
        }));
    }
    let mut latency_us = histogram()?;
    let mut conflicts = 0;
    for task in tasks {
        let (latency, c) = task.await??;
        latency_us.add(latency)?;
        conflicts += c;
    }
    let stored = store.load(&stream).await?;
    anyhow::ensure!(
        stored.iter().map(|e| e.version).eq(1..=total as u64),
        "contended stream must hold versions 1..={total} exactly once"
    );
    Ok(Figures {
        adapter,
        case: "contended, one stream",
        writers,
        appends: total,
        elapsed: started.elapsed(),
        latency_us,
        conflicts,
    })
}

async fn bench_adapter(
    store: Arc<dyn EventStore>,
    adapter: &'static str,
    args: &Args,
) -> anyhow::Result<Vec<Figures>> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut figures = Vec::new();
    for (i, (writers, two_streams)) in [(1, false), (64, false), (1, true), (64, true)]
        .into_iter()
        .enumerate()
    {
        let case_run = format!("{run}-{i}");
        let f = throughput(
            store.clone(),
            adapter,
            &case_run,
            writers,
            args.appends,
            two_streams,
        )
        .await?;
        print_row(&f);
        figures.push(f);
    }
    let f = contended(
        store,
        adapter,
        &run,
        args.contended_writers,
        args.contended_appends,
    )
    .await?;
    print_row(&f);
    figures.push(f);
    Ok(figures)
}

fn print_header() {
    println!(
        "{:<9} {:<22} {:>7} {:>7} {:>8} {:>10} {:>8} {:>8} {:>9}",
        "adapter",
        "case",
        "writers",
        "appends",
        "seconds",
        "appends/s",
        "p50 ms",
        "p99 ms",
        "conflicts"
    );
}

fn print_row(f: &Figures) {
    let secs = f.elapsed.as_secs_f64();
    let ms = |q: f64| f.latency_us.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{:<9} {:<22} {:>7} {:>7} {:>8.2} {:>10.0} {:>8.2} {:>8.2} {:>9}",
        f.adapter,
        f.case,
        f.writers,
        f.appends,
        secs,
        f.appends as f64 / secs.max(f64::EPSILON),
        ms(0.50),
        ms(0.99),
        f.conflicts
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    print_header();
    for adapter in &args.adapters {
        match adapter.as_str() {
            "embedded" => {
                // Both durability settings, each on a fresh file: FULL is the default,
                // NORMAL is what the store used before group commit.
                for (durability, name) in [
                    (Durability::Full, "embedded FULL"),
                    (Durability::Normal, "embedded NORMAL"),
                ] {
                    let dir =
                        std::env::temp_dir().join(format!("store-bench-{}", uuid::Uuid::new_v4()));
                    let store = EmbeddedStore::open_with(&dir.join("bench.db"), 8, durability)?;
                    let outcome = bench_adapter(Arc::new(store), name, &args).await;
                    let _ = std::fs::remove_dir_all(&dir);
                    outcome?;
                }
            }
            "dynamodb" => {
                let store = tests::ddb_local::fresh_store(8).await;
                bench_adapter(Arc::new(store), "dynamodb", &args).await?;
            }
            other => anyhow::bail!("unknown adapter '{other}' (embedded, dynamodb)"),
        }
    }
    Ok(())
}
