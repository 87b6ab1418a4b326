//! The Openlyne-style API (`POST /webhook/send-otp`, `POST /webhook/verify-otp`):
//! the contract of Openlyne's OTP webhooks, so their clients work by changing
//! only the base URL and key. Every answer is the envelope
//! `{"success", "data", "message", "error"}`.
//!
//! The subject is the caller's `uid` (a UUID, compared in canonical form). A
//! verified code ends its verification at once: approval erases the code hash,
//! so it can never be checked again, and the record is purged with the rest.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

use super::client_ip::ClientIp;
use super::extract::authenticate;
use super::state::AppState;
use crate::domain::{Code, Dialect, PhoneNumber, Purpose};
use crate::service::{AuthError, Caller, CheckError, CheckResult, SendCommand, SendError, Target};
use crate::sms::router::RoutingError;

/// This API's paths.
pub const PATHS: [&str; 2] = ["/webhook/send-otp", "/webhook/verify-otp"];

pub fn routes() -> Router<AppState> {
    let not_allowed = || async { OpenlyneError::MethodNotAllowed };
    Router::new()
        .route(PATHS[0], post(send_otp).fallback(not_allowed))
        .route(PATHS[1], post(verify_otp).fallback(not_allowed))
}

// ---------------------------------------------------------------------------
// Envelope and errors

#[derive(Debug, thiserror::Error)]
pub enum OpenlyneError {
    #[error("Invalid phone number. Send digits with the country code, e.g. 256700123456.")]
    InvalidPhone,
    #[error("Invalid uid. It must be a UUID.")]
    InvalidUid,
    #[error("Invalid env. Use \"sandbox\" or leave it out.")]
    InvalidEnv,
    /// Wrong, expired, used up, never sent or malformed: one answer for all.
    #[error("Invalid or expired OTP.")]
    InvalidCode,
    #[error("Invalid request body: {0}")]
    InvalidRequest(String),
    #[error("Invalid API key.")]
    Unauthorized,
    #[error("Please wait {0} seconds before requesting a new OTP.")]
    Cooldown(u64),
    #[error("Too many OTP requests. Try again in {0} seconds.")]
    RateLimited(u64),
    #[error("Request body too large.")]
    PayloadTooLarge,
    #[error("Expected Content-Type: application/json.")]
    UnsupportedMediaType,
    #[error("Method not allowed.")]
    MethodNotAllowed,
    #[error("Failed to send OTP.")]
    SendFailed,
    #[error("Service temporarily unavailable.")]
    Unavailable(String),
    #[error("Internal server error.")]
    Internal(String),
}

impl OpenlyneError {
    /// The table: machine code and status of every variant.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        match self {
            OpenlyneError::InvalidPhone => ("invalid_phone", StatusCode::BAD_REQUEST),
            OpenlyneError::InvalidUid => ("invalid_uid", StatusCode::BAD_REQUEST),
            OpenlyneError::InvalidEnv => ("invalid_env", StatusCode::BAD_REQUEST),
            OpenlyneError::InvalidCode => ("invalid_code", StatusCode::BAD_REQUEST),
            OpenlyneError::InvalidRequest(_) => ("invalid_request", StatusCode::BAD_REQUEST),
            OpenlyneError::Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            OpenlyneError::Cooldown(_) => ("too_many_requests", StatusCode::TOO_MANY_REQUESTS),
            OpenlyneError::RateLimited(_) => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            OpenlyneError::PayloadTooLarge => ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            OpenlyneError::UnsupportedMediaType => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            OpenlyneError::MethodNotAllowed => {
                ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED)
            }
            OpenlyneError::SendFailed => ("send_failed", StatusCode::INTERNAL_SERVER_ERROR),
            OpenlyneError::Unavailable(_) => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
            OpenlyneError::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            OpenlyneError::Cooldown(s) | OpenlyneError::RateLimited(s) => Some(*s),
            OpenlyneError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

impl IntoResponse for OpenlyneError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        match &self {
            OpenlyneError::Unavailable(cause) => tracing::warn!(%cause, "answering 503"),
            OpenlyneError::Internal(cause) => tracing::error!(%cause, "answering 500"),
            _ => {}
        }
        let message = self.to_string();
        let body = json!({
            "success": false,
            "data": null,
            "message": message,
            "error": { "code": code, "message": message },
        });
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<AuthError> for OpenlyneError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => OpenlyneError::Unauthorized,
            AuthError::Store(s) => OpenlyneError::Unavailable(s.to_string()),
        }
    }
}

impl From<SendError> for OpenlyneError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Cooldown {
                retry_after_seconds,
            } => OpenlyneError::Cooldown(retry_after_seconds),
            SendError::RateLimited {
                retry_after_seconds,
                ..
            } => OpenlyneError::RateLimited(retry_after_seconds),
            // Every route is cooling off after failures: a failed send, as the
            // original answered when its provider failed, not a bad number.
            SendError::Routing(RoutingError::CircuitOpen { .. }) => OpenlyneError::SendFailed,
            // No route may serve this number: to the caller, a number it cannot use.
            SendError::Routing(_) | SendError::CountryNotAllowed { .. } => {
                OpenlyneError::InvalidPhone
            }
            SendError::SuspectedFraud { .. } => OpenlyneError::SendFailed,
            SendError::DeliveryFailed { .. } => OpenlyneError::SendFailed,
            // Dialect policies fix code length and TTL, so a request cannot be out of bounds.
            SendError::InvalidRequest(m) => OpenlyneError::Internal(m),
            SendError::Unavailable(cause) => OpenlyneError::Unavailable(cause),
        }
    }
}

impl From<CheckError> for OpenlyneError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::NotFound | CheckError::MaxAttempts | CheckError::RateLimited { .. } => {
                OpenlyneError::InvalidCode
            }
            CheckError::Unavailable(cause) => OpenlyneError::Unavailable(cause),
        }
    }
}

// ---------------------------------------------------------------------------
// Extractors

/// `axum::Json`, but a malformed body answers in the envelope.
pub struct OpenlyneJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenlyneJson<T> {
    type Rejection = OpenlyneError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(OpenlyneJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(OpenlyneError::UnsupportedMediaType)
            }
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(OpenlyneError::PayloadTooLarge)
            }
            Err(r) => Err(OpenlyneError::InvalidRequest(r.body_text())),
        }
    }
}

/// The tenant behind `x-api-key`; checked before the body, as the original's
/// webhook authentication is.
pub struct OpenlyneTenant(pub Arc<str>);

impl FromRequestParts<AppState> for OpenlyneTenant {
    type Rejection = OpenlyneError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(OpenlyneTenant(authenticate(parts, state).await?))
    }
}

// ---------------------------------------------------------------------------
// Parsing

/// The number as the caller sent it (digits only) and parsed.
fn parse_phone(value: Option<&Value>) -> Result<(String, PhoneNumber), OpenlyneError> {
    let sent = match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| n.to_string()),
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        _ => None,
    }
    .ok_or(OpenlyneError::InvalidPhone)?;
    let phone = PhoneNumber::parse(&sent).map_err(|_| OpenlyneError::InvalidPhone)?;
    let digits = sent.chars().filter(char::is_ascii_digit).collect();
    Ok((digits, phone))
}

/// The uid in canonical form, so `123E4567-…` and `123e4567-…` are one subject.
fn parse_uid(value: Option<&Value>) -> Result<String, OpenlyneError> {
    match value {
        Some(Value::String(s)) => Uuid::parse_str(s.trim())
            .map(|u| u.hyphenated().to_string())
            .map_err(|_| OpenlyneError::InvalidUid),
        _ => Err(OpenlyneError::InvalidUid),
    }
}

/// `Ok(true)` for `"sandbox"`, `Ok(false)` when absent (live).
fn parse_env(value: Option<&Value>) -> Result<bool, OpenlyneError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(s)) if s == "sandbox" => Ok(true),
        Some(_) => Err(OpenlyneError::InvalidEnv),
    }
}

/// The code as typed: a string, or a number for clients that send one.
fn parse_code(value: Option<&Value>) -> Result<Code, OpenlyneError> {
    let text = match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        _ => return Err(OpenlyneError::InvalidCode),
    };
    // A malformed code cannot be right; it gets the one answer wrong codes get.
    Code::parse(&text).map_err(|_| OpenlyneError::InvalidCode)
}

fn object(body: &Value) -> Result<&serde_json::Map<String, Value>, OpenlyneError> {
    body.as_object()
        .ok_or_else(|| OpenlyneError::InvalidRequest("expected a JSON object".into()))
}

// ---------------------------------------------------------------------------
// Handlers

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneSendRequest {
    /// With the country code: a number or a string.
    #[schema(value_type = String, example = "256700123456")]
    pub phone: Value,
    /// The caller's user id, a UUID; the verification belongs to it.
    #[schema(example = "123e4567-e89b-12d3-a456-426614174000", format = Uuid)]
    pub uid: String,
    /// `sandbox` delivers to the sandbox inbox; leave it out for live delivery.
    #[schema(example = "sandbox", pattern = "^sandbox$")]
    pub env: Option<String>,
}

/// The 200 answer to a send. Field order is the original's.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneSendResponse {
    /// Always true.
    pub success: bool,
    pub data: OpenlyneSent,
    /// Always `OTP sent successfully`.
    pub message: &'static str,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub error: Option<()>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneSent {
    /// Always `Sent`.
    pub status: &'static str,
    /// The number's digits as sent.
    pub number: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneVerifyRequest {
    #[schema(example = "123e4567-e89b-12d3-a456-426614174000", format = Uuid)]
    pub uid: String,
    /// The 6-digit code.
    #[schema(example = "123456", pattern = r"^\s*[0-9]{4,10}\s*$")]
    pub code: String,
}

/// The 200 answer to a right code. Field order is the original's.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneVerifyResponse {
    /// Always true.
    pub success: bool,
    pub data: OpenlyneVerified,
    /// Always `Verification successful`.
    pub message: &'static str,
    /// Always `{}`.
    pub error: EmptyObject,
}

/// Serializes as `{}`.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct EmptyObject {}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenlyneVerified {
    /// Always `OTP verified successfully`.
    pub message: &'static str,
    /// The number the code was sent to, digits with the country code.
    pub contact_value: String,
}

/// Send a code (Openlyne-style).
#[utoipa::path(
    post, path = "/webhook/send-otp", tag = "openlyne",
    request_body = OpenlyneSendRequest,
    responses(
        (status = 200, description = r#"{"success": true, "data": {"status": "Sent", "number": "256700123456"}, "message": "OTP sent successfully", "error": null}"#, body = OpenlyneSendResponse),
        (status = 400, description = "invalid_phone / invalid_uid / invalid_env / invalid_request"),
        (status = 401, description = "unauthorized"),
        (status = 413, description = "payload_too_large"),
        (status = 415, description = "unsupported_media_type: the body is not `application/json`"),
        (status = 429, description = "A code went to this uid less than 30 s ago (with Retry-After)"),
        (status = 500, description = "send_failed / internal"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []))
)]
pub async fn send_otp(
    State(state): State<AppState>,
    OpenlyneTenant(tenant): OpenlyneTenant,
    ClientIp(client_ip): ClientIp,
    OpenlyneJson(body): OpenlyneJson<Value>,
) -> Result<Json<OpenlyneSendResponse>, OpenlyneError> {
    let body = object(&body)?;
    let (number, phone) = parse_phone(body.get("phone"))?;
    let uid = parse_uid(body.get("uid"))?;
    let sandbox = parse_env(body.get("env"))?;
    let cmd = SendCommand {
        uid: Some(uid),
        sandbox,
        client_ip,
        dialect: Dialect::Openlyne,
        ..SendCommand::new(phone, Purpose::default())
    };
    state
        .service
        .send_to_the_end(state.policies.clone(), &tenant, cmd)
        .await?;
    Ok(Json(OpenlyneSendResponse {
        success: true,
        data: OpenlyneSent {
            status: "Sent",
            number,
        },
        message: "OTP sent successfully",
        error: None,
    }))
}

/// Check a code (Openlyne-style); a right code ends the verification.
#[utoipa::path(
    post, path = "/webhook/verify-otp", tag = "openlyne",
    request_body = OpenlyneVerifyRequest,
    responses(
        (status = 200, description = r#"{"success": true, "data": {"message": "OTP verified successfully", "contact_value": "256700123456"}, "message": "Verification successful", "error": {}}"#, body = OpenlyneVerifyResponse),
        (status = 400, description = "invalid_code (wrong, expired or used: one answer) / invalid_uid"),
        (status = 401, description = "unauthorized"),
        (status = 413, description = "payload_too_large"),
        (status = 415, description = "unsupported_media_type: the body is not `application/json`"),
        (status = 500, description = "internal"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []))
)]
pub async fn verify_otp(
    State(state): State<AppState>,
    OpenlyneTenant(tenant): OpenlyneTenant,
    ClientIp(client_ip): ClientIp,
    OpenlyneJson(body): OpenlyneJson<Value>,
) -> Result<Json<OpenlyneVerifyResponse>, OpenlyneError> {
    let body = object(&body)?;
    let uid = parse_uid(body.get("uid"))?;
    let code = parse_code(body.get("code"))?;
    let caller = Caller {
        tenant: &tenant,
        policy: state.policies.of(&tenant, Dialect::Openlyne),
        client_ip,
    };
    match state
        .service
        .check(&caller, Target::Uid(uid), &code)
        .await?
    {
        CheckResult::Approved(v) => {
            let phone = state.service.phone_of(&v).ok_or_else(|| {
                OpenlyneError::Internal(format!("cannot open the number of {}", v.id))
            })?;
            Ok(Json(OpenlyneVerifyResponse {
                success: true,
                data: OpenlyneVerified {
                    message: "OTP verified successfully",
                    contact_value: phone.digits().to_owned(),
                },
                message: "Verification successful",
                error: EmptyObject {},
            }))
        }
        CheckResult::Wrong { .. } => Err(OpenlyneError::InvalidCode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_as_number_or_string_keeps_the_digits_as_sent() {
        let (n, p) = parse_phone(Some(&json!(256700123456u64))).unwrap();
        assert_eq!((n.as_str(), p.e164()), ("256700123456", "+256700123456"));
        let (n, _) = parse_phone(Some(&json!(" +256700123456 "))).unwrap();
        assert_eq!(n, "256700123456");
        for bad in [
            json!(-256700123456i64),
            json!(2.567e11),
            json!("256-abc"),
            json!(null),
            json!(["256700123456"]),
            json!("12345"),
        ] {
            assert!(parse_phone(Some(&bad)).is_err(), "{bad}");
        }
        assert!(parse_phone(None).is_err());
    }

    #[test]
    fn uid_is_canonical() {
        let a = parse_uid(Some(&json!("123E4567-E89B-12D3-A456-426614174000"))).unwrap();
        assert_eq!(a, "123e4567-e89b-12d3-a456-426614174000");
        assert!(parse_uid(Some(&json!("user-42"))).is_err());
        assert!(parse_uid(Some(&json!(42))).is_err());
    }

    #[test]
    fn code_is_digits_as_a_string_or_a_number() {
        assert_eq!(
            parse_code(Some(&json!("123456"))).unwrap().expose(),
            "123456"
        );
        assert_eq!(parse_code(Some(&json!(654321))).unwrap().expose(), "654321");
        for bad in [
            json!("12a456"),
            json!(-123456),
            json!(1.5),
            json!(null),
            json!(""),
        ] {
            assert!(parse_code(Some(&bad)).is_err(), "{bad}");
        }
        assert!(parse_code(None).is_err());
    }

    #[test]
    fn env_is_sandbox_or_absent() {
        assert!(parse_env(Some(&json!("sandbox"))).unwrap());
        assert!(!parse_env(None).unwrap());
        assert!(!parse_env(Some(&Value::Null)).unwrap());
        for bad in [json!("live"), json!("Sandbox"), json!(true), json!("")] {
            assert!(parse_env(Some(&bad)).is_err(), "{bad}");
        }
    }
}
