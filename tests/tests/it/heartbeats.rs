//! Heartbeats and orphan reclaim over real HTTP, on both stores: an opted-in allocation that
//! goes silent is warned about (webhook) and then reclaimed (webhook, event with the reason and
//! the last heartbeat); heartbeats keep an allocation; a track that did not opt in is never
//! reclaimed; a release already under way is not raced; with the event flag off nothing is
//! written; a policy declared in a track's credentials entry works as `HEARTBEAT_TRACKS` does
//! and follows the file across a restart.

use chrono::{DateTime, Duration, Utc};
use domain::model::events::{BrokerEvent, SandboxEvent};
use domain::model::ids::sandbox_stream;
use domain::Clock;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::app::{spawn_app_with, test_jobs_config, AppOptions, Backend, TestApp};
use tests::webhook_receiver::Receiver;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(
    a_silent_lab_is_warned_then_reclaimed_and_other_tracks_are_not,
    heartbeats_keep_the_allocation_and_move_the_clock,
    a_release_under_way_is_not_raced,
    with_the_flag_off_nothing_is_written,
    concurrent_reclaims_act_once,
    a_policy_in_the_credentials_file_reclaims_that_track_only,
    a_changed_credentials_file_applies_to_allocations_after_the_restart,
);

/// The opted-in track: a heartbeat a minute, 30 minutes of grace.
const TRACK: &str = "hb-lab";

/// An app where `hb-lab` opted in, the warning's writes are on (`write_events`), and, with a
/// receiver, webhooks go to it.
async fn app(backend: Backend, write_events: bool, receiver: Option<&Receiver>) -> TestApp {
    let mut options = AppOptions::new(backend);
    let url = receiver.map(|r| r.url.clone());
    options.configure = Box::new(move |config| {
        config.jobs.heartbeat_tracks = format!("{TRACK}=60/1800");
        if let Some(url) = url {
            config.webhooks_json = Some(
                serde_json::json!({"subscribers": [
                    {"name": "labs", "url": url, "secret": "receiver-secret-0123456789abcdefghij",
                     "kinds": ["heartbeat_missed", "release"]},
                ]})
                .to_string()
                .into(),
            );
            config.run_webhooks = Some(true);
            // The receiver listens on plain http on 127.0.0.1, which production refuses.
            config.webhook_allow_http = true;
            config.webhook_allow_private_targets = true;
            config.webhook_retry_base_ms = 20;
            config.webhook_poll_ms = 50;
            config.webhook_settle_ms = 2_000;
            config.webhook_overlap_ms = 4_000;
        }
    });
    let mut jobs = test_jobs_config();
    jobs.heartbeats.write_events = write_events;
    options.jobs = jobs;
    spawn_app_with(options).await
}

async fn allocate(
    app: &TestApp,
    caller: &str,
    track: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let resp = app
        .allocate(caller)
        .header("X-Instruqt-Track-ID", track)
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    assert!(status.is_success(), "allocate {caller}: {status} {body}");
    let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    // The reclaim walks the view's allocated rows: wait until the view shows this one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.state.broker.view().get(&id).await?.map(|r| r.status)
        != Some(domain::SandboxStatus::Allocated)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the view never showed {id} allocated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(id)
}

async fn heartbeat(
    app: &TestApp,
    caller: &str,
    sandbox_id: &str,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox_id}/heartbeat"),
        )
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn status_of(
    app: &TestApp,
    caller: &str,
    sandbox_id: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let resp = app
        .track(Method::GET, &format!("/v1/sandboxes/{sandbox_id}"))
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await?;
    let body: Value = resp.json().await?;
    Ok(body["status"].as_str().unwrap_or_default().to_string())
}

/// Runs the reclaim once; returns (warned, reclaimed).
async fn reclaim(app: &TestApp) -> Result<(u64, u64), Box<dyn std::error::Error + Send + Sync>> {
    let summary = app.state.jobs.reclaim_orphans().await?;
    Ok((summary.warned, summary.reclaimed))
}

/// The sandbox's events, decoded.
async fn events_of(
    app: &TestApp,
    sandbox_id: &str,
) -> Result<Vec<SandboxEvent>, Box<dyn std::error::Error + Send + Sync>> {
    let stored = app
        .state
        .broker
        .events()
        .load(&sandbox_stream(sandbox_id))
        .await?;
    Ok(stored
        .iter()
        .filter_map(|e| match e.decode() {
            Ok(BrokerEvent::Sandbox(event)) => Some(event),
            _ => None,
        })
        .collect())
}

fn allocated_at(events: &[SandboxEvent]) -> Option<DateTime<Utc>> {
    events.iter().find_map(|e| match e {
        SandboxEvent::SandboxAllocated { allocated_at, .. } => Some(*allocated_at),
        _ => None,
    })
}

/// An opted-in allocation that never sends a heartbeat: nothing before half the grace, one
/// warning (a `heartbeat_missed` webhook) at half, the reclaim at the whole grace (a `release`
/// webhook after the warning, an event that carries the reason and the last heartbeat time);
/// a heartbeat then answers 409. An allocation of a track that did not opt in stays allocated.
async fn a_silent_lab_is_warned_then_reclaimed_and_other_tracks_are_not(
    backend: Backend,
) -> TestResult {
    let receiver = Receiver::start().await;
    let app = app(backend, true, Some(&receiver)).await;
    app.seed("lab", 3).await;
    let silent = allocate(&app, "stu-silent", TRACK).await?;
    let other = allocate(&app, "stu-other", "no-heartbeats").await?;
    let start = allocated_at(&events_of(&app, &silent).await?).ok_or("no allocation event")?;

    app.clock.advance(Duration::minutes(14));
    assert_eq!(reclaim(&app).await?, (0, 0), "alive within half the grace");
    app.clock.advance(Duration::minutes(1));
    assert_eq!(reclaim(&app).await?, (1, 0), "warned at half the grace");
    assert_eq!(reclaim(&app).await?, (0, 0), "warned once per silence");
    app.clock.advance(Duration::minutes(15));
    assert_eq!(reclaim(&app).await?, (0, 1), "reclaimed at the whole grace");
    app.clock.advance(Duration::hours(3));
    assert_eq!(
        reclaim(&app).await?,
        (0, 0),
        "the track that did not opt in is never reclaimed"
    );

    assert_eq!(
        status_of(&app, "stu-silent", &silent).await?,
        "pending_deletion"
    );
    assert_eq!(status_of(&app, "stu-other", &other).await?, "allocated");
    let events = events_of(&app, &silent).await?;
    let reclaimed = events.iter().find_map(|e| match e {
        SandboxEvent::DeletionRequested {
            caller,
            reason,
            last_heartbeat_at,
            ..
        } => Some((caller.clone(), reason.clone(), *last_heartbeat_at)),
        _ => None,
    });
    assert_eq!(
        reclaimed,
        Some((
            "stu-silent".to_string(),
            Some("heartbeat_missed".to_string()),
            Some(start)
        )),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e,
        SandboxEvent::HeartbeatMissed { last_heartbeat_at, reclaim_at }
            if *last_heartbeat_at == start && *reclaim_at == start + Duration::minutes(30))));
    let (status, body) = heartbeat(&app, "stu-silent", &silent).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "INVALID_STATE");

    let warning = receiver
        .wait_for("heartbeat_missed", |b| b["kind"] == "heartbeat_missed")
        .await;
    assert_eq!(warning["sandbox"]["sandbox_id"], silent.as_str());
    let release = receiver
        .wait_for("release", |b| {
            b["kind"] == "release" && b["event"]["payload"]["reason"] == "heartbeat_missed"
        })
        .await;
    let bodies = receiver.bodies();
    let position = |id: &Value| bodies.iter().position(|b| &b["id"] == id);
    assert!(
        position(&warning["id"]) < position(&release["id"]),
        "the warning comes first"
    );

    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("broker_heartbeat_reclaims_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("broker_heartbeat_warnings_total 1"));
    app.stop().await;
    Ok(())
}

/// Heartbeats every ten minutes keep an opted-in allocation for two hours (no warning, no
/// reclaim); the answer states the policy; once they stop, the warning names the last one.
async fn heartbeats_keep_the_allocation_and_move_the_clock(backend: Backend) -> TestResult {
    let app = app(backend, true, None).await;
    app.seed("lab", 2).await;
    let id = allocate(&app, "stu", TRACK).await?;
    let mut last = app.clock.now();
    for _ in 0..12 {
        app.clock.advance(Duration::minutes(10));
        let (status, body) = heartbeat(&app, "stu", &id).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["heartbeats_required"], true);
        assert_eq!(body["heartbeat_interval_s"], 60);
        assert_eq!(body["heartbeat_grace_s"], 1800);
        last = domain::model::events::truncate_to_millis(app.clock.now());
        assert_eq!(reclaim(&app).await?, (0, 0));
    }
    // Another student cannot beat for this sandbox.
    let (status, _) = heartbeat(&app, "someone-else", &id).await?;
    assert!(
        status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
        "{status}"
    );
    app.clock.advance(Duration::minutes(15));
    assert_eq!(reclaim(&app).await?, (1, 0));
    let warned = events_of(&app, &id)
        .await?
        .into_iter()
        .find_map(|e| match e {
            SandboxEvent::HeartbeatMissed {
                last_heartbeat_at, ..
            } => Some(last_heartbeat_at),
            _ => None,
        });
    assert_eq!(warned, Some(last));
    // A heartbeat after the warning starts a new silence: at the old deadline there is no
    // reclaim, only the warning about the new silence.
    heartbeat(&app, "stu", &id).await?;
    app.clock.advance(Duration::minutes(15));
    assert_eq!(reclaim(&app).await?, (1, 0));
    assert_eq!(status_of(&app, "stu", &id).await?, "allocated");
    app.stop().await;
    Ok(())
}

/// A sandbox its owner already released (cleanup under way) is left alone by the reclaim, even
/// after a warning: no second deletion request, no change to its stream.
async fn a_release_under_way_is_not_raced(backend: Backend) -> TestResult {
    let app = app(backend, true, None).await;
    app.seed("lab", 2).await;
    let id = allocate(&app, "stu", TRACK).await?;
    app.clock.advance(Duration::minutes(16));
    assert_eq!(reclaim(&app).await?, (1, 0));
    let resp = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{id}/mark-for-deletion"),
        )
        .header("X-Instruqt-Sandbox-ID", "stu")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let before = events_of(&app, &id).await?.len();
    app.clock.advance(Duration::hours(1));
    assert_eq!(reclaim(&app).await?, (0, 0));
    let events = events_of(&app, &id).await?;
    assert_eq!(events.len(), before, "{events:?}");
    let requests = events
        .iter()
        .filter(|e| matches!(e, SandboxEvent::DeletionRequested { .. }))
        .count();
    assert_eq!(requests, 1);
    app.stop().await;
    Ok(())
}

/// With `WRITE_EVENTS_HEARTBEATS` off the reclaim writes nothing and says which flag to turn
/// on; heartbeats are still accepted.
async fn with_the_flag_off_nothing_is_written(backend: Backend) -> TestResult {
    let app = app(backend, false, None).await;
    app.seed("lab", 2).await;
    let id = allocate(&app, "stu", TRACK).await?;
    let (status, _) = heartbeat(&app, "stu", &id).await?;
    assert_eq!(status, StatusCode::OK);
    app.clock.advance(Duration::hours(2));
    let summary = app.state.jobs.reclaim_orphans().await?;
    assert_eq!((summary.warned, summary.reclaimed), (0, 0));
    assert!(summary
        .disabled
        .as_deref()
        .is_some_and(|d| d.contains("WRITE_EVENTS_HEARTBEATS")));
    assert_eq!(status_of(&app, "stu", &id).await?, "allocated");
    app.stop().await;
    Ok(())
}

/// Three reclaim runs at once (as on three instances) write one warning, then one reclaim:
/// the conditional append lets one win and the others re-decide on its events.
async fn concurrent_reclaims_act_once(backend: Backend) -> TestResult {
    let app = app(backend, true, None).await;
    app.seed("lab", 2).await;
    let id = allocate(&app, "stu", TRACK).await?;
    let jobs = &app.state.jobs;
    for (advance, kind) in [(16, "HeartbeatMissed"), (15, "DeletionRequested")] {
        app.clock.advance(Duration::minutes(advance));
        let (a, b, c) = tokio::join!(
            jobs.reclaim_orphans(),
            jobs.reclaim_orphans(),
            jobs.reclaim_orphans()
        );
        let acted: u64 = [a?, b?, c?].iter().map(|s| s.warned + s.reclaimed).sum();
        assert_eq!(acted, 1, "{kind}");
        let written = app
            .state
            .broker
            .events()
            .load(&sandbox_stream(&id))
            .await?
            .iter()
            .filter(|e| e.event_type == kind)
            .count();
        assert_eq!(written, 1, "{kind}");
    }
    assert_eq!(status_of(&app, "stu", &id).await?, "pending_deletion");
    app.stop().await;
    Ok(())
}

/// A per-track token in the credentials file of the policy tests.
const FILE_TRACK_TOKEN: &str = "hbfile-token-0123456789abcdefghijklmn";
/// The token of a track whose entry declares no heartbeats.
const PLAIN_TRACK_TOKEN: &str = "plain-token-0123456789abcdefghijklmno";

/// A credentials document where `hb-file` declares `heartbeat` and `plain` declares none.
fn credentials_with(heartbeat: Value) -> String {
    serde_json::json!({"tracks": [
        {"track": "hb-file", "token": FILE_TRACK_TOKEN, "name_prefixes": ["hbf-"],
         "max_concurrent_allocations": 10, "heartbeat": heartbeat},
        {"track": "plain", "token": PLAIN_TRACK_TOKEN, "name_prefixes": ["pln-"],
         "max_concurrent_allocations": 10},
    ]})
    .to_string()
}

/// An app that reads its track credentials from `file`, on the store `store` names (an
/// embedded file or a DynamoDB table prefix), so that a second app can start on the same log.
async fn app_with_file(backend: Backend, file: std::path::PathBuf, store: String) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.configure = Box::new(move |config| {
        config.track_credentials_file = Some(file);
        match backend {
            Backend::Embedded => config.store.embedded_path = store.into(),
            Backend::Dynamo => config.store.table_prefix = store,
        }
    });
    let mut jobs = test_jobs_config();
    jobs.heartbeats.write_events = true;
    options.jobs = jobs;
    spawn_app_with(options).await
}

/// A scratch directory and a store name for [`app_with_file`].
fn scratch(backend: Backend) -> Result<(std::path::PathBuf, String), std::io::Error> {
    let dir = std::env::temp_dir().join(format!("broker-hb-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let store = match backend {
        Backend::Embedded => dir.join("broker.db").display().to_string(),
        Backend::Dynamo => format!("t{}", uuid::Uuid::new_v4().simple()),
    };
    Ok((dir, store))
}

/// An allocation made with a track's own token: the sandbox id and its lease token (which
/// per-track tokens must send back).
struct Held {
    id: String,
    lease: String,
}

/// Allocates as `caller` with a track's own token; returns once the view shows it allocated
/// (the reclaim walks the view).
async fn allocate_as(
    app: &TestApp,
    token: &str,
    caller: &str,
) -> Result<Held, Box<dyn std::error::Error + Send + Sync>> {
    let resp = app
        .client
        .post(format!("{}/v1/allocate", app.url))
        .bearer_auth(token)
        .header("X-Instruqt-Sandbox-ID", caller)
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    assert_eq!(status, StatusCode::CREATED, "allocate {caller}: {body}");
    let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
    let lease = body["lease_token"].as_str().unwrap_or_default().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.state.broker.view().get(&id).await?.map(|r| r.status)
        != Some(domain::SandboxStatus::Allocated)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the view never showed {id} allocated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(Held { id, lease })
}

/// A request about `held` with a track's own token, as `caller`, to `/v1/sandboxes/{id}` and
/// `suffix`; returns the status and the JSON body.
async fn as_track(
    app: &TestApp,
    token: &str,
    method: Method,
    held: &Held,
    suffix: &str,
    caller: &str,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let resp = app
        .client
        .request(
            method,
            format!("{}/v1/sandboxes/{}{suffix}", app.url, held.id),
        )
        .bearer_auth(token)
        .header("X-Instruqt-Sandbox-ID", caller)
        .header("X-Lease-Token", &held.lease)
        .send()
        .await?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// The sandbox's status as its holder reads it with its track's token.
async fn status_with(
    app: &TestApp,
    token: &str,
    held: &Held,
    caller: &str,
) -> Result<String, reqwest::Error> {
    let (_, body) = as_track(app, token, Method::GET, held, "", caller).await?;
    Ok(body["status"].as_str().unwrap_or_default().to_string())
}

/// The policy an allocation recorded, from its `SandboxAllocated` event.
async fn recorded_policy(
    app: &TestApp,
    sandbox_id: &str,
) -> Result<(Option<u32>, Option<u32>), Box<dyn std::error::Error + Send + Sync>> {
    Ok(events_of(app, sandbox_id)
        .await?
        .iter()
        .find_map(|e| match e {
            SandboxEvent::SandboxAllocated {
                heartbeat_interval_s,
                heartbeat_grace_s,
                ..
            } => Some((*heartbeat_interval_s, *heartbeat_grace_s)),
            _ => None,
        })
        .unwrap_or_default())
}

/// A track whose credentials entry declares `{"interval_s": 60, "grace_s": 1800}` (and is not
/// in `HEARTBEAT_TRACKS`) is warned about at half the grace and reclaimed at the whole, through
/// the API; a track whose entry declares none keeps its sandbox however long it is silent.
async fn a_policy_in_the_credentials_file_reclaims_that_track_only(backend: Backend) -> TestResult {
    let (dir, store) = scratch(backend)?;
    let file = dir.join("tracks.json");
    std::fs::write(
        &file,
        credentials_with(serde_json::json!({"interval_s": 60, "grace_s": 1800})),
    )?;
    let app = app_with_file(backend, file, store).await;
    app.seed("hbf", 2).await;
    app.seed("pln", 2).await;
    let declared = allocate_as(&app, FILE_TRACK_TOKEN, "stu-file").await?;
    let plain = allocate_as(&app, PLAIN_TRACK_TOKEN, "stu-plain").await?;
    assert_eq!(
        recorded_policy(&app, &declared.id).await?,
        (Some(60), Some(1800))
    );
    assert_eq!(recorded_policy(&app, &plain.id).await?, (None, None));

    let (status, body) = as_track(
        &app,
        PLAIN_TRACK_TOKEN,
        Method::POST,
        &plain,
        "/heartbeat",
        "stu-plain",
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["heartbeats_required"], false, "{body}");

    app.clock.advance(Duration::minutes(14));
    assert_eq!(reclaim(&app).await?, (0, 0), "alive within half the grace");
    app.clock.advance(Duration::minutes(1));
    assert_eq!(reclaim(&app).await?, (1, 0), "warned at half the grace");
    app.clock.advance(Duration::minutes(15));
    assert_eq!(reclaim(&app).await?, (0, 1), "reclaimed at the whole grace");
    app.clock.advance(Duration::hours(3));
    assert_eq!(
        reclaim(&app).await?,
        (0, 0),
        "the plain track is never reclaimed"
    );

    assert_eq!(
        status_with(&app, FILE_TRACK_TOKEN, &declared, "stu-file").await?,
        "pending_deletion"
    );
    assert_eq!(
        status_with(&app, PLAIN_TRACK_TOKEN, &plain, "stu-plain").await?,
        "allocated"
    );
    app.stop().await;
    Ok(())
}

/// The credentials file is read at start: an allocation keeps the policy it was made under,
/// and after a restart with a changed entry (grace 1800 s → 900 s) new allocations record and
/// answer the new one, and are reclaimed after the new grace while the older one is not.
async fn a_changed_credentials_file_applies_to_allocations_after_the_restart(
    backend: Backend,
) -> TestResult {
    let (dir, store) = scratch(backend)?;
    let file = dir.join("tracks.json");
    std::fs::write(
        &file,
        credentials_with(serde_json::json!({"interval_s": 60, "grace_s": 1800})),
    )?;
    let first = app_with_file(backend, file.clone(), store.clone()).await;
    first.seed("hbf", 2).await;
    let before = allocate_as(&first, FILE_TRACK_TOKEN, "stu-before").await?;
    first.stop().await;

    std::fs::write(
        &file,
        credentials_with(serde_json::json!({"interval_s": 60, "grace_s": 900})),
    )?;
    let app = app_with_file(backend, file, store).await;
    let after = allocate_as(&app, FILE_TRACK_TOKEN, "stu-after").await?;
    assert_eq!(
        recorded_policy(&app, &before.id).await?,
        (Some(60), Some(1800))
    );
    assert_eq!(
        recorded_policy(&app, &after.id).await?,
        (Some(60), Some(900))
    );
    for (id, caller, grace) in [(&before, "stu-before", 1800), (&after, "stu-after", 900)] {
        let (status, body) = as_track(
            &app,
            FILE_TRACK_TOKEN,
            Method::POST,
            id,
            "/heartbeat",
            caller,
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["heartbeat_grace_s"], grace, "{body}");
    }

    // Both heartbeats were just recorded: after 8 minutes only the new allocation is past half
    // its grace, after 16 it is past the whole; the older one (30 minutes) is only warned.
    app.clock.advance(Duration::minutes(8));
    assert_eq!(reclaim(&app).await?, (1, 0), "the new grace's half");
    app.clock.advance(Duration::minutes(8));
    assert_eq!(
        reclaim(&app).await?,
        (1, 1),
        "the new grace's whole, the old one's half"
    );
    assert_eq!(
        status_with(&app, FILE_TRACK_TOKEN, &after, "stu-after").await?,
        "pending_deletion"
    );
    assert_eq!(
        status_with(&app, FILE_TRACK_TOKEN, &before, "stu-before").await?,
        "allocated"
    );
    app.stop().await;
    Ok(())
}
