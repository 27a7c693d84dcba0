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

use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::{pool_prefix, PrefixStats};
use crate::model::projection::{PoolRow, StatsDelta};
use crate::store::StoreError;

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
