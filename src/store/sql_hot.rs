//! The hot operations (those of every send and check), which each SQL
//! backend runs through its own driver: PostgreSQL through sqlx like the rest,
//! SQLite directly, as sqlx's asynchronous connection cannot (`sqlite::hot`:
//! the writes on its writer thread, the reads on the caller's). Written once
//! here: the decisions around the statements (`send_in`, `check_in`, …, over
//! each backend's `HotTx`) and the statements' text, so the two backends
//! cannot drift apart. Parameters are `$N`; both drivers bind them by number.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::sql_common::{
    COUNTER_READS_PER_STATEMENT, SubjectState, Window, admit_send, decide_check,
};
use super::{
    ApprovalCounts, CheckOutcome, CodeHasher, CounterAdd, CounterRead, CurrentCheck, GuessBudget,
    Marker, MessageTransition, MessageUpdate, SendDecision, SendPlan, StoreError, StoreResult,
    UsageRow, advance_message,
};
use crate::domain::limits::WindowCounts;
use crate::domain::{MessageRecord, Status, SubjectKey, Verification};

/// The statements of the hot operations, on one backend's connection (inside
/// the operation's write, for a write). SQLite's complete at once (they are
/// plain calls), so it runs the flows below with `futures::executor::block_on`.
pub(crate) trait HotTx {
    /// `FIND_CURRENT`: the subject's current verification, while checkable.
    async fn find_current(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>>;
    /// `LIST_MARKERS`.
    async fn list_markers(
        &mut self,
        namespace: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Marker>>;
    /// A subject's send history, held against concurrent sends until the
    /// write ends. A subject seen for the first time has none.
    async fn subject_state(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
    ) -> StoreResult<SubjectState>;
    /// The verification `id`, locked for the rest of the write where the
    /// backend locks rows.
    async fn verification(&mut self, id: Uuid) -> StoreResult<Option<Verification>>;
    /// `RESEND_VERIFICATION` of `planned` onto the pending verification `id`.
    async fn resend(
        &mut self,
        planned: &Verification,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Verification>;
    /// `INSERT_VERIFICATION`; `false` when the id exists already.
    async fn insert_verification(&mut self, planned: &Verification) -> StoreResult<bool>;
    /// `UPSERT_SUBJECT`: `planned` is the subject's current verification,
    /// sent at `now`, in `window`.
    async fn upsert_subject(
        &mut self,
        planned: &Verification,
        window: &Window,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// The totals of `reads` (at most `COUNTER_READS_PER_STATEMENT`), in order.
    async fn counter_totals(&mut self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>>;
    /// `UPDATE_CHECKED` with `v`'s status, code hash, attempts and update time.
    async fn save_checked(&mut self, v: &Verification) -> StoreResult<()>;
    /// A wrong guess at `v` (which it has counted): `save_checked`, then one
    /// more on the guess budget's counter `key`.
    async fn save_wrong_guess(
        &mut self,
        v: &Verification,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.save_checked(v).await?;
        self.add_to_counter(key, 1, GuessBudget::WINDOW_SECONDS, now)
            .await?;
        Ok(())
    }
    /// `ADD_TO_COUNTER`; the new total.
    async fn add_to_counter(
        &mut self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// Adds in order, as `add_to_counter` does, stopping after the first add
    /// that goes over its ceiling (`CounterAdd::stops_batch`); the totals of
    /// the adds made. One statement each unless the backend has better.
    async fn add_counters(
        &mut self,
        adds: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<u64>> {
        let mut totals = Vec::with_capacity(adds.len());
        for a in adds {
            let total = self
                .add_to_counter(&a.key, a.amount, a.window_seconds, now)
                .await?;
            totals.push(total);
            if a.stops_batch(total) {
                break;
            }
        }
        Ok(totals)
    }
    /// `count_approval_sql!` for verification `id`.
    async fn count_approval(&mut self, id: Uuid) -> StoreResult<()>;
    /// An approval of `v`: `save_checked`, then `count_approval`.
    async fn save_approval(&mut self, v: &Verification) -> StoreResult<()> {
        self.save_checked(v).await?;
        self.count_approval(v.id).await
    }
    /// `INSERT_MESSAGE`.
    async fn insert_message(&mut self, m: &MessageRecord) -> StoreResult<()>;
    /// The newest message `provider` knows as `provider_message_id` (should a
    /// provider ever reuse an id, the newest is the one meant), locked for
    /// the rest of the write where the backend locks rows.
    async fn message_by_provider_id(
        &mut self,
        provider: &str,
        provider_message_id: &str,
    ) -> StoreResult<Option<MessageRecord>>;
    /// `UPDATE_MESSAGE` with `m`'s delivery state.
    async fn save_message(&mut self, m: &MessageRecord) -> StoreResult<()>;
    /// `UPSERT_USAGE`.
    async fn upsert_usage(&mut self, d: &UsageRow) -> StoreResult<()>;
    /// `CLAIM_MARKER`: whether `holder` holds the lease until `expires_at`.
    async fn claim_marker(
        &mut self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// `Store::insert_message`: a delivery attempt and what it adds to usage.
    /// Two statements unless the backend has better.
    async fn insert_message_with_usage(
        &mut self,
        m: &MessageRecord,
        usage: Option<&UsageRow>,
    ) -> StoreResult<()> {
        self.insert_message(m).await?;
        match usage {
            Some(usage) => self.upsert_usage(usage).await,
            None => Ok(()),
        }
    }
}

/// `Store::read_counters`: one statement per `COUNTER_READS_PER_STATEMENT`.
pub(crate) async fn read_counters_in(
    tx: &mut impl HotTx,
    reads: &[CounterRead<'_>],
) -> StoreResult<Vec<u64>> {
    let mut totals = Vec::with_capacity(reads.len());
    for chunk in reads.chunks(COUNTER_READS_PER_STATEMENT) {
        totals.extend(tx.counter_totals(chunk).await?);
    }
    Ok(totals)
}

/// `Store::start_send`, inside the backend's write.
pub(crate) async fn send_in(
    tx: &mut impl HotTx,
    plan: &SendPlan,
    now: DateTime<Utc>,
) -> StoreResult<SendDecision> {
    let planned = &plan.verification;
    let state = tx.subject_state(&planned.tenant, &planned.subject).await?;
    let window = match admit_send(&state, plan, now) {
        Ok(window) => window,
        Err(refusal) => return Ok(refusal.into()),
    };
    let pending = match state.current {
        Some(current) => tx
            .verification(current)
            .await?
            .filter(|v| v.tenant == planned.tenant && v.is_pending_at(now)),
        None => None,
    };
    let previous_sent_at = state.last_sent_at;
    let decision = match pending {
        Some(v) if v.id == planned.id => SendDecision::Replaced {
            verification: tx.resend(planned, v.id, now).await?,
            previous_sent_at,
        },
        Some(v) => {
            return Ok(SendDecision::Conflict {
                pending: Some(v.id),
            });
        }
        // The plan names a verification that exists but is no longer
        // pending (expired or ended since the service looked).
        None if !tx.insert_verification(planned).await? => {
            return Ok(SendDecision::Conflict { pending: None });
        }
        None => SendDecision::Created {
            verification: planned.clone(),
            previous_sent_at,
        },
    };
    tx.upsert_subject(planned, &window, now).await?;
    Ok(decision)
}

/// `Store::start_counted_send`, inside the backend's write: the start and,
/// when it started a send, the counts, committed together.
pub(crate) async fn counted_send_in(
    tx: &mut impl HotTx,
    plan: &SendPlan,
    counts: &[CounterAdd],
    now: DateTime<Utc>,
) -> StoreResult<(SendDecision, Vec<u64>)> {
    let decision = send_in(tx, plan, now).await?;
    let totals = match decision {
        SendDecision::Created { .. } | SendDecision::Replaced { .. } => {
            tx.add_counters(counts, now).await?
        }
        _ => Vec::new(),
    };
    Ok((decision, totals))
}

/// `Store::check_code` (`Store::check_counted_code` with `counts`), inside
/// the backend's write.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn check_in(
    tx: &mut impl HotTx,
    tenant: &str,
    id: Uuid,
    code_hash: &[u8; 32],
    budget: Option<GuessBudget>,
    counts: Option<&ApprovalCounts>,
    now: DateTime<Utc>,
) -> StoreResult<CheckOutcome> {
    let Some(mut v) = tx
        .verification(id)
        .await?
        .filter(|v| v.tenant == tenant && v.is_checkable_at(now))
    else {
        return Ok(CheckOutcome::NotFound);
    };
    let guesses = budget.map(|b| (b, GuessBudget::counter_key(&v.subject)));
    if let Some((budget, key)) = &guesses {
        let counts = match tx.counter_totals(&GuessBudget::reads(key, now)).await?[..] {
            [previous, current] => WindowCounts { previous, current },
            _ => return Err(StoreError::Corrupt("short counter read".into())),
        };
        if !budget.admits(counts, now) {
            return Ok(CheckOutcome::GuessesSpent(counts));
        }
    }
    let (outcome, changed) = decide_check(&mut v, code_hash, now);
    match (&outcome, &guesses) {
        (CheckOutcome::Approved(_), _) => tx.save_approval(&v).await?,
        (CheckOutcome::Wrong { .. }, Some((_, key))) => tx.save_wrong_guess(&v, key, now).await?,
        _ if changed => tx.save_checked(&v).await?,
        _ => {}
    }
    if let CheckOutcome::Approved(v) = &outcome
        && let Some(adds) = counts.map(|counts| counts(v)).filter(|a| !a.is_empty())
    {
        tx.add_counters(&adds, now).await?;
    }
    Ok(outcome)
}

/// `Store::update_message_by_provider_id`, inside the backend's write: a
/// delivery report, one per message sent. On SQLite it runs on the writer's
/// own connection like the other hot writes, not through sqlx's connection
/// thread while the writer thread waits for it (a commit from that other
/// connection also empties this one's page cache).
pub(crate) async fn report_in(
    tx: &mut impl HotTx,
    provider: &str,
    provider_message_id: &str,
    update: &MessageUpdate,
) -> StoreResult<Option<MessageTransition>> {
    let Some(current) = tx
        .message_by_provider_id(provider, provider_message_id)
        .await?
    else {
        return Ok(None);
    };
    let previous = current.status;
    let Some(next) = advance_message(&current, update) else {
        return Ok(Some(MessageTransition {
            previous,
            message: current,
        }));
    };
    tx.save_message(&next).await?;
    Ok(Some(MessageTransition {
        previous,
        message: next,
    }))
}

/// `Store::check_current_code`, inside the backend's write: the lookup reads
/// what the write sees (on SQLite, through the writer's warm page cache).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn check_current_in(
    tx: &mut impl HotTx,
    tenant: &str,
    subject: &SubjectKey,
    hash_for: &CodeHasher,
    budget: Option<GuessBudget>,
    counts: Option<&ApprovalCounts>,
    now: DateTime<Utc>,
) -> StoreResult<CurrentCheck> {
    let id = match CurrentCheck::to_check(tx.find_current(tenant, subject, now).await?) {
        Ok(id) => id,
        Err(answer) => return Ok(answer),
    };
    let outcome = check_in(tx, tenant, id, &hash_for.for_id(id), budget, counts, now).await?;
    Ok(CurrentCheck::Checked(id, outcome))
}

/// A subject's current verification, while it can still be checked: the
/// check by number's lookup.
pub(crate) const FIND_CURRENT: &str = "SELECT v.id, v.status
     FROM subjects s JOIN verifications v ON v.id = s.current_id
     WHERE s.tenant = $1 AND s.subject = $2 AND v.tenant = $1
       AND v.status IN ('pending', 'max_attempts') AND v.expires_at > $3";

/// A namespace's live markers (the pumping guard's blocked prefixes).
pub(crate) const LIST_MARKERS: &str = "SELECT name, value, expires_at FROM markers
     WHERE namespace = $1 AND expires_at > $2 ORDER BY name";

/// `Store::claim_marker` as one upsert that decides and writes: it takes a
/// free or expired marker ($5: now), renews the holder's own, and leaves
/// anyone else's alone (returning no row). The cast: PostgreSQL's bare `1`
/// is a 4-byte integer.
pub(crate) const CLAIM_MARKER: &str = "INSERT INTO markers (namespace, name, value, expires_at)
     VALUES ($1, $2, $3, $4)
     ON CONFLICT (namespace, name) DO UPDATE SET
         value = excluded.value, expires_at = excluded.expires_at
     WHERE markers.expires_at <= $5 OR markers.value = excluded.value
     RETURNING CAST(1 AS BIGINT)";

/// A verification's columns, in `VerificationRow`'s order: SQLite reads
/// them by position, which is cheaper than looking each name up.
macro_rules! verification_columns {
    () => {
        "id, tenant, subject, purpose, uid, phone, masked_to, country, code_hash, status,
         attempts, max_attempts, send_count, created_at, updated_at, expires_at, last_sent_at,
         send_options"
    };
}
pub(crate) use verification_columns;

/// A resend: the pending verification gets a new code, expiry, number (a
/// uid's number may change between sends) and send options.
pub(crate) const RESEND_VERIFICATION: &str = concat!(
    "UPDATE verifications
     SET code_hash = $1, expires_at = $2, send_count = send_count + 1,
         updated_at = $3, last_sent_at = $3,
         phone = $5, masked_to = $6, country = $7, send_options = $8
     WHERE id = $4 RETURNING ",
    verification_columns!()
);

/// A new verification; no row when its id exists already (the plan's
/// verification ended since the service looked).
pub(crate) const INSERT_VERIFICATION: &str = "INSERT INTO verifications (id, tenant, subject,
         purpose, uid, phone, masked_to, country, code_hash, status, attempts, max_attempts,
         send_count, created_at, updated_at, expires_at, last_sent_at, send_options)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
     ON CONFLICT (id) DO NOTHING";

/// A send's subject state: an upsert, since SQLite may have no row yet
/// (PostgreSQL created and locked it before reading the state).
pub(crate) const UPSERT_SUBJECT: &str = "INSERT INTO subjects (tenant, subject, current_id,
         last_sent_at, window_start, window_count)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (tenant, subject) DO UPDATE SET
         current_id = excluded.current_id,
         last_sent_at = excluded.last_sent_at,
         window_start = excluded.window_start,
         window_count = excluded.window_count";

/// What a check decided for verification `$5`.
pub(crate) const UPDATE_CHECKED: &str = "UPDATE verifications
     SET status = $1, code_hash = $2, attempts = $3, updated_at = $4
     WHERE id = $5";

/// One counter add: one upsert creates the window's row or adds to it, and
/// returns the new total.
pub(crate) const ADD_TO_COUNTER: &str = "INSERT INTO counters (key, window_seconds, slot,
         keep_until, total)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (key, window_seconds, slot) DO UPDATE SET
         total = counters.total + excluded.total
     RETURNING total";

/// A message's columns, in `MessageRow`'s order (see `verification_columns`).
macro_rules! message_columns {
    () => {
        "id, verification_id, tenant, route_id, provider, provider_message_id, masked_to,
         country, status, error, cost, currency, latency_ms, resend_of, created_at, sent_at,
         delivered_at, failed_at, updated_at"
    };
}
pub(crate) use message_columns;

/// `HotTx::message_by_provider_id`: the newest message a provider knows by
/// that id, newest by the backend's insertion order (`$order`, plus a lock
/// where the backend takes one).
macro_rules! message_by_provider_id_sql {
    ($order:literal) => {
        concat!(
            "SELECT ",
            $crate::store::sql_hot::message_columns!(),
            " FROM messages WHERE provider = $1 AND provider_message_id = $2 ORDER BY ",
            $order
        )
    };
}
pub(crate) use message_by_provider_id_sql;

/// A delivery report's new state for message `$9`.
pub(crate) const UPDATE_MESSAGE: &str = "UPDATE messages SET status = $1, error = $2, cost = $3,
         currency = $4, updated_at = $5, sent_at = $6, delivered_at = $7, failed_at = $8
     WHERE id = $9";

pub(crate) const INSERT_MESSAGE: &str = "INSERT INTO messages (id, verification_id, tenant,
         route_id, provider, provider_message_id, masked_to, country, status, error, cost,
         currency, latency_ms, resend_of, created_at, sent_at, delivered_at, failed_at,
         updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
         $19)";

/// A usage delta: the day's row is created or added to, in the stripe that
/// the column's default picks for this connection. A day's usage may be
/// kept in several rows that reads add up (`Store::usage`), so that
/// concurrent writers do not queue for one row lock (on PostgreSQL, held
/// until each writer's commit reaches the disk; its migration 0007).
pub(crate) const UPSERT_USAGE: &str = "INSERT INTO usage_daily (tenant, day, route_id, country,
         currency, sent, delivered, failed, verifications_started, verifications_approved,
         cost_micros)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
     ON CONFLICT (tenant, day, route_id, country, currency, stripe) DO UPDATE SET
         sent = usage_daily.sent + excluded.sent,
         delivered = usage_daily.delivered + excluded.delivered,
         failed = usage_daily.failed + excluded.failed,
         verifications_started =
             usage_daily.verifications_started + excluded.verifications_started,
         verifications_approved =
             usage_daily.verifications_approved + excluded.verifications_approved,
         cost_micros = usage_daily.cost_micros + excluded.cost_micros";

/// Counts the approval of verification `$1` (`UsageRow::approval`) inside the
/// check's write: one statement finds its first accepted attempt
/// (`MessageRecord::was_accepted`) and adds to that row. `day_of_millis` is
/// the UTC day (`YYYY-MM-DD`) of `created_at` in the backend's SQL; `order`
/// the column that orders rows of equal `created_at` as they were inserted.
/// The stripe is the column's default, as in `UPSERT_USAGE`.
macro_rules! count_approval_sql {
    (day_of_millis: $day_of_millis:literal, insertion_order: $order:literal $(,)?) => {
        concat!(
            "INSERT INTO usage_daily (tenant, day, route_id, country, currency, sent,
                 delivered, failed, verifications_started, verifications_approved, cost_micros)
             SELECT tenant, ",
            $day_of_millis,
            ", route_id, COALESCE(country, ''), '',
                 0, 0, 0, 0, 1, 0
             FROM messages
             WHERE verification_id = $1
                 AND (status IN ('queued', 'sent', 'delivered')
                     OR provider_message_id IS NOT NULL)
             ORDER BY created_at, ",
            $order,
            "
             LIMIT 1
             ON CONFLICT (tenant, day, route_id, country, currency, stripe) DO UPDATE SET
                 verifications_approved = usage_daily.verifications_approved + 1"
        )
    };
}
pub(crate) use count_approval_sql;
