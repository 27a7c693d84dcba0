//! Usage reports: who used how much of the pool over a time range (allocations, sandbox-hours,
//! hold times, extensions, waits, refusals, deletions, quarantines), grouped by track, name
//! prefix or day, computed from the event log alone (ADR 0030).
//!
//! [`UsageAggregator`] is the one computation behind `GET /v1/admin/usage` and
//! `broker-audit usage`: the caller streams the log's events in time order into it, and
//! [`UsageAggregator::finish`] turns what it kept into a [`UsageReport`]. [`usage_from_feed`]
//! is that loop over the [`EventFeed`] port; the offline reader of an export runs the same loop
//! over a file.
//!
//! **Memory does not grow with the events read.** Per group the aggregator keeps counters and
//! one fixed-size histogram of hold times (so a median and a p95 need no list of samples); the
//! number of groups is capped ([`MAX_USAGE_GROUPS`], the rest fall into [`OTHER_GROUP`]); and
//! per sandbox it keeps only the allocation in flight (from hand-out to the end of its deletion),
//! which the size of the pool bounds, not the length of the range.
//!
//! **Counting rules.** An allocation counts in the range (and the day) it started in; its hold
//! time runs from the `SandboxAllocated` event to the event that ended it (marked for deletion,
//! reclaimed or expired). An allocation still held at the end of the range counts its
//! sandbox-hours up to that end and stays out of the hold-time percentiles (it has no hold time
//! yet). Extensions, deletions and quarantines count in the group of the allocation they belong
//! to; when that allocation started before the range, by the sandbox's name prefix (group by
//! prefix), the event's day (group by day), or [`UNATTRIBUTED_GROUP`] (group by track).
//!
//! **Filters.** A [`UsageFilter`] narrows a report to one track, to the sandboxes whose name
//! starts with a prefix, or both, under any grouping (ADR 0034). It selects allocations: an
//! allocation counts when its track and its sandbox's name match, and the extensions, deletions
//! and quarantines that follow it count with it. Events of an allocation that started before the
//! range cannot be matched (the allocation event with its track is outside the range) and are
//! left out of a filtered report. Refusal summaries count when the track and the name prefix the
//! refused request asked for match.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::audit::{EventFeed, FeedFilter, FeedQuery, FEED_PAGE};
use crate::heartbeat::RECLAIM_REASON;
use crate::model::events::{format_time, BrokerEvent, EventEnvelope, SandboxEvent, UsageEvent};
use crate::model::ids::{sandbox_id_of, sandbox_stream};
use crate::model::pool_prefix::pool_prefix;
use crate::store::{EventStore, StoreError};

/// Most groups one report keeps apart; events of further groups count in [`OTHER_GROUP`]. A
/// year by day is 366 groups, so only a pool with more than this many tracks or prefixes folds.
pub const MAX_USAGE_GROUPS: usize = 1_000;
/// The group that collects everything past [`MAX_USAGE_GROUPS`].
pub const OTHER_GROUP: &str = "(other)";
/// The group of events whose allocation started before the range, grouped by track.
pub const UNATTRIBUTED_GROUP: &str = "(before range)";
/// The group of allocations without a track name, grouped by track.
pub const NO_TRACK_GROUP: &str = "(no track)";
/// Longest range one report covers (days): a bound on the work of one request, not on memory.
pub const MAX_USAGE_RANGE_DAYS: i64 = 400;
/// Longest hold time the histograms resolve (seconds); longer holds count as this long in the
/// percentiles (never in sandbox-hours, which are summed exactly).
const MAX_HOLD_S: u64 = 400 * 24 * 3600;

/// How a report groups its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageGroupBy {
    /// By the allocation's track name.
    Track,
    /// By the sandbox name's prefix (`aws-lab-007` → `aws-lab`).
    Prefix,
    /// By UTC day (`YYYY-MM-DD`).
    Day,
}

impl UsageGroupBy {
    /// The name used in queries and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageGroupBy::Track => "track",
            UsageGroupBy::Prefix => "prefix",
            UsageGroupBy::Day => "day",
        }
    }
}

impl fmt::Display for UsageGroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UsageGroupBy {
    type Err = UsageRangeError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.trim() {
            "track" => Ok(UsageGroupBy::Track),
            "prefix" => Ok(UsageGroupBy::Prefix),
            "day" => Ok(UsageGroupBy::Day),
            other => Err(UsageRangeError::GroupBy(other.to_string())),
        }
    }
}

/// Why a report's parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageRangeError {
    /// `to` is not after `from`.
    #[error(
        "the range is empty: `to` must be later than `from`; pass an earlier from or a later to"
    )]
    Empty,
    /// The range is longer than [`MAX_USAGE_RANGE_DAYS`].
    #[error("the range spans more than {MAX_USAGE_RANGE_DAYS} days; split it into shorter ranges")]
    TooLong,
    /// Not one of the groupings.
    #[error("group_by `{0}` is not known; use track, prefix or day")]
    GroupBy(String),
}

/// The parameters of a report: the half-open range `[from, to)` and the grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuery {
    /// Inclusive start.
    pub from: DateTime<Utc>,
    /// Exclusive end.
    pub to: DateTime<Utc>,
    /// The grouping.
    pub group_by: UsageGroupBy,
}

impl UsageQuery {
    /// A query after checking the range is not empty and not longer than
    /// [`MAX_USAGE_RANGE_DAYS`].
    pub fn new(
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: UsageGroupBy,
    ) -> Result<Self, UsageRangeError> {
        if to <= from {
            return Err(UsageRangeError::Empty);
        }
        if to - from > Duration::days(MAX_USAGE_RANGE_DAYS) {
            return Err(UsageRangeError::TooLong);
        }
        Ok(Self { from, to, group_by })
    }
}

/// Which allocations a report covers (ADR 0034): all of them by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageFilter {
    /// Only allocations made for this track.
    pub track: Option<String>,
    /// Only allocations of sandboxes whose name starts with this.
    pub name_prefix: Option<String>,
}

impl UsageFilter {
    /// True when the filter selects every allocation.
    pub fn is_empty(&self) -> bool {
        self.track.is_none() && self.name_prefix.is_none()
    }

    /// Whether a sandbox named `name` passes the name filter.
    fn name_matches(&self, name: &str) -> bool {
        self.name_prefix
            .as_deref()
            .is_none_or(|prefix| name.starts_with(prefix))
    }

    /// Whether an allocation for `track` of a sandbox whose name matched the name filter
    /// (`name_matches`, `None`: its name is unknown) is in the report.
    fn selects(&self, track: Option<&str>, name_matches: Option<bool>) -> bool {
        let track_ok = self.track.as_deref().is_none_or(|t| track == Some(t));
        let name_ok = self.name_prefix.is_none() || name_matches == Some(true);
        track_ok && name_ok
    }

    /// Whether a refusal of a request for `track` and `prefix` is in the report.
    fn selects_refusal(&self, track: Option<&str>, prefix: Option<&str>) -> bool {
        let track_ok = self.track.as_deref().is_none_or(|t| track == Some(t));
        let name_ok = self
            .name_prefix
            .as_deref()
            .is_none_or(|wanted| prefix.is_some_and(|p| p.starts_with(wanted)));
        track_ok && name_ok
    }
}

/// The figures of one group (or of the whole range, in [`UsageReport::totals`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageFigures {
    /// The group's key (a track, a prefix or a `YYYY-MM-DD` day); `"total"` in the totals.
    pub group: String,
    /// Allocations that started in the range.
    pub allocations: u64,
    /// Hours those allocations held their sandboxes, up to the end of the range (or now) for
    /// the ones still held.
    pub sandbox_hours: f64,
    /// Allocations that ended in the range (the ones with a hold time).
    pub ended: u64,
    /// Allocations still held at the end of the range.
    pub held_at_end: u64,
    /// Median hold time of the ended allocations (seconds, nearest rank); `None` without any.
    pub hold_median_s: Option<u64>,
    /// 95th-percentile hold time of the ended allocations (seconds, nearest rank).
    pub hold_p95_s: Option<u64>,
    /// Lease extensions.
    pub extensions: u64,
    /// Allocations that waited in line first.
    pub waits: u64,
    /// Allocations ended by the heartbeat reclaim (a subset of `ended`).
    pub reclaims: u64,
    /// Refused allocation requests by reason, from the API instances' refusal summaries.
    pub refusals: BTreeMap<String, u64>,
    /// Sandboxes deleted at the CSP.
    pub deletions: u64,
    /// Sandboxes quarantined after their deletion failed for good.
    pub quarantines: u64,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// Inclusive start (RFC 3339).
    pub from: String,
    /// Exclusive end (RFC 3339).
    pub to: String,
    /// The grouping.
    pub group_by: UsageGroupBy,
    /// The track filter, when the report has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track: Option<String>,
    /// The name-prefix filter, when the report has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// One entry per group, in key order.
    pub groups: Vec<UsageFigures>,
    /// The whole range.
    pub totals: UsageFigures,
    /// Events read.
    pub events_read: u64,
    /// True when more groups appeared than a report keeps ([`MAX_USAGE_GROUPS`]); the rest are
    /// summed in [`OTHER_GROUP`].
    pub groups_folded: bool,
    /// How many refusal summaries were read. Refusals are counted only while API instances
    /// write summaries (`WRITE_EVENTS_USAGE`); for a time when no instance did, the report
    /// shows no refusals rather than zero refusals: see `refusals_note`.
    pub refusal_summaries: u64,
    /// What the refusal figures cover.
    pub refusals_note: String,
}

#[derive(Debug, Clone)]
struct GroupTally {
    figures: UsageFigures,
    hold_ms_total: i64,
    /// `None` only if the histogram could not be created, which constant, valid bounds rule
    /// out; the percentiles are then absent rather than a panic on a request path.
    holds: Option<Histogram<u64>>,
}

impl GroupTally {
    fn new(group: &str) -> Self {
        // Three significant digits over 1 s .. MAX_HOLD_S: a fixed ~30 KiB per group, and every
        // hold up to 2047 s is resolved to the second.
        let holds = Histogram::new_with_bounds(1, MAX_HOLD_S, 3).ok();
        Self {
            figures: UsageFigures {
                group: group.to_string(),
                ..UsageFigures::default()
            },
            hold_ms_total: 0,
            holds,
        }
    }

    fn add(&mut self, other: &GroupTally) {
        let f = &mut self.figures;
        let o = &other.figures;
        f.allocations += o.allocations;
        f.ended += o.ended;
        f.held_at_end += o.held_at_end;
        f.extensions += o.extensions;
        f.waits += o.waits;
        f.reclaims += o.reclaims;
        f.deletions += o.deletions;
        f.quarantines += o.quarantines;
        for (reason, n) in &o.refusals {
            *f.refusals.entry(reason.clone()).or_default() += n;
        }
        self.hold_ms_total += other.hold_ms_total;
        // Both histograms have the same bounds, so adding cannot fail.
        if let (Some(mine), Some(theirs)) = (self.holds.as_mut(), other.holds.as_ref()) {
            let _ = mine.add(theirs);
        }
    }

    fn finish(mut self) -> UsageFigures {
        self.figures.sandbox_hours =
            ((self.hold_ms_total as f64) / 3_600_000.0 * 1_000.0).round() / 1_000.0;
        if let Some(holds) = self.holds.as_ref().filter(|h| !h.is_empty()) {
            // The lowest value of the histogram bucket: exact to the second up to 2047 s,
            // within 0.1 % above (a hold recorded as 3600 s reads back as 3600 s).
            let at = |q: f64| holds.lowest_equivalent(holds.value_at_quantile(q));
            self.figures.hold_median_s = Some(at(0.5));
            self.figures.hold_p95_s = Some(at(0.95));
        }
        self.figures
    }
}

/// What the aggregator remembers of a sandbox between its hand-out and the end of its
/// deletion: which group its events count in, and when the allocation began (while held).
#[derive(Debug, Clone)]
struct InFlight {
    group: String,
    allocated_at: Option<DateTime<Utc>>,
    prefix: Option<String>,
    /// Whether the sandbox's name passes the name filter (`None`: not known yet).
    name_matches: Option<bool>,
    /// Whether its events count: false for an allocation the filter leaves out (and, under a
    /// filter, for a sandbox only registered so far).
    counted: bool,
}

/// Folds a time-ordered stream of events into usage figures in constant memory per group (see
/// the module docs).
#[derive(Debug)]
pub struct UsageAggregator {
    query: UsageQuery,
    filter: UsageFilter,
    groups: BTreeMap<String, GroupTally>,
    in_flight: HashMap<String, InFlight>,
    events_read: u64,
    groups_folded: bool,
    refusal_summaries: u64,
}

/// One refusal count of a summary: `count` requests of `track` (and `prefix`) refused for
/// `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount<'a> {
    /// The track asked for, if any.
    pub track: Option<&'a str>,
    /// The name prefix asked for, if any.
    pub prefix: Option<&'a str>,
    /// Why (the allocation outcome, e.g. `no_sandboxes`).
    pub reason: &'a str,
    /// Requests refused.
    pub count: u64,
}

impl UsageAggregator {
    /// An empty aggregator for `query`.
    pub fn new(query: UsageQuery) -> Self {
        Self {
            query,
            filter: UsageFilter::default(),
            groups: BTreeMap::new(),
            in_flight: HashMap::new(),
            events_read: 0,
            groups_folded: false,
            refusal_summaries: 0,
        }
    }

    /// The same aggregator, counting only the allocations `filter` selects.
    pub fn with_filter(mut self, filter: UsageFilter) -> Self {
        self.filter = filter;
        self
    }

    /// The sandboxes it remembers (allocations held or being deleted): bounded by the pool, not
    /// by the events read.
    pub fn sandboxes_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The groups it keeps (at most [`MAX_USAGE_GROUPS`] + 1).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// True when `event` is a `SandboxAllocated` and the grouping needs the sandbox's name,
    /// which the allocation event does not carry: the caller then passes it to
    /// [`UsageAggregator::observe`] (from the sandbox's registration).
    pub fn needs_name(&self, event: &EventEnvelope) -> bool {
        self.wants_names()
            && event.event_type == "SandboxAllocated"
            && sandbox_id_of(&event.stream_id).is_some_and(|id| {
                // A registration read in the range already named it.
                self.in_flight.get(id).is_none_or(|f| f.prefix.is_none())
            })
    }

    /// Whether sandbox names matter: grouping by prefix, or filtering by one.
    fn wants_names(&self) -> bool {
        self.query.group_by == UsageGroupBy::Prefix || self.filter.name_prefix.is_some()
    }

    /// Whether a filter leaves this sandbox's events out: it has one and the sandbox is not in
    /// an allocation it selected.
    fn left_out(&self, sandbox_id: &str) -> bool {
        !self.filter.is_empty() && self.in_flight.get(sandbox_id).is_none_or(|f| !f.counted)
    }

    fn tally(&mut self, group: &str) -> &mut GroupTally {
        let key = if self.groups.contains_key(group) || self.groups.len() < MAX_USAGE_GROUPS {
            group
        } else {
            self.groups_folded = true;
            OTHER_GROUP
        };
        self.groups
            .entry(key.to_string())
            .or_insert_with(|| GroupTally::new(key))
    }

    fn day(at: &DateTime<Utc>) -> String {
        at.date_naive().format("%Y-%m-%d").to_string()
    }

    /// The group an event outside a known allocation counts in.
    fn fallback_group(&self, at: &DateTime<Utc>, name: Option<&str>) -> String {
        match self.query.group_by {
            UsageGroupBy::Day => Self::day(at),
            UsageGroupBy::Prefix => name.map_or(UNATTRIBUTED_GROUP.to_string(), |n| {
                pool_prefix(n).to_string()
            }),
            UsageGroupBy::Track => UNATTRIBUTED_GROUP.to_string(),
        }
    }

    /// Folds one event in. Events must come in time order (the feed's order); events outside
    /// the range are ignored. `name` is the sandbox's CSP name when [`Self::needs_name`] asked
    /// for it (ignored otherwise).
    pub fn observe(&mut self, event: &EventEnvelope, name: Option<&str>) {
        let at = event.occurred_at;
        if at < self.query.from || at >= self.query.to {
            return;
        }
        self.events_read += 1;
        let Some(sandbox_id) = sandbox_id_of(&event.stream_id) else {
            if let Ok(BrokerEvent::Usage(UsageEvent::RefusalsSummarized { refusals, .. })) =
                event.decode()
            {
                let counts: Vec<RefusalCount<'_>> = refusals
                    .iter()
                    .map(|r| RefusalCount {
                        track: r.track.as_deref(),
                        prefix: r.prefix.as_deref(),
                        reason: &r.reason,
                        count: r.count,
                    })
                    .collect();
                self.count_refusals(at, &counts);
            }
            return;
        };
        let Ok(BrokerEvent::Sandbox(payload)) = event.decode() else {
            return;
        };
        match payload {
            // A name seen in the range spares the caller a lookup at the allocation.
            SandboxEvent::SandboxRegistered { name, .. } if self.wants_names() => {
                self.in_flight.insert(
                    sandbox_id.to_string(),
                    InFlight {
                        group: pool_prefix(&name).to_string(),
                        allocated_at: None,
                        prefix: Some(pool_prefix(&name).to_string()),
                        name_matches: Some(self.filter.name_matches(&name)),
                        counted: self.filter.is_empty(),
                    },
                );
            }
            SandboxEvent::SandboxAllocated {
                track_name,
                waited_ms,
                ..
            } => {
                let known_prefix = self
                    .in_flight
                    .get(sandbox_id)
                    .and_then(|f| f.prefix.clone())
                    .or_else(|| name.map(|n| pool_prefix(n).to_string()));
                let name_matches = self
                    .in_flight
                    .get(sandbox_id)
                    .and_then(|f| f.name_matches)
                    .or_else(|| name.map(|n| self.filter.name_matches(n)));
                if !self.filter.selects(track_name.as_deref(), name_matches) {
                    // Remembered, so that the events that follow this allocation stay out too.
                    self.in_flight.insert(
                        sandbox_id.to_string(),
                        InFlight {
                            group: String::new(),
                            allocated_at: None,
                            prefix: known_prefix,
                            name_matches,
                            counted: false,
                        },
                    );
                    return;
                }
                let group = match self.query.group_by {
                    UsageGroupBy::Track => track_name
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| NO_TRACK_GROUP.to_string()),
                    UsageGroupBy::Prefix => known_prefix
                        .clone()
                        .unwrap_or_else(|| UNATTRIBUTED_GROUP.to_string()),
                    UsageGroupBy::Day => Self::day(&at),
                };
                let tally = self.tally(&group);
                tally.figures.allocations += 1;
                if waited_ms.is_some() {
                    tally.figures.waits += 1;
                }
                let group = tally.figures.group.clone();
                self.in_flight.insert(
                    sandbox_id.to_string(),
                    InFlight {
                        group,
                        allocated_at: Some(at),
                        prefix: known_prefix,
                        name_matches,
                        counted: true,
                    },
                );
            }
            SandboxEvent::DeletionRequested { .. } | SandboxEvent::AllocationExpired { .. } => {
                let reclaimed = matches!(
                    &payload,
                    SandboxEvent::DeletionRequested { reason: Some(r), .. } if r == RECLAIM_REASON
                );
                self.end_hold(sandbox_id, at, reclaimed);
            }
            SandboxEvent::LeaseExtended { .. }
            | SandboxEvent::DeletionFailed { .. }
            | SandboxEvent::SandboxDeleted { .. }
                if self.left_out(sandbox_id) =>
            {
                if matches!(payload, SandboxEvent::SandboxDeleted { .. }) {
                    self.in_flight.remove(sandbox_id);
                }
            }
            SandboxEvent::LeaseExtended { .. } => {
                let group = self.group_of(sandbox_id, &at);
                self.tally(&group).figures.extensions += 1;
            }
            SandboxEvent::DeletionFailed { .. } => {
                let group = self.group_of(sandbox_id, &at);
                self.tally(&group).figures.quarantines += 1;
            }
            SandboxEvent::SandboxDeleted { .. } => {
                let group = self.group_of(sandbox_id, &at);
                self.tally(&group).figures.deletions += 1;
                self.in_flight.remove(sandbox_id);
            }
            SandboxEvent::SandboxRetired { .. } => {
                self.in_flight.remove(sandbox_id);
            }
            _ => {}
        }
    }

    fn group_of(&self, sandbox_id: &str, at: &DateTime<Utc>) -> String {
        match (self.query.group_by, self.in_flight.get(sandbox_id)) {
            (UsageGroupBy::Day, _) => Self::day(at),
            (_, Some(flight)) => flight.group.clone(),
            (_, None) => self.fallback_group(at, None),
        }
    }

    fn end_hold(&mut self, sandbox_id: &str, at: DateTime<Utc>, reclaimed: bool) {
        let Some(flight) = self.in_flight.get_mut(sandbox_id) else {
            return;
        };
        let Some(start) = flight.allocated_at.take() else {
            return;
        };
        let group = flight.group.clone();
        let held_ms = (at - start).num_milliseconds().max(0);
        let tally = self.tally(&group);
        tally.figures.ended += 1;
        if reclaimed {
            tally.figures.reclaims += 1;
        }
        tally.hold_ms_total += held_ms;
        // Rounded to the second, at least 1 s (the histogram's lowest value).
        let held_s = ((held_ms + 500) / 1_000).clamp(1, MAX_HOLD_S as i64) as u64;
        if let Some(holds) = tally.holds.as_mut() {
            // Clamped to the histogram's bounds above, so recording cannot fail.
            let _ = holds.record(held_s);
        }
    }

    /// Folds the counts of one refusal summary written at `at` (ignored outside the range).
    pub fn observe_refusals(&mut self, at: DateTime<Utc>, counts: &[RefusalCount<'_>]) {
        if at < self.query.from || at >= self.query.to {
            return;
        }
        self.count_refusals(at, counts);
    }

    fn count_refusals(&mut self, at: DateTime<Utc>, counts: &[RefusalCount<'_>]) {
        self.refusal_summaries += 1;
        for c in counts {
            if !self.filter.selects_refusal(c.track, c.prefix) {
                continue;
            }
            let group = match self.query.group_by {
                UsageGroupBy::Track => c.track.unwrap_or(NO_TRACK_GROUP).to_string(),
                UsageGroupBy::Prefix => c.prefix.unwrap_or(UNATTRIBUTED_GROUP).to_string(),
                UsageGroupBy::Day => Self::day(&at),
            };
            *self
                .tally(&group)
                .figures
                .refusals
                .entry(c.reason.to_string())
                .or_default() += c.count;
        }
    }

    /// The report. `now` closes allocations still held: they count sandbox-hours up to the
    /// earlier of the range's end and `now`.
    pub fn finish(mut self, now: DateTime<Utc>) -> UsageReport {
        let end = self.query.to.min(now);
        let open: Vec<(String, DateTime<Utc>)> = self
            .in_flight
            .values()
            .filter_map(|f| f.allocated_at.map(|a| (f.group.clone(), a)))
            .collect();
        for (group, start) in open {
            let tally = self.tally(&group);
            tally.figures.held_at_end += 1;
            tally.hold_ms_total += (end - start).num_milliseconds().max(0);
        }
        let mut totals = GroupTally::new("total");
        for tally in self.groups.values() {
            totals.add(tally);
        }
        let refusals_note = if self.refusal_summaries == 0 {
            "no refusal summaries in this range: refusals are counted only while API instances \
             write them (WRITE_EVENTS_USAGE=true); turn the flag on to count them from then on"
                .to_string()
        } else {
            "refusals count what API instances summarised while WRITE_EVENTS_USAGE was on; a \
             part of the range with the flag off counts none"
                .to_string()
        };
        UsageReport {
            from: format_time(&self.query.from),
            to: format_time(&self.query.to),
            group_by: self.query.group_by,
            track: self.filter.track,
            prefix: self.filter.name_prefix,
            groups: self.groups.into_values().map(GroupTally::finish).collect(),
            totals: totals.finish(),
            events_read: self.events_read,
            groups_folded: self.groups_folded,
            refusal_summaries: self.refusal_summaries,
            refusals_note,
        }
    }
}

/// Runs [`UsageAggregator`] over the feed: every event in `[from, to)` in time order, page by
/// page ([`FEED_PAGE`] events each). When grouping by prefix, the name of a sandbox allocated
/// in the range but registered before it is read from the first event of its stream.
pub async fn usage_from_feed(
    feed: &dyn EventFeed,
    store: &dyn EventStore,
    query: UsageQuery,
    now: DateTime<Utc>,
) -> Result<UsageReport, StoreError> {
    usage_from_feed_filtered(feed, store, query, UsageFilter::default(), now).await
}

/// [`usage_from_feed`] counting only the allocations `filter` selects (ADR 0034). With a name
/// filter, the name of every allocated sandbox registered before the range is read as for
/// grouping by prefix.
pub async fn usage_from_feed_filtered(
    feed: &dyn EventFeed,
    store: &dyn EventStore,
    query: UsageQuery,
    filter: UsageFilter,
    now: DateTime<Utc>,
) -> Result<UsageReport, StoreError> {
    let mut aggregator = UsageAggregator::new(query).with_filter(filter);
    // A position just before `from`'s millisecond: every event at or after `from` follows it.
    let mut after = format_time(&(query.from - Duration::milliseconds(1)));
    loop {
        let page = feed
            .feed(
                &FeedQuery {
                    after: after.clone(),
                    until: query.to,
                    filter: FeedFilter::default(),
                },
                FEED_PAGE,
            )
            .await?;
        for event in &page.events {
            if aggregator.needs_name(event) {
                let name = sandbox_name(store, &event.stream_id).await?;
                aggregator.observe(event, name.as_deref());
            } else {
                observe_any(&mut aggregator, event);
            }
        }
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    Ok(aggregator.finish(now))
}

/// Folds an event that needs no name lookup: sandbox events, and refusal summaries.
pub fn observe_any(aggregator: &mut UsageAggregator, event: &EventEnvelope) {
    aggregator.observe(event, None);
}

async fn sandbox_name(
    store: &dyn EventStore,
    stream_id: &str,
) -> Result<Option<String>, StoreError> {
    let Some(sandbox_id) = sandbox_id_of(stream_id) else {
        return Ok(None);
    };
    let events = store.load(&sandbox_stream(sandbox_id)).await?;
    Ok(events.iter().find_map(|e| match e.decode() {
        Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxRegistered { name, .. })) => Some(name),
        _ => None,
    }))
}

/// Parses a report bound: an RFC 3339 time or a `YYYY-MM-DD` day (its midnight, UTC).
pub fn parse_usage_time(raw: &str) -> Result<DateTime<Utc>, String> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            format!(
                "`{raw}` is not a time; use RFC 3339 (2026-01-31T09:00:00Z) or a day (2026-01-31)"
            )
        })
}

/// The CSV header of [`usage_csv`].
pub const USAGE_CSV_HEADER: &str = "group,allocations,sandbox_hours,ended,held_at_end,hold_median_s,hold_p95_s,extensions,waits,reclaims,refusals,deletions,quarantines";

/// The report as CSV: the header, one line per group, and a last line for the totals (group
/// `total`). Refusals are one column, `reason=count` pairs joined by `;`.
pub fn usage_csv(report: &UsageReport) -> String {
    let mut out = String::from(USAGE_CSV_HEADER);
    out.push('\n');
    for f in report.groups.iter().chain(std::iter::once(&report.totals)) {
        let refusals = f
            .refusals
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(";");
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&f.group),
            f.allocations,
            f.sandbox_hours,
            f.ended,
            f.held_at_end,
            opt(f.hold_median_s),
            opt(f.hold_p95_s),
            f.extensions,
            f.waits,
            f.reclaims,
            csv_field(&refusals),
            f.deletions,
            f.quarantines,
        ));
    }
    out
}

/// Quotes a CSV field when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(raw: &str) -> String {
    if raw.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", raw.replace('"', "\"\""))
    } else {
        raw.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::{Actor, CommandMeta};
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0)
            .single()
            .unwrap_or_default()
    }

    fn meta() -> CommandMeta {
        CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        }
    }

    fn event(sandbox: &str, version: u64, at: DateTime<Utc>, e: SandboxEvent) -> EventEnvelope {
        EventEnvelope::new(&sandbox_stream(sandbox), version, &e, &meta(), at)
    }

    fn registered(sandbox: &str, name: &str, at: DateTime<Utc>) -> EventEnvelope {
        event(
            sandbox,
            1,
            at,
            SandboxEvent::SandboxRegistered {
                sandbox_id: sandbox.into(),
                name: name.into(),
                external_id: format!("identity/accounts/{sandbox}"),
                sfdc_account_id: None,
                csp_created_at: None,
            },
        )
    }

    fn allocated(sandbox: &str, track: &str, at: DateTime<Utc>, waited: bool) -> EventEnvelope {
        event(
            sandbox,
            2,
            at,
            SandboxEvent::SandboxAllocated {
                caller: format!("student-{sandbox}"),
                track_name: Some(track.into()),
                idempotency_key: "k".into(),
                claim_stream: format!("claim#{sandbox}"),
                allocated_at: at,
                expires_at: at + Duration::hours(8),
                lab_duration_s: 8 * 3600,
                heartbeat_interval_s: None,
                heartbeat_grace_s: None,
                waited_ms: waited.then_some(1_500),
            },
        )
    }

    fn marked(sandbox: &str, at: DateTime<Utc>, reason: Option<&str>) -> EventEnvelope {
        event(
            sandbox,
            3,
            at,
            SandboxEvent::DeletionRequested {
                caller: format!("student-{sandbox}"),
                requested_at: at,
                reason: reason.map(str::to_string),
                last_heartbeat_at: None,
            },
        )
    }

    fn query(group_by: UsageGroupBy) -> UsageQuery {
        UsageQuery::new(t0(), t0() + Duration::days(1), group_by).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A known scenario gives exact counts, sandbox-hours and nearest-rank percentiles per track.
    #[test]
    fn figures_of_a_known_scenario() {
        let mut agg = UsageAggregator::new(query(UsageGroupBy::Track));
        let m = Duration::minutes;
        let log = vec![
            registered("a", "lab-1", t0()),
            registered("b", "lab-2", t0()),
            registered("c", "lab-3", t0()),
            registered("d", "lab-4", t0()),
            allocated("a", "aws", t0() + m(10), false),
            allocated("b", "aws", t0() + m(10), true),
            allocated("c", "aws", t0() + m(10), false),
            allocated("d", "gcp", t0() + m(10), false),
            marked("a", t0() + m(20), None),
            event(
                "b",
                3,
                t0() + m(25),
                SandboxEvent::LeaseExtended {
                    caller: "student-b".into(),
                    hours: 1,
                    previous_expires_at: t0(),
                    expires_at: t0(),
                    extended_total_s: 3600,
                    idempotency_key: None,
                },
            ),
            marked("b", t0() + m(40), Some(RECLAIM_REASON)),
            event(
                "c",
                3,
                t0() + m(70),
                SandboxEvent::AllocationExpired {
                    expired_at: t0() + m(70),
                },
            ),
            event(
                "a",
                4,
                t0() + m(80),
                SandboxEvent::SandboxDeleted {
                    csp_status: Some(204),
                },
            ),
            event(
                "c",
                4,
                t0() + m(80),
                SandboxEvent::DeletionFailed {
                    attempts: 5,
                    last_error: "refused".into(),
                    transient: false,
                },
            ),
        ];
        for e in &log {
            agg.observe(e, None);
        }
        // d is still held at the end: 10:10 .. 11:10 (now).
        let report = agg.finish(t0() + m(130));
        let aws = &report.groups[0];
        assert_eq!(aws.group, "aws");
        assert_eq!(aws.allocations, 3);
        assert_eq!(aws.ended, 3);
        assert_eq!(aws.waits, 1);
        assert_eq!(aws.reclaims, 1);
        assert_eq!(aws.extensions, 1);
        assert_eq!(aws.deletions, 1);
        assert_eq!(aws.quarantines, 1);
        // Holds of 10, 30 and 60 minutes: 1.667 h, median 1800 s, p95 3600 s.
        assert_eq!(aws.sandbox_hours, 1.667);
        assert_eq!(aws.hold_median_s, Some(1_800));
        assert_eq!(aws.hold_p95_s, Some(3_600));
        let gcp = &report.groups[1];
        assert_eq!(gcp.group, "gcp");
        assert_eq!((gcp.allocations, gcp.ended, gcp.held_at_end), (1, 0, 1));
        assert_eq!(gcp.sandbox_hours, 2.0);
        assert_eq!(gcp.hold_median_s, None);
        assert_eq!(report.totals.allocations, 4);
        assert_eq!(report.totals.sandbox_hours, 3.667);
        assert_eq!(report.totals.hold_median_s, Some(1_800));
        assert_eq!(report.events_read, log.len() as u64);
    }

    /// Grouping by prefix uses the names registered in the range or passed in by the caller.
    #[test]
    fn groups_by_prefix_and_day() {
        let mut by_prefix = UsageAggregator::new(query(UsageGroupBy::Prefix));
        let mut by_day = UsageAggregator::new(query(UsageGroupBy::Day));
        let log = [
            registered("a", "aws-lab-1", t0()),
            allocated("a", "t", t0() + Duration::hours(1), false),
            allocated("z", "t", t0() + Duration::hours(2), false),
        ];
        for e in &log {
            let name = by_prefix.needs_name(e).then_some("gcp-lab-9");
            by_prefix.observe(e, name);
            by_day.observe(e, None);
        }
        let prefix = by_prefix.finish(t0() + Duration::hours(3));
        let groups: Vec<_> = prefix
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g.allocations))
            .collect();
        assert_eq!(groups, vec![("aws-lab", 1), ("gcp-lab", 1)]);
        let day = by_day.finish(t0() + Duration::hours(3));
        assert_eq!(day.groups.len(), 1);
        assert_eq!(day.groups[0].group, "2026-03-02");
        assert_eq!(day.groups[0].sandbox_hours, 3.0);
    }

    /// The aggregator's state does not grow with the events of a group: a million allocations
    /// of one track that each end leave one group and no sandbox in flight, and the histogram's
    /// size is fixed at creation.
    #[test]
    fn state_does_not_grow_with_events() {
        let mut agg = UsageAggregator::new(query(UsageGroupBy::Track));
        let fresh = GroupTally::new("x").holds.map(|h| h.distinct_values());
        assert!(fresh.is_some());
        for i in 0..100_000u32 {
            let at = t0() + Duration::milliseconds(i64::from(i) * 100);
            let id = format!("s{}", i % 50);
            agg.observe(&allocated(&id, "aws", at, false), None);
            agg.observe(
                &marked(&id, at + Duration::seconds(i64::from(i % 3000)), None),
                None,
            );
            agg.observe(
                &event(
                    &id,
                    4,
                    at,
                    SandboxEvent::SandboxDeleted { csp_status: None },
                ),
                None,
            );
        }
        assert_eq!(agg.group_count(), 1);
        assert_eq!(agg.sandboxes_in_flight(), 0);
        let tally = agg
            .groups
            .values()
            .next()
            .and_then(|t| t.holds.as_ref().map(|h| h.distinct_values()));
        assert_eq!(tally, fresh);
        let report = agg.finish(t0() + Duration::days(1));
        assert_eq!(report.totals.allocations, 100_000);
        assert_eq!(report.totals.ended, 100_000);
    }

    /// A track filter and a name filter select exactly the matching allocations under every
    /// grouping, with the extensions and deletions that follow them; refusals count when their
    /// track and requested prefix match; an unknown track gives an empty report.
    #[test]
    fn filters_select_matching_allocations() {
        let m = Duration::minutes;
        let log = vec![
            registered("a", "aws-lab-1", t0()),
            registered("b", "aws-lab-2", t0()),
            registered("c", "gcp-lab-1", t0()),
            allocated("a", "aws", t0() + m(10), false),
            allocated("b", "other", t0() + m(10), false),
            allocated("c", "aws", t0() + m(10), false),
            marked("a", t0() + m(40), None),
            marked("c", t0() + m(70), None),
            event(
                "c",
                4,
                t0() + m(80),
                SandboxEvent::SandboxDeleted {
                    csp_status: Some(204),
                },
            ),
            event(
                "b",
                4,
                t0() + m(80),
                SandboxEvent::DeletionFailed {
                    attempts: 5,
                    last_error: "refused".into(),
                    transient: false,
                },
            ),
        ];
        let run = |group_by, track: Option<&str>, prefix: Option<&str>| {
            let mut agg = UsageAggregator::new(query(group_by)).with_filter(UsageFilter {
                track: track.map(str::to_string),
                name_prefix: prefix.map(str::to_string),
            });
            for e in &log {
                // Names come from the registrations in the log: none is asked of the caller.
                agg.observe(e, None);
            }
            agg.observe_refusals(
                t0() + m(5),
                &[
                    RefusalCount {
                        track: Some("aws"),
                        prefix: Some("gcp-lab-"),
                        reason: "no_sandboxes",
                        count: 2,
                    },
                    RefusalCount {
                        track: Some("other"),
                        prefix: None,
                        reason: "no_sandboxes",
                        count: 5,
                    },
                ],
            );
            agg.finish(t0() + m(130))
        };
        for group_by in [UsageGroupBy::Track, UsageGroupBy::Prefix, UsageGroupBy::Day] {
            let aws = run(group_by, Some("aws"), None);
            let t = &aws.totals;
            assert_eq!(
                (t.allocations, t.ended, t.deletions),
                (2, 2, 1),
                "{group_by}"
            );
            assert_eq!(t.quarantines, 0, "{group_by}: b is another track's");
            assert_eq!(t.sandbox_hours, 1.5, "{group_by}: 30 + 60 minutes");
            assert_eq!(t.refusals.get("no_sandboxes"), Some(&2), "{group_by}");
            assert_eq!(aws.track.as_deref(), Some("aws"));

            let named = run(group_by, None, Some("aws-lab-"));
            let t = &named.totals;
            assert_eq!(
                (t.allocations, t.ended, t.held_at_end),
                (2, 1, 1),
                "{group_by}"
            );
            assert_eq!((t.deletions, t.quarantines), (0, 1), "{group_by}");
            assert_eq!(t.refusals.get("no_sandboxes"), None, "{group_by}");

            let both = run(group_by, Some("aws"), Some("aws-lab-"));
            assert_eq!(both.totals.allocations, 1, "{group_by}");
            assert_eq!(both.totals.sandbox_hours, 0.5, "{group_by}");

            let unknown = run(group_by, Some("no-such-track"), None);
            assert!(unknown.groups.is_empty(), "{group_by}");
            assert_eq!(unknown.totals.allocations, 0, "{group_by}");
        }
        let by_prefix = run(UsageGroupBy::Prefix, Some("aws"), None);
        let groups: Vec<_> = by_prefix
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g.allocations))
            .collect();
        // The refusal counts under the prefix the request asked for.
        assert_eq!(
            groups,
            vec![("aws-lab", 1), ("gcp-lab", 1), ("gcp-lab-", 0)]
        );
    }

    /// Past the group cap, further groups are summed in one, and the report says so.
    #[test]
    fn groups_are_capped() {
        let mut agg = UsageAggregator::new(query(UsageGroupBy::Track));
        for i in 0..(MAX_USAGE_GROUPS + 10) {
            agg.observe(
                &allocated(&format!("s{i}"), &format!("t{i}"), t0(), false),
                None,
            );
        }
        assert_eq!(agg.group_count(), MAX_USAGE_GROUPS + 1);
        let report = agg.finish(t0());
        assert!(report.groups_folded);
        let other = report.groups.iter().find(|g| g.group == OTHER_GROUP);
        assert_eq!(other.map(|g| g.allocations), Some(10));
    }

    /// Refusal summaries count per group and reason; without any the note says how to get them.
    #[test]
    fn refusals_from_summaries() {
        let agg = UsageAggregator::new(query(UsageGroupBy::Track));
        assert!(agg
            .finish(t0())
            .refusals_note
            .contains("WRITE_EVENTS_USAGE=true"));
        let mut agg = UsageAggregator::new(query(UsageGroupBy::Track));
        let counts = [
            RefusalCount {
                track: Some("aws"),
                prefix: None,
                reason: "NO_SANDBOX_AVAILABLE",
                count: 3,
            },
            RefusalCount {
                track: Some("aws"),
                prefix: None,
                reason: "QUOTA_EXCEEDED",
                count: 1,
            },
        ];
        agg.observe_refusals(t0() + Duration::minutes(1), &counts);
        agg.observe_refusals(t0() + Duration::minutes(2), &counts[..1]);
        let report = agg.finish(t0());
        assert_eq!(report.refusal_summaries, 2);
        assert_eq!(
            report.groups[0].refusals.get("NO_SANDBOX_AVAILABLE"),
            Some(&6)
        );
        assert_eq!(report.totals.refusals.get("QUOTA_EXCEEDED"), Some(&1));
    }

    /// Empty, reversed and over-long ranges and unknown groupings are refused with a next step.
    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(
            UsageQuery::new(t0(), t0(), UsageGroupBy::Day),
            Err(UsageRangeError::Empty)
        );
        assert_eq!(
            UsageQuery::new(
                t0(),
                t0() + Duration::days(MAX_USAGE_RANGE_DAYS + 1),
                UsageGroupBy::Day
            ),
            Err(UsageRangeError::TooLong)
        );
        assert!("week".parse::<UsageGroupBy>().is_err());
        assert!(parse_usage_time("yesterday").is_err());
        assert_eq!(
            parse_usage_time("2026-03-02"),
            Ok(t0() - Duration::hours(9))
        );
    }

    /// The CSV has the header, one line per group and the totals, with quoted fields.
    #[test]
    fn csv_shape() {
        let mut agg = UsageAggregator::new(query(UsageGroupBy::Track));
        agg.observe(&allocated("a", "a,b", t0(), false), None);
        let csv = usage_csv(&agg.finish(t0() + Duration::hours(1)));
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], USAGE_CSV_HEADER);
        assert_eq!(lines[1], "\"a,b\",1,1,0,1,,,0,0,0,,0,0");
        assert!(lines[2].starts_with("total,1,1,"));
    }
}
