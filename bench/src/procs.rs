//! Child processes the driver starts (servers under test, the mock provider):
//! started with their stderr in a log file, read for the line that says they
//! are ready, and killed when dropped so a failed run leaves nothing behind.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

pub struct Server {
    pub name: String,
    child: Child,
    stdout: Option<tokio::io::Lines<BufReader<ChildStdout>>>,
    pub log: PathBuf,
}

impl Server {
    pub async fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            name: name.to_owned(),
            child,
            stdout,
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Reads stdout until a line starts with `prefix`; returns the rest of it.
    pub async fn wait_for_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let Some(lines) = self.stdout.as_mut() else {
            bail!("{}: stdout is not captured", self.name);
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, lines.next_line())
                .await
                .with_context(|| {
                    format!(
                        "{}: no {prefix:?} line in time; see {}",
                        self.name,
                        self.log.display()
                    )
                })??;
            match line {
                Some(l) if l.starts_with(prefix) => return Ok(l[prefix.len()..].trim().to_owned()),
                Some(_) => continue,
                None => bail!(
                    "{} exited before printing {prefix:?}; see {}",
                    self.name,
                    self.log.display()
                ),
            }
        }
    }

    /// Resident memory in bytes (Linux `/proc`).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("process has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")?;
        Ok(kb * 1024)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let pid = self.pid().context("process has exited")?;
        process_cpu(pid).context("no /proc stat")
    }

    /// Bytes the process has caused to be written to storage so far: pages it
    /// dirtied, less those of files truncated or deleted before they were
    /// written (Linux `/proc/<pid>/io`; SQLite's and the log's writes alike).
    pub fn disk_write_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("process has exited")?;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc io"))
        };
        Ok(field("write_bytes:")?.saturating_sub(field("cancelled_write_bytes:")?))
    }

    pub async fn stop(mut self) {
        // SIGTERM first so servers drain and close their stores cleanly.
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// A port that was free a moment ago (for servers that take their address from config).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, at most `limit`, until the machine is nearly idle: after a big fill
/// the kernel is still writing dirty pages back and servers run their
/// maintenance, which would otherwise land in the next measurement. Returns how
/// long it waited.
pub async fn settle(limit: Duration) -> Duration {
    let started = Instant::now();
    // Dirty pages of the filled files go to disk now, not during a measurement.
    let _ = Command::new("sync").status().await;
    let mut last = cpu_ticks();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = cpu_ticks();
        if let (Some((busy0, all0)), Some((busy1, all1))) = (last, now) {
            let (busy, all) = (busy1.saturating_sub(busy0), all1.saturating_sub(all0));
            if all > 0 && busy * 100 <= all * IDLE_BUSY_PERCENT {
                break;
            }
        }
        last = now;
    }
    started.elapsed()
}

/// Busy share of all cores below which the machine counts as idle.
const IDLE_BUSY_PERCENT: u64 = 10;

/// Busy and total jiffies of all cores (Linux `/proc/stat`).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal…: idle and iowait are not busy.
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((all.saturating_sub(idle), all))
}

/// CPU time (user + system) process `pid` has used so far (Linux `/proc`).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The processes of a store's own server on this machine, whose CPU time a
/// scenario adds to otpd's: redis-server (one process), or every PostgreSQL
/// process (one backend per connection, and its background workers).
#[derive(Clone, Copy)]
pub enum StoreServer {
    /// In otpd's own process (memory, SQLite), or not found on this machine.
    Unmeasured,
    Redis(u32),
    Postgres,
}

impl StoreServer {
    /// CPU time the store's server processes have used so far.
    pub fn cpu_time(self) -> Option<Duration> {
        match self {
            StoreServer::Unmeasured => None,
            StoreServer::Redis(pid) => process_cpu(pid),
            StoreServer::Postgres => Some(
                std::fs::read_dir("/proc")
                    .ok()?
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|c| c.trim() == "postgres")
                    })
                    .filter_map(process_cpu)
                    .sum(),
            ),
        }
    }
}
