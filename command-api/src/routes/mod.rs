//! One router per resource, merged in `crate::app`.

pub mod admin;
pub mod ops;
pub mod sandboxes;
