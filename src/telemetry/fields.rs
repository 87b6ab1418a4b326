//! The text format's fields, written as tracing-subscriber's `DefaultFields`
//! writes them (`name="value"`, `name=42`, a bare message) for a fraction of
//! its instructions: it takes every value through `core::fmt` (padding, a
//! `Debug` escape check per character), which was most of the cost of a
//! request's audit line and span.
//!
//! Only the common cases take the short path: a string of printable ASCII that
//! needs no escaping, an integer, a boolean, a field with an ordinary name.
//! Everything else (other characters, errors, `r#` names, `log.` metadata)
//! goes to `DefaultVisitor` itself, so the output is byte for byte the same.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// `FormatFields` for the text format (`fmt_fields`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'a> MakeVisitor<Writer<'a>> for TextFields {
    type Visitor = TextVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> TextVisitor<'a> {
        TextVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

pub struct TextVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Hands one field to tracing-subscriber's own visitor; `log.` metadata,
    /// which it skips without a separating space, is skipped here.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if field.name().starts_with("log.") {
            return;
        }
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut default);
        self.result = default.finish();
        self.is_empty = false;
    }

    /// `name=` after the separating space; `None` when the name needs
    /// `DefaultVisitor`'s handling (the message, `r#` names, `log.` metadata).
    fn start(&mut self, field: &Field) -> Option<fmt::Result> {
        let name = field.name();
        if !ordinary(name) {
            return None;
        }
        let pad = self.separator();
        Some(write_joined(&mut self.writer, [pad, name, "="]))
    }

    /// A value written as it is, unquoted: an integer or a boolean.
    fn record_unquoted(&mut self, field: &Field, text: &str) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if !ordinary(name) {
            return self.delegate(field, |d| d.record_debug(field, &format_args!("{text}")));
        }
        let pad = self.separator();
        self.result = write_joined(&mut self.writer, [pad, name, "=", text]);
    }

    /// The space before every field but the first.
    fn separator(&mut self) -> &'static str {
        if std::mem::take(&mut self.is_empty) {
            ""
        } else {
            " "
        }
    }
}

/// A name written as it is: not the message, an `r#` name or `log.` metadata.
fn ordinary(name: &str) -> bool {
    name != "message" && !name.starts_with("r#") && !name.starts_with("log.")
}

/// Writes `parts` one after the other, in one call when they fit a small
/// buffer: each call into the line's `String` goes through `dyn fmt::Write`,
/// and a field is five pieces.
fn write_joined<const N: usize>(w: &mut Writer<'_>, parts: [&str; N]) -> fmt::Result {
    let mut buf = [0u8; 128];
    let mut len = 0;
    for part in parts {
        let Some(slot) = buf.get_mut(len..len + part.len()) else {
            return parts.iter().try_for_each(|p| w.write_str(p));
        };
        slot.copy_from_slice(part.as_bytes());
        len += part.len();
    }
    // Whole `str`s joined at their boundaries: still UTF-8.
    w.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
}

/// Printable ASCII that `str`'s `Debug` writes as it is (no quote or
/// backslash to escape) and that has no character the message escape rewrites.
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if !plain(value) {
            return self.delegate(field, |d| d.record_str(field, value));
        }
        if field.name() == "message" {
            let pad = self.separator();
            self.result = write_joined(&mut self.writer, [pad, value]);
            return;
        }
        let name = field.name();
        if !ordinary(name) {
            return self.delegate(field, |d| d.record_str(field, value));
        }
        let pad = self.separator();
        self.result = write_joined(&mut self.writer, [pad, name, "=\"", value, "\""]);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_unquoted(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_unquoted(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record_unquoted(field, if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.delegate(field, |d| d.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        match self.start(field) {
            Some(started) => self.result = started.and_then(|()| write!(self.writer, "{value:?}")),
            None => self.delegate(field, |d| d.record_debug(field, value)),
        }
    }
}

impl VisitOutput<fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::DefaultFields;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Self;

        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Failure(String);

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Failure {}

    /// Logs the same span and events through `fields` and returns the text.
    fn logged<F>(fields: F, text: &str, number: i64) -> String
    where
        F: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .without_time()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::error_span!("request", request_id = %text, route = text, n = number);
            let _entered = span.enter();
            span.record("n", number.unsigned_abs());
            tracing::info!(target: "audit", event = "check", tenant = text, to = ?text, outcome = "wrong", n = number, ok = number > 0);
            tracing::info!(
                r#type = text,
                flag = true,
                none = Option::<&str>::None,
                "a message"
            );
            tracing::warn!(text, number);
            tracing::warn!(
                error = &Failure(text.to_owned()) as &dyn std::error::Error,
                "failed: {text}"
            );
            tracing::error!("{}", text);
            tracing::debug!(ratio = 0.25, count = number.unsigned_abs(), "{text:?}");
        });
        let bytes = out.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).expect("UTF-8 log text")
    }

    #[test]
    fn a_request_line_reads_as_tracing_subscriber_writes_it() {
        let ours = logged(TextFields, "default", 7);
        assert_eq!(ours, logged(DefaultFields::new(), "default", 7));
        assert!(
            ours.contains(
                r#"request{request_id=default route="default" n=7 n=7}: audit: event="check" tenant="default" to="default" outcome="wrong" n=7 ok=true"#
            ),
            "{ours}"
        );
    }

    proptest! {
        /// Quotes, backslashes, control characters, ANSI escapes and any
        /// Unicode come out exactly as tracing-subscriber writes them.
        #[test]
        fn any_value_is_written_as_tracing_subscriber_writes_it(
            text in "(\\PC|[\"\\\\\n\r\t\u{1b}\u{7f}\u{85}\u{9b}\u{301}])*",
            number in any::<i64>(),
        ) {
            prop_assert_eq!(
                logged(TextFields, &text, number),
                logged(DefaultFields::new(), &text, number)
            );
        }
    }
}
