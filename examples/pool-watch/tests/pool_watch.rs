//! The sample consumer against the real service (127.0.0.1, port 0): it replays the history into
//! per-prefix counts and, restarted from its snapshot, resumes after the last event it folded.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tests::app::{spawn_app, Backend, TestApp, ADMIN_TOKEN};

async fn watch(app: &TestApp, snapshot: &std::path::Path, count: u64) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_pool-watch"))
        .env_clear()
        .env("BROKER_URL", &app.url)
        .env("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)
        .arg("--snapshot")
        .arg(snapshot)
        .args(["--count", &count.to_string()])
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("pool-watch did not see {count} events"))
        .unwrap_or_else(|e| panic!("run pool-watch: {e}"))
}

fn counts(output: &Output) -> Value {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or(Value::Null)
}

/// History replays into per-prefix counts, and a restart from the snapshot counts only what is new.
#[tokio::test]
async fn counts_per_prefix_and_resumes_from_its_snapshot() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    app.seed("aws", 1).await;
    let resp = app
        .allocate("s1")
        .header("X-Sandbox-Name-Prefix", "lab")
        .send()
        .await;
    assert_eq!(resp.map(|r| r.status().as_u16()).unwrap_or(0), 201);
    let snapshot = std::env::temp_dir().join(format!("pool-watch-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&snapshot);

    // 4 registrations, then the allocation and its claim.
    let first = counts(&watch(&app, &snapshot, 6).await);
    assert_eq!(first["lab"]["available"], 2);
    assert_eq!(first["lab"]["allocated"], 1);
    assert_eq!(first["aws"]["available"], 1);

    let resp = app
        .allocate("s2")
        .header("X-Sandbox-Name-Prefix", "aws")
        .send()
        .await;
    assert_eq!(resp.map(|r| r.status().as_u16()).unwrap_or(0), 201);
    // Resumed: exactly the two new events (allocation + claim) complete the picture.
    let second = counts(&watch(&app, &snapshot, 2).await);
    assert_eq!(second["lab"]["allocated"], 1);
    assert_eq!(second["aws"]["allocated"], 1);
    assert!(second["aws"].get("available").is_none());
    let _ = std::fs::remove_file(&snapshot);
    app.stop().await;
}
