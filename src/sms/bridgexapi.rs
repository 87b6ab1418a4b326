//! BridgeXAPI: explicit provider-side routes, JSON over HTTPS with an
//! `X-API-KEY` header. Wire format in `shared/reference/providers.md`.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::config::{BRIDGEX_MAX_MESSAGE, BridgexSettings};
use super::http::{self, HttpAnswer, execute, safe_snippet, status_error};
use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::domain::DeliveryStatus;

const NAME: &str = "bridgexapi";
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

pub struct BridgexProvider {
    client: reqwest::Client,
    base_url: String,
    send_url: reqwest::Url,
    /// The `X-API-KEY` value, checked and built once; hidden from `Debug`.
    api_key: HeaderValue,
    route_id: u8,
    caller_id: String,
    timeout: Duration,
}

impl BridgexProvider {
    pub fn new(
        settings: &BridgexSettings,
        client: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let key = settings
            .api_key
            .as_ref()
            .ok_or_else(|| "api_key: required".to_owned())?;
        let mut api_key = HeaderValue::from_str(key.expose_secret())
            .map_err(|_| "api_key: must be visible ASCII, as an HTTP header value".to_owned())?;
        api_key.set_sensitive(true);
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            client,
            send_url: http::endpoint(&format!("{base_url}/api/v1/send_sms"))?,
            base_url,
            api_key,
            route_id: settings.provider_route_id,
            caller_id: settings.caller_id.clone(),
            timeout,
        })
    }
}

/// `POST /api/v1/send_sms`'s body (fields in the order a JSON map sorts them,
/// as the body was written before it had a type).
#[derive(Serialize)]
struct SendRequest<'a> {
    caller_id: &'a str,
    message: &'a str,
    numbers: [&'a str; 1],
    route_id: u8,
}

#[derive(Deserialize)]
struct SendResponse {
    order_id: Option<serde_json::Value>,
    #[serde(default)]
    messages: Vec<SentMessage>,
    cost: Option<f64>,
}

#[derive(Deserialize)]
struct SentMessage {
    bx_message_id: Option<String>,
    status: Option<String>,
}

/// What BridgeXAPI knows about one message's delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum DlrPoll {
    /// The delivery record: `status` is `None` for a status string this code
    /// does not know (leave the message as it is); `error` is the provider's
    /// reason, made safe to store.
    Report {
        status: Option<DeliveryStatus>,
        error: Option<String>,
    },
    /// "DLR record not found": no report yet (or never).
    NotFound,
}

#[derive(Deserialize)]
struct DlrRecord {
    status: Option<String>,
    error: Option<serde_json::Value>,
}

impl BridgexProvider {
    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET /api/v1/dlr/{bx_message_id}`: the message's delivery status.
    pub async fn poll_dlr(&self, bx_message_id: &str) -> Result<DlrPoll, ProviderError> {
        let url = format!(
            "{}/api/v1/dlr/{}",
            self.base_url,
            urlencoding::encode(bx_message_id)
        );
        let request = self.client.get(url).header(API_KEY, self.api_key.clone());
        let answer = execute(request, self.timeout).await?;
        if answer.status.is_success() {
            let record: DlrRecord = answer.json().ok_or_else(|| answer.malformed(NAME))?;
            let error = match record.error {
                Some(serde_json::Value::String(e)) if !e.trim().is_empty() => {
                    Some(safe_snippet(&e))
                }
                Some(serde_json::Value::Null) | None => None,
                Some(serde_json::Value::String(_)) => None,
                Some(other) => Some(safe_snippet(&other.to_string())),
            };
            return Ok(DlrPoll::Report {
                status: record.status.as_deref().and_then(dlr_status),
                error,
            });
        }
        let detail = match answer.json::<ErrorResponse>().map(|e| e.detail) {
            Some(Detail::Text(text)) => Some(text),
            _ => None,
        };
        if answer.status.as_u16() == 404
            && detail
                .as_deref()
                .is_some_and(|d| d.to_ascii_lowercase().contains("dlr record not found"))
        {
            return Ok(DlrPoll::NotFound);
        }
        Err(parse_failure(&answer))
    }
}

/// A BridgeXAPI delivery status (its own words, or the SMPP ones its vendors
/// pass through) as otpd's; `None` for anything unknown.
pub fn dlr_status(raw: &str) -> Option<DeliveryStatus> {
    Some(match raw.trim().to_ascii_lowercase().as_str() {
        "queued" | "pending" | "scheduled" | "accepted" | "acceptd" => DeliveryStatus::Queued,
        "sent" | "sending" | "submitted" | "enroute" | "buffered" => DeliveryStatus::Sent,
        "delivered" | "delivrd" | "success" => DeliveryStatus::Delivered,
        "undelivered" | "undeliv" | "undeliverable" => DeliveryStatus::Undelivered,
        "failed" | "rejected" | "rejectd" | "expired" | "expird" | "error" | "deleted" => {
            DeliveryStatus::Failed
        }
        _ => return None,
    })
}

#[derive(Deserialize)]
struct ErrorResponse {
    detail: Detail,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Detail {
    Text(String),
    Validation(Vec<ValidationItem>),
}

#[derive(Deserialize)]
struct ValidationItem {
    msg: Option<String>,
}

#[async_trait]
impl SmsProvider for BridgexProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        // Config validation renders every template with the longest code, so
        // these only fire for a route built without it; never send a message
        // BridgeXAPI would truncate or refuse.
        if !sms.body.is_ascii() || sms.body.len() > BRIDGEX_MAX_MESSAGE {
            return Err(ProviderError::new(
                ProviderErrorKind::Rejected,
                format!("message must be ASCII and at most {BRIDGEX_MAX_MESSAGE} characters"),
            ));
        }
        let number = sms.to.digits();
        if !(10..=15).contains(&number.len()) {
            return Err(ProviderError::new(
                ProviderErrorKind::Rejected,
                "BridgeXAPI takes numbers of 10 to 15 digits",
            ));
        }
        let request = self
            .client
            .post(self.send_url.clone())
            .header(API_KEY, self.api_key.clone())
            .json(&SendRequest {
                caller_id: &self.caller_id,
                message: sms.body,
                numbers: [number],
                route_id: self.route_id,
            });
        let answer = execute(request, self.timeout).await?;
        if answer.status.is_success() {
            parse_success(&answer)
        } else {
            Err(parse_failure(&answer))
        }
    }
}

fn parse_success(answer: &HttpAnswer) -> Result<SendReceipt, ProviderError> {
    let body: SendResponse = answer.json().ok_or_else(|| answer.malformed(NAME))?;
    let message = body.messages.first();
    let Some(id) = message.and_then(|m| m.bx_message_id.clone()) else {
        return Err(answer.malformed(NAME));
    };
    let status = message
        .and_then(|m| m.status.as_deref())
        .map(str::to_ascii_lowercase);
    let status = match status.as_deref() {
        Some("failed" | "rejected" | "undelivered" | "error") => {
            return Err(ProviderError::new(
                ProviderErrorKind::Rejected,
                "BridgeXAPI marked the message failed at submission",
            ));
        }
        Some(s) => DeliveryStatus::parse(s).unwrap_or(DeliveryStatus::Queued),
        None => DeliveryStatus::Queued,
    };
    let order_id = body.order_id.and_then(|v| match v {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) => Some(s),
        _ => None,
    });
    Ok(SendReceipt {
        provider_message_id: Some(id),
        order_id,
        status: Some(status),
        cost: body.cost,
        // BridgeXAPI bills in the account currency, which the send answer omits;
        // the route's `currency` fills it in for cost reports.
        currency: None,
    })
}

/// Known `detail` strings (matched case-insensitively, as substrings) decide
/// the kind; anything else falls back to the HTTP status.
fn parse_failure(answer: &HttpAnswer) -> ProviderError {
    let code = answer.status.as_u16();
    let detail = match answer.json::<ErrorResponse>().map(|e| e.detail) {
        Some(Detail::Text(text)) => text,
        Some(Detail::Validation(items)) => {
            let first = items
                .iter()
                .find_map(|i| i.msg.as_deref())
                .unwrap_or("invalid request");
            return ProviderError::new(
                ProviderErrorKind::Rejected,
                format!("request refused: {} (HTTP {code})", safe_snippet(first)),
            );
        }
        None => return status_error(NAME, answer, None),
    };
    let lower = detail.to_ascii_lowercase();
    let kind = if lower.contains("api key") || lower.contains("x-api-key") {
        ProviderErrorKind::Auth
    } else if lower.contains("invalid route") || lower.contains("not authorized for route") {
        // Route configuration: every message on this otpd route would fail.
        ProviderErrorKind::Auth
    } else if lower.contains("insufficient balance") {
        ProviderErrorKind::InsufficientBalance
    } else if lower.contains("vendor send failed")
        || lower.contains("pricing failed")
        || lower.contains("estimate failed")
    {
        ProviderErrorKind::Unavailable
    } else {
        return status_error(NAME, answer, Some(&detail));
    };
    ProviderError::new(kind, format!("{} (HTTP {code})", safe_snippet(&detail))).with_retry_after(
        if code == 429 {
            answer.retry_after
        } else {
            None
        },
    )
}
