//! The native API under `/v1`.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::client_ip::ClientIp;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery, Tenant};
use super::state::AppState;
use crate::domain::{
    Code, DeliveryStatus, Dialect, MessageRecord, PhoneNumber, Purpose, Status, Verification,
};
use crate::rfc3339;
use crate::service::{Caller, CheckResult, SendCommand, Target, UsageReport};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/verifications", post(send_verification))
        .route("/v1/verifications/check", post(check_verification))
        .route("/v1/verifications/{id}", get(get_verification))
        .route("/v1/verifications/{id}/cancel", post(cancel_verification))
        .route("/v1/messages/{id}", get(get_message))
        .route("/v1/usage", get(get_usage))
        .route("/v1/sandbox/messages", get(list_sandbox_messages))
}

const MAX_UID_LEN: usize = 128;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendVerificationRequest {
    /// Phone number with country code; `+` optional.
    #[schema(example = "+31651860670", min_length = 1)]
    pub to: String,
    /// What the code is for; default `login`. Trimmed and lower-cased.
    #[schema(
        nullable = false,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        max_length = 50
    )]
    pub purpose: Option<String>,
    /// Caller's subject id; when given it identifies the verification instead of `to`+`purpose`.
    #[schema(
        nullable = false,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        min_length = 1,
        max_length = 128
    )]
    pub uid: Option<String>,
    /// Try this route first.
    #[schema(nullable = false)]
    pub route_id: Option<u32>,
    /// With `route_id`: whether the rest of the chain may be tried (default true).
    #[schema(nullable = false)]
    pub failover: Option<bool>,
    /// Deliver to the sandbox inbox instead of a real provider.
    #[schema(nullable = false)]
    pub sandbox: Option<bool>,
    /// The route template's language (`fr`, `pt-BR`): a language tag of at most 35 characters.
    #[schema(nullable = false, pattern = "^[A-Za-z0-9_-]{1,35}$")]
    pub locale: Option<String>,
    /// Digits in the code; default the policy's (6).
    #[schema(nullable = false, minimum = 4, maximum = 10)]
    pub code_length: Option<u8>,
    /// How long the code lives: 10 s up to the policy's `max_ttl_seconds`
    /// (3600 by default); default the policy's `ttl_seconds` (300).
    #[schema(nullable = false, minimum = 10)]
    pub ttl_seconds: Option<u32>,
}

/// One delivery attempt (a message) and its live delivery status.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub message_id: Uuid,
    pub verification_id: Uuid,
    pub route_id: u32,
    pub provider: String,
    pub provider_message_id: Option<String>,
    /// Masked: all but the last four digits hidden.
    pub to: String,
    pub country: Option<String>,
    pub status: DeliveryStatus,
    pub error: Option<String>,
    /// What the provider charged (or the route's price); billed only once delivered.
    pub cost: Option<f64>,
    pub currency: Option<String>,
    pub latency_ms: u32,
    /// The message whose failed delivery this one re-sent the verification for.
    pub resend_of: Option<Uuid>,
    /// When the attempt was made (queued).
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize_option")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339::serialize_option")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// When it failed or was reported undelivered.
    #[serde(serialize_with = "rfc3339::serialize_option")]
    pub failed_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub updated_at: DateTime<Utc>,
}

impl From<&MessageRecord> for DeliveryView {
    fn from(m: &MessageRecord) -> Self {
        Self {
            message_id: m.id,
            verification_id: m.verification_id,
            route_id: m.route_id,
            provider: m.provider.clone(),
            provider_message_id: m.provider_message_id.clone(),
            to: m.masked_to.clone(),
            country: m.country.clone(),
            status: m.status,
            error: m.error.clone(),
            cost: m.cost,
            currency: m.currency.clone(),
            latency_ms: m.latency_ms,
            resend_of: m.resend_of,
            created_at: m.created_at,
            sent_at: m.sent_at,
            delivered_at: m.delivered_at,
            failed_at: m.failed_at,
            updated_at: m.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SendVerificationResponse {
    pub id: Uuid,
    pub status: Status,
    /// Masked: all but the last four digits hidden.
    pub to: String,
    pub purpose: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
    pub expires_in_seconds: u64,
    pub resend_after_seconds: u64,
    pub attempts_left: u32,
    pub send_count: u32,
    pub delivery: DeliveryView,
    /// Only when `debug_codes` is enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_code: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckVerificationRequest {
    #[schema(pattern = r"^\s*[0-9]{4,10}\s*$", example = "816369")]
    pub code: String,
    #[schema(nullable = false)]
    pub id: Option<Uuid>,
    #[schema(
        nullable = false,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        min_length = 1,
        max_length = 128
    )]
    pub uid: Option<String>,
    #[schema(nullable = false)]
    pub to: Option<String>,
    #[schema(
        nullable = false,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        max_length = 50
    )]
    pub purpose: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckVerificationResponse {
    pub valid: bool,
    pub status: Status,
    pub id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerificationView {
    pub id: Uuid,
    pub status: Status,
    pub to: String,
    pub country: Option<String>,
    pub purpose: String,
    pub uid: Option<String>,
    pub attempts: u32,
    pub attempts_left: u32,
    pub max_attempts: u32,
    pub send_count: u32,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub updated_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
    pub deliveries: Vec<DeliveryView>,
}

impl VerificationView {
    fn new(v: &Verification, messages: &[MessageRecord], now: DateTime<Utc>) -> Self {
        Self {
            id: v.id,
            status: v.status_at(now),
            to: v.masked_to.clone(),
            country: v.country.clone(),
            purpose: v.purpose.clone(),
            uid: v.uid.clone(),
            attempts: v.attempts,
            attempts_left: v.attempts_left(),
            max_attempts: v.max_attempts,
            send_count: v.send_count,
            created_at: v.created_at,
            updated_at: v.updated_at,
            expires_at: v.expires_at,
            deliveries: messages.iter().map(DeliveryView::from).collect(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InboxQuery {
    /// Only messages to this number.
    #[param(min_length = 1)]
    pub to: Option<String>,
    /// At most this many (default 50; more than 200 reads as 200).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxMessageView {
    pub id: Uuid,
    pub to: String,
    pub body: String,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxResponse {
    pub messages: Vec<InboxMessageView>,
}

pub fn parse_phone(input: &str) -> Result<PhoneNumber, ApiError> {
    PhoneNumber::parse(input).map_err(|e| ApiError::InvalidPhone(format!("to: {e}")))
}

fn parse_purpose(input: Option<&str>) -> Result<Purpose, ApiError> {
    match input {
        None => Ok(Purpose::default()),
        Some(p) => Purpose::parse(p).map_err(|e| ApiError::InvalidRequest(format!("purpose: {e}"))),
    }
}

fn parse_uid(input: Option<String>) -> Result<Option<String>, ApiError> {
    match input {
        None => Ok(None),
        Some(u) => {
            let u = u.trim().to_owned();
            if u.is_empty() || u.chars().count() > MAX_UID_LEN || u.chars().any(char::is_control) {
                return Err(ApiError::InvalidRequest(format!(
                    "uid: must be 1 to {MAX_UID_LEN} characters without control characters"
                )));
            }
            Ok(Some(u))
        }
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    // An unparseable id cannot name anything: same answer as an unknown one.
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound)
}

/// Start (or restart) a verification and send a code.
#[utoipa::path(
    post, path = "/v1/verifications", tag = "verifications",
    request_body = SendVerificationRequest,
    responses(
        (status = 201, description = "Code sent", body = SendVerificationResponse),
        (status = 400, description = "invalid_phone / invalid_request"),
        (status = 401, description = "unauthorized"),
        (status = 403, description = "country_not_allowed / route_not_allowed / suspected_fraud (the number's prefix is quarantined: `prefix`, `reason`, `until`)"),
        (status = 413, description = "payload_too_large"),
        (status = 415, description = "unsupported_media_type: the body is not `application/json`"),
        (status = 429, description = "cooldown / rate_limited (with Retry-After; `limit` names it: number_10min, number_day, ip_10min, tenant_minute, daily_spend, subject_sends_per_window)"),
        (status = 502, description = "delivery_failed: every route failed, nothing left pending"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn send_verification(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ClientIp(client_ip): ClientIp,
    ApiJson(req): ApiJson<SendVerificationRequest>,
) -> Result<(StatusCode, Json<SendVerificationResponse>), ApiError> {
    let cmd = SendCommand {
        to: parse_phone(&req.to)?,
        purpose: parse_purpose(req.purpose.as_deref())?,
        uid: parse_uid(req.uid)?,
        route_id: req.route_id,
        failover: req.failover.unwrap_or(true),
        sandbox: req.sandbox.unwrap_or(false),
        locale: req.locale,
        code_length: req.code_length,
        ttl_seconds: req.ttl_seconds,
        client_ip,
        dialect: Dialect::Native,
    };
    let out = state
        .service
        .send_to_the_end(state.policies.clone(), &tenant, cmd)
        .await?;
    let v = &out.verification;
    Ok((
        StatusCode::CREATED,
        Json(SendVerificationResponse {
            id: v.id,
            status: Status::Pending,
            to: v.masked_to.clone(),
            purpose: v.purpose.clone(),
            uid: v.uid.clone(),
            expires_at: v.expires_at,
            expires_in_seconds: out.expires_in_seconds,
            resend_after_seconds: out.resend_after_seconds,
            attempts_left: v.attempts_left(),
            send_count: v.send_count,
            delivery: DeliveryView::from(&out.delivery),
            debug_code: out.debug_code.map(|c| c.expose().to_owned()),
        }),
    ))
}

/// Check a code. Address the verification by `id`, `uid`, or `to` (+`purpose`).
#[utoipa::path(
    post, path = "/v1/verifications/check", tag = "verifications",
    request_body = CheckVerificationRequest,
    responses(
        (status = 200, description = "valid: true with status approved, or valid: false with attempts_left", body = CheckVerificationResponse),
        (status = 400, description = "invalid_request"),
        (status = 401, description = "unauthorized"),
        (status = 404, description = "not_found: nothing pending (never existed, expired, approved, canceled)"),
        (status = 413, description = "payload_too_large"),
        (status = 415, description = "unsupported_media_type: the body is not `application/json`"),
        (status = 429, description = "max_attempts: the verification is dead / rate_limited with limit wrong_guesses_hour (with Retry-After)"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn check_verification(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ClientIp(client_ip): ClientIp,
    ApiJson(req): ApiJson<CheckVerificationRequest>,
) -> Result<Json<CheckVerificationResponse>, ApiError> {
    let code =
        Code::parse(&req.code).map_err(|e| ApiError::InvalidRequest(format!("code: {e}")))?;
    let target = match (req.id, req.uid, req.to) {
        (Some(id), None, None) => Target::Id(id),
        (None, Some(uid), None) => Target::Uid(parse_uid(Some(uid))?.unwrap_or_default()),
        (None, None, Some(to)) => Target::Phone {
            to: parse_phone(&to)?.into(),
            purpose: parse_purpose(req.purpose.as_deref())?,
        },
        _ => {
            return Err(ApiError::InvalidRequest(
                "give exactly one of id, uid or to".into(),
            ));
        }
    };
    let caller = Caller {
        tenant: &tenant,
        policy: state.policies.for_tenant(&tenant),
        client_ip,
    };
    let result = state
        .service
        .check(&caller, target, &code)
        .await
        .map_err(|e| ApiError::of_check(e, caller.policy))?;
    Ok(Json(match result {
        CheckResult::Approved(v) => CheckVerificationResponse {
            valid: true,
            status: Status::Approved,
            id: v.id,
            attempts_left: None,
        },
        CheckResult::Wrong {
            verification_id,
            attempts_left,
        } => CheckVerificationResponse {
            valid: false,
            status: if attempts_left == 0 {
                Status::MaxAttempts
            } else {
                Status::Pending
            },
            id: verification_id,
            attempts_left: Some(attempts_left),
        },
    }))
}

/// A verification's status and every delivery attempt.
#[utoipa::path(
    get, path = "/v1/verifications/{id}", tag = "verifications",
    params(("id" = Uuid, Path, description = "Verification id")),
    responses(
        (status = 200, body = VerificationView),
        (status = 401, description = "unauthorized"),
        (status = 404, description = "not_found (also for another tenant's id)"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn get_verification(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VerificationView>, ApiError> {
    verification_view(&state, &tenant, parse_id(&id)?).await
}

async fn verification_view(
    state: &AppState,
    tenant: &str,
    id: Uuid,
) -> Result<Json<VerificationView>, ApiError> {
    let (v, messages) = state
        .service
        .get(tenant, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(VerificationView::new(
        &v,
        &messages,
        state.service.now(),
    )))
}

/// Cancel a pending verification.
#[utoipa::path(
    post, path = "/v1/verifications/{id}/cancel", tag = "verifications",
    params(("id" = Uuid, Path, description = "Verification id")),
    responses(
        (status = 200, body = VerificationView),
        (status = 401, description = "unauthorized"),
        (status = 404, description = "not_found: nothing pending under that id"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn cancel_verification(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ClientIp(client_ip): ClientIp,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VerificationView>, ApiError> {
    let id = parse_id(&id)?;
    state
        .service
        .cancel(&tenant, id, client_ip)
        .await?
        .ok_or(ApiError::NotFound)?;
    verification_view(&state, &tenant, id).await
}

/// One delivery attempt and its delivery status.
#[utoipa::path(
    get, path = "/v1/messages/{id}", tag = "messages",
    params(("id" = Uuid, Path, description = "Message id")),
    responses(
        (status = 200, body = DeliveryView),
        (status = 401, description = "unauthorized"),
        (status = 404, description = "not_found"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn get_message(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeliveryView>, ApiError> {
    let id = parse_id(&id)?;
    let m = state
        .service
        .message(&tenant, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(DeliveryView::from(&m)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day, `YYYY-MM-DD` (UTC, inclusive); default 29 days before `to`.
    #[param(pattern = r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}\s*$")]
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC, inclusive); default today.
    #[param(pattern = r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}\s*$")]
    pub to: Option<String>,
}

/// Longest range one usage request may cover.
const MAX_USAGE_DAYS: i64 = 366;

/// A day of usage: chrono reads signed and five-digit years too, whose
/// arithmetic could leave its range, so the year is held to 1970–9999.
fn parse_day(key: &str, value: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d")
        .ok()
        .filter(|d| (1970..=9999).contains(&d.year()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "{key}: expected a date as YYYY-MM-DD, from 1970 to 9999"
            ))
        })
}

/// The tenant's usage per day range: sends, deliveries, failures, pending
/// deliveries, verifications started and approved, conversion rate and cost,
/// in total and by route and by country. Messages and verifications count on
/// the day they were sent, with outcomes reported since; only delivered
/// messages carry cost.
#[utoipa::path(
    get, path = "/v1/usage", tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, body = UsageReport),
        (status = 400, description = "invalid_request: a malformed date, `from` after `to`, or more than 366 days"),
        (status = 401, description = "unauthorized"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn get_usage(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageReport>, ApiError> {
    let to = match q.to.as_deref() {
        Some(to) => parse_day("to", to)?,
        None => state.service.now().date_naive(),
    };
    let from = match q.from.as_deref() {
        Some(from) => parse_day("from", from)?,
        None => to
            .checked_sub_days(chrono::Days::new(29))
            .unwrap_or(NaiveDate::MIN),
    };
    if from > to {
        return Err(ApiError::InvalidRequest(
            "from: must not be after to".into(),
        ));
    }
    if (to - from).num_days() >= MAX_USAGE_DAYS {
        return Err(ApiError::InvalidRequest(format!(
            "from, to: at most {MAX_USAGE_DAYS} days per request"
        )));
    }
    Ok(Json(state.service.usage(&tenant, from, to).await?))
}

/// The sandbox inbox: what the sandbox provider "delivered", newest first.
#[utoipa::path(
    get, path = "/v1/sandbox/messages", tag = "sandbox",
    params(InboxQuery),
    responses(
        (status = 200, body = InboxResponse),
        (status = 400, description = "invalid_phone"),
        (status = 401, description = "unauthorized"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn list_sandbox_messages(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiQuery(q): ApiQuery<InboxQuery>,
) -> Result<Json<InboxResponse>, ApiError> {
    let to = q.to.as_deref().map(parse_phone).transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let messages = state.service.inbox(&tenant, to.as_ref(), limit).await?;
    Ok(Json(InboxResponse {
        messages: messages
            .into_iter()
            .map(|m| InboxMessageView {
                id: m.id,
                to: m.to,
                body: m.body,
                created_at: m.created_at,
            })
            .collect(),
    }))
}
