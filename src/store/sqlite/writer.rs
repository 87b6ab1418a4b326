//! SQLite's one writer, with group commit. Every write operation is sent to a
//! single task that owns the write connection; the task takes all operations
//! queued (up to `MAX_GROUP`), runs them one after the other inside one
//! `BEGIN IMMEDIATE` … `COMMIT`, and answers each caller only after that COMMIT
//! succeeded, so no caller learns an outcome that is not durable. One commit
//! (one WAL append) and one transaction's statements then serve a whole group.
//!
//! Operations still run one at a time on the one connection, so each
//! read-decide-write is serialised exactly as with a transaction of its own.
//! A savepoint (`op`) isolates them: an operation that fails is rolled back to
//! it and answers its error, while the rest of the group commits. The
//! savepoint is only moved before an operation with several writing
//! statements (a single one is undone by SQLite itself when it fails), which
//! saves a statement per operation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::store::sql_common::{WriteFuture, WriteKind};
use crate::store::{StoreError, StoreResult};

/// The most operations one transaction commits together: enough to absorb a
/// burst of concurrent requests, few enough to keep the write lock brief.
const MAX_GROUP: usize = 64;
/// Operations waiting for the writer; a caller beyond this waits to enqueue.
const QUEUE: usize = 1024;

/// The handle requests send their write operations through.
pub(super) struct Writer {
    queue: mpsc::Sender<Box<dyn Job>>,
    /// How long an operation may wait for the writer before it is refused as
    /// unavailable (the busy timeout, as for another process's lock).
    wait_limit: Duration,
}

impl Writer {
    /// Starts the writer task on the write pool (one connection); it ends when
    /// the last handle is dropped.
    pub(super) fn start(pool: SqlitePool, wait_limit: Duration) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, jobs));
        Self { queue, wait_limit }
    }

    /// Runs `op` in the next group and answers once the group committed.
    pub(super) async fn write<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Queued {
            kind,
            op,
            reply,
            deadline: Instant::now() + self.wait_limit,
        });
        self.queue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the sqlite writer has stopped".into())
}

fn failed(error: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite write failed: {error}"))
}

/// One queued write operation, its type erased so that one queue carries all.
trait Job: Send {
    fn kind(&self) -> WriteKind;
    /// Runs the operation on the open transaction, unless its caller has gone
    /// or waited too long.
    fn run(self: Box<Self>, conn: &mut SqliteConnection) -> BoxFuture<'_, Ran>;
    /// Answers `error` without running.
    fn refuse(self: Box<Self>, error: StoreError);
}

/// A job that ran, whose answer waits for the group's COMMIT.
struct Ran {
    effect: Effect,
    /// Called with the COMMIT's result: sends the operation's own result if it
    /// committed, the COMMIT's error otherwise.
    answer: Box<dyn FnOnce(StoreResult<()>) + Send>,
}

enum Effect {
    /// Did not touch the database.
    Untouched,
    /// Succeeded (and may have written).
    Done,
    /// Failed; what it wrote must be undone.
    Failed,
}

struct Queued<T, F> {
    kind: WriteKind,
    op: F,
    reply: oneshot::Sender<StoreResult<T>>,
    deadline: Instant,
}

impl<T, F> Job for Queued<T, F>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
{
    fn kind(&self) -> WriteKind {
        self.kind
    }

    fn run(self: Box<Self>, conn: &mut SqliteConnection) -> BoxFuture<'_, Ran> {
        let Queued {
            op,
            reply,
            deadline,
            ..
        } = *self;
        Box::pin(async move {
            // A caller that gave up (its request timed out) must not have its
            // operation take effect behind its back.
            if reply.is_closed() {
                return untouched();
            }
            if Instant::now() > deadline {
                let _ = reply.send(Err(StoreError::Unavailable(
                    "timed out waiting for the sqlite writer".into(),
                )));
                return untouched();
            }
            let result = op(conn).await;
            Ran {
                effect: if result.is_ok() {
                    Effect::Done
                } else {
                    Effect::Failed
                },
                answer: Box::new(move |committed: StoreResult<()>| {
                    let _ = reply.send(committed.and(result));
                }),
            }
        })
    }

    fn refuse(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

fn untouched() -> Ran {
    Ran {
        effect: Effect::Untouched,
        answer: Box::new(|_| {}),
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::Receiver<Box<dyn Job>>) {
    let mut received = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut received, MAX_GROUP).await > 0 {
        let mut jobs = VecDeque::from(std::mem::take(&mut received));
        // Each round answers at least one job, so this ends.
        while !jobs.is_empty() {
            commit_group(&pool, &mut jobs).await;
        }
        received = Vec::from(jobs);
    }
}

/// Runs queued jobs in one transaction and answers them. Returns early, with
/// jobs left queued for the next group, when the transaction broke; the job
/// that broke it has been answered by then.
async fn commit_group(pool: &SqlitePool, jobs: &mut VecDeque<Box<dyn Job>>) {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => {
            for job in jobs.drain(..) {
                job.refuse(failed(&e));
            }
            return;
        }
    };
    // The write lock up front: never a failed upgrade of a read lock.
    if let Err(e) = exec(&mut conn, "BEGIN IMMEDIATE; SAVEPOINT op").await {
        abandon(&mut conn, Vec::new(), &e);
        for job in jobs.drain(..) {
            job.refuse(failed(&e));
        }
        return;
    }
    let mut ran = Vec::with_capacity(jobs.len());
    // Whether the database has changed since the savepoint was set.
    let mut moved = false;
    while let Some(job) = jobs.pop_front() {
        let kind = job.kind();
        if kind == WriteKind::Transaction && moved {
            if let Err(e) = exec(&mut conn, "RELEASE op; SAVEPOINT op").await {
                job.refuse(failed(&e));
                return abandon(&mut conn, ran, &e);
            }
            moved = false;
        }
        let done = job.run(&mut conn).await;
        match done.effect {
            Effect::Untouched => {}
            Effect::Done => moved = true,
            Effect::Failed => {
                // Either statement also fails if the error ended the whole
                // transaction (as SQLite does on I/O errors or a full disk).
                let undo = match kind {
                    WriteKind::Transaction => "ROLLBACK TO op",
                    WriteKind::Statement | WriteKind::ReadThenWrite => "RELEASE op; SAVEPOINT op",
                };
                if let Err(e) = exec(&mut conn, undo).await {
                    ran.push(done);
                    return abandon(&mut conn, ran, &e);
                }
                moved = false;
            }
        }
        ran.push(done);
    }
    match exec(&mut conn, "COMMIT").await {
        Ok(()) => {
            for done in ran {
                (done.answer)(Ok(()));
            }
        }
        Err(e) => abandon(&mut conn, ran, &e),
    }
}

/// The transaction is lost or in doubt: every job that ran gets the error,
/// and the connection is closed (which rolls back whatever is left) so the
/// next group starts on a fresh one.
fn abandon(conn: &mut PoolConnection<Sqlite>, ran: Vec<Ran>, error: &sqlx::Error) {
    conn.close_on_drop();
    for done in ran {
        (done.answer)(Err(failed(error)));
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(&mut *conn).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    type Op = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, ()> + Send>;

    fn insert(id: i64) -> Op {
        Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t (id) VALUES ($1)")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(())
            })
        })
    }

    /// Inserts `id`, then fails: the insert must be rolled back.
    fn insert_then_fail(id: i64) -> Op {
        Box::new(move |conn| {
            Box::pin(async move {
                insert(id)(conn).await?;
                Err(StoreError::Unavailable("decided to fail".into()))
            })
        })
    }

    /// One group (the current-thread runtime enqueues all four before the
    /// writer runs): the operations that fail leave no trace, the others commit.
    #[tokio::test]
    async fn a_failing_operation_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let connect = SqliteConnectOptions::new()
            .filename(dir.path().join("w.db"))
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let writer = Writer::start(pool.clone(), Duration::from_secs(5));

        let (one, two, duplicate, three) = tokio::join!(
            writer.write(WriteKind::Statement, insert(1)),
            writer.write(WriteKind::Transaction, insert_then_fail(2)),
            writer.write(WriteKind::Statement, insert(1)),
            writer.write(WriteKind::ReadThenWrite, insert(3)),
        );
        one.unwrap();
        assert!(two.is_err());
        assert!(
            duplicate.is_err(),
            "a unique violation is that operation's error"
        );
        three.unwrap();
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, [1, 3]);
    }
}
