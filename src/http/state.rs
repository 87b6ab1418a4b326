//! What every handler can reach.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::client_ip::TrustedProxies;
use super::dlr::DlrEndpoints;
use crate::config::DialectSettings;
use crate::domain::{Dialect, Policy};
use crate::metrics::Metrics;
use crate::service::{ApiKeys, PolicySource, VerificationService};

/// Cloned for every request (by the router, the middleware and each `State`
/// extractor), so it is one reference count: cloning a struct of seven `Arc`s
/// cost seven contended atomic increments and decrements per clone.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> Self {
        Self(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

pub struct AppStateInner {
    pub service: Arc<VerificationService>,
    pub keys: Arc<ApiKeys>,
    pub policies: Arc<Policies>,
    pub max_body_bytes: usize,
    /// Pending verifications, refreshed by the housekeeping task (never a scan per request).
    pub pending_gauge: Arc<AtomicU64>,
    pub version: &'static str,
    /// This app's own metrics (see `crate::metrics` for why not a global recorder).
    pub metrics: Arc<Metrics>,
    /// Dialect settings besides their policies (which live in `policies`).
    pub dialects: Arc<DialectSettings>,
    /// Whether send answers carry the code (`debug_codes`); `GET /config` reports it.
    pub debug_codes: bool,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<TrustedProxies>,
    /// Delivery-report callback settings (secret, Twilio signing).
    pub dlr: Arc<DlrEndpoints>,
}

impl AppStateInner {
    pub fn pending_estimate(&self) -> u64 {
        self.pending_gauge.load(Ordering::Relaxed)
    }
}

/// Policies resolved once at start: the default, each configured tenant's, and
/// each seed-compatible dialect's, for tenants without overrides and for
/// each configured tenant (its own limits in the dialect's shape).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub default: Policy,
    pub tenants: HashMap<String, Policy>,
    pub bridgex: Policy,
    pub openlyne: Policy,
    pub tenant_bridgex: HashMap<String, Policy>,
    pub tenant_openlyne: HashMap<String, Policy>,
}

impl Policies {
    pub fn for_tenant(&self, tenant: &str) -> &Policy {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// What `tenant`'s requests through `dialect`'s API follow.
    pub fn of(&self, tenant: &str, dialect: Dialect) -> &Policy {
        match dialect {
            Dialect::Native => self.for_tenant(tenant),
            Dialect::Bridgex => self.tenant_bridgex.get(tenant).unwrap_or(&self.bridgex),
            Dialect::Openlyne => self.tenant_openlyne.get(tenant).unwrap_or(&self.openlyne),
        }
    }
}

impl PolicySource for Policies {
    fn policy_for(&self, tenant: &str, dialect: Dialect) -> &Policy {
        self.of(tenant, dialect)
    }
}
