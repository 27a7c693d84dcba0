//! The `jobs` binary's command line (in the library, so the configuration reference is generated
//! from it).

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};
use runtime::{LogArgs, StoreArgs};

use crate::{JobKind, JobsArgs};

/// The `jobs` binary's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "jobs",
    about = "Sandbox Broker jobs: sync, cleanup, auto-expiry, stale removal",
    version
)]
pub struct Cli {
    /// Store selection and options.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Log format.
    #[command(flatten)]
    pub log: LogArgs,
    /// Job settings.
    #[command(flatten)]
    pub jobs: JobsArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// `jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
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

/// A job `jobs run` can run once.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OneShot {
    /// Register new CSP accounts, mark missing ones stale.
    Sync,
    /// Delete pending sandboxes in the CSP.
    Cleanup,
    /// Expire allocations past their lab window.
    AutoExpire,
    /// Retire sandboxes stale past the grace period.
    DeleteStale,
    /// Earmark, top up and close reservations.
    Reservations,
    /// Warn about, then reclaim, allocations whose labs stopped sending heartbeats.
    ReclaimOrphans,
}

impl From<OneShot> for JobKind {
    fn from(job: OneShot) -> Self {
        match job {
            OneShot::Sync => JobKind::Sync,
            OneShot::Cleanup => JobKind::Cleanup,
            OneShot::AutoExpire => JobKind::AutoExpire,
            OneShot::DeleteStale => JobKind::DeleteStale,
            OneShot::Reservations => JobKind::Reservations,
            OneShot::ReclaimOrphans => JobKind::ReclaimOrphans,
        }
    }
}
