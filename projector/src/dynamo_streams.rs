//! DynamoDB Streams through `aws-sdk-dynamodbstreams`: the production [`StreamApi`], the stream
//! ARN lookup, and a raw reader used to capture real stream records (tests, the Lambda fixture).
//!
//! The Streams SDK has its own `AttributeValue` type, distinct from `aws-sdk-dynamodb`'s; records
//! are converted here so everything downstream reads event items with the adapter's one decoder.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue as DdbValue;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, Record, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;
use chrono::{DateTime, Utc};
use store_dynamodb::DynamoStore;

use crate::poller::{IteratorStart, RecordBatch, ShardInfo, StreamApi, StreamError, StreamRecord};

/// The event table's stream, read with the Streams API.
#[derive(Debug, Clone)]
pub struct DynamoStreams {
    client: Client,
    stream_arn: String,
}

impl DynamoStreams {
    /// A reader of `stream_arn` with `client`.
    pub fn new(client: Client, stream_arn: impl Into<String>) -> Self {
        Self {
            client,
            stream_arn: stream_arn.into(),
        }
    }

    /// The stream of `store`'s events table (`LatestStreamArn` from `DescribeTable`), read with
    /// the same endpoint, region and credentials as the store.
    pub async fn for_store(store: &DynamoStore) -> Result<Self, StreamError> {
        let table = store
            .client()
            .describe_table()
            .table_name(store.events_table())
            .send()
            .await
            .map_err(|e| {
                StreamError::Other(format!(
                    "describe {}: {}",
                    store.events_table(),
                    sdk_message(&e)
                ))
            })?;
        let arn = table
            .table()
            .and_then(|t| t.latest_stream_arn())
            .ok_or_else(|| {
                StreamError::Other(format!(
                    "table {} has no stream (it needs StreamSpecification NEW_IMAGE)",
                    store.events_table()
                ))
            })?;
        Ok(Self::new(metered_client(store), arn))
    }

    /// A reader of another stream ARN of the same store's endpoint (a DLQ message names the
    /// stream it came from, which differs from the current one after a table re-creation).
    pub fn for_arn(store: &DynamoStore, stream_arn: impl Into<String>) -> Self {
        Self::new(metered_client(store), stream_arn)
    }

    /// The stream's ARN.
    pub fn stream_arn(&self) -> &str {
        &self.stream_arn
    }

    /// The raw SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads every record still in the stream, parents' shards before their children's, up to
    /// `max` records, as the SDK returns them (for capturing Lambda fixtures and in tests).
    pub async fn read_all(&self, max: usize) -> Result<Vec<Record>, StreamError> {
        let mut shards = self.list_shards().await?;
        order_by_lineage(&mut shards);
        let mut out = Vec::new();
        for shard in shards {
            let mut iterator = Some(
                self.shard_iterator(&shard.shard_id, &IteratorStart::TrimHorizon)
                    .await?,
            );
            while let Some(it) = iterator.take() {
                let page = self
                    .client
                    .get_records()
                    .shard_iterator(it)
                    .limit(1000)
                    .send()
                    .await
                    .map_err(|e| classify(&e))?;
                let empty = page.records().is_empty();
                out.extend(page.records().iter().cloned());
                if out.len() >= max {
                    out.truncate(max);
                    return Ok(out);
                }
                // An open shard never ends: stop at its first empty page (caught up).
                iterator = page
                    .next_shard_iterator()
                    .filter(|_| !empty)
                    .map(str::to_string);
            }
        }
        Ok(out)
    }
}

/// A Streams client with `store`'s endpoint, region and credentials whose every request attempt
/// is counted in the store's `broker_store_requests_total` (target `stream`).
pub fn metered_client(store: &DynamoStore) -> Client {
    let config = aws_sdk_dynamodbstreams::config::Builder::from(store.sdk_config())
        .interceptor(store.stream_request_meter())
        .build();
    Client::from_conf(config)
}

/// Sorts shards so that every parent comes before its children (a stable topological order; a
/// parent no longer listed counts as done).
pub fn order_by_lineage(shards: &mut Vec<ShardInfo>) {
    let mut ordered: Vec<ShardInfo> = Vec::with_capacity(shards.len());
    let mut pending = std::mem::take(shards);
    while !pending.is_empty() {
        let listed: Vec<String> = pending.iter().map(|s| s.shard_id.clone()).collect();
        let (ready, blocked): (Vec<ShardInfo>, Vec<ShardInfo>) =
            pending.into_iter().partition(|s| {
                s.parent_shard_id
                    .as_ref()
                    .is_none_or(|p| !listed.contains(p))
            });
        if ready.is_empty() {
            // A cycle cannot happen in a real stream; keep the rest rather than loop forever.
            ordered.extend(blocked);
            break;
        }
        ordered.extend(ready);
        pending = blocked;
    }
    *shards = ordered;
}

fn sdk_message<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    err: &SdkError<E, R>,
) -> String {
    match err {
        SdkError::ServiceError(service) => format!(
            "{}: {}",
            service.err().code().unwrap_or("ServiceError"),
            service.err().message().unwrap_or_default()
        ),
        other => format!("{other:?}"),
    }
}

/// Maps a Streams error to what the poller branches on, by error code (the same codes for every
/// operation).
fn classify<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    err: &SdkError<E, R>,
) -> StreamError {
    let code = match err {
        SdkError::ServiceError(service) => service.err().code().unwrap_or_default().to_string(),
        _ => String::new(),
    };
    match code.as_str() {
        "ExpiredIteratorException" => StreamError::ExpiredIterator,
        "TrimmedDataAccessException" => StreamError::Trimmed,
        "ResourceNotFoundException" => StreamError::NotFound,
        "LimitExceededException"
        | "ThrottlingException"
        | "ProvisionedThroughputExceededException" => StreamError::Throttled(sdk_message(err)),
        _ => StreamError::Other(sdk_message(err)),
    }
}

#[async_trait]
impl StreamApi for DynamoStreams {
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| classify(&e))?;
            let Some(description) = out.stream_description() else {
                return Ok(shards);
            };
            shards.extend(description.shards().iter().filter_map(|s| {
                Some(ShardInfo {
                    shard_id: s.shard_id()?.to_string(),
                    parent_shard_id: s.parent_shard_id().map(str::to_string),
                })
            }));
            match description.last_evaluated_shard_id() {
                Some(last) => start = Some(last.to_string()),
                None => return Ok(shards),
            }
        }
    }

    async fn shard_iterator(
        &self,
        shard_id: &str,
        start: &IteratorStart,
    ) -> Result<String, StreamError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard_id);
        let request = match start {
            IteratorStart::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            IteratorStart::AfterSequence(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            IteratorStart::AtSequence(seq) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .sequence_number(seq),
        };
        let out = request.send().await.map_err(|e| classify(&e))?;
        out.shard_iterator()
            .map(str::to_string)
            // No iterator: the shard is closed and has nothing after this position.
            .ok_or(StreamError::NotFound)
    }

    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordBatch, StreamError> {
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit.clamp(1, 1000))
            .send()
            .await
            .map_err(|e| classify(&e))?;
        Ok(RecordBatch {
            records: out.records().iter().filter_map(convert_record).collect(),
            next_iterator: out.next_shard_iterator().map(str::to_string),
        })
    }
}

/// A Streams record in the poller's shape (`None` only for a record without a sequence number,
/// which the service never sends).
pub fn convert_record(record: &Record) -> Option<StreamRecord> {
    let change = record.dynamodb()?;
    Some(StreamRecord {
        sequence_number: change.sequence_number()?.to_string(),
        event_name: record.event_name().map(|n| n.as_str().to_string()),
        created_at: change.approximate_creation_date_time().and_then(to_chrono),
        keys: change.keys().map(convert_item).unwrap_or_default(),
        new_image: change.new_image().map(convert_item),
    })
}

fn to_chrono(at: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(at.to_millis().ok()?)
}

/// Converts a Streams item to the DynamoDB SDK's attribute values (the two SDKs' types are
/// distinct but have the same variants).
pub fn convert_item(item: &HashMap<String, StreamValue>) -> HashMap<String, DdbValue> {
    item.iter()
        .map(|(k, v)| (k.clone(), convert_value(v)))
        .collect()
}

fn convert_value(value: &StreamValue) -> DdbValue {
    match value {
        StreamValue::S(s) => DdbValue::S(s.clone()),
        StreamValue::N(n) => DdbValue::N(n.clone()),
        StreamValue::B(b) => DdbValue::B(b.clone()),
        StreamValue::Bool(b) => DdbValue::Bool(*b),
        StreamValue::Null(b) => DdbValue::Null(*b),
        StreamValue::Ss(v) => DdbValue::Ss(v.clone()),
        StreamValue::Ns(v) => DdbValue::Ns(v.clone()),
        StreamValue::Bs(v) => DdbValue::Bs(v.clone()),
        StreamValue::L(v) => DdbValue::L(v.iter().map(convert_value).collect()),
        StreamValue::M(m) => DdbValue::M(convert_item(m)),
        // A type added to the service after this SDK: keep the record decodable as "unknown",
        // so the event decoder reports it as a mistyped attribute (a poison record), not a panic.
        _ => DdbValue::Null(true),
    }
}

/// Renders a Streams attribute value as DynamoDB JSON (`{"S":"…"}`; binary as base64), the form
/// Lambda receives.
pub fn value_json(value: &StreamValue) -> serde_json::Value {
    use base64::Engine;
    use serde_json::json;
    let b64 =
        |b: &aws_smithy_types::Blob| base64::engine::general_purpose::STANDARD.encode(b.as_ref());
    match value {
        StreamValue::S(s) => json!({ "S": s }),
        StreamValue::N(n) => json!({ "N": n }),
        StreamValue::B(b) => json!({ "B": b64(b) }),
        StreamValue::Bool(b) => json!({ "BOOL": b }),
        StreamValue::Null(b) => json!({ "NULL": b }),
        StreamValue::Ss(v) => json!({ "SS": v }),
        StreamValue::Ns(v) => json!({ "NS": v }),
        StreamValue::Bs(v) => json!({ "BS": v.iter().map(b64).collect::<Vec<_>>() }),
        StreamValue::L(v) => json!({ "L": v.iter().map(value_json).collect::<Vec<_>>() }),
        StreamValue::M(m) => json!({ "M": item_json(m) }),
        _ => json!({ "NULL": true }),
    }
}

/// An item as DynamoDB JSON.
pub fn item_json(item: &HashMap<String, StreamValue>) -> serde_json::Value {
    serde_json::Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lineage order puts parents first, keeps unrelated shards' order, and treats a parent that
    /// is no longer listed as done.
    #[test]
    fn lineage_order() {
        let shard = |id: &str, parent: Option<&str>| ShardInfo {
            shard_id: id.into(),
            parent_shard_id: parent.map(str::to_string),
        };
        let mut shards = vec![
            shard("c2", Some("c1")),
            shard("c1", Some("root")),
            shard("orphan", Some("trimmed")),
            shard("root", None),
        ];
        order_by_lineage(&mut shards);
        let ids: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
        assert_eq!(ids, vec!["orphan", "root", "c1", "c2"]);
    }

    /// Streams values convert to the DynamoDB SDK's, recursively, and render as DynamoDB JSON.
    #[test]
    fn converts_values() {
        let item = HashMap::from([
            ("s".to_string(), StreamValue::S("x".into())),
            ("n".to_string(), StreamValue::N("3".into())),
            (
                "m".to_string(),
                StreamValue::M(HashMap::from([("b".to_string(), StreamValue::Bool(true))])),
            ),
        ]);
        let converted = convert_item(&item);
        assert_eq!(converted.get("s"), Some(&DdbValue::S("x".into())));
        assert_eq!(
            converted.get("m"),
            Some(&DdbValue::M(HashMap::from([(
                "b".to_string(),
                DdbValue::Bool(true)
            )])))
        );
        let json = item_json(&item);
        assert_eq!(json["n"], serde_json::json!({"N": "3"}));
        assert_eq!(json["m"]["M"]["b"], serde_json::json!({"BOOL": true}));
    }
}
