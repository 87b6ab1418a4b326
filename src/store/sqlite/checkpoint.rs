//! WAL checkpoints on a connection of their own. SQLite's automatic checkpoint
//! runs inside the commit that crosses its threshold, so the one writer, and
//! every request queued behind it, would wait for the copy into the database
//! file and its fsync. A passive checkpoint from another connection takes no
//! write lock: the writer goes on appending while it runs.

use std::time::Duration;

use parking_lot::Mutex;
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::store::StoreResult;
use crate::store::sql_common::map_sqlx;

/// How often the WAL is copied back. Each checkpoint ends in fsyncs, and the
/// kernel's writeback for them takes the cores from the request threads in
/// one piece: the more one checkpoint carries, the longer requests wait
/// (sends' p99 at half of peak on ext4: 59 ms checkpointing every second,
/// 31–43 ms every 200 ms, 12–25 ms every 10–50 ms; BENCHMARKS.md). Idle, a
/// tick finds no new frames, and copies and syncs nothing.
const EVERY: Duration = Duration::from_millis(50);

/// The writer still checkpoints by itself once the WAL holds this many pages
/// (32 MiB at 2 KiB), should the background checkpoints ever fall behind.
pub(super) const WRITER_BACKSTOP_PAGES: u32 = 16_384;

pub(super) struct Checkpointer {
    stop: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Checkpointer {
    /// Opens the checkpoint connection and starts checkpointing; it ends with
    /// `stop`, or when this handle is dropped.
    pub(super) async fn start(connect: &SqliteConnectOptions) -> StoreResult<Self> {
        let mut conn = connect.connect().await.map_err(map_sqlx)?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut conn)
                    .await
                {
                    tracing::warn!(error = %e, "sqlite checkpoint failed");
                }
            }
            let _ = sqlx::Connection::close(conn).await;
        });
        Ok(Self {
            stop: Mutex::new(Some((stop, task))),
        })
    }

    /// Stops checkpointing and closes the connection (the writer's last close
    /// then checkpoints what is left).
    pub(super) async fn stop(&self) {
        let Some((stop, task)) = self.stop.lock().take() else {
            return;
        };
        let _ = stop.send(());
        let _ = task.await;
    }
}
