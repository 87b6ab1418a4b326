//! A message: one delivery attempt of a verification's code over one route.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Queued,
    Sent,
    Delivered,
    Failed,
    Undelivered,
    /// The provider may or may not have accepted it (e.g. a timeout after sending).
    Unknown,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Undelivered => "undelivered",
            DeliveryStatus::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => DeliveryStatus::Queued,
            "sent" => DeliveryStatus::Sent,
            "delivered" => DeliveryStatus::Delivered,
            "failed" => DeliveryStatus::Failed,
            "undelivered" => DeliveryStatus::Undelivered,
            "unknown" => DeliveryStatus::Unknown,
            _ => return None,
        })
    }

    /// Position in the only direction status may move; a late report of an
    /// earlier stage never overwrites a later one.
    pub fn rank(self) -> u8 {
        match self {
            DeliveryStatus::Unknown => 0,
            DeliveryStatus::Queued => 1,
            DeliveryStatus::Sent => 2,
            DeliveryStatus::Delivered | DeliveryStatus::Failed | DeliveryStatus::Undelivered => 3,
        }
    }

    pub fn is_final(self) -> bool {
        self.rank() == 3
    }

    /// Whether the provider took the message (so the code may reach the phone).
    pub fn accepted(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Queued | DeliveryStatus::Sent | DeliveryStatus::Delivered
        )
    }

    /// Whether this is a final "did not arrive" (failed or undelivered).
    pub fn is_failure(self) -> bool {
        matches!(self, DeliveryStatus::Failed | DeliveryStatus::Undelivered)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub id: Uuid,
    pub verification_id: Uuid,
    pub tenant: String,
    pub route_id: u32,
    pub provider: String,
    pub provider_message_id: Option<String>,
    pub masked_to: String,
    pub country: Option<String>,
    pub status: DeliveryStatus,
    /// Machine-readable error kind, then a short human reason; never a provider's raw body.
    pub error: Option<String>,
    pub cost: Option<f64>,
    pub currency: Option<String>,
    pub latency_ms: u32,
    /// The message whose failed delivery this one re-sends the verification for.
    pub resend_of: Option<Uuid>,
    /// When it was queued; then when it reached each later status. `sent_at` stays
    /// empty when a provider reports delivery without reporting sending first.
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it failed or was reported undelivered.
    pub failed_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl MessageRecord {
    /// Whether a provider took this message. Refusals at send time never carry a
    /// provider message id, and delivery reports (the only way a status changes
    /// later) need one, so an accepted message keeps counting as such after a
    /// report says it failed.
    pub fn was_accepted(&self) -> bool {
        self.status.accepted() || self.provider_message_id.is_some()
    }

    /// Sets `status` and stamps the time it was reached (`created_at` covers queued).
    pub fn mark(&mut self, status: DeliveryStatus, at: DateTime<Utc>) {
        self.status = status;
        match status {
            DeliveryStatus::Sent => self.sent_at = Some(at),
            DeliveryStatus::Delivered => self.delivered_at = Some(at),
            DeliveryStatus::Failed | DeliveryStatus::Undelivered => self.failed_at = Some(at),
            DeliveryStatus::Queued | DeliveryStatus::Unknown => {}
        }
    }
}
