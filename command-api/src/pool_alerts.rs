//! Low-water alerts per name prefix group (ADR 0018): the projected per-prefix counters compared
//! with `POOL_LOW_WATER`, exported as Prometheus gauges and logged for the CloudWatch alarm.
//!
//! A watch loop checks every `POOL_WATCH_INTERVAL_SEC` even when nobody scrapes `/metrics`, and
//! logs one `pool below low water` line per low group per check: the log metric filter then sees
//! a data point in every period the group stays low, so the alarm holds while the pool is dry
//! and clears by itself once it is refilled. Entering and leaving the low state are logged
//! once each, for people reading the logs.
//!
//! Drains (ADR 0017) are watched the same way: `broker_pool_drained{prefix}` is 1 per drain in
//! force (`prefix="*"` for the whole pool), and each check logs one `pool drained` line per
//! drain, so an alarm can tell a drain that outlived its maintenance window.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use domain::model::pool_control::DrainState;
use domain::model::pool_prefix::{LowGroup, LowWater, PrefixStats};
use domain::{Broker, PoolView, SandboxStatus};
use prometheus::{IntGaugeVec, Opts, Registry};

/// Thresholds, the per-prefix gauges and which groups were low at the last check.
#[derive(Debug)]
pub struct PoolAlerts {
    low_water: LowWater,
    /// `broker_pool_prefix{prefix,status}`.
    by_prefix: IntGaugeVec,
    /// `broker_pool_low_water{prefix}`: 1 while the group is below its threshold, else 0.
    low: IntGaugeVec,
    /// `broker_pool_low_water_threshold{prefix}`.
    threshold: IntGaugeVec,
    /// `broker_pool_drained{prefix}`: 1 per drain in force.
    drained: IntGaugeVec,
    was_low: Mutex<BTreeSet<String>>,
}

/// The `prefix` label of a whole-pool drain.
pub const WHOLE_POOL: &str = "*";

impl PoolAlerts {
    /// Creates and registers the gauges.
    pub fn new(low_water: LowWater, registry: &Registry) -> Result<Self, prometheus::Error> {
        let by_prefix = IntGaugeVec::new(
            Opts::new(
                "broker_pool_prefix",
                "Sandboxes per name prefix group and status",
            ),
            &["prefix", "status"],
        )?;
        let low = IntGaugeVec::new(
            Opts::new(
                "broker_pool_low_water",
                "1 while the prefix group's available sandboxes are below POOL_LOW_WATER",
            ),
            &["prefix"],
        )?;
        let threshold = IntGaugeVec::new(
            Opts::new(
                "broker_pool_low_water_threshold",
                "The POOL_LOW_WATER threshold of a prefix group",
            ),
            &["prefix"],
        )?;
        registry.register(Box::new(by_prefix.clone()))?;
        registry.register(Box::new(low.clone()))?;
        let drained = IntGaugeVec::new(
            Opts::new(
                "broker_pool_drained",
                "1 while allocation is drained for the prefix (\"*\": the whole pool)",
            ),
            &["prefix"],
        )?;
        registry.register(Box::new(threshold.clone()))?;
        registry.register(Box::new(drained.clone()))?;
        Ok(Self {
            low_water,
            drained,
            by_prefix,
            low,
            threshold,
            was_low: Mutex::new(BTreeSet::new()),
        })
    }

    /// The configured thresholds.
    pub fn low_water(&self) -> &LowWater {
        &self.low_water
    }

    /// Updates the gauges from `stats` and returns the groups below their threshold.
    pub fn observe(&self, stats: &PrefixStats) -> Vec<LowGroup> {
        for (prefix, counts) in stats {
            for status in SandboxStatus::ALL {
                self.by_prefix
                    .with_label_values(&[prefix.as_str(), status.as_str()])
                    .set(counts.get(status));
            }
        }
        let groups = self.low_water.low_groups(stats);
        let now_low: BTreeSet<String> = groups.iter().map(|g| g.prefix.clone()).collect();
        let mut was_low = self.was_low.lock().unwrap_or_else(PoisonError::into_inner);
        for prefix in was_low.difference(&now_low) {
            self.low.with_label_values(&[prefix.as_str()]).set(0);
        }
        for group in &groups {
            self.low.with_label_values(&[group.prefix.as_str()]).set(1);
            self.threshold
                .with_label_values(&[group.prefix.as_str()])
                .set(group.threshold);
        }
        *was_low = now_low;
        groups
    }

    /// One check: read the counters, update the gauges, log every low group (and each change).
    pub async fn check(&self, view: &dyn PoolView) -> Vec<LowGroup> {
        let before: BTreeSet<String> = self
            .was_low
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let stats = match view.stats_by_prefix().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(target: "pool", error = %e, "prefix counters unreadable");
                return Vec::new();
            }
        };
        let groups = self.observe(&stats);
        for group in &groups {
            if !before.contains(&group.prefix) {
                tracing::warn!(target: "pool", prefix = %group.prefix, available = group.available, threshold = group.threshold, "pool went below low water");
            }
            tracing::warn!(target: "pool", prefix = %group.prefix, available = group.available, threshold = group.threshold, "pool below low water");
        }
        for prefix in before
            .iter()
            .filter(|p| !groups.iter().any(|g| &g.prefix == *p))
        {
            tracing::info!(target: "pool", prefix = %prefix, "pool back above low water");
        }
        groups
    }
}

impl PoolAlerts {
    /// Sets `broker_pool_drained` to the drains in force: a resumed prefix's series goes away.
    pub fn observe_drains(&self, drain: &DrainState) {
        self.drained.reset();
        for entry in &drain.drained {
            let prefix = entry.prefix.as_deref().unwrap_or(WHOLE_POOL);
            self.drained.with_label_values(&[prefix]).set(1);
        }
    }

    /// Reads the drains in force, updates the gauge and logs one line per drain.
    pub async fn check_drains(&self, broker: &Broker) {
        let drain = match broker.drain_state().await {
            Ok(drain) => drain,
            Err(e) => {
                tracing::warn!(target: "pool", error = %e, "drain state unreadable");
                return;
            }
        };
        self.observe_drains(&drain);
        for entry in &drain.drained {
            let prefix = entry.prefix.as_deref().unwrap_or(WHOLE_POOL);
            tracing::info!(target: "pool", prefix = %prefix, since = %entry.since.to_rfc3339(), "pool drained");
        }
    }
}

/// Checks the low-water thresholds and the drains every `interval` until `shutdown` resolves.
pub async fn watch(
    alerts: Arc<PoolAlerts>,
    broker: Arc<Broker>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let view = broker.view().clone();
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(interval.max(Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {
                if !alerts.low_water().is_empty() {
                    alerts.check(view.as_ref()).await;
                }
                alerts.check_drains(&broker).await;
            }
        }
    }
}
