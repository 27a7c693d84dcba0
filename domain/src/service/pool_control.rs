//! Drain / maintenance mode on the command side: the operators' drain and resume commands, and
//! the short-lived cache through which the allocation path reads the drain state.
//!
//! The allocation path must not add a strong read per request, so each instance keeps the drain
//! state for `DRAIN_CACHE_MS` (1 s by default) and reloads it from the latest event of the
//! pool-control stream afterwards. A drain therefore takes effect at once on the instance that
//! recorded it (its cache is replaced by the new state) and within `DRAIN_CACHE_MS` on every
//! other instance (docs/adr/0017-lease-lifecycle.md).

use std::sync::Mutex;
use std::time::Instant;

use super::decode_for_command as decode;
use super::{envelopes, Broker, BrokerError};
use crate::model::events::{BrokerEvent, CommandMeta, DrainEntry};
use crate::model::ids::POOL_CONTROL_STREAM_ID;
use crate::model::pool_control::DrainState;
use crate::store::StoreError;

/// The drain state this instance read last, and when.
#[derive(Debug, Default)]
pub(super) struct DrainCache {
    state: Mutex<Option<(Instant, DrainState)>>,
    /// Held while one request reloads an expired state, so the requests arriving meanwhile
    /// wait for that read instead of each issuing their own.
    reload: tokio::sync::Mutex<()>,
}

impl DrainCache {
    fn fresh(&self, ttl: std::time::Duration) -> Option<DrainState> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*state {
            Some((read_at, drain)) if read_at.elapsed() < ttl => Some(drain.clone()),
            _ => None,
        }
    }

    fn store(&self, drain: &DrainState) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Never replace a newer state with an older one read concurrently.
        if state
            .as_ref()
            .is_some_and(|(_, d)| d.version > drain.version)
        {
            return;
        }
        *state = Some((Instant::now(), drain.clone()));
    }
}

/// Bound on retries of a drain or resume that lost a race with another operator.
const CONTROL_RETRIES: usize = 5;

impl Broker {
    /// The drain state, strongly consistent (and this instance's cache refreshed with it).
    pub async fn drain_state(&self) -> Result<DrainState, BrokerError> {
        let mut state = DrainState::default();
        // A pool never drained has no control stream: that state is cached too, or every
        // allocation would pay a strong read for it.
        if let Some(latest) = self.events.load_latest(POOL_CONTROL_STREAM_ID).await? {
            if let BrokerEvent::PoolControl(event) = decode(&latest)? {
                state.fold(&event);
            }
            state.version = latest.version;
        }
        self.drain_cache.store(&state);
        Ok(state)
    }

    /// The drain that refuses an allocation for `prefix`, read through the cache.
    pub(super) async fn drain_refusing(
        &self,
        prefix: Option<&str>,
    ) -> Result<Option<DrainEntry>, BrokerError> {
        let ttl = self.config.drain_cache_ttl;
        let state = match self.drain_cache.fresh(ttl) {
            Some(state) => state,
            None => {
                let _reloading = self.drain_cache.reload.lock().await;
                match self.drain_cache.fresh(ttl) {
                    Some(state) => state,
                    None => self.drain_state().await?,
                }
            }
        };
        Ok(state.refusing(prefix).cloned())
    }

    /// Drains `prefix` (`None`: the whole pool): `PoolDrained` on the pool-control stream. A
    /// repeat records nothing and keeps the original start.
    pub async fn drain(
        &self,
        prefix: Option<String>,
        reason: Option<String>,
        meta: &CommandMeta,
    ) -> Result<DrainState, BrokerError> {
        self.control(meta, |state, now| {
            state.drain(prefix.clone(), reason.clone(), now)
        })
        .await
    }

    /// Resumes `prefix` (`None`: the whole-pool drain): `PoolResumed`. Resuming what is not
    /// drained records nothing.
    pub async fn resume(
        &self,
        prefix: Option<String>,
        meta: &CommandMeta,
    ) -> Result<DrainState, BrokerError> {
        self.control(meta, |state, _| state.resume(prefix.clone()))
            .await
    }

    async fn control(
        &self,
        meta: &CommandMeta,
        decide: impl Fn(
            &DrainState,
            chrono::DateTime<chrono::Utc>,
        ) -> Option<crate::model::events::PoolControlEvent>,
    ) -> Result<DrainState, BrokerError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut state = self.drain_state().await?;
            let now = self.clock.now();
            let Some(event) = decide(&state, now) else {
                return Ok(state);
            };
            let batch = envelopes(
                POOL_CONTROL_STREAM_ID,
                state.version,
                std::slice::from_ref(&event),
                meta,
                now,
            );
            match self.events.append(batch).await {
                Ok(()) => {
                    state.fold(&event);
                    self.drain_cache.store(&state);
                    return Ok(state);
                }
                // Another operator changed the state first: decide again on the new one.
                Err(StoreError::VersionConflict { .. }) if attempt < CONTROL_RETRIES => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
