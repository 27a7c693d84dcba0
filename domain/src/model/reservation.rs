//! Reservations (ADR 0028): an operator's hold on `count` sandboxes for one track over a time
//! window, folded from its `reservation#<id>` stream, and the arithmetic behind every capacity
//! answer — what is free now, what other reservations still need, and the forecasts (expected
//! registrations, expected allocations, when a prefix runs dry) that are stated apart from it.
//!
//! Supply is single-use: a sandbox is allocated once and then deleted; new supply is only what
//! sync registers. So a future figure is never "what is free now": it is what is free now, less
//! what other tracks are expected to take by then, plus what sync is expected to register.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::events::{truncate_to_millis, OverflowPolicy, ReservationEvent};

/// Bounds on what a reservation may ask for (each a documented setting of the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationLimits {
    /// Most sandboxes one reservation may hold (`RESERVATION_MAX_COUNT`, 5,000).
    pub max_count: u32,
    /// Longest window (`RESERVATION_MAX_WINDOW_HOURS`, 72 h).
    pub max_window: Duration,
    /// Furthest a window may start ahead of now (`RESERVATION_MAX_AHEAD_DAYS`, 90 days).
    pub max_ahead: Duration,
    /// How long before the window opens the sandboxes are earmarked
    /// (`RESERVATION_LEAD_TIME_MINUTES`, 60).
    pub lead_time: Duration,
}

impl Default for ReservationLimits {
    fn default() -> Self {
        Self {
            max_count: 5_000,
            max_window: Duration::hours(72),
            max_ahead: Duration::days(90),
            lead_time: Duration::minutes(60),
        }
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationSpec {
    /// The track whose students the sandboxes are for.
    pub track: String,
    /// How many sandboxes.
    pub count: u32,
    /// Only sandboxes whose name starts with this.
    pub prefix: Option<String>,
    /// When the window opens.
    pub starts_at: DateTime<Utc>,
    /// When it closes.
    pub ends_at: DateTime<Utc>,
    /// What the track does once the reservation is used up.
    pub overflow: OverflowPolicy,
    /// The operator's note.
    pub note: Option<String>,
}

/// Why a reservation request was refused before anything was counted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReservationInvalid {
    /// `count` is zero or above the limit.
    #[error("count must be between 1 and {max}; ask for at most {max} sandboxes per reservation")]
    Count {
        /// The limit.
        max: u32,
    },
    /// The window ends before (or when) it starts.
    #[error("ends_at must be after starts_at; give a window that ends after it opens")]
    EndsBeforeStart,
    /// The window is already over.
    #[error("the window ended already at {ends_at}; give a window that ends in the future")]
    InThePast {
        /// Its end.
        ends_at: DateTime<Utc>,
    },
    /// The window is longer than allowed.
    #[error("the window lasts more than {max_hours} h; split it into shorter reservations")]
    TooLong {
        /// The limit in hours.
        max_hours: i64,
    },
    /// The window starts too far ahead.
    #[error("the window starts more than {max_days} days ahead; reserve closer to the date")]
    TooFarAhead {
        /// The limit in days.
        max_days: i64,
    },
}

impl ReservationSpec {
    /// Checks the request against `limits` at `now`. A window that opened already but has not
    /// ended is accepted: it is earmarked at once.
    pub fn validate(
        &self,
        limits: &ReservationLimits,
        now: DateTime<Utc>,
    ) -> Result<(), ReservationInvalid> {
        if self.count == 0 || self.count > limits.max_count {
            return Err(ReservationInvalid::Count {
                max: limits.max_count,
            });
        }
        if self.ends_at <= self.starts_at {
            return Err(ReservationInvalid::EndsBeforeStart);
        }
        if self.ends_at <= now {
            return Err(ReservationInvalid::InThePast {
                ends_at: self.ends_at,
            });
        }
        if self.ends_at - self.starts_at > limits.max_window {
            return Err(ReservationInvalid::TooLong {
                max_hours: limits.max_window.num_hours(),
            });
        }
        if self.starts_at - now > limits.max_ahead {
            return Err(ReservationInvalid::TooFarAhead {
                max_days: limits.max_ahead.num_days(),
            });
        }
        Ok(())
    }

    /// When earmarking begins: `lead_time` before the window opens, or `now` if that is later.
    pub fn earmark_from(&self, lead_time: Duration, now: DateTime<Utc>) -> DateTime<Utc> {
        truncate_to_millis((self.starts_at - lead_time).max(now))
    }
}

/// How a reservation ended, if it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationPhase {
    /// Created; earmarking has not begun.
    Scheduled,
    /// Earmarking has begun (the lead time before the window, or the window itself).
    Earmarking,
    /// The window is open.
    Open,
    /// Cancelled by an operator.
    Cancelled,
    /// The window closed.
    Ended,
}

impl ReservationPhase {
    /// The phase's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationPhase::Scheduled => "scheduled",
            ReservationPhase::Earmarking => "earmarking",
            ReservationPhase::Open => "open",
            ReservationPhase::Cancelled => "cancelled",
            ReservationPhase::Ended => "ended",
        }
    }
}

/// The state folded from a reservation stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reservation {
    /// The reservation's id (empty until created).
    pub reservation_id: String,
    /// The track it is for.
    pub track: String,
    /// Sandboxes reserved.
    pub count: u32,
    /// Name prefix, if any.
    pub prefix: Option<String>,
    /// Window start.
    pub starts_at: Option<DateTime<Utc>>,
    /// Window end.
    pub ends_at: Option<DateTime<Utc>>,
    /// Overflow policy.
    pub overflow: Option<OverflowPolicy>,
    /// When earmarking begins.
    pub earmark_from: Option<DateTime<Utc>>,
    /// The operator's note.
    pub note: Option<String>,
    /// When it was created (the first event's time).
    pub created_at: Option<DateTime<Utc>>,
    /// Every sandbox ever earmarked for it (a lost one stays listed; a top-up adds another).
    pub earmarked: BTreeSet<String>,
    /// The last shortfall recorded (0 once a later top-up filled it).
    pub shortfall: u32,
    /// Set once cancelled.
    pub cancelled: bool,
    /// Set once the window closed.
    pub ended: bool,
    /// Events applied (= the stream's version).
    pub version: u64,
}

impl Reservation {
    /// Folds one event.
    pub fn fold(&mut self, event: &ReservationEvent, occurred_at: DateTime<Utc>) {
        use ReservationEvent as E;
        self.version += 1;
        match event {
            E::ReservationListed { .. } => {}
            E::ReservationCreated {
                reservation_id,
                track,
                count,
                prefix,
                starts_at,
                ends_at,
                overflow,
                earmark_from,
                note,
            } => {
                self.reservation_id.clone_from(reservation_id);
                self.track.clone_from(track);
                self.count = *count;
                self.prefix.clone_from(prefix);
                self.starts_at = Some(*starts_at);
                self.ends_at = Some(*ends_at);
                self.overflow = Some(*overflow);
                self.earmark_from = Some(*earmark_from);
                self.note.clone_from(note);
                self.created_at = Some(occurred_at);
            }
            E::ReservationEarmarked { sandbox_ids } => {
                self.earmarked.extend(sandbox_ids.iter().cloned());
            }
            E::ReservationShortfallRecorded { missing, .. } => self.shortfall = *missing,
            E::ReservationCancelled { .. } => self.cancelled = true,
            E::ReservationEnded { .. } => self.ended = true,
        }
    }

    /// True once created.
    pub fn exists(&self) -> bool {
        !self.reservation_id.is_empty()
    }

    /// True once cancelled or ended: nothing more is earmarked.
    pub fn is_closed(&self) -> bool {
        self.cancelled || self.ended
    }

    /// Where the reservation stands at `now`.
    pub fn phase(&self, now: DateTime<Utc>) -> ReservationPhase {
        if self.cancelled {
            return ReservationPhase::Cancelled;
        }
        if self.ended || self.ends_at.is_some_and(|end| now >= end) {
            return ReservationPhase::Ended;
        }
        if self.starts_at.is_some_and(|start| now >= start) {
            return ReservationPhase::Open;
        }
        if self.earmark_from.is_some_and(|from| now >= from) {
            return ReservationPhase::Earmarking;
        }
        ReservationPhase::Scheduled
    }

    /// True when the window overlaps `[from, to)` and the reservation is still open.
    pub fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        !self.is_closed()
            && self.starts_at.is_some_and(|s| s < to)
            && self.ends_at.is_some_and(|e| e > from)
    }

    /// True when its sandboxes may come from the same supply as `prefix`: either has no prefix,
    /// or one prefix starts with the other.
    pub fn competes_with(&self, prefix: Option<&str>) -> bool {
        match (self.prefix.as_deref(), prefix) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => a.starts_with(b) || b.starts_with(a),
        }
    }
}

/// What the earmarked sandboxes of a reservation are now, read from their view rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarmarkUsage {
    /// Available and still earmarked: waiting for the track's students.
    pub free: u32,
    /// Allocated to the track under the earmark.
    pub used: u32,
    /// Earmarked but gone before use (stale, deleted, retired): the job tops these up.
    pub lost: u32,
}

impl EarmarkUsage {
    /// Sandboxes the reservation still needs earmarked to hold `count`.
    pub fn missing(&self, count: u32) -> u32 {
        count.saturating_sub(self.free + self.used)
    }
}

/// One (time, listed) point of sync's history: a complete CSP listing's size.
pub type ListingPoint = (DateTime<Utc>, u32);

/// Forecast: how many new sandboxes sync is expected to register between `now` and `at`, from
/// the listings of the last `lookback`: the rise of the listed count between consecutive
/// listings is new supply (a fall is deletion, which is not supply), averaged over the span the
/// listings cover. A lower bound when deletions and registrations overlap between two listings.
/// Zero without two listings in the lookback, or for `at <= now`.
pub fn expected_registrations(
    listings: &[ListingPoint],
    now: DateTime<Utc>,
    at: DateTime<Utc>,
    lookback: Duration,
) -> u32 {
    if at <= now {
        return 0;
    }
    let since = now - lookback;
    let recent: Vec<&ListingPoint> = listings
        .iter()
        .filter(|(t, _)| *t >= since && *t <= now)
        .collect();
    let (Some(first), Some(last)) = (recent.first(), recent.last()) else {
        return 0;
    };
    let span_s = (last.0 - first.0).num_seconds();
    if recent.len() < 2 || span_s <= 0 {
        return 0;
    }
    let added: u64 = recent
        .windows(2)
        .map(|w| u64::from(w[1].1.saturating_sub(w[0].1)))
        .sum();
    let ahead_s = (at - now).num_seconds().max(0) as u64;
    let expected = added.saturating_mul(ahead_s) / span_s as u64;
    u32::try_from(expected).unwrap_or(u32::MAX)
}

/// Forecast: allocations expected between `now` and `at` at `per_hour`.
pub fn expected_allocations(per_hour: f64, now: DateTime<Utc>, at: DateTime<Utc>) -> u32 {
    if at <= now || !per_hour.is_finite() || per_hour <= 0.0 {
        return 0;
    }
    let hours = (at - now).num_seconds() as f64 / 3600.0;
    let expected = (per_hour * hours).floor();
    if expected >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        expected as u32
    }
}

/// Forecast: when `available` sandboxes are gone at `per_hour` allocations with no new supply;
/// `None` when nothing is being allocated.
pub fn runs_dry_at(available: u64, per_hour: f64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if !per_hour.is_finite() || per_hour <= 0.0 {
        return None;
    }
    let seconds = (available as f64 / per_hour * 3600.0).min(i64::MAX as f64 / 2_000.0);
    Some(now + Duration::milliseconds((seconds * 1000.0) as i64))
}

/// The numbers behind a capacity answer, for `count` students of a track at `at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityFigures {
    /// Students asked about.
    pub count: u32,
    /// Fact: available now (matching the prefix) and earmarked for nobody.
    pub available_now: u32,
    /// Fact: earmarked now for this track and still free.
    pub reserved_for_track: u32,
    /// Fact: what other reservations overlapping the time still need, beyond their earmarks
    /// (earmarks already held are not in `available_now`).
    pub reserved_for_others: u32,
    /// Forecast: sandboxes sync is expected to register by `at`.
    pub expected_registrations: u32,
    /// Forecast: open-pool allocations expected by `at` at the current rate.
    pub expected_allocations: u32,
}

impl CapacityFigures {
    /// Sandboxes this track can count on now: its free earmarks and the open pool after what
    /// other reservations still need.
    pub fn guaranteed(&self) -> u32 {
        (self.available_now + self.reserved_for_track).saturating_sub(self.reserved_for_others)
    }

    /// The figure at `at` including the forecasts: what is guaranteed now, less what other
    /// tracks are expected to take from the open pool by then, plus expected registrations.
    /// The track's own earmarks are not taken by others.
    pub fn forecast(&self) -> u32 {
        let open = self
            .available_now
            .saturating_sub(self.reserved_for_others)
            .saturating_sub(self.expected_allocations);
        (open + self.reserved_for_track).saturating_add(self.expected_registrations)
    }

    /// Students short of `count` by the guaranteed figure (0 when it covers them).
    pub fn shortfall_now(&self) -> u32 {
        self.count.saturating_sub(self.guaranteed())
    }

    /// Students short of `count` by the forecast (0 when it covers them).
    pub fn shortfall_forecast(&self) -> u32 {
        self.count.saturating_sub(self.forecast())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default() + Duration::hours(h)
    }

    fn spec(count: u32, from: i64, to: i64) -> ReservationSpec {
        ReservationSpec {
            track: "ws".into(),
            count,
            prefix: None,
            starts_at: t(from),
            ends_at: t(to),
            overflow: OverflowPolicy::OpenPool,
            note: None,
        }
    }

    /// Input checks refuse zero or huge counts, inverted, past, long and far windows.
    #[test]
    fn validation_refuses_absurd_requests() {
        let limits = ReservationLimits::default();
        let now = t(0);
        assert_eq!(spec(300, 2, 4).validate(&limits, now), Ok(()));
        assert_eq!(spec(300, -1, 4).validate(&limits, now), Ok(()));
        assert!(matches!(
            spec(0, 2, 4).validate(&limits, now),
            Err(ReservationInvalid::Count { .. })
        ));
        assert!(matches!(
            spec(5_001, 2, 4).validate(&limits, now),
            Err(ReservationInvalid::Count { .. })
        ));
        assert_eq!(
            spec(1, 4, 2).validate(&limits, now),
            Err(ReservationInvalid::EndsBeforeStart)
        );
        assert!(matches!(
            spec(1, -4, -2).validate(&limits, now),
            Err(ReservationInvalid::InThePast { .. })
        ));
        assert!(matches!(
            spec(1, 1, 100).validate(&limits, now),
            Err(ReservationInvalid::TooLong { .. })
        ));
        assert!(matches!(
            spec(1, 24 * 91, 24 * 91 + 1).validate(&limits, now),
            Err(ReservationInvalid::TooFarAhead { .. })
        ));
    }

    /// Earmarking begins a lead time before the window, or at once inside the lead time.
    #[test]
    fn earmarking_begins_a_lead_time_ahead_or_now() {
        assert_eq!(spec(1, 5, 6).earmark_from(Duration::hours(1), t(0)), t(4));
        assert_eq!(spec(1, 1, 6).earmark_from(Duration::hours(2), t(0)), t(0));
    }

    /// The phase follows the clock and the closing events; an ended window counts as ended
    /// before the job records it.
    #[test]
    fn phases_follow_the_window_and_the_closing_events() {
        let mut r = Reservation::default();
        r.fold(
            &ReservationEvent::ReservationCreated {
                reservation_id: "r1".into(),
                track: "ws".into(),
                count: 3,
                prefix: None,
                starts_at: t(2),
                ends_at: t(4),
                overflow: OverflowPolicy::OpenPool,
                earmark_from: t(1),
                note: None,
            },
            t(0),
        );
        assert_eq!(r.phase(t(0)), ReservationPhase::Scheduled);
        assert_eq!(r.phase(t(1)), ReservationPhase::Earmarking);
        assert_eq!(r.phase(t(3)), ReservationPhase::Open);
        assert_eq!(r.phase(t(4)), ReservationPhase::Ended);
        r.fold(
            &ReservationEvent::ReservationEarmarked {
                sandbox_ids: vec!["a".into(), "b".into()],
            },
            t(1),
        );
        assert_eq!(r.earmarked.len(), 2);
        assert!(r.overlaps(t(3), t(5)) && !r.overlaps(t(4), t(5)));
        r.fold(
            &ReservationEvent::ReservationCancelled { returned: 2 },
            t(1),
        );
        assert_eq!(r.phase(t(3)), ReservationPhase::Cancelled);
        assert!(!r.overlaps(t(3), t(5)));
    }

    /// The sandbox aggregate refuses other tracks (and trackless requests) while an earmark
    /// binds, serves the reservation's track, treats an ended window as free, and lifts only
    /// its own reservation's unused earmark.
    #[test]
    fn earmarks_bind_one_track_until_the_window_ends() {
        use crate::model::error::DomainError;
        use crate::model::events::SandboxEvent;
        use crate::model::sandbox::{Sandbox, SandboxCommand};
        let mut sandbox = Sandbox::default();
        sandbox.fold(&SandboxEvent::SandboxRegistered {
            sandbox_id: "s1".into(),
            name: "lab-1".into(),
            external_id: "x".into(),
            sfdc_account_id: None,
            csp_created_at: None,
        });
        let reserve = SandboxCommand::Reserve {
            reservation_id: "r1".into(),
            track: "ws".into(),
            ends_at: t(4),
        };
        let events = sandbox.decide(reserve.clone(), t(0)).unwrap_or_default();
        assert_eq!(events.len(), 1);
        events.iter().for_each(|e| sandbox.fold(e));
        assert!(matches!(
            sandbox.decide(reserve, t(1)),
            Err(DomainError::AlreadyEarmarked { .. })
        ));
        let allocate = |track: Option<&str>| SandboxCommand::Allocate {
            caller: "stu".into(),
            track_name: track.map(str::to_string),
            idempotency_key: "k".into(),
            claim_stream: "claim#3:stu#k".into(),
            lab_duration: Duration::hours(1),
            waited_ms: None,
        };
        assert!(matches!(
            sandbox.decide(allocate(Some("other")), t(1)),
            Err(DomainError::ReservedForTrack { ref track, .. }) if track == "ws"
        ));
        assert!(matches!(
            sandbox.decide(allocate(None), t(1)),
            Err(DomainError::ReservedForTrack { .. })
        ));
        assert!(sandbox.decide(allocate(Some("ws")), t(1)).is_ok());
        // The window has ended: free for anyone, before any job lifts the earmark.
        assert!(sandbox.decide(allocate(Some("other")), t(4)).is_ok());
        // Another reservation's lift is a no-op; its own lifts the earmark.
        let lift = |id: &str| SandboxCommand::Unreserve {
            reservation_id: id.into(),
        };
        assert_eq!(sandbox.decide(lift("r2"), t(1)), Ok(vec![]));
        let lifted = sandbox.decide(lift("r1"), t(1)).unwrap_or_default();
        assert_eq!(lifted.len(), 1);
        lifted.iter().for_each(|e| sandbox.fold(e));
        assert!(sandbox.earmark.is_none());
        assert!(sandbox.decide(allocate(Some("other")), t(1)).is_ok());
    }

    /// The view row carries the earmark from `SandboxReserved` on, keeps it through the
    /// allocation (so usage can count it as used), and drops it on `SandboxUnreserved`; the
    /// status and the counters do not move.
    #[test]
    fn the_view_row_carries_the_earmark() {
        use crate::model::events::{Actor, CommandMeta, EventEnvelope, SandboxEvent};
        use crate::model::lifecycle::SandboxStatus;
        use crate::model::projection::project;
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        };
        let mut row = None;
        let mut deltas = Vec::new();
        let events = [
            SandboxEvent::SandboxRegistered {
                sandbox_id: "s1".into(),
                name: "lab-1".into(),
                external_id: "x".into(),
                sfdc_account_id: None,
                csp_created_at: None,
            },
            SandboxEvent::SandboxReserved {
                reservation_id: "r1".into(),
                track: "ws".into(),
                ends_at: t(4),
            },
        ];
        for (i, event) in events.iter().enumerate() {
            let envelope = EventEnvelope::new("sandbox#s1", i as u64 + 1, event, &meta, t(0));
            let (next, delta) = project(row.take(), &envelope, event);
            row = next;
            deltas.push(delta);
        }
        let Some(reserved) = row.clone() else {
            panic!("no row after the earmark");
        };
        assert_eq!(reserved.status, SandboxStatus::Available);
        assert_eq!(
            reserved.earmark.as_ref().map(|e| e.track.as_str()),
            Some("ws")
        );
        assert!(deltas[1].is_zero());
        let lift = SandboxEvent::SandboxUnreserved {
            reservation_id: "r1".into(),
        };
        let envelope = EventEnvelope::new("sandbox#s1", 3, &lift, &meta, t(1));
        let (lifted, delta) = project(row, &envelope, &lift);
        assert!(delta.is_zero());
        assert!(lifted.is_some_and(|r| r.earmark.is_none() && r.version == 3));
    }

    /// Prefixes compete when either is absent or one extends the other.
    #[test]
    fn prefixes_compete_when_their_supplies_overlap() {
        let mut r = Reservation {
            prefix: Some("lab-a".into()),
            ..Reservation::default()
        };
        assert!(r.competes_with(None));
        assert!(r.competes_with(Some("lab")));
        assert!(r.competes_with(Some("lab-a-1")));
        assert!(!r.competes_with(Some("lab-b")));
        r.prefix = None;
        assert!(r.competes_with(Some("lab-b")));
    }

    /// Registrations are forecast from the rises between listings, never from falls.
    #[test]
    fn registrations_are_forecast_from_listing_rises() {
        let now = t(10);
        // +10 over 10 h (with a fall of 5 in between that is not supply): 1 per hour.
        let listings = vec![(t(0), 100), (t(4), 106), (t(6), 101), (t(10), 105)];
        assert_eq!(
            expected_registrations(&listings, now, t(14), Duration::days(7)),
            4
        );
        assert_eq!(
            expected_registrations(&listings, now, now, Duration::days(7)),
            0
        );
        assert_eq!(
            expected_registrations(&listings[..1], now, t(14), Duration::days(7)),
            0
        );
        // Listings older than the lookback do not count.
        assert_eq!(
            expected_registrations(&listings, now, t(14), Duration::hours(5)),
            // Only (6,101) and (10,105) remain: +4 over 4 h.
            4
        );
    }

    /// Allocation forecasts and the run-dry time follow the rate; no rate, no forecast.
    #[test]
    fn allocation_forecasts_follow_the_rate() {
        assert_eq!(expected_allocations(30.0, t(0), t(2)), 60);
        assert_eq!(expected_allocations(0.0, t(0), t(2)), 0);
        assert_eq!(expected_allocations(30.0, t(2), t(0)), 0);
        assert_eq!(runs_dry_at(60, 30.0, t(0)), Some(t(2)));
        assert_eq!(runs_dry_at(60, 0.0, t(0)), None);
    }

    /// The guaranteed figure counts facts only; the forecast adds expected supply and takes
    /// away expected demand from the open pool, never from the track's own earmarks.
    #[test]
    fn capacity_figures_keep_facts_and_forecasts_apart() {
        let figures = CapacityFigures {
            count: 300,
            available_now: 250,
            reserved_for_track: 40,
            reserved_for_others: 20,
            expected_registrations: 50,
            expected_allocations: 30,
        };
        assert_eq!(figures.guaranteed(), 270);
        assert_eq!(figures.shortfall_now(), 30);
        assert_eq!(figures.forecast(), 200 + 40 + 50);
        assert_eq!(figures.shortfall_forecast(), 10);
        let usage = EarmarkUsage {
            free: 5,
            used: 3,
            lost: 2,
        };
        assert_eq!(usage.missing(10), 2);
    }
}
