//! A verification: one subject's pending code and its lifecycle.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::SealedPhone;

/// Who a code belongs to within a tenant: a keyed hash of `uid`, or of
/// (`to`, `purpose`). Keyed so the store never holds a phone number in clear.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectKey(pub [u8; 32]);

impl fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubjectKey({})", hex::encode(&self.0[..6]))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Expired,
    Canceled,
    MaxAttempts,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
            Status::MaxAttempts => "max_attempts",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            "expired" => Status::Expired,
            "canceled" => Status::Canceled,
            "max_attempts" => Status::MaxAttempts,
            "failed" => Status::Failed,
            _ => return None,
        })
    }
}

/// The API a send came through: its policy is the one a re-send follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// `/v1`: the tenant's policy.
    #[default]
    Native,
    /// `/send-otp`: `dialects.bridgex.policy`.
    Bridgex,
    /// The Openlyne-style API: `dialects.openlyne.policy`.
    Openlyne,
}

/// How the latest send was asked for, kept with its verification so that a
/// re-send after a failed delivery repeats it: the same API's policy, code
/// length and template locale, and only the routes it allowed (a route pinned
/// without failover is the only one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOptions {
    #[serde(default)]
    pub dialect: Dialect,
    pub code_length: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_id: Option<u32>,
    pub failover: bool,
}

/// BCP 47's longest practical tag (RFC 5646 §4.4.1).
pub const MAX_LOCALE_LEN: usize = 35;

/// A locale as a send may ask for one (`fr`, `pt-BR`, `zh_Hant`): it is kept
/// with the verification, so it is held to the shape of a language tag.
pub fn is_locale_tag(locale: &str) -> bool {
    (1..=MAX_LOCALE_LEN).contains(&locale.len())
        && locale
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SendOptions {
    /// As stores keep it: one short JSON text.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for text that is not such an object (never written so): the
    /// re-send then falls back to the tenant's policy and any route.
    pub fn from_text(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub id: Uuid,
    pub tenant: String,
    pub subject: SubjectKey,
    pub purpose: String,
    pub uid: Option<String>,
    /// The E.164 number, encrypted; only the seed dialects ever read it back.
    pub phone: SealedPhone,
    pub masked_to: String,
    pub country: Option<String>,
    /// HMAC of (id ‖ code); `None` once the verification has ended.
    pub code_hash: Option<[u8; 32]>,
    pub status: Status,
    pub attempts: u32,
    pub max_attempts: u32,
    pub send_count: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub last_sent_at: DateTime<Utc>,
    /// The latest send's options; `None` on records written before otpd kept them.
    pub send_options: Option<SendOptions>,
}

impl Verification {
    /// The status a caller sees: a pending verification past its TTL is expired
    /// even before the purge task has touched it.
    pub fn status_at(&self, now: DateTime<Utc>) -> Status {
        if self.status == Status::Pending && now >= self.expires_at {
            Status::Expired
        } else {
            self.status
        }
    }

    pub fn is_pending_at(&self, now: DateTime<Utc>) -> bool {
        self.status_at(now) == Status::Pending
    }

    /// What a check addresses: pending, or dead from spent attempts (so the
    /// answer is `max_attempts` rather than "not found"), and unexpired.
    pub fn is_checkable_at(&self, now: DateTime<Utc>) -> bool {
        matches!(self.status, Status::Pending | Status::MaxAttempts) && now < self.expires_at
    }

    pub fn attempts_left(&self) -> u32 {
        self.max_attempts.saturating_sub(self.attempts)
    }
}
