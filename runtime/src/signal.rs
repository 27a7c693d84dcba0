//! Process shutdown: the OS signals, and a stop switch many background tasks can wait on.

use std::future::Future;

use tokio::sync::watch;

/// Resolves on SIGINT or SIGTERM (SIGTERM is how ECS and most supervisors ask to stop).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a handler the process can still be stopped by SIGTERM below.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!(target: "startup", "shutdown requested; draining");
}

/// A stop switch: flipped once, observed by any number of tasks through [`Stop::stopped`].
/// A `watch` channel rather than a broadcast, so a task that starts waiting after the flip still
/// sees it.
#[derive(Debug, Clone)]
pub struct Stop {
    tx: watch::Sender<bool>,
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

impl Stop {
    /// A switch that has not been flipped.
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// Flips the switch; every [`Stop::stopped`] future resolves.
    pub fn stop(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once [`Stop::stop`] was called (immediately if it already was).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // An error means every sender is gone; nobody can stop us any more, so treat it as a stop.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Flips the switch when `signal` resolves (e.g. [`shutdown_signal`]).
    pub fn stop_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let stop = self.clone();
        tokio::spawn(async move {
            signal.await;
            stop.stop();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiter created after the flip resolves at once; one created before resolves on the flip.
    #[tokio::test]
    async fn stopped_resolves_before_and_after_the_flip() {
        let stop = Stop::new();
        let early = tokio::spawn(stop.stopped());
        stop.stop();
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let _ = early.await;
            stop.stopped().await;
        })
        .await;
        assert!(waited.is_ok(), "stopped() did not resolve after stop()");
    }
}
