//! The workspace's integration tests, one binary with a module per area: each `tests/*.rs` file
//! would be a binary of its own that links the whole service, so one binary links it once instead
//! of once per file. Tests are named `module::test` (`cargo test -p tests --test it chaos::`).
//! Everything in one process shares its statics: DynamoDB Local is started once for all of them
//! (`tests::ddb_local`), and the fault tests serialise among themselves (`chaos::SERIAL`).

/// Runs each named `async fn case(backend: Backend)` of the calling module once on the embedded
/// store (`module::embedded::case`) and once on DynamoDB Local (`module::dynamodb::case`). The
/// cases return the module's `TestResult`; `both_stores!(panics: ...)` is for cases that return
/// nothing and fail by panicking. Defined before the modules, so every module below can use it.
macro_rules! both_stores {
    (@each $ret:ty; $($case:ident),+) => {
        mod embedded {
            $(
                #[doc = concat!("Embedded store: `", stringify!($case), "`.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> $ret {
                    super::$case(super::Backend::Embedded).await
                }
            )+
        }
        mod dynamodb {
            $(
                #[doc = concat!("DynamoDB Local: `", stringify!($case), "`.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> $ret {
                    super::$case(super::Backend::Dynamo).await
                }
            )+
        }
    };
    (panics: $($case:ident),+ $(,)?) => {
        both_stores!(@each (); $($case),+);
    };
    ($($case:ident),+ $(,)?) => {
        both_stores!(@each super::TestResult; $($case),+);
    };
}

mod admin_job_progress;
mod admin_jobs;
mod allocation_concurrency;
mod api;
mod audit;
mod audit_erase;
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
mod heartbeats;
mod idle_traffic;
mod index_shards;
mod jobs;
mod lease_lifecycle;
mod live_feed_limits;
mod liveness;
mod liveness_model;
mod metrics_endpoint;
mod openapi_constraints;
mod optimistic_reads;
mod oversized_requests;
mod personal_data;
mod pool_alerts;
mod pool_metrics;
mod projector;
mod redrive;
mod reservations;
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
mod usage;
mod waiting_line;
mod webhook_dispatch;
mod webhook_progress;
mod webhook_targets;
mod webhooks;
mod worker_shutdown;
