//! Logging setup: human-readable by default, JSON with `log.format = "json"`.
//! Logs go to stderr; stdout is kept for what scripts capture (a new API key).
//! Plain text, never colour codes, on a terminal too.
//!
//! Every event inside a request carries that request's `request_id` (from the
//! span `http::observe` opens). Audit events use the target `audit`.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogSettings;

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
        .with_writer(writer);
    if settings.format == "json" {
        Box::new(builder.json().flatten_event(true).finish())
    } else {
        Box::new(builder.with_ansi(false).finish())
    }
}

pub fn init(settings: &LogSettings) {
    // Written synchronously, one write per line: an audit line must not sit in
    // a buffer that a crash or `kill -9` would lose (a background writer,
    // tried for speed, lost them in the audit-log test).
    let _ = subscriber(settings, filter(settings), std::io::stderr).try_init();
}
