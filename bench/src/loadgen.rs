//! A small HTTP/1.1 load generator: keep-alive connections over raw TCP, one
//! request in flight per connection, pre-formatted requests and a minimal
//! response parser, so it costs about what `wrk` costs per request (the driver
//! measures both on the bare endpoint to show it). Unlike `wrk` it can pair each
//! response with its request (to collect codes for later checks), stop when a
//! finite workload runs out, and pace requests at a fixed rate for latency runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one benchmark scenario sends and how it reads the answers.
pub trait Workload: Send + Sync + 'static {
    /// Per-connection state (e.g. the phone number of the request in flight).
    type Conn: Send + 'static;

    fn connection(&self) -> Self::Conn;
    /// Appends the next request (head and body) to `buf`; `false` when the
    /// workload has nothing left to send.
    fn request(&self, conn: &mut Self::Conn, buf: &mut Vec<u8>) -> bool;
    /// Sees every answer, in order, on the connection that sent the request.
    fn response(&self, conn: &mut Self::Conn, status: u16, body: &[u8]);
    /// Called once per connection when the run ends.
    fn finish(&self, conn: Self::Conn);
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub connections: usize,
    /// Answers in this first stretch are not counted.
    pub warmup: Duration,
    /// Measured time after the warm-up (an upper bound for finite workloads).
    pub duration: Duration,
    /// Requests per second over all connections; `None` sends as fast as answers come.
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Answers received inside the measured window.
    pub completed: u64,
    /// Every answer, warm-up included (for CPU time per request).
    pub answered: u64,
    pub elapsed: Duration,
    /// Count per status code inside the measured window.
    pub statuses: Vec<(u16, u64)>,
    pub latency: Histogram,
    /// Connection failures (each one is retried with a new connection).
    pub io_errors: u64,
    /// The workload ran out before the measured time was over.
    pub exhausted: bool,
}

impl RunResult {
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.completed as f64 / secs
        }
    }

    /// Answers whose status is in `expected`, as a fraction of all answers.
    pub fn share_of(&self, expected: &[u16]) -> f64 {
        if self.completed == 0 {
            return 0.0;
        }
        let ok: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| expected.contains(s))
            .map(|(_, n)| n)
            .sum();
        ok as f64 / self.completed as f64
    }

    pub fn status_summary(&self) -> String {
        self.statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Log-linear latency histogram in microseconds: exact below 2048 µs, then 1024
/// buckets per power of two (0.1 % resolution).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u32>,
    total: u64,
    max_us: u64,
}

const LINEAR: u64 = 2048;
const SUB: u64 = 1024;
const OCTAVES: u64 = 20;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (LINEAR + OCTAVES * SUB) as usize],
            total: 0,
            max_us: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < LINEAR {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // ≥ 11
        let octave = (exp - 11).min(OCTAVES - 1);
        let shift = exp - 10;
        let sub = ((us >> shift) - SUB).min(SUB - 1);
        (LINEAR + octave * SUB + sub) as usize
    }

    fn lower_bound(index: usize) -> u64 {
        let i = index as u64;
        if i < LINEAR {
            return i;
        }
        let octave = (i - LINEAR) / SUB;
        let sub = (i - LINEAR) % SUB;
        (SUB + sub) << (octave + 1)
    }

    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counts[Self::index(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The latency at or below which `p` percent of answers came, in microseconds.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Self::lower_bound(i);
            }
        }
        self.max_us
    }

    pub fn max(&self) -> u64 {
        self.max_us
    }
}

/// Runs `workload` against `addr` on the current runtime and returns what the
/// measured window saw.
pub async fn run<W: Workload>(
    addr: SocketAddr,
    workload: Arc<W>,
    opts: &RunOptions,
) -> anyhow::Result<RunResult> {
    let start = Instant::now();
    let measure_from = start + opts.warmup;
    let deadline = measure_from + opts.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let workload = workload.clone();
        let stop = stop.clone();
        let pace = opts.rate.map(|rate| Pace {
            first: start + Duration::from_secs_f64(i as f64 / rate),
            interval: Duration::from_secs_f64(opts.connections as f64 / rate),
        });
        tasks.push(tokio::spawn(async move {
            connection_loop(addr, workload, measure_from, deadline, pace, stop).await
        }));
    }
    let mut result = RunResult::default();
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    let mut last = measure_from;
    let mut first_error = None;
    for t in tasks {
        match t.await.context("load connection task panicked")? {
            Ok(c) => {
                result.completed += c.completed;
                result.answered += c.answered;
                result.io_errors += c.io_errors;
                result.exhausted |= c.exhausted;
                result.latency.merge(&c.latency);
                for (s, n) in c.statuses {
                    *statuses.entry(s).or_default() += n;
                }
                last = last.max(c.last_answer);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    result.statuses = statuses.into_iter().collect();
    // A finite workload ends when its last answer came; a timed one at the deadline.
    result.elapsed = if result.exhausted {
        last.saturating_duration_since(measure_from)
    } else {
        deadline.saturating_duration_since(measure_from)
    };
    Ok(result)
}

/// Reconnects one connection may need before the run is called broken.
const MAX_RECONNECTS: u64 = 2_000;

struct Pace {
    first: Instant,
    interval: Duration,
}

struct ConnResult {
    completed: u64,
    answered: u64,
    io_errors: u64,
    exhausted: bool,
    statuses: Vec<(u16, u64)>,
    latency: Histogram,
    last_answer: Instant,
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connection_loop<W: Workload>(
    addr: SocketAddr,
    workload: Arc<W>,
    measure_from: Instant,
    deadline: Instant,
    pace: Option<Pace>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ConnResult> {
    let mut state = workload.connection();
    let mut out = ConnResult {
        completed: 0,
        answered: 0,
        io_errors: 0,
        exhausted: false,
        statuses: Vec::new(),
        latency: Histogram::default(),
        last_answer: measure_from,
    };
    let mut status_counts = [0u64; 600];
    let mut stream = connect(addr).await?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut next_slot = pace.as_ref().map(|p| p.first);
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if let (Some(slot), Some(p)) = (next_slot.as_mut(), pace.as_ref()) {
            if *slot > Instant::now() {
                tokio::time::sleep_until((*slot).into()).await;
            }
            *slot += p.interval;
        }
        req.clear();
        if !workload.request(&mut state, &mut req) {
            out.exhausted = true;
            // Every connection shares the workload, so all run out together.
            stop.store(true, Ordering::Relaxed);
            break;
        }
        let sent = Instant::now();
        let answer = match exchange(&mut stream, &req, &mut buf).await {
            Ok(a) => a,
            // A server may close a keep-alive connection at any time; the
            // request is retried on a new one (and counted, not hidden).
            Err(_) if out.io_errors < MAX_RECONNECTS => {
                out.io_errors += 1;
                stream = connect(addr).await?;
                continue;
            }
            Err(e) => return Err(e.context("too many connection failures")),
        };
        let done = Instant::now();
        if answer.close {
            out.io_errors += 1;
            stream = connect(addr).await?;
        }
        workload.response(&mut state, answer.status, &buf[answer.body.clone()]);
        out.answered += 1;
        if done >= measure_from && done <= deadline {
            out.completed += 1;
            out.latency.record(done - sent);
            if let Some(c) = status_counts.get_mut(usize::from(answer.status)) {
                *c += 1;
            }
            out.last_answer = done;
        }
    }
    workload.finish(state);
    out.statuses = status_counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (s as u16, *n))
        .collect();
    Ok(out)
}

pub struct Answer {
    pub status: u16,
    pub body: std::ops::Range<usize>,
    /// The server said it closes the connection after this answer.
    pub close: bool,
}

/// One request on a connection of its own, answered within `limit`: its status
/// and body. For the driver's control calls, not for load.
pub async fn request_once(
    addr: SocketAddr,
    req: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(limit, exchange(&mut stream, req.as_bytes(), &mut buf))
        .await
        .context("no answer in time")??;
    Ok((
        answer.status,
        String::from_utf8_lossy(&buf[answer.body]).into_owned(),
    ))
}

/// Writes one request and reads its whole answer into `buf`.
pub async fn exchange(
    stream: &mut TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<Answer> {
    stream.write_all(req).await?;
    buf.clear();
    let mut head_end = None;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        let n = stream.read_buf(buf).await?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        if head_end.is_none() {
            head_end = find(buf, b"\r\n\r\n").map(|i| i + 4);
        }
        if let Some(h) = head_end {
            let (status, length, close) = parse_head(&buf[..h])?;
            if buf.len() >= h + length {
                return Ok(Answer {
                    status,
                    body: h..h + length,
                    close,
                });
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize, bool)> {
    let text = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut close = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.trim().eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked answers are not supported by the load generator");
            }
        }
    }
    Ok((status, length.unwrap_or(0), close))
}

/// Appends a request with a JSON body.
pub fn post_json(buf: &mut Vec<u8>, host: &str, path: &str, key: &str, body: &[u8]) {
    use std::io::Write;
    let _ = write!(
        buf,
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    buf.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_close() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile(50.0);
        let p99 = h.percentile(99.0);
        assert!((4990..=5010).contains(&p50), "{p50}");
        assert!((9880..=9910).contains(&p99), "{p99}");
        assert_eq!(h.max(), 10_000);
    }

    #[test]
    fn head_parsing_reads_status_and_length() {
        let (s, l, c) =
            parse_head(b"HTTP/1.1 201 Created\r\ncontent-type: x\r\nContent-Length: 42\r\n\r\n")
                .unwrap();
        assert_eq!((s, l, c), (201, 42, false));
        let (_, _, c) = parse_head(b"HTTP/1.1 503 X\r\nconnection: close\r\n\r\n").unwrap();
        assert!(c);
    }
}
