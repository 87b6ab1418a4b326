//! SMS delivery behind one trait: one file per provider, plus the router that
//! walks a route chain with failover.

pub mod africastalking;
pub mod breaker;
pub mod bridgexapi;
pub mod config;
pub mod console;
mod http;
pub mod router;
pub mod sandbox;
pub mod twilio;
pub mod webhook;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::{DeliveryStatus, PhoneNumber};

pub use africastalking::AfricasTalkingProvider;
pub use breaker::{BreakerState, CircuitBreakers};
pub use bridgexapi::BridgexProvider;
pub use config::{BreakerSettings, RouteSettings, RoutingSettings, build_routes};
pub use console::ConsoleProvider;
pub use http::http_client;
pub(crate) use http::safe_snippet;
pub use router::{DeliveryAttempt, DeliveryRequest, Route, RoutingError, SmsRouter};
pub use sandbox::SandboxProvider;
pub use twilio::TwilioProvider;
pub use webhook::WebhookProvider;

/// One message to send. `body` contains the code: providers must never log it,
/// nor `to` unmasked.
pub struct OutgoingSms<'a> {
    pub tenant: &'a str,
    pub verification_id: Uuid,
    /// otpd's route id (what callers pass as `route_id`).
    pub route_id: u32,
    pub to: &'a PhoneNumber,
    pub body: &'a str,
    /// How long the code is valid; the sandbox inbox keeps the message that long.
    pub ttl: Duration,
}

/// What a provider said when it took a message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SendReceipt {
    pub provider_message_id: Option<String>,
    /// Provider-side grouping id (BridgeXAPI `order_id`).
    pub order_id: Option<String>,
    pub status: Option<DeliveryStatus>,
    pub cost: Option<f64>,
    pub currency: Option<String>,
}

/// Why a send failed, in the terms the router acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// No answer: none in time, or the connection was lost after the request
    /// went out. The provider may have accepted the message.
    Timeout,
    /// Connection refused, DNS, TLS, 5xx: the provider is down.
    Unavailable,
    /// 429 or an equivalent throttle.
    RateLimited,
    /// The account cannot pay for the message.
    InsufficientBalance,
    /// Our credentials, sender id or route authorisation were refused: every
    /// message on this route fails until its configuration changes.
    Auth,
    /// A 2xx answer that is not the documented format.
    Malformed,
    /// The provider refused this one message (blacklist, do-not-disturb, risk hold,
    /// no path to this destination); the route itself is healthy.
    Rejected,
    /// The destination itself is invalid: no other route will do better.
    InvalidNumber,
}

impl ProviderErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderErrorKind::Timeout => "timeout",
            ProviderErrorKind::Unavailable => "unavailable",
            ProviderErrorKind::RateLimited => "rate_limited",
            ProviderErrorKind::InsufficientBalance => "insufficient_balance",
            ProviderErrorKind::Auth => "auth",
            ProviderErrorKind::Malformed => "malformed",
            ProviderErrorKind::Rejected => "rejected",
            ProviderErrorKind::InvalidNumber => "invalid_number",
        }
    }

    /// Whether trying the next route can help.
    pub fn try_next_route(self) -> bool {
        !matches!(self, ProviderErrorKind::InvalidNumber)
    }

    /// Whether the provider may have taken the message despite the error: no answer
    /// in time, or a success status whose body we could not read. Such an attempt is
    /// recorded as `DeliveryStatus::Unknown`, and failing over risks a duplicate SMS.
    pub fn outcome_unknown(self) -> bool {
        matches!(
            self,
            ProviderErrorKind::Timeout | ProviderErrorKind::Malformed
        )
    }

    /// Whether this failure says the route itself is unhealthy (feeds the breaker).
    pub fn counts_against_route(self) -> bool {
        matches!(
            self,
            ProviderErrorKind::Timeout
                | ProviderErrorKind::Unavailable
                | ProviderErrorKind::RateLimited
                | ProviderErrorKind::InsufficientBalance
                | ProviderErrorKind::Auth
                | ProviderErrorKind::Malformed
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    /// Short and safe to show an operator: no body, no number, no internal host.
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(kind: ProviderErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }
}

#[async_trait]
pub trait SmsProvider: Send + Sync + 'static {
    /// Provider name as shown in APIs and metrics: `sandbox`, `bridgexapi`, …
    fn name(&self) -> &'static str;

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError>;
}
