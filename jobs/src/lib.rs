//! Sandbox Broker's jobs: the CSP client and the four jobs that keep the pool honest — sync
//! (register, stale, restore), cleanup (CSP deletes with retries, quarantine and a circuit
//! breaker), auto-expiry and stale removal — plus the admin actions built on them. Every change
//! is a command through `domain::Broker::execute`, so jobs race safely with the API, with each
//! other and with other instances. The same [`Jobs`] handle backs the worker loop, the one-shot
//! runner (`jobs run …`) and the API's admin endpoints.
//!
//! # Layout
//! - [`config`] — [`JobsArgs`] (every setting as a clap flag with `env` and its default, shared
//!   with the API) and the validated [`JobsConfig`].
//! - [`csp`] — the [`CspApi`] port; [`csp::http`] (reqwest/rustls, paging, timeouts, rate limit,
//!   `429 Retry-After`), [`csp::breaker`] (circuit breaker), [`csp::mock`] (in-memory CSP).
//! - [`runner`] — [`Jobs`]: construction, stop signal, run-by-kind, the paged command sweep.
//! - [`sync`] — sync with the two-listing stale debounce recorded on `sync#csp`.
//! - [`cleanup`] — CSP deletes: strong re-check, backoff, quarantine, deferral on an open circuit.
//! - [`expiry`] — auto-expiry and stale removal (store only).
//! - [`heartbeat`] — the heartbeat reclaim: warn, then reclaim allocations whose labs went
//!   silent (ADR 0030); its settings and metrics.
//! - [`admin`] — retry a quarantined deletion; bulk delete by explicit status.
//! - [`niosxaas`] — the NIOSXaaS pre-delete hook point (no-op; follow-up documented there).
//! - [`summary`] — the serialisable run summaries and [`JobKind`].
//! - [`log_fields`] — summaries as structured log fields ([`log_summary!`]).
//! - [`metrics`] — Prometheus series (reference names kept) registered into a caller's registry.
//! - [`error`] — [`JobError`] and [`InitError`].
//! - [`worker`] — the jittered loops and graceful shutdown.
//! - [`reservations`] — the reservation job (earmark, top up, shortfall, window end) and its
//!   settings, shared with the API (ADR 0028).
//! - [`cli`] — the `jobs` binary's arguments (`worker`, `run <job>`).
//! - [`startup`] — the binary's broker over the shared bootstrap (`runtime`), one-shot and worker
//!   runners.

pub mod admin;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod csp;
pub mod error;
pub mod expiry;
pub mod heartbeat;
pub mod log_fields;
pub mod metrics;
pub mod niosxaas;
pub mod progress;
pub mod reservations;
pub mod runner;
pub mod startup;
pub mod summary;
pub mod sync;
pub mod worker;

pub use config::{
    ConfigError, CspConfig, CspMode, JobsArgs, JobsConfig, NiosxaasConfig, WorkerConfig,
};
pub use csp::{build_csp, CircuitState, CspAccount, CspApi, CspError, Deleted, Listing};
pub use error::{InitError, JobError};
pub use metrics::{CspMetrics, JobsMetrics};
pub use runner::Jobs;
pub use summary::{
    BulkDeleteSummary, CleanupSummary, ExpirySummary, JobKind, RunStatus, StaleSummary, SyncSummary,
};
