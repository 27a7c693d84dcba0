//! Student ids in, pseudonyms out: the one place a track request's caller id is turned into
//! what the broker stores (docs/personal-data.md, ADR 0031).
//!
//! With `STUDENT_IDS=pseudonymised`, the caller-id extractor asks [`Subjects::caller`] for the
//! student's pseudonym, `p1:` and 24 hex digits of HMAC-SHA256(`PSEUDONYM_KEY`, salt ‖ id). The
//! salt is random per student and lives only in the student's subject record (keyed by
//! HMAC-SHA256(`PSEUDONYM_KEY`, id), outside the event log): deleting the record
//! ([`Subjects::erase`]) leaves pseudonyms in the log that nobody can link to the student again,
//! the key holder included, and without rewriting the log. Everything after the extractor — the
//! domain, the stores, the view, the feeds, webhooks, metrics and logs — sees only the pseudonym.
//!
//! The switch from clear ids is safe while labs run: until `CLEAR_ID_FALLBACK_UNTIL`, a request
//! also looks for the student's allocation under the clear id ([`allocating_caller`],
//! [`owning_caller`]) and acts as the clear id where one is found, so a student is never handed
//! a second sandbox because the stored form of their id changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use domain::erasure::{ErasureOutcome, ErasureRequest};
use domain::store::{ListFilter, PseudonymStatus, StoreError, SubjectRecord, SubjectStore};
use domain::{AllocateRequest, SandboxStatus, SharedClock};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::auth::Caller;
use crate::config::{Config, Secret};
use crate::error::ApiError;
use crate::routes::sandbox_ref::{resolve_sandbox_id, Visibility};
use crate::state::SharedState;

/// The documented dev-only pseudonym key: accepted on loopback addresses only.
pub const DEV_PSEUDONYM_KEY: &str = domain::erasure::DEV_PSEUDONYM_KEY;

/// Prefix of every pseudonym (its version: how it was derived).
pub const PSEUDONYM_PREFIX: &str = "p1:";

/// Hex digits of the HMAC kept in a pseudonym (96 bits: short in keys and listings, and far from
/// colliding among the students of a deployment).
const PSEUDONYM_HEX: usize = 24;

/// Most of a clear id's view rows confirmed from their events during the switch's fallback (a
/// student holds one or a few).
const MAX_CONFIRMED_ROWS: usize = 10;

/// Most attempts at a fresh salt when a new pseudonym collides with another student's.
const SALT_ATTEMPTS: usize = 3;

/// What the access log may print as a request's caller: the edge puts an empty slot in the
/// request, and the caller-id extractor fills it with what the handlers see (the pseudonym when
/// pseudonyms are on), so the access line never carries a clear id the log must not hold.
#[derive(Debug, Clone, Default)]
pub struct LoggedCaller(Arc<std::sync::OnceLock<String>>);

impl LoggedCaller {
    /// Records the caller the request acts for (the first value wins).
    pub fn set(&self, caller: &str) {
        let _ = self.0.set(caller.to_string());
    }

    /// The recorded caller, if the request named one that was accepted.
    pub fn get(&self) -> Option<String> {
        self.0.get().cloned()
    }
}

/// How student ids are stored (`STUDENT_IDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StudentIds {
    /// As the track sends them (the behaviour before pseudonyms).
    Clear,
    /// As keyed pseudonyms; the id only in the erasable subject record.
    Pseudonymised,
}

/// The pseudonymiser and the subjects store behind it.
pub struct Subjects {
    mode: StudentIds,
    key: Secret,
    store: Arc<dyn SubjectStore>,
    clock: SharedClock,
    clear_fallback_until: Option<DateTime<Utc>>,
    created: IntCounter,
    erasures: IntCounterVec,
}

impl std::fmt::Debug for Subjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subjects")
            .field("mode", &self.mode)
            .field("clear_fallback_until", &self.clear_fallback_until)
            .finish_non_exhaustive()
    }
}

impl Subjects {
    /// The pseudonymiser `config` describes, over `store`; its series go to `registry`. Refuses
    /// the dev key (unset, or the documented value) on a non-loopback address when pseudonyms
    /// are on.
    pub fn from_config(
        config: &Config,
        store: Arc<dyn SubjectStore>,
        clock: SharedClock,
        registry: &Registry,
    ) -> Result<Self, String> {
        let key = runtime::secret::from_value_or_file(
            "PSEUDONYM_KEY",
            config.pseudonym_key.as_ref(),
            config.pseudonym_key_file.as_deref(),
        )?;
        let dev = key.as_ref().is_none_or(|k| k.expose() == DEV_PSEUDONYM_KEY);
        if config.student_ids == StudentIds::Pseudonymised {
            if dev && !config.bind_addr.ip().is_loopback() {
                return Err(format!(
                    "PSEUDONYM_KEY (or PSEUDONYM_KEY_FILE) must be set, and not to the documented dev key, to listen on {} with STUDENT_IDS=pseudonymised (the dev key is only for loopback addresses)",
                    config.bind_addr
                ));
            }
            if let Some(key) = key.as_ref().filter(|_| !dev) {
                let bits = runtime::secret::estimated_bits(key.expose());
                if key.expose().chars().count() < 32 || bits < runtime::secret::MIN_SECRET_BITS {
                    return Err("PSEUDONYM_KEY is too weak: use at least 32 random characters, e.g. `openssl rand -hex 32`".into());
                }
            }
            if dev {
                tracing::warn!(target: "startup", "STUDENT_IDS=pseudonymised with the dev-only PSEUDONYM_KEY: pseudonyms are linkable by anyone who reads the source; never in production");
            }
        }
        let raw_until = config.clear_id_fallback_until.trim();
        let clear_fallback_until = if raw_until.is_empty() {
            None
        } else {
            Some(
                DateTime::parse_from_rfc3339(raw_until)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        format!(
                            "CLEAR_ID_FALLBACK_UNTIL is not an RFC 3339 time ({e}), e.g. 2026-12-10T09:00:00Z"
                        )
                    })?,
            )
        };
        let created = IntCounter::with_opts(Opts::new(
            "broker_subjects_created_total",
            "Subject records created: students seen for the first time (or again after an erasure)",
        ))
        .map_err(|e| e.to_string())?;
        let erasures = IntCounterVec::new(
            Opts::new(
                "broker_subject_erasures_total",
                "Erasure requests by outcome: erased, unknown (no record), refused (the student holds a live sandbox)",
            ),
            &["outcome"],
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(created.clone()))
            .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(erasures.clone()))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            mode: config.student_ids,
            key: key.unwrap_or_else(|| Secret::from(DEV_PSEUDONYM_KEY)),
            store,
            clock,
            clear_fallback_until,
            created,
            erasures,
        })
    }

    /// Whether caller ids are pseudonymised.
    pub fn pseudonymised(&self) -> bool {
        self.mode == StudentIds::Pseudonymised
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        domain::erasure::keyed_hash(self.key.expose(), parts)
    }

    /// The key of `student`'s subject record: keyed, so the records cannot be found from a list
    /// of ids without the key.
    pub fn subject_key(&self, student: &str) -> String {
        domain::erasure::subject_key(self.key.expose(), student)
    }

    fn derive(&self, salt: &str, student: &str) -> String {
        let mac =
            hex::encode(self.mac(&[b"pseudonym\0", salt.as_bytes(), b"\0", student.as_bytes()]));
        format!("{PSEUDONYM_PREFIX}{}", &mac[..PSEUDONYM_HEX])
    }

    /// `student`'s pseudonym, creating the subject record on first sight.
    pub async fn pseudonym(&self, student: &str) -> Result<String, StoreError> {
        let subject_key = self.subject_key(student);
        if let Some(record) = self.store.subject(&subject_key).await? {
            return Ok(record.pseudonym);
        }
        let mut last = None;
        for _ in 0..SALT_ATTEMPTS {
            let salt = uuid::Uuid::new_v4().simple().to_string();
            let record = SubjectRecord {
                subject_key: subject_key.clone(),
                pseudonym: self.derive(&salt, student),
                salt,
                student_id: student.to_string(),
                created_at: self.clock.now(),
            };
            match self.store.create_subject(&record).await {
                Ok(stored) => {
                    if stored == record {
                        self.created.inc();
                    }
                    return Ok(stored.pseudonym);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Unavailable("no subject record written".into())))
    }

    /// The caller a track request acts for: the id itself with clear ids, else its pseudonym,
    /// with the clear id kept aside (never stored) while the transition fallback lasts.
    pub async fn caller(&self, student: String) -> Result<Caller, ApiError> {
        if !self.pseudonymised() {
            return Ok(Caller(student, None));
        }
        let pseudonym = self.pseudonym(&student).await?;
        let clear = self.fallback_active().then_some(student);
        Ok(Caller(pseudonym, clear))
    }

    /// Whether requests still look for allocations made under clear ids.
    pub fn fallback_active(&self) -> bool {
        self.pseudonymised()
            && self
                .clear_fallback_until
                .is_some_and(|until| self.clock.now() < until)
    }

    /// `student`'s subject record, if it exists.
    pub async fn lookup(&self, student: &str) -> Result<Option<SubjectRecord>, StoreError> {
        self.store.subject(&self.subject_key(student)).await
    }

    /// What is known about `pseudonym`.
    pub async fn pseudonym_status(
        &self,
        pseudonym: &str,
    ) -> Result<Option<PseudonymStatus>, StoreError> {
        self.store.pseudonym_status(pseudonym).await
    }

    /// Deletes `student`'s subject record unless the student holds a live sandbox (under the
    /// pseudonym, or under the clear id while the switch's fallback lasts), by the rules
    /// `broker-audit erase` shares ([`domain::erasure::erase_student`]); counts the outcome.
    pub async fn erase(
        &self,
        student: &str,
        events: &dyn domain::store::EventStore,
        view: &dyn domain::store::PoolView,
    ) -> Result<ErasureOutcome, domain::BrokerError> {
        let subject_key = self.subject_key(student);
        let outcome = domain::erasure::erase_student(
            self.store.as_ref(),
            events,
            view,
            &ErasureRequest {
                subject_key: &subject_key,
                clear_id: self.fallback_active().then_some(student),
                now: self.clock.now(),
                dry_run: false,
            },
        )
        .await?;
        self.count_erasure(match outcome {
            ErasureOutcome::Erased(_) => "erased",
            ErasureOutcome::Refused { .. } => "refused",
            // `WouldErase` answers dry runs only, and this is not one.
            ErasureOutcome::NoRecord | ErasureOutcome::WouldErase { .. } => "unknown",
        });
        Ok(outcome)
    }

    /// Who each pseudonym named in `text` is, for admin views: the student id while the subject
    /// record exists, `erased` after an erasure, `unknown` for one this deployment never issued.
    /// `None` with clear ids (the views show the ids themselves).
    pub async fn identities(
        &self,
        text: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        if !self.pseudonymised() {
            return Ok(None);
        }
        let named = pseudonyms_in(text);
        let answers =
            futures::future::try_join_all(named.iter().map(|p| self.store.pseudonym_status(p)))
                .await?;
        Ok(Some(
            named
                .into_iter()
                .zip(answers)
                .map(|(pseudonym, status)| {
                    let who = match status {
                        Some(PseudonymStatus::Linked { student_id, .. }) => student_id,
                        Some(PseudonymStatus::Erased { .. }) => "erased".to_string(),
                        None => "unknown".to_string(),
                    };
                    (pseudonym, who)
                })
                .collect(),
        ))
    }

    /// Counts an erasure request's outcome.
    pub fn count_erasure(&self, outcome: &str) {
        self.erasures.with_label_values(&[outcome]).inc();
    }
}

/// Every pseudonym in `text` (in payloads, actors and stream keys alike), once each.
fn pseudonyms_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PSEUDONYM_PREFIX) {
        let candidate = &rest[at..];
        let digits = &candidate[PSEUDONYM_PREFIX.len()..];
        if digits.len() >= PSEUDONYM_HEX
            && digits.as_bytes()[..PSEUDONYM_HEX]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            found.insert(candidate[..PSEUDONYM_PREFIX.len() + PSEUDONYM_HEX].to_string());
        }
        rest = &candidate[PSEUDONYM_PREFIX.len()..];
    }
    found
}

/// The caller an allocation acts for. During the transition fallback, a student whose clear id
/// still holds a live allocation acts as the clear id, exactly as before the switch: the claim
/// this request names (the same key, or the id as the default key) is replayed, and a request
/// with a fresh key meets the clear id's caps instead of a second sandbox under the pseudonym.
/// The claim is read strongly; other live allocations come from the view's `by-owner` rows,
/// which hold every allocation made before the switch once the projection caught up.
pub async fn allocating_caller(
    state: &SharedState,
    caller: Caller,
    request: &AllocateRequest,
) -> Result<Caller, ApiError> {
    let Caller(pseudonym, Some(clear)) = caller else {
        return Ok(caller);
    };
    let key = request
        .idempotency_key
        .clone()
        .unwrap_or_else(|| clear.clone());
    let claimed = state
        .broker
        .held_by_claim(&clear, &key)
        .await
        .map_err(|e| ApiError::from_broker(e, ""))?
        .is_some();
    let holds = claimed || holds_live_sandbox(state, &clear).await?;
    Ok(if holds {
        Caller(clear, None)
    } else {
        Caller(pseudonym, None)
    })
}

/// Whether `owner` holds a live allocation: candidates from the view's `by-owner` rows, each
/// confirmed from the sandbox's own events (a row the projection has not moved on yet from a
/// release does not count).
async fn holds_live_sandbox(state: &SharedState, owner: &str) -> Result<bool, ApiError> {
    let live = ListFilter {
        status: Some(SandboxStatus::Allocated),
        owner: Some(owner.to_string()),
        prefix: None,
    };
    let rows = state
        .broker
        .view()
        .list(&live, MAX_CONFIRMED_ROWS, None)
        .await?
        .rows;
    for row in rows {
        let sandbox = state
            .broker
            .load_sandbox(&row.sandbox_id)
            .await
            .map_err(|e| ApiError::from_broker(e, &row.sandbox_id))?
            .sandbox;
        if sandbox.status == Some(SandboxStatus::Allocated)
            && sandbox.owner.as_deref() == Some(owner)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The caller a per-sandbox request acts for. During the transition fallback, a sandbox allocated
/// to the student's clear id is acted on as the clear id (its owner), so a lab started before
/// the switch can still be read, extended and released.
pub async fn owning_caller(
    state: &SharedState,
    caller: Caller,
    raw_sandbox_id: &str,
) -> Result<Caller, ApiError> {
    let Caller(pseudonym, Some(clear)) = caller else {
        return Ok(caller);
    };
    let sandbox_id = resolve_sandbox_id(state, raw_sandbox_id, Visibility::Owner(&clear)).await?;
    let owner = match state.broker.load_sandbox(&sandbox_id).await {
        Ok(loaded) => loaded.sandbox.owner,
        // No such sandbox: the request goes on under the pseudonym and gets its usual answer.
        Err(_) => None,
    };
    Ok(if owner.as_deref() == Some(clear.as_str()) {
        Caller(clear, None)
    } else {
        Caller(pseudonym, None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects(configure: impl FnOnce(&mut Config)) -> Result<Subjects, String> {
        let mut config = Config::defaults();
        configure(&mut config);
        let store = store_embedded::EmbeddedStore::open_in_memory(1).map_err(|e| e.to_string())?;
        let clock: SharedClock = Arc::new(domain::ManualClock::new(Utc::now()));
        Subjects::from_config(&config, Arc::new(store), clock, &Registry::new())
    }

    /// With pseudonyms on, the dev key is refused off loopback and a weak key anywhere; the
    /// errors name the setting, never the value.
    #[test]
    fn keys_follow_the_secret_rules() {
        let public = |c: &mut Config| {
            c.student_ids = StudentIds::Pseudonymised;
            c.bind_addr = std::net::SocketAddr::from(([0, 0, 0, 0], 8080));
        };
        let problem = subjects(public).err().unwrap_or_default();
        assert!(problem.contains("PSEUDONYM_KEY"), "{problem}");
        let problem = subjects(|c| {
            c.student_ids = StudentIds::Pseudonymised;
            c.pseudonym_key = Some(Secret::from("short-key"));
        })
        .err()
        .unwrap_or_default();
        assert!(
            problem.contains("too weak") && !problem.contains("short-key"),
            "{problem}"
        );
        assert!(subjects(|c| c.clear_id_fallback_until = "tomorrow".into()).is_err());
        // Clear ids need no key, wherever the service listens.
        assert!(
            subjects(|c| c.bind_addr = std::net::SocketAddr::from(([0, 0, 0, 0], 8080))).is_ok()
        );
    }

    /// One student keeps one pseudonym; another student gets another; the record maps back.
    #[tokio::test]
    async fn a_student_keeps_one_pseudonym() -> Result<(), String> {
        let subjects = subjects(|c| {
            c.student_ids = StudentIds::Pseudonymised;
            c.pseudonym_key = Some(Secret::from("pseudonym-key-for-unit-tests-0123456789abc"));
        })?;
        let first = subjects
            .pseudonym("student-1")
            .await
            .map_err(|e| e.to_string())?;
        let again = subjects
            .pseudonym("student-1")
            .await
            .map_err(|e| e.to_string())?;
        let other = subjects
            .pseudonym("student-2")
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert!(first.starts_with(PSEUDONYM_PREFIX) && first.len() == 3 + PSEUDONYM_HEX);
        let record = subjects
            .lookup("student-1")
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(record.map(|r| r.pseudonym), Some(first));
        Ok(())
    }

    /// Pseudonyms are found wherever they stand (actors, stream keys, payloads), once each, and
    /// a look-alike that is too short or not hex is not one.
    #[test]
    fn pseudonyms_are_found_in_any_text() {
        let p = "p1:0123456789abcdef01234567";
        let q = "p1:fedcba9876543210fedcba98";
        let text = format!(
            r#"{{"actor":"track:{p}","stream_id":"claim#x:{q}#{q}","caller":"{p}","other":"p1:12","upper":"p1:0123456789ABCDEF01234567"}}"#
        );
        let found: Vec<String> = pseudonyms_in(&text).into_iter().collect();
        assert_eq!(found, vec![p.to_string(), q.to_string()]);
    }
}
