//! API keys: creation, listing, revocation, and request authentication with a
//! short-lived in-memory cache so auth is not a store round trip per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::clock::Clock;
use crate::domain::api_key::{hash_key, new_key_id};
use crate::domain::{ApiKey, ApiKeyRecord};
use crate::store::{Store, StoreError};

/// Past this many cached lookups (e.g. a flood of random keys) the cache is reset.
const MAX_CACHED: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct ApiKeys {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    /// key hash → (tenant if the key is active, when looked up)
    cache: DashMap<[u8; 32], (Option<Arc<str>>, Instant)>,
}

impl ApiKeys {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        Self {
            store,
            clock,
            ttl,
            cache: DashMap::new(),
        }
    }

    /// The tenant a presented key belongs to.
    pub async fn authenticate(&self, presented: &str) -> Result<Arc<str>, AuthError> {
        let hash = hash_key(presented);
        if let Some(entry) = self.cache.get(&hash)
            && entry.1.elapsed() < self.ttl
        {
            return entry.0.clone().ok_or(AuthError::Unauthorized);
        }
        let tenant: Option<Arc<str>> = self
            .store
            .find_api_key(&hash)
            .await?
            .filter(|k| k.revoked_at.is_none())
            .map(|k| Arc::from(k.tenant.as_str()));
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(hash, (tenant.clone(), Instant::now()));
        tenant.ok_or(AuthError::Unauthorized)
    }

    /// Creates a key for `tenant`; the returned key is the only copy in clear.
    pub async fn create(&self, tenant: &str) -> Result<(ApiKeyRecord, ApiKey), StoreError> {
        let random = |e: getrandom::Error| StoreError::Unavailable(format!("random source: {e}"));
        let key = ApiKey::generate().map_err(random)?;
        let record = ApiKeyRecord {
            id: new_key_id().map_err(random)?,
            tenant: tenant.to_owned(),
            key_hash: key.hash(),
            created_at: self.clock.now(),
            revoked_at: None,
        };
        self.store.insert_api_key(&record).await?;
        self.cache.remove(&record.key_hash);
        tracing::info!(target: "audit", event = "key_created", tenant, key_id = %record.id);
        Ok((record, key))
    }

    pub async fn list(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.store.list_api_keys().await
    }

    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let revoked = self.store.revoke_api_key(id, self.clock.now()).await?;
        // Other instances notice within the cache TTL; this one at once.
        self.cache.clear();
        tracing::info!(
            target: "audit",
            event = "key_revoked",
            key_id = id,
            outcome = if revoked { "revoked" } else { "not_found" },
        );
        Ok(revoked)
    }

    /// Whether any key exists (the first start creates one when none does).
    pub async fn any(&self) -> Result<bool, StoreError> {
        Ok(!self.store.list_api_keys().await?.is_empty())
    }
}
