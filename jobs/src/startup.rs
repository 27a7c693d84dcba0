//! Start-up of the `jobs` binary: which store to open (the same `STORE`, `EMBEDDED_PATH`,
//! `TABLE_PREFIX`, `DDB_ENDPOINT_URL`, `AWS_REGION`, `STATS_SHARDS` settings as the API), the
//! broker over it, and the two ways to run — the worker and a one-shot for a scheduler.
//!
//! With the embedded store the binary also keeps the view current itself (the projector's
//! embedded tail; applying is idempotent, so running it beside the API's is harmless): a one-shot
//! catches the view up before its job and again after, and the worker tails the log while it
//! runs. With DynamoDB the projector is a separate process (Lambda or poller).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use prometheus::{Registry, TextEncoder};
use tokio::sync::watch;

use domain::adapters::dynamo::{DynamoConfig, DynamoStore, DEFAULT_MAX_RETRIES};
use domain::adapters::embedded::EmbeddedStore;
use domain::{Broker, BrokerConfig, EventStore, PoolView, SharedClock, ViewStore};
use projector::{Projector, ProjectorMetrics};

use crate::config::JobsConfig;
use crate::runner::{chrono_duration, Jobs};
use crate::summary::JobKind;

/// Which store backs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One local SQLite file (shared with the API in embedded mode).
    Embedded,
    /// DynamoDB (AWS or DynamoDB Local).
    Dynamodb,
}

/// Store settings (same names and defaults as the API's).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// `embedded` or `dynamodb`.
    #[arg(long, env = "STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// The embedded store's file.
    #[arg(long, env = "EMBEDDED_PATH", default_value = "data/broker.db")]
    pub embedded_path: PathBuf,
    /// Table-name prefix: `{prefix}-events|pool|stats|checkpoints`.
    #[arg(long, env = "TABLE_PREFIX", default_value = "sandbox-broker")]
    pub table_prefix: String,
    /// DynamoDB endpoint (DynamoDB Local); unset = AWS.
    #[arg(long, env = "DDB_ENDPOINT_URL")]
    pub ddb_endpoint_url: Option<String>,
    /// AWS region (else the standard chain).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Stats shard count; must match the API's.
    #[arg(long, env = "STATS_SHARDS", default_value_t = 8)]
    pub stats_shards: u32,
}

/// The opened store, as ports.
#[derive(Clone)]
pub struct Stores {
    /// The event table.
    pub events: Arc<dyn EventStore>,
    /// The view, projector side.
    pub view: Arc<dyn ViewStore>,
    /// The embedded store itself, when that is the adapter (to tail its log).
    pub embedded: Option<EmbeddedStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("embedded", &self.embedded.is_some())
            .finish_non_exhaustive()
    }
}

/// Opens the store `args` names.
pub async fn open_stores(args: &StoreArgs) -> anyhow::Result<Stores> {
    match args.store {
        StoreKind::Embedded => {
            let store = EmbeddedStore::open(&args.embedded_path, args.stats_shards)
                .with_context(|| format!("open {}", args.embedded_path.display()))?;
            Ok(Stores {
                events: Arc::new(store.clone()),
                view: Arc::new(store.clone()),
                embedded: Some(store),
            })
        }
        StoreKind::Dynamodb => {
            let store = Arc::new(
                DynamoStore::connect(DynamoConfig {
                    table_prefix: args.table_prefix.clone(),
                    endpoint_url: args.ddb_endpoint_url.clone(),
                    region: args.aws_region.clone(),
                    stats_shards: args.stats_shards,
                    max_retries: DEFAULT_MAX_RETRIES,
                })
                .await
                .context("connect to DynamoDB")?,
            );
            Ok(Stores {
                events: store.clone(),
                view: store,
                embedded: None,
            })
        }
    }
}

/// The broker the jobs command: only `execute` and the view are used, so the allocation
/// settings keep their defaults; the expiry grace follows `GRACE_PERIOD_MINUTES`.
pub fn broker(stores: &Stores, clock: SharedClock, config: &JobsConfig) -> Arc<Broker> {
    let view: Arc<dyn PoolView> = stores.view.clone();
    Arc::new(Broker::new(
        stores.events.clone(),
        view,
        clock,
        BrokerConfig {
            expiry_grace: chrono_duration(config.expiry_grace),
            ..BrokerConfig::default()
        },
    ))
}

/// Applies everything the embedded log holds that the view has not seen (no-op for DynamoDB).
pub async fn catch_up(stores: &Stores, metrics: &ProjectorMetrics) -> anyhow::Result<()> {
    if let Some(store) = &stores.embedded {
        let projector = Projector::new(stores.events.clone(), stores.view.clone(), metrics.clone());
        projector::embedded::catch_up(&projector, store)
            .await
            .context("project the embedded log")?;
    }
    Ok(())
}

/// One job, once: catch up, run, catch up (embedded). Returns the summary JSON.
pub async fn run_once(
    jobs: &Jobs,
    stores: &Stores,
    kind: JobKind,
    grace: Option<chrono::Duration>,
) -> anyhow::Result<serde_json::Value> {
    let metrics = ProjectorMetrics::unregistered();
    catch_up(stores, &metrics).await?;
    let summary = match kind {
        JobKind::DeleteStale => jobs
            .delete_stale(grace)
            .await
            .map(|s| crate::runner::to_json(&s)),
        kind => jobs.run(kind).await,
    };
    // Make the run's own events visible to the next one-shot (e.g. sync's registrations).
    catch_up(stores, &metrics).await?;
    Ok(summary?)
}

/// The worker: every job loop (and, embedded, the projector tail) until `shutdown`; optionally
/// `/metrics` on `metrics_addr`.
pub async fn run_worker(
    jobs: Arc<Jobs>,
    stores: Stores,
    registry: Registry,
    metrics_addr: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    if let Some(store) = &stores.embedded {
        let metrics = ProjectorMetrics::new(&registry).context("projector metrics")?;
        let projector = Projector::new(stores.events.clone(), stores.view.clone(), metrics);
        projector::embedded::catch_up(&projector, store).await?;
        tasks.push(tokio::spawn(projector::embedded::run(
            projector,
            store.clone(),
            stopped(),
        )));
    }
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind metrics listener {addr}"))?;
        tracing::info!(target: "job", %addr, "serving /metrics");
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { render_metrics(&registry) }
            }),
        );
        let shutdown = stopped();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(target: "job", error = %e, "metrics listener failed");
            }
        }));
    }
    // The job loops stop first (finishing their items), then the projector applies what they
    // appended, then the metrics listener closes.
    crate::worker::run(jobs, shutdown).await;
    stop.send_replace(true);
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(target: "job", error = %e, "background task ended abnormally");
        }
    }
    Ok(())
}

fn render_metrics(registry: &Registry) -> (axum::http::HeaderMap, String) {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    let body = TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"));
    (headers, body)
}
