//! otpd with a bench-only bulk loader: the same `Application` the `otpd` binary
//! runs (same settings loading, router, service, store), plus a control port on
//! which `POST /prefill?count=N` creates N pending verifications in-process
//! through the service's own send path. They go out over an extra in-process
//! route whose provider answers like a real one (a provider message id, status
//! sent, awaiting its delivery report) and stores nothing itself, so each one
//! leaves exactly what a send over a real provider leaves: the verification,
//! its delivery record, their indexes and the abuse counters. Used where the
//! API would be too slow to fill a store: the 1M-pending scaling and memory
//! runs of the in-process memory store.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use clap::Parser;
use otpd::clock::SystemClock;
use otpd::config::{Overrides, Settings};
use otpd::domain::{DeliveryStatus, PhoneNumber, Purpose};
use otpd::http::AppState;
use otpd::service::SendCommand;
use otpd::sms::{
    OutgoingSms, ProviderError, Route, SandboxProvider, SendReceipt, SmsProvider, build_routes,
    http_client,
};
use otpd::startup::{Application, Dependencies, load_crypto, open_store};
use otpd_bench::workloads::phone_digits;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    config: PathBuf,
    /// Address of the control port.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: String,
    /// First bench number index the loader uses (kept apart from the driver's).
    #[arg(long, default_value_t = 40_000_000)]
    first_number: u64,
}

/// The prefill's route: after every configured one, so the default chain
/// (routes in id order) never reaches it while they are healthy.
const PREFILL_ROUTE: u32 = u32::MAX;

/// Accepts every message the way a provider does over HTTP, without the HTTP:
/// a 25-character message id (BridgeXAPI's length), status sent. No delivery
/// report ever comes (no poller knows this provider), as for an SMS still in flight.
#[derive(Default)]
struct AcceptingProvider {
    sent: AtomicU64,
}

#[async_trait]
impl SmsProvider for AcceptingProvider {
    fn name(&self) -> &'static str {
        "bench-prefill"
    }

    async fn send(&self, _sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(SendReceipt {
            provider_message_id: Some(format!("pf{n:023}")),
            status: Some(DeliveryStatus::Sent),
            ..SendReceipt::default()
        })
    }
}

/// The configured routes plus the prefill's.
async fn routes(settings: &Settings) -> anyhow::Result<(Vec<Route>, otpd::store::DynStore)> {
    let store = open_store(settings).await?;
    let sandbox = Arc::new(SandboxProvider::new(
        store.clone(),
        Arc::new(load_crypto(settings)?),
        Arc::new(SystemClock),
    ));
    let http = http_client(
        settings.routing.connect_timeout(),
        settings.routing.timeout(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut routes = build_routes(&settings.routes, &settings.routing, &http, sandbox)
        .map_err(anyhow::Error::msg)?;
    routes.push(Route::new(
        PREFILL_ROUTE,
        Arc::new(AcceptingProvider::default()),
    ));
    Ok((routes, store))
}

#[derive(Clone)]
struct Control {
    app: AppState,
    next: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct PrefillQuery {
    count: u64,
    #[serde(default = "default_tenant")]
    tenant: String,
}

fn default_tenant() -> String {
    "default".into()
}

async fn prefill(
    State(control): State<Control>,
    Query(q): Query<PrefillQuery>,
) -> (StatusCode, Json<Value>) {
    let started = Instant::now();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        * 4;
    let per_worker = q.count.div_ceil(workers as u64);
    let mut tasks = Vec::new();
    for w in 0..workers as u64 {
        let n = per_worker.min(q.count.saturating_sub(w * per_worker));
        let control = control.clone();
        let tenant = q.tenant.clone();
        tasks.push(tokio::spawn(async move {
            let policy = control.app.policies.for_tenant(&tenant).clone();
            let mut failed = 0u64;
            for _ in 0..n {
                let k = control.next.fetch_add(1, Ordering::Relaxed);
                let Ok(to) = PhoneNumber::parse(&phone_digits(k)) else {
                    failed += 1;
                    continue;
                };
                let mut cmd = SendCommand::new(to, Purpose::default());
                cmd.route_id = Some(PREFILL_ROUTE);
                cmd.failover = false;
                if control
                    .app
                    .service
                    .send(&tenant, &policy, cmd)
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(per_worker);
    }
    let status = if failed == 0 {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (
        status,
        Json(json!({
            "added": q.count - failed.min(q.count),
            "failed": failed,
            "ms": started.elapsed().as_millis() as u64,
        })),
    )
}

// The same allocator as the otpd binary, so the comparison is like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(Some(&args.config), &Overrides::default())?;
    otpd::telemetry::init(&settings.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let app = runtime.block_on(start(&args, settings))?;
    app.block_until_stopped(&runtime)
}

/// Builds otpd's Application with the prefill's route, and serves the control port.
async fn start(args: &Args, settings: Settings) -> anyhow::Result<Application> {
    let (routes, store) = routes(&settings).await?;
    let deps = Dependencies {
        store: Some(store),
        routes: Some(routes),
        ..Dependencies::default()
    };
    let app = Application::build_with(settings, deps).await?;
    app.ensure_first_key().await?;
    let control = Control {
        app: app.state().clone(),
        next: Arc::new(AtomicU64::new(args.first_number)),
    };
    let listener = tokio::net::TcpListener::bind(&args.control)
        .await
        .context("binding the control port")?;
    println!("control on {}", listener.local_addr()?);
    let router = Router::new()
        .route("/prefill", post(prefill))
        .with_state(control);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(app)
}
