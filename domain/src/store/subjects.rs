//! The subjects port: the one place a student's id is kept, outside the event log, so it can be
//! erased without rewriting the log (docs/personal-data.md, ADR 0031).
//!
//! A subject record links a student id to the random salt its pseudonym was derived from. The
//! log, the view and every other store only ever hold the pseudonym; deleting the record is what
//! makes those pseudonyms unlinkable. An erased pseudonym keeps a tombstone (when, never who), so
//! an auditor reading the log can tell "erased" from "never known".

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// One student's record: who, the salt of the pseudonym, and the pseudonym itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Keyed hash of the student id: the record's key (the id itself is never a key).
    pub subject_key: String,
    /// The pseudonym the log, view and feeds carry for this student.
    pub pseudonym: String,
    /// Random salt of the pseudonym (hex): gone with the record, so the pseudonym cannot be
    /// derived again from the student id.
    pub salt: String,
    /// The student id as the track sent it.
    pub student_id: String,
    /// When the student was first seen.
    pub created_at: DateTime<Utc>,
}

/// What the subjects store knows about a pseudonym.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PseudonymStatus {
    /// The subject record exists: the pseudonym belongs to this student.
    Linked {
        /// The student id.
        student_id: String,
        /// When the student was first seen.
        created_at: DateTime<Utc>,
    },
    /// The subject was erased: the pseudonym belongs to nobody that can be named.
    Erased {
        /// When the erasure happened.
        erased_at: DateTime<Utc>,
    },
}

/// The tombstone an erasure leaves: the pseudonym and when, never the student id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The pseudonym that no longer names anyone.
    pub pseudonym: String,
    /// When the record was deleted.
    pub erased_at: DateTime<Utc>,
}

/// Storage of subject records, beside (never inside) the event log.
#[async_trait]
pub trait SubjectStore: Send + Sync + 'static {
    /// The record under `subject_key`, strongly consistent.
    async fn subject(&self, subject_key: &str) -> Result<Option<SubjectRecord>, StoreError>;

    /// Stores `record` unless a record with its key exists. Returns the record that holds the key
    /// afterwards: `record` itself, or the one a concurrent first request stored before it (so
    /// two first requests of one student agree on one pseudonym).
    async fn create_subject(&self, record: &SubjectRecord) -> Result<SubjectRecord, StoreError>;

    /// What the store knows of `pseudonym` (`None`: never issued here).
    async fn pseudonym_status(
        &self,
        pseudonym: &str,
    ) -> Result<Option<PseudonymStatus>, StoreError>;

    /// Deletes the record under `subject_key` and leaves the tombstone of its pseudonym, in one
    /// write. `None` when there is no such record (nothing erased).
    async fn erase_subject(
        &self,
        subject_key: &str,
        erased_at: DateTime<Utc>,
    ) -> Result<Option<Erasure>, StoreError>;
}
