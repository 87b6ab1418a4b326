//! Africa's Talking: form-encoded `POST /version1/messaging` with `apiKey`;
//! the per-recipient `statusCode` decides, even inside a 201.

use std::time::Duration;

use otpd::domain::DeliveryStatus;
use otpd::sms::africastalking::{LIVE_BASE_URL, SANDBOX_BASE_URL};
use otpd::sms::config::AfricasTalkingSettings;
use otpd::sms::{AfricasTalkingProvider, ProviderErrorKind, SmsProvider};
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockBuilder, MockServer, ResponseTemplate};

use super::{FormIs, Target, assert_failure, client, send, transport_failures};

fn settings(base: Option<&str>, username: &str) -> AfricasTalkingSettings {
    AfricasTalkingSettings {
        username: username.to_owned(),
        api_key: Some(SecretString::from("test-key")),
        sender_id: None,
        base_url: base.map(str::to_owned),
        enqueue: false,
    }
}

fn provider(base: &str, timeout: Duration) -> AfricasTalkingProvider {
    AfricasTalkingProvider::new(&settings(Some(base), "otpd"), client(), timeout).unwrap()
}

fn boxed(base: &str, timeout: Duration) -> Box<dyn SmsProvider> {
    Box::new(provider(base, timeout))
}

fn messaging() -> MockBuilder {
    Mock::given(method("POST")).and(path("/version1/messaging"))
}

fn recipients(entries: Value) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({
        "SMSMessageData": {
            "Message": "Sent to 1/1 Total Cost: KES 0.8000",
            "Recipients": entries
        }
    }))
}

fn recipient(status_code: u16, status: &str) -> ResponseTemplate {
    recipients(json!([{
        "statusCode": status_code,
        "number": "+31651860670",
        "status": status,
        "cost": "KES 0.8000",
        "messageId": "ATPid_SampleTxnId123"
    }]))
}

#[tokio::test]
async fn sends_the_documented_form_and_reads_the_recipient() {
    let server = MockServer::start().await;
    messaging()
        .and(header("apiKey", "test-key"))
        .and(header("accept", "application/json"))
        .and(FormIs::new(&[
            ("username", "otpd"),
            ("to", "+31651860670"),
            ("message", "Your verification code is 482916."),
            ("bulkSMSMode", "1"),
        ]))
        .respond_with(recipient(101, "Success"))
        .expect(1)
        .mount(&server)
        .await;

    let receipt = send(&provider(&server.uri(), Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        receipt.provider_message_id.as_deref(),
        Some("ATPid_SampleTxnId123")
    );
    assert_eq!(receipt.status, Some(DeliveryStatus::Sent));
    assert_eq!(receipt.cost, Some(0.8));
    assert_eq!(receipt.currency.as_deref(), Some("KES"));
}

#[tokio::test]
async fn sender_id_and_enqueue_are_sent_when_configured() {
    let server = MockServer::start().await;
    messaging()
        .and(FormIs::new(&[
            ("username", "otpd"),
            ("to", "+31651860670"),
            ("message", "Your verification code is 482916."),
            ("bulkSMSMode", "1"),
            ("from", "OTPD"),
            ("enqueue", "1"),
        ]))
        .respond_with(recipient(102, "Queued"))
        .expect(1)
        .mount(&server)
        .await;
    let mut s = settings(Some(&server.uri()), "otpd");
    s.sender_id = Some("OTPD".to_owned());
    s.enqueue = true;
    let p = AfricasTalkingProvider::new(&s, client(), Duration::from_secs(5)).unwrap();
    let receipt = send(&p).await.unwrap();
    assert_eq!(receipt.status, Some(DeliveryStatus::Queued));
}

#[test]
fn the_sandbox_username_selects_the_sandbox_api() {
    let url = |base: Option<&str>, user: &str| {
        AfricasTalkingProvider::new(&settings(base, user), client(), Duration::from_secs(5))
            .unwrap()
            .endpoint()
            .to_owned()
    };
    assert_eq!(
        url(None, "sandbox"),
        format!("{SANDBOX_BASE_URL}/version1/messaging")
    );
    assert_eq!(
        url(None, "acme"),
        format!("{LIVE_BASE_URL}/version1/messaging")
    );
    assert_eq!(
        url(Some("http://127.0.0.1:9/"), "sandbox"),
        "http://127.0.0.1:9/version1/messaging"
    );
}

#[tokio::test]
async fn every_documented_recipient_status_is_mapped() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    for (code, status, expected) in [
        (100, "Processed", DeliveryStatus::Queued),
        (101, "Sent", DeliveryStatus::Sent),
        (102, "Queued", DeliveryStatus::Queued),
    ] {
        let _guard = messaging()
            .respond_with(recipient(code, status))
            .mount_as_scoped(&server)
            .await;
        assert_eq!(send(&p).await.unwrap().status, Some(expected), "{code}");
    }
    use ProviderErrorKind::*;
    for (code, status, kind) in [
        (401, "RiskHold", Rejected),
        (402, "InvalidSenderId", Auth),
        (403, "InvalidPhoneNumber", InvalidNumber),
        (404, "UnsupportedNumberType", Rejected),
        (405, "InsufficientBalance", InsufficientBalance),
        (406, "UserInBlacklist", Rejected),
        (407, "CouldNotRoute", Rejected),
        (409, "DoNotDisturbRejection", Rejected),
        (500, "InternalServerError", Unavailable),
        (501, "GatewayError", Unavailable),
        (502, "RejectedByGateway", Rejected),
    ] {
        let _guard = messaging()
            .respond_with(recipient(code, status))
            .mount_as_scoped(&server)
            .await;
        let err = assert_failure(send(&p).await, kind);
        assert!(
            err.message.contains(status),
            "{status} not in {}",
            err.message
        );
        assert_eq!(err.kind.try_next_route(), code != 403, "{code}");
    }
}

#[tokio::test]
async fn a_201_without_recipients_says_why_in_message() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    for (message, kind) in [
        ("InvalidSenderId", ProviderErrorKind::Auth),
        (
            "InsufficientBalance",
            ProviderErrorKind::InsufficientBalance,
        ),
        ("Sent to 0/1 Total Cost: 0", ProviderErrorKind::Rejected),
    ] {
        let _guard = messaging()
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({
                "SMSMessageData": {"Message": message, "Recipients": []}
            })))
            .mount_as_scoped(&server)
            .await;
        assert_failure(send(&p).await, kind);
    }
}

#[tokio::test]
async fn refused_credentials_are_an_auth_error() {
    let server = MockServer::start().await;
    messaging()
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_raw("The supplied authentication is invalid", "text/plain"),
        )
        .mount(&server)
        .await;
    let err = assert_failure(
        send(&provider(&server.uri(), Duration::from_secs(5))).await,
        ProviderErrorKind::Auth,
    );
    assert!(
        err.message.contains("authentication is invalid"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn transport_failures_map_to_router_kinds() {
    transport_failures(Target {
        make: boxed,
        path: "/version1/messaging",
        lenient_success: false,
    })
    .await;
}
