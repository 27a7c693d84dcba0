//! The DynamoDB Streams source: a long-running poller over the event table's stream (DESIGN.md
//! §7), used by `projector poll` (DynamoDB Local, or AWS without the Lambda mapping).
//!
//! One round: (re)discover shards when due, then for every *ready* shard — open or closed, whose
//! parent is fully applied or no longer listed — fetch one `GetRecords` batch and apply it whole
//! through [`Projector::apply_batch`]: the batch's rows loaded with `BatchGetItem`, each
//! sandbox's events folded, and the rows, summed stats and the shard's checkpoint (the batch's
//! last sequence number) written in as few `TransactWriteItems` as the 100-item limit allows.
//! Shards are polled concurrently.
//!
//! Why lineage matters: after a split, a partition key's older records are in the parent shard and
//! its newer ones in a child. Reading a child first would make every row look like it has a gap;
//! read repair would still converge, but at the price of one event-table query per row. Reading
//! parents to their end first keeps the stream's own order and repair for genuine losses only.
//!
//! Failure handling:
//! - an expired iterator (15 minutes unused) is re-acquired `AFTER_SEQUENCE_NUMBER` of the last
//!   record applied, so nothing is skipped or re-applied needlessly;
//! - `TrimmedDataAccessException` (the position fell out of the 24-hour retention) restarts the
//!   shard at `TRIM_HORIZON` with a warning: events trimmed before they were applied are repaired
//!   when their stream's next event arrives, and `projector verify` finds any others;
//! - a record that cannot be decoded or applied for good (`StoreError::Corrupt`) is logged with its
//!   keys, counted as `outcome="poison"`, and skipped — a poller that stopped on it would stall
//!   its whole shard; the row catches up through read repair at that stream's next event;
//! - any other failure (throttling, network) fails the batch; the next round re-reads it from the
//!   shard's checkpoint after a backoff, and what of it had committed is skipped as duplicates.
//!
//! The checkpoint commits in the batch's last transaction (and `SHARD_END` marks a closed shard
//! read to its end), so a crash between two transactions of a batch re-reads the batch and
//! applies only what had not committed (ADR 0011).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use domain::store::batch::Checkpoint;
use domain::EventEnvelope;
use store_dynamodb::envelope_from_item;
use thiserror::Error;

use crate::Projector;

/// An item (or key) as the event table stores it.
pub type Item = HashMap<String, AttributeValue>;

/// The checkpoint value of a closed shard that was read to its end (sequence numbers are
/// digits, so it cannot collide with one).
pub const SHARD_END: &str = "SHARD_END";

/// A shard as `DescribeStream` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// `shardId-…`.
    pub shard_id: String,
    /// The shard it split from, if any.
    pub parent_shard_id: Option<String>,
}

/// One stream record, converted to the event table's attribute values.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// Position in its shard.
    pub sequence_number: String,
    /// `INSERT`, `MODIFY` or `REMOVE` (event items are only ever inserted).
    pub event_name: Option<String>,
    /// `ApproximateCreationDateTime`: when the item was written.
    pub created_at: Option<DateTime<Utc>>,
    /// The item's key (for logs).
    pub keys: Item,
    /// The item as written (`NEW_IMAGE` stream).
    pub new_image: Option<Item>,
}

/// One `GetRecords` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordBatch {
    /// Records, in shard order.
    pub records: Vec<StreamRecord>,
    /// Where to read next; `None` once a closed shard is exhausted.
    pub next_iterator: Option<String>,
}

/// Where a new shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IteratorStart {
    /// The oldest record still in the shard.
    TrimHorizon,
    /// Right after the given sequence number (the checkpoint).
    AfterSequence(String),
    /// At the given sequence number (`projector redrive`: the first record of a failed batch).
    AtSequence(String),
}

/// What went wrong talking to the stream.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum StreamError {
    /// The shard iterator is older than 15 minutes.
    #[error("shard iterator expired")]
    ExpiredIterator,
    /// The requested position is beyond the stream's retention.
    #[error("records trimmed from the stream")]
    Trimmed,
    /// The shard (or stream) no longer exists.
    #[error("shard or stream not found")]
    NotFound,
    /// Too many requests; back off.
    #[error("throttled: {0}")]
    Throttled(String),
    /// Anything else (network, credentials, service errors).
    #[error("stream error: {0}")]
    Other(String),
}

/// The three DynamoDB Streams calls the poller needs; [`DynamoStreams`] in production, a fake in
/// the unit tests (splits, expiry and trimming cannot be provoked on DynamoDB Local at will).
#[async_trait]
pub trait StreamApi: Send + Sync {
    /// Every shard of the stream, closed and open, across `DescribeStream` pages.
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, StreamError>;
    /// A fresh iterator for `shard_id`.
    async fn shard_iterator(
        &self,
        shard_id: &str,
        start: &IteratorStart,
    ) -> Result<String, StreamError>;
    /// Up to `limit` records from `iterator`.
    async fn get_records(&self, iterator: &str, limit: i32) -> Result<RecordBatch, StreamError>;
}

/// Tunables of the poller (each a `projector poll` flag with an environment variable).
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Records per `GetRecords` (`POLL_BATCH_SIZE`, default 1000, the service maximum).
    pub batch_size: i32,
    /// First pause after a round that found nothing (`POLL_IDLE_MIN_MS`, default 50 ms).
    pub idle_min: Duration,
    /// Longest pause when idle; doubled from `idle_min` per empty round (`POLL_IDLE_MAX_MS`,
    /// default 1,000 ms). AWS allows 5 `GetRecords` per second per shard, shared by all readers.
    pub idle_max: Duration,
    /// How often the shard list is refreshed even if no shard closed (`POLL_DISCOVER_EVERY_MS`,
    /// default 10 s). A shard that ends triggers a refresh at once.
    pub discover_every: Duration,
    /// Longest pause after failing rounds (default 5 s).
    pub error_backoff_max: Duration,
    /// Transactions of one batch written concurrently (`POLL_APPLY_CONCURRENCY`, default 16;
    /// 1 = one at a time). They hold disjoint rows; the one carrying the checkpoint is always
    /// written last, after all others committed.
    pub apply_concurrency: usize,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            idle_min: Duration::from_millis(50),
            idle_max: Duration::from_millis(1000),
            discover_every: Duration::from_secs(10),
            error_backoff_max: Duration::from_secs(5),
            apply_concurrency: 16,
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Shards polled.
    pub shards_polled: usize,
    /// Records received.
    pub records: usize,
    /// Events that changed the view.
    pub applied: usize,
    /// Records skipped as undecodable or unappliable.
    pub poison: usize,
    /// Shards whose batch stopped at a failure this round.
    pub failed_shards: usize,
}

#[derive(Debug, Default)]
struct ShardState {
    parent: Option<String>,
    iterator: Option<String>,
    /// Sequence number of the last record applied (or skipped as poison).
    position: Option<String>,
    /// What the checkpoint table holds for this shard.
    saved: Option<String>,
    finished: bool,
    /// Set when the shard's position was trimmed: restart at TRIM_HORIZON.
    from_horizon: bool,
    /// Age of the newest record of the last batch, ms (0 when the batch was empty).
    age_ms: i64,
}

/// The Streams poller. Owns its shard states; one instance per stream (two instances would both
/// apply every record — harmless, since applying is idempotent, but wasted).
pub struct StreamPoller<S> {
    api: S,
    projector: Projector,
    config: PollerConfig,
    shards: BTreeMap<String, ShardState>,
    last_discovery: Option<Instant>,
}

impl<S> std::fmt::Debug for StreamPoller<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPoller")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<S: StreamApi> StreamPoller<S> {
    /// A poller applying `api`'s records through `projector`; checkpoints go to the projector's
    /// view store.
    pub fn new(api: S, projector: Projector, config: PollerConfig) -> Self {
        let projector = projector.with_write_concurrency(config.apply_concurrency);
        Self {
            api,
            projector,
            config,
            shards: BTreeMap::new(),
            last_discovery: None,
        }
    }

    /// The projector it applies through.
    pub fn projector(&self) -> &Projector {
        &self.projector
    }

    /// Shard ids known, with whether each is finished (for tests and diagnostics).
    pub fn shards(&self) -> Vec<(String, bool)> {
        self.shards
            .iter()
            .map(|(id, s)| (id.clone(), s.finished))
            .collect()
    }

    /// Refreshes the shard list: new shards start from their checkpoint; shards no longer
    /// listed (trimmed after 24 hours) are forgotten.
    pub async fn discover(&mut self) -> Result<(), StreamError> {
        let listed = self.api.list_shards().await?;
        self.last_discovery = Some(Instant::now());
        let ids: HashSet<&str> = listed.iter().map(|s| s.shard_id.as_str()).collect();
        self.shards.retain(|id, state| {
            let keep = ids.contains(id.as_str());
            if !keep && !state.finished {
                tracing::warn!(target: "projector", shard = %id,
                    "shard left the stream before it was read to its end; run `projector verify`");
            }
            keep
        });
        for shard in listed {
            if self.shards.contains_key(&shard.shard_id) {
                continue;
            }
            let saved = self
                .projector
                .view()
                .checkpoint(&shard.shard_id)
                .await
                .map_err(|e| StreamError::Other(format!("read checkpoint: {e}")))?;
            let finished = saved.as_deref() == Some(SHARD_END);
            let position = saved.clone().filter(|_| !finished);
            self.shards.insert(
                shard.shard_id,
                ShardState {
                    parent: shard.parent_shard_id,
                    position,
                    saved,
                    finished,
                    ..ShardState::default()
                },
            );
        }
        Ok(())
    }

    /// Shards that may be read now: not finished, and their parent (if still listed) finished.
    fn ready(&self) -> HashSet<String> {
        self.shards
            .iter()
            .filter(|(_, s)| !s.finished)
            .filter(|(_, s)| match &s.parent {
                Some(parent) => self.shards.get(parent).is_none_or(|p| p.finished),
                None => true,
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// One round over every ready shard. `stop` asks it to finish the record in hand,
    /// checkpoint, and return.
    pub async fn poll_round(&mut self, stop: &AtomicBool) -> Result<RoundStats, StreamError> {
        let due = self
            .last_discovery
            .is_none_or(|at| at.elapsed() >= self.config.discover_every);
        if due {
            self.discover().await?;
        }
        let ready = self.ready();
        let Self {
            api,
            projector,
            config,
            shards,
            ..
        } = self;
        let polls = shards
            .iter_mut()
            .filter(|(id, _)| ready.contains(*id))
            .map(|(id, state)| poll_shard(&*api, projector, config, id, state, stop));
        let results = futures::future::join_all(polls).await;
        let mut stats = RoundStats::default();
        let mut first_error = None;
        let mut ended = false;
        for result in results {
            stats.shards_polled += 1;
            match result {
                Ok(shard) => {
                    stats.records += shard.records;
                    stats.applied += shard.applied;
                    stats.poison += shard.poison;
                    ended |= shard.ended;
                    if shard.failed {
                        stats.failed_shards += 1;
                    }
                }
                Err(e) => {
                    stats.failed_shards += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        let age = self.shards.values().map(|s| s.age_ms).max().unwrap_or(0);
        self.projector.metrics().iterator_age.set(age);
        if ended {
            // A closed shard was read to its end: its children may be listed now.
            self.last_discovery = None;
        }
        match first_error {
            Some(e) if stats.records == 0 => Err(e),
            Some(e) => {
                tracing::warn!(target: "projector", error = %e, "a shard failed this round");
                Ok(stats)
            }
            None => Ok(stats),
        }
    }

    /// Polls until a round reads no record (the stream is drained as far as the service shows),
    /// or `max_rounds` rounds; returns the total. For tests, benchmarks and one-shot catch-up.
    pub async fn drain(&mut self, max_rounds: usize) -> Result<RoundStats, StreamError> {
        let stop = AtomicBool::new(false);
        let mut total = RoundStats::default();
        // A catch-up must see shards created since the last periodic refresh.
        self.last_discovery = None;
        for _ in 0..max_rounds {
            let round = self.poll_round(&stop).await?;
            total.records += round.records;
            total.applied += round.applied;
            total.poison += round.poison;
            total.shards_polled = total.shards_polled.max(round.shards_polled);
            if round.records == 0 && round.failed_shards == 0 && self.last_discovery.is_some() {
                return Ok(total);
            }
        }
        Ok(total)
    }

    /// Runs until `shutdown` resolves: rounds back to back while records flow, a pause doubling
    /// from `idle_min` to `idle_max` while idle, and an error backoff up to `error_backoff_max`.
    /// On shutdown the round in progress finishes its current record, checkpoints, and returns.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let stop = AtomicBool::new(false);
        let mut idle = self.config.idle_min;
        let mut failures: u32 = 0;
        loop {
            let mut stopping = false;
            let result = {
                let round = self.poll_round(&stop);
                tokio::pin!(round);
                tokio::select! {
                    result = &mut round => result,
                    _ = &mut shutdown => {
                        stopping = true;
                        stop.store(true, Ordering::Relaxed);
                        round.await
                    }
                }
            };
            if stopping {
                if let Err(e) = result {
                    tracing::warn!(target: "projector", error = %e, "last round failed at shutdown");
                }
                tracing::info!(target: "projector", "poller stopped");
                return;
            }
            let pause = match result {
                Ok(stats) if stats.records > 0 => {
                    failures = 0;
                    idle = self.config.idle_min;
                    Duration::ZERO
                }
                Ok(stats) => {
                    if stats.failed_shards == 0 {
                        failures = 0;
                    }
                    let pause = idle;
                    idle = (idle * 2).min(self.config.idle_max);
                    pause
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = error_backoff(failures, self.config.error_backoff_max);
                    tracing::error!(target: "projector", error = %e, retry_in_ms = pause.as_millis() as u64,
                        "stream poll failed");
                    pause
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = &mut shutdown => {
                        tracing::info!(target: "projector", "poller stopped");
                        return;
                    }
                }
            }
        }
    }
}

/// Exponential backoff: 100 ms, 200 ms, … capped at `max`.
fn error_backoff(failures: u32, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(100u64.saturating_mul(1 << exp)).min(max)
}

#[derive(Debug, Default)]
struct ShardPoll {
    records: usize,
    applied: usize,
    poison: usize,
    ended: bool,
    failed: bool,
}

/// Reads and applies one batch of one shard.
async fn poll_shard(
    api: &dyn StreamApi,
    projector: &Projector,
    config: &PollerConfig,
    shard_id: &str,
    state: &mut ShardState,
    stop: &AtomicBool,
) -> Result<ShardPoll, StreamError> {
    let mut result = ShardPoll::default();
    if stop.load(Ordering::Relaxed) {
        return Ok(result);
    }
    // At most two tries: an expired or trimmed iterator is replaced once, then the round moves on.
    let mut batch = None;
    for _ in 0..2 {
        let iterator = match &state.iterator {
            Some(it) => it.clone(),
            None => match acquire_iterator(api, shard_id, state).await {
                Ok(Some(it)) => it,
                Ok(None) => {
                    // A closed shard with nothing after our position (or gone): done for good.
                    finish_shard(projector, shard_id, state).await?;
                    result.ended = true;
                    return Ok(result);
                }
                Err(e) => return Err(e),
            },
        };
        match api.get_records(&iterator, config.batch_size).await {
            Ok(b) => {
                batch = Some(b);
                break;
            }
            Err(StreamError::ExpiredIterator) => {
                tracing::info!(target: "projector", shard = %shard_id, "shard iterator expired; re-acquiring");
                state.iterator = None;
            }
            Err(StreamError::Trimmed) => {
                tracing::warn!(target: "projector", shard = %shard_id,
                    "records were trimmed before they were applied; restarting at TRIM_HORIZON (run `projector verify`)");
                state.iterator = None;
                state.from_horizon = true;
            }
            Err(StreamError::NotFound) => {
                finish_shard(projector, shard_id, state).await?;
                result.ended = true;
                return Ok(result);
            }
            Err(e) => return Err(e),
        }
    }
    let Some(batch) = batch else {
        return Ok(result);
    };
    result.records = batch.records.len();
    state.age_ms = 0;
    let applied = apply_records(projector, shard_id, &batch.records, stop).await;
    // The shard's position moves over the whole batch or not at all: a failed batch is read
    // again from the last checkpoint, and whatever of it did commit comes back as duplicates.
    let done = if applied.failed || applied.not_attempted {
        0
    } else {
        batch.records.len()
    };
    result.applied += applied.applied;
    result.poison += applied.poison;
    result.failed |= applied.failed;
    let stopped_early = done < batch.records.len();
    if let Some(last) = done.checked_sub(1).and_then(|i| batch.records.get(i)) {
        state.position = Some(last.sequence_number.clone());
        state.from_horizon = false;
        if let Some(at) = last.created_at {
            state.age_ms = (Utc::now() - at).num_milliseconds().max(0);
        }
    }
    if applied.checkpointed && done > 0 {
        // The batch's last write already saved this position.
        state.saved = state.position.clone();
    }
    save_position(projector, shard_id, state).await?;
    if stopped_early {
        // The iterator has moved past records not applied: re-read after `position` next time.
        state.iterator = None;
        return Ok(result);
    }
    state.iterator = batch.next_iterator;
    if state.iterator.is_none() {
        finish_shard(projector, shard_id, state).await?;
        result.ended = true;
    }
    Ok(result)
}

/// What applying one shard batch did.
#[derive(Debug, Clone, Copy, Default)]
struct BatchApplied {
    /// Events that changed the view.
    applied: usize,
    /// Records skipped as undecodable or unappliable.
    poison: usize,
    /// The batch failed for now (retried from the shard's position).
    failed: bool,
    /// Shutdown came first: nothing was tried.
    not_attempted: bool,
    /// The shard's checkpoint advanced to the batch's last record in the batch's last write.
    checkpointed: bool,
}

/// Applies a shard batch through [`Projector::apply_batch`]: the records' rows loaded together,
/// each sandbox's events folded, and the rows, summed stats and the shard checkpoint written in as
/// few transactions as the 100-item limit allows. Records that can never apply are logged,
/// counted and passed; any other failure fails the whole batch, which is then read again.
async fn apply_records(
    projector: &Projector,
    shard_id: &str,
    records: &[StreamRecord],
    stop: &AtomicBool,
) -> BatchApplied {
    let mut out = BatchApplied::default();
    if stop.load(Ordering::Relaxed) || records.is_empty() {
        out.not_attempted = !records.is_empty();
        return out;
    }
    let poison = |record: &StreamRecord, reason: &str| {
        projector
            .metrics()
            .events
            .with_label_values(&["poison"])
            .inc();
        tracing::error!(target: "projector", shard = %shard_id, sequence_number = %record.sequence_number,
            keys = %describe_keys(&record.keys), error = %reason, "skipping poison stream record");
    };
    let mut envelopes = Vec::with_capacity(records.len());
    let mut record_of = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        match decode_record(record) {
            Ok(None) => {}
            Ok(Some(envelope)) => {
                envelopes.push(envelope);
                record_of.push(index);
            }
            Err(reason) => {
                poison(record, &reason);
                out.poison += 1;
            }
        }
    }
    let checkpoint = records.last().map(|last| Checkpoint {
        source: shard_id.to_string(),
        position: last.sequence_number.clone(),
    });
    match projector.apply_batch(&envelopes, checkpoint).await {
        Ok(report) => {
            out.applied = report.applied;
            out.checkpointed = true;
            for (index, reason) in &report.poison {
                if let Some(record) = record_of.get(*index).and_then(|i| records.get(*i)) {
                    poison(record, reason);
                }
                out.poison += 1;
            }
        }
        Err(e) => {
            tracing::warn!(target: "projector", shard = %shard_id, records = records.len(), error = %e,
                "applying the batch failed; will retry from the last checkpoint");
            out.failed = true;
        }
    }
    out
}

/// A new iterator for a shard from its position (or the horizon). `Ok(None)`: the shard is gone.
async fn acquire_iterator(
    api: &dyn StreamApi,
    shard_id: &str,
    state: &mut ShardState,
) -> Result<Option<String>, StreamError> {
    let start = match (&state.position, state.from_horizon) {
        (Some(seq), false) => IteratorStart::AfterSequence(seq.clone()),
        _ => IteratorStart::TrimHorizon,
    };
    let iterator = match api.shard_iterator(shard_id, &start).await {
        Ok(it) => it,
        Err(StreamError::Trimmed) if start != IteratorStart::TrimHorizon => {
            tracing::warn!(target: "projector", shard = %shard_id,
                "checkpoint is older than the stream's retention; restarting at TRIM_HORIZON (run `projector verify`)");
            state.from_horizon = true;
            api.shard_iterator(shard_id, &IteratorStart::TrimHorizon)
                .await?
        }
        Err(StreamError::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    state.iterator = Some(iterator.clone());
    Ok(Some(iterator))
}

async fn save_position(
    projector: &Projector,
    shard_id: &str,
    state: &mut ShardState,
) -> Result<(), StreamError> {
    if state.position.is_some() && state.position != state.saved {
        let position = state.position.clone().unwrap_or_default();
        projector
            .view()
            .save_checkpoint(shard_id, &position)
            .await
            .map_err(|e| StreamError::Other(format!("save checkpoint: {e}")))?;
        state.saved = Some(position);
    }
    Ok(())
}

async fn finish_shard(
    projector: &Projector,
    shard_id: &str,
    state: &mut ShardState,
) -> Result<(), StreamError> {
    projector
        .view()
        .save_checkpoint(shard_id, SHARD_END)
        .await
        .map_err(|e| StreamError::Other(format!("save checkpoint: {e}")))?;
    state.saved = Some(SHARD_END.to_string());
    state.finished = true;
    state.iterator = None;
    state.age_ms = 0;
    tracing::info!(target: "projector", shard = %shard_id, "shard read to its end");
    Ok(())
}

/// Decodes one record. `Ok(None)`: not an event insert (nothing to do); `Err`: it can never
/// apply (why).
pub(crate) fn decode_record(record: &StreamRecord) -> Result<Option<EventEnvelope>, String> {
    if record.event_name.as_deref().is_some_and(|n| n != "INSERT") {
        // Event items are never modified or deleted by the broker; a MODIFY/REMOVE is an
        // operator's manual change, and the event table (not its stream) stays the truth.
        return Ok(None);
    }
    let image = record
        .new_image
        .as_ref()
        .ok_or_else(|| "record has no NewImage".to_string())?;
    envelope_from_item(image)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// `name=value` pairs of a record's key, for logs (scalar values only; keys are S or N).
pub fn describe_keys(keys: &Item) -> String {
    let mut pairs: Vec<String> = keys
        .iter()
        .map(|(name, value)| match value {
            AttributeValue::S(s) => format!("{name}={s}"),
            AttributeValue::N(n) => format!("{name}={n}"),
            other => format!("{name}={other:?}"),
        })
        .collect();
    pairs.sort();
    pairs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::model::events::SandboxEvent;
    use domain::store::EventStore;
    use domain::{Actor, CommandMeta, EventEnvelope, PoolView, ViewStore};
    use std::sync::{Arc, Mutex};
    use store_dynamodb::envelope_to_item;
    use store_embedded::EmbeddedStore;

    use crate::ProjectorMetrics;

    fn registered(id: &str) -> EventEnvelope {
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        };
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
            &meta,
            Utc::now(),
        )
    }

    fn record(seq: u64, envelope: &EventEnvelope) -> StreamRecord {
        let item = envelope_to_item(envelope);
        let keys = item
            .iter()
            .filter(|(k, _)| *k == "stream_id" || *k == "version")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        StreamRecord {
            sequence_number: format!("{seq:021}"),
            event_name: Some("INSERT".into()),
            created_at: Some(Utc::now()),
            keys,
            new_image: Some(item),
        }
    }

    /// A scripted stream: shards with records, an iterator = "shard:index", and failures to
    /// inject on the next calls.
    #[derive(Default)]
    struct FakeStream {
        shards: Mutex<Vec<(ShardInfo, Vec<StreamRecord>, bool)>>,
        fail_next_get: Mutex<Vec<StreamError>>,
        fail_next_iterator: Mutex<Vec<StreamError>>,
        reads: Mutex<Vec<String>>,
    }

    impl FakeStream {
        fn add_shard(
            &self,
            id: &str,
            parent: Option<&str>,
            records: Vec<StreamRecord>,
            closed: bool,
        ) {
            self.shards.lock().unwrap().push((
                ShardInfo {
                    shard_id: id.into(),
                    parent_shard_id: parent.map(str::to_string),
                },
                records,
                closed,
            ));
        }
    }

    #[async_trait]
    impl StreamApi for Arc<FakeStream> {
        async fn list_shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
            Ok(self
                .shards
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.0.clone())
                .collect())
        }

        async fn shard_iterator(
            &self,
            shard_id: &str,
            start: &IteratorStart,
        ) -> Result<String, StreamError> {
            if let Some(e) = self.fail_next_iterator.lock().unwrap().pop() {
                return Err(e);
            }
            let shards = self.shards.lock().unwrap();
            let (_, records, _) = shards
                .iter()
                .find(|s| s.0.shard_id == shard_id)
                .ok_or(StreamError::NotFound)?;
            let index = match start {
                IteratorStart::TrimHorizon => 0,
                IteratorStart::AfterSequence(seq) => records
                    .iter()
                    .position(|r| &r.sequence_number == seq)
                    .map_or(0, |i| i + 1),
                IteratorStart::AtSequence(seq) => records
                    .iter()
                    .position(|r| &r.sequence_number == seq)
                    .ok_or(StreamError::Trimmed)?,
            };
            Ok(format!("{shard_id}:{index}"))
        }

        async fn get_records(
            &self,
            iterator: &str,
            limit: i32,
        ) -> Result<RecordBatch, StreamError> {
            if let Some(e) = self.fail_next_get.lock().unwrap().pop() {
                return Err(e);
            }
            let (shard_id, index) = iterator.rsplit_once(':').unwrap();
            let index: usize = index.parse().unwrap();
            self.reads.lock().unwrap().push(shard_id.to_string());
            let shards = self.shards.lock().unwrap();
            let (_, records, closed) = shards.iter().find(|s| s.0.shard_id == shard_id).unwrap();
            let end = (index + limit as usize).min(records.len());
            let next = if end == records.len() && *closed {
                None
            } else {
                Some(format!("{shard_id}:{end}"))
            };
            Ok(RecordBatch {
                records: records[index..end].to_vec(),
                next_iterator: next,
            })
        }
    }

    fn projector(store: &EmbeddedStore) -> Projector {
        Projector::new(
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            ProjectorMetrics::unregistered(),
        )
    }

    fn config() -> PollerConfig {
        PollerConfig {
            batch_size: 2,
            ..PollerConfig::default()
        }
    }

    /// A child shard is not read before its parent is read to its end, and the parent is then
    /// checkpointed as SHARD_END.
    #[tokio::test]
    async fn parents_before_children() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let fake = Arc::new(FakeStream::default());
        let a = registered("a");
        let b = registered("b");
        let c = registered("c");
        fake.add_shard("child", Some("parent"), vec![record(10, &c)], false);
        fake.add_shard("parent", None, vec![record(1, &a), record(2, &b)], true);
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        poller.drain(10).await?;
        let reads = fake.reads.lock().unwrap().clone();
        let first_child = reads.iter().position(|s| s == "child").unwrap();
        assert!(reads[..first_child].iter().all(|s| s == "parent"));
        assert_eq!(
            store.checkpoint("parent").await?.as_deref(),
            Some(SHARD_END)
        );
        assert_eq!(
            store.checkpoint("child").await?,
            Some(format!("{:021}", 10))
        );
        assert_eq!(store.stats().await?.total(), 3);
        Ok(())
    }

    /// A new child shard appearing after a split is discovered and read.
    #[tokio::test]
    async fn picks_up_new_shards() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let fake = Arc::new(FakeStream::default());
        fake.add_shard("s1", None, vec![record(1, &registered("a"))], true);
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        poller.drain(5).await?;
        fake.add_shard("s2", Some("s1"), vec![record(5, &registered("b"))], false);
        poller.drain(5).await?;
        assert_eq!(store.stats().await?.total(), 2);
        assert_eq!(
            poller.shards(),
            vec![("s1".into(), true), ("s2".into(), false)]
        );
        Ok(())
    }

    /// An expired iterator is replaced AFTER the last applied record: nothing skipped.
    #[tokio::test]
    async fn recovers_from_expired_iterator() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let fake = Arc::new(FakeStream::default());
        let recs: Vec<_> = (1..=5)
            .map(|i| record(i, &registered(&i.to_string())))
            .collect();
        fake.add_shard("s", None, recs, false);
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        let stop = AtomicBool::new(false);
        poller.poll_round(&stop).await?;
        fake.fail_next_get
            .lock()
            .unwrap()
            .push(StreamError::ExpiredIterator);
        poller.drain(10).await?;
        assert_eq!(store.stats().await?.total(), 5);
        Ok(())
    }

    /// A checkpoint beyond retention restarts the shard at TRIM_HORIZON instead of failing.
    #[tokio::test]
    async fn recovers_from_trimmed_data() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        store.save_checkpoint("s", "000000000000000000099").await?;
        let fake = Arc::new(FakeStream::default());
        fake.add_shard("s", None, vec![record(100, &registered("x"))], false);
        fake.fail_next_iterator
            .lock()
            .unwrap()
            .push(StreamError::Trimmed);
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        poller.drain(5).await?;
        assert_eq!(store.stats().await?.total(), 1);
        fake.fail_next_get
            .lock()
            .unwrap()
            .push(StreamError::Trimmed);
        poller.drain(5).await?;
        assert_eq!(store.stats().await?.total(), 1);
        Ok(())
    }

    /// A poison record is skipped (and counted); the records after it are applied.
    #[tokio::test]
    async fn skips_poison_records() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let fake = Arc::new(FakeStream::default());
        let mut bad = record(2, &registered("bad"));
        bad.new_image = Some(bad.keys.clone());
        fake.add_shard(
            "s",
            None,
            vec![
                record(1, &registered("a")),
                bad,
                record(3, &registered("c")),
            ],
            false,
        );
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        let total = poller.drain(5).await?;
        assert_eq!(total.poison, 1);
        assert_eq!(store.stats().await?.total(), 2);
        assert_eq!(store.checkpoint("s").await?, Some(format!("{:021}", 3)));
        Ok(())
    }

    /// A restarted poller resumes after its checkpoint and applies nothing twice.
    #[tokio::test]
    async fn resumes_from_checkpoint() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let fake = Arc::new(FakeStream::default());
        let recs: Vec<_> = (1..=4)
            .map(|i| record(i, &registered(&i.to_string())))
            .collect();
        fake.add_shard("s", None, recs, false);
        let stop = AtomicBool::new(false);
        let mut first = StreamPoller::new(fake.clone(), projector(&store), config());
        first.poll_round(&stop).await?;
        assert_eq!(store.checkpoint("s").await?, Some(format!("{:021}", 2)));
        let mut second = StreamPoller::new(fake.clone(), projector(&store), config());
        let total = second.drain(5).await?;
        assert_eq!(total.records, 2);
        assert_eq!(store.stats().await?.total(), 4);
        Ok(())
    }

    /// Event items other than inserts are ignored, and their events are never written twice.
    #[tokio::test]
    async fn ignores_non_inserts() -> Result<(), Box<dyn std::error::Error>> {
        let store = EmbeddedStore::open_in_memory(2)?;
        let env = registered("a");
        store.append(vec![env.clone()]).await?;
        let fake = Arc::new(FakeStream::default());
        let mut modify = record(2, &env);
        modify.event_name = Some("MODIFY".into());
        fake.add_shard("s", None, vec![record(1, &env), modify], false);
        let mut poller = StreamPoller::new(fake.clone(), projector(&store), config());
        let total = poller.drain(5).await?;
        assert_eq!((total.records, total.applied), (2, 1));
        Ok(())
    }
}
