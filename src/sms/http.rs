//! Plumbing shared by the HTTP providers: the process-wide client, and turning
//! transport failures and HTTP answers into `ProviderError`s whose messages are
//! safe to store and show (no URL, no body dump, no phone number, no code).

use std::time::Duration;

use reqwest::{RequestBuilder, StatusCode, header::HeaderMap};

use super::{ProviderError, ProviderErrorKind};

/// Larger answers are cut: no provider sends more for one message, and a broken
/// or hostile endpoint must not make us buffer without bound.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest provider-supplied text kept in an error message.
const MAX_SNIPPET_CHARS: usize = 120;

/// Upper bound on a `Retry-After` we pass on; a provider asking for more is
/// treated as down for an hour rather than trusted blindly.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

/// The one HTTP client of the process (connection pooling across providers).
/// `total_timeout` is the default; each provider also sets its route's own.
/// Redirects are not followed: a provider API never redirects a send, and
/// following one could replay a POST somewhere unexpected.
pub fn http_client(
    connect_timeout: Duration,
    total_timeout: Duration,
) -> Result<reqwest::Client, String> {
    install_tls_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(total_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("otpd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// TLS runs on ring (Cargo.toml says why). reqwest takes the process's
/// default provider and panics without one, so it is installed before the
/// first client is built; installing it again changes nothing.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A provider endpoint, parsed once when its route is built rather than by
/// the client on every request.
pub(crate) fn endpoint(url: &str) -> Result<reqwest::Url, String> {
    // The text is not echoed: a webhook URL may carry a token.
    reqwest::Url::parse(url).map_err(|e| format!("the endpoint is not a URL: {e}"))
}

/// A provider's answer, read in full (up to `MAX_BODY_BYTES`).
pub(crate) struct HttpAnswer {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A 2xx whose body is not what the provider documents. The provider most
    /// likely took the message, hence `Malformed` (outcome unknown), not a plain
    /// failure.
    pub fn malformed(&self, provider: &str) -> ProviderError {
        let what = if self.body.iter().all(u8::is_ascii_whitespace) {
            "an empty body"
        } else if looks_like_html(&self.body) {
            "an HTML page"
        } else {
            "a body that is not the documented JSON"
        };
        ProviderError::new(
            ProviderErrorKind::Malformed,
            format!(
                "{provider} answered HTTP {} with {what}",
                self.status.as_u16()
            ),
        )
    }
}

/// Sends the request and reads the answer. Transport failures come back as
/// errors; any HTTP status comes back as an answer for the provider to judge.
pub(crate) async fn execute(
    request: RequestBuilder,
    timeout: Duration,
) -> Result<HttpAnswer, ProviderError> {
    let mut response = request
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| transport_error(&e, timeout))?;
    let status = response.status();
    let retry_after = parse_retry_after(response.headers());
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_BODY_BYTES.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_BODY_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            // A failed status is judged by its code alone; a success cut short
            // may still mean the provider took the message.
            Err(_) if !status.is_success() => {
                body.clear();
                break;
            }
            Err(e) if e.is_timeout() => {
                return Err(ProviderError::new(
                    ProviderErrorKind::Timeout,
                    format!(
                        "answer not complete within {} ms (HTTP {})",
                        timeout.as_millis(),
                        status.as_u16()
                    ),
                ));
            }
            Err(_) => {
                return Err(ProviderError::new(
                    ProviderErrorKind::Malformed,
                    format!("answer cut off (HTTP {})", status.as_u16()),
                ));
            }
        }
    }
    Ok(HttpAnswer {
        status,
        retry_after,
        body,
    })
}

/// A connect failure (refused, DNS, TLS, connect timeout) means nothing was
/// sent, so it is `Unavailable` and safe to fail over. Any later failure (a
/// timeout, or the connection reset or closed before an answer) is `Timeout`:
/// the request may have been delivered, so with `failover_on_timeout` off no
/// second route may send it again. The message never includes reqwest's
/// text, which carries the URL.
fn transport_error(e: &reqwest::Error, timeout: Duration) -> ProviderError {
    if e.is_connect() {
        let why = if e.is_timeout() {
            "connect timed out"
        } else {
            "could not connect"
        };
        ProviderError::new(ProviderErrorKind::Unavailable, why)
    } else if e.is_timeout() {
        ProviderError::new(
            ProviderErrorKind::Timeout,
            format!("no answer within {} ms", timeout.as_millis()),
        )
    } else if e.is_builder() {
        ProviderError::new(ProviderErrorKind::Unavailable, "request could not be built")
    } else {
        ProviderError::new(
            ProviderErrorKind::Timeout,
            "connection lost before an answer",
        )
    }
}

/// What a bare HTTP status says, for answers without a recognised error body.
/// `detail` is the provider's own text, if any, made safe and appended.
pub(crate) fn status_error(
    provider: &str,
    answer: &HttpAnswer,
    detail: Option<&str>,
) -> ProviderError {
    let code = answer.status.as_u16();
    let (kind, what) = match code {
        429 => (ProviderErrorKind::RateLimited, "rate limited"),
        401 | 403 => (ProviderErrorKind::Auth, "credentials refused"),
        402 => (ProviderErrorKind::InsufficientBalance, "payment required"),
        300..=399 => (
            ProviderErrorKind::Unavailable,
            "unexpected redirect (check base_url)",
        ),
        404 | 405 => (
            ProviderErrorKind::Unavailable,
            "endpoint not found (check base_url)",
        ),
        408 => (ProviderErrorKind::Unavailable, "request timed out"),
        500..=599 => (ProviderErrorKind::Unavailable, "server error"),
        _ => (ProviderErrorKind::Rejected, "request refused"),
    };
    let message = match detail.map(safe_snippet).filter(|d| !d.is_empty()) {
        Some(detail) => format!("{provider} answered HTTP {code}: {what}: {detail}"),
        None => format!("{provider} answered HTTP {code}: {what}"),
    };
    ProviderError::new(kind, message).with_retry_after(if code == 429 {
        answer.retry_after
    } else {
        None
    })
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Provider-supplied text made safe for an error message: one line, bounded,
/// and every number of four or more digits hidden (codes have at least four
/// digits, phone numbers more; shorter runs such as "route 3" stay readable).
/// A number counts whole across the separators numbers are written with
/// (`+31 6-51 86 06 70`, `(0)6`), and in any script's digits.
pub(crate) fn safe_snippet(text: &str) -> String {
    let mut out = String::new();
    // The number being read: its text (digits and the separators between
    // them), how many digits, and separators after it not yet known to join.
    let (mut number, mut digits, mut gap) = (String::new(), 0usize, String::new());
    let flush = |out: &mut String, number: &mut String, digits: &mut usize| {
        if *digits >= 4 {
            out.push_str("[digits]");
        } else {
            out.push_str(number);
        }
        number.clear();
        *digits = 0;
    };
    for c in text.chars() {
        if c.is_numeric() {
            number.push_str(&gap);
            gap.clear();
            number.push(c);
            digits += 1;
        } else if digits > 0 && gap.len() < 2 && matches!(c, ' ' | '-' | '.' | '(' | ')' | '/') {
            gap.push(c);
        } else {
            flush(&mut out, &mut number, &mut digits);
            out.push_str(&gap);
            gap.clear();
            out.push(if c.is_control() { ' ' } else { c });
        }
    }
    flush(&mut out, &mut number, &mut digits);
    out.push_str(&gap);
    let trimmed = out.trim();
    match trimmed.char_indices().nth(MAX_SNIPPET_CHARS) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None => trimmed.to_owned(),
    }
}

fn looks_like_html(body: &[u8]) -> bool {
    let start = String::from_utf8_lossy(&body[..body.len().min(64)]).to_ascii_lowercase();
    let start = start.trim_start();
    start.starts_with('<')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_hide_numbers_and_codes_but_keep_short_counts() {
        assert_eq!(
            safe_snippet("The 'To' number +15005550001 is not valid; code 123456"),
            "The 'To' number +[digits] is not valid; code [digits]"
        );
        assert_eq!(
            safe_snippet("not authorized for route 3"),
            "not authorized for route 3"
        );
        assert_eq!(safe_snippet("line\nbreak"), "line break");
        // Numbers as people write them, and in other scripts' digits.
        for written in [
            "+31 6 51 86 06 70",
            "+31 (0)6-5186-0670",
            "+31.651.860.670",
            "\u{0660}\u{0666}\u{0665}\u{0661}\u{0668}",
            "12 34",
        ] {
            let plus = if written.starts_with('+') { "+" } else { "" };
            assert_eq!(
                safe_snippet(&format!("number {written} refused")),
                format!("number {plus}[digits] refused"),
                "{written}"
            );
        }
        assert_eq!(
            safe_snippet("HTTP 503 - retry in 30 s (route 3)"),
            "HTTP 503 - retry in 30 s (route 3)"
        );
        let long = "x".repeat(500);
        assert_eq!(safe_snippet(&long).chars().count(), MAX_SNIPPET_CHARS + 1);
    }

    #[test]
    fn retry_after_accepts_seconds_and_caps_them() {
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "17".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(17)));
        headers.insert(reqwest::header::RETRY_AFTER, "999999".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }
}
