//! Logging setup: human-readable by default, JSON with `log.format = "json"`.
//! Logs go to stderr; stdout is kept for what scripts capture (a new API key).
//! Plain text, never colour codes, on a terminal too.
//!
//! Every event inside a request carries that request's `request_id` (from the
//! span `http::observe` opens). Audit events use the target `audit`.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;

use chrono::{Timelike, Utc};
use parking_lot::RwLock;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogSettings;

mod fields;

/// `RUST_LOG` when set and valid, else `log.level`, else `info`.
pub fn filter(settings: &LogSettings) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The subscriber `init` installs, writing to `writer`; tests capture with it.
pub fn subscriber<W>(
    settings: &LogSettings,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(Timestamp)
        .with_writer(writer);
    if settings.format == "json" {
        Box::new(builder.json().flatten_event(true).finish())
    } else {
        Box::new(
            builder
                .with_ansi(false)
                .fmt_fields(fields::TextFields)
                .finish(),
        )
    }
}

pub fn init(settings: &LogSettings) {
    // Written synchronously, one write per line: an audit line must not sit in
    // a buffer that a crash or `kill -9` would lose (a background writer,
    // tried for speed, lost them in the audit-log test).
    let _ = subscriber(settings, filter(settings), LineWriter::stderr()).try_init();
}

/// Each line's time, as tracing-subscriber's own `SystemTime` writes it
/// (`2026-12-06T14:31:02.123456Z`), for half its instructions.
struct Timestamp;

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = Utc::now();
        let mut buf = [0; 30];
        let text = LAST_SECOND.with(|last| {
            let (second, cached) = last.get();
            if second == now.timestamp() && now.nanosecond() < 1_000_000_000 {
                buf[..SECOND_LEN].copy_from_slice(&cached);
                crate::rfc3339::write_micros_after_second(now.nanosecond(), &mut buf)
            } else {
                let text = crate::rfc3339::write_micros(&now, &mut buf)?;
                let mut second_text = [0; SECOND_LEN];
                second_text.copy_from_slice(&text.as_bytes()[..SECOND_LEN]);
                last.set((now.timestamp(), second_text));
                Some(text)
            }
        });
        match text {
            Some(text) => w.write_str(text),
            None => SystemTime.format_time(w),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS`: the part of a log timestamp that lines written in
/// the same second share.
const SECOND_LEN: usize = 19;

thread_local! {
    /// This thread's last logged second and its text: most lines repeat it,
    /// so only their microseconds are written.
    static LAST_SECOND: Cell<(i64, [u8; SECOND_LEN])> = const { Cell::new((i64::MIN, [0; SECOND_LEN])) };
}

/// A client address as a log field's text, as `Display` writes it, without
/// a heap copy; IPv4 by hand (its `Display` cost ~1.3k instructions a line,
/// a tenth of an audit line).
pub struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    pub fn of(ip: Option<IpAddr>) -> Option<Self> {
        let mut text = Self {
            buf: [0; 45],
            len: 0,
        };
        match ip? {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b".");
                    }
                    text.push(itoa::Buffer::new().format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                let mut cursor = io::Cursor::new(&mut text.buf[..]);
                // 45 bytes hold the longest form (`ffff:…:255.255.255.255`).
                write!(cursor, "{v6}").ok()?;
                text.len = usize::try_from(cursor.position()).ok()?;
            }
        }
        Some(text)
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A log destination that takes each line in one `write(2)`, without std's
/// process-wide stderr lock: that lock is held across the system call, so
/// request threads logging at once queued on it and woke each other (futex
/// calls were ~2.5 % of a check's CPU with two threads; more threads queue
/// longer).
///
/// A write of at most `PIPE_BUF` bytes is never split, not even on a pipe,
/// so short lines need no lock. A longer line may be, so it waits for the
/// short ones in flight and keeps them out until it is whole.
pub struct LineWriter {
    file: Option<File>,
    long_line: RwLock<()>,
}

/// The size POSIX guarantees a pipe takes in one piece (Linux's).
const PIPE_BUF: usize = 4096;

impl LineWriter {
    /// A second handle on the process's stderr (dropped lines if it is closed,
    /// as std's stderr drops them).
    pub fn stderr() -> Self {
        let file = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(File::from);
        Self {
            file,
            long_line: RwLock::new(()),
        }
    }

    pub fn new(file: File) -> Self {
        Self {
            file: Some(file),
            long_line: RwLock::new(()),
        }
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

/// One event's output; tracing-subscriber hands it the whole line at once.
pub struct Line<'a>(&'a LineWriter);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let Some(mut file) = self.0.file.as_ref() else {
            return Ok(());
        };
        if buf.len() <= PIPE_BUF {
            let _short = self.0.long_line.read();
            file.write_all(buf)
        } else {
            let _long = self.0.long_line.write();
            file.write_all(buf)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.4",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().expect("an address");
            let text = IpText::of(Some(ip)).expect("text");
            assert_eq!(text.as_str(), ip.to_string());
        }
        assert!(IpText::of(None).is_none());
    }

    /// Lines written from many threads at once, short and longer than a pipe
    /// takes in one piece, arrive whole: none is cut into by another.
    #[test]
    fn concurrent_lines_arrive_whole() {
        let (reader, writer) = io::pipe().expect("a pipe");
        let writer = std::sync::Arc::new(LineWriter::new(File::from(std::os::fd::OwnedFd::from(
            writer,
        ))));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..200usize {
                        let len = if i % 10 == 0 { 3 * PIPE_BUF } else { 40 + i };
                        let letter = char::from(b'a' + t);
                        let line = format!("{t} {}\n", letter.to_string().repeat(len));
                        writer
                            .make_writer()
                            .write_all(line.as_bytes())
                            .expect("written");
                    }
                })
            })
            .collect();
        let reading = std::thread::spawn(move || {
            BufReader::new(reader)
                .lines()
                .map(|l| l.expect("a line"))
                .collect::<Vec<_>>()
        });
        for t in threads {
            t.join().expect("writer thread");
        }
        drop(writer);
        let lines = reading.join().expect("reader thread");
        assert_eq!(lines.len(), 8 * 200);
        for line in lines {
            let (t, body) = line.split_once(' ').expect("thread number, then the body");
            let letter = char::from(b'a' + t.parse::<u8>().expect("a thread number"));
            assert!(
                body.chars().all(|c| c == letter),
                "a line was cut into: {t}"
            );
        }
    }
}
