//! A webhook subscriber for tests: an HTTP server on 127.0.0.1 that accepts every notification
//! and keeps its body, so a test counts deliveries per notification id (`X-Broker-Webhook-Id` is
//! the body's `id`) and waits for them with a deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use serde_json::Value;

/// A running receiver: its URL and every body it accepted, in arrival order.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// Where to POST (`http://127.0.0.1:<port>/hook`).
    pub url: String,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Starts a receiver that answers 200 at once.
    pub async fn start() -> Receiver {
        Self::start_with_delay(Duration::ZERO).await
    }

    /// Starts a receiver that takes `delay` to answer each request (a slow subscriber keeps a
    /// burst in delivery long enough for a test to act during it).
    pub async fn start_with_delay(delay: Duration) -> Receiver {
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let shared = Arc::clone(&seen);
        let app = Router::new().route(
            "/hook",
            post(move |body: axum::body::Bytes| {
                let shared = Arc::clone(&shared);
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                        shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(value);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the receiver: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("receiver address: {e}"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            seen,
        }
    }

    /// Every body accepted so far, in arrival order.
    pub fn bodies(&self) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many bodies arrived so far.
    pub fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True before the first body.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times each notification id arrived.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for body in self.bodies() {
            *counts
                .entry(body["id"].as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
        counts
    }

    /// Waits (bounded, 60 s) until a body matching `wanted` arrived; returns it.
    pub async fn wait_for(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = self.bodies().into_iter().find(|b| wanted(b)) {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} delivered; seen: {:?}",
                self.bodies()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded by `within`) until `done` holds for the counts per id.
    pub async fn wait_counts(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&HashMap<String, usize>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let counts = self.counts();
            if done(&counts) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} within {within:?}: {} ids, {} bodies",
                counts.len(),
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// What a dispatcher needs to deliver to this receiver on 127.0.0.1 over plain
/// http: both allowed here, both off in a service by default (`WEBHOOK_ALLOW_HTTP`,
/// `WEBHOOK_ALLOW_PRIVATE_TARGETS`).
pub const LOOPBACK_TARGETS: command_api::webhooks::TargetPolicy =
    command_api::webhooks::TargetPolicy {
        allow_http: true,
        allow_private: true,
    };
