//! The long-running worker: one loop per job (sync, cleanup, auto-expiry, stale removal). Each
//! loop runs its job, then waits its interval ± jitter (a delay after the run, as the reference
//! did, so a slow run never overlaps itself). Shutdown asks the jobs to stop: runs in progress
//! finish the items in flight and take no new ones, then the loops end.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::runner::Jobs;
use crate::summary::JobKind;

/// The jobs the worker loops over.
pub const WORKER_JOBS: [JobKind; 6] = [
    JobKind::Sync,
    JobKind::Cleanup,
    JobKind::AutoExpire,
    JobKind::DeleteStale,
    JobKind::Reservations,
    JobKind::ReclaimOrphans,
];

/// Runs every loop until `shutdown` resolves, then stops the jobs and waits for the loops.
pub async fn run(jobs: Arc<Jobs>, shutdown: impl Future<Output = ()>) {
    let loops: Vec<_> = WORKER_JOBS
        .into_iter()
        .map(|kind| tokio::spawn(job_loop(Arc::clone(&jobs), kind)))
        .collect();
    tracing::info!(target: "job", "worker started");
    shutdown.await;
    tracing::info!(target: "job", "shutdown requested; finishing items in flight");
    jobs.stop();
    for handle in loops {
        if let Err(e) = handle.await {
            tracing::error!(target: "job", error = %e, "job loop ended abnormally");
        }
    }
    tracing::info!(target: "job", "worker stopped");
}

async fn job_loop(jobs: Arc<Jobs>, kind: JobKind) {
    let interval = interval_of(&jobs, kind);
    loop {
        if jobs.is_stopping() {
            return;
        }
        // The run logs its own summary line and counts its metrics; a failed run is retried at
        // the next tick, like every other.
        let _ = jobs.run(kind).await;
        let wait = jittered(interval, jobs.config().worker.jitter);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = jobs.stopped() => return,
        }
    }
}

fn interval_of(jobs: &Jobs, kind: JobKind) -> Duration {
    let w = &jobs.config().worker;
    match kind {
        JobKind::Sync => w.sync_interval,
        JobKind::Cleanup => w.cleanup_interval,
        JobKind::AutoExpire => w.auto_expiry_interval,
        JobKind::DeleteStale | JobKind::BulkDelete => w.stale_interval,
        JobKind::Reservations => jobs.config().reservations.interval(),
        JobKind::ReclaimOrphans => jobs.config().heartbeats.check_interval,
    }
}

/// `interval` scaled by a random factor in `[1 − jitter, 1 + jitter]`.
pub fn jittered(interval: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    if jitter == 0.0 {
        return interval;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
    interval.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jitter stays within its band and zero jitter is exact.
    #[test]
    fn jitter_band() {
        let base = Duration::from_secs(100);
        assert_eq!(jittered(base, 0.0), base);
        for _ in 0..100 {
            let d = jittered(base, 0.1);
            assert!(d >= Duration::from_secs(90) && d <= Duration::from_secs(110));
        }
    }
}
