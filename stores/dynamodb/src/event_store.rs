//! The event store on the events table: conditional appends keyed by (stream, version), strong
//! stream loads and the paged full scan.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    CancellationReason, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};

use super::items::{
    cursor_from_key, envelope_from_item, envelope_to_sharded_item, event_attr, key_from_cursor,
    key_s, Item, EVENTS_KEY,
};
use super::metering::transaction_units;
use super::retry::{classify, describe, Failure, Retry, TRANSIENT_CANCELLATION_CODES};
use super::{
    build_error, limit_i32, n, refused, refused_cursor, s, DynamoStore, CONDITIONAL_CHECK_FAILED,
};
use domain::model::events::EventEnvelope;
use domain::store::{validate_append, EventPage, EventStore, MemberOutcome, StoreError};

/// Whether `old` (the item a failed condition found) is `envelope` itself: then an earlier
/// attempt of this very call stored it and only its answer was lost (timeout, 5xx).
fn is_own_event(old: Option<&Item>, envelope: &EventEnvelope) -> bool {
    old.and_then(|item| key_s(item, event_attr::EVENT_ID))
        .is_some_and(|id| id == envelope.event_id.to_string())
}

impl DynamoStore {
    /// One event: a conditional `PutItem`.
    async fn put_event(&self, envelope: &EventEnvelope) -> Result<(), StoreError> {
        let item = envelope_to_sharded_item(envelope, self.index_shards);
        let mut retry = self.retry("PutItem(event)");
        loop {
            // `attribute_not_exists(stream_id)` is evaluated on the item with this exact
            // (stream_id, version) key: it holds iff that version of the stream is still free.
            let result = self
                .client
                .put_item()
                .table_name(&self.events)
                .set_item(Some(item.clone()))
                .condition_expression("attribute_not_exists(#sid)")
                .expression_attribute_names("#sid", event_attr::STREAM_ID)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let PutItemError::ConditionalCheckFailedException(failed) = ctx.err() {
                    if retry.retries() > 0 && is_own_event(failed.item(), envelope) {
                        return Ok(());
                    }
                    return Err(StoreError::VersionConflict {
                        stream_id: envelope.stream_id.clone(),
                    });
                }
            }
            retry
                .after(classify(&err, StoreError::InvalidAppend))
                .await?;
        }
    }

    /// Several events: one `TransactWriteItems` of conditional puts, all or nothing.
    async fn put_events(&self, events: &[EventEnvelope]) -> Result<(), StoreError> {
        let items = events
            .iter()
            .map(|e| {
                Put::builder()
                    .table_name(&self.events)
                    .set_item(Some(envelope_to_sharded_item(e, self.index_shards)))
                    .condition_expression("attribute_not_exists(#sid)")
                    .expression_attribute_names("#sid", event_attr::STREAM_ID)
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()
                    .map(|put| TransactWriteItem::builder().put(put).build())
                    .map_err(build_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut retry = self.retry("TransactWriteItems(events)");
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => {
                    let (count, units) = transaction_units(&items);
                    self.requests.count_transaction_items(
                        "TransactWriteItems(events)",
                        count,
                        units,
                    );
                    return Ok(());
                }
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let TransactWriteItemsError::TransactionCanceledException(cancelled) = ctx.err()
                {
                    self.requests.count_cancellation(
                        "TransactWriteItems(events)",
                        cancelled.cancellation_reasons(),
                    );
                    let failure = self
                        .cancelled_append(events, cancelled.cancellation_reasons(), &retry)
                        .await?;
                    match failure {
                        None => return Ok(()),
                        Some(failure) => {
                            retry.after(failure).await?;
                            continue;
                        }
                    }
                }
            }
            retry
                .after(classify(&err, StoreError::InvalidAppend))
                .await?;
        }
    }

    /// Reads a cancelled append's reasons (one per item, in request order). `Ok(None)`: the
    /// batch is in fact stored (an earlier attempt's answer was lost); `Err(conflict)` naming the
    /// first stream whose condition failed; `Ok(Some(failure))` for the retry loop otherwise.
    async fn cancelled_append(
        &self,
        events: &[EventEnvelope],
        reasons: &[CancellationReason],
        retry: &Retry,
    ) -> Result<Option<Failure>, StoreError> {
        let failed = |r: &CancellationReason| r.code() == Some(CONDITIONAL_CHECK_FAILED);
        // Event ids are unique and the transaction atomic: if any failed condition found one of
        // our own events, the whole batch was committed by an earlier attempt of this call.
        if retry.retries() > 0
            && reasons
                .iter()
                .zip(events)
                .any(|(r, e)| failed(r) && is_own_event(r.item(), e))
        {
            return Ok(None);
        }
        if let Some(i) = reasons.iter().position(failed) {
            if let Some(e) = events.get(i) {
                return Err(StoreError::VersionConflict {
                    stream_id: e.stream_id.clone(),
                });
            }
        }
        let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
        if codes
            .iter()
            .any(|c| TRANSIENT_CANCELLATION_CODES.contains(c))
        {
            return Ok(Some(Failure::Transient(format!(
                "transaction cancelled: {codes:?}"
            ))));
        }
        if codes.iter().all(|c| *c == "None") {
            // No usable reasons (an emulator that omits them): find the stream whose next
            // version is taken; if none is, the cancellation was transient.
            return match self.first_taken_stream(events).await? {
                Some(stream_id) => Err(StoreError::VersionConflict { stream_id }),
                None => Ok(Some(Failure::Transient(
                    "transaction cancelled without reasons".into(),
                ))),
            };
        }
        Err(StoreError::InvalidAppend(format!(
            "transaction cancelled: {codes:?}"
        )))
    }

    /// The first stream of a batch whose first version already exists (consistent reads).
    async fn first_taken_stream(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Option<String>, StoreError> {
        let mut seen: Vec<&str> = Vec::new();
        for e in events {
            if seen.contains(&e.stream_id.as_str()) {
                continue;
            }
            seen.push(&e.stream_id);
            let out = self
                .call("GetItem(event)", refused, || {
                    self.client
                        .get_item()
                        .table_name(&self.events)
                        .key(event_attr::STREAM_ID, s(&e.stream_id))
                        .key(event_attr::VERSION, n(e.version))
                        .consistent_read(true)
                        .projection_expression("#sid")
                        .expression_attribute_names("#sid", event_attr::STREAM_ID)
                        .send()
                })
                .await?;
            if out.item.is_some() {
                return Ok(Some(e.stream_id.clone()));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl EventStore for DynamoStore {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut events = Vec::new();
        let mut start: Option<Item> = None;
        // Follow LastEvaluatedKey to the end: a stream beyond one 1 MB page must load whole, or
        // the command would decide on a partial history and conflict forever (anchors §B.5).
        loop {
            let out = self
                .call("Query(events)", refused, || {
                    self.client
                        .query()
                        .table_name(&self.events)
                        .key_condition_expression("#sid = :s AND #v > :v")
                        .expression_attribute_names("#sid", event_attr::STREAM_ID)
                        .expression_attribute_names("#v", event_attr::VERSION)
                        .expression_attribute_values(":s", s(stream_id))
                        .expression_attribute_values(":v", n(after))
                        .consistent_read(true)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            for item in out.items() {
                events.push(envelope_from_item(item)?);
            }
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) => start = Some(key),
                None => return Ok(events),
            }
        }
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        let out = self
            .call("Query(latest event)", refused, || {
                self.client
                    .query()
                    .table_name(&self.events)
                    .key_condition_expression("#sid = :s")
                    .expression_attribute_names("#sid", event_attr::STREAM_ID)
                    .expression_attribute_values(":s", s(stream_id))
                    .scan_index_forward(false)
                    .limit(1)
                    .consistent_read(true)
                    .send()
            })
            .await?;
        out.items().first().map(envelope_from_item).transpose()
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        validate_append(&events)?;
        match events.as_slice() {
            [] => Ok(()),
            [single] => self.put_event(single).await,
            several => self.put_events(several).await,
        }
    }

    fn group_commit_items(&self) -> usize {
        // A group of one is a lone append: nothing to gain.
        if self.group_commit_items > 1 {
            self.group_commit_items
        } else {
            0
        }
    }

    async fn append_group(&self, members: Vec<Vec<EventEnvelope>>) -> Vec<MemberOutcome> {
        self.transact_group(members).await
    }

    async fn scan(
        &self,
        segment: u32,
        segments: u32,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let segments = segments.max(1);
        if segment >= segments {
            return Ok(EventPage::default());
        }
        let start = cursor
            .as_deref()
            .map(|c| key_from_cursor(c, EVENTS_KEY))
            .transpose()?;
        let invalid = if start.is_some() {
            refused_cursor
        } else {
            refused
        };
        let total = i32::try_from(segments).map_err(|_| refused(format!("{segments} segments")))?;
        let this = i32::try_from(segment).map_err(|_| refused(format!("segment {segment}")))?;
        let out = self
            .call("Scan(events)", invalid, || {
                self.client
                    .scan()
                    .table_name(&self.events)
                    .segment(this)
                    .total_segments(total)
                    .consistent_read(true)
                    .limit(limit_i32(limit))
                    .set_exclusive_start_key(start.clone())
                    .send()
            })
            .await?;
        let mut events = out
            .items()
            .iter()
            .map(envelope_from_item)
            .collect::<Result<Vec<_>, _>>()?;
        // DynamoDB returns a partition's items in sort-key order; sort anyway so the port's
        // promise (each stream in version order) does not rest on that.
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for e in &events {
            let next = first_seen.len();
            first_seen.entry(e.stream_id.clone()).or_insert(next);
        }
        events.sort_by_key(|e| (first_seen.get(&e.stream_id).copied(), e.version));
        let cursor = out
            .last_evaluated_key
            .filter(|k| !k.is_empty())
            .map(|k| cursor_from_key(&k))
            .transpose()?;
        Ok(EventPage { events, cursor })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // One attempt: readiness wants a quick, honest answer, not a retried one.
        self.client
            .describe_table()
            .table_name(&self.events)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(describe(&e)))
    }
}

#[cfg(test)]
mod tests {

    use super::super::items::envelope_to_item;

    use super::*;

    use domain::store::append::test_envelope as env;

    /// Only an item carrying the same event id counts as "our own earlier write".
    #[test]
    fn own_event_detection() {
        let e = env("a", 1);
        let other = env("a", 1);
        assert!(is_own_event(Some(&envelope_to_item(&e)), &e));
        assert!(!is_own_event(Some(&envelope_to_item(&other)), &e));
        assert!(!is_own_event(None, &e));
    }
}
