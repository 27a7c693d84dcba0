//! Erasing a student (docs/personal-data.md, ADR 0031, ADR 0033): the rules the admin route
//! `POST /v1/admin/students/erase` and the offline `broker-audit erase` share, over the ports
//! only, so the two cannot drift apart.
//!
//! A student's subject record is keyed by HMAC-SHA256(`PSEUDONYM_KEY`, `subject\0` ‖ id)
//! ([`subject_key`]). Erasing deletes the record and leaves a tombstone of its pseudonym; it is
//! refused while the student holds a live sandbox ([`live_sandbox`]: the view's allocated rows
//! under the owner, and, strongly, the claim of the default key that a request without
//! `Idempotency-Key` makes), since the lab's own next request would come back as a new subject
//! that does not own it. Nothing in the event log is rewritten.

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};

use crate::model::claim::Claim;
use crate::model::events::BrokerEvent;
use crate::model::ids::claim_stream;
use crate::service::{decode_for_command, BrokerError};
use crate::store::{Erasure, EventStore, ListFilter, PoolView, SubjectStore};
use crate::SandboxStatus;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The documented dev-only pseudonym key: the API accepts it on loopback addresses only, and
/// `broker-audit` uses it (saying so) when `PSEUDONYM_KEY` is unset.
pub const DEV_PSEUDONYM_KEY: &str = "dev-only-pseudonym-key-never-use-in-production";

/// Rows of one view page read while looking for a live allocation.
const PAGE: usize = 25;

/// HMAC-SHA256 under `key` of the `parts`, one after the other.
pub fn keyed_hash(key: &str, parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail here.
    let Ok(mut mac) = HmacSha256::new_from_slice(key.as_bytes()) else {
        return [0; 32];
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The key of `student`'s subject record under the pseudonym key `key`: keyed, so the records
/// cannot be found from a list of ids without the key.
pub fn subject_key(key: &str, student: &str) -> String {
    hex::encode(keyed_hash(key, &[b"subject\0", student.as_bytes()]))
}

/// The sandbox `owner` holds right now, if any: an allocated row of the view under `owner`, else
/// the sandbox the claim of (`owner`, `owner`) holds (read from its events, strongly).
pub async fn live_sandbox(
    events: &dyn EventStore,
    view: &dyn PoolView,
    owner: &str,
) -> Result<Option<String>, BrokerError> {
    let filter = ListFilter {
        status: Some(SandboxStatus::Allocated),
        owner: Some(owner.to_string()),
        prefix: None,
    };
    let mut cursor: Option<String> = None;
    loop {
        let page = view.list(&filter, PAGE, cursor.as_deref()).await?;
        if let Some(row) = page.rows.first() {
            return Ok(Some(row.sandbox_id.clone()));
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    claim_holder(events, owner, owner).await
}

/// The sandbox the claim of (`caller`, `key`) holds right now, if any (strongly consistent).
pub async fn claim_holder(
    events: &dyn EventStore,
    caller: &str,
    key: &str,
) -> Result<Option<String>, BrokerError> {
    let mut claim = Claim::default();
    for envelope in events.load(&claim_stream(caller, key)).await? {
        if let BrokerEvent::Claim(event) = decode_for_command(&envelope)? {
            claim.fold(&event);
        }
    }
    Ok(claim.active)
}

/// One erasure to carry out (or, with `dry_run`, to judge).
#[derive(Debug, Clone)]
pub struct ErasureRequest<'a> {
    /// The key of the student's subject record ([`subject_key`]).
    pub subject_key: &'a str,
    /// The clear id too, when allocations made under it may still be live (the API's switch
    /// fallback; `broker-audit` always checks it).
    pub clear_id: Option<&'a str>,
    /// When the erasure happens (the tombstone's time).
    pub now: DateTime<Utc>,
    /// Decide only: write nothing.
    pub dry_run: bool,
}

/// What an erasure did, or (dry run) would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErasureOutcome {
    /// No subject record under the key: never seen since pseudonyms were turned on, erased
    /// already, or another pseudonym key. Nothing to do, nothing done.
    NoRecord,
    /// The student holds this live sandbox: nothing erased.
    Refused {
        /// The pseudonym the student's record holds.
        pseudonym: String,
        /// The live sandbox.
        sandbox_id: String,
    },
    /// Dry run: the record exists and nothing holds the erasure back.
    WouldErase {
        /// The pseudonym that would stop naming anyone.
        pseudonym: String,
        /// When the student was first seen.
        first_seen: DateTime<Utc>,
    },
    /// The record was deleted and the tombstone written.
    Erased(Erasure),
}

/// Erases the subject record `request` names, unless the student holds a live sandbox (under the
/// pseudonym, or under the clear id when the request gives it). A record deleted between the
/// check and the write by a concurrent erasure answers [`ErasureOutcome::NoRecord`].
pub async fn erase_student(
    subjects: &dyn SubjectStore,
    events: &dyn EventStore,
    view: &dyn PoolView,
    request: &ErasureRequest<'_>,
) -> Result<ErasureOutcome, BrokerError> {
    let Some(record) = subjects.subject(request.subject_key).await? else {
        return Ok(ErasureOutcome::NoRecord);
    };
    let owners = std::iter::once(record.pseudonym.as_str()).chain(request.clear_id);
    for owner in owners {
        if let Some(sandbox_id) = live_sandbox(events, view, owner).await? {
            return Ok(ErasureOutcome::Refused {
                pseudonym: record.pseudonym,
                sandbox_id,
            });
        }
    }
    if request.dry_run {
        return Ok(ErasureOutcome::WouldErase {
            pseudonym: record.pseudonym,
            first_seen: record.created_at,
        });
    }
    Ok(
        match subjects
            .erase_subject(request.subject_key, request.now)
            .await?
        {
            Some(erasure) => ErasureOutcome::Erased(erasure),
            None => ErasureOutcome::NoRecord,
        },
    )
}
