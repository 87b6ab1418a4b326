//! The SMS-pumping guard for operators: a tenant's quarantined prefixes and
//! today's refusals (`GET /v1/guard`), and lifting a quarantine
//! (`DELETE /v1/guard/{prefix}`).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::client_ip::ClientIp;
use super::error::ApiError;
use super::extract::{ApiPath, Tenant};
use super::state::AppState;
use crate::domain::limits::normalize_prefix;
use crate::rfc3339;
use crate::service::Quarantine;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/guard", get(get_guard))
        .route("/v1/guard/{prefix}", delete(lift_quarantine))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QuarantineView {
    /// E.164 prefix: the country calling code and the digits after it.
    #[schema(example = "+256700")]
    pub prefix: String,
    /// Why it tripped, with the numbers it tripped on.
    pub reason: String,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub since: DateTime<Utc>,
    /// Sends to the prefix are refused (403 `suspected_fraud`) until then.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub until: DateTime<Utc>,
}

impl From<Quarantine> for QuarantineView {
    fn from(q: Quarantine) -> Self {
        Self {
            prefix: q.prefix,
            reason: q.reason,
            since: q.since,
            until: q.until,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GuardView {
    pub quarantines: Vec<QuarantineView>,
    /// Requests refused since midnight UTC, by reason (`country_not_allowed`,
    /// `quarantined`, `guard_tripped`, `daily_spend`, `number_10min`, …).
    pub blocked_today: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiftedView {
    pub lifted: QuarantineView,
    /// The prefix cannot be quarantined again before this.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub spared_until: DateTime<Utc>,
}

/// The tenant's quarantined prefixes and today's refusals.
#[utoipa::path(
    get, path = "/v1/guard", tag = "guard",
    responses(
        (status = 200, body = GuardView),
        (status = 401, description = "unauthorized"),
        (status = 503, description = "unavailable"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn get_guard(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> Result<Json<GuardView>, ApiError> {
    let report = state
        .service
        .guard()
        .report(&tenant, state.service.now())
        .await?;
    Ok(Json(GuardView {
        quarantines: report.quarantines.into_iter().map(Into::into).collect(),
        blocked_today: report
            .blocked_today
            .into_iter()
            .map(|(reason, n)| (reason.to_owned(), n))
            .collect(),
    }))
}

/// Lift a quarantine. The prefix is then spared for the policy's
/// `guard.quarantine_seconds`, so the traffic that tripped it cannot trip it
/// again at once.
#[utoipa::path(
    delete, path = "/v1/guard/{prefix}", tag = "guard",
    params(("prefix" = String, Path, pattern = r"^\s*(\+|%2[Bb])?[0-9]{1,15}\s*$", description = "The quarantined prefix, e.g. +256700 (the + may be left out)")),
    responses(
        (status = 200, body = LiftedView),
        (status = 400, description = "invalid_request: not a prefix"),
        (status = 401, description = "unauthorized"),
        (status = 404, description = "not_found: no quarantine of that prefix"),
    ),
    security(("api_key" = []), ("bearer" = []))
)]
pub async fn lift_quarantine(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ClientIp(client_ip): ClientIp,
    ApiPath(prefix): ApiPath<String>,
) -> Result<Json<LiftedView>, ApiError> {
    let prefix = normalize_prefix(&prefix).ok_or_else(|| {
        ApiError::InvalidRequest("prefix: expected + and 1 to 15 digits, e.g. +256700".into())
    })?;
    let grace = state.policies.for_tenant(&tenant).guard.quarantine_seconds;
    let now = state.service.now();
    let by = match client_ip {
        Some(ip) => format!("api from {ip}"),
        None => "api".to_owned(),
    };
    let lifted = state
        .service
        .guard()
        .lift(&tenant, &prefix, grace, &by, now)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(LiftedView {
        lifted: lifted.into(),
        spared_until: now + chrono::Duration::seconds(grace.into()),
    }))
}
