//! Live progress of a pass for whoever runs it as a background admin job (ADR 0018 addendum).
//!
//! The API runs `sync`, `cleanup`, `auto_expire` and `delete_stale` as jobs whose progress it
//! records while they run. Rather than thread an observer through every pass's signature (and
//! the worker's scheduled runs, which have nobody to tell), the caller sets one for the task
//! that runs the pass ([`observed`]) and the passes report to it after each page or step; with
//! none set a report costs one task-local lookup.

use std::future::Future;
use std::sync::Arc;

/// How far a pass has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassProgress {
    /// Items the pass acted on successfully (registered, deleted, expired, retired).
    pub done: u64,
    /// Items that failed or were skipped (a concurrent writer won, CSP refused).
    pub errors: u64,
}

/// Receives a pass's progress.
pub type ProgressObserver = Arc<dyn Fn(PassProgress) + Send + Sync>;

tokio::task_local! {
    static OBSERVER: ProgressObserver;
}

/// Runs `pass` with `observer` receiving its progress reports.
pub async fn observed<F: Future>(observer: ProgressObserver, pass: F) -> F::Output {
    OBSERVER.scope(observer, pass).await
}

/// Tells the observer of the current task, if any, how far the pass has come.
pub(crate) fn report(done: u64, errors: u64) {
    let _ = OBSERVER.try_with(|observer| observer(PassProgress { done, errors }));
}
