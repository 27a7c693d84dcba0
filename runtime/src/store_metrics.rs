//! `broker_store_requests_total{op,target}`: every request the DynamoDB adapter sent (retries
//! included), so the store cost of an allocation, a job run or an idle minute is a number read
//! off `/metrics` — in every process that serves one (API, `jobs worker`, `projector poll`).
//! The adapter counts; the collector copies the counts into the series whenever the registry is
//! gathered, so no process has to remember to refresh it.
//!
//! Beside it, `broker_store_consumed_capacity_units_total{op,target,kind}`: the read and write
//! capacity units DynamoDB reported for those requests (the adapter asks for
//! `ReturnConsumedCapacity=TOTAL` on every operation that supports it), so cost per allocation is
//! also a number in the unit DynamoDB bills and throttles.
//!
//! And `broker_store_transaction_cancellations_total{op,target,reason}`: the transactions
//! DynamoDB cancelled, by their first reason (`ConditionalCheckFailed`: a version was taken;
//! `TransactionConflict`: another transaction held an item), so the price of contention — a
//! cancelled transaction is sent again — is read off `/metrics` too.
//!
//! And `broker_store_transaction_items_total{op,target}` with
//! `broker_store_transaction_write_units_total{op,target}`: the items of committed transactions
//! and the write units DynamoDB bills for them (two per started KB of each item, computed from the
//! items' sizes; the base table only). DynamoDB Local reports one flat figure per table for a
//! transaction, whatever its item count, so on the emulator these are the honest write units.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, IntCounterVec, Opts, Registry};
use store_dynamodb::RequestCounts;

use crate::store::Stores;

/// The store-request series of one process.
#[derive(Clone, Debug)]
pub struct StoreRequestMetrics {
    counter: IntCounterVec,
    capacity: CounterVec,
    cancellations: IntCounterVec,
    transaction_items: IntCounterVec,
    transaction_units: IntCounterVec,
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
        let capacity = CounterVec::new(
            Opts::new(
                "broker_store_consumed_capacity_units_total",
                "Capacity units DynamoDB reported as consumed, by API operation, table and kind (read/write)",
            ),
            &["op", "target", "kind"],
        )?;
        let cancellations = IntCounterVec::new(
            Opts::new(
                "broker_store_transaction_cancellations_total",
                "Transactions DynamoDB cancelled, by API operation, table and first reason",
            ),
            &["op", "target", "reason"],
        )?;
        let transaction_items = IntCounterVec::new(
            Opts::new(
                "broker_store_transaction_items_total",
                "Items written by committed DynamoDB transactions, by API operation and table",
            ),
            &["op", "target"],
        )?;
        let transaction_units = IntCounterVec::new(
            Opts::new(
                "broker_store_transaction_write_units_total",
                "Write units DynamoDB bills for the items of committed transactions (2 per started KB of each item, base table)",
            ),
            &["op", "target"],
        )?;
        // The event transactions' two reasons exist from the start (at 0), so "none cancelled"
        // reads as 0, not as a series this build lacks.
        for reason in ["ConditionalCheckFailed", "TransactionConflict"] {
            cancellations.with_label_values(&["TransactWriteItems", "events", reason]);
        }
        let metrics = Self {
            counter,
            capacity,
            cancellations,
            transaction_items,
            transaction_units,
            source,
        };
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
        for (op, table, kind, units) in self.source.capacity_snapshot() {
            let series =
                self.capacity
                    .with_label_values(&[op.as_str(), table.as_str(), kind.as_str()]);
            let copied = series.get();
            if units > copied {
                series.inc_by(units - copied);
            }
        }
        for (op, target, items, units) in self.source.transaction_items_snapshot() {
            for (series, count) in [
                (&self.transaction_items, items),
                (&self.transaction_units, units),
            ] {
                let series = series.with_label_values(&[op.as_str(), target.as_str()]);
                let copied = series.get();
                if count > copied {
                    series.inc_by(count - copied);
                }
            }
        }
        for (op, target, reason, count) in self.source.cancellation_snapshot() {
            let series = self.cancellations.with_label_values(&[
                op.as_str(),
                target.as_str(),
                reason.as_str(),
            ]);
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
        let mut descs = self.counter.desc();
        descs.extend(self.capacity.desc());
        descs.extend(self.cancellations.desc());
        descs.extend(self.transaction_items.desc());
        descs.extend(self.transaction_units.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.sync();
        let mut families = self.counter.collect();
        families.extend(self.capacity.collect());
        families.extend(self.cancellations.collect());
        families.extend(self.transaction_items.collect());
        families.extend(self.transaction_units.collect());
        families
    }
}
