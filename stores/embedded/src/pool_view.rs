//! The pool view read side in SQLite: row reads, candidate picks, listings, the due index and the
//! summed stats shards.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::{corrupt, db_err, ms, EmbeddedStore};
use domain::model::lifecycle::SandboxStatus;
use domain::model::pool_prefix::PrefixStats;
use domain::model::projection::{PoolRow, PoolStats};
use domain::store::{
    decode_cursor, encode_cursor, CandidateQuery, ListCursor, ListFilter, PoolView, RowPage,
    StoreError, ViewStore,
};

pub(super) fn row_from_json(raw: String) -> Result<PoolRow, StoreError> {
    serde_json::from_str(&raw).map_err(corrupt)
}

pub(super) fn query_rows(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<PoolRow>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let raws = stmt
        .query_map(params, |r| r.get::<_, String>(0))
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    raws.into_iter().map(row_from_json).collect()
}

/// Upper bound of the names starting with `prefix` (UTF-8 byte order: nothing that starts with
/// `prefix` sorts at or above `prefix` followed by U+10FFFF).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

#[async_trait]
impl PoolView for EmbeddedStore {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.load_row(sandbox_id).await
    }

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        let query = query.clone();
        self.with_reader(move |conn, _| {
            let available = SandboxStatus::Available.as_str();
            let limit = query.limit as i64;
            match &query.prefix {
                None => {
                    let start = query.start_pick as i64;
                    let mut rows = query_rows(
                        conn,
                        "SELECT row FROM pool WHERE status = ?1 AND pick >= ?2 AND json_extract(row, '$.held_by') IS NULL ORDER BY pick LIMIT ?3",
                        &[&available, &start, &limit],
                    )?;
                    if rows.len() < query.limit {
                        let rest = limit - rows.len() as i64;
                        rows.extend(query_rows(
                            conn,
                            "SELECT row FROM pool WHERE status = ?1 AND pick < ?2 AND json_extract(row, '$.held_by') IS NULL ORDER BY pick LIMIT ?3",
                            &[&available, &start, &rest],
                        )?);
                    }
                    Ok(rows)
                }
                Some(prefix) => {
                    let end = prefix_end(prefix);
                    let after = query.after_name.clone().unwrap_or_default();
                    let mut rows = query_rows(
                        conn,
                        "SELECT row FROM pool WHERE status = ?1 AND name >= ?2 AND name < ?3 AND name > ?4 AND json_extract(row, '$.held_by') IS NULL ORDER BY name LIMIT ?5",
                        &[&available, prefix, &end, &after, &limit],
                    )?;
                    if rows.len() < query.limit && !after.is_empty() {
                        let rest = limit - rows.len() as i64;
                        rows.extend(query_rows(
                            conn,
                            "SELECT row FROM pool WHERE status = ?1 AND name >= ?2 AND name <= ?3 AND json_extract(row, '$.held_by') IS NULL ORDER BY name LIMIT ?4",
                            &[&available, prefix, &after, &rest],
                        )?);
                    }
                    Ok(rows)
                }
            }
        })
        .await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let after = cursor.map(decode_cursor::<ListCursor>).transpose()?;
        let filter = filter.clone();
        self.with_reader(move |conn, _| {
            let mut sql = String::from("SELECT row FROM pool WHERE 1 = 1");
            let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
            if let Some(status) = filter.status {
                args.push(Box::new(status.as_str().to_string()));
                sql.push_str(&format!(" AND status = ?{}", args.len()));
            }
            if let Some(owner) = &filter.owner {
                args.push(Box::new(owner.clone()));
                sql.push_str(&format!(" AND owner = ?{}", args.len()));
            }
            if let Some(prefix) = &filter.prefix {
                args.push(Box::new(prefix.clone()));
                sql.push_str(&format!(" AND name >= ?{}", args.len()));
                args.push(Box::new(prefix_end(prefix)));
                sql.push_str(&format!(" AND name < ?{}", args.len()));
            }
            if let Some(after) = &after {
                args.push(Box::new(after.after.clone()));
                let a = args.len();
                args.push(Box::new(after.id.clone()));
                sql.push_str(&format!(
                    " AND (name, sandbox_id) > (?{a}, ?{})",
                    args.len()
                ));
            }
            args.push(Box::new(limit as i64));
            sql.push_str(&format!(" ORDER BY name, sandbox_id LIMIT ?{}", args.len()));
            let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
            let rows = query_rows(conn, &sql, &refs)?;
            let cursor = if rows.len() == limit {
                rows.last().and_then(|r| {
                    encode_cursor(&ListCursor {
                        after: r.name.clone(),
                        id: r.sandbox_id.clone(),
                    })
                })
            } else {
                None
            };
            Ok(RowPage { rows, cursor })
        })
        .await
    }

    async fn due(
        &self,
        status: SandboxStatus,
        before: DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        let after = cursor.map(decode_cursor::<ListCursor>).transpose()?;
        let (after_due, after_id) = match &after {
            Some(c) => (
                c.after
                    .parse::<i64>()
                    .map_err(|_| StoreError::InvalidCursor)?,
                c.id.clone(),
            ),
            None => (i64::MIN, String::new()),
        };
        let before_ms = before.timestamp_millis();
        self.with_reader(move |conn, _| {
            let rows = query_rows(
                conn,
                "SELECT row FROM pool WHERE status = ?1 AND due_at <= ?2 AND (due_at, sandbox_id) > (?3, ?4) ORDER BY due_at, sandbox_id LIMIT ?5",
                &[&status.as_str(), &before_ms, &after_due, &after_id, &(limit as i64)],
            )?;
            let cursor = if rows.len() == limit {
                rows.last().and_then(|r| {
                    encode_cursor(&ListCursor {
                        after: ms(&r.due_at).unwrap_or_default().to_string(),
                        id: r.sandbox_id.clone(),
                    })
                })
            } else {
                None
            };
            Ok(RowPage { rows, cursor })
        })
        .await
    }

    async fn stats(&self) -> Result<PoolStats, StoreError> {
        self.with_reader(|conn, _| {
            let mut stmt = conn
                .prepare_cached("SELECT status, SUM(count) FROM stats GROUP BY status")
                .map_err(db_err)?;
            let mut stats = PoolStats::default();
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err)?;
            for row in rows {
                let (status, count) = row.map_err(db_err)?;
                let status: SandboxStatus = status.parse().map_err(corrupt)?;
                stats.by_status[status.index()] += count;
            }
            Ok(stats)
        })
        .await
    }

    async fn stats_by_prefix(&self) -> Result<PrefixStats, StoreError> {
        self.with_reader(|conn, _| super::prefix_stats::read(conn))
            .await
    }
}
