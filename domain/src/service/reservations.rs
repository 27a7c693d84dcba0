//! Reservations on the command side (ADR 0028): creation with its capacity answer, the
//! earmarking pass (earmark, top up, record a shortfall, close at the window's end), cancel, and
//! the capacity figures shared with `GET /v1/capacity`.
//!
//! Every earmark is a `SandboxReserved` appended at the sandbox stream's next version together
//! with `ReservationEarmarked` at the reservation's next version: an allocation that raced it
//! took the same version and one of the two loses, so an earmark never lands on an allocated
//! sandbox and an allocation never ignores an earmark it could have seen.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use thiserror::Error;
use uuid::Uuid;

use super::allocate::sandbox_from_row;
use super::{envelopes, Broker, BrokerError};
use crate::model::events::{BrokerEvent, CommandMeta, OverflowPolicy, ReservationEvent, SyncEvent};
use crate::model::ids::{
    reservation_stream, sandbox_stream, validate_id, RESERVATION_INDEX_STREAM, SYNC_STREAM_ID,
};
use crate::model::lifecycle::SandboxStatus;
use crate::model::reservation::{
    expected_allocations, expected_registrations, CapacityFigures, EarmarkUsage, ListingPoint,
    Reservation, ReservationInvalid, ReservationLimits, ReservationSpec,
};
use crate::model::sandbox::SandboxCommand;
use crate::store::{decode_stored, ListFilter, StoreError};

/// Rows read per page of a view sweep.
const SWEEP_PAGE: usize = 500;

/// Settings of reservations (each a documented setting of the API and the jobs).
#[derive(Debug, Clone, Copy)]
pub struct ReservationSettings {
    /// Bounds and the lead time.
    pub limits: ReservationLimits,
    /// `WRITE_EVENTS_RESERVATIONS`: without it nothing about reservations is written.
    pub write_events: bool,
    /// The overflow policy of a reservation that does not name one
    /// (`RESERVATION_DEFAULT_OVERFLOW`, `open_pool`).
    pub default_overflow: OverflowPolicy,
    /// How far back sync's listings are read for the registration forecast
    /// (`CAPACITY_FORECAST_LOOKBACK_HOURS`, 168).
    pub forecast_lookback: Duration,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        Self {
            limits: ReservationLimits::default(),
            write_events: false,
            default_overflow: OverflowPolicy::OpenPool,
            forecast_lookback: Duration::hours(168),
        }
    }
}

/// Why a reservation command was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ReservationError {
    /// The store or the model refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The request itself is wrong.
    #[error(transparent)]
    Invalid(#[from] ReservationInvalid),
    /// The prefix matches no sandbox the pool has ever registered.
    #[error(
        "no sandbox name starts with prefix {prefix}; check the prefix against GET /v1/admin/pool"
    )]
    UnknownPrefix {
        /// The prefix asked for.
        prefix: String,
    },
    /// `WRITE_EVENTS_RESERVATIONS` is off.
    #[error("reservations are not written by this deployment: set WRITE_EVENTS_RESERVATIONS=true (terraform: write_events_reservations) once every process runs this release")]
    WritesOff,
    /// No such reservation.
    #[error("reservation {reservation_id} not found; list them with GET /v1/admin/reservations")]
    NotFound {
        /// The id asked for.
        reservation_id: String,
    },
    /// The window cannot be honoured.
    #[error("the pool cannot honour {} sandboxes: {} short", .0.count, .0.shortfall_forecast().max(.0.shortfall_now()))]
    InsufficientCapacity(CapacityFigures),
}

/// What one earmarking pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReservationPass {
    /// Sandboxes earmarked.
    pub earmarked: u32,
    /// Reservations closed at their window's end.
    pub ended: u32,
    /// Earmarks lifted (returned to the pool).
    pub returned: u32,
    /// Reservations short after the pass, with how many each lacks.
    pub short: Vec<(String, u32)>,
}

/// A reservation with what its earmarks are now.
#[derive(Debug, Clone, PartialEq)]
pub struct ReservationStatus {
    /// The folded stream.
    pub reservation: Reservation,
    /// Its earmarked sandboxes as the view shows them.
    pub usage: EarmarkUsage,
}

impl Broker {
    /// A reservation folded from its stream (strong read); [`ReservationError::NotFound`] if
    /// it was never created.
    pub async fn load_reservation(
        &self,
        reservation_id: &str,
    ) -> Result<Reservation, ReservationError> {
        let id = validate_id("reservation id", reservation_id).map_err(BrokerError::from)?;
        let events = self
            .events
            .load(&reservation_stream(&id))
            .await
            .map_err(BrokerError::from)?;
        let mut reservation = Reservation::default();
        for envelope in &events {
            if let BrokerEvent::Reservation(event) =
                super::decode_for_command(envelope).map_err(ReservationError::from)?
            {
                reservation.fold(&event, envelope.occurred_at);
            }
        }
        if !reservation.exists() {
            return Err(ReservationError::NotFound { reservation_id: id });
        }
        Ok(reservation)
    }

    /// Every reservation ever created, oldest first.
    pub async fn list_reservations(&self) -> Result<Vec<Reservation>, ReservationError> {
        let index = self
            .events
            .load(RESERVATION_INDEX_STREAM)
            .await
            .map_err(BrokerError::from)?;
        let mut reservations = Vec::with_capacity(index.len());
        for envelope in &index {
            if let Ok(BrokerEvent::Reservation(ReservationEvent::ReservationListed {
                reservation_id,
            })) = decode_stored(envelope)
            {
                reservations.push(self.load_reservation(&reservation_id).await?);
            }
        }
        Ok(reservations)
    }

    /// What the reservation's earmarked sandboxes are now, from their view rows.
    pub async fn earmark_usage(
        &self,
        reservation: &Reservation,
    ) -> Result<EarmarkUsage, BrokerError> {
        let mut usage = EarmarkUsage::default();
        for sandbox_id in &reservation.earmarked {
            let row = self.view.get(sandbox_id).await?;
            let ours = |row: &crate::model::projection::PoolRow| {
                row.earmark
                    .as_ref()
                    .is_some_and(|e| e.reservation_id == reservation.reservation_id)
            };
            match row {
                // A row without the earmark yet is one the projector has not caught up with:
                // the earmark is on the stream (only this reservation's cancel or end lifts it).
                Some(row)
                    if row.status == SandboxStatus::Available
                        && (ours(&row) || (row.earmark.is_none() && !reservation.is_closed())) =>
                {
                    usage.free += 1;
                }
                Some(row)
                    if ours(&row)
                        && row.allocated_at.is_some()
                        && row.track_name.as_deref() == Some(reservation.track.as_str()) =>
                {
                    usage.used += 1;
                }
                // Allocated to another track once the window had ended: neither used nor lost.
                Some(row) if ours(&row) && row.allocated_at.is_some() => {}
                // Lifted (cancel, end), or gone before use: stale, deleted, retired.
                Some(row) if ours(&row) => usage.lost += 1,
                _ => {}
            }
        }
        Ok(usage)
    }

    /// A reservation with its earmarks' usage.
    pub async fn reservation_status(
        &self,
        reservation_id: &str,
    ) -> Result<ReservationStatus, ReservationError> {
        let reservation = self.load_reservation(reservation_id).await?;
        let usage = self.earmark_usage(&reservation).await?;
        Ok(ReservationStatus { reservation, usage })
    }

    /// The capacity figures for `count` students of `track` (none: any track) with `prefix`,
    /// starting at `at` (never before now). `window` is the time the students hold the
    /// sandboxes: other reservations overlapping it are counted against the answer.
    /// `exclude` leaves one reservation out (the one being created).
    pub async fn capacity_figures(
        &self,
        track: Option<&str>,
        prefix: Option<&str>,
        count: u32,
        at: DateTime<Utc>,
        window: (DateTime<Utc>, DateTime<Utc>),
        settings: &ReservationSettings,
    ) -> Result<CapacityFigures, ReservationError> {
        let now = self.clock.now();
        let at = at.max(now);
        let mut figures = CapacityFigures {
            count,
            ..CapacityFigures::default()
        };
        let reservations = self.list_reservations().await?;
        // Earmarks the view may not show yet: the reservation streams already hold them.
        let pending: HashMap<&str, &str> = reservations
            .iter()
            .filter(|r| !r.is_closed() && r.ends_at.is_some_and(|end| now < end))
            .flat_map(|r| r.earmarked.iter().map(|id| (id.as_str(), r.track.as_str())))
            .collect();
        let filter = ListFilter {
            status: Some(SandboxStatus::Available),
            owner: None,
            prefix: prefix.map(str::to_string),
        };
        self.sweep_rows(&filter, |row| {
            if row.held_by.is_some() {
                return;
            }
            let binding = match row.earmark.as_ref() {
                Some(earmark) => earmark.binding_at(now),
                None => pending.get(row.sandbox_id.as_str()).copied(),
            };
            match binding {
                None => figures.available_now += 1,
                Some(owner) if Some(owner) == track => figures.reserved_for_track += 1,
                Some(_) => {}
            }
        })
        .await?;
        for other in reservations {
            if Some(other.track.as_str()) == track
                || !other.overlaps(window.0, window.1)
                || !other.competes_with(prefix)
            {
                continue;
            }
            let usage = self.earmark_usage(&other).await?;
            figures.reserved_for_others += usage.missing(other.count);
        }
        figures.expected_registrations =
            expected_registrations(&self.listings().await?, now, at, settings.forecast_lookback);
        figures.expected_allocations =
            expected_allocations(self.allocation_rate(prefix).await?, now, at);
        Ok(figures)
    }

    /// Allocations per hour lately (of names starting with `prefix`, if given): live
    /// allocations made in the last hour (a lower bound, as one released within the hour is not
    /// counted).
    pub async fn allocation_rate(&self, prefix: Option<&str>) -> Result<f64, BrokerError> {
        let since = self.clock.now() - Duration::hours(1);
        let mut recent = 0u64;
        let filter = ListFilter {
            status: Some(SandboxStatus::Allocated),
            owner: None,
            prefix: prefix.map(str::to_string),
        };
        self.sweep_rows(&filter, |row| {
            if row.allocated_at.is_some_and(|at| at >= since) {
                recent += 1;
            }
        })
        .await?;
        Ok(recent as f64)
    }

    /// Sync's complete listings, oldest first.
    async fn listings(&self) -> Result<Vec<ListingPoint>, BrokerError> {
        let events = self.events.load(SYNC_STREAM_ID).await?;
        Ok(events
            .iter()
            .filter_map(|envelope| match decode_stored(envelope) {
                Ok(BrokerEvent::Sync(SyncEvent::ListingRecorded { listed, .. })) => {
                    Some((envelope.occurred_at, listed))
                }
                _ => None,
            })
            .collect())
    }

    async fn sweep_rows(
        &self,
        filter: &ListFilter,
        mut visit: impl FnMut(&crate::model::projection::PoolRow),
    ) -> Result<(), BrokerError> {
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .view
                .list(filter, SWEEP_PAGE, cursor.as_deref())
                .await?;
            page.rows.iter().for_each(&mut visit);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Creates a reservation if the window can be honoured, and earmarks at once when the lead
    /// time has begun. Refused with [`ReservationError::InsufficientCapacity`] when even the
    /// forecast falls short (and, inside the lead time, when the sandboxes free now do).
    pub async fn create_reservation(
        &self,
        spec: &ReservationSpec,
        settings: &ReservationSettings,
        meta: &CommandMeta,
    ) -> Result<(ReservationStatus, CapacityFigures), ReservationError> {
        if !settings.write_events {
            return Err(ReservationError::WritesOff);
        }
        let now = self.clock.now();
        spec.validate(&settings.limits, now)?;
        let track = validate_id("track", &spec.track).map_err(BrokerError::from)?;
        let prefix = match spec.prefix.as_deref().map(str::trim) {
            Some(p) if !p.is_empty() => Some(validate_id("prefix", p).map_err(BrokerError::from)?),
            _ => None,
        };
        if let Some(prefix) = &prefix {
            let any = ListFilter {
                status: None,
                owner: None,
                prefix: Some(prefix.clone()),
            };
            if self
                .view
                .list(&any, 1, None)
                .await
                .map_err(BrokerError::from)?
                .rows
                .is_empty()
            {
                return Err(ReservationError::UnknownPrefix {
                    prefix: prefix.clone(),
                });
            }
        }
        let earmark_from = spec.earmark_from(settings.limits.lead_time, now);
        // A new reservation needs sandboxes of its own: the track's earmarks for its other
        // reservations are theirs, so they count as any other reservation's (no track here).
        let figures = self
            .capacity_figures(
                None,
                prefix.as_deref(),
                spec.count,
                earmark_from,
                (spec.starts_at, spec.ends_at),
                settings,
            )
            .await?;
        // Inside the lead time the sandboxes are earmarked now: only what is free now counts.
        let short = if earmark_from <= now {
            figures.shortfall_now()
        } else {
            figures.shortfall_forecast()
        };
        if short > 0 {
            return Err(ReservationError::InsufficientCapacity(figures));
        }
        let reservation_id = Uuid::now_v7().simple().to_string();
        let created = ReservationEvent::ReservationCreated {
            reservation_id: reservation_id.clone(),
            track,
            count: spec.count,
            prefix,
            starts_at: spec.starts_at,
            ends_at: spec.ends_at,
            overflow: spec.overflow,
            earmark_from,
            note: spec.note.clone(),
        };
        let listed = ReservationEvent::ReservationListed {
            reservation_id: reservation_id.clone(),
        };
        let mut attempts = 0;
        loop {
            let index_version = self
                .events
                .load_latest(RESERVATION_INDEX_STREAM)
                .await
                .map_err(BrokerError::from)?
                .map_or(0, |e| e.version);
            let mut batch = envelopes(
                &reservation_stream(&reservation_id),
                0,
                std::slice::from_ref(&created),
                meta,
                now,
            );
            batch.extend(envelopes(
                RESERVATION_INDEX_STREAM,
                index_version,
                std::slice::from_ref(&listed),
                meta,
                now,
            ));
            match self.events.append(batch).await {
                Ok(()) => break,
                Err(StoreError::VersionConflict { .. })
                    if attempts < self.config.command_retries =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(BrokerError::from(e).into()),
            }
        }
        let mut reservation = self.load_reservation(&reservation_id).await?;
        if earmark_from <= now {
            self.earmark(&mut reservation, meta).await?;
        }
        let usage = self.earmark_usage(&reservation).await?;
        Ok((ReservationStatus { reservation, usage }, figures))
    }

    /// Cancels a reservation: its unused earmarks return to the pool at once.
    pub async fn cancel_reservation(
        &self,
        reservation_id: &str,
        settings: &ReservationSettings,
        meta: &CommandMeta,
    ) -> Result<ReservationStatus, ReservationError> {
        if !settings.write_events {
            return Err(ReservationError::WritesOff);
        }
        let mut reservation = self.load_reservation(reservation_id).await?;
        if !reservation.is_closed() {
            let returned = self.lift_earmarks(&reservation, meta).await?;
            self.append_reservation(
                &mut reservation,
                ReservationEvent::ReservationCancelled { returned },
                meta,
            )
            .await?;
        }
        self.reservation_status(reservation_id).await
    }

    /// One earmarking pass over every open reservation: closes those whose window has ended
    /// (unused earmarks return to the pool), earmarks and tops up those whose lead time has
    /// begun, and records a changed shortfall. What the reservation job runs.
    pub async fn run_reservations(
        &self,
        settings: &ReservationSettings,
        meta: &CommandMeta,
    ) -> Result<ReservationPass, ReservationError> {
        let mut pass = ReservationPass::default();
        if !settings.write_events {
            return Ok(pass);
        }
        let now = self.clock.now();
        for mut reservation in self.list_reservations().await? {
            if reservation.is_closed() {
                continue;
            }
            if reservation.ends_at.is_some_and(|end| now >= end) {
                let usage = self.earmark_usage(&reservation).await?;
                let returned = self.lift_earmarks(&reservation, meta).await?;
                self.append_reservation(
                    &mut reservation,
                    ReservationEvent::ReservationEnded {
                        returned,
                        used: usage.used,
                    },
                    meta,
                )
                .await?;
                pass.ended += 1;
                pass.returned += returned;
            } else if reservation.earmark_from.is_some_and(|from| now >= from) {
                let (earmarked, missing) = self.earmark(&mut reservation, meta).await?;
                pass.earmarked += earmarked;
                if missing > 0 {
                    pass.short
                        .push((reservation.reservation_id.clone(), missing));
                }
            }
        }
        Ok(pass)
    }

    /// Earmarks free sandboxes until the reservation holds its count (or the pool has none
    /// left), and records the shortfall when it changed. Returns (earmarked now, still missing).
    async fn earmark(
        &self,
        reservation: &mut Reservation,
        meta: &CommandMeta,
    ) -> Result<(u32, u32), ReservationError> {
        let Some(ends_at) = reservation.ends_at else {
            return Ok((0, 0));
        };
        let usage = self.earmark_usage(reservation).await?;
        let mut missing = usage.missing(reservation.count);
        let mut earmarked = 0u32;
        if missing > 0 {
            let filter = ListFilter {
                status: Some(SandboxStatus::Available),
                owner: None,
                prefix: reservation.prefix.clone(),
            };
            let mut cursor: Option<String> = None;
            'pages: loop {
                let page = self
                    .view
                    .list(&filter, SWEEP_PAGE, cursor.as_deref())
                    .await
                    .map_err(BrokerError::from)?;
                for row in &page.rows {
                    if missing == 0 {
                        break 'pages;
                    }
                    let now = self.clock.now();
                    if row.held_by.is_some()
                        || row
                            .earmark
                            .as_ref()
                            .is_some_and(|e| e.binding_at(now).is_some())
                    {
                        continue;
                    }
                    let state = sandbox_from_row(row);
                    let Ok(events) = state.decide(
                        SandboxCommand::Reserve {
                            reservation_id: reservation.reservation_id.clone(),
                            track: reservation.track.clone(),
                            ends_at,
                        },
                        now,
                    ) else {
                        continue;
                    };
                    let noted = ReservationEvent::ReservationEarmarked {
                        sandbox_ids: vec![row.sandbox_id.clone()],
                    };
                    let mut batch = envelopes(
                        &sandbox_stream(&row.sandbox_id),
                        row.version,
                        &events,
                        meta,
                        now,
                    );
                    batch.extend(envelopes(
                        &reservation_stream(&reservation.reservation_id),
                        reservation.version,
                        std::slice::from_ref(&noted),
                        meta,
                        now,
                    ));
                    match self.events.append(batch).await {
                        Ok(()) => {
                            reservation.fold(&noted, now);
                            earmarked += 1;
                            missing -= 1;
                        }
                        // The sandbox moved on (allocated, or the view lags): try the next one.
                        Err(StoreError::VersionConflict { stream_id })
                            if stream_id.starts_with("sandbox#") => {}
                        // Another pass wrote to the reservation: read it again and go on.
                        Err(StoreError::VersionConflict { .. }) => {
                            *reservation =
                                self.load_reservation(&reservation.reservation_id).await?;
                        }
                        Err(e) => return Err(BrokerError::from(e).into()),
                    }
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        if missing != reservation.shortfall {
            if missing > 0 {
                tracing::warn!(
                    target: "reservations",
                    reservation = %reservation.reservation_id,
                    track = %reservation.track,
                    missing,
                    "reservation is short of sandboxes"
                );
            }
            let usage = self.earmark_usage(reservation).await?;
            self.append_reservation(
                reservation,
                ReservationEvent::ReservationShortfallRecorded {
                    missing,
                    earmarked: usage.free + usage.used,
                },
                meta,
            )
            .await?;
        }
        Ok((earmarked, missing))
    }

    /// Lifts every unused earmark of the reservation; returns how many were lifted.
    async fn lift_earmarks(
        &self,
        reservation: &Reservation,
        meta: &CommandMeta,
    ) -> Result<u32, ReservationError> {
        let mut returned = 0;
        for sandbox_id in &reservation.earmarked {
            let mut attempts = 0;
            loop {
                let loaded = self.load_sandbox(sandbox_id).await?;
                let now = self.clock.now();
                let events = loaded
                    .sandbox
                    .decide(
                        SandboxCommand::Unreserve {
                            reservation_id: reservation.reservation_id.clone(),
                        },
                        now,
                    )
                    .map_err(BrokerError::from)?;
                if events.is_empty() {
                    break;
                }
                let batch = envelopes(
                    &sandbox_stream(sandbox_id),
                    loaded.sandbox.version,
                    &events,
                    meta,
                    now,
                );
                match self.events.append(batch).await {
                    Ok(()) => {
                        returned += 1;
                        break;
                    }
                    Err(StoreError::VersionConflict { .. })
                        if attempts < self.config.command_retries =>
                    {
                        attempts += 1;
                    }
                    Err(e) => return Err(BrokerError::from(e).into()),
                }
            }
        }
        Ok(returned)
    }

    /// Appends one event to the reservation's stream, reading it again after a conflict.
    async fn append_reservation(
        &self,
        reservation: &mut Reservation,
        event: ReservationEvent,
        meta: &CommandMeta,
    ) -> Result<(), ReservationError> {
        let mut attempts = 0;
        loop {
            let now = self.clock.now();
            let batch = envelopes(
                &reservation_stream(&reservation.reservation_id),
                reservation.version,
                std::slice::from_ref(&event),
                meta,
                now,
            );
            match self.events.append(batch).await {
                Ok(()) => {
                    reservation.fold(&event, now);
                    return Ok(());
                }
                Err(StoreError::VersionConflict { .. })
                    if attempts < self.config.command_retries =>
                {
                    attempts += 1;
                    *reservation = self.load_reservation(&reservation.reservation_id).await?;
                }
                Err(e) => return Err(BrokerError::from(e).into()),
            }
        }
    }
}
