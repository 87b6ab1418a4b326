//! The rules a tenant's verifications follow: code length, lifetimes and limits.

use serde::{Deserialize, Serialize};

use super::code::{MAX_CODE_LENGTH, MIN_CODE_LENGTH};

pub const MAX_TTL_SECONDS: u32 = 86_400;
pub const MIN_TTL_SECONDS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub code_length: u8,
    pub ttl_seconds: u32,
    /// Upper bound for a per-request `ttl_seconds`.
    pub max_ttl_seconds: u32,
    pub cooldown_seconds: u32,
    pub max_attempts: u32,
    pub max_sends_per_window: u32,
    pub send_window_seconds: u32,
    /// The failover chain of route ids; empty means every configured route.
    pub routes: Vec<u32>,
    /// When a delivery report says a pending verification's SMS failed, send a
    /// new code over the next route of the chain not yet used for it.
    pub resend_on_failed_delivery: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            code_length: 6,
            ttl_seconds: 300,
            max_ttl_seconds: 3_600,
            cooldown_seconds: 30,
            max_attempts: 5,
            max_sends_per_window: 5,
            send_window_seconds: 600,
            routes: Vec::new(),
            resend_on_failed_delivery: true,
        }
    }
}

impl Policy {
    /// Checks every bound; the error names the offending key under `prefix`
    /// (e.g. `tenants.acme.policy.ttl_seconds`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        let check = |ok: bool, key: &str, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{prefix}.{key}: {rule}"))
            }
        };
        check(
            (MIN_CODE_LENGTH..=MAX_CODE_LENGTH).contains(&self.code_length),
            "code_length",
            &format!("must be between {MIN_CODE_LENGTH} and {MAX_CODE_LENGTH}"),
        )?;
        check(
            (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&self.ttl_seconds),
            "ttl_seconds",
            &format!("must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}"),
        )?;
        check(
            (self.ttl_seconds..=MAX_TTL_SECONDS).contains(&self.max_ttl_seconds),
            "max_ttl_seconds",
            &format!("must be between ttl_seconds and {MAX_TTL_SECONDS}"),
        )?;
        check(
            self.cooldown_seconds <= MAX_TTL_SECONDS,
            "cooldown_seconds",
            &format!("must be at most {MAX_TTL_SECONDS}"),
        )?;
        check(
            (1..=100).contains(&self.max_attempts),
            "max_attempts",
            "must be between 1 and 100",
        )?;
        check(
            self.max_sends_per_window >= 1,
            "max_sends_per_window",
            "must be at least 1",
        )?;
        check(
            (1..=MAX_TTL_SECONDS).contains(&self.send_window_seconds),
            "send_window_seconds",
            &format!("must be between 1 and {MAX_TTL_SECONDS}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Policy::default().validate("policy"), Ok(()));
    }

    #[test]
    fn errors_name_the_key_and_range() {
        let p = Policy {
            code_length: 3,
            ..Policy::default()
        };
        let err = p.validate("policy").unwrap_err();
        assert!(err.starts_with("policy.code_length"), "{err}");
        assert!(err.contains("4 and 10"), "{err}");
        let p = Policy {
            max_attempts: 0,
            ..Policy::default()
        };
        assert!(
            p.validate("tenants.a.policy")
                .unwrap_err()
                .starts_with("tenants.a.policy.max_attempts")
        );
    }
}
