//! `brokerctl`: the Sandbox Broker's command-line client, for two audiences. Lab scripts use the
//! track commands (`allocate`, `status`, `release`), which retry what is worth retrying (409 no
//! sandbox yet, 429, 5xx, an unreachable service) with jittered waits that honour `Retry-After`
//! up to a deadline, and end with an exit code a script can branch on. Operators use the admin
//! commands (stats, listings, history, job runs, drains, jobs, event export and the live tail).
//!
//! # Layout
//! - [`failure`] — what can go wrong, and the documented exit code of each outcome.
//! - [`backoff`] — the retry deadline and the jittered wait before the next attempt.
//! - [`client`] — the HTTP client: base URL, bearer token, caller headers and signature, retries.
//! - [`lease_file`] — the lab's 0600 file with the allocation's idempotency key and lease token.
//! - [`live_feed`] — a resumable reader of the server-sent event stream (`Last-Event-ID`).
//! - [`render`] — output formats: JSON, `export` lines for an env file, tables.
//! - [`cli`] — the command line (clap, every setting also from the environment) and each command.
//! - [`verbs`] — the commands over the rest of the API (extend, pool, drain, resume, outcomes,
//!   jobs, delete-stale, bulk-delete, webhooks, allocations) and shell completions.
//! - [`coverage`] — which command calls each operation of the API, and the few that none does.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod coverage;
pub mod failure;
pub mod lease_file;
pub mod live_feed;
pub mod render;
pub mod verbs;
