//! Which DynamoDB failures are worth retrying, and the full-jitter exponential backoff between
//! attempts. Every call of the adapter (reads too) goes through [`Retry`]; the SDK's own retries
//! are off so that attempts are counted and bounded in one place.
//!
//! A transient failure never becomes a version conflict: after the retry budget it is
//! [`StoreError::Unavailable`] (503 with `Retry-After` at the API), which is what it is.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::CancellationReason;
use rand::Rng;

use domain::store::StoreError;

/// First backoff step.
pub(crate) const BASE_DELAY: Duration = Duration::from_millis(25);
/// Largest backoff step.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(1);

/// Error codes after which the same request may simply be sent again: throttling, a
/// transaction that lost to a concurrent one, and the service's own transient failures.
const TRANSIENT_CODES: &[&str] = &[
    "TransactionConflictException",
    "TransactionInProgressException",
    "ReplicatedWriteConflictException",
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "LimitExceededException",
];

/// Cancellation-reason codes of a transaction that make the whole transaction worth retrying.
pub(crate) const TRANSIENT_CANCELLATION_CODES: &[&str] = &[
    "TransactionConflict",
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
    "RequestLimitExceeded",
    "InternalServerError",
];

/// What a cancelled view-write transaction with these reason codes means when no condition
/// failed: worth retrying whole (a transient reason, or no reason at all — every item `None`,
/// as a lock timeout is reported), or refused for good (`None`: the caller reports the codes).
pub(crate) fn cancellation_failure(codes: &[&str]) -> Option<Failure> {
    let transient = codes
        .iter()
        .any(|c| TRANSIENT_CANCELLATION_CODES.contains(c))
        || codes.iter().all(|c| *c == "None");
    transient.then(|| Failure::Transient(format!("transaction cancelled: {codes:?}")))
}

/// What one failed attempt means.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Try again after a backoff.
    Transient(String),
    /// Give up with this error.
    Fatal(StoreError),
}

/// The error code of a service error (e.g. `ConditionalCheckFailedException`), if any.
pub(crate) fn error_code<E: ProvideErrorMetadata>(err: &SdkError<E>) -> Option<&str> {
    match err {
        SdkError::ServiceError(ctx) => ctx.err().code(),
        _ => None,
    }
}

/// A one-line description with the whole cause chain.
pub(crate) fn describe<E>(err: &SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    DisplayErrorContext(err).to_string()
}

/// Classifies a failed call: throttling, transaction conflicts, 5xx answers, timeouts and
/// connection failures are transient; everything else is fatal. A `ValidationException` is
/// reported as `invalid` (the caller knows whether it means a bad cursor, a bad append or a bug);
/// other fatal errors (access denied, missing table) leave the store unusable: `Unavailable`.
pub(crate) fn classify<E>(err: &SdkError<E>, invalid: impl FnOnce(String) -> StoreError) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = describe(err);
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Failure::Transient(message),
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            if TRANSIENT_CODES.contains(&code) || status.is_some_and(|s| s >= 500) {
                Failure::Transient(message)
            } else if code == "ValidationException" {
                Failure::Fatal(invalid(message))
            } else {
                Failure::Fatal(StoreError::Unavailable(message))
            }
        }
        // A response that could not be parsed: transient when the service said 5xx.
        SdkError::ResponseError(_) if status.is_none_or(|s| s >= 500) => {
            Failure::Transient(message)
        }
        _ => Failure::Fatal(StoreError::Unavailable(message)),
    }
}

/// The retry budget of one logical call: `max_retries` further attempts after the first, with a
/// full-jitter exponential backoff (`random(0, min(cap, base · 2^attempt))`) so that concurrent
/// writers that failed together do not retry together.
#[derive(Debug)]
pub(crate) struct Retry {
    what: &'static str,
    attempt: u32,
    max_retries: u32,
    requests: Option<Arc<RequestCounts>>,
}

/// Requests this store sent to DynamoDB, per call name (`Query(by-time)`, `TransactWriteItems(events)`, …),
/// every attempt counted: the cost of an operation is a number anybody can read
/// (`broker_store_requests_total`).
#[derive(Debug, Default)]
pub struct RequestCounts {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    /// Capacity units DynamoDB reported, per `(operation, table, kind)`.
    capacity: Mutex<BTreeMap<(&'static str, String, CapacityKind), f64>>,
    /// Cancelled transactions, per `(call name, first reason code other than "None")`.
    cancellations: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Items of committed transactions and the write units DynamoDB bills for them, per call.
    transaction_items: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

/// Which capacity a request consumed: reads (GetItem, Query, …) or writes (PutItem,
/// TransactWriteItems, …). DynamoDB bills and throttles the two separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CapacityKind {
    /// Read capacity units.
    Read,
    /// Write capacity units.
    Write,
}

impl CapacityKind {
    /// The metric label value (`read` / `write`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

impl RequestCounts {
    /// Counts one request named `what` (`Operation(target)`, the form [`Self::snapshot`] splits).
    pub fn count(&self, what: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(what).or_default() += 1;
    }

    /// Counts one cancelled transaction of the call named `what` under its first reason code
    /// other than `None` (`ConditionalCheckFailed`, `TransactionConflict`, …; `None` when every
    /// item says `None`).
    pub fn count_cancellation(&self, what: &'static str, reasons: &[CancellationReason]) {
        let code = reasons
            .iter()
            .filter_map(CancellationReason::code)
            .find(|c| *c != "None")
            .unwrap_or("None")
            .to_string();
        let mut cancellations = self.cancellations.lock().unwrap_or_else(|p| p.into_inner());
        *cancellations.entry((what, code)).or_default() += 1;
    }

    /// Counts the items of one committed transaction of the call named `what` and the write
    /// units they cost (`metering::transaction_units`).
    pub fn count_transaction_items(&self, what: &'static str, items: u64, units: u64) {
        let mut counts = self
            .transaction_items
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = counts.entry(what).or_default();
        entry.0 += items;
        entry.1 += units;
    }

    /// Every `(operation, target, items, write units)` of the committed transactions so far.
    pub fn transaction_items_snapshot(&self) -> Vec<(String, String, u64, u64)> {
        let counts = self
            .transaction_items
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .map(|(what, (items, units))| {
                let (op, target) = split_call(what);
                (op.to_string(), target.to_string(), *items, *units)
            })
            .collect()
    }

    /// Every `(operation, target, reason, count)` of the cancelled transactions so far.
    pub fn cancellation_snapshot(&self) -> Vec<(String, String, String, u64)> {
        let cancellations = self.cancellations.lock().unwrap_or_else(|p| p.into_inner());
        cancellations
            .iter()
            .map(|((what, reason), n)| {
                let (op, target) = split_call(what);
                (op.to_string(), target.to_string(), reason.clone(), *n)
            })
            .collect()
    }

    /// Adds the capacity units one response reported for `table`.
    pub fn add_capacity(&self, op: &'static str, table: &str, kind: CapacityKind, units: f64) {
        if !units.is_finite() || units <= 0.0 {
            return;
        }
        let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        *capacity.entry((op, table.to_string(), kind)).or_default() += units;
    }

    /// Every `(operation, table, kind, units)` consumed so far.
    pub fn capacity_snapshot(&self) -> Vec<(String, String, CapacityKind, f64)> {
        let capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        capacity
            .iter()
            .map(|((op, table, kind), units)| (op.to_string(), table.clone(), *kind, *units))
            .collect()
    }

    /// Capacity units of `kind` consumed so far, all operations and tables.
    pub fn capacity_total(&self, kind: CapacityKind) -> f64 {
        let capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        capacity
            .iter()
            .filter(|((_, _, k), _)| *k == kind)
            .map(|(_, units)| *units)
            .sum()
    }

    /// Every call name with its request count, as `(operation, target, count)`: the
    /// operation is the DynamoDB API name, the target the table or index it went to.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .map(|(what, n)| {
                let (op, target) = split_call(what);
                (op.to_string(), target.to_string(), *n)
            })
            .collect()
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.values().sum()
    }
}

/// `Operation(target)` as `(operation, target)`.
fn split_call(what: &str) -> (&str, &str) {
    match what.split_once('(') {
        Some((op, rest)) => (op, rest.trim_end_matches(')')),
        None => (what, ""),
    }
}

impl Retry {
    /// A fresh budget for the call named `what` (used in logs and the final error).
    pub(crate) fn new(what: &'static str, max_retries: u32) -> Self {
        Self {
            what,
            attempt: 0,
            max_retries,
            requests: None,
        }
    }

    /// A budget whose every attempt is counted in `requests` (the first one at once).
    pub(crate) fn counted(
        what: &'static str,
        max_retries: u32,
        requests: Arc<RequestCounts>,
    ) -> Self {
        requests.count(what);
        Self {
            requests: Some(requests),
            ..Self::new(what, max_retries)
        }
    }

    /// How many attempts failed so far (0 during the first).
    pub(crate) fn retries(&self) -> u32 {
        self.attempt
    }

    /// After a failed attempt: sleeps and returns `Ok` when another attempt is due; returns the
    /// error to give up with otherwise.
    pub(crate) async fn after(&mut self, failure: Failure) -> Result<(), StoreError> {
        match failure {
            Failure::Fatal(e) => Err(e),
            Failure::Transient(message) if self.attempt >= self.max_retries => {
                tracing::warn!(call = self.what, attempts = self.attempt + 1, %message, "giving up");
                Err(StoreError::Unavailable(format!(
                    "{} failed after {} attempts: {message}",
                    self.what,
                    self.attempt + 1
                )))
            }
            Failure::Transient(message) => {
                let delay = backoff(self.attempt);
                tracing::debug!(call = self.what, attempt = self.attempt + 1, ?delay, %message, "retrying");
                self.attempt += 1;
                tokio::time::sleep(delay).await;
                if let Some(requests) = &self.requests {
                    requests.count(self.what);
                }
                Ok(())
            }
        }
    }
}

/// The full-jitter delay before retry number `attempt + 1`.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_DELAY
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_DELAY);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays stay within the exponential ceiling and never exceed the cap.
    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let ceiling = (25u64 << attempt.min(16)).min(1000);
            for _ in 0..50 {
                assert!(backoff(attempt) <= Duration::from_millis(ceiling));
            }
        }
    }

    /// A transient failure is retried `max_retries` times, then becomes Unavailable, never a
    /// conflict; a fatal one ends at once.
    #[tokio::test]
    async fn retry_budget() {
        let mut retry = Retry::new("PutItem", 2);
        assert!(retry.after(Failure::Transient("x".into())).await.is_ok());
        assert!(retry.after(Failure::Transient("x".into())).await.is_ok());
        assert_eq!(retry.retries(), 2);
        assert!(matches!(
            retry.after(Failure::Transient("x".into())).await,
            Err(StoreError::Unavailable(_))
        ));
        let mut retry = Retry::new("GetItem", 5);
        assert_eq!(
            retry.after(Failure::Fatal(StoreError::InvalidCursor)).await,
            Err(StoreError::InvalidCursor)
        );
    }
}
