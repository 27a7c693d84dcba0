//! The `jobs worker` binary stopped in the middle of a CSP DELETE. SIGTERM (how ECS and systemd
//! stop a task): the item in flight is finished — its DELETE answered and `SandboxDeleted`
//! recorded — no other item is started, and the process exits 0. SIGKILL (a crash): the lease
//! the dead worker holds lapses after `DELETION_LEASE_SEC` and the next worker deletes the
//! sandbox, recorded once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use domain::model::sandbox::SandboxCommand;
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, EventStore, PoolView, SandboxStatus,
    SystemClock, ViewStore,
};
use projector::{Projector, ProjectorMetrics};
use store_embedded::EmbeddedStore;
use tests::chaos::process::ServiceProcess;
use tests::fake_csp::{FakeAccount, FakeCsp, Fault};

/// A store file with `accounts` registered, allocated and marked for deletion, the view caught
/// up (so the worker's cleanup finds them), as the API would have left it.
async fn pending_on_disk(path: &Path, accounts: &[FakeAccount]) -> (Arc<Broker>, EmbeddedStore) {
    let store = EmbeddedStore::open(path, 8).expect("store file");
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let view: Arc<dyn ViewStore> = Arc::new(store.clone());
    let pool: Arc<dyn PoolView> = Arc::new(store.clone());
    let broker = Arc::new(Broker::new(
        events.clone(),
        pool,
        Arc::new(SystemClock),
        BrokerConfig::default(),
    ));
    let projector = Projector::new(events, view, ProjectorMetrics::unregistered());
    let admin = CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: None,
    };
    for a in accounts {
        broker
            .execute(
                &a.sandbox_id(),
                SandboxCommand::Register {
                    sandbox_id: a.sandbox_id(),
                    name: a.name.clone().unwrap_or_default(),
                    external_id: a.id.clone(),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                &admin,
            )
            .await
            .expect("register");
    }
    projector::embedded::catch_up(&projector, &store)
        .await
        .expect("catch up");
    for (i, a) in accounts.iter().enumerate() {
        let caller = format!("student-{i}");
        let meta = CommandMeta {
            actor: Actor::Track(caller.clone()),
            request_id: None,
            correlation_id: None,
        };
        let request = AllocateRequest {
            caller: caller.clone(),
            name_prefix: a.name.clone(),
            ..AllocateRequest::default()
        };
        let allocation = broker.allocate(&request, &meta).await.expect("allocate");
        broker
            .mark_for_deletion(&allocation.sandbox.sandbox_id, &caller, &meta)
            .await
            .expect("mark");
    }
    projector::embedded::catch_up(&projector, &store)
        .await
        .expect("catch up");
    (broker, store)
}

fn worker(path: &Path, csp: &FakeCsp, lease_sec: u32) -> ServiceProcess {
    let env: BTreeMap<String, String> = [
        ("STORE", "embedded".to_string()),
        ("EMBEDDED_PATH", path.display().to_string()),
        ("LOG_FORMAT", "text".into()),
        ("CSP_MODE", "real".into()),
        ("CSP_BASE_URL", csp.base_url()),
        ("CSP_API_TOKEN", csp.token()),
        ("CSP_RATE_LIMIT_RPS", "0".into()),
        ("CSP_TIMEOUT_READ_SEC", "10".into()),
        ("CLEANUP_CONCURRENCY", "1".into()),
        ("CLEANUP_INTERVAL_SEC", "1".into()),
        ("DELETION_LEASE_SEC", lease_sec.to_string()),
        ("JOB_INTERVAL_JITTER", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ServiceProcess::new(
        "worker",
        Path::new(env!("CARGO_BIN_EXE_chaos-jobs")),
        &["worker"],
        env,
    )
}

fn temp_db() -> PathBuf {
    std::env::temp_dir()
        .join(format!("broker-worker-{}", uuid::Uuid::new_v4()))
        .join("broker.db")
}

async fn count(broker: &Broker, id: &str, kind: &str) -> usize {
    broker
        .history(id)
        .await
        .expect("history")
        .iter()
        .filter(|e| e.event_type == kind)
        .count()
}

/// SIGTERM while the worker waits on a slow CSP DELETE: the process waits for the answer,
/// records `SandboxDeleted`, leases and sends nothing else, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_delete_in_flight_and_starts_no_other() {
    let path = temp_db();
    let csp = FakeCsp::start().await;
    let accounts: Vec<FakeAccount> = (1..=3).map(FakeAccount::sandbox).collect();
    csp.set_accounts(accounts.clone());
    let (broker, _store) = pending_on_disk(&path, &accounts).await;
    csp.fail_all_deletes(Fault::Delay(Duration::from_millis(1500)));

    let mut worker = worker(&path, &csp, 300);
    worker.start();
    tokio::time::timeout(Duration::from_secs(60), csp.wait_for_deletes(1))
        .await
        .unwrap_or_else(|_| panic!("no DELETE reached CSP:\n{}", worker.log_tail(30)));
    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the worker did not exit 0 on SIGTERM ({status:?}):\n{}",
        worker.log_tail(30)
    );
    assert_eq!(
        csp.total_delete_calls(),
        1,
        "a new item was started after SIGTERM"
    );

    let mut deleted = 0;
    for a in &accounts {
        let id = a.sandbox_id();
        let sandbox = broker.load_sandbox(&id).await.expect("load").sandbox;
        match sandbox.status {
            Some(SandboxStatus::Deleted) => {
                deleted += 1;
                assert_eq!(count(&broker, &id, "SandboxDeleted").await, 1);
            }
            Some(SandboxStatus::PendingDeletion) => {
                assert_eq!(
                    count(&broker, &id, "DeletionLeased").await,
                    0,
                    "{id}: leased though never started"
                );
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(deleted, 1, "the DELETE in flight was recorded");
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// SIGKILL while the worker waits on a CSP DELETE: nothing is recorded, the dead worker's lease
/// stays until it lapses, and a new worker then deletes the sandbox — one `SandboxDeleted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_a_lease_that_lapses_and_the_next_worker_deletes() {
    let path = temp_db();
    let csp = FakeCsp::start().await;
    let accounts: Vec<FakeAccount> = (1..=1).map(FakeAccount::sandbox).collect();
    csp.set_accounts(accounts.clone());
    let (broker, _store) = pending_on_disk(&path, &accounts).await;
    let id = accounts[0].sandbox_id();
    csp.queue_delete_faults([Fault::Delay(Duration::from_secs(5))]);

    let mut first = worker(&path, &csp, 3);
    first.start();
    tokio::time::timeout(Duration::from_secs(60), csp.wait_for_deletes(1))
        .await
        .unwrap_or_else(|_| panic!("no DELETE reached CSP:\n{}", first.log_tail(30)));
    first.kill();
    let sandbox = broker.load_sandbox(&id).await.expect("load").sandbox;
    assert_eq!(sandbox.status, Some(SandboxStatus::PendingDeletion));
    assert!(
        sandbox.lease_holder.is_some(),
        "the dead worker's lease is in place"
    );

    let mut second = worker(&path, &csp, 3);
    second.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sandbox = broker.load_sandbox(&id).await.expect("load").sandbox;
        if sandbox.status == Some(SandboxStatus::Deleted) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not deleted after the lease lapsed:\n{}",
            second.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&broker, &id, "SandboxDeleted").await, 1);
    assert_eq!(count(&broker, &id, "DeletionLeased").await, 2);
    assert_eq!(
        csp.total_delete_calls(),
        2,
        "the abandoned DELETE is sent again"
    );
    second.terminate(Duration::from_secs(30)).await;
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
