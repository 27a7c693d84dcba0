//! Usage reports over real HTTP, on both stores: exact figures of a known scenario by track,
//! prefix and day, the CSV shape, bad ranges refused with the error envelope, and the offline
//! report over an export agreeing with the API's, unfiltered and filtered by track and name
//! prefix.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::usage::{UsageFilter, UsageGroupBy, UsageQuery, USAGE_CSV_HEADER};
use domain::Clock;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app, Backend, TestApp};
use tests::history::all_events;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(
    report_of_a_known_scenario_has_exact_figures,
    csv_and_bad_ranges,
    refusals_are_counted_from_summaries,
    filters_select_exactly_the_matching_allocations,
);

fn time(at: &DateTime<Utc>) -> String {
    domain::model::events::format_time(at)
}

fn now(app: &TestApp) -> DateTime<Utc> {
    domain::model::events::truncate_to_millis(app.clock.now())
}

async fn allocate(
    app: &TestApp,
    caller: &str,
    track: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    allocate_from(app, caller, track, None).await
}

/// Allocates for `track`, from the sandboxes named with `prefix` when given.
async fn allocate_from(
    app: &TestApp,
    caller: &str,
    track: &str,
    prefix: Option<&str>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let mut request = app.allocate(caller).header("X-Instruqt-Track-ID", track);
    if let Some(prefix) = prefix {
        request = request.header("X-Sandbox-Name-Prefix", prefix);
    }
    let resp = request.send().await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    assert!(status.is_success(), "allocate {caller}: {status} {body}");
    Ok(body["sandbox_id"].as_str().unwrap_or_default().to_string())
}

async fn mark(app: &TestApp, caller: &str, sandbox_id: &str) -> TestResult {
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await?;
    assert!(
        resp.status().is_success(),
        "mark {sandbox_id}: {}",
        resp.status()
    );
    Ok(())
}

/// GETs a usage report until `ready` holds (the DynamoDB time index is eventually consistent),
/// with a deadline.
async fn usage_when(
    app: &TestApp,
    query: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = app
            .admin(Method::GET, &format!("/v1/admin/usage?{query}"))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        if ready(&body) {
            return Ok(body);
        }
        if Instant::now() > deadline {
            return Err(format!("usage {query} never showed the scenario: {body}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn group<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == key))
        .unwrap_or(&Value::Null)
}

/// Four students of two tracks hold sandboxes 10, 30 and 60 minutes (one still holds at the
/// end): the report has the exact counts, sandbox-hours and nearest-rank percentiles by track,
/// the same allocations by prefix and day, and the offline report over an export agrees.
async fn report_of_a_known_scenario_has_exact_figures(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    let from = now(&app);
    app.seed("usg", 4).await;
    app.clock.advance(chrono::Duration::minutes(1));
    let a = allocate(&app, "stu-a", "aws-lab").await?;
    let b = allocate(&app, "stu-b", "aws-lab").await?;
    let c = allocate(&app, "stu-c", "aws-lab").await?;
    allocate(&app, "stu-d", "gcp-lab").await?;
    let allocated_day = now(&app).date_naive().format("%Y-%m-%d").to_string();
    app.clock.advance(chrono::Duration::minutes(10));
    mark(&app, "stu-a", &a).await?;
    app.clock.advance(chrono::Duration::minutes(20));
    mark(&app, "stu-b", &b).await?;
    app.clock.advance(chrono::Duration::minutes(30));
    mark(&app, "stu-c", &c).await?;
    let to = now(&app) + chrono::Duration::milliseconds(1);
    let range = format!("from={}&to={}", time(&from), time(&to));
    let report = usage_when(&app, &format!("{range}&group_by=track"), |r| {
        r["totals"]["ended"] == 3 && r["totals"]["allocations"] == 4
    })
    .await?;
    let aws = group(&report, "aws-lab");
    assert_eq!(aws["allocations"], 3, "{report}");
    assert_eq!(aws["ended"], 3);
    assert_eq!(aws["held_at_end"], 0);
    assert_eq!(aws["sandbox_hours"], 1.667);
    assert_eq!(aws["hold_median_s"], 1800);
    assert_eq!(aws["hold_p95_s"], 3600);
    assert_eq!(aws["waits"], 0);
    let gcp = group(&report, "gcp-lab");
    assert_eq!(gcp["allocations"], 1);
    assert_eq!(gcp["held_at_end"], 1);
    assert_eq!(gcp["sandbox_hours"], 1.0);
    assert_eq!(gcp["hold_median_s"], Value::Null);
    assert_eq!(report["totals"]["sandbox_hours"], 2.667);
    assert_eq!(report["refusal_summaries"], 0);
    assert!(report["refusals_note"]
        .as_str()
        .unwrap_or_default()
        .contains("WRITE_EVENTS_USAGE"));

    let by_prefix = usage_when(&app, &format!("{range}&group_by=prefix"), |r| {
        r["totals"]["ended"] == 3
    })
    .await?;
    assert_eq!(group(&by_prefix, "usg")["allocations"], 4, "{by_prefix}");
    let by_day = usage_when(&app, &format!("{range}&group_by=day"), |r| {
        r["totals"]["ended"] == 3
    })
    .await?;
    assert_eq!(group(&by_day, &allocated_day)["allocations"], 4, "{by_day}");

    // Offline over an export of the same log: the same figures.
    let mut log = all_events(app.state.broker.events().as_ref()).await;
    log.sort_by_key(domain::audit::feed_key);
    let export: String = log
        .iter()
        .map(|e| serde_json::to_string(e).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    for (group_by, online) in [
        (UsageGroupBy::Track, &report),
        (UsageGroupBy::Prefix, &by_prefix),
    ] {
        let query = UsageQuery::new(from, to, group_by)?;
        let offline =
            projector::usage_cli::usage_from_export(export.as_bytes(), query, app.clock.now())?;
        let offline = serde_json::to_value(&offline)?;
        assert_eq!(offline["groups"], online["groups"], "{group_by}");
        assert_eq!(offline["totals"], online["totals"], "{group_by}");
    }
    // Filtered, the same: the route's `track=`/`prefix=` and the offline filter agree.
    for (group_by, track, prefix, allocations) in [
        (UsageGroupBy::Prefix, Some("gcp-lab"), None, 1),
        (UsageGroupBy::Day, Some("aws-lab"), Some("usg-"), 3),
        (UsageGroupBy::Track, None, Some("usg-0"), 4),
        (UsageGroupBy::Track, None, Some("other-"), 0),
    ] {
        let mut params = format!("{range}&group_by={group_by}");
        for (name, value) in [("track", track), ("prefix", prefix)] {
            if let Some(value) = value {
                params.push_str(&format!("&{name}={value}"));
            }
        }
        let online =
            usage_when(&app, &params, |r| r["totals"]["allocations"] == allocations).await?;
        let filter = UsageFilter {
            track: track.map(str::to_string),
            name_prefix: prefix.map(str::to_string),
        };
        let offline = projector::usage_cli::usage_from_export_filtered(
            export.as_bytes(),
            UsageQuery::new(from, to, group_by)?,
            filter,
            app.clock.now(),
        )?;
        let offline = serde_json::to_value(&offline)?;
        assert_eq!(offline["groups"], online["groups"], "{params}");
        assert_eq!(offline["totals"], online["totals"], "{params}");
        assert_eq!(offline["track"], online["track"], "{params}");
        assert_eq!(offline["prefix"], online["prefix"], "{params}");
    }
    app.stop().await;
    Ok(())
}

/// CSV comes with `Accept: text/csv` or `format=csv` (header, a line per group, a total line);
/// empty, reversed and over-long ranges, bad times and groupings are 400s in the envelope.
async fn csv_and_bad_ranges(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    let from = now(&app);
    app.seed("csv", 2).await;
    allocate(&app, "stu-a", "lab, with comma").await?;
    let to = now(&app) + chrono::Duration::minutes(1);
    let range = format!("from={}&to={}", time(&from), time(&to));
    usage_when(&app, &range, |r| r["totals"]["allocations"] == 1).await?;
    for (path, accept) in [
        (format!("/v1/admin/usage?{range}"), "text/csv"),
        (format!("/v1/admin/usage?{range}&format=csv"), "*/*"),
    ] {
        let resp = app
            .admin(Method::GET, &path)
            .header("Accept", accept)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(content_type.starts_with("text/csv"), "{content_type}");
        let body = resp.text().await?;
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 3, "{body}");
        assert_eq!(lines[0], USAGE_CSV_HEADER);
        assert!(lines[1].starts_with("\"lab, with comma\",1,"), "{body}");
        assert!(lines[2].starts_with("total,1,"), "{body}");
        assert!(lines.iter().all(|l| l.matches(',').count() >= 12));
    }
    let later = time(&(from + chrono::Duration::days(500)));
    for (query, field) in [
        (format!("from={}&to={}", time(&to), time(&from)), "to"),
        (format!("from={0}&to={0}", time(&from)), "to"),
        (format!("from={}&to={later}", time(&from)), "to"),
        ("from=yesterday".to_string(), "from"),
        (format!("{range}&group_by=week"), "group_by"),
        (format!("{range}&format=xml"), "format"),
        (format!("{range}&limit=3"), "limit"),
    ] {
        let resp = app
            .admin(Method::GET, &format!("/v1/admin/usage?{query}"))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = resp.json().await?;
        assert_eq!(
            body["detail"]["code"], "VALIDATION_ERROR",
            "{query}: {body}"
        );
        let message = body.to_string();
        assert!(message.contains(field), "{query}: {body}");
        assert!(!message.contains("Some("), "{body}");
    }
    app.stop().await;
    Ok(())
}

/// With `WRITE_EVENTS_USAGE` on, refused allocations (an empty pool, an unknown prefix) are
/// written as a summary event and the report counts them by track and reason; the log holds one
/// summary, not one event per refusal.
async fn refusals_are_counted_from_summaries(backend: Backend) -> TestResult {
    let mut options = tests::app::AppOptions::new(backend);
    options.configure = Box::new(|config| {
        config.write_events_usage = true;
        config.usage_summary_interval_sec = 3;
    });
    let app = tests::app::spawn_app_with(options).await;
    let from = now(&app);
    app.seed("ref", 1).await;
    allocate(&app, "stu-a", "aws-lab").await?;
    // One burst: the five refusals fall in one interval, or two when the burst straddles an
    // interval's end.
    let refused = futures::future::join_all((0..5).map(|i| {
        app.allocate(&format!("stu-late-{i}"))
            .header("X-Instruqt-Track-ID", "aws-lab")
            .send()
    }))
    .await;
    for resp in refused {
        assert_eq!(resp?.status(), StatusCode::CONFLICT);
    }
    let to = now(&app) + chrono::Duration::hours(1);
    let range = format!("from={}&to={}", time(&from), time(&to));
    let report = usage_when(&app, &range, |r| {
        group(r, "aws-lab")["refusals"]["no_sandboxes"] == 5
    })
    .await?;
    assert_eq!(group(&report, "aws-lab")["allocations"], 1);
    assert_eq!(report["totals"]["refusals"]["no_sandboxes"], 5);
    let summaries = all_events(app.state.broker.events().as_ref())
        .await
        .into_iter()
        .filter(|e| e.event_type == "RefusalsSummarized")
        .count();
    assert!(
        (1..=2).contains(&summaries),
        "{summaries} summaries for 5 refusals"
    );
    assert_eq!(report["refusal_summaries"], summaries as u64, "{report}");
    app.stop().await;
    Ok(())
}

/// `track=` and `prefix=` select exactly the allocations of that track and of sandboxes whose
/// name starts with the prefix, alone or together, under every grouping; an unknown track is
/// an empty report, not an error; a blank or malformed filter is a 400 in the envelope.
async fn filters_select_exactly_the_matching_allocations(backend: Backend) -> TestResult {
    let app = spawn_app(backend).await;
    let from = now(&app);
    app.seed("usa", 2).await;
    app.seed("usb", 2).await;
    app.clock.advance(chrono::Duration::minutes(1));
    let first = allocate_from(&app, "stu-1", "t-one", Some("usa")).await?;
    allocate_from(&app, "stu-2", "t-one", Some("usb")).await?;
    allocate_from(&app, "stu-3", "t-two", Some("usa")).await?;
    app.clock.advance(chrono::Duration::minutes(30));
    mark(&app, "stu-1", &first).await?;
    app.clock.advance(chrono::Duration::minutes(30));
    let to = now(&app) + chrono::Duration::milliseconds(1);
    let range = format!("from={}&to={}", time(&from), time(&to));
    // Every allocation, so that the DynamoDB time index has caught up before the filters run.
    usage_when(&app, &range, |r| {
        r["totals"]["allocations"] == 3 && r["totals"]["ended"] == 1
    })
    .await?;

    let one = usage_when(
        &app,
        &format!("{range}&track=t-one&group_by=prefix"),
        |_| true,
    )
    .await?;
    assert_eq!(one["track"], "t-one", "{one}");
    assert_eq!(one["totals"]["allocations"], 2, "{one}");
    assert_eq!(one["totals"]["ended"], 1, "{one}");
    assert_eq!(one["totals"]["held_at_end"], 1, "{one}");
    // stu-1 held 30 minutes and stu-2 holds for 60 up to the end of the range.
    assert_eq!(one["totals"]["sandbox_hours"], 1.5, "{one}");
    assert_eq!(group(&one, "usa")["allocations"], 1, "{one}");
    assert_eq!(group(&one, "usb")["allocations"], 1, "{one}");
    assert_eq!(one["groups"].as_array().map(Vec::len), Some(2), "{one}");

    let named = usage_when(&app, &format!("{range}&prefix=usa-&group_by=track"), |_| {
        true
    })
    .await?;
    assert_eq!(named["prefix"], "usa-", "{named}");
    assert_eq!(named["totals"]["allocations"], 2, "{named}");
    assert_eq!(group(&named, "t-one")["allocations"], 1, "{named}");
    assert_eq!(group(&named, "t-one")["ended"], 1, "{named}");
    assert_eq!(group(&named, "t-two")["allocations"], 1, "{named}");
    assert_eq!(named["groups"].as_array().map(Vec::len), Some(2), "{named}");

    let both = usage_when(
        &app,
        &format!("{range}&track=t-one&prefix=usa&group_by=day"),
        |_| true,
    )
    .await?;
    assert_eq!(both["totals"]["allocations"], 1, "{both}");
    assert_eq!(both["totals"]["ended"], 1, "{both}");
    assert_eq!(both["totals"]["sandbox_hours"], 0.5, "{both}");
    assert_eq!(both["totals"]["hold_median_s"], 1800, "{both}");

    let every = usage_when(&app, &format!("{range}&prefix=us"), |_| true).await?;
    assert_eq!(every["totals"]["allocations"], 3, "{every}");

    for group_by in ["track", "prefix", "day"] {
        let unknown = usage_when(
            &app,
            &format!("{range}&track=no-such-track&group_by={group_by}"),
            |_| true,
        )
        .await?;
        assert_eq!(unknown["groups"], serde_json::json!([]), "{unknown}");
        assert_eq!(unknown["totals"]["allocations"], 0, "{unknown}");
        assert_eq!(unknown["totals"]["sandbox_hours"], 0.0, "{unknown}");
    }

    let csv = app
        .admin(
            Method::GET,
            &format!("/v1/admin/usage?{range}&track=t-two&format=csv"),
        )
        .send()
        .await?
        .text()
        .await?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].starts_with("t-two,1,"), "{csv}");
    assert!(lines[2].starts_with("total,1,"), "{csv}");

    for (query, field) in [
        ("track=".to_string(), "track"),
        ("track=%20%20".to_string(), "track"),
        ("prefix=".to_string(), "prefix"),
        ("prefix=usa%01".to_string(), "prefix"),
        (format!("prefix={}", "p".repeat(300)), "prefix"),
    ] {
        let resp = app
            .admin(Method::GET, &format!("/v1/admin/usage?{range}&{query}"))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = resp.json().await?;
        assert_eq!(
            body["detail"]["code"], "VALIDATION_ERROR",
            "{query}: {body}"
        );
        let message = body.to_string();
        assert!(message.contains(field), "{query}: {body}");
        assert!(message.contains("leave"), "a next step: {body}");
        assert!(!message.contains("Some("), "{body}");
    }
    app.stop().await;
    Ok(())
}
