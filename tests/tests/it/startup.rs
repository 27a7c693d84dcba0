//! Start-up as a new user meets it: the API pointed at a fresh DynamoDB Local, and at tables that
//! do not exist when it may not create them.

use std::sync::Arc;

use command_api::config::{Config, StoreKind};
use domain::ManualClock;
use store_dynamodb::table_name;
use tests::app::{spawn_app_with, test_jobs_config, AppOptions, Backend, ADMIN_TOKEN, TRACK_TOKEN};

/// A prefix no other test uses, written with its own trailing dash.
fn fresh_prefix() -> String {
    format!("t{}-", uuid::Uuid::new_v4().simple())
}

/// With an emulator endpoint and no `ENSURE_TABLES`, the API creates its tables (named
/// `{prefix}-events`, the dash not doubled), finds the stream and serves: seeded sandboxes reach
/// the view through the in-process projector.
#[tokio::test]
async fn fresh_emulator_gets_its_tables_by_default() {
    let prefix = fresh_prefix();
    let chosen = prefix.clone();
    let mut options = AppOptions::new(Backend::Dynamo);
    options.configure = Box::new(move |config: &mut Config| {
        config.store.ensure_tables = None;
        config.store.table_prefix = chosen;
    });
    let app = spawn_app_with(options).await;
    app.seed("fresh", 2).await;
    assert_eq!(app.stats().await.total(), 2);

    let store = tests::ddb_local::fresh_store(1).await;
    let events = table_name(&prefix, "events");
    assert_eq!(events, format!("{}-events", prefix.trim_end_matches('-')));
    let described = store
        .client()
        .describe_table()
        .table_name(&events)
        .send()
        .await;
    assert!(described.is_ok(), "{events} was not created: {described:?}");
    let doubled = store
        .client()
        .describe_table()
        .table_name(format!("{prefix}-events"))
        .send()
        .await;
    assert!(doubled.is_err(), "a table with a doubled dash exists");
    app.stop().await;
}

/// When tables may not be created (as against AWS) and are missing, start-up stops with one line
/// that names the missing table and both fixes.
#[tokio::test]
async fn missing_tables_stop_start_up_with_one_line() {
    let prefix = fresh_prefix();
    let mut config = Config::defaults();
    config.api_token = Some(TRACK_TOKEN.into());
    config.admin_token = Some(ADMIN_TOKEN.into());
    config.seed_demo_pool = false;
    config.run_jobs = Some(false);
    config.store.store = StoreKind::Dynamodb;
    config.store.ddb_endpoint_url = Some(tests::ddb_local::endpoint().await);
    config.store.table_prefix = prefix.clone();
    config.store.ensure_tables = Some(false);
    let clock = ManualClock::new(chrono::Utc::now());
    let Err(error) =
        command_api::startup::build_with(&config, Arc::new(clock), test_jobs_config()).await
    else {
        panic!("start-up succeeded without tables");
    };
    let line = format!("{error:#}");
    assert!(!line.contains('\n'), "more than one line: {line}");
    assert!(line.contains(&table_name(&prefix, "")), "{line}");
    assert!(line.contains("does not exist"), "{line}");
    assert!(line.contains("ENSURE_TABLES=true"), "{line}");
    assert!(line.contains("terraform"), "{line}");
}
