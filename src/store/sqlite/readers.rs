//! Reads on the caller's own thread. Looking up a few rows by index takes
//! SQLite microseconds, less than handing the read to another thread and
//! back, and a WAL reader never waits for the writer; so the hot reads (each
//! send's counters and markers, a check by number's lookup) run right where
//! they are asked, on a connection from this small stack of idle ones.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use rusqlite::Connection;

use crate::store::{StoreError, StoreResult};

type Open = Box<dyn Fn() -> StoreResult<Connection> + Send + Sync>;

pub(super) struct Readers {
    idle: Mutex<Vec<Connection>>,
    open: Open,
    /// The most idle connections kept; a burst beyond opens more, briefly.
    keep: usize,
    closed: AtomicBool,
}

impl Readers {
    pub(super) fn new(open: Open, keep: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::with_capacity(keep)),
            open,
            keep,
            closed: AtomicBool::new(false),
        }
    }

    /// Runs `read` on an idle connection (or a new one).
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the sqlite store is closed".into()));
        }
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(conn) => conn,
            None => (self.open)()?,
        };
        let result = read(&conn);
        let mut idle = self.idle.lock();
        if idle.len() < self.keep && !self.closed.load(Ordering::Acquire) {
            idle.push(conn);
        }
        result
    }

    /// Closes the idle connections; reads after this fail as unavailable.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle.lock().clear();
    }
}
