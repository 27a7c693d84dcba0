//! The real CSP client against the fake CSP over HTTP: what a broken or hostile CSP answer cannot
//! do to the jobs — park them forever, panic them, exhaust their memory, or redirect their token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobs::csp::http::{HttpCsp, MAX_RESPONSE_BYTES};
use jobs::{CspApi, CspConfig, CspError, CspMetrics, CspMode};
use tests::fake_csp::{FakeAccount, FakeCsp, Fault};

fn config(csp: &FakeCsp) -> CspConfig {
    let mut c = jobs::JobsConfig::default().csp;
    c.mode = CspMode::Real;
    c.base_url = csp.base_url();
    c.api_token = csp.token().into();
    c.connect_timeout = Duration::from_secs(1);
    c.read_timeout = Duration::from_secs(1);
    c.page_size = 10;
    c.max_pages = 5;
    c.rate_limit_rps = 0.0;
    c.retry_after_max = Duration::from_secs(2);
    c
}

fn client(config: &CspConfig) -> Result<HttpCsp, CspError> {
    let registry = prometheus::Registry::new();
    let metrics = CspMetrics::new(&registry).expect("CSP metrics");
    HttpCsp::new(
        config,
        Arc::new(domain::ManualClock::new(chrono::Utc::now())),
        metrics,
    )
}

/// A `Retry-After` of 10^19 seconds neither panics nor parks the client: it is a deferral.
#[tokio::test]
async fn huge_retry_after_does_not_panic() {
    let csp = FakeCsp::start().await;
    csp.set_accounts([FakeAccount::sandbox(1)]);
    csp.queue_list_faults([Fault::RetryAfter(10_000_000_000_000_000_000)]);
    let client = client(&config(&csp)).expect("CSP client");
    let listing = tokio::time::timeout(Duration::from_secs(30), client.list_sandboxes())
        .await
        .unwrap_or_else(|_| panic!("the client waited out an absurd Retry-After"));
    assert!(
        matches!(listing.error, Some(CspError::RateLimited { retry_after_s }) if retry_after_s <= 3600),
        "{:?}",
        listing.error
    );
}

/// A response body beyond the cap is refused, not buffered.
#[tokio::test]
async fn oversized_body_is_refused() {
    let csp = FakeCsp::start().await;
    csp.queue_list_faults([Fault::HugeBody(MAX_RESPONSE_BYTES + 1)]);
    let client = client(&config(&csp)).expect("CSP client");
    let listing = client.list_sandboxes().await;
    assert!(
        matches!(&listing.error, Some(CspError::Malformed(m)) if m.contains("larger than")),
        "{:?}",
        listing.error
    );
}

/// A redirect is not followed: the token never reaches the redirect target.
#[tokio::test]
async fn redirects_are_not_followed() {
    let csp = FakeCsp::start().await;
    let elsewhere = FakeCsp::start().await;
    csp.queue_list_faults([Fault::Redirect(format!(
        "{}/current_user/accounts",
        elsewhere.base_url()
    ))]);
    let client = client(&config(&csp)).expect("CSP client");
    let listing = client.list_sandboxes().await;
    assert!(
        matches!(listing.error, Some(CspError::Status { status: 302, .. })),
        "{:?}",
        listing.error
    );
    assert_eq!(elsewhere.list_calls(), 0, "the redirect target was called");
}

/// A body that trickles in, each byte within the read timeout, still ends at the total timeout.
#[tokio::test]
async fn trickling_body_hits_the_total_timeout() {
    let csp = FakeCsp::start().await;
    csp.queue_list_faults([Fault::Trickle(Duration::from_millis(300), 100)]);
    let client = client(&config(&csp)).expect("CSP client");
    let started = Instant::now();
    let listing = tokio::time::timeout(Duration::from_secs(20), client.list_sandboxes())
        .await
        .unwrap_or_else(|_| panic!("no total timeout: still reading after 20 s"));
    assert!(
        matches!(listing.error, Some(CspError::Timeout(_))),
        "{:?}",
        listing.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Real mode refuses plain http to anything but a loopback test server.
#[tokio::test]
async fn plain_http_is_refused_off_loopback() {
    let csp = FakeCsp::start().await;
    let mut c = config(&csp);
    assert!(client(&c).is_ok(), "loopback test server");
    c.base_url = "http://csp.example.com/v2".into();
    assert!(matches!(client(&c), Err(CspError::InvalidRequest(_))));
    c.base_url = "https://csp.example.com/v2".into();
    assert!(client(&c).is_ok());
}
