//! The dispatch lease (ADR 0018 addendum, ADR 0027): of several API instances, only the one
//! holding a subscriber's lease delivers its notifications.
//!
//! The lease is a checkpoint item (`webhooks:<name>:lease`) holding `{holder, expires_at,
//! epoch}`, taken and renewed by a conditional write that expects the exact value read before:
//! two instances that both see a free or lapsed lease cannot both take it. The holder renews it
//! every third of its duration and trusts it only until two thirds have passed since the last
//! renewal began, so it stops delivering a third of the duration before any other instance may
//! take over — that margin absorbs clock skew between hosts. Times are wall-clock: a lease
//! measures whether a process is alive, not domain time.
//!
//! Each taking of the lease starts a [`Tenure`] with a fresh **epoch**, greater than every
//! earlier one's; renewals keep it. The epoch is the fencing token of the subscriber's delivery
//! state: the state is saved only with an epoch at least the stored one
//! ([`ViewStore::save_checkpoint_fenced`]), so a holder that was paused past its lease (a GC
//! pause, a frozen VM) and has not noticed yet cannot move the position once the next holder
//! has saved.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::model::events::format_time;
use domain::store::ViewStore;
use domain::StoreError;
use serde::{Deserialize, Serialize};

/// What the lease item holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claim {
    holder: String,
    expires_at: String,
    /// The tenure's fencing token; absent (0) in items written before epochs existed.
    #[serde(default)]
    epoch: u64,
}

/// One instance's hold of a lease, from taking it to losing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenure {
    /// Until when the holder may deliver unless a renewal succeeds first.
    pub deadline: tokio::time::Instant,
    /// The fencing token: greater than the epoch of every earlier tenure of this lease.
    pub epoch: u64,
}

/// The epoch of a tenure taking over from `stored`: one more than the stored epoch, and at least
/// the wall-clock milliseconds. The counter alone orders tenures; the clock floor keeps them
/// ordered even if an older release, which does not know epochs, rewrote the item without one in
/// between (its successor would otherwise start again at 1, below the fence already saved).
fn next_epoch(stored: u64, now: DateTime<Utc>) -> u64 {
    let floor = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    stored.saturating_add(1).max(floor)
}

impl Claim {
    fn expires(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.expires_at)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
}

/// One instance's view of one subscriber's lease.
#[derive(Clone)]
pub struct DispatchLease {
    view: Arc<dyn ViewStore>,
    source: String,
    holder: String,
    duration: Duration,
}

impl std::fmt::Debug for DispatchLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchLease")
            .field("source", &self.source)
            .field("holder", &self.holder)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl DispatchLease {
    /// The lease of `subscriber`, claimed as `holder`, lasting `duration` per renewal.
    pub fn new(
        view: Arc<dyn ViewStore>,
        subscriber: &str,
        holder: &str,
        duration: Duration,
    ) -> Self {
        Self {
            view,
            source: format!(
                "{}{subscriber}:lease",
                domain::store::WEBHOOK_CHECKPOINT_PREFIX
            ),
            holder: holder.to_string(),
            duration: duration.max(Duration::from_millis(300)),
        }
    }

    /// How often the holder renews (and a waiting instance retries).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Takes the lease if it is free, lapsed or already ours, else leaves it. `Some(tenure)` when
    /// this instance holds it: it may deliver until `tenure.deadline` unless renewed by then, and
    /// saves its progress with `tenure.epoch`, a new epoch even when the lease was already ours
    /// (each taking starts a new tenure; [`DispatchLease::keep`] renews without changing it).
    pub async fn claim(&self) -> Result<Option<Tenure>, StoreError> {
        let started = tokio::time::Instant::now();
        let now = Utc::now();
        let current = self.view.checkpoint(&self.source).await?;
        let stored = current
            .as_deref()
            .and_then(|raw| serde_json::from_str::<Claim>(raw).ok());
        if let Some(claim) = &stored {
            let live = claim.expires().is_some_and(|at| at > now);
            if live && claim.holder != self.holder {
                return Ok(None);
            }
        }
        let epoch = next_epoch(stored.map_or(0, |claim| claim.epoch), now);
        let deadline = self.write(current.as_deref(), epoch, now, started).await?;
        Ok(deadline.map(|deadline| Tenure { deadline, epoch }))
    }

    /// Renews tenure `epoch`: `Some(deadline)` while the stored lease is still this instance's
    /// with that epoch, `None` once another instance (or a newer tenure) holds it.
    async fn renew(&self, epoch: u64) -> Result<Option<tokio::time::Instant>, StoreError> {
        let started = tokio::time::Instant::now();
        let now = Utc::now();
        let current = self.view.checkpoint(&self.source).await?;
        let ours = current
            .as_deref()
            .and_then(|raw| serde_json::from_str::<Claim>(raw).ok())
            .is_some_and(|claim| claim.holder == self.holder && claim.epoch == epoch);
        if !ours {
            return Ok(None);
        }
        self.write(current.as_deref(), epoch, now, started).await
    }

    /// Writes this instance's claim with `epoch` over `current`, conditionally; the trusted
    /// deadline (two thirds of the duration after `started`) when the write won.
    async fn write(
        &self,
        current: Option<&str>,
        epoch: u64,
        now: DateTime<Utc>,
        started: tokio::time::Instant,
    ) -> Result<Option<tokio::time::Instant>, StoreError> {
        let renewed = Claim {
            holder: self.holder.clone(),
            expires_at: format_time(
                &(now + chrono::Duration::from_std(self.duration).unwrap_or_default()),
            ),
            epoch,
        };
        let raw = serde_json::to_string(&renewed)
            .map_err(|e| StoreError::Corrupt(format!("lease claim: {e}")))?;
        if self
            .view
            .swap_checkpoint(&self.source, current, &raw)
            .await?
        {
            Ok(Some(started + self.duration * 2 / 3))
        } else {
            Ok(None)
        }
    }

    /// Ends this instance's lease at once (graceful stop), so another takes over without
    /// waiting for it to lapse. A lease held by another instance is left alone.
    pub async fn release(&self) -> Result<(), StoreError> {
        let current = self.view.checkpoint(&self.source).await?;
        let Some(claim) = current
            .as_deref()
            .and_then(|raw| serde_json::from_str::<Claim>(raw).ok())
            .filter(|claim| claim.holder == self.holder)
        else {
            return Ok(());
        };
        // The epoch stays: the next holder's tenure counts on from it.
        let released = Claim {
            holder: self.holder.clone(),
            expires_at: format_time(&Utc::now()),
            epoch: claim.epoch,
        };
        let raw = serde_json::to_string(&released)
            .map_err(|e| StoreError::Corrupt(format!("lease claim: {e}")))?;
        self.view
            .swap_checkpoint(&self.source, current.as_deref(), &raw)
            .await
            .map(|_| ())
    }

    /// Renews the lease until it is lost: returns when another instance holds it or when no
    /// renewal succeeded before the trusted time ran out (the store unreachable, or a renewal
    /// stalled: each one is bounded by the trusted time left, so a hung write can never keep
    /// this instance delivering past it while another takes over; docs/liveness.md, path 4).
    pub async fn keep(&self, tenure: Tenure) {
        let mut deadline = tenure.deadline;
        loop {
            let next = (tokio::time::Instant::now() + self.renew_every()).min(deadline);
            tokio::time::sleep_until(next).await;
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(target: "webhooks", lease = %self.source, "dispatch lease not renewed in time; stopping delivery");
                return;
            }
            let Ok(renewal) = tokio::time::timeout_at(deadline, self.renew(tenure.epoch)).await
            else {
                tracing::warn!(target: "webhooks", lease = %self.source, "dispatch lease renewal stalled past the trusted time; stopping delivery");
                return;
            };
            match renewal {
                Ok(Some(until)) => deadline = until,
                Ok(None) => {
                    tracing::warn!(target: "webhooks", lease = %self.source, "dispatch lease taken by another instance; stopping delivery");
                    return;
                }
                Err(e) => {
                    tracing::warn!(target: "webhooks", lease = %self.source, error = %e, "dispatch lease renewal failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Epochs grow by one from the stored one, never fall below the wall clock's milliseconds,
    /// and do not overflow.
    #[test]
    fn epochs_grow() {
        let now = Utc::now();
        let floor = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        assert_eq!(next_epoch(0, now), floor);
        assert_eq!(next_epoch(floor + 5, now), floor + 6);
        assert_eq!(next_epoch(u64::MAX, now), u64::MAX);
    }
}
