//! Sandbox Broker's domain: the event-sourced model of a pool of pre-created CSP sandbox accounts
//! handed to lab students, the storage ports it is read and written through, and the adapters
//! behind those ports (DynamoDB and an embedded single-file store).
//!
//! # Layout
//! - [`clock`] — the injectable `Clock` (system and manual).
//! - [`model`] — pure model, no I/O: [`model::ids`] (stream ids), [`model::events`] (events,
//!   envelope, upcasting), [`model::lifecycle`] (the transition table), [`model::sandbox`] and
//!   [`model::claim`] (cqrs-es aggregates), [`model::projection`] (`project`, `PoolRow`, stats),
//!   `model::schema` (feature `schema`: JSON Schemas of the events and the compatibility check).
//! - [`store`] — the ports: `EventStore`, `PoolView`, `ViewStore`, `EventFeed`; the append rules
//!   every adapter checks (`validate_append`), and the projector's idempotent `apply_event`.
//! - [`service`] — the command side: strong loads, decisions, conditional appends, allocation.
//! - [`adapters`] — `embedded` (SQLite file) and `dynamo` (aws-sdk-dynamodb) implementations of
//!   the ports, each split into the same rooms (`event_store`, `pool_view`, `view_store`, `feed`,
//!   `tables`); the model never imports them.
//! - [`audit`] — the auditor's side over the `EventFeed` port: paged audit queries,
//!   point-in-time state, a caller's allocations, pool replay at an instant, the live-feed tail.

pub mod adapters;
pub mod audit;
pub mod clock;
pub mod model;
pub mod service;
pub mod store;

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
