//! Floors for otpd's figures: a bare server whose `POST /v1/verifications`
//! (`{"to": "+…"}`) makes only the one outside call that otpd's request cannot
//! do without, and answers. No store, no abuse guard, no code, no log line.
//!
//! - `relay provider <listen> <mock provider address>`: otpd's own BridgeXAPI
//!   call (otpd's HTTP client and provider code), as every send makes.
//! - `relay redis <listen> <redis url>`: one script round trip on a connection
//!   set up as otpd's Redis store sets up its own, as a wrong check by id makes.
//!
//! otpd's request costs at least as much as its floor, so the benchmark
//! measures each beside the bare hello: the floor shows how much of a gap to
//! hello is the outside call itself.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use otpd::domain::PhoneNumber;
use otpd::sms::config::BridgexSettings;
use otpd::sms::{BridgexProvider, OutgoingSms, SmsProvider, http_client};
use redis::aio::ConnectionManager;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use uuid::Uuid;

// The same allocator as the otpd binary, so the comparison is like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// otpd's default template with a six-digit code.
const BODY: &str = "Your verification code is 123456.";

/// A wrong guess's bookkeeping in miniature: one counter in one hash.
const GUESS: &str = "return redis.call('HINCRBY', KEYS[1], 'attempts', 1)";

#[derive(Deserialize)]
struct Send {
    to: String,
}

type Answer = (StatusCode, Json<Value>);

async fn provider_send(
    State(provider): State<Arc<BridgexProvider>>,
    Json(req): Json<Send>,
) -> Answer {
    let Some(to) = PhoneNumber::from_stored(&req.to, None) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "to"})));
    };
    let sms = OutgoingSms {
        tenant: "relay",
        verification_id: Uuid::now_v7(),
        route_id: 1,
        to: &to,
        body: BODY,
        ttl: Duration::from_secs(3_600),
    };
    match provider.send(&sms).await {
        Ok(receipt) => (
            StatusCode::CREATED,
            Json(json!({"provider_message_id": receipt.provider_message_id})),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

struct RedisFloor {
    conn: ConnectionManager,
    script: redis::Script,
}

async fn redis_guess(State(floor): State<Arc<RedisFloor>>, Json(req): Json<Send>) -> Answer {
    let mut conn = floor.conn.clone();
    let key = format!("relay:{}", req.to);
    match floor.script.key(key).invoke_async::<i64>(&mut conn).await {
        Ok(attempts) => (StatusCode::CREATED, Json(json!({"attempts": attempts}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

async fn provider_app(mock: &str) -> anyhow::Result<Router> {
    let client =
        http_client(Duration::from_secs(5), Duration::from_secs(10)).map_err(anyhow::Error::msg)?;
    let settings = BridgexSettings {
        base_url: format!("http://{mock}"),
        api_key: Some(SecretString::from("otpd-bench")),
        provider_route_id: 3,
        caller_id: "BRIDGEXAPI".into(),
    };
    let provider = BridgexProvider::new(&settings, client, Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    Ok(Router::new()
        .route("/v1/verifications", post(provider_send))
        .with_state(Arc::new(provider)))
}

async fn redis_app(url: &str) -> anyhow::Result<Router> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let conn = ConnectionManager::new(redis::Client::open(info)?).await?;
    let floor = RedisFloor {
        conn,
        script: redis::Script::new(GUESS),
    };
    Ok(Router::new()
        .route("/v1/verifications", post(redis_guess))
        .with_state(Arc::new(floor)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (app, listen) = match args.as_slice() {
        [mode, listen, mock] if mode == "provider" => (provider_app(mock).await?, listen),
        [mode, listen, url] if mode == "redis" => (redis_app(url).await?, listen),
        _ => anyhow::bail!(
            "usage: relay provider <listen> <mock address> | relay redis <listen> <redis url>"
        ),
    };
    let listener = TcpListener::bind(listen).await?;
    // The driver reads this line to learn the port.
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
