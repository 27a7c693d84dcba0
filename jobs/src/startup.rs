//! Start-up of the `jobs` binary over the shared bootstrap (`runtime`): the broker over the
//! opened store, and the two ways to run — the worker and a one-shot for a scheduler.
//!
//! The jobs only append events; the view follows through the projector, which runs elsewhere:
//! in the API's process in embedded mode (or `projector poll` beside a standalone `jobs`), and as
//! the Lambda or the poller with DynamoDB. Keeping the projector out of this crate keeps DynamoDB
//! Streams and the Lambda runtime out of the jobs binary.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus::Registry;
use runtime::{Stop, Stores};

use domain::{Broker, BrokerConfig, PoolView, SharedClock};

use crate::config::JobsConfig;
use crate::runner::{chrono_duration, Jobs};
use crate::summary::JobKind;

/// The broker the jobs command: only `execute` and the view are used, so the allocation
/// settings keep their defaults; the expiry grace follows `GRACE_PERIOD_MINUTES`. Read repair is
/// on: a command refused because its view row promised another state re-projects that row
/// (docs/adr/0010-lag-proof-allocation.md).
pub fn broker(stores: &Stores, clock: SharedClock, config: &JobsConfig) -> Arc<Broker> {
    let view: Arc<dyn PoolView> = stores.view.clone();
    Arc::new(
        Broker::new(
            stores.events.clone(),
            view,
            clock,
            BrokerConfig {
                expiry_grace: chrono_duration(config.expiry_grace),
                ..BrokerConfig::default()
            },
        )
        .with_read_repair(stores.view.clone()),
    )
}

/// One job, once. Returns the summary JSON.
pub async fn run_once(
    jobs: &Jobs,
    kind: JobKind,
    grace: Option<chrono::Duration>,
) -> anyhow::Result<serde_json::Value> {
    let summary = match kind {
        JobKind::DeleteStale => jobs
            .delete_stale(grace)
            .await
            .map(|s| crate::runner::to_json(&s)),
        kind => jobs.run(kind).await,
    };
    Ok(summary?)
}

/// The worker: every job loop until `shutdown`; optionally `/metrics` on `metrics_addr`.
pub async fn run_worker(
    jobs: Arc<Jobs>,
    registry: Registry,
    metrics_addr: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = Stop::new();
    let mut server = None;
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind metrics listener {addr}"))?;
        tracing::info!(target: "job", %addr, "serving /metrics");
        server = Some(tokio::spawn(runtime::serve_metrics(
            listener,
            registry,
            stop.stopped(),
        )));
    }
    // The job loops stop first (finishing their items), then the metrics listener closes.
    crate::worker::run(jobs, shutdown).await;
    stop.stop();
    if let Some(server) = server {
        match server.await {
            Ok(Err(e)) => tracing::error!(target: "job", error = %e, "metrics listener failed"),
            Err(e) => {
                tracing::error!(target: "job", error = %e, "metrics listener ended abnormally")
            }
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}
