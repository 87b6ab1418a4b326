//! Phone numbers: parsed against the real numbering plan, normalised to E.164,
//! masked for every place a person might read them.

use std::fmt;

/// A valid phone number in E.164 form. `Debug` is masked so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    country: Option<String>,
    /// Digits of the E.164 country calling code (`31`, `256`, `1`).
    calling_code_len: usize,
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
        Self::parse_checked(input, true)
    }

    fn parse_checked(input: &str, validate: bool) -> Result<Self, PhoneError> {
        TypedNumber::parse(input)?.normalise_checked(validate)
    }

    /// A number this service parsed before and stored (sealed) with its
    /// country: only the calling code is looked up again. Calling codes are
    /// prefix-free, so the one known prefix of 1–3 digits is it. Skips the
    /// numbering plan's patterns, which cost more than the rest of an approval.
    pub fn from_stored(e164: &str, country: Option<&str>) -> Option<Self> {
        let digits = e164.strip_prefix('+')?;
        if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let calling_code_len = (1..=3).find(|&len| {
            digits[..len]
                .parse::<u16>()
                .is_ok_and(|code| phonenumber::metadata::DATABASE.by_code(&code).is_some())
        })?;
        Some(Self {
            e164: e164.to_owned(),
            country: country.map(str::to_owned),
            calling_code_len,
        })
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

    /// `+31`: the E.164 country calling code.
    pub fn calling_code(&self) -> &str {
        &self.e164[..1 + self.calling_code_len]
    }

    /// An abuse-tracking prefix that does not identify a person: the calling
    /// code and up to `digits` further digits, never reaching into the last
    /// four (`+31651` for `+31651860670` with 3).
    pub fn prefix(&self, digits: usize) -> &str {
        let national = self.e164.len() - 1 - self.calling_code_len;
        let extra = digits.min(national.saturating_sub(4));
        &self.e164[..1 + self.calling_code_len + extra]
    }
}

/// A number as a caller typed it to look something up: cleaned (`+` or
/// `00`, spaces, dashes, dots, parentheses) and checked for shape only.
///
/// Callers mostly type the number in the E.164 form it was sent to, so a
/// lookup tries that form first; `normalise` reads it as `parse` would,
/// without the numbering plan's validity test (a number that fails it was
/// never sent to), for the lookups that find nothing under the typed form.
#[derive(Clone, PartialEq, Eq)]
pub struct TypedNumber {
    e164: String,
}

impl TypedNumber {
    pub fn parse(input: &str) -> Result<Self, PhoneError> {
        // `+` and the cleaned input, then without the input's own `+` or `00`.
        let mut e164 = String::with_capacity(input.len() + 1);
        e164.push('+');
        e164.extend(
            input
                .trim()
                .chars()
                .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')')),
        );
        let cleaned = &e164[1..];
        let own_prefix = if cleaned.starts_with('+') {
            1
        } else if cleaned.starts_with("00") {
            2
        } else {
            0
        };
        e164.drain(1..1 + own_prefix);
        let digits = &e164[1..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PhoneError::Characters);
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(PhoneError::Length);
        }
        Ok(Self { e164 })
    }

    /// `+` and the digits as typed.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    /// `+********0670`, as `PhoneNumber::masked`.
    pub fn masked(&self) -> String {
        format!("+{}", mask_digits(&self.e164[1..]))
    }

    /// The number as `PhoneNumber::parse` reads it, without the validity test.
    pub fn normalise(&self) -> Result<PhoneNumber, PhoneError> {
        self.normalise_checked(false)
    }

    fn normalise_checked(&self, validate: bool) -> Result<PhoneNumber, PhoneError> {
        let parsed = phonenumber::parse(None, &self.e164).map_err(|_| PhoneError::NotValid)?;
        if validate && !in_numbering_plan(&parsed) {
            return Err(PhoneError::NotValid);
        }
        // What `parsed.format()` writes in E.164 mode, without the national
        // format patterns it also matches first (most of a lookup's cost).
        let code = parsed.code().value();
        let e164 = format!("+{code}{}", parsed.national());
        let country = parsed.country().id().map(|id| format!("{id:?}"));
        let calling_code_len = code.checked_ilog10().map_or(1, |d| d as usize + 1);
        Ok(PhoneNumber {
            e164,
            country,
            calling_code_len,
        })
    }
}

/// `phonenumber::is_valid`, with the kinds of number tried mobile first.
///
/// A number is valid when its region's plan has it: it matches the plan's
/// general pattern and the pattern of some kind of number. The crate tries
/// the kinds in its own order to name the kind (premium rate, toll free, …,
/// mobile last), so a mobile number, the kind that receives codes, paid for
/// up to eight regex searches that could not change the answer.
fn in_numbering_plan(number: &phonenumber::PhoneNumber) -> bool {
    let database = &*phonenumber::metadata::DATABASE;
    let code = number.code().value();
    let national = number.national().to_string();
    let Some(regions) = database.region(&code) else {
        return false;
    };
    let plan = match regions[..] {
        ["001"] => database.by_code(&code).and_then(|m| m.into_iter().next()),
        [region] => database.by_id(region),
        // Regions sharing a calling code: the number's is the first whose
        // leading digits it starts with or, lacking those, whose plan has it.
        _ => regions.iter().find_map(|&region| {
            let plan = database.by_id(region)?;
            let ours = match plan.leading_digits() {
                Some(leading) => leading.find(&national).is_some_and(|m| m.start() == 0),
                None => plan_has(plan, &national),
            };
            ours.then_some(plan)
        }),
    };
    plan.is_some_and(|plan| plan_has(plan, &national))
}

fn plan_has(plan: &phonenumber::Metadata, national: &str) -> bool {
    plan.descriptors().general().is_match(national)
        && number_kinds(plan).any(|kind| kind.is_match(national))
}

/// The kinds of number a plan describes, mobile first.
fn number_kinds(
    plan: &phonenumber::Metadata,
) -> impl Iterator<Item = &phonenumber::metadata::Descriptor> {
    let kinds = plan.descriptors();
    [
        kinds.mobile(),
        kinds.fixed_line(),
        kinds.premium_rate(),
        kinds.toll_free(),
        kinds.shared_cost(),
        kinds.voip(),
        kinds.personal_number(),
        kinds.pager(),
        kinds.uan(),
        kinds.voicemail(),
    ]
    .into_iter()
    .flatten()
}

/// A parsed number, typed in its canonical form.
impl From<PhoneNumber> for TypedNumber {
    fn from(phone: PhoneNumber) -> Self {
        Self { e164: phone.e164 }
    }
}

impl fmt::Debug for TypedNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TypedNumber({})", self.masked())
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
    fn a_lookup_skips_only_the_numbering_plan() {
        // Not an assigned number block, but shaped like one: nothing was ever
        // sent to it, and a lookup of it is as cheap as any other.
        assert!(PhoneNumber::parse("+31012345678").is_err());
        let typed = TypedNumber::parse("+31012345678").unwrap();
        assert!(typed.normalise().is_ok());
        assert_eq!(TypedNumber::parse("+3165"), Err(PhoneError::Length));
        assert_eq!(TypedNumber::parse("+31abc"), Err(PhoneError::Characters));
    }

    #[test]
    fn a_typed_number_keeps_its_digits_and_hides_them_when_shown() {
        let typed = TypedNumber::parse("0031 (651) 860-670").unwrap();
        assert_eq!(typed.e164(), "+31651860670");
        assert_eq!(typed.masked(), "+*******0670");
        assert!(!format!("{typed:?}").contains("651860"));
        // A trunk prefix after the calling code is typed, not normalised, until asked.
        let trunk = TypedNumber::parse("+31 0651860670").unwrap();
        assert_eq!(trunk.e164(), "+310651860670");
        assert_eq!(trunk.normalise().unwrap().e164(), "+31651860670");
    }

    #[test]
    fn prefixes_start_at_the_calling_code_and_stop_before_the_last_four() {
        let nl = PhoneNumber::parse("+31651860670").unwrap();
        assert_eq!(nl.calling_code(), "+31");
        assert_eq!(nl.prefix(0), "+31");
        assert_eq!(nl.prefix(3), "+31651");
        assert_eq!(nl.prefix(20), "+3165186", "the last four digits stay out");
        let us = PhoneNumber::parse("+12025550143").unwrap();
        assert_eq!((us.calling_code(), us.prefix(3)), ("+1", "+1202"));
        let ug = PhoneNumber::parse("+256700123456").unwrap();
        assert_eq!((ug.calling_code(), ug.prefix(3)), ("+256", "+256700"));
    }

    #[test]
    fn masking_hides_all_but_last_four() {
        let nl = PhoneNumber::parse("31651860670").unwrap();
        assert_eq!(mask_digits(nl.digits()), "*******0670");
        assert_eq!(nl.masked(), "+*******0670");
        assert!(!format!("{nl:?}").contains("651860"));
    }

    #[test]
    fn a_stored_number_reads_back_as_parsed() {
        for input in [
            "+31651860670",
            "+12025550143",
            "+256700123456",
            "+4915123456789",
        ] {
            let parsed = PhoneNumber::parse(input).unwrap();
            let stored = PhoneNumber::from_stored(parsed.e164(), parsed.country()).unwrap();
            assert_eq!(stored, parsed);
            assert_eq!(stored.prefix(3), parsed.prefix(3));
        }
        assert_eq!(PhoneNumber::from_stored("31651860670", Some("NL")), None);
        assert_eq!(PhoneNumber::from_stored("+99912345678", None), None);
    }

    /// Every example number in the numbering plan's data, of every kind and
    /// every region (those sharing a calling code too), and each with its last
    /// digit dropped, is judged as the crate judges it.
    #[test]
    fn validity_is_the_numbering_plan_s_for_its_own_examples() {
        let database = &*phonenumber::metadata::DATABASE;
        let mut judged = (0, 0);
        for code in 1..=999u16 {
            for plan in database.by_code(&code).unwrap_or_default() {
                let examples = std::iter::once(plan.descriptors().general())
                    .chain(number_kinds(plan))
                    .filter_map(|kind| kind.example());
                for example in examples {
                    for digits in [example, &example[..example.len() - 1]] {
                        let Ok(number) = phonenumber::parse(None, format!("+{code}{digits}"))
                        else {
                            continue;
                        };
                        let valid = phonenumber::is_valid(&number);
                        assert_eq!(in_numbering_plan(&number), valid, "+{code} {digits}");
                        if valid { judged.0 += 1 } else { judged.1 += 1 }
                    }
                }
            }
        }
        assert!(
            judged.0 > 1000 && judged.1 > 100,
            "valid and invalid examples: {judged:?}"
        );
    }

    proptest! {
        /// Trying the kinds of number in another order gives the crate's answer.
        #[test]
        fn validity_is_the_numbering_plan_s(
            code in prop::sample::select(vec![
                "1", "7", "20", "27", "31", "33", "39", "44", "49", "52", "55", "61", "62",
                "81", "86", "91", "234", "254", "256", "262", "590", "800", "882", "971", "979",
            ]),
            national in "[0-9]{4,13}",
        ) {
            if let Ok(parsed) = phonenumber::parse(None, format!("+{code}{national}")) {
                prop_assert_eq!(in_numbering_plan(&parsed), phonenumber::is_valid(&parsed));
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = PhoneNumber::parse(&s);
        }

        #[test]
        fn a_lookup_reads_every_valid_number_as_parse_does(s in "[+0]?[0-9 ()-]{8,22}") {
            if let Ok(p) = PhoneNumber::parse(&s) {
                let typed = TypedNumber::parse(&s);
                prop_assert_eq!(typed.as_ref().map(TypedNumber::normalise), Ok(Ok(p.clone())));
                // Typed as sent, a number needs no normalising to be found.
                let sent = TypedNumber::from(p.clone());
                prop_assert_eq!(sent.e164(), p.e164());
            }
            if let Ok(typed) = TypedNumber::parse(&s) {
                let _ = typed.normalise();
            }
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
