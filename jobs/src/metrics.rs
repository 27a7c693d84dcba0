//! The jobs' Prometheus series. They are registered into the registry the caller passes in — the
//! API process exposes that same registry on `/metrics`, so job runs triggered there (admin
//! endpoints, embedded mode) are visible, unlike the reference whose worker metrics were never
//! exported (§12 P5). Reference names are kept where they exist.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Buckets of the per-job duration histograms, seconds (a sync of a large pool takes minutes).
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
];

/// Series of the CSP client; cheap to clone.
#[derive(Clone, Debug)]
pub struct CspMetrics {
    /// `broker_csp_requests_total{op,outcome}`: op = list | delete; outcome = success,
    /// client_error, server_error, rate_limited, timeout, transport_error, malformed, circuit_open.
    pub requests: IntCounterVec,
    /// `broker_csp_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGauge,
}

impl CspMetrics {
    /// Creates the series and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("broker_csp_requests_total", "Requests to the CSP API"),
            &["op", "outcome"],
        )?;
        let circuit_state = IntGauge::new(
            "broker_csp_circuit_state",
            "CSP circuit breaker state: 0 closed, 1 open, 2 half-open",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(circuit_state.clone()))?;
        Ok(Self {
            requests,
            circuit_state,
        })
    }
}

/// Series of the jobs (and, inside, the CSP client's); cheap to clone.
#[derive(Clone, Debug)]
pub struct JobsMetrics {
    /// The CSP client's series.
    pub csp: CspMetrics,
    /// `broker_job_runs_total{job,outcome}`: every job, outcome = success | error.
    pub runs: IntCounterVec,
    /// `broker_job_duration_seconds{job}`.
    pub duration: HistogramVec,
    /// `broker_job_items_total{job,result}`: what happened to each item a job looked at.
    pub items: IntCounterVec,
    /// `broker_sync_total{outcome}` (reference).
    pub sync_total: IntCounterVec,
    /// `broker_sync_sandboxes_synced_total` (reference).
    pub sync_synced: IntCounter,
    /// `broker_sync_sandboxes_stale_total` (reference).
    pub sync_stale: IntCounter,
    /// `broker_sync_duration_seconds` (reference).
    pub sync_duration: Histogram,
    /// `broker_cleanup_total{outcome}` (reference).
    pub cleanup_total: IntCounterVec,
    /// `broker_cleanup_deleted_total` (reference).
    pub cleanup_deleted: IntCounter,
    /// `broker_cleanup_failed_total` (reference): failed CSP delete attempts, quarantines included.
    pub cleanup_failed: IntCounter,
    /// `broker_cleanup_duration_seconds` (reference).
    pub cleanup_duration: Histogram,
    /// `broker_expiry_total{outcome}` (reference).
    pub expiry_total: IntCounterVec,
    /// `broker_expiry_orphaned_total` (reference): allocations ended by auto-expiry.
    pub expiry_orphaned: IntCounter,
    /// `broker_reservation_shortfall_sandboxes`: sandboxes the open reservations lack after the
    /// reservation job's last run (alert on > 0 before a window opens).
    pub reservation_shortfall: IntGauge,
    /// Heartbeats and the heartbeat reclaim.
    pub heartbeat: crate::heartbeat::HeartbeatMetrics,
}

impl JobsMetrics {
    /// Creates every series and registers it in `registry`. Registering twice into one registry
    /// is an error from prometheus (a wiring bug: one `JobsMetrics` per process).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let csp = CspMetrics::new(registry)?;
        let runs = IntCounterVec::new(
            Opts::new("broker_job_runs_total", "Job runs by job and outcome"),
            &["job", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("broker_job_duration_seconds", "Job run duration")
                .buckets(DURATION_BUCKETS.to_vec()),
            &["job"],
        )?;
        let items = IntCounterVec::new(
            Opts::new("broker_job_items_total", "Items handled by jobs, by result"),
            &["job", "result"],
        )?;
        let sync_total = IntCounterVec::new(
            Opts::new("broker_sync_total", "Sync runs by outcome"),
            &["outcome"],
        )?;
        let sync_synced = IntCounter::new(
            "broker_sync_sandboxes_synced_total",
            "CSP sandboxes confirmed in the pool by sync (registered, restored or still available)",
        )?;
        let sync_stale = IntCounter::new(
            "broker_sync_sandboxes_stale_total",
            "Sandboxes marked stale by sync",
        )?;
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new("broker_sync_duration_seconds", "Sync run duration")
                .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let cleanup_total = IntCounterVec::new(
            Opts::new("broker_cleanup_total", "Cleanup runs by outcome"),
            &["outcome"],
        )?;
        let cleanup_deleted = IntCounter::new(
            "broker_cleanup_deleted_total",
            "Sandboxes whose CSP account cleanup deleted",
        )?;
        let cleanup_failed = IntCounter::new(
            "broker_cleanup_failed_total",
            "Failed CSP delete attempts recorded by cleanup",
        )?;
        let cleanup_duration = Histogram::with_opts(
            HistogramOpts::new("broker_cleanup_duration_seconds", "Cleanup run duration")
                .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let expiry_total = IntCounterVec::new(
            Opts::new("broker_expiry_total", "Auto-expiry runs by outcome"),
            &["outcome"],
        )?;
        let expiry_orphaned = IntCounter::new(
            "broker_expiry_orphaned_total",
            "Allocations ended by auto-expiry",
        )?;
        let reservation_shortfall = IntGauge::new(
            "broker_reservation_shortfall_sandboxes",
            "Sandboxes the open reservations lack after the reservation job's last run",
        )?;
        for collector in [
            Box::new(runs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(items.clone()),
            Box::new(sync_total.clone()),
            Box::new(sync_synced.clone()),
            Box::new(sync_stale.clone()),
            Box::new(sync_duration.clone()),
            Box::new(cleanup_total.clone()),
            Box::new(cleanup_deleted.clone()),
            Box::new(cleanup_failed.clone()),
            Box::new(cleanup_duration.clone()),
            Box::new(expiry_total.clone()),
            Box::new(expiry_orphaned.clone()),
            Box::new(reservation_shortfall.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            csp,
            runs,
            duration,
            items,
            sync_total,
            sync_synced,
            sync_stale,
            sync_duration,
            cleanup_total,
            cleanup_deleted,
            cleanup_failed,
            cleanup_duration,
            expiry_total,
            expiry_orphaned,
            reservation_shortfall,
            heartbeat: crate::heartbeat::HeartbeatMetrics::new(registry)?,
        })
    }

    /// Series in a private registry (tests and tools that export nothing).
    pub fn unregistered() -> Self {
        // A fresh registry holds none of these names, so registration cannot collide; the
        // constant names and label sets are valid, so creation cannot fail either.
        match Self::new(&Registry::new()) {
            Ok(metrics) => metrics,
            Err(e) => unreachable!("fresh registry rejected the jobs metrics: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reference series name is exported, and a second registration is refused.
    #[test]
    fn reference_names_are_registered() -> Result<(), prometheus::Error> {
        let registry = Registry::new();
        let m = JobsMetrics::new(&registry)?;
        m.sync_total.with_label_values(&["success"]).inc();
        m.cleanup_total.with_label_values(&["success"]).inc();
        m.expiry_total.with_label_values(&["success"]).inc();
        m.csp.requests.with_label_values(&["list", "success"]).inc();
        m.runs.with_label_values(&["sync", "success"]).inc();
        m.duration.with_label_values(&["sync"]).observe(0.1);
        m.items.with_label_values(&["sync", "registered"]).inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for name in [
            "broker_sync_total",
            "broker_sync_sandboxes_synced_total",
            "broker_sync_sandboxes_stale_total",
            "broker_sync_duration_seconds",
            "broker_cleanup_total",
            "broker_cleanup_deleted_total",
            "broker_cleanup_failed_total",
            "broker_cleanup_duration_seconds",
            "broker_expiry_total",
            "broker_expiry_orphaned_total",
            "broker_csp_circuit_state",
            "broker_csp_requests_total",
            "broker_job_runs_total",
            "broker_job_duration_seconds",
            "broker_job_items_total",
        ] {
            assert!(names.iter().any(|n| n == name), "missing {name}");
        }
        assert!(JobsMetrics::new(&registry).is_err());
        Ok(())
    }
}
