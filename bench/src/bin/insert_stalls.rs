//! The longest single delivery-record inserts into the memory store as it
//! grows: each insert holds the store's delivery-record lock, so its longest
//! ones are how long every concurrent send can be made to wait.
//!
//!     cargo run --release -p otpd-bench --bin insert-stalls [records]
//!
//! Inserts `records` (default 300000) records as a BridgeXAPI send leaves
//! them, on one thread, and prints the five longest inserts with the number of
//! records the store held at the time.

use std::time::{Duration, Instant};

use anyhow::Context;
use otpd::domain::{DeliveryStatus, MessageRecord};
use otpd::store::{MemoryStore, Store};
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let records: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("records: a whole number")?,
        None => 300_000,
    };
    let store = MemoryStore::new();
    let now = chrono::Utc::now();
    let mut longest: Vec<(Duration, u32)> = Vec::new();
    for held in 0..records {
        let record = MessageRecord {
            id: Uuid::now_v7(),
            verification_id: Uuid::now_v7(),
            tenant: "default".into(),
            route_id: 1,
            provider: "bridgexapi".into(),
            provider_message_id: Some(format!("bx-{}", Uuid::new_v4())),
            masked_to: "+*******0670".into(),
            country: Some("NL".into()),
            status: DeliveryStatus::Sent,
            error: None,
            cost: None,
            currency: None,
            latency_ms: 1,
            resend_of: None,
            created_at: now,
            sent_at: Some(now),
            delivered_at: None,
            failed_at: None,
            updated_at: now,
        };
        let started = Instant::now();
        store.insert_message(&record, None).await?;
        longest.push((started.elapsed(), held));
        if longest.len() > 64 {
            longest.sort_unstable_by(|a, b| b.cmp(a));
            longest.truncate(5);
        }
    }
    longest.sort_unstable_by(|a, b| b.cmp(a));
    println!("longest of {records} delivery-record inserts (memory store):");
    for (took, held) in longest.iter().take(5) {
        println!(
            "  {:>8.3} ms with {held} records held",
            took.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
