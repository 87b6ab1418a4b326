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
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::crypto::{Crypto, KeyMaterial};
use crate::domain::{CodeGenerator, OsCodeGenerator, Policy};
use crate::http::client_ip::TrustedProxies;
use crate::http::{self, AppState, Policies};
use crate::service::{ApiKeys, VerificationService};
use crate::sms::router::SANDBOX_ROUTE_ID;
use crate::sms::{Route, SandboxProvider, SmsProvider, SmsRouter, build_routes, http_client};
use crate::store::{self, DynStore};

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
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with(settings, Dependencies::default()).await
    }

    pub async fn build_with(settings: Settings, deps: Dependencies) -> anyhow::Result<Self> {
        let store = match deps.store {
            Some(s) => s,
            None => open_store(&settings).await?,
        };
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
        let routes = match deps.routes {
            Some(routes) => routes,
            None => build_routes(&settings.routes, &settings.routing, &http, sandbox.clone())
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
        let service = Arc::new(VerificationService::new(
            store.clone(),
            router,
            deps.clock.clone(),
            deps.codes,
            crypto,
            settings.debug_codes,
        ));
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
            bridgex: settings.bridgex_policy()?,
            openlyne: settings.openlyne_policy()?,
            ..Policies::default()
        };
        for name in settings.tenants.keys() {
            let mut policy = settings.tenant_policy(name)?;
            policy.routes = settings.tenant_chain(name).unwrap_or_default();
            policies.tenants.insert(name.clone(), policy);
        }
        let state = AppState {
            service,
            keys,
            policies: Arc::new(policies),
            max_body_bytes: settings.server.max_body_bytes,
            pending_gauge: Arc::new(AtomicU64::new(0)),
            version: env!("CARGO_PKG_VERSION"),
            dialects: Arc::new(settings.dialects.clone()),
            debug_codes: settings.debug_codes,
            trusted_proxies: Arc::new(
                TrustedProxies::parse(&settings.server.trusted_proxies)
                    .map_err(|e| anyhow::anyhow!("server.trusted_proxies: {e}"))?,
            ),
        };
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
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
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
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then drains in-flight requests and
    /// stops the background tasks.
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
            stop_rx,
        );
        let app = http::router(
            self.state.clone(),
            Duration::from_secs(self.settings.server.request_timeout_seconds),
        );
        tracing::info!(addr = %self.listener.local_addr()?, "otpd listening");
        // The peer address is the client's, or a trusted proxy's (`ClientIp`).
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        let _ = stop_tx.send(true);
        let _ = housekeeping.await;
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

fn spawn_housekeeping(
    store: DynStore,
    clock: Arc<dyn Clock>,
    pending: Arc<AtomicU64>,
    settings: &Settings,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let interval = Duration::from_secs(settings.store.purge_interval_seconds);
    let batch = settings.store.purge_batch;
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
            match store.count_pending(now).await {
                Ok(n) => pending.store(n, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "could not count pending verifications"),
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}
