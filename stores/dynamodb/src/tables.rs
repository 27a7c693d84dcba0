//! The tables (the four of DESIGN.md §5, and the subjects table of ADR 0031) as data: one
//! definition drives `ensure_tables` here and is serialised for the terraform drift check
//! (`terraform/tables.expected.json`), so the code and the deployed tables cannot disagree
//! silently.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement,
    KeyType as SdkKeyType, Projection, ProjectionType, ScalarAttributeType, StreamSpecification,
    StreamViewType, TableStatus,
};

use super::retry::classify;
use super::{build_error, refused, retry, DynamoStore, TABLE_ACTIVE_TIMEOUT};
use domain::store::StoreError;

use serde::{Deserialize, Serialize};

use super::items::{event_attr, pool_attr};

/// Suffix of the event table's name (`{prefix}-events`).
pub const EVENTS: &str = "events";
/// Suffix of the view table's name.
pub const POOL: &str = "pool";
/// Suffix of the stats-shard table's name.
pub const STATS: &str = "stats";
/// Suffix of the projector-checkpoint table's name.
pub const CHECKPOINTS: &str = "checkpoints";
/// Suffix of the subjects table's name: student ids and their pseudonyms' salts, outside the
/// event log, the one table whose items are deleted (ADR 0031).
pub const SUBJECTS: &str = "subjects";
/// Key attribute of the subjects table (`subject#…` and `pseudonym#…` items).
pub const SUBJECT_KEY: &str = "subject_key";

/// `by-time` (events): an hour's events in time order, for auditors.
pub const INDEX_BY_TIME: &str = "by-time";
/// `by-status-pick` (pool): allocation candidates from a random `pick` offset.
pub const INDEX_BY_STATUS_PICK: &str = "by-status-pick";
/// `by-status-name` (pool): listings by status and name-prefix candidates.
pub const INDEX_BY_STATUS_NAME: &str = "by-status-name";
/// `by-owner` (pool, sparse): a student's allocations.
pub const INDEX_BY_OWNER: &str = "by-owner";
/// `by-due` (pool, sparse): rows a job must look at, by status and `due_at`, the status's
/// key write-sharded (`due_shard` = `{status}#{k}`, `due_key` = `{due_at ms}#{sandbox_id}`).
pub const INDEX_BY_DUE: &str = "by-due";

/// Key attribute of the stats table.
pub const STATS_KEY: &str = "shard";
/// Key attribute of the checkpoint table.
pub const CHECKPOINT_KEY: &str = "shard_id";
/// The saved position attribute of a checkpoint item.
pub const CHECKPOINT_POSITION: &str = "position";
/// The fencing token of a checkpoint item saved with `save_checkpoint_fenced` (a number).
pub const CHECKPOINT_FENCE: &str = "fence";

/// A key attribute: `(name, type)` with type `S` or `N`; serialised as `["name","S"]`.
pub type KeyAttribute = (String, String);

/// A global secondary index (projection ALL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsiDef {
    /// Index name.
    pub name: String,
    /// Partition key.
    pub hash_key: KeyAttribute,
    /// Sort key.
    pub range_key: KeyAttribute,
}

/// One table as the broker expects it (on-demand billing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    /// `events`, `pool`, `stats` or `checkpoints`.
    pub name_suffix: String,
    /// The full table name, `{prefix}-{name_suffix}` (not part of the drift-check JSON, which is
    /// prefix-independent).
    #[serde(skip)]
    pub table_name: String,
    /// Partition key.
    pub hash_key: KeyAttribute,
    /// Sort key, if any.
    pub range_key: Option<KeyAttribute>,
    /// Stream view type (`NEW_IMAGE`), if the table has a stream.
    pub stream: Option<String>,
    /// Global secondary indexes, sorted by name.
    pub gsis: Vec<GsiDef>,
}

impl TableDef {
    /// Every attribute used in a key of the table or of an index, once each (CreateTable's
    /// `AttributeDefinitions` must list exactly these).
    pub fn key_attributes(&self) -> Vec<KeyAttribute> {
        let mut all: Vec<KeyAttribute> = Vec::new();
        let keys = std::iter::once(&self.hash_key)
            .chain(self.range_key.iter())
            .chain(self.gsis.iter().flat_map(|g| [&g.hash_key, &g.range_key]));
        for key in keys {
            if !all.iter().any(|(name, _)| *name == key.0) {
                all.push(key.clone());
            }
        }
        all
    }
}

fn key(name: &str, kind: &str) -> KeyAttribute {
    (name.to_string(), kind.to_string())
}

fn gsi(name: &str, hash: (&str, &str), range: (&str, &str)) -> GsiDef {
    GsiDef {
        name: name.to_string(),
        hash_key: key(hash.0, hash.1),
        range_key: key(range.0, range.1),
    }
}

/// The full name of table `suffix` under `prefix`: `{prefix}-{suffix}`, joined once, so a prefix
/// given with its own separator (`acc-`) still names `acc-events`, not `acc--events`.
pub fn table_name(prefix: &str, suffix: &str) -> String {
    let prefix = prefix.trim_end_matches('-');
    if prefix.is_empty() {
        suffix.to_string()
    } else {
        format!("{prefix}-{suffix}")
    }
}

/// The broker's tables for `prefix`, sorted by `name_suffix`, each one's indexes sorted by name.
pub fn table_definitions(prefix: &str) -> Vec<TableDef> {
    let table = |suffix: &str, hash: KeyAttribute, range, stream: Option<&str>, gsis| TableDef {
        name_suffix: suffix.to_string(),
        table_name: table_name(prefix, suffix),
        hash_key: hash,
        range_key: range,
        stream: stream.map(str::to_string),
        gsis,
    };
    let mut defs = vec![
        table(
            EVENTS,
            key(event_attr::STREAM_ID, "S"),
            Some(key(event_attr::VERSION, "N")),
            Some("NEW_IMAGE"),
            vec![gsi(
                INDEX_BY_TIME,
                (event_attr::TIME_BUCKET, "S"),
                (event_attr::OCCURRED_KEY, "S"),
            )],
        ),
        table(
            POOL,
            key(pool_attr::SANDBOX_ID, "S"),
            None,
            None,
            vec![
                gsi(
                    INDEX_BY_STATUS_PICK,
                    (pool_attr::STATUS, "S"),
                    (pool_attr::PICK, "N"),
                ),
                gsi(
                    INDEX_BY_STATUS_NAME,
                    (pool_attr::STATUS, "S"),
                    (pool_attr::NAME, "S"),
                ),
                gsi(
                    INDEX_BY_OWNER,
                    (pool_attr::OWNER, "S"),
                    (pool_attr::ALLOCATED_AT, "N"),
                ),
                gsi(
                    INDEX_BY_DUE,
                    (pool_attr::DUE_SHARD, "S"),
                    (pool_attr::DUE_KEY, "S"),
                ),
            ],
        ),
        table(STATS, key(STATS_KEY, "S"), None, None, Vec::new()),
        table(
            CHECKPOINTS,
            key(CHECKPOINT_KEY, "S"),
            None,
            None,
            Vec::new(),
        ),
        table(SUBJECTS, key(SUBJECT_KEY, "S"), None, None, Vec::new()),
    ];
    defs.sort_by(|a, b| a.name_suffix.cmp(&b.name_suffix));
    for def in &mut defs {
        def.gsis.sort_by(|a, b| a.name.cmp(&b.name));
    }
    defs
}

/// [`table_definitions`] as the JSON the terraform drift check compares with
/// `terraform/tables.expected.json`.
pub fn table_definitions_json(prefix: &str) -> String {
    // Serialising plain strings, tuples, options and vectors cannot fail.
    serde_json::to_string(&table_definitions(prefix)).unwrap_or_default()
}

impl DynamoStore {
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
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prefix with or without its own trailing dash names the same tables.
    #[test]
    fn prefix_and_name_are_joined_once() {
        assert_eq!(table_name("acc-", EVENTS), "acc-events");
        assert_eq!(table_name("acc", EVENTS), "acc-events");
        assert_eq!(
            table_definitions("acc-")[0].table_name,
            table_definitions("acc")[0].table_name
        );
    }

    /// The definitions match the terraform drift-check file (when present), and are sorted.
    #[test]
    fn definitions_match_the_terraform_expectation() {
        let ours: serde_json::Value =
            serde_json::from_str(&table_definitions_json("x")).unwrap_or_default();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../terraform/tables.expected.json"
        );
        if let Ok(raw) = std::fs::read_to_string(path) {
            let expected: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
            assert_eq!(ours, expected, "table definitions drifted from {path}");
        }
        let defs = table_definitions("p");
        let names: Vec<_> = defs.iter().map(|d| d.table_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "p-checkpoints",
                "p-events",
                "p-pool",
                "p-stats",
                "p-subjects"
            ]
        );
        let pool = &defs[2];
        assert_eq!(pool.gsis.len(), 4);
        assert!(pool.gsis.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(pool.key_attributes().len(), 8);
        assert_eq!(
            ours[1]["gsis"][0]["range_key"],
            serde_json::json!(["occurred_key", "S"])
        );
    }
}
