//! Sandbox Broker's process bootstrap: what every binary (`command-api`, `jobs`, `projector`,
//! `projector-lambda`, `broker-audit`) needs before it does its own work, written once so the
//! settings cannot drift between them.
//!
//! # Layout
//! - [`store`] — [`StoreArgs`]: store selection and options as one clap `Args` (`STORE`,
//!   `EMBEDDED_PATH`, `TABLE_PREFIX`, `DDB_ENDPOINT_URL`, `AWS_REGION`, `DDB_MAX_RETRIES`,
//!   `STATS_SHARDS`, `ENSURE_TABLES`); [`open_stores`] opens the adapters and makes sure the
//!   DynamoDB tables exist (created against an emulator, one clear error against AWS).
//! - [`store_metrics`] — `broker_store_requests_total`: DynamoDB requests by operation and table,
//!   in every process's `/metrics`.
//! - [`telemetry`] — [`LogArgs`] (`LOG_FORMAT`), [`init_tracing`], and the `/metrics` router.
//! - [`settings`] — [`parse_settings`]: clap with `env`, a blank variable counting as unset, a
//!   secret setting refused on the command line.
//! - [`secret`] — [`Secret`], the setting that cannot be printed; reading one from a variable or
//!   a file; the strength every configured secret must have.
//! - [`signal`] — [`shutdown_signal`] (SIGINT/SIGTERM) and [`Stop`], the fan-out stop switch
//!   background tasks wait on.
//!
//! The embedded projector tail is wired by the API alone (it runs the projector in-process in
//! embedded mode), so this crate does not depend on the projector and every binary can use it.

pub mod secret;
pub mod settings;
pub mod signal;
pub mod store;
pub mod store_metrics;
pub mod telemetry;

pub use secret::Secret;
pub use settings::{parse_settings, try_parse_settings_from};
pub use signal::{shutdown_signal, Stop};
pub use store::{open_stores, StoreArgs, StoreKind, Stores};
pub use store_metrics::StoreRequestMetrics;
pub use telemetry::{init_tracing, metrics_router, serve_metrics, LogArgs, LogFormat};
