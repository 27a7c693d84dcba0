//! [`EventFeed`] for DynamoDB: the `by-time` GSI (hash `time_bucket` = the hour `YYYY-MM-DDTHH`,
//! write-sharded as `{hour}#{k}` when `VIEW_INDEX_SHARDS` > 1; range `occurred_key` =
//! `{occurred_at}#{event_id}`), read hour by hour from the position's hour to the hour of `until`,
//! following pages inside an hour.
//!
//! Each read is `time_bucket = :partition AND occurred_key BETWEEN :after AND :until`, sent to
//! every partition of the hour at once (its shards, plus the bare hour that holds events written
//! before sharding) and merged by key: each partition is in key order, so the merge is exact up to
//! the lowest key at which a partition stopped early, and the next round continues from there.
//! The position and the bound are both strings of the key's order (see `domain::audit`), so one key
//! condition does the range; the key equal to the position (the event a cursor ended on) is
//! skipped here. The continuation is the last key examined, never an `ExclusiveStartKey`, so
//! cursors are the same positions the embedded store uses, whatever the shard count. A call
//! spends at most [`MAX_QUERIES_PER_CALL`] rounds — hours without events cost one empty round each
//! — and then returns what it has with `next`.
//!
//! Filters are pushed down only where DynamoDB can evaluate a superset exactly: the event type,
//! and caller / sandbox ids made of plain characters (whose JSON text is the value itself, so
//! `contains(payload, "\"value\"")` cannot miss). The caller re-applies the exact predicate.
//! GSI reads are eventually consistent; the live tail's lookback covers that.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Duration, Utc};

use super::items::{envelope_from_item, event_attr, key_s};
use super::{limit_i32, non_empty, refused, s, tables, DynamoStore, FILTERED_PAGE_ITEMS};
use domain::audit::{bucket_start, hour_bucket, EventFeed, FeedFilter, FeedPage, FeedQuery};
use domain::model::events::format_time;
use domain::model::ids::SANDBOX_STREAM_PREFIX;
use domain::store::StoreError;

/// Rounds of queries one feed call may send (a round is one query per partition of an hour, sent
/// together: one round per empty hour, one per page inside an hour).
pub const MAX_QUERIES_PER_CALL: usize = 48;
/// Segments of the one-time scan that finds the first event.
const FIRST_EVENT_SCAN_SEGMENTS: i32 = 4;

/// The first event's time per events table, found once per process: history is append-only and
/// stamped by clocks moving forward, so the earliest event does not change once there is one.
static FIRST_EVENT: Mutex<Option<HashMap<String, DateTime<Utc>>>> = Mutex::new(None);

/// True when a value's JSON string is the value between quotes (no escaping anywhere).
fn plain(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'+' | b'=' | b' ')
        })
}

/// The filter expression, names and values pushed down for `filter` (a superset of its matches).
fn pushdown(
    filter: &FeedFilter,
    names: &mut HashMap<String, String>,
    values: &mut HashMap<String, AttributeValue>,
) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(event_type) = &filter.event_type {
        names.insert("#et".into(), event_attr::EVENT_TYPE.into());
        values.insert(":et".into(), s(event_type));
        parts.push("#et = :et".to_string());
    }
    if let Some(caller) = filter.caller.as_deref().filter(|c| plain(c)) {
        names.insert("#actor".into(), event_attr::ACTOR.into());
        names.insert("#payload".into(), event_attr::PAYLOAD.into());
        values.insert(":actor".into(), s(format!("track:{caller}")));
        values.insert(":caller".into(), s(format!("\"{caller}\"")));
        parts.push("(#actor = :actor OR contains(#payload, :caller))".to_string());
    }
    if let Some(id) = filter.sandbox_id.as_deref().filter(|c| plain(c)) {
        names.insert("#sid".into(), event_attr::STREAM_ID.into());
        names.insert("#payload".into(), event_attr::PAYLOAD.into());
        values.insert(":stream".into(), s(format!("{SANDBOX_STREAM_PREFIX}{id}")));
        values.insert(":sandbox".into(), s(format!("\"{id}\"")));
        parts.push("(#sid = :stream OR contains(#payload, :sandbox))".to_string());
    }
    (!parts.is_empty()).then(|| parts.join(" AND "))
}

#[async_trait]
impl EventFeed for DynamoStore {
    async fn feed(&self, query: &FeedQuery, limit: usize) -> Result<FeedPage, StoreError> {
        let limit = limit.max(1);
        let until_key = format_time(&query.until);
        let mut after = query.after.clone();
        if after >= until_key {
            return Ok(FeedPage::default());
        }
        let mut hour = after
            .get(..13)
            .and_then(bucket_start)
            .ok_or(StoreError::InvalidCursor)?;
        let last_hour = query.until - Duration::milliseconds(1);
        let mut names = HashMap::from([
            ("#b".to_string(), event_attr::TIME_BUCKET.to_string()),
            ("#k".to_string(), event_attr::OCCURRED_KEY.to_string()),
        ]);
        let mut values = HashMap::new();
        let filter_expression = pushdown(&query.filter, &mut names, &mut values);
        let mut events = Vec::new();
        let mut queries = 0;
        loop {
            if hour_bucket(&hour) > hour_bucket(&last_hour) {
                return Ok(FeedPage { events, next: None });
            }
            if queries == MAX_QUERIES_PER_CALL {
                return Ok(FeedPage {
                    events,
                    next: Some(after),
                });
            }
            queries += 1;
            let remaining = limit - events.len();
            // Unfiltered: what is missing plus the position's own item. Filtered: more, since
            // the filter drops some (DynamoDB's Limit counts items examined).
            let page_limit = if filter_expression.is_some() {
                remaining.max(FILTERED_PAGE_ITEMS)
            } else {
                remaining + 1
            };
            let bucket = hour_bucket(&hour);
            let reads = self.hour_partitions(&bucket).into_iter().map(|partition| {
                let mut values = values.clone();
                values.insert(":b".into(), s(partition));
                values.insert(":lo".into(), s(&after));
                values.insert(":hi".into(), s(&until_key));
                let names = names.clone();
                let filter_expression = filter_expression.clone();
                async move {
                    self.call("Query(by-time)", refused, || {
                        self.client
                            .query()
                            .table_name(&self.events)
                            .index_name(tables::INDEX_BY_TIME)
                            .key_condition_expression("#b = :b AND #k BETWEEN :lo AND :hi")
                            .set_filter_expression(filter_expression.clone())
                            .set_expression_attribute_names(non_empty(names.clone()))
                            .set_expression_attribute_values(non_empty(values.clone()))
                            .limit(limit_i32(page_limit))
                            .send()
                    })
                    .await
                }
            });
            let outs = futures::future::try_join_all(reads).await?;
            // Each partition is in key order; merged, the keys are exact up to the lowest key
            // where a partition stopped early (its later keys are read in the next round).
            let mut frontier: Option<String> = None;
            let mut items = Vec::new();
            for out in &outs {
                if let Some(last) = out
                    .last_evaluated_key()
                    .and_then(|k| key_s(k, event_attr::OCCURRED_KEY))
                {
                    frontier = Some(match frontier {
                        Some(f) if f.as_str() <= last => f,
                        _ => last.to_string(),
                    });
                }
                for item in out.items() {
                    let key = key_s(item, event_attr::OCCURRED_KEY).ok_or_else(|| {
                        StoreError::Corrupt("by-time item without occurred_key".into())
                    })?;
                    items.push((key.to_string(), item));
                }
            }
            items.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, item) in items {
                if key == after || frontier.as_ref().is_some_and(|f| key > *f) {
                    continue;
                }
                let event = envelope_from_item(item)?;
                if query.filter.matches(&event) {
                    events.push(event);
                    if events.len() == limit {
                        return Ok(FeedPage {
                            events,
                            next: Some(key),
                        });
                    }
                }
                after = key;
            }
            match frontier {
                // More in this hour: continue after the last key every partition has covered.
                Some(last) => after = last,
                None => {
                    hour += Duration::hours(1);
                    after = hour_bucket(&hour);
                }
            }
        }
    }

    async fn first_event_time(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        if let Some(first) = FIRST_EVENT
            .lock()
            .ok()
            .and_then(|cache| cache.as_ref().and_then(|m| m.get(&self.events).copied()))
        {
            return Ok(Some(first));
        }
        // One projected parallel scan: O(table), paid once per process and table.
        let segments = (0..FIRST_EVENT_SCAN_SEGMENTS).map(|segment| self.first_in_segment(segment));
        let first = futures::future::try_join_all(segments)
            .await?
            .into_iter()
            .flatten()
            .min();
        if let (Some(first), Ok(mut cache)) = (first, FIRST_EVENT.lock()) {
            cache
                .get_or_insert_with(HashMap::new)
                .insert(self.events.clone(), first);
        }
        Ok(first)
    }
}

impl DynamoStore {
    /// The `by-time` partitions holding hour `bucket`'s events: the hour itself without write
    /// sharding; with it, every `{hour}#{k}` and also the bare hour, where events written before
    /// sharding was switched on stay (events are never rewritten; ADR 0014).
    fn hour_partitions(&self, bucket: &str) -> Vec<String> {
        super::items::shard_partitions(bucket, self.index_shards)
    }

    /// The earliest `occurred_at` in one scan segment of the events table.
    async fn first_in_segment(&self, segment: i32) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut first: Option<String> = None;
        let mut start = None;
        loop {
            let out = self
                .call("Scan(first event)", refused, || {
                    self.client
                        .scan()
                        .table_name(&self.events)
                        .segment(segment)
                        .total_segments(FIRST_EVENT_SCAN_SEGMENTS)
                        .projection_expression("#t")
                        .expression_attribute_names("#t", event_attr::OCCURRED_AT)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            for item in out.items() {
                if let Some(t) = key_s(item, event_attr::OCCURRED_AT) {
                    if first.as_deref().is_none_or(|f| t < f) {
                        first = Some(t.to_string());
                    }
                }
            }
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) => start = Some(key),
                None => break,
            }
        }
        first
            .map(|raw| {
                DateTime::parse_from_rfc3339(&raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| StoreError::Corrupt(format!("occurred_at {raw}: {e}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only values whose JSON text needs no escaping are pushed into `contains`.
    #[test]
    fn pushdown_only_plain_values() {
        let (mut names, mut values) = (HashMap::new(), HashMap::new());
        let filter = FeedFilter {
            event_type: Some("SandboxAllocated".into()),
            caller: Some("stu\"#1".into()),
            sandbox_id: Some("lab-id-1".into()),
        };
        let expression = pushdown(&filter, &mut names, &mut values).unwrap_or_default();
        assert_eq!(
            expression,
            "#et = :et AND (#sid = :stream OR contains(#payload, :sandbox))"
        );
        assert!(!values.contains_key(":caller"));
        assert!(plain("stu-1@x.y") && !plain("ü") && !plain("a/b") && !plain(""));
    }
}
