//! Admin jobs as the model sees them: a record folded from one `adminjob#{job_id}` stream
//! (ADR 0018). Pure; the runner that writes the events lives with the API.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::events::{AdminJobEvent, BrokerEvent, EventEnvelope};

/// Where an admin job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminJobState {
    /// Running, with a recent progress mark.
    Running,
    /// Finished; every item was handled (skips and errors are counted).
    Completed,
    /// Ended early by an error (e.g. the store was unavailable).
    Failed,
    /// Ended early by a shutdown of the process running it.
    Stopped,
    /// No progress mark for longer than the stale bound: the process running it is gone (a
    /// crash or a deploy). The operation is idempotent; submit it again.
    Interrupted,
}

impl AdminJobState {
    fn from_outcome(outcome: &str) -> Self {
        match outcome {
            "completed" => Self::Completed,
            "stopped" => Self::Stopped,
            _ => Self::Failed,
        }
    }
}

/// One admin job, folded from its stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminJobRecord {
    /// The job id.
    pub job_id: String,
    /// What it does, e.g. `bulk_delete`.
    pub kind: String,
    /// Its parameters.
    pub params: serde_json::Value,
    /// Where it stands.
    pub state: AdminJobState,
    /// Items handled so far.
    pub done: u64,
    /// Items expected, when known at the start.
    pub total: Option<u64>,
    /// Items that failed or were skipped so far.
    pub errors: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The operation's summary, once finished.
    pub summary: Option<serde_json::Value>,
    /// The process running it.
    pub instance: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last recorded anything.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Events in its stream.
    pub version: u64,
}

impl AdminJobRecord {
    /// Folds a job stream; `None` when it does not start with `AdminJobStarted`. A running job
    /// whose last event is older than `stale_after` at `now` is reported as interrupted.
    pub fn fold(
        job_id: &str,
        events: &[EventEnvelope],
        now: DateTime<Utc>,
        stale_after: Duration,
    ) -> Option<Self> {
        let mut record: Option<Self> = None;
        for envelope in events {
            let Ok(BrokerEvent::AdminJob(event)) = envelope.decode() else {
                continue;
            };
            match (event, record.as_mut()) {
                (
                    AdminJobEvent::AdminJobStarted {
                        kind,
                        params,
                        total,
                        instance,
                    },
                    None,
                ) => {
                    record = Some(Self {
                        job_id: job_id.to_string(),
                        kind,
                        params,
                        state: AdminJobState::Running,
                        done: 0,
                        total,
                        errors: 0,
                        error: None,
                        summary: None,
                        instance,
                        started_at: envelope.occurred_at,
                        updated_at: envelope.occurred_at,
                        finished_at: None,
                        version: envelope.version,
                    });
                }
                (AdminJobEvent::AdminJobProgressed { done, errors }, Some(job)) => {
                    job.done = done;
                    job.errors = errors;
                    job.updated_at = envelope.occurred_at;
                    job.version = envelope.version;
                }
                (
                    AdminJobEvent::AdminJobFinished {
                        outcome,
                        done,
                        errors,
                        error,
                        summary,
                    },
                    Some(job),
                ) => {
                    job.state = AdminJobState::from_outcome(&outcome);
                    job.done = done;
                    job.errors = errors;
                    job.error = error;
                    job.summary = Some(summary);
                    job.updated_at = envelope.occurred_at;
                    job.finished_at = Some(envelope.occurred_at);
                    job.version = envelope.version;
                }
                _ => {}
            }
        }
        if let Some(job) = record.as_mut() {
            if job.state == AdminJobState::Running && now - job.updated_at > stale_after {
                job.state = AdminJobState::Interrupted;
            }
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::{Actor, CommandMeta};

    fn env(version: u64, event: &AdminJobEvent, at: DateTime<Utc>) -> EventEnvelope {
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        };
        EventEnvelope::new("adminjob#j1", version, event, &meta, at)
    }

    /// Start, progress and finish fold into one record; silence past the bound reads as
    /// interrupted.
    #[test]
    fn folds_a_job() {
        let t0 = Utc::now();
        let started = env(
            1,
            &AdminJobEvent::AdminJobStarted {
                kind: "bulk_delete".into(),
                params: serde_json::json!({"status": "available"}),
                total: Some(10),
                instance: "api-1".into(),
            },
            t0,
        );
        let progressed = env(
            2,
            &AdminJobEvent::AdminJobProgressed { done: 4, errors: 1 },
            t0 + Duration::seconds(2),
        );
        let stale = Duration::seconds(60);
        let job = AdminJobRecord::fold(
            "j1",
            &[started.clone(), progressed.clone()],
            t0 + Duration::seconds(3),
            stale,
        );
        assert_eq!(
            job.as_ref().map(|j| (j.state, j.done, j.errors, j.total)),
            Some((AdminJobState::Running, 4, 1, Some(10)))
        );
        let later = t0 + Duration::seconds(120);
        assert_eq!(
            AdminJobRecord::fold("j1", &[started.clone(), progressed.clone()], later, stale)
                .map(|j| j.state),
            Some(AdminJobState::Interrupted)
        );
        let finished = env(
            3,
            &AdminJobEvent::AdminJobFinished {
                outcome: "completed".into(),
                done: 10,
                errors: 1,
                error: None,
                summary: serde_json::json!({"deleted": 9}),
            },
            t0 + Duration::seconds(5),
        );
        let job = AdminJobRecord::fold("j1", &[started, progressed, finished], later, stale);
        assert_eq!(
            job.map(|j| (j.state, j.done, j.finished_at.is_some())),
            Some((AdminJobState::Completed, 10, true))
        );
        assert!(AdminJobRecord::fold("j1", &[], later, stale).is_none());
    }
}
