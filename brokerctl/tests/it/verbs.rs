//! Every operation of the API has a `brokerctl` command, and each command added for that works
//! against the real service on 127.0.0.1 (port 0, embedded store), in JSON and as a table.

use std::collections::BTreeSet;
use std::process::Output;

use serde_json::Value;
use tests::app::{spawn_app, Backend, TestApp, ADMIN_TOKEN, TRACK_TOKEN};

/// Runs the binary with only the given environment (no BROKER_* leaks in from the caller's).
async fn brokerctl(app: &TestApp, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_brokerctl"));
    command.env_clear().env("BROKER_URL", &app.url).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .output()
        .await
        .unwrap_or_else(|e| panic!("run brokerctl: {e}"))
}

async fn track(app: &TestApp, args: &[&str]) -> Output {
    brokerctl(app, &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)], args).await
}

async fn admin(app: &TestApp, args: &[&str]) -> Output {
    brokerctl(app, &[("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)], args).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {} / stderr: {}",
            stdout(output),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn ok(output: &Output) {
    assert_eq!(
        code(output),
        0,
        "stdout: {} / stderr: {}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs an admin command in JSON and as a table; both succeed, and the table's first line holds
/// `header` (upper-case column names, or FIELD/VALUE).
async fn both_formats(app: &TestApp, args: &[&str], header: &str) -> Value {
    let mut with_json = args.to_vec();
    with_json.extend(["--format", "json"]);
    let as_json = admin(app, &with_json).await;
    ok(&as_json);
    let mut with_table = args.to_vec();
    with_table.extend(["--format", "table"]);
    let as_table = admin(app, &with_table).await;
    ok(&as_table);
    let text = stdout(&as_table);
    assert!(text.contains(header), "{args:?}: {text}");
    json(&as_json)
}

/// Every operation in the served OpenAPI document is called by a listed command or is listed as
/// not for people; every listed operation still exists; every listed command exists.
#[tokio::test]
async fn every_api_operation_has_a_command() {
    let app = spawn_app(Backend::Embedded).await;
    let doc: Value = app
        .client
        .get(format!("{}/v1/openapi.json", app.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut served = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                served.insert((method.clone(), path.clone()));
            }
        }
    }
    assert!(served.len() >= 20, "{served:?}");
    let listed: BTreeSet<(String, String)> = brokerctl::coverage::COMMANDS
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .chain(
            brokerctl::coverage::NOT_FOR_PEOPLE
                .iter()
                .map(|(m, p, _)| (m.to_string(), p.to_string())),
        )
        .collect();
    let without_command: Vec<_> = served.difference(&listed).collect();
    assert!(
        without_command.is_empty(),
        "operations with no brokerctl command: {without_command:?}"
    );
    let gone: Vec<_> = listed.difference(&served).collect();
    assert!(gone.is_empty(), "listed but not served: {gone:?}");

    let cli = <brokerctl::cli::Cli as clap::CommandFactory>::command();
    for (_, path, words) in brokerctl::coverage::COMMANDS {
        let mut command = &cli;
        for word in words.split(' ') {
            command = command
                .find_subcommand(word)
                .unwrap_or_else(|| panic!("{path}: no command `brokerctl {words}`"));
        }
    }
    app.stop().await;
}

/// `extend` adds hours to the caller's window, in JSON and as a table; another caller is
/// refused (exit 3) and an unknown sandbox is exit 6.
#[tokio::test]
async fn extend_adds_hours() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("ext", 1).await;
    let allocated = track(&app, &["allocate", "--caller", "stu-1"]).await;
    ok(&allocated);
    let before = json(&allocated)["expires_at"].as_i64().unwrap_or_default();
    let id = json(&allocated)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let extended = track(&app, &["extend", &id, "--hours", "1", "--caller", "stu-1"]).await;
    ok(&extended);
    let body = json(&extended);
    assert_eq!(body["expires_at"].as_i64(), Some(before + 3600), "{body}");
    assert_eq!(body["extended_hours"], 1, "{body}");
    let table = track(
        &app,
        &[
            "extend", &id, "--hours", "1", "--caller", "stu-1", "--format", "table",
        ],
    )
    .await;
    ok(&table);
    let text = stdout(&table);
    let row = text.lines().find(|l| l.starts_with("extended_hours"));
    assert_eq!(
        row.map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["extended_hours", "2"]),
        "{text}"
    );
    let stranger = track(&app, &["extend", &id, "--hours", "1", "--caller", "stu-2"]).await;
    assert_eq!(code(&stranger), 3);
    let unknown = track(
        &app,
        &["extend", "no-such", "--hours", "1", "--caller", "stu-1"],
    )
    .await;
    assert_eq!(code(&unknown), 6);
    app.stop().await;
}

/// `drain` stops allocation for a prefix (the allocation is refused), `pool` shows the drain,
/// `resume` ends it and allocation works again.
#[tokio::test]
async fn drain_pool_and_resume() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("dr", 2).await;
    let drained = both_formats(
        &app,
        &["drain", "--prefix", "dr", "--reason", "maintenance"],
        "PREFIX",
    )
    .await;
    assert_eq!(drained["drains"][0]["prefix"], "dr", "{drained}");
    let pool = both_formats(&app, &["pool"], "whole pool drained: false").await;
    assert_eq!(pool["drains"][0]["reason"], "maintenance", "{pool}");
    let table = stdout(&admin(&app, &["pool"]).await);
    let row = table
        .lines()
        .find(|l| l.starts_with("dr "))
        .unwrap_or_default();
    let since = row.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        since.contains('T') && since.ends_with('Z'),
        "the drain's start reads as a UTC time: {table}"
    );
    assert!(row.ends_with("maintenance"), "{table}");
    let refused = track(
        &app,
        &[
            "allocate",
            "--caller",
            "s",
            "--prefix",
            "dr",
            "--deadline",
            "1s",
            "--quiet",
        ],
    )
    .await;
    assert_ne!(code(&refused), 0, "a drained prefix does not allocate");
    let resumed = both_formats(&app, &["resume", "--prefix", "dr"], "no drains in force").await;
    assert_eq!(resumed["drains"], serde_json::json!([]), "{resumed}");
    ok(&track(&app, &["allocate", "--caller", "s", "--prefix", "dr"]).await);
    app.stop().await;
}

/// `pool --track` reports that track's quota usage.
#[tokio::test]
async fn pool_reports_a_tracks_quota() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("q", 1).await;
    ok(&track(&app, &["allocate", "--caller", "s", "--track", "intro"]).await);
    let pool = both_formats(&app, &["pool", "--track", "intro"], "TRACK").await;
    let quotas = pool["quotas"].as_array().cloned().unwrap_or_default();
    let intro = quotas.iter().find(|q| q["track"] == "intro");
    assert!(intro.is_some(), "{pool}");
    app.stop().await;
}

/// `outcomes` counts the allocation answers, by outcome.
#[tokio::test]
async fn outcomes_count_allocation_answers() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("o", 1).await;
    ok(&track(&app, &["allocate", "--caller", "s"]).await);
    let outcomes = both_formats(&app, &["outcomes"], "OUTCOME").await;
    assert!(
        outcomes["totals"]["success"].as_u64() >= Some(1),
        "{outcomes}"
    );
    let table = stdout(&admin(&app, &["outcomes"]).await);
    assert!(table.lines().any(|l| l.starts_with("success")), "{table}");
    app.stop().await;
}

/// `jobs start` runs a job in the background, `jobs wait` and `--wait` follow it to its end,
/// `jobs show` and `jobs list` find it; an unknown job is exit 6, a bad id exit 2.
#[tokio::test]
async fn jobs_start_wait_show_and_list() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("j", 2).await;
    let started = both_formats(&app, &["jobs", "start", "auto-expire"], "job_id").await;
    let job_id = started["job_id"].as_str().unwrap_or_default().to_string();
    assert!(!job_id.is_empty(), "{started}");
    let waited = admin(&app, &["jobs", "wait", &job_id, "--format", "json"]).await;
    ok(&waited);
    assert_eq!(json(&waited)["state"], "completed");
    let shown = both_formats(&app, &["jobs", "show", &job_id], "FIELD").await;
    assert_eq!(shown["kind"], "auto_expire", "{shown}");
    let followed = admin(
        &app,
        &["jobs", "start", "sync", "--wait", "--format", "json"],
    )
    .await;
    ok(&followed);
    assert_eq!(json(&followed)["state"], "completed");
    let listed = both_formats(&app, &["jobs", "list"], "JOB_ID").await;
    assert!(listed["count"].as_u64() >= Some(2), "{listed}");
    let unknown = admin(
        &app,
        &["jobs", "show", "0190f6c2-7b3a-7d4e-9f10-2b3c4d5e6f70"],
    )
    .await;
    assert_eq!(code(&unknown), 6);
    assert_eq!(code(&admin(&app, &["jobs", "show", "nope"]).await), 2);
    let misplaced = admin(
        &app,
        &["jobs", "start", "sync", "--grace-period-hours", "1"],
    )
    .await;
    assert_eq!(code(&misplaced), 2);
    app.stop().await;
}

/// `delete-stale` runs now and prints its summary.
#[tokio::test]
async fn delete_stale_prints_its_summary() {
    let app = spawn_app(Backend::Embedded).await;
    let summary = both_formats(
        &app,
        &["delete-stale", "--grace-period-hours", "0"],
        "FIELD",
    )
    .await;
    assert!(summary["duration_ms"].is_number(), "{summary}");
    let bad = admin(&app, &["delete-stale", "--grace-period-hours", "9000"]).await;
    assert_eq!(code(&bad), 2);
    app.stop().await;
}

/// `bulk-delete --wait` retires every sandbox of the status and reports the finished job;
/// `allocated` is refused (exit 2).
#[tokio::test]
async fn bulk_delete_retires_a_status() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("b", 3).await;
    let done = admin(
        &app,
        &[
            "bulk-delete",
            "--status",
            "available",
            "--wait",
            "--format",
            "json",
        ],
    )
    .await;
    ok(&done);
    assert_eq!(json(&done)["state"], "completed", "{}", stdout(&done));
    app.wait_until(|s| s.get(domain::SandboxStatus::Available) == 0)
        .await;
    let accepted = both_formats(&app, &["bulk-delete", "--status", "stale"], "job_id").await;
    assert!(accepted["job_id"].is_string(), "{accepted}");
    let refused = admin(&app, &["bulk-delete", "--status", "allocated"]).await;
    assert_eq!(code(&refused), 2);
    app.stop().await;
}

/// `webhooks` lists the subscribers' delivery state (none configured here).
#[tokio::test]
async fn webhooks_show_deliveries() {
    let app = spawn_app(Backend::Embedded).await;
    let body = admin(&app, &["webhooks", "--format", "json"]).await;
    ok(&body);
    assert_eq!(json(&body)["subscribers"], serde_json::json!([]));
    let table = admin(&app, &["webhooks"]).await;
    ok(&table);
    assert!(
        stdout(&table).contains("no webhook subscribers"),
        "{}",
        stdout(&table)
    );
    app.stop().await;
}

/// `allocations` lists what a caller was allocated and how each allocation ended.
#[tokio::test]
async fn allocations_list_a_callers_history() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("al", 2).await;
    let first = track(&app, &["allocate", "--caller", "stu-9"]).await;
    ok(&first);
    let id = json(&first)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ok(&track(&app, &["release", &id, "--caller", "stu-9"]).await);
    let listed = both_formats(&app, &["allocations", "stu-9"], "SANDBOX_ID").await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["allocations"][0]["sandbox_id"], id.as_str());
    assert!(listed["allocations"][0]["ended_at"].is_string(), "{listed}");
    let spaced = admin(
        &app,
        &["allocations", "stu-9", "--since", " 2026-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(code(&spaced), 2, "a time with a space is bad input");
    app.stop().await;
}

/// The commands that printed JSON only also print tables: status, release, history, at,
/// retry-deletion and the job runs.
#[tokio::test]
async fn older_commands_print_tables_too() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("t", 1).await;
    let allocated = track(&app, &["allocate", "--caller", "s"]).await;
    ok(&allocated);
    let id = json(&allocated)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let status = track(&app, &["status", &id, "--caller", "s", "--format", "table"]).await;
    ok(&status);
    assert!(stdout(&status).contains("status"), "{}", stdout(&status));
    let history = admin(&app, &["history", &id, "--format", "table"]).await;
    ok(&history);
    assert!(
        stdout(&history).contains("SandboxAllocated"),
        "{}",
        stdout(&history)
    );
    let at = admin(
        &app,
        &["at", "2030-01-01T00:00:00Z", &id, "--format", "table"],
    )
    .await;
    ok(&at);
    assert!(stdout(&at).contains("holder"), "{}", stdout(&at));
    for job in ["sync", "cleanup", "auto-expire"] {
        let run = admin(&app, &[job, "--format", "table"]).await;
        ok(&run);
        assert!(
            stdout(&run).contains("duration_ms"),
            "{job}: {}",
            stdout(&run)
        );
    }
    let retry = admin(&app, &["retry-deletion", &id, "--format", "table"]).await;
    assert_eq!(code(&retry), 7, "not quarantined");
    let release = track(
        &app,
        &["release", &id, "--caller", "s", "--format", "table"],
    )
    .await;
    ok(&release);
    assert!(
        stdout(&release).contains("pending_deletion"),
        "{}",
        stdout(&release)
    );
    app.stop().await;
}

/// `completions` prints a script for each shell without a token or a service, naming the
/// commands.
#[tokio::test]
async fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_brokerctl"))
            .env_clear()
            .args(["completions", shell])
            .output()
            .await
            .unwrap_or_else(|e| panic!("run brokerctl: {e}"));
        ok(&output);
        let script = stdout(&output);
        for command in ["allocate", "drain", "completions"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
}
