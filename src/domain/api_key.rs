//! API keys: random, shown once, stored only as a SHA-256 hash.

use std::fmt;

use base64::Engine;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// A key in clear. Exists only between creation and being printed once, and
/// while a request is authenticated.
pub struct ApiKey(String);

impl ApiKey {
    /// 192 random bits, URL-safe, with a prefix that secret scanners can match.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes)?;
        Ok(Self(format!(
            "otpd_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> [u8; 32] {
        hash_key(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

pub fn hash_key(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

/// Short, non-secret identifier used to list and revoke a key.
pub fn new_key_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes)?;
    Ok(format!("key_{}", hex::encode(bytes)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant: String,
    pub key_hash: [u8; 32],
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_stably() {
        let a = ApiKey::generate().unwrap();
        let b = ApiKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.hash(), hash_key(a.expose()));
        assert!(a.expose().len() >= 32);
    }
}
