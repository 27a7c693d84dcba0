//! Reads the whole event history back and checks the allocation invariants on it — what an
//! auditor would run: no sandbox allocated twice, no caller holding two live allocations.

use std::collections::{BTreeMap, BTreeSet};

use domain::model::events::{BrokerEvent, ClaimEvent, SandboxEvent};
use domain::store::EventStore;
use domain::EventEnvelope;

/// Every event in the store (all scan segments, all pages).
pub async fn all_events(store: &dyn EventStore) -> Vec<EventEnvelope> {
    let mut out = Vec::new();
    let segments = 4;
    for segment in 0..segments {
        let mut cursor = None;
        loop {
            let page = store
                .scan(segment, segments, cursor, 500)
                .await
                .unwrap_or_else(|e| panic!("scan: {e}"));
            out.extend(page.events);
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    out
}

/// Facts about allocations, replayed from the history.
#[derive(Debug, Default)]
pub struct AllocationAudit {
    /// sandbox id → callers it was allocated to, in order.
    pub allocations: BTreeMap<String, Vec<String>>,
    /// caller → sandboxes it currently holds (granted and not released).
    pub live_claims: BTreeMap<String, BTreeSet<String>>,
}

impl AllocationAudit {
    /// Replays `events`.
    pub fn replay(events: &[EventEnvelope]) -> Self {
        let mut audit = AllocationAudit::default();
        let mut sorted: Vec<&EventEnvelope> = events.iter().collect();
        sorted.sort_by(|a, b| (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version)));
        for e in sorted {
            match e.decode() {
                Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated { caller, .. })) => {
                    let id = domain::model::ids::sandbox_id_of(&e.stream_id)
                        .unwrap_or_default()
                        .to_string();
                    audit.allocations.entry(id).or_default().push(caller);
                }
                Ok(BrokerEvent::Claim(ClaimEvent::ClaimGranted {
                    caller, sandbox_id, ..
                })) => {
                    audit
                        .live_claims
                        .entry(caller)
                        .or_default()
                        .insert(sandbox_id);
                }
                Ok(BrokerEvent::Claim(ClaimEvent::ClaimReleased { sandbox_id, .. })) => {
                    for held in audit.live_claims.values_mut() {
                        held.remove(&sandbox_id);
                    }
                }
                _ => {}
            }
        }
        audit
    }

    /// Sandboxes allocated more than once (must be empty).
    pub fn double_allocations(&self) -> Vec<&String> {
        self.allocations
            .iter()
            .filter(|(_, callers)| callers.len() > 1)
            .map(|(id, _)| id)
            .collect()
    }

    /// Callers holding more than one live allocation (must be empty).
    pub fn callers_holding_two(&self) -> Vec<&String> {
        self.live_claims
            .iter()
            .filter(|(_, held)| held.len() > 1)
            .map(|(c, _)| c)
            .collect()
    }
}

/// Every sandbox's state folded from its own events (the truth the view and stats must match).
pub fn sandbox_states(
    events: &[EventEnvelope],
) -> BTreeMap<String, domain::model::sandbox::Sandbox> {
    let mut sorted: Vec<&EventEnvelope> = events.iter().collect();
    sorted.sort_by(|a, b| (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version)));
    let mut states: BTreeMap<String, domain::model::sandbox::Sandbox> = BTreeMap::new();
    for e in sorted {
        if let Ok(Some(event)) = e.sandbox_event() {
            let id = domain::model::ids::sandbox_id_of(&e.stream_id)
                .unwrap_or_default()
                .to_string();
            states.entry(id).or_default().fold(&event);
        }
    }
    states
}
