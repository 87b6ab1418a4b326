//! Operational endpoints: health.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/health", get(health))
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
