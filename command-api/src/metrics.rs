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
    /// `broker_pool{status}`, refreshed from the stats shards by a scrape, at most once per
    /// `METRICS_CACHE_MS` ([`PoolGaugeCache`]).
    pub pool: IntGaugeVec,
    /// `broker_requests_in_flight`: requests being served right now (a shutdown drains it to 0).
    pub in_flight: IntGauge,
    /// `broker_previous_secret_used_total{secret}`: requests authenticated or signed with the
    /// previous value of a rotating secret (`api_token`, `admin_token`, `track_token:<track>`,
    /// `caller_secret:<track>`); 0 for a while means the rotation can end.
    pub previous_secret_used: IntCounterVec,
    /// `broker_connections_refused_total{reason}`: connections closed on arrival
    /// (`per_address`: over `MAX_CONNECTIONS_PER_ADDRESS`), or answered and closed because a
    /// request head was too large (`head_too_large`, `uri_too_long`; see `head_guard`).
    pub connections_refused: IntCounterVec,
    /// `broker_connections_timed_out_total{phase}`: connections the server closed because the
    /// client was too slow or silent (`first_request`, `headers`, `idle`).
    pub connections_timed_out: IntCounterVec,
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
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "broker_connections_refused_total",
                "Connections closed on arrival, by reason",
            ),
            &["reason"],
        )?;
        let connections_timed_out = IntCounterVec::new(
            Opts::new(
                "broker_connections_timed_out_total",
                "Connections closed because the client was too slow or silent, by phase",
            ),
            &["phase"],
        )?;
        for c in [
            Box::new(allocate.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(previous_secret_used.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_timed_out.clone()),
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
            connections_refused,
            connections_timed_out,
        })
    }
}

/// When the pool gauges of `/metrics` were last read from the store: a scrape within
/// `METRICS_CACHE_MS` of that serves them as they are, so scrapes cost the store nothing however
/// often they come (a scraper, or anyone who can reach `/metrics`, cannot turn them into store
/// load). Time comes from the broker's clock.
#[derive(Debug)]
pub struct PoolGaugeCache {
    ttl: chrono::Duration,
    refreshed: tokio::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>,
}

impl PoolGaugeCache {
    /// A cache whose gauges are reused for `ttl` (zero: read on every scrape).
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
            refreshed: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `refresh` when the gauges are older than the TTL at `now`. Scrapes that arrive
    /// while one refreshes wait for it and then find the gauges fresh: one refresh, not one per
    /// scrape. A refresh that failed counts as done, so a failing store is not asked again by
    /// every scrape either.
    pub async fn refresh_if_stale<F>(&self, now: chrono::DateTime<chrono::Utc>, refresh: F)
    where
        F: std::future::Future<Output = ()>,
    {
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| now - at < self.ttl) {
            return;
        }
        refresh.await;
        *refreshed = Some(now);
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

/// `broker_allocate_groups_total`, `broker_allocate_group_members_total` and
/// `broker_allocate_group_redecided_total`: what group commit of allocations did (ADR 0025),
/// copied from the broker's counts whenever the registry is gathered. Registered only when the
/// event store groups allocations (DynamoDB).
#[derive(Clone, Debug)]
pub struct GroupCommitMetrics {
    groups: IntCounter,
    members: IntCounter,
    redecided: IntCounter,
    source: std::sync::Arc<domain::service::GroupCommitStats>,
}

impl GroupCommitMetrics {
    /// Registers the series over the broker's counts.
    pub fn new(
        registry: &Registry,
        source: std::sync::Arc<domain::service::GroupCommitStats>,
    ) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            groups: IntCounter::new(
                "broker_allocate_groups_total",
                "Grouped writes of concurrent allocations sent to the store (one transaction each)",
            )?,
            members: IntCounter::new(
                "broker_allocate_group_members_total",
                "Allocations sent in grouped writes (one decided again counts again)",
            )?,
            redecided: IntCounter::new(
                "broker_allocate_group_redecided_total",
                "Allocations decided again because a group member they continued failed or their quota stream moved",
            )?,
            source,
        };
        registry.register(Box::new(metrics.clone()))?;
        Ok(metrics)
    }

    fn sync(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        for (series, count) in [
            (&self.groups, self.source.groups.load(Relaxed)),
            (&self.members, self.source.members.load(Relaxed)),
            (&self.redecided, self.source.redecided.load(Relaxed)),
        ] {
            let copied = series.get();
            if count > copied {
                series.inc_by(count - copied);
            }
        }
    }
}

impl prometheus::core::Collector for GroupCommitMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.groups.desc();
        descs.extend(self.members.desc());
        descs.extend(self.redecided.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.sync();
        let mut families = self.groups.collect();
        families.extend(self.members.collect());
        families.extend(self.redecided.collect());
        families
    }
}
