//! The embedded adapter: events, view, stats and checkpoints in one SQLite file (or in memory),
//! with the same semantics as the DynamoDB adapter — conditional appends keyed by
//! (stream, version), atomic multi-stream batches, version-conditioned view writes — plus a global
//! log position that the in-process projector tails.
//!
//! One connection behind a mutex; reads run on tokio's blocking pool so request tasks never
//! stall the runtime. Appends go through one writer thread that **group-commits**: the appends
//! that queue up while a commit is being made durable are written in the next single
//! transaction, each inside its own savepoint, so each append's version checks still decide its
//! own success or conflict while the batch shares one WAL fsync. That is what lets the default
//! `synchronous = FULL` ([`Durability::Full`]: a commit answered is a commit that survives a
//! power loss) keep the throughput `NORMAL` had (ADR 0008).

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::Notify;

use crate::model::events::EventEnvelope;
use crate::model::lifecycle::SandboxStatus;
use crate::model::pool_prefix::PrefixStats;
use crate::model::projection::{PoolRow, PoolStats, StatsDelta};
use crate::store::batch::{BatchLimits, ViewChunk};
use crate::store::{
    decode_cursor, encode_cursor, stats_shard, CandidateQuery, EventPage, EventStore, ListCursor,
    ListFilter, PoolView, RowPage, StoreError, ViewStore, MAX_TRANSACTION_ITEMS,
};

#[path = "embedded_feed.rs"]
mod feed; // EventFeed (audit): the events_by_time index

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    occurred_at    TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    request_id     TEXT,
    correlation_id TEXT,
    payload        TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (occurred_at, event_id);
CREATE TABLE IF NOT EXISTS pool (
    sandbox_id   TEXT PRIMARY KEY,
    status       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    owner        TEXT,
    allocated_at INTEGER,
    due_at       INTEGER,
    pick         INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    row          TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_by_status_pick ON pool (status, pick);
CREATE INDEX IF NOT EXISTS pool_by_status_name ON pool (status, name, sandbox_id);
CREATE INDEX IF NOT EXISTS pool_by_owner ON pool (owner, allocated_at);
CREATE INDEX IF NOT EXISTS pool_by_status_expiry ON pool (status, due_at, sandbox_id);
CREATE TABLE IF NOT EXISTS stats (
    shard  INTEGER NOT NULL,
    status TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (shard, status)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source   TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
";

/// How far a commit is made durable before `append` returns: SQLite's `synchronous` setting in
/// WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = FULL`: the WAL is synced at every commit, so an append that returned
    /// survives a power loss or an OS crash. The default.
    #[default]
    Full,
    /// `synchronous = NORMAL`: the WAL is synced only at checkpoints; a power loss can roll back
    /// the last commits although their appends returned (a process crash cannot). For benches.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// Appends one group commit takes at most (bounds the time the connection is held).
const MAX_GROUP: usize = 256;

/// One append waiting for the writer thread.
struct WriteRequest {
    events: Vec<EventEnvelope>,
    firsts: Vec<(String, u64)>,
    reply: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Events, view and stats in one local SQLite database. Cheap to clone (shared connection).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Mutex<Connection>>,
    stats_shards: u32,
    appended: Notify,
    /// To the writer thread; dropping the last store drops it, which ends the thread.
    writer: Mutex<mpsc::Sender<WriteRequest>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("stats_shards", &self.inner.stats_shards)
            .finish_non_exhaustive()
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database file at `path`, with [`Durability::Full`].
    pub fn open(path: &Path, stats_shards: u32) -> Result<Self, StoreError> {
        Self::open_with(path, stats_shards, Durability::Full)
    }

    /// Opens (creating if needed) the database file at `path` with the given durability.
    pub fn open_with(
        path: &Path,
        stats_shards: u32,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(db_err)?;
        Self::init(conn, stats_shards, durability)
    }

    /// A private in-memory database (tests, benchmarks).
    pub fn open_in_memory(stats_shards: u32) -> Result<Self, StoreError> {
        Self::init(
            Connection::open_in_memory().map_err(db_err)?,
            stats_shards,
            Durability::Full,
        )
    }

    fn init(
        mut conn: Connection,
        stats_shards: u32,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        super::embedded_prefix_stats::install(&mut conn)?;
        conn.pragma_update(None, "synchronous", durability.pragma())
            .map_err(db_err)?;
        let conn = Arc::new(Mutex::new(conn));
        let (writer, requests) = mpsc::channel();
        let writer_conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("embedded-writer".into())
            .spawn(move || run_writer(&writer_conn, &requests))
            .map_err(|e| StoreError::Unavailable(format!("start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                stats_shards: stats_shards.max(1),
                appended: Notify::new(),
                writer: Mutex::new(writer),
            }),
        })
    }

    fn lock(inner: &Inner) -> MutexGuard<'_, Connection> {
        lock_conn(&inner.conn)
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, u32) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = Self::lock(&inner);
            f(&mut conn, inner.stats_shards)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("blocking task: {e}")))?
    }

    /// Events after global log position `after`, in append order, with their positions: what the
    /// in-process projector tails.
    pub async fn read_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EventEnvelope)>, StoreError> {
        self.with_conn(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT position, {EVENT_COLUMNS} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2"
                ))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![after as i64, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, event_from_row(r, 1)))
                })
                .map_err(db_err)?;
            rows.map(|r| {
                let (pos, env) = r.map_err(db_err)?;
                Ok((pos, env?))
            })
            .collect()
        })
        .await
    }

    /// The newest log position (0 when empty).
    pub async fn log_head(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn, _| {
            conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|p| p as u64)
            .map_err(db_err)
        })
        .await
    }

    /// A future that resolves after the next successful append. Call `enable()` on it before
    /// reading the log, so an append that lands during the read still wakes the caller.
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.appended.notified()
    }
}

fn lock_conn(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread: takes every append queued so far (up to [`MAX_GROUP`]) and commits them
/// together; ends when the last store handle is dropped.
fn run_writer(conn: &Mutex<Connection>, requests: &mpsc::Receiver<WriteRequest>) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let results = commit_group(&mut lock_conn(conn), &group);
        for (request, result) in group.into_iter().zip(results) {
            // The caller may have gone (its request was cancelled); its outcome stands anyway.
            let _ = request.reply.send(result);
        }
    }
}

/// One transaction for the whole group; each append in its own savepoint, so a conflict rolls
/// back only that append. If the commit itself fails, every append of the group fails.
fn commit_group(conn: &mut Connection, group: &[WriteRequest]) -> Vec<Result<(), StoreError>> {
    let all_failed = |e: &StoreError| group.iter().map(|_| Err(e.clone())).collect();
    // IMMEDIATE takes the write lock up front, so the version checks below and the inserts see
    // the same state: a check that passes cannot be invalidated before commit.
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return all_failed(&db_err(e)),
    };
    let mut results = Vec::with_capacity(group.len());
    for request in group {
        let outcome = tx.savepoint().map_err(db_err).and_then(|savepoint| {
            append_checked(&savepoint, &request.firsts, &request.events)?;
            savepoint.commit().map_err(db_err)
        });
        // A savepoint dropped without commit rolls back: nothing of a refused append remains.
        results.push(outcome);
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => all_failed(&db_err(e)),
    }
}

/// Checks each stream's expected version, then inserts the batch (inside the caller's
/// transaction or savepoint).
fn append_checked(
    tx: &Connection,
    firsts: &[(String, u64)],
    events: &[EventEnvelope],
) -> Result<(), StoreError> {
    for (stream_id, first) in firsts {
        let current: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?1",
                params![stream_id],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if current as u64 + 1 != *first {
            return Err(StoreError::VersionConflict {
                stream_id: stream_id.clone(),
            });
        }
    }
    let mut insert = tx
        .prepare_cached(&format!(
            "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))
        .map_err(db_err)?;
    for e in events {
        insert
            .execute(params![
                e.stream_id,
                e.version as i64,
                e.event_type,
                e.schema_version as i64,
                e.event_id.to_string(),
                crate::model::events::format_time(&e.occurred_at),
                e.actor,
                e.request_id,
                e.correlation_id,
                e.payload.to_string(),
            ])
            .map_err(db_err)?;
    }
    Ok(())
}

const EVENT_COLUMNS: &str = "stream_id, version, event_type, schema_version, event_id, occurred_at, actor, request_id, correlation_id, payload";

fn event_from_row(r: &rusqlite::Row<'_>, at: usize) -> Result<EventEnvelope, StoreError> {
    let get_s = |i: usize| r.get::<_, String>(at + i).map_err(db_err);
    let event_id = uuid::Uuid::parse_str(&get_s(4)?).map_err(corrupt)?;
    let occurred_at = DateTime::parse_from_rfc3339(&get_s(5)?)
        .map_err(corrupt)?
        .with_timezone(&Utc);
    let payload = serde_json::from_str(&get_s(9)?).map_err(corrupt)?;
    Ok(EventEnvelope {
        stream_id: get_s(0)?,
        version: r.get::<_, i64>(at + 1).map_err(db_err)? as u64,
        event_type: get_s(2)?,
        schema_version: r.get::<_, i64>(at + 3).map_err(db_err)? as u32,
        event_id,
        occurred_at,
        actor: get_s(6)?,
        request_id: r.get(at + 7).map_err(db_err)?,
        correlation_id: r.get(at + 8).map_err(db_err)?,
        payload,
    })
}

/// Checks a batch before any write: size limit, and versions consecutive (≥ 1) per stream.
/// Returns the first version each stream's part of the batch expects to take.
pub fn validate_batch(events: &[EventEnvelope]) -> Result<Vec<(String, u64)>, StoreError> {
    if events.len() > MAX_TRANSACTION_ITEMS {
        return Err(StoreError::TooManyItems(events.len()));
    }
    let mut firsts: Vec<(String, u64, u64)> = Vec::new();
    for e in events {
        if e.version == 0 {
            return Err(StoreError::InvalidAppend(format!(
                "{}: versions start at 1",
                e.stream_id
            )));
        }
        match firsts.iter_mut().find(|(s, _, _)| *s == e.stream_id) {
            Some((_, _, last)) if e.version == *last + 1 => *last = e.version,
            Some(_) => {
                return Err(StoreError::InvalidAppend(format!(
                    "{}: versions in a batch must be consecutive",
                    e.stream_id
                )))
            }
            None => firsts.push((e.stream_id.clone(), e.version, e.version)),
        }
    }
    Ok(firsts.into_iter().map(|(s, first, _)| (s, first)).collect())
}

fn ms(at: &Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|t| t.timestamp_millis())
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let stream_id = stream_id.to_string();
        self.with_conn(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ?1 AND version > ?2 ORDER BY version"
                ))
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![stream_id, after as i64], |r| Ok(event_from_row(r, 0)))
                .map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?).collect()
        })
        .await
    }

    async fn load_latest(&self, stream_id: &str) -> Result<Option<EventEnvelope>, StoreError> {
        let stream_id = stream_id.to_string();
        self.with_conn(move |conn, _| {
            conn.query_row(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ?1 ORDER BY version DESC LIMIT 1"
                ),
                params![stream_id],
                |r| Ok(event_from_row(r, 0)),
            )
            .optional()
            .map_err(db_err)?
            .transpose()
        })
        .await
    }

    async fn append(&self, events: Vec<EventEnvelope>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let firsts = validate_batch(&events)?;
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let request = WriteRequest {
            events,
            firsts,
            reply,
        };
        let sent = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(request);
        if sent.is_err() {
            return Err(StoreError::Unavailable(
                "the writer thread has stopped".into(),
            ));
        }
        outcome
            .await
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))??;
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn scan(
        &self,
        segment: u32,
        _segments: u32,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        // One file, one reader: everything is in segment 0.
        if segment != 0 {
            return Ok(EventPage::default());
        }
        let after: ListCursor = match &cursor {
            Some(c) => decode_cursor(c)?,
            None => ListCursor {
                after: String::new(),
                id: "0".into(),
            },
        };
        let after_version: i64 = after.id.parse().map_err(|_| StoreError::InvalidCursor)?;
        self.with_conn(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE (stream_id, version) > (?1, ?2) ORDER BY stream_id, version LIMIT ?3"
                ))
                .map_err(db_err)?;
            let events = stmt
                .query_map(params![after.after, after_version, limit as i64], |r| {
                    Ok(event_from_row(r, 0))
                })
                .map_err(db_err)?
                .map(|r| r.map_err(db_err)?)
                .collect::<Result<Vec<_>, _>>()?;
            let cursor = if events.len() == limit {
                events.last().and_then(|e| {
                    encode_cursor(&ListCursor {
                        after: e.stream_id.clone(),
                        id: e.version.to_string(),
                    })
                })
            } else {
                None
            };
            Ok(EventPage { events, cursor })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|conn, _| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
            .await
    }
}

/// Sandbox ids per `IN (…)` query of `load_rows`.
const LOAD_ROWS_PER_QUERY: usize = 500;

fn row_from_json(raw: String) -> Result<PoolRow, StoreError> {
    serde_json::from_str(&raw).map_err(corrupt)
}

fn query_rows(
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
        self.with_conn(move |conn, _| {
            let available = SandboxStatus::Available.as_str();
            let limit = query.limit as i64;
            match &query.prefix {
                None => {
                    let start = query.start_pick as i64;
                    let mut rows = query_rows(
                        conn,
                        "SELECT row FROM pool WHERE status = ?1 AND pick >= ?2 ORDER BY pick LIMIT ?3",
                        &[&available, &start, &limit],
                    )?;
                    if rows.len() < query.limit {
                        let rest = limit - rows.len() as i64;
                        rows.extend(query_rows(
                            conn,
                            "SELECT row FROM pool WHERE status = ?1 AND pick < ?2 ORDER BY pick LIMIT ?3",
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
                        "SELECT row FROM pool WHERE status = ?1 AND name >= ?2 AND name < ?3 AND name > ?4 ORDER BY name LIMIT ?5",
                        &[&available, prefix, &end, &after, &limit],
                    )?;
                    if rows.len() < query.limit && !after.is_empty() {
                        let rest = limit - rows.len() as i64;
                        rows.extend(query_rows(
                            conn,
                            "SELECT row FROM pool WHERE status = ?1 AND name >= ?2 AND name <= ?3 ORDER BY name LIMIT ?4",
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
        self.with_conn(move |conn, _| {
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
        self.with_conn(move |conn, _| {
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
        self.with_conn(|conn, _| {
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
        self.with_conn(|conn, _| super::embedded_prefix_stats::read(conn))
            .await
    }
}

#[async_trait]
impl ViewStore for EmbeddedStore {
    async fn load_row(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        let sandbox_id = sandbox_id.to_string();
        self.with_conn(move |conn, _| {
            conn.query_row(
                "SELECT row FROM pool WHERE sandbox_id = ?1",
                params![sandbox_id],
                |r| r.get::<_, String>(0),
            )
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
        let row = row.clone();
        let delta = *delta;
        self.with_conn(move |conn, shards| {
            let json = serde_json::to_string(&row).map_err(corrupt)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM pool WHERE sandbox_id = ?1",
                    params![row.sandbox_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            if current.map(|v| v as u64) != expected_version {
                return Err(StoreError::VersionConflict {
                    stream_id: row.sandbox_id.clone(),
                });
            }
            tx.execute(
                "INSERT OR REPLACE INTO pool (sandbox_id, status, name, owner, allocated_at, due_at, pick, version, row)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    row.sandbox_id,
                    row.status.as_str(),
                    row.name,
                    row.owner,
                    ms(&row.allocated_at),
                    ms(&row.due_at),
                    row.pick as i64,
                    row.version as i64,
                    json
                ],
            )
            .map_err(db_err)?;
            let shard = stats_shard(&row.sandbox_id, shards) as i64;
            for status in SandboxStatus::ALL {
                let d = delta.0[status.index()];
                if d != 0 {
                    tx.execute(
                        "INSERT INTO stats (shard, status, count) VALUES (?1, ?2, ?3)
                         ON CONFLICT (shard, status) DO UPDATE SET count = count + excluded.count",
                        params![shard, status.as_str(), d],
                    )
                    .map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        })
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
        self.with_conn(move |conn, _| {
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
        self.with_conn(move |conn, shards| {
            let stats = chunk.stats_by_shard(shards);
            // IMMEDIATE: the version checks and the writes see one state, and the whole chunk
            // (rows, summed stats, checkpoint) commits or rolls back together.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            {
                let mut version_of = tx
                    .prepare_cached("SELECT version FROM pool WHERE sandbox_id = ?1")
                    .map_err(db_err)?;
                let mut put = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO pool (sandbox_id, status, name, owner, allocated_at, due_at, pick, version, row)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )
                    .map_err(db_err)?;
                for change in &chunk.rows {
                    let row = &change.row;
                    let current: Option<i64> = version_of
                        .query_row(params![row.sandbox_id], |r| r.get(0))
                        .optional()
                        .map_err(db_err)?;
                    if current.map(|v| v as u64) != change.expected_version {
                        // Dropping the transaction rolls back everything of the chunk.
                        return Err(StoreError::VersionConflict {
                            stream_id: row.sandbox_id.clone(),
                        });
                    }
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
                    tx.execute(
                        "INSERT INTO checkpoints (source, position) VALUES (?1, ?2)
                         ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                        params![checkpoint.source, checkpoint.position],
                    )
                    .map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, StoreError> {
        let source = source.to_string();
        self.with_conn(move |conn, _| {
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

    async fn clear(&self) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            conn.execute_batch("DELETE FROM pool; DELETE FROM stats; DELETE FROM checkpoints;")
                .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::events::SyncEvent;
    use crate::model::events::{Actor, CommandMeta};

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

    /// Batches with gaps, zero versions or over 100 items are refused before touching storage.
    #[test]
    fn batch_validation() {
        assert!(validate_batch(&[env("a", 1), env("a", 2), env("b", 4)]).is_ok());
        assert!(matches!(
            validate_batch(&[env("a", 1), env("a", 3)]),
            Err(StoreError::InvalidAppend(_))
        ));
        assert!(matches!(
            validate_batch(&[env("a", 0)]),
            Err(StoreError::InvalidAppend(_))
        ));
        let many: Vec<_> = (1..=101).map(|v| env("a", v)).collect();
        assert_eq!(validate_batch(&many), Err(StoreError::TooManyItems(101)));
    }

    /// Appends that arrive together are committed together, yet each decides its own outcome:
    /// of 40 concurrent appends of version 1 to one stream exactly one wins and the rest
    /// conflict, while 40 appends to fresh streams (and the one mixed batch) all succeed and
    /// nothing of a refused append is stored. A file store runs with `synchronous = FULL`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_keeps_each_appends_outcome() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("group-commit-{}", uuid::Uuid::new_v4()));
        let store = EmbeddedStore::open(&dir.join("db"), 2)?;
        let synchronous: i64 = store
            .with_conn(|conn, _| {
                conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await?;
        assert_eq!(synchronous, 2, "FULL");
        let mut tasks = Vec::new();
        for i in 0..40 {
            let contended = store.clone();
            tasks.push(tokio::spawn(async move {
                contended.append(vec![env("sync#hot", 1)]).await
            }));
            let free = store.clone();
            tasks.push(tokio::spawn(async move {
                free.append(vec![env(&format!("s{i}"), 1), env(&format!("s{i}"), 2)])
                    .await
            }));
        }
        let mut won = 0;
        let mut conflicts = 0;
        for task in tasks {
            match task
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
            {
                Ok(()) => won += 1,
                Err(StoreError::VersionConflict { stream_id }) => {
                    assert_eq!(stream_id, "sync#hot");
                    conflicts += 1;
                }
                Err(e) => return Err(e),
            }
        }
        assert_eq!((won, conflicts), (41, 39));
        assert_eq!(store.load("sync#hot").await?.len(), 1);
        for i in 0..40 {
            assert_eq!(store.load(&format!("s{i}")).await?.len(), 2);
        }
        assert_eq!(store.read_log(0, 1000).await?.len(), 81);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// The log tail sees appends in order with increasing positions.
    #[tokio::test]
    async fn log_positions_increase() -> Result<(), StoreError> {
        let store = EmbeddedStore::open_in_memory(2)?;
        store.append(vec![env("sync#csp", 1)]).await?;
        store.append(vec![env("sync#csp", 2)]).await?;
        let log = store.read_log(0, 10).await?;
        assert_eq!(log.len(), 2);
        assert!(log[0].0 < log[1].0);
        assert_eq!(store.read_log(log[0].0, 10).await?.len(), 1);
        assert_eq!(store.log_head().await?, log[1].0);
        Ok(())
    }
}
