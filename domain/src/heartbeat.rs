//! Heartbeats and orphan reclaim (ADR 0030): a track may declare that its labs send heartbeats;
//! an allocation whose holder stops sending them is warned about after half the grace period
//! and reclaimed (marked for deletion) once the whole grace period has passed without one.
//!
//! * [`HeartbeatPolicies`] — which tracks opted in, with their interval and grace
//!   (`HEARTBEAT_TRACKS`). The allocation records its track's policy in its `SandboxAllocated`
//!   event, so the reclaim reads the policy from the log and never from a setting it would have
//!   to mirror.
//! * [`judge`] — the pure decision: alive, warn, or reclaim.
//! * [`HeartbeatBook`] — where heartbeats are recorded: a last-seen time per sandbox, outside the
//!   event log (a heartbeat every minute from 300 labs for 8 hours would be 144,000 events, ten
//!   times what the workshop's allocations write). [`CheckpointHeartbeats`] keeps it in the
//!   view's checkpoint table, shared by every API instance on DynamoDB.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use crate::model::events::{format_time, SandboxEvent};
use crate::store::{StoreError, ViewStore};

/// The `reason` the heartbeat reclaim writes on its `DeletionRequested` events.
pub const RECLAIM_REASON: &str = "heartbeat_missed";
/// Prefix of the last-seen records in the view's checkpoint table (`heartbeat:<sandbox_id>`).
/// Not a projector position: a rebuild of the view keeps them.
pub const HEARTBEAT_CHECKPOINT_PREFIX: &str = "heartbeat:";
/// The grace of a track that declares only an interval (seconds): 45 minutes, longer than a
/// workshop's coffee break plus the minutes a laptop takes to wake and reconnect.
pub const DEFAULT_HEARTBEAT_GRACE_S: u32 = 45 * 60;
/// The shortest grace accepted (seconds): below it a laptop that closes its lid for a minute
/// loses its lab.
pub const MIN_HEARTBEAT_GRACE_S: u32 = 5 * 60;

/// One track's heartbeat policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    /// How often the lab sends a heartbeat (seconds).
    pub interval_s: u32,
    /// How long heartbeats may be missed before the reclaim (seconds).
    pub grace_s: u32,
}

impl HeartbeatPolicy {
    /// A policy after the checks every source of policies applies (`HEARTBEAT_TRACKS` and the
    /// track credentials file): an interval above 0, a grace (default
    /// [`DEFAULT_HEARTBEAT_GRACE_S`]) of at least [`MIN_HEARTBEAT_GRACE_S`] and of at least
    /// three intervals, so that a single lost heartbeat never reclaims a lab. The error names
    /// the field (`interval` or `grace`) and says what to send instead.
    pub fn checked(interval_s: u32, grace_s: Option<u32>) -> Result<Self, String> {
        if interval_s == 0 {
            return Err("the interval must be a whole number of seconds above 0".to_string());
        }
        let grace_s = grace_s.unwrap_or(DEFAULT_HEARTBEAT_GRACE_S);
        if grace_s < MIN_HEARTBEAT_GRACE_S {
            return Err(format!(
                "the grace must be at least {MIN_HEARTBEAT_GRACE_S} seconds, so that a laptop that sleeps briefly keeps its lab"
            ));
        }
        if u64::from(grace_s) < 3 * u64::from(interval_s) {
            return Err(
                "the grace must cover at least three intervals, so that one lost heartbeat never reclaims a lab; raise the grace or shorten the interval"
                    .to_string(),
            );
        }
        Ok(Self {
            interval_s,
            grace_s,
        })
    }
}

/// The tracks that opted in to heartbeats (`HEARTBEAT_TRACKS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatPolicies {
    per_track: HashMap<String, HeartbeatPolicy>,
}

impl HeartbeatPolicies {
    /// Parses `track=INTERVAL[/GRACE],…` (seconds; blank: no track opts in), e.g.
    /// `aws-lab=60/2700,gcp-lab=30`. A grace below [`MIN_HEARTBEAT_GRACE_S`], or not at least
    /// three intervals, is refused: a single lost heartbeat must never reclaim a lab.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut per_track = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((track, policy)) = entry.rsplit_once('=') else {
                return Err(format!(
                    "'{entry}' is not track=interval or track=interval/grace (seconds)"
                ));
            };
            let track = track.trim();
            if track.is_empty() {
                return Err(format!("'{entry}' has no track name"));
            }
            let number = |raw: &str, what: &str| {
                raw.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        format!("'{entry}': the {what} must be a whole number of seconds above 0")
                    })
            };
            let (interval_s, grace_s) = match policy.split_once('/') {
                Some((interval, grace)) => (number(interval, "interval")?, number(grace, "grace")?),
                None => (number(policy, "interval")?, DEFAULT_HEARTBEAT_GRACE_S),
            };
            let policy = HeartbeatPolicy::checked(interval_s, Some(grace_s))
                .map_err(|problem| format!("'{entry}': {problem}"))?;
            if per_track.insert(track.to_string(), policy).is_some() {
                return Err(format!("track '{track}' is listed twice"));
            }
        }
        Ok(Self { per_track })
    }

    /// The policy of `track`, when it opted in.
    pub fn policy_for(&self, track: Option<&str>) -> Option<HeartbeatPolicy> {
        track.and_then(|t| self.per_track.get(t).copied())
    }

    /// True when no track opted in.
    pub fn is_empty(&self) -> bool {
        self.per_track.is_empty()
    }

    /// Adds `track`'s policy from another source (its track credentials entry, ADR 0034);
    /// refused when the track already has one, so one track's policy is never declared in two
    /// places that could disagree.
    pub fn declare(&mut self, track: &str, policy: HeartbeatPolicy) -> Result<(), String> {
        if self.per_track.contains_key(track) {
            return Err(format!("track '{track}' already has a heartbeat policy"));
        }
        self.per_track.insert(track.to_string(), policy);
        Ok(())
    }
}

/// Records `policy` in the allocation event among `events` (the allocation path calls it for the
/// requesting track); without a policy the events are unchanged.
pub fn with_policy(
    mut events: Vec<SandboxEvent>,
    policy: Option<HeartbeatPolicy>,
) -> Vec<SandboxEvent> {
    let Some(policy) = policy else {
        return events;
    };
    for event in &mut events {
        if let SandboxEvent::SandboxAllocated {
            heartbeat_interval_s,
            heartbeat_grace_s,
            ..
        } = event
        {
            *heartbeat_interval_s = Some(policy.interval_s);
            *heartbeat_grace_s = Some(policy.grace_s);
        }
    }
    events
}

/// What the reclaim does about one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from within half the grace.
    Alive,
    /// Silent for half the grace or more: warn (once per silence).
    Warn {
        /// When the reclaim follows.
        reclaim_at: DateTime<Utc>,
    },
    /// Silent for the whole grace: reclaim.
    Reclaim,
}

/// Judges an allocation that began at `allocated_at`, last heard from at `last_seen` (`None`:
/// never; the clock then runs from the allocation), under a grace of `grace_s`.
pub fn judge(
    allocated_at: DateTime<Utc>,
    last_seen: Option<DateTime<Utc>>,
    grace_s: u32,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, Verdict) {
    // A heartbeat recorded before this allocation (a record of an earlier holder cannot exist,
    // sandboxes are single-use, but a skewed clock could) never counts for more than hand-out.
    let last = last_seen.map_or(allocated_at, |seen| seen.max(allocated_at));
    let grace = Duration::seconds(i64::from(grace_s));
    let silent = now - last;
    let verdict = if silent >= grace {
        Verdict::Reclaim
    } else if silent >= grace / 2 {
        Verdict::Warn {
            reclaim_at: last + grace,
        }
    } else {
        Verdict::Alive
    };
    (last, verdict)
}

/// Where heartbeats are recorded: the last time each sandbox's holder was heard from.
#[async_trait]
pub trait HeartbeatBook: Send + Sync + 'static {
    /// Records a heartbeat of `sandbox_id` at `at`.
    async fn record(&self, sandbox_id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// The last heartbeat of `sandbox_id`, if any came.
    async fn last_seen(&self, sandbox_id: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
}

/// A [`HeartbeatBook`] in the view's checkpoint table: one item per sandbox
/// (`heartbeat:<sandbox_id>` → RFC 3339 time), overwritten by each heartbeat. A plain write is
/// enough: every writer writes "now", and of two heartbeats racing either one is a fine answer.
#[derive(Clone)]
pub struct CheckpointHeartbeats {
    view: Arc<dyn ViewStore>,
}

impl CheckpointHeartbeats {
    /// Records in `view`'s checkpoint table.
    pub fn new(view: Arc<dyn ViewStore>) -> Self {
        Self { view }
    }
}

fn key_of(sandbox_id: &str) -> String {
    format!("{HEARTBEAT_CHECKPOINT_PREFIX}{sandbox_id}")
}

#[async_trait]
impl HeartbeatBook for CheckpointHeartbeats {
    async fn record(&self, sandbox_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.view
            .save_checkpoint(&key_of(sandbox_id), &format_time(&at))
            .await
    }

    async fn last_seen(&self, sandbox_id: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let Some(raw) = self.view.checkpoint(&key_of(sandbox_id)).await? else {
            return Ok(None);
        };
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| StoreError::Corrupt(format!("heartbeat of {sandbox_id}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0)
            .single()
            .unwrap_or_default()
    }

    /// Policies parse with and without a grace; unsafe graces are refused with a reason.
    #[test]
    fn policies_parse_and_refuse_unsafe_graces() {
        let p = HeartbeatPolicies::parse("aws-lab=60/1800, gcp-lab=30").unwrap_or_default();
        assert_eq!(
            p.policy_for(Some("aws-lab")),
            Some(HeartbeatPolicy {
                interval_s: 60,
                grace_s: 1800
            })
        );
        assert_eq!(
            p.policy_for(Some("gcp-lab")).map(|p| p.grace_s),
            Some(DEFAULT_HEARTBEAT_GRACE_S)
        );
        assert_eq!(p.policy_for(Some("other")), None);
        assert_eq!(p.policy_for(None), None);
        assert!(HeartbeatPolicies::parse("").is_ok_and(|p| p.is_empty()));
        for bad in [
            "aws",
            "=60",
            "a=0",
            "a=60/60",
            "a=600/1200",
            "a=60,a=60",
            "a=x/900",
        ] {
            assert!(HeartbeatPolicies::parse(bad).is_err(), "{bad}");
        }
    }

    /// The clock starts at hand-out; a warning at half the grace, the reclaim at the whole.
    #[test]
    fn judge_warns_at_half_and_reclaims_at_the_whole_grace() {
        let m = Duration::minutes;
        assert_eq!(judge(t0(), None, 1800, t0() + m(14)).1, Verdict::Alive);
        assert_eq!(
            judge(t0(), None, 1800, t0() + m(15)).1,
            Verdict::Warn {
                reclaim_at: t0() + m(30)
            }
        );
        assert_eq!(
            judge(t0(), None, 1800, t0() + m(30)),
            (t0(), Verdict::Reclaim)
        );
        let seen = t0() + m(20);
        assert_eq!(
            judge(t0(), Some(seen), 1800, t0() + m(30)),
            (seen, Verdict::Alive)
        );
        // A record older than the allocation counts as the allocation.
        assert_eq!(judge(t0(), Some(t0() - m(60)), 1800, t0() + m(1)).0, t0());
    }
}
