//! Provider delivery-report callbacks: `POST /v1/dlr/{provider}/{secret}` for
//! Africa's Talking and Twilio (form-encoded, as each provider posts them).
//!
//! The `{secret}` (config `dlr.secret`) keeps strangers out: a wrong one, an
//! unknown provider, or no secret configured all answer 404, as for any unknown
//! path. Twilio reports must also carry a valid `X-Twilio-Signature`. Reports
//! about messages otpd does not know answer 200 and are ignored, so providers do
//! not retry them forever; duplicates change nothing.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::HeaderMap;
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::ApiPath;
use super::state::AppState;
use crate::domain::DeliveryStatus;
use crate::sms::safe_snippet as http_snippet;

/// What the callback endpoints need besides the service.
#[derive(Default)]
pub struct DlrEndpoints {
    pub secret: Option<SecretString>,
    /// `dlr.public_base_url`, without a trailing slash.
    pub public_base_url: Option<String>,
    /// Auth tokens of the configured Twilio routes (any may have signed).
    pub twilio_auth_tokens: Vec<SecretString>,
    /// Callback URLs configured on Twilio routes (`status_callback`): Twilio
    /// signs the URL it was given, which may differ from the public base URL.
    pub twilio_callback_urls: Vec<SecretString>,
}

impl std::fmt::Debug for DlrEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlrEndpoints")
            .field("enabled", &self.secret.is_some())
            .field("public_base_url", &self.public_base_url)
            .field("twilio_routes", &self.twilio_auth_tokens.len())
            .finish()
    }
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/dlr/{provider}/{secret}", post(delivery_report))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryReportResponse {
    /// `updated` (the message's status moved), `unchanged` (a duplicate or a
    /// late report of an earlier stage), or `ignored` (not a message otpd knows,
    /// or a status with no meaning for delivery).
    pub status: String,
}

/// A provider's delivery report (Africa's Talking or Twilio callback).
#[utoipa::path(
    post, path = "/v1/dlr/{provider}/{secret}", tag = "delivery reports",
    params(
        ("provider" = String, Path, description = "`africastalking` or `twilio`"),
        ("secret" = String, Path, description = "The deployment's `dlr.secret`"),
    ),
    request_body(
        content = String, content_type = "application/x-www-form-urlencoded",
        description = "Africa's Talking: `id`, `status`, `failureReason`, …; Twilio: `MessageSid`, `MessageStatus`, `ErrorCode`, … signed by `X-Twilio-Signature`"
    ),
    responses(
        (status = 200, body = DeliveryReportResponse),
        (status = 400, description = "invalid_request: a report without the provider's id or status fields, or with an id that is not printable text"),
        (status = 403, description = "invalid_signature: a Twilio report not signed with a configured route's auth token"),
        (status = 404, description = "not_found: unknown provider, wrong secret, or delivery reports not configured"),
        (status = 503, description = "unavailable: the store could not record it (the provider retries)"),
    )
)]
pub async fn delivery_report(
    State(state): State<AppState>,
    ApiPath((provider, secret)): ApiPath<(String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<DeliveryReportResponse>, ApiError> {
    let dlr = &state.dlr;
    if !secret_matches(dlr.secret.as_ref(), &secret) {
        return Err(ApiError::NoRoute);
    }
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let report = match provider.as_str() {
        "africastalking" => africastalking_report(&params)?,
        "twilio" => {
            let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
            verify_twilio_signature(dlr, path, &headers, &params)?;
            twilio_report(&params)?
        }
        _ => return Err(ApiError::NoRoute),
    };
    let Some((message_id, status, error)) = report else {
        return Ok(Json(DeliveryReportResponse {
            status: "ignored".into(),
        }));
    };
    // Providers' ids are short printable text. Anything else is a malformed
    // report, not a store outage (PostgreSQL refuses a NUL in text: a 503,
    // which the provider would retry for ever).
    if message_id.len() > MAX_PROVIDER_ID_BYTES || message_id.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "the report's message id is not printable text of at most {MAX_PROVIDER_ID_BYTES} bytes"
        )));
    }
    // Run to its end even if the provider hangs up or the deadline passes: a
    // re-send it starts replaces the code first, then sends and records.
    let (service, policies) = (state.service.clone(), state.policies.clone());
    let outcome = crate::service::to_the_end(async move {
        service
            .apply_delivery_report(policies.as_ref(), &provider, &message_id, status, error)
            .await
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the report stopped: {e}")))??;
    Ok(Json(DeliveryReportResponse {
        status: outcome.label().into(),
    }))
}

const MAX_PROVIDER_ID_BYTES: usize = 256;

/// Compared as digests, so the time taken says nothing about the secret.
fn secret_matches(expected: Option<&SecretString>, presented: &str) -> bool {
    let Some(expected) = expected else {
        return false;
    };
    crate::crypto::secret_eq(expected.expose_secret(), presented)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// (provider message id, status, error), or `None` for a status that says
/// nothing about delivery.
type Report = Option<(String, DeliveryStatus, Option<String>)>;

/// Africa's Talking: `id`, `status` (Sent, Submitted, Buffered, Rejected,
/// Success, Failed, AbsentSubscriber, Expired), `failureReason`.
fn africastalking_report(params: &[(String, String)]) -> Result<Report, ApiError> {
    let (Some(id), Some(status)) = (param(params, "id"), param(params, "status")) else {
        return Err(ApiError::InvalidRequest(
            "an Africa's Talking report has `id` and `status`".into(),
        ));
    };
    let mapped = match status {
        "Success" => DeliveryStatus::Delivered,
        "Sent" | "Submitted" | "Buffered" => DeliveryStatus::Sent,
        "Failed" | "Rejected" | "AbsentSubscriber" | "Expired" => DeliveryStatus::Failed,
        _ => {
            tracing::debug!(status = %http_snippet(status), "Africa's Talking status not understood; ignored");
            return Ok(None);
        }
    };
    let error = mapped
        .is_failure()
        .then(|| match param(params, "failureReason") {
            Some(reason) => format!(
                "delivery_failed: {} ({})",
                http_snippet(status),
                http_snippet(reason)
            ),
            None => format!("delivery_failed: {}", http_snippet(status)),
        });
    Ok(Some((id.to_owned(), mapped, error)))
}

/// Twilio: `MessageSid`, `MessageStatus` (queued, sending, sent, delivered,
/// undelivered, failed, …), `ErrorCode`.
fn twilio_report(params: &[(String, String)]) -> Result<Report, ApiError> {
    let (Some(sid), Some(status)) = (
        param(params, "MessageSid").or_else(|| param(params, "SmsSid")),
        param(params, "MessageStatus").or_else(|| param(params, "SmsStatus")),
    ) else {
        return Err(ApiError::InvalidRequest(
            "a Twilio report has `MessageSid` and `MessageStatus`".into(),
        ));
    };
    let mapped = match status {
        "accepted" | "queued" | "scheduled" => DeliveryStatus::Queued,
        "sending" | "sent" => DeliveryStatus::Sent,
        "delivered" | "read" => DeliveryStatus::Delivered,
        "undelivered" => DeliveryStatus::Undelivered,
        "failed" | "canceled" => DeliveryStatus::Failed,
        _ => {
            tracing::debug!(status = %http_snippet(status), "Twilio status not understood; ignored");
            return Ok(None);
        }
    };
    let error =
        mapped
            .is_failure()
            .then(|| match param(params, "ErrorCode").filter(|c| *c != "0") {
                // Error codes are 5 digits, which a snippet would hide as a number.
                Some(code) if code.len() <= 6 && code.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("delivery_failed: {status} (twilio error {code})")
                }
                _ => format!("delivery_failed: {status}"),
            });
    Ok(Some((sid.to_owned(), mapped, error)))
}

/// `X-Twilio-Signature` = base64(HMAC-SHA1(auth token, URL + each POST
/// parameter's name and value, sorted by name)), where URL is what Twilio
/// called: the public base URL with this request's path and query, or a route's
/// configured `status_callback`. Any configured Twilio route's token may match.
fn verify_twilio_signature(
    dlr: &DlrEndpoints,
    path_and_query: &str,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let forbidden = || ApiError::InvalidSignature("Twilio signature does not match".into());
    let Some(presented) = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
    else {
        return Err(forbidden());
    };
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let signed_params: String = sorted.iter().map(|(k, v)| format!("{k}{v}")).collect();

    let mut urls: Vec<String> = Vec::new();
    if let Some(base) = &dlr.public_base_url {
        urls.push(format!("{base}{path_and_query}"));
    }
    urls.extend(
        dlr.twilio_callback_urls
            .iter()
            .map(|u| u.expose_secret().to_owned()),
    );
    if urls.is_empty() {
        tracing::warn!(
            "a Twilio delivery report arrived but dlr.public_base_url is not set; cannot check its signature"
        );
    }
    for token in &dlr.twilio_auth_tokens {
        for url in &urls {
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(token.expose_secret().as_bytes())
            else {
                continue;
            };
            mac.update(url.as_bytes());
            mac.update(signed_params.as_bytes());
            if mac.verify_slice(&presented).is_ok() {
                return Ok(());
            }
        }
    }
    Err(forbidden())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Twilio's documented example: this URL, these parameters and the token
    /// `12345` sign to `0/KCTR6DLpKmkAf8muzZqo1nDgQ=`.
    #[test]
    fn signatures_follow_twilios_documented_example() {
        let dlr = DlrEndpoints {
            public_base_url: Some("https://mycompany.com".into()),
            twilio_auth_tokens: vec![SecretString::from("12345".to_owned())],
            ..DlrEndpoints::default()
        };
        let body = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-twilio-signature",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ=".parse().unwrap(),
        );
        verify_twilio_signature(&dlr, "/myapp.php?foo=1&bar=2", &headers, &body).unwrap();
        let mut tampered = body.clone();
        tampered[2].1 = "9999".into();
        assert!(
            verify_twilio_signature(&dlr, "/myapp.php?foo=1&bar=2", &headers, &tampered).is_err()
        );
    }

    #[test]
    fn secrets_compare_whole() {
        let secret = SecretString::from("s3cret-s3cret-s3cret".to_owned());
        assert!(secret_matches(Some(&secret), "s3cret-s3cret-s3cret"));
        assert!(!secret_matches(Some(&secret), "s3cret-s3cret-s3cre"));
        assert!(!secret_matches(None, ""));
    }
}
