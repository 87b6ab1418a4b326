//! Phone numbers: parsed against the real numbering plan, normalised to E.164,
//! masked for every place a person might read them.

use std::fmt;

/// A valid phone number in E.164 form. `Debug` is masked so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    country: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhoneError {
    #[error("phone number must contain only digits, with an optional leading '+'")]
    Characters,
    #[error("phone number must have 8 to 15 digits including the country code")]
    Length,
    #[error("phone number is not a valid number in its country's numbering plan")]
    NotValid,
}

impl PhoneNumber {
    /// Accepts `+256700123456`, `256700123456` (digits without `+` are read as
    /// international, as both seed services send them), `00256…`, and the same with
    /// spaces, dashes, dots or parentheses.
    pub fn parse(input: &str) -> Result<Self, PhoneError> {
        let cleaned: String = input
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
            .collect();
        let digits = cleaned
            .strip_prefix('+')
            .or_else(|| cleaned.strip_prefix("00"))
            .unwrap_or(&cleaned);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PhoneError::Characters);
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(PhoneError::Length);
        }
        let international = format!("+{digits}");
        let parsed = phonenumber::parse(None, &international).map_err(|_| PhoneError::NotValid)?;
        if !phonenumber::is_valid(&parsed) {
            return Err(PhoneError::NotValid);
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        let country = parsed.country().id().map(|id| format!("{id:?}"));
        Ok(Self { e164, country })
    }

    /// `+256700123456`.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    /// `256700123456`: what BridgeXAPI and the seed APIs use.
    pub fn digits(&self) -> &str {
        &self.e164[1..]
    }

    /// ISO 3166-1 alpha-2 region of the number, when the plan assigns one.
    pub fn country(&self) -> Option<&str> {
        self.country.as_deref()
    }

    /// `+********0670`: every digit but the last four hidden.
    pub fn masked(&self) -> String {
        format!("+{}", mask_digits(self.digits()))
    }

    /// A routing and abuse-tracking prefix that does not identify a person:
    /// the country code and up to three further digits.
    pub fn prefix(&self, len: usize) -> &str {
        let end = (1 + len).min(self.e164.len().saturating_sub(4)).max(1);
        &self.e164[..end]
    }
}

/// `*******0670`: all but the last four characters become `*`.
pub fn mask_digits(digits: &str) -> String {
    let keep = digits.len().min(4);
    let hidden = digits.len() - keep;
    let mut out = "*".repeat(hidden);
    out.push_str(&digits[hidden..]);
    out
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_numbers_without_plus_are_international() {
        let ug = PhoneNumber::parse("256700123456").unwrap();
        assert_eq!(ug.e164(), "+256700123456");
        assert_eq!(ug.country(), Some("UG"));
        let nl = PhoneNumber::parse("31651860670").unwrap();
        assert_eq!(nl.e164(), "+31651860670");
        assert_eq!(nl.country(), Some("NL"));
    }

    #[test]
    fn formatting_characters_and_00_prefix_are_accepted() {
        for input in ["+31 6 5186 0670", "0031-651-860-670", "(+31) 651.860.670"] {
            assert_eq!(PhoneNumber::parse(input).unwrap().e164(), "+31651860670");
        }
    }

    #[test]
    fn numbering_plan_is_checked_not_just_length() {
        // Right length, but +999 is not an assigned country code.
        assert_eq!(
            PhoneNumber::parse("+99912345678"),
            Err(PhoneError::NotValid)
        );
        assert_eq!(PhoneNumber::parse("+3165"), Err(PhoneError::Length));
        assert_eq!(PhoneNumber::parse("+31abc"), Err(PhoneError::Characters));
        assert_eq!(PhoneNumber::parse(""), Err(PhoneError::Characters));
    }

    #[test]
    fn masking_hides_all_but_last_four() {
        let nl = PhoneNumber::parse("31651860670").unwrap();
        assert_eq!(mask_digits(nl.digits()), "*******0670");
        assert_eq!(nl.masked(), "+*******0670");
        assert!(!format!("{nl:?}").contains("651860"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = PhoneNumber::parse(&s);
        }

        #[test]
        fn parsed_numbers_are_canonical(s in "\\+?[0-9 ]{8,20}") {
            if let Ok(p) = PhoneNumber::parse(&s) {
                prop_assert_eq!(PhoneNumber::parse(p.e164()).unwrap(), p.clone());
                prop_assert!(p.e164().starts_with('+'));
            }
        }
    }
}
