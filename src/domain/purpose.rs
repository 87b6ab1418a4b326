//! What a code is for (`login`, `signup`, …): part of the subject a code belongs to.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Purpose(String);

pub const MAX_PURPOSE_LEN: usize = 50;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PurposeError {
    #[error("purpose must not be empty")]
    Empty,
    #[error("purpose must be at most {MAX_PURPOSE_LEN} characters")]
    TooLong,
    #[error("purpose must not contain control characters")]
    ControlCharacter,
}

impl Purpose {
    /// Trimmed and lower-cased, as the BridgeX seed does.
    pub fn parse(input: &str) -> Result<Self, PurposeError> {
        let p = input.trim().to_lowercase();
        if p.is_empty() {
            return Err(PurposeError::Empty);
        }
        if p.chars().count() > MAX_PURPOSE_LEN {
            return Err(PurposeError::TooLong);
        }
        if p.chars().any(char::is_control) {
            return Err(PurposeError::ControlCharacter);
        }
        Ok(Self(p))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Purpose {
    fn default() -> Self {
        Self("login".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_lowercases() {
        assert_eq!(Purpose::parse("  LogIn ").unwrap().as_str(), "login");
    }

    #[test]
    fn rejects_empty_long_and_control() {
        assert_eq!(Purpose::parse("   "), Err(PurposeError::Empty));
        assert_eq!(Purpose::parse(&"a".repeat(51)), Err(PurposeError::TooLong));
        assert_eq!(Purpose::parse("a\nb"), Err(PurposeError::ControlCharacter));
    }
}
