//! The API's Prometheus series. Names of the reference system are kept (`broker_allocate_total`,
//! …) so existing dashboards keep working; new ones cover what it lacked.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Series written by request handlers.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    /// `broker_allocate_total{outcome}`: success, idempotent, no_sandboxes, unknown_prefix, error.
    pub allocate: IntCounterVec,
    /// `broker_allocate_idempotent_hits_total`.
    pub idempotent_hits: IntCounter,
    /// `broker_allocate_conflicts_total`: candidates lost to concurrent allocators.
    pub conflicts: IntCounter,
    /// `broker_deletion_marked_total{outcome}`.
    pub marked: IntCounterVec,
    /// `broker_allocation_latency_seconds{outcome}`.
    pub allocation_latency: HistogramVec,
    /// `broker_request_latency_seconds{method,endpoint,status}`.
    pub request_latency: HistogramVec,
    /// `broker_rate_limited_total`.
    pub rate_limited: IntCounter,
    /// `broker_pool{status}`, refreshed from the stats shards at scrape time.
    pub pool: IntGaugeVec,
    /// `broker_requests_in_flight`: requests being served right now (a shutdown drains it to 0).
    pub in_flight: IntGauge,
    /// `broker_previous_secret_used_total{secret}`: requests authenticated or signed with the
    /// previous value of a rotating secret (`api_token`, `admin_token`, `track_token:<track>`,
    /// `caller_secret:<track>`); 0 for a while means the rotation can end.
    pub previous_secret_used: IntCounterVec,
}

impl ApiMetrics {
    /// Creates and registers the series.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let allocate = IntCounterVec::new(
            Opts::new("broker_allocate_total", "Allocation requests by outcome"),
            &["outcome"],
        )?;
        let idempotent_hits = IntCounter::new(
            "broker_allocate_idempotent_hits_total",
            "Allocations answered by replaying a live claim",
        )?;
        let conflicts = IntCounter::new(
            "broker_allocate_conflicts_total",
            "Candidates lost to concurrent allocators",
        )?;
        let marked = IntCounterVec::new(
            Opts::new(
                "broker_deletion_marked_total",
                "Mark-for-deletion calls by outcome",
            ),
            &["outcome"],
        )?;
        let allocation_latency = HistogramVec::new(
            HistogramOpts::new("broker_allocation_latency_seconds", "Allocation latency").buckets(
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                ],
            ),
            &["outcome"],
        )?;
        let request_latency = HistogramVec::new(
            HistogramOpts::new("broker_request_latency_seconds", "Request latency by route")
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                ]),
            &["method", "endpoint", "status"],
        )?;
        let rate_limited = IntCounter::new(
            "broker_rate_limited_total",
            "Requests refused by the per-caller rate limit",
        )?;
        let pool = IntGaugeVec::new(
            Opts::new("broker_pool", "Sandboxes by status (from the stats shards)"),
            &["status"],
        )?;
        let in_flight = IntGauge::new(
            "broker_requests_in_flight",
            "Requests being served right now",
        )?;
        let previous_secret_used = IntCounterVec::new(
            Opts::new(
                "broker_previous_secret_used_total",
                "Requests that used the previous value of a secret being rotated",
            ),
            &["secret"],
        )?;
        for c in [
            Box::new(allocate.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(previous_secret_used.clone()),
            Box::new(idempotent_hits.clone()),
            Box::new(conflicts.clone()),
            Box::new(marked.clone()),
            Box::new(allocation_latency.clone()),
            Box::new(request_latency.clone()),
            Box::new(rate_limited.clone()),
            Box::new(pool.clone()),
            Box::new(in_flight.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            allocate,
            idempotent_hits,
            conflicts,
            marked,
            allocation_latency,
            request_latency,
            rate_limited,
            pool,
            in_flight,
            previous_secret_used,
        })
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}
