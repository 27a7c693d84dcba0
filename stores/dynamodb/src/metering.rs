//! SDK interceptors that meter what the store costs, registered once on each client instead of
//! at every call site (so a new call cannot forget them):
//!
//! * [`CapacityMeter`] on the DynamoDB client asks every operation that supports it for
//!   `ReturnConsumedCapacity=TOTAL` (before serialization, only where the caller did not choose
//!   a level itself) and adds what the response reports to
//!   `broker_store_consumed_capacity_units_total{op,target,kind}`.
//! * [`StreamRequestMeter`] on the DynamoDB Streams client counts every attempt
//!   (`DescribeStream`, `GetShardIterator`, `GetRecords`, `ListStreams`) in the same
//!   `broker_store_requests_total{op,target="stream"}` as the adapter's own requests. The Streams
//!   client keeps the SDK's retries, so the count is taken per attempt, where the SDK sends.
//!
//! [`transaction_units`] prices the items of a committed transaction the way DynamoDB bills them
//! (two write units per started KB of each item), because DynamoDB Local reports one flat figure
//! per table for a whole transaction, whatever the number of items it wrote.

use std::sync::Arc;

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextMut,
    BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::operation::batch_get_item::{BatchGetItemInput, BatchGetItemOutput};
use aws_sdk_dynamodb::operation::batch_write_item::{BatchWriteItemInput, BatchWriteItemOutput};
use aws_sdk_dynamodb::operation::delete_item::{DeleteItemInput, DeleteItemOutput};
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::{PutItemInput, PutItemOutput};
use aws_sdk_dynamodb::operation::query::{QueryInput, QueryOutput};
use aws_sdk_dynamodb::operation::scan::{ScanInput, ScanOutput};
use aws_sdk_dynamodb::operation::transact_get_items::{
    TransactGetItemsInput, TransactGetItemsOutput,
};
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsInput, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::operation::update_item::{UpdateItemInput, UpdateItemOutput};
use aws_sdk_dynamodb::types::{
    AttributeValue, ConsumedCapacity, ReturnConsumedCapacity, TransactWriteItem,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;

use super::items::Item;
use super::retry::{CapacityKind, RequestCounts};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An attribute value's size as DynamoDB counts it (strings and binaries by their bytes, numbers
/// by about half their digits, one byte for booleans and nulls, three bytes of overhead and one
/// per element for lists and maps).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(v) => v.len(),
        AttributeValue::N(v) => v.len().div_ceil(2) + 1,
        AttributeValue::B(v) => v.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::L(v) => 3 + v.iter().map(|e| value_size(e) + 1).sum::<usize>(),
        AttributeValue::M(v) => {
            3 + v
                .iter()
                .map(|(k, e)| k.len() + value_size(e) + 1)
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// An item's size as DynamoDB counts it: attribute names plus values.
pub(crate) fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

/// The items a transaction puts and the write units DynamoDB bills for them when it commits:
/// two per started KB of each item (the base table; index writes are not included).
pub(crate) fn transaction_units(items: &[TransactWriteItem]) -> (u64, u64) {
    items
        .iter()
        .filter_map(|i| i.put())
        .fold((0, 0), |(count, units), put| {
            let kb = item_size(put.item()).div_ceil(1024).max(1) as u64;
            (count + 1, units + 2 * kb)
        })
}

/// Asks DynamoDB for the consumed capacity of every request and adds it to the store's counts.
#[derive(Debug, Clone)]
pub struct CapacityMeter {
    counts: Arc<RequestCounts>,
    /// `{table_prefix}-`, stripped from table names so the label is `events`, `pool`, …
    table_prefix: String,
}

impl CapacityMeter {
    /// A meter adding to `counts`, naming tables without `{table_prefix}-`.
    pub fn new(counts: Arc<RequestCounts>, table_prefix: &str) -> Self {
        Self {
            counts,
            table_prefix: format!("{table_prefix}-"),
        }
    }

    fn add(&self, op: &'static str, kind: CapacityKind, consumed: &ConsumedCapacity) {
        let table = consumed.table_name().unwrap_or("?");
        let table = table.strip_prefix(&self.table_prefix).unwrap_or(table);
        // With TOTAL DynamoDB fills only `CapacityUnits`; the split fields appear with INDEXES.
        let units = consumed.capacity_units().unwrap_or_else(|| match kind {
            CapacityKind::Read => consumed.read_capacity_units().unwrap_or_default(),
            CapacityKind::Write => consumed.write_capacity_units().unwrap_or_default(),
        });
        self.counts.add_capacity(op, table, kind, units);
    }
}

/// Sets `TOTAL` on the input when the caller left the level unset.
fn ask_total(level: &mut Option<ReturnConsumedCapacity>) {
    if level.is_none() {
        *level = Some(ReturnConsumedCapacity::Total);
    }
}

impl Intercept for CapacityMeter {
    fn name(&self) -> &'static str {
        "CapacityMeter"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = context.input_mut();
        if let Some(i) = input.downcast_mut::<GetItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<PutItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<UpdateItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<DeleteItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<QueryInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<ScanInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<BatchGetItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<BatchWriteItemInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<TransactGetItemsInput>() {
            ask_total(&mut i.return_consumed_capacity);
        } else if let Some(i) = input.downcast_mut::<TransactWriteItemsInput>() {
            ask_total(&mut i.return_consumed_capacity);
        }
        // Table management (CreateTable, DescribeTable, …) has no capacity to report.
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // A failed request (a cancelled transaction, a failed condition) reports no capacity
        // in its error, although DynamoDB bills it: the series is a lower bound in that case.
        let Ok(output) = context.output_or_error() else {
            return Ok(());
        };
        use CapacityKind::{Read, Write};
        if let Some(o) = output.downcast_ref::<GetItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("GetItem", Read, c));
        } else if let Some(o) = output.downcast_ref::<PutItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("PutItem", Write, c));
        } else if let Some(o) = output.downcast_ref::<UpdateItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("UpdateItem", Write, c));
        } else if let Some(o) = output.downcast_ref::<DeleteItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("DeleteItem", Write, c));
        } else if let Some(o) = output.downcast_ref::<QueryOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("Query", Read, c));
        } else if let Some(o) = output.downcast_ref::<ScanOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("Scan", Read, c));
        } else if let Some(o) = output.downcast_ref::<BatchGetItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("BatchGetItem", Read, c));
        } else if let Some(o) = output.downcast_ref::<BatchWriteItemOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("BatchWriteItem", Write, c));
        } else if let Some(o) = output.downcast_ref::<TransactGetItemsOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("TransactGetItems", Read, c));
        } else if let Some(o) = output.downcast_ref::<TransactWriteItemsOutput>() {
            o.consumed_capacity()
                .iter()
                .for_each(|c| self.add("TransactWriteItems", Write, c));
        }
        Ok(())
    }
}

/// Counts every request attempt of the DynamoDB Streams client in the store's request counts.
#[derive(Debug, Clone)]
pub struct StreamRequestMeter {
    counts: Arc<RequestCounts>,
}

impl StreamRequestMeter {
    /// A meter adding to `counts` (the store's, so one `/metrics` series holds both clients).
    pub fn new(counts: Arc<RequestCounts>) -> Self {
        Self { counts }
    }
}

/// The counter name of a Streams operation (static: the counts are keyed by `&'static str`).
fn stream_call(operation: &str) -> &'static str {
    match operation {
        "DescribeStream" => "DescribeStream(stream)",
        "GetShardIterator" => "GetShardIterator(stream)",
        "GetRecords" => "GetRecords(stream)",
        "ListStreams" => "ListStreams(stream)",
        _ => "Other(stream)",
    }
}

impl Intercept for StreamRequestMeter {
    fn name(&self) -> &'static str {
        "StreamRequestMeter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map(Metadata::name).unwrap_or("");
        self.counts.count(stream_call(operation));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reported units land under the table's short name and the operation's kind; TOTAL's
    /// `CapacityUnits` is preferred, the split fields are the fallback.
    #[test]
    fn capacity_is_added_by_table_and_kind() {
        let counts = Arc::new(RequestCounts::default());
        let meter = CapacityMeter::new(Arc::clone(&counts), "broker");
        let total = ConsumedCapacity::builder()
            .table_name("broker-pool")
            .capacity_units(2.0)
            .build();
        let split = ConsumedCapacity::builder()
            .table_name("broker-events")
            .write_capacity_units(3.0)
            .build();
        meter.add("TransactWriteItems", CapacityKind::Write, &total);
        meter.add("TransactWriteItems", CapacityKind::Write, &split);
        meter.add("GetItem", CapacityKind::Read, &total);
        assert_eq!(counts.capacity_total(CapacityKind::Write), 5.0);
        assert_eq!(counts.capacity_total(CapacityKind::Read), 2.0);
        let snapshot = counts.capacity_snapshot();
        assert!(snapshot.contains(&(
            "TransactWriteItems".to_string(),
            "events".to_string(),
            CapacityKind::Write,
            3.0
        )));
    }

    /// An item is priced by its started KB, two units each; names count, and so do values.
    #[test]
    fn transactional_items_are_priced_per_started_kb() {
        use aws_sdk_dynamodb::types::Put;
        let put = |bytes: usize| {
            let item = Item::from([
                ("k".to_string(), AttributeValue::S("id".into())),
                ("p".to_string(), AttributeValue::S("x".repeat(bytes))),
            ]);
            let put = Put::builder().table_name("t").set_item(Some(item)).build();
            TransactWriteItem::builder()
                .put(put.unwrap_or_else(|e| panic!("{e}")))
                .build()
        };
        assert_eq!(transaction_units(&[put(10)]), (1, 2));
        assert_eq!(
            transaction_units(&[put(10), put(1_500), put(3_000)]),
            (3, 2 + 4 + 6)
        );
        let item = Item::from([("n".to_string(), AttributeValue::N("12345".into()))]);
        assert_eq!(item_size(&item), 1 + 4);
    }

    /// Streams operations get their own static counter names, unknown ones one shared name.
    #[test]
    fn stream_calls_are_named() {
        assert_eq!(stream_call("GetRecords"), "GetRecords(stream)");
        assert_eq!(stream_call("Whatever"), "Other(stream)");
    }
}
