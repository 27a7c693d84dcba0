//! The embedded source: tails the embedded store's global log in-process, applying each read
//! batch with one SQLite transaction that also advances the checkpoint, so a restart resumes
//! exactly where the last committed batch ended.

use std::time::Duration;

use domain::store::batch::Checkpoint;
use domain::store::{StoreError, ViewStore};
use domain::EventEnvelope;
use store_embedded::EmbeddedStore;

use crate::Projector;

/// Checkpoint name of the embedded tail.
pub const CHECKPOINT: &str = "embedded-log";
/// Events read (and applied in one transaction) per step: large enough that a backlog costs a
/// few hundred transactions rather than one per event, small enough that a step stays a few
/// milliseconds and the store's connection is never held for long.
pub const BATCH: usize = 2000;

/// Applies everything appended since the checkpoint; returns how many events it read.
/// Each batch's rows, stats and checkpoint commit together, so a crash loses nothing and
/// re-applies nothing. An event that can never apply is logged, counted as poison and passed:
/// stopping on it would stall the whole view.
pub async fn catch_up(projector: &Projector, store: &EmbeddedStore) -> Result<usize, StoreError> {
    let mut position: u64 = store
        .checkpoint(CHECKPOINT)
        .await?
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let mut total = 0;
    loop {
        let batch = store.read_log(position, BATCH).await?;
        let Some(last) = batch.last().map(|(pos, _)| *pos) else {
            return Ok(total);
        };
        let envelopes: Vec<EventEnvelope> = batch.into_iter().map(|(_, e)| e).collect();
        let report = projector
            .apply_batch(
                &envelopes,
                Some(Checkpoint {
                    source: CHECKPOINT.to_string(),
                    position: last.to_string(),
                }),
            )
            .await?;
        for (index, reason) in &report.poison {
            projector
                .metrics()
                .events
                .with_label_values(&["poison"])
                .inc();
            if let Some(e) = envelopes.get(*index) {
                tracing::error!(target: "projector", stream_id = %e.stream_id, version = e.version,
                    error = %reason, "skipping an event that cannot apply");
            }
        }
        position = last;
        total += envelopes.len();
    }
}

/// Runs the tail until `shutdown` resolves: catch up, then wait for the next append (or a poll
/// interval, whichever first). Errors are logged and retried after a pause; nothing is skipped.
pub async fn run(
    projector: Projector,
    store: EmbeddedStore,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let woke = store.appended();
        tokio::pin!(woke);
        // Register interest before reading, so an append during catch-up still wakes us.
        woke.as_mut().enable();
        if let Err(e) = catch_up(&projector, &store).await {
            tracing::error!(target: "projector", error = %e, "embedded projection failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                _ = &mut shutdown => return,
            }
        }
        tokio::select! {
            _ = &mut woke => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = &mut shutdown => {
                // Apply what was appended before shutdown so the checkpoint is current.
                if let Err(e) = catch_up(&projector, &store).await {
                    tracing::warn!(target: "projector", error = %e, "final catch-up failed");
                }
                return;
            }
        }
    }
}
