//! Test doubles for the allocator's liveness tests: an in-memory event store whose appends can be
//! made to fail with an unknown outcome (the write applied or not), or to hang until the caller
//! gives up; and a view that projects that store on every read (never stale, so any 409 it leads
//! to is the allocator's own doing).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::events::{BrokerEvent, EventEnvelope};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::{project, PoolRow, PoolStats};
use crate::store::{
    group, validate_append, CandidateQuery, EventPage, EventStore, ListFilter, MemberOutcome,
    PoolView, RowPage, StoreError,
};

/// What the next append does instead of answering plainly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendFault {
    /// Stores the batch (if its versions are free), then answers `Unavailable`.
    FailApplied,
    /// Stores nothing and answers `Unavailable`.
    FailNotApplied,
    /// Stores nothing, answers `Unavailable`, and fails the next `n` reads as well.
    FailNotAppliedThenReads(usize),
    /// Never answers (the caller's timeout or cancellation ends it); stores nothing.
    Hang,
}

/// An in-memory event store with injected faults.
#[derive(Debug, Default)]
pub(crate) struct FaultStore {
    streams: Mutex<BTreeMap<String, Vec<EventEnvelope>>>,
    faults: Mutex<VecDeque<AppendFault>>,
    failing_reads: AtomicUsize,
    /// What [`EventStore::group_commit_items`] answers (0: the broker appends alone).
    group_items: usize,
    /// How long [`PoolView::get_many`] takes (a slow batch read of rows).
    get_many_delay: Mutex<std::time::Duration>,
    /// Strong reads made, by stream.
    reads: Mutex<BTreeMap<String, usize>>,
}

impl FaultStore {
    /// A store whose brokers group allocations (up to `items` events a group); a fault then
    /// applies to a whole group, as to one transaction.
    pub(crate) fn grouping(items: usize) -> Self {
        Self {
            group_items: items,
            ..Self::default()
        }
    }

    /// Queues faults for the next appends, in order.
    pub(crate) fn inject(&self, faults: impl IntoIterator<Item = AppendFault>) {
        self.faults.lock().unwrap().extend(faults);
    }

    /// Makes every [`PoolView::get_many`] take `delay` before it answers.
    pub(crate) fn slow_get_many(&self, delay: std::time::Duration) {
        *self.get_many_delay.lock().unwrap() = delay;
    }

    /// Drops the faults not used yet, and any failing reads still due.
    pub(crate) fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
        self.failing_reads.store(0, Ordering::SeqCst);
    }

    /// Every event stored, by stream.
    pub(crate) fn streams(&self) -> BTreeMap<String, Vec<EventEnvelope>> {
        self.streams.lock().unwrap().clone()
    }

    /// Strong reads made of the streams whose id starts with `prefix`.
    pub(crate) fn reads_of(&self, prefix: &str) -> usize {
        let reads = self.reads.lock().unwrap();
        reads
            .iter()
            .filter(|(stream_id, _)| stream_id.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    fn count_read(&self, stream_id: &str) {
        *self
            .reads
            .lock()
            .unwrap()
            .entry(stream_id.to_string())
            .or_default() += 1;
    }

    fn unavailable() -> StoreError {
        StoreError::Unavailable("injected: outcome unknown".into())
    }

    fn read_fault(&self) -> Result<(), StoreError> {
        let failing = self
            .failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match failing {
            Ok(_) => Err(Self::unavailable()),
            Err(_) => Ok(()),
        }
    }

    fn store(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        let firsts = validate_append(&events)?;
        let mut streams = self.streams.lock().unwrap();
        for (stream_id, first) in &firsts {
            let current = streams.get(stream_id).map_or(0, |s| s.len() as u64);
            if current + 1 != *first {
                return Err(StoreError::VersionConflict {
                    stream_id: stream_id.clone(),
                });
            }
        }
        for e in events {
            streams.entry(e.stream_id.clone()).or_default().push(e);
        }
        Ok(())
    }

    /// Every sandbox row as the projection makes it from the stored events.
    pub(crate) fn rows(&self) -> Vec<PoolRow> {
        let streams = self.streams.lock().unwrap();
        let mut rows: Vec<PoolRow> = streams
            .values()
            .filter_map(|events| {
                let mut row = None;
                for envelope in events {
                    match envelope.decode() {
                        Ok(BrokerEvent::Sandbox(event)) => {
                            row = project(row, envelope, &event).0;
                        }
                        _ => return None,
                    }
                }
                row
            })
            .collect();
        rows.sort_by(|a, b| (&a.name, &a.sandbox_id).cmp(&(&b.name, &b.sandbox_id)));
        rows
    }
}

#[async_trait]
impl EventStore for FaultStore {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        // An await point, as a real store has: a cancellation can land here.
        tokio::task::yield_now().await;
        self.count_read(stream_id);
        self.read_fault()?;
        let streams = self.streams.lock().unwrap();
        Ok(streams
            .get(stream_id)
            .map(|s| s.iter().filter(|e| e.version > after).cloned().collect())
            .unwrap_or_default())
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        self.count_read(stream_id);
        self.read_fault()?;
        let streams = self.streams.lock().unwrap();
        Ok(streams.get(stream_id).and_then(|s| s.last().cloned()))
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        let fault = self.faults.lock().unwrap().pop_front();
        match fault {
            None => self.store(events),
            Some(AppendFault::FailApplied) => {
                let _ = self.store(events);
                Err(Self::unavailable())
            }
            Some(AppendFault::FailNotApplied) => Err(Self::unavailable()),
            Some(AppendFault::FailNotAppliedThenReads(n)) => {
                self.failing_reads.store(n, Ordering::SeqCst);
                Err(Self::unavailable())
            }
            Some(AppendFault::Hang) => std::future::pending().await,
        }
    }

    fn group_commit_items(&self) -> usize {
        self.group_items
    }

    async fn append_group(&self, members: Vec<Vec<EventEnvelope>>) -> Vec<MemberOutcome> {
        tokio::task::yield_now().await;
        let fault = self.faults.lock().unwrap().pop_front();
        let unknown = || {
            members
                .iter()
                .map(|_| MemberOutcome::Failed(Self::unavailable()))
                .collect()
        };
        match fault {
            Some(AppendFault::FailNotApplied) => return unknown(),
            Some(AppendFault::FailNotAppliedThenReads(n)) => {
                self.failing_reads.store(n, Ordering::SeqCst);
                return unknown();
            }
            Some(AppendFault::Hang) => return std::future::pending().await,
            None | Some(AppendFault::FailApplied) => {}
        }
        // Member by member, with the group's rules: what one transaction re-sent without its
        // conflicting members would store.
        let continued = group::continued_members(&members);
        let valid = group::validate_group(&members);
        let mut outcomes: Vec<Option<MemberOutcome>> = vec![None; members.len()];
        for (j, (member, valid)) in members.iter().zip(valid).enumerate() {
            outcomes[j] = Some(if let Err(e) = valid {
                MemberOutcome::Failed(e)
            } else if group::orphaned_by(&continued[j], &outcomes) {
                MemberOutcome::Orphaned
            } else {
                match self.store(member.clone()) {
                    Ok(()) => MemberOutcome::Stored,
                    Err(e) => MemberOutcome::Failed(e),
                }
            });
        }
        if fault == Some(AppendFault::FailApplied) {
            return unknown();
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(MemberOutcome::Orphaned))
            .collect()
    }

    async fn scan(
        &self,
        _segment: u32,
        _segments: u32,
        _cursor: Option<String>,
        _limit: usize,
    ) -> Result<EventPage, StoreError> {
        Ok(EventPage::default())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl PoolView for FaultStore {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        Ok(self.rows().into_iter().find(|r| r.sandbox_id == sandbox_id))
    }

    async fn get_many(
        &self,
        sandbox_ids: &[String],
    ) -> Result<std::collections::HashMap<String, PoolRow>, StoreError> {
        let delay = *self.get_many_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(self
            .rows()
            .into_iter()
            .filter(|r| sandbox_ids.contains(&r.sandbox_id))
            .map(|r| (r.sandbox_id.clone(), r))
            .collect())
    }

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        Ok(self
            .rows()
            .into_iter()
            .filter(|r| r.status == SandboxStatus::Available)
            .filter(|r| query.prefix.as_ref().is_none_or(|p| r.name.starts_with(p)))
            .take(query.limit)
            .collect())
    }

    async fn list(
        &self,
        filter: &ListFilter,
        _limit: usize,
        _cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let rows = self
            .rows()
            .into_iter()
            .filter(|r| filter.status.is_none_or(|s| r.status == s))
            .filter(|r| filter.prefix.as_ref().is_none_or(|p| r.name.starts_with(p)))
            .collect();
        Ok(RowPage { rows, cursor: None })
    }

    async fn due(
        &self,
        _status: SandboxStatus,
        _before: DateTime<Utc>,
        _limit: usize,
        _cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        Ok(RowPage::default())
    }

    async fn stats(&self) -> Result<PoolStats, StoreError> {
        Ok(PoolStats::default())
    }
}
