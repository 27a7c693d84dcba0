//! Batched projector writes on DynamoDB (ADR 0011): a batch's rows loaded with consistent
//! `BatchGetItem`s, and each planned chunk written as one `TransactWriteItems` — the row puts
//! (each conditioned on the version it was planned from), one `ADD` per touched stats shard with
//! the chunk's summed deltas, and the checkpoint put.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, Put, TransactWriteItem, Update};

use super::items::{pool_attr, row_from_item, row_to_sharded_item, Item};
use super::retry::{cancellation_failure, classify, Failure, Retry};
use super::{
    build_error, n, names, non_empty, refused, s, tables, DynamoStore, BATCH_GET_KEYS,
    CONDITIONAL_CHECK_FAILED,
};
use domain::model::lifecycle::SandboxStatus;
use domain::model::projection::{PoolRow, StatsDelta};
use domain::store::batch::ViewChunk;
use domain::store::StoreError;

/// A view row put with its version condition, before it becomes a `Put` or a `PutItem`.
pub(super) struct ConditionalRowPut {
    /// The row as an item.
    pub(super) item: Item,
    /// `attribute_not_exists(#id)` for a new row, `#v = :expected` otherwise.
    pub(super) condition: &'static str,
    /// The condition's attribute names.
    pub(super) names: HashMap<String, String>,
    /// The condition's values (none for a new row).
    pub(super) values: HashMap<String, AttributeValue>,
}

impl DynamoStore {
    /// Rows of `sandbox_ids` with strongly consistent `BatchGetItem`s of up to 100 keys,
    /// re-sending unprocessed keys with backoff.
    pub(super) async fn batch_load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        let mut rows = HashMap::with_capacity(sandbox_ids.len());
        let mut unique: Vec<&String> = sandbox_ids.iter().collect();
        unique.sort();
        unique.dedup();
        for part in unique.chunks(BATCH_GET_KEYS) {
            let mut pending: Vec<Item> = part
                .iter()
                .map(|id| HashMap::from([(pool_attr::SANDBOX_ID.to_string(), s(id.as_str()))]))
                .collect();
            let mut retry = Retry::new("BatchGetItem(pool)", self.max_retries);
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending.clone()))
                    .consistent_read(true)
                    .build()
                    .map_err(build_error)?;
                let out = self
                    .call("BatchGetItem(pool)", refused, || {
                        self.client
                            .batch_get_item()
                            .request_items(&self.pool, request.clone())
                            .send()
                    })
                    .await?;
                for item in out
                    .responses
                    .and_then(|mut r| r.remove(&self.pool))
                    .unwrap_or_default()
                {
                    let row = row_from_item(&item)?;
                    rows.insert(row.sandbox_id.clone(), row);
                }
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.pool))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if !pending.is_empty() {
                    retry
                        .after(Failure::Transient(format!(
                            "{} pool keys unprocessed",
                            pending.len()
                        )))
                        .await?;
                }
            }
        }
        Ok(rows)
    }

    /// One chunk as one `TransactWriteItems`. A failed row condition (another projector moved
    /// the row) is a [`StoreError::VersionConflict`] and nothing of the chunk is written;
    /// transaction conflicts (two projectors adding to one stats shard at once) and throttling
    /// are retried.
    pub(super) async fn transact_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        let mut items = Vec::with_capacity(chunk.items(self.stats_shards));
        for change in &chunk.rows {
            items.push(self.row_put(change.expected_version, &change.row)?);
        }
        for (shard, delta) in chunk.stats_by_shard(self.stats_shards) {
            items.push(self.stats_add(shard, &delta)?);
        }
        items.extend(self.prefix_stats_updates_of(chunk)?);
        if let Some(checkpoint) = &chunk.checkpoint {
            let put = Put::builder()
                .table_name(&self.checkpoints)
                .item(tables::CHECKPOINT_KEY, s(&checkpoint.source))
                .item(tables::CHECKPOINT_POSITION, s(&checkpoint.position))
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        if items.is_empty() {
            return Ok(());
        }
        let conditioned: Vec<&str> = chunk
            .rows
            .iter()
            .map(|change| change.row.sandbox_id.as_str())
            .collect();
        self.transact_view("TransactWriteItems(view chunk)", items, &conditioned)
            .await
    }

    /// The put of one view row, conditioned on the version the projector read it at (absent for
    /// a first event): two projectors racing on one row cannot both apply an event.
    pub(super) fn row_put(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
    ) -> Result<TransactWriteItem, StoreError> {
        let put = self.row_put_request(expected_version, row);
        let put = Put::builder()
            .table_name(&self.pool)
            .set_item(Some(put.item))
            .condition_expression(put.condition)
            .set_expression_attribute_names(Some(put.names))
            .set_expression_attribute_values(non_empty(put.values))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The parts of a version-conditioned row put, shared by the transactional put and the
    /// plain `PutItem` used when there are no stats to move.
    pub(super) fn row_put_request(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
    ) -> ConditionalRowPut {
        let (condition, names, values) = match expected_version {
            None => (
                "attribute_not_exists(#id)",
                names(&[("#id", pool_attr::SANDBOX_ID)]),
                HashMap::new(),
            ),
            Some(v) => (
                "#v = :expected",
                names(&[("#v", pool_attr::VERSION)]),
                HashMap::from([(":expected".to_string(), n(v))]),
            ),
        };
        ConditionalRowPut {
            item: row_to_sharded_item(row, self.index_shards),
            condition,
            names,
            values,
        }
    }

    /// One `ADD` of summed per-status deltas to stats shard `shard`.
    pub(super) fn stats_add(
        &self,
        shard: u32,
        delta: &StatsDelta,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut adds = Vec::new();
        let mut update_names = HashMap::new();
        let mut update_values = HashMap::new();
        for status in SandboxStatus::ALL {
            let d = delta.0[status.index()];
            if d != 0 {
                let i = status.index();
                adds.push(format!("#c{i} :d{i}"));
                update_names.insert(format!("#c{i}"), status.as_str().to_string());
                update_values.insert(format!(":d{i}"), n(d));
            }
        }
        let update = Update::builder()
            .table_name(&self.stats)
            .key(tables::STATS_KEY, s(format!("stats#{shard}")))
            .update_expression(format!("ADD {}", adds.join(", ")))
            .set_expression_attribute_names(Some(update_names))
            .set_expression_attribute_values(Some(update_values))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Sends one view transaction until it commits, the budget is spent or it cannot succeed.
    /// `items` starts with one version-conditioned row put per entry of `conditioned` (the
    /// sandbox ids, in order); only those carry conditions, so a `ConditionalCheckFailed` among
    /// them is another projector having moved that row ([`StoreError::VersionConflict`] naming
    /// it) and is never retried. Transaction conflicts and throttling are (the whole transaction
    /// is re-sent, which is safe because nothing of a cancelled transaction was written).
    pub(super) async fn transact_view(
        &self,
        what: &'static str,
        items: Vec<TransactWriteItem>,
        conditioned: &[&str],
    ) -> Result<(), StoreError> {
        let mut retry = self.retry(what);
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let TransactWriteItemsError::TransactionCanceledException(cancelled) = ctx.err()
                {
                    let reasons = cancelled.cancellation_reasons();
                    if let Some(i) = reasons
                        .iter()
                        .take(conditioned.len())
                        .position(|r| r.code() == Some(CONDITIONAL_CHECK_FAILED))
                    {
                        return Err(StoreError::VersionConflict {
                            stream_id: conditioned[i].to_string(),
                        });
                    }
                    let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
                    if let Some(failure) = cancellation_failure(&codes) {
                        retry.after(failure).await?;
                        continue;
                    }
                    return Err(refused(format!("transaction cancelled: {codes:?}")));
                }
            }
            retry.after(classify(&err, refused)).await?;
        }
    }
}
