//! In-process store for tests, benchmarks and single-instance demos. Nothing
//! survives a restart.
//!
//! Records are kept compact because a busy instance holds millions of them:
//! fixed-size structs in chunked slabs (no per-record heap allocation), indexed
//! by open-addressing tables of 4-byte slab positions; tenant, purpose, provider
//! and currency strings are interned; a masked number is stored as its last four
//! digits and a count of stars, a country as two letters, times as milliseconds
//! (the precision every backend keeps). Anything that does not fit that shape (a
//! `uid`, an error text, an unusual mask) goes to a per-record side table.
//!
//! Verifications and subjects are sharded by their keys, each shard behind its
//! own mutex. A send locks its subject's shard first and only then the
//! verification's, a check locks only the verification's, so lock order is
//! always subject → verification (messages, the inbox and the interner are
//! leaves: nothing else is locked while they are held). Delivery attempts have
//! their own retention (`purge_messages`), independent of their verification's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use dashmap::DashMap;
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use siphasher::sip128::{Hash128, Hasher128, SipHasher13};
use uuid::Uuid;

use super::{
    ApprovalCounts, CancelOutcome, CheckOutcome, CodeHasher, CodeReplacement, CounterAdd,
    CounterRead, CurrentCheck, GuessBudget, InboxEntry, Marker, MessageTransition, MessageUpdate,
    RateDecision, SealedRecord, SendAbort, SendDecision, SendPlan, Store, StoreResult, UsageRow,
    advance_message, is_unfinished, seconds_until,
};
use crate::crypto::{Crypto, SealedPhone};
use crate::domain::limits::WindowCounts;
use crate::domain::{
    ApiKeyRecord, DeliveryStatus, Dialect, MessageRecord, SendOptions, Status, SubjectKey,
    Verification,
};

/// Ended verifications stay readable this long before the purge forgets them.
const KEEP_ENDED: Duration = Duration::hours(24);
const INBOX_CAPACITY: usize = 10_000;
const SHARDS: usize = 16;
/// The counters' shards: a shard's table re-files all its entries under its
/// lock when it grows, so a busy instance's few million counters are split
/// fine enough that each growth is short (at 1.8M counters, 4.2 ms with 16
/// shards and 0.4 ms with 256; `otpd-bench`'s `insert-stalls`).
const COUNTER_SHARDS: usize = 256;
/// Records per slab chunk: big enough to amortise, small enough not to matter idle.
const CHUNK: usize = 1024;
/// A sealed E.164 number: 24-byte nonce, at most 16 bytes of text, 16-byte tag.
const PHONE_INLINE: usize = 56;
/// Provider message ids up to this length are stored inline (BridgeXAPI's are 25).
const PMID_INLINE: usize = 40;
/// Distinct interned strings; past this, new ones go to the side table instead.
const MAX_SYMBOLS: usize = 65_536;
/// Distinct approval count sets (`ApprovalSets`): one per tenant and prefix
/// chain in use; past this, a record keeps none and its check works them out.
const MAX_APPROVAL_SETS: usize = 16_384;
const NO_SYMBOL: u32 = u32::MAX;
const NONE: u32 = u32::MAX;

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Values stored once and referred to by number, at most `CAP` of them (a
/// flood of distinct values must not grow the table without bound).
struct Interner<T: ?Sized, const CAP: usize> {
    table: RwLock<InternTable<T>>,
}

struct InternTable<T: ?Sized> {
    ids: HashMap<Arc<T>, u32>,
    values: Vec<Arc<T>>,
}

impl<T: ?Sized, const CAP: usize> Default for Interner<T, CAP> {
    fn default() -> Self {
        Self {
            table: RwLock::new(InternTable {
                ids: HashMap::new(),
                values: Vec::new(),
            }),
        }
    }
}

impl<T: ?Sized + Hash + Eq, const CAP: usize> Interner<T, CAP>
where
    for<'a> Arc<T>: From<&'a T>,
{
    fn find(&self, value: &T) -> Option<u32> {
        self.table.read().ids.get(value).copied()
    }

    /// `u32::MAX` (`NO_SYMBOL`, `NONE`) once the table is full.
    fn intern(&self, value: &T) -> u32 {
        if let Some(id) = self.find(value) {
            return id;
        }
        let mut t = self.table.write();
        if let Some(id) = t.ids.get(value) {
            return *id;
        }
        if t.values.len() >= CAP {
            return u32::MAX;
        }
        let id = t.values.len() as u32;
        let stored: Arc<T> = Arc::from(value);
        t.values.push(stored.clone());
        t.ids.insert(stored, id);
        id
    }

    fn get(&self, id: u32) -> Option<Arc<T>> {
        self.table.read().values.get(id as usize).cloned()
    }
}

/// Tenant, purpose, provider and currency names.
type Symbols = Interner<str, MAX_SYMBOLS>;

impl Symbols {
    fn name(&self, id: u32) -> Arc<str> {
        self.get(id).unwrap_or_else(|| Arc::from(""))
    }
}

/// Approval count sets (`SendPlan::approval_counts`). Numbers that share
/// their prefixes share a set, so a record keeps four bytes, and its approval
/// adds the set instead of opening the record's number and hashing its
/// prefixes again.
type ApprovalSets = Interner<[CounterAdd], MAX_APPROVAL_SETS>;

impl ApprovalSets {
    /// `NONE` for no adds, and once the table is full.
    fn intern_set(&self, adds: &[CounterAdd]) -> u32 {
        if adds.is_empty() {
            NONE
        } else {
            self.intern(adds)
        }
    }
}

/// A string field: interned when it could be, else in the record's side entry.
fn text_matches(symbols: &Symbols, sym: u32, spilled: Option<&str>, wanted: &str) -> bool {
    if sym == NO_SYMBOL {
        spilled == Some(wanted)
    } else {
        symbols.find(wanted) == Some(sym)
    }
}

fn text(symbols: &Symbols, sym: u32, spilled: Option<&str>) -> String {
    if sym == NO_SYMBOL {
        spilled.unwrap_or_default().to_owned()
    } else {
        symbols.name(sym).to_string()
    }
}

/// `+*******0670` as (7 stars, "0670"); `None` for any other shape.
fn compact_mask(masked: &str) -> Option<(u8, [u8; 4])> {
    let rest = masked.strip_prefix('+')?;
    let stars = rest.bytes().take_while(|b| *b == b'*').count();
    let tail = &rest.as_bytes()[stars..];
    if tail.len() != 4 || tail.contains(&b'*') || !tail.is_ascii() {
        return None;
    }
    Some((
        u8::try_from(stars).ok()?,
        [tail[0], tail[1], tail[2], tail[3]],
    ))
}

fn expand_mask(stars: u8, tail: [u8; 4]) -> String {
    let mut s = String::with_capacity(5 + usize::from(stars));
    s.push('+');
    s.extend(std::iter::repeat_n('*', usize::from(stars)));
    s.extend(tail.iter().map(|b| char::from(*b)));
    s
}

fn compact_country(country: &str) -> Option<[u8; 2]> {
    match country.as_bytes() {
        [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => Some([*a, *b]),
        _ => None,
    }
}

/// A string that did not fit its compact form.
#[derive(Debug, Clone, Default)]
struct Spill {
    tenant: Option<Box<str>>,
    purpose: Option<Box<str>>,
    uid: Option<Box<str>>,
    masked_to: Option<Box<str>>,
    country: Option<Box<str>>,
    phone: Option<SealedPhone>,
    provider: Option<Box<str>>,
    provider_message_id: Option<Box<str>>,
    currency: Option<Box<str>>,
    error: Option<Box<str>>,
    /// Resends are rare: 16 bytes here rather than in every delivery record.
    resend_of: Option<Uuid>,
    locale: Option<Box<str>>,
}

/// A hash index of slab positions, in parts that grow one at a time.
///
/// A table that grows re-files every entry, holding the store's lock. So each
/// entry keeps 32 bits of its key's hash and is re-filed from those alone
/// (hashing each key again would read its record and, for provider message
/// ids, rebuild their text), and the index is sixteen tables, each growing on
/// its own with a sixteenth of the entries. Growing the delivery records'
/// indexes held the lock for 165 ms at 229k records and 755 ms at 918k
/// before (`otpd-bench`'s `insert-stalls`); now 1 ms at most up to 1M.
#[derive(Default)]
struct Index([HashTable<Slot>; PARTS]);

const PARTS: usize = 16;

#[derive(Clone, Copy)]
struct Slot {
    /// The low half of the key's hash.
    hash: u32,
    at: u32,
}

/// The table's hash of a kept half: hashbrown picks the bucket with the low
/// bits and the control byte with the top seven, so the half fills both ends.
fn spread(hash: u32) -> u64 {
    u64::from(hash) << 32 | u64::from(hash)
}

impl Index {
    /// The part a hash is filed in: bits that neither a part's table (the low
    /// half) nor the store's shards (`shard_of`) use.
    fn part(&self, hash: u64) -> &HashTable<Slot> {
        &self.0[(hash >> 40) as usize % PARTS]
    }

    fn part_mut(&mut self, hash: u64) -> &mut HashTable<Slot> {
        &mut self.0[(hash >> 40) as usize % PARTS]
    }

    /// The position filed under `hash` that `is` accepts.
    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        let h = hash as u32;
        self.part(hash)
            .find(spread(h), |s| s.hash == h && is(s.at))
            .map(|s| s.at)
    }

    fn insert(&mut self, hash: u64, at: u32) {
        let h = hash as u32;
        self.part_mut(hash)
            .insert_unique(spread(h), Slot { hash: h, at }, |s| spread(s.hash));
    }

    /// Removes the entry filed under `hash` that `is` accepts.
    fn remove(&mut self, hash: u64, is: impl Fn(u32) -> bool) {
        let h = hash as u32;
        if let Ok(entry) = self
            .part_mut(hash)
            .find_entry(spread(h), |s| s.hash == h && is(s.at))
        {
            entry.remove();
        }
    }
}

/// Fixed-size records in chunks; freed slots are reused.
struct Slab<T> {
    chunks: Vec<Box<[T]>>,
    free: Vec<u32>,
    used: usize,
}

impl<T: Copy + Default> Default for Slab<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            free: Vec::new(),
            used: 0,
        }
    }
}

impl<T: Copy + Default> Slab<T> {
    fn insert(&mut self, value: T) -> u32 {
        if let Some(i) = self.free.pop() {
            *self.get_mut(i) = value;
            return i;
        }
        if self.used == self.chunks.len() * CHUNK {
            self.chunks
                .push(vec![T::default(); CHUNK].into_boxed_slice());
        }
        let i = self.used;
        self.used += 1;
        self.chunks[i / CHUNK][i % CHUNK] = value;
        i as u32
    }

    fn get(&self, i: u32) -> &T {
        let i = i as usize;
        &self.chunks[i / CHUNK][i % CHUNK]
    }

    fn get_mut(&mut self, i: u32) -> &mut T {
        let i = i as usize;
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }

    fn release(&mut self, i: u32) {
        *self.get_mut(i) = T::default();
        self.free.push(i);
    }

    /// Positions of every slot ever used (live or free).
    fn positions(&self) -> std::ops::Range<u32> {
        0..self.used as u32
    }
}

// Flags shared by the record kinds.
const LIVE: u8 = 1;
const SPILLED: u8 = 2;
// Verification flags.
const HAS_CODE: u8 = 4;
const HAS_COUNTRY: u8 = 8;
const COMPACT_MASK: u8 = 16;

/// One verification, 216 bytes.
#[derive(Clone, Copy)]
struct VRec {
    id: [u8; 16],
    subject: [u8; 32],
    code_hash: [u8; 32],
    phone: [u8; PHONE_INLINE],
    created: i64,
    updated: i64,
    expires: i64,
    last_sent: i64,
    phone_key: u32,
    attempts: u32,
    max_attempts: u32,
    send_count: u32,
    tenant: u32,
    purpose: u32,
    /// The send's approval counts (`ApprovalSets`), `NONE` when it kept none.
    approval: u32,
    /// `SendOptions`: the pinned route (`NONE`: none), the locale's symbol
    /// (`NO_SYMBOL`: none, or in the side table), and `send_bits`.
    route: u32,
    locale: u32,
    masked_tail: [u8; 4],
    country: [u8; 2],
    masked_stars: u8,
    /// Bytes of `phone` in use; 0 when the sealed number is in the side table.
    phone_len: u8,
    status: u8,
    flags: u8,
    send_bits: u8,
}

impl Default for VRec {
    fn default() -> Self {
        Self {
            id: [0; 16],
            subject: [0; 32],
            code_hash: [0; 32],
            phone: [0; PHONE_INLINE],
            created: 0,
            updated: 0,
            expires: 0,
            last_sent: 0,
            phone_key: 0,
            attempts: 0,
            max_attempts: 0,
            send_count: 0,
            tenant: NO_SYMBOL,
            purpose: NO_SYMBOL,
            approval: NONE,
            route: NONE,
            locale: NO_SYMBOL,
            masked_tail: [0; 4],
            country: [0; 2],
            masked_stars: 0,
            phone_len: 0,
            status: 0,
            flags: 0,
            send_bits: 0,
        }
    }
}

fn status_code(s: Status) -> u8 {
    match s {
        Status::Pending => 0,
        Status::Approved => 1,
        Status::Expired => 2,
        Status::Canceled => 3,
        Status::MaxAttempts => 4,
        Status::Failed => 5,
    }
}

fn status_of(code: u8) -> Status {
    match code {
        0 => Status::Pending,
        1 => Status::Approved,
        2 => Status::Expired,
        3 => Status::Canceled,
        4 => Status::MaxAttempts,
        _ => Status::Failed,
    }
}

impl VRec {
    fn status(&self) -> Status {
        status_of(self.status)
    }

    fn is_pending_at(&self, now: i64) -> bool {
        self.status() == Status::Pending && now < self.expires
    }

    /// `Verification::is_checkable_at`, on the stored form.
    fn is_checkable_at(&self, now: i64) -> bool {
        matches!(self.status(), Status::Pending | Status::MaxAttempts) && now < self.expires
    }

    fn code_hash(&self) -> Option<[u8; 32]> {
        (self.flags & HAS_CODE != 0).then_some(self.code_hash)
    }

    fn clear_code(&mut self) {
        self.flags &= !HAS_CODE;
        self.code_hash = [0; 32];
    }

    fn encode(v: &Verification, symbols: &Symbols) -> (Self, Option<Box<Spill>>) {
        let mut spill = Spill::default();
        let mut r = VRec {
            id: *v.id.as_bytes(),
            subject: v.subject.0,
            created: ms(v.created_at),
            updated: ms(v.updated_at),
            expires: ms(v.expires_at),
            last_sent: ms(v.last_sent_at),
            phone_key: v.phone.key_id,
            attempts: v.attempts,
            max_attempts: v.max_attempts,
            send_count: v.send_count,
            tenant: symbols.intern(&v.tenant),
            purpose: symbols.intern(&v.purpose),
            status: status_code(v.status),
            flags: LIVE,
            ..VRec::default()
        };
        if r.tenant == NO_SYMBOL {
            spill.tenant = Some(v.tenant.as_str().into());
        }
        if r.purpose == NO_SYMBOL {
            spill.purpose = Some(v.purpose.as_str().into());
        }
        spill.uid = v.uid.as_deref().map(Into::into);
        if let Some(o) = &v.send_options {
            r.send_bits = send_bits(o);
            r.route = o.route_id.unwrap_or(NONE);
            if let Some(locale) = &o.locale {
                r.locale = symbols.intern(locale);
                if r.locale == NO_SYMBOL {
                    spill.locale = Some(locale.as_str().into());
                }
            }
        }
        if let Some(h) = v.code_hash {
            r.code_hash = h;
            r.flags |= HAS_CODE;
        }
        if v.phone.blob.len() <= PHONE_INLINE && !v.phone.blob.is_empty() {
            r.phone[..v.phone.blob.len()].copy_from_slice(&v.phone.blob);
            r.phone_len = v.phone.blob.len() as u8;
        } else {
            spill.phone = Some(v.phone.clone());
        }
        match compact_mask(&v.masked_to) {
            Some((stars, tail)) => {
                r.masked_stars = stars;
                r.masked_tail = tail;
                r.flags |= COMPACT_MASK;
            }
            None => spill.masked_to = Some(v.masked_to.as_str().into()),
        }
        if let Some(c) = &v.country {
            match compact_country(c) {
                Some(cc) => {
                    r.country = cc;
                    r.flags |= HAS_COUNTRY;
                }
                None => spill.country = Some(c.as_str().into()),
            }
        }
        let spill = spill.is_used().then(|| Box::new(spill));
        if spill.is_some() {
            r.flags |= SPILLED;
        }
        (r, spill)
    }

    fn masked_to(&self, spill: Option<&Spill>) -> String {
        if self.flags & COMPACT_MASK != 0 {
            expand_mask(self.masked_stars, self.masked_tail)
        } else {
            spill
                .and_then(|x| x.masked_to.as_deref())
                .unwrap_or_default()
                .to_owned()
        }
    }

    fn decode(&self, spill: Option<&Spill>, symbols: &Symbols) -> Verification {
        let s = |f: fn(&Spill) -> Option<&str>| spill.and_then(f);
        Verification {
            id: Uuid::from_bytes(self.id),
            tenant: text(symbols, self.tenant, s(|x| x.tenant.as_deref())),
            subject: SubjectKey(self.subject),
            purpose: text(symbols, self.purpose, s(|x| x.purpose.as_deref())),
            uid: s(|x| x.uid.as_deref()).map(str::to_owned),
            phone: match spill.and_then(|x| x.phone.clone()) {
                Some(p) => p,
                None => SealedPhone {
                    key_id: self.phone_key,
                    blob: self.phone[..usize::from(self.phone_len)].to_vec(),
                },
            },
            masked_to: self.masked_to(spill),
            country: if self.flags & HAS_COUNTRY != 0 {
                Some(self.country.iter().map(|b| char::from(*b)).collect())
            } else {
                s(|x| x.country.as_deref()).map(str::to_owned)
            },
            code_hash: self.code_hash(),
            status: self.status(),
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            send_count: self.send_count,
            created_at: time(self.created),
            updated_at: time(self.updated),
            expires_at: time(self.expires),
            last_sent_at: time(self.last_sent),
            send_options: self.send_options(spill, symbols),
        }
    }

    fn send_options(&self, spill: Option<&Spill>, symbols: &Symbols) -> Option<SendOptions> {
        let code_length = self.send_bits & SEND_CODE_LENGTH;
        if code_length == 0 {
            return None;
        }
        let locale = if self.locale == NO_SYMBOL {
            spill.and_then(|x| x.locale.as_deref()).map(str::to_owned)
        } else {
            Some(symbols.name(self.locale).to_string())
        };
        Some(SendOptions {
            dialect: match self.send_bits & SEND_DIALECT {
                SEND_BRIDGEX => Dialect::Bridgex,
                SEND_OPENLYNE => Dialect::Openlyne,
                _ => Dialect::Native,
            },
            code_length,
            locale,
            route_id: (self.route != NONE).then_some(self.route),
            failover: self.send_bits & SEND_FAILOVER != 0,
        })
    }
}

/// `VRec::send_bits`: the code's length (4–10; 0 when the record has no
/// send options), the dialect, and whether failover was allowed.
const SEND_CODE_LENGTH: u8 = 0x0f;
const SEND_DIALECT: u8 = 0x30;
const SEND_BRIDGEX: u8 = 0x10;
const SEND_OPENLYNE: u8 = 0x20;
const SEND_FAILOVER: u8 = 0x40;

fn send_bits(o: &SendOptions) -> u8 {
    let dialect = match o.dialect {
        Dialect::Native => 0,
        Dialect::Bridgex => SEND_BRIDGEX,
        Dialect::Openlyne => SEND_OPENLYNE,
    };
    (o.code_length & SEND_CODE_LENGTH) | dialect | if o.failover { SEND_FAILOVER } else { 0 }
}

impl Spill {
    fn is_used(&self) -> bool {
        self.tenant.is_some()
            || self.purpose.is_some()
            || self.uid.is_some()
            || self.masked_to.is_some()
            || self.country.is_some()
            || self.phone.is_some()
            || self.provider.is_some()
            || self.provider_message_id.is_some()
            || self.currency.is_some()
            || self.error.is_some()
            || self.resend_of.is_some()
            || self.locale.is_some()
    }
}

/// One shard of verifications, by id.
#[derive(Default)]
struct VShard {
    slab: Slab<VRec>,
    by_id: Index,
    spills: HashMap<u32, Box<Spill>>,
}

impl VShard {
    fn find(&self, hash: u64, id: &[u8; 16]) -> Option<u32> {
        self.by_id.find(hash, |i| self.slab.get(i).id == *id)
    }

    fn spill(&self, i: u32) -> Option<&Spill> {
        if self.slab.get(i).flags & SPILLED != 0 {
            self.spills.get(&i).map(|b| &**b)
        } else {
            None
        }
    }

    fn tenant_is(&self, i: u32, symbols: &Symbols, tenant: &str) -> bool {
        let r = self.slab.get(i);
        text_matches(
            symbols,
            r.tenant,
            self.spill(i).and_then(|s| s.tenant.as_deref()),
            tenant,
        )
    }

    fn decode(&self, i: u32, symbols: &Symbols) -> Verification {
        self.slab.get(i).decode(self.spill(i), symbols)
    }

    /// Stores `v` over the record at `i`, with `approval`'s set.
    fn rewrite(&mut self, i: u32, v: &Verification, symbols: &Symbols, approval: u32) {
        let (mut fresh, spill) = VRec::encode(v, symbols);
        fresh.flags |= self.slab.get(i).flags & LIVE;
        fresh.approval = approval;
        *self.slab.get_mut(i) = fresh;
        self.spills.remove(&i);
        if let Some(s) = spill {
            self.spills.insert(i, s);
        }
    }
}

/// A subject's cooldown and window state and its current verification.
#[derive(Clone, Copy, Default)]
struct SRec {
    key: [u8; 32],
    current: [u8; 16],
    last_sent: i64,
    window_start: i64,
    window_count: u32,
    flags: u8,
}

const HAS_CURRENT: u8 = 4;
const HAS_LAST_SENT: u8 = 8;
const HAS_WINDOW: u8 = 16;

impl SRec {
    fn current(&self) -> Option<Uuid> {
        (self.flags & HAS_CURRENT != 0).then(|| Uuid::from_bytes(self.current))
    }

    fn last_sent(&self) -> Option<i64> {
        (self.flags & HAS_LAST_SENT != 0).then_some(self.last_sent)
    }

    fn set_last_sent(&mut self, t: Option<i64>) {
        match t {
            Some(t) => {
                self.last_sent = t;
                self.flags |= HAS_LAST_SENT;
            }
            None => self.flags &= !HAS_LAST_SENT,
        }
    }
}

#[derive(Default)]
struct SShard {
    slab: Slab<SRec>,
    by_key: Index,
}

impl SShard {
    fn find(&self, hash: u64, key: &[u8; 32]) -> Option<u32> {
        self.by_key.find(hash, |i| self.slab.get(i).key == *key)
    }
}

// Message flags.
const M_LIVE: u16 = 1;
const M_SPILLED: u16 = 2;
const HAS_PMID: u16 = 4;
const HAS_COST: u16 = 8;
const M_HAS_COUNTRY: u16 = 16;
const M_COMPACT_MASK: u16 = 32;
const HAS_SENT_AT: u16 = 128;
const HAS_DELIVERED_AT: u16 = 256;
const HAS_FAILED_AT: u16 = 512;

/// One delivery attempt, 160 bytes.
#[derive(Clone, Copy)]
struct MRec {
    id: [u8; 16],
    verification_id: [u8; 16],
    pmid: [u8; PMID_INLINE],
    created: i64,
    updated: i64,
    sent_at: i64,
    delivered_at: i64,
    failed_at: i64,
    cost: f64,
    tenant: u32,
    provider: u32,
    /// `NONE` when absent; `NO_SYMBOL` never (a spilled currency is flagged by the spill).
    currency: u32,
    route_id: u32,
    latency_ms: u32,
    /// The next attempt of the same verification.
    next: u32,
    masked_tail: [u8; 4],
    country: [u8; 2],
    masked_stars: u8,
    pmid_len: u8,
    status: u8,
    flags: u16,
}

impl Default for MRec {
    fn default() -> Self {
        Self {
            id: [0; 16],
            verification_id: [0; 16],
            pmid: [0; PMID_INLINE],
            created: 0,
            updated: 0,
            sent_at: 0,
            delivered_at: 0,
            failed_at: 0,
            cost: 0.0,
            tenant: NO_SYMBOL,
            provider: NO_SYMBOL,
            currency: NONE,
            route_id: 0,
            latency_ms: 0,
            next: NONE,
            masked_tail: [0; 4],
            country: [0; 2],
            masked_stars: 0,
            pmid_len: 0,
            status: 0,
            flags: 0,
        }
    }
}

fn delivery_code(s: DeliveryStatus) -> u8 {
    match s {
        DeliveryStatus::Queued => 0,
        DeliveryStatus::Sent => 1,
        DeliveryStatus::Delivered => 2,
        DeliveryStatus::Failed => 3,
        DeliveryStatus::Undelivered => 4,
        DeliveryStatus::Unknown => 5,
    }
}

fn delivery_of(code: u8) -> DeliveryStatus {
    match code {
        0 => DeliveryStatus::Queued,
        1 => DeliveryStatus::Sent,
        2 => DeliveryStatus::Delivered,
        3 => DeliveryStatus::Failed,
        4 => DeliveryStatus::Undelivered,
        _ => DeliveryStatus::Unknown,
    }
}

impl MRec {
    fn encode(m: &MessageRecord, symbols: &Symbols) -> (Self, Option<Box<Spill>>) {
        let mut spill = Spill::default();
        let mut r = MRec {
            id: *m.id.as_bytes(),
            verification_id: *m.verification_id.as_bytes(),
            created: ms(m.created_at),
            updated: ms(m.updated_at),
            tenant: symbols.intern(&m.tenant),
            provider: symbols.intern(&m.provider),
            route_id: m.route_id,
            latency_ms: m.latency_ms,
            status: delivery_code(m.status),
            flags: M_LIVE,
            ..MRec::default()
        };
        spill.resend_of = m.resend_of;
        for (at, field, flag) in [
            (m.sent_at, &mut r.sent_at, HAS_SENT_AT),
            (m.delivered_at, &mut r.delivered_at, HAS_DELIVERED_AT),
            (m.failed_at, &mut r.failed_at, HAS_FAILED_AT),
        ] {
            if let Some(at) = at {
                *field = ms(at);
                r.flags |= flag;
            }
        }
        if r.tenant == NO_SYMBOL {
            spill.tenant = Some(m.tenant.as_str().into());
        }
        if r.provider == NO_SYMBOL {
            spill.provider = Some(m.provider.as_str().into());
        }
        if let Some(pmid) = &m.provider_message_id {
            r.flags |= HAS_PMID;
            if pmid.len() <= PMID_INLINE {
                r.pmid[..pmid.len()].copy_from_slice(pmid.as_bytes());
                r.pmid_len = pmid.len() as u8;
            } else {
                spill.provider_message_id = Some(pmid.as_str().into());
            }
        }
        if let Some(cost) = m.cost {
            r.cost = cost;
            r.flags |= HAS_COST;
        }
        r.set_currency(m.currency.as_deref(), symbols, &mut spill);
        spill.error = m.error.as_deref().map(Into::into);
        match compact_mask(&m.masked_to) {
            Some((stars, tail)) => {
                r.masked_stars = stars;
                r.masked_tail = tail;
                r.flags |= M_COMPACT_MASK;
            }
            None => spill.masked_to = Some(m.masked_to.as_str().into()),
        }
        if let Some(c) = &m.country {
            match compact_country(c) {
                Some(cc) => {
                    r.country = cc;
                    r.flags |= M_HAS_COUNTRY;
                }
                None => spill.country = Some(c.as_str().into()),
            }
        }
        let spill = spill.is_used().then(|| Box::new(spill));
        if spill.is_some() {
            r.flags |= M_SPILLED;
        }
        (r, spill)
    }

    fn set_currency(&mut self, currency: Option<&str>, symbols: &Symbols, spill: &mut Spill) {
        spill.currency = None;
        self.currency = match currency {
            None => NONE,
            Some(c) => match symbols.intern(c) {
                NO_SYMBOL => {
                    spill.currency = Some(c.into());
                    NONE
                }
                id => id,
            },
        };
    }

    fn country(&self, spill: Option<&Spill>) -> Option<String> {
        if self.flags & M_HAS_COUNTRY != 0 {
            Some(self.country.iter().map(|b| char::from(*b)).collect())
        } else {
            spill.and_then(|x| x.country.as_deref()).map(str::to_owned)
        }
    }

    /// The provider message id when it is stored inline.
    fn inline_pmid(&self) -> Option<&[u8]> {
        (self.flags & HAS_PMID != 0 && self.pmid_len > 0)
            .then(|| &self.pmid[..usize::from(self.pmid_len)])
    }

    fn decode(&self, spill: Option<&Spill>, symbols: &Symbols) -> MessageRecord {
        let s = |f: fn(&Spill) -> Option<&str>| spill.and_then(f);
        MessageRecord {
            id: Uuid::from_bytes(self.id),
            verification_id: Uuid::from_bytes(self.verification_id),
            tenant: text(symbols, self.tenant, s(|x| x.tenant.as_deref())),
            route_id: self.route_id,
            provider: text(symbols, self.provider, s(|x| x.provider.as_deref())),
            provider_message_id: match self.inline_pmid() {
                Some(p) => Some(String::from_utf8_lossy(p).into_owned()),
                None => s(|x| x.provider_message_id.as_deref()).map(str::to_owned),
            },
            masked_to: if self.flags & M_COMPACT_MASK != 0 {
                expand_mask(self.masked_stars, self.masked_tail)
            } else {
                s(|x| x.masked_to.as_deref()).unwrap_or_default().to_owned()
            },
            country: self.country(spill),
            status: delivery_of(self.status),
            error: s(|x| x.error.as_deref()).map(str::to_owned),
            cost: (self.flags & HAS_COST != 0).then_some(self.cost),
            currency: if self.currency == NONE {
                s(|x| x.currency.as_deref()).map(str::to_owned)
            } else {
                Some(symbols.name(self.currency).to_string())
            },
            latency_ms: self.latency_ms,
            resend_of: spill.and_then(|x| x.resend_of),
            created_at: time(self.created),
            sent_at: (self.flags & HAS_SENT_AT != 0).then(|| time(self.sent_at)),
            delivered_at: (self.flags & HAS_DELIVERED_AT != 0).then(|| time(self.delivered_at)),
            failed_at: (self.flags & HAS_FAILED_AT != 0).then(|| time(self.failed_at)),
            updated_at: time(self.updated),
        }
    }
}

/// Every delivery attempt, with its indexes: by id, by verification (the
/// first attempt; the rest follow `next`), by (provider, provider id), the
/// attempts still awaiting a final status by (provider, creation, id) for the
/// delivery-status poller, and every attempt by creation for retention.
#[derive(Default)]
struct Messages {
    slab: Slab<MRec>,
    by_id: Index,
    by_verification: Index,
    by_provider_id: Index,
    /// (provider, creation, position).
    unfinished: BTreeSet<(u32, i64, u32)>,
    /// (creation, position), oldest first. Attempts arrive almost in creation
    /// order, so an insert lands at or near the back, and only retention removes
    /// them, from the front: a sorted deque costs 16 bytes an entry where a
    /// B-tree filled in order costs about twice that.
    by_created: VecDeque<(i64, u32)>,
    spills: HashMap<u32, Box<Spill>>,
}

impl Messages {
    fn spill(&self, i: u32) -> Option<&Spill> {
        if self.slab.get(i).flags & M_SPILLED != 0 {
            self.spills.get(&i).map(|b| &**b)
        } else {
            None
        }
    }

    fn pmid(&self, i: u32) -> Option<&[u8]> {
        let r = self.slab.get(i);
        r.inline_pmid().or_else(|| {
            self.spill(i)
                .and_then(|s| s.provider_message_id.as_deref())
                .map(str::as_bytes)
        })
    }

    fn provider_is(&self, i: u32, symbols: &Symbols, provider: &str) -> bool {
        text_matches(
            symbols,
            self.slab.get(i).provider,
            self.spill(i).and_then(|s| s.provider.as_deref()),
            provider,
        )
    }

    fn tenant_is(&self, i: u32, symbols: &Symbols, tenant: &str) -> bool {
        text_matches(
            symbols,
            self.slab.get(i).tenant,
            self.spill(i).and_then(|s| s.tenant.as_deref()),
            tenant,
        )
    }

    fn decode(&self, i: u32, symbols: &Symbols) -> MessageRecord {
        self.slab.get(i).decode(self.spill(i), symbols)
    }

    /// `MessageRecord::was_accepted`, read off the compact record.
    fn was_accepted(&self, i: u32) -> bool {
        let r = self.slab.get(i);
        delivery_of(r.status).accepted() || r.flags & HAS_PMID != 0
    }

    /// `UsageRow::approval` on attempt `i`, without decoding the whole
    /// attempt (its provider, ids, mask, error): a right check's share of the
    /// store's work was mostly that decoding.
    fn approval_row(&self, i: u32, symbols: &Symbols) -> UsageRow {
        let r = self.slab.get(i);
        let spill = self.spill(i);
        let tenant = text(symbols, r.tenant, spill.and_then(|s| s.tenant.as_deref()));
        let mut row = UsageRow::new(
            &tenant,
            time(r.created).date_naive(),
            r.route_id,
            r.country(spill).as_deref(),
            None,
        );
        row.verifications_approved = 1;
        row
    }

    /// The attempt a provider knows by `pmid` (`hash`: `pmid_hash` of both).
    fn find_by_provider_id(
        &self,
        hash: u64,
        symbols: &Symbols,
        provider: &str,
        pmid: &str,
    ) -> Option<u32> {
        self.by_provider_id.find(hash, |j| {
            self.pmid(j) == Some(pmid.as_bytes()) && self.provider_is(j, symbols, provider)
        })
    }

    /// A verification's attempts, oldest first (`hash`: of its id).
    fn attempts_of(&self, hash: u64, verification_id: &[u8; 16]) -> impl Iterator<Item = u32> {
        let first = self
            .by_verification
            .find(hash, |j| {
                self.slab.get(j).verification_id == *verification_id
            })
            .unwrap_or(NONE);
        let some = |j: u32| (j != NONE).then_some(j);
        std::iter::successors(some(first), move |&j| some(self.slab.get(j).next))
    }
}

pub struct MemoryStore {
    hasher: RandomState,
    symbols: Symbols,
    approvals: ApprovalSets,
    keys: DashMap<[u8; 32], ApiKeyRecord>,
    subjects: Box<[Mutex<SShard>]>,
    verifications: Box<[Mutex<VShard>]>,
    messages: Mutex<Messages>,
    /// Tenant → its usage rows by (day, route, country, currency).
    usage: DashMap<String, BTreeMap<UsageKey, UsageRow>>,
    inbox: Mutex<VecDeque<InboxEntry>>,
    rate: DashMap<String, (i64, u32)>,
    counters: Counters,
    /// Namespace → its markers by name; one map entry locks a whole namespace,
    /// which is what makes a claim atomic.
    markers: DashMap<String, BTreeMap<String, Marker>>,
}

type UsageKey = (NaiveDate, u32, String, String);

fn counter_slot(window_seconds: u32, now: DateTime<Utc>) -> i64 {
    now.timestamp().div_euclid(i64::from(window_seconds.max(1)))
}

/// Fixed-window counters, 28 bytes each and no heap allocation per entry: a
/// busy instance holds a few per distinct number for a day (the guard's keys
/// are ~70-byte strings, which as owned map keys cost ~300 bytes a counter).
/// A window's counter is found by a 128-bit fingerprint of (key, window
/// length, slot) instead of the key: SipHash-1-3's 128-bit output under a
/// random per-process key. Two different windows share a fingerprint with
/// probability 2^-128 per pair, so with n live counters the chance that any
/// two merge is below n²/2^129 (under 10^-22 for n = 10^8), and the random
/// key leaves no way to aim for one.
struct Counters {
    key: (u64, u64),
    shards: Box<[Mutex<HashTable<Counter>>]>,
}

#[derive(Clone, Copy)]
struct Counter {
    fingerprint: [u32; 4],
    /// Unix seconds from which the window is no longer read: the end of the
    /// window after it (a sliding window still weighs the previous one in).
    expires: u32,
    /// A u64 in halves, so the entry aligns to 4 bytes (28 bytes, not 32).
    total: [u32; 2],
}

impl Default for Counters {
    fn default() -> Self {
        // std's random per-process hash keys (from the OS), as two words.
        let random = RandomState::new();
        Self {
            key: (random.hash_one(0u8), random.hash_one(1u8)),
            shards: (0..COUNTER_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Counters {
    /// The shard and a zero counter for `key`'s window of `window_seconds`
    /// containing `at`. The table hashes by the fingerprint's first half and the
    /// shard is picked from the second, so each sees independent bits.
    fn locate(
        &self,
        key: &str,
        window_seconds: u32,
        at: DateTime<Utc>,
    ) -> (&Mutex<HashTable<Counter>>, Counter) {
        let slot = counter_slot(window_seconds, at);
        let mut hasher = SipHasher13::new_with_keys(self.key.0, self.key.1);
        (key, window_seconds, slot).hash(&mut hasher);
        let Hash128 { h1: a, h2: b } = hasher.finish128();
        let fingerprint = [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32];
        let end = (slot + 2).saturating_mul(i64::from(window_seconds.max(1)));
        let counter = Counter {
            fingerprint,
            expires: u32::try_from(end.max(0)).unwrap_or(u32::MAX),
            total: [0; 2],
        };
        (&self.shards[b as usize % COUNTER_SHARDS], counter)
    }

    fn read(&self, key: &str, window_seconds: u32, at: DateTime<Utc>) -> u64 {
        let (shard, probe) = self.locate(key, window_seconds, at);
        shard
            .lock()
            .find(probe.hash(), |c| c.fingerprint == probe.fingerprint)
            .map_or(0, Counter::total)
    }

    fn add(&self, key: &str, amount: u64, window_seconds: u32, now: DateTime<Utc>) -> u64 {
        let (shard, probe) = self.locate(key, window_seconds, now);
        let mut table = shard.lock();
        let mut entry = table
            .entry(
                probe.hash(),
                |c| c.fingerprint == probe.fingerprint,
                Counter::hash,
            )
            .or_insert(probe);
        let counter = entry.get_mut();
        let total = counter.total().saturating_add(amount);
        counter.total = [total as u32, (total >> 32) as u32];
        total
    }

    /// Forgets the windows no longer read; shrinks tables that mostly emptied.
    fn purge(&self, now: DateTime<Utc>) {
        let now = u32::try_from(now.timestamp().max(0)).unwrap_or(u32::MAX);
        for shard in self.shards.iter() {
            let mut table = shard.lock();
            table.retain(|c| now < c.expires);
            let live = table.len();
            if live * 4 < table.capacity() {
                table.shrink_to(live * 2, Counter::hash);
            }
        }
    }
}

impl Counter {
    fn hash(&self) -> u64 {
        u64::from(self.fingerprint[0]) | u64::from(self.fingerprint[1]) << 32
    }

    fn total(&self) -> u64 {
        u64::from(self.total[0]) | u64::from(self.total[1]) << 32
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            symbols: Symbols::default(),
            approvals: ApprovalSets::default(),
            keys: DashMap::new(),
            subjects: (0..SHARDS).map(|_| Mutex::default()).collect(),
            verifications: (0..SHARDS).map(|_| Mutex::default()).collect(),
            messages: Mutex::default(),
            usage: DashMap::new(),
            inbox: Mutex::default(),
            rate: DashMap::new(),
            counters: Counters::default(),
            markers: DashMap::new(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn hash<T: Hash + ?Sized>(&self, value: &T) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The shard a hash falls in.
    fn shard_of(hash: u64) -> usize {
        // Bits an `Index` uses for neither its parts nor their tables, so
        // every shard's tables see full entropy.
        (hash >> 32) as usize % SHARDS
    }

    fn verification_shard(&self, id: &[u8; 16]) -> (u64, &Mutex<VShard>) {
        let h = self.hash(id);
        (h, &self.verifications[Self::shard_of(h)])
    }

    /// Whether verification `id` is still pending. A re-send after a failed
    /// delivery moves its expiry, not its subject's last send, so the subject
    /// purge asks this (locking subject, then verification, as a send does).
    fn is_pending(&self, id: Uuid) -> bool {
        let (hash, shard) = self.verification_shard(id.as_bytes());
        let shard = shard.lock();
        shard
            .find(hash, id.as_bytes())
            .is_some_and(|i| shard.slab.get(i).status() == Status::Pending)
    }

    fn subject_shard(&self, key: &[u8; 32]) -> (u64, &Mutex<SShard>) {
        let h = self.hash(key);
        (h, &self.subjects[Self::shard_of(h)])
    }

    /// Adds `delta` to the row with its key, creating it (`record_usage`).
    fn add_usage(&self, delta: &UsageRow) {
        let key = (
            delta.day,
            delta.route_id,
            delta.country.clone().unwrap_or_default(),
            delta.currency.clone().unwrap_or_default(),
        );
        // The tenant's name is copied only for its first row, not per send.
        let mut rows = match self.usage.get_mut(delta.tenant.as_str()) {
            Some(rows) => rows,
            None => self.usage.entry(delta.tenant.clone()).or_default(),
        };
        let row = rows.entry(key).or_insert_with(|| {
            UsageRow::new(
                &delta.tenant,
                delta.day,
                delta.route_id,
                delta.country.as_deref(),
                delta.currency.as_deref(),
            )
        });
        row.sent += delta.sent;
        row.delivered += delta.delivered;
        row.failed += delta.failed;
        row.verifications_started += delta.verifications_started;
        row.verifications_approved += delta.verifications_approved;
        row.cost_micros += delta.cost_micros;
    }

    /// The subject's current verification while it can be checked.
    fn current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> Option<(Uuid, Status)> {
        let now = ms(now);
        self.current_of(tenant, subject, |r| {
            now < r.expires && matches!(r.status(), Status::Pending | Status::MaxAttempts)
        })
    }

    /// `Store::check_counted_code`, in one step: the counts are added before
    /// the approval is answered.
    fn check(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        at: DateTime<Utc>,
    ) -> CheckOutcome {
        let now = ms(at);
        let (vh, vshard) = self.verification_shard(id.as_bytes());
        // The shard stays locked through the budget's read and count, so
        // checks of this verification are one at a time.
        let mut shard = vshard.lock();
        let Some(i) = shard.find(vh, id.as_bytes()) else {
            return CheckOutcome::NotFound;
        };
        if !shard.tenant_is(i, &self.symbols, tenant) {
            return CheckOutcome::NotFound;
        }
        let r = shard.slab.get(i);
        if !r.is_checkable_at(now) {
            return CheckOutcome::NotFound;
        }
        let guesses = budget.map(|b| (b, GuessBudget::counter_key(&SubjectKey(r.subject))));
        if let Some((budget, key)) = &guesses {
            let [previous, current] = GuessBudget::reads(key, at)
                .map(|r| self.counters.read(r.key, r.window_seconds, r.at));
            let counts = WindowCounts { previous, current };
            if !budget.admits(counts, at) {
                return CheckOutcome::GuessesSpent(counts);
            }
        }
        let r = shard.slab.get_mut(i);
        if r.status() == Status::MaxAttempts {
            return CheckOutcome::MaxAttempts;
        }
        let Some(stored) = r.code_hash() else {
            return CheckOutcome::NotFound;
        };
        r.updated = now;
        if Crypto::hashes_match(&stored, code_hash) {
            r.status = status_code(Status::Approved);
            r.clear_code();
            // `NONE` is past every set: no kept set.
            let kept = self.approvals.get(r.approval);
            let v = shard.decode(i, &self.symbols);
            drop(shard);
            self.count_approval(id.as_bytes());
            if let Some(counts) = counts {
                match kept {
                    Some(adds) => self.add_all(&adds, at),
                    None => self.add_all(&counts(&v), at),
                };
            }
            return CheckOutcome::Approved(v);
        }
        r.attempts += 1;
        if r.attempts >= r.max_attempts {
            r.status = status_code(Status::MaxAttempts);
            r.clear_code();
        }
        let attempts_left = r.max_attempts.saturating_sub(r.attempts);
        if let Some((_, key)) = &guesses {
            self.counters.add(key, 1, GuessBudget::WINDOW_SECONDS, at);
        }
        CheckOutcome::Wrong {
            attempts_left,
            masked_to: shard.slab.get(i).masked_to(shard.spill(i)),
        }
    }

    /// `Store::add_counters`.
    fn add_all(&self, adds: &[CounterAdd], now: DateTime<Utc>) -> Vec<u64> {
        let mut totals = Vec::with_capacity(adds.len());
        for a in adds {
            let total = self.counters.add(&a.key, a.amount, a.window_seconds, now);
            totals.push(total);
            if a.stops_batch(total) {
                break;
            }
        }
        totals
    }

    /// Counts an approval of verification `id` (see `UsageRow::approval`).
    fn count_approval(&self, id: &[u8; 16]) {
        let h = self.hash(id);
        let row = {
            let m = self.messages.lock();
            m.attempts_of(h, id)
                .find(|&j| m.was_accepted(j))
                .map(|j| m.approval_row(j, &self.symbols))
        };
        if let Some(row) = row {
            self.add_usage(&row);
        }
    }

    fn pmid_hash(&self, provider: &str, pmid: &[u8]) -> u64 {
        self.hash(&(provider, pmid))
    }

    /// Inserts a verification that is not stored yet, with `approval`'s set.
    fn insert_verification(&self, shard: &mut VShard, hash: u64, v: &Verification, approval: u32) {
        let (mut rec, spill) = VRec::encode(v, &self.symbols);
        rec.approval = approval;
        let i = shard.slab.insert(rec);
        if let Some(s) = spill {
            shard.spills.insert(i, s);
        }
        shard.by_id.insert(hash, i);
    }

    /// The subject's current verification, if it is the tenant's and `keep` says so.
    fn current_of(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        keep: impl Fn(&VRec) -> bool,
    ) -> Option<(Uuid, Status)> {
        let (sh, sshard) = self.subject_shard(&subject.0);
        let current = {
            let s = sshard.lock();
            let i = s.find(sh, &subject.0)?;
            s.slab.get(i).current()?
        };
        let (vh, vshard) = self.verification_shard(current.as_bytes());
        let v = vshard.lock();
        let i = v.find(vh, current.as_bytes())?;
        let r = v.slab.get(i);
        (v.tenant_is(i, &self.symbols, tenant) && keep(r)).then(|| (current, r.status()))
    }

    /// Removes a verification (the purge's forget step). Its delivery attempts
    /// stay until `purge_messages` (the retention period).
    fn forget(&self, shard: &mut VShard, i: u32) {
        let id = shard.slab.get(i).id;
        shard.by_id.remove(self.hash(&id), |j| j == i);
        shard.spills.remove(&i);
        shard.slab.release(i);
    }

    /// Removes one delivery attempt and every index entry that points at it,
    /// except its `by_created` entry, which the caller (retention) has taken.
    fn remove_message(&self, m: &mut Messages, j: u32) {
        let rec = *m.slab.get(j);
        m.by_id.remove(self.hash(&rec.id), |k| k == j);
        // Unlink from its verification's chain.
        let vh = self.hash(&rec.verification_id);
        let slab = &m.slab;
        let head = m
            .by_verification
            .find(vh, |k| slab.get(k).verification_id == rec.verification_id);
        if head == Some(j) {
            m.by_verification.remove(vh, |k| k == j);
            if rec.next != NONE {
                m.by_verification.insert(vh, rec.next);
            }
        } else if let Some(mut k) = head {
            while m.slab.get(k).next != NONE && m.slab.get(k).next != j {
                k = m.slab.get(k).next;
            }
            if m.slab.get(k).next == j {
                m.slab.get_mut(k).next = rec.next;
            }
        }
        let provider = m.decode(j, &self.symbols).provider;
        if let Some(pmid) = m.pmid(j).map(<[u8]>::to_vec) {
            m.by_provider_id
                .remove(self.pmid_hash(&provider, &pmid), |k| k == j);
        }
        m.unfinished.remove(&(rec.provider, rec.created, j));
        m.spills.remove(&j);
        m.slab.release(j);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.keys.insert(key.key_hash, key.clone());
        Ok(())
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(self.keys.get(key_hash).map(|k| k.clone()))
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let mut keys: Vec<_> = self.keys.iter().map(|k| k.clone()).collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        for mut k in self.keys.iter_mut() {
            if k.id == id && k.revoked_at.is_none() {
                k.revoked_at = Some(at);
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn find_current(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Uuid, Status)>> {
        Ok(self.current(tenant, subject, now))
    }

    async fn start_send(&self, plan: &SendPlan, now: DateTime<Utc>) -> StoreResult<SendDecision> {
        let planned = &plan.verification;
        let now_ms = ms(now);
        let approval = self.approvals.intern_set(&plan.approval_counts);
        let (sh, sshard) = self.subject_shard(&planned.subject.0);
        let mut subjects = sshard.lock();
        let si = match subjects.find(sh, &planned.subject.0) {
            Some(i) => i,
            None => {
                let i = subjects.slab.insert(SRec {
                    key: planned.subject.0,
                    flags: LIVE,
                    ..SRec::default()
                });
                subjects.by_key.insert(sh, i);
                i
            }
        };
        let subject = *subjects.slab.get(si);

        if let Some(last) = subject.last_sent() {
            let until = time(last) + Duration::seconds(plan.cooldown_seconds.into());
            if now < until {
                return Ok(SendDecision::Cooldown {
                    retry_after_seconds: seconds_until(now, until),
                });
            }
        }
        let window = Duration::seconds(plan.send_window_seconds.into());
        let (window_start, window_count) = match subject.flags & HAS_WINDOW != 0 {
            true if now < time(subject.window_start) + window => {
                (time(subject.window_start), subject.window_count)
            }
            _ => (now, 0),
        };
        if window_count >= plan.max_sends_per_window {
            return Ok(SendDecision::WindowExhausted {
                retry_after_seconds: seconds_until(now, window_start + window),
            });
        }

        let previous_sent_at = subject.last_sent().map(time);
        // Whether another verification is still pending for this subject. Only
        // one verification shard is locked at a time (two at once could deadlock
        // against a send locking them the other way round); the subject lock,
        // held throughout, keeps the subject's current verification fixed.
        let current = subject.current();
        let other_pending = match current {
            Some(cur) if cur != planned.id => {
                let (ch, cshard) = self.verification_shard(cur.as_bytes());
                let c = cshard.lock();
                c.find(ch, cur.as_bytes()).is_some_and(|i| {
                    c.tenant_is(i, &self.symbols, &planned.tenant)
                        && c.slab.get(i).is_pending_at(now_ms)
                })
            }
            _ => false,
        };
        if other_pending {
            return Ok(SendDecision::Conflict { pending: current });
        }
        let (vh, vshard) = self.verification_shard(planned.id.as_bytes());
        let mut shard = vshard.lock();
        let existing = shard.find(vh, planned.id.as_bytes());
        let decision = if current == Some(planned.id) {
            // A resend: the planned verification must still be pending.
            let Some(i) = existing.filter(|&i| {
                shard.tenant_is(i, &self.symbols, &planned.tenant)
                    && shard.slab.get(i).is_pending_at(now_ms)
            }) else {
                return Ok(SendDecision::Conflict { pending: None });
            };
            let r = shard.slab.get_mut(i);
            match planned.code_hash {
                Some(h) => {
                    r.code_hash = h;
                    r.flags |= HAS_CODE;
                }
                None => r.clear_code(),
            }
            r.expires = ms(planned.expires_at);
            r.send_count += 1;
            r.updated = now_ms;
            r.last_sent = now_ms;
            // A resend goes to the number of this request (a uid's number may
            // change), as it asked: take its phone, mask, country and send
            // options, keeping the rest.
            let mut v = shard.decode(i, &self.symbols);
            v.phone = planned.phone.clone();
            v.masked_to = planned.masked_to.clone();
            v.country = planned.country.clone();
            v.send_options = planned.send_options.clone();
            shard.rewrite(i, &v, &self.symbols, approval);
            SendDecision::Replaced {
                verification: shard.decode(i, &self.symbols),
                previous_sent_at,
            }
        } else if existing.is_some() {
            return Ok(SendDecision::Conflict { pending: None });
        } else {
            self.insert_verification(&mut shard, vh, planned, approval);
            SendDecision::Created {
                verification: planned.clone(),
                previous_sent_at,
            }
        };
        drop(shard);
        let s = subjects.slab.get_mut(si);
        s.current = *planned.id.as_bytes();
        s.last_sent = now_ms;
        s.window_start = ms(window_start);
        s.window_count = window_count + 1;
        s.flags |= HAS_CURRENT | HAS_LAST_SENT | HAS_WINDOW;
        Ok(decision)
    }

    async fn abort_send(&self, abort: &SendAbort) -> StoreResult<()> {
        {
            let (sh, sshard) = self.subject_shard(&abort.subject.0);
            let mut subjects = sshard.lock();
            if let Some(i) = subjects.find(sh, &abort.subject.0) {
                let s = subjects.slab.get_mut(i);
                if s.last_sent() == Some(ms(abort.sent_at)) {
                    s.set_last_sent(abort.previous_sent_at.map(ms));
                }
                s.window_count = s.window_count.saturating_sub(1);
            }
        }
        let (vh, vshard) = self.verification_shard(abort.verification_id.as_bytes());
        let mut shard = vshard.lock();
        if let Some(i) = shard.find(vh, abort.verification_id.as_bytes())
            && shard.tenant_is(i, &self.symbols, &abort.tenant)
            && shard.slab.get(i).last_sent == ms(abort.sent_at)
            && shard.slab.get(i).status() == Status::Pending
        {
            let r = shard.slab.get_mut(i);
            r.status = status_code(Status::Failed);
            r.clear_code();
            r.updated = ms(abort.at);
        }
        Ok(())
    }

    async fn check_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        at: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        Ok(self.check(tenant, id, code_hash, budget, None, at))
    }

    async fn check_counted_code(
        &self,
        tenant: &str,
        id: Uuid,
        code_hash: &[u8; 32],
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        at: DateTime<Utc>,
    ) -> StoreResult<CheckOutcome> {
        Ok(self.check(tenant, id, code_hash, budget, counts, at))
    }

    async fn check_current_code(
        &self,
        tenant: &str,
        subject: &SubjectKey,
        hash_for: &CodeHasher,
        budget: Option<GuessBudget>,
        counts: Option<&ApprovalCounts>,
        at: DateTime<Utc>,
    ) -> StoreResult<CurrentCheck> {
        let id = match CurrentCheck::to_check(self.current(tenant, subject, at)) {
            Ok(id) => id,
            Err(answer) => return Ok(answer),
        };
        let outcome = self.check(tenant, id, &hash_for.for_id(id), budget, counts, at);
        Ok(CurrentCheck::Checked(id, outcome))
    }

    async fn get_verification(&self, tenant: &str, id: Uuid) -> StoreResult<Option<Verification>> {
        let (vh, vshard) = self.verification_shard(id.as_bytes());
        let shard = vshard.lock();
        Ok(shard
            .find(vh, id.as_bytes())
            .filter(|&i| shard.tenant_is(i, &self.symbols, tenant))
            .map(|i| shard.decode(i, &self.symbols)))
    }

    async fn cancel(
        &self,
        tenant: &str,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        let now = ms(now);
        let (vh, vshard) = self.verification_shard(id.as_bytes());
        let mut shard = vshard.lock();
        let Some(i) = shard.find(vh, id.as_bytes()) else {
            return Ok(CancelOutcome::NotFound);
        };
        if !shard.tenant_is(i, &self.symbols, tenant) || !shard.slab.get(i).is_pending_at(now) {
            return Ok(CancelOutcome::NotFound);
        }
        let r = shard.slab.get_mut(i);
        r.status = status_code(Status::Canceled);
        r.clear_code();
        r.updated = now;
        Ok(CancelOutcome::Canceled(shard.decode(i, &self.symbols)))
    }

    async fn insert_message(
        &self,
        message: &MessageRecord,
        usage: Option<&UsageRow>,
    ) -> StoreResult<()> {
        let (rec, spill) = MRec::encode(message, &self.symbols);
        let id_hash = self.hash(&rec.id);
        let v_hash = self.hash(&rec.verification_id);
        let p_hash = message
            .provider_message_id
            .as_deref()
            .map(|p| self.pmid_hash(&message.provider, p.as_bytes()));
        let mut m = self.messages.lock();
        let i = m.slab.insert(rec);
        if let Some(s) = spill {
            m.spills.insert(i, s);
        }
        m.by_id.insert(id_hash, i);
        // Append to the verification's chain, keeping insertion order.
        let last = m.attempts_of(v_hash, &rec.verification_id).last();
        match last {
            Some(last) => m.slab.get_mut(last).next = i,
            None => m.by_verification.insert(v_hash, i),
        }
        if let Some(ph) = p_hash {
            // The newest message wins should a provider ever reuse an id: the
            // older entry is dropped from the index.
            let pmid = message.provider_message_id.as_deref().unwrap_or_default();
            if let Some(older) = m.find_by_provider_id(ph, &self.symbols, &message.provider, pmid) {
                m.by_provider_id.remove(ph, |j| j == older);
            }
            m.by_provider_id.insert(ph, i);
        }
        if is_unfinished(message) {
            m.unfinished.insert((rec.provider, rec.created, i));
        }
        let at = m.by_created.partition_point(|&(t, _)| t <= rec.created);
        m.by_created.insert(at, (rec.created, i));
        drop(m);
        if let Some(usage) = usage {
            self.add_usage(usage);
        }
        Ok(())
    }

    async fn get_message(&self, tenant: &str, id: Uuid) -> StoreResult<Option<MessageRecord>> {
        let h = self.hash(id.as_bytes());
        let m = self.messages.lock();
        Ok(m.by_id
            .find(h, |j| m.slab.get(j).id == *id.as_bytes())
            .filter(|&j| m.tenant_is(j, &self.symbols, tenant))
            .map(|j| m.decode(j, &self.symbols)))
    }

    async fn list_messages(
        &self,
        tenant: &str,
        verification_id: Uuid,
    ) -> StoreResult<Vec<MessageRecord>> {
        let h = self.hash(verification_id.as_bytes());
        let m = self.messages.lock();
        Ok(m.attempts_of(h, verification_id.as_bytes())
            .filter(|&j| m.tenant_is(j, &self.symbols, tenant))
            .map(|j| m.decode(j, &self.symbols))
            .collect())
    }

    async fn update_message_by_provider_id(
        &self,
        provider: &str,
        provider_message_id: &str,
        update: &MessageUpdate,
    ) -> StoreResult<Option<MessageTransition>> {
        let h = self.pmid_hash(provider, provider_message_id.as_bytes());
        let mut guard = self.messages.lock();
        let m = &mut *guard;
        let Some(i) = m.find_by_provider_id(h, &self.symbols, provider, provider_message_id) else {
            return Ok(None);
        };
        let current = m.decode(i, &self.symbols);
        let previous = current.status;
        let Some(next) = advance_message(&current, update) else {
            return Ok(Some(MessageTransition {
                previous,
                message: current,
            }));
        };
        // Same id, provider id and verification, so every index stays valid;
        // only the chain link has to be carried over.
        let old = *m.slab.get(i);
        let (mut rec, spill) = MRec::encode(&next, &self.symbols);
        rec.next = old.next;
        *m.slab.get_mut(i) = rec;
        m.spills.remove(&i);
        if let Some(s) = spill {
            m.spills.insert(i, s);
        }
        if !is_unfinished(&next) {
            m.unfinished.remove(&(old.provider, old.created, i));
        }
        Ok(Some(MessageTransition {
            previous,
            message: next,
        }))
    }

    async fn list_unfinished_messages(
        &self,
        provider: &str,
        created_after: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>> {
        let Some(sym) = self.symbols.find(provider) else {
            return Ok(Vec::new());
        };
        let m = self.messages.lock();
        // No position is `NONE`, so this starts after every entry at `created_after`.
        let after = (sym, ms(created_after), NONE);
        Ok(m.unfinished
            .range(after..)
            .take_while(|(p, _, _)| *p == sym)
            .take(limit as usize)
            .map(|&(_, _, j)| m.decode(j, &self.symbols))
            .collect())
    }

    async fn purge_messages(&self, before: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let before = ms(before);
        let mut guard = self.messages.lock();
        let mut removed = 0u64;
        while removed < u64::from(batch) {
            match guard.by_created.front() {
                Some(&(at, j)) if at < before => {
                    guard.by_created.pop_front();
                    self.remove_message(&mut guard, j);
                    removed += 1;
                }
                _ => break,
            }
        }
        Ok(removed)
    }

    async fn record_usage(&self, delta: &UsageRow) -> StoreResult<()> {
        self.add_usage(delta);
        Ok(())
    }

    async fn usage(
        &self,
        tenant: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<UsageRow>> {
        if from > to {
            return Ok(Vec::new());
        }
        let start = (from, 0, String::new(), String::new());
        Ok(self
            .usage
            .get(tenant)
            .map(|rows| {
                rows.range(start..)
                    .take_while(|((day, ..), _)| *day <= to)
                    .map(|(_, row)| row.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn replace_code(
        &self,
        r: &CodeReplacement,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Verification>> {
        let now_ms = ms(now);
        let (vh, vshard) = self.verification_shard(r.verification_id.as_bytes());
        let mut shard = vshard.lock();
        let Some(i) = shard.find(vh, r.verification_id.as_bytes()) else {
            return Ok(None);
        };
        let rec = shard.slab.get(i);
        if !shard.tenant_is(i, &self.symbols, &r.tenant)
            || !rec.is_pending_at(now_ms)
            || rec.send_count != r.expected_send_count
        {
            return Ok(None);
        }
        let rec = shard.slab.get_mut(i);
        rec.code_hash = r.code_hash;
        rec.flags |= HAS_CODE;
        rec.expires = ms(r.expires_at);
        rec.send_count += 1;
        rec.last_sent = now_ms;
        rec.updated = now_ms;
        Ok(Some(shard.decode(i, &self.symbols)))
    }

    async fn push_inbox(&self, entry: &InboxEntry) -> StoreResult<()> {
        let mut inbox = self.inbox.lock();
        if inbox.len() == INBOX_CAPACITY {
            inbox.pop_front();
        }
        inbox.push_back(entry.clone());
        Ok(())
    }

    async fn list_inbox(
        &self,
        tenant: &str,
        phone_index: Option<&[u8; 32]>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        let inbox = self.inbox.lock();
        Ok(inbox
            .iter()
            .rev()
            .filter(|e| e.tenant == tenant && e.expires_at > now)
            .filter(|e| phone_index.is_none_or(|p| &e.phone_index == p))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn hit_rate_limit(
        &self,
        key: &str,
        limit: u32,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<RateDecision> {
        let window = i64::from(window_seconds.max(1));
        let slot = now.timestamp().div_euclid(window);
        let mut entry = self.rate.entry(key.to_owned()).or_insert((slot, 0));
        if entry.0 != slot {
            *entry = (slot, 0);
        }
        if entry.1 >= limit {
            let reset = DateTime::<Utc>::from_timestamp((slot + 1) * window, 0).unwrap_or(now);
            return Ok(RateDecision::Limited {
                retry_after_seconds: seconds_until(now, reset),
            });
        }
        entry.1 += 1;
        Ok(RateDecision::Allowed {
            remaining: limit - entry.1,
        })
    }

    async fn add_to_counter(
        &self,
        key: &str,
        amount: u64,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        Ok(self.counters.add(key, amount, window_seconds, now))
    }

    async fn read_counter(
        &self,
        key: &str,
        window_seconds: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        Ok(self.counters.read(key, window_seconds, now))
    }

    async fn read_counters(&self, reads: &[CounterRead<'_>]) -> StoreResult<Vec<u64>> {
        Ok(reads
            .iter()
            .map(|r| self.counters.read(r.key, r.window_seconds, r.at))
            .collect())
    }

    async fn add_counters(&self, adds: &[CounterAdd], now: DateTime<Utc>) -> StoreResult<Vec<u64>> {
        Ok(self.add_all(adds, now))
    }

    async fn set_marker(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.markers
            .entry(namespace.to_owned())
            .or_default()
            .insert(
                name.to_owned(),
                Marker {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    expires_at,
                },
            );
        Ok(())
    }

    async fn get_marker(
        &self,
        namespace: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Marker>> {
        Ok(self
            .markers
            .get(namespace)
            .and_then(|ns| ns.get(name).filter(|m| now < m.expires_at).cloned()))
    }

    async fn list_markers(&self, namespace: &str, now: DateTime<Utc>) -> StoreResult<Vec<Marker>> {
        Ok(self
            .markers
            .get(namespace)
            .map(|ns| {
                ns.values()
                    .filter(|m| now < m.expires_at)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn delete_marker(&self, namespace: &str, name: &str) -> StoreResult<bool> {
        Ok(self
            .markers
            .get_mut(namespace)
            .is_some_and(|mut ns| ns.remove(name).is_some()))
    }

    async fn claim_marker(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut ns = self.markers.entry(namespace.to_owned()).or_default();
        if let Some(m) = ns.get(name)
            && now < m.expires_at
            && m.value != holder
        {
            return Ok(false);
        }
        ns.insert(
            name.to_owned(),
            Marker {
                name: name.to_owned(),
                value: holder.to_owned(),
                expires_at,
            },
        );
        Ok(true)
    }

    async fn list_sealed_with_other_key(
        &self,
        current_key: u32,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<SealedRecord>> {
        let mut found = Vec::new();
        for vshard in self.verifications.iter() {
            let shard = vshard.lock();
            for i in shard.slab.positions() {
                let r = shard.slab.get(i);
                if r.flags & LIVE == 0 || r.status() != Status::Pending {
                    continue;
                }
                let id = Uuid::from_bytes(r.id);
                if after.is_some_and(|a| id <= a) {
                    continue;
                }
                let v = shard.decode(i, &self.symbols);
                if v.phone.key_id != current_key {
                    found.push(SealedRecord {
                        tenant: v.tenant,
                        id,
                        phone: v.phone,
                    });
                }
            }
        }
        found.sort_by_key(|r| r.id);
        found.truncate(limit as usize);
        Ok(found)
    }

    async fn reseal_phone(
        &self,
        id: Uuid,
        old: &SealedPhone,
        new: &SealedPhone,
    ) -> StoreResult<bool> {
        let (vh, vshard) = self.verification_shard(id.as_bytes());
        let mut shard = vshard.lock();
        let Some(i) = shard.find(vh, id.as_bytes()) else {
            return Ok(false);
        };
        let mut v = shard.decode(i, &self.symbols);
        if &v.phone != old {
            return Ok(false);
        }
        v.phone = new.clone();
        let approval = shard.slab.get(i).approval;
        shard.rewrite(i, &v, &self.symbols, approval);
        Ok(true)
    }

    async fn purge_expired(&self, now: DateTime<Utc>, batch: u32) -> StoreResult<u64> {
        let now_ms = ms(now);
        let forget_before = ms(now - KEEP_ENDED);
        let budget = u64::from(batch);
        let mut touched = 0u64;
        // One shard at a time, so a purge never holds more than one lock.
        'shards: for vshard in self.verifications.iter() {
            let mut shard = vshard.lock();
            for i in shard.slab.positions() {
                if touched >= budget {
                    break 'shards;
                }
                let r = shard.slab.get_mut(i);
                if r.flags & LIVE == 0 {
                    continue;
                }
                if r.status() == Status::Pending && now_ms >= r.expires {
                    r.status = status_code(Status::Expired);
                    r.clear_code();
                    r.updated = now_ms;
                    touched += 1;
                } else if r.status() != Status::Pending && r.updated < forget_before {
                    self.forget(&mut shard, i);
                    touched += 1;
                }
            }
        }
        let keep_after = ms(now - KEEP_ENDED);
        for sshard in self.subjects.iter() {
            let mut s = sshard.lock();
            let stale: Vec<u32> = s
                .slab
                .positions()
                .filter(|&i| {
                    let r = s.slab.get(i);
                    r.flags & LIVE != 0
                        && r.last_sent().is_none_or(|t| t <= keep_after)
                        && !r.current().is_some_and(|id| self.is_pending(id))
                })
                .collect();
            for i in stale {
                let key = s.slab.get(i).key;
                s.by_key.remove(self.hash(&key), |j| j == i);
                s.slab.release(i);
            }
        }
        self.inbox.lock().retain(|e| e.expires_at > now);
        self.counters.purge(now);
        self.markers.retain(|_, ns| {
            ns.retain(|_, m| now < m.expires_at);
            !ns.is_empty()
        });
        Ok(touched)
    }

    async fn count_pending(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let now = ms(now);
        let mut n = 0u64;
        for vshard in self.verifications.iter() {
            let shard = vshard.lock();
            n += shard
                .slab
                .positions()
                .filter(|&i| {
                    let r = shard.slab.get(i);
                    r.flags & LIVE != 0 && r.is_pending_at(now)
                })
                .count() as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_small() {
        assert_eq!(std::mem::size_of::<VRec>(), 216);
        assert_eq!(std::mem::size_of::<SRec>(), 72);
        assert_eq!(std::mem::size_of::<MRec>(), 160);
        assert_eq!(std::mem::size_of::<Counter>(), 28);
    }

    /// Through growth from empty to 200k entries, every position is found
    /// under its key's hash and removed alone, including positions whose
    /// keys share the kept half of their hash (told apart by `is`).
    #[test]
    fn an_index_finds_each_entry_through_growth() {
        let hasher = RandomState::new();
        let key_of = |at: u32| hasher.hash_one(at);
        let mut index = Index::default();
        for at in 0..200_000 {
            index.insert(key_of(at), at);
        }
        // Three positions filed under one hash, as keys whose hashes agree in
        // the kept half would be.
        let shared = key_of(7);
        for at in [300_000, 300_001, 300_002] {
            index.insert(shared, at);
        }
        for at in (0..200_000).step_by(2) {
            index.remove(key_of(at), |j| j == at);
        }
        index.remove(shared, |j| j == 300_001);
        for at in 0..200_000 {
            let found = index.find(key_of(at), |j| j == at);
            assert_eq!(found, (at % 2 == 1).then_some(at), "position {at}");
        }
        assert_eq!(index.find(shared, |j| j == 300_000), Some(300_000));
        assert_eq!(index.find(shared, |j| j == 300_001), None);
        assert_eq!(index.find(shared, |j| j == 300_002), Some(300_002));
        let filed: Vec<usize> = index.0.iter().map(HashTable::len).collect();
        assert_eq!(filed.iter().sum::<usize>(), 100_000 + 2);
        assert!(
            filed.iter().all(|&n| n > 5_000),
            "spread over the parts: {filed:?}"
        );
    }

    fn random_subject() -> SubjectKey {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        SubjectKey(k)
    }

    fn verification(tenant: &str, now: DateTime<Utc>) -> Verification {
        Verification {
            id: Uuid::new_v4(),
            tenant: tenant.into(),
            subject: random_subject(),
            purpose: "login".into(),
            uid: None,
            phone: SealedPhone {
                key_id: 1,
                blob: vec![9; 52],
            },
            masked_to: "+*******0670".into(),
            country: Some("NL".into()),
            code_hash: Some([1; 32]),
            status: Status::Pending,
            attempts: 0,
            max_attempts: 5,
            send_count: 1,
            created_at: now,
            updated_at: now,
            expires_at: now + Duration::seconds(300),
            last_sent_at: now,
            send_options: None,
        }
    }

    fn plan(v: Verification) -> SendPlan {
        SendPlan {
            verification: v,
            cooldown_seconds: 30,
            max_sends_per_window: 5,
            send_window_seconds: 600,
            approval_counts: Vec::new(),
            subject_code_hash: None,
        }
    }

    fn message(v: &Verification, pmid: Option<&str>) -> MessageRecord {
        MessageRecord {
            id: Uuid::new_v4(),
            verification_id: v.id,
            tenant: v.tenant.clone(),
            route_id: 1,
            provider: "bridgexapi".into(),
            provider_message_id: pmid.map(str::to_owned),
            masked_to: v.masked_to.clone(),
            country: v.country.clone(),
            status: DeliveryStatus::Queued,
            error: None,
            cost: Some(0.05),
            currency: None,
            latency_ms: 3,
            resend_of: None,
            created_at: v.created_at,
            sent_at: None,
            delivered_at: None,
            failed_at: None,
            updated_at: v.created_at,
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_900_000_000_123).unwrap()
    }

    /// An approval adds the counts its send planned, kept as a shared set,
    /// without working them out from the record; once the sets are full, a
    /// record keeps none and its check works them out.
    #[tokio::test]
    async fn an_approval_adds_its_kept_set_and_works_out_the_rest() {
        let store = MemoryStore::new();
        let now = t0();
        let add = |key: &str| CounterAdd {
            key: key.into(),
            amount: 1,
            window_seconds: 3600,
            ceiling: None,
        };
        let worked_out = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let calls = worked_out.clone();
        let counts: ApprovalCounts = Arc::new(move |_: &Verification| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            vec![CounterAdd {
                key: "ok:worked-out".into(),
                amount: 1,
                window_seconds: 3600,
                ceiling: None,
            }]
        });
        let approve = async |planned: Vec<CounterAdd>| {
            let v = verification("acme", now);
            let mut p = plan(v.clone());
            p.approval_counts = planned;
            store.start_send(&p, now).await.unwrap();
            let outcome = store
                .check_counted_code("acme", v.id, &[1; 32], None, Some(&counts), now)
                .await
                .unwrap();
            assert!(matches!(outcome, CheckOutcome::Approved(_)), "{outcome:?}");
        };
        // Two numbers sharing their prefixes share one set.
        approve(vec![add("ok:kept")]).await;
        approve(vec![add("ok:kept")]).await;
        assert_eq!(store.approvals.table.read().values.len(), 1);
        assert_eq!(store.counters.read("ok:kept", 3600, now), 2);
        assert_eq!(worked_out.load(std::sync::atomic::Ordering::Relaxed), 0);
        // No planned counts: worked out at the check.
        approve(Vec::new()).await;
        assert_eq!(store.counters.read("ok:worked-out", 3600, now), 1);
        // A full table keeps no new set.
        for n in 1..MAX_APPROVAL_SETS {
            assert_ne!(store.approvals.intern_set(&[add(&format!("ok:{n}"))]), NONE);
        }
        approve(vec![add("ok:one-too-many")]).await;
        assert_eq!(store.counters.read("ok:one-too-many", 3600, now), 0);
        assert_eq!(store.counters.read("ok:worked-out", 3600, now), 2);
        assert_eq!(worked_out.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn fields_outside_the_compact_shapes_round_trip() {
        let store = MemoryStore::new();
        let mut v = verification("t", t0());
        v.uid = Some("user-42".into());
        v.masked_to = "hidden".into();
        v.country = Some("Atlantis".into());
        v.purpose = "p".repeat(50);
        v.phone.blob = vec![3; 90];
        v.code_hash = None;
        store.start_send(&plan(v.clone()), t0()).await.unwrap();
        assert_eq!(
            store.get_verification("t", v.id).await.unwrap(),
            Some(v.clone())
        );

        let long = "X".repeat(PMID_INLINE + 10);
        let mut m = message(&v, Some(&long));
        m.resend_of = Some(Uuid::new_v4());
        m.sent_at = Some(t0() + Duration::seconds(1));
        m.error = Some("rejected: blacklist".into());
        m.currency = Some("EUR".into());
        m.masked_to = "odd".into();
        m.country = None;
        store.insert_message(&m, None).await.unwrap();
        assert_eq!(store.get_message("t", m.id).await.unwrap(), Some(m.clone()));
        let update = MessageUpdate {
            status: DeliveryStatus::Delivered,
            error: None,
            cost: Some(0.07),
            currency: Some("USD".into()),
            at: t0() + Duration::seconds(2),
        };
        let updated = store
            .update_message_by_provider_id("bridgexapi", &long, &update)
            .await
            .unwrap()
            .unwrap()
            .message;
        assert_eq!(updated.delivered_at, Some(t0() + Duration::seconds(2)));
        assert_eq!(updated.status, DeliveryStatus::Delivered);
        assert_eq!(updated.error.as_deref(), Some("rejected: blacklist"));
        assert_eq!(updated.currency.as_deref(), Some("USD"));
        assert_eq!(updated.cost, Some(0.07));
    }

    #[tokio::test]
    async fn purge_forgets_ended_verifications_then_retention_their_messages() {
        let store = MemoryStore::new();
        let now = t0();
        let v = verification("t", now);
        store.start_send(&plan(v.clone()), now).await.unwrap();
        let a = message(&v, Some("BX-1-a"));
        let b = message(&v, Some("BX-1-b"));
        store.insert_message(&a, None).await.unwrap();
        store.insert_message(&b, None).await.unwrap();
        assert_eq!(
            store.list_messages("t", v.id).await.unwrap(),
            vec![a.clone(), b.clone()]
        );
        store.cancel("t", v.id, now).await.unwrap();

        let later = now + KEEP_ENDED + Duration::seconds(1);
        assert!(store.purge_expired(later, 100).await.unwrap() >= 1);
        assert_eq!(store.get_verification("t", v.id).await.unwrap(), None);
        // Delivery attempts have their own retention.
        assert_eq!(store.get_message("t", a.id).await.unwrap(), Some(a.clone()));
        assert_eq!(store.purge_messages(later, 100).await.unwrap(), 2);
        assert_eq!(store.get_message("t", a.id).await.unwrap(), None);
        assert_eq!(store.list_messages("t", v.id).await.unwrap(), vec![]);
        let update = MessageUpdate {
            status: DeliveryStatus::Delivered,
            error: None,
            cost: None,
            currency: None,
            at: later,
        };
        assert_eq!(
            store
                .update_message_by_provider_id("bridgexapi", "BX-1-b", &update)
                .await
                .unwrap(),
            None
        );
        // The subject's state went with it: a new send is not in cooldown.
        let again = Verification {
            id: Uuid::new_v4(),
            ..verification("t", later)
        };
        let again = Verification {
            subject: v.subject,
            ..again
        };
        let d = store.start_send(&plan(again.clone()), later).await.unwrap();
        assert!(matches!(d, SendDecision::Created { .. }), "{d:?}");
        assert_eq!(store.count_pending(later).await.unwrap(), 1);
        assert_eq!(
            store.get_verification("t", again.id).await.unwrap(),
            Some(again)
        );
    }

    #[tokio::test]
    async fn a_reused_provider_id_points_at_the_newest_message() {
        let store = MemoryStore::new();
        let v = verification("t", t0());
        store.start_send(&plan(v.clone()), t0()).await.unwrap();
        let old = message(&v, Some("BX-dup"));
        let new = message(&v, Some("BX-dup"));
        store.insert_message(&old, None).await.unwrap();
        store.insert_message(&new, None).await.unwrap();
        let update = MessageUpdate {
            status: DeliveryStatus::Sent,
            error: None,
            cost: None,
            currency: None,
            at: t0(),
        };
        let got = store
            .update_message_by_provider_id("bridgexapi", "BX-dup", &update)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message.id, new.id);
        assert_eq!(got.previous, DeliveryStatus::Queued);
    }

    #[tokio::test]
    async fn retention_unlinks_any_attempt_and_unfinished_lists_only_open_ones() {
        let store = MemoryStore::new();
        let v = verification("t", t0());
        store.start_send(&plan(v.clone()), t0()).await.unwrap();
        let at = |s: i64| t0() + Duration::seconds(s);
        let mut a = message(&v, Some("BX-a"));
        a.created_at = at(3);
        let mut b = message(&v, Some("BX-b"));
        b.created_at = at(1);
        let mut c = message(&v, None);
        c.created_at = at(5);
        for m in [&a, &b, &c] {
            store.insert_message(m, None).await.unwrap();
        }
        // `b` is the oldest but sits in the middle of the chain.
        assert_eq!(store.purge_messages(at(2), 10).await.unwrap(), 1);
        assert_eq!(
            store.list_messages("t", v.id).await.unwrap(),
            vec![a.clone(), c.clone()]
        );
        let open = store
            .list_unfinished_messages("bridgexapi", t0(), 10)
            .await
            .unwrap();
        assert_eq!(open, vec![a.clone()], "c has no provider id, b is gone");
        let done = MessageUpdate {
            status: DeliveryStatus::Delivered,
            error: None,
            cost: None,
            currency: None,
            at: at(9),
        };
        store
            .update_message_by_provider_id("bridgexapi", "BX-a", &done)
            .await
            .unwrap();
        assert!(
            store
                .list_unfinished_messages("bridgexapi", t0(), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.purge_messages(at(10), 10).await.unwrap(), 2);
        assert!(store.list_messages("t", v.id).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn many_verifications_stay_findable_across_table_growth() {
        let store = MemoryStore::new();
        let now = t0();
        let mut ids = Vec::new();
        for _ in 0..5_000 {
            let v = verification("t", now);
            ids.push(v.id);
            store.start_send(&plan(v), now).await.unwrap();
        }
        assert_eq!(store.count_pending(now).await.unwrap(), 5_000);
        for id in ids.iter().step_by(97) {
            assert!(store.get_verification("t", *id).await.unwrap().is_some());
            assert_eq!(store.get_verification("other", *id).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn a_reused_position_lists_as_its_new_message() {
        let store = MemoryStore::new();
        let v = verification("t", t0());
        let at = |s: i64| t0() + Duration::seconds(s);
        let mut old = message(&v, Some("BX-old"));
        old.created_at = at(1);
        store.insert_message(&old, None).await.unwrap();
        assert_eq!(store.purge_messages(at(2), 10).await.unwrap(), 1);
        let mut new = message(&v, Some("BX-new"));
        new.created_at = at(3);
        new.resend_of = Some(old.id);
        store.insert_message(&new, None).await.unwrap();
        let open = store
            .list_unfinished_messages("bridgexapi", t0(), 10)
            .await
            .unwrap();
        assert_eq!(open, vec![new.clone()]);
        assert_eq!(
            store
                .list_unfinished_messages("bridgexapi", at(3), 10)
                .await
                .unwrap(),
            vec![],
            "created after, not at"
        );
        assert_eq!(store.get_message("t", new.id).await.unwrap(), Some(new));
    }

    #[tokio::test]
    async fn counter_batches_match_single_calls_and_stop_over_a_ceiling() {
        let store = MemoryStore::new();
        let now = t0();
        let add = |key: &str, window_seconds, ceiling| CounterAdd {
            key: key.into(),
            amount: 2,
            window_seconds,
            ceiling,
        };
        let adds = [
            add("a", 600, Some(10)),
            add("a", 86_400, Some(1)),
            add("b", 600, None),
        ];
        assert_eq!(
            store.add_counters(&adds, now).await.unwrap(),
            vec![2, 2],
            "the second add went over its ceiling: made, then the batch stops"
        );
        let read = |key: &'static str, window_seconds, at| CounterRead {
            key,
            window_seconds,
            at,
        };
        let reads = [
            read("a", 600, now),
            read("a", 86_400, now),
            read("b", 600, now),
            read("a", 600, now - Duration::seconds(600)),
        ];
        assert_eq!(store.read_counters(&reads).await.unwrap(), vec![2, 2, 0, 0]);
        assert_eq!(store.read_counter("a", 86_400, now).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn purge_forgets_a_window_once_the_next_one_ends() {
        let store = MemoryStore::new();
        // Aligned to a 600 s window boundary.
        let start = DateTime::from_timestamp(1_900_000_200, 0).unwrap();
        store.add_to_counter("k", 1, 600, start).await.unwrap();
        let last_read = start + Duration::seconds(1_199);
        store.purge_expired(last_read, 10).await.unwrap();
        assert_eq!(store.read_counter("k", 600, start).await.unwrap(), 1);
        store
            .purge_expired(last_read + Duration::seconds(1), 10)
            .await
            .unwrap();
        assert_eq!(store.read_counter("k", 600, start).await.unwrap(), 0);
    }

    #[test]
    fn masks_round_trip_or_spill() {
        assert_eq!(compact_mask("+*******0670"), Some((7, *b"0670")));
        assert_eq!(expand_mask(7, *b"0670"), "+*******0670");
        assert_eq!(compact_mask("0670"), None);
        assert_eq!(compact_mask("+**06701"), None);
    }
}
