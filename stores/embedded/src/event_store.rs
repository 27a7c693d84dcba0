//! The event store in SQLite: appends queue for one writer thread that group-commits them, each
//! append checking its versions before it inserts, so every append still decides its own
//! conflict; strong stream loads and the paged full scan.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{closed_error, corrupt, db_err, lock_conn, EmbeddedStore, WriteRequest, MAX_GROUP};
use domain::model::events::EventEnvelope;
use domain::store::{
    decode_cursor, encode_cursor, validate_append, EventPage, EventStore, ListCursor, StoreError,
};

/// The writer thread: takes every append queued so far (up to [`MAX_GROUP`]) and commits them
/// together; ends when the last store handle is dropped. Once the store is closed (checked under
/// the connection's lock, which the close holds while it empties the WAL) every append fails.
pub(super) fn run_writer(
    conn: &Mutex<Connection>,
    closed: &AtomicBool,
    requests: &mpsc::Receiver<WriteRequest>,
) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let results = {
            let mut conn = lock_conn(conn);
            if closed.load(Ordering::SeqCst) {
                group.iter().map(|_| Err(closed_error())).collect()
            } else {
                commit_group(&mut conn, &group)
            }
        };
        for (request, result) in group.into_iter().zip(results) {
            // The caller may have gone (its request was cancelled); its outcome stands anyway.
            let _ = request.reply.send(result);
        }
    }
}

/// One transaction for the whole group. Each append checks all its streams' versions before it
/// inserts anything, so a conflict leaves nothing of that append behind and needs no savepoint
/// (a savepoint per append cost a statement parse and a sub-journal page copy each). The checks of
/// a later append see the inserts of an earlier one in the same group, so two appends to one
/// stream in one group still conflict. An insert that fails after its checks passed (the store
/// itself failing) leaves a partial append in the transaction: the whole group is rolled back and
/// every append of it fails, none half-written.
fn commit_group(conn: &mut Connection, group: &[WriteRequest]) -> Vec<Result<(), StoreError>> {
    let all_failed = |e: &StoreError| group.iter().map(|_| Err(e.clone())).collect();
    // IMMEDIATE takes the write lock up front, so the version checks below and the inserts see
    // the same state: a check that passes cannot be invalidated before commit.
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return all_failed(&db_err(e)),
    };
    let mut results = Vec::with_capacity(group.len());
    for request in group {
        match append_checked(&tx, &request.firsts, &request.events) {
            Ok(()) => results.push(Ok(())),
            Err(conflict @ StoreError::VersionConflict { .. }) => results.push(Err(conflict)),
            // Dropping the transaction rolls the whole group back.
            Err(e) => return all_failed(&e),
        }
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => all_failed(&db_err(e)),
    }
}

/// Checks each stream's expected version, then inserts the batch (inside the caller's
/// transaction). A version conflict is found before the first insert.
fn append_checked(
    tx: &Connection,
    firsts: &[(String, u64)],
    events: &[EventEnvelope],
) -> Result<(), StoreError> {
    let mut current_version = tx
        .prepare_cached("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?1")
        .map_err(db_err)?;
    for (stream_id, first) in firsts {
        let current: i64 = current_version
            .query_row(params![stream_id], |r| r.get(0))
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
                domain::model::events::format_time(&e.occurred_at),
                e.actor,
                e.request_id,
                e.correlation_id,
                e.payload.to_string(),
            ])
            .map_err(db_err)?;
    }
    Ok(())
}

pub(super) const EVENT_COLUMNS: &str = "stream_id, version, event_type, schema_version, event_id, occurred_at, actor, request_id, correlation_id, payload";

pub(super) fn event_from_row(
    r: &rusqlite::Row<'_>,
    at: usize,
) -> Result<EventEnvelope, StoreError> {
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

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn load_after(
        &self,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let stream_id = stream_id.to_string();
        self.with_reader(move |conn, _| {
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
        self.with_reader(move |conn, _| {
            conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ?1 ORDER BY version DESC LIMIT 1"
            ))
            .map_err(db_err)?
            .query_row(params![stream_id], |r| Ok(event_from_row(r, 0)))
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
        let firsts = validate_append(&events)?;
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
        self.with_reader(move |conn, _| {
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
