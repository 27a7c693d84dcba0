//! Implementations of the storage ports.

pub mod embedded;
