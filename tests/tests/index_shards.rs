//! Write-sharded index keys (ADR 0014): with `VIEW_INDEX_SHARDS` > 1 the DynamoDB adapter spreads
//! the `by-time` and `by-due` partition keys over shards and merges them on read. These tests hold
//! the merged reads to the order the unsharded reads had — the embedded store's, which has no
//! shards — page by page, including ties, and check that events written before sharding was
//! switched on are still read.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use domain::adapters::dynamo::{
    due_shard_key, index_shard, time_bucket, time_bucket_key, DynamoConfig, DynamoStore,
};
use domain::adapters::embedded::EmbeddedStore;
use domain::audit::{feed_key, EventFeed, FeedFilter, FeedQuery};
use domain::model::events::{format_time, truncate_to_millis};
use domain::store::{EventStore, PoolView, StoreError, ViewStore};
use domain::{EventEnvelope, PoolRow, SandboxStatus, StatsDelta};
use serde_json::json;
use tests::ddb_local;

type TestResult = Result<(), StoreError>;

/// Index shards of the sharded store under test.
const SHARDS: u32 = 8;

async fn sharded_store() -> DynamoStore {
    let store = ddb_local::fresh_store(4).await;
    assert_eq!(
        store.index_shards(),
        SHARDS,
        "the harness shards the indexes"
    );
    store
}

fn event(stream_id: &str, version: u64, at: DateTime<Utc>) -> EventEnvelope {
    EventEnvelope {
        stream_id: stream_id.to_string(),
        version,
        event_type: "ShardProbe".into(),
        schema_version: 1,
        event_id: uuid::Uuid::now_v7(),
        occurred_at: at,
        actor: "admin".into(),
        request_id: None,
        correlation_id: None,
        payload: json!({"type": "ShardProbe", "n": version}),
    }
}

fn due_row(id: &str, due_at: DateTime<Utc>) -> PoolRow {
    PoolRow {
        sandbox_id: id.to_string(),
        status: SandboxStatus::Allocated,
        name: id.to_string(),
        external_id: format!("identity/accounts/{id}"),
        sfdc_account_id: None,
        owner: Some(format!("owner-{id}")),
        track_name: None,
        allocated_at: Some(due_at - Duration::hours(1)),
        expires_at: Some(due_at),
        deletion_requested_at: None,
        attempts: 0,
        last_error: None,
        due_at: Some(due_at),
        pick: 1,
        version: 1,
        updated_at: due_at,
    }
}

/// Every due row of `status` before `before`, following cursors `limit` rows at a time.
async fn all_due(
    view: &dyn PoolView,
    before: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let page = view
            .due(SandboxStatus::Allocated, before, limit, cursor.as_deref())
            .await?;
        assert!(page.rows.len() <= limit, "a page larger than its limit");
        ids.extend(page.rows.into_iter().map(|r| r.sandbox_id));
        cursor = page.cursor;
        if cursor.is_none() {
            return Ok(ids);
        }
    }
    panic!("due() paging did not end");
}

/// The whole feed from `from` to `until`, `limit` events per call, as feed keys.
async fn all_feed(
    feed: &dyn EventFeed,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    let mut after = format_time(&from);
    for _ in 0..1000 {
        let query = FeedQuery {
            after: after.clone(),
            until,
            filter: FeedFilter::default(),
        };
        let page = feed.feed(&query, limit).await?;
        keys.extend(page.events.iter().map(feed_key));
        match page.next {
            Some(next) => after = next,
            None => return Ok(keys),
        }
    }
    panic!("feed paging did not end");
}

/// The due index returns the same rows in the same order (due time, then sandbox id) from eight
/// shards as the unsharded embedded store, page by page, including rows due at the same instant
/// and rows spread over every shard; rows due after `before` are never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_index_order_is_the_same_across_shards() -> TestResult {
    let dynamo = sharded_store().await;
    let embedded = EmbeddedStore::open_in_memory(4)?;
    let t0 = truncate_to_millis(Utc::now());
    let mut rows = Vec::new();
    for i in 0..40u32 {
        // Groups of four share one due instant, so ties are ordered by the sandbox id.
        let due = t0 + Duration::minutes(i64::from(i / 4));
        rows.push(due_row(&format!("due-{:02}", (i * 7) % 40), due));
    }
    let mut shards_used = std::collections::BTreeSet::new();
    for row in &rows {
        shards_used.insert(index_shard(&row.sandbox_id, SHARDS));
        dynamo.write_row(None, row, &StatsDelta::default()).await?;
        embedded
            .write_row(None, row, &StatsDelta::default())
            .await?;
    }
    assert!(shards_used.len() > 1, "the rows spread over several shards");
    let before = t0 + Duration::minutes(7);
    let mut expected: Vec<&PoolRow> = rows.iter().filter(|r| r.due_at <= Some(before)).collect();
    expected.sort_by(|a, b| (a.due_at, &a.sandbox_id).cmp(&(b.due_at, &b.sandbox_id)));
    let expected: Vec<String> = expected.iter().map(|r| r.sandbox_id.clone()).collect();
    assert_eq!(expected.len(), 32);
    for limit in [1, 3, 7, 50] {
        let reference = all_due(&embedded, before, limit).await?;
        assert_eq!(reference, expected, "embedded, limit {limit}");
        let sharded = all_due(&dynamo, before, limit).await?;
        assert_eq!(
            sharded, expected,
            "DynamoDB with {SHARDS} shards, limit {limit}"
        );
    }
    Ok(())
}

/// The audit feed returns the same events in the same key order from eight `by-time` shards as
/// from the embedded store, page by page, across two hours and with events sharing an instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_order_is_the_same_across_shards() -> TestResult {
    let dynamo = sharded_store().await;
    let embedded = EmbeddedStore::open_in_memory(4)?;
    // Two hours back, so the events span an hour boundary and lie wholly in the past.
    let hour = truncate_to_millis(Utc::now()) - Duration::hours(2);
    let start = hour - Duration::minutes(10);
    let mut batches = Vec::new();
    for i in 0..45u64 {
        // Three events per instant, 50 s apart: 45 events over ~12 minutes across the hour.
        let at = start + Duration::seconds(i64::try_from(i / 3).unwrap_or(0) * 50);
        batches.push(event(&format!("sandbox#feed-{i}"), 1, at));
    }
    for e in &batches {
        dynamo.append(vec![e.clone()]).await?;
        embedded.append(vec![e.clone()]).await?;
    }
    let mut expected: Vec<String> = batches.iter().map(feed_key).collect();
    expected.sort();
    let until = truncate_to_millis(Utc::now());
    for limit in [1, 4, 10, 100] {
        let reference = all_feed(&embedded, start - Duration::seconds(1), until, limit).await?;
        assert_eq!(reference, expected, "embedded, limit {limit}");
        let sharded = all_feed(&dynamo, start - Duration::seconds(1), until, limit).await?;
        assert_eq!(
            sharded, expected,
            "DynamoDB with {SHARDS} shards, limit {limit}"
        );
    }
    Ok(())
}

/// Events written before sharding was switched on (one shard: the bare hour as the `by-time`
/// key) are still read, in order with the sharded ones, by a store that shards; the keys written
/// are the documented ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_unsharded_are_still_found() -> TestResult {
    let sharded = sharded_store().await;
    // A second store on the same tables, writing as the adapter did before sharding.
    let unsharded = DynamoStore::connect(DynamoConfig {
        table_prefix: sharded.table_prefix().to_string(),
        index_shards: 1,
        ..ddb_local::fresh_config(4).await
    })
    .await?;
    let at = truncate_to_millis(Utc::now()) - Duration::minutes(5);
    let old = event("sandbox#legacy", 1, at);
    let new = event("sandbox#sharded", 1, at + Duration::seconds(1));
    unsharded.append(vec![old.clone()]).await?;
    sharded.append(vec![new.clone()]).await?;
    let hour = time_bucket(&at);
    assert_eq!(time_bucket_key(&hour, "sandbox#legacy", 1), hour);
    assert_eq!(
        time_bucket_key(&hour, "sandbox#sharded", SHARDS),
        format!("{hour}#{}", index_shard("sandbox#sharded", SHARDS))
    );
    assert_eq!(
        due_shard_key(SandboxStatus::Allocated, "x", SHARDS),
        format!("allocated#{}", index_shard("x", SHARDS))
    );
    let keys = all_feed(
        &sharded,
        at - Duration::seconds(1),
        truncate_to_millis(Utc::now()),
        10,
    )
    .await?;
    assert_eq!(keys, vec![feed_key(&old), feed_key(&new)]);
    let events: Arc<dyn EventStore> = Arc::new(sharded);
    assert_eq!(events.load("sandbox#legacy").await?, vec![old]);
    Ok(())
}
