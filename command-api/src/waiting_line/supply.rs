//! Which recorded events make a sandbox allocatable: the one place that decides whether an
//! event wakes the waiting line, and for which names. Supply is single-use (a sandbox that ends
//! is deleted, never returned), so only a few events ever add to it.

use domain::model::events::{BrokerEvent, ReservationEvent, SandboxEvent};

/// What an event made allocatable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreedSupply {
    /// A sandbox with this name: lines whose prefix starts the name may be served.
    Named(String),
    /// Sandboxes the event does not name: every line may be served.
    Any,
}

impl FreedSupply {
    /// Whether a line of `prefix` (`None`: any name) may be served by it.
    pub fn serves(&self, prefix: Option<&str>) -> bool {
        match (self, prefix) {
            (_, None) | (FreedSupply::Any, _) => true,
            (FreedSupply::Named(name), Some(prefix)) => name.starts_with(prefix),
        }
    }
}

/// Whether `event` makes a sandbox allocatable, and which: a registration by sync names its
/// sandbox; a stale sandbox listed again is available again but its event carries no name; a
/// lifted reservation earmark (cancel or window end, ADR 0028) opens its sandbox to every track,
/// and the reservation's own end or cancel says how many it returned.
pub fn frees_supply(event: &BrokerEvent) -> Option<FreedSupply> {
    match event {
        BrokerEvent::Sandbox(SandboxEvent::SandboxRegistered { name, .. }) => {
            Some(FreedSupply::Named(name.clone()))
        }
        BrokerEvent::Sandbox(
            SandboxEvent::SandboxRestored { .. } | SandboxEvent::SandboxUnreserved { .. },
        ) => Some(FreedSupply::Any),
        BrokerEvent::Reservation(
            ReservationEvent::ReservationEnded { returned, .. }
            | ReservationEvent::ReservationCancelled { returned },
        ) if *returned > 0 => Some(FreedSupply::Any),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registration serves the lines whose prefix starts its name, and the line of any name.
    #[test]
    fn registration_serves_matching_prefixes() {
        let event = BrokerEvent::Sandbox(SandboxEvent::SandboxRegistered {
            sandbox_id: "1".into(),
            name: "lab-demo-7".into(),
            external_id: "identity/accounts/u1".into(),
            sfdc_account_id: None,
            csp_created_at: None,
        });
        let freed = frees_supply(&event);
        assert_eq!(freed, Some(FreedSupply::Named("lab-demo-7".into())));
        let freed = freed.unwrap_or(FreedSupply::Named(String::new()));
        assert!(freed.serves(Some("lab-demo-")));
        assert!(freed.serves(None));
        assert!(!freed.serves(Some("other-")));
    }

    /// Events that take supply away or only move an allocation along free nothing.
    #[test]
    fn other_events_free_nothing() {
        let event = BrokerEvent::Sandbox(SandboxEvent::SandboxMarkedStale {
            marked_at: chrono::Utc::now(),
        });
        assert_eq!(frees_supply(&event), None);
        let restored = BrokerEvent::Sandbox(SandboxEvent::SandboxRestored {
            restored_at: chrono::Utc::now(),
        });
        assert_eq!(frees_supply(&restored), Some(FreedSupply::Any));
        assert!(FreedSupply::Any.serves(Some("x-")));
    }

    /// A lifted earmark, and a reservation that returned sandboxes when it ended or was
    /// cancelled, wake every line; one that returned none wakes nobody.
    #[test]
    fn returned_reservations_free_supply() {
        let lifted = BrokerEvent::Sandbox(SandboxEvent::SandboxUnreserved {
            reservation_id: "r1".into(),
        });
        assert_eq!(frees_supply(&lifted), Some(FreedSupply::Any));
        let ended = |returned| {
            BrokerEvent::Reservation(ReservationEvent::ReservationEnded { returned, used: 3 })
        };
        assert_eq!(frees_supply(&ended(2)), Some(FreedSupply::Any));
        assert_eq!(frees_supply(&ended(0)), None);
        let cancelled =
            BrokerEvent::Reservation(ReservationEvent::ReservationCancelled { returned: 1 });
        assert_eq!(frees_supply(&cancelled), Some(FreedSupply::Any));
    }
}
