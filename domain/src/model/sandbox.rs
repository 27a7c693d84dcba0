//! The Sandbox aggregate: one CSP sandbox account's lifecycle, on cqrs-es's `Aggregate` trait.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::error::DomainError;
use super::events::{truncate_to_millis, SandboxEvent};
use super::lifecycle::{next_status, SandboxStatus, Transition};
use crate::clock::SharedClock;

/// What the sandbox handlers need from outside: the time.
#[derive(Debug, Clone)]
pub struct CommandServices {
    /// The clock every command reads.
    pub clock: SharedClock,
}

/// Commands on a sandbox (one enum, one dispatch point in [`Sandbox::handle`]).
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxCommand {
    /// Sync found a new active account.
    Register {
        /// Broker id.
        sandbox_id: String,
        /// CSP name.
        name: String,
        /// CSP account path.
        external_id: String,
        /// Salesforce account id.
        sfdc_account_id: Option<String>,
        /// CSP creation time.
        csp_created_at: Option<DateTime<Utc>>,
    },
    /// Hand the sandbox to a student.
    Allocate {
        /// The student.
        caller: String,
        /// Lab slug.
        track_name: Option<String>,
        /// Idempotency key (scoped to the caller).
        idempotency_key: String,
        /// The claim stream written in the same transaction.
        claim_stream: String,
        /// Lab window length.
        lab_duration: Duration,
        /// How long the request waited in line first, when it waited.
        waited_ms: Option<u64>,
    },
    /// The owner ends the allocation.
    MarkForDeletion {
        /// Who asks; must be the owner.
        caller: String,
    },
    /// The expiry job ends an allocation past `expires_at + grace`.
    Expire {
        /// Extra time after `expires_at`.
        grace: Duration,
    },
    /// Sync: missing from two consecutive complete listings.
    MarkStale,
    /// Sync: listed again.
    Restore,
    /// Cleanup: a CSP delete failed and will be retried.
    RecordDeletionAttemptFailed {
        /// What failed.
        error: String,
        /// Earliest retry.
        next_attempt_at: DateTime<Utc>,
        /// Whether the failure was transient (5xx, timeout, connection error).
        transient: bool,
    },
    /// Cleanup: the retry budget (refusals) or the retry window (transient failures) is spent.
    FailDeletion {
        /// The last error.
        error: String,
        /// Whether the last failure was transient (the window ran out).
        transient: bool,
    },
    /// Operator: re-queue a quarantined sandbox.
    RetryDeletion,
    /// Cleanup: hold the deletion until `until` before calling CSP, so that concurrent workers
    /// leave it alone. Refused while another worker's lease is live; a worker may renew its own.
    LeaseDeletion {
        /// The worker asking.
        worker: String,
        /// When the lease lapses.
        until: DateTime<Utc>,
    },
    /// Cleanup: CSP confirmed the account is gone.
    CompleteDeletion {
        /// The CSP status code.
        csp_status: Option<u16>,
    },
    /// Store-only removal (stale grace expired, bulk delete).
    Retire {
        /// Why.
        reason: String,
    },
    /// The owner extends the lab window by `hours`, within `max_total` over the allocation.
    ExtendLease {
        /// Who asks; must be the owner.
        caller: String,
        /// Hours to add (at least 1).
        hours: u32,
        /// `MAX_LAB_EXTENSION_HOURS`: the most all extensions of one allocation may add.
        max_total: Duration,
        /// The request's `Idempotency-Key`: an extension of this allocation already made with
        /// it is answered again and nothing is appended.
        idempotency_key: Option<String>,
    },
    /// The reservation job earmarks the available sandbox for a track until `ends_at`.
    Reserve {
        /// The reservation.
        reservation_id: String,
        /// The only track that may be allocated it meanwhile.
        track: String,
        /// The end of the reservation's window.
        ends_at: DateTime<Utc>,
    },
    /// The reservation's unused earmark is lifted (cancel, window end).
    Unreserve {
        /// The reservation whose earmark is lifted; another reservation's is left alone.
        reservation_id: String,
    },
    /// The heartbeat reclaim ends an allocation whose lab stopped sending heartbeats (ADR 0030):
    /// recorded as a `DeletionRequested` with `reason: heartbeat_missed`, releasing the claim
    /// like the owner's mark. Only the allocation that began at `allocated_at`, only while it
    /// is still allocated: a sandbox already being deleted is left alone.
    Reclaim {
        /// When the allocation the job judged began.
        allocated_at: DateTime<Utc>,
        /// The last heartbeat the job saw (the allocation time when none came).
        last_heartbeat_at: DateTime<Utc>,
    },
    /// The heartbeat reclaim warns that the allocation that began at `allocated_at` has missed
    /// its heartbeats since `last_heartbeat_at` (once per silence).
    WarnHeartbeat {
        /// When the allocation the job judged began.
        allocated_at: DateTime<Utc>,
        /// The last heartbeat the job saw (the allocation time when none came).
        last_heartbeat_at: DateTime<Utc>,
        /// When the reclaim follows unless a heartbeat comes first.
        reclaim_at: DateTime<Utc>,
    },
}

/// A reservation's hold on an available sandbox (ADR 0028): until `ends_at` only `track` may be
/// allocated it. It stays on the state (and the view row) after the allocation, so that the
/// reservation can count the sandbox as used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Earmark {
    /// The reservation.
    pub reservation_id: String,
    /// The track it is for.
    pub track: String,
    /// When it stops binding.
    pub ends_at: DateTime<Utc>,
}

impl Earmark {
    /// The track this earmark keeps the sandbox for at `now`; `None` once the window has ended
    /// (an ended window binds nobody, even before the reservation job lifts the earmark).
    pub fn binding_at(&self, now: DateTime<Utc>) -> Option<&str> {
        (now < self.ends_at).then_some(self.track.as_str())
    }
}

/// One extension of the current allocation made with an `Idempotency-Key`, as it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyedExtension {
    /// The request's key.
    pub idempotency_key: String,
    /// The end of the window this extension set.
    pub expires_at: DateTime<Utc>,
    /// Seconds added by all extensions up to and including this one.
    pub extended_total_s: i64,
}

/// The state folded from a sandbox stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    /// Broker id (empty until registered).
    pub sandbox_id: String,
    /// `None` until registered.
    pub status: Option<SandboxStatus>,
    /// CSP name.
    pub name: String,
    /// CSP account path.
    pub external_id: String,
    /// Salesforce account id.
    pub sfdc_account_id: Option<String>,
    /// CSP creation time.
    pub csp_created_at: Option<DateTime<Utc>>,
    /// The current or most recent owner.
    pub owner: Option<String>,
    /// The claim stream of the current or most recent allocation.
    pub claim_stream: Option<String>,
    /// Lab slug of the allocation.
    pub track_name: Option<String>,
    /// Idempotency key of the allocation.
    pub idempotency_key: Option<String>,
    /// When allocated.
    pub allocated_at: Option<DateTime<Utc>>,
    /// End of the lab window.
    pub expires_at: Option<DateTime<Utc>>,
    /// Lab duration recorded at allocation.
    pub lab_duration_s: Option<i64>,
    /// Seconds added to the lab window by extensions of the current allocation.
    #[serde(default)]
    pub extended_s: i64,
    /// The keyed extensions of the current allocation (at most one per hour of
    /// `MAX_LAB_EXTENSION_HOURS`), so a retried extension is answered, not applied twice.
    #[serde(default)]
    pub extensions: Vec<KeyedExtension>,
    /// When the allocation ended (marked or expired): the `deletion_requested_at` callers see.
    pub deletion_requested_at: Option<DateTime<Utc>>,
    /// Whether the allocation ended by expiry rather than by the owner.
    pub expired: bool,
    /// Failed CSP delete attempts since the last (re)queue, transient or not.
    pub attempts: u32,
    /// Of those, the refusals (non-transient failures): what `DELETION_RETRY_MAX_ATTEMPTS` counts.
    #[serde(default)]
    pub refusals: u32,
    /// When the current run of failed attempts began: the retry window is measured from here.
    #[serde(default)]
    pub failing_since: Option<DateTime<Utc>>,
    /// The last delete error.
    pub last_error: Option<String>,
    /// Earliest next delete attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The cleanup worker holding the deletion lease, if any (live only until `lease_until`).
    #[serde(default)]
    pub lease_holder: Option<String>,
    /// When that lease lapses.
    #[serde(default)]
    pub lease_until: Option<DateTime<Utc>>,
    /// Events applied (= the stream's version).
    pub version: u64,
    /// The reservation earmark, if one was set and not lifted (ADR 0028).
    #[serde(default)]
    pub earmark: Option<Earmark>,
    /// The heartbeat grace of the current allocation (seconds), when its track opted in.
    #[serde(default)]
    pub heartbeat_grace_s: Option<u32>,
    /// The heartbeat interval of the current allocation (seconds), when its track opted in.
    #[serde(default)]
    pub heartbeat_interval_s: Option<u32>,
    /// The last heartbeat time a `HeartbeatMissed` of the current allocation warned about.
    #[serde(default)]
    pub heartbeat_warned_for: Option<DateTime<Utc>>,
}

impl Sandbox {
    /// The extension of the current allocation made with `idempotency_key`, if any.
    pub fn extension(&self, idempotency_key: &str) -> Option<&KeyedExtension> {
        self.extensions
            .iter()
            .find(|e| e.idempotency_key == idempotency_key)
    }

    /// True when `caller` holds this sandbox right now.
    pub fn is_live_allocation_of(&self, caller: &str) -> bool {
        self.status == Some(SandboxStatus::Allocated) && self.owner.as_deref() == Some(caller)
    }

    /// The holder of a deletion lease that is still live at `now`, unless it is `worker`.
    pub fn leased_to_other(
        &self,
        worker: &str,
        now: DateTime<Utc>,
    ) -> Option<(&str, DateTime<Utc>)> {
        match (self.lease_holder.as_deref(), self.lease_until) {
            (Some(holder), Some(until)) if holder != worker && until > now => Some((holder, until)),
            _ => None,
        }
    }

    fn check(&self, transition: Transition) -> Result<(), DomainError> {
        if self.status.is_none() && transition != Transition::Register {
            return Err(DomainError::NotFound);
        }
        next_status(self.status, transition)
            .map(|_| ())
            .ok_or(DomainError::InvalidTransition {
                from: self.status,
                transition,
            })
    }

    fn transition_of(event: &SandboxEvent) -> Transition {
        match event {
            SandboxEvent::SandboxRegistered { .. } => Transition::Register,
            SandboxEvent::SandboxAllocated { .. } => Transition::Allocate,
            SandboxEvent::DeletionRequested { .. } => Transition::RequestDeletion,
            SandboxEvent::AllocationExpired { .. } => Transition::Expire,
            SandboxEvent::SandboxMarkedStale { .. } => Transition::MarkStale,
            SandboxEvent::SandboxRestored { .. } => Transition::Restore,
            SandboxEvent::DeletionAttemptFailed { .. } => Transition::RecordAttemptFailed,
            SandboxEvent::DeletionFailed { .. } => Transition::FailDeletion,
            SandboxEvent::DeletionRetried { .. } => Transition::RetryDeletion,
            SandboxEvent::SandboxDeleted { .. } => Transition::CompleteDeletion,
            SandboxEvent::SandboxRetired { .. } => Transition::Retire,
            SandboxEvent::DeletionLeased { .. } => Transition::LeaseDeletion,
            SandboxEvent::LeaseExtended { .. } => Transition::ExtendLease,
            SandboxEvent::SandboxReserved { .. } => Transition::Reserve,
            SandboxEvent::SandboxUnreserved { .. } => Transition::Unreserve,
            SandboxEvent::HeartbeatMissed { .. } => Transition::MissHeartbeat,
        }
    }

    /// Decides the events for `command` without the async sink (the same logic `handle` runs).
    pub fn decide(
        &self,
        command: SandboxCommand,
        now: DateTime<Utc>,
    ) -> Result<Vec<SandboxEvent>, DomainError> {
        use SandboxCommand as C;
        use SandboxEvent as E;
        // Stored times have millisecond precision (envelopes and view rows alike), so payload
        // times are cut to it too: a replay then reproduces every row exactly on every adapter.
        let now = truncate_to_millis(now);
        let event = match command {
            C::Register {
                sandbox_id,
                name,
                external_id,
                sfdc_account_id,
                csp_created_at,
            } => {
                if self.status.is_some() {
                    return Err(DomainError::AlreadyRegistered);
                }
                E::SandboxRegistered {
                    sandbox_id,
                    name,
                    external_id,
                    sfdc_account_id,
                    csp_created_at,
                }
            }
            C::Allocate {
                caller,
                track_name,
                idempotency_key,
                claim_stream,
                lab_duration,
                waited_ms,
            } => {
                self.check(Transition::Allocate)?;
                // An earmark binds until its window ends: another track (or a request without
                // one) is refused, on the sandbox's own stream, so the rule holds under any race.
                if let Some(earmark) = &self.earmark {
                    if let Some(track) = earmark.binding_at(now) {
                        if track_name.as_deref() != Some(track) {
                            return Err(DomainError::ReservedForTrack {
                                track: track.to_string(),
                                until: earmark.ends_at,
                            });
                        }
                    }
                }
                E::SandboxAllocated {
                    caller,
                    track_name,
                    idempotency_key,
                    claim_stream,
                    allocated_at: now,
                    expires_at: now + lab_duration,
                    lab_duration_s: lab_duration.num_seconds(),
                    heartbeat_interval_s: None,
                    heartbeat_grace_s: None,
                    waited_ms,
                }
            }
            C::MarkForDeletion { caller } => {
                if self.status.is_none() {
                    return Err(DomainError::NotFound);
                }
                if self.owner.as_deref() != Some(caller.as_str()) {
                    return Err(DomainError::NotOwner);
                }
                if self.status != Some(SandboxStatus::Allocated) {
                    // The owner's allocation already ended (a repeat, or expiry got there first):
                    // nothing to record, the caller gets the original time.
                    return Ok(vec![]);
                }
                E::DeletionRequested {
                    caller,
                    requested_at: now,
                    reason: None,
                    last_heartbeat_at: None,
                }
            }
            C::WarnHeartbeat {
                allocated_at,
                last_heartbeat_at,
                reclaim_at,
            } => {
                if self.status != Some(SandboxStatus::Allocated)
                    || self.allocated_at != Some(truncate_to_millis(allocated_at))
                    || self.heartbeat_warned_for == Some(truncate_to_millis(last_heartbeat_at))
                {
                    // Ended, or already warned about this silence: nothing to add.
                    return Ok(vec![]);
                }
                E::HeartbeatMissed {
                    last_heartbeat_at: truncate_to_millis(last_heartbeat_at),
                    reclaim_at: truncate_to_millis(reclaim_at),
                }
            }
            C::Reclaim {
                allocated_at,
                last_heartbeat_at,
            } => {
                if self.status != Some(SandboxStatus::Allocated)
                    || self.allocated_at != Some(truncate_to_millis(allocated_at))
                {
                    // Already ended (the owner marked it, expiry or cleanup got there first):
                    // nothing to reclaim.
                    return Ok(vec![]);
                }
                E::DeletionRequested {
                    caller: self.owner.clone().unwrap_or_default(),
                    requested_at: now,
                    reason: Some(crate::heartbeat::RECLAIM_REASON.to_string()),
                    last_heartbeat_at: Some(truncate_to_millis(last_heartbeat_at)),
                }
            }
            C::Expire { grace } => {
                self.check(Transition::Expire)?;
                let due = self.expires_at.unwrap_or(now) + grace;
                if now < due {
                    return Err(DomainError::NotExpired { due });
                }
                E::AllocationExpired { expired_at: now }
            }
            C::MarkStale => {
                self.check(Transition::MarkStale)?;
                E::SandboxMarkedStale { marked_at: now }
            }
            C::Restore => {
                self.check(Transition::Restore)?;
                E::SandboxRestored { restored_at: now }
            }
            C::RecordDeletionAttemptFailed {
                error,
                next_attempt_at,
                transient,
            } => {
                self.check(Transition::RecordAttemptFailed)?;
                E::DeletionAttemptFailed {
                    attempt: self.attempts + 1,
                    error,
                    next_attempt_at: truncate_to_millis(next_attempt_at),
                    transient,
                    failing_since: Some(self.failing_since.unwrap_or(now)),
                }
            }
            C::FailDeletion { error, transient } => {
                self.check(Transition::FailDeletion)?;
                E::DeletionFailed {
                    attempts: self.attempts + 1,
                    last_error: error,
                    transient,
                }
            }
            C::RetryDeletion => {
                self.check(Transition::RetryDeletion)?;
                E::DeletionRetried { requested_at: now }
            }
            C::LeaseDeletion { worker, until } => {
                self.check(Transition::LeaseDeletion)?;
                if let Some((holder, until)) = self.leased_to_other(&worker, now) {
                    return Err(DomainError::DeletionLeased {
                        holder: holder.to_string(),
                        until,
                    });
                }
                E::DeletionLeased {
                    worker,
                    until: truncate_to_millis(until),
                }
            }
            C::CompleteDeletion { csp_status } => {
                self.check(Transition::CompleteDeletion)?;
                E::SandboxDeleted { csp_status }
            }
            C::Retire { reason } => {
                self.check(Transition::Retire)?;
                E::SandboxRetired { reason }
            }
            C::ExtendLease {
                caller,
                hours,
                max_total,
                idempotency_key,
            } => {
                if self.status.is_none() {
                    return Err(DomainError::NotFound);
                }
                if self.owner.as_deref() != Some(caller.as_str()) {
                    return Err(DomainError::NotOwner);
                }
                self.check(Transition::ExtendLease)?;
                // A retry of an extension that landed (its answer was lost, the client timed
                // out) is answered from the record, even once the extended window has passed.
                if idempotency_key
                    .as_deref()
                    .is_some_and(|key| self.extension(key).is_some())
                {
                    return Ok(vec![]);
                }
                let previous = self.expires_at.unwrap_or(now);
                // The window is over once `expires_at` has passed, even while the expiry job's
                // grace has not run out: extending then would revive an ended lab.
                if now >= previous {
                    return Err(DomainError::LeaseExpired {
                        expires_at: previous,
                    });
                }
                let added = Duration::hours(i64::from(hours));
                let total = self.extended_s + added.num_seconds();
                if total > max_total.num_seconds() {
                    return Err(DomainError::ExtensionLimit {
                        max_hours: u32::try_from(max_total.num_hours()).unwrap_or(u32::MAX),
                        used_hours: u32::try_from(self.extended_s / 3600).unwrap_or(u32::MAX),
                    });
                }
                E::LeaseExtended {
                    caller,
                    hours,
                    previous_expires_at: previous,
                    expires_at: previous + added,
                    extended_total_s: total,
                    idempotency_key,
                }
            }
            C::Reserve {
                reservation_id,
                track,
                ends_at,
            } => {
                self.check(Transition::Reserve)?;
                if let Some(earmark) = &self.earmark {
                    if earmark.binding_at(now).is_some() {
                        return Err(DomainError::AlreadyEarmarked {
                            reservation_id: earmark.reservation_id.clone(),
                        });
                    }
                }
                E::SandboxReserved {
                    reservation_id,
                    track,
                    ends_at: truncate_to_millis(ends_at),
                }
            }
            C::Unreserve { reservation_id } => {
                // Only an available sandbox still earmarked by this reservation has anything to
                // lift: an allocated one was used, another reservation's earmark is not ours.
                let ours = self
                    .earmark
                    .as_ref()
                    .is_some_and(|e| e.reservation_id == reservation_id);
                if !ours || self.status != Some(SandboxStatus::Available) {
                    return Ok(vec![]);
                }
                E::SandboxUnreserved { reservation_id }
            }
        };
        Ok(vec![event])
    }

    /// Folds one event into the state (also used when replaying history).
    pub fn fold(&mut self, event: &SandboxEvent) {
        use SandboxEvent as E;
        if let Some(next) = next_status(self.status, Self::transition_of(event)) {
            self.status = Some(next);
        }
        self.version += 1;
        match event {
            E::SandboxRegistered {
                sandbox_id,
                name,
                external_id,
                sfdc_account_id,
                csp_created_at,
            } => {
                self.sandbox_id.clone_from(sandbox_id);
                self.name.clone_from(name);
                self.external_id.clone_from(external_id);
                self.sfdc_account_id.clone_from(sfdc_account_id);
                self.csp_created_at = *csp_created_at;
            }
            E::SandboxAllocated {
                caller,
                track_name,
                idempotency_key,
                claim_stream,
                allocated_at,
                expires_at,
                lab_duration_s,
                heartbeat_grace_s,
                heartbeat_interval_s,
                ..
            } => {
                self.heartbeat_grace_s = *heartbeat_grace_s;
                self.heartbeat_interval_s = *heartbeat_interval_s;
                self.heartbeat_warned_for = None;
                self.owner = Some(caller.clone());
                self.track_name.clone_from(track_name);
                self.idempotency_key = Some(idempotency_key.clone());
                self.claim_stream = Some(claim_stream.clone());
                self.allocated_at = Some(*allocated_at);
                self.expires_at = Some(*expires_at);
                self.lab_duration_s = Some(*lab_duration_s);
                self.extended_s = 0;
                self.extensions.clear();
            }
            E::LeaseExtended {
                expires_at,
                extended_total_s,
                idempotency_key,
                ..
            } => {
                self.expires_at = Some(*expires_at);
                self.extended_s = *extended_total_s;
                if let Some(key) = idempotency_key {
                    self.extensions.push(KeyedExtension {
                        idempotency_key: key.clone(),
                        expires_at: *expires_at,
                        extended_total_s: *extended_total_s,
                    });
                }
            }
            E::DeletionRequested { requested_at, .. } => {
                self.deletion_requested_at = Some(*requested_at);
            }
            E::AllocationExpired { expired_at } => {
                self.deletion_requested_at = Some(*expired_at);
                self.expired = true;
            }
            E::SandboxMarkedStale { .. } | E::SandboxRestored { .. } => {}
            E::DeletionAttemptFailed {
                attempt,
                error,
                next_attempt_at,
                transient,
                failing_since,
            } => {
                self.attempts = *attempt;
                if !transient {
                    self.refusals += 1;
                }
                self.last_error = Some(error.clone());
                self.next_attempt_at = Some(*next_attempt_at);
                self.failing_since = *failing_since;
            }
            E::DeletionFailed {
                attempts,
                last_error,
                ..
            } => {
                self.attempts = *attempts;
                self.last_error = Some(last_error.clone());
                self.next_attempt_at = None;
            }
            E::DeletionRetried { .. } => {
                self.attempts = 0;
                self.refusals = 0;
                self.failing_since = None;
                self.next_attempt_at = None;
            }
            E::SandboxDeleted { .. } | E::SandboxRetired { .. } => {
                self.next_attempt_at = None;
            }
            E::DeletionLeased { worker, until } => {
                self.lease_holder = Some(worker.clone());
                self.lease_until = Some(*until);
            }
            E::SandboxReserved {
                reservation_id,
                track,
                ends_at,
            } => {
                self.earmark = Some(Earmark {
                    reservation_id: reservation_id.clone(),
                    track: track.clone(),
                    ends_at: *ends_at,
                });
            }
            E::SandboxUnreserved { .. } => {
                self.earmark = None;
            }
            E::HeartbeatMissed {
                last_heartbeat_at, ..
            } => {
                self.heartbeat_warned_for = Some(*last_heartbeat_at);
            }
        }
        // Whatever the holder (or an operator) records next ends the lease.
        if !matches!(event, E::DeletionLeased { .. }) {
            self.lease_holder = None;
            self.lease_until = None;
        }
    }
}

impl Aggregate for Sandbox {
    const TYPE: &'static str = "sandbox";
    type Command = SandboxCommand;
    type Event = SandboxEvent;
    type Error = DomainError;
    type Services = CommandServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services.clock.now())? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.fold(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use cqrs_es::test::TestFramework;
    use std::sync::Arc;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    fn services() -> CommandServices {
        CommandServices {
            clock: Arc::new(ManualClock::new(t0())),
        }
    }

    fn registered() -> SandboxEvent {
        SandboxEvent::SandboxRegistered {
            sandbox_id: "1".into(),
            name: "lab-1".into(),
            external_id: "identity/accounts/u1".into(),
            sfdc_account_id: None,
            csp_created_at: None,
        }
    }

    fn allocated() -> SandboxEvent {
        SandboxEvent::SandboxAllocated {
            caller: "stu".into(),
            track_name: None,
            idempotency_key: "stu".into(),
            claim_stream: "claim#3:stu#stu".into(),
            allocated_at: t0(),
            expires_at: t0() + Duration::hours(48),
            lab_duration_s: 48 * 3600,
            heartbeat_interval_s: None,
            heartbeat_grace_s: None,
            waited_ms: None,
        }
    }

    /// Allocation of an available sandbox records the lab window from the injected clock.
    #[tokio::test]
    async fn allocate_available_sandbox() {
        TestFramework::<Sandbox>::with(services())
            .given(vec![registered()])
            .when_async(SandboxCommand::Allocate {
                caller: "stu".into(),
                track_name: None,
                idempotency_key: "stu".into(),
                claim_stream: "claim#3:stu#stu".into(),
                lab_duration: Duration::hours(48),
                waited_ms: None,
            })
            .await
            .then_expect_events(vec![allocated()]);
    }

    /// An allocated sandbox cannot be allocated again.
    #[tokio::test]
    async fn no_double_allocation() {
        TestFramework::<Sandbox>::with(services())
            .given(vec![registered(), allocated()])
            .when_async(SandboxCommand::Allocate {
                caller: "other".into(),
                track_name: None,
                idempotency_key: "other".into(),
                claim_stream: "claim#5:other#other".into(),
                lab_duration: Duration::hours(48),
                waited_ms: None,
            })
            .await
            .then_expect_error(DomainError::InvalidTransition {
                from: Some(SandboxStatus::Allocated),
                transition: Transition::Allocate,
            });
    }

    /// Only the owner may mark; a repeat by the owner records nothing and is not an error.
    #[tokio::test]
    async fn mark_for_deletion_is_owner_only_and_idempotent() {
        TestFramework::<Sandbox>::with(services())
            .given(vec![registered(), allocated()])
            .when_async(SandboxCommand::MarkForDeletion {
                caller: "mallory".into(),
            })
            .await
            .then_expect_error(DomainError::NotOwner);
        TestFramework::<Sandbox>::with(services())
            .given(vec![registered(), allocated()])
            .when_async(SandboxCommand::MarkForDeletion {
                caller: "stu".into(),
            })
            .await
            .then_expect_events(vec![SandboxEvent::DeletionRequested {
                caller: "stu".into(),
                requested_at: t0(),
                reason: None,
                last_heartbeat_at: None,
            }]);
        TestFramework::<Sandbox>::with(services())
            .given(vec![
                registered(),
                allocated(),
                SandboxEvent::DeletionRequested {
                    caller: "stu".into(),
                    requested_at: t0(),
                    reason: None,
                    last_heartbeat_at: None,
                },
            ])
            .when_async(SandboxCommand::MarkForDeletion {
                caller: "stu".into(),
            })
            .await
            .then_expect_events(vec![]);
    }

    /// Expire is refused before `expires_at + grace` and accepted after.
    #[test]
    fn expire_waits_for_grace() {
        let mut sandbox = Sandbox::default();
        sandbox.fold(&registered());
        sandbox.fold(&allocated());
        let grace = Duration::minutes(30);
        let early = t0() + Duration::hours(48);
        assert!(matches!(
            sandbox.decide(SandboxCommand::Expire { grace }, early),
            Err(DomainError::NotExpired { .. })
        ));
        let late = early + grace;
        assert_eq!(
            sandbox.decide(SandboxCommand::Expire { grace }, late),
            Ok(vec![SandboxEvent::AllocationExpired { expired_at: late }])
        );
    }

    /// Commands on a sandbox that was never registered answer NotFound.
    #[test]
    fn unknown_sandbox_is_not_found() {
        let sandbox = Sandbox::default();
        for command in [
            SandboxCommand::MarkForDeletion { caller: "x".into() },
            SandboxCommand::MarkStale,
            SandboxCommand::RetryDeletion,
        ] {
            assert_eq!(sandbox.decide(command, t0()), Err(DomainError::NotFound));
        }
    }

    /// Transient failures count as attempts but not as refusals, and every failure of one run
    /// carries the time the run began; an old event without the new fields reads as a refusal.
    #[test]
    fn transient_failures_keep_the_window_start() {
        let mut sandbox = Sandbox::default();
        sandbox.fold(&registered());
        sandbox.fold(&allocated());
        sandbox.fold(&SandboxEvent::AllocationExpired { expired_at: t0() });
        for minutes in [0, 5] {
            let events = sandbox
                .decide(
                    SandboxCommand::RecordDeletionAttemptFailed {
                        error: "500".into(),
                        next_attempt_at: t0(),
                        transient: true,
                    },
                    t0() + Duration::minutes(minutes),
                )
                .unwrap_or_default();
            assert!(matches!(
                events.as_slice(),
                [SandboxEvent::DeletionAttemptFailed { failing_since: Some(at), transient: true, .. }]
                    if *at == t0()
            ));
            sandbox.fold(&events[0]);
        }
        assert_eq!((sandbox.attempts, sandbox.refusals), (2, 0));
        let old: SandboxEvent = serde_json::from_value(serde_json::json!({
            "type": "DeletionAttemptFailed",
            "attempt": 3,
            "error": "HTTP 500",
            "next_attempt_at": "2027-01-15T08:00:00Z",
        }))
        .unwrap_or_else(|e| panic!("old payload: {e}"));
        sandbox.fold(&old);
        assert_eq!((sandbox.attempts, sandbox.refusals), (3, 1));
    }

    /// A deletion lease keeps the status, refuses another worker while live, lets its holder
    /// renew, lapses on its own, and ends with whatever is recorded next.
    #[test]
    fn deletion_lease() {
        let mut sandbox = Sandbox::default();
        sandbox.fold(&registered());
        let lease = |worker: &str, until| SandboxCommand::LeaseDeletion {
            worker: worker.into(),
            until,
        };
        assert!(matches!(
            sandbox.decide(lease("a", t0()), t0()),
            Err(DomainError::InvalidTransition { .. })
        ));
        sandbox.fold(&allocated());
        sandbox.fold(&SandboxEvent::AllocationExpired { expired_at: t0() });
        let until = t0() + Duration::minutes(5);
        let events = sandbox.decide(lease("a", until), t0()).unwrap_or_default();
        sandbox.fold(&events[0]);
        assert_eq!(sandbox.status, Some(SandboxStatus::PendingDeletion));
        assert_eq!(
            sandbox.decide(lease("b", until), t0() + Duration::minutes(1)),
            Err(DomainError::DeletionLeased {
                holder: "a".into(),
                until
            })
        );
        assert!(sandbox.decide(lease("a", until), t0()).is_ok(), "renewal");
        assert!(
            sandbox.decide(lease("b", until), until).is_ok(),
            "a lapsed lease is ignored"
        );
        sandbox.fold(&SandboxEvent::SandboxDeleted {
            csp_status: Some(204),
        });
        assert_eq!((sandbox.lease_holder, sandbox.lease_until), (None, None));
    }

    /// Failed delete attempts count up, quarantine keeps the count, an operator retry resets it.
    #[test]
    fn deletion_retry_budget() {
        let mut sandbox = Sandbox::default();
        sandbox.fold(&registered());
        sandbox.fold(&allocated());
        sandbox.fold(&SandboxEvent::AllocationExpired { expired_at: t0() });
        for expected in 1..=2 {
            let events = sandbox
                .decide(
                    SandboxCommand::RecordDeletionAttemptFailed {
                        error: "403".into(),
                        next_attempt_at: t0(),
                        transient: false,
                    },
                    t0(),
                )
                .unwrap_or_default();
            assert!(matches!(
                events.as_slice(),
                [SandboxEvent::DeletionAttemptFailed { attempt, .. }] if *attempt == expected
            ));
            sandbox.fold(&events[0]);
        }
        let events = sandbox
            .decide(
                SandboxCommand::FailDeletion {
                    error: "403".into(),
                    transient: false,
                },
                t0(),
            )
            .unwrap_or_default();
        assert!(matches!(
            events.as_slice(),
            [SandboxEvent::DeletionFailed { attempts: 3, .. }]
        ));
        sandbox.fold(&events[0]);
        assert_eq!(sandbox.status, Some(SandboxStatus::DeletionFailed));
        let events = sandbox
            .decide(SandboxCommand::RetryDeletion, t0())
            .unwrap_or_default();
        sandbox.fold(&events[0]);
        assert_eq!(sandbox.status, Some(SandboxStatus::PendingDeletion));
        assert_eq!(sandbox.attempts, 0);
    }
}
