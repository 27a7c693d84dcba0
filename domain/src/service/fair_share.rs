//! Fair-share caps of one allocation (DESIGN.md §11, docs/tenancy.md): at most N live allocations
//! per caller (and scope), per client address, and per principal under the shared token.
//!
//! Each cap is a quota stream (`quota#caller#…`, `quota#addr#…`, `quota#principal#…`, the same
//! `QuotaSlotTaken` events as a track quota, so no new event type): every allocation the cap
//! governs appends to the stream at the version it read, **in the allocation's own transaction**,
//! so of two allocations that saw the same count only one commits — exact under any burst, with
//! no extra round trip on the hot path.
//!
//! Unlike a track quota, a cap is not released by the command that ends the allocation (that
//! command does not know which address or principal allocated). Instead, a holder is dropped when
//! the cap is found full and the holder's sandbox is no longer allocated: a sandbox is single-use,
//! so "not allocated" means the allocation ended for good. The count can only be overstated in
//! between (a conservative error), never understated.

use sha2::{Digest, Sha256};

use super::BrokerError;
use crate::model::events::BrokerEvent;
use crate::model::ids::QUOTA_STREAM_PREFIX;
use crate::model::lifecycle::SandboxStatus;
use crate::model::quota::QuotaUsage;
use crate::model::sandbox::Sandbox;
use crate::store::decode_stored as decode;
use crate::store::EventStore;

/// What a cap counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    /// Live allocations of one caller id in one scope (a track credential, or the shared token).
    Caller,
    /// Live allocations made from one client address.
    Address,
    /// Live allocations of one principal (the shared token's quota).
    Principal,
}

impl std::fmt::Display for CapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CapKind::Caller => "this student (caller id)",
            CapKind::Address => "this client address",
            CapKind::Principal => "the shared track token",
        })
    }
}

/// One cap on the live allocations an allocation request joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FairShareCap {
    /// What it counts.
    pub kind: CapKind,
    /// Its quota stream.
    pub stream_id: String,
    /// Live allocations allowed.
    pub limit: u32,
}

impl FairShareCap {
    /// At most `limit` live allocations of `caller` within `scope` (a track name, or the shared
    /// token's principal): `quota#caller#<bytes of scope>:<scope>#<caller>` (length-prefixed, so
    /// no two pairs share a stream).
    pub fn caller(scope: &str, caller: &str, limit: u32) -> Self {
        Self {
            kind: CapKind::Caller,
            stream_id: format!(
                "{QUOTA_STREAM_PREFIX}caller#{}:{scope}#{caller}",
                scope.len()
            ),
            limit,
        }
    }

    /// At most `limit` live allocations from one client address. Only a hash of the address is
    /// stored (the stream id), never the address.
    pub fn address(address: &str, limit: u32) -> Self {
        let digest = Sha256::digest(format!("address\0{address}").as_bytes());
        Self {
            kind: CapKind::Address,
            stream_id: format!("{QUOTA_STREAM_PREFIX}addr#{}", &hex_of(&digest)[..32]),
            limit,
        }
    }

    /// At most `limit` live allocations of a principal (e.g. every allocation of the shared
    /// token outside the tracks `TRACK_QUOTAS` names).
    pub fn principal(name: &str, limit: u32) -> Self {
        Self {
            kind: CapKind::Principal,
            stream_id: format!("{QUOTA_STREAM_PREFIX}principal#{name}"),
            limit,
        }
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cap's holders now (strong read of the stream's latest event).
pub(super) async fn load(
    events: &dyn EventStore,
    stream_id: &str,
) -> Result<QuotaUsage, BrokerError> {
    let Some(latest) = events.load_latest(stream_id).await? else {
        return Ok(QuotaUsage::default());
    };
    let mut usage = QuotaUsage::default();
    if let BrokerEvent::Quota(event) = decode(&latest)? {
        usage.fold(&event);
    }
    usage.version = latest.version;
    Ok(usage)
}

/// Drops holders whose allocation has ended, oldest first, until the cap has room (or every
/// holder is live). The version is kept: the next take appends at it, so a concurrent change of
/// the stream still conflicts.
pub(super) async fn prune(
    events: &dyn EventStore,
    mut usage: QuotaUsage,
    limit: u32,
) -> Result<QuotaUsage, BrokerError> {
    let mut live = Vec::with_capacity(usage.holders.len());
    let mut holders = std::mem::take(&mut usage.holders).into_iter();
    while let Some(holder) = holders.next() {
        let mut sandbox = Sandbox::default();
        for envelope in events
            .load(&crate::model::ids::sandbox_stream(&holder))
            .await?
        {
            if let BrokerEvent::Sandbox(event) = decode(&envelope)? {
                sandbox.fold(&event);
            }
        }
        if sandbox.status == Some(SandboxStatus::Allocated) {
            live.push(holder);
        } else if live.len() + holders.len() < limit as usize {
            break;
        }
    }
    live.extend(holders);
    usage.holders = live;
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cap streams are quota streams (old readers decode them), unambiguous, and an address is
    /// stored only hashed.
    #[test]
    fn cap_streams_are_quota_streams() {
        let a = FairShareCap::caller("a#b", "c", 1);
        let b = FairShareCap::caller("a", "b#c", 1);
        assert_ne!(a.stream_id, b.stream_id);
        assert!(a.stream_id.starts_with(QUOTA_STREAM_PREFIX));
        let addr = FairShareCap::address("203.0.113.7", 2);
        assert!(!addr.stream_id.contains("203.0.113.7"));
        assert_eq!(
            addr.stream_id,
            FairShareCap::address("203.0.113.7", 3).stream_id
        );
        assert!(FairShareCap::principal("shared-track", 5)
            .stream_id
            .starts_with(QUOTA_STREAM_PREFIX));
    }
}
