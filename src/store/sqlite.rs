//! The embedded store: one SQLite file in WAL mode. SQLite allows one writer at
//! a time, so every write goes to one thread that owns the write connections
//! and commits queued operations in groups (`writer`); requests queue there
//! instead of failing with `SQLITE_BUSY`. Reads use connections of their own
//! and never wait for the writer; the hot operations, those of every send
//! and check (`hot`), run without sqlx: the writes on the writer thread
//! itself, the reads on the caller's thread (`readers`). WAL checkpoints run
//! beside the writer (`checkpoint`).

mod checkpoint;
mod hot;
mod readers;
mod writer;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use self::checkpoint::Checkpointer;
use self::readers::Readers;
use self::writer::Writer;
use super::migrations::SQLITE_MIGRATOR;
use super::sql_common::{
    KEEP_ENDED, KEEP_SUBJECTS, WriteFuture, WriteKind, map_migrate, map_sqlx, millis,
};
use super::sql_hot::HotTx;
use super::{CounterAdd, StoreError, StoreResult};

/// The page size of a database file otpd creates. A commit writes every page
/// it changed whole, into the WAL and again at the checkpoint, and a send
/// changes one or two rows in each of about ten B-trees: at 2 KiB every
/// request wrote a quarter to a third less to storage than at SQLite's 4 KiB,
/// which is what a disk with a throughput cap limits. In alternating rounds
/// sends gained about a tenth and right-code checks lost about as much
/// (BENCHMARKS.md). A file keeps the page size it was made with; this only
/// applies to new ones.
const PAGE_SIZE: u32 = 2048;

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
    /// How the writer's sqlx connection is opened; migrations open one alike.
    write_options: SqliteConnectOptions,
    reader: SqlitePool,
    readers: Readers,
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
            .foreign_keys(true)
            .page_size(PAGE_SIZE);

        let write_options = connect.clone().pragma(
            "wal_autocheckpoint",
            checkpoint::WRITER_BACKSTOP_PAGES.to_string(),
        );
        migrate(&write_options).await?;
        let checkpointer = Checkpointer::start(&connect).await?;
        // `query_only` turns an accidental write on a reader into an error
        // instead of a second writer racing the first for the file lock. No
        // test before acquiring: a ping is a round trip to the connection's
        // thread, and a local file does not drop connections.
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(options.max_readers.max(1))
            .acquire_timeout(options.busy_timeout)
            .connect_with(connect.clone().pragma("query_only", "ON"))
            .await
            .map_err(map_sqlx)?;
        let open_direct = {
            let (path, options) = (path.to_owned(), options.clone());
            Box::new(move || hot::open(&path, &options)) as writer::OpenDirect
        };
        let group = Writer::start(write_options.clone(), open_direct, options.busy_timeout)?;
        let keep_readers = options.max_readers.max(1) as usize;
        let readers = {
            let (path, options) = (path.to_owned(), options.clone());
            Readers::new(
                Box::new(move || hot::open_reader(&path, &options)),
                keep_readers,
            )
        };
        Ok(Self {
            write_options,
            reader,
            readers,
            group,
            checkpointer,
        })
    }

    /// Applies pending migrations (`open` already does; this is for `otpd migrate`).
    pub async fn migrate(&self) -> StoreResult<()> {
        migrate(&self.write_options).await
    }

    /// Waits for in-flight work and closes the file, so a new store may open it.
    /// Writes after this fail as unavailable.
    pub async fn close(&self) {
        // The writer last: closing its final connection checkpoints the WAL.
        self.reader.close().await;
        self.readers.close();
        self.checkpointer.stop().await;
        self.group.close().await;
    }

    /// Every write runs on the writer thread, in its group's transaction, which
    /// holds the only write lock: each read-decide-write is serialised.
    async fn write<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        self.group.sqlx(kind, op).await
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
                // A re-send after a failed delivery moves the expiry, not the
                // subject's last send: a subject stays while its verification is pending.
                "DELETE FROM subjects WHERE rowid IN
                     (SELECT rowid FROM subjects s
                      WHERE (s.last_sent_at <= $1 OR s.last_sent_at IS NULL)
                        AND NOT EXISTS (SELECT 1 FROM verifications v
                                        WHERE v.id = s.current_id AND v.status = 'pending')
                      LIMIT $2)",
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

/// Applies pending migrations on a connection of their own, closed after.
async fn migrate(connect: &SqliteConnectOptions) -> StoreResult<()> {
    let mut conn = connect.connect().await.map_err(map_sqlx)?;
    SQLITE_MIGRATOR.run(&mut conn).await.map_err(map_migrate)?;
    conn.close().await.map_err(map_sqlx)
}

/// `sql_store!`'s `hot_write`: a hot operation as a write of its kind, run
/// directly on the writer thread.
macro_rules! sqlite_hot_write {
    ($store:expr, $kind:expr, |$tx:ident| $op:expr) => {
        $store
            .group
            .direct($kind, move |conn| {
                let $tx = &mut hot::Direct(conn);
                futures::executor::block_on($op)
            })
            .await
    };
}

impl SqliteStore {
    /// Counter adds, in a write of their own: several statements, one commit.
    async fn write_counts(
        &self,
        adds: Vec<CounterAdd>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<u64>> {
        sqlite_hot_write!(self, WriteKind::Transaction, |tx| tx
            .add_counters(&adds, now))
    }
}

/// `sql_store!`'s `hot_read`: a hot read, run directly on the caller's thread.
macro_rules! sqlite_hot_read {
    ($store:expr, |$tx:ident| $op:expr) => {
        $store.readers.read(|conn| {
            let $tx = &mut hot::Direct(conn);
            futures::executor::block_on($op)
        })
    };
}

super::sql_common::sql_store!(
    store: SqliteStore,
    read: reader,
    insertion_order: "rowid",
    hot_write: sqlite_hot_write,
    hot_read: sqlite_hot_read,
    compound_write: WriteKind::Transaction,
    counts_apart: false,
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

    /// A numeric pragma's value on each of the writer's two connections,
    /// asked through the writer itself: (the direct one's, sqlx's).
    async fn writer_pragma(store: &SqliteStore, pragma: &'static str) -> (i64, i64) {
        let ask = format!("PRAGMA {pragma}");
        let direct = {
            let ask = ask.clone();
            store.group.direct(WriteKind::Statement, move |conn| {
                conn.query_row(&ask, [], |r| r.get(0))
                    .map_err(hot::map_rusqlite)
            })
        };
        let sqlx = store.group.sqlx(WriteKind::Statement, move |conn| {
            Box::pin(async move {
                sqlx::query_scalar(sqlx::AssertSqlSafe(ask))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(map_sqlx)
            })
        });
        (direct.await.unwrap(), sqlx.await.unwrap())
    }

    /// `.cargo/config.toml` builds the bundled SQLite without its two global
    /// mutexes; a build that lost the setting shows here, not only in the
    /// benchmark.
    #[test]
    fn sqlite_is_built_without_its_global_locks() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut stmt = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = stmt
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "one page cache shared by every connection: {options:?}"
        );
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "memory statistics on: {options:?}"
        );
    }

    #[tokio::test]
    async fn durability_settings_are_applied() {
        let (_dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(
            mode, "wal",
            "a property of the file, which every connection sees"
        );
        assert_eq!(
            writer_pragma(&store, "synchronous").await,
            (1, 1),
            "NORMAL by default"
        );
        assert_eq!(writer_pragma(&store, "foreign_keys").await, (1, 1));

        let full = SqliteOptions {
            synchronous_full: true,
            ..SqliteOptions::default()
        };
        let (_dir, store) = open_in_tempdir(full).await;
        assert_eq!(
            writer_pragma(&store, "synchronous").await,
            (2, 2),
            "FULL when asked"
        );
    }

    #[tokio::test]
    async fn a_new_file_gets_small_pages_and_an_older_one_keeps_its_own() {
        use crate::store::{Store, UsageRow};
        let (_dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        assert_eq!(
            writer_pragma(&store, "page_size").await,
            (i64::from(PAGE_SIZE), i64::from(PAGE_SIZE))
        );
        store.close().await;

        // A file made before, with SQLite's default page size and a row in it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otpd.db");
        let day = chrono::NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
        let mut row = UsageRow::new("acme", day, 1, Some("NL"), None);
        row.sent = 1;
        {
            let old = rusqlite::Connection::open(&path).unwrap();
            old.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;")
                .unwrap();
            drop(old);
            let store = SqliteStore::open(&path).await.unwrap();
            store.record_usage(&row).await.unwrap();
            store.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(writer_pragma(&store, "page_size").await, (4096, 4096));
        let kept = store.usage("acme", day, day).await.unwrap();
        assert_eq!(kept.iter().map(|r| r.sent).sum::<u64>(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn the_wal_is_checkpointed_beside_the_writer() {
        use crate::store::{Store, UsageRow};
        let (dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let backstop = i64::from(checkpoint::WRITER_BACKSTOP_PAGES);
        assert_eq!(
            writer_pragma(&store, "wal_autocheckpoint").await,
            (backstop, backstop)
        );
        // Everything so far (the migrations) into the file, so that it grows
        // only when a checkpoint copies what follows.
        let mut conn = store.write_options.connect().await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
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
        let write = store.readers.read(|conn| {
            conn.execute("DELETE FROM api_keys", [])
                .map_err(hot::map_rusqlite)
        });
        assert!(write.is_err(), "so must a direct reader");
    }

    #[tokio::test]
    async fn a_closed_store_refuses_reads_and_writes() {
        use crate::store::Store;
        let (_dir, store) = open_in_tempdir(SqliteOptions::default()).await;
        let subject = crate::domain::SubjectKey([7; 32]);
        let now = chrono::Utc::now();
        assert_eq!(
            store.find_current("acme", &subject, now).await.unwrap(),
            None
        );
        store.close().await;
        assert!(store.find_current("acme", &subject, now).await.is_err());
        assert!(store.add_to_counter("k", 1, 60, now).await.is_err());
    }
}
