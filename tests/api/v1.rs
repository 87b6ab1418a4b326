//! The native API, end to end over HTTP.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, expect_error, parts, wrong};

const NL: &str = "+31651860670";

fn code_of(body: &Value) -> String {
    body["debug_code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn send_answers_201_with_the_documented_fields() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/verifications",
            json!({ "to": "31651860670", "purpose": "Login" }),
        )
        .await;
    let (status, body) = parts(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["status"], "pending");
    assert_eq!(body["to"], "+*******0670");
    assert_eq!(body["purpose"], "login");
    assert_eq!(body["expires_in_seconds"], 300);
    assert_eq!(body["resend_after_seconds"], 30);
    assert_eq!(body["attempts_left"], 5);
    assert_eq!(body["delivery"]["provider"], "sandbox");
    assert_eq!(body["delivery"]["status"], "delivered");
    assert!(body["delivery"]["provider_message_id"].is_string());
    assert!(body["id"].as_str().unwrap().len() == 36);
    assert!(body["expires_at"].is_string());
    assert_eq!(code_of(&body).len(), 6);
}

#[tokio::test]
async fn debug_code_is_absent_unless_enabled() {
    let app = TestApp::spawn_with(|s| s.debug_codes = false).await;
    let body = app.send_to(NL).await;
    assert!(body.get("debug_code").is_none(), "{body}");
}

#[tokio::test]
async fn the_sandbox_inbox_receives_the_code() {
    let app = TestApp::spawn().await;
    let body = app.send_to(NL).await;
    let code = code_of(&body);
    app.send_to("+256700123456").await;

    let (status, inbox) = parts(app.get("/v1/sandbox/messages?to=%2B31651860670").await).await;
    assert_eq!(status, StatusCode::OK);
    let messages = inbox["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["to"], "+*******0670");
    assert_eq!(
        messages[0]["body"],
        format!("Your verification code is {code}.")
    );

    let (_, all) = parts(app.get("/v1/sandbox/messages").await).await;
    let all = all["messages"].as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["to"], "+********3456", "newest first");

    let other = app.new_key("globex").await;
    let (_, theirs) = parts(app.get_as(&other, "/v1/sandbox/messages").await).await;
    assert_eq!(theirs["messages"], json!([]), "another tenant sees nothing");
}

#[tokio::test]
async fn the_right_code_approves_once() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let check = json!({ "id": id, "code": code_of(&sent) });
    let (status, body) = parts(app.post("/v1/verifications/check", check.clone()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["valid"], true);
    assert_eq!(body["status"], "approved");
    expect_error(
        app.post("/v1/verifications/check", check).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(v["status"], "approved");
}

#[tokio::test]
async fn check_by_phone_and_purpose_or_by_uid() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/verifications",
            json!({ "to": NL, "purpose": "signup" }),
        )
        .await;
    let sent: Value = r.json().await.unwrap();
    let by_phone = json!({ "to": "31651860670", "purpose": "signup", "code": code_of(&sent) });
    // Same number, other purpose: a different subject.
    let other_purpose = json!({ "to": NL, "purpose": "login", "code": code_of(&sent) });
    expect_error(
        app.post("/v1/verifications/check", other_purpose).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let (_, body) = parts(app.post("/v1/verifications/check", by_phone).await).await;
    assert_eq!(body["valid"], true);

    let r = app
        .post("/v1/verifications", json!({ "to": NL, "uid": "user-42" }))
        .await;
    let sent: Value = r.json().await.unwrap();
    assert_eq!(sent["uid"], "user-42");
    let (_, body) = parts(
        app.post(
            "/v1/verifications/check",
            json!({ "uid": "user-42", "code": code_of(&sent) }),
        )
        .await,
    )
    .await;
    assert_eq!(body["valid"], true);
}

#[tokio::test]
async fn wrong_guesses_count_down_then_the_verification_is_dead() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let code = code_of(&sent);
    for left in (1..5).rev() {
        let (status, body) = parts(
            app.post(
                "/v1/verifications/check",
                json!({ "id": id, "code": wrong(&code) }),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({ "valid": false, "status": "pending", "id": id, "attempts_left": left })
        );
    }
    let (_, last) = parts(
        app.post(
            "/v1/verifications/check",
            json!({ "id": id, "code": wrong(&code) }),
        )
        .await,
    )
    .await;
    assert_eq!(last["status"], "max_attempts");
    assert_eq!(last["attempts_left"], 0);
    let r = app
        .post("/v1/verifications/check", json!({ "id": id, "code": code }))
        .await;
    // Like every 429, it says when to come back: a new code can be sent
    // once the cooldown since the last send is over (30 s at most).
    assert_eq!(r.headers()["retry-after"], "30");
    let body = expect_error(r, StatusCode::TOO_MANY_REQUESTS, "max_attempts").await;
    assert_eq!(body["error"]["retry_after_seconds"], 30, "{body}");
    expect_error(
        app.post("/v1/verifications/check", json!({ "to": NL, "code": code }))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "max_attempts",
    )
    .await;
    let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(v["status"], "max_attempts");
}

#[tokio::test]
async fn cooldown_then_resend_replaces_the_code_and_keeps_attempts() {
    let app = TestApp::spawn().await;
    let first = app.send_to(NL).await;
    let id = first["id"].as_str().unwrap();
    let old_code = code_of(&first);
    app.post(
        "/v1/verifications/check",
        json!({ "id": id, "code": wrong(&old_code) }),
    )
    .await;

    app.advance(10);
    let r = app.post("/v1/verifications", json!({ "to": NL })).await;
    assert_eq!(r.headers()["retry-after"], "20");
    let body = expect_error(r, StatusCode::TOO_MANY_REQUESTS, "cooldown").await;
    assert_eq!(body["error"]["retry_after_seconds"], 20);

    app.advance(20);
    let second = app.send_to(NL).await;
    assert_eq!(second["id"], id, "a resend keeps the verification");
    assert_eq!(
        second["attempts_left"], 4,
        "a resend never restores spent attempts"
    );
    assert_eq!(second["send_count"], 2);
    let new_code = code_of(&second);
    if new_code != old_code {
        let (_, body) = parts(
            app.post(
                "/v1/verifications/check",
                json!({ "id": id, "code": old_code }),
            )
            .await,
        )
        .await;
        assert_eq!(body["valid"], false, "the old code was replaced");
    }
    let (_, body) = parts(
        app.post(
            "/v1/verifications/check",
            json!({ "id": id, "code": new_code }),
        )
        .await,
    )
    .await;
    assert_eq!(body["valid"], true);
}

#[tokio::test]
async fn sends_per_window_are_limited() {
    let app = TestApp::spawn_with(|s| {
        s.policy.max_sends_per_window = 2;
        s.policy.cooldown_seconds = 1;
    })
    .await;
    app.send_to(NL).await;
    app.advance(1);
    app.send_to(NL).await;
    app.advance(1);
    let r = app.post("/v1/verifications", json!({ "to": NL })).await;
    assert_eq!(r.headers()["retry-after"], "598");
    let body = expect_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(body["error"]["limit"], "subject_sends_per_window");
}

#[tokio::test]
async fn codes_expire_after_their_ttl() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    app.advance(300);
    expect_error(
        app.post(
            "/v1/verifications/check",
            json!({ "id": id, "code": code_of(&sent) }),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(v["status"], "expired");
}

#[tokio::test]
async fn a_locale_is_a_language_tag() {
    let app = TestApp::spawn().await;
    for (i, good) in ["fr", "pt-BR", "zh_Hant", "sr-Latn-RS"].iter().enumerate() {
        let r = app
            .post(
                "/v1/verifications",
                json!({ "to": NL, "uid": format!("u{i}"), "locale": good }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "{good}");
    }
    // Kept with the verification for a re-send, so held to a tag's shape.
    for bad in ["", "fr;DROP", "x".repeat(36).as_str(), "fr\n", "é"] {
        let r = app
            .post("/v1/verifications", json!({ "to": NL, "locale": bad }))
            .await;
        let body = expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("locale"),
            "{bad:?}: {body}"
        );
    }
}

#[tokio::test]
async fn per_request_ttl_and_code_length_within_bounds() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/verifications",
            json!({ "to": NL, "code_length": 8, "ttl_seconds": 60 }),
        )
        .await;
    let (status, body) = parts(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(code_of(&body).len(), 8);
    assert_eq!(body["expires_in_seconds"], 60);
    for bad in [
        json!({ "to": NL, "code_length": 3 }),
        json!({ "to": NL, "ttl_seconds": 999_999 }),
    ] {
        expect_error(
            app.post("/v1/verifications", bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
}

#[tokio::test]
async fn cancel_ends_a_pending_verification() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let (status, body) = parts(
        app.post(&format!("/v1/verifications/{id}/cancel"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "canceled");
    expect_error(
        app.post(
            "/v1/verifications/check",
            json!({ "id": id, "code": code_of(&sent) }),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post(&format!("/v1/verifications/{id}/cancel"), json!({}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn get_shows_every_delivery_attempt() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let (status, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "pending");
    assert_eq!(v["to"], "+*******0670");
    assert_eq!(v["country"], "NL");
    let deliveries = v["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0]["provider"], "sandbox");
    let message_id = deliveries[0]["message_id"].as_str().unwrap();
    let (status, m) = parts(app.get(&format!("/v1/messages/{message_id}")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m["status"], "delivered");
}

/// Time-ordered ids keep the SQL stores' id indexes appending, not writing a
/// random page on every send (BENCHMARKS.md, "UUIDv7 ids").
#[tokio::test]
async fn verification_and_message_ids_are_uuid_v7() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    let message_id = v["deliveries"][0]["message_id"].as_str().unwrap();
    for text in [id, message_id] {
        let uuid = uuid::Uuid::parse_str(text).unwrap();
        assert_eq!(uuid.get_version_num(), 7, "{text}");
    }
}

#[tokio::test]
async fn another_tenants_ids_look_exactly_like_unknown_ids() {
    let app = TestApp::spawn().await;
    let sent = app.send_to(NL).await;
    let id = sent["id"].as_str().unwrap();
    let message_id = {
        let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
        v["deliveries"][0]["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let other = app.new_key("globex").await;
    let unknown = uuid::Uuid::new_v4();
    let theirs = app.get_as(&other, &format!("/v1/verifications/{id}")).await;
    let missing = app
        .get_as(&other, &format!("/v1/verifications/{unknown}"))
        .await;
    let (s1, b1) = parts(theirs).await;
    let (s2, b2) = parts(missing).await;
    assert_eq!((s1, &b1), (s2, &b2));
    assert_eq!(s1, StatusCode::NOT_FOUND);
    expect_error(
        app.get_as(&other, &format!("/v1/messages/{message_id}"))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post_as(
            &other,
            "/v1/verifications/check",
            json!({ "id": id, "code": code_of(&sent) }),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post_as(
            &other,
            "/v1/verifications/check",
            json!({ "to": NL, "code": code_of(&sent) }),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.post_as(&other, &format!("/v1/verifications/{id}/cancel"), json!({}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // The owner is unaffected: no attempt was spent by the other tenant.
    let (_, body) = parts(
        app.post(
            "/v1/verifications/check",
            json!({ "id": id, "code": code_of(&sent) }),
        )
        .await,
    )
    .await;
    assert_eq!(body["valid"], true);
}

#[tokio::test]
async fn auth_accepts_both_headers_and_rejects_everything_else() {
    let app = TestApp::spawn().await;
    let url = format!("{}/v1/sandbox/messages", app.base);
    let bearer = app
        .client
        .get(&url)
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    let none = app.client.get(&url).send().await.unwrap();
    expect_error(none, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let bad = app
        .client
        .get(&url)
        .header("x-api-key", "otpd_nope")
        .send()
        .await
        .unwrap();
    expect_error(bad, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let basic = app
        .client
        .get(&url)
        .header("authorization", format!("Basic {}", app.key))
        .send()
        .await
        .unwrap();
    expect_error(basic, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn a_revoked_key_stops_working() {
    let app = TestApp::spawn().await;
    let key = app.new_key("initech").await;
    assert_eq!(
        app.get_as(&key, "/v1/sandbox/messages").await.status(),
        StatusCode::OK
    );
    let id = app
        .state
        .keys
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.tenant == "initech")
        .unwrap()
        .id;
    assert!(app.state.keys.revoke(&id).await.unwrap());
    expect_error(
        app.get_as(&key, "/v1/sandbox/messages").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
}

#[tokio::test]
async fn malformed_requests_get_the_error_shape_never_a_5xx() {
    let app = TestApp::spawn().await;
    let url = format!("{}/v1/verifications", app.base);
    let raw = |body: &'static str, content_type: &'static str| {
        app.client
            .post(&url)
            .header("x-api-key", &app.key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    expect_error(
        raw("{", "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        raw("to=1", "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        raw(r#"{"to": 5}"#, "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let unknown = expect_error(
        raw(
            r#"{"to": "+31651860670", "colour": "red"}"#,
            "application/json",
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    assert!(
        unknown["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    expect_error(
        raw(r#"{"to": "12"}"#, "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_phone",
    )
    .await;
    expect_error(
        raw(r#"{"to": "+99912345678"}"#, "application/json")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_phone",
    )
    .await;

    let big = format!(
        r#"{{"to": "+31651860670", "purpose": "{}"}}"#,
        "a".repeat(17 * 1024)
    );
    let r = app
        .client
        .post(&url)
        .header("x-api-key", &app.key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    expect_error(
        app.get("/v1/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        app.get("/v1/verifications/check").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    expect_error(
        app.get("/v1/verifications/not-a-uuid").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // Dates chrono reads but whose arithmetic would leave its range.
    for query in [
        "to=-262143-01-15",
        "from=-262143-01-01&to=2026-01-01",
        "to=+99999-01-01",
    ] {
        expect_error(
            app.get(&format!("/v1/usage?{query}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
    // Percent-encoded bytes that are not UTF-8 name nothing either.
    for path in [
        "/v1/verifications/%FF",
        "/v1/verifications/%C3%28/cancel",
        "/v1/dlr/twilio/%FF",
    ] {
        let r = if path.starts_with("/v1/dlr") || path.ends_with("/cancel") {
            app.post(path, json!({})).await
        } else {
            app.get(path).await
        };
        expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    }
    expect_error(
        app.get("/v1/sandbox/messages?limit=abc").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        app.post("/v1/verifications/check", json!({ "code": "123456" }))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    expect_error(
        app.post(
            "/v1/verifications/check",
            json!({ "to": "+31651860670", "code": "12ab56" }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn hostile_bodies_never_yield_a_5xx() {
    let app = TestApp::spawn().await;
    let hostile = [
        "null",
        "[]",
        "\"x\"",
        "1e999",
        "{\"to\": null}",
        "{\"to\": \"\\u0000\"}",
        "{\"to\": \"+31651860670\", \"purpose\": \"\\n\"}",
        "{\"to\": \"+31651860670\", \"code_length\": -1}",
        "{\"to\": \"+31651860670\", \"ttl_seconds\": 1e10}",
        "{\"to\": \"+31651860670\", \"uid\": \"\"}",
        "{\"to\": \"+31651860670\", \"route_id\": 4294967296}",
        "{\"to\": {\"$gt\": \"\"}}",
        "{\"to\": \"+316518606701234567890\"}",
        "{\"to\": \"\u{202e}+31651860670\"}",
    ];
    let mut deep = String::new();
    for _ in 0..5000 {
        deep.push('[');
    }
    for path in ["/v1/verifications", "/v1/verifications/check"] {
        for body in hostile.iter().map(|s| s.to_string()).chain([deep.clone()]) {
            let r = app
                .client
                .post(format!("{}{path}", app.base))
                .header("x-api-key", &app.key)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert!(status.is_client_error(), "{path} {body:.60} -> {status}");
            let (_, b) = parts(r).await;
            assert!(b["error"]["code"].is_string());
        }
    }
}

#[tokio::test]
async fn health_reports_version_and_store() {
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
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["store"]["reachable"], true);
    assert!(body["active_otps"].is_u64());
}
