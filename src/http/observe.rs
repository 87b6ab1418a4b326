//! Per-request context for every route: a request id (the caller's
//! `x-request-id` when it is sane, otherwise a new one; echoed back), a tracing
//! span carrying it so every log line of the request has it, and the request
//! metrics by route template.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use uuid::Uuid;

use super::state::AppState;
use crate::metrics::UNMATCHED_ROUTE;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest caller-chosen request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = match req.headers().get(&REQUEST_ID) {
        Some(v) if acceptable(v) => v.clone(),
        _ => generated_id(),
    };
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let method = req.method().clone();
    // Cheap: MatchedPath is a shared string. The template, never the raw path,
    // which may hold ids or a callback secret.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route_label = route.as_ref().map_or(UNMATCHED_ROUTE, MatchedPath::as_str);

    // The span is context, not an event: at ERROR level it exists whatever the
    // log level, so even a warning logged under `RUST_LOG=warn` carries the id.
    let span = tracing::error_span!(
        "request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %method,
        route = %route_label,
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::debug!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        );
    });
    state.metrics.record_request(
        &method,
        route.as_ref().map(MatchedPath::as_str),
        status,
        elapsed,
    );
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Printable ASCII without spaces, at most 128 bytes: safe to log and echo.
fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(u8::is_ascii_graphic)
}

fn generated_id() -> HeaderValue {
    let mut buf = Uuid::encode_buffer();
    let id = Uuid::now_v7().hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sane_ids_are_kept() {
        assert!(acceptable(&HeaderValue::from_static("req-42.a:b/c")));
        assert!(!acceptable(&HeaderValue::from_static("")));
        assert!(!acceptable(&HeaderValue::from_static("two words")));
        assert!(!acceptable(
            &HeaderValue::from_str(&"x".repeat(129)).unwrap()
        ));
        assert!(acceptable(
            &HeaderValue::from_str(&"x".repeat(128)).unwrap()
        ));
        assert!(acceptable(&generated_id()));
    }
}
