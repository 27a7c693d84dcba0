//! Store selection: one set of settings for every binary, and opening the adapters they name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};
use domain::store::{EventStore, ViewStore};
use store_dynamodb::{
    table_definitions, table_name, DynamoConfig, DynamoStore, DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_GROUP_COMMIT_ITEMS, DEFAULT_INDEX_SHARDS, DEFAULT_MAX_RETRIES,
};
use store_embedded::EmbeddedStore;

/// Which store backs the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One local SQLite file; the API runs the projector and the jobs in-process.
    Embedded,
    /// DynamoDB (AWS or DynamoDB Local).
    Dynamodb,
}

/// Where the events and the view live. Flattened into every binary; `global`, so the command-line
/// tools accept these flags after their subcommand too.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// `embedded` or `dynamodb`.
    #[arg(
        long,
        env = "STORE",
        value_enum,
        ignore_case = true,
        default_value = "embedded",
        global = true
    )]
    pub store: StoreKind,
    /// The embedded store's file.
    #[arg(
        long,
        env = "EMBEDDED_PATH",
        default_value = "data/broker.db",
        global = true
    )]
    pub embedded_path: PathBuf,
    /// Table-name prefix: tables are `{prefix}-events|pool|stats|checkpoints` (a trailing `-`
    /// in the prefix is not doubled).
    #[arg(
        long,
        env = "TABLE_PREFIX",
        default_value = "sandbox-broker",
        global = true
    )]
    pub table_prefix: String,
    /// DynamoDB endpoint (DynamoDB Local or another emulator); unset = AWS.
    #[arg(long, env = "DDB_ENDPOINT_URL", global = true)]
    pub ddb_endpoint_url: Option<String>,
    /// AWS region (else the standard chain; `us-east-1` with an endpoint).
    #[arg(long, env = "AWS_REGION", global = true)]
    pub aws_region: Option<String>,
    /// Jittered retries of throttled, conflicting or 5xx DynamoDB calls before `Unavailable`.
    #[arg(long, env = "DDB_MAX_RETRIES", default_value_t = DEFAULT_MAX_RETRIES, global = true)]
    pub ddb_max_retries: u32,
    /// Stats shard count; every process on the same tables must use the same value.
    #[arg(long, env = "STATS_SHARDS", default_value_t = 8, global = true)]
    pub stats_shards: u32,
    /// Write shards of the hot DynamoDB index keys (`by-time`: an hour's events; `by-due`,
    /// `by-status-pick`, `by-status-name`: a status's rows), so none takes every write; every
    /// process on the same tables must use
    /// the same value (readers query each shard).
    #[arg(long, env = "VIEW_INDEX_SHARDS", default_value_t = DEFAULT_INDEX_SHARDS, value_parser = clap::value_parser!(u32).range(1..=64), global = true)]
    pub view_index_shards: u32,
    /// Most events one grouped DynamoDB `TransactWriteItems` of concurrent allocations may
    /// carry (at most 100, DynamoDB's limit); 0 or 1 turns group commit off, so each allocation
    /// is its own transaction (ADR 0025).
    #[arg(long, env = "DDB_GROUP_COMMIT_ITEMS", default_value_t = DEFAULT_GROUP_COMMIT_ITEMS, value_parser = clap::value_parser!(u32).range(0..=100), global = true)]
    pub ddb_group_commit_items: u32,
    /// How long one attempt of one DynamoDB call may take before it is retried, in
    /// milliseconds. Raise it only for an emulator on a busy machine: DynamoDB Local still
    /// carries out an attempt that was given up on, so short attempts add to its backlog.
    #[arg(long, env = "DDB_ATTEMPT_TIMEOUT_MS", default_value_t = DEFAULT_ATTEMPT_TIMEOUT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(100..=600_000), global = true)]
    pub ddb_attempt_timeout_ms: u64,
    /// Create missing DynamoDB tables at start-up (default: yes with `DDB_ENDPOINT_URL`, no
    /// against AWS, where terraform owns the tables).
    #[arg(long, env = "ENSURE_TABLES", value_parser = BoolishValueParser::new(), global = true)]
    pub ensure_tables: Option<bool>,
}

impl StoreArgs {
    /// The settings' defaults (what a process started with no environment sees).
    pub fn defaults() -> Self {
        Self {
            store: StoreKind::Embedded,
            embedded_path: PathBuf::from("data/broker.db"),
            table_prefix: "sandbox-broker".into(),
            ddb_endpoint_url: None,
            aws_region: None,
            ddb_max_retries: DEFAULT_MAX_RETRIES,
            stats_shards: 8,
            view_index_shards: DEFAULT_INDEX_SHARDS,
            ddb_group_commit_items: DEFAULT_GROUP_COMMIT_ITEMS,
            ddb_attempt_timeout_ms: DEFAULT_ATTEMPT_TIMEOUT.as_millis() as u64,
            ensure_tables: None,
        }
    }

    /// Whether start-up creates missing tables: as configured, else only against an emulator.
    pub fn creates_tables(&self) -> bool {
        self.ensure_tables
            .unwrap_or(self.ddb_endpoint_url.is_some())
    }

    /// The DynamoDB settings for the tables under `prefix` (tools address other prefixes than
    /// `TABLE_PREFIX`, e.g. a rebuild target).
    pub fn dynamo_config(&self, prefix: &str) -> DynamoConfig {
        DynamoConfig {
            table_prefix: prefix.to_string(),
            endpoint_url: self.ddb_endpoint_url.clone(),
            region: self.aws_region.clone(),
            stats_shards: self.stats_shards,
            max_retries: self.ddb_max_retries,
            index_shards: self.view_index_shards,
            group_commit_items: self.ddb_group_commit_items,
            attempt_timeout: std::time::Duration::from_millis(self.ddb_attempt_timeout_ms),
        }
    }

    /// Connects to the DynamoDB tables under `prefix` (creates and checks nothing).
    pub async fn dynamo(&self, prefix: &str) -> anyhow::Result<DynamoStore> {
        DynamoStore::connect(self.dynamo_config(prefix))
            .await
            .with_context(|| format!("connecting to DynamoDB tables {}", table_name(prefix, "*")))
    }

    /// Opens the embedded store at `path`.
    pub fn embedded(&self, path: &Path) -> anyhow::Result<EmbeddedStore> {
        EmbeddedStore::open(path, self.stats_shards)
            .with_context(|| format!("opening {}", path.display()))
    }
}

/// The opened store: the ports, plus the concrete adapter for the sources that need it (the
/// embedded log tail, the DynamoDB stream).
#[derive(Clone)]
pub struct Stores {
    /// The event table.
    pub events: Arc<dyn EventStore>,
    /// The view (projector side; the broker reads it as a `PoolView`).
    pub view: Arc<dyn ViewStore>,
    /// The embedded store, when that is the adapter.
    pub embedded: Option<EmbeddedStore>,
    /// The DynamoDB store, when that is the adapter.
    pub dynamo: Option<DynamoStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("embedded", &self.embedded.is_some())
            .field("dynamo", &self.dynamo.is_some())
            .finish_non_exhaustive()
    }
}

/// Opens the store `args` names. With DynamoDB, missing tables are created when
/// [`StoreArgs::creates_tables`]; otherwise a missing table stops start-up with one line naming
/// it and the fix, instead of a stream lookup failing later.
pub async fn open_stores(args: &StoreArgs) -> anyhow::Result<Stores> {
    match args.store {
        StoreKind::Embedded => {
            let store = args.embedded(&args.embedded_path)?;
            Ok(Stores {
                events: Arc::new(store.clone()),
                view: Arc::new(store.clone()),
                embedded: Some(store),
                dynamo: None,
            })
        }
        StoreKind::Dynamodb => {
            let store = args.dynamo(&args.table_prefix).await?;
            if args.creates_tables() {
                store
                    .ensure_tables()
                    .await
                    .context("creating the DynamoDB tables (ENSURE_TABLES)")?;
            } else {
                require_tables(&store, &args.table_prefix).await?;
            }
            let shared = Arc::new(store.clone());
            Ok(Stores {
                events: shared.clone(),
                view: shared,
                embedded: None,
                dynamo: Some(store),
            })
        }
    }
}

/// Fails on the first table that does not exist. Any other answer (no `DescribeTable`
/// permission, throttling) lets start-up go on: the check is there to explain a fresh set-up,
/// not to gate one that works.
async fn require_tables(store: &DynamoStore, prefix: &str) -> anyhow::Result<()> {
    for def in table_definitions(prefix) {
        let answer = store
            .client()
            .describe_table()
            .table_name(&def.table_name)
            .send()
            .await;
        if let Err(e) = answer {
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception())
            {
                bail!(
                    "DynamoDB table {} does not exist: create the tables with the terraform in \
                     terraform/, or set ENSURE_TABLES=true to create them at start-up (development)",
                    def.table_name
                );
            }
            tracing::debug!(target: "startup", table = %def.table_name, error = %e, "table check inconclusive");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        store: StoreArgs,
    }

    /// Tables are created by default only when an emulator endpoint is set; the setting wins.
    #[test]
    fn tables_are_created_by_default_only_against_an_emulator() -> Result<(), clap::Error> {
        assert!(!StoreArgs::defaults().creates_tables());
        let local =
            Probe::try_parse_from(["probe", "--ddb-endpoint-url", "http://localhost:8000"])?;
        assert!(local.store.creates_tables());
        let off = Probe::try_parse_from([
            "probe",
            "--ddb-endpoint-url",
            "http://localhost:8000",
            "--ensure-tables",
            "false",
        ])?;
        assert!(!off.store.creates_tables());
        Ok(())
    }
}
