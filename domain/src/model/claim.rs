//! The Claim aggregate: which sandbox a (caller, idempotency key) pair holds. Its stream makes
//! "one live allocation per pair" a version check instead of an index lookup.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::error::DomainError;
use super::events::{ClaimEvent, ReleaseReason};
use super::sandbox::CommandServices;

/// Commands on a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimCommand {
    /// Record that the pair now holds `sandbox_id`.
    Grant {
        /// The student.
        caller: String,
        /// The idempotency key.
        idempotency_key: String,
        /// The sandbox.
        sandbox_id: String,
    },
    /// The allocation of `sandbox_id` ended.
    Release {
        /// The sandbox that was held.
        sandbox_id: String,
        /// Why.
        reason: ReleaseReason,
    },
}

/// State folded from a claim stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The sandbox held right now, if any.
    pub active: Option<String>,
    /// Every sandbox this pair ever held, oldest first.
    pub history: Vec<String>,
    /// Events applied.
    pub version: u64,
}

impl Claim {
    /// Decides the events for `command`.
    pub fn decide(&self, command: ClaimCommand) -> Result<Vec<ClaimEvent>, DomainError> {
        match command {
            ClaimCommand::Grant {
                caller,
                idempotency_key,
                sandbox_id,
            } => match &self.active {
                Some(held) => Err(DomainError::ClaimTaken {
                    sandbox_id: held.clone(),
                }),
                None => Ok(vec![ClaimEvent::ClaimGranted {
                    caller,
                    idempotency_key,
                    sandbox_id,
                }]),
            },
            ClaimCommand::Release { sandbox_id, reason } => {
                if self.active.as_deref() == Some(sandbox_id.as_str()) {
                    Ok(vec![ClaimEvent::ClaimReleased { sandbox_id, reason }])
                } else {
                    Ok(vec![])
                }
            }
        }
    }

    /// Folds one event.
    pub fn fold(&mut self, event: &ClaimEvent) {
        self.version += 1;
        match event {
            ClaimEvent::ClaimGranted { sandbox_id, .. } => {
                self.active = Some(sandbox_id.clone());
                self.history.push(sandbox_id.clone());
            }
            ClaimEvent::ClaimReleased { .. } => self.active = None,
        }
    }
}

impl Aggregate for Claim {
    const TYPE: &'static str = "claim";
    type Command = ClaimCommand;
    type Event = ClaimEvent;
    type Error = DomainError;
    type Services = CommandServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.fold(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str) -> ClaimCommand {
        ClaimCommand::Grant {
            caller: "stu".into(),
            idempotency_key: "k".into(),
            sandbox_id: id.into(),
        }
    }

    /// A claim holds one sandbox at a time; release frees it for the next allocation.
    #[test]
    fn one_live_allocation_per_claim() {
        let mut claim = Claim::default();
        let events = claim.decide(grant("1")).unwrap_or_default();
        claim.fold(&events[0]);
        assert_eq!(
            claim.decide(grant("2")),
            Err(DomainError::ClaimTaken {
                sandbox_id: "1".into()
            })
        );
        let release = ClaimCommand::Release {
            sandbox_id: "1".into(),
            reason: ReleaseReason::DeletionRequested,
        };
        let events = claim.decide(release.clone()).unwrap_or_default();
        assert_eq!(events.len(), 1);
        claim.fold(&events[0]);
        assert_eq!(claim.decide(release), Ok(vec![]), "release is idempotent");
        assert_eq!(claim.decide(grant("2")).map(|e| e.len()), Ok(1));
        assert_eq!(claim.history, vec!["1".to_string()]);
    }
}
