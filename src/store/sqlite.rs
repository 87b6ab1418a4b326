//! The embedded store: one SQLite file in WAL mode. SQLite allows one writer at
//! a time, so every write goes through a pool of exactly one connection and
//! starts with `BEGIN IMMEDIATE` (the write lock is taken up front, never
//! upgraded mid-transaction); requests queue on that pool instead of failing
//! with `SQLITE_BUSY`. Reads use a separate pool and never wait for writers.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

use super::sql_common::{KEEP_SUBJECTS, SubjectRow, SubjectState, map_migrate, map_sqlx, millis};
use super::{
    CancelOutcome, CheckOutcome, CodeReplacement, InboxEntry, Marker, MessageTransition,
    MessageUpdate, RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store,
    StoreError, StoreResult, UsageRow,
};
use crate::crypto::SealedPhone;
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `false` (the default) is `synchronous=NORMAL`: a committed send survives
    /// the process being killed, but the last commits before an OS crash or
    /// power loss may be lost. `true` is `synchronous=FULL`: every commit is
    /// fsynced, which survives power loss at the cost of write throughput.
    pub synchronous_full: bool,
    /// How long a request waits for the write connection (or for another
    /// process holding the file lock) before the store reports unavailable.
    pub busy_timeout: Duration,
    pub max_readers: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous_full: false,
            busy_timeout: Duration::from_secs(5),
            max_readers: 8,
        }
    }
}

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) and migrates the file.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    pub async fn open_with(path: &Path, options: SqliteOptions) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true);

        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(options.busy_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone())
            .await
            .map_err(map_sqlx)?;
        MIGRATOR.run(&writer).await.map_err(map_migrate)?;
        // `query_only` turns an accidental write on a reader into an error
        // instead of a second writer racing the first for the file lock.
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_readers.max(1))
            .acquire_timeout(options.busy_timeout)
            .connect_with(connect.pragma("query_only", "ON"))
            .await
            .map_err(map_sqlx)?;
        Ok(Self { writer, reader })
    }

    /// Applies pending migrations (`open` already does; this is for `otpd migrate`).
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.writer).await.map_err(map_migrate)
    }

    /// Waits for in-flight work and closes the file, so a new store may open it.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_sqlx)
    }
}

/// The operations both SQL backends share (`sql_common::sql_operations`).
mod ops {
    super::super::sql_common::sql_operations!(
        db: sqlx::Sqlite,
        insertion_order: "rowid",
        for_update: ""
    );
}

#[async_trait]
impl Store for SqliteStore {
    async fn close(&self) {
        // The writer last: closing its final connection checkpoints the WAL.
        self.reader.close().await;
        self.writer.close().await;
    }

    async fn ping(&self) -> StoreResult<()> {
        ops::ping(&self.reader).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        ops::insert_api_key(&self.writer, key).await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        ops::find_api_key(&self.reader, key_hash).await
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        ops::list_api_keys(&self.reader).await
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        ops::revoke_api_key(&self.writer, id, at).await
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        ops::find_pending(&self.reader, tenant, subject, now).await
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        ops::find_current(&self.reader, tenant, subject, now).await
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        let planned = &plan.verification;
        let mut tx = self.begin_write().await?;
        // No row lock needed: `BEGIN IMMEDIATE` already holds the only write
        // lock. A subject seen for the first time has no row yet.
        let state = sqlx::query_as::<_, SubjectRow>(
            "SELECT current_id, last_sent_at, window_start, window_count
             FROM subjects WHERE tenant = $1 AND subject = $2",
        )
        .bind(&planned.tenant)
        .bind(planned.subject.0.as_slice())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx)?
        .map(SubjectState::try_from)
        .transpose()?
        .unwrap_or(SubjectState {
            current: None,
            last_sent_at: None,
            window_start: None,
            window_count: 0,
        });
        ops::start_send(tx, state, plan, now).await
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        ops::abort_send(self.begin_write().await?, abort).await
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        ops::check_code(self.begin_write().await?, tenant, id, code_hash, now).await
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        ops::get_verification(&self.reader, tenant, id).await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        ops::cancel(&self.writer, tenant, id, now).await
    }

    async fn insert_message(&self, m: &MessageRecord) -> StoreResult<()> {
        ops::insert_message(&self.writer, m).await
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        ops::get_message(&self.reader, tenant, id).await
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        ops::list_messages(&self.reader, tenant, verification_id).await
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        let tx = self.begin_write().await?;
        ops::update_message_by_provider_id(tx, provider, provider_message_id, update).await
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        ops::list_unfinished_messages(&self.reader, provider, created_after, limit).await
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        ops::purge_messages(&self.writer, before, batch).await
    }

    async fn record_usage(&self, d: &UsageRow) -> StoreResult<()> {
        ops::record_usage(&self.writer, d).await
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        ops::usage(&self.reader, tenant, from, to).await
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        ops::replace_code(&self.writer, r, now).await
    }

    async fn push_inbox(&self, e: &InboxEntry) -> StoreResult<()> {
        ops::push_inbox(&self.writer, e).await
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        ops::list_inbox(&self.reader, tenant, phone_index, now, limit).await
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        ops::hit_rate_limit(&self.writer, key, limit, window_seconds, now).await
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        ops::add_to_counter(&self.writer, key, amount, window_seconds, now).await
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        ops::read_counter(&self.reader, key, window_seconds, now).await
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        ops::set_marker(&self.writer, namespace, name, value, expires_at).await
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        ops::get_marker(&self.reader, namespace, name, now).await
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        ops::list_markers(&self.reader, namespace, now).await
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        ops::delete_marker(&self.writer, namespace, name).await
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        ops::claim_marker(&self.writer, namespace, name, holder, expires_at, now).await
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        ops::list_sealed_with_other_key(&self.reader, current_key, after, limit).await
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        ops::reseal_phone(&self.writer, id, old, new).await
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let now_ms = millis(now);
        let tx = self.begin_write().await?;
        // The budget keeps the write lock held only briefly; the subqueries walk
        // the expiry indexes instead of the tables. Nothing else can hold a row,
        // so unlike PostgreSQL there is nothing to skip.
        let steps = [
            (
                "UPDATE verifications SET status = 'expired', code_hash = NULL, updated_at = $1
                 WHERE id IN (SELECT id FROM verifications
                              WHERE status = 'pending' AND expires_at <= $1 LIMIT $2)",
                now_ms,
            ),
            (
                "DELETE FROM inbox WHERE id IN
                     (SELECT id FROM inbox WHERE expires_at <= $1 LIMIT $2)",
                now_ms,
            ),
            (
                "DELETE FROM rate_limits WHERE key IN
                     (SELECT key FROM rate_limits WHERE window_end <= $1 LIMIT $2)",
                now_ms,
            ),
            (
                "DELETE FROM counters WHERE rowid IN
                     (SELECT rowid FROM counters WHERE keep_until <= $1 LIMIT $2)",
                now_ms,
            ),
            (
                "DELETE FROM markers WHERE rowid IN
                     (SELECT rowid FROM markers WHERE expires_at <= $1 LIMIT $2)",
                now_ms,
            ),
            (
                "DELETE FROM subjects WHERE rowid IN
                     (SELECT rowid FROM subjects
                      WHERE last_sent_at <= $1 OR last_sent_at IS NULL LIMIT $2)",
                millis(now - KEEP_SUBJECTS),
            ),
        ];
        ops::purge_steps(tx, &steps, batch).await
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        ops::count_pending(&self.reader, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open_in_tempdir(options: SqliteOptions) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(&dir.path().join("otpd.db"), options)
            .await
            .unwrap();
        (dir, store)
    }

    async fn synchronous(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn durability_settings_are_applied() {
        let (_dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(synchronous(&store.writer).await, 1, "NORMAL by default");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(fk, 1);

        let full = SqliteOptions {
            synchronous_full: true,
            ..SqliteOptions::default()
        };
        let (_dir, store) = open_in_tempdir(full).await;
        assert_eq!(synchronous(&store.writer).await, 2, "FULL when asked");
    }

    #[tokio::test]
    async fn readers_cannot_write() {
        let (_dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let write = sqlx::query("DELETE FROM api_keys")
            .execute(&store.reader)
            .await;
        assert!(write.is_err(), "a reader connection must refuse writes");
    }
}
