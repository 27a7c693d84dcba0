//! Configuration from the environment (reference names kept). Every setting has a documented
//! default in the README's configuration table. The store, log and job settings are the shared
//! ones (`runtime::StoreArgs`, `runtime::LogArgs`, `jobs::JobsArgs`), flattened in, so the API
//! and the other binaries read each name with one type.

use std::net::SocketAddr;

use clap::Parser;
use jobs::JobsArgs;
pub use runtime::StoreKind;
use runtime::{LogArgs, StoreArgs};

/// Tokens used when none are configured. Obviously dev-only; printed as such at start-up, and
/// refused with `STORE=dynamodb` unless `ALLOW_DEV_TOKENS=true`.
pub const DEV_TRACK_TOKEN: &str = "dev-track-token-NOT-FOR-PRODUCTION";
/// See [`DEV_TRACK_TOKEN`].
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token-NOT-FOR-PRODUCTION";

/// The API's settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "command-api", about = "Sandbox Broker REST API", version)]
pub struct Config {
    /// Listen address.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// Bearer token of track scripts.
    #[arg(long, env = "BROKER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Bearer token of operators.
    #[arg(long, env = "BROKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Allow the built-in dev tokens with a non-embedded store.
    #[arg(long, env = "ALLOW_DEV_TOKENS", default_value_t = false)]
    pub allow_dev_tokens: bool,
    /// Base path of the versioned API.
    #[arg(long, env = "API_BASE_PATH", default_value = "/v1")]
    pub api_base_path: String,
    /// Store selection and options.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Job settings (the in-process jobs and the admin job endpoints).
    #[command(flatten)]
    pub jobs: JobsArgs,
    /// Log format.
    #[command(flatten)]
    pub log: LogArgs,
    /// Lab window, hours: `expires_at`, the mark window and expiry.
    #[arg(long, env = "LAB_DURATION_HOURS", default_value_t = 48)]
    pub lab_duration_hours: i64,
    /// Allocation candidates per view query.
    #[arg(long, env = "K_CANDIDATES", default_value_t = 15)]
    pub k_candidates: usize,
    /// Candidate pages tried before 409.
    #[arg(long, env = "ALLOCATE_ROUNDS", default_value_t = 3)]
    pub allocate_rounds: usize,
    /// Sustained requests per second per caller key.
    #[arg(long, env = "RATE_LIMIT_RPS", default_value_t = 50.0)]
    pub rate_limit_rps: f64,
    /// Burst per caller key.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 200.0)]
    pub rate_limit_burst: f64,
    /// Most caller keys tracked at once (memory bound).
    #[arg(long, env = "RATE_LIMIT_MAX_KEYS", default_value_t = 100_000)]
    pub rate_limit_max_keys: usize,
    /// Run the stream projector inside this process (default: on for embedded, off for DynamoDB).
    #[arg(long, env = "RUN_PROJECTOR")]
    pub run_projector: Option<bool>,
    /// Run the job loops inside this process (default: on for embedded, off for DynamoDB).
    #[arg(long, env = "RUN_JOBS")]
    pub run_jobs: Option<bool>,
    /// `/readyz` fails when the projector lags more than this, ms.
    #[arg(long, env = "READY_MAX_LAG_MS", default_value_t = 30_000)]
    pub ready_max_lag_ms: i64,
    /// Comma-separated allowed CORS origins (`*` = any).
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "*")]
    pub cors_allowed_origins: String,
    /// Per-request timeout, seconds.
    #[arg(long, env = "REQUEST_TIMEOUT_SEC", default_value_t = 30)]
    pub request_timeout_sec: u64,
    /// Seed the embedded store with a demo pool on first start (sync from the mock CSP).
    #[arg(long, env = "SEED_DEMO_POOL", default_value_t = true)]
    pub seed_demo_pool: bool,
}

impl Config {
    /// Whether the projector runs in this process.
    pub fn runs_projector(&self) -> bool {
        self.run_projector
            .unwrap_or(self.store.store == StoreKind::Embedded)
    }

    /// Whether the job loops run in this process.
    pub fn runs_jobs(&self) -> bool {
        self.run_jobs
            .unwrap_or(self.store.store == StoreKind::Embedded)
    }

    /// The track token, or the dev token when unset.
    pub fn track_token(&self) -> &str {
        self.api_token.as_deref().unwrap_or(DEV_TRACK_TOKEN)
    }

    /// The admin token, or the dev token when unset.
    pub fn admin_token(&self) -> &str {
        self.admin_token.as_deref().unwrap_or(DEV_ADMIN_TOKEN)
    }

    /// True when either token is the built-in dev default.
    pub fn uses_dev_tokens(&self) -> bool {
        self.api_token.is_none() || self.admin_token.is_none()
    }

    /// A configuration with every default (tests override fields).
    pub fn defaults() -> Self {
        runtime::try_parse_settings_from(["command-api"]).unwrap_or_else(|e| e.exit())
    }
}
