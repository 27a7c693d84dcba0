//! Reservations and capacity answers over real HTTP, on both stores (docs/reservations.md,
//! ADR 0028): creation honoured or refused with the numbers, earmarks that serve only their
//! track, cancel and the window's end returning unused earmarks, the job earmarking a lead time
//! ahead, capacity answers with known numbers, the write flag, and a burst of mixed tracks in
//! which no earmarked sandbox goes to another track and the reserved track is never refused.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

both_stores!(
    creation_is_refused_while_the_flag_is_off,
    bad_requests_are_refused_with_the_field_named,
    earmarks_serve_only_their_track,
    a_window_the_pool_cannot_honour_is_refused_with_the_numbers,
    cancel_returns_unused_earmarks_to_the_pool,
    the_window_end_frees_earmarks_before_and_after_the_job,
    the_job_earmarks_a_lead_time_ahead_and_tops_up,
    capacity_answers_add_up,
    overflow_policy_decides_what_follows_a_used_up_reservation,
);

/// A service with reservations written (or not).
async fn app_with(backend: Backend, write: bool) -> TestApp {
    let mut options = AppOptions::new(backend);
    options.jobs.reservations.write_events_reservations = write;
    spawn_app_with(options).await
}

fn at(app: &TestApp, minutes: i64) -> String {
    let t: DateTime<Utc> = app.clock_now() + chrono::Duration::minutes(minutes);
    t.to_rfc3339()
}

trait Now {
    fn clock_now(&self) -> DateTime<Utc>;
}

impl Now for TestApp {
    fn clock_now(&self) -> DateTime<Utc> {
        use domain::Clock;
        self.clock.now()
    }
}

async fn reserve(app: &TestApp, body: Value) -> (StatusCode, Value) {
    let (status, _, body) = app
        .admin(Method::POST, "/v1/admin/reservations")
        .json(&body)
        .sent_json()
        .await;
    (status, body)
}

/// One allocation by `caller` of `track`: the status and the sandbox id (if any).
async fn allocate(app: &TestApp, caller: &str, track: &str) -> (StatusCode, Option<String>) {
    let (status, _, body) = app
        .allocate(caller)
        .header("X-Instruqt-Track-ID", track)
        .sent_json()
        .await;
    let id = body["sandbox_id"].as_str().map(str::to_string);
    (status, id)
}

/// The reservation as the API shows it, once `done` holds (bounded: the view catches up).
async fn reservation_when(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = app.get_json(&format!("/v1/admin/reservations/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if done(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reservation did not reach the expected state: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One figure of an `INSUFFICIENT_CAPACITY` refusal's details.
fn figure(body: &Value, field: &str) -> String {
    body["detail"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["location"] == "capacity" && d["field"] == field)
        .and_then(|d| d["problem"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The sandboxes earmarked for a reservation, from its stream.
async fn earmarked(app: &TestApp, id: &str) -> BTreeSet<String> {
    app.state
        .broker
        .load_reservation(id)
        .await
        .map(|r| r.earmarked)
        .unwrap_or_default()
}

/// With `WRITE_EVENTS_RESERVATIONS` off, creating or cancelling is refused with a message that
/// names the flag, and nothing is written.
async fn creation_is_refused_while_the_flag_is_off(backend: Backend) -> TestResult {
    let app = app_with(backend, false).await;
    app.seed("lab", 3).await;
    let (status, body) = reserve(
        &app,
        json!({"track": "ws", "count": 2, "starts_at": at(&app, 10), "ends_at": at(&app, 120)}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "RESERVATIONS_DISABLED");
    let message = body["detail"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("WRITE_EVENTS_RESERVATIONS"), "{message}");
    let (status, _, body) = app
        .admin(Method::DELETE, "/v1/admin/reservations/nope")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _, list) = app.get_json("/v1/admin/reservations").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["count"], 0);
    app.stop().await;
    Ok(())
}

/// Absurd or malformed requests are 400 `VALIDATION_ERROR` naming the field.
async fn bad_requests_are_refused_with_the_field_named(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 3).await;
    let cases = [
        (
            json!({"track": "ws", "count": 1, "starts_at": at(&app, -120), "ends_at": at(&app, -60)}),
            "ends_at",
        ),
        (
            json!({"track": "ws", "count": 1, "starts_at": at(&app, 60), "ends_at": at(&app, 30)}),
            "ends_at",
        ),
        (
            json!({"track": "ws", "count": 0, "starts_at": at(&app, 10), "ends_at": at(&app, 60)}),
            "count",
        ),
        (
            json!({"track": "ws", "count": 1_000_000, "starts_at": at(&app, 10), "ends_at": at(&app, 60)}),
            "count",
        ),
        (
            json!({"track": "ws", "count": 1, "starts_at": at(&app, 10), "ends_at": at(&app, 60 * 24 * 10)}),
            "ends_at",
        ),
        (
            json!({"track": "ws", "count": 1, "prefix": "nosuch", "starts_at": at(&app, 10), "ends_at": at(&app, 60)}),
            "prefix",
        ),
        (
            json!({"track": "ws", "count": 1, "overflow": "sometimes", "starts_at": at(&app, 10), "ends_at": at(&app, 60)}),
            "overflow",
        ),
        (
            json!({"track": " ", "count": 1, "starts_at": at(&app, 10), "ends_at": at(&app, 60)}),
            "track",
        ),
        (
            json!({"track": "ws", "count": 1, "starts_at": "tomorrow", "ends_at": at(&app, 60)}),
            "starts_at",
        ),
    ];
    for (body, field) in cases {
        let (status, reply) = reserve(&app, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {reply}");
        assert_eq!(reply["detail"]["code"], "VALIDATION_ERROR", "{reply}");
        assert_eq!(
            reply["detail"]["details"][0]["field"], field,
            "{body} → {reply}"
        );
    }
    let (status, _, reply) = app
        .admin(Method::POST, "/v1/admin/reservations")
        .header("content-type", "application/json")
        .body("{not json")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    let (status, _, reply) = app.get_json("/v1/admin/reservations/nosuch").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert_eq!(reply["detail"]["code"], "RESERVATION_NOT_FOUND");
    let (status, _, _) = app
        .track(Method::GET, "/v1/admin/reservations")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    app.stop().await;
    Ok(())
}

/// A reservation inside its lead time is earmarked at once; other tracks are served only from
/// the open pool (and refused once it is empty, though earmarks are free), the reserved track
/// draws exactly its earmarks, and the numbers follow.
async fn earmarks_serve_only_their_track(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 10).await;
    let (status, created) = reserve(
        &app,
        json!({"track": "ws", "count": 4, "starts_at": at(&app, 10), "ends_at": at(&app, 120)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["guaranteed"], true);
    assert_eq!(created["reservation"]["earmarked"], 4);
    assert_eq!(created["reservation"]["state"], "earmarking");
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let reserved = earmarked(&app, &id).await;
    assert_eq!(reserved.len(), 4);
    reservation_when(&app, &id, |r| r["free"] == 4).await;

    for i in 0..6 {
        let (status, sandbox) = allocate(&app, &format!("other-{i}"), "other").await;
        assert_eq!(status, StatusCode::CREATED);
        let sandbox = sandbox.unwrap_or_default();
        assert!(!reserved.contains(&sandbox), "{sandbox} is earmarked");
    }
    let (status, _) = allocate(&app, "other-6", "other").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "earmarked sandboxes went to another track"
    );
    let (status, _, _) = app.allocate("no-track").sent_json().await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a request without a track got an earmark"
    );

    let mut taken = BTreeSet::new();
    for i in 0..4 {
        let (status, sandbox) = allocate(&app, &format!("ws-{i}"), "ws").await;
        assert_eq!(status, StatusCode::CREATED);
        taken.insert(sandbox.unwrap_or_default());
    }
    assert_eq!(taken, reserved);
    let (status, _) = allocate(&app, "ws-4", "ws").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let shown = reservation_when(&app, &id, |r| r["used"] == 4).await;
    assert_eq!(
        (shown["free"].as_u64(), shown["shortfall"].as_u64()),
        (Some(0), Some(0))
    );

    let (_, _, stats) = app.get_json("/v1/admin/stats").await;
    let listed = stats["reservations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(listed
        .iter()
        .any(|r| r["reservation_id"] == id.as_str() && r["used"] == 4));
    app.stop().await;
    Ok(())
}

/// A window the pool cannot honour is 409 `INSUFFICIENT_CAPACITY` with the shortfall and the
/// numbers; what another overlapping reservation holds is not counted twice.
async fn a_window_the_pool_cannot_honour_is_refused_with_the_numbers(
    backend: Backend,
) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 5).await;
    let (status, body) = reserve(
        &app,
        json!({"track": "ws", "count": 6, "starts_at": at(&app, 10), "ends_at": at(&app, 120)}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["detail"]["code"], "INSUFFICIENT_CAPACITY");
    assert_eq!(figure(&body, "shortfall"), "1", "{body}");
    assert_eq!(figure(&body, "available_now"), "5", "{body}");
    assert_eq!(figure(&body, "count"), "6", "{body}");

    let (status, body) = reserve(
        &app,
        json!({"track": "ws", "count": 3, "starts_at": at(&app, 10), "ends_at": at(&app, 120)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = reserve(
        &app,
        json!({"track": "conf", "count": 3, "starts_at": at(&app, 30), "ends_at": at(&app, 90)}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(figure(&body, "shortfall"), "1", "{body}");
    assert_eq!(figure(&body, "available_now"), "2", "{body}");
    let (status, body) = reserve(
        &app,
        json!({"track": "conf", "count": 2, "starts_at": at(&app, 30), "ends_at": at(&app, 90)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The pool is all earmarked now; a second reservation of the same track needs sandboxes
    // of its own and cannot count the first one's.
    let (status, body) = reserve(
        &app,
        json!({"track": "ws", "count": 1, "starts_at": at(&app, 20), "ends_at": at(&app, 60)}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(figure(&body, "available_now"), "0", "{body}");
    app.stop().await;
    Ok(())
}

/// Cancelling lifts the unused earmarks at once: another track is served again; the used ones
/// stay with their students.
async fn cancel_returns_unused_earmarks_to_the_pool(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 4).await;
    let (_, created) = reserve(
        &app,
        json!({"track": "ws", "count": 4, "starts_at": at(&app, 5), "ends_at": at(&app, 120)}),
    )
    .await;
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    reservation_when(&app, &id, |r| r["free"] == 4).await;
    let (status, _) = allocate(&app, "ws-0", "ws").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = allocate(&app, "other-0", "other").await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, _, cancelled) = app
        .admin(Method::DELETE, &format!("/v1/admin/reservations/{id}"))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    let mut served = 0;
    for i in 0..3 {
        // The view shows the lifted earmarks once the projector applied them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = allocate(&app, &format!("other-{}", i + 1), "other").await;
            if status == StatusCode::CREATED {
                served += 1;
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "earmark not lifted");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert_eq!(served, 3);
    let (_, _, list) = app.get_json("/v1/admin/reservations?state=cancelled").await;
    assert_eq!(list["count"], 1);
    let (_, _, list) = app.get_json("/v1/admin/reservations?state=active").await;
    assert_eq!(list["count"], 0);
    app.stop().await;
    Ok(())
}

/// Past the window's end an earmark binds nobody, before the job runs; the job then closes the
/// reservation (`ended`) and lifts what was not used.
async fn the_window_end_frees_earmarks_before_and_after_the_job(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 3).await;
    let (_, created) = reserve(
        &app,
        json!({"track": "ws", "count": 3, "starts_at": at(&app, 0), "ends_at": at(&app, 60)}),
    )
    .await;
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    reservation_when(&app, &id, |r| r["free"] == 3).await;
    let (status, _) = allocate(&app, "other-0", "other").await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.clock.advance(chrono::Duration::minutes(61));
    let (status, _) = allocate(&app, "other-1", "other").await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "an ended window still bound the sandbox"
    );
    let summary = app.state.jobs.reservations().await?;
    assert_eq!((summary.ended, summary.returned), (1, 2));
    let shown = reservation_when(&app, &id, |r| r["state"] == "ended").await;
    assert_eq!(shown["shortfall"], 0);
    app.stop().await;
    Ok(())
}

/// A reservation ahead of its lead time is only scheduled; the job earmarks it once the lead
/// time begins, and tops it up when an earmarked sandbox is lost before use.
async fn the_job_earmarks_a_lead_time_ahead_and_tops_up(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 5).await;
    let (status, created) = reserve(
        &app,
        json!({"track": "ws", "count": 2, "starts_at": at(&app, 180), "ends_at": at(&app, 240)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["reservation"]["state"], "scheduled");
    assert_eq!(created["reservation"]["earmarked"], 0);
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(app.state.jobs.reservations().await?.earmarked, 0);

    app.clock.advance(chrono::Duration::minutes(121));
    assert_eq!(app.state.jobs.reservations().await?.earmarked, 2);
    reservation_when(&app, &id, |r| r["free"] == 2 && r["state"] == "earmarking").await;

    // One earmarked sandbox is retired before use: the next run tops the reservation up.
    let lost = earmarked(&app, &id)
        .await
        .into_iter()
        .next()
        .unwrap_or_default();
    app.state
        .broker
        .execute(
            &lost,
            domain::model::sandbox::SandboxCommand::Retire {
                reason: "test".into(),
            },
            &domain::CommandMeta::job("test", "test"),
        )
        .await?;
    reservation_when(&app, &id, |r| r["lost"] == 1).await;
    assert_eq!(app.state.jobs.reservations().await?.earmarked, 1);
    let shown = reservation_when(&app, &id, |r| r["free"] == 2).await;
    assert_eq!(shown["lost"], 1);
    assert_eq!(earmarked(&app, &id).await.len(), 3);
    app.stop().await;
    Ok(())
}

/// Capacity answers carry the numbers: what is free, what is earmarked for the track and for
/// others, and the forecast from the last hour's allocations; a track credential cannot ask
/// about another track, the shared token and the admin token can.
async fn capacity_answers_add_up(backend: Backend) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 10).await;
    let (_, created) = reserve(
        &app,
        json!({"track": "ws", "count": 3, "starts_at": at(&app, 0), "ends_at": at(&app, 240)}),
    )
    .await;
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    reservation_when(&app, &id, |r| r["free"] == 3).await;
    for i in 0..2 {
        let (status, _) = allocate(&app, &format!("other-{i}"), "other").await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let (status, _, answer) = app
            .admin(Method::GET, "/v1/capacity?track=other&count=5")
            .sent_json()
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        if answer["numbers"]["available_now"] == 5 {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let n = &answer["numbers"];
    assert_eq!(n["reserved_for_track"], 0);
    assert_eq!(n["reserved_for_others"], 0);
    assert_eq!(n["guaranteed"], 5);
    assert_eq!(answer["can_start_guaranteed"], true);

    let (_, _, answer) = app
        .admin(Method::GET, "/v1/capacity?track=ws&count=9")
        .sent_json()
        .await;
    assert_eq!(answer["numbers"]["reserved_for_track"], 3);
    assert_eq!(answer["numbers"]["guaranteed"], 8);
    assert_eq!(answer["numbers"]["shortfall_now"], 1);
    assert_eq!(answer["can_start_guaranteed"], false);

    // An hour ahead: the two allocations of the last hour are expected again from the open
    // pool; the track's own earmarks are untouched; no registrations are on record.
    let later = at(&app, 60);
    let (status, _, answer) = app
        .track(Method::GET, "/v1/capacity")
        .query(&[("track", "other"), ("count", "4"), ("at", later.as_str())])
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let n = &answer["numbers"];
    assert_eq!(n["expected_allocations"], 2);
    assert_eq!(n["expected_registrations"], 0);
    assert_eq!(n["forecast"], 3);
    assert_eq!(answer["can_start_forecast"], false);
    assert_eq!(answer["runs_dry"]["allocations_per_hour"], 2.0);
    assert!(answer["runs_dry"]["runs_dry_at"].is_string(), "{answer}");

    let (status, _, reply) = app
        .admin(Method::GET, "/v1/capacity?count=0")
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    let (status, _, _) = app
        .client
        .get(format!("{}/v1/capacity", app.url))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.stop().await;
    Ok(())
}

/// Once its earmarks are used, a `reservation_only` track is refused during its window though
/// open sandboxes remain; an `open_pool` track goes on to them.
async fn overflow_policy_decides_what_follows_a_used_up_reservation(
    backend: Backend,
) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", 6).await;
    for (track, overflow) in [("strict", "reservation_only"), ("loose", "open_pool")] {
        let (status, created) = reserve(
            &app,
            json!({"track": track, "count": 1, "overflow": overflow,
                   "starts_at": at(&app, 0), "ends_at": at(&app, 120)}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["reservation"]["overflow"], overflow);
    }
    let (status, _) = allocate(&app, "strict-0", "strict").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = allocate(&app, "strict-1", "strict").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "reservation_only overflowed to the open pool"
    );
    for i in 0..2 {
        let (status, _) = allocate(&app, &format!("loose-{i}"), "loose").await;
        assert_eq!(status, StatusCode::CREATED);
    }
    app.stop().await;
    Ok(())
}

/// What each student of a burst got.
struct Burst {
    granted: HashMap<String, (String, String)>,
    refused: HashMap<String, u32>,
}

async fn burst(app: &TestApp, students: Vec<(String, String)>, concurrency: usize) -> Burst {
    let replies: Vec<(String, String, StatusCode, Option<String>)> =
        futures::stream::iter(students)
            .map(|(caller, track)| async move {
                let (status, id) = allocate(app, &caller, &track).await;
                (caller, track, status, id)
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
    let mut granted = HashMap::new();
    let mut refused: HashMap<String, u32> = HashMap::new();
    for (caller, track, status, id) in replies {
        match (status, id) {
            (StatusCode::CREATED, Some(id)) => {
                granted.insert(caller, (track, id));
            }
            (status, _) => {
                assert_eq!(status, StatusCode::CONFLICT, "{caller} of {track}");
                *refused.entry(track).or_default() += 1;
            }
        }
    }
    Burst { granted, refused }
}

/// A burst of mixed tracks against a pool with a reservation: every reserved-track student is
/// served from the reservation, no earmarked sandbox goes to another track, no sandbox is
/// handed out twice, and other tracks get exactly the open pool.
async fn burst_keeps_earmarks_for_their_track(
    backend: Backend,
    pool: usize,
    reserved: usize,
    others: usize,
) -> TestResult {
    let app = app_with(backend, true).await;
    app.seed("lab", pool).await;
    let (status, created) = reserve(
        &app,
        json!({"track": "ws", "count": reserved, "starts_at": at(&app, 0), "ends_at": at(&app, 240)}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["reservation"]["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let earmarks = earmarked(&app, &id).await;
    assert_eq!(earmarks.len(), reserved);
    // Earmarks are enforced on the sandbox streams at once; waiting for the view only keeps the
    // other tracks' candidate pages free of them, so that their refusals are counted exactly.
    reservation_when(&app, &id, |r| r["free"] == reserved).await;

    let mut students: Vec<(String, String)> = (0..reserved)
        .map(|i| (format!("ws-{i}"), "ws".to_string()))
        .chain((0..others).map(|i| (format!("o-{i}"), format!("track-{}", i % 3))))
        .collect();
    // Interleave the tracks deterministically (every 4th student of the reserved track).
    students.sort_by_key(|(caller, _)| {
        let n: usize = caller
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (n, caller.starts_with("ws"))
    });
    let outcome = burst(&app, students, 64).await;

    let mut handed: BTreeSet<&str> = BTreeSet::new();
    for (caller, (track, sandbox)) in &outcome.granted {
        assert!(
            handed.insert(sandbox.as_str()),
            "{sandbox} handed out twice"
        );
        if track == "ws" {
            assert!(
                earmarks.contains(sandbox),
                "{caller} of ws got {sandbox} from the open pool"
            );
        } else {
            assert!(
                !earmarks.contains(sandbox),
                "{caller} of {track} got earmarked {sandbox}"
            );
        }
    }
    assert_eq!(
        outcome.refused.get("ws"),
        None,
        "the reserved track was refused"
    );
    // The log agrees: every earmarked sandbox's stream holds an allocation to the reserved
    // track, or none at all.
    for sandbox_id in &earmarks {
        let loaded = app.state.broker.load_sandbox(sandbox_id).await?;
        if loaded.sandbox.allocated_at.is_some() {
            assert_eq!(
                loaded.sandbox.track_name.as_deref(),
                Some("ws"),
                "{sandbox_id}"
            );
        }
    }
    let open = pool - reserved;
    let others_served = outcome.granted.values().filter(|(t, _)| t != "ws").count();
    assert_eq!(others_served, open.min(others));
    let others_refused: u32 = outcome.refused.values().sum();
    assert_eq!(others_refused as usize, others.saturating_sub(open));
    app.stop().await;
    Ok(())
}

/// Embedded store: 1,000 students of four tracks against 900 sandboxes, 300 reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_burst_of_1000_keeps_earmarks_for_their_track() -> TestResult {
    burst_keeps_earmarks_for_their_track(Backend::Embedded, 900, 300, 700).await
}

/// DynamoDB Local: 250 students of four tracks against 200 sandboxes, 100 reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_burst_of_250_keeps_earmarks_for_their_track() -> TestResult {
    let _turn = tests::ddb_local::heavy_load().await;
    burst_keeps_earmarks_for_their_track(Backend::Dynamo, 200, 100, 150).await
}
