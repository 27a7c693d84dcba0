//! How evenly the hot DynamoDB index keys spread (a benchmark that prints figures, not a test):
//! drives `--allocations` real allocations through `domain::Broker` (on an in-memory embedded
//! store, so nothing but key computation is measured), then computes for every event and every
//! allocated row the items the DynamoDB adapter writes — with the adapter's own functions,
//! `envelope_to_sharded_item` and `row_to_sharded_item` — and counts the index writes per
//! partition key of `by-time` (`time_bucket`), `by-due` (`due_shard`), and `by-status-pick` /
//! `by-status-name` (`status`). An allocation moves a row from `available` to `allocated`, which
//! on those two indexes is two writes: the entry leaves the row's `available` key and enters its
//! `allocated` key. Printed per shard count: the writes, the distinct partition keys, and the
//! largest share any one key received (the goal with S shards is ≤ 1/S, plus the hash's
//! unevenness).
//!
//! `cargo run --release -p tests --features bench --bin partition_bench [-- --allocations 10000 --shards 1,8,16]`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use clap::Parser;
use domain::model::sandbox::SandboxCommand;
use domain::store::PoolView;
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, EventEnvelope, PoolRow,
    SandboxStatus, SystemClock,
};
use store_dynamodb::{envelope_to_sharded_item, row_to_sharded_item};
use store_embedded::EmbeddedStore;
use tests::tee_events::TeeEvents;

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(name = "partition_bench", about = "Index partition-key spread")]
struct Args {
    /// Allocations to make (each sandbox registered first).
    #[arg(long, default_value_t = 10_000)]
    allocations: usize,
    /// Shard counts to compute the spread for (`VIEW_INDEX_SHARDS`).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    shards: Vec<u32>,
}

/// Writes per partition key of one index.
struct Spread {
    writes: usize,
    keys: usize,
    largest: usize,
}

impl Spread {
    fn of<'a>(keys: impl Iterator<Item = &'a str>) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for key in keys {
            *counts.entry(key).or_default() += 1;
        }
        Self {
            writes: counts.values().sum(),
            keys: counts.len(),
            largest: counts.values().copied().max().unwrap_or(0),
        }
    }

    fn share(&self) -> f64 {
        self.largest as f64 / self.writes.max(1) as f64
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = EmbeddedStore::open_in_memory(8)?;
    let view = EmbeddedStore::open_in_memory(8)?;
    let broker = Broker::new(
        Arc::new(TeeEvents::new(Arc::new(log.clone()), view.clone())),
        Arc::new(view.clone()),
        Arc::new(SystemClock),
        BrokerConfig::default(),
    );
    let admin = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("partition-bench".into()),
    };
    for n in 0..args.allocations {
        let id = format!("sbx-{n:06}");
        broker
            .execute(
                &id,
                SandboxCommand::Register {
                    sandbox_id: id.clone(),
                    name: format!("lab-{n:06}"),
                    external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                &admin,
            )
            .await?;
    }
    let registered_up_to = log.log_head().await?;
    let started = Instant::now();
    for n in 0..args.allocations {
        let caller = format!("student-{n:06}");
        broker
            .allocate(
                &AllocateRequest {
                    caller: caller.clone(),
                    ..AllocateRequest::default()
                },
                &CommandMeta {
                    actor: Actor::Track(caller),
                    ..admin.clone()
                },
            )
            .await?;
    }
    let elapsed = started.elapsed();
    // The index writes of the allocation phase: every event it appended (by-time) and every
    // row it moved to `allocated` with a due time (by-due; one row write per allocation).
    let mut events: Vec<EventEnvelope> = Vec::new();
    let mut after = registered_up_to;
    loop {
        let page = log.read_log(after, 5_000).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        events.extend(page.into_iter().map(|(_, e)| e));
    }
    let mut rows: Vec<PoolRow> = Vec::new();
    let mut cursor: Option<String> = None;
    let far = Utc::now() + chrono::Duration::days(3650);
    loop {
        let page = view
            .due(SandboxStatus::Allocated, far, 1_000, cursor.as_deref())
            .await?;
        rows.extend(page.rows);
        cursor = page.cursor;
        if cursor.is_none() {
            break;
        }
    }
    println!(
        "{} allocations in {:.1} s ({} events, {} due rows); index writes per partition key:",
        args.allocations,
        elapsed.as_secs_f64(),
        events.len(),
        rows.len()
    );
    println!();
    println!("| shards S | index | writes | partition keys | largest share | goal 1/S |");
    println!("|---|---|---|---|---|---|");
    for &shards in &args.shards {
        let time_keys: Vec<String> = events
            .iter()
            .filter_map(|e| {
                envelope_to_sharded_item(e, shards)
                    .get("time_bucket")
                    .and_then(|v| v.as_s().ok().cloned())
            })
            .collect();
        let due_keys: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                row_to_sharded_item(r, shards)
                    .get("due_shard")
                    .and_then(|v| v.as_s().ok().cloned())
            })
            .collect();
        // The row before the allocation (available, nobody's) and after it: the `status`
        // attribute is the hash key of both status indexes; `by-status-name` holds only rows
        // with a name (its sort key).
        let mut pick_keys: Vec<String> = Vec::new();
        let mut name_keys: Vec<String> = Vec::new();
        for row in &rows {
            let before = PoolRow {
                status: SandboxStatus::Available,
                owner: None,
                allocated_at: None,
                expires_at: None,
                due_at: None,
                ..row.clone()
            };
            for item in [
                row_to_sharded_item(&before, shards),
                row_to_sharded_item(row, shards),
            ] {
                let Some(key) = item.get("status").and_then(|v| v.as_s().ok()) else {
                    continue;
                };
                pick_keys.push(key.clone());
                if item.contains_key("name") {
                    name_keys.push(key.clone());
                }
            }
        }
        for (index, keys) in [
            ("by-time", &time_keys),
            ("by-due", &due_keys),
            ("by-status-pick", &pick_keys),
            ("by-status-name", &name_keys),
        ] {
            let spread = Spread::of(keys.iter().map(String::as_str));
            println!(
                "| {shards} | {index} | {} | {} | {:.1} % | {:.1} % |",
                spread.writes,
                spread.keys,
                spread.share() * 100.0,
                100.0 / f64::from(shards.max(1))
            );
        }
    }
    Ok(())
}
