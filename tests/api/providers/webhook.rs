//! The user's own gateway: signed JSON POST.

use std::time::Duration;

use hmac::{Hmac, Mac};
use otpd::domain::DeliveryStatus;
use otpd::sms::config::WebhookSettings;
use otpd::sms::webhook::SIGNATURE_HEADER;
use otpd::sms::{ProviderErrorKind, SmsProvider, WebhookProvider};
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockBuilder, MockServer, ResponseTemplate};

use super::{Target, assert_failure, client, number, send, transport_failures};

const SECRET: &str = "a-long-webhook-signing-secret";

fn provider(base: &str, timeout: Duration) -> WebhookProvider {
    let settings = WebhookSettings {
        url: format!("{base}/hook"),
        secret: Some(SecretString::from(SECRET)),
    };
    WebhookProvider::new(&settings, client(), timeout).unwrap()
}

fn boxed(base: &str, timeout: Duration) -> Box<dyn SmsProvider> {
    Box::new(provider(base, timeout))
}

fn hook() -> MockBuilder {
    Mock::given(method("POST")).and(path("/hook"))
}

#[tokio::test]
async fn posts_signed_json_that_the_gateway_can_verify() {
    let server = MockServer::start().await;
    hook()
        .and(header("content-type", "application/json"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "gw-1", "status": "sent"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    let to = number();
    let verification_id = Uuid::new_v4();
    let sms = otpd::sms::OutgoingSms {
        verification_id,
        route_id: 4,
        ..super::outgoing(&to, super::BODY)
    };
    let receipt = p.send(&sms).await.unwrap();
    assert_eq!(receipt.provider_message_id.as_deref(), Some("gw-1"));
    assert_eq!(receipt.status, Some(DeliveryStatus::Sent));

    let requests = server.received_requests().await.unwrap();
    let request = &requests[0];
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        json!({
            "to": "+31651860670",
            "message": "Your verification code is 482916.",
            "verification_id": verification_id.to_string(),
            "route_id": 4,
        })
    );
    // What a gateway does: HMAC-SHA256 of the exact bytes received.
    let signature = request
        .headers
        .get(SIGNATURE_HEADER)
        .unwrap()
        .to_str()
        .unwrap();
    let hex_mac = signature.strip_prefix("sha256=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&request.body);
    mac.verify_slice(&hex::decode(hex_mac).unwrap())
        .expect("signature verifies over the exact body");
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"another-secret-entirely").unwrap();
    wrong.update(&request.body);
    assert!(wrong.verify_slice(&hex::decode(hex_mac).unwrap()).is_err());
}

#[tokio::test]
async fn an_empty_2xx_is_an_accepted_message() {
    let server = MockServer::start().await;
    hook()
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let receipt = send(&provider(&server.uri(), Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(receipt.status, Some(DeliveryStatus::Queued));
    assert_eq!(receipt.provider_message_id, None);
}

#[tokio::test]
async fn a_2xx_saying_failed_is_a_refusal_the_next_route_can_take() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    for status in ["failed", "undelivered"] {
        let _guard = hook()
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": status})))
            .mount_as_scoped(&server)
            .await;
        let err = send(&p).await.unwrap_err();
        assert_eq!(err.kind, ProviderErrorKind::Rejected, "{status}");
        assert!(err.kind.try_next_route());
    }
    let _guard = hook()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "accepted"})))
        .mount_as_scoped(&server)
        .await;
    let receipt = send(&p).await.unwrap();
    assert_eq!(
        receipt.status,
        Some(DeliveryStatus::Queued),
        "another word reads as queued"
    );
}

#[tokio::test]
async fn the_gateway_can_say_why_it_refused() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    use ProviderErrorKind::*;
    for (status, body, kind) in [
        (422, json!({"error": "invalid_number"}), InvalidNumber),
        (400, json!({"error": "rejected"}), Rejected),
        (
            402,
            json!({"error": "insufficient_balance"}),
            InsufficientBalance,
        ),
        (400, json!({"message": "no idea"}), Rejected),
        (401, json!({}), Auth),
    ] {
        let _guard = hook()
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount_as_scoped(&server)
            .await;
        assert_failure(send(&p).await, kind);
    }
}

#[tokio::test]
async fn transport_failures_map_to_router_kinds() {
    transport_failures(Target {
        make: boxed,
        path: "/hook",
        lenient_success: true,
    })
    .await;
}
