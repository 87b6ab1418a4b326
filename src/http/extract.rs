//! Extractors shared by every API surface: JSON bodies whose rejections become
//! `ApiError`, and API-key authentication.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;
use crate::service::AuthError;

/// `axum::Json`, but a malformed body answers in the API's error shape.
pub struct ApiJson<T>(pub T);

/// Translates a JSON rejection into the native error: 413 for oversized bodies,
/// 415 for a wrong content type, 400 with serde's reason otherwise.
pub fn json_rejection(rejection: JsonRejection, max_body: usize) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(max_body),
        JsonRejection::JsonDataError(e) => ApiError::InvalidRequest(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::InvalidRequest(e.body_text()),
        other => ApiError::InvalidRequest(other.body_text()),
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r, state.max_body_bytes)),
        }
    }
}

/// The presented API key: `x-api-key`, or `Authorization: Bearer`.
pub fn presented_key(parts: &Parts) -> Option<&str> {
    presented_key_in(&parts.headers)
}

/// [`presented_key`] for handlers that hold only the headers.
pub fn presented_key_in(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Arc<str>, AuthError> {
    authenticate_headers(&parts.headers, state).await
}

/// [`authenticate`] after the body was read: for a surface that, like the
/// service it replaces, validates the body before it checks the key.
pub async fn authenticate_headers(
    headers: &HeaderMap,
    state: &AppState,
) -> Result<Arc<str>, AuthError> {
    let key = presented_key_in(headers).filter(|k| !k.is_empty() && k.len() <= 256);
    match key {
        Some(k) => state.keys.authenticate(k).await,
        None => Err(AuthError::Unauthorized),
    }
}

/// The tenant behind the request's API key.
pub struct Tenant(pub Arc<str>);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Tenant(authenticate(parts, state).await?))
    }
}

/// `axum::extract::Query`, but a malformed query string answers in the API's error shape.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))
    }
}

/// `axum::extract::Path`, but a path whose parameters cannot be read (say,
/// percent-encoded bytes that are not UTF-8) names nothing: 404 in the API's
/// error shape, not axum's plain-text 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|_| ApiError::NoRoute)
    }
}
