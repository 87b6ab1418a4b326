//! Redis-specific behaviour the shared contract cannot show: a dead, silent or
//! stalled Redis turns into `Unavailable` within bounds instead of a hang, and a
//! store whose connection is killed or stalled recovers by itself.

use std::time::{Duration, Instant};
use tokio::net::TcpListener;

use otpd::domain::ApiKeyRecord;
use otpd::store::{RedisStore, Store, StoreError};
use uuid::Uuid;

use crate::helpers::StallingProxy;

/// Far above the store's own bounds (2 s per attempt, 10 s to connect), far below
/// "hung".
const HANG: Duration = Duration::from_secs(20);

async fn connect_within_bound(url: &str) -> (Result<RedisStore, StoreError>, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(HANG, RedisStore::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} hung for {HANG:?}"));
    (result, started.elapsed())
}

#[tokio::test]
async fn unreachable_redis_is_unavailable_quickly() {
    for url in ["redis://127.0.0.1:1", "redis+cluster://127.0.0.1:1"] {
        let (result, took) = connect_within_bound(url).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{url}: {result:?}"
        );
        assert!(took < Duration::from_secs(12), "{url} took {took:?}");
    }
}

#[tokio::test]
async fn silent_redis_is_unavailable_quickly() {
    // Accepts connections and never answers: what a hung or black-holed Redis
    // looks like from here.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let (result, took) = connect_within_bound(&format!("redis://127.0.0.1:{port}")).await;
    holder.abort();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(12), "took {took:?}");
}

fn test_redis_url() -> Option<String> {
    let url = std::env::var("OTPD_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipping: OTPD_TEST_REDIS_URL is not set");
    }
    url
}

fn api_key(key_hash: [u8; 32]) -> ApiKeyRecord {
    ApiKeyRecord {
        id: format!("key_{}", Uuid::new_v4().simple()),
        tenant: "t".into(),
        key_hash,
        // Stores keep milliseconds.
        created_at: chrono::DateTime::from_timestamp_millis(1_900_000_000_123).unwrap(),
        revoked_at: None,
    }
}

/// Retries `find_api_key` while the store answers `Unavailable`, for at most 10 s.
async fn find_once_recovered(store: &RedisStore, key: &[u8; 32]) -> Option<ApiKeyRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.find_api_key(key).await {
            Ok(found) => return found,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_is_unavailable_within_bounds_then_recovers() {
    let Some(url) = test_redis_url() else { return };
    let mut via_proxy = url::Url::parse(&url).unwrap();
    let upstream = tokio::net::lookup_host((
        via_proxy.host_str().unwrap().to_owned(),
        via_proxy.port().unwrap_or(6379),
    ))
    .await
    .unwrap()
    .next()
    .unwrap();
    let proxy = StallingProxy::start(upstream).await;
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let store = RedisStore::connect_with_prefix(via_proxy.as_str(), &prefix)
        .await
        .unwrap();
    let key = [7u8; 32];
    let record = api_key(key);
    store.insert_api_key(&record).await.unwrap();

    proxy.stall(true);
    for _ in 0..2 {
        let started = Instant::now();
        let result = tokio::time::timeout(HANG, store.find_api_key(&key))
            .await
            .expect("a stalled redis hung the store");
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(8), "took {took:?}");
    }

    proxy.stall(false);
    assert_eq!(find_once_recovered(&store, &key).await, Some(record));
}

fn client_ids_of(client_list: &str, user: &str) -> Vec<String> {
    client_list
        .lines()
        .filter(|line| line.split(' ').any(|f| f == format!("user={user}")))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("id=").map(str::to_owned))
        })
        .collect()
}

#[tokio::test]
async fn store_reconnects_after_its_connection_is_killed() {
    let Some(url) = test_redis_url() else { return };
    let admin = redis::Client::open(url.as_str()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();

    // The store logs in as a user of its own, so that killing its connections
    // cannot disturb tests running in parallel on the same Redis.
    let user = format!("otpdtest-{}", Uuid::new_v4().simple());
    let password = Uuid::new_v4().simple().to_string();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut store_url = url::Url::parse(&url).unwrap();
    store_url.set_username(&user).unwrap();
    store_url.set_password(Some(&password)).unwrap();
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let store = RedisStore::connect_with_prefix(store_url.as_str(), &prefix)
        .await
        .unwrap();

    let key = [42u8; 32];
    let record = api_key(key);
    store.insert_api_key(&record).await.unwrap();

    let lister = admin.clone();
    let list = || async {
        let mut admin = lister.clone();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .unwrap();
        client_ids_of(&list, &user)
    };
    let before = list().await;
    assert!(!before.is_empty(), "the store holds a connection");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "killed {killed}");

    // The first call may see the dead connection; within a bounded number of
    // tries the store must be back, with its data.
    let found = find_once_recovered(&store, &key).await;
    assert_eq!(found, Some(record));
    store.ping().await.unwrap();
    let after = list().await;
    assert!(!after.is_empty(), "the store reconnected");
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "a new connection, not the killed one: {before:?} -> {after:?}"
    );

    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
}

/// `find_current` is not in the shared contract yet; hold Redis to the memory
/// store's answers.
#[tokio::test]
async fn find_current_matches_the_memory_store() {
    use chrono::Duration as Span;
    use otpd::crypto::Crypto;
    use otpd::domain::{Code, PhoneNumber, Status, SubjectKey, Verification};
    use otpd::store::{MemoryStore, SendPlan};

    let Some(url) = test_redis_url() else { return };
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let redis = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .unwrap();
    let memory = MemoryStore::new();
    let crypto = Crypto::for_tests();
    let now = chrono::DateTime::from_timestamp_millis(1_900_000_000_123).unwrap();
    let tenant = format!("tenant-{}", Uuid::new_v4().simple());
    let phone = PhoneNumber::parse("+31651860670").unwrap();
    let code = Code::parse("123456").unwrap();
    let wrong = Code::parse("000000").unwrap();

    let mut answers: Vec<Vec<Option<(Uuid, Status)>>> = Vec::new();
    for store in [&redis as &dyn Store, &memory as &dyn Store] {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        let subject = SubjectKey(key);
        let spent = Uuid::new_v4();
        let pending = Uuid::new_v4();
        let verification = |id: Uuid, at| Verification {
            id,
            tenant: tenant.clone(),
            subject,
            purpose: "login".into(),
            uid: None,
            phone: crypto.seal_phone(&phone).unwrap(),
            masked_to: phone.masked(),
            country: None,
            code_hash: Some(crypto.code_hash(id, &code)),
            status: Status::Pending,
            attempts: 0,
            max_attempts: 2,
            send_count: 1,
            created_at: at,
            updated_at: at,
            expires_at: at + Span::seconds(300),
            last_sent_at: at,
            send_options: None,
        };
        let plan = |v| SendPlan {
            verification: v,
            cooldown_seconds: 30,
            max_sends_per_window: 5,
            send_window_seconds: 600,
            approval_counts: Vec::new(),
            subject_code_hash: None,
        };
        let mut seen = Vec::new();
        store
            .start_send(&plan(verification(spent, now)), now)
            .await
            .unwrap();
        seen.push(store.find_current(&tenant, &subject, now).await.unwrap());
        for _ in 0..2 {
            let hash = crypto.code_hash(spent, &wrong);
            store
                .check_code(&tenant, spent, &hash, None, now)
                .await
                .unwrap();
        }
        seen.push(store.find_current(&tenant, &subject, now).await.unwrap());
        seen.push(store.find_current("other", &subject, now).await.unwrap());
        let expired = now + Span::seconds(300);
        seen.push(
            store
                .find_current(&tenant, &subject, expired)
                .await
                .unwrap(),
        );
        // A new verification after the cooldown takes over.
        let later = now + Span::seconds(60);
        store
            .start_send(&plan(verification(pending, later)), later)
            .await
            .unwrap();
        seen.push(store.find_current(&tenant, &subject, later).await.unwrap());
        // Ids differ per store; compare shapes.
        let shape = |found: Option<(Uuid, Status)>| {
            found.map(|(id, status)| {
                let which = if id == spent {
                    Uuid::nil()
                } else {
                    Uuid::max()
                };
                (which, status)
            })
        };
        answers.push(seen.into_iter().map(shape).collect());
    }
    assert_eq!(
        answers[0],
        vec![
            Some((Uuid::nil(), Status::Pending)),
            Some((Uuid::nil(), Status::MaxAttempts)),
            None,
            None,
            Some((Uuid::max(), Status::Pending)),
        ]
    );
    assert_eq!(answers[0], answers[1], "redis and memory disagree");
}

/// The single Redis and, when configured, the cluster.
fn every_test_redis() -> Vec<String> {
    let mut urls: Vec<String> = test_redis_url().into_iter().collect();
    match std::env::var("OTPD_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.is_empty() => urls.push(url),
        _ => eprintln!("skipping the cluster: OTPD_TEST_REDIS_CLUSTER_URL is not set"),
    }
    urls
}

/// `key`'s PTTL, asked of `url` (either kind) directly.
async fn pttl(url: &str, key: &str) -> i64 {
    let cmd = redis::cmd("PTTL").arg(key).clone();
    match url.strip_prefix("redis+cluster://") {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            let mut conn = client.get_async_connection().await.unwrap();
            cmd.query_async(&mut conn).await.unwrap()
        }
        None => {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            cmd.query_async(&mut conn).await.unwrap()
        }
    }
}

/// Batched counter adds and reads (one script and one MGET on a node, split by
/// slot on a cluster) agree with the one-at-a-time calls, answer in order, stop
/// at a ceiling, and leave keys with the TTLs `add_to_counter` gives.
#[tokio::test]
async fn counter_batches_match_single_counters_and_their_ttls() {
    use otpd::store::{CounterAdd, CounterRead};

    for url in every_test_redis() {
        let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
        let store = RedisStore::connect_with_prefix(&url, &prefix)
            .await
            .unwrap();
        let now = chrono::DateTime::from_timestamp_millis(1_900_000_030_500).unwrap();
        let add = |key: String, amount, window_seconds, ceiling| CounterAdd {
            key,
            amount,
            window_seconds,
            ceiling,
        };

        // Many keys (so many slots), distinct amounts: answers keep their order.
        let adds: Vec<CounterAdd> = (1..=12u64)
            .map(|i| add(format!("batch:{i}"), i, 60 * i as u32, None))
            .collect();
        let totals = store.add_counters(&adds, now).await.unwrap();
        assert_eq!(totals, (1..=12).collect::<Vec<u64>>(), "{url}");
        let reads: Vec<CounterRead> = adds
            .iter()
            .map(|a| CounterRead {
                key: &a.key,
                window_seconds: a.window_seconds,
                at: now,
            })
            .chain([CounterRead {
                key: "batch:1",
                window_seconds: 60,
                at: now - chrono::Duration::seconds(60),
            }])
            .collect();
        let mut expected: Vec<u64> = (1..=12).collect();
        expected.push(0);
        assert_eq!(
            store.read_counters(&reads).await.unwrap(),
            expected,
            "{url}"
        );
        for (r, want) in reads.iter().zip(&expected) {
            let one = store
                .read_counter(r.key, r.window_seconds, r.at)
                .await
                .unwrap();
            assert_eq!(one, *want, "{url}: {}", r.key);
        }
        assert_eq!(store.read_counters(&[]).await.unwrap(), Vec::<u64>::new());
        assert_eq!(
            store.add_counters(&[], now).await.unwrap(),
            Vec::<u64>::new()
        );

        // Stops after the first add over its ceiling; that add is made.
        let capped = [
            add("cap:a".into(), 1, 600, Some(1)),
            add("cap:b".into(), 2, 600, Some(1)),
            add("cap:c".into(), 1, 600, None),
        ];
        assert_eq!(
            store.add_counters(&capped, now).await.unwrap(),
            [1, 2],
            "{url}"
        );
        let capped_reads: Vec<CounterRead> = capped
            .iter()
            .map(|a| CounterRead {
                key: &a.key,
                window_seconds: 600,
                at: now,
            })
            .collect();
        assert_eq!(
            store.read_counters(&capped_reads).await.unwrap(),
            [1, 2, 0],
            "{url}"
        );

        // A batch add gives its keys the TTL a single add gives, and a later add
        // (batched or not) leaves it alone.
        let slot = now.timestamp().div_euclid(3600);
        let key = |name: &str| format!("{prefix}:ctr:{name}:3600:{slot}");
        store
            .add_to_counter("ttl:single", 1, 3600, now)
            .await
            .unwrap();
        store
            .add_counters(&[add("ttl:batch".into(), 1, 3600, None)], now)
            .await
            .unwrap();
        // Through the end of the next window, plus a second.
        let full = (slot + 2) * 3600 * 1000 - now.timestamp_millis() + 1000;
        let single = pttl(&url, &key("ttl:single")).await;
        let batch = pttl(&url, &key("ttl:batch")).await;
        for ttl in [single, batch] {
            assert!(ttl <= full && ttl > full - 5_000, "{url}: {ttl} vs {full}");
        }
        assert!((single - batch).abs() < 1_000, "{url}: {single} vs {batch}");
        let later = now + chrono::Duration::seconds(600);
        store
            .add_to_counter("ttl:batch", 1, 3600, later)
            .await
            .unwrap();
        store
            .add_counters(&[add("ttl:single".into(), 1, 3600, None)], later)
            .await
            .unwrap();
        // 600 s later in the window, a fresh add would have set a TTL 600 s shorter.
        for name in ["ttl:single", "ttl:batch"] {
            let ttl = pttl(&url, &key(name)).await;
            assert!(ttl > full - 5_000, "{url}: {name} {ttl} vs {full}");
        }
    }
}

/// A store on the single test Redis under a key prefix of its own, with its
/// URL and prefix; `None` when `OTPD_TEST_REDIS_URL` is not set.
async fn single_node_store() -> Option<(crate::store_contract::DynStore, String, String)> {
    let url = test_redis_url()?;
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let store = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .unwrap();
    Some((std::sync::Arc::new(store), url, prefix))
}

/// A delivery record missing what otpd always writes (damaged by hand, say)
/// must not turn an approval into an error after the script approved: the
/// approval stands and the usage count is skipped.
#[tokio::test]
async fn an_approval_stands_when_its_attempt_record_is_damaged() {
    use crate::store_contract::{Fixture, message, t0};
    use otpd::store::CheckOutcome;

    let Some((store, url, prefix)) = single_node_store().await else {
        return;
    };
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let attempt = message(&f.tenant, id, "BX-damaged", now);
    store.insert_message(&attempt, None).await.unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("*{prefix}*:r:{}", attempt.id);
    let keys = crate::helpers::redis_keys_matching(&mut conn, &pattern).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: i64 = redis::cmd("HDEL")
        .arg(&keys[0])
        .arg("created_at")
        .query_async(&mut conn)
        .await
        .unwrap();

    let outcome = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert!(matches!(outcome, CheckOutcome::Approved(_)), "{outcome:?}");
    let day = now.date_naive();
    assert_eq!(store.usage(&f.tenant, day, day).await.unwrap(), vec![]);
}

/// On one node an approval adds the counts its send kept with the record, in
/// the check's own script: the counts worked out at check time are then not
/// asked for, and the keys get the TTL `add_counters` gives. A record kept
/// without them (written before they were kept) is counted as worked out at
/// check time, and a check that asks for no counts (the guard off) adds none.
#[tokio::test]
async fn an_approval_adds_the_counts_kept_with_its_record() {
    use crate::store_contract::{Fixture, t0};
    use otpd::domain::Verification;
    use otpd::store::{ApprovalCounts, CheckOutcome, CounterAdd, SendDecision};

    let Some((store, url, prefix)) = single_node_store().await else {
        return;
    };
    // Late in its hour, so a TTL from the wrong window start would show.
    let now = t0() + chrono::Duration::seconds(1800);
    let add = |key: &str| CounterAdd {
        key: key.to_owned(),
        amount: 1,
        window_seconds: 3600,
        ceiling: None,
    };
    let at_check: ApprovalCounts =
        std::sync::Arc::new(move |_: &Verification| vec![add("at-check")]);
    // A pending verification (code 123456) whose send kept `kept`.
    let start = async |kept: Vec<CounterAdd>| {
        let (f, id) = (Fixture::new(), Uuid::new_v4());
        let mut plan = f.plan(f.verification(id, "123456", now));
        plan.approval_counts = kept;
        let started = store.start_send(&plan, now).await.unwrap();
        assert!(
            matches!(started, SendDecision::Created { .. }),
            "{started:?}"
        );
        (f, id)
    };
    let approve_started = async |f: &Fixture, id: Uuid, counts: Option<&ApprovalCounts>| {
        let outcome = store
            .check_counted_code(&f.tenant, id, &f.hash(id, "123456"), None, counts, now)
            .await
            .unwrap();
        assert!(matches!(outcome, CheckOutcome::Approved(_)), "{outcome:?}");
    };
    let approve = async |kept: Vec<CounterAdd>, counts: Option<&ApprovalCounts>| {
        let (f, id) = start(kept).await;
        approve_started(&f, id, counts).await;
    };
    let count = async |key: &str| store.read_counter(key, 3600, now).await.unwrap();

    approve(vec![add("kept")], Some(&at_check)).await;
    assert_eq!((count("kept").await, count("at-check").await), (1, 0));
    store.add_counters(&[add("reference")], now).await.unwrap();
    let slot = now.timestamp().div_euclid(3600);
    let key = |name: &str| format!("{prefix}:ctr:{name}:3600:{slot}");
    let (kept_ttl, reference_ttl) = (
        pttl(&url, &key("kept")).await,
        pttl(&url, &key("reference")).await,
    );
    // Read a moment apart: equal to within a second, where a wrong window
    // start would be off by half an hour or more.
    assert!(
        (kept_ttl - reference_ttl).abs() <= 1000,
        "{kept_ttl} against {reference_ttl}"
    );

    approve(Vec::new(), Some(&at_check)).await;
    assert_eq!((count("kept").await, count("at-check").await), (1, 1));

    approve(vec![add("kept")], None).await;
    assert_eq!((count("kept").await, count("at-check").await), (1, 1));

    // Kept text that is not a list of adds (never written so) still approves,
    // and is counted as worked out at check time.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for garbage in ["not json", "[[1, 2]]", "{}"] {
        let (f, id) = start(vec![add("kept")]).await;
        let keys = crate::helpers::redis_keys_matching(&mut conn, &format!("*{prefix}*{id}")).await;
        let record = keys.iter().find(|k| !k.contains(":vref:")).unwrap();
        let _: i64 = redis::cmd("HSET")
            .arg(record)
            .arg("approval_counts")
            .arg(garbage)
            .query_async(&mut conn)
            .await
            .unwrap();
        approve_started(&f, id, Some(&at_check)).await;
    }
    assert_eq!((count("kept").await, count("at-check").await), (1, 4));
}

/// Every counter a send and its checks make expires with its window: the
/// guess budget's (a wrong check), the approval's (a right check), a send's
/// own adds; a later add to one leaves its expiry as it was.
#[tokio::test]
async fn every_counter_a_verification_makes_expires_with_its_window() {
    use crate::store_contract::{Fixture, t0};
    use otpd::domain::Verification;
    use otpd::store::{ApprovalCounts, CheckOutcome, CounterAdd, GuessBudget, SendDecision};

    let Some((store, url, prefix)) = single_node_store().await else {
        return;
    };
    let now = t0() + chrono::Duration::seconds(1800);
    // The approval adds what its send kept (below), nothing worked out at check time.
    let at_check: ApprovalCounts = std::sync::Arc::new(|_: &Verification| Vec::new());
    let add = |key: &str| CounterAdd {
        key: key.to_owned(),
        amount: 1,
        window_seconds: 3600,
        ceiling: None,
    };
    let f = Fixture::new();
    let id = Uuid::new_v4();
    let mut plan = f.plan(f.verification(id, "123456", now));
    plan.approval_counts = vec![add("approved")];
    let (decision, _) = store
        .start_counted_send(&plan, &[add("sent")], now)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Created { .. }),
        "{decision:?}"
    );
    for (code, approved) in [("123457", false), ("123456", true)] {
        let outcome = store
            .check_counted_code(
                &f.tenant,
                id,
                &f.hash(id, code),
                GuessBudget::new(10),
                Some(&at_check),
                now,
            )
            .await
            .unwrap();
        assert_eq!(
            matches!(outcome, CheckOutcome::Approved(_)),
            approved,
            "{outcome:?}"
        );
    }
    // A second add to an existing counter, later in its window.
    let later = now + chrono::Duration::seconds(600);
    store.add_counters(&[add("sent")], later).await.unwrap();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counters = crate::helpers::redis_keys_matching(&mut conn, &format!("{prefix}:ctr:*")).await;
    let kinds = |needle: &str| counters.iter().filter(|k| k.contains(needle)).count();
    assert_eq!(
        (
            kinds(":sent:"),
            kinds(":approved:"),
            kinds(GuessBudget::KEY_PREFIX)
        ),
        (1, 1, 1),
        "{counters:?}"
    );
    // Each kept through the end of the window after its own, plus a second
    // (an hour's windows here), counted from `now`, not from the later add.
    let slot = now.timestamp().div_euclid(3600);
    let full = (slot + 2) * 3600 * 1000 - now.timestamp_millis() + 1000;
    for key in &counters {
        let ttl = pttl(&url, key).await;
        assert!(ttl <= full && ttl > full - 5_000, "{key}: {ttl} vs {full}");
    }
}

/// The code's hash by subject is kept bound to its verification: copied with
/// the id-keyed hash into a later record of the same subject (by someone who
/// can write to Redis but holds no key), it does not let the old code in.
#[tokio::test]
async fn a_hash_by_subject_copied_to_another_verification_matches_nothing() {
    use crate::store_contract::{Fixture, t0};
    use otpd::store::{CheckOutcome, CurrentCheck};

    let Some((store, url, prefix)) = single_node_store().await else {
        return;
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let f = std::sync::Arc::new(Fixture::new());
    let now = t0();
    let record_of = async |conn: &mut redis::aio::MultiplexedConnection, id: Uuid| {
        let keys = crate::helpers::redis_keys_matching(conn, &format!("*{prefix}*{id}")).await;
        keys.into_iter().find(|k| !k.contains(":vref:")).unwrap()
    };

    let old = f.start(&store, "111111", now).await;
    let old_record = record_of(&mut conn, old).await;
    let copied: Vec<String> = redis::cmd("HMGET")
        .arg(&old_record)
        .arg("code_hash")
        .arg("subject_code_hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    store.cancel(&f.tenant, old, now).await.unwrap();

    let later = now + chrono::Duration::seconds(31);
    let new = f.start(&store, "222222", later).await;
    let new_record = record_of(&mut conn, new).await;
    let _: i64 = redis::cmd("HSET")
        .arg(&new_record)
        .arg("code_hash")
        .arg(&copied[0])
        .arg("subject_code_hash")
        .arg(&copied[1])
        .query_async(&mut conn)
        .await
        .unwrap();

    let check = store
        .check_current_code(
            &f.tenant,
            &f.subject,
            &f.hasher("111111"),
            None,
            None,
            later,
        )
        .await
        .unwrap();
    assert!(
        matches!(check, CurrentCheck::Checked(id, CheckOutcome::Wrong { .. }) if id == new),
        "{check:?}"
    );
}

/// A re-send after a failed delivery that moves the expiry also keeps the
/// subject's state (its current id, its cooldown) as long as the record, as a
/// send does: otherwise the state would expire first and a check by number
/// find nothing while the code is still pending.
#[tokio::test]
async fn a_resend_keeps_the_subjects_state_as_long_as_its_record() {
    use crate::store_contract::{Fixture, t0};
    use chrono::Duration as Span;

    let Some((store, url, prefix)) = single_node_store().await else {
        eprintln!("skipping: OTPD_TEST_REDIS_URL is not set");
        return;
    };
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let resent = now + Span::seconds(60);
    let replacement = f.resend(id, "654321", resent + Span::hours(25));
    store
        .replace_code(&replacement, resent)
        .await
        .unwrap()
        .expect("replaced");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let record =
        crate::helpers::redis_keys_matching(&mut conn, &format!("{{{prefix}:s:*}}:v:{id}")).await;
    let state =
        crate::helpers::redis_keys_matching(&mut conn, &format!("{{{prefix}:s:*}}:state")).await;
    assert_eq!((record.len(), state.len()), (1, 1), "{record:?} {state:?}");
    let (record_ttl, state_ttl) = (pttl(&url, &record[0]).await, pttl(&url, &state[0]).await);
    assert!(
        record_ttl > Span::hours(48).num_milliseconds(),
        "{record_ttl}"
    );
    assert!(
        state_ttl >= record_ttl - 1_000,
        "state {state_ttl} ms, record {record_ttl} ms"
    );
}
