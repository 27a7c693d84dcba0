//! The rules every adapter applies to a batch before it writes anything, so that a batch one
//! store accepts is never refused by the other (they once differed on empty stream ids).

use crate::model::events::EventEnvelope;
use crate::store::{StoreError, MAX_TRANSACTION_ITEMS};

/// Checks a batch before anything is sent: at most [`MAX_TRANSACTION_ITEMS`] events, stream ids
/// non-empty (DynamoDB refuses empty keys), and per stream versions ≥ 1 and consecutive, so each
/// put's condition "this (stream, version) is free" adds up to "the stream is exactly at the
/// version before the batch's first". Returns, per stream in order of first appearance, the first
/// version the batch takes (the version check the embedded store makes).
pub fn validate_append(events: &[EventEnvelope]) -> Result<Vec<(String, u64)>, StoreError> {
    if events.len() > MAX_TRANSACTION_ITEMS {
        return Err(StoreError::TooManyItems(events.len()));
    }
    let mut firsts: Vec<(String, u64, u64)> = Vec::new();
    for e in events {
        if e.stream_id.is_empty() {
            return Err(StoreError::InvalidAppend("empty stream id".into()));
        }
        if e.version == 0 {
            return Err(StoreError::InvalidAppend(format!(
                "{}: versions start at 1",
                e.stream_id
            )));
        }
        match firsts.iter_mut().find(|(s, _, _)| *s == e.stream_id) {
            Some((_, _, last)) if e.version == *last + 1 => *last = e.version,
            Some(_) => {
                return Err(StoreError::InvalidAppend(format!(
                    "{}: versions in a batch must be consecutive",
                    e.stream_id
                )))
            }
            None => firsts.push((e.stream_id.clone(), e.version, e.version)),
        }
    }
    Ok(firsts.into_iter().map(|(s, first, _)| (s, first)).collect())
}

/// A one-event envelope at `version` of `stream`: the fixture of the unit tests of the append
/// rules and of both adapter crates (one fixture, not one per module). Public and not behind a
/// feature on purpose: a feature that only tests turn on would give `domain` a second set of
/// features, and every crate above it a second build, whenever a test build and a plain one
/// alternate.
pub fn test_envelope(stream: &str, version: u64) -> EventEnvelope {
    use crate::model::events::{Actor, CommandMeta, SyncEvent};
    let meta = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    };
    EventEnvelope::new(
        stream,
        version,
        &SyncEvent::ListingRecorded {
            listed: 1,
            missing: vec![],
        },
        &meta,
        chrono::Utc::now(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_envelope as env;

    /// Batches with gaps, zero versions, empty streams or over 100 items are refused before
    /// anything is sent.
    #[test]
    fn append_validation() {
        assert_eq!(
            validate_append(&[env("a", 1), env("a", 2), env("b", 4)]),
            Ok(vec![("a".to_string(), 1), ("b".to_string(), 4)])
        );
        assert!(matches!(
            validate_append(&[env("a", 1), env("a", 3)]),
            Err(StoreError::InvalidAppend(_))
        ));
        assert!(matches!(
            validate_append(&[env("a", 0)]),
            Err(StoreError::InvalidAppend(_))
        ));
        assert!(matches!(
            validate_append(&[env("", 1)]),
            Err(StoreError::InvalidAppend(_))
        ));
        let many: Vec<_> = (1..=101).map(|v| env("a", v)).collect();
        assert_eq!(validate_append(&many), Err(StoreError::TooManyItems(101)));
        let hundred: Vec<_> = (1..=100).map(|v| env("a", v)).collect();
        assert!(validate_append(&hundred).is_ok());
    }
}
