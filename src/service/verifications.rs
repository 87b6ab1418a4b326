//! The OTP lifecycle: send (plan → admit → atomic start → count → deliver →
//! record or undo), check, read and cancel. Abuse rules are `AbuseGuard`'s.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::clock::Clock;
use crate::crypto::{Crypto, to_hex};
use crate::domain::code::{MAX_CODE_LENGTH, MIN_CODE_LENGTH};
use crate::domain::policy::MIN_TTL_SECONDS;
use crate::domain::verification::{MAX_LOCALE_LEN, is_locale_tag};
use crate::domain::{
    Code, CodeGenerator, DeliveryStatus, Dialect, MessageRecord, PhoneNumber, Policy, Purpose,
    SendOptions, Status, SubjectKey, TypedNumber, Verification,
};
use crate::metrics::{CheckResultLabel, Metrics, SendResult};
use crate::sms::router::{DeliveryRequest, RoutingError};
use crate::sms::{DeliveryAttempt, SmsRouter};
use crate::store::{
    ApprovalCounts, CancelOutcome, CheckOutcome, CodeHasher, CodeHashes, CurrentCheck, GuessBudget,
    SendAbort, SendDecision, SendPlan, Store, StoreError,
};
use crate::telemetry::IpText;

use super::delivery::PolicySource;
use super::guard::{AbuseGuard, SendContext};
use super::usage;

/// How many times a send plans: a resend takes two (the first learns the
/// pending id), and another request may change the subject in between.
const MAX_PLAN_ROUNDS: usize = 4;

pub struct VerificationService {
    pub(super) store: Arc<dyn Store>,
    pub(super) router: Arc<SmsRouter>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) codes: Arc<dyn CodeGenerator>,
    pub(super) crypto: Arc<Crypto>,
    guard: AbuseGuard,
    debug_codes: bool,
    pub(super) metrics: Arc<Metrics>,
}

/// Who is asking: the tenant, the policy that applies, and the client's
/// address (for per-client limits and the audit log; `None` when unknown).
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub tenant: &'a str,
    pub policy: &'a Policy,
    pub client_ip: Option<IpAddr>,
}

/// One request to send a code, already parsed.
#[derive(Debug, Clone)]
pub struct SendCommand {
    pub to: PhoneNumber,
    pub purpose: Purpose,
    /// When given, identifies the subject instead of (`to`, `purpose`).
    pub uid: Option<String>,
    pub route_id: Option<u32>,
    pub failover: bool,
    pub sandbox: bool,
    pub locale: Option<String>,
    pub code_length: Option<u8>,
    pub ttl_seconds: Option<u32>,
    /// The client's address, for the per-client limit and the audit log.
    pub client_ip: Option<IpAddr>,
    /// The API it came through, whose policy a re-send follows.
    pub dialect: Dialect,
}

impl SendCommand {
    pub fn new(to: PhoneNumber, purpose: Purpose) -> Self {
        Self {
            to,
            purpose,
            uid: None,
            route_id: None,
            failover: true,
            sandbox: false,
            locale: None,
            code_length: None,
            ttl_seconds: None,
            client_ip: None,
            dialect: Dialect::Native,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendOutcome {
    pub verification: Verification,
    /// The attempt the provider accepted.
    pub delivery: MessageRecord,
    /// Provider-side order id (BridgeXAPI), when the accepting provider has one.
    pub order_id: Option<String>,
    /// Every attempt of this send, in order.
    pub attempts: Vec<MessageRecord>,
    /// Present only when debug codes are enabled.
    pub debug_code: Option<Code>,
    pub expires_in_seconds: u64,
    pub resend_after_seconds: u64,
    pub now: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("a code was sent too recently")]
    Cooldown { retry_after_seconds: u64 },
    #[error("send limit {limit} reached")]
    RateLimited {
        retry_after_seconds: u64,
        limit: &'static str,
    },
    #[error("numbers from this country may not receive codes")]
    CountryNotAllowed { country: Option<String> },
    /// The pumping guard has quarantined the number's prefix.
    #[error("sends to {prefix} are suspended: {reason}")]
    SuspectedFraud {
        prefix: String,
        reason: String,
        until: DateTime<Utc>,
    },
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("every route failed")]
    DeliveryFailed {
        verification_id: Uuid,
        attempts: Vec<MessageRecord>,
    },
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for SendError {
    fn from(e: StoreError) -> Self {
        SendError::Unavailable(e.to_string())
    }
}

/// Which verification a check addresses.
#[derive(Debug, Clone)]
pub enum Target {
    Id(Uuid),
    Uid(String),
    Phone { to: TypedNumber, purpose: Purpose },
}

/// What a check hands the store to compare and count: the typed code's hash
/// for a verification id, the subject's wrong-guess budget (judged and counted
/// in the same step as the compare, so racing wrong guesses cannot overrun
/// it), and the guard's counts for an approval.
struct Comparison {
    hash_for: CodeHasher,
    budget: Option<GuessBudget>,
    counts: Option<ApprovalCounts>,
}

/// A typed code's two hashes (`CodeHashes`).
struct TypedCode {
    crypto: Arc<Crypto>,
    code: Code,
}

impl CodeHashes for TypedCode {
    fn for_id(&self, id: Uuid) -> [u8; 32] {
        self.crypto.code_hash(id, &self.code)
    }

    fn for_subject(&self, subject: &SubjectKey) -> [u8; 32] {
        self.crypto.subject_code_hash(subject, &self.code)
    }
}

/// Hashes under another key and domain than any code's: they match nothing.
struct UnusableGuess(Arc<Crypto>);

impl CodeHashes for UnusableGuess {
    fn for_id(&self, id: Uuid) -> [u8; 32] {
        self.0
            .blind_index("unusable-guess", &[id.to_string().as_str()])
    }

    fn for_subject(&self, subject: &SubjectKey) -> [u8; 32] {
        self.0
            .blind_index("unusable-guess", &[to_hex(subject.0).as_str()])
    }
}

// Returned by value once per request; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum CheckResult {
    Approved(Verification),
    Wrong {
        verification_id: Uuid,
        attempts_left: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no pending verification")]
    NotFound,
    #[error("attempts exhausted")]
    MaxAttempts,
    /// The subject's wrong guesses, across its verifications, reached the limit.
    #[error("check limit {limit} reached")]
    RateLimited {
        retry_after_seconds: u64,
        limit: &'static str,
    },
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for CheckError {
    fn from(e: StoreError) -> Self {
        CheckError::Unavailable(e.to_string())
    }
}

/// A sandbox inbox message, opened for the tenant that owns it.
#[derive(Debug, Clone)]
pub struct InboxMessage {
    pub id: Uuid,
    pub to: String,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

impl VerificationService {
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<SmsRouter>,
        clock: Arc<dyn Clock>,
        codes: Arc<dyn CodeGenerator>,
        crypto: Arc<Crypto>,
        debug_codes: bool,
    ) -> Self {
        Self {
            guard: AbuseGuard::new(store.clone(), crypto.clone()),
            store,
            router,
            clock,
            codes,
            crypto,
            debug_codes,
            metrics: Arc::new(Metrics::disabled()),
        }
    }

    /// Records sends, checks, provider calls and blocks into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.guard =
            AbuseGuard::new(self.store.clone(), self.crypto.clone()).with_metrics(metrics.clone());
        self.metrics = metrics;
        self
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn router(&self) -> &SmsRouter {
        &self.router
    }

    pub fn guard(&self) -> &AbuseGuard {
        &self.guard
    }

    fn subject(
        &self,
        tenant: &str,
        uid: Option<&str>,
        to: &PhoneNumber,
        purpose: &Purpose,
    ) -> SubjectKey {
        match uid {
            Some(uid) => self.crypto.subject_for_uid(tenant, uid),
            None => self
                .crypto
                .subject_for_phone(tenant, to.e164(), purpose.as_str()),
        }
    }

    /// `send`, run to its end even when the caller stops waiting (a client
    /// that hangs up, the request deadline): a started send then still records
    /// its attempts, or gives its code and cooldown back, instead of leaving a
    /// code pending that nothing recorded. The policy is the one `policies`
    /// gives the tenant for the command's API.
    pub async fn send_to_the_end(
        self: &Arc<Self>,
        policies: Arc<dyn PolicySource>,
        tenant: &str,
        cmd: SendCommand,
    ) -> Result<SendOutcome, SendError> {
        let (service, tenant) = (self.clone(), tenant.to_owned());
        super::to_the_end(async move {
            let policy = policies.policy_for(&tenant, cmd.dialect);
            service.send(&tenant, policy, cmd).await
        })
        .await
        .unwrap_or_else(|e| Err(SendError::Unavailable(format!("the send stopped: {e}"))))
    }

    pub async fn send(
        &self,
        tenant: &str,
        policy: &Policy,
        cmd: SendCommand,
    ) -> Result<SendOutcome, SendError> {
        let code_length = cmd.code_length.unwrap_or(policy.code_length);
        if !(MIN_CODE_LENGTH..=MAX_CODE_LENGTH).contains(&code_length) {
            return Err(SendError::InvalidRequest(format!(
                "code_length must be between {MIN_CODE_LENGTH} and {MAX_CODE_LENGTH}"
            )));
        }
        if cmd.locale.as_deref().is_some_and(|l| !is_locale_tag(l)) {
            return Err(SendError::InvalidRequest(format!(
                "locale must be a language tag such as fr or pt-BR (letters, digits, '-' or '_'; at most {MAX_LOCALE_LEN})"
            )));
        }
        let ttl_seconds = cmd.ttl_seconds.unwrap_or(policy.ttl_seconds);
        if !(MIN_TTL_SECONDS..=policy.max_ttl_seconds).contains(&ttl_seconds) {
            return Err(SendError::InvalidRequest(format!(
                "ttl_seconds must be between {MIN_TTL_SECONDS} and {}",
                policy.max_ttl_seconds
            )));
        }
        let chain = self.router.plan(
            &policy.routes,
            cmd.route_id,
            cmd.failover,
            cmd.sandbox,
            cmd.to.country(),
        )?;
        let price_estimate = chain
            .first()
            .and_then(|route| route.price_for(cmd.to.country()))
            .map_or(0.0, |(price, _)| price);
        let admission = self
            .guard
            .admit_send(
                &SendContext {
                    tenant,
                    policy,
                    to: &cmd.to,
                    client_ip: cmd.client_ip,
                    price_estimate,
                },
                self.clock.now(),
            )
            .await?;
        let subject = self.subject(tenant, cmd.uid.as_deref(), &cmd.to, &cmd.purpose);
        let sealed = self
            .crypto
            .seal_phone(&cmd.to)
            .map_err(|e| SendError::Unavailable(e.to_string()))?;

        let mut started = None;
        let mut counted = (Vec::new(), Vec::new());
        // A send plans a new verification first: most have nothing pending, so
        // they need no read before their write. A resend learns the pending id
        // from the store's conflict and plans again under it.
        let mut resend_of = None;
        for _ in 0..MAX_PLAN_ROUNDS {
            let now = self.clock.now();
            // Time-ordered (v7; 74 random bits): SQL stores append to the id
            // index instead of writing a random page of it on every send.
            let id = resend_of.take().unwrap_or_else(Uuid::now_v7);
            let code = self
                .codes
                .generate(code_length)
                .map_err(|e| SendError::Unavailable(e.to_string()))?;
            let verification = Verification {
                id,
                tenant: tenant.to_owned(),
                subject,
                purpose: cmd.purpose.as_str().to_owned(),
                uid: cmd.uid.clone(),
                phone: sealed.clone(),
                masked_to: cmd.to.masked(),
                country: cmd.to.country().map(str::to_owned),
                code_hash: Some(self.crypto.code_hash(id, &code)),
                status: Status::Pending,
                attempts: 0,
                max_attempts: policy.max_attempts,
                send_count: 1,
                created_at: now,
                updated_at: now,
                expires_at: now + Duration::seconds(ttl_seconds.into()),
                last_sent_at: now,
                send_options: Some(SendOptions {
                    dialect: cmd.dialect,
                    code_length,
                    locale: cmd.locale.clone(),
                    route_id: cmd.route_id,
                    failover: cmd.failover,
                }),
            };
            let plan = SendPlan {
                verification,
                cooldown_seconds: policy.cooldown_seconds,
                max_sends_per_window: policy.max_sends_per_window,
                send_window_seconds: policy.send_window_seconds,
                approval_counts: self.guard.approval_counts_of(&admission),
                subject_code_hash: Some(self.crypto.subject_code_hash(&subject, &code)),
            };
            // Counted only if the subject's cooldown lets it through, so a
            // refused request costs nothing against the number, client or tenant.
            let counts = self.guard.send_counts(&admission, now);
            let (decision, totals) = self.store.start_counted_send(&plan, &counts, now).await?;
            match decision {
                SendDecision::Created {
                    verification,
                    previous_sent_at,
                } => {
                    started = Some((verification, previous_sent_at, code, now, true));
                    counted = (counts, totals);
                    break;
                }
                SendDecision::Replaced {
                    verification,
                    previous_sent_at,
                } => {
                    started = Some((verification, previous_sent_at, code, now, false));
                    counted = (counts, totals);
                    break;
                }
                SendDecision::Cooldown {
                    retry_after_seconds,
                } => {
                    self.metrics.record_block("cooldown");
                    return Err(SendError::Cooldown {
                        retry_after_seconds,
                    });
                }
                SendDecision::WindowExhausted {
                    retry_after_seconds,
                } => {
                    self.metrics.record_block("subject_sends_per_window");
                    return Err(SendError::RateLimited {
                        retry_after_seconds,
                        limit: "subject_sends_per_window",
                    });
                }
                SendDecision::Conflict { pending } => resend_of = pending,
            }
        }
        let Some((verification, previous_sent_at, code, now, created)) = started else {
            // Only a burst of concurrent sends for one subject gets here: the
            // winner's cooldown applies to the rest.
            self.metrics.record_block("cooldown");
            return Err(SendError::Cooldown {
                retry_after_seconds: policy.cooldown_seconds.max(1).into(),
            });
        };
        // Refused here only when concurrent sends took a limit's last room;
        // undone then (a resend's old code was already replaced, so it stays dead).
        let (counts, totals) = counted;
        if let Err(refused) = self
            .guard
            .judge_send_counts(&admission, &counts, &totals, now)
            .await
        {
            self.abort(tenant, subject, verification.id, previous_sent_at, now)
                .await?;
            return Err(refused);
        }

        // No store lock or transaction is held across the provider calls.
        let attempts = self
            .router
            .deliver(
                &chain,
                &DeliveryRequest {
                    tenant,
                    verification_id: verification.id,
                    to: &cmd.to,
                    code: &code,
                    locale: cmd.locale.as_deref(),
                    ttl: StdDuration::from_secs(ttl_seconds.into()),
                },
            )
            .await;
        self.metrics.record_delivery_attempts(&attempts);
        let records = self
            .record_attempts(&verification, &attempts, None, created)
            .await;
        let accepted = attempts
            .iter()
            .zip(&records)
            .find(|(a, _)| a.result.is_ok());

        match accepted {
            Some((attempt, record)) => {
                let order_id = attempt
                    .result
                    .as_ref()
                    .ok()
                    .and_then(|r| r.order_id.clone());
                self.metrics.record_send(
                    tenant,
                    attempt.route_id,
                    attempt.provider,
                    SendResult::Sent,
                );
                tracing::info!(
                    target: "audit",
                    event = "send",
                    tenant,
                    verification_id = %verification.id,
                    to = %verification.masked_to,
                    route_id = record.route_id,
                    provider = record.provider,
                    attempts = records.len(),
                    outcome = "sent",
                    client_ip = IpText::of(cmd.client_ip).as_ref().map(IpText::as_str),
                );
                let cost = self.router.budget_cost(record);
                self.guard.record_spend(tenant, policy, cost, now).await;
                Ok(SendOutcome {
                    delivery: record.clone(),
                    order_id,
                    attempts: records.clone(),
                    debug_code: self.debug_codes.then_some(code),
                    expires_in_seconds: u64::from(ttl_seconds),
                    resend_after_seconds: u64::from(policy.cooldown_seconds),
                    verification,
                    now,
                })
            }
            None => {
                self.abort(tenant, subject, verification.id, previous_sent_at, now)
                    .await?;
                if let Some(last) = attempts.last() {
                    self.metrics.record_send(
                        tenant,
                        last.route_id,
                        last.provider,
                        SendResult::Failed,
                    );
                }
                tracing::warn!(
                    target: "audit",
                    event = "send",
                    tenant,
                    verification_id = %verification.id,
                    to = %verification.masked_to,
                    attempts = records.len(),
                    outcome = "delivery_failed",
                    client_ip = IpText::of(cmd.client_ip).as_ref().map(IpText::as_str),
                );
                Err(SendError::DeliveryFailed {
                    verification_id: verification.id,
                    attempts: records,
                })
            }
        }
    }

    /// Undoes a started send: nothing stays pending and the subject's cooldown
    /// and window slot are given back.
    async fn abort(
        &self,
        tenant: &str,
        subject: SubjectKey,
        verification_id: Uuid,
        previous_sent_at: Option<DateTime<Utc>>,
        sent_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.store
            .abort_send(&SendAbort {
                tenant: tenant.to_owned(),
                subject,
                verification_id,
                previous_sent_at,
                sent_at,
                at: self.clock.now(),
            })
            .await
    }

    /// Stores one message record per attempt (`resend_of`: the message whose
    /// failed delivery they rescue), each with what it adds to usage
    /// (`started`: this send created the verification, so its first accepted
    /// attempt also counts a start). A failure to record is logged, not
    /// returned: the SMS has already gone out and the caller must learn that.
    pub(super) async fn record_attempts(
        &self,
        v: &Verification,
        attempts: &[DeliveryAttempt],
        resend_of: Option<Uuid>,
        started: bool,
    ) -> Vec<MessageRecord> {
        let now = self.clock.now();
        let mut started = started;
        let mut records = Vec::with_capacity(attempts.len());
        for a in attempts {
            let (status, error, provider_message_id, cost, currency) = match &a.result {
                Ok(r) => (
                    r.status.unwrap_or(DeliveryStatus::Queued),
                    None,
                    r.provider_message_id.clone(),
                    r.cost,
                    r.currency.clone(),
                ),
                Err(e) => (
                    if e.kind.outcome_unknown() {
                        DeliveryStatus::Unknown
                    } else {
                        DeliveryStatus::Failed
                    },
                    Some(format!("{}: {}", e.kind.as_str(), e.message)),
                    None,
                    None,
                    None,
                ),
            };
            let mut record = MessageRecord {
                id: Uuid::now_v7(),
                verification_id: v.id,
                tenant: v.tenant.clone(),
                route_id: a.route_id,
                provider: a.provider.to_owned(),
                provider_message_id,
                masked_to: v.masked_to.clone(),
                country: v.country.clone(),
                status: DeliveryStatus::Queued,
                error,
                cost,
                currency,
                latency_ms: u32::try_from(a.latency.as_millis()).unwrap_or(u32::MAX),
                resend_of,
                created_at: now,
                sent_at: None,
                delivered_at: None,
                failed_at: None,
                updated_at: now,
            };
            record.mark(status, now);
            let usage = usage::for_new_message(&record).map(|mut delta| {
                delta.verifications_started = u64::from(std::mem::take(&mut started));
                delta
            });
            if let Err(e) = self.store.insert_message(&record, usage.as_ref()).await {
                tracing::error!(verification_id = %v.id, error = %e, "could not record a delivery attempt");
            }
            records.push(record);
        }
        records
    }

    pub async fn check(
        &self,
        caller: &Caller<'_>,
        target: Target,
        code: &Code,
    ) -> Result<CheckResult, CheckError> {
        let hash_for = CodeHasher::of(TypedCode {
            crypto: self.crypto.clone(),
            code: code.clone(),
        });
        self.check_hash(caller, target, hash_for).await
    }

    /// Checks a guess that cannot be any issued code (digits of a length no code
    /// has): it is counted as a wrong attempt, so it answers and costs exactly
    /// like a wrong code. For APIs whose contract accepts such guesses.
    pub async fn check_unusable_guess(
        &self,
        caller: &Caller<'_>,
        target: Target,
    ) -> Result<CheckResult, CheckError> {
        // A hash under another key and domain: it matches no code hash.
        let hash_for = CodeHasher::of(UnusableGuess(self.crypto.clone()));
        self.check_hash(caller, target, hash_for).await
    }

    /// Every check ends here, so each is counted once, whatever the API surface.
    async fn check_hash(
        &self,
        caller: &Caller<'_>,
        target: Target,
        hash_for: CodeHasher,
    ) -> Result<CheckResult, CheckError> {
        let result = self.check_hashed(caller, target, hash_for).await;
        let label = match &result {
            Ok(CheckResult::Approved(_)) => Some(CheckResultLabel::Approved),
            Ok(CheckResult::Wrong { .. }) => Some(CheckResultLabel::Wrong),
            Err(CheckError::NotFound) => Some(CheckResultLabel::NotFound),
            Err(CheckError::MaxAttempts) => Some(CheckResultLabel::MaxAttempts),
            // A refusal by the wrong-guess budget is counted as a block; an
            // outage is no answer about the code (store errors count it).
            Err(CheckError::RateLimited { .. } | CheckError::Unavailable(_)) => None,
        };
        if let Some(label) = label {
            self.metrics.record_check(caller.tenant, label);
        }
        result
    }

    /// Every way of answering "nothing pending" costs the same: the same
    /// lookups, then the same error, whether or not anything ever existed.
    async fn check_hashed(
        &self,
        caller: &Caller<'_>,
        target: Target,
        hash_for: CodeHasher,
    ) -> Result<CheckResult, CheckError> {
        let tenant = caller.tenant;
        let now = self.clock.now();
        let audit = |id: Option<Uuid>, to: Option<&str>, outcome: &str| {
            let mut id_text = Uuid::encode_buffer();
            tracing::info!(
                target: "audit",
                event = "check",
                tenant,
                verification_id = id.map(|id| &*id.hyphenated().encode_lower(&mut id_text)),
                to,
                outcome,
                client_ip = IpText::of(caller.client_ip).as_ref().map(IpText::as_str),
            );
        };
        let compare = Comparison {
            hash_for,
            budget: GuessBudget::new(caller.policy.max_wrong_guesses_per_hour),
            counts: self.guard.approval_counts(tenant, caller.policy),
        };
        let (id, outcome, masked_to) = match target {
            Target::Id(id) => {
                let outcome = self
                    .store
                    .check_counted_code(
                        tenant,
                        id,
                        &compare.hash_for.for_id(id),
                        compare.budget,
                        compare.counts.as_ref(),
                        now,
                    )
                    .await?;
                (id, outcome, None)
            }
            Target::Uid(uid) => {
                let subject = self.crypto.subject_for_uid(tenant, &uid);
                let (id, outcome) = self
                    .check_current(tenant, &subject, &compare, now)
                    .await
                    .inspect_err(|e| audit(None, None, check_error_label(e)))?;
                (id, outcome, None)
            }
            Target::Phone { to, purpose } => {
                let masked = to.masked();
                let (id, outcome) = self
                    .check_number(tenant, &to, &purpose, &compare, now)
                    .await
                    .inspect_err(|e| audit(None, Some(&masked), check_error_label(e)))?;
                (id, outcome, Some(masked))
            }
        };
        let label = match &outcome {
            CheckOutcome::Approved(_) => Some("approved"),
            CheckOutcome::Wrong {
                attempts_left: 0, ..
            } => Some("wrong_last"),
            CheckOutcome::Wrong { .. } => Some("wrong"),
            CheckOutcome::MaxAttempts => Some("max_attempts"),
            CheckOutcome::NotFound => Some("not_found"),
            // The guard's own audit line says it.
            CheckOutcome::GuessesSpent(_) => None,
        };
        let masked_to = match &outcome {
            CheckOutcome::Approved(v) => Some(v.masked_to.as_str()),
            CheckOutcome::Wrong { masked_to, .. } => Some(masked_to.as_str()),
            _ => masked_to.as_deref(),
        };
        if let Some(label) = label {
            audit(Some(id), masked_to, label);
        }
        match outcome {
            // The store counted it in usage and for the guard with the approval itself.
            CheckOutcome::Approved(v) => Ok(CheckResult::Approved(v)),
            CheckOutcome::Wrong { attempts_left, .. } => Ok(CheckResult::Wrong {
                verification_id: id,
                attempts_left,
            }),
            CheckOutcome::GuessesSpent(counts) => Err(self
                .guard
                .refuse_check(tenant, caller.policy, counts, caller.client_ip, now)
                .await),
            CheckOutcome::MaxAttempts => Err(CheckError::MaxAttempts),
            CheckOutcome::NotFound => Err(CheckError::NotFound),
        }
    }

    /// The number as typed first, as it was sent to in most calls; then, if
    /// that finds nothing, as `PhoneNumber::parse` normalises it. What
    /// answers "nothing pending" depends only on what was typed.
    async fn check_number(
        &self,
        tenant: &str,
        to: &TypedNumber,
        purpose: &Purpose,
        compare: &Comparison,
        now: DateTime<Utc>,
    ) -> Result<(Uuid, CheckOutcome), CheckError> {
        let typed = self
            .crypto
            .subject_for_phone(tenant, to.e164(), purpose.as_str());
        match self.check_current(tenant, &typed, compare, now).await {
            Err(CheckError::NotFound) => {}
            checked_or_failed => return checked_or_failed,
        }
        // A number that the plan cannot read was never sent to.
        let Ok(normal) = to.normalise() else {
            return Err(CheckError::NotFound);
        };
        if normal.e164() == to.e164() {
            return Err(CheckError::NotFound);
        }
        let subject = self
            .crypto
            .subject_for_phone(tenant, normal.e164(), purpose.as_str());
        self.check_current(tenant, &subject, compare, now).await
    }

    /// The subject's current verification, checked: its id and the outcome.
    async fn check_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        compare: &Comparison,
        now: DateTime<Utc>,
    ) -> Result<(Uuid, CheckOutcome), CheckError> {
        let found = self
            .store
            .check_current_code(
                tenant,
                subject,
                &compare.hash_for,
                compare.budget,
                compare.counts.as_ref(),
                now,
            )
            .await?;
        match found {
            CurrentCheck::Checked(id, outcome) => Ok((id, outcome)),
            CurrentCheck::MaxAttempts => Err(CheckError::MaxAttempts),
            CurrentCheck::NoneCurrent => Err(CheckError::NotFound),
        }
    }

    /// A verification and its delivery attempts, oldest first.
    pub async fn get(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<(Verification, Vec<MessageRecord>)>, StoreError> {
        let Some(v) = self.store.get_verification(tenant, id).await? else {
            return Ok(None);
        };
        let messages = self.store.list_messages(tenant, id).await?;
        Ok(Some((v, messages)))
    }

    pub async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        client_ip: Option<IpAddr>,
    ) -> Result<Option<Verification>, StoreError> {
        let outcome = self.store.cancel(tenant, id, self.clock.now()).await?;
        let canceled = match outcome {
            CancelOutcome::Canceled(v) => Some(v),
            CancelOutcome::NotFound => None,
        };
        tracing::info!(
            target: "audit",
            event = "cancel",
            tenant,
            verification_id = %id,
            to = canceled.as_ref().map(|v| v.masked_to.as_str()),
            outcome = if canceled.is_some() { "canceled" } else { "not_found" },
            client_ip = IpText::of(client_ip).as_ref().map(IpText::as_str),
        );
        Ok(canceled)
    }

    pub async fn message(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<MessageRecord>, StoreError> {
        self.store.get_message(tenant, id).await
    }

    /// The number a verification was sent to; only the seed dialects need it back.
    pub fn phone_of(&self, v: &Verification) -> Option<PhoneNumber> {
        self.crypto.open_phone(&v.phone).ok()
    }

    pub async fn inbox(
        &self,
        tenant: &str,
        to: Option<&PhoneNumber>,
        limit: u32,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let index = to.map(|p| self.crypto.phone_index(tenant, p));
        let entries = self
            .store
            .list_inbox(tenant, index.as_ref(), self.clock.now(), limit)
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|e| {
                let body = self.crypto.open(&e.sealed_body).ok()?;
                Some(InboxMessage {
                    id: e.id,
                    to: e.masked_to,
                    body: String::from_utf8(body).ok()?,
                    created_at: e.created_at,
                })
            })
            .collect())
    }

    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

fn check_error_label(e: &CheckError) -> &'static str {
    match e {
        CheckError::NotFound => "not_found",
        CheckError::MaxAttempts => "max_attempts",
        CheckError::RateLimited { .. } => "rate_limited",
        CheckError::Unavailable(_) => "unavailable",
    }
}
