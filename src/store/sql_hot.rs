//! The statements of the hot operations (those of every send and check),
//! which each SQL backend runs through its own driver: PostgreSQL through
//! sqlx, SQLite directly (`sqlite::hot`). One text for both, so the two cannot
//! drift apart. Parameters are `$N`; both drivers bind them by number.

/// A subject's current verification, while it can still be checked: the
/// check by number's lookup.
pub(crate) const FIND_CURRENT: &str = "SELECT v.id, v.status
     FROM subjects s JOIN verifications v ON v.id = s.current_id
     WHERE s.tenant = $1 AND s.subject = $2 AND v.tenant = $1
       AND v.status IN ('pending', 'max_attempts') AND v.expires_at > $3";

/// A namespace's live markers (the pumping guard's blocked prefixes).
pub(crate) const LIST_MARKERS: &str = "SELECT name, value, expires_at FROM markers
     WHERE namespace = $1 AND expires_at > $2 ORDER BY name";

/// A verification's columns, in `VerificationRow`'s order: SQLite reads
/// them by position, which is cheaper than looking each name up.
macro_rules! verification_columns {
    () => {
        "id, tenant, subject, purpose, uid, phone, masked_to, country, code_hash, status,
         attempts, max_attempts, send_count, created_at, updated_at, expires_at, last_sent_at"
    };
}
pub(crate) use verification_columns;

/// A resend: the pending verification gets a new code, expiry and number
/// (a uid's number may change between sends).
pub(crate) const RESEND_VERIFICATION: &str = concat!(
    "UPDATE verifications
     SET code_hash = $1, expires_at = $2, send_count = send_count + 1,
         updated_at = $3, last_sent_at = $3,
         phone = $5, masked_to = $6, country = $7
     WHERE id = $4 RETURNING ",
    verification_columns!()
);

/// A new verification; no row when its id exists already (the plan's
/// verification ended since the service looked).
pub(crate) const INSERT_VERIFICATION: &str = "INSERT INTO verifications (id, tenant, subject,
         purpose, uid, phone, masked_to, country, code_hash, status, attempts, max_attempts,
         send_count, created_at, updated_at, expires_at, last_sent_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
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

pub(crate) const INSERT_MESSAGE: &str = "INSERT INTO messages (id, verification_id, tenant,
         route_id, provider, provider_message_id, masked_to, country, status, error, cost,
         currency, latency_ms, resend_of, created_at, sent_at, delivered_at, failed_at,
         updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
         $19)";

/// A usage delta: the day's row is created or added to.
pub(crate) const UPSERT_USAGE: &str = "INSERT INTO usage_daily (tenant, day, route_id, country,
         currency, sent, delivered, failed, verifications_started, verifications_approved,
         cost_micros)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
     ON CONFLICT (tenant, day, route_id, country, currency) DO UPDATE SET
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
             ON CONFLICT (tenant, day, route_id, country, currency) DO UPDATE SET
                 verifications_approved = usage_daily.verifications_approved + 1"
        )
    };
}
pub(crate) use count_approval_sql;
