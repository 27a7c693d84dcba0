//! One router per resource, merged in `crate::app`.

pub mod admin;
pub mod dashboard;
pub mod events;
pub mod ops;
pub mod pool;
pub mod sandboxes;
