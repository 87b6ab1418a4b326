//! In-process store for tests, benchmarks and single-instance demos. Nothing
//! survives a restart. Sharded maps keep contention low; a send locks its
//! subject's entry first and only then the verification, a check locks only the
//! verification, so lock order is always subject → verification.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use async_trait::async_trait;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use dashmap::DashMap;
use parking_lot::Mutex;
use uuid::Uuid;

use super::{
    CancelOutcome, CheckOutcome, CodeReplacement, InboxEntry, Marker, MessageTransition,
    MessageUpdate, RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store,
    StoreResult, UsageRow, advance_message, is_unfinished, seconds_until,
};
use crate::crypto::{Crypto, SealedPhone};
use crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};

/// Ended verifications stay readable this long before the purge forgets them.
const KEEP_ENDED: Duration = Duration::hours(24);
const INBOX_CAPACITY: usize = 10_000;

#[derive(Debug, Default, Clone)]
struct SubjectState {
    current: Option<Uuid>,
    last_sent_at: Option<DateTime<Utc>>,
    window_start: Option<DateTime<Utc>>,
    window_count: u32,
}

#[derive(Default)]
pub struct MemoryStore {
    keys: DashMap<[u8; 32], ApiKeyRecord>,
    subjects: DashMap<SubjectKey, SubjectState>,
    verifications: DashMap<Uuid, Verification>,
    messages: DashMap<Uuid, MessageRecord>,
    messages_by_verification: DashMap<Uuid, Vec<Uuid>>,
    messages_by_provider_id: DashMap<(String, String), Uuid>,
    /// (provider, created_at, id) of messages awaiting a final status.
    unfinished: Mutex<BTreeSet<(String, DateTime<Utc>, Uuid)>>,
    /// (created_at, id) of every message, for retention.
    messages_by_created: Mutex<BTreeSet<(DateTime<Utc>, Uuid)>>,
    /// Tenant → its usage rows by (day, route, country, currency).
    usage: DashMap<String, BTreeMap<UsageKey, UsageRow>>,
    inbox: Mutex<VecDeque<InboxEntry>>,
    rate: DashMap<String, (i64, u32)>,
    /// (key, window length, slot) → total.
    counters: DashMap<(String, u32, i64), u64>,
    /// Namespace → its markers by name; one map entry locks a whole namespace,
    /// which is what makes a claim atomic.
    markers: DashMap<String, BTreeMap<String, Marker>>,
}

type UsageKey = (NaiveDate, u32, String, String);

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Shared window arithmetic: returns (window start, count) after rolling over.
fn current_window(
    start: Option<DateTime<Utc>>,
    count: u32,
    window: Duration,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, u32) {
    match start {
        Some(s) if now < s + window => (s, count),
        _ => (now, 0),
    }
}

fn counter_slot(window_seconds: u32, now: DateTime<Utc>) -> i64 {
    now.timestamp().div_euclid(i64::from(window_seconds.max(1)))
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.keys.insert(key.key_hash, key.clone());
        Ok(())
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(self.keys.get(key_hash).map(|k| k.clone()))
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let mut keys: Vec<_> = self.keys.iter().map(|k| k.clone()).collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        for mut k in self.keys.iter_mut() {
            if k.id == id && k.revoked_at.is_none() {
                k.revoked_at = Some(at);
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        let Some(current) = self.subjects.get(subject).and_then(|s| s.current) else {
            return Ok(None);
        };
        Ok(self
            .verifications
            .get(&current)
            .filter(|v| v.tenant == tenant && v.is_pending_at(now))
            .map(|v| v.id))
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        let Some(current) = self.subjects.get(subject).and_then(|s| s.current) else {
            return Ok(None);
        };
        Ok(self
            .verifications
            .get(&current)
            .filter(|v| v.tenant == tenant && now < v.expires_at)
            .filter(|v| matches!(v.status, Status::Pending | Status::MaxAttempts))
            .map(|v| (v.id, v.status)))
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        let planned = &plan.verification;
        let mut subject = self.subjects.entry(planned.subject).or_default();

        if let Some(last) = subject.last_sent_at {
            let until = last + Duration::seconds(plan.cooldown_seconds.into());
            if now < until {
                return Ok(SendDecision::Cooldown {
                    retry_after_seconds: seconds_until(now, until),
                });
            }
        }
        let window = Duration::seconds(plan.send_window_seconds.into());
        let (window_start, window_count) =
            current_window(subject.window_start, subject.window_count, window, now);
        if window_count >= plan.max_sends_per_window {
            return Ok(SendDecision::WindowExhausted {
                retry_after_seconds: seconds_until(now, window_start + window),
            });
        }

        let pending = subject.current.and_then(|id| {
            self.verifications
                .get(&id)
                .filter(|v| v.tenant == planned.tenant && v.is_pending_at(now))
                .map(|v| v.id)
        });
        let previous_sent_at = subject.last_sent_at;
        let decision = match pending {
            Some(id) if id == planned.id => {
                let Some(mut v) = self.verifications.get_mut(&id) else {
                    return Ok(SendDecision::Conflict);
                };
                v.code_hash = planned.code_hash;
                v.expires_at = planned.expires_at;
                // A resend goes to the number of this request (a uid's number may change).
                v.phone = planned.phone.clone();
                v.masked_to = planned.masked_to.clone();
                v.country = planned.country.clone();
                v.send_count += 1;
                v.updated_at = now;
                v.last_sent_at = now;
                SendDecision::Replaced {
                    verification: v.clone(),
                    previous_sent_at,
                }
            }
            Some(_) => return Ok(SendDecision::Conflict),
            None if self.verifications.contains_key(&planned.id) => {
                return Ok(SendDecision::Conflict);
            }
            None => {
                self.verifications.insert(planned.id, planned.clone());
                SendDecision::Created {
                    verification: planned.clone(),
                    previous_sent_at,
                }
            }
        };
        subject.current = Some(planned.id);
        subject.last_sent_at = Some(now);
        subject.window_start = Some(window_start);
        subject.window_count = window_count + 1;
        Ok(decision)
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        if let Some(mut subject) = self.subjects.get_mut(&abort.subject) {
            subject.last_sent_at = abort.previous_sent_at;
            subject.window_count = subject.window_count.saturating_sub(1);
        }
        if let Some(mut v) = self.verifications.get_mut(&abort.verification_id)
            && v.tenant == abort.tenant
        {
            v.status = Status::Failed;
            v.code_hash = None;
            v.updated_at = abort.at;
        }
        Ok(())
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        let Some(mut v) = self.verifications.get_mut(&id) else {
            return Ok(CheckOutcome::NotFound);
        };
        if v.tenant != tenant {
            return Ok(CheckOutcome::NotFound);
        }
        if v.status == Status::MaxAttempts {
            return Ok(CheckOutcome::MaxAttempts);
        }
        if !v.is_pending_at(now) {
            return Ok(CheckOutcome::NotFound);
        }
        let Some(stored) = v.code_hash else {
            return Ok(CheckOutcome::NotFound);
        };
        v.updated_at = now;
        if Crypto::hashes_match(&stored, code_hash) {
            v.status = Status::Approved;
            v.code_hash = None;
            return Ok(CheckOutcome::Approved(v.clone()));
        }
        v.attempts += 1;
        if v.attempts >= v.max_attempts {
            v.status = Status::MaxAttempts;
            v.code_hash = None;
        }
        Ok(CheckOutcome::Wrong {
            attempts_left: v.attempts_left(),
        })
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        Ok(self
            .verifications
            .get(&id)
            .filter(|v| v.tenant == tenant)
            .map(|v| v.clone()))
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        let Some(mut v) = self.verifications.get_mut(&id) else {
            return Ok(CancelOutcome::NotFound);
        };
        if v.tenant != tenant || !v.is_pending_at(now) {
            return Ok(CancelOutcome::NotFound);
        }
        v.status = Status::Canceled;
        v.code_hash = None;
        v.updated_at = now;
        Ok(CancelOutcome::Canceled(v.clone()))
    }

    async fn insert_message(&self, message: &MessageRecord) -> StoreResult<()> {
        self.messages.insert(message.id, message.clone());
        self.messages_by_verification
            .entry(message.verification_id)
            .or_default()
            .push(message.id);
        if let Some(pid) = &message.provider_message_id {
            self.messages_by_provider_id
                .insert((message.provider.clone(), pid.clone()), message.id);
        }
        if is_unfinished(message) {
            self.unfinished.lock().insert((
                message.provider.clone(),
                message.created_at,
                message.id,
            ));
        }
        self.messages_by_created
            .lock()
            .insert((message.created_at, message.id));
        Ok(())
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        Ok(self
            .messages
            .get(&id)
            .filter(|m| m.tenant == tenant)
            .map(|m| m.clone()))
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        let ids = self
            .messages_by_verification
            .get(&verification_id)
            .map(|ids| ids.clone())
            .unwrap_or_default();
        Ok(ids
            .iter()
            .filter_map(|id| self.messages.get(id).map(|m| m.clone()))
            .filter(|m| m.tenant == tenant)
            .collect())
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        let key = (provider.to_owned(), provider_message_id.to_owned());
        let Some(id) = self.messages_by_provider_id.get(&key).map(|id| *id) else {
            return Ok(None);
        };
        let Some(mut m) = self.messages.get_mut(&id) else {
            return Ok(None);
        };
        let previous = m.status;
        if let Some(next) = advance_message(&m, update) {
            if !is_unfinished(&next) {
                self.unfinished
                    .lock()
                    .remove(&(m.provider.clone(), m.created_at, m.id));
            }
            *m = next;
        }
        Ok(Some(MessageTransition {
            previous,
            message: m.clone(),
        }))
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        let ids: Vec<Uuid> = {
            let unfinished = self.unfinished.lock();
            let after = (provider.to_owned(), created_after, Uuid::max());
            unfinished
                .range(after..)
                .take_while(|(p, _, _)| p == provider)
                .take(limit as usize)
                .map(|(_, _, id)| *id)
                .collect()
        };
        Ok(ids
            .iter()
            .filter_map(|id| self.messages.get(id).map(|m| m.clone()))
            .collect())
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let old: Vec<(DateTime<Utc>, Uuid)> = {
            let mut by_created = self.messages_by_created.lock();
            let old: Vec<_> = by_created
                .iter()
                .take_while(|(at, _)| *at < before)
                .take(batch as usize)
                .copied()
                .collect();
            for key in &old {
                by_created.remove(key);
            }
            old
        };
        for (_, id) in &old {
            let Some((_, m)) = self.messages.remove(id) else {
                continue;
            };
            if let Some(mut ids) = self.messages_by_verification.get_mut(&m.verification_id) {
                ids.retain(|x| x != id);
            }
            self.messages_by_verification
                .remove_if(&m.verification_id, |_, ids| ids.is_empty());
            if let Some(pid) = &m.provider_message_id {
                self.messages_by_provider_id
                    .remove_if(&(m.provider.clone(), pid.clone()), |_, v| v == id);
            }
            self.unfinished
                .lock()
                .remove(&(m.provider.clone(), m.created_at, m.id));
        }
        Ok(old.len() as u64)
    }

    async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()> {
        let key = (
            delta.day,
            delta.route_id,
            delta.country.clone().unwrap_or_default(),
            delta.currency.clone().unwrap_or_default(),
        );
        let mut rows = self.usage.entry(delta.tenant.clone()).or_default();
        let row = rows.entry(key).or_insert_with(|| {
            UsageRow::new(
                &delta.tenant,
                delta.day,
                delta.route_id,
                delta.country.as_deref(),
                delta.currency.as_deref(),
            )
        });
        row.sent += delta.sent;
        row.delivered += delta.delivered;
        row.failed += delta.failed;
        row.verifications_started += delta.verifications_started;
        row.verifications_approved += delta.verifications_approved;
        row.cost_micros += delta.cost_micros;
        Ok(())
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        if from > to {
            return Ok(Vec::new());
        }
        let start = (from, 0, String::new(), String::new());
        Ok(self
            .usage
            .get(tenant)
            .map(|rows| {
                rows.range(start..)
                    .take_while(|((day, ..), _)| *day <= to)
                    .map(|(_, row)| row.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        let Some(mut v) = self.verifications.get_mut(&r.verification_id) else {
            return Ok(None);
        };
        if v.tenant != r.tenant || !v.is_pending_at(now) || v.send_count != r.expected_send_count {
            return Ok(None);
        }
        v.code_hash = Some(r.code_hash);
        v.expires_at = r.expires_at;
        v.send_count += 1;
        v.last_sent_at = now;
        v.updated_at = now;
        Ok(Some(v.clone()))
    }

    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
        let mut inbox = self.inbox.lock();
        if inbox.len() == INBOX_CAPACITY {
            inbox.pop_front();
        }
        inbox.push_back(entry.clone());
        Ok(())
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        let inbox = self.inbox.lock();
        Ok(inbox
            .iter()
            .rev()
            .filter(|e| e.tenant == tenant && e.expires_at > now)
            .filter(|e| phone_index.is_none_or(|p| &e.phone_index == p))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        let window = i64::from(window_seconds.max(1));
        let slot = now.timestamp().div_euclid(window);
        let mut entry = self.rate.entry(key.to_owned()).or_insert((slot, 0));
        if entry.0 != slot {
            *entry = (slot, 0);
        }
        if entry.1 >= limit {
            let reset = DateTime::<Utc>::from_timestamp((slot + 1) * window, 0).unwrap_or(now);
            return Ok(RateDecision::Limited {
                retry_after_seconds: seconds_until(now, reset),
            });
        }
        entry.1 += 1;
        Ok(RateDecision::Allowed {
            remaining: limit - entry.1,
        })
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let slot = counter_slot(window_seconds, now);
        let mut total = self
            .counters
            .entry((key.to_owned(), window_seconds, slot))
            .or_insert(0);
        *total = total.saturating_add(amount);
        Ok(*total)
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let slot = counter_slot(window_seconds, now);
        Ok(self
            .counters
            .get(&(key.to_owned(), window_seconds, slot))
            .map_or(0, |total| *total))
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.markers
            .entry(namespace.to_owned())
            .or_default()
            .insert(
                name.to_owned(),
                Marker {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    expires_at,
                },
            );
        Ok(())
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        Ok(self
            .markers
            .get(namespace)
            .and_then(|ns| ns.get(name).filter(|m| now < m.expires_at).cloned()))
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        Ok(self
            .markers
            .get(namespace)
            .map(|ns| {
                ns.values()
                    .filter(|m| now < m.expires_at)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        Ok(self
            .markers
            .get_mut(namespace)
            .is_some_and(|mut ns| ns.remove(name).is_some()))
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut ns = self.markers.entry(namespace.to_owned()).or_default();
        if let Some(m) = ns.get(name)
            && now < m.expires_at
            && m.value != holder
        {
            return Ok(false);
        }
        ns.insert(
            name.to_owned(),
            Marker {
                name: name.to_owned(),
                value: holder.to_owned(),
                expires_at,
            },
        );
        Ok(true)
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        let mut found: Vec<SealedRecord> = self
            .verifications
            .iter()
            .filter(|v| v.status == Status::Pending && v.phone.key_id != current_key)
            .filter(|v| after.is_none_or(|a| v.id > a))
            .map(|v| SealedRecord {
                tenant: v.tenant.clone(),
                id: v.id,
                phone: v.phone.clone(),
            })
            .collect();
        found.sort_by_key(|r| r.id);
        found.truncate(limit as usize);
        Ok(found)
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        match self.verifications.get_mut(&id) {
            Some(mut v) if &v.phone == old => {
                v.phone = new.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let mut touched = 0u64;
        let mut forget = Vec::new();
        for mut v in self.verifications.iter_mut() {
            if touched >= u64::from(batch) {
                break;
            }
            if v.status == Status::Pending && now >= v.expires_at {
                v.status = Status::Expired;
                v.code_hash = None;
                v.updated_at = now;
                touched += 1;
            } else if v.status != Status::Pending && v.updated_at + KEEP_ENDED < now {
                forget.push(v.id);
            }
        }
        // Their messages stay until `purge_messages` (the retention period).
        for id in forget {
            self.verifications.remove(&id);
            touched += 1;
        }
        self.subjects
            .retain(|_, s| s.last_sent_at.is_some_and(|t| t + KEEP_ENDED > now));
        self.inbox.lock().retain(|e| e.expires_at > now);
        // A sliding window also reads the previous window's total.
        self.counters
            .retain(|(_, window, slot), _| *slot >= counter_slot(*window, now) - 1);
        self.markers.retain(|_, ns| {
            ns.retain(|_, m| now < m.expires_at);
            !ns.is_empty()
        });
        Ok(touched)
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        Ok(self
            .verifications
            .iter()
            .filter(|v| v.is_pending_at(now))
            .count() as u64)
    }
}
