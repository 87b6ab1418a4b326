//! BridgeXAPI: `POST /api/v1/send_sms`, JSON, `X-API-KEY`.

use std::time::Duration;

use otpd::domain::DeliveryStatus;
use otpd::sms::config::BridgexSettings;
use otpd::sms::{BridgexProvider, ProviderErrorKind, SmsProvider};
use secrecy::SecretString;
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockBuilder, MockServer, ResponseTemplate};

use super::{Target, assert_failure, client, number, outgoing, send, transport_failures};

fn settings(base: &str) -> BridgexSettings {
    BridgexSettings {
        base_url: base.to_owned(),
        api_key: Some(SecretString::from("test-key")),
        provider_route_id: 3,
        caller_id: "BRIDGEXAPI".to_owned(),
    }
}

fn provider(base: &str, timeout: Duration) -> BridgexProvider {
    BridgexProvider::new(&settings(base), client(), timeout).unwrap()
}

fn boxed(base: &str, timeout: Duration) -> Box<dyn SmsProvider> {
    Box::new(provider(base, timeout))
}

/// A key that cannot travel in an HTTP header is refused when the route is
/// built (at startup), not on every send.
#[test]
fn a_key_that_cannot_be_a_header_is_refused_up_front() {
    let mut bad = settings("http://127.0.0.1:9");
    bad.api_key = Some(SecretString::from("test\nkey"));
    let refused = BridgexProvider::new(&bad, client(), Duration::from_secs(1)).err();
    let refused = refused.expect("refused");
    assert!(refused.starts_with("api_key:"), "{refused}");
    assert!(
        !refused.contains("test"),
        "the key is not repeated: {refused}"
    );
}

fn send_sms() -> MockBuilder {
    Mock::given(method("POST")).and(path("/api/v1/send_sms"))
}

#[tokio::test]
async fn sends_the_documented_request_and_reads_the_order() {
    let server = MockServer::start().await;
    send_sms()
        .and(header("X-API-KEY", "test-key"))
        .and(header("content-type", "application/json"))
        .and(body_json(json!({
            "route_id": 3,
            "caller_id": "BRIDGEXAPI",
            "numbers": ["31651860670"],
            "message": "Your verification code is 482916.",
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "success",
            "message": "SMS batch accepted via BridgeXAPI",
            "order_id": 22229,
            "route_id": 3,
            "count": 1,
            "messages": [{
                "bx_message_id": "BX-22229-1d5e5779b1904695",
                "msisdn": "31651860670",
                "status": "queued"
            }],
            "cost": 0.05,
            "balance_after": 10.0
        })))
        .expect(1)
        .mount(&server)
        .await;

    let receipt = send(&provider(&server.uri(), Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        receipt.provider_message_id.as_deref(),
        Some("BX-22229-1d5e5779b1904695")
    );
    assert_eq!(receipt.order_id.as_deref(), Some("22229"));
    assert_eq!(receipt.status, Some(DeliveryStatus::Queued));
    assert_eq!(receipt.cost, Some(0.05));
}

#[tokio::test]
async fn documented_detail_strings_map_to_what_the_router_needs() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    let cases = [
        (401, "Missing API key", ProviderErrorKind::Auth),
        (401, "Invalid or inactive API key", ProviderErrorKind::Auth),
        (401, "Missing X-API-KEY header", ProviderErrorKind::Auth),
        (400, "Invalid route_id", ProviderErrorKind::Auth),
        (
            403,
            "You are not authorized for route 7",
            ProviderErrorKind::Auth,
        ),
        (
            402,
            "Insufficient balance",
            ProviderErrorKind::InsufficientBalance,
        ),
        (
            400,
            "Insufficient balance for this order",
            ProviderErrorKind::InsufficientBalance,
        ),
        (502, "Vendor send failed", ProviderErrorKind::Unavailable),
        (500, "Pricing failed", ProviderErrorKind::Unavailable),
        (500, "Estimate failed", ProviderErrorKind::Unavailable),
        // Unknown details fall back to the status, and are quoted safely.
        (
            400,
            "Caller ID blocked by operator",
            ProviderErrorKind::Rejected,
        ),
        (503, "maintenance", ProviderErrorKind::Unavailable),
    ];
    for (status, detail, kind) in cases {
        let _guard = send_sms()
            .respond_with(ResponseTemplate::new(status).set_body_json(json!({ "detail": detail })))
            .mount_as_scoped(&server)
            .await;
        let err = assert_failure(send(&p).await, kind);
        assert!(
            err.message.to_lowercase().contains(&detail.to_lowercase()),
            "{detail:?} not quoted in {:?}",
            err.message
        );
    }
}

#[tokio::test]
async fn validation_errors_are_rejections_without_echoing_input() {
    let server = MockServer::start().await;
    send_sms()
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "detail": [{
                "loc": ["body", "numbers", 0],
                "msg": "Number 31651860670 is not a valid msisdn",
                "type": "value_error",
                "input": "31651860670"
            }]
        })))
        .mount(&server)
        .await;
    let err = assert_failure(
        send(&provider(&server.uri(), Duration::from_secs(5))).await,
        ProviderErrorKind::Rejected,
    );
    assert!(
        err.message.contains("not a valid msisdn"),
        "{}",
        err.message
    );
    assert!(err.kind.try_next_route());
}

#[tokio::test]
async fn a_message_failed_at_submission_is_a_rejection() {
    let server = MockServer::start().await;
    send_sms()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "success",
            "order_id": 1,
            "messages": [{"bx_message_id": "BX-1-a", "msisdn": "31651860670", "status": "failed"}],
        })))
        .mount(&server)
        .await;
    assert_failure(
        send(&provider(&server.uri(), Duration::from_secs(5))).await,
        ProviderErrorKind::Rejected,
    );
}

#[tokio::test]
async fn a_message_bridgexapi_would_refuse_is_never_sent() {
    let server = MockServer::start().await;
    send_sms()
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    let to = number();
    let long = format!("Your verification code is 482916. {}", "x".repeat(130));
    for body in [long.as_str(), "Votre code est 482916 – merci"] {
        let err = p.send(&outgoing(&to, body)).await.unwrap_err();
        assert_eq!(err.kind, ProviderErrorKind::Rejected);
    }
}

#[tokio::test]
async fn transport_failures_map_to_router_kinds() {
    transport_failures(Target {
        make: boxed,
        path: "/api/v1/send_sms",
        lenient_success: false,
    })
    .await;
}

fn dlr(id: &str) -> MockBuilder {
    Mock::given(method("GET")).and(path(format!("/api/v1/dlr/{id}")))
}

#[tokio::test]
async fn delivery_status_polls_read_the_dlr_record() {
    use otpd::sms::bridgexapi::DlrPoll;

    let server = MockServer::start().await;
    let record = |status: &str, error: serde_json::Value| {
        ResponseTemplate::new(200).set_body_json(json!({
            "bx_message_id": "BX-1", "msisdn": "31651860670", "status": status,
            "route_id": 3, "sms_order_id": 22229, "created_at": "2026-01-01T10:00:00",
            "error": error
        }))
    };
    for (id, answer, expected) in [
        (
            "BX-1",
            record("DELIVRD", json!(null)),
            DlrPoll::Report {
                status: Some(DeliveryStatus::Delivered),
                error: None,
            },
        ),
        (
            "BX-2",
            record("rejected", json!("Number 31651860670 blacklisted")),
            DlrPoll::Report {
                status: Some(DeliveryStatus::Failed),
                error: Some("Number [digits] blacklisted".into()),
            },
        ),
        (
            "BX-3",
            record("on its way", json!(null)),
            DlrPoll::Report {
                status: None,
                error: None,
            },
        ),
        (
            "BX-4",
            ResponseTemplate::new(404).set_body_json(json!({"detail": "DLR record not found"})),
            DlrPoll::NotFound,
        ),
    ] {
        dlr(id)
            .and(header("X-API-KEY", "test-key"))
            .respond_with(answer)
            .mount(&server)
            .await;
        let got = provider(&server.uri(), Duration::from_secs(5))
            .poll_dlr(id)
            .await
            .unwrap();
        assert_eq!(got, expected, "{id}");
    }

    let p = provider(&server.uri(), Duration::from_millis(300));
    dlr("BX-slow")
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
        .mount(&server)
        .await;
    let err = p.poll_dlr("BX-slow").await.unwrap_err();
    assert_eq!(err.kind, ProviderErrorKind::Timeout);
    dlr("BX-auth")
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"detail": "Invalid or inactive API key"})),
        )
        .mount(&server)
        .await;
    assert_eq!(
        p.poll_dlr("BX-auth").await.unwrap_err().kind,
        ProviderErrorKind::Auth
    );
    dlr("BX-garbage")
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>"))
        .mount(&server)
        .await;
    assert_eq!(
        p.poll_dlr("BX-garbage").await.unwrap_err().kind,
        ProviderErrorKind::Malformed
    );
    // Some other 404 (a wrong base URL) is an error, not "no report yet".
    assert_eq!(
        p.poll_dlr("BX-unmounted").await.unwrap_err().kind,
        ProviderErrorKind::Unavailable
    );
}
