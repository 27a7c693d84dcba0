//! A fake CSP API over real HTTP (axum on 127.0.0.1, port 0) whose behaviour a test scripts:
//! the account list and its paging, and faults — HTTP errors, `429 Retry-After`, delays beyond
//! the client's read timeout, malformed JSON, oversized bodies, redirects, trickled bodies,
//! per-account or rate-based delete failures. It
//! records every request, so tests can count the DELETEs each account received.
//!
//! It serves the two routes the jobs use, under `/v2` like the real base URL:
//! `GET /v2/current_user/accounts?_offset&_limit` → `{"results": [...]}` and
//! `DELETE /v2/sandbox/accounts/{uuid}` → 204 (removed) or 404 (no such account).
//! Both require `Authorization: Token <token>`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// The token the fake accepts unless told otherwise.
pub const FAKE_TOKEN: &str = "fake-csp-token";

/// A scripted misbehaviour for one response.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status (and a short text body).
    Status(u16),
    /// `429 Too Many Requests` with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// Wait this long, then answer normally (beyond the client's read timeout = a timeout).
    Delay(Duration),
    /// This status with an HTML error page as the body (what a load balancer in front of CSP
    /// answers during an incident).
    Html(u16),
    /// `200` with a body that is not JSON.
    MalformedJson,
    /// `200` with a JSON body of about this many bytes (for body-size caps).
    HugeBody(usize),
    /// `302 Found` to this URL.
    Redirect(String),
    /// `200` whose body arrives one byte every `Duration`, this many times: each read is quick,
    /// the whole exchange is not (for total-time limits).
    Trickle(Duration, u32),
}

/// One account as CSP lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeAccount {
    /// CSP `id`: `identity/accounts/<uuid>`.
    pub id: String,
    /// CSP `csp_id` (a number, a string, or null).
    pub csp_id: Value,
    /// `name`, if any.
    pub name: Option<String>,
    /// `account_type` (`sandbox` for the ones the broker keeps).
    pub account_type: String,
    /// `state` (`active` for the ones the broker keeps).
    pub state: String,
    /// `created_at`.
    pub created_at: Value,
    /// `sfdc_account_id`.
    pub sfdc_account_id: Value,
}

impl FakeAccount {
    /// Active sandbox number `n`: `csp_id` 1000+n, name `lab-NNN`.
    pub fn sandbox(n: u32) -> Self {
        Self {
            id: format!("identity/accounts/00000000-0000-4000-8000-{n:012}"),
            csp_id: json!(1000 + n),
            name: Some(format!("lab-{n:03}")),
            account_type: "sandbox".into(),
            state: "active".into(),
            created_at: json!("2025-11-18T16:00:00Z"),
            sfdc_account_id: json!(""),
        }
    }

    /// The same account with another name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The broker id sync derives: `csp_id`, else `id`.
    pub fn sandbox_id(&self) -> String {
        match &self.csp_id {
            Value::Number(n) => n.to_string(),
            Value::String(s) if !s.is_empty() => s.clone(),
            _ => self.id.clone(),
        }
    }

    /// The uuid a DELETE names.
    pub fn uuid(&self) -> String {
        last_segment(&self.id).to_string()
    }

    /// The JSON item of `results[]`.
    pub fn to_json(&self) -> Value {
        let mut item = json!({
            "id": self.id,
            "csp_id": self.csp_id,
            "account_type": self.account_type,
            "state": self.state,
            "created_at": self.created_at,
            "sfdc_account_id": self.sfdc_account_id,
        });
        if let (Some(name), Some(map)) = (&self.name, item.as_object_mut()) {
            map.insert("name".into(), json!(name));
        }
        item
    }
}

fn last_segment(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// `GET` or `DELETE`.
    pub method: String,
    /// The path, e.g. `/v2/sandbox/accounts/<uuid>`.
    pub path: String,
    /// `_offset` of a list request.
    pub offset: Option<u64>,
    /// `_limit` of a list request.
    pub limit: Option<u64>,
    /// The `Authorization` header as sent.
    pub authorization: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// Rate-based delete failures: each DELETE fails (HTTP 500) with probability `rate`, drawn from
/// a seeded generator (deterministic per account and call), but no account fails more than
/// `max_streak` times in a row — "transient" made precise, so a test can promise that a retry
/// budget of `max_streak + 1` always suffices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRate {
    /// Probability of a failure per DELETE.
    pub rate: f64,
    /// Seed of the generator.
    pub seed: u64,
    /// Longest run of failures per account.
    pub max_streak: u32,
}

#[derive(Debug)]
struct FakeState {
    token: String,
    accounts: Vec<Value>,
    page_cap: Option<usize>,
    ignore_offset: bool,
    list_queue: VecDeque<Fault>,
    list_at_offset: HashMap<u64, Fault>,
    delete_queue: VecDeque<Fault>,
    delete_all: Option<Fault>,
    delete_of: HashMap<String, Fault>,
    delete_rate: Option<FailureRate>,
    delete_calls: HashMap<String, u32>,
    delete_failures: HashMap<String, u32>,
    streaks: HashMap<String, u32>,
    requests: Vec<RecordedRequest>,
}

type Shared = Arc<(Mutex<FakeState>, Notify, tokio::sync::watch::Sender<bool>)>;

/// The running fake; stops when dropped.
pub struct FakeCsp {
    base_url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCsp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeCsp {
    /// Starts an empty fake on 127.0.0.1, port 0, accepting [`FAKE_TOKEN`].
    pub async fn start() -> Self {
        let shared: Shared = Arc::new((
            Mutex::new(FakeState {
                token: FAKE_TOKEN.into(),
                accounts: Vec::new(),
                page_cap: None,
                ignore_offset: false,
                list_queue: VecDeque::new(),
                list_at_offset: HashMap::new(),
                delete_queue: VecDeque::new(),
                delete_all: None,
                delete_of: HashMap::new(),
                delete_rate: None,
                delete_calls: HashMap::new(),
                delete_failures: HashMap::new(),
                streaks: HashMap::new(),
                requests: Vec::new(),
            }),
            Notify::new(),
            tokio::sync::watch::Sender::new(false),
        ));
        let app = Router::new()
            .route("/v2/current_user/accounts", get(list_accounts))
            .route("/v2/sandbox/accounts/{uuid}", delete(delete_account))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake CSP on a loopback port");
        let addr = listener
            .local_addr()
            .expect("local address of the fake CSP");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://{addr}/v2"),
            shared,
            server,
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.shared)
    }

    /// `CSP_BASE_URL` for the client: `http://127.0.0.1:<port>/v2`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The token the fake accepts.
    pub fn token(&self) -> String {
        self.state().token.clone()
    }

    /// Replaces the account list.
    pub fn set_accounts(&self, accounts: impl IntoIterator<Item = FakeAccount>) {
        self.state().accounts = accounts.into_iter().map(|a| a.to_json()).collect();
    }

    /// Appends an account.
    pub fn add_account(&self, account: &FakeAccount) {
        self.state().accounts.push(account.to_json());
    }

    /// Appends a raw `results[]` item (odd shapes, other account types).
    pub fn add_raw(&self, item: Value) {
        self.state().accounts.push(item);
    }

    /// Removes an account from the list (as if CSP deleted it behind the broker's back).
    pub fn remove_account(&self, account: &FakeAccount) {
        self.state()
            .accounts
            .retain(|a| a.get("id").and_then(Value::as_str) != Some(account.id.as_str()));
    }

    /// Accounts listed right now.
    pub fn account_count(&self) -> usize {
        self.state().accounts.len()
    }

    /// Serves at most `cap` items per page whatever `_limit` says.
    pub fn set_page_cap(&self, cap: Option<usize>) {
        self.state().page_cap = cap;
    }

    /// Ignores `_offset` (every page is the first: a listing that never ends).
    pub fn set_ignore_offset(&self, ignore: bool) {
        self.state().ignore_offset = ignore;
    }

    /// Holds every list request (after recording it) until [`FakeCsp::resume_lists`]: lets a
    /// test act while a listing is provably in flight, without timing assumptions.
    pub fn pause_lists(&self) {
        self.shared.2.send_replace(true);
    }

    /// Releases held list requests.
    pub fn resume_lists(&self) {
        self.shared.2.send_replace(false);
    }

    /// Faults for the next list requests, one each, in order.
    pub fn queue_list_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().list_queue.extend(faults);
    }

    /// A fault for every list request at `offset`, until cleared.
    pub fn fail_list_at_offset(&self, offset: u64, fault: Fault) {
        self.state().list_at_offset.insert(offset, fault);
    }

    /// Faults for the next DELETE requests, one each, in order.
    pub fn queue_delete_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().delete_queue.extend(faults);
    }

    /// A fault for every DELETE, until cleared.
    pub fn fail_all_deletes(&self, fault: Fault) {
        self.state().delete_all = Some(fault);
    }

    /// A fault for every DELETE of one account, until cleared.
    pub fn fail_deletes_of(&self, account: &FakeAccount, fault: Fault) {
        self.state().delete_of.insert(account.uuid(), fault);
    }

    /// Rate-based transient DELETE failures (see [`FailureRate`]).
    pub fn set_delete_failure_rate(&self, rate: Option<FailureRate>) {
        self.state().delete_rate = rate;
    }

    /// Removes every scripted fault and paging quirk (recorded requests are kept).
    pub fn clear_faults(&self) {
        let mut s = self.state();
        s.page_cap = None;
        s.ignore_offset = false;
        s.list_queue.clear();
        s.list_at_offset.clear();
        s.delete_queue.clear();
        s.delete_all = None;
        s.delete_of.clear();
        s.delete_rate = None;
    }

    /// DELETE requests received for one account.
    pub fn delete_calls(&self, account: &FakeAccount) -> u32 {
        self.state()
            .delete_calls
            .get(&account.uuid())
            .copied()
            .unwrap_or(0)
    }

    /// DELETE requests received in total.
    pub fn total_delete_calls(&self) -> u32 {
        self.state().delete_calls.values().sum()
    }

    /// DELETE requests answered with an injected failure, in total.
    pub fn total_delete_failures(&self) -> u32 {
        self.state().delete_failures.values().sum()
    }

    /// DELETE requests per account uuid.
    pub fn delete_counts(&self) -> HashMap<String, u32> {
        self.state().delete_calls.clone()
    }

    /// List requests received.
    pub fn list_calls(&self) -> usize {
        self.requests().iter().filter(|r| r.method == "GET").count()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Resolves once at least `n` requests have arrived (no polling, no sleeping).
    pub async fn wait_for_requests(&self, n: usize) {
        self.wait_until(|s| s.requests.len() >= n).await;
    }

    /// Resolves once at least `n` DELETE requests have arrived.
    pub async fn wait_for_deletes(&self, n: u32) {
        self.wait_until(|s| s.delete_calls.values().sum::<u32>() >= n)
            .await;
    }

    async fn wait_until(&self, done: impl Fn(&FakeState) -> bool) {
        loop {
            let notified = self.shared.1.notified();
            tokio::pin!(notified);
            // Register before checking, so a request between the check and the wait wakes us.
            notified.as_mut().enable();
            if done(&self.state()) {
                return;
            }
            notified.await;
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, FakeState> {
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

fn record(shared: &Shared, method: &str, path: String, headers: &HeaderMap, q: Option<(u64, u64)>) {
    let mut s = lock(shared);
    s.requests.push(RecordedRequest {
        method: method.into(),
        path,
        offset: q.map(|(o, _)| o),
        limit: q.map(|(_, l)| l),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        at: Instant::now(),
    });
    drop(s);
    shared.1.notify_waiters();
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let expected = format!("Token {}", lock(shared).token);
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

/// Applies a fault: `Some(response)` to answer with, `None` to carry on normally (after a delay).
async fn apply(fault: Option<Fault>) -> Option<Response> {
    match fault? {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((status, format!("injected failure {code}")).into_response())
        }
        Fault::Html(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let page = format!(
                "<!DOCTYPE html><html><head><title>{code} Internal Server Error</title></head>\
                 <body><h1>{code}</h1><p>The server encountered an error.</p></body></html>"
            );
            Some((status, [("content-type", "text/html")], page).into_response())
        }
        Fault::RetryAfter(secs) => Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string())],
                "slow down",
            )
                .into_response(),
        ),
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Fault::MalformedJson => Some(
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"results\": [{\"id\": ",
            )
                .into_response(),
        ),
        Fault::HugeBody(bytes) => Some(
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                format!("{{\"results\": [], \"pad\": \"{}\"}}", "x".repeat(bytes)),
            )
                .into_response(),
        ),
        Fault::Redirect(to) => {
            Some((StatusCode::FOUND, [("location", to)], "elsewhere").into_response())
        }
        Fault::Trickle(every, count) => {
            let bytes = futures::stream::unfold(0u32, move |sent| async move {
                if sent >= count {
                    return None;
                }
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(vec![b' ']), sent + 1))
            });
            Some(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from_stream(bytes))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
            )
        }
    }
}

async fn list_accounts(
    State(shared): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let offset = q
        .get("_offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    let limit = q
        .get("_limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100u64);
    record(
        &shared,
        "GET",
        "/v2/current_user/accounts".into(),
        &headers,
        Some((offset, limit)),
    );
    if !authorized(&shared, &headers) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let mut paused = shared.2.subscribe();
    // The sender lives in `shared`, which this handler holds: the channel cannot close here.
    let _ = paused.wait_for(|p| !*p).await;
    let fault = {
        let mut s = lock(&shared);
        s.list_queue
            .pop_front()
            .or_else(|| s.list_at_offset.get(&offset).cloned())
    };
    if let Some(response) = apply(fault).await {
        return response;
    }
    let s = lock(&shared);
    let start = if s.ignore_offset { 0 } else { offset as usize };
    let take = s
        .page_cap
        .map_or(limit as usize, |cap| cap.min(limit as usize));
    let results: Vec<Value> = s.accounts.iter().skip(start).take(take).cloned().collect();
    axum::Json(json!({ "results": results })).into_response()
}

async fn delete_account(
    State(shared): State<Shared>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Response {
    record(
        &shared,
        "DELETE",
        format!("/v2/sandbox/accounts/{uuid}"),
        &headers,
        None,
    );
    if !authorized(&shared, &headers) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let fault = {
        let mut s = lock(&shared);
        let call = {
            let calls = s.delete_calls.entry(uuid.clone()).or_insert(0);
            *calls += 1;
            *calls
        };
        let fault = s
            .delete_queue
            .pop_front()
            .or_else(|| s.delete_all.clone())
            .or_else(|| s.delete_of.get(&uuid).cloned())
            .or_else(|| {
                let rate = s.delete_rate?;
                let streak = s.streaks.get(&uuid).copied().unwrap_or(0);
                let fails = streak < rate.max_streak && draw(rate.seed, &uuid, call) < rate.rate;
                fails.then_some(Fault::Status(500))
            });
        shared.1.notify_waiters();
        let failing = matches!(
            fault,
            Some(Fault::Status(_) | Fault::Html(_) | Fault::MalformedJson)
        );
        if failing {
            *s.streaks.entry(uuid.clone()).or_insert(0) += 1;
            *s.delete_failures.entry(uuid.clone()).or_insert(0) += 1;
        } else if !matches!(fault, Some(Fault::RetryAfter(_))) {
            s.streaks.insert(uuid.clone(), 0);
        }
        fault
    };
    if let Some(response) = apply(fault).await {
        return response;
    }
    let mut s = lock(&shared);
    let before = s.accounts.len();
    s.accounts
        .retain(|a| a.get("id").and_then(Value::as_str).map(last_segment) != Some(uuid.as_str()));
    if s.accounts.len() < before {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, "no such account").into_response()
    }
}

/// A deterministic number in [0, 1) for (seed, account, call): SplitMix64 over an FNV-1a hash,
/// stable across Rust versions (unlike `DefaultHasher`).
fn draw(seed: u64, uuid: &str, call: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uuid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = seed ^ h ^ u64::from(call).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
