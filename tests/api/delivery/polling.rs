//! BridgeXAPI pushes nothing: otpd polls `GET /api/v1/dlr/{id}` on a backoff
//! schedule, once per message per step even with several instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use otpd::service::dlr_poller::PollStats;
use otpd::store::Store;
use serde_json::json;
use wiremock::ResponseTemplate;

use super::{Providers, check, deliveries, hits, last_code};
use crate::helpers::TestApp;
use crate::store_contract::{postgres_store, redis_store_from_env};

fn dlr_path(bx_message_id: &str) -> String {
    format!("/api/v1/dlr/{bx_message_id}")
}

async fn polls(providers: &Providers) -> usize {
    providers
        .bridgex
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().starts_with("/api/v1/dlr/"))
        .count()
}

#[tokio::test]
async fn bridgex_messages_are_polled_with_backoff_until_final() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[3]).await;
    let sent = app.send_to("+31651860670").await;
    let id = sent["id"].as_str().unwrap();
    assert_eq!(sent["delivery"]["provider_message_id"], "BX-1-abc");

    // Too young to have a report: not polled.
    assert_eq!(app.poller.poll_once().await, PollStats::default());
    assert_eq!(polls(&providers).await, 0);

    // No record yet: BridgeXAPI says 404 "DLR record not found".
    app.advance(6);
    let stats = app.poller.poll_once().await;
    assert_eq!((stats.polled, stats.not_found), (1, 1), "{stats:?}");
    let requests = providers.bridgex.received_requests().await.unwrap();
    let poll = requests
        .iter()
        .find(|r| r.method.as_str() == "GET")
        .unwrap();
    assert_eq!(poll.url.path(), dlr_path("BX-1-abc"));
    assert_eq!(poll.headers.get("x-api-key").unwrap(), "test-key");
    assert_eq!(deliveries(&app, id).await[0]["status"], "queued");

    // Not due again until 20 s after the send.
    app.advance(10);
    assert_eq!(app.poller.poll_once().await.polled, 0);
    assert_eq!(polls(&providers).await, 1);

    providers.dlr.report("BX-1-abc", "sent", None);
    app.advance(5);
    assert_eq!(app.poller.poll_once().await.updated, 1);
    let d = &deliveries(&app, id).await[0];
    assert_eq!(d["status"], "sent");
    assert!(d["sent_at"].is_string(), "{d}");

    // Next step: 80 s after the send.
    providers.dlr.report("BX-1-abc", "DELIVRD", None);
    app.advance(30);
    assert_eq!(app.poller.poll_once().await.polled, 0);
    app.advance(30);
    assert_eq!(app.poller.poll_once().await.updated, 1);
    let d = &deliveries(&app, id).await[0];
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(polls(&providers).await, 3);

    // Final: never polled again.
    app.advance(3_600);
    assert_eq!(app.poller.poll_once().await, PollStats::default());
    assert_eq!(polls(&providers).await, 3);
}

#[tokio::test]
async fn timeouts_errors_and_unknown_statuses_leave_the_message_for_a_later_poll() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[3]);
        s.routes[2].timeout_ms = Some(300);
        s.routes[2].connect_timeout_ms = Some(200);
    })
    .await;
    let sent = app.send_to("+31651860670").await;
    let id = sent["id"].as_str().unwrap();

    providers.dlr.answer(
        "BX-1-abc",
        ResponseTemplate::new(200)
            .set_delay(Duration::from_secs(3))
            .set_body_json(json!({"bx_message_id": "BX-1-abc", "status": "delivered"})),
    );
    app.advance(6);
    let started = Instant::now();
    let stats = app.poller.poll_once().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a stalled provider must not stall the poller"
    );
    assert_eq!((stats.polled, stats.failed), (1, 1), "{stats:?}");
    assert_eq!(deliveries(&app, id).await[0]["status"], "queued");

    providers.dlr.answer(
        "BX-1-abc",
        ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"),
    );
    app.advance(15);
    assert_eq!(app.poller.poll_once().await.failed, 1);

    providers.dlr.answer(
        "BX-1-abc",
        ResponseTemplate::new(200).set_body_string("not json"),
    );
    app.advance(60);
    assert_eq!(app.poller.poll_once().await.failed, 1);

    // A status this code does not know leaves the message as it is.
    providers.dlr.report("BX-1-abc", "teleported", None);
    app.advance(120);
    let stats = app.poller.poll_once().await;
    assert_eq!(
        (stats.polled, stats.updated, stats.failed),
        (1, 0, 0),
        "{stats:?}"
    );
    assert_eq!(deliveries(&app, id).await[0]["status"], "queued");

    providers.dlr.report("BX-1-abc", "delivered", None);
    app.advance(240);
    assert_eq!(app.poller.poll_once().await.updated, 1);
    assert_eq!(deliveries(&app, id).await[0]["status"], "delivered");
}

/// Route 3 (BridgeXAPI) alone, its poller reading pages of `batch` messages.
async fn spawn_polling_in_pages_of(providers: &Providers, batch: u32) -> TestApp {
    TestApp::spawn_with(|s| {
        providers.configure(s, &[3]);
        s.dlr.poll_batch = batch;
    })
    .await
}

/// A round reads at most ten pages; a backlog longer than that is swept over
/// several rounds, each going on where the last stopped, so newer messages are
/// reached even while older ones stay unfinished.
#[tokio::test]
async fn a_backlog_longer_than_a_round_is_swept_over_several() {
    let providers = Providers::start().await;
    let app = spawn_polling_in_pages_of(&providers, 1).await;
    for n in 0..7 {
        app.send_to(&format!("+3165186{n:04}")).await;
        app.advance(1);
    }
    app.advance(6);
    // Pages of one, each read twice (the next page starts a millisecond
    // before the last one's): ten pages reach five messages.
    assert_eq!(app.poller.poll_once().await.polled, 5);
    assert_eq!(
        app.poller.poll_once().await.polled,
        2,
        "the rest, not the first five again"
    );
    // Swept: the next starts over at the oldest (none due yet).
    assert_eq!(app.poller.poll_once().await.polled, 0);
}

/// Messages created in the same millisecond as the last of a page are not
/// skipped by the next page (which starts after a creation time).
#[tokio::test]
async fn messages_sharing_a_pages_last_millisecond_are_all_polled() {
    let providers = Providers::start().await;
    let app = spawn_polling_in_pages_of(&providers, 2).await;
    app.send_to("+31651860001").await;
    app.advance(1);
    // Two sends in one millisecond of the manual clock: the first page ends
    // with one of them.
    app.send_to("+31651860002").await;
    app.send_to("+31651860003").await;
    app.advance(6);
    assert_eq!(app.poller.poll_once().await.polled, 3);
    assert_eq!(polls(&providers).await, 3);
}

#[tokio::test]
async fn messages_past_the_max_age_are_left_alone() {
    let providers = Providers::start().await;
    let app = TestApp::spawn_with(|s| {
        providers.configure(s, &[3]);
        s.dlr.poll_max_age_seconds = 3_600;
    })
    .await;
    app.send_to("+31651860670").await;
    app.advance(3_601);
    assert_eq!(app.poller.poll_once().await, PollStats::default());
    assert_eq!(polls(&providers).await, 0);
}

#[tokio::test]
async fn a_polled_failure_is_resent_over_the_next_route() {
    let providers = Providers::start().await;
    let app = providers.spawn(&[3, 1]).await;
    let sent = app.send_to("+254711000111").await;
    let id = sent["id"].as_str().unwrap();
    providers
        .dlr
        .report("BX-1-abc", "failed", Some("Absent subscriber"));
    app.advance(6);
    assert_eq!(app.poller.poll_once().await.updated, 1);
    let list = deliveries(&app, id).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["status"], "failed");
    assert_eq!(list[0]["error"], "delivery_failed: Absent subscriber");
    assert_eq!(list[1]["provider"], "africastalking");
    assert_eq!(list[1]["resend_of"], list[0]["message_id"]);
    let code = last_code(&providers.at).await;
    let (_, body) = check(&app, id, &code).await;
    assert_eq!(body["valid"], true, "{body}");
    // The failed message is final: no more polls for it.
    app.advance(600);
    app.poller.poll_once().await;
    assert_eq!(hits(&providers.bridgex, &dlr_path("BX-1-abc")).await, 1);
}

/// Two otpd instances on one store: each message is polled by one of them per
/// step of the schedule, never by both.
async fn two_instances_poll_each_message_once(store: Arc<dyn Store>) {
    let providers = Providers::start().await;
    let a = TestApp::spawn_full(store.clone(), None, |s| providers.configure(s, &[3])).await;
    let b = TestApp::spawn_full(store, None, |s| providers.configure(s, &[3])).await;
    let numbers = [
        "+31651860670",
        "+31651860671",
        "+31651860672",
        "+31651860673",
    ];
    for to in numbers {
        a.send_to(to).await;
    }
    let both = |secs| {
        a.advance(secs);
        b.advance(secs);
    };

    both(6);
    let (sa, sb) = tokio::join!(a.poller.poll_once(), b.poller.poll_once());
    assert_eq!(sa.polled + sb.polled, 4, "{sa:?} {sb:?}");
    assert_eq!(polls(&providers).await, 4);
    let per_message = |n: usize| {
        let providers = &providers;
        async move { hits(&providers.bridgex, &dlr_path(&format!("BX-{n}-abc"))).await }
    };
    for n in 1..=4 {
        assert_eq!(per_message(n).await, 1, "BX-{n}");
    }

    // Rounds before the next step poll nothing, on either instance.
    both(5);
    let (sa, sb) = tokio::join!(a.poller.poll_once(), b.poller.poll_once());
    assert_eq!(sa.polled + sb.polled, 0);

    providers.dlr.report("BX-2-abc", "delivered", None);
    both(10);
    let (sa, sb) = tokio::join!(a.poller.poll_once(), b.poller.poll_once());
    assert_eq!(sa.polled + sb.polled, 4, "{sa:?} {sb:?}");
    assert_eq!(sa.updated + sb.updated, 1);
    for n in 1..=4 {
        assert_eq!(per_message(n).await, 2, "BX-{n}");
    }

    // BX-2 is final; the other three are polled at the next step, once each.
    both(60);
    let (sa, sb) = tokio::join!(a.poller.poll_once(), b.poller.poll_once());
    assert_eq!(sa.polled + sb.polled, 3, "{sa:?} {sb:?}");
    assert_eq!(per_message(2).await, 2);
    assert_eq!(polls(&providers).await, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_memory_store_poll_each_message_once() {
    two_instances_poll_each_message_once(Arc::new(otpd::store::MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_poll_each_message_once() {
    let Some(store) = redis_store_from_env("OTPD_TEST_REDIS_URL").await else {
        return;
    };
    two_instances_poll_each_message_once(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_cluster_poll_each_message_once() {
    let Some(store) = redis_store_from_env("OTPD_TEST_REDIS_CLUSTER_URL").await else {
        return;
    };
    two_instances_poll_each_message_once(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_poll_each_message_once() {
    let Some(store) = postgres_store().await else {
        return;
    };
    two_instances_poll_each_message_once(store).await;
}
