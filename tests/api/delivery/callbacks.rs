//! Delivery reports pushed by Africa's Talking and Twilio, and the re-send a
//! failed one triggers.

use reqwest::StatusCode;
use serde_json::json;

use super::{
    DLR_SECRET, Providers, check, deliveries, form, hits, last_code, post_at_report,
    post_twilio_report, report_status,
};
use crate::helpers::{TestApp, expect_error, parts};

const TWILIO_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";

async fn message(app: &TestApp, id: &str) -> serde_json::Value {
    let (status, body) = parts(app.get(&format!("/v1/messages/{id}")).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn africastalking_reports_move_status_forward_once() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1]).await;
    let sent = app.send_to("+254711000111").await;
    assert_eq!(sent["delivery"]["provider_message_id"], "ATPid_1");
    assert_eq!(sent["delivery"]["status"], "sent", "{sent}");
    let message_id = sent["delivery"]["message_id"].as_str().unwrap();

    // "Submitted" is the stage the message already reached: nothing moves.
    let submitted = [
        ("id", "ATPid_1"),
        ("status", "Submitted"),
        ("phoneNumber", "+254711000111"),
        ("networkCode", "63902"),
        ("retryCount", "0"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &submitted).await).await,
        "unchanged"
    );

    app.advance(4);
    let success = [
        ("id", "ATPid_1"),
        ("status", "Success"),
        ("phoneNumber", "+254711000111"),
        ("networkCode", "63902"),
        ("retryCount", "0"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &success).await).await,
        "updated"
    );
    let delivered = message(&app, message_id).await;
    assert_eq!(delivered["status"], "delivered", "{delivered}");
    assert!(delivered["delivered_at"].is_string(), "{delivered}");
    assert_eq!(delivered["to"], sent["to"], "masked number only");
    assert_eq!(delivered["cost"], 0.8);
    assert_eq!(delivered["currency"], "KES");

    // A duplicate and a late earlier stage change nothing.
    app.advance(4);
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &success).await).await,
        "unchanged"
    );
    let late = [("id", "ATPid_1"), ("status", "Sent")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &late).await).await,
        "unchanged"
    );
    let failed_late = [
        ("id", "ATPid_1"),
        ("status", "Failed"),
        ("failureReason", "DeliveryFailure"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed_late).await).await,
        "unchanged"
    );
    assert_eq!(
        message(&app, message_id).await,
        delivered,
        "still the first delivered report"
    );

    // Ids otpd never sent: 200, so the provider stops retrying.
    let unknown = [("id", "ATPid_nobody"), ("status", "Success")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &unknown).await).await,
        "ignored"
    );
    // A status with no meaning for delivery is ignored too.
    let odd = [("id", "ATPid_1"), ("status", "Whatever")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &odd).await).await,
        "ignored"
    );

    let r = post_at_report(&app, DLR_SECRET, &[("status", "Success")]).await;
    expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    let r = post_at_report(&app, "wrong-secret-0123456789", &success).await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app
        .post_raw(
            &format!("/v1/dlr/infobip/{DLR_SECRET}"),
            &[],
            b"id=x&status=Success",
        )
        .await;
    expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn a_report_whose_id_is_not_printable_text_is_refused() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1]).await;
    let long = "A".repeat(257);
    for id in ["\u{0}ATPid_1", "ATPid\n1", long.as_str()] {
        let r = post_at_report(&app, DLR_SECRET, &[("id", id), ("status", "Success")]).await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let unknown = [("id", "ATPid_404"), ("status", "Success")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &unknown).await).await,
        "ignored"
    );
}

#[tokio::test]
async fn without_a_secret_the_endpoints_do_not_exist() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1]);
        s.dlr.secret = None;
    })
    .await;
    app.send_to("+254711000111").await;
    for secret in [DLR_SECRET, ""] {
        let r = post_at_report(&app, secret, &[("id", "ATPid_1"), ("status", "Success")]).await;
        expect_error(r, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn twilio_reports_need_a_valid_signature() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[2]).await;
    let sent = app.send_to("+31651860670").await;
    let sid = sent["delivery"]["provider_message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sid.starts_with("SM"), "{sent}");
    // otpd asked Twilio to report to its own callback URL.
    let requests = providers.twilio.received_requests().await.unwrap();
    let form = super::form(&requests[0].body);
    assert_eq!(
        form["StatusCallback"],
        format!("https://otpd.example.com/v1/dlr/twilio/{DLR_SECRET}")
    );

    let bad = post_twilio_report(
        &app,
        &sid,
        "delivered",
        None,
        Some("bm90IHRoZSBzaWduYXR1cmU="),
    )
    .await;
    expect_error(bad, StatusCode::FORBIDDEN, "invalid_signature").await;
    let unsigned = app
        .post_raw(
            &format!("/v1/dlr/twilio/{DLR_SECRET}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("MessageSid={sid}&MessageStatus=delivered").as_bytes(),
        )
        .await;
    expect_error(unsigned, StatusCode::FORBIDDEN, "invalid_signature").await;
    let id = sent["id"].as_str().unwrap();
    assert_eq!(
        deliveries(&app, id).await[0]["status"],
        "queued",
        "forged reports change nothing"
    );

    assert_eq!(
        report_status(post_twilio_report(&app, &sid, "sent", None, None).await).await,
        "updated"
    );
    app.advance(3);
    assert_eq!(
        report_status(post_twilio_report(&app, &sid, "delivered", None, None).await).await,
        "updated"
    );
    // Out of order and duplicated, as Twilio's retries can be.
    assert_eq!(
        report_status(post_twilio_report(&app, &sid, "sent", None, None).await).await,
        "unchanged"
    );
    assert_eq!(
        report_status(post_twilio_report(&app, &sid, "delivered", None, None).await).await,
        "unchanged"
    );
    let d = &deliveries(&app, id).await[0];
    assert_eq!(d["status"], "delivered", "{d}");
    assert!(
        d["sent_at"].is_string() && d["delivered_at"].is_string(),
        "{d}"
    );
    assert_ne!(d["sent_at"], d["delivered_at"]);

    let unknown = post_twilio_report(
        &app,
        "SM00000000000000000000000000009999",
        "failed",
        Some("30003"),
        None,
    )
    .await;
    assert_eq!(report_status(unknown).await, "ignored");
}

#[tokio::test]
async fn a_failed_delivery_is_resent_once_over_the_next_route() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1, 2]).await;
    let sent = app.send_to("+254711000111").await;
    let id = sent["id"].as_str().unwrap();
    let first_code = sent["debug_code"].as_str().unwrap().to_owned();
    let first_id = sent["delivery"]["message_id"].as_str().unwrap().to_owned();

    app.advance(10);
    let failed = [
        ("id", "ATPid_1"),
        ("status", "AbsentSubscriber"),
        ("phoneNumber", "+254711000111"),
        ("networkCode", "63902"),
        ("failureReason", "DeliveryFailure"),
        ("retryCount", "0"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );

    let list = deliveries(&app, id).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["status"], "failed");
    assert_eq!(
        list[0]["error"],
        "delivery_failed: AbsentSubscriber (DeliveryFailure)"
    );
    assert!(list[0]["failed_at"].is_string());
    assert_eq!(list[1]["route_id"], 2);
    assert_eq!(list[1]["provider"], "twilio");
    assert_eq!(list[1]["resend_of"], first_id.as_str());
    assert_eq!(list[1]["status"], "queued");
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 1);

    // The same failure reported again rescues nothing more.
    app.advance(1);
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "unchanged"
    );
    assert_eq!(deliveries(&app, id).await.len(), 2);
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 1);

    // The re-sent code is the one that works now; the first one is gone, and
    // the verification kept its attempt budget (the wrong guess costs one).
    let new_code = last_code(&providers.twilio).await;
    assert_ne!(new_code, first_code);
    let (status, body) = check(&app, id, &first_code).await;
    assert_eq!(
        (status, body["valid"].clone(), body["attempts_left"].clone()),
        (StatusCode::OK, json!(false), json!(4)),
        "{body}"
    );
    let (_, view) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
    assert_eq!(view["send_count"], 2);

    // When the re-sent message fails too, there is no untried route left.
    let sid = list[1]["provider_message_id"].as_str().unwrap();
    let r = post_twilio_report(&app, sid, "undelivered", Some("30005"), None).await;
    assert_eq!(report_status(r).await, "updated");
    let list = deliveries(&app, id).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["status"], "undelivered");
    assert_eq!(
        list[1]["error"],
        "delivery_failed: undelivered (twilio error 30005)"
    );
    assert_eq!(
        hits(&providers.at, "/version1/messaging").await,
        1,
        "never back to a tried route"
    );

    let (status, body) = check(&app, id, &new_code).await;
    assert_eq!(
        (status, body["valid"].clone()),
        (StatusCode::OK, json!(true)),
        "{body}"
    );
}

#[tokio::test]
async fn a_delivered_report_never_triggers_a_resend() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1, 2]).await;
    let sent = app.send_to("+254711000111").await;
    let id = sent["id"].as_str().unwrap();
    let success = [("id", "ATPid_1"), ("status", "Success")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &success).await).await,
        "updated"
    );
    // A failure reported after delivery cannot move the status back.
    let failed = [
        ("id", "ATPid_1"),
        ("status", "Failed"),
        ("failureReason", "DeliveryFailure"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "unchanged"
    );
    assert_eq!(deliveries(&app, id).await.len(), 1);
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);
}

#[tokio::test]
async fn no_resend_when_the_policy_turns_it_off() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1, 2]);
        s.policy.resend_on_failed_delivery = false;
    })
    .await;
    let sent = app.send_to("+254711000111").await;
    let failed = [
        ("id", "ATPid_1"),
        ("status", "Rejected"),
        ("failureReason", "UserInBlacklist"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );
    let list = deliveries(&app, sent["id"].as_str().unwrap()).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["status"], "failed");
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);
}

#[tokio::test]
async fn only_the_current_codes_message_is_rescued() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1, 2]).await;
    let first = app.send_to("+254711000111").await;
    let id = first["id"].as_str().unwrap();
    // The user asks again after the cooldown: a new code over route 1 replaces
    // the first, so the first message's failure is moot.
    app.advance(31);
    let second = app.send_to("+254711000111").await;
    assert_eq!(second["id"], first["id"]);
    let failed = [("id", "ATPid_1"), ("status", "Expired")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );
    assert_eq!(deliveries(&app, id).await.len(), 2);
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);

    // Once approved, even the current message's failure is no reason to re-send.
    let code = second["debug_code"].as_str().unwrap();
    let (_, body) = check(&app, id, code).await;
    assert_eq!(body["valid"], true);
    let failed = [("id", "ATPid_2"), ("status", "Failed")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );
    assert_eq!(deliveries(&app, id).await.len(), 2);
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);
}

/// A report that the first message failed, arriving while the user's own
/// later send is still with its provider (its message not recorded yet), must
/// not re-send: that send already replaced the code, and a re-send would kill
/// the code it is delivering.
#[tokio::test]
async fn a_failure_report_never_replaces_a_later_send_in_flight() {
    let providers = Providers::start().await;
    let proxy = crate::helpers::StallingProxy::start(*providers.at.address()).await;
    let at = format!("http://127.0.0.1:{}", proxy.port);
    let app = TestApp::spawn_with(|s| providers.configure_reaching_at(s, &[1, 2], &at)).await;
    let first = app.send_to("+254711000111").await;
    let id = first["id"].as_str().unwrap().to_owned();
    app.advance(31);

    proxy.stall(true);
    let (client, base, key) = (app.client.clone(), app.base.clone(), app.key.clone());
    let second = tokio::spawn(async move {
        client
            .post(format!("{base}/v1/verifications"))
            .header("x-api-key", key)
            .json(&json!({ "to": "+254711000111" }))
            .send()
            .await
            .unwrap()
    });
    // The second send has replaced the code and waits on its provider.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, v) = parts(app.get(&format!("/v1/verifications/{id}")).await).await;
        if v["send_count"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second send never started: {v}"
        );
        tokio::task::yield_now().await;
    }
    fail_the_first_message(&app).await;
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0, "re-sent");

    proxy.stall(false);
    let (status, second) = parts(second.await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let (_, body) = check(&app, &id, second["debug_code"].as_str().unwrap()).await;
    assert_eq!(
        body["valid"], true,
        "the code the user got still works: {body}"
    );
}

/// A re-send is one more SMS to the number: it needs room under the send
/// limits as a send does, and takes it.
#[tokio::test]
async fn a_resend_needs_and_takes_room_under_the_send_limits() {
    let providers = Providers::start().await;
    // The send took the only room: the failure is not re-sent.
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1, 2]);
        s.policy.max_sends_per_number_10min = 1;
    })
    .await;
    let sent = app.send_to("+254711000111").await;
    let id = sent["id"].as_str().unwrap();
    fail_the_first_message(&app).await;
    assert_eq!(deliveries(&app, id).await.len(), 1);
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);

    // Room for two: the re-send goes out and takes the second.
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1, 2]);
        s.policy.max_sends_per_number_10min = 2;
    })
    .await;
    app.send_to("+254711000111").await;
    fail_the_first_message(&app).await;
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 1);
    app.advance(31);
    let r = app
        .post(
            "/v1/verifications",
            json!({ "to": "+254711000111", "purpose": "signup" }),
        )
        .await;
    let body = expect_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(body["error"]["limit"], "number_10min", "{body}");
}

/// Africa's Talking reports its first message (ATPid_1) undeliverable.
async fn fail_the_first_message(app: &TestApp) {
    let failed = [
        ("id", "ATPid_1"),
        ("status", "AbsentSubscriber"),
        ("failureReason", "DeliveryFailure"),
    ];
    assert_eq!(
        report_status(post_at_report(app, DLR_SECRET, &failed).await).await,
        "updated"
    );
}

#[tokio::test]
async fn a_resend_repeats_the_sends_code_length_and_locale() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1, 2]);
        s.routes[1]
            .templates
            .insert("fr".into(), "Votre code : {code}".into());
    })
    .await;
    let (status, sent) = parts(
        app.post(
            "/v1/verifications",
            json!({ "to": "+254711000111", "code_length": 8, "locale": "fr-CA" }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    fail_the_first_message(&app).await;

    let requests = providers.twilio.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "re-sent over route 2");
    let text = form(&requests[0].body)["Body"].clone();
    assert!(text.starts_with("Votre code : "), "{text}");
    let code = last_code(&providers.twilio).await;
    assert_eq!(code.len(), 8, "{text}");
    let (_, body) = check(&app, sent["id"].as_str().unwrap(), &code).await;
    assert_eq!(body["valid"], true, "{body}");
}

#[tokio::test]
async fn a_route_pinned_without_failover_is_never_resent_over_another() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1, 2]).await;
    let (status, sent) = parts(
        app.post(
            "/v1/verifications",
            json!({ "to": "+254711000111", "route_id": 1, "failover": false }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    fail_the_first_message(&app).await;
    assert_eq!(
        deliveries(&app, sent["id"].as_str().unwrap()).await.len(),
        1
    );
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);
}

#[tokio::test]
async fn a_bridgex_style_send_is_resent_under_the_dialects_policy() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[1, 2]);
        s.dialects
            .bridgex
            .policy
            .insert("resend_on_failed_delivery".into(), json!(false));
    })
    .await;
    // The tenant's own policy re-sends; the dialect's does not.
    let (status, sent) = parts(
        app.post_bearer(
            "/send-otp",
            json!({ "phone_number": "254711000111", "route_id": 1 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    fail_the_first_message(&app).await;
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 0);

    // A native send of the same tenant is re-sent.
    let native = app.send_to("+254711000222").await;
    let failed = [("id", "ATPid_2"), ("status", "Failed")];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );
    assert_eq!(
        deliveries(&app, native["id"].as_str().unwrap()).await.len(),
        2
    );
    assert_eq!(hits(&providers.twilio, TWILIO_PATH).await, 1);
}
