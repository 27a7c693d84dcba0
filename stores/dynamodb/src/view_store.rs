//! The projector's side of the view: version-conditioned row writes with their stats deltas,
//! batched chunks (see `view_batch`), checkpoints and the rebuild's clear.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{DeleteRequest, WriteRequest};

use super::items::{key_s, pool_attr, Item};
use super::retry::{classify, Failure};
use super::{build_error, non_empty, refused, s, tables, DynamoStore, BATCH_WRITE_REQUESTS};
use domain::model::projection::{PoolRow, StatsDelta};
use domain::store::batch::{BatchLimits, RowChange, ViewChunk};
use domain::store::{stats_shard, StoreError, ViewStore, MAX_TRANSACTION_ITEMS};

impl DynamoStore {
    /// Deletes every item of `table` (key attribute `key`): paged key-only scan, then
    /// `BatchWriteItem`s of 25 deletes, re-sending unprocessed ones with backoff.
    async fn delete_all(
        &self,
        table: &str,
        key: &str,
        remove: fn(&str) -> bool,
    ) -> Result<(), StoreError> {
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .call("Scan(clear)", refused, || {
                    self.client
                        .scan()
                        .table_name(table)
                        .projection_expression("#k")
                        .expression_attribute_names("#k", key)
                        .consistent_read(true)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            let mut keys = out.items.unwrap_or_default();
            keys.retain(|k| remove(key_s(k, key).unwrap_or_default()));
            for chunk in keys.chunks(BATCH_WRITE_REQUESTS) {
                let mut requests = chunk
                    .iter()
                    .map(|k| {
                        DeleteRequest::builder()
                            .set_key(Some(k.clone()))
                            .build()
                            .map(|d| WriteRequest::builder().delete_request(d).build())
                            .map_err(build_error)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut retry = self.retry("BatchWriteItem(clear)");
                while !requests.is_empty() {
                    let out = self
                        .call("BatchWriteItem(clear)", refused, || {
                            self.client
                                .batch_write_item()
                                .request_items(table, requests.clone())
                                .send()
                        })
                        .await?;
                    requests = out
                        .unprocessed_items
                        .and_then(|mut m| m.remove(table))
                        .unwrap_or_default();
                    if !requests.is_empty() {
                        retry
                            .after(Failure::Transient(format!(
                                "{} deletes unprocessed",
                                requests.len()
                            )))
                            .await?;
                    }
                }
            }
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) => start = Some(key),
                None => return Ok(()),
            }
        }
    }
}

#[async_trait]
impl ViewStore for DynamoStore {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.get_row(sandbox_id, true).await
    }

    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &StatsDelta,
    ) -> Result<(), StoreError> {
        // The row is written only if it is still at the version the projector read (absent for
        // a first event): two projectors racing on one row cannot both apply an event, and the
        // stats update rides in the same transaction, so counters move exactly when rows do.
        let conflict = || StoreError::VersionConflict {
            stream_id: row.sandbox_id.clone(),
        };
        if delta.is_zero() {
            // Nothing to count: a single conditional PutItem is just as atomic, at half the
            // write cost of a transaction.
            let put = self.row_put_request(expected_version, row);
            let mut retry = self.retry("PutItem(pool)");
            loop {
                let result = self
                    .client
                    .put_item()
                    .table_name(&self.pool)
                    .set_item(Some(put.item.clone()))
                    .condition_expression(put.condition)
                    .set_expression_attribute_names(Some(put.names.clone()))
                    .set_expression_attribute_values(non_empty(put.values.clone()))
                    .send()
                    .await;
                match result {
                    Ok(_) => return Ok(()),
                    Err(SdkError::ServiceError(ctx))
                        if matches!(
                            ctx.err(),
                            PutItemError::ConditionalCheckFailedException(_)
                        ) =>
                    {
                        return Err(conflict());
                    }
                    Err(err) => retry.after(classify(&err, refused)).await?,
                }
            }
        }
        let shard = stats_shard(&row.sandbox_id, self.stats_shards);
        let mut transaction = vec![
            self.row_put(expected_version, row)?,
            self.stats_add(shard, delta)?,
        ];
        transaction.extend(self.prefix_stats_updates(&[RowChange {
            expected_version,
            row: row.clone(),
            delta: *delta,
        }])?);
        self.transact_view(
            "TransactWriteItems(pool+stats)",
            transaction,
            &[row.sandbox_id.as_str()],
        )
        .await
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_items: MAX_TRANSACTION_ITEMS,
            stats_shards: self.stats_shards,
        }
    }

    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        self.batch_load_rows(sandbox_ids).await
    }

    async fn write_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        self.transact_chunk(chunk).await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError> {
        let out = self
            .call("GetItem(checkpoint)", refused, || {
                self.client
                    .get_item()
                    .table_name(&self.checkpoints)
                    .key(tables::CHECKPOINT_KEY, s(source))
                    .consistent_read(true)
                    .send()
            })
            .await?;
        match out.item {
            None => Ok(None),
            Some(item) => key_s(&item, tables::CHECKPOINT_POSITION)
                .map(|p| Some(p.to_string()))
                .ok_or_else(|| StoreError::Corrupt(format!("checkpoint {source} has no position"))),
        }
    }

    async fn save_checkpoint(&self, source: &str, position: &str) -> Result<(), StoreError> {
        self.call("PutItem(checkpoint)", refused, || {
            self.client
                .put_item()
                .table_name(&self.checkpoints)
                .item(tables::CHECKPOINT_KEY, s(source))
                .item(tables::CHECKPOINT_POSITION, s(position))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn swap_checkpoint(
        &self,
        source: &str,
        expected: Option<&str>,
        position: &str,
    ) -> Result<bool, StoreError> {
        let mut retry = self.retry("PutItem(checkpoint swap)");
        loop {
            let request = self
                .client
                .put_item()
                .table_name(&self.checkpoints)
                .item(tables::CHECKPOINT_KEY, s(source))
                .item(tables::CHECKPOINT_POSITION, s(position));
            // DynamoDB refuses attribute names an expression does not use: one set per branch.
            let request = match expected {
                None => request
                    .condition_expression("attribute_not_exists(#k)")
                    .expression_attribute_names("#k", tables::CHECKPOINT_KEY),
                Some(expected) => request
                    .condition_expression("#p = :expected")
                    .expression_attribute_names("#p", tables::CHECKPOINT_POSITION)
                    .expression_attribute_values(":expected", s(expected)),
            };
            match request.send().await {
                Ok(_) => return Ok(true),
                Err(SdkError::ServiceError(ctx))
                    if matches!(ctx.err(), PutItemError::ConditionalCheckFailedException(_)) =>
                {
                    return Ok(false);
                }
                Err(err) => retry.after(classify(&err, refused)).await?,
            }
        }
    }

    async fn save_checkpoint_fenced(
        &self,
        source: &str,
        fence: u64,
        position: &str,
    ) -> Result<bool, StoreError> {
        let mut retry = self.retry("PutItem(checkpoint fenced)");
        loop {
            // `<=`, not `<`: a retry of an attempt that landed but whose answer was lost finds
            // its own token and succeeds again, instead of reading as fenced out.
            let request = self
                .client
                .put_item()
                .table_name(&self.checkpoints)
                .item(tables::CHECKPOINT_KEY, s(source))
                .item(tables::CHECKPOINT_POSITION, s(position))
                .item(
                    tables::CHECKPOINT_FENCE,
                    aws_sdk_dynamodb::types::AttributeValue::N(fence.to_string()),
                )
                .condition_expression("attribute_not_exists(#f) OR #f <= :f")
                .expression_attribute_names("#f", tables::CHECKPOINT_FENCE)
                .expression_attribute_values(
                    ":f",
                    aws_sdk_dynamodb::types::AttributeValue::N(fence.to_string()),
                );
            match request.send().await {
                Ok(_) => return Ok(true),
                Err(SdkError::ServiceError(ctx))
                    if matches!(ctx.err(), PutItemError::ConditionalCheckFailedException(_)) =>
                {
                    return Ok(false);
                }
                Err(err) => retry.after(classify(&err, refused)).await?,
            }
        }
    }

    async fn clear(&self) -> Result<(), StoreError> {
        let all = |_: &str| true;
        self.delete_all(&self.pool, pool_attr::SANDBOX_ID, all)
            .await?;
        self.delete_all(&self.stats, tables::STATS_KEY, all).await?;
        self.delete_all(
            &self.checkpoints,
            tables::CHECKPOINT_KEY,
            domain::store::is_view_checkpoint,
        )
        .await
    }
}
