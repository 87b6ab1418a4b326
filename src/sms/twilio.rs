//! Twilio Programmable Messaging: form-encoded POST to the account's
//! `Messages.json` with HTTP basic auth.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::config::TwilioSettings;
use super::http::{self, HttpAnswer, execute, safe_snippet, status_error};
use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::domain::DeliveryStatus;

const NAME: &str = "twilio";

pub struct TwilioProvider {
    client: reqwest::Client,
    send_url: reqwest::Url,
    account_sid: String,
    auth_token: SecretString,
    sender: Sender,
    status_callback: Option<SecretString>,
    timeout: Duration,
}

enum Sender {
    From(String),
    MessagingService(String),
}

impl TwilioProvider {
    pub fn new(
        settings: &TwilioSettings,
        client: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let auth_token = settings
            .auth_token
            .clone()
            .ok_or_else(|| "auth_token: required".to_owned())?;
        let sender = match (&settings.from, &settings.messaging_service_sid) {
            (Some(from), None) => Sender::From(from.clone()),
            (None, Some(sid)) => Sender::MessagingService(sid.clone()),
            _ => return Err("set exactly one of `from` and `messaging_service_sid`".to_owned()),
        };
        Ok(Self {
            client,
            send_url: http::endpoint(&format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                settings.base_url.trim_end_matches('/'),
                urlencoding::encode(&settings.account_sid)
            ))?,
            account_sid: settings.account_sid.clone(),
            auth_token,
            sender,
            status_callback: settings.status_callback.clone(),
            timeout,
        })
    }
}

#[derive(Deserialize)]
struct MessageResource {
    sid: String,
    status: Option<String>,
    error_code: Option<i64>,
    /// `null`, or a negative decimal string such as `"-0.0075"`.
    price: Option<serde_json::Value>,
    price_unit: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    code: Option<i64>,
    message: Option<String>,
}

#[async_trait]
impl SmsProvider for TwilioProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let mut form: Vec<(&str, &str)> = vec![("To", sms.to.e164()), ("Body", sms.body)];
        match &self.sender {
            Sender::From(from) => form.push(("From", from)),
            Sender::MessagingService(sid) => form.push(("MessagingServiceSid", sid)),
        }
        if let Some(url) = &self.status_callback {
            form.push(("StatusCallback", url.expose_secret()));
        }
        let request = self
            .client
            .post(self.send_url.clone())
            .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let answer = execute(request, self.timeout).await?;
        if answer.status.is_success() {
            parse_success(&answer)
        } else {
            Err(parse_failure(&answer))
        }
    }
}

fn parse_success(answer: &HttpAnswer) -> Result<SendReceipt, ProviderError> {
    let message: MessageResource = answer.json().ok_or_else(|| answer.malformed(NAME))?;
    let status = match message.status.as_deref() {
        Some("failed" | "undelivered" | "canceled") => {
            let code = message.error_code.unwrap_or(0);
            return Err(ProviderError::new(
                error_kind(code).unwrap_or(ProviderErrorKind::Rejected),
                format!("twilio marked the message failed (error {code})"),
            ));
        }
        Some("sending" | "sent") => DeliveryStatus::Sent,
        Some("delivered") => DeliveryStatus::Delivered,
        _ => DeliveryStatus::Queued,
    };
    let cost = message.price.as_ref().and_then(|p| match p {
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        serde_json::Value::Number(n) => n.as_f64(),
        _ => None,
    });
    // Twilio reports charges as negative amounts.
    let cost = cost.filter(|c| c.is_finite()).map(f64::abs);
    Ok(SendReceipt {
        provider_message_id: Some(message.sid),
        order_id: None,
        status: Some(status),
        currency: cost.and(message.price_unit.map(|u| u.to_ascii_uppercase())),
        cost,
    })
}

fn parse_failure(answer: &HttpAnswer) -> ProviderError {
    let Some(error) = answer.json::<ErrorResponse>() else {
        return status_error(NAME, answer, None);
    };
    let code = error.code.unwrap_or(0);
    let text = safe_snippet(error.message.as_deref().unwrap_or(""));
    match error_kind(code) {
        Some(kind) => ProviderError::new(kind, format!("twilio error {code}: {text}"))
            .with_retry_after(
                answer
                    .retry_after
                    .filter(|_| kind == ProviderErrorKind::RateLimited),
            ),
        None => {
            // The code is added after `safe_snippet`, which hides digit runs.
            let mut err = status_error(NAME, answer, None);
            err.message = format!("{}: error {code}: {text}", err.message);
            err
        }
    }
}

/// Twilio error codes that say more than the HTTP status does.
fn error_kind(code: i64) -> Option<ProviderErrorKind> {
    Some(match code {
        // The destination itself: no other route will do better.
        21211 | 21217 | 21401 | 21614 => ProviderErrorKind::InvalidNumber,
        // Credentials, account state, sender configuration.
        20003 | 20005 | 20404 | 21212 | 21606 | 21659 | 21660 | 21703 | 21704 | 21705 | 30002 => {
            ProviderErrorKind::Auth
        }
        20429 | 21611 | 30001 | 14107 => ProviderErrorKind::RateLimited,
        // This message to this destination: region permission, opt-out, trial
        // restrictions, carrier refusal.
        21408 | 21610 | 21612 | 21608 | 21635 | 30003 | 30004 | 30005 | 30006 | 30007 | 30008 => {
            ProviderErrorKind::Rejected
        }
        _ => return None,
    })
}
