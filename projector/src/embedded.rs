//! The embedded source: tails the embedded store's global log in-process, applying each event
//! and checkpointing the position it reached, so a restart resumes where it stopped.

use std::time::Duration;

use domain::adapters::embedded::EmbeddedStore;
use domain::store::{StoreError, ViewStore};

use crate::Projector;

/// Checkpoint name of the embedded tail.
pub const CHECKPOINT: &str = "embedded-log";
/// Events read per step.
const BATCH: usize = 500;

/// Applies everything appended since the checkpoint; returns how many events it read.
/// Applying is idempotent, so a crash between apply and checkpoint only re-reads a batch.
pub async fn catch_up(projector: &Projector, store: &EmbeddedStore) -> Result<usize, StoreError> {
    let mut position: u64 = store
        .checkpoint(CHECKPOINT)
        .await?
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let mut total = 0;
    loop {
        let batch = store.read_log(position, BATCH).await?;
        if batch.is_empty() {
            return Ok(total);
        }
        for (pos, envelope) in &batch {
            projector.apply(envelope).await?;
            position = *pos;
        }
        total += batch.len();
        store
            .save_checkpoint(CHECKPOINT, &position.to_string())
            .await?;
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
