//! Data protection at rest: after a realistic run, a dump of everything a store
//! holds (every SQLite row and the raw files, every PostgreSQL row, every Redis
//! key) contains neither the phone number nor any code in clear; and phone-key
//! rotation re-encrypts live numbers so an old key can be retired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use otpd::crypto::{Crypto, KeyMaterial};
use otpd::store::Store;
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::helpers::{TestApp, parts, wrong};
use crate::process::start_otpd;

const NL: &str = "+31651860670";
/// What must never be found: the number in E.164 digits and in national form.
const NUMBER_FORMS: [&str; 2] = ["31651860670", "651860670"];

/// Drives one app through sends, resends, wrong and right checks, a cancel, the
/// sandbox inbox and a guard quarantine; returns every code it issued.
async fn exercise(app: &TestApp) -> Vec<String> {
    let mut codes = Vec::new();
    let pending = app.send_to(NL).await;
    codes.push(pending["debug_code"].as_str().unwrap().to_owned());

    let by_uid = app
        .post("/v1/verifications", json!({ "to": NL, "uid": "user-42" }))
        .await;
    let (status, by_uid) = parts(by_uid).await;
    assert_eq!(status, StatusCode::CREATED, "{by_uid}");
    let code = by_uid["debug_code"].as_str().unwrap().to_owned();
    let check = |body: Value| app.post("/v1/verifications/check", body);
    assert_eq!(
        check(json!({ "uid": "user-42", "code": wrong(&code) }))
            .await
            .status(),
        StatusCode::OK
    );
    app.advance(31);
    let resent = app
        .post("/v1/verifications", json!({ "to": NL, "uid": "user-42" }))
        .await;
    let (_, resent) = parts(resent).await;
    codes.push(code);
    let code = resent["debug_code"].as_str().unwrap().to_owned();
    let (status, body) = parts(check(json!({ "uid": "user-42", "code": code })).await).await;
    assert_eq!((status, &body["valid"]), (StatusCode::OK, &json!(true)));
    codes.push(code);

    let canceled = app
        .post(
            "/v1/verifications",
            json!({ "to": NL, "purpose": "signup" }),
        )
        .await;
    let (_, canceled) = parts(canceled).await;
    codes.push(canceled["debug_code"].as_str().unwrap().to_owned());
    let path = format!(
        "/v1/verifications/{}/cancel",
        canceled["id"].as_str().unwrap()
    );
    assert_eq!(app.post(&path, json!({})).await.status(), StatusCode::OK);

    // The inbox holds message bodies (sealed); reading them must not unseal the store.
    let inbox = app
        .get(&format!(
            "/v1/sandbox/messages?to={}",
            urlencoding::encode(NL)
        ))
        .await;
    assert_eq!(inbox.status(), StatusCode::OK);

    // Guard state: the fifth send to +31651, with one of four approved, trips a
    // quarantine (threshold 4, floor 50%).
    let tripped = app
        .post("/v1/verifications", json!({ "to": NL, "purpose": "other" }))
        .await;
    assert_eq!(tripped.status(), StatusCode::FORBIDDEN);
    codes
}

fn settings(s: &mut otpd::config::Settings) {
    // Ten digits: long enough that a code cannot turn up in random bytes by chance.
    s.policy.code_length = 10;
    s.policy.guard.max_sends_per_prefix_hour = 4;
    s.policy.guard.min_conversion = 0.5;
}

/// Fails naming the first secret found in `dump`, raw or hex-encoded (stores
/// hex-encode binary values, so a plaintext inside one would show as hex).
fn assert_clean(dump: &str, codes: &[String], what: &str) {
    assert!(
        dump.contains("*******0670"),
        "{what}: the dump does not even hold the masked number; is it empty?"
    );
    let lower = dump.to_ascii_lowercase();
    let secrets = NUMBER_FORMS
        .iter()
        .map(|s| s.to_string())
        .chain(codes.iter().cloned());
    for secret in secrets {
        assert!(secret.len() >= 9, "{secret}");
        assert!(!dump.contains(&secret), "{what}: {secret} in clear");
        let hexed = hex::encode(secret.as_bytes());
        assert!(!lower.contains(&hexed), "{what}: {secret} hex-encoded");
    }
    // The guard's traffic counters (`guard:sent:{tenant tag}:{prefix}`) name a
    // number's prefix by a blind index: beside a record's masked last four
    // digits, its leading digits in clear would all but name the number.
    let mut named = 0;
    for kind in ["guard:sent:", "guard:ok:"] {
        for (at, _) in dump.match_indices(kind) {
            let prefix = dump[at + kind.len()..].split(':').nth(1).unwrap_or("");
            assert!(!prefix.starts_with('+'), "{what}: {kind} names {prefix}");
            named += 1;
        }
    }
    assert!(named > 0, "{what}: no guard counter in the dump");
}

/// Every value of every row of every table, through SQL, plus the raw bytes
/// of the database files.
async fn dump_sqlite(path: &Path) -> String {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .read_only(true),
        )
        .await
        .unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(tables.iter().any(|t| t == "verifications"), "{tables:?}");
    let mut dump = String::new();
    for table in tables {
        let columns: Vec<String> =
            sqlx::query(AssertSqlSafe(format!("PRAGMA table_info(\"{table}\")")))
                .fetch_all(&pool)
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("name"))
                .collect();
        for column in columns {
            // hex() renders any value (text, blob, number) as its bytes.
            let values: Vec<Option<String>> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT hex(\"{column}\") FROM \"{table}\""
            )))
            .fetch_all(&pool)
            .await
            .unwrap();
            for value in values.into_iter().flatten() {
                let bytes = hex::decode(&value).unwrap();
                dump.push_str(&String::from_utf8_lossy(&bytes));
                dump.push('\n');
            }
        }
    }
    pool.close().await;
    for suffix in ["", "-wal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        if let Ok(bytes) = std::fs::read(PathBuf::from(file)) {
            dump.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    dump
}

#[tokio::test]
async fn sqlite_file_holds_no_number_and_no_code_in_clear() {
    let dir = tempfile::Builder::new()
        .prefix("otpd-at-rest-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let path = dir.path().join("otpd.db");
    let store = Arc::new(otpd::store::SqliteStore::open(&path).await.unwrap());
    let app = TestApp::spawn_on(store.clone(), settings).await;
    let codes = exercise(&app).await;
    let dump = dump_sqlite(&path).await;
    assert_clean(&dump, &codes, "sqlite");
}

#[tokio::test]
async fn postgres_rows_hold_no_number_and_no_code_in_clear() {
    let Ok(url) = std::env::var("OTPD_TEST_POSTGRES_URL") else {
        eprintln!("skipping: OTPD_TEST_POSTGRES_URL is not set");
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let store = otpd::store::PostgresStore::connect_in_schema(&url, &schema)
        .await
        .unwrap();
    let app = TestApp::spawn_on(Arc::new(store), settings).await;
    let codes = exercise(&app).await;

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "verifications"), "{tables:?}");
    let mut dump = String::new();
    for table in tables {
        // A whole row as text: bytea columns render as \x followed by hex.
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT t::text FROM \"{schema}\".\"{table}\" t"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        for row in rows {
            dump.push_str(&row);
            dump.push('\n');
        }
    }
    assert_clean(&dump, &codes, "postgres");
}

#[tokio::test]
async fn redis_keys_hold_no_number_and_no_code_in_clear() {
    let Some(url) = std::env::var("OTPD_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("skipping: OTPD_TEST_REDIS_URL is not set");
        return;
    };
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let store = otpd::store::RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .unwrap();
    let app = TestApp::spawn_on(Arc::new(store), settings).await;
    let codes = exercise(&app).await;

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = crate::helpers::redis_keys_matching(&mut conn, &format!("*{prefix}*")).await;
    assert!(keys.len() > 5, "{keys:?}");
    let mut dump = String::new();
    for key in keys {
        dump.push_str(&key);
        dump.push('\n');
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            // Expired between SCAN and TYPE.
            "none" => Vec::new(),
            other => panic!("unexpected redis type {other} at {key}"),
        };
        for value in values {
            dump.push_str(&String::from_utf8_lossy(&value));
            dump.push('\n');
        }
    }
    assert_clean(&dump, &codes, "redis");
}

const MASTER: &str = "integration-test master secret";

fn crypto(keys: &[(u32, &str)], current: u32) -> Crypto {
    Crypto::new(&KeyMaterial {
        master: MASTER.as_bytes().to_vec(),
        code_key: None,
        phone_keys: keys
            .iter()
            .map(|(id, k)| (*id, k.as_bytes().to_vec()))
            .collect::<BTreeMap<_, _>>(),
        current_phone_key: Some(current),
    })
    .unwrap()
}

#[tokio::test]
async fn rotation_reseals_live_numbers_so_the_old_key_can_go() {
    let store: Arc<dyn Store> = Arc::new(otpd::store::MemoryStore::new());
    let first_key = |s: &mut otpd::config::Settings| {
        s.secrets.phone_keys.insert(
            "1".into(),
            SecretString::from("the first phone key".to_owned()),
        );
    };
    let old = TestApp::spawn_on(store.clone(), first_key).await;
    // An Openlyne-style verification: its verify answer opens the stored number.
    let uid = Uuid::new_v4().to_string();
    let sent = old
        .post(
            "/webhook/send-otp",
            json!({ "phone": NL.trim_start_matches('+'), "uid": uid }),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::OK);
    let code = old.inbox_code(NL).await;
    let ended = old.send_to("+31651860671").await;
    let (status, _) = parts(
        old.post(
            "/v1/verifications/check",
            json!({ "id": ended["id"], "code": ended["debug_code"] }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let both = crypto(&[(1, "the first phone key"), (2, "second phone key")], 2);
    let report = otpd::service::rotate_phone_keys(store.as_ref(), &both)
        .await
        .unwrap();
    assert_eq!(
        (report.resealed, report.unreadable, report.raced),
        (1, 0, 0),
        "only the pending verification is live"
    );
    let again = otpd::service::rotate_phone_keys(store.as_ref(), &both)
        .await
        .unwrap();
    assert_eq!(again.resealed, 0, "nothing left under key 1");

    // A deployment that has dropped key 1 still serves the live verification,
    // down to giving the number back.
    let new = TestApp::spawn_on(store.clone(), |s| {
        s.secrets.phone_keys.insert(
            "2".into(),
            SecretString::from("second phone key".to_owned()),
        );
    })
    .await;
    let (status, body) = parts(
        new.post_as(
            &old.key,
            "/webhook/verify-otp",
            json!({ "uid": uid, "code": code }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["contact_value"],
        NL.trim_start_matches('+'),
        "{body}"
    );
    let only_new = crypto(&[(2, "second phone key")], 2);
    let report = otpd::service::rotate_phone_keys(store.as_ref(), &only_new)
        .await
        .unwrap();
    assert_eq!(report.resealed, 0);
}

/// `otpd rotate-keys` and `otpd guard list|lift` as an operator runs them.
#[tokio::test]
async fn operator_commands_rotate_keys_and_manage_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let first = [
        ("OTPD_DEBUG_CODES", "true"),
        ("OTPD_SECRETS__PHONE_KEYS__1", "the first phone key"),
        ("OTPD_POLICY__GUARD__MAX_SENDS_PER_PREFIX_HOUR", "1"),
    ];
    let mut otpd = start_otpd(dir.path(), &first);
    let key = otpd.printed_key.clone().unwrap();
    let client = crate::helpers::plain_client();
    let send = |to: &'static str| {
        client
            .post(format!("{}/v1/verifications", otpd.base))
            .header("x-api-key", &key)
            .json(&json!({ "to": to }))
            .send()
    };
    assert_eq!(send(NL).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(
        send("+31651860671").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    otpd.child.kill().unwrap();
    otpd.child.wait().unwrap();

    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_otpd"))
            .args(args)
            .current_dir(dir.path())
            .envs(env.iter().copied())
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["guard", "list"], &first);
    assert!(ok, "{err}");
    let fields: Vec<&str> = out.trim().split('\t').collect();
    assert_eq!(&fields[..2], ["default", "+31651"], "{out}");
    assert!(fields[3].contains("threshold 1"), "{out}");
    let (ok, out, err) = run(&["guard", "lift", "--tenant", "default", "31651"], &first);
    assert!(ok && out.contains("lifted +31651"), "{out}{err}");
    let (ok, _, err) = run(&["guard", "lift", "--tenant", "default", "+31651"], &first);
    assert!(!ok && err.contains("no quarantine"), "{err}");
    let (ok, out, _) = run(&["guard", "list"], &first);
    assert!(ok && out.trim().is_empty(), "{out}");

    let rotated = [
        ("OTPD_SECRETS__PHONE_KEYS__1", "the first phone key"),
        ("OTPD_SECRETS__PHONE_KEYS__2", "second phone key"),
    ];
    let (ok, out, err) = run(&["rotate-keys"], &rotated);
    assert!(ok, "{err}");
    assert!(out.starts_with("resealed 1 numbers with key 2"), "{out}");
    // Without key 1 nothing is left that needs it.
    let (ok, out, err) = run(
        &["rotate-keys"],
        &[("OTPD_SECRETS__PHONE_KEYS__2", "second phone key")],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("resealed 0"), "{out}");
}
