//! The embedded adapter: events, view, stats and checkpoints in one SQLite file (or in memory),
//! with the same semantics as the DynamoDB adapter — conditional appends keyed by
//! (stream, version), atomic multi-stream batches, version-conditioned view writes — plus a global
//! log position that the in-process projector tails.
//!
//! One write connection behind a mutex; view writes run with it on tokio's blocking pool so
//! request tasks never stall the runtime. A file store also opens [`READERS`] read-only
//! connections, each owned by a reader thread that takes reads from one shared queue: WAL lets
//! them read while the writer commits, so a strong load or a candidate page never waits behind
//! an fsync, and no blocking-pool thread convoys on the write connection's mutex. A read sees
//! every commit that finished before it started, which is every append that has returned
//! (in-memory stores, private to one connection, read through the write connection). Appends go
//! through one writer thread that **group-commits**: the appends
//! that queue up while a commit is being made durable are written in the next single
//! transaction, each append checking all its versions before it inserts anything, so each
//! append's version checks still decide its own success or conflict while the batch shares one
//! WAL fsync (ADR 0020). That is what lets the default
//! `synchronous = FULL` ([`Durability::Full`]: a commit answered is a commit that survives a
//! power loss) keep the throughput `NORMAL` had (ADR 0008).
//!
//! # Layout
//! The same rooms as the DynamoDB adapter, one per port:
//! - this module — opening, durability, the connection and [`EmbeddedStore`]'s log tail
//!   (`read_log`, `log_head`, `appended`);
//! - `event_store` — [`EventStore`](domain::store::EventStore): the group-committing writer
//!   thread, stream loads, the paged scan;
//! - `pool_view` — [`PoolView`](domain::store::PoolView): row reads, candidates, listings, the
//!   due index, stats;
//! - `view_store` — [`ViewStore`](domain::store::ViewStore): version-conditioned writes, chunks
//!   in one transaction, checkpoints, clear;
//! - `feed` — [`EventFeed`](domain::store::EventFeed) over the `events_by_time` index;
//! - `tables` — the schema;
//! - `subjects` — [`SubjectStore`](domain::store::SubjectStore): student ids and the salts of
//!   their pseudonyms, outside the log (ADR 0031).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use tokio::sync::Notify;

use domain::model::events::EventEnvelope;
use domain::store::StoreError;

mod event_store;
mod feed;
mod pool_view;
mod prefix_stats; // per-prefix counters, moved by the view writes (ADR 0018)
mod subjects;
mod tables;
mod view_store;

use event_store::{event_from_row, run_writer, EVENT_COLUMNS};
use tables::SCHEMA;

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

/// Prepared statements kept per connection (see `init`).
const STATEMENT_CACHE: usize = 128;

/// Reader connections (and threads) of a file store.
const READERS: usize = 2;

/// A read run on a reader thread with its connection.
type ReadJob = Box<dyn FnOnce(&mut Connection) + Send>;

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
    /// Set by [`EmbeddedStore::close`] while it holds `conn`; every write checks it under the same
    /// lock, so nothing reaches the WAL after the close has emptied it.
    closed: Arc<AtomicBool>,
    stats_shards: u32,
    appended: Notify,
    /// To the writer thread; dropping the last store drops it, which ends the thread.
    writer: Mutex<mpsc::Sender<WriteRequest>>,
    /// To the reader threads (file stores); dropping it ends them. `None`: reads use `conn`.
    readers: Option<mpsc::Sender<ReadJob>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("stats_shards", &self.inner.stats_shards)
            .finish_non_exhaustive()
    }
}

/// What a write answers once [`EmbeddedStore::close`] has run.
fn closed_error() -> StoreError {
    StoreError::Unavailable("the store is closed (the service is stopping)".into())
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
        Self::init(conn, Some(path), stats_shards, durability)
    }

    /// A private in-memory database (tests, benchmarks).
    pub fn open_in_memory(stats_shards: u32) -> Result<Self, StoreError> {
        Self::init(
            Connection::open_in_memory().map_err(db_err)?,
            None,
            stats_shards,
            Durability::Full,
        )
    }

    /// Sets up the schema on `conn`, then the reader connections to `file` (a file store).
    fn init(
        mut conn: Connection,
        file: Option<&Path>,
        stats_shards: u32,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        // Every statement of the request and projector paths stays prepared: rusqlite's default
        // cache of 16 is smaller than the set those paths use, and an evicted statement is parsed
        // again on its next use.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        prefix_stats::install(&mut conn)?;
        conn.pragma_update(None, "synchronous", durability.pragma())
            .map_err(db_err)?;
        // Opened once the schema and WAL mode are in place.
        let readers = match file {
            Some(path) => Some(spawn_readers(
                (0..READERS)
                    .map(|_| open_reader(path))
                    .collect::<Result<Vec<_>, _>>()?,
            )?),
            None => None,
        };
        let conn = Arc::new(Mutex::new(conn));
        let closed = Arc::new(AtomicBool::new(false));
        let (writer, requests) = mpsc::channel();
        let writer_conn = Arc::clone(&conn);
        let writer_closed = Arc::clone(&closed);
        std::thread::Builder::new()
            .name("embedded-writer".into())
            .spawn(move || run_writer(&writer_conn, &writer_closed, &requests))
            .map_err(|e| StoreError::Unavailable(format!("start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                closed,
                stats_shards: stats_shards.max(1),
                appended: Notify::new(),
                writer: Mutex::new(writer),
                readers,
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
            if inner.closed.load(Ordering::SeqCst) {
                return Err(closed_error());
            }
            f(&mut conn, inner.stats_shards)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("blocking task: {e}")))?
    }

    /// Closes the store for writing and folds the write-ahead log back into the database file,
    /// leaving the WAL empty (`wal_checkpoint(TRUNCATE)`): what a clean stop owes the next start
    /// and anyone who copies or measures the file. Appends and view writes after this answer
    /// `Unavailable`; a second call only checkpoints again. A checkpoint that readers hold up is
    /// retried for up to `within`; `Err` if the WAL could not be emptied by then (nothing is lost:
    /// the next open replays the WAL).
    pub async fn close(&self, within: Duration) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = Self::lock(&inner);
            inner.closed.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + within;
            loop {
                // (busy, frames in the log, frames checkpointed); busy = 1 while a reader holds
                // a snapshot the checkpoint may not overwrite.
                let (busy, frames, done): (i64, i64, i64) = conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(db_err)?;
                if busy == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(StoreError::Unavailable(format!(
                        "the WAL could not be emptied at close: {done} of {frames} frames checkpointed, readers busy"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("blocking task: {e}")))?
    }

    /// Runs the read `f` on a reader thread (file stores) or like [`Self::with_conn`].
    async fn with_reader<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, u32) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(readers) = &self.inner.readers else {
            return self.with_conn(f).await;
        };
        let shards = self.inner.stats_shards;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            // The caller may have gone (its request was cancelled): nobody needs the answer.
            let _ = reply.send(f(conn, shards));
        });
        let stopped = || StoreError::Unavailable("the reader threads have stopped".into());
        readers.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Events after global log position `after`, in append order, with their positions: what the
    /// in-process projector tails.
    pub async fn read_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EventEnvelope)>, StoreError> {
        self.with_reader(move |conn, _| {
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
        self.with_reader(|conn, _| {
            conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|p| p as u64)
            .map_err(db_err)
        })
        .await
    }

    /// The durability settings in force on the connection that serves reads and appends:
    /// `PRAGMA synchronous` (2 = FULL) and `PRAGMA journal_mode` (`wal` for a file). Both are
    /// per-connection facts a file cannot show, so operators and tests ask the open store.
    pub async fn durability_pragmas(&self) -> Result<(i64, String), StoreError> {
        self.with_conn(|conn, _| {
            let synchronous = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(db_err)?;
            let journal_mode = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .map_err(db_err)?;
            Ok((synchronous, journal_mode))
        })
        .await
    }

    /// A future that resolves after the next successful append. Call `enable()` on it before
    /// reading the log, so an append that lands during the read still wakes the caller.
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.appended.notified()
    }
}

/// A read-only connection to the store file (see the module docs).
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // A read path that tried to write would fail here rather than bypass the writer.
    conn.pragma_update(None, "query_only", true)
        .map_err(db_err)?;
    Ok(conn)
}

/// Starts one reader thread per connection, all taking jobs from one queue (an idle reader takes
/// the next read, so one long listing does not hold up the reads queued behind it). The threads
/// end when the returned sender is dropped.
fn spawn_readers(connections: Vec<Connection>) -> Result<mpsc::Sender<ReadJob>, StoreError> {
    let (jobs, queue) = mpsc::channel::<ReadJob>();
    let queue = Arc::new(Mutex::new(queue));
    for (i, mut conn) in connections.into_iter().enumerate() {
        let queue = Arc::clone(&queue);
        std::thread::Builder::new()
            .name(format!("embedded-reader-{i}"))
            .spawn(move || loop {
                // The lock is held while waiting, so exactly one idle reader waits on the queue.
                let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(job) = job else { return };
                // A panicking read loses its own answer (its caller sees an error), not the thread.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
            })
            .map_err(|e| StoreError::Unavailable(format!("start a reader thread: {e}")))?;
    }
    Ok(jobs)
}

fn lock_conn(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(at: &Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::store::EventStore;

    use domain::store::append::test_envelope as env;

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

    /// A file store reads on its own connections: every append is visible to the load that
    /// follows it (a reader sees each commit that returned), and a read completes while the
    /// write connection is held — here by a job that lets go only once the read has answered,
    /// so a read that needed the write connection would never answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_see_returned_appends_and_do_not_wait_for_the_writer() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("readers-{}", uuid::Uuid::new_v4()));
        let store = EmbeddedStore::open(&dir.join("db"), 2)?;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let stream = format!("s{i}");
                store.append(vec![env(&stream, 1)]).await?;
                Ok::<usize, StoreError>(store.load(&stream).await?.len())
            }));
        }
        for task in tasks {
            let seen = task
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            assert_eq!(seen, 1, "a load after its append returned sees it");
        }
        let (read_done, released) = std::sync::mpsc::channel::<()>();
        let holder = store.clone();
        let held = tokio::spawn(async move {
            holder
                .with_conn(move |_, _| {
                    released
                        .recv_timeout(std::time::Duration::from_secs(30))
                        .map_err(|_| StoreError::Unavailable("the read never answered".into()))
                })
                .await
        });
        // The holder may not have the lock yet; either way the read must not depend on it.
        let events = tokio::time::timeout(std::time::Duration::from_secs(20), store.load("s7"))
            .await
            .map_err(|_| StoreError::Unavailable("the read waited for the writer".into()))??;
        assert_eq!(events.len(), 1);
        let _ = read_done.send(());
        held.await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// The reader connections refuse writes, so no path can bypass the writer's version checks.
    #[tokio::test]
    async fn reader_connections_are_read_only() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("readers-ro-{}", uuid::Uuid::new_v4()));
        let store = EmbeddedStore::open(&dir.join("db"), 2)?;
        let write = store
            .with_reader(|conn, _| conn.execute("DELETE FROM events", []).map_err(db_err))
            .await;
        assert!(write.is_err(), "a reader wrote: {write:?}");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Closing a file store empties its WAL into the database file, and every append after the
    /// close is refused, so the WAL stays empty; the events written before are all there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_empties_the_wal_and_refuses_later_writes() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("close-{}", uuid::Uuid::new_v4()));
        let path = dir.join("db");
        let wal = || std::fs::metadata(dir.join("db-wal")).map_or(0, |m| m.len());
        let store = EmbeddedStore::open(&path, 2)?;
        for v in 1..=50 {
            store.append(vec![env("s1", v)]).await?;
        }
        assert!(wal() > 0, "appends went to the WAL");
        store.close(Duration::from_secs(10)).await?;
        assert_eq!(wal(), 0, "the close left a WAL");
        let refused = store.append(vec![env("s1", 51)]).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        assert_eq!(wal(), 0, "a write reached the WAL after the close");
        drop(store);
        let reopened = EmbeddedStore::open(&path, 2)?;
        assert_eq!(reopened.load("s1").await?.len(), 50);
        drop(reopened);
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
