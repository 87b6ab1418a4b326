//! Bulk fill for the scaling runs on SQLite, PostgreSQL and Redis: pending
//! verifications written straight into the backend (a few SQL statements in
//! one transaction, generating the rows server-side, or pipelined Redis
//! commands), in the layout and encodings otpd's store uses. Through the API
//! they would fill at the send rate, far too slowly for 1M within the run's
//! time budget.
//!
//! Each filled verification looks like one the bench's sends leave behind: a
//! random subject, an id (time-ordered on the SQL stores, as otpd's UUIDv7s
//! are; random on Redis, where order does not matter), a sealed number of the
//! real size under phone key 1, a
//! code hash, `pending` until an hour after it was sent (sends spread over the
//! last ten minutes), its subject's state (current id, last send, send window)
//! and one SMS record, delivered, on route 1 over BridgeXAPI. The subjects are
//! random 32-byte values, never the blind index of a number, so they cannot meet
//! the run's own sends. Not filled: the abuse-limit counters of each send.
//!
//! The SQL and key layout mirror `migrations/` and `src/store/redis.rs`; the
//! driver reads a filled verification back through otpd's API after each fill,
//! so a layout that drifted fails the run instead of measuring garbage.

use std::str::FromStr;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use sqlx::{AssertSqlSafe, Connection, Executor};

use crate::stores::StoreKind;

/// The tenant of the API key otpd creates on first start.
pub const TENANT: &str = "default";
/// otpd's texts for a pending verification and a delivered message, and a
/// delivered message's status rank (`Status`, `DeliveryStatus`), and its
/// Redis store's default key prefix: this package does not depend on otpd
/// (`Cargo.toml` says why), so a test compares them with otpd's.
const PENDING: &str = "pending";
const DELIVERED: &str = "delivered";
const DELIVERED_RANK: i64 = 3;
const REDIS_PREFIX: &str = "otpd";
/// Sealed numbers: key id (4 bytes) ‖ nonce (24) ‖ `+316xxxxxxxx` (12) ‖ tag (16).
const SEALED_PHONE_BYTES: usize = 4 + 24 + 12 + 16;
/// Phone key 1 (derived from the master secret), big endian.
const PHONE_KEY_HEX: &str = "00000001";
const TTL_MS: i64 = 3_600_000;
/// Filled sends are spread over this much time before the fill.
const SPREAD_MS: i64 = 600_000;
/// Delivery report this long after the send.
const DELIVERED_AFTER_MS: i64 = 2_000;
/// `max_attempts` of the bench's policy.
const MAX_ATTEMPTS: u32 = 100;
/// Verifications per pipeline.
const REDIS_CHUNK: u64 = 5_000;

/// A backend to fill: the `store.url` otpd was started with.
pub struct Direct {
    kind: StoreKind,
    url: String,
}

impl Direct {
    pub fn new(kind: StoreKind, url: &str) -> anyhow::Result<Self> {
        if kind == StoreKind::Memory {
            bail!("the memory store lives inside otpd; fill it through otpd-loaded");
        }
        if url.contains("+cluster") {
            bail!("the Redis fill needs one node, not a cluster");
        }
        Ok(Self {
            kind,
            url: url.to_owned(),
        })
    }

    /// Adds `count` pending verifications, numbered from `first` (which keeps
    /// provider message ids distinct across fills). Returns the id of one of them.
    pub async fn fill(&self, first: u64, count: u64) -> anyhow::Result<String> {
        if count == 0 {
            bail!("nothing to fill");
        }
        let now = chrono::Utc::now().timestamp_millis();
        match self.kind {
            StoreKind::Sqlite => fill_sqlite(&self.url, first, count, now).await,
            StoreKind::Postgres => fill_postgres(&self.url, first, count, now).await,
            StoreKind::Redis => fill_redis(&self.url, first, count, now).await,
            StoreKind::Memory => bail!("the memory store cannot be filled directly"),
        }
    }

    /// Pending, unexpired verifications as the backend holds them.
    pub async fn count_pending(&self) -> anyhow::Result<u64> {
        let now = chrono::Utc::now().timestamp_millis();
        let sql = "SELECT COUNT(*) FROM verifications WHERE status = 'pending' AND expires_at > $1";
        let n: i64 = match self.kind {
            StoreKind::Sqlite => {
                let mut conn = sqlite(&self.url).await?;
                sqlx::query_scalar(sql)
                    .bind(now)
                    .fetch_one(&mut conn)
                    .await?
            }
            StoreKind::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                sqlx::query_scalar(sql)
                    .bind(now)
                    .fetch_one(&mut conn)
                    .await?
            }
            StoreKind::Redis => {
                // The purge index: one member per verification until it ends.
                let mut conn = redis_conn(&self.url).await?;
                redis::cmd("ZCOUNT")
                    .arg(format!("{REDIS_PREFIX}:pending"))
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut conn)
                    .await?
            }
            StoreKind::Memory => bail!("the memory store cannot be counted directly"),
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

async fn sqlite(url: &str) -> anyhow::Result<sqlx::SqliteConnection> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        // otpd holds the file open; its own writes wait for the fill's transaction.
        .busy_timeout(std::time::Duration::from_secs(60))
        .foreign_keys(true);
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}

async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).context("redis url")?;
    // One fill call runs for a good part of a second, more on a busy machine.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(120)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// How one SQL backend writes what the shared statements need.
struct Dialect {
    /// An expression for `n` random bytes.
    rand: fn(usize) -> String,
    /// A blob literal of the phone key id.
    key: &'static str,
    /// The last four digits of `n`, zero-padded.
    last4: &'static str,
    /// The binary column type.
    blob: &'static str,
    /// `n` as 12 lowercase hex digits.
    hex12: &'static str,
    /// The secondary indexes of the filled tables: name and definition.
    indexes: &'static str,
}

/// A filled row's id: a UUIDv7 from `n`, as otpd's ids are time-ordered, but
/// dated 1970 so that it never meets one otpd makes (and `variant` keeps
/// verification and message ids apart). Inserted in order, and without
/// generating random text a million times.
fn sequential_uuid(d: &Dialect, variant: u8) -> String {
    format!("'00000000-0000-7000-{variant}000-' || {}", d.hex12)
}

const SQLITE: Dialect = Dialect {
    rand: |n| format!("randomblob({n})"),
    // `||` makes text of blobs; the cast makes it a blob again, bytes intact.
    key: "x'00000001'",
    last4: "substr('000' || (n % 10000), -4, 4)",
    blob: "BLOB",
    hex12: "printf('%012x', n)",
    indexes: "SELECT name, sql FROM sqlite_master
              WHERE type = 'index' AND sql IS NOT NULL
                AND tbl_name IN ('verifications', 'subjects', 'messages')",
};

const POSTGRES: Dialect = Dialect {
    // Pseudo-random bytes without pgcrypto (and far cheaper than random UUIDs):
    // 16 per MD5 of the row's number, a salt and the part's position.
    rand: |n| {
        let joined = (0..n.div_ceil(16))
            .map(|i| format!("md5(n || '/{n}/{i}/' || random())"))
            .collect::<Vec<_>>()
            .join(" || ");
        format!("substring(decode({joined}, 'hex') from 1 for {n})")
    },
    key: "'\\x00000001'::bytea",
    last4: "lpad((n % 10000)::text, 4, '0')",
    blob: "BYTEA",
    hex12: "lpad(to_hex(n), 12, '0')",
    indexes: "SELECT indexname, indexdef FROM pg_indexes
              WHERE schemaname = current_schema()
                AND tablename IN ('verifications', 'subjects', 'messages')
                AND indexname NOT IN (SELECT conname FROM pg_constraint)",
};

/// The inserts both SQL backends run once the temporary table `fill` (`n`,
/// `id`, `mid` (the message id), `subject`, `t` (the send time)) exists.
fn sql_inserts(d: &Dialect) -> [String; 3] {
    let masked = format!("'+*******' || {}", d.last4);
    [
        format!(
            "INSERT INTO verifications (id, tenant, subject, purpose, uid, phone, masked_to,
                 country, code_hash, status, attempts, max_attempts, send_count, created_at,
                 updated_at, expires_at, last_sent_at)
             SELECT id, '{TENANT}', subject, 'login', NULL, CAST({key} || {phone} AS {blob}),
                 {masked},
                 'NL', {code_hash}, '{pending}', 0, {MAX_ATTEMPTS}, 1, t, t, t + {TTL_MS}, t
             FROM fill ORDER BY id",
            key = d.key,
            blob = d.blob,
            phone = (d.rand)(SEALED_PHONE_BYTES - 4),
            code_hash = (d.rand)(32),
            pending = PENDING,
        ),
        format!(
            "INSERT INTO subjects (tenant, subject, current_id, last_sent_at, window_start,
                 window_count)
             SELECT '{TENANT}', subject, id, t, t, 1 FROM fill ORDER BY subject"
        ),
        format!(
            "INSERT INTO messages (id, verification_id, tenant, route_id, provider,
                 provider_message_id, masked_to, country, status, error, cost, currency,
                 latency_ms, resend_of, created_at, sent_at, delivered_at, failed_at, updated_at)
             SELECT mid, id, '{TENANT}', 1, 'bridgexapi', 'BX-fill-' || n, {masked}, 'NL',
                 '{delivered}', NULL, 0.05, NULL, 3, NULL, t, t, t + {DELIVERED_AFTER_MS}, NULL,
                 t + {DELIVERED_AFTER_MS}
             FROM fill ORDER BY mid",
            delivered = DELIVERED,
        ),
    ]
}

/// What a SQL fill runs once `fill` exists: the secondary indexes dropped, the
/// rows inserted, the indexes built again from their definitions (a sort
/// each, instead of a million inserts each). Inside the fill's transaction,
/// so otpd never sees the tables without them.
async fn insert_rows<DB: sqlx::Database>(
    tx: &mut sqlx::Transaction<'_, DB>,
    d: &Dialect,
) -> anyhow::Result<()>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    (String, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let indexes: Vec<(String, String)> = sqlx::query_as(d.indexes).fetch_all(&mut **tx).await?;
    let drops = indexes
        .iter()
        .map(|(name, _)| format!("DROP INDEX \"{name}\""));
    let rebuilds = indexes.iter().map(|(_, definition)| definition.clone());
    for sql in drops.chain(sql_inserts(d)).chain(rebuilds) {
        let first_line = sql.lines().next().unwrap_or_default().trim().to_owned();
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut **tx)
            .await
            .with_context(|| format!("filling: {first_line}"))?;
    }
    Ok(())
}

async fn fill_sqlite(url: &str, first: u64, count: u64, now: i64) -> anyhow::Result<String> {
    let mut conn = sqlite(url).await?;
    // Rows are generated in memory, and the B-trees that grow by a million
    // keys stay cached instead of going back and forth to the file.
    conn.execute("PRAGMA temp_store = MEMORY; PRAGMA cache_size = -2000000")
        .await?;
    // The write lock first (waiting for otpd's writer as long as the busy
    // timeout allows): a transaction that reads the schema and then writes
    // would fail at once if otpd committed in between.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let create = format!(
        "CREATE TEMP TABLE fill AS
         WITH RECURSIVE seq(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM seq WHERE n < {last})
         SELECT n, {id} AS id, {mid} AS mid, randomblob(32) AS subject,
             {now} - (n % {SPREAD_MS}) AS t
         FROM seq",
        last = first + count - 1,
        id = sequential_uuid(&SQLITE, 8),
        mid = sequential_uuid(&SQLITE, 9),
    );
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(&mut *tx)
        .await
        .context("generating the rows")?;
    insert_rows(&mut tx, &SQLITE).await?;
    let sample: String = sqlx::query_scalar("SELECT id FROM fill LIMIT 1")
        .fetch_one(&mut *tx)
        .await?;
    tx.execute("DROP TABLE fill").await?;
    tx.commit().await?;
    // Copies the fill from the write-ahead log into the database now, not at
    // otpd's next commit, which a later measurement would pay for.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
    Ok(sample)
}

async fn fill_postgres(url: &str, first: u64, count: u64, now: i64) -> anyhow::Result<String> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    let create = format!(
        "CREATE TEMP TABLE fill ON COMMIT DROP AS
         SELECT n, {id} AS id, {mid} AS mid,
             {subject} AS subject, {now}::bigint - (n % {SPREAD_MS}) AS t
         FROM generate_series({first}::bigint, {last}::bigint) AS n",
        id = sequential_uuid(&POSTGRES, 8),
        mid = sequential_uuid(&POSTGRES, 9),
        subject = (POSTGRES.rand)(32),
        last = first + count - 1,
    );
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(&mut *tx)
        .await
        .context("generating the rows")?;
    insert_rows(&mut tx, &POSTGRES).await?;
    let sample: String = sqlx::query_scalar("SELECT id FROM fill LIMIT 1")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    // What autovacuum and the checkpointer would do soon after such growth
    // (plans then see the real sizes), done now, not during a later measurement.
    conn.execute("VACUUM (ANALYZE) verifications, subjects, messages")
        .await?;
    // Needs superuser or pg_checkpoint; without them the checkpointer does it later.
    let _ = conn.execute("CHECKPOINT").await;
    Ok(sample)
}

/// `src/store/redis.rs`: ended verifications stay a day; id references outlive
/// records by an hour; messages' backstop TTL is 400 days.
const REDIS_KEEP_ENDED_MS: i64 = 24 * 3_600_000;
const REDIS_REF_MARGIN_MS: i64 = 3_600_000;
const REDIS_KEEP_MESSAGES_MS: i64 = 400 * REDIS_KEEP_ENDED_MS;

/// Writes what `start_send` and `insert_message` write, as plain commands
/// pipelined a chunk at a time (cheaper for the one Redis thread than a Lua
/// loop making the same calls): `P:vref:<id>`, the `P:pending` member,
/// `{P:s:S}:v:<id>` and `{P:s:S}:state`, the message record, its list,
/// `P:mref:`, `P:pm:` and the `P:msgs` member. Ids, subjects, sealed numbers
/// and code hashes are pseudo-random hex of their real sizes, not secrets.
async fn fill_redis(url: &str, first: u64, count: u64, now: i64) -> anyhow::Result<String> {
    let conn = redis_conn(url).await?;
    // Each chunk is built as it is sent, not all up front: a million
    // verifications' commands would take gigabytes.
    let samples = futures::stream::iter((first..first + count).step_by(REDIS_CHUNK as usize))
        .map(|from| {
            let mut conn = conn.clone();
            let numbers = from..(from + REDIS_CHUNK).min(first + count);
            async move {
                let mut random = SplitMix(now as u64 ^ from.rotate_left(32));
                let (pipe, sample) = redis_chunk(numbers, now, &mut random);
                pipe.query_async::<()>(&mut conn).await.map(|()| sample)
            }
        })
        // Two chunks in flight: Redis runs one while the next one's bytes arrive.
        .buffered(2)
        .try_collect::<Vec<String>>()
        .await
        .context("fill commands")?;
    samples.into_iter().next().context("nothing filled")
}

/// One chunk's commands, and its first verification's id.
fn redis_chunk(
    numbers: std::ops::Range<u64>,
    now: i64,
    random: &mut SplitMix,
) -> (redis::Pipeline, String) {
    let p = REDIS_PREFIX;
    let pending = PENDING;
    let delivered = DELIVERED;
    let mut pipe = redis::pipe();
    let mut pending_members = redis::cmd("ZADD");
    pending_members.arg(format!("{p}:pending"));
    let mut message_members = redis::cmd("ZADD");
    message_members.arg(format!("{p}:msgs"));
    let mut sample = None;
    for n in numbers {
        let subject = random.hex(32);
        let vid = random.uuid();
        let mid = random.uuid();
        let phone = format!("{PHONE_KEY_HEX}{}", random.hex(SEALED_PHONE_BYTES - 4));
        let code_hash = random.hex(32);
        let t = now - (n as i64 % SPREAD_MS);
        let expires = t + TTL_MS;
        let record_ttl = expires - now + REDIS_KEEP_ENDED_MS;
        let masked = format!("+*******{:04}", n % 10_000);
        let tag = format!("{{{p}:s:{subject}}}");
        let record = format!("{tag}:v:{vid}");
        let state = format!("{tag}:state");
        set_px(
            &mut pipe,
            format!("{p}:vref:{vid}"),
            &subject,
            record_ttl + REDIS_REF_MARGIN_MS,
        );
        pending_members.arg(expires).arg(format!("{subject}:{vid}"));
        pipe.cmd("HSET")
            .arg(&record)
            .arg(&[
                ("id", vid.as_str()),
                ("tenant", TENANT),
                ("subject", &subject),
                ("purpose", "login"),
                ("phone", &phone),
                ("masked_to", &masked),
                ("status", pending),
                ("attempts", "0"),
                ("country", "NL"),
                ("code_hash", &code_hash),
            ])
            .arg(&[
                ("max_attempts", i64::from(MAX_ATTEMPTS)),
                ("send_count", 1),
                ("created_at", t),
                ("updated_at", t),
                ("expires_at", expires),
                ("last_sent_at", t),
            ])
            .ignore();
        pipe.cmd("PEXPIRE").arg(&record).arg(record_ttl).ignore();
        pipe.cmd("HSET")
            .arg(&state)
            .arg("current")
            .arg(&vid)
            .arg(&[("last_sent", t), ("win_start", t), ("win_count", 1)])
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&state)
            .arg(REDIS_KEEP_ENDED_MS.max(record_ttl))
            .ignore();
        let mtag = format!("{{{p}:m:{vid}}}");
        let message = format!("{mtag}:r:{mid}");
        let list = format!("{mtag}:list");
        let pid = format!("BX-fill-{n}");
        set_px(
            &mut pipe,
            format!("{p}:mref:{mid}"),
            &vid,
            REDIS_KEEP_MESSAGES_MS,
        );
        set_px(
            &mut pipe,
            format!("{p}:pm:bridgexapi:{pid}"),
            &message,
            REDIS_KEEP_MESSAGES_MS,
        );
        message_members.arg(t).arg(format!("{vid}:{mid}"));
        pipe.cmd("HSET")
            .arg(&message)
            .arg(&[
                ("id", mid.as_str()),
                ("verification_id", &vid),
                ("tenant", TENANT),
                ("route_id", "1"),
                ("provider", "bridgexapi"),
                ("masked_to", &masked),
                ("status", delivered),
                ("provider_message_id", &pid),
                ("country", "NL"),
                ("cost", "0.05"),
            ])
            .arg(&[
                ("rank", DELIVERED_RANK),
                ("latency_ms", 3),
                ("created_at", t),
                ("updated_at", t + DELIVERED_AFTER_MS),
                ("sent_at", t),
                ("delivered_at", t + DELIVERED_AFTER_MS),
            ])
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&message)
            .arg(REDIS_KEEP_MESSAGES_MS)
            .ignore();
        pipe.cmd("RPUSH").arg(&list).arg(&mid).ignore();
        pipe.cmd("PEXPIRE")
            .arg(&list)
            .arg(REDIS_KEEP_MESSAGES_MS)
            .ignore();
        sample.get_or_insert(vid);
    }
    pipe.add_command(pending_members).ignore();
    pipe.add_command(message_members).ignore();
    (pipe, sample.unwrap_or_default())
}

/// `SET key value PX ttl`, its reply ignored.
fn set_px(pipe: &mut redis::Pipeline, key: String, value: &str, ttl_ms: i64) {
    pipe.cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(ttl_ms)
        .ignore();
}

/// splitmix64: fill values need only be distinct and of the right size, and a
/// million of them must not cost a million system calls.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn hex(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes * 2);
        while s.len() < bytes * 2 {
            let word = format!("{:016x}", self.next());
            s.push_str(&word[..(bytes * 2 - s.len()).min(16)]);
        }
        s
    }

    fn uuid(&mut self) -> String {
        uuid::Uuid::from_u64_pair(self.next(), self.next()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use otpd::domain::{DeliveryStatus, Status};

    use super::*;

    /// The fill writes otpd's layout without depending on otpd: its texts
    /// must be otpd's.
    #[test]
    fn the_fill_writes_otpds_own_texts() {
        assert_eq!(PENDING, Status::Pending.as_str());
        assert_eq!(DELIVERED, DeliveryStatus::Delivered.as_str());
        assert_eq!(DELIVERED_RANK, i64::from(DeliveryStatus::Delivered.rank()));
        assert_eq!(REDIS_PREFIX, otpd::store::redis::DEFAULT_KEY_PREFIX);
    }
}
