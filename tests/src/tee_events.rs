//! [`TeeEvents`]: an event store that also keeps a private, always-current candidate view, so a
//! workload can drive the real broker without waiting for (or depending on) the projector that a
//! test or bench is measuring, stopping or crashing.

use std::sync::Arc;

use async_trait::async_trait;
use domain::store::{apply_event, EventStore, StoreError};
use domain::EventEnvelope;
use store_embedded::EmbeddedStore;

use crate::intercepted::{InterceptedStore, StoreHook};

/// Appends go to the store under test and are then applied, synchronously, to an in-memory
/// candidate view that the broker reads its allocation candidates from. Reads pass through.
pub type TeeEvents = InterceptedStore<ToCandidateView>;

/// The hook of [`TeeEvents`]: applies every accepted append to the candidate view.
pub struct ToCandidateView(EmbeddedStore);

#[async_trait]
impl StoreHook for ToCandidateView {
    async fn after_append(&self, events: &[EventEnvelope]) -> Result<(), StoreError> {
        for event in events {
            apply_event(&self.0, event).await?;
        }
        Ok(())
    }
}

impl TeeEvents {
    /// Appends to `inner`, keeping `candidate_view` current.
    pub fn new(inner: Arc<dyn EventStore>, candidate_view: EmbeddedStore) -> Self {
        InterceptedStore::with_hook(inner, ToCandidateView(candidate_view))
    }
}
