//! Layered configuration: defaults → TOML file → `OTPD_*` environment (`__` for
//! nesting) → CLI flags, validated once at start with errors naming the key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::domain::Policy;
use crate::sms::config::{apply_secret_env, validate_chain, validate_routes};
use crate::sms::{RouteSettings, RoutingSettings};

/// Top-level keys; environment variables outside them (e.g. `OTPD_TEST_*`) are ignored.
const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "store",
    "data_dir",
    "secrets",
    "debug_codes",
    "policy",
    "tenants",
    "log",
    "auth",
    "metrics",
    "routes",
    "routing",
    "dialects",
    "dlr",
    "retention",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    /// Where the SQLite file and the generated server secret live.
    pub data_dir: PathBuf,
    pub secrets: SecretsSettings,
    /// Put the code in send answers (`debug_code`). For development only.
    pub debug_codes: bool,
    /// The default policy for every tenant.
    pub policy: Policy,
    pub tenants: BTreeMap<String, TenantSettings>,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub metrics: MetricsSettings,
    /// `[[routes]]`: SMS routes by id (empty: everything goes to the sandbox).
    pub routes: Vec<RouteSettings>,
    /// `[routing]`: failover on timeout, circuit breaker, per-country chains.
    pub routing: RoutingSettings,
    /// The seed-compatible APIs (BridgeX-style, Openlyne-style).
    pub dialects: DialectSettings,
    /// `[dlr]`: provider delivery reports, pushed and polled.
    pub dlr: DlrSettings,
    /// `[retention]`: how long delivery records are kept.
    pub retention: RetentionSettings,
    /// What is valid but likely not meant (logged at start).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::default(),
            store: StoreSettings::default(),
            data_dir: PathBuf::from("./data"),
            secrets: SecretsSettings::default(),
            debug_codes: false,
            policy: Policy::default(),
            tenants: BTreeMap::new(),
            log: LogSettings::default(),
            auth: AuthSettings::default(),
            metrics: MetricsSettings::default(),
            routes: Vec::new(),
            routing: RoutingSettings::default(),
            dialects: DialectSettings::default(),
            dlr: DlrSettings::default(),
            retention: RetentionSettings::default(),
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    /// Request bodies above this answer 413.
    pub max_body_bytes: usize,
    /// A request still running after this answers 503.
    pub request_timeout_seconds: u64,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names the
    /// client; from anyone else the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before
    /// their connections are dropped.
    pub shutdown_grace_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 16 * 1024,
            request_timeout_seconds: 30,
            trusted_proxies: Vec::new(),
            shutdown_grace_seconds: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `sqlite://PATH`, `memory://`. Default: `sqlite://{data_dir}/otpd.db`.
    #[serde(serialize_with = "redact_url_option")]
    pub url: Option<String>,
    pub purge_interval_seconds: u64,
    pub purge_batch: u32,
    /// A network store's operation that takes longer answers 503 instead of hanging.
    pub operation_timeout_ms: u64,
    /// SQLite only: fsync every commit (`synchronous=FULL`) to survive power loss,
    /// not just a crash of otpd. Costs write throughput.
    pub sqlite_synchronous_full: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: None,
            purge_interval_seconds: 30,
            purge_batch: 1_000,
            operation_timeout_ms: 5_000,
            sqlite_synchronous_full: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSettings {
    /// Master secret all keys derive from. Default: generated into
    /// `{data_dir}/secret.key` (mode 0600) on first start.
    #[serde(serialize_with = "redact_secret_option")]
    pub master_key: Option<SecretString>,
    /// Explicit HMAC key for code hashes (otherwise derived from the master).
    #[serde(serialize_with = "redact_secret_option")]
    pub code_key: Option<SecretString>,
    /// Phone-number encryption keys by numeric id, for rotation.
    #[serde(serialize_with = "redact_secret_map")]
    pub phone_keys: BTreeMap<String, SecretString>,
    /// Which of `phone_keys` encrypts new records (default: the highest id).
    pub current_phone_key: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// Keys set here override `policy` for this tenant.
    pub policy: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// How long a key lookup is cached; a revoked key stops working within this.
    pub cache_seconds: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self { cache_seconds: 5 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `GET /metrics` (Prometheus text format) and record metrics.
    pub enabled: bool,
    /// Label sends and checks with the tenant. Turn off when tenants are many
    /// (every tenant multiplies the number of series).
    pub tenant_label: bool,
    /// When set, `/metrics` requires `Authorization: Bearer <token>`.
    #[serde(serialize_with = "redact_secret_option")]
    pub token: Option<SecretString>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            tenant_label: true,
            token: None,
        }
    }
}

/// The seed-compatible APIs. Each has its own policy: the original service's
/// defaults over the calling tenant's policy (`[policy]` with its overrides),
/// then the keys set in `dialects.<name>.policy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DialectSettings {
    pub bridgex: BridgexDialect,
    pub openlyne: OpenlyneDialect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgexDialect {
    /// Overrides of the dialect policy (code_length 6, ttl_seconds 300,
    /// cooldown_seconds 45, max_attempts 5; other keys from `[policy]`).
    pub policy: serde_json::Map<String, serde_json::Value>,
    /// `route_id` of a `/send-otp` request that names none (1 to 8).
    pub default_route_id: u32,
    /// Reported by `GET /config`.
    pub default_caller_id: String,
    /// Base of `delivery_status_url` for messages a BridgeXAPI route delivered.
    pub bridgexapi_base_url: String,
}

impl Default for BridgexDialect {
    fn default() -> Self {
        Self {
            policy: serde_json::Map::new(),
            default_route_id: 3,
            default_caller_id: "BRIDGEXAPI".into(),
            bridgexapi_base_url: "https://hi.bridgexapi.io".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenlyneDialect {
    /// Overrides of the dialect policy (code_length 6, ttl_seconds 180,
    /// cooldown_seconds 30, max_attempts 5; other keys from `[policy]`).
    pub policy: serde_json::Map<String, serde_json::Value>,
}

/// Delivery reports: the callback endpoints `POST /v1/dlr/{provider}/{secret}`
/// (Africa's Talking, Twilio) and the BridgeXAPI poller.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlrSettings {
    /// The `{secret}` path segment providers must call; unset, the callback
    /// endpoints answer 404. At least 16 URL-safe characters.
    #[serde(serialize_with = "redact_secret_option")]
    pub secret: Option<SecretString>,
    /// otpd's base URL as providers reach it (`https://otpd.example.com`). Twilio
    /// signs the full URL it called, so it is needed to check signatures; it also
    /// gives Twilio routes without their own `status_callback` one.
    #[serde(serialize_with = "redact_url_option")]
    pub public_base_url: Option<String>,
    /// How often the poller looks for BridgeXAPI messages due a status check.
    pub poll_interval_seconds: u64,
    /// Messages older than this are no longer polled.
    pub poll_max_age_seconds: u64,
    /// Messages considered per poll page.
    pub poll_batch: u32,
}

impl Default for DlrSettings {
    fn default() -> Self {
        Self {
            secret: None,
            public_base_url: None,
            poll_interval_seconds: 5,
            poll_max_age_seconds: 6 * 3_600,
            poll_batch: 200,
        }
    }
}

impl DlrSettings {
    /// The callback URL for `provider`, when both the secret and the public base
    /// URL are configured.
    pub fn callback_url(&self, provider: &str) -> Option<String> {
        let base = self.public_base_url.as_deref()?.trim_end_matches('/');
        let secret = self.secret.as_ref()?;
        Some(format!(
            "{base}/v1/dlr/{provider}/{}",
            secret.expose_secret()
        ))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Delivery attempts (masked numbers only) older than this are deleted.
    /// Usage stays as daily aggregates.
    pub message_days: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self { message_days: 30 }
    }
}

/// Longest `retention.message_days`: Redis keeps messages this long at most.
pub const MAX_MESSAGE_DAYS: u32 = 366;

/// The route ids a BridgeX-style client may send, as the original validates them.
pub const BRIDGEX_ROUTE_IDS: std::ops::RangeInclusive<u32> = 1..=8;

/// The shortest master, code or phone key taken without a warning.
const MIN_SECRET_CHARS: usize = 16;

/// `log.level` held to what is meant: `EnvFilter` reads a bare word that is
/// not a level (`warning`, `verbose`) as a target name, which silences every
/// line, audit lines included.
fn validate_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    for directive in level.split(',') {
        let meant = match directive.rsplit_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        };
        if !meant {
            return Err(format!(
                "log.level: {:?} is not a level ({}) or a target=level directive",
                directive.trim(),
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("log.level: {e}"))
}

/// `OTPD_*` variables that configure nothing: a top-level typo
/// (`OTPD_SERVER_LISTEN` for `OTPD_SERVER__LISTEN`) or a route secret for a
/// route or field that does not exist. Nested typos are errors already (every
/// section denies unknown keys). `OTPD_TEST_*` and `OTPD_BENCH_*` belong to the
/// project's tests and benchmark.
fn unused_env_vars(names: impl Iterator<Item = String>, routes: &[RouteSettings]) -> Vec<String> {
    let route_vars = crate::sms::config::secret_env_vars(routes);
    let mut unused: Vec<String> = names
        .filter(|name| {
            let Some(rest) = name.strip_prefix("OTPD_") else {
                return false;
            };
            let first = rest.split("__").next().unwrap_or_default();
            !(rest.starts_with("TEST_")
                || rest.starts_with("BENCH_")
                || TOP_LEVEL_KEYS.iter().any(|t| t.eq_ignore_ascii_case(first))
                || route_vars.contains(name))
        })
        .collect();
    unused.sort();
    unused
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

/// CLI flags that override the file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub store_url: Option<String>,
}

impl Settings {
    /// Loads from `path` (or `./otpd.toml` if present), then `OTPD_*`, then flags.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    p.display()
                )));
            }
            Some(p) => figment = figment.merge(Toml::file_exact(p)),
            // The default file is optional: no configuration is a valid start.
            None if Path::new("otpd.toml").exists() => {
                figment = figment.merge(Toml::file_exact("otpd.toml"));
            }
            None => {}
        }
        figment = figment.merge(Env::prefixed("OTPD_").split("__").filter(|k| {
            let first = k.as_str().split("__").next().unwrap_or_default();
            let first = first.split('.').next().unwrap_or_default();
            TOP_LEVEL_KEYS.iter().any(|t| t.eq_ignore_ascii_case(first))
        }));
        if let Some(listen) = &overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(url) = &overrides.store_url {
            figment = figment.merge(Serialized::default("store.url", url));
        }
        let mut settings: Settings = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let mut detail = e.kind.to_string();
            if detail.contains("expected a string") {
                // The environment's values are read as typed: `123456` is a number.
                detail.push_str(" (from the environment, quote it: OTPD_X='\"123456\"')");
            }
            ConfigError::Invalid(if key.is_empty() {
                detail
            } else {
                format!("{key}: {detail}")
            })
        })?;
        // Array entries cannot be addressed by `OTPD_*` keys, so route secrets
        // have their own variables: OTPD_ROUTE_<id>_API_KEY and the like.
        apply_secret_env(&mut settings.routes, |name| std::env::var(name).ok());
        settings.validate()?;
        // `vars()` would panic on a variable that is not UTF-8; only the names matter.
        let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
        settings.warnings = settings.warnings(names);
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::Invalid;
        self.listen_addr()?;
        if !(1024..=10 * 1024 * 1024).contains(&self.server.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes: must be between 1024 and 10485760".into(),
            ));
        }
        if self.server.shutdown_grace_seconds > 3600 {
            return Err(invalid(
                "server.shutdown_grace_seconds: must be at most 3600".into(),
            ));
        }
        if self
            .metrics
            .token
            .as_ref()
            .is_some_and(|t| t.expose_secret().trim().is_empty())
        {
            return Err(invalid(
                "metrics.token: must not be empty (leave it out to serve /metrics without a token)"
                    .into(),
            ));
        }
        if self.server.request_timeout_seconds == 0 {
            return Err(invalid(
                "server.request_timeout_seconds: must be at least 1".into(),
            ));
        }
        crate::http::client_ip::TrustedProxies::parse(&self.server.trusted_proxies)
            .map_err(|e| invalid(format!("server.trusted_proxies: {e}")))?;
        let url = self.store_url();
        if ![
            "sqlite://",
            "memory://",
            "redis://",
            "rediss://",
            "redis+cluster://",
            "rediss+cluster://",
            "postgres://",
            "postgresql://",
        ]
        .iter()
        .any(|s| url.starts_with(s))
        {
            return Err(invalid(format!(
                "store.url: unsupported scheme in {:?}; use sqlite://PATH, memory://, redis://, rediss://, redis+cluster://, rediss+cluster://, postgres://",
                redact_url(&url)
            )));
        }
        if !(10..=60_000).contains(&self.store.operation_timeout_ms) {
            return Err(invalid(
                "store.operation_timeout_ms: must be between 10 and 60000".into(),
            ));
        }
        if self.store.purge_batch == 0 {
            return Err(invalid("store.purge_batch: must be at least 1".into()));
        }
        if self.store.purge_interval_seconds == 0 {
            return Err(invalid(
                "store.purge_interval_seconds: must be at least 1".into(),
            ));
        }
        self.validate_secrets()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format: must be \"text\" or \"json\"".into()));
        }
        validate_log_level(&self.log.level).map_err(invalid)?;
        self.policy.validate("policy").map_err(invalid)?;
        for name in self.tenants.keys() {
            self.tenant_policy(name)?;
        }
        validate_routes(&self.routes, &self.routing).map_err(invalid)?;
        validate_chain("policy.routes", &self.policy.routes, &self.routes).map_err(invalid)?;
        for name in self.tenants.keys() {
            if let Some(chain) = self.tenant_chain(name) {
                validate_chain(
                    &format!("tenants.{name}.policy.routes"),
                    &chain,
                    &self.routes,
                )
                .map_err(invalid)?;
            }
        }
        self.validate_delivery()?;
        self.validate_dialects()?;
        self.validate_spend_currency()
    }

    /// What is valid but likely not meant: `OTPD_*` variables no setting
    /// reads, and a BridgeX default route that is not configured (its sends
    /// without a `route_id` would all be refused).
    fn warnings(&self, env_names: impl Iterator<Item = String>) -> Vec<String> {
        let mut warnings: Vec<String> = unused_env_vars(env_names, &self.routes)
            .into_iter()
            .map(|name| {
                format!(
                    "{name}: no setting reads this variable (nested keys take `__`, e.g. OTPD_SERVER__LISTEN)"
                )
            })
            .collect();
        for (key, secret) in self.given_secrets() {
            if secret.expose_secret().trim().chars().count() < MIN_SECRET_CHARS {
                warnings.push(format!(
                    "{key}: shorter than {MIN_SECRET_CHARS} characters; a long random string \
                     resists guessing"
                ));
            }
        }
        let default_route = self.dialects.bridgex.default_route_id;
        if !self.routes.is_empty() && !self.routes.iter().any(|r| r.id == default_route) {
            warnings.push(format!(
                "dialects.bridgex.default_route_id: route {default_route} is not configured in \
                 [[routes]], so /send-otp without a route_id is refused"
            ));
        }
        warnings
    }

    /// The configured secrets every key derives from, by key name.
    fn given_secrets(&self) -> Vec<(String, &SecretString)> {
        let secrets = &self.secrets;
        let mut given: Vec<(String, &SecretString)> = Vec::new();
        if let Some(k) = &secrets.master_key {
            given.push(("secrets.master_key".to_owned(), k));
        }
        if let Some(k) = &secrets.code_key {
            given.push(("secrets.code_key".to_owned(), k));
        }
        for (id, key) in &secrets.phone_keys {
            given.push((format!("secrets.phone_keys.{id}"), key));
        }
        given
    }

    /// An empty secret (an unset `${VAR}` in a compose file) would derive
    /// every key from '' and let anyone compute them. (A short one is a
    /// warning: refusing it would force a key change, which strands stored
    /// numbers and pending codes.)
    fn validate_secrets(&self) -> Result<(), ConfigError> {
        let secrets = &self.secrets;
        for id in secrets.phone_keys.keys() {
            if id.parse::<u32>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "secrets.phone_keys.{id}: key ids must be numbers"
                )));
            }
        }
        for (key, secret) in self.given_secrets() {
            if secret.expose_secret().trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{key}: must not be empty (leave it out to use the generated key file)"
                )));
            }
        }
        // Key 1 is always there (derived from the master key when not given).
        if let Some(current) = secrets.current_phone_key
            && current != 1
            && !secrets.phone_keys.contains_key(&current.to_string())
        {
            return Err(ConfigError::Invalid(format!(
                "secrets.current_phone_key: no key with id {current} in secrets.phone_keys"
            )));
        }
        Ok(())
    }

    /// A daily spend budget adds message costs up, so the routes it counts
    /// must be priced in one currency (`SmsRouter::budget_cost`).
    fn validate_spend_currency(&self) -> Result<(), ConfigError> {
        let currencies: BTreeSet<String> = self
            .routes
            .iter()
            .filter_map(|r| r.currency.as_deref().map(str::to_ascii_uppercase))
            .collect();
        if currencies.len() < 2 {
            return Ok(());
        }
        let mut budgets = vec![("policy".to_owned(), self.policy.clone())];
        for name in self.tenants.keys() {
            budgets.push((format!("tenants.{name}.policy"), self.tenant_policy(name)?));
        }
        budgets.push(("dialects.bridgex.policy".into(), self.bridgex_policy(None)?));
        budgets.push((
            "dialects.openlyne.policy".into(),
            self.openlyne_policy(None)?,
        ));
        match budgets.iter().find(|(_, p)| p.daily_spend_limit > 0.0) {
            Some((key, _)) => Err(ConfigError::Invalid(format!(
                "{key}.daily_spend_limit: the routes are priced in {}; a spend budget \
                 needs them in one currency",
                currencies.into_iter().collect::<Vec<_>>().join(" and ")
            ))),
            None => Ok(()),
        }
    }

    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::Invalid;
        let dlr = &self.dlr;
        if let Some(secret) = &dlr.secret {
            let secret = secret.expose_secret();
            if secret.len() < 16
                || !secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
            {
                return Err(invalid(
                    "dlr.secret: must be at least 16 characters of A-Z, a-z, 0-9, '-', '_', '.', '~'"
                        .into(),
                ));
            }
        }
        if let Some(base) = &dlr.public_base_url {
            match url::Url::parse(base) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.query().is_none() => {}
                _ => {
                    return Err(invalid(format!(
                        "dlr.public_base_url: {:?} is not an http(s) URL without a query",
                        redact_url(base)
                    )));
                }
            }
        }
        if !(1..=3_600).contains(&dlr.poll_interval_seconds) {
            return Err(invalid(
                "dlr.poll_interval_seconds: must be between 1 and 3600".into(),
            ));
        }
        if !(60..=7 * 86_400).contains(&dlr.poll_max_age_seconds) {
            return Err(invalid(
                "dlr.poll_max_age_seconds: must be between 60 and 604800".into(),
            ));
        }
        if !(1..=10_000).contains(&dlr.poll_batch) {
            return Err(invalid(
                "dlr.poll_batch: must be between 1 and 10000".into(),
            ));
        }
        if !(1..=MAX_MESSAGE_DAYS).contains(&self.retention.message_days) {
            return Err(invalid(format!(
                "retention.message_days: must be between 1 and {MAX_MESSAGE_DAYS}"
            )));
        }
        Ok(())
    }

    fn validate_dialects(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::Invalid;
        let bx = &self.dialects.bridgex;
        if !BRIDGEX_ROUTE_IDS.contains(&bx.default_route_id) {
            return Err(invalid(
                "dialects.bridgex.default_route_id: must be between 1 and 8".into(),
            ));
        }
        if !(3..=11).contains(&bx.default_caller_id.trim().chars().count()) {
            return Err(invalid(
                "dialects.bridgex.default_caller_id: must be 3 to 11 characters".into(),
            ));
        }
        match url::Url::parse(&bx.bridgexapi_base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(invalid(format!(
                    "dialects.bridgex.bridgexapi_base_url: {:?} is not an http(s) URL",
                    redact_url(&bx.bridgexapi_base_url)
                )));
            }
        }
        for tenant in std::iter::once(None).chain(self.tenants.keys().map(|t| Some(t.as_str()))) {
            self.bridgex_policy(tenant)?;
            self.openlyne_policy(tenant)?;
        }
        for (key, overrides, policy) in [
            (
                "dialects.bridgex.policy.routes",
                &bx.policy,
                self.bridgex_policy(None)?,
            ),
            (
                "dialects.openlyne.policy.routes",
                &self.dialects.openlyne.policy,
                self.openlyne_policy(None)?,
            ),
        ] {
            if overrides.contains_key("routes") {
                validate_chain(key, &policy.routes, &self.routes).map_err(invalid)?;
            }
        }
        Ok(())
    }

    /// The BridgeX-style API's policy for `tenant` (`None`: one with no
    /// overrides of its own): the original's defaults (6 digits, 300 s, 45 s
    /// cooldown, 5 attempts) over the tenant's policy, then
    /// `dialects.bridgex.policy`.
    pub fn bridgex_policy(&self, tenant: Option<&str>) -> Result<Policy, ConfigError> {
        self.dialect_policy(
            tenant,
            (6, 300, 45, 5),
            &self.dialects.bridgex.policy,
            "dialects.bridgex.policy",
        )
    }

    /// The Openlyne-style API's policy for `tenant`: the original's defaults (6
    /// digits, 180 s, 30 s cooldown, 5 attempts) over the tenant's policy, then
    /// `dialects.openlyne.policy`.
    pub fn openlyne_policy(&self, tenant: Option<&str>) -> Result<Policy, ConfigError> {
        self.dialect_policy(
            tenant,
            (6, 180, 30, 5),
            &self.dialects.openlyne.policy,
            "dialects.openlyne.policy",
        )
    }

    /// A dialect keeps its original's shape (code length, TTL, cooldown,
    /// attempts), while a tenant's limits (countries, routes, budgets, rate
    /// limits) hold whichever API its key calls.
    fn dialect_policy(
        &self,
        tenant: Option<&str>,
        (code_length, ttl_seconds, cooldown_seconds, max_attempts): (u8, u32, u32, u32),
        overrides: &serde_json::Map<String, serde_json::Value>,
        prefix: &str,
    ) -> Result<Policy, ConfigError> {
        let own = match tenant {
            Some(name) => self.tenant_policy(name)?,
            None => self.policy.clone(),
        };
        let base = Policy {
            code_length,
            ttl_seconds,
            cooldown_seconds,
            max_attempts,
            // Dialect requests never ask for their own TTL, so the cap is moot;
            // keeping it at the maximum lets `ttl_seconds` be overridden alone.
            max_ttl_seconds: crate::domain::policy::MAX_TTL_SECONDS,
            ..own
        };
        let mut policy = merge_policy(&base, overrides, prefix)?;
        // As on `/v1`, `routes` reaches the router as the caller's own chain,
        // so it holds only what the dialect or the tenant set: otherwise the
        // per-country chains and the default chain (`[policy].routes`) apply.
        if !overrides.contains_key("routes") {
            policy.routes = tenant
                .and_then(|t| self.tenant_chain(t))
                .unwrap_or_default();
        }
        Ok(policy)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "server.listen: {:?} is not an address like 127.0.0.1:8080",
                self.server.listen
            ))
        })
    }

    pub fn store_url(&self) -> String {
        self.store
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("otpd.db").display()))
    }

    /// The failover chain a tenant set for itself (`tenants.X.policy.routes`),
    /// which wins over per-country chains and limits what it may pin.
    pub fn tenant_chain(&self, tenant: &str) -> Option<Vec<u32>> {
        let value = self.tenants.get(tenant)?.policy.get("routes")?;
        serde_json::from_value(value.clone()).ok()
    }

    /// The default policy with the tenant's overrides applied and validated.
    pub fn tenant_policy(&self, tenant: &str) -> Result<Policy, ConfigError> {
        let Some(t) = self.tenants.get(tenant) else {
            return Ok(self.policy.clone());
        };
        merge_policy(&self.policy, &t.policy, &format!("tenants.{tenant}.policy"))
    }
}

/// Overlays `overrides` on `base`; errors name `{prefix}.{field}`.
pub fn merge_policy(
    base: &Policy,
    overrides: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
) -> Result<Policy, ConfigError> {
    let mut merged = match serde_json::to_value(base) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(ConfigError::Invalid(format!("{prefix}: cannot merge"))),
    };
    for (k, v) in overrides {
        match (merged.get_mut(k), v) {
            (None, _) => return Err(ConfigError::Invalid(format!("{prefix}.{k}: unknown key"))),
            // A nested table (`guard`) overrides key by key, like the policy itself.
            (Some(serde_json::Value::Object(base)), serde_json::Value::Object(over)) => {
                for (kk, vv) in over {
                    if !base.contains_key(kk) {
                        return Err(ConfigError::Invalid(format!(
                            "{prefix}.{k}.{kk}: unknown key"
                        )));
                    }
                    base.insert(kk.clone(), vv.clone());
                }
            }
            (Some(slot), v) => *slot = v.clone(),
        }
    }
    let policy: Policy = serde_json::from_value(serde_json::Value::Object(merged))
        .map_err(|e| ConfigError::Invalid(format!("{prefix}: {e}")))?;
    policy.validate(prefix).map_err(ConfigError::Invalid)?;
    Ok(policy)
}

/// Serialized in place of every secret by `to_redacted_toml`.
pub const REDACTED: &str = "***";

impl Settings {
    /// The effective configuration as TOML, every secret shown as `"***"`
    /// (`otpd --print-config`). `store.url` is shown resolved, password hidden.
    ///
    /// Secret fields are `SecretString`, which does not implement `Serialize`, so a
    /// new secret setting cannot reach this output unless it is given a
    /// `serialize_with = "redact_secret_option"` (or similar) attribute.
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        let mut effective = self.clone();
        effective.store.url = Some(self.store_url());
        toml::to_string(&effective)
            .map_err(|e| ConfigError::Invalid(format!("cannot print the configuration: {e}")))
    }
}

pub(crate) fn redact_secret_option<S: Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_some(REDACTED),
        None => serializer.serialize_none(),
    }
}

fn redact_secret_map<S: Serializer>(
    secrets: &BTreeMap<String, SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(secrets.keys().map(|k| (k, REDACTED)))
}

fn redact_url_option<S: Serializer>(
    url: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => serializer.serialize_some(&redact_url(u)),
        None => serializer.serialize_none(),
    }
}

/// Hides credentials in a URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail fixes the closure error type
mod tests {
    use super::*;

    /// Loads `toml` inside a figment Jail: Jail-using tests that set `OTPD_*`
    /// variables run one at a time, so none of theirs leaks into this load.
    fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("otpd.toml", toml)?;
            loaded = Some(Settings::load(
                Some(Path::new("otpd.toml")),
                &Overrides::default(),
            ));
            Ok(())
        });
        loaded.unwrap()
    }

    #[test]
    fn defaults_are_valid_and_zero_config() {
        let s = Settings::default();
        s.validate().unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert!(s.store_url().starts_with("sqlite://"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = load_toml("[policy]\ncode_length = 12\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy.code_length") && err.contains("4 and 10"),
            "{err}"
        );
        let err = load_toml("[tenants.acme.policy]\nttl_seconds = 999999\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants.acme.policy.ttl_seconds"), "{err}");
        let err = load_toml("[server]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
        let err = load_toml("[server]\nlistn = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
        let err = load_toml("[policy]\nmax_attempts = \"five\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.max_attempts"), "{err}");
    }

    #[test]
    fn tenant_overrides_merge_onto_the_default_policy() {
        let s = load_toml("[policy]\nttl_seconds = 120\n[tenants.acme.policy]\nmax_attempts = 3\n")
            .unwrap();
        let p = s.tenant_policy("acme").unwrap();
        assert_eq!((p.ttl_seconds, p.max_attempts), (120, 3));
        assert_eq!(s.tenant_policy("other").unwrap().max_attempts, 5);
    }

    #[test]
    fn tenant_guard_overrides_merge_key_by_key() {
        // In a Jail: other tests here set OTPD_* variables that Settings::load reads.
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "otpd.toml",
                "[policy.guard]\nquarantine_seconds = 600\n[tenants.acme.policy.guard]\nmin_conversion = 0.5\n",
            )?;
            let s = Settings::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let g = s.tenant_policy("acme").map_err(|e| e.to_string())?.guard;
            assert_eq!((g.min_conversion, g.quarantine_seconds), (0.5, 600));
            jail.create_file(
                "otpd.toml",
                "[tenants.acme.policy.guard]\nmin_convresion = 0.5\n",
            )?;
            let err = Settings::load(None, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tenants.acme.policy.guard.min_convresion"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn printed_config_hides_every_secret_and_loads_back() {
        let s = load_toml(
            r#"
[store]
url = "postgres://otpd:pg-password-1@127.0.0.1/otpd"
[secrets]
master_key = "master-secret-1-long"
code_key = "code-secret-1-long"
phone_keys = { 1 = "phone-secret-1-long", 2 = "phone-secret-2-long" }
[metrics]
token = "metrics-secret-1"
tenant_label = false
[tenants.acme.policy]
max_attempts = 3

[[routes]]
id = 1
provider = "bridgexapi"
api_key = "bx-secret-1"
provider_route_id = 3
caller_id = "OTPD"
price = { NL = 0.07, "*" = 0.1 }
currency = "EUR"

[[routes]]
id = 2
provider = "twilio"
account_sid = "AC0123456789abcdef0123456789abcdef"
auth_token = "twilio-secret-1"
from = "+15005550006"
status_callback = "https://otpd.example/v1/dlr/twilio/callback-secret-1"

[[routes]]
id = 3
provider = "africastalking"
username = "sandbox"
api_key = "at-secret-1"

[[routes]]
id = 4
provider = "webhook"
url = "https://gateway.example/sms"
secret = "webhook-secret-1"
"#,
        )
        .unwrap();
        let printed = s.to_redacted_toml().unwrap();
        for secret in [
            "bx-secret-1",
            "twilio-secret-1",
            "callback-secret-1",
            "at-secret-1",
            "webhook-secret-1",
            "pg-password-1",
            "master-secret-1-long",
            "code-secret-1-long",
            "phone-secret-1-long",
            "phone-secret-2-long",
            "metrics-secret-1",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked:\n{printed}");
        }
        let back: toml::Value = toml::from_str(&printed).unwrap();
        assert_eq!(back["secrets"]["master_key"].as_str(), Some(REDACTED));
        assert_eq!(back["secrets"]["phone_keys"]["2"].as_str(), Some(REDACTED));
        assert_eq!(back["metrics"]["token"].as_str(), Some(REDACTED));
        assert_eq!(
            back["store"]["url"].as_str(),
            Some("postgres://otpd:***@127.0.0.1/otpd")
        );
        assert_eq!(back["metrics"]["tenant_label"].as_bool(), Some(false));
        assert_eq!(
            back["server"]["shutdown_grace_seconds"].as_integer(),
            Some(20)
        );
        assert_eq!(
            back["tenants"]["acme"]["policy"]["max_attempts"].as_integer(),
            Some(3)
        );
        let routes = back["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0]["provider"].as_str(), Some("bridgexapi"));
        assert_eq!(routes[0]["api_key"].as_str(), Some(REDACTED));
        assert_eq!(routes[0]["price"]["NL"].as_float(), Some(0.07));
        assert_eq!(routes[1]["auth_token"].as_str(), Some(REDACTED));
        assert_eq!(routes[1]["status_callback"].as_str(), Some(REDACTED));
        assert_eq!(
            routes[3]["url"].as_str(),
            Some("https://gateway.example/sms")
        );
        // What was printed reads back with the same keys (deny_unknown_fields
        // catches a serialized name that differs from the one read). Not
        // validated: "***" is not a valid callback URL.
        let reloaded: Settings = toml::from_str(&printed).unwrap();
        assert_eq!(reloaded.tenant_policy("acme").unwrap().max_attempts, 3);
        assert_eq!(reloaded.routes.len(), 4);
    }

    #[test]
    fn printed_config_shows_the_resolved_default_store() {
        let printed = Settings::default().to_redacted_toml().unwrap();
        let back: toml::Value = toml::from_str(&printed).unwrap();
        assert_eq!(
            back["store"]["url"].as_str(),
            Some("sqlite://./data/otpd.db")
        );
        assert!(back["secrets"].get("master_key").is_none(), "{printed}");
        assert_eq!(back["metrics"]["enabled"].as_bool(), Some(true));
    }

    #[test]
    fn an_empty_metrics_token_is_refused() {
        let err = load_toml("[metrics]\ntoken = \" \"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.token"), "{err}");
    }

    #[test]
    fn dialect_policies_have_the_seed_defaults_and_take_overrides() {
        let s = Settings::default();
        let bx = s.bridgex_policy(None).unwrap();
        assert_eq!(
            (
                bx.code_length,
                bx.ttl_seconds,
                bx.cooldown_seconds,
                bx.max_attempts
            ),
            (6, 300, 45, 5)
        );
        let ol = s.openlyne_policy(None).unwrap();
        assert_eq!(
            (
                ol.code_length,
                ol.ttl_seconds,
                ol.cooldown_seconds,
                ol.max_attempts
            ),
            (6, 180, 30, 5)
        );

        let s = load_toml(
            "[policy]\nmax_sends_per_window = 9\n[dialects.bridgex.policy]\ncooldown_seconds = 60\n[dialects.openlyne.policy]\nttl_seconds = 7200\n",
        )
        .unwrap();
        let bx = s.bridgex_policy(None).unwrap();
        assert_eq!((bx.cooldown_seconds, bx.ttl_seconds), (60, 300));
        assert_eq!(bx.max_sends_per_window, 9, "the rest comes from [policy]");
        assert_eq!(s.openlyne_policy(None).unwrap().ttl_seconds, 7200);
    }

    #[test]
    fn dialect_errors_name_the_key() {
        for (toml, key) in [
            (
                "[dialects.bridgex.policy]\ncode_length = 2\n",
                "dialects.bridgex.policy.code_length",
            ),
            (
                "[dialects.openlyne.policy]\ncooldown = 2\n",
                "dialects.openlyne.policy.cooldown",
            ),
            (
                "[dialects.bridgex]\ndefault_route_id = 9\n",
                "dialects.bridgex.default_route_id",
            ),
            (
                "[dialects.bridgex]\ndefault_caller_id = \"X\"\n",
                "dialects.bridgex.default_caller_id",
            ),
            (
                "[dialects.bridgex]\nbridgexapi_base_url = \"ftp://x\"\n",
                "dialects.bridgex.bridgexapi_base_url",
            ),
            ("[dialects.other]\nx = 1\n", "other"),
        ] {
            let err = load_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn environment_overrides_nested_keys_and_ignores_foreign_ones() {
        // figment::Jail isolates the environment and working directory for this test.
        figment::Jail::expect_with(|jail| {
            jail.set_env("OTPD_STORE__URL", "memory://");
            jail.set_env("OTPD_POLICY__TTL_SECONDS", "120");
            jail.set_env("OTPD_TEST_REDIS_URL", "redis://ignored");
            let s = Settings::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(s.store_url(), "memory://");
            assert_eq!(s.policy.ttl_seconds, 120);
            Ok(())
        });
    }

    #[test]
    fn every_key_the_secrets_derive_from_is_set_and_exists() {
        for (toml, key) in [
            ("[secrets]\nmaster_key = \"\"\n", "secrets.master_key"),
            ("[secrets]\nmaster_key = \"   \"\n", "secrets.master_key"),
            ("[secrets]\ncode_key = \"\"\n", "secrets.code_key"),
            ("[secrets.phone_keys]\n2 = \"\"\n", "secrets.phone_keys.2"),
            (
                "[secrets]\ncurrent_phone_key = 5\n[secrets.phone_keys]\n2 = \"a long enough phone key\"\n",
                "secrets.current_phone_key",
            ),
        ] {
            let err = load_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let fine = "[secrets]\nmaster_key = \"sixteen chars ok\"\ncurrent_phone_key = 1\n";
        assert!(load_toml(fine).unwrap().warnings.is_empty());
        let short = load_toml("[secrets]\ncode_key = \"fifteen chars!!\"\n").unwrap();
        assert!(
            short.warnings[0].starts_with("secrets.code_key: shorter than 16"),
            "{:?}",
            short.warnings
        );
    }

    #[test]
    fn a_log_level_that_is_no_level_is_refused() {
        for level in ["warning", "verbose", "", "otpd=loud"] {
            let err = load_toml(&format!("[log]\nlevel = {level:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(": log.level:"), "{level}: {err}");
        }
        for level in ["debug", "WARN", "otpd=debug,info", "off"] {
            load_toml(&format!("[log]\nlevel = {level:?}\n")).unwrap();
        }
    }

    #[test]
    fn a_dialects_route_chain_names_configured_routes() {
        let routes = "[[routes]]\nid = 1\nprovider = \"console\"\n";
        let err = load_toml(&format!(
            "{routes}[dialects.bridgex.policy]\nroutes = [9]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(": dialects.bridgex.policy.routes: route 9"),
            "{err}"
        );
        load_toml(&format!(
            "{routes}[dialects.openlyne.policy]\nroutes = [1]\n"
        ))
        .unwrap();
    }

    #[test]
    fn a_number_for_a_text_setting_says_how_to_quote_it() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OTPD_METRICS__TOKEN", "1234567890123456");
            let err = Settings::load(None, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("metrics.token") && err.contains("quote it"),
                "{err}"
            );
            jail.set_env("OTPD_METRICS__TOKEN", "\"0034567890123456\"");
            let s = Settings::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let token = s
                .metrics
                .token
                .as_ref()
                .map(|t| t.expose_secret().to_owned());
            assert_eq!(token.as_deref(), Some("0034567890123456"));
            Ok(())
        });
    }

    #[test]
    fn variables_and_defaults_that_configure_nothing_are_warned_about() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "otpd.toml",
                "[[routes]]\nid = 1\nprovider = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n",
            )?;
            for name in [
                "OTPD_SERVER_LISTEN",
                "OTPD_ROUTE_7_API_KEY",
                "OTPD_ROUTE_1_SECRETS",
            ] {
                jail.set_env(name, "x");
            }
            jail.set_env(
                "OTPD_ROUTE_1_SECRET",
                "a webhook secret from the environment",
            );
            jail.set_env("OTPD_SERVER__LISTEN", "127.0.0.1:8081");
            jail.set_env("OTPD_TEST_ANYTHING", "x");
            let s = Settings::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let warned: Vec<&str> = s
                .warnings
                .iter()
                .map(|w| w.split(':').next().unwrap_or_default())
                .collect();
            assert_eq!(
                warned,
                [
                    "OTPD_ROUTE_1_SECRETS",
                    "OTPD_ROUTE_7_API_KEY",
                    "OTPD_SERVER_LISTEN",
                    "dialects.bridgex.default_route_id"
                ]
            );
            Ok(())
        });
    }

    // Here rather than in tests/api: that binary also spawns otpd processes,
    // which would inherit the variables this test sets.
    #[test]
    fn route_secrets_come_from_their_own_variables_and_chains_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "otpd.toml",
                "[[routes]]\nid = 1\nprovider = \"bridgexapi\"\nprovider_route_id = 3\ncaller_id = \"OTPD\"\n\n[policy]\nroutes = [1]\n",
            )?;
            let load = || Settings::load(None, &Overrides::default());
            let err = load().unwrap_err().to_string();
            assert!(
                err.contains("routes[0].api_key: required (or set OTPD_ROUTE_1_API_KEY)"),
                "{err}"
            );
            jail.set_env("OTPD_ROUTE_1_API_KEY", "from-env");
            let settings = load().map_err(|e| e.to_string())?;
            assert_eq!(settings.routes.len(), 1);
            jail.set_env("OTPD_POLICY__ROUTES", "[1, 7]");
            let err = load().unwrap_err().to_string();
            assert!(
                err.contains("policy.routes: route 7 is not configured"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn delivery_settings_are_checked_and_errors_name_the_key() {
        for (toml, key) in [
            ("[dlr]\nsecret = \"short\"\n", "dlr.secret"),
            (
                "[dlr]\nsecret = \"has a space in it, sixteen+\"\n",
                "dlr.secret",
            ),
            (
                "[dlr]\npublic_base_url = \"otpd.example.com\"\n",
                "dlr.public_base_url",
            ),
            (
                "[dlr]\npublic_base_url = \"https://x.example/?a=1\"\n",
                "dlr.public_base_url",
            ),
            (
                "[dlr]\npoll_interval_seconds = 0\n",
                "dlr.poll_interval_seconds",
            ),
            (
                "[dlr]\npoll_max_age_seconds = 5\n",
                "dlr.poll_max_age_seconds",
            ),
            ("[dlr]\npoll_batch = 0\n", "dlr.poll_batch"),
            ("[retention]\nmessage_days = 0\n", "retention.message_days"),
            (
                "[retention]\nmessage_days = 400\n",
                "retention.message_days",
            ),
            (
                "[policy]\nresend_on_failed_delivery = \"yes\"\n",
                "resend_on_failed_delivery",
            ),
        ] {
            let err = load_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let s = load_toml(
            "[dlr]\nsecret = \"0123456789abcdef-_.~\"\npublic_base_url = \"https://otpd.example.com/\"\n[tenants.acme.policy]\nresend_on_failed_delivery = false\n",
        )
        .unwrap();
        assert_eq!(
            s.dlr.callback_url("twilio").as_deref(),
            Some("https://otpd.example.com/v1/dlr/twilio/0123456789abcdef-_.~")
        );
        assert!(s.policy.resend_on_failed_delivery);
        assert!(!s.tenant_policy("acme").unwrap().resend_on_failed_delivery);
        assert_eq!(Settings::default().dlr.callback_url("twilio"), None);
    }

    #[test]
    fn a_spend_budget_needs_the_routes_priced_in_one_currency() {
        let routes = "[[routes]]\nid = 1\nprovider = \"bridgexapi\"\napi_key = \"k\"\nprovider_route_id = 3\ncaller_id = \"OTPD\"\nprice = { \"*\" = 0.05 }\ncurrency = \"eur\"\n\n[[routes]]\nid = 2\nprovider = \"bridgexapi\"\napi_key = \"k\"\nprovider_route_id = 3\ncaller_id = \"OTPD\"\ncurrency = \"USD\"\n";
        load_toml(routes).expect("two currencies and no budget");
        let err = load_toml(&format!(
            "{routes}\n[tenants.acme.policy]\ndaily_spend_limit = 10.0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tenants.acme.policy.daily_spend_limit") && err.contains("EUR and USD"),
            "{err}"
        );
        let one = routes.replace("\"USD\"", "\"EUR\"");
        load_toml(&format!("{one}\n[policy]\ndaily_spend_limit = 10.0\n"))
            .expect("one currency, written in either case");
    }

    #[test]
    fn no_file_and_no_environment_is_a_valid_start() {
        figment::Jail::expect_with(|_| {
            Settings::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load(
            Some(Path::new("/nonexistent/otpd.toml")),
            &Overrides::default(),
        );
        assert!(err.unwrap_err().to_string().contains("does not exist"));
    }
}
