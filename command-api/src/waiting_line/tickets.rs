//! Waiting-line tickets (`Prefer: respond-async`): an allocation request that found nothing free
//! becomes a ticket, recorded as events on its own stream `ticket#<id>` (issued, polled, served,
//! dropped), so that any API instance can answer a poll and serve it. The instance that issued
//! it keeps it in its line like a waiting request; a ticket that is not polled for its idle bound
//! drops out by itself. Written only with `WRITE_EVENTS_WAITING_LINE` (docs/upgrades.md).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::model::events::{BrokerEvent, TicketEvent};
use domain::model::ids::ticket_stream;
use domain::store::EventStore;
use domain::{
    AllocateRequest, AllocationLimits, Broker, BrokerError, CommandMeta, EventEnvelope, StoreError,
};

use super::{LineKey, WaitingLine};

/// Appends of a ticket's last event retried on a lost race (each loser reads the stream again).
const FINISH_ATTEMPTS: usize = 8;

/// The settings of tickets.
#[derive(Debug, Clone, Copy)]
pub struct TicketSettings {
    /// Whether tickets are written at all (`WRITE_EVENTS_WAITING_LINE`).
    pub write: bool,
    /// A ticket not polled for this long drops out of the line (`TICKET_IDLE_SEC`).
    pub idle: Duration,
    /// The longest a ticket stays in line (`TICKET_MAX_WAIT_SEC`).
    pub max_wait: Duration,
}

impl TicketSettings {
    /// The `Retry-After` a pending ticket is answered with: a quarter of the idle bound, so a
    /// client that follows it never drops out.
    pub fn poll_after_s(&self) -> u64 {
        (self.idle.as_secs() / 4).max(1)
    }
}

/// Where a ticket stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketState {
    /// In line.
    Pending,
    /// A sandbox was allocated for it.
    Served {
        /// The sandbox.
        sandbox_id: String,
    },
    /// It left the line without a sandbox.
    Dropped {
        /// Why (`not_polled`, `expired`, `refused`, `full`).
        reason: String,
    },
}

/// A ticket folded from its stream.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Its id.
    pub ticket_id: String,
    /// The student.
    pub caller: String,
    /// The track.
    pub track_name: Option<String>,
    /// The name prefix.
    pub name_prefix: Option<String>,
    /// The idempotency key its allocation uses.
    pub idempotency_key: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it was last issued or polled.
    pub last_seen: DateTime<Utc>,
    /// Its idle bound, seconds.
    pub idle_drop_after_s: u64,
    /// Where it stands.
    pub state: TicketState,
    /// The stream's last version.
    pub version: u64,
}

impl Ticket {
    /// The line it waits in.
    pub fn line_key(&self) -> LineKey {
        LineKey {
            track: self.track_name.clone(),
            prefix: self.name_prefix.clone(),
        }
    }

    /// The allocation request it stands for.
    pub fn request(&self) -> AllocateRequest {
        AllocateRequest {
            caller: self.caller.clone(),
            idempotency_key: Some(self.idempotency_key.clone()),
            track_name: self.track_name.clone(),
            name_prefix: self.name_prefix.clone(),
        }
    }

    /// Whether it has gone unpolled past its idle bound at `now`.
    pub fn idle_at(&self, now: DateTime<Utc>) -> bool {
        let idle = chrono::Duration::seconds(i64::try_from(self.idle_drop_after_s).unwrap_or(0));
        now - self.last_seen > idle
    }
}

/// Reads ticket `ticket_id` (`None`: no such ticket).
pub async fn load(events: &dyn EventStore, ticket_id: &str) -> Result<Option<Ticket>, StoreError> {
    let stream = events.load(&ticket_stream(ticket_id)).await?;
    let mut ticket: Option<Ticket> = None;
    for envelope in &stream {
        let event = match envelope.decode() {
            Ok(BrokerEvent::Ticket(event)) => event,
            // A newer release's event: its version still counts.
            _ => {
                if let Some(t) = ticket.as_mut() {
                    t.version = envelope.version;
                }
                continue;
            }
        };
        match event {
            TicketEvent::TicketIssued {
                caller,
                track_name,
                name_prefix,
                idempotency_key,
                issued_at,
                idle_drop_after_s,
            } => {
                ticket = Some(Ticket {
                    ticket_id: ticket_id.to_string(),
                    caller,
                    track_name,
                    name_prefix,
                    idempotency_key,
                    issued_at,
                    last_seen: issued_at,
                    idle_drop_after_s,
                    state: TicketState::Pending,
                    version: envelope.version,
                });
            }
            TicketEvent::TicketPolled { polled_at } => {
                if let Some(t) = ticket.as_mut() {
                    t.last_seen = t.last_seen.max(polled_at);
                }
            }
            TicketEvent::TicketServed { sandbox_id, .. } => {
                if let Some(t) = ticket.as_mut() {
                    t.state = TicketState::Served { sandbox_id };
                }
            }
            TicketEvent::TicketDropped { reason } => {
                if let Some(t) = ticket.as_mut() {
                    t.state = TicketState::Dropped { reason };
                }
            }
        }
        if let Some(t) = ticket.as_mut() {
            t.version = envelope.version;
        }
    }
    Ok(ticket)
}

/// Records a new ticket for `request` (its key as the allocation will use it).
pub async fn issue(
    broker: &Broker,
    request: &AllocateRequest,
    meta: &CommandMeta,
    settings: &TicketSettings,
) -> Result<Ticket, StoreError> {
    let ticket_id = uuid::Uuid::new_v4().to_string();
    let now = broker.clock().now();
    let ticket = Ticket {
        ticket_id: ticket_id.clone(),
        caller: request.caller.clone(),
        track_name: request.track_name.clone(),
        name_prefix: request
            .name_prefix
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string),
        idempotency_key: request
            .idempotency_key
            .clone()
            .unwrap_or_else(|| request.caller.clone()),
        issued_at: now,
        last_seen: now,
        idle_drop_after_s: settings.idle.as_secs(),
        state: TicketState::Pending,
        version: 1,
    };
    let event = TicketEvent::TicketIssued {
        caller: ticket.caller.clone(),
        track_name: ticket.track_name.clone(),
        name_prefix: ticket.name_prefix.clone(),
        idempotency_key: ticket.idempotency_key.clone(),
        issued_at: now,
        idle_drop_after_s: ticket.idle_drop_after_s,
    };
    let envelope = EventEnvelope::new(&ticket_stream(&ticket_id), 1, &event, meta, now);
    broker.events().append(vec![envelope]).await?;
    Ok(ticket)
}

/// Records a poll of `ticket` unless one was recorded within a quarter of its idle bound (so
/// a client polling every second writes a few events per idle period, not one per poll). A
/// lost race means somebody else just wrote to the ticket: nothing to do.
pub async fn record_poll(
    broker: &Broker,
    ticket: &Ticket,
    meta: &CommandMeta,
) -> Result<(), StoreError> {
    let now = broker.clock().now();
    let quarter =
        chrono::Duration::seconds(i64::try_from(ticket.idle_drop_after_s / 4).unwrap_or(0));
    if now - ticket.last_seen < quarter {
        return Ok(());
    }
    let event = TicketEvent::TicketPolled { polled_at: now };
    let envelope = EventEnvelope::new(
        &ticket_stream(&ticket.ticket_id),
        ticket.version + 1,
        &event,
        meta,
        now,
    );
    match broker.events().append(vec![envelope]).await {
        Ok(()) | Err(StoreError::VersionConflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records how the ticket ended, unless it already has (served or dropped by another
/// instance); returns the ticket as it ends up.
pub async fn finish(
    broker: &Broker,
    ticket_id: &str,
    event: TicketEvent,
    meta: &CommandMeta,
) -> Result<Option<Ticket>, StoreError> {
    for _ in 0..FINISH_ATTEMPTS {
        let Some(ticket) = load(broker.events().as_ref(), ticket_id).await? else {
            return Ok(None);
        };
        if ticket.state != TicketState::Pending {
            return Ok(Some(ticket));
        }
        let envelope = EventEnvelope::new(
            &ticket_stream(ticket_id),
            ticket.version + 1,
            &event,
            meta,
            broker.clock().now(),
        );
        match broker.events().append(vec![envelope]).await {
            Ok(()) | Err(StoreError::VersionConflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    load(broker.events().as_ref(), ticket_id).await
}

/// Keeps `ticket` in this instance's line until it is served (then records `TicketServed`),
/// drops out (`TicketDropped`), or the instance shuts down (the ticket stays pending; a poll
/// on any instance serves it).
pub fn spawn_waiter(
    broker: Arc<Broker>,
    line: Arc<WaitingLine>,
    ticket: Ticket,
    meta: CommandMeta,
    limits: AllocationLimits,
    settings: TicketSettings,
    retry_after_s: u64,
) {
    tokio::spawn(async move {
        let request = ticket.request();
        let drop_when = unpolled(Arc::clone(&broker), ticket.ticket_id.clone(), settings);
        let waited = line
            .wait_for_ticket(
                ticket.line_key(),
                &ticket.ticket_id,
                settings.max_wait,
                BrokerError::NoSandboxAvailable { retry_after_s },
                |waited_ms| {
                    let limits = AllocationLimits {
                        waited_ms: Some(waited_ms),
                        ..limits.clone()
                    };
                    let broker = Arc::clone(&broker);
                    let request = request.clone();
                    let meta = meta.clone();
                    async move { broker.allocate_limited(&request, &meta, &limits).await }
                },
                drop_when,
            )
            .await;
        if waited.closed {
            return;
        }
        let waited_ms = u64::try_from(
            (broker.clock().now() - ticket.issued_at)
                .num_milliseconds()
                .max(0),
        )
        .unwrap_or(0);
        let event = match waited.result {
            Ok(allocation) => TicketEvent::TicketServed {
                sandbox_id: allocation.sandbox.sandbox_id,
                waited_ms,
            },
            Err(BrokerError::NoSandboxAvailable { .. }) => TicketEvent::TicketDropped {
                reason: if waited.full {
                    "full"
                } else if waited.dropped {
                    "not_polled"
                } else {
                    "expired"
                }
                .to_string(),
            },
            Err(_) => TicketEvent::TicketDropped {
                reason: "refused".to_string(),
            },
        };
        if let Err(e) = finish(&broker, &ticket.ticket_id, event, &meta).await {
            tracing::warn!(target: "waiting_line", ticket_id = %ticket.ticket_id, error = %e, "the ticket's outcome was not recorded; a poll records it");
        }
    });
}

/// Resolves once the ticket is no longer pending (served or dropped elsewhere) or has not been
/// polled for its idle bound; reads the ticket every quarter of the bound.
async fn unpolled(broker: Arc<Broker>, ticket_id: String, settings: TicketSettings) {
    let every = (settings.idle / 4).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        match load(broker.events().as_ref(), &ticket_id).await {
            Ok(Some(ticket)) => {
                if ticket.state != TicketState::Pending || ticket.idle_at(broker.clock().now()) {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(target: "waiting_line", ticket_id = %ticket_id, error = %e, "reading the ticket failed; retrying");
            }
        }
    }
}
