//! Route configuration: the `[[routes]]` and `[routing]` tables, their
//! validation (errors name the key), and building live `Route`s from them.
//!
//! ```toml
//! [[routes]]
//! id = 1
//! provider = "bridgexapi"
//! api_key = "..."            # or env OTPD_ROUTE_1_API_KEY
//! provider_route_id = 3
//! caller_id = "BRIDGEXAPI"
//! countries = ["NL", "BE"]
//! price = { NL = 0.05, "*" = 0.08 }
//! currency = "EUR"
//! template = "Your verification code is {code}."
//! templates = { nl = "Je verificatiecode is {code}." }
//!
//! [routing]
//! failover_on_timeout = true
//! breaker = { failure_threshold = 5, cool_off_seconds = 30 }
//! countries.UG.routes = [2, 1]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, de::Error as _};

use super::router::DEFAULT_TEMPLATE;
use super::{
    AfricasTalkingProvider, BridgexProvider, ConsoleProvider, Route, SmsProvider, TwilioProvider,
    WebhookProvider, http_client,
};
use crate::domain::code::MAX_CODE_LENGTH;

pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const MAX_TIMEOUT_MS: u64 = 60_000;

/// BridgeXAPI's limit on one message (ASCII characters).
pub const BRIDGEX_MAX_MESSAGE: usize = 158;
/// Twilio's limit on `Body`.
pub const TWILIO_MAX_BODY: usize = 1_600;
/// BridgeXAPI's public and enterprise routes.
const BRIDGEX_ROUTE_IDS: [u8; 7] = [1, 2, 3, 4, 5, 7, 8];

/// One `[[routes]]` entry: otpd's route id, the provider and its settings, and
/// what the route serves and costs. Keys of the provider's settings sit in the
/// same table as the common keys; unknown keys are rejected.
/// Serialized flat, as it is written (for `--print-config`); secrets as `"***"`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteSettings {
    /// What callers pass as `route_id`. 0 is the built-in sandbox.
    pub id: u32,
    #[serde(flatten)]
    pub provider: ProviderSettings,
    /// ISO 3166-1 alpha-2 codes this route serves; empty means every country.
    pub countries: Vec<String>,
    /// Price per message by ISO code, `"*"` for every other country; for cost
    /// estimates when the provider reports none.
    pub price: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    pub template: String,
    /// Per-locale templates (`fr`, `pt-BR`, …).
    pub templates: BTreeMap<String, String>,
    /// Total time for one provider call; `routing.timeout_ms` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Time to establish the connection; `routing.connect_timeout_ms` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonKeys {
    id: u32,
    #[serde(default)]
    countries: Vec<String>,
    #[serde(default)]
    price: BTreeMap<String, f64>,
    currency: Option<String>,
    template: Option<String>,
    #[serde(default)]
    templates: BTreeMap<String, String>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
}

const COMMON_KEYS: [&str; 8] = [
    "id",
    "countries",
    "price",
    "currency",
    "template",
    "templates",
    "timeout_ms",
    "connect_timeout_ms",
];

// serde cannot combine `flatten` with `deny_unknown_fields`, so the table is
// split by hand: common keys to one struct, the rest (with `provider`) to the
// tagged provider enum, each of which rejects what it does not know.
impl<'de> Deserialize<'de> for RouteSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = serde_json::Map::deserialize(deserializer)?;
        let mut common = serde_json::Map::new();
        for key in COMMON_KEYS {
            if let Some(value) = table.remove(key) {
                common.insert(key.to_owned(), value);
            }
        }
        let common: CommonKeys =
            serde_json::from_value(serde_json::Value::Object(common)).map_err(D::Error::custom)?;
        let provider: ProviderSettings =
            serde_json::from_value(serde_json::Value::Object(table))
                .map_err(|e| D::Error::custom(format!("route {}: {e}", common.id)))?;
        Ok(RouteSettings {
            id: common.id,
            provider,
            countries: common.countries,
            price: common.price,
            currency: common.currency,
            template: common
                .template
                .unwrap_or_else(|| DEFAULT_TEMPLATE.to_owned()),
            templates: common.templates,
            timeout_ms: common.timeout_ms,
            connect_timeout_ms: common.connect_timeout_ms,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderSettings {
    Bridgexapi(BridgexSettings),
    Africastalking(AfricasTalkingSettings),
    Twilio(TwilioSettings),
    Webhook(WebhookSettings),
    Console(NoSettings),
    Sandbox(NoSettings),
}

impl ProviderSettings {
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSettings::Bridgexapi(_) => "bridgexapi",
            ProviderSettings::Africastalking(_) => "africastalking",
            ProviderSettings::Twilio(_) => "twilio",
            ProviderSettings::Webhook(_) => "webhook",
            ProviderSettings::Console(_) => "console",
            ProviderSettings::Sandbox(_) => "sandbox",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgexSettings {
    #[serde(default = "default_bridgex_base_url")]
    pub base_url: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::config::redact_secret_option"
    )]
    pub api_key: Option<SecretString>,
    /// BridgeXAPI's own route (1–5, 7, 8), sent as `route_id` on the wire.
    pub provider_route_id: u8,
    /// Sender shown on the handset, 3 to 11 characters.
    pub caller_id: String,
}

pub const BRIDGEX_BASE_URL: &str = "https://hi.bridgexapi.io";

fn default_bridgex_base_url() -> String {
    BRIDGEX_BASE_URL.to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AfricasTalkingSettings {
    /// `sandbox` selects the sandbox API unless `base_url` is set.
    pub username: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::config::redact_secret_option"
    )]
    pub api_key: Option<SecretString>,
    /// Sender id or short code (`from`); the account default when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Ask Africa's Talking to queue the message (`enqueue=1`).
    #[serde(default)]
    pub enqueue: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioSettings {
    #[serde(default = "default_twilio_base_url")]
    pub base_url: String,
    pub account_sid: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::config::redact_secret_option"
    )]
    pub auth_token: Option<SecretString>,
    /// Exactly one of `from` and `messaging_service_sid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messaging_service_sid: Option<String>,
    /// Delivery-report URL (it embeds otpd's callback secret, hence a secret).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::config::redact_secret_option"
    )]
    pub status_callback: Option<SecretString>,
}

pub const TWILIO_BASE_URL: &str = "https://api.twilio.com";

fn default_twilio_base_url() -> String {
    TWILIO_BASE_URL.to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Where to POST `{to, message, verification_id, route_id}`.
    pub url: String,
    /// Key for the `X-Otpd-Signature: sha256=<hex>` HMAC of the body.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::config::redact_secret_option"
    )]
    pub secret: Option<SecretString>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive route failures (outage, rate limit, balance, auth, timeout)
    /// that open the circuit.
    pub failure_threshold: u32,
    /// How long an open route is skipped before one probe is let through.
    pub cool_off_seconds: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_off_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CountryRouting {
    pub routes: Vec<u32>,
}

/// The `[routing]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSettings {
    /// Whether to try the next route after a timeout (or an unreadable success
    /// answer), when the first provider may already have sent the SMS.
    /// `true` (default): the user gets a code even when a provider hangs, at the
    /// risk of receiving two SMS (the first code is replaced by the second, so
    /// only the later one works). `false`: never two SMS, but such a send fails
    /// with 502 and the user asks again.
    pub failover_on_timeout: bool,
    /// Default total time for one provider call.
    pub timeout_ms: u64,
    /// Default time to establish a provider connection.
    pub connect_timeout_ms: u64,
    pub breaker: BreakerSettings,
    /// Per-country chains (ISO code → route ids), used instead of the default
    /// chain for numbers of that country when the tenant has no chain of its own.
    pub countries: BTreeMap<String, CountryRouting>,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            failover_on_timeout: true,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            breaker: BreakerSettings::default(),
            countries: BTreeMap::new(),
        }
    }
}

impl RoutingSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// The environment variable that overrides one secret of a route:
/// `OTPD_ROUTE_<id>_<FIELD>`, e.g. `OTPD_ROUTE_1_API_KEY`. (Indexed env keys
/// cannot address array entries, so secrets get their own names.)
pub fn secret_env_var(route_id: u32, field: &str) -> String {
    format!("OTPD_ROUTE_{route_id}_{}", field.to_ascii_uppercase())
}

/// Replaces each route's secrets with the environment's, where set.
/// `lookup` is `|name| std::env::var(name).ok()` outside tests.
pub fn apply_secret_env(routes: &mut [RouteSettings], lookup: impl Fn(&str) -> Option<String>) {
    for route in routes {
        let id = route.id;
        for (field, slot) in secret_slots(&mut route.provider) {
            if let Some(value) = lookup(&secret_env_var(id, field)) {
                *slot = Some(SecretString::from(value));
            }
        }
    }
}

/// The variables `apply_secret_env` reads for these routes.
pub fn secret_env_vars(routes: &[RouteSettings]) -> Vec<String> {
    let mut names = Vec::new();
    for route in routes {
        let mut provider = route.provider.clone();
        for (field, _) in secret_slots(&mut provider) {
            names.push(secret_env_var(route.id, field));
        }
    }
    names
}

/// A provider's secrets that may come from the environment, by field name.
fn secret_slots(provider: &mut ProviderSettings) -> Vec<(&'static str, &mut Option<SecretString>)> {
    match provider {
        ProviderSettings::Bridgexapi(s) => vec![("api_key", &mut s.api_key)],
        ProviderSettings::Africastalking(s) => vec![("api_key", &mut s.api_key)],
        ProviderSettings::Twilio(s) => vec![
            ("auth_token", &mut s.auth_token),
            ("status_callback", &mut s.status_callback),
        ],
        ProviderSettings::Webhook(s) => vec![("secret", &mut s.secret)],
        ProviderSettings::Console(_) | ProviderSettings::Sandbox(_) => Vec::new(),
    }
}

/// Checks every route and the routing table. The error names the key:
/// `routes[1].template: renders to 171 characters; BridgeXAPI allows 158`.
pub fn validate_routes(routes: &[RouteSettings], routing: &RoutingSettings) -> Result<(), String> {
    validate_timeouts("routing", routing.timeout_ms, routing.connect_timeout_ms)?;
    if routing.breaker.failure_threshold == 0 {
        return Err("routing.breaker.failure_threshold: must be at least 1".to_owned());
    }
    if !(1..=86_400).contains(&routing.breaker.cool_off_seconds) {
        return Err("routing.breaker.cool_off_seconds: must be between 1 and 86400".to_owned());
    }
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (index, route) in routes.iter().enumerate() {
        let key = format!("routes[{index}]");
        if let Some(first) = seen.insert(route.id, index) {
            return Err(format!(
                "{key}.id: {} is already used by routes[{first}]",
                route.id
            ));
        }
        validate_route(&key, route, routing)?;
    }
    for (country, chain) in &routing.countries {
        let key = format!("routing.countries.{country}");
        if !is_country_code(country) {
            return Err(format!("{key}: not an ISO 3166-1 alpha-2 code"));
        }
        validate_chain(&format!("{key}.routes"), &chain.routes, routes)?;
        if chain.routes.is_empty() {
            return Err(format!("{key}.routes: must name at least one route"));
        }
        for id in &chain.routes {
            let serves = routes.iter().find(|r| r.id == *id).is_some_and(|r| {
                r.countries.is_empty()
                    || r.countries.iter().any(|c| c.eq_ignore_ascii_case(country))
            });
            if !serves {
                return Err(format!(
                    "{key}.routes: route {id} does not serve {country} (see its `countries`)"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a failover chain (`policy.routes`, `tenants.X.policy.routes`, …)
/// against the configured routes.
pub fn validate_chain(key: &str, chain: &[u32], routes: &[RouteSettings]) -> Result<(), String> {
    for (i, id) in chain.iter().enumerate() {
        if chain[..i].contains(id) {
            return Err(format!("{key}: route {id} is listed twice"));
        }
        if !routes.iter().any(|r| r.id == *id) {
            return Err(format!("{key}: route {id} is not configured in [[routes]]"));
        }
    }
    Ok(())
}

fn validate_route(
    key: &str,
    route: &RouteSettings,
    routing: &RoutingSettings,
) -> Result<(), String> {
    if route.id == 0 {
        return Err(format!("{key}.id: 0 is reserved for the built-in sandbox"));
    }
    for country in &route.countries {
        if !is_country_code(country) {
            return Err(format!(
                "{key}.countries: {country:?} is not an ISO 3166-1 alpha-2 code"
            ));
        }
    }
    for (country, price) in &route.price {
        if country != "*" && !is_country_code(country) {
            return Err(format!(
                "{key}.price: {country:?} is not an ISO 3166-1 alpha-2 code or \"*\""
            ));
        }
        if !price.is_finite() || *price < 0.0 {
            return Err(format!(
                "{key}.price.{country}: must be a non-negative number"
            ));
        }
    }
    match &route.currency {
        Some(c) if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            return Err(format!(
                "{key}.currency: must be an ISO 4217 code such as EUR"
            ));
        }
        None if !route.price.is_empty() => {
            return Err(format!("{key}.currency: required when price is set"));
        }
        _ => {}
    }
    validate_timeouts(
        key,
        route.timeout_ms.unwrap_or(routing.timeout_ms),
        route
            .connect_timeout_ms
            .unwrap_or(routing.connect_timeout_ms),
    )?;
    validate_template(&format!("{key}.template"), &route.template, &route.provider)?;
    for (locale, template) in &route.templates {
        validate_template(
            &format!("{key}.templates.{locale}"),
            template,
            &route.provider,
        )?;
    }
    let secret = |field: &str, value: &Option<SecretString>| match value {
        Some(v) if !v.expose_secret().trim().is_empty() => Ok(()),
        _ => Err(format!(
            "{key}.{field}: required (or set {})",
            secret_env_var(route.id, field)
        )),
    };
    match &route.provider {
        ProviderSettings::Bridgexapi(s) => {
            validate_url(&format!("{key}.base_url"), &s.base_url)?;
            secret("api_key", &s.api_key)?;
            if !BRIDGEX_ROUTE_IDS.contains(&s.provider_route_id) {
                return Err(format!(
                    "{key}.provider_route_id: must be one of BridgeXAPI's routes 1, 2, 3, 4, 5, 7, 8"
                ));
            }
            let len = s.caller_id.chars().count();
            if !(3..=11).contains(&len) || !s.caller_id.is_ascii() {
                return Err(format!("{key}.caller_id: must be 3 to 11 ASCII characters"));
            }
        }
        ProviderSettings::Africastalking(s) => {
            if s.username.trim().is_empty() {
                return Err(format!(
                    "{key}.username: required (`sandbox` for the sandbox)"
                ));
            }
            secret("api_key", &s.api_key)?;
            if let Some(url) = &s.base_url {
                validate_url(&format!("{key}.base_url"), url)?;
            }
            if s.sender_id
                .as_deref()
                .is_some_and(|id| id.trim().is_empty())
            {
                return Err(format!("{key}.sender_id: must not be empty when set"));
            }
        }
        ProviderSettings::Twilio(s) => {
            validate_url(&format!("{key}.base_url"), &s.base_url)?;
            if !(s.account_sid.len() == 34
                && s.account_sid.starts_with("AC")
                && s.account_sid.bytes().all(|b| b.is_ascii_alphanumeric()))
            {
                return Err(format!(
                    "{key}.account_sid: must be a Twilio account SID (AC followed by 32 characters)"
                ));
            }
            secret("auth_token", &s.auth_token)?;
            match (&s.from, &s.messaging_service_sid) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "{key}.from: set exactly one of `from` and `messaging_service_sid`"
                    ));
                }
            }
            if let Some(url) = &s.status_callback {
                validate_url(&format!("{key}.status_callback"), url.expose_secret())?;
            }
        }
        ProviderSettings::Webhook(s) => {
            validate_url(&format!("{key}.url"), &s.url)?;
            secret("secret", &s.secret)?;
            if s.secret
                .as_ref()
                .is_some_and(|v| v.expose_secret().len() < 16)
            {
                return Err(format!("{key}.secret: must be at least 16 characters"));
            }
        }
        ProviderSettings::Console(_) | ProviderSettings::Sandbox(_) => {}
    }
    Ok(())
}

fn validate_timeouts(key: &str, total_ms: u64, connect_ms: u64) -> Result<(), String> {
    if !(1..=MAX_TIMEOUT_MS).contains(&total_ms) {
        return Err(format!(
            "{key}.timeout_ms: must be between 1 and {MAX_TIMEOUT_MS}"
        ));
    }
    if !(1..=total_ms).contains(&connect_ms) {
        return Err(format!(
            "{key}.connect_timeout_ms: must be between 1 and timeout_ms ({total_ms})"
        ));
    }
    Ok(())
}

/// A template is checked as rendered with the longest possible code, so no
/// send can fail later on length.
fn validate_template(key: &str, template: &str, provider: &ProviderSettings) -> Result<(), String> {
    if !template.contains("{code}") {
        return Err(format!("{key}: must contain {{code}}"));
    }
    let rendered = template.replace("{code}", &"0".repeat(MAX_CODE_LENGTH as usize));
    let len = rendered.chars().count();
    match provider {
        ProviderSettings::Bridgexapi(_) => {
            if !rendered.is_ascii() {
                return Err(format!("{key}: BridgeXAPI accepts ASCII characters only"));
            }
            if len > BRIDGEX_MAX_MESSAGE {
                return Err(format!(
                    "{key}: renders to {len} characters; BridgeXAPI allows {BRIDGEX_MAX_MESSAGE}"
                ));
            }
        }
        ProviderSettings::Twilio(_) if len > TWILIO_MAX_BODY => {
            return Err(format!(
                "{key}: renders to {len} characters; Twilio allows {TWILIO_MAX_BODY}"
            ));
        }
        _ => {}
    }
    Ok(())
}

fn validate_url(key: &str, value: &str) -> Result<(), String> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        // The value itself is not echoed: URLs may carry credentials.
        _ => Err(format!("{key}: must be an http or https URL")),
    }
}

fn is_country_code(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic())
}

/// Validates the routes and builds them. `client` is the process-wide HTTP
/// client (see `http_client`); a route with its own `connect_timeout_ms` gets
/// its own client, since connect timeouts are per client. `sandbox` is the
/// provider behind routes with `provider = "sandbox"`.
pub fn build_routes(
    settings: &[RouteSettings],
    routing: &RoutingSettings,
    client: &reqwest::Client,
    sandbox: Arc<dyn SmsProvider>,
) -> Result<Vec<Route>, String> {
    validate_routes(settings, routing)?;
    let mut routes = Vec::with_capacity(settings.len());
    for (index, s) in settings.iter().enumerate() {
        let key = format!("routes[{index}]");
        let timeout = Duration::from_millis(s.timeout_ms.unwrap_or(routing.timeout_ms));
        let client = match s.connect_timeout_ms {
            Some(ms) if ms != routing.connect_timeout_ms => {
                http_client(Duration::from_millis(ms), timeout)?
            }
            _ => client.clone(),
        };
        let fail = |e: String| format!("{key}: {e}");
        let provider: Arc<dyn SmsProvider> = match &s.provider {
            ProviderSettings::Bridgexapi(p) => {
                Arc::new(BridgexProvider::new(p, client, timeout).map_err(fail)?)
            }
            ProviderSettings::Africastalking(p) => {
                Arc::new(AfricasTalkingProvider::new(p, client, timeout).map_err(fail)?)
            }
            ProviderSettings::Twilio(p) => {
                Arc::new(TwilioProvider::new(p, client, timeout).map_err(fail)?)
            }
            ProviderSettings::Webhook(p) => {
                Arc::new(WebhookProvider::new(p, client, timeout).map_err(fail)?)
            }
            ProviderSettings::Console(_) => Arc::new(ConsoleProvider),
            ProviderSettings::Sandbox(_) => sandbox.clone(),
        };
        let mut route = Route::new(s.id, provider);
        route.countries = s.countries.iter().map(|c| c.to_ascii_uppercase()).collect();
        route.template = s.template.clone();
        route.templates_by_locale = s.templates.clone();
        route.price = s
            .price
            .iter()
            .map(|(c, p)| (c.to_ascii_uppercase(), *p))
            .collect();
        route.currency = s.currency.as_ref().map(|c| c.to_ascii_uppercase());
        route.timeout = timeout;
        routes.push(route);
    }
    Ok(routes)
}
