//! Events: the facts the broker records, and the envelope every stored event travels in.
//!
//! Payloads are serde-tagged JSON (`{"type":"SandboxAllocated",…}`); the tag doubles as the
//! envelope's `event_type`. Events are immutable: a changed payload shape gets a new
//! `schema_version` and an entry in [`upcast`], never a rewrite of stored items.

use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use super::ids::{
    ADMIN_JOB_STREAM_PREFIX, CLAIM_STREAM_PREFIX, POOL_CONTROL_STREAM_ID, QUOTA_STREAM_PREFIX,
    RESERVATION_STREAM_PREFIX, SANDBOX_STREAM_PREFIX, SYNC_STREAM_ID, TICKET_STREAM_PREFIX,
    USAGE_STREAM_PREFIX,
};

/// The payload schema version written today.
pub const CURRENT_SCHEMA_VERSION: u32 = 1;

/// Events of a sandbox stream (`sandbox#{id}`); DESIGN.md §4.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SandboxEvent {
    /// Sync saw a new active CSP sandbox account.
    SandboxRegistered {
        /// Broker id (the CSP `csp_id`, else `id`).
        sandbox_id: String,
        /// CSP account name; allocation filters on its prefix.
        name: String,
        /// CSP account path, e.g. `identity/accounts/<uuid>`.
        external_id: String,
        /// Salesforce account id, when CSP has one.
        sfdc_account_id: Option<String>,
        /// When CSP created the account.
        csp_created_at: Option<DateTime<Utc>>,
    },
    /// A student got the sandbox; appended in one transaction with `ClaimGranted`.
    SandboxAllocated {
        /// The student (the `X-Instruqt-Sandbox-ID` / `X-Track-ID` value).
        caller: String,
        /// `X-Instruqt-Track-ID`, analytics only.
        track_name: Option<String>,
        /// The idempotency key, scoped to the caller.
        idempotency_key: String,
        /// The claim stream this allocation is recorded in.
        claim_stream: String,
        /// Allocation time.
        allocated_at: DateTime<Utc>,
        /// End of the lab window (`allocated_at + lab_duration_s`).
        expires_at: DateTime<Utc>,
        /// The lab duration in force when allocated.
        lab_duration_s: i64,
        /// The heartbeat interval the track declared (seconds), when it opted in to heartbeats
        /// (ADR 0030): the reclaim reads its policy from here, never from a setting it would
        /// have to mirror.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_interval_s: Option<u32>,
        /// How long heartbeats may be missed before the sandbox is reclaimed (seconds), when
        /// the track opted in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_grace_s: Option<u32>,
        /// How long the request waited in line before this allocation, when it waited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waited_ms: Option<u64>,
    },
    /// The owner marked the sandbox for deletion; releases the claim in the same transaction.
    DeletionRequested {
        /// The owner who asked.
        caller: String,
        /// When.
        requested_at: DateTime<Utc>,
        /// Why, when the owner did not ask: `heartbeat_missed` for the heartbeat reclaim.
        /// Absent when the owner marked the sandbox.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The last heartbeat the reclaim saw (the allocation time when none came), so an
        /// auditor sees why it acted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_heartbeat_at: Option<DateTime<Utc>>,
    },
    /// The expiry job ended an allocation past `expires_at + grace`; releases the claim.
    AllocationExpired {
        /// When.
        expired_at: DateTime<Utc>,
    },
    /// Sync missed an available sandbox in two consecutive complete listings.
    SandboxMarkedStale {
        /// When.
        marked_at: DateTime<Utc>,
    },
    /// A stale sandbox is listed by CSP again.
    SandboxRestored {
        /// When.
        restored_at: DateTime<Utc>,
    },
    /// A CSP delete failed; retried after `next_attempt_at`.
    DeletionAttemptFailed {
        /// 1 for the first failure.
        attempt: u32,
        /// What CSP (or the network) said.
        error: String,
        /// Earliest time of the next attempt (exponential backoff).
        next_attempt_at: DateTime<Utc>,
        /// True for a failure that says nothing about the account (5xx, timeout, connection
        /// error): it is retried within the retry window instead of spending the attempt budget.
        /// Events written before the distinction existed read as `false`, which is what they
        /// counted as then.
        #[serde(default)]
        transient: bool,
        /// When the current run of failures began (the start of the retry window); absent in
        /// events written before the window existed.
        #[serde(default)]
        failing_since: Option<DateTime<Utc>>,
    },
    /// The retry budget or the retry window is spent: quarantined until an operator retries.
    DeletionFailed {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last_error: String,
        /// True when the retry window of transient failures ran out (rather than the budget of
        /// refusals); `false` in events written before the distinction existed.
        #[serde(default)]
        transient: bool,
    },
    /// A cleanup worker holds the deletion until `until`: other workers leave the sandbox alone
    /// meanwhile, so the CSP normally sees one DELETE. Neither the status nor the view's due time
    /// changes; an expired lease is simply ignored, so a crashed worker's sandbox is retried.
    DeletionLeased {
        /// The worker holding the lease.
        worker: String,
        /// When the lease lapses.
        until: DateTime<Utc>,
    },
    /// An operator re-queued a quarantined sandbox.
    DeletionRetried {
        /// When.
        requested_at: DateTime<Utc>,
    },
    /// The CSP account is gone (CSP answered 200, 204 or 404).
    SandboxDeleted {
        /// The CSP status code seen, if any.
        csp_status: Option<u16>,
    },
    /// Removed from the pool in the store only; the CSP account is not touched.
    SandboxRetired {
        /// Why (e.g. `stale_grace_expired`, `bulk_delete`).
        reason: String,
    },
    /// The owner extended the lab window: `expires_at`, the mark window and auto-expiry all
    /// move to the new end.
    LeaseExtended {
        /// The owner who asked.
        caller: String,
        /// Hours added by this extension.
        hours: u32,
        /// The end of the window before this extension.
        previous_expires_at: DateTime<Utc>,
        /// The new end of the window.
        expires_at: DateTime<Utc>,
        /// Seconds added by every extension of this allocation so far, this one included
        /// (bounded by `MAX_LAB_EXTENSION_HOURS`).
        extended_total_s: i64,
        /// The request's `Idempotency-Key`, if it sent one: a retry with the same key answers
        /// this extension again instead of adding its hours twice. Absent in events written
        /// before keys existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// The reservation job earmarked this available sandbox for a track's reservation: until
    /// `ends_at` only that track may be allocated it (ADR 0028). Written only with
    /// `WRITE_EVENTS_RESERVATIONS` on.
    SandboxReserved {
        /// The reservation (`reservation#<id>`).
        reservation_id: String,
        /// The only track that may be allocated the sandbox until `ends_at`.
        track: String,
        /// The end of the reservation's window: from then on the earmark binds nobody.
        ends_at: DateTime<Utc>,
    },
    /// The earmark was lifted before the sandbox was allocated (the reservation was cancelled
    /// or its window ended): the sandbox is open to every track again.
    SandboxUnreserved {
        /// The reservation whose earmark is lifted.
        reservation_id: String,
    },
    /// The holder of an allocation that opted in to heartbeats has missed them for half its
    /// grace period: the warning before the reclaim (ADR 0030). Written only with
    /// `WRITE_EVENTS_HEARTBEATS=true`; the allocation goes on.
    HeartbeatMissed {
        /// The last heartbeat seen (the allocation time when none came).
        last_heartbeat_at: DateTime<Utc>,
        /// When the sandbox is reclaimed unless a heartbeat comes first.
        reclaim_at: DateTime<Utc>,
    },
}

/// Why a claim was released.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The owner marked the sandbox for deletion.
    DeletionRequested,
    /// The allocation expired.
    Expired,
}

/// Events of a claim stream (`claim#…`): which sandbox a (caller, key) pair holds.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClaimEvent {
    /// The pair now holds `sandbox_id`.
    ClaimGranted {
        /// The student.
        caller: String,
        /// The idempotency key.
        idempotency_key: String,
        /// The sandbox allocated.
        sandbox_id: String,
    },
    /// The allocation ended; the pair may allocate again.
    ClaimReleased {
        /// The sandbox that was held.
        sandbox_id: String,
        /// Why.
        reason: ReleaseReason,
    },
}

/// Events of the sync stream: each complete CSP listing, so that stale-marking can be debounced
/// across one-shot job runs.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SyncEvent {
    /// A complete listing was read.
    ListingRecorded {
        /// How many active sandbox accounts CSP listed.
        listed: u32,
        /// Available sandboxes missing from this listing.
        missing: Vec<String>,
    },
}

/// Events of an admin job stream (`adminjob#{job_id}`) and of the job index
/// (`adminjob#index`): a long operator action run in the background, recorded so that every API
/// instance can report it (ADR 0018).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AdminJobEvent {
    /// On the index stream: a job was submitted (what `GET /v1/admin/jobs` lists).
    AdminJobListed {
        /// The job.
        job_id: String,
        /// What it does, e.g. `bulk_delete`.
        kind: String,
    },
    /// The job began.
    AdminJobStarted {
        /// What it does, e.g. `bulk_delete`.
        kind: String,
        /// Its parameters as given (e.g. `{"status": "available"}`).
        params: serde_json::Value,
        /// Items expected (from the pool counters at the start), when known.
        total: Option<u64>,
        /// The process running it.
        instance: String,
    },
    /// A progress mark, written every few seconds while the job runs.
    AdminJobProgressed {
        /// Items handled so far.
        done: u64,
        /// Items that failed or were skipped so far.
        errors: u64,
    },
    /// The job ended.
    AdminJobFinished {
        /// `completed`, `failed` or `stopped`.
        outcome: String,
        /// Items handled.
        done: u64,
        /// Items that failed or were skipped.
        errors: u64,
        /// Why it failed, if it did.
        error: Option<String>,
        /// The operation's own summary.
        summary: serde_json::Value,
    },
}

/// One drain in force: allocations for the prefix (or, without one, the whole pool) are refused.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainEntry {
    /// The name prefix drained; `None` drains the whole pool.
    pub prefix: Option<String>,
    /// When the drain began.
    pub since: DateTime<Utc>,
    /// The operator's note, if any.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Events of the pool-control stream (`pool#control`): operators' drain decisions. Each event
/// carries the complete drain state after it, so readers need only the latest event.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PoolControlEvent {
    /// New allocations for `prefix` (or the whole pool) are refused with 503 `MAINTENANCE`.
    PoolDrained {
        /// The prefix drained; `None` for the whole pool.
        prefix: Option<String>,
        /// The operator's note.
        reason: Option<String>,
        /// Every drain in force after this event.
        drained: Vec<DrainEntry>,
    },
    /// Allocations for `prefix` (or the whole pool) are accepted again.
    PoolResumed {
        /// The prefix resumed; `None` for the whole-pool drain.
        prefix: Option<String>,
        /// Every drain still in force after this event.
        drained: Vec<DrainEntry>,
    },
}

/// Events of a track's quota stream (`quota#<track>`): the live allocations counted against the
/// track's quota. Every event carries the holders after it, so a reader needs only the latest
/// event, and the stream's version is what concurrent allocations of the track race on.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum QuotaEvent {
    /// An allocation took a slot; appended in the allocation's own transaction.
    QuotaSlotTaken {
        /// The sandbox allocated.
        sandbox_id: String,
        /// The quota in force when it was taken.
        limit: u32,
        /// Sandboxes holding a slot after this event.
        holders: Vec<String>,
    },
    /// The allocation ended (marked or expired); appended in the same transaction as its end.
    QuotaSlotReleased {
        /// The sandbox whose allocation ended.
        sandbox_id: String,
        /// Sandboxes holding a slot after this event.
        holders: Vec<String>,
    },
}

/// What a reservation's track does once its earmarked sandboxes are all in use.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Its students are served from the open pool after the reservation.
    OpenPool,
    /// Its students are served from the reservation only.
    ReservationOnly,
}

/// Events of a reservation stream (`reservation#<id>`) and of the reservation index
/// (`reservation#index`): an operator's reservation of sandboxes for a track over a time window
/// (ADR 0028). Written only with `WRITE_EVENTS_RESERVATIONS` on.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ReservationEvent {
    /// On the index stream: a reservation was created (what the listing and the job read).
    ReservationListed {
        /// The reservation.
        reservation_id: String,
    },
    /// An operator reserved `count` sandboxes for `track` from `starts_at` to `ends_at`.
    ReservationCreated {
        /// The reservation.
        reservation_id: String,
        /// The track whose students the sandboxes are for (the allocation's track name).
        track: String,
        /// How many sandboxes.
        count: u32,
        /// Only sandboxes whose name starts with this, if given.
        prefix: Option<String>,
        /// When the window opens.
        starts_at: DateTime<Utc>,
        /// When the window closes (unused earmarks return to the pool then).
        ends_at: DateTime<Utc>,
        /// What the track does once the reservation is used up.
        overflow: OverflowPolicy,
        /// When earmarking begins (`starts_at` less the lead time, or creation if later).
        earmark_from: DateTime<Utc>,
        /// The operator's note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// Sandboxes were earmarked for the reservation (each carries `SandboxReserved`, appended
    /// in the same transaction).
    ReservationEarmarked {
        /// The sandboxes earmarked by this event.
        sandbox_ids: Vec<String>,
    },
    /// Earmarking found too few sandboxes: the reservation is short by `missing`.
    ReservationShortfallRecorded {
        /// Sandboxes the reservation still lacks.
        missing: u32,
        /// Sandboxes earmarked and usable (free or used) when recorded.
        earmarked: u32,
    },
    /// An operator cancelled the reservation; its unused earmarks were lifted.
    ReservationCancelled {
        /// Unused earmarks lifted (returned to the pool).
        returned: u32,
    },
    /// The window closed; its unused earmarks were lifted.
    ReservationEnded {
        /// Unused earmarks lifted (returned to the pool).
        returned: u32,
        /// Earmarked sandboxes allocated to the track during the window.
        used: u32,
    },
}

/// One line of a refusal summary: `count` allocation requests of `track` (and `prefix`)
/// refused for `reason`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalTally {
    /// The track named by the request, if any.
    pub track: Option<String>,
    /// The name prefix asked for, if any.
    pub prefix: Option<String>,
    /// Why: the allocation outcome (`no_sandboxes`, `quota_exceeded`, `caller_limit`,
    /// `address_limit`, `maintenance`, `unknown_prefix`).
    pub reason: String,
    /// Requests refused.
    pub count: u64,
}

/// Events of an API instance's usage stream (`usage#<instance>`): what usage reports count that
/// no other event records (ADR 0030). Written only with `WRITE_EVENTS_USAGE=true`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UsageEvent {
    /// The allocation requests this instance refused in `[since, until)`, by track, prefix
    /// and reason; written only for an interval with at least one refusal.
    RefusalsSummarized {
        /// Start of the interval.
        since: DateTime<Utc>,
        /// End of the interval.
        until: DateTime<Utc>,
        /// The counts (each non-zero).
        refusals: Vec<RefusalTally>,
    },
}

/// Events of a waiting-line ticket stream (`ticket#<id>`): an allocation request that asked
/// `Prefer: respond-async` and found nothing free. Written only with
/// `WRITE_EVENTS_WAITING_LINE` (docs/upgrades.md); any API instance serves and answers it.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TicketEvent {
    /// The request joined the line; the allocation it stands for is made when it is served.
    TicketIssued {
        /// The student.
        caller: String,
        /// The track the allocation is for.
        track_name: Option<String>,
        /// The name prefix asked for.
        name_prefix: Option<String>,
        /// The idempotency key the allocation uses (stored hashed where it is a credential).
        idempotency_key: String,
        /// When the request joined the line.
        issued_at: DateTime<Utc>,
        /// The ticket drops out of the line when not polled for this long.
        idle_drop_after_s: u64,
    },
    /// The owner asked for the ticket (recorded at most every quarter of the idle bound).
    TicketPolled {
        /// When.
        polled_at: DateTime<Utc>,
    },
    /// A sandbox was allocated for the ticket.
    TicketServed {
        /// The sandbox allocated.
        sandbox_id: String,
        /// How long the ticket waited, ms.
        waited_ms: u64,
    },
    /// The ticket left the line without a sandbox.
    TicketDropped {
        /// `not_polled`, `refused` (another refusal when its turn came) or `expired`.
        reason: String,
    },
}

macro_rules! domain_event {
    ($ty:ty) => {
        impl DomainEvent for $ty {
            fn event_type(&self) -> String {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::Object(map)) => map
                        .get("type")
                        .and_then(|t| t.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    _ => String::new(),
                }
            }

            fn event_version(&self) -> String {
                CURRENT_SCHEMA_VERSION.to_string()
            }
        }
    };
}
domain_event!(SandboxEvent);
domain_event!(ClaimEvent);
domain_event!(SyncEvent);
domain_event!(AdminJobEvent);
domain_event!(PoolControlEvent);
domain_event!(QuotaEvent);
domain_event!(ReservationEvent);
domain_event!(UsageEvent);
domain_event!(TicketEvent);

/// Every event type the broker records (the `type` tag of each variant of [`SandboxEvent`],
/// [`ClaimEvent`], [`SyncEvent`], [`AdminJobEvent`], [`PoolControlEvent`],
/// [`QuotaEvent`], [`ReservationEvent`], [`UsageEvent`] and [`TicketEvent`]): what audit filters
/// and schemas accept. A unit test keeps it equal to the enums.
pub const EVENT_TYPES: [&str; 38] = [
    "SandboxRegistered",
    "SandboxAllocated",
    "DeletionRequested",
    "AllocationExpired",
    "SandboxMarkedStale",
    "SandboxRestored",
    "DeletionAttemptFailed",
    "DeletionFailed",
    "DeletionLeased",
    "DeletionRetried",
    "SandboxDeleted",
    "SandboxRetired",
    "LeaseExtended",
    "SandboxReserved",
    "SandboxUnreserved",
    "HeartbeatMissed",
    "ClaimGranted",
    "ClaimReleased",
    "ListingRecorded",
    "AdminJobListed",
    "AdminJobStarted",
    "AdminJobProgressed",
    "AdminJobFinished",
    "PoolDrained",
    "PoolResumed",
    "QuotaSlotTaken",
    "QuotaSlotReleased",
    "ReservationListed",
    "ReservationCreated",
    "ReservationEarmarked",
    "ReservationShortfallRecorded",
    "ReservationCancelled",
    "ReservationEnded",
    "RefusalsSummarized",
    "TicketIssued",
    "TicketPolled",
    "TicketServed",
    "TicketDropped",
];

/// Any decoded event, by the kind of stream it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerEvent {
    /// From a `sandbox#` stream.
    Sandbox(SandboxEvent),
    /// From a `claim#` stream.
    Claim(ClaimEvent),
    /// From the sync stream.
    Sync(SyncEvent),
    /// From an `adminjob#` stream.
    AdminJob(AdminJobEvent),
    /// From the pool-control stream.
    PoolControl(PoolControlEvent),
    /// From a `quota#` stream.
    Quota(QuotaEvent),
    /// From a `reservation#` stream.
    Reservation(ReservationEvent),
    /// From a `usage#` stream.
    Usage(UsageEvent),
    /// From a `ticket#` stream (the waiting line's `Prefer: respond-async` tickets).
    Ticket(TicketEvent),
    /// An event this build does not know: a newer release wrote it (an event type, a stream
    /// kind or a schema version this build has never seen). Readers skip and count it, and
    /// never act on a stream that holds one (ADR 0023); audit and feeds pass its envelope on.
    Unknown(UnknownEvent),
}

/// What a reader knows about an event written by a newer release: only its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEvent {
    /// The stream it belongs to.
    pub stream_id: String,
    /// Its version in that stream.
    pub version: u64,
    /// Its `event_type`, as stored.
    pub event_type: String,
    /// Its `schema_version`, as stored.
    pub schema_version: u32,
}

impl std::fmt::Display for UnknownEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} v{} is {} (schema {}), written by a newer release",
            self.stream_id, self.version, self.event_type, self.schema_version
        )
    }
}

/// True when this build can read events of `stream_id`'s kind.
pub fn is_known_stream(stream_id: &str) -> bool {
    stream_id.starts_with(SANDBOX_STREAM_PREFIX)
        || stream_id.starts_with(CLAIM_STREAM_PREFIX)
        || stream_id == SYNC_STREAM_ID
        || stream_id.starts_with(ADMIN_JOB_STREAM_PREFIX)
        || stream_id == POOL_CONTROL_STREAM_ID
        || stream_id.starts_with(QUOTA_STREAM_PREFIX)
        || stream_id.starts_with(RESERVATION_STREAM_PREFIX)
        || stream_id.starts_with(USAGE_STREAM_PREFIX)
        || stream_id.starts_with(TICKET_STREAM_PREFIX)
}

/// Who caused an event: `track:<caller>`, `admin` or `job:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A track script acting for a student.
    Track(String),
    /// An operator through the admin API.
    Admin,
    /// A background job.
    Job(&'static str),
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Track(caller) => write!(f, "track:{caller}"),
            Actor::Admin => f.write_str("admin"),
            Actor::Job(name) => write!(f, "job:{name}"),
        }
    }
}

/// Request-scoped facts stamped on every event a command appends.
#[derive(Debug, Clone)]
pub struct CommandMeta {
    /// Who.
    pub actor: Actor,
    /// The API request id (equals the `X-Request-ID` header), if any.
    pub request_id: Option<String>,
    /// Ties together the events of one logical operation (e.g. a job run).
    pub correlation_id: Option<String>,
}

impl CommandMeta {
    /// Metadata for a background job run.
    pub fn job(name: &'static str, correlation_id: impl Into<String>) -> Self {
        Self {
            actor: Actor::Job(name),
            request_id: None,
            correlation_id: Some(correlation_id.into()),
        }
    }
}

/// One stored event: the envelope of DESIGN.md §4 around a JSON payload.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// `sandbox#…`, `claim#…`, `sync#…`, `pool#control` or `quota#…`.
    pub stream_id: String,
    /// 1, 2, … within the stream.
    pub version: u64,
    /// The payload's tag, e.g. `SandboxAllocated`.
    pub event_type: String,
    /// Payload schema version.
    pub schema_version: u32,
    /// UUID v7 (time-ordered).
    pub event_id: Uuid,
    /// When it was recorded (UTC, millisecond precision).
    #[serde(with = "rfc3339_ms")]
    #[cfg_attr(feature = "schema", schemars(with = "DateTime<Utc>"))]
    pub occurred_at: DateTime<Utc>,
    /// `track:<caller>`, `admin` or `job:<name>`.
    pub actor: String,
    /// The API request that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The logical operation it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The serde-tagged event.
    pub payload: serde_json::Value,
}

/// Why a stored event could not be decoded. An event a newer release wrote is not an error:
/// [`EventEnvelope::decode`] returns it as [`BrokerEvent::Unknown`].
#[derive(Debug, Error)]
pub enum DecodeError {
    /// A schema version newer than this build knows (only [`upcast`] returns it; `decode`
    /// turns it into [`BrokerEvent::Unknown`]).
    #[error("{event_type} has schema version {found}, newer than {CURRENT_SCHEMA_VERSION}")]
    FutureSchema {
        /// The event type.
        event_type: String,
        /// Its stored schema version.
        found: u32,
    },
    /// The payload does not match the event type.
    #[error("payload of {event_type}: {source}")]
    Payload {
        /// The event type.
        event_type: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

/// One step of upcasting: turns a stored payload of `event_type` written at `from_version` into
/// the shape of `from_version + 1`. Registering one is what allows an incompatible payload change
/// (the event-contract check in `docs/events/` accepts a break only for an upcasted type).
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    /// The event type it applies to.
    pub event_type: &'static str,
    /// The schema version it reads.
    pub from_version: u32,
    /// The conversion.
    pub apply: fn(serde_json::Value) -> serde_json::Value,
}

/// Every registered upcaster, applied in version order by [`upcast`]. None yet: schema 1 is the
/// only one so far.
pub const UPCASTERS: &[Upcaster] = &[];

/// Brings a stored payload up to [`CURRENT_SCHEMA_VERSION`] through the [`UPCASTERS`], instead of
/// rewriting history.
pub fn upcast(
    event_type: &str,
    schema_version: u32,
    payload: serde_json::Value,
) -> Result<serde_json::Value, DecodeError> {
    if schema_version > CURRENT_SCHEMA_VERSION {
        return Err(DecodeError::FutureSchema {
            event_type: event_type.to_string(),
            found: schema_version,
        });
    }
    let mut payload = payload;
    for version in schema_version..CURRENT_SCHEMA_VERSION {
        for step in UPCASTERS
            .iter()
            .filter(|u| u.event_type == event_type && u.from_version == version)
        {
            payload = (step.apply)(payload);
        }
    }
    Ok(payload)
}

impl EventEnvelope {
    /// Wraps a new event for `stream_id` at `version`.
    pub fn new<E: DomainEvent>(
        stream_id: &str,
        version: u64,
        event: &E,
        meta: &CommandMeta,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        let payload = serde_json::to_value(event).unwrap_or(serde_json::Value::Null);
        // The tag is already in the payload; `event_type()` would serialise the event again.
        let event_type = match payload.get("type").and_then(|t| t.as_str()) {
            Some(tag) => tag.to_string(),
            None => event.event_type(),
        };
        Self {
            stream_id: stream_id.to_string(),
            version,
            event_type,
            schema_version: CURRENT_SCHEMA_VERSION,
            event_id: Uuid::now_v7(),
            occurred_at: truncate_to_millis(occurred_at),
            actor: meta.actor.to_string(),
            request_id: meta.request_id.clone(),
            correlation_id: meta.correlation_id.clone(),
            payload,
        }
    }

    /// Decodes the payload (after upcasting) by the stream's kind. An event type, stream kind or
    /// schema version this build does not know is [`BrokerEvent::Unknown`] (a newer release
    /// wrote it; ADR 0023); only a known event type whose payload does not parse is an error
    /// (a corrupt item).
    pub fn decode(&self) -> Result<BrokerEvent, DecodeError> {
        if let Some(unknown) = self.unknown() {
            return Ok(BrokerEvent::Unknown(unknown));
        }
        let payload = upcast(&self.event_type, self.schema_version, self.payload.clone())?;
        let err = |source| DecodeError::Payload {
            event_type: self.event_type.clone(),
            source,
        };
        let stream = self.stream_id.as_str();
        if stream.starts_with(SANDBOX_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::Sandbox)
                .map_err(err)
        } else if stream.starts_with(CLAIM_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::Claim)
                .map_err(err)
        } else if stream == SYNC_STREAM_ID {
            serde_json::from_value(payload)
                .map(BrokerEvent::Sync)
                .map_err(err)
        } else if stream.starts_with(ADMIN_JOB_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::AdminJob)
                .map_err(err)
        } else if stream == POOL_CONTROL_STREAM_ID {
            serde_json::from_value(payload)
                .map(BrokerEvent::PoolControl)
                .map_err(err)
        } else if stream.starts_with(RESERVATION_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::Reservation)
                .map_err(err)
        } else if stream.starts_with(USAGE_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::Usage)
                .map_err(err)
        } else if stream.starts_with(TICKET_STREAM_PREFIX) {
            serde_json::from_value(payload)
                .map(BrokerEvent::Ticket)
                .map_err(err)
        } else {
            serde_json::from_value(payload)
                .map(BrokerEvent::Quota)
                .map_err(err)
        }
    }

    /// `Some` when a newer release wrote this event: its stream kind, its event type or its
    /// schema version is beyond what this build knows. Such an event is tolerated (skipped and
    /// counted), never misread and never an error.
    pub fn unknown(&self) -> Option<UnknownEvent> {
        let newer = !is_known_stream(&self.stream_id)
            || !EVENT_TYPES.contains(&self.event_type.as_str())
            || self.schema_version > CURRENT_SCHEMA_VERSION
            || !super::reader::knows(&self.event_type);
        newer.then(|| UnknownEvent {
            stream_id: self.stream_id.clone(),
            version: self.version,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
        })
    }

    /// The payload as a sandbox event, or `None` for other streams.
    pub fn sandbox_event(&self) -> Result<Option<SandboxEvent>, DecodeError> {
        match self.decode()? {
            BrokerEvent::Sandbox(event) => Ok(Some(event)),
            _ => Ok(None),
        }
    }
}

/// Drops sub-millisecond precision so that an envelope survives a store round trip unchanged.
pub fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

/// Formats a time the way envelopes store it: RFC 3339, UTC, milliseconds, `Z`.
pub fn format_time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serde for RFC 3339 millisecond timestamps.
pub mod rfc3339_ms {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises as `2026-01-01T00:00:00.000Z`.
    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(at))
    }

    /// Parses any RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CommandMeta {
        CommandMeta {
            actor: Actor::Track("stu#1/ü".into()),
            request_id: Some("req-1".into()),
            correlation_id: None,
        }
    }

    /// The envelope's event type is the payload's serde tag, and JSON round-trips exactly.
    #[test]
    fn envelope_round_trips_through_json() {
        let event = SandboxEvent::DeletionRequested {
            caller: "stu".into(),
            requested_at: truncate_to_millis(Utc::now()),
            reason: None,
            last_heartbeat_at: None,
        };
        let env = EventEnvelope::new("sandbox#1", 3, &event, &meta(), Utc::now());
        assert_eq!(env.event_type, "DeletionRequested");
        assert_eq!(env.actor, "track:stu#1/ü");
        assert_eq!(env.event_id.get_version_num(), 7);
        let json = serde_json::to_string(&env).unwrap_or_default();
        let back: EventEnvelope = serde_json::from_str(&json).unwrap_or_else(|_| env.clone());
        assert_eq!(back, env);
        assert!(json.contains("\"occurred_at\""));
        assert!(matches!(
            env.decode(),
            Ok(BrokerEvent::Sandbox(e)) if e == event
        ));
    }

    /// A schema version from the future is never misread: `upcast` refuses it and `decode`
    /// reports it as an unknown event (a newer release wrote it), not as an error.
    #[test]
    fn future_schema_is_unknown_not_misread() {
        let mut env = EventEnvelope::new(
            "claim#1:a#b",
            1,
            &ClaimEvent::ClaimReleased {
                sandbox_id: "1".into(),
                reason: ReleaseReason::Expired,
            },
            &meta(),
            Utc::now(),
        );
        assert!(matches!(env.decode(), Ok(BrokerEvent::Claim(_))));
        env.schema_version = 99;
        assert!(matches!(
            upcast(&env.event_type, env.schema_version, env.payload.clone()),
            Err(DecodeError::FutureSchema { .. })
        ));
        let Ok(BrokerEvent::Unknown(unknown)) = env.decode() else {
            panic!("a future schema must decode as unknown");
        };
        assert_eq!(
            (unknown.event_type.as_str(), unknown.schema_version),
            ("ClaimReleased", 99)
        );
    }

    /// An event type or a stream kind this build does not know is an unknown event carrying
    /// its envelope's facts; a known type whose payload does not parse stays an error (corrupt).
    #[test]
    fn unknown_types_and_streams_are_tolerated_corrupt_payloads_are_not() {
        let mut reserved = EventEnvelope::new(
            "sandbox#7",
            4,
            &SandboxEvent::SandboxRestored {
                restored_at: Utc::now(),
            },
            &meta(),
            Utc::now(),
        );
        reserved.event_type = "SandboxRelabelled".into();
        reserved.schema_version = 2;
        reserved.payload = serde_json::json!({"type": "SandboxRelabelled", "label": "blue"});
        assert_eq!(
            reserved.decode().ok(),
            Some(BrokerEvent::Unknown(UnknownEvent {
                stream_id: "sandbox#7".into(),
                version: 4,
                event_type: "SandboxRelabelled".into(),
                schema_version: 2,
            }))
        );
        assert!(matches!(reserved.sandbox_event(), Ok(None)));

        let mut stream = reserved.clone();
        stream.stream_id = "maintenance#m1".into();
        stream.event_type = "MaintenanceWindowPlanned".into();
        stream.schema_version = 1;
        assert!(
            matches!(stream.decode(), Ok(BrokerEvent::Unknown(u)) if u.stream_id == "maintenance#m1")
        );

        // A known type on a known stream whose payload is garbage is corrupt, as before.
        let mut corrupt = reserved.clone();
        corrupt.event_type = "SandboxRestored".into();
        corrupt.schema_version = 1;
        corrupt.payload = serde_json::json!({"type": "SandboxRestored", "restored_at": 5});
        assert!(matches!(corrupt.decode(), Err(DecodeError::Payload { .. })));
        assert!(corrupt.unknown().is_none());
    }

    /// Actors render as the envelope's `actor` strings.
    #[test]
    fn actors_render() {
        assert_eq!(Actor::Admin.to_string(), "admin");
        assert_eq!(Actor::Job("sync").to_string(), "job:sync");
    }

    /// `EVENT_TYPES` lists exactly the variants of the event enums, in declaration order
    /// (read from this file, so a new variant without a list entry fails here).
    #[test]
    fn event_types_list_every_variant() {
        let source = include_str!("events.rs");
        let mut variants = Vec::new();
        for name in [
            "SandboxEvent",
            "ClaimEvent",
            "SyncEvent",
            "AdminJobEvent",
            "PoolControlEvent",
            "QuotaEvent",
            "ReservationEvent",
            "UsageEvent",
            "TicketEvent",
        ] {
            let start = source
                .find(&format!("pub enum {name} {{"))
                .unwrap_or_else(|| panic!("enum {name} not found"));
            let body = &source[start..];
            let end = body.find("\n}").unwrap_or(body.len());
            for line in body[..end].lines().skip(1) {
                let Some(rest) = line.strip_prefix("    ") else {
                    continue;
                };
                let ident: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                if ident.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && !rest.starts_with(' ')
                {
                    variants.push(ident);
                }
            }
        }
        assert_eq!(variants, EVENT_TYPES);
    }
}
