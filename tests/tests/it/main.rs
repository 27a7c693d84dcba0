//! The workspace's integration tests, one binary with a module per area: each `tests/*.rs` file
//! would be a binary of its own that links the whole service, so one binary links it once instead
//! of once per file. Tests are named `module::test` (`cargo test -p tests --test it chaos::`).
//! Everything in one process shares its statics: DynamoDB Local is started once for all of them
//! (`tests::ddb_local`), and the fault tests serialise among themselves (`chaos::SERIAL`).

mod admin_job_progress;
mod admin_jobs;
mod allocation_concurrency;
mod api;
mod audit;
mod candidate_pages;
mod chaos;
mod chaos_disk_full;
mod chaos_liveness;
mod connections;
mod csp_hardening;
mod drain_cache;
mod edge_cors;
mod edge_security;
mod embedded_durability;
mod group_commit;
mod idle_traffic;
mod index_shards;
mod jobs;
mod lease_lifecycle;
mod live_feed_limits;
mod liveness;
mod liveness_model;
mod metrics_endpoint;
mod openapi_constraints;
mod pool_alerts;
mod pool_metrics;
mod projector;
mod redrive;
mod restore;
mod rolling_upgrade;
mod rotation;
mod secrets;
mod self_healing;
mod shutdown;
mod startup;
mod store_conformance;
mod store_metering;
mod tenancy;
mod track_credentials;
mod waiting_line;
mod webhook_dispatch;
mod webhook_progress;
mod webhook_targets;
mod webhooks;
mod worker_shutdown;
