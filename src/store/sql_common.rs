//! What the SQLite and PostgreSQL stores share: the row shapes both schemas
//! use (ids as text, times as unix milliseconds, counters as 64-bit integers),
//! their conversion to domain types, sqlx error mapping, and the pure decisions
//! each backend takes inside its own transaction.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use uuid::Uuid;

use super::{
    CheckOutcome, InboxEntry, Marker, SendDecision, SendPlan, StoreError, StoreResult, UsageRow,
    seconds_until,
};
use crate::crypto::{Crypto, SealedPhone};
use crate::domain::{
    ApiKeyRecord, DeliveryStatus, MessageRecord, Status, SubjectKey, Verification,
};

/// Subjects untouched this long are forgotten by the purge (as in the memory store).
pub(crate) const KEEP_SUBJECTS: Duration = Duration::hours(24);

pub(crate) fn map_sqlx(err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match err {
        E::ColumnDecode { .. }
        | E::Decode(_)
        | E::TypeNotFound { .. }
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::RowNotFound => StoreError::Corrupt(err.to_string()),
        // Timeouts, refused connections, busy or locked databases, serialization
        // failures and constraint errors: none is a verdict on the caller's data,
        // so callers answer 503 rather than a wrong verification answer.
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(crate) fn map_migrate(err: sqlx::migrate::MigrateError) -> StoreError {
    match err {
        sqlx::migrate::MigrateError::Execute(e) => map_sqlx(e),
        other => StoreError::Unavailable(format!("migration failed: {other}")),
    }
}

pub(crate) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn time(ms: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp out of range: {ms}")))
}

fn opt_time(ms: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    ms.map(time).transpose()
}

pub(crate) fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| StoreError::Corrupt(format!("bad uuid {text:?}")))
}

fn bytes32(bytes: Vec<u8>, what: &str) -> StoreResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| StoreError::Corrupt(format!("{what} has {} bytes", b.len())))
}

fn count(n: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {n}")))
}

#[derive(sqlx::FromRow)]
pub(crate) struct VerificationRow {
    id: String,
    tenant: String,
    subject: Vec<u8>,
    purpose: String,
    uid: Option<String>,
    phone: Vec<u8>,
    masked_to: String,
    country: Option<String>,
    code_hash: Option<Vec<u8>>,
    status: String,
    attempts: i64,
    max_attempts: i64,
    send_count: i64,
    created_at: i64,
    updated_at: i64,
    expires_at: i64,
    last_sent_at: i64,
}

impl TryFrom<VerificationRow> for Verification {
    type Error = StoreError;

    fn try_from(r: VerificationRow) -> StoreResult<Self> {
        Ok(Verification {
            id: uuid(&r.id)?,
            tenant: r.tenant,
            subject: SubjectKey(bytes32(r.subject, "subject")?),
            purpose: r.purpose,
            uid: r.uid,
            phone: SealedPhone::from_bytes(&r.phone)
                .ok_or_else(|| StoreError::Corrupt("sealed phone too short".into()))?,
            masked_to: r.masked_to,
            country: r.country,
            code_hash: r.code_hash.map(|h| bytes32(h, "code hash")).transpose()?,
            status: Status::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {:?}", r.status)))?,
            attempts: count(r.attempts, "attempts")?,
            max_attempts: count(r.max_attempts, "max_attempts")?,
            send_count: count(r.send_count, "send_count")?,
            created_at: time(r.created_at)?,
            updated_at: time(r.updated_at)?,
            expires_at: time(r.expires_at)?,
            last_sent_at: time(r.last_sent_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct MessageRow {
    id: String,
    verification_id: String,
    tenant: String,
    route_id: i64,
    provider: String,
    provider_message_id: Option<String>,
    masked_to: String,
    country: Option<String>,
    status: String,
    error: Option<String>,
    cost: Option<f64>,
    currency: Option<String>,
    latency_ms: i64,
    resend_of: Option<String>,
    created_at: i64,
    sent_at: Option<i64>,
    delivered_at: Option<i64>,
    failed_at: Option<i64>,
    updated_at: i64,
}

impl TryFrom<MessageRow> for MessageRecord {
    type Error = StoreError;

    fn try_from(r: MessageRow) -> StoreResult<Self> {
        Ok(MessageRecord {
            id: uuid(&r.id)?,
            verification_id: uuid(&r.verification_id)?,
            tenant: r.tenant,
            route_id: count(r.route_id, "route_id")?,
            provider: r.provider,
            provider_message_id: r.provider_message_id,
            masked_to: r.masked_to,
            country: r.country,
            status: DeliveryStatus::parse(&r.status).ok_or_else(|| {
                StoreError::Corrupt(format!("unknown delivery status {:?}", r.status))
            })?,
            error: r.error,
            cost: r.cost,
            currency: r.currency,
            latency_ms: count(r.latency_ms, "latency_ms")?,
            resend_of: r.resend_of.as_deref().map(uuid).transpose()?,
            created_at: time(r.created_at)?,
            sent_at: opt_time(r.sent_at)?,
            delivered_at: opt_time(r.delivered_at)?,
            failed_at: opt_time(r.failed_at)?,
            updated_at: time(r.updated_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ApiKeyRow {
    id: String,
    tenant: String,
    key_hash: Vec<u8>,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(r: ApiKeyRow) -> StoreResult<Self> {
        Ok(ApiKeyRecord {
            id: r.id,
            tenant: r.tenant,
            key_hash: bytes32(r.key_hash, "key hash")?,
            created_at: time(r.created_at)?,
            revoked_at: opt_time(r.revoked_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct InboxRow {
    id: String,
    tenant: String,
    phone_index: Vec<u8>,
    masked_to: String,
    sealed_body: Vec<u8>,
    created_at: i64,
    expires_at: i64,
}

impl TryFrom<InboxRow> for InboxEntry {
    type Error = StoreError;

    fn try_from(r: InboxRow) -> StoreResult<Self> {
        Ok(InboxEntry {
            id: uuid(&r.id)?,
            tenant: r.tenant,
            phone_index: bytes32(r.phone_index, "phone index")?,
            masked_to: r.masked_to,
            sealed_body: SealedPhone::from_bytes(&r.sealed_body)
                .ok_or_else(|| StoreError::Corrupt("sealed body too short".into()))?,
            created_at: time(r.created_at)?,
            expires_at: time(r.expires_at)?,
        })
    }
}

/// A subject's send history: which verification is current, and its cooldown
/// and window counters.
#[derive(sqlx::FromRow)]
pub(crate) struct SubjectRow {
    current_id: Option<String>,
    last_sent_at: Option<i64>,
    window_start: Option<i64>,
    window_count: i64,
}

pub(crate) struct SubjectState {
    pub current: Option<Uuid>,
    pub last_sent_at: Option<DateTime<Utc>>,
    pub window_start: Option<DateTime<Utc>>,
    pub window_count: u32,
}

impl TryFrom<SubjectRow> for SubjectState {
    type Error = StoreError;

    fn try_from(r: SubjectRow) -> StoreResult<Self> {
        Ok(SubjectState {
            current: r.current_id.as_deref().map(uuid).transpose()?,
            last_sent_at: opt_time(r.last_sent_at)?,
            window_start: opt_time(r.window_start)?,
            window_count: count(r.window_count, "window_count")?,
        })
    }
}

/// The send window a send would count in: `(start, sends so far)`.
pub(crate) struct Window {
    pub start: DateTime<Utc>,
    pub count: u32,
}

/// Why a send was refused before any verification was looked at.
pub(crate) enum Refusal {
    Cooldown { retry_after_seconds: u64 },
    WindowExhausted { retry_after_seconds: u64 },
}

impl From<Refusal> for SendDecision {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Cooldown {
                retry_after_seconds,
            } => SendDecision::Cooldown {
                retry_after_seconds,
            },
            Refusal::WindowExhausted {
                retry_after_seconds,
            } => SendDecision::WindowExhausted {
                retry_after_seconds,
            },
        }
    }
}

/// Cooldown and window checks of `Store::start_send`, before any pending
/// verification is looked at.
pub(crate) fn admit_send(
    state: &SubjectState,
    plan: &SendPlan,
    now: DateTime<Utc>,
) -> Result<Window, Refusal> {
    if let Some(last) = state.last_sent_at {
        let until = last + Duration::seconds(plan.cooldown_seconds.into());
        if now < until {
            return Err(Refusal::Cooldown {
                retry_after_seconds: seconds_until(now, until),
            });
        }
    }
    let length = Duration::seconds(plan.send_window_seconds.into());
    let window = match state.window_start {
        Some(start) if now < start + length => Window {
            start,
            count: state.window_count,
        },
        _ => Window {
            start: now,
            count: 0,
        },
    };
    if window.count >= plan.max_sends_per_window {
        return Err(Refusal::WindowExhausted {
            retry_after_seconds: seconds_until(now, window.start + length),
        });
    }
    Ok(window)
}

/// The decision of `Store::check_code` on the locked row `v` (already known to
/// belong to the caller's tenant). Mutates `v` as the store must persist it;
/// the returned flag says whether anything needs writing.
pub(crate) fn decide_check(
    v: &mut Verification,
    code_hash: &[u8; 32],
    now: DateTime<Utc>,
) -> (CheckOutcome, bool) {
    if v.status == Status::MaxAttempts {
        return (CheckOutcome::MaxAttempts, false);
    }
    if !v.is_pending_at(now) {
        return (CheckOutcome::NotFound, false);
    }
    let Some(stored) = v.code_hash else {
        return (CheckOutcome::NotFound, false);
    };
    v.updated_at = now;
    if Crypto::hashes_match(&stored, code_hash) {
        v.status = Status::Approved;
        v.code_hash = None;
        return (CheckOutcome::Approved(v.clone()), true);
    }
    v.attempts += 1;
    if v.attempts >= v.max_attempts {
        v.status = Status::MaxAttempts;
        v.code_hash = None;
    }
    let outcome = CheckOutcome::Wrong {
        attempts_left: v.attempts_left(),
    };
    (outcome, true)
}

/// A usage row as both SQL schemas store it: no country or currency is '' (they
/// are part of the primary key), the day is `YYYY-MM-DD` text.
#[derive(sqlx::FromRow)]
pub(crate) struct UsageDbRow {
    tenant: String,
    day: String,
    route_id: i64,
    country: String,
    currency: String,
    sent: i64,
    delivered: i64,
    failed: i64,
    verifications_started: i64,
    verifications_approved: i64,
    cost_micros: i64,
}

impl TryFrom<UsageDbRow> for UsageRow {
    type Error = StoreError;

    fn try_from(r: UsageDbRow) -> StoreResult<Self> {
        let n = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
        };
        Ok(UsageRow {
            day: NaiveDate::parse_from_str(&r.day, DAY_FORMAT)
                .map_err(|_| StoreError::Corrupt(format!("bad usage day {:?}", r.day)))?,
            route_id: count(r.route_id, "route_id")?,
            country: Some(r.country).filter(|c| !c.is_empty()),
            currency: Some(r.currency).filter(|c| !c.is_empty()),
            sent: n(r.sent, "sent")?,
            delivered: n(r.delivered, "delivered")?,
            failed: n(r.failed, "failed")?,
            verifications_started: n(r.verifications_started, "verifications_started")?,
            verifications_approved: n(r.verifications_approved, "verifications_approved")?,
            cost_micros: r.cost_micros,
            tenant: r.tenant,
        })
    }
}

pub(crate) const DAY_FORMAT: &str = "%Y-%m-%d";

pub(crate) fn day_text(day: NaiveDate) -> String {
    day.format(DAY_FORMAT).to_string()
}

/// A usage count as SQL's signed 64-bit integer.
pub(crate) fn usage_amount(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The fixed rate-limit window containing `now`: (slot number, end in millis).
pub(crate) fn rate_slot(window_seconds: u32, now: DateTime<Utc>) -> (i64, i64) {
    let window = i64::from(window_seconds.max(1));
    let slot = now.timestamp().div_euclid(window);
    (slot, (slot + 1) * window * 1000)
}

/// An `add_to_counter` amount as SQL's signed 64-bit integer; nothing real
/// comes near the bound, so clamping only guards against nonsense input.
pub(crate) fn counter_amount(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

pub(crate) fn counter_total(total: Option<i64>) -> u64 {
    total.map_or(0, |t| u64::try_from(t).unwrap_or(0))
}

#[derive(sqlx::FromRow)]
pub(crate) struct MarkerRow {
    name: String,
    value: String,
    expires_at: i64,
}

impl TryFrom<MarkerRow> for Marker {
    type Error = StoreError;

    fn try_from(r: MarkerRow) -> StoreResult<Self> {
        Ok(Marker {
            name: r.name,
            value: r.value,
            expires_at: time(r.expires_at)?,
        })
    }
}

/// The counter window containing `now` (slot number) and when its row may be
/// forgotten: at the end of the window after it, because a sliding window reads
/// the previous window's total too.
pub(crate) fn counter_slot(window_seconds: u32, now: DateTime<Utc>) -> (i64, i64) {
    let window = i64::from(window_seconds.max(1));
    let slot = now.timestamp().div_euclid(window);
    (slot, (slot + 2) * window * 1000)
}
