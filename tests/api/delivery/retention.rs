//! Message records go after `retention.message_days`; usage stays.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::{TestApp, parts};

#[tokio::test]
async fn old_messages_are_purged_in_the_background_and_usage_stays() {
    let app = TestApp::spawn_with(|s| {
        s.store.purge_interval_seconds = 1;
        s.retention.message_days = 30;
    })
    .await;
    let sent = app.send_to("+31651860670").await;
    let path = format!(
        "/v1/messages/{}",
        sent["delivery"]["message_id"].as_str().unwrap()
    );
    let (_, usage) = parts(app.get("/v1/usage").await).await;
    let day = usage["to"].as_str().unwrap().to_owned();
    let usage_path = format!("/v1/usage?from={day}&to={day}");

    app.advance(31 * 86_400);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get(&path).await.status() != StatusCode::NOT_FOUND {
        assert!(
            Instant::now() < deadline,
            "the message outlived its retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, after) = parts(app.get(&usage_path).await).await;
    assert_eq!(after["totals"], usage["totals"], "usage outlives messages");
    assert_eq!(after["totals"]["sent"], 1);
}
