//! No provider or router log line carries the message body (the code) or the
//! full phone number, on success or failure.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otpd::domain::Code;
use otpd::sms::{DeliveryRequest, Route, RouteSettings, RoutingSettings, SmsRouter, build_routes};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{CODE, client, number};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[derive(Deserialize)]
struct Config {
    routes: Vec<RouteSettings>,
}

#[tokio::test]
async fn neither_code_nor_full_number_reaches_the_log() {
    let server = MockServer::start().await;
    // Providers that echo the number and the message back in their errors.
    Mock::given(method("POST"))
        .and(path("/api/v1/send_sms"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({
            "detail": "Vendor send failed for 31651860670: 'Your verification code is 482916.'"
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/version1/messaging"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "SMSMessageData": {
                "Message": "Sent to 0/1 Total Cost: 0 (+31651860670: 482916)",
                "Recipients": [{"statusCode": 406, "number": "+31651860670",
                                "status": "UserInBlacklist", "cost": "0", "messageId": "None"}]
            }
        })))
        .mount(&server)
        .await;
    let config: Config = toml::from_str(&format!(
        r#"
        [[routes]]
        id = 1
        provider = "bridgexapi"
        base_url = "{base}"
        api_key = "test-key"
        provider_route_id = 3
        caller_id = "BRIDGEXAPI"

        [[routes]]
        id = 2
        provider = "africastalking"
        base_url = "{base}"
        username = "otpd"
        api_key = "test-key"

        [[routes]]
        id = 3
        provider = "console"
        "#,
        base = server.uri()
    ))
    .unwrap();
    let routing = RoutingSettings::default();
    let sandbox = Arc::new(otpd::sms::ConsoleProvider);
    let routes = build_routes(&config.routes, &routing, &client(), sandbox.clone()).unwrap();
    let router = SmsRouter::new(
        routes,
        Route::new(0, sandbox),
        &routing,
        Arc::new(otpd::clock::ManualClock::default()),
    );

    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let to = number();
    let code = Code::parse(CODE).unwrap();
    let attempts = {
        let _guard = tracing::subscriber::set_default(subscriber);
        let chain = router.plan(&[], None, true, false, to.country()).unwrap();
        router
            .deliver(
                &chain,
                &DeliveryRequest {
                    tenant: "acme",
                    verification_id: Uuid::new_v4(),
                    to: &to,
                    code: &code,
                    locale: None,
                    ttl: Duration::from_secs(300),
                },
            )
            .await
    };
    assert_eq!(attempts.len(), 3);
    assert!(attempts[2].result.is_ok());

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("console provider"), "nothing captured:\n{log}");
    assert!(
        log.contains("SMS route failed"),
        "failures not logged:\n{log}"
    );
    assert!(log.contains("0670"), "masked number missing:\n{log}");
    assert!(!log.contains(CODE), "code leaked:\n{log}");
    assert!(!log.contains("651860670"), "number leaked:\n{log}");
    for attempt in &attempts[..2] {
        let err = attempt.result.as_ref().unwrap_err();
        super::assert_safe(err);
    }
}
