//! Outcomes of commands that callers branch on.

use chrono::{DateTime, Utc};
use thiserror::Error;

use super::lifecycle::{SandboxStatus, Transition};

/// A command was refused by the model (nothing was appended).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DomainError {
    /// The sandbox does not exist.
    #[error("sandbox not found")]
    NotFound,
    /// The sandbox exists but is not the caller's live allocation.
    #[error("sandbox is not allocated to this caller")]
    NotOwner,
    /// The lifecycle table forbids this transition.
    #[error("{}", refused_transition(*transition, *from))]
    InvalidTransition {
        /// Current status (`None`: not registered).
        from: Option<SandboxStatus>,
        /// What was attempted.
        transition: Transition,
    },
    /// Register for a sandbox that already exists.
    #[error("sandbox already registered")]
    AlreadyRegistered,
    /// Expire before `expires_at + grace`.
    #[error("allocation does not expire before {due}")]
    NotExpired {
        /// When it becomes expirable.
        due: DateTime<Utc>,
    },
    /// Another cleanup worker holds a live lease on this sandbox's deletion.
    #[error("deletion leased by {holder} until {until}")]
    DeletionLeased {
        /// The worker holding the lease.
        holder: String,
        /// When it lapses.
        until: DateTime<Utc>,
    },
    /// An extension asked for after the lab window ended.
    #[error("the lab window ended at {expires_at}; it can no longer be extended")]
    LeaseExpired {
        /// When the window ended.
        expires_at: DateTime<Utc>,
    },
    /// An extension beyond the allocation's total extension budget.
    #[error("extensions of one allocation may add at most {max_hours} h in total; {used_hours} h already added")]
    ExtensionLimit {
        /// `MAX_LAB_EXTENSION_HOURS`.
        max_hours: u32,
        /// Hours already added to this allocation.
        used_hours: u32,
    },
    /// The stream holds an event this release does not know: a newer release wrote it, so this
    /// release cannot tell the stream's state and refuses to act on it (ADR 0023).
    #[error("{stream_id} holds {event_type} (schema {schema_version}), written by a newer release; this release does not act on it")]
    WrittenByNewerRelease {
        /// The stream.
        stream_id: String,
        /// The event type it does not know.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
    },
    /// The (caller, key) claim already holds a live allocation.
    #[error("this caller and idempotency key already hold sandbox {sandbox_id}; release it first")]
    ClaimTaken {
        /// The sandbox held.
        sandbox_id: String,
    },
    /// The sandbox is earmarked for another track's reservation until `until` (ADR 0028).
    #[error("sandbox is reserved for track {track} until {until}; allocate another one")]
    ReservedForTrack {
        /// The track the reservation is for.
        track: String,
        /// When the earmark stops binding.
        until: DateTime<Utc>,
    },
    /// An earmark command found the sandbox earmarked already (or not by this reservation).
    #[error("sandbox is earmarked for reservation {reservation_id}; lift that earmark first")]
    AlreadyEarmarked {
        /// The reservation holding it.
        reservation_id: String,
    },
}

/// What an attempted transition is, in words (the object is "the sandbox").
fn attempt(transition: Transition) -> &'static str {
    match transition {
        Transition::Register => "register the sandbox again",
        Transition::Allocate => "allocate the sandbox",
        Transition::RequestDeletion => "release the sandbox",
        Transition::Expire => "expire the allocation",
        Transition::MarkStale => "mark the sandbox stale",
        Transition::Restore => "restore the sandbox",
        Transition::RecordAttemptFailed => "record a failed deletion attempt",
        Transition::FailDeletion => "quarantine the sandbox's deletion",
        Transition::RetryDeletion => "retry the sandbox's deletion",
        Transition::CompleteDeletion => "complete the sandbox's deletion",
        Transition::Retire => "retire the sandbox",
        Transition::LeaseDeletion => "lease the sandbox's deletion",
        Transition::ExtendLease => "extend the lab window",
        Transition::Reserve => "earmark the sandbox for a reservation",
        Transition::Unreserve => "lift the sandbox's earmark",
        Transition::MissHeartbeat => "warn about missed heartbeats",
    }
}

/// A status in words.
fn status_words(status: Option<SandboxStatus>) -> &'static str {
    match status {
        None => "not registered",
        Some(SandboxStatus::Available) => "available (not allocated)",
        Some(SandboxStatus::Allocated) => "allocated",
        Some(SandboxStatus::PendingDeletion) => "released and waiting for deletion",
        Some(SandboxStatus::Stale) => "stale (missing from the CSP's listings)",
        Some(SandboxStatus::DeletionFailed) => "quarantined after failed deletions",
        Some(SandboxStatus::Deleted) => "deleted",
    }
}

/// What to do instead, for a refused transition.
fn next_step(transition: Transition, from: Option<SandboxStatus>) -> &'static str {
    match (transition, from) {
        (Transition::ExtendLease, _) => {
            "only a live allocation can be extended; allocate a new sandbox for more time"
        }
        (Transition::RetryDeletion, _) => {
            "only a quarantined (deletion_failed) sandbox can be retried; \
             `brokerctl list --status deletion_failed` lists them"
        }
        (Transition::RequestDeletion, _) => "there is nothing left to release",
        _ => "its history (`brokerctl history <id>`) shows how it got there",
    }
}

/// The message of a refused transition: what was attempted, the status that forbids it, and
/// what to do next — in words, never type names.
fn refused_transition(transition: Transition, from: Option<SandboxStatus>) -> String {
    format!(
        "cannot {}: the sandbox is {}; {}",
        attempt(transition),
        status_words(from),
        next_step(transition, from)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True when `text` has a word like `ExtendLease` or `PendingDeletion`: a lower-case letter
    /// followed by an upper-case one and another lower-case one inside
    /// one word (units such as `KiB` are not type names).
    fn has_type_name(text: &str) -> bool {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| {
                word.as_bytes().windows(3).any(|w| {
                    w[0].is_ascii_lowercase()
                        && w[1].is_ascii_uppercase()
                        && w[2].is_ascii_lowercase()
                })
            })
    }

    /// Every refused transition reads as words for a person, names what to do next, and shows
    /// no Rust: no `Some(`, no `None`, no type or variant names.
    #[test]
    fn refused_transitions_are_written_for_people() {
        let statuses = std::iter::once(None).chain(SandboxStatus::ALL.into_iter().map(Some));
        for from in statuses {
            for transition in Transition::ALL {
                let message = DomainError::InvalidTransition { from, transition }.to_string();
                assert!(!message.contains("Some("), "{message}");
                assert!(!message.contains("None"), "{message}");
                assert!(!has_type_name(&message), "{message}");
                assert!(message.contains("; "), "names a next step: {message}");
            }
        }
        assert_eq!(
            DomainError::InvalidTransition {
                from: Some(SandboxStatus::PendingDeletion),
                transition: Transition::ExtendLease,
            }
            .to_string(),
            "cannot extend the lab window: the sandbox is released and waiting for deletion; \
             only a live allocation can be extended; allocate a new sandbox for more time"
        );
        assert!(has_type_name("cannot ExtendLease"));
        assert!(!has_type_name(
            "X-Sandbox-Name-Prefix and brokerctl, 64 KiB"
        ));
    }
}
