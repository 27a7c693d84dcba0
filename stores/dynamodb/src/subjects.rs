//! [`SubjectStore`] on DynamoDB: the `{prefix}-subjects` table, apart from the event table so
//! that IAM can allow deletes here and nowhere else (ADR 0031). Two items per student:
//! * `subject#<keyed hash of the id>` — pseudonym, salt, student id, first seen;
//! * `pseudonym#<pseudonym>` — the reverse link (student id, first seen) for admin listings; an
//!   erasure overwrites it with a tombstone (`erased_at`, no id).
//!
//! Both are written in one transaction, each on condition it does not exist yet, and an erasure
//! deletes the first and overwrites the second in one transaction too.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};
use chrono::{DateTime, Utc};

use domain::store::{Erasure, PseudonymStatus, StoreError, SubjectRecord, SubjectStore};

use super::items::s;
use super::retry::{cancellation_failure, classify};
use super::tables::{table_name, SUBJECTS, SUBJECT_KEY};
use super::{build_error, refused, DynamoStore, CONDITIONAL_CHECK_FAILED};

const PSEUDONYM: &str = "pseudonym";
const SALT: &str = "salt";
const STUDENT_ID: &str = "student_id";
const CREATED_AT: &str = "created_at";
const ERASED_AT: &str = "erased_at";

fn subject_item_key(subject_key: &str) -> String {
    format!("subject#{subject_key}")
}

fn pseudonym_item_key(pseudonym: &str) -> String {
    format!("pseudonym#{pseudonym}")
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> Result<String, StoreError> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .ok_or_else(|| StoreError::Corrupt(format!("subject item without {name}")))
}

fn time(item: &HashMap<String, AttributeValue>, name: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(&text(item, name)?)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("subject item {name}: {e}")))
}

/// What a cancelled subjects transaction says: a condition failed on item `i`, or another cause.
fn failed_condition(
    err: &SdkError<TransactWriteItemsError>,
) -> Option<(Option<usize>, Vec<String>)> {
    let SdkError::ServiceError(ctx) = err else {
        return None;
    };
    let TransactWriteItemsError::TransactionCanceledException(cancelled) = ctx.err() else {
        return None;
    };
    let reasons = cancelled.cancellation_reasons();
    let failed = reasons
        .iter()
        .position(|r| r.code() == Some(CONDITIONAL_CHECK_FAILED));
    let codes = reasons
        .iter()
        .map(|r| r.code().unwrap_or("None").to_string())
        .collect();
    Some((failed, codes))
}

impl DynamoStore {
    fn subjects_table(&self) -> String {
        table_name(self.table_prefix(), SUBJECTS)
    }

    async fn subject_item(
        &self,
        key: String,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let table = self.subjects_table();
        let out = self
            .call("GetItem(subjects)", refused, || {
                self.client()
                    .get_item()
                    .table_name(&table)
                    .key(SUBJECT_KEY, s(key.clone()))
                    .consistent_read(true)
                    .send()
            })
            .await?;
        Ok(out.item)
    }

    /// Sends one subjects transaction until it lands, a condition fails (`Ok(Some(index))`), or
    /// the retry budget is spent.
    async fn subjects_transaction(
        &self,
        what: &'static str,
        items: Vec<TransactWriteItem>,
    ) -> Result<Option<usize>, StoreError> {
        let mut retry = self.retry(what);
        loop {
            let result = self
                .client()
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(None),
                Err(err) => err,
            };
            if let Some((failed, codes)) = failed_condition(&err) {
                if failed.is_some() {
                    return Ok(failed);
                }
                let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
                match cancellation_failure(&codes) {
                    Some(failure) => {
                        retry.after(failure).await?;
                        continue;
                    }
                    None => {
                        return Err(StoreError::Unavailable(format!(
                            "{what} cancelled: {codes:?}"
                        )))
                    }
                }
            }
            retry.after(classify(&err, refused)).await?;
        }
    }
}

#[async_trait]
impl SubjectStore for DynamoStore {
    async fn subject(&self, subject_key: &str) -> Result<Option<SubjectRecord>, StoreError> {
        let Some(item) = self.subject_item(subject_item_key(subject_key)).await? else {
            return Ok(None);
        };
        Ok(Some(SubjectRecord {
            subject_key: subject_key.to_string(),
            pseudonym: text(&item, PSEUDONYM)?,
            salt: text(&item, SALT)?,
            student_id: text(&item, STUDENT_ID)?,
            created_at: time(&item, CREATED_AT)?,
        }))
    }

    async fn create_subject(&self, record: &SubjectRecord) -> Result<SubjectRecord, StoreError> {
        let table = self.subjects_table();
        let created_at = record.created_at.to_rfc3339();
        let put = |key: String, attributes: Vec<(&str, String)>| {
            let mut put = Put::builder()
                .table_name(&table)
                .item(SUBJECT_KEY, s(key))
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", SUBJECT_KEY);
            for (name, value) in attributes {
                put = put.item(name, s(value));
            }
            put.build()
                .map(|put| TransactWriteItem::builder().put(put).build())
                .map_err(build_error)
        };
        let items = vec![
            put(
                subject_item_key(&record.subject_key),
                vec![
                    (PSEUDONYM, record.pseudonym.clone()),
                    (SALT, record.salt.clone()),
                    (STUDENT_ID, record.student_id.clone()),
                    (CREATED_AT, created_at.clone()),
                ],
            )?,
            put(
                pseudonym_item_key(&record.pseudonym),
                vec![
                    (STUDENT_ID, record.student_id.clone()),
                    (CREATED_AT, created_at),
                ],
            )?,
        ];
        match self
            .subjects_transaction("TransactWriteItems(subjects)", items)
            .await?
        {
            None => Ok(record.clone()),
            // A concurrent first request of the same student stored its record first: use it.
            Some(0) => self.subject(&record.subject_key).await?.ok_or_else(|| {
                StoreError::Unavailable("the subject record vanished while it was written".into())
            }),
            // Another student's pseudonym (a random salt collided): the caller retries with a
            // new salt.
            Some(_) => Err(StoreError::Unavailable(
                "pseudonym collision: retry the request".into(),
            )),
        }
    }

    async fn pseudonym_status(
        &self,
        pseudonym: &str,
    ) -> Result<Option<PseudonymStatus>, StoreError> {
        let Some(item) = self.subject_item(pseudonym_item_key(pseudonym)).await? else {
            return Ok(None);
        };
        if item.contains_key(ERASED_AT) {
            return Ok(Some(PseudonymStatus::Erased {
                erased_at: time(&item, ERASED_AT)?,
            }));
        }
        Ok(Some(PseudonymStatus::Linked {
            student_id: text(&item, STUDENT_ID)?,
            created_at: time(&item, CREATED_AT)?,
        }))
    }

    async fn erase_subject(
        &self,
        subject_key: &str,
        erased_at: DateTime<Utc>,
    ) -> Result<Option<Erasure>, StoreError> {
        let Some(record) = self.subject(subject_key).await? else {
            return Ok(None);
        };
        let table = self.subjects_table();
        let delete = Delete::builder()
            .table_name(&table)
            .key(SUBJECT_KEY, s(subject_item_key(subject_key)))
            .condition_expression("attribute_exists(#k)")
            .expression_attribute_names("#k", SUBJECT_KEY)
            .build()
            .map_err(build_error)?;
        // The tombstone replaces the reverse link whole: the student id goes with it.
        let tombstone = Put::builder()
            .table_name(&table)
            .item(SUBJECT_KEY, s(pseudonym_item_key(&record.pseudonym)))
            .item(ERASED_AT, s(erased_at.to_rfc3339()))
            .build()
            .map_err(build_error)?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            TransactWriteItem::builder().put(tombstone).build(),
        ];
        match self
            .subjects_transaction("TransactWriteItems(erase subject)", items)
            .await?
        {
            None => Ok(Some(Erasure {
                pseudonym: record.pseudonym,
                erased_at,
            })),
            // A concurrent erasure of the same student deleted it first.
            Some(_) => Ok(None),
        }
    }
}
