//! `/v1/usage` after a known mix of sends, reports, re-sends and checks.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{DLR_SECRET, Providers, check, last_code, post_at_report, report_status};
use crate::helpers::{expect_error, parts};

fn counts(
    sent: u64,
    delivered: u64,
    failed: u64,
    pending: u64,
    started: u64,
    approved: u64,
    cost: Value,
) -> Value {
    json!({
        "sent": sent, "delivered": delivered, "failed": failed, "pending_delivery": pending,
        "verifications_started": started, "verifications_approved": approved,
        "conversion_rate": if started == 0 { Value::Null } else { json!(approved as f64 / started as f64) },
        "cost": cost,
    })
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base.as_object_mut().unwrap().insert(key.to_owned(), value);
    base
}

#[tokio::test]
async fn usage_adds_up_a_known_mix_exactly() {
    let providers = Providers::start().await;
    // Route 1 (Africa's Talking, KES 0.8 a message as reported) first, then
    // route 3 (BridgeXAPI, EUR 0.05 from the route's price).
    let app = providers.spawn(&[1, 3]).await;
    let at = |id: &'static str, status: &'static str| [("id", id), ("status", status)];

    // V1, NL: delivered (reported twice), approved.
    let v1 = app.send_to("+31651860670").await;
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &at("ATPid_1", "Success")).await).await,
        "updated"
    );
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &at("ATPid_1", "Success")).await).await,
        "unchanged"
    );
    let (_, ok) = check(
        &app,
        v1["id"].as_str().unwrap(),
        v1["debug_code"].as_str().unwrap(),
    )
    .await;
    assert_eq!(ok["valid"], true);

    // V2, KE: fails on route 1, re-sent over route 3, delivered there, approved
    // with the re-sent code.
    let v2 = app.send_to("+254711000111").await;
    let failed = [
        ("id", "ATPid_2"),
        ("status", "Failed"),
        ("failureReason", "DeliveryFailure"),
    ];
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "updated"
    );
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &failed).await).await,
        "unchanged"
    );
    providers.dlr.report("BX-1-abc", "delivered", None);
    app.advance(6);
    assert_eq!(app.poller.poll_once().await.updated, 1);
    let code = last_code(&providers.bridgex).await;
    let (_, ok) = check(&app, v2["id"].as_str().unwrap(), &code).await;
    assert_eq!(ok["valid"], true, "{ok}");

    // V3, UG: no report yet, never checked.
    app.send_to("+256700123456").await;

    // V4, NL: delivered, one wrong guess, not approved.
    let v4 = app.send_to("+31612345678").await;
    assert_eq!(
        report_status(post_at_report(&app, DLR_SECRET, &at("ATPid_4", "Success")).await).await,
        "updated"
    );
    let wrong = crate::helpers::wrong(v4["debug_code"].as_str().unwrap());
    let (_, no) = check(&app, v4["id"].as_str().unwrap(), &wrong).await;
    assert_eq!(no["valid"], false);

    // V5: refused at send time (invalid number at the provider): nothing was sent.
    providers.refuse("+31687654321");
    let r = app
        .post("/v1/verifications", json!({"to": "+31687654321"}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);

    let (status, usage) = parts(app.get("/v1/usage").await).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let kes = json!({"KES": 1.6});
    let eur = json!({"EUR": 0.05});
    assert_eq!(
        usage["totals"],
        counts(5, 3, 1, 1, 4, 2, json!({"EUR": 0.05, "KES": 1.6})),
        "{usage}"
    );
    assert_eq!(
        usage["by_route"],
        json!([
            with(counts(4, 2, 1, 1, 4, 2, kes.clone()), "route_id", json!(1)),
            with(counts(1, 1, 0, 0, 0, 0, eur.clone()), "route_id", json!(3)),
        ]),
        "{usage}"
    );
    assert_eq!(
        usage["by_country"],
        json!([
            with(counts(2, 1, 1, 0, 1, 1, eur), "country", json!("KE")),
            with(counts(2, 2, 0, 0, 2, 1, kes), "country", json!("NL")),
            with(counts(1, 0, 0, 1, 1, 0, json!({})), "country", json!("UG")),
        ]),
        "{usage}"
    );

    // Explicit ranges: the day of the sends, and the day before (empty).
    let today = usage["to"].as_str().unwrap().to_owned();
    let (_, same) = parts(app.get(&format!("/v1/usage?from={today}&to={today}")).await).await;
    assert_eq!(same["totals"], usage["totals"]);
    let day = chrono::NaiveDate::parse_from_str(&today, "%Y-%m-%d").unwrap();
    let yesterday = (day - chrono::Days::new(1)).to_string();
    let (_, before) = parts(
        app.get(&format!("/v1/usage?from={yesterday}&to={yesterday}"))
            .await,
    )
    .await;
    assert_eq!(before["totals"], counts(0, 0, 0, 0, 0, 0, json!({})));
    assert_eq!(before["by_route"], json!([]));

    // Another tenant sees none of it.
    let other = app.new_key("globex").await;
    let (_, theirs) = parts(app.get_as(&other, "/v1/usage").await).await;
    assert_eq!(theirs["totals"]["sent"], 0);
}

#[tokio::test]
async fn usage_rejects_bad_ranges() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[1]).await;
    for query in [
        "from=2026-13-01",
        "to=yesterday",
        "from=2026-02-01&to=2026-01-31",
        "from=2024-01-01&to=2026-01-01",
    ] {
        let r = app.get(&format!("/v1/usage?{query}")).await;
        expect_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let (status, body) = parts(app.get("/v1/usage?from=2026-01-01&to=2026-01-31").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["from"].clone(), body["to"].clone()),
        (json!("2026-01-01"), json!("2026-01-31"))
    );
    let r = app.get_as("otpd_not-a-key", "/v1/usage").await;
    expect_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}
