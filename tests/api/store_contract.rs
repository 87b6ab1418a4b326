//! The conformance suite every `Store` backend must pass. Each case takes a fresh
//! store handle; cases use their own random tenants and subjects so that backends
//! shared between tests (Redis, PostgreSQL) can run them in parallel.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use otpd::crypto::Crypto;
use otpd::domain::limits::WindowCounts;
use otpd::domain::{
    ApiKeyRecord, Code, DeliveryStatus, Dialect, MessageRecord, PhoneNumber, SendOptions, Status,
    SubjectKey, Verification,
};
use otpd::store::{
    ApprovalCounts, CancelOutcome, CheckOutcome, CodeHasher, CounterAdd, CounterRead, CurrentCheck,
    GuessBudget, InboxEntry, MessageUpdate, RateDecision, SendAbort, SendDecision, SendPlan, Store,
};
use uuid::Uuid;

pub type DynStore = Arc<dyn Store>;

const MAX_ATTEMPTS: u32 = 5;
/// How every fixture number (+31651860670) is shown.
const MASKED: &str = "+*******0670";

pub(crate) fn t0() -> DateTime<Utc> {
    // Millisecond precision: every backend must round-trip it exactly.
    Utc.timestamp_millis_opt(1_900_000_000_123)
        .single()
        .unwrap()
}

fn tenant() -> String {
    format!("tenant-{}", Uuid::new_v4().simple())
}

fn subject() -> SubjectKey {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    k[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    SubjectKey(k)
}

fn crypto() -> Crypto {
    Crypto::for_tests()
}

/// A tenant and subject of their own, and the crypto to hash their codes.
pub(crate) struct Fixture {
    pub(crate) tenant: String,
    pub(crate) subject: SubjectKey,
    crypto: Crypto,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        Self {
            tenant: tenant(),
            subject: subject(),
            crypto: crypto(),
        }
    }

    pub(crate) fn verification(&self, id: Uuid, code: &str, now: DateTime<Utc>) -> Verification {
        let phone = PhoneNumber::parse("+31651860670").unwrap();
        Verification {
            id,
            tenant: self.tenant.clone(),
            subject: self.subject,
            purpose: "login".into(),
            uid: None,
            phone: self.crypto.seal_phone(&phone).unwrap(),
            masked_to: phone.masked(),
            country: Some("NL".into()),
            code_hash: Some(self.hash(id, code)),
            status: Status::Pending,
            attempts: 0,
            max_attempts: MAX_ATTEMPTS,
            send_count: 1,
            created_at: now,
            updated_at: now,
            expires_at: now + Duration::seconds(300),
            last_sent_at: now,
            send_options: Some(SendOptions {
                dialect: Dialect::Bridgex,
                code_length: 8,
                locale: Some("pt-BR".into()),
                route_id: Some(3),
                failover: false,
            }),
        }
    }

    pub(crate) fn hash(&self, id: Uuid, code: &str) -> [u8; 32] {
        self.crypto.code_hash(id, &Code::parse(code).unwrap())
    }

    /// A plan without the code's hash by subject, as builds before it wrote.
    pub(crate) fn plan(&self, v: Verification) -> SendPlan {
        SendPlan {
            verification: v,
            cooldown_seconds: 30,
            max_sends_per_window: 3,
            send_window_seconds: 600,
            approval_counts: Vec::new(),
            subject_code_hash: None,
        }
    }

    /// A plan as the service makes it, with the code's hash by subject too.
    pub(crate) fn plan_coded(&self, v: Verification, code: &str) -> SendPlan {
        SendPlan {
            subject_code_hash: Some(self.subject_hash(code)),
            ..self.plan(v)
        }
    }

    pub(crate) fn subject_hash(&self, code: &str) -> [u8; 32] {
        self.crypto
            .subject_code_hash(&self.subject, &Code::parse(code).unwrap())
    }

    /// Both of `code`'s hashes, as a check by number asks for them.
    pub(crate) fn hasher(self: &Arc<Self>, code: &'static str) -> CodeHasher {
        let (f, g) = (self.clone(), self.clone());
        CodeHasher::new(move |id| f.hash(id, code), move |_| g.subject_hash(code))
    }

    /// Spends every attempt of verification `id` on wrong codes.
    pub(crate) async fn spend_attempts(&self, store: &DynStore, id: Uuid, now: DateTime<Utc>) {
        for _ in 0..MAX_ATTEMPTS {
            store
                .check_code(&self.tenant, id, &self.hash(id, "000000"), None, now)
                .await
                .unwrap();
        }
    }

    /// Creates a pending verification with `code`; returns its id.
    /// The first re-send of `id` after a failed delivery: a new code, expiring at `expires_at`.
    pub(crate) fn resend(
        &self,
        id: Uuid,
        code: &str,
        expires_at: DateTime<Utc>,
    ) -> otpd::store::CodeReplacement {
        otpd::store::CodeReplacement {
            tenant: self.tenant.clone(),
            verification_id: id,
            expected_send_count: 1,
            code_hash: self.hash(id, code),
            subject_code_hash: None,
            expires_at,
        }
    }

    pub(crate) async fn start(&self, store: &DynStore, code: &str, now: DateTime<Utc>) -> Uuid {
        let id = Uuid::new_v4();
        let decision = store
            .start_send(
                &self.plan_coded(self.verification(id, code, now), code),
                now,
            )
            .await
            .unwrap();
        assert!(
            matches!(decision, SendDecision::Created { .. }),
            "{decision:?}"
        );
        id
    }
}

pub async fn created_verification_reads_back_exactly(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = Uuid::new_v4();
    let v = f.verification(id, "123456", now);
    store.start_send(&f.plan(v.clone()), now).await.unwrap();
    assert_eq!(
        store.get_verification(&f.tenant, id).await.unwrap(),
        Some(v)
    );
    assert_eq!(
        store
            .find_pending(&f.tenant, &f.subject, now)
            .await
            .unwrap(),
        Some(id)
    );
}

/// What a send and an approval answer with is the record as stored, text that
/// needs escaping in JSON or Lua included.
pub async fn send_and_approval_answer_with_the_stored_record(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = Uuid::new_v4();
    let v = Verification {
        uid: Some("ü \"quoted\" \\ back/slash\n\u{1}{}[]".into()),
        ..f.verification(id, "123456", now)
    };
    let decision = store.start_send(&f.plan(v.clone()), now).await.unwrap();
    let SendDecision::Created { verification, .. } = decision else {
        panic!("expected a new verification, got {decision:?}");
    };
    assert_eq!(verification, v);
    let later = now + Duration::seconds(5);
    let outcome = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, later)
        .await
        .unwrap();
    let CheckOutcome::Approved(approved) = outcome else {
        panic!("expected approval, got {outcome:?}");
    };
    assert_eq!(
        approved,
        Verification {
            status: Status::Approved,
            code_hash: None,
            updated_at: later,
            ..v
        }
    );
}

pub async fn right_code_approves_once(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let outcome = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    let CheckOutcome::Approved(v) = outcome else {
        panic!("expected approval, got {outcome:?}");
    };
    assert_eq!(v.status, Status::Approved);
    assert_eq!(v.code_hash, None, "secret material is erased on approval");
    let again = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert_eq!(again, CheckOutcome::NotFound, "a code is single use");
    assert_eq!(
        store
            .find_pending(&f.tenant, &f.subject, now)
            .await
            .unwrap(),
        None
    );
}

pub async fn wrong_guesses_count_down_then_kill(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    for left in (0..MAX_ATTEMPTS).rev() {
        let outcome = store
            .check_code(&f.tenant, id, &f.hash(id, "000000"), None, now)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            CheckOutcome::Wrong {
                attempts_left: left,
                masked_to: MASKED.into(),
            }
        );
    }
    let right = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert_eq!(
        right,
        CheckOutcome::MaxAttempts,
        "the right code fails once attempts are spent"
    );
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, Status::MaxAttempts);
    assert_eq!(v.code_hash, None);
}

/// A guess whose hash is the code's with one byte changed (first, middle or
/// last) is wrong: the comparison covers every byte, and only equal hashes
/// approve.
pub async fn hashes_one_byte_off_are_wrong(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let right = f.hash(id, "123456");
    for (i, at) in [0, 16, 31].into_iter().enumerate() {
        let mut off = right;
        off[at] ^= 1;
        let outcome = store
            .check_code(&f.tenant, id, &off, None, now)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            CheckOutcome::Wrong {
                attempts_left: MAX_ATTEMPTS - 1 - i as u32,
                masked_to: MASKED.into(),
            },
            "byte {at} changed"
        );
    }
    let outcome = store
        .check_code(&f.tenant, id, &right, None, now)
        .await
        .unwrap();
    assert!(matches!(outcome, CheckOutcome::Approved(_)), "{outcome:?}");
}

pub async fn find_current_sees_pending_and_dead_but_not_ended(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let current = store
        .find_current(&f.tenant, &f.subject, now)
        .await
        .unwrap();
    assert_eq!(current, Some((id, Status::Pending)));
    f.spend_attempts(&store, id, now).await;
    let dead = store
        .find_current(&f.tenant, &f.subject, now)
        .await
        .unwrap();
    assert_eq!(
        dead,
        Some((id, Status::MaxAttempts)),
        "a dead verification still answers max_attempts"
    );
    assert_eq!(
        store
            .find_pending(&f.tenant, &f.subject, now)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .find_current(&tenant(), &f.subject, now)
            .await
            .unwrap(),
        None
    );
    let later = now + Duration::seconds(300);
    assert_eq!(
        store
            .find_current(&f.tenant, &f.subject, later)
            .await
            .unwrap(),
        None,
        "expired"
    );

    let g = Fixture::new();
    let id = g.start(&store, "123456", now).await;
    store
        .check_code(&g.tenant, id, &g.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert_eq!(
        store
            .find_current(&g.tenant, &g.subject, now)
            .await
            .unwrap(),
        None,
        "approved"
    );
}

pub async fn expired_code_is_not_found(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let later = now + Duration::seconds(300);
    let outcome = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, later)
        .await
        .unwrap();
    assert_eq!(outcome, CheckOutcome::NotFound);
    assert_eq!(
        store
            .find_pending(&f.tenant, &f.subject, later)
            .await
            .unwrap(),
        None
    );
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status_at(later), Status::Expired);
}

pub async fn cooldown_then_resend_keeps_attempts(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    store
        .check_code(&f.tenant, id, &f.hash(id, "000000"), None, now)
        .await
        .unwrap();

    let soon = now + Duration::seconds(10);
    let blocked = store
        .start_send(&f.plan(f.verification(id, "222222", soon)), soon)
        .await
        .unwrap();
    assert_eq!(
        blocked,
        SendDecision::Cooldown {
            retry_after_seconds: 20
        }
    );

    let later = now + Duration::seconds(31);
    let mut resend = f.verification(id, "222222", later);
    resend.expires_at = later + Duration::seconds(300);
    let decision = store.start_send(&f.plan(resend), later).await.unwrap();
    let SendDecision::Replaced {
        verification,
        previous_sent_at,
    } = decision
    else {
        panic!("expected replace, got {decision:?}");
    };
    assert_eq!(previous_sent_at, Some(now));
    assert_eq!(verification.id, id);
    assert_eq!(
        verification.attempts, 1,
        "a resend never restores spent attempts"
    );
    assert_eq!(verification.send_count, 2);
    assert_eq!(verification.expires_at, later + Duration::seconds(300));

    let old = store
        .check_code(&f.tenant, id, &f.hash(id, "111111"), None, later)
        .await
        .unwrap();
    assert_eq!(
        old,
        CheckOutcome::Wrong {
            attempts_left: MAX_ATTEMPTS - 2,
            masked_to: MASKED.into(),
        },
        "the old code is replaced"
    );
    let new = store
        .check_code(&f.tenant, id, &f.hash(id, "222222"), None, later)
        .await
        .unwrap();
    assert!(matches!(new, CheckOutcome::Approved(_)));
}

/// A resend goes to the number it names, as it asked (a re-send after a
/// failed delivery repeats the latest send's options).
pub async fn a_resend_records_its_number_and_options(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let first = store.get_verification(&f.tenant, id).await.unwrap();
    assert_eq!(
        first.and_then(|v| v.send_options),
        f.verification(id, "111111", now).send_options,
        "a created verification keeps its send options"
    );
    let later = now + Duration::seconds(31);
    let ug = PhoneNumber::parse("+256700123456").unwrap();
    let mut resend = f.verification(id, "222222", later);
    resend.phone = f.crypto.seal_phone(&ug).unwrap();
    resend.masked_to = ug.masked();
    resend.country = Some("UG".into());
    let options = SendOptions {
        dialect: Dialect::Native,
        code_length: 6,
        locale: None,
        route_id: None,
        failover: true,
    };
    resend.send_options = Some(options.clone());
    let decision = store.start_send(&f.plan(resend), later).await.unwrap();
    assert!(
        matches!(decision, SendDecision::Replaced { .. }),
        "{decision:?}"
    );
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.crypto.open_phone(&v.phone).unwrap(), ug);
    assert_eq!(
        (v.masked_to.as_str(), v.country.as_deref()),
        ("+********3456", Some("UG"))
    );
    assert_eq!(v.send_options, Some(options));
}

pub async fn plan_for_a_stale_id_conflicts(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let later = now + Duration::seconds(60);
    let other = Uuid::new_v4();
    let decision = store
        .start_send(&f.plan(f.verification(other, "222222", later)), later)
        .await
        .unwrap();
    assert_eq!(
        decision,
        SendDecision::Conflict { pending: Some(id) },
        "a pending verification exists under another id, and the answer names it"
    );

    // Once the first has expired, planning a resend of it conflicts too.
    let expired = now + Duration::seconds(400);
    let decision = store
        .start_send(&f.plan(f.verification(id, "333333", expired)), expired)
        .await
        .unwrap();
    assert_eq!(decision, SendDecision::Conflict { pending: None });
    let fresh = Uuid::new_v4();
    let decision = store
        .start_send(&f.plan(f.verification(fresh, "333333", expired)), expired)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Created { .. }),
        "{decision:?}"
    );
}

pub async fn send_window_limits_resends(store: DynStore) {
    let f = Fixture::new();
    let mut now = t0();
    let id = f.start(&store, "111111", now).await;
    for _ in 0..2 {
        now += Duration::seconds(31);
        let d = store
            .start_send(&f.plan(f.verification(id, "111111", now)), now)
            .await
            .unwrap();
        assert!(matches!(d, SendDecision::Replaced { .. }), "{d:?}");
    }
    now += Duration::seconds(31);
    let d = store
        .start_send(&f.plan(f.verification(id, "111111", now)), now)
        .await
        .unwrap();
    // Window of 600 s opened at t0; 93 s have passed.
    assert_eq!(
        d,
        SendDecision::WindowExhausted {
            retry_after_seconds: 507
        }
    );
}

pub async fn spent_attempts_do_not_skip_cooldown_or_window(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    f.spend_attempts(&store, id, now).await;
    let fresh = Uuid::new_v4();
    let d = store
        .start_send(&f.plan(f.verification(fresh, "222222", now)), now)
        .await
        .unwrap();
    assert!(matches!(d, SendDecision::Cooldown { .. }), "{d:?}");
}

pub async fn abort_releases_cooldown_and_leaves_nothing_pending(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    store
        .abort_send(&SendAbort {
            tenant: f.tenant.clone(),
            subject: f.subject,
            verification_id: id,
            previous_sent_at: None,
            sent_at: now,
            at: now,
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .find_pending(&f.tenant, &f.subject, now)
            .await
            .unwrap(),
        None
    );
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, Status::Failed);
    assert_eq!(v.code_hash, None);
    let check = store
        .check_code(&f.tenant, id, &f.hash(id, "111111"), None, now)
        .await
        .unwrap();
    assert_eq!(check, CheckOutcome::NotFound);
    // The cooldown slot was given back: an immediate new send is accepted.
    f.start(&store, "222222", now).await;
}

/// A send aborted after a later send for its subject replaced its code (its
/// delivery outlasted the cooldown) undoes nothing of the later send: the
/// code and the cooldown stay. The later send's own abort still ends it.
pub async fn an_abort_leaves_a_later_send_alone(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let later = now + Duration::seconds(31);
    let decision = store
        .start_send(&f.plan(f.verification(id, "222222", later)), later)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Replaced { .. }),
        "{decision:?}"
    );
    let abort = |sent_at, previous_sent_at| SendAbort {
        tenant: f.tenant.clone(),
        subject: f.subject,
        verification_id: id,
        previous_sent_at,
        sent_at,
        at: later + Duration::seconds(5),
    };
    store.abort_send(&abort(now, None)).await.unwrap();
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, Status::Pending);
    let at = later + Duration::seconds(5);
    let fresh = f.verification(Uuid::new_v4(), "333333", at);
    let d = store.start_send(&f.plan(fresh), at).await.unwrap();
    assert!(
        matches!(
            d,
            SendDecision::Cooldown { .. } | SendDecision::Conflict { .. }
        ),
        "the later send's cooldown holds: {d:?}"
    );
    assert!(matches!(
        store
            .check_code(&f.tenant, id, &f.hash(id, "222222"), None, at)
            .await
            .unwrap(),
        CheckOutcome::Approved(_)
    ));
    // Once ended, its own late abort changes nothing either.
    store.abort_send(&abort(later, Some(now))).await.unwrap();
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, Status::Approved);
}

pub async fn cancel_ends_a_pending_verification(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    assert_eq!(
        store.cancel("someone-else", id, now).await.unwrap(),
        CancelOutcome::NotFound
    );
    let CancelOutcome::Canceled(v) = store.cancel(&f.tenant, id, now).await.unwrap() else {
        panic!("expected cancel");
    };
    assert_eq!(v.status, Status::Canceled);
    assert_eq!(
        store.cancel(&f.tenant, id, now).await.unwrap(),
        CancelOutcome::NotFound
    );
    let check = store
        .check_code(&f.tenant, id, &f.hash(id, "111111"), None, now)
        .await
        .unwrap();
    assert_eq!(check, CheckOutcome::NotFound);
}

pub async fn tenants_are_isolated(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let other = tenant();
    assert_eq!(store.get_verification(&other, id).await.unwrap(), None);
    assert_eq!(
        store
            .check_code(&other, id, &f.hash(id, "111111"), None, now)
            .await
            .unwrap(),
        CheckOutcome::NotFound
    );
    assert_eq!(
        store.find_pending(&other, &f.subject, now).await.unwrap(),
        None
    );
    // And the other tenant's probe did not cost the owner an attempt.
    let owner = store
        .check_code(&f.tenant, id, &f.hash(id, "111111"), None, now)
        .await
        .unwrap();
    assert!(matches!(owner, CheckOutcome::Approved(_)));
}

pub async fn concurrent_right_checks_approve_exactly_once(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let hash = f.hash(id, "123456");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, f) = (store.clone(), f.clone());
            tokio::spawn(async move {
                store
                    .check_code(&f.tenant, id, &hash, None, now)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut approved = 0;
    for t in tasks {
        match t.await.unwrap() {
            CheckOutcome::Approved(_) => approved += 1,
            CheckOutcome::NotFound => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(approved, 1);
}

/// Approval counts as the guard's: worked out from the record, and only an
/// approved one adds, to `{prefix}:{its id}` (the prefix is returned).
fn approval_counter() -> (ApprovalCounts, String) {
    let prefix = format!("ok:{}", Uuid::new_v4().simple());
    let key = prefix.clone();
    let counts: ApprovalCounts = Arc::new(move |v: &Verification| {
        if v.status != Status::Approved {
            return Vec::new();
        }
        vec![CounterAdd {
            key: format!("{key}:{}", v.id),
            amount: 1,
            window_seconds: 3600,
            ceiling: None,
        }]
    });
    (counts, prefix)
}

/// Eight checks of verification `id`'s right code (123456) at once, each
/// counting `counts` with its approval: how many approved.
async fn race_right_checks(
    store: &DynStore,
    f: &Arc<Fixture>,
    id: Uuid,
    counts: Option<&ApprovalCounts>,
    now: DateTime<Utc>,
) -> usize {
    let hash = f.hash(id, "123456");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, f, counts) = (store.clone(), f.clone(), counts.cloned());
            tokio::spawn(async move {
                store
                    .check_counted_code(&f.tenant, id, &hash, None, counts.as_ref(), now)
                    .await
            })
        })
        .collect();
    let mut approved = 0;
    for t in tasks {
        if let CheckOutcome::Approved(_) = t.await.unwrap().unwrap() {
            approved += 1;
        }
    }
    approved
}

/// `n` distinct wrong guesses at verification `id`, all at once: their outcomes.
async fn race_wrong_guesses(
    store: &DynStore,
    f: &Arc<Fixture>,
    id: Uuid,
    n: u32,
    budget: Option<GuessBudget>,
    now: DateTime<Utc>,
) -> Vec<CheckOutcome> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (store, f) = (store.clone(), f.clone());
            let guess = f.hash(id, &format!("{:06}", 200_000 + i));
            tokio::spawn(async move {
                store
                    .check_code(&f.tenant, id, &guess, budget, now)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    outcomes
}

pub async fn racing_wrong_guesses_never_exceed_the_limit(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let mut counted = 0;
    for outcome in race_wrong_guesses(&store, &f, id, 100, None, now).await {
        match outcome {
            CheckOutcome::Wrong { .. } => counted += 1,
            CheckOutcome::MaxAttempts => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        counted, MAX_ATTEMPTS,
        "exactly max_attempts wrong guesses are counted"
    );
    let right = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert_eq!(right, CheckOutcome::MaxAttempts);
}

pub async fn guess_budget_is_judged_before_the_compare(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let budget = GuessBudget::new(2);
    let id = f.start(&store, "123456", now).await;
    for left in [MAX_ATTEMPTS - 1, MAX_ATTEMPTS - 2] {
        let wrong = store
            .check_code(&f.tenant, id, &f.hash(id, "000000"), budget, now)
            .await
            .unwrap();
        assert_eq!(
            wrong,
            CheckOutcome::Wrong {
                attempts_left: left,
                masked_to: MASKED.into(),
            }
        );
    }
    let spent = CheckOutcome::GuessesSpent(WindowCounts {
        previous: 0,
        current: 2,
    });
    // Even the right code is not compared once the budget is spent …
    let right = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), budget, now)
        .await
        .unwrap();
    assert_eq!(right, spent);
    // … and the refusal cost no attempt: the verification is as it was.
    let v = store
        .get_verification(&f.tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v.status, v.attempts), (Status::Pending, 2));
    // Another tenant's probe of the id says nothing about the budget.
    let probe = store
        .check_code("someone-else", id, &f.hash(id, "000000"), budget, now)
        .await
        .unwrap();
    assert_eq!(probe, CheckOutcome::NotFound);
    // The budget is the subject's, not the verification's: a new code is
    // refused too, until the window has slid past the guesses.
    let later = now + Duration::seconds(60);
    store.cancel(&f.tenant, id, later).await.unwrap();
    let renewed = f.start(&store, "654321", later).await;
    let refused = store
        .check_code(
            &f.tenant,
            renewed,
            &f.hash(renewed, "654321"),
            budget,
            later,
        )
        .await
        .unwrap();
    assert_eq!(refused, spent);
    let hours_later = now + Duration::hours(3);
    let fresh = f.start(&store, "111111", hours_later).await;
    let approved = store
        .check_code(
            &f.tenant,
            fresh,
            &f.hash(fresh, "111111"),
            budget,
            hours_later,
        )
        .await
        .unwrap();
    assert!(matches!(approved, CheckOutcome::Approved(_)));
}

pub async fn racing_wrong_guesses_stay_within_the_guess_budget(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let mut counted = 0;
    for outcome in race_wrong_guesses(&store, &f, id, 40, GuessBudget::new(3), now).await {
        match outcome {
            CheckOutcome::Wrong { .. } => counted += 1,
            CheckOutcome::GuessesSpent(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        counted, 3,
        "exactly the budget's wrong guesses are compared"
    );
}

pub async fn racing_sends_accept_exactly_one(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, f) = (store.clone(), f.clone());
            tokio::spawn(async move {
                let plan = f.plan(f.verification(Uuid::new_v4(), "123456", now));
                store.start_send(&plan, now).await.unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            SendDecision::Created { .. } => created += 1,
            SendDecision::Cooldown { .. } | SendDecision::Conflict { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 1);
}

/// A send's counts land with the send it starts, and only then: a send the
/// cooldown refuses, or a plan for a stale id, counts nothing.
pub async fn a_counted_send_counts_only_what_it_starts(store: DynStore) {
    let f = Fixture::new();
    let [x, y] = [(); 2].map(|()| format!("test:{}", Uuid::new_v4().simple()));
    let counts = |ceiling| {
        [
            counter_add(&x, 1, 600, ceiling),
            counter_add(&y, 1, 600, None),
        ]
    };
    let read = |at| [counter_read(&x, 600, at), counter_read(&y, 600, at)];
    let now = t0();
    let id = Uuid::new_v4();
    let plan = f.plan(f.verification(id, "111111", now));
    let (decision, added) = store
        .start_counted_send(&plan, &counts(None), now)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Created { .. }),
        "{decision:?}"
    );
    assert_eq!(added, [1, 1]);

    let soon = now + Duration::seconds(10);
    let plan = f.plan(f.verification(id, "222222", soon));
    let (decision, added) = store
        .start_counted_send(&plan, &counts(None), soon)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Cooldown { .. }),
        "{decision:?}"
    );
    assert!(added.is_empty());
    let later = now + Duration::seconds(31);
    let stale = f.plan(f.verification(Uuid::new_v4(), "222222", later));
    let (decision, added) = store
        .start_counted_send(&stale, &counts(None), later)
        .await
        .unwrap();
    assert_eq!(decision, SendDecision::Conflict { pending: Some(id) });
    assert!(added.is_empty());
    assert_eq!(
        store.read_counters(&read(later)).await.unwrap(),
        [1, 1],
        "refused sends count nothing"
    );

    // A resend counts too, and a count over its ceiling stops the batch.
    let plan = f.plan(f.verification(id, "222222", later));
    let (decision, added) = store
        .start_counted_send(&plan, &counts(Some(1)), later)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Replaced { .. }),
        "{decision:?}"
    );
    assert_eq!(added, [2]);
    assert_eq!(store.read_counters(&read(later)).await.unwrap(), [2, 1]);
}

/// Racing counted sends for one subject: one starts, and only it counts.
pub async fn racing_counted_sends_count_once(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let key = Arc::new(format!("test:{}", Uuid::new_v4().simple()));
    let now = t0();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, f, key) = (store.clone(), f.clone(), key.clone());
            tokio::spawn(async move {
                let plan = f.plan(f.verification(Uuid::new_v4(), "123456", now));
                let counts = [counter_add(&key, 1, 600, None)];
                store.start_counted_send(&plan, &counts, now).await.unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            (SendDecision::Created { .. }, added) => {
                created += 1;
                assert_eq!(added, [1]);
            }
            (SendDecision::Cooldown { .. } | SendDecision::Conflict { .. }, added) => {
                assert!(added.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 1);
    let read = [counter_read(&key, 600, now)];
    assert_eq!(store.read_counters(&read).await.unwrap(), [1]);
}

pub async fn api_keys_lifecycle(store: DynStore) {
    let now = t0();
    let hash = *Uuid::new_v4().as_bytes();
    let mut key_hash = [0u8; 32];
    key_hash[..16].copy_from_slice(&hash);
    let record = ApiKeyRecord {
        id: format!("key_{}", Uuid::new_v4().simple()),
        tenant: tenant(),
        key_hash,
        created_at: now,
        revoked_at: None,
    };
    store.insert_api_key(&record).await.unwrap();
    assert_eq!(
        store.find_api_key(&key_hash).await.unwrap(),
        Some(record.clone())
    );
    assert!(store.list_api_keys().await.unwrap().contains(&record));
    assert!(store.revoke_api_key(&record.id, now).await.unwrap());
    assert!(
        !store.revoke_api_key(&record.id, now).await.unwrap(),
        "already revoked"
    );
    let revoked = store.find_api_key(&key_hash).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
    assert!(!store.revoke_api_key("key_nope", now).await.unwrap());
}

pub fn message(
    tenant: &str,
    verification_id: Uuid,
    provider_id: &str,
    at: DateTime<Utc>,
) -> MessageRecord {
    MessageRecord {
        id: Uuid::new_v4(),
        verification_id,
        tenant: tenant.to_owned(),
        route_id: 3,
        provider: "bridgexapi".into(),
        provider_message_id: Some(provider_id.to_owned()),
        masked_to: "+*******0670".into(),
        country: Some("NL".into()),
        status: DeliveryStatus::Queued,
        error: None,
        cost: Some(0.05),
        currency: Some("EUR".into()),
        latency_ms: 12,
        resend_of: None,
        created_at: at,
        sent_at: None,
        delivered_at: None,
        failed_at: None,
        updated_at: at,
    }
}

pub async fn messages_record_attempts_and_only_move_forward(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let vid = f.start(&store, "111111", now).await;
    let pid_a = format!("BX-{}", Uuid::new_v4().simple());
    let pid_b = format!("BX-{}", Uuid::new_v4().simple());
    let a = message(&f.tenant, vid, &pid_a, now);
    let b = message(&f.tenant, vid, &pid_b, now + Duration::seconds(1));
    store.insert_message(&a, None).await.unwrap();
    store.insert_message(&b, None).await.unwrap();
    assert_eq!(
        store.list_messages(&f.tenant, vid).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(store.list_messages("other", vid).await.unwrap(), vec![]);
    assert_eq!(
        store.get_message(&f.tenant, a.id).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.get_message("other", a.id).await.unwrap(), None);

    let delivered = MessageUpdate {
        status: DeliveryStatus::Delivered,
        error: None,
        cost: None,
        currency: None,
        at: now + Duration::seconds(5),
    };
    let transition = store
        .update_message_by_provider_id("bridgexapi", &pid_a, &delivered)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(transition.previous, DeliveryStatus::Queued);
    assert!(transition.moved());
    let updated = transition.message;
    assert_eq!(updated.status, DeliveryStatus::Delivered);
    assert_eq!(updated.delivered_at, Some(now + Duration::seconds(5)));
    assert_eq!(
        updated.cost,
        Some(0.05),
        "cost survives an update that carries none"
    );
    let late = MessageUpdate {
        status: DeliveryStatus::Sent,
        at: now + Duration::seconds(9),
        ..delivered.clone()
    };
    let late_transition = store
        .update_message_by_provider_id("bridgexapi", &pid_a, &late)
        .await
        .unwrap()
        .unwrap();
    assert!(!late_transition.moved(), "a late report is no transition");
    let after = late_transition.message;
    assert_eq!(after.sent_at, None);
    assert_eq!(
        after.status,
        DeliveryStatus::Delivered,
        "a late 'sent' never overwrites 'delivered'"
    );
    assert_eq!(after.updated_at, now + Duration::seconds(5));
    assert_eq!(
        store
            .update_message_by_provider_id("bridgexapi", "BX-unknown", &delivered)
            .await
            .unwrap(),
        None
    );
}

pub async fn message_transitions_are_stamped_and_duplicates_do_not_move(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let vid = f.start(&store, "111111", now).await;
    let pid = format!("AT-{}", Uuid::new_v4().simple());
    let first = message(&f.tenant, vid, &pid, now);
    store.insert_message(&first, None).await.unwrap();
    let pid_resend = format!("TW-{}", Uuid::new_v4().simple());
    let resend = MessageRecord {
        resend_of: Some(first.id),
        route_id: 4,
        provider: "twilio".into(),
        ..message(&f.tenant, vid, &pid_resend, now + Duration::seconds(20))
    };
    store.insert_message(&resend, None).await.unwrap();

    let update = |status, secs, error: Option<&str>| MessageUpdate {
        status,
        error: error.map(str::to_owned),
        cost: None,
        currency: None,
        at: now + Duration::seconds(secs),
    };
    let sent = store
        .update_message_by_provider_id("bridgexapi", &pid, &update(DeliveryStatus::Sent, 2, None))
        .await
        .unwrap()
        .unwrap();
    assert!(sent.moved());
    assert_eq!(sent.message.sent_at, Some(now + Duration::seconds(2)));
    let failed = store
        .update_message_by_provider_id(
            "bridgexapi",
            &pid,
            &update(
                DeliveryStatus::Failed,
                9,
                Some("delivery_failed: AbsentSubscriber"),
            ),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.previous, DeliveryStatus::Sent);
    assert!(failed.moved());
    assert_eq!(failed.message.failed_at, Some(now + Duration::seconds(9)));
    assert_eq!(
        failed.message.sent_at,
        Some(now + Duration::seconds(2)),
        "earlier stamps stay"
    );
    assert_eq!(
        failed.message.error.as_deref(),
        Some("delivery_failed: AbsentSubscriber")
    );
    for (status, secs) in [
        (DeliveryStatus::Failed, 10),
        (DeliveryStatus::Delivered, 11),
    ] {
        let again = store
            .update_message_by_provider_id("bridgexapi", &pid, &update(status, secs, None))
            .await
            .unwrap()
            .unwrap();
        assert!(!again.moved(), "{status:?} after failed must not move");
        assert_eq!(again.previous, DeliveryStatus::Failed);
        assert_eq!(again.message, failed.message);
    }
    // The same id under another provider is another message.
    assert_eq!(
        store
            .update_message_by_provider_id("twilio", &pid, &update(DeliveryStatus::Sent, 3, None))
            .await
            .unwrap(),
        None
    );
    let listed = store.list_messages(&f.tenant, vid).await.unwrap();
    assert_eq!(listed, vec![failed.message.clone(), resend.clone()]);
    assert_eq!(
        store.get_message(&f.tenant, resend.id).await.unwrap(),
        Some(resend)
    );
}

pub async fn unfinished_messages_are_listed_per_provider_oldest_first(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let vid = f.start(&store, "111111", now).await;
    // A provider of its own, so that other cases on a shared store stay out.
    let provider = format!("bx{}", Uuid::new_v4().simple());
    let at = |secs| now + Duration::seconds(secs);
    let mk = |secs: i64, status| MessageRecord {
        provider: provider.clone(),
        status,
        ..message(
            &f.tenant,
            vid,
            &format!("BX-{}", Uuid::new_v4().simple()),
            at(secs),
        )
    };
    let queued = mk(3, DeliveryStatus::Queued);
    let sent = mk(1, DeliveryStatus::Sent);
    let unknown = mk(2, DeliveryStatus::Unknown);
    let delivered = mk(4, DeliveryStatus::Delivered);
    let no_id = MessageRecord {
        provider_message_id: None,
        ..mk(5, DeliveryStatus::Queued)
    };
    let later = mk(6, DeliveryStatus::Queued);
    let other_provider = MessageRecord {
        provider: format!("{provider}x"),
        ..mk(3, DeliveryStatus::Queued)
    };
    for m in [
        &queued,
        &sent,
        &unknown,
        &delivered,
        &no_id,
        &later,
        &other_provider,
    ] {
        store.insert_message(m, None).await.unwrap();
    }
    let ids = |list: Vec<MessageRecord>| list.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .list_unfinished_messages(&provider, at(0), 10)
            .await
            .unwrap()),
        vec![sent.id, unknown.id, queued.id, later.id]
    );
    assert_eq!(
        ids(store
            .list_unfinished_messages(&provider, at(1), 2)
            .await
            .unwrap()),
        vec![unknown.id, queued.id],
        "created strictly after, at most limit"
    );
    // A final report takes a message off the list.
    store
        .update_message_by_provider_id(
            &provider,
            queued.provider_message_id.as_deref().unwrap(),
            &MessageUpdate {
                status: DeliveryStatus::Undelivered,
                error: None,
                cost: None,
                currency: None,
                at: at(30),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(store
            .list_unfinished_messages(&provider, at(0), 10)
            .await
            .unwrap()),
        vec![sent.id, unknown.id, later.id]
    );
    assert_eq!(
        ids(store
            .list_unfinished_messages(&provider, at(1), 2)
            .await
            .unwrap()),
        vec![unknown.id, later.id],
        "a finished message does not use up the limit"
    );
}

pub async fn purge_messages_deletes_old_ones_in_batches(store: DynStore) {
    let f = Fixture::new();
    // Far in the past, so no other case's messages are this old.
    let long_ago = Utc
        .timestamp_millis_opt(1_000_000_000_000)
        .single()
        .unwrap();
    let vid = f.start(&store, "111111", t0()).await;
    let provider = format!("bx{}", Uuid::new_v4().simple());
    let mk = |at| MessageRecord {
        provider: provider.clone(),
        ..message(
            &f.tenant,
            vid,
            &format!("BX-{}", Uuid::new_v4().simple()),
            at,
        )
    };
    let old: Vec<MessageRecord> = (0..3)
        .map(|i| mk(long_ago + Duration::seconds(i)))
        .collect();
    let young = mk(long_ago + Duration::days(40));
    for m in old.iter().chain([&young]) {
        store.insert_message(m, None).await.unwrap();
    }
    let cutoff = long_ago + Duration::days(30);
    assert_eq!(store.purge_messages(cutoff, 2).await.unwrap(), 2);
    assert_eq!(store.purge_messages(cutoff, 2).await.unwrap(), 1);
    assert_eq!(store.purge_messages(cutoff, 2).await.unwrap(), 0);
    assert_eq!(
        store.list_messages(&f.tenant, vid).await.unwrap(),
        vec![young.clone()]
    );
    assert_eq!(store.get_message(&f.tenant, old[0].id).await.unwrap(), None);
    let pid = old[1].provider_message_id.clone().unwrap();
    let late_report = MessageUpdate {
        status: DeliveryStatus::Delivered,
        error: None,
        cost: None,
        currency: None,
        at: t0(),
    };
    assert_eq!(
        store
            .update_message_by_provider_id(&provider, &pid, &late_report)
            .await
            .unwrap(),
        None,
        "a purged message is unknown to reports"
    );
    assert_eq!(
        store
            .list_unfinished_messages(&provider, long_ago - Duration::days(1), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

fn day(d: u32) -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2030, 3, d).unwrap()
}

pub async fn usage_adds_up_per_day_route_country_and_currency(store: DynStore) {
    use otpd::store::UsageRow;
    let t = tenant();
    let add =
        |d, route, country: Option<&str>, currency: Option<&str>, f: &dyn Fn(&mut UsageRow)| {
            let mut row = UsageRow::new(&t, day(d), route, country, currency);
            f(&mut row);
            row
        };
    let deltas = [
        add(1, 1, Some("NL"), None, &|r| {
            r.sent = 2;
            r.verifications_started = 1;
        }),
        add(1, 1, Some("NL"), None, &|r| r.sent = 1),
        add(1, 1, Some("NL"), Some("EUR"), &|r| {
            r.delivered = 1;
            r.cost_micros = 50_000;
        }),
        add(1, 1, Some("NL"), Some("EUR"), &|r| {
            r.delivered = 1;
            r.cost_micros = 50_000;
        }),
        add(1, 2, None, None, &|r| r.failed = 1),
        add(2, 1, Some("NL"), None, &|r| r.verifications_approved = 1),
        add(5, 1, Some("NL"), None, &|r| r.sent = 7),
    ];
    for d in &deltas {
        store.record_usage(d).await.unwrap();
    }
    store
        .record_usage(&UsageRow::new("other", day(1), 1, Some("NL"), None))
        .await
        .unwrap();
    let mut rows = store.usage(&t, day(1), day(2)).await.unwrap();
    rows.sort_by_key(|r| (r.day, r.route_id, r.currency.clone()));
    let expected = vec![
        add(1, 1, Some("NL"), None, &|r| {
            r.sent = 3;
            r.verifications_started = 1;
        }),
        add(1, 1, Some("NL"), Some("EUR"), &|r| {
            r.delivered = 2;
            r.cost_micros = 100_000;
        }),
        add(1, 2, None, None, &|r| r.failed = 1),
        add(2, 1, Some("NL"), None, &|r| r.verifications_approved = 1),
    ];
    assert_eq!(rows, expected);
    assert_eq!(store.usage(&t, day(3), day(4)).await.unwrap(), vec![]);
    assert_eq!(store.usage(&t, day(5), day(5)).await.unwrap().len(), 1);
    assert_eq!(store.usage(&t, day(2), day(1)).await.unwrap(), vec![]);
}

pub async fn concurrent_usage_adds_are_all_counted(store: DynStore) {
    use otpd::store::UsageRow;
    let t = tenant();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let store = store.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut row = UsageRow::new(&t, day(9), 3, Some("UG"), Some("UGX"));
            row.sent = 1;
            row.delivered = 1;
            row.cost_micros = 35_000_000;
            store.record_usage(&row).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = store.usage(&t, day(9), day(9)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].sent, rows[0].delivered), (40, 40));
    assert_eq!(rows[0].cost_micros, 40 * 35_000_000);
}

pub async fn a_message_and_its_usage_are_recorded_together(store: DynStore) {
    use otpd::store::UsageRow;
    let f = Fixture::new();
    let now = t0();
    let vid = f.start(&store, "111111", now).await;
    let m = message(
        &f.tenant,
        vid,
        &format!("BX-{}", Uuid::new_v4().simple()),
        now,
    );
    let mut delta = UsageRow::new(&f.tenant, day(7), 3, Some("NL"), None);
    delta.sent = 1;
    delta.verifications_started = 1;
    store.insert_message(&m, Some(&delta)).await.unwrap();
    let unaccounted = message(&f.tenant, vid, "BX-no-usage", now);
    store.insert_message(&unaccounted, None).await.unwrap();
    assert_eq!(
        store.list_messages(&f.tenant, vid).await.unwrap(),
        vec![m, unaccounted]
    );
    assert_eq!(
        store.usage(&f.tenant, day(1), day(31)).await.unwrap(),
        vec![delta]
    );
}

/// 2024-02-29 23:59:59.999 UTC: the last millisecond of a leap day, so a
/// store that computes the day itself must get the calendar right.
fn leap_day_end() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap() + Duration::milliseconds(999)
}

pub async fn an_approval_counts_once_on_its_first_accepted_attempt(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let at = leap_day_end();
    // Refused by its provider: no provider id, so never accepted.
    let mut refused = message(&f.tenant, id, "unused", at - Duration::seconds(1));
    refused.provider_message_id = None;
    refused.status = DeliveryStatus::Failed;
    refused.route_id = 1;
    let mut first = message(
        &f.tenant,
        id,
        &format!("BX-{}", Uuid::new_v4().simple()),
        at,
    );
    first.route_id = 2;
    let mut later = message(
        &f.tenant,
        id,
        &format!("BX-{}", Uuid::new_v4().simple()),
        at,
    );
    later.created_at = at + Duration::milliseconds(1);
    for m in [&refused, &first, &later] {
        store.insert_message(m, None).await.unwrap();
    }
    assert_eq!(race_right_checks(&store, &f, id, None, now).await, 1);
    let from = at.date_naive() - Duration::days(1);
    let rows = store
        .usage(&f.tenant, from, from + Duration::days(3))
        .await
        .unwrap();
    let mut expected = otpd::store::UsageRow::new(&f.tenant, at.date_naive(), 2, Some("NL"), None);
    expected.verifications_approved = 1;
    assert_eq!(rows, vec![expected]);
}

pub async fn an_approval_adds_its_counts_once_and_a_wrong_code_none(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let (counts, prefix) = approval_counter();
    counted_once_and_a_wrong_code_not(&store, &f, id, &counts, &format!("{prefix}:{id}"), now)
        .await;
}

/// A wrong check of verification `id` (right code 123456) adds nothing to
/// `counted`; racing right checks, each with `counts`, add one.
async fn counted_once_and_a_wrong_code_not(
    store: &DynStore,
    f: &Arc<Fixture>,
    id: Uuid,
    counts: &ApprovalCounts,
    counted: &str,
    now: DateTime<Utc>,
) {
    let wrong = store
        .check_counted_code(
            &f.tenant,
            id,
            &f.hash(id, "000000"),
            None,
            Some(counts),
            now,
        )
        .await
        .unwrap();
    assert!(matches!(wrong, CheckOutcome::Wrong { .. }), "{wrong:?}");
    assert_eq!(store.read_counter(counted, 3600, now).await.unwrap(), 0);
    assert_eq!(race_right_checks(store, f, id, Some(counts), now).await, 1);
    assert_eq!(store.read_counter(counted, 3600, now).await.unwrap(), 1);
}

/// Approval counts keyed by the number as shown, as the service works them
/// out: from the record when checking (`counts`), and from the number when
/// sending (the plan's `approval_counts`, which a store may keep instead).
fn counts_by_number(prefix: &str) -> ApprovalCounts {
    let prefix = prefix.to_owned();
    Arc::new(move |v: &Verification| by_number(&prefix, &v.masked_to))
}

fn by_number(prefix: &str, masked_to: &str) -> Vec<CounterAdd> {
    vec![counter_add(&format!("{prefix}:{masked_to}"), 1, 3600, None)]
}

/// Whichever way a store counts an approval, from its send's plan or from the
/// record, racing right checks count it once, and a wrong check not at all.
pub async fn an_approval_counts_what_its_send_planned_once(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let prefix = format!("ok:{}", Uuid::new_v4().simple());
    let id = Uuid::new_v4();
    let mut plan = f.plan(f.verification(id, "123456", now));
    plan.approval_counts = by_number(&prefix, MASKED);
    store.start_send(&plan, now).await.unwrap();
    let counts = counts_by_number(&prefix);
    counted_once_and_a_wrong_code_not(&store, &f, id, &counts, &format!("{prefix}:{MASKED}"), now)
        .await;
}

/// A resend to another number (a uid's) plans that number's approval counts:
/// the approval counts under the number the code went to last.
pub async fn a_resend_to_another_number_counts_its_approval_there(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let prefix = format!("ok:{}", Uuid::new_v4().simple());
    let id = Uuid::new_v4();
    let mut plan = f.plan(f.verification(id, "111111", now));
    plan.approval_counts = by_number(&prefix, MASKED);
    store.start_send(&plan, now).await.unwrap();

    let later = now + Duration::seconds(31);
    let ug = PhoneNumber::parse("+256700123456").unwrap();
    let mut resend = f.verification(id, "123456", later);
    resend.phone = f.crypto.seal_phone(&ug).unwrap();
    resend.masked_to = ug.masked();
    let mut plan = f.plan(resend);
    plan.approval_counts = by_number(&prefix, &ug.masked());
    let decision = store.start_send(&plan, later).await.unwrap();
    assert!(
        matches!(decision, SendDecision::Replaced { .. }),
        "{decision:?}"
    );

    assert_eq!(
        race_right_checks(&store, &f, id, Some(&counts_by_number(&prefix)), later).await,
        1
    );
    let count = async |masked: &str| {
        store
            .read_counter(&format!("{prefix}:{masked}"), 3600, later)
            .await
            .unwrap()
    };
    assert_eq!((count(&ug.masked()).await, count(MASKED).await), (1, 0));
}

pub async fn a_check_by_subject_finds_and_checks_its_current_verification(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    // A hash by id is asked for with the id the store found, and only then;
    // a hash by subject (compared where the record keeps one) for the subject
    // checked.
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let by_subject = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hasher = |code: &'static str| -> CodeHasher {
        let (f, g, asked, by_subject) = (f.clone(), f.clone(), asked.clone(), by_subject.clone());
        CodeHasher::new(
            move |id| {
                asked.lock().unwrap().push(id);
                f.hash(id, code)
            },
            move |subject| {
                by_subject.lock().unwrap().push(*subject);
                g.subject_hash(code)
            },
        )
    };
    let (counts, prefix) = approval_counter();
    let check = async |tenant: &str, code: &'static str| {
        store
            .check_current_code(tenant, &f.subject, &hasher(code), None, Some(&counts), now)
            .await
            .unwrap()
    };
    assert_eq!(check(&f.tenant, "123456").await, CurrentCheck::NoneCurrent);
    assert!(asked.lock().unwrap().is_empty());

    let id = f.start(&store, "123456", now).await;
    // Another tenant's check by the same subject finds nothing, and compares nothing.
    assert_eq!(
        check("someone-else", "123456").await,
        CurrentCheck::NoneCurrent
    );
    assert!(asked.lock().unwrap().is_empty());
    for _ in 1..MAX_ATTEMPTS {
        let wrong = check(&f.tenant, "000000").await;
        assert!(
            matches!(wrong, CurrentCheck::Checked(found, CheckOutcome::Wrong { .. }) if found == id),
            "{wrong:?}"
        );
    }
    let right = check(&f.tenant, "123456").await;
    assert!(
        matches!(&right, CurrentCheck::Checked(found, CheckOutcome::Approved(v)) if *found == id && v.status == Status::Approved),
        "{right:?}"
    );
    // Each compare used one kind of hash: by id, asked once per compare with
    // the id found; or by subject, asked once per check (every check above:
    // the two that found nothing, then each attempt).
    let (asked, by_subject) = (
        asked.lock().unwrap().clone(),
        by_subject.lock().unwrap().clone(),
    );
    let checks = MAX_ATTEMPTS as usize + 2;
    assert!(
        (asked == vec![id; MAX_ATTEMPTS as usize] && by_subject.is_empty())
            || (asked.is_empty()
                && by_subject.len() == checks
                && by_subject.iter().all(|&s| s == f.subject)),
        "by id {asked:?}, by subject {} times",
        by_subject.len()
    );
    let counted = format!("{prefix}:{id}");
    assert_eq!(store.read_counter(&counted, 3600, now).await.unwrap(), 1);
    // Approved, it is no longer current.
    assert_eq!(check(&f.tenant, "123456").await, CurrentCheck::NoneCurrent);
}

pub async fn a_check_by_subject_compares_nothing_once_attempts_are_spent(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    f.spend_attempts(&store, id, now).await;
    let spent = store
        .check_current_code(&f.tenant, &f.subject, &f.hasher("123456"), None, None, now)
        .await
        .unwrap();
    assert_eq!(spent, CurrentCheck::MaxAttempts);
    assert!(matches!(
        store.get_verification(&f.tenant, id).await.unwrap(),
        Some(v) if v.status == Status::MaxAttempts
    ));
}

/// A record written without the code's hash by subject (by an older build) is
/// still checked by number: found first, then compared by id.
pub async fn a_check_by_subject_of_a_record_without_its_subject_hash_still_compares(
    store: DynStore,
) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = Uuid::new_v4();
    store
        .start_send(&f.plan(f.verification(id, "123456", now)), now)
        .await
        .unwrap();
    let check = async |code: &'static str| {
        store
            .check_current_code(&f.tenant, &f.subject, &f.hasher(code), None, None, now)
            .await
            .unwrap()
    };
    let wrong = check("654321").await;
    assert!(
        matches!(wrong, CurrentCheck::Checked(found, CheckOutcome::Wrong { attempts_left, .. })
            if found == id && attempts_left == MAX_ATTEMPTS - 1),
        "{wrong:?}"
    );
    let right = check("123456").await;
    assert!(
        matches!(right, CurrentCheck::Checked(found, CheckOutcome::Approved(_)) if found == id),
        "{right:?}"
    );
}

/// A record without its id-keyed hash (nothing to compare) is never approved,
/// whatever hash by subject it holds.
pub async fn a_record_without_a_code_hash_is_not_approved_by_subject(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let mut v = f.verification(Uuid::new_v4(), "123456", now);
    v.code_hash = None;
    store
        .start_send(&f.plan_coded(v, "123456"), now)
        .await
        .unwrap();
    let right = store
        .check_current_code(&f.tenant, &f.subject, &f.hasher("123456"), None, None, now)
        .await
        .unwrap();
    assert!(
        !matches!(right, CurrentCheck::Checked(_, CheckOutcome::Approved(_))),
        "{right:?}"
    );
}

/// `n` checks by number of `code` at `f`'s subject, all at once: their outcomes.
async fn race_checks_by_subject(
    store: &DynStore,
    f: &Arc<Fixture>,
    code: &'static str,
    n: u32,
    at: DateTime<Utc>,
) -> Vec<CurrentCheck> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, f) = (store.clone(), f.clone());
            tokio::spawn(async move {
                store
                    .check_current_code(&f.tenant, &f.subject, &f.hasher(code), None, None, at)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    outcomes
}

/// Checks by number racing each other: one right code is approved once, and
/// wrong guesses spend the attempts exactly, never one more compare.
pub async fn racing_checks_by_subject_approve_once_and_spend_attempts_exactly(store: DynStore) {
    let f = Arc::new(Fixture::new());
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let right = race_checks_by_subject(&store, &f, "123456", 8, now).await;
    let approved = right
        .iter()
        .filter(|c| matches!(c, CurrentCheck::Checked(found, CheckOutcome::Approved(_)) if *found == id))
        .count();
    assert_eq!(approved, 1, "{right:?}");
    assert!(
        right.iter().all(|c| matches!(
            c,
            CurrentCheck::Checked(_, CheckOutcome::Approved(_) | CheckOutcome::NotFound)
                | CurrentCheck::NoneCurrent
        )),
        "{right:?}"
    );

    let later = now + Duration::seconds(60);
    let f2 = Arc::new(Fixture::new());
    let id = f2.start(&store, "123456", later).await;
    let wrong = race_checks_by_subject(&store, &f2, "000000", MAX_ATTEMPTS + 4, later).await;
    let compared = wrong
        .iter()
        .filter(|c| matches!(c, CurrentCheck::Checked(found, CheckOutcome::Wrong { .. }) if *found == id))
        .count();
    assert_eq!(compared, MAX_ATTEMPTS as usize, "{wrong:?}");
    let right = store
        .check_current_code(
            &f2.tenant,
            &f2.subject,
            &f2.hasher("123456"),
            None,
            None,
            later,
        )
        .await
        .unwrap();
    assert_eq!(
        right,
        CurrentCheck::MaxAttempts,
        "the right code comes too late"
    );
}

/// A resend's new code, whether the caller's or an automatic re-send's, is
/// what a check by number compares; the code it replaced no longer matches.
pub async fn a_check_by_subject_compares_the_newest_code(store: DynStore) {
    use otpd::store::CodeReplacement;
    let f = Arc::new(Fixture::new());
    let now = t0();
    let check = async |code: &'static str, at| {
        store
            .check_current_code(&f.tenant, &f.subject, &f.hasher(code), None, None, at)
            .await
            .unwrap()
    };
    let is_wrong =
        |c: &CurrentCheck| matches!(c, CurrentCheck::Checked(_, CheckOutcome::Wrong { .. }));

    let id = f.start(&store, "111111", now).await;
    let later = now + Duration::seconds(31);
    let mut resend = f.verification(id, "222222", later);
    resend.expires_at = later + Duration::seconds(300);
    let decision = store
        .start_send(&f.plan_coded(resend, "222222"), later)
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Replaced { .. }),
        "{decision:?}"
    );
    let old = check("111111", later).await;
    assert!(is_wrong(&old), "{old:?}");

    let replacement = CodeReplacement {
        tenant: f.tenant.clone(),
        verification_id: id,
        expected_send_count: 2,
        code_hash: f.hash(id, "333333"),
        subject_code_hash: Some(f.subject_hash("333333")),
        expires_at: later + Duration::seconds(300),
    };
    assert!(
        store
            .replace_code(&replacement, later)
            .await
            .unwrap()
            .is_some()
    );
    let replaced = check("222222", later).await;
    assert!(is_wrong(&replaced), "{replaced:?}");
    let right = check("333333", later).await;
    assert!(
        matches!(right, CurrentCheck::Checked(found, CheckOutcome::Approved(_)) if found == id),
        "{right:?}"
    );
}

pub async fn an_approval_without_an_accepted_attempt_counts_nothing(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "123456", now).await;
    let approved = store
        .check_code(&f.tenant, id, &f.hash(id, "123456"), None, now)
        .await
        .unwrap();
    assert!(
        matches!(approved, CheckOutcome::Approved(_)),
        "{approved:?}"
    );
    let today = now.date_naive();
    assert_eq!(store.usage(&f.tenant, today, today).await.unwrap(), vec![]);
}

pub async fn replace_code_resends_without_cooldown_and_keeps_attempts(store: DynStore) {
    use otpd::store::CodeReplacement;
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let wrong = store
        .check_code(&f.tenant, id, &f.hash(id, "999999"), None, now)
        .await
        .unwrap();
    assert_eq!(
        wrong,
        CheckOutcome::Wrong {
            attempts_left: MAX_ATTEMPTS - 1,
            masked_to: MASKED.into(),
        }
    );
    let later = now + Duration::seconds(5);
    let replacement = |expected_send_count| CodeReplacement {
        tenant: f.tenant.clone(),
        verification_id: id,
        expected_send_count,
        code_hash: f.hash(id, "222222"),
        subject_code_hash: None,
        expires_at: later + Duration::seconds(300),
    };
    assert_eq!(
        store.replace_code(&replacement(2), later).await.unwrap(),
        None,
        "a stale send count changes nothing"
    );
    let other_tenant = CodeReplacement {
        tenant: "other".into(),
        ..replacement(1)
    };
    assert_eq!(
        store.replace_code(&other_tenant, later).await.unwrap(),
        None
    );
    // Within the 30 s cooldown: an automatic re-send is not held to it.
    let v = store
        .replace_code(&replacement(1), later)
        .await
        .unwrap()
        .expect("replaced");
    assert_eq!(v.send_count, 2);
    assert_eq!(v.attempts, 1, "attempts are kept");
    assert_eq!(v.expires_at, later + Duration::seconds(300));
    assert_eq!(v.last_sent_at, later);
    assert_eq!(
        store.replace_code(&replacement(1), later).await.unwrap(),
        None,
        "the same replacement twice takes effect once"
    );
    assert_eq!(
        store
            .check_code(&f.tenant, id, &f.hash(id, "111111"), None, later)
            .await
            .unwrap(),
        CheckOutcome::Wrong {
            attempts_left: MAX_ATTEMPTS - 2,
            masked_to: MASKED.into(),
        },
        "the old code is gone"
    );
    assert!(matches!(
        store
            .check_code(&f.tenant, id, &f.hash(id, "222222"), None, later)
            .await
            .unwrap(),
        CheckOutcome::Approved(_)
    ));
    assert_eq!(
        store.replace_code(&replacement(2), later).await.unwrap(),
        None,
        "an approved verification takes no new code"
    );
    // The subject's own cooldown is untouched by the automatic re-send.
    let next = f.verification(Uuid::new_v4(), "333333", now + Duration::seconds(31));
    let decision = store
        .start_send(&f.plan(next), now + Duration::seconds(31))
        .await
        .unwrap();
    assert!(
        matches!(decision, SendDecision::Created { .. }),
        "{decision:?}"
    );
}

pub async fn inbox_lists_newest_first_per_tenant_and_number(store: DynStore) {
    let c = crypto();
    let now = t0();
    let t = tenant();
    let entry = |idx: u8, secs: i64| InboxEntry {
        id: Uuid::new_v4(),
        tenant: t.clone(),
        phone_index: [idx; 32],
        masked_to: "+*******0670".into(),
        sealed_body: c.seal(format!("code {secs}").as_bytes()).unwrap(),
        created_at: now + Duration::seconds(secs),
        expires_at: now + Duration::seconds(secs + 60),
    };
    let (a, b, other_number) = (entry(1, 0), entry(1, 1), entry(2, 2));
    for e in [&a, &b, &other_number] {
        store.push_inbox(e).await.unwrap();
    }
    let listed = store
        .list_inbox(&t, Some(&[1; 32]), now + Duration::seconds(3), 10)
        .await
        .unwrap();
    assert_eq!(listed, vec![b.clone(), a.clone()]);
    let all = store
        .list_inbox(&t, None, now + Duration::seconds(3), 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0], other_number);
    assert_eq!(
        store.list_inbox(&tenant(), None, now, 10).await.unwrap(),
        vec![]
    );
    let after_expiry = store
        .list_inbox(&t, Some(&[1; 32]), now + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(after_expiry, vec![b], "expired entries are not listed");
}

pub async fn rate_limit_counts_per_window(store: DynStore) {
    let key = format!("test:{}", Uuid::new_v4().simple());
    // Aligned to a 60 s window boundary.
    let start = Utc.timestamp_opt(1_900_000_020, 0).single().unwrap();
    for remaining in (0..3).rev() {
        let d = store.hit_rate_limit(&key, 3, 60, start).await.unwrap();
        assert_eq!(d, RateDecision::Allowed { remaining });
    }
    let d = store
        .hit_rate_limit(&key, 3, 60, start + Duration::seconds(15))
        .await
        .unwrap();
    assert_eq!(
        d,
        RateDecision::Limited {
            retry_after_seconds: 45
        }
    );
    let next = store
        .hit_rate_limit(&key, 3, 60, start + Duration::seconds(60))
        .await
        .unwrap();
    assert_eq!(next, RateDecision::Allowed { remaining: 2 });
}

pub async fn counters_add_up_per_window(store: DynStore) {
    let key = format!("test:{}", Uuid::new_v4().simple());
    // Aligned to a 60 s window boundary.
    let start = Utc.timestamp_opt(1_900_000_020, 0).single().unwrap();
    assert_eq!(store.read_counter(&key, 60, start).await.unwrap(), 0);
    assert_eq!(store.add_to_counter(&key, 3, 60, start).await.unwrap(), 3);
    let later = start + Duration::seconds(59);
    assert_eq!(store.add_to_counter(&key, 2, 60, later).await.unwrap(), 5);
    assert_eq!(store.add_to_counter(&key, 0, 60, later).await.unwrap(), 5);
    assert_eq!(store.read_counter(&key, 60, later).await.unwrap(), 5);

    // The same key with another window length is another counter.
    assert_eq!(store.read_counter(&key, 3600, start).await.unwrap(), 0);
    assert_eq!(store.add_to_counter(&key, 7, 3600, start).await.unwrap(), 7);
    assert_eq!(store.read_counter(&key, 60, start).await.unwrap(), 5);

    let next = start + Duration::seconds(60);
    assert_eq!(store.read_counter(&key, 60, next).await.unwrap(), 0);
    assert_eq!(store.add_to_counter(&key, 1, 60, next).await.unwrap(), 1);
    assert_eq!(store.read_counter(&key, 3600, next).await.unwrap(), 7);

    // Through the next window the previous total stays readable (sliding
    // windows weigh it in), even across a purge; after that it is gone.
    store.purge_expired(next, 1_000).await.unwrap();
    assert_eq!(store.read_counter(&key, 60, start).await.unwrap(), 5);
    store
        .purge_expired(next + Duration::seconds(60), 1_000)
        .await
        .unwrap();
    assert_eq!(store.read_counter(&key, 60, next).await.unwrap(), 1);
}

pub async fn concurrent_counter_adds_are_all_counted(store: DynStore) {
    let key = format!("test:{}", Uuid::new_v4().simple());
    let now = t0();
    let adds = (0..40).map(|_| {
        let store = store.clone();
        let key = key.clone();
        tokio::spawn(async move { store.add_to_counter(&key, 1, 600, now).await.unwrap() })
    });
    let mut totals: Vec<u64> = futures::future::join_all(adds)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    totals.sort_unstable();
    assert_eq!(
        totals,
        (1..=40).collect::<Vec<u64>>(),
        "each add saw its own total"
    );
    assert_eq!(store.read_counter(&key, 600, now).await.unwrap(), 40);
}

fn counter_read(key: &str, window_seconds: u32, at: DateTime<Utc>) -> CounterRead<'_> {
    CounterRead {
        key,
        window_seconds,
        at,
    }
}

fn counter_add(key: &str, amount: u64, window_seconds: u32, ceiling: Option<u64>) -> CounterAdd {
    CounterAdd {
        key: key.to_owned(),
        amount,
        window_seconds,
        ceiling,
    }
}

pub async fn counter_batches_read_and_add_as_single_calls_do(store: DynStore) {
    let a = format!("test:{}", Uuid::new_v4().simple());
    let b = format!("test:{}", Uuid::new_v4().simple());
    let missing = format!("test:{}", Uuid::new_v4().simple());
    // Aligned to a 60 s window boundary.
    let start = Utc.timestamp_opt(1_900_000_020, 0).single().unwrap();
    assert!(store.read_counters(&[]).await.unwrap().is_empty());
    assert!(store.add_counters(&[], start).await.unwrap().is_empty());

    // A key repeated in one batch adds up within it, in order.
    let adds = [
        counter_add(&a, 2, 60, None),
        counter_add(&b, 5, 3600, None),
        counter_add(&a, 3, 60, None),
    ];
    assert_eq!(store.add_counters(&adds, start).await.unwrap(), [2, 5, 5]);
    assert_eq!(store.add_to_counter(&a, 1, 60, start).await.unwrap(), 6);

    let next = start + Duration::seconds(60);
    let reads = [
        counter_read(&a, 60, start + Duration::seconds(59)),
        counter_read(&b, 3600, start),
        counter_read(&missing, 60, start),
        counter_read(&a, 60, next),
        counter_read(&a, 3600, start),
        counter_read(&a, 60, start),
    ];
    assert_eq!(
        store.read_counters(&reads).await.unwrap(),
        [6, 5, 0, 0, 0, 6]
    );
    for (r, total) in reads.iter().zip([6, 5, 0, 0, 0, 6]) {
        assert_eq!(
            store
                .read_counter(r.key, r.window_seconds, r.at)
                .await
                .unwrap(),
            total
        );
    }

    // More reads than one SQL statement binds (256) come back whole, in order.
    let many: Vec<_> = (0..300)
        .map(|i| counter_read(if i % 3 == 0 { &a } else { &missing }, 60, start))
        .collect();
    let expected: Vec<u64> = (0..300).map(|i| if i % 3 == 0 { 6 } else { 0 }).collect();
    assert_eq!(store.read_counters(&many).await.unwrap(), expected);
}

pub async fn add_counters_stops_after_the_first_add_over_its_ceiling(store: DynStore) {
    let [x, y, z] = [(); 3].map(|()| format!("test:{}", Uuid::new_v4().simple()));
    let now = t0();
    assert_eq!(store.add_to_counter(&x, 4, 60, now).await.unwrap(), 4);

    // Reaching a ceiling is not going over it.
    let at_ceiling = [
        counter_add(&y, 1, 60, Some(1)),
        counter_add(&x, 1, 60, Some(5)),
    ];
    assert_eq!(store.add_counters(&at_ceiling, now).await.unwrap(), [1, 5]);

    // The add that goes over is made; the ones after it are not.
    let over = [
        counter_add(&y, 1, 60, Some(10)),
        counter_add(&x, 2, 60, Some(5)),
        counter_add(&z, 1, 60, None),
        counter_add(&y, 1, 60, None),
    ];
    assert_eq!(store.add_counters(&over, now).await.unwrap(), [2, 7]);
    let reads = [
        counter_read(&x, 60, now),
        counter_read(&y, 60, now),
        counter_read(&z, 60, now),
    ];
    assert_eq!(store.read_counters(&reads).await.unwrap(), [7, 2, 0]);
}

pub async fn concurrent_counter_batches_are_all_counted(store: DynStore) {
    let k1 = format!("test:{}", Uuid::new_v4().simple());
    let k2 = format!("test:{}", Uuid::new_v4().simple());
    let now = t0();
    let batches = (0..20).map(|_| {
        let store = store.clone();
        let adds = [
            counter_add(&k1, 1, 600, None),
            counter_add(&k2, 2, 600, None),
        ];
        tokio::spawn(async move { store.add_counters(&adds, now).await.unwrap() })
    });
    let mut firsts: Vec<u64> = futures::future::join_all(batches)
        .await
        .into_iter()
        .map(|totals| totals.unwrap()[0])
        .collect();
    firsts.sort_unstable();
    assert_eq!(
        firsts,
        (1..=20).collect::<Vec<u64>>(),
        "each batch saw its own total"
    );
    let reads = [counter_read(&k1, 600, now), counter_read(&k2, 600, now)];
    assert_eq!(store.read_counters(&reads).await.unwrap(), [20, 40]);
}

/// Markers keep real expiry times: Redis lets a namespace's keys go a day after
/// their last expiry, which must not be years ahead in a shared test server.
fn recent() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(Utc::now().timestamp_millis())
        .single()
        .unwrap()
}

fn namespace() -> String {
    format!("ns-{}", Uuid::new_v4().simple())
}

pub async fn markers_live_until_expiry_and_list_by_namespace(store: DynStore) {
    let (ns, other) = (namespace(), namespace());
    let now = recent();
    let soon = now + Duration::seconds(60);
    let late = now + Duration::seconds(3600);
    store.set_marker(&ns, "b", "second", late).await.unwrap();
    store.set_marker(&ns, "a", "first", soon).await.unwrap();
    store
        .set_marker(&other, "c", "elsewhere", late)
        .await
        .unwrap();

    let a = store.get_marker(&ns, "a", now).await.unwrap().unwrap();
    assert_eq!(
        (a.name.as_str(), a.value.as_str(), a.expires_at),
        ("a", "first", soon)
    );
    let names = |ms: Vec<otpd::store::Marker>| ms.into_iter().map(|m| m.name).collect::<Vec<_>>();
    assert_eq!(
        names(store.list_markers(&ns, now).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(names(store.list_markers(&other, now).await.unwrap()), ["c"]);
    assert!(store.get_marker(&ns, "c", now).await.unwrap().is_none());

    // Expiry is exclusive: at `expires_at` the marker is gone.
    assert!(store.get_marker(&ns, "a", soon).await.unwrap().is_none());
    assert_eq!(names(store.list_markers(&ns, soon).await.unwrap()), ["b"]);

    // Setting again overwrites value and expiry (and can revive).
    let later = soon + Duration::seconds(60);
    store.set_marker(&ns, "a", "again", later).await.unwrap();
    let a = store.get_marker(&ns, "a", soon).await.unwrap().unwrap();
    assert_eq!((a.value.as_str(), a.expires_at), ("again", later));

    assert!(store.delete_marker(&ns, "a").await.unwrap());
    assert!(
        !store.delete_marker(&ns, "a").await.unwrap(),
        "already gone"
    );
    assert!(store.get_marker(&ns, "a", now).await.unwrap().is_none());
    assert_eq!(names(store.list_markers(&ns, now).await.unwrap()), ["b"]);
    assert!(!store.delete_marker(&namespace(), "b").await.unwrap());
}

pub async fn claim_marker_is_a_renewable_lease(store: DynStore) {
    let ns = namespace();
    let now = recent();
    let lease = now + Duration::seconds(30);
    assert!(
        store
            .claim_marker(&ns, "msg", "one", lease, now)
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_marker(&ns, "msg", "two", lease, now)
            .await
            .unwrap(),
        "held"
    );
    let marker = store.get_marker(&ns, "msg", now).await.unwrap().unwrap();
    assert_eq!((marker.value.as_str(), marker.expires_at), ("one", lease));

    // The holder renews its own lease.
    let renewed = now + Duration::seconds(50);
    let at = now + Duration::seconds(20);
    assert!(
        store
            .claim_marker(&ns, "msg", "one", renewed, at)
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_marker(&ns, "msg", "two", renewed, lease)
            .await
            .unwrap(),
        "renewed"
    );

    // Once it expires, anyone may take it.
    let taken = renewed + Duration::seconds(30);
    assert!(
        store
            .claim_marker(&ns, "msg", "two", taken, renewed)
            .await
            .unwrap()
    );
    let marker = store
        .get_marker(&ns, "msg", renewed)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((marker.value.as_str(), marker.expires_at), ("two", taken));

    // A marker set by name is claimable only by its value's holder.
    store.set_marker(&ns, "set", "three", lease).await.unwrap();
    assert!(
        !store
            .claim_marker(&ns, "set", "one", lease, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_marker(&ns, "set", "three", lease, now)
            .await
            .unwrap()
    );
}

pub async fn racing_claims_grant_one_lease(store: DynStore) {
    let ns = namespace();
    let now = recent();
    let claims = (0..16).map(|i| {
        let store = store.clone();
        let ns = ns.clone();
        tokio::spawn(async move {
            let holder = format!("instance-{i}");
            let won = store
                .claim_marker(&ns, "msg", &holder, now + Duration::seconds(30), now)
                .await
                .unwrap();
            won.then_some(holder)
        })
    });
    let winners: Vec<String> = futures::future::join_all(claims)
        .await
        .into_iter()
        .filter_map(Result::unwrap)
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let marker = store.get_marker(&ns, "msg", now).await.unwrap().unwrap();
    assert_eq!(marker.value, winners[0]);
}

pub async fn key_rotation_lists_and_reseals_pending_numbers(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let sealed = |key_id: u32, byte: u8| otpd::crypto::SealedPhone {
        key_id,
        blob: vec![byte; 40],
    };
    // Three pending under key 1, one under key 2, one ended under key 1.
    let mut ids = Vec::new();
    for (i, key_id) in [1u32, 1, 2, 1].into_iter().enumerate() {
        let mut v = f.verification(Uuid::new_v4(), "123456", now);
        v.subject = subject();
        v.phone = sealed(key_id, i as u8);
        ids.push((v.id, key_id, v.phone.clone()));
        store.start_send(&f.plan(v), now).await.unwrap();
    }
    let ended = ids[3].0;
    store
        .check_code(&f.tenant, ended, &f.hash(ended, "123456"), None, now)
        .await
        .unwrap();
    let mut stale: Vec<_> = ids[..2]
        .iter()
        .map(|(id, _, phone)| (*id, phone.clone()))
        .collect();
    stale.sort_by_key(|(id, _)| *id);

    let listed = store.list_sealed_with_other_key(2, None, 10).await.unwrap();
    let seen: Vec<_> = listed.iter().map(|r| (r.id, r.phone.clone())).collect();
    assert_eq!(seen, stale, "pending under another key, by id");
    assert!(listed.iter().all(|r| r.tenant == f.tenant));
    let first = store.list_sealed_with_other_key(2, None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = store
        .list_sealed_with_other_key(2, Some(first[0].id), 10)
        .await
        .unwrap();
    assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), [stale[1].0]);

    let (id, old) = &stale[0];
    let new = sealed(2, 99);
    assert!(
        !store.reseal_phone(*id, &sealed(1, 77), &new).await.unwrap(),
        "stale old value"
    );
    assert!(store.reseal_phone(*id, old, &new).await.unwrap());
    assert!(
        !store.reseal_phone(*id, old, &new).await.unwrap(),
        "already resealed"
    );
    assert!(!store.reseal_phone(Uuid::new_v4(), old, &new).await.unwrap());
    let v = store
        .get_verification(&f.tenant, *id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.phone, new);
    let listed = store.list_sealed_with_other_key(2, None, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [stale[1].0]
    );
}

/// A re-send after a failed delivery can move a verification's expiry past
/// the 24 h its subject is kept after its last send: the purge keeps the
/// subject while the verification is pending, so a check by subject still
/// finds it and a new send cannot start a second pending one.
pub async fn a_subject_stays_while_its_verification_is_pending(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let resent = now + Duration::seconds(60);
    let replacement = f.resend(id, "222222", resent + Duration::hours(25));
    store
        .replace_code(&replacement, resent)
        .await
        .unwrap()
        .expect("replaced");
    let next_day = now + Duration::hours(24) + Duration::minutes(5);
    // Other tests may share the backend: a few rounds reach every row.
    for _ in 0..20 {
        if store.purge_expired(next_day, 10_000).await.unwrap() == 0 {
            break;
        }
    }
    let f = Arc::new(f);
    let (g, h) = (f.clone(), f.clone());
    let wrong = CodeHasher::new(
        move |id| g.hash(id, "000000"),
        move |_| h.subject_hash("000000"),
    );
    let found = store
        .check_current_code(&f.tenant, &f.subject, &wrong, None, None, next_day)
        .await
        .unwrap();
    assert!(
        matches!(found, CurrentCheck::Checked(found_id, CheckOutcome::Wrong { .. }) if found_id == id),
        "{found:?}"
    );
}

pub async fn purge_ends_expired_verifications(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let id = f.start(&store, "111111", now).await;
    let later = now + Duration::seconds(301);
    let mut purged = 0;
    // Other tests may share the backend: purge until ours is done, bounded.
    for _ in 0..1000 {
        purged += store.purge_expired(later, 500).await.unwrap();
        let v = store
            .get_verification(&f.tenant, id)
            .await
            .unwrap()
            .unwrap();
        if v.status == Status::Expired {
            assert_eq!(v.code_hash, None, "expired secrets are erased");
            assert!(purged >= 1);
            return;
        }
    }
    panic!("purge never reached the expired verification");
}

pub async fn count_pending_sees_new_verifications(store: DynStore) {
    let f = Fixture::new();
    let now = t0();
    let before = store.count_pending(now).await.unwrap();
    f.start(&store, "111111", now).await;
    let after = store.count_pending(now).await.unwrap();
    assert!(after > before, "{before} -> {after}");
}

/// A verification leaves the pending count as it ends, approved or out of
/// attempts (a Redis Cluster unindexes it a step later: not this promise).
pub async fn ended_verifications_leave_the_pending_count(store: DynStore) {
    let now = t0();
    let (approved, spent) = (Fixture::new(), Fixture::new());
    let before = store.count_pending(now).await.unwrap();
    let approved_id = approved.start(&store, "123456", now).await;
    let spent_id = spent.start(&store, "654321", now).await;
    assert_eq!(store.count_pending(now).await.unwrap(), before + 2);

    let outcome = store
        .check_code(
            &approved.tenant,
            approved_id,
            &approved.hash(approved_id, "123456"),
            None,
            now,
        )
        .await
        .unwrap();
    assert!(matches!(outcome, CheckOutcome::Approved(_)), "{outcome:?}");
    assert_eq!(store.count_pending(now).await.unwrap(), before + 1);

    spent.spend_attempts(&store, spent_id, now).await;
    assert_eq!(store.count_pending(now).await.unwrap(), before);
}

/// Generates one `#[tokio::test]` per contract case for a backend. `$factory` is an
/// async closure returning `Option<DynStore>`; `None` skips (and says so).
#[macro_export]
macro_rules! store_contract_tests {
    ($backend:ident, $factory:expr) => {
        $crate::store_contract_tests!($backend, $factory, [
            racing_wrong_guesses_stay_within_the_guess_budget,
            ended_verifications_leave_the_pending_count,
        ]);
    };
    // `$extra`: the cases of promises only some backends make.
    ($backend:ident, $factory:expr, [$($extra:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_contract_tests!(@cases $factory;
                created_verification_reads_back_exactly,
                send_and_approval_answer_with_the_stored_record,
                right_code_approves_once,
                wrong_guesses_count_down_then_kill,
                hashes_one_byte_off_are_wrong,
                expired_code_is_not_found,
                find_current_sees_pending_and_dead_but_not_ended,
                cooldown_then_resend_keeps_attempts,
                plan_for_a_stale_id_conflicts,
                a_resend_records_its_number_and_options,
                send_window_limits_resends,
                spent_attempts_do_not_skip_cooldown_or_window,
                abort_releases_cooldown_and_leaves_nothing_pending,
                cancel_ends_a_pending_verification,
                tenants_are_isolated,
                concurrent_right_checks_approve_exactly_once,
                racing_wrong_guesses_never_exceed_the_limit,
                racing_sends_accept_exactly_one,
                a_counted_send_counts_only_what_it_starts,
                racing_counted_sends_count_once,
                api_keys_lifecycle,
                messages_record_attempts_and_only_move_forward,
                message_transitions_are_stamped_and_duplicates_do_not_move,
                unfinished_messages_are_listed_per_provider_oldest_first,
                purge_messages_deletes_old_ones_in_batches,
                usage_adds_up_per_day_route_country_and_currency,
                concurrent_usage_adds_are_all_counted,
                a_message_and_its_usage_are_recorded_together,
                an_approval_counts_once_on_its_first_accepted_attempt,
                an_approval_without_an_accepted_attempt_counts_nothing,
                an_approval_adds_its_counts_once_and_a_wrong_code_none,
                an_approval_counts_what_its_send_planned_once,
                a_resend_to_another_number_counts_its_approval_there,
                a_check_by_subject_finds_and_checks_its_current_verification,
                a_check_by_subject_compares_nothing_once_attempts_are_spent,
                a_check_by_subject_of_a_record_without_its_subject_hash_still_compares,
                racing_checks_by_subject_approve_once_and_spend_attempts_exactly,
                a_record_without_a_code_hash_is_not_approved_by_subject,
                a_check_by_subject_compares_the_newest_code,
                replace_code_resends_without_cooldown_and_keeps_attempts,
                inbox_lists_newest_first_per_tenant_and_number,
                rate_limit_counts_per_window,
                counters_add_up_per_window,
                concurrent_counter_adds_are_all_counted,
                counter_batches_read_and_add_as_single_calls_do,
                add_counters_stops_after_the_first_add_over_its_ceiling,
                concurrent_counter_batches_are_all_counted,
                markers_live_until_expiry_and_list_by_namespace,
                claim_marker_is_a_renewable_lease,
                racing_claims_grant_one_lease,
                key_rotation_lists_and_reseals_pending_numbers,
                purge_ends_expired_verifications,
                a_subject_stays_while_its_verification_is_pending,
                an_abort_leaves_a_later_send_alone,
                count_pending_sees_new_verifications,
                guess_budget_is_judged_before_the_compare,
                $($extra),*
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(store) = ($factory)().await else { return };
                $crate::store_contract::$case(store).await;
            }
        )*
    };
}

store_contract_tests!(memory, || async {
    Some(Arc::new(otpd::store::MemoryStore::new()) as DynStore)
});

/// A fresh SQLite file under Cargo's scratch dir for integration tests. The
/// directory is kept (not deleted on drop) because the store outlives this
/// function; `cargo clean` removes it.
pub async fn sqlite_store() -> Arc<otpd::store::SqliteStore> {
    let dir = tempfile::Builder::new()
        .prefix("otpd-sqlite-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    Arc::new(
        otpd::store::SqliteStore::open(&dir.join("otpd.db"))
            .await
            .unwrap(),
    )
}

/// A PostgreSQL store in its own fresh schema, or `None` (said on stderr)
/// when `OTPD_TEST_POSTGRES_URL` is not set.
pub async fn postgres_store() -> Option<Arc<otpd::store::PostgresStore>> {
    let Ok(url) = std::env::var("OTPD_TEST_POSTGRES_URL") else {
        eprintln!("skipping: OTPD_TEST_POSTGRES_URL is not set");
        return None;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    Some(Arc::new(
        otpd::store::PostgresStore::connect_in_schema(&url, &schema)
            .await
            .unwrap(),
    ))
}

store_contract_tests!(sqlite, || async { Some(sqlite_store().await as DynStore) });

store_contract_tests!(postgres, || async {
    postgres_store().await.map(|s| s as DynStore)
});

/// A Redis store under a fresh key prefix, or `None` (with a note) when `var` is unset.
pub async fn redis_store_from_env(var: &str) -> Option<DynStore> {
    let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipping: {var} is not set");
        return None;
    };
    let prefix = format!("otpdtest:{}", Uuid::new_v4().simple());
    let store = otpd::store::RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .unwrap();
    Some(Arc::new(store) as DynStore)
}

store_contract_tests!(redis, || redis_store_from_env("OTPD_TEST_REDIS_URL"));

// A cluster judges the guess budget before its check script and counts after
// it (the counters live in other slots): exact only for checks one at a time.
// It also unindexes an ended verification after the script that ended it.
store_contract_tests!(
    redis_cluster,
    || redis_store_from_env("OTPD_TEST_REDIS_CLUSTER_URL"),
    []
);
