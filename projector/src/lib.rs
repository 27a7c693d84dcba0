//! Sandbox Broker's projector: the only writer of the read side. It applies every event of the
//! event table, from whichever source delivers it, a delivered batch at a time
//! ([`Projector::apply_batch`]: one consistent load of the batch's rows, the pure `project`
//! function folded per sandbox, version-conditioned row writes with the stats summed per shard
//! and the checkpoint in as few atomic writes as the store allows), repairs gaps by reading the
//! missing events back from the event table, and measures how far the view lags.
//!
//! Three thin sources feed the same [`Projector::apply_batch`]: the DynamoDB Streams poller, the
//! AWS Lambda handler and the embedded log tail. Rebuild and verify replay the event table through
//! it too, so every path produces the same view from the same events. [`Projector::apply`], one
//! event per write, remains for callers that hold a single event.
//!
//! # Layout
//! - [`Projector`] (this file) — single-event apply with read repair; lag metrics.
//! - [`batch`] — the batched apply and its [`batch::BatchReport`] (ADR 0011).
//! - [`metrics`] — Prometheus series of the projector (lag histogram and gauge, outcomes,
//!   stream iterator age).
//! - [`embedded`] — tails the embedded store's log in-process, checkpointing its position.
//! - [`poller`] — the DynamoDB Streams poller: shard lineage, iterators from checkpoints,
//!   expiry/trim recovery, per-shard checkpoints, graceful shutdown (over a [`poller::StreamApi`]).
//! - [`dynamo_streams`] — the `aws-sdk-dynamodbstreams` implementation of that API, stream ARN
//!   lookup, record conversion and raw capture.
//! - [`lambda`] — the Lambda handler: in-order apply, `batchItemFailures`, poison records; the
//!   function's settings.
//! - [`audit_cli`] — the `broker-audit` command line (export, replay at an instant, verify).
//! - [`rebuild`] — `rebuild_into` (parallel-scan replay into a fresh view) and `verify` (a
//!   `DriftReport` comparing a replay with the live view).
//! - [`repair`] — `verify --repair`: fixes every difference a drift report lists (rows behind
//!   their stream, corrupted rows, counters) through version-conditioned writes.
//! - [`redrive`] — `projector redrive`: re-applies the batches the Lambda's on-failure
//!   destination received, from the stream while it holds them, else from the event table.
//! - [`usage_cli`] — `broker-audit usage` over an export (the store path is
//!   `domain::usage::usage_from_feed`).
//! - [`erasure_cli`] — `broker-audit erase` and `lookup`: a student's subject record without a
//!   running API, by the rules of `domain::erasure`.
//! - [`cli`] — the `projector` command line (`poll`, `tables`, `rebuild`, `verify`, `redrive`,
//!   `capture`);
//!   the binaries in `src/main.rs` and `src/bin/projector-lambda.rs` only call into it. Store
//!   settings, logs, signals and the `/metrics` server come from the shared `runtime` crate.

pub mod audit_cli;
pub mod batch;
pub mod cli;
pub mod dynamo_streams;
pub mod embedded;
pub mod erasure_cli;
pub mod lambda;
pub mod metrics;
pub mod poller;
pub mod rebuild;
pub mod redrive;
pub mod repair;
pub mod usage_cli;

use std::sync::Arc;

use chrono::Utc;
use domain::store::{apply_event, ApplyOutcome, EventStore, StoreError, ViewStore};
use domain::EventEnvelope;

pub use metrics::ProjectorMetrics;

/// Applies events to the view, repairing gaps from the event store.
#[derive(Clone)]
pub struct Projector {
    events: Arc<dyn EventStore>,
    view: Arc<dyn ViewStore>,
    metrics: ProjectorMetrics,
    write_concurrency: usize,
}

/// Chunks of one batch written at once unless a source says otherwise.
pub const DEFAULT_WRITE_CONCURRENCY: usize = 4;

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector").finish_non_exhaustive()
    }
}

impl Projector {
    /// A projector writing `view` from `events`.
    pub fn new(
        events: Arc<dyn EventStore>,
        view: Arc<dyn ViewStore>,
        metrics: ProjectorMetrics,
    ) -> Self {
        Self {
            events,
            view,
            metrics,
            write_concurrency: DEFAULT_WRITE_CONCURRENCY,
        }
    }

    /// The same projector writing up to `chunks` chunks of one batch at once (DynamoDB writes
    /// are latency-bound; the chunk with the checkpoint is always written last, alone).
    pub fn with_write_concurrency(mut self, chunks: usize) -> Self {
        self.write_concurrency = chunks.max(1);
        self
    }

    /// The view it writes.
    pub fn view(&self) -> &Arc<dyn ViewStore> {
        &self.view
    }

    /// The event store it repairs from.
    pub fn events(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// Its metrics.
    pub fn metrics(&self) -> &ProjectorMetrics {
        &self.metrics
    }

    /// Applies one delivered event. Redeliveries are skipped; if the row is behind (a record was
    /// delivered out of order or lost), the missing versions are read from the event table and
    /// applied first, then this one — so any delivery order converges on the same view.
    pub async fn apply(&self, envelope: &EventEnvelope) -> Result<ApplyOutcome, StoreError> {
        let outcome = match apply_event(self.view.as_ref(), envelope).await? {
            ApplyOutcome::Gap { row_version } => {
                let missing = self
                    .events
                    .load_after(&envelope.stream_id, row_version)
                    .await?;
                self.metrics.repairs.inc();
                for event in missing.iter().filter(|e| e.version <= envelope.version) {
                    match apply_event(self.view.as_ref(), event).await? {
                        ApplyOutcome::Gap { row_version } => {
                            return Err(StoreError::Corrupt(format!(
                                "{} still has a gap at v{row_version} after repair",
                                event.stream_id
                            )))
                        }
                        outcome => self.metrics.record(outcome),
                    }
                }
                ApplyOutcome::Applied
            }
            outcome => {
                self.metrics.record(outcome);
                outcome
            }
        };
        let lag_ms = (Utc::now() - envelope.occurred_at)
            .num_milliseconds()
            .max(0);
        self.metrics.observe_lag(lag_ms);
        Ok(outcome)
    }
}
