//! The HTTP ceiling: a bare axum endpoint (`GET /` → `hello`) built with the same
//! axum, tokio and release profile as otpd, so every otpd figure can be read as a
//! fraction of what the stack itself does on the same machine.

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;

// The same allocator as the otpd binary, so the comparison is like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    // The driver reads this line to learn the port.
    println!("listening on {}", listener.local_addr()?);
    let app = Router::new().route("/", get(|| async { "hello" }));
    axum::serve(listener, app).await?;
    Ok(())
}
