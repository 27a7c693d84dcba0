//! `broker_store_requests_total{op,target}`: every request the DynamoDB adapter sent (retries
//! included), so the store cost of an allocation, a job run or an idle minute is a number read
//! off `/metrics`. The adapter counts; this module copies the counts into Prometheus at scrape.

use std::sync::Arc;

use domain::adapters::dynamo::RequestCounts;
use prometheus::{IntCounterVec, Opts, Registry};

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
        registry.register(Box::new(counter.clone()))?;
        Ok(Self { counter, source })
    }

    /// Brings the series up to the adapter's counts (called before each scrape). Only this
    /// function writes the series, so each one's value is the count last copied.
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
