//! The real CSP client (reqwest + rustls). Every request passes three gates in order: the
//! circuit breaker (fail fast while CSP is down), the rate limiter (a steady pace toward CSP,
//! pushed back by `429 Retry-After`), and the connect/read timeouts. Listing pages through
//! `_offset`/`_limit` until a short page, under a hard page cap (the reference read one page
//! only and lost the rest, §12 B9).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use domain::SharedClock;

use super::breaker::{CircuitBreaker, CircuitState};
use super::{account_uuid, map_account, CspApi, CspError, Deleted, Listing};
use crate::config::CspConfig;
use crate::metrics::CspMetrics;

/// How much of an error body is kept in errors (and so in `DeletionAttemptFailed.error`).
const ERROR_BODY_CHARS: usize = 200;
/// The wait assumed when a `429` carries no usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest `Retry-After` believed: a larger value is clamped to this, so no arithmetic on
/// instants can overflow and a hostile or broken server cannot park the client for years.
const RETRY_AFTER_CEILING: Duration = Duration::from_secs(3600);
/// The largest response body read; a listing page of 100 accounts is a few tens of KiB.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// The whole exchange (connect, send, every byte of the body) must finish within this many read
/// timeouts plus the connect timeout: the read timeout alone lets a trickling server keep a
/// request open forever.
const TOTAL_TIMEOUT_READS: u32 = 2;

/// The HTTP client of the CSP API.
#[derive(Debug)]
pub struct HttpCsp {
    client: reqwest::Client,
    accounts_url: Url,
    delete_url: Url,
    page_size: u32,
    max_pages: u32,
    retry_after_max: Duration,
    breaker: CircuitBreaker,
    limiter: RateLimiter,
    metrics: CspMetrics,
}

impl HttpCsp {
    /// A client for `config.base_url`; the breaker reads `clock`.
    pub fn new(
        config: &CspConfig,
        clock: SharedClock,
        metrics: CspMetrics,
    ) -> Result<Self, CspError> {
        let base = config.base_url.trim_end_matches('/');
        let parse = |url: String| {
            Url::parse(&url).map_err(|e| CspError::InvalidRequest(format!("{url}: {e}")))
        };
        let accounts_url = parse(format!("{base}/current_user/accounts"))?;
        let delete_url = parse(format!("{base}/sandbox/accounts"))?;
        if delete_url.cannot_be_a_base() {
            return Err(CspError::InvalidRequest(format!(
                "{base} is not an http(s) URL"
            )));
        }
        if !transport_allowed(&accounts_url) {
            return Err(CspError::InvalidRequest(format!(
                "{base}: CSP_BASE_URL must be https (plain http only to a loopback test server)"
            )));
        }
        let mut auth = HeaderValue::from_str(&format!("Token {}", config.api_token.expose()))
            .map_err(|_| {
                CspError::InvalidRequest("CSP_API_TOKEN is not a valid header value".into())
            })?;
        // Keeps the token out of reqwest's debug output.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .timeout(config.connect_timeout + config.read_timeout * TOTAL_TIMEOUT_READS)
            // A redirect could carry the token's requests to another host; CSP never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sandbox-broker-jobs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CspError::Transport(format!("building the HTTP client: {e}")))?;
        let open_for =
            chrono::Duration::from_std(config.breaker_open_for).unwrap_or(chrono::Duration::MAX);
        Ok(Self {
            client,
            accounts_url,
            delete_url,
            page_size: config.page_size.max(1),
            max_pages: config.max_pages.max(1),
            retry_after_max: config.retry_after_max,
            breaker: CircuitBreaker::new(
                config.breaker_threshold,
                open_for,
                clock,
                metrics.circuit_state.clone(),
            ),
            limiter: RateLimiter::new(config.rate_limit_rps),
            metrics,
        })
    }

    /// One page of `results[]` at `offset`.
    async fn page(&self, offset: u64) -> Result<Vec<serde_json::Value>, CspError> {
        let mut url = self.accounts_url.clone();
        url.query_pairs_mut()
            .append_pair("_offset", &offset.to_string())
            .append_pair("_limit", &self.page_size.to_string());
        self.call(
            "list",
            || self.client.get(url.clone()),
            |status, body| {
                if status != StatusCode::OK {
                    return Err(status_error(status, body));
                }
                let mut doc: serde_json::Value = serde_json::from_slice(body)
                    .map_err(|e| CspError::Malformed(format!("account list: {e}")))?;
                match doc.get_mut("results").map(serde_json::Value::take) {
                    Some(serde_json::Value::Array(items)) => Ok(items),
                    _ => Err(CspError::Malformed(
                        "account list has no results[] array".into(),
                    )),
                }
            },
        )
        .await
    }

    /// Sends one request through breaker, limiter and timeouts; `accept` turns the answer into
    /// a result. A `429` pushes the limiter back by `Retry-After` and, when that wait is short
    /// enough, is retried once (the retry is safe: list is a read and a DELETE is idempotent).
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Fn() -> reqwest::RequestBuilder,
        accept: impl Fn(StatusCode, &[u8]) -> Result<T, CspError>,
    ) -> Result<T, CspError> {
        let mut retried = false;
        loop {
            let permit = match self.breaker.acquire() {
                Ok(permit) => permit,
                Err(e) => return Err(self.count(op, e)),
            };
            self.limiter.until_ready().await;
            let response = match request().send().await {
                Ok(response) => response,
                Err(e) => {
                    permit.failure();
                    return Err(self.count(op, transport_error(&e)));
                }
            };
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
                self.limiter.hold_for(wait);
                // CSP answered: it is alive, just busy. Neither a failure nor a success.
                permit.neutral();
                self.metrics
                    .requests
                    .with_label_values(&[op, "rate_limited"])
                    .inc();
                tracing::info!(target: "csp", op, retry_after_ms = wait.as_millis() as u64, "CSP asked us to slow down (429)");
                if !retried && wait <= self.retry_after_max {
                    retried = true;
                    continue;
                }
                return Err(CspError::RateLimited {
                    retry_after_s: wait.as_secs().max(1),
                });
            }
            let body = match read_capped(response, MAX_RESPONSE_BYTES).await {
                Ok(body) => body,
                Err(e) => {
                    permit.failure();
                    return Err(self.count(op, e));
                }
            };
            let result = accept(status, &body);
            match &result {
                Err(e) if e.counts_against_circuit() => permit.failure(),
                // Any other answer (a 2xx, a 404, a 4xx) shows a healthy server.
                _ => permit.success(),
            }
            return match result {
                Ok(value) => {
                    self.metrics
                        .requests
                        .with_label_values(&[op, "success"])
                        .inc();
                    Ok(value)
                }
                Err(e) => Err(self.count(op, e)),
            };
        }
    }

    fn count(&self, op: &'static str, error: CspError) -> CspError {
        self.metrics
            .requests
            .with_label_values(&[op, error.outcome_label()])
            .inc();
        error
    }
}

#[async_trait]
impl CspApi for HttpCsp {
    async fn list_sandboxes(&self) -> Listing {
        let mut listing = Listing::default();
        for page in 0..self.max_pages {
            let offset = u64::from(page) * u64::from(self.page_size);
            match self.page(offset).await {
                Ok(items) => {
                    listing.pages += 1;
                    let short = items.len() < self.page_size as usize;
                    listing
                        .accounts
                        .extend(items.iter().filter_map(map_account));
                    if short {
                        return listing;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "csp", pages = listing.pages, error = %e, "CSP listing stopped early");
                    listing.error = Some(e);
                    return listing;
                }
            }
        }
        tracing::warn!(target: "csp", max_pages = self.max_pages, "CSP listing hit CSP_MAX_PAGES");
        listing.error = Some(CspError::TooManyPages {
            max_pages: self.max_pages,
        });
        listing
    }

    async fn delete_sandbox(&self, external_id: &str) -> Result<Deleted, CspError> {
        let Some(uuid) = account_uuid(external_id) else {
            return Err(CspError::InvalidRequest(format!(
                "external id {external_id:?} names no account"
            )));
        };
        let mut url = self.delete_url.clone();
        // Checked in `new`: an http(s) URL can be a base, so segments are available; pushing a
        // segment percent-encodes it, so an odd id cannot escape the path.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(uuid);
        }
        self.call(
            "delete",
            || self.client.delete(url.clone()),
            |status, body| match status.as_u16() {
                200 | 204 | 404 => Ok(Deleted {
                    status: status.as_u16(),
                }),
                _ => Err(status_error(status, body)),
            },
        )
        .await
    }

    fn circuit_state(&self) -> CircuitState {
        self.breaker.state()
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> CspError {
    if status == StatusCode::UNAUTHORIZED {
        return CspError::Unauthorized;
    }
    let text = String::from_utf8_lossy(body);
    CspError::Status {
        status: status.as_u16(),
        body: text.chars().take(ERROR_BODY_CHARS).collect(),
    }
}

fn transport_error(e: &reqwest::Error) -> CspError {
    // The full chain names the cause (e.g. "operation timed out") without the token: reqwest
    // errors carry the URL, never request headers.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if e.is_timeout() {
        CspError::Timeout(message)
    } else {
        CspError::Transport(message)
    }
}

/// Plain http is allowed only to a loopback host (the fake CSP of tests, a local mock).
fn transport_allowed(url: &Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => match url.host_str() {
            Some(host) => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                bare.eq_ignore_ascii_case("localhost")
                    || bare
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            None => false,
        },
        _ => false,
    }
}

/// Reads a body of at most `cap` bytes; a longer one is refused without being buffered.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, CspError> {
    let too_large = || CspError::Malformed(format!("response body larger than {cap} bytes"));
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` as seconds or an HTTP date, clamped to [`RETRY_AFTER_CEILING`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(secs) = raw.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(raw).ok()?;
        (at.with_timezone(&Utc) - Utc::now()).to_std().ok()?
    };
    Some(wait.min(RETRY_AFTER_CEILING))
}

/// Spaces requests at least `1 / rps` apart (a leaky bucket without burst), shared by every task
/// of one client; `hold_for` pushes the next slot out, which is how `Retry-After` is honoured by
/// every request, not only the one that got the `429`.
#[derive(Debug)]
struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    fn new(rps: f64) -> Self {
        let interval = if rps > 0.0 {
            Duration::try_from_secs_f64(1.0 / rps).unwrap_or(Duration::ZERO)
        } else {
            Duration::ZERO
        };
        Self {
            interval,
            next: Mutex::new(None),
        }
    }

    /// Reserves the next slot and waits for it.
    async fn until_ready(&self) {
        let slot = {
            // Plain data, updated in one step: a poisoned lock is still consistent.
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// No request starts before `wait` from now.
    fn hold_for(&self, wait: Duration) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // `checked_add`: an instant far in the future overflows; the ceiling is the latest slot.
        let until = now
            .checked_add(wait.min(RETRY_AFTER_CEILING))
            .unwrap_or(now);
        *next = Some(next.map_or(until, |n| n.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Retry-After` reads both forms; garbage is ignored.
    #[test]
    fn parses_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&later).unwrap_or(HeaderValue::from_static("")),
        );
        assert!(retry_after(&h).is_some_and(|d| d > Duration::from_secs(20)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("10000000000000000000"),
        );
        assert_eq!(retry_after(&h), Some(RETRY_AFTER_CEILING));
    }

    /// Plain http only to loopback hosts; https anywhere.
    #[test]
    fn http_only_to_loopback() {
        for (url, ok) in [
            ("https://csp.example.com/v2", true),
            ("http://127.0.0.1:9/v2", true),
            ("http://[::1]:9/v2", true),
            ("http://localhost:9/v2", true),
            ("http://csp.example.com/v2", false),
            ("http://10.0.0.1/v2", false),
            ("ftp://127.0.0.1/v2", false),
        ] {
            let parsed = Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(transport_allowed(&parsed), ok, "{url}");
        }
    }

    /// The limiter spaces slots by the interval and `hold_for` pushes them out.
    #[tokio::test]
    async fn limiter_spaces_requests() {
        let limiter = RateLimiter::new(50.0);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.until_ready().await;
        }
        assert!(start.elapsed() >= Duration::from_millis(40));
        limiter.hold_for(Duration::from_millis(100));
        limiter.until_ready().await;
        assert!(start.elapsed() >= Duration::from_millis(140));
    }
}
