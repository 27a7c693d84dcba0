//! Configuration from the environment (reference names kept). Every setting has a documented
//! default in the README's configuration table.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Which store backs the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One local SQLite file; projector and jobs in-process.
    Embedded,
    /// DynamoDB (AWS or DynamoDB Local).
    Dynamodb,
}

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
    /// `embedded` or `dynamodb`.
    #[arg(long, env = "STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// The embedded store's file.
    #[arg(long, env = "EMBEDDED_PATH", default_value = "data/broker.db")]
    pub embedded_path: PathBuf,
    /// DynamoDB endpoint (DynamoDB Local); unset = AWS.
    #[arg(long, env = "DDB_ENDPOINT_URL")]
    pub ddb_endpoint_url: Option<String>,
    /// AWS region (else the standard chain).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Table-name prefix: `{prefix}-events|pool|stats|checkpoints`.
    #[arg(long, env = "TABLE_PREFIX", default_value = "sandbox-broker")]
    pub table_prefix: String,
    /// Jittered retries of throttled, conflicting or 5xx DynamoDB calls before `Unavailable`.
    #[arg(long, env = "DDB_MAX_RETRIES", default_value_t = 6)]
    pub ddb_max_retries: u32,
    /// Stats shard count.
    #[arg(long, env = "STATS_SHARDS", default_value_t = 8)]
    pub stats_shards: u32,
    /// Create missing DynamoDB tables at start-up (dev and DynamoDB Local).
    #[arg(long, env = "ENSURE_TABLES", default_value_t = false)]
    pub ensure_tables: bool,
    /// Lab window, hours: `expires_at`, the mark window and expiry.
    #[arg(long, env = "LAB_DURATION_HOURS", default_value_t = 48)]
    pub lab_duration_hours: i64,
    /// Extra minutes after `expires_at` before auto-expiry.
    #[arg(long, env = "GRACE_PERIOD_MINUTES", default_value_t = 30)]
    pub grace_period_minutes: i64,
    /// Allocation candidates per view query.
    #[arg(long, env = "K_CANDIDATES", default_value_t = 15)]
    pub k_candidates: usize,
    /// Random-offset candidate pages read before a full sweep of the view's available range.
    #[arg(long, env = "ALLOCATE_ROUNDS", default_value_t = 3)]
    pub allocate_rounds: usize,
    /// Bound on full sweeps of the available range per allocation request.
    #[arg(long, env = "ALLOCATE_MAX_SWEEPS", default_value_t = 16)]
    pub allocate_max_sweeps: usize,
    /// Bound on view rows one sweep reads before answering 409.
    #[arg(long, env = "ALLOCATE_MAX_SWEEP_ROWS", default_value_t = 20_000)]
    pub allocate_max_sweep_rows: usize,
    /// Allocation requests worked on at once per instance; the rest queue in order.
    #[arg(long, env = "ALLOCATE_CONCURRENCY", default_value_t = 64)]
    pub allocate_concurrency: usize,
    /// Re-project a sandbox's view row at once when a command finds it behind its stream.
    #[arg(long, env = "READ_REPAIR", default_value_t = true, action = clap::ArgAction::Set)]
    pub read_repair: bool,
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
    /// `json` or `text` logs.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

impl Config {
    /// Whether the projector runs in this process.
    pub fn runs_projector(&self) -> bool {
        self.run_projector
            .unwrap_or(self.store == StoreKind::Embedded)
    }

    /// Whether the job loops run in this process.
    pub fn runs_jobs(&self) -> bool {
        self.run_jobs.unwrap_or(self.store == StoreKind::Embedded)
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
        Self::parse_from(["command-api"])
    }
}
