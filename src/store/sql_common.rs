//! What the SQLite and PostgreSQL stores share: the row shapes both schemas
//! use (ids as text, times as unix milliseconds, counters as 64-bit integers),
//! their conversion to domain types, sqlx error mapping, the pure decisions
//! each backend takes inside its own transaction, and (`sql_store!`) the one
//! `Store` implementation both run, around each backend's own pools, locking,
//! purge coordination and hot write operations.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use uuid::Uuid;

use super::{
    CheckOutcome, InboxEntry, Marker, SendDecision, SendPlan, StoreError, StoreResult, UsageRow,
    seconds_until,
};
use crate::crypto::{Crypto, SealedPhone};
use crate::domain::{
    ApiKeyRecord, DeliveryStatus, MessageRecord, SendOptions, Status, SubjectKey, Verification,
};

/// An ended verification stays readable (status reads, usage credit) at least this long;
/// after that it goes once retention has deleted its delivery records.
pub(crate) const KEEP_ENDED: Duration = Duration::hours(24);
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

pub(crate) fn parse_id(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| StoreError::Corrupt(format!("bad uuid {text:?}")))
}

pub(crate) fn parse_status(text: &str) -> StoreResult<Status> {
    Status::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown status {text:?}")))
}

/// Sealed bytes (a phone number or an inbox body) as stored.
pub(crate) fn sealed(bytes: &[u8], what: &str) -> StoreResult<SealedPhone> {
    SealedPhone::from_bytes(bytes).ok_or_else(|| StoreError::Corrupt(format!("{what} too short")))
}

fn bytes32(bytes: Vec<u8>, what: &str) -> StoreResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| StoreError::Corrupt(format!("{what} has {} bytes", b.len())))
}

fn count(n: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {n}")))
}

/// A row struct with `sqlx::FromRow` by column name for every driver whose
/// rows decode its fields: what `#[derive(sqlx::FromRow)]` writes, without
/// sqlx's macros (`store::migrations` says why).
macro_rules! row_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($fvis:vis $field:ident: $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $($fvis $field: $ty),*
        }

        impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for $name
        where
            &'r str: sqlx::ColumnIndex<R>,
            $($ty: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,)*
        {
            fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
                Ok(Self {
                    $($field: row.try_get(stringify!($field))?),*
                })
            }
        }
    };
}

row_struct! {
    pub(crate) struct VerificationRow {
        pub(crate) id: String,
        pub(crate) tenant: String,
        pub(crate) subject: Vec<u8>,
        pub(crate) purpose: String,
        pub(crate) uid: Option<String>,
        pub(crate) phone: Vec<u8>,
        pub(crate) masked_to: String,
        pub(crate) country: Option<String>,
        pub(crate) code_hash: Option<Vec<u8>>,
        pub(crate) status: String,
        pub(crate) attempts: i64,
        pub(crate) max_attempts: i64,
        pub(crate) send_count: i64,
        pub(crate) created_at: i64,
        pub(crate) updated_at: i64,
        pub(crate) expires_at: i64,
        pub(crate) last_sent_at: i64,
        pub(crate) send_options: Option<String>,
    }
}

impl TryFrom<VerificationRow> for Verification {
    type Error = StoreError;

    fn try_from(r: VerificationRow) -> StoreResult<Self> {
        Ok(Verification {
            id: parse_id(&r.id)?,
            tenant: r.tenant,
            subject: SubjectKey(bytes32(r.subject, "subject")?),
            purpose: r.purpose,
            uid: r.uid,
            phone: sealed(&r.phone, "sealed phone")?,
            masked_to: r.masked_to,
            country: r.country,
            code_hash: r.code_hash.map(|h| bytes32(h, "code hash")).transpose()?,
            status: parse_status(&r.status)?,
            attempts: count(r.attempts, "attempts")?,
            max_attempts: count(r.max_attempts, "max_attempts")?,
            send_count: count(r.send_count, "send_count")?,
            created_at: time(r.created_at)?,
            updated_at: time(r.updated_at)?,
            expires_at: time(r.expires_at)?,
            last_sent_at: time(r.last_sent_at)?,
            send_options: r.send_options.as_deref().and_then(SendOptions::from_text),
        })
    }
}

/// A verification's `send_options` column.
pub(crate) fn options_text(v: &Verification) -> Option<String> {
    v.send_options.as_ref().map(SendOptions::to_text)
}

row_struct! {
    pub(crate) struct MessageRow {
        pub(crate) id: String,
        pub(crate) verification_id: String,
        pub(crate) tenant: String,
        pub(crate) route_id: i64,
        pub(crate) provider: String,
        pub(crate) provider_message_id: Option<String>,
        pub(crate) masked_to: String,
        pub(crate) country: Option<String>,
        pub(crate) status: String,
        pub(crate) error: Option<String>,
        pub(crate) cost: Option<f64>,
        pub(crate) currency: Option<String>,
        pub(crate) latency_ms: i64,
        pub(crate) resend_of: Option<String>,
        pub(crate) created_at: i64,
        pub(crate) sent_at: Option<i64>,
        pub(crate) delivered_at: Option<i64>,
        pub(crate) failed_at: Option<i64>,
        pub(crate) updated_at: i64,
    }
}

impl TryFrom<MessageRow> for MessageRecord {
    type Error = StoreError;

    fn try_from(r: MessageRow) -> StoreResult<Self> {
        Ok(MessageRecord {
            id: parse_id(&r.id)?,
            verification_id: parse_id(&r.verification_id)?,
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
            resend_of: r.resend_of.as_deref().map(parse_id).transpose()?,
            created_at: time(r.created_at)?,
            sent_at: opt_time(r.sent_at)?,
            delivered_at: opt_time(r.delivered_at)?,
            failed_at: opt_time(r.failed_at)?,
            updated_at: time(r.updated_at)?,
        })
    }
}

row_struct! {
    pub(crate) struct ApiKeyRow {
        id: String,
        tenant: String,
        key_hash: Vec<u8>,
        created_at: i64,
        revoked_at: Option<i64>,
    }
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

row_struct! {
    pub(crate) struct InboxRow {
        id: String,
        tenant: String,
        phone_index: Vec<u8>,
        masked_to: String,
        sealed_body: Vec<u8>,
        created_at: i64,
        expires_at: i64,
    }
}

impl TryFrom<InboxRow> for InboxEntry {
    type Error = StoreError;

    fn try_from(r: InboxRow) -> StoreResult<Self> {
        Ok(InboxEntry {
            id: parse_id(&r.id)?,
            tenant: r.tenant,
            phone_index: bytes32(r.phone_index, "phone index")?,
            masked_to: r.masked_to,
            sealed_body: sealed(&r.sealed_body, "sealed body")?,
            created_at: time(r.created_at)?,
            expires_at: time(r.expires_at)?,
        })
    }
}

row_struct! {
    /// A subject's send history: which verification is current, and its cooldown
    /// and window counters.
    pub(crate) struct SubjectRow {
        pub(crate) current_id: Option<String>,
        pub(crate) last_sent_at: Option<i64>,
        pub(crate) window_start: Option<i64>,
        pub(crate) window_count: i64,
    }
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
            current: r.current_id.as_deref().map(parse_id).transpose()?,
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
        masked_to: v.masked_to.clone(),
    };
    (outcome, true)
}

row_struct! {
    /// A usage row as both SQL schemas store it: no country or currency is '' (they
    /// are part of the primary key), the day is `YYYY-MM-DD` text.
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

row_struct! {
    pub(crate) struct MarkerRow {
        pub(crate) name: String,
        pub(crate) value: String,
        pub(crate) expires_at: i64,
    }
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

/// At most this many counters are read by one statement of `read_counters`:
/// far above what a request reads, far below either database's bound on
/// parameters.
pub(crate) const COUNTER_READS_PER_STATEMENT: usize = 256;

/// How a write operation is made atomic; each backend's `write` runs it so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// One statement, which the database applies entirely or not at all.
    Statement,
    /// Reads that decide, then at most one writing statement, as the last one:
    /// what was read holds until the write, and a failure has written nothing.
    ReadThenWrite,
    /// Several writing statements: all of them or none.
    Transaction,
}

/// What a write operation returns: a future borrowing the connection it runs on.
pub(crate) type WriteFuture<'c, T> = futures::future::BoxFuture<'c, StoreResult<T>>;

/// Implements `Store` for a SQL backend, written once for SQLite and
/// PostgreSQL: the SQL (with `$N` placeholders, which both drivers bind by
/// number) and the Rust around it, except the hot operations' statements,
/// which each backend runs its own way (`sql_hot::HotTx`). A macro rather than generics over
/// `sqlx::Database`: the bounds those need (every bound type's `Encode`/`Type`,
/// every row's `FromRow`) are not implied and would repeat on every function.
///
/// - `read`: the pool field reads use (SQLite keeps its single writer
///   connection apart from its readers; PostgreSQL uses one pool).
/// - `insertion_order`: the column that orders rows of equal `created_at` the
///   way they were inserted (`rowid` on SQLite, the `seq` identity on PostgreSQL).
/// - `hot_write` and `hot_read`: macros that run a hot operation (`sql_hot`)
///   on the backend's `HotTx`: `hot_write!(store, kind, |tx| future)` as a
///   write of `kind` (the future owns what it needs), `hot_read!(store, |tx|
///   future)` as a read. Both evaluate to the future's output.
/// - `compound_write`: the `WriteKind` of a write that takes SQLite several
///   statements and PostgreSQL one (`HotTx::insert_message_with_usage`): a
///   transaction, or a statement.
/// - `counts_apart`: whether a send's and an approval's counter adds run as a
///   write of their own right after it (`start_then_count`,
///   `count_approval_apart`) rather than inside its transaction. PostgreSQL:
///   every send adds to counters that many sends share (the client's, the
///   country's traffic), and a row lock taken inside the send's transaction
///   would be held until its commit, queueing every concurrent send behind it.
///   SQLite: one writer, nothing to contend for, so one commit for both.
///
/// What each backend does its own way, it provides as inherent items:
/// - `async fn close(&self)`: closes its pools.
/// - `async fn write_counts(&self, adds: Vec<CounterAdd>, now) ->
///   StoreResult<Vec<u64>>`: `HotTx::add_counters` as a write of its own.
/// - `async fn write<T, F>(&self, kind: WriteKind, op: F) -> StoreResult<T>`,
///   `F: for<'c> FnOnce(&'c mut DB::Connection) -> WriteFuture<'c, T> + Send +
///   'static`: runs one write operation atomically as `kind` says and answers
///   only once its effect is committed. An `Err` from `op` undoes all of it.
/// - `fn purge_lock(&self) -> i64` and `async fn take_purge_lock(conn, lock) ->
///   StoreResult<bool>`: `false` when another instance is purging right now.
/// - `fn purge_steps(now) -> Vec<(&'static str, i64)>`: the purge's statements,
///   each taking `$1` (its cutoff) and `$2` (what is left of the batch).
///
/// Write operations own what they need (`'static`): SQLite runs them on its
/// writer thread, apart from the caller.
macro_rules! sql_store {
    (
        store: $store:ty,
        read: $read:ident,
        insertion_order: $order:literal,
        hot_write: $hot_write:ident,
        hot_read: $hot_read:ident,
        compound_write: $compound:expr,
        counts_apart: $apart:literal $(,)?
    ) => {
        // An anonymous scope, so the imports stay out of the backend's module.
        const _: () = {
        use chrono::{DateTime, NaiveDate, Utc};
        use uuid::Uuid;

        use $crate::crypto::SealedPhone;
        use $crate::domain::{ApiKeyRecord, MessageRecord, Status, SubjectKey, Verification};
        use $crate::store::sql_common::{
            ApiKeyRow, InboxRow, MarkerRow, MessageRow, UsageDbRow, VerificationRow,
            WriteKind, counter_total, day_text, id_text, map_sqlx, millis, parse_id, rate_slot,
            sealed,
        };
        use $crate::store::sql_hot::{
            HotTx, check_current_in, check_in, counted_send_in, read_counters_in,
            report_in, send_in,
        };
        use $crate::store::{
            ApprovalCounts, CancelOutcome, CheckOutcome, CodeHasher, CodeReplacement, CounterAdd,
            CounterRead, CurrentCheck, GuessBudget,
            InboxEntry, Marker, MessageTransition, MessageUpdate, RateDecision, SealedRecord, SendAbort,
            SendDecision, SendPlan, Store, StoreResult, UsageRow,
            count_approval_apart, seconds_until, start_then_count,
        };

        #[async_trait::async_trait]
        impl Store for $store {
            async fn close(&self) {
                // The backend's own (inherent) `close`.
                <$store>::close(self).await
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.$read).await.map_err(map_sqlx)?;
                Ok(())
            }

            async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
                let key = key.clone();
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO api_keys (id, tenant, key_hash, created_at, revoked_at)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&key.id)
                    .bind(&key.tenant)
                    .bind(key.key_hash.as_slice())
                    .bind(millis(key.created_at))
                    .bind(key.revoked_at.map(millis))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(())
                }))
                .await
            }

            async fn find_api_key(
                &self,
                key_hash: &[u8; 32],
            ) -> StoreResult<Option<ApiKeyRecord>> {
                sqlx::query_as::<_, ApiKeyRow>("SELECT * FROM api_keys WHERE key_hash = $1")
                    .bind(key_hash.as_slice())
                    .fetch_optional(&self.$read)
                    .await
                    .map_err(map_sqlx)?
                    .map(ApiKeyRecord::try_from)
                    .transpose()
            }

            async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
                sqlx::query_as::<_, ApiKeyRow>("SELECT * FROM api_keys ORDER BY created_at, id")
                    .fetch_all(&self.$read)
                    .await
                    .map_err(map_sqlx)?
                    .into_iter()
                    .map(ApiKeyRecord::try_from)
                    .collect()
            }

            async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
                let id = id.to_owned();
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                    )
                    .bind(millis(at))
                    .bind(&id)
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(done.rows_affected() > 0)
                }))
                .await
            }

            async fn find_current(
                &self,
                tenant: &str,
                subject: &SubjectKey,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<(Uuid, Status)>> {
                $hot_read!(self, |tx| tx.find_current(tenant, subject, now))
            }

            async fn start_send(
                &self,
                plan: &SendPlan,
                now: DateTime<Utc>,
            ) -> StoreResult<SendDecision> {
                let plan = plan.clone();
                $hot_write!(self, WriteKind::Transaction, |tx| send_in(tx, &plan, now))
            }

            async fn start_counted_send(
                &self,
                plan: &SendPlan,
                counts: &[CounterAdd],
                now: DateTime<Utc>,
            ) -> StoreResult<(SendDecision, Vec<u64>)> {
                if $apart {
                    return start_then_count(self, plan, counts, now).await;
                }
                let plan = plan.clone();
                let counts = counts.to_vec();
                $hot_write!(self, WriteKind::Transaction, |tx| {
                    counted_send_in(tx, &plan, &counts, now)
                })
            }

            async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
                let abort = abort.clone();
                self.write(WriteKind::Transaction, move |conn| Box::pin(async move {
                    // Only what this send still holds: a later send keeps its
                    // cooldown and its code.
                    sqlx::query(
                        "UPDATE subjects SET
                             last_sent_at = CASE WHEN last_sent_at = $4 THEN $1 ELSE last_sent_at END,
                             window_count = CASE WHEN window_count > 0 THEN window_count - 1 ELSE 0 END
                         WHERE tenant = $2 AND subject = $3",
                    )
                    .bind(abort.previous_sent_at.map(millis))
                    .bind(&abort.tenant)
                    .bind(abort.subject.0.as_slice())
                    .bind(millis(abort.sent_at))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    sqlx::query(
                        "UPDATE verifications SET status = 'failed', code_hash = NULL, updated_at = $1
                         WHERE id = $2 AND tenant = $3 AND status = 'pending' AND last_sent_at = $4",
                    )
                    .bind(millis(abort.at))
                    .bind(id_text(abort.verification_id))
                    .bind(&abort.tenant)
                    .bind(millis(abort.sent_at))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(())
                }))
                .await
            }

            async fn check_code(
                &self,
                tenant: &str,
                id: Uuid,
                code_hash: &[u8; 32],
                budget: Option<GuessBudget>,
                now: DateTime<Utc>,
            ) -> StoreResult<CheckOutcome> {
                self.check_counted_code(tenant, id, code_hash, budget, None, now)
                    .await
            }

            async fn check_counted_code(
                &self,
                tenant: &str,
                id: Uuid,
                code_hash: &[u8; 32],
                budget: Option<GuessBudget>,
                counts: Option<&ApprovalCounts>,
                now: DateTime<Utc>,
            ) -> StoreResult<CheckOutcome> {
                let tenant = tenant.to_owned();
                let code_hash = *code_hash;
                let within = if $apart { None } else { counts.cloned() };
                let outcome = $hot_write!(self, WriteKind::Transaction, |tx| {
                    check_in(tx, &tenant, id, &code_hash, budget, within.as_ref(), now)
                })?;
                if $apart {
                    count_approval_apart(self, &outcome, counts, now).await;
                }
                Ok(outcome)
            }

            async fn check_current_code(
                &self,
                tenant: &str,
                subject: &SubjectKey,
                hash_for: &CodeHasher,
                budget: Option<GuessBudget>,
                counts: Option<&ApprovalCounts>,
                now: DateTime<Utc>,
            ) -> StoreResult<CurrentCheck> {
                let tenant = tenant.to_owned();
                let subject = *subject;
                let hash_for = hash_for.clone();
                let within = if $apart { None } else { counts.cloned() };
                let checked = $hot_write!(self, WriteKind::Transaction, |tx| {
                    check_current_in(tx, &tenant, &subject, &hash_for, budget, within.as_ref(), now)
                })?;
                if let (true, CurrentCheck::Checked(_, outcome)) = ($apart, &checked) {
                    count_approval_apart(self, outcome, counts, now).await;
                }
                Ok(checked)
            }

            async fn get_verification(
                &self,
                tenant: &str,
                id: Uuid,
            ) -> StoreResult<Option<Verification>> {
                sqlx::query_as::<_, VerificationRow>(
                    "SELECT * FROM verifications WHERE id = $1 AND tenant = $2",
                )
                .bind(id_text(id))
                .bind(tenant)
                .fetch_optional(&self.$read)
                .await
                .map_err(map_sqlx)?
                .map(Verification::try_from)
                .transpose()
            }

            /// One statement: the pending test and the update cannot be separated
            /// by a concurrent check (on PostgreSQL the row lock it takes orders
            /// it, and the test is re-evaluated on the latest row).
            async fn cancel(
                &self,
                tenant: &str,
                id: Uuid,
                now: DateTime<Utc>,
            ) -> StoreResult<CancelOutcome> {
                let tenant = tenant.to_owned();
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    let row = sqlx::query_as::<_, VerificationRow>(
                        "UPDATE verifications SET status = 'canceled', code_hash = NULL, updated_at = $1
                         WHERE id = $2 AND tenant = $3 AND status = 'pending' AND expires_at > $1
                         RETURNING *",
                    )
                    .bind(millis(now))
                    .bind(id_text(id))
                    .bind(&tenant)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(match row {
                        Some(row) => CancelOutcome::Canceled(row.try_into()?),
                        None => CancelOutcome::NotFound,
                    })
                }))
                .await
            }

            async fn insert_message(
                &self,
                m: &MessageRecord,
                usage: Option<&UsageRow>,
            ) -> StoreResult<()> {
                let m = m.clone();
                let usage = usage.cloned();
                let kind = match usage {
                    Some(_) => $compound,
                    None => WriteKind::Statement,
                };
                $hot_write!(self, kind, |tx| tx.insert_message_with_usage(&m, usage.as_ref()))
            }

            async fn get_message(
                &self,
                tenant: &str,
                id: Uuid,
            ) -> StoreResult<Option<MessageRecord>> {
                sqlx::query_as::<_, MessageRow>(
                    "SELECT * FROM messages WHERE id = $1 AND tenant = $2",
                )
                .bind(id_text(id))
                .bind(tenant)
                .fetch_optional(&self.$read)
                .await
                .map_err(map_sqlx)?
                .map(MessageRecord::try_from)
                .transpose()
            }

            async fn list_messages(
                &self,
                tenant: &str,
                verification_id: Uuid,
            ) -> StoreResult<Vec<MessageRecord>> {
                sqlx::query_as::<_, MessageRow>(concat!(
                    "SELECT * FROM messages WHERE verification_id = $1 AND tenant = $2
                     ORDER BY created_at, ",
                    $order
                ))
                .bind(id_text(verification_id))
                .bind(tenant)
                .fetch_all(&self.$read)
                .await
                .map_err(map_sqlx)?
                .into_iter()
                .map(MessageRecord::try_from)
                .collect()
            }

            async fn update_message_by_provider_id(
                &self,
                provider: &str,
                provider_message_id: &str,
                update: &MessageUpdate,
            ) -> StoreResult<Option<MessageTransition>> {
                let (provider, provider_message_id) = (provider.to_owned(), provider_message_id.to_owned());
                let update = update.clone();
                $hot_write!(self, WriteKind::ReadThenWrite, |tx| report_in(
                    tx,
                    &provider,
                    &provider_message_id,
                    &update
                ))
            }

            async fn list_unfinished_messages(
                &self,
                provider: &str,
                created_after: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<MessageRecord>> {
                // The conditions repeat the partial index's, so the index serves the query.
                sqlx::query_as::<_, MessageRow>(
                    "SELECT * FROM messages
                     WHERE provider = $1 AND created_at > $2
                       AND status IN ('queued', 'sent', 'unknown')
                       AND provider_message_id IS NOT NULL
                     ORDER BY created_at LIMIT $3",
                )
                .bind(provider)
                .bind(millis(created_after))
                .bind(i64::from(limit))
                .fetch_all(&self.$read)
                .await
                .map_err(map_sqlx)?
                .into_iter()
                .map(MessageRecord::try_from)
                .collect()
            }

            async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    let done = sqlx::query(
                        "DELETE FROM messages WHERE id IN
                             (SELECT id FROM messages WHERE created_at < $1 LIMIT $2)",
                    )
                    .bind(millis(before))
                    .bind(i64::from(batch))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(done.rows_affected())
                }))
                .await
            }

            /// One upsert is one atomic step: the row is created or added to.
            async fn record_usage(&self, d: &UsageRow) -> StoreResult<()> {
                let d = d.clone();
                $hot_write!(self, WriteKind::Statement, |tx| tx.upsert_usage(&d))
            }

            async fn usage(
                &self,
                tenant: &str,
                from: NaiveDate,
                to: NaiveDate,
            ) -> StoreResult<Vec<UsageRow>> {
                // ISO dates order as text, so the primary key serves the range;
                // a day's stripes (`UPSERT_USAGE`) add up to its row.
                sqlx::query_as::<_, UsageDbRow>(
                    "SELECT tenant, day, route_id, country, currency,
                         CAST(SUM(sent) AS BIGINT) AS sent,
                         CAST(SUM(delivered) AS BIGINT) AS delivered,
                         CAST(SUM(failed) AS BIGINT) AS failed,
                         CAST(SUM(verifications_started) AS BIGINT) AS verifications_started,
                         CAST(SUM(verifications_approved) AS BIGINT) AS verifications_approved,
                         CAST(SUM(cost_micros) AS BIGINT) AS cost_micros
                     FROM usage_daily WHERE tenant = $1 AND day >= $2 AND day <= $3
                     GROUP BY tenant, day, route_id, country, currency",
                )
                .bind(tenant)
                .bind(day_text(from))
                .bind(day_text(to))
                .fetch_all(&self.$read)
                .await
                .map_err(map_sqlx)?
                .into_iter()
                .map(UsageRow::try_from)
                .collect()
            }

            /// One statement: the conditions and the write cannot be separated by a
            /// concurrent send, check or cancel.
            async fn replace_code(
                &self,
                r: &CodeReplacement,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<Verification>> {
                let r = r.clone();
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    sqlx::query_as::<_, VerificationRow>(
                        "UPDATE verifications
                         SET code_hash = $1, expires_at = $2, send_count = send_count + 1,
                             last_sent_at = $3, updated_at = $3
                         WHERE id = $4 AND tenant = $5 AND status = 'pending' AND expires_at > $3
                           AND send_count = $6
                         RETURNING *",
                    )
                    .bind(r.code_hash.as_slice())
                    .bind(millis(r.expires_at))
                    .bind(millis(now))
                    .bind(id_text(r.verification_id))
                    .bind(&r.tenant)
                    .bind(i64::from(r.expected_send_count))
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(map_sqlx)?
                    .map(Verification::try_from)
                    .transpose()
                }))
                .await
            }

            async fn push_inbox(&self, e: &InboxEntry) -> StoreResult<()> {
                let e = e.clone();
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO inbox (id, tenant, phone_index, masked_to, sealed_body, created_at,
                             expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(id_text(e.id))
                    .bind(&e.tenant)
                    .bind(e.phone_index.as_slice())
                    .bind(&e.masked_to)
                    .bind(e.sealed_body.to_bytes())
                    .bind(millis(e.created_at))
                    .bind(millis(e.expires_at))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(())
                }))
                .await
            }

            async fn list_inbox(
                &self,
                tenant: &str,
                phone_index: Option<&[u8; 32]>,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<InboxEntry>> {
                let rows = match phone_index {
                    Some(index) => {
                        sqlx::query_as::<_, InboxRow>(concat!(
                            "SELECT * FROM inbox
                             WHERE tenant = $1 AND expires_at > $2 AND phone_index = $3
                             ORDER BY created_at DESC, ",
                            $order,
                            " DESC LIMIT $4"
                        ))
                        .bind(tenant)
                        .bind(millis(now))
                        .bind(index.as_slice())
                        .bind(i64::from(limit))
                        .fetch_all(&self.$read)
                        .await
                    }
                    None => {
                        sqlx::query_as::<_, InboxRow>(concat!(
                            "SELECT * FROM inbox WHERE tenant = $1 AND expires_at > $2
                             ORDER BY created_at DESC, ",
                            $order,
                            " DESC LIMIT $3"
                        ))
                        .bind(tenant)
                        .bind(millis(now))
                        .bind(i64::from(limit))
                        .fetch_all(&self.$read)
                        .await
                    }
                };
                rows.map_err(map_sqlx)?
                    .into_iter()
                    .map(InboxEntry::try_from)
                    .collect()
            }

            async fn hit_rate_limit(
                &self,
                key: &str,
                limit: u32,
                window_seconds: u32,
                now: DateTime<Utc>,
            ) -> StoreResult<RateDecision> {
                let (slot, window_end) = rate_slot(window_seconds, now);
                let limited = || RateDecision::Limited {
                    retry_after_seconds: seconds_until(
                        now,
                        DateTime::from_timestamp_millis(window_end).unwrap_or(now),
                    ),
                };
                if limit == 0 {
                    return Ok(limited());
                }
                // One upsert is one atomic step (on PostgreSQL it locks the counter
                // row): it starts a fresh window, counts a hit, or, when the window is
                // full, changes nothing and returns no row.
                let key = key.to_owned();
                let count: Option<i64> = self.write(WriteKind::Statement, move |conn| {
                    Box::pin(async move {
                        sqlx::query_scalar(
                            "INSERT INTO rate_limits (key, slot, window_end, count) VALUES ($1, $2, $3, 1)
                             ON CONFLICT (key) DO UPDATE SET
                                 count = CASE WHEN rate_limits.slot = excluded.slot
                                              THEN rate_limits.count + 1 ELSE 1 END,
                                 slot = excluded.slot,
                                 window_end = excluded.window_end
                             WHERE rate_limits.slot <> excluded.slot OR rate_limits.count < $4
                             RETURNING count",
                        )
                        .bind(&key)
                        .bind(slot)
                        .bind(window_end)
                        .bind(i64::from(limit))
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(map_sqlx)
                    })
                })
                .await?;
                Ok(match count {
                    Some(count) => RateDecision::Allowed {
                        remaining: u32::try_from(i64::from(limit) - count).unwrap_or(0),
                    },
                    None => limited(),
                })
            }

            async fn add_to_counter(
                &self,
                key: &str,
                amount: u64,
                window_seconds: u32,
                now: DateTime<Utc>,
            ) -> StoreResult<u64> {
                let key = key.to_owned();
                $hot_write!(self, WriteKind::Statement, |tx| {
                    tx.add_to_counter(&key, amount, window_seconds, now)
                })
            }

            async fn add_counters(
                &self,
                adds: &[CounterAdd],
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<u64>> {
                if adds.is_empty() {
                    return Ok(Vec::new());
                }
                // The backend's own (inherent) `write_counts`.
                <$store>::write_counts(self, adds.to_vec(), now).await
            }

            async fn read_counter(
                &self,
                key: &str,
                window_seconds: u32,
                now: DateTime<Utc>,
            ) -> StoreResult<u64> {
                let (slot, _) = rate_slot(window_seconds, now);
                let total: Option<i64> = sqlx::query_scalar(
                    "SELECT total FROM counters
                     WHERE key = $1 AND window_seconds = $2 AND slot = $3",
                )
                .bind(key)
                .bind(i64::from(window_seconds))
                .bind(slot)
                .fetch_optional(&self.$read)
                .await
                .map_err(map_sqlx)?;
                Ok(counter_total(total))
            }

            async fn read_counters(&self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
                $hot_read!(self, |tx| read_counters_in(tx, reads))
            }

            async fn set_marker(
                &self,
                namespace: &str,
                name: &str,
                value: &str,
                expires_at: DateTime<Utc>,
            ) -> StoreResult<()> {
                let (namespace, name, value) = (namespace.to_owned(), name.to_owned(), value.to_owned());
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO markers (namespace, name, value, expires_at)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (namespace, name) DO UPDATE SET
                             value = excluded.value, expires_at = excluded.expires_at",
                    )
                    .bind(&namespace)
                    .bind(&name)
                    .bind(&value)
                    .bind(millis(expires_at))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_sqlx)?;
                    Ok(())
                }))
                .await
            }

            async fn get_marker(
                &self,
                namespace: &str,
                name: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<Marker>> {
                sqlx::query_as::<_, MarkerRow>(
                    "SELECT name, value, expires_at FROM markers
                     WHERE namespace = $1 AND name = $2 AND expires_at > $3",
                )
                .bind(namespace)
                .bind(name)
                .bind(millis(now))
                .fetch_optional(&self.$read)
                .await
                .map_err(map_sqlx)?
                .map(Marker::try_from)
                .transpose()
            }

            async fn list_markers(
                &self,
                namespace: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<Marker>> {
                $hot_read!(self, |tx| tx.list_markers(namespace, now))
            }

            async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
                let (namespace, name) = (namespace.to_owned(), name.to_owned());
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    let done = sqlx::query("DELETE FROM markers WHERE namespace = $1 AND name = $2")
                        .bind(&namespace)
                        .bind(&name)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_sqlx)?;
                    Ok(done.rows_affected() > 0)
                }))
                .await
            }

            /// `CLAIM_MARKER`, a hot write: the delivery-report poller claims a
            /// lease per message it polls, beside the checks and sends (on SQLite,
            /// through the writer's own connection, whose page cache a commit
            /// from its sqlx connection would empty).
            async fn claim_marker(
                &self,
                namespace: &str,
                name: &str,
                holder: &str,
                expires_at: DateTime<Utc>,
                now: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let (namespace, name, holder) = (namespace.to_owned(), name.to_owned(), holder.to_owned());
                $hot_write!(self, WriteKind::Statement, |tx| {
                    tx.claim_marker(&namespace, &name, &holder, expires_at, now)
                })
            }

            async fn list_sealed_with_other_key(
                &self,
                current_key: u32,
                after: Option<Uuid>,
                limit: u32,
            ) -> StoreResult<Vec<SealedRecord>> {
                // Sealed numbers start with their key id (4 bytes, big endian).
                let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
                    "SELECT id, tenant, phone FROM verifications
                     WHERE status = 'pending' AND id > $1 AND substr(phone, 1, 4) <> $2
                     ORDER BY id LIMIT $3",
                )
                .bind(after.map(id_text).unwrap_or_default())
                .bind(current_key.to_be_bytes().to_vec())
                .bind(i64::from(limit))
                .fetch_all(&self.$read)
                .await
                .map_err(map_sqlx)?;
                rows.into_iter()
                    .map(|(id, tenant, phone)| {
                        Ok(SealedRecord {
                            tenant,
                            id: parse_id(&id)?,
                            phone: sealed(&phone, "sealed phone")?,
                        })
                    })
                    .collect()
            }

            async fn reseal_phone(
                &self,
                id: Uuid,
                old: &SealedPhone,
                new: &SealedPhone,
            ) -> StoreResult<bool> {
                let (old, new) = (old.to_bytes(), new.to_bytes());
                self.write(WriteKind::Statement, move |conn| Box::pin(async move {
                    let done =
                        sqlx::query("UPDATE verifications SET phone = $1 WHERE id = $2 AND phone = $3")
                            .bind(&new)
                            .bind(id_text(id))
                            .bind(&old)
                            .execute(&mut *conn)
                            .await
                            .map_err(map_sqlx)?;
                    Ok(done.rows_affected() > 0)
                }))
                .await
            }

            async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
                let lock = self.purge_lock();
                self.write(WriteKind::Transaction, move |conn| {
                    Box::pin(async move {
                        if !Self::take_purge_lock(conn, lock).await? {
                            return Ok(0);
                        }
                        // Each step spends what is left of the batch, so one call
                        // touches at most `batch` rows.
                        let mut budget = u64::from(batch);
                        for (sql, cutoff) in Self::purge_steps(now) {
                            if budget == 0 {
                                break;
                            }
                            let done = sqlx::query(sql)
                                .bind(cutoff)
                                .bind(i64::try_from(budget).unwrap_or(i64::MAX))
                                .execute(&mut *conn)
                                .await
                                .map_err(map_sqlx)?;
                            budget = budget.saturating_sub(done.rows_affected());
                        }
                        Ok(u64::from(batch) - budget)
                    })
                })
                .await
            }

            async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM verifications
                     WHERE status = 'pending' AND expires_at > $1",
                )
                .bind(millis(now))
                .fetch_one(&self.$read)
                .await
                .map_err(map_sqlx)?;
                Ok(u64::try_from(n).unwrap_or(0))
            }
        }
        };
    };
}
pub(crate) use sql_store;
