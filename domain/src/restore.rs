//! Restore: loading an export into a fresh event table, and checking that a restored log is
//! whole (docs/restore.md).
//!
//! Only the events table is restored; everything else is rebuilt from it. Two pieces make that
//! a drill instead of a hope:
//!
//! - [`import_envelopes`] appends an export (`broker-audit export`, NDJSON envelopes in time
//!   order) through the ordinary [`EventStore::append`], so every version condition holds during
//!   the import exactly as during normal writes. An export is in time order, and clocks of two
//!   writers may disagree, so a stream's versions can arrive out of order: [`StreamOrder`] holds
//!   an early event back until its predecessors came. An import that stopped half-way (or a
//!   write whose outcome was unknown) is simply run again: a batch that meets events already
//!   stored checks that they are the same events (same event id) and skips them.
//! - [`check_log`] folds every claim, quota and sandbox stream and checks the cross-stream
//!   invariants the command side keeps in one transaction: every live claim points at a sandbox
//!   allocated through it and back, and every track-quota slot is held by a live allocation.
//!   `broker-audit verify` checks the view against the log; this checks the log against itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::model::claim::Claim;
use crate::model::events::{BrokerEvent, EventEnvelope};
use crate::model::ids::{sandbox_id_of, QUOTA_STREAM_PREFIX};
use crate::model::lifecycle::SandboxStatus;
use crate::model::quota::QuotaUsage;
use crate::model::sandbox::Sandbox;
use crate::store::{decode_stored, EventStore, StoreError, MAX_TRANSACTION_ITEMS};

/// Puts each stream's events in version order as they arrive in time order: an event whose
/// predecessor has not come yet waits (memory: the events that arrived early, which clock skew
/// between writers bounds to a few per stream, plus one counter per stream).
#[derive(Debug, Default)]
pub struct StreamOrder {
    /// The next version expected per stream (absent: 1).
    next: HashMap<String, u64>,
    /// Events that came before their predecessor, per stream by version.
    early: HashMap<String, BTreeMap<u64, EventEnvelope>>,
}

/// A stream whose versions did not all arrive: the export was cut short or filtered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamGap {
    /// The stream.
    pub stream_id: String,
    /// The version that never came.
    pub missing_version: u64,
    /// Later versions that came and were therefore not imported.
    pub held_back: usize,
}

impl StreamOrder {
    /// Takes one event and returns the events that are now in order (this one and any early
    /// successors it unblocks), or an error for a version seen twice.
    pub fn push(&mut self, envelope: EventEnvelope) -> Result<Vec<EventEnvelope>, StoreError> {
        let next = self.next.get(&envelope.stream_id).copied().unwrap_or(1);
        if envelope.version < next
            || self
                .early
                .get(&envelope.stream_id)
                .is_some_and(|early| early.contains_key(&envelope.version))
        {
            return Err(StoreError::InvalidAppend(format!(
                "{} v{} appears twice in the export",
                envelope.stream_id, envelope.version
            )));
        }
        if envelope.version > next {
            self.early
                .entry(envelope.stream_id.clone())
                .or_default()
                .insert(envelope.version, envelope);
            return Ok(Vec::new());
        }
        let stream_id = envelope.stream_id.clone();
        let mut ready = vec![envelope];
        let mut next = next + 1;
        if let Some(early) = self.early.get_mut(&stream_id) {
            while let Some(event) = early.remove(&next) {
                ready.push(event);
                next += 1;
            }
            if early.is_empty() {
                self.early.remove(&stream_id);
            }
        }
        self.next.insert(stream_id, next);
        Ok(ready)
    }

    /// The streams still waiting for a version, in stream order (empty: the export was whole).
    pub fn gaps(&self) -> Vec<StreamGap> {
        let mut gaps: Vec<StreamGap> = self
            .early
            .iter()
            .map(|(stream_id, early)| StreamGap {
                stream_id: stream_id.clone(),
                missing_version: self.next.get(stream_id).copied().unwrap_or(1),
                held_back: early.len(),
            })
            .collect();
        gaps.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
        gaps
    }

    /// Streams seen so far.
    pub fn streams(&self) -> usize {
        self.next.len().max(self.early.len())
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Envelopes read from the export.
    pub read: u64,
    /// Events appended to the target.
    pub appended: u64,
    /// Events the target already held (same event id): an earlier run or an unknown outcome.
    pub already_present: u64,
    /// Append requests (transactions) sent.
    pub transactions: u64,
    /// Streams imported.
    pub streams: u64,
    /// Streams the export left incomplete (nothing after the gap was imported).
    pub gaps: Vec<StreamGap>,
}

/// How an import writes.
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    /// Events per append (at most [`MAX_TRANSACTION_ITEMS`]).
    pub batch: usize,
    /// Attempts per batch when the store is unavailable.
    pub attempts: u32,
    /// Wait before the first retry; doubled each time.
    pub backoff: std::time::Duration,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            batch: MAX_TRANSACTION_ITEMS,
            attempts: 5,
            backoff: std::time::Duration::from_millis(200),
        }
    }
}

/// Appends the envelopes of an export to `store`, in per-stream version order, `batch` events
/// per transaction. Each envelope is stored exactly as exported (event id, time, actor,
/// payload), so a re-export of the target equals the source export. Safe to run again over a
/// target that holds part of the same log; a target holding a *different* event at a version is
/// an error naming the stream. `progress` is called after every transaction.
pub async fn import_envelopes<I, F>(
    store: &dyn EventStore,
    source: I,
    options: ImportOptions,
    mut progress: F,
) -> Result<ImportReport, StoreError>
where
    I: IntoIterator<Item = Result<EventEnvelope, StoreError>>,
    F: FnMut(&ImportReport),
{
    let batch_size = options.batch.clamp(1, MAX_TRANSACTION_ITEMS);
    let mut order = StreamOrder::default();
    let mut report = ImportReport::default();
    let mut batch: Vec<EventEnvelope> = Vec::with_capacity(batch_size);
    for envelope in source {
        let envelope = envelope?;
        report.read += 1;
        for ready in order.push(envelope)? {
            batch.push(ready);
            if batch.len() == batch_size {
                write_batch(store, std::mem::take(&mut batch), &options, &mut report).await?;
                progress(&report);
            }
        }
    }
    if !batch.is_empty() {
        write_batch(store, batch, &options, &mut report).await?;
        progress(&report);
    }
    report.streams = order.streams() as u64;
    report.gaps = order.gaps();
    Ok(report)
}

/// Appends one batch. A version conflict means the target already holds some of these versions
/// (an earlier run, or an append whose outcome was unknown): the batch is reconciled against
/// what is stored and the rest appended. Unavailable is retried with backoff.
async fn write_batch(
    store: &dyn EventStore,
    mut batch: Vec<EventEnvelope>,
    options: &ImportOptions,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    let mut wait = options.backoff;
    let mut attempt = 0;
    // A conflict removes at least one stored event from the batch (or fails), so this loop
    // ends; the bound only guards against a store that keeps changing under the import.
    let mut reconciles = 0;
    while !batch.is_empty() {
        attempt += 1;
        report.transactions += 1;
        match store.append(batch.clone()).await {
            Ok(()) => {
                report.appended += batch.len() as u64;
                return Ok(());
            }
            Err(StoreError::VersionConflict { .. }) if reconciles < MAX_TRANSACTION_ITEMS => {
                reconciles += 1;
                let before = batch.len();
                batch = reconcile(store, batch).await?;
                report.already_present += (before - batch.len()) as u64;
                if before == batch.len() {
                    // Nothing was stored after all: someone else is writing to the target.
                    return Err(StoreError::InvalidAppend(
                        "the target changed during the import (is something else writing to it?)"
                            .into(),
                    ));
                }
            }
            Err(StoreError::Unavailable(why)) if attempt < options.attempts => {
                tracing::warn!(%why, attempt, "import: store unavailable, retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                // The failed append may have landed: the next attempt reconciles on conflict.
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes from `batch` the events the target already holds, after checking they are the same
/// events; a different event at one of those versions is an error.
async fn reconcile(
    store: &dyn EventStore,
    batch: Vec<EventEnvelope>,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &batch {
        let entry = first
            .entry(event.stream_id.as_str())
            .or_insert(event.version);
        *entry = (*entry).min(event.version);
    }
    let mut stored: HashMap<(String, u64), uuid::Uuid> = HashMap::new();
    for (stream_id, from) in first {
        for event in store.load_after(stream_id, from - 1).await? {
            stored.insert((event.stream_id.clone(), event.version), event.event_id);
        }
    }
    let mut rest = Vec::with_capacity(batch.len());
    for event in batch {
        match stored.get(&(event.stream_id.clone(), event.version)) {
            Some(id) if *id == event.event_id => {}
            Some(_) => {
                return Err(StoreError::InvalidAppend(format!(
                    "the target holds a different event at {} v{}: it is not a copy of this log",
                    event.stream_id, event.version
                )))
            }
            None => rest.push(event),
        }
    }
    Ok(rest)
}

/// One broken cross-stream invariant in a restored (or any) log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inconsistency {
    /// The stream it was found on.
    pub stream_id: String,
    /// What is wrong, for a person.
    pub problem: String,
}

/// What [`check_log`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsistencyReport {
    /// Events read.
    pub events: u64,
    /// Sandbox streams folded.
    pub sandboxes: u64,
    /// Sandboxes allocated at the end of the log.
    pub allocated: u64,
    /// Claim streams folded.
    pub claims: u64,
    /// Claims holding a sandbox.
    pub live_claims: u64,
    /// Track quota streams folded.
    pub track_quotas: u64,
    /// Fair-share cap streams folded (`quota#caller#…`, `quota#addr#…`, `quota#principal#…`).
    pub caps: u64,
    /// Cap holders whose allocation has ended: allowed (a cap drops them when it is next found
    /// full; docs/tenancy.md), reported so the figure is visible.
    pub stale_cap_holders: u64,
    /// Events written by a newer release, not folded.
    pub unknown_events: u64,
    /// Broken invariants; empty means the log is consistent.
    pub problems: Vec<Inconsistency>,
}

impl ConsistencyReport {
    /// Whether every invariant holds.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The cap streams (fair-share), as opposed to a track's quota stream `quota#<track>`.
const CAP_STREAM_KINDS: [&str; 3] = ["caller#", "addr#", "principal#"];

/// Folds every stream of the log (a parallel scan, `segments` at once) and checks:
///
/// 1. a live claim's sandbox is allocated, and its allocation names this claim;
/// 2. an allocated sandbox's claim (when it has one) holds exactly this sandbox;
/// 3. a track quota's holders are allocated sandboxes of that track, each once;
/// 4. a fair-share cap's holders are registered sandboxes, each once (holders whose allocation
///    ended are allowed and counted).
///
/// Memory: one folded state per stream, never the history.
pub async fn check_log(
    events: Arc<dyn EventStore>,
    segments: u32,
    page_size: usize,
) -> Result<ConsistencyReport, StoreError> {
    let segments = segments.max(1);
    let parts = futures::future::try_join_all(
        (0..segments)
            .map(|segment| fold_segment(Arc::clone(&events), segment, segments, page_size)),
    )
    .await?;
    let mut state = Folded::default();
    for part in parts {
        state.events += part.events;
        state.unknown += part.unknown;
        state.sandboxes.extend(part.sandboxes);
        state.claims.extend(part.claims);
        state.quotas.extend(part.quotas);
    }
    Ok(state.check())
}

/// Every stream folded.
#[derive(Debug, Default)]
struct Folded {
    events: u64,
    unknown: u64,
    sandboxes: HashMap<String, Sandbox>,
    claims: HashMap<String, Claim>,
    quotas: HashMap<String, QuotaUsage>,
}

async fn fold_segment(
    events: Arc<dyn EventStore>,
    segment: u32,
    segments: u32,
    page_size: usize,
) -> Result<Folded, StoreError> {
    let mut part = Folded::default();
    let mut cursor = None;
    loop {
        let page = events
            .scan(segment, segments, cursor, page_size.max(1))
            .await?;
        for envelope in &page.events {
            part.events += 1;
            match decode_stored(envelope)? {
                BrokerEvent::Sandbox(event) => {
                    if let Some(sandbox_id) = sandbox_id_of(&envelope.stream_id) {
                        part.sandboxes
                            .entry(sandbox_id.to_string())
                            .or_default()
                            .fold(&event);
                    }
                }
                BrokerEvent::Claim(event) => part
                    .claims
                    .entry(envelope.stream_id.clone())
                    .or_default()
                    .fold(&event),
                BrokerEvent::Quota(event) => part
                    .quotas
                    .entry(envelope.stream_id.clone())
                    .or_default()
                    .fold(&event),
                BrokerEvent::Unknown(_) => part.unknown += 1,
                _ => {}
            }
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(part),
        }
    }
}

impl Folded {
    fn check(self) -> ConsistencyReport {
        let mut report = ConsistencyReport {
            events: self.events,
            unknown_events: self.unknown,
            sandboxes: self.sandboxes.len() as u64,
            claims: self.claims.len() as u64,
            ..ConsistencyReport::default()
        };
        let mut problem = |stream_id: &str, problem: String| {
            report.problems.push(Inconsistency {
                stream_id: stream_id.to_string(),
                problem,
            })
        };
        let allocated = |sandbox: &Sandbox| sandbox.status == Some(SandboxStatus::Allocated);

        let mut live_claims = 0u64;
        for (claim_id, claim) in &self.claims {
            let Some(held) = &claim.active else { continue };
            live_claims += 1;
            match self.sandboxes.get(held) {
                None => problem(claim_id, format!("holds {held}, which has no stream")),
                Some(sandbox) if !allocated(sandbox) => problem(
                    claim_id,
                    format!(
                        "holds {held}, which is {}",
                        sandbox.status.map_or("unregistered", |s| s.as_str())
                    ),
                ),
                Some(sandbox) if sandbox.claim_stream.as_deref() != Some(claim_id) => problem(
                    claim_id,
                    format!("holds {held}, whose allocation names another claim"),
                ),
                Some(_) => {}
            }
        }

        let mut allocated_count = 0u64;
        for (sandbox_id, sandbox) in &self.sandboxes {
            if !allocated(sandbox) {
                continue;
            }
            allocated_count += 1;
            let Some(claim_id) = &sandbox.claim_stream else {
                continue;
            };
            let held = self.claims.get(claim_id).and_then(|c| c.active.as_deref());
            if held != Some(sandbox_id.as_str()) {
                problem(
                    &format!("sandbox#{sandbox_id}"),
                    format!(
                        "is allocated through {claim_id}, which holds {}",
                        held.unwrap_or("nothing")
                    ),
                );
            }
        }

        let (mut track_quotas, mut caps, mut stale_cap_holders) = (0u64, 0u64, 0u64);
        for (stream_id, usage) in &self.quotas {
            let key = stream_id
                .strip_prefix(QUOTA_STREAM_PREFIX)
                .unwrap_or(stream_id);
            let is_cap = CAP_STREAM_KINDS.iter().any(|kind| key.starts_with(kind));
            let mut seen = HashSet::new();
            for holder in &usage.holders {
                if !seen.insert(holder.as_str()) {
                    problem(stream_id, format!("lists {holder} twice"));
                    continue;
                }
                let sandbox = self.sandboxes.get(holder);
                match (is_cap, sandbox) {
                    (_, None) => problem(stream_id, format!("holder {holder} has no stream")),
                    (true, Some(sandbox)) if !allocated(sandbox) => stale_cap_holders += 1,
                    (true, Some(_)) => {}
                    (false, Some(sandbox)) if !allocated(sandbox) => problem(
                        stream_id,
                        format!(
                            "a slot is held by {holder}, which is {}",
                            sandbox.status.map_or("unregistered", |s| s.as_str())
                        ),
                    ),
                    (false, Some(sandbox)) if sandbox.track_name.as_deref() != Some(key) => {
                        problem(
                            stream_id,
                            format!("a slot is held by {holder}, allocated for another track"),
                        )
                    }
                    (false, Some(_)) => {}
                }
            }
            if is_cap {
                caps += 1;
            } else {
                track_quotas += 1;
            }
        }
        report.live_claims = live_claims;
        report.allocated = allocated_count;
        report.track_quotas = track_quotas;
        report.caps = caps;
        report.stale_cap_holders = stale_cap_holders;
        report
            .problems
            .sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::append::test_envelope;

    fn versions(events: &[EventEnvelope]) -> Vec<(String, u64)> {
        events
            .iter()
            .map(|e| (e.stream_id.clone(), e.version))
            .collect()
    }

    /// Events that arrive before their predecessor are held back and released in version
    /// order once it comes; a stream left incomplete is reported as a gap.
    #[test]
    fn stream_order_releases_versions_in_order() -> Result<(), StoreError> {
        let mut order = StreamOrder::default();
        assert!(order.push(test_envelope("s#a", 2))?.is_empty());
        assert!(order.push(test_envelope("s#a", 3))?.is_empty());
        assert_eq!(
            versions(&order.push(test_envelope("s#b", 1))?),
            [("s#b".to_string(), 1)]
        );
        assert_eq!(
            versions(&order.push(test_envelope("s#a", 1))?),
            [
                ("s#a".to_string(), 1),
                ("s#a".to_string(), 2),
                ("s#a".to_string(), 3)
            ]
        );
        assert!(order.gaps().is_empty());
        assert!(order.push(test_envelope("s#b", 3))?.is_empty());
        assert_eq!(
            order.gaps(),
            [StreamGap {
                stream_id: "s#b".into(),
                missing_version: 2,
                held_back: 1
            }]
        );
        Ok(())
    }

    /// A version that appears twice in an export is refused, whether it was released already
    /// or is still held back.
    #[test]
    fn stream_order_refuses_duplicates() -> Result<(), StoreError> {
        let mut order = StreamOrder::default();
        order.push(test_envelope("s#a", 1))?;
        assert!(order.push(test_envelope("s#a", 1)).is_err());
        order.push(test_envelope("s#a", 3))?;
        assert!(order.push(test_envelope("s#a", 3)).is_err());
        Ok(())
    }
}
