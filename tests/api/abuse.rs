//! Abuse protection through the API: every send limit and its Retry-After, the
//! wrong-guess budget across resends, client addresses behind trusted proxies,
//! country rules, the SMS-pumping guard on a synthetic attack, the spend
//! budget, enumeration resistance, the audit log, and the limits across two
//! instances on one shared store.

use std::sync::Arc;

use async_trait::async_trait;
use otpd::config::TenantSettings;
use otpd::sms::{OutgoingSms, ProviderError, Route, SendReceipt, SmsProvider};
use otpd::store::{MemoryStore, Store};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, parts, wrong};
use crate::process::start_otpd_logging;
use crate::scale_out::Shared;

const NL: &str = "+31651860670";

/// Distinct Dutch mobile numbers, all in the prefix +31651.
fn nl(i: u32) -> String {
    format!("+3165186{i:04}")
}

/// Sequential Ugandan numbers, all in the prefix +256700.
fn ug(i: u32) -> String {
    format!("+256700{:06}", 100_000 + i)
}

/// POST /v1/verifications with `body`, as `key`, optionally with an
/// `X-Forwarded-For` header.
async fn send_raw(
    app: &TestApp,
    key: &str,
    body: Value,
    forwarded_for: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = app
        .client
        .post(format!("{}/v1/verifications", app.base))
        .header("x-api-key", key)
        .json(&body);
    if let Some(xff) = forwarded_for {
        req = req.header("x-forwarded-for", xff);
    }
    let r = req.send().await.unwrap();
    let headers = r.headers().clone();
    let (status, body) = parts(r).await;
    (status, headers, body)
}

async fn send(app: &TestApp, body: Value) -> (StatusCode, HeaderMap, Value) {
    send_raw(app, &app.key, body, None).await
}

async fn check(app: &TestApp, key: &str, body: Value) -> (StatusCode, Value) {
    parts(app.post_as(key, "/v1/verifications/check", body).await).await
}

/// Asserts a 429 `rate_limited` naming `limit`, with matching Retry-After
/// header and body field; returns the wait.
fn assert_limited(answer: &(StatusCode, HeaderMap, Value), limit: &str) -> i64 {
    let (status, headers, body) = answer;
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(body["error"]["limit"], limit, "{body}");
    let header: i64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        json!(header),
        body["error"]["retry_after_seconds"],
        "{body}"
    );
    assert!(header >= 1, "{body}");
    header
}

#[test]
fn the_example_config_documents_the_default_policy() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("otpd.example.toml");
    let settings = otpd::config::Settings::load(Some(&example), &Default::default()).unwrap();
    assert_eq!(settings.policy, otpd::domain::Policy::default());
    assert!(settings.server.trusted_proxies.is_empty());
}

fn assert_status(answer: &(StatusCode, HeaderMap, Value), expected: StatusCode) {
    assert_eq!(answer.0, expected, "{}", answer.2);
}

#[tokio::test]
async fn per_number_limit_counts_every_purpose_and_uid_and_says_when_to_retry() {
    let app = TestApp::spawn().await;
    for i in 0..4 {
        let answer = send(&app, json!({ "to": NL, "purpose": format!("p{i}") })).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    let answer = send(&app, json!({ "to": NL, "uid": "user-1" })).await;
    assert_status(&answer, StatusCode::CREATED);

    // Five subjects, one number: the sixth send to it is refused.
    let refused = send(&app, json!({ "to": NL, "purpose": "p9" })).await;
    let wait = assert_limited(&refused, "number_10min");
    let other = send(&app, json!({ "to": nl(1) })).await;
    assert_status(&other, StatusCode::CREATED);

    // Retry-After is exact: a second early is still too early (and refused
    // requests count against nothing).
    app.advance(wait - 1);
    assert_limited(
        &send(&app, json!({ "to": NL, "purpose": "p9" })).await,
        "number_10min",
    );
    app.advance(1);
    let answer = send(&app, json!({ "to": NL, "purpose": "p9" })).await;
    assert_status(&answer, StatusCode::CREATED);
}

#[tokio::test]
async fn no_double_burst_across_a_window_boundary() {
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_number_10min = 6).await;
    // To the last second of a 10-minute window.
    let now = otpd::clock::Clock::now(app.clock.as_ref()).timestamp();
    app.advance(600 - now.rem_euclid(600) - 1);
    for i in 0..5 {
        let answer = send(&app, json!({ "to": NL, "purpose": format!("p{i}") })).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    // Two seconds later a fixed window would start again from zero; the sliding
    // one still weighs the five (about 4.98 of them): room for one more send,
    // counted in the new window, and not for a second.
    app.advance(2);
    let answer = send(&app, json!({ "to": NL, "purpose": "p5" })).await;
    assert_status(&answer, StatusCode::CREATED);
    let wait = assert_limited(
        &send(&app, json!({ "to": NL, "purpose": "p6" })).await,
        "number_10min",
    );
    assert!(wait > 100, "{wait}");
}

#[tokio::test]
async fn per_number_daily_limit() {
    let app = TestApp::spawn_with(|s| {
        s.policy.max_sends_per_number_10min = 0;
        s.policy.max_sends_per_number_day = 3;
    })
    .await;
    for i in 0..3 {
        let answer = send(&app, json!({ "to": NL, "purpose": format!("p{i}") })).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    let wait = assert_limited(
        &send(&app, json!({ "to": NL, "purpose": "p3" })).await,
        "number_day",
    );
    assert!(wait > 3_600 && wait <= 2 * 86_400, "{wait}");
    app.advance(wait);
    let answer = send(&app, json!({ "to": NL, "purpose": "p3" })).await;
    assert_status(&answer, StatusCode::CREATED);
}

#[tokio::test]
async fn per_client_limit_believes_forwarded_for_only_from_trusted_proxies() {
    let app = TestApp::spawn_with(|s| {
        s.server.trusted_proxies = vec!["127.0.0.0/8".into()];
        s.policy.max_sends_per_ip_10min = 2;
    })
    .await;
    let key = app.key.clone();
    let client_a = Some("198.51.100.7");
    for i in 1..=2 {
        let answer = send_raw(&app, &key, json!({ "to": nl(i) }), client_a).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    assert_limited(
        &send_raw(&app, &key, json!({ "to": nl(3) }), client_a).await,
        "ip_10min",
    );
    // Another client behind the same proxy has its own budget.
    let answer = send_raw(&app, &key, json!({ "to": nl(3) }), Some("198.51.100.8")).await;
    assert_status(&answer, StatusCode::CREATED);
    // Entries the client wrote itself (left of what the proxy saw) change nothing.
    let spoofed = Some("203.0.113.99, 198.51.100.7");
    assert_limited(
        &send_raw(&app, &key, json!({ "to": nl(4) }), spoofed).await,
        "ip_10min",
    );
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_ip_10min = 2).await;
    let key = app.key.clone();
    for (i, claimed) in ["198.51.100.1", "198.51.100.2"].into_iter().enumerate() {
        let answer = send_raw(&app, &key, json!({ "to": nl(i as u32) }), Some(claimed)).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    // A third "different client" is still the same socket peer.
    let answer = send_raw(&app, &key, json!({ "to": nl(9) }), Some("198.51.100.3")).await;
    assert_limited(&answer, "ip_10min");
}

#[tokio::test]
async fn per_tenant_limit_per_minute() {
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_tenant_minute = 3).await;
    for i in 0..3 {
        assert_status(
            &send(&app, json!({ "to": nl(i) })).await,
            StatusCode::CREATED,
        );
    }
    let wait = assert_limited(&send(&app, json!({ "to": nl(3) })).await, "tenant_minute");
    assert!(wait <= 120, "{wait}");
    let other = app.new_key("other").await;
    let answer = send_raw(&app, &other, json!({ "to": nl(3) }), None).await;
    assert_status(&answer, StatusCode::CREATED);
    app.advance(wait);
    assert_status(
        &send(&app, json!({ "to": nl(3) })).await,
        StatusCode::CREATED,
    );
}

/// Concurrent wrong guesses cannot overrun the hourly budget: each is judged
/// and counted in the store's one atomic check, so exactly the budget's worth
/// are compared and every other one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_wrong_guesses_stay_within_the_hourly_budget() {
    let app = TestApp::spawn_with(|s| s.policy.max_wrong_guesses_per_hour = 3).await;
    let sent = app.send_to(NL).await;
    let code = sent["debug_code"].as_str().unwrap();
    let answers = futures::future::join_all((0..30).map(|i| {
        let target = if i % 2 == 0 {
            json!({ "id": sent["id"], "code": wrong(code) })
        } else {
            json!({ "to": NL, "code": wrong(code) })
        };
        check(&app, &app.key, target)
    }))
    .await;
    let compared = answers
        .iter()
        .filter(|(status, body)| *status == StatusCode::OK && body["valid"] == json!(false))
        .count();
    let refused = answers
        .iter()
        .filter(|(status, body)| {
            *status == StatusCode::TOO_MANY_REQUESTS
                && body["error"]["limit"] == json!("wrong_guesses_hour")
        })
        .count();
    assert_eq!((compared, refused), (3, 27), "{answers:?}");
    let (_, v) = parts(
        app.get(&format!(
            "/v1/verifications/{}",
            sent["id"].as_str().unwrap()
        ))
        .await,
    )
    .await;
    assert_eq!(v["attempts"], json!(3), "{v}");
}

#[tokio::test]
async fn wrong_guesses_are_budgeted_across_resends() {
    let app = TestApp::spawn_with(|s| s.policy.max_wrong_guesses_per_hour = 7).await;
    let first = app.send_to(NL).await;
    let code = first["debug_code"].as_str().unwrap();
    for left in (0..5).rev() {
        let (status, body) = check(
            &app,
            &app.key,
            json!({ "id": first["id"], "code": wrong(code) }),
        )
        .await;
        assert_eq!(
            (status, &body["attempts_left"]),
            (StatusCode::OK, &json!(left))
        );
    }
    // The verification is dead; a resend starts a new one with fresh attempts,
    // but the subject's guessing budget carries over: 5 spent, 2 left.
    app.advance(30);
    let second = app.send_to(NL).await;
    assert_ne!(second["id"], first["id"]);
    let code = second["debug_code"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let (status, body) = check(&app, &app.key, json!({ "to": NL, "code": wrong(&code) })).await;
        assert_eq!(
            (status, &body["valid"]),
            (StatusCode::OK, &json!(false)),
            "{body}"
        );
    }
    // Budget spent: even the right code is refused, by id and by number.
    for target in [
        json!({ "id": second["id"], "code": code }),
        json!({ "to": NL, "code": code }),
    ] {
        let r = app.post("/v1/verifications/check", target).await;
        let headers = r.headers().clone();
        let (status, body) = parts(r).await;
        assert_limited(&(status, headers, body), "wrong_guesses_hour");
    }
    // Another subject of the same tenant is unaffected.
    let other = app.send_to(&nl(1)).await;
    let (status, body) = check(
        &app,
        &app.key,
        json!({ "id": other["id"], "code": other["debug_code"] }),
    )
    .await;
    assert_eq!((status, &body["valid"]), (StatusCode::OK, &json!(true)));

    // After the wait, the subject may verify again.
    let r = app
        .post("/v1/verifications/check", json!({ "to": NL, "code": code }))
        .await;
    let wait: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    app.advance(wait);
    let third = app.send_to(NL).await;
    let (status, body) = check(
        &app,
        &app.key,
        json!({ "to": NL, "code": third["debug_code"] }),
    )
    .await;
    assert_eq!(
        (status, &body["valid"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
}

#[tokio::test]
async fn a_tenants_limits_hold_on_the_seed_compatible_apis_too() {
    let app = TestApp::spawn_with(|s| {
        let mut acme = TenantSettings::default();
        acme.policy
            .insert("allowed_countries".into(), json!(["NL"]));
        acme.policy.insert("cooldown_seconds".into(), json!(5));
        s.tenants.insert("acme".into(), acme);
    })
    .await;
    let acme = app.new_key("acme").await;
    let other = app.new_key("other").await;
    let ug = "256700123456";
    let bridgex = json!({ "phone_number": ug, "purpose": "login" });
    let openlyne = json!({ "phone": ug, "uid": "0b8f7c2e-6a4e-4f9b-9a51-2f0c7d3e8a10" });
    for (path, body, refusal) in [
        ("/send-otp", &bridgex, "destination country not allowed"),
        ("/webhook/send-otp", &openlyne, "Invalid phone number"),
    ] {
        let (status, answer) = parts(app.post_as(&acme, path, body.clone()).await).await;
        assert_ne!(status, StatusCode::OK, "{path}: {answer}");
        assert!(answer.to_string().contains(refusal), "{path}: {answer}");
        let (status, answer) = parts(app.post_as(&other, path, body.clone()).await).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    }
    // The dialect keeps its original's shape over the tenant's own settings:
    // BridgeX's 45-second cooldown, not acme's 5.
    let nl = json!({ "phone_number": "31651860670", "purpose": "login" });
    assert_eq!(
        app.post_as(&acme, "/send-otp", nl.clone()).await.status(),
        StatusCode::OK
    );
    app.advance(10);
    let r = app.post_as(&acme, "/send-otp", nl).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn country_allow_and_block_lists_per_tenant() {
    let app = TestApp::spawn_with(|s| {
        s.policy.allowed_countries = vec!["NL".into(), "UG".into()];
        let mut acme = TenantSettings::default();
        acme.policy
            .insert("blocked_countries".into(), json!(["ug"]));
        s.tenants.insert("acme".into(), acme);
    })
    .await;
    let other = app.new_key("other").await;
    let us = "+12025550143";
    for (key, to, allowed) in [
        (&app.key, NL, true),
        (&app.key, "+256700123456", false),
        (&app.key, us, false),
        (&other, "+256700123456", true),
        (&other, us, false),
    ] {
        let (status, _, body) = send_raw(&app, key, json!({ "to": to }), None).await;
        if allowed {
            assert_eq!(status, StatusCode::CREATED, "{to}: {body}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{to}: {body}");
            assert_eq!(body["error"]["code"], "country_not_allowed", "{body}");
        }
    }
}

#[tokio::test]
async fn pumping_guard_stops_a_synthetic_attack_while_real_traffic_flows() {
    // No per-client limit: the attack comes from one address, and the guard is
    // what must stop it.
    let app = TestApp::spawn_with(|s| s.policy.max_sends_per_ip_10min = 0).await;
    let mut accepted = 0;
    let mut refused = Vec::new();
    let mut real_users = 0;
    for i in 0..1_000 {
        let (status, _, body) = send(&app, json!({ "to": ug(i) })).await;
        match status {
            StatusCode::CREATED => accepted += 1,
            StatusCode::FORBIDDEN => {
                assert_eq!(body["error"]["code"], "suspected_fraud", "{body}");
                assert_eq!(body["error"]["prefix"], "+256700", "{body}");
                let reason = body["error"]["reason"].as_str().unwrap();
                assert_eq!(
                    reason,
                    "+256700: 51 sends in the last hour (threshold 50) with 0% approved (floor 20%)"
                );
                refused.push(i);
                assert!(body["error"]["until"].is_string(), "{body}");
            }
            other => panic!("send {i}: {other} {body}"),
        }
        // Real users in another country keep getting and typing their codes.
        if i % 20 == 0 {
            let user = app.send_to(&nl(i)).await;
            let (status, body) = check(
                &app,
                &app.key,
                json!({ "id": user["id"], "code": user["debug_code"] }),
            )
            .await;
            assert_eq!((status, &body["valid"]), (StatusCode::OK, &json!(true)));
            real_users += 1;
        }
    }
    assert_eq!(accepted, 50, "the prefix's hourly threshold");
    assert_eq!(
        refused,
        (50..1_000).collect::<Vec<_>>(),
        "the 51st send trips the guard, and the prefix stays closed"
    );
    assert_eq!(real_users, 50);
    // Other prefixes of the same country are not punished for one prefix.
    let answer = send(&app, json!({ "to": "+256772123456" })).await;
    assert_status(&answer, StatusCode::CREATED);

    let (status, guard) = parts(app.get("/v1/guard").await).await;
    assert_eq!(status, StatusCode::OK, "{guard}");
    assert_eq!(guard["quarantines"].as_array().unwrap().len(), 1, "{guard}");
    assert_eq!(guard["quarantines"][0]["prefix"], "+256700");
    assert!(
        guard["quarantines"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("threshold 50"),
        "{guard}"
    );
    assert_eq!(
        guard["blocked_today"],
        json!({ "guard_tripped": 1, "quarantined": 949 })
    );
    // Another tenant sees none of it.
    let other = app.new_key("other").await;
    let (_, theirs) = parts(app.get_as(&other, "/v1/guard").await).await;
    assert_eq!(theirs["quarantines"], json!([]));

    // An operator lifts it: sends flow again (the prefix is spared for a
    // while), and there is nothing left to lift.
    let lift = |prefix: &'static str| {
        app.client
            .delete(format!("{}/v1/guard/{prefix}", app.base))
            .header("x-api-key", &app.key)
            .send()
    };
    let (status, lifted) = parts(lift("+256700").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{lifted}");
    assert_eq!(lifted["lifted"]["prefix"], "+256700");
    assert_status(
        &send(&app, json!({ "to": ug(1_000) })).await,
        StatusCode::CREATED,
    );
    let (status, _) = parts(lift("256700").await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = parts(lift("not-a-prefix").await.unwrap()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_request"))
    );
    let (_, guard) = parts(app.get("/v1/guard").await).await;
    assert_eq!(guard["quarantines"], json!([]));
}

/// Traffic whose codes are typed in converts: the guard lets it grow past the
/// hourly threshold. The approvals here alternate checks by number and by id
/// (the attack test approves by id).
async fn approvals_keep_a_busy_prefix_open(app: TestApp) {
    for i in 0..60 {
        let (status, _, sent) = send(&app, json!({ "to": ug(i) })).await;
        assert_eq!(status, StatusCode::CREATED, "send {i}: {sent}");
        let by = if i % 2 == 0 {
            json!({ "to": ug(i), "code": sent["debug_code"] })
        } else {
            json!({ "id": sent["id"], "code": sent["debug_code"] })
        };
        let (status, body) = check(&app, &app.key, by).await;
        assert_eq!(
            (status, &body["valid"]),
            (StatusCode::OK, &json!(true)),
            "{body}"
        );
    }
    let (_, guard) = parts(app.get("/v1/guard").await).await;
    assert_eq!(guard["quarantines"], json!([]), "{guard}");
}

fn any_address(s: &mut otpd::config::Settings) {
    s.policy.max_sends_per_ip_10min = 0;
}

#[tokio::test]
async fn approvals_keep_a_busy_prefix_open_in_memory() {
    approvals_keep_a_busy_prefix_open(TestApp::spawn_with(any_address).await).await;
}

/// A single Redis node counts an approval inside its check, from what the send
/// kept with the record (a cluster counts it after, as the memory store does).
#[tokio::test]
async fn approvals_keep_a_busy_prefix_open_on_redis() {
    let Some(url) = Shared::Redis.url() else {
        return;
    };
    let namespace = format!("t_{}", Uuid::new_v4().simple());
    let store = Shared::Redis.open(&url, &namespace).await;
    approvals_keep_a_busy_prefix_open(TestApp::spawn_on(store, any_address).await).await;
}

#[tokio::test]
async fn a_quarantine_ends_by_itself() {
    let app = TestApp::spawn_with(|s| {
        s.policy.guard.max_sends_per_prefix_hour = 3;
        s.policy.guard.quarantine_seconds = 600;
    })
    .await;
    for i in 0..3 {
        assert_status(
            &send(&app, json!({ "to": ug(i) })).await,
            StatusCode::CREATED,
        );
    }
    let (status, _, body) = send(&app, json!({ "to": ug(3) })).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("suspected_fraud"))
    );
    app.advance(599);
    let (status, _, _) = send(&app, json!({ "to": ug(4) })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Two hours on, the quarantine is over and the prefix's old traffic has
    // faded out of the hourly window.
    app.advance(2 * 3_600);
    assert_status(
        &send(&app, json!({ "to": ug(5) })).await,
        StatusCode::CREATED,
    );
}

/// Accepts everything and reports what the message cost, as Africa's Talking
/// and Twilio do (an amount in the currency the account is billed in), or
/// nothing, as BridgeXAPI does: then the route's price applies.
struct Billed(Option<(f64, &'static str)>);

#[async_trait]
impl SmsProvider for Billed {
    fn name(&self) -> &'static str {
        "billed"
    }

    async fn send(&self, _sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        Ok(SendReceipt {
            provider_message_id: Some(Uuid::new_v4().to_string()),
            cost: self.0.map(|(amount, _)| amount),
            currency: self.0.map(|(_, currency)| currency.to_owned()),
            ..SendReceipt::default()
        })
    }
}

#[tokio::test]
async fn daily_spend_budget_stops_sends_until_midnight_utc() {
    let mut route = Route::new(1, Arc::new(Billed(None)));
    route.price.insert("*".into(), 0.25);
    route.currency = Some("EUR".into());
    let app = TestApp::spawn_routed(vec![route], |s| s.policy.daily_spend_limit = 1.0).await;
    for i in 0..4 {
        let (status, _, body) = send(&app, json!({ "to": nl(i) })).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["delivery"]["cost"], json!(0.25));
    }
    let wait = assert_limited(&send(&app, json!({ "to": nl(4) })).await, "daily_spend");
    let now = otpd::clock::Clock::now(app.clock.as_ref());
    let midnight = (now.timestamp().div_euclid(86_400) + 1) * 86_400;
    assert_eq!(wait, midnight - now.timestamp());
    // The sandbox costs nothing, but a budget is a budget: sends stop.
    let answer = send(&app, json!({ "to": nl(5), "sandbox": true })).await;
    assert_limited(&answer, "daily_spend");
    app.advance(wait);
    assert_status(
        &send(&app, json!({ "to": nl(4) })).await,
        StatusCode::CREATED,
    );
}

/// A budget of 1.0 EUR over one EUR route (at `price` a message, if any)
/// whose provider bills `billed`: how many sends it lets through before
/// `daily_spend`.
async fn sends_within_budget(billed: Billed, price: Option<f64>) -> usize {
    let mut route = Route::new(1, Arc::new(billed));
    if let Some(price) = price {
        route.price.insert("*".into(), price);
    }
    route.currency = Some("EUR".into());
    let app = TestApp::spawn_routed(vec![route], |s| s.policy.daily_spend_limit = 1.0).await;
    for i in 0..10 {
        let answer = send(&app, json!({ "to": nl(i) })).await;
        if answer.0 == StatusCode::TOO_MANY_REQUESTS {
            assert_limited(&answer, "daily_spend");
            return i as usize;
        }
        assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.2);
    }
    panic!("the budget never stopped a send");
}

#[tokio::test]
async fn spend_counts_the_providers_cost_only_in_the_budgets_currency() {
    // Billed in the routes' currency: the provider's own figure counts.
    assert_eq!(
        sends_within_budget(Billed(Some((0.5, "EUR"))), Some(0.25)).await,
        2
    );
    assert_eq!(
        sends_within_budget(Billed(Some((0.5, "eur"))), Some(0.25)).await,
        2
    );
    // Billed in shillings: 80 of them are not 80 euros; the route's price counts.
    assert_eq!(
        sends_within_budget(Billed(Some((80.0, "KES"))), Some(0.25)).await,
        4
    );
    // With no price to count instead, the provider's figure counts as it is
    // (and a warning says so) rather than nothing: a budget still stops sends.
    assert_eq!(
        sends_within_budget(Billed(Some((0.4, "KES"))), None).await,
        3
    );
}

#[tokio::test]
async fn nothing_pending_looks_the_same_whatever_the_number_went_through() {
    let app = TestApp::spawn().await;
    let numbers = [nl(1), nl(2), nl(3), nl(4)];
    // nl(1): never sent. nl(2): approved. nl(3): expired. nl(4): canceled.
    let approved = app.send_to(&numbers[1]).await;
    let (status, _) = check(
        &app,
        &app.key,
        json!({ "id": approved["id"], "code": approved["debug_code"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let canceled = app.send_to(&numbers[3]).await;
    let path = format!(
        "/v1/verifications/{}/cancel",
        canceled["id"].as_str().unwrap()
    );
    assert_eq!(app.post(&path, json!({})).await.status(), StatusCode::OK);
    let expired = app.send_to(&numbers[2]).await;
    app.advance(301);

    let mut answers = Vec::new();
    for to in &numbers {
        let r = app
            .post(
                "/v1/verifications/check",
                json!({ "to": to, "code": "123456" }),
            )
            .await;
        answers.push((r.status(), r.text().await.unwrap()));
    }
    for id in [
        json!(Uuid::new_v4()),
        approved["id"].clone(),
        expired["id"].clone(),
        canceled["id"].clone(),
    ] {
        let r = app
            .post(
                "/v1/verifications/check",
                json!({ "id": id, "code": "123456" }),
            )
            .await;
        answers.push((r.status(), r.text().await.unwrap()));
    }
    assert_eq!(answers[0].0, StatusCode::NOT_FOUND);
    for answer in &answers {
        assert_eq!(
            answer, &answers[0],
            "every 'nothing pending' answer is identical"
        );
    }
}

/// The real binary with JSON logs, so the audit trail is read as an operator
/// reads it: every send, check, cancel, key change and guard action is one
/// `audit` event with the masked number and the client's address (here behind
/// a trusted proxy), and nothing in the log carries a code or a full number.
#[tokio::test]
async fn audit_log_has_one_event_per_action_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("otpd.log");
    let env = [
        ("RUST_LOG", "audit=info"),
        ("OTPD_LOG__FORMAT", "json"),
        ("OTPD_DEBUG_CODES", "true"),
        ("OTPD_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
        // Trips on the second send to a prefix unless all its codes were approved.
        ("OTPD_POLICY__GUARD__MAX_SENDS_PER_PREFIX_HOUR", "1"),
        ("OTPD_POLICY__GUARD__MIN_CONVERSION", "0.9"),
    ];
    let mut otpd = start_otpd_logging(
        dir.path(),
        &[],
        &env,
        std::fs::File::create(&log_path).unwrap().into(),
    );
    let key = otpd.printed_key.clone().unwrap();
    let client = crate::helpers::plain_client();
    let call = |method: reqwest::Method, path: &str, body: Value| {
        client
            .request(method, format!("{}{path}", otpd.base))
            .header("x-api-key", &key)
            .header("x-forwarded-for", "198.51.100.7")
            .json(&body)
            .send()
    };
    let post = reqwest::Method::POST;
    let (status, sent) = parts(
        call(post.clone(), "/v1/verifications", json!({ "to": NL }))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let code = sent["debug_code"].as_str().unwrap().to_owned();
    let id = sent["id"].as_str().unwrap().to_owned();
    for guess in [wrong(&code), code.clone()] {
        let r = call(
            post.clone(),
            "/v1/verifications/check",
            json!({ "id": id, "code": guess }),
        );
        assert_eq!(r.await.unwrap().status(), StatusCode::OK);
    }
    let r = call(post.clone(), "/v1/verifications", json!({ "to": nl(7) }));
    assert_eq!(r.await.unwrap().status(), StatusCode::FORBIDDEN);
    let r = call(
        post.clone(),
        &format!("/v1/verifications/{id}/cancel"),
        json!({}),
    );
    assert_eq!(r.await.unwrap().status(), StatusCode::NOT_FOUND);
    let r = call(reqwest::Method::DELETE, "/v1/guard/+31651", json!({}));
    assert_eq!(r.await.unwrap().status(), StatusCode::OK);
    otpd.child.kill().unwrap();
    otpd.child.wait().unwrap();

    // Key creation and revocation from the CLI log the same way.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_otpd"))
            .args(args)
            .current_dir(dir.path())
            .envs(env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let created = cli(&["keys", "create", "--tenant", "acme"]);
    let key_id = created
        .lines()
        .find_map(|l| l.strip_prefix("created "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    let revoked = cli(&["keys", "revoke", &key_id]);

    let log = format!(
        "{}{created}{revoked}",
        std::fs::read_to_string(&log_path).unwrap()
    );
    assert!(!log.contains(&code), "code leaked:\n{log}");
    assert!(!log.contains("651860670"), "number leaked:\n{log}");
    let events: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["target"] == "audit")
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "key_created",
            "send",
            "check",
            "check",
            "guard_quarantine",
            "blocked",
            "cancel",
            "guard_lift",
            "key_created",
            "key_revoked",
        ],
        "{log}"
    );
    for e in [&events[1], &events[2], &events[3], &events[6]] {
        assert_eq!(e["tenant"], "default", "{e}");
        assert_eq!(e["verification_id"], json!(id), "{e}");
        assert_eq!(e["client_ip"], "198.51.100.7", "{e}");
    }
    for e in &events[1..4] {
        assert_eq!(e["to"], "+*******0670", "{e}");
    }
    assert_eq!(
        [
            &events[1]["outcome"],
            &events[2]["outcome"],
            &events[3]["outcome"]
        ],
        [&json!("sent"), &json!("wrong"), &json!("approved")]
    );
    assert_eq!(events[5]["reason"], "guard_tripped");
    assert_eq!(events[5]["prefix"], "+31651");
    assert_eq!(events[5]["to"], "+*******0007");
    assert_eq!(events[5]["client_ip"], "198.51.100.7");
    assert_eq!(events[6]["outcome"], "not_found", "already approved");
    assert_eq!(events[7]["prefix"], "+31651");
    assert_eq!(events[7]["by"], "api from 198.51.100.7");
    assert_eq!(events[8]["tenant"], "acme");
    assert_eq!(events[9]["key_id"], json!(key_id));
}

/// Twenty sends to one number at once, split over two instances: exactly the
/// limit's five get through, however the requests interleave.
async fn concurrent_sends_never_exceed_a_limit(a: &TestApp, b: &TestApp) {
    let sends = (0..20).map(|i| {
        let app = if i % 2 == 0 { a } else { b };
        send_raw(
            app,
            &a.key,
            json!({ "to": nl(99), "purpose": format!("c{i}") }),
            None,
        )
    });
    let answers = futures::future::join_all(sends).await;
    let created = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 5, "{answers:?}");
    for answer in answers.iter().filter(|(s, _, _)| *s != StatusCode::CREATED) {
        assert_limited(answer, "number_10min");
    }
}

/// The same limits, two instances on one store.
async fn limits_hold_across_instances(a: TestApp, b: TestApp) {
    let apps = [&a, &b];
    for i in 0..5 {
        let answer = send_raw(
            apps[i % 2],
            &a.key,
            json!({ "to": NL, "purpose": format!("p{i}") }),
            None,
        )
        .await;
        assert_status(&answer, StatusCode::CREATED);
    }
    for app in apps {
        let answer = send_raw(app, &a.key, json!({ "to": NL, "purpose": "p9" }), None).await;
        assert_limited(&answer, "number_10min");
    }

    // Wrong guesses made on either instance share one budget (2 here).
    // (Another country: +31651 has had the guard's 5 sends for the hour.)
    let (_, _, sent) = send_raw(
        &a,
        &a.key,
        json!({ "to": "+12025550143", "uid": "u-1" }),
        None,
    )
    .await;
    let code = sent["debug_code"].as_str().unwrap().to_owned();
    for app in apps {
        let (status, _) = check(app, &a.key, json!({ "uid": "u-1", "code": wrong(&code) })).await;
        assert_eq!(status, StatusCode::OK);
    }
    let r = a
        .post_as(
            &a.key,
            "/v1/verifications/check",
            json!({ "uid": "u-1", "code": code }),
        )
        .await;
    let headers = r.headers().clone();
    let (status, body) = parts(r).await;
    assert_limited(&(status, headers, body), "wrong_guesses_hour");

    // A prefix tripped through one instance is quarantined on the other.
    for i in 0..5 {
        let answer = send_raw(apps[i % 2], &a.key, json!({ "to": ug(i as u32) }), None).await;
        assert_status(&answer, StatusCode::CREATED);
    }
    let (status, _, body) = send_raw(&a, &a.key, json!({ "to": ug(5) }), None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("suspected_fraud"))
    );
    let (status, _, body) = send_raw(&b, &a.key, json!({ "to": ug(6) }), None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::FORBIDDEN, &json!("suspected_fraud"))
    );
    let (_, guard) = parts(b.get_as(&a.key, "/v1/guard").await).await;
    assert_eq!(guard["quarantines"][0]["prefix"], "+256700", "{guard}");
}

/// The per-number limits alone (so twenty sends from one address to one
/// prefix meet nothing else).
fn only_number_limits(s: &mut otpd::config::Settings) {
    s.policy.max_sends_per_ip_10min = 0;
    s.policy.guard.enabled = false;
}

fn shared_limits(s: &mut otpd::config::Settings) {
    s.policy.max_wrong_guesses_per_hour = 2;
    s.policy.guard.max_sends_per_prefix_hour = 5;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_on_one_memory_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = TestApp::spawn_on(store.clone(), shared_limits).await;
    let b = TestApp::spawn_on(store, shared_limits).await;
    limits_hold_across_instances(a, b).await;

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = TestApp::spawn_on(store.clone(), only_number_limits).await;
    let b = TestApp::spawn_on(store, only_number_limits).await;
    concurrent_sends_never_exceed_a_limit(&a, &b).await;
}

async fn across_shared(kind: Shared) {
    let Some(url) = kind.url() else { return };
    let namespace = format!("t_{}", Uuid::new_v4().simple());
    let a = TestApp::spawn_on(kind.open(&url, &namespace).await, shared_limits).await;
    let b = TestApp::spawn_on(kind.open(&url, &namespace).await, shared_limits).await;
    limits_hold_across_instances(a, b).await;

    let namespace = format!("t_{}", Uuid::new_v4().simple());
    let a = TestApp::spawn_on(kind.open(&url, &namespace).await, only_number_limits).await;
    let b = TestApp::spawn_on(kind.open(&url, &namespace).await, only_number_limits).await;
    concurrent_sends_never_exceed_a_limit(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_on_redis() {
    across_shared(Shared::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_on_redis_cluster() {
    across_shared(Shared::RedisCluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_instances_on_postgres() {
    across_shared(Shared::Postgres).await;
}
