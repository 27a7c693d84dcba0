//! `jobs`: the Sandbox Broker's background jobs. `jobs worker` runs every loop until SIGINT or
//! SIGTERM; `jobs run <job>` runs one job once for a scheduler and exits non-zero on failure.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use prometheus::Registry;
use runtime::{LogArgs, LogFormat, StoreArgs};

use domain::{SharedClock, SystemClock};
use jobs::startup;
use jobs::{JobKind, Jobs, JobsArgs};

#[derive(Debug, Parser)]
#[command(
    name = "jobs",
    about = "Sandbox Broker jobs: sync, cleanup, auto-expiry, stale removal",
    version
)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    jobs: JobsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every job loop until SIGINT/SIGTERM (intervals from the environment, jittered).
    Worker {
        /// Serve Prometheus `/metrics` on this address (e.g. `0.0.0.0:9091`).
        #[arg(long, env = "METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
    /// Run one job once and print its summary; the exit code is non-zero if it failed.
    Run {
        /// The job.
        job: OneShot,
        /// `delete-stale` only: the grace in hours (default `STALE_GRACE_HOURS`).
        #[arg(long)]
        grace_hours: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OneShot {
    Sync,
    Cleanup,
    AutoExpire,
    DeleteStale,
}

impl From<OneShot> for JobKind {
    fn from(job: OneShot) -> Self {
        match job {
            OneShot::Sync => JobKind::Sync,
            OneShot::Cleanup => JobKind::Cleanup,
            OneShot::AutoExpire => JobKind::AutoExpire,
            OneShot::DeleteStale => JobKind::DeleteStale,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = runtime::parse_settings();
    runtime::init_tracing(cli.log.format_or(LogFormat::Json));
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
    let jobs = Jobs::from_config(broker, config, clock, &registry).context("jobs")?;
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
