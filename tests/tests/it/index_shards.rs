//! Write-sharded index keys (ADR 0014): with `VIEW_INDEX_SHARDS` > 1 the DynamoDB adapter spreads
//! the `by-time`, `by-due`, `by-status-pick` and `by-status-name` partition keys over shards and
//! merges them on read. These tests hold the merged reads to the order the unsharded reads had —
//! the embedded store's, which has no shards — page by page, including ties, check that events
//! and rows written before sharding was switched on are still read, and that allocation through
//! the HTTP API finds the last free sandbox of a pool spread over every shard.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use domain::audit::{feed_key, EventFeed, FeedFilter, FeedQuery};
use domain::model::events::{format_time, truncate_to_millis};
use domain::store::{CandidateQuery, EventStore, ListFilter, PoolView, StoreError, ViewStore};
use domain::{EventEnvelope, PoolRow, SandboxStatus, StatsDelta};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use store_dynamodb::{
    due_shard_key, index_shard, row_to_sharded_item, status_shard_key, time_bucket,
    time_bucket_key, DynamoConfig, DynamoStore,
};
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};
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
        held_by: None,
        earmark: None,
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

fn available_row(id: &str, name: &str, pick: u32) -> PoolRow {
    let at = truncate_to_millis(Utc::now());
    PoolRow {
        sandbox_id: id.to_string(),
        status: SandboxStatus::Available,
        name: name.to_string(),
        external_id: format!("identity/accounts/{id}"),
        sfdc_account_id: None,
        owner: None,
        track_name: None,
        allocated_at: None,
        expires_at: None,
        deletion_requested_at: None,
        attempts: 0,
        last_error: None,
        due_at: None,
        pick,
        version: 1,
        updated_at: at,
        held_by: None,
        earmark: None,
    }
}

/// Every row of a listing, following cursors `limit` rows at a time, as `name/id`.
async fn all_listed(
    view: &dyn PoolView,
    filter: &ListFilter,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let page = view.list(filter, limit, cursor.as_deref()).await?;
        assert!(page.rows.len() <= limit, "a page larger than its limit");
        rows.extend(
            page.rows
                .into_iter()
                .map(|r| format!("{}/{}", r.name, r.sandbox_id)),
        );
        cursor = page.cursor;
        if cursor.is_none() {
            return Ok(rows);
        }
    }
    panic!("list() paging did not end");
}

/// A listing filter by status (and name prefix).
fn by_status(status: SandboxStatus, prefix: Option<&str>) -> ListFilter {
    ListFilter {
        status: Some(status),
        owner: None,
        prefix: prefix.map(str::to_string),
    }
}

/// Rows of two statuses under three name prefixes, some sharing a name (ties are ordered by the
/// sandbox id), written to `stores`; returns them.
async fn write_listing_rows(stores: &[&dyn ViewStore]) -> Result<Vec<PoolRow>, StoreError> {
    let mut rows = Vec::new();
    for i in 0..48u32 {
        let prefix = ["lab-", "lab2-", "other-"][(i % 3) as usize];
        // Every fourth name repeats the one before it: the same name on two sandboxes.
        let n = if i % 4 == 3 { i - 1 } else { i };
        let mut row = available_row(
            &format!("sb-{:02}", (i * 11) % 48),
            &format!("{prefix}{:02}", n / 3),
            i.wrapping_mul(2_654_435_761),
        );
        if i % 5 == 0 {
            row.status = SandboxStatus::Allocated;
            row.owner = Some(format!("student-{i}"));
            row.allocated_at = Some(row.updated_at);
        }
        rows.push(row);
    }
    for row in &rows {
        for store in stores {
            store.write_row(None, row, &StatsDelta::default()).await?;
        }
    }
    Ok(rows)
}

/// Listings by status, and by status and name prefix, return the same rows in the same order
/// (name, then sandbox id) from eight `by-status-name` shards as from the embedded store, page
/// by page, names shared by two sandboxes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_listings_keep_their_order_across_shards() -> TestResult {
    let dynamo = sharded_store().await;
    let embedded = EmbeddedStore::open_in_memory(4)?;
    let rows = write_listing_rows(&[&dynamo, &embedded]).await?;
    let shards_used: std::collections::BTreeSet<u32> = rows
        .iter()
        .map(|r| index_shard(&r.sandbox_id, SHARDS))
        .collect();
    assert_eq!(shards_used.len(), SHARDS as usize, "rows in every shard");
    for (status, prefix) in [
        (SandboxStatus::Available, None),
        (SandboxStatus::Available, Some("lab-")),
        (SandboxStatus::Available, Some("lab")),
        (SandboxStatus::Allocated, None),
        (SandboxStatus::Allocated, Some("other-")),
        (SandboxStatus::Available, Some("none-")),
    ] {
        let mut expected: Vec<&PoolRow> = rows
            .iter()
            .filter(|r| r.status == status && prefix.is_none_or(|p| r.name.starts_with(p)))
            .collect();
        expected.sort_by(|a, b| (&a.name, &a.sandbox_id).cmp(&(&b.name, &b.sandbox_id)));
        let expected: Vec<String> = expected
            .iter()
            .map(|r| format!("{}/{}", r.name, r.sandbox_id))
            .collect();
        let filter = by_status(status, prefix);
        for limit in [1, 2, 5, 100] {
            let reference = all_listed(&embedded, &filter, limit).await?;
            assert_eq!(reference, expected, "embedded, {filter:?}, limit {limit}");
            let sharded = all_listed(&dynamo, &filter, limit).await?;
            assert_eq!(
                sharded, expected,
                "DynamoDB with {SHARDS} shards, {filter:?}, limit {limit}"
            );
        }
    }
    // A cursor of one status does not resume another.
    let page = dynamo
        .list(&by_status(SandboxStatus::Available, None), 2, None)
        .await?;
    let cursor = page.cursor.unwrap_or_default();
    assert_eq!(
        dynamo
            .list(&by_status(SandboxStatus::Allocated, None), 2, Some(&cursor))
            .await
            .map(|p| p.rows.len()),
        Err(StoreError::InvalidCursor)
    );
    Ok(())
}

/// Long runs of one name, several rows of each run in the same shard, are listed in (name,
/// sandbox id) order exactly once, page by page as the embedded store lists them, with page
/// sizes that cut inside the runs: the merge never relies on the order in which one shard
/// returns rows that share a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_name_are_listed_in_order_whatever_the_page_size() -> TestResult {
    let dynamo = sharded_store().await;
    let embedded = EmbeddedStore::open_in_memory(4)?;
    let ids = ids_in_every_shard("tie", 3);
    let mut rows = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let name = match i {
            0..=9 => "lab-run-a".to_string(),
            10..=16 => "lab-run-b".to_string(),
            _ => format!("lab-solo-{i:02}"),
        };
        let mut row = available_row(id, &name, i as u32);
        if i % 6 == 5 {
            row.status = SandboxStatus::Allocated;
            row.owner = Some(format!("student-{i}"));
            row.allocated_at = Some(row.updated_at);
        }
        rows.push(row);
    }
    for row in &rows {
        dynamo.write_row(None, row, &StatsDelta::default()).await?;
        embedded
            .write_row(None, row, &StatsDelta::default())
            .await?;
    }
    let run_a_shards: Vec<u32> = rows
        .iter()
        .filter(|r| r.name == "lab-run-a" && r.status == SandboxStatus::Available)
        .map(|r| index_shard(&r.sandbox_id, SHARDS))
        .collect();
    let distinct: std::collections::BTreeSet<&u32> = run_a_shards.iter().collect();
    assert!(
        distinct.len() < run_a_shards.len(),
        "some shard holds several rows of one name"
    );
    for (status, prefix) in [
        (SandboxStatus::Available, None),
        (SandboxStatus::Available, Some("lab-run")),
        (SandboxStatus::Available, Some("lab-run-a")),
        (SandboxStatus::Allocated, None),
    ] {
        let mut expected: Vec<&PoolRow> = rows
            .iter()
            .filter(|r| r.status == status && prefix.is_none_or(|p| r.name.starts_with(p)))
            .collect();
        expected.sort_by(|a, b| (&a.name, &a.sandbox_id).cmp(&(&b.name, &b.sandbox_id)));
        let expected: Vec<String> = expected
            .iter()
            .map(|r| format!("{}/{}", r.name, r.sandbox_id))
            .collect();
        let filter = by_status(status, prefix);
        for limit in [1, 2, 3, 4, 7, 100] {
            let reference = all_listed(&embedded, &filter, limit).await?;
            assert_eq!(reference, expected, "embedded, {filter:?}, limit {limit}");
            let sharded = all_listed(&dynamo, &filter, limit).await?;
            assert_eq!(
                sharded, expected,
                "DynamoDB with {SHARDS} shards, {filter:?}, limit {limit}"
            );
        }
    }
    Ok(())
}

/// A candidate page is never empty while the view shows an available row — with and without a
/// name prefix, whichever shard the random start picks (a page from an empty shard asks the
/// others) — it holds no row twice, and the pages of the different starts reach every shard,
/// so the allocator's fast path, not only its sweep, finds the last free sandboxes of a pool
/// spread over eight shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_pages_reach_every_shard() -> TestResult {
    let dynamo = sharded_store().await;
    let rows: Vec<PoolRow> = (0..6u32)
        .map(|i| available_row(&format!("few-{i}"), &format!("lab-{i}"), i * 1_000_003))
        .collect();
    for row in &rows {
        dynamo.write_row(None, row, &StatsDelta::default()).await?;
    }
    let expected: std::collections::BTreeSet<String> =
        rows.iter().map(|r| r.sandbox_id.clone()).collect();
    for (prefix, after_name) in [
        (None, None),
        (Some("lab-"), None),
        (Some("lab-"), Some("lab-3")),
    ] {
        let mut reached = std::collections::BTreeSet::new();
        // Consecutive starts choose every open shard in turn.
        for start_pick in 0..2 * (SHARDS + 1) {
            let query = CandidateQuery {
                prefix: prefix.map(str::to_string),
                start_pick,
                after_name: after_name.map(str::to_string),
                limit: 15,
            };
            let got: Vec<String> = dynamo
                .candidates(&query)
                .await?
                .into_iter()
                .map(|r| r.sandbox_id)
                .collect();
            let distinct: std::collections::BTreeSet<String> = got.iter().cloned().collect();
            assert!(!got.is_empty(), "an empty page: {query:?}");
            assert_eq!(distinct.len(), got.len(), "a row twice: {query:?}");
            assert!(distinct.is_subset(&expected), "{got:?}: {query:?}");
            reached.extend(distinct);
        }
        assert_eq!(reached, expected, "prefix {prefix:?} after {after_name:?}");
    }
    // A short limit is respected, no row twice.
    let query = CandidateQuery {
        prefix: None,
        start_pick: 7,
        after_name: None,
        limit: 4,
    };
    let got = dynamo.candidates(&query).await?;
    let distinct: std::collections::BTreeSet<&str> =
        got.iter().map(|r| r.sandbox_id.as_str()).collect();
    assert!((1..=4).contains(&got.len()), "{} rows", got.len());
    assert_eq!(distinct.len(), got.len());
    Ok(())
}

/// Sandbox ids `{stem}-N`, `per_shard` of them in each of the eight index shards.
fn ids_in_every_shard(stem: &str, per_shard: usize) -> Vec<String> {
    let mut counts = [0usize; SHARDS as usize];
    let mut ids = Vec::new();
    for n in 0.. {
        if ids.len() == per_shard * SHARDS as usize {
            break;
        }
        let id = format!("{stem}-{n}");
        let shard = index_shard(&id, SHARDS) as usize;
        if counts[shard] < per_shard {
            counts[shard] += 1;
            ids.push(id);
        }
    }
    ids
}

/// Query requests the store has sent so far.
fn queries(store: &DynamoStore) -> u64 {
    store
        .request_counts()
        .snapshot()
        .into_iter()
        .filter(|(op, _, _)| op == "Query")
        .map(|(_, _, n)| n)
        .sum()
}

/// A nearly drained pool (two free rows in each of eight shards) costs at most two queries per
/// candidate page — the random start and its wrap to the bottom of the one shard read — with
/// and without a prefix, instead of one query per shard and the legacy key: a short page from
/// one shard is served as it is, and every page still holds rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_shards_cost_two_queries_per_candidate_page() -> TestResult {
    let dynamo = sharded_store().await;
    for (i, id) in ids_in_every_shard("thin", 2).iter().enumerate() {
        let row = available_row(
            id,
            &format!("lab-{i:02}"),
            (i as u32).wrapping_mul(2_654_435_761),
        );
        dynamo.write_row(None, &row, &StatsDelta::default()).await?;
    }
    let pages = 16u32;
    for prefix in [None, Some("lab-")] {
        let before = queries(&dynamo);
        let mut after_name = None;
        for page in 0..pages {
            let query = CandidateQuery {
                prefix: prefix.map(str::to_string),
                start_pick: page.wrapping_mul(0x9E37_79B9),
                after_name: after_name.clone(),
                limit: 15,
            };
            let rows = dynamo.candidates(&query).await?;
            assert!(!rows.is_empty(), "an empty page: {query:?}");
            after_name = prefix.and(rows.last().map(|r| r.name.clone()));
        }
        let spent = queries(&dynamo) - before;
        assert!(
            spent <= 2 * u64::from(pages),
            "{spent} queries for {pages} candidate pages (prefix {prefix:?})"
        );
    }
    // Rows in one shard only: a page that starts on an empty shard asks the others at once
    // and still finds them.
    let sparse = sharded_store().await;
    let lone = ids_in_every_shard("lone", 1);
    let row = available_row(&lone[3], "lab-lone", 17);
    sparse.write_row(None, &row, &StatsDelta::default()).await?;
    for start_pick in 0..2 * SHARDS {
        let query = CandidateQuery {
            prefix: None,
            start_pick,
            after_name: None,
            limit: 15,
        };
        let got: Vec<String> = sparse
            .candidates(&query)
            .await?
            .into_iter()
            .map(|r| r.sandbox_id)
            .collect();
        assert_eq!(got, vec![lone[3].clone()], "{query:?}");
    }
    Ok(())
}

/// Rows written before sharding was switched on (one shard: the bare status as the index key)
/// are still listed, in order with the sharded ones, and still offered as candidates by a store
/// that shards; with one shard the store writes and reads exactly the unsharded keys and its
/// listings keep the embedded order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_unsharded_are_still_found() -> TestResult {
    let sharded = sharded_store().await;
    let unsharded = DynamoStore::connect(DynamoConfig {
        table_prefix: sharded.table_prefix().to_string(),
        index_shards: 1,
        ..ddb_local::fresh_config(4).await
    })
    .await?;
    let legacy = available_row("legacy-1", "lab-b", 5);
    let current = available_row("sharded-1", "lab-a", 6);
    unsharded
        .write_row(None, &legacy, &StatsDelta::default())
        .await?;
    sharded
        .write_row(None, &current, &StatsDelta::default())
        .await?;
    let bare = row_to_sharded_item(&legacy, 1);
    assert_eq!(
        bare.get("status")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("available")
    );
    assert_eq!(
        status_shard_key(SandboxStatus::Available, "sharded-1", SHARDS),
        format!("available#{}", index_shard("sharded-1", SHARDS))
    );
    let filter = by_status(SandboxStatus::Available, Some("lab-"));
    for limit in [1, 10] {
        assert_eq!(
            all_listed(&sharded, &filter, limit).await?,
            vec!["lab-a/sharded-1", "lab-b/legacy-1"],
            "limit {limit}"
        );
    }
    for prefix in [None, Some("lab-")] {
        let query = CandidateQuery {
            prefix: prefix.map(str::to_string),
            start_pick: 0,
            after_name: None,
            limit: 15,
        };
        let mut got: Vec<String> = sharded
            .candidates(&query)
            .await?
            .into_iter()
            .map(|r| r.sandbox_id)
            .collect();
        got.sort();
        assert_eq!(got, vec!["legacy-1", "sharded-1"], "{query:?}");
    }
    // The row is read back with its status whichever key form it was stored under.
    assert_eq!(sharded.get("legacy-1").await?, Some(legacy.clone()));
    assert_eq!(sharded.get("sharded-1").await?, Some(current));

    // One shard on its own tables: the unsharded keys, the embedded order.
    let single = DynamoStore::connect(DynamoConfig {
        index_shards: 1,
        ..ddb_local::fresh_config(4).await
    })
    .await?;
    single.ensure_tables().await?;
    let embedded = EmbeddedStore::open_in_memory(4)?;
    write_listing_rows(&[&single, &embedded]).await?;
    for filter in [
        by_status(SandboxStatus::Available, None),
        by_status(SandboxStatus::Available, Some("lab2-")),
    ] {
        for limit in [3, 100] {
            assert_eq!(
                all_listed(&single, &filter, limit).await?,
                all_listed(&embedded, &filter, limit).await?,
                "one shard, {filter:?}, limit {limit}"
            );
        }
    }
    Ok(())
}

/// A DynamoDB-backed service whose view indexes have `shards` write shards.
async fn sharded_app(shards: u32) -> TestApp {
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(move |config| {
        config.store.view_index_shards = shards;
    });
    spawn_app_with(options).await
}

/// One allocation over HTTP as `caller`, with the name prefix if given: the status code.
async fn allocate(app: &TestApp, caller: &str, prefix: Option<&str>) -> StatusCode {
    let mut request = app.allocate(caller);
    if let Some(prefix) = prefix {
        request = request.header("X-Sandbox-Name-Prefix", prefix);
    }
    request.sent().await.status()
}

/// Over HTTP with eight index shards: a pool spread over every shard is allocated to its last
/// sandbox — by name prefix, then without one — and only then does a student get 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_free_sandbox_is_found_across_shards() {
    let app = sharded_app(SHARDS).await;
    app.seed("lab", 16).await;
    app.seed("alt", 16).await;
    let shards_used: std::collections::BTreeSet<u32> = (0..16)
        .flat_map(|i| [format!("lab-id-{i}"), format!("alt-id-{i}")])
        .map(|id| index_shard(&id, SHARDS))
        .collect();
    assert_eq!(
        shards_used.len(),
        SHARDS as usize,
        "the pool spans every shard"
    );
    for i in 0..16 {
        let status = allocate(&app, &format!("lab-student-{i}"), Some("lab")).await;
        assert_eq!(status, StatusCode::CREATED, "lab allocation {i}");
    }
    assert_eq!(
        allocate(&app, "lab-student-late", Some("lab")).await,
        StatusCode::CONFLICT,
        "no lab sandbox is left"
    );
    for i in 0..16 {
        let status = allocate(&app, &format!("any-student-{i}"), None).await;
        assert_eq!(status, StatusCode::CREATED, "allocation without prefix {i}");
    }
    assert_eq!(
        allocate(&app, "any-student-late", None).await,
        StatusCode::CONFLICT,
        "the pool is used up"
    );
    app.stop().await;
}

/// A pool of `pool` and `pool + extra` concurrent students (half with a name prefix) at C=20
/// over HTTP with `shards` index shards: exactly `pool` × 201 and `extra` × 409, no sandbox twice.
async fn pool_plus_extra(shards: u32, pool: usize, extra: usize) {
    let app = sharded_app(shards).await;
    app.seed("lab", pool).await;
    let callers: Vec<String> = (0..pool + extra).map(|i| format!("student-{i}")).collect();
    let answers: Vec<(StatusCode, Option<String>)> = futures::stream::iter(callers)
        .enumerate()
        .map(|(i, caller)| {
            let mut request = app.allocate(&caller);
            if i % 2 == 0 {
                request = request.header("X-Sandbox-Name-Prefix", "lab");
            }
            async move {
                let response = request.sent().await;
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                (status, body["sandbox_id"].as_str().map(str::to_string))
            }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    let created: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .filter_map(|(_, id)| id.as_ref())
        .collect();
    let conflicts = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CONFLICT)
        .count();
    let distinct: std::collections::BTreeSet<&String> = created.iter().copied().collect();
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(created.len(), pool, "S={shards}: {statuses:?}");
    assert_eq!(conflicts, extra, "S={shards}: {statuses:?}");
    assert_eq!(distinct.len(), pool, "a sandbox went to two students");
    app.stop().await;
}

/// Eight index shards: a pool of 40 and 55 concurrent students → 40 × 201 and 15 × 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_plus_extra_requests_with_eight_shards() {
    pool_plus_extra(SHARDS, 40, 15).await;
}

/// One index shard (unsharded keys) still allocates the same way: 40 × 201 and 15 × 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_plus_extra_requests_with_one_shard() {
    pool_plus_extra(1, 40, 15).await;
}
