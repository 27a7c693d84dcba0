//! One router per resource, merged in `crate::app`.

pub mod admin;
pub mod admin_jobs;
pub mod cursor;
pub mod dashboard;
pub mod events;
pub mod heartbeat;
pub mod ops;
pub mod outcomes;
pub mod pool;
pub mod reservations;
pub mod sandbox_ref;
pub mod sandboxes;
pub mod students;
pub mod tickets;
pub mod usage;
pub mod waiting;
pub mod waiting_lines;
pub mod webhooks;
