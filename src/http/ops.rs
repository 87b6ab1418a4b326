//! Operational endpoints: health, liveness, readiness, Prometheus metrics.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::state::AppState;

/// The Prometheus text exposition format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoreHealth {
    pub reachable: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteHealth {
    pub id: u32,
    pub provider: String,
    pub circuit: String,
}

/// Liveness and store reachability. Also the BridgeX-style health answer
/// (`service`, `active_otps`), so both kinds of client read it unchanged.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `unavailable` when the store cannot be reached.
    pub status: String,
    pub service: String,
    pub version: String,
    /// Pending verifications (refreshed in the background, not counted per request).
    pub active_otps: u64,
    pub store: StoreHealth,
    pub routes: Vec<RouteHealth>,
}

#[utoipa::path(
    get, path = "/health", tags = ["operations", "bridgex"],
    responses(
        (status = 200, description = "Up and the store is reachable", body = HealthResponse),
        (status = 503, description = "The store is unreachable", body = HealthResponse),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    let reachable = state.service.ping_store().await.is_ok();
    let routes = state
        .service
        .router()
        .route_health()
        .into_iter()
        .map(|(id, provider, circuit)| RouteHealth {
            id,
            provider: provider.to_owned(),
            circuit: circuit.to_owned(),
        })
        .collect();
    let body = HealthResponse {
        status: if reachable { "ok" } else { "unavailable" }.into(),
        service: "otpd".into(),
        version: state.version.into(),
        active_otps: state.pending_estimate(),
        store: StoreHealth { reachable },
        routes,
    };
    let status = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiveResponse {
    /// Always `ok`: the process is up and serving.
    pub status: String,
}

/// Liveness: the process answers. Restart it when this fails.
#[utoipa::path(
    get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process is up", body = LiveResponse))
)]
pub async fn live() -> Json<LiveResponse> {
    Json(LiveResponse {
        status: "ok".into(),
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready`, or `not_ready` when a check below is false.
    pub status: String,
    /// The store answers. It is opened only after its migrations applied, so
    /// this also means the schema is current.
    pub store: bool,
    /// At least one route's circuit is not open, so a send can go out.
    pub routes: bool,
}

/// Readiness: send traffic here only while this answers 200.
#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Store reachable and a route available", body = ReadyResponse),
        (status = 503, description = "Not ready; the false field says why", body = ReadyResponse),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<ReadyResponse>) {
    let store = state.service.ping_store().await.is_ok();
    let routes = state
        .service
        .router()
        .route_health()
        .iter()
        .any(|(_, _, circuit)| *circuit != "open");
    let ready = store && routes;
    let body = ReadyResponse {
        status: if ready { "ready" } else { "not_ready" }.into(),
        store,
        routes,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus metrics in the text exposition format. When `metrics.token` is
/// set, requires `Authorization: Bearer <token>`; 404 when `metrics.enabled` is off.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "unauthorized: metrics.token is set and was not presented"),
        (status = 404, description = "not_found: metrics are disabled"),
    ),
    security((), ("bearer" = []))
)]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !state.metrics.is_enabled() {
        return Err(ApiError::NoRoute);
    }
    if !state.metrics.may_scrape(bearer(&headers)) {
        return Err(ApiError::Unauthorized);
    }
    // Gauges that mirror state owned elsewhere are set at scrape time.
    state.metrics.set_pending(state.pending_estimate());
    for (route_id, provider, circuit) in state.service.router().route_health() {
        state.metrics.set_circuit_state(route_id, provider, circuit);
    }
    let body = state.metrics.render().unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
