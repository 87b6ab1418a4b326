//! The BridgeX-style API (`POST /send-otp`, `POST /verify-otp`, `GET /config`;
//! `GET /health` is shared with ops): the contract of the BridgeXAPI FastAPI OTP
//! server, so its clients work by changing only the base URL and key.
//!
//! Like that server, the body is validated (pydantic's rules, FastAPI's 422
//! shape) before the key is checked, and errors are `{"detail": "..."}`.
//! Deliberate differences: numbers must also be valid in their numbering plan,
//! spent attempts do not lift the cooldown, 429 answers carry `Retry-After`, and
//! a 502 names only the kind of provider failure.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::client_ip::ClientIp;
use super::extract::authenticate_headers;
use super::state::AppState;
use crate::config::BRIDGEX_ROUTE_IDS;
use crate::domain::phone::mask_digits;
use crate::domain::{Code, Dialect, PhoneNumber, Purpose, TypedNumber};
use crate::service::{AuthError, Caller, CheckError, CheckResult, SendCommand, SendError, Target};
use crate::sms::router::RoutingError;

/// This API's paths (`/health` is shared and answers natively).
pub const PATHS: [&str; 3] = ["/send-otp", "/verify-otp", "/config"];

pub fn routes() -> Router<AppState> {
    let not_allowed = || async { BridgexError::MethodNotAllowed };
    Router::new()
        .route(PATHS[0], post(send_otp).fallback(not_allowed))
        .route(PATHS[1], post(verify_otp).fallback(not_allowed))
        .route(PATHS[2], get(config).fallback(not_allowed))
}

const MAX_PURPOSE_CHARS: usize = 50;

// ---------------------------------------------------------------------------
// Errors

/// One entry of FastAPI's 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationIssue {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl ValidationIssue {
    fn field(name: &str, kind: &'static str, msg: impl Into<String>, input: Value) -> Self {
        Self {
            kind,
            loc: vec![json!("body"), json!(name)],
            msg: msg.into(),
            input,
            ctx: None,
        }
    }

    /// What a `field_validator` raising `ValueError(reason)` produces.
    fn value_error(name: &str, reason: &str, input: Value) -> Self {
        Self {
            ctx: Some(json!({ "error": {} })),
            ..Self::field(name, "value_error", format!("Value error, {reason}"), input)
        }
    }

    fn missing(name: &str, body: &Map<String, Value>) -> Self {
        Self::field(
            name,
            "missing",
            "Field required",
            Value::Object(body.clone()),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgexError {
    #[error("Unauthorized.")]
    Unauthorized,
    #[error("validation failed")]
    Validation(Vec<ValidationIssue>),
    #[error("There was an error parsing the body")]
    UnreadableBody,
    #[error("OTP was sent too recently. Retry in {0} seconds.")]
    Cooldown(u64),
    #[error("OTP send limit reached. Retry in {0} seconds.")]
    SendLimit(u64),
    #[error("SMS send failed: {0}")]
    SendFailed(String),
    #[error("No active OTP found for this phone number and purpose.")]
    NotFound,
    /// With the seconds until a retry may find a new code (`Retry-After`).
    #[error("OTP attempts exceeded.")]
    AttemptsExceeded(u64),
    #[error("Invalid OTP. Attempts left: {0}")]
    InvalidOtp(u32),
    #[error("Request body too large.")]
    PayloadTooLarge,
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    #[error("Service temporarily unavailable.")]
    Unavailable(String),
    #[error("Internal Server Error")]
    Internal(String),
}

impl BridgexError {
    pub fn status(&self) -> StatusCode {
        match self {
            BridgexError::Unauthorized => StatusCode::UNAUTHORIZED,
            BridgexError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BridgexError::UnreadableBody => StatusCode::BAD_REQUEST,
            BridgexError::Cooldown(_) | BridgexError::SendLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            BridgexError::SendFailed(_) => StatusCode::BAD_GATEWAY,
            BridgexError::NotFound => StatusCode::NOT_FOUND,
            BridgexError::AttemptsExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            BridgexError::InvalidOtp(_) => StatusCode::BAD_REQUEST,
            BridgexError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BridgexError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BridgexError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BridgexError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            BridgexError::Cooldown(s)
            | BridgexError::SendLimit(s)
            | BridgexError::AttemptsExceeded(s) => Some(*s),
            BridgexError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

impl IntoResponse for BridgexError {
    fn into_response(self) -> Response {
        match &self {
            BridgexError::Unavailable(cause) => tracing::warn!(%cause, "answering 503"),
            BridgexError::Internal(cause) => tracing::error!(%cause, "answering 500"),
            _ => {}
        }
        let detail = match &self {
            BridgexError::Validation(issues) => json!(issues),
            other => json!(other.to_string()),
        };
        let mut response = (self.status(), Json(json!({ "detail": detail }))).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<AuthError> for BridgexError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => BridgexError::Unauthorized,
            AuthError::Store(s) => BridgexError::Unavailable(s.to_string()),
        }
    }
}

impl BridgexError {
    /// A refused check; a spent verification can be sent anew after the
    /// policy's cooldown, as on `/v1`.
    fn of_check(e: CheckError, policy: &crate::domain::Policy) -> Self {
        match e {
            CheckError::NotFound => BridgexError::NotFound,
            CheckError::MaxAttempts => {
                BridgexError::AttemptsExceeded(u64::from(policy.cooldown_seconds))
            }
            // The subject's wrong-guess budget is spent: the same answer.
            CheckError::RateLimited {
                retry_after_seconds,
                ..
            } => BridgexError::AttemptsExceeded(retry_after_seconds),
            CheckError::Unavailable(cause) => BridgexError::Unavailable(cause),
        }
    }
}

fn route_issue(route_id: u32, reason: &str) -> BridgexError {
    BridgexError::Validation(vec![ValidationIssue::value_error(
        "route_id",
        &format!("route_id {route_id} {reason}."),
        json!(route_id),
    )])
}

fn send_error(e: SendError, route_id: u32) -> BridgexError {
    match e {
        SendError::Cooldown {
            retry_after_seconds,
        } => BridgexError::Cooldown(retry_after_seconds),
        SendError::RateLimited {
            retry_after_seconds,
            ..
        } => BridgexError::SendLimit(retry_after_seconds),
        SendError::Routing(RoutingError::UnknownRoute(_)) => {
            route_issue(route_id, "is not a configured route")
        }
        SendError::Routing(RoutingError::RouteNotAllowed(_)) => {
            route_issue(route_id, "is not allowed")
        }
        SendError::Routing(RoutingError::RouteDoesNotServe(_)) => {
            route_issue(route_id, "does not serve this destination")
        }
        SendError::CountryNotAllowed { .. } => {
            BridgexError::SendFailed("destination country not allowed".into())
        }
        SendError::SuspectedFraud { prefix, .. } => BridgexError::SendFailed(format!(
            "sends to {prefix} are suspended (suspected SMS pumping)"
        )),
        SendError::Routing(RoutingError::NoRoute) => {
            BridgexError::SendFailed("no route serves this destination".into())
        }
        SendError::Routing(RoutingError::CircuitOpen { .. }) => {
            BridgexError::SendFailed("every route is temporarily unavailable".into())
        }
        SendError::DeliveryFailed { attempts, .. } => {
            // The record's error is "kind: detail"; only the kind is safe to show
            // (the detail may name a provider host or echo its answer).
            let kind = attempts
                .last()
                .and_then(|m| m.error.as_deref())
                .and_then(|e| e.split(':').next())
                .map(|k| k.trim().replace('_', " "))
                .unwrap_or_else(|| "no route accepted the message".into());
            BridgexError::SendFailed(kind)
        }
        // Dialect policies fix code length and TTL, so a request cannot be out of bounds.
        SendError::InvalidRequest(m) => BridgexError::Internal(m),
        SendError::Unavailable(cause) => BridgexError::Unavailable(cause),
    }
}

// ---------------------------------------------------------------------------
// Body: FastAPI's reading rules

/// The request body as FastAPI hands it to pydantic: parsed JSON when the
/// content type is JSON (or absent), the raw text otherwise, `Null` when empty.
/// A JSON syntax error is FastAPI's 422 `json_invalid`.
pub struct BridgexBody(pub Value);

impl FromRequest<AppState> for BridgexBody {
    type Rejection = BridgexError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| is_json_content_type(v.to_str().unwrap_or_default()));
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r: BytesRejection| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    BridgexError::PayloadTooLarge
                } else {
                    BridgexError::UnreadableBody
                }
            })?;
        if bytes.is_empty() {
            return Ok(BridgexBody(Value::Null));
        }
        if json_type == Some(false) {
            return Ok(BridgexBody(Value::String(
                String::from_utf8_lossy(&bytes).into_owned(),
            )));
        }
        serde_json::from_slice(&bytes)
            .map(BridgexBody)
            .map_err(|e| BridgexError::Validation(vec![json_invalid(&bytes, &e)]))
    }
}

fn is_json_content_type(value: &str) -> bool {
    let mime = value.split(';').next().unwrap_or_default().trim();
    let Some((main, sub)) = mime.split_once('/') else {
        return false;
    };
    main.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json") || sub.to_ascii_lowercase().ends_with("+json"))
}

/// FastAPI's answer to a body Python's `json` module cannot decode: `loc` holds
/// the character offset of the error, `ctx.error` Python's reason.
fn json_invalid(bytes: &[u8], e: &serde_json::Error) -> ValidationIssue {
    let text = String::from_utf8_lossy(bytes);
    let pos: usize = text
        .split_inclusive('\n')
        .take(e.line().saturating_sub(1))
        .map(|l| l.chars().count())
        .sum::<usize>()
        + e.column().saturating_sub(1);
    let reason = e.to_string();
    let python_reason = if reason.starts_with("key must be a string") {
        "Expecting property name enclosed in double quotes"
    } else if reason.starts_with("expected `:`") {
        "Expecting ':' delimiter"
    } else if reason.starts_with("expected `,` or") {
        "Expecting ',' delimiter"
    } else if reason.starts_with("trailing") {
        "Extra data"
    } else if reason.starts_with("control character") {
        "Invalid control character"
    } else if reason.starts_with("invalid escape") || reason.starts_with("invalid unicode") {
        "Invalid \\escape"
    } else {
        "Expecting value"
    };
    ValidationIssue {
        kind: "json_invalid",
        loc: vec![json!("body"), json!(pos)],
        msg: "JSON decode error".into(),
        input: json!({}),
        ctx: Some(json!({ "error": python_reason })),
    }
}

// ---------------------------------------------------------------------------
// Validation: pydantic v2's rules for the original models

/// The body as the model's fields, or the model-level error.
fn model(body: &Value) -> Result<&Map<String, Value>, BridgexError> {
    match body {
        Value::Object(m) => Ok(m),
        Value::Null => Err(BridgexError::Validation(vec![ValidationIssue {
            kind: "missing",
            loc: vec![json!("body")],
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }])),
        other => Err(BridgexError::Validation(vec![ValidationIssue {
            kind: "model_attributes_type",
            loc: vec![json!("body")],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            input: other.clone(),
            ctx: None,
        }])),
    }
}

/// A `str` field: missing without a default and non-strings are errors
/// (pydantic v2 does not turn numbers into strings). `Ok(None)` means "use the default".
fn string_field<'a>(
    body: &'a Map<String, Value>,
    name: &str,
    required: bool,
    issues: &mut Vec<ValidationIssue>,
) -> Option<&'a str> {
    match body.get(name) {
        None => {
            if required {
                issues.push(ValidationIssue::missing(name, body));
            }
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            issues.push(ValidationIssue::field(
                name,
                "string_type",
                "Input should be a valid string",
                other.clone(),
            ));
            None
        }
    }
}

/// pydantic's lax `int`: integers, floats without a fractional part, booleans,
/// and strings holding an integer.
fn lax_int(value: &Value) -> Result<i128, (&'static str, &'static str)> {
    const NOT_INT: (&str, &str) = ("int_type", "Input should be a valid integer");
    const FRACTION: (&str, &str) = (
        "int_from_float",
        "Input should be a valid integer, got a number with a fractional part",
    );
    const UNPARSABLE: (&str, &str) = (
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    );
    match value {
        Value::Bool(b) => Ok(i128::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                match n.as_f64() {
                    // Saturating: a huge value still fails the range check.
                    Some(f) if f.is_finite() && f.fract() == 0.0 => Ok(f as i128),
                    _ => Err(FRACTION),
                }
            }
        }
        Value::String(s) => {
            let s = s.trim();
            let (int_part, fraction) = s.split_once('.').unwrap_or((s, ""));
            if !fraction.bytes().all(|b| b == b'0') {
                return Err(UNPARSABLE);
            }
            int_part.parse::<i128>().map_err(|_| UNPARSABLE)
        }
        _ => Err(NOT_INT),
    }
}

fn route_id_field(
    body: &Map<String, Value>,
    default: u32,
    issues: &mut Vec<ValidationIssue>,
) -> Option<u32> {
    let Some(input) = body.get("route_id") else {
        return Some(default);
    };
    let (lo, hi) = (*BRIDGEX_ROUTE_IDS.start(), *BRIDGEX_ROUTE_IDS.end());
    match lax_int(input) {
        Err((kind, msg)) => {
            issues.push(ValidationIssue::field("route_id", kind, msg, input.clone()));
            None
        }
        Ok(n) if n < i128::from(lo) => {
            issues.push(ValidationIssue {
                ctx: Some(json!({ "ge": lo })),
                ..ValidationIssue::field(
                    "route_id",
                    "greater_than_equal",
                    format!("Input should be greater than or equal to {lo}"),
                    input.clone(),
                )
            });
            None
        }
        Ok(n) if n > i128::from(hi) => {
            issues.push(ValidationIssue {
                ctx: Some(json!({ "le": hi })),
                ..ValidationIssue::field(
                    "route_id",
                    "less_than_equal",
                    format!("Input should be less than or equal to {hi}"),
                    input.clone(),
                )
            });
            None
        }
        Ok(n) => u32::try_from(n).ok(),
    }
}

fn digits_only(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A validated `/send-otp` body.
struct SendForm {
    phone_number: String,
    phone: PhoneNumber,
    purpose: Purpose,
    route_id: u32,
}

impl SendForm {
    fn parse(body: &Value, default_route_id: u32) -> Result<Self, BridgexError> {
        let body = model(body)?;
        let mut issues = Vec::new();

        let phone_number = string_field(body, "phone_number", true, &mut issues).and_then(|raw| {
            let value = raw.trim();
            let reason = if !digits_only(value) {
                Some("phone_number must contain digits only.")
            } else if !(10..=15).contains(&value.len()) {
                Some("phone_number must usually be between 10 and 15 digits.")
            } else {
                None
            };
            match reason {
                Some(r) => {
                    issues.push(ValidationIssue::value_error("phone_number", r, json!(raw)));
                    None
                }
                None => Some(value.to_owned()),
            }
        });

        let purpose = match body.get("purpose") {
            None => Some(Purpose::default()),
            Some(_) => string_field(body, "purpose", false, &mut issues).and_then(|raw| {
                let value = raw.trim().to_lowercase();
                let reason = if value.is_empty() {
                    Some("purpose cannot be empty.".to_owned())
                } else if value.chars().count() > MAX_PURPOSE_CHARS {
                    Some(format!(
                        "purpose must be {MAX_PURPOSE_CHARS} characters or less."
                    ))
                } else {
                    Purpose::parse(&value).err().map(|e| format!("{e}."))
                };
                match reason {
                    Some(r) => {
                        issues.push(ValidationIssue::value_error("purpose", &r, json!(raw)));
                        None
                    }
                    None => Purpose::parse(&value).ok(),
                }
            }),
        };

        let route_id = route_id_field(body, default_route_id, &mut issues);

        match (phone_number, purpose, route_id) {
            (Some(phone_number), Some(purpose), Some(route_id)) if issues.is_empty() => {
                // Beyond the original: the number must exist in its numbering plan.
                let phone = PhoneNumber::parse(&phone_number).map_err(|_| {
                    BridgexError::Validation(vec![ValidationIssue::value_error(
                        "phone_number",
                        "phone_number is not a valid number in its country's numbering plan.",
                        json!(phone_number),
                    )])
                })?;
                Ok(Self {
                    phone_number,
                    phone,
                    purpose,
                    route_id,
                })
            }
            _ => Err(BridgexError::Validation(issues)),
        }
    }
}

/// A validated `/verify-otp` body (the original checks no lengths here).
struct VerifyForm {
    phone_number: String,
    code: String,
    purpose: String,
}

impl VerifyForm {
    fn parse(body: &Value) -> Result<Self, BridgexError> {
        let body = model(body)?;
        let mut issues = Vec::new();
        let mut digits_field = |name: &str, reason: &str| {
            string_field(body, name, true, &mut issues).and_then(|raw| {
                let value = raw.trim();
                if digits_only(value) {
                    Some(value.to_owned())
                } else {
                    issues.push(ValidationIssue::value_error(name, reason, json!(raw)));
                    None
                }
            })
        };
        let phone_number = digits_field("phone_number", "phone_number must contain digits only.");
        let code = digits_field("code", "code must be numeric.");
        let purpose = match body.get("purpose") {
            None => Some("login".to_owned()),
            Some(_) => string_field(body, "purpose", false, &mut issues).and_then(|raw| {
                let value = raw.trim().to_lowercase();
                if value.is_empty() {
                    issues.push(ValidationIssue::value_error(
                        "purpose",
                        "purpose cannot be empty.",
                        json!(raw),
                    ));
                    None
                } else {
                    Some(value)
                }
            }),
        };
        match (phone_number, code, purpose) {
            (Some(phone_number), Some(code), Some(purpose)) if issues.is_empty() => Ok(Self {
                phone_number,
                code,
                purpose,
            }),
            _ => Err(BridgexError::Validation(issues)),
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgexSendRequest {
    /// Digits only, 10 to 15, with the country code.
    #[schema(example = "31651860670", pattern = r"^\s*[0-9]{10,15}\s*$")]
    pub phone_number: String,
    /// Trimmed and lower-cased, at most 50 characters. Default `login`.
    #[schema(
        example = "login",
        nullable = false,
        max_length = 50,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub purpose: Option<String>,
    /// 1 to 8; default `dialects.bridgex.default_route_id` (3). Once routes are
    /// configured it must name one.
    #[schema(example = 3, minimum = 1, maximum = 8, nullable = false)]
    pub route_id: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgexSendResponse {
    /// Always `otp_sent`.
    pub status: &'static str,
    /// All but the last four digits masked: `*******0670`.
    pub phone_number: String,
    pub purpose: String,
    /// The route id the request named (or the default).
    pub route_id: u32,
    pub expires_in_seconds: u64,
    pub cooldown_seconds: u64,
    /// The code, only when debug codes are enabled; otherwise null.
    pub debug_code: Option<String>,
    /// The delivering provider's message id.
    pub bx_message_id: Option<String>,
    /// BridgeXAPI's order id; for other providers otpd's message id
    /// (`GET /v1/messages/{id}`).
    pub order_id: Option<String>,
    /// `{bridgexapi_base_url}/api/v1/dlr/{bx_message_id}` when a BridgeXAPI route
    /// delivered; null otherwise.
    pub delivery_status_url: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgexVerifyRequest {
    #[schema(example = "31651860670", pattern = r"^\s*[0-9]+\s*$")]
    pub phone_number: String,
    #[schema(example = "816369", pattern = r"^\s*[0-9]+\s*$")]
    pub code: String,
    /// Default `login`.
    #[schema(nullable = false, pattern = r"\S")]
    pub purpose: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgexVerifyResponse {
    /// Always `otp_verified`.
    pub status: &'static str,
    pub phone_number: String,
    pub purpose: String,
    pub verified: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgexConfigResponse {
    pub otp_length: u8,
    pub otp_ttl_seconds: u32,
    pub otp_send_cooldown_seconds: u32,
    pub otp_max_attempts: u32,
    pub default_route_id: u32,
    pub default_caller_id: String,
    pub debug_otp: bool,
}

/// Send a code (BridgeX-style).
#[utoipa::path(
    post, path = "/send-otp", tag = "bridgex",
    request_body = BridgexSendRequest,
    responses(
        (status = 200, description = "Code sent", body = BridgexSendResponse),
        (status = 401, description = r#"{"detail": "Unauthorized."}"#),
        (status = 413, description = r#"{"detail": "Request body too large."}"#),
        (status = 422, description = r#"Validation failed: {"detail": [{"type", "loc", "msg", "input"}]}"#),
        (status = 429, description = r#"{"detail": "OTP was sent too recently. Retry in N seconds."} (with Retry-After)"#),
        (status = 502, description = r#"{"detail": "SMS send failed: ..."}; nothing is left pending"#),
        (status = 503, description = "The store is unavailable"),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn send_otp(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    headers: HeaderMap,
    BridgexBody(body): BridgexBody,
) -> Result<Json<BridgexSendResponse>, BridgexError> {
    let dialect = &state.dialects.bridgex;
    let form = SendForm::parse(&body, dialect.default_route_id)?;
    let tenant = authenticate_headers(&headers, &state).await?;

    // Pinned, with failover to the rest of the dialect's chain. With no routes
    // configured every id reaches the sandbox; otherwise an unconfigured id is a
    // 422 on `route_id` (checked after the key, so configuration does not leak).
    let cmd = SendCommand {
        route_id: Some(form.route_id),
        client_ip,
        dialect: Dialect::Bridgex,
        ..SendCommand::new(form.phone, form.purpose)
    };
    let out = state
        .service
        .send_to_the_end(state.policies.clone(), &tenant, cmd)
        .await
        .map_err(|e| send_error(e, form.route_id))?;

    let bx_message_id = out.delivery.provider_message_id.clone();
    let delivery_status_url = match (&bx_message_id, out.delivery.provider.as_str()) {
        (Some(id), "bridgexapi") => Some(format!(
            "{}/api/v1/dlr/{id}",
            dialect.bridgexapi_base_url.trim_end_matches('/')
        )),
        _ => None,
    };
    let order_id = out
        .order_id
        .clone()
        .unwrap_or_else(|| out.delivery.id.to_string());
    Ok(Json(BridgexSendResponse {
        status: "otp_sent",
        phone_number: mask_digits(&form.phone_number),
        purpose: out.verification.purpose.clone(),
        route_id: form.route_id,
        expires_in_seconds: out.expires_in_seconds,
        cooldown_seconds: out.resend_after_seconds,
        debug_code: out.debug_code.map(|c| c.expose().to_owned()),
        bx_message_id,
        order_id: Some(order_id),
        delivery_status_url,
    }))
}

/// Check a code (BridgeX-style). Approval is single use.
#[utoipa::path(
    post, path = "/verify-otp", tag = "bridgex",
    request_body = BridgexVerifyRequest,
    responses(
        (status = 200, description = "Code right", body = BridgexVerifyResponse),
        (status = 400, description = r#"{"detail": "Invalid OTP. Attempts left: N"}"#),
        (status = 401, description = r#"{"detail": "Unauthorized."}"#),
        (status = 404, description = r#"{"detail": "No active OTP found for this phone number and purpose."}"#),
        (status = 413, description = r#"{"detail": "Request body too large."}"#),
        (status = 422, description = "Validation failed (FastAPI shape)"),
        (status = 429, description = r#"{"detail": "OTP attempts exceeded."} (with Retry-After)"#),
        (status = 503, description = "The store is unavailable"),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn verify_otp(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    headers: HeaderMap,
    BridgexBody(body): BridgexBody,
) -> Result<Json<BridgexVerifyResponse>, BridgexError> {
    let form = VerifyForm::parse(&body)?;
    let tenant = authenticate_headers(&headers, &state).await?;

    // A number or purpose otpd could never have sent to has nothing pending.
    let (Ok(to), Ok(purpose)) = (
        TypedNumber::parse(&form.phone_number),
        Purpose::parse(&form.purpose),
    ) else {
        return Err(BridgexError::NotFound);
    };
    let target = Target::Phone { to, purpose };
    let caller = Caller {
        tenant: &tenant,
        policy: state.policies.of(&tenant, Dialect::Bridgex),
        client_ip,
    };
    let result = match Code::parse(&form.code) {
        Ok(code) => state.service.check(&caller, target, &code).await,
        // The original counts any digit string as a guess; so does this.
        Err(_) => state.service.check_unusable_guess(&caller, target).await,
    }
    .map_err(|e| BridgexError::of_check(e, caller.policy))?;
    match result {
        CheckResult::Approved(_) => Ok(Json(BridgexVerifyResponse {
            status: "otp_verified",
            phone_number: mask_digits(&form.phone_number),
            purpose: form.purpose,
            verified: true,
        })),
        CheckResult::Wrong { attempts_left, .. } => Err(BridgexError::InvalidOtp(attempts_left)),
    }
}

/// The OTP settings this API applies (BridgeX-style).
#[utoipa::path(
    get, path = "/config", tag = "bridgex",
    responses(
        (status = 200, body = BridgexConfigResponse),
        (status = 401, description = r#"{"detail": "Unauthorized."}"#),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn config(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<BridgexConfigResponse>, BridgexError> {
    let tenant = authenticate_headers(&headers, &state).await?;
    let policy = state.policies.of(&tenant, Dialect::Bridgex);
    let dialect = &state.dialects.bridgex;
    Ok(Json(BridgexConfigResponse {
        otp_length: policy.code_length,
        otp_ttl_seconds: policy.ttl_seconds,
        otp_send_cooldown_seconds: policy.cooldown_seconds,
        otp_max_attempts: policy.max_attempts,
        default_route_id: dialect.default_route_id,
        default_caller_id: dialect.default_caller_id.clone(),
        debug_otp: state.debug_codes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(r: Result<impl Sized, BridgexError>) -> Vec<ValidationIssue> {
        match r {
            Err(BridgexError::Validation(v)) => v,
            Err(e) => panic!("expected 422, got {e}"),
            Ok(_) => panic!("expected 422, got Ok"),
        }
    }

    #[test]
    fn route_id_follows_pydantic_lax_int() {
        let ok = |v: Value| {
            SendForm::parse(&json!({ "phone_number": "31651860670", "route_id": v }), 3)
                .map(|f| f.route_id)
                .ok()
        };
        assert_eq!(ok(json!(5)), Some(5));
        assert_eq!(ok(json!("7")), Some(7));
        assert_eq!(ok(json!(" 2 ")), Some(2));
        assert_eq!(ok(json!(4.0)), Some(4));
        assert_eq!(ok(json!(true)), Some(1));
        let kind = |v: Value| {
            issues(SendForm::parse(
                &json!({ "phone_number": "31651860670", "route_id": v }),
                3,
            ))[0]
                .kind
        };
        assert_eq!(kind(json!(0)), "greater_than_equal");
        assert_eq!(kind(json!(false)), "greater_than_equal");
        assert_eq!(kind(json!(9)), "less_than_equal");
        assert_eq!(kind(json!(1e300)), "less_than_equal");
        assert_eq!(kind(json!(2.5)), "int_from_float");
        assert_eq!(kind(json!("three")), "int_parsing");
        assert_eq!(kind(json!(null)), "int_type");
        assert_eq!(kind(json!([3])), "int_type");
    }

    #[test]
    fn every_field_error_is_reported_in_model_order() {
        let got = issues(SendForm::parse(
            &json!({ "phone_number": 31651860670u64, "purpose": "  ", "route_id": 0 }),
            3,
        ));
        let locs: Vec<&Value> = got.iter().map(|i| &i.loc[1]).collect();
        assert_eq!(locs, ["phone_number", "purpose", "route_id"]);
        assert_eq!(got[0].kind, "string_type");
        assert_eq!(got[1].msg, "Value error, purpose cannot be empty.");
    }

    #[test]
    fn json_errors_point_at_the_character() {
        let e = serde_json::from_slice::<Value>(b"{\"a\": }").unwrap_err();
        let issue = json_invalid(b"{\"a\": }", &e);
        assert_eq!(issue.loc, vec![json!("body"), json!(6)]);
        assert_eq!(issue.ctx, Some(json!({ "error": "Expecting value" })));
        let body = "{\n  \"é\": 1,\n  x}".as_bytes();
        let e = serde_json::from_slice::<Value>(body).unwrap_err();
        let issue = json_invalid(body, &e);
        // Python counts characters: "{\n" (2) + "  \"é\": 1,\n" (10) + "  " (2).
        assert_eq!(issue.loc[1], json!(14));
        assert_eq!(
            issue.ctx,
            Some(json!({ "error": "Expecting property name enclosed in double quotes" }))
        );
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.api+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/x-www-form-urlencoded"));
        assert!(!is_json_content_type(""));
    }
}
