//! Behaviour of the SQL stores beyond the shared contract: durability across a
//! restart, bounded purges, several store handles (instances) on one database,
//! and failing fast when the database is unreachable.

use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, TimeZone, Utc};
use otpd::crypto::Crypto;
use otpd::domain::{Code, PhoneNumber, Status, SubjectKey, Verification};
use otpd::store::{
    CheckOutcome, InboxEntry, PostgresStore, SendDecision, SendPlan, SqliteStore, Store, StoreError,
};
use uuid::Uuid;

use crate::store_contract::{DynStore, postgres_store};

fn t0() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_900_000_000_456)
        .single()
        .unwrap()
}

fn random_subject() -> SubjectKey {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    k[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    SubjectKey(k)
}

fn hash(crypto: &Crypto, id: Uuid, code: &str) -> [u8; 32] {
    crypto.code_hash(id, &Code::parse(code).unwrap())
}

/// A plan for a new verification of a fresh subject with code 123456.
fn plan(crypto: &Crypto, tenant: &str, subject: SubjectKey, now: DateTime<Utc>) -> SendPlan {
    let phone = PhoneNumber::parse("+31651860670").unwrap();
    let id = Uuid::new_v4();
    SendPlan {
        verification: Verification {
            id,
            tenant: tenant.to_owned(),
            subject,
            purpose: "login".into(),
            uid: Some("user-42".into()),
            phone: crypto.seal_phone(&phone).unwrap(),
            masked_to: phone.masked(),
            country: Some("NL".into()),
            code_hash: Some(hash(crypto, id, "123456")),
            status: Status::Pending,
            attempts: 0,
            max_attempts: 5,
            send_count: 1,
            created_at: now,
            updated_at: now,
            expires_at: now + Duration::seconds(300),
            last_sent_at: now,
            send_options: None,
        },
        cooldown_seconds: 30,
        max_sends_per_window: 3,
        send_window_seconds: 600,
        approval_counts: Vec::new(),
        subject_code_hash: None,
    }
}

async fn create(store: &dyn Store, plan: &SendPlan, now: DateTime<Utc>) -> Verification {
    match store.start_send(plan, now).await.unwrap() {
        SendDecision::Created { verification, .. } => verification,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn scratch_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("otpd-sqlite-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep()
}

#[tokio::test]
async fn sqlite_verification_survives_reopening_the_file() {
    let crypto = Crypto::for_tests();
    let path = scratch_dir().join("nested").join("otpd.db");
    let now = t0();
    let subject = random_subject();
    let plan = plan(&crypto, "acme", subject, now);
    let id = plan.verification.id;

    let store = SqliteStore::open(&path).await.unwrap();
    let written = create(&store, &plan, now).await;
    let wrong = store
        .check_code("acme", id, &hash(&crypto, id, "000000"), None, now)
        .await
        .unwrap();
    assert_eq!(
        wrong,
        CheckOutcome::Wrong {
            attempts_left: 4,
            masked_to: "+*******0670".into()
        }
    );
    // Dropped without `close`, as when the process goes away.
    drop(store);

    let reopened = SqliteStore::open(&path).await.unwrap();
    let read = reopened
        .get_verification("acme", id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read,
        Verification {
            attempts: 1,
            ..written
        }
    );
    assert_eq!(
        reopened.find_pending("acme", &subject, now).await.unwrap(),
        Some(id)
    );
    let retry = reopened
        .start_send(&self::plan(&crypto, "acme", subject, now), now)
        .await
        .unwrap();
    assert!(
        matches!(retry, SendDecision::Cooldown { .. }),
        "the cooldown survives too: {retry:?}"
    );
    let right = reopened
        .check_code("acme", id, &hash(&crypto, id, "123456"), None, now)
        .await
        .unwrap();
    assert!(matches!(right, CheckOutcome::Approved(_)), "{right:?}");
}

async fn purge_touches_at_most_its_batch(store: &dyn Store) {
    let crypto = Crypto::for_tests();
    let now = t0();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let plan = plan(&crypto, "acme", random_subject(), now);
        ids.push(create(store, &plan, now).await.id);
    }
    for i in 0..3 {
        store
            .push_inbox(&InboxEntry {
                id: Uuid::new_v4(),
                tenant: "acme".into(),
                phone_index: [i; 32],
                masked_to: "+*******0670".into(),
                sealed_body: crypto.seal(b"code 123456").unwrap(),
                created_at: now,
                expires_at: now + Duration::seconds(60),
            })
            .await
            .unwrap();
    }
    let later = now + Duration::seconds(301);

    assert_eq!(store.purge_expired(later, 2).await.unwrap(), 2);
    let mut expired = 0;
    for id in &ids {
        let v = store.get_verification("acme", *id).await.unwrap().unwrap();
        if v.status == Status::Expired {
            assert_eq!(v.code_hash, None);
            expired += 1;
        } else {
            assert_eq!(
                v.status,
                Status::Pending,
                "untouched rows stay as they were"
            );
            assert!(v.code_hash.is_some());
        }
    }
    assert_eq!(expired, 2);

    // One verification and three inbox entries remain, then nothing.
    assert_eq!(store.purge_expired(later, 2).await.unwrap(), 2);
    assert_eq!(store.purge_expired(later, 2).await.unwrap(), 2);
    assert_eq!(store.purge_expired(later, 2).await.unwrap(), 0);
    for id in &ids {
        let v = store.get_verification("acme", *id).await.unwrap().unwrap();
        assert_eq!(v.status, Status::Expired);
    }
}

#[tokio::test]
async fn sqlite_purge_touches_at_most_its_batch() {
    let store = SqliteStore::open(&scratch_dir().join("otpd.db"))
        .await
        .unwrap();
    purge_touches_at_most_its_batch(&store).await;
}

#[tokio::test]
async fn postgres_purge_touches_at_most_its_batch() {
    if let Some(store) = postgres_store().await {
        purge_touches_at_most_its_batch(store.as_ref()).await;
    }
}

#[tokio::test]
async fn sqlite_open_rejects_an_unusable_path() {
    let dir = scratch_dir();
    // A directory where the database file should be.
    let started = Instant::now();
    let err = SqliteStore::open(&dir).await.err().expect("open must fail");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < StdDuration::from_secs(10));
}

/// Two handles on one file stand for two processes (e.g. `otpd keys create`
/// while the server runs): their writes must neither fail with `SQLITE_BUSY`
/// nor break single use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_handles_on_one_file_approve_once() {
    let crypto = Arc::new(Crypto::for_tests());
    let path = scratch_dir().join("otpd.db");
    let a: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let b: DynStore = Arc::new(SqliteStore::open(&path).await.unwrap());
    let now = t0();
    let plan = plan(&crypto, "acme", random_subject(), now);
    let id = create(a.as_ref(), &plan, now).await.id;
    let right = hash(&crypto, id, "123456");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.check_code("acme", id, &right, None, now).await })
        })
        .collect();
    let mut approved = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            CheckOutcome::Approved(_) => approved += 1,
            CheckOutcome::NotFound => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(approved, 1);
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable_quickly() {
    let started = Instant::now();
    // Port 1 on loopback: nothing listens, the connection is refused.
    let result = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test").await;
    let err = result.err().expect("connect must fail");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < StdDuration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn postgres_bad_url_or_schema_is_refused() {
    let err = PostgresStore::connect("not a url").await.err().unwrap();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = PostgresStore::connect_in_schema("postgres://postgres@127.0.0.1/x", "a\"; DROP")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

/// Two stores on one schema stand for two otpd instances behind a load
/// balancer: racing sends and checks spread over both still decide once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_instances_send_once_and_approve_once() {
    let Ok(url) = std::env::var("OTPD_TEST_POSTGRES_URL") else {
        eprintln!("skipping: OTPD_TEST_POSTGRES_URL is not set");
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let a: DynStore = Arc::new(
        PostgresStore::connect_in_schema(&url, &schema)
            .await
            .unwrap(),
    );
    let b: DynStore = Arc::new(
        PostgresStore::connect_in_schema(&url, &schema)
            .await
            .unwrap(),
    );
    let crypto = Arc::new(Crypto::for_tests());
    let now = t0();
    let subject = random_subject();

    let sends: Vec<_> = (0..20)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let plan = plan(&crypto, "acme", subject, now);
            tokio::spawn(async move { store.start_send(&plan, now).await.unwrap() })
        })
        .collect();
    let mut created = Vec::new();
    for t in sends {
        match t.await.unwrap() {
            SendDecision::Created { verification, .. } => created.push(verification.id),
            SendDecision::Cooldown { .. } | SendDecision::Conflict { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created.len(), 1);
    let id = created[0];

    let right = hash(&crypto, id, "123456");
    let checks: Vec<_> = (0..40)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .check_code("acme", id, &right, None, now)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut approved = 0;
    for t in checks {
        match t.await.unwrap() {
            CheckOutcome::Approved(_) => approved += 1,
            CheckOutcome::NotFound => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(approved, 1);
}

/// The backend's migrations up to version `last`, in a directory of their own.
fn migrations_through(backend: &str, last: u32) -> std::path::PathBuf {
    let dir = scratch_dir();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    for entry in std::fs::read_dir(&source).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let version: u32 = name[..4].parse().unwrap();
        if version <= last {
            std::fs::copy(source.join(&name), dir.join(&name)).unwrap();
        }
    }
    dir
}

/// A new SQLite file migrated through version `last`, and a pool on it.
async fn sqlite_through(last: u32) -> (std::path::PathBuf, sqlx::SqlitePool) {
    let file = scratch_dir().join("otpd.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::migrate::Migrator::new(migrations_through("sqlite", last))
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    (file, pool)
}

/// A new PostgreSQL schema migrated through version `last`, and a connection
/// in it: `None` (said on stderr) when `OTPD_TEST_POSTGRES_URL` is not set.
async fn postgres_through(last: u32) -> Option<(String, String, sqlx::PgConnection)> {
    let Ok(url) = std::env::var("OTPD_TEST_POSTGRES_URL") else {
        eprintln!("skipping: OTPD_TEST_POSTGRES_URL is not set");
        return None;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let setup = format!("CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\"");
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(migrations_through("postgres", last))
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    Some((url, schema, conn))
}

/// A verification and its delivered message as otpd wrote them before delivery
/// tracking; `BLOB` is the backend's literal for a few bytes.
fn old_rows_sql(blob: &str, verification: Uuid, message: Uuid) -> [String; 2] {
    let at = |secs: i64| (t0() + Duration::seconds(secs)).timestamp_millis();
    [
        format!(
            "INSERT INTO verifications (id, tenant, subject, purpose, uid, phone, masked_to,
                 country, code_hash, status, attempts, max_attempts, send_count, created_at,
                 updated_at, expires_at, last_sent_at)
             VALUES ('{verification}', 'acme', {blob}, 'login', NULL, {blob}, '+*******0670',
                 'NL', NULL, 'approved', 0, 5, 1, {t}, {t}, {t}, {t})",
            t = at(0)
        ),
        format!(
            "INSERT INTO messages (id, verification_id, tenant, route_id, provider,
                 provider_message_id, masked_to, country, status, error, cost, currency,
                 latency_ms, created_at, updated_at)
             VALUES ('{message}', '{verification}', 'acme', 3, 'bridgexapi', 'BX-old',
                 '+*******0670', 'NL', 'delivered', NULL, 0.05, 'EUR', 12, {}, {})",
            at(0),
            at(7)
        ),
    ]
}

/// What a store migrated past 0003 must make of the rows `old_rows_sql` wrote.
async fn old_rows_read_back(store: &dyn Store, verification: Uuid, message: Uuid) {
    let m = store.get_message("acme", message).await.unwrap().unwrap();
    assert_eq!(m.status, otpd::domain::DeliveryStatus::Delivered);
    assert_eq!(m.cost, Some(0.05));
    assert_eq!(
        m.delivered_at,
        Some(t0() + Duration::seconds(7)),
        "backfilled from the last change"
    );
    assert_eq!((m.sent_at, m.failed_at, m.resend_of), (None, None, None));
    assert_eq!(
        store.list_messages("acme", verification).await.unwrap(),
        vec![m]
    );
    // A late duplicate of the old delivery report is still recognised as one.
    let late = otpd::store::MessageUpdate {
        status: otpd::domain::DeliveryStatus::Delivered,
        error: None,
        cost: None,
        currency: None,
        at: t0() + Duration::seconds(60),
    };
    let t = store
        .update_message_by_provider_id("bridgexapi", "BX-old", &late)
        .await
        .unwrap()
        .unwrap();
    assert!(!t.moved());
}

#[tokio::test]
async fn sqlite_messages_written_before_delivery_tracking_still_read() {
    let (verification, message) = (Uuid::new_v4(), Uuid::new_v4());
    // The migrations before delivery tracking.
    let (file, pool) = sqlite_through(2).await;
    for sql in old_rows_sql("X'0000000101'", verification, message) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;

    let store = SqliteStore::open(&file).await.unwrap();
    old_rows_read_back(&store, verification, message).await;
}

#[tokio::test]
async fn postgres_messages_written_before_delivery_tracking_still_read() {
    let (verification, message) = (Uuid::new_v4(), Uuid::new_v4());
    // The migrations before delivery tracking.
    let Some((url, schema, mut conn)) = postgres_through(2).await else {
        return;
    };
    for sql in old_rows_sql("'\\x0000000101'::bytea", verification, message) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    drop(conn);
    let store = PostgresStore::connect_in_schema(&url, &schema)
        .await
        .unwrap();
    old_rows_read_back(&store, verification, message).await;
}

/// Ended verifications are deleted a day after they end, but only once retention
/// has removed their delivery records (nothing may point at a deleted row).
async fn ended_verifications_go_after_their_messages(store: &dyn Store) {
    let crypto = Crypto::for_tests();
    let now = t0();
    let bare = create(store, &plan(&crypto, "acme", random_subject(), now), now)
        .await
        .id;
    let with_message = create(store, &plan(&crypto, "acme", random_subject(), now), now)
        .await
        .id;
    let record = crate::store_contract::message("acme", with_message, "BX-retention", now);
    store.insert_message(&record, None).await.unwrap();

    let expired = now + Duration::seconds(301);
    while store.purge_expired(expired, 100).await.unwrap() > 0 {}
    let v = store.get_verification("acme", bare).await.unwrap().unwrap();
    assert_eq!(v.status, Status::Expired, "ended, still readable");

    let next_day = expired + Duration::hours(25);
    while store.purge_expired(next_day, 100).await.unwrap() > 0 {}
    assert_eq!(store.get_verification("acme", bare).await.unwrap(), None);
    assert!(
        store
            .get_verification("acme", with_message)
            .await
            .unwrap()
            .is_some(),
        "kept while a delivery record refers to it"
    );

    while store.purge_messages(next_day, 100).await.unwrap() > 0 {}
    while store.purge_expired(next_day, 100).await.unwrap() > 0 {}
    assert_eq!(
        store.get_verification("acme", with_message).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn sqlite_ended_verifications_go_after_their_messages() {
    let store = SqliteStore::open(&scratch_dir().join("otpd.db"))
        .await
        .unwrap();
    ended_verifications_go_after_their_messages(&store).await;
}

#[tokio::test]
async fn postgres_ended_verifications_go_after_their_messages() {
    if let Some(store) = postgres_store().await {
        ended_verifications_go_after_their_messages(store.as_ref()).await;
    }
}

/// A day's usage as otpd wrote it before usage rows had stripes.
const OLD_USAGE_SQL: &str = "INSERT INTO usage_daily (tenant, day, route_id, country, currency,
         sent, delivered, failed, verifications_started, verifications_approved, cost_micros)
     VALUES ('acme', '2030-03-17', 3, 'NL', 'EUR', 5, 4, 1, 5, 2, 200000)";

/// What a store migrated to stripes must make of `OLD_USAGE_SQL`: the same
/// row, which a new delta of the same day then adds to.
async fn old_usage_adds_up(store: &dyn Store) {
    let day = chrono::NaiveDate::from_ymd_opt(2030, 3, 17).unwrap();
    let row = |sent, delivered, approved, cost_micros| otpd::store::UsageRow {
        tenant: "acme".into(),
        day,
        route_id: 3,
        country: Some("NL".into()),
        currency: Some("EUR".into()),
        sent,
        delivered,
        failed: 1,
        verifications_started: sent,
        verifications_approved: approved,
        cost_micros,
    };
    assert_eq!(
        store.usage("acme", day, day).await.unwrap(),
        [row(5, 4, 2, 200_000)]
    );
    let mut delta = row(1, 1, 1, 50_000);
    delta.failed = 0;
    store.record_usage(&delta).await.unwrap();
    assert_eq!(
        store.usage("acme", day, day).await.unwrap(),
        [row(6, 5, 3, 250_000)]
    );
}

#[tokio::test]
async fn sqlite_usage_written_before_stripes_still_adds_up() {
    let (file, pool) = sqlite_through(4).await;
    sqlx::query(OLD_USAGE_SQL).execute(&pool).await.unwrap();
    pool.close().await;

    let store = SqliteStore::open(&file).await.unwrap();
    old_usage_adds_up(&store).await;
}

#[tokio::test]
async fn postgres_usage_written_before_stripes_still_adds_up() {
    let Some((url, schema, mut conn)) = postgres_through(6).await else {
        return;
    };
    sqlx::query(OLD_USAGE_SQL).execute(&mut conn).await.unwrap();
    drop(conn);
    let store = PostgresStore::connect_in_schema(&url, &schema)
        .await
        .unwrap();
    old_usage_adds_up(&store).await;
}
