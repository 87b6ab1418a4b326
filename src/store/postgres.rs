//! The shared store for several otpd instances: PostgreSQL. Every deciding
//! operation is one transaction that locks the rows it decides on (`SELECT …
//! FOR UPDATE`) or is a single statement, so cooldowns, attempt counts and
//! single use hold across instances. Lock order is always subject row, then
//! verification row.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::sql_common::{KEEP_SUBJECTS, SubjectRow, SubjectState, map_migrate, map_sqlx, millis};
use super::{
    CancelOutcome, CheckOutcome, CodeReplacement, InboxEntry, Marker, MessageTransition,
    MessageUpdate, RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store,
    StoreError, StoreResult, UsageRow,
};
use crate::crypto::SealedPhone;
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a request waits for a pooled connection (or a new one) before the
/// store reports unavailable; an unreachable database must not hang requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_CONNECTIONS: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
    /// Advisory lock taken by the purge so one instance purges at a time. It
    /// depends on the schema so that stores in different schemas of one
    /// database (tests) do not wait for each other.
    purge_lock: i64,
}

impl PostgresStore {
    /// Connects to `url` and applies pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = parse_url(url)?;
        let pool = pool_options()
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Self::ready(pool, "").await
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
        let pool = pool_options()
            .after_connect(move |conn, _meta| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    sqlx::raw_sql(AssertSqlSafe(set_path)).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Self::ready(pool, schema).await
    }

    async fn ready(pool: PgPool, schema: &str) -> StoreResult<Self> {
        let store = Self {
            pool,
            purge_lock: purge_lock_key(schema),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations; safe to run from several instances at once
    /// (sqlx serialises them with an advisory lock).
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(map_migrate)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(map_sqlx)
    }
}

fn parse_url(url: &str) -> StoreResult<PgConnectOptions> {
    // The error names the problem, never the URL, which may hold a password.
    PgConnectOptions::from_str(url)
        .map(|o| o.application_name("otpd"))
        .map_err(|e| StoreError::Unavailable(format!("invalid postgres url: {e}")))
}

fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
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

/// Locks the subject's row, creating it first if needed. A purge may delete an
/// old row between the insert and the lock; then the insert is simply retried.
async fn lock_subject(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &str,
    subject: &SubjectKey,
) -> StoreResult<SubjectState> {
    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO subjects (tenant, subject) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .execute(&mut **tx)
        .await
        .map_err(map_sqlx)?;
        let row = sqlx::query_as::<_, SubjectRow>(
            "SELECT current_id, last_sent_at, window_start, window_count
             FROM subjects WHERE tenant = $1 AND subject = $2 FOR UPDATE",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_sqlx)?;
        if let Some(row) = row {
            return row.try_into();
        }
    }
    Err(StoreError::Unavailable(
        "subject row vanished while being locked".into(),
    ))
}

/// The operations both SQL backends share (`sql_common::sql_operations`).
mod ops {
    super::super::sql_common::sql_operations!(
        db: sqlx::Postgres,
        insertion_order: "seq",
        for_update: " FOR UPDATE"
    );
}

#[async_trait]
impl Store for PostgresStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn ping(&self) -> StoreResult<()> {
        ops::ping(&self.pool).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        ops::insert_api_key(&self.pool, key).await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        ops::find_api_key(&self.pool, key_hash).await
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        ops::list_api_keys(&self.pool).await
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        ops::revoke_api_key(&self.pool, id, at).await
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        ops::find_pending(&self.pool, tenant, subject, now).await
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        ops::find_current(&self.pool, tenant, subject, now).await
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        let planned = &plan.verification;
        let mut tx = self.begin().await?;
        let state = lock_subject(&mut tx, &planned.tenant, &planned.subject).await?;
        ops::start_send(tx, state, plan, now).await
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        ops::abort_send(self.begin().await?, abort).await
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        ops::check_code(self.begin().await?, tenant, id, code_hash, now).await
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        ops::get_verification(&self.pool, tenant, id).await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        ops::cancel(&self.pool, tenant, id, now).await
    }

    async fn insert_message(&self, m: &MessageRecord) -> StoreResult<()> {
        ops::insert_message(&self.pool, m).await
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        ops::get_message(&self.pool, tenant, id).await
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        ops::list_messages(&self.pool, tenant, verification_id).await
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        let tx = self.begin().await?;
        ops::update_message_by_provider_id(tx, provider, provider_message_id, update).await
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        ops::list_unfinished_messages(&self.pool, provider, created_after, limit).await
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        ops::purge_messages(&self.pool, before, batch).await
    }

    async fn record_usage(&self, d: &UsageRow) -> StoreResult<()> {
        ops::record_usage(&self.pool, d).await
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        ops::usage(&self.pool, tenant, from, to).await
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        ops::replace_code(&self.pool, r, now).await
    }

    async fn push_inbox(&self, e: &InboxEntry) -> StoreResult<()> {
        ops::push_inbox(&self.pool, e).await
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        ops::list_inbox(&self.pool, tenant, phone_index, now, limit).await
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        ops::hit_rate_limit(&self.pool, key, limit, window_seconds, now).await
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        ops::add_to_counter(&self.pool, key, amount, window_seconds, now).await
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        ops::read_counter(&self.pool, key, window_seconds, now).await
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        ops::set_marker(&self.pool, namespace, name, value, expires_at).await
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        ops::get_marker(&self.pool, namespace, name, now).await
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        ops::list_markers(&self.pool, namespace, now).await
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        ops::delete_marker(&self.pool, namespace, name).await
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        ops::claim_marker(&self.pool, namespace, name, holder, expires_at, now).await
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        ops::list_sealed_with_other_key(&self.pool, current_key, after, limit).await
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        ops::reseal_phone(&self.pool, id, old, new).await
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(self.purge_lock)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        if !ours {
            // Another instance is purging right now; it will get to these rows.
            return Ok(0);
        }
        let now_ms = millis(now);
        // The subqueries walk the expiry indexes and skip rows a request holds
        // locked rather than waiting for them, so the purge never blocks a
        // request (nor deadlocks with one). A row whose status changed before it
        // was locked is re-checked by `FOR UPDATE` and dropped.
        let steps = [
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
                "DELETE FROM subjects WHERE (tenant, subject) IN
                     (SELECT tenant, subject FROM subjects
                      WHERE last_sent_at <= $1 OR last_sent_at IS NULL
                      LIMIT $2 FOR UPDATE SKIP LOCKED)",
                millis(now - KEEP_SUBJECTS),
            ),
        ];
        ops::purge_steps(tx, &steps, batch).await
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        ops::count_pending(&self.pool, now).await
    }
}
