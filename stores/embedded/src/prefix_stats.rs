//! The embedded store's per-prefix counters (ADR 0018): a `prefix_stats` table that the view
//! writes move themselves, inside the transaction that writes the rows.
//!
//! Every view write already reads the row it replaces (its version check), so it knows which
//! (group, status) the sandbox leaves and which it enters. A write collects those moves in a
//! [`PrefixMoves`], grouped with the model's rule [`pool_prefix`], and writes one upsert per
//! counter it touched before it commits: rows and counters commit or roll back together, and a
//! chunk of thousands of rows costs a handful of counter statements. SQLite triggers used to do
//! this per row and cost the projector about a third of its throughput (ADR 0018, addendum);
//! opening a store written in those days drops the triggers and keeps the counts they kept.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use domain::model::lifecycle::SandboxStatus;
use domain::model::pool_prefix::{pool_prefix, PrefixStats};
use domain::model::projection::{PoolRow, StatsDelta};
use domain::store::StoreError;

const SCHEMA: &str = "CREATE TABLE prefix_stats (
    prefix TEXT    NOT NULL,
    status TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (prefix, status)
);";

/// The triggers that kept the counters before the writes did; dropped on open.
const RETIRED_TRIGGERS: &str = "DROP TRIGGER IF EXISTS pool_prefix_stats_insert;
DROP TRIGGER IF EXISTS pool_prefix_stats_delete;";

/// Creates the counters on a store that has none yet, counting the rows it already holds, and
/// retires the triggers of a store that kept them that way — in one transaction, so a store is
/// never seen with rows but without their counts.
pub(crate) fn install(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(db_err)?;
    let exists: Option<String> = tx
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'prefix_stats'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    if exists.is_none() {
        tx.execute_batch(SCHEMA).map_err(db_err)?;
        backfill(&tx)?;
    }
    // The triggers' counts are right (they moved with every row): only the triggers go, or
    // every write would now count twice.
    tx.execute_batch(RETIRED_TRIGGERS).map_err(db_err)?;
    tx.commit().map_err(db_err)
}

/// Counts the rows of a store written before the counters existed.
fn backfill(conn: &Connection) -> Result<(), StoreError> {
    let mut moves = PrefixMoves::default();
    let mut stmt = conn
        .prepare("SELECT name, status FROM pool")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(db_err)?;
    for row in rows {
        let (name, status) = row.map_err(db_err)?;
        moves.enter(&name, parse_status(&status)?);
    }
    moves.write(conn)
}

/// The counter moves of one transaction's row writes, summed per group before they are written.
#[derive(Debug, Default)]
pub(crate) struct PrefixMoves {
    by_group: HashMap<String, StatsDelta>,
}

impl PrefixMoves {
    /// A row write: the stored row `old` (name and status text as the `pool` table holds them;
    /// `None` when the sandbox had no row) is replaced by `new`.
    pub(crate) fn replaced(
        &mut self,
        old: Option<(&str, &str)>,
        new: &PoolRow,
    ) -> Result<(), StoreError> {
        if let Some((name, status)) = old {
            let status = parse_status(status)?;
            if name == new.name && status == new.status {
                return Ok(());
            }
            self.add(name, status, -1);
        }
        self.enter(&new.name, new.status);
        Ok(())
    }

    fn enter(&mut self, name: &str, status: SandboxStatus) {
        self.add(name, status, 1);
    }

    fn add(&mut self, name: &str, status: SandboxStatus, d: i64) {
        let group = pool_prefix(name);
        // Look up by &str first: most writes of a chunk hit a group already seen, and need no
        // owned key.
        if let Some(delta) = self.by_group.get_mut(group) {
            delta.0[status.index()] += d;
            return;
        }
        let mut delta = StatsDelta::default();
        delta.0[status.index()] = d;
        self.by_group.insert(group.to_string(), delta);
    }

    /// Applies the summed moves: one upsert per (group, status) whose sum is not zero.
    pub(crate) fn write(&self, conn: &Connection) -> Result<(), StoreError> {
        let mut upsert = conn
            .prepare_cached(
                "INSERT INTO prefix_stats (prefix, status, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT (prefix, status) DO UPDATE SET count = count + excluded.count",
            )
            .map_err(db_err)?;
        for (group, delta) in &self.by_group {
            for status in SandboxStatus::ALL {
                let d = delta.0[status.index()];
                if d != 0 {
                    upsert
                        .execute(params![group, status.as_str(), d])
                        .map_err(db_err)?;
                }
            }
        }
        Ok(())
    }
}

/// Counts by status per prefix group; groups whose counts are all zero are left out.
pub(crate) fn read(conn: &Connection) -> Result<PrefixStats, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT prefix, status, count FROM prefix_stats WHERE count != 0")
        .map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db_err)?;
    let mut stats = PrefixStats::new();
    for row in rows {
        let (prefix, status, count) = row.map_err(db_err)?;
        let status = parse_status(&status)?;
        stats.entry(prefix).or_default().by_status[status.index()] += count;
    }
    Ok(stats)
}

fn parse_status(status: &str) -> Result<SandboxStatus, StoreError> {
    status
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("status `{status}`: {e}")))
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use chrono::Utc;

    use super::super::{tables, EmbeddedStore};
    use super::*;
    use domain::store::batch::{RowChange, ViewChunk};
    use domain::store::{PoolView, ViewStore};

    /// The counters as the previous release kept them: the table plus its two triggers on
    /// `pool`, verbatim, so the upgrade test opens a store that release really wrote.
    const TRIGGER_SCHEMA: &str = "
    CREATE TABLE prefix_stats (
        prefix TEXT    NOT NULL,
        status TEXT    NOT NULL,
        count  INTEGER NOT NULL,
        PRIMARY KEY (prefix, status)
    );
    CREATE TRIGGER pool_prefix_stats_insert BEFORE INSERT ON pool BEGIN
        UPDATE prefix_stats SET count = count - 1
         WHERE (prefix, status) = (SELECT rtrim(rtrim(name, replace(name, '-', '')), '-'), status
                                     FROM pool WHERE sandbox_id = NEW.sandbox_id);
        INSERT INTO prefix_stats (prefix, status, count)
            SELECT rtrim(rtrim(NEW.name, replace(NEW.name, '-', '')), '-'), NEW.status, 0
             WHERE NOT EXISTS (SELECT 1 FROM prefix_stats
                                WHERE prefix = rtrim(rtrim(NEW.name, replace(NEW.name, '-', '')), '-')
                                  AND status = NEW.status);
        UPDATE prefix_stats SET count = count + 1
         WHERE prefix = rtrim(rtrim(NEW.name, replace(NEW.name, '-', '')), '-')
           AND status = NEW.status;
    END;
    CREATE TRIGGER pool_prefix_stats_delete AFTER DELETE ON pool BEGIN
        UPDATE prefix_stats SET count = count - 1
         WHERE prefix = rtrim(rtrim(OLD.name, replace(OLD.name, '-', '')), '-')
           AND status = OLD.status;
    END;
    INSERT INTO prefix_stats (prefix, status, count)
        SELECT rtrim(rtrim(name, replace(name, '-', '')), '-'), status, COUNT(*) FROM pool GROUP BY 1, 2;";

    fn row(id: &str, name: &str, status: SandboxStatus, version: u64) -> PoolRow {
        PoolRow {
            sandbox_id: id.into(),
            status,
            name: name.into(),
            external_id: format!("identity/accounts/{id}"),
            sfdc_account_id: None,
            owner: None,
            track_name: None,
            allocated_at: None,
            expires_at: None,
            deletion_requested_at: None,
            attempts: 0,
            last_error: None,
            due_at: None,
            pick: 7,
            version,
            updated_at: Utc::now(),
            held_by: None,
            earmark: None,
        }
    }

    /// A change of `row` from `from` (no row: `None`), with the stats delta the projector sends.
    fn change(from: Option<SandboxStatus>, row: PoolRow) -> RowChange {
        let mut delta = StatsDelta::default();
        if let Some(from) = from {
            delta.0[from.index()] -= 1;
        }
        delta.0[row.status.index()] += 1;
        RowChange {
            expected_version: row.version.checked_sub(1).filter(|v| *v > 0),
            row,
            delta,
        }
    }

    async fn put(store: &EmbeddedStore, from: Option<SandboxStatus>, row: PoolRow) {
        let c = change(from, row);
        store
            .write_row(c.expected_version, &c.row, &c.delta)
            .await
            .unwrap_or_else(|e| panic!("write {}: {e}", c.row.sandbox_id));
    }

    /// The counters from scratch: every row's (group, status) counted with the model's rule.
    async fn recount(store: &EmbeddedStore) -> PrefixStats {
        store
            .with_conn(|conn, _| {
                let mut stmt = conn
                    .prepare("SELECT name, status FROM pool")
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .map_err(db_err)?;
                let mut stats = PrefixStats::new();
                for row in rows {
                    let (name, status) = row.map_err(db_err)?;
                    let status = parse_status(&status)?;
                    stats
                        .entry(pool_prefix(&name).to_string())
                        .or_default()
                        .by_status[status.index()] += 1;
                }
                Ok(stats)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn counts(store: &EmbeddedStore) -> PrefixStats {
        store
            .stats_by_prefix()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// (group, status, count) of every non-zero counter, in order.
    fn flat(stats: &PrefixStats) -> Vec<(String, &'static str, i64)> {
        stats
            .iter()
            .flat_map(|(group, counts)| {
                SandboxStatus::ALL
                    .into_iter()
                    .filter(|s| counts.get(*s) != 0)
                    .map(|s| (group.clone(), s.as_str(), counts.get(s)))
            })
            .collect()
    }

    fn temp_db() -> PathBuf {
        std::env::temp_dir()
            .join(format!("prefix-stats-{}", uuid::Uuid::new_v4()))
            .join("db")
    }

    async fn trigger_count(store: &EmbeddedStore) -> i64 {
        store
            .with_conn(|conn, _| {
                conn.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The counters follow the rows through inserts, a status change, a rename across groups,
    /// a chunk that changes one sandbox several times, a chunk refused by its version check
    /// (nothing of it counted) and a clear.
    #[tokio::test]
    async fn counters_follow_rows() {
        use SandboxStatus::{Allocated, Available, PendingDeletion};
        let store = EmbeddedStore::open_in_memory(4).unwrap_or_else(|e| panic!("{e}"));
        for i in 1..=3 {
            put(
                &store,
                None,
                row(&format!("s{i}"), &format!("lab-{i}"), Available, 1),
            )
            .await;
        }
        put(&store, Some(Available), row("s2", "lab-2", Allocated, 2)).await;
        put(
            &store,
            Some(Available),
            row("s3", "aws-lab-3", Available, 2),
        )
        .await;
        assert_eq!(
            flat(&counts(&store).await),
            [
                ("aws-lab".to_string(), "available", 1),
                ("lab".to_string(), "available", 1),
                ("lab".to_string(), "allocated", 1),
            ]
        );

        let chunk = ViewChunk {
            rows: vec![
                change(None, row("s4", "solo", Available, 1)),
                change(Some(Available), row("s4", "solo", Allocated, 2)),
                change(Some(Allocated), row("s4", "aws-lab-4", PendingDeletion, 3)),
                change(Some(Available), row("s1", "lab-1", Allocated, 2)),
            ],
            checkpoint: None,
        };
        store
            .write_chunk(&chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let after_chunk = counts(&store).await;
        assert_eq!(
            flat(&after_chunk),
            [
                ("aws-lab".to_string(), "available", 1),
                ("aws-lab".to_string(), "pending_deletion", 1),
                ("lab".to_string(), "allocated", 2),
            ]
        );
        assert_eq!(after_chunk, recount(&store).await);

        // s3 is at version 2, so the chunk's second change conflicts and the first rolls back.
        let refused = ViewChunk {
            rows: vec![
                change(Some(Allocated), row("s2", "lab-2", PendingDeletion, 3)),
                change(Some(Available), row("s3", "aws-lab-3", Allocated, 2)),
            ],
            checkpoint: None,
        };
        assert!(matches!(
            store.write_chunk(&refused).await,
            Err(StoreError::VersionConflict { stream_id }) if stream_id == "s3"
        ));
        assert_eq!(counts(&store).await, after_chunk);

        store.clear().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(counts(&store).await.is_empty());
        put(&store, None, row("s1", "lab-1", Available, 1)).await;
        assert_eq!(
            flat(&counts(&store).await),
            [("lab".to_string(), "available", 1)]
        );
    }

    /// A store the trigger release wrote keeps its counts when the new code opens it, loses
    /// its triggers, and counts every later write exactly once.
    #[tokio::test]
    async fn upgrade_from_triggers_keeps_counts_and_drops_triggers() {
        use SandboxStatus::{Allocated, Available};
        let path = temp_db();
        {
            let store = EmbeddedStore::open(&path, 2).unwrap_or_else(|e| panic!("{e}"));
            drop(store);
            // Put the store back to what the trigger release left: its counters and triggers.
            let conn = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            conn.execute_batch(&format!("DROP TABLE prefix_stats; {TRIGGER_SCHEMA}"))
                .unwrap_or_else(|e| panic!("{e}"));
            for (id, name, status) in [
                ("s1", "lab-1", Available),
                ("s2", "lab-2", Available),
                ("s3", "aws-lab-3", Allocated),
            ] {
                let json = serde_json::to_string(&row(id, name, status, 1))
                    .unwrap_or_else(|e| panic!("{e}"));
                conn.execute(
                    "INSERT OR REPLACE INTO pool (sandbox_id, status, name, pick, version, row)
                     VALUES (?1, ?2, ?3, 7, 1, ?4)",
                    params![id, status.as_str(), name, json],
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
            let triggers: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(triggers, 2, "the fixture is a trigger store");
        }

        let store = EmbeddedStore::open(&path, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(trigger_count(&store).await, 0);
        assert_eq!(
            flat(&counts(&store).await),
            [
                ("aws-lab".to_string(), "allocated", 1),
                ("lab".to_string(), "available", 2),
            ]
        );
        put(&store, Some(Available), row("s1", "lab-1", Allocated, 2)).await;
        put(&store, None, row("s4", "lab-4", Available, 1)).await;
        let stats = counts(&store).await;
        assert_eq!(
            flat(&stats),
            [
                ("aws-lab".to_string(), "allocated", 1),
                ("lab".to_string(), "available", 2),
                ("lab".to_string(), "allocated", 1),
            ]
        );
        assert_eq!(stats, recount(&store).await);
        drop(store);
        let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    }

    /// A store written before the counters existed is counted once when first opened, and
    /// opening it again does not count it twice.
    #[tokio::test]
    async fn store_without_counters_is_backfilled_once() {
        let path = temp_db();
        {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
            }
            let conn = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
            conn.execute_batch(tables::SCHEMA)
                .unwrap_or_else(|e| panic!("{e}"));
            for (id, name) in [("s1", "lab-1"), ("s2", "lab-2"), ("s3", "solo")] {
                let json = serde_json::to_string(&row(id, name, SandboxStatus::Available, 1))
                    .unwrap_or_else(|e| panic!("{e}"));
                conn.execute(
                    "INSERT INTO pool (sandbox_id, status, name, pick, version, row)
                     VALUES (?1, 'available', ?2, 7, 1, ?3)",
                    params![id, name, json],
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let expected = [
            (String::new(), "available", 1),
            ("lab".to_string(), "available", 2),
        ];
        for _ in 0..2 {
            let store = EmbeddedStore::open(&path, 2).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(flat(&counts(&store).await), expected);
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    }
}
