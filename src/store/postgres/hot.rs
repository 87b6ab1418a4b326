//! PostgreSQL's statements of the hot operations (`sql_hot::HotTx`), through
//! sqlx on a pooled connection (inside the operation's transaction, for a
//! write); SQLite runs the same ones directly instead (`sqlite::hot`).

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::{Query, QueryScalar};
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use super::PostgresStore;
use crate::domain::{MessageRecord, Status, SubjectKey, Verification};
use crate::store::sql_common::{
    MarkerRow, MessageRow, SubjectState, VerificationRow, Window, counter_amount, counter_slot,
    counter_total, day_text, id_text, map_sqlx, millis, options_text, parse_id, parse_status,
    rate_slot, usage_amount,
};
use crate::store::sql_hot::{
    ADD_TO_COUNTER, CLAIM_MARKER, FIND_CURRENT, HotTx, INSERT_MESSAGE, INSERT_VERIFICATION,
    LIST_MARKERS, RESEND_VERIFICATION, UPDATE_CHECKED, UPDATE_MESSAGE, UPSERT_SUBJECT,
    UPSERT_USAGE, count_approval_sql, message_by_provider_id_sql,
};
use crate::store::{CounterAdd, CounterRead, GuessBudget, Marker, StoreResult, UsageRow};

impl HotTx for PgConnection {
    async fn find_current(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        let row: Option<(String, String)> = sqlx::query_as(FIND_CURRENT)
            .bind(tenant)
            .bind(subject.0.as_slice())
            .bind(millis(now))
            .fetch_optional(&mut *self)
            .await
            .map_err(map_sqlx)?;
        row.map(|(id, status)| Ok((parse_id(&id)?, parse_status(&status)?)))
            .transpose()
    }

    async fn list_markers(
        &mut self,
        namespace: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Marker>> {
        sqlx::query_as::<_, MarkerRow>(LIST_MARKERS)
            .bind(namespace)
            .bind(millis(now))
            .fetch_all(&mut *self)
            .await
            .map_err(map_sqlx)?
            .into_iter()
            .map(Marker::try_from)
            .collect()
    }

    async fn subject_state(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
    ) -> StoreResult<SubjectState> {
        PostgresStore::subject_state(self, tenant, subject).await
    }

    async fn verification(&mut self, id: Uuid) -> StoreResult<Option<Verification>> {
        sqlx::query_as::<_, VerificationRow>("SELECT * FROM verifications WHERE id = $1 FOR UPDATE")
            .bind(id_text(id))
            .fetch_optional(&mut *self)
            .await
            .map_err(map_sqlx)?
            .map(Verification::try_from)
            .transpose()
    }

    async fn resend(
        &mut self,
        planned: &Verification,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Verification> {
        sqlx::query_as::<_, VerificationRow>(RESEND_VERIFICATION)
            .bind(planned.code_hash.as_ref().map(|h| h.as_slice()))
            .bind(millis(planned.expires_at))
            .bind(millis(now))
            .bind(id_text(id))
            .bind(planned.phone.to_bytes())
            .bind(&planned.masked_to)
            .bind(planned.country.as_deref())
            .bind(options_text(planned))
            .fetch_one(&mut *self)
            .await
            .map_err(map_sqlx)?
            .try_into()
    }

    async fn insert_verification(&mut self, planned: &Verification) -> StoreResult<bool> {
        let inserted = sqlx::query(INSERT_VERIFICATION)
            .bind(id_text(planned.id))
            .bind(&planned.tenant)
            .bind(planned.subject.0.as_slice())
            .bind(&planned.purpose)
            .bind(&planned.uid)
            .bind(planned.phone.to_bytes())
            .bind(&planned.masked_to)
            .bind(&planned.country)
            .bind(planned.code_hash.as_ref().map(|h| h.as_slice()))
            .bind(planned.status.as_str())
            .bind(i64::from(planned.attempts))
            .bind(i64::from(planned.max_attempts))
            .bind(i64::from(planned.send_count))
            .bind(millis(planned.created_at))
            .bind(millis(planned.updated_at))
            .bind(millis(planned.expires_at))
            .bind(millis(planned.last_sent_at))
            .bind(options_text(planned))
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(inserted.rows_affected() > 0)
    }

    async fn upsert_subject(
        &mut self,
        planned: &Verification,
        window: &Window,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(UPSERT_SUBJECT)
            .bind(&planned.tenant)
            .bind(planned.subject.0.as_slice())
            .bind(id_text(planned.id))
            .bind(millis(now))
            .bind(millis(window.start))
            .bind(i64::from(window.count + 1))
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn counter_totals(&mut self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
        let found = counter_reads_query(reads)
            .fetch_one(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(found.into_iter().map(counter_total).collect())
    }

    async fn save_checked(&mut self, v: &Verification) -> StoreResult<()> {
        bind_checked(sqlx::query(UPDATE_CHECKED), v)
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    /// One round trip: the update rides in a `WITH` of the counter's upsert
    /// (PostgreSQL runs a data-modifying `WITH` whether or not the rest reads it).
    async fn save_wrong_guess(
        &mut self,
        v: &Verification,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        static SQL: OnceLock<String> = OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "WITH checked AS ({UPDATE_CHECKED}) {}",
                shift_parameters(ADD_TO_COUNTER, CHECKED_PARAMETERS)
            )
        });
        let (slot, keep_until) = counter_slot(GuessBudget::WINDOW_SECONDS, now);
        bind_checked(sqlx::query(sql.as_str()), v)
            .bind(key)
            .bind(i64::from(GuessBudget::WINDOW_SECONDS))
            .bind(slot)
            .bind(keep_until)
            .bind(counter_amount(1))
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn add_to_counter(
        &mut self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let (slot, keep_until) = counter_slot(window_seconds, now);
        let total: i64 = sqlx::query_scalar(ADD_TO_COUNTER)
            .bind(key)
            .bind(i64::from(window_seconds))
            .bind(slot)
            .bind(keep_until)
            .bind(counter_amount(amount))
            .fetch_one(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(counter_total(Some(total)))
    }

    /// One round trip: `otpd_add_counters` (migration 0005) makes the adds in
    /// order on the server.
    async fn add_counters(
        &mut self,
        adds: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<u64>> {
        if adds.is_empty() {
            return Ok(Vec::new());
        }
        let n = adds.len();
        let (mut keys, mut windows, mut slots, mut keeps, mut amounts, mut ceilings) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for a in adds {
            let (slot, keep_until) = counter_slot(a.window_seconds, now);
            keys.push(a.key.as_str());
            windows.push(i64::from(a.window_seconds));
            slots.push(slot);
            keeps.push(keep_until);
            amounts.push(counter_amount(a.amount));
            ceilings.push(a.ceiling.map(counter_amount));
        }
        let totals: Vec<i64> =
            sqlx::query_scalar("SELECT otpd_add_counters($1, $2, $3, $4, $5, $6)")
                .bind(keys)
                .bind(windows)
                .bind(slots)
                .bind(keeps)
                .bind(amounts)
                .bind(ceilings)
                .fetch_one(&mut *self)
                .await
                .map_err(map_sqlx)?;
        Ok(totals.into_iter().map(|t| counter_total(Some(t))).collect())
    }

    async fn count_approval(&mut self, id: Uuid) -> StoreResult<()> {
        sqlx::query(COUNT_APPROVAL)
            .bind(id_text(id))
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    /// One round trip: the update rides in a `WITH` of the approval's count,
    /// whose verification id is the update's (`$5`).
    async fn save_approval(&mut self, v: &Verification) -> StoreResult<()> {
        static SQL: OnceLock<String> = OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "WITH checked AS ({UPDATE_CHECKED}) {}",
                shift_parameters(COUNT_APPROVAL, CHECKED_PARAMETERS - 1)
            )
        });
        bind_checked(sqlx::query(sql.as_str()), v)
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn insert_message(&mut self, m: &MessageRecord) -> StoreResult<()> {
        bind_message(sqlx::query(INSERT_MESSAGE), m)
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn upsert_usage(&mut self, d: &UsageRow) -> StoreResult<()> {
        bind_usage(sqlx::query(UPSERT_USAGE), d)
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn claim_marker(
        &mut self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let claimed: Option<i64> = sqlx::query_scalar(CLAIM_MARKER)
            .bind(namespace)
            .bind(name)
            .bind(holder)
            .bind(millis(expires_at))
            .bind(millis(now))
            .fetch_optional(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(claimed.is_some())
    }

    async fn message_by_provider_id(
        &mut self,
        provider: &str,
        provider_message_id: &str,
    ) -> StoreResult<Option<MessageRecord>> {
        let select = message_by_provider_id_sql!("seq DESC LIMIT 1 FOR UPDATE");
        sqlx::query_as::<_, MessageRow>(select)
            .bind(provider)
            .bind(provider_message_id)
            .fetch_optional(&mut *self)
            .await
            .map_err(map_sqlx)?
            .map(MessageRecord::try_from)
            .transpose()
    }

    async fn save_message(&mut self, m: &MessageRecord) -> StoreResult<()> {
        sqlx::query(UPDATE_MESSAGE)
            .bind(m.status.as_str())
            .bind(&m.error)
            .bind(m.cost)
            .bind(&m.currency)
            .bind(millis(m.updated_at))
            .bind(m.sent_at.map(millis))
            .bind(m.delivered_at.map(millis))
            .bind(m.failed_at.map(millis))
            .bind(id_text(m.id))
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    /// One statement (a data-modifying `WITH`), so one round trip and no
    /// transaction around it.
    async fn insert_message_with_usage(
        &mut self,
        m: &MessageRecord,
        usage: Option<&UsageRow>,
    ) -> StoreResult<()> {
        let Some(usage) = usage else {
            return self.insert_message(m).await;
        };
        static SQL: OnceLock<String> = OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "WITH message AS ({INSERT_MESSAGE}) {}",
                shift_parameters(UPSERT_USAGE, MESSAGE_PARAMETERS)
            )
        });
        bind_usage(bind_message(sqlx::query(sql.as_str()), m), usage)
            .execute(&mut *self)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// `count_approval_sql!` in PostgreSQL's terms.
const COUNT_APPROVAL: &str = count_approval_sql!(
    day_of_millis: "to_char(DATE '1970-01-01' + (created_at / 86400000)::int, 'YYYY-MM-DD')",
    insertion_order: "seq",
);

/// How many parameters `UPDATE_CHECKED` takes (`bind_checked` binds them).
const CHECKED_PARAMETERS: usize = 5;

/// `UPDATE_CHECKED`'s parameters: what the check decided for `v`.
fn bind_checked<'q>(query: PgQuery<'q>, v: &'q Verification) -> PgQuery<'q> {
    query
        .bind(v.status.as_str())
        .bind(v.code_hash.as_ref().map(|h| h.as_slice()))
        .bind(i64::from(v.attempts))
        .bind(millis(v.updated_at))
        .bind(id_text(v.id))
}

/// How many parameters `INSERT_MESSAGE` takes (`bind_message` binds them).
const MESSAGE_PARAMETERS: usize = 19;

/// `INSERT_MESSAGE`'s parameters.
fn bind_message<'q>(query: PgQuery<'q>, m: &'q MessageRecord) -> PgQuery<'q> {
    query
        .bind(id_text(m.id))
        .bind(id_text(m.verification_id))
        .bind(&m.tenant)
        .bind(i64::from(m.route_id))
        .bind(&m.provider)
        .bind(&m.provider_message_id)
        .bind(&m.masked_to)
        .bind(&m.country)
        .bind(m.status.as_str())
        .bind(&m.error)
        .bind(m.cost)
        .bind(&m.currency)
        .bind(i64::from(m.latency_ms))
        .bind(m.resend_of.map(id_text))
        .bind(millis(m.created_at))
        .bind(m.sent_at.map(millis))
        .bind(m.delivered_at.map(millis))
        .bind(m.failed_at.map(millis))
        .bind(millis(m.updated_at))
}

/// `UPSERT_USAGE`'s parameters, after those already bound.
fn bind_usage<'q>(query: PgQuery<'q>, d: &'q UsageRow) -> PgQuery<'q> {
    query
        .bind(&d.tenant)
        .bind(day_text(d.day))
        .bind(i64::from(d.route_id))
        .bind(d.country.as_deref().unwrap_or_default())
        .bind(d.currency.as_deref().unwrap_or_default())
        .bind(usage_amount(d.sent))
        .bind(usage_amount(d.delivered))
        .bind(usage_amount(d.failed))
        .bind(usage_amount(d.verifications_started))
        .bind(usage_amount(d.verifications_approved))
        .bind(d.cost_micros)
}

/// `sql` with each parameter `$N` renumbered `$(N + by)`, to follow another
/// statement's in one.
fn shift_parameters(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// `otpd_read_counters` of `reads` (the migration says why a function).
fn counter_reads_query<'q>(
    reads: &'q [CounterRead<'q>],
) -> QueryScalar<'q, Postgres, Vec<Option<i64>>, PgArguments> {
    let (mut keys, mut windows, mut slots) = (
        Vec::with_capacity(reads.len()),
        Vec::with_capacity(reads.len()),
        Vec::with_capacity(reads.len()),
    );
    for r in reads {
        keys.push(r.key);
        windows.push(i64::from(r.window_seconds));
        slots.push(rate_slot(r.window_seconds, r.at).0);
    }
    sqlx::query_scalar("SELECT otpd_read_counters($1, $2, $3)")
        .bind(keys)
        .bind(windows)
        .bind(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_shift_past_another_statement() {
        assert_eq!(
            shift_parameters("VALUES ($1, $2, $10) -- $ alone, $x", 19),
            "VALUES ($20, $21, $29) -- $ alone, $x"
        );
        let combined = shift_parameters(UPSERT_USAGE, MESSAGE_PARAMETERS);
        assert!(combined.contains("($20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)"));
        assert!(INSERT_MESSAGE.contains(&format!("${MESSAGE_PARAMETERS})")));
    }
}
