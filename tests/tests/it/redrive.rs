//! `projector redrive` on DynamoDB Local's real stream: a batch the Lambda gave up on (its
//! events never reached the view) is re-applied from the shard named in the on-failure message,
//! or — when the stream no longer holds it — re-projected from the event table through the
//! message's arrival window; the view converges (zero drift) and a second redrive changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::model::sandbox::SandboxCommand;
use domain::store::{EventStore, PoolView};
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, PoolRow, SandboxStatus, SystemClock,
};
use projector::cli::redrive_store;
use projector::dynamo_streams::DynamoStreams;
use projector::poller::{IteratorStart, PollerConfig, StreamApi, StreamPoller, StreamRecord};
use projector::rebuild::{
    all_rows, normalize_row, verify, DriftReport, RebuildOptions, RebuildProgress,
};
use projector::redrive::{parse_messages, RedriveOptions};
use projector::{Projector, ProjectorMetrics};
use serde_json::{json, Value};
use store_dynamodb::DynamoStore;
use store_embedded::EmbeddedStore;
use tests::ddb_local;
use tests::tee_events::TeeEvents;

/// Commands against the event table only: candidates come from a private, always-current view,
/// so the DynamoDB view sees nothing until a projector applies the stream.
struct Workload {
    broker: Broker,
    tag: String,
}

impl Workload {
    fn new(events: Arc<dyn EventStore>) -> Self {
        let candidates =
            EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("candidate view: {e}"));
        let tee = Arc::new(TeeEvents::new(events, candidates.clone()));
        Self {
            broker: Broker::new(
                tee,
                Arc::new(candidates),
                Arc::new(SystemClock),
                BrokerConfig::default(),
            ),
            tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }

    fn admin() -> CommandMeta {
        CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: Some("redrive-test".into()),
        }
    }

    /// Registers sandboxes `from..to`.
    async fn register(&self, from: usize, to: usize) {
        for n in from..to {
            let id = format!("{}-{n}", self.tag);
            self.broker
                .execute(
                    &id,
                    SandboxCommand::Register {
                        sandbox_id: id.clone(),
                        name: format!("lab-{n:04}"),
                        external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                        sfdc_account_id: None,
                        csp_created_at: None,
                    },
                    &Self::admin(),
                )
                .await
                .unwrap_or_else(|e| panic!("register {id}: {e}"));
        }
    }

    /// Allocates one sandbox to each of callers `from..to`; marks every second one for deletion.
    async fn allocate(&self, from: usize, to: usize) {
        for n in from..to {
            let caller = format!("student-{}-{n}", self.tag);
            let track = CommandMeta {
                actor: Actor::Track(caller.clone()),
                ..Self::admin()
            };
            let request = AllocateRequest {
                caller: caller.clone(),
                track_name: Some("redrive-test".into()),
                ..AllocateRequest::default()
            };
            let allocation = self
                .broker
                .allocate(&request, &track)
                .await
                .unwrap_or_else(|e| panic!("allocate for {caller}: {e}"));
            if n % 2 == 0 {
                self.broker
                    .mark_for_deletion(&allocation.sandbox.sandbox_id, &caller, &Self::admin())
                    .await
                    .unwrap_or_else(|e| panic!("mark for {caller}: {e}"));
            }
        }
    }
}

fn fast_poller_config() -> PollerConfig {
    PollerConfig {
        batch_size: 100,
        idle_min: Duration::from_millis(10),
        idle_max: Duration::from_millis(50),
        discover_every: Duration::from_secs(1),
        ..PollerConfig::default()
    }
}

async fn verify_view(store: &DynamoStore) -> DriftReport {
    let scratch = EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("scratch: {e}"));
    verify(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        Arc::new(scratch),
        &RebuildOptions::default(),
        Arc::new(RebuildProgress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("verify: {e}"))
}

/// Every row at the view's precision.
async fn rows_of(view: &dyn PoolView) -> BTreeMap<String, PoolRow> {
    all_rows(view, 100)
        .await
        .unwrap_or_else(|e| panic!("rows: {e}"))
        .into_iter()
        .map(|(id, row)| (id, normalize_row(&row)))
        .collect()
}

/// Zero drift, and the stats equal the rows counted by status.
async fn assert_converged(store: &DynamoStore) {
    let report = verify_view(store).await;
    assert!(report.is_clean(), "drift: {:#?}", report.differences);
    let rows = rows_of(store).await;
    let stats = store.stats().await.unwrap_or_else(|e| panic!("stats: {e}"));
    for status in SandboxStatus::ALL {
        let counted = rows.values().filter(|r| r.status == status).count() as i64;
        assert_eq!(stats.get(status), counted, "stats of {}", status.as_str());
    }
}

/// Polls the stream until the view holds every event so far (bounded: 5 minutes on a loaded
/// machine).
async fn project_everything(store: &DynamoStore) {
    let streams = DynamoStreams::for_store(store)
        .await
        .unwrap_or_else(|e| panic!("stream: {e}"));
    let projector = Projector::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        ProjectorMetrics::unregistered(),
    );
    let mut poller = StreamPoller::new(streams, projector, fast_poller_config());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        poller
            .drain(50)
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"));
        if verify_view(store).await.is_clean() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poller did not converge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every shard's records, read from the horizon to the shard's current end.
async fn shard_records(streams: &DynamoStreams) -> Vec<(String, Vec<StreamRecord>)> {
    let shards = streams
        .list_shards()
        .await
        .unwrap_or_else(|e| panic!("shards: {e}"));
    let mut out = Vec::new();
    for shard in shards {
        let mut records = Vec::new();
        let mut iterator = Some(
            streams
                .shard_iterator(&shard.shard_id, &IteratorStart::TrimHorizon)
                .await
                .unwrap_or_else(|e| panic!("iterator: {e}")),
        );
        while let Some(it) = iterator.take() {
            let page = streams
                .get_records(&it, 1000)
                .await
                .unwrap_or_else(|e| panic!("records: {e}"));
            if page.records.is_empty() {
                break;
            }
            records.extend(page.records);
            iterator = page.next_iterator;
        }
        out.push((shard.shard_id, records));
    }
    out
}

/// The on-failure message Lambda sends for a batch of `records` of `shard_id`, as an SQS message
/// inside `aws sqs receive-message` output (what an operator pipes into redrive).
fn sqs_output(
    shard_id: &str,
    records: &[StreamRecord],
    stream_arn: &str,
    window: (DateTime<Utc>, DateTime<Utc>),
) -> String {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        panic!("an empty batch");
    };
    let arrival = |r: &StreamRecord, fallback: DateTime<Utc>| {
        r.created_at
            .unwrap_or(fallback)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let body = json!({
        "requestContext": {
            "requestId": uuid::Uuid::new_v4().to_string(),
            "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:projector",
            "condition": "RecordAgeExceeded",
            "approximateInvokeCount": 4
        },
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "version": "1.0",
        "timestamp": Utc::now().to_rfc3339(),
        "DDBStreamBatchInfo": {
            "shardId": shard_id,
            "startSequenceNumber": first.sequence_number,
            "endSequenceNumber": last.sequence_number,
            "approximateArrivalOfFirstRecord": arrival(first, window.0),
            "approximateArrivalOfLastRecord": arrival(last, window.1),
            "batchSize": records.len(),
            "streamArn": stream_arn
        }
    });
    json!({"Messages": [{
        "MessageId": uuid::Uuid::new_v4().to_string(),
        "ReceiptHandle": "handle",
        "MD5OfBody": "-",
        "Body": body.to_string()
    }]})
    .to_string()
}

/// Projects a first workload, then writes a second one the view never sees (the batch the
/// Lambda gave up on). Returns the shard and the missed records.
async fn view_missing_a_batch(
    store: &DynamoStore,
) -> (
    DynamoStreams,
    String,
    Vec<StreamRecord>,
    (DateTime<Utc>, DateTime<Utc>),
) {
    let workload = Workload::new(Arc::new(store.clone()));
    workload.register(0, 12).await;
    workload.allocate(0, 4).await;
    project_everything(store).await;
    let streams = DynamoStreams::for_store(store)
        .await
        .unwrap_or_else(|e| panic!("stream: {e}"));
    let seen: usize = shard_records(&streams)
        .await
        .iter()
        .map(|(_, r)| r.len())
        .sum();

    let started = Utc::now();
    workload.register(12, 16).await;
    workload.allocate(4, 10).await;
    let ended = Utc::now();
    let report = verify_view(store).await;
    assert!(
        !report.is_clean(),
        "the view was meant to miss the second batch"
    );

    let shards = shard_records(&streams).await;
    let total: usize = shards.iter().map(|(_, r)| r.len()).sum();
    let Some((shard_id, records)) = shards.into_iter().find(|(_, r)| !r.is_empty()) else {
        panic!("no shard holds records");
    };
    assert_eq!(records.len(), total, "DynamoDB Local writes one shard");
    let missed = records[seen..].to_vec();
    assert!(!missed.is_empty());
    (streams, shard_id, missed, (started, ended))
}

/// The failed batch is read back from its shard between the message's sequence numbers and
/// applied: zero drift, stats equal rows; a second redrive of the same message changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_reapplies_a_failed_batch_from_the_stream() {
    let store = ddb_local::fresh_store(4).await;
    let (streams, shard_id, missed, window) = view_missing_a_batch(&store).await;
    let input = sqs_output(&shard_id, &missed, streams.stream_arn(), window);
    let parsed = parse_messages(&input);
    assert_eq!(parsed.batches.len(), 1, "{:?}", parsed.unreadable);

    let summary = redrive_store(&store, &parsed, &RedriveOptions::default())
        .await
        .unwrap_or_else(|e| panic!("redrive: {e:#}"));
    assert!(summary.is_clean(), "{:?}", summary.failures);
    assert_eq!((summary.messages, summary.from_stream), (1, 1));
    assert_eq!(summary.from_event_table, 0);
    assert_eq!(summary.records_read, missed.len());
    assert!(summary.records_reapplied > 0);
    assert_converged(&store).await;

    let rows = rows_of(&store).await;
    let again = redrive_store(&store, &parsed, &RedriveOptions::default())
        .await
        .unwrap_or_else(|e| panic!("second redrive: {e:#}"));
    assert!(again.is_clean(), "{:?}", again.failures);
    assert_eq!(again.records_reapplied, 0, "a second redrive applied again");
    assert_eq!(again.records_read, missed.len());
    assert_eq!(rows_of(&store).await, rows);
    assert_converged(&store).await;
}

/// A message naming a shard the stream no longer holds falls back to the event table: every
/// sandbox with an event in the arrival window is re-projected; through the CLI (a file of
/// `aws sqs receive-message` output) the run exits 0, a second run changes nothing, and a
/// message without arrival times that cannot be read back exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_falls_back_to_the_event_table_when_the_stream_is_trimmed() {
    let store = ddb_local::fresh_store(4).await;
    let (streams, _shard_id, missed, window) = view_missing_a_batch(&store).await;
    let gone = "shardId-00000001000000000000-0000dead";
    let input = sqs_output(gone, &missed, streams.stream_arn(), window);

    let summary = redrive_store(&store, &parse_messages(&input), &RedriveOptions::default())
        .await
        .unwrap_or_else(|e| panic!("redrive: {e:#}"));
    assert!(summary.is_clean(), "{:?}", summary.failures);
    assert_eq!((summary.from_stream, summary.from_event_table), (0, 1));
    assert!(summary.streams_repaired > 0, "{summary:?}");
    assert_converged(&store).await;

    let endpoint = ddb_local::endpoint().await;
    let file = std::env::temp_dir().join(format!("redrive-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, &input).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let run = |path: &std::path::Path| {
        let cli = <projector::cli::Cli as clap::Parser>::parse_from([
            "projector",
            "redrive",
            path.to_str().unwrap_or_default(),
            "--store",
            "dynamodb",
            "--table-prefix",
            store.table_prefix(),
            "--ddb-endpoint-url",
            endpoint.as_str(),
            "--aws-region",
            "us-east-1",
        ]);
        projector::cli::run(cli, std::future::pending())
    };
    let rows = rows_of(&store).await;
    assert_eq!(run(&file).await, std::process::ExitCode::SUCCESS);
    assert_eq!(
        rows_of(&store).await,
        rows,
        "a second redrive changed the view"
    );

    let mut no_window: Value = serde_json::from_str(&input).unwrap_or_else(|e| panic!("{e}"));
    let body = no_window["Messages"][0]["Body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
    if let Some(info) = body["DDBStreamBatchInfo"].as_object_mut() {
        info.remove("approximateArrivalOfFirstRecord");
        info.remove("approximateArrivalOfLastRecord");
    }
    no_window["Messages"][0]["Body"] = Value::String(body.to_string());
    std::fs::write(&file, no_window.to_string())
        .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    assert_eq!(
        run(&file).await,
        std::process::ExitCode::from(projector::cli::EXIT_NOT_APPLIED)
    );
    let _ = std::fs::remove_file(&file);
}
