//! The projector's side of the view in SQLite: version-conditioned row writes with their stats
//! deltas and prefix counters, batched chunks in one transaction, checkpoints and the rebuild's
//! clear.

use std::collections::HashMap;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::pool_view::{query_rows, row_from_json};
use super::prefix_stats::PrefixMoves;
use super::{corrupt, db_err, ms, EmbeddedStore};
use domain::model::lifecycle::SandboxStatus;
use domain::model::projection::{PoolRow, StatsDelta};
use domain::store::batch::{BatchLimits, RowChange, ViewChunk};
use domain::store::{StoreError, ViewStore};

/// Sandbox ids per `IN (…)` query of `load_rows`.
const LOAD_ROWS_PER_QUERY: usize = 500;

#[async_trait]
impl ViewStore for EmbeddedStore {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        let sandbox_id = sandbox_id.to_string();
        self.with_reader(move |conn, _| {
            conn.prepare_cached("SELECT row FROM pool WHERE sandbox_id = ?1")
                .map_err(db_err)?
                .query_row(params![sandbox_id], |r| r.get::<_, String>(0))
                .optional()
                .map_err(db_err)?
                .map(row_from_json)
                .transpose()
        })
        .await
    }

    async fn write_row(
        &self,
        expected_version: Option<u64>,
        row: &PoolRow,
        delta: &StatsDelta,
    ) -> Result<(), StoreError> {
        // One change is a chunk of one: the same checks, counters and cached statements.
        let chunk = ViewChunk {
            rows: vec![RowChange {
                expected_version,
                row: row.clone(),
                delta: *delta,
            }],
            checkpoint: None,
        };
        self.with_conn(move |conn, shards| write_changes(conn, shards, &chunk))
            .await
    }

    fn batch_limits(&self) -> BatchLimits {
        // One SQLite transaction has no item limit: a whole delivered batch is one write.
        BatchLimits {
            max_items: usize::MAX,
            stats_shards: self.inner.stats_shards,
        }
    }

    async fn load_rows(
        &self,
        sandbox_ids: &[String],
    ) -> Result<HashMap<String, PoolRow>, StoreError> {
        let ids = sandbox_ids.to_vec();
        self.with_reader(move |conn, _| {
            let mut rows = HashMap::with_capacity(ids.len());
            // SQLite binds at most 32,766 parameters; stay far below with a fixed statement shape
            // so the prepared-statement cache hits.
            for part in ids.chunks(LOAD_ROWS_PER_QUERY) {
                let marks = vec!["?"; part.len()].join(",");
                let sql = format!("SELECT row FROM pool WHERE sandbox_id IN ({marks})");
                let args: Vec<&dyn rusqlite::ToSql> =
                    part.iter().map(|id| id as &dyn rusqlite::ToSql).collect();
                for row in query_rows(conn, &sql, &args)? {
                    rows.insert(row.sandbox_id.clone(), row);
                }
            }
            Ok(rows)
        })
        .await
    }

    async fn write_chunk(&self, chunk: &ViewChunk) -> Result<(), StoreError> {
        let chunk = chunk.clone();
        self.with_conn(move |conn, shards| write_changes(conn, shards, &chunk))
            .await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError> {
        let source = source.to_string();
        self.with_reader(move |conn, _| {
            conn.query_row(
                "SELECT position FROM checkpoints WHERE source = ?1",
                params![source],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn save_checkpoint(&self, source: &str, position: &str) -> Result<(), StoreError> {
        let (source, position) = (source.to_string(), position.to_string());
        self.with_conn(move |conn, _| {
            conn.execute(
                "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                params![source, position],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }

    async fn swap_checkpoint(
        &self,
        source: &str,
        expected: Option<&str>,
        position: &str,
    ) -> Result<bool, StoreError> {
        let (source, position) = (source.to_string(), position.to_string());
        let expected = expected.map(str::to_string);
        self.with_conn(move |conn, _| {
            // One statement each: SQLite runs it under the write lock, so the comparison and
            // the write cannot be split by another connection.
            let changed = match expected {
                None => conn.execute(
                    "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                     ON CONFLICT (source) DO NOTHING",
                    params![source, position],
                ),
                Some(expected) => conn.execute(
                    "UPDATE checkpoints SET position = ?2 WHERE source = ?1 AND position = ?3",
                    params![source, position, expected],
                ),
            }
            .map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn save_checkpoint_fenced(
        &self,
        source: &str,
        fence: u64,
        position: &str,
    ) -> Result<bool, StoreError> {
        let (source, position) = (source.to_string(), position.to_string());
        let fence = i64::try_from(fence).unwrap_or(i64::MAX);
        self.with_conn(move |conn, _| {
            // One immediate transaction on the write connection: the token is compared and
            // both rows written with no other writer in between.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let stored: Option<i64> = tx
                .query_row(
                    "SELECT fence FROM checkpoint_fences WHERE source = ?1",
                    params![source],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            if stored.is_some_and(|stored| stored > fence) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO checkpoint_fences (source, fence) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET fence = excluded.fence",
                params![source, fence],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                params![source, position],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn clear(&self) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            // One transaction: the counters never outlive (or outcount) the rows they follow.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            tx.execute_batch("DELETE FROM pool; DELETE FROM stats; DELETE FROM prefix_stats;")
                .map_err(db_err)?;
            // Consumers' own checkpoints stay (`is_view_checkpoint`).
            tx.execute(
                "DELETE FROM checkpoints WHERE substr(source, 1, length(?1)) <> ?1",
                params![domain::store::WEBHOOK_CHECKPOINT_PREFIX],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }
}

/// Writes a chunk in one IMMEDIATE transaction: each row conditioned on its version, the
/// stats deltas summed per shard, the prefix counters moved from each replaced row's group to
/// its new one, and the checkpoint. The version checks and the writes see one state, and the
/// whole chunk commits or rolls back together, so rows and counters cannot disagree.
fn write_changes(conn: &mut Connection, shards: u32, chunk: &ViewChunk) -> Result<(), StoreError> {
    let stats = chunk.stats_by_shard(shards);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    {
        // The version check reads the replaced row's group and status too: the counters need
        // them, and it is the same index lookup.
        let mut current_of = tx
            .prepare_cached("SELECT version, name, status FROM pool WHERE sandbox_id = ?1")
            .map_err(db_err)?;
        let mut put = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO pool (sandbox_id, status, name, owner, allocated_at, due_at, pick, version, row)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .map_err(db_err)?;
        let mut moves = PrefixMoves::default();
        for change in &chunk.rows {
            let row = &change.row;
            let current: Option<(i64, String, String)> = current_of
                .query_row(params![row.sandbox_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(db_err)?;
            if current.as_ref().map(|(v, _, _)| *v as u64) != change.expected_version {
                // Dropping the transaction rolls back everything of the chunk.
                return Err(StoreError::VersionConflict {
                    stream_id: row.sandbox_id.clone(),
                });
            }
            moves.replaced(
                current
                    .as_ref()
                    .map(|(_, name, status)| (name.as_str(), status.as_str())),
                row,
            )?;
            let json = serde_json::to_string(row).map_err(corrupt)?;
            put.execute(params![
                row.sandbox_id,
                row.status.as_str(),
                row.name,
                row.owner,
                ms(&row.allocated_at),
                ms(&row.due_at),
                row.pick as i64,
                row.version as i64,
                json
            ])
            .map_err(db_err)?;
        }
        moves.write(&tx)?;
        let mut add = tx
            .prepare_cached(
                "INSERT INTO stats (shard, status, count) VALUES (?1, ?2, ?3)
                 ON CONFLICT (shard, status) DO UPDATE SET count = count + excluded.count",
            )
            .map_err(db_err)?;
        for (shard, delta) in &stats {
            for status in SandboxStatus::ALL {
                let d = delta.0[status.index()];
                if d != 0 {
                    add.execute(params![*shard as i64, status.as_str(), d])
                        .map_err(db_err)?;
                }
            }
        }
        if let Some(checkpoint) = &chunk.checkpoint {
            tx.prepare_cached(
                "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position",
            )
            .map_err(db_err)?
            .execute(params![checkpoint.source, checkpoint.position])
            .map_err(db_err)?;
        }
    }
    tx.commit().map_err(db_err)
}
