//! The development provider.

use otpd::domain::DeliveryStatus;
use otpd::sms::ConsoleProvider;

use super::send;

#[tokio::test]
async fn console_accepts_every_message() {
    let receipt = send(&ConsoleProvider).await.unwrap();
    assert_eq!(receipt.status, Some(DeliveryStatus::Sent));
    assert!(receipt.provider_message_id.unwrap().starts_with("console-"));
}
