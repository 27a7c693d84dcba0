//! `projector redrive`: re-applies the stream batches the Lambda projector gave up on.
//!
//! When the event source mapping discards a batch (record age or retries exhausted), it sends a
//! message to the on-failure destination (an SQS queue, terraform/projector.tf) that names the
//! batch, not its records: `DDBStreamBatchInfo` with the shard, the first and last sequence
//! numbers, the approximate arrival times of the first and last record, the batch size and the
//! stream ARN. For each such message redrive
//!
//! 1. reads the records back from the shard (`GetShardIterator AT_SEQUENCE_NUMBER` at the first,
//!    `GetRecords` until past the last) and applies them with the same batched apply as every
//!    other source ([`Projector::apply_batch`]: version-conditioned, so a record the view already
//!    holds is skipped and a redrive of the same message changes nothing);
//! 2. if the stream no longer holds them (DynamoDB Streams keeps records 24 hours; the shard or
//!    the whole stream may be gone), or the read did not reach the last sequence number, falls
//!    back to the event table: the arrival window (widened by a margin, since an event's
//!    `occurred_at` is stamped before it is written) is read through the time-ordered feed, and
//!    every sandbox stream with an event in it is re-projected from its own stream through the
//!    same repair `projector verify --repair` uses.
//!
//! Messages are read as the operator has them: the message body, one JSON value per line, a JSON
//! array, or the output of `aws sqs receive-message` (`{"Messages":[{"Body":"…"}]}`). Reading the
//! queue is left to the AWS CLI, so deleting a message stays an explicit step after a clean run.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::audit::{EventFeed, FeedFilter, FeedQuery};
use domain::model::events::format_time;
use domain::model::ids::sandbox_id_of;
use domain::store::{EventStore, ViewStore};
use serde::Serialize;
use serde_json::Value;

use crate::poller::{decode_record, IteratorStart, StreamApi, StreamError, StreamRecord};
use crate::Projector;

/// How far around the arrival window the event table is read by default: covers the time
/// between stamping an event and its write reaching the stream, and clock skew.
pub const DEFAULT_WINDOW_MARGIN: Duration = Duration::from_secs(60);
/// Consecutive empty `GetRecords` pages after which a shard read stops (an open shard at its
/// tip answers empty pages forever; DynamoDB Streams may also return empty pages mid-shard).
const MAX_EMPTY_PAGES: usize = 5;
/// Events per feed read in the fallback.
const FEED_PAGE: usize = 500;

/// One failed batch, as the event source mapping describes it (`DDBStreamBatchInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedBatch {
    /// The shard the batch was read from.
    pub shard_id: String,
    /// Sequence number of the batch's first record.
    pub start_sequence_number: String,
    /// Sequence number of the batch's last record.
    pub end_sequence_number: String,
    /// When the first record reached the stream (approximately).
    pub first_arrival: Option<DateTime<Utc>>,
    /// When the last record reached the stream (approximately).
    pub last_arrival: Option<DateTime<Utc>>,
    /// Records in the batch, as the message states it.
    pub batch_size: Option<u64>,
    /// The stream the batch came from.
    pub stream_arn: Option<String>,
}

/// Messages read from an operator's input: the batches found and what could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMessages {
    /// Failed-batch messages, in input order.
    pub batches: Vec<FailedBatch>,
    /// Values that were not failed-batch messages, with why.
    pub unreadable: Vec<String>,
}

/// Reads every failed-batch message in `text` (see the module docs for the accepted shapes).
pub fn parse_messages(text: &str) -> ParsedMessages {
    let mut parsed = ParsedMessages::default();
    for (index, value) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        match value {
            Ok(value) => collect(&value, &mut parsed),
            Err(e) => {
                parsed
                    .unreadable
                    .push(format!("input value {}: not JSON: {e}", index + 1));
                // The rest of the input cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
    parsed
}

fn collect(value: &Value, parsed: &mut ParsedMessages) {
    match value {
        Value::Array(values) => values.iter().for_each(|v| collect(v, parsed)),
        Value::Object(map) => {
            if let Some(messages) = map.get("Messages").and_then(Value::as_array) {
                // `aws sqs receive-message` output.
                messages.iter().for_each(|v| collect(v, parsed));
            } else if let Some(body) = map.get("Body").and_then(Value::as_str) {
                // One SQS message: the failure record is its body, as a JSON string.
                match serde_json::from_str::<Value>(body) {
                    Ok(inner) => collect(&inner, parsed),
                    Err(e) => parsed
                        .unreadable
                        .push(format!("message body is not JSON: {e}")),
                }
            } else if let Some(info) = map.get("DDBStreamBatchInfo") {
                match batch_info(info) {
                    Ok(batch) => parsed.batches.push(batch),
                    Err(why) => parsed.unreadable.push(why),
                }
            } else {
                parsed
                    .unreadable
                    .push("a JSON object without DDBStreamBatchInfo, Body or Messages".into());
            }
        }
        other => parsed.unreadable.push(format!(
            "not a failure message: {}",
            truncate(&other.to_string())
        )),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

fn batch_info(info: &Value) -> Result<FailedBatch, String> {
    let text = |name: &str| info.get(name).and_then(Value::as_str).map(str::to_string);
    let required =
        |name: &str| text(name).ok_or_else(|| format!("DDBStreamBatchInfo has no {name}"));
    let time = |name: &str| {
        text(name).and_then(|t| DateTime::parse_from_rfc3339(&t).ok().map(|t| t.to_utc()))
    };
    Ok(FailedBatch {
        shard_id: required("shardId")?,
        start_sequence_number: required("startSequenceNumber")?,
        end_sequence_number: required("endSequenceNumber")?,
        first_arrival: time("approximateArrivalOfFirstRecord"),
        last_arrival: time("approximateArrivalOfLastRecord"),
        batch_size: info.get("batchSize").and_then(Value::as_u64),
        stream_arn: text("streamArn"),
    })
}

/// Orders two sequence numbers (decimal strings of up to 40 digits: longer is larger).
fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Redrive settings.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// How far before the first and after the last arrival the fallback reads the event table.
    pub window_margin: Duration,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        Self {
            window_margin: DEFAULT_WINDOW_MARGIN,
        }
    }
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveSummary {
    /// Failed-batch messages handled.
    pub messages: usize,
    /// Messages whose records were read back from the stream.
    pub from_stream: usize,
    /// Messages re-projected from the event table (the stream no longer held them).
    pub from_event_table: usize,
    /// Stream records read back.
    pub records_read: usize,
    /// Events that changed the view.
    pub records_reapplied: usize,
    /// Sandbox streams re-projected by the fallback that were behind or wrong.
    pub streams_repaired: usize,
    /// Records or streams already in the view (nothing to do).
    pub skipped: usize,
    /// What could not be applied (each explained); non-empty means a non-zero exit.
    pub failures: Vec<String>,
}

impl RedriveSummary {
    /// True when everything named was applied or already in the view.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Where redrive reads: the stream for a message's ARN (`None`: the events table's current one).
pub trait StreamOpener: Send + Sync {
    /// A reader of `stream_arn`.
    fn open(&self, stream_arn: Option<&str>) -> Arc<dyn StreamApi>;
}

/// Re-applies every batch of `parsed` (its unreadable messages count as failures).
pub async fn redrive(
    projector: &Projector,
    feed: &dyn EventFeed,
    streams: &dyn StreamOpener,
    parsed: &ParsedMessages,
    options: &RedriveOptions,
) -> RedriveSummary {
    let mut summary = RedriveSummary {
        failures: parsed.unreadable.clone(),
        ..RedriveSummary::default()
    };
    for batch in &parsed.batches {
        summary.messages += 1;
        let api = streams.open(batch.stream_arn.as_deref());
        match read_batch(api.as_ref(), batch).await {
            Ok(read) if read.complete => {
                summary.from_stream += 1;
                summary.records_read += read.records.len();
                apply_records(projector, batch, &read.records, &mut summary).await;
            }
            Ok(read) => {
                // Part of the batch is gone: apply what is there, then re-project the window.
                tracing::warn!(target: "projector", shard = %batch.shard_id,
                    read = read.records.len(), "the stream holds only part of the batch; re-projecting its window from the event table");
                summary.records_read += read.records.len();
                apply_records(projector, batch, &read.records, &mut summary).await;
                reproject_window(projector, feed, batch, options, &mut summary).await;
            }
            Err(StreamError::Trimmed | StreamError::NotFound) => {
                tracing::warn!(target: "projector", shard = %batch.shard_id,
                    start = %batch.start_sequence_number,
                    "the stream no longer holds the batch; re-projecting its window from the event table");
                reproject_window(projector, feed, batch, options, &mut summary).await;
            }
            Err(e) => summary.failures.push(format!(
                "shard {} from {}: reading the stream: {e}",
                batch.shard_id, batch.start_sequence_number
            )),
        }
    }
    summary
}

/// Records of one batch read back from its shard.
struct ReadBack {
    records: Vec<StreamRecord>,
    /// The read reached the batch's last sequence number.
    complete: bool,
}

async fn read_batch(api: &dyn StreamApi, batch: &FailedBatch) -> Result<ReadBack, StreamError> {
    let start = IteratorStart::AtSequence(batch.start_sequence_number.clone());
    let mut iterator = Some(api.shard_iterator(&batch.shard_id, &start).await?);
    let end = batch.end_sequence_number.as_str();
    let mut records = Vec::new();
    let mut empty_pages = 0;
    while let Some(it) = iterator.take() {
        let page = api.get_records(&it, 1000).await?;
        if page.records.is_empty() {
            empty_pages += 1;
            if empty_pages >= MAX_EMPTY_PAGES {
                break;
            }
        } else {
            empty_pages = 0;
        }
        let mut done = false;
        for record in page.records {
            let order = sequence_cmp(&record.sequence_number, end);
            if order.is_gt() {
                done = true;
                break;
            }
            records.push(record);
            if order.is_eq() {
                // The batch's last record: no need to wait for a later one (an open shard at
                // its tip has none yet).
                done = true;
                break;
            }
        }
        if done {
            break;
        }
        iterator = page.next_iterator;
    }
    let complete = records
        .last()
        .is_some_and(|r| sequence_cmp(&r.sequence_number, end).is_eq());
    Ok(ReadBack { records, complete })
}

async fn apply_records(
    projector: &Projector,
    batch: &FailedBatch,
    records: &[StreamRecord],
    summary: &mut RedriveSummary,
) {
    let mut envelopes = Vec::with_capacity(records.len());
    for record in records {
        match decode_record(record) {
            Ok(Some(envelope)) => envelopes.push(envelope),
            Ok(None) => summary.skipped += 1,
            Err(reason) => summary.failures.push(format!(
                "shard {} record {}: {reason}",
                batch.shard_id, record.sequence_number
            )),
        }
    }
    match projector.apply_batch(&envelopes, None).await {
        Ok(report) => {
            summary.records_reapplied += report.applied;
            summary.skipped += report.duplicates + report.ignored;
            for (index, reason) in report.poison {
                let id = envelopes
                    .get(index)
                    .map_or("?", |e| e.stream_id.as_str())
                    .to_string();
                summary
                    .failures
                    .push(format!("shard {} event of {id}: {reason}", batch.shard_id));
            }
        }
        Err(e) => summary.failures.push(format!(
            "shard {} from {}: applying: {e}",
            batch.shard_id, batch.start_sequence_number
        )),
    }
}

/// The fallback: every sandbox with an event in the batch's arrival window, re-projected from
/// its stream.
async fn reproject_window(
    projector: &Projector,
    feed: &dyn EventFeed,
    batch: &FailedBatch,
    options: &RedriveOptions,
    summary: &mut RedriveSummary,
) {
    let (Some(first), Some(last)) = (
        batch.first_arrival,
        batch.last_arrival.or(batch.first_arrival),
    ) else {
        summary.failures.push(format!(
            "shard {} from {}: the stream no longer holds the batch and the message has no arrival times; run `projector verify --repair`",
            batch.shard_id, batch.start_sequence_number
        ));
        return;
    };
    let margin = chrono::Duration::from_std(options.window_margin).unwrap_or_default();
    summary.from_event_table += 1;
    let sandboxes = match sandboxes_in_window(feed, first - margin, last + margin).await {
        Ok(ids) => ids,
        Err(e) => {
            summary.failures.push(format!(
                "shard {}: reading the event table's time index: {e}",
                batch.shard_id
            ));
            return;
        }
    };
    let ids: Vec<String> = sandboxes.into_iter().collect();
    let events: &Arc<dyn EventStore> = projector.events();
    let view: &Arc<dyn ViewStore> = projector.view();
    match crate::repair::repair_sandboxes(events.as_ref(), view.as_ref(), &ids).await {
        Ok(repaired) => {
            let changed = repaired.rows_repaired() as usize;
            summary.streams_repaired += changed;
            summary.skipped += ids.len().saturating_sub(changed);
            summary.failures.extend(repaired.left);
        }
        Err(e) => summary
            .failures
            .push(format!("shard {}: re-projecting: {e}", batch.shard_id)),
    }
}

/// Ids of the sandboxes with an event that occurred in `[from, until)`.
async fn sandboxes_in_window(
    feed: &dyn EventFeed,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<BTreeSet<String>, domain::store::StoreError> {
    let mut ids = BTreeSet::new();
    let mut after = format_time(&(from - chrono::Duration::milliseconds(1)));
    loop {
        let page = feed
            .feed(
                &FeedQuery {
                    after: after.clone(),
                    until,
                    filter: FeedFilter::default(),
                },
                FEED_PAGE,
            )
            .await?;
        ids.extend(
            page.events
                .iter()
                .filter_map(|e| sandbox_id_of(&e.stream_id))
                .map(str::to_string),
        );
        match page.next {
            Some(next) => after = next,
            None => return Ok(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(shard: &str, start: &str, end: &str) -> Value {
        json!({
            "requestContext": {
                "requestId": "316aa6d0-0000-4000-8000-85d5f4a6bc81",
                "functionArn": "arn:aws:lambda:eu-west-1:123456789012:function:projector",
                "condition": "RecordAgeExceeded",
                "approximateInvokeCount": 3
            },
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
            "version": "1.0",
            "timestamp": "2026-11-30T10:00:05.000Z",
            "DDBStreamBatchInfo": {
                "shardId": shard,
                "startSequenceNumber": start,
                "endSequenceNumber": end,
                "approximateArrivalOfFirstRecord": "2026-11-30T10:00:00Z",
                "approximateArrivalOfLastRecord": "2026-11-30T10:00:01Z",
                "batchSize": 2,
                "streamArn": "arn:aws:dynamodb:eu-west-1:123456789012:table/broker-events/stream/2026-11-01T00:00:00.000"
            }
        })
    }

    /// Bodies, lines, arrays and `aws sqs receive-message` output all yield the batches, and
    /// anything else is reported as unreadable instead of being ignored.
    #[test]
    fn accepts_every_operator_shape() {
        let one = message("shardId-1", "100", "200");
        let two = message("shardId-2", "300", "400");
        let lines = format!("{one}\n{two}\n");
        assert_eq!(parse_messages(&lines).batches.len(), 2);
        let array = json!([one, two]).to_string();
        assert_eq!(parse_messages(&array).batches.len(), 2);
        let sqs = json!({"Messages": [
            {"MessageId": "m1", "ReceiptHandle": "r1", "Body": one.to_string()},
            {"MessageId": "m2", "ReceiptHandle": "r2", "Body": two.to_string()},
        ]})
        .to_string();
        let parsed = parse_messages(&sqs);
        assert_eq!(parsed.unreadable, Vec::<String>::new());
        assert_eq!(parsed.batches[1].shard_id, "shardId-2");
        assert_eq!(parsed.batches[0].start_sequence_number, "100");
        assert_eq!(parsed.batches[0].batch_size, Some(2));
        assert_eq!(
            parsed.batches[0].first_arrival.map(|t| t.to_rfc3339()),
            Some("2026-11-30T10:00:00+00:00".to_string())
        );
        let bad = parse_messages("{\"hello\": 1}\n[1]\n{not json");
        assert!(bad.batches.is_empty());
        assert_eq!(bad.unreadable.len(), 3, "{:?}", bad.unreadable);
    }

    /// One shard of scripted records; an iterator is the index of the next record.
    struct OneShard(Vec<StreamRecord>);

    #[async_trait::async_trait]
    impl StreamApi for OneShard {
        async fn list_shards(&self) -> Result<Vec<crate::poller::ShardInfo>, StreamError> {
            Ok(Vec::new())
        }
        async fn shard_iterator(
            &self,
            shard_id: &str,
            start: &IteratorStart,
        ) -> Result<String, StreamError> {
            match (shard_id, start) {
                ("s1", IteratorStart::AtSequence(seq)) => self
                    .0
                    .iter()
                    .position(|r| &r.sequence_number == seq)
                    .map(|i| i.to_string())
                    .ok_or(StreamError::Trimmed),
                _ => Err(StreamError::NotFound),
            }
        }
        async fn get_records(
            &self,
            iterator: &str,
            _limit: i32,
        ) -> Result<crate::poller::RecordBatch, StreamError> {
            let from: usize = iterator.parse().map_err(|_| StreamError::ExpiredIterator)?;
            Ok(crate::poller::RecordBatch {
                records: self.0.iter().skip(from).cloned().collect(),
                next_iterator: Some(self.0.len().to_string()),
            })
        }
    }

    struct Opener(Arc<OneShard>);

    impl StreamOpener for Opener {
        fn open(&self, _stream_arn: Option<&str>) -> Arc<dyn StreamApi> {
            Arc::clone(&self.0) as Arc<dyn StreamApi>
        }
    }

    fn registered(id: &str) -> domain::EventEnvelope {
        domain::EventEnvelope::new(
            &format!("sandbox#{id}"),
            1,
            &domain::model::events::SandboxEvent::SandboxRegistered {
                sandbox_id: id.into(),
                name: format!("lab-{id}"),
                external_id: format!("identity/accounts/{id}"),
                sfdc_account_id: None,
                csp_created_at: None,
            },
            &domain::CommandMeta {
                actor: domain::Actor::Admin,
                request_id: None,
                correlation_id: None,
            },
            Utc::now(),
        )
    }

    fn record(seq: &str, envelope: &domain::EventEnvelope) -> StreamRecord {
        StreamRecord {
            sequence_number: seq.into(),
            event_name: Some("INSERT".into()),
            created_at: Some(Utc::now()),
            keys: Default::default(),
            new_image: Some(store_dynamodb::envelope_to_item(envelope)),
        }
    }

    fn batch(shard: &str, start: &str, end: &str) -> FailedBatch {
        FailedBatch {
            shard_id: shard.into(),
            start_sequence_number: start.into(),
            end_sequence_number: end.into(),
            first_arrival: Some(Utc::now()),
            last_arrival: Some(Utc::now()),
            batch_size: None,
            stream_arn: None,
        }
    }

    /// A batch the shard still holds is applied from it; one it holds only in part is applied
    /// as far as it goes and its arrival window re-projected from the event table; one it no
    /// longer holds at all is re-projected from the event table alone; without arrival times
    /// that last case is reported as not applied.
    #[tokio::test]
    async fn stream_then_event_table() -> Result<(), Box<dyn std::error::Error>> {
        use domain::store::{EventStore, PoolView};
        use store_embedded::EmbeddedStore;
        let store = EmbeddedStore::open_in_memory(2)?;
        let (a, b, c) = (registered("a"), registered("b"), registered("c"));
        store.append(vec![a.clone()]).await?;
        store.append(vec![b.clone()]).await?;
        store.append(vec![c.clone()]).await?;
        // The shard lost b's record (sequence 2) and holds a's and c's.
        let shard = Arc::new(OneShard(vec![record("1", &a), record("3", &c)]));
        let projector = Projector::new(
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            crate::ProjectorMetrics::unregistered(),
        );
        let opener = Opener(shard);
        let options = RedriveOptions::default();
        let run = |batches: Vec<FailedBatch>| {
            let parsed = ParsedMessages {
                batches,
                unreadable: Vec::new(),
            };
            let (projector, store, opener, options) = (&projector, &store, &opener, &options);
            async move { redrive(projector, store, opener, &parsed, options).await }
        };

        let whole = run(vec![batch("s1", "1", "1")]).await;
        assert_eq!((whole.from_stream, whole.records_reapplied), (1, 1));
        assert!(whole.is_clean(), "{:?}", whole.failures);

        // 1..=2 ends at a record the shard does not have: partial read, then the window.
        let partial = run(vec![batch("s1", "1", "2")]).await;
        assert_eq!((partial.from_stream, partial.from_event_table), (0, 1));
        assert!(partial.is_clean(), "{:?}", partial.failures);
        assert!(
            store.get("b").await?.is_some(),
            "b re-projected from the event table"
        );

        let gone = run(vec![batch("gone", "7", "9")]).await;
        assert_eq!(gone.from_event_table, 1);
        assert!(
            store.get("c").await?.is_some(),
            "c re-projected from the event table"
        );
        assert_eq!(store.stats().await?.total(), 3);

        let mut no_window = batch("gone", "7", "9");
        no_window.first_arrival = None;
        no_window.last_arrival = None;
        let refused = run(vec![no_window]).await;
        assert_eq!(refused.failures.len(), 1, "{refused:?}");
        Ok(())
    }

    /// Sequence numbers compare as numbers, not as text.
    #[test]
    fn sequence_numbers_compare_numerically() {
        use std::cmp::Ordering;
        assert_eq!(sequence_cmp("900", "1000"), Ordering::Less);
        assert_eq!(sequence_cmp("000123", "123"), Ordering::Equal);
        assert_eq!(sequence_cmp("124", "123"), Ordering::Greater);
    }
}
