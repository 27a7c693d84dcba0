//! [`InterceptedStore`]: one event store wrapper for every test that needs to see or steer the
//! calls a component makes, instead of one hand-written delegating `EventStore` per test. It
//! passes every call through to the store under test and calls a [`StoreHook`] around the ones
//! a test cares about: before a stream read (to count it, fail it, or force an interleaving),
//! before an append (to give it an unknown outcome: applied or not, or no answer at all) and
//! after a successful append (to tee it elsewhere).

use std::sync::Arc;

use async_trait::async_trait;
use domain::store::{EventPage, EventStore, MemberOutcome, StoreError};
use domain::EventEnvelope;

/// Which read of one stream is about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRead {
    /// A load of the stream's events after a version (0: the whole stream).
    After(u64),
    /// A load of the stream's latest event only.
    Latest,
}

/// How an append goes, as [`StoreHook::before_append`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppendPlan {
    /// Passed through and answered as the inner store answers.
    #[default]
    Proceed,
    /// Passed through, then answered `Unavailable` whatever the inner store said: the write
    /// landed (if its versions were free) but the caller cannot know.
    ApplyThenFail,
    /// Answered `Unavailable` without reaching the inner store: nothing landed, and the caller
    /// cannot know that either.
    Fail,
    /// Never answered (the caller's timeout or cancellation ends it); nothing lands.
    Hang,
}

/// What a test does around the calls of an [`InterceptedStore`]; every method defaults to doing
/// nothing, so a hook writes only the one it needs. An error a hook returns is the call's error,
/// and the inner store is then not called.
#[async_trait]
pub trait StoreHook: Send + Sync + 'static {
    /// Runs before `stream_id` is read from the inner store.
    async fn before_read(&self, _stream_id: &str, _read: StreamRead) -> Result<(), StoreError> {
        Ok(())
    }

    /// Runs before `events` are appended; decides how the append goes.
    async fn before_append(&self, _events: &[EventEnvelope]) -> AppendPlan {
        AppendPlan::Proceed
    }

    /// Runs after the inner store accepted `events` (not after a refused append).
    async fn after_append(&self, _events: &[EventEnvelope]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// An [`EventStore`] that delegates every call to `inner` and runs `hook` around reads and
/// appends.
pub struct InterceptedStore<H> {
    inner: Arc<dyn EventStore>,
    hook: H,
}

impl<H: StoreHook> InterceptedStore<H> {
    /// Wraps `inner`, calling `hook` around its reads and appends.
    pub fn with_hook(inner: Arc<dyn EventStore>, hook: H) -> Self {
        Self { inner, hook }
    }

    /// The hook, for a test to arm it or read what it recorded.
    pub fn hook(&self) -> &H {
        &self.hook
    }
}

#[async_trait]
impl<H: StoreHook> EventStore for InterceptedStore<H> {
    async fn load(&self, stream_id: &str) -> Result<Vec<EventEnvelope>, StoreError> {
        self.hook
            .before_read(stream_id, StreamRead::After(0))
            .await?;
        self.inner.load(stream_id).await
    }

    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.hook
            .before_read(stream_id, StreamRead::After(after))
            .await?;
        self.inner.load_after(stream_id, after).await
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        self.hook.before_read(stream_id, StreamRead::Latest).await?;
        self.inner.load_latest(stream_id).await
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        let injected = || StoreError::Unavailable("injected: outcome unknown".into());
        match self.hook.before_append(&events).await {
            AppendPlan::Proceed => {}
            AppendPlan::Fail => return Err(injected()),
            AppendPlan::Hang => std::future::pending::<()>().await,
            AppendPlan::ApplyThenFail => {
                if self.inner.append(events.clone()).await.is_ok() {
                    self.hook.after_append(&events).await?;
                }
                return Err(injected());
            }
        }
        // The hook sees the events only once the inner store accepted them, so a refused append
        // (a lost version race) leaves no trace in what the hook records.
        self.inner.append(events.clone()).await?;
        self.hook.after_append(&events).await
    }

    fn group_commit_items(&self) -> usize {
        self.inner.group_commit_items()
    }

    async fn append_group(&self, members: Vec<Vec<EventEnvelope>>) -> Vec<MemberOutcome> {
        let outcomes = self.inner.append_group(members.clone()).await;
        let mut answered = Vec::with_capacity(outcomes.len());
        for (member, outcome) in members.iter().zip(outcomes) {
            // As for a lone append: the hook sees only what the store accepted, and its error
            // is the member's.
            answered.push(match outcome {
                MemberOutcome::Stored => match self.hook.after_append(member).await {
                    Ok(()) => MemberOutcome::Stored,
                    Err(e) => MemberOutcome::Failed(e),
                },
                other => other,
            });
        }
        answered
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
