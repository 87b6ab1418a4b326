//! The native API's one error type: each variant has a stable snake_case code
//! and one HTTP status, in one table. 5xx bodies are generic; causes go to the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::domain::Policy;
use crate::service::{AuthError, CheckError, SendError};
use crate::sms::router::RoutingError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidPhone(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    InvalidSignature(String),
    #[error("no pending verification matches")]
    NotFound,
    #[error("{0}")]
    RouteNotAllowed(String),
    #[error("{0}")]
    CountryNotAllowed(String),
    #[error("sends to {prefix} are suspended until {until}: {reason}")]
    SuspectedFraud {
        prefix: String,
        reason: String,
        until: chrono::DateTime<chrono::Utc>,
    },
    #[error("a code was sent too recently; retry in {retry_after_seconds} s")]
    Cooldown { retry_after_seconds: u64 },
    #[error("limit {limit} reached; retry in {retry_after_seconds} s")]
    RateLimited {
        retry_after_seconds: u64,
        limit: &'static str,
    },
    /// The verification is dead; a new one can be sent once the cooldown
    /// since the last send is over (at most the policy's cooldown from now).
    #[error("attempts exhausted; start a new verification")]
    MaxAttempts { retry_after_seconds: u64 },
    #[error("every route failed to deliver the code")]
    DeliveryFailed { verification_id: String },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("no such endpoint")]
    NoRoute,
    #[error("service temporarily unavailable")]
    Unavailable(String),
    /// Every route for the destination is cooling off after failures.
    #[error("{message}")]
    RoutesCoolingOff {
        message: String,
        retry_after_seconds: u64,
    },
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The table: machine code and status of every variant.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        match self {
            ApiError::InvalidRequest(_) => ("invalid_request", StatusCode::BAD_REQUEST),
            ApiError::InvalidPhone(_) => ("invalid_phone", StatusCode::BAD_REQUEST),
            ApiError::Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            ApiError::InvalidSignature(_) => ("invalid_signature", StatusCode::FORBIDDEN),
            ApiError::NotFound => ("not_found", StatusCode::NOT_FOUND),
            ApiError::RouteNotAllowed(_) => ("route_not_allowed", StatusCode::FORBIDDEN),
            ApiError::CountryNotAllowed(_) => ("country_not_allowed", StatusCode::FORBIDDEN),
            ApiError::SuspectedFraud { .. } => ("suspected_fraud", StatusCode::FORBIDDEN),
            ApiError::Cooldown { .. } => ("cooldown", StatusCode::TOO_MANY_REQUESTS),
            ApiError::RateLimited { .. } => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            ApiError::MaxAttempts { .. } => ("max_attempts", StatusCode::TOO_MANY_REQUESTS),
            ApiError::DeliveryFailed { .. } => ("delivery_failed", StatusCode::BAD_GATEWAY),
            ApiError::PayloadTooLarge(_) => ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            ApiError::UnsupportedMediaType => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            ApiError::MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            ApiError::NoRoute => ("not_found", StatusCode::NOT_FOUND),
            ApiError::Unavailable(_) | ApiError::RoutesCoolingOff { .. } => {
                ("unavailable", StatusCode::SERVICE_UNAVAILABLE)
            }
            ApiError::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Cooldown {
                retry_after_seconds,
            }
            | ApiError::RateLimited {
                retry_after_seconds,
                ..
            }
            | ApiError::RoutesCoolingOff {
                retry_after_seconds,
                ..
            }
            | ApiError::MaxAttempts {
                retry_after_seconds,
            } => Some(*retry_after_seconds),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        }
    }

    fn extra(&self) -> Map<String, Value> {
        let mut extra = Map::new();
        if let Some(s) = self.retry_after() {
            extra.insert("retry_after_seconds".into(), json!(s));
        }
        match self {
            ApiError::RateLimited { limit, .. } => {
                extra.insert("limit".into(), json!(limit));
            }
            ApiError::DeliveryFailed { verification_id } => {
                extra.insert("verification_id".into(), json!(verification_id));
            }
            ApiError::SuspectedFraud {
                prefix,
                reason,
                until,
            } => {
                extra.insert("prefix".into(), json!(prefix));
                extra.insert("reason".into(), json!(reason));
                extra.insert("until".into(), json!(until));
            }
            _ => {}
        }
        extra
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        match &self {
            ApiError::Unavailable(cause) => tracing::warn!(%cause, "answering 503"),
            ApiError::Internal(cause) => tracing::error!(%cause, "answering 500"),
            _ => {}
        }
        let mut error = Map::new();
        error.insert("code".into(), json!(code));
        error.insert("message".into(), json!(self.to_string()));
        error.extend(self.extra());
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<SendError> for ApiError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::InvalidRequest(m) => ApiError::InvalidRequest(m),
            SendError::Cooldown {
                retry_after_seconds,
            } => ApiError::Cooldown {
                retry_after_seconds,
            },
            SendError::RateLimited {
                retry_after_seconds,
                limit,
            } => ApiError::RateLimited {
                retry_after_seconds,
                limit,
            },
            SendError::CountryNotAllowed { country } => {
                ApiError::CountryNotAllowed(match country {
                    Some(c) => format!("numbers from {c} may not receive codes for this tenant"),
                    None => {
                        "numbers without a country may not receive codes for this tenant".into()
                    }
                })
            }
            SendError::SuspectedFraud {
                prefix,
                reason,
                until,
            } => ApiError::SuspectedFraud {
                prefix,
                reason,
                until,
            },
            SendError::Routing(r) => r.into(),
            SendError::DeliveryFailed {
                verification_id, ..
            } => ApiError::DeliveryFailed {
                verification_id: verification_id.to_string(),
            },
            SendError::Unavailable(cause) => ApiError::Unavailable(cause),
        }
    }
}

impl From<RoutingError> for ApiError {
    fn from(e: RoutingError) -> Self {
        match e {
            RoutingError::UnknownRoute(_) => ApiError::InvalidRequest(e.to_string()),
            RoutingError::RouteNotAllowed(_) | RoutingError::RouteDoesNotServe(_) => {
                ApiError::RouteNotAllowed(e.to_string())
            }
            RoutingError::NoRoute => ApiError::CountryNotAllowed(e.to_string()),
            RoutingError::CircuitOpen {
                retry_after_seconds,
            } => ApiError::RoutesCoolingOff {
                message: e.to_string(),
                retry_after_seconds,
            },
        }
    }
}

impl ApiError {
    /// A refused check, answered under `policy` (whose cooldown bounds when
    /// a dead verification's subject can be sent a new code).
    pub fn of_check(e: CheckError, policy: &Policy) -> Self {
        match e {
            CheckError::NotFound => ApiError::NotFound,
            CheckError::MaxAttempts => ApiError::MaxAttempts {
                retry_after_seconds: u64::from(policy.cooldown_seconds),
            },
            CheckError::RateLimited {
                retry_after_seconds,
                limit,
            } => ApiError::RateLimited {
                retry_after_seconds,
                limit,
            },
            CheckError::Unavailable(cause) => ApiError::Unavailable(cause),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => ApiError::Unauthorized,
            AuthError::Store(s) => ApiError::Unavailable(s.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}
