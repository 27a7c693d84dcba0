//! `broker-audit erase` and `lookup` on both stores (docs/personal-data.md, ADR 0033): an
//! operator honours an erasure request with the API stopped, by the route's rules. The service
//! allocates under a pseudonym and stops; the offline erasure is refused while the student holds
//! the sandbox, a dry run writes nothing, the erasure leaves the tombstone the restarted API
//! reads, and erasing again answers "no record" (exit 3).

use command_api::subjects::StudentIds;
use domain::SandboxStatus;
use projector::erasure_cli::{self, EraseOutcome, SubjectPorts, EXIT_NO_RECORD, EXIT_REFUSED};
use reqwest::{Method, StatusCode};
use runtime::{Secret, StoreArgs, StoreKind};
use serde_json::{json, Value};
use tests::app::{Backend, Sent, TestApp};

use crate::personal_data::{Spot, KEY};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(offline_erasure_follows_the_route_rules);

impl Spot {
    /// The store settings `broker-audit` would be given for this spot.
    async fn ports(&self) -> anyhow::Result<SubjectPorts> {
        let mut store = StoreArgs::defaults();
        store.embedded_path = self.path.clone();
        store.table_prefix = self.prefix.clone();
        if self.backend == Backend::Dynamo {
            store.store = StoreKind::Dynamodb;
            store.ddb_endpoint_url = Some(tests::ddb_local::endpoint().await);
        }
        erasure_cli::open_ports(&store).await
    }
}

async fn student_request(app: &TestApp, route: &str, student: &str) -> (StatusCode, Value) {
    let (status, _, body) = app
        .admin(Method::POST, route)
        .json(&json!({ "student": student }))
        .sent_json()
        .await;
    (status, body)
}

/// The offline erasure refuses while the sandbox is held, dry-runs without writing, erases once
/// (the restarted API reads the tombstone) and answers "no record" after.
async fn offline_erasure_follows_the_route_rules(backend: Backend) -> TestResult {
    let spot = Spot::new(backend);
    let key = Secret::from(KEY);
    let student = format!("student-{}", uuid::Uuid::new_v4().simple());

    let app = spot.start(StudentIds::Pseudonymised, "").await;
    app.seed("ae", 2).await;
    let (status, _, body) = app.allocate(&student).sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sandbox = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    app.wait_until(|s| s.get(SandboxStatus::Allocated) == 1)
        .await;
    let (status, body) = student_request(&app, "/v1/admin/students/lookup", &student).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pseudonym = body["pseudonym"].as_str().unwrap_or_default().to_string();
    app.stop().await;

    // The API is down: the offline tool sees the record and refuses while the sandbox is held.
    let ports = spot.ports().await?;
    let found = erasure_cli::lookup(&ports, &key, &student).await?;
    assert_eq!(found.exit_code(), 0);
    assert_eq!(found.pseudonym.as_deref(), Some(pseudonym.as_str()));
    assert!(
        found
            .sandboxes
            .iter()
            .any(|s| s.sandbox_id == sandbox && s.status == "allocated"),
        "{found:?}"
    );
    for dry_run in [true, false] {
        let refused =
            erasure_cli::erase(&ports, &key, &student, dry_run, chrono::Utc::now()).await?;
        assert_eq!(
            refused.outcome,
            EraseOutcome::Refused,
            "dry run {dry_run}: {refused:?}"
        );
        assert_eq!(refused.exit_code(), EXIT_REFUSED);
        assert_eq!(refused.sandbox_id.as_deref(), Some(sandbox.as_str()));
        assert!(refused.describe().contains("mark-for-deletion"));
    }
    assert!(erasure_cli::lookup(&ports, &key, &student).await?.found);
    drop(ports);

    // The lab ends through the API.
    let app = spot.start(StudentIds::Pseudonymised, "").await;
    let (status, _, body) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", &student)
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_until(|s| s.get(SandboxStatus::Allocated) == 0)
        .await;
    app.stop().await;

    // Offline again: a dry run says it would erase and writes nothing; the erasure erases once.
    let ports = spot.ports().await?;
    let would = erasure_cli::erase(&ports, &key, &student, true, chrono::Utc::now()).await?;
    assert_eq!(
        (would.outcome, would.exit_code(), would.pseudonym.as_deref()),
        (EraseOutcome::WouldErase, 0, Some(pseudonym.as_str()))
    );
    assert!(erasure_cli::lookup(&ports, &key, &student).await?.found);
    let other_key = Secret::from("another-deployments-key-0123456789abcdefXYZ");
    let elsewhere =
        erasure_cli::erase(&ports, &other_key, &student, false, chrono::Utc::now()).await?;
    assert_eq!(
        elsewhere.outcome,
        EraseOutcome::NoRecord,
        "another key finds nobody"
    );
    let erased = erasure_cli::erase(&ports, &key, &student, false, chrono::Utc::now()).await?;
    assert_eq!(
        (
            erased.outcome,
            erased.exit_code(),
            erased.pseudonym.as_deref()
        ),
        (EraseOutcome::Erased, 0, Some(pseudonym.as_str())),
        "{erased:?}"
    );
    assert!(erased.erased_at.is_some());
    let again = erasure_cli::erase(&ports, &key, &student, false, chrono::Utc::now()).await?;
    assert_eq!(
        (again.outcome, again.exit_code()),
        (EraseOutcome::NoRecord, EXIT_NO_RECORD)
    );
    let gone = erasure_cli::lookup(&ports, &key, &student).await?;
    assert_eq!((gone.found, gone.exit_code()), (false, EXIT_NO_RECORD));
    let report = serde_json::to_string(&erased)?;
    assert!(
        !report.contains(&student),
        "the report never carries the id: {report}"
    );
    assert!(report.contains(r#""outcome":"erased""#), "{report}");
    drop(ports);

    // The restarted API reads the tombstone the offline erasure left.
    let app = spot.start(StudentIds::Pseudonymised, "").await;
    let (status, body) = student_request(&app, "/v1/admin/students/lookup", &student).await;
    assert_eq!(
        (status, body["detail"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("UNKNOWN_STUDENT")),
        "{body}"
    );
    let (status, _, body) = app
        .get_json(&format!("/v1/admin/pseudonyms/{pseudonym}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], json!("erased"), "{body}");
    app.stop().await;
    Ok(())
}
