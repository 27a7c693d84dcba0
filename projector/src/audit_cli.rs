//! The `broker-audit` binary's command line (in the library, so the configuration reference is
//! generated from it).

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use runtime::{LogArgs, StoreArgs};

use crate::cli::ReplayArgs;

/// The `broker-audit` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "broker-audit",
    about = "Sandbox Broker audit: export, import, replay at an instant, verify, check",
    version
)]
pub struct Cli {
    /// Store settings (environment or flags; accepted after the subcommand too).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Log settings.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write every event in a time range as NDJSON envelopes to stdout.
    Export(ExportArgs),
    /// Rebuild the whole pool's state at an instant and print the counts by status.
    Replay(ReplayAtArgs),
    /// Replay every event into a scratch view and compare with the live view (exit 1 on drift).
    Verify(VerifyCmd),
    /// Append an export (NDJSON envelopes, from `export`) to the configured store: a restore.
    Import(ImportArgs),
    /// Check the log against itself: live claims, allocations and quota slots agree (exit 1 if not).
    Check(CheckArgs),
    /// Usage over a range by track, prefix or day, as `GET /v1/admin/usage` reports it.
    Usage(UsageArgs),
    /// Erase a student's subject record, as `POST /v1/admin/students/erase` does, without a
    /// running API (exit 1: refused, the student holds a live sandbox; 3: no record).
    Erase(EraseArgs),
    /// A student's pseudonym and sandboxes, as `POST /v1/admin/students/lookup` answers (exit 3:
    /// no record).
    Lookup(LookupArgs),
}

/// The pseudonym key of `erase` and `lookup`: the deployment's, or no student is found.
#[derive(Debug, Clone, Args)]
pub struct PseudonymKeyArgs {
    /// The deployment's `PSEUDONYM_KEY` (environment only, or `PSEUDONYM_KEY_FILE`; unset: the
    /// dev-only key, which finds no student of a deployment that set its own).
    #[arg(long, env = "PSEUDONYM_KEY", hide_env_values = true)]
    pub pseudonym_key: Option<runtime::Secret>,
    /// File holding `PSEUDONYM_KEY` (instead of the variable; trailing whitespace ignored).
    #[arg(long, env = "PSEUDONYM_KEY_FILE")]
    pub pseudonym_key_file: Option<std::path::PathBuf>,
}

/// `broker-audit erase`.
#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The student id as the track sends it (X-Instruqt-Sandbox-ID).
    #[arg(long)]
    pub student: String,
    /// Say what would happen (erase, refuse, nothing to erase) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// The pseudonym key.
    #[command(flatten)]
    pub key: PseudonymKeyArgs,
}

/// `broker-audit lookup`.
#[derive(Debug, Args)]
pub struct LookupArgs {
    /// The student id as the track sends it (X-Instruqt-Sandbox-ID).
    #[arg(long)]
    pub student: String,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// The pseudonym key.
    #[command(flatten)]
    pub key: PseudonymKeyArgs,
}

/// `broker-audit usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Inclusive start: RFC 3339, or a day (`YYYY-MM-DD`, its midnight UTC).
    #[arg(long, value_parser = domain::usage::parse_usage_time)]
    pub from: DateTime<Utc>,
    /// Exclusive end: RFC 3339 or a day; default: now (plus five minutes for writers' clocks).
    #[arg(long, value_parser = domain::usage::parse_usage_time)]
    pub to: Option<DateTime<Utc>>,
    /// `track`, `prefix` or `day`.
    #[arg(long, default_value = "track")]
    pub group_by: domain::usage::UsageGroupBy,
    /// Print CSV instead of JSON.
    #[arg(long)]
    pub csv: bool,
    /// Read an export (from `export`; `-`: standard input) instead of the store.
    #[arg(long)]
    pub file: Option<String>,
    /// Only allocations made for this track (as the route's `track=`).
    #[arg(long, value_parser = usage_track)]
    pub track: Option<String>,
    /// Only allocations of sandboxes whose name starts with this (as the route's `prefix=`).
    #[arg(long, value_parser = usage_prefix)]
    pub prefix: Option<String>,
}

impl UsageArgs {
    /// The allocations the report covers.
    pub fn filter(&self) -> domain::usage::UsageFilter {
        domain::usage::UsageFilter {
            track: self.track.clone(),
            name_prefix: self.prefix.clone(),
        }
    }
}

fn usage_track(raw: &str) -> Result<String, String> {
    domain::model::ids::validate_id("track", raw).map_err(|e| e.to_string())
}

fn usage_prefix(raw: &str) -> Result<String, String> {
    domain::model::ids::validate_id("prefix", raw).map_err(|e| e.to_string())
}

/// `broker-audit import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The export to read (`-`: standard input).
    #[arg(long, default_value = "-")]
    pub file: String,
    /// Events per transaction (at most 100, DynamoDB's limit).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Import into a store that already holds events. Without it an import refuses a non-empty
    /// target, so a mistyped TABLE_PREFIX cannot mix two logs; with it, events the target
    /// already holds (an earlier, interrupted run) are checked and skipped.
    #[arg(long)]
    pub resume: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `broker-audit check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Parallel scan segments.
    #[arg(long, default_value_t = 4)]
    pub segments: u32,
    /// Events per scan page.
    #[arg(long, default_value_t = 500)]
    pub page_size: usize,
}

/// `broker-audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Inclusive lower bound on occurred_at (RFC 3339); default: the first event.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Exclusive upper bound on occurred_at (RFC 3339); default: now + 5 minutes.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only this event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Only events of this caller (actor `track:<caller>` or named in the payload).
    #[arg(long)]
    pub caller: Option<String>,
    /// Only events of this sandbox.
    #[arg(long)]
    pub sandbox_id: Option<String>,
    /// Events per page read from the store.
    #[arg(long, default_value_t = 500)]
    pub page_size: usize,
}

/// `broker-audit replay`.
#[derive(Debug, Args)]
pub struct ReplayAtArgs {
    /// The instant (RFC 3339): events with occurred_at <= it are folded.
    #[arg(long, value_parser = parse_time)]
    pub at: DateTime<Utc>,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
    /// Parallel scan segments.
    #[arg(long, default_value_t = 4)]
    pub segments: u32,
    /// Events per scan page.
    #[arg(long, default_value_t = 500)]
    pub page_size: usize,
}

/// `broker-audit verify`.
#[derive(Debug, Args)]
pub struct VerifyCmd {
    /// Print the whole report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replay tunables.
    #[command(flatten)]
    pub replay: ReplayArgs,
}

/// Parses an RFC 3339 time argument.
pub fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2026-01-31T12:00:00Z"))
}
