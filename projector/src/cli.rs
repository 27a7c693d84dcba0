//! The `projector` command line. Subcommands:
//!
//! | command | what |
//! |---|---|
//! | `poll` | apply the event stream to the view until SIGINT/SIGTERM: the DynamoDB Streams poller (`STORE=dynamodb`) or the embedded log tail; `/metrics` on `METRICS_ADDR` |
//! | `tables --json` | the DynamoDB table definitions (CI compares them with terraform) |
//! | `rebuild --into TARGET` | replay every event into a fresh view: a table prefix (dynamodb) or a file (embedded) |
//! | `verify` | replay into a scratch view and compare with the live one; exit 1 on drift |
//! | `redrive [FILE\|-]` | re-apply the batches named by the Lambda's on-failure messages (SQS), from the stream or, once trimmed, from the event table |
//! | `capture --out FILE` | write the stream's records as the event Lambda would receive (fixtures) |
//!
//! Exit codes: 0 success, 1 drift found (`verify`) or something not applied (`redrive`), 2 an
//! error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use domain::store::{EventStore, PoolView, ViewStore};
use prometheus::Registry;
use runtime::Stop;
pub use runtime::{LogArgs, LogFormat, StoreArgs, StoreKind};
use store_dynamodb::{table_definitions, table_definitions_json, table_name, DynamoStore};
use store_embedded::EmbeddedStore;

use crate::dynamo_streams::DynamoStreams;
use crate::poller::{PollerConfig, StreamApi, StreamPoller};
use crate::rebuild::{rebuild_into, verify, DriftReport, RebuildOptions, RebuildProgress};
use crate::redrive::{
    parse_messages, redrive, ParsedMessages, RedriveOptions, RedriveSummary, StreamOpener,
};
use crate::{Projector, ProjectorMetrics};

/// Exit code of `verify` when the live view drifted from the events.
pub const EXIT_DRIFT: u8 = 1;
/// Exit code of `redrive` when something named in the messages could not be applied.
pub const EXIT_NOT_APPLIED: u8 = 1;
/// Exit code of any failure.
pub const EXIT_ERROR: u8 = 2;

/// The exit code a verify report calls for: success when clean, [`EXIT_DRIFT`] otherwise.
pub fn verify_exit_code(report: &DriftReport) -> ExitCode {
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DRIFT)
    }
}

/// The `projector` binary's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "projector",
    about = "Sandbox Broker projector: event stream → pool view",
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
    /// Apply the event stream to the view until SIGINT/SIGTERM.
    Poll(PollArgs),
    /// Print the DynamoDB table definitions.
    Tables {
        /// As JSON (the format of terraform/tables.expected.json).
        #[arg(long)]
        json: bool,
    },
    /// Replay every event into a fresh view.
    Rebuild(RebuildArgs),
    /// Replay into a scratch view and compare with the live one; exit 1 on drift.
    Verify(VerifyArgs),
    /// Re-apply the stream batches named by Lambda on-failure (DLQ) messages; exit 1 if
    /// anything could not be applied.
    Redrive(RedriveArgs),
    /// Write the stream's records as a Lambda DynamoDB event (test fixtures).
    Capture(CaptureArgs),
}

/// `projector redrive`.
#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    /// The on-failure messages: a file, or `-` for stdin. One message body per line, a JSON
    /// array, or `aws sqs receive-message` output as it is.
    #[arg(default_value = "-")]
    pub input: PathBuf,
    /// Seconds the event-table fallback reads before the first and after the last arrival.
    #[arg(long, env = "REDRIVE_WINDOW_MARGIN_SECS", default_value_t = 60)]
    pub window_margin_secs: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `projector poll`.
#[derive(Debug, Clone, Args)]
pub struct PollArgs {
    /// Address of the `/metrics` server.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
    /// Records per GetRecords call (1–1000).
    #[arg(long, env = "POLL_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i32,
    /// First pause after an empty round, ms.
    #[arg(long, env = "POLL_IDLE_MIN_MS", default_value_t = 50)]
    pub idle_min_ms: u64,
    /// Longest pause while idle, ms.
    #[arg(long, env = "POLL_IDLE_MAX_MS", default_value_t = 1000)]
    pub idle_max_ms: u64,
    /// Shard-list refresh period, ms.
    #[arg(long, env = "POLL_DISCOVER_EVERY_MS", default_value_t = 10_000)]
    pub discover_every_ms: u64,
    /// Event streams of one batch applied concurrently (each stream stays in order).
    #[arg(long, env = "POLL_APPLY_CONCURRENCY", default_value_t = 16)]
    pub apply_concurrency: usize,
}

impl PollArgs {
    /// The poller settings.
    pub fn poller_config(&self) -> PollerConfig {
        PollerConfig {
            batch_size: self.batch_size.clamp(1, 1000),
            idle_min: Duration::from_millis(self.idle_min_ms.max(1)),
            idle_max: Duration::from_millis(self.idle_max_ms.max(self.idle_min_ms.max(1))),
            discover_every: Duration::from_millis(self.discover_every_ms.max(100)),
            apply_concurrency: self.apply_concurrency.max(1),
            ..PollerConfig::default()
        }
    }
}

/// Replay tunables shared by `rebuild` and `verify`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Parallel scan segments.
    #[arg(long, default_value_t = 4)]
    pub segments: u32,
    /// Events per scan page.
    #[arg(long, default_value_t = 500)]
    pub page_size: usize,
    /// Streams applied concurrently within a page.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

impl ReplayArgs {
    fn options(&self) -> RebuildOptions {
        RebuildOptions {
            segments: self.segments.max(1),
            page_size: self.page_size.max(1),
            concurrency: self.concurrency.max(1),
            ..RebuildOptions::default()
        }
    }
}

/// `projector rebuild`.
#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    /// Target: a table prefix (`STORE=dynamodb`; tables are created) or a database file
    /// (`STORE=embedded`). It is cleared first.
    #[arg(long)]
    pub into: String,
    /// Allow the target to be the live view itself (stop every projector first).
    #[arg(long)]
    pub in_place: bool,
    /// Replay tunables.
    #[command(flatten)]
    pub replay: ReplayArgs,
}

/// `projector verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Replay into these DynamoDB tables (created if missing) instead of an in-memory view.
    #[arg(long)]
    pub scratch_prefix: Option<String>,
    /// Print the whole report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Fix every difference found (rows behind their stream, corrupted rows, counters), then
    /// verify again; exit 0 when the view is clean afterwards.
    #[arg(long)]
    pub repair: bool,
    /// Replay tunables.
    #[command(flatten)]
    pub replay: ReplayArgs,
}

/// `projector capture`.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// Output file (`-` for stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
    /// At most this many records.
    #[arg(long, default_value_t = 100)]
    pub max: usize,
}

/// Runs a parsed command line; `shutdown` stops `poll`. Returns the process exit code.
pub async fn run(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ExitCode {
    match dispatch(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(target: "projector", error = format!("{e:#}"), "projector failed");
            eprintln!("projector: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn dispatch(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ExitCode> {
    let store = cli.store;
    match cli.command {
        Command::Tables { json } => {
            let definitions = table_definitions_json(&store.table_prefix);
            if json {
                println!("{definitions}");
            } else {
                for def in table_definitions(&store.table_prefix) {
                    println!("{}", def.table_name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Poll(args) => {
            poll(&store, &args, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebuild(args) => {
            rebuild(&store, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let mut report = verify_live(&store, &args).await?;
            print_report(&report, args.json)?;
            if args.repair && !report.is_clean() {
                let (events, live) = live_view(&store).await?;
                let summary = crate::repair::repair_drift(events, live, &report).await?;
                tracing::info!(
                    target: "projector",
                    rows_repaired = summary.rows_repaired(),
                    rows_caught_up = summary.rows_caught_up,
                    rows_rewritten = summary.rows_rewritten,
                    counters_corrected = summary.counters_corrected,
                    left = summary.left.len(),
                    "view repaired"
                );
                println!(
                    "repair: {} row(s) caught up, {} rewritten, {} counter(s) corrected, {} left",
                    summary.rows_caught_up,
                    summary.rows_rewritten,
                    summary.counters_corrected,
                    summary.left.len()
                );
                for left in &summary.left {
                    println!("LEFT {left}");
                }
                report = verify_live(&store, &args).await?;
                print_report(&report, args.json)?;
            }
            Ok(verify_exit_code(&report))
        }
        Command::Capture(args) => {
            capture(&store, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Redrive(args) => redrive_command(&store, &args).await,
    }
}

/// The DynamoDB Streams readers of one store: the events table's stream, or the one a message
/// names.
struct StoreStreams {
    store: DynamoStore,
    current: Arc<DynamoStreams>,
}

impl StreamOpener for StoreStreams {
    fn open(&self, stream_arn: Option<&str>) -> Arc<dyn StreamApi> {
        match stream_arn {
            Some(arn) if arn != self.current.stream_arn() => {
                Arc::new(DynamoStreams::for_arn(&self.store, arn))
            }
            _ => Arc::clone(&self.current) as Arc<dyn StreamApi>,
        }
    }
}

/// Redrives `parsed` against `store`: its stream, its event table and its view, through a
/// projector of its own (what `projector redrive` runs; tests call it directly).
pub async fn redrive_store(
    store: &DynamoStore,
    parsed: &ParsedMessages,
    options: &RedriveOptions,
) -> anyhow::Result<RedriveSummary> {
    let current = DynamoStreams::for_store(store)
        .await
        .context("finding the events table's stream")?;
    let streams = StoreStreams {
        store: store.clone(),
        current: Arc::new(current),
    };
    let projector = Projector::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        ProjectorMetrics::unregistered(),
    );
    Ok(redrive(&projector, store, &streams, parsed, options).await)
}

async fn redrive_command(store: &StoreArgs, args: &RedriveArgs) -> anyhow::Result<ExitCode> {
    if store.store != StoreKind::Dynamodb {
        bail!("redrive re-applies DynamoDB stream batches: set STORE=dynamodb");
    }
    let text = if args.input.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading the messages from stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?
    };
    let parsed = parse_messages(&text);
    let dynamo = store.dynamo(&store.table_prefix).await?;
    let options = RedriveOptions {
        window_margin: Duration::from_secs(args.window_margin_secs),
    };
    let summary = redrive_store(&dynamo, &parsed, &options).await?;
    tracing::info!(target: "projector",
        messages = summary.messages,
        records_reapplied = summary.records_reapplied,
        streams_repaired = summary.streams_repaired,
        skipped = summary.skipped,
        failures = summary.failures.len(),
        "redrive finished");
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for failure in &summary.failures {
            println!("NOT APPLIED {failure}");
        }
        println!(
            "redrive: {} message(s) ({} from the stream, {} from the event table); {} record(s) read, {} re-applied, {} stream(s) repaired, {} skipped, {} not applied",
            summary.messages,
            summary.from_stream,
            summary.from_event_table,
            summary.records_read,
            summary.records_reapplied,
            summary.streams_repaired,
            summary.skipped,
            summary.failures.len()
        );
    }
    Ok(if summary.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_APPLIED)
    })
}

/// `projector poll`: the metrics server and the source, both stopped by `shutdown`.
async fn poll(
    store: &StoreArgs,
    args: &PollArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = ProjectorMetrics::new(&registry).context("registering metrics")?;
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {}", args.metrics_addr))?;
    let stop = Stop::new();
    stop.stop_on(shutdown);
    let server = tokio::spawn(runtime::serve_metrics(
        listener,
        registry.clone(),
        stop.stopped(),
    ));
    tracing::info!(target: "projector", metrics_addr = %args.metrics_addr, store = store.store.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(), "projector poll starting");
    let stores = runtime::open_stores(store).await?;
    runtime::StoreRequestMetrics::for_stores(&registry, &stores).context("store metrics")?;
    let projector = Projector::new(stores.events.clone(), stores.view.clone(), metrics);
    match (stores.dynamo, stores.embedded) {
        (Some(dynamo), _) => {
            let streams = DynamoStreams::for_store(&dynamo)
                .await
                .context("finding the events table's stream")?;
            tracing::info!(target: "projector", stream_arn = %streams.stream_arn(), "polling DynamoDB stream");
            StreamPoller::new(streams, projector, args.poller_config())
                .run(stop.stopped())
                .await;
        }
        (None, Some(embedded)) => {
            crate::embedded::run(projector, embedded, stop.stopped()).await;
        }
        (None, None) => bail!("the store opened neither adapter"),
    }
    // The source stopped on its own (or on the signal): close the metrics server too.
    stop.stop();
    match server.await {
        Ok(result) => result.context("metrics server")?,
        Err(e) => bail!("metrics server task: {e}"),
    }
    Ok(())
}

/// Prints replay progress on stderr every second until dropped.
struct ProgressTicker(tokio::task::JoinHandle<()>);

impl ProgressTicker {
    fn start(label: &'static str, progress: Arc<RebuildProgress>, segments: u32) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let (read, applied, pages, done) = progress.snapshot();
                eprintln!(
                    "{label}: {read} events read, {applied} applied, {pages} pages, {done}/{segments} segments done"
                );
            }
        }))
    }
}

impl Drop for ProgressTicker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn rebuild(store: &StoreArgs, args: &RebuildArgs) -> anyhow::Result<()> {
    let options = args.replay.options();
    let progress = Arc::new(RebuildProgress::default());
    let (events, target): (Arc<dyn EventStore>, Arc<dyn ViewStore>) = match store.store {
        StoreKind::Dynamodb => {
            if args.into == store.table_prefix && !args.in_place {
                bail!(
                    "--into {} is the live view's prefix; pass --in-place (with every projector stopped) to rebuild it",
                    args.into
                );
            }
            let live = store.dynamo(&store.table_prefix).await?;
            let target = store.dynamo(&args.into).await?;
            target
                .ensure_tables()
                .await
                .with_context(|| format!("creating tables {}-*", args.into))?;
            (Arc::new(live), Arc::new(target))
        }
        StoreKind::Embedded => {
            let into = PathBuf::from(&args.into);
            if same_file(&into, &store.embedded_path) && !args.in_place {
                bail!(
                    "--into {} is the live database; pass --in-place (with every projector stopped) to rebuild it",
                    into.display()
                );
            }
            let live = store.embedded(&store.embedded_path)?;
            let target = store.embedded(&into)?;
            (Arc::new(live), Arc::new(target))
        }
    };
    eprintln!(
        "rebuild: replaying every event into {} ({} segments)",
        args.into, options.segments
    );
    let ticker = ProgressTicker::start("rebuild", Arc::clone(&progress), options.segments);
    let summary = rebuild_into(events, target, &options, progress).await?;
    drop(ticker);
    eprintln!(
        "rebuild: done — {} events read, {} applied in {} ms",
        summary.events_read, summary.applied, summary.elapsed_ms
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The configured event store and live view, for `verify --repair`.
async fn live_view(store: &StoreArgs) -> anyhow::Result<(Arc<dyn EventStore>, Arc<dyn ViewStore>)> {
    Ok(match store.store {
        StoreKind::Dynamodb => {
            let live = store.dynamo(&store.table_prefix).await?;
            (Arc::new(live.clone()), Arc::new(live))
        }
        StoreKind::Embedded => {
            let live = store.embedded(&store.embedded_path)?;
            (Arc::new(live.clone()), Arc::new(live))
        }
    })
}

/// `projector verify` against the configured live view.
pub async fn verify_live(store: &StoreArgs, args: &VerifyArgs) -> anyhow::Result<DriftReport> {
    let options = args.replay.options();
    let progress = Arc::new(RebuildProgress::default());
    let (events, live): (Arc<dyn EventStore>, Arc<dyn PoolView>) = match store.store {
        StoreKind::Dynamodb => {
            let live = store.dynamo(&store.table_prefix).await?;
            (Arc::new(live.clone()), Arc::new(live))
        }
        StoreKind::Embedded => {
            let live = store.embedded(&store.embedded_path)?;
            (Arc::new(live.clone()), Arc::new(live))
        }
    };
    let scratch: Arc<dyn ViewStore> = match (&args.scratch_prefix, store.store) {
        (Some(prefix), StoreKind::Dynamodb) => {
            // Compared as table names: `acc` and `acc-` name the same tables.
            if table_name(prefix, "events") == table_name(&store.table_prefix, "events") {
                bail!("--scratch-prefix must differ from TABLE_PREFIX: verify clears the scratch view");
            }
            let scratch = store.dynamo(prefix).await?;
            scratch
                .ensure_tables()
                .await
                .with_context(|| format!("creating tables {}", table_name(prefix, "*")))?;
            Arc::new(scratch)
        }
        (Some(_), StoreKind::Embedded) => bail!("--scratch-prefix needs STORE=dynamodb"),
        (None, _) => Arc::new(EmbeddedStore::open_in_memory(store.stats_shards)?),
    };
    eprintln!("verify: replaying every event into a scratch view");
    let ticker = ProgressTicker::start("verify", Arc::clone(&progress), options.segments);
    let report = verify(events, live, scratch, &options, progress).await?;
    drop(ticker);
    Ok(report)
}

/// Prints a verify report on stdout: pretty JSON, or one `DRIFT` line per difference and a
/// summary line (shared by `projector verify` and `broker-audit verify`).
pub fn print_report(report: &DriftReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for difference in &report.differences {
        println!("DRIFT {difference}");
    }
    println!(
        "verify: {} events replayed; {} live rows, {} expected; {} difference(s)",
        report.rebuild.events_read,
        report.live_rows,
        report.expected_rows,
        report.differences.len()
    );
    Ok(())
}

async fn capture(store: &StoreArgs, args: &CaptureArgs) -> anyhow::Result<()> {
    if store.store != StoreKind::Dynamodb {
        bail!("capture reads a DynamoDB stream: set STORE=dynamodb");
    }
    let dynamo = store.dynamo(&store.table_prefix).await?;
    let streams = DynamoStreams::for_store(&dynamo).await?;
    let records = streams.read_all(args.max).await?;
    let region = dynamo
        .sdk_config()
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".into());
    let event = crate::lambda::lambda_event(&records, streams.stream_arn(), &region);
    let text = serde_json::to_string_pretty(&event)?;
    if args.out.as_os_str() == "-" {
        println!("{text}");
    } else {
        std::fs::write(&args.out, text + "\n")
            .with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!(
            "capture: {} records → {}",
            records.len(),
            args.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store settings parse from flags placed after the subcommand, with the API's defaults.
    #[test]
    fn parses_global_store_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from([
            "projector",
            "verify",
            "--store",
            "dynamodb",
            "--table-prefix",
            "x",
        ])?;
        assert_eq!(cli.store.store, StoreKind::Dynamodb);
        assert_eq!(cli.store.table_prefix, "x");
        assert!(matches!(cli.command, Command::Verify(_)));
        let cli = Cli::try_parse_from(["projector", "rebuild", "--into", "y"])?;
        assert_eq!(cli.store.stats_shards, 8);
        assert!(
            matches!(cli.command, Command::Rebuild(RebuildArgs { ref into, .. }) if into == "y")
        );
        Ok(())
    }

    /// The command-line definition is consistent (clap's own debug assertions).
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
