//! A `Store` wrapper that times every operation into
//! `otpd_store_operation_duration_seconds`, so backends stay free of metrics code.
//!
//! Every trait method must be forwarded here, including those with a default body
//! (`find_current`, `close`): otherwise the backend's override is silently skipped.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::Metrics;
use crate::crypto::SealedPhone;
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};
use crate::store::SealedRecord;
use crate::store::{
    CancelOutcome, CheckOutcome, CodeReplacement, DynStore, InboxEntry, Marker, MessageTransition,
    MessageUpdate, RateDecision, SendAbort, SendDecision, SendPlan, Store, StoreResult, UsageRow,
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

#[async_trait]
impl Store for InstrumentedStore {
    async fn ping(&self) -> StoreResult<()> {
        self.timed("ping", self.inner.ping()).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.timed("insert_api_key", self.inner.insert_api_key(key))
            .await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        self.timed("find_api_key", self.inner.find_api_key(key_hash))
            .await
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.timed("list_api_keys", self.inner.list_api_keys())
            .await
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        self.timed("revoke_api_key", self.inner.revoke_api_key(id, at))
            .await
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        self.timed(
            "find_pending",
            self.inner.find_pending(tenant, subject, now),
        )
        .await
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        self.timed(
            "find_current",
            self.inner.find_current(tenant, subject, now),
        )
        .await
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        self.timed("start_send", self.inner.start_send(plan, now))
            .await
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        self.timed("abort_send", self.inner.abort_send(abort)).await
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        self.timed(
            "check_code",
            self.inner.check_code(tenant, id, code_hash, now),
        )
        .await
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        self.timed("get_verification", self.inner.get_verification(tenant, id))
            .await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        self.timed("cancel", self.inner.cancel(tenant, id, now))
            .await
    }

    async fn insert_message(&self, message: &MessageRecord) -> StoreResult<()> {
        self.timed("insert_message", self.inner.insert_message(message))
            .await
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        self.timed("get_message", self.inner.get_message(tenant, id))
            .await
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.timed(
            "list_messages",
            self.inner.list_messages(tenant, verification_id),
        )
        .await
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        self.timed(
            "update_message_by_provider_id",
            self.inner
                .update_message_by_provider_id(provider, provider_message_id, update),
        )
        .await
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.timed(
            "list_unfinished_messages",
            self.inner
                .list_unfinished_messages(provider, created_after, limit),
        )
        .await
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        self.timed("purge_messages", self.inner.purge_messages(before, batch))
            .await
    }

    async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()> {
        self.timed("record_usage", self.inner.record_usage(delta))
            .await
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        self.timed("usage", self.inner.usage(tenant, from, to))
            .await
    }

    async fn replace_code(
        &self,
        replacement: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        self.timed("replace_code", self.inner.replace_code(replacement, now))
            .await
    }

    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
        self.timed("push_inbox", self.inner.push_inbox(entry)).await
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.timed(
            "list_inbox",
            self.inner.list_inbox(tenant, phone_index, now, limit),
        )
        .await
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        self.timed(
            "hit_rate_limit",
            self.inner.hit_rate_limit(key, limit, window_seconds, now),
        )
        .await
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.timed(
            "add_to_counter",
            self.inner.add_to_counter(key, amount, window_seconds, now),
        )
        .await
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.timed(
            "read_counter",
            self.inner.read_counter(key, window_seconds, now),
        )
        .await
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.timed(
            "set_marker",
            self.inner.set_marker(namespace, name, value, expires_at),
        )
        .await
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        self.timed("get_marker", self.inner.get_marker(namespace, name, now))
            .await
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        self.timed("list_markers", self.inner.list_markers(namespace, now))
            .await
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        self.timed("delete_marker", self.inner.delete_marker(namespace, name))
            .await
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.timed(
            "claim_marker",
            self.inner
                .claim_marker(namespace, name, holder, expires_at, now),
        )
        .await
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        self.timed(
            "list_sealed_with_other_key",
            self.inner
                .list_sealed_with_other_key(current_key, after, limit),
        )
        .await
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        self.timed("reseal_phone", self.inner.reseal_phone(id, old, new))
            .await
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        self.timed("purge_expired", self.inner.purge_expired(now, batch))
            .await
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        self.timed("count_pending", self.inner.count_pending(now))
            .await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

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
