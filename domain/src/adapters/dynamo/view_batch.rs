//! Batched projector writes on DynamoDB (ADR 0011): a batch's rows loaded with consistent
//! `BatchGetItem`s, and each planned chunk written as one `TransactWriteItems` — the row puts
//! (each conditioned on the version it was planned from), one `ADD` per touched stats shard with
//! the chunk's summed deltas, and the checkpoint put.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{KeysAndAttributes, Put, TransactWriteItem, Update};

use super::items::{pool_attr, row_from_item, row_to_item, Item};
use super::retry::{cancellation_failure, classify, Failure, Retry};
use super::{
    build_error, n, names, non_empty, refused, s, tables, DynamoStore, BATCH_GET_KEYS,
    CONDITIONAL_CHECK_FAILED,
};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;
use crate::store::batch::ViewChunk;
use crate::store::StoreError;

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
            let (condition, names, values) = match change.expected_version {
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
            let put = Put::builder()
                .table_name(&self.pool)
                .set_item(Some(row_to_item(&change.row)))
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(non_empty(values))
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        let rows = items.len();
        for (shard, delta) in chunk.stats_by_shard(self.stats_shards) {
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
            items.push(TransactWriteItem::builder().update(update).build());
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
        let mut retry = Retry::new("TransactWriteItems(view chunk)", self.max_retries);
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
                    // Only row puts carry conditions; name the first row whose condition failed.
                    if let Some(i) = reasons
                        .iter()
                        .take(rows)
                        .position(|r| r.code() == Some(CONDITIONAL_CHECK_FAILED))
                    {
                        return Err(StoreError::VersionConflict {
                            stream_id: chunk.rows[i].row.sandbox_id.clone(),
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
