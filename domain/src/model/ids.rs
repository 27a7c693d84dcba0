//! Stream identifiers: how aggregates and caller-supplied keys map onto event-table partition keys.
//!
//! Callers and idempotency keys are arbitrary header values (they may contain `#`, `/`, unicode).
//! A claim stream id is length-prefixed — `claim#<bytes of caller>:<caller>#<key>` — so no two
//! (caller, key) pairs share a stream, and the bounded lengths keep every key far below DynamoDB's
//! 2,048-byte partition-key limit.

use thiserror::Error;

/// Longest caller id, idempotency key or sandbox id accepted, in bytes (UTF-8).
pub const MAX_ID_BYTES: usize = 256;

/// Prefix of sandbox aggregate streams.
pub const SANDBOX_STREAM_PREFIX: &str = "sandbox#";
/// Prefix of claim (idempotency) aggregate streams.
pub const CLAIM_STREAM_PREFIX: &str = "claim#";
/// The stream recording each complete CSP listing seen by the sync job.
pub const SYNC_STREAM_ID: &str = "sync#csp";
/// Prefix of admin job streams (`adminjob#{job_id}`, and the index below).
pub const ADMIN_JOB_STREAM_PREFIX: &str = "adminjob#";
/// The stream listing every admin job submitted, one `AdminJobListed` each.
pub const ADMIN_JOB_INDEX_STREAM: &str = "adminjob#index";

/// The stream of one admin job.
pub fn admin_job_stream(job_id: &str) -> String {
    format!("{ADMIN_JOB_STREAM_PREFIX}{job_id}")
}

/// The pool-control stream: operators' drain and resume decisions (one stream for the pool, so
/// every instance reads the whole drain state with one strong read of its latest event).
pub const POOL_CONTROL_STREAM_ID: &str = "pool#control";
/// Prefix of per-track quota streams (`quota#<track name>`): the counter whose version every
/// quota-bound allocation of the track checks in its own transaction.
pub const QUOTA_STREAM_PREFIX: &str = "quota#";

/// Why an identifier supplied by a caller was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdError {
    /// Empty after trimming.
    #[error("{what} must not be empty")]
    Empty {
        /// Which identifier.
        what: &'static str,
    },
    /// Longer than [`MAX_ID_BYTES`].
    #[error("{what} is longer than {max} bytes")]
    TooLong {
        /// Which identifier.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// Contains control characters.
    #[error("{what} contains control characters")]
    ControlCharacters {
        /// Which identifier.
        what: &'static str,
    },
}

/// Trims and checks a caller-supplied identifier.
pub fn validate_id(what: &'static str, raw: &str) -> Result<String, IdError> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong {
            what,
            max: MAX_ID_BYTES,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(IdError::ControlCharacters { what });
    }
    Ok(value.to_string())
}

/// The stream of one sandbox.
pub fn sandbox_stream(sandbox_id: &str) -> String {
    format!("{SANDBOX_STREAM_PREFIX}{sandbox_id}")
}

/// The stream of the claim a (caller, idempotency key) pair holds.
pub fn claim_stream(caller: &str, key: &str) -> String {
    format!("{CLAIM_STREAM_PREFIX}{}:{caller}#{key}", caller.len())
}

/// The quota stream of a track name.
pub fn quota_stream(track_name: &str) -> String {
    format!("{QUOTA_STREAM_PREFIX}{track_name}")
}

/// The sandbox id of a sandbox stream, if it is one.
pub fn sandbox_id_of(stream_id: &str) -> Option<&str> {
    stream_id.strip_prefix(SANDBOX_STREAM_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Length prefixes keep (caller, key) pairs that would concatenate alike apart.
    #[test]
    fn claim_streams_are_unambiguous() {
        assert_ne!(claim_stream("a#b", "c"), claim_stream("a", "b#c"));
        assert_ne!(claim_stream("ab", "c"), claim_stream("a", "bc"));
        assert_eq!(claim_stream("stu", "k"), "claim#3:stu#k");
    }

    /// Identifiers are trimmed; empty, oversized and control-character values are refused.
    #[test]
    fn ids_are_validated() {
        assert_eq!(validate_id("caller", "  x/y#z ").as_deref(), Ok("x/y#z"));
        assert!(matches!(
            validate_id("caller", "   "),
            Err(IdError::Empty { .. })
        ));
        assert!(matches!(
            validate_id("caller", &"x".repeat(MAX_ID_BYTES + 1)),
            Err(IdError::TooLong { .. })
        ));
        assert!(matches!(
            validate_id("caller", "a\u{0}b"),
            Err(IdError::ControlCharacters { .. })
        ));
        assert!(validate_id("caller", "stüdent-✓").is_ok());
    }

    /// A sandbox stream maps back to its sandbox id.
    #[test]
    fn sandbox_stream_round_trips() {
        assert_eq!(sandbox_id_of(&sandbox_stream("42")), Some("42"));
        assert_eq!(sandbox_id_of("claim#1:a#b"), None);
    }
}
