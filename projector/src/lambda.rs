//! The AWS Lambda source (`projector-lambda`): the event source mapping hands the function a
//! batch of stream records; the handler applies them as one batch through
//! [`Projector::apply_batch`] and reports partial batch failures (`ReportBatchItemFailures`, terraform/projector.tf).
//!
//! Contract with Lambda: `batchItemFailures` names the *first* record that was not applied; Lambda
//! checkpoints everything before it and retries from it (so the rest of the batch is retried too,
//! and was deliberately not attempted — applying past a failed record would only produce gaps to
//! repair). A record that can never be applied (undecodable image, corrupt payload) is reported
//! the same way: after the mapping's bounded retries and bisection it lands in the on-failure
//! queue. The handler itself never fails the invocation and never panics, whatever the payload.
//!
//! The payload is taken as raw JSON and each record is parsed on its own, so one malformed record
//! cannot fail the deserialisation of the whole batch (which Lambda would retry whole, forever
//! naming no culprit).

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodbstreams::types::Record;
use domain::adapters::dynamo::envelope_from_json_image;
use domain::EventEnvelope;
use serde_json::{json, Value};

use crate::dynamo_streams::item_json;
use crate::Projector;

/// What one invocation did (also logged, one line per batch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records in the batch.
    pub records: usize,
    /// Events that changed the view.
    pub applied: usize,
    /// Records already applied (redeliveries) or not about the pool view.
    pub skipped: usize,
    /// Sequence number of the first record not applied, if any.
    pub failed_at: Option<String>,
}

/// Applies one Lambda DynamoDB stream event; returns the partial-batch response.
pub async fn handle_event(projector: &Projector, payload: Value) -> DynamoDbEventResponse {
    let outcome = apply_batch(projector, &payload).await;
    let mut response = DynamoDbEventResponse::default();
    if let Some(sequence_number) = outcome.failed_at {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = Some(sequence_number);
        response.batch_item_failures.push(failure);
    }
    response
}

/// The handler's work, without the response wrapping (unit tests look at the counts). The
/// records up to the first undecodable one are applied as one batch ([`Projector::apply_batch`]:
/// rows loaded together, rows + summed stats in as few transactions as the item limit allows).
pub async fn apply_batch(projector: &Projector, payload: &Value) -> BatchOutcome {
    let Some(records) = payload.get("Records").and_then(Value::as_array) else {
        tracing::error!(target: "projector", "invocation payload has no Records array; nothing to apply");
        return BatchOutcome::default();
    };
    let mut outcome = BatchOutcome {
        records: records.len(),
        ..BatchOutcome::default()
    };
    let mut envelopes = Vec::with_capacity(records.len());
    let mut record_of = Vec::with_capacity(records.len());
    // (index of the first record not applied, why)
    let mut first_failure: Option<(usize, String)> = None;
    for (index, raw) in records.iter().enumerate() {
        match decode_record(raw) {
            Ok(Some(envelope)) => {
                envelopes.push(envelope);
                record_of.push(index);
            }
            Ok(None) => outcome.skipped += 1,
            Err(reason) => {
                // Nothing after it is attempted: Lambda retries from this record anyway.
                first_failure = Some((index, reason));
                break;
            }
        }
    }
    match projector.apply_batch(&envelopes, None).await {
        Ok(report) => {
            outcome.applied = report.applied;
            outcome.skipped += report.duplicates + report.ignored;
            if let Some((index, reason)) = report.poison.first() {
                let index = record_of.get(*index).copied().unwrap_or(0);
                if first_failure.as_ref().is_none_or(|(at, _)| index < *at) {
                    first_failure = Some((index, reason.clone()));
                }
            }
        }
        Err(e) => {
            // Chunks that committed are skipped as duplicates when Lambda retries the batch.
            first_failure = Some((0, e.to_string()));
        }
    }
    if let Some((index, reason)) = first_failure {
        let raw = records.get(index).unwrap_or(&Value::Null);
        let sequence_number = raw
            .pointer("/dynamodb/SequenceNumber")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        tracing::error!(target: "projector",
            sequence_number = %sequence_number,
            keys = %describe_json_keys(raw.pointer("/dynamodb/Keys")),
            error = %reason,
            "stream record not applied; reporting it as the batch's first failure");
        // An empty identifier makes Lambda retry the whole batch: the right thing for a
        // record so malformed that it has no sequence number.
        outcome.failed_at = Some(sequence_number);
    }
    tracing::info!(target: "projector",
        records = outcome.records,
        applied = outcome.applied,
        skipped = outcome.skipped,
        failed = outcome.failed_at.is_some(),
        lag_ms = projector.metrics().last_lag_ms(),
        "applied");
    outcome
}

/// Decodes one record: `Ok(None)` for anything but an insert, `Err` with why it can never apply.
fn decode_record(raw: &Value) -> Result<Option<EventEnvelope>, String> {
    let record: EventRecord = serde_json::from_value(raw.clone())
        .map_err(|e| format!("not a DynamoDB stream record: {e}"))?;
    if record.event_name != "INSERT" {
        // Event items are only ever inserted; a MODIFY/REMOVE is a manual change, and the event
        // table stays the truth (`projector verify` would show its effect).
        return Ok(None);
    }
    let image = serde_json::to_value(&record.change.new_image)
        .map_err(|e| format!("NewImage is not DynamoDB JSON: {e}"))?;
    envelope_from_json_image(&image)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// `name=value` pairs of a DynamoDB JSON key, for logs.
pub fn describe_json_keys(keys: Option<&Value>) -> String {
    let Some(map) = keys.and_then(Value::as_object) else {
        return "?".into();
    };
    let mut pairs: Vec<String> = map
        .iter()
        .map(|(name, typed)| {
            let value = typed
                .as_object()
                .and_then(|o| o.values().next())
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| typed.to_string());
            format!("{name}={value}")
        })
        .collect();
    pairs.sort();
    pairs.join(",")
}

/// Builds the event Lambda would receive for `records` read from a stream (the event source
/// mapping's JSON shape: `Records[].dynamodb.{Keys,NewImage,SequenceNumber,…}` in DynamoDB JSON).
pub fn lambda_event(records: &[Record], stream_arn: &str, region: &str) -> Value {
    let records: Vec<Value> = records
        .iter()
        .map(|record| {
            let change = record.dynamodb();
            let created = change
                .and_then(|c| c.approximate_creation_date_time())
                .map(|t| t.as_secs_f64());
            json!({
                "eventID": record.event_id().unwrap_or_default(),
                "eventName": record.event_name().map(|n| n.as_str()).unwrap_or("INSERT"),
                "eventVersion": record.event_version().unwrap_or("1.1"),
                "eventSource": record.event_source().unwrap_or("aws:dynamodb"),
                "awsRegion": record.aws_region().unwrap_or(region),
                "eventSourceARN": stream_arn,
                "dynamodb": {
                    "ApproximateCreationDateTime": created,
                    "Keys": change.and_then(|c| c.keys()).map(item_json).unwrap_or_else(|| json!({})),
                    "NewImage": change.and_then(|c| c.new_image()).map(item_json).unwrap_or_else(|| json!({})),
                    "SequenceNumber": change.and_then(|c| c.sequence_number()),
                    "SizeBytes": change.and_then(|c| c.size_bytes()).unwrap_or_default(),
                    "StreamViewType": change
                        .and_then(|c| c.stream_view_type())
                        .map(|v| v.as_str())
                        .unwrap_or("NEW_IMAGE"),
                }
            })
        })
        .collect();
    json!({ "Records": records })
}

/// Serves the handler on the Lambda runtime API until the runtime stops the process.
pub async fn run(projector: Projector) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<Value>| {
            let projector = projector.clone();
            async move {
                Ok::<DynamoDbEventResponse, lambda_runtime::Error>(
                    handle_event(&projector, event.payload).await,
                )
            }
        },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::adapters::dynamo::envelope_to_item;
    use domain::adapters::embedded::EmbeddedStore;
    use domain::model::events::SandboxEvent;
    use domain::{Actor, CommandMeta, EventEnvelope, PoolView};
    use std::sync::Arc;

    use crate::ProjectorMetrics;

    fn registered(id: &str) -> EventEnvelope {
        EventEnvelope::new(
            &format!("sandbox#{id}"),
            1,
            &SandboxEvent::SandboxRegistered {
                sandbox_id: id.into(),
                name: format!("lab-{id}"),
                external_id: format!("identity/accounts/{id}"),
                sfdc_account_id: None,
                csp_created_at: None,
            },
            &CommandMeta {
                actor: Actor::Admin,
                request_id: None,
                correlation_id: None,
            },
            chrono::Utc::now(),
        )
    }

    /// DynamoDB JSON of an item written by the adapter (strings and numbers only).
    fn image(envelope: &EventEnvelope) -> Value {
        let item = envelope_to_item(envelope);
        Value::Object(
            item.iter()
                .map(|(k, v)| {
                    let typed = match v {
                        aws_sdk_dynamodb::types::AttributeValue::S(s) => json!({ "S": s }),
                        aws_sdk_dynamodb::types::AttributeValue::N(n) => json!({ "N": n }),
                        other => json!({ "S": format!("{other:?}") }),
                    };
                    (k.clone(), typed)
                })
                .collect(),
        )
    }

    fn record(seq: &str, new_image: Value) -> Value {
        json!({
            "eventID": format!("id-{seq}"),
            "eventName": "INSERT",
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:000000000000:table/t-events/stream/x",
            "dynamodb": {
                "ApproximateCreationDateTime": 1.7e9,
                "Keys": {"stream_id": {"S": "k"}, "version": {"N": "1"}},
                "NewImage": new_image,
                "SequenceNumber": seq,
                "SizeBytes": 100,
                "StreamViewType": "NEW_IMAGE"
            }
        })
    }

    fn projector(store: &EmbeddedStore) -> Projector {
        Projector::new(
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            ProjectorMetrics::unregistered(),
        )
    }

    /// A clean batch is applied in full and reports no failure; a redelivery applies nothing.
    #[tokio::test]
    async fn applies_batch_and_redelivery_is_a_no_op() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let p = projector(&store);
        let event = json!({"Records": [record("1", image(&registered("a"))), record("2", image(&registered("b")))]});
        let response = handle_event(&p, event.clone()).await;
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(store.stats().await?.total(), 2);
        let again = apply_batch(&p, &event).await;
        assert_eq!((again.applied, again.skipped), (0, 2));
        Ok(())
    }

    /// A poison record is the reported failure; records before it are applied, after it not.
    #[tokio::test]
    async fn poison_record_is_a_batch_item_failure() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let p = projector(&store);
        let event = json!({"Records": [
            record("1", image(&registered("a"))),
            record("2", json!({"stream_id": {"S": "sandbox#x"}, "garbage": {"Q": 1}})),
            record("3", image(&registered("c"))),
        ]});
        let response = handle_event(&p, event).await;
        let ids: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        assert_eq!(ids, vec![Some("2".to_string())]);
        assert_eq!(store.stats().await?.total(), 1);
        let as_json = serde_json::to_value(&response)?;
        assert_eq!(as_json["batchItemFailures"][0]["itemIdentifier"], "2");
        Ok(())
    }

    /// A record that is not even a stream record, or a payload without records, never panics.
    #[tokio::test]
    async fn malformed_payloads_do_not_panic() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let p = projector(&store);
        let response = handle_event(
            &p,
            json!({"Records": [{"dynamodb": {"SequenceNumber": "9"}}]}),
        )
        .await;
        assert_eq!(
            response.batch_item_failures[0].item_identifier.as_deref(),
            Some("9")
        );
        assert!(handle_event(&p, json!({"hello": 1}))
            .await
            .batch_item_failures
            .is_empty());
        assert!(handle_event(&p, json!("x"))
            .await
            .batch_item_failures
            .is_empty());
        Ok(())
    }

    /// Keys render as sorted name=value pairs.
    #[test]
    fn keys_render() {
        let keys = json!({"version": {"N": "3"}, "stream_id": {"S": "sandbox#1"}});
        assert_eq!(
            describe_json_keys(Some(&keys)),
            "stream_id=sandbox#1,version=3"
        );
        assert_eq!(describe_json_keys(None), "?");
    }
}
