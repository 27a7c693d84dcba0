//! [`SubjectStore`] on SQLite: the `subjects` table (one row per student, keyed by the keyed hash
//! of the id) and `erased_subjects` (the tombstones). Neither is part of the event log, so an
//! erasure deletes a row and rewrites nothing else (ADR 0031).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use domain::store::{Erasure, PseudonymStatus, StoreError, SubjectRecord, SubjectStore};

use super::{corrupt, db_err, EmbeddedStore};

fn time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(corrupt)
}

fn read_subject(conn: &Connection, subject_key: &str) -> Result<Option<SubjectRecord>, StoreError> {
    let row = conn
        .query_row(
            "SELECT subject_key, pseudonym, salt, student_id, created_at FROM subjects
             WHERE subject_key = ?1",
            params![subject_key],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?;
    row.map(|(subject_key, pseudonym, salt, student_id, created_at)| {
        Ok(SubjectRecord {
            subject_key,
            pseudonym,
            salt,
            student_id,
            created_at: time(&created_at)?,
        })
    })
    .transpose()
}

#[async_trait]
impl SubjectStore for EmbeddedStore {
    async fn subject(&self, subject_key: &str) -> Result<Option<SubjectRecord>, StoreError> {
        let subject_key = subject_key.to_string();
        self.with_reader(move |conn, _| read_subject(conn, &subject_key))
            .await
    }

    async fn create_subject(&self, record: &SubjectRecord) -> Result<SubjectRecord, StoreError> {
        let record = record.clone();
        self.with_conn(move |conn, _| {
            // One statement under the write lock: of two first requests for one student, the
            // second inserts nothing and reads the first one's record.
            conn.execute(
                "INSERT INTO subjects (subject_key, pseudonym, salt, student_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (subject_key) DO NOTHING",
                params![
                    record.subject_key,
                    record.pseudonym,
                    record.salt,
                    record.student_id,
                    record.created_at.to_rfc3339()
                ],
            )
            .map_err(db_err)?;
            read_subject(conn, &record.subject_key)?.ok_or_else(|| {
                StoreError::Unavailable("the subject record vanished while it was written".into())
            })
        })
        .await
    }

    async fn pseudonym_status(
        &self,
        pseudonym: &str,
    ) -> Result<Option<PseudonymStatus>, StoreError> {
        let pseudonym = pseudonym.to_string();
        self.with_reader(move |conn, _| {
            let linked = conn
                .query_row(
                    "SELECT student_id, created_at FROM subjects WHERE pseudonym = ?1",
                    params![pseudonym],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
                .map_err(db_err)?;
            if let Some((student_id, created_at)) = linked {
                return Ok(Some(PseudonymStatus::Linked {
                    student_id,
                    created_at: time(&created_at)?,
                }));
            }
            let erased = conn
                .query_row(
                    "SELECT erased_at FROM erased_subjects WHERE pseudonym = ?1",
                    params![pseudonym],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map_err(db_err)?;
            erased
                .map(|at| {
                    Ok(PseudonymStatus::Erased {
                        erased_at: time(&at)?,
                    })
                })
                .transpose()
        })
        .await
    }

    async fn erase_subject(
        &self,
        subject_key: &str,
        erased_at: DateTime<Utc>,
    ) -> Result<Option<Erasure>, StoreError> {
        let subject_key = subject_key.to_string();
        self.with_conn(move |conn, _| {
            // The delete and the tombstone commit together: no moment shows the pseudonym as
            // never issued.
            let tx = conn.transaction().map_err(db_err)?;
            let pseudonym: Option<String> = tx
                .query_row(
                    "DELETE FROM subjects WHERE subject_key = ?1 RETURNING pseudonym",
                    params![subject_key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let Some(pseudonym) = pseudonym else {
                return Ok(None);
            };
            tx.execute(
                "INSERT INTO erased_subjects (pseudonym, erased_at) VALUES (?1, ?2)
                 ON CONFLICT (pseudonym) DO NOTHING",
                params![pseudonym, erased_at.to_rfc3339()],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(Some(Erasure {
                pseudonym,
                erased_at,
            }))
        })
        .await
    }
}
