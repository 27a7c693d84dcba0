//! The reservation job (ADR 0028): earmarks each reservation's sandboxes a lead time before its
//! window opens, tops up earmarks lost before use, records and alerts a shortfall, and closes
//! reservations at their window's end (unused earmarks return to the pool). Its settings
//! ([`ReservationArgs`]) are shared with the API, which checks the same flag and limits when a
//! reservation is created.

use std::time::{Duration, Instant};

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, ValueEnum};
use serde::Serialize;

use domain::model::events::OverflowPolicy;
use domain::model::reservation::ReservationLimits;
use domain::service::{ReservationError, ReservationSettings};

use crate::error::JobError;
use crate::runner::Jobs;
use crate::summary::{ItemCounts, JobKind, RunStatus};

/// The overflow policy of a reservation that names none, as a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OverflowSetting {
    /// The track's students are served from the open pool after the reservation.
    OpenPool,
    /// Only from the reservation during its window.
    ReservationOnly,
}

impl From<OverflowSetting> for OverflowPolicy {
    fn from(setting: OverflowSetting) -> Self {
        match setting {
            OverflowSetting::OpenPool => OverflowPolicy::OpenPool,
            OverflowSetting::ReservationOnly => OverflowPolicy::ReservationOnly,
        }
    }
}

/// Reservation settings (flattened into the jobs' and the API's settings).
#[derive(Debug, Clone, Args)]
pub struct ReservationArgs {
    /// Write reservation events (reservations, earmarks). Off by default: turn it on only once
    /// every process (API, jobs, projector) runs a release that reads them (docs/upgrades.md).
    #[arg(long, env = "WRITE_EVENTS_RESERVATIONS", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub write_events_reservations: bool,
    /// Minutes before a reservation's window opens that its sandboxes are earmarked (a
    /// reservation created later than that is earmarked at once).
    #[arg(long, env = "RESERVATION_LEAD_TIME_MINUTES", default_value_t = 60, value_parser = clap::value_parser!(u32).range(0..=10_080))]
    pub reservation_lead_time_minutes: u32,
    /// What a reservation's track does once its earmarks are used up, when the reservation does
    /// not say: `open-pool` or `reservation-only`.
    #[arg(long, env = "RESERVATION_DEFAULT_OVERFLOW", value_enum, default_value_t = OverflowSetting::OpenPool)]
    pub reservation_default_overflow: OverflowSetting,
    /// Most sandboxes one reservation may hold.
    #[arg(long, env = "RESERVATION_MAX_COUNT", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub reservation_max_count: u32,
    /// Longest reservation window, hours.
    #[arg(long, env = "RESERVATION_MAX_WINDOW_HOURS", default_value_t = 72, value_parser = clap::value_parser!(u32).range(1..=720))]
    pub reservation_max_window_hours: u32,
    /// Furthest ahead a reservation's window may start, days.
    #[arg(long, env = "RESERVATION_MAX_AHEAD_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=365))]
    pub reservation_max_ahead_days: u32,
    /// How far back sync's listings are read to forecast registrations, hours.
    #[arg(long, env = "CAPACITY_FORECAST_LOOKBACK_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u32).range(1..=2_160))]
    pub capacity_forecast_lookback_hours: u32,
    /// Seconds between runs of the reservation job in the worker (and the embedded API).
    #[arg(long, env = "RESERVATION_INTERVAL_SEC", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub reservation_interval_sec: u64,
    /// Hours: a prefix group whose open pool runs dry sooner than this at the current
    /// allocation rate is flagged (`broker_capacity_low_water`, log line `pool runs dry soon`).
    #[arg(long, env = "CAPACITY_LOW_WATER_HOURS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=720))]
    pub capacity_low_water_hours: u32,
}

impl Default for ReservationArgs {
    fn default() -> Self {
        Self {
            write_events_reservations: false,
            reservation_lead_time_minutes: 60,
            reservation_default_overflow: OverflowSetting::OpenPool,
            reservation_max_count: 5_000,
            reservation_max_window_hours: 72,
            reservation_max_ahead_days: 90,
            capacity_forecast_lookback_hours: 168,
            reservation_interval_sec: 60,
            capacity_low_water_hours: 2,
        }
    }
}

impl ReservationArgs {
    /// The domain's settings.
    pub fn settings(&self) -> ReservationSettings {
        ReservationSettings {
            limits: ReservationLimits {
                max_count: self.reservation_max_count,
                max_window: chrono::Duration::hours(i64::from(self.reservation_max_window_hours)),
                max_ahead: chrono::Duration::days(i64::from(self.reservation_max_ahead_days)),
                lead_time: chrono::Duration::minutes(i64::from(self.reservation_lead_time_minutes)),
            },
            write_events: self.write_events_reservations,
            default_overflow: self.reservation_default_overflow.into(),
            forecast_lookback: chrono::Duration::hours(i64::from(
                self.capacity_forecast_lookback_hours,
            )),
        }
    }

    /// The run-dry horizon of the capacity low-water alert.
    pub fn low_water(&self) -> chrono::Duration {
        chrono::Duration::hours(i64::from(self.capacity_low_water_hours))
    }

    /// The worker's interval between runs.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.reservation_interval_sec)
    }
}

/// What one run of the reservation job did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReservationsSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Sandboxes earmarked.
    pub earmarked: u64,
    /// Reservations closed at their window's end.
    pub ended: u64,
    /// Earmarks lifted (returned to the pool).
    pub returned: u64,
    /// Reservations short of sandboxes after the run.
    pub short: u64,
    /// Sandboxes those reservations lack together.
    pub missing: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

impl ItemCounts for ReservationsSummary {
    fn item_counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("earmarked", self.earmarked),
            ("returned", self.returned),
            ("ended", self.ended),
        ]
    }
}

impl Jobs {
    /// One pass of the reservation job (nothing at all while `WRITE_EVENTS_RESERVATIONS` is
    /// off). A shortfall is logged at `warn` per reservation and counted in
    /// `broker_reservation_shortfall`.
    pub async fn reservations(&self) -> Result<ReservationsSummary, JobError> {
        let started = Instant::now();
        let meta = self.meta(JobKind::Reservations);
        let settings = self.config.reservations.settings();
        let result = self.broker.run_reservations(&settings, &meta).await;
        let (summary, error) = match result {
            Ok(pass) => {
                let missing: u64 = pass.short.iter().map(|(_, m)| u64::from(*m)).sum();
                self.metrics.reservation_shortfall.set(missing as i64);
                (
                    ReservationsSummary {
                        status: RunStatus::Completed,
                        earmarked: pass.earmarked.into(),
                        ended: pass.ended.into(),
                        returned: pass.returned.into(),
                        short: pass.short.len() as u64,
                        missing,
                        duration_ms: started.elapsed().as_millis() as u64,
                    },
                    None,
                )
            }
            Err(e) => (
                ReservationsSummary {
                    status: RunStatus::Failed,
                    duration_ms: started.elapsed().as_millis() as u64,
                    ..ReservationsSummary::default()
                },
                Some(job_error(e)),
            ),
        };
        self.report(
            JobKind::Reservations,
            started.elapsed(),
            &summary,
            error.as_ref(),
        );
        match error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

fn job_error(e: ReservationError) -> JobError {
    match e {
        ReservationError::Broker(e) => e.into(),
        other => JobError::InvalidRequest(other.to_string()),
    }
}
