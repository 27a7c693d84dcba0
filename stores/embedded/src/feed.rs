//! [`EventFeed`] for the embedded store: a range read of the `events_by_time (occurred_at,
//! event_id)` index. Stored times have a fixed width (`…T03:04:05.006Z`), so the row-value order of
//! `(occurred_at, event_id)` is the text order of the feed key `{occurred_at}#{event_id}`, and a
//! position splits at its first `#` into the two columns. The filter is pushed into SQL as exactly
//! the predicate of [`FeedFilter::matches`] (SQLite's JSON functions read the payload).
//!
//! [`EventLog`] is the log's own order (`events.position`): SQLite has one writer and assigns
//! positions inside the committing transaction, so a reader never sees a position filled in
//! behind one it has already read.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::OptionalExtension;

use super::event_store::{event_from_row, EVENT_COLUMNS};
use super::{db_err, EmbeddedStore};
use domain::audit::{feed_key, EventFeed, FeedPage, FeedQuery};
use domain::model::events::format_time;
use domain::model::ids::SANDBOX_STREAM_PREFIX;
use domain::store::EventLog;
use domain::store::StoreError;
use domain::EventEnvelope;

#[async_trait]
impl EventFeed for EmbeddedStore {
    async fn feed(&self, query: &FeedQuery, limit: usize) -> Result<FeedPage, StoreError> {
        let limit = limit.max(1);
        let (after_time, after_id) = match query.after.split_once('#') {
            Some((time, id)) => (time.to_string(), id.to_string()),
            None => (query.after.clone(), String::new()),
        };
        let until = format_time(&query.until);
        let filter = query.filter.clone();
        self.with_reader(move |conn, _| {
            let mut sql = format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE (occurred_at, event_id) > (?1, ?2) AND occurred_at < ?3"
            );
            let mut args: Vec<Box<dyn rusqlite::ToSql>> =
                vec![Box::new(after_time), Box::new(after_id), Box::new(until)];
            if let Some(event_type) = filter.event_type {
                args.push(Box::new(event_type));
                sql.push_str(&format!(" AND event_type = ?{}", args.len()));
            }
            if let Some(caller) = filter.caller {
                args.push(Box::new(format!("track:{caller}")));
                let actor = args.len();
                args.push(Box::new(caller));
                sql.push_str(&format!(
                    " AND (actor = ?{actor} OR json_extract(payload, '$.caller') = ?{})",
                    args.len()
                ));
            }
            if let Some(sandbox_id) = filter.sandbox_id {
                args.push(Box::new(format!("{SANDBOX_STREAM_PREFIX}{sandbox_id}")));
                let stream = args.len();
                args.push(Box::new(sandbox_id));
                sql.push_str(&format!(
                    " AND (stream_id = ?{stream} OR json_extract(payload, '$.sandbox_id') = ?{})",
                    args.len()
                ));
            }
            args.push(Box::new(limit as i64));
            sql.push_str(&format!(
                " ORDER BY occurred_at, event_id LIMIT ?{}",
                args.len()
            ));
            let refs: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
            let mut stmt = conn.prepare_cached(&sql).map_err(db_err)?;
            let events = stmt
                .query_map(refs.as_slice(), |r| Ok(event_from_row(r, 0)))
                .map_err(db_err)?
                .map(|r| r.map_err(db_err)?)
                .collect::<Result<Vec<_>, _>>()?;
            // A full page may have more behind it; a short one ends the range (SQL filtered it
            // all, there is no read budget here).
            let next = if events.len() == limit {
                events.last().map(feed_key)
            } else {
                None
            };
            Ok(FeedPage { events, next })
        })
        .await
    }

    async fn first_event_time(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let first: Option<String> = self
            .with_reader(|conn, _| {
                conn.query_row(
                    "SELECT occurred_at FROM events ORDER BY occurred_at, event_id LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)
            })
            .await?;
        first
            .map(|raw| {
                DateTime::parse_from_rfc3339(&raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| StoreError::Corrupt(format!("occurred_at {raw}: {e}")))
            })
            .transpose()
    }
}

#[async_trait]
impl EventLog for EmbeddedStore {
    async fn read_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, EventEnvelope)>, StoreError> {
        EmbeddedStore::read_log(self, after, limit).await
    }

    async fn log_head(&self) -> Result<u64, StoreError> {
        EmbeddedStore::log_head(self).await
    }

    async fn log_position_before(&self, at: DateTime<Utc>) -> Result<u64, StoreError> {
        let at = format_time(&at);
        let first: Option<i64> = self
            .with_reader(move |conn, _| {
                // The by-time index bounds the range to the recent tail; MIN over it is the
                // earliest log position among the events stamped at or after `at`.
                conn.query_row(
                    "SELECT MIN(position) FROM events WHERE occurred_at >= ?1",
                    [at],
                    |r| r.get(0),
                )
                .map_err(db_err)
            })
            .await?;
        match first {
            Some(position) => Ok(u64::try_from(position).unwrap_or(1).saturating_sub(1)),
            None => EmbeddedStore::log_head(self).await,
        }
    }
}
