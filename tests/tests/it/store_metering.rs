//! What the store does is counted on `/metrics` on DynamoDB Local: the capacity units DynamoDB
//! reports for the API's writes (`broker_store_consumed_capacity_units_total`), and the stream
//! reads of `projector poll` in `broker_store_requests_total{target="stream"}`.

use std::time::Duration;

use reqwest::StatusCode;
use tests::app::{spawn_app, Backend, Sent};
use tests::ddb_local;

/// The value of the first series of `/metrics` text whose line starts with `prefix`.
fn series(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A few allocations through the API: the events' TransactWriteItems consumed write capacity,
/// which `/metrics` shows per operation and table, beside the request counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_report_consumed_write_capacity() {
    let app = spawn_app(Backend::Dynamo).await;
    app.seed("cap", 5).await;
    for n in 0..3 {
        let response = app.allocate(&format!("capacity-student-{n}")).sent().await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .sent()
        .await
        .text()
        .await
        .unwrap_or_default();
    let written = series(
        &metrics,
        "broker_store_consumed_capacity_units_total{kind=\"write\",op=\"TransactWriteItems\",target=\"events\"}",
    );
    assert!(
        written.is_some_and(|units| units > 0.0),
        "no write capacity for the events' TransactWriteItems in /metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("broker_store"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let read = metrics
        .lines()
        .filter(|l| l.starts_with("broker_store_consumed_capacity_units_total{kind=\"read\""))
        .count();
    assert!(read > 0, "no read capacity series in /metrics");
    app.stop().await;
}

/// `projector poll` on DynamoDB Local counts its Streams calls (GetRecords, GetShardIterator,
/// DescribeStream) in the same request series as its table requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_poll_counts_stream_reads() {
    let store = ddb_local::fresh_store(4).await;
    let endpoint = ddb_local::endpoint().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"));
    let metrics_addr = format!("127.0.0.1:{port}");
    let cli = <projector::cli::Cli as clap::Parser>::parse_from([
        "projector",
        "poll",
        "--metrics-addr",
        metrics_addr.as_str(),
        "--idle-max-ms",
        "100",
        "--store",
        "dynamodb",
        "--table-prefix",
        store.table_prefix(),
        "--ddb-endpoint-url",
        endpoint.as_str(),
        "--aws-region",
        "us-east-1",
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let poll = tokio::spawn(projector::cli::run(cli, async {
        let _ = stopped.await;
    }));

    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let wanted = [
        "broker_store_requests_total{op=\"GetRecords\",target=\"stream\"}",
        "broker_store_requests_total{op=\"GetShardIterator\",target=\"stream\"}",
        "broker_store_requests_total{op=\"DescribeStream\",target=\"stream\"}",
    ];
    loop {
        let metrics = match client
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
        {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if wanted
            .iter()
            .all(|w| series(&metrics, w).is_some_and(|n| n > 0.0))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream reads never showed on /metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let code = poll.await.unwrap_or_else(|e| panic!("poll task: {e}"));
    assert_eq!(code, std::process::ExitCode::SUCCESS);
}

/// Every `broker_store_*` counter series of a `/metrics` text, by its full series name.
fn store_series(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("broker_store_requests_total{")
                || l.starts_with("broker_store_consumed_capacity_units_total{")
                || l.starts_with("broker_store_transaction_items_total{")
                || l.starts_with("broker_store_transaction_write_units_total{")
        })
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// What one allocation costs on DynamoDB Local, command and projection together: the table
/// requests and the capacity units DynamoDB reports per allocation (docs/aws-capacity-cost.md
/// quotes this test's output). The events' transaction writes two items (the sandbox's
/// `SandboxAllocated`, the claim's `ClaimGranted`), each under 1 KB, at 2 WCU per
/// transactional item: 4 write units per allocation. DynamoDB Local reports one flat figure per
/// table for a transaction whatever its item count, so the items and the units they cost by
/// the rules are counted too (`broker_store_transaction_items_total`,
/// `broker_store_transaction_write_units_total`): at least 2 per item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_allocation_requests_and_capacity() {
    const ALLOCATIONS: usize = 20;
    let app = spawn_app(Backend::Dynamo).await;
    app.seed("unit", ALLOCATIONS * 2).await;
    let read = |app: &tests::app::TestApp| {
        let request = app.client.get(format!("{}/metrics", app.url));
        async move { store_series(&request.sent().await.text().await.unwrap_or_default()) }
    };
    // Let the registrations' projection settle, so the window holds only the allocations.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = read(&app).await;
    for n in 0..ALLOCATIONS {
        let response = app.allocate(&format!("unit-student-{n}")).sent().await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    app.wait_until(|s| s.get(domain::SandboxStatus::Allocated) >= ALLOCATIONS as i64)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = read(&app).await;
    let mut report = String::new();
    for (series, value) in &after {
        let delta = value - before.get(series).copied().unwrap_or(0.0);
        if delta > 0.0 && !series.contains("target=\"stream\"") {
            report.push_str(&format!(
                "{:>8.2} per allocation  {series}\n",
                delta / ALLOCATIONS as f64
            ));
        }
    }
    println!("{ALLOCATIONS} allocations on DynamoDB Local, per allocation:\n{report}");
    let per = |series: &str| {
        (after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0))
            / ALLOCATIONS as f64
    };
    let events_wcu = per("broker_store_consumed_capacity_units_total{kind=\"write\",op=\"TransactWriteItems\",target=\"events\"}");
    assert!(
        (4.0..=8.0).contains(&events_wcu),
        "events write units per allocation: {events_wcu}\n{report}"
    );
    let items =
        per("broker_store_transaction_items_total{op=\"TransactWriteItems\",target=\"events\"}");
    let units = per(
        "broker_store_transaction_write_units_total{op=\"TransactWriteItems\",target=\"events\"}",
    );
    assert!(
        items >= 2.0,
        "event items per allocation: {items}\n{report}"
    );
    assert!(
        units >= 2.0 * items,
        "write units per allocation: {units} for {items} items\n{report}"
    );
    app.stop().await;
}
