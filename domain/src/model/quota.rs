//! The per-track quota aggregate: which sandboxes currently hold one of a track's slots.
//!
//! Concurrent allocations of a track all append to its quota stream in their own transaction,
//! so the stream's version check — not a read-then-check — is what keeps the count at or below
//! the limit: of two allocations that saw the same count, only one commits.

use serde::{Deserialize, Serialize};

use super::events::QuotaEvent;

/// The slots in use, folded from a quota stream (its latest event carries the holders).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    /// Sandboxes holding a slot.
    pub holders: Vec<String>,
    /// The stream's version.
    pub version: u64,
}

/// Why a slot could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaFull {
    /// The limit in force.
    pub limit: u32,
}

impl QuotaUsage {
    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.holders.len()
    }

    /// The event that gives `sandbox_id` a slot under `limit`.
    pub fn take(&self, sandbox_id: &str, limit: u32) -> Result<QuotaEvent, QuotaFull> {
        if self.holders.len() >= limit as usize {
            return Err(QuotaFull { limit });
        }
        let mut holders = self.holders.clone();
        holders.push(sandbox_id.to_string());
        Ok(QuotaEvent::QuotaSlotTaken {
            sandbox_id: sandbox_id.to_string(),
            limit,
            holders,
        })
    }

    /// The event that frees `sandbox_id`'s slot, or nothing when it holds none (allocated
    /// without a quota, or released already).
    pub fn release(&self, sandbox_id: &str) -> Option<QuotaEvent> {
        if !self.holders.iter().any(|h| h == sandbox_id) {
            return None;
        }
        let holders = self
            .holders
            .iter()
            .filter(|h| h.as_str() != sandbox_id)
            .cloned()
            .collect();
        Some(QuotaEvent::QuotaSlotReleased {
            sandbox_id: sandbox_id.to_string(),
            holders,
        })
    }

    /// Folds one event.
    pub fn fold(&mut self, event: &QuotaEvent) {
        match event {
            QuotaEvent::QuotaSlotTaken { holders, .. }
            | QuotaEvent::QuotaSlotReleased { holders, .. } => self.holders.clone_from(holders),
        }
        self.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots are taken up to the limit, released once, and only by their holder.
    #[test]
    fn slots_follow_the_limit() {
        let mut usage = QuotaUsage::default();
        for id in ["a", "b"] {
            match usage.take(id, 2) {
                Ok(event) => usage.fold(&event),
                Err(full) => panic!("slot refused under the limit: {full:?}"),
            }
        }
        assert_eq!(usage.take("c", 2), Err(QuotaFull { limit: 2 }));
        assert!(usage.release("c").is_none());
        if let Some(event) = usage.release("a") {
            usage.fold(&event);
        }
        assert!(usage.release("a").is_none());
        assert_eq!(usage.in_use(), 1);
        assert!(usage.take("c", 2).is_ok());
        assert_eq!(usage.version, 3);
    }
}
