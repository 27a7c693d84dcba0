//! The heartbeat reclaim (ADR 0030): walks the allocated sandboxes and, for each allocation
//! whose track opted in to heartbeats (the policy recorded in its `SandboxAllocated` event),
//! compares the last heartbeat ([`HeartbeatBook`]; the hand-out time when none came) with the
//! grace period. Silent for half the grace: a `HeartbeatMissed` warning (once per silence,
//! which the webhooks announce). Silent for the whole grace: a `DeletionRequested` with
//! `reason: heartbeat_missed` and the last heartbeat time, which releases the claim like the
//! owner's mark and sends the sandbox to cleanup.
//!
//! Safe on several instances and beside cleanup: both commands go through `Broker::execute`
//! (strong load, decision, append conditional on the stream's version), and the model refuses
//! anything but a live allocation — the same one the job judged (`allocated_at`) — so a sandbox
//! already marked, expired or being deleted is left alone, and of two instances racing the
//! loser re-decides on the winner's events and appends nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::heartbeat::{judge, HeartbeatBook, Verdict};
use domain::model::events::{truncate_to_millis, BrokerEvent, SandboxEvent};
use domain::model::ids::sandbox_stream;
use domain::model::sandbox::SandboxCommand;
use domain::store::ListFilter;
use domain::SandboxStatus;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::Serialize;

use crate::error::{is_refusal, JobError};
use crate::runner::{elapsed_ms, Jobs};
use crate::summary::{ItemCounts, JobKind, RunStatus};

/// The heartbeat settings of the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatJobConfig {
    /// `WRITE_EVENTS_HEARTBEATS` (false): the reclaim writes its warning (`HeartbeatMissed`, a
    /// new event type) only with this on, and without the warning it reclaims nothing.
    pub write_events: bool,
    /// `HEARTBEAT_CHECK_INTERVAL_SEC` (60): how often the worker runs the reclaim.
    pub check_interval: Duration,
}

impl Default for HeartbeatJobConfig {
    fn default() -> Self {
        Self {
            write_events: false,
            check_interval: Duration::from_secs(60),
        }
    }
}

/// Series of heartbeats and the reclaim; cheap to clone.
#[derive(Clone, Debug)]
pub struct HeartbeatMetrics {
    /// `broker_heartbeats_received_total{outcome}`: accepted, ended (the allocation is over),
    /// not_opted_in (accepted, but the allocation's track does not use heartbeats).
    pub received: IntCounterVec,
    /// `broker_heartbeat_warnings_total`: `HeartbeatMissed` warnings written.
    pub warnings: IntCounter,
    /// `broker_heartbeat_reclaims_total`: allocations reclaimed.
    pub reclaims: IntCounter,
}

impl HeartbeatMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let received = IntCounterVec::new(
            Opts::new(
                "broker_heartbeats_received_total",
                "Heartbeats received, by outcome",
            ),
            &["outcome"],
        )?;
        let warnings = IntCounter::new(
            "broker_heartbeat_warnings_total",
            "Warnings written for allocations that missed their heartbeats",
        )?;
        let reclaims = IntCounter::new(
            "broker_heartbeat_reclaims_total",
            "Allocations reclaimed after missing their heartbeats for the grace period",
        )?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(warnings.clone()))?;
        registry.register(Box::new(reclaims.clone()))?;
        Ok(Self {
            received,
            warnings,
            reclaims,
        })
    }
}

/// A heartbeat reclaim run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReclaimSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Allocated rows read from the view.
    pub checked: u64,
    /// Of those, allocations whose track opted in to heartbeats.
    pub watched: u64,
    /// Warnings written.
    pub warned: u64,
    /// Allocations reclaimed.
    pub reclaimed: u64,
    /// Commands that found the allocation already ended or lost a race (left alone).
    pub skipped_conflicts: u64,
    /// Why nothing was done, when the run did nothing on purpose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    /// View pages read.
    pub pages: u32,
    /// Wall time, ms.
    pub duration_ms: u64,
}

impl ItemCounts for ReclaimSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("warned", self.warned),
            ("reclaimed", self.reclaimed),
            ("skipped_conflict", self.skipped_conflicts),
        ]
    }
}

impl Jobs {
    /// Runs one heartbeat reclaim pass (see the module docs). Does nothing, and says why in the
    /// summary, without a heartbeat book or with `WRITE_EVENTS_HEARTBEATS` off.
    pub async fn reclaim_orphans(&self) -> Result<ReclaimSummary, JobError> {
        let started = Instant::now();
        let mut summary = ReclaimSummary::default();
        let result = self.reclaim_pass(&mut summary).await;
        summary.duration_ms = elapsed_ms(started);
        if result.is_err() {
            summary.status = RunStatus::Failed;
        }
        self.report(
            JobKind::ReclaimOrphans,
            started.elapsed(),
            &summary,
            result.as_ref().err(),
        );
        result.map(|()| summary)
    }

    async fn reclaim_pass(&self, summary: &mut ReclaimSummary) -> Result<(), JobError> {
        let Some(book) = self.heartbeats.clone() else {
            summary.disabled = Some("no heartbeat store in this process".into());
            return Ok(());
        };
        if !self.config.heartbeats.write_events {
            summary.disabled = Some(
                "WRITE_EVENTS_HEARTBEATS is off: the reclaim warns before it acts and may not \
                 write the warning yet; turn the flag on once every process runs this release"
                    .into(),
            );
            return Ok(());
        }
        let meta = self.meta(JobKind::ReclaimOrphans);
        let filter = ListFilter {
            status: Some(SandboxStatus::Allocated),
            ..ListFilter::default()
        };
        let mut cursor: Option<String> = None;
        loop {
            if self.is_stopping() {
                summary.status = RunStatus::Stopped;
                return Ok(());
            }
            let page = self
                .broker
                .view()
                .list(&filter, self.config.page_size, cursor.as_deref())
                .await?;
            summary.pages += 1;
            for row in page.rows {
                summary.checked += 1;
                self.judge_one(&row.sandbox_id, &book, &meta, summary)
                    .await?;
            }
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Judges one allocated sandbox on its own events (strong read): the policy and the
    /// allocation time come from its `SandboxAllocated`, never from the (lagging) view.
    async fn judge_one(
        &self,
        sandbox_id: &str,
        book: &Arc<dyn HeartbeatBook>,
        meta: &domain::CommandMeta,
        summary: &mut ReclaimSummary,
    ) -> Result<(), JobError> {
        let loaded = self.broker.load_sandbox(sandbox_id).await?;
        let sandbox = &loaded.sandbox;
        let (Some(SandboxStatus::Allocated), Some(allocated_at), Some(grace_s)) = (
            sandbox.status,
            sandbox.allocated_at,
            allocation_grace(&loaded.events),
        ) else {
            return Ok(());
        };
        summary.watched += 1;
        let now = self.broker.clock().now();
        let last_seen = book.last_seen(sandbox_id).await?;
        let (last, verdict) = judge(allocated_at, last_seen, grace_s, now);
        let warned = sandbox.heartbeat_warned_for == Some(truncate_to_millis(last));
        let command = match verdict {
            Verdict::Alive => return Ok(()),
            // Warned about this silence already: nothing to do until the whole grace is over.
            Verdict::Warn { .. } if warned => return Ok(()),
            Verdict::Warn { reclaim_at } => SandboxCommand::WarnHeartbeat {
                allocated_at,
                last_heartbeat_at: last,
                reclaim_at,
            },
            Verdict::Reclaim if !warned => {
                // Never reclaim without the warning first (a check interval longer than half
                // the grace, or a run that missed the warning window): warn now, reclaim at
                // the next run.
                SandboxCommand::WarnHeartbeat {
                    allocated_at,
                    last_heartbeat_at: last,
                    reclaim_at: now,
                }
            }
            Verdict::Reclaim => SandboxCommand::Reclaim {
                allocated_at,
                last_heartbeat_at: last,
            },
        };
        let reclaim = matches!(command, SandboxCommand::Reclaim { .. });
        let version_before = sandbox.version;
        match self.broker.execute(sandbox_id, command, meta).await {
            Ok(after)
                if after.version > version_before
                    && self.appended_by(sandbox_id, version_before, meta).await? =>
            {
                if reclaim {
                    summary.reclaimed += 1;
                    self.metrics.heartbeat.reclaims.inc();
                    tracing::info!(target: "job", sandbox_id, last_heartbeat_at = %last, "reclaimed: heartbeats missed for the grace period");
                } else {
                    summary.warned += 1;
                    self.metrics.heartbeat.warnings.inc();
                    tracing::info!(target: "job", sandbox_id, last_heartbeat_at = %last, "heartbeats missed: warned before the reclaim");
                }
                Ok(())
            }
            // Nothing appended by this run: already warned about this silence, the allocation
            // ended, or another instance acted first (its events made this decision a no-op).
            Ok(_) => {
                summary.skipped_conflicts += 1;
                Ok(())
            }
            Err(e) if is_refusal(&e) => {
                summary.skipped_conflicts += 1;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Jobs {
    /// True when an event after `version` on the sandbox's stream was appended by this run
    /// (its correlation id): `execute` answers the same way whether this run or a concurrent
    /// one appended, and only this run's actions are counted.
    async fn appended_by(
        &self,
        sandbox_id: &str,
        version: u64,
        meta: &domain::CommandMeta,
    ) -> Result<bool, JobError> {
        let after = self
            .broker
            .events()
            .load_after(&sandbox_stream(sandbox_id), version)
            .await?;
        Ok(after
            .iter()
            .any(|e| e.correlation_id.is_some() && e.correlation_id == meta.correlation_id))
    }
}

/// The heartbeat grace recorded by the latest allocation among a sandbox's events, if its track
/// opted in.
fn allocation_grace(events: &[domain::EventEnvelope]) -> Option<u32> {
    events.iter().rev().find_map(|e| match e.decode() {
        Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated {
            heartbeat_grace_s, ..
        })) => Some(heartbeat_grace_s),
        _ => None,
    })?
}
