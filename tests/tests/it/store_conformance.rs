//! One conformance suite for every storage adapter (DESIGN.md §9): the checks of
//! `store-conformance`, generic over the ports, instantiated below for the embedded store (in
//! memory) and for DynamoDB Local, so both adapters are held to the same semantics. A few
//! adapter-specific checks follow.

use chrono::Duration;
use domain::store::{EventStore, ListFilter, PoolView, StoreError, ViewStore};
use domain::SandboxStatus;
use serde_json::json;
use store_conformance::{delta, event, now_ms, row, Ports};
use store_dynamodb::{self as dynamo, DynamoStore};
use store_embedded::EmbeddedStore;
use tests::ddb_local;

/// Stats shards of every store under test.
const SHARDS: u32 = 4;

type TestResult = Result<(), StoreError>;

async fn embedded_ports() -> Ports {
    Ports::of(EmbeddedStore::open_in_memory(SHARDS).expect("in-memory embedded store"))
}

async fn dynamodb_ports() -> Ports {
    let store = ddb_local::fresh_store(SHARDS).await;
    let index_shards = store.index_shards();
    Ports::of(store).with_index_shards(index_shards)
}

/// Every generic check on the embedded store (in memory).
mod embedded {
    store_conformance::conformance_tests!(super::embedded_ports());
}

/// Every generic check on DynamoDB Local.
mod dynamodb {
    store_conformance::conformance_tests!(super::dynamodb_ports());
}

/// Embedded only: closing and reopening the file keeps events, rows, stats and checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_restart_keeps_everything() -> TestResult {
    let dir = std::env::temp_dir().join(format!("store-conformance-{}", uuid::Uuid::new_v4()));
    let path = dir.join("broker.db");
    let appended = vec![event("sandbox#r-1", 1), event("claim#1:a#b", 1)];
    let r = row("r-1", "lab-r-1", SandboxStatus::Available, 42, 1);
    {
        let store = EmbeddedStore::open(&path, SHARDS)?;
        store.append(appended.clone()).await?;
        store
            .write_row(None, &r, &delta(&[(SandboxStatus::Available, 1)]))
            .await?;
        store.save_checkpoint("embedded-log", "2").await?;
    }
    let reopened = EmbeddedStore::open(&path, SHARDS)?;
    assert_eq!(reopened.load("sandbox#r-1").await?, appended[..1].to_vec());
    assert_eq!(reopened.load("claim#1:a#b").await?, appended[1..].to_vec());
    assert_eq!(reopened.load_row("r-1").await?, Some(r));
    assert_eq!(reopened.stats().await?.get(SandboxStatus::Available), 1);
    assert_eq!(
        reopened.checkpoint("embedded-log").await?.as_deref(),
        Some("2")
    );
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// DynamoDB only: a cursor is bound to its listing (another index, status or range is refused),
/// and ensure_tables is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_cursors_are_bound_to_their_listing() -> TestResult {
    let store = ddb_local::fresh_store(SHARDS).await;
    store.ensure_tables().await?;
    let at = now_ms();
    for i in 0..6u32 {
        let mut r = row(
            &format!("b-{i}"),
            &format!("b-{i}"),
            SandboxStatus::Allocated,
            i,
            1,
        );
        r.owner = Some("stu".into());
        r.allocated_at = Some(at + Duration::seconds(i64::from(i)));
        r.due_at = Some(at + Duration::minutes(i64::from(i)));
        store
            .write_row(None, &r, &delta(&[(SandboxStatus::Allocated, 1)]))
            .await?;
    }
    let allocated = ListFilter {
        status: Some(SandboxStatus::Allocated),
        ..ListFilter::default()
    };
    let by_owner = ListFilter {
        owner: Some("stu".into()),
        ..ListFilter::default()
    };
    let status_cursor = store
        .list(&allocated, 2, None)
        .await?
        .cursor
        .expect("more pages");
    let owner_cursor = store
        .list(&by_owner, 2, None)
        .await?
        .cursor
        .expect("more pages");
    let due_cursor = store
        .due(SandboxStatus::Allocated, at + Duration::hours(1), 2, None)
        .await?
        .cursor
        .expect("more pages");
    let available = ListFilter {
        status: Some(SandboxStatus::Available),
        ..ListFilter::default()
    };
    let other_owner = ListFilter {
        owner: Some("someone-else".into()),
        ..ListFilter::default()
    };
    let prefixed = ListFilter {
        prefix: Some("zzz".into()),
        ..allocated.clone()
    };
    let refused = [
        store.list(&allocated, 2, Some(&owner_cursor)).await.err(),
        store.list(&by_owner, 2, Some(&status_cursor)).await.err(),
        store.list(&available, 2, Some(&status_cursor)).await.err(),
        store.list(&other_owner, 2, Some(&owner_cursor)).await.err(),
        store.list(&prefixed, 2, Some(&status_cursor)).await.err(),
        store
            .list(&ListFilter::default(), 2, Some(&due_cursor))
            .await
            .err(),
        store
            .due(SandboxStatus::Allocated, at, 2, Some(&due_cursor))
            .await
            .err(),
        store
            .due(
                SandboxStatus::Stale,
                at + Duration::hours(1),
                2,
                Some(&due_cursor),
            )
            .await
            .err(),
    ];
    for (i, outcome) in refused.into_iter().enumerate() {
        assert_eq!(outcome, Some(StoreError::InvalidCursor), "case {i}");
    }
    assert_eq!(
        store
            .list(&allocated, 2, Some(&status_cursor))
            .await?
            .rows
            .len(),
        2
    );
    Ok(())
}

/// DynamoDB only: items have the documented attributes (by-time keys; sparse optional row
/// attributes), and a stream image in DynamoDB JSON decodes to the stored envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_items_have_the_documented_shape() -> TestResult {
    use aws_sdk_dynamodb::types::AttributeValue;
    let store: DynamoStore = ddb_local::fresh_store(SHARDS).await;
    let mut e = event("sandbox#shape", 1);
    e.request_id = Some("req-1".into());
    store.append(vec![e.clone()]).await?;
    let item = store
        .client()
        .get_item()
        .table_name(store.events_table())
        .key("stream_id", AttributeValue::S(e.stream_id.clone()))
        .key("version", AttributeValue::N("1".into()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|err| StoreError::Unavailable(err.to_string()))?
        .item
        .expect("the event item");
    let occurred = domain::model::events::format_time(&e.occurred_at);
    // The hour, write-sharded by the stream (ADR 0014).
    assert_eq!(
        item.get("time_bucket"),
        Some(&AttributeValue::S(format!(
            "{}#{}",
            &occurred[..13],
            dynamo::index_shard(&e.stream_id, store.index_shards())
        )))
    );
    assert_eq!(
        item.get("occurred_key"),
        Some(&AttributeValue::S(format!("{occurred}#{}", e.event_id)))
    );
    assert_eq!(
        item.get("payload"),
        Some(&AttributeValue::S(e.payload.to_string()))
    );
    assert!(!item.contains_key("correlation_id"));
    let image: serde_json::Map<String, serde_json::Value> = item
        .iter()
        .map(|(k, v)| {
            let typed = match v {
                AttributeValue::S(s) => json!({ "S": s }),
                AttributeValue::N(n) => json!({ "N": n }),
                other => panic!("unexpected attribute type {other:?}"),
            };
            (k.clone(), typed)
        })
        .collect();
    assert_eq!(
        dynamo::envelope_from_json_image(&serde_json::Value::Object(image))?,
        e
    );

    let r = row("shape-1", "lab-shape", SandboxStatus::Available, 3, 1);
    store
        .write_row(None, &r, &delta(&[(SandboxStatus::Available, 1)]))
        .await?;
    let item = store
        .client()
        .get_item()
        .table_name(store.pool_table())
        .key("sandbox_id", AttributeValue::S("shape-1".into()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|err| StoreError::Unavailable(err.to_string()))?
        .item
        .expect("the pool item");
    for absent in [
        "owner",
        "allocated_at",
        "due_at",
        "due_shard",
        "due_key",
        "sfdc_account_id",
        "last_error",
    ] {
        assert!(
            !item.contains_key(absent),
            "{absent} must be omitted (sparse index)"
        );
    }
    assert_eq!(
        item.get("updated_at"),
        Some(&AttributeValue::N(
            r.updated_at.timestamp_millis().to_string()
        ))
    );
    Ok(())
}
