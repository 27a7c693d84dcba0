//! Long admin operations as background jobs (ADR 0018): the request records the job and answers
//! 202 at once; a task of this process runs it and records progress as events on the job's own
//! stream, `adminjob#{job_id}`. Any API instance behind the load balancer can then report any
//! job, and the job lives on when the client that asked for it hangs up.
//!
//! Only the submitting task writes a job's stream, so its versions are simply counted; the
//! shared index stream (`adminjob#index`) is appended with the usual version check, retried on
//! a lost race. Submission writes the index entry and the start in one atomic append, so a job
//! is listed exactly when it exists.

use std::future::Future;

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::model::admin_job::AdminJobRecord;
use domain::model::events::AdminJobEvent;
use domain::model::ids::{admin_job_stream, ADMIN_JOB_INDEX_STREAM};
use domain::store::EventStore;
use domain::{CommandMeta, EventEnvelope, SharedClock, StoreError};

/// Lost races on the index stream retried before giving up (each loser re-reads the head).
const INDEX_APPEND_ATTEMPTS: usize = 16;
/// Appends of the final event retried while the store is unavailable.
const FINISH_ATTEMPTS: u32 = 10;

/// Counters a running job's work updates; the runner records them every progress interval.
#[derive(Debug, Default)]
pub struct JobProgress {
    done: AtomicU64,
    errors: AtomicU64,
}

impl JobProgress {
    /// Sets the items handled and the items failed or skipped so far.
    pub fn set(&self, done: u64, errors: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.errors.store(errors, Ordering::Relaxed);
    }

    /// An observer for a job pass (`jobs::progress::observed`) that sets these counters.
    pub fn observer(self: &Arc<Self>) -> jobs::progress::ProgressObserver {
        let progress = Arc::clone(self);
        Arc::new(move |p: jobs::progress::PassProgress| progress.set(p.done, p.errors))
    }

    fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// How a job's work ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// `completed`, `failed` or `stopped`.
    pub outcome: &'static str,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The operation's own summary.
    pub summary: serde_json::Value,
}

/// What a submission describes.
pub struct JobRequest {
    /// What it does, e.g. `bulk_delete`.
    pub kind: &'static str,
    /// Its parameters as given.
    pub params: serde_json::Value,
    /// Reads the items expected, when they can be known at the start (e.g. from the pool
    /// counters); it runs inside the submission's own task.
    pub total: BoxFuture<'static, Option<u64>>,
}

impl JobRequest {
    /// A job whose size is not known in advance.
    pub fn of_unknown_size(kind: &'static str, params: serde_json::Value) -> Self {
        Self {
            kind,
            params,
            total: futures::future::ready(None).boxed(),
        }
    }

    /// A job over the rows of one status: its total is the pool counters' count of that status
    /// at the start (a hint: the view may lag, and a pass may take only the due ones).
    pub fn over_status(
        kind: &'static str,
        params: serde_json::Value,
        view: Arc<dyn domain::PoolView>,
        status: domain::SandboxStatus,
    ) -> Self {
        Self {
            kind,
            params,
            total: async move {
                let stats = view.stats().await.ok()?;
                u64::try_from(stats.get(status)).ok()
            }
            .boxed(),
        }
    }
}

/// Submits, runs and reads admin jobs.
#[derive(Clone)]
pub struct AdminJobs {
    events: Arc<dyn EventStore>,
    clock: SharedClock,
    instance: String,
    progress_every: Duration,
    stale_after: chrono::Duration,
}

impl std::fmt::Debug for AdminJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminJobs")
            .field("instance", &self.instance)
            .field("progress_every", &self.progress_every)
            .finish_non_exhaustive()
    }
}

impl AdminJobs {
    /// Jobs recorded in `events`, progress written every `progress_every`; a running job silent
    /// for ten intervals is reported as interrupted.
    pub fn new(events: Arc<dyn EventStore>, clock: SharedClock, progress_every: Duration) -> Self {
        let progress_every = progress_every.max(Duration::from_millis(100));
        let stale_after = chrono::Duration::from_std(progress_every * 10)
            .unwrap_or_else(|_| chrono::Duration::minutes(10));
        Self {
            events,
            clock,
            instance: format!("api-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            progress_every,
            stale_after,
        }
    }

    /// Records a new job and starts `work` in a task of this process; returns the job id once
    /// the job is recorded. `work` gets the progress counters to update as it goes. Recording
    /// and running happen in a task of their own: a client that hangs up while waiting for the
    /// answer cancels neither.
    pub async fn submit<F, Fut>(
        &self,
        request: JobRequest,
        meta: &CommandMeta,
        work: F,
    ) -> Result<String, StoreError>
    where
        F: FnOnce(Arc<JobProgress>) -> Fut + Send + 'static,
        Fut: Future<Output = JobOutcome> + Send + 'static,
    {
        let runner = self.clone();
        let meta = meta.clone();
        let (recorded, answer) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = runner.record(request, &meta).await;
            let job_id = result.as_ref().ok().cloned();
            // The requester may be gone; the job runs whether or not anyone hears the answer.
            let _ = recorded.send(result);
            if let Some(job_id) = job_id {
                runner.run(job_id, meta, work).await;
            }
        });
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("job submission task ended".into())))
    }

    /// Appends the index entry and the job's start in one atomic write.
    async fn record(&self, request: JobRequest, meta: &CommandMeta) -> Result<String, StoreError> {
        let total = request.total.await;
        let job_id = uuid::Uuid::now_v7().to_string();
        let stream = admin_job_stream(&job_id);
        let started = AdminJobEvent::AdminJobStarted {
            kind: request.kind.to_string(),
            params: request.params,
            total,
            instance: self.instance.clone(),
        };
        let listed = AdminJobEvent::AdminJobListed {
            job_id: job_id.clone(),
            kind: request.kind.to_string(),
        };
        let mut attempts = 0;
        loop {
            let head = self
                .events
                .load_latest(ADMIN_JOB_INDEX_STREAM)
                .await?
                .map_or(0, |e| e.version);
            let now = self.clock.now();
            let batch = vec![
                EventEnvelope::new(ADMIN_JOB_INDEX_STREAM, head + 1, &listed, meta, now),
                EventEnvelope::new(&stream, 1, &started, meta, now),
            ];
            match self.events.append(batch).await {
                Ok(()) => break,
                // Another submission took the index's next version: read the head again.
                Err(StoreError::VersionConflict { .. }) if attempts < INDEX_APPEND_ATTEMPTS => {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(job_id)
    }

    async fn run<F, Fut>(self, job_id: String, meta: CommandMeta, work: F)
    where
        F: FnOnce(Arc<JobProgress>) -> Fut + Send + 'static,
        Fut: Future<Output = JobOutcome> + Send + 'static,
    {
        let stream = admin_job_stream(&job_id);
        let progress = Arc::new(JobProgress::default());
        let task = tokio::spawn(work(Arc::clone(&progress)));
        tokio::pin!(task);
        let mut version = 1;
        let mut ticks = tokio::time::interval(self.progress_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                result = &mut task => break result.unwrap_or_else(|e| JobOutcome {
                    outcome: "failed",
                    error: Some(format!("the job's task ended abnormally: {e}")),
                    summary: serde_json::Value::Null,
                }),
                _ = ticks.tick() => {
                    // Written even without change: the mark is also the job's heartbeat.
                    let (done, errors) = progress.get();
                    let event = AdminJobEvent::AdminJobProgressed { done, errors };
                    let envelope = EventEnvelope::new(&stream, version + 1, &event, &meta, self.clock.now());
                    match self.events.append(vec![envelope]).await {
                        Ok(()) => version += 1,
                        Err(e) => tracing::warn!(target: "admin_job", job_id = %job_id, error = %e, "progress not recorded"),
                    }
                }
            }
        };
        let (done, errors) = progress.get();
        let finished = AdminJobEvent::AdminJobFinished {
            outcome: outcome.outcome.to_string(),
            done,
            errors,
            error: outcome.error.clone(),
            summary: outcome.summary,
        };
        let mut attempt = 0;
        loop {
            let envelope =
                EventEnvelope::new(&stream, version + 1, &finished, &meta, self.clock.now());
            match self.events.append(vec![envelope]).await {
                Ok(()) => break,
                Err(e) if attempt < FINISH_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(target: "admin_job", job_id = %job_id, error = %e, attempt, "finish not recorded yet");
                    tokio::time::sleep(self.progress_every).await;
                }
                Err(e) => {
                    tracing::error!(target: "admin_job", job_id = %job_id, error = %e, "finish never recorded; the job will read as interrupted");
                    break;
                }
            }
        }
        tracing::info!(target: "admin_job", job_id = %job_id, outcome = outcome.outcome, done, errors, "admin job finished");
    }

    /// One job, `None` if there is no such job.
    pub async fn get(&self, job_id: &str) -> Result<Option<AdminJobRecord>, StoreError> {
        let events = self.events.load(&admin_job_stream(job_id)).await?;
        Ok(AdminJobRecord::fold(
            job_id,
            &events,
            self.clock.now(),
            self.stale_after,
        ))
    }

    /// The `limit` most recently submitted jobs, newest first: O(limit) reads whatever the
    /// history holds (the index's head, then only its last `limit` entries).
    pub async fn recent(&self, limit: usize) -> Result<Vec<AdminJobRecord>, StoreError> {
        let Some(head) = self.events.load_latest(ADMIN_JOB_INDEX_STREAM).await? else {
            return Ok(Vec::new());
        };
        let entries = self
            .events
            .load_after(
                ADMIN_JOB_INDEX_STREAM,
                head.version.saturating_sub(limit as u64),
            )
            .await?;
        let mut jobs = Vec::with_capacity(entries.len());
        for entry in entries.iter().rev() {
            let Ok(domain::model::events::BrokerEvent::AdminJob(AdminJobEvent::AdminJobListed {
                job_id,
                ..
            })) = entry.decode()
            else {
                continue;
            };
            if let Some(job) = self.get(&job_id).await? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }
}
