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
//! The same rooms as the embedded adapter, one per port, plus DynamoDB's own plumbing:
//! - this module — configuration, the client, [`DynamoStore`] and its one request loop (`call`);
//! - `event_store` — [`EventStore`](domain::store::EventStore): conditional appends, stream loads,
//!   the paged scan;
//! - `pool_view` — [`PoolView`](domain::store::PoolView): row gets, candidates, listings, the due
//!   index, stats;
//! - `view_store` — [`ViewStore`](domain::store::ViewStore): version-conditioned row writes,
//!   checkpoints, clear;
//! - `group_append` — grouped appends ([`EventStore::append_group`](domain::store::EventStore::append_group)):
//!   concurrent allocations in one `TransactWriteItems`, each member on its own conditions, the
//!   cancellation reasons read member by member (ADR 0025);
//! - `feed` — [`EventFeed`](domain::store::EventFeed) over the `by-time` index;
//! - `tables` — the table definitions (also the terraform drift-check JSON) and `ensure_tables`;
//! - `items` — events and pool rows as items, stream images, cursors;
//! - `retry` — error classification and full-jitter backoff;
//! - `subjects` — [`SubjectStore`](domain::store::SubjectStore) on the subjects table (ADR 0031);
//! - `view_batch` — the projector's batched row loads and the one view-transaction loop.

mod event_store;
mod feed;
mod group_append;
mod items;
mod metering;
mod pool_view;
mod prefix_stats; // per-prefix counters beside the stats shards (ADR 0018)
mod retry;
mod subjects;
mod tables;
mod view_batch;
mod view_store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::Client;

use domain::store::StoreError;

pub use items::{
    due_shard_key, due_sort_key, envelope_from_item, envelope_from_json_image, envelope_to_item,
    envelope_to_sharded_item, index_shard, row_from_item, row_to_item, row_to_sharded_item,
    shard_key, status_shard_key, time_bucket, time_bucket_key, Item,
};
use items::{n, s};
pub use tables::{
    table_definitions, table_definitions_json, table_name, GsiDef, KeyAttribute, TableDef,
};

pub use metering::{CapacityMeter, StreamRequestMeter};
use retry::{classify, Retry};
pub use retry::{CapacityKind, RequestCounts};

/// Default number of stats shards (DESIGN.md §5: spreads 1,000 transitions/s).
pub const DEFAULT_STATS_SHARDS: u32 = 8;
/// Default number of write shards of the hot index keys (ADR 0014): an hour's events and a
/// status's rows (`by-status-pick`, `by-status-name`, `by-due`) are spread over this many
/// partitions.
pub const DEFAULT_INDEX_SHARDS: u32 = 8;
/// Default most events of one grouped append: DynamoDB's item limit of a transaction.
pub const DEFAULT_GROUP_COMMIT_ITEMS: u32 = domain::store::MAX_TRANSACTION_ITEMS as u32;
/// Default retry budget per call (after the first attempt).
pub const DEFAULT_MAX_RETRIES: u32 = 6;
/// Region used with a local endpoint when none is configured anywhere.
pub const LOCAL_DEFAULT_REGION: &str = "us-east-1";
/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default of [`DynamoConfig::attempt_timeout`]: how long one attempt of one call may take
/// before it is retried.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Write shards of the hot index keys, `by-time`, `by-due`, `by-status-pick` and
    /// `by-status-name` (default
    /// [`DEFAULT_INDEX_SHARDS`]); readers query every shard, so it must match every writer's.
    pub index_shards: u32,
    /// Most events the command service may write in one grouped `TransactWriteItems` (default
    /// [`DEFAULT_GROUP_COMMIT_ITEMS`], at most 100); 0 or 1 turns group commit off.
    pub group_commit_items: u32,
    /// How long one attempt of one call may take before the SDK gives up on it and retries
    /// (default [`DEFAULT_ATTEMPT_TIMEOUT`]). An emulator on a starved machine may need longer:
    /// an abandoned attempt is still carried out there, so each retry adds to its backlog.
    pub attempt_timeout: Duration,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            table_prefix: "sandbox-broker".into(),
            endpoint_url: None,
            region: None,
            stats_shards: DEFAULT_STATS_SHARDS,
            max_retries: DEFAULT_MAX_RETRIES,
            index_shards: DEFAULT_INDEX_SHARDS,
            group_commit_items: DEFAULT_GROUP_COMMIT_ITEMS,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
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
            .operation_attempt_timeout(config.attempt_timeout)
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
        // Not the default chain: its last step asks the EC2 metadata service, which off EC2
        // costs seconds and logs a warning before an emulator (which ignores regions) is used.
        None if local => loader.region(
            RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
                .or_else(ProfileFileRegionProvider::new())
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
    index_shards: u32,
    max_retries: u32,
    group_commit_items: usize,
    requests: Arc<RequestCounts>,
    /// What candidate reads recently found per partition (shared by clones: one memory per
    /// process).
    shard_sizes: Arc<pool_view::ShardSizes>,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table_prefix", &self.table_prefix)
            .field("stats_shards", &self.stats_shards)
            .field("index_shards", &self.index_shards)
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
        let prefix = &config.table_prefix;
        let requests: Arc<RequestCounts> = Arc::default();
        let client_config = aws_sdk_dynamodb::config::Builder::from(&sdk_config)
            .retry_config(RetryConfig::disabled())
            .interceptor(CapacityMeter::new(Arc::clone(&requests), prefix))
            .build();
        Self {
            client: Client::from_conf(client_config),
            sdk_config,
            events: tables::table_name(prefix, tables::EVENTS),
            pool: tables::table_name(prefix, tables::POOL),
            stats: tables::table_name(prefix, tables::STATS),
            checkpoints: tables::table_name(prefix, tables::CHECKPOINTS),
            table_prefix: prefix.clone(),
            stats_shards: config.stats_shards.max(1),
            index_shards: config.index_shards.max(1),
            max_retries: config.max_retries,
            group_commit_items: usize::try_from(config.group_commit_items)
                .unwrap_or(usize::MAX)
                .min(domain::store::MAX_TRANSACTION_ITEMS),
            requests,
            shard_sizes: Arc::default(),
        }
    }

    /// The requests this store (and its clones) sent, per call name.
    pub fn request_counts(&self) -> Arc<RequestCounts> {
        Arc::clone(&self.requests)
    }

    /// An interceptor for a DynamoDB Streams client that counts its requests in this store's
    /// [`RequestCounts`] (target `stream`), so the projector's stream reads show beside its
    /// table requests.
    pub fn stream_request_meter(&self) -> StreamRequestMeter {
        StreamRequestMeter::new(Arc::clone(&self.requests))
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

    /// The number of write shards of the `by-time` and `by-due` index keys.
    pub fn index_shards(&self) -> u32 {
        self.index_shards
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
