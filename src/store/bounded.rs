//! A time bound around any store: an operation that does not finish in time
//! answers `Unavailable` (503) instead of hanging the request. A network stall
//! mid-transaction drops the future, which rolls the transaction back, so a
//! caller never sees a wrong "valid" or "invalid" — only "try again".

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
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

    async fn bounded<T>(&self, op: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
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

#[async_trait]
impl Store for Bounded {
    async fn ping(&self) -> StoreResult<()> {
        self.bounded(self.inner.ping()).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.bounded(self.inner.insert_api_key(key)).await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        self.bounded(self.inner.find_api_key(key_hash)).await
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.bounded(self.inner.list_api_keys()).await
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        self.bounded(self.inner.revoke_api_key(id, at)).await
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        self.bounded(self.inner.find_pending(tenant, subject, now))
            .await
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        self.bounded(self.inner.find_current(tenant, subject, now))
            .await
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        self.bounded(self.inner.start_send(plan, now)).await
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        self.bounded(self.inner.abort_send(abort)).await
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        self.bounded(self.inner.check_code(tenant, id, code_hash, now))
            .await
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        self.bounded(self.inner.get_verification(tenant, id)).await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        self.bounded(self.inner.cancel(tenant, id, now)).await
    }

    async fn insert_message(&self, message: &MessageRecord) -> StoreResult<()> {
        self.bounded(self.inner.insert_message(message)).await
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        self.bounded(self.inner.get_message(tenant, id)).await
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.bounded(self.inner.list_messages(tenant, verification_id))
            .await
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        self.bounded(self.inner.update_message_by_provider_id(
            provider,
            provider_message_id,
            update,
        ))
        .await
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.bounded(
            self.inner
                .list_unfinished_messages(provider, created_after, limit),
        )
        .await
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        self.bounded(self.inner.purge_messages(before, batch)).await
    }

    async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()> {
        self.bounded(self.inner.record_usage(delta)).await
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        self.bounded(self.inner.usage(tenant, from, to)).await
    }

    async fn replace_code(
        &self,
        replacement: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        self.bounded(self.inner.replace_code(replacement, now))
            .await
    }

    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
        self.bounded(self.inner.push_inbox(entry)).await
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.bounded(self.inner.list_inbox(tenant, phone_index, now, limit))
            .await
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        self.bounded(self.inner.hit_rate_limit(key, limit, window_seconds, now))
            .await
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.bounded(self.inner.add_to_counter(key, amount, window_seconds, now))
            .await
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.bounded(self.inner.read_counter(key, window_seconds, now))
            .await
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.bounded(self.inner.set_marker(namespace, name, value, expires_at))
            .await
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        self.bounded(self.inner.get_marker(namespace, name, now))
            .await
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        self.bounded(self.inner.list_markers(namespace, now)).await
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        self.bounded(self.inner.delete_marker(namespace, name))
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
        self.bounded(
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
        self.bounded(
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
        self.bounded(self.inner.reseal_phone(id, old, new)).await
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        self.bounded(self.inner.purge_expired(now, batch)).await
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        self.bounded(self.inner.count_pending(now)).await
    }

    // Bounded by the caller (shutdown), which knows how long it may wait.
    async fn close(&self) {
        self.inner.close().await;
    }
}
