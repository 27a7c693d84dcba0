//! An optional sync when a waiting line forms (`WAIT_SYNC_ON_LINE`): new supply only comes
//! from `sync`, so a line that forms between two scheduled syncs can ask for one at once. It
//! runs as an ordinary admin job (recorded, reported by `GET /v1/admin/jobs`), at most once per
//! `WAIT_SYNC_MIN_INTERVAL_SEC` per instance, so a pool that stays dry does not hammer the CSP.

use std::future::Future;
use std::time::{Duration, Instant};

use domain::CommandMeta;
use jobs::progress::observed;

use crate::admin_jobs::JobRequest;
use crate::routes::admin_jobs::outcome_of;
use crate::state::SharedState;

/// Submits a sync job whenever a line forms on this instance, no more often than
/// `min_interval`; ends when `stop` resolves.
pub async fn sync_when_lines_form(
    state: SharedState,
    min_interval: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            () = state.waiting_line.line_formed() => {}
            () = &mut stop => return,
        }
        if last.is_some_and(|at| at.elapsed() < min_interval) {
            continue;
        }
        last = Some(Instant::now());
        let request =
            JobRequest::of_unknown_size("sync", serde_json::json!({"reason": "waiting_line"}));
        let meta = CommandMeta::job("waiting-line", uuid::Uuid::new_v4().to_string());
        let jobs = state.jobs.clone();
        match state
            .admin_jobs
            .submit(request, &meta, move |progress| async move {
                outcome_of(observed(progress.observer(), jobs.sync()).await)
            })
            .await
        {
            Ok(job_id) => {
                tracing::info!(target: "waiting_line", job_id = %job_id, "a waiting line formed: sync requested")
            }
            Err(e) => {
                tracing::warn!(target: "waiting_line", error = %e, "a waiting line formed but the sync could not be requested")
            }
        }
    }
}
