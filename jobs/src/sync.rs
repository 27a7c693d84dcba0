//! Sync: reconcile the pool with the CSP account list.
//!
//! * a listed account the broker has never seen → `Register`;
//! * a listed `stale` sandbox → `Restore`;
//! * an `available` sandbox missing from two consecutive **complete** listings → `MarkStale`;
//! * allocated, pending, quarantined and deleted sandboxes are never touched.
//!
//! Every change is a command through `Broker::execute`, so it is decided on a strong load and
//! appended on condition that nobody wrote in between: an allocation that lands while sync runs
//! wins, and the `MarkStale` is refused (the reference overwrote it, §12 B6). The debounce
//! survives one-shot runs because each complete listing is recorded on the `sync#csp` stream
//! (`ListingRecorded{missing}`); the next run compares with the latest record. Appending that
//! record is itself conditional on the stream's version, so of two syncs racing, only the one
//! whose record lands marks anything stale.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use futures::stream::{self, StreamExt};

use domain::model::events::{BrokerEvent, SyncEvent};
use domain::model::ids::{validate_id, SYNC_STREAM_ID};
use domain::model::sandbox::SandboxCommand;
use domain::service::envelopes;
use domain::{CommandMeta, SandboxStatus, StoreError};

use crate::csp::{CspAccount, CspError};
use crate::error::{is_refusal, JobError};
use crate::runner::{elapsed_ms, Jobs, RowQuery};
use crate::summary::{JobKind, RunStatus, SyncSummary};

/// The most missing ids one `ListingRecorded` keeps (sorted; the rest wait for a later round).
/// Bounds the event well under DynamoDB's 400 KB item size even if CSP suddenly lists nothing.
pub const MAX_RECORDED_MISSING: usize = 5_000;

/// The statuses sync must know about to avoid re-registering a sandbox (deleted ones are looked
/// up one by one, see `register_if_new`).
const LIVE_STATUSES: [SandboxStatus; 5] = [
    SandboxStatus::Available,
    SandboxStatus::Stale,
    SandboxStatus::Allocated,
    SandboxStatus::PendingDeletion,
    SandboxStatus::DeletionFailed,
];

enum Step {
    Register(CspAccount),
    Restore(String),
}

enum StepResult {
    Registered,
    Restored,
    Untouched,
    Invalid,
    Conflict,
}

impl Jobs {
    /// Runs one sync. A listing that failed or was cut short registers what it showed, marks
    /// nothing stale, and returns [`JobError::Listing`] carrying the partial summary.
    pub async fn sync(&self) -> Result<SyncSummary, JobError> {
        let started = Instant::now();
        let mut summary = SyncSummary::default();
        let outcome = self.sync_into(&mut summary).await;
        summary.duration_ms = elapsed_ms(started);
        let (listing_error, error) = match outcome {
            Ok(None) => (None, None),
            Ok(Some(source)) => (Some(source), None),
            Err(e) => (None, Some(e)),
        };
        summary.status = if listing_error.is_some() || error.is_some() {
            RunStatus::Failed
        } else if self.is_stopping() {
            RunStatus::Stopped
        } else {
            RunStatus::Completed
        };
        let error = error.or_else(|| {
            listing_error.map(|cause| JobError::Listing {
                summary: Box::new(summary.clone()),
                cause,
            })
        });
        self.report(JobKind::Sync, started.elapsed(), &summary, error.as_ref());
        let outcome = if error.is_some() { "error" } else { "success" };
        self.sync_metrics(outcome, &summary, started);
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }

    fn sync_metrics(&self, outcome: &str, summary: &SyncSummary, started: Instant) {
        let m = &self.metrics;
        m.sync_total.with_label_values(&[outcome]).inc();
        m.sync_synced.inc_by(summary.synced);
        m.sync_stale.inc_by(summary.marked_stale);
        m.sync_duration.observe(started.elapsed().as_secs_f64());
    }

    /// The body of a sync; `Ok(Some(e))` = the listing was incomplete (registrations done).
    async fn sync_into(&self, summary: &mut SyncSummary) -> Result<Option<CspError>, JobError> {
        let meta = self.meta(JobKind::Sync);
        // Listing writes nothing, so a stop request may abandon it at once (a listing of many
        // pages at the CSP rate limit can outlast a container's shutdown grace).
        let listing = tokio::select! {
            listing = self.csp.list_sandboxes() => listing,
            _ = self.stopped() => return Ok(None),
        };
        summary.pages = listing.pages;
        summary.listing_complete = listing.is_complete();
        // Offsets can shift while CSP accounts come and go, so a page may repeat an account.
        let mut seen = HashSet::new();
        let accounts: Vec<CspAccount> = listing
            .accounts
            .into_iter()
            .filter(|a| seen.insert(a.sandbox_id.clone()))
            .collect();
        summary.listed = accounts.len() as u64;

        let known = self.pool_statuses().await?;
        let mut steps = Vec::new();
        for account in &accounts {
            match known.get(&account.sandbox_id) {
                Some(SandboxStatus::Available) => summary.synced += 1,
                Some(SandboxStatus::Stale) => steps.push(Step::Restore(account.sandbox_id.clone())),
                Some(_) => summary.untouched += 1,
                None => steps.push(Step::Register(account.clone())),
            }
        }
        // Accounts already in the pool count as done; each step adds one as it ends.
        let done = std::sync::atomic::AtomicU64::new(summary.synced);
        crate::progress::report(summary.synced, 0);
        let results: Vec<Result<StepResult, JobError>> = stream::iter(steps)
            .map(|step| async {
                let result = self.sync_step(step, &meta).await;
                let so_far = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                crate::progress::report(so_far, 0);
                result
            })
            .buffer_unordered(self.config.store_concurrency)
            .collect()
            .await;
        let mut failure = None;
        for result in results {
            match result {
                Ok(StepResult::Registered) => {
                    summary.registered += 1;
                    summary.synced += 1;
                }
                Ok(StepResult::Restored) => {
                    summary.restored += 1;
                    summary.synced += 1;
                }
                Ok(StepResult::Untouched) => summary.untouched += 1,
                Ok(StepResult::Invalid) => summary.invalid += 1,
                Ok(StepResult::Conflict) => summary.skipped_conflicts += 1,
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(error) = listing.error {
            return Ok(Some(error));
        }
        if self.is_stopping() {
            return Ok(None);
        }

        if accounts.is_empty() && known.values().any(|s| *s == SandboxStatus::Available) {
            // A complete yet empty listing while the pool holds available sandboxes is far more
            // likely a CSP fault or a token with the wrong scope than every account vanishing at
            // once: record nothing, so it can never count towards marking the pool stale.
            tracing::warn!(target: "job", job = "sync", "CSP listed no sandbox accounts; nothing marked stale");
            return Ok(None);
        }
        let listed: HashSet<&str> = accounts.iter().map(|a| a.sandbox_id.as_str()).collect();
        let mut missing: Vec<String> = known
            .iter()
            .filter(|(id, status)| {
                **status == SandboxStatus::Available && !listed.contains(id.as_str())
            })
            .map(|(id, _)| id.clone())
            .collect();
        missing.sort();
        missing.truncate(MAX_RECORDED_MISSING);
        summary.missing = missing.len() as u64;

        let (previous_version, previously_missing) = self.previous_listing().await?;
        let record = SyncEvent::ListingRecorded {
            listed: u32::try_from(summary.listed).unwrap_or(u32::MAX),
            missing: missing.clone(),
        };
        let now = self.broker.clock().now();
        let batch = envelopes(SYNC_STREAM_ID, previous_version, &[record], &meta, now);
        match self.broker.events().append(batch).await {
            Ok(()) => {}
            Err(StoreError::VersionConflict { .. }) => {
                // A concurrent sync recorded its listing against the same previous one; it owns
                // this round's stale-marking. Ours is simply not recorded.
                summary.skipped_conflicts += 1;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }

        let twice: Vec<String> = missing
            .into_iter()
            .filter(|id| previously_missing.contains(id))
            .collect();
        let results: Vec<_> = stream::iter(twice)
            .map(|id| {
                let meta = &meta;
                async move {
                    self.broker
                        .execute(&id, SandboxCommand::MarkStale, meta)
                        .await
                }
            })
            .buffer_unordered(self.config.store_concurrency)
            .collect()
            .await;
        for result in results {
            match result {
                Ok(_) => summary.marked_stale += 1,
                // Allocated (or otherwise changed) since the view row was written: the
                // allocation wins, sync leaves it alone.
                Err(e) if is_refusal(&e) => summary.skipped_conflicts += 1,
                Err(e) => failure = failure.or(Some(e.into())),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn sync_step(&self, step: Step, meta: &CommandMeta) -> Result<StepResult, JobError> {
        match step {
            Step::Restore(id) => match self
                .broker
                .execute(&id, SandboxCommand::Restore, meta)
                .await
            {
                Ok(_) => Ok(StepResult::Restored),
                Err(e) if is_refusal(&e) => Ok(StepResult::Conflict),
                Err(e) => Err(e.into()),
            },
            Step::Register(account) => self.register_if_new(account, meta).await,
        }
    }

    /// Registers an account the live statuses did not show. The view row may exist as `deleted`
    /// (retired, or deleted while CSP still lists it): that sandbox is never resurrected (the
    /// reference re-created it, §12 B6). If the view lags behind a registration, the model
    /// refuses the second `Register` (`AlreadyRegistered`).
    async fn register_if_new(
        &self,
        account: CspAccount,
        meta: &CommandMeta,
    ) -> Result<StepResult, JobError> {
        if validate_id("sandbox id", &account.sandbox_id).is_err() {
            tracing::warn!(target: "job", job = "sync", sandbox_id = %account.sandbox_id.escape_debug(), "CSP account id refused");
            return Ok(StepResult::Invalid);
        }
        if self.broker.view().get(&account.sandbox_id).await?.is_some() {
            return Ok(StepResult::Untouched);
        }
        let command = SandboxCommand::Register {
            sandbox_id: account.sandbox_id.clone(),
            name: account.name,
            external_id: account.external_id,
            sfdc_account_id: account.sfdc_account_id,
            csp_created_at: account.created_at,
        };
        match self
            .broker
            .execute(&account.sandbox_id, command, meta)
            .await
        {
            Ok(_) => Ok(StepResult::Registered),
            Err(e) if is_refusal(&e) => Ok(StepResult::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Sandbox id → status for every non-deleted sandbox in the view, all pages.
    async fn pool_statuses(&self) -> Result<HashMap<String, SandboxStatus>, JobError> {
        let mut known = HashMap::new();
        for status in LIVE_STATUSES {
            let mut cursor: Option<String> = None;
            loop {
                let page = self
                    .page(RowQuery::Status(status), cursor.as_deref())
                    .await?;
                for row in page.rows {
                    known.entry(row.sandbox_id).or_insert(row.status);
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        Ok(known)
    }

    /// The version of the sync stream and the `missing` set of its latest complete listing.
    async fn previous_listing(&self) -> Result<(u64, HashSet<String>), JobError> {
        let Some(latest) = self.broker.events().load_latest(SYNC_STREAM_ID).await? else {
            return Ok((0, HashSet::new()));
        };
        let missing = match latest.decode() {
            Ok(BrokerEvent::Sync(SyncEvent::ListingRecorded { missing, .. })) => {
                missing.into_iter().collect()
            }
            other => {
                // Unreadable: start the debounce afresh rather than mark anything on bad data.
                tracing::warn!(target: "job", job = "sync", version = latest.version, error = other.err().map(|e| e.to_string()).unwrap_or_default(), "latest sync record unreadable; debounce restarts");
                HashSet::new()
            }
        };
        Ok((latest.version, missing))
    }
}
