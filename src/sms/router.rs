//! Explicit routing: which routes a send may use, in which order, and walking
//! that chain until one provider takes the message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::breaker::CircuitBreakers;
use super::config::RoutingSettings;
use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::clock::Clock;
use crate::domain::{Code, DeliveryStatus, MessageRecord, PhoneNumber};

pub const DEFAULT_TEMPLATE: &str = "Your verification code is {code}.";

/// Route id of the built-in sandbox when no routes are configured.
pub const SANDBOX_ROUTE_ID: u32 = 0;

/// Extra time the router gives a provider over the route's timeout before
/// cutting it off itself, so the provider's own (more precise) timeout error
/// wins: a connect timeout is safe to fail over, a read timeout may not be.
const TIMEOUT_GRACE: Duration = Duration::from_millis(100);

pub struct Route {
    pub id: u32,
    pub provider: Arc<dyn SmsProvider>,
    /// ISO codes this route serves; empty means every country.
    pub countries: Vec<String>,
    /// Message text with `{code}`; per-locale variants by locale tag.
    pub template: String,
    pub templates_by_locale: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Price per message by ISO code (`"*"`: any other country).
    pub price: BTreeMap<String, f64>,
    pub currency: Option<String>,
}

impl Route {
    pub fn new(id: u32, provider: Arc<dyn SmsProvider>) -> Self {
        Self {
            id,
            provider,
            countries: Vec::new(),
            template: DEFAULT_TEMPLATE.to_owned(),
            templates_by_locale: BTreeMap::new(),
            timeout: Duration::from_secs(5),
            price: BTreeMap::new(),
            currency: None,
        }
    }

    pub fn serves(&self, country: Option<&str>) -> bool {
        self.countries.is_empty()
            || country.is_some_and(|c| self.countries.iter().any(|r| r.eq_ignore_ascii_case(c)))
    }

    /// The template for `locale` (`pt-BR`, then `pt`), else the default one.
    pub fn render(&self, code: &Code, locale: Option<&str>) -> String {
        let template = locale
            .and_then(|l| {
                self.templates_by_locale.get(l).or_else(|| {
                    let language = l.split(['-', '_']).next()?;
                    self.templates_by_locale.get(language)
                })
            })
            .unwrap_or(&self.template);
        template.replace("{code}", code.expose())
    }

    /// The configured price of one message to `country` and its currency.
    pub fn price_for(&self, country: Option<&str>) -> Option<(f64, String)> {
        let currency = self.currency.clone()?;
        let price = country
            .and_then(|c| self.price.get(&c.to_ascii_uppercase()))
            .or_else(|| self.price.get("*"))?;
        Some((*price, currency))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("no route with id {0} is configured")]
    UnknownRoute(u32),
    #[error("route {0} is not allowed for this tenant")]
    RouteNotAllowed(u32),
    #[error("route {0} does not serve this destination's country")]
    RouteDoesNotServe(u32),
    #[error("no configured route serves this destination")]
    NoRoute,
    /// Every route that could take the message is skipped after repeated
    /// failures. Answer 503 with `Retry-After`: sending anyway would only make
    /// the caller wait for the same failures.
    #[error("every route for this destination is failing; retry in {retry_after_seconds} s")]
    CircuitOpen { retry_after_seconds: u64 },
}

/// One provider call and how it went.
#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    pub route_id: u32,
    pub provider: &'static str,
    pub result: Result<SendReceipt, ProviderError>,
    pub latency: Duration,
}

impl DeliveryAttempt {
    /// What to record for this attempt: the provider's status on success,
    /// `Unknown` when the provider may have taken the message (timeout,
    /// unreadable success answer), `Failed` otherwise.
    pub fn delivery_status(&self) -> DeliveryStatus {
        match &self.result {
            Ok(receipt) => receipt.status.unwrap_or(DeliveryStatus::Queued),
            Err(e) if e.kind.outcome_unknown() => DeliveryStatus::Unknown,
            Err(_) => DeliveryStatus::Failed,
        }
    }

    /// `"<kind>: <reason>"` for `MessageRecord::error`.
    pub fn error_summary(&self) -> Option<String> {
        self.result
            .as_ref()
            .err()
            .map(|e| format!("{}: {}", e.kind.as_str(), e.message))
    }
}

pub struct DeliveryRequest<'a> {
    pub tenant: &'a str,
    pub verification_id: Uuid,
    pub to: &'a PhoneNumber,
    pub code: &'a Code,
    pub locale: Option<&'a str>,
    pub ttl: Duration,
}

pub struct SmsRouter {
    routes: BTreeMap<u32, Route>,
    sandbox: Route,
    failover_on_timeout: bool,
    /// Per-country chains by upper-case ISO code.
    country_chains: BTreeMap<String, Vec<u32>>,
    default_chain: Vec<u32>,
    /// The routes' one currency, which spend budgets are kept in (config
    /// validation refuses a budget over routes priced in several).
    budget_currency: Option<String>,
    breakers: CircuitBreakers,
    clock: Arc<dyn Clock>,
}

impl SmsRouter {
    /// `routes` empty means the zero-config setup: everything goes to `sandbox`.
    /// The default chain is every route in id order until `with_default_chain`.
    pub fn new(
        routes: Vec<Route>,
        sandbox: Route,
        routing: &RoutingSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let routes: BTreeMap<u32, Route> = routes.into_iter().map(|r| (r.id, r)).collect();
        let currencies: BTreeSet<&str> = routes
            .values()
            .filter_map(|r| r.currency.as_deref())
            .collect();
        let budget_currency = match currencies.into_iter().collect::<Vec<_>>()[..] {
            [one] => Some(one.to_ascii_uppercase()),
            _ => None,
        };
        let breakers = CircuitBreakers::new(
            routing.breaker.clone(),
            clock.clone(),
            routes.keys().copied(),
        );
        Self {
            routes,
            sandbox,
            failover_on_timeout: routing.failover_on_timeout,
            country_chains: routing
                .countries
                .iter()
                .map(|(cc, c)| (cc.to_ascii_uppercase(), c.routes.clone()))
                .collect(),
            default_chain: Vec::new(),
            budget_currency,
            breakers,
            clock,
        }
    }

    /// The chain used when neither the tenant nor the destination country has
    /// one (`policy.routes`).
    pub fn with_default_chain(mut self, chain: Vec<u32>) -> Self {
        self.default_chain = chain;
        self
    }

    pub fn has_configured_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    pub fn route(&self, id: u32) -> Option<&Route> {
        self.routes.get(&id)
    }

    /// What an accepted message counts against a daily spend budget, in the
    /// routes' currency: the provider's reported cost when it is in that
    /// currency (or names none), else the route's price for the country. A
    /// cost in another currency with no price to count instead is counted as
    /// reported, and logged: a route billed in another currency needs a price.
    pub fn budget_cost(&self, message: &MessageRecord) -> f64 {
        let in_budget_currency = match (&message.currency, &self.budget_currency) {
            (Some(reported), Some(budget)) => reported.eq_ignore_ascii_case(budget),
            _ => true,
        };
        if in_budget_currency && let Some(cost) = message.cost {
            return cost;
        }
        let price = self
            .routes
            .get(&message.route_id)
            .and_then(|r| r.price_for(message.country.as_deref()));
        if let Some((price, _)) = price {
            return price;
        }
        if !in_budget_currency {
            tracing::warn!(
                route_id = message.route_id,
                currency = message.currency.as_deref(),
                budget_currency = self.budget_currency.as_deref(),
                "a message's cost is in another currency than the spend budget's and \
                 its route has no price: counted as reported"
            );
        }
        message.cost.unwrap_or(0.0)
    }

    /// Each route's id, provider and circuit state (`closed`, `open`,
    /// `half_open`), for `/health`.
    pub fn route_health(&self) -> Vec<(u32, &'static str, &'static str)> {
        if self.routes.is_empty() {
            return vec![(self.sandbox.id, self.sandbox.provider.name(), "closed")];
        }
        self.routes
            .values()
            .map(|r| (r.id, r.provider.name(), self.breakers.state(r.id).as_str()))
            .collect()
    }

    /// Each configured route's breaker state (`closed`, `open`, `half_open`),
    /// for `/health` and metrics.
    pub fn breaker_states(&self) -> Vec<(u32, &'static str)> {
        self.breakers
            .states()
            .into_iter()
            .map(|(id, state)| (id, state.as_str()))
            .collect()
    }

    /// The routes to try, in order.
    ///
    /// The chain is the tenant's own (`tenant_chain`, which also limits what may
    /// be pinned) if it has one, else the destination country's
    /// (`routing.countries.CC.routes`), else the default chain, else every
    /// configured route in id order. `pinned` goes first and must serve the
    /// destination's country; without `failover` it is the only route.
    /// Routes that do not serve the country, and routes whose circuit is open,
    /// are left out. When every candidate is open the answer is
    /// `CircuitOpen` rather than a send that would fail the same way.
    /// `sandbox` short-cuts to the built-in inbox.
    pub fn plan(
        &self,
        tenant_chain: &[u32],
        pinned: Option<u32>,
        failover: bool,
        sandbox: bool,
        country: Option<&str>,
    ) -> Result<Vec<&Route>, RoutingError> {
        if sandbox || self.routes.is_empty() {
            return Ok(vec![&self.sandbox]);
        }
        let all: Vec<u32>;
        let chain: &[u32] = if !tenant_chain.is_empty() {
            tenant_chain
        } else if let Some(chain) =
            country.and_then(|c| self.country_chains.get(&c.to_ascii_uppercase()))
        {
            chain
        } else if !self.default_chain.is_empty() {
            &self.default_chain
        } else {
            all = self.routes.keys().copied().collect();
            &all
        };
        let mut ordered = Vec::with_capacity(chain.len());
        let mut open = Vec::new();
        if let Some(id) = pinned {
            let route = self.routes.get(&id).ok_or(RoutingError::UnknownRoute(id))?;
            if !tenant_chain.is_empty() && !tenant_chain.contains(&id) {
                return Err(RoutingError::RouteNotAllowed(id));
            }
            if !route.serves(country) {
                return Err(RoutingError::RouteDoesNotServe(id));
            }
            if self.breakers.is_available(id) {
                ordered.push(route);
            } else {
                open.push(id);
            }
            if !failover {
                return self.finish(ordered, &open);
            }
        }
        for route in chain
            .iter()
            .filter(|id| Some(**id) != pinned)
            .filter_map(|id| self.routes.get(id))
            .filter(|r| r.serves(country))
        {
            if self.breakers.is_available(route.id) {
                ordered.push(route);
            } else {
                open.push(route.id);
            }
        }
        self.finish(ordered, &open)
    }

    fn finish<'a>(
        &self,
        ordered: Vec<&'a Route>,
        open: &[u32],
    ) -> Result<Vec<&'a Route>, RoutingError> {
        if !ordered.is_empty() {
            return Ok(ordered);
        }
        let now = self.clock.now();
        let soonest = open
            .iter()
            .filter_map(|id| self.breakers.open_until(*id))
            .min();
        match soonest {
            Some(until) => Err(RoutingError::CircuitOpen {
                retry_after_seconds: u64::try_from((until - now).num_seconds())
                    .unwrap_or(0)
                    .max(1),
            }),
            // Open routes whose probe is in flight: retry shortly.
            None if !open.is_empty() => Err(RoutingError::CircuitOpen {
                retry_after_seconds: 1,
            }),
            None => Err(RoutingError::NoRoute),
        }
    }

    /// Tries each route in turn until one accepts. Stops early when the error says
    /// no route can do better, or, with `failover_on_timeout` off, when the
    /// provider may have taken the message (a second send could duplicate it).
    /// A route whose circuit opened since `plan` (or whose probe another send
    /// holds) is skipped, so the result can be empty: treat that as failed.
    /// A receipt without a cost gets the route's configured price; one with a
    /// cost but no currency gets the route's currency.
    pub async fn deliver(
        &self,
        chain: &[&Route],
        req: &DeliveryRequest<'_>,
    ) -> Vec<DeliveryAttempt> {
        let mut attempts = Vec::with_capacity(chain.len());
        for route in chain {
            let Some(permit) = self.breakers.acquire(route.id) else {
                tracing::info!(route_id = route.id, "route skipped: circuit open");
                continue;
            };
            let body = route.render(req.code, req.locale);
            let sms = OutgoingSms {
                tenant: req.tenant,
                verification_id: req.verification_id,
                route_id: route.id,
                to: req.to,
                body: &body,
                ttl: req.ttl,
            };
            let started = Instant::now();
            let result = match tokio::time::timeout(
                route.timeout + TIMEOUT_GRACE,
                route.provider.send(&sms),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ProviderError::new(
                    ProviderErrorKind::Timeout,
                    format!("no answer within {} ms", route.timeout.as_millis()),
                )),
            };
            let latency = started.elapsed();
            permit.record(&result);
            let result = result.map(|receipt| with_price(receipt, route, req.to.country()));
            match &result {
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    route_id = route.id,
                    provider = route.provider.name(),
                    to = %req.to.masked(),
                    error_kind = e.kind.as_str(),
                    error = %e.message,
                    latency_ms = latency.as_millis() as u64,
                    "SMS route failed"
                ),
            }
            let stop = match &result {
                Ok(_) => true,
                Err(e) => {
                    !e.kind.try_next_route()
                        || (e.kind.outcome_unknown() && !self.failover_on_timeout)
                }
            };
            attempts.push(DeliveryAttempt {
                route_id: route.id,
                provider: route.provider.name(),
                result,
                latency,
            });
            if stop {
                break;
            }
        }
        attempts
    }
}

fn with_price(mut receipt: SendReceipt, route: &Route, country: Option<&str>) -> SendReceipt {
    match (receipt.cost, &receipt.currency) {
        (None, _) => {
            if let Some((price, currency)) = route.price_for(country) {
                receipt.cost = Some(price);
                receipt.currency = Some(currency);
            }
        }
        (Some(_), None) => receipt.currency = route.currency.clone(),
        (Some(_), Some(_)) => {}
    }
    receipt
}
