//! The jobs' settings: every tunable is an environment variable with a documented default, read
//! once at start-up by [`JobsConfig::from_env`] (or from any lookup function, for tests).

use std::time::Duration;

use thiserror::Error;

/// Which CSP the jobs talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CspMode {
    /// The real CSP API over HTTPS (the default).
    Real,
    /// The in-memory mock (`CSP_MODE=mock`, and only then: an empty token is an error, never a
    /// silent switch to the mock as in the reference's B16).
    Mock,
}

/// How to reach the CSP API and how hard to push it.
#[derive(Clone)]
pub struct CspConfig {
    /// `CSP_MODE`: `mock` or `real` (default `real`).
    pub mode: CspMode,
    /// `CSP_BASE_URL` (default `https://csp.infoblox.com/v2`).
    pub base_url: String,
    /// `CSP_API_TOKEN`, sent as `Authorization: Token …`; never logged (redacted in `Debug`).
    pub api_token: String,
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

impl std::fmt::Debug for CspConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CspConfig")
            .field("mode", &self.mode)
            .field("base_url", &self.base_url)
            .field(
                "api_token",
                &if self.api_token.is_empty() {
                    "<empty>"
                } else {
                    "<redacted>"
                },
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("page_size", &self.page_size)
            .field("max_pages", &self.max_pages)
            .field("rate_limit_rps", &self.rate_limit_rps)
            .field("retry_after_max", &self.retry_after_max)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_open_for", &self.breaker_open_for)
            .field("mock_accounts", &self.mock_accounts)
            .finish()
    }
}

impl Default for CspConfig {
    fn default() -> Self {
        Self {
            mode: CspMode::Real,
            base_url: "https://csp.infoblox.com/v2".into(),
            api_token: String::new(),
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
    /// Reads the process environment; unset or empty variables take their defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let d = JobsConfig::default();
        let mode = match env.get("CSP_MODE").map(|m| m.to_ascii_lowercase()) {
            None => CspMode::Real,
            Some(m) if m == "mock" => CspMode::Mock,
            Some(m) if m == "real" || m == "live" => CspMode::Real,
            Some(m) => {
                return Err(ConfigError::Invalid {
                    name: "CSP_MODE",
                    value: m,
                    reason: "expected `mock` or `real`".into(),
                })
            }
        };
        let csp = CspConfig {
            mode,
            base_url: env
                .get("CSP_BASE_URL")
                .unwrap_or(d.csp.base_url)
                .trim_end_matches('/')
                .to_string(),
            // Read raw: an all-blank token is as empty as an unset one.
            api_token: lookup("CSP_API_TOKEN")
                .unwrap_or_default()
                .trim()
                .to_string(),
            connect_timeout: env.secs("CSP_TIMEOUT_CONNECT_SEC", d.csp.connect_timeout)?,
            read_timeout: env.secs("CSP_TIMEOUT_READ_SEC", d.csp.read_timeout)?,
            page_size: env.int("CSP_PAGE_SIZE", d.csp.page_size)?,
            max_pages: env.int("CSP_MAX_PAGES", d.csp.max_pages)?,
            rate_limit_rps: env.float("CSP_RATE_LIMIT_RPS", d.csp.rate_limit_rps)?,
            retry_after_max: env.secs("CSP_RETRY_AFTER_MAX_SEC", d.csp.retry_after_max)?,
            breaker_threshold: env.int("CIRCUIT_BREAKER_THRESHOLD", d.csp.breaker_threshold)?,
            breaker_open_for: env.secs("CIRCUIT_BREAKER_TIMEOUT_SEC", d.csp.breaker_open_for)?,
            mock_accounts: env.int("CSP_MOCK_ACCOUNTS", d.csp.mock_accounts)?,
        };
        let config = JobsConfig {
            csp,
            deletion_max_attempts: env
                .int("DELETION_RETRY_MAX_ATTEMPTS", d.deletion_max_attempts)?,
            deletion_retry_window: env.scaled(
                "DELETION_RETRY_WINDOW_HOURS",
                3600.0,
                d.deletion_retry_window,
            )?,
            deletion_lease: env.secs("DELETION_LEASE_SEC", d.deletion_lease)?,
            deletion_backoff_base: env
                .secs("DELETION_BACKOFF_BASE_SEC", d.deletion_backoff_base)?,
            deletion_backoff_max: env.secs("DELETION_BACKOFF_MAX_SEC", d.deletion_backoff_max)?,
            cleanup_concurrency: env.int("CLEANUP_CONCURRENCY", d.cleanup_concurrency)?,
            cleanup_per_sandbox_delay: env
                .secs("CLEANUP_PER_SANDBOX_DELAY_SEC", d.cleanup_per_sandbox_delay)?,
            expiry_grace: env.scaled("GRACE_PERIOD_MINUTES", 60.0, d.expiry_grace)?,
            stale_grace: env.scaled("STALE_GRACE_HOURS", 3600.0, d.stale_grace)?,
            page_size: env.int("JOB_PAGE_SIZE", d.page_size)?,
            store_concurrency: env.int("SYNC_CONCURRENCY", d.store_concurrency)?,
            worker: WorkerConfig {
                sync_interval: env.secs("SYNC_INTERVAL_SEC", d.worker.sync_interval)?,
                cleanup_interval: env.secs("CLEANUP_INTERVAL_SEC", d.worker.cleanup_interval)?,
                auto_expiry_interval: env
                    .secs("AUTO_EXPIRY_INTERVAL_SEC", d.worker.auto_expiry_interval)?,
                stale_interval: env.secs("STALE_INTERVAL_SEC", d.worker.stale_interval)?,
                jitter: env.float("JOB_INTERVAL_JITTER", d.worker.jitter)?,
            },
            niosxaas: NiosxaasConfig {
                enabled: env.flag("NIOSXAAS_ENABLED", d.niosxaas.enabled)?,
                shadow_mode: env.flag("NIOSXAAS_SHADOW_MODE", d.niosxaas.shadow_mode)?,
            },
        };
        config.validate()?;
        Ok(config)
    }

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

/// Typed reads of optional variables; blank counts as unset.
struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: e.to_string(),
                value,
            }),
        }
    }

    fn int<T: std::str::FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.parse(name, default)
    }

    fn float(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let value = self.parse(name, default)?;
        if !value.is_finite() || value < 0.0 {
            return Err(ConfigError::Invalid {
                name,
                value: value.to_string(),
                reason: "must be a finite, non-negative number".into(),
            });
        }
        Ok(value)
    }

    /// A duration given in `unit_s`-second units (fractions allowed, e.g. `0.2` seconds).
    fn scaled(
        &self,
        name: &'static str,
        unit_s: f64,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        if self.get(name).is_none() {
            return Ok(default);
        }
        let units = self.float(name, 0.0)?;
        Duration::try_from_secs_f64(units * unit_s).map_err(|e| ConfigError::Invalid {
            name,
            value: units.to_string(),
            reason: e.to_string(),
        })
    }

    fn secs(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.scaled(name, 1.0, default)
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(value) => Err(ConfigError::Invalid {
                name,
                value,
                reason: "expected true or false".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<JobsConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        JobsConfig::from_lookup(|name| map.get(name).cloned())
    }

    /// With nothing set, every default of the table applies and the CSP is real.
    #[test]
    fn defaults() -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Mock mode needs `CSP_MODE=mock`; an empty token leaves the mode real.
    #[test]
    fn mock_only_when_asked() -> Result<(), ConfigError> {
        assert_eq!(from(&[("CSP_API_TOKEN", "")])?.csp.mode, CspMode::Real);
        assert_eq!(from(&[("CSP_MODE", "MOCK")])?.csp.mode, CspMode::Mock);
        assert!(matches!(
            from(&[("CSP_MODE", "fake")]),
            Err(ConfigError::Invalid {
                name: "CSP_MODE",
                ..
            })
        ));
        Ok(())
    }

    /// Values are parsed (fractions of seconds included); garbage and zero limits are refused.
    #[test]
    fn values_parse_and_validate() -> Result<(), ConfigError> {
        let c = from(&[
            ("CSP_TIMEOUT_READ_SEC", "0.2"),
            ("STALE_GRACE_HOURS", "2"),
            ("GRACE_PERIOD_MINUTES", "1"),
            ("CSP_BASE_URL", "http://127.0.0.1:9/v2/"),
            ("NIOSXAAS_ENABLED", "true"),
            ("DELETION_RETRY_WINDOW_HOURS", "0.5"),
        ])?;
        assert_eq!(c.csp.read_timeout, Duration::from_millis(200));
        assert_eq!(c.deletion_retry_window, Duration::from_secs(1800));
        assert_eq!(c.stale_grace, Duration::from_secs(7200));
        assert_eq!(c.expiry_grace, Duration::from_secs(60));
        assert_eq!(c.csp.base_url, "http://127.0.0.1:9/v2");
        assert!(c.niosxaas.enabled && c.niosxaas.shadow_mode);
        assert!(from(&[("CSP_PAGE_SIZE", "ten")]).is_err());
        assert!(from(&[("CSP_PAGE_SIZE", "0")]).is_err());
        assert!(from(&[("CSP_TIMEOUT_READ_SEC", "-1")]).is_err());
        assert_eq!(
            from(&[("NIOSXAAS_ENABLED", "1"), ("NIOSXAAS_SHADOW_MODE", "false")]).err(),
            Some(ConfigError::NiosxaasLiveUnsupported)
        );
        Ok(())
    }

    /// The token never shows in debug output.
    #[test]
    fn token_is_redacted() {
        let c = CspConfig {
            api_token: "s3cret".into(),
            ..CspConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<redacted>"));
    }
}
