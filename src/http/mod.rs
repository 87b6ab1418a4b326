//! The HTTP edge: one file per API surface, shared errors and extractors.

pub mod bridgex;
pub mod client_ip;
pub mod dlr;
pub mod error;
pub mod extract;
pub mod guard;
pub mod observe;
pub mod openapi;
pub mod openlyne;
pub mod ops;
pub mod state;
pub mod v1;

use std::time::Duration;

use axum::BoxError;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower::timeout::TimeoutLayer;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa_swagger_ui::SwaggerUi;

pub use error::ApiError;

/// A request past its deadline, answered as its API answers a store outage.
fn timed_out(path: &str) -> Response {
    let cause = String::from("request timed out");
    if bridgex::PATHS.contains(&path) {
        bridgex::BridgexError::Unavailable(cause).into_response()
    } else if openlyne::PATHS.contains(&path) {
        openlyne::OpenlyneError::Unavailable(cause).into_response()
    } else {
        ApiError::Unavailable(cause).into_response()
    }
}
pub use state::{AppState, AppStateInner, Policies};

/// The whole application's routes, without a socket (tests call `.oneshot`).
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let max_body = state.max_body_bytes;
    Router::new()
        .merge(v1::routes())
        .merge(guard::routes())
        .merge(dlr::routes())
        .merge(ops::routes())
        .merge(bridgex::routes())
        .merge(openlyne::routes())
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::document()))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // One composed layer, not four: axum boxes every route once per
        // `Router::layer` and clones each box on every request.
        .layer(
            ServiceBuilder::new()
                // Outermost, so timeouts and panics are counted and carry the
                // request id.
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    observe::observe,
                ))
                .layer(CatchPanicLayer::custom(|_| -> Response {
                    ApiError::Internal("handler panicked".into()).into_response()
                }))
                // The deadline's only error becomes a 503 with Retry-After,
                // in the error shape of the API the request called.
                .layer(HandleErrorLayer::new(|uri: Uri, _: BoxError| async move {
                    timed_out(uri.path())
                }))
                .layer(TimeoutLayer::new(request_timeout))
                .layer(DefaultBodyLimit::max(max_body)),
        )
        .with_state(state)
}
