//! The pure model: no I/O, no SDK. Aggregates, commands, events, lifecycle, projection.

pub mod admin_job;
pub mod claim;
pub mod error;
pub mod events;
pub mod ids;
pub mod lifecycle;
pub mod pool_control;
pub mod pool_prefix;
pub mod projection;
pub mod quota;
pub mod reader;
pub mod reservation;
pub mod sandbox;
#[cfg(feature = "schema")]
pub mod schema;
