//! Item shapes of the DynamoDB tables: events and pool rows to and from attribute maps, the
//! DynamoDB-JSON stream images the projector receives, and the opaque pagination cursors built
//! from `LastEvaluatedKey`s.
//!
//! Every time in a pool row is stored as epoch milliseconds (`N`), so range conditions on the
//! indexes are numeric; optional attributes are omitted rather than stored empty, which keeps the
//! `by-owner` and `by-due` indexes sparse.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use domain::model::events::{format_time, EventEnvelope};
use domain::model::lifecycle::SandboxStatus;
use domain::model::projection::PoolRow;
use domain::store::{decode_cursor, encode_cursor, StoreError};

/// One DynamoDB item (or key): attribute name → value.
pub type Item = HashMap<String, AttributeValue>;

/// Attribute names of the event table.
pub(crate) mod event_attr {
    pub const STREAM_ID: &str = "stream_id";
    pub const VERSION: &str = "version";
    pub const EVENT_TYPE: &str = "event_type";
    pub const SCHEMA_VERSION: &str = "schema_version";
    pub const EVENT_ID: &str = "event_id";
    pub const OCCURRED_AT: &str = "occurred_at";
    pub const ACTOR: &str = "actor";
    pub const REQUEST_ID: &str = "request_id";
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const PAYLOAD: &str = "payload";
    pub const TIME_BUCKET: &str = "time_bucket";
    pub const OCCURRED_KEY: &str = "occurred_key";
}

/// Attribute names of the pool table (and its indexes).
pub(crate) mod pool_attr {
    pub const SANDBOX_ID: &str = "sandbox_id";
    /// The row's status; with index write sharding `{status}#{k}` (hash key of
    /// `by-status-pick` and `by-status-name`).
    pub const STATUS: &str = "status";
    pub const NAME: &str = "name";
    pub const EXTERNAL_ID: &str = "external_id";
    pub const SFDC_ACCOUNT_ID: &str = "sfdc_account_id";
    pub const OWNER: &str = "owner";
    pub const TRACK_NAME: &str = "track_name";
    pub const ALLOCATED_AT: &str = "allocated_at";
    pub const EXPIRES_AT: &str = "expires_at";
    pub const DELETION_REQUESTED_AT: &str = "deletion_requested_at";
    pub const ATTEMPTS: &str = "attempts";
    pub const LAST_ERROR: &str = "last_error";
    pub const DUE_AT: &str = "due_at";
    /// `by-due` hash key: `{status}#{shard}` (only rows with a `due_at`).
    pub const DUE_SHARD: &str = "due_shard";
    /// `by-due` range key: `{due_at ms, 13 digits}#{sandbox_id}`, unique and in due order.
    pub const DUE_KEY: &str = "due_key";
    pub const PICK: &str = "pick";
    pub const VERSION: &str = "version";
    pub const UPDATED_AT: &str = "updated_at";
    /// The unknown event type that holds the row out of allocation (ADR 0023); absent when not
    /// held, so candidate queries filter on its absence.
    pub const HELD_BY: &str = "held_by";
    /// A reservation's earmark on the row, as JSON (ADR 0028).
    pub const EARMARK: &str = "earmark";
}

/// A string attribute.
pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// A number attribute.
pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {detail}"))
}

fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        Some(_) => Err(corrupt(name, "expected a string (S)")),
        None => Err(corrupt(name, "missing")),
    }
}

fn get_opt_s(item: &Item, name: &str) -> Result<Option<String>, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
        Some(AttributeValue::Null(_)) | None => Ok(None),
        Some(_) => Err(corrupt(name, "expected a string (S)")),
    }
}

fn get_opt_n<T: std::str::FromStr>(item: &Item, name: &str) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|e| corrupt(name, e)),
        Some(AttributeValue::Null(_)) | None => Ok(None),
        Some(_) => Err(corrupt(name, "expected a number (N)")),
    }
}

fn get_n<T: std::str::FromStr>(item: &Item, name: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    get_opt_n(item, name)?.ok_or_else(|| corrupt(name, "missing"))
}

fn millis(at: &DateTime<Utc>) -> AttributeValue {
    n(at.timestamp_millis())
}

fn time_from_millis(name: &str, ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| corrupt(name, "time out of range"))
}

fn get_opt_time(item: &Item, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    get_opt_n::<i64>(item, name)?
        .map(|ms| time_from_millis(name, ms))
        .transpose()
}

/// The hour an event occurred in, `YYYY-MM-DDTHH` (UTC): the `by-time` index's hash key when the
/// index is not sharded, and the prefix of every shard's key when it is.
pub fn time_bucket(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H").to_string()
}

/// The index shard a stream (or sandbox) writes to, out of `shards`: a hash of its id, so every
/// write of one stream goes to the same shard and the shards fill evenly.
pub fn index_shard(id: &str, shards: u32) -> u32 {
    domain::store::stats_shard(id, shards)
}

/// The `by-time` hash key of an event of `stream_id` in `hour` (a [`time_bucket`]): the hour
/// itself with one shard, `{hour}#{k}` with more. Write sharding spreads an hour's events over
/// `shards` partitions, so no single partition takes every write of the hour (ADR 0014).
pub fn time_bucket_key(hour: &str, stream_id: &str, shards: u32) -> String {
    shard_key(hour, stream_id, shards)
}

/// A write-sharded partition key: `base` itself with one shard (so an unsharded deployment
/// writes exactly the keys it always wrote), `{base}#{k}` with more, `k` = [`index_shard`] of
/// `id`. Shared by `by-time` (base: the hour) and the status-keyed pool indexes (base: the
/// status), so both spread and migrate the same way (ADR 0014).
pub fn shard_key(base: &str, id: &str, shards: u32) -> String {
    if shards <= 1 {
        base.to_string()
    } else {
        format!("{base}#{}", index_shard(id, shards))
    }
}

/// Every partition key a reader must query for `base` under `shards` write shards: each
/// `{base}#{k}`, then the bare `base`, where items written before sharding was switched on
/// stay until they are rewritten (with one shard, only the bare key).
pub(crate) fn shard_partitions(base: &str, shards: u32) -> Vec<String> {
    let mut partitions: Vec<String> = (0..shards)
        .filter(|_| shards > 1)
        .map(|k| format!("{base}#{k}"))
        .collect();
    partitions.push(base.to_string());
    partitions
}

/// The `status` attribute of a pool row: the hash key of `by-status-pick` and
/// `by-status-name`, write-sharded as `{status}#{k}` with more than one shard (see
/// [`shard_key`]), so allocations do not all remove entries from the one `available` key.
pub fn status_shard_key(status: SandboxStatus, sandbox_id: &str, shards: u32) -> String {
    shard_key(status.as_str(), sandbox_id, shards)
}

/// The status a stored `status` attribute names: the part before a shard suffix, if any.
fn status_of_key(key: &str) -> &str {
    key.split_once('#').map_or(key, |(status, _)| status)
}

/// The `by-due` hash key of a row of `status`: `{status}#{k}`, `k` from the sandbox id.
pub fn due_shard_key(status: SandboxStatus, sandbox_id: &str, shards: u32) -> String {
    format!("{}#{}", status.as_str(), index_shard(sandbox_id, shards))
}

/// The `by-due` range key: the due time in ms, zero-padded to 13 digits so the text order is
/// the time order, then the sandbox id, so keys are unique and ties have one order everywhere.
pub fn due_sort_key(due_at_ms: i64, sandbox_id: &str) -> String {
    format!("{due_at_ms:013}#{sandbox_id}")
}

/// The event item written for `envelope`: the envelope's fields, the payload as JSON text, and
/// the `by-time` index keys (`time_bucket`, `occurred_key` = `{occurred_at}#{event_id}`, unique
/// and time-ordered within the hour).
pub fn envelope_to_item(envelope: &EventEnvelope) -> Item {
    envelope_to_sharded_item(envelope, 1)
}

/// [`envelope_to_item`] with the `by-time` key spread over `shards` (see [`time_bucket_key`]).
pub fn envelope_to_sharded_item(envelope: &EventEnvelope, shards: u32) -> Item {
    use event_attr::*;
    let occurred_at = format_time(&envelope.occurred_at);
    let mut item = Item::with_capacity(12);
    item.insert(STREAM_ID.into(), s(&envelope.stream_id));
    item.insert(VERSION.into(), n(envelope.version));
    item.insert(EVENT_TYPE.into(), s(&envelope.event_type));
    item.insert(SCHEMA_VERSION.into(), n(envelope.schema_version));
    item.insert(EVENT_ID.into(), s(envelope.event_id.to_string()));
    item.insert(
        OCCURRED_KEY.into(),
        s(format!("{occurred_at}#{}", envelope.event_id)),
    );
    item.insert(
        TIME_BUCKET.into(),
        s(time_bucket_key(
            &time_bucket(&envelope.occurred_at),
            &envelope.stream_id,
            shards,
        )),
    );
    item.insert(OCCURRED_AT.into(), s(occurred_at));
    item.insert(ACTOR.into(), s(&envelope.actor));
    if let Some(request_id) = &envelope.request_id {
        item.insert(REQUEST_ID.into(), s(request_id));
    }
    if let Some(correlation_id) = &envelope.correlation_id {
        item.insert(CORRELATION_ID.into(), s(correlation_id));
    }
    item.insert(PAYLOAD.into(), s(envelope.payload.to_string()));
    item
}

/// Reads an event item (from the table, or a stream image converted to attribute values) back
/// into its envelope; a missing or mistyped attribute is [`StoreError::Corrupt`].
pub fn envelope_from_item(item: &Item) -> Result<EventEnvelope, StoreError> {
    use event_attr::*;
    let event_id = get_s(item, EVENT_ID)?;
    let occurred_at = get_s(item, OCCURRED_AT)?;
    let payload = get_s(item, PAYLOAD)?;
    Ok(EventEnvelope {
        stream_id: get_s(item, STREAM_ID)?.to_string(),
        version: get_n(item, VERSION)?,
        event_type: get_s(item, EVENT_TYPE)?.to_string(),
        schema_version: get_n(item, SCHEMA_VERSION)?,
        event_id: uuid::Uuid::parse_str(event_id).map_err(|e| corrupt(EVENT_ID, e))?,
        occurred_at: DateTime::parse_from_rfc3339(occurred_at)
            .map_err(|e| corrupt(OCCURRED_AT, e))?
            .with_timezone(&Utc),
        actor: get_s(item, ACTOR)?.to_string(),
        request_id: get_opt_s(item, REQUEST_ID)?,
        correlation_id: get_opt_s(item, CORRELATION_ID)?,
        payload: serde_json::from_str(payload).map_err(|e| corrupt(PAYLOAD, e))?,
    })
}

/// Converts one attribute of a DynamoDB JSON image (`{"S": "…"}`, `{"N": "3"}`, …) to an
/// attribute value. Only the scalar types the broker's items use are accepted.
fn attribute_from_json(
    name: &str,
    value: &serde_json::Value,
) -> Result<AttributeValue, StoreError> {
    let typed = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
        .ok_or_else(|| corrupt(name, "expected a one-key DynamoDB JSON value"))?;
    match typed {
        (t, serde_json::Value::String(v)) if t == "S" => Ok(AttributeValue::S(v.clone())),
        (t, serde_json::Value::String(v)) if t == "N" => Ok(AttributeValue::N(v.clone())),
        // Some encoders write numbers unquoted; accept them as the same number.
        (t, serde_json::Value::Number(v)) if t == "N" => Ok(AttributeValue::N(v.to_string())),
        (t, serde_json::Value::Bool(v)) if t == "BOOL" => Ok(AttributeValue::Bool(*v)),
        (t, serde_json::Value::Bool(v)) if t == "NULL" => Ok(AttributeValue::Null(*v)),
        (t, _) => Err(corrupt(
            name,
            format!("unsupported DynamoDB JSON type '{t}'"),
        )),
    }
}

/// Reads an event from a DynamoDB JSON image — the `NewImage` of a DynamoDB Streams record or of
/// a Lambda stream event, e.g. `{"stream_id":{"S":"sandbox#1"},"version":{"N":"3"},…}`.
pub fn envelope_from_json_image(image: &serde_json::Value) -> Result<EventEnvelope, StoreError> {
    let map = image
        .as_object()
        .ok_or_else(|| corrupt("image", "expected a JSON object"))?;
    let item = map
        .iter()
        .map(|(name, value)| Ok((name.clone(), attribute_from_json(name, value)?)))
        .collect::<Result<Item, StoreError>>()?;
    envelope_from_item(&item)
}

/// The pool item of a row. Optional strings and times are omitted when `None` (sparse indexes);
/// an empty `name` is omitted too, because DynamoDB refuses an empty string as an index key (such
/// a row is then absent from `by-status-name`, and reads back with an empty name).
pub fn row_to_item(row: &PoolRow) -> Item {
    row_to_sharded_item(row, 1)
}

/// [`row_to_item`] with the index keys spread over `shards`: the `status` attribute (hash key of
/// `by-status-pick` and `by-status-name`, see [`status_shard_key`]) and the `by-due` keys
/// (`due_shard`, `due_key`) of a row that has a `due_at` (see [`due_shard_key`]).
pub fn row_to_sharded_item(row: &PoolRow, shards: u32) -> Item {
    use pool_attr::*;
    let mut item = Item::with_capacity(16);
    item.insert(SANDBOX_ID.into(), s(&row.sandbox_id));
    item.insert(
        STATUS.into(),
        s(status_shard_key(row.status, &row.sandbox_id, shards)),
    );
    if !row.name.is_empty() {
        item.insert(NAME.into(), s(&row.name));
    }
    item.insert(EXTERNAL_ID.into(), s(&row.external_id));
    let optional_strings = [
        (SFDC_ACCOUNT_ID, &row.sfdc_account_id),
        (OWNER, &row.owner),
        (TRACK_NAME, &row.track_name),
        (LAST_ERROR, &row.last_error),
        (HELD_BY, &row.held_by),
    ];
    for (name, value) in optional_strings {
        if let Some(value) = value {
            item.insert(name.into(), s(value));
        }
    }
    let optional_times = [
        (ALLOCATED_AT, &row.allocated_at),
        (EXPIRES_AT, &row.expires_at),
        (DELETION_REQUESTED_AT, &row.deletion_requested_at),
        (DUE_AT, &row.due_at),
    ];
    for (name, value) in optional_times {
        if let Some(at) = value {
            item.insert(name.into(), millis(at));
        }
    }
    if let Some(due) = &row.due_at {
        item.insert(
            DUE_SHARD.into(),
            s(due_shard_key(row.status, &row.sandbox_id, shards)),
        );
        item.insert(
            DUE_KEY.into(),
            s(due_sort_key(due.timestamp_millis(), &row.sandbox_id)),
        );
    }
    item.insert(ATTEMPTS.into(), n(row.attempts));
    item.insert(PICK.into(), n(row.pick));
    item.insert(VERSION.into(), n(row.version));
    item.insert(UPDATED_AT.into(), millis(&row.updated_at));
    if let Some(earmark) = &row.earmark {
        // A plain struct of strings and a time always serialises.
        if let Ok(json) = serde_json::to_string(earmark) {
            item.insert(EARMARK.into(), s(json));
        }
    }
    item
}

/// Reads a pool item back into its row (times at millisecond precision).
pub fn row_from_item(item: &Item) -> Result<PoolRow, StoreError> {
    use pool_attr::*;
    let status: SandboxStatus = status_of_key(get_s(item, STATUS)?)
        .parse()
        .map_err(|e: String| corrupt(STATUS, e))?;
    Ok(PoolRow {
        sandbox_id: get_s(item, SANDBOX_ID)?.to_string(),
        status,
        name: get_opt_s(item, NAME)?.unwrap_or_default(),
        external_id: get_s(item, EXTERNAL_ID)?.to_string(),
        sfdc_account_id: get_opt_s(item, SFDC_ACCOUNT_ID)?,
        owner: get_opt_s(item, OWNER)?,
        track_name: get_opt_s(item, TRACK_NAME)?,
        allocated_at: get_opt_time(item, ALLOCATED_AT)?,
        expires_at: get_opt_time(item, EXPIRES_AT)?,
        deletion_requested_at: get_opt_time(item, DELETION_REQUESTED_AT)?,
        attempts: get_n(item, ATTEMPTS)?,
        last_error: get_opt_s(item, LAST_ERROR)?,
        due_at: get_opt_time(item, DUE_AT)?,
        pick: get_n(item, PICK)?,
        version: get_n(item, VERSION)?,
        updated_at: time_from_millis(UPDATED_AT, get_n(item, UPDATED_AT)?)?,
        held_by: get_opt_s(item, HELD_BY)?,
        earmark: get_opt_s(item, EARMARK)?
            .map(|json| serde_json::from_str(&json).map_err(|e| corrupt(EARMARK, e.to_string())))
            .transpose()?,
    })
}

/// The DynamoDB type of a key attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    /// String.
    S,
    /// Number.
    N,
}

/// The attributes a `LastEvaluatedKey` has for one table or index: the index's own keys plus the
/// table's primary key (which is what DynamoDB returns for a GSI).
pub(crate) type KeyShape = [(&'static str, KeyType)];

/// Event table key.
pub(crate) const EVENTS_KEY: &KeyShape = &[
    (event_attr::STREAM_ID, KeyType::S),
    (event_attr::VERSION, KeyType::N),
];
/// Pool table key (a plain scan).
pub(crate) const POOL_KEY: &KeyShape = &[(pool_attr::SANDBOX_ID, KeyType::S)];
/// `by-status-pick` key.
pub(crate) const BY_STATUS_PICK_KEY: &KeyShape = &[
    (pool_attr::STATUS, KeyType::S),
    (pool_attr::PICK, KeyType::N),
    (pool_attr::SANDBOX_ID, KeyType::S),
];
/// A `by-status-name` listing cursor: the status (unsharded), the last name and sandbox id
/// returned — a position in the merged name order of every shard, which is also the shape of the
/// index's own `LastEvaluatedKey` before sharding, so cursors issued then still resume.
pub(crate) const BY_STATUS_NAME_KEY: &KeyShape = &[
    (pool_attr::STATUS, KeyType::S),
    (pool_attr::NAME, KeyType::S),
    (pool_attr::SANDBOX_ID, KeyType::S),
];
/// `by-owner` key.
pub(crate) const BY_OWNER_KEY: &KeyShape = &[
    (pool_attr::OWNER, KeyType::S),
    (pool_attr::ALLOCATED_AT, KeyType::N),
    (pool_attr::SANDBOX_ID, KeyType::S),
];

/// `by-due` key (one shard's rows; `due_key` is unique, so it alone orders them).
pub(crate) const BY_DUE_KEY: &KeyShape = &[
    (pool_attr::DUE_SHARD, KeyType::S),
    (pool_attr::DUE_KEY, KeyType::S),
    (pool_attr::SANDBOX_ID, KeyType::S),
];
/// A `due()` cursor: the status (in `due_shard`, unsharded) and the last `due_key` returned —
/// a position in the merged order of every shard, not one shard's `ExclusiveStartKey`.
pub(crate) const DUE_CURSOR: &KeyShape = &[
    (pool_attr::DUE_SHARD, KeyType::S),
    (pool_attr::DUE_KEY, KeyType::S),
];

/// One key attribute as a cursor carries it, e.g. `{"S":"lab-1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum CursorValue {
    S(String),
    N(String),
}

/// Longest cursor accepted: a real one is a few hundred bytes; anything much longer is forged
/// and is refused before it is decoded.
const MAX_CURSOR_LEN: usize = 8 * 1024;
/// DynamoDB's limit on a key attribute's size (the partition key's; sort keys allow 1,024).
const MAX_KEY_BYTES: usize = 2048;

/// Encodes a `LastEvaluatedKey` as an opaque cursor (a JSON map of typed key attributes).
pub(crate) fn cursor_from_key(key: &Item) -> Result<String, StoreError> {
    let map = key
        .iter()
        .map(|(name, value)| match value {
            AttributeValue::S(v) => Ok((name.clone(), CursorValue::S(v.clone()))),
            AttributeValue::N(v) => Ok((name.clone(), CursorValue::N(v.clone()))),
            _ => Err(corrupt(name, "key attribute is neither S nor N")),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    encode_cursor(&map).ok_or_else(|| corrupt("cursor", "cannot encode"))
}

/// Decodes a cursor into an `ExclusiveStartKey` for a query of `shape`. Anything that is not
/// exactly such a key — other attribute names, wrong types, a non-numeric number, an empty or
/// oversized string — is [`StoreError::InvalidCursor`], so a forged cursor never reaches DynamoDB
/// (whose validation error would otherwise surface as a server error).
pub(crate) fn key_from_cursor(cursor: &str, shape: &KeyShape) -> Result<Item, StoreError> {
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(StoreError::InvalidCursor);
    }
    let map: BTreeMap<String, CursorValue> = decode_cursor(cursor)?;
    if map.len() != shape.len() {
        return Err(StoreError::InvalidCursor);
    }
    let mut key = Item::with_capacity(shape.len());
    for (name, kind) in shape {
        let value = match (map.get(*name), kind) {
            (Some(CursorValue::S(v)), KeyType::S) if !v.is_empty() && v.len() <= MAX_KEY_BYTES => {
                AttributeValue::S(v.clone())
            }
            (Some(CursorValue::N(v)), KeyType::N) if v.parse::<i128>().is_ok() => {
                AttributeValue::N(v.clone())
            }
            _ => return Err(StoreError::InvalidCursor),
        };
        key.insert((*name).to_string(), value);
    }
    Ok(key)
}

/// The key attributes of `item` for a query of `shape`: a cursor that resumes right after it.
pub(crate) fn key_of(item: &Item, shape: &KeyShape) -> Result<Item, StoreError> {
    shape
        .iter()
        .map(|(name, _)| {
            item.get(*name)
                .map(|v| ((*name).to_string(), v.clone()))
                .ok_or_else(|| corrupt(name, "key attribute missing from an index item"))
        })
        .collect()
}

/// The string value of a key attribute, if it is one.
pub(crate) fn key_s<'a>(key: &'a Item, name: &str) -> Option<&'a str> {
    match key.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

/// The numeric value of a key attribute, if it is one.
pub(crate) fn key_n(key: &Item, name: &str) -> Option<i128> {
    match key.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::model::events::{truncate_to_millis, Actor, CommandMeta, SandboxEvent};

    fn envelope() -> EventEnvelope {
        let meta = CommandMeta {
            actor: Actor::Track("stü#1/✓".into()),
            request_id: Some("req-ü".into()),
            correlation_id: Some("corr-1".into()),
        };
        EventEnvelope::new(
            "sandbox#ü-1",
            7,
            &SandboxEvent::DeletionRequested {
                caller: "stü".into(),
                requested_at: truncate_to_millis(Utc::now()),
                reason: None,
                last_heartbeat_at: None,
            },
            &meta,
            Utc::now(),
        )
    }

    fn row() -> PoolRow {
        let at = truncate_to_millis(Utc::now());
        PoolRow {
            sandbox_id: "s-1".into(),
            status: SandboxStatus::PendingDeletion,
            name: "lab-ü".into(),
            external_id: "identity/accounts/1".into(),
            sfdc_account_id: Some("sf".into()),
            owner: Some("stu".into()),
            track_name: Some("track".into()),
            allocated_at: Some(at),
            expires_at: Some(at + chrono::Duration::hours(48)),
            deletion_requested_at: Some(at),
            attempts: 3,
            last_error: Some("boom".into()),
            due_at: Some(at),
            pick: u32::MAX,
            version: 9,
            updated_at: at,
            held_by: None,
            earmark: None,
        }
    }

    /// An envelope survives item conversion exactly, and the item has the documented shape.
    #[test]
    fn envelope_round_trips_through_an_item() -> Result<(), StoreError> {
        let env = envelope();
        let item = envelope_to_item(&env);
        assert_eq!(envelope_from_item(&item)?, env);
        let occurred = format_time(&env.occurred_at);
        assert_eq!(key_s(&item, "occurred_at"), Some(occurred.as_str()));
        assert_eq!(key_s(&item, "time_bucket"), Some(&occurred[..13]));
        assert_eq!(
            key_s(&item, "occurred_key").map(str::to_string),
            Some(format!("{occurred}#{}", env.event_id))
        );
        assert_eq!(key_n(&item, "version"), Some(7));
        let mut bare = env.clone();
        bare.request_id = None;
        bare.correlation_id = None;
        let item = envelope_to_item(&bare);
        assert!(!item.contains_key("request_id") && !item.contains_key("correlation_id"));
        assert_eq!(envelope_from_item(&item)?, bare);
        Ok(())
    }

    /// A stream image in DynamoDB JSON decodes to the same envelope; garbage is Corrupt.
    #[test]
    fn json_image_decodes() -> Result<(), StoreError> {
        let env = envelope();
        let image: serde_json::Map<String, serde_json::Value> = envelope_to_item(&env)
            .into_iter()
            .map(|(k, v)| {
                let typed = match v {
                    AttributeValue::S(s) => serde_json::json!({ "S": s }),
                    AttributeValue::N(n) => serde_json::json!({ "N": n }),
                    _ => serde_json::Value::Null,
                };
                (k, typed)
            })
            .collect();
        assert_eq!(
            envelope_from_json_image(&serde_json::Value::Object(image))?,
            env
        );
        let broken = serde_json::json!({"stream_id": {"S": "x"}, "version": {"S": "1"}});
        assert!(matches!(
            envelope_from_json_image(&broken),
            Err(StoreError::Corrupt(_))
        ));
        Ok(())
    }

    /// A row survives item conversion exactly, with `None`s omitted (sparse indexes).
    #[test]
    fn row_round_trips_through_an_item() -> Result<(), StoreError> {
        let full = row();
        assert_eq!(row_from_item(&row_to_item(&full))?, full);
        // A reservation's earmark survives too (the allocator decides on it).
        let earmarked = PoolRow {
            earmark: Some(domain::model::sandbox::Earmark {
                reservation_id: "r-1".into(),
                track: "ws".into(),
                ends_at: full.updated_at,
            }),
            ..full.clone()
        };
        assert_eq!(row_from_item(&row_to_item(&earmarked))?, earmarked);
        let sparse = PoolRow {
            name: String::new(),
            sfdc_account_id: None,
            owner: None,
            track_name: None,
            allocated_at: None,
            expires_at: None,
            deletion_requested_at: None,
            last_error: None,
            due_at: None,
            ..full
        };
        let item = row_to_item(&sparse);
        for absent in ["name", "owner", "allocated_at", "due_at", "last_error"] {
            assert!(!item.contains_key(absent), "{absent} should be omitted");
        }
        assert_eq!(row_from_item(&item)?, sparse);
        Ok(())
    }

    /// With write sharding the `status` attribute is `{status}#{k}` (k from the sandbox id, the
    /// same hash as every other sharded key), without it the bare status; both read back as
    /// the row's status, and the readers' partitions list every shard plus the bare key.
    #[test]
    fn status_key_is_sharded_and_reads_back() -> Result<(), StoreError> {
        let full = row();
        let bare = row_to_sharded_item(&full, 1);
        assert_eq!(key_s(&bare, "status"), Some("pending_deletion"));
        let sharded = row_to_sharded_item(&full, 8);
        let k = index_shard(&full.sandbox_id, 8);
        assert_eq!(
            key_s(&sharded, "status").map(str::to_string),
            Some(format!("pending_deletion#{k}"))
        );
        assert_eq!(
            key_s(&sharded, "due_shard").map(str::to_string),
            Some(format!("pending_deletion#{k}"))
        );
        assert_eq!(row_from_item(&bare)?, full);
        assert_eq!(row_from_item(&sharded)?, full);
        assert_eq!(
            shard_partitions("available", 3),
            vec!["available#0", "available#1", "available#2", "available"]
        );
        assert_eq!(shard_partitions("available", 1), vec!["available"]);
        Ok(())
    }

    /// Cursors round-trip for their own shape only; forged ones are InvalidCursor.
    #[test]
    fn cursors_are_checked_against_the_index_shape() -> Result<(), StoreError> {
        let item = row_to_item(&row());
        let key = key_of(&item, BY_STATUS_NAME_KEY)?;
        let cursor = cursor_from_key(&key)?;
        assert_eq!(key_from_cursor(&cursor, BY_STATUS_NAME_KEY)?, key);
        for wrong in [BY_OWNER_KEY, BY_STATUS_PICK_KEY, POOL_KEY, EVENTS_KEY] {
            assert_eq!(
                key_from_cursor(&cursor, wrong),
                Err(StoreError::InvalidCursor)
            );
        }
        let forged = [
            encode_cursor(
                &serde_json::json!({"status": {"S": "available"}, "name": {"N": "x"}, "sandbox_id": {"S": "1"}}),
            ),
            encode_cursor(
                &serde_json::json!({"status": {"S": ""}, "name": {"S": "x"}, "sandbox_id": {"S": "1"}}),
            ),
            encode_cursor(
                &serde_json::json!({"status": {"B": "AA=="}, "name": {"S": "x"}, "sandbox_id": {"S": "1"}}),
            ),
            encode_cursor(&serde_json::json!([1, 2, 3])),
            Some("%%%".to_string()),
            Some("A".repeat(MAX_CURSOR_LEN + 1)),
        ];
        for cursor in forged.into_iter().flatten() {
            assert_eq!(
                key_from_cursor(&cursor, BY_STATUS_NAME_KEY),
                Err(StoreError::InvalidCursor)
            );
        }
        Ok(())
    }
}
