//! Why a job run (or an admin action) failed. Callers branch on these: the API maps them to
//! statuses (store → 503, invalid request → 400, listing → 503), the one-shot runner to its exit
//! code.

use thiserror::Error;

use domain::{BrokerError, DomainError, StoreError};

use crate::config::ConfigError;
use crate::csp::CspError;
use crate::summary::SyncSummary;

/// A failed job run or admin action.
#[derive(Debug, Error)]
pub enum JobError {
    /// The CSP listing failed or was cut short. Accounts it did show were registered; nothing
    /// was marked stale. `summary` says how far the run got.
    #[error("CSP listing incomplete after {pages} page(s): {cause}; nothing was marked stale", pages = summary.pages)]
    Listing {
        /// The partial run.
        summary: Box<SyncSummary>,
        /// Why the listing stopped (shown in the message, so not also exposed as `source()`).
        cause: CspError,
    },
    /// The store failed (unavailable, corrupt item…); the run stopped.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The model refused a direct admin command (e.g. `RetryDeletion` of a sandbox that is not
    /// quarantined, or of an unknown id).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A request the jobs refuse: a bulk delete of `allocated`, a negative grace…
    #[error("{0}")]
    InvalidRequest(String),
}

impl From<BrokerError> for JobError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Store(e) => JobError::Store(e),
            BrokerError::Domain(e) => JobError::Domain(e),
            other => JobError::InvalidRequest(other.to_string()),
        }
    }
}

/// Why [`crate::Jobs::from_config`] could not build the jobs.
#[derive(Debug, Error)]
pub enum InitError {
    /// A setting is unusable (e.g. real CSP mode without a token).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics could not be registered (e.g. registered twice in one registry).
    #[error("registering job metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// True when the model refused a command because the sandbox is no longer in the state the job
/// saw (the view lagged or a concurrent writer won): skip it, count it, move on. A version
/// conflict that outlasted the command's retries is the same situation.
pub(crate) fn is_refusal(e: &BrokerError) -> bool {
    matches!(
        e,
        BrokerError::Domain(_) | BrokerError::Store(StoreError::VersionConflict { .. })
    )
}
