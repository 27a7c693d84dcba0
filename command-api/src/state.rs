//! What every handler shares.

use std::sync::Arc;

use domain::Broker;
use projector::ProjectorMetrics;
use prometheus::Registry;

use crate::credentials::TrackCredentials;
use crate::metrics::ApiMetrics;
use crate::rate_limit::RateLimiter;

/// Shared application state (behind an `Arc`).
pub struct AppState {
    /// The command side.
    pub broker: Arc<Broker>,
    /// The job runners (admin endpoints call them).
    pub jobs: Arc<jobs::Jobs>,
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// The API's series.
    pub metrics: ApiMetrics,
    /// Allocation outcomes since the start, per minute (`GET {base}/admin/outcomes`).
    pub outcomes: crate::outcomes::AllocationOutcomes,
    /// The in-process projector's metrics, when it runs here.
    pub projector_metrics: Option<ProjectorMetrics>,
    /// Rate limit per authenticated principal (credential + caller; admin).
    pub limiter: RateLimiter,
    /// Rate limit per client address, for requests without a valid credential.
    pub address_limiter: RateLimiter,
    /// Proxies that append to `X-Forwarded-For` (0 = the peer is the client).
    pub trusted_proxy_hops: usize,
    /// The networks of those proxies (`TRUSTED_PROXIES`).
    pub trusted_proxies: crate::network::TrustedProxies,
    /// Requests handled at once; the edge sheds the rest with 503.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The last `/readyz` store check, reused for a short while.
    pub readiness: crate::readiness::ReadinessCache,
    /// Per-track credentials.
    pub credentials: TrackCredentials,
    /// Keys that issue and verify lease tokens.
    pub lease_keys: crate::lease::LeaseKeys,
    /// Whether the shared track token must present the lease capability too.
    pub require_lease_token: bool,
    /// Live allocations per caller id and track (`MAX_ALLOCATIONS_PER_CALLER`; 0: no cap).
    pub max_allocations_per_caller: u32,
    /// Live allocations per client address (`MAX_ALLOCATIONS_PER_ADDRESS`; `None`: no cap).
    pub max_allocations_per_address: Option<u32>,
    /// `DEFAULT_TRACK_QUOTA`: under the shared token, the quota of its principal.
    pub shared_token_quota: Option<u32>,
    /// `CALLER_SIGNATURE_WINDOW_SEC`.
    pub signature_window_s: i64,
    /// `ALLOW_LEGACY_CALLER_SIGNATURE`.
    pub allow_legacy_signature: bool,
    /// Whether the shared track token is accepted.
    pub shared_track_token_enabled: bool,
    /// Track bearer token (with its previous value during a rotation).
    pub track_token: crate::rotation::RotatingSecret,
    /// Admin bearer token (with its previous value during a rotation).
    pub admin_token: crate::rotation::RotatingSecret,
    /// The bearer token `/metrics` requires (`METRICS_TOKEN`; `None`: none).
    pub metrics_token: Option<runtime::Secret>,
    /// The pool gauges `/metrics` serves between two reads of the store.
    pub metrics_cache: crate::metrics::PoolGaugeCache,
    /// How long a request's body may take to arrive (`BODY_READ_TIMEOUT_SEC`).
    pub body_read_timeout: std::time::Duration,
    /// Allowed CORS origins (`*` = any).
    pub cors_origins: Vec<String>,
    /// `/readyz` lag bound, ms.
    pub ready_max_lag_ms: i64,
    /// The versioned API's base path (e.g. `/v1`).
    pub base_path: String,
    /// DynamoDB requests sent by this process (`None` on the embedded store).
    pub store_requests: Option<runtime::StoreRequestMetrics>,
    /// The audit feed and its live broadcast.
    pub feed: crate::live_feed::EventsFeed,
    /// Background admin jobs (submit, report).
    pub admin_jobs: crate::admin_jobs::AdminJobs,
    /// The webhook subscribers and their delivery state (`None`: none configured).
    pub webhooks: Option<Arc<crate::webhooks::Dispatcher>>,
    /// Low-water thresholds and per-prefix gauges.
    pub pool_alerts: Arc<crate::pool_alerts::PoolAlerts>,
    /// Student ids to pseudonyms, and their erasure (`STUDENT_IDS`, ADR 0031).
    pub subjects: Arc<crate::subjects::Subjects>,
    /// Refused allocation requests counted for the next refusal summary (ADR 0030).
    pub refusals: Arc<crate::refusals::RefusalCounter>,
    /// The waiting lines of `Prefer: wait` allocations on this instance.
    pub waiting_line: Arc<crate::waiting_line::WaitingLine>,
}

/// The state handle handlers receive.
pub type SharedState = Arc<AppState>;
