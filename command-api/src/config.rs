//! Configuration from the environment (reference names kept). Every setting has a documented
//! default in the README's configuration table. The store, log and job settings are the shared
//! ones (`runtime::StoreArgs`, `runtime::LogArgs`, `jobs::JobsArgs`), flattened in, so the API
//! and the other binaries read each name with one type.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Parser;
use jobs::JobsArgs;
pub use runtime::StoreKind;
use runtime::{LogArgs, StoreArgs};

/// Tokens used when none are configured. Obviously dev-only; printed as such at start-up, and
/// refused with `STORE=dynamodb` unless `ALLOW_DEV_TOKENS=true`.
pub const DEV_TRACK_TOKEN: &str = "dev-track-token-NOT-FOR-PRODUCTION";
/// See [`DEV_TRACK_TOKEN`].
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token-NOT-FOR-PRODUCTION";

/// Shortest bearer token accepted outside the dev mode (about 190 bits of base64 entropy).
pub const MIN_TOKEN_CHARS: usize = 32;

/// Secret settings (tokens, keys, subscriber documents): never printed.
pub use runtime::Secret;

/// What is wrong with a JSON settings document (track credentials, webhook subscribers), without
/// the value: serde's own message quotes a value of the wrong type, and the value may be a token.
/// Field names (an unknown or a missing one) and the position are kept.
pub fn json_problem(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let what = match error.classify() {
        serde_json::error::Category::Data
            if message.starts_with("unknown field") || message.starts_with("missing field") =>
        {
            message
                .split(" at line ")
                .next()
                .unwrap_or("a field is unknown or missing")
                .to_string()
        }
        serde_json::error::Category::Data => "a value has the wrong type or form".to_string(),
        serde_json::error::Category::Syntax => "not valid JSON".to_string(),
        serde_json::error::Category::Eof => "the document ends too soon".to_string(),
        serde_json::error::Category::Io => "unreadable".to_string(),
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

/// The API's settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "command-api", about = "Sandbox Broker REST API", version)]
pub struct Config {
    /// Listen address.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// Shared bearer token of track scripts (environment or `BROKER_API_TOKEN_FILE` only): at
    /// least 32 characters and 128 bits by the strength estimate, different from the admin
    /// token. Unset with the embedded store on a loopback address, the dev-only
    /// `dev-track-token-NOT-FOR-PRODUCTION` applies (printed as dev-only at start-up).
    #[arg(long, env = "BROKER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,
    /// File holding `BROKER_API_TOKEN` (instead of the variable; trailing whitespace ignored).
    #[arg(long, env = "BROKER_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Bearer token of operators (environment or `BROKER_ADMIN_TOKEN_FILE` only; the same
    /// rules; dev-only default `dev-admin-token-NOT-FOR-PRODUCTION`).
    #[arg(long, env = "BROKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// During a rotation of `BROKER_API_TOKEN`: the value being replaced, still accepted until
    /// `BROKER_API_TOKEN_PREVIOUS_UNTIL` (docs/security.md, "Rotating secrets").
    #[arg(long, env = "BROKER_API_TOKEN_PREVIOUS", hide_env_values = true)]
    pub api_token_previous: Option<Secret>,
    /// End of the overlap of `BROKER_API_TOKEN_PREVIOUS` (RFC 3339; at most 30 days ahead).
    #[arg(long, env = "BROKER_API_TOKEN_PREVIOUS_UNTIL")]
    pub api_token_previous_until: Option<String>,
    /// During a rotation of `BROKER_ADMIN_TOKEN`: the value being replaced, still accepted until
    /// `BROKER_ADMIN_TOKEN_PREVIOUS_UNTIL`.
    #[arg(long, env = "BROKER_ADMIN_TOKEN_PREVIOUS", hide_env_values = true)]
    pub admin_token_previous: Option<Secret>,
    /// End of the overlap of `BROKER_ADMIN_TOKEN_PREVIOUS` (RFC 3339; at most 30 days ahead).
    #[arg(long, env = "BROKER_ADMIN_TOKEN_PREVIOUS_UNTIL")]
    pub admin_token_previous_until: Option<String>,
    /// File holding `BROKER_ADMIN_TOKEN`.
    #[arg(long, env = "BROKER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token `/metrics` requires (environment or `METRICS_TOKEN_FILE` only; 128 bits by
    /// the strength estimate); unset: `/metrics` answers without one.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,
    /// File holding `METRICS_TOKEN`.
    #[arg(long, env = "METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// How long `/metrics` serves the pool gauges it last read from the store, ms: scrapes in
    /// between cost the store nothing (0: read on every scrape).
    #[arg(long, env = "METRICS_CACHE_MS", default_value_t = 15_000)]
    pub metrics_cache_ms: u64,
    /// Accept the shared track token (`BROKER_API_TOKEN`); off once every track has its own.
    #[arg(long, env = "SHARED_TRACK_TOKEN_ENABLED", default_value_t = true)]
    pub shared_track_token_enabled: bool,
    /// Per-track credentials file (JSON, see the security chapter of the docs).
    #[arg(long, env = "TRACK_CREDENTIALS_FILE")]
    pub track_credentials_file: Option<PathBuf>,
    /// Per-track credentials as JSON text (e.g. injected from Secrets Manager).
    #[arg(long, env = "TRACK_CREDENTIALS_JSON", hide_env_values = true)]
    pub track_credentials_json: Option<Secret>,
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
    /// Dev-only: a lab window in seconds that replaces `LAB_DURATION_HOURS`, so that fault tests
    /// and soaks see allocations expire within minutes. Logged as dev-only at start-up.
    #[arg(long, env = "DEV_LAB_DURATION_SECONDS")]
    pub dev_lab_duration_seconds: Option<u64>,
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
    /// Groups of concurrent allocations written at once when the store groups them (DynamoDB,
    /// `DDB_GROUP_COMMIT_ITEMS`): the next group is formed while fewer are in flight.
    #[arg(long, env = "ALLOCATE_GROUPS_IN_FLIGHT", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub allocate_groups_in_flight: u32,
    /// Milliseconds one group write may take before its allocations are answered as unknown
    /// outcomes (each then settles with a strong read of its sandbox).
    #[arg(long, env = "ALLOCATE_GROUP_DEADLINE_MS", default_value_t = 20_000)]
    pub allocate_group_deadline_ms: u64,
    /// Live event streams (`/v1/admin/events/stream`) open at once per instance.
    #[arg(long, env = "SSE_MAX_SUBSCRIBERS", default_value_t = 64)]
    pub sse_max_subscribers: usize,
    /// Seconds a live event stream stays open before the server ends it (the client resumes).
    #[arg(long, env = "SSE_MAX_LIFETIME_SEC", default_value_t = 3600)]
    pub sse_max_lifetime_sec: u64,
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
    /// Sustained requests per second per client address without a valid credential.
    #[arg(long, env = "UNAUTH_RATE_LIMIT_RPS", default_value_t = 2.0)]
    pub unauth_rate_limit_rps: f64,
    /// Burst per client address without a valid credential.
    #[arg(long, env = "UNAUTH_RATE_LIMIT_BURST", default_value_t = 30.0)]
    pub unauth_rate_limit_burst: f64,
    /// Proxies in front of the service that append to `X-Forwarded-For` (0 = use the peer address).
    #[arg(long, env = "TRUSTED_PROXY_HOPS", default_value_t = 0)]
    pub trusted_proxy_hops: usize,
    /// Networks of those proxies, comma-separated CIDRs (`10.0.0.0/24,10.0.1.0/24`): only a
    /// peer in them may set the client address by `X-Forwarded-For`, and none of them is held
    /// to `MAX_CONNECTIONS_PER_ADDRESS`. Empty: with `TRUSTED_PROXY_HOPS` above 0 every peer is
    /// taken for a proxy (the service is reachable through the proxies only).
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: crate::network::TrustedProxies,
    /// Requests handled at once; beyond it requests are shed with 503.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Open connections accepted at once; further connections wait in the kernel's backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Open connections from one client address; more are closed at once (0: no cap). Never
    /// applies to the trusted proxies (`TRUSTED_PROXIES`), whose address every client behind
    /// them shares.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256)]
    pub max_connections_per_address: usize,
    /// Seconds a client has to send a request's headers: counted from the connection's start
    /// for its first request (a connection that sends nothing, or only the HTTP/2 preface, is
    /// closed then) and from the first byte of each later request.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SEC", default_value_t = 10)]
    pub header_read_timeout_sec: u64,
    /// Seconds a kept-alive connection may wait for its next request before the server closes
    /// it. Keep it above the load balancer's idle timeout (60 s on AWS), so that the balancer
    /// never sends a request on a connection the server is closing (a 502).
    #[arg(long, env = "IDLE_TIMEOUT_SEC", default_value_t = 75)]
    pub idle_timeout_sec: u64,
    /// Seconds a client has to send a request's body, from the end of its headers; a body that
    /// trickles in slower is refused with 408 `BODY_TIMEOUT`.
    #[arg(long, env = "BODY_READ_TIMEOUT_SEC", default_value_t = 10)]
    pub body_read_timeout_sec: u64,
    /// How long a `/readyz` store check is reused, ms.
    #[arg(long, env = "READY_CACHE_MS", default_value_t = 1_000)]
    pub ready_cache_ms: u64,
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
    /// Low-water thresholds of available sandboxes per name prefix group:
    /// `prefix=count,…`, `default=count` for every other group; empty: no alerts.
    #[arg(long, env = "POOL_LOW_WATER", default_value = "")]
    pub pool_low_water: domain::model::pool_prefix::LowWater,
    /// Milliseconds between two progress marks of a background admin job; a running job
    /// silent for ten of them reads as `interrupted`.
    #[arg(long, env = "ADMIN_JOB_PROGRESS_MS", default_value_t = 2_000)]
    pub admin_job_progress_ms: u64,
    /// Deliver webhooks over plain `http://` too (tests, a receiver on the same host); off:
    /// only `https://` targets are accepted.
    #[arg(long, env = "WEBHOOK_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_http: bool,
    /// Deliver webhooks to private, loopback, link-local and other non-public addresses too;
    /// off: a target that is one, or whose name resolves to one at delivery, is refused.
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE_TARGETS", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private_targets: bool,
    /// Webhook subscribers file (JSON, see the README).
    #[arg(long, env = "WEBHOOKS_FILE")]
    pub webhooks_file: Option<PathBuf>,
    /// Webhook subscribers as JSON text (instead of the file).
    #[arg(long, env = "WEBHOOKS_JSON", hide_env_values = true)]
    pub webhooks_json: Option<Secret>,
    /// Run the webhook dispatcher in this process (default: when subscribers are configured).
    #[arg(long, env = "RUN_WEBHOOKS")]
    pub run_webhooks: Option<bool>,
    /// First webhook retry delay, ms (doubled per attempt).
    #[arg(long, env = "WEBHOOK_RETRY_BASE_MS", default_value_t = 1_000)]
    pub webhook_retry_base_ms: u64,
    /// Longest delay between two webhook attempts, seconds.
    #[arg(long, env = "WEBHOOK_RETRY_CAP_SEC", default_value_t = 300)]
    pub webhook_retry_cap_sec: u64,
    /// Attempts before a webhook notification is given up.
    #[arg(long, env = "WEBHOOK_MAX_ATTEMPTS", default_value_t = 10)]
    pub webhook_max_attempts: u32,
    /// Per-request timeout of a webhook delivery, seconds.
    #[arg(long, env = "WEBHOOK_TIMEOUT_SEC", default_value_t = 10)]
    pub webhook_timeout_sec: u64,
    /// Idle poll interval of the webhook dispatcher, ms.
    #[arg(long, env = "WEBHOOK_POLL_MS", default_value_t = 1_000)]
    pub webhook_poll_ms: u64,
    /// DynamoDB: events younger than this wait for the next webhook poll, ms (the time index
    /// may lag a little; what it shows later the re-read finds). The embedded store's log needs
    /// no wait.
    #[arg(long, env = "WEBHOOK_SETTLE_MS", default_value_t = 2_000)]
    pub webhook_settle_ms: u64,
    /// How long an instance's claim to dispatch a subscriber lasts without renewal, ms.
    #[arg(long, env = "WEBHOOK_LEASE_MS", default_value_t = 30_000)]
    pub webhook_lease_ms: u64,
    /// DynamoDB: how late an event may show up in the time index after its timestamp, ms (an
    /// append's retries, clock skew, index lag); the webhook watermark stays this far behind and
    /// the window above it is re-read every quarter of it. Later events are not delivered (0:
    /// no re-read). The embedded store's log needs none.
    #[arg(long, env = "WEBHOOK_OVERLAP_MS", default_value_t = 90_000)]
    pub webhook_overlap_ms: u64,
    /// `expiring_soon` webhooks go out this many minutes before `expires_at`.
    #[arg(long, env = "EXPIRY_WARNING_MINUTES", default_value_t = 30)]
    pub expiry_warning_minutes: i64,
    /// Seconds between two low-water checks.
    #[arg(long, env = "POOL_WATCH_INTERVAL_SEC", default_value_t = 60)]
    pub pool_watch_interval_sec: u64,
    /// Most hours all extensions of one allocation may add (0 turns extension off).
    #[arg(long, env = "MAX_LAB_EXTENSION_HOURS", default_value_t = 24)]
    pub max_lab_extension_hours: u32,
    /// How long an instance trusts the drain state it read, ms: a drain takes effect on every
    /// other instance within this.
    #[arg(long, env = "DRAIN_CACHE_MS", default_value_t = 1_000)]
    pub drain_cache_ms: u64,
    /// `Retry-After` of a 503 MAINTENANCE, seconds.
    #[arg(long, env = "MAINTENANCE_RETRY_AFTER_SEC", default_value_t = 60)]
    pub maintenance_retry_after_sec: u64,
    /// Seconds this instance skips a candidate whose allocation write ended with an unknown
    /// outcome that a strong read of its stream could not settle either (the store failed twice
    /// in a row); after it, the conditional write decides again (docs/liveness.md, path 1).
    #[arg(long, env = "UNKNOWN_OUTCOME_HOLD_SEC", default_value_t = 10)]
    pub unknown_outcome_hold_sec: u64,
    /// Key that derives lease tokens (at least 32 characters and 128 bits by the strength
    /// estimate; environment or `LEASE_TOKEN_KEY_FILE` only; unset: a dev-only key, refused
    /// on non-loopback addresses). See docs/tenancy.md for rotation.
    #[arg(long, env = "LEASE_TOKEN_KEY", hide_env_values = true)]
    pub lease_token_key: Option<Secret>,
    /// File holding `LEASE_TOKEN_KEY` (instead of the variable; trailing whitespace ignored).
    #[arg(long, env = "LEASE_TOKEN_KEY_FILE")]
    pub lease_token_key_file: Option<PathBuf>,
    /// Id of `LEASE_TOKEN_KEY`, part of every token it issues (1-16 of `[A-Za-z0-9_-]`).
    #[arg(long, env = "LEASE_TOKEN_KEY_ID", default_value = "k1")]
    pub lease_token_key_id: String,
    /// The key being rotated out: still verifies the tokens it issued, issues none.
    #[arg(long, env = "LEASE_TOKEN_KEY_PREVIOUS", hide_env_values = true)]
    pub lease_token_key_previous: Option<Secret>,
    /// File holding `LEASE_TOKEN_KEY_PREVIOUS`.
    #[arg(long, env = "LEASE_TOKEN_KEY_PREVIOUS_FILE")]
    pub lease_token_key_previous_file: Option<PathBuf>,
    /// Id of `LEASE_TOKEN_KEY_PREVIOUS` (must differ from `LEASE_TOKEN_KEY_ID`).
    #[arg(long, env = "LEASE_TOKEN_KEY_PREVIOUS_ID")]
    pub lease_token_key_previous_id: Option<String>,
    /// Require the lease capability from the shared track token too (per-track credentials
    /// always require it): `X-Lease-Token` on per-sandbox calls, a strong `Idempotency-Key`.
    #[arg(long, env = "REQUIRE_LEASE_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_lease_token: bool,
    /// Seconds a caller signature's time may differ from the server's (`t=` of
    /// `X-Caller-Signature`).
    #[arg(long, env = "CALLER_SIGNATURE_WINDOW_SEC", default_value_t = 300)]
    pub caller_signature_window_sec: u64,
    /// Migration only: also accept the old caller signature (HMAC of the caller id alone, no
    /// time, no request), which anyone who saw one can replay forever.
    #[arg(long, env = "ALLOW_LEGACY_CALLER_SIGNATURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_legacy_caller_signature: bool,
    /// Live allocations one caller id may hold per track (per-track credential) or under the
    /// shared token; a credential's `max_allocations_per_caller` overrides it (0: no cap).
    #[arg(long, env = "MAX_ALLOCATIONS_PER_CALLER", default_value_t = 1)]
    pub max_allocations_per_caller: u32,
    /// Live allocations made from one client address (through `TRUSTED_PROXY_HOPS`); unset: no
    /// cap (labs behind one shared egress address would otherwise share it).
    #[arg(long, env = "MAX_ALLOCATIONS_PER_ADDRESS")]
    pub max_allocations_per_address: Option<u32>,
    /// Concurrent allocations per track name, `trackA=20,trackB=5` (blank: none).
    #[arg(long, env = "TRACK_QUOTAS", default_value = "")]
    pub track_quotas: String,
    /// Concurrent allocations of any track `TRACK_QUOTAS` does not name (unset: unlimited). Under
    /// the shared token it caps all its allocations outside the named tracks together (the
    /// track header is the client's choice, so it does not pick the bucket).
    #[arg(long, env = "DEFAULT_TRACK_QUOTA")]
    pub default_track_quota: Option<u32>,
    /// How student ids are stored: `clear` (as sent) or `pseudonymised` (a keyed pseudonym; the
    /// id itself only in an erasable subject record). See docs/personal-data.md.
    #[arg(
        long,
        env = "STUDENT_IDS",
        value_enum,
        ignore_case = true,
        default_value = "clear"
    )]
    pub student_ids: crate::subjects::StudentIds,
    /// Key of the student pseudonyms (at least 32 characters and 128 bits by the strength
    /// estimate; environment or `PSEUDONYM_KEY_FILE` only; unset: a dev-only key, refused on
    /// non-loopback addresses). It never rotates: a new key unlinks every student.
    #[arg(long, env = "PSEUDONYM_KEY", hide_env_values = true)]
    pub pseudonym_key: Option<Secret>,
    /// File holding `PSEUDONYM_KEY` (instead of the variable; trailing whitespace ignored).
    #[arg(long, env = "PSEUDONYM_KEY_FILE")]
    pub pseudonym_key_file: Option<PathBuf>,
    /// Switching to `STUDENT_IDS=pseudonymised` while labs run: until this time (RFC 3339) a
    /// student's requests also find the allocations made under their clear id, so the switch
    /// never hands one student a second sandbox. Blank: no fallback.
    #[arg(long, env = "CLEAR_ID_FALLBACK_UNTIL", default_value = "")]
    pub clear_id_fallback_until: String,
    /// Append a summary of the allocation requests this instance refused (`RefusalsSummarized`,
    /// counted by usage reports) every `USAGE_SUMMARY_INTERVAL_SEC`. Turn on once every process
    /// runs this release (docs/upgrades.md).
    #[arg(long, env = "WRITE_EVENTS_USAGE", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub write_events_usage: bool,
    /// Seconds between two refusal summaries of this instance.
    #[arg(long, env = "USAGE_SUMMARY_INTERVAL_SEC", default_value_t = 60)]
    pub usage_summary_interval_sec: u64,
    /// Longest wait an allocation with `Prefer: wait=N` is granted, seconds (a longer N is cut
    /// to it; the wait also ends a second before `REQUEST_TIMEOUT_SEC`). Keep it below the load
    /// balancer's idle timeout (60 s on the ALB).
    #[arg(long, env = "WAIT_MAX_SEC", default_value_t = 25)]
    pub wait_max_sec: u64,
    /// Requests one instance keeps waiting at once, all lines together; one more is answered
    /// 409 at once (each waiter holds one of `MAX_CONCURRENT_REQUESTS`).
    #[arg(long, env = "WAIT_MAX_WAITERS", default_value_t = 64)]
    pub wait_max_waiters: usize,
    /// After an event frees a sandbox, how long the head of a line keeps retrying while the
    /// pool's projection catches up with the event, ms.
    #[arg(long, env = "WAIT_SETTLE_MS", default_value_t = 2_000)]
    pub wait_settle_ms: u64,
    /// Write the waiting line's ticket events (`Prefer: respond-async`, `ticket#` streams).
    /// Turn on only once every process runs a release that reads them (docs/upgrades.md); off,
    /// `Prefer: respond-async` is ignored.
    #[arg(long, env = "WRITE_EVENTS_WAITING_LINE", default_value_t = false, action = clap::ArgAction::Set)]
    pub write_events_waiting_line: bool,
    /// A waiting-line ticket not polled for this long drops out of the line, seconds.
    #[arg(long, env = "TICKET_IDLE_SEC", default_value_t = 120)]
    pub ticket_idle_sec: u64,
    /// The longest a waiting-line ticket stays in line, seconds.
    #[arg(long, env = "TICKET_MAX_WAIT_SEC", default_value_t = 1_800)]
    pub ticket_max_wait_sec: u64,
    /// Request a sync (an admin job) when a waiting line forms on this instance.
    #[arg(long, env = "WAIT_SYNC_ON_LINE", default_value_t = false, action = clap::ArgAction::Set)]
    pub wait_sync_on_line: bool,
    /// Least time between two syncs requested by waiting lines on one instance, seconds.
    #[arg(long, env = "WAIT_SYNC_MIN_INTERVAL_SEC", default_value_t = 300)]
    pub wait_sync_min_interval_sec: u64,
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
        self.api_token
            .as_ref()
            .map_or(DEV_TRACK_TOKEN, Secret::expose)
    }

    /// The admin token, or the dev token when unset.
    pub fn admin_token(&self) -> &str {
        self.admin_token
            .as_ref()
            .map_or(DEV_ADMIN_TOKEN, Secret::expose)
    }

    /// Moves every secret given in a file (`BROKER_API_TOKEN_FILE`, `BROKER_ADMIN_TOKEN_FILE`,
    /// `METRICS_TOKEN_FILE`) into its setting; a secret given both ways is refused. Idempotent:
    /// `main` calls it before the banner, [`crate::startup::build_with`] again for callers
    /// that built a configuration by hand.
    pub fn read_secret_files(&mut self) -> Result<(), String> {
        for (name, value, file) in [
            (
                "BROKER_API_TOKEN",
                &mut self.api_token,
                &mut self.api_token_file,
            ),
            (
                "BROKER_ADMIN_TOKEN",
                &mut self.admin_token,
                &mut self.admin_token_file,
            ),
            (
                "METRICS_TOKEN",
                &mut self.metrics_token,
                &mut self.metrics_token_file,
            ),
        ] {
            *value = runtime::secret::from_value_or_file(name, value.as_ref(), file.as_deref())?;
            *file = None;
        }
        Ok(())
    }

    /// Refuses token settings that would let a stranger in: the dev tokens (unset, or set to
    /// their documented values) anywhere but on a loopback address (and, with DynamoDB, without
    /// `ALLOW_DEV_TOKENS`), and configured tokens that are short, weaker than 128 bits by the
    /// strength estimate (`runtime::secret`), or shared between the roles. Errors name the
    /// setting, never its value.
    pub fn check_tokens(&self) -> Result<(), String> {
        if self.uses_dev_tokens() {
            if !self.bind_addr.ip().is_loopback() {
                return Err(format!(
                    "BROKER_API_TOKEN and BROKER_ADMIN_TOKEN must be set, and not to the documented dev tokens, to listen on {} (the dev tokens are only for loopback addresses)",
                    self.bind_addr
                ));
            }
            if self.store.store != StoreKind::Embedded && !self.allow_dev_tokens {
                return Err("BROKER_API_TOKEN and BROKER_ADMIN_TOKEN must be set outside the embedded dev mode (or ALLOW_DEV_TOKENS=true for local DynamoDB)".into());
            }
        }
        for (name, token, dev) in [
            ("BROKER_API_TOKEN", &self.api_token, DEV_TRACK_TOKEN),
            ("BROKER_ADMIN_TOKEN", &self.admin_token, DEV_ADMIN_TOKEN),
            ("METRICS_TOKEN", &self.metrics_token, ""),
        ] {
            // A documented dev token on loopback passed the check above: it is public anyway.
            let Some(token) = token.as_ref().filter(|t| t.expose() != dev) else {
                continue;
            };
            if token.expose().trim().chars().count() < MIN_TOKEN_CHARS {
                return Err(format!(
                    "{name} must be at least {MIN_TOKEN_CHARS} characters"
                ));
            }
            runtime::secret::check_strength(name, token)?;
        }
        if self.track_token() == self.admin_token() {
            return Err("BROKER_API_TOKEN and BROKER_ADMIN_TOKEN must differ".into());
        }
        for (name, previous, current, other_role) in [
            (
                "BROKER_API_TOKEN_PREVIOUS",
                &self.api_token_previous,
                self.track_token(),
                [
                    self.admin_token(),
                    self.admin_token_previous
                        .as_ref()
                        .map_or("", Secret::expose),
                ],
            ),
            (
                "BROKER_ADMIN_TOKEN_PREVIOUS",
                &self.admin_token_previous,
                self.admin_token(),
                [
                    self.track_token(),
                    self.api_token_previous.as_ref().map_or("", Secret::expose),
                ],
            ),
        ] {
            let Some(previous) = previous else { continue };
            runtime::secret::check_strength(name, previous)?;
            let previous = previous.expose();
            if previous.trim().chars().count() < MIN_TOKEN_CHARS {
                return Err(format!(
                    "{name} must be at least {MIN_TOKEN_CHARS} characters"
                ));
            }
            if previous == current {
                return Err(format!(
                    "{name} equals the current value; a rotation needs a new one"
                ));
            }
            if other_role.contains(&previous) {
                return Err(format!(
                    "{name} is a token of the other role; the track and admin tokens must differ"
                ));
            }
        }
        if let Some(metrics) = &self.metrics_token {
            if [self.track_token(), self.admin_token()].contains(&metrics.expose()) {
                return Err(
                    "METRICS_TOKEN must differ from BROKER_API_TOKEN and BROKER_ADMIN_TOKEN (a scraper's token must not open the API)".into(),
                );
            }
        }
        Ok(())
    }

    /// The shared track token with its rotation (the previous value and its end), at `now`.
    pub fn track_tokens(
        &self,
        now: DateTime<Utc>,
    ) -> Result<crate::rotation::RotatingSecret, String> {
        rotating(
            "BROKER_API_TOKEN",
            self.track_token(),
            &self.api_token_previous,
            self.api_token_previous_until.as_deref(),
            now,
        )
    }

    /// The admin token with its rotation, at `now`.
    pub fn admin_tokens(
        &self,
        now: DateTime<Utc>,
    ) -> Result<crate::rotation::RotatingSecret, String> {
        rotating(
            "BROKER_ADMIN_TOKEN",
            self.admin_token(),
            &self.admin_token_previous,
            self.admin_token_previous_until.as_deref(),
            now,
        )
    }

    /// The lease-token keys from env or file; the dev-only key when none is configured (or the
    /// documented one is), which is refused on a non-loopback address.
    pub fn lease_keys(&self) -> Result<crate::lease::LeaseKeys, String> {
        let current = runtime::secret::from_value_or_file(
            "LEASE_TOKEN_KEY",
            self.lease_token_key.as_ref(),
            self.lease_token_key_file.as_deref(),
        )?;
        let previous = runtime::secret::from_value_or_file(
            "LEASE_TOKEN_KEY_PREVIOUS",
            self.lease_token_key_previous.as_ref(),
            self.lease_token_key_previous_file.as_deref(),
        )?;
        let previous = match (previous, &self.lease_token_key_previous_id) {
            (Some(secret), Some(id)) => Some((id.clone(), secret)),
            (None, None) => None,
            _ => {
                return Err(
                    "LEASE_TOKEN_KEY_PREVIOUS and LEASE_TOKEN_KEY_PREVIOUS_ID go together".into(),
                )
            }
        };
        let dev = |key: &Option<Secret>| {
            key.as_ref()
                .is_none_or(|k| k.expose() == crate::lease::DEV_LEASE_TOKEN_KEY)
        };
        if dev(&current) && !self.bind_addr.ip().is_loopback() {
            return Err(format!(
                "LEASE_TOKEN_KEY (or LEASE_TOKEN_KEY_FILE) must be set, and not to the documented dev key, to listen on {} (the dev key is only for loopback addresses)",
                self.bind_addr
            ));
        }
        let current = current.unwrap_or_else(|| Secret::from(crate::lease::DEV_LEASE_TOKEN_KEY));
        crate::lease::LeaseKeys::new(&self.lease_token_key_id, current, previous)
    }

    /// True when either token is unset (the built-in dev default applies) or set to the
    /// documented dev value.
    pub fn uses_dev_tokens(&self) -> bool {
        let dev = |token: &Option<Secret>, value: &str| {
            token.as_ref().is_none_or(|t| t.expose() == value)
        };
        dev(&self.api_token, DEV_TRACK_TOKEN) || dev(&self.admin_token, DEV_ADMIN_TOKEN)
    }

    /// A configuration with every default (tests override fields).
    pub fn defaults() -> Self {
        runtime::try_parse_settings_from(["command-api"]).unwrap_or_else(|e| e.exit())
    }
}

/// A token with its rotation: the previous value goes with its end time.
fn rotating(
    name: &str,
    current: &str,
    previous: &Option<Secret>,
    until: Option<&str>,
    now: DateTime<Utc>,
) -> Result<crate::rotation::RotatingSecret, String> {
    let secret = crate::rotation::RotatingSecret::new(current);
    match previous {
        None if until.is_some_and(|u| !u.trim().is_empty()) => Err(format!(
            "{name}_PREVIOUS_UNTIL is set without {name}_PREVIOUS"
        )),
        None => Ok(secret),
        Some(previous) => {
            let until =
                crate::rotation::parse_until(&format!("{name}_PREVIOUS_UNTIL"), until, now)?;
            Ok(secret.with_previous(previous.clone(), until))
        }
    }
}
