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
//! A transient store failure (throttling, a 5xx, a timeout — what the adapter still reports as
//! `Unavailable` after its own retries) does not fail the batch at once: the handler retries the
//! whole batch inside the invocation with a capped exponential backoff, for as long as the
//! invocation's deadline (minus [`DEADLINE_MARGIN`] to answer in time) allows ([`InvocationRetry`]).
//! Every retry is idempotent (version-conditioned writes), and a retry inside the invocation
//! costs nothing Lambda would not spend anyway, while a failed invocation costs a whole
//! re-invocation and counts towards the record's age.
//!
//! The payload is taken as raw JSON and each record is parsed on its own, so one malformed record
//! cannot fail the deserialisation of the whole batch (which Lambda would retry whole, forever
//! naming no culprit).

use std::future::Future;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodbstreams::types::Record;
use domain::store::StoreError;
use domain::EventEnvelope;
use serde_json::{json, Value};
use store_dynamodb::envelope_from_json_image;
use tokio::time::Instant;

/// The `projector-lambda` function's settings (environment only in practice; flags work for
/// local runs).
#[derive(Debug, clap::Parser)]
#[command(
    name = "projector-lambda",
    about = "Sandbox Broker projector Lambda handler"
)]
pub struct LambdaConfig {
    /// Store selection and options.
    #[command(flatten)]
    pub store: runtime::StoreArgs,
}

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
    /// Times the batch was tried again after a transient failure, within the invocation.
    pub retries: u32,
}

/// How long before the invocation's deadline the handler stops retrying: time to log and answer
/// (a timed-out invocation reports no `batchItemFailures` and is retried whole, bisected).
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);
/// First pause before retrying a batch inside the invocation.
pub const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest pause between two tries inside the invocation.
pub const RETRY_CAP: Duration = Duration::from_secs(5);

/// Retries of transient failures inside one invocation: capped exponential backoff while the
/// next try still starts before the deadline minus a margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationRetry {
    /// When the invocation ends; `None`: no retries.
    pub deadline: Option<Instant>,
    /// Kept free before the deadline.
    pub margin: Duration,
    /// First pause.
    pub base: Duration,
    /// Longest pause.
    pub cap: Duration,
}

impl InvocationRetry {
    /// No retries: the first failure is reported (callers without a deadline, tests).
    pub fn none() -> Self {
        Self {
            deadline: None,
            margin: DEADLINE_MARGIN,
            base: RETRY_BASE,
            cap: RETRY_CAP,
        }
    }

    /// Retries until `deadline` minus [`DEADLINE_MARGIN`].
    pub fn until(deadline: Instant) -> Self {
        Self {
            deadline: Some(deadline),
            ..Self::none()
        }
    }

    /// Retries until the Lambda context's deadline (wall-clock) minus [`DEADLINE_MARGIN`].
    pub fn until_wall_clock(deadline: SystemTime) -> Self {
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Self::until(Instant::now() + left)
    }

    /// The pause before try number `retry + 2` (the `retry + 1`-th retry) at `now`, or `None`
    /// when that try would start after the deadline minus the margin.
    pub fn next_delay(&self, retry: u32, now: Instant) -> Option<Duration> {
        let deadline = self.deadline?;
        let stop_at = deadline.checked_sub(self.margin)?;
        let delay = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.cap);
        (now + delay <= stop_at).then_some(delay)
    }

    /// Runs `attempt` until it succeeds, fails with a non-transient error, or the deadline
    /// leaves no room for another try; returns the last result and the number of retries.
    pub async fn run<T, F, Fut>(&self, mut attempt: F) -> (Result<T, StoreError>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut retries = 0;
        loop {
            match attempt().await {
                Err(StoreError::Unavailable(reason)) => {
                    let Some(delay) = self.next_delay(retries, Instant::now()) else {
                        return (Err(StoreError::Unavailable(reason)), retries);
                    };
                    tracing::warn!(target: "projector", retry = retries + 1, delay_ms = delay.as_millis() as u64,
                        error = %reason, "transient store failure; retrying the batch within the invocation");
                    tokio::time::sleep(delay).await;
                    retries += 1;
                }
                other => return (other, retries),
            }
        }
    }
}

/// Applies one Lambda DynamoDB stream event without retries; returns the partial-batch response.
pub async fn handle_event(projector: &Projector, payload: Value) -> DynamoDbEventResponse {
    handle_event_within(projector, payload, &InvocationRetry::none()).await
}

/// Applies one Lambda DynamoDB stream event, retrying transient failures as `retry` allows;
/// returns the partial-batch response.
pub async fn handle_event_within(
    projector: &Projector,
    payload: Value,
    retry: &InvocationRetry,
) -> DynamoDbEventResponse {
    let outcome = apply_batch_within(projector, &payload, retry).await;
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
/// No retries: see [`apply_batch_within`].
pub async fn apply_batch(projector: &Projector, payload: &Value) -> BatchOutcome {
    apply_batch_within(projector, payload, &InvocationRetry::none()).await
}

/// [`apply_batch`], retrying the whole batch after a transient failure as `retry` allows.
pub async fn apply_batch_within(
    projector: &Projector,
    payload: &Value,
    retry: &InvocationRetry,
) -> BatchOutcome {
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
    let (result, retries) = retry.run(|| projector.apply_batch(&envelopes, None)).await;
    outcome.retries = retries;
    match result {
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
        retries = outcome.retries,
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
            let retry = InvocationRetry::until_wall_clock(event.context.deadline());
            async move {
                Ok::<DynamoDbEventResponse, lambda_runtime::Error>(
                    handle_event_within(&projector, event.payload, &retry).await,
                )
            }
        },
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::model::events::SandboxEvent;
    use domain::{Actor, CommandMeta, EventEnvelope, PoolView};
    use std::sync::Arc;
    use store_dynamodb::envelope_to_item;
    use store_embedded::EmbeddedStore;

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

    /// The backoff doubles up to its cap, and no retry is planned that would start after the
    /// deadline minus the margin (manual instants: nothing sleeps).
    #[test]
    fn retry_delays_stop_before_the_deadline() {
        let start = Instant::now();
        let retry = InvocationRetry {
            deadline: Some(start + Duration::from_secs(10)),
            margin: Duration::from_secs(2),
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(retry.next_delay(0, start), Some(Duration::from_millis(100)));
        assert_eq!(retry.next_delay(1, start), Some(Duration::from_millis(200)));
        assert_eq!(retry.next_delay(9, start), Some(Duration::from_secs(1)));
        // 7.5 s in: a 1 s pause would end at 8.5 s, past 10 s − 2 s.
        assert_eq!(
            retry.next_delay(9, start + Duration::from_millis(7_500)),
            None
        );
        assert_eq!(
            retry.next_delay(0, start + Duration::from_millis(7_900)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(InvocationRetry::none().next_delay(0, start), None);
        // A deadline closer than the margin leaves no retry at all.
        assert_eq!(
            InvocationRetry::until(start + Duration::from_secs(1)).next_delay(0, start),
            None
        );
    }

    /// Transient failures are retried until the try succeeds; a failure that is not transient
    /// is returned at once; with a short deadline the retries end before it.
    #[tokio::test]
    async fn transient_failures_are_retried_within_the_deadline() {
        let quick = |deadline: Duration| InvocationRetry {
            deadline: Some(Instant::now() + deadline),
            margin: Duration::from_millis(50),
            base: Duration::from_millis(1),
            cap: Duration::from_millis(10),
        };
        let tries = std::sync::atomic::AtomicU32::new(0);
        let (result, retries) = quick(Duration::from_secs(60))
            .run(|| {
                let n = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(StoreError::Unavailable("throttled".into()))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!((result, retries), (Ok(3), 3));

        let (result, retries) = quick(Duration::from_secs(60))
            .run(|| async { Err::<(), _>(StoreError::Corrupt("bad item".into())) })
            .await;
        assert_eq!(
            (result, retries),
            (Err(StoreError::Corrupt("bad item".into())), 0)
        );

        let retry = quick(Duration::from_millis(300));
        let deadline = retry.deadline.unwrap_or_else(Instant::now);
        let (result, retries) = retry
            .run(|| async { Err::<(), _>(StoreError::Unavailable("down".into())) })
            .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert!(retries > 1, "retried {retries} times");
        assert!(Instant::now() < deadline, "retried past the deadline");
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
