//! Abuse protection applied: per-number, per-client, per-tenant and
//! wrong-guess limits, country rules, the SMS-pumping guard and the daily spend
//! budget. Every count and every quarantine lives in the store (shared counters
//! and markers), so the rules hold across instances. The rules themselves are
//! in `domain::limits`; this module feeds them counts and acts on the answer.
//!
//! A send is judged in two steps around the store's atomic start:
//! `admit_send` only reads (so a request refused here, or by the subject's
//! cooldown just after, costs nothing against any limit), and `count_send`
//! counts once the store has accepted the send, refusing if other instances
//! used the last room meanwhile. That keeps every send limit exact under any
//! concurrency: a send succeeds only when its own atomic increment stayed
//! within the limit. The spend budget is the exception: a message's cost is
//! known only once a provider took it, so it is added after delivery, and
//! sends in flight together can pass the budget by their own costs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::crypto::{Crypto, to_hex};
use crate::domain::limits::{
    self, DAY, HOUR, Limit, Traffic, WindowCounts, admit_spend, judge_traffic, micro_units,
};
use crate::domain::{GuardPolicy, PhoneNumber, Policy, Verification};
use crate::metrics::Metrics;
use crate::store::{
    ApprovalCounts, CounterAdd, CounterRead, GuessBudget, Store, StoreError, StoreResult,
};
use crate::telemetry::IpText;

use super::verifications::{CheckError, SendError};

/// Why the guard refused a request: the `reason` of its audit event and of
/// the per-reason block counts `GET /v1/guard` reports.
const BLOCK_REASONS: &[&str] = &[
    "country_not_allowed",
    "quarantined",
    "guard_tripped",
    "daily_spend",
    "number_10min",
    "number_day",
    "ip_10min",
    "tenant_minute",
    "wrong_guesses_hour",
];

/// One send as the guard sees it.
pub struct SendContext<'a> {
    pub tenant: &'a str,
    pub policy: &'a Policy,
    pub to: &'a PhoneNumber,
    pub client_ip: Option<IpAddr>,
    /// What the first route charges for this destination (0 when unpriced).
    pub price_estimate: f64,
}

/// What `admit_send` found; `count_send` counts against it.
#[derive(Debug)]
pub struct Admission {
    tenant: String,
    limits: Vec<Counted>,
    /// Guard counters of sends to the number's country and prefix.
    traffic_keys: Vec<String>,
    /// And of approvals.
    approval_keys: Vec<String>,
}

#[derive(Debug)]
struct Counted {
    limit: Limit,
    key: String,
    max: u32,
    previous: u64,
}

/// A quarantined prefix, as the API and CLI list it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantine {
    pub prefix: String,
    pub reason: String,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
struct QuarantineValue {
    reason: String,
    since: DateTime<Utc>,
}

/// The guard's view of one tenant for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardReport {
    pub quarantines: Vec<Quarantine>,
    /// Requests refused so far this UTC day, by reason (only reasons that occurred).
    pub blocked_today: Vec<(&'static str, u64)>,
}

/// A limit's counter key: its kind and a blind index.
fn named_key(kind: &str, index: &[u8; 32]) -> String {
    format!("{kind}:{}", to_hex(index))
}

/// A guard counter's key; `tag` is the tenant's `tenant_tag`, `name` a
/// prefix's `prefix_tag` or a refusal's reason.
fn traffic_key(what: &str, tag: &str, name: &str) -> String {
    format!("guard:{what}:{tag}:{name}")
}

/// A number's prefix as the guard's counters name it: a blind index, not
/// its digits. On Redis a pending record keeps its approval's counter keys
/// beside its masked last four digits, and the two in clear would narrow the
/// number down to a few hundred, or ten, candidates.
fn prefix_tag(crypto: &Crypto, prefix: &str) -> String {
    to_hex(&crypto.blind_index("guard-prefix", &[prefix])[..12])
}

/// One more send or approval for the pumping rule's hourly counts.
fn traffic_add(key: String) -> CounterAdd {
    CounterAdd {
        key,
        amount: 1,
        window_seconds: HOUR,
        ceiling: None,
    }
}

/// A window's counts from the two totals `CounterRead::window` asked for.
fn window_counts(totals: &[u64]) -> WindowCounts {
    WindowCounts {
        previous: totals.first().copied().unwrap_or(0),
        current: totals.get(1).copied().unwrap_or(0),
    }
}

pub struct AbuseGuard {
    store: Arc<dyn Store>,
    crypto: Arc<Crypto>,
    metrics: Arc<Metrics>,
    /// Each tenant's `tenant_index`: an HMAC that every send (more than
    /// once) and every approval needs, and that never changes for the tenant.
    tenants: RwLock<HashMap<Box<str>, [u8; 32]>>,
}

/// Tenants whose indexes are kept; tenants are few (each is an API key's), so
/// this is only a bound: the map starts over if it fills.
const MAX_CACHED_TENANTS: usize = 4096;

/// The prefixes the pumping guard judges a number by, each with its hourly
/// threshold: the country calling code, and the longer prefix (one level when
/// `prefix_digits` is 0 or the number is too short for more, with the lower
/// threshold). None when the guard is off.
fn guard_levels<'a>(guard: &GuardPolicy, to: &'a PhoneNumber) -> Vec<(&'a str, u32)> {
    if !guard.enabled {
        return Vec::new();
    }
    let country = (to.calling_code(), guard.max_sends_per_country_hour);
    let prefix = (
        to.prefix(guard.prefix_digits.into()),
        guard.max_sends_per_prefix_hour,
    );
    if prefix.0 != country.0 {
        return vec![country, prefix];
    }
    let lower = match (country.1, prefix.1) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
    };
    vec![(country.0, lower)]
}

/// A tenant's part of its counter keys: enough of its index to tell tenants apart.
fn tenant_tag(index: &[u8; 32]) -> String {
    to_hex(&index[..12])
}

fn quarantine_namespace(tenant: &str) -> String {
    format!("guard:q:{tenant}")
}

fn lifted_namespace(tenant: &str) -> String {
    format!("guard:lifted:{tenant}")
}

impl AbuseGuard {
    pub fn new(store: Arc<dyn Store>, crypto: Arc<Crypto>) -> Self {
        Self {
            store,
            crypto,
            metrics: Arc::new(Metrics::disabled()),
            tenants: RwLock::default(),
        }
    }

    /// Counts every refusal in `otpd_blocks_total` by reason, too.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counter keys hold blind indexes, never a number, an address or a raw
    /// tenant name (which may hold characters keys cannot).
    fn key(&self, kind: &str, parts: &[&str]) -> String {
        named_key(
            kind,
            &self.crypto.blind_index(&format!("limit-{kind}"), parts),
        )
    }

    /// `key("tenant", &[tenant])`'s blind index, kept per tenant: it names the
    /// tenant's own send limit and, cut short, tags the guard's keys.
    fn tenant_index(&self, tenant: &str) -> [u8; 32] {
        if let Some(index) = self.tenants.read().get(tenant) {
            return *index;
        }
        let index = self.crypto.blind_index("limit-tenant", &[tenant]);
        let mut tenants = self.tenants.write();
        if tenants.len() >= MAX_CACHED_TENANTS {
            tenants.clear();
        }
        tenants.insert(tenant.into(), index);
        index
    }

    fn tenant_tag(&self, tenant: &str) -> String {
        tenant_tag(&self.tenant_index(tenant))
    }

    fn traffic_key(&self, what: &str, tenant: &str, prefix: &str) -> String {
        traffic_key(what, &self.tenant_tag(tenant), prefix)
    }

    /// Reads only: country rules, quarantines, the spend budget, each send
    /// limit, and the pumping rule for this send. Refusals are logged and counted.
    pub async fn admit_send(
        &self,
        ctx: &SendContext<'_>,
        now: DateTime<Utc>,
    ) -> Result<Admission, SendError> {
        let policy = ctx.policy;
        let country = ctx.to.country();
        if !policy.allows_country(country) {
            self.blocked(ctx.tenant, "country_not_allowed", ctx, now, None)
                .await;
            return Err(SendError::CountryNotAllowed {
                country: country.map(str::to_owned),
            });
        }

        let number = to_hex(self.crypto.phone_index(ctx.tenant, ctx.to));
        let number_key = self.key("num", &[&number]);
        let mut wanted = vec![
            (
                Limit::NumberTenMinutes,
                policy.max_sends_per_number_10min,
                number_key.clone(),
            ),
            (
                Limit::NumberDay,
                policy.max_sends_per_number_day,
                number_key,
            ),
            (
                Limit::TenantMinute,
                policy.max_sends_per_tenant_minute,
                named_key("tenant", &self.tenant_index(ctx.tenant)),
            ),
        ];
        if let Some(ip) = ctx.client_ip {
            let bucket = limits::client_bucket(ip);
            wanted.push((
                Limit::IpTenMinutes,
                policy.max_sends_per_ip_10min,
                self.key("ip", &[ctx.tenant, &bucket]),
            ));
        }
        wanted.retain(|(_, max, _)| *max > 0);

        let guard = &policy.guard;
        let levels = guard_levels(&policy.guard, ctx.to);

        // Every counter this send is judged by, in one store round trip: each
        // limit's two windows, then each prefix's sends and approvals, then spend.
        let tag = self.tenant_tag(ctx.tenant);
        let traffic_keys: Vec<(String, String)> = levels
            .iter()
            .map(|(prefix, _)| {
                let name = prefix_tag(&self.crypto, prefix);
                (
                    traffic_key("sent", &tag, &name),
                    traffic_key("ok", &tag, &name),
                )
            })
            .collect();
        let mut reads: Vec<CounterRead> = Vec::with_capacity(4 * wanted.len() + 1);
        for (limit, _, key) in &wanted {
            reads.extend(CounterRead::window(key, limit.window_seconds(), now));
        }
        for (sent, approved) in &traffic_keys {
            reads.extend(CounterRead::window(sent, HOUR, now));
            reads.extend(CounterRead::window(approved, HOUR, now));
        }
        let spend_key = (policy.daily_spend_limit > 0.0).then(|| self.key("spend", &[ctx.tenant]));
        if let Some(key) = &spend_key {
            reads.push(CounterRead {
                key,
                window_seconds: DAY,
                at: now,
            });
        }
        let namespace = quarantine_namespace(ctx.tenant);
        let (totals, quarantines) = tokio::try_join!(
            self.store.read_counters(&reads),
            self.store.list_markers(&namespace, now)
        )?;
        if totals.len() != reads.len() {
            return Err(StoreError::Corrupt("counter batch answered short".into()).into());
        }
        let (limit_totals, rest) = totals.split_at(2 * wanted.len());
        let (traffic_totals, spend_total) = rest.split_at(4 * traffic_keys.len());
        let limit_counts: Vec<WindowCounts> = limit_totals.chunks(2).map(window_counts).collect();
        let traffic_counts: Vec<(WindowCounts, WindowCounts)> = traffic_totals
            .chunks(4)
            .map(|c| (window_counts(&c[..2]), window_counts(&c[2..])))
            .collect();
        let spent = spend_total.first().copied().unwrap_or(0);

        if let Some(q) = quarantines
            .iter()
            .find(|m| ctx.to.e164().starts_with(&m.name))
        {
            let reason = serde_json::from_str::<QuarantineValue>(&q.value)
                .map(|v| v.reason)
                .unwrap_or_else(|_| "quarantined by the pumping guard".into());
            self.blocked(ctx.tenant, "quarantined", ctx, now, Some(&q.name))
                .await;
            return Err(SendError::SuspectedFraud {
                prefix: q.name.clone(),
                reason,
                until: q.expires_at,
            });
        }

        if let Err(retry_after_seconds) =
            admit_spend(spent, ctx.price_estimate, policy.daily_spend_limit, now)
        {
            self.blocked(ctx.tenant, "daily_spend", ctx, now, None)
                .await;
            return Err(SendError::RateLimited {
                retry_after_seconds,
                limit: Limit::DailySpend.as_str(),
            });
        }

        // Several limits may be full: report the one that frees up last, so a
        // client that waits as told is not refused again by another.
        let refused = wanted
            .iter()
            .zip(&limit_counts)
            .filter_map(|((limit, max, _), counts)| {
                counts
                    .admit(1, *max, limit.window_seconds(), now)
                    .err()
                    .map(|wait| (*limit, wait))
            })
            .max_by_key(|(_, wait)| *wait);
        if let Some((limit, retry_after_seconds)) = refused {
            self.blocked(ctx.tenant, limit.as_str(), ctx, now, None)
                .await;
            return Err(SendError::RateLimited {
                retry_after_seconds,
                limit: limit.as_str(),
            });
        }

        for ((prefix, max_per_hour), (sent, approved)) in levels.iter().zip(&traffic_counts) {
            let traffic = Traffic {
                sends: sent.estimate(HOUR, now) + 1.0,
                approvals: approved.estimate(HOUR, now),
            };
            let Some(reason) = judge_traffic(prefix, traffic, *max_per_hour, guard.min_conversion)
            else {
                continue;
            };
            if self
                .store
                .get_marker(&lifted_namespace(ctx.tenant), prefix, now)
                .await?
                .is_some()
            {
                // An operator lifted this prefix recently: spared until its grace ends.
                continue;
            }
            let until = self
                .quarantine(ctx.tenant, prefix, &reason, guard.quarantine_seconds, now)
                .await?;
            self.blocked(ctx.tenant, "guard_tripped", ctx, now, Some(prefix))
                .await;
            return Err(SendError::SuspectedFraud {
                prefix: (*prefix).to_owned(),
                reason,
                until,
            });
        }

        let mut limits: Vec<Counted> = wanted
            .into_iter()
            .zip(limit_counts)
            .map(|((limit, max, key), counts)| Counted {
                limit,
                key,
                max,
                previous: counts.previous,
            })
            .collect();
        limits.sort_by_key(|c| c.limit.window_seconds());
        let (traffic_keys, approval_keys) = traffic_keys.into_iter().unzip();
        Ok(Admission {
            tenant: ctx.tenant.to_owned(),
            limits,
            traffic_keys,
            approval_keys,
        })
    }

    async fn quarantine(
        &self,
        tenant: &str,
        prefix: &str,
        reason: &str,
        seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<DateTime<Utc>> {
        let until = now + Duration::seconds(seconds.into());
        let value = QuarantineValue {
            reason: reason.to_owned(),
            since: now,
        };
        let value = serde_json::to_string(&value)
            .map_err(|e| StoreError::Corrupt(format!("quarantine record: {e}")))?;
        self.store
            .set_marker(&quarantine_namespace(tenant), prefix, &value, until)
            .await?;
        tracing::warn!(
            target: "audit",
            event = "guard_quarantine",
            tenant,
            prefix,
            reason,
            until = %until.to_rfc3339(),
        );
        Ok(until)
    }

    /// What a started send adds to its counters, made by the store in the
    /// same step as the start (`Store::start_counted_send`), so a send that
    /// the subject's cooldown refuses costs nothing against the number,
    /// client or tenant. One add per limit, shortest window first, each
    /// stopping the batch when concurrent sends took its last room: a send
    /// refused by one limit then takes no room in the longer-window limits
    /// after it (a burst against a per-number limit of 5 gets exactly 5). Its
    /// adds up to the refusing one stay (counters only grow). Traffic counts last.
    pub fn send_counts(&self, admission: &Admission, now: DateTime<Utc>) -> Vec<CounterAdd> {
        admission
            .limits
            .iter()
            .map(|c| CounterAdd {
                key: c.key.clone(),
                amount: 1,
                window_seconds: c.limit.window_seconds(),
                ceiling: WindowCounts {
                    previous: c.previous,
                    current: 0,
                }
                .ceiling(c.max, c.limit.window_seconds(), now),
            })
            .chain(admission.traffic_keys.iter().cloned().map(traffic_add))
            .collect()
    }

    /// What an approval of this send's verification will count: what
    /// `approval_counts` works out from its record.
    pub fn approval_counts_of(&self, admission: &Admission) -> Vec<CounterAdd> {
        admission
            .approval_keys
            .iter()
            .cloned()
            .map(traffic_add)
            .collect()
    }

    /// Judges the totals of `send_counts`' adds: refused only when concurrent
    /// sends took a limit's last room. Refusals are logged and counted.
    pub async fn judge_send_counts(
        &self,
        admission: &Admission,
        counts: &[CounterAdd],
        totals: &[u64],
        now: DateTime<Utc>,
    ) -> Result<(), SendError> {
        for (c, total) in admission.limits.iter().zip(totals) {
            let counts = WindowCounts {
                previous: c.previous,
                current: *total,
            };
            if let Err(retry_after_seconds) = counts.admit(0, c.max, c.limit.window_seconds(), now)
            {
                let reason = c.limit.as_str();
                tracing::warn!(
                    target: "audit",
                    event = "blocked",
                    tenant = %admission.tenant,
                    reason,
                    detail = "concurrent sends took the last room",
                );
                self.count_block(&admission.tenant, reason, now).await;
                return Err(SendError::RateLimited {
                    retry_after_seconds,
                    limit: reason,
                });
            }
        }
        if totals.len() != counts.len() {
            return Err(StoreError::Corrupt("counter batch stopped early".into()).into());
        }
        Ok(())
    }

    /// Adds a delivered message's cost to the tenant's day (when it has a budget).
    pub async fn record_spend(&self, tenant: &str, policy: &Policy, cost: f64, now: DateTime<Utc>) {
        let amount = micro_units(cost);
        if policy.daily_spend_limit <= 0.0 || amount == 0 {
            return;
        }
        let key = self.key("spend", &[tenant]);
        if let Err(e) = self.store.add_to_counter(&key, amount, DAY, now).await {
            tracing::warn!(tenant, error = %e, "could not count a message's cost");
        }
    }

    /// The check refused by the subject's spent guess budget (`counts`, as
    /// the store judged it): logged, counted, and how long until one fits.
    pub async fn refuse_check(
        &self,
        tenant: &str,
        policy: &Policy,
        counts: WindowCounts,
        client_ip: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> CheckError {
        let retry_after_seconds = counts
            .admit(
                1,
                policy.max_wrong_guesses_per_hour,
                GuessBudget::WINDOW_SECONDS,
                now,
            )
            .err()
            .unwrap_or(1);
        let reason = Limit::WrongGuessesHour.as_str();
        tracing::warn!(
            target: "audit",
            event = "blocked",
            tenant,
            reason,
            client_ip = IpText::of(client_ip).as_ref().map(IpText::as_str),
        );
        self.count_block(tenant, reason, now).await;
        CheckError::RateLimited {
            retry_after_seconds,
            limit: reason,
        }
    }

    async fn count_block(&self, tenant: &str, reason: &'static str, now: DateTime<Utc>) {
        self.metrics.record_block(reason);
        let key = self.traffic_key("blocked", tenant, reason);
        if let Err(e) = self.store.add_to_counter(&key, 1, DAY, now).await {
            tracing::warn!(tenant, error = %e, "could not count a block");
        }
    }

    /// What an approval of one of `tenant`'s codes adds to the pumping
    /// guard's conversion counts (an approved code is a real user), for
    /// `Store::check_counted_code`; `None` with the guard off.
    pub fn approval_counts(&self, tenant: &str, policy: &Policy) -> Option<ApprovalCounts> {
        let guard = policy.guard;
        if !guard.enabled {
            return None;
        }
        let crypto = self.crypto.clone();
        // Written out only for an approval: most checks are not one.
        let index = self.tenant_index(tenant);
        Some(Arc::new(move |v: &Verification| {
            let Ok(phone) = crypto.open_stored_phone(&v.phone, v.country.as_deref()) else {
                return Vec::new();
            };
            let tag = tenant_tag(&index);
            guard_levels(&guard, &phone)
                .iter()
                .map(|(prefix, _)| {
                    traffic_add(traffic_key("ok", &tag, &prefix_tag(&crypto, prefix)))
                })
                .collect()
        }))
    }

    /// Logs a refused send and counts it for the tenant's daily report.
    async fn blocked(
        &self,
        tenant: &str,
        reason: &'static str,
        ctx: &SendContext<'_>,
        now: DateTime<Utc>,
        prefix: Option<&str>,
    ) {
        tracing::warn!(
            target: "audit",
            event = "blocked",
            tenant,
            reason,
            to = %ctx.to.masked(),
            country = ctx.to.country(),
            prefix,
            client_ip = IpText::of(ctx.client_ip).as_ref().map(IpText::as_str),
        );
        self.count_block(tenant, reason, now).await;
    }

    /// The tenant's live quarantines (by prefix) and today's block counts.
    pub async fn report(&self, tenant: &str, now: DateTime<Utc>) -> StoreResult<GuardReport> {
        let markers = self
            .store
            .list_markers(&quarantine_namespace(tenant), now)
            .await?;
        let quarantines = markers
            .into_iter()
            .map(|m| {
                let value = serde_json::from_str::<QuarantineValue>(&m.value).ok();
                Quarantine {
                    reason: value
                        .as_ref()
                        .map_or_else(|| m.value.clone(), |v| v.reason.clone()),
                    since: value.map_or(now, |v| v.since),
                    prefix: m.name,
                    until: m.expires_at,
                }
            })
            .collect();
        let tag = self.tenant_tag(tenant);
        let keys: Vec<String> = BLOCK_REASONS
            .iter()
            .map(|reason| traffic_key("blocked", &tag, reason))
            .collect();
        let reads: Vec<CounterRead> = keys
            .iter()
            .map(|key| CounterRead {
                key,
                window_seconds: DAY,
                at: now,
            })
            .collect();
        let counts = self.store.read_counters(&reads).await?;
        Ok(GuardReport {
            quarantines,
            blocked_today: BLOCK_REASONS
                .iter()
                .copied()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .collect(),
        })
    }

    /// Lifts a quarantine; the prefix cannot trip again for `grace_seconds`, so
    /// the hour of traffic that tripped it does not trip it at once again.
    /// `None` when no quarantine of that prefix is live.
    pub async fn lift(
        &self,
        tenant: &str,
        prefix: &str,
        grace_seconds: u32,
        by: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Quarantine>> {
        let ns = quarantine_namespace(tenant);
        let Some(marker) = self.store.get_marker(&ns, prefix, now).await? else {
            return Ok(None);
        };
        self.store
            .set_marker(
                &lifted_namespace(tenant),
                prefix,
                by,
                now + Duration::seconds(grace_seconds.into()),
            )
            .await?;
        self.store.delete_marker(&ns, prefix).await?;
        tracing::warn!(target: "audit", event = "guard_lift", tenant, prefix, by);
        let value = serde_json::from_str::<QuarantineValue>(&marker.value).ok();
        Ok(Some(Quarantine {
            prefix: marker.name,
            reason: value
                .as_ref()
                .map_or_else(|| marker.value.clone(), |v| v.reason.clone()),
            since: value.map_or(now, |v| v.since),
            until: marker.expires_at,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_is_judged_by_country_and_prefix_once_each() {
        let nl = PhoneNumber::parse("+31651860670").unwrap();
        let mut policy = Policy::default();
        assert_eq!(
            guard_levels(&policy.guard, &nl),
            [("+31", 500), ("+31651", 50)]
        );
        policy.guard.prefix_digits = 0;
        assert_eq!(
            guard_levels(&policy.guard, &nl),
            [("+31", 50)],
            "one level, lower threshold"
        );
        policy.guard.max_sends_per_prefix_hour = 0;
        assert_eq!(
            guard_levels(&policy.guard, &nl),
            [("+31", 500)],
            "0 is off, not lowest"
        );
        policy.guard.enabled = false;
        assert!(guard_levels(&policy.guard, &nl).is_empty());
    }

    /// A kept index is the index: the same for the same tenant, across a
    /// full cache starting over, and different for every other tenant; the
    /// tenant's limit key and tag are what they were before it was kept.
    #[test]
    fn a_tenant_keeps_its_own_index() {
        let crypto = Arc::new(Crypto::for_tests());
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::default());
        let guard = AbuseGuard::new(store, crypto.clone());
        let computed = |t: &str| crypto.blind_index("limit-tenant", &[t]);
        assert_eq!(guard.tenant_index("acme"), computed("acme"));
        assert_eq!(guard.tenant_index("acme"), computed("acme"), "read back");
        let indexes: std::collections::HashSet<_> = (0..MAX_CACHED_TENANTS + 10)
            .map(|i| guard.tenant_index(&format!("tenant-{i}")))
            .collect();
        assert_eq!(indexes.len(), MAX_CACHED_TENANTS + 10, "one per tenant");
        assert_eq!(
            guard.tenant_index("acme"),
            computed("acme"),
            "after starting over"
        );
        assert_eq!(guard.tenant_index("tenant-3"), computed("tenant-3"));
        assert_eq!(
            named_key("tenant", &guard.tenant_index("acme")),
            guard.key("tenant", &["acme"])
        );
        assert_eq!(guard.tenant_tag("acme"), to_hex(&computed("acme")[..12]));
    }
}
