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
    #[error("cannot {transition:?} a sandbox in status {from:?}")]
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
    #[error("claim already holds sandbox {sandbox_id}")]
    ClaimTaken {
        /// The sandbox held.
        sandbox_id: String,
    },
}
