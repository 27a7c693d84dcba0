//! Reservation and capacity gauges (ADR 0028), refreshed by a watch loop every
//! `POOL_WATCH_INTERVAL_SEC` like the low-water alerts:
//!
//! * `broker_reservation_sandboxes{reservation,track,state}` — per reservation not yet closed,
//!   `state` = `reserved` (its count), `free`, `used`, `lost`, `shortfall`;
//! * `broker_capacity_runs_dry_seconds{prefix}` — per name prefix group, when its open pool
//!   (available, earmarked for nobody) is empty at the last hour's allocation rate with no new
//!   registrations (absent while nothing is being allocated);
//! * `broker_capacity_low_water{prefix}` — 1 while that forecast is within
//!   `CAPACITY_LOW_WATER_HOURS`; each check logs one `pool runs dry soon` line per such group,
//!   so a log metric filter can alarm on it as on `pool below low water`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use domain::model::reservation::runs_dry_at;
use domain::service::ReservationSettings;
use domain::Broker;
use prometheus::{IntGaugeVec, Opts, Registry};

/// The gauges.
#[derive(Debug, Clone)]
pub struct ReservationGauges {
    sandboxes: IntGaugeVec,
    runs_dry: IntGaugeVec,
    low: IntGaugeVec,
}

impl ReservationGauges {
    /// Creates and registers the gauges.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let sandboxes = IntGaugeVec::new(
            Opts::new(
                "broker_reservation_sandboxes",
                "Sandboxes of each reservation not yet closed, by state (reserved, free, used, lost, shortfall)",
            ),
            &["reservation", "track", "state"],
        )?;
        let runs_dry = IntGaugeVec::new(
            Opts::new(
                "broker_capacity_runs_dry_seconds",
                "Seconds until the prefix group's open pool is empty at the last hour's allocation rate, without new registrations",
            ),
            &["prefix"],
        )?;
        let low = IntGaugeVec::new(
            Opts::new(
                "broker_capacity_low_water",
                "1 while the prefix group's open pool runs dry within CAPACITY_LOW_WATER_HOURS",
            ),
            &["prefix"],
        )?;
        registry.register(Box::new(sandboxes.clone()))?;
        registry.register(Box::new(runs_dry.clone()))?;
        registry.register(Box::new(low.clone()))?;
        Ok(Self {
            sandboxes,
            runs_dry,
            low,
        })
    }

    /// One check: every reservation not yet closed, then every prefix group's run-dry time.
    /// Returns the groups that run dry within `low_water`.
    pub async fn check(
        &self,
        broker: &Broker,
        settings: &ReservationSettings,
        low_water: chrono::Duration,
    ) -> Vec<String> {
        let now = broker.clock().now();
        match broker.list_reservations().await {
            Ok(reservations) => {
                self.sandboxes.reset();
                for reservation in reservations.iter().filter(|r| !r.is_closed()) {
                    if reservation.ends_at.is_some_and(|end| now >= end) {
                        continue;
                    }
                    let Ok(usage) = broker.earmark_usage(reservation).await else {
                        continue;
                    };
                    let labels = |state: &'static str| {
                        [
                            reservation.reservation_id.clone(),
                            reservation.track.clone(),
                            state.to_string(),
                        ]
                    };
                    let earmarking = reservation.earmark_from.is_some_and(|from| now >= from);
                    let shortfall = if earmarking {
                        usage.missing(reservation.count)
                    } else {
                        0
                    };
                    for (state, value) in [
                        ("reserved", reservation.count),
                        ("free", usage.free),
                        ("used", usage.used),
                        ("lost", usage.lost),
                        ("shortfall", shortfall),
                    ] {
                        let labels = labels(state);
                        self.sandboxes
                            .with_label_values(&[&labels[0], &labels[1], &labels[2]])
                            .set(i64::from(value));
                    }
                }
            }
            Err(e) => tracing::warn!(target: "reservations", error = %e, "reservations unreadable"),
        }
        let groups: BTreeSet<String> = match broker.view().stats_by_prefix().await {
            Ok(stats) => stats.keys().cloned().collect(),
            Err(e) => {
                tracing::warn!(target: "reservations", error = %e, "prefix counters unreadable");
                return Vec::new();
            }
        };
        let mut low = Vec::new();
        self.runs_dry.reset();
        self.low.reset();
        for group in groups {
            let prefix = (!group.is_empty()).then_some(group.as_str());
            let figures = match broker
                .capacity_figures(None, prefix, 1, now, (now, now), settings)
                .await
            {
                Ok(figures) => figures,
                Err(e) => {
                    tracing::warn!(target: "reservations", error = %e, "capacity unreadable");
                    continue;
                }
            };
            let rate = broker.allocation_rate(prefix).await.unwrap_or(0.0);
            let Some(dry) = runs_dry_at(u64::from(figures.available_now), rate, now) else {
                self.low.with_label_values(&[group.as_str()]).set(0);
                continue;
            };
            let seconds = (dry - now).num_seconds().max(0);
            self.runs_dry
                .with_label_values(&[group.as_str()])
                .set(seconds);
            let soon = dry - now <= low_water;
            self.low
                .with_label_values(&[group.as_str()])
                .set(i64::from(soon));
            if soon {
                tracing::warn!(target: "pool", prefix = %group, available = figures.available_now, allocations_per_hour = rate, runs_dry_in_s = seconds, "pool runs dry soon");
                low.push(group);
            }
        }
        low
    }
}

/// Refreshes the gauges every `interval` until `shutdown` resolves.
pub async fn watch(
    gauges: ReservationGauges,
    broker: Arc<Broker>,
    settings: ReservationSettings,
    low_water: chrono::Duration,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(interval.max(Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {
                gauges.check(&broker, &settings, low_water).await;
            }
        }
    }
}
