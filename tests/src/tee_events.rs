//! [`TeeEvents`]: an event store that also keeps a private, always-current candidate view, so a
//! workload can drive the real broker without waiting for (or depending on) the projector that a
//! test or bench is measuring, stopping or crashing.

use std::sync::Arc;

use async_trait::async_trait;
use domain::store::{apply_event, EventPage, EventStore, StoreError};
use domain::EventEnvelope;
use store_embedded::EmbeddedStore;

/// Appends go to the store under test and are then applied, synchronously, to an in-memory
/// candidate view that the broker reads its allocation candidates from. Reads pass through.
pub struct TeeEvents {
    inner: Arc<dyn EventStore>,
    candidate_view: EmbeddedStore,
}

impl TeeEvents {
    /// Appends to `inner`, keeping `candidate_view` current.
    pub fn new(inner: Arc<dyn EventStore>, candidate_view: EmbeddedStore) -> Self {
        Self {
            inner,
            candidate_view,
        }
    }
}

#[async_trait]
impl EventStore for TeeEvents {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.inner.load_after(stream_id, after).await
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        self.inner.load_latest(stream_id).await
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        self.inner.append(events.clone()).await?;
        for event in &events {
            apply_event(&self.candidate_view, event).await?;
        }
        Ok(())
    }

    async fn scan(
        &self,
        segment: u32,
        segments: u32,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.inner.scan(segment, segments, cursor, limit).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
