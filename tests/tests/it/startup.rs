//! Start-up as a new user meets it: the API pointed at a fresh DynamoDB Local, and at tables that
//! do not exist when it may not create them; the real binary on a port that is taken, and its
//! log as a person at a terminal and a log collector read it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use command_api::config::{Config, StoreKind};
use domain::ManualClock;
use store_dynamodb::table_name;
use tests::app::{spawn_app_with, test_jobs_config, AppOptions, Backend, ADMIN_TOKEN, TRACK_TOKEN};
use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};

/// A prefix no other test uses, written with its own trailing dash.
fn fresh_prefix() -> String {
    format!("t{}-", uuid::Uuid::new_v4().simple())
}

/// With an emulator endpoint and no `ENSURE_TABLES`, the API creates its tables (named
/// `{prefix}-events`, the dash not doubled), finds the stream and serves: seeded sandboxes reach
/// the view through the in-process projector.
#[tokio::test]
async fn fresh_emulator_gets_its_tables_by_default() {
    let prefix = fresh_prefix();
    let chosen = prefix.clone();
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(move |config: &mut Config| {
        config.store.ensure_tables = None;
        config.store.table_prefix = chosen;
    });
    let app = spawn_app_with(options).await;
    app.seed("fresh", 2).await;
    assert_eq!(app.stats().await.total(), 2);

    let store = tests::ddb_local::fresh_store(1).await;
    let events = table_name(&prefix, "events");
    assert_eq!(events, format!("{}-events", prefix.trim_end_matches('-')));
    let described = store
        .client()
        .describe_table()
        .table_name(&events)
        .send()
        .await;
    assert!(described.is_ok(), "{events} was not created: {described:?}");
    let doubled = store
        .client()
        .describe_table()
        .table_name(format!("{prefix}-events"))
        .send()
        .await;
    assert!(doubled.is_err(), "a table with a doubled dash exists");
    app.stop().await;
}

/// When tables may not be created (as against AWS) and are missing, start-up stops with one line
/// that names the missing table and both fixes.
#[tokio::test]
async fn missing_tables_stop_start_up_with_one_line() {
    let prefix = fresh_prefix();
    let mut config = Config::defaults();
    config.api_token = Some(TRACK_TOKEN.into());
    config.admin_token = Some(ADMIN_TOKEN.into());
    config.seed_demo_pool = false;
    config.run_jobs = Some(false);
    config.store.store = StoreKind::Dynamodb;
    config.store.ddb_endpoint_url = Some(tests::ddb_local::endpoint().await);
    config.store.table_prefix = prefix.clone();
    config.store.ensure_tables = Some(false);
    let clock = ManualClock::new(chrono::Utc::now());
    let Err(error) =
        command_api::startup::build_with(&config, Arc::new(clock), test_jobs_config()).await
    else {
        panic!("start-up succeeded without tables");
    };
    let line = format!("{error:#}");
    assert!(!line.contains('\n'), "more than one line: {line}");
    assert!(line.contains(&table_name(&prefix, "")), "{line}");
    assert!(line.contains("does not exist"), "{line}");
    assert!(line.contains("ENSURE_TABLES=true"), "{line}");
    assert!(line.contains("terraform"), "{line}");
}

/// A fresh directory for one process's embedded store.
fn scratch_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("broker-{what}-{}", uuid::Uuid::new_v4().simple()))
}

/// The real API binary's settings for an embedded store at `db`, the built-in dev tokens.
fn binary_env(bind: &str, db: &Path, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("BIND_ADDR", bind.to_string()),
        ("STORE", "embedded".to_string()),
        ("EMBEDDED_PATH", db.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// A port another program holds stops start-up at once, with one line that names the address
/// and `BIND_ADDR`, before anything else starts: the store file is never created, the demo pool
/// is not seeded and no job logs a line.
#[tokio::test]
async fn a_busy_port_stops_start_up_before_any_job() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = holder.local_addr().expect("its address").to_string();
    let dir = scratch_dir("busy-port");
    let db = dir.join("broker.db");
    let mut api = ServiceProcess::new(
        "api",
        Path::new(env!("CARGO_BIN_EXE_chaos-command-api")),
        &[],
        binary_env(
            &addr,
            &db,
            &[("SEED_DEMO_POOL", "true"), ("LOG_FORMAT", "json")],
        ),
    );
    api.start();
    let status = api.wait_exit(Duration::from_secs(60)).await;
    let log = api.log_tail(200);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "exit code 1 within 60 s:\n{log}"
    );
    let last = log.lines().last().unwrap_or_default();
    assert!(last.starts_with("command-api: "), "one line: {log}");
    for wanted in [addr.as_str(), "already in use", "BIND_ADDR="] {
        assert!(last.contains(wanted), "{wanted:?} missing from {last:?}");
    }
    assert!(!db.exists(), "the store was opened: {}", db.display());
    assert!(!dir.exists(), "the store's directory was created");
    for line in log.lines().filter(|l| l.starts_with('{')) {
        assert!(
            line.contains(r#""target":"startup""#),
            "a line from something that started: {line}"
        );
    }
    assert!(
        !log.contains("Sandbox Broker listening"),
        "no banner: {log}"
    );
    drop(holder);
}

/// Starts the binary with `extra` settings and no demo pool, waits for it, asks for `/healthz`
/// five times and for `/v1/admin/stats` once without a token (401), stops it and returns what it
/// wrote (stdout and stderr, which is a file here, not a terminal).
async fn log_of_a_short_run(extra: &[(&str, &str)]) -> String {
    let dir = scratch_dir("log-format");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut settings = vec![("SEED_DEMO_POOL", "false"), ("RUN_JOBS", "false")];
    settings.extend_from_slice(extra);
    let mut api = ServiceProcess::new(
        "api",
        Path::new(env!("CARGO_BIN_EXE_chaos-command-api")),
        &[],
        binary_env(
            &format!("127.0.0.1:{port}"),
            &dir.join("broker.db"),
            &settings,
        ),
    );
    api.start();
    let client = reqwest::Client::new();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not start:\n{}",
        api.log_tail(50)
    );
    for _ in 0..5 {
        let _ = client.get(format!("{url}/healthz")).send().await;
    }
    let refused = client
        .get(format!("{url}/v1/admin/stats"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(refused.ok(), Some(401));
    let stopped = api.terminate(Duration::from_secs(30)).await;
    assert!(stopped.is_some_and(|s| s.success()), "clean stop");
    let log = api.log_tail(10_000);
    let _ = std::fs::remove_dir_all(&dir);
    log
}

/// In text (what a terminal gets), the banner with the dashboard address stays readable: an
/// answered request writes no line, a refused one does, and no line is JSON.
#[tokio::test]
async fn text_logs_keep_the_banner_in_view() {
    let log = log_of_a_short_run(&[("LOG_FORMAT", "text")]).await;
    assert!(
        log.contains("Sandbox Broker listening on http://127.0.0.1:"),
        "{log}"
    );
    assert!(
        log.contains("/dashboard"),
        "the banner names the dashboard: {log}"
    );
    assert!(
        !log.lines().any(|l| l.contains("/healthz")),
        "a line per answered request: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("/v1/admin/stats") && l.contains("401")),
        "the refusal is logged: {log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with('{')),
        "JSON in text: {log}"
    );
}

/// Unset, and with stderr not a terminal (a file, a pipe, a log collector), the log is one JSON
/// object per line and keeps the line per request that log queries count.
#[tokio::test]
async fn logs_to_a_file_are_json_lines() {
    let log = log_of_a_short_run(&[]).await;
    let json: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let healthz = json
        .iter()
        .filter(|l| l["target"] == "access" && l["path"] == "/healthz")
        .count();
    assert!(healthz >= 5, "{healthz} request lines for /healthz: {log}");
    for line in log.lines().filter(|l| !l.starts_with('{')) {
        assert!(
            line.starts_with("Sandbox Broker listening") || line.starts_with("  "),
            "only the banner (stdout) is not JSON: {line:?}"
        );
    }
}
