//! Prometheus metrics: one named function per thing otpd counts, so call sites
//! stay one line, and the text rendering behind `GET /metrics`.
//!
//! Each `Application` owns its own `PrometheusRecorder`; nothing goes through
//! the process-global `metrics::counter!` macros. Integration tests run many apps
//! in one process and assert exact counter values, which a global recorder would
//! mix up; and the global macros' `with_local_recorder` escape hatch does not
//! survive an `.await`. The handles come from `Recorder::register_*` on this
//! app's recorder, which returns the existing series when the labels repeat.
//!
//! Labels never carry a phone number, a code or a key: every label value is a
//! `&'static str` chosen by otpd, a route id, a provider name, an HTTP route
//! *template*, or the tenant name (which can be turned off: `metrics.tenant_label`).

mod store;

use std::time::Duration;

use axum::http::Method;
use hashbrown::{Equivalent, HashMap};
use metrics::{Counter, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use parking_lot::RwLock;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::MetricsSettings;
use crate::domain::DeliveryStatus;
use crate::sms::DeliveryAttempt;

pub use store::InstrumentedStore;

const HTTP_REQUESTS: &str = "otpd_http_requests_total";
const HTTP_DURATION: &str = "otpd_http_request_duration_seconds";
const SENDS: &str = "otpd_sends_total";
const PROVIDER_REQUESTS: &str = "otpd_provider_requests_total";
const PROVIDER_DURATION: &str = "otpd_provider_request_duration_seconds";
const FAILOVERS: &str = "otpd_failovers_total";
const CHECKS: &str = "otpd_checks_total";
const CIRCUIT_STATE: &str = "otpd_route_circuit_state";
const DELIVERY_REPORTS: &str = "otpd_delivery_reports_total";
const BLOCKS: &str = "otpd_blocks_total";
const PENDING: &str = "otpd_pending_verifications";
const STORE_DURATION: &str = "otpd_store_operation_duration_seconds";
const STORE_ERRORS: &str = "otpd_store_errors_total";
const BUILD_INFO: &str = "otpd_build_info";

/// Latency buckets (seconds) shared by every histogram: from a fast store call
/// to a provider timeout.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the label-less registration metadata says; the exporter ignores it.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Label for requests that matched no route: the raw path could be anything.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Outcome label of `otpd_sends_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendResult {
    /// A provider accepted the message.
    Sent,
    /// Every route of the chain failed.
    Failed,
}

impl SendResult {
    fn as_str(self) -> &'static str {
        match self {
            SendResult::Sent => "sent",
            SendResult::Failed => "failed",
        }
    }
}

/// Outcome label of `otpd_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResultLabel {
    Approved,
    Wrong,
    /// Never existed, expired, already approved or canceled.
    NotFound,
    /// The verification's attempts were already spent.
    MaxAttempts,
}

impl CheckResultLabel {
    fn as_str(self) -> &'static str {
        match self {
            CheckResultLabel::Approved => "approved",
            CheckResultLabel::Wrong => "wrong",
            CheckResultLabel::NotFound => "not_found",
            CheckResultLabel::MaxAttempts => "max_attempts",
        }
    }
}

/// A route's breaker state as a number, for `otpd_route_circuit_state`.
pub fn circuit_state_value(state: &str) -> f64 {
    match state {
        "open" => 2.0,
        "half_open" | "half-open" => 1.0,
        _ => 0.0,
    }
}

pub struct Metrics {
    /// `None` when `metrics.enabled` is off: every record call returns at once.
    inner: Option<Inner>,
    tenant_label: bool,
    /// `metrics.token`: what a scraper must present as a bearer token.
    scrape_token: Option<SecretString>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    // Handles of the series every request records into, resolved once per
    // label set: building a `Key` (label strings, its hash, the registry's
    // lock) cost more than recording into it, several times per request.
    /// Histograms with one fixed label, by (metric, label value).
    histograms: RwLock<HashMap<(&'static str, &'static str), Histogram>>,
    requests: RwLock<HashMap<RequestKey, (Histogram, Counter)>>,
    /// The per-send and per-check counters (`Series`).
    counters: RwLock<HashMap<SeriesKey, Counter>>,
}

/// A counter's identity without building its `Key`: the metric, the tenant
/// label's value ("" when the metric has none or the label is off), a route id
/// and up to two fixed label values. `SeriesKey` is the same owning the
/// tenant; both hash their fields in the same order.
#[derive(Hash)]
struct Series<'a> {
    name: &'static str,
    tenant: &'a str,
    route_id: Option<u32>,
    values: [&'static str; 2],
}

#[derive(Hash, PartialEq, Eq)]
struct SeriesKey {
    name: &'static str,
    tenant: Box<str>,
    route_id: Option<u32>,
    values: [&'static str; 2],
}

impl Equivalent<SeriesKey> for Series<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.name == key.name
            && self.route_id == key.route_id
            && self.values == key.values
            && self.tenant == &*key.tenant
    }
}

/// An HTTP series' labels. `RequestLabels` is the same without owning the
/// route, for lookups; both hash their fields in the same order.
#[derive(Hash, PartialEq, Eq)]
struct RequestKey {
    method: &'static str,
    route: Box<str>,
    status: u16,
}

#[derive(Hash)]
struct RequestLabels<'a> {
    method: &'static str,
    route: &'a str,
    status: u16,
}

impl Equivalent<RequestKey> for RequestLabels<'_> {
    fn equivalent(&self, key: &RequestKey) -> bool {
        self.method == key.method && self.status == key.status && self.route == &*key.route
    }
}

impl Metrics {
    pub fn new(settings: &MetricsSettings) -> anyhow::Result<Self> {
        if !settings.enabled {
            return Ok(Self::disabled());
        }
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map_err(|e| anyhow::anyhow!("metrics: {e}"))?
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            inner: Some(Inner {
                recorder,
                handle,
                histograms: RwLock::default(),
                requests: RwLock::default(),
                counters: RwLock::default(),
            }),
            tenant_label: settings.tenant_label,
            scrape_token: settings.token.clone(),
        };
        metrics.describe();
        metrics.gauge(
            BUILD_INFO,
            vec![Label::from_static_parts(
                "version",
                env!("CARGO_PKG_VERSION"),
            )],
            1.0,
        );
        Ok(metrics)
    }

    /// Records nothing and renders nothing.
    pub fn disabled() -> Self {
        Self {
            inner: None,
            tenant_label: false,
            scrape_token: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether a scrape presenting `bearer` may read the metrics.
    pub fn may_scrape(&self, bearer: Option<&str>) -> bool {
        match (&self.scrape_token, bearer) {
            (None, _) => true,
            // By digest: a byte compare would end early on a length mismatch.
            (Some(expected), Some(given)) => {
                crate::crypto::secret_eq(expected.expose_secret(), given)
            }
            (Some(_), None) => false,
        }
    }

    /// The Prometheus text exposition of every series; `None` when disabled.
    pub fn render(&self) -> Option<String> {
        self.inner.as_ref().map(|i| i.handle.render())
    }

    /// Drains histogram samples into their buckets. Without it, samples pile up
    /// in memory between scrapes (or forever when nobody scrapes).
    pub fn run_upkeep(&self) {
        if let Some(i) = &self.inner {
            i.handle.run_upkeep();
        }
    }

    /// Runs `run_upkeep` every few seconds until `stop` changes.
    pub fn spawn_upkeep(
        self: &std::sync::Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<JoinHandle<()>> {
        self.inner.as_ref()?;
        let metrics = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.run_upkeep(),
                    _ = stop.changed() => return,
                }
            }
        }))
    }

    /// One HTTP request. `route` is the matched route template (never the raw path).
    pub fn record_request(
        &self,
        method: &Method,
        route: Option<&str>,
        status: u16,
        elapsed: Duration,
    ) {
        let Some(i) = &self.inner else { return };
        let wanted = RequestLabels {
            method: method_label(method),
            route: route.unwrap_or(UNMATCHED_ROUTE),
            status,
        };
        let record = |(duration, count): &(Histogram, Counter)| {
            duration.record(elapsed.as_secs_f64());
            count.increment(1);
        };
        if let Some(handles) = i.requests.read().get(&wanted) {
            return record(handles);
        }
        let labels = vec![
            Label::from_static_parts("method", wanted.method),
            Label::new("route", wanted.route.to_owned()),
            Label::new("status", status.to_string()),
        ];
        let handles = (
            i.recorder
                .register_histogram(&Key::from_parts(HTTP_DURATION, labels.clone()), &METADATA),
            i.recorder
                .register_counter(&Key::from_parts(HTTP_REQUESTS, labels), &METADATA),
        );
        record(&handles);
        let key = RequestKey {
            method: wanted.method,
            route: wanted.route.into(),
            status,
        };
        i.requests.write().insert(key, handles);
    }

    /// One send that reached the providers: the route and provider that took it,
    /// or for a failed send the last one tried.
    pub fn record_send(
        &self,
        tenant: &str,
        route_id: u32,
        provider: &'static str,
        result: SendResult,
    ) {
        if self.inner.is_none() {
            return;
        }
        let series = Series {
            name: SENDS,
            tenant: self.tenant_value(tenant),
            route_id: Some(route_id),
            values: [provider, result.as_str()],
        };
        self.increment_series(series, || {
            let mut labels = self.tenant(tenant);
            labels.push(Label::new("route_id", route_id.to_string()));
            labels.push(Label::from_static_parts("provider", provider));
            labels.push(Label::from_static_parts("outcome", result.as_str()));
            labels
        });
    }

    /// Every provider call of one send: latency by provider, result by route, and
    /// a failover for each attempt that failed and passed the send on.
    pub fn record_delivery_attempts(&self, attempts: &[DeliveryAttempt]) {
        if self.inner.is_none() {
            return;
        }
        for (i, a) in attempts.iter().enumerate() {
            let result = match &a.result {
                Ok(_) => "ok",
                Err(e) => e.kind.as_str(),
            };
            self.record_provider_call(a.route_id, a.provider, result, a.latency);
            if a.result.is_err() && i + 1 < attempts.len() {
                self.record_failover(a.route_id, a.provider);
            }
        }
    }

    /// One provider call; `result` is `ok` or the error kind.
    pub fn record_provider_call(
        &self,
        route_id: u32,
        provider: &'static str,
        result: &'static str,
        latency: Duration,
    ) {
        if self.inner.is_none() {
            return;
        }
        self.observe_one(PROVIDER_DURATION, ("provider", provider), latency);
        let series = Series {
            name: PROVIDER_REQUESTS,
            tenant: "",
            route_id: Some(route_id),
            values: [provider, result],
        };
        self.increment_series(series, || {
            vec![
                Label::new("route_id", route_id.to_string()),
                Label::from_static_parts("provider", provider),
                Label::from_static_parts("result", result),
            ]
        });
    }

    /// A send moved on from this route to the next one.
    pub fn record_failover(&self, from_route_id: u32, from_provider: &'static str) {
        if self.inner.is_none() {
            return;
        }
        self.increment(
            FAILOVERS,
            vec![
                Label::new("route_id", from_route_id.to_string()),
                Label::from_static_parts("provider", from_provider),
            ],
        );
    }

    pub fn record_check(&self, tenant: &str, result: CheckResultLabel) {
        if self.inner.is_none() {
            return;
        }
        let series = Series {
            name: CHECKS,
            tenant: self.tenant_value(tenant),
            route_id: None,
            values: [result.as_str(), ""],
        };
        self.increment_series(series, || {
            let mut labels = self.tenant(tenant);
            labels.push(Label::from_static_parts("outcome", result.as_str()));
            labels
        });
    }

    /// A request refused by a rate limit or an abuse guard. `reason` is a fixed
    /// name such as `cooldown` or `subject_sends_per_window`.
    pub fn record_block(&self, reason: &'static str) {
        if self.inner.is_none() {
            return;
        }
        self.increment(BLOCKS, vec![Label::from_static_parts("reason", reason)]);
    }

    /// A delivery report (callback or poll) from a provider.
    pub fn record_delivery_report(&self, provider: &'static str, status: DeliveryStatus) {
        if self.inner.is_none() {
            return;
        }
        self.increment(
            DELIVERY_REPORTS,
            vec![
                Label::from_static_parts("provider", provider),
                Label::from_static_parts("status", status.as_str()),
            ],
        );
    }

    /// One store call; failures are counted apart as well.
    pub fn record_store_op(&self, operation: &'static str, ok: bool, elapsed: Duration) {
        if !ok {
            self.increment(
                STORE_ERRORS,
                vec![Label::from_static_parts("operation", operation)],
            );
        }
        self.observe_one(STORE_DURATION, ("operation", operation), elapsed);
    }

    pub fn set_pending(&self, pending: u64) {
        self.gauge(PENDING, Vec::new(), pending as f64);
    }

    /// 0 closed, 1 half-open, 2 open.
    pub fn set_circuit_state(&self, route_id: u32, provider: &'static str, state: &str) {
        self.gauge(
            CIRCUIT_STATE,
            vec![
                Label::new("route_id", route_id.to_string()),
                Label::from_static_parts("provider", provider),
            ],
            circuit_state_value(state),
        );
    }

    fn tenant(&self, tenant: &str) -> Vec<Label> {
        let mut labels = Vec::with_capacity(4);
        if self.tenant_label {
            labels.push(Label::new("tenant", tenant.to_owned()));
        }
        labels
    }

    /// The tenant label's value in a `Series`: "" when the label is off.
    fn tenant_value<'a>(&self, tenant: &'a str) -> &'a str {
        if self.tenant_label { tenant } else { "" }
    }

    /// Adds one to a counter whose handle is kept after its first use.
    fn increment_series(&self, series: Series<'_>, labels: impl FnOnce() -> Vec<Label>) {
        let Some(i) = &self.inner else { return };
        if let Some(counter) = i.counters.read().get(&series) {
            return counter.increment(1);
        }
        let counter = i
            .recorder
            .register_counter(&Key::from_parts(series.name, labels()), &METADATA);
        counter.increment(1);
        let key = SeriesKey {
            name: series.name,
            tenant: series.tenant.into(),
            route_id: series.route_id,
            values: series.values,
        };
        i.counters.write().insert(key, counter);
    }

    /// Records into a histogram with one fixed label, its handle kept likewise.
    fn observe_one(
        &self,
        name: &'static str,
        (label, value): (&'static str, &'static str),
        elapsed: Duration,
    ) {
        let Some(i) = &self.inner else { return };
        if let Some(histogram) = i.histograms.read().get(&(name, value)) {
            return histogram.record(elapsed.as_secs_f64());
        }
        let histogram = i.recorder.register_histogram(
            &Key::from_parts(name, vec![Label::from_static_parts(label, value)]),
            &METADATA,
        );
        histogram.record(elapsed.as_secs_f64());
        i.histograms.write().insert((name, value), histogram);
    }

    fn increment(&self, name: &'static str, labels: Vec<Label>) {
        if let Some(i) = &self.inner {
            i.recorder
                .register_counter(&Key::from_parts(name, labels), &METADATA)
                .increment(1);
        }
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>, value: f64) {
        if let Some(i) = &self.inner {
            i.recorder
                .register_gauge(&Key::from_parts(name, labels), &METADATA)
                .set(value);
        }
    }

    fn describe(&self) {
        let Some(i) = &self.inner else { return };
        let r = &i.recorder;
        let counter = |name: &'static str, help: &'static str| {
            r.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        };
        counter(
            HTTP_REQUESTS,
            "HTTP requests by method, route template and status.",
        );
        counter(
            SENDS,
            "Sends that reached the providers, by tenant, route, provider and outcome (sent, failed).",
        );
        counter(
            PROVIDER_REQUESTS,
            "Provider calls by route, provider and result (ok or the error kind).",
        );
        counter(
            FAILOVERS,
            "Sends that moved on from this route to the next one.",
        );
        counter(
            CHECKS,
            "Code checks by tenant and outcome (approved, wrong, not_found, max_attempts).",
        );
        counter(DELIVERY_REPORTS, "Delivery reports by provider and status.");
        counter(
            BLOCKS,
            "Requests refused by a rate limit or abuse guard, by reason.",
        );
        counter(STORE_ERRORS, "Store operations that failed, by operation.");
        let histogram = |name: &'static str, help: &'static str| {
            r.describe_histogram(
                KeyName::from_const_str(name),
                Some(Unit::Seconds),
                SharedString::const_str(help),
            );
        };
        histogram(
            HTTP_DURATION,
            "HTTP request latency by method, route template and status.",
        );
        histogram(PROVIDER_DURATION, "Provider call latency by provider.");
        histogram(STORE_DURATION, "Store operation latency by operation.");
        let gauge = |name: &'static str, help: &'static str| {
            r.describe_gauge(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        };
        gauge(
            CIRCUIT_STATE,
            "Circuit breaker state per route: 0 closed, 1 half-open, 2 open.",
        );
        gauge(
            PENDING,
            "Pending verifications (refreshed by the housekeeping task, not per scrape).",
        );
        gauge(
            BUILD_INFO,
            "Always 1; the version label says which otpd runs.",
        );
    }
}

/// Standard methods by name; anything else is one label so a client cannot
/// grow the series count with made-up methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sms::{ProviderError, ProviderErrorKind, SendReceipt};

    fn enabled(tenant_label: bool) -> Metrics {
        Metrics::new(&MetricsSettings {
            enabled: true,
            tenant_label,
            token: None,
        })
        .unwrap()
    }

    fn attempt(route_id: u32, provider: &'static str, ok: bool) -> DeliveryAttempt {
        DeliveryAttempt {
            route_id,
            provider,
            result: if ok {
                Ok(SendReceipt::default())
            } else {
                Err(ProviderError::new(ProviderErrorKind::Unavailable, "down"))
            },
            latency: Duration::from_millis(20),
        }
    }

    #[test]
    fn a_failed_attempt_followed_by_another_is_one_failover() {
        let m = enabled(true);
        m.record_delivery_attempts(&[attempt(1, "alpha", false), attempt(2, "beta", true)]);
        // A chain whose last attempt failed did not fail over from it.
        m.record_delivery_attempts(&[attempt(1, "alpha", false)]);
        let text = m.render().unwrap();
        assert!(
            text.contains("otpd_failovers_total{route_id=\"1\",provider=\"alpha\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("otpd_failovers_total{route_id=\"2\""),
            "{text}"
        );
        assert!(
            text.contains(
                "otpd_provider_requests_total{route_id=\"1\",provider=\"alpha\",result=\"unavailable\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("otpd_provider_request_duration_seconds_count{provider=\"alpha\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn the_tenant_label_can_be_turned_off() {
        let with = enabled(true);
        with.record_check("acme", CheckResultLabel::Approved);
        assert!(
            with.render()
                .unwrap()
                .contains("otpd_checks_total{tenant=\"acme\",outcome=\"approved\"} 1\n")
        );
        let without = enabled(false);
        without.record_check("acme", CheckResultLabel::Approved);
        let text = without.render().unwrap();
        assert!(
            text.contains("otpd_checks_total{outcome=\"approved\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("acme"), "{text}");
    }

    #[test]
    fn kept_handles_count_each_series_apart() {
        let m = enabled(true);
        for (tenant, result) in [
            ("acme", CheckResultLabel::Wrong),
            ("acme", CheckResultLabel::Wrong),
            ("acme", CheckResultLabel::Approved),
            ("bolt", CheckResultLabel::Wrong),
        ] {
            m.record_check(tenant, result);
        }
        m.record_send("acme", 1, "alpha", SendResult::Sent);
        m.record_send("acme", 2, "alpha", SendResult::Sent);
        m.record_send("acme", 1, "alpha", SendResult::Sent);
        let text = m.render().unwrap();
        for line in [
            "otpd_checks_total{tenant=\"acme\",outcome=\"wrong\"} 2\n",
            "otpd_checks_total{tenant=\"acme\",outcome=\"approved\"} 1\n",
            "otpd_checks_total{tenant=\"bolt\",outcome=\"wrong\"} 1\n",
            "otpd_sends_total{tenant=\"acme\",route_id=\"1\",provider=\"alpha\",outcome=\"sent\"} 2\n",
            "otpd_sends_total{tenant=\"acme\",route_id=\"2\",provider=\"alpha\",outcome=\"sent\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn disabled_metrics_render_nothing() {
        let m = Metrics::disabled();
        m.record_check("acme", CheckResultLabel::Wrong);
        m.set_pending(3);
        assert!(m.render().is_none());
    }

    #[test]
    fn made_up_methods_share_one_label() {
        let m = enabled(true);
        for name in ["BREW", "PROPFIND"] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            m.record_request(&method, None, 404, Duration::from_millis(1));
        }
        let text = m.render().unwrap();
        assert!(
            text.contains(
                "otpd_http_requests_total{method=\"other\",route=\"unmatched\",status=\"404\"} 2\n"
            ),
            "{text}"
        );
    }
}
