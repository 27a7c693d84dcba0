//! Long admin operations as background jobs, through the HTTP API on both stores: bulk delete
//! answers 202 with a job id, runs with recorded progress, is reported by `GET /v1/admin/jobs`
//! and `GET /v1/admin/jobs/{id}`, outlives the client's connection, and (on DynamoDB) is visible
//! from another API instance.

use std::time::Duration;

use domain::model::events::{AdminJobEvent, BrokerEvent};
use domain::model::ids::admin_job_stream;
use domain::SandboxStatus;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, AppOptions, Backend, TestApp, ADMIN_TOKEN};
use tokio::io::AsyncWriteExt;

fn options(backend: Backend) -> AppOptions {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(|config| config.admin_job_progress_ms = 100);
    options
}

async fn get_json(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let resp = app
        .admin(Method::GET, path)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status();
    (status, resp.json().await.unwrap_or_default())
}

/// Polls the job (bounded, 120 s) until it is no longer running; returns it.
async fn finished_job(app: &TestApp, job_id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (status, job) = get_json(app, &format!("/v1/admin/jobs/{job_id}")).await;
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

async fn bulk_delete_runs_as_a_job(backend: Backend) {
    let app = spawn_app_with(options(backend)).await;
    app.seed("lab", 40).await;
    let resp = app
        .allocate("stu-1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::CREATED);
    app.wait_until(|s| s.get(SandboxStatus::Available) == 39)
        .await;

    let resp = app
        .admin(Method::POST, "/v1/admin/bulk-delete?status=available")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let accepted: Value = resp.json().await.unwrap_or_default();
    let job_id = accepted["job_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(accepted["kind"], "bulk_delete");
    assert_eq!(
        location.as_deref(),
        Some(format!("/v1/admin/jobs/{job_id}").as_str())
    );
    assert_eq!(accepted["status_url"].as_str(), location.as_deref());

    let job = finished_job(&app, &job_id).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["total"], 39, "{job}");
    assert_eq!(job["done"], 39, "{job}");
    assert_eq!(job["errors"], 0, "{job}");
    assert_eq!(job["params"]["status"], "available", "{job}");
    assert_eq!(job["summary"]["deleted"], 39, "{job}");
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    app.wait_until(|s| s.get(SandboxStatus::Available) == 0)
        .await;
    assert_eq!(app.stats().await.get(SandboxStatus::Allocated), 1);

    // Progress was recorded on the job's own stream while it ran.
    let events = app
        .state
        .broker
        .events()
        .load(&admin_job_stream(&job_id))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let progressed = events
        .iter()
        .filter(|e| {
            matches!(
                e.decode(),
                Ok(BrokerEvent::AdminJob(
                    AdminJobEvent::AdminJobProgressed { .. }
                ))
            )
        })
        .count();
    assert!(progressed >= 1, "{events:?}");

    let (status, list) = get_json(&app, "/v1/admin/jobs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["jobs"][0]["job_id"].as_str(), Some(job_id.as_str()));
    assert_eq!(list["count"], 1);

    // The contract's synchronous form of the other operations stays; background is opt-in.
    let resp = app
        .admin(
            Method::POST,
            "/v1/admin/auto-delete-stale?grace_period_hours=0&background=true",
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await.unwrap_or_default();
    let stale_job = accepted["job_id"].as_str().unwrap_or_default().to_string();
    let job = finished_job(&app, &stale_job).await;
    assert_eq!(
        (job["state"].as_str(), job["kind"].as_str()),
        (Some("completed"), Some("auto_delete_stale")),
        "{job}"
    );
    let (status, list) = get_json(&app, "/v1/admin/jobs?limit=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["jobs"][0]["job_id"].as_str(), Some(stale_job.as_str()));
    assert_eq!(list["count"], 1);

    // Unknown and malformed ids, bad parameters.
    let (status, body) = get_json(&app, &format!("/v1/admin/jobs/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(
        (status, body["detail"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("JOB_NOT_FOUND"))
    );
    let (status, body) = get_json(&app, "/v1/admin/jobs/index").await;
    assert_eq!(
        (status, body["detail"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("VALIDATION_ERROR"))
    );
    let resp = app
        .admin(Method::POST, "/v1/admin/sync?background=maybe")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Embedded store: bulk delete is a 202 job with recorded progress, listed and reported.
#[tokio::test]
async fn bulk_delete_runs_as_a_job_embedded() {
    bulk_delete_runs_as_a_job(Backend::Embedded).await;
}

/// DynamoDB Local: bulk delete is a 202 job with recorded progress, listed and reported.
#[tokio::test]
async fn bulk_delete_runs_as_a_job_dynamo() {
    bulk_delete_runs_as_a_job(Backend::Dynamo).await;
}

/// A client that sends the request and hangs up at once does not stop the job.
#[tokio::test]
async fn job_outlives_the_client_connection() {
    let app = spawn_app_with(options(Backend::Embedded)).await;
    app.seed("lab", 20).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let request = format!(
        "POST /v1/admin/bulk-delete?status=available HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(socket);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let job_id = loop {
        let (_, list) = get_json(&app, "/v1/admin/jobs").await;
        if let Some(id) = list["jobs"][0]["job_id"].as_str() {
            break id.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let job = finished_job(&app, &job_id).await;
    assert_eq!(
        (job["state"].as_str(), job["done"].as_u64()),
        (Some("completed"), Some(20)),
        "{job}"
    );
    app.wait_until(|s| s.get(SandboxStatus::Available) == 0)
        .await;
    app.stop().await;
}

/// Behind a load balancer the status request may reach another instance: a second API process
/// on the same DynamoDB tables reports the job the first one runs.
#[tokio::test]
async fn another_instance_reports_the_job() {
    let tables = format!("t{}", uuid::Uuid::new_v4().simple());
    // Each test app has its own manual clock, started when it was spawned: the reader's bound
    // for "interrupted" (ten progress intervals) must exceed that skew.
    let on_shared_tables = |run_projector: bool, progress_ms: u64| {
        let tables = tables.clone();
        let mut options = AppOptions::new(Backend::Dynamo);
        options.configure = Box::new(move |config| {
            config.admin_job_progress_ms = progress_ms;
            config.store.table_prefix = tables.clone();
            config.run_projector = Some(run_projector);
        });
        options
    };
    let first = spawn_app_with(on_shared_tables(true, 100)).await;
    first.seed("lab", 10).await;
    let second = spawn_app_with(on_shared_tables(false, 60_000)).await;

    let resp = first
        .admin(Method::POST, "/v1/admin/bulk-delete?status=available")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await.unwrap_or_default();
    let job_id = accepted["job_id"].as_str().unwrap_or_default().to_string();
    let job = finished_job(&second, &job_id).await;
    assert_eq!(
        (job["state"].as_str(), job["done"].as_u64()),
        (Some("completed"), Some(10)),
        "{job}"
    );
    let (_, list) = get_json(&second, "/v1/admin/jobs").await;
    assert_eq!(list["jobs"][0]["job_id"].as_str(), Some(job_id.as_str()));
    second.stop().await;
    first.stop().await;
}
