//! Africa's Talking SMS (live and sandbox): form-encoded POST with an `apiKey`
//! header; success or failure is decided per recipient, even inside a 201.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::config::AfricasTalkingSettings;
use super::http::{self, HttpAnswer, execute, safe_snippet, status_error};
use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::domain::DeliveryStatus;

const NAME: &str = "africastalking";
pub const LIVE_BASE_URL: &str = "https://api.africastalking.com";
pub const SANDBOX_BASE_URL: &str = "https://api.sandbox.africastalking.com";

pub struct AfricasTalkingProvider {
    client: reqwest::Client,
    send_url: reqwest::Url,
    username: String,
    api_key: SecretString,
    sender_id: Option<String>,
    enqueue: bool,
    timeout: Duration,
}

impl AfricasTalkingProvider {
    /// The `sandbox` username selects the sandbox API, as the official SDK does,
    /// unless `base_url` says otherwise.
    pub fn new(
        settings: &AfricasTalkingSettings,
        client: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let api_key = settings
            .api_key
            .clone()
            .ok_or_else(|| "api_key: required".to_owned())?;
        let base = match &settings.base_url {
            Some(url) => url.as_str(),
            None if settings.username == "sandbox" => SANDBOX_BASE_URL,
            None => LIVE_BASE_URL,
        };
        Ok(Self {
            client,
            send_url: http::endpoint(&format!(
                "{}/version1/messaging",
                base.trim_end_matches('/')
            ))?,
            username: settings.username.clone(),
            api_key,
            sender_id: settings.sender_id.clone(),
            enqueue: settings.enqueue,
            timeout,
        })
    }

    /// The URL messages are POSTed to.
    pub fn endpoint(&self) -> &str {
        self.send_url.as_str()
    }
}

#[derive(Deserialize)]
struct SendResponse {
    #[serde(rename = "SMSMessageData")]
    data: MessageData,
}

#[derive(Deserialize)]
struct MessageData {
    #[serde(rename = "Message", default)]
    message: String,
    #[serde(rename = "Recipients")]
    recipients: Vec<Recipient>,
}

#[derive(Deserialize)]
struct Recipient {
    #[serde(rename = "statusCode")]
    status_code: u16,
    #[serde(default)]
    status: String,
    cost: Option<String>,
    #[serde(rename = "messageId")]
    message_id: Option<String>,
}

#[async_trait]
impl SmsProvider for AfricasTalkingProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let mut form: Vec<(&str, &str)> = vec![
            ("username", &self.username),
            ("to", sms.to.e164()),
            ("message", sms.body),
            ("bulkSMSMode", "1"),
        ];
        if let Some(from) = &self.sender_id {
            form.push(("from", from));
        }
        if self.enqueue {
            form.push(("enqueue", "1"));
        }
        let request = self
            .client
            .post(self.send_url.clone())
            .header("apiKey", self.api_key.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let answer = execute(request, self.timeout).await?;
        if !answer.status.is_success() {
            let text = String::from_utf8_lossy(&answer.body);
            // Error answers are plain text ("The supplied authentication is
            // invalid"); an HTML error page is not worth quoting.
            let detail = (!text.trim_start().starts_with('<')).then_some(text.as_ref());
            return Err(status_error(NAME, &answer, detail));
        }
        parse_success(&answer)
    }
}

fn parse_success(answer: &HttpAnswer) -> Result<SendReceipt, ProviderError> {
    let body: SendResponse = answer.json().ok_or_else(|| answer.malformed(NAME))?;
    let Some(recipient) = body.data.recipients.first() else {
        return Err(no_recipient(&body.data.message));
    };
    let status = match recipient.status_code {
        101 => DeliveryStatus::Sent,
        100 | 102 => DeliveryStatus::Queued,
        code => return Err(recipient_error(code, &recipient.status)),
    };
    let (cost, currency) = recipient
        .cost
        .as_deref()
        .and_then(parse_cost)
        .map_or((None, None), |(c, cur)| (Some(c), Some(cur)));
    Ok(SendReceipt {
        provider_message_id: recipient.message_id.clone(),
        order_id: None,
        status: Some(status),
        cost,
        currency,
    })
}

/// Per-recipient status codes from Africa's Talking's documentation.
fn recipient_error(code: u16, status: &str) -> ProviderError {
    let kind = match code {
        403 => ProviderErrorKind::InvalidNumber,
        // The sender id is route configuration: every message would fail.
        402 => ProviderErrorKind::Auth,
        405 => ProviderErrorKind::InsufficientBalance,
        // Refusals of this message or this destination; another route (another
        // sender and gateway) may get through.
        401 | 404 | 406 | 407 | 409 | 502 => ProviderErrorKind::Rejected,
        500 | 501 => ProviderErrorKind::Unavailable,
        _ => ProviderErrorKind::Rejected,
    };
    let name = match code {
        401 => "RiskHold",
        402 => "InvalidSenderId",
        403 => "InvalidPhoneNumber",
        404 => "UnsupportedNumberType",
        405 => "InsufficientBalance",
        406 => "UserInBlacklist",
        407 => "CouldNotRoute",
        409 => "DoNotDisturbRejection",
        500 => "InternalServerError",
        501 => "GatewayError",
        502 => "RejectedByGateway",
        _ => "",
    };
    let name = if name.is_empty() {
        safe_snippet(status)
    } else {
        name.to_owned()
    };
    ProviderError::new(kind, format!("recipient status {code} {name}"))
}

/// A 201 without recipients carries the reason in `Message` alone.
fn no_recipient(message: &str) -> ProviderError {
    let kind = if message.contains("InvalidSenderId") {
        ProviderErrorKind::Auth
    } else if message.contains("InsufficientBalance") {
        ProviderErrorKind::InsufficientBalance
    } else if message.contains("InvalidPhoneNumber") {
        ProviderErrorKind::InvalidNumber
    } else {
        ProviderErrorKind::Rejected
    };
    ProviderError::new(
        kind,
        format!("no recipient accepted: {}", safe_snippet(message)),
    )
}

/// `"KES 0.8000"` → `(0.8, "KES")`.
fn parse_cost(cost: &str) -> Option<(f64, String)> {
    let (currency, amount) = cost.trim().split_once(' ')?;
    let amount: f64 = amount.trim().parse().ok()?;
    (amount.is_finite() && !currency.is_empty()).then(|| (amount, currency.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_strings_split_into_amount_and_currency() {
        assert_eq!(parse_cost("KES 0.8000"), Some((0.8, "KES".to_owned())));
        assert_eq!(parse_cost("UGX 35.0000"), Some((35.0, "UGX".to_owned())));
        assert_eq!(parse_cost("0"), None);
        assert_eq!(parse_cost("KES abc"), None);
    }
}
