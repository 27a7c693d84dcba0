//! The CSP (Infoblox Cloud Services Portal) as the jobs see it: a [`CspApi`] that lists the active
//! sandbox accounts and deletes one. The real client ([`http::HttpCsp`]) and the in-memory mock
//! ([`mock::MockCsp`]) implement it, so every job runs unchanged against either.

pub mod breaker;
pub mod http;
pub mod mock;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use thiserror::Error;

use domain::SharedClock;

use crate::config::{ConfigError, CspConfig, CspMode};
use crate::metrics::CspMetrics;
pub use breaker::CircuitState;

/// One active CSP sandbox account, mapped to the broker's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CspAccount {
    /// Broker id: CSP `csp_id`, or `id` when `csp_id` is absent or null.
    pub sandbox_id: String,
    /// CSP `name` (default `sandbox-{id}`).
    pub name: String,
    /// CSP `id`, e.g. `identity/accounts/<uuid>`; its last segment names the account to delete.
    pub external_id: String,
    /// CSP `created_at` (ISO-8601; unparseable → `None`).
    pub created_at: Option<DateTime<Utc>>,
    /// CSP `sfdc_account_id` (empty → `None`).
    pub sfdc_account_id: Option<String>,
}

/// The result of paging through the account list.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Active sandbox accounts seen, in listing order.
    pub accounts: Vec<CspAccount>,
    /// Pages read successfully.
    pub pages: u32,
    /// Why the listing stopped early, if it did (an error mid-way or the page cap). A listing
    /// with an error is incomplete: what it holds is real, what it lacks proves nothing.
    pub error: Option<CspError>,
}

impl Listing {
    /// True when every page was read up to a short (final) page.
    pub fn is_complete(&self) -> bool {
        self.error.is_none()
    }
}

/// CSP confirmed the account is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// 200, 204, or 404 (already gone).
    pub status: u16,
}

/// Why a CSP call did not succeed.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum CspError {
    /// The circuit is open: nothing was sent. A deferral, never a failure of the sandbox.
    #[error("CSP circuit open; retry in {retry_after_s}s")]
    CircuitOpen {
        /// Seconds until a probe is allowed.
        retry_after_s: u64,
    },
    /// CSP answered `429` with a wait longer than this call may take. A deferral.
    #[error("CSP rate limited; retry in {retry_after_s}s")]
    RateLimited {
        /// CSP's `Retry-After`, seconds.
        retry_after_s: u64,
    },
    /// CSP refused our credentials (`401`): a problem of this deployment, not of any sandbox,
    /// so it defers work instead of spending every sandbox's retry budget on a bad token.
    #[error("CSP rejected the API token (HTTP 401); check CSP_API_TOKEN")]
    Unauthorized,
    /// No answer within the connect or read timeout.
    #[error("CSP timeout: {0}")]
    Timeout(String),
    /// Connection refused, reset, TLS, DNS…
    #[error("CSP transport error: {0}")]
    Transport(String),
    /// An unexpected HTTP status.
    #[error("CSP HTTP {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A body that is not the documented JSON.
    #[error("CSP returned malformed data: {0}")]
    Malformed(String),
    /// The listing reached `CSP_MAX_PAGES` without a short page.
    #[error("CSP listing still not finished after {max_pages} pages (CSP_MAX_PAGES)")]
    TooManyPages {
        /// The cap.
        max_pages: u32,
    },
    /// The request could not be built (e.g. an external id without an account uuid).
    #[error("invalid CSP request: {0}")]
    InvalidRequest(String),
}

impl CspError {
    /// Errors that postpone work without saying anything about the sandbox: the job records
    /// nothing and tries again later (the reference turned these into failures, §12 B8).
    /// A `403` is not among them: it may concern one account only, so it is retried and, if it
    /// persists, quarantined for an operator.
    pub fn is_deferral(&self) -> bool {
        matches!(
            self,
            CspError::CircuitOpen { .. } | CspError::RateLimited { .. } | CspError::Unauthorized
        )
    }

    /// Failures that say nothing about the account itself — the service was unwell or
    /// unreachable (5xx, timeouts, connection errors, a garbled answer, rate limiting) — so a
    /// later attempt may well succeed: cleanup retries them for `DELETION_RETRY_WINDOW_HOURS`
    /// instead of spending the attempt budget. Anything else (a 4xx refusal other than 404/429,
    /// a request we cannot even build) is a refusal that counts toward
    /// `DELETION_RETRY_MAX_ATTEMPTS`.
    pub fn is_transient(&self) -> bool {
        match self {
            CspError::CircuitOpen { .. }
            | CspError::RateLimited { .. }
            | CspError::Timeout(_)
            | CspError::Transport(_)
            | CspError::Malformed(_) => true,
            CspError::Status { status, .. } => matches!(status, 408 | 429 | 500..),
            CspError::Unauthorized
            | CspError::TooManyPages { .. }
            | CspError::InvalidRequest(_) => false,
        }
    }

    /// Errors that say the CSP service is unwell, and so count toward opening the circuit.
    pub fn counts_against_circuit(&self) -> bool {
        match self {
            CspError::Timeout(_) | CspError::Transport(_) | CspError::Malformed(_) => true,
            CspError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The `outcome` label of `broker_csp_requests_total`.
    pub fn outcome_label(&self) -> &'static str {
        match self {
            CspError::CircuitOpen { .. } => "circuit_open",
            CspError::RateLimited { .. } => "rate_limited",
            CspError::Unauthorized => "unauthorized",
            CspError::Timeout(_) => "timeout",
            CspError::Transport(_) => "transport_error",
            CspError::Status { status, .. } if *status >= 500 => "server_error",
            CspError::Status { .. } => "client_error",
            CspError::Malformed(_) | CspError::TooManyPages { .. } => "malformed",
            CspError::InvalidRequest(_) => "invalid_request",
        }
    }
}

/// The CSP operations the jobs need.
#[async_trait]
pub trait CspApi: Send + Sync + 'static {
    /// Every active sandbox account, all pages. Never fails outright: an incomplete listing
    /// carries its error (see [`Listing::error`]).
    async fn list_sandboxes(&self) -> Listing;

    /// Deletes the account named by the last path segment of `external_id`; `Ok` means gone.
    async fn delete_sandbox(&self, external_id: &str) -> Result<Deleted, CspError>;

    /// The circuit breaker's state (a client without one is always closed).
    fn circuit_state(&self) -> CircuitState {
        CircuitState::Closed
    }
}

/// Builds the CSP client the configuration asks for: the mock only for `CSP_MODE=mock`; the
/// real client otherwise, which refuses to start without a token.
pub fn build_csp(
    config: &CspConfig,
    clock: SharedClock,
    metrics: &CspMetrics,
) -> Result<Arc<dyn CspApi>, ConfigError> {
    match config.mode {
        CspMode::Mock => {
            tracing::warn!(target: "csp", accounts = config.mock_accounts, "CSP_MODE=mock: using the in-memory mock CSP");
            Ok(Arc::new(mock::MockCsp::seeded(config.mock_accounts)))
        }
        CspMode::Real => {
            if config.api_token.expose().is_empty() {
                return Err(ConfigError::MissingToken);
            }
            let client = http::HttpCsp::new(config, clock, metrics.clone()).map_err(|e| {
                ConfigError::Invalid {
                    name: "CSP_BASE_URL",
                    value: config.base_url.clone(),
                    reason: e.to_string(),
                }
            })?;
            Ok(Arc::new(client))
        }
    }
}

/// The account uuid in an external id (`identity/accounts/<uuid>` → `<uuid>`).
pub fn account_uuid(external_id: &str) -> Option<&str> {
    external_id
        .rsplit('/')
        .next()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Maps one item of `results[]`; `None` for anything but an active sandbox with an id.
pub fn map_account(item: &serde_json::Value) -> Option<CspAccount> {
    let text = |key: &str| -> Option<String> {
        match item.get(key)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    if text("account_type").as_deref() != Some("sandbox")
        || text("state").as_deref() != Some("active")
    {
        return None;
    }
    let id = text("id")?;
    // A null (or empty) csp_id falls back to id; the reference produced the id "None" (§12 B16).
    let sandbox_id = text("csp_id").unwrap_or_else(|| id.clone());
    Some(CspAccount {
        name: text("name").unwrap_or_else(|| format!("sandbox-{id}")),
        created_at: text("created_at").as_deref().and_then(parse_time),
        sfdc_account_id: text("sfdc_account_id"),
        external_id: id,
        sandbox_id,
    })
}

/// ISO-8601 with an offset or `Z`; a time without an offset is taken as UTC.
fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The reference's field mapping, with its null-csp_id and empty-sfdc defects fixed.
    #[test]
    fn maps_accounts() {
        let full = json!({"id": "identity/accounts/u-1", "csp_id": 1234, "name": "lab-1",
            "account_type": "sandbox", "state": "active",
            "created_at": "2025-11-18T16:00:00Z", "sfdc_account_id": "SF-9"});
        let a = map_account(&full);
        assert_eq!(
            a,
            Some(CspAccount {
                sandbox_id: "1234".into(),
                name: "lab-1".into(),
                external_id: "identity/accounts/u-1".into(),
                created_at: DateTime::parse_from_rfc3339("2025-11-18T16:00:00Z")
                    .ok()
                    .map(|t| t.with_timezone(&Utc)),
                sfdc_account_id: Some("SF-9".into()),
            })
        );
        let sparse = json!({"id": "identity/accounts/u-2", "csp_id": null,
            "account_type": "sandbox", "state": "active",
            "created_at": "yesterday", "sfdc_account_id": ""});
        let a = map_account(&sparse);
        assert_eq!(
            a.as_ref().map(|a| a.sandbox_id.as_str()),
            Some("identity/accounts/u-2")
        );
        assert_eq!(
            a.as_ref().map(|a| a.name.as_str()),
            Some("sandbox-identity/accounts/u-2")
        );
        assert_eq!(a.as_ref().and_then(|a| a.created_at), None);
        assert_eq!(a.as_ref().and_then(|a| a.sfdc_account_id.clone()), None);
        let naive = json!({"id": "x", "account_type": "sandbox", "state": "active",
            "created_at": "2025-01-02T03:04:05.123"});
        assert!(map_account(&naive).and_then(|a| a.created_at).is_some());
    }

    /// Only active sandboxes with an id are kept.
    #[test]
    fn filters_accounts() {
        for item in [
            json!({"id": "a", "account_type": "regular", "state": "active"}),
            json!({"id": "a", "account_type": "sandbox", "state": "deleted"}),
            json!({"account_type": "sandbox", "state": "active"}),
            json!("not an object"),
        ] {
            assert_eq!(map_account(&item), None, "{item}");
        }
    }

    /// The uuid is the last path segment.
    #[test]
    fn uuid_of_external_id() {
        assert_eq!(account_uuid("identity/accounts/abc"), Some("abc"));
        assert_eq!(account_uuid("abc"), Some("abc"));
        assert_eq!(account_uuid("identity/accounts/"), None);
        assert_eq!(account_uuid(""), None);
    }
}
