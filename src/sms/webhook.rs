//! A user's own SMS gateway: otpd POSTs JSON `{to, message, verification_id,
//! route_id}` to a configured URL, signed with `X-Otpd-Signature:
//! sha256=<hex HMAC-SHA256 of the exact body>`.
//!
//! The gateway answers 2xx with an empty body or a JSON object (optional `id`
//! and `status`: queued, sent, delivered; failed or undelivered there is a
//! refusal, and any other word reads as queued). On failure it may answer JSON
//! `{"error": "<kind>"}` with a kind such as `invalid_number` (stop: no other
//! route will do better), `rejected`, `rate_limited`, `insufficient_balance`,
//! `auth` or `unavailable`; otherwise the HTTP status decides.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

use super::config::WebhookSettings;
use super::http::{self, HttpAnswer, execute, status_error};
use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::domain::DeliveryStatus;

const NAME: &str = "webhook";
pub const SIGNATURE_HEADER: &str = "X-Otpd-Signature";

pub struct WebhookProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: SecretString,
    timeout: Duration,
}

impl WebhookProvider {
    pub fn new(
        settings: &WebhookSettings,
        client: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let secret = settings
            .secret
            .clone()
            .ok_or_else(|| "secret: required".to_owned())?;
        Ok(Self {
            client,
            url: http::endpoint(&settings.url)?,
            secret,
            timeout,
        })
    }

    /// `sha256=<hex>` of `body` under the route's secret.
    pub fn sign(secret: &[u8], body: &[u8]) -> String {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

#[derive(Deserialize)]
struct Accepted {
    id: Option<serde_json::Value>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct Refused {
    error: String,
}

#[async_trait]
impl SmsProvider for WebhookProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let body = serde_json::to_vec(&serde_json::json!({
            "to": sms.to.e164(),
            "message": sms.body,
            "verification_id": sms.verification_id,
            "route_id": sms.route_id,
        }))
        .map_err(|_| ProviderError::new(ProviderErrorKind::Malformed, "cannot encode request"))?;
        let signature = Self::sign(self.secret.expose_secret().as_bytes(), &body);
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body);
        let answer = execute(request, self.timeout).await?;
        if answer.status.is_success() {
            parse_success(&answer)
        } else {
            Err(parse_failure(&answer))
        }
    }
}

fn parse_success(answer: &HttpAnswer) -> Result<SendReceipt, ProviderError> {
    if answer.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(SendReceipt {
            status: Some(DeliveryStatus::Queued),
            ..SendReceipt::default()
        });
    }
    let accepted: Accepted = answer.json().ok_or_else(|| answer.malformed(NAME))?;
    let id = accepted.id.and_then(|v| match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    // A 2xx that says the message failed is a refusal, as other providers'
    // failed recipient entries are: the next route may still deliver it.
    let status = match accepted.status.as_deref().and_then(DeliveryStatus::parse) {
        Some(s @ (DeliveryStatus::Sent | DeliveryStatus::Delivered)) => s,
        Some(DeliveryStatus::Failed | DeliveryStatus::Undelivered) => {
            return Err(ProviderError::new(
                ProviderErrorKind::Rejected,
                "webhook answered 2xx with a failed status",
            ));
        }
        _ => DeliveryStatus::Queued,
    };
    Ok(SendReceipt {
        provider_message_id: id,
        status: Some(status),
        ..SendReceipt::default()
    })
}

fn parse_failure(answer: &HttpAnswer) -> ProviderError {
    let kind = answer
        .json::<Refused>()
        .and_then(|r| match r.error.as_str() {
            "invalid_number" => Some(ProviderErrorKind::InvalidNumber),
            "rejected" => Some(ProviderErrorKind::Rejected),
            "rate_limited" => Some(ProviderErrorKind::RateLimited),
            "insufficient_balance" => Some(ProviderErrorKind::InsufficientBalance),
            "auth" => Some(ProviderErrorKind::Auth),
            "unavailable" => Some(ProviderErrorKind::Unavailable),
            _ => None,
        });
    let code = answer.status.as_u16();
    match kind {
        Some(kind) => ProviderError::new(
            kind,
            format!("gateway refused: {} (HTTP {code})", kind.as_str()),
        )
        .with_retry_after(
            answer
                .retry_after
                .filter(|_| kind == ProviderErrorKind::RateLimited),
        ),
        None => status_error(NAME, answer, None),
    }
}
