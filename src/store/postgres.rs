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

use super::sql_common::{
    ApiKeyRow, InboxRow, KEEP_SUBJECTS, MarkerRow, MessageRow, SubjectRow, SubjectState,
    UsageDbRow, VerificationRow, admit_send, counter_amount, counter_slot, counter_total, day_text,
    decide_check, id_text, map_migrate, map_sqlx, millis, rate_slot, usage_amount,
};
use super::{
    CancelOutcome, CheckOutcome, CodeReplacement, InboxEntry, Marker, MessageTransition,
    MessageUpdate, RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store,
    StoreError, StoreResult, UsageRow, advance_message, seconds_until,
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

async fn lock_verification(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
) -> StoreResult<Option<Verification>> {
    sqlx::query_as::<_, VerificationRow>("SELECT * FROM verifications WHERE id = $1 FOR UPDATE")
        .bind(id_text(id))
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_sqlx)?
        .map(Verification::try_from)
        .transpose()
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

#[async_trait]
impl Store for PostgresStore {
    async fn close(&self) {
        self.pool.close().await;
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, key_hash, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.id)
        .bind(&key.tenant)
        .bind(key.key_hash.as_slice())
        .bind(millis(key.created_at))
        .bind(key.revoked_at.map(millis))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query_as::<_, ApiKeyRow>("SELECT * FROM api_keys WHERE key_hash = $1")
            .bind(key_hash.as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?
            .map(ApiKeyRecord::try_from)
            .transpose()
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        sqlx::query_as::<_, ApiKeyRow>("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?
            .into_iter()
            .map(ApiKeyRecord::try_from)
            .collect()
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(millis(at))
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT v.id FROM subjects s JOIN verifications v ON v.id = s.current_id
             WHERE s.tenant = $1 AND s.subject = $2 AND v.tenant = $1
               AND v.status = 'pending' AND v.expires_at > $3",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .bind(millis(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        id.map(|id| {
            Uuid::parse_str(&id).map_err(|_| StoreError::Corrupt(format!("bad uuid {id:?}")))
        })
        .transpose()
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT v.id, v.status FROM subjects s JOIN verifications v ON v.id = s.current_id
             WHERE s.tenant = $1 AND s.subject = $2 AND v.tenant = $1
               AND v.status IN ('pending', 'max_attempts') AND v.expires_at > $3",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .bind(millis(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        row.map(|(id, status)| {
            let id = Uuid::parse_str(&id)
                .map_err(|_| StoreError::Corrupt(format!("bad uuid {id:?}")))?;
            let status = Status::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("bad status {status:?}")))?;
            Ok((id, status))
        })
        .transpose()
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        let planned = &plan.verification;
        let mut tx = self.begin().await?;
        let state = lock_subject(&mut tx, &planned.tenant, &planned.subject).await?;
        let window = match admit_send(&state, plan, now) {
            Ok(window) => window,
            Err(refusal) => return Ok(refusal.into()),
        };

        let pending = match state.current {
            Some(current) => lock_verification(&mut tx, current)
                .await?
                .filter(|v| v.tenant == planned.tenant && v.is_pending_at(now)),
            None => None,
        };
        let previous_sent_at = state.last_sent_at;
        let decision = match pending {
            Some(v) if v.id == planned.id => {
                let row = sqlx::query_as::<_, VerificationRow>(
                    // A resend goes to the number of this request (a uid's number may change).
                    "UPDATE verifications
                     SET code_hash = $1, expires_at = $2, send_count = send_count + 1,
                         updated_at = $3, last_sent_at = $3,
                         phone = $5, masked_to = $6, country = $7
                     WHERE id = $4 RETURNING *",
                )
                .bind(planned.code_hash.as_ref().map(|h| h.as_slice()))
                .bind(millis(planned.expires_at))
                .bind(millis(now))
                .bind(id_text(v.id))
                .bind(planned.phone.to_bytes())
                .bind(&planned.masked_to)
                .bind(planned.country.as_deref())
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx)?;
                SendDecision::Replaced {
                    verification: row.try_into()?,
                    previous_sent_at,
                }
            }
            Some(_) => return Ok(SendDecision::Conflict),
            None => {
                let inserted = sqlx::query(
                    "INSERT INTO verifications (id, tenant, subject, purpose, uid, phone,
                         masked_to, country, code_hash, status, attempts, max_attempts,
                         send_count, created_at, updated_at, expires_at, last_sent_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                         $15, $16, $17)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(id_text(planned.id))
                .bind(&planned.tenant)
                .bind(planned.subject.0.as_slice())
                .bind(&planned.purpose)
                .bind(&planned.uid)
                .bind(planned.phone.to_bytes())
                .bind(&planned.masked_to)
                .bind(&planned.country)
                .bind(planned.code_hash.as_ref().map(|h| h.as_slice()))
                .bind(planned.status.as_str())
                .bind(i64::from(planned.attempts))
                .bind(i64::from(planned.max_attempts))
                .bind(i64::from(planned.send_count))
                .bind(millis(planned.created_at))
                .bind(millis(planned.updated_at))
                .bind(millis(planned.expires_at))
                .bind(millis(planned.last_sent_at))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?;
                // The plan names a verification that exists but is no longer
                // pending (expired or ended since the service looked).
                if inserted.rows_affected() == 0 {
                    return Ok(SendDecision::Conflict);
                }
                SendDecision::Created {
                    verification: planned.clone(),
                    previous_sent_at,
                }
            }
        };

        sqlx::query(
            "UPDATE subjects SET current_id = $1, last_sent_at = $2, window_start = $3,
                 window_count = $4
             WHERE tenant = $5 AND subject = $6",
        )
        .bind(id_text(planned.id))
        .bind(millis(now))
        .bind(millis(window.start))
        .bind(i64::from(window.count + 1))
        .bind(&planned.tenant)
        .bind(planned.subject.0.as_slice())
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(decision)
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE subjects SET last_sent_at = $1, window_count = GREATEST(window_count - 1, 0)
             WHERE tenant = $2 AND subject = $3",
        )
        .bind(abort.previous_sent_at.map(millis))
        .bind(&abort.tenant)
        .bind(abort.subject.0.as_slice())
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        sqlx::query(
            "UPDATE verifications SET status = 'failed', code_hash = NULL, updated_at = $1
             WHERE id = $2 AND tenant = $3",
        )
        .bind(millis(abort.at))
        .bind(id_text(abort.verification_id))
        .bind(&abort.tenant)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        let mut tx = self.begin().await?;
        let Some(mut v) = lock_verification(&mut tx, id)
            .await?
            .filter(|v| v.tenant == tenant)
        else {
            return Ok(CheckOutcome::NotFound);
        };
        let (outcome, changed) = decide_check(&mut v, code_hash, now);
        if changed {
            sqlx::query(
                "UPDATE verifications SET status = $1, code_hash = $2, attempts = $3,
                     updated_at = $4
                 WHERE id = $5",
            )
            .bind(v.status.as_str())
            .bind(v.code_hash.as_ref().map(|h| h.as_slice()))
            .bind(i64::from(v.attempts))
            .bind(millis(v.updated_at))
            .bind(id_text(id))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
            tx.commit().await.map_err(map_sqlx)?;
        }
        Ok(outcome)
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        sqlx::query_as::<_, VerificationRow>(
            "SELECT * FROM verifications WHERE id = $1 AND tenant = $2",
        )
        .bind(id_text(id))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?
        .map(Verification::try_from)
        .transpose()
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        // One statement: the row lock it takes orders it against a concurrent
        // check, and the pending test is re-evaluated on the latest row.
        let row = sqlx::query_as::<_, VerificationRow>(
            "UPDATE verifications SET status = 'canceled', code_hash = NULL, updated_at = $1
             WHERE id = $2 AND tenant = $3 AND status = 'pending' AND expires_at > $1
             RETURNING *",
        )
        .bind(millis(now))
        .bind(id_text(id))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(match row {
            Some(row) => CancelOutcome::Canceled(row.try_into()?),
            None => CancelOutcome::NotFound,
        })
    }

    async fn insert_message(&self, m: &MessageRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO messages (id, verification_id, tenant, route_id, provider,
                 provider_message_id, masked_to, country, status, error, cost, currency,
                 latency_ms, resend_of, created_at, sent_at, delivered_at, failed_at,
                 updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                 $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(id_text(m.id))
        .bind(id_text(m.verification_id))
        .bind(&m.tenant)
        .bind(i64::from(m.route_id))
        .bind(&m.provider)
        .bind(&m.provider_message_id)
        .bind(&m.masked_to)
        .bind(&m.country)
        .bind(m.status.as_str())
        .bind(&m.error)
        .bind(m.cost)
        .bind(&m.currency)
        .bind(i64::from(m.latency_ms))
        .bind(m.resend_of.map(id_text))
        .bind(millis(m.created_at))
        .bind(m.sent_at.map(millis))
        .bind(m.delivered_at.map(millis))
        .bind(m.failed_at.map(millis))
        .bind(millis(m.updated_at))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        sqlx::query_as::<_, MessageRow>("SELECT * FROM messages WHERE id = $1 AND tenant = $2")
            .bind(id_text(id))
            .bind(tenant)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?
            .map(MessageRecord::try_from)
            .transpose()
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        sqlx::query_as::<_, MessageRow>(
            "SELECT * FROM messages WHERE verification_id = $1 AND tenant = $2
             ORDER BY created_at, seq",
        )
        .bind(id_text(verification_id))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?
        .into_iter()
        .map(MessageRecord::try_from)
        .collect()
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        let mut tx = self.begin().await?;
        // Should a provider ever reuse an id, the newest message is the one meant.
        let Some(row) = sqlx::query_as::<_, MessageRow>(
            "SELECT * FROM messages WHERE provider = $1 AND provider_message_id = $2
             ORDER BY seq DESC LIMIT 1 FOR UPDATE",
        )
        .bind(provider)
        .bind(provider_message_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx)?
        else {
            return Ok(None);
        };
        let current = MessageRecord::try_from(row)?;
        let previous = current.status;
        let Some(next) = advance_message(&current, update) else {
            return Ok(Some(MessageTransition {
                previous,
                message: current,
            }));
        };
        sqlx::query(
            "UPDATE messages SET status = $1, error = $2, cost = $3, currency = $4,
                 updated_at = $5, sent_at = $6, delivered_at = $7, failed_at = $8
             WHERE id = $9",
        )
        .bind(next.status.as_str())
        .bind(&next.error)
        .bind(next.cost)
        .bind(&next.currency)
        .bind(millis(next.updated_at))
        .bind(next.sent_at.map(millis))
        .bind(next.delivered_at.map(millis))
        .bind(next.failed_at.map(millis))
        .bind(id_text(next.id))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(Some(MessageTransition {
            previous,
            message: next,
        }))
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        // The conditions repeat the partial index's, so the index serves the query.
        sqlx::query_as::<_, MessageRow>(
            "SELECT * FROM messages
             WHERE provider = $1 AND created_at > $2
               AND status IN ('queued', 'sent', 'unknown') AND provider_message_id IS NOT NULL
             ORDER BY created_at LIMIT $3",
        )
        .bind(provider)
        .bind(millis(created_after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?
        .into_iter()
        .map(MessageRecord::try_from)
        .collect()
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM messages WHERE id IN
                 (SELECT id FROM messages WHERE created_at < $1 LIMIT $2)",
        )
        .bind(millis(before))
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(done.rows_affected())
    }

    async fn record_usage(&self, d: &UsageRow) -> StoreResult<()> {
        // One upsert is one atomic step: the row is created or added to.
        sqlx::query(
            "INSERT INTO usage_daily (tenant, day, route_id, country, currency, sent, delivered,
                 failed, verifications_started, verifications_approved, cost_micros)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (tenant, day, route_id, country, currency) DO UPDATE SET
                 sent = usage_daily.sent + excluded.sent,
                 delivered = usage_daily.delivered + excluded.delivered,
                 failed = usage_daily.failed + excluded.failed,
                 verifications_started =
                     usage_daily.verifications_started + excluded.verifications_started,
                 verifications_approved =
                     usage_daily.verifications_approved + excluded.verifications_approved,
                 cost_micros = usage_daily.cost_micros + excluded.cost_micros",
        )
        .bind(&d.tenant)
        .bind(day_text(d.day))
        .bind(i64::from(d.route_id))
        .bind(d.country.as_deref().unwrap_or_default())
        .bind(d.currency.as_deref().unwrap_or_default())
        .bind(usage_amount(d.sent))
        .bind(usage_amount(d.delivered))
        .bind(usage_amount(d.failed))
        .bind(usage_amount(d.verifications_started))
        .bind(usage_amount(d.verifications_approved))
        .bind(d.cost_micros)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        // ISO dates order as text, so the primary key serves the range.
        sqlx::query_as::<_, UsageDbRow>(
            "SELECT * FROM usage_daily WHERE tenant = $1 AND day >= $2 AND day <= $3",
        )
        .bind(tenant)
        .bind(day_text(from))
        .bind(day_text(to))
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?
        .into_iter()
        .map(UsageRow::try_from)
        .collect()
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        // One statement: the conditions and the write cannot be separated by a
        // concurrent send, check or cancel.
        sqlx::query_as::<_, VerificationRow>(
            "UPDATE verifications
             SET code_hash = $1, expires_at = $2, send_count = send_count + 1,
                 last_sent_at = $3, updated_at = $3
             WHERE id = $4 AND tenant = $5 AND status = 'pending' AND expires_at > $3
               AND send_count = $6
             RETURNING *",
        )
        .bind(r.code_hash.as_slice())
        .bind(millis(r.expires_at))
        .bind(millis(now))
        .bind(id_text(r.verification_id))
        .bind(&r.tenant)
        .bind(i64::from(r.expected_send_count))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?
        .map(Verification::try_from)
        .transpose()
    }

    async fn push_inbox(&self, e: &InboxEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO inbox (id, tenant, phone_index, masked_to, sealed_body, created_at,
                 expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id_text(e.id))
        .bind(&e.tenant)
        .bind(e.phone_index.as_slice())
        .bind(&e.masked_to)
        .bind(e.sealed_body.to_bytes())
        .bind(millis(e.created_at))
        .bind(millis(e.expires_at))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        let rows = match phone_index {
            Some(index) => {
                sqlx::query_as::<_, InboxRow>(
                    "SELECT * FROM inbox
                     WHERE tenant = $1 AND expires_at > $2 AND phone_index = $3
                     ORDER BY created_at DESC, seq DESC LIMIT $4",
                )
                .bind(tenant)
                .bind(millis(now))
                .bind(index.as_slice())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query_as::<_, InboxRow>(
                    "SELECT * FROM inbox WHERE tenant = $1 AND expires_at > $2
                     ORDER BY created_at DESC, seq DESC LIMIT $3",
                )
                .bind(tenant)
                .bind(millis(now))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
            }
        };
        rows.map_err(map_sqlx)?
            .into_iter()
            .map(InboxEntry::try_from)
            .collect()
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        let (slot, window_end) = rate_slot(window_seconds, now);
        let limited = || RateDecision::Limited {
            retry_after_seconds: seconds_until(
                now,
                DateTime::from_timestamp_millis(window_end).unwrap_or(now),
            ),
        };
        if limit == 0 {
            return Ok(limited());
        }
        // One upsert is one atomic step (it locks the counter row): it starts a
        // fresh window, counts a hit, or, when the window is full, changes
        // nothing and returns no row.
        let count: Option<i64> = sqlx::query_scalar(
            "INSERT INTO rate_limits AS r (key, slot, window_end, count) VALUES ($1, $2, $3, 1)
             ON CONFLICT (key) DO UPDATE SET
                 count = CASE WHEN r.slot = EXCLUDED.slot THEN r.count + 1 ELSE 1 END,
                 slot = EXCLUDED.slot,
                 window_end = EXCLUDED.window_end
             WHERE r.slot <> EXCLUDED.slot OR r.count < $4
             RETURNING count",
        )
        .bind(key)
        .bind(slot)
        .bind(window_end)
        .bind(i64::from(limit))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(match count {
            Some(count) => RateDecision::Allowed {
                remaining: u32::try_from(i64::from(limit) - count).unwrap_or(0),
            },
            None => limited(),
        })
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let (slot, keep_until) = counter_slot(window_seconds, now);
        // One upsert is one atomic step: the window's row is created or added to.
        let total: i64 = sqlx::query_scalar(
            "INSERT INTO counters AS c (key, window_seconds, slot, keep_until, total)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (key, window_seconds, slot) DO UPDATE SET
                 total = c.total + EXCLUDED.total
             RETURNING total",
        )
        .bind(key)
        .bind(i64::from(window_seconds))
        .bind(slot)
        .bind(keep_until)
        .bind(counter_amount(amount))
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(counter_total(Some(total)))
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let (slot, _) = rate_slot(window_seconds, now);
        let total: Option<i64> = sqlx::query_scalar(
            "SELECT total FROM counters
             WHERE key = $1 AND window_seconds = $2 AND slot = $3",
        )
        .bind(key)
        .bind(i64::from(window_seconds))
        .bind(slot)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(counter_total(total))
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO markers (namespace, name, value, expires_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, name) DO UPDATE SET
                 value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
        )
        .bind(namespace)
        .bind(name)
        .bind(value)
        .bind(millis(expires_at))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        sqlx::query_as::<_, MarkerRow>(
            "SELECT name, value, expires_at FROM markers
             WHERE namespace = $1 AND name = $2 AND expires_at > $3",
        )
        .bind(namespace)
        .bind(name)
        .bind(millis(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?
        .map(Marker::try_from)
        .transpose()
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        sqlx::query_as::<_, MarkerRow>(
            "SELECT name, value, expires_at FROM markers
             WHERE namespace = $1 AND expires_at > $2 ORDER BY name",
        )
        .bind(namespace)
        .bind(millis(now))
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?
        .into_iter()
        .map(Marker::try_from)
        .collect()
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM markers WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        // One upsert decides and writes: it takes a free or expired marker, renews
        // the holder's own, and leaves anyone else's alone (returning no row).
        let claimed: Option<i64> = sqlx::query_scalar(
            "INSERT INTO markers AS m (namespace, name, value, expires_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, name) DO UPDATE SET
                 value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
             WHERE m.expires_at <= $5 OR m.value = EXCLUDED.value
             RETURNING 1::BIGINT",
        )
        .bind(namespace)
        .bind(name)
        .bind(holder)
        .bind(millis(expires_at))
        .bind(millis(now))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(claimed.is_some())
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        // Sealed numbers start with their key id (4 bytes, big endian).
        let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, tenant, phone FROM verifications
             WHERE status = 'pending' AND id > $1 AND substring(phone from 1 for 4) <> $2
             ORDER BY id LIMIT $3",
        )
        .bind(after.map(id_text).unwrap_or_default())
        .bind(current_key.to_be_bytes().to_vec())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?;
        rows.into_iter()
            .map(|(id, tenant, phone)| {
                Ok(SealedRecord {
                    tenant,
                    id: Uuid::parse_str(&id)
                        .map_err(|_| StoreError::Corrupt(format!("bad uuid {id:?}")))?,
                    phone: SealedPhone::from_bytes(&phone)
                        .ok_or_else(|| StoreError::Corrupt("sealed phone too short".into()))?,
                })
            })
            .collect()
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE verifications SET phone = $1 WHERE id = $2 AND phone = $3")
            .bind(new.to_bytes())
            .bind(id_text(id))
            .bind(old.to_bytes())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
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
        let mut budget = u64::from(batch);
        // Each step spends what is left of the batch, so one call touches at
        // most `batch` rows. The subqueries walk the expiry indexes and skip
        // rows a request holds locked rather than waiting for them, so the purge
        // never blocks a request (nor deadlocks with one). A row whose status
        // changed before it was locked is re-checked by `FOR UPDATE` and dropped.
        let steps: [(&'static str, i64); 6] = [
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
        for (sql, cutoff) in steps {
            if budget == 0 {
                break;
            }
            let done = sqlx::query(sql)
                .bind(cutoff)
                .bind(i64::try_from(budget).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            budget = budget.saturating_sub(done.rows_affected());
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(u64::from(batch) - budget)
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM verifications WHERE status = 'pending' AND expires_at > $1",
        )
        .bind(millis(now))
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
