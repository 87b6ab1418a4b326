//! A time bound around any store: an operation that does not finish in time
//! answers `Unavailable` (503) instead of hanging the request. A network stall
//! mid-transaction drops the future, which rolls the transaction back, so a
//! caller never sees a wrong "valid" or "invalid" — only "try again".

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::*;
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};

pub struct Bounded {
    inner: DynStore,
    limit: Duration,
}

impl Bounded {
    pub fn new(inner: DynStore, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn bounded<T>(
        &self,
        _operation: &'static str,
        op: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        tokio::time::timeout(self.limit, op)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.limit.as_millis()
                )))
            })
    }
}

crate::decorate_store!(Bounded, bounded);
