//! The pool-control aggregate: which name prefixes (or the whole pool) are drained for
//! maintenance. Drained means new allocations are refused; everything else — replays of live
//! allocations, reads, marks, jobs — goes on.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::events::{truncate_to_millis, DrainEntry, PoolControlEvent};

/// The drain state folded from the pool-control stream (its latest event carries all of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainState {
    /// Every drain in force.
    pub drained: Vec<DrainEntry>,
    /// The stream's version (the next append is conditioned on it).
    pub version: u64,
}

impl DrainState {
    /// The drain that refuses an allocation asking for `prefix` (`None`: any name): a whole-pool
    /// drain, or a drained prefix that the requested prefix starts with (a request for `lab-adv`
    /// can only receive names a drain of `lab` covers).
    pub fn refusing(&self, prefix: Option<&str>) -> Option<&DrainEntry> {
        self.drained.iter().find(|d| match (&d.prefix, prefix) {
            (None, _) => true,
            (Some(drained), Some(asked)) => asked.starts_with(drained.as_str()),
            (Some(_), None) => false,
        })
    }

    /// The event that drains `prefix`, or nothing when it is drained already (a repeat keeps
    /// the original start time).
    pub fn drain(
        &self,
        prefix: Option<String>,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Option<PoolControlEvent> {
        if self.drained.iter().any(|d| d.prefix == prefix) {
            return None;
        }
        let mut drained = self.drained.clone();
        drained.push(DrainEntry {
            prefix: prefix.clone(),
            since: truncate_to_millis(now),
            reason: reason.clone(),
        });
        Some(PoolControlEvent::PoolDrained {
            prefix,
            reason,
            drained,
        })
    }

    /// The event that resumes `prefix`, or nothing when it is not drained.
    pub fn resume(&self, prefix: Option<String>) -> Option<PoolControlEvent> {
        if !self.drained.iter().any(|d| d.prefix == prefix) {
            return None;
        }
        let drained = self
            .drained
            .iter()
            .filter(|d| d.prefix != prefix)
            .cloned()
            .collect();
        Some(PoolControlEvent::PoolResumed { prefix, drained })
    }

    /// Folds one event (each carries the complete state after it).
    pub fn fold(&mut self, event: &PoolControlEvent) {
        match event {
            PoolControlEvent::PoolDrained { drained, .. }
            | PoolControlEvent::PoolResumed { drained, .. } => self.drained.clone_from(drained),
        }
        self.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole-pool drain refuses everything; a prefix drain refuses requests inside its range only.
    #[test]
    fn drains_cover_their_range() {
        let now = Utc::now();
        let mut state = DrainState::default();
        let drained = state.drain(Some("lab".into()), None, now);
        assert!(drained.is_some());
        if let Some(event) = &drained {
            state.fold(event);
        }
        assert!(
            state.drain(Some("lab".into()), None, now).is_none(),
            "repeat"
        );
        assert!(state.refusing(Some("lab-adv")).is_some());
        assert!(state.refusing(Some("other")).is_none());
        assert!(state.refusing(None).is_none());
        if let Some(event) = state.drain(None, Some("upgrade".into()), now) {
            state.fold(&event);
        }
        assert!(state.refusing(Some("other")).is_some());
        if let Some(event) = state.resume(None) {
            state.fold(&event);
        }
        assert!(state.refusing(None).is_none());
        assert!(state.refusing(Some("lab-1")).is_some());
        assert!(state.resume(Some("nope".into())).is_none());
        assert_eq!(state.version, 3);
    }
}
