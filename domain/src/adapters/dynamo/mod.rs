//! The DynamoDB adapter (aws-sdk-dynamodb): the event store, the pool view and its projector
//! side on the four tables of DESIGN.md §5.
//!
//! What it does differently from dynamo-es (reference/anchors.md §B), on purpose:
//! * every read follows `LastEvaluatedKey` to the end — a stream larger than one 1 MB page loads
//!   completely, so no aggregate can get stuck on a partial history;
//! * a batch may have up to [`MAX_TRANSACTION_ITEMS`] (100) events, DynamoDB's real limit;
//! * a cancelled transaction is read reason by reason: only `ConditionalCheckFailed` is a
//!   [`StoreError::VersionConflict`] (naming the stream that lost), while `TransactionConflict`
//!   and throttling are retried with backoff and end as [`StoreError::Unavailable`].
//!
//! # Layout
//! - `items` — events and pool rows as items, stream images, cursors;
//! - `tables` — the table definitions (also the terraform drift-check JSON) and `ensure_tables`;
//! - `retry` — error classification and full-jitter backoff;
//! - `view_batch` — the projector's batched row loads and chunked transactional writes.

mod feed; // EventFeed (audit): the by-time GSI
mod items;
mod prefix_stats; // per-prefix counters beside the stats shards (ADR 0018)
mod retry;
mod tables;
mod view_batch; // batched projector writes: BatchGetItem loads, chunked TransactWriteItems

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, DeleteRequest,
    GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType as SdkKeyType, KeysAndAttributes,
    Projection, ProjectionType, Put, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    StreamSpecification, StreamViewType, TableStatus, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Utc};

use crate::model::events::EventEnvelope;
use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::PrefixStats;
use crate::model::projection::{PoolRow, PoolStats, StatsDelta};
use crate::store::batch::{BatchLimits, RowChange, ViewChunk};
use crate::store::{
    stats_shard, CandidateQuery, EventPage, EventStore, ListFilter, PoolView, RowPage, StoreError,
    ViewStore, MAX_TRANSACTION_ITEMS,
};

pub use items::{
    envelope_from_item, envelope_from_json_image, envelope_to_item, row_from_item, row_to_item,
    time_bucket, Item,
};
pub use tables::{
    table_definitions, table_definitions_json, table_name, GsiDef, KeyAttribute, TableDef,
};

use items::{
    cursor_from_key, event_attr, key_from_cursor, key_n, key_of, key_s, pool_attr, KeyShape,
    BY_OWNER_KEY, BY_STATUS_EXPIRY_KEY, BY_STATUS_NAME_KEY, BY_STATUS_PICK_KEY, EVENTS_KEY,
    POOL_KEY,
};
pub use retry::RequestCounts;
use retry::{
    cancellation_failure, classify, describe, Failure, Retry, TRANSIENT_CANCELLATION_CODES,
};

/// Default number of stats shards (DESIGN.md §5: spreads 1,000 transitions/s).
pub const DEFAULT_STATS_SHARDS: u32 = 8;
/// Default retry budget per call (after the first attempt).
pub const DEFAULT_MAX_RETRIES: u32 = 6;
/// Region used with a local endpoint when none is configured anywhere.
pub const LOCAL_DEFAULT_REGION: &str = "us-east-1";
/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of one call may take before it is retried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ensure_tables` waits for new tables and their indexes to become ACTIVE.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
/// Items a filtered page asks DynamoDB to evaluate at least (a filter discards some, so asking
/// for just the rows still missing would take one request per evaluated item).
const FILTERED_PAGE_ITEMS: usize = 500;
/// DynamoDB's limit on keys per `BatchGetItem`.
const BATCH_GET_KEYS: usize = 100;
/// DynamoDB's limit on requests per `BatchWriteItem`.
const BATCH_WRITE_REQUESTS: usize = 25;
/// The transaction-cancellation code of a failed condition.
const CONDITIONAL_CHECK_FAILED: &str = "ConditionalCheckFailed";

/// How to reach DynamoDB and name the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoConfig {
    /// Table names are `{table_prefix}-events|pool|stats|checkpoints`.
    pub table_prefix: String,
    /// DynamoDB Local (or another endpoint); `None` = AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` = the standard chain (and `us-east-1` with a local endpoint).
    pub region: Option<String>,
    /// Number of stats shards (default [`DEFAULT_STATS_SHARDS`]); must match every writer's.
    pub stats_shards: u32,
    /// Retries per call after the first attempt (default [`DEFAULT_MAX_RETRIES`]).
    pub max_retries: u32,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            table_prefix: "sandbox-broker".into(),
            endpoint_url: None,
            region: None,
            stats_shards: DEFAULT_STATS_SHARDS,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

/// True when the environment names AWS credentials (keys or a profile) that should be used
/// even against a local endpoint.
fn credentials_in_environment() -> bool {
    ["AWS_ACCESS_KEY_ID", "AWS_PROFILE"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The AWS SDK configuration for `config`: the standard credential and region chains; with an
/// endpoint URL (DynamoDB Local) and no credentials in the environment, static dummy credentials
/// and `us-east-1` unless a region is configured. Shared with the projector's Streams client, so
/// both talk to the same endpoint with the same identity.
pub async fn load_sdk_config(config: &DynamoConfig) -> Result<SdkConfig, StoreError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build(),
    );
    let local = config.endpoint_url.is_some();
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
        if !credentials_in_environment() {
            // DynamoDB Local accepts only letters and digits in an access key id.
            loader = loader.credentials_provider(Credentials::new(
                "dynamodblocal",
                "dynamodblocal",
                None,
                None,
                "sandbox-broker-dev",
            ));
        }
    }
    loader = match &config.region {
        Some(region) => loader.region(Region::new(region.clone())),
        None if local => loader.region(
            RegionProviderChain::default_provider()
                .or_else(Region::from_static(LOCAL_DEFAULT_REGION)),
        ),
        None => loader,
    };
    let sdk_config = loader.load().await;
    if sdk_config.region().is_none() {
        return Err(StoreError::Unavailable(
            "no AWS region configured (set AWS_REGION)".into(),
        ));
    }
    Ok(sdk_config)
}

/// Events, view, stats and checkpoints in DynamoDB. Cheap to clone (the SDK client is shared).
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    sdk_config: SdkConfig,
    events: String,
    pool: String,
    stats: String,
    checkpoints: String,
    table_prefix: String,
    stats_shards: u32,
    max_retries: u32,
    requests: Arc<RequestCounts>,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table_prefix", &self.table_prefix)
            .field("stats_shards", &self.stats_shards)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

/// A request DynamoDB refused as malformed where no caller input was involved: a bug or an item
/// DynamoDB cannot hold, never worth retrying.
fn refused(message: String) -> StoreError {
    StoreError::Corrupt(format!("DynamoDB refused the request: {message}"))
}

/// A request that carried a caller's cursor and was refused: the cursor was not ours.
fn refused_cursor(_message: String) -> StoreError {
    StoreError::InvalidCursor
}

fn build_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("building a DynamoDB request: {e}"))
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn names(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// `None` for an empty map: DynamoDB refuses empty expression maps.
fn non_empty<K, V>(map: HashMap<K, V>) -> Option<HashMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

/// DynamoDB's `Limit` for `rows` rows.
fn limit_i32(rows: usize) -> i32 {
    i32::try_from(rows.max(1)).unwrap_or(i32::MAX)
}

/// Whether `old` (the item a failed condition found) is `envelope` itself: then an earlier
/// attempt of this very call stored it and only its answer was lost (timeout, 5xx).
fn is_own_event(old: Option<&Item>, envelope: &EventEnvelope) -> bool {
    old.and_then(|item| key_s(item, event_attr::EVENT_ID))
        .is_some_and(|id| id == envelope.event_id.to_string())
}

/// Checks a batch before anything is sent: at most [`MAX_TRANSACTION_ITEMS`] events, stream ids
/// non-empty (DynamoDB refuses empty keys), and per stream versions ≥ 1 and consecutive, so each
/// put's condition "this (stream, version) is free" adds up to "the stream is exactly at the
/// version before the batch's first".
fn validate_append(events: &[EventEnvelope]) -> Result<(), StoreError> {
    if events.len() > MAX_TRANSACTION_ITEMS {
        return Err(StoreError::TooManyItems(events.len()));
    }
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in events {
        if e.stream_id.is_empty() {
            return Err(StoreError::InvalidAppend("empty stream id".into()));
        }
        if e.version == 0 {
            return Err(StoreError::InvalidAppend(format!(
                "{}: versions start at 1",
                e.stream_id
            )));
        }
        match last.insert(&e.stream_id, e.version) {
            Some(previous) if previous + 1 != e.version => {
                return Err(StoreError::InvalidAppend(format!(
                    "{}: versions in a batch must be consecutive",
                    e.stream_id
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// One pool query: an index (or the table) with its key condition (`None` = scan), an optional
/// filter, and the key shape its cursors have.
struct RowQuery {
    what: &'static str,
    index: Option<&'static str>,
    shape: &'static KeyShape,
    key_condition: Option<String>,
    filter: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    consistent: bool,
}

impl DynamoStore {
    /// Connects with [`load_sdk_config`]. Creates nothing: call [`DynamoStore::ensure_tables`]
    /// for a fresh account or DynamoDB Local.
    pub async fn connect(config: DynamoConfig) -> Result<Self, StoreError> {
        let sdk_config = load_sdk_config(&config).await?;
        Ok(Self::from_sdk_config(sdk_config, &config))
    }

    /// A store over an already loaded SDK configuration (endpoint, region and credentials are
    /// taken from it; the table prefix, shards and retry budget from `config`).
    pub fn from_sdk_config(sdk_config: SdkConfig, config: &DynamoConfig) -> Self {
        // The adapter retries every call itself (see `retry`), so the SDK's retries are off:
        // otherwise the two budgets would multiply.
        let client_config = aws_sdk_dynamodb::config::Builder::from(&sdk_config)
            .retry_config(RetryConfig::disabled())
            .build();
        let prefix = &config.table_prefix;
        Self {
            client: Client::from_conf(client_config),
            sdk_config,
            events: tables::table_name(prefix, tables::EVENTS),
            pool: tables::table_name(prefix, tables::POOL),
            stats: tables::table_name(prefix, tables::STATS),
            checkpoints: tables::table_name(prefix, tables::CHECKPOINTS),
            table_prefix: prefix.clone(),
            stats_shards: config.stats_shards.max(1),
            max_retries: config.max_retries,
            requests: Arc::default(),
        }
    }

    /// The requests this store (and its clones) sent, per call name.
    pub fn request_counts(&self) -> Arc<RequestCounts> {
        Arc::clone(&self.requests)
    }

    /// A counted retry budget for one logical call.
    fn retry(&self, what: &'static str) -> Retry {
        Retry::counted(what, self.max_retries, Arc::clone(&self.requests))
    }

    /// The DynamoDB client (for tools and tests that need a raw call).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The SDK configuration in use (e.g. to build a DynamoDB Streams client for the poller).
    pub fn sdk_config(&self) -> &SdkConfig {
        &self.sdk_config
    }

    /// The table-name prefix.
    pub fn table_prefix(&self) -> &str {
        &self.table_prefix
    }

    /// The event table's name.
    pub fn events_table(&self) -> &str {
        &self.events
    }

    /// The view table's name.
    pub fn pool_table(&self) -> &str {
        &self.pool
    }

    /// The stats table's name.
    pub fn stats_table(&self) -> &str {
        &self.stats
    }

    /// The checkpoint table's name.
    pub fn checkpoints_table(&self) -> &str {
        &self.checkpoints
    }

    /// The number of stats shards.
    pub fn stats_shards(&self) -> u32 {
        self.stats_shards
    }

    /// Sends a request built by `request` until it succeeds, a fatal error occurs or the retry
    /// budget is spent. `invalid` maps a `ValidationException`.
    async fn call<T, E, F, Fut>(
        &self,
        what: &'static str,
        invalid: fn(String) -> StoreError,
        mut request: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut retry = self.retry(what);
        loop {
            match request().await {
                Ok(out) => return Ok(out),
                Err(err) => retry.after(classify(&err, invalid)).await?,
            }
        }
    }

    /// Creates every missing table (on-demand billing) and waits until all of them and their
    /// indexes are ACTIVE. Idempotent: an existing table (`ResourceInUseException`) is fine.
    pub async fn ensure_tables(&self) -> Result<(), StoreError> {
        let defs = table_definitions(&self.table_prefix);
        for def in &defs {
            self.create_table(def).await?;
        }
        let deadline = Instant::now() + TABLE_ACTIVE_TIMEOUT;
        for def in &defs {
            self.wait_active(&def.table_name, deadline).await?;
        }
        Ok(())
    }

    async fn create_table(&self, def: &TableDef) -> Result<(), StoreError> {
        let scalar = |kind: &str| {
            if kind == "N" {
                ScalarAttributeType::N
            } else {
                ScalarAttributeType::S
            }
        };
        let key_element = |name: &str, key_type: SdkKeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(key_type)
                .build()
                .map_err(build_error)
        };
        let attributes = def
            .key_attributes()
            .iter()
            .map(|(name, kind)| {
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(scalar(kind))
                    .build()
                    .map_err(build_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut key_schema = vec![key_element(&def.hash_key.0, SdkKeyType::Hash)?];
        if let Some((range, _)) = &def.range_key {
            key_schema.push(key_element(range, SdkKeyType::Range)?);
        }
        let gsis = def
            .gsis
            .iter()
            .map(|gsi| {
                GlobalSecondaryIndex::builder()
                    .index_name(&gsi.name)
                    .key_schema(key_element(&gsi.hash_key.0, SdkKeyType::Hash)?)
                    .key_schema(key_element(&gsi.range_key.0, SdkKeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()
                    .map_err(build_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stream = def
            .stream
            .as_ref()
            .map(|view| {
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::from(view.as_str()))
                    .build()
                    .map_err(build_error)
            })
            .transpose()?;
        let mut retry = self.retry("CreateTable");
        loop {
            let result = self
                .client
                .create_table()
                .table_name(&def.table_name)
                .billing_mode(BillingMode::PayPerRequest)
                .set_attribute_definitions(Some(attributes.clone()))
                .set_key_schema(Some(key_schema.clone()))
                .set_global_secondary_indexes(non_empty_vec(gsis.clone()))
                .set_stream_specification(stream.clone())
                .send()
                .await;
            match result {
                Ok(_) => return Ok(()),
                // Another process created it first (or it existed): what we wanted.
                Err(err) if retry::error_code(&err) == Some("ResourceInUseException") => {
                    return Ok(())
                }
                Err(err) => retry.after(classify(&err, refused)).await?,
            }
        }
    }

    async fn wait_active(&self, table: &str, deadline: Instant) -> Result<(), StoreError> {
        loop {
            let out = self
                .call("DescribeTable", refused, || {
                    self.client.describe_table().table_name(table).send()
                })
                .await?;
            let ready = out.table().is_some_and(|t| {
                t.table_status() == Some(&TableStatus::Active)
                    && t.global_secondary_indexes()
                        .iter()
                        .all(|i| i.index_status() == Some(&IndexStatus::Active))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "table {table} is not ACTIVE after {TABLE_ACTIVE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One event: a conditional `PutItem`.
    async fn put_event(&self, envelope: &EventEnvelope) -> Result<(), StoreError> {
        let item = envelope_to_item(envelope);
        let mut retry = self.retry("PutItem(event)");
        loop {
            // `attribute_not_exists(stream_id)` is evaluated on the item with this exact
            // (stream_id, version) key: it holds iff that version of the stream is still free.
            let result = self
                .client
                .put_item()
                .table_name(&self.events)
                .set_item(Some(item.clone()))
                .condition_expression("attribute_not_exists(#sid)")
                .expression_attribute_names("#sid", event_attr::STREAM_ID)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let PutItemError::ConditionalCheckFailedException(failed) = ctx.err() {
                    if retry.retries() > 0 && is_own_event(failed.item(), envelope) {
                        return Ok(());
                    }
                    return Err(StoreError::VersionConflict {
                        stream_id: envelope.stream_id.clone(),
                    });
                }
            }
            retry
                .after(classify(&err, StoreError::InvalidAppend))
                .await?;
        }
    }

    /// Several events: one `TransactWriteItems` of conditional puts, all or nothing.
    async fn put_events(&self, events: &[EventEnvelope]) -> Result<(), StoreError> {
        let items = events
            .iter()
            .map(|e| {
                Put::builder()
                    .table_name(&self.events)
                    .set_item(Some(envelope_to_item(e)))
                    .condition_expression("attribute_not_exists(#sid)")
                    .expression_attribute_names("#sid", event_attr::STREAM_ID)
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()
                    .map(|put| TransactWriteItem::builder().put(put).build())
                    .map_err(build_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut retry = self.retry("TransactWriteItems(events)");
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let TransactWriteItemsError::TransactionCanceledException(cancelled) = ctx.err()
                {
                    let failure = self
                        .cancelled_append(events, cancelled.cancellation_reasons(), &retry)
                        .await?;
                    match failure {
                        None => return Ok(()),
                        Some(failure) => {
                            retry.after(failure).await?;
                            continue;
                        }
                    }
                }
            }
            retry
                .after(classify(&err, StoreError::InvalidAppend))
                .await?;
        }
    }

    /// Reads a cancelled append's reasons (one per item, in request order). `Ok(None)`: the
    /// batch is in fact stored (an earlier attempt's answer was lost); `Err(conflict)` naming the
    /// first stream whose condition failed; `Ok(Some(failure))` for the retry loop otherwise.
    async fn cancelled_append(
        &self,
        events: &[EventEnvelope],
        reasons: &[CancellationReason],
        retry: &Retry,
    ) -> Result<Option<Failure>, StoreError> {
        let failed = |r: &CancellationReason| r.code() == Some(CONDITIONAL_CHECK_FAILED);
        // Event ids are unique and the transaction atomic: if any failed condition found one of
        // our own events, the whole batch was committed by an earlier attempt of this call.
        if retry.retries() > 0
            && reasons
                .iter()
                .zip(events)
                .any(|(r, e)| failed(r) && is_own_event(r.item(), e))
        {
            return Ok(None);
        }
        if let Some(i) = reasons.iter().position(failed) {
            if let Some(e) = events.get(i) {
                return Err(StoreError::VersionConflict {
                    stream_id: e.stream_id.clone(),
                });
            }
        }
        let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
        if codes
            .iter()
            .any(|c| TRANSIENT_CANCELLATION_CODES.contains(c))
        {
            return Ok(Some(Failure::Transient(format!(
                "transaction cancelled: {codes:?}"
            ))));
        }
        if codes.iter().all(|c| *c == "None") {
            // No usable reasons (an emulator that omits them): find the stream whose next
            // version is taken; if none is, the cancellation was transient.
            return match self.first_taken_stream(events).await? {
                Some(stream_id) => Err(StoreError::VersionConflict { stream_id }),
                None => Ok(Some(Failure::Transient(
                    "transaction cancelled without reasons".into(),
                ))),
            };
        }
        Err(StoreError::InvalidAppend(format!(
            "transaction cancelled: {codes:?}"
        )))
    }

    /// The first stream of a batch whose first version already exists (consistent reads).
    async fn first_taken_stream(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Option<String>, StoreError> {
        let mut seen: Vec<&str> = Vec::new();
        for e in events {
            if seen.contains(&e.stream_id.as_str()) {
                continue;
            }
            seen.push(&e.stream_id);
            let out = self
                .call("GetItem(event)", refused, || {
                    self.client
                        .get_item()
                        .table_name(&self.events)
                        .key(event_attr::STREAM_ID, s(&e.stream_id))
                        .key(event_attr::VERSION, n(e.version))
                        .consistent_read(true)
                        .projection_expression("#sid")
                        .expression_attribute_names("#sid", event_attr::STREAM_ID)
                        .send()
                })
                .await?;
            if out.item.is_some() {
                return Ok(Some(e.stream_id.clone()));
            }
        }
        Ok(None)
    }

    /// Rows of one pool query, following pages until `limit` rows or the end, and the key to
    /// resume after the last row returned (`None` at the end).
    async fn rows(
        &self,
        query: &RowQuery,
        limit: usize,
        start: Option<Item>,
    ) -> Result<(Vec<PoolRow>, Option<Item>), StoreError> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let invalid: fn(String) -> StoreError = if start.is_some() {
            refused_cursor
        } else {
            refused
        };
        let mut start = start;
        let mut rows = Vec::with_capacity(limit.min(1000));
        loop {
            let remaining = limit - rows.len();
            // Unfiltered: ask for exactly what is missing, so the page's LastEvaluatedKey is the
            // last row returned. Filtered: ask for more, and cut the page ourselves.
            let page_limit = if query.filter.is_some() {
                remaining.max(FILTERED_PAGE_ITEMS)
            } else {
                remaining
            };
            let (items, last_key) = match &query.key_condition {
                Some(key_condition) => {
                    let out = self
                        .call(query.what, invalid, || {
                            self.client
                                .query()
                                .table_name(&self.pool)
                                .set_index_name(query.index.map(str::to_string))
                                .key_condition_expression(key_condition)
                                .set_filter_expression(query.filter.clone())
                                .set_expression_attribute_names(non_empty(query.names.clone()))
                                .set_expression_attribute_values(non_empty(query.values.clone()))
                                .consistent_read(query.consistent)
                                .limit(limit_i32(page_limit))
                                .set_exclusive_start_key(start.clone())
                                .send()
                        })
                        .await?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
                None => {
                    let out = self
                        .call(query.what, invalid, || {
                            self.client
                                .scan()
                                .table_name(&self.pool)
                                .set_index_name(query.index.map(str::to_string))
                                .set_filter_expression(query.filter.clone())
                                .set_expression_attribute_names(non_empty(query.names.clone()))
                                .set_expression_attribute_values(non_empty(query.values.clone()))
                                .consistent_read(query.consistent)
                                .limit(limit_i32(page_limit))
                                .set_exclusive_start_key(start.clone())
                                .send()
                        })
                        .await?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
            };
            let last_key = last_key.filter(|k| !k.is_empty());
            let count = items.len();
            for (i, item) in items.iter().enumerate() {
                rows.push(row_from_item(item)?);
                if rows.len() == limit {
                    // Full. Stopped inside the page: resume right after this row. At the page's
                    // end: DynamoDB's own key says whether anything may follow.
                    let next = if i + 1 < count {
                        Some(key_of(item, query.shape)?)
                    } else {
                        last_key
                    };
                    return Ok((rows, next));
                }
            }
            match last_key {
                Some(key) => start = Some(key),
                None => return Ok((rows, None)),
            }
        }
    }

    /// One GetItem on the pool table.
    async fn get_row(
        &self,
        sandbox_id: &str,
        consistent: bool,
    ) -> Result<Option<PoolRow>, StoreError> {
        let out = self
            .call("GetItem(pool)", refused, || {
                self.client
                    .get_item()
                    .table_name(&self.pool)
                    .key(pool_attr::SANDBOX_ID, s(sandbox_id))
                    .consistent_read(consistent)
                    .send()
            })
            .await?;
        out.item.as_ref().map(row_from_item).transpose()
    }

    /// Deletes every item of `table` (key attribute `key`): paged key-only scan, then
    /// `BatchWriteItem`s of 25 deletes, re-sending unprocessed ones with backoff.
    async fn delete_all(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .call("Scan(clear)", refused, || {
                    self.client
                        .scan()
                        .table_name(table)
                        .projection_expression("#k")
                        .expression_attribute_names("#k", key)
                        .consistent_read(true)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            let keys = out.items.unwrap_or_default();
            for chunk in keys.chunks(BATCH_WRITE_REQUESTS) {
                let mut requests = chunk
                    .iter()
                    .map(|k| {
                        DeleteRequest::builder()
                            .set_key(Some(k.clone()))
                            .build()
                            .map(|d| WriteRequest::builder().delete_request(d).build())
                            .map_err(build_error)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut retry = self.retry("BatchWriteItem(clear)");
                while !requests.is_empty() {
                    let out = self
                        .call("BatchWriteItem(clear)", refused, || {
                            self.client
                                .batch_write_item()
                                .request_items(table, requests.clone())
                                .send()
                        })
                        .await?;
                    requests = out
                        .unprocessed_items
                        .and_then(|mut m| m.remove(table))
                        .unwrap_or_default();
                    if !requests.is_empty() {
                        retry
                            .after(Failure::Transient(format!(
                                "{} deletes unprocessed",
                                requests.len()
                            )))
                            .await?;
                    }
                }
            }
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) => start = Some(key),
                None => return Ok(()),
            }
        }
    }
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Checks that a decoded cursor belongs to this query: its partition-key value is the one
/// queried (DynamoDB would otherwise refuse it, or worse, start elsewhere).
fn cursor_in_partition(key: &Item, attribute: &str, value: &str) -> Result<(), StoreError> {
    if key_s(key, attribute) == Some(value) {
        Ok(())
    } else {
        Err(StoreError::InvalidCursor)
    }
}

#[async_trait]
impl EventStore for DynamoStore {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut events = Vec::new();
        let mut start: Option<Item> = None;
        // Follow LastEvaluatedKey to the end: a stream beyond one 1 MB page must load whole, or
        // the command would decide on a partial history and conflict forever (anchors §B.5).
        loop {
            let out = self
                .call("Query(events)", refused, || {
                    self.client
                        .query()
                        .table_name(&self.events)
                        .key_condition_expression("#sid = :s AND #v > :v")
                        .expression_attribute_names("#sid", event_attr::STREAM_ID)
                        .expression_attribute_names("#v", event_attr::VERSION)
                        .expression_attribute_values(":s", s(stream_id))
                        .expression_attribute_values(":v", n(after))
                        .consistent_read(true)
                        .set_exclusive_start_key(start.clone())
                        .send()
                })
                .await?;
            for item in out.items() {
                events.push(envelope_from_item(item)?);
            }
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) => start = Some(key),
                None => return Ok(events),
            }
        }
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        let out = self
            .call("Query(latest event)", refused, || {
                self.client
                    .query()
                    .table_name(&self.events)
                    .key_condition_expression("#sid = :s")
                    .expression_attribute_names("#sid", event_attr::STREAM_ID)
                    .expression_attribute_values(":s", s(stream_id))
                    .scan_index_forward(false)
                    .limit(1)
                    .consistent_read(true)
                    .send()
            })
            .await?;
        out.items().first().map(envelope_from_item).transpose()
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        validate_append(&events)?;
        match events.as_slice() {
            [] => Ok(()),
            [single] => self.put_event(single).await,
            several => self.put_events(several).await,
        }
    }

    async fn scan(
        &self,
        segment: u32,
        segments: u32,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let segments = segments.max(1);
        if segment >= segments {
            return Ok(EventPage::default());
        }
        let start = cursor
            .as_deref()
            .map(|c| key_from_cursor(c, EVENTS_KEY))
            .transpose()?;
        let invalid = if start.is_some() {
            refused_cursor
        } else {
            refused
        };
        let total = i32::try_from(segments).map_err(|_| refused(format!("{segments} segments")))?;
        let this = i32::try_from(segment).map_err(|_| refused(format!("segment {segment}")))?;
        let out = self
            .call("Scan(events)", invalid, || {
                self.client
                    .scan()
                    .table_name(&self.events)
                    .segment(this)
                    .total_segments(total)
                    .consistent_read(true)
                    .limit(limit_i32(limit))
                    .set_exclusive_start_key(start.clone())
                    .send()
            })
            .await?;
        let mut events = out
            .items()
            .iter()
            .map(envelope_from_item)
            .collect::<Result<Vec<_>, _>>()?;
        // DynamoDB returns a partition's items in sort-key order; sort anyway so the port's
        // promise (each stream in version order) does not rest on that.
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for e in &events {
            let next = first_seen.len();
            first_seen.entry(e.stream_id.clone()).or_insert(next);
        }
        events.sort_by_key(|e| (first_seen.get(&e.stream_id).copied(), e.version));
        let cursor = out
            .last_evaluated_key
            .filter(|k| !k.is_empty())
            .map(|k| cursor_from_key(&k))
            .transpose()?;
        Ok(EventPage { events, cursor })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // One attempt: readiness wants a quick, honest answer, not a retried one.
        self.client
            .describe_table()
            .table_name(&self.events)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(describe(&e)))
    }
}

#[async_trait]
impl PoolView for DynamoStore {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.get_row(sandbox_id, false).await
    }

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        let available = SandboxStatus::Available.as_str();
        if let Some(prefix) = query.prefix.as_deref().filter(|p| !p.is_empty()) {
            // The names starting with `prefix` are exactly the sort-key range [prefix,
            // prefix + U+10FFFF] (UTF-8 byte order). Continue after the caller's last name and
            // wrap to the start of the range, so successive pages walk the whole prefix.
            let end = format!("{prefix}\u{10FFFF}");
            let by_name = |lo: String, hi: String| RowQuery {
                what: "Query(by-status-name)",
                index: Some(tables::INDEX_BY_STATUS_NAME),
                shape: BY_STATUS_NAME_KEY,
                key_condition: Some("#st = :st AND #name BETWEEN :lo AND :hi".into()),
                filter: None,
                names: names(&[("#st", pool_attr::STATUS), ("#name", pool_attr::NAME)]),
                values: HashMap::from([
                    (":st".to_string(), s(available)),
                    (":lo".to_string(), s(&lo)),
                    (":hi".to_string(), s(&hi)),
                ]),
                consistent: false,
            };
            let after = query
                .after_name
                .as_deref()
                .filter(|a| a.starts_with(prefix));
            // The smallest string greater than `after` is `after` followed by NUL.
            let start = after.map_or_else(|| prefix.to_string(), |a| format!("{a}\u{0}"));
            let (mut rows, _) = self.rows(&by_name(start, end), query.limit, None).await?;
            if let Some(after) = after {
                if rows.len() < query.limit {
                    let (wrapped, _) = self
                        .rows(
                            &by_name(prefix.to_string(), after.to_string()),
                            query.limit - rows.len(),
                            None,
                        )
                        .await?;
                    rows.extend(wrapped);
                }
            }
            return Ok(rows);
        }
        // From the random start upwards, then wrap around below it: concurrent allocators start
        // at different places of the pool instead of all fighting over its first K rows.
        let by_pick = |condition: &str| RowQuery {
            what: "Query(by-status-pick)",
            index: Some(tables::INDEX_BY_STATUS_PICK),
            shape: BY_STATUS_PICK_KEY,
            key_condition: Some(format!("#st = :st AND {condition}")),
            filter: None,
            names: names(&[("#st", pool_attr::STATUS), ("#pick", pool_attr::PICK)]),
            values: HashMap::from([
                (":st".to_string(), s(available)),
                (":start".to_string(), n(query.start_pick)),
            ]),
            consistent: false,
        };
        let (mut rows, _) = self
            .rows(&by_pick("#pick >= :start"), query.limit, None)
            .await?;
        if rows.len() < query.limit && query.start_pick > 0 {
            let (wrapped, _) = self
                .rows(&by_pick("#pick < :start"), query.limit - rows.len(), None)
                .await?;
            rows.extend(wrapped);
        }
        Ok(rows)
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let prefix = filter.prefix.as_deref().filter(|p| !p.is_empty());
        let mut names = HashMap::new();
        let mut values = HashMap::new();
        let mut prefix_condition = None;
        if let Some(prefix) = prefix {
            names.insert("#name".to_string(), pool_attr::NAME.to_string());
            values.insert(":prefix".to_string(), s(prefix));
            prefix_condition = Some("begins_with(#name, :prefix)".to_string());
        }
        let query = if let Some(owner) = &filter.owner {
            // A student's rows: the sparse `by-owner` index; status and prefix filter its pages.
            names.insert("#owner".into(), pool_attr::OWNER.into());
            values.insert(":owner".into(), s(owner));
            let mut filters: Vec<String> = prefix_condition.into_iter().collect();
            if let Some(status) = filter.status {
                names.insert("#st".into(), pool_attr::STATUS.into());
                values.insert(":st".into(), s(status.as_str()));
                filters.push("#st = :st".into());
            }
            RowQuery {
                what: "Query(by-owner)",
                index: Some(tables::INDEX_BY_OWNER),
                shape: BY_OWNER_KEY,
                key_condition: Some("#owner = :owner".into()),
                filter: (!filters.is_empty()).then(|| filters.join(" AND ")),
                names,
                values,
                consistent: false,
            }
        } else if let Some(status) = filter.status {
            // One status in name order; a prefix is an exact key condition, not a filter.
            names.insert("#st".into(), pool_attr::STATUS.into());
            values.insert(":st".into(), s(status.as_str()));
            let key_condition = match &prefix_condition {
                Some(p) => format!("#st = :st AND {p}"),
                None => "#st = :st".to_string(),
            };
            RowQuery {
                what: "Query(by-status-name)",
                index: Some(tables::INDEX_BY_STATUS_NAME),
                shape: BY_STATUS_NAME_KEY,
                key_condition: Some(key_condition),
                filter: None,
                names,
                values,
                consistent: false,
            }
        } else {
            RowQuery {
                what: "Scan(pool)",
                index: None,
                shape: POOL_KEY,
                key_condition: None,
                filter: prefix_condition,
                names,
                values,
                consistent: false,
            }
        };
        let start = cursor
            .map(|c| key_from_cursor(c, query.shape))
            .transpose()?;
        if let Some(key) = &start {
            if let Some(owner) = &filter.owner {
                cursor_in_partition(key, pool_attr::OWNER, owner)?;
            } else if let Some(status) = filter.status {
                cursor_in_partition(key, pool_attr::STATUS, status.as_str())?;
                let name = key_s(key, pool_attr::NAME).unwrap_or_default();
                if prefix.is_some_and(|p| !name.starts_with(p)) {
                    return Err(StoreError::InvalidCursor);
                }
            }
        }
        let (rows, next) = self.rows(&query, limit, start).await?;
        let cursor = next.as_ref().map(cursor_from_key).transpose()?;
        Ok(RowPage { rows, cursor })
    }

    async fn due(
        &self,
        status: SandboxStatus,
        before: DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let before_ms = before.timestamp_millis();
        let start = cursor
            .map(|c| key_from_cursor(c, BY_STATUS_EXPIRY_KEY))
            .transpose()?;
        if let Some(key) = &start {
            cursor_in_partition(key, pool_attr::STATUS, status.as_str())?;
            // The resume point must lie inside the queried range `due_at <= before`.
            if key_n(key, pool_attr::DUE_AT).is_none_or(|due| due > i128::from(before_ms)) {
                return Err(StoreError::InvalidCursor);
            }
        }
        let query = RowQuery {
            what: "Query(by-status-expiry)",
            index: Some(tables::INDEX_BY_STATUS_EXPIRY),
            shape: BY_STATUS_EXPIRY_KEY,
            key_condition: Some("#st = :st AND #due <= :before".into()),
            filter: None,
            names: names(&[("#st", pool_attr::STATUS), ("#due", pool_attr::DUE_AT)]),
            values: HashMap::from([
                (":st".to_string(), s(status.as_str())),
                (":before".to_string(), n(before_ms)),
            ]),
            consistent: false,
        };
        let (rows, next) = self.rows(&query, limit, start).await?;
        let cursor = next.as_ref().map(cursor_from_key).transpose()?;
        Ok(RowPage { rows, cursor })
    }

    async fn stats(&self) -> Result<PoolStats, StoreError> {
        let keys: Vec<Item> = (0..self.stats_shards)
            .map(|i| HashMap::from([(tables::STATS_KEY.to_string(), s(format!("stats#{i}")))]))
            .collect();
        let mut stats = PoolStats::default();
        for chunk in keys.chunks(BATCH_GET_KEYS) {
            let mut pending = chunk.to_vec();
            let mut retry = self.retry("BatchGetItem(stats)");
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending.clone()))
                    .build()
                    .map_err(build_error)?;
                let out = self
                    .call("BatchGetItem(stats)", refused, || {
                        self.client
                            .batch_get_item()
                            .request_items(&self.stats, request.clone())
                            .send()
                    })
                    .await?;
                for shard in out
                    .responses
                    .and_then(|mut r| r.remove(&self.stats))
                    .unwrap_or_default()
                {
                    for status in SandboxStatus::ALL {
                        if let Some(count) = key_n(&shard, status.as_str()) {
                            let count = i64::try_from(count).map_err(|_| {
                                StoreError::Corrupt(format!("stats counter {count} out of range"))
                            })?;
                            stats.by_status[status.index()] += count;
                        }
                    }
                }
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.stats))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if !pending.is_empty() {
                    retry
                        .after(Failure::Transient(format!(
                            "{} stats shards unprocessed",
                            pending.len()
                        )))
                        .await?;
                }
            }
        }
        Ok(stats)
    }

    async fn stats_by_prefix(&self) -> Result<PrefixStats, StoreError> {
        self.read_prefix_stats().await
    }
}

#[async_trait]
impl ViewStore for DynamoStore {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.get_row(sandbox_id, true).await
    }

    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &StatsDelta,
    ) -> Result<(), StoreError> {
        // The row is written only if it is still at the version the projector read (absent for
        // a first event): two projectors racing on one row cannot both apply an event, and the
        // stats update rides in the same transaction, so counters move exactly when rows do.
        let (condition, names, values) = match expected_version {
            None => (
                "attribute_not_exists(#id)",
                names(&[("#id", pool_attr::SANDBOX_ID)]),
                HashMap::new(),
            ),
            Some(v) => (
                "#v = :expected",
                names(&[("#v", pool_attr::VERSION)]),
                HashMap::from([(":expected".to_string(), n(v))]),
            ),
        };
        let item = row_to_item(row);
        let conflict = || StoreError::VersionConflict {
            stream_id: row.sandbox_id.clone(),
        };
        if delta.is_zero() {
            // Nothing to count: a single conditional PutItem is just as atomic, at half the
            // write cost of a transaction.
            let mut retry = self.retry("PutItem(pool)");
            loop {
                let result = self
                    .client
                    .put_item()
                    .table_name(&self.pool)
                    .set_item(Some(item.clone()))
                    .condition_expression(condition)
                    .set_expression_attribute_names(Some(names.clone()))
                    .set_expression_attribute_values(non_empty(values.clone()))
                    .send()
                    .await;
                match result {
                    Ok(_) => return Ok(()),
                    Err(SdkError::ServiceError(ctx))
                        if matches!(
                            ctx.err(),
                            PutItemError::ConditionalCheckFailedException(_)
                        ) =>
                    {
                        return Err(conflict());
                    }
                    Err(err) => retry.after(classify(&err, refused)).await?,
                }
            }
        }
        let put = Put::builder()
            .table_name(&self.pool)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(non_empty(values))
            .build()
            .map_err(build_error)?;
        let mut adds = Vec::new();
        let mut update_names = HashMap::new();
        let mut update_values = HashMap::new();
        for status in SandboxStatus::ALL {
            let d = delta.0[status.index()];
            if d != 0 {
                let i = status.index();
                adds.push(format!("#c{i} :d{i}"));
                update_names.insert(format!("#c{i}"), status.as_str().to_string());
                update_values.insert(format!(":d{i}"), n(d));
            }
        }
        let shard = format!("stats#{}", stats_shard(&row.sandbox_id, self.stats_shards));
        let update = Update::builder()
            .table_name(&self.stats)
            .key(tables::STATS_KEY, s(shard))
            .update_expression(format!("ADD {}", adds.join(", ")))
            .set_expression_attribute_names(Some(update_names))
            .set_expression_attribute_values(Some(update_values))
            .build()
            .map_err(build_error)?;
        let mut transaction = vec![
            TransactWriteItem::builder().put(put).build(),
            TransactWriteItem::builder().update(update).build(),
        ];
        transaction.extend(self.prefix_stats_updates(&[RowChange {
            expected_version,
            row: row.clone(),
            delta: *delta,
        }])?);
        let mut retry = self.retry("TransactWriteItems(pool+stats)");
        loop {
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(transaction.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(ctx) = &err {
                if let TransactWriteItemsError::TransactionCanceledException(cancelled) = ctx.err()
                {
                    let reasons = cancelled.cancellation_reasons();
                    if reasons
                        .first()
                        .is_some_and(|r| r.code() == Some(CONDITIONAL_CHECK_FAILED))
                    {
                        return Err(conflict());
                    }
                    let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
                    if let Some(failure) = cancellation_failure(&codes) {
                        retry.after(failure).await?;
                        continue;
                    }
                    return Err(refused(format!("transaction cancelled: {codes:?}")));
                }
            }
            retry.after(classify(&err, refused)).await?;
        }
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_items: MAX_TRANSACTION_ITEMS,
            stats_shards: self.stats_shards,
        }
    }

    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        self.batch_load_rows(sandbox_ids).await
    }

    async fn write_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        self.transact_chunk(chunk).await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError> {
        let out = self
            .call("GetItem(checkpoint)", refused, || {
                self.client
                    .get_item()
                    .table_name(&self.checkpoints)
                    .key(tables::CHECKPOINT_KEY, s(source))
                    .consistent_read(true)
                    .send()
            })
            .await?;
        match out.item {
            None => Ok(None),
            Some(item) => key_s(&item, tables::CHECKPOINT_POSITION)
                .map(|p| Some(p.to_string()))
                .ok_or_else(|| StoreError::Corrupt(format!("checkpoint {source} has no position"))),
        }
    }

    async fn save_checkpoint(&self, source: &str, position: &str) -> Result<(), StoreError> {
        self.call("PutItem(checkpoint)", refused, || {
            self.client
                .put_item()
                .table_name(&self.checkpoints)
                .item(tables::CHECKPOINT_KEY, s(source))
                .item(tables::CHECKPOINT_POSITION, s(position))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn clear(&self) -> Result<(), StoreError> {
        self.delete_all(&self.pool, pool_attr::SANDBOX_ID).await?;
        self.delete_all(&self.stats, tables::STATS_KEY).await?;
        self.delete_all(&self.checkpoints, tables::CHECKPOINT_KEY)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::{Actor, CommandMeta, SyncEvent};

    fn env(stream: &str, version: u64) -> EventEnvelope {
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: None,
        };
        EventEnvelope::new(
            stream,
            version,
            &SyncEvent::ListingRecorded {
                listed: 1,
                missing: vec![],
            },
            &meta,
            Utc::now(),
        )
    }

    /// Batches with gaps, zero versions, empty streams or over 100 items are refused before
    /// anything is sent.
    #[test]
    fn append_validation() {
        assert!(validate_append(&[env("a", 1), env("a", 2), env("b", 4)]).is_ok());
        assert!(matches!(
            validate_append(&[env("a", 1), env("a", 3)]),
            Err(StoreError::InvalidAppend(_))
        ));
        assert!(matches!(
            validate_append(&[env("a", 0)]),
            Err(StoreError::InvalidAppend(_))
        ));
        assert!(matches!(
            validate_append(&[env("", 1)]),
            Err(StoreError::InvalidAppend(_))
        ));
        let many: Vec<_> = (1..=101).map(|v| env("a", v)).collect();
        assert_eq!(validate_append(&many), Err(StoreError::TooManyItems(101)));
        let hundred: Vec<_> = (1..=100).map(|v| env("a", v)).collect();
        assert!(validate_append(&hundred).is_ok());
    }

    /// Only an item carrying the same event id counts as "our own earlier write".
    #[test]
    fn own_event_detection() {
        let e = env("a", 1);
        let other = env("a", 1);
        assert!(is_own_event(Some(&envelope_to_item(&e)), &e));
        assert!(!is_own_event(Some(&envelope_to_item(&other)), &e));
        assert!(!is_own_event(None, &e));
    }

    /// With an endpoint and no configured region, the local default applies; config wins.
    #[tokio::test]
    async fn local_endpoint_config() -> Result<(), StoreError> {
        let config = DynamoConfig {
            endpoint_url: Some("http://127.0.0.1:9".into()),
            region: Some("eu-west-1".into()),
            ..DynamoConfig::default()
        };
        let store = DynamoStore::connect(config).await?;
        assert_eq!(
            store.sdk_config().region().map(|r| r.as_ref().to_string()),
            Some("eu-west-1".to_string())
        );
        assert_eq!(store.events_table(), "sandbox-broker-events");
        assert_eq!(store.stats_shards(), DEFAULT_STATS_SHARDS);
        Ok(())
    }
}
