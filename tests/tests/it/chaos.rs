//! Fault tests: the broker keeps its promises while its processes are SIGKILLed, DynamoDB
//! throttles, fails and loses answers, and the CSP fails the way it failed in the reference
//! incident. Every scenario checks the invariants from the event history afterwards and prints
//! its rows of the summary table (copied into the README's "Fault testing" section).
//!
//! Scenarios run one at a time (a lock), so that the file stays within a few minutes on a
//! two-core machine. Random choices come from a seed that is printed; `CHAOS_SEED=<n>` replays
//! one run's choices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::model::events::SandboxEvent;
use domain::model::sandbox::Sandbox;
use domain::store::EventStore;
use domain::SandboxStatus;
use jobs::{CspMode, JobsConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use store_dynamodb::{DynamoConfig, DynamoStore, DEFAULT_MAX_RETRIES};
use store_embedded::EmbeddedStore;
use tests::app::{spawn_app_with, AppOptions, Backend, ADMIN_TOKEN, TRACK_TOKEN};
use tests::chaos::fault_proxy::{DynamoFault, FaultProxy};
use tests::chaos::load::{self, LoadOptions, LoadReport};
use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};
use tests::chaos::summary::{render, SummaryRow};
use tests::fake_csp::{FailureRate, FakeAccount, FakeCsp, Fault};
use tests::history::{all_events, sandbox_states, AllocationAudit};

/// One scenario at a time: each starts processes or DynamoDB load of its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The run's seed: `CHAOS_SEED`, else the clock; printed so that a failure can be replayed.
fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{scenario}: CHAOS_SEED={seed}");
    seed
}

/// Counts passed checks; panics with the message on the first that fails.
#[derive(Default)]
struct Checks(u64);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        assert!(ok, "invariant broken: {}", what());
        self.0 += 1;
    }
}

/// The store a scenario runs on, as the processes see it and as the test reads it back.
#[derive(Clone)]
enum StoreUnderTest {
    Embedded(PathBuf),
    Dynamo { endpoint: String, prefix: String },
}

impl StoreUnderTest {
    fn label(&self) -> &'static str {
        match self {
            StoreUnderTest::Embedded(_) => "embedded",
            StoreUnderTest::Dynamo { .. } => "dynamodb",
        }
    }

    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        match self {
            StoreUnderTest::Embedded(path) => {
                env.insert("STORE".into(), "embedded".into());
                env.insert("EMBEDDED_PATH".into(), path.display().to_string());
            }
            StoreUnderTest::Dynamo { endpoint, prefix } => {
                env.insert("STORE".into(), "dynamodb".into());
                env.insert("DDB_ENDPOINT_URL".into(), endpoint.clone());
                env.insert("TABLE_PREFIX".into(), prefix.clone());
                env.insert("ENSURE_TABLES".into(), "true".into());
                env.insert("AWS_REGION".into(), "us-east-1".into());
            }
        }
        env.insert("LOG_FORMAT".into(), "text".into());
        env
    }

    /// The event store, opened by the test itself (not through any process under test).
    async fn events(&self) -> Arc<dyn EventStore> {
        match self {
            StoreUnderTest::Embedded(path) => {
                Arc::new(EmbeddedStore::open(path, 8).expect("open the store file"))
            }
            StoreUnderTest::Dynamo { endpoint, prefix } => Arc::new(
                DynamoStore::connect(DynamoConfig {
                    table_prefix: prefix.clone(),
                    endpoint_url: Some(endpoint.clone()),
                    region: Some("us-east-1".into()),
                    stats_shards: 8,
                    max_retries: DEFAULT_MAX_RETRIES,
                    ..DynamoConfig::default()
                })
                .await
                .expect("connect to DynamoDB Local"),
            ),
        }
    }
}

/// `GET /v1/admin/stats` of a running API.
async fn api_stats(client: &reqwest::Client, url: &str) -> Option<Value> {
    let response = client
        .get(format!("{url}/v1/admin/stats"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Counts per status from the sandboxes' own events.
fn truth(states: &BTreeMap<String, Sandbox>) -> BTreeMap<&'static str, i64> {
    let mut counts = BTreeMap::new();
    for state in states.values() {
        if let Some(status) = state.status {
            let key = match status {
                SandboxStatus::Available => "available",
                SandboxStatus::Allocated => "allocated",
                SandboxStatus::PendingDeletion => "pending_deletion",
                SandboxStatus::Stale => "stale",
                SandboxStatus::DeletionFailed => "deletion_failed",
                SandboxStatus::Deleted => "deleted",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    counts
}

/// Runs `projector verify --json` on the store: the live view and stats against a replay.
/// Returns the number of differences.
async fn projector_verify(store: &StoreUnderTest) -> usize {
    let mut verify = ServiceProcess::new(
        "verify",
        Path::new(env!("CARGO_BIN_EXE_chaos-projector")),
        &["verify", "--json"],
        store.env(),
    );
    verify.start();
    let status = verify.wait_exit(Duration::from_secs(120)).await;
    let output = verify.log_tail(100_000);
    let json_start = output.find('{').unwrap_or(0);
    let report: Value = serde_json::from_str(output[json_start..].trim()).unwrap_or(Value::Null);
    let differences = report["differences"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    assert!(
        status.is_some_and(|s| s.success()) && differences == 0,
        "projector verify: {status:?}\n{output}"
    );
    differences
}

/// Checks the allocation invariants on the history against what the students were told.
fn check_history(
    checks: &mut Checks,
    states: &BTreeMap<String, Sandbox>,
    audit: &AllocationAudit,
    report: &LoadReport,
    cleanup_ran: bool,
) {
    checks.check(report.violations.is_empty(), || {
        format!(
            "{} answers broke a promise, the first: {:?}",
            report.violations.len(),
            &report.violations[..report.violations.len().min(10)]
        )
    });
    checks.check(audit.double_allocations().is_empty(), || {
        format!(
            "sandboxes allocated twice: {:?}",
            audit.double_allocations()
        )
    });
    checks.check(audit.callers_holding_two().is_empty(), || {
        format!("callers holding two: {:?}", audit.callers_holding_two())
    });
    for (caller, sandbox_id) in &report.acknowledged {
        checks.check(
            audit.allocations.get(sandbox_id).map(Vec::as_slice)
                == Some([caller.clone()].as_slice()),
            || {
                format!(
                    "{caller}'s acknowledged {sandbox_id} is not theirs in the history: {:?}",
                    audit.allocations.get(sandbox_id)
                )
            },
        );
    }
    if !cleanup_ran {
        for sandbox_id in &report.marked {
            let status = states.get(sandbox_id).and_then(|s| s.status);
            checks.check(status == Some(SandboxStatus::PendingDeletion), || {
                format!("marked {sandbox_id} is {status:?}, not pending_deletion")
            });
        }
        return;
    }
    for sandbox_id in &report.marked {
        let status = states.get(sandbox_id).and_then(|s| s.status);
        checks.check(
            matches!(
                status,
                Some(SandboxStatus::Deleted | SandboxStatus::DeletionFailed)
            ),
            || format!("marked {sandbox_id} ended {status:?}"),
        );
    }
    let pending: Vec<_> = states
        .iter()
        .filter(|(_, s)| s.status == Some(SandboxStatus::PendingDeletion))
        .map(|(id, _)| id)
        .collect();
    checks.check(pending.is_empty(), || {
        format!("still pending_deletion: {pending:?}")
    });
}

/// Waits (bounded) until the history holds no `pending_deletion` sandbox (and, when labs are
/// short enough to end within the test, no `allocated` one either) and the API's stats equal the
/// counts replayed from it; returns the final states.
async fn wait_for_convergence(
    store: &StoreUnderTest,
    client: &reqwest::Client,
    url: &str,
    cleanup_runs: bool,
    labs_end: bool,
) -> (Vec<domain::EventEnvelope>, BTreeMap<String, Sandbox>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let events_store = store.events().await;
    loop {
        let events = all_events(events_store.as_ref()).await;
        let states = sandbox_states(&events);
        let truth = truth(&states);
        let settled = (!cleanup_runs || !truth.contains_key("pending_deletion"))
            && (!labs_end || !truth.contains_key("allocated"));
        let stats = api_stats(client, url).await.unwrap_or(Value::Null);
        let matches = [
            "available",
            "allocated",
            "pending_deletion",
            "stale",
            "deletion_failed",
            "deleted",
        ]
        .iter()
        .all(|k| stats[*k].as_i64() == Some(*truth.get(k).unwrap_or(&0)));
        if settled && matches {
            return (events, states);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence within 120 s: truth {truth:?}, stats {stats}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The jobs worker's settings: the fake CSP, every loop every second or two, short leases
/// and backoff so that a killed worker's sandboxes come back within the test.
fn worker_env(csp: &FakeCsp) -> BTreeMap<String, String> {
    [
        ("CSP_MODE", "real".to_string()),
        ("CSP_BASE_URL", csp.base_url()),
        ("CSP_API_TOKEN", csp.token()),
        ("CSP_RATE_LIMIT_RPS", "0".into()),
        ("CSP_TIMEOUT_READ_SEC", "2".into()),
        ("SYNC_INTERVAL_SEC", "2".into()),
        ("CLEANUP_INTERVAL_SEC", "1".into()),
        ("AUTO_EXPIRY_INTERVAL_SEC", "2".into()),
        ("STALE_INTERVAL_SEC", "3600".into()),
        ("DELETION_LEASE_SEC", "2".into()),
        ("DELETION_BACKOFF_BASE_SEC", "1".into()),
        ("DELETION_BACKOFF_MAX_SEC", "2".into()),
        ("JOB_INTERVAL_JITTER", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The API's settings: our tokens, no demo pool, no in-process jobs (the worker runs them).
fn api_env(port: u16, run_projector: bool) -> BTreeMap<String, String> {
    [
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("BROKER_API_TOKEN", TRACK_TOKEN.to_string()),
        ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("SEED_DEMO_POOL", "false".into()),
        ("RUN_JOBS", "false".into()),
        // The API's admin job routes are not used here; the worker talks to the fake CSP.
        ("CSP_MODE", "mock".into()),
        ("RUN_PROJECTOR", run_projector.to_string()),
        ("RATE_LIMIT_RPS", "100000".into()),
        ("RATE_LIMIT_BURST", "100000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The process-fault scenario on one store: API, projector (DynamoDB only; embedded runs it in
/// the API) and jobs worker as real processes under the mixed load, SIGKILLed at seeded random
/// points and restarted; then every invariant from the history. With `lab_seconds`, labs last
/// that long (the API's dev-only override, expiry grace 0), so auto-expiry ends allocations
/// while the kills go on, and the run waits until every allocation has ended.
async fn process_faults(
    store: StoreUnderTest,
    pool: u32,
    load_secs: u64,
    lab_seconds: Option<u64>,
) -> Vec<SummaryRow> {
    let seed = seed(&format!("process faults ({})", store.label()));
    let mut rng = StdRng::seed_from_u64(seed);
    let started = std::time::Instant::now();
    let csp = FakeCsp::start().await;
    csp.set_accounts((1..=pool).map(FakeAccount::sandbox));
    // Slow enough that a kill often lands while a DELETE is in flight.
    csp.fail_all_deletes(Fault::Delay(Duration::from_millis(40)));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default();

    let dynamo = matches!(store, StoreUnderTest::Dynamo { .. });
    let mut api_settings = store.env();
    api_settings.extend(api_env(port, !dynamo));
    let mut worker_settings = store.env();
    worker_settings.extend(worker_env(&csp));
    if let Some(seconds) = lab_seconds {
        api_settings.insert("DEV_LAB_DURATION_SECONDS".into(), seconds.to_string());
        worker_settings.insert("GRACE_PERIOD_MINUTES".into(), "0".into());
    }
    let mut projector_settings = store.env();
    projector_settings.insert("METRICS_ADDR".into(), "127.0.0.1:0".into());
    projector_settings.insert("POLL_IDLE_MAX_MS".into(), "200".into());

    let mut processes = vec![
        ServiceProcess::new(
            "api",
            Path::new(env!("CARGO_BIN_EXE_chaos-command-api")),
            &[],
            api_settings,
        ),
        ServiceProcess::new(
            "worker",
            Path::new(env!("CARGO_BIN_EXE_chaos-jobs")),
            &["worker"],
            worker_settings,
        ),
    ];
    if dynamo {
        processes.push(ServiceProcess::new(
            "projector",
            Path::new(env!("CARGO_BIN_EXE_chaos-projector")),
            &["poll"],
            projector_settings,
        ));
    }
    // The API first: on DynamoDB it creates the tables the others use.
    processes[0].start();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not come up:\n{}",
        processes[0].log_tail(30)
    );
    for p in processes.iter_mut().skip(1) {
        p.start();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let available = api_stats(&client, &url)
            .await
            .and_then(|s| s["available"].as_i64());
        if available == Some(i64::from(pool)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's sync did not fill the pool ({available:?}):\n{}",
            processes[1].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!("  pool of {pool} synced after {:?}", started.elapsed());
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load::run(
        LoadOptions {
            url: url.clone(),
            students: 6,
            replay_chance: 0.3,
            mark_chance: 0.6,
            seed,
            think: Duration::from_millis(200),
            caller_prefix: String::new(),
        },
        stop.clone(),
    ));
    let mut kills: BTreeMap<String, u64> = BTreeMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(load_secs);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        let victim = rng.random_range(0..processes.len());
        let process = &mut processes[victim];
        process.kill();
        *kills.entry(process.name().to_string()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        process.start();
        if victim == 0 {
            assert!(
                wait_healthy(&client, &url, Duration::from_secs(60)).await,
                "the API did not come back:\n{}",
                processes[0].log_tail(30)
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    let report = load.await.expect("load task");
    for p in processes.iter_mut() {
        assert!(
            p.is_running(),
            "{} died by itself:\n{}",
            p.name(),
            p.log_tail(30)
        );
    }

    println!("  load and kills done after {:?}", started.elapsed());
    let mut checks = Checks::default();
    let (events, states) =
        wait_for_convergence(&store, &client, &url, true, lab_seconds.is_some()).await;
    println!("  converged after {:?}", started.elapsed());
    checks.check(true, String::new); // projector converged: stats equal the replayed truth
    let audit = AllocationAudit::replay(&events);
    check_history(&mut checks, &states, &audit, &report, true);
    let expired = if lab_seconds.is_some() {
        check_expiry(&mut checks, &events, &states, &report)
    } else {
        0
    };
    // A clean stop after all that: SIGTERM drains and exits 0.
    for p in processes.iter_mut().rev() {
        let name = p.name().to_string();
        let status = p.terminate(Duration::from_secs(30)).await;
        checks.check(status.is_some_and(|s| s.success()), || {
            format!("{name} did not stop cleanly on SIGTERM: {status:?}")
        });
    }
    projector_verify(&store).await;
    checks.check(true, String::new); // projector verify: 0 drift, stats = replay
    checks.check(
        !report.acknowledged.is_empty() && !report.marked.is_empty(),
        || format!("the load did nothing: {:?}", report.by_status),
    );
    println!(
        "process faults ({}): {} operations, {} acknowledged allocations, {} marked, {} unanswered while down, statuses {:?}, kills {kills:?}",
        store.label(),
        report.operations,
        report.acknowledged.len(),
        report.marked.len(),
        report.unanswered,
        report.by_status
    );
    let mut rows: Vec<SummaryRow> = kills
        .into_iter()
        .map(|(name, n)| SummaryRow {
            scenario: format!("processes, {}", store.label()),
            fault: format!("SIGKILL {name} + restart"),
            injected: n,
            operations: report.operations,
            checks: checks.0,
        })
        .collect();
    if let Some(seconds) = lab_seconds {
        rows.push(SummaryRow {
            scenario: format!("processes, {}", store.label()),
            fault: format!("allocations auto-expired ({seconds}-second labs)"),
            injected: expired,
            operations: report.operations,
            checks: checks.0,
        });
    }
    rows
}

/// The expiry invariants, once every allocation has ended: each sandbox expired at most once and
/// deleted at most once; every expired one ended deleted (or quarantined), never handed out
/// again; every acknowledged allocation the student did not end was ended by expiry. Returns
/// the number of expired allocations (at least one: the run must have exercised expiry).
fn check_expiry(
    checks: &mut Checks,
    events: &[domain::EventEnvelope],
    states: &BTreeMap<String, Sandbox>,
    report: &LoadReport,
) -> u64 {
    let mut expired: BTreeMap<String, u64> = BTreeMap::new();
    let mut deleted: BTreeMap<String, u64> = BTreeMap::new();
    let mut requested = std::collections::BTreeSet::new();
    for e in events {
        let id = || {
            domain::model::ids::sandbox_id_of(&e.stream_id)
                .unwrap_or_default()
                .to_string()
        };
        match e.sandbox_event() {
            Ok(Some(SandboxEvent::AllocationExpired { .. })) => {
                *expired.entry(id()).or_default() += 1
            }
            Ok(Some(SandboxEvent::SandboxDeleted { .. })) => *deleted.entry(id()).or_default() += 1,
            Ok(Some(SandboxEvent::DeletionRequested { .. })) => {
                requested.insert(id());
            }
            _ => {}
        }
    }
    for (sandbox_id, n) in &expired {
        checks.check(*n == 1, || format!("{sandbox_id} expired {n} times"));
        let status = states.get(sandbox_id).and_then(|s| s.status);
        checks.check(
            matches!(
                status,
                Some(SandboxStatus::Deleted | SandboxStatus::DeletionFailed)
            ),
            || format!("expired {sandbox_id} ended {status:?}"),
        );
    }
    for (sandbox_id, n) in &deleted {
        checks.check(*n == 1, || format!("{sandbox_id} deleted {n} times"));
    }
    for (caller, sandbox_id) in &report.acknowledged {
        // A mark can commit without its answer reaching the student (the API was killed).
        if report.marked.contains(sandbox_id) || requested.contains(sandbox_id) {
            continue;
        }
        checks.check(expired.contains_key(sandbox_id), || {
            format!("{caller}'s {sandbox_id} was never marked and never expired")
        });
    }
    checks.check(!expired.is_empty(), || {
        "no allocation expired during the run".into()
    });
    expired.len() as u64
}

/// API, in-process projector and jobs worker SIGKILLed at random under load on the embedded
/// store (the worker shares the SQLite file), with 8-second labs so that auto-expiry ends
/// allocations between the kills: no acknowledged allocation lost, no sandbox or caller twice,
/// every marked or expired sandbox deleted exactly once, none expired twice, stats equal the
/// history, `projector verify` clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_kills_on_embedded_keep_every_promise() {
    let _serial = SERIAL.lock().await;
    let path = std::env::temp_dir()
        .join(format!("broker-chaos-{}", uuid::Uuid::new_v4()))
        .join("broker.db");
    let rows = process_faults(StoreUnderTest::Embedded(path.clone()), 600, 20, Some(8)).await;
    print!("{}", render(&rows));
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// API, `projector poll` and jobs worker SIGKILLed at random under load on DynamoDB Local: the
/// same invariants as on embedded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_kills_on_dynamodb_keep_every_promise() {
    let _serial = SERIAL.lock().await;
    let store = StoreUnderTest::Dynamo {
        endpoint: tests::ddb_local::endpoint().await,
        prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
    };
    let rows = process_faults(store, 300, 25, None).await;
    print!("{}", render(&rows));
}

/// DynamoDB behind a proxy that injects, at 20 % of requests, throttling (both error types),
/// 500s, 200-800 ms latency, dropped connections and answers lost after the write committed.
/// The API answers every request it cannot serve with 503, `Retry-After` and the error envelope
/// (never another 5xx); a student retrying after a lost answer gets the allocation that
/// committed (a replay), never a second one; once the faults stop the projector (reading the
/// stream through the same proxy) converges, and the history holds every acknowledged
/// allocation, no sandbox or caller twice, and `projector verify` finds no drift.
/// `CHAOS_FAULT_RATES` (comma-separated fractions, e.g. `0.1,0.2,0.3`) runs the scenario once per
/// rate and prints a table for each; CI runs the default, 20 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_faults_answer_503_and_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let rates: Vec<f64> = std::env::var("CHAOS_FAULT_RATES")
        .ok()
        .map(|list| {
            list.split(',')
                .map(|r| {
                    r.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("CHAOS_FAULT_RATES {r:?}: {e}"))
                })
                .collect()
        })
        .unwrap_or_else(|| vec![0.2]);
    for rate in rates {
        assert!(
            (0.0..=0.5).contains(&rate),
            "fault rate {rate} outside 0-0.5"
        );
        let rows = dynamodb_faults(rate).await;
        print!("{}", render(&rows));
    }
}

/// One run of the DynamoDB fault scenario with `rate` of the requests faulted; the summary rows.
async fn dynamodb_faults(rate: f64) -> Vec<SummaryRow> {
    let percent = (rate * 100.0).round() as u64;
    let seed = seed(&format!("dynamodb faults at {percent} %"));
    let upstream = tests::ddb_local::endpoint().await;
    let proxy = FaultProxy::start(&upstream, seed).await;
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let mut options = AppOptions::new(Backend::Dynamo);
    let (endpoint, chosen) = (proxy.url(), prefix.clone());
    options.configure = Box::new(move |config| {
        config.store.ddb_endpoint_url = Some(endpoint);
        config.store.table_prefix = chosen;
        // One SDK retry only, so that injected faults reach the service's own handling instead
        // of being absorbed below it.
        config.store.ddb_max_retries = 1;
    });
    let app = spawn_app_with(options).await;
    app.seed("lab", 400).await;

    proxy.set_rate(rate);
    let forwarded_before = proxy.forwarded();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load::run(
        LoadOptions {
            url: app.url.clone(),
            students: 6,
            replay_chance: 0.3,
            mark_chance: 0.5,
            seed,
            think: Duration::from_millis(100),
            caller_prefix: String::new(),
        },
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.store(true, Ordering::SeqCst);
    let mut report = load.await.expect("load task");
    let injected = proxy.injected();
    let requests = proxy.forwarded() - forwarded_before;
    proxy.set_rate(0.0);

    // Every caller the load gave up on asks once more, now that the store answers: an
    // allocation that committed without its answer comes back as a replay, never as a second.
    for caller in report.unacknowledged.clone() {
        let response = app
            .allocate(&caller)
            .send()
            .await
            .expect("allocate after the faults");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(
            matches!(status, 200 | 201 | 409),
            "{caller}: {status} {body}"
        );
        if let Some(id) = body["sandbox_id"].as_str() {
            if status == 200 {
                report.recognised_on_retry.insert(caller.clone());
            }
            report.acknowledged.insert(caller.clone(), id.to_string());
        }
    }

    let store = StoreUnderTest::Dynamo {
        endpoint: upstream,
        prefix,
    };
    let mut checks = Checks::default();
    let (events, states) = wait_for_convergence(&store, &app.client, &app.url, false, false).await;
    checks.check(true, String::new); // the projector converged through the proxy
    let audit = AllocationAudit::replay(&events);
    check_history(&mut checks, &states, &audit, &report, false);
    checks.check(report.well_formed_503 > 0, || {
        format!("no fault reached a client as 503 ({:?})", report.by_status)
    });
    let dropped_after_commit = injected
        .get(&DynamoFault::DropAfterCommit)
        .copied()
        .unwrap_or(0);
    checks.check(dropped_after_commit > 0, || {
        "no answer was lost after a commit".into()
    });
    app.stop().await;
    projector_verify(&store).await;
    checks.check(true, String::new); // projector verify: 0 drift, stats = replay

    println!(
        "dynamodb faults at {percent} %: {} HTTP operations, {requests} DynamoDB requests forwarded, injected {injected:?};          statuses {:?}; {} well-formed 503s; {} acknowledged allocations, {} recognised as replays on retry",
        report.operations,
        report.by_status,
        report.well_formed_503,
        report.acknowledged.len(),
        report.recognised_on_retry.len()
    );
    DynamoFault::ALL
        .iter()
        .map(|fault| SummaryRow {
            scenario: format!("DynamoDB at {percent} %"),
            fault: fault.label().into(),
            injected: injected.get(fault).copied().unwrap_or(0),
            operations: report.operations,
            checks: checks.0,
        })
        .collect()
}

/// Allocates `account`'s sandbox to `caller` (by its exact name) and marks it for deletion, over
/// HTTP.
async fn allocate_and_mark(app: &tests::app::TestApp, caller: &str, account: &FakeAccount) {
    let name = account.name.clone().unwrap_or_default();
    let response = app
        .allocate(caller)
        .header("X-Sandbox-Name-Prefix", &name)
        .send()
        .await
        .expect("allocate");
    assert_eq!(response.status(), 201);
    let marked = app
        .track(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{}/mark-for-deletion", account.sandbox_id()),
        )
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await
        .expect("mark");
    assert_eq!(marked.status(), 200);
}

/// The reference incident on a manual clock, through the fake CSP over HTTP and the real jobs:
/// 16 simulated minutes of bursts of HTTP 500 with HTML bodies (with partial recovery between),
/// slow DELETEs, 429s with `Retry-After`, a refusal budget of only 3 — then an account CSP
/// refuses for good (403). All 56 incident accounts end deleted, each failure recorded as
/// transient; only the refusing account is quarantined, after exactly 3 refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csp_incident_ends_with_only_the_refusing_account_quarantined() {
    let _serial = SERIAL.lock().await;
    let seed = seed("csp incident");
    let mut rng = StdRng::seed_from_u64(seed);
    let app = tests::app::spawn_app(Backend::Embedded).await;
    let csp = FakeCsp::start().await;
    let accounts: Vec<FakeAccount> = (1..=57).map(FakeAccount::sandbox).collect();
    csp.set_accounts(accounts.clone());
    let refusing = accounts[56].clone();
    let mut config = JobsConfig::default();
    config.csp.mode = CspMode::Real;
    config.csp.base_url = csp.base_url();
    config.csp.api_token = csp.token().into();
    config.csp.read_timeout = Duration::from_secs(1);
    config.csp.rate_limit_rps = 0.0;
    config.csp.retry_after_max = Duration::from_secs(2);
    // An operator who wants steady retries through an incident, with a small refusal budget.
    config.csp.breaker_threshold = 1_000;
    config.deletion_max_attempts = 3;
    let jobs = jobs::Jobs::from_config(
        app.state.broker.clone(),
        config,
        Arc::new(app.clock.clone()),
        &prometheus::Registry::new(),
    )
    .expect("jobs");
    jobs.sync().await.expect("sync");
    app.wait_until(|s| s.get(SandboxStatus::Available) == 57)
        .await;
    for (i, account) in accounts[..56].iter().enumerate() {
        allocate_and_mark(&app, &format!("student-{i}"), account).await;
    }
    app.wait_until(|s| s.get(SandboxStatus::PendingDeletion) == 56)
        .await;

    let (mut bursts, mut slow, mut rate_limited) = (0u64, 0u64, 0u64);
    for minute in 0..16u64 {
        csp.clear_faults();
        if rng.random_bool(0.6) {
            csp.fail_all_deletes(Fault::Html(500));
            bursts += 1;
        } else {
            csp.set_delete_failure_rate(Some(FailureRate {
                rate: 0.5,
                seed: seed.wrapping_add(minute),
                max_streak: 100,
            }));
        }
        // Served before the burst: slow but successful DELETEs, now and then a 429.
        let delays = rng.random_range(1..=3);
        for _ in 0..delays {
            csp.queue_delete_faults([Fault::Delay(Duration::from_millis(
                rng.random_range(100..400),
            ))]);
        }
        slow += delays;
        if rng.random_bool(0.3) {
            csp.queue_delete_faults([Fault::RetryAfter(1)]);
            rate_limited += 1;
        }
        jobs.cleanup().await.expect("cleanup during the incident");
        app.clock.advance(chrono::Duration::minutes(1));
    }

    // After the incident, a student ends a lab on an account CSP refuses to delete for good.
    csp.clear_faults();
    csp.fail_deletes_of(&refusing, Fault::Status(403));
    allocate_and_mark(&app, "student-56", &refusing).await;
    app.wait_until(|s| s.get(SandboxStatus::PendingDeletion) >= 1)
        .await;
    let mut settled = false;
    for _ in 0..10 {
        jobs.cleanup().await.expect("cleanup after the incident");
        let mut pending = 0;
        for a in &accounts {
            let s = app
                .state
                .broker
                .load_sandbox(&a.sandbox_id())
                .await
                .expect("load")
                .sandbox;
            if s.status == Some(SandboxStatus::PendingDeletion) {
                pending += 1;
            }
        }
        if pending == 0 {
            settled = true;
            break;
        }
        app.clock.advance(chrono::Duration::hours(2));
    }
    let mut checks = Checks::default();
    checks.check(settled, || "sandboxes still pending after 10 rounds".into());
    let mut transient_failures = 0u64;
    for a in &accounts[..56] {
        let id = a.sandbox_id();
        let history = app.state.broker.history(&id).await.expect("history");
        let events: Vec<SandboxEvent> = history
            .iter()
            .filter_map(|e| e.sandbox_event().ok().flatten())
            .collect();
        let deleted = events
            .iter()
            .filter(|e| matches!(e, SandboxEvent::SandboxDeleted { .. }))
            .count();
        checks.check(deleted == 1, || format!("{id}: {deleted} SandboxDeleted"));
        for e in &events {
            if let SandboxEvent::DeletionAttemptFailed { transient, .. } = e {
                checks.check(*transient, || {
                    format!("{id}: an incident failure counted as a refusal")
                });
                transient_failures += 1;
            }
        }
    }
    // Refusals are what the budget counts: exactly 3 recorded, the third one quarantining.
    let refusing_events: Vec<SandboxEvent> = app
        .state
        .broker
        .history(&refusing.sandbox_id())
        .await
        .expect("history")
        .iter()
        .filter_map(|e| e.sandbox_event().ok().flatten())
        .collect();
    let refusals = refusing_events
        .iter()
        .filter(|e| {
            matches!(
                e,
                SandboxEvent::DeletionAttemptFailed {
                    transient: false,
                    ..
                } | SandboxEvent::DeletionFailed {
                    transient: false,
                    ..
                }
            )
        })
        .count() as u64;
    checks.check(refusals == 3, || {
        format!("the refusing account recorded {refusals} refusals, budget 3: {refusing_events:?}")
    });
    let last = refusing_events.last();
    checks.check(
        matches!(
            last,
            Some(SandboxEvent::DeletionFailed {
                transient: false,
                ..
            })
        ),
        || format!("the refusing account ended with {last:?}"),
    );
    app.wait_until(|s| {
        s.get(SandboxStatus::Deleted) == 56 && s.get(SandboxStatus::DeletionFailed) == 1
    })
    .await;
    checks.check(true, String::new); // the view agrees: 56 deleted, 1 quarantined
    println!(
        "csp incident: {} DELETE calls, {transient_failures} transient failures recorded; 56 deleted, 0 of them quarantined; the refusing account quarantined after 3 refusals",
        csp.total_delete_calls()
    );
    let operations = u64::from(csp.total_delete_calls());
    let rows = [
        ("minutes of HTTP 500 bursts (HTML bodies)", bursts),
        ("slow DELETEs (100-400 ms)", slow),
        ("429 with Retry-After", rate_limited),
        ("transient failures recorded", transient_failures),
        ("permanent 403 (quarantined after 3)", refusals),
    ]
    .into_iter()
    .map(|(fault, injected)| SummaryRow {
        scenario: "CSP incident, 16 simulated min".into(),
        fault: fault.into(),
        injected,
        operations,
        checks: checks.0,
    })
    .collect::<Vec<_>>();
    print!("{}", render(&rows));
    app.stop().await;
}
