//! The pool view read side on the pool table and its indexes: row gets, candidate picks,
//! listings, the due index and the summed stats shards.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use chrono::{DateTime, Utc};

use super::items::{
    cursor_from_key, due_sort_key, key_from_cursor, key_n, key_of, key_s, pool_attr, row_from_item,
    Item, KeyShape, BY_DUE_KEY, BY_OWNER_KEY, BY_STATUS_NAME_KEY, BY_STATUS_PICK_KEY, DUE_CURSOR,
    POOL_KEY,
};
use super::retry::Failure;
use super::{
    build_error, limit_i32, n, names, non_empty, refused, refused_cursor, s, tables, DynamoStore,
    BATCH_GET_KEYS, FILTERED_PAGE_ITEMS,
};
use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::PrefixStats;
use crate::model::projection::{PoolRow, PoolStats};
use crate::store::{CandidateQuery, ListFilter, PoolView, RowPage, StoreError};

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

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        let available = SandboxStatus::Available.as_str();
        if let Some(prefix) = query.prefix.as_deref().filter(|p| !p.is_empty()) {
            // The names starting with `prefix` are exactly the sort-key range [prefix,
            // prefix + U+10FFFF] (UTF-8 byte order). Continue after the caller's last name and
            // wrap to the start of the range, so successive pages walk the whole prefix.
            let end = format!("{prefix}\u{10FFFF}");
            let by_name = |lo: String, hi: String| RowQuery {
                what: "Query(by-status-name)",
                index: Some(tables::INDEX_BY_STATUS_NAME),
                shape: BY_STATUS_NAME_KEY,
                key_condition: Some("#st = :st AND #name BETWEEN :lo AND :hi".into()),
                filter: None,
                names: names(&[("#st", pool_attr::STATUS), ("#name", pool_attr::NAME)]),
                values: HashMap::from([
                    (":st".to_string(), s(available)),
                    (":lo".to_string(), s(&lo)),
                    (":hi".to_string(), s(&hi)),
                ]),
                consistent: false,
            };
            let after = query
                .after_name
                .as_deref()
                .filter(|a| a.starts_with(prefix));
            // The smallest string greater than `after` is `after` followed by NUL.
            let start = after.map_or_else(|| prefix.to_string(), |a| format!("{a}\u{0}"));
            let (mut rows, _) = self.rows(&by_name(start, end), query.limit, None).await?;
            if let Some(after) = after {
                if rows.len() < query.limit {
                    let (wrapped, _) = self
                        .rows(
                            &by_name(prefix.to_string(), after.to_string()),
                            query.limit - rows.len(),
                            None,
                        )
                        .await?;
                    rows.extend(wrapped);
                }
            }
            return Ok(rows);
        }
        // From the random start upwards, then wrap around below it: concurrent allocators start
        // at different places of the pool instead of all fighting over its first K rows.
        let by_pick = |condition: &str| RowQuery {
            what: "Query(by-status-pick)",
            index: Some(tables::INDEX_BY_STATUS_PICK),
            shape: BY_STATUS_PICK_KEY,
            key_condition: Some(format!("#st = :st AND {condition}")),
            filter: None,
            names: names(&[("#st", pool_attr::STATUS), ("#pick", pool_attr::PICK)]),
            values: HashMap::from([
                (":st".to_string(), s(available)),
                (":start".to_string(), n(query.start_pick)),
            ]),
            consistent: false,
        };
        let (mut rows, _) = self
            .rows(&by_pick("#pick >= :start"), query.limit, None)
            .await?;
        if rows.len() < query.limit && query.start_pick > 0 {
            let (wrapped, _) = self
                .rows(&by_pick("#pick < :start"), query.limit - rows.len(), None)
                .await?;
            rows.extend(wrapped);
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
                names.insert("#st".into(), pool_attr::STATUS.into());
                values.insert(":st".into(), s(status.as_str()));
                filters.push("#st = :st".into());
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
        } else if let Some(status) = filter.status {
            // One status in name order; a prefix is an exact key condition, not a filter.
            names.insert("#st".into(), pool_attr::STATUS.into());
            values.insert(":st".into(), s(status.as_str()));
            let key_condition = match &prefix_condition {
                Some(p) => format!("#st = :st AND {p}"),
                None => "#st = :st".to_string(),
            };
            RowQuery {
                what: "Query(by-status-name)",
                index: Some(tables::INDEX_BY_STATUS_NAME),
                shape: BY_STATUS_NAME_KEY,
                key_condition: Some(key_condition),
                filter: None,
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
        if let Some(key) = &start {
            if let Some(owner) = &filter.owner {
                cursor_in_partition(key, pool_attr::OWNER, owner)?;
            } else if let Some(status) = filter.status {
                cursor_in_partition(key, pool_attr::STATUS, status.as_str())?;
                let name = key_s(key, pool_attr::NAME).unwrap_or_default();
                if prefix.is_some_and(|p| !name.starts_with(p)) {
                    return Err(StoreError::InvalidCursor);
                }
            }
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
        let mut frontier: Option<String> = None;
        let mut merged = Vec::new();
        for (rows, next) in pages {
            if next.is_some() {
                if let Some(last) = rows.last().map(due_key) {
                    frontier = Some(frontier.map_or(last.clone(), |f| f.min(last)));
                }
            }
            merged.extend(rows.into_iter().map(|row| (due_key(&row), row)));
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        merged.retain(|(key, _)| {
            key.as_str() > after.as_str() && frontier.as_ref().is_none_or(|f| key <= f)
        });
        let more = merged.len() > limit || frontier.is_some();
        merged.truncate(limit);
        let cursor = match merged.last() {
            Some((last, _)) if more => Some(cursor_from_key(&HashMap::from([
                (pool_attr::DUE_SHARD.to_string(), s(status.as_str())),
                (pool_attr::DUE_KEY.to_string(), s(last)),
            ]))?),
            _ => None,
        };
        Ok(RowPage {
            rows: merged.into_iter().map(|(_, row)| row).collect(),
            cursor,
        })
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
