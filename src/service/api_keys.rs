//! API keys: creation, listing, revocation, and request authentication with a
//! short-lived in-memory cache so auth is not a store round trip per request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::clock::Clock;
use crate::domain::api_key::{hash_key, new_key_id};
use crate::domain::{ApiKey, ApiKeyRecord};
use crate::store::{Store, StoreError};

/// Past this many remembered unknown keys (a flood of made-up ones) that
/// memory is reset; keys that authenticated are kept apart, so a flood never
/// sends real callers back to the store.
const MAX_UNKNOWN: usize = 100_000;

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
    /// Active keys: hash → (tenant, when looked up). Only real keys get here.
    known: DashMap<[u8; 32], (Arc<str>, Instant)>,
    /// Keys the store does not know (or revoked): hash → when looked up.
    unknown: DashMap<[u8; 32], Instant>,
}

impl ApiKeys {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        Self {
            store,
            clock,
            ttl,
            known: DashMap::new(),
            unknown: DashMap::new(),
        }
    }

    /// The tenant a presented key belongs to.
    pub async fn authenticate(&self, presented: &str) -> Result<Arc<str>, AuthError> {
        let hash = hash_key(presented);
        if let Some(entry) = self.known.get(&hash)
            && entry.1.elapsed() < self.ttl
        {
            return Ok(entry.0.clone());
        }
        if let Some(at) = self.unknown.get(&hash)
            && at.elapsed() < self.ttl
        {
            return Err(AuthError::Unauthorized);
        }
        let tenant: Option<Arc<str>> = self
            .store
            .find_api_key(&hash)
            .await?
            .filter(|k| k.revoked_at.is_none())
            .map(|k| Arc::from(k.tenant.as_str()));
        match tenant {
            Some(tenant) => {
                self.unknown.remove(&hash);
                self.known.insert(hash, (tenant.clone(), Instant::now()));
                Ok(tenant)
            }
            None => {
                self.known.remove(&hash);
                if self.unknown.len() >= MAX_UNKNOWN {
                    self.unknown.clear();
                }
                self.unknown.insert(hash, Instant::now());
                Err(AuthError::Unauthorized)
            }
        }
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
        self.unknown.remove(&record.key_hash);
        tracing::info!(target: "audit", event = "key_created", tenant, key_id = %record.id);
        Ok((record, key))
    }

    pub async fn list(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.store.list_api_keys().await
    }

    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let revoked = self.store.revoke_api_key(id, self.clock.now()).await?;
        // Other instances notice within the cache TTL; this one at once.
        self.known.clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn a_flood_of_made_up_keys_never_evicts_a_real_one() {
        let keys = ApiKeys::new(
            Arc::new(MemoryStore::new()),
            Arc::new(SystemClock),
            Duration::from_secs(60),
        );
        let (_, key) = keys.create("acme").await.unwrap();
        assert_eq!(&*keys.authenticate(key.expose()).await.unwrap(), "acme");
        for i in 0..MAX_UNKNOWN + 10 {
            let made_up = format!("otpd_made_up_{i}");
            assert!(keys.authenticate(&made_up).await.is_err());
        }
        assert!(keys.unknown.len() <= MAX_UNKNOWN);
        assert!(
            keys.known.contains_key(&hash_key(key.expose())),
            "the real key is still known, without a store lookup"
        );
        // Revoking it works at once on this instance.
        let listed = keys.list().await.unwrap();
        assert!(keys.revoke(&listed[0].id).await.unwrap());
        assert!(keys.authenticate(key.expose()).await.is_err());
    }
}
