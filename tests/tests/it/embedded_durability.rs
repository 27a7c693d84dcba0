//! Durability settings of the embedded store, checked on the connections it really serves from.
//!
//! A power-loss test needs a block device that drops unsynced writes (dm-flakey, dm-log-writes),
//! which the test machines cannot provide (README "## Fault testing"). What can be checked is
//! that every file connection the embedded adapter opens — the one the API and the jobs worker
//! get from their own configuration — syncs the WAL at every commit (`synchronous = FULL`, 2)
//! and runs in WAL mode: the two settings the power-loss argument of ADR 0008 rests on.

use std::path::{Path, PathBuf};

use chrono::Utc;
use command_api::config::Config;
use domain::model::events::SyncEvent;
use domain::model::ids::SYNC_STREAM_ID;
use domain::service::envelopes;
use domain::store::{EventStore, StoreError};
use domain::CommandMeta;
use store_embedded::{Durability, EmbeddedStore};

fn temp_db(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("durability-{name}-{}", uuid::Uuid::new_v4()));
    let db = dir.join("broker.db");
    (dir, db)
}

async fn pragmas(store: &EmbeddedStore) -> (i64, String) {
    store
        .durability_pragmas()
        .await
        .unwrap_or_else(|e| panic!("reading the pragmas: {e}"))
}

/// Opens the store exactly as a process with `EMBEDDED_PATH=path` does (its own settings parser).
async fn open_as_the_api(path: &Path) -> EmbeddedStore {
    let config: Config = runtime::try_parse_settings_from([
        "command-api",
        "--store",
        "embedded",
        "--embedded-path",
        &path.display().to_string(),
    ])
    .unwrap_or_else(|e| panic!("parsing the API settings: {e}"));
    let stores = runtime::open_stores(&config.store)
        .await
        .unwrap_or_else(|e| panic!("opening the store: {e:#}"));
    stores
        .embedded
        .unwrap_or_else(|| panic!("STORE=embedded opened no embedded store"))
}

/// The store an API process opens from its settings runs `synchronous = FULL` in WAL mode, still
/// so after it has committed appends, and so does a second process (the jobs worker) opening the
/// same file at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_connections_sync_every_commit() -> Result<(), StoreError> {
    let (dir, db) = temp_db("processes");
    let api = open_as_the_api(&db).await;
    assert_eq!(pragmas(&api).await, (2, "wal".to_string()));

    let meta = CommandMeta::job("durability-test", "durability-test-1");
    for version in 0..20u64 {
        let record = SyncEvent::ListingRecorded {
            listed: 1,
            missing: Vec::new(),
        };
        let batch = envelopes(SYNC_STREAM_ID, version, &[record], &meta, Utc::now());
        api.append(batch).await?;
    }
    assert_eq!(
        pragmas(&api).await,
        (2, "wal".to_string()),
        "settings hold after commits"
    );

    let worker = open_as_the_api(&db).await;
    assert_eq!(pragmas(&worker).await, (2, "wal".to_string()));
    // The second connection sees the first one's commits: both really share the file.
    assert_eq!(worker.load(SYNC_STREAM_ID).await?.len(), 20);
    drop((api, worker));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Every file-opening entry point of the adapter gives FULL + WAL, and the bench-only `Normal`
/// setting really changes the connection (so the check above can tell the two apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_open_is_full_and_wal_unless_asked_otherwise() -> Result<(), StoreError> {
    let (dir, db) = temp_db("entry-points");
    let opened = EmbeddedStore::open(&db, 2)?;
    assert_eq!(pragmas(&opened).await, (2, "wal".to_string()));
    let full = EmbeddedStore::open_with(&db, 2, Durability::Full)?;
    assert_eq!(pragmas(&full).await, (2, "wal".to_string()));
    let normal = EmbeddedStore::open_with(&db, 2, Durability::Normal)?;
    assert_eq!(pragmas(&normal).await, (1, "wal".to_string()));
    drop((opened, full, normal));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
