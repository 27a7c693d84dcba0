//! The sandbox lifecycle as one transition table (DESIGN.md §4). Every command checks it before
//! emitting an event, and the aggregate's `apply` follows it, so a forbidden transition can never
//! be recorded.

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// In the pool, allocatable.
    Available,
    /// Held by one student.
    Allocated,
    /// Waiting for the cleanup job to delete the CSP account.
    PendingDeletion,
    /// Missing from CSP listings; not allocatable.
    Stale,
    /// Quarantined after the delete retry budget was spent.
    DeletionFailed,
    /// Terminal: the CSP account is gone (or the sandbox was retired from the pool).
    Deleted,
}

impl SandboxStatus {
    /// Every status, in stats order.
    pub const ALL: [SandboxStatus; 6] = [
        SandboxStatus::Available,
        SandboxStatus::Allocated,
        SandboxStatus::PendingDeletion,
        SandboxStatus::Stale,
        SandboxStatus::DeletionFailed,
        SandboxStatus::Deleted,
    ];

    /// The wire name (`pending_deletion`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Available => "available",
            SandboxStatus::Allocated => "allocated",
            SandboxStatus::PendingDeletion => "pending_deletion",
            SandboxStatus::Stale => "stale",
            SandboxStatus::DeletionFailed => "deletion_failed",
            SandboxStatus::Deleted => "deleted",
        }
    }

    /// Position in [`SandboxStatus::ALL`] (used by stats counters).
    pub fn index(self) -> usize {
        match self {
            SandboxStatus::Available => 0,
            SandboxStatus::Allocated => 1,
            SandboxStatus::PendingDeletion => 2,
            SandboxStatus::Stale => 3,
            SandboxStatus::DeletionFailed => 4,
            SandboxStatus::Deleted => 5,
        }
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SandboxStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown status '{s}'"))
    }
}

/// The kind of a sandbox event, as the transition table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `SandboxRegistered`
    Register,
    /// `SandboxAllocated`
    Allocate,
    /// `DeletionRequested`
    RequestDeletion,
    /// `AllocationExpired`
    Expire,
    /// `SandboxMarkedStale`
    MarkStale,
    /// `SandboxRestored`
    Restore,
    /// `DeletionAttemptFailed`
    RecordAttemptFailed,
    /// `DeletionFailed`
    FailDeletion,
    /// `DeletionRetried`
    RetryDeletion,
    /// `SandboxDeleted`
    CompleteDeletion,
    /// `SandboxRetired`
    Retire,
    /// `DeletionLeased`
    LeaseDeletion,
    /// `LeaseExtended`
    ExtendLease,
    /// `SandboxReserved`
    Reserve,
    /// `SandboxUnreserved`
    Unreserve,
    /// `HeartbeatMissed`
    MissHeartbeat,
}

impl Transition {
    /// Every transition kind.
    pub const ALL: [Transition; 16] = [
        Transition::Register,
        Transition::Allocate,
        Transition::RequestDeletion,
        Transition::Expire,
        Transition::MarkStale,
        Transition::Restore,
        Transition::RecordAttemptFailed,
        Transition::FailDeletion,
        Transition::RetryDeletion,
        Transition::CompleteDeletion,
        Transition::Retire,
        Transition::LeaseDeletion,
        Transition::ExtendLease,
        Transition::Reserve,
        Transition::Unreserve,
        Transition::MissHeartbeat,
    ];
}

use SandboxStatus::*;
use Transition::*;

/// `(from, transition, to)`; `None` means "the sandbox does not exist yet". Anything not listed is
/// forbidden. Reads like DESIGN.md §4's event table; `Retire` is the store-only removal used by
/// stale removal and the admin bulk delete (never from `allocated`).
pub const TRANSITIONS: &[(Option<SandboxStatus>, Transition, SandboxStatus)] = &[
    (None, Register, Available),
    (Some(Available), Allocate, Allocated),
    (Some(Allocated), RequestDeletion, PendingDeletion),
    (Some(Allocated), Expire, PendingDeletion),
    (Some(Available), MarkStale, Stale),
    (Some(Stale), Restore, Available),
    (Some(PendingDeletion), RecordAttemptFailed, PendingDeletion),
    (Some(PendingDeletion), FailDeletion, DeletionFailed),
    (Some(DeletionFailed), RetryDeletion, PendingDeletion),
    (Some(PendingDeletion), CompleteDeletion, Deleted),
    (Some(Stale), CompleteDeletion, Deleted),
    (Some(Stale), Retire, Deleted),
    (Some(Available), Retire, Deleted),
    (Some(DeletionFailed), Retire, Deleted),
    (Some(PendingDeletion), Retire, Deleted),
    // A cleanup worker's short claim on the deletion: the status stays where it is.
    (Some(PendingDeletion), LeaseDeletion, PendingDeletion),
    // The owner moves the end of the lab window; the allocation goes on.
    (Some(Allocated), ExtendLease, Allocated),
    // A reservation's earmark, and its lifting: the sandbox stays available, to one track.
    (Some(Available), Reserve, Available),
    (Some(Available), Unreserve, Available),
    // The heartbeat reclaim's warning; the allocation goes on.
    (Some(Allocated), MissHeartbeat, Allocated),
];

/// The status after `transition` from `from`, or `None` if the table forbids it.
pub fn next_status(from: Option<SandboxStatus>, transition: Transition) -> Option<SandboxStatus> {
    TRANSITIONS
        .iter()
        .find(|(f, t, _)| *f == from && *t == transition)
        .map(|(_, _, to)| *to)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (from, transition) pair is allowed exactly when the table lists it, with the listed target.
    #[test]
    fn every_pair_follows_the_table() {
        let froms = std::iter::once(None).chain(SandboxStatus::ALL.into_iter().map(Some));
        let mut allowed = 0;
        for from in froms {
            for t in Transition::ALL {
                let expected = TRANSITIONS
                    .iter()
                    .filter(|(f, tt, _)| *f == from && *tt == t)
                    .map(|(_, _, to)| *to)
                    .collect::<Vec<_>>();
                assert!(expected.len() <= 1, "duplicate row for {from:?} {t:?}");
                assert_eq!(next_status(from, t), expected.first().copied());
                allowed += expected.len();
            }
        }
        assert_eq!(allowed, TRANSITIONS.len());
    }

    /// The properties the broker relies on: single use, no way back to the pool after allocation,
    /// `deleted` terminal, bulk removal never touches an allocation.
    #[test]
    fn lifecycle_invariants() {
        for t in Transition::ALL {
            assert_eq!(next_status(Some(Deleted), t), None, "deleted is terminal");
            assert_ne!(
                next_status(Some(Allocated), t),
                Some(Available),
                "single use"
            );
        }
        assert_eq!(next_status(Some(Allocated), Retire), None);
        assert_eq!(next_status(Some(Allocated), MarkStale), None);
        assert_eq!(next_status(Some(Allocated), Allocate), None);
        assert_eq!(next_status(None, Allocate), None);
        assert_eq!(next_status(Some(Available), Register), None);
    }

    /// Status names round-trip through their wire form.
    #[test]
    fn status_names_round_trip() {
        for s in SandboxStatus::ALL {
            assert_eq!(s.as_str().parse::<SandboxStatus>(), Ok(s));
            assert_eq!(SandboxStatus::ALL[s.index()], s);
        }
        assert!("bogus".parse::<SandboxStatus>().is_err());
    }
}
