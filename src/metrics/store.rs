//! A `Store` wrapper that times every operation into
//! `otpd_store_operation_duration_seconds`, so backends stay free of metrics code.
//!
//! Forwarding is written by `decorate_store!`, so no trait method can be missed.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::Metrics;
use crate::crypto::SealedPhone;
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};
use crate::store::SealedRecord;
use crate::store::{
    CancelOutcome, CheckOutcome, CodeReplacement, CounterAdd, CounterRead, DynStore, InboxEntry,
    Marker, MessageTransition, MessageUpdate, RateDecision, SendAbort, SendDecision, SendPlan,
    StoreResult, UsageRow,
};

pub struct InstrumentedStore {
    inner: DynStore,
    metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    /// Wraps `inner` when metrics are on; otherwise returns it unchanged.
    pub fn wrap(inner: DynStore, metrics: Arc<Metrics>) -> DynStore {
        if !metrics.is_enabled() {
            return inner;
        }
        Arc::new(Self { inner, metrics })
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .record_store_op(operation, result.is_ok(), started.elapsed());
        result
    }
}

crate::decorate_store!(InstrumentedStore, timed);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsSettings;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn each_operation_is_timed_under_its_own_name() {
        let metrics = Arc::new(Metrics::new(&MetricsSettings::default()).unwrap());
        let store = InstrumentedStore::wrap(Arc::new(MemoryStore::new()), metrics.clone());
        store.ping().await.unwrap();
        store.ping().await.unwrap();
        store.count_pending(Utc::now()).await.unwrap();
        let text = metrics.render().unwrap();
        assert!(
            text.contains("otpd_store_operation_duration_seconds_count{operation=\"ping\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "otpd_store_operation_duration_seconds_count{operation=\"count_pending\"} 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("otpd_store_errors_total{"), "{text}");
    }
}
