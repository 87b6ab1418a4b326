//! The BridgeX-style API, end to end over HTTP: every documented request and
//! answer of the BridgeXAPI FastAPI OTP server, byte for byte.

use std::sync::Arc;

use async_trait::async_trait;
use otpd::sms::config::CountryRouting;
use otpd::sms::{OutgoingSms, ProviderError, ProviderErrorKind, Route, SendReceipt, SmsProvider};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, parts, raw, wrong};

const PHONE: &str = "31651860670";

fn readme_send() -> Value {
    json!({ "phone_number": PHONE, "purpose": "login", "route_id": 3 })
}

/// Sends the README's request and returns the code.
async fn send(app: &TestApp) -> String {
    let (status, body) = parts(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["debug_code"].as_str().unwrap().to_owned()
}

async fn verify(app: &TestApp, code: &str) -> (StatusCode, String) {
    verify_typed(app, PHONE, code).await
}

/// A verify of the number as `phone_number` types it.
async fn verify_typed(app: &TestApp, phone_number: &str, code: &str) -> (StatusCode, String) {
    let (status, _, text) = raw(app
        .post_bearer(
            "/verify-otp",
            json!({ "phone_number": phone_number, "code": code, "purpose": "login" }),
        )
        .await)
    .await;
    (status, text)
}

fn detail(text: &str) -> String {
    json!({ "detail": text }).to_string()
}

#[tokio::test]
async fn the_readme_send_answers_exactly_the_documented_body() {
    let app = TestApp::spawn().await;
    let (status, headers, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["content-type"], "application/json");
    let body: Value = serde_json::from_str(&text).unwrap();
    let code = body["debug_code"].as_str().unwrap();
    let bx = body["bx_message_id"].as_str().unwrap();
    let order = body["order_id"].as_str().unwrap();
    assert_eq!(code.len(), 6);
    assert!(code.bytes().all(|b| b.is_ascii_digit()));
    // Field order, types and nulls as the original serialises them.
    assert_eq!(
        text,
        format!(
            r#"{{"status":"otp_sent","phone_number":"*******0670","purpose":"login","route_id":3,"expires_in_seconds":300,"cooldown_seconds":45,"debug_code":"{code}","bx_message_id":"{bx}","order_id":"{order}","delivery_status_url":null}}"#
        )
    );
    // In the sandbox the order id is otpd's message id, so the delivery can be looked up.
    let (status, message) = parts(app.get(&format!("/v1/messages/{order}")).await).await;
    assert_eq!(status, StatusCode::OK, "{message}");
    assert_eq!(message["provider_message_id"], bx);
    assert_eq!(message["provider"], "sandbox");
    // The code really went out.
    assert_eq!(app.inbox_code("+31651860670").await, code);
}

#[tokio::test]
async fn the_readme_verify_answers_exactly_the_documented_body_once() {
    let app = TestApp::spawn().await;
    let code = send(&app).await;
    let (status, text) = verify(&app, &code).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"status":"otp_verified","phone_number":"*******0670","purpose":"login","verified":true}"#
    );
    let (status, text) = verify(&app, &code).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        text,
        detail("No active OTP found for this phone number and purpose.")
    );
}

#[tokio::test]
async fn defaults_trimming_and_lower_casing_follow_the_original() {
    // A dozen sends to one number: above the default per-number limit.
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_number_10min = 0).await;
    let (status, body) = parts(
        app.post_bearer("/send-otp", json!({ "phone_number": " 256700123456 " }))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["phone_number"], "********3456");
    assert_eq!(body["purpose"], "login");
    assert_eq!(body["route_id"], 3, "dialects.bridgex.default_route_id");

    // Purpose is a separate subject; "  SignUp " is "signup"; route ids 1..8 all
    // reach the sandbox when no routes are configured.
    for route_id in 1..=8 {
        let purpose = format!("  SignUp{route_id} ");
        let (status, body) = parts(
            app.post_bearer(
                "/send-otp",
                json!({ "phone_number": PHONE, "purpose": purpose, "route_id": route_id }),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["purpose"], format!("signup{route_id}"));
        assert_eq!(body["route_id"], route_id);
    }
    // pydantic's lax int: "5" is 5.
    let (status, body) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": PHONE, "purpose": "lax", "route_id": "5" }),
        )
        .await,
    )
    .await;
    assert_eq!((status, &body["route_id"]), (StatusCode::OK, &json!(5)));

    let code = app.inbox_code("+256700123456").await;
    let (status, text) = parts(
        app.post_bearer(
            "/verify-otp",
            json!({ "phone_number": "256700123456 ", "code": format!(" {code} "), "purpose": " LOGIN" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

#[tokio::test]
async fn debug_code_is_null_unless_debug_codes_are_on() {
    let app = TestApp::spawn_with(|s| s.debug_codes = false).await;
    let (status, body) = parts(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["debug_code"], Value::Null);
    assert!(body.as_object().unwrap().contains_key("debug_code"));
}

#[tokio::test]
async fn auth_takes_bearer_or_x_api_key_and_refuses_everything_else() {
    let app = TestApp::spawn().await;
    let url = format!("{}/send-otp", app.base);
    let unauthorized = detail("Unauthorized.");

    let (status, _, _) = raw(app.post("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK, "x-api-key works too");

    for headers in [
        vec![],
        vec![("authorization", "Bearer otpd_wrong".to_owned())],
        vec![("x-api-key", "otpd_wrong".to_owned())],
        vec![("authorization", format!("Basic {}", app.key))],
        vec![("authorization", app.key.clone())],
    ] {
        let mut req = app.client.post(&url).json(&readme_send());
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let (status, _, text) = raw(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(text, unauthorized);
    }
    let (status, _, text) = raw(app
        .client
        .post(format!("{}/verify-otp", app.base))
        .json(&json!({ "phone_number": PHONE, "code": "123456" }))
        .send()
        .await
        .unwrap())
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, unauthorized.as_str())
    );
    let (status, _, text) = raw(app
        .client
        .get(format!("{}/config", app.base))
        .send()
        .await
        .unwrap())
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, unauthorized.as_str())
    );
}

#[tokio::test]
async fn config_reports_the_dialect_policy() {
    let app = TestApp::spawn().await;
    let (status, _, text) = raw(app
        .client
        .get(format!("{}/config", app.base))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap())
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        text,
        r#"{"otp_length":6,"otp_ttl_seconds":300,"otp_send_cooldown_seconds":45,"otp_max_attempts":5,"default_route_id":3,"default_caller_id":"BRIDGEXAPI","debug_otp":true}"#
    );
}

#[tokio::test]
async fn dialect_overrides_apply_and_show_in_config() {
    let app = TestApp::spawn_with(|s| {
        let p = &mut s.dialects.bridgex.policy;
        p.insert("cooldown_seconds".into(), json!(60));
        p.insert("code_length".into(), json!(8));
        s.dialects.bridgex.default_route_id = 7;
        s.debug_codes = false;
    })
    .await;
    let (_, config) = parts(app.get("/config").await).await;
    assert_eq!(
        config,
        json!({
            "otp_length": 8, "otp_ttl_seconds": 300, "otp_send_cooldown_seconds": 60,
            "otp_max_attempts": 5, "default_route_id": 7, "default_caller_id": "BRIDGEXAPI",
            "debug_otp": false,
        })
    );
    let (_, body) = parts(
        app.post_bearer("/send-otp", json!({ "phone_number": PHONE }))
            .await,
    )
    .await;
    assert_eq!(
        (&body["route_id"], &body["cooldown_seconds"]),
        (&json!(7), &json!(60))
    );
    assert_eq!(app.inbox_code("+31651860670").await.len(), 8);
    let (status, _, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text,
        detail("OTP was sent too recently. Retry in 60 seconds.")
    );
}

/// (request body, expected `detail` list) for `/send-otp`.
fn send_validation_cases() -> Vec<(Value, Value)> {
    let field = |name: &str, kind: &str, msg: &str, input: Value| json!({ "type": kind, "loc": ["body", name], "msg": msg, "input": input });
    let value_error = |name: &str, msg: &str, input: Value| json!({ "type": "value_error", "loc": ["body", name], "msg": format!("Value error, {msg}"), "input": input, "ctx": { "error": {} } });
    vec![
        (
            json!({ "purpose": "login" }),
            json!([field(
                "phone_number",
                "missing",
                "Field required",
                json!({ "purpose": "login" })
            )]),
        ),
        (
            json!({ "phone_number": "+31651860670" }),
            json!([value_error(
                "phone_number",
                "phone_number must contain digits only.",
                json!("+31651860670")
            )]),
        ),
        (
            json!({ "phone_number": "3165 1860670" }),
            json!([value_error(
                "phone_number",
                "phone_number must contain digits only.",
                json!("3165 1860670")
            )]),
        ),
        (
            json!({ "phone_number": "316518606" }),
            json!([value_error(
                "phone_number",
                "phone_number must usually be between 10 and 15 digits.",
                json!("316518606")
            )]),
        ),
        (
            json!({ "phone_number": "3165186067012345" }),
            json!([value_error(
                "phone_number",
                "phone_number must usually be between 10 and 15 digits.",
                json!("3165186067012345")
            )]),
        ),
        (
            json!({ "phone_number": 31651860670u64 }),
            json!([field(
                "phone_number",
                "string_type",
                "Input should be a valid string",
                json!(31651860670u64)
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "purpose": "   " }),
            json!([value_error(
                "purpose",
                "purpose cannot be empty.",
                json!("   ")
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "purpose": "x".repeat(51) }),
            json!([value_error(
                "purpose",
                "purpose must be 50 characters or less.",
                json!("x".repeat(51))
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "purpose": null }),
            json!([field(
                "purpose",
                "string_type",
                "Input should be a valid string",
                Value::Null
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "route_id": 0 }),
            json!([{ "type": "greater_than_equal", "loc": ["body", "route_id"], "msg": "Input should be greater than or equal to 1", "input": 0, "ctx": { "ge": 1 } }]),
        ),
        (
            json!({ "phone_number": PHONE, "route_id": 9 }),
            json!([{ "type": "less_than_equal", "loc": ["body", "route_id"], "msg": "Input should be less than or equal to 8", "input": 9, "ctx": { "le": 8 } }]),
        ),
        (
            json!({ "phone_number": PHONE, "route_id": "three" }),
            json!([field(
                "route_id",
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
                json!("three")
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "route_id": 2.5 }),
            json!([field(
                "route_id",
                "int_from_float",
                "Input should be a valid integer, got a number with a fractional part",
                json!(2.5)
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "route_id": null }),
            json!([field(
                "route_id",
                "int_type",
                "Input should be a valid integer",
                Value::Null
            )]),
        ),
        (
            // Every error at once, in the model's field order.
            json!({ "phone_number": "abc", "purpose": "", "route_id": 42 }),
            json!([
                value_error("phone_number", "phone_number must contain digits only.", json!("abc")),
                value_error("purpose", "purpose cannot be empty.", json!("")),
                { "type": "less_than_equal", "loc": ["body", "route_id"], "msg": "Input should be less than or equal to 8", "input": 42, "ctx": { "le": 8 } },
            ]),
        ),
        (
            // Beyond the original: the number must exist in its numbering plan.
            json!({ "phone_number": "99912345678" }),
            json!([value_error(
                "phone_number",
                "phone_number is not a valid number in its country's numbering plan.",
                json!("99912345678")
            )]),
        ),
        (
            json!(["31651860670"]),
            json!([{ "type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from", "input": ["31651860670"] }]),
        ),
        (
            Value::Null,
            json!([{ "type": "missing", "loc": ["body"], "msg": "Field required", "input": null }]),
        ),
    ]
}

#[tokio::test]
async fn send_validation_failures_have_fastapis_422_shape() {
    let app = TestApp::spawn().await;
    for (body, expected) in send_validation_cases() {
        let (status, got) = parts(app.post_bearer("/send-otp", body.clone()).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(got, json!({ "detail": expected }), "{body}");
    }
    // Like the original, the body is validated before the key is checked.
    let (status, got) = parts(
        app.post_raw("/send-otp", &[("content-type", "application/json")], b"{}")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(got["detail"][0]["loc"], json!(["body", "phone_number"]));
    // Nothing was sent by any of them.
    let (_, inbox) = parts(app.get("/v1/sandbox/messages").await).await;
    assert_eq!(inbox["messages"], json!([]));
}

#[tokio::test]
async fn verify_validation_failures_have_fastapis_422_shape() {
    let app = TestApp::spawn().await;
    let value_error = |name: &str, msg: &str, input: Value| json!({ "type": "value_error", "loc": ["body", name], "msg": format!("Value error, {msg}"), "input": input, "ctx": { "error": {} } });
    let cases = [
        (
            json!({ "phone_number": PHONE }),
            json!([{ "type": "missing", "loc": ["body", "code"], "msg": "Field required", "input": { "phone_number": PHONE } }]),
        ),
        (
            json!({ "phone_number": PHONE, "code": "12a456" }),
            json!([value_error(
                "code",
                "code must be numeric.",
                json!("12a456")
            )]),
        ),
        (
            json!({ "phone_number": PHONE, "code": "" }),
            json!([value_error("code", "code must be numeric.", json!(""))]),
        ),
        (
            json!({ "phone_number": PHONE, "code": 123456 }),
            json!([{ "type": "string_type", "loc": ["body", "code"], "msg": "Input should be a valid string", "input": 123456 }]),
        ),
        (
            json!({ "phone_number": "+31651860670", "code": "123456", "purpose": " " }),
            json!([
                value_error(
                    "phone_number",
                    "phone_number must contain digits only.",
                    json!("+31651860670")
                ),
                value_error("purpose", "purpose cannot be empty.", json!(" ")),
            ]),
        ),
    ];
    for (body, expected) in cases {
        let (status, got) = parts(app.post_bearer("/verify-otp", body.clone()).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(got, json!({ "detail": expected }), "{body}");
    }
}

#[tokio::test]
async fn unreadable_bodies_get_fastapis_answers() {
    let app = TestApp::spawn().await;
    let auth = format!("Bearer {}", app.key);
    let json_headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    // Python's json module: the character offset of the error and its reason.
    let (status, got) = parts(
        app.post_raw("/send-otp", &json_headers, br#"{"phone_number": }"#)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        got,
        json!({ "detail": [{ "type": "json_invalid", "loc": ["body", 17], "msg": "JSON decode error", "input": {}, "ctx": { "error": "Expecting value" } }] })
    );
    let (status, got) = parts(app.post_raw("/send-otp", &json_headers, b"").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        got,
        json!({ "detail": [{ "type": "missing", "loc": ["body"], "msg": "Field required", "input": null }] })
    );
    // No content type: FastAPI still reads JSON.
    let (status, _) = parts(
        app.post_raw(
            "/send-otp",
            &[("authorization", auth.as_str())],
            br#"{"phone_number": "31651860670"}"#,
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Another content type: the raw text reaches the model and is refused.
    let (status, got) = parts(
        app.post_raw(
            "/verify-otp",
            &[
                ("content-type", "text/plain"),
                ("authorization", auth.as_str()),
            ],
            b"phone_number=31651860670",
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        got,
        json!({ "detail": [{ "type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from", "input": "phone_number=31651860670" }] })
    );
    let (status, got) = parts(
        app.client
            .get(format!("{}/send-otp", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(got, json!({ "detail": "Method Not Allowed" }));
}

#[tokio::test]
async fn cooldown_counts_down_then_a_resend_replaces_the_code() {
    let app = TestApp::spawn().await;
    let first = send(&app).await;
    let (status, headers, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text,
        detail("OTP was sent too recently. Retry in 45 seconds.")
    );
    assert_eq!(headers["retry-after"], "45");
    app.advance(20);
    let (status, _, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text,
        detail("OTP was sent too recently. Retry in 25 seconds.")
    );
    // Another purpose is another subject: no cooldown.
    let (status, _) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": PHONE, "purpose": "reset" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    app.advance(25);
    let second = send(&app).await;
    if second != first {
        let (status, text) = verify(&app, &first).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(text, detail("Invalid OTP. Attempts left: 4"));
    }
    let (status, _) = verify(&app, &second).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_codes_count_down_and_spent_attempts_keep_the_cooldown() {
    let app = TestApp::spawn().await;
    let code = send(&app).await;
    // Any digit string is a guess, as in the original: even one too short to be right.
    let (status, text) = verify(&app, "123").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(text, detail("Invalid OTP. Attempts left: 4"));
    for left in (0..4).rev() {
        let (status, text) = verify(&app, &wrong(&code)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(text, detail(&format!("Invalid OTP. Attempts left: {left}")));
    }
    let (status, headers, text) = raw(app
        .post_bearer(
            "/verify-otp",
            json!({ "phone_number": PHONE, "code": code, "purpose": "login" }),
        )
        .await)
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(text, detail("OTP attempts exceeded."));
    // Every 429 says when to retry: a new code after the dialect's cooldown.
    assert_eq!(headers["retry-after"], "45");

    // Unlike the original, a dead verification does not lift the cooldown.
    let (status, _, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text,
        detail("OTP was sent too recently. Retry in 45 seconds.")
    );
    app.advance(45);
    let fresh = send(&app).await;
    let (status, _) = verify(&app, &fresh).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn spent_attempts_do_not_reset_the_send_window() {
    // The subject's window, not the (sliding) per-number limit, is under test.
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_number_10min = 0).await;
    let mut code = String::new();
    for _ in 0..5 {
        code = send(&app).await;
        app.advance(45);
    }
    for _ in 0..5 {
        verify(&app, &wrong(&code)).await;
    }
    // 5 sends in the 600 s window starting at 0; it is now 225 s.
    let (status, headers, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text,
        detail("OTP send limit reached. Retry in 375 seconds.")
    );
    assert_eq!(headers["retry-after"], "375");
    app.advance(375);
    send(&app).await;
}

#[tokio::test]
async fn codes_expire_after_300_seconds() {
    let app = TestApp::spawn().await;
    let code = send(&app).await;
    app.advance(299);
    let (status, _) = parts(
        app.post_bearer(
            "/verify-otp",
            json!({ "phone_number": PHONE, "code": wrong(&code) }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "still alive at 299 s");
    app.advance(2);
    let (status, text) = verify(&app, &code).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        text,
        detail("No active OTP found for this phone number and purpose.")
    );
}

#[tokio::test]
async fn verify_without_a_send_or_for_another_purpose_is_404() {
    let app = TestApp::spawn().await;
    let code = send(&app).await;
    for body in [
        json!({ "phone_number": PHONE, "code": code, "purpose": "signup" }),
        json!({ "phone_number": "256700123456", "code": code }),
        // Digits the original would accept but no plan knows: nothing can be pending.
        json!({ "phone_number": "99912345678", "code": code }),
    ] {
        let (status, _, text) = raw(app.post_bearer("/verify-otp", body).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            text,
            detail("No active OTP found for this phone number and purpose.")
        );
    }
    // Another tenant cannot see it either.
    let other = app.new_key("globex").await;
    let (status, _) = parts(
        app.post_as(
            &other,
            "/verify-otp",
            json!({ "phone_number": PHONE, "code": code }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = verify(&app, &code).await;
    assert_eq!(status, StatusCode::OK);
}

/// A verify finds the code however the number's digits are typed: as sent,
/// after `00`, or with the national trunk prefix after the calling code.
#[tokio::test]
async fn verify_reads_the_number_in_any_form_it_was_sent_to() {
    let app = TestApp::spawn().await;
    let code = send(&app).await;
    let guess = wrong(&code);
    for typed in ["310651860670", "0031651860670"] {
        let (status, text) = verify_typed(&app, typed, &guess).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{typed}: {text}");
        assert!(text.contains("Invalid OTP"), "{typed}: {text}");
    }
    let (status, text) = verify_typed(&app, "00310651860670", &code).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains(r#""verified":true"#), "{text}");
    // Approved under one form, it is gone under every other.
    let (status, _) = verify(&app, &code).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn health_is_the_bridgex_health() {
    let app = TestApp::spawn().await;
    let (status, body) = parts(
        app.client
            .get(format!("{}/health", app.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["service"], "otpd");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["active_otps"].is_u64());
}

// --- With configured routes -------------------------------------------------

struct FakeProvider {
    name: &'static str,
    result: Result<SendReceipt, ProviderError>,
}

#[async_trait]
impl SmsProvider for FakeProvider {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn send(&self, _: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        self.result.clone()
    }
}

fn route(id: u32, name: &'static str, result: Result<SendReceipt, ProviderError>) -> Route {
    Route::new(id, Arc::new(FakeProvider { name, result }))
}

fn bridgexapi_accepts() -> Result<SendReceipt, ProviderError> {
    Ok(SendReceipt {
        provider_message_id: Some("BX-22229-1d5e5779b1904695".into()),
        order_id: Some("22229".into()),
        ..SendReceipt::default()
    })
}

#[tokio::test]
async fn the_default_and_per_country_chains_apply_as_on_v1() {
    let down = Err(ProviderError::new(ProviderErrorKind::Unavailable, "down"));
    let routes = vec![
        route(1, "bridgexapi", down),
        route(2, "bridgexapi", bridgexapi_accepts()),
    ];
    let app = TestApp::spawn_routed(routes, |s| {
        s.policy.routes = vec![1];
        s.routing
            .countries
            .insert("UG".into(), CountryRouting { routes: vec![2] });
    })
    .await;
    // Uganda's chain goes first for its numbers, on every API: route 1, the
    // default chain, is down and never tried.
    let (status, body) = parts(
        app.post("/v1/verifications", json!({ "to": "+256700123457" }))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["delivery"]["route_id"], 2);
    let (status, body) = parts(
        app.post(
            "/webhook/send-otp",
            json!({ "phone": "256700123458", "uid": "0b8f7c2e-6a4e-4f9b-9a51-2f0c7d3e8a10" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // `[policy].routes` is the default chain, not a limit on what may be
    // pinned.
    let (status, body) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": "256700123456", "purpose": "login", "route_id": 2 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["route_id"], 2);
}

#[tokio::test]
async fn a_bridgexapi_route_gives_its_ids_and_the_delivery_status_url() {
    let routes = vec![
        route(3, "bridgexapi", bridgexapi_accepts()),
        route(5, "bridgexapi", bridgexapi_accepts()),
    ];
    let app = TestApp::spawn_routed(routes, |s| {
        s.dialects.bridgex.bridgexapi_base_url = "https://bx.example.test/".into();
        s.dialects
            .bridgex
            .policy
            .insert("routes".into(), json!([3]));
    })
    .await;
    let (status, body) = parts(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bx_message_id"], "BX-22229-1d5e5779b1904695");
    assert_eq!(body["order_id"], "22229");
    assert_eq!(
        body["delivery_status_url"],
        "https://bx.example.test/api/v1/dlr/BX-22229-1d5e5779b1904695"
    );
    assert_eq!(body["route_id"], 3);

    // A route id that is valid for the original but not configured here: 422.
    let (status, got) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": PHONE, "purpose": "other", "route_id": 4 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        got,
        json!({ "detail": [{ "type": "value_error", "loc": ["body", "route_id"], "msg": "Value error, route_id 4 is not a configured route.", "input": 4, "ctx": { "error": {} } }] })
    );
    // Configured, but outside the dialect policy's chain.
    let (status, got) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": PHONE, "purpose": "other", "route_id": 5 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        got["detail"][0]["msg"],
        "Value error, route_id 5 is not allowed."
    );
    // Which routes exist is not told to a caller without a key.
    let (status, _, text) = raw(app
        .client
        .post(format!("{}/send-otp", app.base))
        .json(&json!({ "phone_number": PHONE, "route_id": 4 }))
        .send()
        .await
        .unwrap())
    .await;
    assert_eq!(
        (status, text),
        (StatusCode::UNAUTHORIZED, detail("Unauthorized."))
    );
}

#[tokio::test]
async fn other_providers_give_no_delivery_status_url() {
    let receipt = Ok(SendReceipt {
        provider_message_id: Some("SM123".into()),
        ..SendReceipt::default()
    });
    let app = TestApp::spawn_routed(vec![route(3, "twilio", receipt)], |_| {}).await;
    let (status, body) = parts(app.post_bearer("/send-otp", readme_send()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bx_message_id"], "SM123");
    assert_eq!(body["delivery_status_url"], Value::Null);
    assert!(body["order_id"].is_string());
}

#[tokio::test]
async fn a_failed_send_is_502_without_internals_and_leaves_no_cooldown() {
    let down = Err(ProviderError::new(
        ProviderErrorKind::Unavailable,
        "connect to 10.1.2.3:8443 refused: Connection refused (os error 111)",
    ));
    let app = TestApp::spawn_routed(vec![route(3, "bridgexapi", down)], |_| {}).await;
    for _ in 0..2 {
        let (status, _, text) = raw(app.post_bearer("/send-otp", readme_send()).await).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(text, detail("SMS send failed: unavailable"));
    }
    let (status, text) = verify(&app, "123456").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing stays pending: {text}"
    );
}
