//! The whole app with real provider clients in front of wiremock servers:
//! failover, all routes down, pinning and the circuit breaker as an API
//! caller sees them.

use otpd::config::Settings;
use otpd::sms::RouteSettings;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, expect_error, parts};

/// Route 1: BridgeXAPI on `primary`; route 2: a webhook gateway on `fallback`.
fn configure(settings: &mut Settings, primary: &MockServer, fallback: &MockServer) {
    #[derive(Deserialize)]
    struct Routes {
        routes: Vec<RouteSettings>,
    }
    let parsed: Routes = toml::from_str(&format!(
        r#"
        [[routes]]
        id = 1
        provider = "bridgexapi"
        base_url = "{primary}"
        api_key = "test-key"
        provider_route_id = 3
        caller_id = "OTPD"

        [[routes]]
        id = 2
        provider = "webhook"
        url = "{fallback}/sms"
        secret = "a-long-webhook-signing-secret"
        "#,
        primary = primary.uri(),
        fallback = fallback.uri(),
    ))
    .unwrap();
    settings.routes = parsed.routes;
    settings.policy.routes = vec![1, 2];
    settings.routing.timeout_ms = 2_000;
}

async fn primary_answers(server: &MockServer, status: u16, body: Value) {
    Mock::given(method("POST"))
        .and(path("/api/v1/send_sms"))
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
        .mount(server)
        .await;
}

fn bridgex_accepted() -> Value {
    json!({
        "status": "success", "order_id": 7, "route_id": 3, "count": 1,
        "messages": [{"bx_message_id": "BX-7-abc", "msisdn": "31651860670", "status": "queued"}],
        "cost": 0.05
    })
}

async fn gateway_answers(server: &MockServer, status: u16) {
    Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(status).set_body_json(json!({"id": "gw-1"})))
        .mount(server)
        .await;
}

async fn requests(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

async fn spawn(primary: &MockServer, fallback: &MockServer) -> TestApp {
    TestApp::spawn_with(|s| configure(s, primary, fallback)).await
}

#[tokio::test]
async fn a_down_primary_fails_over_and_both_attempts_are_visible() {
    let (primary, fallback) = (MockServer::start().await, MockServer::start().await);
    primary_answers(&primary, 500, json!({"detail": "Vendor send failed"})).await;
    gateway_answers(&fallback, 200).await;
    let app = spawn(&primary, &fallback).await;

    let sent = app.send_to("+31651860670").await;
    assert_eq!(sent["delivery"]["route_id"], 2, "{sent}");
    assert_eq!(sent["delivery"]["provider"], "webhook");
    assert_eq!(sent["delivery"]["provider_message_id"], "gw-1");

    let id = sent["id"].as_str().unwrap();
    let (status, view) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(status, StatusCode::OK);
    let deliveries = view["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 2, "{view}");
    assert_eq!(deliveries[0]["route_id"], 1);
    assert_eq!(deliveries[0]["provider"], "bridgexapi");
    assert_eq!(deliveries[0]["status"], "failed");
    assert!(
        deliveries[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("unavailable: Vendor send failed"),
        "{view}"
    );
    assert_eq!(deliveries[1]["route_id"], 2);
    assert!(deliveries[1]["error"].is_null());

    // The code that went out over the fallback is the one that works.
    let code = sent["debug_code"].as_str().unwrap();
    let (status, checked) = parts(
        app.post("/v1/verifications/check", json!({"id": id, "code": code}))
            .await,
    )
    .await;
    assert_eq!(
        (status, checked["valid"].clone()),
        (StatusCode::OK, json!(true))
    );
}

#[tokio::test]
async fn when_every_route_fails_nothing_stays_pending() {
    let (primary, fallback) = (MockServer::start().await, MockServer::start().await);
    primary_answers(&primary, 503, json!({"detail": "maintenance"})).await;
    let gateway_down = Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(502))
        .mount_as_scoped(&fallback)
        .await;
    let app = spawn(&primary, &fallback).await;

    let r = app
        .post("/v1/verifications", json!({"to": "+31651860670"}))
        .await;
    let body = expect_error(r, StatusCode::BAD_GATEWAY, "delivery_failed").await;
    assert!(body["error"]["verification_id"].is_string(), "{body}");
    assert_eq!(
        (requests(&primary).await, requests(&fallback).await),
        (1, 1)
    );
    let r = app
        .post(
            "/v1/verifications/check",
            json!({"to": "+31651860670", "code": "123456"}),
        )
        .await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;

    // The failed send did not use up the cooldown: the user can ask again now.
    drop(gateway_down);
    gateway_answers(&fallback, 200).await;
    let sent = app.send_to("+31651860670").await;
    assert_eq!(sent["delivery"]["route_id"], 2);
}

#[tokio::test]
async fn a_pinned_route_is_tried_first_and_alone_without_failover() {
    let (primary, fallback) = (MockServer::start().await, MockServer::start().await);
    primary_answers(&primary, 500, json!({"detail": "Vendor send failed"})).await;
    gateway_answers(&fallback, 200).await;
    let app = spawn(&primary, &fallback).await;

    let r = app
        .post(
            "/v1/verifications",
            json!({"to": "+31651860670", "route_id": 2}),
        )
        .await;
    let (status, sent) = parts(r).await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["delivery"]["route_id"], 2);
    assert_eq!(requests(&primary).await, 0);

    let r = app
        .post(
            "/v1/verifications",
            json!({"to": "+31651860671", "route_id": 1, "failover": false}),
        )
        .await;
    expect_error(r, StatusCode::BAD_GATEWAY, "delivery_failed").await;
    assert_eq!(
        (requests(&primary).await, requests(&fallback).await),
        (1, 1)
    );

    let r = app
        .post(
            "/v1/verifications",
            json!({"to": "+31651860672", "route_id": 9}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn with_every_circuit_open_a_send_says_when_to_come_back() {
    let (primary, fallback) = (MockServer::start().await, MockServer::start().await);
    primary_answers(&primary, 503, json!({"detail": "maintenance"})).await;
    gateway_answers(&fallback, 502).await;
    let app = TestApp::spawn_with(|s| {
        configure(s, &primary, &fallback);
        s.routing.breaker.failure_threshold = 1;
    })
    .await;
    let r = app
        .post("/v1/verifications", json!({"to": "+31651860670"}))
        .await;
    expect_error(r, StatusCode::BAD_GATEWAY, "delivery_failed").await;

    // Both circuits are open now: no provider is asked, and the answer gives
    // the cool-off left, not a blind one second.
    app.advance(10);
    let r = app
        .post("/v1/verifications", json!({"to": "+31651860671"}))
        .await;
    let retry_after = r.headers()["retry-after"].to_str().unwrap().to_owned();
    let body = expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert_eq!(retry_after, "20", "{body}");
    assert_eq!(body["error"]["retry_after_seconds"], 20, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every route"),
        "{body}"
    );
    // The Openlyne-style API calls it a failed send, as its original did when
    // its provider failed, not an invalid number.
    let (status, body) = parts(
        app.post(
            "/webhook/send-otp",
            json!({"phone": "+31651860672", "uid": "0b8f7c2e-6a4e-4f9b-9a51-2f0c7d3e8a10"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "send_failed", "{body}");
    assert_eq!(
        (requests(&primary).await, requests(&fallback).await),
        (1, 1)
    );
}

#[tokio::test]
async fn a_failing_route_is_skipped_once_its_circuit_opens() {
    let (primary, fallback) = (MockServer::start().await, MockServer::start().await);
    primary_answers(&primary, 503, json!({"detail": "maintenance"})).await;
    gateway_answers(&fallback, 200).await;
    let app = TestApp::spawn_with(|s| {
        configure(s, &primary, &fallback);
        s.routing.breaker.failure_threshold = 2;
    })
    .await;

    for to in ["+31651860670", "+31651860671"] {
        assert_eq!(app.send_to(to).await["delivery"]["route_id"], 2);
    }
    let (_, health) = parts(
        app.client
            .get(format!("{}/health", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let circuits: Vec<(u64, String)> = health["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["circuit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        circuits,
        vec![(1, "open".to_owned()), (2, "closed".to_owned())]
    );

    // Open: the next send goes straight to the fallback.
    let sent = app.send_to("+31651860672").await;
    let id = sent["id"].as_str().unwrap();
    let (_, view) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(view["deliveries"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(requests(&primary).await, 2);

    // After the cool-off the primary gets one probe; it is back, so it closes.
    primary.reset().await;
    primary_answers(&primary, 200, bridgex_accepted()).await;
    app.advance(30);
    let sent = app.send_to("+31651860673").await;
    assert_eq!(sent["delivery"]["route_id"], 1, "{sent}");
    assert_eq!(sent["delivery"]["provider_message_id"], "BX-7-abc");
    let (_, health) = parts(
        app.client
            .get(format!("{}/health", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health["routes"][0]["circuit"], "closed");
}
