//! The Grafana dashboard (`docs/grafana/sandbox-broker.json`) is provisioning-ready and every
//! metric its queries name is one the broker exports: names are collected from a live `/metrics`
//! of the real service after some traffic, plus the job and projector series from their code
//! (those processes may run elsewhere, so a single API's scrape need not show them).

use std::collections::BTreeSet;
use std::path::PathBuf;

use reqwest::Method;
use serde_json::Value;
use tests::app::{spawn_app, Backend};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Metric names (`broker_…`) appearing in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(offset) = text[i..].find("broker_") {
        let start = i + offset;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// Every series name a histogram or counter family `name` exposes.
fn with_series_suffixes(names: BTreeSet<String>) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for name in names {
        for suffix in ["", "_bucket", "_sum", "_count"] {
            all.insert(format!("{name}{suffix}"));
        }
    }
    all
}

/// The dashboard parses, has a uid and a Prometheus datasource variable every query uses, and
/// each query names only metrics the service, the jobs or the projector export.
#[tokio::test]
async fn dashboard_queries_name_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("docs/grafana/sandbox-broker.json"))
        .unwrap_or_else(|e| panic!("dashboard: {e}"));
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}"));
    assert_eq!(dashboard["uid"], "sandbox-broker");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable makes the dashboard importable anywhere"
    );
    let provisioning =
        std::fs::read_to_string(repo().join("docs/grafana/provisioning/dashboards.yaml"))
            .unwrap_or_default();
    assert!(provisioning.contains("apiVersion: 1") && provisioning.contains("type: file"));

    // Traffic that makes the API's labelled series appear: allocations of each outcome, a mark,
    // a 429-free admin read and a job run.
    let app = spawn_app(Backend::Embedded).await;
    app.seed("dash", 1).await;
    for caller in ["a", "a", "b"] {
        let _ = app.allocate(caller).send().await;
    }
    let _ = app
        .track(Method::POST, "/v1/sandboxes/dash-id-0/mark-for-deletion")
        .header("X-Instruqt-Sandbox-ID", "a")
        .send()
        .await;
    let _ = app.admin(Method::GET, "/v1/admin/stats").send().await;
    let _ = app.admin(Method::POST, "/v1/admin/cleanup").send().await;
    let scrape = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    app.stop().await;

    let mut exported = metric_names(&scrape);
    assert!(exported.contains("broker_allocate_total"), "{scrape}");
    for source in [
        "jobs/src/metrics.rs",
        "projector/src/metrics.rs",
        "runtime/src/store_metrics.rs",
        "command-api/src/pool_alerts.rs",
    ] {
        let code = std::fs::read_to_string(repo().join(source))
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        let quoted: BTreeSet<String> = metric_names(&code)
            .into_iter()
            .filter(|n| code.contains(&format!("\"{n}\"")))
            .collect();
        assert!(!quoted.is_empty(), "{source} names no metric");
        exported.extend(quoted);
    }
    let exported = with_series_suffixes(exported);

    let mut queries = 0;
    for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title} has no query");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            let named = metric_names(expr);
            assert!(
                !named.is_empty(),
                "panel {title}: query names no metric: {expr}"
            );
            for name in named {
                assert!(
                    exported.contains(&name),
                    "panel {title}: `{name}` is not exported"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 10, "only {queries} queries");
}

/// The name scanner finds whole metric names only.
#[test]
fn metric_names_are_scanned_whole() {
    let names =
        metric_names("sum(rate(broker_a_total{x=\"y\"}[5m])) / xbroker_b + broker_c_bucket");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["broker_a_total".to_string(), "broker_c_bucket".to_string()]
    );
}
