//! `jobs`: the Sandbox Broker's background jobs. `jobs worker` runs every loop until SIGINT or
//! SIGTERM; `jobs run <job>` runs one job once for a scheduler and exits non-zero on failure.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use prometheus::Registry;

use domain::{SharedClock, SystemClock};
use jobs::cli::{Cli, Command};
use jobs::startup;
use jobs::Jobs;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = runtime::parse_settings();
    runtime::init_tracing(cli.log.service_format());
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "jobs failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.jobs.config().context("jobs configuration")?;
    let stores = runtime::open_stores(&cli.store).await?;
    let clock: SharedClock = Arc::new(SystemClock);
    let broker = startup::broker(&stores, clock.clone(), &config);
    let registry = Registry::new();
    runtime::StoreRequestMetrics::for_stores(&registry, &stores).context("store metrics")?;
    let jobs = Jobs::from_config(broker, config, clock, &registry)
        .context("jobs")?
        .with_heartbeats(Arc::new(domain::heartbeat::CheckpointHeartbeats::new(
            stores.view.clone(),
        )));
    match cli.command {
        Command::Worker { metrics_addr } => {
            startup::run_worker(
                Arc::new(jobs),
                registry,
                metrics_addr,
                runtime::shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { job, grace_hours } => {
            let grace = grace_hours.map(|h| chrono::Duration::hours(i64::from(h)));
            let summary = startup::run_once(&jobs, job.into(), grace).await?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
