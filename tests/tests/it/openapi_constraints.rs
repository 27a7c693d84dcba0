//! The constraints the OpenAPI document states are the ones the server enforces, both ways:
//! requests the document calls invalid are refused with a 400, requests it calls valid are
//! served, and the document states every limit the server applies. Each mismatch schemathesis
//! once found (`scripts/schemathesis.sh`) has a regression test here: `until` equal to `since`,
//! control characters in a path id, a cursor of another listing, and a drain `prefix` past the
//! length limit or wrapped in control characters. The last test probes every id parameter with
//! the same values and checks that the document's `pattern`/`maxLength` and the server agree.

use domain::model::ids::{ID_PATTERN, OPTIONAL_ID_PATTERN};
use domain::Clock;
use regex_lite::Regex;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app, Backend, Sent, TestApp, ADMIN_TOKEN, TRACK_TOKEN};

/// The served OpenAPI document.
async fn document(app: &TestApp) -> Value {
    let (status, _, doc) = app
        .client
        .get(format!("{}/v1/openapi.json", app.url))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK);
    doc
}

/// One parameter of one operation in the document (`Null` when it is not there).
fn parameter(doc: &Value, path: &str, method: &str, name: &str) -> Value {
    doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_default()
}

/// Whether the document calls `value` valid for a parameter: its schema's `pattern`,
/// `minLength` and `maxLength` (both in characters, as JSON Schema counts).
fn document_allows(param: &Value, value: &str) -> bool {
    let schema = &param["schema"];
    let chars = value.chars().count() as u64;
    let pattern_ok = schema["pattern"]
        .as_str()
        .is_none_or(|p| match Regex::new(p) {
            Ok(re) => re.is_match(value),
            Err(e) => panic!("the document's pattern {p:?} does not compile: {e}"),
        });
    pattern_ok
        && schema["minLength"].as_u64().is_none_or(|min| chars >= min)
        && schema["maxLength"].as_u64().is_none_or(|max| chars <= max)
}

/// A path segment carrying `raw` exactly (every byte but the unreserved ones percent-encoded).
fn segment(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `field` of the first problem of a 400 envelope.
fn refused_field(body: &Value) -> &str {
    body["detail"]["details"][0]["field"]
        .as_str()
        .unwrap_or_default()
}

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

/// `until` equal to `since` is an empty window (200, no events, no cursor) on both range reads,
/// as the document allows; `until` before `since` is a 400, as its description says.
async fn until_equal_to_since_is_an_empty_window(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("lab", 1).await;
    let (allocated, _, _) = app.allocate("student-1").sent_json().await;
    assert_eq!(allocated, StatusCode::CREATED);
    // A window that holds the allocation, and an empty one at its start (a recent start: the
    // DynamoDB feed reads a bounded stretch of time per request).
    let start = app.clock.now() - chrono::Duration::minutes(1);
    let at = start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let later =
        (start + chrono::Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for path in [
        "/v1/admin/events",
        "/v1/admin/callers/student-1/allocations",
    ] {
        let (status, _, all) = app.get_json(&format!("{path}?since={at}")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {all}");
        assert!(
            all["count"].as_u64().unwrap_or_default() > 0,
            "{path}: {all}"
        );

        let (status, _, empty) = app.get_json(&format!("{path}?since={at}&until={at}")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {empty}");
        assert_eq!(empty["count"], 0, "{path}: {empty}");
        assert_eq!(empty["cursor"], Value::Null, "{path}: {empty}");

        let (status, _, inverted) = app
            .get_json(&format!("{path}?since={later}&until={at}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {inverted}");
        assert_eq!(refused_field(&inverted), "until", "{inverted}");
    }
    let doc = document(&app).await;
    for path in ["/v1/admin/events", "/v1/admin/callers/{caller}/allocations"] {
        let until = parameter(&doc, path, "get", "until");
        let text = until["description"].as_str().unwrap_or_default();
        assert!(text.contains("empty window"), "{path}: {until}");
        assert!(text.contains("Before `since`: 400"), "{path}: {until}");
        assert!(until["schema"].get("exclusiveMinimum").is_none(), "{until}");
    }
    // Filters state that they must not be empty, and their length and character limits.
    for name in ["caller", "sandbox_id"] {
        let filter = parameter(&doc, "/v1/admin/events", "get", name);
        assert_eq!(filter["schema"]["minLength"], 1, "{filter}");
        assert_eq!(filter["schema"]["maxLength"], 256, "{filter}");
        assert_eq!(filter["schema"]["pattern"], ID_PATTERN, "{filter}");
    }
    app.stop().await;
}

/// Embedded store: [`until_equal_to_since_is_an_empty_window`].
#[tokio::test]
async fn until_equal_to_since_is_an_empty_window_embedded() {
    until_equal_to_since_is_an_empty_window(Backend::Embedded).await;
}

/// DynamoDB Local: [`until_equal_to_since_is_an_empty_window`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_equal_to_since_is_an_empty_window_dynamodb() {
    until_equal_to_since_is_an_empty_window(Backend::Dynamo).await;
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

/// Control characters in a path id are a 400 `VALIDATION_ERROR` on every per-sandbox route,
/// also when they wrap the id of a sandbox that exists (they were once trimmed away, serving
/// that sandbox), and every `{sandbox_id}` in the document declares the rule that refuses them.
#[tokio::test]
async fn control_characters_in_a_path_id_are_refused_as_declared() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 1).await;
    let (status, _, got) = app.allocate("student-1").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{got}");
    let id = got["sandbox_id"].as_str().unwrap_or_default().to_string();

    let doc = document(&app).await;
    let admin_at = parameter(
        &doc,
        "/v1/admin/sandboxes/{sandbox_id}",
        "get",
        "sandbox_id",
    );
    for raw in [
        "\u{10}\u{f1}",
        &format!("{id}\n"),
        &format!("\t{id}"),
        &format!("{id}\u{85}"),
    ] {
        assert!(!document_allows(&admin_at, raw), "{raw:?}: {admin_at}");
        let encoded = segment(raw);
        for (token, path) in [
            (ADMIN_TOKEN, format!("/v1/admin/sandboxes/{encoded}")),
            (
                ADMIN_TOKEN,
                format!("/v1/admin/sandboxes/{encoded}/history"),
            ),
            (TRACK_TOKEN, format!("/v1/sandboxes/{encoded}")),
        ] {
            let (status, _, body) = app
                .client
                .get(format!("{}{path}", app.url))
                .bearer_auth(token)
                .header("X-Instruqt-Sandbox-ID", "student-1")
                .sent_json()
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{body}");
            assert_eq!(refused_field(&body), "sandbox_id", "{body}");
        }
    }
    // The id as it is still works.
    let (status, _, body) = app
        .get_json(&format!("/v1/admin/sandboxes/{}", segment(&id)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Every `{sandbox_id}` path parameter states the same rule, the one the server applies.
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, _) in item.as_object().into_iter().flatten() {
            let param = parameter(&doc, path, method, "sandbox_id");
            if param["in"] != "path" {
                continue;
            }
            assert_eq!(param["schema"]["pattern"], ID_PATTERN, "{method} {path}");
            assert_eq!(param["schema"]["maxLength"], 256, "{method} {path}");
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "only {checked} sandbox_id path parameters found"
    );
    app.stop().await;
}

/// A cursor continues only the listing (and, for the sandbox listing, the filters) that issued
/// it: another listing's cursor is a 400 `VALIDATION_ERROR` on `cursor`, and each listing's
/// `pattern` in the document says so (it matches the listing's own cursors and no other's).
#[tokio::test]
async fn a_cursor_of_another_listing_is_refused_as_declared() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 3).await;
    // Two allocations of one caller, so that its allocation listing has a second page.
    let (status, _, got) = app.allocate("student-1").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{got}");
    let first = got["sandbox_id"].as_str().unwrap_or_default().to_string();
    app.clock.advance(chrono::Duration::minutes(5));
    let (status, _, body) = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{}/mark-for-deletion", segment(&first)),
        )
        .header("X-Instruqt-Sandbox-ID", "student-1")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.clock.advance(chrono::Duration::minutes(5));
    let (status, _, got) = app.allocate("student-1").sent_json().await;
    assert_eq!(status, StatusCode::CREATED, "{got}");
    let first_page = [
        ("/v1/admin/sandboxes", "/v1/admin/sandboxes?limit=1"),
        ("/v1/admin/events", "/v1/admin/events?limit=1"),
        (
            "/v1/admin/callers/{caller}/allocations",
            "/v1/admin/callers/student-1/allocations?limit=1",
        ),
    ];
    let mut cursors = Vec::new();
    for (documented, path) in first_page {
        let (status, _, page) = app.get_json(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        let cursor = page["cursor"].as_str().unwrap_or_default().to_string();
        assert!(
            !cursor.is_empty(),
            "{path}: a full page has a cursor: {page}"
        );
        cursors.push((documented, path, cursor));
    }
    let doc = document(&app).await;
    for (documented, path, own) in &cursors {
        let param = parameter(&doc, documented, "get", "cursor");
        let text = param["description"].as_str().unwrap_or_default();
        assert!(text.contains("another listing"), "{param}");
        assert!(
            text.contains("is refused (400 `VALIDATION_ERROR`)"),
            "{param}"
        );
        assert_eq!(param["schema"]["maxLength"], 2048, "{param}");
        assert!(
            document_allows(&param, own),
            "{path}: own cursor {own} vs {param}"
        );
        assert!(
            document_allows(&param, ""),
            "an empty cursor is the first page"
        );
        // Its own cursor continues it.
        let (status, _, body) = app
            .get_json(&format!("{path}&cursor={}", segment(own)))
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        for (_, other_path, foreign) in cursors.iter().filter(|(_, p, _)| p != path) {
            assert!(
                !document_allows(&param, foreign),
                "{path} documents {other_path}'s cursor as valid"
            );
            let (status, _, body) = app
                .get_json(&format!("{path}&cursor={}", segment(foreign)))
                .await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{path} took {other_path}'s: {body}"
            );
            assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{body}");
            assert_eq!(refused_field(&body), "cursor", "{body}");
        }
    }
    // The sandbox listing's cursor is bound to its filters, on every store alike.
    let (_, _, own) = &cursors[0];
    let (status, _, body) = app
        .get_json(&format!(
            "/v1/admin/sandboxes?limit=1&status=available&cursor={}",
            segment(own)
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(refused_field(&body), "cursor", "{body}");
    app.stop().await;
}

/// A drain `prefix` past the document's `maxLength` (spaces count), or with control characters
/// anywhere in it, is a 400 `VALIDATION_ERROR` and drains nothing: the pool's control state
/// stays empty and allocation goes on. A prefix with spaces around it is drained trimmed.
async fn drain_prefix_follows_the_document(backend: Backend) {
    let app = spawn_app(backend).await;
    app.seed("lab", 1).await;
    let doc = document(&app).await;
    let declared = parameter(&doc, "/v1/admin/pool/drain", "post", "prefix");
    assert_eq!(declared["schema"]["maxLength"], 256, "{declared}");
    assert_eq!(declared["schema"]["pattern"], ID_PATTERN, "{declared}");
    let refused = [
        format!("lab{}", " ".repeat(254)),
        "l".repeat(257),
        "\n\tlab\n".to_string(),
        "lab\u{85}".to_string(),
        "\u{1}\u{2}\u{3}".to_string(),
    ];
    for prefix in &refused {
        assert!(!document_allows(&declared, prefix), "{prefix:?}");
        let (status, _, body) = app
            .admin(Method::POST, "/v1/admin/pool/drain")
            .query(&[("prefix", prefix.as_str())])
            .sent_json()
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{prefix:?}: {body}");
        assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{body}");
        assert_eq!(refused_field(&body), "prefix", "{body}");
    }
    let (status, _, pool) = app.get_json("/v1/admin/pool").await;
    assert_eq!(status, StatusCode::OK, "{pool}");
    assert_eq!(
        pool["drains"],
        serde_json::json!([]),
        "nothing was drained: {pool}"
    );
    assert_eq!(pool["version"], 0, "{pool}");
    let (status, _, got) = app.allocate("student-1").sent_json().await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "allocation is not drained: {got}"
    );

    // Within the rules: drained, with the spaces around the prefix trimmed.
    let (status, _, pool) = app
        .admin(Method::POST, "/v1/admin/pool/drain")
        .query(&[("prefix", "  lab-  ")])
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{pool}");
    assert_eq!(pool["drains"][0]["prefix"], "lab-", "{pool}");
    app.stop().await;
}

/// Embedded store: [`drain_prefix_follows_the_document`].
#[tokio::test]
async fn drain_prefix_follows_the_document_embedded() {
    drain_prefix_follows_the_document(Backend::Embedded).await;
}

/// DynamoDB Local: [`drain_prefix_follows_the_document`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_prefix_follows_the_document_dynamodb() {
    drain_prefix_follows_the_document(Backend::Dynamo).await;
}

/// Values that sit on every edge of the id rules: fine, padded, wrapped in or made of control
/// characters, blank, at and past the length limit.
fn id_probes() -> Vec<String> {
    let mut probes: Vec<String> = [
        "lab",
        " lab ",
        "a b",
        "lab/1#2",
        "\u{a0}",
        "\u{a0}lab",
        "stüdent-✓",
        "lab\n",
        "\tlab",
        "lab\u{85}",
        "\u{10}\u{f1}",
        "\u{7f}",
        "\u{9f}x",
        " ",
        "   ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    probes.push("x".repeat(256));
    probes.push("x".repeat(257));
    probes.push(format!("{} ", "x".repeat(255)));
    probes.push(format!("{} ", "x".repeat(256)));
    // 128 two-byte characters: 256 bytes, within both limits.
    probes.push("é".repeat(128));
    probes
}

/// For every id parameter the server checks (path ids, the audit and listing filters, the pool's
/// track, prefix and reason), the document's `pattern`, `minLength` and `maxLength` accept
/// exactly the probe values the server accepts, and a refusal is a 400 on that field. (The one
/// rule a schema cannot state, the 256-byte limit on non-ASCII values, is in each description and
/// checked at the end.)
#[tokio::test]
async fn document_and_server_agree_on_every_id_parameter() {
    let app = spawn_app(Backend::Embedded).await;
    app.seed("lab", 1).await;
    let doc = document(&app).await;
    // (documented path, method, parameter, how to send a value, token).
    type Send = fn(&TestApp, &str) -> reqwest::RequestBuilder;
    let cases: [(&str, &str, &str, Send); 14] = [
        (
            "/v1/admin/sandboxes/{sandbox_id}",
            "get",
            "sandbox_id",
            |app, v| app.admin(Method::GET, &format!("/v1/admin/sandboxes/{}", segment(v))),
        ),
        (
            "/v1/admin/sandboxes/{sandbox_id}/history",
            "get",
            "sandbox_id",
            |app, v| {
                app.admin(
                    Method::GET,
                    &format!("/v1/admin/sandboxes/{}/history", segment(v)),
                )
            },
        ),
        (
            "/v1/admin/sandboxes/{sandbox_id}/retry-deletion",
            "post",
            "sandbox_id",
            |app, v| {
                app.admin(
                    Method::POST,
                    &format!("/v1/admin/sandboxes/{}/retry-deletion", segment(v)),
                )
            },
        ),
        (
            "/v1/sandboxes/{sandbox_id}",
            "get",
            "sandbox_id",
            |app, v| {
                app.track(Method::GET, &format!("/v1/sandboxes/{}", segment(v)))
                    .header("X-Instruqt-Sandbox-ID", "student-1")
            },
        ),
        (
            "/v1/admin/callers/{caller}/allocations",
            "get",
            "caller",
            |app, v| {
                app.admin(
                    Method::GET,
                    &format!("/v1/admin/callers/{}/allocations", segment(v)),
                )
            },
        ),
        ("/v1/admin/events", "get", "caller", |app, v| {
            app.admin(Method::GET, "/v1/admin/events")
                .query(&[("caller", v)])
        }),
        ("/v1/admin/events", "get", "sandbox_id", |app, v| {
            app.admin(Method::GET, "/v1/admin/events")
                .query(&[("sandbox_id", v)])
        }),
        ("/v1/admin/sandboxes", "get", "owner", |app, v| {
            app.admin(Method::GET, "/v1/admin/sandboxes")
                .query(&[("owner", v)])
        }),
        ("/v1/admin/sandboxes", "get", "prefix", |app, v| {
            app.admin(Method::GET, "/v1/admin/sandboxes")
                .query(&[("prefix", v)])
        }),
        ("/v1/admin/pool", "get", "track", |app, v| {
            app.admin(Method::GET, "/v1/admin/pool")
                .query(&[("track", v)])
        }),
        ("/v1/admin/pool/drain", "post", "prefix", |app, v| {
            app.admin(Method::POST, "/v1/admin/pool/drain")
                .query(&[("prefix", v)])
        }),
        ("/v1/admin/pool/drain", "post", "reason", |app, v| {
            app.admin(Method::POST, "/v1/admin/pool/drain")
                .query(&[("reason", v)])
        }),
        ("/v1/admin/pool/resume", "post", "prefix", |app, v| {
            app.admin(Method::POST, "/v1/admin/pool/resume")
                .query(&[("prefix", v)])
        }),
        ("/v1/admin/events", "get", "type", |app, v| {
            app.admin(Method::GET, "/v1/admin/events")
                .query(&[("type", v)])
        }),
    ];
    let mut disagreements = Vec::new();
    for (path, method, name, send) in cases {
        let param = parameter(&doc, path, method, name);
        assert!(param.is_object(), "{method} {path}: no parameter {name}");
        if name != "type" {
            let pattern = &param["schema"]["pattern"];
            assert!(
                *pattern == ID_PATTERN || *pattern == OPTIONAL_ID_PATTERN,
                "{method} {path} {name}: {pattern}"
            );
            let text = param["description"].as_str().unwrap_or_default();
            assert!(text.contains("256 bytes"), "{method} {path} {name}: {text}");
        }
        let mut probes = id_probes();
        if name == "type" {
            probes.extend([
                "SandboxAllocated".to_string(),
                " SandboxAllocated".to_string(),
            ]);
        }
        for probe in probes {
            // An empty path segment is another route; an empty query value is probed.
            if param["in"] == "path" && probe.is_empty() {
                continue;
            }
            let documented = document_allows(&param, &probe);
            let (status, _, body) = send(&app, &probe).sent_json().await;
            let served = status != StatusCode::BAD_REQUEST;
            if !served {
                assert_eq!(
                    refused_field(&body),
                    name,
                    "{method} {path} {probe:?}: {body}"
                );
            }
            if documented != served {
                disagreements.push(format!(
                    "{method} {path} {name}={probe:?}: document {}, server {status}",
                    if documented { "allows" } else { "refuses" }
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");

    // The byte limit: 200 two-byte characters are within `maxLength` but past 256 bytes, which
    // every description states; the server refuses them.
    let wide = "é".repeat(200);
    let (status, _, body) = app
        .admin(Method::POST, "/v1/admin/pool/drain")
        .query(&[("prefix", wide.as_str())])
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    app.stop().await;
}
