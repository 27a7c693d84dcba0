//! The commands over the rest of the API: extending a lab window (track), and for operators the
//! pool's drains and quotas, allocation outcomes, admin jobs (list, show, start, wait), stale and
//! bulk deletion, webhook deliveries and a caller's allocations; and shell completions. Each
//! prints JSON or a table (`--format`), like the commands in [`crate::cli`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use crate::backoff::RetryPolicy;
use crate::cli::{emit, pretty, segment, success, CallerArgs, SandboxFormat, ViewFormat};
use crate::client::{Broker, Call, Retry};
use crate::failure::Failure;
use crate::render::{flat_fields, table, with_readable_times};

/// What every command here needs: the client, the retry budget, and whether to be quiet.
pub(crate) struct Context {
    pub(crate) broker: Broker,
    pub(crate) policy: RetryPolicy,
    pub(crate) quiet: bool,
    pub(crate) deadline: Duration,
}

impl Context {
    /// Sends `call`, retrying what is worth retrying up to the deadline.
    async fn send(&self, call: Call) -> Result<Value, Failure> {
        let quiet = self.quiet;
        let reply = self
            .broker
            .send_with_retries(&call, Retry::Transient, &self.policy, |why, wait| {
                if !quiet {
                    eprintln!("brokerctl: {why}; retrying in {:.1}s", wait.as_secs_f64());
                }
            })
            .await
            .map_err(|gave_up| gave_up.into_failure(false))?;
        success(reply)
    }
}

/// `extend`: more hours for the caller's lab window.
#[derive(Debug, Args)]
pub(crate) struct ExtendArgs {
    /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
    sandbox_id: String,
    /// Hours to add (1–8760; the service caps the total at MAX_LAB_EXTENSION_HOURS).
    #[arg(long)]
    hours: u32,
    #[command(flatten)]
    caller: CallerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: SandboxFormat,
}

/// `pool`: drains in force and quota usage.
#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    /// Also report this track's quota usage.
    #[arg(long)]
    track: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `drain`: stop new allocations for a prefix or the whole pool.
#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// Only allocations asking for names with this prefix (default: the whole pool).
    #[arg(long)]
    prefix: Option<String>,
    /// Why, kept in the event (e.g. "CSP maintenance window").
    #[arg(long)]
    reason: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `resume`: end a drain.
#[derive(Debug, Args)]
pub(crate) struct ResumeArgs {
    /// The drained prefix (default: the whole-pool drain).
    #[arg(long)]
    prefix: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// Only an output format.
#[derive(Debug, Args)]
pub(crate) struct FormatArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `jobs`: the admin jobs.
#[derive(Debug, Subcommand)]
pub(crate) enum JobsCommand {
    /// Recent admin jobs, newest first.
    List {
        /// How many (1–100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// One job: state, progress, errors, start and end.
    Show {
        /// The job id (from `jobs start`, `bulk-delete` or `jobs list`).
        job_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Start a job in the background; prints its id (with --wait, follows it to its end).
    Start {
        /// Which job.
        #[arg(value_enum)]
        kind: JobKind,
        /// delete-stale only: retire sandboxes stale for longer than this (0–8760; default:
        /// the service's STALE_GRACE_HOURS).
        #[arg(long)]
        grace_period_hours: Option<u32>,
        /// Follow the job until it ends (up to --deadline), progress on stderr.
        #[arg(long)]
        wait: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Follow a job until it ends (up to --deadline), progress on stderr; exit 5 if it failed,
    /// stopped, was interrupted or is still running at the deadline.
    Wait {
        /// The job id.
        job_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
}

/// The jobs `jobs start` runs.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum JobKind {
    /// Register new CSP accounts, mark missing ones stale.
    Sync,
    /// Delete the CSP accounts of ended allocations.
    Cleanup,
    /// End allocations past their lab window.
    AutoExpire,
    /// Retire sandboxes stale for longer than the grace period.
    DeleteStale,
}

impl JobKind {
    fn path(self) -> &'static str {
        match self {
            Self::Sync => "/v1/admin/sync",
            Self::Cleanup => "/v1/admin/cleanup",
            Self::AutoExpire => "/v1/admin/auto-expire",
            Self::DeleteStale => "/v1/admin/auto-delete-stale",
        }
    }
}

/// `delete-stale`: retire long-stale sandboxes now, and print the summary.
#[derive(Debug, Args)]
pub(crate) struct DeleteStaleArgs {
    /// Retire sandboxes stale for longer than this (0–8760; default: STALE_GRACE_HOURS).
    #[arg(long)]
    grace_period_hours: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `bulk-delete`: retire every sandbox of one status (a background job).
#[derive(Debug, Args)]
pub(crate) struct BulkDeleteArgs {
    /// available, stale, pending_deletion or deletion_failed (never allocated).
    #[arg(long)]
    status: String,
    /// Follow the job until it ends (up to --deadline), progress on stderr.
    #[arg(long)]
    wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `allocations`: every sandbox a caller was allocated.
#[derive(Debug, Args)]
pub(crate) struct AllocationsArgs {
    /// The caller (the X-Instruqt-Sandbox-ID a track sent).
    caller: String,
    /// Allocated at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Allocated before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ViewFormat,
}

/// `completions`: a completion script for a shell.
#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
    /// Write the script to this file instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// An object as a two-column table of its fields (nested ones flattened, times readable).
pub(crate) fn fields_table(body: &Value) -> String {
    let rows: Vec<Value> = flat_fields(body)
        .into_iter()
        .map(|(field, value)| {
            let value = with_readable_times(&json!({ field.clone(): value }))[&field].clone();
            json!({"field": field, "value": value})
        })
        .collect();
    table(&rows, &["field", "value"])
}

/// `body` as JSON, or as a table: rows of the array at `rows` over `columns` when given, else
/// its fields.
pub(crate) fn view(body: &Value, format: ViewFormat, rows: Option<(&str, &[&str])>) -> String {
    match (format, rows) {
        (ViewFormat::Json, _) => pretty(body),
        (ViewFormat::Table, Some((key, columns))) => {
            let rows: Vec<Value> = body[key]
                .as_array()
                .map(|rows| rows.iter().map(with_readable_times).collect())
                .unwrap_or_default();
            table(&rows, columns)
        }
        (ViewFormat::Table, None) => fields_table(body),
    }
}

/// A sandbox answer in a track command's format.
fn sandbox_view(body: &Value, format: SandboxFormat) -> String {
    match format {
        SandboxFormat::Table => fields_table(body),
        other => crate::cli::sandbox_text(body, other),
    }
}

const POOL_DRAINS: (&str, &[&str]) = ("drains", &["prefix", "since", "reason"]);
const JOB_COLUMNS: &[&str] = &[
    "job_id",
    "kind",
    "state",
    "done",
    "total",
    "errors",
    "started_at",
    "finished_at",
];

/// The pool's control state as a table: whether drained, each drain, each quota.
fn pool_view(body: &Value, format: ViewFormat) -> String {
    match format {
        ViewFormat::Json => pretty(body),
        ViewFormat::Table => {
            let mut out = format!(
                "whole pool drained: {}  (version {}; drains reach every instance within {} ms)\n\n",
                body["drained"], body["version"], body["drain_propagation_ms"]
            );
            // `since` is epoch seconds: shown as a UTC time like the `*_at` fields.
            let mut drains = body.clone();
            for drain in drains["drains"].as_array_mut().into_iter().flatten() {
                if let Some(secs) = drain["since"].as_i64() {
                    drain["since"] =
                        with_readable_times(&json!({ "since_at": secs }))["since_at"].clone();
                }
            }
            match drains["drains"].as_array().map(Vec::len) {
                Some(n) if n > 0 => out.push_str(&view(&drains, format, Some(POOL_DRAINS))),
                _ => out.push_str("no drains in force\n"),
            }
            out.push('\n');
            match body["quotas"].as_array().map(Vec::len) {
                Some(n) if n > 0 => out.push_str(&view(
                    body,
                    format,
                    Some(("quotas", &["track", "limit", "in_use"])),
                )),
                _ => out.push_str("no track quota in use (--track names one)\n"),
            }
            out.push_str(&format!(
                "\ndefault track quota: {}\n",
                match &body["default_track_quota"] {
                    Value::Null => "none".to_string(),
                    other => other.to_string(),
                }
            ));
            out
        }
    }
}

/// `extend`.
pub(crate) async fn extend(ctx: &Context, args: ExtendArgs) -> Result<(), Failure> {
    let mut call = Call::new(
        Method::POST,
        format!("/v1/sandboxes/{}/extend", segment(&args.sandbox_id)),
    );
    call.caller = Some(crate::cli::caller_of(&args.caller)?);
    crate::cli::with_lease_token(&mut call, &args.caller)?;
    call.body = Some(json!({ "hours": args.hours }));
    let body = ctx.send(call).await?;
    emit(&sandbox_view(&body, args.format), None)
}

/// `pool`.
pub(crate) async fn pool(ctx: &Context, args: PoolArgs) -> Result<(), Failure> {
    let call = Call::new(Method::GET, "/v1/admin/pool").param("track", args.track.as_deref());
    let body = ctx.send(call).await?;
    emit(&pool_view(&body, args.format), None)
}

/// `drain`.
pub(crate) async fn drain(ctx: &Context, args: DrainArgs) -> Result<(), Failure> {
    let call = Call::new(Method::POST, "/v1/admin/pool/drain")
        .param("prefix", args.prefix.as_deref())
        .param("reason", args.reason.as_deref());
    let body = ctx.send(call).await?;
    emit(&pool_view(&body, args.format), None)
}

/// `resume`.
pub(crate) async fn resume(ctx: &Context, args: ResumeArgs) -> Result<(), Failure> {
    let call =
        Call::new(Method::POST, "/v1/admin/pool/resume").param("prefix", args.prefix.as_deref());
    let body = ctx.send(call).await?;
    emit(&pool_view(&body, args.format), None)
}

/// `outcomes`: totals by outcome (the per-minute series only in JSON).
pub(crate) async fn outcomes(ctx: &Context, args: FormatArgs) -> Result<(), Failure> {
    let body = ctx
        .send(Call::new(Method::GET, "/v1/admin/outcomes"))
        .await?;
    let text = match args.format {
        ViewFormat::Json => pretty(&body),
        ViewFormat::Table => {
            let mut rows: Vec<Value> = body["totals"]
                .as_object()
                .map(|totals| {
                    totals
                        .iter()
                        .map(|(outcome, n)| json!({"outcome": outcome, "count": n}))
                        .collect()
                })
                .unwrap_or_default();
            rows.push(json!({"outcome": "rate_limited", "count": body["rate_limited"]}));
            format!(
                "since {} (now {})\n\n{}",
                body["since"].as_str().unwrap_or_default(),
                body["now"].as_str().unwrap_or_default(),
                table(&rows, &["outcome", "count"])
            )
        }
    };
    emit(&text, None)
}

/// `webhooks`: each subscriber's delivery state.
pub(crate) async fn webhooks(ctx: &Context, args: FormatArgs) -> Result<(), Failure> {
    let body = ctx
        .send(Call::new(Method::GET, "/v1/admin/webhooks/deliveries"))
        .await?;
    let text = match args.format {
        ViewFormat::Json => pretty(&body),
        ViewFormat::Table => {
            let rows: Vec<Value> = body["subscribers"]
                .as_array()
                .map(|subscribers| {
                    subscribers
                        .iter()
                        .map(|s| {
                            let mut row = json!({
                                "name": s["name"],
                                "target": s["target"],
                                "prefixes": s["prefixes"].as_array().map(|p| p.len()).unwrap_or(0),
                                "kinds": s["kinds"].as_array().map(|k| k.len()).unwrap_or(0),
                            });
                            // The saved state's counters, whatever they are named, as columns.
                            if let (Some(row), Some(state)) =
                                (row.as_object_mut(), s["state"].as_object())
                            {
                                for (key, value) in state {
                                    if value.is_number() {
                                        row.insert(key.clone(), value.clone());
                                    }
                                }
                            }
                            row
                        })
                        .collect()
                })
                .unwrap_or_default();
            if rows.is_empty() {
                "no webhook subscribers are configured\n".to_string()
            } else {
                let mut columns: Vec<String> = Vec::new();
                for row in &rows {
                    for key in row.as_object().into_iter().flat_map(|o| o.keys()) {
                        if !columns.contains(key) {
                            columns.push(key.clone());
                        }
                    }
                }
                let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
                table(&rows, &columns)
            }
        }
    };
    emit(&text, None)
}

/// `allocations`: every page of a caller's allocations.
pub(crate) async fn allocations(ctx: &Context, args: AllocationsArgs) -> Result<(), Failure> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let call = Call::new(
            Method::GET,
            format!("/v1/admin/callers/{}/allocations", segment(&args.caller)),
        )
        .param("since", args.since.as_deref())
        .param("until", args.until.as_deref())
        .param("limit", Some("500"))
        .param("cursor", cursor.as_deref());
        let body = ctx.send(call).await?;
        if let Some(page) = body["allocations"].as_array() {
            rows.extend(page.iter().cloned());
        }
        match body["cursor"].as_str() {
            Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    let body = json!({"caller": args.caller, "count": rows.len(), "allocations": rows});
    let columns: &[&str] = &[
        "sandbox_id",
        "track_name",
        "allocated_at",
        "expires_at",
        "ended_at",
        "end_reason",
    ];
    emit(
        &view(&body, args.format, Some(("allocations", columns))),
        None,
    )
}

/// `delete-stale`: runs now and prints the summary.
pub(crate) async fn delete_stale(ctx: &Context, args: DeleteStaleArgs) -> Result<(), Failure> {
    let hours = args.grace_period_hours.map(|h| h.to_string());
    let call = Call::new(Method::POST, JobKind::DeleteStale.path())
        .param("grace_period_hours", hours.as_deref());
    let body = ctx.send(call).await?;
    emit(&view(&body, args.format, None), None)
}

/// `bulk-delete`: always a background job; prints the job, or follows it with `--wait`.
pub(crate) async fn bulk_delete(ctx: &Context, args: BulkDeleteArgs) -> Result<(), Failure> {
    let call = Call::new(Method::POST, "/v1/admin/bulk-delete").param("status", Some(&args.status));
    let accepted = ctx.send(call).await?;
    started(ctx, accepted, args.wait, args.format).await
}

/// `jobs …`.
pub(crate) async fn jobs(ctx: &Context, command: JobsCommand) -> Result<(), Failure> {
    match command {
        JobsCommand::List { limit, format } => {
            let call =
                Call::new(Method::GET, "/v1/admin/jobs").param("limit", Some(&limit.to_string()));
            let body = ctx.send(call).await?;
            emit(&view(&body, format, Some(("jobs", JOB_COLUMNS))), None)
        }
        JobsCommand::Show { job_id, format } => {
            let body = ctx.send(job_call(&job_id)).await?;
            emit(&view(&body, format, None), None)
        }
        JobsCommand::Start {
            kind,
            grace_period_hours,
            wait,
            format,
        } => {
            let hours = grace_period_hours.map(|h| h.to_string());
            if hours.is_some() && !matches!(kind, JobKind::DeleteStale) {
                return Err(Failure::BadInput(
                    "--grace-period-hours applies to delete-stale only; leave it out".into(),
                ));
            }
            let call = Call::new(Method::POST, kind.path())
                .param("grace_period_hours", hours.as_deref())
                .param("background", Some("true"));
            let accepted = ctx.send(call).await?;
            started(ctx, accepted, wait, format).await
        }
        JobsCommand::Wait { job_id, format } => {
            let job = follow(ctx, &job_id).await?;
            finished(&job, format)
        }
    }
}

fn job_call(job_id: &str) -> Call {
    Call::new(Method::GET, format!("/v1/admin/jobs/{}", segment(job_id)))
}

/// A job just accepted (202): printed as it is, or followed to its end.
async fn started(
    ctx: &Context,
    accepted: Value,
    wait: bool,
    format: ViewFormat,
) -> Result<(), Failure> {
    if !wait {
        return emit(&view(&accepted, format, None), None);
    }
    let job_id = accepted["job_id"].as_str().unwrap_or_default().to_string();
    if job_id.is_empty() {
        return Err(Failure::Unexpected(format!(
            "the service accepted the job without an id: {accepted}"
        )));
    }
    let job = follow(ctx, &job_id).await?;
    finished(&job, format)
}

/// A finished job: printed, and a failure unless it completed.
fn finished(job: &Value, format: ViewFormat) -> Result<(), Failure> {
    emit(&view(job, format, None), None)?;
    match job["state"].as_str() {
        Some("completed") => Ok(()),
        state => Err(Failure::Server(format!(
            "job {} ended {}{}; see `brokerctl jobs show {}`",
            job["job_id"].as_str().unwrap_or_default(),
            state.unwrap_or("in an unknown state"),
            job["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
            job["job_id"].as_str().unwrap_or_default(),
        ))),
    }
}

/// Polls a job until it is no longer running, or the deadline passes (exit 5; the job goes on).
async fn follow(ctx: &Context, job_id: &str) -> Result<Value, Failure> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        let job = ctx.send(job_call(job_id)).await?;
        if job["state"].as_str() != Some("running") {
            return Ok(job);
        }
        if !ctx.quiet {
            let total = match &job["total"] {
                Value::Null => "?".to_string(),
                other => other.to_string(),
            };
            eprintln!(
                "brokerctl: job {job_id} ({}) running: {} of {total} done, {} errors",
                job["kind"].as_str().unwrap_or_default(),
                job["done"],
                job["errors"]
            );
        }
        if started.elapsed() + pause > ctx.deadline {
            return Err(Failure::Server(format!(
                "job {job_id} is still running after --deadline; it goes on: follow it with \
                 `brokerctl jobs wait {job_id}`"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// `completions`.
pub(crate) fn completions(args: CompletionsArgs) -> Result<(), Failure> {
    let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "brokerctl", &mut script);
    let text = String::from_utf8(script)
        .map_err(|e| Failure::Unexpected(format!("completion script: {e}")))?;
    emit(&text, args.output.as_deref())
}
