//! The fault-testing harness (`tests/tests/it/chaos.rs`, the soak bench): the real binaries as
//! killable child processes, a fault-injecting proxy in front of DynamoDB Local, and the summary
//! table every fault test prints.
//!
//! - [`process`] — build, start, SIGKILL, SIGTERM and restart `command-api`, `projector`, `jobs`.
//! - [`fault_proxy`] — throttling, 500s, latency, dropped connections and answers lost after the
//!   write committed, at a seeded rate.
//! - [`load`] — the mixed student load (allocate, replay, mark-for-deletion) with its checks.
//! - [`summary`] — the rows of the summary table and its rendering.

pub mod fault_proxy;
pub mod load;
pub mod process;
pub mod summary;
