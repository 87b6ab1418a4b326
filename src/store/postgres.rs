//! The shared store for several otpd instances: PostgreSQL. Every deciding
//! operation is one transaction that locks the rows it decides on (`SELECT …
//! FOR UPDATE`) or is a single statement, so cooldowns, attempt counts and
//! single use hold across instances. Lock order is always subject row, then
//! verification row.

mod hot;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::migrations::POSTGRES_MIGRATOR;
use super::sql_common::{
    KEEP_ENDED, KEEP_SUBJECTS, SubjectRow, SubjectState, WriteFuture, WriteKind, map_migrate,
    map_sqlx, millis,
};
use super::sql_hot::HotTx;
use super::{CounterAdd, StoreError, StoreResult};
use crate::domain::SubjectKey;

/// How long a request waits for a pooled connection (or a new one) before the
/// store reports unavailable; an unreachable database must not hang requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 16;
/// Counter adds are single short statements.
const MAX_TALLY_CONNECTIONS: u32 = 4;

pub struct PostgresStore {
    pool: PgPool,
    /// Connections for counter adds alone, with `synchronous_commit = off`:
    /// an add commits without waiting for its WAL to reach the disk, so the
    /// row locks of counters that every send shares (a country's traffic, a
    /// client's sends) are held for the statement only, not for a disk
    /// flush. The counters are abuse limits: a crash of PostgreSQL may lose
    /// the adds of its last moments (at most `wal_writer_delay` × 3), never
    /// a send or a check, which commit on `pool`.
    tally: PgPool,
    /// Advisory lock taken by the purge so one instance purges at a time. It
    /// depends on the schema so that stores in different schemas of one
    /// database (tests) do not wait for each other.
    purge_lock: i64,
}

impl PostgresStore {
    /// Connects to `url` and applies pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::open(parse_url(url)?, pool_options, "").await
    }

    /// Like `connect`, but with every table in `schema`, which is created if
    /// missing. Lets many tests share one database without seeing each other.
    pub async fn connect_in_schema(url: &str, schema: &str) -> StoreResult<Self> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(StoreError::Unavailable(format!(
                "invalid schema name {schema:?}: use lower-case letters, digits and _"
            )));
        }
        let options = parse_url(url)?;
        // Once, on its own connection: concurrent `CREATE SCHEMA IF NOT EXISTS`
        // from several fresh pool connections can fail on a unique violation.
        let create = async {
            let mut conn = PgConnection::connect_with(&options).await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&mut conn)
            .await?;
            conn.close().await
        };
        tokio::time::timeout(ACQUIRE_TIMEOUT, create)
            .await
            .map_err(|_| StoreError::Unavailable("timed out connecting to postgres".into()))?
            .map_err(map_sqlx)?;

        let set_path: Arc<str> = format!("SET search_path TO \"{schema}\"").into();
        let in_schema = |max: u32| {
            let set_path = set_path.clone();
            pool_options(max).after_connect(move |conn, _meta| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    sqlx::raw_sql(AssertSqlSafe(set_path)).execute(conn).await?;
                    Ok(())
                })
            })
        };
        Self::open(options, in_schema, schema).await
    }

    /// Both pools, each from `pool_options(its size)`, then the migrations.
    async fn open(
        options: PgConnectOptions,
        pool_options: impl Fn(u32) -> PgPoolOptions,
        schema: &str,
    ) -> StoreResult<Self> {
        let pool = pool_options(MAX_CONNECTIONS)
            .connect_with(options.clone())
            .await
            .map_err(map_sqlx)?;
        let tally = pool_options(MAX_TALLY_CONNECTIONS)
            .connect_with(unsynced(options))
            .await
            .map_err(map_sqlx)?;
        let store = Self {
            pool,
            tally,
            purge_lock: purge_lock_key(schema),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations; safe to run from several instances at once
    /// (sqlx serialises them with an advisory lock).
    pub async fn migrate(&self) -> StoreResult<()> {
        POSTGRES_MIGRATOR.run(&self.pool).await.map_err(map_migrate)
    }

    pub async fn close(&self) {
        self.tally.close().await;
        self.pool.close().await;
    }

    /// Counter adds as one statement on a `tally` connection (see there).
    async fn write_counts(
        &self,
        adds: Vec<CounterAdd>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<u64>> {
        let mut conn = self.tally.acquire().await.map_err(map_sqlx)?;
        conn.add_counters(&adds, now).await
    }

    /// A statement runs on its own (autocommit); a transaction is a plain one,
    /// in which each operation locks the rows it decides on. An error drops the
    /// transaction, which rolls it back.
    async fn write<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        match kind {
            WriteKind::Statement => {
                let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
                op(&mut conn).await
            }
            WriteKind::ReadThenWrite | WriteKind::Transaction => {
                let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
                let done = op(&mut tx).await?;
                tx.commit().await.map_err(map_sqlx)?;
                Ok(done)
            }
        }
    }

    /// Locks the subject's row, creating it first if needed, so sends for one
    /// subject queue across instances. One round trip: `ON CONFLICT DO UPDATE`
    /// (a no-op update) locks and returns an existing row as `FOR UPDATE`
    /// would, and is atomic against a purge deleting it meanwhile.
    async fn subject_state(
        conn: &mut PgConnection,
        tenant: &str,
        subject: &SubjectKey,
    ) -> StoreResult<SubjectState> {
        sqlx::query_as::<_, SubjectRow>(
            "INSERT INTO subjects (tenant, subject) VALUES ($1, $2)
             ON CONFLICT (tenant, subject) DO UPDATE SET tenant = excluded.tenant
             RETURNING current_id, last_sent_at, window_start, window_count",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .fetch_one(&mut *conn)
        .await
        .map_err(map_sqlx)?
        .try_into()
    }

    fn purge_lock(&self) -> i64 {
        self.purge_lock
    }

    /// Several instances share the database: the advisory lock (held until the
    /// purge's transaction ends) lets one purge at a time, and the others
    /// return at once (`false`) instead of queueing: the one purging will get
    /// to these rows.
    async fn take_purge_lock(conn: &mut PgConnection, lock: i64) -> StoreResult<bool> {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_sqlx)
    }

    /// The subqueries walk the expiry indexes and skip rows a request holds
    /// locked rather than waiting for them, so the purge never blocks a request
    /// (nor deadlocks with one). A row whose status changed before it was
    /// locked is re-checked by `FOR UPDATE` and dropped.
    fn purge_steps(now: DateTime<Utc>) -> Vec<(&'static str, i64)> {
        let now_ms = millis(now);
        vec![
            (
                "UPDATE verifications SET status = 'expired', code_hash = NULL, updated_at = $1
                 WHERE id IN
                     (SELECT id FROM verifications
                      WHERE status = 'pending' AND expires_at <= $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now_ms,
            ),
            (
                "DELETE FROM inbox WHERE id IN
                     (SELECT id FROM inbox WHERE expires_at <= $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now_ms,
            ),
            (
                "DELETE FROM rate_limits WHERE key IN
                     (SELECT key FROM rate_limits WHERE window_end <= $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now_ms,
            ),
            (
                "DELETE FROM counters WHERE (key, window_seconds, slot) IN
                     (SELECT key, window_seconds, slot FROM counters WHERE keep_until <= $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now_ms,
            ),
            (
                "DELETE FROM markers WHERE (namespace, name) IN
                     (SELECT namespace, name FROM markers WHERE expires_at <= $1
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now_ms,
            ),
            (
                // A re-send after a failed delivery moves the expiry, not the
                // subject's last send: a subject stays while its verification is pending.
                "DELETE FROM subjects WHERE (tenant, subject) IN
                     (SELECT s.tenant, s.subject FROM subjects s
                      WHERE (s.last_sent_at <= $1 OR s.last_sent_at IS NULL)
                        AND NOT EXISTS (SELECT 1 FROM verifications v
                                        WHERE v.id = s.current_id AND v.status = 'pending')
                      LIMIT $2 FOR UPDATE OF s SKIP LOCKED)",
                millis(now - KEEP_SUBJECTS),
            ),
            (
                // Ended verifications go once their delivery records have been
                // purged by retention: nothing refers to them any more.
                "DELETE FROM verifications WHERE id IN
                     (SELECT v.id FROM verifications v
                      WHERE v.status <> 'pending' AND v.expires_at <= $1
                        AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.verification_id = v.id)
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                millis(now - KEEP_ENDED),
            ),
        ]
    }
}

fn parse_url(url: &str) -> StoreResult<PgConnectOptions> {
    // The error names the problem, never the URL, which may hold a password.
    PgConnectOptions::from_str(url)
        .map(|o| o.application_name("otpd"))
        .map_err(|e| StoreError::Unavailable(format!("invalid postgres url: {e}")))
}

/// A pooled connection is pinged before it is handed out only when it has been
/// idle this long (HikariCP's rule, at 500 ms): one that served an operation a
/// moment ago is alive, and a ping is a round trip of its own: sqlx's ping per
/// acquire cost a send a tenth or more of its CPU on both sides (measured one
/// request at a time).
/// A connection that died in the meantime fails the one operation that finds
/// it out and is then dropped from the pool.
const PING_IF_IDLE: Duration = Duration::from_secs(1);

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Connections whose commits do not wait for the disk (`PostgresStore::tally`).
fn unsynced(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("synchronous_commit", "off")])
}

/// FNV-1a: stable across builds and platforms, unlike std's hasher, so every
/// instance computes the same key.
fn purge_lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "otpd:purge:".bytes().chain(schema.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// `sql_store!`'s `hot_write`: a hot operation as a write of its kind.
macro_rules! pg_hot_write {
    ($store:expr, $kind:expr, |$tx:ident| $op:expr) => {
        $store
            .write($kind, move |$tx| Box::pin(async move { $op.await }))
            .await
    };
}

/// `sql_store!`'s `hot_read`: a hot read on a pooled connection.
macro_rules! pg_hot_read {
    ($store:expr, |$tx:ident| $op:expr) => {{
        let mut conn = $store.pool.acquire().await.map_err(map_sqlx)?;
        let $tx = &mut *conn;
        $op.await
    }};
}

super::sql_common::sql_store!(
    store: PostgresStore,
    read: pool,
    insertion_order: "seq",
    hot_write: pg_hot_write,
    hot_read: pg_hot_read,
    compound_write: WriteKind::Statement,
    counts_apart: true,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql_common::counter_slot;
    use crate::store::{CounterRead, Store, UsageRow};

    /// A store in a fresh schema, its URL and the schema; `None` (said on
    /// stderr) when `OTPD_TEST_POSTGRES_URL` is not set.
    async fn store_in_new_schema() -> Option<(PostgresStore, String, String)> {
        let Ok(url) = std::env::var("OTPD_TEST_POSTGRES_URL") else {
            eprintln!("skipping: OTPD_TEST_POSTGRES_URL is not set");
            return None;
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let store = PostgresStore::connect_in_schema(&url, &schema)
            .await
            .unwrap();
        Some((store, url, schema))
    }

    /// Connections killed under the pool (a server restart) cost at most one
    /// failed operation each, answered as unavailable, and the store carries on.
    #[tokio::test]
    async fn killed_connections_fail_one_operation_each_then_are_replaced() {
        let Some((store, url, _)) = store_in_new_schema().await else {
            return;
        };
        // Open a few connections at once, and learn their server processes.
        let held = futures::future::try_join_all((0..3).map(|_| store.pool.acquire()))
            .await
            .unwrap();
        let mut pids = Vec::new();
        for mut conn in held {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            pids.push(pid);
        }
        let mut killer = PgConnection::connect(&url).await.unwrap();
        for pid in &pids {
            let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut killer)
                .await
                .unwrap();
            assert!(killed, "{pid}");
        }
        // Enough operations to meet every pooled connection twice over.
        let mut failed = 0;
        for _ in 0..2 * store.pool.size() + 10 {
            match Store::ping(&store).await {
                Ok(()) => {}
                Err(StoreError::Unavailable(_)) => failed += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(failed <= pids.len(), "{failed} failures");
        Store::ping(&store).await.unwrap();
        store.close().await;
    }

    /// Sends and checks must commit durably; only counter adds may skip the
    /// wait for the disk, and only on their own connections.
    #[tokio::test]
    async fn only_counter_adds_commit_without_waiting_for_the_disk() {
        let Some((store, url, _)) = store_in_new_schema().await else {
            return;
        };
        let setting = |pool: &PgPool| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let mut plain = PgConnection::connect(&url).await.unwrap();
        let server_default: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        assert_eq!(setting(&store.pool).await, server_default);
        assert_eq!(setting(&store.tally).await, "off");
        // The counters' connections work in the store's own schema.
        let adds = [CounterAdd {
            key: "k".into(),
            amount: 2,
            window_seconds: 60,
            ceiling: None,
        }];
        let now = Utc::now();
        assert_eq!(store.write_counts(adds.to_vec(), now).await.unwrap(), [2]);
        store.close().await;
    }

    /// A connection that read its counters while the table was empty and
    /// analysed still looks each one up by key once the table has grown: no
    /// plan cached back then scans the table.
    #[tokio::test]
    async fn counter_reads_never_scan_the_table() {
        let Some((store, _, schema)) = store_in_new_schema().await else {
            return;
        };
        let now = Utc::now();
        let keys: Vec<String> = (0..14).map(|i| format!("k{i}")).collect();
        let reads: Vec<CounterRead<'_>> = keys
            .iter()
            .map(|key| CounterRead {
                key,
                window_seconds: 600,
                at: now,
            })
            .collect();
        // One transaction, so that its own statistics say what it scanned.
        let mut tx = store.pool.begin().await.unwrap();
        sqlx::query("ANALYZE counters")
            .execute(&mut *tx)
            .await
            .unwrap();
        for _ in 0..8 {
            assert_eq!(tx.counter_totals(&reads).await.unwrap(), [0; 14]);
        }
        let (slot, keep) = counter_slot(600, now);
        sqlx::query(
            "INSERT INTO counters (key, window_seconds, slot, keep_until, total)
             SELECT 'n' || g, 600, $1, $2, 1 FROM generate_series(1, 5000) g
             UNION ALL SELECT 'k3', 600, $1, $2, 7",
        )
        .bind(slot)
        .bind(keep)
        .execute(&mut *tx)
        .await
        .unwrap();
        let mut expected = [0; 14];
        expected[3] = 7;
        assert_eq!(tx.counter_totals(&reads).await.unwrap(), expected);
        let scans: i64 = sqlx::query_scalar(
            "SELECT seq_scan FROM pg_stat_xact_user_tables
             WHERE schemaname = $1 AND relname = 'counters'",
        )
        .bind(&schema)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(scans, 0, "counter reads scanned the whole table");
        drop(tx);
        store.close().await;
    }

    /// Two connections add to one day's usage, each in its own stripe when
    /// their backends' stripes differ; the store reads back one row, summed.
    #[tokio::test]
    async fn usage_stripes_add_up_to_one_row() {
        let Some((store, ..)) = store_in_new_schema().await else {
            return;
        };
        let day = Utc::now().date_naive();
        let delta = |sent: u64, cost_micros: i64| UsageRow {
            tenant: "t".into(),
            day,
            route_id: 1,
            country: Some("NL".into()),
            currency: Some("EUR".into()),
            sent,
            delivered: 0,
            failed: 0,
            verifications_started: sent,
            verifications_approved: 0,
            cost_micros,
        };
        let (mut a, mut b) = (
            store.pool.acquire().await.unwrap(),
            store.pool.acquire().await.unwrap(),
        );
        let mut stripes = std::collections::BTreeSet::new();
        for (on_a, sent, cost) in [(true, 2, 30), (false, 3, 40), (true, 1, 5)] {
            let conn = if on_a { &mut a } else { &mut b };
            conn.upsert_usage(&delta(sent, cost)).await.unwrap();
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            stripes.insert(pid % 16);
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_daily")
            .fetch_one(&mut *a)
            .await
            .unwrap();
        assert_eq!(rows, stripes.len() as i64);
        // A stripe no connection of this pool writes, whatever the pids.
        sqlx::query(
            "INSERT INTO usage_daily (tenant, day, route_id, country, currency, sent,
                 verifications_started, cost_micros, stripe)
             SELECT tenant, day, route_id, country, currency, 4, 4, 25, 99
             FROM usage_daily LIMIT 1",
        )
        .execute(&mut *a)
        .await
        .unwrap();
        drop((a, b));
        let usage = Store::usage(&store, "t", day, day).await.unwrap();
        assert_eq!(usage, [delta(10, 100)]);
        store.close().await;
    }
}
