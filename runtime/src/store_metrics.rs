//! `broker_store_requests_total{op,target}`: every request the DynamoDB adapter sent (retries
//! included), so the store cost of an allocation, a job run or an idle minute is a number read
//! off `/metrics` — in every process that serves one (API, `jobs worker`, `projector poll`).
//! The adapter counts; the collector copies the counts into the series whenever the registry is
//! gathered, so no process has to remember to refresh it.

use std::sync::Arc;

use domain::adapters::dynamo::RequestCounts;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::store::Stores;

/// The store-request series of one process.
#[derive(Clone, Debug)]
pub struct StoreRequestMetrics {
    counter: IntCounterVec,
    source: Arc<RequestCounts>,
}

impl StoreRequestMetrics {
    /// Registers the series over the adapter's counts.
    pub fn new(registry: &Registry, source: Arc<RequestCounts>) -> Result<Self, prometheus::Error> {
        let counter = IntCounterVec::new(
            Opts::new(
                "broker_store_requests_total",
                "Requests sent to DynamoDB (every attempt), by API operation and table/index",
            ),
            &["op", "target"],
        )?;
        let metrics = Self { counter, source };
        registry.register(Box::new(metrics.clone()))?;
        Ok(metrics)
    }

    /// Registers the series when `stores` is DynamoDB (`None` for the embedded store).
    pub fn for_stores(
        registry: &Registry,
        stores: &Stores,
    ) -> Result<Option<Self>, prometheus::Error> {
        stores
            .dynamo
            .as_ref()
            .map(|store| Self::new(registry, store.request_counts()))
            .transpose()
    }

    /// Brings the series up to the adapter's counts. Only this function writes the series, so
    /// each one's value is the count last copied.
    pub fn sync(&self) {
        for (op, target, count) in self.source.snapshot() {
            let series = self
                .counter
                .with_label_values(&[op.as_str(), target.as_str()]);
            let copied = series.get();
            if count > copied {
                series.inc_by(count - copied);
            }
        }
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.source.total()
    }
}

impl Collector for StoreRequestMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.sync();
        self.counter.collect()
    }
}
