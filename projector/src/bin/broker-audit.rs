//! `broker-audit`: the auditor's command line, against either store (`STORE=embedded` with
//! `EMBEDDED_PATH`, or `STORE=dynamodb` with `TABLE_PREFIX`, `DDB_ENDPOINT_URL`, `AWS_REGION`;
//! the same settings as every binary's, see `runtime::StoreArgs`).
//!
//! | command | what |
//! |---|---|
//! | `export [--since T] [--until T] [--type X] [--caller C] [--sandbox-id S]` | every event in the range as NDJSON envelopes on stdout, in time order, page by page (constant memory); progress on stderr |
//! | `replay --at T [--json]` | the whole pool as it was at T: every sandbox stream folded up to T with the projection; counts by status |
//! | `verify [--json]` | the projector's verify: replay into a scratch view and compare with the live one; exit 1 on drift |
//! | `import [--file F] [--resume] [--json]` | append an export to the configured store (a restore), in per-stream version order, 100 events per transaction; refuses a non-empty target without `--resume` |
//! | `check [--json]` | fold every claim, quota and sandbox stream and check they agree; exit 1 on a problem |
//! | `usage --from T [--to T] [--group-by track\|prefix\|day] [--track X] [--prefix P] [--csv] [--file F]` | the usage report of `GET /v1/admin/usage`, over the store or an export |
//! | `erase --student ID [--dry-run] [--json]` | `POST /v1/admin/students/erase` without a running API: deletes the subject record (needs `PSEUDONYM_KEY`) |
//! | `lookup --student ID [--json]` | `POST /v1/admin/students/lookup` without a running API: the pseudonym and the sandboxes |
//!
//! Exit codes: 0 success, 1 drift (`verify`), an incomplete export (`import`), an
//! inconsistent log (`check`) or a refused erasure (`erase`: the student holds a live sandbox),
//! 2 an error, 3 no subject record (`erase`, `lookup`: nothing to erase or show).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use domain::audit::{audit_page, replay_pool_at, AuditQuery, EventFeed, FeedFilter};
use domain::model::events::format_time;
use domain::restore::{check_log, import_envelopes, ImportOptions, ImportReport};
use domain::store::EventStore;
use domain::SandboxStatus;
use domain::{EventEnvelope, StoreError};
use projector::audit_cli::{
    CheckArgs, Cli, Command, EraseArgs, ExportArgs, ImportArgs, LookupArgs, PseudonymKeyArgs,
    ReplayAtArgs, UsageArgs,
};
use projector::cli::{print_report, verify_exit_code, verify_live, VerifyArgs, EXIT_ERROR};
use projector::erasure_cli;
use runtime::{LogFormat, StoreArgs, StoreKind};

/// How often export prints progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = runtime::parse_settings();
    runtime::init_tracing(cli.log.format_or(LogFormat::Text));
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("broker-audit: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The event store and its time-ordered feed, from the store settings.
async fn open(store: &StoreArgs) -> anyhow::Result<(Arc<dyn EventStore>, Arc<dyn EventFeed>)> {
    Ok(match store.store {
        StoreKind::Embedded => {
            let embedded = store.embedded(&store.embedded_path)?;
            (Arc::new(embedded.clone()), Arc::new(embedded))
        }
        StoreKind::Dynamodb => {
            let dynamo = store.dynamo(&store.table_prefix).await?;
            (Arc::new(dynamo.clone()), Arc::new(dynamo))
        }
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Export(args) => {
            let (_, feed) = open(&cli.store).await?;
            export(feed.as_ref(), &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay(args) => {
            let (events, _) = open(&cli.store).await?;
            replay(events, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let report = verify_live(
                &cli.store,
                &VerifyArgs {
                    scratch_prefix: None,
                    json: args.json,
                    repair: false,
                    replay: args.replay,
                },
            )
            .await?;
            print_report(&report, args.json)?;
            Ok(verify_exit_code(&report))
        }
        Command::Import(args) => {
            let stores = runtime::open_stores(&cli.store).await?;
            import(stores.events.as_ref(), &args).await
        }
        Command::Check(args) => {
            let (events, _) = open(&cli.store).await?;
            check(events, &args).await
        }
        Command::Usage(args) => {
            usage(&cli.store, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Erase(args) => erase(&cli.store, &args).await,
        Command::Lookup(args) => lookup(&cli.store, &args).await,
    }
}

/// The pseudonym key, with a warning on stderr when it is the dev-only one.
fn key_of(args: &PseudonymKeyArgs) -> anyhow::Result<runtime::Secret> {
    let (key, dev) = erasure_cli::pseudonym_key(args)?;
    if dev {
        eprintln!(
            "broker-audit: PSEUDONYM_KEY is unset or the dev-only key: only a development \
             deployment's students can be found; set PSEUDONYM_KEY (or PSEUDONYM_KEY_FILE) to the \
             deployment's key"
        );
    }
    Ok(key)
}

/// `erase`: the outcome on stdout (a sentence, or JSON), the exit code by the outcome.
async fn erase(store: &StoreArgs, args: &EraseArgs) -> anyhow::Result<ExitCode> {
    let key = key_of(&args.key)?;
    let ports = erasure_cli::open_ports(store).await?;
    let report = erasure_cli::erase(&ports, &key, &args.student, args.dry_run, Utc::now()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.describe());
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// `lookup`: the pseudonym and the sandboxes on stdout, exit 3 without a record.
async fn lookup(store: &StoreArgs, args: &LookupArgs) -> anyhow::Result<ExitCode> {
    let key = key_of(&args.key)?;
    let ports = erasure_cli::open_ports(store).await?;
    let report = erasure_cli::lookup(&ports, &key, &args.student).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if let (Some(pseudonym), Some(first_seen)) = (&report.pseudonym, &report.first_seen) {
        println!("pseudonym {pseudonym}, first seen {first_seen}");
        for sandbox in &report.sandboxes {
            println!(
                "  {} {} {}",
                sandbox.sandbox_id, sandbox.name, sandbox.status
            );
        }
    } else {
        println!(
            "no subject record for this student: never seen since pseudonyms were turned on, \
             erased, or PSEUDONYM_KEY is not the deployment's key"
        );
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// `usage`: the report over the store's feed or over an export, as JSON or CSV on stdout.
async fn usage(store: &StoreArgs, args: &UsageArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let to = args
        .to
        .unwrap_or(now + chrono::Duration::seconds(domain::audit::FUTURE_SLACK_S));
    let query = domain::usage::UsageQuery::new(args.from, to, args.group_by)?;
    let filter = args.filter();
    let report = match args.file.as_deref() {
        Some("-") => projector::usage_cli::usage_from_export_filtered(
            std::io::BufReader::new(std::io::stdin()),
            query,
            filter,
            now,
        )?,
        Some(path) => projector::usage_cli::usage_from_export_filtered(
            std::io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("opening {path}"))?,
            ),
            query,
            filter,
            now,
        )?,
        None => {
            let (events, feed) = open(store).await?;
            domain::usage::usage_from_feed_filtered(
                feed.as_ref(),
                events.as_ref(),
                query,
                filter,
                now,
            )
            .await?
        }
    };
    let mut out = std::io::stdout().lock();
    if args.csv {
        out.write_all(domain::usage::usage_csv(&report).as_bytes())?;
    } else {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(())
}

/// Reads the export line by line (constant memory apart from the per-stream counters) and
/// appends it; exit 1 when the export left a stream incomplete.
async fn import(events: &dyn EventStore, args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let holds_events = !events
        .scan(0, 1, None, 1)
        .await
        .context("reading the target store")?
        .events
        .is_empty();
    if holds_events && !args.resume {
        anyhow::bail!(
            "the target store already holds events; import into an empty store (a new \
             TABLE_PREFIX or EMBEDDED_PATH), or pass --resume to finish an interrupted import \
             of the same export"
        );
    }
    let reader: Box<dyn std::io::BufRead> = if args.file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file))?,
        ))
    };
    let source = std::io::BufRead::lines(reader)
        .enumerate()
        .filter(|(_, line)| !matches!(line, Ok(l) if l.trim().is_empty()))
        .map(|(n, line)| {
            let line = line.map_err(|e| StoreError::InvalidAppend(format!("reading: {e}")))?;
            serde_json::from_str::<EventEnvelope>(&line).map_err(|e| {
                StoreError::InvalidAppend(format!("line {}: not an event envelope ({e})", n + 1))
            })
        });
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let show = |report: &ImportReport| {
        eprintln!(
            "import: {} read, {} appended, {} already present",
            report.read, report.appended, report.already_present
        )
    };
    let options = ImportOptions {
        batch: args.batch,
        ..ImportOptions::default()
    };
    let report = import_envelopes(events, source, options, |report| {
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            show(report);
        }
    })
    .await
    .context("importing")?;
    show(&report);
    eprintln!(
        "import: done, {} streams in {} transactions, {} ms",
        report.streams,
        report.transactions,
        started.elapsed().as_millis()
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.gaps.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for gap in report.gaps.iter().take(20) {
        eprintln!(
            "import: {} is missing v{} ({} later events not imported)",
            gap.stream_id, gap.missing_version, gap.held_back
        );
    }
    eprintln!(
        "import: the export is incomplete ({} streams have a gap); export the whole log \
         (no --since/--type/--caller/--sandbox-id filter) and import again with --resume",
        report.gaps.len()
    );
    Ok(ExitCode::from(1))
}

/// Runs the cross-stream check and prints what it found.
async fn check(events: Arc<dyn EventStore>, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let report = check_log(events, args.segments, args.page_size)
        .await
        .context("reading the event table")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "checked {} events in {} ms: {} sandboxes ({} allocated), {} claims ({} live), \
             {} track quotas, {} fair-share caps ({} holders of ended allocations, allowed)",
            report.events,
            started.elapsed().as_millis(),
            report.sandboxes,
            report.allocated,
            report.claims,
            report.live_claims,
            report.track_quotas,
            report.caps,
            report.stale_cap_holders
        );
        if report.unknown_events > 0 {
            println!(
                "{} events of a newer release were not folded; run the check with that release",
                report.unknown_events
            );
        }
        for problem in &report.problems {
            println!("PROBLEM {}: {}", problem.stream_id, problem.problem);
        }
        println!(
            "{}",
            if report.is_consistent() {
                "consistent"
            } else {
                "INCONSISTENT"
            }
        );
    }
    Ok(if report.is_consistent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Streams the range page by page: one page in memory at a time, flushed before the next read.
async fn export(feed: &dyn EventFeed, args: &ExportArgs) -> anyhow::Result<()> {
    let mut query = AuditQuery {
        since: args.since,
        until: args.until,
        filter: FeedFilter {
            event_type: args.event_type.clone(),
            caller: args.caller.clone(),
            sandbox_id: args.sandbox_id.clone(),
        },
        cursor: None,
    };
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut written: u64 = 0;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    loop {
        let page = audit_page(feed, &query, args.page_size.max(1), Utc::now())
            .await
            .context("reading the event feed")?;
        for event in &page.events {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
        }
        out.flush().context("writing to stdout")?;
        written += page.events.len() as u64;
        let done = page.cursor.is_none();
        if done || last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!(
                "export: {written} events{}",
                page.events
                    .last()
                    .map(|e| format!(", up to {}", format_time(&e.occurred_at)))
                    .unwrap_or_default()
            );
        }
        if done {
            break;
        }
        query.cursor = page.cursor;
    }
    eprintln!(
        "export: done, {written} events in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

async fn replay(events: Arc<dyn EventStore>, args: &ReplayAtArgs) -> anyhow::Result<()> {
    eprintln!(
        "replay: folding every sandbox stream up to {}",
        format_time(&args.at)
    );
    let started = Instant::now();
    let pool = replay_pool_at(events, Some(args.at), args.segments, args.page_size)
        .await
        .context("replaying the event table")?;
    eprintln!(
        "replay: {} events read, {} applied in {} ms",
        pool.events_read,
        pool.events_applied,
        started.elapsed().as_millis()
    );
    let mut counts = serde_json::Map::new();
    counts.insert("at".into(), format_time(&args.at).into());
    for status in SandboxStatus::ALL {
        counts.insert(status.as_str().into(), pool.stats.get(status).into());
    }
    counts.insert("total".into(), pool.stats.total().into());
    if args.json {
        println!("{}", serde_json::Value::Object(counts));
    } else {
        println!("pool at {}:", format_time(&args.at));
        for status in SandboxStatus::ALL {
            println!("  {:<17} {}", status.as_str(), pool.stats.get(status));
        }
        println!("  {:<17} {}", "total", pool.stats.total());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line is consistent and parses the store flags after a subcommand.
    #[test]
    fn cli_parses() -> Result<(), clap::Error> {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "broker-audit",
            "replay",
            "--at",
            "2026-01-01T00:00:00Z",
            "--store",
            "dynamodb",
        ])?;
        assert!(matches!(cli.command, Command::Replay(_)));
        assert_eq!(cli.store.store, StoreKind::Dynamodb);
        assert!(Cli::try_parse_from(["broker-audit", "replay", "--at", "noon"]).is_err());
        Ok(())
    }

    /// `erase` parses its student and `--dry-run`; the pseudonym key is refused as a flag (it
    /// would stay in process listings), so it comes from the environment or a file.
    #[test]
    fn erase_parses_and_keeps_the_key_off_the_command_line() -> Result<(), clap::Error> {
        let cli: Cli = runtime::try_parse_settings_from([
            "broker-audit",
            "erase",
            "--student",
            "student-1",
            "--dry-run",
        ])?;
        match cli.command {
            Command::Erase(args) => assert!(args.dry_run && args.student == "student-1"),
            other => panic!("erase parsed as {other:?}"),
        }
        let refused = runtime::try_parse_settings_from::<Cli>([
            "broker-audit",
            "erase",
            "--student",
            "student-1",
            "--pseudonym-key",
            "a-key-that-must-not-be-a-flag-0123456789",
        ]);
        assert!(refused.is_err_and(|e| e.to_string().contains("PSEUDONYM_KEY")));
        Ok(())
    }
}
