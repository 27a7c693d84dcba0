//! The Instruqt lifecycle scripts in `clients/instruqt/` (the brokerctl and the curl-only variant)
//! run against the real service on 127.0.0.1: re-runs are harmless, the lab's file holds the
//! sandbox, and an empty pool or a 429 is waited out rather than fatal.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tests::app::{spawn_app, spawn_app_with, AppOptions, Backend, TestApp, TRACK_TOKEN};

/// Which pair of scripts.
#[derive(Clone, Copy, Debug)]
enum Variant {
    Brokerctl,
    Curl,
}

impl Variant {
    fn script(self, stage: &str) -> PathBuf {
        let name = match self {
            Variant::Brokerctl => format!("{stage}-sandbox.sh"),
            Variant::Curl => format!("{stage}-sandbox-curl.sh"),
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../clients/instruqt")
            .join(name)
    }
}

/// A participant's lab machine: its id and the file the lab reads.
struct Lab {
    participant: String,
    dir: PathBuf,
}

impl Lab {
    fn new(participant: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "instruqt-{participant}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        Self {
            participant: participant.to_string(),
            dir,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("sandbox.env")
    }

    /// The lab's view of the file: `SANDBOX_…` variables after sourcing it.
    fn sourced(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.file()).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect()
    }

    fn var(&self, name: &str) -> String {
        self.sourced()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    async fn run(&self, app_url: &str, variant: Variant, stage: &str, deadline_s: u64) -> Output {
        let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_brokerctl"))
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        tokio::process::Command::new("bash")
            .arg(variant.script(stage))
            .env_clear()
            .env("PATH", path)
            .env("BROKER_URL", app_url)
            .env("BROKER_TRACK_TOKEN", TRACK_TOKEN)
            .env("INSTRUQT_PARTICIPANT_ID", &self.participant)
            .env("INSTRUQT_TRACK_SLUG", "broker-lab")
            .env("BROKER_SANDBOX_FILE", self.file())
            .env("BROKER_DEADLINE", format!("{deadline_s}s"))
            .env("BROKER_DEADLINE_SECONDS", deadline_s.to_string())
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {stage}: {e}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(output: &Output, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{what}: stdout {} / stderr {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn admin_sandbox(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/v1/admin/sandboxes/{id}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or(Value::Null)
}

async fn setup_and_cleanup_rerun(variant: Variant) {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 2).await;
    let lab = Lab::new("participant-1");
    ok(&lab.run(&app.url, variant, "setup", 30).await, "setup");
    let id = lab.var("SANDBOX_ID");
    assert!(id.starts_with("lab-id-"), "{:?}", lab.sourced());
    assert!(lab.var("SANDBOX_NAME").starts_with("lab-"));
    assert!(lab
        .var("SANDBOX_EXPIRES_AT")
        .parse::<i64>()
        .is_ok_and(|t| t > 0));
    assert!(lab
        .var("SANDBOX_EXTERNAL_ID")
        .starts_with("identity/accounts/"));
    ok(
        &lab.run(&app.url, variant, "setup", 30).await,
        "setup re-run",
    );
    assert_eq!(lab.var("SANDBOX_ID"), id, "a re-run keeps the same sandbox");
    let state = admin_sandbox(&app, &id).await;
    assert_eq!(state["holder"], "participant-1");
    assert_eq!(state["track_name"], "broker-lab");

    ok(&lab.run(&app.url, variant, "cleanup", 30).await, "cleanup");
    assert_eq!(admin_sandbox(&app, &id).await["status"], "pending_deletion");
    ok(
        &lab.run(&app.url, variant, "cleanup", 30).await,
        "cleanup re-run",
    );

    let never_set_up = Lab::new("participant-2");
    ok(
        &never_set_up.run(&app.url, variant, "cleanup", 30).await,
        "cleanup without setup",
    );
    app.stop().await;
}

async fn setup_waits_for_a_free_sandbox(variant: Variant) {
    let app = spawn_app(Backend::Embedded).await;
    let url = app.url.clone();
    let setup = tokio::spawn(async move {
        let lab = Lab::new("waiting");
        let output = lab.run(&url, variant, "setup", 90).await;
        (output, lab.var("SANDBOX_ID"))
    });
    // Register a sandbox only after the script has been told 409 at least once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = app
            .client
            .get(format!("{}/metrics", app.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_default();
        let refused = metrics.lines().any(|l| {
            l.starts_with("broker_allocate_total")
                && l.contains("no_sandboxes")
                && !l.ends_with(" 0")
        });
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the script never asked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.seed("late", 1).await;
    let (output, id) = setup.await.unwrap_or_else(|e| panic!("{e}"));
    ok(&output, "setup after 409");
    assert_eq!(id, "late-id-0");
    assert!(String::from_utf8_lossy(&output.stderr).contains("retrying"));
    app.stop().await;
}

/// brokerctl scripts: setup and cleanup each run twice (same sandbox, file rewritten, release
/// repeated), cleanup without a prior setup is a no-op.
#[tokio::test]
async fn brokerctl_scripts_are_idempotent() {
    setup_and_cleanup_rerun(Variant::Brokerctl).await;
}

/// curl-only scripts: the same re-run guarantees as the brokerctl pair.
#[tokio::test]
async fn curl_scripts_are_idempotent() {
    setup_and_cleanup_rerun(Variant::Curl).await;
}

/// brokerctl setup started on an empty pool gets 409, waits, and succeeds once a sandbox appears.
#[tokio::test]
async fn brokerctl_setup_waits_out_an_empty_pool() {
    setup_waits_for_a_free_sandbox(Variant::Brokerctl).await;
}

/// curl-only setup started on an empty pool gets 409, waits, and succeeds once a sandbox appears.
#[tokio::test]
async fn curl_setup_waits_out_an_empty_pool() {
    setup_waits_for_a_free_sandbox(Variant::Curl).await;
}

async fn rerun_waits_out_the_rate_limit(variant: Variant) {
    let mut options = AppOptions::new(Backend::Embedded);
    options.rate_limit = (1.0, 1.0);
    let app = spawn_app_with(options).await;
    app.seed("rl", 1).await;
    let lab = Lab::new("limited");
    ok(&lab.run(&app.url, variant, "setup", 30).await, "setup");
    // The immediate re-run finds the participant's bucket empty: 429 + Retry-After, then a replay.
    let rerun = lab.run(&app.url, variant, "setup", 30).await;
    ok(&rerun, "setup re-run under the rate limit");
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("429"));
    assert_eq!(lab.var("SANDBOX_ID"), "rl-id-0");
    app.stop().await;
}

/// brokerctl setup treats 429 as a wait (Retry-After), not a failure.
#[tokio::test]
async fn brokerctl_setup_waits_out_429() {
    rerun_waits_out_the_rate_limit(Variant::Brokerctl).await;
}

/// curl-only setup treats 429 as a wait (Retry-After), not a failure.
#[tokio::test]
async fn curl_setup_waits_out_429() {
    rerun_waits_out_the_rate_limit(Variant::Curl).await;
}
