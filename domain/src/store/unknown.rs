//! The tally of events this release does not know (ADR 0023): every projector path (single
//! apply, batched apply, read repair) notes each one it skips here, the first of each event type
//! is logged once per process, and the projector exports the counts as
//! `broker_projector_unknown_events_total{event_type}`. Process-wide on purpose: which event
//! types a newer release writes is a fact about the log, not about one projector instance.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::model::events::UnknownEvent;

static SEEN: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one skipped event; logs the first of its type (a newer release is writing).
pub fn note(event: &UnknownEvent) {
    let first = {
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let count = seen.entry(event.event_type.clone()).or_insert(0);
        *count += 1;
        *count == 1
    };
    if first {
        tracing::warn!(
            target: "projector",
            event_type = %event.event_type,
            schema_version = event.schema_version,
            stream_id = %event.stream_id,
            version = event.version,
            "skipping an event this release does not know (written by a newer release); \
             its sandbox is held out of allocation"
        );
    }
}

/// Skipped events so far, by event type.
pub fn counts() -> BTreeMap<String, u64> {
    SEEN.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each note counts once under its event type.
    #[test]
    fn notes_count_by_type() {
        let event = UnknownEvent {
            stream_id: "sandbox#t".into(),
            version: 2,
            event_type: "UnitTestOnlyEvent".into(),
            schema_version: 9,
        };
        note(&event);
        note(&event);
        assert_eq!(counts().get("UnitTestOnlyEvent"), Some(&2));
    }
}
