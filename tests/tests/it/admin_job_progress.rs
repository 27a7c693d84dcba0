//! Progress of the pool-sized admin jobs besides bulk delete (ADR 0018 addendum): a cleanup run
//! in the background records its progress while it runs and ends with its counts, reported by
//! `GET /v1/admin/jobs/{id}`.

use std::time::Duration;

use domain::model::events::{AdminJobEvent, BrokerEvent};
use domain::model::ids::admin_job_stream;
use domain::SandboxStatus;
use jobs::CspMode;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, test_jobs_config, AppOptions, Backend, Sent, TestApp};
use tests::fake_csp::{FakeAccount, FakeCsp, Fault};

const SANDBOXES: u32 = 9;

/// Polls the job (bounded, 120 s) until it is no longer running; returns it.
async fn finished_job(app: &TestApp, job_id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, job) = app
            .admin(Method::GET, &format!("/v1/admin/jobs/{job_id}"))
            .sent_json()
            .await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if job["state"] != "running" {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Embedded store: a background cleanup of pending sandboxes records progress marks with work
/// done while it runs, and its record ends with total, done and the summary's counts.
#[tokio::test]
async fn background_cleanup_reports_progress_embedded() {
    let csp = FakeCsp::start().await;
    csp.set_accounts((0..SANDBOXES).map(FakeAccount::sandbox));
    let mut jobs = test_jobs_config();
    jobs.csp.mode = CspMode::Real;
    jobs.csp.base_url = csp.base_url();
    jobs.csp.api_token = csp.token().into();
    jobs.csp.rate_limit_rps = 0.0;
    jobs.csp.read_timeout = Duration::from_secs(5);
    // Several small pages, each slowed by the CSP below: the run spans progress intervals.
    jobs.page_size = 3;
    let mut options = AppOptions::new(Backend::Embedded);
    options.jobs = jobs;
    options.configure = Box::new(|config| config.admin_job_progress_ms = 100);
    let app = spawn_app_with(options).await;

    let (status, _, body) = app.admin(Method::POST, "/v1/admin/sync").sent_json().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.wait_until(|s| s.get(SandboxStatus::Available) == i64::from(SANDBOXES))
        .await;
    for i in 0..SANDBOXES {
        let caller = format!("stu-{i}");
        let (status, _, body) = app.allocate(&caller).sent_json().await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
        let (status, _, body) = app
            .track(
                Method::POST,
                &format!("/v1/sandboxes/{id}/mark-for-deletion"),
            )
            .header("X-Instruqt-Sandbox-ID", &caller)
            .sent_json()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    app.wait_until(|s| s.get(SandboxStatus::PendingDeletion) == i64::from(SANDBOXES))
        .await;
    app.clock.advance(chrono::Duration::hours(1));
    csp.fail_all_deletes(Fault::Delay(Duration::from_millis(150)));

    let (status, _, accepted) = app
        .admin(Method::POST, "/v1/admin/cleanup?background=true")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap_or_default().to_string();
    let job = finished_job(&app, &job_id).await;
    assert_eq!(job["kind"], "cleanup", "{job}");
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["total"], SANDBOXES, "{job}");
    assert_eq!(job["done"], SANDBOXES, "{job}");
    assert_eq!(job["errors"], 0, "{job}");
    assert_eq!(job["summary"]["deleted"], SANDBOXES, "{job}");

    // The marks written while it ran carry the work done so far.
    let events = app
        .state
        .broker
        .events()
        .load(&admin_job_stream(&job_id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let marks: Vec<u64> = events
        .iter()
        .filter_map(|e| match e.decode() {
            Ok(BrokerEvent::AdminJob(AdminJobEvent::AdminJobProgressed { done, .. })) => Some(done),
            _ => None,
        })
        .collect();
    assert!(
        marks
            .iter()
            .any(|done| *done > 0 && *done < u64::from(SANDBOXES)),
        "no progress mark between start and end: {marks:?}"
    );
    app.stop().await;
}
