//! SQLite's statements of the hot operations (`sql_hot::HotTx`), on a
//! rusqlite connection: the writes run on the writer thread (`writer`), the
//! reads on the caller's (`readers`). Each statement is a function call, not
//! a round trip to sqlx's connection thread.

use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, ToSql, named_params};
use uuid::Uuid;

use super::SqliteOptions;
use super::checkpoint::WRITER_BACKSTOP_PAGES;
use crate::domain::{MessageRecord, Status, SubjectKey, Verification};
use crate::store::sql_common::{
    COUNTER_READS_PER_STATEMENT, MarkerRow, MessageRow, SubjectRow, SubjectState, VerificationRow,
    Window, counter_amount, counter_slot, counter_total, day_text, id_text, millis, options_text,
    parse_id, parse_status, rate_slot, usage_amount,
};
use crate::store::sql_hot::{
    ADD_TO_COUNTER, CLAIM_MARKER, FIND_CURRENT, HotTx, INSERT_MESSAGE, INSERT_VERIFICATION,
    LIST_MARKERS, RESEND_VERIFICATION, UPDATE_CHECKED, UPDATE_MESSAGE, UPSERT_SUBJECT,
    UPSERT_USAGE, count_approval_sql, message_by_provider_id_sql, verification_columns,
};
use crate::store::{CounterRead, Marker, StoreError, StoreResult, UsageRow};

pub(super) fn map_rusqlite(err: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match err {
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_)
        | E::InvalidColumnType(..)
        | E::QueryReturnedNoRows => StoreError::Corrupt(err.to_string()),
        // As `map_sqlx`: busy, I/O and constraint errors are no verdict on
        // the caller's data, so callers answer 503.
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The writer's own connection to the file (which `SqliteStore::open_with`
/// has created and migrated), with the same durability settings as sqlx's.
pub(super) fn open(path: &Path, options: &SqliteOptions) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(map_rusqlite)?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(map_rusqlite)?;
    let synchronous = if options.synchronous_full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = {};",
        WRITER_BACKSTOP_PAGES
    ))
    .map_err(map_rusqlite)?;
    // Every statement here, and room to spare: none is ever prepared twice.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A connection for `Readers`: like sqlx's readers, `query_only`, so that an
/// accidental write is an error instead of a second writer.
pub(super) fn open_reader(path: &Path, options: &SqliteOptions) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(map_rusqlite)?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(map_rusqlite)?;
    conn.execute_batch("PRAGMA query_only = ON")
        .map_err(map_rusqlite)?;
    Ok(conn)
}

/// The writer's (or a reader's) connection, as `HotTx`. Its statements are
/// plain calls, so each future it returns is ready when first polled.
pub(super) struct Direct<'c>(pub(super) &'c Connection);

impl HotTx for Direct<'_> {
    async fn find_current(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        let params = named_params! {
            "$1": tenant,
            "$2": subject.0.as_slice(),
            "$3": millis(now),
        };
        let row = query_row(self.0, FIND_CURRENT, params, |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        row.map(|(id, status)| Ok((parse_id(&id)?, parse_status(&status)?)))
            .transpose()
    }

    async fn list_markers(
        &mut self,
        namespace: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Marker>> {
        self.0
            .prepare_cached(LIST_MARKERS)
            .and_then(|mut s| {
                s.query_map(named_params! { "$1": namespace, "$2": millis(now) }, |r| {
                    Ok(MarkerRow {
                        name: r.get(0)?,
                        value: r.get(1)?,
                        expires_at: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(map_rusqlite)?
            .into_iter()
            .map(Marker::try_from)
            .collect()
    }

    async fn subject_state(
        &mut self,
        tenant: &str,
        subject: &SubjectKey,
    ) -> StoreResult<SubjectState> {
        let select = "SELECT current_id, last_sent_at, window_start, window_count
             FROM subjects WHERE tenant = $1 AND subject = $2";
        let params = named_params! { "$1": tenant, "$2": subject.0.as_slice() };
        let row = query_row(self.0, select, params, |r| {
            Ok(SubjectRow {
                current_id: r.get(0)?,
                last_sent_at: r.get(1)?,
                window_start: r.get(2)?,
                window_count: r.get(3)?,
            })
        })?;
        match row {
            Some(row) => row.try_into(),
            None => Ok(SubjectState {
                current: None,
                last_sent_at: None,
                window_start: None,
                window_count: 0,
            }),
        }
    }

    async fn verification(&mut self, id: Uuid) -> StoreResult<Option<Verification>> {
        let select = concat!(
            "SELECT ",
            verification_columns!(),
            " FROM verifications WHERE id = $1"
        );
        query_row(
            self.0,
            select,
            named_params! { "$1": id_text(id) },
            verification_row,
        )?
        .map(Verification::try_from)
        .transpose()
    }

    async fn resend(
        &mut self,
        planned: &Verification,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Verification> {
        let params = named_params! {
            "$1": planned.code_hash.as_ref().map(|h| h.as_slice()),
            "$2": millis(planned.expires_at),
            "$3": millis(now),
            "$4": id_text(id),
            "$5": planned.phone.to_bytes(),
            "$6": planned.masked_to,
            "$7": planned.country,
            "$8": options_text(planned),
        };
        // Read in this same write, so it is there.
        query_row(self.0, RESEND_VERIFICATION, params, verification_row)?
            .ok_or_else(|| StoreError::Corrupt("a resent verification vanished".into()))?
            .try_into()
    }

    async fn insert_verification(&mut self, planned: &Verification) -> StoreResult<bool> {
        let params = named_params! {
            "$1": id_text(planned.id),
            "$2": planned.tenant,
            "$3": planned.subject.0.as_slice(),
            "$4": planned.purpose,
            "$5": planned.uid,
            "$6": planned.phone.to_bytes(),
            "$7": planned.masked_to,
            "$8": planned.country,
            "$9": planned.code_hash.as_ref().map(|h| h.as_slice()),
            "$10": planned.status.as_str(),
            "$11": i64::from(planned.attempts),
            "$12": i64::from(planned.max_attempts),
            "$13": i64::from(planned.send_count),
            "$14": millis(planned.created_at),
            "$15": millis(planned.updated_at),
            "$16": millis(planned.expires_at),
            "$17": millis(planned.last_sent_at),
            "$18": options_text(planned),
        };
        Ok(execute(self.0, INSERT_VERIFICATION, params)? > 0)
    }

    async fn upsert_subject(
        &mut self,
        planned: &Verification,
        window: &Window,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let params = named_params! {
            "$1": planned.tenant,
            "$2": planned.subject.0.as_slice(),
            "$3": id_text(planned.id),
            "$4": millis(now),
            "$5": millis(window.start),
            "$6": i64::from(window.count + 1),
        };
        execute(self.0, UPSERT_SUBJECT, params)?;
        Ok(())
    }

    /// The one SELECT of `counter_reads_sql`.
    async fn counter_totals(&mut self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
        let mut statement = self
            .0
            .prepare_cached(&counter_reads_sql(reads.len()))
            .map_err(map_rusqlite)?;
        for (i, r) in reads.iter().enumerate() {
            let (slot, _) = rate_slot(r.window_seconds, r.at);
            // `$3i+1..$3i+3`: parameter indexes, as SQLite numbers `$N` in order.
            statement
                .raw_bind_parameter(3 * i + 1, r.key)
                .and_then(|()| statement.raw_bind_parameter(3 * i + 2, i64::from(r.window_seconds)))
                .and_then(|()| statement.raw_bind_parameter(3 * i + 3, slot))
                .map_err(map_rusqlite)?;
        }
        let mut rows = statement.raw_query();
        let mut totals = Vec::with_capacity(reads.len());
        while let Some(row) = rows.next().map_err(map_rusqlite)? {
            totals.push(counter_total(row.get(0).map_err(map_rusqlite)?));
        }
        Ok(totals)
    }

    async fn save_checked(&mut self, v: &Verification) -> StoreResult<()> {
        let params = named_params! {
            "$1": v.status.as_str(),
            "$2": v.code_hash.as_ref().map(|h| h.as_slice()),
            "$3": i64::from(v.attempts),
            "$4": millis(v.updated_at),
            "$5": id_text(v.id),
        };
        execute(self.0, UPDATE_CHECKED, params)?;
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
        let params = named_params! {
            "$1": key,
            "$2": i64::from(window_seconds),
            "$3": slot,
            "$4": keep_until,
            "$5": counter_amount(amount),
        };
        // An upsert returns its row, whether it inserted or added.
        let total = query_row(self.0, ADD_TO_COUNTER, params, |r| r.get::<_, i64>(0))?
            .ok_or_else(|| StoreError::Corrupt("a counter upsert returned no row".into()))?;
        Ok(counter_total(Some(total)))
    }

    async fn count_approval(&mut self, id: Uuid) -> StoreResult<()> {
        let sql = count_approval_sql!(
            day_of_millis: "date(created_at / 86400000 * 86400, 'unixepoch')",
            insertion_order: "rowid",
        );
        execute(self.0, sql, named_params! { "$1": id_text(id) })?;
        Ok(())
    }

    async fn insert_message(&mut self, m: &MessageRecord) -> StoreResult<()> {
        execute(
            self.0,
            INSERT_MESSAGE,
            named_params! {
                "$1": id_text(m.id),
                "$2": id_text(m.verification_id),
                "$3": m.tenant,
                "$4": i64::from(m.route_id),
                "$5": m.provider,
                "$6": m.provider_message_id,
                "$7": m.masked_to,
                "$8": m.country,
                "$9": m.status.as_str(),
                "$10": m.error,
                "$11": m.cost,
                "$12": m.currency,
                "$13": i64::from(m.latency_ms),
                "$14": m.resend_of.map(id_text),
                "$15": millis(m.created_at),
                "$16": m.sent_at.map(millis),
                "$17": m.delivered_at.map(millis),
                "$18": m.failed_at.map(millis),
                "$19": millis(m.updated_at),
            },
        )?;
        Ok(())
    }

    async fn message_by_provider_id(
        &mut self,
        provider: &str,
        provider_message_id: &str,
    ) -> StoreResult<Option<MessageRecord>> {
        let select = message_by_provider_id_sql!("rowid DESC LIMIT 1");
        query_row(
            self.0,
            select,
            named_params! { "$1": provider, "$2": provider_message_id },
            message_row,
        )?
        .map(MessageRecord::try_from)
        .transpose()
    }

    async fn save_message(&mut self, m: &MessageRecord) -> StoreResult<()> {
        execute(
            self.0,
            UPDATE_MESSAGE,
            named_params! {
                "$1": m.status.as_str(),
                "$2": m.error,
                "$3": m.cost,
                "$4": m.currency,
                "$5": millis(m.updated_at),
                "$6": m.sent_at.map(millis),
                "$7": m.delivered_at.map(millis),
                "$8": m.failed_at.map(millis),
                "$9": id_text(m.id),
            },
        )?;
        Ok(())
    }

    async fn upsert_usage(&mut self, d: &UsageRow) -> StoreResult<()> {
        execute(
            self.0,
            UPSERT_USAGE,
            named_params! {
                "$1": d.tenant,
                "$2": day_text(d.day),
                "$3": i64::from(d.route_id),
                "$4": d.country.as_deref().unwrap_or_default(),
                "$5": d.currency.as_deref().unwrap_or_default(),
                "$6": usage_amount(d.sent),
                "$7": usage_amount(d.delivered),
                "$8": usage_amount(d.failed),
                "$9": usage_amount(d.verifications_started),
                "$10": usage_amount(d.verifications_approved),
                "$11": d.cost_micros,
            },
        )?;
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
        let params = named_params! {
            "$1": namespace,
            "$2": name,
            "$3": holder,
            "$4": millis(expires_at),
            "$5": millis(now),
        };
        let claimed = self
            .0
            .prepare_cached(CLAIM_MARKER)
            .and_then(|mut s| s.query_row(params, |r| r.get::<_, i64>(0)).optional())
            .map_err(map_rusqlite)?;
        Ok(claimed.is_some())
    }
}

/// A row of `verification_columns!`, by position.
fn verification_row(r: &Row<'_>) -> rusqlite::Result<VerificationRow> {
    Ok(VerificationRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        subject: r.get(2)?,
        purpose: r.get(3)?,
        uid: r.get(4)?,
        phone: r.get(5)?,
        masked_to: r.get(6)?,
        country: r.get(7)?,
        code_hash: r.get(8)?,
        status: r.get(9)?,
        attempts: r.get(10)?,
        max_attempts: r.get(11)?,
        send_count: r.get(12)?,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        expires_at: r.get(15)?,
        last_sent_at: r.get(16)?,
        send_options: r.get(17)?,
    })
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: r.get(0)?,
        verification_id: r.get(1)?,
        tenant: r.get(2)?,
        route_id: r.get(3)?,
        provider: r.get(4)?,
        provider_message_id: r.get(5)?,
        masked_to: r.get(6)?,
        country: r.get(7)?,
        status: r.get(8)?,
        error: r.get(9)?,
        cost: r.get(10)?,
        currency: r.get(11)?,
        latency_ms: r.get(12)?,
        resend_of: r.get(13)?,
        created_at: r.get(14)?,
        sent_at: r.get(15)?,
        delivered_at: r.get(16)?,
        failed_at: r.get(17)?,
        updated_at: r.get(18)?,
    })
}

/// Runs `sql` (prepared once per connection) with `params`; the rows changed.
fn execute(conn: &Connection, sql: &str, params: &[(&str, &dyn ToSql)]) -> StoreResult<usize> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(map_rusqlite)
}

/// The first row of `sql` with `params`, as `read` reads it, if there is one.
fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: &[(&str, &dyn ToSql)],
    read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Option<T>> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.query_row(params, read).optional())
        .map_err(map_rusqlite)
}

/// The one SELECT of `read_counters` for `n` counters: each binds its key,
/// window length and slot (`$3i+1..$3i+3`), and gets its total (or NULL) back
/// in order. Built once per `n` up to `COUNTER_READS_PER_STATEMENT` (every
/// send reads its counters with one of these): callers chunk their reads to
/// that size.
fn counter_reads_sql(n: usize) -> Cow<'static, str> {
    static BUILT: [OnceLock<String>; COUNTER_READS_PER_STATEMENT + 1] =
        [const { OnceLock::new() }; COUNTER_READS_PER_STATEMENT + 1];
    match BUILT.get(n) {
        Some(sql) => Cow::Borrowed(sql.get_or_init(|| build_counter_reads_sql(n))),
        None => Cow::Owned(build_counter_reads_sql(n)),
    }
}

fn build_counter_reads_sql(n: usize) -> String {
    let wanted: Vec<String> = (0..n)
        .map(|i| {
            let p = 3 * i;
            format!(
                "({i}, CAST(${} AS TEXT), CAST(${} AS BIGINT), CAST(${} AS BIGINT))",
                p + 1,
                p + 2,
                p + 3
            )
        })
        .collect();
    format!(
        "WITH wanted (i, key, window_seconds, slot) AS (VALUES {})
         SELECT c.total FROM wanted w
         LEFT JOIN counters c
             ON c.key = w.key AND c.window_seconds = w.window_seconds AND c.slot = w.slot
         ORDER BY w.i",
        wanted.join(", ")
    )
}
