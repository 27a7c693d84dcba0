//! The constraints the OpenAPI document states are the ones the server enforces: requests the
//! document calls invalid are refused with a 400, and the document states the limits.

use reqwest::StatusCode;
use serde_json::Value;
use tests::app::{spawn_app, Backend, ADMIN_TOKEN, TRACK_TOKEN};

/// An empty `type` filter on the audit feed is a 400, as the document's enum pattern says.
#[tokio::test]
async fn empty_event_type_filter_is_rejected() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .client
        .get(format!("{}/v1/admin/events?type=", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["detail"]["details"][0]["field"], "type", "{body}");

    // A known type still filters.
    let ok = app
        .client
        .get(format!("{}/v1/admin/events?type=SandboxAllocated", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    app.stop().await;
}

/// A malformed `X-Track-ID` is refused even when `X-Instruqt-Sandbox-ID` names the caller, and
/// no sandbox is handed out for that request.
#[tokio::test]
async fn malformed_legacy_caller_header_is_rejected_alongside_a_valid_one() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 2).await;
    let control = reqwest::header::HeaderValue::from_bytes("a\u{84}b".as_bytes()).expect("value");
    let response = app
        .client
        .post(format!("{}/v1/allocate", app.url))
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "student-ok")
        .header("X-Track-ID", control)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["detail"]["details"][0]["field"], "x-track-id",
        "{body}"
    );
    assert_eq!(app.stats().await.get(domain::SandboxStatus::Allocated), 0);
    app.stop().await;
}

/// `until` not after `since` is a 400 on both range reads, and the document says so.
#[tokio::test]
async fn until_must_follow_since_and_the_document_says_so() {
    let app = spawn_app(Backend::Embedded).await;
    for path in [
        "/v1/admin/events",
        "/v1/admin/callers/student-1/allocations",
    ] {
        let response = app
            .client
            .get(format!(
                "{}{path}?since=2026-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",
                app.url
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    let doc: Value = app
        .client
        .get(format!("{}/v1/openapi.json", app.url))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let param = |path: &str, name: &str| -> Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    for path in ["/v1/admin/events", "/v1/admin/callers/{caller}/allocations"] {
        let until = param(path, "until");
        let text = until["description"].as_str().unwrap_or_default();
        assert!(text.contains("after `since`"), "{path}: {until}");
    }
    // Filters state that they must not be empty, and their length and character limits.
    for name in ["caller", "sandbox_id"] {
        let filter = param("/v1/admin/events", name);
        assert_eq!(filter["schema"]["minLength"], 1, "{filter}");
        assert_eq!(filter["schema"]["maxLength"], 256, "{filter}");
        assert!(filter["schema"]["pattern"].is_string(), "{filter}");
    }
    app.stop().await;
}

/// The lease and pool routes refuse what their parameters' schemas refuse (an empty prefix, a job
/// id that is not a UUID) and accept what they allow (`hours` written as `2.0`).
#[tokio::test]
async fn lease_and_pool_parameters_follow_their_schemas() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 1).await;
    let admin = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, format!("{}{path}", app.url))
            .bearer_auth(ADMIN_TOKEN)
    };
    for path in [
        "/v1/admin/pool/drain?prefix=",
        "/v1/admin/pool/resume?prefix=%20",
    ] {
        let response = admin(reqwest::Method::POST, path)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    // Nothing was drained by the refused requests: allocation still works.
    let allocated = app
        .client
        .post(format!("{}/v1/allocate", app.url))
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "student-1")
        .send()
        .await
        .expect("send");
    assert_eq!(allocated.status(), StatusCode::CREATED);
    let sandbox: Value = allocated.json().await.expect("json");
    let id = sandbox["sandbox_id"]
        .as_str()
        .expect("sandbox_id")
        .to_string();
    let extended = app
        .client
        .post(format!("{}/v1/sandboxes/{id}/extend", app.url))
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "student-1")
        .json(&serde_json::json!({"hours": 2.0}))
        .send()
        .await
        .expect("send");
    assert_eq!(extended.status(), StatusCode::OK);
    let half = app
        .client
        .post(format!("{}/v1/sandboxes/{id}/extend", app.url))
        .bearer_auth(TRACK_TOKEN)
        .header("X-Instruqt-Sandbox-ID", "student-1")
        .json(&serde_json::json!({"hours": 1.5}))
        .send()
        .await
        .expect("send");
    assert_eq!(half.status(), StatusCode::BAD_REQUEST);

    let job = admin(reqwest::Method::GET, "/v1/admin/jobs/not-a-uuid")
        .send()
        .await
        .expect("send");
    assert_eq!(job.status(), StatusCode::BAD_REQUEST);
    let doc: Value = app
        .client
        .get(format!("{}/v1/openapi.json", app.url))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let params = &doc["paths"]["/v1/admin/jobs/{job_id}"]["get"]["parameters"][0]["schema"];
    assert!(
        params["pattern"]
            .as_str()
            .is_some_and(|p| p.contains("{12}")),
        "{params}"
    );
    app.stop().await;
}
