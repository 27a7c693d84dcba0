//! The projector's Prometheus series. Registered into the registry of whichever process runs the
//! projector (the API in embedded mode, `projector poll`), so `/metrics` shows them there.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use domain::store::ApplyOutcome;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// `broker_projector_unknown_events_total{event_type}`: events a newer release wrote that this
/// projector skipped (ADR 0023), read at scrape time from the process-wide tally in
/// `domain::store::unknown` (every projector path notes them there, the Lambda's included).
struct UnknownEvents {
    template: IntCounterVec,
}

impl UnknownEvents {
    fn opts() -> Opts {
        Opts::new(
            "broker_projector_unknown_events_total",
            "Events of a type, stream kind or schema version this release does not know \
             (written by a newer release), skipped by the projector",
        )
    }

    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            template: IntCounterVec::new(Self::opts(), &["event_type"])?,
        })
    }
}

impl Collector for UnknownEvents {
    fn desc(&self) -> Vec<&Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(counts) = IntCounterVec::new(Self::opts(), &["event_type"]) else {
            return Vec::new();
        };
        for (event_type, n) in domain::store::unknown::counts() {
            counts.with_label_values(&[&event_type]).inc_by(n);
        }
        counts.collect()
    }
}

/// Lag and outcome series; cheap to clone.
#[derive(Clone)]
pub struct ProjectorMetrics {
    /// `broker_projector_lag_seconds`: now − occurred_at per applied event.
    pub lag: Histogram,
    /// `broker_projector_lag_ms`: the lag of the last event applied.
    pub lag_gauge: IntGauge,
    /// `broker_projector_events_total{outcome}`.
    pub events: IntCounterVec,
    /// `broker_projector_repairs_total`: gaps repaired from the event table.
    pub repairs: IntCounter,
    /// `broker_stream_iterator_age_ms`: how far the poller is behind the newest shard record.
    pub iterator_age: IntGauge,
    last_lag_ms: Arc<AtomicI64>,
}

impl std::fmt::Debug for ProjectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectorMetrics")
            .field("lag_ms", &self.last_lag_ms())
            .finish()
    }
}

impl ProjectorMetrics {
    /// Creates the series and registers them in `registry` (already-registered series are an
    /// error from prometheus; a second registration in one registry is a wiring bug).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "broker_projector_lag_seconds",
                "Time from an event's occurred_at to its application to the view",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        let lag_gauge = IntGauge::new(
            "broker_projector_lag_ms",
            "Lag of the most recently applied event, milliseconds",
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "broker_projector_events_total",
                "Events seen by the projector",
            ),
            &["outcome"],
        )?;
        let repairs = IntCounter::new(
            "broker_projector_repairs_total",
            "Gaps repaired by reading missing events from the event table",
        )?;
        let iterator_age = IntGauge::new(
            "broker_stream_iterator_age_ms",
            "How far the Streams poller is behind the newest record of its shards, milliseconds",
        )?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(lag_gauge.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(repairs.clone()))?;
        registry.register(Box::new(iterator_age.clone()))?;
        registry.register(Box::new(UnknownEvents::new()?))?;
        Ok(Self {
            lag,
            lag_gauge,
            events,
            repairs,
            iterator_age,
            last_lag_ms: Arc::new(AtomicI64::new(0)),
        })
    }

    /// Series registered in a private registry (tools and tests that do not export metrics).
    pub fn unregistered() -> Self {
        // A fresh registry holds none of these names, so registration cannot collide.
        match Self::new(&Registry::new()) {
            Ok(metrics) => metrics,
            Err(e) => unreachable!("fresh registry rejected projector metrics: {e}"),
        }
    }

    /// Counts one apply outcome.
    pub fn record(&self, outcome: ApplyOutcome) {
        let label = match outcome {
            ApplyOutcome::Applied => "applied",
            ApplyOutcome::AlreadyApplied => "duplicate",
            ApplyOutcome::Gap { .. } => "gap",
            ApplyOutcome::Ignored => "ignored",
        };
        self.events.with_label_values(&[label]).inc();
    }

    /// Records the lag of one applied event.
    pub fn observe_lag(&self, lag_ms: i64) {
        self.lag.observe(lag_ms as f64 / 1000.0);
        self.lag_gauge.set(lag_ms);
        self.last_lag_ms.store(lag_ms, Ordering::Relaxed);
    }

    /// The lag of the most recently applied event, ms (for `/readyz` and stats).
    pub fn last_lag_ms(&self) -> i64 {
        self.last_lag_ms.load(Ordering::Relaxed)
    }
}
