//! Per-track quotas on the command side: the configured limits, the strong read of a track's
//! quota stream, and the in-process lock that queues a track's quota-bound commands.
//!
//! The race-freedom comes from the event store, not from the lock: every allocation that takes
//! a slot appends `QuotaSlotTaken` to `quota#<track>` at the version it read, in the same
//! transaction as the allocation, so two allocations that saw the same count cannot both commit.
//! The lock only keeps the requests of one process from losing that race to each other (and
//! retrying) — across instances the version check alone decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::decode_for_command as decode;
use super::BrokerError;
use crate::model::events::BrokerEvent;
use crate::model::ids::quota_stream;
use crate::model::quota::QuotaUsage;
use crate::store::EventStore;

/// Maximum concurrent allocations per track name (`TRACK_QUOTAS`, `DEFAULT_TRACK_QUOTA`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackQuotas {
    /// Limits of named tracks.
    pub per_track: HashMap<String, u32>,
    /// The limit of every other track; `None`: unlimited.
    pub default: Option<u32>,
}

impl TrackQuotas {
    /// Parses `TRACK_QUOTAS` (`trackA=20,trackB=5`; blank: none) with the default limit.
    pub fn parse(spec: &str, default: Option<u32>) -> Result<Self, String> {
        let mut per_track = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            // The last `=` separates the limit, so a track name may itself contain `=`.
            let Some((track, limit)) = entry.rsplit_once('=') else {
                return Err(format!("'{entry}' is not track=limit"));
            };
            let track = track.trim();
            if track.is_empty() {
                return Err(format!("'{entry}' has no track name"));
            }
            let limit = limit
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("'{entry}': the limit must be a whole number"))?;
            if per_track.insert(track.to_string(), limit).is_some() {
                return Err(format!("track '{track}' is listed twice"));
            }
        }
        Ok(Self { per_track, default })
    }

    /// The configured limit of `track`, if any.
    pub fn limit_for(&self, track: &str) -> Option<u32> {
        self.per_track.get(track).copied().or(self.default)
    }

    /// Whether any track has a limit (the quota stream is then written on allocation).
    pub fn is_empty(&self) -> bool {
        self.per_track.is_empty() && self.default.is_none()
    }
}

/// Bound on remembered per-track locks; beyond it the map is cleared (a lock in use stays
/// alive through its `Arc`; a cleared one only costs a possible extra conflict).
const MAX_TRACK_LOCKS: usize = 10_000;

/// One async lock per track name, for the quota-bound commands of this process.
#[derive(Debug, Default)]
pub(super) struct TrackLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TrackLocks {
    /// Waits for `track`'s turn (FIFO).
    pub(super) async fn lock(&self, track: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() >= MAX_TRACK_LOCKS && !locks.contains_key(track) {
                locks.clear();
            }
            locks.entry(track.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// The track's slots in use, from the latest event of its quota stream (strong read; each event
/// carries the holders after it).
pub(super) async fn load_usage(
    events: &dyn EventStore,
    track: &str,
) -> Result<QuotaUsage, BrokerError> {
    let Some(latest) = events.load_latest(&quota_stream(track)).await? else {
        return Ok(QuotaUsage::default());
    };
    let mut usage = QuotaUsage::default();
    if let BrokerEvent::Quota(event) = decode(&latest)? {
        usage.fold(&event);
    }
    usage.version = latest.version;
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TRACK_QUOTAS` parses per-track limits, falls back to the default, and refuses garbage.
    #[test]
    fn quotas_parse() {
        let quotas = TrackQuotas::parse(" a=20, b=c=5 ,", Some(3)).unwrap_or_default();
        assert_eq!(quotas.limit_for("a"), Some(20));
        assert_eq!(quotas.limit_for("b=c"), Some(5));
        assert_eq!(quotas.limit_for("other"), Some(3));
        assert!(TrackQuotas::parse("", None).is_ok_and(|q| q.is_empty()));
        assert!(TrackQuotas::parse("a", None).is_err());
        assert!(TrackQuotas::parse("a=-1", None).is_err());
        assert!(TrackQuotas::parse("=4", None).is_err());
        assert!(TrackQuotas::parse("a=1,a=2", None).is_err());
    }
}
