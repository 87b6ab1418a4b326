//! Twilio: form-encoded `POST /2010-04-01/Accounts/{sid}/Messages.json`, basic auth.

use std::time::Duration;

use otpd::domain::DeliveryStatus;
use otpd::sms::config::TwilioSettings;
use otpd::sms::{ProviderErrorKind, SmsProvider, TwilioProvider};
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::matchers::{basic_auth, method, path};
use wiremock::{Mock, MockBuilder, MockServer, ResponseTemplate};

use super::{FormIs, Target, assert_failure, client, send, transport_failures};

const SID: &str = "AC00000000000000000000000000000001";
const MESSAGES: &str = "/2010-04-01/Accounts/AC00000000000000000000000000000001/Messages.json";

fn settings(base: &str) -> TwilioSettings {
    TwilioSettings {
        base_url: base.to_owned(),
        account_sid: SID.to_owned(),
        auth_token: Some(SecretString::from("test-token")),
        from: Some("+15005550006".to_owned()),
        messaging_service_sid: None,
        status_callback: Some(SecretString::from(
            "https://otpd.example.com/v1/dlr/twilio/s3cret",
        )),
    }
}

fn provider(base: &str, timeout: Duration) -> TwilioProvider {
    TwilioProvider::new(&settings(base), client(), timeout).unwrap()
}

fn boxed(base: &str, timeout: Duration) -> Box<dyn SmsProvider> {
    Box::new(provider(base, timeout))
}

fn messages() -> MockBuilder {
    Mock::given(method("POST")).and(path(MESSAGES))
}

fn created(price: Value) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({
        "sid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
        "account_sid": SID,
        "to": "+31651860670",
        "from": "+15005550006",
        "body": "Your verification code is 482916.",
        "status": "queued",
        "num_segments": "1",
        "error_code": null,
        "error_message": null,
        "price": price,
        "price_unit": "USD",
        "uri": "/2010-04-01/Accounts/AC.../Messages/SM....json"
    }))
}

#[tokio::test]
async fn sends_the_documented_form_with_basic_auth() {
    let server = MockServer::start().await;
    messages()
        .and(basic_auth(SID, "test-token"))
        .and(FormIs::new(&[
            ("To", "+31651860670"),
            ("From", "+15005550006"),
            ("Body", "Your verification code is 482916."),
            (
                "StatusCallback",
                "https://otpd.example.com/v1/dlr/twilio/s3cret",
            ),
        ]))
        .respond_with(created(Value::Null))
        .expect(1)
        .mount(&server)
        .await;
    let receipt = send(&provider(&server.uri(), Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        receipt.provider_message_id.as_deref(),
        Some("SM1f0e8ae6ade43cb3c0ce4525424e404f")
    );
    assert_eq!(receipt.status, Some(DeliveryStatus::Queued));
    // Twilio prices a message later: `null` at creation means "not known yet".
    assert_eq!(receipt.cost, None);
    assert_eq!(receipt.currency, None);
}

#[tokio::test]
async fn a_messaging_service_replaces_from() {
    let server = MockServer::start().await;
    messages()
        .and(FormIs::new(&[
            ("To", "+31651860670"),
            ("MessagingServiceSid", "MG00000000000000000000000000000001"),
            ("Body", "Your verification code is 482916."),
        ]))
        .respond_with(created(json!("-0.0075")))
        .expect(1)
        .mount(&server)
        .await;
    let mut s = settings(&server.uri());
    s.from = None;
    s.messaging_service_sid = Some("MG00000000000000000000000000000001".to_owned());
    s.status_callback = None;
    let p = TwilioProvider::new(&s, client(), Duration::from_secs(5)).unwrap();
    let receipt = send(&p).await.unwrap();
    // Twilio reports charges as negative amounts.
    assert_eq!(receipt.cost, Some(0.0075));
    assert_eq!(receipt.currency.as_deref(), Some("USD"));
}

#[tokio::test]
async fn error_codes_map_to_what_the_router_needs() {
    let server = MockServer::start().await;
    let p = provider(&server.uri(), Duration::from_secs(5));
    use ProviderErrorKind::*;
    let cases = [
        (
            400,
            21211,
            "The 'To' number +31651860670 is not a valid phone number.",
            InvalidNumber,
        ),
        (
            400,
            21614,
            "'To' number is not a valid mobile number",
            InvalidNumber,
        ),
        (401, 20003, "Authenticate", Auth),
        (404, 20404, "The requested resource was not found", Auth),
        (
            400,
            21606,
            "The 'From' phone number provided is not a valid message-capable Twilio phone number for this destination/account",
            Auth,
        ),
        (
            400,
            21408,
            "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: +31651860670.",
            Rejected,
        ),
        (
            400,
            21610,
            "Attempt to send to unsubscribed recipient",
            Rejected,
        ),
        (
            400,
            21612,
            "The 'To' phone number is not currently reachable via SMS",
            Rejected,
        ),
        (429, 20429, "Too Many Requests", RateLimited),
        // Codes this client does not know fall back to the HTTP status.
        (400, 99999, "Something new", Rejected),
        (503, 99998, "Service unavailable", Unavailable),
    ];
    for (status, code, message, kind) in cases {
        let _guard = messages()
            .respond_with(ResponseTemplate::new(status).set_body_json(json!({
                "code": code,
                "message": message,
                "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
                "status": status
            })))
            .mount_as_scoped(&server)
            .await;
        let err = assert_failure(send(&p).await, kind);
        assert!(
            err.message.contains(&code.to_string()),
            "{code} not in {}",
            err.message
        );
    }
}

#[tokio::test]
async fn rate_limits_carry_retry_after() {
    let server = MockServer::start().await;
    messages()
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "3")
                .set_body_json(
                    json!({"code": 20429, "message": "Too Many Requests", "status": 429}),
                ),
        )
        .mount(&server)
        .await;
    let err = assert_failure(
        send(&provider(&server.uri(), Duration::from_secs(5))).await,
        ProviderErrorKind::RateLimited,
    );
    assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn a_message_failed_at_creation_is_not_a_success() {
    let server = MockServer::start().await;
    messages()
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": "SM1", "status": "failed", "error_code": 21211, "price": null
        })))
        .mount(&server)
        .await;
    assert_failure(
        send(&provider(&server.uri(), Duration::from_secs(5))).await,
        ProviderErrorKind::InvalidNumber,
    );
}

#[tokio::test]
async fn transport_failures_map_to_router_kinds() {
    transport_failures(Target {
        make: boxed,
        path: MESSAGES,
        lenient_success: false,
    })
    .await;
}
