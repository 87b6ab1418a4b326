//! Redis store: one Redis/Valkey node or a Redis Cluster, shared by any number of
//! otpd instances. Every operation that decides something is one Lua script over
//! keys that share a hash tag, so it is atomic on one node and can never cross
//! slots on a cluster.
//!
//! Round trips are what a request costs Redis, so on a single node (where
//! slots do not matter) the scripts also take the steps that live in other
//! slots: following an id reference, writing references and indexes, a batch
//! of counters. A cluster makes those steps separately, as described below.
//!
//! URLs:
//! - `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS) — one node.
//! - `redis+cluster://[user:pass@]host1:port1,host2:port2,…` (`rediss+cluster://`
//!   for TLS) — a Redis Cluster, discovered from any of the listed nodes. A path
//!   or query applies to every node.
//!
//! TLS verifies the server against the system's roots (`SSL_CERT_FILE` names
//! another bundle). Needs Redis ≥ 6.2 or Valkey (`ZADD … GT`, Lua's `bit`
//! library). A verification survives a Redis restart only if Redis persists
//! (`appendonly yes`).
//!
//! Key layout (`P` is the key prefix, default `otpd`; `S` the subject key in hex):
//! - `{P:s:S}:state` — the subject's current verification id, last send, send
//!   window; `{P:s:S}:v:<id>` — a verification. One tag, so one slot, for every
//!   key a send, check, cancel or abort touches.
//! - `P:vref:<id>` → `S`: written before the creating script runs (on one node,
//!   by that script, first) and outliving the record, so reads by id find the
//!   slot (read ref, then script the record; one node's scripts follow it).
//! - `P:pending` — sorted set of `S:<id>` by expiry: what the purge walks and
//!   `count_pending` counts. Maintained next to the deciding scripts (it lives in
//!   another slot); a missed update only delays a purge, never changes a decision.
//! - `{P:m:<verification id>}:list|:r:<message id>` — a verification's messages;
//!   `P:mref:<message id>` and `P:pm:<provider>:<provider message id>` find them.
//!   `P:msgs` (every message) and `P:unfin:<provider>` (those awaiting a final
//!   status) are sorted sets of `<verification id>:<message id>` by creation time:
//!   what retention and the delivery-report poller walk. Like `P:pending` they
//!   live in their own slots and are kept up next to the scripts; entries whose
//!   record is gone or final are dropped as they are read.
//! - `{P:u:<tenant hex>}:<YYYY-MM-DD>` — a tenant's usage that day, a hash of
//!   `<route>|<country>|<currency>|<counter>` → total.
//! - `{P:i:<tenant hex>}:…` — one tenant's sandbox inbox; `{P:keys}:…` — API keys;
//!   `P:rl:<key>:<window>` — rate-limit counters; `P:ctr:<key>:<length>:<window>`
//!   — additive counters.
//! - `{P:mk:<namespace>}:v` (hash name → value) and `…:x` (sorted set name →
//!   expiry) — one namespace's markers, listed without SCAN. Expired markers are
//!   pruned as the namespace is listed; both keys expire a day after the
//!   namespace's last marker does (by the expiry times given, which are wall clock).
//!
//! Native TTLs do the forgetting: an ended verification stays readable for a day,
//! cooldown and window state expire after the window, inbox entries when their
//! code would. The purge only ends verifications whose code expired (erasing
//! the hash), as the other backends do.

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::io::tcp::TcpSettings;
use ::redis::{
    Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Script,
    Value,
};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use futures::StreamExt;
use uuid::Uuid;

use super::{
    ApprovalCounts, CancelOutcome, CheckOutcome, CodeHasher, CodeReplacement, CounterAdd,
    CounterRead, CurrentCheck, GuessBudget, InboxEntry, Marker, MessageTransition, MessageUpdate,
    RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store, StoreError, StoreResult,
    UsageRow, count_approval_apart, find_then_check, is_unfinished, seconds_until,
    start_then_count,
};
use crate::crypto::{SealedPhone, to_hex};
use crate::domain::limits::WindowCounts;
use crate::domain::{
    ApiKeyRecord, DeliveryStatus, MessageRecord, SendOptions, Status, SubjectKey, Verification,
};

pub const DEFAULT_KEY_PREFIX: &str = "otpd";

const HOUR_MS: i64 = 3_600_000;
/// Ended verifications stay readable this long, as in the other backends.
const KEEP_ENDED_MS: i64 = 24 * HOUR_MS;
/// Id references outlive their records by this much, so a record is never unreachable.
const REF_MARGIN_MS: i64 = HOUR_MS;
/// Retention (`purge_messages`) deletes delivery attempts; this native TTL is
/// only the backstop should purges stop running, beyond any configurable retention.
const KEEP_MESSAGES_MS: i64 = 400 * KEEP_ENDED_MS;
/// How many days one usage read script covers.
const USAGE_DAYS_PER_SCRIPT: usize = 100;
const INBOX_CAPACITY: u32 = 10_000;
/// A marker namespace's keys outlive its last marker by this much.
const KEEP_MARKERS_MS: i64 = 24 * HOUR_MS;

const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(2);
const RESPONSE_TIMEOUT: StdDuration = StdDuration::from_secs(2);
/// Whole-operation bound (reconnects and several round trips included), so a dead
/// or black-holed Redis turns into `Unavailable` instead of a hung request.
const OPERATION_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// Unacknowledged data this old means the peer is gone: drop the connection so
/// that the next command reconnects.
const DEAD_PEER_TIMEOUT: StdDuration = StdDuration::from_secs(10);
const CONNECT_BUDGET: StdDuration = StdDuration::from_secs(10);
/// How many purge scripts run at once.
const PURGE_CONCURRENCY: usize = 32;
/// A cluster command a node refused (a slot moved, a failover) is sent again
/// this many times, after 20, 40, 80 ms.
const CLUSTER_REFUSAL_RETRIES: u32 = 3;

/// Runs a cluster command, and again only when a node refused it unrun.
///
/// The cluster client's own retries (off: `retries(0)`) also resend after a
/// timeout or a dropped connection, when the script may already have run: a
/// check run twice takes two attempts, or answers a right code "not found"
/// because its first run approved it. Those errors end the command here (the
/// caller answers 503); a refusal (MOVED, ASK, TRYAGAIN, CLUSTERDOWN,
/// MASTERDOWN, LOADING, READONLY) guarantees the command did not run, and the
/// client has started refreshing its slot map by the time it is resent.
async fn retry_refusals<F, Fut>(mut send: F) -> RedisResult<Value>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<Value>>,
{
    let mut retries = 0;
    loop {
        match send().await {
            Err(e) if retries < CLUSTER_REFUSAL_RETRIES && refused_unrun(&e) => {
                retries += 1;
                tokio::time::sleep(StdDuration::from_millis(10 << retries)).await;
            }
            answer => return answer,
        }
    }
}

/// Whether a cluster error says the command never ran.
fn refused_unrun(e: &RedisError) -> bool {
    use ::redis::ServerErrorKind as Refusal;
    matches!(
        e.kind(),
        ErrorKind::Server(
            Refusal::Moved
                | Refusal::Ask
                | Refusal::TryAgain
                | Refusal::ClusterDown
                | Refusal::MasterDown
                | Refusal::BusyLoading
                | Refusal::ReadOnly
        ) | ErrorKind::ClusterConnectionNotFound
    )
}

/// One node behind a self-reconnecting manager, or a cluster (which reconnects
/// and follows slot moves by itself).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                let c = c.clone();
                Box::pin(retry_refusals(move || {
                    let mut c = c.clone();
                    async move { c.req_packed_command(cmd).await }
                }))
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        let kind = match self.conn {
            Conn::Node(_) => "node",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Connects with the default key prefix (`otpd`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with_prefix(url, DEFAULT_KEY_PREFIX).await
    }

    /// Connects and keeps every key under `key_prefix`, so several deployments
    /// (or tests) can share one Redis.
    pub async fn connect_with_prefix(url: &str, key_prefix: &str) -> StoreResult<Self> {
        if key_prefix.is_empty()
            || key_prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(StoreError::Unavailable(
                "redis key prefix must be non-empty, without braces or whitespace".into(),
            ));
        }
        let conn = tokio::time::timeout(CONNECT_BUDGET, open(url))
            .await
            .map_err(|_| StoreError::Unavailable("redis did not answer in time".into()))??;
        Ok(Self {
            conn,
            keys: Keys {
                prefix: key_prefix.to_owned(),
            },
            scripts: Scripts::new(),
        })
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A hash's fields and values, flattened; `None` when the key does not exist.
    async fn hash(
        &self,
        key: impl ::redis::ToRedisArgs + Send + Sync,
    ) -> StoreResult<Option<Vec<String>>> {
        let flat: Vec<String> = ::redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok((!flat.is_empty()).then_some(flat))
    }

    /// Index upkeep after a decision has been made. It runs on its own, so that
    /// a slow or failing Redis can neither delay nor turn into an error an answer
    /// already decided; whatever it misses, the purge repairs.
    fn housekeeping(&self, what: &'static str, cmd: Cmd) {
        let mut conn = self.conn();
        tokio::spawn(async move {
            let done = tokio::time::timeout(OPERATION_TIMEOUT, cmd.query_async::<Value>(&mut conn));
            match done.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "redis store: {what} failed"),
                Err(_) => tracing::warn!("redis store: {what} timed out"),
            }
        });
    }

    fn unindex_pending(&self, subject_hex: &str, id: Uuid) {
        let mut cmd = ::redis::cmd("ZREM");
        cmd.arg(self.keys.pending())
            .arg(pending_member(subject_hex, id));
        self.housekeeping("unindexing a verification", cmd);
    }

    /// The subject's current unexpired verification: pending, or also dead from
    /// spent attempts when `or_spent`.
    async fn current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
        or_spent: bool,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        bounded(async {
            let subject = to_hex(subject.0);
            let found: Option<(String, String)> = self
                .scripts
                .find_current
                .key(self.keys.state(&subject))
                .arg(self.keys.record_prefix(&subject))
                .arg(tenant)
                .arg(ms(now))
                .arg(if or_spent { "1" } else { "0" })
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let Some((id, status)) = found else {
                return Ok(None);
            };
            let id = id
                .parse()
                .map_err(|_| StoreError::Corrupt("malformed verification id".into()))?;
            let status = Status::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {status:?}")))?;
            Ok(Some((id, status)))
        })
        .await
    }

    /// A pending verification's sealed number, unless it is sealed under the
    /// key whose id is `key_hex` (or the record is gone or ended).
    async fn sealed_unless_under(
        &self,
        id: Uuid,
        subject: String,
        key_hex: &str,
    ) -> StoreResult<Option<SealedRecord>> {
        let (tenant, status, phone): (Option<String>, Option<String>, Option<String>) =
            ::redis::cmd("HMGET")
                .arg(self.keys.record(&subject, id))
                .arg("tenant")
                .arg("status")
                .arg("phone")
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
        let (Some(tenant), Some("pending"), Some(phone)) = (tenant, status.as_deref(), phone)
        else {
            return Ok(None);
        };
        if phone.starts_with(key_hex) {
            return Ok(None);
        }
        let bytes = hex::decode(&phone)
            .map_err(|_| StoreError::Corrupt("redis field phone is not hex".into()))?;
        let phone = SealedPhone::from_bytes(&bytes)
            .ok_or_else(|| StoreError::Corrupt("redis field phone is not sealed data".into()))?;
        Ok(Some(SealedRecord { tenant, id, phone }))
    }

    /// Each add's key, and its arguments as `add_counters` takes them (amount,
    /// ttl, ceiling), after what `inv` already has.
    fn add_counter_adds(
        &self,
        inv: &mut ::redis::ScriptInvocation<'_>,
        adds: &[CounterAdd],
        now: DateTime<Utc>,
    ) {
        for a in adds {
            let (slot, ttl) = counter_window(a.window_seconds, now);
            inv.key(self.keys.counter(&a.key, a.window_seconds, slot))
                .arg(i64::try_from(a.amount).unwrap_or(i64::MAX))
                .arg(ttl)
                .arg(a.ceiling.map(|c| c.to_string()).unwrap_or_default());
        }
    }

    /// `adds` as one counter script (see `ADD_COUNTERS`): on a cluster, only
    /// keys of one slot.
    async fn run_counter_adds(
        &self,
        adds: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<u64>> {
        let mut inv = self.scripts.add_counters.prepare_invoke();
        self.add_counter_adds(&mut inv, adds, now);
        let totals: Vec<i64> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(totals
            .into_iter()
            .map(|t| u64::try_from(t).unwrap_or(0))
            .collect())
    }

    /// `script` run on verification `id`'s record with `args`, and the record's
    /// subject (hex); `None` when the id is unknown. One round trip on a single
    /// node, two on a cluster (the id reference lives in another slot).
    async fn on_record(
        &self,
        script: &RecordScript,
        id: Uuid,
        args: &[String],
    ) -> StoreResult<Option<(String, Vec<String>)>> {
        if let Conn::Cluster(_) = self.conn {
            let Some(subject) = self.subject_of(id).await? else {
                return Ok(None);
            };
            let out = self.on_named_record(script, &subject, id, args).await?;
            return Ok(Some((subject, out)));
        }
        let (before, after) = self.keys.record_around(id);
        let mut inv = script.by_ref.key(self.keys.vref(id));
        for arg in args {
            inv.arg(arg);
        }
        let mut out: Vec<String> = inv
            .arg(before)
            .arg(after)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        if out.first().is_none_or(String::is_empty) {
            return Ok(None);
        }
        let subject = out.remove(0);
        Ok(Some((subject, out)))
    }

    /// `script` run on the record of a subject's verification `id`.
    async fn on_named_record(
        &self,
        script: &RecordScript,
        subject: &str,
        id: Uuid,
        args: &[String],
    ) -> StoreResult<Vec<String>> {
        let mut inv = script.named.key(self.keys.record(subject, id));
        for arg in args {
            inv.arg(arg);
        }
        inv.invoke_async(&mut self.conn())
            .await
            .map_err(store_error)
    }

    /// `CHECK_CODE`'s budget arguments (see there); `counts` are the budget's
    /// windows read beforehand (a cluster), `None` to have the script read them
    /// and count a wrong guess itself (a single node).
    fn guess_args(
        &self,
        budget: Option<GuessBudget>,
        counts: Option<WindowCounts>,
        now: DateTime<Utc>,
    ) -> [String; 9] {
        let Some(budget) = budget else {
            return Default::default();
        };
        let window = GuessBudget::WINDOW_SECONDS;
        let (slot, ttl) = counter_window(window, now);
        let window_ms = i64::from(window) * 1000;
        let head = format!("{}:ctr:{}", self.keys.prefix, GuessBudget::KEY_PREFIX);
        let tail = |slot: i64| format!(":{window}:{slot}");
        let (previous, current) = counts.map_or((String::new(), String::new()), |c| {
            (c.previous.to_string(), c.current.to_string())
        });
        [
            budget.max.to_string(),
            window_ms.to_string(),
            (now.timestamp_millis() - slot * window_ms).to_string(),
            head,
            tail(slot - 1),
            tail(slot),
            ttl.to_string(),
            previous,
            current,
        ]
    }

    /// A cluster's approval, counted in usage after the check that made it
    /// (see `UsageRow::approval`).
    async fn count_approval(&self, tenant: &str, id: Uuid) {
        match self.list_messages(tenant, id).await {
            Ok(attempts) => {
                if let Some(row) = UsageRow::approval(&attempts) {
                    self.add_usage_after(&row).await;
                }
            }
            Err(e) => {
                tracing::warn!(verification_id = %id, error = %e, "approval not counted in usage")
            }
        }
    }

    /// On a cluster, usage lives in other slots than what it counts, so it is
    /// added after the write it belongs to has happened; a failure then is
    /// logged, not returned, as that write stands.
    async fn add_usage_after(&self, usage: &UsageRow) {
        if let Err(e) = self.record_usage(usage).await {
            tracing::warn!(tenant = %usage.tenant, error = %e, "usage not recorded");
        }
    }

    /// `start_send`, and on one node also `start_counted_send` in the same
    /// script: `counts` are added when it starts a send. A cluster takes no
    /// `counts` (they live in other slots): `start_then_count` adds them.
    async fn send(
        &self,
        plan: &SendPlan,
        counts: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<(SendDecision, Vec<u64>)> {
        bounded(async {
            let v = &plan.verification;
            let subject = to_hex(v.subject.0);
            let now_ms = now.timestamp_millis();
            let expires_ms = v.expires_at.timestamp_millis();
            let record_ttl = (expires_ms - now_ms).max(0) + KEEP_ENDED_MS;
            let cooldown_ms = i64::from(plan.cooldown_seconds) * 1000;
            let window_ms = i64::from(plan.send_window_seconds) * 1000;
            let state_ttl = KEEP_ENDED_MS
                .max(cooldown_ms)
                .max(window_ms)
                .max(record_ttl);
            let member = pending_member(&subject, v.id);
            let ref_ttl = record_ttl + REF_MARGIN_MS;

            // The id reference and the purge index come first, so that a crash
            // after the script can leave neither a record nobody finds by id nor a
            // code nobody purges. One node does all of it in one script; on a
            // cluster they live in other slots, so they go first on their own and
            // the index follows the outcome afterwards (`None` on one node).
            let (script, indexed_now, foreign_id) = if let Conn::Cluster(_) = self.conn {
                let (mut claim_conn, mut index_conn) = (self.conn(), self.conn());
                let claim = async {
                    self.scripts
                        .claim_id
                        .key(self.keys.vref(v.id))
                        .arg(&subject)
                        .arg(ref_ttl)
                        .invoke_async::<i64>(&mut claim_conn)
                        .await
                };
                let index = async {
                    ::redis::cmd("ZADD")
                        .arg(self.keys.pending())
                        .arg("NX")
                        .arg(expires_ms)
                        .arg(&member)
                        .query_async::<i64>(&mut index_conn)
                        .await
                };
                let (claimed, indexed) = tokio::join!(claim, index);
                let indexed_now = indexed.map_err(store_error)? == 1;
                // An id that is another subject's conflicts, but only once the
                // cooldown and window checks have passed, as in the other backends.
                let foreign_id = claimed.map_err(store_error)? == 0;
                (&self.scripts.start_send, Some(indexed_now), foreign_id)
            } else {
                (&self.scripts.start_send_indexed, None, false)
            };
            let mut inv = script.key(self.keys.state(&subject));
            inv.key(self.keys.record(&subject, v.id));
            if indexed_now.is_none() {
                inv.key(self.keys.vref(v.id)).key(self.keys.pending());
            }
            inv.arg(now_ms)
                .arg(cooldown_ms)
                .arg(window_ms)
                .arg(plan.max_sends_per_window)
                .arg(self.keys.record_prefix(&subject))
                .arg(v.id.to_string())
                .arg(&v.tenant)
                .arg(v.code_hash.map(to_hex).unwrap_or_default())
                .arg(expires_ms)
                .arg(record_ttl)
                .arg(state_ttl)
                .arg(if foreign_id { "1" } else { "0" })
                .arg(&subject)
                .arg(ref_ttl)
                .arg(&member);
            if indexed_now.is_none() {
                inv.arg(counts.len());
                self.add_counter_adds(&mut inv, counts, now);
            }
            let mut pairs = verification_pairs(v);
            // Only one node compares by subject: a cluster's check by number
            // finds the id first (see `check_current_code`).
            if indexed_now.is_none() {
                if let Some(hash) = &plan.subject_code_hash {
                    pairs.push(("subject_code_hash", to_hex(hash)));
                }
                if let Some(counts) = approval_counts_field(&plan.approval_counts) {
                    pairs.push(("approval_counts", counts));
                }
            }
            add_pairs(&mut inv, pairs);
            let out: Vec<String> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let (verdict, rest) = verdict(&out)?;
            let mut totals = Vec::new();
            let decision = match verdict {
                "cooldown" => SendDecision::Cooldown {
                    retry_after_seconds: seconds_until(now, parse_ms(nth(rest, 0)?)?),
                },
                "window" => SendDecision::WindowExhausted {
                    retry_after_seconds: seconds_until(now, parse_ms(nth(rest, 0)?)?),
                },
                "conflict" => SendDecision::Conflict {
                    pending: match rest.first().map(String::as_str) {
                        None | Some("") => None,
                        Some(id) => Some(id.parse().map_err(|_| {
                            StoreError::Corrupt("malformed verification id".into())
                        })?),
                    },
                },
                "created" | "replaced" => {
                    let previous_sent_at = match nth(rest, 0)? {
                        "" => None,
                        raw => Some(parse_ms(raw)?),
                    };
                    let verification = if verdict == "created" {
                        v.clone()
                    } else {
                        decode_verification(&flat_from_json(nth(rest, 1)?)?)?
                    };
                    totals = rest
                        .iter()
                        .skip(2)
                        .map(|t| {
                            t.parse().map_err(|_| {
                                StoreError::Corrupt("malformed count from redis".into())
                            })
                        })
                        .collect::<StoreResult<_>>()?;
                    if verdict == "created" {
                        SendDecision::Created {
                            verification,
                            previous_sent_at,
                        }
                    } else {
                        SendDecision::Replaced {
                            verification,
                            previous_sent_at,
                        }
                    }
                }
                other => return Err(unexpected(other)),
            };
            let Some(indexed_now) = indexed_now else {
                return Ok((decision, totals));
            };
            match &decision {
                SendDecision::Created { verification, .. }
                | SendDecision::Replaced { verification, .. } => {
                    let fresh = matches!(decision, SendDecision::Created { .. }) && indexed_now;
                    if !fresh {
                        // A resend moved the expiry later (or an old entry was there).
                        let mut cmd = ::redis::cmd("ZADD");
                        cmd.arg(self.keys.pending())
                            .arg("XX")
                            .arg("GT")
                            .arg(verification.expires_at.timestamp_millis())
                            .arg(&member);
                        self.housekeeping("re-indexing a verification", cmd);
                    }
                }
                _ if indexed_now => self.unindex_pending(&subject, v.id),
                _ => {}
            }
            Ok((decision, totals))
        })
        .await
    }

    /// `Store::check_code`; with `count_approval`, on one node the script also
    /// adds the approval counts kept with the record (`SendPlan::approval_counts`).
    /// Whether it did so goes with the outcome.
    async fn check(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        count_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<(CheckOutcome, bool)> {
        bounded(async {
            let cluster = matches!(self.conn, Conn::Cluster(_));
            let args = |counts| {
                let mut args = vec![
                    tenant.to_owned(),
                    to_hex(code_hash),
                    ms(now),
                    KEEP_ENDED_MS.to_string(),
                ];
                args.extend(self.guess_args(budget, counts, now));
                // A cluster script cannot reach the messages, usage, purge
                // index or counters (other slots either): the approval is
                // counted and an ended verification unindexed after it.
                args.extend(if cluster {
                    Default::default()
                } else {
                    [
                        self.keys.message_list(id),
                        self.keys.message_prefix(id),
                        self.keys.usage_days(tenant),
                        self.keys.pending(),
                        id.to_string(),
                        if count_approval {
                            self.keys.counter_head()
                        } else {
                            String::new()
                        },
                    ]
                });
                args
            };
            let script = &self.scripts.check_code;
            // A cluster script cannot reach the budget's counters (other slots):
            // they are read before it and a wrong guess counted after it, so
            // there the budget is exact only for checks made one at a time.
            let (subject, out, guess_key) = if cluster {
                let Some(subject) = self.subject_of(id).await? else {
                    return Ok((CheckOutcome::NotFound, false));
                };
                let key = format!("{}{subject}", GuessBudget::KEY_PREFIX);
                let counts = match budget {
                    Some(_) => {
                        match self.read_counters(&GuessBudget::reads(&key, now)).await?[..] {
                            [previous, current] => Some(WindowCounts { previous, current }),
                            _ => return Err(StoreError::Corrupt("short counter read".into())),
                        }
                    }
                    None => None,
                };
                let out = self
                    .on_named_record(script, &subject, id, &args(counts))
                    .await?;
                (subject, out, budget.map(|_| key))
            } else {
                let Some((subject, out)) = self.on_record(script, id, &args(None)).await? else {
                    return Ok((CheckOutcome::NotFound, false));
                };
                (subject, out, None)
            };
            let (outcome, counted) = decode_check(&out)?;
            if !cluster {
                return Ok((outcome, counted));
            }
            match &outcome {
                CheckOutcome::Approved(_) => {
                    self.unindex_pending(&subject, id);
                    self.count_approval(tenant, id).await;
                }
                CheckOutcome::Wrong { attempts_left, .. } => {
                    if *attempts_left == 0 {
                        self.unindex_pending(&subject, id);
                    }
                    if let Some(key) = guess_key {
                        let add = CounterAdd {
                            key,
                            amount: 1,
                            window_seconds: GuessBudget::WINDOW_SECONDS,
                            ceiling: None,
                        };
                        self.run_counter_adds(std::slice::from_ref(&add), now)
                            .await?;
                    }
                }
                _ => {}
            }
            Ok((outcome, counted))
        })
        .await
    }

    /// The subject (hex) a verification id belongs to, if the id is known.
    async fn subject_of(&self, id: Uuid) -> StoreResult<Option<String>> {
        ::redis::cmd("GET")
            .arg(self.keys.vref(id))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)
    }
}

async fn open(url: &str) -> StoreResult<Conn> {
    if let Some(nodes) = cluster_nodes(url) {
        let client = ClusterClient::builder(nodes?)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            // Room for a redirect or a reconnect within one command.
            .overall_response_timeout(Some(2 * RESPONSE_TIMEOUT))
            // Its retries would resend scripts that may have run (`retry_refusals`).
            .retries(0)
            .tcp_settings(tcp_settings())
            .build()
            .map_err(|e| StoreError::Unavailable(format!("invalid redis cluster url: {e}")))?;
        let conn = client.get_async_connection().await.map_err(store_error)?;
        return Ok(Conn::Cluster(conn));
    }
    let info = url
        .into_connection_info()
        .map_err(|_| {
            StoreError::Unavailable(
                "invalid redis url (expected redis://, rediss:// or redis+cluster://)".into(),
            )
        })?
        .set_tcp_settings(tcp_settings());
    let client = ::redis::Client::open(info).map_err(store_error)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(StdDuration::from_millis(500));
    let manager = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(store_error)?;
    Ok(Conn::Node(manager))
}

fn tcp_settings() -> TcpSettings {
    let settings = TcpSettings::default().set_nodelay(true);
    // A response timeout alone never replaces a connection; a peer that vanished
    // without a reset (host down, network cut) would otherwise keep every command
    // timing out until the kernel gives up, minutes later.
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(DEAD_PEER_TIMEOUT);
    settings
}

/// Node URLs of a `redis+cluster://` / `rediss+cluster://` URL; `None` for other schemes.
fn cluster_nodes(url: &str) -> Option<StoreResult<Vec<String>>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else {
        ("rediss", url.strip_prefix("rediss+cluster://")?)
    };
    let (authority, suffix) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}{suffix}"))
        .collect();
    if nodes.is_empty() {
        return Some(Err(StoreError::Unavailable(
            "redis cluster url names no nodes".into(),
        )));
    }
    Some(Ok(nodes))
}

fn store_error(e: RedisError) -> StoreError {
    match e.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

async fn bounded<T>(op: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    tokio::time::timeout(OPERATION_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            ))
        })
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn subject_tag(&self, subject_hex: &str) -> String {
        format!("{{{}:s:{subject_hex}}}", self.prefix)
    }

    fn state(&self, subject_hex: &str) -> String {
        format!("{}:state", self.subject_tag(subject_hex))
    }

    /// Verification keys are this followed by the id; scripts build the key of the
    /// subject's current verification from it (same tag, so same slot).
    fn record_prefix(&self, subject_hex: &str) -> String {
        format!("{}:v:", self.subject_tag(subject_hex))
    }

    fn record(&self, subject_hex: &str, id: Uuid) -> String {
        format!("{}{id}", self.record_prefix(subject_hex))
    }

    /// `record(subject, id)` without the subject: the text before and after it.
    fn record_around(&self, id: Uuid) -> (String, String) {
        (format!("{{{}:s:", self.prefix), format!("}}:v:{id}"))
    }

    fn vref(&self, id: Uuid) -> String {
        format!("{}:vref:{id}", self.prefix)
    }

    fn pending(&self) -> String {
        format!("{}:pending", self.prefix)
    }

    fn messages_tag(&self, verification_id: Uuid) -> String {
        format!("{}{verification_id}}}", self.messages_head())
    }

    /// `messages_tag` before the id: scripts that learn the id build its keys.
    fn messages_head(&self) -> String {
        format!("{{{}:m:", self.prefix)
    }

    fn message_list(&self, verification_id: Uuid) -> String {
        format!("{}:list", self.messages_tag(verification_id))
    }

    fn message_prefix(&self, verification_id: Uuid) -> String {
        format!("{}:r:", self.messages_tag(verification_id))
    }

    fn mref(&self, id: Uuid) -> String {
        format!("{}:mref:{id}", self.prefix)
    }

    fn provider_ref(&self, provider: &str, provider_message_id: &str) -> String {
        format!("{}:pm:{provider}:{provider_message_id}", self.prefix)
    }

    fn message_record(&self, verification_id: Uuid, id: Uuid) -> String {
        format!("{}{id}", self.message_prefix(verification_id))
    }

    fn all_messages(&self) -> String {
        format!("{}:msgs", self.prefix)
    }

    fn unfinished(&self, provider: &str) -> String {
        format!("{}:unfin:{provider}", self.prefix)
    }

    fn usage_day(&self, tenant: &str, day: NaiveDate) -> String {
        format!("{}{}", self.usage_days(tenant), day.format("%Y-%m-%d"))
    }

    /// A tenant's usage day keys before the day (`YYYY-MM-DD`).
    fn usage_days(&self, tenant: &str) -> String {
        format!("{{{}:u:{}}}:", self.prefix, to_hex(tenant))
    }

    fn inbox_tag(&self, tenant: &str) -> String {
        format!("{{{}:i:{}}}", self.prefix, to_hex(tenant))
    }

    fn keys_tag(&self) -> String {
        format!("{{{}:keys}}", self.prefix)
    }

    fn api_key(&self, key_hash: &[u8; 32]) -> String {
        format!("{}:k:{}", self.keys_tag(), to_hex(key_hash))
    }

    fn api_key_ids(&self) -> String {
        format!("{}:ids", self.keys_tag())
    }

    fn rate(&self, key: &str, window_index: i64) -> String {
        format!("{}:rl:{key}:{window_index}", self.prefix)
    }

    fn counter(&self, key: &str, window_seconds: u32, slot: i64) -> String {
        format!("{}:ctr:{key}:{window_seconds}:{slot}", self.prefix)
    }

    /// What every `counter` key starts with (for scripts that build them).
    fn counter_head(&self) -> String {
        format!("{}:ctr:", self.prefix)
    }

    /// A namespace's (values, expiries) keys: one tag, so one slot.
    fn markers(&self, namespace: &str) -> (String, String) {
        let tag = format!("{{{}:mk:{namespace}}}", self.prefix);
        (format!("{tag}:v"), format!("{tag}:x"))
    }
}

fn pending_member(subject_hex: &str, id: Uuid) -> String {
    format!("{subject_hex}:{id}")
}

/// A message's member in the `msgs` and `unfin` indexes.
fn message_member(m: &MessageRecord) -> String {
    format!("{}:{}", m.verification_id, m.id)
}

fn parse_message_member(member: &str) -> Option<(Uuid, Uuid)> {
    let (vid, id) = member.split_once(':')?;
    Some((vid.parse().ok()?, id.parse().ok()?))
}

/// Usage hash fields are `<route>|<country>|<currency>|<counter>`; the separator
/// cannot appear inside a part.
fn usage_part(value: Option<&str>) -> String {
    value.unwrap_or_default().replace('|', "_")
}

/// The usage day's field/increment pairs `d` adds (its non-zero counters).
fn usage_pairs(d: &UsageRow) -> Vec<(String, i64)> {
    let prefix = format!(
        "{}|{}|{}|",
        d.route_id,
        usage_part(d.country.as_deref()),
        usage_part(d.currency.as_deref())
    );
    let amounts = [
        i64::try_from(d.sent).unwrap_or(i64::MAX),
        i64::try_from(d.delivered).unwrap_or(i64::MAX),
        i64::try_from(d.failed).unwrap_or(i64::MAX),
        i64::try_from(d.verifications_started).unwrap_or(i64::MAX),
        i64::try_from(d.verifications_approved).unwrap_or(i64::MAX),
        d.cost_micros,
    ];
    USAGE_COUNTERS
        .iter()
        .zip(amounts)
        .filter(|(_, amount)| *amount != 0)
        .map(|(counter, amount)| (format!("{prefix}{counter}"), amount))
        .collect()
}

const USAGE_COUNTERS: [&str; 6] = [
    "sent",
    "delivered",
    "failed",
    "verifications_started",
    "verifications_approved",
    "cost_micros",
];

/// The counter window containing `now` (slot number) and how long its key must
/// live: through the window after it (a sliding window reads the previous
/// window's total) and a second more, so it never vanishes early.
fn counter_window(window_seconds: u32, now: DateTime<Utc>) -> (i64, i64) {
    let window = i64::from(window_seconds.max(1));
    let slot = now.timestamp().div_euclid(window);
    let keep_until_ms = (slot + 2) * window * 1000;
    (slot, (keep_until_ms - now.timestamp_millis()).max(0) + 1000)
}

fn ms(t: DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

// --- Lua ---

/// Shared helpers. Numbers go back to Redis as integer strings (never `%.14g`).
const PRELUDE: &str = r#"
local function int(n) return string.format('%.0f', n) end
-- Whether INCRBY's `total` after adding `amount` made the key: then it needs
-- its TTL. A counter's TTL is set in the same script that makes it, so one
-- that existed has it, and asking (`PTTL`) was an extra call per add. Were an
-- existing counter at 0 (undone adds), setting its TTL again changes nothing:
-- every caller's TTL ends at the window's fixed keep-until time.
local function new_counter(total, amount) return total == tonumber(amount) end
-- Constant-time comparison: the time taken does not depend on where the
-- strings differ. Plain arithmetic, no call per byte: with `bit.bxor` and
-- `string.byte` per byte, comparing two code hashes was a third of a check's
-- time on Redis.
local function same(a, b)
  if #a ~= #b then return false end
  local x, y, d = {string.byte(a, 1, -1)}, {string.byte(b, 1, -1)}, 0
  for i = 1, #x do
    local e = x[i] - y[i]
    d = d + e * e
  end
  return d == 0
end
-- Brings a key's TTL down to `ttl` ms, never up: an ended record must not outlive
-- the reference that finds it.
local function shorten(key, ttl)
  local left = redis.call('PTTL', key)
  if left < 0 or left > tonumber(ttl) then redis.call('PEXPIRE', key, ttl) end
end
local function append(out, list)
  for i = 1, #list do out[#out + 1] = list[i] end
  return out
end
-- A whole record for the caller, as one JSON string of HGETALL's list: the
-- client parses one reply element instead of two per field (most of what a
-- right check cost otpd on Redis).
local function record_json(key)
  return cjson.encode(redis.call('HGETALL', key))
end
-- A code's hash by subject (`Crypto::subject_code_hash`) as a record keeps it:
-- bound to the verification `id`, so that a copy in another record of the same
-- subject matches nothing (as the id-keyed `code_hash` cannot be reused). SHA-1
-- is the one digest Redis's Lua has; it only binds a secret-keyed HMAC, which is
-- what an attacker would have to find.
local function bound(id, hash) return redis.sha1hex(id .. hash) end
-- Adds the `n` field/increment pairs from ARGV[first] to usage day `key`.
local function add_usage(key, first, n)
  for i = first, first + 2 * n - 1, 2 do redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1]) end
end
-- The UTC day (YYYY-MM-DD) of a time in ms (days from civil, proleptic Gregorian).
local function day_text(ms)
  local z = math.floor(ms / 86400000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, d)
end
-- Adds an approval's counts as kept with its record (`SendPlan::approval_counts`:
-- JSON [[key, amount, window seconds], ...]) at `now` ms, as `add_counters`
-- adds a `CounterAdd`: key `head`..key..':'..window..':'..slot, kept until two
-- windows after its slot's start, plus a second. False, adding nothing, for
-- text that is not such a list (never written so): the caller then counts,
-- rather than the script failing after the approval it already made.
local function add_approval_counts(json, head, now)
  local ok, adds = pcall(cjson.decode, json)
  if not ok or type(adds) ~= 'table' or #adds == 0 then return false end
  for _, a in ipairs(adds) do
    if type(a) ~= 'table' or type(a[1]) ~= 'string' or type(a[2]) ~= 'number'
      or type(a[3]) ~= 'number' then
      return false
    end
  end
  for _, a in ipairs(adds) do
    local window = math.max(a[3], 1) * 1000
    local slot = math.floor(now / window)
    local key = head .. a[1] .. ':' .. int(a[3]) .. ':' .. int(slot)
    if new_counter(redis.call('INCRBY', key, int(a[2])), a[2]) then
      redis.call('PEXPIRE', key, int(math.max((slot + 2) * window - now, 0) + 1000))
    end
  end
  return true
end
-- Counts an approval in usage (`UsageRow::approval`): on the day, route and
-- country of the first attempt in `list` (record keys `prefix` .. id) that a
-- provider accepted (`MessageRecord::was_accepted`), under usage days `days`.
local function count_approval(list, prefix, days)
  for _, id in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local m = redis.call('HMGET', prefix .. id, 'status', 'provider_message_id', 'created_at',
      'route_id', 'country')
    -- A record without its time or route (never written so) counts nothing
    -- rather than failing the script after the approval it already made.
    if m[2] or m[1] == 'queued' or m[1] == 'sent' or m[1] == 'delivered' then
      if tonumber(m[3]) and m[4] then
        local field = m[4] .. '|' .. (string.gsub(m[5] or '', '|', '_')) .. '||verifications_approved'
        redis.call('HINCRBY', days .. day_text(tonumber(m[3])), field, 1)
      end
      return
    end
  end
end
"#;

/// Claims id reference `vref` for `subject` for at least `ttl` ms; false when
/// the id belongs to another subject.
const CLAIM_FN: &str = r#"
local function claim(vref, subject, ttl)
  local owner = redis.call('GET', vref)
  if owner and owner ~= subject then return false end
  if not owner then
    redis.call('SET', vref, subject, 'PX', ttl)
  elseif redis.call('PTTL', vref) < tonumber(ttl) then
    redis.call('PEXPIRE', vref, ttl)
  end
  return true
end
"#;

/// KEYS: vref. ARGV: subject hex, ttl ms. 0 when the id belongs to another subject.
const CLAIM_ID: &str = r#"
if claim(KEYS[1], ARGV[1], ARGV[2]) then return 1 end
return 0
"#;

/// KEYS: state, planned record. ARGV: now, cooldown ms, window ms, max sends,
/// record prefix, planned id, tenant, code hash ('' = none), expires_at,
/// record ttl, state ttl, '1' when the id is another subject's, subject hex,
/// vref ttl, purge index member, then from ARGV[P] the planned record's
/// field/value pairs (a `subject_code_hash` among them is kept `bound`). Runs
/// after `START_SEND_HEAD` (a cluster) or `START_SEND_INDEXED_HEAD` (one node),
/// which set `foreign` and `P`.
const START_SEND: &str = r#"
local now = tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'current', 'last_sent', 'win_start', 'win_count')
local current, last_sent = st[1], st[2]
if last_sent then
  local until_ms = tonumber(last_sent) + tonumber(ARGV[2])
  if now < until_ms then return {'cooldown', int(until_ms)} end
end
local window = tonumber(ARGV[3])
local win_start, win_count = now, 0
if st[3] and now < tonumber(st[3]) + window then
  win_start, win_count = tonumber(st[3]), tonumber(st[4] or '0')
end
if win_count >= tonumber(ARGV[4]) then return {'window', int(win_start + window)} end
local pending = false
if current then
  local c = redis.call('HMGET', ARGV[5] .. current, 'tenant', 'status', 'expires_at')
  if c[1] == ARGV[7] and c[2] == 'pending' and now < tonumber(c[3]) then pending = current end
end
local decision
if pending and pending == ARGV[6] then
  if ARGV[8] == '' then
    redis.call('HDEL', KEYS[2], 'code_hash')
  else
    redis.call('HSET', KEYS[2], 'code_hash', ARGV[8])
  end
  redis.call('HSET', KEYS[2], 'expires_at', ARGV[9], 'updated_at', ARGV[1], 'last_sent_at', ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'send_count', 1)
  -- A resend goes to the number of this request (a uid's number may change),
  -- as it asked (its send options).
  redis.call('HDEL', KEYS[2], 'country', 'approval_counts', 'subject_code_hash', 'send_options')
  for i = P, #ARGV, 2 do
    local f = ARGV[i]
    if f == 'phone' or f == 'masked_to' or f == 'country' or f == 'approval_counts'
      or f == 'subject_code_hash' or f == 'send_options' then
      redis.call('HSET', KEYS[2], f, ARGV[i + 1])
    end
  end
  decision = 'replaced'
elseif pending or foreign or redis.call('EXISTS', KEYS[2]) == 1 then
  return {'conflict', pending or ''}
else
  redis.call('HSET', KEYS[2], unpack(ARGV, P))
  decision = 'created'
end
local by_subject = redis.call('HGET', KEYS[2], 'subject_code_hash')
if by_subject then
  redis.call('HSET', KEYS[2], 'subject_code_hash', bound(ARGV[6], by_subject))
end
redis.call('PEXPIRE', KEYS[2], ARGV[10])
redis.call('HSET', KEYS[1], 'current', ARGV[6], 'last_sent', ARGV[1],
  'win_start', int(win_start), 'win_count', int(win_count + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[11])
-- A created record is the caller's plan as written: only a replaced one goes back.
return {decision, last_sent or '', decision == 'replaced' and record_json(KEYS[2]) or ''}
"#;

/// `START_SEND` after the caller claimed the id and indexed it (a cluster).
const START_SEND_HEAD: &str = r#"
local foreign = ARGV[12] == '1'
local P = 16
"#;

/// One node: KEYS as `START_SEND`, then vref, the purge index and the
/// send's counters; ARGV as `START_SEND` with, before the record's pairs, the
/// number of counters and their arguments (see `add_counters`). Claims the id
/// and indexes it first, as the caller does on a cluster, then after the send
/// keeps the index in step with its outcome and, when it started one, adds the
/// counters, their totals following its answer. `START_SEND` comes between
/// this head and `START_SEND_INDEXED_TAIL`.
const START_SEND_INDEXED_HEAD: &str = r#"
local indexed = redis.call('ZADD', KEYS[4], 'NX', ARGV[9], ARGV[15])
local foreign = not claim(KEYS[3], ARGV[13], ARGV[14])
local counters = tonumber(ARGV[16])
local P = 17 + 3 * counters
local function decide()
"#;

const START_SEND_INDEXED_TAIL: &str = r#"
end
local out = decide()
if out[1] == 'created' or out[1] == 'replaced' then
  -- A resend moved the expiry later (or an old entry was there).
  if out[1] == 'replaced' or indexed == 0 then
    redis.call('ZADD', KEYS[4], 'XX', 'GT', ARGV[9], ARGV[15])
  end
  for _, total in ipairs(add_counters(4, 16, counters)) do out[#out + 1] = tostring(total) end
elseif indexed == 1 then
  redis.call('ZREM', KEYS[4], ARGV[15])
end
return out
"#;

/// KEYS: state. ARGV: record prefix, tenant, now, '1' to count a verification
/// dead from spent attempts as current too. The current id and its status.
const FIND_CURRENT: &str = r#"
local current = redis.call('HGET', KEYS[1], 'current')
if not current then return false end
local c = redis.call('HMGET', ARGV[1] .. current, 'tenant', 'status', 'expires_at')
if c[1] == ARGV[2] and tonumber(ARGV[3]) < tonumber(c[3])
  and (c[2] == 'pending' or (ARGV[4] == '1' and c[2] == 'max_attempts')) then
  return {current, c[2]}
end
return false
"#;

/// Scripts on one verification, addressed by id, are a body run on its record
/// key `R` (see `RecordScript`), with `S` its subject (hex) when the script
/// found the record by reference. ARGV: tenant, code hash, now, keep-ended ms,
/// then the subject's guess budget: its max ('' = none), the window and the
/// time into it (ms), the counter keys' text before the subject and after it
/// (previous window, current window), their ttl, and the two windows' counts
/// when the caller read them ('' = read here: `S` names the keys), then the
/// verification's message list ('' = the caller counts the approval's usage),
/// its message record prefix, the tenant's usage days, then the purge index
/// and the verification's id ('' = the caller unindexes a verification that
/// ends), then the counter keys' head ('' = the caller adds an approval's
/// counts; else the record's `approval_counts` are added here, and a third
/// answer says whether they were). The budget is judged after the liveness
/// tests and before anything else, as every store does.
const CHECK_CODE: &str = r#"
local function finish()
  redis.call('HDEL', R, 'code_hash', 'subject_code_hash', 'approval_counts')
  shorten(R, ARGV[4])
  if ARGV[17] ~= '' then redis.call('ZREM', ARGV[17], S .. ':' .. ARGV[18]) end
end
local r = redis.call('HMGET', R, 'tenant', 'status', 'expires_at', HASH, 'max_attempts', 'masked_to')
if r[1] ~= ARGV[1] then return {'not_found'} end
if (r[2] ~= 'pending' and r[2] ~= 'max_attempts') or tonumber(ARGV[3]) >= tonumber(r[3]) then
  return {'not_found'}
end
local counter
if ARGV[5] ~= '' then
  local previous, current
  if ARGV[12] == '' then
    counter = ARGV[8] .. S .. ARGV[10]
    previous = tonumber(redis.call('GET', ARGV[8] .. S .. ARGV[9]) or '0')
    current = tonumber(redis.call('GET', counter) or '0')
  else
    previous, current = tonumber(ARGV[12]), tonumber(ARGV[13])
  end
  local w = tonumber(ARGV[6])
  if previous * (w - tonumber(ARGV[7])) + (current + 1) * w > tonumber(ARGV[5]) * w then
    return {'guesses_spent', int(previous), int(current)}
  end
end
if r[2] == 'max_attempts' then return {'max_attempts'} end
if not r[4] then return {'not_found'} end
redis.call('HSET', R, 'updated_at', ARGV[3])
if same(r[4], ARGV[2]) then
  redis.call('HSET', R, 'status', 'approved')
  local counts = ARGV[19] ~= '' and redis.call('HGET', R, 'approval_counts')
  finish()
  if ARGV[14] ~= '' then count_approval(ARGV[14], ARGV[15], ARGV[16]) end
  local counted = counts and add_approval_counts(counts, ARGV[19], tonumber(ARGV[3]))
  return {'approved', record_json(R), counted and '1' or '0'}
end
local attempts = redis.call('HINCRBY', R, 'attempts', 1)
local max = tonumber(r[5])
if attempts >= max then
  redis.call('HSET', R, 'status', 'max_attempts')
  finish()
end
if counter then
  if new_counter(redis.call('INCRBY', counter, 1), 1) then
    redis.call('PEXPIRE', counter, ARGV[11])
  end
end
return {'wrong', int(math.max(max - attempts, 0)), r[6] or ''}
"#;

/// A record body (see `CHECK_CODE`). ARGV: tenant, now, keep-ended ms.
const CANCEL: &str = r#"
local r = redis.call('HMGET', R, 'tenant', 'status', 'expires_at')
if r[1] ~= ARGV[1] or r[2] ~= 'pending' or tonumber(ARGV[2]) >= tonumber(r[3]) then
  return {'not_found'}
end
redis.call('HSET', R, 'status', 'canceled', 'updated_at', ARGV[2])
redis.call('HDEL', R, 'code_hash', 'subject_code_hash', 'approval_counts')
shorten(R, ARGV[3])
return append({'canceled'}, redis.call('HGETALL', R))
"#;

/// How a record body finds `R` (see `record_script`). `named`: KEYS[1] is the
/// record (the caller read the id reference first).
const RECORD_NAMED: &str = r#"
return run(KEYS[1], nil, ARGV, 'code_hash')
"#;

/// `by_ref`, one node only: KEYS[1] is the id reference and the last two ARGV
/// the record key's text around the subject; answers {subject hex, body's
/// answer…}, {''} when the id is unknown. The record is in another slot and its
/// key is not declared, which a cluster would refuse; a single node does not
/// care, and it saves a round trip on every check or cancel.
const RECORD_BY_REF: &str = r#"
local S = redis.call('GET', KEYS[1])
if not S then return {''} end
return append({S}, run(ARGV[#ARGV - 1] .. S .. ARGV[#ARGV], S, ARGV, 'code_hash'))
"#;

/// `current`, one node, for `CHECK_CODE` only: KEYS[1] is a subject's state,
/// and the last three ARGV the subject (hex), its record prefix and the head
/// of message keys (`{P:m:`); ARGV[2] is the code's hash keyed by the subject,
/// compared, `bound` to the verification found, with the record's
/// `subject_code_hash`. Finds the subject's current verification as
/// `FIND_CURRENT` does, then fills in CHECK_CODE's arguments that name it (its
/// message list and record prefix, its id). Answers {'none'},
/// {'max_attempts'} (nothing compared), {'unhashed', id} (a record without
/// that hash: the caller checks it by id), or {'checked', id, the body's
/// answer…}.
const RECORD_CURRENT: &str = r#"
local n = #ARGV
local S, prefix, messages = ARGV[n - 2], ARGV[n - 1], ARGV[n]
local id = redis.call('HGET', KEYS[1], 'current')
if not id then return {'none'} end
local R = prefix .. id
local c = redis.call('HMGET', R, 'tenant', 'status', 'expires_at', 'subject_code_hash', 'code_hash')
if c[1] ~= ARGV[1] or tonumber(ARGV[3]) >= tonumber(c[3]) then return {'none'} end
if c[2] == 'max_attempts' then return {'max_attempts'} end
if c[2] ~= 'pending' then return {'none'} end
-- Only a record holding both hashes of one code is compared by subject.
if not c[4] or not c[5] then return {'unhashed', id} end
local A = {unpack(ARGV, 1, n - 3)}
A[2] = bound(id, ARGV[2])
A[14], A[15], A[18] = messages .. id .. '}:list', messages .. id .. '}:r:', id
return append({'checked', id}, run(R, S, A, 'subject_code_hash'))
"#;

/// KEYS: state, record. ARGV: tenant, previous send ('' = none), at, keep-ended
/// ms, the aborted send's time. Undoes only what that send still holds (a later
/// send keeps its cooldown and its code); 1 when the verification was ended.
const ABORT_SEND: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'last_sent') == ARGV[5] then
    if ARGV[2] == '' then
      redis.call('HDEL', KEYS[1], 'last_sent')
    else
      redis.call('HSET', KEYS[1], 'last_sent', ARGV[2])
    end
  end
  local count = tonumber(redis.call('HGET', KEYS[1], 'win_count') or '0')
  if count > 0 then redis.call('HSET', KEYS[1], 'win_count', int(count - 1)) end
end
local r = redis.call('HMGET', KEYS[2], 'tenant', 'status', 'last_sent_at')
if r[1] == ARGV[1] and r[2] == 'pending' and r[3] == ARGV[5] then
  redis.call('HSET', KEYS[2], 'status', 'failed', 'updated_at', ARGV[3])
  redis.call('HDEL', KEYS[2], 'code_hash', 'subject_code_hash')
  shorten(KEYS[2], ARGV[4])
  return 1
end
return 0
"#;

/// KEYS: record. ARGV: now. Ends a pending verification whose code has expired.
const EXPIRE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if not r[1] then return {'gone'} end
if r[1] ~= 'pending' then return {'ended'} end
if tonumber(ARGV[1]) < tonumber(r[2]) then return {'later', r[2]} end
redis.call('HSET', KEYS[1], 'status', 'expired', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'code_hash', 'subject_code_hash')
return {'expired'}
"#;

/// Writes message record KEYS[1] (field/value pairs from ARGV[first]) and
/// appends message id ARGV[2] to list KEYS[2], both to live ARGV[1] ms.
const WRITE_MESSAGE_FN: &str = r#"
local function write_message(first)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, first))
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
"#;

/// KEYS: record, list. ARGV: ttl ms, message id, field/value pairs.
const INSERT_MESSAGE: &str = r#"
write_message(3)
return 1
"#;

/// One node: KEYS: record, list, mref, all messages, the provider's unfinished,
/// provider ref (when the message has a provider id). ARGV: ttl ms, message id,
/// verification id, created ms, index member, '1' when unfinished, the usage
/// day to add to, the number n of its field/increment pairs and those pairs,
/// then the record's field/value pairs. References and indexes first, as the
/// caller does on a cluster.
const INSERT_MESSAGE_INDEXED: &str = r#"
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[1])
if KEYS[6] then redis.call('SET', KEYS[6], KEYS[1], 'PX', ARGV[1]) end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5]) end
local n = tonumber(ARGV[8])
add_usage(ARGV[7], 9, n)
write_message(9 + 2 * n)
return 1
"#;

/// KEYS: list. ARGV: record prefix.
const LIST_MESSAGES: &str = r#"
local out = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local m = redis.call('HGETALL', ARGV[1] .. id)
  if #m > 0 then out[#out + 1] = m end
end
return out
"#;

/// KEYS: record. ARGV: status, its rank, at, the field that stamps the status
/// ('' = none), then field/value pairs to set. Status only moves forward; a late
/// report of an earlier stage changes nothing. {previous status, record…}.
const UPDATE_MESSAGE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'rank', 'status')
if not r[1] then return false end
if tonumber(ARGV[2]) > tonumber(r[1]) then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', ARGV[2], 'updated_at', ARGV[3])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[3]) end
  if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
end
return append({r[2]}, redis.call('HGETALL', KEYS[1]))
"#;

/// KEYS: record, list. ARGV: message id. Deletes the record; {provider, provider
/// message id} when it had one, so the caller can drop the reference.
const PURGE_MESSAGE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'provider', 'provider_message_id')
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
if r[1] and r[2] then return {r[1], r[2]} end
return {}
"#;

/// KEYS: key. ARGV: value. Deletes the key only while it still holds the value.
const DELETE_IF: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// KEYS: a tenant's usage day. ARGV: field/increment pairs.
const RECORD_USAGE: &str = r#"
add_usage(KEYS[1], 1, #ARGV / 2)
return 1
"#;

/// KEYS: usage days (one tenant, so one slot). Each day's fields, in KEYS order.
const READ_USAGE: &str = r#"
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"#;

/// KEYS: record, subject state. ARGV: tenant, expected send count, code hash, expires_at, now,
/// record ttl, subject code hash ('' = none; kept `bound` to the record's id).
/// The verification after the new code, or false.
const REPLACE_CODE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'tenant', 'status', 'expires_at', 'send_count', 'id')
if r[1] ~= ARGV[1] or r[2] ~= 'pending' or tonumber(ARGV[5]) >= tonumber(r[3])
  or r[4] ~= ARGV[2] then
  return false
end
redis.call('HSET', KEYS[1], 'code_hash', ARGV[3], 'expires_at', ARGV[4],
  'updated_at', ARGV[5], 'last_sent_at', ARGV[5])
if ARGV[7] == '' then
  redis.call('HDEL', KEYS[1], 'subject_code_hash')
else
  redis.call('HSET', KEYS[1], 'subject_code_hash', bound(r[5], ARGV[7]))
end
redis.call('HINCRBY', KEYS[1], 'send_count', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
-- The subject's state (its cooldown, its current id) lives as long as the record.
local left = redis.call('PTTL', KEYS[2])
if left >= 0 and left < tonumber(ARGV[6]) then redis.call('PEXPIRE', KEYS[2], ARGV[6]) end
return redis.call('HGETALL', KEYS[1])
"#;

/// KEYS: entry, tenant index, number index, sequence. ARGV: ttl ms, id, capacity,
/// field/value pairs. The sequence orders entries as they were pushed.
const PUSH_INBOX: &str = r#"
local seq = redis.call('INCR', KEYS[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], seq, ARGV[2])
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(ARGV[3]) - 1)
end
for i = 2, 4 do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"#;

/// KEYS: index. ARGV: entry prefix, now, limit. Newest first, unexpired only;
/// drops index entries whose record has already expired away.
const LIST_INBOX: &str = r#"
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, stale, start = {}, {}, 0
while #out < limit do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + 99)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = ARGV[1] .. id
    local expires = redis.call('HGET', key, 'expires_at')
    if not expires then
      stale[#stale + 1] = id
    elseif tonumber(expires) > now then
      out[#out + 1] = redis.call('HGETALL', key)
      if #out >= limit then break end
    end
  end
  start = start + 100
end
for _, id in ipairs(stale) do redis.call('ZREM', KEYS[1], id) end
return out
"#;

/// KEYS: id index, record. ARGV: id, field/value pairs.
const INSERT_API_KEY: &str = r#"
local old = redis.call('HGET', KEYS[2], 'id')
if old then redis.call('HDEL', KEYS[1], old) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('HSET', KEYS[1], ARGV[1], KEYS[2])
return 1
"#;

/// KEYS: id index. Every key record (the index holds their key names, same tag).
const LIST_API_KEYS: &str = r#"
local out = {}
for _, key in ipairs(redis.call('HVALS', KEYS[1])) do
  local k = redis.call('HGETALL', key)
  if #k > 0 then out[#out + 1] = k end
end
return out
"#;

/// KEYS: id index. ARGV: id, at.
const REVOKE_API_KEY: &str = r#"
local key = redis.call('HGET', KEYS[1], ARGV[1])
if not key or redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then
  return 0
end
redis.call('HSET', key, 'revoked_at', ARGV[2])
return 1
"#;

/// KEYS: counter. ARGV: limit, ttl ms. Refuses at the limit without counting.
const HIT_RATE_LIMIT: &str = r#"
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then return {0, count} end
count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, count}
"#;

/// Adds `n` counters, keys from KEYS[k + 1], and per counter from ARGV[a + 1]
/// its amount, ttl ms and ceiling ('' = none): in order, stopping after the
/// first add whose new total exceeds its ceiling. The new totals of the adds made.
const ADD_COUNTERS_FN: &str = r#"
local function add_counters(k, a, n)
  local totals = {}
  for i = 1, n do
    local key, at = KEYS[k + i], a + 3 * i - 2
    local total = redis.call('INCRBY', key, ARGV[at])
    if new_counter(total, ARGV[at]) then redis.call('PEXPIRE', key, ARGV[at + 1]) end
    totals[i] = total
    if ARGV[at + 2] ~= '' and total > tonumber(ARGV[at + 2]) then break end
  end
  return totals
end
"#;

/// KEYS: counters. ARGV: per counter, as `add_counters` takes them.
const ADD_COUNTERS: &str = r#"
return add_counters(0, 0, #KEYS)
"#;

/// Marker scripts share this: KEYS are always (values hash, expiries zset).
/// `keep` lets both keys live until a while after the latest expiry they hold.
const MARKER_PRELUDE: &str = r#"
local function keep(margin)
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if #last == 2 then
    local at = int(tonumber(last[2]) + tonumber(margin))
    redis.call('PEXPIREAT', KEYS[1], at)
    redis.call('PEXPIREAT', KEYS[2], at)
  end
end
"#;

/// ARGV: name, value, expires_at ms, keep ms.
const SET_MARKER: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
keep(ARGV[4])
return 1
"#;

/// ARGV: name, now. {value, expires_at} when live.
const GET_MARKER: &str = r#"
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expires or tonumber(expires) <= tonumber(ARGV[2]) then return false end
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return false end
return {value, int(tonumber(expires))}
"#;

/// ARGV: now. Forgets expired markers, then {name, value, expires_at, …}.
const LIST_MARKERS: &str = r#"
local now = tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, name in ipairs(dead) do
  redis.call('HDEL', KEYS[1], name)
  redis.call('ZREM', KEYS[2], name)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. int(now), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local value = redis.call('HGET', KEYS[1], live[i])
  if value then
    out[#out + 1] = live[i]
    out[#out + 1] = value
    out[#out + 1] = int(tonumber(live[i + 1]))
  end
end
return out
"#;

/// ARGV: name. 1 when a marker was there.
const DELETE_MARKER: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"#;

/// ARGV: name, holder, expires_at ms, now, keep ms. 1 when the caller holds it now.
const CLAIM_MARKER: &str = r#"
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if expires and tonumber(expires) > tonumber(ARGV[4])
  and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
keep(ARGV[5])
return 1
"#;

/// KEYS: record. ARGV: old sealed phone (hex), new. 1 when replaced.
const RESEAL_PHONE: &str = r#"
if redis.call('HGET', KEYS[1], 'phone') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'phone', ARGV[2])
return 1
"#;

struct Scripts {
    claim_id: Script,
    start_send: Script,
    start_send_indexed: Script,
    find_current: Script,
    check_code: RecordScript,
    check_current: Script,
    cancel: RecordScript,
    abort_send: Script,
    expire: Script,
    insert_message: Script,
    insert_message_indexed: Script,
    list_messages: Script,
    update_message: Script,
    purge_message: Script,
    delete_if: Script,
    record_usage: Script,
    read_usage: Script,
    replace_code: Script,
    push_inbox: Script,
    list_inbox: Script,
    insert_api_key: Script,
    list_api_keys: Script,
    revoke_api_key: Script,
    hit_rate_limit: Script,
    add_counters: Script,
    set_marker: Script,
    get_marker: Script,
    list_markers: Script,
    delete_marker: Script,
    claim_marker: Script,
    reseal_phone: Script,
}

/// A script on one verification's record, in the two ways to find it.
struct RecordScript {
    named: Script,
    by_ref: Script,
}

impl RecordScript {
    fn new(body: &str) -> Self {
        Self {
            named: record_script(body, RECORD_NAMED),
            by_ref: record_script(body, RECORD_BY_REF),
        }
    }
}

/// A record body run on the record `finder` finds: `run(R, S, ARGV, HASH)`,
/// with `R` the record's key, `S` its subject (hex) when the finder knows it,
/// the arguments the body reads, and the record field holding the hash a
/// check compares.
fn record_script(body: &str, finder: &str) -> Script {
    Script::new(&format!(
        "{PRELUDE}local function run(R, S, ARGV, HASH)\n{body}\nend\n{finder}"
    ))
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        let marker = |body: &str| Script::new(&format!("{PRELUDE}{MARKER_PRELUDE}{body}"));
        Self {
            claim_id: s(&format!("{CLAIM_FN}{CLAIM_ID}")),
            start_send: s(&format!("{START_SEND_HEAD}{START_SEND}")),
            start_send_indexed: s(&format!(
                "{CLAIM_FN}{ADD_COUNTERS_FN}{START_SEND_INDEXED_HEAD}{START_SEND}{START_SEND_INDEXED_TAIL}"
            )),
            find_current: s(FIND_CURRENT),
            check_code: RecordScript::new(CHECK_CODE),
            check_current: record_script(CHECK_CODE, RECORD_CURRENT),
            cancel: RecordScript::new(CANCEL),
            abort_send: s(ABORT_SEND),
            expire: s(EXPIRE),
            insert_message: s(&format!("{WRITE_MESSAGE_FN}{INSERT_MESSAGE}")),
            insert_message_indexed: s(&format!("{WRITE_MESSAGE_FN}{INSERT_MESSAGE_INDEXED}")),
            list_messages: s(LIST_MESSAGES),
            update_message: s(UPDATE_MESSAGE),
            purge_message: s(PURGE_MESSAGE),
            delete_if: s(DELETE_IF),
            record_usage: s(RECORD_USAGE),
            read_usage: s(READ_USAGE),
            replace_code: s(REPLACE_CODE),
            push_inbox: s(PUSH_INBOX),
            list_inbox: s(LIST_INBOX),
            insert_api_key: s(INSERT_API_KEY),
            list_api_keys: s(LIST_API_KEYS),
            revoke_api_key: s(REVOKE_API_KEY),
            hit_rate_limit: s(HIT_RATE_LIMIT),
            add_counters: s(&format!("{ADD_COUNTERS_FN}{ADD_COUNTERS}")),
            set_marker: marker(SET_MARKER),
            get_marker: marker(GET_MARKER),
            list_markers: marker(LIST_MARKERS),
            delete_marker: marker(DELETE_MARKER),
            claim_marker: marker(CLAIM_MARKER),
            reseal_phone: s(RESEAL_PHONE),
        }
    }
}

// --- encoding ---

type Pairs = Vec<(&'static str, String)>;

fn verification_pairs(v: &Verification) -> Pairs {
    let mut pairs = vec![
        ("id", v.id.to_string()),
        ("tenant", v.tenant.clone()),
        ("subject", to_hex(v.subject.0)),
        ("purpose", v.purpose.clone()),
        ("phone", to_hex(v.phone.to_bytes())),
        ("masked_to", v.masked_to.clone()),
        ("status", v.status.as_str().to_owned()),
        ("attempts", v.attempts.to_string()),
        ("max_attempts", v.max_attempts.to_string()),
        ("send_count", v.send_count.to_string()),
        ("created_at", ms(v.created_at)),
        ("updated_at", ms(v.updated_at)),
        ("expires_at", ms(v.expires_at)),
        ("last_sent_at", ms(v.last_sent_at)),
    ];
    if let Some(uid) = &v.uid {
        pairs.push(("uid", uid.clone()));
    }
    if let Some(country) = &v.country {
        pairs.push(("country", country.clone()));
    }
    if let Some(hash) = &v.code_hash {
        pairs.push(("code_hash", to_hex(hash)));
    }
    if let Some(options) = &v.send_options {
        pairs.push(("send_options", options.to_text()));
    }
    pairs
}

/// `SendPlan::approval_counts` as the check script reads them (see
/// `add_approval_counts`); `None` when there are none, or when one has a
/// ceiling, which that script does not judge (the check counts those after it).
fn approval_counts_field(adds: &[CounterAdd]) -> Option<String> {
    if adds.is_empty() || adds.iter().any(|a| a.ceiling.is_some()) {
        return None;
    }
    let rows: Vec<_> = adds
        .iter()
        .map(|a| (&a.key, a.amount, a.window_seconds))
        .collect();
    serde_json::to_string(&rows).ok()
}

fn message_pairs(m: &MessageRecord) -> Pairs {
    let mut pairs = vec![
        ("id", m.id.to_string()),
        ("verification_id", m.verification_id.to_string()),
        ("tenant", m.tenant.clone()),
        ("route_id", m.route_id.to_string()),
        ("provider", m.provider.clone()),
        ("masked_to", m.masked_to.clone()),
        ("status", m.status.as_str().to_owned()),
        ("rank", m.status.rank().to_string()),
        ("latency_ms", m.latency_ms.to_string()),
        ("created_at", ms(m.created_at)),
        ("updated_at", ms(m.updated_at)),
    ];
    if let Some(pid) = &m.provider_message_id {
        pairs.push(("provider_message_id", pid.clone()));
    }
    if let Some(country) = &m.country {
        pairs.push(("country", country.clone()));
    }
    if let Some(resend_of) = m.resend_of {
        pairs.push(("resend_of", resend_of.to_string()));
    }
    for (field, at) in [
        ("sent_at", m.sent_at),
        ("delivered_at", m.delivered_at),
        ("failed_at", m.failed_at),
    ] {
        if let Some(at) = at {
            pairs.push((field, ms(at)));
        }
    }
    pairs.extend(optional_message_pairs(
        m.error.as_ref(),
        m.cost,
        m.currency.as_ref(),
    ));
    pairs
}

fn optional_message_pairs(
    error: Option<&String>,
    cost: Option<f64>,
    currency: Option<&String>,
) -> Pairs {
    let mut pairs = Vec::new();
    if let Some(error) = error {
        pairs.push(("error", error.clone()));
    }
    if let Some(cost) = cost {
        // Rust prints the shortest string that parses back to the same f64.
        pairs.push(("cost", cost.to_string()));
    }
    if let Some(currency) = currency {
        pairs.push(("currency", currency.clone()));
    }
    pairs
}

fn inbox_pairs(e: &InboxEntry) -> Pairs {
    vec![
        ("id", e.id.to_string()),
        ("tenant", e.tenant.clone()),
        ("phone_index", to_hex(e.phone_index)),
        ("masked_to", e.masked_to.clone()),
        ("sealed_body", to_hex(e.sealed_body.to_bytes())),
        ("created_at", ms(e.created_at)),
        ("expires_at", ms(e.expires_at)),
    ]
}

fn api_key_pairs(k: &ApiKeyRecord) -> Pairs {
    let mut pairs = vec![
        ("id", k.id.clone()),
        ("tenant", k.tenant.clone()),
        ("key_hash", to_hex(k.key_hash)),
        ("created_at", ms(k.created_at)),
    ];
    if let Some(at) = k.revoked_at {
        pairs.push(("revoked_at", ms(at)));
    }
    pairs
}

fn add_pairs(inv: &mut ::redis::ScriptInvocation<'_>, pairs: Pairs) {
    for (field, value) in pairs {
        inv.arg(field).arg(value);
    }
}

// --- decoding ---

/// A hash as HGETALL returned it, borrowed from the reply: a field is copied
/// only when a decoded value keeps it as text.
struct Fields<'a>(HashMap<&'a str, &'a str>);

impl<'a> Fields<'a> {
    fn from_flat(flat: &'a [String]) -> StoreResult<Self> {
        if !flat.len().is_multiple_of(2) {
            return Err(StoreError::Corrupt("odd field list from redis".into()));
        }
        Ok(Self(
            flat.chunks_exact(2)
                .map(|kv| (kv[0].as_str(), kv[1].as_str()))
                .collect(),
        ))
    }

    fn raw(&self, field: &str) -> StoreResult<&'a str> {
        self.0
            .get(field)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("redis record lacks {field}")))
    }

    fn opt(&self, field: &str) -> Option<String> {
        self.0.get(field).map(|v| (*v).to_owned())
    }

    fn text(&self, field: &str) -> StoreResult<String> {
        self.raw(field).map(str::to_owned)
    }

    fn parse<T: FromStr>(&self, field: &str) -> StoreResult<T> {
        self.raw(field)?
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("redis field {field} is malformed")))
    }

    fn time(&self, field: &str) -> StoreResult<DateTime<Utc>> {
        parse_ms(self.raw(field)?)
    }

    fn opt_time(&self, field: &str) -> StoreResult<Option<DateTime<Utc>>> {
        self.0.get(field).map(|raw| parse_ms(raw)).transpose()
    }

    fn bytes(&self, field: &str) -> StoreResult<Vec<u8>> {
        hex::decode(self.raw(field)?)
            .map_err(|_| StoreError::Corrupt(format!("redis field {field} is not hex")))
    }

    fn hash32(&self, field: &str) -> StoreResult<[u8; 32]> {
        self.bytes(field)?
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("redis field {field} is not 32 bytes")))
    }

    fn sealed(&self, field: &str) -> StoreResult<SealedPhone> {
        SealedPhone::from_bytes(&self.bytes(field)?)
            .ok_or_else(|| StoreError::Corrupt(format!("redis field {field} is not sealed data")))
    }
}

fn parse_ms(raw: &str) -> StoreResult<DateTime<Utc>> {
    raw.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .ok_or_else(|| StoreError::Corrupt(format!("redis timestamp {raw:?} is malformed")))
}

fn decode_verification(flat: &[String]) -> StoreResult<Verification> {
    let f = Fields::from_flat(flat)?;
    let status = f.text("status")?;
    Ok(Verification {
        id: f.parse("id")?,
        tenant: f.text("tenant")?,
        subject: SubjectKey(f.hash32("subject")?),
        purpose: f.text("purpose")?,
        uid: f.opt("uid"),
        phone: f.sealed("phone")?,
        masked_to: f.text("masked_to")?,
        country: f.opt("country"),
        code_hash: match f.opt("code_hash") {
            Some(_) => Some(f.hash32("code_hash")?),
            None => None,
        },
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown status {status:?}")))?,
        attempts: f.parse("attempts")?,
        max_attempts: f.parse("max_attempts")?,
        send_count: f.parse("send_count")?,
        created_at: f.time("created_at")?,
        updated_at: f.time("updated_at")?,
        expires_at: f.time("expires_at")?,
        last_sent_at: f.time("last_sent_at")?,
        send_options: f
            .opt("send_options")
            .as_deref()
            .and_then(SendOptions::from_text),
    })
}

fn decode_message(flat: &[String]) -> StoreResult<MessageRecord> {
    let f = Fields::from_flat(flat)?;
    let status = f.text("status")?;
    Ok(MessageRecord {
        id: f.parse("id")?,
        verification_id: f.parse("verification_id")?,
        tenant: f.text("tenant")?,
        route_id: f.parse("route_id")?,
        provider: f.text("provider")?,
        provider_message_id: f.opt("provider_message_id"),
        masked_to: f.text("masked_to")?,
        country: f.opt("country"),
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown delivery status {status:?}")))?,
        error: f.opt("error"),
        cost: match f.opt("cost") {
            Some(_) => Some(f.parse("cost")?),
            None => None,
        },
        currency: f.opt("currency"),
        latency_ms: f.parse("latency_ms")?,
        resend_of: match f.opt("resend_of") {
            Some(_) => Some(f.parse("resend_of")?),
            None => None,
        },
        created_at: f.time("created_at")?,
        sent_at: f.opt_time("sent_at")?,
        delivered_at: f.opt_time("delivered_at")?,
        failed_at: f.opt_time("failed_at")?,
        updated_at: f.time("updated_at")?,
    })
}

/// The field that records when a message reached `status`.
fn stamp_field(status: DeliveryStatus) -> &'static str {
    match status {
        DeliveryStatus::Sent => "sent_at",
        DeliveryStatus::Delivered => "delivered_at",
        DeliveryStatus::Failed | DeliveryStatus::Undelivered => "failed_at",
        DeliveryStatus::Queued | DeliveryStatus::Unknown => "",
    }
}

/// One day's usage hash back into rows.
fn decode_usage(tenant: &str, day: NaiveDate, flat: &[String]) -> StoreResult<Vec<UsageRow>> {
    let fields = Fields::from_flat(flat)?;
    let mut rows: HashMap<(u32, String, String), UsageRow> = HashMap::new();
    for (field, value) in &fields.0 {
        let mut parts = field.splitn(4, '|');
        let (Some(route), Some(country), Some(currency), Some(counter)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(StoreError::Corrupt(format!("usage field {field:?}")));
        };
        let route_id: u32 = route
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("usage field {field:?}")))?;
        let amount: i64 = value
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("usage value {value:?}")))?;
        let row = rows
            .entry((route_id, country.to_owned(), currency.to_owned()))
            .or_insert_with(|| {
                UsageRow::new(
                    tenant,
                    day,
                    route_id,
                    Some(country).filter(|c| !c.is_empty()),
                    Some(currency).filter(|c| !c.is_empty()),
                )
            });
        let count = u64::try_from(amount).unwrap_or(0);
        match counter {
            "sent" => row.sent = count,
            "delivered" => row.delivered = count,
            "failed" => row.failed = count,
            "verifications_started" => row.verifications_started = count,
            "verifications_approved" => row.verifications_approved = count,
            "cost_micros" => row.cost_micros = amount,
            _ => return Err(StoreError::Corrupt(format!("usage field {field:?}"))),
        }
    }
    Ok(rows.into_values().collect())
}

fn decode_inbox(flat: &[String]) -> StoreResult<InboxEntry> {
    let f = Fields::from_flat(flat)?;
    Ok(InboxEntry {
        id: f.parse("id")?,
        tenant: f.text("tenant")?,
        phone_index: f.hash32("phone_index")?,
        masked_to: f.text("masked_to")?,
        sealed_body: f.sealed("sealed_body")?,
        created_at: f.time("created_at")?,
        expires_at: f.time("expires_at")?,
    })
}

fn decode_api_key(flat: &[String]) -> StoreResult<ApiKeyRecord> {
    let f = Fields::from_flat(flat)?;
    Ok(ApiKeyRecord {
        id: f.text("id")?,
        tenant: f.text("tenant")?,
        key_hash: f.hash32("key_hash")?,
        created_at: f.time("created_at")?,
        revoked_at: match f.opt("revoked_at") {
            Some(raw) => Some(parse_ms(&raw)?),
            None => None,
        },
    })
}

/// Splits a script's answer into its verdict and the rest.
/// A record a script answered with as `record_json`: HGETALL's flat list of
/// names and values, as one JSON string. `{}` is how cjson writes an empty one.
fn flat_from_json(raw: &str) -> StoreResult<Vec<String>> {
    if raw == "{}" {
        return Ok(Vec::new());
    }
    serde_json::from_str(raw)
        .map_err(|_| StoreError::Corrupt("malformed record from a redis script".into()))
}

/// What `CHECK_CODE` answered, and whether it added the approval's counts.
fn decode_check(out: &[String]) -> StoreResult<(CheckOutcome, bool)> {
    let (verdict, rest) = verdict(out)?;
    let count = |i: usize| -> StoreResult<u64> {
        nth(rest, i)?
            .parse()
            .map_err(|_| StoreError::Corrupt("malformed count from redis".into()))
    };
    Ok(match verdict {
        "approved" => (
            CheckOutcome::Approved(decode_verification(&flat_from_json(nth(rest, 0)?)?)?),
            rest.get(1).is_some_and(|c| c == "1"),
        ),
        "wrong" => (
            CheckOutcome::Wrong {
                attempts_left: u32::try_from(count(0)?)
                    .map_err(|_| StoreError::Corrupt("attempts left out of range".into()))?,
                masked_to: nth(rest, 1)?.to_owned(),
            },
            false,
        ),
        "guesses_spent" => (
            CheckOutcome::GuessesSpent(WindowCounts {
                previous: count(0)?,
                current: count(1)?,
            }),
            false,
        ),
        "max_attempts" => (CheckOutcome::MaxAttempts, false),
        "not_found" => (CheckOutcome::NotFound, false),
        other => return Err(unexpected(other)),
    })
}

fn verdict(out: &[String]) -> StoreResult<(&str, &[String])> {
    out.split_first()
        .map(|(head, rest)| (head.as_str(), rest))
        .ok_or_else(|| StoreError::Corrupt("empty answer from a redis script".into()))
}

fn unexpected(verdict: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected redis script verdict {verdict:?}"))
}

fn nth(rest: &[String], i: usize) -> StoreResult<&str> {
    rest.get(i)
        .map(String::as_str)
        .ok_or_else(|| StoreError::Corrupt("short answer from a redis script".into()))
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        bounded(async {
            ::redis::cmd("PING")
                .query_async::<String>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        bounded(async {
            let mut inv = self.scripts.insert_api_key.key(self.keys.api_key_ids());
            inv.key(self.keys.api_key(&key.key_hash)).arg(&key.id);
            add_pairs(&mut inv, api_key_pairs(key));
            inv.invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        bounded(async {
            let Some(flat) = self.hash(self.keys.api_key(key_hash)).await? else {
                return Ok(None);
            };
            decode_api_key(&flat).map(Some)
        })
        .await
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        bounded(async {
            let rows: Vec<Vec<String>> = self
                .scripts
                .list_api_keys
                .key(self.keys.api_key_ids())
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let mut keys = rows
                .iter()
                .map(|row| decode_api_key(row))
                .collect::<StoreResult<Vec<_>>>()?;
            keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            Ok(keys)
        })
        .await
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        bounded(async {
            let revoked: i64 = self
                .scripts
                .revoke_api_key
                .key(self.keys.api_key_ids())
                .arg(id)
                .arg(ms(at))
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(revoked == 1)
        })
        .await
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        self.current(tenant, subject, now, true).await
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        Ok(self.send(plan, &[], now).await?.0)
    }

    async fn start_counted_send(
        &self,
        plan: &SendPlan,
        counts: &[CounterAdd],
        now: DateTime<Utc>,
    ) -> StoreResult<(SendDecision, Vec<u64>)> {
        match self.conn {
            // The counters live in other slots than the subject's.
            Conn::Cluster(_) => start_then_count(self, plan, counts, now).await,
            Conn::Node(_) => self.send(plan, counts, now).await,
        }
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        bounded(async {
            let subject = to_hex(abort.subject.0);
            let ended = self
                .scripts
                .abort_send
                .key(self.keys.state(&subject))
                .key(self.keys.record(&subject, abort.verification_id))
                .arg(&abort.tenant)
                .arg(abort.previous_sent_at.map(ms).unwrap_or_default())
                .arg(ms(abort.at))
                .arg(KEEP_ENDED_MS)
                .arg(ms(abort.sent_at))
                .invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            if ended == 1 {
                self.unindex_pending(&subject, abort.verification_id);
            }
            Ok(())
        })
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
        let (outcome, _) = self
            .check(tenant, id, code_hash, budget, false, now)
            .await?;
        Ok(outcome)
    }

    /// On one node the check script adds the counts kept with the record; a
    /// record without them (a cluster's, or one written before they were
    /// kept) is counted after it, as `counts` works them out.
    async fn check_counted_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        now: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        let (outcome, counted) = self
            .check(tenant, id, code_hash, budget, counts.is_some(), now)
            .await?;
        if !counted {
            count_approval_apart(self, &outcome, counts, now).await;
        }
        Ok(outcome)
    }

    /// One node: one script (`RECORD_CURRENT` around `CHECK_CODE`) finds the
    /// subject's current verification and compares the code's hash keyed by
    /// the subject, which the send kept beside the id-keyed one; a record
    /// without it is checked by id after. A cluster finds the id first, then
    /// checks it: the check's counters live in other slots.
    async fn check_current_code(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        hash_for: &CodeHasher,
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        now: DateTime<Utc>,
    ) -> StoreResult<CurrentCheck> {
        if let Conn::Cluster(_) = self.conn {
            return find_then_check(self, tenant, subject, hash_for, budget, counts, now).await;
        }
        let subject_hex = to_hex(subject.0);
        let out: Vec<String> = bounded(async {
            let mut inv = self
                .scripts
                .check_current
                .key(self.keys.state(&subject_hex));
            inv.arg(tenant)
                .arg(to_hex(hash_for.for_subject(subject)))
                .arg(ms(now))
                .arg(KEEP_ENDED_MS);
            for arg in self.guess_args(budget, None, now) {
                inv.arg(arg);
            }
            // The message list, record prefix and id are the script's to fill in.
            inv.arg("")
                .arg("")
                .arg(self.keys.usage_days(tenant))
                .arg(self.keys.pending())
                .arg("")
                .arg(if counts.is_some() {
                    self.keys.counter_head()
                } else {
                    String::new()
                })
                .arg(&subject_hex)
                .arg(self.keys.record_prefix(&subject_hex))
                .arg(self.keys.messages_head());
            inv.invoke_async(&mut self.conn())
                .await
                .map_err(store_error)
        })
        .await?;
        let (verdict, rest) = verdict(&out)?;
        let id = || -> StoreResult<Uuid> {
            nth(rest, 0)?
                .parse()
                .map_err(|_| StoreError::Corrupt("malformed verification id".into()))
        };
        match verdict {
            "none" => Ok(CurrentCheck::NoneCurrent),
            "max_attempts" => Ok(CurrentCheck::MaxAttempts),
            "unhashed" => {
                let id = id()?;
                let outcome = self
                    .check_counted_code(tenant, id, &hash_for.for_id(id), budget, counts, now)
                    .await?;
                Ok(CurrentCheck::Checked(id, outcome))
            }
            "checked" => {
                let id = id()?;
                let (outcome, counted) = decode_check(&rest[1..])?;
                if !counted {
                    count_approval_apart(self, &outcome, counts, now).await;
                }
                Ok(CurrentCheck::Checked(id, outcome))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        bounded(async {
            // Two plain reads cost Redis less than one script that copies the
            // whole hash through Lua (measured: 8 µs against 14 µs).
            let Some(subject) = self.subject_of(id).await? else {
                return Ok(None);
            };
            let Some(flat) = self.hash(self.keys.record(&subject, id)).await? else {
                return Ok(None);
            };
            let v = decode_verification(&flat)?;
            Ok((v.tenant == tenant).then_some(v))
        })
        .await
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        bounded(async {
            let args = [tenant.to_owned(), ms(now), KEEP_ENDED_MS.to_string()];
            let Some((subject, out)) = self.on_record(&self.scripts.cancel, id, &args).await?
            else {
                return Ok(CancelOutcome::NotFound);
            };
            let (verdict, rest) = verdict(&out)?;
            Ok(match verdict {
                "canceled" => {
                    let v = decode_verification(rest)?;
                    self.unindex_pending(&subject, id);
                    CancelOutcome::Canceled(v)
                }
                "not_found" => CancelOutcome::NotFound,
                other => return Err(unexpected(other)),
            })
        })
        .await
    }

    async fn insert_message(
        &self,
        message: &MessageRecord,
        usage: Option<&UsageRow>,
    ) -> StoreResult<()> {
        bounded(async {
            let vid = message.verification_id;
            let record = format!("{}{}", self.keys.message_prefix(vid), message.id);
            let member = message_member(message);
            if let Conn::Node(_) = self.conn {
                // References, indexes and record in one script (see the cluster
                // path below for what each is).
                let mut inv = self.scripts.insert_message_indexed.key(&record);
                inv.key(self.keys.message_list(vid))
                    .key(self.keys.mref(message.id))
                    .key(self.keys.all_messages())
                    .key(self.keys.unfinished(&message.provider));
                if let Some(pid) = &message.provider_message_id {
                    inv.key(self.keys.provider_ref(&message.provider, pid));
                }
                inv.arg(KEEP_MESSAGES_MS)
                    .arg(message.id.to_string())
                    .arg(vid.to_string())
                    .arg(message.created_at.timestamp_millis())
                    .arg(&member)
                    .arg(if is_unfinished(message) { "1" } else { "0" });
                let usage_pairs = usage.map(usage_pairs).unwrap_or_default();
                inv.arg(usage.map_or_else(String::new, |u| self.keys.usage_day(&u.tenant, u.day)))
                    .arg(usage_pairs.len());
                for (field, amount) in usage_pairs {
                    inv.arg(field).arg(amount);
                }
                add_pairs(&mut inv, message_pairs(message));
                inv.invoke_async::<i64>(&mut self.conn())
                    .await
                    .map_err(store_error)?;
                return Ok(());
            }
            // References first: a record nobody can find would be lost.
            let mref = async {
                ::redis::cmd("SET")
                    .arg(self.keys.mref(message.id))
                    .arg(vid.to_string())
                    .arg("PX")
                    .arg(KEEP_MESSAGES_MS)
                    .query_async::<Value>(&mut self.conn())
                    .await
            };
            let provider_ref = async {
                let Some(pid) = &message.provider_message_id else {
                    return Ok(Value::Nil);
                };
                ::redis::cmd("SET")
                    .arg(self.keys.provider_ref(&message.provider, pid))
                    .arg(&record)
                    .arg("PX")
                    .arg(KEEP_MESSAGES_MS)
                    .query_async::<Value>(&mut self.conn())
                    .await
            };
            let indexes = async {
                ::redis::cmd("ZADD")
                    .arg(self.keys.all_messages())
                    .arg(message.created_at.timestamp_millis())
                    .arg(&member)
                    .query_async::<Value>(&mut self.conn())
                    .await?;
                if is_unfinished(message) {
                    ::redis::cmd("ZADD")
                        .arg(self.keys.unfinished(&message.provider))
                        .arg(message.created_at.timestamp_millis())
                        .arg(&member)
                        .query_async::<Value>(&mut self.conn())
                        .await?;
                }
                Ok::<_, RedisError>(())
            };
            let (a, b, c) = tokio::join!(mref, provider_ref, indexes);
            a.map_err(store_error)?;
            b.map_err(store_error)?;
            c.map_err(store_error)?;
            let mut inv = self.scripts.insert_message.key(&record);
            inv.key(self.keys.message_list(vid))
                .arg(KEEP_MESSAGES_MS)
                .arg(message.id.to_string());
            add_pairs(&mut inv, message_pairs(message));
            inv.invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            // A cluster keeps usage in other slots: counted once the record is
            // in, and a failure to count is only logged, as the record is in.
            if let Some(usage) = usage {
                self.add_usage_after(usage).await;
            }
            Ok(())
        })
        .await
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        bounded(async {
            let vid: Option<String> = ::redis::cmd("GET")
                .arg(self.keys.mref(id))
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let Some(vid) = vid else { return Ok(None) };
            let vid: Uuid = vid
                .parse()
                .map_err(|_| StoreError::Corrupt("malformed message reference".into()))?;
            let Some(flat) = self
                .hash(format!("{}{id}", self.keys.message_prefix(vid)))
                .await?
            else {
                return Ok(None);
            };
            let m = decode_message(&flat)?;
            Ok((m.tenant == tenant).then_some(m))
        })
        .await
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        bounded(async {
            let rows: Vec<Vec<String>> = self
                .scripts
                .list_messages
                .key(self.keys.message_list(verification_id))
                .arg(self.keys.message_prefix(verification_id))
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let m = decode_message(&row)?;
                if m.tenant == tenant {
                    out.push(m);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        bounded(async {
            let record: Option<String> = ::redis::cmd("GET")
                .arg(self.keys.provider_ref(provider, provider_message_id))
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let Some(record) = record else {
                return Ok(None);
            };
            let mut inv = self.scripts.update_message.key(record);
            inv.arg(update.status.as_str())
                .arg(update.status.rank())
                .arg(ms(update.at))
                .arg(stamp_field(update.status));
            add_pairs(
                &mut inv,
                optional_message_pairs(
                    update.error.as_ref(),
                    update.cost,
                    update.currency.as_ref(),
                ),
            );
            let out: Option<Vec<String>> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let Some(out) = out.filter(|o| o.len() > 1) else {
                return Ok(None);
            };
            let (previous, rest) = verdict(&out)?;
            let previous = DeliveryStatus::parse(previous).ok_or_else(|| {
                StoreError::Corrupt(format!("unknown delivery status {previous:?}"))
            })?;
            let message = decode_message(rest)?;
            if !is_unfinished(&message) {
                let mut cmd = ::redis::cmd("ZREM");
                cmd.arg(self.keys.unfinished(&message.provider))
                    .arg(message_member(&message));
                self.housekeeping("unindexing a finished message", cmd);
            }
            Ok(Some(MessageTransition { previous, message }))
        })
        .await
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        bounded(async {
            let index = self.keys.unfinished(provider);
            let mut out = Vec::new();
            let mut offset = 0usize;
            // Entries whose record finished or went are dropped as found, so a
            // page can come back short; a few more pages fill it.
            for _ in 0..4 {
                let want = (limit as usize).saturating_sub(out.len());
                if want == 0 {
                    break;
                }
                let members: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
                    .arg(&index)
                    .arg(format!("({}", created_after.timestamp_millis()))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(offset)
                    .arg(want)
                    .query_async(&mut self.conn())
                    .await
                    .map_err(store_error)?;
                let page = members.len();
                let fetched: Vec<StoreResult<(String, Option<MessageRecord>)>> =
                    futures::stream::iter(members)
                        .map(|member| async move {
                            let Some((vid, id)) = parse_message_member(&member) else {
                                return Ok((member, None));
                            };
                            let Some(flat) = self.hash(self.keys.message_record(vid, id)).await?
                            else {
                                return Ok((member, None));
                            };
                            Ok((member, Some(decode_message(&flat)?)))
                        })
                        .buffered(PURGE_CONCURRENCY)
                        .collect()
                        .await;
                let mut stale = Vec::new();
                for item in fetched {
                    match item? {
                        (_, Some(m)) if is_unfinished(&m) => out.push(m),
                        (member, _) => stale.push(member),
                    }
                }
                if page < want {
                    if !stale.is_empty() {
                        let mut cmd = ::redis::cmd("ZREM");
                        cmd.arg(&index).arg(stale);
                        self.housekeeping("unindexing finished messages", cmd);
                    }
                    break;
                }
                // Gone before the next page is read, so that offsets stay true.
                if !stale.is_empty() {
                    ::redis::cmd("ZREM")
                        .arg(&index)
                        .arg(&stale)
                        .query_async::<Value>(&mut self.conn())
                        .await
                        .map_err(store_error)?;
                }
                offset += page - stale.len();
            }
            Ok(out)
        })
        .await
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        bounded(async {
            let index = self.keys.all_messages();
            let due: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(format!("({}", before.timestamp_millis()))
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            if due.is_empty() {
                return Ok(0);
            }
            let outcomes: Vec<StoreResult<(String, Option<String>)>> = futures::stream::iter(due)
                .map(|member| async move {
                    let Some((vid, id)) = parse_message_member(&member) else {
                        return Ok((member, None));
                    };
                    let record = self.keys.message_record(vid, id);
                    let provider: Vec<String> = self
                        .scripts
                        .purge_message
                        .key(&record)
                        .key(self.keys.message_list(vid))
                        .arg(id.to_string())
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(store_error)?;
                    ::redis::cmd("DEL")
                        .arg(self.keys.mref(id))
                        .query_async::<Value>(&mut self.conn())
                        .await
                        .map_err(store_error)?;
                    let provider = match provider.as_slice() {
                        [name, pid] => {
                            self.scripts
                                .delete_if
                                .key(self.keys.provider_ref(name, pid))
                                .arg(&record)
                                .invoke_async::<i64>(&mut self.conn())
                                .await
                                .map_err(store_error)?;
                            Some(name.clone())
                        }
                        _ => None,
                    };
                    Ok((member, provider))
                })
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;
            let mut purged = Vec::with_capacity(outcomes.len());
            let mut by_provider: HashMap<String, Vec<String>> = HashMap::new();
            for outcome in outcomes {
                let (member, provider) = outcome?;
                if let Some(provider) = provider {
                    by_provider
                        .entry(provider)
                        .or_default()
                        .push(member.clone());
                }
                purged.push(member);
            }
            for (provider, members) in by_provider {
                ::redis::cmd("ZREM")
                    .arg(self.keys.unfinished(&provider))
                    .arg(members)
                    .query_async::<Value>(&mut self.conn())
                    .await
                    .map_err(store_error)?;
            }
            let count = purged.len() as u64;
            ::redis::cmd("ZREM")
                .arg(&index)
                .arg(purged)
                .query_async::<Value>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(count)
        })
        .await
    }

    async fn record_usage(&self, d: &UsageRow) -> StoreResult<()> {
        bounded(async {
            let pairs = usage_pairs(d);
            if pairs.is_empty() {
                return Ok(());
            }
            let mut inv = self
                .scripts
                .record_usage
                .key(self.keys.usage_day(&d.tenant, d.day));
            for (field, amount) in pairs {
                inv.arg(field).arg(amount);
            }
            inv.invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        bounded(async {
            let days: Vec<NaiveDate> = from.iter_days().take_while(|d| *d <= to).collect();
            let mut rows = Vec::new();
            for chunk in days.chunks(USAGE_DAYS_PER_SCRIPT) {
                let mut inv = self.scripts.read_usage.prepare_invoke();
                for day in chunk {
                    inv.key(self.keys.usage_day(tenant, *day));
                }
                let hashes: Vec<Vec<String>> = inv
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(store_error)?;
                for (day, flat) in chunk.iter().zip(hashes) {
                    rows.extend(decode_usage(tenant, *day, &flat)?);
                }
            }
            Ok(rows)
        })
        .await
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        bounded(async {
            let Some(subject) = self.subject_of(r.verification_id).await? else {
                return Ok(None);
            };
            let expires_ms = r.expires_at.timestamp_millis();
            let record_ttl = (expires_ms - now.timestamp_millis()).max(0) + KEEP_ENDED_MS;
            // The reference must outlive the record it finds, as on a send.
            self.scripts
                .claim_id
                .key(self.keys.vref(r.verification_id))
                .arg(&subject)
                .arg(record_ttl + REF_MARGIN_MS)
                .invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            let flat: Option<Vec<String>> = self
                .scripts
                .replace_code
                .key(self.keys.record(&subject, r.verification_id))
                .key(self.keys.state(&subject))
                .arg(&r.tenant)
                .arg(r.expected_send_count)
                .arg(to_hex(r.code_hash))
                .arg(expires_ms)
                .arg(ms(now))
                .arg(record_ttl)
                .arg(match (&self.conn, r.subject_code_hash) {
                    (Conn::Node(_), Some(hash)) => to_hex(hash),
                    // As on a send: a cluster compares by id only.
                    _ => String::new(),
                })
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let Some(flat) = flat.filter(|f| !f.is_empty()) else {
                return Ok(None);
            };
            let v = decode_verification(&flat)?;
            let mut cmd = ::redis::cmd("ZADD");
            cmd.arg(self.keys.pending())
                .arg("XX")
                .arg("GT")
                .arg(expires_ms)
                .arg(pending_member(&subject, v.id));
            self.housekeeping("re-indexing a verification", cmd);
            Ok(Some(v))
        })
        .await
    }

    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
        bounded(async {
            let tag = self.keys.inbox_tag(&entry.tenant);
            // Lives as long as the code in it could; push has no clock of its own.
            let ttl = (entry.expires_at - entry.created_at)
                .num_milliseconds()
                .max(1);
            let mut inv = self.scripts.push_inbox.key(format!("{tag}:e:{}", entry.id));
            inv.key(format!("{tag}:all"))
                .key(format!("{tag}:n:{}", to_hex(entry.phone_index)))
                .key(format!("{tag}:seq"))
                .arg(ttl)
                .arg(entry.id.to_string())
                .arg(INBOX_CAPACITY);
            add_pairs(&mut inv, inbox_pairs(entry));
            inv.invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        bounded(async {
            let tag = self.keys.inbox_tag(tenant);
            let index = match phone_index {
                Some(p) => format!("{tag}:n:{}", to_hex(p)),
                None => format!("{tag}:all"),
            };
            let rows: Vec<Vec<String>> = self
                .scripts
                .list_inbox
                .key(index)
                .arg(format!("{tag}:e:"))
                .arg(ms(now))
                .arg(limit.min(INBOX_CAPACITY))
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            rows.iter().map(|row| decode_inbox(row)).collect()
        })
        .await
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        bounded(async {
            let window = i64::from(window_seconds.max(1));
            let index = now.timestamp().div_euclid(window);
            let reset = DateTime::<Utc>::from_timestamp((index + 1) * window, 0).unwrap_or(now);
            // A second past the window's end, so the counter never vanishes early.
            let ttl = (reset - now).num_milliseconds().max(0) + 1000;
            let (allowed, count): (i64, i64) = self
                .scripts
                .hit_rate_limit
                .key(self.keys.rate(key, index))
                .arg(limit)
                .arg(ttl)
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(if allowed == 1 {
                RateDecision::Allowed {
                    remaining: limit.saturating_sub(u32::try_from(count).unwrap_or(u32::MAX)),
                }
            } else {
                RateDecision::Limited {
                    retry_after_seconds: seconds_until(now, reset),
                }
            })
        })
        .await
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let add = CounterAdd {
            key: key.to_owned(),
            amount,
            window_seconds,
            ceiling: None,
        };
        let totals = bounded(self.run_counter_adds(std::slice::from_ref(&add), now)).await?;
        totals
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("no total from the redis counter script".into()))
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let read = CounterRead {
            key,
            window_seconds,
            at: now,
        };
        let totals = self.read_counters(std::slice::from_ref(&read)).await?;
        totals
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("no total from redis".into()))
    }

    async fn read_counters(&self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        bounded(async {
            let keys = reads.iter().map(|r| {
                let (slot, _) = counter_window(r.window_seconds, r.at);
                self.keys.counter(r.key, r.window_seconds, slot)
            });
            let totals: Vec<Option<i64>> = if let Conn::Cluster(_) = self.conn {
                // Counter keys hash to any slot. The cluster client can split an
                // MGET by slot, but some of those splits never got an answer (the
                // call timed out) while nodes were being connected; single GETs,
                // all sent at once, cost the same one round trip.
                futures::future::try_join_all(keys.map(|key| async move {
                    ::redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<i64>>(&mut self.conn())
                        .await
                }))
                .await
            } else {
                ::redis::cmd("MGET")
                    .arg(keys.collect::<Vec<_>>())
                    .query_async(&mut self.conn())
                    .await
            }
            .map_err(store_error)?;
            if totals.len() != reads.len() {
                return Err(StoreError::Corrupt("short MGET answer from redis".into()));
            }
            Ok(totals
                .into_iter()
                .map(|t| t.map_or(0, |t| u64::try_from(t).unwrap_or(0)))
                .collect())
        })
        .await
    }

    async fn add_counters(&self, adds: &[CounterAdd], now: DateTime<Utc>) -> StoreResult<Vec<u64>> {
        if adds.is_empty() {
            return Ok(Vec::new());
        }
        bounded(async {
            if let Conn::Node(_) = self.conn {
                return self.run_counter_adds(adds, now).await;
            }
            // Counter keys hash to any slot and a script cannot span slots, so a
            // cluster makes the adds one script each: in order up to the last add
            // with a ceiling (each may stop the batch), then the rest, which
            // nothing can stop any more, all at once. Not one atomic step here.
            let gated = adds
                .iter()
                .rposition(|a| a.ceiling.is_some())
                .map_or(0, |last| last + 1);
            let mut totals = Vec::with_capacity(adds.len());
            for add in &adds[..gated] {
                let total = self
                    .run_counter_adds(std::slice::from_ref(add), now)
                    .await?;
                totals.extend_from_slice(&total);
                if total.iter().any(|t| add.stops_batch(*t)) {
                    return Ok(totals);
                }
            }
            let rest = futures::future::try_join_all(
                adds[gated..]
                    .iter()
                    .map(|add| self.run_counter_adds(std::slice::from_ref(add), now)),
            )
            .await?;
            totals.extend(rest.into_iter().flatten());
            Ok(totals)
        })
        .await
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        bounded(async {
            let (values, expiries) = self.keys.markers(namespace);
            self.scripts
                .set_marker
                .key(values)
                .key(expiries)
                .arg(name)
                .arg(value)
                .arg(expires_at.timestamp_millis())
                .arg(KEEP_MARKERS_MS)
                .invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        bounded(async {
            let (values, expiries) = self.keys.markers(namespace);
            let found: Option<(String, String)> = self
                .scripts
                .get_marker
                .key(values)
                .key(expiries)
                .arg(name)
                .arg(now.timestamp_millis())
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            found
                .map(|(value, expires_at)| {
                    Ok(Marker {
                        name: name.to_owned(),
                        value,
                        expires_at: parse_ms(&expires_at)?,
                    })
                })
                .transpose()
        })
        .await
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        bounded(async {
            let (values, expiries) = self.keys.markers(namespace);
            let flat: Vec<String> = self
                .scripts
                .list_markers
                .key(values)
                .key(expiries)
                .arg(now.timestamp_millis())
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            if !flat.len().is_multiple_of(3) {
                return Err(StoreError::Corrupt("ragged marker list from redis".into()));
            }
            let mut markers = flat
                .chunks_exact(3)
                .map(|m| {
                    Ok(Marker {
                        name: m[0].clone(),
                        value: m[1].clone(),
                        expires_at: parse_ms(&m[2])?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            markers.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(markers)
        })
        .await
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        bounded(async {
            let (values, expiries) = self.keys.markers(namespace);
            let removed: i64 = self
                .scripts
                .delete_marker
                .key(values)
                .key(expiries)
                .arg(name)
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(removed == 1)
        })
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
        bounded(async {
            let (values, expiries) = self.keys.markers(namespace);
            let claimed: i64 = self
                .scripts
                .claim_marker
                .key(values)
                .key(expiries)
                .arg(name)
                .arg(holder)
                .arg(expires_at.timestamp_millis())
                .arg(now.timestamp_millis())
                .arg(KEEP_MARKERS_MS)
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(claimed == 1)
        })
        .await
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        // A maintenance walk over the pending index (every pending verification
        // is in it), not a request path: no time bound, and records are read
        // a few at a time.
        let members: Vec<String> = ::redis::cmd("ZRANGE")
            .arg(self.keys.pending())
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let mut candidates: Vec<(Uuid, String)> = members
            .iter()
            .filter_map(|m| {
                let (subject, id) = m.split_once(':')?;
                Some((id.parse().ok()?, subject.to_owned()))
            })
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .collect();
        candidates.sort();
        candidates.dedup_by_key(|(id, _)| *id);
        let current = to_hex(current_key.to_be_bytes());
        let mut found = Vec::new();
        for chunk in candidates.chunks(256) {
            let rows: Vec<StoreResult<Option<SealedRecord>>> =
                futures::stream::iter(chunk.to_vec())
                    .map(|(id, subject)| self.sealed_unless_under(id, subject, &current))
                    .buffered(PURGE_CONCURRENCY)
                    .collect()
                    .await;
            for row in rows {
                if let Some(record) = row? {
                    found.push(record);
                    if found.len() >= limit as usize {
                        return Ok(found);
                    }
                }
            }
        }
        Ok(found)
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        bounded(async {
            let Some(subject) = self.subject_of(id).await? else {
                return Ok(false);
            };
            let replaced: i64 = self
                .scripts
                .reseal_phone
                .key(self.keys.record(&subject, id))
                .arg(to_hex(old.to_bytes()))
                .arg(to_hex(new.to_bytes()))
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            Ok(replaced == 1)
        })
        .await
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        bounded(async {
            let pending = self.keys.pending();
            let due: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
                .arg(&pending)
                .arg("-inf")
                .arg(now.timestamp_millis())
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            if due.is_empty() {
                return Ok(0);
            }
            let outcomes: Vec<StoreResult<(String, Vec<String>)>> = futures::stream::iter(due)
                .map(|member| async move {
                    let parsed = member
                        .split_once(':')
                        .and_then(|(s, id)| Some((s.to_owned(), id.parse::<Uuid>().ok()?)));
                    let Some((subject, id)) = parsed else {
                        return Ok((member, vec!["gone".to_owned()]));
                    };
                    let out: Vec<String> = self
                        .scripts
                        .expire
                        .key(self.keys.record(&subject, id))
                        .arg(ms(now))
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(store_error)?;
                    Ok((member, out))
                })
                .buffer_unordered(PURGE_CONCURRENCY)
                .collect()
                .await;

            let mut expired = 0u64;
            let mut remove = ::redis::cmd("ZREM");
            remove.arg(&pending);
            let mut removing = 0;
            let mut requeue = ::redis::cmd("ZADD");
            requeue.arg(&pending).arg("XX").arg("GT");
            let mut requeuing = 0;
            for outcome in outcomes {
                let (member, out) = outcome?;
                let (verdict, rest) = verdict(&out)?;
                match verdict {
                    "expired" | "ended" | "gone" => {
                        expired += u64::from(verdict == "expired");
                        remove.arg(member);
                        removing += 1;
                    }
                    // Resent since it was indexed: due later.
                    "later" => {
                        requeue.arg(nth(rest, 0)?).arg(member);
                        requeuing += 1;
                    }
                    other => return Err(unexpected(other)),
                }
            }
            if removing > 0 {
                remove
                    .query_async::<Value>(&mut self.conn())
                    .await
                    .map_err(store_error)?;
            }
            if requeuing > 0 {
                requeue
                    .query_async::<Value>(&mut self.conn())
                    .await
                    .map_err(store_error)?;
            }
            Ok(expired)
        })
        .await
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        bounded(async {
            // Ended verifications leave the index as they end, so this counts the
            // pending ones (give or take a housekeeping step that failed).
            ::redis::cmd("ZCOUNT")
                .arg(self.keys.pending())
                .arg(format!("({}", now.timestamp_millis()))
                .arg("+inf")
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// How many times `retry_refusals` sends a command failing with `error`
    /// on the first `failures` sends, and whether it then succeeded.
    async fn sends(failures: u32, error: fn() -> RedisError) -> (u32, bool) {
        let count = AtomicU32::new(0);
        let answer = retry_refusals(|| {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n <= failures {
                    Err(error())
                } else {
                    Ok(Value::Okay)
                }
            }
        })
        .await;
        (count.load(Ordering::SeqCst), answer.is_ok())
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_command_is_sent_again_only_when_a_node_refused_it_unrun() {
        let moved = || {
            RedisError::from((
                ErrorKind::Server(::redis::ServerErrorKind::Moved),
                "MOVED",
                "3999 127.0.0.1:7002".to_owned(),
            ))
        };
        let try_again = || {
            RedisError::from((
                ErrorKind::Server(::redis::ServerErrorKind::TryAgain),
                "TRYAGAIN",
                "multiple keys".to_owned(),
            ))
        };
        assert_eq!(sends(2, moved).await, (3, true));
        assert_eq!(sends(1, try_again).await, (2, true));
        assert_eq!(sends(10, moved).await, (1 + CLUSTER_REFUSAL_RETRIES, false));
        // The script may have run before these: never sent again.
        let timed_out = || {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        };
        let dropped = || {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            ))
        };
        let script_error = || {
            RedisError::from((
                ErrorKind::Server(::redis::ServerErrorKind::ResponseError),
                "ERR",
                "user_script:1: error".to_owned(),
            ))
        };
        for error in [timed_out, dropped, script_error] {
            assert_eq!(sends(1, error).await, (1, false));
        }
    }

    #[test]
    fn cluster_urls_become_node_urls() {
        let nodes = cluster_nodes("redis+cluster://127.0.0.1:7001,127.0.0.1:7002")
            .unwrap()
            .unwrap();
        assert_eq!(nodes, ["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"]);
        let nodes = cluster_nodes("rediss+cluster://u:p%40ss@a:1, b:2/?protocol=resp3")
            .unwrap()
            .unwrap();
        assert_eq!(
            nodes,
            [
                "rediss://u:p%40ss@a:1/?protocol=resp3",
                "rediss://u:p%40ss@b:2/?protocol=resp3"
            ]
        );
        assert!(cluster_nodes("redis://127.0.0.1:6379").is_none());
        assert!(cluster_nodes("redis+cluster://").unwrap().is_err());
    }

    /// What Redis Cluster hashes: the first `{…}` with something inside, else the key.
    fn hash_tag(key: &str) -> &str {
        key.find('{')
            .and_then(|open| {
                let close = open + 1 + key[open + 1..].find('}')?;
                (close > open + 1).then(|| &key[open + 1..close])
            })
            .unwrap_or(key)
    }

    #[test]
    fn every_key_a_script_touches_shares_one_hash_tag() {
        let keys = Keys {
            prefix: "otpd".into(),
        };
        let subject = hex::encode([7u8; 32]);
        let id = Uuid::new_v4();
        let state = keys.state(&subject);
        let tag = hash_tag(&state);
        assert_eq!(tag, format!("otpd:s:{subject}"));
        assert_eq!(hash_tag(&keys.record(&subject, id)), tag);
        let (before, after) = keys.record_around(id);
        assert_eq!(
            format!("{before}{subject}{after}"),
            keys.record(&subject, id)
        );
        assert_eq!(
            hash_tag(&format!(
                "{}{}",
                keys.record_prefix(&subject),
                Uuid::new_v4()
            )),
            tag
        );
        let vid = Uuid::new_v4();
        assert_eq!(
            hash_tag(&keys.message_list(vid)),
            hash_tag(&format!("{}{}", keys.message_prefix(vid), Uuid::new_v4()))
        );
        assert_eq!(
            hash_tag(&keys.api_key_ids()),
            hash_tag(&keys.api_key(&[1u8; 32]))
        );
        assert_eq!(
            hash_tag(&keys.message_list(vid)),
            hash_tag(&keys.message_record(vid, Uuid::new_v4()))
        );
        let day = |d| NaiveDate::from_ymd_opt(2030, 1, d).unwrap();
        assert_eq!(
            hash_tag(&keys.usage_day("acme", day(1))),
            hash_tag(&keys.usage_day("acme", day(31)))
        );
        assert_ne!(
            hash_tag(&keys.usage_day("acme", day(1))),
            hash_tag(&keys.usage_day("globex", day(1)))
        );
        let (values, expiries) = keys.markers("guard:acme");
        assert_eq!(hash_tag(&values), "otpd:mk:guard:acme");
        assert_eq!(hash_tag(&values), hash_tag(&expiries));
        let inbox = keys.inbox_tag("tenant-}{");
        assert_eq!(
            hash_tag(&format!("{inbox}:all")),
            hash_tag(&format!("{inbox}:e:x"))
        );
    }

    #[test]
    fn counters_outlive_the_window_after_theirs() {
        let now = Utc.timestamp_millis_opt(1_900_000_030_500).unwrap();
        // 60 s windows: this one ends at 1_900_000_080 s, the next at ..._140 s.
        let (slot, ttl) = counter_window(60, now);
        assert_eq!(slot, 31_666_667);
        assert_eq!(ttl, 109_500 + 1_000);
    }

    #[test]
    fn usage_fields_round_trip_and_stay_separable() {
        let day = NaiveDate::from_ymd_opt(2030, 1, 2).unwrap();
        let flat: Vec<String> = [
            ("3|NL||sent", "2"),
            ("3|NL|EUR|delivered", "1"),
            ("3|NL|EUR|cost_micros", "50000"),
            ("4|||verifications_started", "1"),
        ]
        .iter()
        .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
        .collect();
        let mut rows = decode_usage("acme", day, &flat).unwrap();
        rows.sort_by_key(|r| (r.route_id, r.currency.clone()));
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].route_id, rows[0].sent), (3, 2));
        assert_eq!(rows[0].currency, None);
        assert_eq!(rows[1].currency.as_deref(), Some("EUR"));
        assert_eq!((rows[1].delivered, rows[1].cost_micros), (1, 50_000));
        assert_eq!(
            (rows[2].country.clone(), rows[2].verifications_started),
            (None, 1)
        );
        assert_eq!(usage_part(Some("K|S")), "K_S");
        assert!(decode_usage("acme", day, &["3|NL|x".to_owned(), "1".to_owned()]).is_err());
    }

    #[test]
    fn verifications_round_trip_through_hash_fields() {
        let now = Utc.timestamp_millis_opt(1_900_000_000_123).unwrap();
        let v = Verification {
            id: Uuid::new_v4(),
            tenant: "t".into(),
            subject: SubjectKey([3; 32]),
            purpose: "login".into(),
            uid: Some(String::new()),
            phone: SealedPhone {
                key_id: 9,
                blob: vec![0, 255, 10, 13],
            },
            masked_to: "+*******0670".into(),
            country: None,
            code_hash: Some([0xab; 32]),
            status: Status::Pending,
            attempts: 2,
            max_attempts: 5,
            send_count: 1,
            created_at: now,
            updated_at: now,
            expires_at: now + chrono::Duration::seconds(300),
            last_sent_at: now,
            send_options: None,
        };
        let flat: Vec<String> = verification_pairs(&v)
            .into_iter()
            .flat_map(|(k, val)| [k.to_owned(), val])
            .collect();
        assert_eq!(decode_verification(&flat).unwrap(), v);
    }
}
