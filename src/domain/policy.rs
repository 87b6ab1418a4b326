//! The rules a tenant's verifications follow: code length, lifetimes, limits,
//! country rules and the SMS-pumping guard's thresholds.

use serde::{Deserialize, Serialize};

use super::code::{MAX_CODE_LENGTH, MIN_CODE_LENGTH};

pub const MAX_TTL_SECONDS: u32 = 86_400;
pub const MIN_TTL_SECONDS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Sends to one number (any purpose or uid) per sliding 10 minutes; 0 = no limit.
    pub max_sends_per_number_10min: u32,
    /// Sends to one number per sliding 24 hours; 0 = no limit.
    pub max_sends_per_number_day: u32,
    /// Sends from one client address (an IPv6 /64) per sliding 10 minutes; 0 = no limit.
    pub max_sends_per_ip_10min: u32,
    /// Sends for the whole tenant per sliding minute; 0 = no limit.
    pub max_sends_per_tenant_minute: u32,
    /// Wrong codes per subject per sliding hour, across resends; 0 = no limit.
    pub max_wrong_guesses_per_hour: u32,
    /// ISO 3166-1 alpha-2 codes a number may belong to; empty = any country.
    pub allowed_countries: Vec<String>,
    /// ISO codes refused even when allowed.
    pub blocked_countries: Vec<String>,
    /// Sends stop for the rest of the UTC day once the day's message costs
    /// reach this, in the routes' one currency (`SmsRouter::budget_cost`);
    /// 0 = no budget.
    pub daily_spend_limit: f64,
    pub guard: GuardPolicy,
    /// When a delivery report says a pending verification's SMS failed, send a
    /// new code over the next route of the chain not yet used for it.
    pub resend_on_failed_delivery: bool,
}

/// The SMS-pumping guard: a number prefix (or a whole country) whose send
/// velocity is above its threshold while few of its codes are ever approved is
/// quarantined for a while.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardPolicy {
    pub enabled: bool,
    /// Digits after the country calling code that make a prefix (`+31` `651`).
    pub prefix_digits: u8,
    /// Sends per sliding hour to one prefix above which its conversion is judged; 0 = off.
    pub max_sends_per_prefix_hour: u32,
    /// The same for a whole country calling code; 0 = off.
    pub max_sends_per_country_hour: u32,
    /// Approved / sent below this, over the same hour, trips the guard.
    pub min_conversion: f64,
    /// How long a tripped prefix refuses sends (and how long a lifted one is
    /// spared before it can trip again).
    pub quarantine_seconds: u32,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix_digits: 3,
            max_sends_per_prefix_hour: 50,
            max_sends_per_country_hour: 500,
            min_conversion: 0.2,
            quarantine_seconds: 3_600,
        }
    }
}

pub const MAX_QUARANTINE_SECONDS: u32 = 30 * 86_400;

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
            max_sends_per_number_10min: 5,
            max_sends_per_number_day: 10,
            max_sends_per_ip_10min: 20,
            max_sends_per_tenant_minute: 0,
            max_wrong_guesses_per_hour: 10,
            allowed_countries: Vec::new(),
            blocked_countries: Vec::new(),
            daily_spend_limit: 0.0,
            guard: GuardPolicy::default(),
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
        )?;
        for (key, list) in [
            ("allowed_countries", &self.allowed_countries),
            ("blocked_countries", &self.blocked_countries),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()))
            {
                return Err(format!(
                    "{prefix}.{key}: {bad:?} is not an ISO 3166-1 alpha-2 code"
                ));
            }
        }
        check(
            self.daily_spend_limit.is_finite() && self.daily_spend_limit >= 0.0,
            "daily_spend_limit",
            "must be a non-negative number (0 = no budget)",
        )?;
        let g = &self.guard;
        check(
            g.prefix_digits <= 6,
            "guard.prefix_digits",
            "must be between 0 and 6",
        )?;
        check(
            (0.0..=1.0).contains(&g.min_conversion),
            "guard.min_conversion",
            "must be between 0 and 1",
        )?;
        check(
            (1..=MAX_QUARANTINE_SECONDS).contains(&g.quarantine_seconds),
            "guard.quarantine_seconds",
            &format!("must be between 1 and {MAX_QUARANTINE_SECONDS}"),
        )
    }

    /// Whether a number from `country` may receive codes under this policy.
    pub fn allows_country(&self, country: Option<&str>) -> bool {
        let listed = |list: &[String]| {
            country.is_some_and(|c| list.iter().any(|l| l.eq_ignore_ascii_case(c)))
        };
        (self.allowed_countries.is_empty() || listed(&self.allowed_countries))
            && !listed(&self.blocked_countries)
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
        let p = Policy {
            allowed_countries: vec!["NLD".into()],
            ..Policy::default()
        };
        let err = p.validate("policy").unwrap_err();
        assert!(
            err.starts_with("policy.allowed_countries") && err.contains("NLD"),
            "{err}"
        );
        let mut p = Policy::default();
        p.guard.min_conversion = 1.5;
        assert!(
            p.validate("policy")
                .unwrap_err()
                .starts_with("policy.guard.min_conversion")
        );
    }

    #[test]
    fn country_rules_allow_list_then_block_list() {
        let open = Policy::default();
        assert!(open.allows_country(Some("NL")) && open.allows_country(None));
        let nl_only = Policy {
            allowed_countries: vec!["nl".into()],
            ..Policy::default()
        };
        assert!(nl_only.allows_country(Some("NL")));
        assert!(!nl_only.allows_country(Some("UG")));
        assert!(
            !nl_only.allows_country(None),
            "no country is not on the list"
        );
        let no_ug = Policy {
            blocked_countries: vec!["UG".into()],
            ..Policy::default()
        };
        assert!(!no_ug.allows_country(Some("ug")) && no_ug.allows_country(Some("NL")));
    }
}
