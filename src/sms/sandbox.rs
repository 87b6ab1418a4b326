//! The built-in provider: messages land in the calling tenant's in-app inbox
//! (`GET /v1/sandbox/messages`); nothing leaves the machine.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Duration;
use uuid::Uuid;

use super::{OutgoingSms, ProviderError, ProviderErrorKind, SendReceipt, SmsProvider};
use crate::clock::Clock;
use crate::crypto::Crypto;
use crate::domain::DeliveryStatus;
use crate::store::{InboxEntry, Store};

pub struct SandboxProvider {
    store: Arc<dyn Store>,
    crypto: Arc<Crypto>,
    clock: Arc<dyn Clock>,
}

impl SandboxProvider {
    pub fn new(store: Arc<dyn Store>, crypto: Arc<Crypto>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            crypto,
            clock,
        }
    }
}

#[async_trait]
impl SmsProvider for SandboxProvider {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let now = self.clock.now();
        let sealed_body = self
            .crypto
            .seal(sms.body.as_bytes())
            .map_err(|e| ProviderError::new(ProviderErrorKind::Unavailable, e.to_string()))?;
        let ttl = Duration::from_std(sms.ttl).unwrap_or(Duration::minutes(5));
        let entry = InboxEntry {
            id: Uuid::new_v4(),
            tenant: sms.tenant.to_owned(),
            phone_index: self.crypto.phone_index(sms.tenant, sms.to),
            masked_to: sms.to.masked(),
            sealed_body,
            created_at: now,
            expires_at: now + ttl,
        };
        self.store
            .push_inbox(&entry)
            .await
            .map_err(|e| ProviderError::new(ProviderErrorKind::Unavailable, e.to_string()))?;
        Ok(SendReceipt {
            provider_message_id: Some(format!("sandbox-{}", entry.id.simple())),
            status: Some(DeliveryStatus::Delivered),
            ..SendReceipt::default()
        })
    }
}
