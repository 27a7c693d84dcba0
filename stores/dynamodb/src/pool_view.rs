//! The pool view read side on the pool table and its indexes: row gets, candidate picks,
//! listings, the due index and the summed stats shards.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;

use super::items::{
    cursor_from_key, due_sort_key, key_from_cursor, key_n, key_of, key_s, pool_attr, row_from_item,
    shard_partitions, Item, KeyShape, BY_DUE_KEY, BY_OWNER_KEY, BY_STATUS_NAME_KEY,
    BY_STATUS_PICK_KEY, DUE_CURSOR, POOL_KEY,
};
use super::retry::Failure;
use super::{
    build_error, limit_i32, n, names, non_empty, refused, refused_cursor, s, tables, DynamoStore,
    BATCH_GET_KEYS, FILTERED_PAGE_ITEMS,
};
use domain::model::lifecycle::SandboxStatus;
use domain::model::pool_prefix::PrefixStats;
use domain::model::projection::{PoolRow, PoolStats};
use domain::store::{CandidateQuery, ListFilter, PoolView, RowPage, StoreError};

/// One pool query: an index (or the table) with its key condition (`None` = scan), an optional
/// filter, and the key shape its cursors have.
struct RowQuery {
    what: &'static str,
    index: Option<&'static str>,
    shape: &'static KeyShape,
    key_condition: Option<String>,
    filter: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    consistent: bool,
}

/// How long what a candidate read found in a partition is remembered by this process. Short:
/// the memory only steers candidate pages (the allocator's sweep before a 409 reads every
/// partition), and rows come back to a partition as sandboxes are returned.
const SHARD_MEMORY_TTL: StdDuration = StdDuration::from_secs(1);

/// Bound on remembered (prefix, partition) pairs; beyond it the memory starts afresh.
const MAX_REMEMBERED_SHARDS: usize = 10_000;

/// Per process: how many rows the last candidate read of a `by-status-pick` /
/// `by-status-name` partition (per name prefix) found when it read the whole partition (fewer
/// than asked for), and when. A nearly drained pool would otherwise cost a query per empty
/// shard, and two per small one (the random start and the wrap), on every candidate page
/// (ADR 0014).
#[derive(Debug, Default)]
pub(super) struct ShardSizes {
    seen: Mutex<HashMap<(String, usize), (usize, Instant)>>,
}

impl ShardSizes {
    /// The recently seen size of partition `index` of `scope`, if it was read whole lately.
    fn size(&self, scope: &str, index: usize) -> Option<usize> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&(scope.to_string(), index))
            .filter(|(_, at)| at.elapsed() <= SHARD_MEMORY_TTL)
            .map(|(size, _)| *size)
    }

    /// The partitions (indexes below `count`) of `scope` not seen empty lately.
    fn open(&self, scope: &str, count: usize) -> Vec<usize> {
        (0..count)
            .filter(|&i| self.size(scope, i) != Some(0))
            .collect()
    }

    /// Records what a candidate read of partition `index` of `scope` found: `found` rows of
    /// `asked`; fewer means the read saw the whole partition.
    fn saw(&self, scope: &str, index: usize, found: usize, asked: usize) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if found < asked {
            if seen.len() >= MAX_REMEMBERED_SHARDS {
                seen.clear();
            }
            seen.insert((scope.to_string(), index), (found, Instant::now()));
        } else {
            seen.remove(&(scope.to_string(), index));
        }
    }
}

impl DynamoStore {
    /// Rows of one pool query, following pages until `limit` rows or the end, and the key to
    /// resume after the last row returned (`None` at the end).
    async fn rows(
        &self,
        query: &RowQuery,
        limit: usize,
        start: Option<Item>,
    ) -> Result<(Vec<PoolRow>, Option<Item>), StoreError> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let invalid: fn(String) -> StoreError = if start.is_some() {
            refused_cursor
        } else {
            refused
        };
        let mut start = start;
        let mut rows = Vec::with_capacity(limit.min(1000));
        loop {
            let remaining = limit - rows.len();
            // Unfiltered: ask for exactly what is missing, so the page's LastEvaluatedKey is the
            // last row returned. Filtered: ask for more, and cut the page ourselves.
            let page_limit = if query.filter.is_some() {
                remaining.max(FILTERED_PAGE_ITEMS)
            } else {
                remaining
            };
            let (items, last_key) = match &query.key_condition {
                Some(key_condition) => {
                    let out = self
                        .call(query.what, invalid, || {
                            self.client
                                .query()
                                .table_name(&self.pool)
                                .set_index_name(query.index.map(str::to_string))
                                .key_condition_expression(key_condition)
                                .set_filter_expression(query.filter.clone())
                                .set_expression_attribute_names(non_empty(query.names.clone()))
                                .set_expression_attribute_values(non_empty(query.values.clone()))
                                .consistent_read(query.consistent)
                                .limit(limit_i32(page_limit))
                                .set_exclusive_start_key(start.clone())
                                .send()
                        })
                        .await?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
                None => {
                    let out = self
                        .call(query.what, invalid, || {
                            self.client
                                .scan()
                                .table_name(&self.pool)
                                .set_index_name(query.index.map(str::to_string))
                                .set_filter_expression(query.filter.clone())
                                .set_expression_attribute_names(non_empty(query.names.clone()))
                                .set_expression_attribute_values(non_empty(query.values.clone()))
                                .consistent_read(query.consistent)
                                .limit(limit_i32(page_limit))
                                .set_exclusive_start_key(start.clone())
                                .send()
                        })
                        .await?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
            };
            let last_key = last_key.filter(|k| !k.is_empty());
            let count = items.len();
            for (i, item) in items.iter().enumerate() {
                rows.push(row_from_item(item)?);
                if rows.len() == limit {
                    // Full. Stopped inside the page: resume right after this row. At the page's
                    // end: DynamoDB's own key says whether anything may follow.
                    let next = if i + 1 < count {
                        Some(key_of(item, query.shape)?)
                    } else {
                        last_key
                    };
                    return Ok((rows, next));
                }
            }
            match last_key {
                Some(key) => start = Some(key),
                None => return Ok((rows, None)),
            }
        }
    }

    /// One GetItem on the pool table.
    pub(super) async fn get_row(
        &self,
        sandbox_id: &str,
        consistent: bool,
    ) -> Result<Option<PoolRow>, StoreError> {
        let out = self
            .call("GetItem(pool)", refused, || {
                self.client
                    .get_item()
                    .table_name(&self.pool)
                    .key(pool_attr::SANDBOX_ID, s(sandbox_id))
                    .consistent_read(consistent)
                    .send()
            })
            .await?;
        out.item.as_ref().map(row_from_item).transpose()
    }
}

impl DynamoStore {
    /// The `by-status-pick` / `by-status-name` partitions of `status`: every shard, then the
    /// bare status (rows last written before sharding was switched on).
    fn status_partitions(&self, status: SandboxStatus) -> Vec<String> {
        shard_partitions(status.as_str(), self.index_shards)
    }

    /// Up to `limit` rows of one `by-status-pick` partition from pick `start` upwards, wrapping
    /// to the bottom: concurrent allocators start at different places of the pool instead of
    /// all fighting over its first rows.
    async fn pick_candidates(
        &self,
        partition: &str,
        start: u32,
        limit: usize,
    ) -> Result<Vec<PoolRow>, StoreError> {
        let by_pick = |condition: &str| RowQuery {
            what: "Query(by-status-pick)",
            index: Some(tables::INDEX_BY_STATUS_PICK),
            shape: BY_STATUS_PICK_KEY,
            key_condition: Some(format!("#st = :st AND {condition}")),
            filter: None,
            names: names(&[("#st", pool_attr::STATUS), ("#pick", pool_attr::PICK)]),
            values: HashMap::from([
                (":st".to_string(), s(partition)),
                (":start".to_string(), n(start)),
            ]),
            consistent: false,
        };
        let (mut rows, _) = self
            .rows(&not_held(by_pick("#pick >= :start")), limit, None)
            .await?;
        if rows.len() < limit && start > 0 {
            let (wrapped, _) = self
                .rows(
                    &not_held(by_pick("#pick < :start")),
                    limit - rows.len(),
                    None,
                )
                .await?;
            rows.extend(wrapped);
        }
        Ok(rows)
    }

    /// Up to `limit` rows of one `by-status-name` partition whose names start with `prefix`,
    /// after `after` and wrapping to the range's start, so successive pages walk the range.
    async fn prefix_candidates(
        &self,
        partition: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PoolRow>, StoreError> {
        // The names starting with `prefix` are exactly the sort-key range [prefix,
        // prefix + U+10FFFF] (UTF-8 byte order).
        let end = format!("{prefix}\u{10FFFF}");
        let by_name = |lo: String, hi: String| not_held(name_range(partition, Some(lo), Some(hi)));
        let after = after.filter(|a| a.starts_with(prefix));
        // The smallest string greater than `after` is `after` followed by NUL.
        let start = after.map_or_else(|| prefix.to_string(), |a| format!("{a}\u{0}"));
        let (mut rows, _) = self.rows(&by_name(start, end), limit, None).await?;
        if let Some(after) = after {
            if rows.len() < limit {
                let (wrapped, _) = self
                    .rows(
                        &by_name(prefix.to_string(), after.to_string()),
                        limit - rows.len(),
                        None,
                    )
                    .await?;
                rows.extend(wrapped);
            }
        }
        Ok(rows)
    }

    /// A listing of one status (names starting with `prefix`, if any) in name order: every
    /// `by-status-name` partition of the status is read from the cursor's position at once and
    /// the pages are merged, so the order and the cursors are those of the unsharded index.
    async fn list_by_status(
        &self,
        status: SandboxStatus,
        prefix: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let after = match cursor {
            None => None,
            Some(c) => {
                let key = key_from_cursor(c, BY_STATUS_NAME_KEY)?;
                cursor_in_partition(&key, pool_attr::STATUS, status.as_str())?;
                let name = key_s(&key, pool_attr::NAME).unwrap_or_default();
                let id = key_s(&key, pool_attr::SANDBOX_ID).unwrap_or_default();
                if prefix.is_some_and(|p| !name.starts_with(p)) {
                    return Err(StoreError::InvalidCursor);
                }
                Some((name.to_string(), id.to_string()))
            }
        };
        // Each partition is read from the cursor's name on (inclusive: later ids may share it),
        // within the prefix's range [prefix, prefix + U+10FFFF] if there is one.
        let lo = after
            .as_ref()
            .map(|(name, _)| name.clone())
            .or_else(|| prefix.map(str::to_string));
        let hi = prefix.map(|p| format!("{p}\u{10FFFF}"));
        let shards = self.status_partitions(status).into_iter().map(|partition| {
            let query = name_range(&partition, lo.clone(), hi.clone());
            let after = after.clone();
            async move { self.rows_after(&query, limit, after.as_ref()).await }
        });
        let pages = futures::future::try_join_all(shards).await?;
        // DynamoDB documents no order for index rows that share a sort key, so a shard cut
        // short inside a run of one name may still hold rows of that name with any sandbox id:
        // it is complete only below that name. With unique names this costs nothing but the
        // one row at the cut, which the next page reads again.
        let mut stop: Option<String> = None;
        let pages: Vec<(Vec<PoolRow>, Option<NameKey>)> = pages
            .into_iter()
            .map(|(rows, cut_short)| {
                let bound = rows
                    .iter()
                    .map(|row| row.name.clone())
                    .max()
                    .filter(|_| cut_short)
                    .map(|name| {
                        if stop.as_ref().is_none_or(|s| name < *s) {
                            stop = Some(name.clone());
                        }
                        // Below every (name, sandbox id): sandbox ids are never empty.
                        (name, String::new())
                    });
                (rows, bound)
            })
            .collect();
        let (mut rows, mut last) = merge_shards(pages, name_key, after.as_ref(), limit);
        if let (true, Some(name)) = (rows.is_empty(), stop) {
            // Every row before `name` was listed already and a shard's page held nothing but
            // that name: a run of one name at least a page long. Read the whole run from
            // every partition and order it by sandbox id here.
            (rows, last) = self.name_run(status, &name, after.as_ref(), limit).await?;
        }
        let cursor = last
            .map(|(name, id)| {
                cursor_from_key(&HashMap::from([
                    (pool_attr::STATUS.to_string(), s(status.as_str())),
                    (pool_attr::NAME.to_string(), s(name)),
                    (pool_attr::SANDBOX_ID.to_string(), s(id)),
                ]))
            })
            .transpose()?;
        Ok(RowPage { rows, cursor })
    }

    /// Up to `limit` rows of `status` named `name` after `after` in sandbox-id order, read in
    /// full from every `by-status-name` partition, and the position of the last one (the
    /// listing goes on after it: later names may follow).
    async fn name_run(
        &self,
        status: SandboxStatus,
        name: &str,
        after: Option<&NameKey>,
        limit: usize,
    ) -> Result<(Vec<PoolRow>, Option<NameKey>), StoreError> {
        let shards = self.status_partitions(status).into_iter().map(|partition| {
            let query = name_range(&partition, Some(name.to_string()), Some(name.to_string()));
            async move { self.rows(&query, usize::MAX, None).await }
        });
        let mut run: Vec<PoolRow> = futures::future::try_join_all(shards)
            .await?
            .into_iter()
            .flat_map(|(rows, _)| rows)
            .filter(|row| after.is_none_or(|a| name_key(row) > *a))
            .collect();
        run.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        run.truncate(limit);
        let last = run.last().map(name_key);
        Ok((run, last))
    }

    /// Up to `limit` rows of `query` that come after `after` in (name, sandbox id) order, and
    /// whether the partition may hold more. Rows at or before `after` (the cursor's own name,
    /// shared by several sandboxes) are skipped without counting towards `limit`.
    async fn rows_after(
        &self,
        query: &RowQuery,
        limit: usize,
        after: Option<&NameKey>,
    ) -> Result<(Vec<PoolRow>, bool), StoreError> {
        let mut kept = Vec::with_capacity(limit.min(1000));
        let mut start = None;
        loop {
            let (rows, next) = self.rows(query, limit - kept.len(), start).await?;
            kept.extend(
                rows.into_iter()
                    .filter(|row| after.is_none_or(|a| name_key(row) > *a)),
            );
            match next {
                None => return Ok((kept, false)),
                Some(_) if kept.len() == limit => return Ok((kept, true)),
                Some(key) => start = Some(key),
            }
        }
    }
}

/// A position in a `by-status-name` listing: a name, then a sandbox id for ties.
type NameKey = (String, String);

/// A row's position in a `by-status-name` listing.
fn name_key(row: &PoolRow) -> NameKey {
    (row.name.clone(), row.sandbox_id.clone())
}

/// A query of one `by-status-name` partition: the names from `lo` up to `hi` (both inclusive,
/// each bound optional).
/// A candidate query without the rows held by an event of a newer release (ADR 0023): a filter,
/// so held rows still cost their read units but are never returned as candidates.
fn not_held(mut query: RowQuery) -> RowQuery {
    query.filter = Some("attribute_not_exists(#held)".to_string());
    query
        .names
        .insert("#held".to_string(), pool_attr::HELD_BY.to_string());
    query
}

fn name_range(partition: &str, lo: Option<String>, hi: Option<String>) -> RowQuery {
    let mut values = HashMap::from([(":st".to_string(), s(partition))]);
    let mut attribute_names = vec![("#st", pool_attr::STATUS)];
    if lo.is_some() || hi.is_some() {
        // DynamoDB refuses a name the expression does not use.
        attribute_names.push(("#name", pool_attr::NAME));
    }
    let key_condition = match (lo, hi) {
        (Some(lo), Some(hi)) => {
            values.insert(":lo".to_string(), s(lo));
            values.insert(":hi".to_string(), s(hi));
            "#st = :st AND #name BETWEEN :lo AND :hi"
        }
        (Some(lo), None) => {
            values.insert(":lo".to_string(), s(lo));
            "#st = :st AND #name >= :lo"
        }
        (None, Some(hi)) => {
            values.insert(":hi".to_string(), s(hi));
            "#st = :st AND #name <= :hi"
        }
        (None, None) => "#st = :st",
    };
    RowQuery {
        what: "Query(by-status-name)",
        index: Some(tables::INDEX_BY_STATUS_NAME),
        shape: BY_STATUS_NAME_KEY,
        key_condition: Some(key_condition.to_string()),
        filter: None,
        names: names(&attribute_names),
        values,
        consistent: false,
    }
}

/// Merges the pages read from the shards of one index into the unsharded order (ADR 0014).
/// Each page holds one shard's rows from the same position (in any order) and, when the shard
/// was cut short, the key up to which (inclusive) the page holds every row of the shard; rows at
/// or before `after` are dropped. The merged list is exact up to the lowest such bound (beyond
/// it that shard may hold rows not read yet), so it is cut there, then to `limit`. Returns the
/// rows and, when more may follow, the key of the last one: the next page's position.
fn merge_shards<K: Ord + Clone>(
    pages: Vec<(Vec<PoolRow>, Option<K>)>,
    key: impl Fn(&PoolRow) -> K,
    after: Option<&K>,
    limit: usize,
) -> (Vec<PoolRow>, Option<K>) {
    let mut frontier: Option<K> = None;
    let mut merged = Vec::new();
    for (rows, bound) in pages {
        if let Some(bound) = bound {
            frontier = Some(frontier.map_or(bound.clone(), |f| f.min(bound)));
        }
        merged.extend(rows.into_iter().map(|row| (key(&row), row)));
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    merged.retain(|(k, _)| after.is_none_or(|a| k > a) && frontier.as_ref().is_none_or(|f| k <= f));
    let more = merged.len() > limit || frontier.is_some();
    merged.truncate(limit);
    let last = merged.last().filter(|_| more).map(|(k, _)| k.clone());
    (merged.into_iter().map(|(_, row)| row).collect(), last)
}

/// Checks that a decoded cursor belongs to this query: its partition-key value is the one
/// queried (DynamoDB would otherwise refuse it, or worse, start elsewhere).
fn cursor_in_partition(key: &Item, attribute: &str, value: &str) -> Result<(), StoreError> {
    if key_s(key, attribute) == Some(value) {
        Ok(())
    } else {
        Err(StoreError::InvalidCursor)
    }
}

#[async_trait]
impl PoolView for DynamoStore {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.get_row(sandbox_id, false).await
    }

    async fn get_many(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        // BatchGetItem, 100 keys a request: a reservation's earmarked rows are read in a few
        // requests instead of one each (its track's first allocations wait for them).
        self.batch_load_rows(sandbox_ids).await
    }

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        // One shard (chosen by the random start among those not recently seen empty) serves
        // the page: one query (two when it wraps; one when the shard was lately seen small), as
        // unsharded, even when it holds fewer rows than asked for — the allocator's queue asks
        // again. Only an empty first shard sends the
        // search on, to every other partition not recently seen empty in one parallel burst, so
        // a page is empty only when the view showed nothing available anywhere a moment ago
        // (ADR 0014). The 409 is decided by the allocator's sweep, which reads every partition.
        let partitions = self.status_partitions(SandboxStatus::Available);
        let prefix = query.prefix.as_deref().filter(|p| !p.is_empty());
        let scope = prefix.unwrap_or("");
        let open = self.shard_sizes.open(scope, partitions.len());
        // The bare legacy key is never the first choice while a shard is open: it holds only
        // rows last written before sharding, usually none.
        let shards: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| i < self.index_shards as usize)
            .collect();
        let first = match (shards.len(), open.first()) {
            (0, None) => return Ok(Vec::new()),
            (0, Some(&bare)) => bare,
            (n, _) => shards[query.start_pick as usize % n],
        };
        // A first shard lately seen whole in fewer rows than asked for is read whole again, from
        // its start: one query for the same rows the random start and its wrap would read.
        let from_start = self
            .shard_sizes
            .size(scope, first)
            .is_some_and(|size| size < query.limit);
        let read = |i: usize, want: usize| {
            let partition = &partitions[i];
            let random = i == first && !from_start;
            async move {
                match prefix {
                    Some(prefix) => {
                        // The first shard continues after the caller's last name; the others
                        // are read from the prefix's start.
                        let after = query.after_name.as_deref().filter(|_| random);
                        self.prefix_candidates(partition, prefix, after, want).await
                    }
                    None => {
                        let start = if random { query.start_pick } else { 0 };
                        self.pick_candidates(partition, start, want).await
                    }
                }
            }
        };
        let rows = read(first, query.limit).await?;
        self.shard_sizes.saw(scope, first, rows.len(), query.limit);
        if !rows.is_empty() || query.limit == 0 {
            return Ok(rows);
        }
        let others: Vec<usize> = open.into_iter().filter(|&i| i != first).collect();
        let pages =
            futures::future::try_join_all(others.iter().map(|&i| read(i, query.limit))).await?;
        let mut rows = Vec::with_capacity(query.limit);
        for (&i, page) in others.iter().zip(pages) {
            self.shard_sizes.saw(scope, i, page.len(), query.limit);
            rows.extend(page);
        }
        // Every partition was asked for the whole limit (one round trip); keep a page of it,
        // taken across the partitions so no shard's rows crowd out the others'.
        if rows.len() > query.limit {
            rows.shuffle(&mut rand::rng());
            rows.truncate(query.limit);
        }
        Ok(rows)
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let prefix = filter.prefix.as_deref().filter(|p| !p.is_empty());
        if let (None, Some(status)) = (&filter.owner, filter.status) {
            return self.list_by_status(status, prefix, limit, cursor).await;
        }
        let mut names = HashMap::new();
        let mut values = HashMap::new();
        let mut prefix_condition = None;
        if let Some(prefix) = prefix {
            names.insert("#name".to_string(), pool_attr::NAME.to_string());
            values.insert(":prefix".to_string(), s(prefix));
            prefix_condition = Some("begins_with(#name, :prefix)".to_string());
        }
        let query = if let Some(owner) = &filter.owner {
            // A student's rows: the sparse `by-owner` index; status and prefix filter its pages.
            names.insert("#owner".into(), pool_attr::OWNER.into());
            values.insert(":owner".into(), s(owner));
            let mut filters: Vec<String> = prefix_condition.into_iter().collect();
            if let Some(status) = filter.status {
                // The stored status may carry a shard suffix (`allocated#3`).
                names.insert("#st".into(), pool_attr::STATUS.into());
                values.insert(":st".into(), s(status.as_str()));
                values.insert(":st_shard".into(), s(format!("{}#", status.as_str())));
                filters.push("(#st = :st OR begins_with(#st, :st_shard))".into());
            }
            RowQuery {
                what: "Query(by-owner)",
                index: Some(tables::INDEX_BY_OWNER),
                shape: BY_OWNER_KEY,
                key_condition: Some("#owner = :owner".into()),
                filter: (!filters.is_empty()).then(|| filters.join(" AND ")),
                names,
                values,
                consistent: false,
            }
        } else {
            RowQuery {
                what: "Scan(pool)",
                index: None,
                shape: POOL_KEY,
                key_condition: None,
                filter: prefix_condition,
                names,
                values,
                consistent: false,
            }
        };
        let start = cursor
            .map(|c| key_from_cursor(c, query.shape))
            .transpose()?;
        if let (Some(key), Some(owner)) = (&start, &filter.owner) {
            cursor_in_partition(key, pool_attr::OWNER, owner)?;
        }
        let (rows, next) = self.rows(&query, limit, start).await?;
        let cursor = next.as_ref().map(cursor_from_key).transpose()?;
        Ok(RowPage { rows, cursor })
    }

    async fn due(
        &self,
        status: SandboxStatus,
        before: DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let limit = limit.max(1);
        // Keys below `{before + 1 ms}` (13 digits, no `#`) are exactly the rows due at or
        // before `before`; "0" is below every key.
        let hi = format!("{:013}", before.timestamp_millis().saturating_add(1));
        let after = match cursor {
            None => "0".to_string(),
            Some(c) => {
                let key = key_from_cursor(c, DUE_CURSOR)?;
                cursor_in_partition(&key, pool_attr::DUE_SHARD, status.as_str())?;
                // The resume point must lie inside the queried range.
                match key_s(&key, pool_attr::DUE_KEY) {
                    Some(after) if after < hi.as_str() => after.to_string(),
                    _ => return Err(StoreError::InvalidCursor),
                }
            }
        };
        // Each shard is asked for `limit + 1` keys from `after` (the bound is inclusive, and the
        // key equal to `after` is skipped): then the merged first `limit` rows after `after`
        // are exact up to the lowest key where a truncated shard stopped (ADR 0014).
        let shards = (0..self.index_shards).map(|k| {
            let query = RowQuery {
                what: "Query(by-due)",
                index: Some(tables::INDEX_BY_DUE),
                shape: BY_DUE_KEY,
                key_condition: Some("#ds = :ds AND #dk BETWEEN :lo AND :hi".into()),
                filter: None,
                names: names(&[("#ds", pool_attr::DUE_SHARD), ("#dk", pool_attr::DUE_KEY)]),
                values: HashMap::from([
                    (":ds".to_string(), s(format!("{}#{k}", status.as_str()))),
                    (":lo".to_string(), s(&after)),
                    (":hi".to_string(), s(&hi)),
                ]),
                consistent: false,
            };
            async move { self.rows(&query, limit + 1, None).await }
        });
        let pages = futures::future::try_join_all(shards).await?;
        let due_key = |row: &PoolRow| {
            due_sort_key(
                row.due_at.map(|t| t.timestamp_millis()).unwrap_or_default(),
                &row.sandbox_id,
            )
        };
        // Due keys end with the sandbox id: unique, so a shard's page is complete up to its
        // last key.
        let pages = pages
            .into_iter()
            .map(|(rows, next)| {
                let bound = rows.last().map(due_key).filter(|_| next.is_some());
                (rows, bound)
            })
            .collect();
        let (rows, last) = merge_shards(pages, due_key, Some(&after), limit);
        let cursor = last
            .map(|last| {
                cursor_from_key(&HashMap::from([
                    (pool_attr::DUE_SHARD.to_string(), s(status.as_str())),
                    (pool_attr::DUE_KEY.to_string(), s(last)),
                ]))
            })
            .transpose()?;
        Ok(RowPage { rows, cursor })
    }

    async fn stats(&self) -> Result<PoolStats, StoreError> {
        let keys: Vec<Item> = (0..self.stats_shards)
            .map(|i| HashMap::from([(tables::STATS_KEY.to_string(), s(format!("stats#{i}")))]))
            .collect();
        let mut stats = PoolStats::default();
        for chunk in keys.chunks(BATCH_GET_KEYS) {
            let mut pending = chunk.to_vec();
            let mut retry = self.retry("BatchGetItem(stats)");
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending.clone()))
                    .build()
                    .map_err(build_error)?;
                let out = self
                    .call("BatchGetItem(stats)", refused, || {
                        self.client
                            .batch_get_item()
                            .request_items(&self.stats, request.clone())
                            .send()
                    })
                    .await?;
                for shard in out
                    .responses
                    .and_then(|mut r| r.remove(&self.stats))
                    .unwrap_or_default()
                {
                    for status in SandboxStatus::ALL {
                        if let Some(count) = key_n(&shard, status.as_str()) {
                            let count = i64::try_from(count).map_err(|_| {
                                StoreError::Corrupt(format!("stats counter {count} out of range"))
                            })?;
                            stats.by_status[status.index()] += count;
                        }
                    }
                }
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.stats))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if !pending.is_empty() {
                    retry
                        .after(Failure::Transient(format!(
                            "{} stats shards unprocessed",
                            pending.len()
                        )))
                        .await?;
                }
            }
        }
        Ok(stats)
    }

    async fn stats_by_prefix(&self) -> Result<PrefixStats, StoreError> {
        self.read_prefix_stats().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn row(name: &str) -> PoolRow {
        let at = Utc.timestamp_millis_opt(0).single().unwrap_or_default();
        PoolRow {
            sandbox_id: format!("id-{name}"),
            status: SandboxStatus::Available,
            name: name.to_string(),
            external_id: String::new(),
            sfdc_account_id: None,
            owner: None,
            track_name: None,
            allocated_at: None,
            expires_at: None,
            deletion_requested_at: None,
            attempts: 0,
            last_error: None,
            due_at: None,
            pick: 0,
            version: 1,
            updated_at: at,
            held_by: None,
            earmark: None,
        }
    }

    fn names_of(rows: &[PoolRow]) -> Vec<&str> {
        rows.iter().map(|r| r.name.as_str()).collect()
    }

    /// Merged shard pages come out in key order, stop where a cut-short shard stopped (it may
    /// hold unseen rows beyond), drop what is at or before the position, and give the last
    /// key as the next position only when more may follow.
    #[test]
    fn merge_stops_at_the_lowest_cut_short_shard() {
        let key = |r: &PoolRow| r.name.clone();
        let pages = vec![
            (vec![row("a"), row("d"), row("g")], None),
            (vec![row("b"), row("c")], Some("c".to_string())),
            (vec![row("e")], None),
        ];
        let (rows, last) = merge_shards(pages, key, None, 10);
        assert_eq!(names_of(&rows), vec!["a", "b", "c"]);
        assert_eq!(last.as_deref(), Some("c"));

        let pages = vec![
            (vec![row("a"), row("d"), row("g")], None),
            (vec![row("b"), row("c")], None),
        ];
        let after = "b".to_string();
        let (rows, last) = merge_shards(pages.clone(), key, Some(&after), 10);
        assert_eq!(names_of(&rows), vec!["c", "d", "g"]);
        assert_eq!(last, None, "every shard was read to its end");
        let (rows, last) = merge_shards(pages, key, None, 2);
        assert_eq!(names_of(&rows), vec!["a", "b"]);
        assert_eq!(last.as_deref(), Some("b"));
    }

    fn tied(name: &str, id: &str) -> PoolRow {
        PoolRow {
            sandbox_id: id.to_string(),
            ..row(name)
        }
    }

    /// A shard cut short inside a run of one name, its rows of that name in no particular id
    /// order, bounds the merged page below that name: no row of the run is given out before the
    /// shard's unseen rows of the same name could be compared with it.
    #[test]
    fn merge_stops_below_a_name_a_cut_short_shard_may_hold_more_of() {
        // Shard 0 was cut short after two rows of "b" that came in descending id order; it may
        // still hold ("b", "id-0"), which sorts before everything of "b" read so far.
        let cut = vec![row("a"), tied("b", "id-3"), tied("b", "id-1")];
        let pages = vec![
            (cut, Some(("b".to_string(), String::new()))),
            (vec![tied("b", "id-2"), row("c")], None),
        ];
        let (rows, last) = merge_shards(pages, name_key, None, 10);
        assert_eq!(names_of(&rows), vec!["a"]);
        assert_eq!(last, Some(("a".to_string(), "id-a".to_string())));
    }
}
