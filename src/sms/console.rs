//! Local development: "sends" by writing one masked log line. The body is never
//! logged (it holds the code); read codes from the sandbox inbox or debug codes.

use async_trait::async_trait;
use uuid::Uuid;

use super::{OutgoingSms, ProviderError, SendReceipt, SmsProvider};
use crate::domain::DeliveryStatus;

#[derive(Debug, Default, Clone, Copy)]
pub struct ConsoleProvider;

#[async_trait]
impl SmsProvider for ConsoleProvider {
    fn name(&self) -> &'static str {
        "console"
    }

    async fn send(&self, sms: &OutgoingSms<'_>) -> Result<SendReceipt, ProviderError> {
        let id = format!("console-{}", Uuid::new_v4().simple());
        tracing::info!(
            route_id = sms.route_id,
            to = %sms.to.masked(),
            verification_id = %sms.verification_id,
            characters = sms.body.chars().count(),
            message_id = %id,
            "console provider: SMS not sent (development only)"
        );
        Ok(SendReceipt {
            provider_message_id: Some(id),
            status: Some(DeliveryStatus::Sent),
            ..SendReceipt::default()
        })
    }
}
