//! The Openlyne-style API, end to end over HTTP: every documented request and
//! answer of Openlyne's OTP webhooks, byte for byte.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, parts, raw, wrong};

const UID: &str = "123e4567-e89b-12d3-a456-426614174000";
const UG: &str = "+256700123456";

const SENT: &str = r#"{"success":true,"data":{"status":"Sent","number":"256700123456"},"message":"OTP sent successfully","error":null}"#;
const VERIFIED: &str = r#"{"success":true,"data":{"message":"OTP verified successfully","contact_value":"256700123456"},"message":"Verification successful","error":{}}"#;

fn failure(code: &str, message: &str) -> String {
    json!({
        "success": false,
        "data": null,
        "message": message,
        "error": { "code": code, "message": message },
    })
    .to_string()
}

fn invalid_code() -> String {
    failure("invalid_code", "Invalid or expired OTP.")
}

async fn send(app: &TestApp, body: Value) -> (StatusCode, reqwest::header::HeaderMap, String) {
    raw(app.post("/webhook/send-otp", body).await).await
}

async fn verify(app: &TestApp, uid: &str, code: &str) -> (StatusCode, String) {
    let (status, _, text) = raw(app
        .post("/webhook/verify-otp", json!({ "uid": uid, "code": code }))
        .await)
    .await;
    (status, text)
}

#[tokio::test]
async fn the_readme_send_answers_exactly_the_documented_body() {
    let app = TestApp::spawn().await;
    let (status, headers, text) = send(
        &app,
        json!({ "phone": 256700123456u64, "uid": UID, "env": "sandbox" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(text, SENT);
    assert_eq!(app.inbox_code(UG).await.len(), 6);
}

#[tokio::test]
async fn phone_may_be_a_string_and_env_may_be_left_out() {
    let app = TestApp::spawn().await;
    let (status, _, text) = send(&app, json!({ "phone": "256700123456", "uid": UID })).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, SENT));
    let other = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let (status, _, text) = send(&app, json!({ "phone": "+256700123456", "uid": other })).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, SENT),
        "digits as sent"
    );
}

#[tokio::test]
async fn the_readme_verify_answers_exactly_the_documented_body_once() {
    let app = TestApp::spawn().await;
    send(
        &app,
        json!({ "phone": 256700123456u64, "uid": UID, "env": "sandbox" }),
    )
    .await;
    let code = app.inbox_code(UG).await;
    let (status, text) = verify(&app, UID, &code).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, VERIFIED);
    // Verified means gone: the same code again is the wrong-or-expired answer.
    let (status, text) = verify(&app, UID, &code).await;
    assert_eq!((status, text), (StatusCode::BAD_REQUEST, invalid_code()));
}

#[tokio::test]
async fn the_uid_is_compared_in_canonical_form() {
    let app = TestApp::spawn().await;
    send(
        &app,
        json!({ "phone": 256700123456u64, "uid": UID.to_uppercase() }),
    )
    .await;
    let code = app.inbox_code(UG).await;
    let (status, text) = verify(&app, UID, &code).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, VERIFIED));
}

#[tokio::test]
async fn wrong_expired_unknown_and_malformed_codes_answer_identically() {
    let app = TestApp::spawn().await;
    send(&app, json!({ "phone": 256700123456u64, "uid": UID })).await;
    let code = app.inbox_code(UG).await;

    let wrong_answer = verify(&app, UID, &wrong(&code)).await;
    assert_eq!(wrong_answer, (StatusCode::BAD_REQUEST, invalid_code()));
    for malformed in ["12345", "1234567", "12a456", ""] {
        assert_eq!(
            verify(&app, UID, malformed).await,
            wrong_answer,
            "{malformed}"
        );
    }
    let (status, _, text) = raw(app.post("/webhook/verify-otp", json!({ "uid": UID })).await).await;
    assert_eq!((status, text), wrong_answer.clone(), "no code at all");
    let stranger = "0f8fad5b-d9cb-469f-a165-70867728950e";
    assert_eq!(
        verify(&app, stranger, &code).await,
        wrong_answer,
        "never sent"
    );

    app.advance(181);
    assert_eq!(
        verify(&app, UID, &code).await,
        wrong_answer,
        "expired after 180 s"
    );
}

#[tokio::test]
async fn the_code_lives_180_seconds() {
    let app = TestApp::spawn().await;
    send(&app, json!({ "phone": 256700123456u64, "uid": UID })).await;
    let code = app.inbox_code(UG).await;
    app.advance(179);
    let (status, text) = verify(&app, UID, &code).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, VERIFIED));
}

#[tokio::test]
async fn five_wrong_codes_kill_the_verification() {
    let app = TestApp::spawn().await;
    send(&app, json!({ "phone": 256700123456u64, "uid": UID })).await;
    let code = app.inbox_code(UG).await;
    for _ in 0..5 {
        assert_eq!(
            verify(&app, UID, &wrong(&code)).await,
            (StatusCode::BAD_REQUEST, invalid_code())
        );
    }
    assert_eq!(
        verify(&app, UID, &code).await,
        (StatusCode::BAD_REQUEST, invalid_code()),
        "the right code is refused once attempts are spent"
    );
    // And the cooldown still holds: spending attempts does not buy a quick resend.
    let (status, _, _) = send(&app, json!({ "phone": 256700123456u64, "uid": UID })).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_second_send_within_30_seconds_for_the_uid_is_429() {
    let app = TestApp::spawn().await;
    let body = json!({ "phone": 256700123456u64, "uid": UID, "env": "sandbox" });
    send(&app, body.clone()).await;
    let first = app.inbox_code(UG).await;

    let (status, headers, text) = send(&app, body.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(
        text,
        failure(
            "too_many_requests",
            "Please wait 30 seconds before requesting a new OTP."
        )
    );
    app.advance(29);
    let (status, headers, _) = send(&app, body.clone()).await;
    assert_eq!(
        (status, &headers["retry-after"]),
        (StatusCode::TOO_MANY_REQUESTS, &"1".parse().unwrap())
    );

    // The cooldown is per uid: another uid for the same number is not held back.
    let other = json!({ "phone": 256700123456u64, "uid": "0f8fad5b-d9cb-469f-a165-70867728950e" });
    assert_eq!(send(&app, other).await.0, StatusCode::OK);

    app.advance(1);
    let (status, _, text) = send(&app, body).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, SENT));
    let second = app.inbox_code(UG).await;
    if second != first {
        assert_eq!(verify(&app, UID, &first).await.0, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        verify(&app, UID, &second).await,
        (StatusCode::OK, VERIFIED.to_owned())
    );
}

#[tokio::test]
async fn bad_phone_uid_or_env_is_400_with_the_envelope() {
    let app = TestApp::spawn().await;
    let bad_phone = failure(
        "invalid_phone",
        "Invalid phone number. Send digits with the country code, e.g. 256700123456.",
    );
    let bad_uid = failure("invalid_uid", "Invalid uid. It must be a UUID.");
    let bad_env = failure(
        "invalid_env",
        "Invalid env. Use \"sandbox\" or leave it out.",
    );
    let cases = [
        (json!({ "uid": UID }), &bad_phone),
        (json!({ "phone": "256-abc", "uid": UID }), &bad_phone),
        (json!({ "phone": 12345, "uid": UID }), &bad_phone),
        (json!({ "phone": -256700123456i64, "uid": UID }), &bad_phone),
        (json!({ "phone": 256700123456.5, "uid": UID }), &bad_phone),
        (json!({ "phone": "99912345678", "uid": UID }), &bad_phone),
        (json!({ "phone": true, "uid": UID }), &bad_phone),
        (json!({ "phone": 256700123456u64 }), &bad_uid),
        (
            json!({ "phone": 256700123456u64, "uid": "user-42" }),
            &bad_uid,
        ),
        (
            json!({ "phone": 256700123456u64, "uid": "123e4567-e89b-12d3-a456-42661417400" }),
            &bad_uid,
        ),
        (json!({ "phone": 256700123456u64, "uid": 42 }), &bad_uid),
        (
            json!({ "phone": 256700123456u64, "uid": UID, "env": "live" }),
            &bad_env,
        ),
        (
            json!({ "phone": 256700123456u64, "uid": UID, "env": "production" }),
            &bad_env,
        ),
        (
            json!({ "phone": 256700123456u64, "uid": UID, "env": 1 }),
            &bad_env,
        ),
    ];
    for (body, expected) in cases {
        let (status, _, text) = send(&app, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(&text, expected, "{body}");
    }
    let (status, _, text) = raw(app
        .post(
            "/webhook/verify-otp",
            json!({ "uid": "nope", "code": "123456" }),
        )
        .await)
    .await;
    assert_eq!((status, text), (StatusCode::BAD_REQUEST, bad_uid));
    let (_, inbox) = parts(app.get("/v1/sandbox/messages").await).await;
    assert_eq!(inbox["messages"], json!([]), "nothing was sent");
}

#[tokio::test]
async fn malformed_bodies_get_the_envelope_never_a_5xx() {
    let app = TestApp::spawn().await;
    let key = app.key.clone();
    let json_headers = [
        ("content-type", "application/json"),
        ("x-api-key", key.as_str()),
    ];
    for body in [&b"{"[..], b"[]", b"\"x\"", b"null", b"{\"phone\": 25670}{}"] {
        for path in ["/webhook/send-otp", "/webhook/verify-otp"] {
            let (status, body_json) = parts(app.post_raw(path, &json_headers, body).await).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body_json}");
            assert_eq!(body_json["success"], false);
            assert_eq!(body_json["data"], Value::Null);
            assert_eq!(body_json["error"]["code"], "invalid_request");
        }
    }
    let (status, body) = parts(
        app.post_raw("/webhook/send-otp", &[("x-api-key", key.as_str())], b"{}")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    let (status, body) = parts(
        app.client
            .get(format!("{}/webhook/send-otp", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401_before_the_body_is_read() {
    let app = TestApp::spawn().await;
    let unauthorized = failure("unauthorized", "Invalid API key.");
    let good = json!({ "phone": 256700123456u64, "uid": UID });
    for (path, body) in [
        ("/webhook/send-otp", good.clone()),
        (
            "/webhook/verify-otp",
            json!({ "uid": UID, "code": "123456" }),
        ),
        ("/webhook/send-otp", json!({ "phone": "bad" })),
    ] {
        let (status, _, text) = raw(app.post_as("otpd_wrong", path, body.clone()).await).await;
        assert_eq!(
            (status, &text),
            (StatusCode::UNAUTHORIZED, &unauthorized),
            "{path} {body}"
        );
        let (status, _, text) = raw(app
            .client
            .post(format!("{}{path}", app.base))
            .json(&body)
            .send()
            .await
            .unwrap())
        .await;
        assert_eq!(
            (status, &text),
            (StatusCode::UNAUTHORIZED, &unauthorized),
            "{path} no key"
        );
    }
}

#[tokio::test]
async fn a_failed_delivery_is_500_and_leaves_nothing_pending() {
    use std::sync::Arc;

    use async_trait::async_trait;
    use otpd::sms::{
        OutgoingSms, ProviderError, ProviderErrorKind, Route, SendReceipt, SmsProvider,
    };

    struct Down;
    #[async_trait]
    impl SmsProvider for Down {
        fn name(&self) -> &'static str {
            "africastalking"
        }
        async fn send(&self, _: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
            Err(ProviderError::new(
                ProviderErrorKind::Unavailable,
                "HTTP 503 from api.internal",
            ))
        }
    }
    let app = TestApp::spawn_routed(vec![Route::new(1, Arc::new(Down))], |_| {}).await;
    let live = json!({ "phone": 256700123456u64, "uid": UID });
    for _ in 0..2 {
        let (status, _, text) = send(&app, live.clone()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(text, failure("send_failed", "Failed to send OTP."));
    }
    // env: sandbox bypasses the configured routes.
    let (status, _, text) = send(
        &app,
        json!({ "phone": 256700123456u64, "uid": UID, "env": "sandbox" }),
    )
    .await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, SENT));
    let code = app.inbox_code(UG).await;
    assert_eq!(
        verify(&app, UID, &code).await,
        (StatusCode::OK, VERIFIED.to_owned())
    );
}

#[tokio::test]
async fn dialect_overrides_apply() {
    let app = TestApp::spawn_with(|s| {
        s.dialects
            .openlyne
            .policy
            .insert("cooldown_seconds".into(), json!(10));
    })
    .await;
    let body = json!({ "phone": 256700123456u64, "uid": UID });
    send(&app, body.clone()).await;
    let (status, headers, _) = send(&app, body.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "10");
    app.advance(10);
    assert_eq!(send(&app, body).await.0, StatusCode::OK);
}
