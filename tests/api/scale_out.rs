//! Several otpd instances on one shared store act as one service, and a store
//! outage answers 503 quickly, then heals by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use otpd::store::bounded::Bounded;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{StallingProxy, TestApp, expect_error, parts, wrong};
use crate::store_contract::DynStore;

const NL: &str = "+31651860670";

/// Which shared backend a test runs on.
#[derive(Clone, Copy)]
pub enum Shared {
    Redis,
    RedisCluster,
    Postgres,
}

impl Shared {
    pub fn url(self) -> Option<String> {
        let var = match self {
            Shared::Redis => "OTPD_TEST_REDIS_URL",
            Shared::RedisCluster => "OTPD_TEST_REDIS_CLUSTER_URL",
            Shared::Postgres => "OTPD_TEST_POSTGRES_URL",
        };
        let url = std::env::var(var).ok().filter(|u| !u.is_empty());
        if url.is_none() {
            eprintln!("skipping: {var} is not set");
        }
        url
    }

    /// A new handle on `namespace` (a Redis key prefix or a PostgreSQL schema).
    pub async fn open(self, url: &str, namespace: &str) -> DynStore {
        match self {
            Shared::Redis | Shared::RedisCluster => Arc::new(
                otpd::store::RedisStore::connect_with_prefix(url, namespace)
                    .await
                    .unwrap(),
            ),
            Shared::Postgres => Arc::new(
                otpd::store::PostgresStore::connect_in_schema(url, namespace)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Two instances, each with its own connection to one shared namespace.
    async fn two_instances(self) -> Option<(TestApp, TestApp)> {
        let url = self.url()?;
        let namespace = format!("t_{}", Uuid::new_v4().simple());
        let a = TestApp::spawn_on(self.open(&url, &namespace).await, |_| {}).await;
        let b = TestApp::spawn_on(self.open(&url, &namespace).await, |_| {}).await;
        Some((a, b))
    }
}

async fn send(app: &TestApp, key: &str) -> (StatusCode, Value) {
    parts(
        app.post_as(key, "/v1/verifications", json!({ "to": NL }))
            .await,
    )
    .await
}

async fn check(app: &TestApp, key: &str, id: &Value, code: &str) -> (StatusCode, Value) {
    parts(
        app.post_as(
            key,
            "/v1/verifications/check",
            json!({ "id": id, "code": code }),
        )
        .await,
    )
    .await
}

pub async fn send_on_a_check_on_b(kind: Shared) {
    let Some((a, b)) = kind.two_instances().await else {
        return;
    };
    let (status, sent) = send(&a, &a.key).await;
    assert_eq!(status, StatusCode::CREATED);
    // A's key authenticates on B: keys live in the shared store.
    let (status, body) = check(
        &b,
        &a.key,
        &sent["id"],
        sent["debug_code"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body["valid"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    let (status, _) = check(
        &a,
        &a.key,
        &sent["id"],
        sent["debug_code"].as_str().unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "approved on B means spent on A"
    );
}

pub async fn cooldown_on_a_blocks_b(kind: Shared) {
    let Some((a, b)) = kind.two_instances().await else {
        return;
    };
    assert_eq!(send(&a, &a.key).await.0, StatusCode::CREATED);
    let r = b
        .post_as(&a.key, "/v1/verifications", json!({ "to": NL }))
        .await;
    expect_error(r, StatusCode::TOO_MANY_REQUESTS, "cooldown").await;
}

pub async fn wrong_guesses_spread_over_instances_stop_at_the_limit(kind: Shared) {
    let Some((a, b)) = kind.two_instances().await else {
        return;
    };
    let (_, sent) = send(&a, &a.key).await;
    let code = sent["debug_code"].as_str().unwrap().to_owned();
    let guess = wrong(&code);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            check(app, &a.key, &sent["id"], &guess)
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let counted = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (counted, refused),
        (5, 15),
        "exactly max_attempts wrong guesses are counted"
    );
    let (status, _) = check(&b, &a.key, &sent["id"], &code).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "then even the right code fails"
    );
}

pub async fn concurrent_checks_split_over_instances_approve_once(kind: Shared) {
    let Some((a, b)) = kind.two_instances().await else {
        return;
    };
    let (_, sent) = send(&a, &a.key).await;
    let code = sent["debug_code"].as_str().unwrap().to_owned();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            check(app, &a.key, &sent["id"], &code)
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let approved = results
        .iter()
        .filter(|(_, b)| b["valid"] == json!(true))
        .count();
    assert_eq!(approved, 1);
    assert!(
        results
            .iter()
            .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::NOT_FOUND)
    );
}

/// The store stops answering mid-run: requests answer 503 within the operation
/// bound (never a hang, never a wrong verdict), and the service heals when it returns.
pub async fn store_outage_answers_503_then_recovers(kind: Shared) {
    let Some(url) = kind.url() else { return };
    let mut via_proxy = url::Url::parse(&url).unwrap();
    let host = via_proxy.host_str().unwrap().to_owned();
    let port = via_proxy.port_or_known_default().unwrap_or(6379);
    let upstream = tokio::net::lookup_host((host, port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = StallingProxy::start(upstream).await;
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let namespace = format!("t_{}", Uuid::new_v4().simple());
    let inner = kind.open(via_proxy.as_str(), &namespace).await;
    let store: DynStore = Arc::new(Bounded::new(inner, Duration::from_secs(2)));
    let app = TestApp::spawn_on(store, |_| {}).await;
    let (status, sent) = send(&app, &app.key).await;
    assert_eq!(status, StatusCode::CREATED);
    let code = sent["debug_code"].as_str().unwrap().to_owned();

    // A wrong guess: a check whose answer is lost may still reach the store
    // and count once it returns (as any write whose reply never came back).
    let wrong = if code == "000000" { "111111" } else { "000000" };
    proxy.stall(true);
    let started = Instant::now();
    let r = app
        .post(
            "/v1/verifications/check",
            json!({ "id": sent["id"], "code": wrong }),
        )
        .await;
    assert_eq!(r.headers()["retry-after"], "1");
    expect_error(r, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    let health = app
        .client
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);

    proxy.stall(false);
    // Recovery is the store client's own reconnect; poll with a bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = check(&app, &app.key, &sent["id"], &code).await;
        if status == StatusCode::OK {
            assert_eq!(body["valid"], true, "the code survived the outage unspent");
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

macro_rules! scale_out_tests {
    ($backend:ident, $kind:expr $(, $outage:ident)?) => {
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn send_on_a_check_on_b() {
                super::send_on_a_check_on_b($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cooldown_on_a_blocks_b() {
                super::cooldown_on_a_blocks_b($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wrong_guesses_spread_over_instances_stop_at_the_limit() {
                super::wrong_guesses_spread_over_instances_stop_at_the_limit($kind).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_checks_split_over_instances_approve_once() {
                super::concurrent_checks_split_over_instances_approve_once($kind).await
            }
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $outage() {
                    super::store_outage_answers_503_then_recovers($kind).await
                }
            )?
        }
    };
}

scale_out_tests!(redis, Shared::Redis, store_outage_answers_503_then_recovers);
// A cluster client follows the nodes' own announced addresses, so a proxy in
// front of one node cannot cut it off; the single-node outage test covers the client.
scale_out_tests!(redis_cluster, Shared::RedisCluster);
scale_out_tests!(
    postgres,
    Shared::Postgres,
    store_outage_answers_503_then_recovers
);
