//! The longest single writes into the memory store as it grows: each holds a
//! lock of the store's (the delivery records', or a counter shard's), so its
//! longest ones are how long concurrent sends can be made to wait.
//!
//!     cargo run --release -p otpd-bench-embedded --bin insert-stalls [records]
//!
//! Inserts `records` (default 300000) delivery records as a BridgeXAPI send
//! leaves them, then counts as many numbers' sends in their two windows (10
//! minutes and a day, as the abuse limits do), on one thread, and prints the
//! five longest of each with how much the store held at the time.

use std::time::{Duration, Instant};

use anyhow::Context;
use otpd::domain::{DeliveryStatus, MessageRecord};
use otpd::store::{CounterAdd, MemoryStore, Store};
use uuid::Uuid;

/// The longest calls seen so far, with what the store held before each.
#[derive(Default)]
struct Longest(Vec<(Duration, u32)>);

impl Longest {
    fn add(&mut self, took: Duration, held: u32) {
        self.0.push((took, held));
        if self.0.len() > 64 {
            self.keep(5);
        }
    }

    fn keep(&mut self, n: usize) {
        self.0.sort_unstable_by(|a, b| b.cmp(a));
        self.0.truncate(n);
    }

    fn print(mut self, what: &str, unit: &str) {
        self.keep(5);
        println!("longest {what}:");
        for (took, held) in &self.0 {
            println!(
                "  {:>8.3} ms with {held} {unit} held",
                took.as_secs_f64() * 1000.0
            );
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let records: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("records: a whole number")?,
        None => 300_000,
    };
    let store = MemoryStore::new();
    let now = chrono::Utc::now();

    let mut longest = Longest::default();
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
        longest.add(started.elapsed(), held);
    }
    longest.print(&format!("of {records} delivery-record inserts"), "records");

    let mut longest = Longest::default();
    for number in 0..records {
        let key = format!("num:{number:064x}");
        let adds = [600, 86_400].map(|window_seconds| CounterAdd {
            key: key.clone(),
            amount: 1,
            window_seconds,
            ceiling: None,
        });
        let started = Instant::now();
        store.add_counters(&adds, now).await?;
        longest.add(started.elapsed(), 2 * number);
    }
    longest.print(&format!("of {records} numbers' counter adds"), "counters");
    Ok(())
}
