//! Per-prefix counters on DynamoDB (ADR 0018): items `prefix#{shard}#{group}` in the stats
//! table, beside the `stats#{shard}` items, with the same per-status number attributes.
//!
//! They are `ADD`ed in the same `TransactWriteItems` as the rows they count, so they move
//! exactly when rows do, and they are sharded like the totals so a busy lab's transitions are
//! spread over `stats_shards` partition keys. Reading them is one scan of the stats table, whose
//! size is O(groups × shards) — never a read of the pool.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};

use super::items::{key_n, Item};
use super::{build_error, n, refused, s, tables, DynamoStore};
use domain::model::lifecycle::SandboxStatus;
use domain::model::pool_prefix::PrefixStats;
use domain::model::projection::StatsDelta;
use domain::store::batch::{RowChange, ViewChunk};
use domain::store::StoreError;

/// Key prefix of the per-prefix counter items.
const ITEM_PREFIX: &str = "prefix#";
/// Attribute holding the group, so a reader need not parse keys.
const GROUP_ATTR: &str = "group";

impl DynamoStore {
    /// The counter updates for `changes`, one per touched (group, shard), to ride in the
    /// transaction that writes the rows.
    pub(super) fn prefix_stats_updates(
        &self,
        changes: &[RowChange],
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let chunk = ViewChunk {
            rows: changes.to_vec(),
            checkpoint: None,
        };
        self.prefix_stats_updates_of(&chunk)
    }

    /// As [`DynamoStore::prefix_stats_updates`], for a planned chunk.
    pub(super) fn prefix_stats_updates_of(
        &self,
        chunk: &ViewChunk,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        chunk
            .stats_by_prefix_shard(self.stats_shards)
            .into_iter()
            .map(|((group, shard), delta)| {
                let update = counter_update(&self.stats, &group, shard, &delta)?;
                Ok(TransactWriteItem::builder().update(update).build())
            })
            .collect()
    }

    /// Sums the counter items per group (groups whose counts are all zero are left out).
    pub(super) async fn read_prefix_stats(&self) -> Result<PrefixStats, StoreError> {
        let mut stats = PrefixStats::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .call("Scan(prefix stats)", refused, || {
                    self.client
                        .scan()
                        .table_name(&self.stats)
                        .filter_expression("begins_with(#k, :p)")
                        .expression_attribute_names("#k", tables::STATS_KEY)
                        .expression_attribute_values(":p", s(ITEM_PREFIX))
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            for item in out.items.unwrap_or_default() {
                let Some(AttributeValue::S(group)) = item.get(GROUP_ATTR) else {
                    return Err(StoreError::Corrupt(
                        "prefix counter item without its group".into(),
                    ));
                };
                let counts = stats.entry(group.clone()).or_default();
                for status in SandboxStatus::ALL {
                    if let Some(count) = key_n(&item, status.as_str()) {
                        counts.by_status[status.index()] += i64::try_from(count).map_err(|_| {
                            StoreError::Corrupt(format!("prefix counter {count} out of range"))
                        })?;
                    }
                }
            }
            match out.last_evaluated_key {
                Some(next) => start = Some(next),
                None => break,
            }
        }
        stats.retain(|_, counts| counts.by_status.iter().any(|c| *c != 0));
        Ok(stats)
    }
}

/// `ADD` the delta to one (group, shard) counter item, and `SET` its group attribute.
fn counter_update(
    table: &str,
    group: &str,
    shard: u32,
    delta: &StatsDelta,
) -> Result<Update, StoreError> {
    let mut adds = Vec::new();
    let mut names = HashMap::from([("#g".to_string(), GROUP_ATTR.to_string())]);
    let mut values = HashMap::from([(":g".to_string(), s(group))]);
    for status in SandboxStatus::ALL {
        let d = delta.0[status.index()];
        if d != 0 {
            let i = status.index();
            adds.push(format!("#c{i} :d{i}"));
            names.insert(format!("#c{i}"), status.as_str().to_string());
            values.insert(format!(":d{i}"), n(d));
        }
    }
    Update::builder()
        .table_name(table)
        .key(
            tables::STATS_KEY,
            s(format!("{ITEM_PREFIX}{shard}#{group}")),
        )
        .update_expression(format!("SET #g = :g ADD {}", adds.join(", ")))
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()
        .map_err(build_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter update keys the item by shard and group and adds only non-zero statuses.
    #[test]
    fn update_shape() {
        let update = counter_update("t-stats", "aws-lab", 3, &StatsDelta([-1, 1, 0, 0, 0, 0]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            update.key().get(tables::STATS_KEY),
            Some(&s("prefix#3#aws-lab"))
        );
        assert_eq!(
            update.update_expression(),
            "SET #g = :g ADD #c0 :d0, #c1 :d1"
        );
    }
}
