//! Implementations of the storage ports.

pub mod dynamo;
pub mod embedded;
