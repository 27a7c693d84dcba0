//! The cached store check behind `/readyz`. Its own room so that the shared state can hold it
//! without importing the routes that serve it.

use domain::store::EventStore;

/// The last store check of `/readyz`, reused for `ttl`: probes and anonymous clients can hit
/// `/readyz` as often as they like without each hit reaching the store. The lock is held across
/// the check, so concurrent hits after expiry wait for one check instead of each making one.
#[derive(Debug)]
pub struct ReadinessCache {
    ttl: std::time::Duration,
    last: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl ReadinessCache {
    /// A cache keeping a result for `ttl`.
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the store answered, from a check at most `ttl` old.
    pub(crate) async fn store_ok(&self, events: &dyn EventStore) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < self.ttl {
                return ok;
            }
        }
        let ok = match events.ping().await {
            Ok(()) => true,
            Err(e) => {
                // The cause can name accounts, roles and endpoints: the log only, never the body.
                tracing::warn!(target: "readiness", error = %e, "store check failed");
                false
            }
        };
        *last = Some((std::time::Instant::now(), ok));
        ok
    }
}
