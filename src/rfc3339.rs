//! RFC 3339 timestamps written into one buffer.
//!
//! Response timestamps, as chrono's `Serialize` writes them
//! (`2026-12-06T14:31:02.123456Z`), for `#[serde(serialize_with = ...)]`:
//! chrono goes through `Display`, and serde_json escapes each piece `Display`
//! writes separately, a character at a time here: ~5k instructions a
//! timestamp, three in every send's answer. Log timestamps, as
//! tracing-subscriber writes them (always microseconds): its `write!` of seven
//! numbers cost ~2.4k instructions a log line, this ~1.2k.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

pub fn serialize<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match write(t, &mut buf) {
        Some(text) => serializer.serialize_str(text),
        // Years outside 0–9999 and leap seconds, which no clock here makes.
        None => t.serialize(serializer),
    }
}

pub fn serialize_option<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serializer.serialize_some(&Rfc3339(t)),
        None => serializer.serialize_none(),
    }
}

struct Rfc3339<'a>(&'a DateTime<Utc>);

impl Serialize for Rfc3339<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize(self.0, serializer)
    }
}

/// `YYYY-MM-DDTHH:MM:SS`, then the nanoseconds in groups of three digits
/// without trailing zero groups (none when zero), then `Z`: chrono's format.
fn write<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; 30]) -> Option<&'b str> {
    let (fraction, fraction_digits) = match t.nanosecond() {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    write_with(t, fraction, fraction_digits, buf)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: always microseconds, as tracing-subscriber's
/// `SystemTime` timer writes log timestamps. `None` where `write`'s is.
pub fn write_micros<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; 30]) -> Option<&'b str> {
    write_with(t, t.nanosecond() / 1_000, 6, buf)
}

/// The `.ffffffZ` that follows a `write_micros` second already in
/// `buf[..19]`, for a time whose nanoseconds are `nanosecond` (under 10^9).
pub fn write_micros_after_second(nanosecond: u32, buf: &mut [u8; 30]) -> Option<&str> {
    let mut micros = nanosecond / 1_000;
    buf[19] = b'.';
    for slot in buf[20..26].iter_mut().rev() {
        *slot = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf[26] = b'Z';
    std::str::from_utf8(&buf[..27]).ok()
}

fn write_with<'b>(
    t: &DateTime<Utc>,
    fraction: u32,
    fraction_digits: usize,
    buf: &'b mut [u8; 30],
) -> Option<&'b str> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    // A leap second (chrono's nanoseconds past 10^9) has no digits here.
    if t.nanosecond() >= 1_000_000_000 {
        return None;
    }
    let parts = [
        (None, year, 4),
        (Some(b'-'), t.month(), 2),
        (Some(b'-'), t.day(), 2),
        (Some(b'T'), t.hour(), 2),
        (Some(b':'), t.minute(), 2),
        (Some(b':'), t.second(), 2),
        (Some(b'.'), fraction, fraction_digits),
    ];
    let mut len = 0;
    for (separator, value, digits) in parts {
        if digits == 0 {
            continue;
        }
        if let Some(separator) = separator {
            buf[len] = separator;
            len += 1;
        }
        let mut rest = value;
        for slot in buf[len..len + digits].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        len += digits;
    }
    buf[len] = b'Z';
    len += 1;
    std::str::from_utf8(&buf[..len]).ok()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    #[derive(Serialize)]
    struct Ours {
        #[serde(serialize_with = "serialize")]
        at: DateTime<Utc>,
        #[serde(serialize_with = "serialize_option")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(Serialize)]
    struct Chronos {
        at: DateTime<Utc>,
        maybe: Option<DateTime<Utc>>,
    }

    fn both(at: DateTime<Utc>, maybe: Option<DateTime<Utc>>) -> (String, String) {
        (
            serde_json::to_string(&Ours { at, maybe }).unwrap(),
            serde_json::to_string(&Chronos { at, maybe }).unwrap(),
        )
    }

    #[test]
    fn every_precision_and_the_edges_read_as_chrono_writes_them() {
        let second = Utc.with_ymd_and_hms(2026, 12, 6, 14, 31, 2).unwrap();
        for nanos in [0, 5_000_000, 120_000_000, 123_456_000, 123_456_789, 7] {
            let at = second + chrono::Duration::nanoseconds(nanos);
            let (ours, chronos) = both(at, Some(at));
            assert_eq!(ours, chronos);
        }
        let (ours, _) = both(second, None);
        assert_eq!(
            ours, r#"{"at":"2026-12-06T14:31:02Z","maybe":null}"#,
            "chrono's format, checked by hand once"
        );
        for at in [
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap(),
        ] {
            let (ours, chronos) = both(at, Some(at));
            assert_eq!(ours, chronos);
        }
        // A leap second, as chrono represents one: chrono's own writing.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        let (ours, chronos) = both(leap, None);
        assert_eq!(ours, chronos);
    }

    #[test]
    fn log_timestamps_have_six_digits_always() {
        let second = Utc.with_ymd_and_hms(2026, 12, 6, 14, 31, 2).unwrap();
        let mut buf = [0; 30];
        assert_eq!(
            write_micros(&second, &mut buf),
            Some("2026-12-06T14:31:02.000000Z")
        );
        let at = second + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(
            write_micros(&at, &mut buf),
            Some("2026-12-06T14:31:02.123456Z")
        );
    }

    proptest! {
        #[test]
        fn any_time_reads_as_the_log_format_writes_it(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in 0u32..1_000_000_000,
        ) {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            let mut buf = [0; 30];
            let expected = at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
            prop_assert_eq!(write_micros(&at, &mut buf), Some(expected.as_str()));
        }

        /// A second's text written once, then only the microseconds of
        /// another time in that second: the same as writing that time whole.
        #[test]
        fn a_kept_second_with_new_microseconds_reads_as_the_whole_time(
            secs in 0i64..253_402_300_800,
            first in 0u32..1_000_000_000,
            then in 0u32..1_000_000_000,
        ) {
            let mut kept = [0; 30];
            write_micros(&Utc.timestamp_opt(secs, first).unwrap(), &mut kept);
            let at = Utc.timestamp_opt(secs, then).unwrap();
            let mut whole = [0; 30];
            let expected = write_micros(&at, &mut whole).map(str::to_owned);
            prop_assert_eq!(
                write_micros_after_second(then, &mut kept).map(str::to_owned),
                expected
            );
        }

        #[test]
        fn any_time_reads_as_chrono_writes_it(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in prop_oneof![Just(0u32), (0u32..1000).prop_map(|m| m * 1_000_000), (0u32..1_000_000).prop_map(|u| u * 1000), 0u32..1_000_000_000],
        ) {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            let (ours, chronos) = both(at, Some(at));
            prop_assert_eq!(ours, chronos);
        }
    }
}
