//! The router with scripted providers: chain order, failover, country chains,
//! the circuit breaker (on a manual clock) and the timeout policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use otpd::clock::ManualClock;
use otpd::domain::{Code, DeliveryStatus, PhoneNumber};
use otpd::sms::config::{BreakerSettings, CountryRouting};
use otpd::sms::router::RoutingError;
use otpd::sms::{
    DeliveryAttempt, DeliveryRequest, OutgoingSms, ProviderError, ProviderErrorKind, Route,
    RoutingSettings, SendReceipt, SmsProvider, SmsRouter,
};
use parking_lot::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Clone, Copy)]
pub(crate) enum Behaviour {
    Accept,
    Fail(ProviderErrorKind),
    Hang,
}

/// A provider that does what the test says and counts its calls.
pub(crate) struct Scripted {
    behaviour: Mutex<Behaviour>,
    calls: AtomicUsize,
    /// When set, a call announces itself on `entered` and waits for `release`.
    gate: Option<(Arc<Notify>, Arc<Notify>)>,
}

impl Scripted {
    pub(crate) fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            behaviour: Mutex::new(behaviour),
            calls: AtomicUsize::new(0),
            gate: None,
        })
    }

    /// Every call announces itself on `entered`, then waits for `release`.
    pub(crate) fn gated(
        behaviour: Behaviour,
        entered: &Arc<Notify>,
        release: &Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Self {
            behaviour: Mutex::new(behaviour),
            calls: AtomicUsize::new(0),
            gate: Some((entered.clone(), release.clone())),
        })
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock() = behaviour;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SmsProvider for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some((entered, release)) = &self.gate {
            entered.notify_one();
            release.notified().await;
        }
        let behaviour = *self.behaviour.lock();
        match behaviour {
            Behaviour::Accept => Ok(SendReceipt {
                provider_message_id: Some(format!("msg-{}", sms.route_id)),
                status: Some(DeliveryStatus::Sent),
                ..SendReceipt::default()
            }),
            Behaviour::Fail(kind) => Err(ProviderError::new(kind, "scripted failure")),
            Behaviour::Hang => std::future::pending().await,
        }
    }
}

struct Harness {
    router: SmsRouter,
    clock: Arc<ManualClock>,
    to: PhoneNumber,
    code: Code,
}

fn routing() -> RoutingSettings {
    RoutingSettings {
        breaker: BreakerSettings {
            failure_threshold: 3,
            cool_off_seconds: 30,
        },
        ..RoutingSettings::default()
    }
}

fn harness(routes: Vec<Route>, routing: RoutingSettings) -> Harness {
    let clock = Arc::new(ManualClock::default());
    let sandbox = Route::new(0, Scripted::new(Behaviour::Accept));
    Harness {
        router: SmsRouter::new(routes, sandbox, &routing, clock.clone()),
        clock,
        to: PhoneNumber::parse("+31651860670").unwrap(),
        code: Code::parse("482916").unwrap(),
    }
}

fn route(id: u32, provider: &Arc<Scripted>) -> Route {
    Route::new(id, provider.clone())
}

impl Harness {
    fn plan_ids(
        &self,
        tenant: &[u32],
        pinned: Option<u32>,
        failover: bool,
        country: &str,
    ) -> Result<Vec<u32>, RoutingError> {
        self.router
            .plan(tenant, pinned, failover, false, Some(country))
            .map(|chain| chain.iter().map(|r| r.id).collect())
    }

    async fn send(&self) -> Vec<DeliveryAttempt> {
        let chain = self
            .router
            .plan(&[], None, true, false, self.to.country())
            .unwrap();
        self.deliver(&chain).await
    }

    async fn deliver(&self, chain: &[&Route]) -> Vec<DeliveryAttempt> {
        self.router
            .deliver(
                chain,
                &DeliveryRequest {
                    tenant: "acme",
                    verification_id: Uuid::new_v4(),
                    to: &self.to,
                    code: &self.code,
                    locale: None,
                    ttl: Duration::from_secs(300),
                },
            )
            .await
    }

    fn state(&self, id: u32) -> &'static str {
        self.router
            .breaker_states()
            .into_iter()
            .find(|(route, _)| *route == id)
            .map(|(_, state)| state)
            .unwrap()
    }
}

fn kinds(attempts: &[DeliveryAttempt]) -> Vec<(u32, Option<ProviderErrorKind>)> {
    attempts
        .iter()
        .map(|a| (a.route_id, a.result.as_ref().err().map(|e| e.kind)))
        .collect()
}

#[tokio::test]
async fn a_down_primary_fails_over_and_both_attempts_are_recorded() {
    let primary = Scripted::new(Behaviour::Fail(ProviderErrorKind::Unavailable));
    let fallback = Scripted::new(Behaviour::Accept);
    let h = harness(vec![route(1, &primary), route(2, &fallback)], routing());
    let attempts = h.send().await;
    assert_eq!(
        kinds(&attempts),
        vec![(1, Some(ProviderErrorKind::Unavailable)), (2, None)]
    );
    assert_eq!(attempts[0].delivery_status(), DeliveryStatus::Failed);
    assert_eq!(
        attempts[0].error_summary().as_deref(),
        Some("unavailable: scripted failure")
    );
    assert_eq!(attempts[1].delivery_status(), DeliveryStatus::Sent);
    assert_eq!((primary.calls(), fallback.calls()), (1, 1));
}

#[tokio::test]
async fn an_invalid_number_stops_the_chain() {
    let primary = Scripted::new(Behaviour::Fail(ProviderErrorKind::InvalidNumber));
    let fallback = Scripted::new(Behaviour::Accept);
    let h = harness(vec![route(1, &primary), route(2, &fallback)], routing());
    let attempts = h.send().await;
    assert_eq!(
        kinds(&attempts),
        vec![(1, Some(ProviderErrorKind::InvalidNumber))]
    );
    assert_eq!(fallback.calls(), 0);
}

#[tokio::test]
async fn every_route_failing_leaves_every_attempt_failed() {
    let a = Scripted::new(Behaviour::Fail(ProviderErrorKind::Unavailable));
    let b = Scripted::new(Behaviour::Fail(ProviderErrorKind::RateLimited));
    let h = harness(vec![route(1, &a), route(2, &b)], routing());
    let attempts = h.send().await;
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.result.is_err()));
}

#[tokio::test]
async fn a_pinned_route_goes_first_and_alone_without_failover() {
    let p = Scripted::new(Behaviour::Accept);
    let h = harness(vec![route(1, &p), route(2, &p), route(3, &p)], routing());
    assert_eq!(h.plan_ids(&[], Some(2), true, "NL"), Ok(vec![2, 1, 3]));
    assert_eq!(h.plan_ids(&[], Some(2), false, "NL"), Ok(vec![2]));
    assert_eq!(h.plan_ids(&[3, 1], Some(1), true, "NL"), Ok(vec![1, 3]));
    assert_eq!(
        h.plan_ids(&[3, 1], Some(2), true, "NL"),
        Err(RoutingError::RouteNotAllowed(2))
    );
    assert_eq!(
        h.plan_ids(&[], Some(9), true, "NL"),
        Err(RoutingError::UnknownRoute(9))
    );
}

#[tokio::test]
async fn chains_come_from_tenant_then_country_then_default() {
    let p = Scripted::new(Behaviour::Accept);
    let mut ug_only = route(2, &p);
    ug_only.countries = vec!["UG".into()];
    let mut settings = routing();
    settings
        .countries
        .insert("UG".into(), CountryRouting { routes: vec![2, 3] });
    let mut h = harness(vec![route(1, &p), ug_only, route(3, &p)], settings);
    // No default chain: every route in id order, minus those not serving NL.
    assert_eq!(h.plan_ids(&[], None, true, "NL"), Ok(vec![1, 3]));
    h.router = h.router.with_default_chain(vec![3, 1, 2]);
    assert_eq!(h.plan_ids(&[], None, true, "NL"), Ok(vec![3, 1]));
    // The country's chain replaces the default for its numbers.
    assert_eq!(h.plan_ids(&[], None, true, "UG"), Ok(vec![2, 3]));
    assert_eq!(h.plan_ids(&[], None, true, "ug"), Ok(vec![2, 3]));
    // A tenant's own chain wins over both.
    assert_eq!(h.plan_ids(&[1, 2], None, true, "UG"), Ok(vec![1, 2]));
    // A route limited to other countries cannot be pinned.
    assert_eq!(
        h.plan_ids(&[], Some(2), true, "NL"),
        Err(RoutingError::RouteDoesNotServe(2))
    );
    assert_eq!(
        h.plan_ids(&[2], None, true, "NL"),
        Err(RoutingError::NoRoute)
    );
}

#[tokio::test]
async fn the_breaker_opens_skips_probes_and_closes() {
    let flaky = Scripted::new(Behaviour::Fail(ProviderErrorKind::Unavailable));
    let steady = Scripted::new(Behaviour::Accept);
    let h = harness(vec![route(1, &flaky), route(2, &steady)], routing());

    for _ in 0..3 {
        assert_eq!(h.send().await.len(), 2);
    }
    assert_eq!(h.state(1), "open");
    assert_eq!(h.state(2), "closed");
    // Open: route 1 is not even called.
    let attempts = h.send().await;
    assert_eq!(kinds(&attempts), vec![(2, None)]);
    assert_eq!(flaky.calls(), 3);

    // Cool-off over: one probe. It fails, so the route is open again.
    h.clock.advance(chrono::Duration::seconds(29));
    assert_eq!(h.state(1), "open");
    h.clock.advance(chrono::Duration::seconds(1));
    assert_eq!(h.state(1), "half_open");
    assert_eq!(h.send().await.len(), 2);
    assert_eq!(flaky.calls(), 4);
    assert_eq!(h.state(1), "open");
    assert_eq!(kinds(&h.send().await), vec![(2, None)]);

    // Next cool-off: the provider is back; the probe succeeds and closes it.
    h.clock.advance(chrono::Duration::seconds(30));
    flaky.set(Behaviour::Accept);
    assert_eq!(kinds(&h.send().await), vec![(1, None)]);
    assert_eq!(h.state(1), "closed");
    assert_eq!(kinds(&h.send().await), vec![(1, None)]);
}

#[tokio::test]
async fn failures_of_one_message_do_not_open_the_circuit() {
    let p = Scripted::new(Behaviour::Fail(ProviderErrorKind::Rejected));
    let h = harness(vec![route(1, &p)], routing());
    for _ in 0..10 {
        h.send().await;
    }
    assert_eq!(h.state(1), "closed");
    assert_eq!(p.calls(), 10);
}

#[tokio::test]
async fn during_the_probe_other_sends_skip_the_route() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let flaky = Arc::new(Scripted {
        behaviour: Mutex::new(Behaviour::Fail(ProviderErrorKind::Unavailable)),
        calls: AtomicUsize::new(0),
        gate: Some((entered.clone(), release.clone())),
    });
    let steady = Scripted::new(Behaviour::Accept);
    let h = harness(vec![route(1, &flaky), route(2, &steady)], routing());

    // Open the circuit (the gate is released as each call arrives).
    for _ in 0..3 {
        let chain = h.router.plan(&[], None, true, false, Some("NL")).unwrap();
        let (attempts, ()) = tokio::join!(h.deliver(&chain), async {
            entered.notified().await;
            release.notify_one();
        });
        assert_eq!(attempts.len(), 2);
    }
    assert_eq!(h.state(1), "open");
    h.clock.advance(chrono::Duration::seconds(30));
    flaky.set(Behaviour::Accept);

    // Both sends planned while half-open; the first to reach route 1 probes
    // it, the other skips it while the probe is in flight.
    let probe_chain = h.router.plan(&[], None, true, false, Some("NL")).unwrap();
    let other_chain = h.router.plan(&[], None, true, false, Some("NL")).unwrap();
    assert_eq!(
        probe_chain.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let (probe, other) = tokio::join!(h.deliver(&probe_chain), async {
        entered.notified().await;
        let other = h.deliver(&other_chain).await;
        release.notify_one();
        other
    });
    assert_eq!(kinds(&probe), vec![(1, None)]);
    assert_eq!(kinds(&other), vec![(2, None)]);
    assert_eq!(flaky.calls(), 4);
    assert_eq!(h.state(1), "closed");
}

#[tokio::test]
async fn when_every_route_is_open_the_caller_is_told_when_to_retry() {
    let a = Scripted::new(Behaviour::Fail(ProviderErrorKind::Unavailable));
    let b = Scripted::new(Behaviour::Fail(ProviderErrorKind::Auth));
    let h = harness(vec![route(1, &a), route(2, &b)], routing());
    for _ in 0..3 {
        h.send().await;
    }
    h.clock.advance(chrono::Duration::seconds(10));
    assert_eq!(
        h.plan_ids(&[], None, true, "NL"),
        Err(RoutingError::CircuitOpen {
            retry_after_seconds: 20
        })
    );
    // Pinning an open route without failover is refused the same way.
    assert!(matches!(
        h.plan_ids(&[], Some(1), false, "NL"),
        Err(RoutingError::CircuitOpen { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn without_failover_on_timeout_a_timeout_ends_the_send() {
    let hangs = Scripted::new(Behaviour::Hang);
    let steady = Scripted::new(Behaviour::Accept);
    let mut slow = route(1, &hangs);
    slow.timeout = Duration::from_millis(200);
    let settings = RoutingSettings {
        failover_on_timeout: false,
        ..routing()
    };
    let h = harness(vec![slow, route(2, &steady)], settings);
    let attempts = h.send().await;
    assert_eq!(
        kinds(&attempts),
        vec![(1, Some(ProviderErrorKind::Timeout))]
    );
    assert_eq!(attempts[0].delivery_status(), DeliveryStatus::Unknown);
    assert_eq!(steady.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn with_failover_on_timeout_the_next_route_is_tried() {
    let hangs = Scripted::new(Behaviour::Hang);
    let steady = Scripted::new(Behaviour::Accept);
    let mut slow = route(1, &hangs);
    slow.timeout = Duration::from_millis(200);
    let h = harness(vec![slow, route(2, &steady)], routing());
    let attempts = h.send().await;
    assert_eq!(
        kinds(&attempts),
        vec![(1, Some(ProviderErrorKind::Timeout)), (2, None)]
    );
    assert_eq!(attempts[0].delivery_status(), DeliveryStatus::Unknown);
}

#[tokio::test]
async fn an_unreadable_success_counts_as_maybe_sent() {
    let garbled = Scripted::new(Behaviour::Fail(ProviderErrorKind::Malformed));
    let steady = Scripted::new(Behaviour::Accept);
    let settings = RoutingSettings {
        failover_on_timeout: false,
        ..routing()
    };
    let h = harness(vec![route(1, &garbled), route(2, &steady)], settings);
    let attempts = h.send().await;
    assert_eq!(
        kinds(&attempts),
        vec![(1, Some(ProviderErrorKind::Malformed))]
    );
    assert_eq!(attempts[0].delivery_status(), DeliveryStatus::Unknown);
}

#[tokio::test]
async fn configured_prices_fill_in_missing_costs() {
    let p = Scripted::new(Behaviour::Accept);
    let mut priced = route(1, &p);
    priced.price = BTreeMap::from([("NL".to_owned(), 0.05), ("*".to_owned(), 0.09)]);
    priced.currency = Some("EUR".to_owned());
    assert_eq!(priced.price_for(Some("nl")), Some((0.05, "EUR".to_owned())));
    assert_eq!(priced.price_for(Some("UG")), Some((0.09, "EUR".to_owned())));
    let h = harness(vec![priced], routing());
    let attempts = h.send().await;
    let receipt = attempts[0].result.as_ref().unwrap();
    assert_eq!(receipt.cost, Some(0.05));
    assert_eq!(receipt.currency.as_deref(), Some("EUR"));
}

#[tokio::test]
async fn templates_follow_the_locale() {
    let p = Scripted::new(Behaviour::Accept);
    let mut r = route(1, &p);
    r.templates_by_locale
        .insert("pt".into(), "O seu código é {code}.".into());
    let code = Code::parse("482916").unwrap();
    assert_eq!(r.render(&code, Some("pt-BR")), "O seu código é 482916.");
    assert_eq!(
        r.render(&code, Some("fr")),
        "Your verification code is 482916."
    );
    assert_eq!(r.render(&code, None), "Your verification code is 482916.");
}

#[tokio::test]
async fn sandbox_sends_bypass_routes_and_breakers() {
    let p = Scripted::new(Behaviour::Fail(ProviderErrorKind::Unavailable));
    let h = harness(vec![route(1, &p)], routing());
    for _ in 0..3 {
        h.send().await;
    }
    let chain = h.router.plan(&[], None, true, true, Some("NL")).unwrap();
    assert_eq!(chain.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0]);
}
