//! Requests the HTTP layer cannot take, and time parameters sent with stray spaces: each is
//! answered with the error envelope and a request id, through real sockets on the service.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app, Backend, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(time_parameters_with_spaces_are_refused);

/// Sends `request` on a fresh connection (writing while reading, so a server that answers
/// before the request is complete is heard) and returns the status, the head and the body.
async fn raw_exchange(
    app: &TestApp,
    request: Vec<u8>,
) -> Result<(u16, String, Value), Box<dyn std::error::Error + Send + Sync>> {
    let address = app.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        // The server may close once it has answered: a write error then is expected.
        let _ = writer.write_all(&request).await;
        let _ = writer.shutdown().await;
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await??;
    writing.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((status, head.to_string(), body))
}

/// The `x-request-id` of a raw response head.
fn request_id(head: &str) -> Option<String> {
    head.lines()
        .find_map(|line| line.strip_prefix("x-request-id: "))
        .map(str::to_string)
}

/// A header block of 1.5 MiB is 431 `HEADERS_TOO_LARGE` and a request target of 100 KiB is 414
/// `URI_TOO_LONG`, each with the envelope, the request id in the body and the header, and
/// counted; heads that fit are served as before, several large ones on one connection included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_too_large_for_http_get_the_envelope() -> TestResult {
    let app = spawn_app(Backend::Embedded).await;
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1536 * 1024)
    );
    let long_target = format!(
        "GET /healthz?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    for (request, status, code) in [
        (big_header, 431, "HEADERS_TOO_LARGE"),
        (long_target, 414, "URI_TOO_LONG"),
    ] {
        let (got, head, body) = raw_exchange(&app, request.into_bytes()).await?;
        assert_eq!(got, status, "{head}\n{body}");
        assert_eq!(body["detail"]["code"], code, "{body}");
        let id = request_id(&head);
        assert!(id.is_some(), "no request id: {head}");
        assert_eq!(body["detail"]["request_id"].as_str(), id.as_deref());
        let message = body["detail"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(';'), "no next step: {message}");
    }

    // Each head is judged on its own: three heads of 900 KiB on one kept-alive connection (2.7
    // MiB in all) are each the edge's 431, and a small one after them is served.
    let mut three = Vec::new();
    for _ in 0..3 {
        three.extend_from_slice(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(900 * 1024)
            )
            .as_bytes(),
        );
    }
    three.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let address = app.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let mut answers = Vec::new();
    // The write half stays open until the last answer is read (its end would close the
    // connection before the last request is answered).
    let (written, read) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer.write_all(&three), reader.read_to_end(&mut answers))
    })
    .await?;
    written?;
    read?;
    drop(writer);
    let text = String::from_utf8_lossy(&answers);
    let statuses: Vec<&str> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| answer.get(..3).unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["431", "431", "431", "200"], "{text}");

    let (status, _) = get(&app, "/healthz", 60_000).await?;
    assert_eq!(status, StatusCode::OK, "60 KB of headers is served");
    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await?
        .text()
        .await?;
    for reason in ["head_too_large", "uri_too_long"] {
        let line = format!("broker_connections_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing");
    }
    app.stop().await;
    Ok(())
}

async fn get(
    app: &TestApp,
    path: &str,
    header_bytes: usize,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let resp = app
        .admin(Method::GET, path)
        .header("X-Big", "a".repeat(header_bytes))
        .send()
        .await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// `since`, `until` and `at` with spaces around them are 400 `VALIDATION_ERROR` naming the
/// parameter and how to fix it; the same times without the spaces are served.
async fn time_parameters_with_spaces_are_refused(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    app.seed("lab", 1).await;
    let sandbox_id = "lab-id-0";
    let time = "2026-01-05T12:00:00Z";
    let spaced = format!("%20{time}");
    let trailing = format!("{time}%20");
    for (path, field) in [
        (format!("/v1/admin/events?since={spaced}"), "since"),
        (format!("/v1/admin/events?until={trailing}"), "until"),
        (
            format!("/v1/admin/callers/student-1/allocations?since={trailing}"),
            "since",
        ),
        (
            format!("/v1/admin/sandboxes/{sandbox_id}?at={spaced}"),
            "at",
        ),
    ] {
        let (status, body) = get(&app, &path, 0).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["detail"]["code"], "VALIDATION_ERROR", "{path}: {body}");
        let text = body.to_string();
        assert!(text.contains(field), "{path}: {body}");
        assert!(
            text.contains("without surrounding spaces"),
            "{path}: {body}"
        );
        let fixed = path.replace("%20", "");
        let (status, body) = get(&app, &fixed, 0).await?;
        assert_eq!(status, StatusCode::OK, "{fixed}: {body}");
    }
    app.stop().await;
    Ok(())
}
