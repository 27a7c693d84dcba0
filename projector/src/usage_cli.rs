//! `broker-audit usage`: the usage report of `GET /v1/admin/usage`, offline, over the store or
//! over an export (ADR 0030). Both paths fold the events through the same
//! [`domain::usage::UsageAggregator`], so the figures agree with the API's.

use std::collections::HashMap;
use std::io::BufRead;

use anyhow::Context;
use chrono::{DateTime, Utc};
use domain::model::events::{BrokerEvent, SandboxEvent};
use domain::model::ids::sandbox_id_of;
use domain::usage::{UsageAggregator, UsageFilter, UsageQuery, UsageReport};
use domain::EventEnvelope;

/// The report over an export (NDJSON envelopes in time order, as `broker-audit export` writes
/// them). Names for grouping by prefix come from the registrations in the export; memory is the
/// aggregator's plus one name per sandbox registered, never the events.
pub fn usage_from_export(
    reader: impl BufRead,
    query: UsageQuery,
    now: DateTime<Utc>,
) -> anyhow::Result<UsageReport> {
    usage_from_export_filtered(reader, query, UsageFilter::default(), now)
}

/// [`usage_from_export`] counting only the allocations `filter` selects, as
/// `GET /v1/admin/usage?track=&prefix=` does (ADR 0034).
pub fn usage_from_export_filtered(
    reader: impl BufRead,
    query: UsageQuery,
    filter: UsageFilter,
    now: DateTime<Utc>,
) -> anyhow::Result<UsageReport> {
    let mut aggregator = UsageAggregator::new(query).with_filter(filter);
    let mut names: HashMap<String, String> = HashMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("reading the export")?;
        if line.trim().is_empty() {
            continue;
        }
        let event: EventEnvelope = serde_json::from_str(&line)
            .with_context(|| format!("line {}: not an event envelope", n + 1))?;
        if event.occurred_at >= query.to {
            break;
        }
        let sandbox_id = sandbox_id_of(&event.stream_id).map(str::to_string);
        if let (Some(id), true) = (&sandbox_id, event.event_type == "SandboxRegistered") {
            if let Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxRegistered { name, .. })) =
                event.decode()
            {
                names.insert(id.clone(), name);
            }
        }
        let name = match (&sandbox_id, aggregator.needs_name(&event)) {
            (Some(id), true) => names.get(id).map(String::as_str),
            _ => None,
        };
        aggregator.observe(&event, name);
    }
    Ok(aggregator.finish(now))
}
