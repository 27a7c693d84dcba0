//! Starts the real service on 127.0.0.1 port 0 (real HTTP, the real router and middleware), over
//! either store adapter, with a manual clock and the in-process projector.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use command_api::config::{Config, StoreKind};
use command_api::startup::{self, Service};
use command_api::state::SharedState;
use domain::model::sandbox::SandboxCommand;
use domain::{Actor, CommandMeta, ManualClock, PoolStats};
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

/// Track token of test apps.
pub const TRACK_TOKEN: &str = "test-track-token-0123456789abcdefghij";
/// Admin token of test apps.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdefghij";

/// Which store a test app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh embedded SQLite file in the temp dir.
    Embedded,
    /// Fresh tables on DynamoDB Local (started on demand).
    Dynamo,
}

/// A running test service.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// A client with sane timeouts.
    pub client: reqwest::Client,
    /// The clock the service reads.
    pub clock: ManualClock,
    /// Handler state (broker, view, jobs).
    pub state: SharedState,
    /// The backend in use.
    pub backend: Backend,
    service: Option<Service>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// Options for [`spawn_app_with`].
pub struct AppOptions {
    /// Backend.
    pub backend: Backend,
    /// Rate limit (rps, burst).
    pub rate_limit: (f64, f64),
    /// Applies further settings to the config.
    pub configure: Box<dyn FnOnce(&mut Config) + Send>,
    /// Job settings (default: the mock CSP; tests point them at the fake CSP).
    pub jobs: jobs::JobsConfig,
}

impl AppOptions {
    /// Defaults for `backend`: generous rate limit, no demo seed, no job loops.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            rate_limit: (100_000.0, 100_000.0),
            configure: Box::new(|_| {}),
            jobs: test_jobs_config(),
        }
    }
}

/// A service on `backend` with default test options.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(AppOptions::new(backend)).await
}

/// A service with explicit options.
pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let mut config = Config::defaults();
    config.api_token = Some(TRACK_TOKEN.into());
    config.admin_token = Some(ADMIN_TOKEN.into());
    config.seed_demo_pool = false;
    config.run_jobs = Some(false);
    config.run_projector = Some(true);
    config.log.log_format = Some(runtime::LogFormat::Text);
    config.rate_limit_rps = options.rate_limit.0;
    config.rate_limit_burst = options.rate_limit.1;
    // Tests read `/metrics` right after changing the pool; the cache has its own test
    // (`metrics_endpoint::scrapes_cost_no_store_requests`).
    config.metrics_cache_ms = 0;
    // Every test client connects from 127.0.0.1, so the per-address connection cap would count
    // a 500-request concurrency test as one client over its share; the tests of the cap set it
    // (`connections::connections_per_address_are_capped_except_for_proxies`).
    config.max_connections_per_address = 0;
    // Tests that want the per-address limit of unauthenticated requests set it in `configure`.
    config.unauth_rate_limit_rps = 100_000.0;
    config.unauth_rate_limit_burst = 100_000.0;
    match options.backend {
        Backend::Embedded => {
            config.store.store = StoreKind::Embedded;
            config.store.embedded_path = std::env::temp_dir()
                .join(format!("broker-test-{}", uuid::Uuid::new_v4()))
                .join("broker.db");
        }
        Backend::Dynamo => {
            config.store.store = StoreKind::Dynamodb;
            config.store.ddb_endpoint_url = Some(crate::ddb_local::endpoint().await);
            config.store.table_prefix = format!("t{}", uuid::Uuid::new_v4().simple());
            config.store.ensure_tables = Some(true);
            config.store.ddb_max_retries = crate::ddb_local::EMULATOR_MAX_RETRIES;
            config.store.ddb_attempt_timeout_ms =
                crate::ddb_local::EMULATOR_ATTEMPT_TIMEOUT.as_millis() as u64;
        }
    }
    (options.configure)(&mut config);
    let clock = ManualClock::new(chrono::Utc::now());
    let service = startup::build_with(&config, Arc::new(clock.clone()), options.jobs)
        .await
        .unwrap_or_else(|e| panic!("test service did not start: {e:#}"));
    let state = service.state.clone();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    // Tests assert correctness, not latency: DynamoDB Local under 500 concurrent requests on two
    // busy cores can take longer than the production default of 30 s per request.
    let app = command_api::app(state.clone(), Duration::from_secs(180));
    let (tx, rx) = oneshot::channel::<()>();
    let limits = command_api::ListenerLimits::from_config(&config).counted_in(&state.metrics);
    let server = tokio::spawn(async move {
        let _ = command_api::run_with(
            app,
            listener,
            async {
                let _ = rx.await;
            },
            limits,
        )
        .await;
    });
    TestApp {
        url: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(240))
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_default(),
        clock,
        state,
        backend: options.backend,
        service: Some(service),
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// Jobs settings for tests: mock CSP unless a test points it at the fake CSP.
pub fn test_jobs_config() -> jobs::JobsConfig {
    let mut config = jobs::JobsConfig::default();
    config.csp.mode = jobs::CspMode::Mock;
    config
}

impl TestApp {
    /// The value of the `/metrics` series named exactly `series` (labels included), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .sent()
            .await
            .text()
            .await
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(name, _)| *name == series)
            .filter_map(|(_, value)| value.parse::<f64>().ok())
            .sum()
    }

    /// Registers `n` sandboxes named `{prefix}-{i:04}` (ids `{prefix}-id-{i}`) and waits until
    /// the view shows them.
    pub async fn seed(&self, prefix: &str, n: usize) {
        let before = self.stats().await.total();
        self.register(prefix, n).await;
        let want = before + n as i64;
        self.wait_until(|s| s.total() >= want).await;
    }

    /// Registers `n` sandboxes named `{prefix}-{i:04}` (ids `{prefix}-id-{i}`) in the event
    /// store only; returns their ids. The view shows them once a projector (or a repair) ran.
    pub async fn register(&self, prefix: &str, n: usize) -> Vec<String> {
        let meta = CommandMeta {
            actor: Actor::Admin,
            request_id: None,
            correlation_id: Some("test-seed".into()),
        };
        let broker = self.state.broker.clone();
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-id-{i}")).collect();
        futures::stream::iter(ids.clone().into_iter().enumerate())
            .for_each_concurrent(16, |(i, id)| {
                let broker = broker.clone();
                let meta = meta.clone();
                async move {
                    broker
                        .execute(
                            &id,
                            SandboxCommand::Register {
                                sandbox_id: id.clone(),
                                name: format!("{prefix}-{i:04}"),
                                external_id: format!("identity/accounts/{}", uuid::Uuid::new_v4()),
                                sfdc_account_id: Some(format!("sfdc-{i}")),
                                csp_created_at: None,
                            },
                            &meta,
                        )
                        .await
                        .unwrap_or_else(|e| panic!("register {id}: {e}"));
                }
            })
            .await;
        ids
    }

    /// Brings the view rows of `ids` up to their streams by read repair (no projector needed);
    /// panics when the app runs without read repair.
    pub async fn repair(&self, ids: &[String]) {
        let broker = self.state.broker.clone();
        futures::stream::iter(ids.iter().cloned())
            .for_each_concurrent(16, |id| {
                let broker = broker.clone();
                async move {
                    let outcome = broker
                        .repair_view(&id)
                        .await
                        .unwrap_or_else(|e| panic!("repair {id}: {e}"));
                    assert!(outcome.is_some(), "read repair is off in this app");
                }
            })
            .await;
    }

    /// The view's stats.
    pub async fn stats(&self) -> PoolStats {
        self.state
            .broker
            .view()
            .stats()
            .await
            .unwrap_or_else(|e| panic!("stats: {e}"))
    }

    /// Waits (bounded, 120 s) until the projected stats satisfy `done`.
    pub async fn wait_until(&self, done: impl Fn(&PoolStats) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let stats = self.stats().await;
            if done(&stats) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("view did not converge: {stats:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POST /v1/allocate as `caller` (X-Instruqt-Sandbox-ID).
    pub fn allocate(&self, caller: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/allocate", self.url))
            .bearer_auth(TRACK_TOKEN)
            .header("X-Instruqt-Sandbox-ID", caller)
    }

    /// A track-token request.
    pub fn track(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(TRACK_TOKEN)
    }

    /// An admin-token request.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// GET `path` with the admin token, read whole (see [`Sent::sent_json`]).
    pub async fn get_json(&self, path: &str) -> JsonReply {
        self.admin(reqwest::Method::GET, path).sent_json().await
    }

    /// Stops the server (draining) and the background tasks.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        if let Some(service) = self.service.take() {
            service.stop().await;
        }
    }
}

use futures::StreamExt;

/// A reply read whole: status, headers, and the body as JSON (`Null` when empty or not JSON).
pub type JsonReply = (StatusCode, HeaderMap, Value);

/// Sending a request from a test. A request that cannot be sent at all (connection refused,
/// timeout) fails the test with the transport error; every HTTP status is returned for the test
/// to assert on.
pub trait Sent {
    /// Sends the request.
    fn sent(self) -> impl std::future::Future<Output = Response> + Send;
    /// Sends the request and reads the reply whole.
    fn sent_json(self) -> impl std::future::Future<Output = JsonReply> + Send;
}

impl Sent for RequestBuilder {
    async fn sent(self) -> Response {
        match self.send().await {
            Ok(response) => response,
            Err(e) => panic!("sending the request failed: {e}"),
        }
    }

    async fn sent_json(self) -> JsonReply {
        read_json(self.sent().await).await
    }
}

/// Reads a reply whole (see [`JsonReply`]).
pub async fn read_json(response: Response) -> JsonReply {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}
