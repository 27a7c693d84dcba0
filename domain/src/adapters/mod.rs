//! Implementations of the storage ports.

pub mod dynamo;
pub mod embedded;
mod embedded_prefix_stats; // per-prefix counters kept by triggers on the pool table
