//! SQLite store (in progress).

use std::path::Path;

use super::{StoreError, StoreResult};

pub struct SqliteStore;

impl SqliteStore {
    pub async fn open(_path: &Path) -> StoreResult<Self> {
        Err(StoreError::Unavailable("not yet implemented".into()))
    }
}
