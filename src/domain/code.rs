//! One-time codes: generation from the OS CSPRNG and parsing of what users type.

use std::fmt;

/// Bounds on code length; a policy picks a length inside them.
pub const MIN_CODE_LENGTH: u8 = 4;
pub const MAX_CODE_LENGTH: u8 = 10;

/// A numeric code. `Debug` is redacted so a code cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("code must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits")]
    Invalid,
}

impl Code {
    /// Accepts what a user typed: surrounding whitespace is ignored, then digits only.
    pub fn parse(input: &str) -> Result<Self, CodeError> {
        let trimmed = input.trim();
        let len = trimmed.len();
        if !(MIN_CODE_LENGTH as usize..=MAX_CODE_LENGTH as usize).contains(&len)
            || !trimmed.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(CodeError::Invalid);
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(***)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomSourceError(String);

pub trait CodeGenerator: Send + Sync + 'static {
    fn generate(&self, length: u8) -> Result<Code, RandomSourceError>;
}

/// Uniform digits from the OS CSPRNG. Bytes ≥ 250 are rejected so that
/// `byte % 10` has no modulo bias.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsCodeGenerator;

impl CodeGenerator for OsCodeGenerator {
    fn generate(&self, length: u8) -> Result<Code, RandomSourceError> {
        let mut code = String::with_capacity(length as usize);
        let mut buf = [0u8; 16];
        while code.len() < length as usize {
            getrandom::fill(&mut buf).map_err(|e| RandomSourceError(e.to_string()))?;
            for digit in buf.iter().filter_map(|&b| digit_from_byte(b)) {
                if code.len() == length as usize {
                    break;
                }
                code.push(char::from(b'0' + digit));
            }
        }
        Ok(Code(code))
    }
}

/// 250 is the largest multiple of 10 that fits a byte: accepting only bytes below
/// it gives every digit exactly 25 preimages.
fn digit_from_byte(b: u8) -> Option<u8> {
    (b < 250).then_some(b % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_maps_to_each_digit_equally() {
        let mut counts = [0u32; 10];
        for b in 0..=255u8 {
            if let Some(d) = digit_from_byte(b) {
                counts[d as usize] += 1;
            }
        }
        assert_eq!(counts, [25; 10]);
    }
    use proptest::prelude::*;

    #[test]
    fn generated_codes_have_the_requested_length_and_only_digits() {
        for len in MIN_CODE_LENGTH..=MAX_CODE_LENGTH {
            let code = OsCodeGenerator.generate(len).unwrap();
            assert_eq!(code.expose().len(), len as usize);
            assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn debug_never_shows_the_code() {
        let code = Code::parse("123456").unwrap();
        assert!(!format!("{code:?}").contains("123456"));
    }

    proptest! {
        #[test]
        fn parse_accepts_exactly_trimmed_digit_strings(s in "\\PC{0,16}") {
            let t = s.trim();
            let ok = (4..=10).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit());
            prop_assert_eq!(Code::parse(&s).is_ok(), ok);
        }
    }
}
