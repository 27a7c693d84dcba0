//! The commands on a sandbox after its allocation: the owner's mark for deletion and lease
//! extension, and [`Broker::execute`], which runs any sandbox command with a strong load and a
//! conditional append and, when the command ends an allocation, releases the claim and the
//! track's quota slot in the same transaction.

use super::{envelopes, quota, Broker, BrokerError, QUOTA_RETRIES};
use crate::model::claim::ClaimCommand;
use crate::model::events::{CommandMeta, ReleaseReason, SandboxEvent};
use crate::model::ids::{quota_stream, sandbox_stream, validate_id, QUOTA_STREAM_PREFIX};
use crate::model::sandbox::{Sandbox, SandboxCommand};
use crate::store::StoreError;

impl Broker {
    /// The owner ends the allocation: `DeletionRequested` and `ClaimReleased` in one
    /// transaction. A repeat by the owner, or a call after expiry ended it, returns the sandbox
    /// with the original time and appends nothing.
    pub async fn mark_for_deletion(
        &self,
        sandbox_id: &str,
        caller: &str,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        self.execute(
            sandbox_id,
            SandboxCommand::MarkForDeletion {
                caller: caller.to_string(),
            },
            meta,
        )
        .await
    }

    /// Runs one sandbox command with a strong load, the model's decision and a conditional
    /// append; a lost race reloads and decides again (the decision is re-made on fresh state, so
    /// the retry is safe). A command that ends an allocation releases its claim in the same
    /// transaction.
    pub async fn execute(
        &self,
        sandbox_id: &str,
        command: SandboxCommand,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        let stream_id = sandbox_stream(sandbox_id);
        let mut attempt = 0;
        let mut quota_conflicts = 0usize;
        loop {
            attempt += 1;
            let mut sandbox = self.load_sandbox(sandbox_id).await?.sandbox;
            let now = self.clock.now();
            let events = sandbox.decide(command.clone(), now)?;
            if events.is_empty() {
                return Ok(sandbox);
            }
            let mut batch = envelopes(&stream_id, sandbox.version, &events, meta, now);
            let release_reason = events.iter().find_map(|e| match e {
                SandboxEvent::DeletionRequested { .. } => Some(ReleaseReason::DeletionRequested),
                SandboxEvent::AllocationExpired { .. } => Some(ReleaseReason::Expired),
                _ => None,
            });
            if let (Some(reason), Some(claim_id)) = (release_reason, sandbox.claim_stream.clone()) {
                let claim = self.load_claim(&claim_id).await?;
                let release = claim.decide(ClaimCommand::Release {
                    sandbox_id: sandbox_id.to_string(),
                    reason,
                })?;
                batch.extend(envelopes(&claim_id, claim.version, &release, meta, now));
            }
            // An allocation that took a quota slot gives it back in the same transaction that
            // ends it, whatever the quota configuration of this process: the quota stream says
            // whether the sandbox holds a slot.
            let mut _quota_turn = None;
            if let (Some(_), Some(track)) = (release_reason, sandbox.track_name.clone()) {
                _quota_turn = Some(self.track_locks.lock(&track).await);
                let usage = quota::load_usage(self.events.as_ref(), &track).await?;
                if let Some(release) = usage.release(sandbox_id) {
                    batch.extend(envelopes(
                        &quota_stream(&track),
                        usage.version,
                        &[release],
                        meta,
                        now,
                    ));
                }
            }
            let released_slots = batch
                .iter()
                .any(|e| e.stream_id.starts_with(QUOTA_STREAM_PREFIX));
            match self.events.append(batch).await {
                Ok(()) => {
                    if let (true, Some(group), Some(track)) =
                        (released_slots, &self.group, &sandbox.track_name)
                    {
                        // The committer's count of the track is one too high now.
                        group.forget(&quota_stream(track));
                    }
                    for event in &events {
                        sandbox.fold(event);
                    }
                    return Ok(sandbox);
                }
                Err(StoreError::VersionConflict { stream_id })
                    if stream_id.starts_with(QUOTA_STREAM_PREFIX)
                        && quota_conflicts < QUOTA_RETRIES =>
                {
                    // Only the track's count moved (another allocation or release committed
                    // first); that does not spend the command's own retry budget.
                    quota_conflicts += 1;
                    attempt -= 1;
                    continue;
                }
                Err(StoreError::VersionConflict { .. })
                    if attempt < self.config.command_retries =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The owner extends the lab window by `hours` (`LeaseExtended`), within
    /// `MAX_LAB_EXTENSION_HOURS` in total per allocation; refused once the window has ended.
    /// With an `idempotency_key`, a retry of an extension that landed appends nothing and is
    /// answered with that extension's window ([`Sandbox::extension`]).
    pub async fn extend_lease(
        &self,
        sandbox_id: &str,
        caller: &str,
        hours: u32,
        idempotency_key: Option<&str>,
        meta: &CommandMeta,
    ) -> Result<Sandbox, BrokerError> {
        let idempotency_key = idempotency_key
            .map(|k| validate_id("Idempotency-Key", k))
            .transpose()?;
        self.execute(
            sandbox_id,
            SandboxCommand::ExtendLease {
                caller: caller.to_string(),
                hours,
                max_total: self.config.max_extension,
                idempotency_key,
            },
            meta,
        )
        .await
    }

    /// The slots a track's allocations hold now (strongly consistent).
    pub async fn quota_usage(
        &self,
        track: &str,
    ) -> Result<crate::model::quota::QuotaUsage, BrokerError> {
        quota::load_usage(self.events.as_ref(), track).await
    }
}
