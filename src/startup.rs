//! Wiring: settings → store, keys, router, service → an HTTP server with its
//! background housekeeping, started and stopped as one `Application`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::crypto::{Crypto, KeyMaterial};
use crate::domain::{CodeGenerator, OsCodeGenerator, Policy};
use crate::http::client_ip::TrustedProxies;
use crate::http::dlr::DlrEndpoints;
use crate::http::{self, AppState, AppStateInner, Policies};
use crate::metrics::{InstrumentedStore, Metrics};
use crate::service::dlr_poller::{DlrPoller, PollSettings};
use crate::service::{ApiKeys, VerificationService};
use crate::sms::config::ProviderSettings;
use crate::sms::router::SANDBOX_ROUTE_ID;
use crate::sms::{
    BridgexProvider, Route, RouteSettings, SandboxProvider, SmsProvider, SmsRouter, build_routes,
    http_client,
};
use crate::store::{self, DynStore};

/// How long shutdown waits for the store to release its connections.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Replaceable parts; tests swap the clock or the store.
pub struct Dependencies {
    pub clock: Arc<dyn Clock>,
    pub codes: Arc<dyn CodeGenerator>,
    /// When set, used instead of connecting to `store.url`.
    pub store: Option<DynStore>,
    /// When set, the routes to deliver over (tests inject fake providers).
    pub routes: Option<Vec<Route>>,
}

impl Default for Dependencies {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            codes: Arc::new(OsCodeGenerator),
            store: None,
            routes: None,
        }
    }
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    settings: Settings,
    store: DynStore,
    clock: Arc<dyn Clock>,
    poller: Arc<DlrPoller>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with(settings, Dependencies::default()).await
    }

    pub async fn build_with(settings: Settings, deps: Dependencies) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new(&settings.metrics)?);
        let store = match deps.store {
            Some(s) => s,
            None => open_store(&settings).await?,
        };
        let store = InstrumentedStore::wrap(store, metrics.clone());
        let crypto = Arc::new(load_crypto(&settings)?);
        let sandbox: Arc<dyn SmsProvider> = Arc::new(SandboxProvider::new(
            store.clone(),
            crypto.clone(),
            deps.clock.clone(),
        ));
        let http = http_client(
            settings.routing.connect_timeout(),
            settings.routing.timeout(),
        )
        .map_err(anyhow::Error::msg)?;
        let route_settings = with_status_callbacks(&settings);
        let routes = match deps.routes {
            Some(routes) => routes,
            None => build_routes(&route_settings, &settings.routing, &http, sandbox.clone())
                .map_err(anyhow::Error::msg)?,
        };
        let router = Arc::new(
            SmsRouter::new(
                routes,
                Route::new(SANDBOX_ROUTE_ID, sandbox),
                &settings.routing,
                deps.clock.clone(),
            )
            .with_default_chain(settings.policy.routes.clone()),
        );
        let service = Arc::new(
            VerificationService::new(
                store.clone(),
                router,
                deps.clock.clone(),
                deps.codes,
                crypto,
                settings.debug_codes,
            )
            .with_metrics(metrics.clone()),
        );
        let keys = Arc::new(ApiKeys::new(
            store.clone(),
            deps.clock.clone(),
            Duration::from_secs(settings.auth.cache_seconds),
        ));
        // A policy's `routes` reaches the router as the tenant's own chain, so it
        // holds only what the tenant set itself; the global chain is the router's
        // default, after per-country chains.
        let mut policies = Policies {
            default: Policy {
                routes: Vec::new(),
                ..settings.policy.clone()
            },
            bridgex: settings.bridgex_policy(None)?,
            openlyne: settings.openlyne_policy(None)?,
            ..Policies::default()
        };
        for name in settings.tenants.keys() {
            let mut policy = settings.tenant_policy(name)?;
            policy.routes = settings.tenant_chain(name).unwrap_or_default();
            policies.tenants.insert(name.clone(), policy);
            policies
                .tenant_bridgex
                .insert(name.clone(), settings.bridgex_policy(Some(name))?);
            policies
                .tenant_openlyne
                .insert(name.clone(), settings.openlyne_policy(Some(name))?);
        }
        let policies = Arc::new(policies);
        let poller = Arc::new(DlrPoller::new(
            service.clone(),
            policies.clone(),
            bridgex_pollers(&settings, &http)?,
            PollSettings {
                interval: Duration::from_secs(settings.dlr.poll_interval_seconds),
                max_age: chrono::Duration::seconds(
                    i64::try_from(settings.dlr.poll_max_age_seconds).unwrap_or(i64::MAX),
                ),
                batch: settings.dlr.poll_batch,
            },
        ));
        let state = AppState::new(AppStateInner {
            service,
            keys,
            policies,
            max_body_bytes: settings.server.max_body_bytes,
            pending_gauge: Arc::new(AtomicU64::new(0)),
            version: env!("CARGO_PKG_VERSION"),
            metrics,
            dialects: Arc::new(settings.dialects.clone()),
            debug_codes: settings.debug_codes,
            trusted_proxies: Arc::new(
                TrustedProxies::parse(&settings.server.trusted_proxies)
                    .map_err(|e| anyhow::anyhow!("server.trusted_proxies: {e}"))?,
            ),
            dlr: Arc::new(dlr_endpoints(&settings, &route_settings)),
        });
        let addr = settings.listen_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("server.listen: cannot bind {addr}"))?;
        Ok(Self {
            listener,
            state,
            settings,
            store,
            clock: deps.clock,
            poller,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The BridgeXAPI delivery-report poller (`run_until` runs it in the
    /// background; tests call `poll_once` themselves).
    pub fn dlr_poller(&self) -> Arc<DlrPoller> {
        self.poller.clone()
    }

    /// Creates the first API key (tenant `default`) when the store has none and
    /// prints it once on stdout.
    pub async fn ensure_first_key(&self) -> anyhow::Result<()> {
        if self.state.keys.any().await? {
            return Ok(());
        }
        let (record, key) = self.state.keys.create("default").await?;
        tracing::info!(key_id = %record.id, tenant = %record.tenant, "created the first API key");
        let mut out = std::io::stdout().lock();
        writeln!(out, "API key: {}", key.expose())?;
        out.flush()?;
        Ok(())
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        // Registered before the first request can arrive, so an early SIGTERM
        // still drains instead of killing the process.
        let signal = shutdown_signal()?;
        self.run_until(signal).await
    }

    /// `run_until_stopped` on `runtime`, for a binary that builds its own: the
    /// server's code is then compiled once, into this library, and not again
    /// into that binary (as awaiting it there would).
    pub fn block_until_stopped(self, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        runtime.block_on(self.run_until_stopped())
    }

    /// Serves until `shutdown` completes, then: stops accepting connections,
    /// lets in-flight requests finish for up to `server.shutdown_grace_seconds`,
    /// stops the background tasks and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let housekeeping = spawn_housekeeping(
            self.store.clone(),
            self.clock.clone(),
            self.state.pending_gauge.clone(),
            &self.settings,
            stop_rx.clone(),
        );
        let poller = self
            .poller
            .has_routes()
            .then(|| self.poller.clone().spawn(stop_rx.clone()));
        let upkeep = self.state.metrics.spawn_upkeep(stop_rx);
        let app = http::router(
            self.state.clone(),
            Duration::from_secs(self.settings.server.request_timeout_seconds),
        );
        let grace = Duration::from_secs(self.settings.server.shutdown_grace_seconds);
        let (signalled_tx, mut signalled_rx) = watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = signalled_tx.send(true);
        };
        let deadline = async move {
            if signalled_rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        };
        tracing::info!(addr = %self.listener.local_addr()?, "otpd listening");
        // The peer address is the client's, or a trusted proxy's (`ClientIp`).
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let server = axum::serve(self.listener, app).with_graceful_shutdown(shutdown);
        tokio::select! {
            served = server.into_future() => served?,
            _ = deadline => tracing::warn!(
                grace_seconds = grace.as_secs(),
                "shutdown grace period over; dropping the requests still in flight"
            ),
        }
        let _ = stop_tx.send(true);
        let _ = housekeeping.await;
        if let Some(poller) = poller {
            let _ = poller.await;
        }
        if let Some(upkeep) = upkeep {
            let _ = upkeep.await;
        }
        // Closing a pool waits for checked-out connections; a request dropped at
        // the deadline may still hold one, so this wait is bounded too.
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, self.store.close())
            .await
            .is_err()
        {
            tracing::warn!("the store did not close in time; exiting anyway");
        }
        tracing::info!("otpd stopped");
        Ok(())
    }
}

pub async fn open_store(settings: &Settings) -> anyhow::Result<DynStore> {
    let url = settings.store_url();
    let sqlite = store::SqliteOptions {
        synchronous_full: settings.store.sqlite_synchronous_full,
        ..store::SqliteOptions::default()
    };
    let store = store::connect_with(&url, &sqlite)
        .await
        .with_context(|| format!("store.url: cannot open {}", crate::config::redact_url(&url)))?;
    // Network stores get a hard time bound per operation; local ones cannot stall that way.
    let networked = !(url.starts_with("memory://") || url.starts_with("sqlite://"));
    Ok(if networked {
        let limit = Duration::from_millis(settings.store.operation_timeout_ms);
        Arc::new(store::bounded::Bounded::new(store, limit))
    } else {
        store
    })
}

/// Key material from config, or from `{data_dir}/secret.key`, generated on first start.
pub fn load_crypto(settings: &Settings) -> anyhow::Result<Crypto> {
    let master = match &settings.secrets.master_key {
        Some(k) => k.expose_secret().as_bytes().to_vec(),
        None => load_or_create_secret_file(&settings.data_dir.join("secret.key"))?,
    };
    let mut phone_keys = BTreeMap::new();
    for (id, key) in &settings.secrets.phone_keys {
        let id: u32 = id
            .parse()
            .with_context(|| format!("secrets.phone_keys.{id}: key ids must be numbers"))?;
        phone_keys.insert(id, key.expose_secret().as_bytes().to_vec());
    }
    let material = KeyMaterial {
        master,
        code_key: settings
            .secrets
            .code_key
            .as_ref()
            .map(|k| k.expose_secret().as_bytes().to_vec()),
        phone_keys,
        current_phone_key: settings.secrets.current_phone_key,
    };
    Crypto::new(&material).map_err(anyhow::Error::msg)
}

fn load_or_create_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            return hex::decode(text.trim())
                .with_context(|| format!("{}: not a hex secret", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(hex::encode(secret).as_bytes())?;
    file.sync_all()?;
    tracing::warn!(
        path = %path.display(),
        "no secrets.master_key configured: generated a server secret; keep this file (losing it invalidates pending codes and stored numbers)"
    );
    Ok(secret.to_vec())
}

const MAX_PURGE_ROUNDS_PER_TICK: usize = 20;

/// The routes' settings, with Twilio routes that set no `status_callback` given
/// otpd's own callback URL when `dlr.secret` and `dlr.public_base_url` are set.
fn with_status_callbacks(settings: &Settings) -> Vec<RouteSettings> {
    let mut routes = settings.routes.clone();
    if let Some(url) = settings.dlr.callback_url("twilio") {
        for route in &mut routes {
            if let ProviderSettings::Twilio(t) = &mut route.provider
                && t.status_callback.is_none()
            {
                t.status_callback = Some(SecretString::from(url.clone()));
            }
        }
    }
    routes
}

/// One BridgeXAPI client per BridgeXAPI route, for polling delivery reports.
fn bridgex_pollers(
    settings: &Settings,
    http: &reqwest::Client,
) -> anyhow::Result<BTreeMap<u32, BridgexProvider>> {
    let mut clients = BTreeMap::new();
    for (index, route) in settings.routes.iter().enumerate() {
        if let ProviderSettings::Bridgexapi(s) = &route.provider {
            let timeout =
                Duration::from_millis(route.timeout_ms.unwrap_or(settings.routing.timeout_ms));
            let client = BridgexProvider::new(s, http.clone(), timeout)
                .map_err(|e| anyhow::anyhow!("routes[{index}]: {e}"))?;
            clients.insert(route.id, client);
        }
    }
    Ok(clients)
}

fn dlr_endpoints(settings: &Settings, routes: &[RouteSettings]) -> DlrEndpoints {
    let mut endpoints = DlrEndpoints {
        secret: settings.dlr.secret.clone(),
        public_base_url: settings
            .dlr
            .public_base_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_owned()),
        ..DlrEndpoints::default()
    };
    for route in routes {
        if let ProviderSettings::Twilio(t) = &route.provider {
            endpoints.twilio_auth_tokens.extend(t.auth_token.clone());
            endpoints
                .twilio_callback_urls
                .extend(t.status_callback.clone());
        }
    }
    endpoints
}

fn spawn_housekeeping(
    store: DynStore,
    clock: Arc<dyn Clock>,
    pending: Arc<AtomicU64>,
    settings: &Settings,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let interval = Duration::from_secs(settings.store.purge_interval_seconds);
    let batch = settings.store.purge_batch;
    let keep_messages = chrono::Duration::days(settings.retention.message_days.into());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = clock.now();
            // Keep going while batches come back full, so a backlog drains, but
            // bounded so one tick never monopolises the store.
            for _ in 0..MAX_PURGE_ROUNDS_PER_TICK {
                match store.purge_expired(now, batch).await {
                    Ok(n) if n >= u64::from(batch) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "purge failed");
                        break;
                    }
                }
            }
            // Delivery records past retention, likewise in bounded batches.
            for _ in 0..MAX_PURGE_ROUNDS_PER_TICK {
                match store.purge_messages(now - keep_messages, batch).await {
                    Ok(n) if n >= u64::from(batch) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "message retention purge failed");
                        break;
                    }
                }
            }
            match store.count_pending(now).await {
                Ok(n) => pending.store(n, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "could not count pending verifications"),
            }
        }
    })
}

/// Completes on the first SIGTERM or SIGINT. The handlers are installed when
/// this is called, not when the future is first polled.
#[cfg(unix)]
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown signal received; draining");
    })
}

#[cfg(not(unix))]
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "ctrl-c", "shutdown signal received; draining");
    })
}
