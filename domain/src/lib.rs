//! Sandbox Broker's domain: the event-sourced model of a pool of pre-created CSP sandbox accounts
//! handed to lab students, the command service, and the storage ports it is read and written
//! through. Pure: no AWS SDK and no SQLite in its dependencies. The adapters behind the ports live
//! in their own crates (`store-dynamodb`, `store-embedded`), held to one contract by
//! `store-conformance`.
//!
//! # Layout
//! - [`clock`] — the injectable `Clock` (system and manual).
//! - [`model`] — pure model, no I/O: [`model::ids`] (stream ids), [`model::events`] (events,
//!   envelope, upcasting), [`model::lifecycle`] (the transition table), [`model::sandbox`] and
//!   [`model::claim`] (cqrs-es aggregates), [`model::projection`] (`project`, `PoolRow`, stats),
//!   `model::schema` (feature `schema`: JSON Schemas of the events and the compatibility check).
//!   [`model::reader`] narrows, once per process, the event types this process reads (the
//!   forward-direction upgrade test reads the current log knowing the previous release's set).
//! - [`store`] — the ports: `EventStore`, `PoolView`, `ViewStore`, `EventFeed`; the append rules
//!   every adapter checks (`validate_append`), and the projector's idempotent `apply_event`.
//! - [`service`] — the command side: strong loads, decisions, conditional appends, allocation.
//! - [`audit`] — the auditor's side over the `EventFeed` port: paged audit queries,
//!   point-in-time state, a caller's allocations, pool replay at an instant, the live-feed tail.
//! - [`heartbeat`] — heartbeat policies per track and the reclaim decision (ADR 0030).
//! - [`usage`] — usage reports folded from the event log in bounded memory (ADR 0030).
//! - [`restore`] — importing an export into a fresh event table, and the cross-stream
//!   consistency check of a (restored) log.
//! - [`erasure`] — erasing a student's subject record: the rules the admin route and
//!   `broker-audit erase` share (ADR 0033).

pub mod audit;
pub mod clock;
pub mod erasure;
pub mod heartbeat;
pub mod model;
pub mod restore;
pub mod service;
pub mod store;
pub mod usage;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use model::error::DomainError;
pub use model::events::{Actor, CommandMeta, EventEnvelope};
pub use model::lifecycle::SandboxStatus;
pub use model::projection::{PoolRow, PoolStats, StatsDelta};
pub use service::{
    AllocateRequest, Allocation, AllocationLimits, Broker, BrokerConfig, BrokerError, CapKind,
    FairShareCap,
};
pub use store::{EventStore, PoolView, StoreError, ViewStore};
