//! Decorators around a store (time bounds, metrics) forward every trait method
//! the same way; this macro writes that forwarding once, so a decorator cannot
//! forget a method (and silently skip a backend's override).

/// `decorate_store!(Wrapper, around)` implements `Store` for `Wrapper` (which has
/// an `inner: DynStore` field and a method
/// `async fn around<T>(&self, op: &'static str, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T>`)
/// by passing every operation through `around`.
#[macro_export]
macro_rules! decorate_store {
    ($wrapper:ty, $around:ident) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $wrapper {
            async fn ping(&self) -> StoreResult<()> {
                self.$around("ping", self.inner.ping()).await
            }
            async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
                self.$around("insert_api_key", self.inner.insert_api_key(key))
                    .await
            }
            async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
                self.$around("find_api_key", self.inner.find_api_key(key_hash))
                    .await
            }
            async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
                self.$around("list_api_keys", self.inner.list_api_keys())
                    .await
            }
            async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
                self.$around("revoke_api_key", self.inner.revoke_api_key(id, at))
                    .await
            }
            async fn find_current(
                &self,
                tenant: &str,
                subject: &SubjectKey,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<(Uuid, Status)>> {
                self.$around(
                    "find_current",
                    self.inner.find_current(tenant, subject, now),
                )
                .await
            }
            async fn start_send(
                &self,
                plan: &SendPlan,
                now: DateTime<Utc>,
            ) -> StoreResult<SendDecision> {
                self.$around("start_send", self.inner.start_send(plan, now))
                    .await
            }
            async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
                self.$around("abort_send", self.inner.abort_send(abort))
                    .await
            }
            async fn start_counted_send(
                &self,
                plan: &SendPlan,
                counts: &[CounterAdd],
                now: DateTime<Utc>,
            ) -> StoreResult<(SendDecision, Vec<u64>)> {
                self.$around(
                    "start_counted_send",
                    self.inner.start_counted_send(plan, counts, now),
                )
                .await
            }
            async fn check_code(
                &self,
                tenant: &str,
                id: Uuid,
                code_hash: &[u8; 32],
                budget: Option<$crate::store::GuessBudget>,
                now: DateTime<Utc>,
            ) -> StoreResult<CheckOutcome> {
                self.$around(
                    "check_code",
                    self.inner.check_code(tenant, id, code_hash, budget, now),
                )
                .await
            }
            async fn check_counted_code(
                &self,
                tenant: &str,
                id: Uuid,
                code_hash: &[u8; 32],
                budget: Option<$crate::store::GuessBudget>,
                counts: Option<&$crate::store::ApprovalCounts>,
                now: DateTime<Utc>,
            ) -> StoreResult<CheckOutcome> {
                // The same operation to whoever reads the metrics.
                self.$around(
                    "check_code",
                    self.inner
                        .check_counted_code(tenant, id, code_hash, budget, counts, now),
                )
                .await
            }
            async fn check_current_code(
                &self,
                tenant: &str,
                subject: &SubjectKey,
                hash_for: &$crate::store::CodeHasher,
                budget: Option<$crate::store::GuessBudget>,
                counts: Option<&$crate::store::ApprovalCounts>,
                now: DateTime<Utc>,
            ) -> StoreResult<$crate::store::CurrentCheck> {
                self.$around(
                    "check_current_code",
                    self.inner
                        .check_current_code(tenant, subject, hash_for, budget, counts, now),
                )
                .await
            }
            async fn get_verification(
                &self,
                tenant: &str,
                id: Uuid,
            ) -> StoreResult<Option<Verification>> {
                self.$around("get_verification", self.inner.get_verification(tenant, id))
                    .await
            }
            async fn cancel(
                &self,
                tenant: &str,
                id: Uuid,
                now: DateTime<Utc>,
            ) -> StoreResult<CancelOutcome> {
                self.$around("cancel", self.inner.cancel(tenant, id, now))
                    .await
            }
            async fn insert_message(
                &self,
                message: &MessageRecord,
                usage: Option<&UsageRow>,
            ) -> StoreResult<()> {
                self.$around("insert_message", self.inner.insert_message(message, usage))
                    .await
            }
            async fn get_message(
                &self,
                tenant: &str,
                id: Uuid,
            ) -> StoreResult<Option<MessageRecord>> {
                self.$around("get_message", self.inner.get_message(tenant, id))
                    .await
            }
            async fn list_messages(
                &self,
                tenant: &str,
                verification_id: Uuid,
            ) -> StoreResult<Vec<MessageRecord>> {
                self.$around(
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
                self.$around(
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
                self.$around(
                    "list_unfinished_messages",
                    self.inner
                        .list_unfinished_messages(provider, created_after, limit),
                )
                .await
            }
            async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
                self.$around("purge_messages", self.inner.purge_messages(before, batch))
                    .await
            }
            async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()> {
                self.$around("record_usage", self.inner.record_usage(delta))
                    .await
            }
            async fn usage(
                &self,
                tenant: &str,
                from: NaiveDate,
                to: NaiveDate,
            ) -> StoreResult<Vec<UsageRow>> {
                self.$around("usage", self.inner.usage(tenant, from, to))
                    .await
            }
            async fn replace_code(
                &self,
                replacement: &CodeReplacement,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<Verification>> {
                self.$around("replace_code", self.inner.replace_code(replacement, now))
                    .await
            }
            async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
                self.$around("push_inbox", self.inner.push_inbox(entry))
                    .await
            }
            async fn list_inbox(
                &self,
                tenant: &str,
                phone_index: Option<&[u8; 32]>,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<InboxEntry>> {
                self.$around(
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
                self.$around(
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
                self.$around(
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
                self.$around(
                    "read_counter",
                    self.inner.read_counter(key, window_seconds, now),
                )
                .await
            }
            async fn read_counters(&self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
                self.$around("read_counters", self.inner.read_counters(reads))
                    .await
            }
            async fn add_counters(
                &self,
                adds: &[CounterAdd],
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<u64>> {
                self.$around("add_counters", self.inner.add_counters(adds, now))
                    .await
            }
            async fn set_marker(
                &self,
                namespace: &str,
                name: &str,
                value: &str,
                expires_at: DateTime<Utc>,
            ) -> StoreResult<()> {
                self.$around(
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
                self.$around("get_marker", self.inner.get_marker(namespace, name, now))
                    .await
            }
            async fn list_markers(
                &self,
                namespace: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<Marker>> {
                self.$around("list_markers", self.inner.list_markers(namespace, now))
                    .await
            }
            async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
                self.$around("delete_marker", self.inner.delete_marker(namespace, name))
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
                self.$around(
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
                self.$around(
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
                self.$around("reseal_phone", self.inner.reseal_phone(id, old, new))
                    .await
            }
            async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
                self.$around("purge_expired", self.inner.purge_expired(now, batch))
                    .await
            }
            async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
                self.$around("count_pending", self.inner.count_pending(now))
                    .await
            }
            async fn close(&self) {
                self.inner.close().await;
            }
        }
    };
}
