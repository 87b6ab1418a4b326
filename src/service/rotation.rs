//! Phone-key rotation: re-encrypts the numbers of pending verifications that
//! are sealed under an older key with the current one (`otpd rotate-keys`).
//! Once it has run, the old key is needed only for verifications that ended
//! before it (whose numbers otpd never opens again) and sandbox messages
//! (which expire with their code).

use crate::crypto::Crypto;
use crate::store::{Store, StoreError};

const BATCH: u32 = 500;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Numbers now sealed under the current key.
    pub resealed: u64,
    /// Sealed under a key this configuration does not have: left as they are.
    pub unreadable: u64,
    /// Changed or ended while being rotated: nothing to do.
    pub raced: u64,
}

/// Walks every pending verification sealed under a key other than the current
/// one and reseals it. Safe to run while otpd serves: each record is replaced
/// only if it still holds what was read.
pub async fn rotate_phone_keys(
    store: &dyn Store,
    crypto: &Crypto,
) -> Result<RotationReport, StoreError> {
    let current = crypto.current_phone_key();
    let mut report = RotationReport::default();
    let mut after = None;
    loop {
        let batch = store
            .list_sealed_with_other_key(current, after, BATCH)
            .await?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        for record in batch {
            let Ok(phone) = crypto.open_phone(&record.phone) else {
                tracing::warn!(
                    verification_id = %record.id,
                    key_id = record.phone.key_id,
                    "cannot open a stored number: its key is not configured"
                );
                report.unreadable += 1;
                continue;
            };
            let resealed = crypto
                .seal_phone(&phone)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if store
                .reseal_phone(record.id, &record.phone, &resealed)
                .await?
            {
                report.resealed += 1;
            } else {
                report.raced += 1;
            }
        }
    }
    tracing::info!(
        target: "audit",
        event = "keys_rotated",
        current_key = current,
        resealed = report.resealed,
        unreadable = report.unreadable,
        raced = report.raced,
    );
    Ok(report)
}
