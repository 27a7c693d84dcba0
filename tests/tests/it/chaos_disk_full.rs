//! Disk full on the embedded store: the API runs as a child process whose files may not grow past
//! a limit (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored so that writes fail with `EFBIG` instead of
//! killing it), so SQLite runs out of room in the middle of a burst. Every answer must still be
//! a success or a well-formed 503 (`Retry-After` and the error envelope) — never another 5xx,
//! never a hang — and after a restart without the limit nothing acknowledged may be missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::model::events::{Actor, CommandMeta};
use domain::model::sandbox::SandboxCommand;
use domain::{Broker, BrokerConfig, SandboxStatus, SystemClock};
use serde_json::Value;
use store_embedded::EmbeddedStore;
use tests::app::{ADMIN_TOKEN, TRACK_TOKEN};
use tests::chaos::load::{self, LoadOptions};
use tests::chaos::process::{free_port, wait_healthy, ServiceProcess};
use tests::chaos::summary::{render, SummaryRow};
use tests::history::{all_events, sandbox_states, AllocationAudit};

/// Room the API's files get beyond the store's size when it starts: a few dozen commits.
const HEADROOM_BYTES: u64 = 1024 * 1024;

fn api_env(db: &Path, port: u16) -> BTreeMap<String, String> {
    [
        ("STORE", "embedded".to_string()),
        ("EMBEDDED_PATH", db.display().to_string()),
        ("LOG_FORMAT", "text".into()),
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("BROKER_API_TOKEN", TRACK_TOKEN.into()),
        ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("SEED_DEMO_POOL", "false".into()),
        ("RUN_JOBS", "false".into()),
        ("CSP_MODE", "mock".into()),
        ("RATE_LIMIT_RPS", "100000".into()),
        ("RATE_LIMIT_BURST", "100000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Registers `n` sandboxes straight into the store file (the API projects them when it starts).
async fn register_pool(db: &Path, n: usize) {
    let store = EmbeddedStore::open(db, 8).expect("open the store file");
    let broker = Broker::new(
        Arc::new(store.clone()),
        Arc::new(store),
        Arc::new(SystemClock),
        BrokerConfig::default(),
    );
    let meta = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("disk-full-seed".into()),
    };
    for i in 0..n {
        let id = format!("disk-{i:04}");
        broker
            .execute(
                &id,
                SandboxCommand::Register {
                    sandbox_id: id.clone(),
                    name: format!("disk-{i:04}"),
                    external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                &meta,
            )
            .await
            .unwrap_or_else(|e| panic!("register {id}: {e}"));
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Size of the store's file with `suffix` (`""` the database, `"-wal"` its log).
fn file_bytes(db: &Path, suffix: &str) -> u64 {
    std::fs::metadata(format!("{}{suffix}", db.display())).map_or(0, |m| m.len())
}

/// Size of the store's largest file (the database or its WAL): what the limit applies to.
fn store_bytes(db: &Path) -> u64 {
    file_bytes(db, "").max(file_bytes(db, "-wal"))
}

/// `(file size limit, SIGXFSZ ignored)` of a running process, from `/proc`.
fn limits_of(pid: u32) -> (Option<u64>, bool) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let fsize = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let ignored = status
        .lines()
        .find(|l| l.starts_with("SigIgn:"))
        .and_then(|l| u64::from_str_radix(l.trim_start_matches("SigIgn:").trim(), 16).ok())
        // SIGXFSZ is signal 25: bit 24 of the mask.
        .is_some_and(|mask| mask & (1 << 24) != 0);
    (fsize, ignored)
}

async fn stats(client: &reqwest::Client, url: &str) -> Value {
    match client
        .get(format!("{url}/v1/admin/stats"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Runs `projector verify --json` on the store file; the number of differences (panics unless 0).
async fn verify(db: &Path) -> usize {
    let mut env = BTreeMap::new();
    env.insert("STORE".to_string(), "embedded".to_string());
    env.insert("EMBEDDED_PATH".to_string(), db.display().to_string());
    let mut verify = ServiceProcess::new(
        "verify",
        Path::new(env!("CARGO_BIN_EXE_chaos-projector")),
        &["verify", "--json"],
        env,
    );
    verify.start();
    let status = verify.wait_exit(Duration::from_secs(120)).await;
    let output = verify.log_tail(100_000);
    let start = output.find('{').unwrap_or(0);
    let report: Value = serde_json::from_str(output[start..].trim()).unwrap_or(Value::Null);
    let differences = report["differences"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    assert!(
        status.is_some_and(|s| s.success()) && differences == 0,
        "projector verify: {status:?}\n{output}"
    );
    differences
}

/// The API runs out of file room mid-burst: every answer is a 2xx or a 503 with `Retry-After` and
/// the envelope (never a 500, never a hang), and after a restart without the limit every
/// acknowledged allocation is in the history with its student, no sandbox twice, verify clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_answers_503_and_loses_nothing() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("broker-disk-full-{}", uuid::Uuid::new_v4()));
    let db = dir.join("broker.db");
    register_pool(&db, 500).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut api = ServiceProcess::new(
        "api",
        Path::new(env!("CARGO_BIN_EXE_chaos-command-api")),
        &[],
        api_env(&db, port),
    );
    // A first run without the limit projects the pool; its clean stop checkpoints the WAL into
    // the database file, so the limited run starts from a known size with an empty WAL.
    api.start();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not start:\n{}",
        api.log_tail(30)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats(&client, &url).await["available"].as_i64() != Some(500) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool was not projected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stopped = api.terminate(Duration::from_secs(30)).await;
    assert!(
        stopped.is_some_and(|s| s.success()),
        "clean stop: {stopped:?}"
    );
    println!(
        "  store {} bytes, WAL {} bytes after the clean stop",
        file_bytes(&db, ""),
        file_bytes(&db, "-wal")
    );
    // The limit is measured from a store with an empty WAL whatever the stop left (the stop path
    // has its own test in `shutdown.rs`): the test checkpoints the file itself first.
    EmbeddedStore::open(&db, 8)
        .expect("open the store file")
        .close(Duration::from_secs(30))
        .await
        .expect("checkpoint the WAL into the database file");
    assert_eq!(
        file_bytes(&db, "-wal"),
        0,
        "the WAL is empty before the limit"
    );
    let limit = file_bytes(&db, "") + HEADROOM_BYTES;
    println!("  limit {limit} bytes");

    api.set_file_size_limit(Some(limit));
    api.start();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not start under the limit:\n{}",
        api.log_tail(30)
    );
    let (fsize, ignored) = limits_of(api.pid().expect("running"));
    assert_eq!(fsize, Some(limit), "the file size limit is in force");
    assert!(
        ignored,
        "SIGXFSZ is ignored, so writes fail instead of killing"
    );

    // The burst: students allocate, replay and mark until the store has been full for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let burst = tokio::spawn(load::run(
        LoadOptions {
            url: url.clone(),
            students: 8,
            replay_chance: 0.3,
            mark_chance: 0.5,
            seed: 15,
            think: Duration::from_millis(5),
            caller_prefix: "full-".into(),
        },
        stop.clone(),
    ));
    // Until the first well-formed 503 has been seen for several seconds, or a bounded time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut full_since = None;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = stats(&client, &url).await;
        if full_since.is_none() && store_bytes(&db) + 8192 >= limit {
            full_since = Some(tokio::time::Instant::now());
            println!("  store reached the limit ({limit} bytes); stats {stats}");
        }
        if full_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let report = burst.await.expect("burst task");
    assert!(
        api.is_running(),
        "the API died on a full disk:\n{}",
        api.log_tail(40)
    );
    assert!(
        full_since.is_some(),
        "the store never reached the limit ({} of {limit} bytes)",
        store_bytes(&db)
    );
    let api_log = api.log_tail(200_000);
    let mut checks = 0u64;
    let mut check = |ok: bool, what: String| {
        assert!(
            ok,
            "invariant broken: {what}\n(API log in the test output above)"
        );
        checks += 1;
    };
    println!(
        "API log (limited run), last lines:\n{}",
        last_lines(&api_log, 15)
    );
    check(
        report.violations.is_empty(),
        format!("answers broke a promise: {:?}", report.violations),
    );
    check(
        report.unanswered == 0,
        format!(
            "{} requests got no answer from a running API (a hang or a dropped connection)",
            report.unanswered
        ),
    );
    let unavailable = report.by_status.get(&503).copied().unwrap_or(0);
    check(
        unavailable > 0 && report.well_formed_503 == unavailable,
        format!(
            "the full disk reached no student as a well-formed 503: {:?}",
            report.by_status
        ),
    );
    let succeeded: u64 = report
        .by_status
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    check(
        succeeded > 0,
        format!(
            "nothing succeeded before the disk filled: {:?}",
            report.by_status
        ),
    );
    let _ = api.terminate(Duration::from_secs(30)).await;

    // Room again: the same store file, no limit.
    api.set_file_size_limit(None);
    api.start();
    assert!(
        wait_healthy(&client, &url, Duration::from_secs(60)).await,
        "the API did not restart after the disk-full run:\n{}",
        api.log_tail(30)
    );
    let store = EmbeddedStore::open(&db, 8).expect("open the store file");
    let events = all_events(&store).await;
    let audit = AllocationAudit::replay(&events);
    check(
        audit.double_allocations().is_empty(),
        format!(
            "sandboxes allocated twice: {:?}",
            audit.double_allocations()
        ),
    );
    check(
        audit.callers_holding_two().is_empty(),
        format!("callers holding two: {:?}", audit.callers_holding_two()),
    );
    for (caller, sandbox_id) in &report.acknowledged {
        check(
            audit.allocations.get(sandbox_id).map(Vec::as_slice)
                == Some([caller.clone()].as_slice()),
            format!(
                "{caller}'s acknowledged {sandbox_id} is not theirs after the restart: {:?}",
                audit.allocations.get(sandbox_id)
            ),
        );
    }
    // The restarted API's projector catches up with what the full disk held back: its stats
    // equal the counts replayed from the history.
    let states = sandbox_states(&events);
    let count =
        |status: SandboxStatus| states.values().filter(|s| s.status == Some(status)).count() as i64;
    let truth = [
        ("available", count(SandboxStatus::Available)),
        ("allocated", count(SandboxStatus::Allocated)),
        ("pending_deletion", count(SandboxStatus::PendingDeletion)),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = stats(&client, &url).await;
        if truth.iter().all(|(k, n)| stats[*k].as_i64() == Some(*n)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stats never matched the history: truth {truth:?}, stats {stats}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    check(true, String::new()); // stats = the replayed truth
    let _ = api.terminate(Duration::from_secs(30)).await;
    drop(store);
    verify(&db).await;
    check(true, String::new()); // projector verify: 0 drift, stats = replay

    let store_errors = api_log.matches("sqlite:").count();
    println!(
        "disk full: limit {limit} bytes; {} requests, statuses {:?}, {} well-formed 503s, {} acknowledged allocations, {} marked; {store_errors} store errors logged",
        report.operations,
        report.by_status,
        report.well_formed_503,
        report.acknowledged.len(),
        report.marked.len()
    );
    print!(
        "{}",
        render(&[SummaryRow {
            scenario: "disk full, embedded".into(),
            fault: "writes past RLIMIT_FSIZE fail (EFBIG)".into(),
            injected: unavailable,
            operations: report.operations,
            checks,
        }])
    );
    let _ = std::fs::remove_dir_all(&dir);
}
