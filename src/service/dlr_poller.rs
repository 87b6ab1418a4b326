//! BridgeXAPI pushes no delivery reports, so otpd asks: each BridgeXAPI message
//! still without a final status is polled (`GET /api/v1/dlr/{id}`) on a backoff
//! schedule by its age, until it is final or too old to bother.
//!
//! With several instances on one store, a lease in the store (a marker in the
//! `dlr-poll` namespace, held until the message's next poll is due) lets exactly
//! one instance poll a message per step of the schedule: whoever claims it
//! polls, everyone else skips it until the lease runs out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::delivery::{PolicySource, ReportOutcome};
use super::verifications::VerificationService;
use crate::domain::MessageRecord;
use crate::sms::BridgexProvider;
use crate::sms::bridgexapi::DlrPoll;

const PROVIDER: &str = "bridgexapi";
const LEASES: &str = "dlr-poll";
/// Polls in flight at once per instance.
const CONCURRENCY: usize = 8;
/// Pages of `batch` messages looked at per round.
const MAX_PAGES: usize = 10;
/// The first poll comes this long after the send, then each interval is
/// longer (×3, ×4, then doubling) up to `MAX_INTERVAL`.
const FIRST_POLL: Duration = Duration::seconds(5);
const MAX_INTERVAL: Duration = Duration::minutes(30);
/// A lease outlives the longest poll by this much.
const LEASE_GRACE: Duration = Duration::seconds(5);

/// The age at which a message that is `age` old is next due a poll: 5 s,
/// 20 s, 80 s, 200 s, 440 s, … (intervals 15 s, 60 s, 120 s, 240 s, … 30 min).
pub fn next_poll_age(age: Duration) -> Duration {
    let mut due = FIRST_POLL;
    let mut interval = Duration::seconds(15);
    while due <= age {
        due += interval;
        interval = if interval < Duration::seconds(60) {
            Duration::seconds(60)
        } else {
            (interval * 2).min(MAX_INTERVAL)
        };
    }
    due
}

#[derive(Debug, Clone)]
pub struct PollSettings {
    /// How often the background task runs a round.
    pub interval: StdDuration,
    /// Messages older than this are left alone.
    pub max_age: Duration,
    /// Messages per page.
    pub batch: u32,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Delivery records asked for.
    pub polled: u32,
    /// Messages whose status moved.
    pub updated: u32,
    /// Polls that found no record yet ("dlr record not found").
    pub not_found: u32,
    /// Polls that failed (timeout, outage, garbage).
    pub failed: u32,
}

pub struct DlrPoller {
    service: Arc<VerificationService>,
    policies: Arc<dyn PolicySource>,
    /// BridgeXAPI clients by otpd route id.
    clients: BTreeMap<u32, BridgexProvider>,
    settings: PollSettings,
    /// This instance, in lease holders (for operators reading the markers).
    instance: String,
    /// Messages this instance need not look at before the given time: it polled
    /// them, or saw another instance's lease. Saves a store round trip per
    /// message per round; the lease alone decides who polls.
    not_before: Mutex<HashMap<Uuid, DateTime<Utc>>>,
    /// Where the last round stopped with pages left (after `MAX_PAGES`): the
    /// next goes on from there, so a backlog is swept over several rounds
    /// instead of its oldest pages, mostly not due, being read every round.
    resume_after: Mutex<Option<DateTime<Utc>>>,
}

impl DlrPoller {
    pub fn new(
        service: Arc<VerificationService>,
        policies: Arc<dyn PolicySource>,
        clients: BTreeMap<u32, BridgexProvider>,
        settings: PollSettings,
    ) -> Self {
        Self {
            service,
            policies,
            clients,
            settings,
            instance: Uuid::new_v4().simple().to_string(),
            not_before: Mutex::new(HashMap::new()),
            resume_after: Mutex::new(None),
        }
    }

    /// Whether there is anything to poll (any BridgeXAPI route).
    pub fn has_routes(&self) -> bool {
        !self.clients.is_empty()
    }

    /// Runs `poll_once` every `interval` until `stop` flips. The first round
    /// comes one interval after start.
    pub fn spawn(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let period = self.settings.interval;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                // A round never outlives shutdown by more than the poll in flight.
                tokio::select! {
                    _ = self.poll_once() => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }

    /// One round: every unfinished BridgeXAPI message that is due and whose
    /// lease this instance wins is polled once, and its report applied.
    pub async fn poll_once(&self) -> PollStats {
        let mut stats = PollStats::default();
        if self.clients.is_empty() {
            return stats;
        }
        let now = self.service.clock.now();
        self.not_before.lock().retain(|_, at| *at > now);
        let oldest = now - self.settings.max_age;
        let mut after = self
            .resume_after
            .lock()
            .take()
            .filter(|at| *at > oldest)
            .unwrap_or(oldest);
        let mut swept = false;
        // This round's messages: a page re-reads the millisecond the last
        // one ended in (see below), and these are the ones it already had.
        let mut seen = HashSet::new();
        for _ in 0..MAX_PAGES {
            let page = match self
                .service
                .store
                .list_unfinished_messages(PROVIDER, after, self.settings.batch)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "delivery-report poll: cannot list messages");
                    break;
                }
            };
            let full = page.len() >= self.settings.batch as usize;
            let last_at = page.last().map(|m| m.created_at);
            let fresh: Vec<MessageRecord> =
                page.into_iter().filter(|m| seen.insert(m.id)).collect();
            if let Some(last_at) = last_at {
                // Pages go by creation time, in milliseconds, and more messages
                // than the page held may share its last one: the next page
                // starts a millisecond earlier, so they are not skipped. A page
                // of nothing new means one millisecond holds more than a page:
                // step past it.
                after = if fresh.is_empty() {
                    last_at
                } else {
                    last_at - Duration::milliseconds(1)
                };
            }
            let due: Vec<MessageRecord> =
                fresh.into_iter().filter(|m| self.is_due(m, now)).collect();
            let results: Vec<PollResult> = futures::stream::iter(due)
                .map(|m| self.poll_message(m, now))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            for result in results {
                match result {
                    PollResult::Skipped => {}
                    PollResult::Updated => {
                        stats.polled += 1;
                        stats.updated += 1;
                    }
                    PollResult::Unchanged => stats.polled += 1,
                    PollResult::NotFound => {
                        stats.polled += 1;
                        stats.not_found += 1;
                    }
                    PollResult::Failed => {
                        stats.polled += 1;
                        stats.failed += 1;
                    }
                }
            }
            if !full {
                swept = true;
                break;
            }
        }
        if !swept {
            *self.resume_after.lock() = Some(after);
        }
        stats
    }

    fn is_due(&self, m: &MessageRecord, now: DateTime<Utc>) -> bool {
        now - m.created_at >= FIRST_POLL
            && self.clients.contains_key(&m.route_id)
            && self
                .not_before
                .lock()
                .get(&m.id)
                .is_none_or(|at| *at <= now)
    }

    async fn poll_message(&self, m: MessageRecord, now: DateTime<Utc>) -> PollResult {
        let (Some(client), Some(pid)) = (
            self.clients.get(&m.route_id),
            m.provider_message_id.as_deref(),
        ) else {
            return PollResult::Skipped;
        };
        let next_due = m.created_at + next_poll_age(now - m.created_at);
        self.not_before.lock().insert(m.id, next_due);
        // The lease also covers the poll itself, should the schedule's next
        // step come sooner than a slow provider answers.
        let poll_time = Duration::from_std(client.timeout()).unwrap_or(MAX_INTERVAL);
        let lease_until = next_due.max(now + poll_time + LEASE_GRACE);
        let holder = format!("{}:{}", self.instance, Uuid::new_v4().simple());
        let claimed = self
            .service
            .store
            .claim_marker(LEASES, &m.id.to_string(), &holder, lease_until, now)
            .await;
        match claimed {
            Ok(true) => {}
            Ok(false) => return PollResult::Skipped,
            Err(e) => {
                tracing::warn!(message_id = %m.id, error = %e, "delivery-report poll: no lease");
                return PollResult::Skipped;
            }
        }
        let report = match client.poll_dlr(pid).await {
            Ok(DlrPoll::Report {
                status: Some(status),
                error,
            }) => (status, error),
            Ok(DlrPoll::Report { status: None, .. }) => return PollResult::Unchanged,
            Ok(DlrPoll::NotFound) => return PollResult::NotFound,
            Err(e) => {
                tracing::info!(
                    message_id = %m.id,
                    route_id = m.route_id,
                    error_kind = e.kind.as_str(),
                    error = %e.message,
                    "delivery-report poll failed; retrying on schedule"
                );
                return PollResult::Failed;
            }
        };
        let (status, error) = report;
        let error = error
            .filter(|_| status.is_failure())
            .map(|e| format!("delivery_failed: {e}"))
            .or_else(|| {
                status
                    .is_failure()
                    .then(|| format!("delivery_failed: {}", status.as_str()))
            });
        match self
            .service
            .apply_delivery_report(self.policies.as_ref(), PROVIDER, pid, status, error)
            .await
        {
            Ok(ReportOutcome::Updated { .. }) => PollResult::Updated,
            Ok(_) => PollResult::Unchanged,
            Err(e) => {
                tracing::warn!(message_id = %m.id, error = %e, "delivery-report poll: not recorded");
                PollResult::Failed
            }
        }
    }
}

enum PollResult {
    Skipped,
    Updated,
    Unchanged,
    NotFound,
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_backs_off_to_half_hourly() {
        let s = Duration::seconds;
        assert_eq!(next_poll_age(s(0)), s(5));
        assert_eq!(next_poll_age(s(5)), s(20));
        assert_eq!(next_poll_age(s(19)), s(20));
        assert_eq!(next_poll_age(s(20)), s(80));
        assert_eq!(next_poll_age(s(80)), s(200));
        assert_eq!(next_poll_age(s(200)), s(440));
        let late = next_poll_age(Duration::hours(5));
        let later = next_poll_age(late);
        assert_eq!(later - late, MAX_INTERVAL);
    }
}
