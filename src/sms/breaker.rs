//! Per-route circuit breakers: a route that keeps failing is skipped for a
//! cool-off, then gets exactly one probe send to decide whether it is back.
//!
//! Closed → (N consecutive failures that count against the route) → Open →
//! (cool-off over) → one probe: success closes, failure reopens for another
//! cool-off. While the probe is in flight every other send skips the route.
//! A failure that does not count against the route (the number is invalid, the
//! provider refused this one message) shows the provider is answering, so it
//! counts as a success here.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use parking_lot::Mutex;

use super::config::BreakerSettings;
use super::{ProviderError, SendReceipt};
use crate::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Skipped until the cool-off ends.
    Open,
    /// Cool-off over: the next send is a probe (or one is in flight).
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: DateTime<Utc> },
    Probing,
}

#[derive(Debug)]
struct Entry {
    phase: Phase,
    consecutive_failures: u32,
}

pub struct CircuitBreakers {
    settings: BreakerSettings,
    clock: Arc<dyn Clock>,
    entries: Mutex<BTreeMap<u32, Entry>>,
}

impl CircuitBreakers {
    /// One breaker per id in `route_ids`; other ids (the built-in sandbox) are
    /// never broken.
    pub fn new(
        settings: BreakerSettings,
        clock: Arc<dyn Clock>,
        route_ids: impl IntoIterator<Item = u32>,
    ) -> Self {
        let entries = route_ids
            .into_iter()
            .map(|id| {
                (
                    id,
                    Entry {
                        phase: Phase::Closed,
                        consecutive_failures: 0,
                    },
                )
            })
            .collect();
        Self {
            settings,
            clock,
            entries: Mutex::new(entries),
        }
    }

    fn cool_off(&self) -> Duration {
        // Config validation caps this at a day; a hand-built setting is capped
        // at a year rather than overflowing.
        let seconds = self.settings.cool_off_seconds.min(365 * 86_400);
        Duration::seconds(i64::try_from(seconds).unwrap_or(0))
    }

    pub fn state(&self, route_id: u32) -> BreakerState {
        let now = self.clock.now();
        match self.entries.lock().get(&route_id).map(|e| e.phase) {
            None | Some(Phase::Closed) => BreakerState::Closed,
            Some(Phase::Open { until }) if now < until => BreakerState::Open,
            Some(Phase::Open { .. } | Phase::Probing) => BreakerState::HalfOpen,
        }
    }

    /// Every broken route and its state, by route id.
    pub fn states(&self) -> Vec<(u32, BreakerState)> {
        let ids: Vec<u32> = self.entries.lock().keys().copied().collect();
        ids.into_iter().map(|id| (id, self.state(id))).collect()
    }

    /// Whether a send would be let through now (read-only, for planning).
    pub fn is_available(&self, route_id: u32) -> bool {
        let now = self.clock.now();
        match self.entries.lock().get(&route_id).map(|e| e.phase) {
            None | Some(Phase::Closed) => true,
            Some(Phase::Open { until }) => now >= until,
            Some(Phase::Probing) => false,
        }
    }

    /// When the route's cool-off ends, if it is open.
    pub fn open_until(&self, route_id: u32) -> Option<DateTime<Utc>> {
        match self.entries.lock().get(&route_id).map(|e| e.phase) {
            Some(Phase::Open { until }) => Some(until),
            _ => None,
        }
    }

    /// Asks to send over a route. `None`: skip it (open, or another send is the
    /// probe). The permit must be given the outcome; dropped without one (the
    /// send was cancelled), it frees the probe slot for the next send.
    pub fn acquire(&self, route_id: u32) -> Option<Permit<'_>> {
        let now = self.clock.now();
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&route_id) else {
            return Some(Permit::new(self, route_id, false));
        };
        match entry.phase {
            Phase::Closed => Some(Permit::new(self, route_id, false)),
            Phase::Open { until } if now >= until => {
                entry.phase = Phase::Probing;
                tracing::info!(
                    route_id,
                    state = "half_open",
                    "circuit breaker: sending one probe"
                );
                Some(Permit::new(self, route_id, true))
            }
            Phase::Open { .. } | Phase::Probing => None,
        }
    }

    fn record(&self, route_id: u32, probe: bool, route_failed: bool) {
        let now = self.clock.now();
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&route_id) else {
            return;
        };
        if route_failed {
            entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
            let reopen = match entry.phase {
                Phase::Probing => probe,
                Phase::Closed => entry.consecutive_failures >= self.settings.failure_threshold,
                // Sends that started before the circuit opened do not extend it.
                Phase::Open { .. } => false,
            };
            if reopen {
                entry.phase = Phase::Open {
                    until: now + self.cool_off(),
                };
                tracing::warn!(
                    route_id,
                    state = "open",
                    consecutive_failures = entry.consecutive_failures,
                    cool_off_seconds = self.settings.cool_off_seconds,
                    "circuit breaker opened: route skipped until the cool-off ends"
                );
            }
        } else {
            entry.consecutive_failures = 0;
            if !matches!(entry.phase, Phase::Closed) {
                entry.phase = Phase::Closed;
                tracing::info!(
                    route_id,
                    state = "closed",
                    "circuit breaker closed: route healthy"
                );
            }
        }
    }

    fn abandon_probe(&self, route_id: u32) {
        let now = self.clock.now();
        if let Some(entry) = self.entries.lock().get_mut(&route_id)
            && matches!(entry.phase, Phase::Probing)
        {
            entry.phase = Phase::Open { until: now };
        }
    }
}

/// Leave to send once over a route; report how it went with `record`.
pub struct Permit<'a> {
    breakers: &'a CircuitBreakers,
    route_id: u32,
    probe: bool,
    recorded: bool,
}

impl<'a> Permit<'a> {
    fn new(breakers: &'a CircuitBreakers, route_id: u32, probe: bool) -> Self {
        Self {
            breakers,
            route_id,
            probe,
            recorded: false,
        }
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn record(mut self, result: &Result<SendReceipt, ProviderError>) {
        let route_failed = result
            .as_ref()
            .err()
            .is_some_and(|e| e.kind.counts_against_route());
        self.breakers
            .record(self.route_id, self.probe, route_failed);
        self.recorded = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breakers.abandon_probe(self.route_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::sms::ProviderErrorKind;

    fn breakers(clock: &Arc<ManualClock>) -> CircuitBreakers {
        let settings = BreakerSettings {
            failure_threshold: 2,
            cool_off_seconds: 30,
        };
        CircuitBreakers::new(settings, clock.clone(), [1])
    }

    fn failed(kind: ProviderErrorKind) -> Result<SendReceipt, ProviderError> {
        Err(ProviderError::new(kind, "x"))
    }

    #[test]
    fn only_route_failures_open_the_circuit() {
        let clock = Arc::new(ManualClock::default());
        let b = breakers(&clock);
        for _ in 0..5 {
            b.acquire(1)
                .unwrap()
                .record(&failed(ProviderErrorKind::InvalidNumber));
        }
        assert_eq!(b.state(1), BreakerState::Closed);
        b.acquire(1)
            .unwrap()
            .record(&failed(ProviderErrorKind::Unavailable));
        b.acquire(1)
            .unwrap()
            .record(&failed(ProviderErrorKind::Timeout));
        assert_eq!(b.state(1), BreakerState::Open);
        assert!(b.acquire(1).is_none());
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let clock = Arc::new(ManualClock::default());
        let b = breakers(&clock);
        b.acquire(1)
            .unwrap()
            .record(&failed(ProviderErrorKind::Unavailable));
        b.acquire(1).unwrap().record(&Ok(SendReceipt::default()));
        b.acquire(1)
            .unwrap()
            .record(&failed(ProviderErrorKind::Unavailable));
        assert_eq!(b.state(1), BreakerState::Closed);
    }

    #[test]
    fn a_cancelled_probe_frees_the_slot() {
        let clock = Arc::new(ManualClock::default());
        let b = breakers(&clock);
        for _ in 0..2 {
            b.acquire(1)
                .unwrap()
                .record(&failed(ProviderErrorKind::Unavailable));
        }
        clock.advance(Duration::seconds(30));
        let probe = b.acquire(1).unwrap();
        assert!(probe.is_probe());
        assert!(b.acquire(1).is_none(), "only one probe at a time");
        drop(probe);
        let second = b.acquire(1).unwrap();
        assert!(second.is_probe());
    }

    #[test]
    fn unknown_routes_are_never_broken() {
        let clock = Arc::new(ManualClock::default());
        let b = breakers(&clock);
        for _ in 0..10 {
            b.acquire(0)
                .unwrap()
                .record(&failed(ProviderErrorKind::Unavailable));
        }
        assert_eq!(b.state(0), BreakerState::Closed);
        assert!(b.acquire(0).is_some());
    }
}
