//! The command line: every setting is a flag and an environment variable, except tokens, which
//! come only from the environment or a file, so they never appear in a process listing or a
//! shell history.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::Value;

use crate::backoff::{parse_duration, RetryPolicy};
use crate::client::{Broker, Call, Caller, Reply, Retry, Token};
use crate::failure::{Failure, EXIT_CODES_HELP};
use crate::lease_file;
use crate::live_feed::LiveFeed;
use crate::render::{env_lines, flat_fields, table, with_readable_times};
use crate::verbs::view;

/// Environment variable holding the track token.
pub const TRACK_TOKEN_ENV: &str = "BROKER_TRACK_TOKEN";
/// Environment variable holding the admin token.
pub const ADMIN_TOKEN_ENV: &str = "BROKER_ADMIN_TOKEN";
/// Environment variable holding a per-track credential's caller secret.
pub const CALLER_SECRET_ENV: &str = "BROKER_CALLER_SECRET";

/// Fields of a sandbox written as `export` lines, in this order.
const SANDBOX_ENV_FIELDS: &[&str] = &[
    "sandbox_id",
    "name",
    "external_id",
    "allocated_at",
    "expires_at",
    "sfdc_account_id",
];

/// `brokerctl`: the Sandbox Broker client for lab scripts and operators.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Settings of every command.
#[derive(Debug, Args)]
struct Global {
    /// Base URL of the broker.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Read the token from this file instead of BROKER_TRACK_TOKEN / BROKER_ADMIN_TOKEN.
    #[arg(long, env = "BROKER_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Give up retrying after this long (e.g. 90, 90s, 5m).
    #[arg(long, env = "BROKER_DEADLINE", default_value = "5m", value_parser = parse_duration, global = true)]
    deadline: Duration,
    /// Bound on one HTTP request.
    #[arg(long, env = "BROKER_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    timeout: Duration,
    /// No retry or progress messages on stderr.
    #[arg(long, short, env = "BROKER_QUIET", global = true)]
    quiet: bool,
}

/// Who a track command acts for.
#[derive(Debug, Args)]
pub(crate) struct CallerArgs {
    /// The student (sent as X-Instruqt-Sandbox-ID); in Instruqt, the participant or sandbox id.
    #[arg(long, env = "BROKER_CALLER")]
    caller: String,
    /// Per-track credentials: file holding the caller secret (else BROKER_CALLER_SECRET).
    #[arg(long, env = "BROKER_CALLER_SECRET_FILE")]
    caller_secret_file: Option<PathBuf>,
    /// Lease file (mode 0600): `allocate` keeps a generated 128-bit idempotency key and the
    /// lease token here; `status`, `release` and `extend` send the token (X-Lease-Token).
    #[arg(long, env = "BROKER_LEASE_FILE")]
    lease_file: Option<PathBuf>,
}

/// How a track command prints a sandbox.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SandboxFormat {
    /// The service's JSON.
    Json,
    /// `export SANDBOX_…='…'` lines, to `source` from a lab's env file.
    Env,
    /// One row per field, times as UTC dates.
    Table,
}

/// How an operator command prints.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ViewFormat {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Allocate a sandbox (track token); waits while none is free, up to --deadline.
    Allocate {
        #[command(flatten)]
        caller: CallerArgs,
        /// Idempotency key (default: the caller); a re-run with the same key gets the same sandbox.
        #[arg(long, env = "BROKER_IDEMPOTENCY_KEY")]
        idempotency_key: Option<String>,
        /// Only sandboxes whose name starts with this.
        #[arg(long, env = "BROKER_NAME_PREFIX")]
        prefix: Option<String>,
        /// Lab slug, for analytics (X-Instruqt-Track-ID).
        #[arg(long, env = "BROKER_TRACK_ID")]
        track: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: SandboxFormat,
        /// Write the output to this file (atomically) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// When no sandbox is free, wait up to this many seconds in the broker's line
        /// (`Prefer: wait`, cut to the broker's WAIT_MAX_SEC) before each retry; served in
        /// arrival order. --deadline and Retry-After still bound the whole run.
        #[arg(long, env = "BROKER_WAIT", value_name = "SECONDS")]
        wait: Option<u64>,
        /// When no sandbox is free, take a ticket in the broker's line (`Prefer: respond-async`;
        /// the broker needs WRITE_EVENTS_WAITING_LINE) and poll it, as its Retry-After says,
        /// until it is served or --deadline passes.
        #[arg(long = "async")]
        ticket: bool,
    },
    /// Show the caller's sandbox (track token).
    Status {
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        #[command(flatten)]
        caller: CallerArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: SandboxFormat,
    },
    /// End the caller's allocation (track token); a sandbox already released or deleted is a
    /// success, an id or name that no sandbox has is not (exit 6).
    Release {
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        #[command(flatten)]
        caller: CallerArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: SandboxFormat,
    },
    /// Pool counts (admin token).
    Stats {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Every sandbox matching the filters, all pages (admin token).
    List {
        /// available, allocated, pending_deletion, stale, deletion_failed or deleted.
        #[arg(long)]
        status: Option<String>,
        /// Current or most recent owner.
        #[arg(long)]
        owner: Option<String>,
        /// Name prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Rows per request (1–100).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// A sandbox's events, envelopes included (admin token).
    History {
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        /// Output format (table: one row per event).
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// A sandbox's state at an instant: who held it then (admin token).
    At {
        /// The instant, RFC 3339 (e.g. 2026-05-01T10:00:00Z).
        time: String,
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// Re-queue a quarantined (deletion_failed) sandbox for cleanup (admin token).
    RetryDeletion {
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// Run the sync job once, now: register new CSP accounts, mark missing ones stale (admin token).
    Sync {
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// Run the cleanup job once, now: delete the CSP accounts of ended allocations (admin token).
    Cleanup {
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// Run the expiry job once, now: end allocations past their lab window (admin token).
    AutoExpire {
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ViewFormat,
    },
    /// The event history as NDJSON, all pages, progress on stderr (admin token).
    Export {
        /// From this time, inclusive (RFC 3339; default: the beginning).
        #[arg(long)]
        since: Option<String>,
        /// Up to this time, exclusive (RFC 3339; default: now).
        #[arg(long)]
        until: Option<String>,
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of this caller.
        #[arg(long)]
        caller: Option<String>,
        /// Only events of this sandbox.
        #[arg(long)]
        sandbox_id: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Follow the live event feed as NDJSON, resuming after --since-id (admin token).
    Tail {
        /// Start after this event id (the `key` / SSE id) or RFC 3339 time; default: now.
        #[arg(long, env = "BROKER_SINCE_ID")]
        since_id: Option<String>,
        /// Keep the last id here: read at start (when --since-id is not given), written after each event.
        #[arg(long)]
        state_file: Option<PathBuf>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Add hours to the caller's lab window (track token).
    Extend(crate::verbs::ExtendArgs),
    /// Drains in force and quota usage, with a track's usage on --track (admin token).
    Pool(crate::verbs::PoolArgs),
    /// Stop new allocations for a name prefix, or the whole pool: they answer 503 MAINTENANCE
    /// (admin token).
    Drain(crate::verbs::DrainArgs),
    /// End a drain (admin token).
    Resume(crate::verbs::ResumeArgs),
    /// Allocation answers by outcome, counted by the instance that answers (admin token).
    Outcomes(crate::verbs::FormatArgs),
    /// Admin jobs: list, show, start in the background, wait for one to end (admin token).
    Jobs {
        #[command(subcommand)]
        command: crate::verbs::JobsCommand,
    },
    /// Retire sandboxes stale for longer than the grace period, now (admin token).
    DeleteStale(crate::verbs::DeleteStaleArgs),
    /// Retire every sandbox of one status, as a background job (admin token).
    BulkDelete(crate::verbs::BulkDeleteArgs),
    /// How each webhook subscriber's deliveries stand (admin token).
    Webhooks(crate::verbs::FormatArgs),
    /// Every sandbox a caller was allocated, with how each allocation ended (admin token).
    Allocations(crate::verbs::AllocationsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(crate::verbs::CompletionsArgs),
    /// A student's pseudonym and sandboxes while the subject record exists (admin token). The
    /// id travels in the request body, never in a URL.
    Student {
        /// The student id as the track sends it (X-Instruqt-Sandbox-ID).
        student: String,
    },
    /// Erase a student: delete the subject record, so the pseudonyms in the log can no longer be
    /// linked to the id (admin token). Refused (exit 7) while the student holds a live sandbox;
    /// exit 6 when there is no subject record (never seen, or erased already).
    Erase {
        /// The student id as the track sends it (X-Instruqt-Sandbox-ID).
        student: String,
    },
    /// Whether a pseudonym seen in the log still names a student: `linked` (with the id),
    /// `erased` or `unknown` (admin token).
    Pseudonym {
        /// The pseudonym as the log shows it (`p1:` and 24 hex digits).
        pseudonym: String,
    },
    /// Reserve sandboxes for a track over a time window; list, show and cancel reservations
    /// (admin token).
    Reservations {
        #[command(subcommand)]
        action: ReservationAction,
    },
    /// Whether --count students can start now or at --at, with the numbers behind the answer
    /// and when the prefix runs dry (admin token; a track token through --token-file asks for
    /// its own track).
    Capacity {
        /// The track (a per-track credential's own by default).
        #[arg(long)]
        track: Option<String>,
        /// Only sandboxes whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Students.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// When they start, RFC 3339 (default: now).
        #[arg(long)]
        at: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Tell the broker the lab holding this sandbox is alive (track token); with --every, keep
    /// sending until the allocation ends (exit 0) or a heartbeat is refused.
    Heartbeat {
        /// The sandbox: its broker id (`sandbox_id`, e.g. mock-001) or its name (e.g. lab-demo-001).
        sandbox_id: String,
        #[command(flatten)]
        caller: CallerArgs,
        /// Send a heartbeat every this many seconds (at least 5) until the allocation ends.
        #[arg(long)]
        every: Option<u64>,
    },
    /// Usage over a range by track, prefix or day (admin token).
    Usage {
        /// Inclusive start: RFC 3339 or a day (YYYY-MM-DD); default: 7 days before --to.
        #[arg(long)]
        from: Option<String>,
        /// Exclusive end: RFC 3339 or a day; default: now.
        #[arg(long)]
        to: Option<String>,
        /// track, prefix or day.
        #[arg(long, default_value = "track")]
        group_by: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
        /// Only allocations made for this track.
        #[arg(long)]
        track: Option<String>,
        /// Only allocations of sandboxes whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Waiting-line tickets of `allocate --async` (track token).
    Tickets {
        #[command(subcommand)]
        command: TicketsCommand,
    },
    /// The waiting lines of the instance that answers: track, prefix and requests waiting
    /// (admin token; behind a load balancer each instance has its own).
    WaitingLines {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
}

/// What `brokerctl tickets` does.
#[derive(Debug, Subcommand)]
enum TicketsCommand {
    /// Show a ticket: pending (with its place in line), served (with the allocation), or the
    /// 410 of a ticket that left the line.
    Show {
        /// The `ticket_id` of the ticket.
        ticket_id: String,
        #[command(flatten)]
        caller: CallerArgs,
    },
}

/// What `brokerctl reservations` does.
#[derive(Debug, Subcommand)]
enum ReservationAction {
    /// Reserve --count sandboxes for --track from --starts-at to --ends-at; refused (exit 7,
    /// `INSUFFICIENT_CAPACITY`) when the pool cannot honour the window.
    Create {
        /// The track whose students the sandboxes are for.
        #[arg(long)]
        track: String,
        /// How many sandboxes.
        #[arg(long)]
        count: u32,
        /// Only sandboxes whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// When the window opens, RFC 3339.
        #[arg(long)]
        starts_at: String,
        /// When it closes, RFC 3339.
        #[arg(long)]
        ends_at: String,
        /// `open_pool` or `reservation_only` (default: the service's setting).
        #[arg(long)]
        overflow: Option<String>,
        /// A note for other operators.
        #[arg(long)]
        note: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Every reservation, oldest first.
    List {
        /// Only this track's.
        #[arg(long)]
        track: Option<String>,
        /// Only those in this state: scheduled, earmarking, open, cancelled, ended or active.
        #[arg(long)]
        state: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// One reservation: window, state, free / used / lost earmarks, shortfall.
    Show {
        /// The reservation id.
        reservation_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ViewFormat,
    },
    /// Cancel a reservation: its unused earmarks return to the pool.
    Cancel {
        /// The reservation id.
        reservation_id: String,
    },
}

/// The columns of a reservation listing.
const RESERVATION_COLUMNS: [&str; 10] = [
    "reservation_id",
    "track",
    "count",
    "state",
    "starts_at",
    "ends_at",
    "free",
    "used",
    "lost",
    "shortfall",
];

/// An object as a two-column table of its (flattened) fields, or pretty JSON.
fn object_text(body: &Value, format: ViewFormat) -> String {
    match format {
        ViewFormat::Json => pretty(body),
        ViewFormat::Table => {
            let rows: Vec<Value> = flat_fields(body)
                .into_iter()
                .map(|(k, v)| serde_json::json!({"field": k, "value": v}))
                .collect();
            table(&rows, &["field", "value"])
        }
    }
}

impl Command {
    fn is_track(&self) -> bool {
        matches!(
            self,
            Command::Allocate { .. }
                | Command::Status { .. }
                | Command::Release { .. }
                | Command::Extend(_)
                | Command::Heartbeat { .. }
                | Command::Tickets { .. }
        )
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let global = &cli.global;
    // A completion script needs no token and no service.
    if let Command::Completions(args) = cli.command {
        return crate::verbs::completions(args);
    }
    let token = token(global, cli.command.is_track())?;
    let broker = Broker::new(&global.url, token.clone(), global.timeout)?;
    let policy = RetryPolicy::within(global.deadline);
    let quiet = global.quiet;
    let on_retry = |why: &str, wait: Duration| {
        if !quiet {
            eprintln!("brokerctl: {why}; retrying in {:.1}s", wait.as_secs_f64());
        }
    };
    let send = |call: Call| {
        let broker = broker.clone();
        async move {
            broker
                .send_with_retries(&call, Retry::Transient, &policy, on_retry)
                .await
                .map_err(|gave_up| gave_up.into_failure(false))
        }
    };
    match cli.command {
        Command::Allocate {
            caller,
            idempotency_key,
            prefix,
            track,
            format,
            output,
            wait,
            ticket,
        } => {
            let mut call = Call::new(Method::POST, "/v1/allocate");
            if ticket {
                call.headers.push(("Prefer", "respond-async".to_string()));
            }
            // A waiting request stays open for the wait: its HTTP bound must outlast it.
            let broker = match wait.filter(|w| *w > 0) {
                Some(w) => {
                    call.headers.push(("Prefer", format!("wait={w}")));
                    let bound = global
                        .timeout
                        .max(Duration::from_secs(w.saturating_add(10)));
                    Broker::new(&global.url, token.clone(), bound)?
                }
                None => broker.clone(),
            };
            call.caller = Some(caller_of(&caller)?);
            // With a lease file, the key is generated once and kept before the request is sent,
            // so a re-run after a lost answer replays with the same key.
            let mut lease = None;
            let idempotency_key = match &caller.lease_file {
                Some(path) => {
                    let mut state = lease_file::load(path)?;
                    let key = idempotency_key
                        .or_else(|| state.idempotency_key.clone())
                        .unwrap_or_else(lease_file::new_key);
                    if state.idempotency_key.as_deref() != Some(key.as_str()) {
                        state = lease_file::LeaseState {
                            idempotency_key: Some(key.clone()),
                            ..Default::default()
                        };
                        lease_file::save(path, &state)?;
                    }
                    if let Some(token) = &state.lease_token {
                        call.headers.push(("X-Lease-Token", token.clone()));
                    }
                    lease = Some((path.clone(), state));
                    Some(key)
                }
                None => idempotency_key,
            };
            for (name, value) in [
                ("Idempotency-Key", idempotency_key),
                ("X-Sandbox-Name-Prefix", prefix),
                ("X-Instruqt-Track-ID", track),
            ] {
                if let Some(value) = value {
                    call.headers.push((name, value));
                }
            }
            let reply = broker
                .send_with_retries(&call, Retry::TransientAndNoSandbox, &policy, on_retry)
                .await
                .map_err(|gave_up| gave_up.into_failure(true))?;
            let body = if reply.status == reqwest::StatusCode::ACCEPTED {
                let poll_caller = caller_of(&caller)?;
                poll_ticket(&broker, &reply, poll_caller, global.deadline, quiet).await?
            } else {
                success(reply)?
            };
            if let Some((path, mut state)) = lease {
                let text = |field: &str| body[field].as_str().map(str::to_string);
                state.lease_token = text("lease_token").or(state.lease_token);
                state.sandbox_id = text("sandbox_id");
                lease_file::save(&path, &state)?;
            }
            emit(&sandbox_text(&body, format), output.as_deref())
        }
        Command::Status {
            sandbox_id,
            caller,
            format,
        } => {
            let mut call = Call::new(
                Method::GET,
                format!("/v1/sandboxes/{}", segment(&sandbox_id)),
            );
            call.caller = Some(caller_of(&caller)?);
            with_lease_token(&mut call, &caller)?;
            let body = success(send(call).await?)?;
            emit(&sandbox_text(&body, format), None)
        }
        Command::Release {
            sandbox_id,
            caller,
            format,
        } => {
            let mut call = Call::new(
                Method::POST,
                format!("/v1/sandboxes/{}/mark-for-deletion", segment(&sandbox_id)),
            );
            call.caller = Some(caller_of(&caller)?);
            with_lease_token(&mut call, &caller)?;
            // A repeat, or a release after the broker expired the allocation, is a 200 from the
            // service: "already gone" is the outcome a lab's cleanup wanted. A 404 is not: no
            // sandbox has that id or name, so nothing was released (exit 6).
            let reply = send(call).await?;
            let body = success(reply)?;
            emit(&sandbox_text(&body, format), None)
        }
        Command::Stats { format } => {
            let body = success(send(Call::new(Method::GET, "/v1/admin/stats")).await?)?;
            let text = match format {
                ViewFormat::Json => pretty(&body),
                ViewFormat::Table => {
                    // Nested counts (`by_prefix`) become one row each: `by_prefix.lab.available`.
                    let rows: Vec<Value> = flat_fields(&body)
                        .into_iter()
                        .map(|(k, v)| serde_json::json!({"field": k, "value": v}))
                        .collect();
                    table(&rows, &["field", "value"])
                }
            };
            emit(&text, None)
        }
        Command::List {
            status,
            owner,
            prefix,
            page_size,
            format,
        } => {
            if !(1..=100).contains(&page_size) {
                return Err(Failure::BadInput("--page-size must be 1–100".into()));
            }
            let mut rows = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let call = Call::new(Method::GET, "/v1/admin/sandboxes")
                    .param("status", status.as_deref())
                    .param("owner", owner.as_deref())
                    .param("prefix", prefix.as_deref())
                    .param("limit", Some(&page_size.to_string()))
                    .param("cursor", cursor.as_deref());
                let body = success(send(call).await?)?;
                if let Some(page) = body["sandboxes"].as_array() {
                    rows.extend(page.iter().cloned());
                }
                match body["cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => break,
                }
            }
            let text = match format {
                ViewFormat::Json => pretty(&Value::Array(rows)),
                ViewFormat::Table => table(
                    &rows.iter().map(with_readable_times).collect::<Vec<_>>(),
                    &[
                        "sandbox_id",
                        "name",
                        "status",
                        "allocated_to_track",
                        "track_name",
                        "expires_at",
                        "deletion_attempts",
                    ],
                ),
            };
            emit(&text, None)
        }
        Command::History { sandbox_id, format } => {
            let path = format!("/v1/admin/sandboxes/{}/history", segment(&sandbox_id));
            let body = success(send(Call::new(Method::GET, path)).await?)?;
            let columns: &[&str] = &["occurred_at", "event_type", "version", "actor"];
            emit(&view(&body, format, Some(("events", columns))), None)
        }
        Command::At {
            time,
            sandbox_id,
            format,
        } => {
            let path = format!("/v1/admin/sandboxes/{}", segment(&sandbox_id));
            let call = Call::new(Method::GET, path).param("at", Some(&time));
            let body = success(send(call).await?)?;
            emit(&view(&body, format, None), None)
        }
        Command::RetryDeletion { sandbox_id, format } => {
            let path = format!(
                "/v1/admin/sandboxes/{}/retry-deletion",
                segment(&sandbox_id)
            );
            let body = success(send(Call::new(Method::POST, path)).await?)?;
            emit(&view(&body, format, None), None)
        }
        job @ (Command::Sync { .. } | Command::Cleanup { .. } | Command::AutoExpire { .. }) => {
            let (path, format) = match job {
                Command::Sync { format } => ("/v1/admin/sync", format),
                Command::Cleanup { format } => ("/v1/admin/cleanup", format),
                Command::AutoExpire { format } => ("/v1/admin/auto-expire", format),
                _ => return Err(Failure::Unexpected("not a job command".into())),
            };
            let body = success(send(Call::new(Method::POST, path)).await?)?;
            emit(&view(&body, format, None), None)
        }
        Command::Export {
            since,
            until,
            event_type,
            caller,
            sandbox_id,
            output,
        } => {
            let mut sink: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).map_err(|e| local(path, e))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let progress = Progress::new(quiet);
            let mut cursor: Option<String> = None;
            // The first page fixes `until`; later pages reuse it so the export is one range even
            // while new events keep landing.
            let mut until = until;
            let mut exported = 0u64;
            // Where the range starts, for the bar: `--since`, else the first event exported.
            let mut start = since.clone();
            let mut reached = String::new();
            loop {
                let call = Call::new(Method::GET, "/v1/admin/events")
                    .param("since", since.as_deref())
                    .param("until", until.as_deref())
                    .param("type", event_type.as_deref())
                    .param("caller", caller.as_deref())
                    .param("sandbox_id", sandbox_id.as_deref())
                    .param("limit", Some("500"))
                    .param("cursor", cursor.as_deref());
                let body = success(send(call).await?)?;
                let events = body["events"].as_array().cloned().unwrap_or_default();
                for event in &events {
                    writeln!(sink, "{event}").map_err(|e| local_io("write", e))?;
                }
                exported += events.len() as u64;
                if until.is_none() {
                    until = body["until"].as_str().map(str::to_string);
                }
                // A page may hold no event while its cursor moves on: the time reached is that
                // of the last event of any page so far.
                if let Some(last) = events.last().and_then(|e| e["occurred_at"].as_str()) {
                    reached = last.to_string();
                }
                if start.is_none() && !reached.is_empty() {
                    start = events
                        .first()
                        .and_then(|e| e["occurred_at"].as_str())
                        .map(str::to_string);
                }
                // The last page completes the range, whenever its last event happened, and
                // even when it (or the whole range) held no event.
                let last_page = body["cursor"].as_str().is_none();
                let done = if last_page {
                    Some(1.0)
                } else {
                    range_fraction(start.as_deref(), &reached, until.as_deref())
                };
                let shown = match (last_page, until.as_deref()) {
                    (true, Some(end)) if reached.is_empty() => end,
                    _ => reached.as_str(),
                };
                progress.show(exported, shown, done);
                match body["cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => break,
                }
            }
            sink.flush().map_err(|e| local_io("write", e))?;
            progress.done(exported);
            Ok(())
        }
        Command::Reservations { action } => match action {
            ReservationAction::Create {
                track,
                count,
                prefix,
                starts_at,
                ends_at,
                overflow,
                note,
                format,
            } => {
                let mut call = Call::new(Method::POST, "/v1/admin/reservations");
                call.body = Some(serde_json::json!({
                    "track": track,
                    "count": count,
                    "prefix": prefix,
                    "starts_at": starts_at,
                    "ends_at": ends_at,
                    "overflow": overflow,
                    "note": note,
                }));
                let body = success(send(call).await?)?;
                emit(&object_text(&body, format), None)
            }
            ReservationAction::List {
                track,
                state,
                format,
            } => {
                let call = Call::new(Method::GET, "/v1/admin/reservations")
                    .param("track", track.as_deref())
                    .param("state", state.as_deref());
                let body = success(send(call).await?)?;
                let rows = body["reservations"].as_array().cloned().unwrap_or_default();
                let text = match format {
                    ViewFormat::Json => pretty(&Value::Array(rows)),
                    ViewFormat::Table => table(&rows, &RESERVATION_COLUMNS),
                };
                emit(&text, None)
            }
            ReservationAction::Show {
                reservation_id,
                format,
            } => {
                let path = format!("/v1/admin/reservations/{}", segment(&reservation_id));
                let body = success(send(Call::new(Method::GET, path)).await?)?;
                emit(&object_text(&body, format), None)
            }
            ReservationAction::Cancel { reservation_id } => {
                let path = format!("/v1/admin/reservations/{}", segment(&reservation_id));
                let body = success(send(Call::new(Method::DELETE, path)).await?)?;
                emit(&pretty(&body), None)
            }
        },
        Command::Capacity {
            track,
            prefix,
            count,
            at,
            format,
        } => {
            let call = Call::new(Method::GET, "/v1/capacity")
                .param("track", track.as_deref())
                .param("prefix", prefix.as_deref())
                .param("count", Some(&count.to_string()))
                .param("at", at.as_deref());
            let body = success(send(call).await?)?;
            emit(&object_text(&body, format), None)
        }
        Command::WaitingLines { format } => {
            let body = success(send(Call::new(Method::GET, "/v1/admin/waiting-lines")).await?)?;
            let text = match format {
                ViewFormat::Json => pretty(&body),
                ViewFormat::Table => {
                    let rows = body["lines"].as_array().cloned().unwrap_or_default();
                    format!(
                        "{}waiting in all: {}\n",
                        table(&rows, &["track", "prefix", "waiting"]),
                        body["waiting"]
                    )
                }
            };
            emit(&text, None)
        }
        Command::Tickets {
            command: TicketsCommand::Show { ticket_id, caller },
        } => {
            let mut call = Call::new(Method::GET, format!("/v1/tickets/{}", segment(&ticket_id)));
            call.caller = Some(caller_of(&caller)?);
            let body = success(send(call).await?)?;
            emit(&pretty(&body), None)
        }
        Command::Tail {
            since_id,
            state_file,
            count,
        } => {
            let since = match (since_id, &state_file) {
                (Some(id), _) => Some(id),
                (None, Some(path)) if path.exists() => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| local(path, e))?
                        .trim()
                        .to_string(),
                ),
                _ => None,
            };
            // A stream stays open for minutes: no total timeout, only the connect bound.
            let http = reqwest::Client::builder()
                .connect_timeout(global.timeout)
                .build()
                .map_err(|e| Failure::Unexpected(format!("HTTP client: {e}")))?;
            let mut feed = LiveFeed::new(Broker::with_client(http, &global.url, token), since);
            let mut seen = 0u64;
            let mut stdout = std::io::stdout();
            let mut failure = None;
            feed.follow(|event| {
                let written = writeln!(stdout, "{}", event.data).and_then(|()| stdout.flush());
                let saved = match (&state_file, &event.id) {
                    (Some(path), Some(id)) => write_atomically(path, &format!("{id}\n")),
                    _ => Ok(()),
                };
                if let Err(e) = written.map_err(|e| local_io("write", e)).and(saved) {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await?;
            failure.map_or(Ok(()), Err)
        }
        Command::Student { student } => {
            let call = Call::new(Method::POST, "/v1/admin/students/lookup")
                .json(serde_json::json!({ "student": student }));
            let body = success(send(call).await?)?;
            emit(&pretty(&body), None)
        }
        Command::Erase { student } => {
            let call = Call::new(Method::POST, "/v1/admin/students/erase")
                .json(serde_json::json!({ "student": student }));
            let body = success(send(call).await?)?;
            emit(&pretty(&body), None)
        }
        Command::Pseudonym { pseudonym } => {
            let call = Call::new(Method::GET, format!("/v1/admin/pseudonyms/{pseudonym}"));
            let body = success(send(call).await?)?;
            emit(&pretty(&body), None)
        }
        Command::Heartbeat {
            sandbox_id,
            caller,
            every,
        } => {
            let beat = || async {
                let mut call = Call::new(
                    Method::POST,
                    format!("/v1/sandboxes/{}/heartbeat", segment(&sandbox_id)),
                );
                call.caller = Some(caller_of(&caller)?);
                with_lease_token(&mut call, &caller)?;
                send(call).await
            };
            let Some(every) = every else {
                let body = success(beat().await?)?;
                return emit(&format!("{body}\n"), None);
            };
            if every < 5 {
                return Err(Failure::BadInput(
                    "--every must be at least 5 seconds; the grace covers many missed beats".into(),
                ));
            }
            loop {
                let reply = beat().await?;
                if reply.status == reqwest::StatusCode::CONFLICT {
                    // The allocation ended (released, expired or reclaimed): nothing to keep alive.
                    if !quiet {
                        eprintln!(
                            "brokerctl: the allocation of {sandbox_id} has ended; heartbeats stop"
                        );
                    }
                    return Ok(());
                }
                let body = success(reply)?;
                if !quiet {
                    eprintln!(
                        "brokerctl: heartbeat recorded at {}",
                        body["last_heartbeat_at"].as_str().unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_secs(every)).await;
            }
        }
        Command::Usage {
            from,
            to,
            group_by,
            format,
            track,
            prefix,
        } => {
            let call = Call::new(Method::GET, "/v1/admin/usage")
                .param("from", from.as_deref())
                .param("to", to.as_deref())
                .param("group_by", Some(group_by.as_str()))
                .param("track", track.as_deref())
                .param("prefix", prefix.as_deref());
            let body = success(send(call).await?)?;
            let text = match format {
                ViewFormat::Json => pretty(&body),
                ViewFormat::Table => {
                    let mut rows = body["groups"].as_array().cloned().unwrap_or_default();
                    rows.push(body["totals"].clone());
                    table(
                        &rows,
                        &[
                            "group",
                            "allocations",
                            "sandbox_hours",
                            "hold_median_s",
                            "hold_p95_s",
                            "extensions",
                            "waits",
                            "reclaims",
                            "deletions",
                            "quarantines",
                        ],
                    )
                }
            };
            emit(&text, None)
        }
        command => {
            let ctx = crate::verbs::Context {
                broker: broker.clone(),
                policy,
                quiet,
                deadline: global.deadline,
            };
            match command {
                Command::Extend(args) => crate::verbs::extend(&ctx, args).await,
                Command::Pool(args) => crate::verbs::pool(&ctx, args).await,
                Command::Drain(args) => crate::verbs::drain(&ctx, args).await,
                Command::Resume(args) => crate::verbs::resume(&ctx, args).await,
                Command::Outcomes(args) => crate::verbs::outcomes(&ctx, args).await,
                Command::Jobs { command } => crate::verbs::jobs(&ctx, command).await,
                Command::DeleteStale(args) => crate::verbs::delete_stale(&ctx, args).await,
                Command::BulkDelete(args) => crate::verbs::bulk_delete(&ctx, args).await,
                Command::Webhooks(args) => crate::verbs::webhooks(&ctx, args).await,
                Command::Allocations(args) => crate::verbs::allocations(&ctx, args).await,
                _ => Err(Failure::Unexpected("command not dispatched".into())),
            }
        }
    }
}

/// The token for the command's audience: `--token-file`, else the audience's variable.
fn token(global: &Global, track: bool) -> Result<Token, Failure> {
    if let Some(path) = &global.token_file {
        return Token::new(&std::fs::read_to_string(path).map_err(|e| local(path, e))?);
    }
    let name = if track {
        TRACK_TOKEN_ENV
    } else {
        ADMIN_TOKEN_ENV
    };
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Token::new(&value),
        _ => Err(Failure::Auth(format!(
            "no token: set {name} or --token-file"
        ))),
    }
}

pub(crate) fn caller_of(args: &CallerArgs) -> Result<Caller, Failure> {
    if args.caller.trim().is_empty() {
        return Err(Failure::BadInput("--caller is empty".into()));
    }
    let secret = match &args.caller_secret_file {
        Some(path) => Some(Token::new(
            &std::fs::read_to_string(path).map_err(|e| local(path, e))?,
        )?),
        None => match std::env::var(CALLER_SECRET_ENV) {
            Ok(value) if !value.trim().is_empty() => Some(Token::new(&value)?),
            _ => None,
        },
    };
    Ok(Caller {
        id: args.caller.clone(),
        secret,
    })
}

/// Adds the lease file's token (X-Lease-Token) to a per-sandbox call, when there is one.
pub(crate) fn with_lease_token(call: &mut Call, args: &CallerArgs) -> Result<(), Failure> {
    if let Some(path) = &args.lease_file {
        if let Some(token) = lease_file::load(path)?.lease_token {
            call.headers.push(("X-Lease-Token", token));
        }
    }
    Ok(())
}

/// The body of a 2xx reply, or the reply's failure.
pub(crate) fn success(reply: Reply) -> Result<Value, Failure> {
    if reply.status.is_success() {
        Ok(reply.body)
    } else {
        Err(reply.failure())
    }
}

pub(crate) fn sandbox_text(body: &Value, format: SandboxFormat) -> String {
    match format {
        SandboxFormat::Json => format!("{body}\n"),
        SandboxFormat::Env => env_lines(body, SANDBOX_ENV_FIELDS),
        SandboxFormat::Table => crate::verbs::fields_table(body),
    }
}

pub(crate) fn pretty(value: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    )
}

/// A path segment: ids may contain `/`, `#`, `?` or spaces, which must not change the route.
pub(crate) fn segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Prints to stdout, or writes `path` atomically (a lab never reads a half-written file).
pub(crate) fn emit(text: &str, path: Option<&Path>) -> Result<(), Failure> {
    match path {
        Some(path) => write_atomically(path, text),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| local_io("write", e))
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), Failure> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    std::fs::write(&temp, text).map_err(|e| local(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| local(path, e))
}

fn local(path: &Path, e: std::io::Error) -> Failure {
    Failure::Unexpected(format!("{}: {e}", path.display()))
}

fn local_io(what: &str, e: std::io::Error) -> Failure {
    Failure::Unexpected(format!("{what}: {e}"))
}

/// Export progress on stderr: one rewritten line on a terminal, a line per page otherwise.
struct Progress {
    quiet: bool,
    terminal: bool,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, exported: u64, reached: &str, done: Option<f64>) {
        if self.quiet {
            return;
        }
        let line = progress_line(exported, reached, done);
        if self.terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&self, exported: u64) {
        if !self.quiet {
            if self.terminal {
                eprintln!();
            }
            eprintln!("export complete: {exported} events");
        }
    }
}

/// How far `reached` is through the time range `start..end` (0.0–1.0), when all three are
/// RFC 3339 times; the export walks the range in time order, so this is its progress.
fn range_fraction(start: Option<&str>, reached: &str, end: Option<&str>) -> Option<f64> {
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let (start, reached, end) = (at(start?)?, at(reached)?, at(end?)?);
    let whole = (end - start).num_milliseconds();
    if whole <= 0 {
        return None;
    }
    let part = (reached - start).num_milliseconds();
    Some((part as f64 / whole as f64).clamp(0.0, 1.0))
}

/// One progress line: a 20-cell bar with the share of the time range done (when known), the
/// events written and the time reached.
fn progress_line(exported: u64, reached: &str, done: Option<f64>) -> String {
    const CELLS: usize = 20;
    match done {
        Some(done) => {
            let filled = (done * CELLS as f64).round() as usize;
            format!(
                "[{}{}] {:>3.0}% exported {exported} events (up to {reached})",
                "#".repeat(filled),
                "-".repeat(CELLS - filled),
                done * 100.0
            )
        }
        None => format!("exported {exported} events (up to {reached})"),
    }
}

/// Polls the ticket of a 202 (its `poll_url`, as often as `Retry-After` says) until it is served
/// (the allocation's body), leaves the line (410: exit 4, like a deadline), or `deadline`
/// passes.
async fn poll_ticket(
    broker: &Broker,
    issued: &Reply,
    caller: Caller,
    deadline: Duration,
    quiet: bool,
) -> Result<Value, Failure> {
    let ends = std::time::Instant::now() + deadline;
    let poll_url = issued.body["poll_url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if poll_url.is_empty() {
        return Err(Failure::Unexpected(
            "the 202 named no poll_url; upgrade brokerctl or the broker".to_string(),
        ));
    }
    let mut wait = issued.retry_after.unwrap_or(Duration::from_secs(2));
    loop {
        if !quiet {
            eprintln!(
                "brokerctl: waiting in line (ticket {}); polling in {:.0}s",
                issued.body["ticket_id"].as_str().unwrap_or_default(),
                wait.as_secs_f64()
            );
        }
        if std::time::Instant::now() + wait > ends {
            return Err(Failure::NoSandbox(
                "the ticket was still waiting in line at --deadline".to_string(),
            ));
        }
        tokio::time::sleep(wait).await;
        let mut call = Call::new(Method::GET, poll_url.clone());
        call.caller = Some(caller.clone());
        let reply = broker
            .send_with_retries(
                &call,
                Retry::Transient,
                &RetryPolicy::within(deadline),
                |_, _| {},
            )
            .await
            .map_err(|gave_up| gave_up.into_failure(false))?;
        if reply.status.as_u16() == 410 {
            return Err(Failure::NoSandbox(reply.describe()));
        }
        let body = success(reply.clone())?;
        if body["status"] == "served" {
            return Ok(body["allocation"].clone());
        }
        wait = reply.retry_after.unwrap_or(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No flag of any command takes a token or a secret (they would show in process listings
    /// and shell histories); only the `--…-file` flags that name where one is kept.
    #[test]
    fn no_flag_takes_a_secret() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        let mut commands = vec![&cli];
        while let Some(command) = commands.pop() {
            for arg in command.get_arguments() {
                let long = arg.get_long().unwrap_or_default();
                let secret =
                    (long.contains("token") || long.contains("secret")) && !long.ends_with("-file");
                assert!(!secret, "brokerctl {} takes --{long}", command.get_name());
            }
            commands.extend(command.get_subcommands());
        }
    }

    /// The bar follows the time reached through the range, and falls back to counts alone
    /// when a bound is unknown.
    #[test]
    fn progress_bar_follows_the_time_range() {
        let done = range_fraction(
            Some("2026-05-01T00:00:00Z"),
            "2026-05-01T06:00:00Z",
            Some("2026-05-02T00:00:00Z"),
        );
        assert_eq!(done, Some(0.25));
        assert_eq!(
            progress_line(42, "2026-05-01T06:00:00Z", done),
            "[#####---------------]  25% exported 42 events (up to 2026-05-01T06:00:00Z)"
        );
        assert_eq!(
            range_fraction(None, "2026-05-01T06:00:00Z", Some("x")),
            None
        );
        assert_eq!(progress_line(7, "t", None), "exported 7 events (up to t)");
    }

    /// Ids with route characters stay one path segment.
    #[test]
    fn ids_are_percent_encoded() {
        assert_eq!(segment("a/b#c d"), "a%2Fb%23c%20d");
        assert_eq!(segment("lab-id-1"), "lab-id-1");
    }
}
