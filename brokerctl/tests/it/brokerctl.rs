//! `brokerctl` against the real service on 127.0.0.1 (port 0, embedded store): the built binary is
//! run as a lab script or an operator would run it, and its output and exit codes are checked.

use std::process::Output;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tests::app::{
    spawn_app, spawn_app_with, AppOptions, Backend, TestApp, ADMIN_TOKEN, TRACK_TOKEN,
};

/// Runs the binary with only the given environment (no BROKER_* leaks in from the caller's).
async fn brokerctl(app_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_brokerctl"));
    command.env_clear().env("BROKER_URL", app_url).args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .output()
        .await
        .unwrap_or_else(|e| panic!("run brokerctl: {e}"))
}

async fn track(app: &TestApp, args: &[&str]) -> Output {
    brokerctl(&app.url, &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)], args).await
}

async fn admin(app: &TestApp, args: &[&str]) -> Output {
    brokerctl(&app.url, &[("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)], args).await
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {} / stderr: {}",
            String::from_utf8_lossy(&output.stdout),
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
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Allocate, re-run (same sandbox), status, env output to a file, and release twice: all
/// succeed, as a lab's setup and cleanup need when they are re-run; an id that no sandbox has is
/// not a release (exit 6).
#[tokio::test]
async fn track_commands_are_idempotent_for_lab_scripts() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    let first = track(&app, &["allocate", "--caller", "stu-1", "--prefix", "lab"]).await;
    ok(&first);
    let sandbox = json(&first);
    let id = sandbox["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(sandbox["name"].as_str().unwrap_or("").starts_with("lab-"));

    let dir = std::env::temp_dir().join(format!("brokerctl-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let env_file = dir.join("sandbox.env");
    let env_path = env_file.to_string_lossy().to_string();
    let again = track(
        &app,
        &[
            "allocate", "--caller", "stu-1", "--format", "env", "--output", &env_path,
        ],
    )
    .await;
    ok(&again);
    let env_text = std::fs::read_to_string(&env_file).unwrap_or_default();
    assert!(
        env_text.contains(&format!("export SANDBOX_ID='{id}'\n")),
        "{env_text}"
    );
    assert!(
        env_text.contains("export SANDBOX_EXPIRES_AT='"),
        "{env_text}"
    );

    let status = track(&app, &["status", &id, "--caller", "stu-1"]).await;
    ok(&status);
    assert_eq!(json(&status)["status"], "allocated");
    let stranger = track(&app, &["status", &id, "--caller", "stu-2"]).await;
    assert_eq!(
        code(&stranger),
        3,
        "another student's sandbox is an auth failure"
    );

    for _ in 0..2 {
        let release = track(&app, &["release", &id, "--caller", "stu-1"]).await;
        ok(&release);
        assert_eq!(json(&release)["status"], "pending_deletion");
    }
    let unknown = track(&app, &["release", "no-such-sandbox", "--caller", "stu-1"]).await;
    assert_eq!(
        code(&unknown),
        6,
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("SANDBOX_NOT_FOUND"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    app.stop().await;
}

/// Exit codes: no sandbox before the deadline 4, missing or wrong token 3, bad input 2, an
/// unreachable service 5.
#[tokio::test]
async fn exit_codes_tell_scripts_what_happened() {
    let app = spawn_app(Backend::Embedded).await;
    let empty = track(&app, &["allocate", "--caller", "stu", "--deadline", "2s"]).await;
    assert_eq!(
        code(&empty),
        4,
        "{}",
        String::from_utf8_lossy(&empty.stderr)
    );
    assert!(String::from_utf8_lossy(&empty.stderr).contains("NO_SANDBOXES_AVAILABLE"));

    let no_token = brokerctl(&app.url, &[], &["allocate", "--caller", "stu"]).await;
    assert_eq!(code(&no_token), 3);
    let wrong = brokerctl(
        &app.url,
        &[("BROKER_TRACK_TOKEN", "not-the-token-0123456789abcdefghijkl")],
        &["allocate", "--caller", "stu"],
    )
    .await;
    assert_eq!(code(&wrong), 3);
    let admin_as_track = admin(&app, &["stats"]).await;
    ok(&admin_as_track);
    let track_as_admin =
        brokerctl(&app.url, &[("BROKER_ADMIN_TOKEN", TRACK_TOKEN)], &["stats"]).await;
    assert_eq!(code(&track_as_admin), 3);

    let bad_time = admin(&app, &["at", "yesterday", "x"]).await;
    assert_eq!(code(&bad_time), 2);
    let bad_flag = admin(&app, &["list", "--page-size", "0"]).await;
    assert_eq!(code(&bad_flag), 2);

    // A port nobody listens on: bind, read the port, close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let dead = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    drop(listener);
    let unreachable = brokerctl(
        &dead,
        &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)],
        &["allocate", "--caller", "stu", "--deadline", "1s"],
    )
    .await;
    assert_eq!(code(&unreachable), 5);
    app.stop().await;
}

/// An allocation that starts while the pool is empty waits (409 + Retry-After) and succeeds
/// once a sandbox is registered, within its deadline.
#[tokio::test]
async fn allocate_waits_for_a_sandbox_to_become_available() {
    let app = spawn_app(Backend::Embedded).await;
    let url = app.url.clone();
    let waiting = tokio::spawn(async move {
        brokerctl(
            &url,
            &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)],
            &["allocate", "--caller", "late", "--deadline", "60s"],
        )
        .await
    });
    // Seed only once the client has been refused at least once.
    wait_for(|| async {
        let body: Value = app
            .admin(Method::GET, "/metrics")
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
            .map(Value::String)?;
        body.as_str()?
            .lines()
            .any(|l| l.contains("no_sandboxes") && !l.starts_with('#') && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    app.seed("fresh", 1).await;
    let output = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    ok(&output);
    assert_eq!(json(&output)["sandbox_id"], "fresh-id-0");
    assert!(String::from_utf8_lossy(&output.stderr).contains("retrying"));
    app.stop().await;
}

/// A 429 is waited out (Retry-After honoured), not fatal: the second allocation inside the same
/// rate-limit bucket still ends in the replay.
#[tokio::test]
async fn rate_limit_is_waited_out() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.rate_limit = (1.0, 1.0);
    let app = spawn_app_with(options).await;
    app.seed("rl", 1).await;
    ok(&track(&app, &["allocate", "--caller", "stu"]).await);
    let second = track(&app, &["allocate", "--caller", "stu", "--deadline", "30s"]).await;
    ok(&second);
    assert_eq!(json(&second)["sandbox_id"], "rl-id-0");
    assert!(String::from_utf8_lossy(&second.stderr).contains("429"));
    app.stop().await;
}

/// Operator commands: stats, list through every page with filters, history, state at a time,
/// retry-deletion refused outside quarantine, job runs, export of the whole history as NDJSON,
/// and a tail that resumes after a given event id.
#[tokio::test]
async fn operator_commands_read_and_act_on_the_pool() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("ops", 5).await;
    ok(&track(&app, &["allocate", "--caller", "a", "--prefix", "ops"]).await);
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 1)
        .await;

    let stats = admin(&app, &["stats", "--format", "json"]).await;
    ok(&stats);
    assert_eq!(json(&stats)["available"], 4);
    let table = admin(&app, &["stats"]).await;
    ok(&table);
    assert!(String::from_utf8_lossy(&table.stdout).contains("available"));

    let listed = admin(&app, &["list", "--page-size", "2", "--format", "json"]).await;
    ok(&listed);
    assert_eq!(
        json(&listed).as_array().map(Vec::len),
        Some(5),
        "every page is read"
    );
    let available = admin(
        &app,
        &[
            "list",
            "--status",
            "available",
            "--page-size",
            "1",
            "--format",
            "json",
        ],
    )
    .await;
    assert_eq!(json(&available).as_array().map(Vec::len), Some(4));
    let listed_table = admin(&app, &["list", "--owner", "a"]).await;
    ok(&listed_table);
    let text = String::from_utf8_lossy(&listed_table.stdout).to_string();
    assert_eq!(text.lines().count(), 2, "header and one row: {text}");

    let held = json(&listed)
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["status"] == "allocated").cloned())
        .unwrap_or_default();
    let id = held["sandbox_id"].as_str().unwrap_or_default().to_string();
    let history = admin(&app, &["history", &id]).await;
    ok(&history);
    let events = json(&history)["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(events.len(), 2, "registered, allocated");
    let allocated_at = events[1]["occurred_at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let at = admin(&app, &["at", &allocated_at, &id]).await;
    ok(&at);
    assert_eq!(json(&at)["holder"], "a");
    assert_eq!(code(&admin(&app, &["history", "missing"]).await), 6);
    assert_eq!(code(&admin(&app, &["retry-deletion", &id]).await), 7);

    for job in ["sync", "auto-expire", "cleanup"] {
        let run = admin(&app, &[job]).await;
        ok(&run);
        assert!(json(&run)["duration_ms"].is_number(), "{job}");
    }

    let exported = admin(&app, &["export"]).await;
    ok(&exported);
    let lines: Vec<Value> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect();
    assert!(
        lines.len() >= 7,
        "5 registrations + allocation + claim: {}",
        lines.len()
    );
    assert!(lines
        .iter()
        .all(|e| e["event_type"].is_string() && e["key"].is_string()));
    assert!(String::from_utf8_lossy(&exported.stderr).contains("export complete"));
    let only = admin(&app, &["export", "--type", "SandboxAllocated", "--quiet"]).await;
    ok(&only);
    assert_eq!(String::from_utf8_lossy(&only.stdout).lines().count(), 1);

    // Resume after the first exported event: the tail replays everything after it.
    let first_key = lines[0]["key"].as_str().unwrap_or_default().to_string();
    let tail = tokio::time::timeout(
        Duration::from_secs(60),
        admin(&app, &["tail", "--since-id", &first_key, "--count", "3"]),
    )
    .await
    .unwrap_or_else(|_| panic!("tail did not deliver 3 events"));
    ok(&tail);
    let tailed: Vec<Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect();
    let expected: Vec<&Value> = lines[1..4].iter().map(|e| &e["key"]).collect();
    let got: Vec<&Value> = tailed.iter().map(|e| &e["key"]).collect();
    assert_eq!(got, expected);
    app.stop().await;
}

/// Polls `probe` until it yields, for at most 60 s.
async fn wait_for<F, Fut>(probe: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while probe().await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}

/// `tail` survives the server ending its stream (`SSE_MAX_LIFETIME_SEC`): it reconnects with
/// `Last-Event-ID` and delivers the events recorded meanwhile, each once, and its state file
/// holds the last id for the next run.
#[tokio::test]
async fn tail_resumes_across_server_ended_streams() {
    let mut options = AppOptions::new(Backend::Embedded);
    // One stream at a time: when the test's own probe gets a stream, tail's first one has ended.
    options.configure = Box::new(|c| {
        c.sse_max_lifetime_sec = 1;
        c.sse_max_subscribers = 1;
    });
    let app = spawn_app_with(options).await;
    app.seed("tail", 2).await;
    let state = std::env::temp_dir().join(format!("brokerctl-tail-{}", uuid_like()));
    let state_path = state.to_string_lossy().to_string();
    let url = app.url.clone();
    let since = "2000-01-01T00:00:00Z".to_string();
    let tailing = tokio::spawn(async move {
        brokerctl(
            &url,
            &[("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)],
            &[
                "tail",
                "--since-id",
                &since,
                "--count",
                "4",
                "--state-file",
                &state_path,
            ],
        )
        .await
    });
    // Two registrations are replayed at once; the next two land after the first stream has ended.
    wait_for(|| async { state.exists().then_some(()) }).await;
    wait_for(|| async {
        let probe = app
            .admin(Method::GET, "/v1/admin/events/stream")
            .send()
            .await
            .ok()?;
        // Dropping the probe frees the slot again (at the latest when its 1 s lifetime ends).
        probe.status().is_success().then_some(())
    })
    .await;
    app.seed("later", 2).await;
    let output = tokio::time::timeout(Duration::from_secs(60), tailing)
        .await
        .unwrap_or_else(|_| panic!("tail did not resume"))
        .unwrap_or_else(|e| panic!("{e}"));
    ok(&output);
    let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or(Value::Null))
        .map(|e| e["stream_id"].as_str().unwrap_or("").to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "each event once: {ids:?}");
    assert_eq!(
        ids.iter()
            .filter(|s| s.starts_with("sandbox#later-"))
            .count(),
        2,
        "{ids:?}"
    );
    let last = std::fs::read_to_string(&state).unwrap_or_default();
    let last_key = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|e| e["key"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert_eq!(last.trim(), last_key);
    let _ = std::fs::remove_file(&state);
    app.stop().await;
}

/// With a per-track credential that requires caller signatures, `BROKER_CALLER_SECRET` signs the
/// caller id and `BROKER_LEASE_FILE` supplies the key and the lease token (allocate, status and
/// release succeed); without the signature the service refuses (exit 3).
#[tokio::test]
async fn per_track_credentials_sign_the_caller() {
    const TOKEN: &str = "signed-track-token-0123456789abcdefgh";
    const SECRET: &str = "signed-caller-secret-0123456789abcdef";
    let credentials = serde_json::json!({"tracks": [{
        "track": "signed", "token": TOKEN, "name_prefixes": ["signed-"],
        "max_concurrent_allocations": 5, "caller_secret": SECRET, "require_caller_signature": true
    }]})
    .to_string();
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(move |c| c.track_credentials_json = Some(credentials.into()));
    let app = spawn_app_with(options).await;
    app.seed("signed", 1).await;
    let unsigned = brokerctl(
        &app.url,
        &[("BROKER_TRACK_TOKEN", TOKEN)],
        &["allocate", "--caller", "stu"],
    )
    .await;
    assert_eq!(code(&unsigned), 3);
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("INVALID_CALLER_SIGNATURE"));
    // The lease file carries the key and the lease token the credential requires.
    let lease = std::env::temp_dir().join(format!(
        "brokerctl-lease-{}-{}",
        std::process::id(),
        line!()
    ));
    let lease = lease.display().to_string();
    let signed_env = [
        ("BROKER_TRACK_TOKEN", TOKEN),
        ("BROKER_CALLER_SECRET", SECRET),
        ("BROKER_LEASE_FILE", lease.as_str()),
    ];
    let allocated = brokerctl(&app.url, &signed_env, &["allocate", "--caller", "stu"]).await;
    ok(&allocated);
    let id = json(&allocated)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ok(&brokerctl(&app.url, &signed_env, &["status", &id, "--caller", "stu"]).await);
    ok(&brokerctl(&app.url, &signed_env, &["release", &id, "--caller", "stu"]).await);
    let _ = std::fs::remove_file(&lease);
    app.stop().await;
}

/// Every sandbox argument takes the broker id or the name: a lab author who passes the name
/// (what the CSP console shows) gets the status and a real release, and an operator gets the
/// history; a name held by another student stays invisible to a track caller.
#[tokio::test]
async fn sandboxes_are_named_by_id_or_name() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("named", 2).await;
    let allocated = track(&app, &["allocate", "--caller", "stu-1"]).await;
    ok(&allocated);
    let sandbox = json(&allocated);
    let id = sandbox["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = sandbox["name"].as_str().unwrap_or_default().to_string();
    assert_ne!(id, name, "ids and names differ in this pool");
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 1)
        .await;

    let status = track(&app, &["status", &name, "--caller", "stu-1"]).await;
    ok(&status);
    assert_eq!(json(&status)["sandbox_id"], id.as_str());
    let stranger = track(&app, &["status", &name, "--caller", "stu-2"]).await;
    assert_eq!(
        code(&stranger),
        6,
        "another student's name resolves to nothing"
    );

    let release = track(&app, &["release", &name, "--caller", "stu-1"]).await;
    ok(&release);
    assert_eq!(json(&release)["sandbox_id"], id.as_str());
    assert_eq!(json(&release)["status"], "pending_deletion");
    let again = track(&app, &["release", &name, "--caller", "stu-1"]).await;
    ok(&again);

    let history = admin(&app, &["history", &name]).await;
    ok(&history);
    assert_eq!(json(&history)["sandbox_id"], id.as_str());
    let missing = admin(&app, &["history", "named-9999"]).await;
    assert_eq!(code(&missing), 6);
    app.stop().await;
}

/// A prefix that no sandbox has stops `allocate` at once with exit 8 (`UNKNOWN_PREFIX`), long
/// before its deadline, while free sandboxes with another prefix exist.
#[tokio::test]
async fn an_unknown_prefix_stops_allocate_at_once() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab-demo", 3).await;
    let started = std::time::Instant::now();
    let unknown = track(
        &app,
        &[
            "allocate",
            "--caller",
            "stu",
            "--prefix",
            "aws-lab",
            "--deadline",
            "60s",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&unknown.stderr).to_string();
    assert_eq!(code(&unknown), 8, "{stderr}");
    assert!(stderr.contains("UNKNOWN_PREFIX"), "{stderr}");
    assert!(!stderr.contains("retrying"), "not retried: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let known = track(
        &app,
        &["allocate", "--caller", "stu", "--prefix", "lab-demo-0"],
    )
    .await;
    ok(&known);
    app.stop().await;
}

/// Operator output is written for people: `list` shows `expires_at` as a UTC time (no epoch
/// number), `stats` gives each prefix group's counts a row of their own (no JSON), and
/// `export`'s progress ends at 100 % on the last page, also for a range with no event.
#[tokio::test]
async fn operator_output_is_written_for_people() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("ops", 3).await;
    ok(&track(&app, &["allocate", "--caller", "a", "--prefix", "ops"]).await);
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 1)
        .await;

    let listed = admin(&app, &["list", "--owner", "a"]).await;
    ok(&listed);
    let text = String::from_utf8_lossy(&listed.stdout).to_string();
    let header = text.lines().next().unwrap_or_default();
    let row = text.lines().nth(1).unwrap_or_default();
    assert!(header.to_lowercase().contains("expires_at"), "{text}");
    let is_utc_time =
        |w: &str| w.len() == 20 && w.ends_with('Z') && w.as_bytes().get(10) == Some(&b'T');
    assert!(
        row.split_whitespace().any(is_utc_time),
        "expires_at as a UTC time: {text}"
    );
    assert!(
        !row.split_whitespace()
            .any(|w| w.len() >= 10 && w.chars().all(|c| c.is_ascii_digit())),
        "no epoch number in the row: {text}"
    );

    let stats = admin(&app, &["stats"]).await;
    ok(&stats);
    let text = String::from_utf8_lossy(&stats.stdout).to_string();
    let available = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("by_prefix.ops.available"))
        .unwrap_or_else(|| panic!("no by_prefix row: {text}"));
    assert_eq!(available.split_whitespace().nth(1), Some("2"), "{text}");
    assert!(!text.contains('{'), "raw JSON in the table: {text}");

    // stderr is not a terminal here: one progress line per page, then the summary.
    for args in [&["export"][..], &["export", "--type", "SandboxRetired"][..]] {
        let exported = admin(&app, args).await;
        ok(&exported);
        let progress = String::from_utf8_lossy(&exported.stderr).to_string();
        let lines: Vec<&str> = progress.lines().collect();
        assert!(
            lines
                .last()
                .is_some_and(|l| l.starts_with("export complete")),
            "{args:?}: {progress}"
        );
        let bar = lines.iter().rev().nth(1).copied().unwrap_or_default();
        assert!(
            bar.starts_with("[####################] 100%"),
            "{args:?} ends at 100 %: {progress}"
        );
    }
    app.stop().await;
}

/// `brokerctl student` and `brokerctl erase` with pseudonyms on: the lookup names the pseudonym,
/// erasure is refused while the student holds a sandbox (exit 7), succeeds after the release,
/// and a second erasure finds no record (exit 6).
#[tokio::test]
async fn operators_look_up_and_erase_students() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.student_ids = command_api::subjects::StudentIds::Pseudonymised;
        c.pseudonym_key = Some("pseudonym-key-for-brokerctl-0123456789abcdef".into());
    });
    let app = spawn_app_with(options).await;
    app.seed("pd", 2).await;
    let student = "student-erase-me";
    let allocated = track(&app, &["allocate", "--caller", student]).await;
    ok(&allocated);
    let sandbox = json(&allocated)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let found = admin(&app, &["student", student]).await;
    ok(&found);
    let pseudonym = json(&found)["pseudonym"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(pseudonym.starts_with("p1:"), "{pseudonym}");
    assert_eq!(code(&admin(&app, &["erase", student]).await), 7);
    ok(&track(&app, &["release", &sandbox, "--caller", student]).await);
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) == 0)
        .await;
    let erased = admin(&app, &["erase", student]).await;
    ok(&erased);
    assert_eq!(json(&erased)["pseudonym"], Value::from(pseudonym));
    assert_eq!(code(&admin(&app, &["erase", student]).await), 6);
    assert_eq!(code(&admin(&app, &["student", student]).await), 6);
    app.stop().await;
}

/// `reservations create|list|show|cancel` and `capacity` against the service: a reservation is
/// created and shown in JSON and tables, one the pool cannot honour exits 7
/// (`INSUFFICIENT_CAPACITY`), an unknown id exits 6, and capacity reports the numbers.
#[tokio::test]
async fn reservation_and_capacity_commands() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.jobs.reservations.write_events_reservations = true;
    let app = spawn_app_with(options).await;
    app.seed("lab", 5).await;
    let starts = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let ends = (chrono::Utc::now() + chrono::Duration::minutes(120)).to_rfc3339();
    let window = ["--starts-at", starts.as_str(), "--ends-at", ends.as_str()];
    let mut create = vec!["reservations", "create", "--track", "ws", "--count", "3"];
    create.extend(window);
    create.extend(["--format", "json"]);
    let created = admin(&app, &create).await;
    ok(&created);
    let body = json(&created);
    assert_eq!(body["reservation"]["count"], 3);
    let id = body["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let mut too_many = vec!["reservations", "create", "--track", "conf", "--count", "3"];
    too_many.extend(window);
    let refused = admin(&app, &too_many).await;
    assert_eq!(
        code(&refused),
        7,
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("INSUFFICIENT_CAPACITY"));

    let listed = admin(&app, &["reservations", "list"]).await;
    ok(&listed);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table.contains("RESERVATION_ID") && table.contains(&id),
        "{table}"
    );
    let shown = admin(&app, &["reservations", "show", &id, "--format", "json"]).await;
    ok(&shown);
    assert_eq!(json(&shown)["track"], "ws");
    let missing = admin(&app, &["reservations", "show", "nosuch"]).await;
    assert_eq!(code(&missing), 6);

    let capacity = admin(
        &app,
        &[
            "capacity", "--track", "other", "--count", "2", "--format", "json",
        ],
    )
    .await;
    ok(&capacity);
    let answer = json(&capacity);
    assert_eq!(answer["numbers"]["count"], 2);
    assert_eq!(answer["can_start_guaranteed"], true);

    let cancelled = admin(&app, &["reservations", "cancel", &id]).await;
    ok(&cancelled);
    assert_eq!(json(&cancelled)["state"], "cancelled");
    app.stop().await;
}

/// `heartbeat` records one (JSON answer); `heartbeat --every` stops with exit 0 once the
/// allocation has ended; `usage` shows the allocation in a table and as JSON, and `--track`
/// and `--prefix` keep only the matching allocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_and_usage_commands() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 2).await;
    let first = track(
        &app,
        &["allocate", "--caller", "stu-hb", "--track", "hb-track"],
    )
    .await;
    ok(&first);
    let id = json(&first)["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let beat = track(&app, &["heartbeat", &id, "--caller", "stu-hb"]).await;
    ok(&beat);
    assert_eq!(json(&beat)["sandbox_id"], id.as_str());
    assert_eq!(json(&beat)["heartbeats_required"], false);
    ok(&track(&app, &["release", &id, "--caller", "stu-hb"]).await);
    let looped = track(
        &app,
        &["heartbeat", &id, "--caller", "stu-hb", "--every", "5"],
    )
    .await;
    ok(&looped);
    assert!(String::from_utf8_lossy(&looped.stderr).contains("has ended"));

    let table = admin(&app, &["usage", "--group-by", "track"]).await;
    ok(&table);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("hb-track"), "{text}");
    assert!(text.contains("total"), "{text}");
    let as_json = admin(&app, &["usage", "--format", "json"]).await;
    ok(&as_json);
    assert_eq!(json(&as_json)["totals"]["allocations"], 1);
    let filtered = admin(
        &app,
        &[
            "usage", "--format", "json", "--track", "hb-track", "--prefix", "lab-",
        ],
    )
    .await;
    ok(&filtered);
    assert_eq!(json(&filtered)["track"], "hb-track");
    assert_eq!(json(&filtered)["totals"]["allocations"], 1);
    let other = admin(&app, &["usage", "--format", "json", "--track", "other"]).await;
    ok(&other);
    assert_eq!(json(&other)["totals"]["allocations"], 0);
    let bad = admin(&app, &["usage", "--group-by", "week"]).await;
    assert_ne!(code(&bad), 0);
    app.stop().await;
}

/// `allocate --wait 20` waits in the broker's line (`Prefer: wait`) instead of retrying: it is
/// served as soon as a sandbox registers, without a single retry.
#[tokio::test]
async fn allocate_wait_is_served_from_the_line() {
    let app = spawn_app(Backend::Embedded).await;
    let url = app.url.clone();
    let waiting = tokio::spawn(async move {
        brokerctl(
            &url,
            &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)],
            &[
                "allocate",
                "--caller",
                "patient",
                "--wait",
                "20",
                "--deadline",
                "60s",
            ],
        )
        .await
    });
    wait_for(|| async {
        let waiting: usize = app
            .state
            .waiting_line
            .lengths()
            .iter()
            .map(|(_, n)| n)
            .sum();
        (waiting == 1).then_some(())
    })
    .await;
    app.seed("queued", 1).await;
    let output = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    ok(&output);
    assert_eq!(json(&output)["sandbox_id"], "queued-id-0");
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("retrying"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    app.stop().await;
}

/// `allocate --async` takes a ticket in the broker's line and polls it until it is served;
/// `tickets show` shows a ticket to its caller.
#[tokio::test]
async fn allocate_async_polls_its_ticket() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|config| {
        config.write_events_waiting_line = true;
        config.ticket_idle_sec = 8;
    });
    let app = spawn_app_with(options).await;
    let url = app.url.clone();
    let waiting = tokio::spawn(async move {
        brokerctl(
            &url,
            &[("BROKER_TRACK_TOKEN", TRACK_TOKEN)],
            &[
                "allocate",
                "--caller",
                "ticketed",
                "--async",
                "--deadline",
                "60s",
            ],
        )
        .await
    });
    wait_for(|| async {
        let waiting: usize = app
            .state
            .waiting_line
            .lengths()
            .iter()
            .map(|(_, n)| n)
            .sum();
        (waiting == 1).then_some(())
    })
    .await;
    let other = app
        .allocate("other")
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(other.status(), reqwest::StatusCode::ACCEPTED);
    let ticket: Value = other.json().await.unwrap_or_default();
    let ticket_id = ticket["ticket_id"].as_str().unwrap_or_default().to_string();
    let shown = track(&app, &["tickets", "show", &ticket_id, "--caller", "other"]).await;
    ok(&shown);
    assert_eq!(json(&shown)["status"], "pending");
    assert_eq!(json(&shown)["position"], 2);
    app.seed("served", 1).await;
    let output = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    ok(&output);
    assert_eq!(json(&output)["sandbox_id"], "served-id-0");
    assert!(json(&output)["lease_token"].as_str().is_some());
    assert!(String::from_utf8_lossy(&output.stderr).contains("waiting in line"));
    let foreign = track(
        &app,
        &["tickets", "show", &ticket_id, "--caller", "ticketed"],
    )
    .await;
    assert_eq!(
        code(&foreign),
        3,
        "{}",
        String::from_utf8_lossy(&foreign.stderr)
    );
    app.stop().await;
}
