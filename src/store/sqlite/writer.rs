//! SQLite's one writer, with group commit. Every write operation is sent to a
//! single thread that owns the write connections; it takes the operations
//! queued (up to `MAX_GROUP`), runs them one after the other inside one
//! `BEGIN IMMEDIATE` … `COMMIT`, and answers each caller only after that
//! COMMIT succeeded, so no caller learns an outcome that is not durable. One
//! commit (one WAL append) and one transaction's statements then serve a
//! whole group.
//!
//! An operation comes in one of two forms. The hot ones (sends, checks,
//! counters: `hot`) are plain functions on a rusqlite connection that this
//! thread calls itself, so a whole group costs the callers one hand-off. The
//! others keep the sqlx form they share with PostgreSQL; sqlx runs each
//! statement on a thread of its own, so this thread drives them with a
//! runtime of its own, at two thread switches a statement. A group holds one
//! form only, and the two connections take turns on this thread, so they
//! never contend for the file's write lock.
//!
//! Operations run one at a time, so each read-decide-write is serialised
//! exactly as with a transaction of its own. A savepoint (`op`) isolates
//! them: an operation that fails is rolled back to it and answers its error,
//! while the rest of the group commits. The savepoint is only moved before an
//! operation with several writing statements (a single one is undone by
//! SQLite itself when it fails), which saves a statement per operation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection as _, SqliteConnection};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use super::hot::map_rusqlite;
use crate::store::sql_common::{WriteFuture, WriteKind, map_sqlx};
use crate::store::{StoreError, StoreResult};

/// The most operations one transaction commits together: enough to absorb a
/// burst of concurrent requests, few enough to keep the write lock brief.
const MAX_GROUP: usize = 64;
/// Operations waiting for the writer; a caller beyond this waits to enqueue.
const QUEUE: usize = 1024;

/// Opens the writer's own rusqlite connection (again, after one was lost).
pub(super) type OpenDirect = Box<dyn Fn() -> StoreResult<Connection> + Send>;

/// The handle requests send their write operations through.
pub(super) struct Writer {
    queue: mpsc::Sender<Message>,
    /// How long an operation may wait for the writer before it is refused as
    /// unavailable (the busy timeout, as for another process's lock).
    wait_limit: Duration,
}

enum Message {
    Direct(Box<dyn Job<Connection>>),
    Sqlx(Box<dyn Job<SqlxSession>>),
    /// Finish what is queued before this, close both connections, answer.
    Close(oneshot::Sender<()>),
}

impl Writer {
    /// Starts the writer thread. Its sqlx operations run on a connection
    /// `connect` opens, the others on what `open_direct` opens. The thread
    /// ends on `close`, or when the last handle is dropped.
    pub(super) fn start(
        connect: SqliteConnectOptions,
        open_direct: OpenDirect,
        wait_limit: Duration,
    ) -> StoreResult<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("sqlite writer runtime: {e}")))?;
        let (queue, messages) = mpsc::channel(QUEUE);
        let thread = Thread {
            direct: None,
            open_direct,
            sqlx: None,
            connect,
            runtime,
        };
        std::thread::Builder::new()
            .name("otpd-sqlite-writer".into())
            .spawn(move || thread.run(messages))
            .map_err(|e| StoreError::Unavailable(format!("sqlite writer thread: {e}")))?;
        Ok(Self { queue, wait_limit })
    }

    /// Runs `op` on the writer's rusqlite connection in the next group, and
    /// answers once the group committed.
    pub(super) async fn direct<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (job, answer) = self.queued(kind, op);
        self.send(Message::Direct(job), answer).await
    }

    /// Runs the sqlx operation `op` in the next group, and answers once the
    /// group committed.
    pub(super) async fn sqlx<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
    {
        let (job, answer) = self.queued(kind, op);
        self.send(Message::Sqlx(job), answer).await
    }

    /// Lets queued operations finish, then closes the writer's connections.
    /// Writes after this fail as unavailable.
    pub(super) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    fn queued<T, F>(
        &self,
        kind: WriteKind,
        op: F,
    ) -> (Box<Queued<F, T>>, oneshot::Receiver<StoreResult<T>>) {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Queued {
            kind,
            op,
            reply,
            deadline: Instant::now() + self.wait_limit,
        });
        (job, answer)
    }

    async fn send<T>(
        &self,
        message: Message,
        answer: oneshot::Receiver<StoreResult<T>>,
    ) -> StoreResult<T> {
        self.queue.send(message).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the sqlite writer has stopped".into())
}

/// What the writer thread owns.
struct Thread {
    /// Opened on first use, and again after a broken transaction closed it.
    direct: Option<Connection>,
    open_direct: OpenDirect,
    /// Likewise, sqlx's.
    sqlx: Option<SqliteConnection>,
    connect: SqliteConnectOptions,
    /// Drives the sqlx operations, whose statements sqlx's connection thread
    /// answers asynchronously.
    runtime: Runtime,
}

impl Thread {
    fn run(mut self, mut messages: mpsc::Receiver<Message>) {
        let mut queued = VecDeque::with_capacity(MAX_GROUP);
        loop {
            if queued.is_empty() {
                match messages.blocking_recv() {
                    Some(message) => queued.push_back(message),
                    None => return,
                }
            }
            while queued.len() < MAX_GROUP {
                match messages.try_recv() {
                    Ok(message) => queued.push_back(message),
                    Err(_) => break,
                }
            }
            match queued.pop_front() {
                Some(Message::Direct(first)) => {
                    let jobs = run_of(first, &mut queued, |message| match message {
                        Message::Direct(job) => Ok(job),
                        other => Err(other),
                    });
                    self.direct_group(jobs);
                }
                Some(Message::Sqlx(first)) => {
                    let jobs = run_of(first, &mut queued, |message| match message {
                        Message::Sqlx(job) => Ok(job),
                        other => Err(other),
                    });
                    self.sqlx_group(jobs);
                }
                Some(Message::Close(done)) => {
                    self.direct = None;
                    if let Some(conn) = self.sqlx.take() {
                        let _ = self.runtime.block_on(conn.close());
                    }
                    let _ = done.send(());
                    return;
                }
                None => {}
            }
        }
    }

    fn direct_group(&mut self, mut jobs: VecDeque<Box<dyn Job<Connection>>>) {
        // Each round answers at least one job, so this ends.
        while !jobs.is_empty() {
            let conn = match self.direct.take() {
                Some(conn) => conn,
                None => match (self.open_direct)() {
                    Ok(conn) => conn,
                    Err(e) => return refuse_all(jobs, &e),
                },
            };
            self.direct = commit_group(conn, &mut jobs);
        }
    }

    fn sqlx_group(&mut self, mut jobs: VecDeque<Box<dyn Job<SqlxSession>>>) {
        while !jobs.is_empty() {
            let conn = match self.sqlx.take() {
                Some(conn) => conn,
                None => match self.runtime.block_on(self.connect.connect()) {
                    Ok(conn) => conn,
                    Err(e) => return refuse_all(jobs, &map_sqlx(e)),
                },
            };
            let session = SqlxSession {
                conn,
                runtime: self.runtime.handle().clone(),
            };
            self.sqlx = commit_group(session, &mut jobs).map(|session| session.conn);
        }
    }
}

/// `first` and the jobs of its form queued right after it: one group's worth.
fn run_of<J>(
    first: J,
    queued: &mut VecDeque<Message>,
    of_form: impl Fn(Message) -> Result<J, Message>,
) -> VecDeque<J> {
    let mut jobs = VecDeque::from([first]);
    while let Some(message) = queued.pop_front() {
        match of_form(message) {
            Ok(job) => jobs.push_back(job),
            Err(other) => {
                queued.push_front(other);
                break;
            }
        }
    }
    jobs
}

fn refuse_all<C: ?Sized>(jobs: VecDeque<Box<dyn Job<C>>>, error: &StoreError) {
    for job in jobs {
        job.refuse(failed(error));
    }
}

fn failed(error: &StoreError) -> StoreError {
    StoreError::Unavailable(format!("sqlite write failed: {error}"))
}

/// A write connection as a group uses it.
trait Session: Sized {
    fn exec(&mut self, sql: &'static str) -> StoreResult<()>;
    /// The transaction is lost or in doubt: the connection is closed, which
    /// rolls back whatever is left, so the next group starts on a fresh one.
    fn discard(self);
}

impl Session for Connection {
    fn exec(&mut self, sql: &'static str) -> StoreResult<()> {
        self.execute_batch(sql).map_err(map_rusqlite)
    }

    fn discard(self) {
        drop(self);
    }
}

/// sqlx's write connection, driven from the writer thread.
struct SqlxSession {
    conn: SqliteConnection,
    runtime: tokio::runtime::Handle,
}

impl Session for SqlxSession {
    fn exec(&mut self, sql: &'static str) -> StoreResult<()> {
        let run = sqlx::raw_sql(sql).execute(&mut self.conn);
        self.runtime.block_on(run).map(drop).map_err(map_sqlx)
    }

    fn discard(self) {
        drop(self.conn);
    }
}

/// One queued write operation, its type erased so that one queue carries all
/// of a form.
trait Job<C: ?Sized>: Send {
    fn kind(&self) -> WriteKind;
    /// Runs the operation on the open transaction, unless its caller has gone
    /// or waited too long.
    fn run(self: Box<Self>, conn: &mut C) -> Ran;
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

struct Queued<F, T> {
    kind: WriteKind,
    op: F,
    reply: oneshot::Sender<StoreResult<T>>,
    deadline: Instant,
}

impl<F, T: Send + 'static> Queued<F, T> {
    /// Calls `op` (the operation, given its connection) unless the caller
    /// gave up (its request timed out: the operation must not take effect
    /// behind its back) or waited too long.
    fn run_with(self, op: impl FnOnce(F) -> StoreResult<T>) -> Ran {
        let Queued {
            op: f,
            reply,
            deadline,
            ..
        } = self;
        if reply.is_closed() {
            return untouched();
        }
        if Instant::now() > deadline {
            let _ = reply.send(Err(StoreError::Unavailable(
                "timed out waiting for the sqlite writer".into(),
            )));
            return untouched();
        }
        let result = op(f);
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
    }
}

impl<T, F> Job<Connection> for Queued<F, T>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
{
    fn kind(&self) -> WriteKind {
        self.kind
    }

    fn run(self: Box<Self>, conn: &mut Connection) -> Ran {
        self.run_with(|op| op(conn))
    }

    fn refuse(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<T, F> Job<SqlxSession> for Queued<F, T>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> WriteFuture<'c, T> + Send + 'static,
{
    fn kind(&self) -> WriteKind {
        self.kind
    }

    fn run(self: Box<Self>, session: &mut SqlxSession) -> Ran {
        let SqlxSession { conn, runtime } = session;
        self.run_with(|op| runtime.block_on(op(conn)))
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

/// Runs queued jobs in one transaction on `conn` and answers them. Returns
/// the connection for the next group, or `None` when the transaction broke
/// (the job that broke it has been answered; the others stay queued).
fn commit_group<S: Session>(mut conn: S, jobs: &mut VecDeque<Box<dyn Job<S>>>) -> Option<S> {
    // The write lock up front: never a failed upgrade of a read lock.
    if let Err(e) = conn.exec("BEGIN IMMEDIATE; SAVEPOINT op") {
        conn.discard();
        refuse_all(std::mem::take(jobs), &e);
        return None;
    }
    let mut ran = Vec::with_capacity(jobs.len());
    // Whether the database has changed since the savepoint was set.
    let mut moved = false;
    while let Some(job) = jobs.pop_front() {
        let kind = job.kind();
        if kind == WriteKind::Transaction && moved {
            if let Err(e) = conn.exec("RELEASE op; SAVEPOINT op") {
                job.refuse(failed(&e));
                return abandon(conn, ran, &e);
            }
            moved = false;
        }
        let done = job.run(&mut conn);
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
                if let Err(e) = conn.exec(undo) {
                    ran.push(done);
                    return abandon(conn, ran, &e);
                }
                moved = false;
            }
        }
        ran.push(done);
    }
    match conn.exec("COMMIT") {
        Ok(()) => {
            for done in ran {
                (done.answer)(Ok(()));
            }
            Some(conn)
        }
        Err(e) => abandon(conn, ran, &e),
    }
}

/// The transaction is lost or in doubt: every job that ran gets the error.
fn abandon<S: Session>(conn: S, ran: Vec<Ran>, error: &StoreError) -> Option<S> {
    conn.discard();
    for done in ran {
        (done.answer)(Err(failed(error)));
    }
    None
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
                    .map_err(map_sqlx)?;
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

    fn insert_directly(conn: &Connection, id: i64) -> StoreResult<()> {
        conn.execute("INSERT INTO t (id) VALUES (?1)", [id])
            .map_err(map_rusqlite)?;
        Ok(())
    }

    /// Operations of both forms, in whatever groups the writer takes them:
    /// the ones that fail leave no trace, the others commit, whichever
    /// connection ran them.
    #[tokio::test]
    async fn a_failing_operation_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.db");
        let connect = SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let open = Box::new(move || Connection::open(&file).map_err(map_rusqlite));
        let writer = Writer::start(connect, open, Duration::from_secs(5)).unwrap();

        let (one, two, duplicate, three, four, five, taken) = tokio::join!(
            writer.sqlx(WriteKind::Statement, insert(1)),
            writer.sqlx(WriteKind::Transaction, insert_then_fail(2)),
            writer.sqlx(WriteKind::Statement, insert(1)),
            writer.sqlx(WriteKind::ReadThenWrite, insert(3)),
            writer.direct(WriteKind::Statement, |c| insert_directly(c, 4)),
            writer.direct(WriteKind::Transaction, |c| {
                insert_directly(c, 5)?;
                Err::<(), _>(StoreError::Unavailable("decided to fail".into()))
            }),
            writer.direct(WriteKind::Statement, |c| insert_directly(c, 3)),
        );
        one.unwrap();
        assert!(two.is_err());
        assert!(
            duplicate.is_err(),
            "a unique violation is that operation's error"
        );
        three.unwrap();
        four.unwrap();
        assert!(five.is_err());
        assert!(taken.is_err(), "3 was committed by the sqlx group before");
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, [1, 3, 4]);

        writer.close().await;
        let after = writer.direct(WriteKind::Statement, |c| insert_directly(c, 6));
        assert!(after.await.is_err(), "a closed writer refuses writes");
    }
}
