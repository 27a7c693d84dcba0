//! What every handler shares.

use std::sync::Arc;

use domain::Broker;
use projector::ProjectorMetrics;
use prometheus::Registry;

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
    /// The in-process projector's metrics, when it runs here.
    pub projector_metrics: Option<ProjectorMetrics>,
    /// Per-caller rate limit.
    pub limiter: RateLimiter,
    /// Track bearer token.
    pub track_token: String,
    /// Admin bearer token.
    pub admin_token: String,
    /// Allowed CORS origins (`*` = any).
    pub cors_origins: Vec<String>,
    /// `/readyz` lag bound, ms.
    pub ready_max_lag_ms: i64,
    /// The versioned API's base path (e.g. `/v1`).
    pub base_path: String,
    /// DynamoDB requests sent by this process (`None` on the embedded store).
    pub store_requests: Option<crate::store_metrics::StoreRequestMetrics>,
    /// The audit feed and its live broadcast (`routes::events`).
    pub feed: crate::routes::events::EventsFeed,
}

/// The state handle handlers receive.
pub type SharedState = Arc<AppState>;
