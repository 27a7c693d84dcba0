//! Stream identifiers: how aggregates and caller-supplied keys map onto event-table partition keys.
//!
//! Callers and idempotency keys are arbitrary header values (they may contain `#`, `/`, unicode).
//! A claim stream id is length-prefixed — `claim#<bytes of caller>:<caller>#<key>` — so no two
//! (caller, key) pairs share a stream, and the bounded lengths keep every key far below DynamoDB's
//! 2,048-byte partition-key limit.

use thiserror::Error;

/// Longest caller id, idempotency key or sandbox id accepted, in bytes (UTF-8).
pub const MAX_ID_BYTES: usize = 256;

/// The rule [`validate_id`] applies, as the OpenAPI `pattern` of every parameter that carries an
/// identifier: no control character (Unicode `Cc`: U+0000–U+001F, U+007F–U+009F) anywhere, and
/// at least one character that is neither a control character nor a space. The classes are
/// spelled out rather than written `\s`, whose meaning differs between regex dialects. JSON
/// Schema's `maxLength` counts characters, so the byte limit ([`MAX_ID_BYTES`]) goes in each
/// parameter's description.
pub const ID_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$";

/// [`ID_PATTERN`] for an optional filter or header, where an empty or blank value means "not
/// given" ([`validate_optional_id`]): only the control characters are refused.
pub const OPTIONAL_ID_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";

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
/// Prefix of reservation streams (`reservation#<id>`, and the index below; ADR 0028).
pub const RESERVATION_STREAM_PREFIX: &str = "reservation#";
/// The stream listing every reservation created, one `ReservationListed` each.
pub const RESERVATION_INDEX_STREAM: &str = "reservation#index";

/// The stream of one reservation.
pub fn reservation_stream(reservation_id: &str) -> String {
    format!("{RESERVATION_STREAM_PREFIX}{reservation_id}")
}

/// Prefix of an API instance's usage stream (`usage#<instance>`): its periodic summaries of the
/// allocation requests it refused (ADR 0030). One writer per stream.
pub const USAGE_STREAM_PREFIX: &str = "usage#";

/// The usage stream of the API instance `instance`.
pub fn usage_stream(instance: &str) -> String {
    format!("{USAGE_STREAM_PREFIX}{instance}")
}

/// Prefix of waiting-line ticket streams (`ticket#<ticket id>`): one `Prefer: respond-async`
/// allocation request, from its issue to its service or drop.
pub const TICKET_STREAM_PREFIX: &str = "ticket#";

/// The stream of one waiting-line ticket.
pub fn ticket_stream(ticket_id: &str) -> String {
    format!("{TICKET_STREAM_PREFIX}{ticket_id}")
}

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

/// Checks a caller-supplied identifier as it was sent, then trims the spaces around it.
///
/// The length and the characters are checked on the value as sent, so that the document's
/// `maxLength` and [`ID_PATTERN`] describe exactly what is refused: a value padded past the limit
/// or wrapped in control characters (a trailing newline, say) is a 400, never silently trimmed
/// into a valid one. Only spaces (U+0020) are trimmed, and a value of spaces only is empty.
pub fn validate_id(what: &'static str, raw: &str) -> Result<String, IdError> {
    match validate_optional_id(what, raw)? {
        Some(value) => Ok(value),
        None => Err(IdError::Empty { what }),
    }
}

/// [`validate_id`] for an optional value: an empty or blank one is `None` ("not given").
pub fn validate_optional_id(what: &'static str, raw: &str) -> Result<Option<String>, IdError> {
    if raw.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong {
            what,
            max: MAX_ID_BYTES,
        });
    }
    if raw.chars().any(char::is_control) {
        return Err(IdError::ControlCharacters { what });
    }
    let value = raw.trim_matches(' ');
    Ok((!value.is_empty()).then(|| value.to_string()))
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

    /// Identifiers are trimmed of spaces; empty, oversized and control-character values are
    /// refused, judged on the value as sent.
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
        // Padding counts towards the limit, and control characters are refused at the ends too
        // (trimming them would accept what the document calls invalid).
        let padded = format!("x{}", " ".repeat(MAX_ID_BYTES));
        assert!(matches!(
            validate_id("caller", &padded),
            Err(IdError::TooLong { .. })
        ));
        for wrapped in ["lab\n", "\tlab", "lab\u{85}", "\r\n"] {
            assert!(
                matches!(
                    validate_id("caller", wrapped),
                    Err(IdError::ControlCharacters { .. })
                ),
                "{wrapped:?}"
            );
        }
        // Only spaces are trimmed: other blank characters are ordinary characters.
        assert_eq!(validate_id("caller", "\u{a0}").as_deref(), Ok("\u{a0}"));
        assert_eq!(validate_optional_id("prefix", "  "), Ok(None));
        assert_eq!(validate_optional_id("prefix", ""), Ok(None));
    }

    /// A sandbox stream maps back to its sandbox id.
    #[test]
    fn sandbox_stream_round_trips() {
        assert_eq!(sandbox_id_of(&sandbox_stream("42")), Some("42"));
        assert_eq!(sandbox_id_of("claim#1:a#b"), None);
    }
}
