//! A circuit breaker for the CSP API: after `threshold` consecutive failures (HTTP 5xx, timeouts,
//! connection errors, malformed answers) the circuit opens and calls fail fast for the open
//! period; then exactly one probe is let through (half-open) — its success closes the circuit,
//! its failure opens it again. Time comes from the injected [`Clock`](domain::Clock), so tests
//! move past the open period without sleeping. The state is exported as a gauge.

use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Duration, Utc};
use prometheus::IntGauge;
use serde::Serialize;

use domain::SharedClock;

use super::CspError;

/// The breaker's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls flow.
    Closed,
    /// Calls fail fast until the open period ends.
    Open,
    /// One probe may go through.
    HalfOpen,
}

impl CircuitState {
    /// The value of `broker_csp_circuit_state`.
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: DateTime<Utc> },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
}

/// The breaker; shared by every request of one CSP client.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    clock: SharedClock,
    gauge: IntGauge,
    inner: Mutex<Inner>,
}

/// Leave to make one call. Report how it went with [`Permit::success`], [`Permit::failure`] or
/// [`Permit::neutral`]; a permit dropped unreported counts as neutral, so a cancelled probe frees
/// the half-open slot instead of wedging the circuit.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration, clock: SharedClock, gauge: IntGauge) -> Self {
        gauge.set(CircuitState::Closed.gauge_value());
        Self {
            threshold: threshold.max(1),
            open_for,
            clock,
            gauge,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a few plain fields updated in one step; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, inner: &mut Inner, state: State) {
        inner.state = state;
        self.gauge.set(Self::public(state).gauge_value());
    }

    fn public(state: State) -> CircuitState {
        match state {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// The current state (an open circuit whose period has ended reads as half-open).
    pub fn state(&self) -> CircuitState {
        let inner = self.lock();
        match inner.state {
            State::Open { until } if self.clock.now() >= until => CircuitState::HalfOpen,
            state => Self::public(state),
        }
    }

    /// Asks to make one call: granted when closed, or as the single half-open probe; otherwise
    /// [`CspError::CircuitOpen`] with the seconds left.
    pub fn acquire(&self) -> Result<Permit<'_>, CspError> {
        let mut inner = self.lock();
        let now = self.clock.now();
        let probe = match inner.state {
            State::Closed => false,
            State::Open { until } if now >= until => {
                self.set(&mut inner, State::HalfOpen { probing: true });
                true
            }
            State::Open { until } => {
                return Err(CspError::CircuitOpen {
                    retry_after_s: (until - now).num_seconds().max(1) as u64,
                })
            }
            State::HalfOpen { probing: true } => {
                return Err(CspError::CircuitOpen { retry_after_s: 1 })
            }
            State::HalfOpen { probing: false } => {
                self.set(&mut inner, State::HalfOpen { probing: true });
                true
            }
        };
        Ok(Permit {
            breaker: self,
            probe,
            reported: false,
        })
    }

    fn on_success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        self.set(&mut inner, State::Closed);
    }

    fn on_failure(&self, probe: bool) {
        let mut inner = self.lock();
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let trips = probe
            || matches!(inner.state, State::HalfOpen { .. })
            || inner.consecutive_failures >= self.threshold;
        if trips && !matches!(inner.state, State::Open { .. }) {
            let until = self.clock.now() + self.open_for;
            self.set(&mut inner, State::Open { until });
            tracing::warn!(
                target: "csp",
                failures = inner.consecutive_failures,
                open_for_s = self.open_for.num_seconds(),
                "CSP circuit opened"
            );
        }
    }

    fn on_neutral(&self, probe: bool) {
        if probe {
            let mut inner = self.lock();
            if matches!(inner.state, State::HalfOpen { probing: true }) {
                self.set(&mut inner, State::HalfOpen { probing: false });
            }
        }
    }
}

impl Permit<'_> {
    /// The call worked (the server is healthy): close the circuit, reset the count.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    /// The call failed in a way that says the server is unwell.
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }

    /// The call says nothing about the server's health (e.g. `429`): no change.
    pub fn neutral(mut self) {
        self.reported = true;
        self.breaker.on_neutral(self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_neutral(self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::ManualClock;
    use std::sync::Arc;

    fn breaker(clock: &ManualClock) -> CircuitBreaker {
        let gauge = IntGauge::new("g", "g").unwrap_or_else(|e| unreachable!("{e}"));
        CircuitBreaker::new(3, Duration::seconds(60), Arc::new(clock.clone()), gauge)
    }

    /// Three consecutive failures open it; a success in between resets the count.
    #[test]
    fn opens_after_consecutive_failures() {
        let clock = ManualClock::new(Utc::now());
        let b = breaker(&clock);
        for _ in 0..2 {
            b.acquire().map(Permit::failure).ok();
        }
        b.acquire().map(Permit::success).ok();
        for _ in 0..2 {
            b.acquire().map(Permit::failure).ok();
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.acquire().map(Permit::failure).ok();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(matches!(b.acquire(), Err(CspError::CircuitOpen { .. })));
        assert_eq!(b.gauge.get(), 1);
    }

    /// After the open period exactly one probe passes; its success closes the circuit, a
    /// failure reopens it, and a dropped probe frees the slot.
    #[test]
    fn half_open_lets_one_probe() {
        let clock = ManualClock::new(Utc::now());
        let b = breaker(&clock);
        for _ in 0..3 {
            b.acquire().map(Permit::failure).ok();
        }
        clock.advance(Duration::seconds(61));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let probe = b.acquire();
        assert!(probe.is_ok());
        assert_eq!(b.gauge.get(), 2);
        assert!(b.acquire().is_err(), "only one probe at a time");
        drop(probe);
        let probe = b.acquire();
        assert!(probe.is_ok(), "a dropped probe frees the slot");
        probe.map(Permit::failure).ok();
        assert_eq!(b.state(), CircuitState::Open);
        clock.advance(Duration::seconds(61));
        b.acquire().map(Permit::success).ok();
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.gauge.get(), 0);
    }
}
