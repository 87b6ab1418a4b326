//! Operations: `/metrics` after a scripted run, health endpoints, request ids,
//! and what the logs of a full send/check/failover run contain.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use otpd::config::{LogSettings, Settings};
use otpd::sms::RouteSettings;
use reqwest::StatusCode;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, expect_error, parts, wrong};
use crate::prometheus_text::{self, Exposition, Kind};

const NL: &str = "+31651860670";
/// What must never be logged or labelled, whatever the format of the number.
const NL_DIGITS: &str = "651860670";

/// Route 1: a webhook gateway that answers 503 (down); route 2: the sandbox,
/// which takes everything. Every default send fails over from 1 to 2.
async fn failing_then_working(configure: impl FnOnce(&mut Settings)) -> (TestApp, MockServer) {
    routed(true, configure).await
}

/// Route 1 down, and with `fallback` route 2, the sandbox.
async fn routed(fallback: bool, configure: impl FnOnce(&mut Settings)) -> (TestApp, MockServer) {
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&gateway)
        .await;
    #[derive(Deserialize)]
    struct Routes {
        routes: Vec<RouteSettings>,
    }
    let parsed: Routes = toml::from_str(&format!(
        r#"
        [[routes]]
        id = 1
        provider = "webhook"
        url = "{}/sms"
        secret = "a-long-webhook-signing-secret"
        {}
        "#,
        gateway.uri(),
        if fallback {
            "[[routes]]\nid = 2\nprovider = \"sandbox\""
        } else {
            ""
        }
    ))
    .unwrap();
    let app = TestApp::spawn_with(|s| {
        s.policy.routes = parsed.routes.iter().map(|r| r.id).collect();
        s.routes = parsed.routes;
        configure(s);
    })
    .await;
    (app, gateway)
}

async fn scrape(app: &TestApp) -> (String, Exposition) {
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    let parsed = prometheus_text::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    (text, parsed)
}

fn code_of(body: &Value) -> String {
    body["debug_code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn metrics_count_exactly_what_a_scripted_run_did() {
    let (app, _gateway) = failing_then_working(|_| {}).await;
    let mut codes = Vec::new();

    // A send that fails over from route 1 to route 2, then a resend within the cooldown.
    let sent = app.send_to(NL).await;
    assert_eq!(sent["delivery"]["route_id"], 2);
    codes.push(code_of(&sent));
    expect_error(
        app.post("/v1/verifications", json!({ "to": NL })).await,
        StatusCode::TOO_MANY_REQUESTS,
        "cooldown",
    )
    .await;
    // Wrong, right, then nothing left to check.
    let id = sent["id"].as_str().unwrap();
    let check = |code: &str| json!({ "id": id, "code": code });
    let (_, body) = parts(
        app.post("/v1/verifications/check", check(&wrong(&codes[0])))
            .await,
    )
    .await;
    assert_eq!(body["valid"], false);
    let (_, body) = parts(app.post("/v1/verifications/check", check(&codes[0])).await).await;
    assert_eq!(body["valid"], true);
    expect_error(
        app.post("/v1/verifications/check", check(&codes[0])).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // Pinned to the failing route without failover: every route failed.
    expect_error(
        app.post(
            "/v1/verifications",
            json!({ "to": "+256700123456", "route_id": 1, "failover": false }),
        )
        .await,
        StatusCode::BAD_GATEWAY,
        "delivery_failed",
    )
    .await;
    // Another failover, then all five attempts spent and one check too many.
    let sent = app.send_to("+4915123456789").await;
    let code = code_of(&sent);
    codes.push(code.clone());
    let check = json!({ "id": sent["id"], "code": wrong(&code) });
    for _ in 0..5 {
        let r = app.post("/v1/verifications/check", check.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    expect_error(
        app.post("/v1/verifications/check", check).await,
        StatusCode::TOO_MANY_REQUESTS,
        "max_attempts",
    )
    .await;
    expect_error(
        app.get("/no/such/path").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let (text, m) = scrape(&app).await;
    let acme = ("tenant", "acme");

    assert_eq!(
        m.value(
            "otpd_sends_total",
            &[
                acme,
                ("route_id", "2"),
                ("provider", "sandbox"),
                ("outcome", "sent")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "otpd_sends_total",
            &[
                acme,
                ("route_id", "1"),
                ("provider", "webhook"),
                ("outcome", "failed")
            ]
        ),
        1.0
    );
    assert_eq!(m.series("otpd_sends_total").len(), 2, "{text}");
    assert_eq!(
        m.value(
            "otpd_provider_requests_total",
            &[
                ("route_id", "1"),
                ("provider", "webhook"),
                ("result", "unavailable")
            ]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "otpd_provider_requests_total",
            &[("route_id", "2"), ("provider", "sandbox"), ("result", "ok")]
        ),
        2.0
    );
    // The pinned send had nowhere to go: not a failover.
    assert_eq!(
        m.value(
            "otpd_failovers_total",
            &[("route_id", "1"), ("provider", "webhook")]
        ),
        2.0
    );
    assert_eq!(m.series("otpd_failovers_total").len(), 1);
    assert_eq!(
        m.value(
            "otpd_provider_request_duration_seconds_count",
            &[("provider", "webhook")]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "otpd_provider_request_duration_seconds_count",
            &[("provider", "sandbox")]
        ),
        2.0
    );
    for (outcome, n) in [
        ("wrong", 6.0),
        ("approved", 1.0),
        ("not_found", 1.0),
        ("max_attempts", 1.0),
    ] {
        assert_eq!(
            m.value("otpd_checks_total", &[acme, ("outcome", outcome)]),
            n,
            "{outcome}"
        );
    }
    assert_eq!(m.value("otpd_blocks_total", &[("reason", "cooldown")]), 1.0);
    assert_eq!(m.series("otpd_blocks_total").len(), 1);

    let http = |method: &str, route: &str, status: &str| {
        m.value(
            "otpd_http_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(http("POST", "/v1/verifications", "201"), 2.0);
    assert_eq!(http("POST", "/v1/verifications", "429"), 1.0);
    assert_eq!(http("POST", "/v1/verifications", "502"), 1.0);
    assert_eq!(http("POST", "/v1/verifications/check", "200"), 7.0);
    assert_eq!(http("POST", "/v1/verifications/check", "404"), 1.0);
    assert_eq!(http("POST", "/v1/verifications/check", "429"), 1.0);
    assert_eq!(http("GET", "unmatched", "404"), 1.0);
    assert_eq!(m.series("otpd_http_requests_total").len(), 7, "{text}");
    assert_eq!(
        m.value(
            "otpd_http_request_duration_seconds_count",
            &[
                ("method", "POST"),
                ("route", "/v1/verifications/check"),
                ("status", "200")
            ]
        ),
        7.0
    );

    // Every check by id is one call of the store's atomic check, which also
    // answers for the verification that is no longer live (the one after the
    // approval). Each of the four sends (the refused resend included) asks the
    // store to start one.
    assert_eq!(
        m.value(
            "otpd_store_operation_duration_seconds_count",
            &[("operation", "check_code")]
        ),
        9.0
    );
    assert_eq!(
        m.get(
            "otpd_store_operation_duration_seconds_count",
            &[("operation", "get_verification")]
        ),
        None,
        "a check by id needs no separate lookup"
    );
    assert_eq!(
        m.value(
            "otpd_store_operation_duration_seconds_count",
            &[("operation", "start_counted_send")]
        ),
        4.0
    );
    assert!(m.series("otpd_store_errors_total").is_empty());

    for (route_id, provider) in [("1", "webhook"), ("2", "sandbox")] {
        assert_eq!(
            m.value(
                "otpd_route_circuit_state",
                &[("route_id", route_id), ("provider", provider)]
            ),
            0.0
        );
    }
    assert!(m.get("otpd_pending_verifications", &[]).is_some(), "{text}");
    assert_eq!(
        m.value("otpd_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );

    // Each family is typed and documented.
    for (family, kind) in [
        ("otpd_http_requests_total", Kind::Counter),
        ("otpd_http_request_duration_seconds", Kind::Histogram),
        ("otpd_sends_total", Kind::Counter),
        ("otpd_provider_requests_total", Kind::Counter),
        ("otpd_provider_request_duration_seconds", Kind::Histogram),
        ("otpd_failovers_total", Kind::Counter),
        ("otpd_checks_total", Kind::Counter),
        ("otpd_blocks_total", Kind::Counter),
        ("otpd_store_operation_duration_seconds", Kind::Histogram),
        ("otpd_route_circuit_state", Kind::Gauge),
        ("otpd_pending_verifications", Kind::Gauge),
        ("otpd_build_info", Kind::Gauge),
    ] {
        assert_eq!(m.kinds.get(family), Some(&kind), "{family}");
        assert!(m.help.contains_key(family), "{family} has no HELP");
    }

    // Nothing secret or personal in any label.
    assert!(!text.contains(NL_DIGITS), "{text}");
    assert!(!text.contains("700123456") && !text.contains("15123456789"));
    assert!(!text.contains(&app.key));
    for code in &codes {
        assert!(!text.contains(code.as_str()), "code {code} in\n{text}");
    }
}

#[tokio::test]
async fn the_tenant_label_can_be_turned_off() {
    let (app, _gateway) = failing_then_working(|s| s.metrics.tenant_label = false).await;
    app.send_to(NL).await;
    let (text, m) = scrape(&app).await;
    assert_eq!(
        m.value(
            "otpd_sends_total",
            &[
                ("route_id", "2"),
                ("provider", "sandbox"),
                ("outcome", "sent")
            ]
        ),
        1.0
    );
    assert!(!text.contains("tenant="), "{text}");
}

async fn pinned_send_fails(app: &TestApp, to: &str) {
    expect_error(
        app.post(
            "/v1/verifications",
            json!({ "to": to, "route_id": 1, "failover": false }),
        )
        .await,
        StatusCode::BAD_GATEWAY,
        "delivery_failed",
    )
    .await;
}

#[tokio::test]
async fn an_open_circuit_shows_in_its_gauge() {
    let (app, _gateway) = failing_then_working(|s| s.routing.breaker.failure_threshold = 2).await;
    let state = |m: &Exposition, route_id, provider| {
        m.value(
            "otpd_route_circuit_state",
            &[("route_id", route_id), ("provider", provider)],
        )
    };
    pinned_send_fails(&app, NL).await;
    let (_, m) = scrape(&app).await;
    assert_eq!(state(&m, "1", "webhook"), 0.0, "one failure is not enough");
    pinned_send_fails(&app, "+256700123456").await;
    let (_, m) = scrape(&app).await;
    assert_eq!(state(&m, "1", "webhook"), 2.0);
    assert_eq!(state(&m, "2", "sandbox"), 0.0);
    // Route 2 can still send: ready.
    let (status, body) = parts(app.get("/health/ready").await).await;
    assert_eq!((status, &body["routes"]), (StatusCode::OK, &json!(true)));
}

#[tokio::test]
async fn not_ready_once_every_route_is_open() {
    let (app, _gateway) = routed(false, |s| s.routing.breaker.failure_threshold = 1).await;
    let (status, _) = parts(app.get("/health/ready").await).await;
    assert_eq!(status, StatusCode::OK);
    pinned_send_fails(&app, NL).await;
    let (status, body) = parts(app.get("/health/ready").await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({ "status": "not_ready", "store": true, "routes": false })
    );
    let r = app.get("/health/live").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_metrics_token_is_required_when_configured() {
    let app = TestApp::spawn_with(|s| {
        s.metrics.token = Some(SecretString::from("scrape-secret".to_owned()));
    })
    .await;
    let url = format!("{}/metrics", app.base);
    let get = |auth: Option<&'static str>| {
        let mut r = app.client.get(&url);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    expect_error(
        get(None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    expect_error(
        get(Some("Bearer scrape-secreT")).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    // An API key is not a metrics token.
    expect_error(
        app.get("/metrics").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    let ok = get(Some("Bearer scrape-secret")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    prometheus_text::parse(&ok.text().await.unwrap()).unwrap();
}

#[tokio::test]
async fn disabled_metrics_answer_404_and_the_api_still_works() {
    let app = TestApp::spawn_with(|s| s.metrics.enabled = false).await;
    app.send_to(NL).await;
    expect_error(
        app.get("/metrics").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn live_and_ready_answer_while_the_store_is_up() {
    let app = TestApp::spawn().await;
    let (status, body) = parts(app.get("/health/live").await).await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("ok")));
    let (status, body) = parts(app.get("/health/ready").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "status": "ready", "store": true, "routes": true })
    );
}

#[tokio::test]
async fn ready_fails_once_the_store_is_gone_while_live_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = otpd::store::SqliteStore::open(&dir.path().join("ready.db"))
        .await
        .unwrap();
    let app = TestApp::spawn_on(Arc::new(store), |_| {}).await;
    let (status, _) = parts(app.get("/health/ready").await).await;
    assert_eq!(status, StatusCode::OK);

    app.state.service.store().close().await;
    let r = app
        .client
        .get(format!("{}/health/ready", app.base))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(r).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({ "status": "not_ready", "store": false, "routes": true })
    );
    let r = app
        .client
        .get(format!("{}/health/live", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_request_id_is_echoed_or_generated() {
    let app = TestApp::spawn().await;
    let url = format!("{}/health/live", app.base);
    let r = app
        .client
        .get(&url)
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-42");

    let a = app.client.get(&url).send().await.unwrap();
    let b = app.client.get(&url).send().await.unwrap();
    let a = a.headers()["x-request-id"].to_str().unwrap().to_owned();
    let b = b.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(a, b);
    uuid::Uuid::parse_str(&a).unwrap();

    // Unusable ids (too long, spaces) are replaced, not echoed into logs.
    for bad in ["x".repeat(200), "two words".to_owned()] {
        let r = app
            .client
            .get(&url)
            .header("x-request-id", &bad)
            .send()
            .await
            .unwrap();
        let echoed = r.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(echoed, bad);
        uuid::Uuid::parse_str(echoed).unwrap();
    }
    // Errors carry it too.
    let r = app
        .client
        .get(format!("{}/nowhere", app.base))
        .header("x-request-id", "err-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "err-1");
}

/// Collects everything a subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// tracing caches each callsite's interest process-wide. While exactly one
/// dispatcher exists it asks only the *calling thread's* subscriber, so a
/// callsite first hit by another test's thread (no subscriber there) would be
/// cached as disabled for this test too. With a second dispatcher alive for
/// good, tracing caches "sometimes" and asks the current subscriber per call.
fn keep_a_second_dispatcher() {
    static EXTRA: OnceLock<tracing::Dispatch> = OnceLock::new();
    EXTRA.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// Sends (with a failover), checks a wrong and the right code, each request with
/// a known request id, under otpd's own subscriber at debug level; returns the
/// log and the codes that went out.
async fn logged_run(format: &str) -> (String, Vec<String>) {
    let captured = Captured::default();
    let settings = LogSettings {
        format: format.into(),
        level: "debug".into(),
    };
    let subscriber =
        otpd::telemetry::subscriber(&settings, EnvFilter::new("debug"), captured.clone());
    keep_a_second_dispatcher();
    // The test runtime is single-threaded, so the app's tasks log here too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (app, _gateway) = failing_then_working(|_| {}).await;
    let post = |path: &'static str, id: &'static str, body: Value| {
        app.client
            .post(format!("{}{path}", app.base))
            .header("x-api-key", &app.key)
            .header("x-request-id", id)
            .json(&body)
            .send()
    };
    // Ten digits: a code that long cannot turn up by chance in an id or timestamp.
    let r = post(
        "/v1/verifications",
        "log-send-1",
        json!({ "to": "31651860670", "code_length": 10 }),
    )
    .await
    .unwrap();
    assert_eq!(r.headers()["x-request-id"], "log-send-1");
    let sent: Value = r.json().await.unwrap();
    assert_eq!(sent["delivery"]["route_id"], 2, "{sent}");
    let code = code_of(&sent);
    let bad = wrong(&code);
    let r = post(
        "/v1/verifications/check",
        "log-check-wrong",
        json!({ "to": NL, "code": bad }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(
        "/v1/verifications/check",
        "log-check-right",
        json!({ "to": NL, "code": code }),
    )
    .await
    .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["valid"], true);
    drop(app);
    (captured.text(), vec![code, bad])
}

fn assert_nothing_secret(log: &str, codes: &[String]) {
    assert!(!log.contains(NL_DIGITS), "the number leaked:\n{log}");
    for code in codes {
        assert!(!log.contains(code.as_str()), "code {code} leaked:\n{log}");
    }
    assert!(log.contains("*******0670"), "no masked number:\n{log}");
}

#[tokio::test]
async fn text_logs_of_a_send_check_failover_run_hold_no_code_or_number() {
    let (log, codes) = logged_run("text").await;
    assert_nothing_secret(&log, &codes);
    // The three requests' audit events (the key created at start is in none).
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" audit: ") && l.contains("request{"))
        .collect();
    assert_eq!(audit.len(), 3, "{log}");
    for (line, id, event) in [
        (audit[0], "log-send-1", "event=\"send\""),
        (audit[1], "log-check-wrong", "event=\"check\""),
        (audit[2], "log-check-right", "event=\"check\""),
    ] {
        assert!(line.contains(&format!("request_id={id}")), "{line}");
        assert!(line.contains(event), "{line}");
    }
    assert!(audit[0].contains("route_id=2") && audit[0].contains("attempts=2"));
}

#[tokio::test]
async fn json_logs_carry_the_request_id_on_every_line_of_a_request() {
    let (log, codes) = logged_run("json").await;
    assert_nothing_secret(&log, &codes);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let request_id = |line: &Value| line["span"]["request_id"].as_str().map(str::to_owned);
    // The three requests' audit events (the key created at start is in none).
    let audit: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "audit" && request_id(l).is_some())
        .collect();
    assert_eq!(audit.len(), 3, "{log}");
    assert_eq!(request_id(audit[0]).as_deref(), Some("log-send-1"));
    assert_eq!(audit[0]["event"], "send");
    assert_eq!(audit[0]["to"], "+*******0670");
    assert_eq!(request_id(audit[2]).as_deref(), Some("log-check-right"));
    assert_eq!(audit[2]["outcome"], "approved");
    // Every line otpd logs while serving a request names that request.
    let in_requests: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t == "audit" || t.starts_with("otpd"))
        })
        .filter(|l| l["message"] != "otpd listening" && l["message"] != "otpd stopped")
        // The test's API key is created before any request.
        .filter(|l| l["event"] != "key_created")
        .collect();
    assert!(in_requests.len() >= 6, "{log}");
    for line in in_requests {
        assert!(request_id(line).is_some(), "no request id: {line}");
    }
}

/// A send the caller stopped waiting for (here the request deadline; a client
/// that hangs up is the same) runs to its end: when its provider then fails,
/// it gives its code and cooldown back, so nothing stays pending and the next
/// send is not held to a cooldown.
#[tokio::test]
async fn a_send_past_its_deadline_still_ends_cleanly() {
    use crate::routing::{Behaviour, Scripted};
    use otpd::sms::ProviderErrorKind;
    use otpd::sms::Route;
    use std::sync::Arc;
    use tokio::sync::Notify;

    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let failing = Behaviour::Fail(ProviderErrorKind::Unavailable);
    let provider = Scripted::gated(failing, &entered, &release);
    let app = TestApp::spawn_routed(vec![Route::new(1, provider)], |s| {
        s.server.request_timeout_seconds = 1
    })
    .await;
    let send = || {
        let (client, base, key) = (app.client.clone(), app.base.clone(), app.key.clone());
        tokio::spawn(async move {
            client
                .post(format!("{base}/v1/verifications"))
                .header("x-api-key", key)
                .json(&json!({ "to": "+31612345678" }))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let first = send();
    entered.notified().await;
    assert_eq!(first.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    release.notify_one();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut next = send();
        tokio::select! {
            status = &mut next => {
                // Held to the first send's cooldown until its give-back lands.
                assert_eq!(status.unwrap(), StatusCode::TOO_MANY_REQUESTS);
                assert!(std::time::Instant::now() < deadline, "the first send's code stayed pending");
                tokio::task::yield_now().await;
            }
            () = entered.notified() => {
                release.notify_one();
                assert_eq!(next.await.unwrap(), StatusCode::BAD_GATEWAY);
                break;
            }
        }
    }
}

/// A request that outlives `server.request_timeout_seconds` is answered 503
/// at the deadline, and the outermost layer still sees it: the answer carries
/// the request id and the HTTP metrics count it under its route.
#[tokio::test]
async fn a_request_past_its_deadline_is_answered_and_counted() {
    use crate::routing::{Behaviour, Scripted};
    use otpd::sms::Route;

    // A provider that never answers; its route's own timeout is longer.
    let mut route = Route::new(1, Scripted::new(Behaviour::Hang));
    route.timeout = std::time::Duration::from_secs(60);
    let app = TestApp::spawn_routed(vec![route], |s| s.server.request_timeout_seconds = 1).await;
    let started = std::time::Instant::now();
    let r = app
        .client
        .post(format!("{}/v1/verifications", app.base))
        .header("x-api-key", &app.key)
        .header("x-request-id", "late-1")
        .json(&json!({ "to": "+31612345678" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["x-request-id"], "late-1");
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // In the API's error shape, as every other refusal.
    let (_, body) = parts(r).await;
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    // The seed-compatible APIs answer in their own shapes.
    let bridgex = json!({ "phone_number": "31612345679", "route_id": 1 });
    let r = app.post_bearer("/send-otp", bridgex).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, body) = parts(r).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({ "detail": "Service temporarily unavailable." })
    );
    let openlyne = json!({ "phone": "31612345670", "uid": "123e4567-e89b-12d3-a456-426614174000" });
    let (status, body) = parts(app.post("/webhook/send-otp", openlyne).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        (&body["success"], &body["data"]),
        (&json!(false), &json!(null)),
        "{body}"
    );
    let (_, metrics) = scrape(&app).await;
    assert_eq!(
        metrics.value(
            "otpd_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/verifications"),
                ("status", "503")
            ]
        ),
        1.0
    );
}
