//! The embedded store: one SQLite file in WAL mode. SQLite allows one writer at
//! a time, so every write goes to one task that owns the only write connection
//! and commits queued operations in groups (`writer`); requests queue there
//! instead of failing with `SQLITE_BUSY`. Reads use a separate pool and never
//! wait for writers, and WAL checkpoints run beside the writer (`checkpoint`).

mod checkpoint;
mod writer;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection};

use self::checkpoint::Checkpointer;
use self::writer::Writer;
use super::sql_common::{
    KEEP_ENDED, KEEP_SUBJECTS, SubjectRow, SubjectState, WriteFuture, WriteKind, map_migrate,
    map_sqlx, millis,
};
use super::{StoreError, StoreResult};
use crate::domain::SubjectKey;

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
    /// The one write connection: the writer task's, and migrations'.
    writer: SqlitePool,
    reader: SqlitePool,
    group: Writer,
    checkpointer: Checkpointer,
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

        // No test before acquiring: a ping is a round trip to the connection's
        // thread, and a local file does not drop connections.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(options.busy_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(connect.clone().pragma(
                "wal_autocheckpoint",
                checkpoint::WRITER_BACKSTOP_PAGES.to_string(),
            ))
            .await
            .map_err(map_sqlx)?;
        MIGRATOR.run(&writer).await.map_err(map_migrate)?;
        let checkpointer = Checkpointer::start(&connect).await?;
        // `query_only` turns an accidental write on a reader into an error
        // instead of a second writer racing the first for the file lock.
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(options.max_readers.max(1))
            .acquire_timeout(options.busy_timeout)
            .connect_with(connect.pragma("query_only", "ON"))
            .await
            .map_err(map_sqlx)?;
        let group = Writer::start(writer.clone(), options.busy_timeout);
        Ok(Self {
            writer,
            reader,
            group,
            checkpointer,
        })
    }

    /// Applies pending migrations (`open` already does; this is for `otpd migrate`).
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.writer).await.map_err(map_migrate)
    }

    /// Waits for in-flight work and closes the file, so a new store may open it.
    /// Writes after this fail as unavailable.
    pub async fn close(&self) {
        // The writer last: closing its final connection checkpoints the WAL.
        self.reader.close().await;
        self.checkpointer.stop().await;
        self.writer.close().await;
    }

    /// Every write runs on the writer task, in its group's transaction, which
    /// holds the only write lock: each read-decide-write is serialised.
    async fn write<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        self.group.write(kind, op).await
    }

    /// No row lock needed: the writer already holds the only write lock.
    /// A subject seen for the first time has no row yet.
    async fn subject_state(
        conn: &mut SqliteConnection,
        tenant: &str,
        subject: &SubjectKey,
    ) -> StoreResult<SubjectState> {
        let state = sqlx::query_as::<_, SubjectRow>(
            "SELECT current_id, last_sent_at, window_start, window_count
             FROM subjects WHERE tenant = $1 AND subject = $2",
        )
        .bind(tenant)
        .bind(subject.0.as_slice())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx)?
        .map(SubjectState::try_from)
        .transpose()?;
        Ok(state.unwrap_or(SubjectState {
            current: None,
            last_sent_at: None,
            window_start: None,
            window_count: 0,
        }))
    }

    /// One file has one writer, so there is never another purge to defer to.
    fn purge_lock(&self) -> i64 {
        0
    }

    async fn take_purge_lock(_conn: &mut SqliteConnection, _lock: i64) -> StoreResult<bool> {
        Ok(true)
    }

    /// The batch budget keeps the write lock held only briefly; the subqueries
    /// walk the expiry indexes instead of the tables. No other transaction can
    /// hold a row, so unlike PostgreSQL there is nothing to skip.
    fn purge_steps(now: DateTime<Utc>) -> Vec<(&'static str, i64)> {
        let now_ms = millis(now);
        vec![
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
            (
                // Ended verifications go once their delivery records have been
                // purged by retention: nothing refers to them any more.
                "DELETE FROM verifications WHERE id IN
                     (SELECT v.id FROM verifications v
                      WHERE v.status <> 'pending' AND v.expires_at <= $1
                        AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.verification_id = v.id) LIMIT $2)",
                millis(now - KEEP_ENDED),
            ),
        ]
    }
}

super::sql_common::sql_store!(
    store: SqliteStore,
    db: Sqlite,
    read: reader,
    insertion_order: "rowid",
    for_update: "",
    day_of_millis: "date(created_at / 86400000 * 86400, 'unixepoch')",
);

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
    async fn the_wal_is_checkpointed_beside_the_writer() {
        use crate::store::{Store, UsageRow};
        let (dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let backstop: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(backstop, i64::from(checkpoint::WRITER_BACKSTOP_PAGES));
        // Everything so far (the migrations) into the file, so that it grows
        // only when a checkpoint copies what follows.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&store.writer)
            .await
            .unwrap();
        let file = dir.path().join("otpd.db");
        let size = || std::fs::metadata(&file).unwrap().len();
        let before = size();
        // Far below the writer's own threshold: only the background
        // checkpoints can move these pages into the database file.
        let day = chrono::NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
        for route in 0..2_000 {
            let mut row = UsageRow::new("acme", day, route, Some("NL"), None);
            row.sent = 1;
            store.record_usage(&row).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint copied the WAL into the database file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.close().await;
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
