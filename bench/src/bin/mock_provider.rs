//! A loopback stand-in for BridgeXAPI: `POST /api/v1/send_sms` answers the
//! documented success body at once (and `GET /api/v1/dlr/{id}` reports every
//! message delivered), so send benchmarks measure otpd (and its provider
//! client), not a remote network. One runtime thread: on a small machine
//! it should take as little CPU from the server under test as it can.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

static ORDERS: AtomicU64 = AtomicU64::new(20_000);

#[derive(Deserialize)]
struct SendSms {
    route_id: u32,
    numbers: Vec<String>,
    message: String,
}

async fn send_sms(
    body: Result<Json<SendSms>, axum::extract::rejection::JsonRejection>,
) -> (StatusCode, Json<Value>) {
    let Ok(Json(req)) = body else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": [{"msg": "invalid body"}]})),
        );
    };
    if req.numbers.is_empty() || req.message.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": [{"msg": "numbers and message are required"}]})),
        );
    }
    let order = ORDERS.fetch_add(1, Ordering::Relaxed);
    let messages: Vec<Value> = req
        .numbers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "bx_message_id": format!("BX-{order}-{:016x}", order.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64),
                "msisdn": n,
                "status": "queued",
            })
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({
            "status": "success",
            "message": "SMS batch accepted",
            "order_id": order,
            "route_id": req.route_id,
            "count": messages.len(),
            "messages": messages,
            "cost": 0.05,
            "balance_after": 10.0,
        })),
    )
}

/// Delivery status poll: every message the mock took is reported delivered.
async fn dlr(Path(id): Path<String>) -> Json<Value> {
    Json(json!({
        "bx_message_id": id,
        "msisdn": "31600000000",
        "status": "delivered",
        "route_id": 3,
        "sms_order_id": 0,
        "created_at": "2026-01-01T00:00:00Z",
        "error": null,
    }))
}

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&addr).await?;
            println!("listening on {}", listener.local_addr()?);
            let app = Router::new()
                .route("/api/v1/send_sms", post(send_sms))
                .route("/api/v1/dlr/{id}", get(dlr));
            axum::serve(listener, app).await?;
            Ok(())
        })
}
