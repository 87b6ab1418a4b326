//! Persistence behind one trait. Every operation that decides something
//! (start a send, check a code, cancel) is a single atomic step in each backend:
//! one Lua script, one SQL transaction, or one critical section in memory.

pub mod bounded;
mod decorate;
pub mod memory;
mod migrations;
pub mod postgres;
pub mod redis;
mod sql_common;
mod sql_hot;
pub mod sqlite;

use std::borrow::Borrow;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::crypto::SealedPhone;
use crate::domain::limits::{HOUR, WindowCounts};
use crate::domain::{
    ApiKeyRecord, DeliveryStatus, MessageRecord, Status, SubjectKey, Verification,
};

pub use self::redis::RedisStore;
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::{SqliteOptions, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or timed out; callers answer 503.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something this code does not understand.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What the service asks for when starting (or restarting) a send.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// The verification to create. For a resend, `verification.id` is the id of
    /// the pending verification the service saw; the store replaces its code,
    /// expiry and send count and keeps its attempts.
    pub verification: Verification,
    pub cooldown_seconds: u32,
    pub max_sends_per_window: u32,
    pub send_window_seconds: u32,
    /// What this verification's approval will count (the guard's conversion
    /// counts for the number sent to): what `ApprovalCounts` works out from the
    /// record at check time. A store may keep these with the record instead:
    /// Redis's scripts cannot open its number, and the memory store saves a
    /// right check the decryption and the guard's keyed hashes.
    pub approval_counts: Vec<CounterAdd>,
    /// The code's hash keyed by the subject (`Crypto::subject_code_hash`),
    /// which a store may keep beside `verification.code_hash`, bound to the
    /// verification's id, so that a check by number need not learn the id
    /// first (Redis: one script instead of two). `None`: a check by number
    /// finds the id, then compares.
    pub subject_code_hash: Option<[u8; 32]>,
}

// Returned by value once per request; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SendDecision {
    /// A new verification was stored.
    Created {
        verification: Verification,
        previous_sent_at: Option<DateTime<Utc>>,
    },
    /// The pending verification got a new code; attempts are kept.
    Replaced {
        verification: Verification,
        previous_sent_at: Option<DateTime<Utc>>,
    },
    /// The subject's last send is too recent.
    Cooldown { retry_after_seconds: u64 },
    /// The subject has used its sends for the current window.
    WindowExhausted { retry_after_seconds: u64 },
    /// The subject's pending verification is not the one the plan named
    /// (`pending`, when one is: the plan's resend goes to it), or the named
    /// one exists but is no longer pending; the service plans again.
    Conflict { pending: Option<Uuid> },
}

/// Undo of a send whose every route failed: nothing stays pending and the
/// cooldown and window slot it took are given back.
#[derive(Debug, Clone)]
pub struct SendAbort {
    pub tenant: String,
    pub subject: SubjectKey,
    pub verification_id: Uuid,
    pub previous_sent_at: Option<DateTime<Utc>>,
    /// The aborted send's own time (its `start_send`'s `now`): only what it
    /// still holds is undone. A later send for the subject (its cooldown, its
    /// code in the verification) is left alone.
    pub sent_at: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

// Returned by value once per request; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CheckOutcome {
    /// Right code: the verification is now approved and its code hash erased.
    Approved(Verification),
    /// Wrong code, counted (and in the subject's guess budget, when given).
    /// At zero the verification is dead (`max_attempts`).
    Wrong {
        attempts_left: u32,
        /// The verification's number, masked, for the audit line.
        masked_to: String,
    },
    /// Attempts were already spent before this check.
    MaxAttempts,
    /// Nothing pending under that id (never existed, other tenant, expired, ended).
    NotFound,
    /// The subject's wrong-guess budget is spent: the code was not compared.
    GuessesSpent(WindowCounts),
}

/// The subject's wrong guesses per hour, across its verifications, judged and
/// counted inside `Store::check_code`: in the same atomic step as the compare,
/// so concurrent wrong guesses cannot all pass a budget with one guess left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuessBudget {
    pub max: u32,
}

impl GuessBudget {
    pub const WINDOW_SECONDS: u32 = HOUR;
    /// The counter key before the subject (hex).
    pub const KEY_PREFIX: &str = "guess:";

    /// `None` for a limit of 0 (no limit).
    pub fn new(max_wrong_guesses_per_hour: u32) -> Option<Self> {
        (max_wrong_guesses_per_hour > 0).then_some(Self {
            max: max_wrong_guesses_per_hour,
        })
    }

    /// The counter of a subject's wrong guesses. Derived from the subject
    /// alone (already a keyed hash), so a store can name it from a record.
    pub fn counter_key(subject: &SubjectKey) -> String {
        format!("{}{}", Self::KEY_PREFIX, crate::crypto::to_hex(subject.0))
    }

    /// The reads of the counter's previous and current window.
    pub fn reads(key: &str, now: DateTime<Utc>) -> [CounterRead<'_>; 2] {
        CounterRead::window(key, Self::WINDOW_SECONDS, now)
    }

    /// Whether one more guess fits, given the counter's windows.
    pub fn admits(&self, counts: WindowCounts, now: DateTime<Utc>) -> bool {
        counts.admit(1, self.max, Self::WINDOW_SECONDS, now).is_ok()
    }
}

// Returned by value once per request; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    Canceled(Verification),
    NotFound,
}

/// A message the sandbox provider "delivered". Its body holds a code, so it is
/// sealed like a phone number and lives only as long as the code could.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxEntry {
    pub id: Uuid,
    pub tenant: String,
    pub phone_index: [u8; 32],
    pub masked_to: String,
    pub sealed_body: SealedPhone,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One fixed-window counter hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed { remaining: u32 },
    Limited { retry_after_seconds: u64 },
}

/// One counter window to read (see `Store::read_counters`). Borrows its key:
/// a send reads ~16 counters, and the keys already exist in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRead<'a> {
    pub key: &'a str,
    pub window_seconds: u32,
    /// Any instant in the window to read.
    pub at: DateTime<Utc>,
}

impl<'a> CounterRead<'a> {
    /// The reads of `key`'s previous and current window of `window_seconds`
    /// (see `WindowCounts`), in that order.
    pub fn window(key: &'a str, window_seconds: u32, now: DateTime<Utc>) -> [Self; 2] {
        let read = |at| CounterRead {
            key,
            window_seconds,
            at,
        };
        [
            read(now - chrono::Duration::seconds(window_seconds.into())),
            read(now),
        ]
    }
}

/// The counters an approval adds, worked out from the approved record (the
/// pumping guard's conversion counts need the number it was sent to, which
/// a check by id only learns from the record). See `Store::check_counted_code`.
pub type ApprovalCounts = Arc<dyn Fn(&Verification) -> Vec<CounterAdd> + Send + Sync>;

/// The typed code's hash, made when a check by number asks for it: keyed by
/// the id of the verification the store found (`Crypto::code_hash`, which
/// every store keeps), or by the subject the check addresses
/// (`Crypto::subject_code_hash`, which Redis also keeps, so that one script
/// finds the verification and compares).
pub trait CodeHashes: Send + Sync {
    fn for_id(&self, id: Uuid) -> [u8; 32];
    fn for_subject(&self, subject: &SubjectKey) -> [u8; 32];
}

/// A check's `CodeHashes`, shared: one allocation per check.
#[derive(Clone)]
pub struct CodeHasher(Arc<dyn CodeHashes>);

impl CodeHasher {
    pub fn of(hashes: impl CodeHashes + 'static) -> Self {
        Self(Arc::new(hashes))
    }

    /// From two functions (tests, and hashes with nothing to share).
    pub fn new(
        for_id: impl Fn(Uuid) -> [u8; 32] + Send + Sync + 'static,
        for_subject: impl Fn(&SubjectKey) -> [u8; 32] + Send + Sync + 'static,
    ) -> Self {
        struct Both<I, S>(I, S);
        impl<I, S> CodeHashes for Both<I, S>
        where
            I: Fn(Uuid) -> [u8; 32] + Send + Sync,
            S: Fn(&SubjectKey) -> [u8; 32] + Send + Sync,
        {
            fn for_id(&self, id: Uuid) -> [u8; 32] {
                (self.0)(id)
            }
            fn for_subject(&self, subject: &SubjectKey) -> [u8; 32] {
                (self.1)(subject)
            }
        }
        Self::of(Both(for_id, for_subject))
    }

    pub fn for_id(&self, id: Uuid) -> [u8; 32] {
        self.0.for_id(id)
    }

    pub fn for_subject(&self, subject: &SubjectKey) -> [u8; 32] {
        self.0.for_subject(subject)
    }
}

/// What `Store::check_current_code` found, and did.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CurrentCheck {
    /// The subject has no verification that can be checked.
    NoneCurrent,
    /// Its current verification is out of attempts: nothing was compared.
    MaxAttempts,
    /// Its current verification, and the check of it.
    Checked(Uuid, CheckOutcome),
}

impl CurrentCheck {
    /// The id `find_current` found to check, or the answer when it left
    /// nothing to compare.
    // The errors are the two small variants; `Checked` is never built here.
    #[allow(clippy::result_large_err)]
    pub fn to_check(current: Option<(Uuid, Status)>) -> Result<Uuid, Self> {
        match current {
            None => Err(Self::NoneCurrent),
            Some((_, Status::MaxAttempts)) => Err(Self::MaxAttempts),
            Some((id, _)) => Ok(id),
        }
    }
}

/// One add of `Store::add_counters`, in the window containing its `now`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterAdd {
    pub key: String,
    pub amount: u64,
    pub window_seconds: u32,
    /// The highest total this add may reach; above it the batch stops here.
    pub ceiling: Option<u64>,
}

impl CounterAdd {
    /// Whether `total`, this add's result, stops its batch: the one rule
    /// every backend's `add_counters` follows.
    pub fn stops_batch(&self, total: u64) -> bool {
        self.ceiling.is_some_and(|ceiling| total > ceiling)
    }
}

/// A small named value with an expiry, in a namespace (quarantines, leases).
/// It is live while `now < expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub name: String,
    pub value: String,
    pub expires_at: DateTime<Utc>,
}

/// A pending verification's sealed number, as key rotation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedRecord {
    pub tenant: String,
    pub id: Uuid,
    pub phone: SealedPhone,
}

/// A delivery-status update from a provider report or poll.
#[derive(Debug, Clone)]
pub struct MessageUpdate {
    pub status: DeliveryStatus,
    pub error: Option<String>,
    pub cost: Option<f64>,
    pub currency: Option<String>,
    pub at: DateTime<Utc>,
}

/// What `update_message_by_provider_id` found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageTransition {
    /// The status before the update.
    pub previous: DeliveryStatus,
    /// The record after the update (as it was, when the update was no step forward).
    pub message: MessageRecord,
}

impl MessageTransition {
    /// Whether this update moved the status: a duplicate or late report did not,
    /// so it must not be counted again.
    pub fn moved(&self) -> bool {
        self.previous != self.message.status
    }
}

/// One day's usage of one tenant over one route to one country, in one currency;
/// also the amount `record_usage` adds to that row. Messages and verifications
/// count on the day they were created, so a range's numbers describe what was
/// sent in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant: String,
    /// UTC.
    pub day: NaiveDate,
    pub route_id: u32,
    pub country: Option<String>,
    /// The currency of `cost_micros`; `None` on rows that carry no cost.
    pub currency: Option<String>,
    /// Messages a provider accepted.
    pub sent: u64,
    pub delivered: u64,
    /// Accepted, then reported failed or undelivered.
    pub failed: u64,
    pub verifications_started: u64,
    pub verifications_approved: u64,
    /// Cost of delivered messages, in millionths of `currency` (integers add up exactly).
    pub cost_micros: i64,
}

impl UsageRow {
    /// A row of zeros for the given key.
    pub fn new(
        tenant: &str,
        day: NaiveDate,
        route_id: u32,
        country: Option<&str>,
        currency: Option<&str>,
    ) -> Self {
        Self {
            tenant: tenant.to_owned(),
            day,
            route_id,
            country: country.map(str::to_owned),
            currency: currency.map(str::to_owned),
            sent: 0,
            delivered: 0,
            failed: 0,
            verifications_started: 0,
            verifications_approved: 0,
            cost_micros: 0,
        }
    }

    /// The row message `m` counts on, with nothing counted yet; a delivered
    /// message's row carries its currency, so that costs in different
    /// currencies never add up.
    pub fn of_message(m: &MessageRecord, delivered: bool) -> Self {
        let currency = if delivered {
            m.cost.and(m.currency.as_deref())
        } else {
            None
        };
        Self::new(
            &m.tenant,
            m.created_at.date_naive(),
            m.route_id,
            m.country.as_deref(),
            currency,
        )
    }

    /// What an approval adds: one approved verification, on the row of the
    /// first of its attempts (oldest first) that a provider accepted, where
    /// its start was counted, so conversion by route and country holds.
    /// `None` when no attempt was accepted.
    pub fn approval<M: Borrow<MessageRecord>>(
        attempts: impl IntoIterator<Item = M>,
    ) -> Option<Self> {
        let first = attempts.into_iter().find(|m| m.borrow().was_accepted())?;
        let mut row = Self::of_message(first.borrow(), false);
        row.verifications_approved = 1;
        Some(row)
    }

    pub fn is_zero(&self) -> bool {
        self.sent == 0
            && self.delivered == 0
            && self.failed == 0
            && self.verifications_started == 0
            && self.verifications_approved == 0
            && self.cost_micros == 0
    }
}

/// A cost in millionths, for `UsageRow::cost_micros`.
pub fn cost_micros(cost: f64) -> i64 {
    let micros = (cost * 1_000_000.0).round();
    if micros.is_finite() {
        // `as` saturates at the bounds, which no real price comes near.
        micros as i64
    } else {
        0
    }
}

/// An automatic re-send's new code for a pending verification.
#[derive(Debug, Clone)]
pub struct CodeReplacement {
    pub tenant: String,
    pub verification_id: Uuid,
    /// The `send_count` the caller saw: a send in between makes this one stale.
    pub expected_send_count: u32,
    pub code_hash: [u8; 32],
    /// As `SendPlan::subject_code_hash`, for the new code.
    pub subject_code_hash: Option<[u8; 32]>,
    pub expires_at: DateTime<Utc>,
}

/// `Store::start_counted_send` as two calls: `start_send`, then, when it
/// started one, `add_counters`; when the adds fail the send is given back.
pub(crate) async fn start_then_count<S: Store + ?Sized>(
    store: &S,
    plan: &SendPlan,
    counts: &[CounterAdd],
    now: DateTime<Utc>,
) -> StoreResult<(SendDecision, Vec<u64>)> {
    let decision = store.start_send(plan, now).await?;
    let previous_sent_at = match &decision {
        SendDecision::Created {
            previous_sent_at, ..
        }
        | SendDecision::Replaced {
            previous_sent_at, ..
        } if !counts.is_empty() => *previous_sent_at,
        _ => return Ok((decision, Vec::new())),
    };
    match store.add_counters(counts, now).await {
        Ok(totals) => Ok((decision, totals)),
        Err(e) => {
            let planned = &plan.verification;
            store
                .abort_send(&SendAbort {
                    tenant: planned.tenant.clone(),
                    subject: planned.subject,
                    verification_id: planned.id,
                    previous_sent_at,
                    sent_at: now,
                    at: now,
                })
                .await?;
            Err(e)
        }
    }
}

/// `Store::check_current_code` as two calls: `find_current`, then, when that
/// is pending, `check_counted_code` with the hash for the id it found.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn find_then_check<S: Store + ?Sized>(
    store: &S,
    tenant: &str,
    subject: &SubjectKey,
    hash_for: &CodeHasher,
    budget: Option<GuessBudget>,
    counts: Option<&ApprovalCounts>,
    now: DateTime<Utc>,
) -> StoreResult<CurrentCheck> {
    let id = match CurrentCheck::to_check(store.find_current(tenant, subject, now).await?) {
        Ok(id) => id,
        Err(answer) => return Ok(answer),
    };
    let outcome = store
        .check_counted_code(tenant, id, &hash_for.for_id(id), budget, counts, now)
        .await?;
    Ok(CurrentCheck::Checked(id, outcome))
}

/// `Store::check_counted_code`'s counts as a call of their own, after the
/// check: when `outcome` approved, `add_counters` of what `counts` works out
/// from the record. The approval stands when the adds fail, since the code is
/// spent either way; the failure is logged.
pub(crate) async fn count_approval_apart<S: Store + ?Sized>(
    store: &S,
    outcome: &CheckOutcome,
    counts: Option<&ApprovalCounts>,
    now: DateTime<Utc>,
) {
    let (CheckOutcome::Approved(v), Some(counts)) = (outcome, counts) else {
        return;
    };
    let adds = counts(v);
    if !adds.is_empty()
        && let Err(e) = store.add_counters(&adds, now).await
    {
        tracing::warn!(tenant = %v.tenant, error = %e, "could not count an approval");
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap reachability probe for `/health`.
    async fn ping(&self) -> StoreResult<()>;

    // --- API keys ---
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>>;
    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>>;
    /// `false` when no active key has that id.
    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool>;

    // --- verifications ---
    /// The id of the subject's pending (unexpired) verification, if any.
    async fn find_pending(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Uuid>> {
        let current = self.find_current(tenant, subject, now).await?;
        Ok(current.and_then(|(id, status)| (status == Status::Pending).then_some(id)))
    }

    /// The subject's current unexpired verification that a check should address:
    /// pending, or dead from spent attempts (so a check can say `max_attempts`
    /// rather than "not found").
    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>>;

    /// Atomically: cooldown check, window check, then create or replace.
    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision>;

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()>;

    /// `start_send`, then, when it started one (created or replaced),
    /// `add_counters(counts)`: the decision, and the totals of the adds made
    /// (none when nothing started). One atomic step where the backend can
    /// (the SQL stores: one transaction, so a send commits once for both;
    /// one Redis node: one script). Here two calls (`start_then_count`).
    async fn start_counted_send(
        &self,
        plan: &SendPlan,
        counts: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<(SendDecision, Vec<u64>)> {
        start_then_count(self, plan, counts, now).await
    }

    /// Atomically: pending and unexpired, the subject's guess budget (when
    /// given), attempts left, constant-time hash compare, then approve
    /// (erasing the hash, and adding `UsageRow::approval` of its attempts to
    /// usage) or count the failure, in the budget too.
    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome>;

    /// `check_code`, then, when it approved, `add_counters` of what `counts`
    /// works out from the approved record (with no `counts`, `check_code`).
    /// One atomic step where the backend can (the SQL stores: one transaction,
    /// so a right check commits once and an approval is never kept without
    /// its counts). Here two calls; the approval stands when its adds fail,
    /// since the code is spent either way, and the failure is logged.
    async fn check_counted_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        let outcome = self.check_code(tenant, id, code_hash, budget, now).await?;
        count_approval_apart(self, &outcome, counts, now).await;
        Ok(outcome)
    }

    /// A check by number: `find_current` of `subject` and, when that is
    /// pending, `check_counted_code` of it with the hash `hash_for` gives for
    /// its id (a code's hash is keyed by its verification). One atomic step
    /// where the backend can (the SQL stores: one transaction, whose lookup
    /// is a read inside the write; one Redis node: one script, comparing the
    /// hash by subject its send kept). Here two calls.
    #[allow(clippy::too_many_arguments)]
    async fn check_current_code(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        hash_for: &CodeHasher,
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        now: DateTime<Utc>,
    ) -> StoreResult<CurrentCheck> {
        find_then_check(self, tenant, subject, hash_for, budget, counts, now).await
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>>;

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome>;

    // --- messages (delivery attempts) ---
    /// Stores a delivery attempt and, in the same atomic step, adds `usage` (what
    /// the attempt counts for) as `record_usage` would: an attempt is never
    /// counted twice or without its record.
    async fn insert_message(
        &self,
        message: &MessageRecord,
        usage: Option<&UsageRow>,
    ) -> StoreResult<()>;
    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>>;
    /// Oldest first.
    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>>;
    /// Atomically moves a message's status forward only (stamping the time of the
    /// status it reaches, and keeping error, cost and currency the update does not
    /// carry); returns the status before and the record after, or `None` when no
    /// message has that provider id.
    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>>;

    /// `provider`'s messages still awaiting a final status (queued, sent or
    /// unknown, with a provider message id) created after `created_after`, oldest
    /// first, at most `limit`. Served from an index, never a scan of all messages.
    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>>;

    /// Deletes up to `batch` messages created before `before` (retention);
    /// returns how many went.
    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64>;

    // --- usage (daily aggregates) ---
    /// Atomically adds `delta`'s counts and cost to the row with its key
    /// (tenant, day, route, country, currency), creating it.
    async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()>;

    /// The tenant's rows from `from` to `to` (inclusive), in no particular order.
    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>>;

    /// An automatic re-send (after a failed delivery): atomically, when the
    /// verification is the tenant's, pending, unexpired and still at
    /// `expected_send_count`, replaces its code hash and expiry, counts the send
    /// and returns it. No cooldown or send window applies, and attempts are kept.
    async fn replace_code(
        &self,
        replacement: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>>;

    // --- sandbox inbox ---
    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()>;
    /// Newest first, unexpired only.
    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>>;

    // --- shared counters (rate limits that must hold across instances) ---
    /// Counts one hit on `key` in the fixed window of `window_seconds` containing
    /// `now`; refuses (without counting) once `limit` hits are in the window.
    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision>;

    /// Adds `amount` to `key`'s counter in the fixed window of `window_seconds`
    /// containing `now` (slot = floor(unix seconds / window), as in
    /// `hit_rate_limit`) and returns the window's new total, atomically. A key's
    /// counters for different window lengths are separate; `amount` 0 reads.
    /// A window's total stays readable until the end of the window after it,
    /// so a sliding window can weigh it in.
    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;

    /// The total `add_to_counter` has reached in the window containing `now`.
    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;

    /// Reads several counters in one round trip where the backend can: the
    /// total of each `(key, window)` in the window containing its `at`, in order.
    async fn read_counters(&self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
        let mut totals = Vec::with_capacity(reads.len());
        for r in reads {
            totals.push(self.read_counter(r.key, r.window_seconds, r.at).await?);
        }
        Ok(totals)
    }

    /// Adds to several counters in order, as `add_to_counter` does, as one
    /// atomic step where the backend can, stopping after the first add whose
    /// new total exceeds its `ceiling` (that add is made). Returns the new
    /// totals of the adds made: fewer than `adds` only when the last one
    /// returned went over its ceiling.
    async fn add_counters(&self, adds: &[CounterAdd], now: DateTime<Utc>) -> StoreResult<Vec<u64>>;

    // --- markers (named values with an expiry, shared across instances) ---
    /// Creates or overwrites the marker `name` in `namespace`.
    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// The marker if it is live at `now`.
    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>>;

    /// The namespace's live markers, by name.
    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>>;

    /// Removes the marker; `false` when there was none (an expired marker the
    /// store has not forgotten yet may still count as one).
    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool>;

    /// A lease: atomically sets the marker to `holder` until `expires_at` if it is
    /// absent, expired at `now`, or already held by `holder` (which renews it);
    /// `false` when someone else holds it.
    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;

    // --- key rotation ---
    /// Pending verifications whose number is sealed under a key other than
    /// `current_key`: ids ascending, after `after`, at most `limit`.
    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>>;

    /// Replaces verification `id`'s sealed number with `new` if it is still
    /// `old`; `false` when it changed meanwhile or is gone.
    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool>;

    // --- housekeeping ---
    /// Ends up to `batch` verifications whose TTL has passed (erasing their code
    /// hashes) and deletes expired inbox entries, finished counters and expired
    /// markers; returns how many were touched.
    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64>;

    /// Pending, unexpired verifications across all tenants (for gauges; may scan).
    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64>;

    /// Releases connections once the server has drained, so a SIGTERM does not
    /// leave the database with half-closed sessions. Backends with pools override it.
    async fn close(&self) {}
}

pub type DynStore = Arc<dyn Store>;

/// Opens the store a `store.url` names, running migrations where the backend has them.
pub async fn connect(url: &str) -> StoreResult<DynStore> {
    connect_with(url, &SqliteOptions::default()).await
}

/// As [`connect`], with the SQLite file's options.
pub async fn connect_with(url: &str, sqlite: &SqliteOptions) -> StoreResult<DynStore> {
    if url.starts_with("memory://") {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = SqliteStore::open_with(std::path::Path::new(path), sqlite.clone()).await?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresStore::connect(url).await?));
    }
    const REDIS_SCHEMES: [&str; 4] = [
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+cluster://",
    ];
    if REDIS_SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        return Ok(Arc::new(RedisStore::connect(url).await?));
    }
    Err(StoreError::Unavailable(format!(
        "unsupported store url scheme: {}",
        url.split("://").next().unwrap_or_default()
    )))
}

/// Whether delivery tracking still waits on this message.
pub(crate) fn is_unfinished(m: &MessageRecord) -> bool {
    !m.status.is_final() && m.provider_message_id.is_some()
}

/// The message after a forward-only update, or `None` when the update reports
/// the same or an earlier stage. Every backend decides the same way.
pub(crate) fn advance_message(
    current: &MessageRecord,
    update: &MessageUpdate,
) -> Option<MessageRecord> {
    if update.status.rank() <= current.status.rank() {
        return None;
    }
    let mut m = current.clone();
    m.mark(update.status, update.at);
    m.error = update.error.clone().or(m.error);
    m.cost = update.cost.or(m.cost);
    m.currency = update.currency.clone().or(m.currency);
    m.updated_at = update.at;
    Some(m)
}

/// Seconds from `now` until `until`, rounded up and at least 1.
pub fn seconds_until(now: DateTime<Utc>, until: DateTime<Utc>) -> u64 {
    let ms = (until - now).num_milliseconds();
    (ms.max(1) as u64).div_ceil(1000)
}
