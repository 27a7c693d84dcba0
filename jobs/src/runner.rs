//! [`Jobs`]: the one handle every runner uses — the worker's loops, the one-shot CLI, and the
//! API's admin endpoints — so a job behaves the same whoever triggers it. Jobs change state only
//! through `Broker::execute` (strong load, model decision, conditional append), so they are safe
//! to run concurrently with each other, with the API and with other worker instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde::Serialize;
use tokio::sync::watch;

use domain::model::sandbox::SandboxCommand;
use domain::store::{ListFilter, RowPage};
use domain::{Broker, CommandMeta, PoolRow, SandboxStatus, SharedClock};
use prometheus::Registry;

use crate::config::JobsConfig;
use crate::csp::{build_csp, CspApi};
use crate::error::{is_refusal, InitError, JobError};
use crate::metrics::JobsMetrics;
use crate::niosxaas::{self, PreDeleteHook};
use crate::summary::{ItemCounts, JobKind};

/// The jobs over one broker and one CSP client.
pub struct Jobs {
    pub(crate) broker: Arc<Broker>,
    pub(crate) csp: Arc<dyn CspApi>,
    pub(crate) config: JobsConfig,
    pub(crate) metrics: JobsMetrics,
    pub(crate) pre_delete: Arc<dyn PreDeleteHook>,
    /// Names this instance in deletion leases: unique per process, so two workers never mistake
    /// each other's lease for their own.
    pub(crate) worker_id: String,
    stop: watch::Sender<bool>,
    /// Where heartbeats are recorded (the API writes, the reclaim reads); `None` until
    /// [`Jobs::with_heartbeats`]: the reclaim then does nothing.
    pub(crate) heartbeats: Option<Arc<dyn domain::heartbeat::HeartbeatBook>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("config", &self.config)
            .field("stopping", &self.is_stopping())
            .finish_non_exhaustive()
    }
}

/// Which rows a sweep walks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowQuery {
    /// `PoolView::due(status, before)`: the `by-due` index.
    Due {
        status: SandboxStatus,
        before: chrono::DateTime<chrono::Utc>,
    },
    /// `PoolView::list` filtered by status.
    Status(SandboxStatus),
}

/// What a sweep of store-only commands did.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    pub checked: u64,
    pub applied: u64,
    pub skipped_conflicts: u64,
    pub pages: u32,
    pub stopped: bool,
}

impl Jobs {
    /// Jobs over `broker` and `csp`; metrics go to `metrics` (registered by the caller into the
    /// registry its `/metrics` serves). The NIOSXaaS hook follows `config.niosxaas`.
    pub fn new(
        broker: Arc<Broker>,
        csp: Arc<dyn CspApi>,
        config: JobsConfig,
        metrics: JobsMetrics,
    ) -> Self {
        let pre_delete = niosxaas::hook_for(&config.niosxaas);
        Self {
            broker,
            csp,
            config,
            metrics,
            pre_delete,
            worker_id: format!("worker-{}", uuid::Uuid::now_v7()),
            stop: watch::Sender::new(false),
            heartbeats: None,
        }
    }

    /// Records and reads heartbeats in `book` (ADR 0030).
    pub fn with_heartbeats(mut self, book: Arc<dyn domain::heartbeat::HeartbeatBook>) -> Self {
        self.heartbeats = Some(book);
        self
    }

    /// Where heartbeats are recorded, if this process has the store for them.
    pub fn heartbeats(&self) -> Option<&Arc<dyn domain::heartbeat::HeartbeatBook>> {
        self.heartbeats.as_ref()
    }

    /// Everything from configuration: registers [`JobsMetrics`] into `registry` (the one the
    /// process serves on `/metrics`) and builds the CSP client `config.csp` asks for (the mock
    /// only for `CSP_MODE=mock`; the real one needs a token). `clock` drives the circuit breaker.
    pub fn from_config(
        broker: Arc<Broker>,
        config: JobsConfig,
        clock: SharedClock,
        registry: &Registry,
    ) -> Result<Self, InitError> {
        config.validate()?;
        let metrics = JobsMetrics::new(registry)?;
        let csp = build_csp(&config.csp, clock, &metrics.csp)?;
        Ok(Self::new(broker, csp, config, metrics))
    }

    /// Replaces the pre-delete hook (the NIOSXaaS step, once implemented; tests).
    pub fn with_pre_delete_hook(mut self, hook: Arc<dyn PreDeleteHook>) -> Self {
        self.pre_delete = hook;
        self
    }

    /// The broker the jobs command.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The CSP client.
    pub fn csp(&self) -> &Arc<dyn CspApi> {
        &self.csp
    }

    /// The configuration in force.
    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &JobsMetrics {
        &self.metrics
    }

    /// Asks every run to stop: items in flight finish (a CSP delete that was sent gets its
    /// result recorded), no new item starts. Irreversible: used at shutdown.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// True once [`Jobs::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once [`Jobs::stop`] is called.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        // The sender lives in `self`, so `wait_for` cannot see a closed channel while we wait.
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Runs one job by kind and returns its summary as JSON (the worker's and CLI's entry point).
    /// `DeleteStale` uses the configured grace; `BulkDelete` needs a status and is refused here.
    pub async fn run(&self, kind: JobKind) -> Result<serde_json::Value, JobError> {
        match kind {
            JobKind::Sync => self.sync().await.map(|s| to_json(&s)),
            JobKind::Cleanup => self.cleanup().await.map(|s| to_json(&s)),
            JobKind::AutoExpire => self.auto_expire().await.map(|s| to_json(&s)),
            JobKind::DeleteStale => self.delete_stale(None).await.map(|s| to_json(&s)),
            JobKind::ReclaimOrphans => self.reclaim_orphans().await.map(|s| to_json(&s)),
            JobKind::BulkDelete => Err(JobError::InvalidRequest(
                "bulk delete needs an explicit status; use Jobs::bulk_delete".into(),
            )),
            JobKind::Reservations => self.reservations().await.map(|s| to_json(&s)),
        }
    }

    /// Event metadata of one run: actor `job:<name>`, correlation id `<name>-<uuid v7>` shared
    /// by every event the run appends.
    pub(crate) fn meta(&self, kind: JobKind) -> CommandMeta {
        let job = kind.as_str();
        CommandMeta::job(job, format!("{job}-{}", uuid::Uuid::now_v7()))
    }

    /// Records a finished run: per-job metrics and one JSON log line (target `job`).
    pub(crate) fn report<S: Serialize + ItemCounts>(
        &self,
        kind: JobKind,
        duration: Duration,
        summary: &S,
        error: Option<&JobError>,
    ) {
        let job = kind.as_str();
        let outcome = if error.is_some() { "error" } else { "success" };
        self.metrics.runs.with_label_values(&[job, outcome]).inc();
        self.metrics
            .duration
            .with_label_values(&[job])
            .observe(duration.as_secs_f64());
        for (result, count) in summary.item_counts() {
            if count > 0 {
                self.metrics
                    .items
                    .with_label_values(&[job, result])
                    .inc_by(count);
            }
        }
        let fields = crate::log_fields::SummaryFields::of(summary);
        let duration_ms = duration.as_millis() as u64;
        match error {
            None => {
                crate::log_summary!(target: "job", tracing::Level::INFO, fields, job, outcome, duration_ms, "job finished")
            }
            Some(e) => {
                crate::log_summary!(target: "job", tracing::Level::ERROR, fields, job, outcome, duration_ms, error = %e, "job failed")
            }
        }
    }

    /// Walks the rows of `query` page by page and runs `command` on each through
    /// `Broker::execute` (strong load + decision + conditional append), `store_concurrency` at a
    /// time. A refusal means the view lagged or a concurrent writer won: counted, skipped. A store
    /// failure ends the sweep with an error once the page's items in flight have finished.
    pub(crate) async fn sweep(
        &self,
        query: RowQuery,
        meta: &CommandMeta,
        command: impl Fn(&PoolRow) -> SandboxCommand,
    ) -> Result<Sweep, (Sweep, JobError)> {
        self.sweep_observed(query, meta, command, &|_| {}).await
    }

    /// [`Jobs::sweep`], calling `progress` after each page (a background admin job records it).
    pub(crate) async fn sweep_observed(
        &self,
        query: RowQuery,
        meta: &CommandMeta,
        command: impl Fn(&PoolRow) -> SandboxCommand,
        progress: &(dyn Fn(&Sweep) + Sync),
    ) -> Result<Sweep, (Sweep, JobError)> {
        let mut sweep = Sweep::default();
        let mut cursor: Option<String> = None;
        loop {
            if self.is_stopping() {
                sweep.stopped = true;
                return Ok(sweep);
            }
            let page = match self.page(query, cursor.as_deref()).await {
                Ok(page) => page,
                Err(e) => return Err((sweep, e)),
            };
            sweep.pages += 1;
            sweep.checked += page.rows.len() as u64;
            let results: Vec<_> = stream::iter(page.rows)
                .map(|row| {
                    let command = command(&row);
                    async move {
                        if self.is_stopping() {
                            return None;
                        }
                        let result = self.broker.execute(&row.sandbox_id, command, meta).await;
                        if matches!(&result, Err(e) if is_refusal(e)) {
                            // The row promised a state the strong load did not find: the view
                            // is behind this sandbox's stream. Bring the row up to date now
                            // (read repair), so the next sweep of any job sees the truth.
                            if let Err(e) = self.broker.repair_view(&row.sandbox_id).await {
                                tracing::warn!(target: "job", sandbox_id = %row.sandbox_id, error = %e, "read repair failed");
                            }
                        }
                        Some(result)
                    }
                })
                .buffer_unordered(self.config.store_concurrency)
                .collect()
                .await;
            let mut failure = None;
            for result in results {
                match result {
                    None => sweep.stopped = true,
                    Some(Ok(_)) => sweep.applied += 1,
                    Some(Err(e)) if is_refusal(&e) => sweep.skipped_conflicts += 1,
                    Some(Err(e)) => failure = failure.or(Some(e)),
                }
            }
            progress(&sweep);
            crate::progress::report(sweep.applied, sweep.skipped_conflicts);
            if let Some(e) = failure {
                return Err((sweep, e.into()));
            }
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(sweep),
            }
        }
    }

    /// One page of `query`.
    pub(crate) async fn page(
        &self,
        query: RowQuery,
        cursor: Option<&str>,
    ) -> Result<RowPage, JobError> {
        let view = self.broker.view();
        let page = match query {
            RowQuery::Due { status, before } => {
                view.due(status, before, self.config.page_size, cursor)
                    .await?
            }
            RowQuery::Status(status) => {
                let filter = ListFilter {
                    status: Some(status),
                    ..ListFilter::default()
                };
                view.list(&filter, self.config.page_size, cursor).await?
            }
        };
        Ok(page)
    }
}

/// A summary as JSON. Summaries are plain structs of numbers, strings and enums, which
/// serde_json always serialises; `Null` is unreachable in practice.
pub(crate) fn to_json<S: Serialize>(summary: &S) -> serde_json::Value {
    serde_json::to_value(summary).unwrap_or(serde_json::Value::Null)
}

/// Elapsed wall time in whole milliseconds.
pub(crate) fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// A std duration as a chrono one, saturating (config values are far below the limit).
pub(crate) fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
