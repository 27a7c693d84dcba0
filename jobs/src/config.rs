//! The jobs' settings: every tunable is an environment variable (or flag) with a documented
//! default, declared once in [`JobsArgs`] — flattened into the `jobs` binary and the API, so both
//! read the same names with the same types — and turned into a validated [`JobsConfig`].

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, ValueEnum};
use runtime::Secret;
use thiserror::Error;

/// Which CSP the jobs talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CspMode {
    /// The real CSP API over HTTPS (the default).
    #[value(alias = "live")]
    Real,
    /// The in-memory mock (`CSP_MODE=mock`, and only then: an empty token is an error, never a
    /// silent switch to the mock as in the reference's B16).
    Mock,
}

/// How to reach the CSP API and how hard to push it.
#[derive(Clone, Debug)]
pub struct CspConfig {
    /// `CSP_MODE`: `mock` or `real` (default `real`).
    pub mode: CspMode,
    /// `CSP_BASE_URL` (default `https://csp.infoblox.com/v2`).
    pub base_url: String,
    /// `CSP_API_TOKEN` (or `CSP_API_TOKEN_FILE`), sent as `Authorization: Token …`; never
    /// printed (a [`Secret`]).
    pub api_token: Secret,
    /// `CSP_TIMEOUT_CONNECT_SEC` (5).
    pub connect_timeout: Duration,
    /// `CSP_TIMEOUT_READ_SEC` (15): the longest silence while waiting for response bytes.
    pub read_timeout: Duration,
    /// `CSP_PAGE_SIZE` (100): `_limit` of each listing page.
    pub page_size: u32,
    /// `CSP_MAX_PAGES` (1000): hard cap on pages per listing, against a server that never ends.
    pub max_pages: u32,
    /// `CSP_RATE_LIMIT_RPS` (10): requests per second toward CSP from this process; 0 = unlimited.
    pub rate_limit_rps: f64,
    /// `CSP_RETRY_AFTER_MAX_SEC` (30): the longest `429 Retry-After` one call waits out before
    /// retrying once; a longer one is returned to the job as a deferral.
    pub retry_after_max: Duration,
    /// `CIRCUIT_BREAKER_THRESHOLD` (5): consecutive failures that open the circuit.
    pub breaker_threshold: u32,
    /// `CIRCUIT_BREAKER_TIMEOUT_SEC` (60): how long the circuit stays open before one probe.
    pub breaker_open_for: Duration,
    /// `CSP_MOCK_ACCOUNTS` (50): accounts the mock starts with.
    pub mock_accounts: u32,
}

impl Default for CspConfig {
    fn default() -> Self {
        Self {
            mode: CspMode::Real,
            base_url: "https://csp.infoblox.com/v2".into(),
            api_token: Secret::from(""),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(15),
            page_size: 100,
            max_pages: 1000,
            rate_limit_rps: 10.0,
            retry_after_max: Duration::from_secs(30),
            breaker_threshold: 5,
            breaker_open_for: Duration::from_secs(60),
            mock_accounts: 50,
        }
    }
}

/// The NIOSXaaS pre-delete step (see [`crate::niosxaas`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NiosxaasConfig {
    /// `NIOSXAAS_ENABLED` (false).
    pub enabled: bool,
    /// `NIOSXAAS_SHADOW_MODE` (true): count what would be deleted, delete nothing.
    pub shadow_mode: bool,
}

impl Default for NiosxaasConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            shadow_mode: true,
        }
    }
}

/// How often the worker runs each loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerConfig {
    /// `SYNC_INTERVAL_SEC` (600).
    pub sync_interval: Duration,
    /// `CLEANUP_INTERVAL_SEC` (300).
    pub cleanup_interval: Duration,
    /// `AUTO_EXPIRY_INTERVAL_SEC` (300).
    pub auto_expiry_interval: Duration,
    /// `STALE_INTERVAL_SEC` (3600).
    pub stale_interval: Duration,
    /// `JOB_INTERVAL_JITTER` (0.1): each wait is the interval ± this fraction, at random, so
    /// several worker instances started together drift apart instead of hitting CSP in step.
    pub jitter: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            sync_interval: Duration::from_secs(600),
            cleanup_interval: Duration::from_secs(300),
            auto_expiry_interval: Duration::from_secs(300),
            stale_interval: Duration::from_secs(3600),
            jitter: 0.1,
        }
    }
}

/// Everything the jobs need to know.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// The CSP client.
    pub csp: CspConfig,
    /// `DELETION_RETRY_MAX_ATTEMPTS` (5): CSP refusals (4xx other than 404/429) before quarantine.
    pub deletion_max_attempts: u32,
    /// `DELETION_RETRY_WINDOW_HOURS` (24): how long transient CSP failures (5xx, timeouts,
    /// connection errors) are retried, from the first failure, before quarantine.
    pub deletion_retry_window: Duration,
    /// `DELETION_LEASE_SEC` (300): how long a cleanup worker holds a sandbox's deletion before
    /// its CSP call, so that other workers leave it alone; must outlast one item's work.
    pub deletion_lease: Duration,
    /// `DELETION_BACKOFF_BASE_SEC` (60): the wait after the first failed delete; doubles each time.
    pub deletion_backoff_base: Duration,
    /// `DELETION_BACKOFF_MAX_SEC` (3600): the cap of that wait.
    pub deletion_backoff_max: Duration,
    /// `CLEANUP_CONCURRENCY` (4): CSP deletes in flight at once per cleanup run.
    pub cleanup_concurrency: usize,
    /// `CLEANUP_PER_SANDBOX_DELAY_SEC` (0): a pause after each delete, per concurrency slot.
    pub cleanup_per_sandbox_delay: Duration,
    /// `GRACE_PERIOD_MINUTES` (30): how long after `expires_at` auto-expiry ends an allocation.
    pub expiry_grace: Duration,
    /// `STALE_GRACE_HOURS` (24): how long a sandbox stays stale before it is retired.
    pub stale_grace: Duration,
    /// `JOB_PAGE_SIZE` (100): rows per view query (cleanup, expiry, stale, sync, bulk delete).
    pub page_size: usize,
    /// `SYNC_CONCURRENCY` (8): store commands in flight at once in the store-only jobs.
    pub store_concurrency: usize,
    /// The worker's loops.
    pub worker: WorkerConfig,
    /// The NIOSXaaS pre-delete step.
    pub niosxaas: NiosxaasConfig,
    /// Reservations: the write flag, limits, lead time and the job's interval (ADR 0028).
    pub reservations: crate::reservations::ReservationArgs,
    /// The heartbeat reclaim.
    pub heartbeats: crate::heartbeat::HeartbeatJobConfig,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            csp: CspConfig::default(),
            deletion_max_attempts: 5,
            deletion_retry_window: Duration::from_secs(24 * 3600),
            deletion_lease: Duration::from_secs(300),
            deletion_backoff_base: Duration::from_secs(60),
            deletion_backoff_max: Duration::from_secs(3600),
            cleanup_concurrency: 4,
            cleanup_per_sandbox_delay: Duration::ZERO,
            expiry_grace: Duration::from_secs(30 * 60),
            stale_grace: Duration::from_secs(24 * 3600),
            page_size: 100,
            store_concurrency: 8,
            worker: WorkerConfig::default(),
            niosxaas: NiosxaasConfig::default(),
            reservations: crate::reservations::ReservationArgs::default(),
            heartbeats: crate::heartbeat::HeartbeatJobConfig::default(),
        }
    }
}

/// A setting that could not be used.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// What it was set to.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Real CSP mode without a token.
    #[error("CSP_API_TOKEN is empty; set it, or set CSP_MODE=mock to use the in-memory mock CSP")]
    MissingToken,
    /// NIOSXaaS live mode was asked for, but only the hook point exists so far.
    #[error(
        "NIOSXAAS_ENABLED=true with NIOSXAAS_SHADOW_MODE=false asks for live NIOSXaaS deletes, \
         which this build does not implement yet (see jobs::niosxaas); keep shadow mode on"
    )]
    NiosxaasLiveUnsupported,
}

impl JobsConfig {
    /// Range checks that hold in every mode. (The token is checked when the real client is
    /// built, so a process that only reads the config — e.g. the API in mock mode — starts.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |name: &'static str, value: u64| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    name,
                    value: "0".into(),
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("CSP_PAGE_SIZE", self.csp.page_size.into())?;
        positive("CSP_MAX_PAGES", self.csp.max_pages.into())?;
        positive(
            "CIRCUIT_BREAKER_THRESHOLD",
            self.csp.breaker_threshold.into(),
        )?;
        positive(
            "DELETION_RETRY_MAX_ATTEMPTS",
            self.deletion_max_attempts.into(),
        )?;
        positive("CLEANUP_CONCURRENCY", self.cleanup_concurrency as u64)?;
        positive("JOB_PAGE_SIZE", self.page_size as u64)?;
        positive("SYNC_CONCURRENCY", self.store_concurrency as u64)?;
        if !(0.0..=1.0).contains(&self.worker.jitter) {
            return Err(ConfigError::Invalid {
                name: "JOB_INTERVAL_JITTER",
                value: self.worker.jitter.to_string(),
                reason: "must be between 0 and 1".into(),
            });
        }
        if self.niosxaas.enabled && !self.niosxaas.shadow_mode {
            return Err(ConfigError::NiosxaasLiveUnsupported);
        }
        Ok(())
    }
}

/// The jobs' settings as command-line flags and environment variables. Parsing checks types and
/// ranges, so a bad value stops start-up with clap's message naming the setting;
/// [`JobsArgs::config`] then applies the cross-setting checks of [`JobsConfig::validate`].
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// `mock` (the in-memory CSP) or `real`; unset = `real` (the API's embedded mode: `mock`).
    #[arg(long, env = "CSP_MODE", value_enum, ignore_case = true)]
    pub csp_mode: Option<CspMode>,
    /// CSP API base URL.
    #[arg(
        long,
        env = "CSP_BASE_URL",
        default_value = "https://csp.infoblox.com/v2"
    )]
    pub csp_base_url: String,
    /// CSP API token (sent as `Authorization: Token …`; required in real mode; environment or
    /// `CSP_API_TOKEN_FILE` only).
    #[arg(long, env = "CSP_API_TOKEN", hide_env_values = true)]
    pub csp_api_token: Option<Secret>,
    /// File holding `CSP_API_TOKEN` (instead of the variable; trailing whitespace ignored).
    #[arg(long, env = "CSP_API_TOKEN_FILE")]
    pub csp_api_token_file: Option<std::path::PathBuf>,
    /// CSP connect timeout, seconds.
    #[arg(long, env = "CSP_TIMEOUT_CONNECT_SEC", default_value_t = 5.0, value_parser = non_negative)]
    pub csp_timeout_connect_sec: f64,
    /// Longest silence while waiting for CSP response bytes, seconds.
    #[arg(long, env = "CSP_TIMEOUT_READ_SEC", default_value_t = 15.0, value_parser = non_negative)]
    pub csp_timeout_read_sec: f64,
    /// `_limit` of each CSP listing page.
    #[arg(long, env = "CSP_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub csp_page_size: u32,
    /// Hard cap on pages per CSP listing.
    #[arg(long, env = "CSP_MAX_PAGES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub csp_max_pages: u32,
    /// Requests per second toward CSP from this process; 0 = unlimited.
    #[arg(long, env = "CSP_RATE_LIMIT_RPS", default_value_t = 10.0, value_parser = non_negative)]
    pub csp_rate_limit_rps: f64,
    /// Longest `429 Retry-After` one CSP call waits out, seconds; longer ones defer the job.
    #[arg(long, env = "CSP_RETRY_AFTER_MAX_SEC", default_value_t = 30.0, value_parser = non_negative)]
    pub csp_retry_after_max_sec: f64,
    /// Consecutive CSP failures that open the circuit.
    #[arg(long, env = "CIRCUIT_BREAKER_THRESHOLD", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub circuit_breaker_threshold: u32,
    /// How long the circuit stays open before one probe, seconds.
    #[arg(long, env = "CIRCUIT_BREAKER_TIMEOUT_SEC", default_value_t = 60.0, value_parser = non_negative)]
    pub circuit_breaker_timeout_sec: f64,
    /// Accounts the mock CSP starts with.
    #[arg(long, env = "CSP_MOCK_ACCOUNTS", default_value_t = 50)]
    pub csp_mock_accounts: u32,
    /// CSP refusals of a delete (4xx other than 404/429) before quarantine.
    #[arg(long, env = "DELETION_RETRY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub deletion_retry_max_attempts: u32,
    /// Hours transient delete failures (5xx, timeouts, connection errors, 429) are retried,
    /// from the first failure, before quarantine (fractions allowed).
    #[arg(long, env = "DELETION_RETRY_WINDOW_HOURS", default_value_t = 24.0, value_parser = non_negative)]
    pub deletion_retry_window_hours: f64,
    /// Seconds a cleanup worker leases a sandbox's deletion before calling CSP.
    #[arg(long, env = "DELETION_LEASE_SEC", default_value_t = 300.0, value_parser = non_negative)]
    pub deletion_lease_sec: f64,
    /// Wait after the first failed delete, seconds; doubles each time.
    #[arg(long, env = "DELETION_BACKOFF_BASE_SEC", default_value_t = 60.0, value_parser = non_negative)]
    pub deletion_backoff_base_sec: f64,
    /// Cap of that wait, seconds.
    #[arg(long, env = "DELETION_BACKOFF_MAX_SEC", default_value_t = 3600.0, value_parser = non_negative)]
    pub deletion_backoff_max_sec: f64,
    /// CSP deletes in flight at once per cleanup run.
    #[arg(long, env = "CLEANUP_CONCURRENCY", default_value_t = 4, value_parser = at_least_one)]
    pub cleanup_concurrency: usize,
    /// Pause after each delete, per concurrency slot, seconds.
    #[arg(long, env = "CLEANUP_PER_SANDBOX_DELAY_SEC", default_value_t = 0.0, value_parser = non_negative)]
    pub cleanup_per_sandbox_delay_sec: f64,
    /// Minutes after `expires_at` before auto-expiry ends an allocation (fractions allowed).
    #[arg(long, env = "GRACE_PERIOD_MINUTES", default_value_t = 30.0, value_parser = non_negative)]
    pub grace_period_minutes: f64,
    /// Hours a sandbox stays stale before it is retired (fractions allowed).
    #[arg(long, env = "STALE_GRACE_HOURS", default_value_t = 24.0, value_parser = non_negative)]
    pub stale_grace_hours: f64,
    /// Rows per view query of the jobs (cleanup, expiry, stale, sync, bulk delete).
    #[arg(long, env = "JOB_PAGE_SIZE", default_value_t = 100, value_parser = at_least_one)]
    pub job_page_size: usize,
    /// Store commands in flight at once in the store-only jobs.
    #[arg(long, env = "SYNC_CONCURRENCY", default_value_t = 8, value_parser = at_least_one)]
    pub sync_concurrency: usize,
    /// Worker: sync every this many seconds.
    #[arg(long, env = "SYNC_INTERVAL_SEC", default_value_t = 600.0, value_parser = non_negative)]
    pub sync_interval_sec: f64,
    /// Worker: cleanup every this many seconds.
    #[arg(long, env = "CLEANUP_INTERVAL_SEC", default_value_t = 300.0, value_parser = non_negative)]
    pub cleanup_interval_sec: f64,
    /// Worker: auto-expiry every this many seconds.
    #[arg(long, env = "AUTO_EXPIRY_INTERVAL_SEC", default_value_t = 300.0, value_parser = non_negative)]
    pub auto_expiry_interval_sec: f64,
    /// Worker: stale removal every this many seconds.
    #[arg(long, env = "STALE_INTERVAL_SEC", default_value_t = 3600.0, value_parser = non_negative)]
    pub stale_interval_sec: f64,
    /// Worker: each wait is the interval ± this fraction (0–1), so instances drift apart.
    #[arg(long, env = "JOB_INTERVAL_JITTER", default_value_t = 0.1, value_parser = fraction)]
    pub job_interval_jitter: f64,
    /// Run the NIOSXaaS pre-delete step.
    #[arg(long, env = "NIOSXAAS_ENABLED", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub niosxaas_enabled: bool,
    /// NIOSXaaS: count what would be deleted, delete nothing.
    #[arg(long, env = "NIOSXAAS_SHADOW_MODE", default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub niosxaas_shadow_mode: bool,
    /// Reservation settings (ADR 0028), shared with the API.
    #[command(flatten)]
    pub reservations: crate::reservations::ReservationArgs,
    /// Tracks whose labs send heartbeats: `track=INTERVAL[/GRACE],…` in seconds (grace default
    /// 2700, at least 300 and three intervals); blank: none. Allocations of these tracks record
    /// the policy; the reclaim warns at half the grace and reclaims at the whole (ADR 0030).
    #[arg(long, env = "HEARTBEAT_TRACKS", default_value = "")]
    pub heartbeat_tracks: String,
    /// Worker: the heartbeat reclaim every this many seconds.
    #[arg(long, env = "HEARTBEAT_CHECK_INTERVAL_SEC", default_value_t = 60.0, value_parser = non_negative)]
    pub heartbeat_check_interval_sec: f64,
    /// Write `HeartbeatMissed` events (the reclaim's warning; the reclaim acts only with it on).
    /// Turn on once every process runs this release (docs/upgrades.md).
    #[arg(long, env = "WRITE_EVENTS_HEARTBEATS", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub write_events_heartbeats: bool,
}

impl JobsArgs {
    /// The tracks that opted in to heartbeats (`HEARTBEAT_TRACKS`).
    pub fn heartbeat_policies(&self) -> Result<domain::heartbeat::HeartbeatPolicies, ConfigError> {
        domain::heartbeat::HeartbeatPolicies::parse(&self.heartbeat_tracks).map_err(|reason| {
            ConfigError::Invalid {
                name: "HEARTBEAT_TRACKS",
                value: self.heartbeat_tracks.clone(),
                reason,
            }
        })
    }

    /// The auto-expiry grace (`GRACE_PERIOD_MINUTES`).
    pub fn expiry_grace(&self) -> Result<Duration, ConfigError> {
        scaled("GRACE_PERIOD_MINUTES", self.grace_period_minutes, 60.0)
    }

    /// The validated configuration; CSP mode `real` when `CSP_MODE` is unset.
    pub fn config(&self) -> Result<JobsConfig, ConfigError> {
        let secs = |name, value| scaled(name, value, 1.0);
        let config = JobsConfig {
            csp: CspConfig {
                mode: self.csp_mode.unwrap_or(CspMode::Real),
                base_url: self.csp_base_url.trim().trim_end_matches('/').to_string(),
                // An all-blank token is as empty as an unset one.
                api_token: Secret::from(
                    runtime::secret::from_value_or_file(
                        "CSP_API_TOKEN",
                        self.csp_api_token.as_ref(),
                        self.csp_api_token_file.as_deref(),
                    )
                    .map_err(|reason| ConfigError::Invalid {
                        name: "CSP_API_TOKEN",
                        value: "<redacted>".into(),
                        reason,
                    })?
                    .as_ref()
                    .map_or("", Secret::expose)
                    .trim(),
                ),
                connect_timeout: secs("CSP_TIMEOUT_CONNECT_SEC", self.csp_timeout_connect_sec)?,
                read_timeout: secs("CSP_TIMEOUT_READ_SEC", self.csp_timeout_read_sec)?,
                page_size: self.csp_page_size,
                max_pages: self.csp_max_pages,
                rate_limit_rps: self.csp_rate_limit_rps,
                retry_after_max: secs("CSP_RETRY_AFTER_MAX_SEC", self.csp_retry_after_max_sec)?,
                breaker_threshold: self.circuit_breaker_threshold,
                breaker_open_for: secs(
                    "CIRCUIT_BREAKER_TIMEOUT_SEC",
                    self.circuit_breaker_timeout_sec,
                )?,
                mock_accounts: self.csp_mock_accounts,
            },
            deletion_max_attempts: self.deletion_retry_max_attempts,
            deletion_retry_window: scaled(
                "DELETION_RETRY_WINDOW_HOURS",
                self.deletion_retry_window_hours,
                3600.0,
            )?,
            deletion_lease: secs("DELETION_LEASE_SEC", self.deletion_lease_sec)?,
            deletion_backoff_base: secs(
                "DELETION_BACKOFF_BASE_SEC",
                self.deletion_backoff_base_sec,
            )?,
            deletion_backoff_max: secs("DELETION_BACKOFF_MAX_SEC", self.deletion_backoff_max_sec)?,
            cleanup_concurrency: self.cleanup_concurrency,
            cleanup_per_sandbox_delay: secs(
                "CLEANUP_PER_SANDBOX_DELAY_SEC",
                self.cleanup_per_sandbox_delay_sec,
            )?,
            expiry_grace: self.expiry_grace()?,
            stale_grace: scaled("STALE_GRACE_HOURS", self.stale_grace_hours, 3600.0)?,
            page_size: self.job_page_size,
            store_concurrency: self.sync_concurrency,
            worker: WorkerConfig {
                sync_interval: secs("SYNC_INTERVAL_SEC", self.sync_interval_sec)?,
                cleanup_interval: secs("CLEANUP_INTERVAL_SEC", self.cleanup_interval_sec)?,
                auto_expiry_interval: secs(
                    "AUTO_EXPIRY_INTERVAL_SEC",
                    self.auto_expiry_interval_sec,
                )?,
                stale_interval: secs("STALE_INTERVAL_SEC", self.stale_interval_sec)?,
                jitter: self.job_interval_jitter,
            },
            niosxaas: NiosxaasConfig {
                enabled: self.niosxaas_enabled,
                shadow_mode: self.niosxaas_shadow_mode,
            },
            reservations: self.reservations.clone(),
            heartbeats: crate::heartbeat::HeartbeatJobConfig {
                write_events: self.write_events_heartbeats,
                check_interval: secs(
                    "HEARTBEAT_CHECK_INTERVAL_SEC",
                    self.heartbeat_check_interval_sec,
                )?,
            },
        };
        config.validate()?;
        Ok(config)
    }
}

/// `units` of `unit_s` seconds as a duration; refuses what `Duration` cannot hold.
fn scaled(name: &'static str, units: f64, unit_s: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(units * unit_s).map_err(|e| ConfigError::Invalid {
        name,
        value: units.to_string(),
        reason: e.to_string(),
    })
}

/// A finite number ≥ 0 (durations, rates).
fn non_negative(raw: &str) -> Result<f64, String> {
    let value: f64 = raw.trim().parse().map_err(|e| format!("{e}"))?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err("must be a finite, non-negative number".into())
    }
}

/// A fraction between 0 and 1.
fn fraction(raw: &str) -> Result<f64, String> {
    let value = non_negative(raw)?;
    if value <= 1.0 {
        Ok(value)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// A count of at least 1.
fn at_least_one(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(value) => Ok(value),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        jobs: JobsArgs,
    }

    /// Parses `flags` (`--name value` pairs) the way the binaries do; any error as text.
    fn from(flags: &[(&str, &str)]) -> Result<JobsConfig, String> {
        let mut argv = vec!["probe".to_string()];
        for (name, value) in flags {
            argv.push(format!("--{name}={value}"));
        }
        let probe = Probe::try_parse_from(argv).map_err(|e| e.to_string())?;
        probe.jobs.config().map_err(|e| e.to_string())
    }

    /// With nothing set, every default of the settings table applies and the CSP is real.
    #[test]
    fn defaults() -> Result<(), String> {
        let c = from(&[])?;
        assert_eq!(c.csp.mode, CspMode::Real);
        assert_eq!(c.csp.base_url, "https://csp.infoblox.com/v2");
        assert_eq!(c.csp.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.csp.read_timeout, Duration::from_secs(15));
        assert_eq!((c.csp.page_size, c.csp.max_pages), (100, 1000));
        assert_eq!(c.csp.rate_limit_rps, 10.0);
        assert_eq!(c.csp.breaker_threshold, 5);
        assert_eq!(c.csp.breaker_open_for, Duration::from_secs(60));
        assert_eq!(c.deletion_max_attempts, 5);
        assert_eq!(c.deletion_retry_window, Duration::from_secs(24 * 3600));
        assert_eq!(c.deletion_lease, Duration::from_secs(300));
        assert_eq!(c.deletion_backoff_base, Duration::from_secs(60));
        assert_eq!(c.deletion_backoff_max, Duration::from_secs(3600));
        assert_eq!(c.cleanup_concurrency, 4);
        assert_eq!(c.cleanup_per_sandbox_delay, Duration::ZERO);
        assert_eq!(c.expiry_grace, Duration::from_secs(1800));
        assert_eq!(c.stale_grace, Duration::from_secs(86_400));
        assert_eq!(c.worker.sync_interval, Duration::from_secs(600));
        assert_eq!(c.worker.cleanup_interval, Duration::from_secs(300));
        assert_eq!(c.worker.auto_expiry_interval, Duration::from_secs(300));
        assert_eq!(c.worker.stale_interval, Duration::from_secs(3600));
        assert_eq!(c.niosxaas, NiosxaasConfig::default());
        // The parsed defaults and `JobsConfig::default()` are one set of numbers.
        assert_eq!(format!("{c:?}"), format!("{:?}", JobsConfig::default()));
        Ok(())
    }

    /// Mock mode needs `CSP_MODE=mock` (any case; `live` means real); an empty token leaves the
    /// mode real; other modes are refused.
    #[test]
    fn mock_only_when_asked() -> Result<(), String> {
        assert_eq!(from(&[("csp-api-token", "")])?.csp.mode, CspMode::Real);
        assert_eq!(from(&[("csp-mode", "MOCK")])?.csp.mode, CspMode::Mock);
        assert_eq!(from(&[("csp-mode", "live")])?.csp.mode, CspMode::Real);
        let refused = from(&[("csp-mode", "fake")]).err().unwrap_or_default();
        assert!(refused.contains("fake"), "{refused}");
        Ok(())
    }

    /// Values are parsed (fractions included, e.g. a 1.5-minute grace); garbage and zero limits
    /// are refused with a message naming the setting.
    #[test]
    fn values_parse_and_validate() -> Result<(), String> {
        let c = from(&[
            ("csp-timeout-read-sec", "0.2"),
            ("stale-grace-hours", "2"),
            ("grace-period-minutes", "1.5"),
            ("csp-base-url", "http://127.0.0.1:9/v2/"),
            ("niosxaas-enabled", "true"),
            ("deletion-retry-window-hours", "0.5"),
        ])?;
        assert_eq!(c.csp.read_timeout, Duration::from_millis(200));
        assert_eq!(c.deletion_retry_window, Duration::from_secs(1800));
        assert_eq!(c.stale_grace, Duration::from_secs(7200));
        assert_eq!(c.expiry_grace, Duration::from_secs(90));
        assert_eq!(c.csp.base_url, "http://127.0.0.1:9/v2");
        assert!(c.niosxaas.enabled && c.niosxaas.shadow_mode);
        for (name, value) in [
            ("csp-page-size", "ten"),
            ("csp-page-size", "0"),
            ("csp-timeout-read-sec", "-1"),
            ("job-interval-jitter", "1.5"),
            ("cleanup-concurrency", "0"),
        ] {
            let refused = from(&[(name, value)]).err().unwrap_or_default();
            assert!(
                refused.contains(&format!("--{name}")),
                "{name}={value}: {refused}"
            );
        }
        assert_eq!(
            from(&[("niosxaas-enabled", "1"), ("niosxaas-shadow-mode", "false")]).err(),
            Some(ConfigError::NiosxaasLiveUnsupported.to_string())
        );
        Ok(())
    }

    /// The token never shows in debug output.
    #[test]
    fn token_is_redacted() {
        let c = CspConfig {
            api_token: Secret::from("s3cret"),
            ..CspConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<redacted>"));
    }
}
