//! The embedded store's per-prefix counters (ADR 0018): a `prefix_stats` table kept by SQLite
//! triggers on the `pool` table.
//!
//! Triggers rather than explicit writes: every path that writes a row (single event, batched
//! chunk, rebuild's clear) then moves the counters inside the very transaction that moves the
//! row, with no second copy of the counting rule to drift. The group is computed in SQL with the
//! same rule as [`pool_prefix`](crate::model::pool_prefix::pool_prefix) — the name up to its last
//! `-`, trailing dashes dropped: `rtrim(name, <every character of name but '-'>)` strips the last
//! segment — and a unit test keeps the two equal.

use rusqlite::{Connection, OptionalExtension};

use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::PrefixStats;
use crate::store::StoreError;

/// SQL computing the prefix group of `name` (see the module docs).
macro_rules! group_of {
    ($name:literal) => {
        concat!(
            "rtrim(rtrim(",
            $name,
            ", replace(",
            $name,
            ", '-', '')), '-')"
        )
    };
}

const SCHEMA: &str = concat!(
    "CREATE TABLE prefix_stats (
        prefix TEXT    NOT NULL,
        status TEXT    NOT NULL,
        count  INTEGER NOT NULL,
        PRIMARY KEY (prefix, status)
    );
    -- INSERT OR REPLACE deletes the old row without firing DELETE triggers (recursive triggers
    -- are off), so the insert trigger takes the old row out of its group first.
    CREATE TRIGGER pool_prefix_stats_insert BEFORE INSERT ON pool BEGIN
        UPDATE prefix_stats SET count = count - 1
         WHERE (prefix, status) = (SELECT ",
    group_of!("name"),
    ", status FROM pool WHERE sandbox_id = NEW.sandbox_id);
        -- Not INSERT OR IGNORE: the outer INSERT OR REPLACE's conflict policy would override
        -- it and reset the counter.
        INSERT INTO prefix_stats (prefix, status, count) SELECT ",
    group_of!("NEW.name"),
    ", NEW.status, 0 WHERE NOT EXISTS (SELECT 1 FROM prefix_stats WHERE prefix = ",
    group_of!("NEW.name"),
    " AND status = NEW.status);
        UPDATE prefix_stats SET count = count + 1
         WHERE prefix = ",
    group_of!("NEW.name"),
    " AND status = NEW.status;
    END;
    CREATE TRIGGER pool_prefix_stats_delete AFTER DELETE ON pool BEGIN
        UPDATE prefix_stats SET count = count - 1
         WHERE prefix = ",
    group_of!("OLD.name"),
    " AND status = OLD.status;
    END;
    -- A store written before the counters existed: count its rows once.
    INSERT INTO prefix_stats (prefix, status, count)
        SELECT ",
    group_of!("name"),
    ", status, COUNT(*) FROM pool GROUP BY 1, 2;"
);

/// Creates the counters and their triggers on a store that has none yet (counting the rows it
/// already holds), in one transaction.
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
    }
    tx.commit().map_err(db_err)
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
        let status: SandboxStatus = status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("prefix_stats status: {e}")))?;
        stats.entry(prefix).or_default().by_status[status.index()] += count;
    }
    Ok(stats)
}

/// The group SQL computes for `name` (tests compare it with the Rust rule).
#[cfg(test)]
fn group_in_sql(conn: &Connection, name: &str) -> String {
    conn.query_row(
        concat!("SELECT ", group_of!("?1")),
        rusqlite::params![name],
        |r| r.get(0),
    )
    .unwrap_or_default()
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pool_prefix::pool_prefix;

    /// The SQL grouping equals the model's rule on awkward names.
    #[test]
    fn sql_group_equals_model_rule() {
        let conn = Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "lab-001",
            "aws-lab-007",
            "lab--7",
            "solo",
            "-x",
            "x-",
            "a-b-c-d",
            "ünï-cødé-9",
            "lab-a-a",
            "",
        ] {
            assert_eq!(group_in_sql(&conn, name), pool_prefix(name), "{name}");
        }
    }

    /// Rows written with INSERT OR REPLACE (as the store does) move exactly one count per row.
    #[test]
    fn triggers_follow_rows() {
        let mut conn = Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        conn.execute_batch(
            "CREATE TABLE pool (sandbox_id TEXT PRIMARY KEY, status TEXT NOT NULL, name TEXT NOT NULL);
             INSERT INTO pool VALUES ('0', 'available', 'old-0');",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        install(&mut conn).unwrap_or_else(|e| panic!("{e}"));
        let put = |conn: &Connection, id: &str, status: &str, name: &str| {
            conn.execute(
                "INSERT OR REPLACE INTO pool (sandbox_id, status, name) VALUES (?1, ?2, ?3)",
                rusqlite::params![id, status, name],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        };
        for i in 1..=3 {
            put(&conn, &i.to_string(), "available", &format!("lab-{i}"));
        }
        put(&conn, "2", "allocated", "lab-2");
        let stats = read(&conn).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats["lab"].get(SandboxStatus::Available), 2);
        assert_eq!(stats["lab"].get(SandboxStatus::Allocated), 1);
        assert_eq!(stats["old"].get(SandboxStatus::Available), 1, "backfilled");
        conn.execute("DELETE FROM pool", [])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(read(&conn).unwrap_or_else(|e| panic!("{e}")).is_empty());
    }
}
