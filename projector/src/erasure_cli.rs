//! `broker-audit erase` and `broker-audit lookup`: honouring an erasure request without a
//! running API (during an incident, or against a restored table), by the same rules as
//! `POST /v1/admin/students/erase` ([`domain::erasure`]; docs/personal-data.md, ADR 0033).
//!
//! The binary only parses, calls [`erase`] or [`lookup`] and prints; the functions take the
//! opened ports, so the tests run them against the stores a live service uses.

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use domain::erasure::{erase_student, subject_key, ErasureOutcome, ErasureRequest};
use domain::model::events::format_time;
use domain::store::{EventStore, ListFilter, PoolView, SubjectStore};
use runtime::{Secret, StoreArgs};
use serde::Serialize;

use crate::audit_cli::PseudonymKeyArgs;

/// Exit code of an erasure refused because the student holds a live sandbox.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code when there is no subject record: never seen, already erased, or another key.
pub const EXIT_NO_RECORD: u8 = 3;

/// Most sandboxes a lookup lists (a student holds a few), as the API's lookup.
const MAX_LISTED: usize = 100;

/// The ports an erasure reads and writes.
#[derive(Clone)]
pub struct SubjectPorts {
    /// The subject records.
    pub subjects: Arc<dyn SubjectStore>,
    /// The event table (the claims).
    pub events: Arc<dyn EventStore>,
    /// The view (the student's rows).
    pub view: Arc<dyn PoolView>,
}

/// Opens the store `store` names, as every `broker-audit` command does.
pub async fn open_ports(store: &StoreArgs) -> anyhow::Result<SubjectPorts> {
    let stores = runtime::open_stores(store).await?;
    Ok(match (stores.embedded, stores.dynamo) {
        (Some(embedded), _) => SubjectPorts {
            subjects: Arc::new(embedded.clone()),
            events: Arc::new(embedded.clone()),
            view: Arc::new(embedded),
        },
        (None, Some(dynamo)) => SubjectPorts {
            subjects: Arc::new(dynamo.clone()),
            events: Arc::new(dynamo.clone()),
            view: Arc::new(dynamo),
        },
        (None, None) => anyhow::bail!("no store opened for the subject records"),
    })
}

/// The pseudonym key from the settings, and whether it is the dev-only one (said on stderr by
/// the binary: with it, a deployment's students are not found).
pub fn pseudonym_key(args: &PseudonymKeyArgs) -> anyhow::Result<(Secret, bool)> {
    let key = runtime::secret::from_value_or_file(
        "PSEUDONYM_KEY",
        args.pseudonym_key.as_ref(),
        args.pseudonym_key_file.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(match key {
        Some(key) => {
            let dev = key.expose() == domain::erasure::DEV_PSEUDONYM_KEY;
            (key, dev)
        }
        None => (Secret::from(domain::erasure::DEV_PSEUDONYM_KEY), true),
    })
}

/// The student id as given, checked like the API checks it.
fn student_id(raw: &str) -> anyhow::Result<String> {
    domain::model::ids::validate_id("student", raw.trim())
        .map_err(|e| anyhow::anyhow!("--student: {e}"))
}

/// The outcome of `erase`, as `--json` prints it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EraseOutcome {
    /// The record was deleted and the tombstone written.
    Erased,
    /// Dry run: the record exists and nothing holds the erasure back.
    WouldErase,
    /// The student holds a live sandbox: nothing erased.
    Refused,
    /// No subject record: nothing to erase.
    NoRecord,
}

/// What `erase` did or (dry run) would do. Never carries the student id.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EraseReport {
    /// `erased`, `would-erase` (dry run), `refused` or `no-record`.
    pub outcome: EraseOutcome,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// The student's pseudonym (absent with `no-record`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pseudonym: Option<String>,
    /// The live sandbox that refused the erasure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// When the record was deleted (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased_at: Option<String>,
}

impl EraseReport {
    /// The process exit code: 0 erased (or would be), [`EXIT_REFUSED`], [`EXIT_NO_RECORD`].
    pub fn exit_code(&self) -> u8 {
        match self.outcome {
            EraseOutcome::Erased | EraseOutcome::WouldErase => 0,
            EraseOutcome::Refused => EXIT_REFUSED,
            EraseOutcome::NoRecord => EXIT_NO_RECORD,
        }
    }

    /// One paragraph for people, with the next step where there is one.
    pub fn describe(&self) -> String {
        let pseudonym = self.pseudonym.as_deref().unwrap_or("");
        match self.outcome {
            EraseOutcome::Erased => format!(
                "erased: the subject record is deleted; pseudonym {pseudonym} stays in the log and names nobody now (tombstone at {})",
                self.erased_at.as_deref().unwrap_or("")
            ),
            EraseOutcome::WouldErase => format!(
                "dry run: the subject record of pseudonym {pseudonym} would be deleted (no live sandbox holds it back); run again without --dry-run to erase"
            ),
            EraseOutcome::Refused => {
                let sandbox = self.sandbox_id.as_deref().unwrap_or("");
                format!(
                    "refused: the student (pseudonym {pseudonym}) holds live sandbox {sandbox}; release it first (POST /v1/sandboxes/{sandbox}/mark-for-deletion, or wait for the lab's end), then erase again"
                )
            }
            EraseOutcome::NoRecord => "no subject record for this student: never seen since pseudonyms were turned on, already erased, or PSEUDONYM_KEY is not the deployment's key; nothing to erase".to_string(),
        }
    }
}

/// Erases `student`'s subject record (or, with `dry_run`, says what would happen): refused
/// while the student holds a live sandbox under the pseudonym or the clear id.
///
/// The clear id is always checked, where the API checks it only while `CLEAR_ID_FALLBACK_UNTIL`
/// lasts: offline there is no service configuration to read, and the stricter check can only
/// refuse an erasure the API would allow, never erase what the API would refuse.
pub async fn erase(
    ports: &SubjectPorts,
    key: &Secret,
    student: &str,
    dry_run: bool,
    now: DateTime<Utc>,
) -> anyhow::Result<EraseReport> {
    let student = student_id(student)?;
    let subject_key = subject_key(key.expose(), &student);
    let outcome = erase_student(
        ports.subjects.as_ref(),
        ports.events.as_ref(),
        ports.view.as_ref(),
        &ErasureRequest {
            subject_key: &subject_key,
            clear_id: Some(&student),
            now,
            dry_run,
        },
    )
    .await
    .context("reading or writing the subject records")?;
    let report = |outcome, pseudonym, sandbox_id, erased_at| EraseReport {
        outcome,
        dry_run,
        pseudonym,
        sandbox_id,
        erased_at,
    };
    Ok(match outcome {
        ErasureOutcome::NoRecord => report(EraseOutcome::NoRecord, None, None, None),
        ErasureOutcome::Refused {
            pseudonym,
            sandbox_id,
        } => report(
            EraseOutcome::Refused,
            Some(pseudonym),
            Some(sandbox_id),
            None,
        ),
        ErasureOutcome::WouldErase { pseudonym, .. } => {
            report(EraseOutcome::WouldErase, Some(pseudonym), None, None)
        }
        ErasureOutcome::Erased(erasure) => {
            // The audit record of the erasure: the pseudonym and when; never the id.
            tracing::info!(
                target: "audit",
                pseudonym = %erasure.pseudonym,
                erased_at = %format_time(&erasure.erased_at),
                via = "broker-audit",
                "student subject record erased"
            );
            report(
                EraseOutcome::Erased,
                Some(erasure.pseudonym),
                None,
                Some(format_time(&erasure.erased_at)),
            )
        }
    })
}

/// One of the student's sandboxes, as a lookup lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LookupSandbox {
    /// The sandbox id.
    pub sandbox_id: String,
    /// The sandbox's name.
    pub name: String,
    /// Its status in the view.
    pub status: String,
}

/// What `lookup` found: the pseudonym and the sandboxes, or nothing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LookupReport {
    /// Whether the subject record exists.
    pub found: bool,
    /// The pseudonym the log, the view and the feeds carry for the student.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pseudonym: Option<String>,
    /// When the student was first seen (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// The student's sandboxes, live and past (from the view, at most 100).
    pub sandboxes: Vec<LookupSandbox>,
}

impl LookupReport {
    /// The process exit code: 0 found, [`EXIT_NO_RECORD`] otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.found {
            0
        } else {
            EXIT_NO_RECORD
        }
    }
}

/// `student`'s pseudonym and sandboxes, read like `POST /v1/admin/students/lookup` reads them.
pub async fn lookup(
    ports: &SubjectPorts,
    key: &Secret,
    student: &str,
) -> anyhow::Result<LookupReport> {
    let student = student_id(student)?;
    let record = ports
        .subjects
        .subject(&subject_key(key.expose(), &student))
        .await
        .context("reading the subject records")?;
    let Some(record) = record else {
        return Ok(LookupReport {
            found: false,
            pseudonym: None,
            first_seen: None,
            sandboxes: Vec::new(),
        });
    };
    let filter = ListFilter {
        status: None,
        owner: Some(record.pseudonym.clone()),
        prefix: None,
    };
    let mut sandboxes = Vec::new();
    let mut cursor: Option<String> = None;
    while sandboxes.len() < MAX_LISTED {
        let page = ports
            .view
            .list(&filter, MAX_LISTED - sandboxes.len(), cursor.as_deref())
            .await
            .context("reading the view")?;
        sandboxes.extend(page.rows.into_iter().map(|row| LookupSandbox {
            sandbox_id: row.sandbox_id,
            name: row.name,
            status: row.status.as_str().to_string(),
        }));
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(LookupReport {
        found: true,
        pseudonym: Some(record.pseudonym),
        first_seen: Some(format_time(&record.created_at)),
        sandboxes,
    })
}
