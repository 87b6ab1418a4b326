//! Provider clients against wiremock servers that speak each provider's real
//! wire format (`shared/reference/providers.md`). Loopback only.

mod africastalking;
mod bridgexapi;
mod console;
mod logging;
mod twilio;
mod webhook;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use otpd::domain::PhoneNumber;
use otpd::sms::{OutgoingSms, ProviderError, ProviderErrorKind, SmsProvider, http_client};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

/// What the tests send: a real Dutch mobile number and a code that must never
/// show up in an error message or a log line.
pub const NUMBER: &str = "+31651860670";
pub const CODE: &str = "482916";
pub const BODY: &str = "Your verification code is 482916.";

/// Short enough that a 2 s delayed answer is a timeout, long enough that a
/// loaded CI machine still answers the other tests in time.
pub const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
pub const LONG_TIMEOUT: Duration = Duration::from_secs(5);

pub fn number() -> PhoneNumber {
    PhoneNumber::parse(NUMBER).unwrap()
}

pub fn client() -> reqwest::Client {
    http_client(Duration::from_millis(500), LONG_TIMEOUT).unwrap()
}

pub fn outgoing<'a>(to: &'a PhoneNumber, body: &'a str) -> OutgoingSms<'a> {
    OutgoingSms {
        tenant: "acme",
        verification_id: Uuid::nil(),
        route_id: 1,
        to,
        body,
        ttl: Duration::from_secs(300),
    }
}

pub async fn send(provider: &dyn SmsProvider) -> Result<otpd::sms::SendReceipt, ProviderError> {
    let to = number();
    provider.send(&outgoing(&to, BODY)).await
}

/// The error an operator sees: right kind, and nothing secret in the text.
pub fn assert_failure(
    result: Result<otpd::sms::SendReceipt, ProviderError>,
    kind: ProviderErrorKind,
) -> ProviderError {
    let err = result.expect_err("the send should fail");
    assert_eq!(err.kind, kind, "wrong kind for error {:?}", err.message);
    assert_safe(&err);
    err
}

pub fn assert_safe(err: &ProviderError) {
    for secret in [CODE, "651860670", "127.0.0.1", "test-key", "test-token"] {
        assert!(
            !err.message.contains(secret),
            "error message leaks {secret:?}: {}",
            err.message
        );
    }
    assert!(
        err.message.len() < 200,
        "error message too long: {}",
        err.message
    );
}

/// A loopback URL where nothing listens: the listener is bound to reserve a
/// free port, then closed.
pub async fn refused_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Matches a form-encoded body with exactly these fields.
pub struct FormIs(pub BTreeMap<String, String>);

impl FormIs {
    pub fn new(fields: &[(&str, &str)]) -> Self {
        Self(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl Match for FormIs {
    fn matches(&self, request: &Request) -> bool {
        let is_form = request
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let got: BTreeMap<String, String> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        is_form && got == self.0
    }
}

/// How a provider is built against a base URL, and where it POSTs.
pub struct Target {
    pub make: fn(base: &str, timeout: Duration) -> Box<dyn SmsProvider>,
    pub path: &'static str,
    /// Whether an empty 2xx body or any JSON object is a valid success (the
    /// webhook contract: the gateway is the user's own).
    pub lenient_success: bool,
}

/// Every transport-level failure the issue lists, for one provider.
pub async fn transport_failures(target: Target) {
    let server = MockServer::start().await;
    let base = server.uri();
    let answer = |response: ResponseTemplate| {
        Mock::given(method("POST"))
            .and(path(target.path))
            .respond_with(response)
    };

    // Timeout after connecting: the provider may have the message.
    let _guard = answer(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
        .mount_as_scoped(&server)
        .await;
    let provider = (target.make)(&base, SHORT_TIMEOUT);
    let started = Instant::now();
    let err = assert_failure(send(provider.as_ref()).await, ProviderErrorKind::Timeout);
    assert!(started.elapsed() < Duration::from_millis(1_500), "{err:?}");
    assert!(err.kind.outcome_unknown());
    drop(_guard);

    // The connection closes after the request went out, with no answer: the
    // provider may have the message just as after a timeout.
    let hangs_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_up_base = format!("http://{}", hangs_up.local_addr().unwrap());
    let hang_up = tokio::spawn(async move {
        let (mut conn, _) = hangs_up.accept().await.unwrap();
        let mut request = vec![0; 64 * 1024];
        let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut request).await;
    });
    let provider = (target.make)(&hang_up_base, LONG_TIMEOUT);
    let err = assert_failure(send(provider.as_ref()).await, ProviderErrorKind::Timeout);
    assert!(err.kind.outcome_unknown());
    assert!(err.message.contains("connection lost"), "{}", err.message);
    hang_up.await.unwrap();

    let provider = (target.make)(&base, LONG_TIMEOUT);
    let cases: Vec<(ResponseTemplate, ProviderErrorKind, &str)> = vec![
        (
            ResponseTemplate::new(503).set_body_string("upstream down"),
            ProviderErrorKind::Unavailable,
            "503",
        ),
        (
            ResponseTemplate::new(500).set_body_raw(
                "<html><body>Internal Server Error</body></html>",
                "text/html",
            ),
            ProviderErrorKind::Unavailable,
            "500",
        ),
        (
            ResponseTemplate::new(200).set_body_raw("{\"status\": \"succ", "application/json"),
            ProviderErrorKind::Malformed,
            "not the documented JSON",
        ),
        (
            ResponseTemplate::new(200).set_body_raw(
                "<!DOCTYPE html><html><body>Welcome to nginx!</body></html>",
                "text/html",
            ),
            ProviderErrorKind::Malformed,
            "HTML",
        ),
    ];
    for (response, kind, hint) in cases {
        let _guard = answer(response).mount_as_scoped(&server).await;
        let err = assert_failure(send(provider.as_ref()).await, kind);
        assert!(
            err.message.contains(hint),
            "{hint:?} not in {:?}",
            err.message
        );
    }

    if !target.lenient_success {
        let _guard = answer(ResponseTemplate::new(200))
            .mount_as_scoped(&server)
            .await;
        let err = assert_failure(send(provider.as_ref()).await, ProviderErrorKind::Malformed);
        assert!(err.message.contains("empty body"), "{}", err.message);
        drop(_guard);
        let _guard = answer(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"unexpected": true})),
        )
        .mount_as_scoped(&server)
        .await;
        let err = assert_failure(send(provider.as_ref()).await, ProviderErrorKind::Malformed);
        assert!(
            err.message.contains("not the documented JSON"),
            "{}",
            err.message
        );
    }

    // 429 with Retry-After: the router may try the next route, and callers can
    // see how long this one asked to be left alone.
    let _guard = answer(ResponseTemplate::new(429).insert_header("Retry-After", "17"))
        .mount_as_scoped(&server)
        .await;
    let err = assert_failure(
        send(provider.as_ref()).await,
        ProviderErrorKind::RateLimited,
    );
    assert_eq!(err.retry_after, Some(Duration::from_secs(17)));
    assert!(err.kind.try_next_route() && err.kind.counts_against_route());
    drop(_guard);

    // Nothing listening: nothing was sent, so this is an outage, not a timeout.
    let refused = (target.make)(&refused_url().await, LONG_TIMEOUT);
    let err = assert_failure(send(refused.as_ref()).await, ProviderErrorKind::Unavailable);
    assert!(!err.kind.outcome_unknown());
}
