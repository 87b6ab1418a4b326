//! Explicit routing: which routes a send may use, in which order, and walking
//! that chain until one provider takes the message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::domain::{Code, PhoneNumber};

pub const DEFAULT_TEMPLATE: &str = "Your verification code is {code}.";

/// Route id of the built-in sandbox when no routes are configured.
pub const SANDBOX_ROUTE_ID: u32 = 0;

pub struct Route {
    pub id: u32,
    pub provider: Arc<dyn SmsProvider>,
    /// ISO codes this route serves; empty means every country.
    pub countries: Vec<String>,
    /// Message text with `{code}`; per-locale variants by locale tag.
    pub template: String,
    pub templates_by_locale: BTreeMap<String, String>,
    pub timeout: Duration,
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
        }
    }

    pub fn serves(&self, country: Option<&str>) -> bool {
        self.countries.is_empty()
            || country.is_some_and(|c| self.countries.iter().any(|r| r.eq_ignore_ascii_case(c)))
    }

    pub fn render(&self, code: &Code, locale: Option<&str>) -> String {
        let template = locale
            .and_then(|l| self.templates_by_locale.get(l))
            .unwrap_or(&self.template);
        template.replace("{code}", code.expose())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("no route with id {0} is configured")]
    UnknownRoute(u32),
    #[error("route {0} is not allowed for this tenant")]
    RouteNotAllowed(u32),
    #[error("no configured route serves this destination")]
    NoRoute,
}

/// One provider call and how it went.
#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    pub route_id: u32,
    pub provider: &'static str,
    pub result: Result<SendReceipt, ProviderError>,
    pub latency: Duration,
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
}

impl SmsRouter {
    /// `routes` empty means the zero-config setup: everything goes to `sandbox`.
    pub fn new(routes: Vec<Route>, sandbox: Route, failover_on_timeout: bool) -> Self {
        Self {
            routes: routes.into_iter().map(|r| (r.id, r)).collect(),
            sandbox,
            failover_on_timeout,
        }
    }

    pub fn has_configured_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    pub fn route(&self, id: u32) -> Option<&Route> {
        self.routes.get(&id)
    }

    /// Each route's id, provider and circuit state, for `/health`.
    pub fn route_health(&self) -> Vec<(u32, &'static str, &'static str)> {
        if self.routes.is_empty() {
            return vec![(self.sandbox.id, self.sandbox.provider.name(), "closed")];
        }
        self.routes
            .values()
            .map(|r| (r.id, r.provider.name(), "closed"))
            .collect()
    }

    /// The routes to try, in order. `allowed` is the tenant's chain (empty: every
    /// configured route in id order); `pinned` goes first; `sandbox` short-cuts
    /// to the built-in inbox.
    pub fn plan(
        &self,
        allowed: &[u32],
        pinned: Option<u32>,
        failover: bool,
        sandbox: bool,
        country: Option<&str>,
    ) -> Result<Vec<&Route>, RoutingError> {
        if sandbox || self.routes.is_empty() {
            return Ok(vec![&self.sandbox]);
        }
        let chain: Vec<u32> = if allowed.is_empty() {
            self.routes.keys().copied().collect()
        } else {
            allowed.to_vec()
        };
        let mut ordered = Vec::with_capacity(chain.len());
        if let Some(id) = pinned {
            let route = self.routes.get(&id).ok_or(RoutingError::UnknownRoute(id))?;
            if !allowed.is_empty() && !allowed.contains(&id) {
                return Err(RoutingError::RouteNotAllowed(id));
            }
            ordered.push(route);
            if !failover {
                return Ok(ordered);
            }
        }
        ordered.extend(
            chain
                .iter()
                .filter(|id| Some(**id) != pinned)
                .filter_map(|id| self.routes.get(id))
                .filter(|r| r.serves(country)),
        );
        if ordered.is_empty() {
            return Err(RoutingError::NoRoute);
        }
        Ok(ordered)
    }

    /// Tries each route in turn until one accepts. Stops early when the error says
    /// no route can do better, or on a timeout when failover on timeout is off
    /// (the first provider may have sent it; a second send would duplicate).
    pub async fn deliver(
        &self,
        chain: &[&Route],
        req: &DeliveryRequest<'_>,
    ) -> Vec<DeliveryAttempt> {
        let mut attempts = Vec::with_capacity(chain.len());
        for route in chain {
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
            let result = match tokio::time::timeout(route.timeout, route.provider.send(&sms)).await
            {
                Ok(r) => r,
                Err(_) => Err(ProviderError::new(
                    ProviderErrorKind::Timeout,
                    "no answer in time",
                )),
            };
            let latency = started.elapsed();
            let stop = match &result {
                Ok(_) => true,
                Err(e) => {
                    !e.kind.try_next_route()
                        || (e.kind == ProviderErrorKind::Timeout && !self.failover_on_timeout)
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
