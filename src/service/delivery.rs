//! Delivery tracking: applying provider delivery reports (pushed or polled) to
//! message records, counting usage for each status that actually changed, and
//! rescuing a verification whose SMS failed after a provider accepted it by
//! re-sending it over the next untried route of its chain.

use std::collections::HashSet;
use std::time::Duration as StdDuration;

use super::guard::SendContext;
use super::usage::{self, UsageReport};
use super::verifications::{SendError, VerificationService};
use crate::domain::policy::MIN_TTL_SECONDS;
use crate::domain::{DeliveryStatus, Dialect, MessageRecord, Policy};
use crate::sms::router::DeliveryRequest;
use crate::store::{CodeReplacement, MessageUpdate, StoreError, UsageRow};
use chrono::{Duration, NaiveDate};

/// Which policy a tenant's verifications follow through each API (resolved
/// once at start).
pub trait PolicySource: Send + Sync + 'static {
    fn policy_for(&self, tenant: &str, dialect: Dialect) -> &Policy;
}

/// What a delivery report did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// No message has that provider message id (not ours, or already purged).
    UnknownMessage,
    /// A duplicate, or a report of an earlier stage than the message has reached.
    Unchanged(MessageRecord),
    /// The status moved forward; `resent` holds the attempts of the re-send it
    /// triggered, if any.
    Updated {
        message: MessageRecord,
        resent: Vec<MessageRecord>,
    },
}

impl ReportOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ReportOutcome::UnknownMessage => "ignored",
            ReportOutcome::Unchanged(_) => "unchanged",
            ReportOutcome::Updated { .. } => "updated",
        }
    }
}

impl VerificationService {
    /// Applies one provider report about `provider_message_id`. Only a status
    /// that actually moved counts in usage or can trigger a re-send, so
    /// duplicate and late reports change nothing.
    pub async fn apply_delivery_report(
        &self,
        policies: &dyn PolicySource,
        provider: &str,
        provider_message_id: &str,
        status: DeliveryStatus,
        error: Option<String>,
    ) -> Result<ReportOutcome, StoreError> {
        let update = MessageUpdate {
            status,
            error,
            cost: None,
            currency: None,
            at: self.clock.now(),
        };
        let Some(transition) = self
            .store
            .update_message_by_provider_id(provider, provider_message_id, &update)
            .await?
        else {
            tracing::debug!(
                provider,
                "delivery report for an unknown message id; ignored"
            );
            return Ok(ReportOutcome::UnknownMessage);
        };
        if !transition.moved() {
            return Ok(ReportOutcome::Unchanged(transition.message));
        }
        let message = transition.message;
        tracing::info!(
            target: "audit",
            event = "delivery_report",
            tenant = %message.tenant,
            verification_id = %message.verification_id,
            message_id = %message.id,
            route_id = message.route_id,
            provider,
            status = message.status.as_str(),
        );
        if let Some(delta) = usage::for_transition(&message) {
            self.add_usage(&delta).await;
        }
        let resent = if message.status.is_failure() {
            match self.resend_after_failure(policies, &message).await {
                Ok(resent) => resent,
                Err(e) => {
                    tracing::error!(
                        message_id = %message.id,
                        error = %e,
                        "could not re-send after a failed delivery"
                    );
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        Ok(ReportOutcome::Updated { message, resent })
    }

    /// Re-sends a verification whose message `failed` did not arrive: when the
    /// policy allows it, the verification is still pending, and `failed` carried
    /// its current code, a new code goes out over the chain's routes this
    /// verification has not used yet (each route at most once, first come first).
    /// The latest send's options decide as they did for it: its API's policy,
    /// the code's length, the template's locale, and the routes it allowed (a
    /// route pinned without failover was the only one, so nothing is re-sent).
    /// Neither cooldown nor send window applies, and the attempts left stay.
    /// Returns the new attempts (empty when nothing was re-sent).
    async fn resend_after_failure(
        &self,
        policies: &dyn PolicySource,
        failed: &MessageRecord,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let now = self.clock.now();
        let tenant = failed.tenant.as_str();
        let Some(v) = self
            .store
            .get_verification(tenant, failed.verification_id)
            .await?
            .filter(|v| v.is_pending_at(now))
        else {
            return Ok(Vec::new());
        };
        // A record from before otpd kept send options: the tenant's policy and
        // any route of its chain, as then.
        let options = v.send_options.as_ref();
        let policy = policies.policy_for(tenant, options.map_or(Dialect::Native, |o| o.dialect));
        if !policy.resend_on_failed_delivery {
            return Ok(Vec::new());
        }
        let messages = self.store.list_messages(tenant, v.id).await?;
        // Each send replaces the code; only the latest accepted message's code
        // can still be typed in, so an older message's failure needs no rescue.
        if messages
            .iter()
            .rev()
            .find(|m| m.was_accepted())
            .map(|m| m.id)
            != Some(failed.id)
        {
            return Ok(Vec::new());
        }
        // A send that began after `failed` was recorded has replaced its code,
        // even while that send's own message is still with its provider (and
        // so not listed): a re-send now would kill the code it is delivering.
        if v.last_sent_at > failed.created_at {
            return Ok(Vec::new());
        }
        let used: HashSet<u32> = messages.iter().map(|m| m.route_id).collect();
        let Some(to) = self.phone_of(&v) else {
            tracing::error!(verification_id = %v.id, "cannot open the stored number for a re-send");
            return Ok(Vec::new());
        };
        let chain = match self.router.plan(
            &policy.routes,
            options.and_then(|o| o.route_id),
            options.is_none_or(|o| o.failover),
            false,
            to.country(),
        ) {
            Ok(chain) => chain,
            Err(e) => {
                tracing::info!(verification_id = %v.id, reason = %e, "no route to re-send over");
                return Ok(Vec::new());
            }
        };
        let untried: Vec<_> = chain
            .into_iter()
            .filter(|r| !used.contains(&r.id))
            .collect();
        if untried.is_empty() {
            tracing::info!(verification_id = %v.id, "every route of the chain was tried; no re-send");
            return Ok(Vec::new());
        }
        // A re-send is one more SMS to the number: the rules of a send hold
        // (countries, quarantines, the spend budget, the limits, the pumping
        // guard), so a number that reports failures cannot pump the chain.
        let price_estimate = untried[0]
            .price_for(to.country())
            .map_or(0.0, |(price, _)| price);
        let context = SendContext {
            tenant,
            policy,
            to: &to,
            client_ip: None,
            price_estimate,
        };
        let admission = match self.guard().admit_send(&context, now).await {
            Ok(admission) => admission,
            Err(SendError::Unavailable(cause)) => return Err(StoreError::Unavailable(cause)),
            Err(refused) => {
                tracing::info!(
                    target: "audit",
                    event = "resend_refused",
                    tenant,
                    verification_id = %v.id,
                    to = %v.masked_to,
                    reason = %refused,
                );
                return Ok(Vec::new());
            }
        };

        // The new code lives as long as the last one was given.
        let ttl_seconds = (v.expires_at - v.last_sent_at)
            .num_seconds()
            .max(i64::from(MIN_TTL_SECONDS));
        let code = self
            .codes
            .generate(options.map_or(policy.code_length, |o| o.code_length))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let replacement = CodeReplacement {
            tenant: tenant.to_owned(),
            verification_id: v.id,
            expected_send_count: v.send_count,
            code_hash: self.crypto.code_hash(v.id, &code),
            subject_code_hash: Some(self.crypto.subject_code_hash(&v.subject, &code)),
            expires_at: now + Duration::seconds(ttl_seconds),
        };
        // A send, check or cancel since we looked wins: nothing to rescue then.
        let Some(v) = self.store.replace_code(&replacement, now).await? else {
            return Ok(Vec::new());
        };
        let counts = self.guard().send_counts(&admission, now);
        if let Err(e) = self.store.add_counters(&counts, now).await {
            tracing::warn!(verification_id = %v.id, error = %e, "could not count a re-send");
        }
        let attempts = self
            .router
            .deliver(
                &untried,
                &DeliveryRequest {
                    tenant,
                    verification_id: v.id,
                    to: &to,
                    code: &code,
                    locale: options.and_then(|o| o.locale.as_deref()),
                    ttl: StdDuration::from_secs(u64::try_from(ttl_seconds).unwrap_or(0)),
                },
            )
            .await;
        self.metrics.record_delivery_attempts(&attempts);
        let records = self
            .record_attempts(&v, &attempts, Some(failed.id), false)
            .await;
        let accepted = records.iter().find(|m| m.was_accepted());
        if let Some(m) = accepted {
            // A re-send costs like any send: it counts against the day's budget.
            let cost = self.router.budget_cost(m);
            self.guard().record_spend(tenant, policy, cost, now).await;
        }
        tracing::info!(
            target: "audit",
            event = "resend_after_failed_delivery",
            tenant,
            verification_id = %v.id,
            to = %v.masked_to,
            failed_message_id = %failed.id,
            route_id = accepted.map(|m| m.route_id),
            attempts = records.len(),
            outcome = if accepted.is_some() { "sent" } else { "delivery_failed" },
        );
        Ok(records)
    }

    /// Usage is accounting, not a decision: a failure to count is logged and the
    /// request it belongs to goes on.
    async fn add_usage(&self, delta: &UsageRow) {
        if let Err(e) = self.store.record_usage(delta).await {
            tracing::warn!(tenant = %delta.tenant, error = %e, "usage not recorded");
        }
    }

    /// The tenant's usage from `from` to `to` (inclusive, UTC days).
    pub async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<UsageReport, StoreError> {
        let rows = self.store.usage(tenant, from, to).await?;
        Ok(usage::report(from, to, &rows))
    }
}
